//! The physics of one simulated component: its state, the figures derived
//! from it, the rules it breaches and the heals a remedy earns. Pure code:
//! no locking, no I/O, the time is passed in.

use std::collections::VecDeque;

use mapek_actors::model::Timestamp;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::SimError;

/// Offered load at baseline, in operations per second.
pub const BASE_LOAD: f64 = 250.0;
/// Capacity of one healthy node, in operations per second.
pub const NODE_CAPACITY: f64 = 200.0;
/// Committee replicas at start.
pub const BASE_REPLICAS: u32 = 3;
/// Load multiplier of a `load_spike`.
pub const SPIKE_FACTOR: f64 = 3.0;
/// Load multiplier of the retry storm of a `cascade` at the component it was
/// injected at.
pub const RETRY_AMPLIFICATION: f64 = 3.0;
/// Load multiplier at a dependent of a component in `cascade`: its clients
/// retry the calls that failed upstream.
pub const DEPENDENT_RETRY_FACTOR: f64 = 1.5;
/// Share of a dependent's operations that fail because their call to an
/// upstream in `cascade` fails (per upstream in cascade).
pub const UPSTREAM_CALL_FAILURE: f64 = 0.3;
/// Seconds after its injection at which a `cascade` reaches the dependents
/// of its component (the latency at the upstream comes first).
pub const CASCADE_SPREAD_SECONDS: u64 = 10;
/// Largest committee the scale endpoint accepts.
pub const MAX_REPLICAS: u64 = 50;
/// Memory of one healthy committee node (bytes).
pub const BASE_MEMORY_BYTES: f64 = 512.0 * MIB;
/// Growth of a node's memory during a `memory_leak` (bytes per second).
pub const LEAK_BYTES_PER_SECOND: f64 = 8.0 * MIB;
/// Seconds of leaking after which a node's memory reaches
/// [`MEMORY_PRESSURE_BYTES`] and the component breaches. A `memory_leak` is
/// injected this far along (it went unnoticed until then): it breaches at
/// once.
pub const LEAK_ONSET_SECONDS: u64 = 90;
/// Memory from which garbage collection thrashes and allocations fail:
/// `BASE_MEMORY_BYTES + LEAK_BYTES_PER_SECOND × LEAK_ONSET_SECONDS`.
pub const MEMORY_PRESSURE_BYTES: f64 =
    BASE_MEMORY_BYTES + LEAK_BYTES_PER_SECOND * LEAK_ONSET_SECONDS as f64;
/// Seconds a scale-up relieves a `memory_leak` for: the fresh replicas
/// bring the committee's memory back to where it was
/// `LEAK_ONSET_SECONDS − LEAK_RELIEF_SECONDS` seconds into the leak, so the
/// breach clears and comes back this long after the scale-up.
pub const LEAK_RELIEF_SECONDS: u64 = 75;
/// A `flapping` component breaches for this many seconds, then is quiet
/// for as many, and so on from its injection.
pub const FLAP_PERIOD_SECONDS: u64 = 30;

/// Validation time of one operation on an idle node (seconds).
const SERVICE_TIME: f64 = 0.1;
/// The queueing term saturates at this utilisation.
const MAX_QUEUE_UTIL: f64 = 0.95;
/// Backlog latency per unit of utilisation above 1 (seconds).
const OVERLOAD_LATENCY: f64 = 2.0;
/// Failure rate of a healthy, unloaded system.
const BASE_FAILURE: f64 = 0.01;
/// Steepness of the congestion collapse above utilisation 1.
const COLLAPSE: f64 = 10.0;
/// Time a validation round waits for a crashed member's vote (seconds).
const MEMBER_TIMEOUT: f64 = 1.0;
/// Share of valid operations a bad policy rejects.
const BAD_POLICY_FAILURE: f64 = 0.2;
/// Latency added by tripped breakers during a cascade (seconds).
const BREAKER_LATENCY: f64 = 1.0;
/// Failure share of tripped breakers during a cascade.
const BREAKER_FAILURE: f64 = 0.3;
/// Latency added at memory pressure (× memory / pressure) and while a
/// flapping component breaches (seconds): garbage-collection pauses,
/// stalled calls.
const EPISODE_LATENCY: f64 = 1.0;
/// Share of operations that still succeed at memory pressure (÷ memory /
/// pressure) and while a flapping component breaches.
const EPISODE_OK: f64 = 0.35;
/// One mebibyte.
const MIB: f64 = 1024.0 * 1024.0;
/// Reported latency never exceeds this (seconds).
pub(crate) const MAX_LATENCY: f64 = 30.0;
/// A committee is `recovering` this long after a fault healed (seconds).
const RECOVERING_SECONDS: i64 = 30;
/// Heal records kept per component for `/sim/state`.
const MAX_HEALS: usize = 100;

/// Rule thresholds of the default rules (`settings::default_rules`).
const LATENCY_LIMIT: f64 = 1.0;
const FAILURE_LIMIT: f64 = 0.10;
const THROUGHPUT_FLOOR: f64 = 100.0;

/// Names of the default rules, as in `mapek_actors::settings::default_rules`.
pub(crate) const RULE_POLICY: &str = "CharterCriticalPolicyViolations";
pub(crate) const RULE_LATENCY: &str = "CharterValidationLatencyHigh";
pub(crate) const RULE_FAILURE: &str = "CharterFailureRateHigh";
pub(crate) const RULE_THROUGHPUT: &str = "CharterThroughputLow";
pub(crate) const RULE_NODES: &str = "CharterNodesUnhealthy";

/// A fault that can be injected into a simulated component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Offered load × 3: latency, failures and collapsing throughput.
    LoadSpike,
    /// A bad policy becomes the active one: critical policy violations and
    /// rejected operations.
    BadPolicy,
    /// One committee node crashes: fewer healthy nodes, slower rounds, failed
    /// operations routed to it.
    NodeCrash,
    /// A retry storm plus tripped breakers at the component, then a retry
    /// storm with failed upstream calls at every component depending on it.
    Cascade,
    /// Memory grows with the time since the leak began; at pressure, the
    /// component slows down and fails like an overloaded one. A scale-up
    /// relieves it for [`LEAK_RELIEF_SECONDS`]; only a restart heals it.
    MemoryLeak,
    /// The component breaches for [`FLAP_PERIOD_SECONDS`], is quiet for as
    /// long, and so on, whatever is done; no remedy heals it (only clearing
    /// the fault ends it).
    Flapping,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::LoadSpike,
        FaultKind::BadPolicy,
        FaultKind::NodeCrash,
        FaultKind::Cascade,
        FaultKind::MemoryLeak,
        FaultKind::Flapping,
    ];

    /// Parses `load_spike`, `bad_policy`, `node_crash`, `cascade`,
    /// `memory_leak`, `flapping`.
    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::LoadSpike => "load_spike",
            FaultKind::BadPolicy => "bad_policy",
            FaultKind::NodeCrash => "node_crash",
            FaultKind::Cascade => "cascade",
            FaultKind::MemoryLeak => "memory_leak",
            FaultKind::Flapping => "flapping",
        }
    }
}

/// A rule of the default set breached by a component's current state, as
/// listed by `GET /api/v1/violations`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimViolation {
    /// Rule name (as in the default rules).
    pub name: String,
    /// `critical` or `warning`.
    pub severity: String,
    /// The component that breaches it.
    pub component: String,
    /// Metric the rule watches.
    pub metric: String,
    /// Current value of the metric.
    pub value: f64,
    /// Labels of the series (`component`, and `severity` for the policy rule).
    pub labels: Map<String, Value>,
}

/// The derived figures of one component at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reading {
    /// Offered load (ops/s).
    pub load_ops_per_sec: f64,
    /// Load admitted past the throttle (ops/s).
    pub admitted_ops_per_sec: f64,
    /// Capacity of the healthy nodes (ops/s).
    pub capacity_ops_per_sec: f64,
    /// Admitted load over capacity.
    pub utilisation: f64,
    /// Validation latency (seconds).
    pub validation_latency_seconds: f64,
    /// Share of admitted operations that fail (0..1).
    pub failure_rate: f64,
    /// Operations completed successfully per second.
    pub throughput_ops_per_sec: f64,
    /// Memory of one committee node (bytes).
    pub memory_bytes: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PolicyStatus {
    Active,
    Superseded,
    RolledBack,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Policy {
    pub(crate) id: String,
    name: String,
    bad: bool,
    status: PolicyStatus,
    applied_at: String,
    /// Policy that was active before this one.
    previous: Option<String>,
    body: Value,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct HealRecord {
    fault: FaultKind,
    by: String,
    at: String,
}

/// Which remedy a call carried, for the heal checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remedy {
    Scale,
    Throttle,
    Override,
    Other,
}

/// The state of one simulated component. Only the upstream cascades that
/// reach it come from outside (`storms`: how many of its upstreams are in a
/// cascade that has spread).
#[derive(Debug)]
pub(crate) struct Component {
    pub(crate) name: String,
    pub(crate) replicas: u32,
    pub(crate) crashed: u32,
    pub(crate) spike: bool,
    /// When a cascade was injected here (while it lasts).
    pub(crate) cascade_since: Option<Timestamp>,
    /// While a memory leak lasts: when it (as far as the nodes' memory
    /// shows) began.
    pub(crate) leak_since: Option<Timestamp>,
    /// When flapping was injected here (while it lasts).
    pub(crate) flapping_since: Option<Timestamp>,
    pub(crate) throttle: Option<f64>,
    pub(crate) override_until: Option<Timestamp>,
    pub(crate) bypass_until: Option<Timestamp>,
    pub(crate) failed_over: bool,
    pub(crate) config: Map<String, Value>,
    pub(crate) previous_config: Option<Map<String, Value>>,
    pub(crate) policies: Vec<Policy>,
    pub(crate) active_policy: Option<String>,
    pub(crate) critical_violations: u64,
    pub(crate) warning_violations: u64,
    pub(crate) heals: VecDeque<HealRecord>,
    pub(crate) last_heal: Option<Timestamp>,
}

impl Component {
    /// A healthy component whose baseline policy has id `baseline_id`.
    pub(crate) fn new(name: &str, baseline_id: String, now: Timestamp) -> Self {
        let baseline = Policy {
            id: baseline_id.clone(),
            name: "baseline".into(),
            bad: false,
            status: PolicyStatus::Active,
            applied_at: now.to_rfc3339(),
            previous: None,
            body: json!({"policy": "baseline"}),
        };
        let mut config = Map::new();
        config.insert("validation_workers".into(), json!(8));
        config.insert("worker_pool_size".into(), json!(16));
        Component {
            name: name.to_string(),
            replicas: BASE_REPLICAS,
            crashed: 0,
            spike: false,
            cascade_since: None,
            leak_since: None,
            flapping_since: None,
            throttle: None,
            override_until: None,
            bypass_until: None,
            failed_over: false,
            config,
            previous_config: None,
            policies: vec![baseline],
            active_policy: Some(baseline_id),
            critical_violations: 0,
            warning_violations: 0,
            heals: VecDeque::new(),
            last_heal: None,
        }
    }

    pub(crate) fn healthy_nodes(&self) -> u32 {
        self.replicas.saturating_sub(self.crashed)
    }

    pub(crate) fn bad_policy_active(&self) -> bool {
        self.active().map(|p| p.bad).unwrap_or(false)
    }

    fn active(&self) -> Option<&Policy> {
        let id = self.active_policy.as_deref()?;
        self.policies.iter().find(|p| p.id == id)
    }

    pub(crate) fn cascade(&self) -> bool {
        self.cascade_since.is_some()
    }

    /// Memory of one node now (bytes): the baseline, plus what the leak
    /// (if any) accumulated since it began.
    pub(crate) fn memory_bytes(&self, now: Timestamp) -> f64 {
        match self.leak_since {
            Some(since) => {
                let secs = ((now - since).num_milliseconds() as f64 / 1000.0).max(0.0);
                BASE_MEMORY_BYTES + LEAK_BYTES_PER_SECOND * secs
            }
            None => BASE_MEMORY_BYTES,
        }
    }

    /// Memory over the pressure point (≥ 1 at pressure), or `None` below it.
    fn memory_pressure(&self, now: Timestamp) -> Option<f64> {
        let ratio = self.memory_bytes(now) / MEMORY_PRESSURE_BYTES;
        (ratio >= 1.0).then_some(ratio)
    }

    /// Whether a flapping component is in its breaching half-period now.
    pub(crate) fn flap_breaching(&self, now: Timestamp) -> bool {
        self.flapping_since.is_some_and(|since| {
            let secs = (now - since).num_seconds().max(0);
            let period = FLAP_PERIOD_SECONDS.max(1) as i64;
            (secs / period) % 2 == 0
        })
    }

    /// Fresh replicas joined the committee: a memory leak's effect falls
    /// back to where it was `LEAK_ONSET_SECONDS − LEAK_RELIEF_SECONDS` into
    /// the leak (never up), so it breaches again [`LEAK_RELIEF_SECONDS`]
    /// from now. The leak itself goes on.
    pub(crate) fn fresh_replicas(&mut self, now: Timestamp) {
        if let Some(since) = self.leak_since {
            let into = LEAK_ONSET_SECONDS.saturating_sub(LEAK_RELIEF_SECONDS);
            let relieved = now - chrono::Duration::seconds(into as i64);
            if relieved > since {
                self.leak_since = Some(relieved);
            }
        }
    }

    pub(crate) fn override_active(&self, now: Timestamp) -> bool {
        self.override_until.is_some_and(|t| t > now)
    }

    pub(crate) fn bypass_active(&self, now: Timestamp) -> bool {
        self.bypass_until.is_some_and(|t| t > now)
    }

    /// Faults injected here and still active (an upstream cascade reaching
    /// this component is not one of them).
    pub(crate) fn faults(&self) -> Vec<FaultKind> {
        let mut out = Vec::new();
        if self.spike {
            out.push(FaultKind::LoadSpike);
        }
        if self.bad_policy_active() {
            out.push(FaultKind::BadPolicy);
        }
        if self.crashed > 0 {
            out.push(FaultKind::NodeCrash);
        }
        if self.cascade() {
            out.push(FaultKind::Cascade);
        }
        if self.leak_since.is_some() {
            out.push(FaultKind::MemoryLeak);
        }
        if self.flapping_since.is_some() {
            out.push(FaultKind::Flapping);
        }
        out
    }

    /// Injects `kind` here; an active fault injected again changes nothing.
    /// A bad policy gets the id `policy_id` (called only when needed).
    pub(crate) fn inject(
        &mut self,
        kind: FaultKind,
        now: Timestamp,
        policy_id: impl FnOnce() -> String,
    ) {
        match kind {
            FaultKind::LoadSpike => self.spike = true,
            FaultKind::Cascade => {
                if self.cascade_since.is_none() {
                    self.cascade_since = Some(now);
                }
            }
            FaultKind::NodeCrash => {
                if self.crashed == 0 {
                    self.crashed = 1;
                }
            }
            FaultKind::MemoryLeak => {
                if self.leak_since.is_none() {
                    let onset = chrono::Duration::seconds(LEAK_ONSET_SECONDS as i64);
                    self.leak_since = Some(now - onset);
                }
            }
            FaultKind::Flapping => {
                if self.flapping_since.is_none() {
                    self.flapping_since = Some(now);
                }
            }
            FaultKind::BadPolicy => {
                if !self.bad_policy_active() {
                    self.add_policy(
                        policy_id(),
                        "bad-policy".into(),
                        true,
                        json!({"policy": "bad", "injected": true}),
                        now,
                    );
                }
            }
        }
    }

    /// Ends every fault injected here (remedies in place stay); returns
    /// those that were active.
    pub(crate) fn clear_faults(&mut self) -> Vec<FaultKind> {
        let before = self.faults();
        self.spike = false;
        self.cascade_since = None;
        self.crashed = 0;
        self.leak_since = None;
        self.flapping_since = None;
        self.drop_bad_policy();
        before
    }

    fn offered_load(&self, storms: usize) -> f64 {
        let mut load = BASE_LOAD;
        if self.spike {
            load *= SPIKE_FACTOR;
        }
        if self.cascade() {
            load *= RETRY_AMPLIFICATION;
        }
        if storms > 0 {
            load *= DEPENDENT_RETRY_FACTOR;
        }
        load
    }

    fn admitted_and_capacity(&self, storms: usize) -> (f64, f64) {
        let offered = self.offered_load(storms);
        let admitted = self.throttle.map_or(offered, |r| offered.min(r));
        (admitted, f64::from(self.healthy_nodes()) * NODE_CAPACITY)
    }

    /// Whether the load alone (as admitted now) keeps every rule quiet.
    fn load_quiet(&self, storms: usize) -> bool {
        let (admitted, capacity) = self.admitted_and_capacity(storms);
        let (latency, failure) = load_response(admitted, capacity);
        latency <= LATENCY_LIMIT
            && failure <= FAILURE_LIMIT
            && admitted * (1.0 - failure) >= THROUGHPUT_FLOOR
    }

    /// The figures now, with `storms` upstreams in a cascade that reached
    /// this component.
    pub(crate) fn reading(&self, now: Timestamp, storms: usize) -> Reading {
        let offered = self.offered_load(storms);
        let (admitted, capacity) = self.admitted_and_capacity(storms);
        let (mut latency, load_failure) = load_response(admitted, capacity);
        let mut ok = 1.0 - load_failure;
        if self.crashed > 0 {
            latency += MEMBER_TIMEOUT;
            let dead = f64::from(self.crashed.min(self.replicas)) / f64::from(self.replicas.max(1));
            ok *= 1.0 - dead;
        }
        if self.bad_policy_active() {
            ok *= 1.0 - BAD_POLICY_FAILURE;
        }
        if self.cascade() && !self.override_active(now) {
            latency += BREAKER_LATENCY;
            ok *= 1.0 - BREAKER_FAILURE;
        }
        for _ in 0..storms {
            ok *= 1.0 - UPSTREAM_CALL_FAILURE;
        }
        if let Some(ratio) = self.memory_pressure(now) {
            latency += EPISODE_LATENCY * ratio;
            ok *= EPISODE_OK / ratio;
        }
        if self.flap_breaching(now) {
            latency += EPISODE_LATENCY;
            ok *= EPISODE_OK;
        }
        let ok = ok.clamp(0.0, 1.0);
        Reading {
            load_ops_per_sec: offered,
            admitted_ops_per_sec: admitted,
            capacity_ops_per_sec: capacity,
            utilisation: if capacity > 0.0 {
                admitted / capacity
            } else {
                0.0
            },
            validation_latency_seconds: latency.min(MAX_LATENCY),
            failure_rate: 1.0 - ok,
            throughput_ops_per_sec: admitted * ok,
            memory_bytes: self.memory_bytes(now),
        }
    }

    /// The default rules breached now.
    pub(crate) fn violations(&self, now: Timestamp, storms: usize) -> Vec<SimViolation> {
        let r = self.reading(now, storms);
        let mut out = Vec::new();
        let mut push = |name: &str, severity: &str, metric: &str, value: f64| {
            let mut labels = Map::new();
            labels.insert("component".into(), json!(self.name));
            if name == RULE_POLICY {
                labels.insert("severity".into(), json!("critical"));
            }
            out.push(SimViolation {
                name: name.into(),
                severity: severity.into(),
                component: self.name.clone(),
                metric: metric.into(),
                value,
                labels,
            })
        };
        if self.bad_policy_active() {
            push(
                RULE_POLICY,
                "critical",
                "westworld_charter_policy_violations_total",
                self.critical_violations as f64,
            );
        }
        if r.validation_latency_seconds > LATENCY_LIMIT {
            push(
                RULE_LATENCY,
                "warning",
                "westworld_charter_validation_latency_seconds",
                r.validation_latency_seconds,
            );
        }
        if r.failure_rate > FAILURE_LIMIT {
            push(
                RULE_FAILURE,
                "critical",
                "westworld_charter_failure_rate",
                r.failure_rate,
            );
        }
        if r.throughput_ops_per_sec < THROUGHPUT_FLOOR {
            push(
                RULE_THROUGHPUT,
                "warning",
                "westworld_charter_throughput_ops_per_sec",
                r.throughput_ops_per_sec,
            );
        }
        if self.healthy_nodes() < self.replicas {
            push(
                RULE_NODES,
                "critical",
                "westworld_charter_unhealthy_nodes",
                f64::from(self.replicas - self.healthy_nodes()),
            );
        }
        out
    }

    pub(crate) fn committee_status(&self, now: Timestamp, storms: usize) -> &'static str {
        let violations = self.violations(now, storms);
        let quorum_lost = self.healthy_nodes() * 2 <= self.replicas;
        if quorum_lost || violations.iter().any(|v| v.severity == "critical") {
            "critical"
        } else if !violations.is_empty() || self.healthy_nodes() < self.replicas {
            "degraded"
        } else if self
            .last_heal
            .is_some_and(|t| (now - t).num_seconds() < RECOVERING_SECONDS)
        {
            "recovering"
        } else {
            "normal"
        }
    }

    /// One validation round, as counted on each read of `/metrics`.
    pub(crate) fn count_round(&mut self, now: Timestamp, storms: usize) {
        if self.bad_policy_active() {
            self.critical_violations += 1;
        }
        if self
            .violations(now, storms)
            .iter()
            .any(|v| v.severity == "warning")
        {
            self.warning_violations += 1;
        }
    }

    pub(crate) fn add_policy(
        &mut self,
        id: String,
        name: String,
        bad: bool,
        body: Value,
        now: Timestamp,
    ) {
        let previous = self.active_policy.clone();
        if let Some(prev) = previous.as_deref() {
            if let Some(p) = self.policies.iter_mut().find(|p| p.id == prev) {
                p.status = PolicyStatus::Superseded;
            }
        }
        self.policies.push(Policy {
            id: id.clone(),
            name,
            bad,
            status: PolicyStatus::Active,
            applied_at: now.to_rfc3339(),
            previous,
            body,
        });
        self.active_policy = Some(id);
    }

    /// Rolls back policy `id`; when it was active, the newest earlier
    /// policy that was not rolled back becomes active again.
    pub(crate) fn rollback_policy(&mut self, id: &str) -> Result<Option<String>, SimError> {
        let idx = self
            .policies
            .iter()
            .position(|p| p.id == id)
            .ok_or_else(|| SimError::NotFound(format!("policy {id}")))?;
        if self.policies[idx].status == PolicyStatus::RolledBack {
            return Err(SimError::Conflict(format!(
                "policy {id} is already rolled back"
            )));
        }
        let was_active = self.policies[idx].status == PolicyStatus::Active;
        self.policies[idx].status = PolicyStatus::RolledBack;
        if was_active {
            let mut prev = self.policies[idx].previous.clone();
            self.active_policy = None;
            while let Some(pid) = prev {
                match self.policies.iter_mut().find(|p| p.id == pid) {
                    Some(p) if p.status != PolicyStatus::RolledBack => {
                        p.status = PolicyStatus::Active;
                        self.active_policy = Some(p.id.clone());
                        break;
                    }
                    Some(p) => prev = p.previous.clone(),
                    None => break,
                }
            }
        }
        Ok(self.active_policy.clone())
    }

    /// Ends the active bad policy, falling back to the last good one.
    fn drop_bad_policy(&mut self) {
        while self.bad_policy_active() {
            let Some(id) = self.active_policy.clone() else {
                break;
            };
            if self.rollback_policy(&id).is_err() {
                break;
            }
        }
    }

    /// Applies the heals a remedy of kind `remedy` earns.
    pub(crate) fn check_heals(&mut self, remedy: Remedy, now: Timestamp, storms: usize) {
        if self.spike
            && matches!(remedy, Remedy::Scale | Remedy::Throttle)
            && self.load_quiet(storms)
        {
            self.spike = false;
        }
        if self.cascade()
            && matches!(remedy, Remedy::Throttle | Remedy::Override)
            && self.override_active(now)
            && self.load_quiet(storms)
        {
            self.cascade_since = None;
        }
    }

    /// Records that `healed` ended through the call `by`.
    pub(crate) fn record_heals(&mut self, healed: &[FaultKind], by: &str, now: Timestamp) {
        if healed.is_empty() {
            return;
        }
        self.last_heal = Some(now);
        for fault in healed {
            if self.heals.len() >= MAX_HEALS {
                self.heals.pop_front();
            }
            self.heals.push_back(HealRecord {
                fault: *fault,
                by: by.to_string(),
                at: now.to_rfc3339(),
            });
        }
    }
}

/// Latency and failure share caused by admitting `admitted` ops/s on
/// `capacity` ops/s.
pub(crate) fn load_response(admitted: f64, capacity: f64) -> (f64, f64) {
    if admitted <= 0.0 {
        return (SERVICE_TIME, BASE_FAILURE);
    }
    if capacity <= 0.0 {
        return (MAX_LATENCY, 1.0);
    }
    let u = admitted / capacity;
    let over = (u - 1.0).max(0.0);
    let latency = SERVICE_TIME / (1.0 - u.min(MAX_QUEUE_UTIL)) + OVERLOAD_LATENCY * over;
    let failure = BASE_FAILURE + (1.0 - BASE_FAILURE) * (1.0 - (-COLLAPSE * over).exp());
    (latency.min(MAX_LATENCY), failure.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    fn component() -> Component {
        Component::new("gateway", "pol-0001".into(), now())
    }

    #[test]
    fn load_response_grows_with_utilisation() {
        let (l1, f1) = load_response(250.0, 600.0);
        let (l2, f2) = load_response(750.0, 600.0);
        assert!(l1 < 0.5 && f1 < 0.05, "{l1} {f1}");
        assert!(l2 > 1.0 && f2 > 0.5, "{l2} {f2}");
        assert_eq!(load_response(10.0, 0.0), (MAX_LATENCY, 1.0));
    }

    #[test]
    fn an_upstream_cascade_raises_load_and_failures_but_not_latency() {
        let c = component();
        let calm = c.reading(now(), 0);
        let storm = c.reading(now(), 1);
        assert_eq!(storm.load_ops_per_sec, BASE_LOAD * DEPENDENT_RETRY_FACTOR);
        assert!(storm.load_ops_per_sec > calm.load_ops_per_sec);
        assert!(storm.failure_rate > 0.10, "{storm:?}");
        assert!(storm.validation_latency_seconds <= 1.0, "{storm:?}");
        assert!(storm.throughput_ops_per_sec >= 100.0, "{storm:?}");
        let names: Vec<String> = c.violations(now(), 1).into_iter().map(|v| v.name).collect();
        assert_eq!(names, [RULE_FAILURE]);
        // Two upstreams in cascade fail more calls.
        assert!(c.reading(now(), 2).failure_rate > storm.failure_rate);
    }

    #[test]
    fn local_remedies_do_not_end_an_upstream_storm() {
        let mut c = component();
        c.throttle = Some(100.0);
        c.replicas = 10;
        c.override_until = Some(now() + chrono::Duration::seconds(300));
        for remedy in [Remedy::Scale, Remedy::Throttle, Remedy::Override] {
            c.check_heals(remedy, now(), 1);
        }
        assert!(c.reading(now(), 1).failure_rate > 0.10);
        assert!(c.faults().is_empty(), "the storm is not a local fault");
    }

    #[test]
    fn violations_carry_the_component_label() {
        let mut c = component();
        c.inject(FaultKind::BadPolicy, now(), || "pol-0002".into());
        let v = c.violations(now(), 0);
        assert!(!v.is_empty());
        for v in &v {
            assert_eq!(v.component, "gateway");
            assert_eq!(v.labels["component"], json!("gateway"));
        }
    }
}
