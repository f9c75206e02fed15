//! Fault suite: `kill -9` at random moments, 20 times, during a fault
//! storm against a slow Charter, with a REAL Prometheus scraping the
//! simulated Charter and the `mapek` binary restarted on the same data
//! directory each time. A missing Prometheus fails this test.
//!
//! What must hold after the 20 kills and a final start:
//! - 0 lost acknowledged outcomes: every outcome the API showed before a
//!   kill is still there;
//! - 0 actions applied twice: the Charter counts applications per
//!   `Idempotency-Key` (a repeated key is answered, not applied), and no key
//!   is even sent twice;
//! - 0 executions left running;
//! - every action the Charter applied is on record in an execution (with
//!   the request sent), UNKNOWN (interrupted) when the kill came first.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mapek::sim::{FaultKind, Simulator, Topology};
use mapek_actors::clock::SystemClock;
use serde_json::Value;
use support::live::{get, wait_until};
use support::servers::prometheus;
use support::{free_addr, Proc};

const COMPONENTS: [&str; 4] = ["charter", "ledger", "gateway", "payments"];
/// Every applied Charter request answers this late: a kill lands while
/// calls are under way.
const CHARTER_LATENCY: Duration = Duration::from_millis(400);
const KILLS: usize = 20;

/// The simulated Charter whose API answers POSTs `CHARTER_LATENCY` after
/// applying them.
struct SlowCharter {
    sim: Simulator,
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

fn slow_charter() -> SlowCharter {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let topology = Topology::new(&COMPONENTS).expect("topology");
    let sim = Simulator::with_topology(topology, Arc::new(SystemClock));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = mapek::sim::router(sim.clone(), None).layer(axum::middleware::from_fn(
        |req: axum::extract::Request, next: axum::middleware::Next| async move {
            let slow =
                req.method() == axum::http::Method::POST && req.uri().path().starts_with("/api/");
            let res = next.run(req).await;
            if slow {
                tokio::time::sleep(CHARTER_LATENCY).await;
            }
            res
        },
    ));
    rt.spawn(async move { axum::serve(listener, router).await });
    SlowCharter { sim, addr, _rt: rt }
}

/// A small deterministic generator (xorshift) for the kill moments.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo)
    }
}

fn start(cfg: &str, data: &str, addr: SocketAddr, cwd: &std::path::Path) -> Proc {
    let a = addr.to_string();
    let mut p = Proc::start(
        &["run", "--config", cfg, "--data-dir", data, "--listen", &a],
        &[("LOG_LEVEL", "info")],
        cwd,
    );
    p.wait_for("serving", Duration::from_secs(30));
    p
}

fn list(addr: SocketAddr, what: &str) -> Vec<Value> {
    get(&format!("http://{addr}/api/v1/{what}?limit=1000"))
        .and_then(|v| v[what].as_array().cloned())
        .unwrap_or_default()
}

/// Keeps a fault active on every component (a healed one is injected
/// again), so that every kill finds work under way.
fn storm(sim: &Simulator) {
    let kinds = [
        FaultKind::LoadSpike,
        FaultKind::NodeCrash,
        FaultKind::BadPolicy,
        FaultKind::LoadSpike,
    ];
    let state = sim.state();
    for (c, kind) in COMPONENTS.iter().zip(kinds) {
        let active = state["components"][c]["active_faults"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        if !active {
            let _ = sim.inject_at(c, kind);
        }
    }
}

#[test]
fn kill_9_twenty_times_during_a_fault_storm_loses_nothing_and_applies_nothing_twice() {
    let ch = slow_charter();
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg_path = dir.path().join("mapek.yaml");
    std::fs::write(
        &cfg_path,
        format!(
            "monitor:\n  interval_seconds: 1\n\
             charter:\n  url: http://{charter}\n\
             execute:\n  verification_window_seconds: 3\n  call_timeout_seconds: 10\n  retries: 0\n  preflight_validate: false\n\
             plan:\n  cooldown_seconds: 1\n\
             prometheus:\n  enabled: true\n  url: {prom}\n  timeout_seconds: 2\n  retries: 0\n\
             alertmanager:\n  enabled: false\n\
             safety:\n  disruption_budget:\n    max_actions: 10000\n  component_rate_limit:\n    max_actions: 10000\n  breaker:\n    failures: 1000\n  flapping:\n    relapses: 1000\n",
            charter = ch.addr,
            prom = prom.url(),
        ),
    )
    .expect("config");
    let cfg = cfg_path.display().to_string();
    let data = dir.path().join("data").display().to_string();

    let mut moments = Moments(0x9E37_79B9_7F4A_7C15);
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    let mut kills = 0;
    let mut killed_mid_call = 0;
    for round in 0..KILLS {
        storm(&ch.sim);
        let addr = free_addr();
        let mut p = start(&cfg, &data, addr, dir.path());
        // Let it act for a random moment, then note what it acknowledged
        // (the outcomes it shows) and kill it without warning.
        std::thread::sleep(Duration::from_millis(moments.next_ms(800, 4000)));
        for o in list(addr, "outcomes") {
            if let Some(id) = o["execution_id"].as_str() {
                acknowledged.insert(id.to_string());
            }
        }
        let killed_at = chrono::Utc::now();
        p.child.kill().expect("kill -9");
        p.child.wait().expect("reap");
        kills += 1;
        // A Charter call applied less than CHARTER_LATENCY before the kill
        // had not been answered yet: the kill landed mid-call.
        let latency = chrono::Duration::from_std(CHARTER_LATENCY).expect("latency");
        let mid_call = ch.sim.calls().iter().any(|c| {
            c.method == "POST"
                && chrono::DateTime::parse_from_rfc3339(&c.at)
                    .is_ok_and(|at| at <= killed_at && killed_at - at.to_utc() < latency)
        });
        if mid_call {
            killed_mid_call += 1;
        }
        eprintln!(
            "kill {}: {} outcomes acknowledged so far",
            round + 1,
            acknowledged.len()
        );
    }

    // The last start: everything unfinished is closed or re-measured.
    ch.sim.clear_faults();
    let addr = free_addr();
    let mut p = start(&cfg, &data, addr, dir.path());
    let settled = wait_until(
        Duration::from_secs(90),
        "every execution finished and re-measured",
        || {
            let execs = list(addr, "executions");
            let open = execs.iter().any(|e| {
                e["status"] == "IN_PROGRESS" || (e["interrupted"] == true && e["outcome"].is_null())
            });
            (!execs.is_empty() && !open).then_some(execs)
        },
    );
    let outcomes: BTreeSet<String> = list(addr, "outcomes")
        .iter()
        .filter_map(|o| o["execution_id"].as_str().map(String::from))
        .collect();
    let lost: Vec<&String> = acknowledged.difference(&outcomes).collect();

    // What the Charter applied, per idempotency key.
    let calls = ch.sim.calls();
    assert!(
        calls.len() < mapek::sim::MAX_CALLS,
        "the Charter's call log overflowed: the count would be incomplete"
    );
    let mut sent: BTreeMap<String, usize> = BTreeMap::new();
    let mut applied: BTreeMap<String, usize> = BTreeMap::new();
    for c in calls.iter().filter(|c| c.method == "POST") {
        let Some(k) = &c.idempotency_key else {
            continue;
        };
        *sent.entry(k.clone()).or_default() += 1;
        if !c.replayed && c.status == 200 {
            *applied.entry(k.clone()).or_default() += 1;
        }
    }
    let twice: Vec<_> = applied.iter().filter(|(_, n)| **n > 1).collect();
    let resent: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();

    // Every applied key is on record in an execution, with its request.
    let mut on_record: BTreeMap<String, String> = BTreeMap::new();
    let mut unknown = 0;
    for e in &settled {
        for a in e["actions"].as_array().into_iter().flatten() {
            if a["status"] == "UNKNOWN" {
                unknown += 1;
            }
            if let Some(k) = a["request"]["parameters"]["idempotency_key"].as_str() {
                on_record.insert(
                    k.to_string(),
                    a["status"].as_str().unwrap_or("").to_string(),
                );
            }
        }
    }
    let missing: Vec<&String> = applied
        .keys()
        .filter(|k| !on_record.contains_key(*k))
        .collect();
    let running = settled
        .iter()
        .filter(|e| e["status"] == "IN_PROGRESS")
        .count();
    let interrupted = settled.iter().filter(|e| e["interrupted"] == true).count();
    eprintln!(
        "fault suite: {kills} kills ({killed_mid_call} with Charter calls under way), \
         {} acknowledged outcomes, {} kept, {} lost; {} keys applied, {} applied twice, \
         {} sent twice; {} executions, {running} running, {interrupted} interrupted, \
         {unknown} actions UNKNOWN; {} applied actions not on record",
        acknowledged.len(),
        acknowledged.len() - lost.len(),
        lost.len(),
        applied.len(),
        twice.len(),
        resent.len(),
        settled.len(),
        missing.len(),
    );
    let out = p.output();
    assert!(
        lost.is_empty(),
        "acknowledged outcomes lost: {lost:?}\n{out}"
    );
    assert!(twice.is_empty(), "applied twice: {twice:?}");
    assert!(resent.is_empty(), "sent again after a restart: {resent:?}");
    assert!(missing.is_empty(), "applied but not on record: {missing:?}");
    assert_eq!(running, 0);
    assert!(!applied.is_empty(), "the storm made mapek act");
    assert!(
        !acknowledged.is_empty(),
        "outcomes were acknowledged between kills"
    );
    assert!(!out.contains("panicked"), "a panic after the kills:\n{out}");
}
