//! Plan phase: from an [`AnalysisResult`] to ranked [`RemediationPolicy`]s.
//!
//! Plain logic only (no actor, no I/O, the clock is a parameter):
//!
//! * [`strategy`] maps a root cause to its remediation steps, each carrying
//!   its undo step from [`rollback_for`];
//! * [`estimate`] scores a set of steps (`benefit − cost`), using what
//!   Knowledge learned about (cause, action) pairs once there is evidence;
//! * [`plan`] turns an analysis into a [`PlanDecision`]: too little evidence,
//!   escalate to a person, or at most `max_policies` ranked policies;
//! * [`auto_approvable`], [`decide`] and [`apply_auto_approval`] implement the
//!   approval workflow `pending → approved | rejected`.
//!
//! # Strategies
//!
//! Multi-step strategies are sequential: step `aN` depends on `aN−1`, so the
//! Executor never runs a later step when an earlier one failed (and rolls the
//! completed ones back).
//!
//! | cause | steps |
//! |---|---|
//! | validation_latency | SCALE_UP → UPDATE_CONFIGURATION `{validation_workers: "+50%"}` |
//! | insufficient_capacity | SCALE_UP → UPDATE_CONFIGURATION `{worker_pool_size: "+50%"}` |
//! | policy_misconfiguration | APPLY_POLICY `{policy: "last_known_good"}` |
//! | cascade_failure | ACTIVATE_EMERGENCY_OVERRIDE → THROTTLE_REQUESTS |
//! | system_instability, performance_degradation | REBALANCE_LOAD → RESTART_SERVICE |
//! | node_crash | RESTART_SERVICE |
//! | network_partition | FAILOVER |
//! | resource_exhaustion | SCALE_UP → THROTTLE_REQUESTS |
//! | unknown | nothing: escalate to a person |
//!
//! A node crash is answered by a restart only. A policy has no "run only if
//! the previous step failed" edge, so a FAILOVER after the restart would
//! always run, disrupting the service a second time after a successful
//! restart, and would raise the whole policy to high risk (no auto-approval).
//! FAILOVER still reaches a node crash through learning: once Knowledge shows
//! it working for that cause, it is proposed as an alternative policy.

use std::cmp::Ordering;

use serde_json::{json, Map, Value};

use crate::model::{
    new_id, ActionType, AnalysisResult, ApprovalDecision, ApprovalStatus, LearnedStats, Priority,
    RankedCause, RemediationAction, RemediationPolicy, RiskLevel, RollbackStep, RootCause,
    Severity, Timestamp,
};
use crate::settings::PlanSettings;

/// Highest benefit a policy may be credited with: nothing is certain.
pub const MAX_BENEFIT: f64 = 0.95;

/// Success rate (for a cause) at which Knowledge's evidence makes an action
/// outside the strategy worth proposing as an alternative policy.
pub const ALTERNATIVE_MIN_SUCCESS_RATE: f64 = 0.5;

/// Confidence at or above which a critical analysis gets CRITICAL priority.
pub const CRITICAL_PRIORITY_CONFIDENCE: f64 = 0.8;

/// Seconds a graceful RESTART_SERVICE may take (`timeout` parameter).
pub const RESTART_TIMEOUT_SECONDS: u64 = 30;

/// Component acted on when the analysis names none.
pub const DEFAULT_TARGET: &str = "charter";

/// Name recorded as the decider of auto-approvals.
pub const AUTO_APPROVER: &str = "auto";

/// Scores are compared at this resolution, so that float noise in
/// `benefit − cost` does not decide a ranking (1e-9).
const SCORE_RESOLUTION: f64 = 1e9;

/// What the Planner decided about one analysis.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanDecision {
    /// Too few distinct violations to act on.
    BelowThreshold {
        /// Distinct violations in the analysis.
        violations: usize,
        /// `plan_threshold` in force.
        threshold: usize,
    },
    /// No cause is confident and actionable enough: a person must look.
    Escalate {
        /// Why, naming the best cause and its confidence.
        reason: String,
    },
    /// Policies to approve, best first (at most `max_policies`).
    Policies(Vec<RemediationPolicy>),
}

/// Why an approval decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    /// The policy was already approved or rejected; decisions are final.
    #[error("policy {id} is already {}; only pending policies can be decided", status.as_str())]
    AlreadyDecided {
        /// Policy id.
        id: String,
        /// Its current status.
        status: ApprovalStatus,
    },
    /// The requested status is not a decision (only `approved` or `rejected`).
    #[error("policy {id}: `{}` is not a decision (use approved or rejected)", target.as_str())]
    InvalidTarget {
        /// Policy id.
        id: String,
        /// The status that was asked for.
        target: ApprovalStatus,
    },
    /// The decision names nobody; the audit trail needs a decider.
    #[error("policy {id}: a decision needs the name of who took it")]
    MissingDecider {
        /// Policy id.
        id: String,
    },
}

/// Cost, benefit and score of a set of actions against one cause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Mean cost of the actions (0 for none).
    pub cost: f64,
    /// Expected benefit, at most [`MAX_BENEFIT`].
    pub benefit: f64,
    /// `benefit − cost`.
    pub score: f64,
}

/// Action types of the strategy for `cause`, in execution order.
pub fn strategy_steps(cause: RootCause) -> &'static [ActionType] {
    match cause {
        RootCause::ValidationLatency | RootCause::InsufficientCapacity => {
            &[ActionType::ScaleUp, ActionType::UpdateConfiguration]
        }
        RootCause::PolicyMisconfiguration => &[ActionType::ApplyPolicy],
        RootCause::CascadeFailure => &[
            ActionType::ActivateEmergencyOverride,
            ActionType::ThrottleRequests,
        ],
        RootCause::SystemInstability | RootCause::PerformanceDegradation => {
            &[ActionType::RebalanceLoad, ActionType::RestartService]
        }
        RootCause::NodeCrash => &[ActionType::RestartService],
        RootCause::NetworkPartition => &[ActionType::Failover],
        RootCause::ResourceExhaustion => &[ActionType::ScaleUp, ActionType::ThrottleRequests],
        RootCause::Unknown => &[],
    }
}

/// Parameters of `action` when used against `cause`.
///
/// * SCALE_UP / SCALE_DOWN: `{"replicas_delta": scale_step}`;
/// * RESTART_SERVICE: `{"graceful": true, "timeout": 30}`;
/// * APPLY_POLICY: `{"policy": "last_known_good"}`;
/// * BYPASS_VALIDATION / ACTIVATE_EMERGENCY_OVERRIDE:
///   `{"duration_seconds": override_duration_seconds}`;
/// * THROTTLE_REQUESTS: `{"rate_limit": throttle_rate_limit}` (requests/s);
/// * REBALANCE_LOAD: `{"strategy": "least_loaded"}`;
/// * UPDATE_CONFIGURATION: `{"validation_workers": "+50%"}` against
///   validation latency (more parallel validators), otherwise
///   `{"worker_pool_size": "+50%"}` (more request workers); relative values
///   are resolved by the effector against the current configuration;
/// * FAILOVER: `{"mode": "standby"}` (switch to the standby).
pub fn default_parameters(
    action: ActionType,
    cause: RootCause,
    settings: &PlanSettings,
) -> Map<String, Value> {
    let mut p = Map::new();
    match action {
        ActionType::ScaleUp | ActionType::ScaleDown => {
            p.insert("replicas_delta".into(), json!(settings.scale_step));
        }
        ActionType::RestartService => {
            p.insert("graceful".into(), json!(true));
            p.insert("timeout".into(), json!(RESTART_TIMEOUT_SECONDS));
        }
        ActionType::ApplyPolicy => {
            p.insert("policy".into(), json!("last_known_good"));
        }
        ActionType::BypassValidation | ActionType::ActivateEmergencyOverride => {
            p.insert(
                "duration_seconds".into(),
                json!(settings.override_duration_seconds),
            );
        }
        ActionType::ThrottleRequests => {
            p.insert("rate_limit".into(), json!(settings.throttle_rate_limit));
        }
        ActionType::RebalanceLoad => {
            p.insert("strategy".into(), json!("least_loaded"));
        }
        ActionType::UpdateConfiguration => {
            let key = if cause == RootCause::ValidationLatency {
                "validation_workers"
            } else {
                "worker_pool_size"
            };
            p.insert(key.into(), json!("+50%"));
        }
        ActionType::Failover => {
            p.insert("mode".into(), json!("standby"));
        }
    }
    p
}

/// Builds one action (id `id`, cost from `settings`, its rollback attached).
/// Its priority is a placeholder ([`Priority::Medium`]) that [`plan`]
/// overwrites with the policy's priority.
pub(crate) fn make_action(
    id: String,
    action: ActionType,
    cause: RootCause,
    settings: &PlanSettings,
    target: &str,
    depends_on: Vec<String>,
) -> RemediationAction {
    let parameters = default_parameters(action, cause, settings);
    let rollback = rollback_for(action, &parameters);
    RemediationAction {
        id,
        action_type: action,
        target: target.to_string(),
        parameters,
        priority: Priority::Medium,
        cost: settings.cost(action),
        depends_on,
        rollback,
    }
}

/// The remediation steps for `cause` on `target` (see the module table).
///
/// Ids are `a1`, `a2`, ...; each step depends on the previous one; costs come
/// from `settings`; each step carries its [`rollback_for`]. Priorities are a
/// placeholder set by [`plan`]. [`RootCause::Unknown`] yields no step: an
/// unknown cause is escalated to a person, never acted on.
pub fn strategy(cause: RootCause, settings: &PlanSettings, target: &str) -> Vec<RemediationAction> {
    let mut actions: Vec<RemediationAction> = Vec::new();
    for (i, action) in strategy_steps(cause).iter().enumerate() {
        let depends_on = actions
            .last()
            .map(|a| vec![a.id.clone()])
            .unwrap_or_default();
        actions.push(make_action(
            format!("a{}", i + 1),
            *action,
            cause,
            settings,
            target,
            depends_on,
        ));
    }
    actions
}

/// The step that undoes `action` run with `params`, or `None` when it cannot
/// be undone.
///
/// * SCALE_UP ↔ SCALE_DOWN with the same `replicas_delta` (`None` when the
///   action has no `replicas_delta`: the size of the undo is unknown);
/// * APPLY_POLICY → APPLY_POLICY `{"rollback": true}`: the effector rolls back
///   the policy it applied (`POST /api/v1/policies/{id}/rollback`);
/// * THROTTLE_REQUESTS → THROTTLE_REQUESTS `{"rate_limit": null}` (no limit);
/// * ACTIVATE_EMERGENCY_OVERRIDE / BYPASS_VALIDATION → the same type with
///   `{"duration_seconds": 0}` (ends it now);
/// * UPDATE_CONFIGURATION → UPDATE_CONFIGURATION `{"restore": "previous"}`;
/// * FAILOVER → FAILOVER `{"failback": true}`;
/// * REBALANCE_LOAD and RESTART_SERVICE → `None`: the previous placement of
///   load and a process that was restarted cannot be brought back.
pub fn rollback_for(action: ActionType, params: &Map<String, Value>) -> Option<RollbackStep> {
    let mut p = Map::new();
    let (action_type, description) = match action {
        ActionType::ScaleUp | ActionType::ScaleDown => {
            let delta = params.get("replicas_delta")?.clone();
            let (undo, verb) = if action == ActionType::ScaleUp {
                (ActionType::ScaleDown, "remove")
            } else {
                (ActionType::ScaleUp, "add back")
            };
            let description = format!("{verb} the {delta} replicas");
            p.insert("replicas_delta".into(), delta);
            (undo, description)
        }
        ActionType::ApplyPolicy => {
            p.insert("rollback".into(), json!(true));
            (
                ActionType::ApplyPolicy,
                "roll back the applied policy".to_string(),
            )
        }
        ActionType::ThrottleRequests => {
            p.insert("rate_limit".into(), Value::Null);
            (
                ActionType::ThrottleRequests,
                "remove the rate limit".to_string(),
            )
        }
        ActionType::ActivateEmergencyOverride | ActionType::BypassValidation => {
            p.insert("duration_seconds".into(), json!(0));
            (action, format!("end {} now", action.as_str()))
        }
        ActionType::UpdateConfiguration => {
            p.insert("restore".into(), json!("previous"));
            (
                ActionType::UpdateConfiguration,
                "restore the previous configuration".to_string(),
            )
        }
        ActionType::Failover => {
            p.insert("failback".into(), json!(true));
            (ActionType::Failover, "fail back to the primary".to_string())
        }
        ActionType::RebalanceLoad | ActionType::RestartService => return None,
    };
    Some(RollbackStep {
        action_type,
        parameters: p,
        description,
    })
}

/// Priority of a policy for a cause of confidence `confidence`:
/// critical analysis with confidence ≥ 0.8 → CRITICAL; critical → HIGH;
/// warning → MEDIUM; info or no severity → LOW.
pub fn priority_for(analysis: &AnalysisResult, confidence: f64) -> Priority {
    match analysis.max_severity {
        Some(Severity::Critical) if confidence >= CRITICAL_PRIORITY_CONFIDENCE => {
            Priority::Critical
        }
        Some(Severity::Critical) => Priority::High,
        Some(Severity::Warning) => Priority::Medium,
        Some(Severity::Info) | None => Priority::Low,
    }
}

fn unit(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// Cost, benefit and score of `actions` against `cause` of confidence
/// `cause_confidence`.
///
/// * cost = mean of the actions' costs (0 for no action);
/// * without evidence: benefit = min(0.95, cause_confidence);
/// * with evidence (`learned.get(cause, action)`): let `c` be the mean over
///   the actions of their stats' confidence (0 for actions without stats) and
///   `learned` the confidence-weighted mean of their success rates; then
///   benefit = min(0.95, (1 − c) × cause_confidence + c × learned);
/// * score = benefit − cost.
///
/// Inputs are clamped to 0..1 (NaN counts as 0).
pub fn estimate(
    cause: RootCause,
    cause_confidence: f64,
    actions: &[RemediationAction],
    learned: &LearnedStats,
) -> Estimate {
    let n = actions.len();
    let cost = if n == 0 {
        0.0
    } else {
        actions.iter().map(|a| unit(a.cost)).sum::<f64>() / n as f64
    };
    let conf = unit(cause_confidence);
    let mut weight_sum = 0.0;
    let mut weighted_rate = 0.0;
    for a in actions {
        if let Some(s) = learned.get(cause, a.action_type) {
            let w = unit(s.confidence);
            weight_sum += w;
            weighted_rate += w * unit(s.success_rate);
        }
    }
    let raw = if weight_sum > 0.0 {
        let c = weight_sum / n as f64;
        let learned_rate = weighted_rate / weight_sum;
        (1.0 - c) * conf + c * learned_rate
    } else {
        conf
    };
    let benefit = raw.min(MAX_BENEFIT);
    Estimate {
        cost,
        benefit,
        score: benefit - cost,
    }
}

/// Whether `policy` may be approved without a person: auto-approval is on
/// and the policy's risk is at most `auto_approve_max_risk`.
pub fn auto_approvable(policy: &RemediationPolicy, settings: &PlanSettings) -> bool {
    settings.auto_approve && policy.risk_level <= settings.auto_approve_max_risk
}

/// Approves `policy` as [`AUTO_APPROVER`] when it is pending and
/// [`auto_approvable`]; returns whether it did.
pub fn apply_auto_approval(
    policy: &mut RemediationPolicy,
    settings: &PlanSettings,
    now: Timestamp,
) -> bool {
    auto_approvable(policy, settings)
        && decide(
            policy,
            ApprovalStatus::Approved,
            AUTO_APPROVER,
            Some(format!(
                "risk {} within auto-approval limit {}",
                risk_name(policy.risk_level),
                risk_name(settings.auto_approve_max_risk)
            )),
            now,
        )
        .is_ok()
}

fn risk_name(r: RiskLevel) -> &'static str {
    match r {
        RiskLevel::Low => "low",
        RiskLevel::Medium => "medium",
        RiskLevel::High => "high",
    }
}

/// Records a decision about `policy`: only `pending → approved | rejected`.
///
/// On success sets the status and appends an [`ApprovalDecision`] (`by`,
/// `now`, `reason`) to the audit trail. Errors leave the policy unchanged:
/// [`ApprovalError::AlreadyDecided`] for a policy no longer pending,
/// [`ApprovalError::InvalidTarget`] when `decision` is `Pending`,
/// [`ApprovalError::MissingDecider`] when `by` is blank.
pub fn decide(
    policy: &mut RemediationPolicy,
    decision: ApprovalStatus,
    by: &str,
    reason: Option<String>,
    now: Timestamp,
) -> Result<(), ApprovalError> {
    if policy.approval_status != ApprovalStatus::Pending {
        return Err(ApprovalError::AlreadyDecided {
            id: policy.id.clone(),
            status: policy.approval_status,
        });
    }
    if decision == ApprovalStatus::Pending {
        return Err(ApprovalError::InvalidTarget {
            id: policy.id.clone(),
            target: decision,
        });
    }
    let by = by.trim();
    if by.is_empty() {
        return Err(ApprovalError::MissingDecider {
            id: policy.id.clone(),
        });
    }
    policy.approval_status = decision;
    policy.decisions.push(ApprovalDecision {
        status: decision,
        by: by.to_string(),
        at: now,
        reason,
    });
    Ok(())
}

/// Eligible causes: confidence ≥ `min_confidence`, not Unknown, each cause
/// once (at its highest confidence), in the analysis' order.
pub(crate) fn eligible_causes(
    analysis: &AnalysisResult,
    settings: &PlanSettings,
) -> Vec<RankedCause> {
    let mut out: Vec<RankedCause> = Vec::new();
    for rc in &analysis.root_causes {
        if rc.cause == RootCause::Unknown
            || rc.confidence.is_nan()
            || rc.confidence < settings.min_confidence
        {
            continue;
        }
        match out.iter_mut().find(|o| o.cause == rc.cause) {
            Some(o) if rc.confidence > o.confidence => o.confidence = rc.confidence,
            Some(_) => {}
            None => out.push(rc.clone()),
        }
    }
    out
}

pub(crate) fn escalation_reason(analysis: &AnalysisResult, settings: &PlanSettings) -> String {
    let best = analysis
        .root_causes
        .iter()
        .filter(|rc| !rc.confidence.is_nan())
        .max_by(|a, b| {
            a.confidence
                .total_cmp(&b.confidence)
                .then_with(|| b.cause.precedence().cmp(&a.cause.precedence()))
        });
    match best {
        None => "no root-cause hypothesis: a person must diagnose".to_string(),
        Some(rc) if rc.cause == RootCause::Unknown => format!(
            "best cause is {} (confidence {:.2}): no actionable diagnosis, a person must look",
            rc.cause, rc.confidence
        ),
        Some(rc) => format!(
            "best cause {} has confidence {:.2}, below min_confidence {:.2}: a person must look",
            rc.cause, rc.confidence, settings.min_confidence
        ),
    }
}

fn describe_steps(actions: &[RemediationAction]) -> String {
    actions
        .iter()
        .map(|a| a.action_type.as_str())
        .collect::<Vec<_>>()
        .join(" → ")
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn build_policy(
    analysis: &AnalysisResult,
    cause: &RankedCause,
    mut actions: Vec<RemediationAction>,
    learned: &LearnedStats,
    target: &str,
    scope: &[String],
    note: &str,
    now: Timestamp,
) -> RemediationPolicy {
    let priority = priority_for(analysis, cause.confidence);
    for a in &mut actions {
        a.priority = priority;
    }
    let est = estimate(cause.cause, cause.confidence, &actions, learned);
    let risk_level = actions
        .iter()
        .map(|a| a.action_type.risk())
        .max()
        .unwrap_or(RiskLevel::Low);
    let expected_impact = format!(
        "Address {} (confidence {:.2}) on {} with {}{}; expected to clear the {} violation(s) in scope",
        cause.cause,
        cause.confidence,
        target,
        describe_steps(&actions),
        note,
        analysis.violation_count
    );
    RemediationPolicy {
        id: new_id("pol"),
        chain_id: analysis.chain_id.clone(),
        analysis_id: analysis.id.clone(),
        created_at: now,
        root_cause: cause.cause,
        root_cause_confidence: cause.confidence,
        actions,
        expected_impact,
        risk_level,
        priority,
        cost_estimate: est.cost,
        benefit_estimate: est.benefit,
        score: est.score,
        approval_status: ApprovalStatus::Pending,
        decisions: Vec::new(),
        violations_at_planning: analysis.violation_count,
        scope: scope.to_vec(),
        incident_id: analysis.incident_id.clone(),
        attempt: 0,
        guards: Vec::new(),
        autonomy: None,
        candidates: Vec::new(),
        shard: None,
    }
}

fn quantize(x: f64) -> i64 {
    // Saturating float→int cast; scores and costs live in -1..1.
    (x * SCORE_RESOLUTION).round() as i64
}

/// Ranking: score descending, then lower cost, then cause precedence.
/// Compared at [`SCORE_RESOLUTION`], a total order; the sort is stable, so
/// remaining ties keep the strategy before its alternatives.
fn rank(a: &RemediationPolicy, b: &RemediationPolicy) -> Ordering {
    quantize(b.score)
        .cmp(&quantize(a.score))
        .then_with(|| quantize(a.cost_estimate).cmp(&quantize(b.cost_estimate)))
        .then_with(|| a.root_cause.precedence().cmp(&b.root_cause.precedence()))
}

/// Plans remediation for `analysis`.
///
/// * fewer than `plan_threshold` distinct violations → [`PlanDecision::BelowThreshold`];
/// * causes below `min_confidence`, and Unknown, are skipped; when none is
///   left → [`PlanDecision::Escalate`] naming the best cause and its confidence;
/// * otherwise, per eligible cause, the [`strategy`] policy plus one
///   single-action alternative per action that Knowledge shows with a success
///   rate ≥ 0.5 for that cause and that the strategy lacks; all ranked by
///   score (ties: lower cost, then cause precedence) and cut to `max_policies`.
///
/// Policies are pending, target the analysis' first component (or
/// `charter`), and carry the analysis' chain, components and violation count.
pub fn plan(
    analysis: &AnalysisResult,
    learned: &LearnedStats,
    settings: &PlanSettings,
    now: Timestamp,
) -> PlanDecision {
    if analysis.violation_count < settings.plan_threshold {
        return PlanDecision::BelowThreshold {
            violations: analysis.violation_count,
            threshold: settings.plan_threshold,
        };
    }
    let eligible = eligible_causes(analysis, settings);
    if eligible.is_empty() {
        return PlanDecision::Escalate {
            reason: escalation_reason(analysis, settings),
        };
    }
    let mut policies = Vec::new();
    for rc in &eligible {
        // Act where the cause's evidence is; verify (and hold) there too.
        let scope: Vec<String> = if rc.components.is_empty() {
            analysis.components.clone()
        } else {
            rc.components.clone()
        };
        let target = scope.first().map(String::as_str).unwrap_or(DEFAULT_TARGET);
        let steps = strategy(rc.cause, settings, target);
        if steps.is_empty() {
            continue;
        }
        let alternatives: Vec<(ActionType, String)> = ActionType::ALL
            .into_iter()
            .filter(|action| !steps.iter().any(|s| s.action_type == *action))
            .filter_map(|action| {
                let stats = learned.get(rc.cause, action)?;
                (stats.success_rate >= ALTERNATIVE_MIN_SUCCESS_RATE).then(|| {
                    let note = format!(
                        " (learned alternative: success rate {:.2} over {} execution(s))",
                        stats.success_rate, stats.executions
                    );
                    (action, note)
                })
            })
            .collect();
        policies.push(build_policy(
            analysis, rc, steps, learned, target, &scope, "", now,
        ));
        for (action, note) in alternatives {
            let single = vec![make_action(
                "a1".to_string(),
                action,
                rc.cause,
                settings,
                target,
                Vec::new(),
            )];
            policies.push(build_policy(
                analysis, rc, single, learned, target, &scope, &note, now,
            ));
        }
    }
    if policies.is_empty() {
        return PlanDecision::Escalate {
            reason: escalation_reason(analysis, settings),
        };
    }
    policies.sort_by(rank);
    policies.truncate(settings.max_policies);
    PlanDecision::Policies(policies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ActionStats;
    use chrono::DateTime;

    const EPS: f64 = 1e-12;

    fn now() -> Timestamp {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn analysis(
        violations: usize,
        severity: Option<Severity>,
        causes: &[(RootCause, f64)],
    ) -> AnalysisResult {
        AnalysisResult {
            id: "ana-1".into(),
            chain_id: "chain-1".into(),
            analyzed_at: now(),
            patterns: Vec::new(),
            root_causes: causes
                .iter()
                .map(|(cause, confidence)| RankedCause {
                    cause: *cause,
                    confidence: *confidence,
                    components: Vec::new(),
                })
                .collect(),
            recommendations: Vec::new(),
            confidence: 0.8,
            violation_count: violations,
            max_severity: severity,
            components: vec!["committee".into(), "validator".into()],
            incident_id: None,
        }
    }

    fn stats(success_rate: f64, confidence: f64) -> ActionStats {
        ActionStats {
            executions: 10,
            successes: (success_rate * 10.0).round() as u64,
            success_rate,
            confidence,
            ..ActionStats::default()
        }
    }

    fn learned(entries: &[(RootCause, ActionType, f64, f64)]) -> LearnedStats {
        let mut l = LearnedStats::default();
        for (cause, action, rate, conf) in entries {
            l.by_cause
                .entry(*cause)
                .or_default()
                .insert(*action, stats(*rate, *conf));
        }
        l
    }

    fn policies(d: PlanDecision) -> Vec<RemediationPolicy> {
        match d {
            PlanDecision::Policies(p) => p,
            other => panic!("expected policies, got {other:?}"),
        }
    }

    fn escalation(d: PlanDecision) -> String {
        match d {
            PlanDecision::Escalate { reason } => reason,
            other => panic!("expected escalation, got {other:?}"),
        }
    }

    fn types(actions: &[RemediationAction]) -> Vec<ActionType> {
        actions.iter().map(|a| a.action_type).collect()
    }

    fn summary(p: &[RemediationPolicy]) -> Vec<(RootCause, Vec<ActionType>)> {
        p.iter()
            .map(|p| (p.root_cause, types(&p.actions)))
            .collect()
    }

    fn plan_default(a: &AnalysisResult) -> PlanDecision {
        plan(a, &LearnedStats::default(), &PlanSettings::default(), now())
    }

    fn one_policy(cause: RootCause, severity: Severity) -> RemediationPolicy {
        let a = analysis(5, Some(severity), &[(cause, 0.9)]);
        let mut p = policies(plan_default(&a));
        assert_eq!(p.len(), 1);
        p.remove(0)
    }

    // ---- thresholds ----

    #[test]
    fn below_plan_threshold_does_not_plan() {
        let causes = [(RootCause::ValidationLatency, 0.9)];
        assert_eq!(
            plan_default(&analysis(2, Some(Severity::Warning), &causes)),
            PlanDecision::BelowThreshold {
                violations: 2,
                threshold: 3
            }
        );
        let p = policies(plan_default(&analysis(3, Some(Severity::Warning), &causes)));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].root_cause, RootCause::ValidationLatency);
    }

    #[test]
    fn plan_threshold_is_configurable() {
        let settings = PlanSettings {
            plan_threshold: 5,
            ..PlanSettings::default()
        };
        let a = analysis(4, None, &[(RootCause::NodeCrash, 0.9)]);
        assert_eq!(
            plan(&a, &LearnedStats::default(), &settings, now()),
            PlanDecision::BelowThreshold {
                violations: 4,
                threshold: 5
            }
        );
    }

    #[test]
    fn min_confidence_boundary() {
        let low = analysis(5, None, &[(RootCause::ValidationLatency, 0.59)]);
        let reason = escalation(plan_default(&low));
        assert!(reason.contains("validation_latency"), "{reason}");
        assert!(reason.contains("0.59"), "{reason}");

        let ok = analysis(5, None, &[(RootCause::ValidationLatency, 0.6)]);
        let p = policies(plan_default(&ok));
        assert_eq!(summary(&p)[0].0, RootCause::ValidationLatency);
    }

    #[test]
    fn causes_below_min_confidence_are_skipped() {
        let a = analysis(
            5,
            None,
            &[
                (RootCause::ValidationLatency, 0.59),
                (RootCause::NodeCrash, 0.6),
            ],
        );
        let p = policies(plan_default(&a));
        assert_eq!(
            summary(&p),
            vec![(RootCause::NodeCrash, vec![ActionType::RestartService])]
        );
    }

    #[test]
    fn at_most_max_policies_best_first() {
        let causes: Vec<(RootCause, f64)> = RootCause::ALL
            .into_iter()
            .filter(|c| *c != RootCause::Unknown)
            .map(|c| (c, 0.9))
            .collect();
        assert_eq!(causes.len(), 9);
        let a = analysis(10, Some(Severity::Warning), &causes);
        let p = policies(plan_default(&a));
        let order: Vec<RootCause> = p.iter().map(|p| p.root_cause).collect();
        // NC 0.70; SI, PD 0.675; VL, IC 0.65; (RE 0.625, PM 0.60, CF, NP 0.40 cut)
        assert_eq!(
            order,
            vec![
                RootCause::NodeCrash,
                RootCause::SystemInstability,
                RootCause::PerformanceDegradation,
                RootCause::ValidationLatency,
                RootCause::InsufficientCapacity,
            ]
        );
        let settings = PlanSettings {
            max_policies: 2,
            ..PlanSettings::default()
        };
        let p = policies(plan(&a, &LearnedStats::default(), &settings, now()));
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].root_cause, RootCause::SystemInstability);
    }

    #[test]
    fn duplicate_causes_give_one_policy_at_highest_confidence() {
        let a = analysis(
            5,
            None,
            &[(RootCause::NodeCrash, 0.7), (RootCause::NodeCrash, 0.9)],
        );
        let p = policies(plan_default(&a));
        assert_eq!(p.len(), 1);
        assert!((p[0].root_cause_confidence - 0.9).abs() < EPS);
    }

    // ---- strategies ----

    #[test]
    fn strategies_map_causes_to_actions() {
        use ActionType::*;
        let expected: [(RootCause, Vec<ActionType>); 10] = [
            (
                RootCause::ValidationLatency,
                vec![ScaleUp, UpdateConfiguration],
            ),
            (
                RootCause::InsufficientCapacity,
                vec![ScaleUp, UpdateConfiguration],
            ),
            (RootCause::PolicyMisconfiguration, vec![ApplyPolicy]),
            (
                RootCause::CascadeFailure,
                vec![ActivateEmergencyOverride, ThrottleRequests],
            ),
            (
                RootCause::SystemInstability,
                vec![RebalanceLoad, RestartService],
            ),
            (
                RootCause::PerformanceDegradation,
                vec![RebalanceLoad, RestartService],
            ),
            (RootCause::NodeCrash, vec![RestartService]),
            (RootCause::NetworkPartition, vec![Failover]),
            (
                RootCause::ResourceExhaustion,
                vec![ScaleUp, ThrottleRequests],
            ),
            (RootCause::Unknown, vec![]),
        ];
        let settings = PlanSettings::default();
        for (cause, want) in expected {
            let actions = strategy(cause, &settings, "svc");
            assert_eq!(types(&actions), want, "{cause}");
            for (i, a) in actions.iter().enumerate() {
                assert_eq!(a.id, format!("a{}", i + 1), "{cause}");
                assert_eq!(a.target, "svc");
                assert!((a.cost - settings.cost(a.action_type)).abs() < EPS);
                let deps: Vec<String> = if i == 0 {
                    vec![]
                } else {
                    vec![format!("a{i}")]
                };
                assert_eq!(a.depends_on, deps, "{cause} {}", a.id);
            }
        }
    }

    #[test]
    fn strategy_parameters() {
        let settings = PlanSettings {
            scale_step: 3,
            throttle_rate_limit: 250,
            override_duration_seconds: 120,
            ..PlanSettings::default()
        };
        let vl = strategy(RootCause::ValidationLatency, &settings, "svc");
        assert_eq!(vl[0].parameters.get("replicas_delta"), Some(&json!(3)));
        assert_eq!(
            vl[1].parameters.get("validation_workers"),
            Some(&json!("+50%"))
        );
        let ic = strategy(RootCause::InsufficientCapacity, &settings, "svc");
        assert_eq!(
            ic[1].parameters.get("worker_pool_size"),
            Some(&json!("+50%"))
        );
        let pm = strategy(RootCause::PolicyMisconfiguration, &settings, "svc");
        assert_eq!(
            pm[0].parameters.get("policy"),
            Some(&json!("last_known_good"))
        );
        assert_eq!(
            pm[0].rollback.as_ref().map(|r| r.action_type),
            Some(ActionType::ApplyPolicy)
        );
        let cf = strategy(RootCause::CascadeFailure, &settings, "svc");
        assert_eq!(cf[0].parameters.get("duration_seconds"), Some(&json!(120)));
        assert_eq!(cf[1].parameters.get("rate_limit"), Some(&json!(250)));
        let si = strategy(RootCause::SystemInstability, &settings, "svc");
        assert_eq!(
            si[0].parameters.get("strategy"),
            Some(&json!("least_loaded"))
        );
        assert_eq!(si[1].parameters.get("graceful"), Some(&json!(true)));
        assert_eq!(si[1].parameters.get("timeout"), Some(&json!(30)));
        let re = strategy(RootCause::ResourceExhaustion, &settings, "svc");
        assert_eq!(re[0].parameters.get("replicas_delta"), Some(&json!(3)));
        assert_eq!(re[1].parameters.get("rate_limit"), Some(&json!(250)));
    }

    #[test]
    fn strategy_actions_carry_their_rollback() {
        let settings = PlanSettings::default();
        let vl = strategy(RootCause::ValidationLatency, &settings, "svc");
        let r = vl[0].rollback.as_ref().unwrap();
        assert_eq!(r.action_type, ActionType::ScaleDown);
        assert_eq!(r.parameters.get("replicas_delta"), Some(&json!(2)));
        assert!(vl[1].rollback.is_some());
        let si = strategy(RootCause::SystemInstability, &settings, "svc");
        assert!(si.iter().all(|a| a.rollback.is_none()));
    }

    #[test]
    fn unknown_cause_escalates_and_acts_on_nothing() {
        assert!(strategy(RootCause::Unknown, &PlanSettings::default(), "svc").is_empty());
        let a = analysis(5, Some(Severity::Critical), &[(RootCause::Unknown, 0.95)]);
        let reason = escalation(plan_default(&a));
        assert!(reason.contains("unknown"), "{reason}");
        assert!(reason.contains("0.95"), "{reason}");

        // The best cause is named even when a weaker one is also too weak.
        let a = analysis(
            5,
            None,
            &[
                (RootCause::ValidationLatency, 0.5),
                (RootCause::Unknown, 0.9),
            ],
        );
        let reason = escalation(plan_default(&a));
        assert!(
            reason.contains("unknown") && reason.contains("0.90"),
            "{reason}"
        );

        let a = analysis(5, None, &[]);
        assert!(matches!(plan_default(&a), PlanDecision::Escalate { .. }));
    }

    #[test]
    fn unknown_is_skipped_when_an_actionable_cause_exists() {
        let a = analysis(
            5,
            None,
            &[
                (RootCause::Unknown, 0.95),
                (RootCause::NetworkPartition, 0.7),
            ],
        );
        let p = policies(plan_default(&a));
        assert_eq!(
            summary(&p),
            vec![(RootCause::NetworkPartition, vec![ActionType::Failover])]
        );
    }

    // ---- scoring ----

    fn vl_actions() -> Vec<RemediationAction> {
        strategy(
            RootCause::ValidationLatency,
            &PlanSettings::default(),
            "svc",
        )
    }

    #[test]
    fn score_without_evidence() {
        let e = estimate(
            RootCause::ValidationLatency,
            0.9,
            &vl_actions(),
            &LearnedStats::default(),
        );
        assert!((e.cost - 0.25).abs() < EPS, "{e:?}");
        assert!((e.benefit - 0.9).abs() < EPS, "{e:?}");
        assert!((e.score - 0.65).abs() < EPS, "{e:?}");
    }

    #[test]
    fn benefit_is_capped_at_095() {
        let e = estimate(
            RootCause::ValidationLatency,
            0.99,
            &vl_actions(),
            &LearnedStats::default(),
        );
        assert!((e.benefit - 0.95).abs() < EPS, "{e:?}");
        assert!((e.score - 0.70).abs() < EPS, "{e:?}");

        let l = learned(&[
            (RootCause::ValidationLatency, ActionType::ScaleUp, 1.0, 1.0),
            (
                RootCause::ValidationLatency,
                ActionType::UpdateConfiguration,
                1.0,
                1.0,
            ),
        ]);
        let e = estimate(RootCause::ValidationLatency, 0.7, &vl_actions(), &l);
        assert!((e.benefit - 0.95).abs() < EPS, "{e:?}");
    }

    #[test]
    fn score_with_evidence() {
        // c = (1.0 + 0.5) / 2 = 0.75; learned = (1.0×0.2 + 0.5×0.1) / 1.5 = 1/6
        // benefit = 0.25 × 0.9 + 0.75 × 1/6 = 0.35; score = 0.35 − 0.25 = 0.10
        let l = learned(&[
            (RootCause::ValidationLatency, ActionType::ScaleUp, 0.2, 1.0),
            (
                RootCause::ValidationLatency,
                ActionType::UpdateConfiguration,
                0.1,
                0.5,
            ),
        ]);
        let e = estimate(RootCause::ValidationLatency, 0.9, &vl_actions(), &l);
        assert!((e.cost - 0.25).abs() < EPS, "{e:?}");
        assert!((e.benefit - 0.35).abs() < EPS, "{e:?}");
        assert!((e.score - 0.10).abs() < EPS, "{e:?}");
    }

    #[test]
    fn actions_without_evidence_count_as_zero_confidence() {
        // c = (0.5 + 0) / 2 = 0.25; learned = 1.0
        // benefit = 0.75 × 0.8 + 0.25 × 1.0 = 0.85; score = 0.60
        let l = learned(&[(RootCause::ValidationLatency, ActionType::ScaleUp, 1.0, 0.5)]);
        let e = estimate(RootCause::ValidationLatency, 0.8, &vl_actions(), &l);
        assert!((e.benefit - 0.85).abs() < EPS, "{e:?}");
        assert!((e.score - 0.60).abs() < EPS, "{e:?}");
    }

    #[test]
    fn evidence_for_another_cause_is_ignored() {
        let l = learned(&[(
            RootCause::InsufficientCapacity,
            ActionType::ScaleUp,
            0.0,
            1.0,
        )]);
        let e = estimate(RootCause::ValidationLatency, 0.9, &vl_actions(), &l);
        assert!((e.benefit - 0.9).abs() < EPS, "{e:?}");
    }

    #[test]
    fn plan_records_estimates_on_the_policy() {
        let p = one_policy(RootCause::CascadeFailure, Severity::Warning);
        // cost (0.60 + 0.40) / 2 = 0.5; benefit 0.9; score 0.4
        assert!((p.cost_estimate - 0.5).abs() < EPS);
        assert!((p.benefit_estimate - 0.9).abs() < EPS);
        assert!((p.score - 0.4).abs() < EPS);
    }

    #[test]
    fn low_learned_success_ranks_strategy_below_learned_alternative() {
        let a = analysis(
            5,
            Some(Severity::Warning),
            &[(RootCause::ValidationLatency, 0.9)],
        );
        let good_alt = (
            RootCause::ValidationLatency,
            ActionType::RebalanceLoad,
            0.9,
            1.0,
        );

        // Equal scores (0.65) and costs (0.25): the strategy stays first.
        let p = policies(plan(
            &a,
            &learned(&[good_alt]),
            &PlanSettings::default(),
            now(),
        ));
        assert_eq!(
            types(&p[0].actions),
            vec![ActionType::ScaleUp, ActionType::UpdateConfiguration]
        );
        assert_eq!(types(&p[1].actions), vec![ActionType::RebalanceLoad]);
        assert!((p[1].score - 0.65).abs() < EPS);

        // The strategy's own record is poor: 0.10 < 0.65.
        let l = learned(&[
            good_alt,
            (RootCause::ValidationLatency, ActionType::ScaleUp, 0.2, 1.0),
            (
                RootCause::ValidationLatency,
                ActionType::UpdateConfiguration,
                0.1,
                0.5,
            ),
        ]);
        let p = policies(plan(&a, &l, &PlanSettings::default(), now()));
        assert_eq!(p.len(), 2);
        assert_eq!(types(&p[0].actions), vec![ActionType::RebalanceLoad]);
        assert_eq!(p[0].actions[0].id, "a1");
        assert!(p[0].actions[0].depends_on.is_empty());
        assert!(p[0].expected_impact.contains("learned alternative"));
        assert!((p[0].score - 0.65).abs() < EPS);
        assert!((p[1].score - 0.10).abs() < EPS);
    }

    #[test]
    fn alternatives_need_success_rate_of_half_and_a_new_action() {
        let a = analysis(5, None, &[(RootCause::NodeCrash, 0.9)]);
        let l = learned(&[
            (RootCause::NodeCrash, ActionType::Failover, 0.5, 1.0),
            (RootCause::NodeCrash, ActionType::ScaleUp, 0.49, 1.0),
            (RootCause::NodeCrash, ActionType::RestartService, 0.9, 1.0),
            (
                RootCause::NetworkPartition,
                ActionType::RebalanceLoad,
                1.0,
                1.0,
            ),
        ]);
        let p = policies(plan(&a, &l, &PlanSettings::default(), now()));
        let mut got: Vec<Vec<ActionType>> = p.iter().map(|p| types(&p.actions)).collect();
        got.sort();
        assert_eq!(
            got,
            vec![vec![ActionType::RestartService], vec![ActionType::Failover]]
        );
    }

    // ---- ties ----

    #[test]
    fn equal_score_and_cost_break_by_cause_precedence() {
        let a = analysis(
            5,
            None,
            &[
                (RootCause::PerformanceDegradation, 0.9),
                (RootCause::SystemInstability, 0.9),
            ],
        );
        let p = policies(plan_default(&a));
        assert_eq!(p[0].root_cause, RootCause::SystemInstability);
        assert_eq!(p[1].root_cause, RootCause::PerformanceDegradation);
    }

    #[test]
    fn equal_score_breaks_by_lower_cost_before_precedence() {
        let mut settings = PlanSettings::default();
        settings
            .action_costs
            .insert(ActionType::RestartService, 0.5);
        settings.action_costs.insert(ActionType::Failover, 0.25);
        // node_crash: 0.875 − 0.5 = 0.375; network_partition: 0.625 − 0.25 = 0.375
        let a = analysis(
            5,
            None,
            &[
                (RootCause::NodeCrash, 0.875),
                (RootCause::NetworkPartition, 0.625),
            ],
        );
        let p = policies(plan(&a, &LearnedStats::default(), &settings, now()));
        assert!((p[0].score - p[1].score).abs() < EPS);
        assert_eq!(p[0].root_cause, RootCause::NetworkPartition);
        assert_eq!(p[1].root_cause, RootCause::NodeCrash);
    }

    // ---- priorities ----

    #[test]
    fn priority_by_severity_and_confidence() {
        let cases = [
            (Some(Severity::Critical), 0.8, Priority::Critical),
            (Some(Severity::Critical), 0.79, Priority::High),
            (Some(Severity::Warning), 0.95, Priority::Medium),
            (Some(Severity::Info), 0.95, Priority::Low),
            (None, 0.95, Priority::Low),
        ];
        for (severity, confidence, want) in cases {
            let a = analysis(5, severity, &[]);
            assert_eq!(
                priority_for(&a, confidence),
                want,
                "{severity:?} {confidence}"
            );
        }
    }

    #[test]
    fn plan_sets_priority_on_policy_and_actions() {
        let a = analysis(
            5,
            Some(Severity::Critical),
            &[
                (RootCause::ValidationLatency, 0.85),
                (RootCause::NodeCrash, 0.7),
            ],
        );
        let p = policies(plan_default(&a));
        for pol in &p {
            let want = if pol.root_cause == RootCause::ValidationLatency {
                Priority::Critical
            } else {
                Priority::High
            };
            assert_eq!(pol.priority, want, "{}", pol.root_cause);
            assert!(pol.actions.iter().all(|a| a.priority == want));
        }
        assert_eq!(p.len(), 2);
    }

    // ---- policy fields ----

    #[test]
    fn policy_carries_analysis_context() {
        let p = one_policy(RootCause::CascadeFailure, Severity::Warning);
        assert!(p.id.starts_with("pol-"), "{}", p.id);
        assert_eq!(p.chain_id, "chain-1");
        assert_eq!(p.analysis_id, "ana-1");
        assert_eq!(p.created_at, now());
        assert_eq!(p.root_cause, RootCause::CascadeFailure);
        assert_eq!(p.violations_at_planning, 5);
        assert_eq!(
            p.scope,
            vec!["committee".to_string(), "validator".to_string()]
        );
        assert!(p.actions.iter().all(|a| a.target == "committee"));
        assert_eq!(p.risk_level, RiskLevel::High);
        assert_eq!(p.approval_status, ApprovalStatus::Pending);
        assert!(p.decisions.is_empty());
        assert!(p.expected_impact.contains("cascade_failure"));

        let si = one_policy(RootCause::SystemInstability, Severity::Warning);
        assert_eq!(si.risk_level, RiskLevel::Medium);
        assert_ne!(si.id, p.id);
    }

    #[test]
    fn target_defaults_to_charter() {
        let mut a = analysis(5, None, &[(RootCause::NodeCrash, 0.9)]);
        a.components.clear();
        let p = policies(plan_default(&a));
        assert_eq!(p[0].actions[0].target, DEFAULT_TARGET);
        assert_eq!(DEFAULT_TARGET, "charter");
    }

    // ---- rollback ----

    #[test]
    fn rollback_per_action_type() {
        let settings = PlanSettings::default();
        let cases: [(ActionType, Option<(ActionType, Value)>); 10] = [
            (
                ActionType::ScaleUp,
                Some((ActionType::ScaleDown, json!({"replicas_delta": 2}))),
            ),
            (
                ActionType::ScaleDown,
                Some((ActionType::ScaleUp, json!({"replicas_delta": 2}))),
            ),
            (ActionType::RestartService, None),
            (
                ActionType::ApplyPolicy,
                Some((ActionType::ApplyPolicy, json!({"rollback": true}))),
            ),
            (
                ActionType::BypassValidation,
                Some((ActionType::BypassValidation, json!({"duration_seconds": 0}))),
            ),
            (
                ActionType::ThrottleRequests,
                Some((ActionType::ThrottleRequests, json!({"rate_limit": null}))),
            ),
            (
                ActionType::ActivateEmergencyOverride,
                Some((
                    ActionType::ActivateEmergencyOverride,
                    json!({"duration_seconds": 0}),
                )),
            ),
            (ActionType::RebalanceLoad, None),
            (
                ActionType::UpdateConfiguration,
                Some((
                    ActionType::UpdateConfiguration,
                    json!({"restore": "previous"}),
                )),
            ),
            (
                ActionType::Failover,
                Some((ActionType::Failover, json!({"failback": true}))),
            ),
        ];
        for (action, want) in cases {
            let params = default_parameters(action, RootCause::ValidationLatency, &settings);
            let got =
                rollback_for(action, &params).map(|r| (r.action_type, Value::Object(r.parameters)));
            assert_eq!(got, want, "{action}");
        }
    }

    #[test]
    fn scale_rollback_needs_a_delta() {
        assert_eq!(rollback_for(ActionType::ScaleUp, &Map::new()), None);
        let mut p = Map::new();
        p.insert("replicas_delta".into(), json!(7));
        let r = rollback_for(ActionType::ScaleUp, &p).unwrap();
        assert_eq!(r.parameters.get("replicas_delta"), Some(&json!(7)));
        assert!(!r.description.is_empty());
    }

    // ---- approval ----

    #[test]
    fn pending_to_approved() {
        let mut p = one_policy(RootCause::NodeCrash, Severity::Warning);
        decide(
            &mut p,
            ApprovalStatus::Approved,
            "alice",
            Some("looks right".into()),
            now(),
        )
        .unwrap();
        assert_eq!(p.approval_status, ApprovalStatus::Approved);
        assert_eq!(
            p.decisions,
            vec![ApprovalDecision {
                status: ApprovalStatus::Approved,
                by: "alice".into(),
                at: now(),
                reason: Some("looks right".into()),
            }]
        );
    }

    #[test]
    fn pending_to_rejected() {
        let mut p = one_policy(RootCause::NodeCrash, Severity::Warning);
        decide(&mut p, ApprovalStatus::Rejected, "bob", None, now()).unwrap();
        assert_eq!(p.approval_status, ApprovalStatus::Rejected);
        assert_eq!(p.decisions.len(), 1);
    }

    #[test]
    fn approved_to_rejected_is_an_error() {
        let mut p = one_policy(RootCause::NodeCrash, Severity::Warning);
        decide(&mut p, ApprovalStatus::Approved, "alice", None, now()).unwrap();
        let before = p.clone();
        let err = decide(&mut p, ApprovalStatus::Rejected, "bob", None, now()).unwrap_err();
        assert_eq!(
            err,
            ApprovalError::AlreadyDecided {
                id: p.id.clone(),
                status: ApprovalStatus::Approved
            }
        );
        assert!(err.to_string().contains("approved"), "{err}");
        assert_eq!(p, before);
    }

    #[test]
    fn rejected_to_approved_is_an_error() {
        let mut p = one_policy(RootCause::NodeCrash, Severity::Warning);
        decide(&mut p, ApprovalStatus::Rejected, "alice", None, now()).unwrap();
        let err = decide(&mut p, ApprovalStatus::Approved, "bob", None, now()).unwrap_err();
        assert!(matches!(
            err,
            ApprovalError::AlreadyDecided {
                status: ApprovalStatus::Rejected,
                ..
            }
        ));
        assert_eq!(p.approval_status, ApprovalStatus::Rejected);
        assert_eq!(p.decisions.len(), 1);
    }

    #[test]
    fn pending_is_not_a_decision_and_a_decider_is_required() {
        let mut p = one_policy(RootCause::NodeCrash, Severity::Warning);
        assert_eq!(
            decide(&mut p, ApprovalStatus::Pending, "alice", None, now()),
            Err(ApprovalError::InvalidTarget {
                id: p.id.clone(),
                target: ApprovalStatus::Pending
            })
        );
        assert_eq!(
            decide(&mut p, ApprovalStatus::Approved, "  ", None, now()),
            Err(ApprovalError::MissingDecider { id: p.id.clone() })
        );
        assert_eq!(p.approval_status, ApprovalStatus::Pending);
        assert!(p.decisions.is_empty());
    }

    #[test]
    fn auto_approval_by_risk() {
        let high = one_policy(RootCause::CascadeFailure, Severity::Warning);
        let medium = one_policy(RootCause::ValidationLatency, Severity::Warning);
        assert_eq!(high.risk_level, RiskLevel::High);
        assert_eq!(medium.risk_level, RiskLevel::Medium);

        let defaults = PlanSettings::default();
        assert!(
            !auto_approvable(&high, &defaults),
            "high risk waits by default"
        );
        assert!(auto_approvable(&medium, &defaults));

        let off = PlanSettings {
            auto_approve: false,
            ..PlanSettings::default()
        };
        assert!(!auto_approvable(&medium, &off));

        let low_only = PlanSettings {
            auto_approve_max_risk: RiskLevel::Low,
            ..PlanSettings::default()
        };
        assert!(!auto_approvable(&medium, &low_only));

        let all = PlanSettings {
            auto_approve_max_risk: RiskLevel::High,
            ..PlanSettings::default()
        };
        assert!(auto_approvable(&high, &all));
    }

    #[test]
    fn apply_auto_approval_records_auto_decision_once() {
        let settings = PlanSettings::default();
        let mut medium = one_policy(RootCause::ValidationLatency, Severity::Warning);
        assert!(apply_auto_approval(&mut medium, &settings, now()));
        assert_eq!(medium.approval_status, ApprovalStatus::Approved);
        assert_eq!(medium.decisions.len(), 1);
        assert_eq!(medium.decisions[0].by, AUTO_APPROVER);
        assert!(!apply_auto_approval(&mut medium, &settings, now()));
        assert_eq!(medium.decisions.len(), 1);

        let mut high = one_policy(RootCause::NetworkPartition, Severity::Warning);
        assert!(!apply_auto_approval(&mut high, &settings, now()));
        assert_eq!(high.approval_status, ApprovalStatus::Pending);
    }

    #[test]
    fn the_remedy_targets_and_scopes_the_causes_own_components() {
        let mut a = analysis(3, Some(Severity::Critical), &[(RootCause::NodeCrash, 0.85)]);
        a.components = vec!["api".into(), "db".into()];
        a.root_causes[0].components = vec!["db".into()];
        let PlanDecision::Policies(ps) = plan(
            &a,
            &LearnedStats::default(),
            &PlanSettings::default(),
            now(),
        ) else {
            panic!("expected policies");
        };
        assert_eq!(
            ps[0].actions[0].target, "db",
            "not the alphabetically first component of the window"
        );
        assert_eq!(ps[0].scope, vec!["db".to_string()]);
        // Without attribution the analysis' components are the fallback.
        a.root_causes[0].components.clear();
        let PlanDecision::Policies(ps) = plan(
            &a,
            &LearnedStats::default(),
            &PlanSettings::default(),
            now(),
        ) else {
            panic!("expected policies");
        };
        assert_eq!(ps[0].actions[0].target, "api");
        assert_eq!(ps[0].scope, vec!["api".to_string(), "db".to_string()]);
    }
}
