//! Loop events: one per step of a chain, broadcast to whoever listens (the
//! demo's narration, tests awaiting a step instead of sleeping). Sending
//! never blocks; a listener that falls behind loses the oldest events.

use serde::Serialize;
use tokio::sync::broadcast;

use crate::metrics::ActorKind;
use crate::model::{ActionType, ExecutionStatus, OutcomeType, RootCause};

/// A step of the loop.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LoopEvent {
    /// The Monitor handed a snapshot to the Analyzer.
    Detected {
        /// Chain.
        chain_id: String,
        /// Active violations.
        active: usize,
        /// New since the last snapshot.
        new: usize,
    },
    /// The Analyzer produced an analysis.
    Analysed {
        /// Chain.
        chain_id: String,
        /// Top cause, if any.
        cause: Option<RootCause>,
        /// Its confidence.
        confidence: f64,
        /// Patterns found.
        patterns: usize,
    },
    /// The Planner escalated to a human.
    Escalated {
        /// Chain.
        chain_id: String,
        /// Why.
        reason: String,
    },
    /// The Planner proposed a policy.
    Planned {
        /// Chain.
        chain_id: String,
        /// Policy.
        policy_id: String,
        /// Cause addressed.
        cause: RootCause,
        /// Its actions.
        actions: Vec<ActionType>,
        /// Score.
        score: f64,
    },
    /// A policy was approved (automatically or by a person).
    Approved {
        /// Chain.
        chain_id: String,
        /// Policy.
        policy_id: String,
        /// `auto` or the operator.
        by: String,
    },
    /// A policy was rejected.
    Rejected {
        /// Policy.
        policy_id: String,
        /// The operator.
        by: String,
    },
    /// The Executor finished acting (before verification results).
    Executed {
        /// Chain.
        chain_id: String,
        /// Policy.
        policy_id: String,
        /// Execution.
        execution_id: String,
        /// Final status.
        status: ExecutionStatus,
    },
    /// The effect was measured and the outcome recorded.
    Verified {
        /// Chain.
        chain_id: String,
        /// Policy.
        policy_id: String,
        /// Cause addressed.
        cause: RootCause,
        /// Outcome, when there was evidence to judge.
        outcome: Option<OutcomeType>,
        /// Violations before.
        before: Option<usize>,
        /// Violations after.
        after: Option<usize>,
        /// Chain duration.
        total_seconds: f64,
    },
    /// A safety guard decided about a policy (held, escalated, dry run,
    /// shadow, trial).
    Guard {
        /// Incident.
        incident_id: String,
        /// Policy, if one is concerned.
        policy_id: Option<String>,
        /// The guard.
        guard: String,
        /// Its decision.
        decision: String,
        /// Why.
        reason: String,
    },
    /// The kill switch was thrown or released.
    Paused {
        /// Paused (true) or resumed (false).
        paused: bool,
        /// Who.
        by: String,
        /// Why.
        reason: Option<String>,
    },
    /// A circuit breaker opened.
    BreakerOpened {
        /// Breaker key (`cause/ACTION` or `component/NAME`).
        key: String,
    },
    /// A component was found flapping.
    Flapping {
        /// Component.
        component: String,
    },
    /// A success was re-classified as RECURRED: its symptoms came back.
    Recurred {
        /// The execution whose outcome changed.
        execution_id: String,
        /// The incident that came back.
        incident_id: String,
    },
    /// The learner chose a remedy among candidates.
    Chose {
        /// Incident.
        incident_id: String,
        /// Cause.
        cause: RootCause,
        /// The remedy chosen.
        remedy: String,
        /// Candidates considered.
        candidates: usize,
    },
    /// A phase actor was restarted.
    Restarted {
        /// Which.
        actor: ActorKind,
    },
}

/// Sender side of the event stream.
pub type EventBus = broadcast::Sender<LoopEvent>;

/// A new bus keeping up to `capacity` events per slow listener.
pub fn bus(capacity: usize) -> EventBus {
    broadcast::channel(capacity.max(16)).0
}
