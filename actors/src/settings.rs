//! Settings of each phase, as they appear in the config file.
//!
//! Every struct deserialises with defaults for missing keys; unknown keys are
//! detected by the daemon's config loader (which reports all of them at once,
//! with their paths). `validate` methods push every problem they find instead
//! of stopping at the first one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{ActionType, RiskLevel, Severity, Signal};

/// One configuration problem: the dotted key path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted path of the key (`monitor.interval_seconds`).
    pub path: String,
    /// Why it is wrong.
    pub reason: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Collects issues under a path prefix.
pub struct Issues<'a> {
    prefix: String,
    out: &'a mut Vec<ConfigIssue>,
}

impl<'a> Issues<'a> {
    /// Starts collecting under `prefix` into `out`.
    pub fn new(prefix: &str, out: &'a mut Vec<ConfigIssue>) -> Self {
        Issues {
            prefix: prefix.to_string(),
            out,
        }
    }

    /// Records `reason` for key `key` under the prefix.
    pub fn push(&mut self, key: &str, reason: impl Into<String>) {
        let path = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.prefix, key)
        };
        self.out.push(ConfigIssue {
            path,
            reason: reason.into(),
        });
    }

    /// Records an issue when `value < min`.
    pub fn at_least<T: PartialOrd + std::fmt::Display>(&mut self, key: &str, value: T, min: T) {
        if value < min {
            self.push(key, format!("must be at least {min} (got {value})"));
        }
    }

    /// Records an issue when `value` is outside `lo..=hi`.
    pub fn within(&mut self, key: &str, value: f64, lo: f64, hi: f64) {
        if !(lo..=hi).contains(&value) || value.is_nan() {
            self.push(key, format!("must be between {lo} and {hi} (got {value})"));
        }
    }
}

/// A PromQL rule polled by the Monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleSpec {
    /// Rule name (unique).
    pub name: String,
    /// PromQL expression; every series it returns is a violation.
    pub expr: String,
    /// Severity of its violations.
    pub severity: Severity,
    /// Component its violations are attributed to (a `component` label on a
    /// series overrides it).
    pub component: String,
    /// Kind of symptom; inferred from the expression when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Signal>,
}

impl RuleSpec {
    /// Signal of the rule: declared, or inferred from its name and expression.
    pub fn signal(&self) -> Signal {
        self.signal.unwrap_or_else(|| {
            let s = Signal::infer(&self.expr);
            if s == Signal::Other {
                Signal::infer(&self.name)
            } else {
                s
            }
        })
    }
}

/// The default rules watching the managed "Charter" system.
pub fn default_rules() -> Vec<RuleSpec> {
    vec![
        RuleSpec {
            name: "CharterCriticalPolicyViolations".into(),
            expr:
                "increase(westworld_charter_policy_violations_total{severity=\"critical\"}[5m]) > 0"
                    .into(),
            severity: Severity::Critical,
            component: "charter".into(),
            signal: Some(Signal::Policy),
        },
        RuleSpec {
            name: "CharterValidationLatencyHigh".into(),
            expr: "westworld_charter_validation_latency_seconds > 1".into(),
            severity: Severity::Warning,
            component: "charter".into(),
            signal: Some(Signal::Latency),
        },
        RuleSpec {
            name: "CharterFailureRateHigh".into(),
            expr: "westworld_charter_failure_rate > 0.10".into(),
            severity: Severity::Critical,
            component: "charter".into(),
            signal: Some(Signal::Failure),
        },
        RuleSpec {
            name: "CharterThroughputLow".into(),
            expr: "westworld_charter_throughput_ops_per_sec < 100".into(),
            severity: Severity::Warning,
            component: "charter".into(),
            signal: Some(Signal::Throughput),
        },
        RuleSpec {
            name: "CharterNodesUnhealthy".into(),
            expr: "westworld_charter_replicas - westworld_charter_healthy_nodes > 0".into(),
            severity: Severity::Critical,
            component: "charter".into(),
            signal: Some(Signal::Node),
        },
    ]
}

/// Monitor phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MonitorSettings {
    /// Seconds between polls of the rules (at least 1).
    pub interval_seconds: u64,
    /// A source whose last good answer is older than this many intervals is
    /// stale: no evidence.
    pub stale_after_intervals: u32,
    /// A violation from a source that is not polled (the Alertmanager
    /// webhook) that was not re-sent for this many seconds ends as if
    /// resolved: a lost "resolved" notification cannot keep it alive
    /// forever. Keep it above Alertmanager's `repeat_interval`.
    pub webhook_stale_after_seconds: u64,
    /// Rules to poll.
    pub rules: Vec<RuleSpec>,
}

impl Default for MonitorSettings {
    fn default() -> Self {
        MonitorSettings {
            interval_seconds: 30,
            stale_after_intervals: 3,
            webhook_stale_after_seconds: 3600,
            rules: default_rules(),
        }
    }
}

impl MonitorSettings {
    /// Pushes every problem under `monitor`.
    pub fn validate(&self, out: &mut Vec<ConfigIssue>) {
        let mut i = Issues::new("monitor", out);
        i.at_least("interval_seconds", self.interval_seconds, 1);
        i.at_least("stale_after_intervals", self.stale_after_intervals, 1);
        i.at_least(
            "webhook_stale_after_seconds",
            self.webhook_stale_after_seconds,
            60,
        );
        let mut seen = std::collections::HashSet::new();
        for (n, r) in self.rules.iter().enumerate() {
            if r.name.trim().is_empty() {
                i.push(&format!("rules[{n}].name"), "must not be empty");
            } else if !seen.insert(r.name.as_str()) {
                i.push(
                    &format!("rules[{n}].name"),
                    format!("duplicate rule name `{}`", r.name),
                );
            }
            if r.expr.trim().is_empty() {
                i.push(&format!("rules[{n}].expr"), "must not be empty");
            }
            if r.component.trim().is_empty() {
                i.push(&format!("rules[{n}].component"), "must not be empty");
            }
        }
    }
}

/// One detector's thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DetectorSettings {
    /// Minimum number of violations for the pattern.
    pub min_violations: usize,
    /// Time window of the detector in seconds (temporal and frequency: at
    /// least 1; spatial: 0 = the whole analysis window).
    pub window_seconds: u64,
    /// Confidence reported when it fires.
    pub confidence: f64,
}

impl Default for DetectorSettings {
    fn default() -> Self {
        DetectorSettings {
            min_violations: 3,
            window_seconds: 0,
            confidence: 0.8,
        }
    }
}

impl DetectorSettings {
    fn new(min_violations: usize, window_seconds: u64, confidence: f64) -> Self {
        DetectorSettings {
            min_violations,
            window_seconds,
            confidence,
        }
    }

    fn validate(&self, i: &mut Issues<'_>, name: &str) {
        i.at_least(&format!("{name}.min_violations"), self.min_violations, 1);
        i.within(&format!("{name}.confidence"), self.confidence, 0.0, 1.0);
    }
}

/// Causal detector settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CausalSettings {
    /// Minimum correlation between latency and failure counts per bucket.
    pub min_correlation: f64,
    /// Maximum lag (seconds) between a latency violation and a failure
    /// violation for them to count as cause and effect.
    pub max_lag_seconds: u64,
    /// Width of the buckets the correlation is computed over.
    pub bucket_seconds: u64,
    /// Confidence reported when it fires.
    pub confidence: f64,
}

impl Default for CausalSettings {
    fn default() -> Self {
        CausalSettings {
            min_correlation: 0.8,
            max_lag_seconds: 120,
            bucket_seconds: 30,
            confidence: 0.75,
        }
    }
}

/// Analyze phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnalyzeSettings {
    /// Length of the sliding window of violations, seconds.
    pub window_seconds: u64,
    /// Bound on distinct violations kept in the window (oldest dropped first).
    pub max_window_violations: usize,
    /// Analyses kept in the Analyzer's memory (`GetAnalyses`); the API reads
    /// the audit trail in Knowledge.
    pub max_history: usize,
    /// Sample size at which the sample-size factor of the confidence reaches 1.
    pub sample_size_saturation: usize,
    /// Burst detector: ≥ min_violations within window_seconds.
    pub temporal: DetectorSettings,
    /// Same-component detector.
    pub spatial: DetectorSettings,
    /// Latency → failure detector.
    pub causal: CausalSettings,
    /// Frequency detector: ≥ min_violations within window_seconds.
    pub frequency: DetectorSettings,
    /// Dependency map (component → the components it depends on), from the
    /// top-level `topology` config section: violations on components joined
    /// by a direct edge, with onsets within `causal.max_lag_seconds`, form
    /// one incident.
    #[serde(skip)]
    pub topology: BTreeMap<String, Vec<String>>,
    /// The Planner's `plan_threshold`, copied here so that crossing it
    /// counts as a change of diagnosis.
    #[serde(skip)]
    pub plan_threshold: usize,
}

impl Default for AnalyzeSettings {
    fn default() -> Self {
        AnalyzeSettings {
            window_seconds: 300,
            max_window_violations: 10_000,
            max_history: 100,
            sample_size_saturation: 10,
            temporal: DetectorSettings::new(3, 60, 0.85),
            spatial: DetectorSettings::new(3, 0, 0.80),
            causal: CausalSettings::default(),
            frequency: DetectorSettings::new(9, 300, 0.70),
            topology: BTreeMap::new(),
            plan_threshold: 3,
        }
    }
}

impl AnalyzeSettings {
    /// Pushes every problem under `analyze`.
    pub fn validate(&self, out: &mut Vec<ConfigIssue>) {
        let mut i = Issues::new("analyze", out);
        i.at_least("window_seconds", self.window_seconds, 1);
        i.at_least("max_window_violations", self.max_window_violations, 1);
        i.at_least("max_history", self.max_history, 1);
        i.at_least("sample_size_saturation", self.sample_size_saturation, 1);
        self.temporal.validate(&mut i, "temporal");
        self.spatial.validate(&mut i, "spatial");
        self.frequency.validate(&mut i, "frequency");
        i.at_least("temporal.window_seconds", self.temporal.window_seconds, 1);
        i.at_least("frequency.window_seconds", self.frequency.window_seconds, 1);
        for (key, w) in [
            ("temporal.window_seconds", self.temporal.window_seconds),
            ("frequency.window_seconds", self.frequency.window_seconds),
        ] {
            if w > self.window_seconds {
                i.push(
                    key,
                    format!(
                        "must not exceed analyze.window_seconds ({}) (got {w})",
                        self.window_seconds
                    ),
                );
            }
        }
        i.within(
            "causal.min_correlation",
            self.causal.min_correlation,
            -1.0,
            1.0,
        );
        i.within("causal.confidence", self.causal.confidence, 0.0, 1.0);
        i.at_least("causal.bucket_seconds", self.causal.bucket_seconds, 1);
    }
}

/// Plan phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlanSettings {
    /// Plan only when at least this many distinct violations are in the window.
    pub plan_threshold: usize,
    /// Root causes below this confidence are not planned for.
    pub min_confidence: f64,
    /// At most this many policies per analysis.
    pub max_policies: usize,
    /// Approve policies automatically (up to `auto_approve_max_risk`).
    pub auto_approve: bool,
    /// Highest risk that is auto-approved; riskier policies wait for a person.
    pub auto_approve_max_risk: RiskLevel,
    /// After a policy for a cause was executed, wait this long before
    /// planning for the same cause again (lets the remedy take effect).
    pub cooldown_seconds: u64,
    /// Replicas added by SCALE_UP.
    pub scale_step: u32,
    /// Rate limit (requests/s) set by THROTTLE_REQUESTS.
    pub throttle_rate_limit: u32,
    /// Duration of emergency override and validation bypass, seconds.
    pub override_duration_seconds: u64,
    /// Cost per action type (0..1); missing types keep their catalogue cost.
    pub action_costs: BTreeMap<ActionType, f64>,
    /// How auto-approval is decided: `fixed` (by risk level only) or
    /// `earned` (by the evidence of each cause and remedy).
    pub autonomy: Autonomy,
    /// Thresholds of `autonomy: earned`.
    pub earned_autonomy: EarnedAutonomySettings,
    /// How the remedy for a cause is chosen among its candidates.
    pub learning: LearningSettings,
}

/// How auto-approval is decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Autonomy {
    /// By risk level: at most `auto_approve_max_risk` is auto-approved.
    #[default]
    Fixed,
    /// By evidence: a (cause, remedy) that has proved itself is
    /// auto-approved whatever its risk; one that stopped working goes back
    /// to a person.
    Earned,
}

impl Autonomy {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Autonomy::Fixed => "fixed",
            Autonomy::Earned => "earned",
        }
    }
}

/// Thresholds of earned autonomy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EarnedAutonomySettings {
    /// Successes a (cause, remedy) needs before it is trusted.
    pub min_successes: u64,
    /// Success rate at or above which it is auto-approved, whatever its risk.
    pub min_success_rate: f64,
    /// Success rate below which it goes back to a person (with at least
    /// `min_successes` judged episodes), whatever its risk.
    pub revoke_below: f64,
}

impl Default for EarnedAutonomySettings {
    fn default() -> Self {
        EarnedAutonomySettings {
            min_successes: 5,
            min_success_rate: 0.9,
            revoke_below: 0.6,
        }
    }
}

/// How a remedy is chosen among the candidates for a cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Thompson sampling on a Beta posterior of success per (cause, remedy).
    #[default]
    Thompson,
    /// A fixed ranking by score (benefit − cost), no exploration.
    Ranked,
}

/// The learner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LearningSettings {
    /// `thompson` or `ranked`.
    pub selection: Selection,
    /// Seed of the random source (a fixed seed makes choices reproducible);
    /// absent: seeded from the clock at start.
    pub seed: Option<u64>,
    /// Weight of the prior, in pseudo-episodes: the seeds' strategy starts
    /// at a prior success rate of 0.8 and every other remedy at
    /// `0.5 × (1 − cost)`, each worth this many episodes of evidence.
    pub prior_strength: f64,
    /// Highest risk of a single-action remedy considered as a candidate.
    pub max_candidate_risk: RiskLevel,
}

impl Default for LearningSettings {
    fn default() -> Self {
        LearningSettings {
            selection: Selection::Thompson,
            seed: None,
            prior_strength: 0.5,
            max_candidate_risk: RiskLevel::Medium,
        }
    }
}

/// Catalogue cost of an action type.
pub fn default_cost(action: ActionType) -> f64 {
    match action {
        ActionType::ScaleUp => 0.15,
        ActionType::ScaleDown => 0.05,
        ActionType::RestartService => 0.20,
        ActionType::ApplyPolicy => 0.30,
        ActionType::BypassValidation => 0.70,
        ActionType::ThrottleRequests => 0.40,
        ActionType::ActivateEmergencyOverride => 0.60,
        ActionType::RebalanceLoad => 0.25,
        ActionType::UpdateConfiguration => 0.35,
        ActionType::Failover => 0.50,
    }
}

impl Default for PlanSettings {
    fn default() -> Self {
        PlanSettings {
            plan_threshold: 3,
            min_confidence: 0.6,
            max_policies: 5,
            auto_approve: true,
            auto_approve_max_risk: RiskLevel::Medium,
            cooldown_seconds: 60,
            scale_step: 2,
            throttle_rate_limit: 500,
            override_duration_seconds: 300,
            action_costs: ActionType::ALL
                .into_iter()
                .map(|a| (a, default_cost(a)))
                .collect(),
            autonomy: Autonomy::Fixed,
            earned_autonomy: EarnedAutonomySettings::default(),
            learning: LearningSettings::default(),
        }
    }
}

impl PlanSettings {
    /// Cost of an action type under these settings.
    pub fn cost(&self, action: ActionType) -> f64 {
        self.action_costs
            .get(&action)
            .copied()
            .unwrap_or_else(|| default_cost(action))
    }

    /// Pushes every problem under `plan`.
    pub fn validate(&self, out: &mut Vec<ConfigIssue>) {
        let mut i = Issues::new("plan", out);
        i.at_least("plan_threshold", self.plan_threshold, 1);
        i.within("min_confidence", self.min_confidence, 0.0, 1.0);
        i.at_least("max_policies", self.max_policies, 1);
        i.at_least("scale_step", self.scale_step, 1);
        i.at_least("throttle_rate_limit", self.throttle_rate_limit, 1);
        i.at_least(
            "override_duration_seconds",
            self.override_duration_seconds,
            1,
        );
        for (a, c) in &self.action_costs {
            i.within(&format!("action_costs.{}", a.as_str()), *c, 0.0, 1.0);
        }
        i.at_least(
            "earned_autonomy.min_successes",
            self.earned_autonomy.min_successes,
            1,
        );
        i.within(
            "earned_autonomy.min_success_rate",
            self.earned_autonomy.min_success_rate,
            0.0,
            1.0,
        );
        i.within(
            "earned_autonomy.revoke_below",
            self.earned_autonomy.revoke_below,
            0.0,
            1.0,
        );
        if self.earned_autonomy.revoke_below > self.earned_autonomy.min_success_rate {
            i.push(
                "earned_autonomy.revoke_below",
                format!(
                    "must be at most plan.earned_autonomy.min_success_rate ({}) (got {})",
                    self.earned_autonomy.min_success_rate, self.earned_autonomy.revoke_below
                ),
            );
        }
        if !(self.learning.prior_strength > 0.0 && self.learning.prior_strength <= 1000.0) {
            i.push(
                "learning.prior_strength",
                format!(
                    "must be above 0 and at most 1000 (got {})",
                    self.learning.prior_strength
                ),
            );
        }
    }
}

/// Execute phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecuteSettings {
    /// Timeout of one effector call, seconds.
    pub call_timeout_seconds: u64,
    /// Retries of a failed call (connect errors, timeouts, 5xx only).
    pub retries: u32,
    /// First retry delay, milliseconds; doubles per retry, with jitter.
    pub backoff_initial_ms: u64,
    /// Longest retry delay, milliseconds.
    pub backoff_max_ms: u64,
    /// Ask the effector to validate a policy before acting
    /// (`POST /api/v1/policies/validate` on Charter).
    pub preflight_validate: bool,
    /// Seconds to wait after acting before measuring the violations again.
    pub verification_window_seconds: u64,
    /// Policies acting at once (incidents on disjoint components are
    /// remedied concurrently; a verification window holds no slot).
    pub max_concurrent: usize,
}

impl Default for ExecuteSettings {
    fn default() -> Self {
        ExecuteSettings {
            call_timeout_seconds: 30,
            retries: 3,
            backoff_initial_ms: 500,
            backoff_max_ms: 10_000,
            preflight_validate: true,
            verification_window_seconds: 60,
            max_concurrent: 16,
        }
    }
}

impl ExecuteSettings {
    /// Pushes every problem under `execute`.
    pub fn validate(&self, out: &mut Vec<ConfigIssue>) {
        let mut i = Issues::new("execute", out);
        i.at_least("call_timeout_seconds", self.call_timeout_seconds, 1);
        i.at_least("max_concurrent", self.max_concurrent, 1);
        i.at_least("backoff_initial_ms", self.backoff_initial_ms, 1);
        if self.backoff_max_ms < self.backoff_initial_ms {
            i.push(
                "backoff_max_ms",
                format!(
                    "must be at least execute.backoff_initial_ms ({}) (got {})",
                    self.backoff_initial_ms, self.backoff_max_ms
                ),
            );
        }
        if self.retries > 10 {
            i.push(
                "retries",
                format!("must be at most 10 (got {})", self.retries),
            );
        }
    }
}

/// Knowledge phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KnowledgeSettings {
    /// Directory of the sled database.
    pub data_dir: String,
    /// Seconds to wait for the database to open before giving up.
    pub open_timeout_seconds: u64,
    /// Confidence of a learned success rate saturates at this many samples.
    pub confidence_saturation: u32,
    /// Regenerate insights after this many recorded outcomes.
    pub insights_every: u32,
    /// Records of each kind kept in the audit trail (oldest pruned first).
    pub max_records: usize,
    /// Salvage a damaged store at open (`mapek run --repair`; not a config
    /// key).
    #[serde(skip)]
    pub repair: bool,
}

impl Default for KnowledgeSettings {
    fn default() -> Self {
        KnowledgeSettings {
            data_dir: "data".into(),
            open_timeout_seconds: 10,
            confidence_saturation: 30,
            insights_every: 5,
            max_records: 100_000,
            repair: false,
        }
    }
}

impl KnowledgeSettings {
    /// Pushes every problem under `knowledge`.
    pub fn validate(&self, out: &mut Vec<ConfigIssue>) {
        let mut i = Issues::new("knowledge", out);
        if self.data_dir.trim().is_empty() {
            i.push("data_dir", "must not be empty");
        }
        i.at_least("open_timeout_seconds", self.open_timeout_seconds, 1);
        i.at_least("confidence_saturation", self.confidence_saturation, 1);
        i.at_least("insights_every", self.insights_every, 1);
        i.at_least("max_records", self.max_records, 100);
    }
}

/// Orchestrator and supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OrchestratorSettings {
    /// A chain (violations → outcome) running longer than this is cut off.
    pub max_cycle_time_seconds: u64,
    /// More restarts than this of one actor within `restart_period_seconds`
    /// stop the daemon (exit code 70), naming the actor.
    pub max_restarts: u32,
    /// Window of the restart-intensity limit, seconds.
    pub restart_period_seconds: u64,
    /// Capacity of each phase actor's mailbox.
    pub mailbox_capacity: usize,
}

impl Default for OrchestratorSettings {
    fn default() -> Self {
        OrchestratorSettings {
            max_cycle_time_seconds: 600,
            max_restarts: 5,
            restart_period_seconds: 60,
            mailbox_capacity: 64,
        }
    }
}

impl OrchestratorSettings {
    /// Pushes every problem under `orchestrator`.
    pub fn validate(&self, out: &mut Vec<ConfigIssue>) {
        let mut i = Issues::new("orchestrator", out);
        i.at_least("max_cycle_time_seconds", self.max_cycle_time_seconds, 1);
        i.at_least("restart_period_seconds", self.restart_period_seconds, 1);
        i.at_least("mailbox_capacity", self.mailbox_capacity, 1);
    }
}

/// What mapek does with an approved remedy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Act: effectors are called.
    #[default]
    Act,
    /// Plan, approve and "execute" against a recorder: nothing leaves
    /// mapek; executions are recorded as `DRY_RUN` with the calls that
    /// would have been made.
    DryRun,
    /// Plan what would be done, never act, and watch what happens to the
    /// incident anyway (`GET /api/v1/shadow/report`).
    Shadow,
}

impl Mode {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Act => "act",
            Mode::DryRun => "dry_run",
            Mode::Shadow => "shadow",
        }
    }

    /// Parses a snake_case name.
    pub fn parse(s: &str) -> Option<Mode> {
        [Mode::Act, Mode::DryRun, Mode::Shadow]
            .into_iter()
            .find(|m| m.as_str() == s)
    }

    /// The more cautious of two modes (shadow > dry_run > act).
    pub fn stricter(self, other: Mode) -> Mode {
        let rank = |m: Mode| match m {
            Mode::Act => 0,
            Mode::DryRun => 1,
            Mode::Shadow => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// A sliding-window limit on actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimitSettings {
    /// Actions allowed per window.
    pub max_actions: u32,
    /// Length of the sliding window, seconds.
    pub window_seconds: u64,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            max_actions: 6,
            window_seconds: 600,
        }
    }
}

/// The disruption budget: disruptive actions across all incidents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DisruptionBudgetSettings {
    /// Disruptive actions allowed per window, across all incidents.
    pub max_actions: u32,
    /// Length of the sliding window, seconds.
    pub window_seconds: u64,
    /// Which action types are disruptive.
    pub action_types: Vec<ActionType>,
}

/// The action types counted by the disruption budget by default.
pub const DISRUPTIVE_DEFAULT: [ActionType; 5] = [
    ActionType::RestartService,
    ActionType::Failover,
    ActionType::ScaleDown,
    ActionType::BypassValidation,
    ActionType::ActivateEmergencyOverride,
];

impl Default for DisruptionBudgetSettings {
    fn default() -> Self {
        DisruptionBudgetSettings {
            max_actions: 20,
            window_seconds: 600,
            action_types: DISRUPTIVE_DEFAULT.to_vec(),
        }
    }
}

/// Circuit breakers per (cause, action) and per component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BreakerSettings {
    /// Consecutive failures that open a breaker.
    pub failures: u32,
    /// How long an open breaker stays open before one trial, seconds.
    pub open_seconds: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 3,
            open_seconds: 900,
        }
    }
}

/// Flapping detection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlappingSettings {
    /// Incidents coming back this many times within the window make a
    /// component flapping.
    pub relapses: u32,
    /// The window, seconds; a flapping component quiet this long is
    /// flapping no more.
    pub window_seconds: u64,
}

impl Default for FlappingSettings {
    fn default() -> Self {
        FlappingSettings {
            relapses: 3,
            window_seconds: 1800,
        }
    }
}

/// Longest window or timeout of the safety guards: ten years.
pub const MAX_SAFETY_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// The safety guards (see docs/SAFETY.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SafetySettings {
    /// `act`, `dry_run` or `shadow` (env `MAPEK_MODE`).
    pub mode: Mode,
    /// Disruptive actions across all incidents per sliding window.
    pub disruption_budget: DisruptionBudgetSettings,
    /// Actions on one component per sliding window.
    pub component_rate_limit: RateLimitSettings,
    /// A policy waiting in the admission queue longer than this is
    /// escalated to a person (the pause does not count).
    pub queue_timeout_seconds: u64,
    /// Circuit breakers.
    pub breaker: BreakerSettings,
    /// Flapping components.
    pub flapping: FlappingSettings,
    /// An incident coming back on a component within this many seconds of
    /// a SUCCESS there re-classifies that outcome as RECURRED.
    pub recurrence_window_seconds: u64,
}

impl Default for SafetySettings {
    fn default() -> Self {
        SafetySettings {
            mode: Mode::Act,
            disruption_budget: DisruptionBudgetSettings::default(),
            component_rate_limit: RateLimitSettings::default(),
            queue_timeout_seconds: 1800,
            breaker: BreakerSettings::default(),
            flapping: FlappingSettings::default(),
            recurrence_window_seconds: 900,
        }
    }
}

impl SafetySettings {
    /// Pushes every problem under `safety`.
    pub fn validate(&self, out: &mut Vec<ConfigIssue>) {
        let mut i = Issues::new("safety", out);
        i.at_least(
            "disruption_budget.window_seconds",
            self.disruption_budget.window_seconds,
            1,
        );
        i.at_least(
            "component_rate_limit.max_actions",
            self.component_rate_limit.max_actions,
            1,
        );
        i.at_least(
            "component_rate_limit.window_seconds",
            self.component_rate_limit.window_seconds,
            1,
        );
        i.at_least("queue_timeout_seconds", self.queue_timeout_seconds, 1);
        // Ten years: longer windows are mistakes, and would overflow the
        // clock's arithmetic.
        for (key, v) in [
            (
                "disruption_budget.window_seconds",
                self.disruption_budget.window_seconds,
            ),
            (
                "component_rate_limit.window_seconds",
                self.component_rate_limit.window_seconds,
            ),
            ("queue_timeout_seconds", self.queue_timeout_seconds),
            ("breaker.open_seconds", self.breaker.open_seconds),
            ("flapping.window_seconds", self.flapping.window_seconds),
            ("recurrence_window_seconds", self.recurrence_window_seconds),
        ] {
            if v > MAX_SAFETY_SECONDS {
                i.push(
                    key,
                    format!("must be at most {MAX_SAFETY_SECONDS} (ten years) (got {v})"),
                );
            }
        }
        i.at_least("breaker.failures", self.breaker.failures, 1);
        i.at_least("breaker.open_seconds", self.breaker.open_seconds, 1);
        i.at_least("flapping.relapses", self.flapping.relapses, 1);
        i.at_least("flapping.window_seconds", self.flapping.window_seconds, 1);
        let mut seen = Vec::new();
        for a in &self.disruption_budget.action_types {
            if seen.contains(a) {
                i.push(
                    "disruption_budget.action_types",
                    format!("{} is listed twice", a.as_str()),
                );
            }
            seen.push(*a);
        }
    }
}
