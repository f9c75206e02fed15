//! The safety guards through the whole loop under a paused clock: dry run,
//! the kill switch (and its survival across a restart), the disruption
//! budget with escalations posted to a sink, flapping, and recurrence
//! re-classifying an outcome in Knowledge.

mod common;

use common::{paused_system, v};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mapek_actors::clock::SystemClock;
use mapek_actors::events::LoopEvent;
use mapek_actors::execute::EffectorRouter;
use mapek_actors::messages::{GetIncidents, Pause, Resume, Shutdown};
use mapek_actors::metrics::Metrics;
use mapek_actors::model::{
    ActionType, ExecutionStatus, IncidentState, OutcomeType, Signal, Violation,
};
use mapek_actors::ports::{Escalation, EscalationKind, EscalationSink, EvidenceProbe, SourceError};
use mapek_actors::settings::Mode;
use mapek_actors::store::KnowledgeStore;
use mapek_actors::supervisor::{start_loop, LoopHandle, LoopParts, LoopSettings};
use mapek_actors::testing::{RecordingEffector, ScriptedSource};
use tokio::sync::broadcast::Receiver;

/// Three failure violations on each of `n` components: one incident each,
/// diagnosed as a node crash (remedy: RESTART_SERVICE).
fn burst(n: usize, prefix: &str) -> Vec<Violation> {
    let mut out = Vec::new();
    for c in 0..n {
        let comp = format!("{prefix}-{c:02}");
        for i in 0..3 {
            out.push(v(&format!("{comp}-{i}"), &comp, Signal::Failure, 0));
        }
    }
    out
}

/// Before acting: 3 violations in scope; after: none (every remedy heals).
#[derive(Clone, Default)]
struct HealingProbe {
    calls: Arc<Mutex<std::collections::HashMap<Vec<String>, usize>>>,
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
            Ok(if *n % 2 == 1 { 3 } else { 0 })
        })
    }
}

/// Records every escalation posted, firing and resolved.
#[derive(Clone, Default)]
struct RecordingSink {
    firing: Arc<Mutex<Vec<Escalation>>>,
    resolved: Arc<Mutex<Vec<Escalation>>>,
}

impl EscalationSink for RecordingSink {
    fn name(&self) -> &str {
        "recording"
    }

    fn post<'a>(
        &'a self,
        firing: &'a [Escalation],
        resolved: &'a [Escalation],
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        self.firing
            .lock()
            .expect("lock")
            .extend(firing.iter().cloned());
        self.resolved
            .lock()
            .expect("lock")
            .extend(resolved.iter().cloned());
        Box::pin(async { Ok(()) })
    }
}

fn settings() -> LoopSettings {
    let mut s = LoopSettings::default();
    s.monitor.interval_seconds = 1;
    s.execute.verification_window_seconds = 30;
    s.execute.preflight_validate = false;
    s.plan.cooldown_seconds = 60;
    s.orchestrator.max_cycle_time_seconds = 300;
    s.plan.learning.seed = Some(7);
    s
}

fn start(
    source: &ScriptedSource,
    effector: &RecordingEffector,
    store: &KnowledgeStore,
    settings: LoopSettings,
    sink: Option<RecordingSink>,
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
        escalations: sink.map(|s| Arc::new(s) as Arc<dyn EscalationSink>),
        leadership: None,
    })
}

/// A restart of a component clears its violations at the source.
fn heal_on_restart(e: &RecordingEffector, source: &ScriptedSource, initial: Vec<Violation>) {
    let active = Arc::new(Mutex::new(initial));
    let source = source.clone();
    e.on_apply(move |a| {
        if a.action_type == ActionType::RestartService {
            let mut v = active.lock().expect("lock");
            v.retain(|x| x.component != a.target);
            source.set(Ok(v.clone()));
        }
    });
}

fn restarts(e: &RecordingEffector) -> usize {
    applies(e)
        .into_iter()
        .filter(|a| *a == ActionType::RestartService)
        .count()
}

fn applies(e: &RecordingEffector) -> Vec<ActionType> {
    e.calls()
        .into_iter()
        .filter(|c| c.kind == "apply")
        .filter_map(|c| c.action)
        .collect()
}

/// Waits for `n` events matching `f` (virtual time: an hour at most).
async fn events(
    rx: &mut Receiver<LoopEvent>,
    n: usize,
    f: impl Fn(&LoopEvent) -> bool,
) -> Vec<LoopEvent> {
    let wait = async {
        let mut seen = Vec::new();
        while seen.len() < n {
            match rx.recv().await {
                Ok(e) if f(&e) => seen.push(e),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event bus closed: {e}"),
            }
        }
        seen
    };
    tokio::time::timeout(Duration::from_secs(3600), wait)
        .await
        .expect("events within an hour of virtual time")
}

async fn incidents(h: &LoopHandle) -> Vec<mapek_actors::model::Incident> {
    h.planner
        .send(GetIncidents {
            state: None,
            limit: 1000,
            after: None,
        })
        .await
        .expect("planner")
        .incidents
}

#[test]
fn dry_run_over_a_burst_of_twenty_incidents_calls_nothing_and_records_twenty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(burst(20, "svc")));
    let effector = RecordingEffector::new();
    let mut s = settings();
    s.safety.mode = Mode::DryRun;
    // The budget still gates, but a dry run reserves nothing.
    s.safety.disruption_budget.max_actions = 5;
    paused_system().block_on(async {
        let h = start(&source, &effector, &store, s, None);
        let mut rx = h.events.subscribe();
        events(&mut rx, 20, |e| {
            matches!(
                e,
                LoopEvent::Executed {
                    status: ExecutionStatus::DryRun,
                    ..
                }
            )
        })
        .await;
        // Let the loop run on: nothing more happens to those incidents.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(effector.calls().is_empty(), "{:?}", effector.calls());
        let execs = store.list_executions(100).expect("executions");
        assert_eq!(execs.len(), 20, "one dry run per incident");
        for e in &execs {
            assert_eq!(e.status, ExecutionStatus::DryRun);
            assert!(e.outcome.is_none(), "a dry run feeds no learning");
            assert!(!e.actions.is_empty());
            for a in &e.actions {
                assert_eq!(a.status, ExecutionStatus::DryRun);
                let would = &a.result.as_ref().expect("recorded call")["would_call"];
                assert_eq!(would["action_type"], a.action_type.as_str());
                assert!(would["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("svc-")));
                assert!(would["parameters"]["idempotency_key"].is_string());
            }
        }
        assert_eq!(
            store.stats().expect("stats").outcomes_recorded,
            0,
            "nothing learned from a dry run"
        );
        let inc = incidents(&h).await;
        assert_eq!(inc.len(), 20);
        assert!(
            inc.iter().all(|i| i.state == IncidentState::Held),
            "{inc:?}"
        );
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
}

#[test]
fn a_pause_holds_everything_until_resume_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(Vec::new()));
    let effector = RecordingEffector::new();
    paused_system().block_on(async {
        let h = start(&source, &effector, &store, settings(), None);
        let reply = h
            .planner
            .send(Pause {
                by: "ana".into(),
                reason: Some("incident review".into()),
            })
            .await
            .expect("planner")
            .expect("paused");
        assert_eq!(reply["paused"], true);
        assert!(h.state.snapshot().paused);
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    drop(store);
    // A new process on the same data: still paused.
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("reopen");
    source.set(Ok(burst(3, "svc")));
    // A restart heals its component: each incident needs one remedy.
    heal_on_restart(&effector, &source, burst(3, "svc"));
    paused_system().block_on(async {
        let h = start(&source, &effector, &store, settings(), None);
        let mut rx = h.events.subscribe();
        events(&mut rx, 3, |e| {
            matches!(e, LoopEvent::Guard { guard, decision, .. } if guard == "pause" && decision == "held")
        })
        .await;
        tokio::time::sleep(Duration::from_secs(900)).await;
        assert!(applies(&effector).is_empty(), "nothing executed while paused");
        let snap = h.state.snapshot();
        assert!(snap.paused);
        assert_eq!(snap.pause.as_ref().map(|p| p.by.as_str()), Some("ana"));
        let inc = incidents(&h).await;
        assert_eq!(inc.len(), 3);
        for i in &inc {
            assert_eq!(i.state, IncidentState::Queued);
            assert!(
                i.reason.as_deref().is_some_and(|r| r.starts_with("held by pause")),
                "{:?}",
                i.reason
            );
        }
        // The policies say they were held by the pause.
        for p in store.list_policies(None, 100).expect("policies") {
            assert!(p.guards.iter().any(|g| g.guard == "pause" && g.decision == "held"));
        }
        // Resume: the incidents still active are remedied.
        h.planner
            .send(Resume {
                by: "ana".into(),
                reason: None,
            })
            .await
            .expect("planner")
            .expect("resumed");
        events(&mut rx, 3, |e| matches!(e, LoopEvent::Verified { .. })).await;
        assert_eq!(restarts(&effector), 3);
        assert!(!h.state.snapshot().paused);
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
}

#[test]
fn a_budget_of_five_gives_five_restarts_and_escalates_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(burst(20, "svc")));
    let effector = RecordingEffector::new();
    heal_on_restart(&effector, &source, burst(20, "svc"));
    let sink = RecordingSink::default();
    let mut s = settings();
    s.safety.disruption_budget.max_actions = 5;
    s.safety.disruption_budget.window_seconds = 3600;
    s.safety.queue_timeout_seconds = 300;
    paused_system().block_on(async {
        let h = start(&source, &effector, &store, s, Some(sink.clone()));
        let mut rx = h.events.subscribe();
        events(&mut rx, 15, |e| {
            matches!(e, LoopEvent::Guard { guard, decision, .. } if guard == "queue_timeout" && decision == "escalated")
        })
        .await;
        let restarts = applies(&effector)
            .into_iter()
            .filter(|a| *a == ActionType::RestartService)
            .count();
        assert_eq!(restarts, 5, "the budget is used, never exceeded");
        let inc = incidents(&h).await;
        let escalated: Vec<_> = inc
            .iter()
            .filter(|i| i.state == IncidentState::Escalated)
            .collect();
        assert_eq!(escalated.len(), 15);
        for i in &escalated {
            assert!(
                i.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("disruption budget")),
                "{:?}",
                i.reason
            );
        }
        // Each escalation reached the sink, once per incident at least.
        let firing = sink.firing.lock().expect("lock").clone();
        let mut ids: Vec<&str> = firing
            .iter()
            .filter(|e| e.kind == EscalationKind::QueueTimeout)
            .map(|e| e.incident_id.as_str())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 15);
        // The waiting policies recorded the budget holding them.
        let held = store
            .list_policies(None, 100)
            .expect("policies")
            .into_iter()
            .filter(|p| {
                p.guards
                    .iter()
                    .any(|g| g.guard == "disruption_budget" && g.decision == "held")
            })
            .count();
        assert_eq!(held, 15);
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
}

#[test]
fn a_flapping_component_is_escalated_and_its_escalation_resolves_when_cleared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    let effector = RecordingEffector::new();
    let sink = RecordingSink::default();
    let mut s = settings();
    s.safety.flapping.relapses = 2;
    s.safety.flapping.window_seconds = 3600;
    paused_system().block_on(async {
        let h = start(&source, &effector, &store, s, Some(sink.clone()));
        let mut rx = h.events.subscribe();
        // The same component's incident comes back, three times in all
        // (new violations each time: a new onset, a new incident).
        for round in 0..3 {
            let batch: Vec<Violation> = (0..3)
                .map(|i| v(&format!("api-{round}-{i}"), "api", Signal::Failure, 0))
                .collect();
            source.set(Ok(batch));
            events(&mut rx, 1, |e| {
                matches!(e, LoopEvent::Verified { .. } | LoopEvent::Flapping { .. })
            })
            .await;
            if round < 2 {
                // Healed: the incident closes before the next one opens.
                source.set(Ok(Vec::new()));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
        let executed = store.list_executions(100).expect("executions").len();
        assert_eq!(executed, 2, "two remedies, then the component is flapping");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let flapping: Vec<_> = incidents(&h)
            .await
            .into_iter()
            .filter(|i| i.state == IncidentState::Escalated)
            .collect();
        assert_eq!(flapping.len(), 1, "{flapping:?}");
        let reason = flapping[0].reason.clone().unwrap_or_default();
        assert!(reason.contains("is flapping"), "{reason}");
        let esc: Vec<Escalation> = sink
            .firing
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| e.kind == EscalationKind::Flapping)
            .cloned()
            .collect();
        // Posted (and re-posted while it lasts) for that one incident.
        assert!(!esc.is_empty(), "the flapping escalation is posted");
        assert!(
            esc.iter().all(|e| e.incident_id == flapping[0].id),
            "{esc:?}"
        );
        // An operator clears the component: mapek acts again, and the
        // escalation is resolved.
        let cleared = h
            .planner
            .send(mapek_actors::messages::ClearComponent {
                component: "api".into(),
                by: "ana".into(),
                reason: Some("fixed the config".into()),
            })
            .await
            .expect("planner")
            .expect("cleared");
        assert_eq!(cleared["cleared"][0], "flapping");
        events(&mut rx, 1, |e| matches!(e, LoopEvent::Verified { .. })).await;
        assert_eq!(store.list_executions(100).expect("executions").len(), 3);
        let resolved = sink.resolved.lock().expect("lock").clone();
        assert!(resolved.iter().any(|e| e.incident_id == flapping[0].id));
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
}

#[test]
fn a_recurrence_reclassifies_the_earlier_success_in_knowledge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    let effector = RecordingEffector::new();
    paused_system().block_on(async {
        let h = start(&source, &effector, &store, settings(), None);
        let mut rx = h.events.subscribe();
        source.set(Ok(burst(1, "db")));
        let verified = events(&mut rx, 1, |e| matches!(e, LoopEvent::Verified { .. })).await;
        let LoopEvent::Verified { outcome, .. } = &verified[0] else {
            unreachable!()
        };
        assert_eq!(*outcome, Some(OutcomeType::Success));
        source.set(Ok(Vec::new()));
        tokio::time::sleep(Duration::from_secs(10)).await;
        // The symptoms come back (new violations on the same component).
        let again: Vec<Violation> = (0..3)
            .map(|i| v(&format!("db-again-{i}"), "db-00", Signal::Failure, 0))
            .collect();
        source.set(Ok(again));
        let rec = events(&mut rx, 1, |e| matches!(e, LoopEvent::Recurred { .. })).await;
        let LoopEvent::Recurred { execution_id, .. } = &rec[0] else {
            unreachable!()
        };
        // Knowledge re-classifies the outcome, and learning counts it as a
        // failure.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let o = store.get_outcome(execution_id).expect("outcome");
            if o.as_ref()
                .is_some_and(|o| o.outcome_type == OutcomeType::Recurred)
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not re-classified: {o:?}"
            );
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(5)))
                .await
                .expect("yield");
        }
        let stats = store.stats().expect("stats");
        let remedies: Vec<_> = stats.by_remedy.values().flat_map(|m| m.values()).collect();
        assert_eq!(remedies.len(), 1, "{stats:?}");
        assert_eq!(
            (remedies[0].successes, remedies[0].failures),
            (0, 1),
            "{stats:?}"
        );
        let inc = incidents(&h).await;
        assert!(inc
            .iter()
            .any(|i| i.recurrence_of.as_deref() == Some(execution_id.as_str())));
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
}

#[test]
fn a_hand_off_to_people_outlives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(burst(1, "svc")));
    let effector = RecordingEffector::new();
    let mut s = settings();
    // No disruptive action allowed at all: the restart can never run.
    s.safety.disruption_budget.max_actions = 0;
    let sink = RecordingSink::default();
    {
        let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
        let s = s.clone();
        let sink = sink.clone();
        paused_system().block_on(async {
            let h = start(&source, &effector, &store, s, Some(sink));
            let mut rx = h.events.subscribe();
            events(&mut rx, 1, |e| matches!(e, LoopEvent::Escalated { .. })).await;
            h.supervisor.send(Shutdown).await.expect("shutdown");
        });
    }
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("reopen");
    let policies_before = store.list_policies(None, 100).expect("policies").len();
    paused_system().block_on(async {
        let h = start(&source, &effector, &store, s, Some(sink.clone()));
        tokio::time::sleep(Duration::from_secs(120)).await;
        let inc = incidents(&h).await;
        assert_eq!(inc.len(), 1);
        assert_eq!(inc[0].state, IncidentState::Escalated, "{:?}", inc[0]);
        assert_eq!(
            inc[0].handed_off.as_ref().map(|h| h.kind),
            Some(EscalationKind::BudgetExhausted)
        );
        assert_eq!(
            store.list_policies(None, 100).expect("policies").len(),
            policies_before,
            "not planned again after the restart"
        );
        assert!(restarts(&effector) == 0);
        // Its escalation is still posted (re-posted after the restart).
        let firing = sink.firing.lock().expect("lock").clone();
        assert!(firing.len() >= 2, "{firing:?}");
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
}
