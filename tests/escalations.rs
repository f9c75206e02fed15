//! Escalations posted to a REAL Alertmanager (Debian's
//! `prometheus-alertmanager`, started here on a loopback port with a
//! temporary config): they show among its active alerts with their labels,
//! a resolved one leaves them, and mapek's own Alertmanager client does not
//! count them as symptoms. A missing binary fails the test.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mapek::alertmanager::{AlertmanagerApi, AlertmanagerEscalations, ESCALATION_TIMEOUT};
use mapek_actors::clock::SystemClock;
use mapek_actors::model::Severity;
use mapek_actors::ports::{AlertState, Escalation, EscalationKind, EscalationSink};
use serde_json::Value;
use support::free_addr;
use support::servers::alertmanager;

/// The labels of the escalation alerts active now, by incident.
async fn active_escalations(
    client: &reqwest::Client,
    base: &str,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let url = format!("{base}/api/v2/alerts?active=true");
    let alerts: Vec<Value> = client
        .get(&url)
        .send()
        .await
        .expect("GET /api/v2/alerts")
        .error_for_status()
        .expect("status")
        .json()
        .await
        .expect("JSON");
    alerts
        .into_iter()
        .filter_map(|a| {
            let labels: BTreeMap<String, String> =
                serde_json::from_value(a["labels"].clone()).ok()?;
            if labels.get("alertname").map(String::as_str) != Some("MapekEscalation") {
                return None;
            }
            Some((labels.get("incident")?.clone(), labels))
        })
        .collect()
}

/// Polls Alertmanager until the active escalations are those of `want`
/// (by incident), panicking after `limit` with what it saw last.
async fn await_escalations(
    client: &reqwest::Client,
    base: &str,
    want: &[&str],
    limit: Duration,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let end = Instant::now() + limit;
    loop {
        let seen = active_escalations(client, base).await;
        if seen.keys().map(String::as_str).eq(want.iter().copied()) {
            return seen;
        }
        assert!(
            Instant::now() < end,
            "active escalations never became {want:?} within {limit:?}; last seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn escalation(
    id: &str,
    kind: EscalationKind,
    components: &[&str],
    severity: Option<Severity>,
) -> Escalation {
    Escalation {
        incident_id: id.into(),
        kind,
        reason: format!("{id}: {}", kind.as_str()),
        components: components.iter().map(|c| c.to_string()).collect(),
        severity,
        since: chrono::Utc::now() - chrono::Duration::seconds(60),
    }
}

#[test]
fn escalations_fire_and_resolve_in_a_real_alertmanager() {
    // Nothing listens on the webhook: the notifications fail, the alerts
    // are still kept and served by the API.
    let am = alertmanager(&format!("http://{}/webhook", free_addr()));
    let base = am.url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let sink = AlertmanagerEscalations::new(&base, ESCALATION_TIMEOUT, Arc::new(SystemClock))
            .expect("sink")
            .with_generator_url("http://127.0.0.1:8081/api/v1/incidents");
        assert_eq!(sink.name(), "alertmanager");
        let client = reqwest::Client::new();
        let a = escalation(
            "inc-a",
            EscalationKind::BreakerOpen,
            &["charter", "gateway"],
            Some(Severity::Critical),
        );
        let b = escalation("inc-b", EscalationKind::Flapping, &["ledger"], None);

        sink.post(&[a.clone(), b.clone()], &[])
            .await
            .expect("post two firing escalations");
        let seen =
            await_escalations(&client, &base, &["inc-a", "inc-b"], Duration::from_secs(30)).await;
        let la = &seen["inc-a"];
        assert_eq!(la["mapek_escalation"], "true");
        assert_eq!(la["reason"], "breaker_open");
        assert_eq!(la["component"], "charter,gateway");
        assert_eq!(la["severity"], "critical");
        let lb = &seen["inc-b"];
        assert_eq!(lb["reason"], "flapping");
        assert_eq!(lb["component"], "ledger");
        assert_eq!(lb["severity"], "warning", "the default severity");

        // The annotations and times as Alertmanager keeps them.
        let all: Vec<Value> = client
            .get(format!("{base}/api/v2/alerts?active=true"))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON");
        let alert_a = all
            .iter()
            .find(|x| x["labels"]["incident"] == "inc-a")
            .expect("inc-a");
        assert_eq!(alert_a["annotations"]["summary"], "inc-a: breaker_open");
        let ends =
            chrono::DateTime::parse_from_rfc3339(alert_a["endsAt"].as_str().expect("endsAt"))
                .expect("endsAt is RFC 3339");
        let ahead = ends.with_timezone(&chrono::Utc) - chrono::Utc::now();
        assert!(
            ahead > chrono::Duration::seconds(180) && ahead <= chrono::Duration::seconds(240),
            "firing ends about 4 minutes ahead: {ahead}"
        );
        assert_eq!(
            alert_a["generatorURL"],
            "http://127.0.0.1:8081/api/v1/incidents"
        );

        // mapek's own verification client does not take them for symptoms.
        let api = AlertmanagerApi::new(&base, Duration::from_secs(5)).expect("api");
        assert_eq!(api.count_firing(&[]).await, Ok(0));
        assert_eq!(api.count_firing(&["ledger".to_string()]).await, Ok(0));

        // One post: b still firing (re-posted), a resolved.
        sink.post(std::slice::from_ref(&b), std::slice::from_ref(&a))
            .await
            .expect("post resolve");
        let seen = await_escalations(&client, &base, &["inc-b"], Duration::from_secs(30)).await;
        assert_eq!(seen["inc-b"]["reason"], "flapping");

        // An error status is an error, not a silent drop.
        let refused = AlertmanagerEscalations::new(
            &format!("{base}/nowhere"),
            ESCALATION_TIMEOUT,
            Arc::new(SystemClock),
        )
        .expect("sink")
        .post(std::slice::from_ref(&b), &[])
        .await;
        assert!(
            matches!(
                refused,
                Err(mapek_actors::ports::SourceError::Status { status: 404, .. })
            ),
            "{refused:?}"
        );
    });
    drop(am);
}
