//! The incident-centric loop under a paused clock: many independent
//! incidents remedied concurrently (never two remedies at once on one
//! component), a cascade over linked components remedied once upstream,
//! and duplicates that cost nothing.

mod common;

use common::{paused_system, v};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures::future::BoxFuture;
use mapek_actors::clock::SystemClock;
use mapek_actors::events::LoopEvent;
use mapek_actors::execute::EffectorRouter;
use mapek_actors::messages::{DecidePolicy, GetIncidents, Observe, Shutdown};
use mapek_actors::metrics::Metrics;
use mapek_actors::model::{
    ActionType, ApprovalStatus, IncidentState, RemediationAction, RollbackStep, Signal, Violation,
};
use mapek_actors::ports::{Effector, EffectorError, EvidenceProbe, SourceError};
use mapek_actors::store::KnowledgeStore;
use mapek_actors::supervisor::{start_loop, LoopHandle, LoopParts, LoopSettings};
use mapek_actors::testing::ScriptedSource;
use serde_json::Value;
use tokio::sync::broadcast::Receiver;

/// Counts, per component, the actions running at once (each takes 100 ms
/// of virtual time), and the overall peak of concurrent actions.
#[derive(Clone, Default)]
struct ConcurrencyProbe {
    inner: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    running: HashMap<String, usize>,
    peak_per_component: HashMap<String, usize>,
    total_running: usize,
    peak_total: usize,
    applied: Vec<(String, ActionType)>,
}

impl Effector for ConcurrencyProbe {
    fn name(&self) -> &str {
        "concurrency"
    }

    fn apply<'a>(
        &'a self,
        action: &'a RemediationAction,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(async move {
            {
                let mut c = self.inner.lock().expect("lock");
                let n = c.running.entry(action.target.clone()).or_default();
                *n += 1;
                let now = *n;
                let peak = c
                    .peak_per_component
                    .entry(action.target.clone())
                    .or_default();
                *peak = (*peak).max(now);
                c.total_running += 1;
                c.peak_total = c.peak_total.max(c.total_running);
                c.applied.push((action.target.clone(), action.action_type));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut c = self.inner.lock().expect("lock");
            if let Some(n) = c.running.get_mut(&action.target) {
                *n -= 1;
            }
            c.total_running -= 1;
            Ok(Value::Null)
        })
    }

    fn rollback<'a>(
        &'a self,
        _action: &'a RemediationAction,
        _step: &'a RollbackStep,
        _applied: &'a Value,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(async { Ok(Value::Null) })
    }
}

/// Before acting: 3 violations in scope; after: none.
#[derive(Clone, Default)]
struct HealingProbe {
    calls: Arc<Mutex<HashMap<Vec<String>, usize>>>,
}

impl EvidenceProbe for HealingProbe {
    fn count_violations<'a>(
        &'a self,
        scope: &'a [String],
    ) -> BoxFuture<'a, Result<usize, SourceError>> {
        Box::pin(async move {
            let mut c = self.calls.lock().expect("lock");
            let n = c.entry(scope.to_vec()).or_default();
            *n += 1;
            Ok(if *n == 1 { 3 } else { 0 })
        })
    }
}

fn settings() -> LoopSettings {
    let mut s = LoopSettings::default();
    s.monitor.interval_seconds = 1;
    s.execute.verification_window_seconds = 30;
    s.execute.preflight_validate = false;
    s.plan.cooldown_seconds = 60;
    s.orchestrator.max_cycle_time_seconds = 300;
    s
}

fn start(
    source: &ScriptedSource,
    effector: &ConcurrencyProbe,
    store: &KnowledgeStore,
    settings: LoopSettings,
) -> LoopHandle {
    start_led(source, effector, store, settings, None)
}

/// [`start`], as a replica of a cluster (`leadership`).
fn start_led(
    source: &ScriptedSource,
    effector: &ConcurrencyProbe,
    store: &KnowledgeStore,
    settings: LoopSettings,
    leadership: Option<Arc<dyn mapek_actors::leadership::Leadership>>,
) -> LoopHandle {
    start_loop(LoopParts {
        settings,
        sources: vec![Arc::new(source.clone())],
        effectors: EffectorRouter::all_to(Arc::new(effector.clone())),
        probe: Some(Arc::new(HealingProbe::default())),
        store: store.clone(),
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        chaos: None,
        events: None,
        alert_state: None,
        escalations: None,
        leadership,
    })
}

async fn verified_n(rx: &mut Receiver<LoopEvent>, n: usize) -> Vec<String> {
    let wait = async {
        let mut seen = Vec::new();
        while seen.len() < n {
            match rx.recv().await {
                Ok(LoopEvent::Verified { policy_id, .. }) => seen.push(policy_id),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event bus closed: {e}"),
            }
        }
        seen
    };
    tokio::time::timeout(Duration::from_secs(3600), wait)
        .await
        .expect("verifications within an hour of virtual time")
}

#[test]
fn a_burst_of_twenty_incidents_gives_twenty_concurrent_remedies_one_per_component() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    let mut batch = Vec::new();
    for c in 0..20 {
        let comp = format!("svc-{c:02}");
        for (i, s) in [Signal::Failure, Signal::Failure, Signal::Failure]
            .iter()
            .enumerate()
        {
            batch.push(v(&format!("{comp}-{i}"), &comp, *s, i as i64));
        }
    }
    source.set(Ok(batch));
    let effector = ConcurrencyProbe::default();
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &effector, &store, settings());
        let mut rx = h.events.subscribe();
        let verified = verified_n(&mut rx, 20).await;
        assert_eq!(verified.len(), 20);
        {
            let c = effector.inner.lock().expect("lock");
            let components: std::collections::BTreeSet<&String> =
                c.applied.iter().map(|(t, _)| t).collect();
            assert_eq!(
                components.len(),
                20,
                "one remedy per component: {:?}",
                c.applied
            );
            let per_component: BTreeMap<&String, usize> =
                c.applied.iter().fold(BTreeMap::new(), |mut m, (t, _)| {
                    *m.entry(t).or_default() += 1;
                    m
                });
            assert!(per_component.values().all(|n| *n == c.applied.len() / 20));
            assert!(
                c.peak_per_component.values().all(|p| *p == 1),
                "never two actions at once on one component: {:?}",
                c.peak_per_component
            );
            assert!(
                c.peak_total >= 16,
                "remedies ran concurrently (default max_concurrent 16), peak {}",
                c.peak_total
            );
            assert!(
                c.peak_total <= 16,
                "bounded by max_concurrent, peak {}",
                c.peak_total
            );
        }
        let page = h
            .planner
            .send(GetIncidents {
                state: None,
                limit: 100,
                after: None,
            })
            .await
            .expect("planner");
        assert_eq!(page.incidents.len(), 20);
        assert!(page
            .incidents
            .iter()
            .all(|i| i.executions.len() == 1 && i.components.len() == 1));
        // Every action's intent was journaled under its deterministic key.
        for i in &page.incidents {
            let intents = store.intents_for(&format!("{}/", i.id)).expect("intents");
            assert!(!intents.is_empty(), "no intent for {}", i.id);
            assert!(intents
                .iter()
                .all(|r| r.key.starts_with(&format!("{}/1/", i.id))));
        }
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

#[test]
fn a_cascade_over_three_linked_components_is_one_incident_remedied_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(vec![
        v("db-lat-1", "db", Signal::Latency, 0),
        v("db-lat-2", "db", Signal::Latency, 1),
        v("api-fail-1", "api", Signal::Failure, 10),
        v("api-fail-2", "api", Signal::Failure, 11),
        v("api-fail-3", "api", Signal::Failure, 12),
        v("web-fail-1", "web", Signal::Failure, 20),
        v("web-tput-1", "web", Signal::Throughput, 21),
    ]));
    let effector = ConcurrencyProbe::default();
    let mut s = settings();
    s.analyze.topology = BTreeMap::from([
        ("web".to_string(), vec!["api".to_string()]),
        ("api".to_string(), vec!["db".to_string()]),
    ]);
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &effector, &store, s);
        let mut rx = h.events.subscribe();
        // The cascade remedy (emergency override) is high-risk: it waits
        // for a person.
        let planned = tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                if let Ok(LoopEvent::Planned { policy_id, .. }) = rx.recv().await {
                    return policy_id;
                }
            }
        })
        .await
        .expect("planned");
        let decided = h
            .planner
            .send(DecidePolicy {
                id: planned,
                decision: ApprovalStatus::Approved,
                by: "alice".into(),
                reason: None,
            })
            .await
            .expect("planner");
        assert!(decided.is_ok(), "{decided:?}");
        verified_n(&mut rx, 1).await;
        let page = h
            .planner
            .send(GetIncidents {
                state: None,
                limit: 100,
                after: None,
            })
            .await
            .expect("planner");
        assert_eq!(page.incidents.len(), 1, "{:#?}", page.incidents);
        let inc = &page.incidents[0];
        assert_eq!(inc.root_component.as_deref(), Some("db"));
        let d = inc.diagnosis.as_ref().expect("diagnosed");
        assert_eq!(d.cause, mapek_actors::model::RootCause::CascadeFailure);
        {
            let c = effector.inner.lock().expect("lock");
            assert!(!c.applied.is_empty());
            assert!(
                c.applied.iter().all(|(t, _)| t == "db"),
                "the remedy acts upstream only: {:?}",
                c.applied
            );
            let types: Vec<ActionType> = c.applied.iter().map(|(_, a)| *a).collect();
            assert!(
                types.contains(&ActionType::ActivateEmergencyOverride),
                "{types:?}"
            );
        }
        assert_eq!(inc.executions.len(), 1, "one remedy");
        assert!(matches!(
            inc.state,
            IncidentState::CoolingDown | IncidentState::Verifying | IncidentState::Open
        ));
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

async fn incidents(h: &LoopHandle) -> Vec<mapek_actors::model::Incident> {
    h.planner
        .send(GetIncidents {
            state: None,
            limit: 100,
            after: None,
        })
        .await
        .expect("planner")
        .incidents
}

/// Polls the Planner (virtual time) until `f` holds for its incidents.
async fn until_incidents(
    h: &LoopHandle,
    what: &str,
    f: impl Fn(&[mapek_actors::model::Incident]) -> bool,
) -> Vec<mapek_actors::model::Incident> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let list = incidents(h).await;
        if f(&list) {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never happened; incidents: {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn three_on(component: &str, onset_offset: i64) -> Vec<Violation> {
    (0..3)
        .map(|i| {
            v(
                &format!("{component}-{i}"),
                component,
                Signal::Failure,
                onset_offset + i,
            )
        })
        .collect()
}

#[test]
fn incident_ids_and_holds_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings();
    s.plan.cooldown_seconds = 3600;
    let first_id = {
        let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
        let source = ScriptedSource::new("scripted");
        source.set(Ok(three_on("svc", 0)));
        let effector = ConcurrencyProbe::default();
        let sys = paused_system();
        let id = sys.block_on(async {
            let h = start(&source, &effector, &store, s.clone());
            let mut rx = h.events.subscribe();
            verified_n(&mut rx, 1).await;
            let list = until_incidents(&h, "cooling down", |l| {
                l.len() == 1 && l[0].state == IncidentState::CoolingDown
            })
            .await;
            assert!(list[0].hold_until.is_some());
            h.supervisor.send(Shutdown).await.expect("shutdown");
            list[0].id.clone()
        });
        assert_eq!(sys.run_with_code().expect("run"), 0);
        id
    };
    // Same fingerprints, but a polled source gives them new onsets after a
    // restart: the incident keeps its id and its hold.
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("reopen");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(three_on("svc", 500)));
    let effector = ConcurrencyProbe::default();
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &effector, &store, s);
        let list = until_incidents(&h, "restored incident diagnosed", |l| {
            l.iter().any(|i| i.id == first_id && i.violation_count == 3)
        })
        .await;
        assert_eq!(list.len(), 1, "no second incident: {list:#?}");
        assert_eq!(list[0].state, IncidentState::CoolingDown);
        // The hold is honoured: ten minutes pass without a remedy.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(
            effector.inner.lock().expect("lock").applied.is_empty(),
            "no remedy while the restored hold lasts"
        );
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

#[test]
fn a_source_outage_moves_incidents_to_no_evidence_and_back_without_closing_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(three_on("svc", 0)));
    let effector = ConcurrencyProbe::default();
    let mut s = settings();
    s.plan.auto_approve = false;
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &effector, &store, s);
        let before = until_incidents(&h, "pending", |l| {
            l.len() == 1 && l[0].state == IncidentState::Pending
        })
        .await;
        source.set(Err(SourceError::Unreachable("connection refused".into())));
        let blind = until_incidents(&h, "no evidence", |l| {
            l.len() == 1 && l[0].state == IncidentState::NoEvidence
        })
        .await;
        assert_eq!(blind[0].id, before[0].id);
        assert_eq!(blind[0].violation_count, 3, "members kept while blind");
        source.set(Ok(three_on("svc", 0)));
        let back = until_incidents(&h, "evidence again", |l| {
            l.len() == 1 && l[0].state == IncidentState::Pending
        })
        .await;
        assert_eq!(back[0].id, before[0].id, "the same incident, never closed");
        assert!(back[0].close_reason.is_none());
        assert!(effector.inner.lock().expect("lock").applied.is_empty());
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

#[test]
fn a_duplicate_resend_stores_nothing_and_a_change_diagnoses_only_its_incident() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(Vec::new()));
    let effector = ConcurrencyProbe::default();
    let mut s = settings();
    s.plan.auto_approve = false;
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &effector, &store, s);
        let mut rx = h.events.subscribe();
        let observe = |vs: Vec<Violation>| Observe {
            source: "alertmanager".into(),
            violations: vs,
            resolved: Vec::new(),
            complete: false,
        };
        let first = three_on("a", 0);
        let ack = h
            .monitor
            .send(observe(first.clone()))
            .await
            .expect("monitor");
        assert_eq!(ack.expect("ack").new, 3);
        analysed(&mut rx).await;
        let handled = |h: &LoopHandle| {
            h.metrics
                .messages_handled
                .get_or_create(&mapek_actors::metrics::ActorMessageLabels {
                    actor: "analyzer",
                    message: "ViolationsDetected",
                })
                .get()
        };
        let analyses_before = h.metrics.analyses.get();
        let deliveries_before = handled(&h);
        // The same alerts again (Alertmanager re-sends every group interval).
        let ack = h.monitor.send(observe(first)).await.expect("monitor");
        let ack = ack.expect("ack");
        assert_eq!((ack.new, ack.duplicates), (0, 3));
        // A change elsewhere: only its own incident is diagnosed.
        let ack = h
            .monitor
            .send(observe(three_on("b", 0)))
            .await
            .expect("monitor");
        assert_eq!(ack.expect("ack").new, 3);
        analysed(&mut rx).await;
        assert_eq!(
            h.metrics.analyses.get(),
            analyses_before + 1,
            "one new analysis, for incident b only"
        );
        assert_eq!(
            handled(&h),
            deliveries_before + 1,
            "the duplicate reached the analyzer not at all"
        );
        let list = incidents(&h).await;
        assert_eq!(list.len(), 2);
        let a = list.iter().find(|i| i.components == vec!["a"]).expect("a");
        assert_eq!(a.diagnoses.len(), 0, "a was not diagnosed again");
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

async fn analysed(rx: &mut Receiver<LoopEvent>) {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(LoopEvent::Analysed { .. }) = rx.recv().await {
                return;
            }
        }
    })
    .await
    .expect("analysed")
}

#[test]
fn a_policy_queued_behind_another_incidents_cooldown_runs_when_the_cooldown_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    let three = |prefix: &str| {
        (0..3)
            .map(|i| v(&format!("{prefix}-{i}"), "svc", Signal::Failure, i))
            .collect::<Vec<_>>()
    };
    source.set(Ok(three("first")));
    let effector = ConcurrencyProbe::default();
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &effector, &store, settings());
        let mut rx = h.events.subscribe();
        let first = tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                if let Ok(LoopEvent::Executed { policy_id, .. }) = rx.recv().await {
                    return policy_id;
                }
            }
        })
        .await
        .expect("the first incident's remedy acted");
        // Its violations end while its remedy is verifying: the incident
        // closes, and `svc` stays held, then cools down (60 s).
        source.set(Ok(Vec::new()));
        let all_closed = async {
            loop {
                let page = h
                    .planner
                    .send(GetIncidents {
                        state: None,
                        limit: 10,
                        after: None,
                    })
                    .await
                    .expect("planner");
                if page
                    .incidents
                    .iter()
                    .all(|i| i.state == IncidentState::Closed)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(600), all_closed)
            .await
            .expect("the first incident closed");
        // A second incident on the same component: its policy waits in the
        // admission queue behind the first remedy, then its cooldown; no
        // event of its own wakes it when the cooldown ends.
        source.set(Ok(three("second")));
        let verified = tokio::time::timeout(Duration::from_secs(3600), async {
            let mut second = None;
            loop {
                match rx.recv().await {
                    Ok(LoopEvent::Planned { policy_id, .. }) if policy_id != first => {
                        second = Some(policy_id)
                    }
                    Ok(LoopEvent::Verified { policy_id, .. })
                        if second.as_deref() == Some(policy_id.as_str()) =>
                    {
                        return policy_id
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => panic!("event bus closed: {e}"),
                }
            }
        })
        .await
        .expect("the queued remedy ran once the cooldown was over");
        assert_ne!(verified, first);
        {
            let c = effector.inner.lock().expect("lock");
            // Two remedies (one per incident), each the same strategy.
            let first_type = c.applied.first().map(|(_, a)| *a).expect("applied");
            let remedies = c.applied.iter().filter(|(_, a)| *a == first_type).count();
            assert_eq!(remedies, 2, "{:?}", c.applied);
            assert!(c.peak_per_component.values().all(|p| *p == 1));
        }
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

#[test]
fn active_webhook_violations_survive_a_restart_in_their_incident() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings();
    s.plan.auto_approve = false;
    let pushed = |vs: Vec<Violation>| Observe {
        source: "alertmanager".into(),
        violations: vs
            .into_iter()
            .map(|mut v| {
                v.source = "alertmanager".into();
                v
            })
            .collect(),
        resolved: Vec::new(),
        complete: false,
    };
    let first_id = {
        let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
        let source = ScriptedSource::new("scripted");
        source.set(Ok(Vec::new()));
        let sys = paused_system();
        let id = sys.block_on(async {
            let h = start(&source, &ConcurrencyProbe::default(), &store, s.clone());
            let mut batch = three_on("hook", 0);
            batch.push(v("gone", "hook", Signal::Failure, 3));
            h.monitor
                .send(pushed(batch))
                .await
                .expect("monitor")
                .expect("ack");
            // One ends before the restart: it must not come back.
            h.monitor
                .send(Observe {
                    source: "alertmanager".into(),
                    violations: Vec::new(),
                    resolved: vec!["gone".into()],
                    complete: false,
                })
                .await
                .expect("monitor")
                .expect("ack");
            let list = until_incidents(&h, "pending", |l| {
                l.len() == 1 && l[0].state == IncidentState::Pending && l[0].violation_count == 3
            })
            .await;
            h.supervisor.send(Shutdown).await.expect("shutdown");
            list[0].id.clone()
        });
        assert_eq!(sys.run_with_code().expect("run"), 0);
        id
    };
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("reopen");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(Vec::new()));
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &ConcurrencyProbe::default(), &store, s);
        let active = h
            .monitor
            .send(mapek_actors::messages::GetActiveViolations)
            .await
            .expect("monitor");
        let mut fps: Vec<String> = active.iter().map(|v| v.fingerprint.clone()).collect();
        fps.sort();
        assert_eq!(fps, vec!["hook-0", "hook-1", "hook-2"]);
        let list = until_incidents(&h, "restored incident with its members", |l| {
            l.iter().any(|i| {
                i.id == first_id && i.violation_count == 3 && i.state == IncidentState::Pending
            })
        })
        .await;
        assert_eq!(list.len(), 1, "{list:#?}");
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

/// Evidence never improves: 3 violations before and after every remedy.
#[derive(Clone, Default)]
struct StuckProbe;

impl EvidenceProbe for StuckProbe {
    fn count_violations<'a>(
        &'a self,
        _scope: &'a [String],
    ) -> BoxFuture<'a, Result<usize, SourceError>> {
        Box::pin(async { Ok(3) })
    }
}

fn start_with(
    source: &ScriptedSource,
    effector: Arc<dyn Effector>,
    probe: Arc<dyn EvidenceProbe>,
    store: &KnowledgeStore,
    settings: LoopSettings,
) -> LoopHandle {
    start_loop(LoopParts {
        settings,
        sources: vec![Arc::new(source.clone())],
        effectors: EffectorRouter::all_to(effector),
        probe: Some(probe),
        store: store.clone(),
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        chaos: None,
        events: None,
        alert_state: None,
        escalations: None,
        leadership: None,
    })
}

/// REVIEW 1: an incident whose diagnosis does not change is re-planned with
/// the chain of its first diagnosis; once max_cycle_time has passed since
/// then, every later attempt is cut off before it acts.
#[test]
fn a_replan_long_after_the_first_diagnosis_still_acts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(three_on("svc", 0)));
    let effector = ConcurrencyProbe::default();
    let sys = paused_system();
    sys.block_on(async {
        let h = start_with(
            &source,
            Arc::new(effector.clone()),
            Arc::new(StuckProbe),
            &store,
            {
                // Every remedy is INEFFECTIVE here: the breakers, which
                // would stop them, are not what this test is about.
                let mut s = settings();
                s.safety.breaker.failures = 1000;
                s
            },
        );
        // max_cycle_time 300 s, verification 30 s, cooldown 60 s.
        tokio::time::sleep(Duration::from_secs(290)).await;
        let early = effector.inner.lock().expect("lock").applied.len();
        tokio::time::sleep(Duration::from_secs(1500)).await;
        let late = effector.inner.lock().expect("lock").applied.len();
        let page = h
            .planner
            .send(GetIncidents {
                state: None,
                limit: 10,
                after: None,
            })
            .await
            .expect("planner");
        // No execution was cut off for a stale chain deadline.
        for e in &page.incidents[0].executions {
            let x = store.get_execution(e).expect("store").expect("execution");
            assert!(!x.timings.cut_off, "{:?}", x.error);
        }
        assert!(
            late > early,
            "no action applied after max_cycle_time ({early} then {late})"
        );
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

/// REVIEW 2: a cooldown restored at start (from a closed, remedied
/// incident) blocks a new incident's policy in the admission queue, and
/// nothing wakes the queue when that cooldown ends.
#[test]
fn a_policy_queued_behind_a_restored_cooldown_is_admitted_when_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings();
    s.plan.cooldown_seconds = 600;
    {
        let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
        let source = ScriptedSource::new("scripted");
        source.set(Ok(three_on("svc", 0)));
        let effector = ConcurrencyProbe::default();
        let sys = paused_system();
        sys.block_on(async {
            let h = start(&source, &effector, &store, s.clone());
            let mut rx = h.events.subscribe();
            verified_n(&mut rx, 1).await;
            source.set(Ok(Vec::new()));
            until_incidents(&h, "closed", |l| {
                l.len() == 1 && l[0].state == IncidentState::Closed
            })
            .await;
            h.supervisor.send(Shutdown).await.expect("shutdown");
        });
        assert_eq!(sys.run_with_code().expect("run"), 0);
    }
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("reopen");
    let source = ScriptedSource::new("scripted");
    let fresh: Vec<Violation> = (0..3)
        .map(|i| v(&format!("new-{i}"), "svc", Signal::Failure, 900 + i))
        .collect();
    source.set(Ok(fresh));
    let effector = ConcurrencyProbe::default();
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &effector, &store, s);
        until_incidents(&h, "queued", |l| {
            l.iter().any(|i| i.state == IncidentState::Queued)
        })
        .await;
        // The restored cooldown lasts at most 600 s; wait an hour.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let page = h
            .planner
            .send(GetIncidents {
                state: None,
                limit: 10,
                after: None,
            })
            .await
            .expect("planner");
        let states: Vec<_> = page
            .incidents
            .iter()
            .map(|i| (i.id.clone(), i.state))
            .collect();
        assert!(
            !effector.inner.lock().expect("lock").applied.is_empty(),
            "the new incident's policy was never admitted: {states:?}"
        );
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

#[test]
fn a_restored_incident_whose_violations_ended_meanwhile_closes_and_its_policy_is_superseded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings();
    s.plan.auto_approve = false;
    {
        let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
        let source = ScriptedSource::new("scripted");
        source.set(Ok(three_on("svc", 0)));
        let effector = ConcurrencyProbe::default();
        let sys = paused_system();
        sys.block_on(async {
            let h = start(&source, &effector, &store, s.clone());
            until_incidents(&h, "pending", |l| {
                l.len() == 1 && l[0].state == IncidentState::Pending
            })
            .await;
            h.supervisor.send(Shutdown).await.expect("shutdown");
        });
        assert_eq!(sys.run_with_code().expect("run"), 0);
    }
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("reopen");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(Vec::new())); // resolved while mapek was down
    let effector = ConcurrencyProbe::default();
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &effector, &store, s);
        let list = until_incidents(&h, "closed after the first full reconcile", |l| {
            l.len() == 1 && l[0].state == IncidentState::Closed
        })
        .await;
        assert_eq!(
            list[0].close_reason,
            Some(mapek_actors::model::CloseReason::ResolvedWithoutAction)
        );
        let pid = list[0].policies[0].clone();
        let res = h
            .planner
            .send(DecidePolicy {
                id: pid,
                decision: ApprovalStatus::Approved,
                by: "op".into(),
                reason: None,
            })
            .await
            .expect("planner");
        assert!(
            res.is_err(),
            "a superseded policy cannot be approved: {res:?}"
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(effector.inner.lock().expect("lock").applied.is_empty());
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

#[test]
fn a_remedy_interrupted_by_a_crash_is_not_repeated_at_once_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings();
    s.plan.cooldown_seconds = 300;
    {
        let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
        let source = ScriptedSource::new("scripted");
        source.set(Ok(three_on("svc", 0)));
        let effector = ConcurrencyProbe::default();
        let sys = paused_system();
        sys.block_on(async {
            let h = start(&source, &effector, &store, s.clone());
            // Acting, then verifying: the process dies (no drain, no
            // verification).
            until_incidents(&h, "verifying", |l| {
                l.len() == 1 && l[0].state == IncidentState::Verifying
            })
            .await;
            assert!(!effector.inner.lock().expect("lock").applied.is_empty());
            System::current().stop_with_code(137);
        });
        let _killed = sys.run_with_code();
        store.close().expect("close");
    }
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("reopen");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(three_on("svc", 0)));
    let effector = ConcurrencyProbe::default();
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&source, &effector, &store, s);
        let list = until_incidents(&h, "cooling down after the restart", |l| {
            l.len() == 1 && l[0].state == IncidentState::CoolingDown && l[0].violation_count == 3
        })
        .await;
        assert!(list[0].hold_until.is_some());
        // The execution that was verifying is on the incident's record,
        // its verification re-armed: COMPLETED, the outcome follows.
        assert_eq!(list[0].executions.len(), 1, "{:?}", list[0].executions);
        let id = list[0].executions[0].clone();
        let verifying = store.get_execution(&id).expect("store").expect("execution");
        assert_eq!(
            verifying.status,
            mapek_actors::model::ExecutionStatus::Completed
        );
        assert!(!verifying.interrupted);
        tokio::time::sleep(Duration::from_secs(200)).await;
        // Recorded through Knowledge and the journal's thread (real time):
        // awaited with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let verified = loop {
            let e = store.get_execution(&id).expect("store").expect("execution");
            let recorded = store.get_outcome(&id).expect("store").is_some();
            if (e.outcome.is_some() && recorded) || std::time::Instant::now() > deadline {
                break e;
            }
            // Real time for the writer thread, without moving the paused
            // clock (the cooldown is asserted below).
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(2));
        };
        assert!(
            verified.outcome.is_some() && verified.violations_after.is_some(),
            "the re-armed verification measured: {verified:?}"
        );
        assert!(store.get_outcome(&id).expect("store").is_some());
        assert!(
            effector.inner.lock().expect("lock").applied.is_empty(),
            "the interrupted remedy may have worked: not repeated during the cooldown"
        );
        // After the cooldown the incident, still active, is remedied again
        // under a new attempt.
        let mut rx = h.events.subscribe();
        verified_n(&mut rx, 1).await;
        let list = incidents(&h).await;
        assert_eq!(list[0].attempts, 2);
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

#[test]
fn an_interrupted_execution_is_re_measured_after_a_second_stop_and_kept_out_of_learning() {
    use mapek_actors::model::{
        ExecutionStatus, PolicyExecution, Priority, RemediationPolicy, RiskLevel, RootCause,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let policy = RemediationPolicy {
        id: "pol-interrupted".into(),
        chain_id: "chn-x".into(),
        analysis_id: "ana-x".into(),
        created_at: chrono::Utc::now(),
        root_cause: RootCause::InsufficientCapacity,
        root_cause_confidence: 0.8,
        actions: Vec::new(),
        expected_impact: "test".into(),
        risk_level: RiskLevel::Low,
        priority: Priority::High,
        cost_estimate: 0.1,
        benefit_estimate: 0.8,
        score: 0.7,
        approval_status: ApprovalStatus::Approved,
        decisions: Vec::new(),
        violations_at_planning: 3,
        scope: vec!["svc".into()],
        incident_id: None,
        attempt: 1,
        guards: Vec::new(),
        autonomy: None,
        candidates: Vec::new(),
        shard: None,
    };
    store.put_policy(&policy).expect("policy");
    // Closed as interrupted by a start that stopped again before its
    // re-measure: UNKNOWN, interrupted, no outcome yet.
    let exec: PolicyExecution = serde_json::from_value(serde_json::json!({
        "id": "exe-interrupted", "policy_id": "pol-interrupted", "chain_id": "chn-x",
        "root_cause": "insufficient_capacity", "status": "UNKNOWN", "interrupted": true,
        "actions": [{"action_id": "a1", "action_type": "SCALE_UP", "effector": "probe",
                     "status": "UNKNOWN", "attempts": 1, "started_at": "2026-01-01T00:00:00Z",
                     "finished_at": null, "result": null, "error": "interrupted", "rollback": null,
                     "request": {"parameters": {"idempotency_key": "exe-interrupted/a1"}}}],
        "started_at": "2026-01-01T00:00:00Z", "finished_at": null, "success_rate": 0.0,
        "error": "interrupted", "violations_before": 3, "violations_after": null, "outcome": null,
        "timings": {"detection_seconds": 0.0, "analysis_seconds": 0.0, "planning_seconds": 0.0,
                    "execution_seconds": 0.0, "total_seconds": 0.0, "cut_off": false}
    }))
    .expect("execution");
    store.put_execution(&exec).expect("put");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(Vec::new()));
    let effector = ConcurrencyProbe::default();
    let sys = paused_system();
    let s = settings();
    let window = Duration::from_secs(s.execute.verification_window_seconds);
    sys.block_on(async {
        let h = start(&source, &effector, &store, s);
        tokio::time::sleep(window).await;
        // The re-measure's record is written by the journal's thread (real
        // time): awaited with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let after = loop {
            let e = store
                .get_execution("exe-interrupted")
                .expect("store")
                .expect("execution");
            if e.outcome.is_some() || std::time::Instant::now() > deadline {
                break e;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(2));
        };
        assert!(after.interrupted);
        assert_eq!(after.status, ExecutionStatus::Unknown);
        assert!(
            after.outcome.is_some() && after.violations_after.is_some(),
            "re-measured: {after:?}"
        );
        assert!(
            store
                .get_outcome("exe-interrupted")
                .expect("store")
                .is_none(),
            "an interrupted execution teaches the learner nothing"
        );
        assert_eq!(store.stats().expect("stats").outcomes_recorded, 0);
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

/// Cluster mode: an incident belongs to the shard of its root component
/// when it is first planned, and stays there: when the incident grows
/// upstream (a new root in another shard), its next policy still belongs
/// to the first shard, and so does every fenced write of its actions.
#[test]
fn an_incident_stays_on_the_shard_it_was_first_planned_in() {
    use mapek_actors::leadership::shard_of;
    use mapek_actors::testing::FixedLeadership;
    let shards = 16;
    assert_ne!(
        shard_of("api", shards),
        shard_of("db", shards),
        "two shards"
    );
    let pinned = shard_of("api", shards);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    // First only api fails.
    source.set(Ok(vec![
        v("api-fail-1", "api", Signal::Failure, 10),
        v("api-fail-2", "api", Signal::Failure, 11),
        v("api-fail-3", "api", Signal::Failure, 12),
    ]));
    let effector = ConcurrencyProbe::default();
    let mut s = settings();
    s.execute.verification_window_seconds = 5;
    s.plan.cooldown_seconds = 1;
    s.analyze.topology = BTreeMap::from([("api".to_string(), vec!["db".to_string()])]);
    // This replica leads api's shard only (db's is another replica's).
    let leadership = FixedLeadership::new("a", shards, &[pinned]);
    let sys = paused_system();
    sys.block_on(async {
        let h = start_led(
            &source,
            &effector,
            &store,
            s,
            Some(Arc::new(leadership.clone())),
        );
        let mut rx = h.events.subscribe();
        let first = next_planned(&mut rx).await;
        let p1 = stored_policy(&store, &first).await;
        assert_eq!(p1.shard, Some(pinned), "{p1:?}");
        // Then db, upstream, fails too: the root moves to db (another
        // shard); the incident, and its next policy, stay on api's.
        source.set(Ok(vec![
            v("api-fail-1", "api", Signal::Failure, 10),
            v("api-fail-2", "api", Signal::Failure, 11),
            v("api-fail-3", "api", Signal::Failure, 12),
            // Seen now, begun before api's failures: the cause upstream.
            v("db-lat-1", "db", Signal::Latency, 0),
            v("db-lat-2", "db", Signal::Latency, 1),
        ]));
        let second = loop {
            let id = next_planned(&mut rx).await;
            let p = stored_policy(&store, &id).await;
            if p.scope.first().map(String::as_str) == Some("db") {
                break p;
            }
        };
        assert_eq!(second.incident_id, p1.incident_id, "one incident");
        assert_eq!(
            second.shard,
            Some(pinned),
            "stays on api's shard: {second:?}"
        );
        let page = h
            .planner
            .send(GetIncidents {
                state: None,
                limit: 10,
                after: None,
            })
            .await
            .expect("planner");
        let inc = page
            .incidents
            .iter()
            .find(|i| Some(&i.id) == p1.incident_id.as_ref())
            .expect("incident");
        assert_eq!(inc.root_component.as_deref(), Some("db"));
        assert_eq!(inc.shard, Some(pinned));
        // The leader of the incident's shard acts on db (in another
        // shard): approved, it runs here, fenced on the pinned shard.
        let decided = h
            .planner
            .send(DecidePolicy {
                id: second.id.clone(),
                decision: ApprovalStatus::Approved,
                by: "alice".into(),
                reason: None,
            })
            .await
            .expect("planner");
        assert!(decided.is_ok(), "{decided:?}");
        tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                if let Ok(LoopEvent::Verified { policy_id, .. }) = rx.recv().await {
                    if policy_id == second.id {
                        return;
                    }
                }
            }
        })
        .await
        .expect("the db policy verified");
        {
            let c = effector.inner.lock().expect("lock");
            assert!(c.applied.iter().any(|(t, _)| t == "db"), "{:?}", c.applied);
        }
        let intents: Vec<String> = leadership.keys("intents/");
        assert!(!intents.is_empty(), "fenced intents written");
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

async fn next_planned(rx: &mut Receiver<LoopEvent>) -> String {
    tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            if let Ok(LoopEvent::Planned { policy_id, .. }) = rx.recv().await {
                return policy_id;
            }
        }
    })
    .await
    .expect("planned")
}

/// The policy once Knowledge has stored it (written by the journal thread:
/// awaited in real time, the actors' clock being paused).
async fn stored_policy(store: &KnowledgeStore, id: &str) -> mapek_actors::model::RemediationPolicy {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(p) = store.get_policy(id).expect("store") {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "policy {id} never stored"
        );
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Cluster mode: another leader pinned the incident to its shard first
/// (it acted on it under another view of the incident): this leader sends
/// nothing, takes the pin, and from then on holds the incident's policies
/// for that shard's leader.
#[test]
fn an_incident_pinned_elsewhere_is_left_to_that_shards_leader() {
    use mapek_actors::leadership::shard_of;
    use mapek_actors::testing::FixedLeadership;
    let shards = 16;
    let mine = shard_of("api", shards);
    let theirs = (mine + 1) % shards;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(vec![
        v("api-fail-1", "api", Signal::Failure, 10),
        v("api-fail-2", "api", Signal::Failure, 11),
        v("api-fail-3", "api", Signal::Failure, 12),
    ]));
    let effector = ConcurrencyProbe::default();
    let mut s = settings();
    s.plan.cooldown_seconds = 1;
    let leadership = FixedLeadership::new("a", shards, &[mine]);
    leadership.pin(&["api-fail-2"], theirs);
    let sys = paused_system();
    sys.block_on(async {
        let h = start_led(
            &source,
            &effector,
            &store,
            s,
            Some(Arc::new(leadership.clone())),
        );
        // The incident takes the pin, and its next policy waits for the
        // other shard's leader.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let inc = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let page = h
                .planner
                .send(GetIncidents {
                    state: None,
                    limit: 10,
                    after: None,
                })
                .await
                .expect("planner");
            if let Some(i) = page.incidents.into_iter().find(|i| i.shard == Some(theirs)) {
                if i.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("leadership"))
                {
                    break i;
                }
            }
            assert!(std::time::Instant::now() < deadline, "never re-pinned");
        };
        assert!(
            inc.reason
                .as_deref()
                .unwrap_or_default()
                .contains(&format!("shard {theirs}")),
            "{inc:?}"
        );
        {
            let c = effector.inner.lock().expect("lock");
            assert!(c.applied.is_empty(), "nothing sent: {:?}", c.applied);
        }
        assert!(leadership.keys("intents/").is_empty(), "no intent written");
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}
