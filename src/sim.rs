//! The simulated Charter: the managed system of the demo and the tests.
//!
//! It serves the whole Charter REST API of the specification, exports the
//! `westworld_charter_*` metrics on `/metrics` and lets a test or an operator
//! inject faults through `/sim/*`. Everything is computed from the state on
//! each read, and the state changes only through API calls: the model is
//! deterministic (the clock only stamps records and bounds the duration of an
//! emergency override or a validation bypass).
//!
//! # Model
//!
//! * offered load `L = 250 ops/s` (× 3 during a `load_spike`, × 3 more from
//!   retries during a `cascade`); admitted load `A = min(L, rate_limit)`;
//! * capacity `C = 200 ops/s × healthy_nodes`, `healthy_nodes = replicas −
//!   crashed`; utilisation `u = A / C`;
//! * validation latency `0.1 s / (1 − min(u, 0.95)) + 2 s × max(0, u − 1)`
//!   (queueing delay, then backlog), plus 1 s while a crashed member is still
//!   in the committee (every round waits for its vote to time out), plus 1 s
//!   while a cascade has tripped the breakers (no emergency override);
//! * failure rate `1 − Π(1 − fᵢ)` of independent causes: load
//!   `0.01 + 0.99 × (1 − e^(−10 × max(0, u − 1)))` (congestion collapse),
//!   traffic routed to crashed members `crashed / replicas`, a bad policy
//!   rejecting valid operations `0.2`, tripped breakers `0.3`;
//! * throughput (goodput) `A × (1 − failure rate)`;
//! * the critical policy-violation counter grows by one on every read of
//!   `/metrics` while a bad policy is active; the warning counter grows by one
//!   per read while a warning-level rule breaches.
//!
//! A fault heals only through a remedy that fits it, and only when that
//! remedy is sufficient: a `load_spike` through a scale or a throttle that
//! brings utilisation back within bounds; a `bad_policy` through a corrected
//! policy (`policies/apply`) or the rollback of the bad one; a `node_crash`
//! through a committee restart or a failover; a `cascade` once both an
//! emergency override and a sufficient throttle are active. A healed fault
//! ends with its effects (the spike or the retry storm subsides, the node is
//! back, the good policy is active); the remedies stay in place.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mapek_actors::clock::{SharedClock, SystemClock};
use mapek_actors::model::Timestamp;
use serde::Serialize;
use serde_json::{json, Map, Value};

/// Offered load at baseline, in operations per second.
pub const BASE_LOAD: f64 = 250.0;
/// Capacity of one healthy node, in operations per second.
pub const NODE_CAPACITY: f64 = 200.0;
/// Committee replicas at start.
pub const BASE_REPLICAS: u32 = 3;
/// Load multiplier of a `load_spike`.
pub const SPIKE_FACTOR: f64 = 3.0;
/// Load multiplier of the retry storm of a `cascade`.
pub const RETRY_AMPLIFICATION: f64 = 3.0;
/// Largest committee the scale endpoint accepts.
pub const MAX_REPLICAS: u64 = 50;
/// Number of Charter API calls kept for `/sim/calls`.
pub const MAX_CALLS: usize = 1000;

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
/// Reported latency never exceeds this (seconds).
const MAX_LATENCY: f64 = 30.0;
/// A committee is `recovering` this long after a fault healed (seconds).
const RECOVERING_SECONDS: i64 = 30;
/// Heal records kept for `/sim/state`.
const MAX_HEALS: usize = 100;

/// Rule thresholds of the default rules (`settings::default_rules`).
const LATENCY_LIMIT: f64 = 1.0;
const FAILURE_LIMIT: f64 = 0.10;
const THROUGHPUT_FLOOR: f64 = 100.0;

/// Names of the default rules, as in `mapek_actors::settings::default_rules`.
const RULE_POLICY: &str = "CharterCriticalPolicyViolations";
const RULE_LATENCY: &str = "CharterValidationLatencyHigh";
const RULE_FAILURE: &str = "CharterFailureRateHigh";
const RULE_THROUGHPUT: &str = "CharterThroughputLow";
const RULE_NODES: &str = "CharterNodesUnhealthy";

/// A fault that can be injected into the simulated Charter.
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
    /// A retry storm plus tripped breakers: latency and failures spread.
    Cascade,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 4] = [
        FaultKind::LoadSpike,
        FaultKind::BadPolicy,
        FaultKind::NodeCrash,
        FaultKind::Cascade,
    ];

    /// Parses `load_spike`, `bad_policy`, `node_crash`, `cascade`.
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
        }
    }
}

/// Why the simulator refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The request is malformed or a parameter is out of range (HTTP 400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Missing or wrong `X-API-Key` (HTTP 401).
    #[error("missing or invalid X-API-Key")]
    Unauthorized,
    /// No such endpoint or object (HTTP 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The endpoint exists but not with this method (HTTP 405).
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path asked for.
        path: String,
    },
    /// The request conflicts with the current state (HTTP 409).
    #[error("conflict: {0}")]
    Conflict(String),
}

impl SimError {
    /// HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            SimError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SimError::Unauthorized => StatusCode::UNAUTHORIZED,
            SimError::NotFound(_) => StatusCode::NOT_FOUND,
            SimError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            SimError::Conflict(_) => StatusCode::CONFLICT,
        }
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        let status = self.status();
        (
            status,
            Json(json!({"error": self.to_string(), "status": status.as_u16()})),
        )
            .into_response()
    }
}

/// One Charter API call received, as listed by `GET /sim/calls`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallRecord {
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// JSON body (`{}` when empty; the raw text when it was not JSON).
    pub body: Value,
    /// When it was received (RFC 3339).
    pub at: String,
    /// HTTP status answered.
    pub status: u16,
}

/// A rule of the default set breached by the current state, as listed by
/// `GET /api/v1/violations`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimViolation {
    /// Rule name (as in the default rules).
    pub name: String,
    /// `critical` or `warning`.
    pub severity: String,
    /// Component (`charter`).
    pub component: String,
    /// Metric the rule watches.
    pub metric: String,
    /// Current value of the metric.
    pub value: f64,
    /// Labels of the series.
    pub labels: Map<String, Value>,
}

/// The derived figures of the model at one moment.
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum PolicyStatus {
    Active,
    Superseded,
    RolledBack,
}

#[derive(Debug, Clone, Serialize)]
struct Policy {
    id: String,
    name: String,
    bad: bool,
    status: PolicyStatus,
    applied_at: String,
    /// Policy that was active before this one.
    previous: Option<String>,
    body: Value,
}

#[derive(Debug, Clone, Serialize)]
struct HealRecord {
    fault: FaultKind,
    by: String,
    at: String,
}

/// Which remedy a call carried, for the heal checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remedy {
    Scale,
    Throttle,
    Override,
    Other,
}

#[derive(Debug)]
struct SimState {
    replicas: u32,
    crashed: u32,
    spike: bool,
    cascade: bool,
    throttle: Option<f64>,
    override_until: Option<Timestamp>,
    bypass_until: Option<Timestamp>,
    failed_over: bool,
    config: Map<String, Value>,
    previous_config: Option<Map<String, Value>>,
    policies: Vec<Policy>,
    active_policy: Option<String>,
    next_policy: u64,
    critical_violations: u64,
    warning_violations: u64,
    calls: VecDeque<CallRecord>,
    heals: VecDeque<HealRecord>,
    last_heal: Option<Timestamp>,
}

impl SimState {
    fn new(now: Timestamp) -> Self {
        let baseline = Policy {
            id: "pol-0001".into(),
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
        SimState {
            replicas: BASE_REPLICAS,
            crashed: 0,
            spike: false,
            cascade: false,
            throttle: None,
            override_until: None,
            bypass_until: None,
            failed_over: false,
            config,
            previous_config: None,
            policies: vec![baseline],
            active_policy: Some("pol-0001".into()),
            next_policy: 2,
            critical_violations: 0,
            warning_violations: 0,
            calls: VecDeque::new(),
            heals: VecDeque::new(),
            last_heal: None,
        }
    }

    fn healthy_nodes(&self) -> u32 {
        self.replicas.saturating_sub(self.crashed)
    }

    fn bad_policy_active(&self) -> bool {
        self.active().map(|p| p.bad).unwrap_or(false)
    }

    fn active(&self) -> Option<&Policy> {
        let id = self.active_policy.as_deref()?;
        self.policies.iter().find(|p| p.id == id)
    }

    fn override_active(&self, now: Timestamp) -> bool {
        self.override_until.is_some_and(|t| t > now)
    }

    fn bypass_active(&self, now: Timestamp) -> bool {
        self.bypass_until.is_some_and(|t| t > now)
    }

    fn faults(&self) -> Vec<FaultKind> {
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
        if self.cascade {
            out.push(FaultKind::Cascade);
        }
        out
    }

    fn offered_load(&self) -> f64 {
        let mut load = BASE_LOAD;
        if self.spike {
            load *= SPIKE_FACTOR;
        }
        if self.cascade {
            load *= RETRY_AMPLIFICATION;
        }
        load
    }

    fn admitted_and_capacity(&self) -> (f64, f64) {
        let offered = self.offered_load();
        let admitted = self.throttle.map_or(offered, |r| offered.min(r));
        (admitted, f64::from(self.healthy_nodes()) * NODE_CAPACITY)
    }

    /// Whether the load alone (as admitted now) keeps every rule quiet.
    fn load_quiet(&self) -> bool {
        let (admitted, capacity) = self.admitted_and_capacity();
        let (latency, failure) = load_response(admitted, capacity);
        latency <= LATENCY_LIMIT
            && failure <= FAILURE_LIMIT
            && admitted * (1.0 - failure) >= THROUGHPUT_FLOOR
    }

    fn reading(&self, now: Timestamp) -> Reading {
        let offered = self.offered_load();
        let (admitted, capacity) = self.admitted_and_capacity();
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
        if self.cascade && !self.override_active(now) {
            latency += BREAKER_LATENCY;
            ok *= 1.0 - BREAKER_FAILURE;
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
        }
    }

    fn violations(&self, now: Timestamp) -> Vec<SimViolation> {
        let r = self.reading(now);
        let mut out = Vec::new();
        let mut push =
            |name: &str, severity: &str, metric: &str, value: f64, labels: Map<String, Value>| {
                out.push(SimViolation {
                    name: name.into(),
                    severity: severity.into(),
                    component: "charter".into(),
                    metric: metric.into(),
                    value,
                    labels,
                })
            };
        if self.bad_policy_active() {
            let mut labels = Map::new();
            labels.insert("severity".into(), json!("critical"));
            push(
                RULE_POLICY,
                "critical",
                "westworld_charter_policy_violations_total",
                self.critical_violations as f64,
                labels,
            );
        }
        if r.validation_latency_seconds > LATENCY_LIMIT {
            push(
                RULE_LATENCY,
                "warning",
                "westworld_charter_validation_latency_seconds",
                r.validation_latency_seconds,
                Map::new(),
            );
        }
        if r.failure_rate > FAILURE_LIMIT {
            push(
                RULE_FAILURE,
                "critical",
                "westworld_charter_failure_rate",
                r.failure_rate,
                Map::new(),
            );
        }
        if r.throughput_ops_per_sec < THROUGHPUT_FLOOR {
            push(
                RULE_THROUGHPUT,
                "warning",
                "westworld_charter_throughput_ops_per_sec",
                r.throughput_ops_per_sec,
                Map::new(),
            );
        }
        if self.healthy_nodes() < self.replicas {
            push(
                RULE_NODES,
                "critical",
                "westworld_charter_unhealthy_nodes",
                f64::from(self.replicas - self.healthy_nodes()),
                Map::new(),
            );
        }
        out
    }

    fn committee_status(&self, now: Timestamp) -> &'static str {
        let violations = self.violations(now);
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

    fn add_policy(&mut self, name: String, bad: bool, body: Value, now: Timestamp) -> String {
        let id = format!("pol-{:04}", self.next_policy);
        self.next_policy += 1;
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
        self.active_policy = Some(id.clone());
        id
    }

    /// Rolls back policy `id`; when it was active, the newest earlier
    /// policy that was not rolled back becomes active again.
    fn rollback_policy(&mut self, id: &str) -> Result<Option<String>, SimError> {
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
    fn check_heals(&mut self, remedy: Remedy, now: Timestamp) {
        if self.spike && matches!(remedy, Remedy::Scale | Remedy::Throttle) && self.load_quiet() {
            self.spike = false;
        }
        if self.cascade
            && matches!(remedy, Remedy::Throttle | Remedy::Override)
            && self.override_active(now)
            && self.load_quiet()
        {
            self.cascade = false;
        }
    }

    fn record(&mut self, method: &str, path: &str, body: Value, status: u16, now: Timestamp) {
        if self.calls.len() >= MAX_CALLS {
            self.calls.pop_front();
        }
        self.calls.push_back(CallRecord {
            method: method.to_string(),
            path: path.to_string(),
            body,
            at: now.to_rfc3339(),
            status,
        });
    }
}

/// Latency and failure share caused by admitting `admitted` ops/s on
/// `capacity` ops/s.
fn load_response(admitted: f64, capacity: f64) -> (f64, f64) {
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

fn body_object<'a>(body: &'a Value, what: &str) -> Result<&'a Map<String, Value>, SimError> {
    body.as_object()
        .ok_or_else(|| SimError::BadRequest(format!("{what}: the body must be a JSON object")))
}

fn duration_param(body: &Value, what: &str) -> Result<u64, SimError> {
    let obj = body_object(body, what)?;
    match obj.get("duration_seconds") {
        Some(v) => v.as_u64().ok_or_else(|| {
            SimError::BadRequest(format!(
                "{what}: duration_seconds must be a non-negative integer (got {v})"
            ))
        }),
        None => Err(SimError::BadRequest(format!(
            "{what}: duration_seconds is required"
        ))),
    }
}

fn until(now: Timestamp, seconds: u64) -> Option<Timestamp> {
    if seconds == 0 {
        return None;
    }
    let secs = i64::try_from(seconds)
        .unwrap_or(i64::MAX)
        .min(10 * 365 * 86_400);
    Some(now + chrono::Duration::seconds(secs))
}

/// The simulated Charter. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<Mutex<SimState>>,
    clock: SharedClock,
}

impl Default for Simulator {
    fn default() -> Self {
        Simulator::new()
    }
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator").finish_non_exhaustive()
    }
}

impl Simulator {
    /// A healthy Charter on the system clock.
    pub fn new() -> Self {
        Simulator::with_clock(Arc::new(SystemClock))
    }

    /// A healthy Charter on `clock` (records, override and bypass expiry).
    pub fn with_clock(clock: SharedClock) -> Self {
        let now = clock.now();
        Simulator {
            state: Arc::new(Mutex::new(SimState::new(now))),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Injects a fault. Injecting an active fault again changes nothing.
    pub fn inject(&self, kind: FaultKind) -> Result<(), SimError> {
        let now = self.clock.now();
        let mut s = self.lock();
        match kind {
            FaultKind::LoadSpike => s.spike = true,
            FaultKind::Cascade => s.cascade = true,
            FaultKind::NodeCrash => {
                if s.crashed == 0 {
                    s.crashed = 1;
                }
            }
            FaultKind::BadPolicy => {
                if !s.bad_policy_active() {
                    s.add_policy(
                        "bad-policy".into(),
                        true,
                        json!({"policy": "bad", "injected": true}),
                        now,
                    );
                }
            }
        }
        Ok(())
    }

    /// Injects a fault by name (`load_spike`, `bad_policy`, `node_crash`,
    /// `cascade`).
    pub fn inject_named(&self, kind: &str) -> Result<FaultKind, SimError> {
        let k = FaultKind::parse(kind).ok_or_else(|| {
            SimError::BadRequest(format!(
                "unknown fault kind `{kind}` (expected load_spike, bad_policy, node_crash or cascade)"
            ))
        })?;
        self.inject(k)?;
        Ok(k)
    }

    /// Ends every fault and its effects (without any remedy); returns the
    /// faults that were active. Remedies in place (replicas, throttle,
    /// override) stay.
    pub fn clear_faults(&self) -> Vec<FaultKind> {
        let mut s = self.lock();
        let before = s.faults();
        s.spike = false;
        s.cascade = false;
        s.crashed = 0;
        s.drop_bad_policy();
        before
    }

    /// Back to the initial state; the call log is emptied too.
    pub fn reset(&self) {
        let now = self.clock.now();
        *self.lock() = SimState::new(now);
    }

    /// Faults currently active.
    pub fn active_faults(&self) -> Vec<FaultKind> {
        self.lock().faults()
    }

    /// The model's figures now.
    pub fn reading(&self) -> Reading {
        let now = self.clock.now();
        self.lock().reading(now)
    }

    /// The default rules breached now (the policy rule while a bad policy
    /// is active).
    pub fn violations(&self) -> Vec<SimViolation> {
        let now = self.clock.now();
        self.lock().violations(now)
    }

    /// Whether no fault is active and every rule is quiet.
    pub fn healthy(&self) -> bool {
        let now = self.clock.now();
        let s = self.lock();
        s.faults().is_empty() && s.violations(now).is_empty()
    }

    /// Calls received on the Charter API, oldest first (at most
    /// [`MAX_CALLS`]).
    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.iter().cloned().collect()
    }

    /// Records a Charter API call handled outside [`Simulator::apply`] (a
    /// malformed body).
    pub fn record_call(&self, method: &str, path: &str, body: Value, status: u16) {
        let now = self.clock.now();
        self.lock().record(method, path, body, status, now);
    }

    /// The state served by `GET /sim/state`.
    pub fn state(&self) -> Value {
        let now = self.clock.now();
        let s = self.lock();
        let r = s.reading(now);
        let violations = s.violations(now);
        let faults = s.faults();
        json!({
            "healthy": faults.is_empty() && violations.is_empty(),
            "status": s.committee_status(now),
            "replicas": s.replicas,
            "healthy_nodes": s.healthy_nodes(),
            "active_faults": faults,
            "load_ops_per_sec": r.load_ops_per_sec,
            "admitted_ops_per_sec": r.admitted_ops_per_sec,
            "capacity_ops_per_sec": r.capacity_ops_per_sec,
            "utilisation": r.utilisation,
            "validation_latency_seconds": r.validation_latency_seconds,
            "failure_rate": r.failure_rate,
            "throughput_ops_per_sec": r.throughput_ops_per_sec,
            "throttle_rate_limit": s.throttle,
            "emergency_override_active": s.override_active(now),
            "validation_bypass_active": s.bypass_active(now),
            "failed_over": s.failed_over,
            "active_policy": s.active_policy,
            "policy_violations_total": {
                "critical": s.critical_violations,
                "warning": s.warning_violations,
            },
            "violations": violations,
            "heals": s.heals,
            "calls_received": s.calls.len(),
            "timestamp": now.to_rfc3339(),
        })
    }

    /// The metrics in Prometheus text format 0.0.4. Each read is one
    /// validation round for the policy-violation counters: the critical one
    /// grows by one while a bad policy is active, the warning one while a
    /// warning-level rule breaches.
    pub fn metrics_text(&self) -> String {
        const POLICY_CHECKS: [&str; 3] = ["quorum", "signature", "scope"];
        let now = self.clock.now();
        let mut s = self.lock();
        if s.bad_policy_active() {
            s.critical_violations += 1;
        }
        if s.violations(now).iter().any(|v| v.severity == "warning") {
            s.warning_violations += 1;
        }
        let r = s.reading(now);
        let faults = s.faults();
        let mut out = String::with_capacity(4096);
        let gauges: [(&str, &str, f64); 13] = [
            (
                "westworld_charter_validation_latency_seconds",
                "Validation latency of policy checks, in seconds.",
                r.validation_latency_seconds,
            ),
            (
                "westworld_charter_failure_rate",
                "Share of admitted operations that fail (0..1).",
                r.failure_rate,
            ),
            (
                "westworld_charter_throughput_ops_per_sec",
                "Operations completed successfully per second.",
                r.throughput_ops_per_sec,
            ),
            (
                "westworld_charter_replicas",
                "Committee replicas configured.",
                f64::from(s.replicas),
            ),
            (
                "westworld_charter_healthy_nodes",
                "Committee nodes that are up.",
                f64::from(s.healthy_nodes()),
            ),
            (
                "westworld_charter_load_ops_per_sec",
                "Offered load, in operations per second.",
                r.load_ops_per_sec,
            ),
            (
                "westworld_charter_admitted_ops_per_sec",
                "Load admitted past the throttle, in operations per second.",
                r.admitted_ops_per_sec,
            ),
            (
                "westworld_charter_capacity_ops_per_sec",
                "Capacity of the healthy nodes, in operations per second.",
                r.capacity_ops_per_sec,
            ),
            (
                "westworld_charter_throttle_rate_limit",
                "Rate limit of the throttle in operations per second (0 = none).",
                s.throttle.unwrap_or(0.0),
            ),
            (
                "westworld_charter_emergency_override_active",
                "1 while an emergency override is active.",
                if s.override_active(now) { 1.0 } else { 0.0 },
            ),
            (
                "westworld_charter_validation_bypass_active",
                "1 while validation is bypassed.",
                if s.bypass_active(now) { 1.0 } else { 0.0 },
            ),
            ("westworld_charter_up", "1 while the Charter answers.", 1.0),
            (
                "westworld_charter_unhealthy_nodes",
                "Committee replicas that are not healthy.",
                f64::from(s.replicas.saturating_sub(s.healthy_nodes())),
            ),
        ];
        for (name, help, value) in gauges {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}\n",
                number(value)
            ));
        }
        out.push_str(
            "# HELP westworld_charter_policy_violations_total Policy violations detected, by severity.\n\
             # TYPE westworld_charter_policy_violations_total counter\n",
        );
        // A bad policy breaks every check it is evaluated against: one
        // series per check, all counting together.
        for check in POLICY_CHECKS {
            out.push_str(&format!(
                "westworld_charter_policy_violations_total{{severity=\"critical\",check=\"{check}\"}} {}\n",
                s.critical_violations
            ));
        }
        out.push_str(&format!(
            "westworld_charter_policy_violations_total{{severity=\"warning\"}} {}\n",
            s.warning_violations
        ));
        out.push_str(
            "# HELP westworld_charter_fault_active 1 while the simulated fault is active.\n\
             # TYPE westworld_charter_fault_active gauge\n",
        );
        for kind in FaultKind::ALL {
            out.push_str(&format!(
                "westworld_charter_fault_active{{kind=\"{}\"}} {}\n",
                kind.as_str(),
                u8::from(faults.contains(&kind))
            ));
        }
        out
    }

    /// Handles one Charter API call (`method` `path` with JSON `body`) and
    /// records it for `/sim/calls`. `GET` calls ignore the body.
    pub fn apply(&self, method: &str, path: &str, body: &Value) -> Result<Value, SimError> {
        let now = self.clock.now();
        let mut s = self.lock();
        let result = dispatch(&mut s, method, path, body, now);
        let status = match &result {
            Ok(_) => 200,
            Err(e) => e.status().as_u16(),
        };
        s.record(method, path, body.clone(), status, now);
        result
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        let inf = if v > 0.0 { "+Inf" } else { "-Inf" };
        inf.into()
    } else {
        format!("{v}")
    }
}

/// Every endpoint of the Charter API, with the methods it accepts.
const ENDPOINTS: &[(&str, &[&str])] = &[
    ("/api/v1/policies", &["GET"]),
    ("/api/v1/policies/apply", &["POST"]),
    ("/api/v1/policies/validate", &["POST"]),
    ("/api/v1/committee/state", &["GET"]),
    ("/api/v1/committee/scale", &["POST"]),
    ("/api/v1/committee/restart", &["POST"]),
    ("/api/v1/violations", &["GET"]),
    ("/api/v1/throttle", &["POST"]),
    ("/api/v1/emergency-override", &["POST"]),
    ("/api/v1/rebalance", &["POST"]),
    ("/api/v1/config", &["POST"]),
    ("/api/v1/validation/bypass", &["POST"]),
    ("/api/v1/failover", &["POST"]),
];

fn dispatch(
    s: &mut SimState,
    method: &str,
    path: &str,
    body: &Value,
    now: Timestamp,
) -> Result<Value, SimError> {
    let segs: Vec<&str> = path.split('/').filter(|x| !x.is_empty()).collect();
    let before = s.faults();
    let (answer, remedy, by) = match (method, segs.as_slice()) {
        ("GET", ["api", "v1", "policies"]) => {
            let active = s.active_policy.clone();
            (json!({"policies": s.policies, "active": active}), None, "")
        }
        ("POST", ["api", "v1", "policies", "apply"]) => {
            let obj = body_object(body, "policies/apply")?;
            let bad = obj.get("bad").and_then(Value::as_bool) == Some(true)
                || obj.get("policy").and_then(Value::as_str) == Some("bad");
            let name = obj
                .get("policy")
                .or_else(|| obj.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("policy")
                .to_string();
            let id = s.add_policy(name, bad, body.clone(), now);
            (
                json!({"id": id, "status": "active", "bad": bad}),
                Some(Remedy::Other),
                "POST /api/v1/policies/apply",
            )
        }
        ("POST", ["api", "v1", "policies", "validate"]) => {
            let obj = body_object(body, "policies/validate")?;
            let answer = match obj.get("actions") {
                Some(Value::Array(a)) if !a.is_empty() => json!({"valid": true}),
                Some(Value::Array(_)) | None => {
                    json!({"valid": false, "reason": "the policy has no actions"})
                }
                Some(other) => {
                    return Err(SimError::BadRequest(format!(
                        "policies/validate: actions must be a list (got {other})"
                    )))
                }
            };
            (answer, None, "")
        }
        ("POST", ["api", "v1", "policies", id, "rollback"]) => {
            let id = (*id).to_string();
            let active = s.rollback_policy(&id)?;
            (
                json!({"id": id, "status": "rolled_back", "active": active}),
                Some(Remedy::Other),
                "POST /api/v1/policies/{id}/rollback",
            )
        }
        ("GET", ["api", "v1", "committee", "state"]) => (
            json!({
                "status": s.committee_status(now),
                "replicas": s.replicas,
                "healthy_nodes": s.healthy_nodes(),
                "timestamp": now.to_rfc3339(),
            }),
            None,
            "",
        ),
        ("POST", ["api", "v1", "committee", "scale"]) => {
            let obj = body_object(body, "committee/scale")?;
            let replicas = obj
                .get("replicas")
                .and_then(Value::as_u64)
                .filter(|r| (1..=MAX_REPLICAS).contains(r))
                .ok_or_else(|| {
                    SimError::BadRequest(format!(
                        "committee/scale: replicas must be an integer between 1 and {MAX_REPLICAS} (got {})",
                        obj.get("replicas").cloned().unwrap_or(Value::Null)
                    ))
                })?;
            let previous = s.replicas;
            s.replicas = u32::try_from(replicas).unwrap_or(BASE_REPLICAS);
            (
                json!({"previous_replicas": previous, "replicas": s.replicas}),
                Some(Remedy::Scale),
                "POST /api/v1/committee/scale",
            )
        }
        ("POST", ["api", "v1", "committee", "restart"]) => {
            let obj = body_object(body, "committee/restart")?;
            let graceful = match obj.get("graceful") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(SimError::BadRequest(format!(
                        "committee/restart: graceful must be a boolean (got {v})"
                    )))
                }
            };
            let timeout = match obj.get("timeout") {
                None | Some(Value::Null) => 30,
                Some(v) => v.as_u64().ok_or_else(|| {
                    SimError::BadRequest(format!(
                        "committee/restart: timeout must be a non-negative integer (got {v})"
                    ))
                })?,
            };
            let recovered = s.crashed;
            s.crashed = 0;
            (
                json!({"restarted": true, "graceful": graceful, "timeout": timeout, "recovered_nodes": recovered}),
                Some(Remedy::Other),
                "POST /api/v1/committee/restart",
            )
        }
        ("GET", ["api", "v1", "violations"]) => (json!(s.violations(now)), None, ""),
        ("POST", ["api", "v1", "throttle"]) => {
            let obj = body_object(body, "throttle")?;
            match obj.get("rate_limit") {
                None => {
                    return Err(SimError::BadRequest(
                        "throttle: rate_limit is required (null removes the limit)".into(),
                    ))
                }
                Some(Value::Null) => s.throttle = None,
                Some(v) => {
                    let rate = v
                        .as_f64()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or_else(|| {
                            SimError::BadRequest(format!(
                                "throttle: rate_limit must be a positive number or null (got {v})"
                            ))
                        })?;
                    s.throttle = Some(rate);
                }
            }
            (
                json!({"rate_limit": s.throttle}),
                Some(Remedy::Throttle),
                "POST /api/v1/throttle",
            )
        }
        ("POST", ["api", "v1", "emergency-override"]) => {
            let d = duration_param(body, "emergency-override")?;
            s.override_until = until(now, d);
            let until_s = s.override_until.map(|t| t.to_rfc3339());
            (
                json!({"active": s.override_active(now), "until": until_s}),
                Some(Remedy::Override),
                "POST /api/v1/emergency-override",
            )
        }
        ("POST", ["api", "v1", "rebalance"]) => {
            let obj = body_object(body, "rebalance")?;
            let strategy = obj
                .get("strategy")
                .and_then(Value::as_str)
                .filter(|x| !x.trim().is_empty())
                .ok_or_else(|| {
                    SimError::BadRequest("rebalance: strategy must be a non-empty string".into())
                })?;
            (
                json!({"rebalanced": true, "strategy": strategy}),
                Some(Remedy::Other),
                "POST /api/v1/rebalance",
            )
        }
        ("POST", ["api", "v1", "config"]) => {
            let obj = body_object(body, "config")?.clone();
            if obj.get("restore").and_then(Value::as_str) == Some("previous") {
                if let Some(prev) = s.previous_config.take() {
                    s.config = prev;
                }
            } else {
                s.previous_config = Some(s.config.clone());
                for (k, v) in obj {
                    s.config.insert(k, v);
                }
            }
            (
                json!({"config": s.config}),
                Some(Remedy::Other),
                "POST /api/v1/config",
            )
        }
        ("POST", ["api", "v1", "validation", "bypass"]) => {
            let d = duration_param(body, "validation/bypass")?;
            s.bypass_until = until(now, d);
            let until_s = s.bypass_until.map(|t| t.to_rfc3339());
            (
                json!({"active": s.bypass_active(now), "until": until_s}),
                Some(Remedy::Other),
                "POST /api/v1/validation/bypass",
            )
        }
        ("POST", ["api", "v1", "failover"]) => {
            let obj = body_object(body, "failover")?;
            let failback = obj.get("failback").and_then(Value::as_bool) == Some(true);
            let mut recovered = 0;
            if failback {
                s.failed_over = false;
            } else {
                s.failed_over = true;
                recovered = s.crashed;
                s.crashed = 0;
            }
            (
                json!({"failed_over": s.failed_over, "failback": failback, "recovered_nodes": recovered}),
                Some(Remedy::Other),
                "POST /api/v1/failover",
            )
        }
        _ => {
            let normal = format!("/{}", segs.join("/"));
            let known = ENDPOINTS.iter().any(|(p, _)| *p == normal)
                || matches!(segs.as_slice(), ["api", "v1", "policies", _, "rollback"]);
            return Err(if known {
                SimError::MethodNotAllowed {
                    method: method.to_string(),
                    path: path.to_string(),
                }
            } else {
                SimError::NotFound(format!("no endpoint {method} {path}"))
            });
        }
    };
    let Some(remedy) = remedy else {
        return Ok(answer);
    };
    s.check_heals(remedy, now);
    let after = s.faults();
    let healed: Vec<FaultKind> = before.into_iter().filter(|f| !after.contains(f)).collect();
    if !healed.is_empty() {
        s.last_heal = Some(now);
        for fault in &healed {
            if s.heals.len() >= MAX_HEALS {
                s.heals.pop_front();
            }
            s.heals.push_back(HealRecord {
                fault: *fault,
                by: by.to_string(),
                at: now.to_rfc3339(),
            });
        }
    }
    let mut answer = answer;
    if let Value::Object(m) = &mut answer {
        m.insert("healed".into(), json!(healed));
    }
    Ok(answer)
}

#[derive(Clone)]
struct AppState {
    sim: Simulator,
    api_key: Option<String>,
}

/// The simulator's HTTP surface: the Charter API under `/api/v1`,
/// `/health`, `/metrics` and the `/sim/*` control endpoints. With an
/// `api_key`, the Charter API requires a matching `X-API-Key` (`/health`,
/// `/metrics` and `/sim/*` stay open).
pub fn router(sim: Simulator, api_key: Option<String>) -> Router {
    let state = AppState {
        sim,
        api_key: api_key.filter(|k| !k.is_empty()),
    };
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/sim/faults", get(list_faults).post(inject).delete(clear))
        .route("/sim/state", get(sim_state))
        .route("/sim/calls", get(calls))
        .route("/sim/reset", post(reset))
        .fallback(charter_api)
        .with_state(state)
}

/// Serves the simulator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: Simulator,
    api_key: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(sim, api_key))
        .with_graceful_shutdown(shutdown)
        .await
}

fn parse_body(body: &Bytes) -> Result<Value, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| format!("malformed JSON body: {e}"))
}

async fn health(State(app): State<AppState>) -> Json<Value> {
    Json(json!({"status": "ok", "service": "charter-sim", "healthy": app.sim.healthy()}))
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.sim.metrics_text(),
    )
        .into_response()
}

async fn list_faults(State(app): State<AppState>) -> Json<Value> {
    Json(json!({"active_faults": app.sim.active_faults()}))
}

async fn inject(State(app): State<AppState>, body: Bytes) -> Response {
    let value = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return SimError::BadRequest(e).into_response(),
    };
    let Some(kind) = value.get("kind").and_then(Value::as_str) else {
        return SimError::BadRequest("`kind` (string) is required".into()).into_response();
    };
    match app.sim.inject_named(kind) {
        Ok(k) => Json(json!({"injected": k, "state": app.sim.state()})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn clear(State(app): State<AppState>) -> Json<Value> {
    let cleared = app.sim.clear_faults();
    Json(json!({"cleared": cleared, "state": app.sim.state()}))
}

async fn sim_state(State(app): State<AppState>) -> Json<Value> {
    Json(app.sim.state())
}

async fn calls(State(app): State<AppState>) -> Json<Vec<CallRecord>> {
    Json(app.sim.calls())
}

async fn reset(State(app): State<AppState>) -> Json<Value> {
    app.sim.reset();
    Json(app.sim.state())
}

async fn charter_api(
    State(app): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if !path.starts_with("/api/") {
        return SimError::NotFound(format!("no endpoint {method} {path}")).into_response();
    }
    if let Some(key) = &app.api_key {
        let given = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        if given != Some(key.as_str()) {
            return SimError::Unauthorized.into_response();
        }
    }
    let value = if method == Method::GET || method == Method::HEAD {
        Value::Object(Map::new())
    } else {
        match parse_body(&body) {
            Ok(v) => v,
            Err(e) => {
                let raw = String::from_utf8_lossy(&body)
                    .chars()
                    .take(500)
                    .collect::<String>();
                app.sim
                    .record_call(method.as_str(), &path, Value::String(raw), 400);
                return SimError::BadRequest(e).into_response();
            }
        }
    };
    match app.sim.apply(method.as_str(), &path, &value) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::parse_exposition;
    use mapek_actors::clock::ManualClock;
    use mapek_actors::model::RootCause;
    use mapek_actors::ports::Effector;
    use mapek_actors::settings::{default_rules, PlanSettings};
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn sim() -> Simulator {
        let start = chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        Simulator::with_clock(Arc::new(ManualClock::new(start)))
    }

    fn names(sim: &Simulator) -> BTreeSet<String> {
        sim.violations().into_iter().map(|v| v.name).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn post(sim: &Simulator, path: &str, body: Value) -> Result<Value, SimError> {
        sim.apply("POST", path, &body)
    }

    fn scale(sim: &Simulator, replicas: u64) {
        post(
            sim,
            "/api/v1/committee/scale",
            json!({"replicas": replicas}),
        )
        .unwrap();
    }

    fn throttle(sim: &Simulator, rate: Value) {
        post(sim, "/api/v1/throttle", json!({"rate_limit": rate})).unwrap();
    }

    fn override_for(sim: &Simulator, secs: u64) {
        post(
            sim,
            "/api/v1/emergency-override",
            json!({"duration_seconds": secs}),
        )
        .unwrap();
    }

    fn restart(sim: &Simulator) {
        post(
            sim,
            "/api/v1/committee/restart",
            json!({"graceful": true, "timeout": 30}),
        )
        .unwrap();
    }

    fn critical_count(text: &str) -> f64 {
        parse_exposition(text)
            .unwrap()
            .into_iter()
            .find(|s| {
                s.name == "westworld_charter_policy_violations_total"
                    && s.labels.get("severity").map(String::as_str) == Some("critical")
            })
            .unwrap()
            .value
    }

    const THREE: [&str; 3] = [RULE_LATENCY, RULE_FAILURE, RULE_THROUGHPUT];

    #[test]
    fn rule_names_match_the_default_rules() {
        let defaults: BTreeSet<String> = default_rules().into_iter().map(|r| r.name).collect();
        assert_eq!(
            defaults,
            set(&[
                RULE_POLICY,
                RULE_LATENCY,
                RULE_FAILURE,
                RULE_THROUGHPUT,
                RULE_NODES
            ])
        );
    }

    #[test]
    fn baseline_is_quiet_with_margin() {
        let sim = sim();
        let r = sim.reading();
        assert!(r.validation_latency_seconds < 0.5, "{r:?}");
        assert!(r.failure_rate < 0.05, "{r:?}");
        assert!(r.throughput_ops_per_sec > 200.0, "{r:?}");
        assert!(sim.violations().is_empty());
        assert!(sim.healthy());
        let a = critical_count(&sim.metrics_text());
        let b = critical_count(&sim.metrics_text());
        assert_eq!(a, b, "no new critical policy violations at baseline");
        let st = sim.state();
        assert_eq!(st["healthy"], json!(true));
        assert_eq!(st["replicas"], json!(3));
        assert_eq!(st["healthy_nodes"], json!(3));
        assert_eq!(st["active_faults"], json!([]));
        assert_eq!(st["status"], json!("normal"));
    }

    #[test]
    fn load_spike_breaches_three_rules() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        let r = sim.reading();
        assert!(r.validation_latency_seconds > 1.0, "{r:?}");
        assert!(r.failure_rate > 0.10, "{r:?}");
        assert!(r.throughput_ops_per_sec < 100.0, "{r:?}");
        assert_eq!(names(&sim), set(&THREE));
        assert!(!sim.healthy());
        assert_eq!(sim.state()["active_faults"], json!(["load_spike"]));
    }

    #[test]
    fn load_spike_healed_by_scaling_up_two() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        let answer = post(&sim, "/api/v1/committee/scale", json!({"replicas": 5})).unwrap();
        assert_eq!(answer["healed"], json!(["load_spike"]));
        assert!(sim.healthy());
        assert!(sim.active_faults().is_empty());
        assert_eq!(sim.state()["status"], json!("recovering"));
    }

    #[test]
    fn load_spike_not_healed_by_too_small_a_scale() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        scale(&sim, 4);
        assert_eq!(sim.active_faults(), vec![FaultKind::LoadSpike]);
        assert!(!sim.violations().is_empty());
        scale(&sim, 5);
        assert!(sim.healthy());
    }

    #[test]
    fn load_spike_healed_by_the_default_throttle() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        throttle(&sim, json!(2000));
        assert_eq!(
            sim.active_faults(),
            vec![FaultKind::LoadSpike],
            "a loose throttle is not enough"
        );
        throttle(&sim, json!(500));
        assert!(sim.healthy(), "{:?}", sim.violations());
    }

    #[test]
    fn load_spike_not_healed_by_unfitting_actions() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        restart(&sim);
        post(&sim, "/api/v1/failover", json!({"mode": "standby"})).unwrap();
        post(
            &sim,
            "/api/v1/rebalance",
            json!({"strategy": "least_loaded"}),
        )
        .unwrap();
        post(&sim, "/api/v1/config", json!({"worker_pool_size": "+50%"})).unwrap();
        post(
            &sim,
            "/api/v1/validation/bypass",
            json!({"duration_seconds": 60}),
        )
        .unwrap();
        override_for(&sim, 300);
        post(
            &sim,
            "/api/v1/policies/apply",
            json!({"policy": "last_known_good"}),
        )
        .unwrap();
        assert_eq!(sim.active_faults(), vec![FaultKind::LoadSpike]);
        assert_eq!(names(&sim), set(&THREE));
    }

    #[test]
    fn bad_policy_raises_critical_violations_until_corrected() {
        let sim = sim();
        let before = critical_count(&sim.metrics_text());
        sim.inject(FaultKind::BadPolicy).unwrap();
        let r = sim.reading();
        assert!(r.failure_rate > 0.10, "{r:?}");
        assert!(r.validation_latency_seconds <= 1.0);
        assert!(r.throughput_ops_per_sec >= 100.0);
        assert_eq!(names(&sim), set(&[RULE_POLICY, RULE_FAILURE]));
        let a = critical_count(&sim.metrics_text());
        let b = critical_count(&sim.metrics_text());
        assert!(a > before && b > a, "{before} {a} {b}");
        // Unfitting remedies change nothing.
        restart(&sim);
        scale(&sim, 7);
        throttle(&sim, json!(500));
        assert_eq!(sim.active_faults(), vec![FaultKind::BadPolicy]);
        let answer = post(
            &sim,
            "/api/v1/policies/apply",
            json!({"policy": "last_known_good"}),
        )
        .unwrap();
        assert_eq!(answer["healed"], json!(["bad_policy"]));
        assert!(sim.healthy(), "{:?}", sim.violations());
        let c = critical_count(&sim.metrics_text());
        let d = critical_count(&sim.metrics_text());
        assert_eq!(c, d, "the counter stops increasing after the heal");
    }

    #[test]
    fn bad_policy_healed_by_rolling_it_back() {
        let sim = sim();
        sim.inject(FaultKind::BadPolicy).unwrap();
        let bad = sim.state()["active_policy"].as_str().unwrap().to_string();
        assert_eq!(
            sim.apply("POST", "/api/v1/policies/pol-9999/rollback", &json!({})),
            Err(SimError::NotFound("policy pol-9999".into()))
        );
        let ok = post(&sim, &format!("/api/v1/policies/{bad}/rollback"), json!({})).unwrap();
        assert_eq!(ok["healed"], json!(["bad_policy"]));
        assert_eq!(ok["active"], json!("pol-0001"));
        assert!(sim.healthy());
        assert!(matches!(
            post(&sim, &format!("/api/v1/policies/{bad}/rollback"), json!({})),
            Err(SimError::Conflict(_))
        ));
    }

    #[test]
    fn a_bad_policy_can_be_applied_through_the_api() {
        let sim = sim();
        let a = post(
            &sim,
            "/api/v1/policies/apply",
            json!({"policy": "strict", "bad": true}),
        )
        .unwrap();
        assert_eq!(a["bad"], json!(true));
        assert_eq!(sim.active_faults(), vec![FaultKind::BadPolicy]);
        let id = a["id"].as_str().unwrap().to_string();
        post(&sim, &format!("/api/v1/policies/{id}/rollback"), json!({})).unwrap();
        assert!(sim.healthy());
    }

    #[test]
    fn node_crash_is_not_healed_by_scaling() {
        let sim = sim();
        sim.inject(FaultKind::NodeCrash).unwrap();
        let st = sim.state();
        assert_eq!(st["healthy_nodes"], json!(2));
        assert_eq!(st["replicas"], json!(3));
        let r = sim.reading();
        assert!(r.validation_latency_seconds > 1.0, "{r:?}");
        assert!(r.failure_rate > 0.10, "{r:?}");
        assert!(names(&sim).contains(RULE_LATENCY) && names(&sim).contains(RULE_FAILURE));
        scale(&sim, 5);
        throttle(&sim, json!(500));
        post(
            &sim,
            "/api/v1/rebalance",
            json!({"strategy": "least_loaded"}),
        )
        .unwrap();
        assert_eq!(sim.active_faults(), vec![FaultKind::NodeCrash]);
        let st = sim.state();
        assert_eq!(st["healthy_nodes"], json!(4));
        assert_eq!(st["replicas"], json!(5));
        assert!(names(&sim).contains(RULE_LATENCY) && names(&sim).contains(RULE_FAILURE));
        restart(&sim);
        assert!(sim.healthy(), "{:?}", sim.violations());
    }

    #[test]
    fn node_crash_healed_by_failover_but_not_by_failback() {
        let sim = sim();
        sim.inject(FaultKind::NodeCrash).unwrap();
        post(&sim, "/api/v1/failover", json!({"failback": true})).unwrap();
        assert_eq!(sim.active_faults(), vec![FaultKind::NodeCrash]);
        let a = post(&sim, "/api/v1/failover", json!({"mode": "standby"})).unwrap();
        assert_eq!(a["healed"], json!(["node_crash"]));
        assert!(sim.healthy());
    }

    #[test]
    fn cascade_needs_override_and_throttle() {
        let sim = sim();
        sim.inject(FaultKind::Cascade).unwrap();
        let r = sim.reading();
        assert!(
            r.validation_latency_seconds > 1.0
                && r.failure_rate > 0.10
                && r.throughput_ops_per_sec < 100.0
        );
        assert_eq!(names(&sim), set(&THREE));
        // Throttle alone: the breakers stay tripped.
        throttle(&sim, json!(500));
        assert_eq!(sim.active_faults(), vec![FaultKind::Cascade]);
        assert!(names(&sim).contains(RULE_LATENCY) && names(&sim).contains(RULE_FAILURE));
        restart(&sim);
        scale(&sim, 5);
        assert_eq!(sim.active_faults(), vec![FaultKind::Cascade]);
        // Then the override: healed.
        override_for(&sim, 300);
        assert!(sim.healthy(), "{:?}", sim.violations());

        // Other order: override alone leaves the retry storm.
        let sim2 = self::sim();
        sim2.inject(FaultKind::Cascade).unwrap();
        override_for(&sim2, 300);
        assert_eq!(sim2.active_faults(), vec![FaultKind::Cascade]);
        assert_eq!(names(&sim2), set(&THREE));
        throttle(&sim2, json!(500));
        assert!(sim2.healthy(), "{:?}", sim2.violations());
    }

    #[test]
    fn an_ended_override_does_not_heal_a_cascade() {
        let sim = sim();
        sim.inject(FaultKind::Cascade).unwrap();
        override_for(&sim, 300);
        override_for(&sim, 0);
        throttle(&sim, json!(500));
        assert_eq!(sim.active_faults(), vec![FaultKind::Cascade]);
    }

    #[test]
    fn faults_never_heal_by_themselves_and_clear_ends_them() {
        let sim = sim();
        for k in FaultKind::ALL {
            sim.inject(k).unwrap();
        }
        for _ in 0..3 {
            sim.metrics_text();
            let _ = sim.apply("GET", "/api/v1/committee/state", &json!({}));
        }
        assert_eq!(sim.active_faults(), FaultKind::ALL.to_vec());
        assert_eq!(
            sim.apply("GET", "/api/v1/committee/state", &json!({}))
                .unwrap()["status"],
            json!("critical")
        );
        let cleared = sim.clear_faults();
        assert_eq!(cleared, FaultKind::ALL.to_vec());
        assert!(sim.healthy(), "{:?}", sim.violations());
        assert!(sim.inject_named("meteor").is_err());
        assert_eq!(sim.inject_named("cascade"), Ok(FaultKind::Cascade));
    }

    #[test]
    fn validation_and_parameter_errors() {
        let sim = sim();
        let v = post(
            &sim,
            "/api/v1/policies/validate",
            json!({"policy_id": "p", "actions": []}),
        )
        .unwrap();
        assert_eq!(v["valid"], json!(false));
        assert!(v["reason"].is_string());
        let v = post(
            &sim,
            "/api/v1/policies/validate",
            json!({"actions": [{"type": "SCALE_UP", "target": "charter", "parameters": {}}]}),
        )
        .unwrap();
        assert_eq!(v, json!({"valid": true}));
        for bad in [
            json!({"replicas": 0}),
            json!({"replicas": 51}),
            json!({"replicas": "3"}),
            json!({}),
        ] {
            assert!(matches!(
                post(&sim, "/api/v1/committee/scale", bad),
                Err(SimError::BadRequest(_))
            ));
        }
        assert!(matches!(
            post(&sim, "/api/v1/throttle", json!({"rate_limit": -1})),
            Err(SimError::BadRequest(_))
        ));
        assert!(matches!(
            post(&sim, "/api/v1/emergency-override", json!({})),
            Err(SimError::BadRequest(_))
        ));
        assert!(matches!(
            post(&sim, "/api/v1/nope", json!({})),
            Err(SimError::NotFound(_))
        ));
        assert!(matches!(
            sim.apply("GET", "/api/v1/committee/scale", &json!({})),
            Err(SimError::MethodNotAllowed { .. })
        ));
        assert_eq!(sim.state()["replicas"], json!(3));
    }

    #[test]
    fn override_expires_with_the_clock() {
        let start = chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let clock = ManualClock::new(start);
        let sim = Simulator::with_clock(Arc::new(clock.clone()));
        override_for(&sim, 60);
        assert_eq!(sim.state()["emergency_override_active"], json!(true));
        clock.advance(Duration::from_secs(61));
        assert_eq!(sim.state()["emergency_override_active"], json!(false));
    }

    #[test]
    fn calls_are_recorded_and_bounded() {
        let sim = sim();
        scale(&sim, 4);
        let _ = post(&sim, "/api/v1/committee/scale", json!({"replicas": 0}));
        let calls = sim.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].method, "POST");
        assert_eq!(calls[0].path, "/api/v1/committee/scale");
        assert_eq!(calls[0].body, json!({"replicas": 4}));
        assert_eq!(calls[0].status, 200);
        assert_eq!(calls[1].status, 400);
        sim.metrics_text();
        let _ = sim.state();
        assert_eq!(sim.calls().len(), 2, "metrics and state are not calls");
        for _ in 0..(MAX_CALLS + 5) {
            let _ = sim.apply("GET", "/api/v1/violations", &json!({}));
        }
        let calls = sim.calls();
        assert_eq!(calls.len(), MAX_CALLS);
        assert!(calls.iter().all(|c| c.path == "/api/v1/violations"));
    }

    #[test]
    fn metrics_text_is_valid_exposition() {
        let sim = sim();
        let text = sim.metrics_text();
        let samples = parse_exposition(&text).unwrap();
        let have: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        for name in [
            "westworld_charter_validation_latency_seconds",
            "westworld_charter_failure_rate",
            "westworld_charter_throughput_ops_per_sec",
            "westworld_charter_policy_violations_total",
            "westworld_charter_replicas",
            "westworld_charter_healthy_nodes",
            "westworld_charter_load_ops_per_sec",
            "westworld_charter_throttle_rate_limit",
            "westworld_charter_emergency_override_active",
            "westworld_charter_up",
        ] {
            assert!(have.contains(name), "{name} missing");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} TYPE missing"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} HELP missing"
            );
        }
        assert!(text.contains("# TYPE westworld_charter_policy_violations_total counter"));
        let sev: BTreeSet<&str> = samples
            .iter()
            .filter(|s| s.name == "westworld_charter_policy_violations_total")
            .filter_map(|s| s.labels.get("severity").map(String::as_str))
            .collect();
        assert_eq!(sev, BTreeSet::from(["critical", "warning"]));
        assert!(samples.iter().all(|s| s.value.is_finite()));
    }

    // ---- HTTP, through the real router on a loopback listener ----

    struct Running {
        base: String,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Running {
        async fn stop(mut self) {
            if let Some(s) = self.stop.take() {
                let _ = s.send(());
            }
            self.task.await.unwrap().unwrap();
        }
    }

    async fn start(sim: Simulator, key: Option<&str>) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, sim, key.map(String::from), async move {
            let _ = rx.await;
        }));
        Running {
            base,
            stop: Some(tx),
            task,
        }
    }

    #[tokio::test]
    async fn http_auth_errors_and_unknown_routes() {
        let run = start(Simulator::new(), Some("s3cret")).await;
        let c = reqwest::Client::new();
        let url = format!("{}/api/v1/committee/state", run.base);
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(&url)
            .header("X-API-Key", "wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(&url)
            .header("X-API-Key", "s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], json!("normal"));
        assert_eq!(v["replicas"], json!(3));
        assert_eq!(v["healthy_nodes"], json!(3));
        assert!(v["timestamp"].is_string());

        let r = c
            .post(format!("{}/api/v1/committee/scale", run.base))
            .header("X-API-Key", "s3cret")
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("malformed JSON"));

        for replicas in [0, 51] {
            let r = c
                .post(format!("{}/api/v1/committee/scale", run.base))
                .header("X-API-Key", "s3cret")
                .json(&json!({"replicas": replicas}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400);
            let v: Value = r.json().await.unwrap();
            assert!(v["error"].is_string());
        }
        for path in ["/api/v1/nope", "/nowhere"] {
            let r = c
                .get(format!("{}{path}", run.base))
                .header("X-API-Key", "s3cret")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404);
            let v: Value = r.json().await.unwrap();
            assert!(v["error"].is_string());
        }
        // Open endpoints.
        assert_eq!(
            c.get(format!("{}/health", run.base))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            c.get(format!("{}/metrics", run.base))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        run.stop().await;
    }

    #[tokio::test]
    async fn http_faults_state_calls_and_metrics() {
        let run = start(Simulator::new(), None).await;
        let c = reqwest::Client::new();
        let st: Value = c
            .get(format!("{}/sim/state", run.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["healthy"], json!(true));
        assert!(
            st["replicas"].is_u64()
                && st["healthy_nodes"].is_u64()
                && st["active_faults"].is_array()
        );

        let r = c
            .post(format!("{}/sim/faults", run.base))
            .json(&json!({"kind": "node_crash"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = c
            .post(format!("{}/sim/faults", run.base))
            .json(&json!({"kind": "meteor"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let st: Value = c
            .get(format!("{}/sim/state", run.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["healthy"], json!(false));
        assert_eq!(st["healthy_nodes"], json!(2));
        assert_eq!(st["active_faults"], json!(["node_crash"]));

        let r = c
            .post(format!("{}/api/v1/committee/restart", run.base))
            .json(&json!({"graceful": true, "timeout": 30}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let calls: Value = c
            .get(format!("{}/sim/calls", run.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let calls = calls.as_array().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["method"], json!("POST"));
        assert_eq!(calls[0]["path"], json!("/api/v1/committee/restart"));
        assert_eq!(calls[0]["body"], json!({"graceful": true, "timeout": 30}));
        assert!(calls[0]["at"].is_string());
        let st: Value = c
            .get(format!("{}/sim/state", run.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["healthy"], json!(true));

        c.post(format!("{}/sim/faults", run.base))
            .json(&json!({"kind": "load_spike"}))
            .send()
            .await
            .unwrap();
        let r = c
            .delete(format!("{}/sim/faults", run.base))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["cleared"], json!(["load_spike"]));

        let r = c.get(format!("{}/metrics", run.base)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let ct = r
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let text = r.text().await.unwrap();
        let samples = parse_exposition(&text).unwrap();
        assert!(samples
            .iter()
            .any(|s| s.name == "westworld_charter_up" && s.value == 1.0));
        run.stop().await;
    }

    /// mapek's own Charter client carries out its default strategies against
    /// the simulator: the endpoints and bodies fit, and each heals its fault.
    #[tokio::test]
    async fn mapek_effector_heals_each_fault_with_its_default_strategy() {
        use crate::effectors::{CharterClient, CharterEffector};
        use mapek_actors::plan::strategy;
        let cases = [
            (FaultKind::LoadSpike, RootCause::InsufficientCapacity),
            (FaultKind::BadPolicy, RootCause::PolicyMisconfiguration),
            (FaultKind::NodeCrash, RootCause::NodeCrash),
            (FaultKind::Cascade, RootCause::CascadeFailure),
        ];
        for (fault, cause) in cases {
            let sim = Simulator::new();
            let run = start(sim.clone(), Some("k")).await;
            let client = CharterClient::new(&run.base, "k", Duration::from_secs(5)).unwrap();
            let eff = CharterEffector::new(client);
            sim.inject(fault).unwrap();
            assert!(!sim.healthy());
            let actions = strategy(cause, &PlanSettings::default(), "charter");
            assert!(!actions.is_empty());
            for a in &actions {
                eff.apply(a)
                    .await
                    .unwrap_or_else(|e| panic!("{fault:?} {:?}: {e}", a.action_type));
            }
            assert!(sim.healthy(), "{fault:?} not healed: {}", sim.state());
            assert!(
                sim.calls().iter().all(|c| c.status == 200),
                "{:?}",
                sim.calls()
            );
            run.stop().await;
        }
    }

    /// A remedy that does not fit, sent by mapek's client, leaves the fault.
    #[tokio::test]
    async fn mapek_effector_restart_does_not_heal_a_load_spike() {
        use crate::effectors::{CharterClient, CharterEffector};
        use mapek_actors::plan::strategy;
        let sim = Simulator::new();
        let run = start(sim.clone(), None).await;
        let client = CharterClient::new(&run.base, "", Duration::from_secs(5)).unwrap();
        let eff = CharterEffector::new(client);
        sim.inject(FaultKind::LoadSpike).unwrap();
        for a in strategy(
            RootCause::SystemInstability,
            &PlanSettings::default(),
            "charter",
        ) {
            eff.apply(&a).await.unwrap();
        }
        assert_eq!(sim.active_faults(), vec![FaultKind::LoadSpike]);
        run.stop().await;
    }
}
