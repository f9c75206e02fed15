//! Typed messages between the phases.
//!
//! The main flow: `Observe` (sources → Monitor) → [`ViolationsDetected`]
//! (Monitor → Analyzer) → [`AnalysisReady`] (Analyzer → Planner) →
//! [`PolicyApproved`] (Planner or an operator → Executor) →
//! [`ExecutionFinished`] (Executor → Knowledge and Planner). Every message of
//! the flow carries a [`ChainTrace`] so one incident can be followed, and
//! timed, from detection to outcome.

use actix::prelude::*;
use tokio::time::Instant;

use crate::mailbox::Named;
use crate::metrics::ActorKind;
use std::sync::Arc;

use crate::model::{
    AnalysisResult, ApprovalStatus, ChainId, ChainTimings, Incident, IncidentReport, IncidentState,
    LearnedStats, OutcomeType, PolicyExecution, RemediationPolicy, Timestamp, Violation,
};
use crate::ports::SourceError;

macro_rules! named {
    ($($t:ty),* $(,)?) => {
        $(impl Named for $t { const NAME: &'static str = stringify!($t); })*
    };
}

/// Identity and clock of one incident chain.
#[derive(Debug, Clone)]
pub struct ChainTrace {
    /// Chain id, in every log line of the chain.
    pub chain_id: ChainId,
    /// When the chain started (tokio clock, so tests can pause time).
    pub started: Instant,
    /// Wall-clock time of detection.
    pub detected_at: Timestamp,
    /// Phase durations so far.
    pub timings: ChainTimings,
}

impl ChainTrace {
    /// A chain starting now.
    pub fn start(detected_at: Timestamp) -> Self {
        ChainTrace {
            chain_id: crate::model::new_id("chn"),
            started: Instant::now(),
            detected_at,
            timings: ChainTimings::default(),
        }
    }

    /// Seconds since the chain started.
    pub fn elapsed_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// A batch from a source to the Monitor (a poll result or a webhook batch).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<ObserveAck, ObserveError>")]
pub struct Observe {
    /// Source name (`prometheus`, `alertmanager`).
    pub source: String,
    /// Breaching series / firing alerts.
    pub violations: Vec<Violation>,
    /// Fingerprints that stopped breaching (resolved alerts).
    pub resolved: Vec<String>,
    /// The batch is the source's complete current state: anything of the
    /// source not in it has resolved (true for polls, false for webhooks).
    pub complete: bool,
}

/// What the Monitor did with an [`Observe`] batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ObserveAck {
    /// Violations in the batch.
    pub received: usize,
    /// Of those, not active before.
    pub new: usize,
    /// Of those, already active (re-sent or still breaching).
    pub duplicates: usize,
    /// Violations that ended.
    pub resolved: usize,
}

/// Why the Monitor could not take a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObserveError {
    /// The Monitor failed while handling the batch (it restarts): the
    /// sender should retry later.
    #[error("monitor unavailable: {0}")]
    MonitorFailed(String),
}

/// Health of one evidence source.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SourceHealth {
    /// Source name.
    pub name: String,
    /// `unknown` (never answered yet), `up`, `degraded` (last query failed)
    /// or `stale` (no good answer for too long).
    pub status: SourceStatus,
    /// Last good answer.
    pub last_success: Option<Timestamp>,
    /// Last failure.
    pub last_error: Option<String>,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Rules the source answered but could not evaluate (`rule: error`):
    /// no evidence for those rules only.
    pub failing_rules: Vec<String>,
}

/// Evidence state of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceStatus {
    /// Not yet polled.
    Unknown,
    /// Answering.
    Up,
    /// The last query failed: no evidence.
    Degraded,
    /// No good answer for longer than the stale limit: no evidence.
    Stale,
}

/// Ask the Monitor for the health of its sources.
#[derive(Debug, Message)]
#[rtype(result = "Vec<SourceHealth>")]
pub struct GetSources;

/// Ask the Monitor for the active violations.
#[derive(Debug, Message)]
#[rtype(result = "Vec<Violation>")]
pub struct GetActiveViolations;

/// Ask the Monitor for the active violations with these fingerprints (an
/// incident's members), without copying the whole active set.
#[derive(Debug, Message)]
#[rtype(result = "Vec<Violation>")]
pub struct GetViolations {
    /// Fingerprints wanted; those no longer active are left out.
    pub fingerprints: Vec<String>,
}

/// Ask the Monitor to measure the violations in a scope now (fresh polls of
/// every source plus active webhook alerts). An error means no evidence.
#[derive(Debug, Message)]
#[rtype(result = "Result<usize, SourceError>")]
pub struct MeasureNow {
    /// Components in scope (all when empty).
    pub scope: Vec<String>,
}

/// Monitor → Analyzer: what changed since the last delivery. Changes are
/// never shed (the Monitor waits for room and sends one at a time, in
/// order); `resync` carries the whole active set now and then, to repair
/// any drift.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), AnalyzerFailed>")]
pub struct ViolationsDetected {
    /// Chain started by this batch.
    pub chain: ChainTrace,
    /// Violations that became active (shared, not copied).
    pub added: Vec<Arc<Violation>>,
    /// Fingerprints that ended (applied before `added`).
    pub resolved: Vec<String>,
    /// Sources that stopped (`true`) or resumed (`false`) giving evidence.
    pub blind: Vec<(String, bool)>,
    /// The complete active set, for a full reconcile.
    pub resync: Option<Arc<Vec<Arc<Violation>>>>,
}

/// The Analyzer failed while applying changes (it restarts): the sender
/// follows with a full reconcile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the analyzer failed while applying the changes")]
pub struct AnalyzerFailed;

/// Ask the Analyzer for its recent analyses (newest first).
#[derive(Debug, Message)]
#[rtype(result = "Vec<AnalysisResult>")]
pub struct GetAnalyses {
    /// At most this many.
    pub limit: usize,
}

/// Analyzer → Planner: the incidents a batch touched (new diagnoses,
/// counts, evidence, closures and merges).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct AnalysisReady {
    /// Chain.
    pub chain: ChainTrace,
    /// One report per touched incident.
    pub reports: Vec<IncidentReport>,
    /// With a full report: every incident the Analyzer holds open; the
    /// Planner closes any other it still has open (violations that ended
    /// while mapek was down, or a lost closure report).
    pub open_ids: Option<Vec<String>>,
}

/// Executor → Planner: a policy's actions are over (its verification
/// window is a timer from now on): its execution slot is free.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ActionsDone {
    /// Policy.
    pub policy_id: String,
}

/// Ask the Planner for incidents, newest first.
#[derive(Debug, Clone, Message)]
#[rtype(result = "IncidentPage")]
pub struct GetIncidents {
    /// Only this state.
    pub state: Option<IncidentState>,
    /// At most this many.
    pub limit: usize,
    /// Continue after this position (onset in ms, id): the previous
    /// page's last incident. Stable while incidents change state.
    pub after: Option<(i64, String)>,
}

/// A page of incidents.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IncidentPage {
    /// Incidents, newest first (by onset, then id).
    pub incidents: Vec<Incident>,
    /// Cursor of the next page (`<onset ms>:<id>`), when there is one.
    pub next: Option<String>,
}

/// Ask the Planner for one incident.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Option<Incident>")]
pub struct GetIncident {
    /// Incident id.
    pub id: String,
}

/// Operator → Planner: the kill switch. While paused nothing is executed;
/// the pause is kept in Knowledge (the reply comes once it is durable).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<serde_json::Value, String>")]
pub struct Pause {
    /// Who.
    pub by: String,
    /// Why.
    pub reason: Option<String>,
}

/// Operator → Planner: release the kill switch; the incidents still
/// active are remedied.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<serde_json::Value, String>")]
pub struct Resume {
    /// Who.
    pub by: String,
    /// Why.
    pub reason: Option<String>,
}

/// Operator → Planner: clear a component's flapping, silence, breaker and
/// sticky escalations.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<serde_json::Value, String>")]
pub struct ClearComponent {
    /// Component.
    pub component: String,
    /// Who.
    pub by: String,
    /// Why.
    pub reason: Option<String>,
}

/// Operator → Planner: observe a component but do not act on it for a
/// while (a maintenance window).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<serde_json::Value, String>")]
pub struct SilenceComponent {
    /// Component.
    pub component: String,
    /// How long, seconds.
    pub seconds: u64,
    /// Who.
    pub by: String,
    /// Why.
    pub reason: String,
}

/// The guards' state (pause, budget, breakers, flapping, silences, queue).
#[derive(Debug, Clone, Message)]
#[rtype(result = "serde_json::Value")]
pub struct GetSafety;

/// What shadow mode would have done, per cause.
#[derive(Debug, Clone, Message)]
#[rtype(result = "serde_json::Value")]
pub struct GetShadowReport;

/// Planner → Knowledge: an outcome's symptoms came back; re-classify it.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ReclassifyOutcome {
    /// Execution whose outcome changes.
    pub execution_id: String,
    /// The new class (RECURRED).
    pub to: OutcomeType,
}

/// Operator → Planner: approve or reject a pending policy.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<RemediationPolicy, DecisionError>")]
pub struct DecidePolicy {
    /// Policy id.
    pub id: String,
    /// `approved` or `rejected`.
    pub decision: ApprovalStatus,
    /// Who decides.
    pub by: String,
    /// Why.
    pub reason: Option<String>,
}

/// Why a decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    /// No pending policy has this id.
    #[error("no pending policy `{0}`")]
    NotFound(String),
    /// The policy was already decided.
    #[error("{0}")]
    Invalid(String),
    /// A remedy runs or cools down on one of the policy's components.
    #[error("{0}")]
    Busy(String),
    /// The policy could not be recorded or handed to the Executor.
    #[error("{0}")]
    Unavailable(String),
}

/// Knowledge → Planner: the learned statistics changed.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct KnowledgeUpdated {
    /// New statistics.
    pub stats: LearnedStats,
}

/// Planner (or operator approval) → Executor: run this policy.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct PolicyApproved {
    /// Chain.
    pub chain: ChainTrace,
    /// The approved policy.
    pub policy: RemediationPolicy,
}

/// Executor → Knowledge and Planner: an execution ended and was verified.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ExecutionFinished {
    /// Chain, with all timings.
    pub chain: ChainTrace,
    /// The execution record (status, actions, before/after, outcome).
    pub execution: PolicyExecution,
    /// The policy that was executed.
    pub policy: RemediationPolicy,
}

/// Any phase → Knowledge: keep this analysis in the audit trail.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct RecordAnalysis(pub AnalysisResult);

/// Planner → Knowledge: keep this policy (new or newly decided).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), String>")]
pub struct RecordPolicy(pub RemediationPolicy);

/// Executor → Knowledge: keep this execution record (in progress).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct RecordExecution(pub PolicyExecution);

/// Make everything durable now.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<usize, String>")]
pub struct FlushKnowledge;

/// A phase actor → Supervisor: I was restarted.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ActorRestarted {
    /// Which actor.
    pub actor: ActorKind,
}

/// Supervisor → Executor at shutdown: answered once every policy queued
/// before it has run (the Executor handles one policy at a time).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Stop the loop cleanly (SIGTERM): plan nothing new, let a running
/// execution finish (at most `SHUTDOWN_GRACE`), flush and close knowledge,
/// stop the actix system with exit code 0.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

named!(
    Observe,
    GetSources,
    GetActiveViolations,
    GetViolations,
    MeasureNow,
    ViolationsDetected,
    GetAnalyses,
    AnalysisReady,
    DecidePolicy,
    KnowledgeUpdated,
    PolicyApproved,
    ExecutionFinished,
    RecordAnalysis,
    RecordPolicy,
    RecordExecution,
    FlushKnowledge,
    ActorRestarted,
    Shutdown,
    Drain,
    ActionsDone,
    GetIncidents,
    GetIncident,
    Pause,
    Resume,
    ClearComponent,
    SilenceComponent,
    GetSafety,
    GetShadowReport,
    ReclassifyOutcome,
);
