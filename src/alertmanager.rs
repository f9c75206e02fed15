//! The Alertmanager webhook payload (version 4) and its translation into
//! violations: firing alerts become violations, resolved alerts end them,
//! both keyed by the alert's fingerprint so a re-sent payload counts once.
//! Also Alertmanager's API v2: the alerts firing now ([`AlertmanagerApi`])
//! and the escalations mapek posts there ([`AlertmanagerEscalations`]).
//! mapek's own escalation alerts (labelled `mapek_escalation="true"`) are
//! never taken as violations nor counted as firing, so an Alertmanager
//! routing everything to mapek does not loop.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mapek_actors::model::{new_id, Severity, Signal, Timestamp, Violation};
use serde::Deserialize;

/// Source name of violations that came through the webhook.
pub const SOURCE: &str = "alertmanager";

/// `alertname` of the alerts mapek posts for escalated incidents.
pub const ESCALATION_ALERTNAME: &str = "MapekEscalation";
/// Label (set to `"true"`) that marks mapek's own escalation alerts.
pub const ESCALATION_LABEL: &str = "mapek_escalation";
/// Seconds between two posts of the escalations still firing; each firing
/// alert ends `4 ×` this after it was posted unless posted again, so a
/// stopped mapek does not leave an escalation firing forever.
pub const ESCALATION_RESEND_SECONDS: u64 = 60;
/// Timeout of one post of escalations.
pub const ESCALATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether `labels` are those of one of mapek's own escalation alerts.
pub fn is_escalation(labels: &BTreeMap<String, String>) -> bool {
    labels.get(ESCALATION_LABEL).map(String::as_str) == Some("true")
}

/// A webhook notification.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPayload {
    /// Must be "4".
    pub version: String,
    /// Group status (`firing`/`resolved`).
    #[serde(default)]
    pub status: String,
    /// Receiver name.
    #[serde(default)]
    pub receiver: String,
    /// The alerts.
    pub alerts: Vec<Alert>,
    /// Group key.
    #[serde(default)]
    pub group_key: String,
    /// Alerts left out by Alertmanager's `max_alerts`.
    #[serde(default)]
    pub truncated_alerts: u64,
}

/// One alert of a notification.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `firing` or `resolved`.
    pub status: String,
    /// Labels (alertname, severity, component, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations (summary, value, ...).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When the alert started firing.
    pub starts_at: Option<DateTime<Utc>>,
    /// When it ended ("0001-01-01T00:00:00Z" while firing).
    pub ends_at: Option<DateTime<Utc>>,
    /// Link to the expression.
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    /// Stable identity of the alert.
    #[serde(default)]
    pub fingerprint: String,
}

/// Why a payload was refused.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Not JSON, or not the expected shape.
    #[error("malformed webhook payload: {0}")]
    Malformed(String),
    /// A version other than 4.
    #[error("unsupported webhook payload version `{0}` (expected \"4\")")]
    Version(String),
    /// An alert with a status other than firing/resolved.
    #[error("alert {index}: unknown status `{status}` (expected firing or resolved)")]
    Status {
        /// Position of the alert.
        index: usize,
        /// The status given.
        status: String,
    },
}

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<WebhookPayload, PayloadError> {
    let p: WebhookPayload =
        serde_json::from_slice(body).map_err(|e| PayloadError::Malformed(e.to_string()))?;
    if p.version != "4" {
        return Err(PayloadError::Version(p.version));
    }
    for (index, a) in p.alerts.iter().enumerate() {
        if a.status != "firing" && a.status != "resolved" {
            return Err(PayloadError::Status {
                index,
                status: a.status.clone(),
            });
        }
    }
    Ok(p)
}

/// Fingerprint of an alert: Alertmanager's, or one computed from the labels.
pub fn fingerprint(a: &Alert) -> String {
    if !a.fingerprint.is_empty() {
        return format!("am:{}", a.fingerprint);
    }
    let mut s = String::from("am:");
    for (k, v) in &a.labels {
        s.push_str(k);
        s.push('=');
        s.push_str(v);
        s.push(',');
    }
    s
}

/// The component an alert is about: its `component`, `service`, `job` or
/// `instance` label (the first one not blank), else `unknown`.
pub fn component_of(labels: &BTreeMap<String, String>) -> String {
    ["component", "service", "job", "instance"]
        .iter()
        .find_map(|k| labels.get(*k).filter(|v| !v.trim().is_empty()).cloned())
        .unwrap_or_else(|| "unknown".into())
}

/// Alertmanager's API v2, asked at verification time which alerts are
/// firing now (`GET /api/v2/alerts?active=true&silenced=false&inhibited=false`).
pub struct AlertmanagerApi {
    client: reqwest::Client,
    url: String,
    timeout: std::time::Duration,
}

/// One alert of `GET /api/v2/alerts` (only what is read).
#[derive(Debug, Deserialize)]
struct ApiAlert {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl AlertmanagerApi {
    /// A client of the Alertmanager at `url` (base URL).
    pub fn new(url: &str, timeout: std::time::Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("alertmanager client: {e}"))?;
        Ok(AlertmanagerApi {
            client,
            url: url.trim_end_matches('/').to_string(),
            timeout,
        })
    }
}

impl mapek_actors::ports::AlertState for AlertmanagerApi {
    fn name(&self) -> &str {
        "alertmanager"
    }

    fn count_firing<'a>(
        &'a self,
        scope: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<usize, mapek_actors::ports::SourceError>> {
        use mapek_actors::ports::SourceError;
        Box::pin(async move {
            let url = format!(
                "{}/api/v2/alerts?active=true&silenced=false&inhibited=false",
                self.url
            );
            let resp = self.client.get(&url).send().await.map_err(|e| {
                if e.is_timeout() {
                    SourceError::Timeout(self.timeout.as_secs())
                } else {
                    SourceError::Unreachable(format!("{url}: {e}"))
                }
            })?;
            let status = resp.status();
            let body = resp
                .bytes()
                .await
                .map_err(|e| SourceError::Unreachable(format!("{url}: {e}")))?;
            if !status.is_success() {
                return Err(SourceError::Status {
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
                });
            }
            let alerts: Vec<ApiAlert> = serde_json::from_slice(&body).map_err(|e| {
                SourceError::Garbage(format!("alertmanager alerts are not a JSON list: {e}"))
            })?;
            Ok(alerts
                .iter()
                .filter(|a| !is_escalation(&a.labels))
                .filter(|a| scope.is_empty() || scope.contains(&component_of(&a.labels)))
                .count())
        })
    }
}

/// Posts escalated incidents to Alertmanager (`POST /api/v2/alerts`), one
/// alert per incident, so that they follow Alertmanager's routes to the
/// people on call.
///
/// Each alert has the labels `alertname="MapekEscalation"`,
/// `mapek_escalation="true"`, `incident`, `reason` (the
/// [`EscalationKind`](mapek_actors::ports::EscalationKind) name),
/// `component` (the incident's components joined with `,`; absent when it
/// has none) and `severity` (the incident's, `warning` when unknown); the
/// annotations `summary` (the reason in words) and `description`; `startsAt`
/// the time of the escalation. A firing one ends
/// `4 × ESCALATION_RESEND_SECONDS` after the post (mapek posts it again
/// meanwhile while it lasts); a resolved one ends now.
pub struct AlertmanagerEscalations {
    client: reqwest::Client,
    url: String,
    timeout: std::time::Duration,
    clock: mapek_actors::clock::SharedClock,
    generator_url: Option<String>,
}

impl AlertmanagerEscalations {
    /// Posts to the Alertmanager at `url` (base URL) within `timeout`;
    /// `clock` dates the ends of the alerts.
    pub fn new(
        url: &str,
        timeout: std::time::Duration,
        clock: mapek_actors::clock::SharedClock,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(std::time::Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("alertmanager escalation client: {e}"))?;
        Ok(AlertmanagerEscalations {
            client,
            url: url.trim_end_matches('/').to_string(),
            timeout,
            clock,
            generator_url: None,
        })
    }

    /// Posts to `settings.url` with [`ESCALATION_TIMEOUT`].
    pub fn from_settings(
        settings: &crate::config::AlertmanagerSettings,
        clock: mapek_actors::clock::SharedClock,
    ) -> Result<Self, String> {
        AlertmanagerEscalations::new(&settings.url, ESCALATION_TIMEOUT, clock)
    }

    /// Sets the `generatorURL` of every alert (e.g. mapek's incident API).
    pub fn with_generator_url(mut self, url: impl Into<String>) -> Self {
        self.generator_url = Some(url.into()).filter(|u| !u.is_empty());
        self
    }

    /// The body of one post at `now`: the firing escalations, then the
    /// resolved ones.
    pub fn alerts(
        &self,
        firing: &[mapek_actors::ports::Escalation],
        resolved: &[mapek_actors::ports::Escalation],
        now: Timestamp,
    ) -> serde_json::Value {
        let horizon = chrono::Duration::seconds((4 * ESCALATION_RESEND_SECONDS) as i64);
        let alerts: Vec<serde_json::Value> = firing
            .iter()
            .map(|e| self.alert(e, now + horizon))
            .chain(resolved.iter().map(|e| self.alert(e, now)))
            .collect();
        serde_json::Value::Array(alerts)
    }

    /// One postable alert for `e`, ending at `ends_at` (never before it
    /// started: Alertmanager refuses that).
    fn alert(&self, e: &mapek_actors::ports::Escalation, ends_at: Timestamp) -> serde_json::Value {
        use chrono::SecondsFormat;
        use serde_json::json;
        let components = e.components.join(",");
        let mut labels = serde_json::Map::new();
        labels.insert("alertname".into(), json!(ESCALATION_ALERTNAME));
        labels.insert(ESCALATION_LABEL.into(), json!("true"));
        labels.insert("incident".into(), json!(e.incident_id));
        labels.insert("reason".into(), json!(e.kind.as_str()));
        if !components.is_empty() {
            labels.insert("component".into(), json!(components));
        }
        labels.insert(
            "severity".into(),
            json!(e.severity.unwrap_or(Severity::Warning).as_str()),
        );
        let since = e.since.to_rfc3339_opts(SecondsFormat::Millis, true);
        let shown = if components.is_empty() {
            "no component".to_string()
        } else {
            e.components.join(", ")
        };
        let description = format!(
            "mapek handed incident {} ({shown}) to people since {since}: {}",
            e.incident_id,
            e.kind.as_str()
        );
        let mut alert = serde_json::Map::new();
        alert.insert("labels".into(), serde_json::Value::Object(labels));
        alert.insert(
            "annotations".into(),
            json!({"summary": e.reason, "description": description}),
        );
        alert.insert("startsAt".into(), json!(since));
        alert.insert(
            "endsAt".into(),
            json!(ends_at
                .max(e.since)
                .to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
        if let Some(g) = &self.generator_url {
            alert.insert("generatorURL".into(), json!(g));
        }
        serde_json::Value::Object(alert)
    }
}

impl mapek_actors::ports::EscalationSink for AlertmanagerEscalations {
    fn name(&self) -> &str {
        "alertmanager"
    }

    fn post<'a>(
        &'a self,
        firing: &'a [mapek_actors::ports::Escalation],
        resolved: &'a [mapek_actors::ports::Escalation],
    ) -> futures::future::BoxFuture<'a, Result<(), mapek_actors::ports::SourceError>> {
        use mapek_actors::ports::SourceError;
        Box::pin(async move {
            if firing.is_empty() && resolved.is_empty() {
                return Ok(());
            }
            let body = self.alerts(firing, resolved, self.clock.now());
            let url = format!("{}/api/v2/alerts", self.url);
            let map_err = |e: reqwest::Error| {
                if e.is_timeout() {
                    SourceError::Timeout(self.timeout.as_secs().max(1))
                } else {
                    SourceError::Unreachable(format!("{url}: {e}"))
                }
            };
            let resp = self
                .client
                .post(&url)
                .json(&body)
                .send()
                .await
                .map_err(map_err)?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            let text = resp.bytes().await.map_err(map_err)?;
            Err(SourceError::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned(),
            })
        })
    }
}

/// Splits a payload into firing violations and resolved fingerprints.
///
/// Alerts are applied in payload order: when one fingerprint appears more
/// than once, its last alert decides (firing then resolved: resolved;
/// resolved then firing: firing). A `startsAt` in the future is clamped to
/// `now` (the receipt time), with a warning.
pub fn to_violations(p: &WebhookPayload, now: Timestamp) -> (Vec<Violation>, Vec<String>) {
    let mut firing = Vec::new();
    let mut resolved = Vec::new();
    let fps: Vec<String> = p.alerts.iter().map(fingerprint).collect();
    let mut last: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(fps.len());
    for (i, fp) in fps.iter().enumerate() {
        last.insert(fp.as_str(), i);
    }
    for (i, a) in p.alerts.iter().enumerate() {
        if is_escalation(&a.labels) {
            // mapek's own escalation, routed back here: not a symptom.
            continue;
        }
        let fp = fps[i].clone();
        if last.get(fp.as_str()) != Some(&i) {
            // A later alert of the payload for the same fingerprint decides.
            continue;
        }
        if a.status == "resolved" {
            resolved.push(fp);
            continue;
        }
        let name = a
            .labels
            .get("alertname")
            .filter(|n| !n.trim().is_empty())
            .cloned()
            .unwrap_or_else(|| "unnamed".into());
        let severity = a
            .labels
            .get("severity")
            .and_then(|s| Severity::parse(s))
            .unwrap_or(Severity::Warning);
        let component = component_of(&a.labels);
        let metric = a
            .labels
            .get("metric")
            .filter(|m| !m.trim().is_empty())
            .cloned()
            .unwrap_or_else(|| name.clone());
        let signal = a
            .labels
            .get("signal")
            .and_then(|s| {
                serde_json::from_value::<Signal>(serde_json::Value::String(s.clone())).ok()
            })
            .unwrap_or_else(|| {
                let s = Signal::infer(&metric);
                if s == Signal::Other {
                    Signal::infer(&name)
                } else {
                    s
                }
            });
        let value = a
            .annotations
            .get("value")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .unwrap_or(1.0);
        let first_seen = match a.starts_at.filter(|t| t.timestamp() > 0) {
            Some(t) if t > now => {
                tracing::warn!(fingerprint = %fp, starts_at = %t, "alert starts in the future; its onset is the receipt time");
                now
            }
            Some(t) => t,
            None => now,
        };
        firing.push(Violation {
            id: new_id("vio"),
            fingerprint: fp,
            rule: name,
            severity,
            component,
            metric,
            value,
            labels: a.labels.clone(),
            signal,
            first_seen,
            observed_at: now,
            source: SOURCE.into(),
        });
    }
    (firing, resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"receiver":"mapek","status":"firing","alerts":[
      {"status":"firing","labels":{"alertname":"CharterValidationLatencyHigh","severity":"critical","component":"charter"},
       "annotations":{"value":"2.5"},"startsAt":"2026-01-01T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"x","fingerprint":"abc"},
      {"status":"resolved","labels":{"alertname":"CharterThroughputLow"},"annotations":{},
       "startsAt":"2026-01-01T00:00:00Z","endsAt":"2026-01-01T00:05:00Z","generatorURL":"","fingerprint":"def"}],
      "groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"","version":"4","groupKey":"{}","truncatedAlerts":0}"#;

    #[test]
    fn alerts_of_one_payload_apply_in_order_and_future_onsets_are_clamped() {
        let now = Utc::now();
        let body = |first: &str, second: &str| {
            format!(
                r#"{{"version":"4","status":"firing","receiver":"mapek","groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"x","alerts":[
                  {{"status":"{first}","labels":{{"alertname":"A"}},"annotations":{{}},"startsAt":"2026-01-01T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"f1"}},
                  {{"status":"{second}","labels":{{"alertname":"A"}},"annotations":{{}},"startsAt":"9999-01-01T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"f1"}}]}}"#
            )
        };
        // Firing then resolved: resolved.
        let (f, r) = to_violations(&parse(body("firing", "resolved").as_bytes()).unwrap(), now);
        assert!(f.is_empty(), "{f:?}");
        assert_eq!(r, vec!["am:f1".to_string()]);
        // Resolved then firing: firing, and its year-9999 onset is clamped.
        let (f, r) = to_violations(&parse(body("resolved", "firing").as_bytes()).unwrap(), now);
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].first_seen, now);
    }

    #[test]
    fn firing_become_violations_and_resolved_end_them() {
        let p = parse(BODY.as_bytes()).unwrap();
        let (f, r) = to_violations(&p, Utc::now());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].fingerprint, "am:abc");
        assert_eq!(f[0].severity, Severity::Critical);
        assert_eq!(f[0].component, "charter");
        assert_eq!(f[0].signal, Signal::Latency);
        assert_eq!(f[0].value, 2.5);
        assert_eq!(f[0].first_seen.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(r, vec!["am:def".to_string()]);
    }

    #[test]
    fn mapek_escalations_routed_back_are_not_violations() {
        let body = BODY.replacen(
            r#""labels":{"alertname":"CharterValidationLatencyHigh","#,
            r#""labels":{"mapek_escalation":"true","alertname":"CharterValidationLatencyHigh","#,
            1,
        );
        assert_ne!(body, BODY);
        let p = parse(body.as_bytes()).unwrap();
        let (f, r) = to_violations(&p, Utc::now());
        assert!(f.is_empty(), "{f:?}");
        assert_eq!(
            r,
            vec!["am:def".to_string()],
            "the other alert still counts"
        );
        // Any other value of the label is an ordinary alert.
        let other = body.replacen(
            r#""mapek_escalation":"true""#,
            r#""mapek_escalation":"false""#,
            1,
        );
        let (f, _) = to_violations(&parse(other.as_bytes()).unwrap(), Utc::now());
        assert_eq!(f.len(), 1);
        // A resolved escalation resolves nothing either.
        let resolved = BODY.replacen(
            r#""labels":{"alertname":"CharterThroughputLow"}"#,
            r#""labels":{"alertname":"MapekEscalation","mapek_escalation":"true"}"#,
            1,
        );
        let (f, r) = to_violations(&parse(resolved.as_bytes()).unwrap(), Utc::now());
        assert_eq!((f.len(), r.len()), (1, 0));
    }

    fn at(s: &str) -> Timestamp {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn escalation(id: &str, kind: EscalationKind, components: &[&str]) -> Escalation {
        Escalation {
            incident_id: id.into(),
            kind,
            reason: format!("{} for {id}", kind.as_str()),
            components: components.iter().map(|c| c.to_string()).collect(),
            severity: None,
            since: at("2026-01-01T00:00:00Z"),
        }
    }

    fn sink(url: &str, timeout: std::time::Duration) -> AlertmanagerEscalations {
        let clock = ManualClock::new(at("2026-01-01T00:10:00Z"));
        AlertmanagerEscalations::new(url, timeout, Arc::new(clock)).unwrap()
    }

    use mapek_actors::clock::ManualClock;
    use mapek_actors::ports::Escalation;
    use mapek_actors::ports::{EscalationKind, EscalationSink, SourceError};
    use serde_json::json;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn escalation_alerts_carry_labels_annotations_and_ends() {
        let s =
            sink("http://am:9093/", Duration::from_secs(1)).with_generator_url("http://mapek/x");
        let mut a = escalation(
            "inc-1",
            EscalationKind::BreakerOpen,
            &["charter", "gateway"],
        );
        a.severity = Some(Severity::Critical);
        let b = escalation("inc-2", EscalationKind::NoConfidentCause, &[]);
        let now = at("2026-01-01T00:10:00Z");
        let body = s.alerts(&[a], &[b], now);
        let alerts = body.as_array().unwrap();
        assert_eq!(alerts.len(), 2);
        assert_eq!(
            alerts[0]["labels"],
            json!({
                "alertname": "MapekEscalation",
                "mapek_escalation": "true",
                "incident": "inc-1",
                "reason": "breaker_open",
                "component": "charter,gateway",
                "severity": "critical",
            })
        );
        assert_eq!(
            alerts[0]["annotations"]["summary"],
            json!("breaker_open for inc-1")
        );
        let d = alerts[0]["annotations"]["description"].as_str().unwrap();
        assert!(
            d.contains("inc-1")
                && d.contains("charter, gateway")
                && d.contains("2026-01-01T00:00:00.000Z"),
            "{d}"
        );
        assert_eq!(alerts[0]["startsAt"], json!("2026-01-01T00:00:00.000Z"));
        assert_eq!(
            alerts[0]["endsAt"],
            json!("2026-01-01T00:14:00.000Z"),
            "now + 4 × {ESCALATION_RESEND_SECONDS} s"
        );
        assert_eq!(alerts[0]["generatorURL"], json!("http://mapek/x"));
        // Resolved: ends now; no component, default severity.
        assert_eq!(alerts[1]["endsAt"], json!("2026-01-01T00:10:00.000Z"));
        assert_eq!(alerts[1]["labels"]["severity"], json!("warning"));
        assert_eq!(alerts[1]["labels"]["reason"], json!("no_confident_cause"));
        assert!(alerts[1]["labels"].get("component").is_none());
        // An escalation dated after `now` (clock skew) never ends before it
        // starts.
        let mut late = escalation("inc-3", EscalationKind::Rejected, &["c"]);
        late.since = at("2026-01-01T01:00:00Z");
        let body = s.alerts(&[], &[late], now);
        assert_eq!(body[0]["endsAt"], body[0]["startsAt"]);
        // Without a generator URL, none is sent.
        let body = sink("http://am", Duration::from_secs(1)).alerts(
            &[escalation("i", EscalationKind::Flapping, &["c"])],
            &[],
            now,
        );
        assert!(body[0].get("generatorURL").is_none());
    }

    #[tokio::test]
    async fn escalation_post_errors_map_to_source_errors() {
        let e = [escalation("inc-1", EscalationKind::NoRoute, &["charter"])];
        // Nothing to post: no request at all (the URL is never reached).
        let nowhere = sink("http://127.0.0.1:1", Duration::from_secs(1));
        assert_eq!(nowhere.post(&[], &[]).await, Ok(()));
        assert!(matches!(
            nowhere.post(&e, &[]).await,
            Err(SourceError::Unreachable(_))
        ));
        // An HTTP error status, with the start of the body.
        let app = axum::Router::new().route(
            "/api/v2/alerts",
            axum::routing::post(|| async { (axum::http::StatusCode::BAD_REQUEST, "bad alert") }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let s = sink(&format!("http://{addr}"), Duration::from_secs(5));
        assert_eq!(
            s.post(&e, &[]).await,
            Err(SourceError::Status {
                status: 400,
                body: "bad alert".into()
            })
        );
        // A server that accepts and never answers: a timeout.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                conns.push(c);
            }
        });
        let s = sink(&format!("http://{addr}"), Duration::from_millis(300));
        assert_eq!(s.post(&e, &[]).await, Err(SourceError::Timeout(1)));
        held.abort();
    }

    #[test]
    fn bad_payloads_are_refused_with_a_reason() {
        assert!(matches!(
            parse(b"{not json"),
            Err(PayloadError::Malformed(_))
        ));
        let v3 = BODY.replace(r#""version":"4""#, r#""version":"3""#);
        assert!(matches!(parse(v3.as_bytes()), Err(PayloadError::Version(v)) if v == "3"));
        let st = BODY.replacen(
            r#""status":"firing","labels""#,
            r#""status":"burning","labels""#,
            1,
        );
        assert!(matches!(
            parse(st.as_bytes()),
            Err(PayloadError::Status { index: 0, .. })
        ));
        assert!(
            matches!(parse(br#"{"version":"4"}"#), Err(PayloadError::Malformed(m)) if m.contains("alerts"))
        );
    }
}
