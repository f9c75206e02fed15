//! The simulated world (every component, the topology, the call log) behind
//! one lock, and [`Simulator`], the cheap-to-clone handle on it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use mapek_actors::clock::{SharedClock, SystemClock};
use mapek_actors::model::Timestamp;
use serde_json::{json, Map, Value};

use super::model::{Component, FaultKind, Reading, SimViolation, CASCADE_SPREAD_SECONDS};
use super::topology::{Topology, TopologyError};
use super::{charter, metrics, CallRecord, SimError};

/// Number of Charter API calls kept for `/sim/calls`.
pub const MAX_CALLS: usize = 1000;

/// Every component's state, the topology and the call log.
#[derive(Debug)]
pub(crate) struct World {
    pub(crate) topology: Topology,
    pub(crate) components: Vec<Component>,
    /// `upstreams[i]`: indexes of the components `i` depends on.
    upstreams: Vec<Vec<usize>>,
    next_policy: u64,
    calls: VecDeque<CallRecord>,
    /// Answers of applied requests by `Idempotency-Key`: a repeated key is
    /// answered from here and not applied again (oldest keys dropped
    /// first beyond `MAX_KEYS`).
    /// Each key's request (method, path, body) and answer.
    applied_keys: std::collections::HashMap<String, (String, Value)>,
    key_order: VecDeque<String>,
    /// The highest `X-Fencing-Token` seen per `X-Fencing-Domain`: a lower
    /// one in the same domain is refused.
    highest_token: std::collections::HashMap<String, i64>,
}

/// Idempotency keys remembered.
const MAX_KEYS: usize = 100_000;

impl World {
    fn new(topology: Topology, now: Timestamp) -> Self {
        let names = topology.components().to_vec();
        let upstreams = names
            .iter()
            .map(|n| {
                topology
                    .upstreams(n)
                    .iter()
                    .filter_map(|u| names.iter().position(|x| x == u))
                    .collect()
            })
            .collect();
        let mut w = World {
            topology,
            components: Vec::with_capacity(names.len()),
            upstreams,
            next_policy: 1,
            calls: VecDeque::new(),
            applied_keys: std::collections::HashMap::new(),
            key_order: VecDeque::new(),
            highest_token: std::collections::HashMap::new(),
        };
        for name in &names {
            let id = w.new_policy_id();
            w.components.push(Component::new(name, id, now));
        }
        w
    }

    /// A fresh policy id, unique over every component.
    pub(crate) fn new_policy_id(&mut self) -> String {
        take_policy_id(&mut self.next_policy)
    }

    /// Component `i` and the policy-id counter, borrowed together.
    pub(crate) fn component_and_ids(&mut self, i: usize) -> (&mut Component, &mut u64) {
        (&mut self.components[i], &mut self.next_policy)
    }

    /// Index of component `name` (the default one for `None`).
    pub(crate) fn index(&self, name: Option<&str>) -> Result<usize, SimError> {
        let Some(name) = name else {
            return Ok(0);
        };
        self.components
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| SimError::UnknownComponent {
                name: name.to_string(),
                known: self.topology.components().join(", "),
            })
    }

    /// Whether the cascade injected at `i` (if any) has reached its
    /// dependents.
    fn cascade_spread(&self, i: usize, now: Timestamp) -> bool {
        let spread = chrono::Duration::seconds(CASCADE_SPREAD_SECONDS as i64);
        self.components[i]
            .cascade_since
            .is_some_and(|t| now - t >= spread)
    }

    /// Upstreams of `i` whose cascade reaches it now.
    pub(crate) fn storm_sources(&self, i: usize, now: Timestamp) -> Vec<usize> {
        self.upstreams[i]
            .iter()
            .copied()
            .filter(|&u| self.cascade_spread(u, now))
            .collect()
    }

    /// Number of upstreams of `i` whose cascade reaches it now.
    pub(crate) fn storms(&self, i: usize, now: Timestamp) -> usize {
        self.storm_sources(i, now).len()
    }

    /// Components that the cascade at `i` reaches now.
    pub(crate) fn storm_targets(&self, i: usize, now: Timestamp) -> Vec<usize> {
        if !self.cascade_spread(i, now) {
            return Vec::new();
        }
        (0..self.components.len())
            .filter(|d| self.upstreams[*d].contains(&i))
            .collect()
    }

    pub(crate) fn reading(&self, i: usize, now: Timestamp) -> Reading {
        self.components[i].reading(now, self.storms(i, now))
    }

    pub(crate) fn violations(&self, i: usize, now: Timestamp) -> Vec<SimViolation> {
        self.components[i].violations(now, self.storms(i, now))
    }

    pub(crate) fn status(&self, i: usize, now: Timestamp) -> &'static str {
        self.components[i].committee_status(now, self.storms(i, now))
    }

    fn healthy(&self, i: usize, now: Timestamp) -> bool {
        self.components[i].faults().is_empty() && self.violations(i, now).is_empty()
    }

    fn record(&mut self, call: CallRecord) {
        if self.calls.len() >= MAX_CALLS {
            self.calls.pop_front();
        }
        self.calls.push_back(call);
    }

    /// One validation round on every component (a read of `/metrics`).
    fn count_rounds(&mut self, now: Timestamp) {
        let storms: Vec<usize> = (0..self.components.len())
            .map(|i| self.storms(i, now))
            .collect();
        for (c, n) in self.components.iter_mut().zip(storms) {
            c.count_round(now, n);
        }
    }

    /// The state of component `i`, as in `/sim/state`.
    fn component_state(&self, i: usize, now: Timestamp) -> Value {
        let s = &self.components[i];
        let r = self.reading(i, now);
        let violations = self.violations(i, now);
        let faults = s.faults();
        let storm_from: Vec<&str> = self
            .storm_sources(i, now)
            .into_iter()
            .map(|u| self.components[u].name.as_str())
            .collect();
        json!({
            "component": s.name,
            "healthy": faults.is_empty() && violations.is_empty(),
            "status": s.committee_status(now, storm_from.len()),
            "replicas": s.replicas,
            "healthy_nodes": s.healthy_nodes(),
            "active_faults": faults,
            "cascade_from": storm_from,
            "depends_on": self.topology.upstreams(&s.name),
            "dependents": self.topology.dependents(&s.name),
            "load_ops_per_sec": r.load_ops_per_sec,
            "admitted_ops_per_sec": r.admitted_ops_per_sec,
            "capacity_ops_per_sec": r.capacity_ops_per_sec,
            "utilisation": r.utilisation,
            "validation_latency_seconds": r.validation_latency_seconds,
            "failure_rate": r.failure_rate,
            "throughput_ops_per_sec": r.throughput_ops_per_sec,
            "memory_bytes": r.memory_bytes,
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
        })
    }
}

/// The policy id numbered `*next`, and the counter advanced.
pub(crate) fn take_policy_id(next: &mut u64) -> String {
    let id = format!("pol-{:04}", *next);
    *next += 1;
    id
}

/// The component a request names: `component` in its body (a string) or
/// `query` (`?component=`); both must agree. `None` = the default one.
fn requested_component(query: Option<&str>, body: &Value) -> Result<Option<String>, SimError> {
    let in_body = match body.get("component") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            return Err(SimError::BadRequest(format!(
                "component must be a string (got {other})"
            )))
        }
    };
    match (query, in_body) {
        (Some(q), Some(b)) if q != b => Err(SimError::BadRequest(format!(
            "component `{q}` in the query but `{b}` in the body"
        ))),
        (q, b) => Ok(q.or(b).map(str::to_string)),
    }
}

/// `body` without its `component` key.
fn without_component(body: &Value) -> Value {
    match body {
        Value::Object(m) if m.contains_key("component") => {
            let mut m = m.clone();
            m.remove("component");
            Value::Object(m)
        }
        other => other.clone(),
    }
}

/// The simulated Charter. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<Mutex<World>>,
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
    /// A healthy Charter (one component, `charter`) on the system clock.
    pub fn new() -> Self {
        Simulator::with_clock(Arc::new(SystemClock))
    }

    /// A healthy Charter (one component, `charter`) on `clock` (records,
    /// override and bypass expiry, cascade spread).
    pub fn with_clock(clock: SharedClock) -> Self {
        Simulator::with_topology(Topology::default(), clock)
    }

    /// Healthy components `names` (the first is the default one) without
    /// dependencies, on the system clock.
    pub fn with_components<S: AsRef<str>>(names: &[S]) -> Result<Self, TopologyError> {
        Ok(Simulator::with_topology(
            Topology::new(names)?,
            Arc::new(SystemClock),
        ))
    }

    /// Healthy components of `topology` on `clock`.
    pub fn with_topology(topology: Topology, clock: SharedClock) -> Self {
        let now = clock.now();
        Simulator {
            state: Arc::new(Mutex::new(World::new(topology, now))),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topology simulated.
    pub fn topology(&self) -> Topology {
        self.lock().topology.clone()
    }

    /// The components, the default one first.
    pub fn components(&self) -> Vec<String> {
        self.lock().topology.components().to_vec()
    }

    /// Injects a fault into the default component. Injecting an active
    /// fault again changes nothing.
    pub fn inject(&self, kind: FaultKind) -> Result<(), SimError> {
        self.inject_into(None, kind).map(|_| ())
    }

    /// Injects a fault into `component`; returns its name.
    pub fn inject_at(&self, component: &str, kind: FaultKind) -> Result<String, SimError> {
        self.inject_into(Some(component), kind)
    }

    fn inject_into(&self, component: Option<&str>, kind: FaultKind) -> Result<String, SimError> {
        let now = self.clock.now();
        let mut w = self.lock();
        let i = w.index(component)?;
        let w = &mut *w;
        let next = &mut w.next_policy;
        w.components[i].inject(kind, now, || take_policy_id(next));
        Ok(w.components[i].name.clone())
    }

    /// Injects a fault by name (`load_spike`, `bad_policy`, `node_crash`,
    /// `cascade`, `memory_leak`, `flapping`) into the default component.
    pub fn inject_named(&self, kind: &str) -> Result<FaultKind, SimError> {
        self.inject_named_at(kind, None).map(|(k, _)| k)
    }

    /// Injects a fault by name into `component` (the default one for
    /// `None`); returns the kind and the component's name.
    pub fn inject_named_at(
        &self,
        kind: &str,
        component: Option<&str>,
    ) -> Result<(FaultKind, String), SimError> {
        let k = FaultKind::parse(kind).ok_or_else(|| {
            let known: Vec<&str> = FaultKind::ALL.iter().map(|k| k.as_str()).collect();
            SimError::BadRequest(format!(
                "unknown fault kind `{kind}` (expected one of {})",
                known.join(", ")
            ))
        })?;
        let name = self.inject_into(component, k)?;
        Ok((k, name))
    }

    /// Ends every fault of every component and their effects (without any
    /// remedy); returns the kinds that were active anywhere. Remedies in
    /// place (replicas, throttle, override) stay.
    pub fn clear_faults(&self) -> Vec<FaultKind> {
        let mut w = self.lock();
        let mut all: Vec<FaultKind> = w
            .components
            .iter_mut()
            .flat_map(Component::clear_faults)
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Ends every fault of `component`; returns those that were active.
    pub fn clear_faults_at(&self, component: &str) -> Result<Vec<FaultKind>, SimError> {
        let mut w = self.lock();
        let i = w.index(Some(component))?;
        Ok(w.components[i].clear_faults())
    }

    /// Back to the initial state (same topology); the call log is emptied
    /// too.
    pub fn reset(&self) {
        let now = self.clock.now();
        let mut w = self.lock();
        let topology = w.topology.clone();
        *w = World::new(topology, now);
    }

    /// Faults injected into the default component and still active.
    pub fn active_faults(&self) -> Vec<FaultKind> {
        self.lock().components[0].faults()
    }

    /// Faults injected into `component` and still active.
    pub fn active_faults_at(&self, component: &str) -> Result<Vec<FaultKind>, SimError> {
        let w = self.lock();
        let i = w.index(Some(component))?;
        Ok(w.components[i].faults())
    }

    /// The default component's figures now.
    pub fn reading(&self) -> Reading {
        let now = self.clock.now();
        self.lock().reading(0, now)
    }

    /// `component`'s figures now.
    pub fn reading_at(&self, component: &str) -> Result<Reading, SimError> {
        let now = self.clock.now();
        let w = self.lock();
        let i = w.index(Some(component))?;
        Ok(w.reading(i, now))
    }

    /// The default rules breached now, by every component (each violation
    /// names its component).
    pub fn violations(&self) -> Vec<SimViolation> {
        let now = self.clock.now();
        let w = self.lock();
        (0..w.components.len())
            .flat_map(|i| w.violations(i, now))
            .collect()
    }

    /// The default rules breached now by `component`.
    pub fn violations_at(&self, component: &str) -> Result<Vec<SimViolation>, SimError> {
        let now = self.clock.now();
        let w = self.lock();
        let i = w.index(Some(component))?;
        Ok(w.violations(i, now))
    }

    /// Whether no fault is active and every rule is quiet, on every
    /// component.
    pub fn healthy(&self) -> bool {
        let now = self.clock.now();
        let w = self.lock();
        (0..w.components.len()).all(|i| w.healthy(i, now))
    }

    /// Whether no fault is active and every rule is quiet on `component`.
    pub fn healthy_at(&self, component: &str) -> Result<bool, SimError> {
        let now = self.clock.now();
        let w = self.lock();
        let i = w.index(Some(component))?;
        Ok(w.healthy(i, now))
    }

    /// Calls received on the Charter API, oldest first (at most
    /// [`MAX_CALLS`]).
    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.iter().cloned().collect()
    }

    /// Records a Charter API call handled outside [`Simulator::apply`] (a
    /// malformed body or query).
    pub fn record_call(&self, method: &str, path: &str, body: Value, status: u16) {
        let now = self.clock.now();
        self.lock().record(CallRecord {
            method: method.to_string(),
            path: path.to_string(),
            body,
            component: None,
            at: now.to_rfc3339(),
            status,
            idempotency_key: None,
            replayed: false,
            fencing_token: None,
        });
    }

    /// The state served by `GET /sim/state`: the default component's fields
    /// at the top level (as before there were several), `all_healthy`,
    /// `default_component`, `topology` (dependent → upstreams) and
    /// `components` (name → that component's state).
    pub fn state(&self) -> Value {
        let now = self.clock.now();
        let w = self.lock();
        let mut top = match w.component_state(0, now) {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let mut components = Map::new();
        for (i, c) in w.components.iter().enumerate() {
            components.insert(c.name.clone(), w.component_state(i, now));
        }
        let all_healthy = (0..w.components.len()).all(|i| w.healthy(i, now));
        top.insert("all_healthy".into(), json!(all_healthy));
        top.insert(
            "default_component".into(),
            json!(w.topology.default_component()),
        );
        top.insert("topology".into(), json!(w.topology.dependencies()));
        top.insert("components".into(), Value::Object(components));
        top.insert("calls_received".into(), json!(w.calls.len()));
        top.insert("timestamp".into(), json!(now.to_rfc3339()));
        Value::Object(top)
    }

    /// The metrics in the OpenMetrics text format (prometheus-client), one
    /// series per component for each metric. Each read is one validation
    /// round for the policy-violation counters: on each component the
    /// critical one grows by one while a bad policy is active, the warning
    /// one while a warning-level rule breaches.
    pub fn metrics_text(&self) -> String {
        let now = self.clock.now();
        let mut w = self.lock();
        w.count_rounds(now);
        metrics::encode(&w, now)
    }

    /// Handles one Charter API call (`method` `path` with JSON `body`) and
    /// records it for `/sim/calls`. The component is `component` in the
    /// body (removed before the endpoint reads it), else the default one.
    /// `GET` calls ignore the rest of the body.
    pub fn apply(&self, method: &str, path: &str, body: &Value) -> Result<Value, SimError> {
        self.apply_to(None, method, path, body)
    }

    /// [`Simulator::apply`] with the component also given apart from the
    /// body (the `?component=` of the query): when both are given they
    /// must agree.
    pub fn apply_to(
        &self,
        component: Option<&str>,
        method: &str,
        path: &str,
        body: &Value,
    ) -> Result<Value, SimError> {
        self.apply_keyed(component, method, path, body, None, None)
    }

    /// [`Self::apply_to`] with the request's `Idempotency-Key`: a key
    /// already applied is answered as the first time and not applied
    /// again (the call is recorded with `replayed: true`).
    pub fn apply_keyed(
        &self,
        component: Option<&str>,
        method: &str,
        path: &str,
        body: &Value,
        key: Option<&str>,
        fencing: Option<(String, i64)>,
    ) -> Result<Value, SimError> {
        let now = self.clock.now();
        let mut w = self.lock();
        let token_seen = fencing.as_ref().map(|(_, t)| *t);
        if let Some((domain, token)) = fencing {
            // Fencing end to end: a request from a leader older than one
            // already seen (for the same domain) is refused, even one
            // already in flight.
            let highest = w.highest_token.get(&domain).copied();
            if let Some(highest) = highest.filter(|h| token < *h) {
                w.record(CallRecord {
                    method: method.to_string(),
                    path: path.to_string(),
                    body: body.clone(),
                    component: component.map(str::to_string),
                    at: now.to_rfc3339(),
                    status: 409,
                    idempotency_key: key.map(str::to_string),
                    replayed: false,
                    fencing_token: Some(token),
                });
                return Err(SimError::Conflict(format!(
                    "stale fencing token {token} for {domain:?} (a newer leader's {highest} was \
                     seen)"
                )));
            }
            w.highest_token.insert(domain, token);
        }
        let key = key.filter(|_| method != "GET" && method != "HEAD");
        let fingerprint = format!("{method} {path} {body}");
        if let Some((seen, answer)) = key.and_then(|k| w.applied_keys.get(k)).cloned() {
            // The same key for a different request is a client's bug: 422,
            // as an idempotent API answers it.
            let same = seen == fingerprint;
            w.record(CallRecord {
                method: method.to_string(),
                path: path.to_string(),
                body: body.clone(),
                component: component.map(str::to_string),
                at: now.to_rfc3339(),
                status: if same { 200 } else { 422 },
                idempotency_key: key.map(str::to_string),
                replayed: same,
                fencing_token: token_seen,
            });
            return if same {
                Ok(answer)
            } else {
                Err(SimError::Unprocessable(format!(
                    "Idempotency-Key {} was used for another request ({seen})",
                    key.unwrap_or_default()
                )))
            };
        }
        let asked = requested_component(component, body);
        let (named, result) = match asked {
            Err(e) => (component.map(str::to_string), Err(e)),
            Ok(asked) => match w.index(asked.as_deref()) {
                Err(e) => (asked, Err(e)),
                Ok(i) => {
                    let name = w.components[i].name.clone();
                    let stripped = without_component(body);
                    (
                        Some(name),
                        charter::dispatch(&mut w, i, method, path, &stripped, now),
                    )
                }
            },
        };
        let status = match &result {
            Ok(_) => 200,
            Err(e) => e.status().as_u16(),
        };
        w.record(CallRecord {
            method: method.to_string(),
            path: path.to_string(),
            body: body.clone(),
            component: named,
            at: now.to_rfc3339(),
            status,
            idempotency_key: key.map(str::to_string),
            replayed: false,
            fencing_token: token_seen,
        });
        if let (Some(k), Ok(v)) = (key, &result) {
            if w.key_order.len() >= MAX_KEYS {
                if let Some(old) = w.key_order.pop_front() {
                    w.applied_keys.remove(&old);
                }
            }
            w.applied_keys
                .insert(k.to_string(), (fingerprint.clone(), v.clone()));
            w.key_order.push_back(k.to_string());
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::parse_exposition;
    use crate::sim::test_support::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn two() -> (Simulator, ManualClockHandle) {
        sim_of(Topology::new(&["charter", "gateway"]).unwrap())
    }

    type ManualClockHandle = mapek_actors::clock::ManualClock;

    /// `gateway` and `ledger` depend on `charter`; `audit` on nothing.
    fn chain() -> (Simulator, ManualClockHandle) {
        let t = Topology::parse(
            "charter,gateway,ledger,audit",
            &["gateway=charter", "ledger=charter"],
        )
        .unwrap();
        sim_of(t)
    }

    fn post_to(sim: &Simulator, component: &str, path: &str, mut body: Value) -> Value {
        body["component"] = json!(component);
        sim.apply("POST", path, &body)
            .unwrap_or_else(|e| panic!("{path} on {component}: {e}"))
    }

    /// Every sample of `component`, by name and other labels.
    fn series_of(text: &str, component: &str) -> BTreeMap<String, f64> {
        parse_exposition(text)
            .unwrap()
            .into_iter()
            .filter(|s| s.labels.get("component").map(String::as_str) == Some(component))
            .map(|s| (format!("{}{:?}", s.name, s.labels), s.value))
            .collect()
    }

    #[test]
    fn a_fault_on_one_component_leaves_the_other_alone() {
        let (sim, _) = two();
        assert_eq!(sim.components(), ["charter", "gateway"]);
        let before = series_of(&sim.metrics_text(), "charter");
        let reading = sim.reading_at("charter").unwrap();
        assert!(!before.is_empty());

        assert_eq!(
            sim.inject_at("gateway", FaultKind::LoadSpike).unwrap(),
            "gateway"
        );
        let after = series_of(&sim.metrics_text(), "charter");
        assert_eq!(before, after, "charter's series did not move");
        assert_eq!(sim.reading_at("charter").unwrap(), reading);
        assert_eq!(sim.reading(), reading, "the default component is charter");
        assert!(sim.active_faults().is_empty());
        assert!(sim.healthy_at("charter").unwrap());

        assert_eq!(
            sim.active_faults_at("gateway").unwrap(),
            [FaultKind::LoadSpike]
        );
        assert!(!sim.healthy_at("gateway").unwrap());
        assert!(!sim.healthy());
        let g = sim.reading_at("gateway").unwrap();
        assert!(
            g.validation_latency_seconds > 1.0 && g.failure_rate > 0.10,
            "{g:?}"
        );
        let v = sim.violations();
        assert!(
            !v.is_empty() && v.iter().all(|v| v.component == "gateway"),
            "{v:?}"
        );
        let gw = series_of(&sim.metrics_text(), "gateway");
        assert_eq!(
            gw.iter()
                .find(|(k, _)| k.starts_with("westworld_charter_fault_active")
                    && k.contains("load_spike"))
                .map(|(_, v)| *v),
            Some(1.0)
        );
    }

    #[test]
    fn a_remedy_aimed_at_another_component_does_not_heal() {
        let (sim, _) = two();
        sim.inject_at("gateway", FaultKind::LoadSpike).unwrap();
        // No component: the default one, charter.
        let a = post(&sim, "/api/v1/committee/scale", json!({"replicas": 5})).unwrap();
        assert_eq!(a["healed"], json!([]));
        post_to(
            &sim,
            "charter",
            "/api/v1/throttle",
            json!({"rate_limit": 500}),
        );
        assert_eq!(
            sim.active_faults_at("gateway").unwrap(),
            [FaultKind::LoadSpike]
        );
        let st = sim.state();
        assert_eq!(st["components"]["charter"]["replicas"], json!(5));
        assert_eq!(st["components"]["gateway"]["replicas"], json!(3));
        // The same remedy at the right component heals.
        let a = post_to(
            &sim,
            "gateway",
            "/api/v1/committee/scale",
            json!({"replicas": 5}),
        );
        assert_eq!(a["healed"], json!(["load_spike"]));
        assert!(sim.healthy(), "{}", sim.state());
        let st = sim.state();
        assert_eq!(st["components"]["gateway"]["status"], json!("recovering"));
        assert_eq!(st["components"]["charter"]["status"], json!("normal"));
    }

    #[test]
    fn bad_policies_are_per_component_with_unique_ids() {
        let (sim, _) = two();
        sim.inject_named_at("bad_policy", Some("gateway")).unwrap();
        let bad = sim.state()["components"]["gateway"]["active_policy"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(bad, "pol-0003", "baselines are pol-0001 and pol-0002");
        assert_eq!(sim.state()["active_policy"], json!("pol-0001"));
        // Rolling it back on the wrong component: not found there.
        let path = format!("/api/v1/policies/{bad}/rollback");
        assert!(matches!(
            post(&sim, &path, json!({})),
            Err(SimError::NotFound(_))
        ));
        assert_eq!(
            sim.active_faults_at("gateway").unwrap(),
            [FaultKind::BadPolicy]
        );
        let a = post_to(&sim, "gateway", &path, json!({}));
        assert_eq!(a["healed"], json!(["bad_policy"]));
        assert_eq!(a["active"], json!("pol-0002"));
        assert!(sim.healthy());
    }

    #[test]
    fn unknown_or_inconsistent_components_are_refused() {
        let (sim, _) = two();
        let e = sim
            .apply(
                "GET",
                "/api/v1/committee/state",
                &json!({"component": "nope"}),
            )
            .unwrap_err();
        assert_eq!(
            e,
            SimError::UnknownComponent {
                name: "nope".into(),
                known: "charter, gateway".into()
            }
        );
        assert_eq!(e.status().as_u16(), 404);
        assert!(matches!(
            sim.apply(
                "POST",
                "/api/v1/throttle",
                &json!({"component": 7, "rate_limit": 1})
            ),
            Err(SimError::BadRequest(_))
        ));
        assert!(matches!(
            sim.apply_to(
                Some("charter"),
                "POST",
                "/api/v1/throttle",
                &json!({"component": "gateway", "rate_limit": 1})
            ),
            Err(SimError::BadRequest(_))
        ));
        assert!(matches!(
            sim.inject_at("nope", FaultKind::Cascade),
            Err(SimError::UnknownComponent { .. })
        ));
        assert!(matches!(
            sim.reading_at("nope"),
            Err(SimError::UnknownComponent { .. })
        ));
        assert_eq!(
            sim.state()["throttle_rate_limit"],
            Value::Null,
            "nothing applied"
        );
        let calls = sim.calls();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0].component.as_deref(), Some("nope"));
        assert_eq!(calls[0].status, 404);
        assert_eq!(calls[2].component.as_deref(), Some("charter"));
        // A GET with a component in the query, and the body kept as sent.
        let st = sim
            .apply_to(
                Some("gateway"),
                "GET",
                "/api/v1/committee/state",
                &json!({}),
            )
            .unwrap();
        assert_eq!(st["component"], json!("gateway"));
        let a = sim
            .apply(
                "POST",
                "/api/v1/config",
                &json!({"component": "gateway", "x": 1}),
            )
            .unwrap();
        assert_eq!(a["config"]["x"], json!(1));
        assert!(
            a["config"].get("component").is_none(),
            "component is not config"
        );
        let last = sim.calls().pop().unwrap();
        assert_eq!(last.body, json!({"component": "gateway", "x": 1}));
        assert_eq!(last.component.as_deref(), Some("gateway"));
    }

    #[test]
    fn cascade_spreads_from_the_upstream_to_its_dependents() {
        let (sim, clock) = chain();
        let calm = sim.reading_at("gateway").unwrap();
        sim.inject_at("charter", FaultKind::Cascade).unwrap();
        // First the latency at the upstream; the dependents are still calm.
        let up = sim.reading_at("charter").unwrap();
        assert!(up.validation_latency_seconds > 1.0, "{up:?}");
        assert_eq!(sim.reading_at("gateway").unwrap(), calm);
        assert!(sim.violations_at("gateway").unwrap().is_empty());

        clock.advance(Duration::from_secs(CASCADE_SPREAD_SECONDS));
        for dependent in ["gateway", "ledger"] {
            let r = sim.reading_at(dependent).unwrap();
            assert!(r.failure_rate > 0.10, "{dependent}: {r:?}");
            assert!(
                r.load_ops_per_sec > calm.load_ops_per_sec,
                "{dependent}: {r:?}"
            );
            assert!(r.validation_latency_seconds <= 1.0, "{dependent}: {r:?}");
            let names: Vec<String> = sim
                .violations_at(dependent)
                .unwrap()
                .into_iter()
                .map(|v| v.name)
                .collect();
            assert_eq!(names, ["CharterFailureRateHigh"], "{dependent}");
            assert!(sim.active_faults_at(dependent).unwrap().is_empty());
        }
        let st = sim.state();
        assert_eq!(
            st["components"]["gateway"]["cascade_from"],
            json!(["charter"])
        );
        assert_eq!(
            st["components"]["charter"]["dependents"],
            json!(["gateway", "ledger"])
        );
        assert!(sim.healthy_at("audit").unwrap(), "not a dependent");
        let text = sim.metrics_text();
        let failure = |c: &str| {
            parse_exposition(&text)
                .unwrap()
                .into_iter()
                .find(|s| s.name == "westworld_charter_failure_rate" && s.labels["component"] == c)
                .unwrap()
                .value
        };
        assert!(failure("gateway") > 0.10 && failure("audit") < 0.10);
    }

    #[test]
    fn the_dependents_heal_only_through_the_remedy_at_the_upstream() {
        let (sim, clock) = chain();
        sim.inject_at("charter", FaultKind::Cascade).unwrap();
        clock.advance(Duration::from_secs(CASCADE_SPREAD_SECONDS + 5));
        // Every remedy at the dependent, including the cascade remedy.
        post_to(
            &sim,
            "gateway",
            "/api/v1/emergency-override",
            json!({"duration_seconds": 300}),
        );
        post_to(
            &sim,
            "gateway",
            "/api/v1/throttle",
            json!({"rate_limit": 500}),
        );
        post_to(
            &sim,
            "gateway",
            "/api/v1/committee/scale",
            json!({"replicas": 7}),
        );
        post_to(&sim, "gateway", "/api/v1/committee/restart", json!({}));
        post_to(
            &sim,
            "gateway",
            "/api/v1/rebalance",
            json!({"strategy": "least_loaded"}),
        );
        assert!(sim.reading_at("gateway").unwrap().failure_rate > 0.10);
        assert_eq!(
            sim.active_faults_at("charter").unwrap(),
            [FaultKind::Cascade]
        );
        // Half the remedy at the upstream is not enough.
        post_to(
            &sim,
            "charter",
            "/api/v1/emergency-override",
            json!({"duration_seconds": 300}),
        );
        assert!(sim.reading_at("gateway").unwrap().failure_rate > 0.10);
        // The whole remedy at the upstream heals it and its dependents.
        let a = post_to(
            &sim,
            "charter",
            "/api/v1/throttle",
            json!({"rate_limit": 500}),
        );
        assert_eq!(a["healed"], json!(["cascade"]));
        assert!(sim.healthy(), "{}", sim.state());
        let st = sim.state();
        assert_eq!(st["all_healthy"], json!(true));
        assert_eq!(st["components"]["ledger"]["status"], json!("recovering"));
        assert_eq!(st["components"]["ledger"]["cascade_from"], json!([]));
        assert!(sim.reading_at("ledger").unwrap().failure_rate < 0.05);
    }

    #[test]
    fn a_cascade_healed_before_it_spreads_never_reaches_the_dependents() {
        let (sim, clock) = chain();
        sim.inject_at("charter", FaultKind::Cascade).unwrap();
        post_to(
            &sim,
            "charter",
            "/api/v1/emergency-override",
            json!({"duration_seconds": 300}),
        );
        post_to(
            &sim,
            "charter",
            "/api/v1/throttle",
            json!({"rate_limit": 500}),
        );
        clock.advance(Duration::from_secs(CASCADE_SPREAD_SECONDS * 2));
        assert!(sim.healthy(), "{}", sim.state());
    }

    #[test]
    fn clear_and_reset_keep_the_topology() {
        let (sim, clock) = chain();
        sim.inject_at("charter", FaultKind::Cascade).unwrap();
        sim.inject_at("audit", FaultKind::NodeCrash).unwrap();
        clock.advance(Duration::from_secs(CASCADE_SPREAD_SECONDS));
        assert_eq!(
            sim.clear_faults_at("audit").unwrap(),
            [FaultKind::NodeCrash]
        );
        assert!(!sim.healthy());
        assert_eq!(sim.clear_faults(), [FaultKind::Cascade]);
        assert!(sim.healthy());
        sim.inject_at("gateway", FaultKind::LoadSpike).unwrap();
        sim.reset();
        assert!(sim.healthy());
        assert_eq!(sim.components(), ["charter", "gateway", "ledger", "audit"]);
        assert_eq!(sim.topology().upstreams("ledger"), ["charter"]);
        let st = sim.state();
        assert_eq!(st["default_component"], json!("charter"));
        assert_eq!(
            st["topology"],
            json!({"gateway": ["charter"], "ledger": ["charter"]})
        );
    }
}
