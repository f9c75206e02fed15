//! The supervisor: starts the phases (Knowledge first), restarts a phase
//! whose handler failed or panicked, and enforces an OTP-style restart
//! intensity: more than `max_restarts` restarts of one actor within
//! `restart_period_seconds` stop the actix system with exit code
//! [`ESCALATION_EXIT_CODE`] and a reason naming the actor.
//!
//! Restarts use actix's `Supervisor`: the actor value, its address and its
//! queued messages survive; only the message whose handler failed is lost.
//! actix restarts only an actor that *stops*, so every handler runs under
//! [`crate::mailbox::Inbox::guard`], which turns a panic into `ctx.stop()`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;

use crate::analyzer::Analyzer;
use crate::clock::SharedClock;
use crate::events::EventBus;
use crate::execute::{EffectorRouter, ExecutionEnv};
use crate::executor::{Executor, KnowledgePorts, PlannerPorts};
use crate::knowledge_actor::Knowledge;
use crate::mailbox::{FaultInjector, Inbox, PhaseAddr, PhasePort};
use crate::messages::{ActorRestarted, Drain, FlushKnowledge, KnowledgeUpdated, Shutdown};
use crate::metrics::{ActorKind, Metrics};
use crate::monitor::{Monitor, MonitorProbe};
use crate::planner::Planner;
use crate::ports::{AlertState, EvidenceProbe, MetricSource};
use crate::settings::{
    AnalyzeSettings, ExecuteSettings, KnowledgeSettings, MonitorSettings, OrchestratorSettings,
    PlanSettings,
};
use crate::state::SharedState;
use crate::store::KnowledgeStore;

/// How long a shutdown waits for a running execution to finish (below the
/// usual 30 s stop timeouts of systemd and Kubernetes).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Exit code of the process when the restart intensity is exceeded
/// (EX_SOFTWARE).
pub const ESCALATION_EXIT_CODE: i32 = 70;

/// Settings of every phase.
#[derive(Debug, Clone, Default)]
pub struct LoopSettings {
    /// Supervisor and chain limits.
    pub orchestrator: OrchestratorSettings,
    /// Monitor.
    pub monitor: MonitorSettings,
    /// Analyzer.
    pub analyze: AnalyzeSettings,
    /// Planner.
    pub plan: PlanSettings,
    /// Executor.
    pub execute: ExecuteSettings,
    /// Knowledge.
    pub knowledge: KnowledgeSettings,
    /// Safety guards.
    pub safety: crate::settings::SafetySettings,
}

/// What the loop is built from.
pub struct LoopParts {
    /// Settings.
    pub settings: LoopSettings,
    /// Polled sources.
    pub sources: Vec<Arc<dyn MetricSource>>,
    /// Effectors by action type.
    pub effectors: EffectorRouter,
    /// Verification probe; `None` measures through the Monitor.
    pub probe: Option<Arc<dyn EvidenceProbe>>,
    /// The open knowledge store.
    pub store: KnowledgeStore,
    /// Wall clock.
    pub clock: SharedClock,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Fault injection (chaos tests only).
    pub chaos: Option<Arc<dyn FaultInjector>>,
    /// Event bus to publish on (a new one when `None`).
    pub events: Option<EventBus>,
    /// Where verification asks for the current state of pushed (webhook)
    /// alerts; `None` counts them as the Monitor holds them.
    pub alert_state: Option<Arc<dyn AlertState>>,
    /// Where escalations go so that they reach people (Alertmanager).
    pub escalations: Option<Arc<dyn crate::ports::EscalationSink>>,
    /// Leadership of shards (cluster mode): the Planner holds the policies
    /// of shards this replica does not lead, the Executor fences each call.
    /// `None`: one process, which leads everything.
    pub leadership: Option<Arc<dyn crate::leadership::Leadership>>,
}

/// Why the loop stopped on its own, if it did.
#[derive(Debug, Clone, Default)]
pub struct ExitReason(Arc<Mutex<Option<String>>>);

impl ExitReason {
    /// The reason, if the supervisor escalated.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, why: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// Addresses and shared state of a running loop.
#[derive(Clone)]
pub struct LoopHandle {
    /// The supervisor.
    pub supervisor: Addr<LoopSupervisor>,
    /// Monitor.
    pub monitor: PhaseAddr<Monitor>,
    /// Analyzer.
    pub analyzer: PhaseAddr<Analyzer>,
    /// Planner.
    pub planner: PhaseAddr<Planner>,
    /// Executor.
    pub executor: PhaseAddr<Executor>,
    /// Knowledge.
    pub knowledge: PhaseAddr<Knowledge>,
    /// Store, for reads.
    pub store: KnowledgeStore,
    /// Orchestrator state.
    pub state: SharedState,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Set when the supervisor stops the system on its own.
    pub exit: ExitReason,
    /// Loop events.
    pub events: EventBus,
}

impl LoopHandle {
    /// Whether each actor is reachable.
    pub fn phases_connected(&self) -> BTreeMap<ActorKind, bool> {
        BTreeMap::from([
            (ActorKind::Monitor, self.monitor.connected()),
            (ActorKind::Analyzer, self.analyzer.connected()),
            (ActorKind::Planner, self.planner.connected()),
            (ActorKind::Executor, self.executor.connected()),
            (ActorKind::Knowledge, self.knowledge.connected()),
            (ActorKind::Supervisor, self.supervisor.connected()),
        ])
    }

    /// Whether each actor is up: reachable, and not failing since its last
    /// restart (an actor in a crash loop is down).
    pub fn phases_up(&self) -> BTreeMap<ActorKind, bool> {
        BTreeMap::from([
            (ActorKind::Monitor, self.monitor.is_up()),
            (ActorKind::Analyzer, self.analyzer.is_up()),
            (ActorKind::Planner, self.planner.is_up()),
            (ActorKind::Executor, self.executor.is_up()),
            (ActorKind::Knowledge, self.knowledge.is_up()),
            (ActorKind::Supervisor, self.supervisor.connected()),
        ])
    }
}

/// The supervisor actor.
pub struct LoopSupervisor {
    inbox: Inbox,
    settings: OrchestratorSettings,
    history: BTreeMap<ActorKind, VecDeque<Instant>>,
    handle: Option<LoopHandle>,
    exit: ExitReason,
}

/// Starts the loop inside the current actix system: Knowledge first, then
/// Executor, Planner, Analyzer and Monitor (each downstream phase exists
/// before the phase that feeds it). Must be called from within a running
/// `actix::System`.
pub fn start_loop(parts: LoopParts) -> LoopHandle {
    let LoopParts {
        settings,
        sources,
        effectors,
        probe,
        store,
        clock,
        metrics,
        chaos,
        events,
        alert_state,
        escalations,
        leadership,
    } = parts;
    let events = events.unwrap_or_else(|| crate::events::bus(1024));
    let exit = ExitReason::default();
    let state = SharedState::default();
    let now = clock.now();
    let mut unfinished = close_interrupted(
        &store,
        now,
        Duration::from_secs(settings.execute.verification_window_seconds),
    );
    state.update(now, |s| {
        s.started_at = Some(now);
        s.is_running = true;
    });
    let mut out: Option<LoopHandle> = None;
    let cap = settings.orchestrator.mailbox_capacity.max(1);
    let sup_settings = settings.orchestrator.clone();
    let sup_exit = exit.clone();
    LoopSupervisor::create(|sctx| {
        let grace = Duration::from_secs(settings.orchestrator.restart_period_seconds);
        let inbox = |kind| {
            Inbox::new(kind, metrics.clone(), chaos.clone(), events.clone())
                .with_grace(grace)
                .with_capacity(cap)
        };
        let sup_inbox = inbox(ActorKind::Supervisor);
        // The only place that wires phases: each gets typed ports for the
        // messages it sends, never another actor's address.
        let restarts = PhaseAddr::new(sctx.address(), sup_inbox.clone()).port::<ActorRestarted>();
        init_series(&metrics);
        let learned_slot: Arc<OnceLock<PhasePort<KnowledgeUpdated>>> = Arc::new(OnceLock::new());
        let report_slot: Arc<OnceLock<PlannerPorts>> = Arc::new(OnceLock::new());

        let k_inbox = inbox(ActorKind::Knowledge);
        let (ks, kst, kp, kc, kstate, kr) = (
            settings.knowledge.clone(),
            store.clone(),
            learned_slot.clone(),
            clock.clone(),
            state.clone(),
            restarts.clone(),
        );
        let ki = k_inbox.clone();
        let knowledge = PhaseAddr::new(
            Supervisor::start(move |ctx: &mut Context<Knowledge>| {
                ctx.set_mailbox_capacity(cap);
                Knowledge::new(ki, ks, kst, kp, kc, kstate, kr)
            }),
            k_inbox,
        );

        let monitor_probe = MonitorProbe::new();
        let probe: Arc<dyn EvidenceProbe> =
            probe.unwrap_or_else(|| Arc::new(monitor_probe.clone()));
        let router = effectors.clone();
        if !unfinished.is_empty() {
            actix::spawn(recover(
                std::mem::take(&mut unfinished),
                store.clone(),
                probe.clone(),
                clock.clone(),
                Duration::from_secs(settings.execute.verification_window_seconds),
                knowledge.port(),
            ));
        }
        let env = ExecutionEnv {
            router: effectors,
            probe,
            settings: settings.execute.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
            events: Some(events.clone()),
            store: Some(store.clone()),
            mode: settings.safety.mode,
            state: Some(state.clone()),
            leadership: leadership.clone(),
            budget: settings.safety.disruption_budget.clone(),
        };
        let e_inbox = inbox(ActorKind::Executor);
        let (ei, ek, ep, est, er) = (
            e_inbox.clone(),
            KnowledgePorts {
                execution: knowledge.port(),
                finished: knowledge.port(),
            },
            report_slot.clone(),
            state.clone(),
            restarts.clone(),
        );
        let max_cycle = Duration::from_secs(settings.orchestrator.max_cycle_time_seconds);
        // A hold on a component lasts until the execution reports back, or
        // at most the chain's limit plus the rollback budget.
        let lease = max_cycle
            + Duration::from_secs(
                settings.execute.call_timeout_seconds * (u64::from(settings.execute.retries) + 2)
                    + 30,
            );
        let executor = PhaseAddr::new(
            Supervisor::start(move |ctx: &mut Context<Executor>| {
                ctx.set_mailbox_capacity(cap);
                Executor::new(ei, env, max_cycle, ek, ep, est, er)
            }),
            e_inbox,
        );

        let p_inbox = inbox(ActorKind::Planner);
        let (max_concurrent, prouter) = (settings.execute.max_concurrent, router.clone());
        let pleader = leadership.clone();
        let (psafety, psink, precl) = (
            settings.safety.clone(),
            escalations.clone(),
            knowledge.port::<crate::messages::ReclassifyOutcome>(),
        );
        let (pi, ps, pe, pk, pst, pc, pstate, pr) = (
            p_inbox.clone(),
            settings.plan.clone(),
            executor.port(),
            knowledge.port(),
            store.clone(),
            clock.clone(),
            state.clone(),
            restarts.clone(),
        );
        let planner = PhaseAddr::new(
            Supervisor::start(move |ctx: &mut Context<Planner>| {
                ctx.set_mailbox_capacity(cap);
                Planner::new(
                    pi,
                    ps,
                    max_concurrent,
                    Some(prouter),
                    pe,
                    pk,
                    pst,
                    pc,
                    pstate,
                    pr,
                    lease,
                )
                .with_safety(psafety.clone(), psink.clone(), Some(precl.clone()))
                .with_leadership(pleader.clone())
            }),
            p_inbox,
        );
        let _ = learned_slot.set(planner.port());
        let _ = report_slot.set(PlannerPorts {
            finished: planner.port(),
            actions_done: planner.port(),
        });

        let a_inbox = inbox(ActorKind::Analyzer);
        let mut analyze_settings = settings.analyze.clone();
        analyze_settings.plan_threshold = settings.plan.plan_threshold;
        let astore = store.clone();
        let (ai, aset, ap, ak, ac, ar) = (
            a_inbox.clone(),
            analyze_settings,
            planner.port(),
            knowledge.port(),
            clock.clone(),
            restarts.clone(),
        );
        let analyzer = PhaseAddr::new(
            Supervisor::start(move |ctx: &mut Context<Analyzer>| {
                ctx.set_mailbox_capacity(cap);
                Analyzer::new(ai, aset, ap, ak, &astore, ac, ar)
            }),
            a_inbox,
        );

        let m_inbox = inbox(ActorKind::Monitor);
        let mstore = store.clone();
        let (mi, mset, ma, mc, mstate, mr) = (
            m_inbox.clone(),
            settings.monitor.clone(),
            analyzer.port(),
            clock.clone(),
            state.clone(),
            restarts,
        );
        let monitor = PhaseAddr::new(
            Supervisor::start(move |ctx: &mut Context<Monitor>| {
                ctx.set_mailbox_capacity(cap);
                Monitor::new(mi, mset, sources, ma, mc, mstate, mr)
                    .with_alert_state(alert_state)
                    .with_store(Some(mstore))
            }),
            m_inbox,
        );
        monitor_probe.connect(monitor.clone());

        let handle = LoopHandle {
            supervisor: sctx.address(),
            monitor,
            analyzer,
            planner,
            executor,
            knowledge,
            store,
            state,
            metrics: metrics.clone(),
            exit: exit.clone(),
            events: events.clone(),
        };
        out = Some(handle.clone());
        LoopSupervisor {
            inbox: sup_inbox,
            settings: sup_settings,
            history: BTreeMap::new(),
            handle: Some(handle),
            exit: sup_exit,
        }
    });
    match out {
        Some(h) => h,
        None => unreachable!("Actor::create runs its closure before returning"),
    }
}

/// An execution a previous run left unfinished.
struct Unfinished {
    exec: crate::model::PolicyExecution,
    /// Its actions had all completed: only the verification was cut
    /// short (re-armed); otherwise it was interrupted while acting.
    verifying: bool,
}

/// Executions a previous run left unfinished (the daemon stopped or
/// crashed):
/// - **interrupted while acting** (IN_PROGRESS): every action on record as
///   started but not finished becomes UNKNOWN (interrupted), with what was
///   sent; nothing is re-sent. The execution is UNKNOWN and
///   `interrupted`; it is re-measured after the verification window and
///   kept out of learning;
/// - **verifying** (COMPLETED, no outcome yet): the verification is
///   re-armed for the rest of its window, then the outcome is recorded as
///   usual.
fn close_interrupted(
    store: &KnowledgeStore,
    now: chrono::DateTime<chrono::Utc>,
    window: Duration,
) -> Vec<Unfinished> {
    // The components stay held until the re-measure (or the re-armed
    // verification) is over.
    let hold = now + chrono::Duration::from_std(window).unwrap_or_default();
    use crate::model::ExecutionStatus;
    let Ok(recent) = store.list_executions(1000) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for mut e in recent {
        match e.status {
            ExecutionStatus::InProgress => {}
            ExecutionStatus::Unknown if e.interrupted && e.outcome.is_none() => {
                // Closed by an earlier start whose re-measure a second stop
                // cut short: measured now.
                link_to_incident(store, &e, hold);
                out.push(Unfinished {
                    exec: e,
                    verifying: false,
                });
                continue;
            }
            ExecutionStatus::Completed if e.outcome.is_none() => {
                tracing::warn!(execution = %e.id, policy = %e.policy_id, "mapek stopped while this execution was verifying; the verification is re-armed");
                link_to_incident(store, &e, hold);
                out.push(Unfinished {
                    exec: e,
                    verifying: true,
                });
                continue;
            }
            _ => continue,
        }
        let mut unknown = 0;
        for a in e
            .actions
            .iter_mut()
            .filter(|a| a.status == ExecutionStatus::InProgress)
        {
            unknown += 1;
            a.status = ExecutionStatus::Unknown;
            let key = a
                .request
                .as_ref()
                .and_then(|r| r.pointer("/parameters/idempotency_key"))
                .and_then(|k| k.as_str())
                .unwrap_or("unknown")
                .to_string();
            a.error = Some(format!(
                "interrupted: mapek stopped during this call; it may or may not have been \
                 applied, and it is not sent again (idempotency key {key})"
            ));
        }
        let completed = e
            .actions
            .iter()
            .filter(|a| a.status == ExecutionStatus::Completed)
            .count();
        tracing::warn!(
            execution = %e.id, policy = %e.policy_id, completed, unknown,
            "execution was interrupted by a stop of mapek; its calls under way are UNKNOWN and not re-sent; it is re-measured after the verification window, outside learning"
        );
        e.status = ExecutionStatus::Unknown;
        e.interrupted = true;
        e.error = Some(format!(
            "interrupted: mapek stopped while this execution acted ({completed} actions \
             completed, {unknown} UNKNOWN); re-measured after the restart, outside learning"
        ));
        if let Err(err) = store.put_execution(&e) {
            tracing::error!(execution = %e.id, error = %err, "cannot close the interrupted execution");
        }
        link_to_incident(store, &e, hold);
        out.push(Unfinished {
            exec: e,
            verifying: false,
        });
    }
    out
}

/// Lists an execution on its incident's record (the Planner did not get
/// to it before the stop), and holds the incident's components at least
/// until `hold`.
fn link_to_incident(
    store: &KnowledgeStore,
    e: &crate::model::PolicyExecution,
    hold: chrono::DateTime<chrono::Utc>,
) {
    let Some(id) = &e.incident_id else { return };
    match store.get_record::<crate::model::Incident>(crate::store::INCIDENTS_TREE, id) {
        Ok(Some(mut inc)) => {
            if !inc.executions.contains(&e.id) {
                inc.executions.push(e.id.clone());
            }
            inc.hold_until = Some(inc.hold_until.map_or(hold, |h| h.max(hold)));
            if let Err(err) = store.put_incident(&inc) {
                tracing::error!(incident = %id, error = %err, "cannot link the unfinished execution");
            }
        }
        Ok(None) => {}
        Err(err) => {
            tracing::error!(incident = %id, error = %err, "cannot link the unfinished execution")
        }
    }
}

/// Measures each unfinished execution once its verification window is
/// over: an interrupted one is recorded with its measurement (no outcome
/// record, so nothing is learned from it); a verifying one goes to
/// Knowledge as a finished execution (recorded and learned as usual).
async fn recover(
    unfinished: Vec<Unfinished>,
    store: KnowledgeStore,
    probe: Arc<dyn EvidenceProbe>,
    clock: SharedClock,
    window: Duration,
    knowledge: crate::mailbox::PhasePort<crate::messages::ExecutionFinished>,
) {
    let runs = unfinished.into_iter().map(|Unfinished { mut exec, verifying }| {
        let (store, probe, clock, knowledge) =
            (store.clone(), probe.clone(), clock.clone(), knowledge.clone());
        async move {
            // A verification goes on for the rest of its window, counted
            // from the last completed action; a re-measure waits a whole
            // window from the restart.
            let wait = if verifying {
                let acted = exec
                    .actions
                    .iter()
                    .filter_map(|a| a.finished_at)
                    .max()
                    .unwrap_or(exec.started_at);
                let spent = (clock.now() - acted).to_std().unwrap_or_default();
                window.saturating_sub(spent)
            } else {
                window
            };
            tokio::time::sleep(wait).await;
            let policy = store.get_policy(&exec.policy_id).ok().flatten();
            let after = match &policy {
                Some(p) => match probe.count_violations(&p.scope).await {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::warn!(execution = %exec.id, error = %e, "no evidence for the re-measure; outcome UNKNOWN");
                        None
                    }
                },
                None => None,
            };
            exec.violations_after = after;
            exec.outcome = Some(crate::knowledge::classify(exec.violations_before, after));
            exec.finished_at = Some(clock.now());
            tracing::info!(
                execution = %exec.id, verifying, before = ?exec.violations_before, after = ?after,
                outcome = exec.outcome.map(|o| o.as_str()).unwrap_or("none"),
                "unfinished execution re-measured after the restart"
            );
            match (verifying, policy) {
                (true, Some(policy)) => {
                    let mut chain = crate::messages::ChainTrace::start(clock.now());
                    chain.chain_id = exec.chain_id.clone();
                    let msg = crate::messages::ExecutionFinished {
                        chain,
                        execution: exec,
                        policy,
                    };
                    if let Err(e) = knowledge.send(msg).await {
                        tracing::error!(error = %e, "the re-armed verification could not reach knowledge");
                    }
                }
                _ => {
                    if let Err(e) = store.put_execution_async(&exec).await {
                        tracing::error!(execution = %exec.id, error = %e, "cannot record the re-measure");
                    }
                }
            }
        }
    });
    futures::future::join_all(runs).await;
}

/// Creates every bounded-label series at zero, so dashboards and alerts
/// see a value (not an absent series) before the first event.
/// The messages (and timer callbacks) each phase actor handles, as they
/// are labelled in `mape_k_actor_messages_handled`.
const HANDLED: [(ActorKind, &[&str]); 5] = [
    (
        ActorKind::Monitor,
        &[
            "Observe",
            "Tick",
            "PollResult",
            "GetSources",
            "GetActiveViolations",
            "GetViolations",
            "MeasureNow",
        ],
    ),
    (
        ActorKind::Analyzer,
        &["ViolationsDetected", "ReportAll", "GetAnalyses"],
    ),
    (
        ActorKind::Planner,
        &[
            "AnalysisReady",
            "DecidePolicy",
            "ActionsDone",
            "ExecutionFinished",
            "KnowledgeUpdated",
            "AdmissionWakeup",
            "SafetyTick",
            "GetIncidents",
            "GetIncident",
            "Pause",
            "Resume",
            "ClearComponent",
            "SilenceComponent",
            "GetSafety",
            "GetShadowReport",
            "LeadershipChanged",
        ],
    ),
    (ActorKind::Executor, &["PolicyApproved", "Drain"]),
    (
        ActorKind::Knowledge,
        &[
            "RecordAnalysis",
            "RecordPolicy",
            "RecordExecution",
            "ExecutionFinished",
            "ReclassifyOutcome",
            "FlushKnowledge",
        ],
    ),
];

fn init_series(m: &Metrics) {
    use crate::metrics::{ActorLabels, ActorMessageLabels, KindLabels, PhaseLabels, StatusLabels};
    for kind in ActorKind::ALL {
        let actor = ActorLabels {
            actor: kind.as_str(),
        };
        m.mailbox_depth.get_or_create(&actor).set(0);
        m.restarts.get_or_create(&actor).inc_by(0);
    }
    // Every message each phase handles: its handled and duration series
    // exist at zero from the start, so a dashboard shows a line for an idle
    // actor too.
    for (actor, messages) in HANDLED {
        for message in messages {
            let labels = ActorMessageLabels {
                actor: actor.as_str(),
                message,
            };
            m.messages_handled.get_or_create(&labels).inc_by(0);
            drop(m.handler_duration.get_or_create(&labels));
        }
    }
    for (actor, message) in [
        (ActorKind::Analyzer, "ViolationsDetected"),
        (ActorKind::Planner, "AnalysisReady"),
        (ActorKind::Planner, "KnowledgeUpdated"),
        (ActorKind::Knowledge, "RecordAnalysis"),
    ] {
        m.messages_shed
            .get_or_create(&ActorMessageLabels {
                actor: actor.as_str(),
                message,
            })
            .inc_by(0);
    }
    for kind in ["temporal", "spatial", "causal", "frequency"] {
        m.patterns_detected
            .get_or_create(&KindLabels { kind })
            .inc_by(0);
    }
    for status in ["COMPLETED", "FAILED", "ROLLED_BACK"] {
        m.policy_executions
            .get_or_create(&StatusLabels { status })
            .inc_by(0);
    }
    for o in crate::model::OutcomeType::ALL {
        m.outcomes
            .get_or_create(&StatusLabels { status: o.as_str() })
            .inc_by(0);
    }
    for phase in ["detection", "analysis", "planning", "execution"] {
        drop(m.phase_duration.get_or_create(&PhaseLabels { phase }));
    }
}

impl LoopSupervisor {
    fn escalate(&mut self, why: String) {
        tracing::error!(reason = %why, "restart intensity exceeded; stopping mapek");
        self.exit.set(why.clone());
        if let Some(h) = &self.handle {
            let now = chrono::Utc::now();
            h.state.update(now, |s| {
                s.is_running = false;
                s.error = Some(why);
            });
            let _ = h.store.flush();
        }
        System::current().stop_with_code(ESCALATION_EXIT_CODE);
    }
}

impl Actor for LoopSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.inbox.started();
        // An actor that died outside the panic guard cannot be restarted:
        // that is an escalation too.
        ctx.run_interval(Duration::from_secs(1), |act, _ctx| {
            let Some(h) = &act.handle else { return };
            h.monitor.refresh_up_gauge();
            h.analyzer.refresh_up_gauge();
            h.planner.refresh_up_gauge();
            h.executor.refresh_up_gauge();
            h.knowledge.refresh_up_gauge();
            let dead: Vec<ActorKind> = h
                .phases_connected()
                .into_iter()
                .filter(|(k, up)| !up && *k != ActorKind::Supervisor)
                .map(|(k, _)| k)
                .collect();
            if let Some(k) = dead.first() {
                act.escalate(format!("actor `{k}` stopped and cannot be restarted"));
            }
        });
    }
}

impl Handler<ActorRestarted> for LoopSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ActorRestarted, _ctx: &mut Context<Self>) {
        let _timer = self.inbox.received("ActorRestarted");
        let now = Instant::now();
        let period = Duration::from_secs(self.settings.restart_period_seconds);
        let h = self.history.entry(msg.actor).or_default();
        h.push_back(now);
        while h.front().is_some_and(|t| now.duration_since(*t) > period) {
            h.pop_front();
        }
        let n = h.len();
        if n as u64 > u64::from(self.settings.max_restarts) {
            self.escalate(format!(
                "actor `{}` restarted {n} times within {} s (orchestrator.max_restarts = {})",
                msg.actor, self.settings.restart_period_seconds, self.settings.max_restarts
            ));
        }
    }
}

impl Handler<Shutdown> for LoopSupervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        let handle = self.handle.clone();
        Box::pin(
            async move {
                if let Some(h) = handle {
                    // No new remedies from now on; let a running one finish
                    // (actions, verification, record) for a bounded time.
                    h.state.update(chrono::Utc::now(), |s| s.is_running = false);
                    tracing::info!(grace_seconds = SHUTDOWN_GRACE.as_secs(), "shutting down: letting a running execution finish");
                    match tokio::time::timeout(SHUTDOWN_GRACE, h.executor.send(Drain)).await {
                        Ok(_) => tracing::info!("executor drained"),
                        Err(_) => tracing::warn!(
                            "an execution is still running; it will be recorded as interrupted at the next start"
                        ),
                    }
                    tracing::info!("shutting down: flushing knowledge");
                    match h.knowledge.send(FlushKnowledge).await {
                        Ok(Ok(n)) => tracing::info!(bytes = n, "knowledge flushed"),
                        Ok(Err(e)) => tracing::error!(error = %e, "knowledge flush failed"),
                        Err(_) => {
                            // Knowledge is down: flush the store directly.
                            if let Err(e) = h.store.flush() {
                                tracing::error!(error = %e, "knowledge flush failed");
                            }
                        }
                    }
                    if let Err(e) = h.store.close() {
                        tracing::error!(error = %e, "closing the knowledge store failed");
                    }
                    h.state.update(chrono::Utc::now(), |s| s.is_running = false);
                }
            }
            .into_actor(self)
            .map(|_, _, _| System::current().stop_with_code(0)),
        )
    }
}
