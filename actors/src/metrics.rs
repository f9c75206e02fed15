//! Metrics of the loop and of its actors (prometheus-client).
//!
//! One [`Metrics`] value is shared by every actor; the daemon registers it in
//! its registry and serves it on `/metrics`. Label values are bounded: actor
//! and message names, phases, statuses, effector and source names — never ids.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// The actors of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorKind {
    /// Monitor phase.
    Monitor,
    /// Analyze phase.
    Analyzer,
    /// Plan phase.
    Planner,
    /// Execute phase.
    Executor,
    /// Knowledge phase.
    Knowledge,
    /// The supervisor of the phases.
    Supervisor,
}

impl ActorKind {
    /// Every actor.
    pub const ALL: [ActorKind; 6] = [
        ActorKind::Monitor,
        ActorKind::Analyzer,
        ActorKind::Planner,
        ActorKind::Executor,
        ActorKind::Knowledge,
        ActorKind::Supervisor,
    ];

    /// Lower-case name, as in labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Monitor => "monitor",
            ActorKind::Analyzer => "analyzer",
            ActorKind::Planner => "planner",
            ActorKind::Executor => "executor",
            ActorKind::Knowledge => "knowledge",
            ActorKind::Supervisor => "supervisor",
        }
    }
}

impl std::fmt::Display for ActorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{actor}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActorLabels {
    /// Actor name.
    pub actor: &'static str,
}

/// `{actor, message}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActorMessageLabels {
    /// Actor name.
    pub actor: &'static str,
    /// Message type.
    pub message: &'static str,
}

/// `{phase}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// detection, analysis, planning, execution.
    pub phase: &'static str,
}

/// `{status}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// Execution status or outcome.
    pub status: &'static str,
}

/// `{kind}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Pattern kind.
    pub kind: &'static str,
}

/// `{effector, result}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EffectorLabels {
    /// Effector name.
    pub effector: String,
    /// ok, transient_error, rejected, timeout.
    pub result: &'static str,
}

/// `{source}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Source name.
    pub source: String,
}

/// `{source, result}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceResultLabels {
    /// Source name.
    pub source: String,
    /// ok or error.
    pub result: &'static str,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.5, 16))
}

/// Every metric of the loop. Cheap to share (`Arc<Metrics>`).
#[derive(Debug)]
pub struct Metrics {
    /// Messages waiting in each actor's mailbox.
    pub mailbox_depth: Family<ActorLabels, Gauge>,
    /// Messages handled, by actor and message type.
    pub messages_handled: Family<ActorMessageLabels, Counter>,
    /// Time spent in handlers.
    pub handler_duration: Family<ActorMessageLabels, Histogram, fn() -> Histogram>,
    /// Messages shed (dropped because a mailbox was full) or rejected
    /// (mailbox closed), by receiving actor and message type.
    pub messages_shed: Family<ActorMessageLabels, Counter>,
    /// Restarts of each actor by the supervisor.
    pub restarts: Family<ActorLabels, Counter>,
    /// Whether each actor is running (1) or down (0).
    pub actor_up: Family<ActorLabels, Gauge>,
    /// Monitor iterations (ticks and webhook batches).
    pub iteration: Gauge,
    /// Violations observed (each observation of a breaching series).
    pub violations_detected: Counter,
    /// Violations currently active.
    pub violations_active: Gauge,
    /// Patterns found, by kind.
    pub patterns_detected: Family<KindLabels, Counter>,
    /// Analyses produced.
    pub analyses: Counter,
    /// Policies generated.
    pub policies_generated: Counter,
    /// Policies executed (any status).
    pub policies_executed: Counter,
    /// Executions by final status.
    pub policy_executions: Family<StatusLabels, Counter>,
    /// Outcomes by class.
    pub outcomes: Family<StatusLabels, Counter>,
    /// Share of judged outcomes that were SUCCESS or PARTIAL.
    pub policy_success_rate: Gauge<f64, AtomicU64>,
    /// Chain duration, violations to outcome.
    pub cycle_duration: Histogram,
    /// Phase durations.
    pub phase_duration: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    /// Chains cut off by `max_cycle_time`.
    pub chains_cut_off: Counter,
    /// Alerts received on the webhook.
    pub alerts_received: Counter,
    /// Alerts accepted by the Monitor.
    pub alerts_processed: Counter,
    /// Effector call durations by effector and result.
    pub effector_call_duration: Family<EffectorLabels, Histogram, fn() -> Histogram>,
    /// Source query durations by source and result.
    pub source_query_duration: Family<SourceResultLabels, Histogram, fn() -> Histogram>,
    /// Whether each source currently gives evidence (1) or not (0).
    pub source_up: Family<SourceLabels, Gauge>,
    /// Incidents by state (open ones, plus the closed ones kept).
    pub incidents: Family<StateLabels, Gauge>,
    /// Open incidents in the Analyzer's window.
    pub incidents_open_in_window: Gauge,
    /// Violations dropped because the analysis window was at its bound.
    pub window_dropped: Counter,
    /// Policies waiting in the admission queue.
    pub admission_queue_depth: Gauge,
    /// Execution slots in use (policies acting; verification holds none).
    pub executions_running: Gauge,
    /// 1 while mapek is paused (the kill switch), else 0.
    pub paused: Gauge,
    /// Decisions of the safety guards by guard and decision.
    pub guard_decisions: Family<GuardLabels, Counter>,
    /// Circuit breakers by state (`open`, `half_open`).
    pub breakers: Family<StateLabels, Gauge>,
    /// Disruptive actions still allowed in the budget's window.
    pub disruption_budget_remaining: Gauge,
    /// Seconds the oldest policy in the admission queue has waited.
    pub admission_oldest_wait_seconds: Gauge,
    /// Escalations to people by reason.
    pub escalations: Family<ReasonLabels, Counter>,
    /// Incidents escalated now.
    pub escalations_active: Gauge,
    /// Components flapping now.
    pub flapping_components: Gauge,
    /// Components silenced by an operator now.
    pub silenced_components: Gauge,
    /// Outcomes re-classified (SUCCESS that recurred → RECURRED).
    pub outcomes_reclassified: Counter,
    /// Empirical regret of the learner per cause.
    pub learning_regret: Family<CauseLabels, Gauge<f64, AtomicU64>>,
}

/// `{guard, decision}` of a safety guard's decision.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuardLabels {
    /// The guard.
    pub guard: &'static str,
    /// Its decision.
    pub decision: &'static str,
}

/// `{reason}` of an escalation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

/// `{cause}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    /// Root cause.
    pub cause: &'static str,
}

/// Every (guard, decision) the Planner records, so each series exists
/// from zero.
const GUARD_DECISIONS: [(&str, &str); 14] = [
    ("pause", "held"),
    ("silence", "held"),
    ("flapping", "escalated"),
    ("breaker", "held"),
    ("breaker", "escalated"),
    ("disruption_budget", "held"),
    ("disruption_budget", "escalated"),
    ("component_rate_limit", "held"),
    ("component_rate_limit", "escalated"),
    ("queue_timeout", "escalated"),
    ("mode", "dry_run"),
    ("mode", "shadow"),
    ("admission", "admitted"),
    ("clear", "cleared"),
];

/// Every escalation reason, so each series exists from zero.
const ESCALATION_KINDS: [crate::ports::EscalationKind; 8] = [
    crate::ports::EscalationKind::NoConfidentCause,
    crate::ports::EscalationKind::UnknownComponent,
    crate::ports::EscalationKind::NoRoute,
    crate::ports::EscalationKind::BreakerOpen,
    crate::ports::EscalationKind::Flapping,
    crate::ports::EscalationKind::BudgetExhausted,
    crate::ports::EscalationKind::QueueTimeout,
    crate::ports::EscalationKind::Rejected,
];

/// `{state}` of an incident.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// Incident state.
    pub state: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, all at zero.
    pub fn new() -> Self {
        let m = Metrics {
            mailbox_depth: Family::default(),
            messages_handled: Family::default(),
            handler_duration: Family::new_with_constructor(seconds_histogram),
            messages_shed: Family::default(),
            restarts: Family::default(),
            actor_up: Family::default(),
            iteration: Gauge::default(),
            violations_detected: Counter::default(),
            violations_active: Gauge::default(),
            patterns_detected: Family::default(),
            analyses: Counter::default(),
            policies_generated: Counter::default(),
            policies_executed: Counter::default(),
            policy_executions: Family::default(),
            outcomes: Family::default(),
            policy_success_rate: Gauge::default(),
            cycle_duration: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            phase_duration: Family::new_with_constructor(seconds_histogram),
            chains_cut_off: Counter::default(),
            alerts_received: Counter::default(),
            alerts_processed: Counter::default(),
            effector_call_duration: Family::new_with_constructor(seconds_histogram),
            source_query_duration: Family::new_with_constructor(seconds_histogram),
            source_up: Family::default(),
            incidents: Family::default(),
            incidents_open_in_window: Gauge::default(),
            window_dropped: Counter::default(),
            admission_queue_depth: Gauge::default(),
            executions_running: Gauge::default(),
            paused: Gauge::default(),
            guard_decisions: Family::default(),
            breakers: Family::default(),
            disruption_budget_remaining: Gauge::default(),
            admission_oldest_wait_seconds: Gauge::default(),
            escalations: Family::default(),
            escalations_active: Gauge::default(),
            flapping_components: Gauge::default(),
            silenced_components: Gauge::default(),
            outcomes_reclassified: Counter::default(),
            learning_regret: Family::default(),
        };
        for state in ["open", "half_open"] {
            m.breakers.get_or_create(&StateLabels { state }).set(0);
        }
        for (guard, decision) in GUARD_DECISIONS {
            let _ = m
                .guard_decisions
                .get_or_create(&GuardLabels { guard, decision });
        }
        for kind in ESCALATION_KINDS {
            let _ = m.escalations.get_or_create(&ReasonLabels {
                reason: kind.as_str(),
            });
        }
        for state in crate::model::IncidentState::ALL {
            m.incidents
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(0);
        }
        m
    }

    /// Registers every metric under its documented name.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mape_k_actor_mailbox_depth",
            "Messages waiting in the actor's mailbox",
            self.mailbox_depth.clone(),
        );
        r.register(
            "mape_k_actor_messages_handled",
            "Messages handled by the actor",
            self.messages_handled.clone(),
        );
        r.register(
            "mape_k_actor_handler_duration_seconds",
            "Time spent in the actor's message handlers",
            self.handler_duration.clone(),
        );
        r.register(
            "mape_k_actor_messages_shed",
            "Messages shed because the receiving mailbox was full or closed",
            self.messages_shed.clone(),
        );
        r.register(
            "mape_k_actor_restarts",
            "Restarts of the actor by the supervisor",
            self.restarts.clone(),
        );
        r.register(
            "mape_k_actor_up",
            "Whether the actor is running (1) or down (0)",
            self.actor_up.clone(),
        );
        r.register(
            "mape_k_iteration",
            "Monitor iterations (ticks and webhook batches)",
            self.iteration.clone(),
        );
        r.register(
            "mape_k_violations_detected",
            "Violation observations",
            self.violations_detected.clone(),
        );
        r.register(
            "mape_k_violations_active",
            "Violations currently active",
            self.violations_active.clone(),
        );
        r.register(
            "mape_k_patterns_detected",
            "Patterns found by the analyzer",
            self.patterns_detected.clone(),
        );
        r.register(
            "mape_k_analyses",
            "Analyses produced",
            self.analyses.clone(),
        );
        r.register(
            "mape_k_policies_generated",
            "Remediation policies generated",
            self.policies_generated.clone(),
        );
        r.register(
            "mape_k_policies_executed",
            "Remediation policies executed",
            self.policies_executed.clone(),
        );
        r.register(
            "mape_k_policy_executions",
            "Policy executions by final status",
            self.policy_executions.clone(),
        );
        r.register(
            "mape_k_outcomes",
            "Verified outcomes by class",
            self.outcomes.clone(),
        );
        r.register(
            "mape_k_policy_success_rate",
            "Share of judged outcomes that were SUCCESS or PARTIAL",
            self.policy_success_rate.clone(),
        );
        r.register(
            "mape_k_cycle_duration_seconds",
            "Duration of a chain from detection to outcome",
            self.cycle_duration.clone(),
        );
        r.register(
            "mape_k_phase_duration_seconds",
            "Duration of each phase of a chain",
            self.phase_duration.clone(),
        );
        r.register(
            "mape_k_chains_cut_off",
            "Chains cut off after max_cycle_time",
            self.chains_cut_off.clone(),
        );
        r.register(
            "mape_k_alerts_received",
            "Alerts received on the Alertmanager webhook",
            self.alerts_received.clone(),
        );
        r.register(
            "mape_k_alerts_processed",
            "Alerts accepted by the Monitor",
            self.alerts_processed.clone(),
        );
        r.register(
            "mape_k_effector_call_duration_seconds",
            "Duration of effector calls",
            self.effector_call_duration.clone(),
        );
        r.register(
            "mape_k_source_query_duration_seconds",
            "Duration of metric source queries",
            self.source_query_duration.clone(),
        );
        r.register(
            "mape_k_source_up",
            "Whether the source gives evidence (1) or not (0)",
            self.source_up.clone(),
        );
        r.register(
            "mape_k_incidents",
            "Incidents by state (closed: those kept in memory)",
            self.incidents.clone(),
        );
        r.register(
            "mape_k_incidents_in_window",
            "Open incidents in the analysis window",
            self.incidents_open_in_window.clone(),
        );
        r.register(
            "mape_k_window_dropped_violations",
            "Violations dropped because the analysis window was full",
            self.window_dropped.clone(),
        );
        r.register(
            "mape_k_admission_queue_depth",
            "Approved policies waiting in the admission queue",
            self.admission_queue_depth.clone(),
        );
        r.register(
            "mape_k_executions_running",
            "Execution slots in use (actions running)",
            self.executions_running.clone(),
        );
        r.register(
            "mape_k_paused",
            "1 while mapek is paused by the kill switch",
            self.paused.clone(),
        );
        r.register(
            "mape_k_guard_decisions",
            "Decisions of the safety guards by guard and decision",
            self.guard_decisions.clone(),
        );
        r.register(
            "mape_k_breakers",
            "Circuit breakers by state (open, half_open)",
            self.breakers.clone(),
        );
        r.register(
            "mape_k_disruption_budget_remaining",
            "Disruptive actions still allowed in the disruption budget's window",
            self.disruption_budget_remaining.clone(),
        );
        r.register(
            "mape_k_admission_oldest_wait_seconds",
            "Seconds the oldest policy in the admission queue has waited",
            self.admission_oldest_wait_seconds.clone(),
        );
        r.register(
            "mape_k_escalations",
            "Incidents escalated to people, by reason",
            self.escalations.clone(),
        );
        r.register(
            "mape_k_escalations_active",
            "Incidents escalated now",
            self.escalations_active.clone(),
        );
        r.register(
            "mape_k_flapping_components",
            "Components flapping now (automatic action stopped)",
            self.flapping_components.clone(),
        );
        r.register(
            "mape_k_silenced_components",
            "Components silenced by an operator now",
            self.silenced_components.clone(),
        );
        r.register(
            "mape_k_outcomes_reclassified",
            "Outcomes re-classified as RECURRED",
            self.outcomes_reclassified.clone(),
        );
        r.register(
            "mape_k_learning_regret",
            "Empirical regret of the learner per cause (episodes x best rate - successes)",
            self.learning_regret.clone(),
        );
    }

    /// Registers the knowledge journal's counters
    /// ([`crate::journal::JournalCounters`], read from
    /// [`crate::store::KnowledgeStore::journal_counters`]).
    pub fn register_journal(r: &mut Registry, c: &crate::journal::JournalCounters) {
        r.register(
            "mape_k_journal_fsyncs",
            "fsyncs of knowledge journal segments (one per group commit)",
            c.fsyncs.clone(),
        );
        r.register(
            "mape_k_journal_records",
            "Records made durable in the knowledge journal",
            c.records.clone(),
        );
        r.register(
            "mape_k_journal_bytes",
            "Bytes appended to the knowledge journal",
            c.bytes.clone(),
        );
        r.register(
            "mape_k_journal_segments_deleted",
            "Knowledge journal segments deleted once applied to sled",
            c.segments_deleted.clone(),
        );
        r.register(
            "mape_k_journal_group_size",
            "Records per knowledge journal group commit",
            c.group_size.clone(),
        );
    }

    /// Observes one phase duration.
    pub fn phase(&self, phase: &'static str, seconds: f64) {
        self.phase_duration
            .get_or_create(&PhaseLabels { phase })
            .observe(seconds);
    }
}

#[cfg(test)]
mod journal_metric_tests {
    use super::*;

    #[test]
    fn journal_counters_are_exposed() {
        let c = crate::journal::JournalCounters::default();
        c.fsyncs.inc();
        c.records.inc_by(3);
        c.group_size.observe(3.0);
        let mut r = Registry::default();
        Metrics::register_journal(&mut r, &c);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(out.contains("mape_k_journal_fsyncs_total 1"), "{out}");
        assert!(out.contains("mape_k_journal_records_total 3"), "{out}");
        assert!(out.contains("mape_k_journal_group_size_count 1"), "{out}");
    }
}
