//! The traits through which the loop reaches the world. The daemon (`mapek`)
//! implements them with HTTP clients and programs; tests use the doubles in
//! [`crate::testing`].

use futures::future::BoxFuture;
use serde_json::Value;

use crate::model::{RemediationAction, RemediationPolicy, RollbackStep, Violation};
use crate::settings::RuleSpec;

// Leadership and fencing (cluster mode) are a port too.
pub use crate::leadership::{Fence, FenceError, FencedWrite, Leadership, LeadershipView, Solo};

/// Why a metric source gave no evidence.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SourceError {
    /// The source could not be reached (connection refused, DNS, reset).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The source did not answer within the timeout.
    #[error("timed out after {0} s")]
    Timeout(u64),
    /// The source answered with an HTTP error status.
    #[error("HTTP {status}: {body}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// Start of the body, for the log.
        body: String,
    },
    /// The source rejected the query (Prometheus `bad_data`, `execution`).
    #[error("query `{rule}` rejected ({error_type}): {message}")]
    Query {
        /// Rule whose expression was rejected.
        rule: String,
        /// Prometheus error type.
        error_type: String,
        /// Prometheus error message.
        message: String,
    },
    /// The answer could not be understood.
    #[error("unintelligible answer: {0}")]
    Garbage(String),
}

/// A rule a source could not evaluate (a PromQL error, an unsupported
/// expression, an answer that is not a vector): no evidence for that rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleFailure {
    /// Rule name.
    pub rule: String,
    /// Component the rule watches.
    pub component: String,
    /// Why.
    pub error: SourceError,
}

/// What one poll of a source gave: the breaching series of the rules it
/// could evaluate, and the rules it could not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Polled {
    /// One violation per breaching series.
    pub violations: Vec<Violation>,
    /// Rules without evidence this time.
    pub failed: Vec<RuleFailure>,
}

/// A source of violations that is polled (Prometheus, a direct scrape).
pub trait MetricSource: Send + Sync + 'static {
    /// Short stable name (`prometheus`), used in labels and the state API.
    fn name(&self) -> &str;

    /// Evaluates every rule now and returns one violation per breaching
    /// series. `first_seen` may equal `observed_at`: the Monitor keeps the
    /// real onset. An error means *no evidence*, never *no violations*.
    fn poll<'a>(
        &'a self,
        rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Vec<Violation>, SourceError>>;

    /// Like [`MetricSource::poll`], but one broken rule does not cost the
    /// evidence of the others: rule-level failures are listed in
    /// [`Polled::failed`], and only a failure of the source itself
    /// (unreachable, timeout, 5xx) is an error. The default treats every
    /// failure as the source's.
    fn poll_rules<'a>(
        &'a self,
        rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Polled, SourceError>> {
        Box::pin(async move {
            Ok(Polled {
                violations: self.poll(rules).await?,
                failed: Vec::new(),
            })
        })
    }
}

/// Why an effector call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EffectorError {
    /// A failure worth retrying: connection error, timeout, HTTP 5xx.
    #[error("transient failure: {0}")]
    Transient(String),
    /// The managed system refused the action (HTTP 4xx, non-zero exit):
    /// retrying would not help.
    #[error("rejected: {0}")]
    Rejected(String),
    /// No effector is configured for this action type.
    #[error("no effector for {0}")]
    NotConfigured(String),
}

impl EffectorError {
    /// Whether a retry may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, EffectorError::Transient(_))
    }
}

/// Something that carries out remediation actions on the managed system.
pub trait Effector: Send + Sync + 'static {
    /// Short stable name (`charter`, `command`, `webhook`, `recording`).
    fn name(&self) -> &str;

    /// Pre-flight check of a whole policy before any action runs.
    fn validate<'a>(
        &'a self,
        _policy: &'a RemediationPolicy,
    ) -> BoxFuture<'a, Result<(), EffectorError>> {
        Box::pin(async { Ok(()) })
    }

    /// Carries out one action; the answer is kept in the execution record
    /// and handed back to [`Effector::rollback`].
    fn apply<'a>(
        &'a self,
        action: &'a RemediationAction,
    ) -> BoxFuture<'a, Result<Value, EffectorError>>;

    /// Undoes a completed action with its rollback step.
    fn rollback<'a>(
        &'a self,
        action: &'a RemediationAction,
        step: &'a RollbackStep,
        applied: &'a Value,
    ) -> BoxFuture<'a, Result<Value, EffectorError>>;
}

/// Measures the violations in a scope *now*, for verification after acting.
pub trait EvidenceProbe: Send + Sync + 'static {
    /// Number of violations currently observed on the given components (all
    /// components when the scope is empty). An error means no evidence.
    fn count_violations<'a>(
        &'a self,
        scope: &'a [String],
    ) -> BoxFuture<'a, Result<usize, SourceError>>;
}

/// The current state of pushed alerts, asked at verification time (for
/// Alertmanager: `GET /api/v2/alerts`), so a remedy is judged by what is
/// firing now, not by whether a resolved notification has arrived yet.
pub trait AlertState: Send + Sync + 'static {
    /// Short stable name (`alertmanager`).
    fn name(&self) -> &str;

    /// Alerts firing now (active, not silenced or inhibited) on the given
    /// components (all when empty). An error means no evidence.
    fn count_firing<'a>(&'a self, scope: &'a [String])
        -> BoxFuture<'a, Result<usize, SourceError>>;
}

/// Why an incident was handed to people (the `reason` label of the
/// escalation alert).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum EscalationKind {
    /// No cause is confident or actionable enough.
    NoConfidentCause,
    /// The incident's violations name no component.
    UnknownComponent,
    /// No effector route covers the component.
    NoRoute,
    /// Every candidate remedy's circuit breaker is open.
    BreakerOpen,
    /// The component is flapping.
    Flapping,
    /// The remedy needs more than the whole disruption budget or its
    /// component's whole rate limit: it can never run.
    BudgetExhausted,
    /// The policy waited in the admission queue past `safety.queue_timeout_seconds`.
    QueueTimeout,
    /// A person rejected the remedy.
    Rejected,
}

impl EscalationKind {
    /// snake_case name, as in labels and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            EscalationKind::NoConfidentCause => "no_confident_cause",
            EscalationKind::UnknownComponent => "unknown_component",
            EscalationKind::NoRoute => "no_route",
            EscalationKind::BreakerOpen => "breaker_open",
            EscalationKind::Flapping => "flapping",
            EscalationKind::BudgetExhausted => "budget_exhausted",
            EscalationKind::QueueTimeout => "queue_timeout",
            EscalationKind::Rejected => "rejected",
        }
    }
}

/// An incident handed to people.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Escalation {
    /// The incident.
    pub incident_id: String,
    /// Why, as a label value.
    pub kind: EscalationKind,
    /// Why, in words.
    pub reason: String,
    /// The incident's components.
    pub components: Vec<String>,
    /// The incident's severity.
    pub severity: Option<crate::model::Severity>,
    /// When it was escalated.
    pub since: crate::model::Timestamp,
}

/// Where escalations go so that they reach the on-call route (for
/// Alertmanager: `POST /api/v2/alerts`, one alert per escalated incident).
pub trait EscalationSink: Send + Sync + 'static {
    /// Short stable name (`alertmanager`).
    fn name(&self) -> &str;

    /// Posts the escalations still firing (re-posted periodically, so they
    /// stay active) and ends the `resolved` ones (their incident closed or
    /// is being remedied).
    fn post<'a>(
        &'a self,
        firing: &'a [Escalation],
        resolved: &'a [Escalation],
    ) -> BoxFuture<'a, Result<(), SourceError>>;
}
