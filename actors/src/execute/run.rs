//! Execute phase logic: dependency order, retries with backoff and
//! per-call timeouts, rollback of completed actions in reverse order on a
//! failure, and verification of the effect from fresh evidence.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::clock::SharedClock;
use crate::events::{EventBus, LoopEvent};
use crate::knowledge::classify;
use crate::metrics::{EffectorLabels, Metrics};
use crate::model::{
    ActionExecution, ActionType, ExecutionStatus, PolicyExecution, RemediationAction,
    RemediationPolicy,
};
use crate::ports::{Effector, EffectorError, EvidenceProbe};
use crate::settings::{ExecuteSettings, Mode};

/// Parameter the Executor adds to every action it applies:
/// `"<execution id>/<action id>"`, the same for every attempt of one
/// action, so an effector can make retries idempotent (the first attempt
/// may have taken effect before it timed out).
pub const IDEMPOTENCY_KEY: &str = "idempotency_key";

/// A route for some components (globs, `*` and `?`) and, optionally,
/// some action types only.
#[derive(Clone)]
pub struct ComponentRoute {
    /// Component globs (`payments-*`); a component matching any is covered.
    pub components: Vec<glob::Pattern>,
    /// Action types covered (all when `None`).
    pub actions: Option<Vec<ActionType>>,
    /// Where those actions go; `None`: no system owns them here (the
    /// incident is escalated, never sent elsewhere).
    pub effector: Option<Arc<dyn Effector>>,
    /// The route's own safety mode (the stricter of it and `safety.mode`
    /// applies).
    pub mode: Option<Mode>,
}

/// Which effector carries out which action on which component: the
/// component routes first (in order, first match wins), then the
/// action-type routes and the default, which cover the components in
/// `default_components` (every component when unrestricted). An action on
/// a component no route covers has no effector: it is escalated, never
/// sent to an unrelated system.
#[derive(Clone, Default)]
pub struct EffectorRouter {
    component_routes: Vec<ComponentRoute>,
    routes: HashMap<ActionType, Arc<dyn Effector>>,
    fallback: Option<Arc<dyn Effector>>,
    default_components: Option<Vec<glob::Pattern>>,
}

impl EffectorRouter {
    /// A router sending every action type to `effector`.
    pub fn all_to(effector: Arc<dyn Effector>) -> Self {
        EffectorRouter {
            fallback: Some(effector),
            ..Self::default()
        }
    }

    /// A router with no routes.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Routes `action` to `effector`.
    pub fn route(mut self, action: ActionType, effector: Arc<dyn Effector>) -> Self {
        self.routes.insert(action, effector);
        self
    }

    /// The default for action types without a route.
    pub fn fallback(mut self, effector: Arc<dyn Effector>) -> Self {
        self.fallback = Some(effector);
        self
    }

    /// Adds a component route (checked before the action-type routes).
    pub fn component_route(mut self, route: ComponentRoute) -> Self {
        self.component_routes.push(route);
        self
    }

    /// Restricts the action-type routes and the default to these
    /// components.
    pub fn restrict_default(mut self, components: Vec<glob::Pattern>) -> Self {
        self.default_components = Some(components);
        self
    }

    /// The effector for an action type on any component the default covers
    /// (ignores component routes).
    pub fn get(&self, action: ActionType) -> Option<Arc<dyn Effector>> {
        self.routes
            .get(&action)
            .cloned()
            .or_else(|| self.fallback.clone())
    }

    /// The effector for `action` on `component`, if a route covers it.
    pub fn get_for(&self, action: ActionType, component: &str) -> Option<Arc<dyn Effector>> {
        for r in &self.component_routes {
            let action_ok = r.actions.as_ref().is_none_or(|a| a.contains(&action));
            if action_ok && r.components.iter().any(|g| g.matches(component)) {
                return r.effector.clone();
            }
        }
        let covered = self
            .default_components
            .as_ref()
            .is_none_or(|gs| gs.iter().any(|g| g.matches(component)));
        if covered {
            self.get(action)
        } else {
            None
        }
    }

    /// The safety mode of the component route that covers `action` on
    /// `component`, if that route has one.
    pub fn mode_for(&self, action: ActionType, component: &str) -> Option<Mode> {
        self.component_routes
            .iter()
            .find(|r| {
                r.actions.as_ref().is_none_or(|a| a.contains(&action))
                    && r.components.iter().any(|g| g.matches(component))
            })
            .and_then(|r| r.mode)
    }

    /// The mode `policy` runs in: the stricter of `global` (`safety.mode`)
    /// and the modes of the routes its actions take.
    pub fn mode_of(&self, policy: &RemediationPolicy, global: Mode) -> Mode {
        policy.actions.iter().fold(global, |m, a| {
            match self.mode_for(a.action_type, &a.target) {
                Some(r) => m.stricter(r),
                None => m,
            }
        })
    }

    /// Whether some route covers `action` on `component`.
    pub fn covers(&self, action: ActionType, component: &str) -> bool {
        self.get_for(action, component).is_some()
    }
}

/// Orders the actions so that every action comes after those it depends
/// on (Kahn's algorithm, stable with respect to the listed order).
/// Unknown dependencies and cycles are errors.
pub fn execution_order(actions: &[RemediationAction]) -> Result<Vec<usize>, String> {
    let index: HashMap<&str, usize> = actions
        .iter()
        .enumerate()
        .map(|(i, a)| (a.id.as_str(), i))
        .collect();
    if index.len() != actions.len() {
        return Err("duplicate action ids".into());
    }
    let mut indegree = vec![0usize; actions.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); actions.len()];
    for (i, a) in actions.iter().enumerate() {
        for d in &a.depends_on {
            let Some(&j) = index.get(d.as_str()) else {
                return Err(format!("action `{}` depends on unknown action `{d}`", a.id));
            };
            indegree[i] += 1;
            dependents[j].push(i);
        }
    }
    let mut ready: VecDeque<usize> = (0..actions.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(actions.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &k in &dependents[i] {
            indegree[k] -= 1;
            if indegree[k] == 0 {
                ready.push_back(k);
            }
        }
    }
    if order.len() != actions.len() {
        return Err("the actions' dependencies form a cycle".into());
    }
    Ok(order)
}

/// Delay before retry number `attempt` (1-based): exponential from
/// `backoff_initial_ms`, capped at `backoff_max_ms`, with "equal jitter"
/// (half fixed, half random from `jitter` in 0..1).
pub fn backoff(attempt: u32, s: &ExecuteSettings, jitter: f64) -> Duration {
    backoff_between(attempt, s.backoff_initial_ms, s.backoff_max_ms, jitter)
}

/// Delay before retry number `attempt` (1-based): exponential from
/// `initial_ms`, capped at `max_ms`, with equal jitter from `jitter` in
/// 0..1. Shared by the Executor and the daemon's HTTP clients.
pub fn backoff_between(attempt: u32, initial_ms: u64, max_ms: u64, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    let base = initial_ms.saturating_mul(1u64 << exp).min(max_ms);
    let half = base / 2;
    let j = jitter.clamp(0.0, 1.0);
    Duration::from_millis(half + (half as f64 * j) as u64)
}

/// A number in 0..1 for jitter, from the thread's random source (`rand`).
pub fn jitter() -> f64 {
    rand::random::<f64>()
}

/// Everything an execution needs.
#[derive(Clone)]
pub struct ExecutionEnv {
    /// Effectors by action type.
    pub router: EffectorRouter,
    /// Measures violations for verification.
    pub probe: Arc<dyn EvidenceProbe>,
    /// Timeouts, retries, verification window.
    pub settings: ExecuteSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Wall clock for records.
    pub clock: SharedClock,
    /// Where `Executed` events go.
    pub events: Option<EventBus>,
    /// Knowledge, for the intent of each action (journaled before acting).
    pub store: Option<crate::store::KnowledgeStore>,
    /// `safety.mode`: in `dry_run` (here or on an action's route) nothing
    /// leaves mapek; the calls are recorded instead.
    pub mode: Mode,
    /// The loop's state: a policy that reaches the Executor while mapek is
    /// paused (admitted just before the pause) sends nothing.
    pub state: Option<crate::state::SharedState>,
    /// Cluster mode: before each call, the intent is written to the
    /// coordination service under the shard's fence (only the leader can),
    /// and the fence's revision goes with the call as its fencing token.
    pub leadership: Option<Arc<dyn crate::leadership::Leadership>>,
    /// `safety.disruption_budget`: in cluster mode its slots are reserved
    /// in etcd before a policy's first disruptive action.
    pub budget: crate::settings::DisruptionBudgetSettings,
}

/// Parameter carrying an action's fencing token (cluster mode) to its
/// effector, which sends it as `X-Fencing-Token`.
pub const FENCING_TOKEN: &str = "fencing_token";
/// How an attempt refused because this replica no longer leads reads.
const DEPOSED: &str = "no longer the leader of the action's shard";

/// Parameter naming what the token fences (`shard-N`: tokens of different
/// shards are not comparable), sent as `X-Fencing-Domain`.
pub const FENCING_DOMAIN: &str = "fencing_domain";

/// Error of an execution that the pause stopped before it acted.
pub const HELD_BY_PAUSE: &str = "held by the pause before acting: nothing was sent";

/// How an execution refused because its incident is pinned to another
/// shard reads (followed by the shard).
pub const PINNED_ELSEWHERE: &str = "the incident belongs to shard ";

/// Member fingerprints that name an incident's pin (one etcd key each).
const PIN_KEYS: usize = 16;

/// The shard an execution found its incident pinned to, when it was
/// refused for that ([`PINNED_ELSEWHERE`]).
pub fn pinned_elsewhere(exec: &PolicyExecution) -> Option<u32> {
    let e = exec.error.as_deref()?;
    let rest = &e[e.find(PINNED_ELSEWHERE)? + PINNED_ELSEWHERE.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Error of an execution that the cluster-wide disruption budget stopped
/// before it acted (cluster mode: other leaders used the budget first).
pub const HELD_BY_BUDGET: &str =
    "held by the cluster-wide disruption budget before acting: nothing was sent";

/// Whether an execution ended before acting, held (pause or cluster-wide
/// budget): nothing was sent, nothing is learned, it is planned again.
pub fn held_before_acting(exec: &PolicyExecution) -> bool {
    exec.error
        .as_deref()
        .is_some_and(|e| e == HELD_BY_PAUSE || e.starts_with(HELD_BY_BUDGET))
}

/// For an execution held by the cluster-wide budget: when a slot frees
/// (as the error says: `… (a slot frees in N s)`).
pub fn budget_frees_in(exec: &PolicyExecution) -> Option<Duration> {
    let rest = exec.error.as_deref()?.strip_prefix(HELD_BY_BUDGET)?;
    let n = rest
        .trim()
        .strip_prefix("(a slot frees in ")?
        .strip_suffix(" s)")?
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(n))
}

/// What the fence said about one action (cluster mode).
enum Fenced {
    /// Recorded under the fence: call, with this fencing token.
    Go(i64),
    /// Already recorded by a leader before (who): not sent again.
    AlreadyRecorded(String),
    /// Not recorded (not the leader, deposed, the service unreachable):
    /// nothing is sent.
    Refused(String),
}

/// Why a call ended without success.
#[derive(Debug)]
enum CallEnd {
    Failed(EffectorError),
    CutOff,
}

impl ExecutionEnv {
    /// One effector call with per-call timeout and retries (transient
    /// failures only), stopped by the chain deadline.
    async fn call<F>(
        &self,
        effector: &str,
        deadline: Instant,
        attempts: &mut u32,
        mut op: F,
    ) -> Result<Value, CallEnd>
    where
        F: FnMut() -> futures::future::BoxFuture<'static, Result<Value, EffectorError>>,
    {
        let timeout = Duration::from_secs(self.settings.call_timeout_seconds);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            *attempts = attempt;
            if Instant::now() >= deadline {
                return Err(CallEnd::CutOff);
            }
            let started = Instant::now();
            // A panicking effector is a failed call (and the completed
            // actions are rolled back), not a dead Executor.
            let guarded = AssertUnwindSafe(op()).catch_unwind();
            let res = match tokio::time::timeout_at(deadline.min(started + timeout), guarded).await
            {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) => Err(EffectorError::Rejected(format!(
                    "effector panicked: {}",
                    crate::mailbox::panic_message(&panic)
                ))),
                Err(_) if Instant::now() >= deadline => return Err(CallEnd::CutOff),
                Err(_) => Err(EffectorError::Transient(format!(
                    "timed out after {} s",
                    self.settings.call_timeout_seconds
                ))),
            };
            let result = match &res {
                Ok(_) => "ok",
                Err(EffectorError::Transient(m)) if m.starts_with("timed out") => "timeout",
                Err(EffectorError::Transient(_)) => "transient_error",
                Err(_) => "rejected",
            };
            self.metrics
                .effector_call_duration
                .get_or_create(&EffectorLabels {
                    effector: effector.to_string(),
                    result,
                })
                .observe(started.elapsed().as_secs_f64());
            match res {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt <= self.settings.retries => {
                    let delay = backoff(attempt, &self.settings, jitter());
                    tracing::warn!(effector, attempt, error = %e, delay_ms = delay.as_millis() as u64, "effector call failed; retrying");
                    if Instant::now() + delay >= deadline {
                        return Err(CallEnd::CutOff);
                    }
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(CallEnd::Failed(e)),
            }
        }
    }

    /// Runs an approved policy to its end: pre-flight, actions in
    /// dependency order, rollback on failure, verification window, fresh
    /// measurement, outcome. Never runs past `deadline` (the chain's
    /// `max_cycle_time`): a chain that reaches it is cut off.
    pub async fn run_policy(
        &self,
        policy: &RemediationPolicy,
        execution_id: String,
        chain_id: String,
        deadline: Instant,
    ) -> PolicyExecution {
        let (tx, _rx) = tokio::sync::oneshot::channel();
        self.run_policy_with(policy, execution_id, chain_id, deadline, tx)
            .await
    }

    /// [`Self::run_policy`], telling `acted` when the actions are over (the
    /// verification window that follows is only a timer).
    pub async fn run_policy_with(
        &self,
        policy: &RemediationPolicy,
        execution_id: String,
        chain_id: String,
        deadline: Instant,
        acted: tokio::sync::oneshot::Sender<()>,
    ) -> PolicyExecution {
        let started = Instant::now();
        let mut exec = in_progress(policy, execution_id, chain_id, self.clock.now());
        let mut acted = Some(acted);
        let mut reserved: Option<i64> = None;
        self.run_into(policy, &mut exec, deadline, &mut acted, &mut reserved)
            .await;
        // A budget reservation that sent nothing goes back at once (it
        // would hold a slot for the whole window otherwise).
        if let (Some(lease), Some(l)) = (reserved, &self.leadership) {
            if !exec.actions.iter().any(|a| a.attempts > 0) {
                l.release_budget(lease).await;
            }
        }
        if !matches!(
            exec.status,
            ExecutionStatus::Completed | ExecutionStatus::DryRun
        ) {
            self.executed(&exec);
        }
        exec.finished_at = Some(self.clock.now());
        exec.timings.execution_seconds = started.elapsed().as_secs_f64();
        let done = exec
            .actions
            .iter()
            .filter(|a| a.status == ExecutionStatus::Completed)
            .count();
        exec.success_rate = if policy.actions.is_empty() {
            0.0
        } else {
            done as f64 / policy.actions.len() as f64
        };
        exec
    }

    async fn run_into(
        &self,
        policy: &RemediationPolicy,
        exec: &mut PolicyExecution,
        deadline: Instant,
        acted: &mut Option<tokio::sync::oneshot::Sender<()>>,
        reserved: &mut Option<i64>,
    ) {
        let order = match execution_order(&policy.actions) {
            Ok(o) => o,
            Err(e) => return fail(exec, format!("invalid policy: {e}")),
        };
        let mut routed = Vec::with_capacity(order.len());
        let mode = self.mode_of(policy);
        for &i in &order {
            let a = &policy.actions[i];
            match self.router.get_for(a.action_type, &a.target) {
                Some(eff) => routed.push((a.clone(), eff)),
                None => {
                    return fail(
                        exec,
                        format!(
                            "no effector route covers {} on component `{}`",
                            a.action_type, a.target
                        ),
                    )
                }
            }
        }
        if mode != Mode::Act {
            return self.dry_run(policy, exec, routed, acted);
        }
        if self.state.as_ref().is_some_and(|s| s.lock().paused) {
            tracing::warn!(policy = %policy.id, "mapek is paused: the admitted policy sends nothing");
            exec.status = ExecutionStatus::Failed;
            exec.error = Some(HELD_BY_PAUSE.into());
            return;
        }
        // Cluster: the shard the incident belongs to, cluster-wide (the
        // first leader to act on it pinned it), then the name its keys use
        // (a previous leader may have named it first).
        // The incident's record (its fingerprints and onset), read once.
        let incident = self.incident_record(policy);
        if let Some(why) = self.pin(policy, incident.as_ref()).await {
            tracing::info!(policy = %policy.id, reason = %why, "the incident belongs to another shard: nothing sent");
            exec.status = ExecutionStatus::Unknown;
            exec.interrupted = true;
            exec.error = Some(format!(
                "interrupted before acting: {why}; nothing was sent"
            ));
            return;
        }
        if let Some(why) = self.claim(policy, exec, incident.as_ref()).await {
            tracing::warn!(policy = %policy.id, reason = %why, "not the leader: nothing sent");
            exec.status = ExecutionStatus::Unknown;
            exec.interrupted = true;
            exec.error = Some(format!(
                "interrupted before acting: {why}; nothing was sent"
            ));
            return;
        }
        // Cluster: the disruption budget is the cluster's; its slots are
        // taken in etcd before the first disruptive action.
        match self.reserve_budget(policy).await {
            Ok(crate::leadership::Budget::Reserved { lease }) => {
                *reserved = (lease != 0).then_some(lease);
            }
            Ok(crate::leadership::Budget::Full { frees_in }) => {
                tracing::info!(policy = %policy.id, frees_in_seconds = frees_in.as_secs(), "the cluster-wide disruption budget is used up: nothing sent");
                exec.status = ExecutionStatus::Failed;
                exec.error = Some(format!(
                    "{HELD_BY_BUDGET} (a slot frees in {} s)",
                    frees_in.as_secs().max(1)
                ));
                return;
            }
            Err(why) => {
                tracing::warn!(policy = %policy.id, reason = %why, "not the leader: nothing sent");
                exec.status = ExecutionStatus::Unknown;
                exec.interrupted = true;
                exec.error = Some(format!(
                    "interrupted before acting: {why}; nothing was sent"
                ));
                return;
            }
        }
        // The intent of every action is journaled before the first one is
        // sent (queued now, made durable in one group commit while the
        // pre-flight validation runs): a restart or another replica
        // recognises what was about to happen by its idempotency key.
        let intents = self.store.as_ref().map(|store| {
            let futs: Vec<_> = routed
                .iter()
                .map(|(a, eff)| {
                    let key = idempotency_key(policy, exec, a);
                    store.journal_intent(
                        &key,
                        &serde_json::json!({
                            "effector": eff.name(),
                            "execution": exec.id,
                            "policy": policy.id,
                            "action": a,
                        }),
                    )
                })
                .collect();
            // Awaited on the blocking pool: a thread hop (tens of µs) that
            // also keeps a paused test clock from racing past the chain's
            // deadline while the writer thread commits.
            let all = futures::future::join_all(futs);
            tokio::task::spawn_blocking(move || futures::executor::block_on(all))
        });
        // Pre-flight validation, the intents' group commit and the "before"
        // measurement are independent: they overlap.
        let preflight = async {
            if !self.settings.preflight_validate {
                return Ok(());
            }
            let mut checked: Vec<&str> = Vec::new();
            for (_, eff) in &routed {
                if checked.contains(&eff.name()) {
                    continue;
                }
                checked.push(eff.name());
                let (eff2, pol) = (eff.clone(), policy.clone());
                let mut attempts = 0;
                let res = self
                    .call(eff.name(), deadline, &mut attempts, move || {
                        let (e, p) = (eff2.clone(), pol.clone());
                        Box::pin(async move { e.validate(&p).await.map(|_| Value::Null) })
                    })
                    .await;
                match res {
                    Ok(_) => {}
                    Err(CallEnd::CutOff) => return Err(None),
                    Err(CallEnd::Failed(e)) => {
                        return Err(Some(format!(
                            "pre-flight validation by {} failed: {e}",
                            eff.name()
                        )))
                    }
                }
            }
            Ok(())
        };
        let (checked, before) =
            futures::join!(preflight, self.probe.count_violations(&policy.scope));
        match checked {
            Ok(()) => {}
            Err(None) => return cut_off(exec, "during pre-flight validation"),
            Err(Some(why)) => return fail(exec, why),
        }
        if let Some(intents) = intents {
            match intents.await {
                Ok(results) => {
                    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
                        return fail(exec, format!("intent not journaled, nothing sent: {e}"));
                    }
                }
                Err(e) => {
                    return fail(exec, format!("intent not journaled, nothing sent: {e}"));
                }
            }
        }
        exec.violations_before = match before {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(policy = %policy.id, error = %e, "no evidence before acting; the outcome will be UNKNOWN");
                None
            }
        };
        let mut completed: Vec<(usize, RemediationAction, Arc<dyn Effector>, Value)> = Vec::new();
        let fallback = crate::leadership::policy_component(policy).to_string();
        for (mut action, eff) in routed {
            // Each action is fenced on the shard of the component it
            // changes.
            let fencing = self.leadership.as_ref().map(|l| {
                let component = if action.target.is_empty() {
                    fallback.as_str()
                } else {
                    action.target.as_str()
                };
                // The incident's pinned shard; else the target's.
                let shard = match policy.shard {
                    Some(s) if s < l.shards() => s,
                    _ => l.shard_of(component),
                };
                (l.clone(), shard)
            });
            let key = idempotency_key(policy, exec, &action);
            action.parameters.insert(
                IDEMPOTENCY_KEY.into(),
                serde_json::Value::String(key.clone()),
            );
            if let Some((l, shard)) = &fencing {
                // Cluster: the coordination service first (only the shard's
                // leader can record the intent), then the journal, then the
                // call.
                match self.fence(l.as_ref(), *shard, &key, &action, exec).await {
                    Fenced::Go(token) => {
                        action
                            .parameters
                            .insert(FENCING_TOKEN.into(), serde_json::json!(token));
                        action.parameters.insert(
                            FENCING_DOMAIN.into(),
                            serde_json::json!(format!("shard-{shard}")),
                        );
                    }
                    Fenced::AlreadyRecorded(by) => {
                        // A previous leader recorded (and perhaps applied)
                        // it: never sent again, and nothing after it runs
                        // (it may depend on it); the policy is only
                        // verified, outside learning and breakers (this
                        // replica did not act).
                        let now = self.clock.now();
                        exec.interrupted = true;
                        exec.actions.push(ActionExecution {
                            action_id: action.id.clone(),
                            action_type: action.action_type,
                            effector: eff.name().to_string(),
                            status: ExecutionStatus::Unknown,
                            attempts: 0,
                            started_at: Some(now),
                            finished_at: Some(now),
                            result: None,
                            error: Some(format!(
                                "recorded by a previous leader ({by}): it may have been applied; \
                                 not sent again; the actions after it are not run; verified"
                            )),
                            rollback: None,
                            request: serde_json::to_value(&action).ok(),
                        });
                        self.journal_queued(exec);
                        break;
                    }
                    Fenced::Refused(why) => {
                        // No rollback either: a replica that does not lead
                        // changes nothing; the leader carries on.
                        tracing::warn!(policy = %policy.id, action = %action.action_type, reason = %why, "not the leader: nothing sent");
                        exec.status = ExecutionStatus::Unknown;
                        exec.interrupted = true;
                        exec.error = Some(format!(
                            "interrupted: {why}; action {} and the ones after it were not sent",
                            action.action_type
                        ));
                        return;
                    }
                }
            }
            exec.actions.push(ActionExecution {
                action_id: action.id.clone(),
                action_type: action.action_type,
                effector: eff.name().to_string(),
                status: ExecutionStatus::InProgress,
                attempts: 0,
                started_at: Some(self.clock.now()),
                finished_at: None,
                result: None,
                error: None,
                rollback: None,
                request: serde_json::to_value(&action).ok(),
            });
            let at = exec.actions.len() - 1;
            // The action is on record as started, with what is sent,
            // before the call: after a crash it reads UNKNOWN (interrupted)
            // and is never sent again.
            if let Err(e) = self.journal_durable(exec).await {
                exec.actions[at].status = ExecutionStatus::Failed;
                exec.actions[at].error = Some(format!("not journaled, not sent: {e}"));
                self.roll_back(exec, completed).await;
                exec.error = Some(format!(
                    "action {} not journaled, not sent: {e}",
                    action.action_type
                ));
                return;
            }
            let (e2, a2) = (eff.clone(), action.clone());
            let still = fencing.clone();
            let mut attempts = 0;
            let res = self
                .call(eff.name(), deadline, &mut attempts, move || {
                    let (e, a) = (e2.clone(), a2.clone());
                    // Every attempt (a retry comes later) only while this
                    // replica still leads the shard.
                    let deposed = still
                        .as_ref()
                        .is_some_and(|(l, shard)| !l.is_leader(*shard));
                    Box::pin(async move {
                        if deposed {
                            return Err(EffectorError::Rejected(format!(
                                "{DEPOSED}: nothing sent"
                            )));
                        }
                        e.apply(&a).await
                    })
                })
                .await;
            let rec = &mut exec.actions[at];
            rec.attempts = attempts;
            rec.finished_at = Some(self.clock.now());
            match res {
                Ok(v) => {
                    tracing::info!(policy = %policy.id, action = %action.action_type, effector = eff.name(), "action completed");
                    rec.status = ExecutionStatus::Completed;
                    rec.result = Some(v.clone());
                    completed.push((at, action, eff, v));
                    // Queued in order, not awaited: the next action's
                    // start (or the verification) does not wait for it.
                    self.journal_queued(exec);
                }
                Err(end) => {
                    let why = match &end {
                        CallEnd::Failed(e) => e.to_string(),
                        CallEnd::CutOff => "cut off: the chain reached max_cycle_time".to_string(),
                    };
                    if fencing.is_some()
                        && (why.contains(DEPOSED) || why.contains("stale fencing token"))
                    {
                        // Deposed while acting: this replica changes
                        // nothing more (no rollback); the new leader
                        // verifies and carries on.
                        tracing::warn!(policy = %policy.id, action = %action.action_type, error = %why, "no longer the leader: stopping without a rollback");
                        rec.status = ExecutionStatus::Unknown;
                        rec.error = Some(why.clone());
                        exec.status = ExecutionStatus::Unknown;
                        exec.interrupted = true;
                        exec.error = Some(format!("interrupted: {why}"));
                        return;
                    }
                    tracing::warn!(policy = %policy.id, action = %action.action_type, error = %why, "action failed; rolling back completed actions");
                    rec.status = ExecutionStatus::Failed;
                    rec.error = Some(why.clone());
                    if matches!(end, CallEnd::CutOff) {
                        exec.timings.cut_off = true;
                    }
                    self.roll_back(exec, completed).await;
                    exec.error = Some(format!("action {} failed: {why}", action.action_type));
                    return;
                }
            }
        }
        exec.status = ExecutionStatus::Completed;
        // Verifying: a restart re-arms the verification of an execution on
        // record as COMPLETED without an outcome.
        self.journal_queued(exec);
        self.executed(exec);
        if let Some(tx) = acted.take() {
            let _ = tx.send(());
        }
        // Verification: wait, then measure the same signals again.
        let window = Duration::from_secs(self.settings.verification_window_seconds);
        if Instant::now() + window > deadline {
            tokio::time::sleep_until(deadline).await;
            exec.timings.cut_off = true;
            exec.outcome = Some(classify(None, None));
            exec.error =
                Some("cut off during verification: the chain reached max_cycle_time".into());
            return;
        }
        tokio::time::sleep(window).await;
        exec.violations_after = match self.probe.count_violations(&policy.scope).await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(policy = %policy.id, error = %e, "no evidence after acting; outcome UNKNOWN");
                None
            }
        };
        exec.outcome = Some(classify(exec.violations_before, exec.violations_after));
    }

    /// The mode `policy` runs in: the stricter of `safety.mode` and the
    /// modes of its actions' routes.
    pub fn mode_of(&self, policy: &RemediationPolicy) -> Mode {
        self.router.mode_of(policy, self.mode)
    }

    /// A dry run: every call that would have been made is recorded on
    /// the execution (effector, action, target, parameters with the
    /// idempotency key); nothing is sent, nothing is verified, nothing is
    /// learned.
    fn dry_run(
        &self,
        policy: &RemediationPolicy,
        exec: &mut PolicyExecution,
        routed: Vec<(RemediationAction, Arc<dyn Effector>)>,
        acted: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        for (mut action, eff) in routed {
            let key = idempotency_key(policy, exec, &action);
            action
                .parameters
                .insert(IDEMPOTENCY_KEY.into(), serde_json::Value::String(key));
            let now = self.clock.now();
            exec.actions.push(ActionExecution {
                action_id: action.id.clone(),
                action_type: action.action_type,
                effector: eff.name().to_string(),
                status: ExecutionStatus::DryRun,
                attempts: 0,
                started_at: Some(now),
                finished_at: Some(now),
                result: Some(serde_json::json!({
                    "dry_run": true,
                    "would_call": {
                        "effector": eff.name(),
                        "action_type": action.action_type,
                        "target": action.target,
                        "parameters": action.parameters,
                    }
                })),
                error: None,
                rollback: None,
                request: serde_json::to_value(&action).ok(),
            });
        }
        tracing::info!(policy = %policy.id, actions = exec.actions.len(), "dry run: calls recorded, nothing sent");
        exec.status = ExecutionStatus::DryRun;
        self.executed(exec);
        if let Some(tx) = acted.take() {
            let _ = tx.send(());
        }
    }

    /// Cluster mode: the record of the policy's incident, if stored.
    fn incident_record(&self, policy: &RemediationPolicy) -> Option<crate::model::Incident> {
        self.leadership.as_ref()?;
        let local = policy.incident_id.as_deref()?;
        self.store
            .as_ref()?
            .get_record::<crate::model::Incident>(crate::store::INCIDENTS_TREE, local)
            .ok()
            .flatten()
    }

    /// Cluster mode: pins the policy's incident to its shard cluster-wide
    /// (keys per member fingerprint); `Some`: it belongs to another shard
    /// ([`PINNED_ELSEWHERE`]), or the pin could not be checked.
    async fn pin(
        &self,
        policy: &RemediationPolicy,
        incident: Option<&crate::model::Incident>,
    ) -> Option<String> {
        let (Some(l), Some(shard)) = (&self.leadership, policy.shard) else {
            return None;
        };
        let keys: Vec<String> = incident
            .map(|i| i.fingerprints.as_slice())
            .unwrap_or_default()
            .iter()
            .take(PIN_KEYS)
            .map(|fp| format!("incident-pins/{:016x}", crate::leadership::name_hash(fp)))
            .collect();
        match l.pin_incident(shard, &keys).await {
            Ok(s) if s == shard => None,
            Ok(s) => Some(format!(
                "{PINNED_ELSEWHERE}{s} (pinned by the leader that first acted on it)"
            )),
            Err(e) => Some(format!("the incident's shard could not be pinned: {e}")),
        }
    }

    /// Cluster mode: reserves the policy's disruptive actions in the
    /// cluster-wide budget (fenced on the shard of its component).
    async fn reserve_budget(
        &self,
        policy: &RemediationPolicy,
    ) -> Result<crate::leadership::Budget, String> {
        let reserved = crate::leadership::Budget::Reserved { lease: 0 };
        let Some(l) = &self.leadership else {
            return Ok(reserved);
        };
        let n = policy
            .actions
            .iter()
            .filter(|a| self.budget.action_types.contains(&a.action_type))
            .count() as u32;
        if n == 0 {
            return Ok(reserved);
        }
        let shard = crate::leadership::policy_shard(l.as_ref(), policy);
        l.reserve_budget(
            shard,
            n,
            self.budget.max_actions,
            Duration::from_secs(self.budget.window_seconds),
            &policy.id,
        )
        .await
        .map_err(|e| format!("the disruption budget could not be reserved: {e}"))
    }

    /// Cluster mode: finds the incident's claim, adopts its name and
    /// attempt (see [`claimed_keys`]) into `exec.acted_as`, and records
    /// the claim under the fence of the root component's shard. `Some`:
    /// why nothing may be sent.
    async fn claim(
        &self,
        policy: &RemediationPolicy,
        exec: &mut PolicyExecution,
        incident: Option<&crate::model::Incident>,
    ) -> Option<String> {
        let (Some(l), Some(local)) = (&self.leadership, policy.incident_id.as_deref()) else {
            return None;
        };
        let root = crate::leadership::policy_component(policy);
        let shard = crate::leadership::policy_shard(l.as_ref(), policy);
        let key = claim_key(root);
        let found = match l.read(&key).await {
            Ok(v) => v
                .and_then(|b| serde_json::from_slice::<IncidentClaim>(&b).ok())
                .filter(|c| c.root == root),
            Err(e) => return Some(format!("the incident's claim could not be read: {e}")),
        };
        let now_ms = self.clock.now().timestamp_millis();
        // When our incident opened (its first violation's agreed onset).
        let opened_ms = incident.map(|i| i.opened_at.timestamp_millis());
        let (incident, attempt, offset) = claimed_keys(
            found.as_ref(),
            l.name(),
            local,
            policy.attempt,
            now_ms,
            opened_ms,
        );
        if incident != local || attempt != policy.attempt {
            tracing::info!(policy = %policy.id, local, incident = %incident, attempt, "cluster: acting under the incident's name given by a previous leader");
            exec.acted_as = Some(format!("{incident}/{attempt}"));
        }
        let claim = IncidentClaim {
            root: root.to_string(),
            incident,
            attempt,
            by: l.name().to_string(),
            local: local.to_string(),
            offset,
            updated_ms: self.clock.now().timestamp_millis(),
        };
        let bytes = serde_json::to_vec(&claim).unwrap_or_default();
        match l.fenced_put(shard, &key, bytes).await {
            Ok(_) => None,
            Err(e) => Some(format!("not the leader of shard {shard}: {e}")),
        }
    }

    /// Records the intent of `action` under the shard's fence.
    async fn fence(
        &self,
        l: &dyn crate::leadership::Leadership,
        shard: u32,
        key: &str,
        action: &RemediationAction,
        exec: &PolicyExecution,
    ) -> Fenced {
        let path = format!("intents/{key}");
        match l.read(&path).await {
            Ok(Some(previous)) => {
                let by = serde_json::from_slice::<Value>(&previous)
                    .ok()
                    .and_then(|v| v["by"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "another replica".into());
                return Fenced::AlreadyRecorded(by);
            }
            Ok(None) => {}
            Err(e) => return Fenced::Refused(format!("the intent could not be checked: {e}")),
        }
        let intent = serde_json::json!({
            "by": l.name(),
            "execution": exec.id,
            "policy": exec.policy_id,
            "request": action,
        });
        match l
            .fenced_put(
                shard,
                &path,
                serde_json::to_vec(&intent).unwrap_or_default(),
            )
            .await
        {
            Ok(w) => Fenced::Go(w.fence.revision),
            Err(e) => Fenced::Refused(format!("not the leader of shard {shard}: {e}")),
        }
    }

    /// Puts the execution on record; resolves once it is durable.
    fn journal_durable(
        &self,
        exec: &PolicyExecution,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let Some(store) = &self.store else {
            return Box::pin(async { Ok(()) });
        };
        let write = store.put_execution_async(exec);
        // Awaited on the blocking pool, as the intents are (a paused test
        // clock must not race past the deadline meanwhile).
        Box::pin(async move {
            tokio::task::spawn_blocking(move || futures::executor::block_on(write))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }

    /// Queues the execution's record (journal order = call order) without
    /// waiting for it; a failure is logged.
    fn journal_queued(&self, exec: &PolicyExecution) {
        let Some(store) = &self.store else { return };
        let write = store.put_execution_async(exec);
        let id = exec.id.clone();
        tokio::spawn(async move {
            if let Err(e) = write.await {
                tracing::error!(execution = %id, error = %e, "cannot record the execution's progress");
            }
        });
    }

    fn executed(&self, exec: &PolicyExecution) {
        if let Some(bus) = &self.events {
            let _ = bus.send(LoopEvent::Executed {
                chain_id: exec.chain_id.clone(),
                policy_id: exec.policy_id.clone(),
                execution_id: exec.id.clone(),
                status: exec.status,
            });
        }
    }

    async fn roll_back(
        &self,
        exec: &mut PolicyExecution,
        completed: Vec<(usize, RemediationAction, Arc<dyn Effector>, Value)>,
    ) {
        if completed.is_empty() {
            exec.status = ExecutionStatus::Failed;
            return;
        }
        let mut all_ok = true;
        // Rollback is not bound by the chain deadline: leaving the system
        // half-changed is worse than a late chain.
        let deadline = Instant::now()
            + Duration::from_secs(
                self.settings.call_timeout_seconds * (u64::from(self.settings.retries) + 2),
            );
        for (idx, action, eff, applied) in completed.into_iter().rev() {
            let Some(step) = action.rollback.clone() else {
                exec.actions[idx].rollback = Some("not reversible".into());
                continue;
            };
            // On record as under way before the call: after a crash the
            // undo reads as sent, perhaps applied.
            exec.actions[idx].rollback = Some(
                "rollback under way (if this stays, mapek stopped during it: it may or may \
                 not have been applied)"
                    .into(),
            );
            if let Err(e) = self.journal_durable(exec).await {
                tracing::error!(execution = %exec.id, error = %e, "cannot record the rollback's start; rolling back anyway");
            }
            let (e2, a2, s2, v2) = (eff.clone(), action.clone(), step, applied);
            let mut attempts = 0;
            let res = self
                .call(eff.name(), deadline, &mut attempts, move || {
                    let (e, a, s, v) = (e2.clone(), a2.clone(), s2.clone(), v2.clone());
                    Box::pin(async move { e.rollback(&a, &s, &v).await })
                })
                .await;
            exec.actions[idx].rollback = Some(match res {
                Ok(_) => {
                    exec.actions[idx].status = ExecutionStatus::RolledBack;
                    "rolled back".to_string()
                }
                Err(CallEnd::Failed(e)) => {
                    all_ok = false;
                    format!("rollback failed: {e}")
                }
                Err(CallEnd::CutOff) => {
                    all_ok = false;
                    "rollback timed out".to_string()
                }
            });
        }
        exec.status = if all_ok {
            ExecutionStatus::RolledBack
        } else {
            ExecutionStatus::Failed
        };
        self.journal_queued(exec);
    }
}

/// The idempotency key of an action: `incident/attempt/action` for a
/// policy of an incident (deterministic), else `execution/action`.
pub fn idempotency_key(
    policy: &RemediationPolicy,
    exec: &PolicyExecution,
    action: &RemediationAction,
) -> String {
    match (&exec.acted_as, &policy.incident_id) {
        (Some(prefix), _) => format!("{prefix}/{}", action.id),
        (None, Some(incident)) => format!("{incident}/{}/{}", policy.attempt, action.id),
        (None, None) => format!("{}/{}", exec.id, action.id),
    }
}

/// What a leader records of an incident it acts on, under
/// `incident-claims/<hash of its root component>` (cluster mode): the
/// name and attempt its keys use, so that the next leader, which named
/// the incident itself, acts under the same keys.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IncidentClaim {
    /// The root component.
    pub root: String,
    /// The incident's name in the keys.
    pub incident: String,
    /// The attempt of the last execution under this claim.
    pub attempt: u32,
    /// The replica that wrote it.
    pub by: String,
    /// That replica's own id of the incident.
    pub local: String,
    /// `attempt − local attempt` on that replica.
    pub offset: u32,
    /// When written (ms since the epoch).
    pub updated_ms: i64,
}

/// The `incident/attempt` a policy's keys use, given the claim found
/// (cluster mode). A claim by another name is adopted: the first
/// execution re-uses its last attempt (whatever the previous leader
/// recorded there is verified, never sent again), later ones go past it.
pub fn claimed_keys(
    claim: Option<&IncidentClaim>,
    me: &str,
    local: &str,
    attempt: u32,
    now_ms: i64,
    opened_ms: Option<i64>,
) -> (String, u32, u32) {
    match claim {
        // Another replica's claim from before our incident opened: it was
        // about an earlier incident of the component.
        Some(c) if c.by != me && opened_ms.is_some_and(|o| o > c.updated_ms) => {
            (local.to_string(), attempt, 0)
        }
        // Our own claim for another incident of ours: that one is over
        // (one incident per component at a time here), this is new.
        Some(c) if c.by == me && c.local != local => (local.to_string(), attempt, 0),
        // Another replica's claim not renewed for longer than an action
        // and its verification can take: nothing of it is in flight.
        Some(c) if c.by != me && now_ms.saturating_sub(c.updated_ms) > CLAIM_ADOPT_MS => {
            (local.to_string(), attempt, 0)
        }
        Some(c) if c.incident != local => {
            let offset = if c.by == me && c.local == local {
                c.offset
            } else {
                c.attempt.saturating_sub(attempt)
            };
            (c.incident.clone(), attempt.saturating_add(offset), offset)
        }
        _ => (local.to_string(), attempt, 0),
    }
}

/// How recent another replica's claim must be to be adopted (ms): longer
/// than an execution and its verification window take.
pub const CLAIM_ADOPT_MS: i64 = 10 * 60 * 1000;

/// The key of an incident claim, relative to the cluster prefix.
pub fn claim_key(root: &str) -> String {
    format!(
        "incident-claims/{:016x}",
        crate::leadership::name_hash(root)
    )
}

/// A fresh IN_PROGRESS record of an execution of `policy`.
pub fn in_progress(
    policy: &RemediationPolicy,
    execution_id: String,
    chain_id: String,
    started_at: crate::model::Timestamp,
) -> PolicyExecution {
    PolicyExecution {
        id: execution_id,
        policy_id: policy.id.clone(),
        chain_id,
        root_cause: policy.root_cause,
        status: ExecutionStatus::InProgress,
        actions: Vec::new(),
        started_at,
        finished_at: None,
        success_rate: 0.0,
        error: None,
        violations_before: None,
        violations_after: None,
        outcome: None,
        timings: Default::default(),
        incident_id: policy.incident_id.clone(),
        interrupted: false,
        acted_as: None,
    }
}

fn fail(exec: &mut PolicyExecution, why: String) {
    tracing::warn!(policy = %exec.policy_id, error = %why, "execution failed before acting");
    exec.status = ExecutionStatus::Failed;
    exec.error = Some(why);
}

fn cut_off(exec: &mut PolicyExecution, when: &str) {
    exec.status = ExecutionStatus::Failed;
    exec.timings.cut_off = true;
    exec.error = Some(format!("cut off {when}: the chain reached max_cycle_time"));
}

#[cfg(test)]
mod router_tests {
    use super::*;
    use crate::testing::RecordingEffector;

    #[test]
    fn routes_match_components_and_uncovered_components_have_no_effector() {
        let charter: Arc<dyn Effector> = Arc::new(RecordingEffector::new());
        let hook: Arc<dyn Effector> = Arc::new(RecordingEffector::new());
        let glob = |g: &str| glob::Pattern::new(g).expect("glob");
        let r = EffectorRouter::all_to(charter.clone())
            .restrict_default(vec![glob("charter*")])
            .component_route(ComponentRoute {
                components: vec![glob("pay-*")],
                actions: Some(vec![ActionType::RestartService]),
                effector: Some(hook.clone()),
                mode: None,
            })
            .component_route(ComponentRoute {
                components: vec![glob("legacy-*")],
                actions: None,
                effector: None,
                mode: None,
            });
        let same = |a: &Option<Arc<dyn Effector>>, b: &Arc<dyn Effector>| {
            a.as_ref().is_some_and(|a| Arc::ptr_eq(a, b))
        };
        assert!(same(&r.get_for(ActionType::ScaleUp, "charter"), &charter));
        assert!(same(
            &r.get_for(ActionType::ScaleUp, "charter-eu"),
            &charter
        ));
        assert!(same(&r.get_for(ActionType::RestartService, "pay-1"), &hook));
        // pay-1 is covered for RESTART_SERVICE only; nothing else owns it.
        assert!(r.get_for(ActionType::ScaleUp, "pay-1").is_none());
        assert!(!r.covers(ActionType::RestartService, "ledger"));
        // An explicit `none` route owns nothing, even where the default would.
        let open = EffectorRouter::all_to(charter.clone()).component_route(ComponentRoute {
            components: vec![glob("legacy-*")],
            actions: None,
            effector: None,
            mode: None,
        });
        assert!(!open.covers(ActionType::ScaleUp, "legacy-1"));
        assert!(open.covers(ActionType::ScaleUp, "charter"));
        // Unrestricted, the default covers every component.
        assert!(EffectorRouter::all_to(charter).covers(ActionType::Failover, "anything"));
    }
}

#[cfg(test)]
mod tests {
    use super::{claimed_keys, IncidentClaim};

    fn claim(incident: &str, attempt: u32, by: &str, local: &str, offset: u32) -> IncidentClaim {
        IncidentClaim {
            root: "api".into(),
            incident: incident.into(),
            attempt,
            by: by.into(),
            local: local.into(),
            offset,
            updated_ms: 0,
        }
    }

    #[test]
    fn claimed_keys_adopt_the_previous_leaders_name_and_go_past_its_attempt() {
        // No claim, or one by the same name: our own keys.
        assert_eq!(
            claimed_keys(None, "b", "inc-b", 1, 0, None),
            ("inc-b".into(), 1, 0)
        );
        let same = claim("inc-b", 3, "a", "inc-a", 0);
        assert_eq!(
            claimed_keys(Some(&same), "b", "inc-b", 1, 0, None),
            ("inc-b".into(), 1, 0)
        );
        // Another leader's name at attempt 3: our first execution re-uses
        // attempt 3 (verified, not re-sent), the next goes to 4.
        let theirs = claim("inc-a", 3, "a", "inc-a", 0);
        assert_eq!(
            claimed_keys(Some(&theirs), "b", "inc-b", 1, 0, None),
            ("inc-a".into(), 3, 2)
        );
        let ours = claim("inc-a", 3, "b", "inc-b", 2);
        assert_eq!(
            claimed_keys(Some(&ours), "b", "inc-b", 2, 0, None),
            ("inc-a".into(), 4, 2)
        );
        // Our local count already past theirs: no offset.
        assert_eq!(
            claimed_keys(Some(&theirs), "b", "inc-b", 5, 0, None),
            ("inc-a".into(), 5, 0)
        );
        // Our own claim for an earlier incident: this one is new.
        let earlier = claim("inc-a", 4, "b", "inc-old", 2);
        assert_eq!(
            claimed_keys(Some(&earlier), "b", "inc-b", 1, 0, None),
            ("inc-b".into(), 1, 0)
        );
        // Another replica's claim from before our incident opened: new.
        assert_eq!(
            claimed_keys(Some(&theirs), "b", "inc-b", 1, 5, Some(1)),
            ("inc-b".into(), 1, 0)
        );
        // From after it opened: adopted.
        let recent = claim("inc-a", 3, "a", "inc-a", 0);
        let recent = IncidentClaim {
            updated_ms: 10,
            ..recent
        };
        assert_eq!(
            claimed_keys(Some(&recent), "b", "inc-b", 1, 20, Some(5)),
            ("inc-a".into(), 3, 2)
        );
        // Another replica's claim idle past the adoption window: new too.
        let idle = super::CLAIM_ADOPT_MS + 1;
        assert_eq!(
            claimed_keys(Some(&theirs), "b", "inc-b", 1, idle, None),
            ("inc-b".into(), 1, 0)
        );
    }

    use super::*;
    use crate::model::Priority;

    fn action(id: &str, deps: &[&str]) -> RemediationAction {
        RemediationAction {
            id: id.into(),
            action_type: ActionType::ScaleUp,
            target: "c".into(),
            parameters: Default::default(),
            priority: Priority::High,
            cost: 0.1,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            rollback: None,
        }
    }

    #[test]
    fn order_respects_dependencies_and_listing() {
        let a = vec![action("a2", &["a1"]), action("a1", &[]), action("a3", &[])];
        assert_eq!(execution_order(&a), Ok(vec![1, 2, 0]));
    }

    #[test]
    fn order_rejects_cycles_and_unknown_dependencies() {
        let cyc = vec![action("a1", &["a2"]), action("a2", &["a1"])];
        assert!(execution_order(&cyc).is_err());
        let unknown = vec![action("a1", &["zz"])];
        assert!(execution_order(&unknown).unwrap_err().contains("zz"));
    }

    #[test]
    fn backoff_doubles_caps_and_jitters_within_half() {
        let s = ExecuteSettings {
            backoff_initial_ms: 100,
            backoff_max_ms: 350,
            ..Default::default()
        };
        assert_eq!(backoff(1, &s, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(1, &s, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(2, &s, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(3, &s, 1.0), Duration::from_millis(350), "capped");
        assert_eq!(backoff(30, &s, 0.0), Duration::from_millis(175));
    }
}

#[cfg(test)]
mod pause_tests {
    use super::*;
    use crate::model::{ApprovalStatus, Priority, RiskLevel, RootCause};
    use crate::testing::{RecordingEffector, ScriptedProbe};

    fn policy() -> RemediationPolicy {
        RemediationPolicy {
            id: "pol-1".into(),
            chain_id: "c".into(),
            analysis_id: "a".into(),
            created_at: chrono::Utc::now(),
            root_cause: RootCause::NodeCrash,
            root_cause_confidence: 0.9,
            actions: vec![RemediationAction {
                id: "a1".into(),
                action_type: ActionType::RestartService,
                target: "svc".into(),
                parameters: Default::default(),
                priority: Priority::High,
                cost: 0.2,
                depends_on: Vec::new(),
                rollback: None,
            }],
            expected_impact: String::new(),
            risk_level: RiskLevel::Medium,
            priority: Priority::High,
            cost_estimate: 0.2,
            benefit_estimate: 0.7,
            score: 0.5,
            approval_status: ApprovalStatus::Approved,
            decisions: Vec::new(),
            violations_at_planning: 3,
            scope: vec!["svc".into()],
            incident_id: Some("inc-1".into()),
            attempt: 1,
            guards: Vec::new(),
            autonomy: None,
            candidates: Vec::new(),
            shard: None,
        }
    }

    #[test]
    fn the_shard_an_incident_is_pinned_to_is_read_back_from_the_error() {
        let mut exec = in_progress(&policy(), "e".into(), "c".into(), chrono::Utc::now());
        assert_eq!(pinned_elsewhere(&exec), None);
        exec.error = Some(format!(
            "interrupted before acting: {}7 (pinned by the leader that first acted on it); nothing was sent",
            PINNED_ELSEWHERE
        ));
        assert_eq!(pinned_elsewhere(&exec), Some(7));
        exec.error = Some(format!("{} (a slot frees in 42 s)", HELD_BY_BUDGET));
        assert_eq!(pinned_elsewhere(&exec), None);
        assert_eq!(budget_frees_in(&exec), Some(Duration::from_secs(42)));
        assert!(held_before_acting(&exec));
    }

    fn env(effector: &RecordingEffector, state: crate::state::SharedState) -> ExecutionEnv {
        ExecutionEnv {
            router: EffectorRouter::all_to(Arc::new(effector.clone())),
            probe: Arc::new(ScriptedProbe::new(vec![Ok(3), Ok(0)])),
            settings: ExecuteSettings {
                verification_window_seconds: 0,
                ..ExecuteSettings::default()
            },
            metrics: Arc::new(Metrics::new()),
            clock: Arc::new(crate::clock::SystemClock),
            events: None,
            store: None,
            mode: Mode::Act,
            state: Some(state),
            leadership: None,
            budget: Default::default(),
        }
    }

    /// A policy admitted just before the pause reaches the Executor after
    /// it: nothing is sent, validated or journaled.
    #[tokio::test]
    async fn a_paused_loop_sends_nothing_even_for_an_admitted_policy() {
        let effector = RecordingEffector::new();
        let state = crate::state::SharedState::default();
        state.lock().paused = true;
        let deadline = Instant::now() + Duration::from_secs(60);
        let exec = env(&effector, state.clone())
            .run_policy(&policy(), "exe-1".into(), "c".into(), deadline)
            .await;
        assert_eq!(exec.status, ExecutionStatus::Failed);
        assert_eq!(exec.error.as_deref(), Some(HELD_BY_PAUSE));
        assert!(effector.calls().is_empty(), "{:?}", effector.calls());
        // Resumed: the same policy acts.
        state.lock().paused = false;
        let exec = env(&effector, state)
            .run_policy(&policy(), "exe-2".into(), "c".into(), deadline)
            .await;
        assert_eq!(exec.status, ExecutionStatus::Completed);
        assert!(effector.calls().iter().any(|c| c.kind == "apply"));
    }
}
