//! The Alertmanager webhook payload (version 4) and its translation into
//! violations: firing alerts become violations, resolved alerts end them,
//! both keyed by the alert's fingerprint so a re-sent payload counts once.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mapek_actors::model::{new_id, Severity, Signal, Timestamp, Violation};
use serde::Deserialize;

/// Source name of violations that came through the webhook.
pub const SOURCE: &str = "alertmanager";

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
/// `instance` label, else `unknown`.
pub fn component_of(labels: &BTreeMap<String, String>) -> String {
    ["component", "service", "job", "instance"]
        .iter()
        .find_map(|k| labels.get(*k).cloned())
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
                .filter(|a| scope.is_empty() || scope.contains(&component_of(&a.labels)))
                .count())
        })
    }
}

/// Splits a payload into firing violations and resolved fingerprints.
pub fn to_violations(p: &WebhookPayload, now: Timestamp) -> (Vec<Violation>, Vec<String>) {
    let mut firing = Vec::new();
    let mut resolved = Vec::new();
    for a in &p.alerts {
        let fp = fingerprint(a);
        if a.status == "resolved" {
            resolved.push(fp);
            continue;
        }
        let name = a
            .labels
            .get("alertname")
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
        let first_seen = a.starts_at.filter(|t| t.timestamp() > 0).unwrap_or(now);
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
