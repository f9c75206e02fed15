//! Knowledge: judging executions and learning from them.
//!
//! Plain logic, no I/O: [`classify`] turns violation counts measured before
//! and after a remediation into an [`OutcomeType`], [`outcome_of`] builds the
//! [`PolicyOutcome`] of an execution, [`LearnedStats::record`] folds an
//! outcome into the running statistics in `O(actions)`, and
//! [`generate_insights`] turns the statistics into human-readable rules.
//! Persistence lives in [`crate::store`].

use crate::model::{
    remedy_key, ActionStats, ActionType, LearnedStats, LearningInsight, OutcomeType,
    PolicyExecution, PolicyOutcome, RootCause, Timestamp,
};

/// Success rate below which an action (with enough executions) is reported
/// as one to avoid.
pub const AVOID_SUCCESS_RATE: f64 = 0.3;

/// Executions needed before an action may be reported as one to avoid.
pub const AVOID_MIN_EXECUTIONS: u64 = 3;

/// Classifies the effect of a remediation from the violations in scope
/// before acting and after the verification window.
///
/// Edges, checked in this order:
/// - either count missing (`None`): [`OutcomeType::Unknown`] — no evidence,
///   never assumed success;
/// - `after > before`: [`OutcomeType::Degradation`];
/// - `after == 0`: [`OutcomeType::Success`], including `0 → 0` (nothing was
///   left to resolve and nothing is left);
/// - more than half resolved, `(before − after) / before > 0.5`:
///   [`OutcomeType::Partial`];
/// - otherwise (half or less, including exactly 50 % and `n → n`):
///   [`OutcomeType::Ineffective`].
///
/// The fraction is compared in integers (`2 × resolved > before`), so the
/// 50 % edge is exact.
pub fn classify(before: Option<usize>, after: Option<usize>) -> OutcomeType {
    let (Some(before), Some(after)) = (before, after) else {
        return OutcomeType::Unknown;
    };
    if after > before {
        OutcomeType::Degradation
    } else if after == 0 {
        OutcomeType::Success
    } else {
        // Here 0 < after <= before, so before > 0.
        let resolved = (before - after) as u128;
        if 2 * resolved > before as u128 {
            OutcomeType::Partial
        } else {
            OutcomeType::Ineffective
        }
    }
}

/// Builds the outcome of `execution` as measured at `measured_at`.
///
/// The class comes from [`classify`] over the execution's
/// `violations_before` / `violations_after`; `violations_resolved` is
/// `before − after` floored at 0 (0 when either count is missing);
/// `time_to_effect_seconds` is `measured_at − started_at`, floored at 0 (a
/// clock step backwards must not produce a negative duration);
/// `success_confidence` is the class confidence.
pub fn outcome_of(
    execution: &PolicyExecution,
    actions: Vec<ActionType>,
    measured_at: Timestamp,
) -> PolicyOutcome {
    let before = execution.violations_before;
    let after = execution.violations_after;
    let outcome_type = classify(before, after);
    let violations_resolved = match (before, after) {
        (Some(b), Some(a)) => b.saturating_sub(a),
        _ => 0,
    };
    let elapsed = measured_at.signed_duration_since(execution.started_at);
    let time_to_effect_seconds = (elapsed.num_milliseconds() as f64 / 1000.0).max(0.0);
    PolicyOutcome {
        execution_id: execution.id.clone(),
        policy_id: execution.policy_id.clone(),
        root_cause: execution.root_cause,
        actions,
        executed_at: execution.started_at,
        outcome_type,
        violations_before: before,
        violations_after: after,
        violations_resolved,
        time_to_effect_seconds,
        success_confidence: outcome_type.confidence(),
    }
}

impl ActionStats {
    /// Folds one outcome into these statistics in `O(1)`.
    ///
    /// Every outcome is counted in `outcomes` by class. An
    /// [`OutcomeType::Unknown`] outcome stops there: it is no evidence, so it
    /// changes neither `executions`, `successes`, `success_rate`, the means
    /// nor `confidence` (no evidence must not teach anything). Otherwise
    /// `executions` grows by one, `successes` when the class
    /// [`is_success`](OutcomeType::is_success) (SUCCESS or PARTIAL), the
    /// means of time to effect and violations resolved are updated as
    /// running means, and `confidence = min(1, executions / saturation)`
    /// (a `saturation` of 0 is treated as 1).
    pub fn record(&mut self, outcome: &PolicyOutcome, saturation: u32) {
        *self.outcomes.entry(outcome.outcome_type).or_insert(0) += 1;
        if outcome.outcome_type == OutcomeType::Unknown {
            return;
        }
        self.executions += 1;
        if outcome.outcome_type.is_success() {
            self.successes += 1;
        }
        let n = self.executions as f64;
        self.success_rate = self.successes as f64 / n;
        self.mean_time_to_effect_seconds +=
            (outcome.time_to_effect_seconds - self.mean_time_to_effect_seconds) / n;
        self.mean_violations_resolved +=
            (outcome.violations_resolved as f64 - self.mean_violations_resolved) / n;
        self.confidence = (n / f64::from(saturation.max(1))).min(1.0);
    }

    /// Moves one outcome from class `from` to class `to`.
    pub fn reclassify(&mut self, from: OutcomeType, to: OutcomeType) {
        if let Some(n) = self.outcomes.get_mut(&from) {
            *n = n.saturating_sub(1);
        }
        *self.outcomes.entry(to).or_insert(0) += 1;
        match (from.is_success(), to.is_success()) {
            (true, false) => self.successes = self.successes.saturating_sub(1),
            (false, true) => self.successes += 1,
            _ => {}
        }
        if self.executions > 0 {
            self.success_rate = self.successes as f64 / self.executions as f64;
        }
    }

    /// `success_rate × confidence`: the rate, discounted by how little
    /// evidence backs it.
    pub fn weighted_success(&self) -> f64 {
        self.success_rate * self.confidence
    }

    /// Outcomes of class `kind` counted so far.
    pub fn count(&self, kind: OutcomeType) -> u64 {
        self.outcomes.get(&kind).copied().unwrap_or(0)
    }
}

impl LearnedStats {
    /// Folds one outcome into the statistics, in `O(actions)`.
    ///
    /// `outcomes_recorded` counts every outcome. Each distinct action type of
    /// the outcome is recorded once (a policy with two `SCALE_UP` steps is
    /// one execution of `SCALE_UP`) in `by_action` and in
    /// `by_cause[root_cause]`, with the rules of [`ActionStats::record`]
    /// (UNKNOWN outcomes are counted by class only).
    pub fn record(&mut self, outcome: &PolicyOutcome, saturation: u32) {
        self.outcomes_recorded += 1;
        if outcome.outcome_type != OutcomeType::Unknown {
            let r = self
                .by_remedy
                .entry(outcome.root_cause)
                .or_default()
                .entry(remedy_key(&outcome.actions))
                .or_default();
            if outcome.outcome_type.is_success() {
                r.successes += 1;
            } else {
                r.failures += 1;
            }
        }
        let mut seen = [false; ActionType::ALL.len()];
        let by_cause = self.by_cause.entry(outcome.root_cause).or_default();
        for &action in &outcome.actions {
            let slot = action as usize;
            if seen.get(slot).copied().unwrap_or(false) {
                continue;
            }
            if let Some(s) = seen.get_mut(slot) {
                *s = true;
            }
            self.by_action
                .entry(action)
                .or_default()
                .record(outcome, saturation);
            by_cause
                .entry(action)
                .or_default()
                .record(outcome, saturation);
        }
    }

    /// Re-classifies an outcome already folded in (`from`) as `to` (a
    /// success whose symptoms came back becomes RECURRED): the counts move
    /// from one class to the other, in `O(actions)`. Nothing changes when
    /// `from` was UNKNOWN (never counted as evidence) or equals `to`.
    pub fn reclassify(
        &mut self,
        cause: RootCause,
        actions: &[ActionType],
        from: OutcomeType,
        to: OutcomeType,
    ) {
        if from == to || from == OutcomeType::Unknown || to == OutcomeType::Unknown {
            return;
        }
        if let Some(r) = self
            .by_remedy
            .get_mut(&cause)
            .and_then(|m| m.get_mut(&remedy_key(actions)))
        {
            match (from.is_success(), to.is_success()) {
                (true, false) => {
                    r.successes = r.successes.saturating_sub(1);
                    r.failures += 1;
                }
                (false, true) => {
                    r.failures = r.failures.saturating_sub(1);
                    r.successes += 1;
                }
                _ => {}
            }
        }
        let mut seen = [false; ActionType::ALL.len()];
        for &action in actions {
            let slot = action as usize;
            if seen.get(slot).copied().unwrap_or(false) {
                continue;
            }
            if let Some(s) = seen.get_mut(slot) {
                *s = true;
            }
            if let Some(s) = self.by_action.get_mut(&action) {
                s.reclassify(from, to);
            }
            if let Some(s) = self
                .by_cause
                .get_mut(&cause)
                .and_then(|m| m.get_mut(&action))
            {
                s.reclassify(from, to);
            }
        }
    }

    /// The action that has worked best against `cause`: the highest
    /// `success_rate × confidence`; ties go to more executions, then to the
    /// action listed first in [`ActionType`].
    ///
    /// `None` when nothing has been learned for `cause`, or when no action
    /// has ever succeeded against it (an action that never worked is no
    /// recommendation).
    pub fn best_action_for_cause(&self, cause: RootCause) -> Option<(ActionType, &ActionStats)> {
        let mut best: Option<(ActionType, &ActionStats, f64)> = None;
        for (&action, stats) in self.by_cause.get(&cause)? {
            if stats.executions == 0 || stats.successes == 0 {
                continue;
            }
            let score = stats.weighted_success();
            let better = match &best {
                None => true,
                Some((b_action, b_stats, b_score)) => score
                    .total_cmp(b_score)
                    .then(stats.executions.cmp(&b_stats.executions))
                    .then(b_action.cmp(&action))
                    .is_gt(),
            };
            if better {
                best = Some((action, stats, score));
            }
        }
        best.map(|(a, s, _)| (a, s))
    }
}

fn percent(rate: f64) -> String {
    format!("{:.0}%", rate * 100.0)
}

fn cases(n: u64) -> String {
    if n == 1 {
        "1 case".to_string()
    } else {
        format!("{n} cases")
    }
}

/// Turns the learned statistics into insights, in `O(number of entries)`:
///
/// - per root cause, its [best action](LearnedStats::best_action_for_cause)
///   (`"SCALE_UP resolves validation_latency in 80% of 10 cases"`);
/// - per (cause, action) with at least [`AVOID_MIN_EXECUTIONS`] executions
///   and a success rate below [`AVOID_SUCCESS_RATE`], an "avoid" insight;
/// - per (cause, action) not already reported as "avoid" that made things
///   worse at least once, a degradation insight.
///
/// Each insight's confidence is the sample-size confidence of the statistics
/// it comes from. The order is deterministic (causes, then actions, in
/// declaration order).
pub fn generate_insights(stats: &LearnedStats, now: Timestamp) -> Vec<LearningInsight> {
    let mut out = Vec::new();
    for (&cause, actions) in &stats.by_cause {
        if let Some((action, s)) = stats.best_action_for_cause(cause) {
            out.push(LearningInsight {
                title: format!(
                    "{action} resolves {cause} in {} of {}",
                    percent(s.success_rate),
                    cases(s.executions)
                ),
                root_cause: Some(cause),
                action: Some(action),
                confidence: s.confidence,
                recommendations: vec![format!(
                    "Prefer {action} for {cause}: mean {:.1} violations resolved, \
                     mean time to effect {:.0} s",
                    s.mean_violations_resolved, s.mean_time_to_effect_seconds
                )],
                generated_at: now,
            });
        }
        for (&action, s) in actions {
            let degradations = s.count(OutcomeType::Degradation);
            if s.executions >= AVOID_MIN_EXECUTIONS && s.success_rate < AVOID_SUCCESS_RATE {
                let mut recommendations = vec![format!(
                    "Avoid {action} for {cause}; plan another action or ask an operator"
                )];
                if degradations > 0 {
                    recommendations.push(format!(
                        "{action} made {cause} worse in {} of {}",
                        degradations,
                        cases(s.executions)
                    ));
                }
                out.push(LearningInsight {
                    title: format!(
                        "avoid {action} for {cause}: it worked in only {} of {}",
                        percent(s.success_rate),
                        cases(s.executions)
                    ),
                    root_cause: Some(cause),
                    action: Some(action),
                    confidence: s.confidence,
                    recommendations,
                    generated_at: now,
                });
            } else if degradations > 0 {
                out.push(LearningInsight {
                    title: format!(
                        "{action} made {cause} worse in {} of {}",
                        degradations,
                        cases(s.executions)
                    ),
                    root_cause: Some(cause),
                    action: Some(action),
                    confidence: s.confidence,
                    recommendations: vec![format!(
                        "Review {action} for {cause}: check its parameters and rollback"
                    )],
                    generated_at: now,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChainTimings, ExecutionStatus};
    use chrono::{Duration, TimeZone, Utc};

    fn t0() -> Timestamp {
        Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, 0).unwrap()
    }

    fn outcome(
        cause: RootCause,
        actions: &[ActionType],
        kind: OutcomeType,
        resolved: usize,
        tte: f64,
    ) -> PolicyOutcome {
        PolicyOutcome {
            execution_id: "exe-1".into(),
            policy_id: "pol-1".into(),
            root_cause: cause,
            actions: actions.to_vec(),
            executed_at: t0(),
            outcome_type: kind,
            violations_before: Some(10),
            violations_after: Some(10 - resolved.min(10)),
            violations_resolved: resolved,
            time_to_effect_seconds: tte,
            success_confidence: kind.confidence(),
        }
    }

    fn execution(before: Option<usize>, after: Option<usize>) -> PolicyExecution {
        PolicyExecution {
            id: "exe-7".into(),
            policy_id: "pol-7".into(),
            chain_id: "chain-7".into(),
            root_cause: RootCause::ValidationLatency,
            status: ExecutionStatus::Completed,
            actions: vec![],
            started_at: t0(),
            finished_at: None,
            success_rate: 1.0,
            error: None,
            violations_before: before,
            violations_after: after,
            outcome: None,
            timings: ChainTimings::default(),
            incident_id: None,
            interrupted: false,
            acted_as: None,
        }
    }

    #[test]
    fn classify_edges() {
        use OutcomeType::*;
        assert_eq!(classify(None, Some(0)), Unknown);
        assert_eq!(classify(Some(3), None), Unknown);
        assert_eq!(classify(None, None), Unknown);
        assert_eq!(classify(Some(0), Some(0)), Success);
        assert_eq!(classify(Some(10), Some(0)), Success);
        assert_eq!(classify(Some(0), Some(1)), Degradation);
        assert_eq!(classify(Some(10), Some(11)), Degradation);
        assert_eq!(classify(Some(10), Some(5)), Ineffective, "exactly half");
        assert_eq!(classify(Some(10), Some(4)), Partial);
        assert_eq!(classify(Some(10), Some(6)), Ineffective);
        assert_eq!(classify(Some(10), Some(10)), Ineffective);
        assert_eq!(classify(Some(1), Some(1)), Ineffective);
        assert_eq!(classify(Some(3), Some(1)), Partial, "2/3 resolved");
        assert_eq!(classify(Some(2), Some(1)), Ineffective, "1/2 resolved");
        assert_eq!(classify(Some(usize::MAX), Some(1)), Partial);
        assert_eq!(classify(Some(usize::MAX), Some(usize::MAX / 2)), Partial);
        assert_eq!(
            classify(Some(usize::MAX), Some(usize::MAX / 2 + 1)),
            Ineffective
        );
    }

    #[test]
    fn outcome_of_fills_fields() {
        let e = execution(Some(10), Some(4));
        let o = outcome_of(
            &e,
            vec![ActionType::ScaleUp],
            t0() + Duration::milliseconds(42_500),
        );
        assert_eq!(o.outcome_type, OutcomeType::Partial);
        assert_eq!(o.violations_resolved, 6);
        assert_eq!(o.time_to_effect_seconds, 42.5);
        assert_eq!(o.success_confidence, 0.70);
        assert_eq!(o.execution_id, "exe-7");
        assert_eq!(o.policy_id, "pol-7");
        assert_eq!(o.root_cause, RootCause::ValidationLatency);
        assert_eq!(o.executed_at, t0());
        assert_eq!(o.actions, vec![ActionType::ScaleUp]);

        // Degradation: resolved floored at 0; clock skew: time floored at 0.
        let o = outcome_of(
            &execution(Some(2), Some(5)),
            vec![],
            t0() - Duration::seconds(3),
        );
        assert_eq!(o.outcome_type, OutcomeType::Degradation);
        assert_eq!(o.violations_resolved, 0);
        assert_eq!(o.time_to_effect_seconds, 0.0);
        assert_eq!(o.success_confidence, 0.0);

        let o = outcome_of(&execution(Some(2), None), vec![], t0());
        assert_eq!(o.outcome_type, OutcomeType::Unknown);
        assert_eq!(o.violations_resolved, 0);
        assert_eq!(o.success_confidence, 0.5);
    }

    #[test]
    fn running_means_exact() {
        let mut s = LearnedStats::default();
        let c = RootCause::ValidationLatency;
        let a = ActionType::ScaleUp;
        s.record(&outcome(c, &[a], OutcomeType::Success, 10, 10.0), 30);
        s.record(&outcome(c, &[a], OutcomeType::Ineffective, 2, 20.0), 30);
        s.record(&outcome(c, &[a], OutcomeType::Partial, 6, 30.0), 30);
        s.record(&outcome(c, &[a], OutcomeType::Degradation, 0, 60.0), 30);
        let st = s.get(c, a).unwrap();
        assert_eq!(st.executions, 4);
        assert_eq!(st.successes, 2);
        assert_eq!(st.success_rate, 0.5);
        assert_eq!(st.mean_time_to_effect_seconds, 30.0);
        assert_eq!(st.mean_violations_resolved, 4.5);
        assert_eq!(st.confidence, 4.0 / 30.0);
        assert_eq!(st.count(OutcomeType::Success), 1);
        assert_eq!(st.count(OutcomeType::Partial), 1);
        assert_eq!(st.count(OutcomeType::Ineffective), 1);
        assert_eq!(st.count(OutcomeType::Degradation), 1);
        assert_eq!(st.count(OutcomeType::Unknown), 0);
        assert_eq!(s.by_action.get(&a), Some(st));
        assert_eq!(s.outcomes_recorded, 4);
    }

    #[test]
    fn every_action_of_an_outcome_counts_once() {
        let mut s = LearnedStats::default();
        let c = RootCause::InsufficientCapacity;
        let o = outcome(
            c,
            &[
                ActionType::ScaleUp,
                ActionType::RebalanceLoad,
                ActionType::ScaleUp,
            ],
            OutcomeType::Success,
            10,
            5.0,
        );
        s.record(&o, 30);
        assert_eq!(s.by_action.len(), 2);
        assert_eq!(s.by_action[&ActionType::ScaleUp].executions, 1);
        assert_eq!(s.by_action[&ActionType::RebalanceLoad].executions, 1);
        assert_eq!(s.get(c, ActionType::ScaleUp).unwrap().executions, 1);
        assert_eq!(s.get(c, ActionType::RebalanceLoad).unwrap().successes, 1);
        // by_action aggregates over causes, by_cause does not.
        s.record(
            &outcome(
                RootCause::NodeCrash,
                &[ActionType::ScaleUp],
                OutcomeType::Ineffective,
                1,
                5.0,
            ),
            30,
        );
        assert_eq!(s.by_action[&ActionType::ScaleUp].executions, 2);
        assert_eq!(s.by_action[&ActionType::ScaleUp].success_rate, 0.5);
        assert_eq!(s.get(c, ActionType::ScaleUp).unwrap().executions, 1);
    }

    #[test]
    fn confidence_saturates() {
        let mut s = LearnedStats::default();
        let c = RootCause::NodeCrash;
        let a = ActionType::RestartService;
        let o = outcome(c, &[a], OutcomeType::Success, 10, 1.0);
        for _ in 0..29 {
            s.record(&o, 30);
        }
        let conf = s.get(c, a).unwrap().confidence;
        assert!(conf < 1.0, "{conf}");
        assert_eq!(conf, 29.0 / 30.0);
        s.record(&o, 30);
        assert_eq!(s.get(c, a).unwrap().confidence, 1.0);
        s.record(&o, 30);
        assert_eq!(s.get(c, a).unwrap().confidence, 1.0);
        assert_eq!(s.get(c, a).unwrap().executions, 31);

        // A saturation of 0 behaves like 1.
        let mut z = ActionStats::default();
        z.record(&o, 0);
        assert_eq!(z.confidence, 1.0);
    }

    #[test]
    fn unknown_is_counted_but_teaches_nothing() {
        let mut s = LearnedStats::default();
        let c = RootCause::ValidationLatency;
        let a = ActionType::ScaleUp;
        s.record(&outcome(c, &[a], OutcomeType::Unknown, 0, 99.0), 30);
        let st = s.get(c, a).unwrap();
        assert_eq!(st.executions, 0);
        assert_eq!(st.successes, 0);
        assert_eq!(st.success_rate, 0.0);
        assert_eq!(st.confidence, 0.0);
        assert_eq!(st.mean_time_to_effect_seconds, 0.0);
        assert_eq!(st.count(OutcomeType::Unknown), 1);
        assert_eq!(s.outcomes_recorded, 1);
        assert_eq!(s.best_action_for_cause(c), None);

        s.record(&outcome(c, &[a], OutcomeType::Success, 4, 10.0), 30);
        s.record(&outcome(c, &[a], OutcomeType::Unknown, 0, 500.0), 30);
        let st = s.get(c, a).unwrap();
        assert_eq!(st.executions, 1);
        assert_eq!(st.success_rate, 1.0);
        assert_eq!(st.mean_time_to_effect_seconds, 10.0);
        assert_eq!(st.mean_violations_resolved, 4.0);
        assert_eq!(st.count(OutcomeType::Unknown), 2);
        assert_eq!(s.outcomes_recorded, 3);
    }

    #[test]
    fn best_action_ranking_and_ties() {
        let c = RootCause::ValidationLatency;
        let mut s = LearnedStats::default();
        assert_eq!(s.best_action_for_cause(c), None);

        let rec = |s: &mut LearnedStats, a: ActionType, kind: OutcomeType, n: usize| {
            for _ in 0..n {
                s.record(&outcome(c, &[a], kind, 1, 1.0), 30);
            }
        };
        // Evidence of failure only: no recommendation.
        rec(
            &mut s,
            ActionType::BypassValidation,
            OutcomeType::Ineffective,
            5,
        );
        assert_eq!(s.best_action_for_cause(c), None);

        // 1/1 success (score 1 × 1/30) vs 9/10 (score 0.9 × 10/30): more
        // evidence wins.
        rec(&mut s, ActionType::RestartService, OutcomeType::Success, 1);
        rec(&mut s, ActionType::ScaleUp, OutcomeType::Success, 9);
        rec(&mut s, ActionType::ScaleUp, OutcomeType::Ineffective, 1);
        assert_eq!(s.best_action_for_cause(c).unwrap().0, ActionType::ScaleUp);

        // Tie on score (both 0 < rate × conf equal) → more executions wins:
        // 2/2 with saturation 1 (score 1) vs 3/3 (score 1).
        let mut t = LearnedStats::default();
        for _ in 0..2 {
            t.record(
                &outcome(c, &[ActionType::ScaleUp], OutcomeType::Success, 1, 1.0),
                1,
            );
        }
        for _ in 0..3 {
            t.record(
                &outcome(c, &[ActionType::Failover], OutcomeType::Success, 1, 1.0),
                1,
            );
        }
        let (a, st) = t.best_action_for_cause(c).unwrap();
        assert_eq!(a, ActionType::Failover);
        assert_eq!(st.executions, 3);

        // Full tie → ActionType order (ScaleUp before Failover).
        t.record(
            &outcome(c, &[ActionType::ScaleUp], OutcomeType::Success, 1, 1.0),
            1,
        );
        assert_eq!(t.best_action_for_cause(c).unwrap().0, ActionType::ScaleUp);
        // Order of insertion does not matter.
        let mut u = LearnedStats::default();
        for a in [ActionType::Failover, ActionType::ScaleUp] {
            u.record(&outcome(c, &[a], OutcomeType::Success, 1, 1.0), 30);
        }
        assert_eq!(u.best_action_for_cause(c).unwrap().0, ActionType::ScaleUp);
        // Other causes are unaffected.
        assert_eq!(u.best_action_for_cause(RootCause::NodeCrash), None);
    }

    #[test]
    fn insights_best_avoid_degradation() {
        let c = RootCause::ValidationLatency;
        let mut s = LearnedStats::default();
        for i in 0..10 {
            let kind = if i < 8 {
                OutcomeType::Success
            } else {
                OutcomeType::Ineffective
            };
            s.record(&outcome(c, &[ActionType::ScaleUp], kind, 3, 40.0), 30);
        }
        // 0/3 with one degradation → avoid (mentions the degradation).
        for kind in [
            OutcomeType::Ineffective,
            OutcomeType::Ineffective,
            OutcomeType::Degradation,
        ] {
            s.record(
                &outcome(c, &[ActionType::BypassValidation], kind, 0, 5.0),
                30,
            );
        }
        // 1/2 with a degradation: too few for "avoid", but degradation noted.
        s.record(
            &outcome(
                RootCause::NodeCrash,
                &[ActionType::Failover],
                OutcomeType::Degradation,
                0,
                5.0,
            ),
            30,
        );
        s.record(
            &outcome(
                RootCause::NodeCrash,
                &[ActionType::Failover],
                OutcomeType::Success,
                2,
                5.0,
            ),
            30,
        );

        let now = t0();
        let ins = generate_insights(&s, now);
        let titles: Vec<&str> = ins.iter().map(|i| i.title.as_str()).collect();
        assert_eq!(
            titles,
            vec![
                "SCALE_UP resolves validation_latency in 80% of 10 cases",
                "avoid BYPASS_VALIDATION for validation_latency: it worked in only 0% of 3 cases",
                "FAILOVER resolves node_crash in 50% of 2 cases",
                "FAILOVER made node_crash worse in 1 of 2 cases",
            ]
        );
        assert_eq!(ins[0].action, Some(ActionType::ScaleUp));
        assert_eq!(ins[0].root_cause, Some(c));
        assert_eq!(ins[0].confidence, 10.0 / 30.0);
        assert_eq!(ins[1].recommendations.len(), 2);
        assert!(ins.iter().all(|i| i.generated_at == now));
        assert!(generate_insights(&LearnedStats::default(), now).is_empty());
    }
}
