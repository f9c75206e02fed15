//! The safety guards, as plain values tested without a runtime: the kill
//! switch (pause), the disruption budget and per-component rate limits
//! (sliding windows), circuit breakers per (cause, action) and per
//! component, flapping components, operator silences, and the last
//! success per component (for recurrence).
//!
//! Every guard is consulted by the one admission queue
//! ([`crate::admission`]) through [`Guards::gate`]; an admitted policy
//! reserves its actions with [`Guards::admitted`]. Time is wall-clock
//! ([`Timestamp`]) so that the state survives a restart: every change marks
//! a key dirty, and the Planner writes the dirty keys to Knowledge (tree
//! [`GUARDS_TREE`]); [`Guards::restore`] rebuilds them at start.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{
    ActionType, ExecutionStatus, OutcomeType, PolicyExecution, RemediationPolicy, RootCause,
    Timestamp,
};
use crate::ports::EscalationKind;
use crate::settings::SafetySettings;

/// Knowledge tree holding the guards' state.
pub const GUARDS_TREE: &str = "guards";

/// Relapses kept per component (for the escalation's history).
const FLAP_HISTORY: usize = 20;

/// Who paused mapek, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseState {
    /// Who.
    pub by: String,
    /// Why.
    pub reason: Option<String>,
    /// When.
    pub at: Timestamp,
}

/// State of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Remedies run.
    Closed,
    /// Remedies are refused until `open_until`.
    Open,
    /// One trial runs; its result closes or re-opens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A circuit breaker (`cause/ACTION` or `component/NAME`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breaker {
    /// Its key.
    pub key: String,
    /// Consecutive failures.
    pub failures: u32,
    /// Current state (an open breaker past `open_until` is half-open).
    pub state: BreakerState,
    /// When an open breaker allows its trial.
    pub open_until: Option<Timestamp>,
    /// The policy running the half-open trial.
    pub trial: Option<String>,
    /// The latest failure, in words.
    pub last_failure: Option<String>,
}

/// A component's incidents coming back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Flap {
    /// Incident openings on the component (time, incident), oldest first.
    pub openings: VecDeque<(Timestamp, String)>,
    /// Since when it is flapping.
    pub since: Option<Timestamp>,
}

/// An operator's silence of one component (a maintenance window).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    /// Until when.
    pub until: Timestamp,
    /// Why.
    pub reason: String,
    /// Who.
    pub by: String,
    /// When it was set.
    pub at: Timestamp,
}

/// The latest verified success on a component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastSuccess {
    /// The execution.
    pub execution_id: String,
    /// Its cause.
    pub cause: RootCause,
    /// Its actions.
    pub actions: Vec<ActionType>,
    /// Its outcome (SUCCESS or PARTIAL).
    pub outcome: OutcomeType,
    /// When it was verified.
    pub at: Timestamp,
    /// The incident it remedied.
    pub incident: Option<String>,
    /// The consecutive failures its breakers had counted before this
    /// success reset them: a recurrence restores them, plus one.
    #[serde(default)]
    pub prior_failures: Vec<(String, u32)>,
    /// The component the success was on (set when matched).
    #[serde(default)]
    pub component: String,
}

/// What a guard says about a queued policy.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// It may run.
    Admit,
    /// It waits (the guard, why).
    Hold(&'static str, String),
    /// It can never run as it is: a person must act.
    Escalate(&'static str, EscalationKind, String),
}

/// How an execution counts for the breakers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// SUCCESS or PARTIAL.
    Success,
    /// FAILED, ROLLED_BACK, INEFFECTIVE, DEGRADATION or RECURRED.
    Failure,
    /// UNKNOWN, DRY_RUN, interrupted: nothing.
    Nothing,
}

/// How an execution counts for the breakers (and learning).
pub fn verdict(exec: &PolicyExecution) -> Verdict {
    if exec.interrupted
        || exec
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("interrupted"))
        || crate::execute::run::held_before_acting(exec)
    {
        return Verdict::Nothing;
    }
    match exec.status {
        ExecutionStatus::DryRun
        | ExecutionStatus::Pending
        | ExecutionStatus::InProgress
        | ExecutionStatus::Unknown => return Verdict::Nothing,
        ExecutionStatus::Failed | ExecutionStatus::RolledBack => {
            // Cut off by the chain deadline before acting: no evidence.
            if exec.actions.is_empty() && exec.timings.cut_off {
                return Verdict::Nothing;
            }
            return Verdict::Failure;
        }
        ExecutionStatus::Completed => {}
    }
    match exec.outcome {
        Some(o) if o.is_success() => Verdict::Success,
        Some(OutcomeType::Unknown) | None => Verdict::Nothing,
        Some(_) => Verdict::Failure,
    }
}

/// Breaker key of a (cause, action).
pub fn action_breaker(cause: RootCause, action: ActionType) -> String {
    format!("{}/{}", cause.as_str(), action.as_str())
}

/// Breaker key of a component.
pub fn component_breaker(component: &str) -> String {
    format!("component/{component}")
}

/// The breakers of a remedy: `cause/ACTION` per distinct action, then
/// `component/NAME` per target.
fn breaker_keys(
    cause: RootCause,
    actions: impl Iterator<Item = ActionType>,
    targets: &[String],
) -> Vec<String> {
    let mut keys: Vec<String> = actions.map(|a| action_breaker(cause, a)).collect();
    keys.sort();
    keys.dedup();
    keys.extend(targets.iter().map(|c| component_breaker(c)));
    keys
}

/// The breakers of a policy.
fn policy_breakers(policy: &RemediationPolicy) -> Vec<String> {
    breaker_keys(
        policy.root_cause,
        policy.actions.iter().map(|a| a.action_type),
        &targets(policy),
    )
}

/// Targets of a policy's actions (deduplicated).
fn targets(policy: &RemediationPolicy) -> Vec<String> {
    let mut t: Vec<String> = policy.actions.iter().map(|a| a.target.clone()).collect();
    t.sort();
    t.dedup();
    t
}

fn secs(s: u64) -> chrono::Duration {
    chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 4))
}

/// The guards' state.
#[derive(Debug)]
pub struct Guards {
    settings: SafetySettings,
    pause: Option<PauseState>,
    budget: VecDeque<(Timestamp, String, ActionType)>,
    rate: HashMap<String, VecDeque<Timestamp>>,
    breakers: BTreeMap<String, Breaker>,
    flaps: HashMap<String, Flap>,
    silences: BTreeMap<String, Silence>,
    successes: HashMap<String, LastSuccess>,
    /// A policy needing budget waits in this admission pass: later ones
    /// needing budget wait behind it (served in queue order).
    budget_blocked: bool,
    /// Failure counts the latest success reset (taken by [`Self::success`]).
    reset: Vec<(String, u32)>,
    /// When the earliest entry of any component's rate window leaves it.
    rate_next: Option<Timestamp>,
    dirty: Vec<String>,
    /// Cluster mode: when the other leaders' disruptive actions were
    /// taken (their `budget@<replica>` records), sorted: the disruption
    /// budget is shared by the whole cluster.
    others: Vec<Timestamp>,
    /// Cluster mode: the cluster-wide budget was found full when acting
    /// (the slots in etcd); disruptive policies wait until then.
    cluster_full_until: Option<Timestamp>,
}

impl Guards {
    /// Empty guards.
    pub fn new(settings: SafetySettings) -> Self {
        Guards {
            settings,
            pause: None,
            budget: VecDeque::new(),
            rate: HashMap::new(),
            breakers: BTreeMap::new(),
            flaps: HashMap::new(),
            silences: BTreeMap::new(),
            successes: HashMap::new(),
            budget_blocked: false,
            others: Vec::new(),
            cluster_full_until: None,
            reset: Vec::new(),
            rate_next: None,
            dirty: Vec::new(),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &SafetySettings {
        &self.settings
    }

    /// Marks a key to be written to Knowledge ([`Self::take_dirty`]
    /// deduplicates).
    fn mark(&mut self, key: String) {
        self.dirty.push(key);
    }

    /// The keys changed since the last call, with their value (`None`:
    /// deleted), to be written to Knowledge.
    pub fn take_dirty(&mut self) -> Vec<(String, Option<Value>)> {
        let mut keys = std::mem::take(&mut self.dirty);
        // Some paths mark a key without checking it was marked already.
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|k| {
                let v = self.value_of(&k);
                (k, v)
            })
            .collect()
    }

    fn value_of(&self, key: &str) -> Option<Value> {
        let v = if key == "pause" {
            self.pause.as_ref().map(serde_json::to_value)
        } else if key == "budget" {
            (!self.budget.is_empty()).then(|| serde_json::to_value(&self.budget))
        } else if let Some(c) = key.strip_prefix("rate/") {
            self.rate.get(c).map(serde_json::to_value)
        } else if let Some(k) = key.strip_prefix("breaker/") {
            self.breakers.get(k).map(serde_json::to_value)
        } else if let Some(c) = key.strip_prefix("flap/") {
            self.flaps.get(c).map(serde_json::to_value)
        } else if let Some(c) = key.strip_prefix("silence/") {
            self.silences.get(c).map(serde_json::to_value)
        } else if let Some(c) = key.strip_prefix("success/") {
            self.successes.get(c).map(serde_json::to_value)
        } else {
            None
        };
        v.and_then(Result::ok)
    }

    /// Rebuilds the state from the records of [`GUARDS_TREE`]; a record
    /// that cannot be read is skipped with a warning.
    pub fn restore(&mut self, records: Vec<(String, Value)>) {
        fn get<T: serde::de::DeserializeOwned>(key: &str, v: Value) -> Option<T> {
            match serde_json::from_value(v) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(key, error = %e, "unreadable guard state skipped");
                    None
                }
            }
        }
        for (key, v) in records {
            if key == "pause" {
                self.pause = get(&key, v);
            } else if key == "budget" {
                self.budget = get(&key, v).unwrap_or_default();
            } else if let Some(c) = key.strip_prefix("rate/") {
                if let Some(r) = get(&key, v) {
                    self.rate.insert(c.to_string(), r);
                }
            } else if let Some(k) = key.strip_prefix("breaker/") {
                if let Some(mut b) = get::<Breaker>(&key, v) {
                    // A trial that was running when mapek stopped is over.
                    b.trial = None;
                    self.breakers.insert(k.to_string(), b);
                }
            } else if let Some(c) = key.strip_prefix("flap/") {
                if let Some(f) = get(&key, v) {
                    self.flaps.insert(c.to_string(), f);
                }
            } else if let Some(c) = key.strip_prefix("silence/") {
                if let Some(s) = get(&key, v) {
                    self.silences.insert(c.to_string(), s);
                }
            } else if let Some(c) = key.strip_prefix("success/") {
                if let Some(s) = get(&key, v) {
                    self.successes.insert(c.to_string(), s);
                }
            }
        }
    }

    // ---- pause -------------------------------------------------------

    /// Whether mapek is paused, and by whom.
    pub fn pause(&self) -> Option<&PauseState> {
        self.pause.as_ref()
    }

    /// Pauses (idempotent: the first pause is kept).
    pub fn set_pause(&mut self, state: PauseState) -> PauseState {
        match &self.pause {
            Some(p) => p.clone(),
            None => {
                self.pause = Some(state.clone());
                self.mark("pause".into());
                state
            }
        }
    }

    /// Resumes; returns the pause that ended.
    pub fn resume(&mut self) -> Option<PauseState> {
        let was = self.pause.take();
        if was.is_some() {
            self.mark("pause".into());
        }
        was
    }

    // ---- sliding windows ---------------------------------------------

    fn trim(&mut self, now: Timestamp) {
        let budget_window = secs(self.settings.disruption_budget.window_seconds);
        let gone = self.others.partition_point(|t| *t + budget_window <= now);
        self.others.drain(..gone);
        if self.cluster_full_until.is_some_and(|u| u <= now) {
            self.cluster_full_until = None;
        }
        let before = self.budget.len();
        while self
            .budget
            .front()
            .is_some_and(|(at, _, _)| *at + budget_window <= now)
        {
            self.budget.pop_front();
        }
        if self.budget.len() != before {
            self.mark("budget".into());
        }
        let rate_window = secs(self.settings.component_rate_limit.window_seconds);
        // Nothing leaves any component's window before the earliest entry
        // does: the scan is skipped until then (a pass costs O(1), not
        // O(components)).
        if self.rate_next.is_some_and(|t| now < t) {
            return;
        }
        let mut earliest: Option<Timestamp> = None;
        let mut emptied = Vec::new();
        let mut trimmed = Vec::new();
        for (c, q) in self.rate.iter_mut() {
            let n = q.len();
            while q.front().is_some_and(|at| *at + rate_window <= now) {
                q.pop_front();
            }
            if q.is_empty() {
                emptied.push(c.clone());
            } else if q.len() != n {
                trimmed.push(c.clone());
            }
            if let Some(front) = q.front() {
                let end = *front + rate_window;
                earliest = Some(earliest.map_or(end, |e: Timestamp| e.min(end)));
            }
        }
        self.rate_next = earliest;
        for c in emptied {
            self.rate.remove(&c);
            self.mark(format!("rate/{c}"));
        }
        for c in trimmed {
            self.mark(format!("rate/{c}"));
        }
    }

    fn note_rate_entry(&mut self, at: Timestamp) {
        let end = at + secs(self.settings.component_rate_limit.window_seconds);
        self.rate_next = Some(self.rate_next.map_or(end, |e| e.min(end)));
    }

    fn disruptive(&self, policy: &RemediationPolicy) -> usize {
        policy
            .actions
            .iter()
            .filter(|a| {
                self.settings
                    .disruption_budget
                    .action_types
                    .contains(&a.action_type)
            })
            .count()
    }

    /// Disruptive actions counted in the current window (this replica's
    /// and, in cluster mode, the other leaders').
    pub fn budget_used(&mut self, now: Timestamp) -> usize {
        self.trim(now);
        self.budget.len() + self.others_in_window(now)
    }

    /// Cluster mode: the other leaders' budget records (`budget@<replica>`
    /// keys of [`GUARDS_TREE`], as replicated), replacing the previous
    /// ones. Unreadable records are skipped.
    pub fn set_others_budget(&mut self, records: Vec<(String, Value)>, now: Timestamp) {
        let window = secs(self.settings.disruption_budget.window_seconds);
        let mut at: Vec<Timestamp> = Vec::new();
        for (key, v) in records {
            match serde_json::from_value::<VecDeque<(Timestamp, String, ActionType)>>(v) {
                Ok(q) => at.extend(q.into_iter().map(|(t, _, _)| t)),
                Err(e) => {
                    tracing::warn!(key, error = %e, "unreadable budget record of another replica skipped")
                }
            }
        }
        at.retain(|t| *t + window > now);
        at.sort_unstable();
        self.others = at;
    }

    /// Cluster mode: the Executor found the cluster-wide budget full; no
    /// disruptive policy is admitted before `until` (when a slot frees).
    pub fn cluster_budget_full_until(&mut self, until: Timestamp) {
        self.cluster_full_until = Some(self.cluster_full_until.map_or(until, |u| u.max(until)));
    }

    fn others_in_window(&self, now: Timestamp) -> usize {
        let window = secs(self.settings.disruption_budget.window_seconds);
        let first = self.others.partition_point(|t| *t + window <= now);
        self.others.len() - first
    }

    /// Disruptive actions still allowed in the current window.
    pub fn budget_remaining(&mut self, now: Timestamp) -> usize {
        let max = self.settings.disruption_budget.max_actions as usize;
        max.saturating_sub(self.budget_used(now))
    }

    /// When the earliest entry of a full window leaves it (the budget or a
    /// component's rate limit frees up), if one is full.
    pub fn next_release(&self) -> Option<Timestamp> {
        let window = secs(self.settings.disruption_budget.window_seconds);
        let b = match (
            self.budget.front().map(|(at, _, _)| *at),
            self.others.first(),
        ) {
            (Some(a), Some(o)) => Some(a.min(*o)),
            (a, o) => a.or(o.copied()),
        }
        .map(|at| at + window);
        let b = match (b, self.cluster_full_until) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        let r = self
            .rate
            .values()
            .filter_map(|q| q.front())
            .map(|at| *at + secs(self.settings.component_rate_limit.window_seconds))
            .min();
        let f = self
            .flaps
            .values()
            .filter(|f| f.since.is_some())
            .filter_map(|f| f.openings.back())
            .map(|(at, _)| *at + secs(self.settings.flapping.window_seconds))
            .min();
        [b, r, f].into_iter().flatten().min()
    }

    // ---- the gate ----------------------------------------------------

    /// Starts an admission pass (the queue is served in order).
    pub fn begin_pass(&mut self, now: Timestamp) {
        self.budget_blocked = false;
        self.trim(now);
        self.expire_silences(now);
        self.expire_flapping(now);
        self.prune(now);
    }

    /// Forgets what no longer matters: components not flapping whose
    /// incidents are all older than the flapping window, successes older
    /// than the recurrence window (so state keyed by component stays
    /// bounded by the components active recently).
    fn prune(&mut self, now: Timestamp) {
        let fw = secs(self.settings.flapping.window_seconds);
        let stale: Vec<String> = self
            .flaps
            .iter()
            .filter(|(_, f)| {
                f.since.is_none() && f.openings.back().is_none_or(|(at, _)| *at + fw <= now)
            })
            .map(|(c, _)| c.clone())
            .collect();
        for c in stale {
            self.flaps.remove(&c);
            self.mark(format!("flap/{c}"));
        }
        let rw = secs(self.settings.recurrence_window_seconds);
        let old: Vec<String> = self
            .successes
            .iter()
            .filter(|(_, s)| s.at + rw <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for c in old {
            self.successes.remove(&c);
            self.mark(format!("success/{c}"));
        }
    }

    /// Ends the flapping of components quiet for a whole window.
    pub fn expire_flapping(&mut self, now: Timestamp) {
        let quiet: Vec<String> = self
            .flaps
            .iter()
            .filter(|(_, f)| f.since.is_some())
            .map(|(c, _)| c.clone())
            .collect();
        for c in quiet {
            let _ = self.flapping_of(&c, now);
        }
    }

    /// What the guards say about a queued policy now. Checked in this
    /// order: pause, silence, flapping, component breaker (open:
    /// escalated; half-open with another trial: held), the (cause, action)
    /// breakers (open or another trial running: held), disruption budget,
    /// component rate limit (a policy larger than either window's whole
    /// allowance is escalated at once).
    pub fn gate(&mut self, policy: &RemediationPolicy, now: Timestamp) -> Gate {
        if let Some(p) = &self.pause {
            return Gate::Hold(
                "pause",
                format!(
                    "held by the pause ({} at {}{})",
                    p.by,
                    p.at.to_rfc3339(),
                    p.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            );
        }
        let comps = targets(policy);
        for c in &comps {
            if let Some(s) = self.silence_of(c, now) {
                return Gate::Hold("silence", s);
            }
            if let Some(h) = self.flapping_of(c, now) {
                return Gate::Escalate("flapping", EscalationKind::Flapping, h);
            }
            if let Some(why) = self.breaker_blocks(&component_breaker(c), Some(&policy.id), now) {
                // Half-open with another trial running: wait for it.
                if why.contains("half-open") {
                    return Gate::Hold("breaker", why);
                }
                return Gate::Escalate("breaker", EscalationKind::BreakerOpen, why);
            }
        }
        for a in &policy.actions {
            let key = action_breaker(policy.root_cause, a.action_type);
            if let Some(why) = self.breaker_blocks(&key, Some(&policy.id), now) {
                return Gate::Hold("breaker", why);
            }
        }
        let d = self.disruptive(policy);
        if d > 0 {
            let max = self.settings.disruption_budget.max_actions as usize;
            if d > max {
                return Gate::Escalate(
                    "disruption_budget",
                    EscalationKind::BudgetExhausted,
                    format!(
                        "it needs {d} disruptive action(s), more than the whole disruption budget ({max} per {} s)",
                        self.settings.disruption_budget.window_seconds
                    ),
                );
            }
            if self.budget_blocked {
                return Gate::Hold(
                    "disruption_budget",
                    "waits behind an earlier policy for the disruption budget".into(),
                );
            }
            if let Some(until) = self.cluster_full_until.filter(|u| *u > now) {
                self.budget_blocked = true;
                return Gate::Hold(
                    "disruption_budget",
                    format!(
                        "the cluster-wide disruption budget was full when last tried (other leaders hold its slots); a slot frees at {}",
                        until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ),
                );
            }
            let others = self.others_in_window(now);
            if self.budget.len() + others + d > max {
                self.budget_blocked = true;
                let elsewhere = if others > 0 {
                    format!(" ({others} of them by other leaders)")
                } else {
                    String::new()
                };
                return Gate::Hold(
                    "disruption_budget",
                    format!(
                        "disruption budget exhausted: {} of {max} disruptive action(s) used in the last {} s{elsewhere}",
                        self.budget.len() + others,
                        self.settings.disruption_budget.window_seconds
                    ),
                );
            }
        }
        let max = self.settings.component_rate_limit.max_actions as usize;
        for c in &comps {
            let n = policy.actions.iter().filter(|a| &a.target == c).count();
            if n > max {
                return Gate::Escalate(
                    "component_rate_limit",
                    EscalationKind::BudgetExhausted,
                    format!(
                        "it needs {n} action(s) on component `{c}`, more than its whole rate limit ({max} per {} s)",
                        self.settings.component_rate_limit.window_seconds
                    ),
                );
            }
            let used = self.rate.get(c).map(VecDeque::len).unwrap_or(0);
            if used + n > max {
                return Gate::Hold(
                    "component_rate_limit",
                    format!(
                        "component `{c}` rate limit reached: {used} of {max} action(s) in the last {} s",
                        self.settings.component_rate_limit.window_seconds
                    ),
                );
            }
        }
        Gate::Admit
    }

    /// Reserves an admitted policy's actions: its disruptive actions in the
    /// budget, every action in its component's rate limit, and the trial of
    /// a half-open breaker. Not for dry runs.
    pub fn admitted(&mut self, policy: &RemediationPolicy, now: Timestamp) {
        for a in &policy.actions {
            if self
                .settings
                .disruption_budget
                .action_types
                .contains(&a.action_type)
            {
                self.budget
                    .push_back((now, policy.id.clone(), a.action_type));
                self.mark("budget".into());
            }
            self.rate
                .entry(a.target.clone())
                .or_default()
                .push_back(now);
            self.mark(format!("rate/{}", a.target));
        }
        for k in policy_breakers(policy) {
            if let Some(b) = self.breakers.get_mut(&k) {
                if b.state != BreakerState::Closed && b.trial.is_none() {
                    b.state = BreakerState::HalfOpen;
                    b.trial = Some(policy.id.clone());
                    self.mark(format!("breaker/{k}"));
                }
            }
        }
    }

    /// A policy admitted but held before acting by the cluster-wide
    /// budget: its disruptive actions leave this replica's window (they
    /// did not happen).
    pub fn release_budget(&mut self, policy_id: &str) {
        let before = self.budget.len();
        self.budget.retain(|(_, p, _)| p != policy_id);
        if self.budget.len() != before {
            self.mark("budget".into());
        }
    }

    /// Rollback steps that ran count in the windows (never held back).
    pub fn rolled_back(
        &mut self,
        exec: &PolicyExecution,
        policy: &RemediationPolicy,
        now: Timestamp,
    ) {
        for a in &exec.actions {
            if a.status != ExecutionStatus::RolledBack {
                continue;
            }
            let Some(step) = policy
                .actions
                .iter()
                .find(|p| p.id == a.action_id)
                .and_then(|p| {
                    p.rollback
                        .as_ref()
                        .map(|r| (r.action_type, p.target.clone()))
                })
            else {
                continue;
            };
            if self
                .settings
                .disruption_budget
                .action_types
                .contains(&step.0)
            {
                self.budget.push_back((now, policy.id.clone(), step.0));
                self.mark("budget".into());
            }
            self.rate.entry(step.1.clone()).or_default().push_back(now);
            self.mark(format!("rate/{}", step.1));
            self.note_rate_entry(now);
        }
    }

    // ---- breakers ----------------------------------------------------

    /// Why breaker `key` refuses a remedy now (`policy`: the policy asking,
    /// which may hold the half-open trial), if it does.
    pub fn breaker_blocks(
        &mut self,
        key: &str,
        policy: Option<&str>,
        now: Timestamp,
    ) -> Option<String> {
        let b = self.breakers.get_mut(key)?;
        match b.state {
            BreakerState::Closed => None,
            BreakerState::Open if b.open_until.is_some_and(|u| u > now) => Some(format!(
                "circuit breaker `{key}` is open after {} consecutive failure(s) (until {}){}",
                b.failures,
                b.open_until.map(|u| u.to_rfc3339()).unwrap_or_default(),
                b.last_failure
                    .as_deref()
                    .map(|f| format!("; last: {f}"))
                    .unwrap_or_default()
            )),
            _ => {
                // Open past its time, or half-open: one trial at a time.
                if b.state == BreakerState::Open {
                    b.state = BreakerState::HalfOpen;
                    self.dirty.push(format!("breaker/{key}"));
                }
                let b = self.breakers.get(key)?;
                match (&b.trial, policy) {
                    (None, _) => None,
                    (Some(t), Some(p)) if t == p => None,
                    (Some(t), _) => Some(format!(
                        "circuit breaker `{key}` is half-open: its trial ({t}) runs first"
                    )),
                }
            }
        }
    }

    /// Folds a finished execution into the breakers of its (cause, action)s
    /// and components; returns the keys of breakers that opened.
    pub fn record_execution(
        &mut self,
        exec: &PolicyExecution,
        policy: &RemediationPolicy,
        now: Timestamp,
    ) -> Vec<String> {
        let v = verdict(exec);
        let what = match exec.outcome {
            Some(o) if exec.status == ExecutionStatus::Completed => {
                format!("{} by {}", o.as_str(), exec.id)
            }
            _ => format!("{} ({})", exec.status.as_str(), exec.id),
        };
        self.record_verdict(policy, v, &what, now)
    }

    /// Folds one verdict about `policy` into its breakers.
    pub fn record_verdict(
        &mut self,
        policy: &RemediationPolicy,
        v: Verdict,
        what: &str,
        now: Timestamp,
    ) -> Vec<String> {
        self.fold(policy_breakers(policy), &policy.id, v, what, now)
    }

    /// A success that recurred counts as a failure on the breakers of its
    /// remedy and of the component it succeeded on; returns the breakers
    /// that opened.
    pub fn recurred(&mut self, last: &LastSuccess, what: &str, now: Timestamp) -> Vec<String> {
        let keys = breaker_keys(
            last.cause,
            last.actions.iter().copied(),
            std::slice::from_ref(&last.component),
        );
        self.fold(keys, "", Verdict::Failure, what, now)
    }

    /// Folds one verdict into breakers `keys` (`policy_id`: the policy the
    /// verdict is about, which may hold a trial).
    fn fold(
        &mut self,
        keys: Vec<String>,
        policy_id: &str,
        v: Verdict,
        what: &str,
        now: Timestamp,
    ) -> Vec<String> {
        let mut opened = Vec::new();
        for k in keys {
            match v {
                Verdict::Nothing => {
                    if let Some(b) = self.breakers.get_mut(&k) {
                        if b.trial.as_deref() == Some(policy_id) {
                            b.trial = None;
                            self.dirty.push(format!("breaker/{k}"));
                        }
                    }
                }
                Verdict::Success => {
                    if let Some(b) = self.breakers.remove(&k) {
                        self.reset.push((k.clone(), b.failures));
                        self.mark(format!("breaker/{k}"));
                    }
                }
                Verdict::Failure => {
                    let threshold = self.settings.breaker.failures;
                    let open_for = secs(self.settings.breaker.open_seconds);
                    let b = self.breakers.entry(k.clone()).or_insert_with(|| Breaker {
                        key: k.clone(),
                        failures: 0,
                        state: BreakerState::Closed,
                        open_until: None,
                        trial: None,
                        last_failure: None,
                    });
                    b.failures = b.failures.saturating_add(1);
                    b.last_failure = Some(what.to_string());
                    b.trial = None;
                    if b.state == BreakerState::HalfOpen || b.failures >= threshold {
                        if b.state != BreakerState::Open {
                            opened.push(k.clone());
                        }
                        b.state = BreakerState::Open;
                        b.open_until = Some(now + open_for);
                    }
                    self.mark(format!("breaker/{k}"));
                }
            }
        }
        opened
    }

    /// Frees the half-open trials held by `policy_id` (its execution was
    /// lost, or it ran dry): the next policy may be the trial.
    pub fn release_trial(&mut self, policy_id: &str) {
        let keys: Vec<String> = self
            .breakers
            .iter()
            .filter(|(_, b)| b.trial.as_deref() == Some(policy_id))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(b) = self.breakers.get_mut(&k) {
                b.trial = None;
            }
            self.mark(format!("breaker/{k}"));
        }
    }

    /// Every breaker not closed.
    pub fn breakers(&self) -> impl Iterator<Item = &Breaker> {
        self.breakers
            .values()
            .filter(|b| b.state != BreakerState::Closed)
    }

    /// Breakers counted by state (`open`, `half_open`); an open breaker
    /// past its time counts as half-open.
    pub fn breaker_counts(&self, now: Timestamp) -> (i64, i64) {
        let mut open = 0;
        let mut half = 0;
        for b in self.breakers.values() {
            match b.state {
                BreakerState::Open if b.open_until.is_some_and(|u| u > now) => open += 1,
                BreakerState::Open | BreakerState::HalfOpen => half += 1,
                BreakerState::Closed => {}
            }
        }
        (open, half)
    }

    // ---- flapping and silences ---------------------------------------

    /// An incident opened on `components`: counted per component. Returns
    /// the components that became flapping.
    pub fn incident_opened(
        &mut self,
        incident: &str,
        components: &[String],
        now: Timestamp,
    ) -> Vec<String> {
        let window = secs(self.settings.flapping.window_seconds);
        let relapses = self.settings.flapping.relapses as usize;
        let mut became = Vec::new();
        for c in components {
            if c.is_empty() || c == "unknown" {
                continue;
            }
            let f = self.flaps.entry(c.clone()).or_default();
            if f.openings.iter().any(|(_, i)| i == incident) {
                continue;
            }
            f.openings.push_back((now, incident.to_string()));
            while f.openings.len() > FLAP_HISTORY.max(relapses + 1) {
                f.openings.pop_front();
            }
            let recent = f
                .openings
                .iter()
                .filter(|(at, _)| *at + window > now)
                .count();
            // The first incident is not a relapse: `relapses` returns mean
            // `relapses + 1` openings within the window.
            if f.since.is_none() && recent > relapses {
                f.since = Some(now);
                became.push(c.clone());
            }
            self.mark(format!("flap/{c}"));
        }
        became
    }

    /// Why `component` is flapping (its history), if it is; a flapping
    /// component quiet for a whole window is flapping no more.
    pub fn flapping_of(&mut self, component: &str, now: Timestamp) -> Option<String> {
        let window = secs(self.settings.flapping.window_seconds);
        let f = self.flaps.get_mut(component)?;
        let since = f.since?;
        let last = f.openings.back().map(|(at, _)| *at).unwrap_or(since);
        if last + window <= now {
            f.since = None;
            self.mark(format!("flap/{component}"));
            return None;
        }
        let history: Vec<String> = f
            .openings
            .iter()
            .filter(|(at, _)| *at + window > since)
            .map(|(at, i)| format!("{i} at {}", at.format("%H:%M:%S")))
            .collect();
        Some(format!(
            "component `{component}` is flapping: {} incidents within {} s ({}); automatic action stops until an operator clears it or it stays quiet for {} s",
            history.len(),
            self.settings.flapping.window_seconds,
            history.join(", "),
            self.settings.flapping.window_seconds
        ))
    }

    /// Components flapping now.
    pub fn flapping(&self) -> impl Iterator<Item = (&String, &Flap)> {
        self.flaps.iter().filter(|(_, f)| f.since.is_some())
    }

    /// Silences `component` until `silence.until`.
    pub fn silence(&mut self, component: &str, silence: Silence) {
        self.silences.insert(component.to_string(), silence);
        self.mark(format!("silence/{component}"));
    }

    fn expire_silences(&mut self, now: Timestamp) {
        let over: Vec<String> = self
            .silences
            .iter()
            .filter(|(_, s)| s.until <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for c in over {
            self.silences.remove(&c);
            self.mark(format!("silence/{c}"));
        }
    }

    /// Why `component` is silenced, if it is.
    pub fn silence_of(&self, component: &str, now: Timestamp) -> Option<String> {
        let s = self.silences.get(component).filter(|s| s.until > now)?;
        Some(format!(
            "component `{component}` is silenced by {} until {}: {}",
            s.by,
            s.until.to_rfc3339(),
            s.reason
        ))
    }

    /// Silences in force.
    pub fn silences(&self) -> impl Iterator<Item = (&String, &Silence)> {
        self.silences.iter()
    }

    /// Clears a component: its flapping, its silence and its breaker.
    /// Returns what was cleared.
    pub fn clear(&mut self, component: &str) -> Vec<&'static str> {
        let mut cleared = Vec::new();
        if let Some(f) = self.flaps.get_mut(component) {
            if f.since.take().is_some() {
                cleared.push("flapping");
            }
            // A fresh start: past openings no longer count.
            f.openings.clear();
            self.mark(format!("flap/{component}"));
        }
        if self.silences.remove(component).is_some() {
            cleared.push("silence");
            self.mark(format!("silence/{component}"));
        }
        let key = component_breaker(component);
        if self.breakers.remove(&key).is_some() {
            cleared.push("breaker");
            self.mark(format!("breaker/{key}"));
        }
        cleared
    }

    // ---- recurrence --------------------------------------------------

    /// A verified success on the components of `policy`.
    pub fn success(&mut self, exec: &PolicyExecution, policy: &RemediationPolicy, now: Timestamp) {
        let prior_failures = std::mem::take(&mut self.reset);
        let Some(outcome) = exec.outcome.filter(|o| o.is_success()) else {
            return;
        };
        for c in crate::admission::scope_of(policy) {
            self.successes.insert(
                c.clone(),
                LastSuccess {
                    execution_id: exec.id.clone(),
                    cause: policy.root_cause,
                    actions: policy.actions.iter().map(|a| a.action_type).collect(),
                    outcome,
                    at: now,
                    incident: policy.incident_id.clone(),
                    prior_failures: prior_failures.clone(),
                    component: c.clone(),
                },
            );
            self.mark(format!("success/{c}"));
        }
    }

    /// The success that an incident opening on `components` now makes a
    /// recurrence (within `recurrence_window_seconds`), taken so it is
    /// re-classified once.
    pub fn recurrence(
        &mut self,
        incident: &str,
        components: &[String],
        now: Timestamp,
    ) -> Option<LastSuccess> {
        let window = secs(self.settings.recurrence_window_seconds);
        let hit = components.iter().find(|c| {
            self.successes
                .get(*c)
                .is_some_and(|s| s.at + window > now && s.incident.as_deref() != Some(incident))
        })?;
        let mut s = self.successes.get(hit)?.clone();
        s.component = hit.clone();
        // The failures the success had reset count again: a remedy that
        // keeps "working" and coming back does open its breakers.
        for (k, n) in &s.prior_failures {
            let b = self.breakers.entry(k.clone()).or_insert_with(|| Breaker {
                key: k.clone(),
                failures: 0,
                state: BreakerState::Closed,
                open_until: None,
                trial: None,
                last_failure: None,
            });
            b.failures = b.failures.max(*n);
            self.dirty.push(format!("breaker/{k}"));
        }
        let gone: Vec<String> = self
            .successes
            .iter()
            .filter(|(_, v)| v.execution_id == s.execution_id)
            .map(|(k, _)| k.clone())
            .collect();
        for c in gone {
            self.successes.remove(&c);
            self.mark(format!("success/{c}"));
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ApprovalStatus, Priority, RemediationAction, RiskLevel};

    fn t0() -> Timestamp {
        chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    fn at(s: i64) -> Timestamp {
        t0() + chrono::Duration::seconds(s)
    }

    fn policy(id: &str, target: &str, actions: &[ActionType]) -> RemediationPolicy {
        RemediationPolicy {
            id: id.into(),
            chain_id: "c".into(),
            analysis_id: "a".into(),
            created_at: t0(),
            root_cause: RootCause::NodeCrash,
            root_cause_confidence: 0.9,
            actions: actions
                .iter()
                .enumerate()
                .map(|(i, a)| RemediationAction {
                    id: format!("a{i}"),
                    action_type: *a,
                    target: target.into(),
                    parameters: Default::default(),
                    priority: Priority::High,
                    cost: 0.2,
                    depends_on: Vec::new(),
                    rollback: None,
                })
                .collect(),
            expected_impact: String::new(),
            risk_level: RiskLevel::Medium,
            priority: Priority::High,
            cost_estimate: 0.2,
            benefit_estimate: 0.5,
            score: 0.3,
            approval_status: ApprovalStatus::Approved,
            decisions: Vec::new(),
            violations_at_planning: 3,
            scope: vec![target.into()],
            incident_id: Some(format!("inc-{id}")),
            attempt: 1,
            guards: Vec::new(),
            autonomy: None,
            candidates: Vec::new(),
            shard: None,
        }
    }

    fn exec(id: &str, status: ExecutionStatus, outcome: Option<OutcomeType>) -> PolicyExecution {
        let p = policy(id, "x", &[]);
        let mut e = crate::execute::in_progress(&p, format!("exe-{id}"), "c".into(), t0());
        e.status = status;
        e.outcome = outcome;
        e
    }

    fn settings() -> SafetySettings {
        let mut s = SafetySettings::default();
        s.disruption_budget.max_actions = 5;
        s.disruption_budget.window_seconds = 600;
        s.component_rate_limit.max_actions = 2;
        s.breaker.failures = 3;
        s.breaker.open_seconds = 100;
        s.flapping.relapses = 3;
        s.flapping.window_seconds = 1000;
        s.recurrence_window_seconds = 300;
        s
    }

    #[test]
    fn the_budget_is_used_never_exceeded_and_served_in_order() {
        let mut g = Guards::new(settings());
        g.begin_pass(at(0));
        let mut admitted = 0;
        for i in 0..20 {
            let p = policy(
                &format!("p{i}"),
                &format!("svc-{i}"),
                &[ActionType::RestartService],
            );
            if g.gate(&p, at(0)) == Gate::Admit {
                g.admitted(&p, at(0));
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5);
        assert_eq!(g.budget_remaining(at(0)), 0);
        // A non-disruptive remedy is not held by the budget.
        let scale = policy("s", "svc-x", &[ActionType::ScaleUp]);
        assert_eq!(g.gate(&scale, at(0)), Gate::Admit);
        // The window slides: the budget frees after 600 s, not before.
        assert_eq!(g.next_release(), Some(at(600)));
        g.begin_pass(at(599));
        let p = policy("late", "svc-late", &[ActionType::RestartService]);
        assert!(matches!(
            g.gate(&p, at(599)),
            Gate::Hold("disruption_budget", _)
        ));
        g.begin_pass(at(600));
        assert_eq!(g.gate(&p, at(600)), Gate::Admit);
        // A remedy larger than the whole budget can never run.
        let big = policy("big", "svc-b", &[ActionType::RestartService; 6]);
        assert!(matches!(
            g.gate(&big, at(600)),
            Gate::Escalate("disruption_budget", EscalationKind::BudgetExhausted, _)
        ));
    }

    #[test]
    fn other_leaders_use_of_the_budget_counts_until_it_leaves_the_window() {
        let mut g = Guards::new(settings());
        // Another leader took 3 disruptive actions at 100 s; one record
        // of a leader long gone (at -1000 s) no longer counts.
        let theirs = serde_json::json!([
            [at(50), "svc-a", "RESTART_SERVICE"],
            [at(50), "svc-b", "RESTART_SERVICE"],
            [at(50), "svc-c", "RESTART_SERVICE"],
        ]);
        let gone = serde_json::json!([[at(-1000), "svc-z", "RESTART_SERVICE"]]);
        g.set_others_budget(
            vec![
                ("budget@b".into(), theirs),
                ("budget@c".into(), gone),
                ("budget@d".into(), serde_json::json!("garbage")),
            ],
            at(100),
        );
        assert_eq!(g.budget_used(at(100)), 3);
        g.begin_pass(at(100));
        let mut admitted = 0;
        let mut held = Vec::new();
        for i in 0..5 {
            let p = policy(
                &format!("p{i}"),
                &format!("svc-{i}"),
                &[ActionType::RestartService],
            );
            match g.gate(&p, at(100)) {
                Gate::Admit => {
                    g.admitted(&p, at(100));
                    admitted += 1;
                }
                Gate::Hold("disruption_budget", why) => held.push(why),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            admitted, 2,
            "5 in the cluster's window, 3 of them elsewhere"
        );
        assert!(held[0].contains("3 of them by other leaders"), "{held:?}");
        assert!(
            held[1..].iter().all(|w| w.contains("waits behind")),
            "{held:?}"
        );
        // Theirs leave the window at 650 s (ours at 700 s): then there is
        // room for exactly what they used.
        assert_eq!(g.next_release(), Some(at(650)));
        g.begin_pass(at(649));
        let p = policy("later", "svc-later", &[ActionType::RestartService]);
        assert!(matches!(
            g.gate(&p, at(649)),
            Gate::Hold("disruption_budget", _)
        ));
        g.begin_pass(at(650));
        assert_eq!(g.gate(&p, at(650)), Gate::Admit);
        g.admitted(&p, at(650));
        assert_eq!(g.budget_used(at(650)), 3);
        // The cluster-wide budget found full by the Executor holds every
        // disruptive policy until a slot frees.
        g.cluster_budget_full_until(at(680));
        g.begin_pass(at(660));
        let q = policy("q", "svc-q", &[ActionType::RestartService]);
        match g.gate(&q, at(660)) {
            Gate::Hold("disruption_budget", why) => assert!(why.contains("cluster-wide"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(g.next_release(), Some(at(680)));
        g.begin_pass(at(680));
        assert_eq!(g.gate(&q, at(680)), Gate::Admit);
    }

    #[test]
    fn a_component_rate_limit_holds_only_that_component() {
        let mut g = Guards::new(settings());
        g.begin_pass(at(0));
        let p = policy(
            "p",
            "api",
            &[ActionType::ScaleUp, ActionType::UpdateConfiguration],
        );
        assert_eq!(g.gate(&p, at(0)), Gate::Admit);
        g.admitted(&p, at(0));
        let again = policy("q", "api", &[ActionType::ScaleUp]);
        assert!(matches!(
            g.gate(&again, at(1)),
            Gate::Hold("component_rate_limit", _)
        ));
        let other = policy("r", "db", &[ActionType::ScaleUp]);
        assert_eq!(g.gate(&other, at(1)), Gate::Admit);
    }

    #[test]
    fn a_breaker_opens_after_n_failures_then_half_opens_for_one_trial() {
        let mut g = Guards::new(settings());
        let p = policy("p", "api", &[ActionType::RestartService]);
        let key = action_breaker(RootCause::NodeCrash, ActionType::RestartService);
        // UNKNOWN, DRY_RUN and interrupted executions count for nothing.
        for e in [
            exec("u", ExecutionStatus::Completed, Some(OutcomeType::Unknown)),
            exec("d", ExecutionStatus::DryRun, None),
        ] {
            assert!(g.record_execution(&e, &p, at(0)).is_empty());
        }
        let mut interrupted = exec("i", ExecutionStatus::Failed, None);
        interrupted.error = Some("interrupted: mapek stopped".into());
        g.record_execution(&interrupted, &p, at(0));
        assert!(g.breaker_blocks(&key, None, at(0)).is_none());
        let failures = [
            exec("f1", ExecutionStatus::Failed, None),
            exec(
                "f2",
                ExecutionStatus::Completed,
                Some(OutcomeType::Ineffective),
            ),
        ];
        for e in &failures {
            assert!(g.record_execution(e, &p, at(1)).is_empty());
        }
        let opened = g.record_execution(&exec("f3", ExecutionStatus::RolledBack, None), &p, at(2));
        assert!(opened.contains(&key), "{opened:?}");
        assert!(opened.contains(&component_breaker("api")));
        assert!(g.breaker_blocks(&key, None, at(50)).is_some());
        assert_eq!(g.breaker_counts(at(50)), (2, 0));
        // Past open_seconds: half-open, one trial.
        assert!(g.breaker_blocks(&key, Some("trial"), at(103)).is_none());
        let trial = policy("trial", "api", &[ActionType::RestartService]);
        g.admitted(&trial, at(103));
        assert!(g
            .breaker_blocks(&key, Some("other"), at(104))
            .is_some_and(|w| w.contains("half-open")));
        // The trial fails: open again.
        g.record_execution(
            &exec(
                "t",
                ExecutionStatus::Completed,
                Some(OutcomeType::Degradation),
            ),
            &trial,
            at(110),
        );
        assert!(g
            .breaker_blocks(&key, None, at(111))
            .is_some_and(|w| w.contains("open")));
        // The next trial succeeds: closed.
        assert!(g.breaker_blocks(&key, Some("t2"), at(211)).is_none());
        let t2 = policy("t2", "api", &[ActionType::RestartService]);
        g.admitted(&t2, at(211));
        g.record_execution(
            &exec("ok", ExecutionStatus::Completed, Some(OutcomeType::Success)),
            &t2,
            at(220),
        );
        assert!(g.breaker_blocks(&key, None, at(221)).is_none());
        assert_eq!(g.breakers().count(), 0);
    }

    #[test]
    fn flapping_is_detected_escalated_and_cleared_or_quiet() {
        let mut g = Guards::new(settings());
        let c = vec!["api".to_string()];
        assert!(g.incident_opened("i1", &c, at(0)).is_empty());
        assert!(g.incident_opened("i2", &c, at(100)).is_empty());
        assert!(g.incident_opened("i3", &c, at(200)).is_empty());
        // The same incident reopening is not a relapse.
        assert!(g.incident_opened("i3", &c, at(250)).is_empty());
        assert_eq!(g.incident_opened("i4", &c, at(300)), c);
        let why = g.flapping_of("api", at(301)).expect("flapping");
        assert!(why.contains("i1") && why.contains("i4"), "{why}");
        let p = policy("p", "api", &[ActionType::ScaleUp]);
        assert!(matches!(
            g.gate(&p, at(301)),
            Gate::Escalate("flapping", EscalationKind::Flapping, _)
        ));
        // Cleared by an operator.
        assert_eq!(g.clear("api"), vec!["flapping"]);
        assert!(g.flapping_of("api", at(302)).is_none());
        // Flapping again, then quiet for a whole window.
        for (i, t) in [400, 500, 600, 700].iter().enumerate() {
            g.incident_opened(&format!("j{i}"), &c, at(*t));
        }
        assert!(g.flapping_of("api", at(701)).is_some());
        assert!(g.flapping_of("api", at(1700)).is_none());
    }

    #[test]
    fn a_silence_holds_until_it_ends() {
        let mut g = Guards::new(settings());
        g.silence(
            "db",
            Silence {
                until: at(100),
                reason: "maintenance".into(),
                by: "ana".into(),
                at: at(0),
            },
        );
        let p = policy("p", "db", &[ActionType::ScaleUp]);
        assert!(
            matches!(g.gate(&p, at(50)), Gate::Hold("silence", w) if w.contains("maintenance"))
        );
        g.begin_pass(at(100));
        assert_eq!(g.gate(&p, at(100)), Gate::Admit);
    }

    #[test]
    fn a_return_within_the_window_is_a_recurrence_once() {
        let mut g = Guards::new(settings());
        let p = policy("p", "api", &[ActionType::ScaleUp]);
        g.success(
            &exec("ok", ExecutionStatus::Completed, Some(OutcomeType::Success)),
            &p,
            at(0),
        );
        let c = vec!["api".to_string()];
        // The incident it remedied is not its own recurrence.
        assert!(g.recurrence("inc-p", &c, at(10)).is_none());
        let r = g.recurrence("inc-new", &c, at(200)).expect("recurrence");
        assert_eq!(r.execution_id, "exe-ok");
        assert!(g.recurrence("inc-newer", &c, at(210)).is_none(), "once");
        g.success(
            &exec(
                "ok2",
                ExecutionStatus::Completed,
                Some(OutcomeType::Success),
            ),
            &p,
            at(1000),
        );
        assert!(
            g.recurrence("inc-late", &c, at(1301)).is_none(),
            "outside the window"
        );
    }

    /// The issue's example: a remedy that "works", then its symptoms come
    /// back, again and again. Each success resets its breakers; each
    /// recurrence restores what was reset, plus one, so they do open.
    #[test]
    fn a_remedy_that_keeps_recurring_opens_its_breakers() {
        let mut g = Guards::new(settings());
        let p = policy("p", "api", &[ActionType::ScaleUp]);
        let key = action_breaker(RootCause::NodeCrash, ActionType::ScaleUp);
        let c = vec!["api".to_string()];
        let mut opened = Vec::new();
        for round in 0..3i64 {
            let ok = exec(
                &format!("ok{round}"),
                ExecutionStatus::Completed,
                Some(OutcomeType::Success),
            );
            g.record_execution(&ok, &p, at(round * 100));
            g.success(&ok, &p, at(round * 100));
            let back = g
                .recurrence(&format!("inc-back{round}"), &c, at(round * 100 + 50))
                .expect("a recurrence");
            assert_eq!(back.component, "api");
            opened.extend(g.record_verdict(&p, Verdict::Failure, "RECURRED", at(round * 100 + 50)));
        }
        assert!(opened.contains(&key), "{opened:?}");
        assert!(g.breaker_blocks(&key, None, at(260)).is_some());
    }

    #[test]
    fn a_lost_trial_is_released_and_state_is_pruned() {
        let mut g = Guards::new(settings());
        let p = policy("p", "api", &[ActionType::RestartService]);
        let key = action_breaker(RootCause::NodeCrash, ActionType::RestartService);
        for i in 0..3 {
            g.record_execution(
                &exec(&format!("f{i}"), ExecutionStatus::Failed, None),
                &p,
                at(0),
            );
        }
        let trial = policy("trial", "api", &[ActionType::RestartService]);
        g.admitted(&trial, at(200));
        assert!(g.breaker_blocks(&key, Some("next"), at(201)).is_some());
        g.release_trial("trial");
        assert!(g.breaker_blocks(&key, Some("next"), at(202)).is_none());
        // One-off components are forgotten after the windows.
        for i in 0..100 {
            g.incident_opened(&format!("i{i}"), &[format!("pod-{i}")], at(0));
        }
        g.begin_pass(at(5000));
        assert_eq!(g.flaps.len(), 0);
    }

    #[test]
    fn the_state_survives_a_restart() {
        let mut g = Guards::new(settings());
        g.set_pause(PauseState {
            by: "ana".into(),
            reason: Some("incident review".into()),
            at: at(0),
        });
        let p = policy("p", "api", &[ActionType::RestartService]);
        g.admitted(&p, at(0));
        for i in 0..3 {
            g.record_execution(
                &exec(&format!("f{i}"), ExecutionStatus::Failed, None),
                &p,
                at(1),
            );
        }
        let saved: Vec<(String, Value)> = g
            .take_dirty()
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        let mut h = Guards::new(settings());
        h.restore(saved);
        assert_eq!(h.pause().map(|p| p.by.as_str()), Some("ana"));
        assert_eq!(h.budget_used(at(2)), 1);
        assert_eq!(h.breaker_counts(at(2)).0, 2);
        assert!(h.resume().is_some());
        assert!(h
            .take_dirty()
            .iter()
            .any(|(k, v)| k == "pause" && v.is_none()));
    }
}
