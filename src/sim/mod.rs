//! The simulated Charter: the managed system of the demo and the tests.
//!
//! It models one or several components (by default one, `charter`), serves
//! the whole Charter REST API of the specification for each, exports the
//! `westworld_charter_*` metrics on `/metrics` with a `component` label on
//! every series, and lets a test or an operator inject faults into a
//! component through `/sim/*`. Everything is computed from the state on each
//! read, and the state changes only through API calls: the model is
//! deterministic (the clock only stamps records, bounds the duration of an
//! emergency override or a validation bypass, times the spread of a
//! cascade to the dependents, the growth of a memory leak and the phases of
//! a flapping component).
//!
//! # Layout
//!
//! [`topology`] names the components and who depends on whom; `model` is
//! the physics of one component; `charter` the Charter API's semantics on
//! one component; `simulator` the shared world behind the [`Simulator`]
//! handle; `metrics` the exposition (prometheus-client); `api` the axum
//! router.
//!
//! # Model (per component)
//!
//! * offered load `L = 250 ops/s` (× 3 during a `load_spike`, × 3 more from
//!   retries during a `cascade` injected at this component, × 1.5 while an
//!   upstream's cascade reaches it); admitted load `A = min(L, rate_limit)`;
//! * capacity `C = 200 ops/s × healthy_nodes`, `healthy_nodes = replicas −
//!   crashed`; utilisation `u = A / C`;
//! * validation latency `0.1 s / (1 − min(u, 0.95)) + 2 s × max(0, u − 1)`
//!   (queueing delay, then backlog), plus 1 s while a crashed member is still
//!   in the committee (every round waits for its vote to time out), plus 1 s
//!   while a cascade has tripped the breakers (no emergency override);
//! * failure rate `1 − Π(1 − fᵢ)` of independent causes: load
//!   `0.01 + 0.99 × (1 − e^(−10 × max(0, u − 1)))` (congestion collapse),
//!   traffic routed to crashed members `crashed / replicas`, a bad policy
//!   rejecting valid operations `0.2`, tripped breakers `0.3`, and `0.3` per
//!   upstream whose cascade reaches it (its calls to that upstream fail);
//! * memory per node `512 MiB`, growing by `8 MiB/s` during a
//!   `memory_leak`; from the pressure point `m₀ = 512 MiB + 8 MiB/s ×
//!   LEAK_ONSET_SECONDS` (1232 MiB) on, with `r = memory / m₀ ≥ 1`, latency
//!   `+ 1 s × r` (garbage-collection pauses) and only `0.35 / r` of the
//!   operations succeed (failed allocations): latency, failure rate and
//!   throughput breach as in an overload, and grow worse with time;
//! * a `flapping` component adds 1 s of latency and lets only `0.35` of its
//!   operations succeed during the first [`FLAP_PERIOD_SECONDS`] (30 s)
//!   after its injection, then nothing for as long, and so on;
//! * throughput (goodput) `A × (1 − failure rate)`;
//! * the critical policy-violation counter grows by one on every read of
//!   `/metrics` while a bad policy is active; the warning counter grows by one
//!   per read while a warning-level rule breaches.
//!
//! A fault heals only through a remedy that fits it, applied to its
//! component, and only when that remedy is sufficient: a `load_spike`
//! through a scale or a throttle that brings utilisation back within
//! bounds; a `bad_policy` through a corrected policy (`policies/apply`) or
//! the rollback of the bad one; a `node_crash` through a committee restart
//! or a failover; a `cascade` once both an emergency override and a
//! sufficient throttle are active; a `memory_leak` through a committee
//! restart only (memory back to the baseline). A healed fault ends with its
//! effects (the spike or the retry storm subsides, the node is back, the
//! good policy is active); the remedies stay in place.
//!
//! Two faults are there to test mapek's judgement rather than its
//! remedies:
//!
//! * `memory_leak` is injected [`LEAK_ONSET_SECONDS`] into the leak, so it
//!   breaches at once, with the symptoms of an overload: mapek diagnoses a
//!   capacity problem whose default strategy (SCALE_UP, ...) does not
//!   restart anything. A scale-up (more replicas than before) brings fresh
//!   replicas: the committee's memory falls back to where it was
//!   `LEAK_ONSET_SECONDS − LEAK_RELIEF_SECONDS` (15 s) into the leak, the
//!   breach clears for [`LEAK_RELIEF_SECONDS`] (75 s), then comes back:
//!   a verification soon after the scale-up judges it a success, and the
//!   symptom recurs. Only a restart (`committee/restart`) heals it.
//! * `flapping` breaches and clears on its own schedule whatever is done:
//!   a remedy may seem to work (its half-period ends), none heals it; only
//!   clearing the fault (`DELETE /sim/faults`) ends it.
//!
//! # Several components and the cascade
//!
//! Components are independent except through the topology
//! (`dependent → upstreams`). A `cascade` injected at an upstream `U` has a
//! signature of its own, in two steps:
//!
//! 1. at once, at `U`: the retry storm (load × 3) and tripped breakers —
//!    validation latency above 1 s first of all (≈ 3.5 s with the defaults),
//!    with failures and collapsing throughput;
//! 2. [`CASCADE_SPREAD_SECONDS`] (10 s) later, at every component that
//!    depends on `U` directly: a retry storm of its own clients (load × 1.5,
//!    375 ops/s on 600 ops/s of capacity: latency stays ≈ 0.27 s) and the
//!    calls to `U` failing (`0.3`): failure rate ≈ 0.31 > 0.10, throughput
//!    ≈ 260 ops/s. Only the failure-rate rule fires there.
//!
//! The dependents heal **only** through the remedy at `U` (an emergency
//! override and a sufficient throttle, both sent with `component = U`):
//! their storm is not a fault of theirs, so no remedy at a dependent
//! (throttle, scale, override, restart...) ends it; when `U`'s cascade
//! heals, the dependents recover at once (their status is `recovering`).
//! The spread is not transitive: a dependent's dependents are not affected.
//!
//! Requests name their component with `component` in the JSON body (POST)
//! or `?component=` (any method); without it they address the default
//! component, the first of the topology. With the default topology the
//! simulator behaves exactly as the single-committee Charter it was.

mod api;
mod charter;
mod metrics;
mod model;
mod simulator;
pub mod topology;

#[cfg(test)]
mod test_support;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

pub use api::{router, serve};
pub use model::{
    FaultKind, Reading, SimViolation, BASE_LOAD, BASE_MEMORY_BYTES, BASE_REPLICAS,
    CASCADE_SPREAD_SECONDS, DEPENDENT_RETRY_FACTOR, FLAP_PERIOD_SECONDS, LEAK_BYTES_PER_SECOND,
    LEAK_ONSET_SECONDS, LEAK_RELIEF_SECONDS, MAX_REPLICAS, MEMORY_PRESSURE_BYTES, NODE_CAPACITY,
    RETRY_AMPLIFICATION, SPIKE_FACTOR, UPSTREAM_CALL_FAILURE,
};
pub use simulator::{Simulator, MAX_CALLS};

/// A clock running `factor` times faster than the wall clock, for the
/// simulator: its slow physics (a leak's relief, a flap period) pass
/// quickly while mapek runs in real time (`mapek demo --scenario`, tests).
#[derive(Debug, Clone)]
pub struct FastClock {
    start: mapek_actors::model::Timestamp,
    real: std::time::Instant,
    factor: u32,
}

impl FastClock {
    /// Starts now, `factor` times faster than the wall clock.
    pub fn new(factor: u32) -> Self {
        FastClock {
            start: chrono::Utc::now(),
            real: std::time::Instant::now(),
            factor,
        }
    }
}

impl mapek_actors::clock::Clock for FastClock {
    fn now(&self) -> mapek_actors::model::Timestamp {
        let elapsed = self.real.elapsed() * self.factor;
        self.start + chrono::Duration::from_std(elapsed).unwrap_or_default()
    }
}
pub use topology::{Topology, TopologyError, DEFAULT_COMPONENT};

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
    /// The request names a component the simulator does not model (HTTP
    /// 404).
    #[error("unknown component `{name}` (components: {known})")]
    UnknownComponent {
        /// The component asked for.
        name: String,
        /// The components modelled, comma-separated.
        known: String,
    },
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
    /// An `Idempotency-Key` reused for a different request (HTTP 422).
    #[error("unprocessable: {0}")]
    Unprocessable(String),
}

impl SimError {
    /// HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            SimError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SimError::Unauthorized => StatusCode::UNAUTHORIZED,
            SimError::NotFound(_) | SimError::UnknownComponent { .. } => StatusCode::NOT_FOUND,
            SimError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            SimError::Conflict(_) => StatusCode::CONFLICT,
            SimError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
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
    /// Request path (without the query).
    pub path: String,
    /// JSON body as received (`{}` when empty; the raw text when it was not
    /// JSON).
    pub body: Value,
    /// The component addressed (the default one when the request named
    /// none; the name asked for when it is unknown; absent when the request
    /// was refused before it was read).
    pub component: Option<String>,
    /// When it was received (RFC 3339).
    pub at: String,
    /// HTTP status answered.
    pub status: u16,
    /// The request's `Idempotency-Key`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// A repeated idempotency key: answered as the first time, not applied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    /// The request's `X-Fencing-Token`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
}
