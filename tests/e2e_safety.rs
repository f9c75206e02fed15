//! The safety scenarios end to end against a REAL Prometheus scraping the
//! simulated Charter, and the `mapek` binary: a memory leak whose default
//! remedy is wrong is learned (the leak comes back after a scale-up, a
//! restart heals it; the second leak is restarted at once), and a flapping
//! component is stopped. The simulator runs on a clock three times faster
//! than the wall clock, so its 75 s leak relief and 30 s flap period take
//! 25 s and 10 s here. A missing Prometheus fails these tests.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mapek::sim::{FastClock, FaultKind, Topology};
use serde_json::Value;
use support::live::{charter_on, get, mapek, wait_until, Charter, Mapek};
use support::servers::prometheus;

fn charter() -> Charter {
    charter_on(Topology::default(), Arc::new(FastClock::new(3)))
}

impl Mapek {
    /// Executions, newest first.
    fn executions(&self) -> Vec<Value> {
        get(&self.url("/api/v1/executions?limit=200"))
            .and_then(|v| v["executions"].as_array().cloned())
            .unwrap_or_default()
    }
}

fn config(charter: SocketAddr, prometheus: &str, safety: &str) -> String {
    format!(
        "monitor:\n  interval_seconds: 1\n\
         charter:\n  url: http://{charter}\n\
         execute:\n  verification_window_seconds: 6\n  call_timeout_seconds: 5\n  preflight_validate: false\n\
         plan:\n  cooldown_seconds: 3\n  learning:\n    seed: 11\n\
         prometheus:\n  enabled: true\n  url: {prometheus}\n  timeout_seconds: 2\n  retries: 0\n\
         alertmanager:\n  enabled: false\n\
         {safety}"
    )
}

/// The remedy of an execution (its policy's actions: an execution still
/// verifying lists none yet).
fn remedy_of(m: &Mapek, e: &Value) -> Vec<String> {
    let own = actions_of(e);
    if !own.is_empty() {
        return own;
    }
    let id = e["policy_id"].as_str().unwrap_or_default();
    get(&m.url(&format!("/api/v1/policies/{id}")))
        .map(|p| actions_of(&p))
        .unwrap_or_default()
}

fn actions_of(e: &Value) -> Vec<String> {
    e["actions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["action_type"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_memory_leak_is_learned_the_restart_wins_and_is_chosen_at_once_next_time() {
    let ch = charter();
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    // Breakers and flapping would stop the lesson early (they are what
    // stops a wrong remedy in production); here the learner alone acts.
    // The recurrence window is longer than the leak's relief after a
    // scale-up (75 s at x3: 25 s) and shorter than the wait before the
    // second leak (a new leak, not a recurrence).
    let safety = "safety:\n  recurrence_window_seconds: 40\n  breaker:\n    failures: 50\n  flapping:\n    relapses: 50\n  component_rate_limit:\n    max_actions: 100\n";
    let mut m = mapek(&config(ch.addr, &prom.url(), safety));
    wait_until(Duration::from_secs(30), "the prometheus source up", || {
        let s = get(&m.url("/api/v1/state"))?;
        (s["sources"][0]["status"] == "up").then_some(())
    });
    ch.sim
        .inject(FaultKind::MemoryLeak)
        .expect("inject memory_leak");
    let healed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(600), "the leak healed", || {
            (ch.sim.active_faults().is_empty()).then_some(())
        })
    }));
    if healed.is_err() {
        panic!("leak not healed; mapek said:\n{}", m.proc.output());
    }
    let first = m.executions();
    let episodes = first.len();
    assert!(episodes >= 1);
    let restart = ch
        .sim
        .calls()
        .iter()
        .any(|c| c.path == "/api/v1/committee/restart");
    assert!(restart, "only a restart heals a leak");
    // The outcomes of remedies that did not hold are RECURRED or failures.
    let outcomes = get(&m.url("/api/v1/outcomes?limit=100")).expect("outcomes");
    let recurred = outcomes["outcomes"]
        .as_array()
        .map(|o| o.iter().filter(|x| x["outcome_type"] == "RECURRED").count())
        .unwrap_or(0);
    eprintln!(
        "first leak: {episodes} episode(s), {recurred} RECURRED; remedies: {:?}",
        first
            .iter()
            .rev()
            .map(|e| remedy_of(&m, e))
            .collect::<Vec<_>>()
    );
    // Wait for the restart's verification, then a second leak: the lesson
    // holds, the restart comes first (or second at worst).
    wait_until(Duration::from_secs(60), "the restart verified", || {
        m.executions()
            .iter()
            .any(|e| {
                actions_of(e).contains(&"RESTART_SERVICE".to_string()) && e["outcome"] == "SUCCESS"
            })
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(42));
    let before = m.executions().len();
    ch.sim
        .inject(FaultKind::MemoryLeak)
        .expect("inject memory_leak again");
    wait_until(Duration::from_secs(300), "the second leak healed", || {
        (ch.sim.active_faults().is_empty()).then_some(())
    });
    let all = m.executions();
    let second: Vec<Vec<String>> = all[..all.len() - before]
        .iter()
        .rev()
        .map(|e| remedy_of(&m, e))
        .collect();
    eprintln!("second leak: {second:?}");
    // Thompson sampling may still try one other remedy, never many.
    assert!(
        second.len() <= 3
            && second
                .iter()
                .any(|a| a.contains(&"RESTART_SERVICE".to_string())),
        "the second leak should be restarted within three remedies: {second:?}"
    );
    // What was learned: the restart heals (every time), the seeds' remedy
    // does not hold.
    let learning = wait_until(
        Duration::from_secs(30),
        "the second restart learned",
        || {
            let l = get(&m.url("/api/v1/knowledge/learning"))?;
            let cause = l["causes"].as_object()?.values().next()?.clone();
            let remedies = cause["remedies"].as_array()?.clone();
            let restart = remedies.iter().find(|r| r["remedy"] == "RESTART_SERVICE")?;
            (restart["successes"].as_u64()? >= 2).then_some(remedies)
        },
    );
    let restart = learning
        .iter()
        .find(|r| r["remedy"] == "RESTART_SERVICE")
        .expect("restart");
    assert_eq!(restart["failures"], 0, "{learning:?}");
    let default = learning
        .iter()
        .find(|r| r["remedy"] == "SCALE_UP+UPDATE_CONFIGURATION")
        .expect("the seeds' remedy was tried first");
    assert!(
        default["failures"].as_u64().unwrap_or(0) >= 1,
        "{learning:?}"
    );
    assert_eq!(default["successes"], 0, "{learning:?}");
    m.proc.term();
    assert!(m.proc.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn a_flapping_component_is_stopped_and_escalated() {
    let ch = charter();
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    let safety = "safety:\n  flapping:\n    relapses: 2\n    window_seconds: 600\n  breaker:\n    failures: 50\n";
    let mut m = mapek(&config(ch.addr, &prom.url(), safety));
    wait_until(Duration::from_secs(30), "the prometheus source up", || {
        let s = get(&m.url("/api/v1/state"))?;
        (s["sources"][0]["status"] == "up").then_some(())
    });
    ch.sim.inject(FaultKind::Flapping).expect("inject flapping");
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            Duration::from_secs(240),
            "the component found flapping",
            || {
                let s = get(&m.url("/api/v1/safety"))?;
                s["flapping"]
                    .as_array()?
                    .iter()
                    .any(|f| f["component"] == "charter")
                    .then_some(())
            },
        )
    }));
    if found.is_err() {
        panic!("not found flapping; mapek said:\n{}", m.proc.output());
    }
    let remedies = |ch: &Charter| {
        ch.sim
            .calls()
            .iter()
            .filter(|c| c.method == "POST" && !c.path.starts_with("/sim"))
            .count()
    };
    // Let whatever was already running finish, then count.
    std::thread::sleep(Duration::from_secs(10));
    let calls_then = remedies(&ch);
    // Three more flap periods (10 s each here): no automatic action.
    std::thread::sleep(Duration::from_secs(35));
    assert_eq!(
        remedies(&ch),
        calls_then,
        "no action on a flapping component"
    );
    let inc = get(&m.url("/api/v1/incidents?state=escalated")).expect("incidents");
    assert!(
        inc["incidents"].as_array().is_some_and(|a| a
            .iter()
            .any(|i| i["reason"].as_str().is_some_and(|r| r.contains("flapping")))),
        "{inc}"
    );
    let metrics = reqwest::blocking::get(m.url("/metrics"))
        .and_then(|r| r.text())
        .expect("metrics");
    assert!(
        metrics.contains("mape_k_flapping_components 1"),
        "{metrics}"
    );
    m.proc.term();
    assert!(m.proc.wait_exit(Duration::from_secs(20)).success());
}
