//! Helpers shared by the simulator's unit tests.

use std::sync::Arc;

use mapek_actors::clock::ManualClock;
use mapek_actors::model::Timestamp;
use serde_json::{json, Value};

use super::{serve, SimError, Simulator, Topology};
use crate::scrape::parse_exposition;

/// 2025-01-01T00:00:00Z.
pub(crate) fn start_time() -> Timestamp {
    chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc)
}

/// A one-component simulator on a manual clock.
pub(crate) fn sim() -> Simulator {
    Simulator::with_clock(Arc::new(ManualClock::new(start_time())))
}

/// A simulator of `topology` and the manual clock it runs on.
pub(crate) fn sim_of(topology: Topology) -> (Simulator, ManualClock) {
    let clock = ManualClock::new(start_time());
    (
        Simulator::with_topology(topology, Arc::new(clock.clone())),
        clock,
    )
}

pub(crate) fn post(sim: &Simulator, path: &str, body: Value) -> Result<Value, SimError> {
    sim.apply("POST", path, &body)
}

pub(crate) fn scale(sim: &Simulator, replicas: u64) {
    post(
        sim,
        "/api/v1/committee/scale",
        json!({"replicas": replicas}),
    )
    .unwrap();
}

pub(crate) fn throttle(sim: &Simulator, rate: Value) {
    post(sim, "/api/v1/throttle", json!({"rate_limit": rate})).unwrap();
}

pub(crate) fn override_for(sim: &Simulator, secs: u64) {
    post(
        sim,
        "/api/v1/emergency-override",
        json!({"duration_seconds": secs}),
    )
    .unwrap();
}

pub(crate) fn restart(sim: &Simulator) {
    post(
        sim,
        "/api/v1/committee/restart",
        json!({"graceful": true, "timeout": 30}),
    )
    .unwrap();
}

/// Value of the first critical policy-violation series of `component`.
pub(crate) fn critical_count_of(text: &str, component: &str) -> f64 {
    parse_exposition(text)
        .unwrap()
        .into_iter()
        .find(|s| {
            s.name == "westworld_charter_policy_violations_total"
                && s.labels.get("severity").map(String::as_str) == Some("critical")
                && s.labels.get("component").map(String::as_str) == Some(component)
        })
        .unwrap()
        .value
}

/// A simulator served on a loopback port.
pub(crate) struct Running {
    pub(crate) base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub(crate) async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

/// Serves `sim` on a loopback port (with `key` as the API key).
pub(crate) async fn start(sim: Simulator, key: Option<&str>) -> Running {
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
