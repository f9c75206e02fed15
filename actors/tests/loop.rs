//! The whole loop under its supervisor, in one actix system with tokio's
//! clock paused (timers advance instantly when the loop is idle), a real
//! sled store in a temporary directory, and the test doubles of
//! `mapek_actors::testing` at the edges.

mod common;

use common::paused_system;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use mapek_actors::clock::SystemClock;
use mapek_actors::events::LoopEvent;
use mapek_actors::execute::EffectorRouter;
use mapek_actors::mailbox::FaultInjector;
use mapek_actors::messages::{DecidePolicy, Shutdown};
use mapek_actors::metrics::{ActorKind, Metrics};
use mapek_actors::model::{
    ActionType, ApprovalStatus, ExecutionStatus, OutcomeType, RiskLevel, Severity, Signal,
    Violation,
};
use mapek_actors::ports::{EffectorError, SourceError};
use mapek_actors::store::KnowledgeStore;
use mapek_actors::supervisor::{
    start_loop, LoopHandle, LoopParts, LoopSettings, ESCALATION_EXIT_CODE,
};
use mapek_actors::testing::{RecordingEffector, ScriptedProbe, ScriptedSource};
use tokio::sync::broadcast::Receiver;

fn violation(fp: &str, signal: Signal, severity: Severity) -> Violation {
    let now = Utc::now();
    Violation {
        id: format!("v-{fp}"),
        fingerprint: fp.into(),
        rule: format!("rule-{fp}"),
        severity,
        component: "charter".into(),
        metric: format!("metric_{fp}"),
        value: 2.0,
        labels: Default::default(),
        signal,
        first_seen: now,
        observed_at: now,
        source: "scripted".into(),
    }
}

/// A load-spike incident: latency, then failures, then low throughput.
fn incident() -> Vec<Violation> {
    vec![
        violation("lat", Signal::Latency, Severity::Warning),
        violation("fail", Signal::Failure, Severity::Critical),
        violation("tput", Signal::Throughput, Severity::Warning),
    ]
}

fn settings() -> LoopSettings {
    let mut s = LoopSettings::default();
    s.monitor.interval_seconds = 1;
    s.execute.verification_window_seconds = 5;
    s.execute.backoff_initial_ms = 10;
    s.execute.backoff_max_ms = 40;
    s.plan.cooldown_seconds = 5;
    s.orchestrator.max_cycle_time_seconds = 120;
    s.orchestrator.restart_period_seconds = 60;
    // The guards count in wall-clock windows, which do not move under the
    // paused clock of these tests: their limits are lifted here (the guards
    // have their own tests, actors/tests/safety.rs).
    s.safety.component_rate_limit.max_actions = 1000;
    s.safety.disruption_budget.max_actions = 1000;
    s.plan.learning.seed = Some(1);
    s
}

struct Rig {
    source: ScriptedSource,
    effector: RecordingEffector,
    probe: ScriptedProbe,
    store: KnowledgeStore,
    _dir: tempfile::TempDir,
}

fn rig(probe: Vec<Result<usize, SourceError>>) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(incident()));
    Rig {
        source,
        effector: RecordingEffector::new(),
        probe: ScriptedProbe::new(probe),
        store,
        _dir: dir,
    }
}

fn start(rig: &Rig, settings: LoopSettings, chaos: Option<Arc<dyn FaultInjector>>) -> LoopHandle {
    start_loop(LoopParts {
        settings,
        sources: vec![Arc::new(rig.source.clone())],
        effectors: EffectorRouter::all_to(Arc::new(rig.effector.clone())),
        probe: Some(Arc::new(rig.probe.clone())),
        store: rig.store.clone(),
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        chaos,
        events: None,
        alert_state: None,
        escalations: None,
        leadership: None,
    })
}

/// Awaits the first event matching `f` (virtual time: the limit costs
/// nothing while the loop is idle).
async fn until<T>(rx: &mut Receiver<LoopEvent>, mut f: impl FnMut(&LoopEvent) -> Option<T>) -> T {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    if let Some(t) = f(&e) {
                        return t;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("event bus closed: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3600), wait)
        .await
        .expect("event within an hour of virtual time")
}

fn verified(e: &LoopEvent) -> Option<(Option<OutcomeType>, Option<usize>, Option<usize>)> {
    match e {
        LoopEvent::Verified {
            outcome,
            before,
            after,
            ..
        } => Some((*outcome, *before, *after)),
        _ => None,
    }
}

#[test]
fn violations_flow_to_a_verified_outcome_in_knowledge() {
    let rig = rig(vec![Ok(3), Ok(0)]);
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, settings(), None);
        let mut rx = h.events.subscribe();
        let (outcome, before, after) = until(&mut rx, verified).await;
        assert_eq!(outcome, Some(OutcomeType::Success));
        assert_eq!((before, after), (Some(3), Some(0)));

        let calls = rig.effector.calls();
        let applied: Vec<ActionType> = calls
            .iter()
            .filter(|c| c.kind == "apply")
            .filter_map(|c| c.action)
            .collect();
        assert_eq!(
            applied,
            vec![ActionType::ScaleUp, ActionType::UpdateConfiguration],
            "validation-latency strategy, in dependency order"
        );
        assert_eq!(
            calls[0].kind, "validate",
            "pre-flight validation comes first"
        );

        let execs = rig.store.list_executions(10).expect("executions");
        let e = execs
            .iter()
            .find(|e| e.outcome.is_some())
            .expect("a finished execution");
        assert_eq!(e.status, ExecutionStatus::Completed);
        assert!(
            e.timings.total_seconds >= 5.0,
            "total includes the verification window: {:?}",
            e.timings
        );
        assert!(e.timings.execution_seconds >= 5.0);
        let stats = rig.store.stats().expect("stats");
        let st = stats
            .by_action
            .get(&ActionType::ScaleUp)
            .expect("scale-up learned");
        assert_eq!((st.executions, st.successes), (1, 1));
        let policies = rig
            .store
            .list_policies(Some(ApprovalStatus::Approved), 10)
            .expect("policies");
        assert!(policies.iter().any(|p| p.id == e.policy_id));
        let state = h.state.snapshot();
        assert!(state.iteration >= 1 && state.policies_executed == 1 && state.is_running);
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
}

/// Panics once in the first handler of one actor.
struct PanicOnce {
    target: ActorKind,
    left: AtomicUsize,
}

impl FaultInjector for PanicOnce {
    fn before_handle(&self, actor: ActorKind, message: &'static str) {
        if actor == self.target
            && self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            panic!("injected fault in {actor} while handling {message}");
        }
    }
}

#[test]
fn a_panic_in_any_phase_is_survived_and_the_loop_still_acts() {
    for target in [
        ActorKind::Monitor,
        ActorKind::Analyzer,
        ActorKind::Planner,
        ActorKind::Executor,
        ActorKind::Knowledge,
    ] {
        let rig = rig(vec![Ok(3), Ok(0)]);
        let sys = paused_system();
        let chaos = Arc::new(PanicOnce {
            target,
            left: AtomicUsize::new(1),
        });
        sys.block_on(async {
            let h = start(&rig, settings(), Some(chaos.clone()));
            let mut rx = h.events.subscribe();
            let restarted = until(&mut rx, |e| match e {
                LoopEvent::Restarted { actor } => Some(*actor),
                _ => None,
            })
            .await;
            assert_eq!(restarted, target);
            let (outcome, ..) = until(&mut rx, verified).await;
            assert_eq!(
                outcome,
                Some(OutcomeType::Success),
                "after a panic in {target}"
            );
            assert_eq!(
                chaos.left.load(Ordering::SeqCst),
                0,
                "the fault was injected"
            );
            let restarts = h
                .metrics
                .restarts
                .get_or_create(&mapek_actors::metrics::ActorLabels {
                    actor: target.as_str(),
                })
                .get();
            assert_eq!(restarts, 1, "{target} restarted once");
            assert!(
                h.phases_up().values().all(|up| *up),
                "every phase is up again"
            );
            h.supervisor.send(Shutdown).await.expect("shutdown");
        });
        assert_eq!(
            sys.run_with_code().expect("run"),
            0,
            "clean exit after surviving a panic in {target}"
        );
    }
}

/// Panics in every handler of one actor.
struct AlwaysPanic(ActorKind);

impl FaultInjector for AlwaysPanic {
    fn before_handle(&self, actor: ActorKind, message: &'static str) {
        if actor == self.0 {
            panic!("injected fault in {actor} while handling {message}");
        }
    }
}

#[test]
fn exceeding_the_restart_intensity_stops_the_system_non_zero_naming_the_actor() {
    let rig = rig(vec![Ok(3), Ok(0)]);
    let sys = paused_system();
    let mut s = settings();
    s.orchestrator.max_restarts = 2;
    let h =
        sys.block_on(async { start(&rig, s, Some(Arc::new(AlwaysPanic(ActorKind::Analyzer)))) });
    let code = sys.run_with_code().expect("run");
    assert_eq!(code, ESCALATION_EXIT_CODE);
    let why = h.exit.get().expect("a reason");
    assert!(
        why.contains("`analyzer`") && why.contains("max_restarts = 2"),
        "{why}"
    );
    assert!(rig.effector.calls().is_empty(), "nothing was executed");
}

#[test]
fn a_failed_action_rolls_back_completed_ones_in_reverse_order() {
    let rig = rig(vec![Ok(3), Ok(3)]);
    rig.effector.fail(
        ActionType::UpdateConfiguration,
        EffectorError::Rejected("HTTP 400".into()),
    );
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, settings(), None);
        let mut rx = h.events.subscribe();
        let status = until(&mut rx, |e| match e {
            LoopEvent::Executed { status, .. } => Some(*status),
            _ => None,
        })
        .await;
        assert_eq!(status, ExecutionStatus::RolledBack);
        let (outcome, ..) = until(&mut rx, verified).await;
        assert_eq!(outcome, None, "a rolled-back execution teaches nothing");
        let kinds: Vec<(&str, Option<ActionType>)> = rig
            .effector
            .calls()
            .iter()
            .map(|c| (c.kind, c.action))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("validate", None),
                ("apply", Some(ActionType::ScaleUp)),
                ("apply", Some(ActionType::UpdateConfiguration)),
                ("rollback", Some(ActionType::ScaleUp)),
            ],
            "a rejection is not retried; the completed scale-up is undone"
        );
        let e = &rig.store.list_executions(1).expect("executions")[0];
        assert_eq!(e.status, ExecutionStatus::RolledBack);
        assert_eq!(e.actions[0].status, ExecutionStatus::RolledBack);
        assert!(e.error.as_deref().unwrap_or("").contains("HTTP 400"));
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}

#[test]
fn transient_failures_are_retried_with_backoff_then_rolled_back() {
    let rig = rig(vec![Ok(3)]);
    rig.effector.fail(
        ActionType::UpdateConfiguration,
        EffectorError::Transient("HTTP 503".into()),
    );
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, settings(), None);
        let mut rx = h.events.subscribe();
        until(&mut rx, |e| {
            matches!(e, LoopEvent::Executed { .. }).then_some(())
        })
        .await;
        let tries = rig
            .effector
            .calls()
            .iter()
            .filter(|c| c.kind == "apply" && c.action == Some(ActionType::UpdateConfiguration))
            .count();
        assert_eq!(tries, 4, "1 attempt + 3 retries");
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}

#[test]
fn no_evidence_after_acting_gives_unknown_never_an_assumed_success() {
    let rig = rig(vec![
        Ok(3),
        Err(SourceError::Unreachable("prometheus down".into())),
    ]);
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, settings(), None);
        let mut rx = h.events.subscribe();
        let (outcome, before, after) = until(&mut rx, verified).await;
        assert_eq!(
            (outcome, before, after),
            (Some(OutcomeType::Unknown), Some(3), None)
        );
        let stats = rig.store.stats().expect("stats");
        assert_eq!(
            stats
                .by_action
                .get(&ActionType::ScaleUp)
                .map(|s| s.executions)
                .unwrap_or(0),
            0,
            "UNKNOWN teaches nothing"
        );
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}

#[test]
fn a_degraded_source_is_no_evidence_and_nothing_is_planned() {
    let rig = rig(vec![Ok(3)]);
    rig.source.set(Err(SourceError::Status {
        status: 500,
        body: "boom".into(),
    }));
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, settings(), None);
        // Let the monitor poll many times.
        while rig.source.polls() < 20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(rig.effector.calls().is_empty());
        assert!(rig
            .store
            .list_policies(None, 10)
            .expect("policies")
            .is_empty());
        let sources = h
            .monitor
            .send(mapek_actors::messages::GetSources)
            .await
            .expect("sources");
        assert_eq!(
            sources[0].status,
            mapek_actors::messages::SourceStatus::Degraded
        );
        assert!(sources[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("500"));
        assert!(h
            .state
            .snapshot()
            .error
            .unwrap_or_default()
            .contains("scripted"));
        // It recovers by itself when the source does.
        rig.source.set(Ok(incident()));
        let mut rx = h.events.subscribe();
        let (outcome, ..) = until(&mut rx, verified).await;
        assert!(outcome.is_some());
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}

#[test]
fn high_risk_policies_wait_for_a_person_and_run_once_approved() {
    let rig = rig(vec![Ok(3), Ok(1)]);
    let mut s = settings();
    s.plan.auto_approve_max_risk = RiskLevel::Low; // everything this incident needs waits
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, s, None);
        let mut rx = h.events.subscribe();
        let policy_id = until(&mut rx, |e| match e {
            LoopEvent::Planned { policy_id, .. } => Some(policy_id.clone()),
            _ => None,
        })
        .await;
        assert!(
            rig.effector.calls().is_empty(),
            "nothing runs before approval"
        );
        // The Planner records the policy in Knowledge right after
        // announcing it.
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let pending = rig
                    .store
                    .list_policies(Some(ApprovalStatus::Pending), 10)
                    .expect("pending");
                if pending.iter().any(|p| p.id == policy_id) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the pending policy is in the audit trail");
        let decided = h
            .planner
            .send(DecidePolicy {
                id: policy_id.clone(),
                decision: ApprovalStatus::Approved,
                by: "alice".into(),
                reason: None,
            })
            .await
            .expect("planner")
            .expect("approved");
        assert_eq!(decided.approval_status, ApprovalStatus::Approved);
        let again = h
            .planner
            .send(DecidePolicy {
                id: policy_id.clone(),
                decision: ApprovalStatus::Rejected,
                by: "bob".into(),
                reason: None,
            })
            .await
            .expect("planner");
        assert!(again.is_err(), "an approved policy cannot be rejected");
        let (outcome, ..) = until(&mut rx, verified).await;
        assert_eq!(
            outcome,
            Some(OutcomeType::Partial),
            "3 → 1 resolves more than half"
        );
        let stored = rig
            .store
            .get_policy(&policy_id)
            .expect("get")
            .expect("stored");
        assert_eq!(
            stored.decisions.last().map(|d| d.by.as_str()),
            Some("alice")
        );
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}

#[test]
fn a_chain_past_max_cycle_time_is_cut_off_and_recorded_as_such() {
    let rig = rig(vec![Ok(3), Ok(0)]);
    let mut s = settings();
    s.execute.verification_window_seconds = 100;
    s.orchestrator.max_cycle_time_seconds = 30;
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, s, None);
        let mut rx = h.events.subscribe();
        let (outcome, ..) = until(&mut rx, verified).await;
        assert_eq!(outcome, Some(OutcomeType::Unknown));
        let e = &rig.store.list_executions(1).expect("executions")[0];
        assert!(e.timings.cut_off, "{:?}", e.timings);
        assert!(
            e.timings.total_seconds <= 31.0,
            "stopped at the limit: {:?}",
            e.timings
        );
        let cut = h.metrics.chains_cut_off.get();
        assert_eq!(cut, 1);
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}

#[test]
fn a_panicking_effector_is_a_failed_call_and_completed_actions_are_rolled_back() {
    let rig = rig(vec![Ok(3)]);
    rig.effector.on_apply(|a| {
        if a.action_type == ActionType::UpdateConfiguration {
            panic!("effector bug");
        }
    });
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, settings(), None);
        let mut rx = h.events.subscribe();
        let status = until(&mut rx, |e| match e {
            LoopEvent::Executed { status, .. } => Some(*status),
            _ => None,
        })
        .await;
        assert_eq!(status, ExecutionStatus::RolledBack);
        until(&mut rx, verified).await;
        let e = &rig.store.list_executions(1).expect("executions")[0];
        assert!(
            e.error
                .as_deref()
                .unwrap_or("")
                .contains("effector panicked: effector bug"),
            "{e:?}"
        );
        assert_eq!(e.actions[0].status, ExecutionStatus::RolledBack);
        let restarts = h
            .metrics
            .restarts
            .get_or_create(&mapek_actors::metrics::ActorLabels { actor: "executor" })
            .get();
        assert_eq!(restarts, 0, "the Executor itself did not crash");
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}

#[test]
fn a_broken_rule_costs_only_its_own_evidence() {
    let rig = rig(vec![Ok(3), Ok(0)]);
    rig.source
        .fail_rules(vec![mapek_actors::ports::RuleFailure {
            rule: "typo".into(),
            component: "elsewhere".into(),
            error: SourceError::Query {
                rule: "typo".into(),
                error_type: "bad_data".into(),
                message: "parse error".into(),
            },
        }]);
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, settings(), None);
        let mut rx = h.events.subscribe();
        let (outcome, ..) = until(&mut rx, verified).await;
        assert_eq!(
            outcome,
            Some(OutcomeType::Success),
            "the other rules still drive the loop"
        );
        let sources = h
            .monitor
            .send(mapek_actors::messages::GetSources)
            .await
            .expect("sources");
        assert_eq!(sources[0].status, mapek_actors::messages::SourceStatus::Up);
        assert_eq!(sources[0].failing_rules.len(), 1);
        assert!(
            sources[0].failing_rules[0].starts_with("typo: "),
            "{:?}",
            sources[0].failing_rules
        );
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}

#[test]
fn shutdown_lets_a_running_execution_finish_and_records_it() {
    let rig = rig(vec![Ok(3), Ok(0)]);
    let mut s = settings();
    s.execute.verification_window_seconds = 10;
    let sys = paused_system();
    sys.block_on(async {
        let h = start(&rig, s, None);
        let mut rx = h.events.subscribe();
        until(&mut rx, |e| {
            matches!(e, LoopEvent::Executed { .. }).then_some(())
        })
        .await;
        // The policy acted and now waits out its verification window.
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    assert_eq!(sys.run_with_code().expect("run"), 0);
    // Shutdown closed the store: reopen the directory, as the next start would.
    let Rig {
        store, _dir: dir, ..
    } = rig;
    drop(store);
    let reopened = KnowledgeStore::open(dir.path(), Duration::from_secs(5)).expect("reopen");
    let e = reopened.list_executions(1).expect("executions").remove(0);
    assert_eq!(e.status, ExecutionStatus::Completed, "{e:?}");
    assert_eq!(
        e.outcome,
        Some(OutcomeType::Success),
        "verified before stopping"
    );
}
