//! The MAPE-K vocabulary shared by every phase: violations, patterns, root
//! causes, remediation policies, executions and outcomes.
//!
//! These are plain data types (serde-serialisable, no behaviour beyond small
//! helpers) so that the HTTP API, the sled store and the actors all speak the
//! same language.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Wall-clock timestamp used in records (UTC).
pub type Timestamp = DateTime<Utc>;

/// Identifier of one incident chain (violations → analysis → policy →
/// execution → outcome). Carried in every message and log line.
pub type ChainId = String;

/// A fresh, time-ordered identifier with a readable prefix (`pol-…`, `exe-…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// How bad a violation is, as declared by the rule or alert that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Informational; never drives a high priority.
    Info,
    /// Needs attention.
    Warning,
    /// Needs action now.
    Critical,
}

impl Severity {
    /// Parses `critical`, `warning`/`warn`, `info` (case-insensitive).
    pub fn parse(s: &str) -> Option<Severity> {
        match s.to_ascii_lowercase().as_str() {
            "critical" | "page" => Some(Severity::Critical),
            "warning" | "warn" => Some(Severity::Warning),
            "info" | "none" => Some(Severity::Info),
            _ => None,
        }
    }

    /// Lower-case name, as used in labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What kind of symptom a violation is. Inferred from the metric or rule
/// name (see [`Signal::infer`]) unless a rule declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Slow responses (validation latency, request duration).
    Latency,
    /// Too little work done (throughput below target).
    Throughput,
    /// Errors and failed enforcements (failure rate).
    Failure,
    /// Policy violations reported by the managed system.
    Policy,
    /// Nodes down or unhealthy.
    Node,
    /// Connectivity lost between parts of the system.
    Network,
    /// CPU, memory, disk or queue exhaustion.
    Resource,
    /// Anything else.
    Other,
}

impl Signal {
    /// Infers the signal from a metric or rule name by keyword.
    pub fn infer(name: &str) -> Signal {
        let n = name.to_ascii_lowercase();
        let has = |words: &[&str]| words.iter().any(|w| n.contains(w));
        if has(&["policy_violation", "policy"]) {
            Signal::Policy
        } else if has(&["latency", "duration", "response_time"]) {
            Signal::Latency
        } else if has(&["throughput", "ops_per_sec", "requests_per"]) {
            Signal::Throughput
        } else if has(&["failure", "error", "enforcement"]) {
            Signal::Failure
        } else if has(&["node", "replica", "up{", "crash"]) {
            Signal::Node
        } else if has(&["network", "partition", "unreachable"]) {
            Signal::Network
        } else if has(&["cpu", "memory", "disk", "saturation", "queue", "exhaust"]) {
            Signal::Resource
        } else {
            Signal::Other
        }
    }
}

/// One observed breach of a rule: a series returned by a PromQL rule, or a
/// firing Alertmanager alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    /// Unique id of this observation.
    pub id: String,
    /// Stable identity of the breached series (rule + labels, or the
    /// Alertmanager fingerprint): the key for de-duplication.
    pub fingerprint: String,
    /// Name of the rule or alert.
    pub rule: String,
    /// Severity from the rule or the alert's `severity` label.
    pub severity: Severity,
    /// Component the violation is attributed to.
    pub component: String,
    /// Metric name the rule observed (or the alert name).
    pub metric: String,
    /// Observed value (NaN-free; alerts without a value carry 1.0).
    pub value: f64,
    /// All labels of the series or alert.
    pub labels: BTreeMap<String, String>,
    /// Kind of symptom.
    pub signal: Signal,
    /// When the series was first seen breaching (onset of this violation).
    pub first_seen: Timestamp,
    /// When this observation was made.
    pub observed_at: Timestamp,
    /// Which source reported it (`prometheus`, `alertmanager`, ...).
    pub source: String,
}

/// The four detectors of the Analyze phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternKind {
    /// A burst: many violations close together in time.
    Temporal,
    /// Many violations on the same component.
    Spatial,
    /// Latency violations followed by failure/enforcement violations.
    Causal,
    /// An unusually high number of violations in a longer window.
    Frequency,
}

impl PatternKind {
    /// Lower-case name for labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PatternKind::Temporal => "temporal",
            PatternKind::Spatial => "spatial",
            PatternKind::Causal => "causal",
            PatternKind::Frequency => "frequency",
        }
    }
}

/// A pattern found by one detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pattern {
    /// Which detector found it.
    pub kind: PatternKind,
    /// Detector confidence (0..1).
    pub confidence: f64,
    /// Component the pattern is about, when it is about one.
    pub component: Option<String>,
    /// Fingerprints of the violations that make up the pattern.
    pub violations: Vec<String>,
    /// Human-readable explanation.
    pub description: String,
}

/// Root-cause vocabulary of the Analyze phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootCause {
    /// Validation is too slow.
    ValidationLatency,
    /// Not enough capacity for the load.
    InsufficientCapacity,
    /// A policy is wrong.
    PolicyMisconfiguration,
    /// Failures propagate from one part to others.
    CascadeFailure,
    /// The system is unstable (errors without a clearer cause).
    SystemInstability,
    /// A node crashed.
    NodeCrash,
    /// The network is partitioned.
    NetworkPartition,
    /// A resource is exhausted.
    ResourceExhaustion,
    /// Performance degraded without a clearer cause.
    PerformanceDegradation,
    /// Not enough evidence for a diagnosis.
    Unknown,
}

impl RootCause {
    /// Every cause, in tie-break precedence order (more specific first).
    pub const ALL: [RootCause; 10] = [
        RootCause::PolicyMisconfiguration,
        RootCause::NodeCrash,
        RootCause::NetworkPartition,
        RootCause::CascadeFailure,
        RootCause::ValidationLatency,
        RootCause::InsufficientCapacity,
        RootCause::ResourceExhaustion,
        RootCause::SystemInstability,
        RootCause::PerformanceDegradation,
        RootCause::Unknown,
    ];

    /// snake_case name, as in the API (`validation_latency`).
    pub fn as_str(self) -> &'static str {
        match self {
            RootCause::ValidationLatency => "validation_latency",
            RootCause::InsufficientCapacity => "insufficient_capacity",
            RootCause::PolicyMisconfiguration => "policy_misconfiguration",
            RootCause::CascadeFailure => "cascade_failure",
            RootCause::SystemInstability => "system_instability",
            RootCause::NodeCrash => "node_crash",
            RootCause::NetworkPartition => "network_partition",
            RootCause::ResourceExhaustion => "resource_exhaustion",
            RootCause::PerformanceDegradation => "performance_degradation",
            RootCause::Unknown => "unknown",
        }
    }

    /// Parses a snake_case name.
    pub fn parse(s: &str) -> Option<RootCause> {
        RootCause::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Position in the tie-break order (lower wins).
    pub fn precedence(self) -> usize {
        RootCause::ALL
            .iter()
            .position(|c| *c == self)
            .unwrap_or(RootCause::ALL.len())
    }
}

impl fmt::Display for RootCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A ranked root-cause hypothesis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankedCause {
    /// The cause.
    pub cause: RootCause,
    /// Confidence (0..1).
    pub confidence: f64,
    /// Components the cause's evidence is on, most violations first: the
    /// remedy acts on the first and verification measures these.
    #[serde(default)]
    pub components: Vec<String>,
}

/// Output of the Analyze phase for one batch of evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisResult {
    /// Unique id (`ana-…`).
    pub id: String,
    /// Chain this analysis belongs to.
    pub chain_id: ChainId,
    /// When the analysis ran.
    pub analyzed_at: Timestamp,
    /// Patterns found, strongest first.
    pub patterns: Vec<Pattern>,
    /// Root causes, most likely first.
    pub root_causes: Vec<RankedCause>,
    /// Human-readable recommendations.
    pub recommendations: Vec<String>,
    /// `0.7 × mean(pattern confidence) + 0.3 × sample_size_factor`, 0..1.
    pub confidence: f64,
    /// Number of distinct violations in the window.
    pub violation_count: usize,
    /// Highest severity in the window.
    pub max_severity: Option<Severity>,
    /// Components involved, sorted.
    pub components: Vec<String>,
    /// Incident diagnosed (absent for a whole-window analysis).
    #[serde(default)]
    pub incident_id: Option<String>,
}

/// The action catalogue of the Plan phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActionType {
    /// Add replicas.
    ScaleUp,
    /// Remove replicas.
    ScaleDown,
    /// Restart the service.
    RestartService,
    /// Apply a (corrected) policy.
    ApplyPolicy,
    /// Bypass validation for a while.
    BypassValidation,
    /// Rate-limit requests.
    ThrottleRequests,
    /// Enter emergency-override mode for a while.
    ActivateEmergencyOverride,
    /// Rebalance load across nodes.
    RebalanceLoad,
    /// Change configuration.
    UpdateConfiguration,
    /// Fail over to a standby.
    Failover,
}

impl ActionType {
    /// The whole catalogue.
    pub const ALL: [ActionType; 10] = [
        ActionType::ScaleUp,
        ActionType::ScaleDown,
        ActionType::RestartService,
        ActionType::ApplyPolicy,
        ActionType::BypassValidation,
        ActionType::ThrottleRequests,
        ActionType::ActivateEmergencyOverride,
        ActionType::RebalanceLoad,
        ActionType::UpdateConfiguration,
        ActionType::Failover,
    ];

    /// SCREAMING_SNAKE_CASE name (`SCALE_UP`).
    pub fn as_str(self) -> &'static str {
        match self {
            ActionType::ScaleUp => "SCALE_UP",
            ActionType::ScaleDown => "SCALE_DOWN",
            ActionType::RestartService => "RESTART_SERVICE",
            ActionType::ApplyPolicy => "APPLY_POLICY",
            ActionType::BypassValidation => "BYPASS_VALIDATION",
            ActionType::ThrottleRequests => "THROTTLE_REQUESTS",
            ActionType::ActivateEmergencyOverride => "ACTIVATE_EMERGENCY_OVERRIDE",
            ActionType::RebalanceLoad => "REBALANCE_LOAD",
            ActionType::UpdateConfiguration => "UPDATE_CONFIGURATION",
            ActionType::Failover => "FAILOVER",
        }
    }

    /// Parses the SCREAMING_SNAKE_CASE name (case-insensitive).
    pub fn parse(s: &str) -> Option<ActionType> {
        ActionType::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
    }

    /// Risk of the action on its own.
    pub fn risk(self) -> RiskLevel {
        match self {
            ActionType::ScaleUp | ActionType::ScaleDown | ActionType::RebalanceLoad => {
                RiskLevel::Low
            }
            ActionType::RestartService
            | ActionType::ApplyPolicy
            | ActionType::ThrottleRequests
            | ActionType::UpdateConfiguration => RiskLevel::Medium,
            ActionType::BypassValidation
            | ActionType::ActivateEmergencyOverride
            | ActionType::Failover => RiskLevel::High,
        }
    }
}

impl fmt::Display for ActionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Priority of a remediation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Priority {
    /// Can wait.
    Low,
    /// Normal.
    Medium,
    /// Soon.
    High,
    /// Now.
    Critical,
}

/// How risky a policy is; decides whether it may be auto-approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RiskLevel {
    /// Easily undone, little blast radius.
    Low,
    /// Changes behaviour; undoable.
    Medium,
    /// May hurt if wrong; a person should look first by default.
    High,
}

/// The undo step of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackStep {
    /// Action type that undoes the original.
    pub action_type: ActionType,
    /// Its parameters.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// What undoing means, for people.
    pub description: String,
}

/// One step of a remediation policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemediationAction {
    /// Id unique within the policy (`a1`, `a2`, ...).
    pub id: String,
    /// What to do.
    pub action_type: ActionType,
    /// Component to act on.
    pub target: String,
    /// Action parameters (replicas, rate_limit, duration_seconds, ...).
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Priority.
    pub priority: Priority,
    /// Catalogue cost of this action (0..1).
    pub cost: f64,
    /// Ids of actions in the same policy that must complete first.
    pub depends_on: Vec<String>,
    /// How to undo it; `None` for actions that cannot be undone (restart).
    pub rollback: Option<RollbackStep>,
}

/// Approval state of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalStatus {
    /// Waiting for a decision.
    Pending,
    /// Approved (by a person or by auto-approval); sent to the Executor.
    Approved,
    /// Rejected by a person.
    Rejected,
    /// Its incident closed or was diagnosed again before a decision: it
    /// can no longer be approved.
    Superseded,
}

impl ApprovalStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Rejected => "rejected",
            ApprovalStatus::Superseded => "superseded",
        }
    }

    /// Parses a lower-case name.
    pub fn parse(s: &str) -> Option<ApprovalStatus> {
        match s {
            "pending" => Some(ApprovalStatus::Pending),
            "approved" => Some(ApprovalStatus::Approved),
            "rejected" => Some(ApprovalStatus::Rejected),
            "superseded" => Some(ApprovalStatus::Superseded),
            _ => None,
        }
    }
}

/// Who decided about a policy, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalDecision {
    /// The decision.
    pub status: ApprovalStatus,
    /// `auto` for auto-approval, otherwise the operator's name.
    pub by: String,
    /// When.
    pub at: Timestamp,
    /// Optional reason.
    pub reason: Option<String>,
}

/// A remediation policy proposed by the Planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemediationPolicy {
    /// Unique id (`pol-…`).
    pub id: String,
    /// Chain it belongs to.
    pub chain_id: ChainId,
    /// Analysis it was planned from.
    pub analysis_id: String,
    /// When it was planned.
    pub created_at: Timestamp,
    /// The cause it addresses.
    pub root_cause: RootCause,
    /// Confidence of that cause.
    pub root_cause_confidence: f64,
    /// Steps, in a valid dependency order.
    pub actions: Vec<RemediationAction>,
    /// What the policy should achieve.
    pub expected_impact: String,
    /// Highest risk among its actions.
    pub risk_level: RiskLevel,
    /// Highest priority among its actions.
    pub priority: Priority,
    /// Mean catalogue cost of its actions (0..1).
    pub cost_estimate: f64,
    /// Expected benefit (0..0.95), from confidence and learned success.
    pub benefit_estimate: f64,
    /// `benefit_estimate − cost_estimate`.
    pub score: f64,
    /// Current approval status.
    pub approval_status: ApprovalStatus,
    /// Decisions taken so far (audit trail).
    pub decisions: Vec<ApprovalDecision>,
    /// Violations counted when planned (the "before" of verification).
    pub violations_at_planning: usize,
    /// Components in scope (violations counted for verification).
    pub scope: Vec<String>,
    /// Incident it remedies.
    #[serde(default)]
    pub incident_id: Option<String>,
    /// Which remedy of its incident this is (1 for the first): with the
    /// incident id and the action id it makes the idempotency key
    /// `incident/attempt/action`, the same on a restart or another replica.
    #[serde(default)]
    pub attempt: u32,
    /// Every safety guard's decision about this policy (pause, budget,
    /// rate limit, breaker, flapping, silence, mode, queue timeout), in order.
    #[serde(default)]
    pub guards: Vec<GuardDecision>,
    /// Why it was (or was not) approved without a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autonomy: Option<AutonomyVerdict>,
    /// The remedies it was chosen among (learning), with what was sampled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<CandidateRemedy>,
    /// Cluster mode: the shard its incident belongs to (that of the
    /// incident's root component when it was first planned; it stays
    /// there): only that shard's leader admits it, and every action is
    /// fenced on it. `None` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
}

/// One decision of a safety guard about a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardDecision {
    /// The guard (`pause`, `disruption_budget`, `component_rate_limit`,
    /// `breaker`, `flapping`, `silence`, `mode`, `queue_timeout`).
    pub guard: String,
    /// What it decided (`held`, `admitted`, `escalated`, `dry_run`, `shadow`, `trial`).
    pub decision: String,
    /// Why, in words.
    pub reason: String,
    /// When.
    pub at: Timestamp,
}

/// Why a policy was or was not approved without a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutonomyVerdict {
    /// `fixed` (by risk level) or `earned` (by evidence).
    pub mode: String,
    /// Whether it was auto-approved.
    pub auto_approved: bool,
    /// Why.
    pub reason: String,
}

/// A remedy the learner considered for a policy's cause.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateRemedy {
    /// The remedy: its action types joined by `+`.
    pub remedy: String,
    /// The value drawn from its posterior (success probability).
    pub sampled: f64,
    /// Successes learned for (cause, remedy).
    pub successes: u64,
    /// Failures learned for (cause, remedy).
    pub failures: u64,
    /// Whether it was chosen.
    pub chosen: bool,
    /// Why it was not eligible (an open breaker), if it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

/// Status of an execution or of one action in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecutionStatus {
    /// Not started.
    Pending,
    /// Running.
    InProgress,
    /// Done.
    Completed,
    /// Failed, nothing to undo (or undo failed).
    Failed,
    /// Failed and the completed steps were undone.
    RolledBack,
    /// Executed against the recorder (`safety.mode: dry_run`): nothing
    /// left mapek.
    DryRun,
    /// mapek stopped (crashed, was killed) while this ran: a call that was
    /// under way may or may not have been applied. Never re-sent.
    Unknown,
}

impl ExecutionStatus {
    /// SCREAMING_SNAKE_CASE name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Pending => "PENDING",
            ExecutionStatus::InProgress => "IN_PROGRESS",
            ExecutionStatus::Completed => "COMPLETED",
            ExecutionStatus::Failed => "FAILED",
            ExecutionStatus::RolledBack => "ROLLED_BACK",
            ExecutionStatus::DryRun => "DRY_RUN",
            ExecutionStatus::Unknown => "UNKNOWN",
        }
    }
}

/// Record of one action's execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionExecution {
    /// Action id within the policy.
    pub action_id: String,
    /// Action type.
    pub action_type: ActionType,
    /// Effector that carried it out.
    pub effector: String,
    /// Final status.
    pub status: ExecutionStatus,
    /// Attempts made (1 + retries).
    pub attempts: u32,
    /// Start.
    pub started_at: Option<Timestamp>,
    /// End.
    pub finished_at: Option<Timestamp>,
    /// What the effector answered (or its output).
    pub result: Option<serde_json::Value>,
    /// Error, if it failed.
    pub error: Option<String>,
    /// Whether its rollback ran, and how it ended.
    pub rollback: Option<String>,
    /// What was sent: the action with its parameters, the idempotency
    /// key among them (journaled before the call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
}

/// Outcome classes of Knowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutcomeType {
    /// No violations left.
    Success,
    /// More than half resolved.
    Partial,
    /// Half or less resolved.
    Ineffective,
    /// More violations than before.
    Degradation,
    /// No evidence to judge.
    Unknown,
    /// Judged a success, then its symptoms came back within
    /// `safety.recurrence_window_seconds`: counts as a failure.
    Recurred,
}

impl OutcomeType {
    /// Every outcome type.
    pub const ALL: [OutcomeType; 6] = [
        OutcomeType::Success,
        OutcomeType::Partial,
        OutcomeType::Ineffective,
        OutcomeType::Degradation,
        OutcomeType::Unknown,
        OutcomeType::Recurred,
    ];

    /// SCREAMING_SNAKE_CASE name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeType::Success => "SUCCESS",
            OutcomeType::Partial => "PARTIAL",
            OutcomeType::Ineffective => "INEFFECTIVE",
            OutcomeType::Degradation => "DEGRADATION",
            OutcomeType::Unknown => "UNKNOWN",
            OutcomeType::Recurred => "RECURRED",
        }
    }

    /// Success confidence attached to the class.
    pub fn confidence(self) -> f64 {
        match self {
            OutcomeType::Success => 0.95,
            OutcomeType::Partial => 0.70,
            OutcomeType::Ineffective => 0.40,
            OutcomeType::Degradation => 0.0,
            OutcomeType::Unknown => 0.5,
            OutcomeType::Recurred => 0.1,
        }
    }

    /// Whether the outcome counts as a success for learning (SUCCESS or PARTIAL).
    pub fn is_success(self) -> bool {
        matches!(self, OutcomeType::Success | OutcomeType::Partial)
    }
}

/// Durations of the phases of one chain, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChainTimings {
    /// Observation to violations handed to the Analyzer.
    pub detection_seconds: f64,
    /// Analysis.
    pub analysis_seconds: f64,
    /// Planning (including approval wait for auto-approved policies).
    pub planning_seconds: f64,
    /// Executing actions and verifying.
    pub execution_seconds: f64,
    /// From detection to recorded outcome.
    pub total_seconds: f64,
    /// The chain ran past `max_cycle_time` and was cut off.
    pub cut_off: bool,
}

/// Record of one policy execution (audit trail).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyExecution {
    /// Unique id (`exe-…`).
    pub id: String,
    /// Policy executed.
    pub policy_id: String,
    /// Chain.
    pub chain_id: ChainId,
    /// Root cause addressed.
    pub root_cause: RootCause,
    /// Final status.
    pub status: ExecutionStatus,
    /// Per-action records, in execution order.
    pub actions: Vec<ActionExecution>,
    /// Start.
    pub started_at: Timestamp,
    /// End (after verification).
    pub finished_at: Option<Timestamp>,
    /// Fraction of actions completed (0..1).
    pub success_rate: f64,
    /// Error summary, when it failed.
    pub error: Option<String>,
    /// Violations in scope before acting.
    pub violations_before: Option<usize>,
    /// Violations in scope after the verification window.
    pub violations_after: Option<usize>,
    /// Outcome class.
    pub outcome: Option<OutcomeType>,
    /// Phase timings of the chain.
    pub timings: ChainTimings,
    /// Incident it remedies.
    #[serde(default)]
    pub incident_id: Option<String>,
    /// mapek stopped while this execution acted: it was re-measured after
    /// the restart and its outcome is kept out of learning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// Cluster mode: the `incident/attempt` its idempotency keys use when
    /// they differ from its own (a previous leader named the incident
    /// first, see `incident-claims/` in the cluster documentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acted_as: Option<String>,
}

/// Outcome of an execution, as learned by Knowledge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyOutcome {
    /// Execution it judges.
    pub execution_id: String,
    /// Policy.
    pub policy_id: String,
    /// Cause addressed.
    pub root_cause: RootCause,
    /// Action types of the policy.
    pub actions: Vec<ActionType>,
    /// When the policy was executed.
    pub executed_at: Timestamp,
    /// Class.
    pub outcome_type: OutcomeType,
    /// Violations before.
    pub violations_before: Option<usize>,
    /// Violations after.
    pub violations_after: Option<usize>,
    /// before − after, floored at 0.
    pub violations_resolved: usize,
    /// Seconds from the start of execution to the verification.
    pub time_to_effect_seconds: f64,
    /// Confidence of the class.
    pub success_confidence: f64,
}

/// Learned statistics of one action type (overall, or for one root cause).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActionStats {
    /// Executions with a recorded outcome.
    pub executions: u64,
    /// Outcomes that were SUCCESS or PARTIAL.
    pub successes: u64,
    /// `successes / executions` (0 when there are none).
    pub success_rate: f64,
    /// Mean seconds from acting to the verified effect.
    pub mean_time_to_effect_seconds: f64,
    /// Mean violations resolved per execution.
    pub mean_violations_resolved: f64,
    /// How much to trust the rate: `min(1, executions / saturation)`.
    pub confidence: f64,
    /// Outcomes counted by class (`SUCCESS` → n).
    pub outcomes: BTreeMap<OutcomeType, u64>,
}

/// Everything Knowledge has learned, per action and per (root cause, action).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LearnedStats {
    /// Per action type.
    pub by_action: BTreeMap<ActionType, ActionStats>,
    /// Per root cause, then per action type.
    pub by_cause: BTreeMap<RootCause, BTreeMap<ActionType, ActionStats>>,
    /// Outcomes recorded in all.
    pub outcomes_recorded: u64,
    /// Per root cause, then per remedy (action types joined by `+`, in
    /// order): the evidence the learner samples from.
    #[serde(default)]
    pub by_remedy: BTreeMap<RootCause, BTreeMap<String, RemedyStats>>,
}

/// Judged episodes of one remedy against one cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RemedyStats {
    /// SUCCESS or PARTIAL outcomes (not re-classified).
    pub successes: u64,
    /// INEFFECTIVE, DEGRADATION or RECURRED outcomes.
    pub failures: u64,
}

impl LearnedStats {
    /// Statistics of `action` when used against `cause`, if any were recorded.
    pub fn get(&self, cause: RootCause, action: ActionType) -> Option<&ActionStats> {
        self.by_cause.get(&cause).and_then(|m| m.get(&action))
    }

    /// Judged episodes of `remedy` (see [`remedy_key`]) against `cause`.
    pub fn remedy(&self, cause: RootCause, remedy: &str) -> RemedyStats {
        self.by_remedy
            .get(&cause)
            .and_then(|m| m.get(remedy))
            .copied()
            .unwrap_or_default()
    }
}

/// The name of a remedy: its action types in order, joined by `+`.
pub fn remedy_key(actions: &[ActionType]) -> String {
    actions
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join("+")
}

/// A rule extracted from the learned statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearningInsight {
    /// Short title.
    pub title: String,
    /// Root cause it is about, if any.
    pub root_cause: Option<RootCause>,
    /// Action it is about, if any.
    pub action: Option<ActionType>,
    /// Confidence (sample-size based), 0..1.
    pub confidence: f64,
    /// What to do about it.
    pub recommendations: Vec<String>,
    /// When it was generated.
    pub generated_at: Timestamp,
}

/// Lifecycle of an incident (the unit of work of the loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentState {
    /// Violations are active; nothing is planned yet (below the plan
    /// threshold, or no actionable diagnosis yet).
    Open,
    /// A policy waits for a person's approval.
    Pending,
    /// An approved policy waits in the admission queue.
    Queued,
    /// A remedy's actions are running.
    Acting,
    /// The remedy ran; the verification window is open.
    Verifying,
    /// Verified; the incident's components rest before another remedy.
    CoolingDown,
    /// Handed to a person: no actionable diagnosis, no component, or no
    /// effector owns the component.
    Escalated,
    /// A source behind the incident stopped giving evidence: nothing is
    /// planned until it answers again (the incident is never closed for it).
    NoEvidence,
    /// mapek will not act on it now: a safety mode recorded what it would
    /// do (dry run, shadow) or an operator silenced its component (see
    /// `reason`). Paused remedies stay `queued`, with the pause as reason.
    Held,
    /// Over; see [`CloseReason`].
    Closed,
}

impl IncidentState {
    /// Every state, for metrics.
    pub const ALL: [IncidentState; 10] = [
        IncidentState::Open,
        IncidentState::Pending,
        IncidentState::Queued,
        IncidentState::Acting,
        IncidentState::Verifying,
        IncidentState::CoolingDown,
        IncidentState::Escalated,
        IncidentState::NoEvidence,
        IncidentState::Held,
        IncidentState::Closed,
    ];

    /// snake_case name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentState::Open => "open",
            IncidentState::Pending => "pending",
            IncidentState::Queued => "queued",
            IncidentState::Acting => "acting",
            IncidentState::Verifying => "verifying",
            IncidentState::CoolingDown => "cooling_down",
            IncidentState::Escalated => "escalated",
            IncidentState::NoEvidence => "no_evidence",
            IncidentState::Held => "held",
            IncidentState::Closed => "closed",
        }
    }

    /// Parses a snake_case name.
    pub fn parse(s: &str) -> Option<IncidentState> {
        IncidentState::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Why an incident closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Its violations ended after a remedy ran.
    Remedied,
    /// Its violations ended without any remedy.
    ResolvedWithoutAction,
    /// Its violations aged out of the window (dropped at its bound).
    Expired,
    /// It joined an older incident (see `merged_into`).
    Merged,
}

/// One diagnosis of an incident (kept as its history changes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// Analysis record it comes from.
    pub analysis_id: String,
    /// When.
    pub at: Timestamp,
    /// Most likely cause (`unknown` without patterns).
    pub cause: RootCause,
    /// Its confidence.
    pub confidence: f64,
    /// Components of the cause, the remedy's target first.
    pub components: Vec<String>,
    /// Patterns found.
    pub patterns: Vec<PatternKind>,
    /// Violations in the incident then.
    pub violation_count: usize,
}

/// An incident: violations on one component, or on components joined by a
/// direct edge of the topology with onsets close together, diagnosed,
/// remedied and verified as one unit of work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// Content-derived id (`inc-` + hash of the first violation's
    /// fingerprint and onset): the same after a restart or on a replica.
    pub id: String,
    /// Lifecycle state.
    pub state: IncidentState,
    /// Why it closed (when closed).
    #[serde(default)]
    pub close_reason: Option<CloseReason>,
    /// The incident it merged into (when closed as merged).
    #[serde(default)]
    pub merged_into: Option<String>,
    /// Onset of its first violation.
    pub opened_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// When it closed.
    #[serde(default)]
    pub closed_at: Option<Timestamp>,
    /// Components involved, sorted.
    pub components: Vec<String>,
    /// Upstream component (where a cascade started; else the component
    /// with the most violations).
    #[serde(default)]
    pub root_component: Option<String>,
    /// Highest severity among its violations.
    #[serde(default)]
    pub severity: Option<Severity>,
    /// Violations active in it.
    pub violation_count: usize,
    /// Member fingerprints (the first [`INCIDENT_FINGERPRINTS_KEPT`]).
    pub fingerprints: Vec<String>,
    /// Latest diagnosis.
    #[serde(default)]
    pub diagnosis: Option<Diagnosis>,
    /// Earlier diagnoses, oldest first (bounded).
    #[serde(default)]
    pub diagnoses: Vec<Diagnosis>,
    /// Policies planned for it.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Executions run for it.
    #[serde(default)]
    pub executions: Vec<String>,
    /// Outcome of its latest verified execution.
    #[serde(default)]
    pub outcome: Option<OutcomeType>,
    /// Why it is escalated / without evidence / waiting (for people).
    #[serde(default)]
    pub reason: Option<String>,
    /// Its components rest until then after a remedy (kept across a
    /// restart).
    #[serde(default)]
    pub hold_until: Option<Timestamp>,
    /// Remedies admitted so far (the `attempt` of the idempotency key
    /// `incident/attempt/action`; counted at admission, so an interrupted
    /// execution is never reused).
    #[serde(default)]
    pub attempts: u32,
    /// The execution whose success this incident's return re-classified
    /// as RECURRED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrence_of: Option<String>,
    /// What mapek would have done in shadow mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowPlan>,
    /// Why it is escalated (the escalation alert's `reason`), while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<crate::ports::EscalationKind>,
    /// A hand-off to people that lasts until the diagnosis changes, the
    /// incident closes or an operator clears its component (a queue
    /// timeout, a remedy larger than a budget, a rejection); kept so a
    /// restart does not plan it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_off: Option<HandOff>,
    /// Cluster mode: the shard it belongs to, that of its root component
    /// when it was first planned; it stays there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
}

/// A lasting hand-off of an incident to people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandOff {
    /// Why (the escalation reason).
    pub kind: crate::ports::EscalationKind,
    /// Why, in words.
    pub reason: String,
}

/// A remedy planned in shadow mode and never run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowPlan {
    /// The policy recorded.
    pub policy_id: String,
    /// Its cause.
    pub cause: RootCause,
    /// Its remedy (action types joined by `+`).
    pub remedy: String,
    /// Whether it would have been auto-approved.
    pub auto_approved: bool,
    /// When.
    pub at: Timestamp,
}

/// Member fingerprints kept on an incident record (the count is exact).
pub const INCIDENT_FINGERPRINTS_KEPT: usize = 100;

/// Earlier diagnoses kept on an incident record.
pub const INCIDENT_DIAGNOSES_KEPT: usize = 20;

/// Content-derived incident id: FNV-1a (64 bit) of the first violation's
/// fingerprint and onset (milliseconds), so every process computes the same.
pub fn incident_id(fingerprint: &str, onset: Timestamp) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let ms = onset.timestamp_millis().to_le_bytes();
    for b in fingerprint
        .as_bytes()
        .iter()
        .chain(b"\x00")
        .chain(ms.iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("inc-{h:016x}")
}

/// What happened to an incident in a batch, for the Planner.
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentReport {
    /// Incident id.
    pub id: String,
    /// Onset of its first violation.
    pub opened_at: Timestamp,
    /// Components, sorted.
    pub components: Vec<String>,
    /// Upstream component of a cascade, else the one with most violations.
    pub root_component: Option<String>,
    /// Highest severity.
    pub severity: Option<Severity>,
    /// Violations in it.
    pub violation_count: usize,
    /// First member fingerprints by onset (at most
    /// [`INCIDENT_FINGERPRINTS_KEPT`]).
    pub fingerprints: Vec<String>,
    /// The diagnosis: present when it changed, and in a full report.
    pub analysis: Option<AnalysisResult>,
    /// Whether the diagnosis changed (only then is it recorded).
    pub diagnosis_changed: bool,
    /// Whether a source behind it gives no evidence now.
    pub no_evidence: bool,
    /// Closed in this batch, and why (`merged_into` for merges).
    pub closed: Option<(CloseReason, Option<String>)>,
}
