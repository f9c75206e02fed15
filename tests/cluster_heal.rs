//! Cluster mode end to end: two `mapek run` replicas on a REAL etcd, a REAL
//! Prometheus scraping the simulated Charter, faults healed by whoever
//! leads. Every action is applied at most once (counted at the Charter by
//! `Idempotency-Key`), and a deposed leader calls nothing (fencing tokens,
//! counted at the Charter). etcd or Prometheus missing fails the tests.
#![cfg(feature = "cluster")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mapek::sim::{FaultKind, Simulator, Topology};
use mapek_actors::clock::SystemClock;
use serde_json::Value;
use support::live::{get, wait_until};
use support::servers::{etcd, prometheus};
use support::{free_addr, Proc};

const LEASE: u64 = 3;

/// The simulated Charter on loopback; applied POSTs answer 300 ms late (a
/// kill lands while remedies are under way).
struct Charter {
    sim: Simulator,
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

fn charter() -> Charter {
    charter_with(None)
}

/// [`charter`]; with `hang`, the first mutating call is held without being
/// applied (`hang` is set when it arrives), as a call in flight when its
/// sender dies.
fn charter_with(hang: Option<Arc<std::sync::atomic::AtomicBool>>) -> Charter {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sim = Simulator::with_topology(Topology::default(), Arc::new(SystemClock));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = mapek::sim::router(sim.clone(), None).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let hang = hang.clone();
            async move {
                let slow = req.method() == axum::http::Method::POST
                    && req.uri().path().starts_with("/api/");
                if let Some(h) = hang.filter(|_| slow) {
                    if !h.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                }
                let res = next.run(req).await;
                if slow {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                res
            }
        },
    ));
    rt.spawn(async move { axum::serve(listener, router).await });
    Charter { sim, addr, _rt: rt }
}

fn replica(
    dir: &std::path::Path,
    etcd: &str,
    prometheus: &str,
    charter: SocketAddr,
    name: &str,
) -> (Proc, SocketAddr) {
    replica_with_shards(dir, etcd, prometheus, charter, name, 1)
}

fn replica_with_shards(
    dir: &std::path::Path,
    etcd: &str,
    prometheus: &str,
    charter: SocketAddr,
    name: &str,
    shards: u32,
) -> (Proc, SocketAddr) {
    run_replica(
        dir,
        name,
        format!(
            "monitor:\n  interval_seconds: 1\n\
             prometheus:\n  url: {prometheus}\n  timeout_seconds: 2\n  retries: 0\n\
             alertmanager:\n  enabled: false\n\
             charter:\n  url: http://{charter}\n\
             execute:\n  verification_window_seconds: 3\n  call_timeout_seconds: 5\n  retries: 0\n  preflight_validate: false\n\
             plan:\n  cooldown_seconds: 1\n\
             safety:\n  breaker:\n    failures: 100\n  flapping:\n    relapses: 100\n\
             cluster:\n  etcd_endpoints: [\"{etcd}\"]\n  name: {name}\n  lease_seconds: {LEASE}\n  prefix: /heal\n  shards: {shards}\n"
        ),
    )
}

/// Starts `mapek run` named `name` in `dir` with `config` (its own data
/// directory and a free port); returns once it serves.
fn run_replica(dir: &std::path::Path, name: &str, config: String) -> (Proc, SocketAddr) {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, config).expect("config");
    let data = dir.join(format!("data-{name}")).display().to_string();
    let addr = free_addr();
    let (c, a) = (cfg.display().to_string(), addr.to_string());
    let mut p = Proc::start(
        &["run", "--config", &c, "--data-dir", &data, "--listen", &a],
        &[("LOG_LEVEL", "info")],
        dir,
    );
    p.wait_for("serving", Duration::from_secs(30));
    (p, addr)
}

fn cluster(addr: SocketAddr) -> Value {
    get(&format!("http://{addr}/api/v1/cluster")).unwrap_or(Value::Null)
}

/// Waits until exactly one of `a`, `b` leads; (leader, standby) indexes.
fn leader_of(addrs: [SocketAddr; 2]) -> (usize, usize) {
    wait_until(Duration::from_secs(20), "one leader of two", || {
        let (ca, cb) = (cluster(addrs[0]), cluster(addrs[1]));
        match (ca["leading"].as_bool(), cb["leading"].as_bool()) {
            (Some(true), Some(false)) => Some((0, 1)),
            (Some(false), Some(true)) => Some((1, 0)),
            _ => None,
        }
    })
}

/// Applications per idempotency key at the Charter (not replays).
fn applied_per_key(sim: &Simulator) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for c in sim.calls() {
        if c.method == "POST" && c.status == 200 && !c.replayed {
            if let Some(k) = c.idempotency_key {
                *m.entry(k).or_insert(0) += 1;
            }
        }
    }
    m
}

#[test]
fn kill_9_the_leader_mid_incident_the_standby_heals_it_and_nothing_runs_twice() {
    let ch = charter();
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    let etcd = etcd();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, aa) = replica(dir.path(), &etcd.url(), &prom.url(), ch.addr, "a");
    let (pb, ab) = replica(dir.path(), &etcd.url(), &prom.url(), ch.addr, "b");
    let addrs = [aa, ab];
    let mut procs = [Some(pa), Some(pb)];
    let (l, s) = leader_of(addrs);
    ch.sim.inject(FaultKind::NodeCrash).expect("inject");
    // The leader acts: its first call reaches the Charter; then it dies.
    wait_until(Duration::from_secs(60), "the leader's first call", || {
        ch.sim
            .calls()
            .iter()
            .any(|c| c.method == "POST" && c.fencing_token.is_some())
            .then_some(())
    });
    let mut leader = procs[l].take().expect("leader");
    leader.child.kill().expect("kill -9");
    let _ = leader.child.wait();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(LEASE + 2),
        "the standby leads within lease_seconds + 2 s",
        || (cluster(addrs[s])["leading"] == true).then_some(()),
    );
    let takeover = killed.elapsed();
    let old_token = ch
        .sim
        .calls()
        .iter()
        .filter_map(|c| c.fencing_token)
        .min()
        .expect("the first leader's token");
    // The first fault healed (by the old leader's call, or by the new
    // leader): whatever the new leader sent for it used the old leader's
    // name of the incident (its claim), so a recorded action is never
    // sent again under another key.
    wait_until(Duration::from_secs(90), "the first fault healed", || {
        ch.sim.active_faults().is_empty().then_some(())
    });
    let incident_of = |k: &str| k.split('/').next().unwrap_or_default().to_string();
    let calls = ch.sim.calls();
    let old_names: std::collections::BTreeSet<String> = calls
        .iter()
        .filter(|c| c.fencing_token == Some(old_token))
        .filter_map(|c| c.idempotency_key.as_deref().map(incident_of))
        .collect();
    let new_names: std::collections::BTreeSet<String> = calls
        .iter()
        .filter(|c| c.fencing_token.is_some_and(|t| t != old_token))
        .filter_map(|c| c.idempotency_key.as_deref().map(incident_of))
        .collect();
    assert!(
        new_names.is_subset(&old_names),
        "the new leader acted on the first incident under its own name: {new_names:?} vs {old_names:?}"
    );
    // Whatever the first leader had not finished, and new work: the new
    // leader carries on.
    ch.sim.inject(FaultKind::BadPolicy).expect("inject");
    let healed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(90), "the fault healed", || {
            ch.sim.active_faults().is_empty().then_some(())
        })
    }));
    let standby = procs[s].as_mut().expect("standby");
    if healed.is_err() {
        panic!("not healed; the standby said:\n{}", standby.output());
    }
    let healed_after = killed.elapsed();
    let applied = applied_per_key(&ch.sim);
    let twice: Vec<_> = applied.iter().filter(|(_, n)| **n > 1).collect();
    let tokens: std::collections::BTreeSet<i64> = ch
        .sim
        .calls()
        .iter()
        .filter_map(|c| c.fencing_token)
        .collect();
    let untokened = ch
        .sim
        .calls()
        .iter()
        .filter(|c| c.method == "POST" && c.fencing_token.is_none())
        .count();
    eprintln!(
        "cluster heal: first incident named {old_names:?} by the old leader, {new_names:?} by the \
         new one; takeover {takeover:?} (lease {LEASE} s), healed {healed_after:?} after the kill; {} keys applied, {} applied twice; fencing tokens seen {tokens:?}; {untokened} \
         calls without a token",
        applied.len(),
        twice.len()
    );
    assert!(twice.is_empty(), "applied twice: {twice:?}");
    assert_eq!(
        untokened, 0,
        "every call carries its leader's fencing token"
    );
    assert!(tokens.len() >= 2, "both leaders acted: {tokens:?}");
    assert!(!standby.output().contains("panicked"));
}

/// The leader dies while its first call is in flight (never applied): the
/// new leader, which named the incident itself, finds the old leader's
/// claim, verifies the recorded action without sending it, then acts
/// under the old leader's name with the next attempt. Nothing is applied
/// twice, nothing under a second name.
#[test]
fn a_call_in_flight_at_the_kill_is_verified_then_retried_under_the_same_name() {
    let hung = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ch = charter_with(Some(hung.clone()));
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    let etcd = etcd();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, aa) = replica(dir.path(), &etcd.url(), &prom.url(), ch.addr, "a");
    let (pb, ab) = replica(dir.path(), &etcd.url(), &prom.url(), ch.addr, "b");
    let addrs = [aa, ab];
    let mut procs = [Some(pa), Some(pb)];
    let (l, s) = leader_of(addrs);
    ch.sim.inject(FaultKind::NodeCrash).expect("inject");
    wait_until(
        Duration::from_secs(60),
        "the leader's first call in flight",
        || hung.load(std::sync::atomic::Ordering::SeqCst).then_some(()),
    );
    // The old leader's name of the incident, from its claim in etcd.
    let claims = etcd_client_get(&etcd.url(), "/heal/incident-claims/");
    let claim: Value = serde_json::from_str(claims.lines().next().expect("a claim")).expect("json");
    let name = claim["incident"].as_str().expect("incident").to_string();
    let mut leader = procs[l].take().expect("leader");
    leader.child.kill().expect("kill -9");
    let _ = leader.child.wait();
    let healed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(90), "the fault healed", || {
            ch.sim.active_faults().is_empty().then_some(())
        })
    }));
    let standby = procs[s].as_mut().expect("standby");
    if healed.is_err() {
        panic!("not healed; the standby said:\n{}", standby.output());
    }
    let applied: Vec<String> = applied_per_key(&ch.sim).into_keys().collect();
    eprintln!("in flight at the kill: the old leader's name {name}; applied {applied:?}");
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert!(
        applied[0].starts_with(&format!("{name}/"))
            && !applied[0].starts_with(&format!("{name}/1/")),
        "applied {applied:?}: expected {name}, past attempt 1"
    );
    let execs = get(&format!("http://{}/api/v1/executions", addrs[s])).expect("executions");
    assert!(
        execs["executions"]
            .as_array()
            .expect("executions")
            .iter()
            .any(|e| e["interrupted"] == true
                && e.to_string().contains("recorded by a previous leader")
                && (e["acted_as"] == format!("{name}/1")
                    || (e["acted_as"].is_null() && e["incident_id"] == name.as_str()))),
        "the recorded attempt was only verified: {execs}"
    );
}

/// A leader that dies after recording an action leaves the incident's
/// claim (its name and attempt) in etcd. The next leader names the
/// incident itself, yet acts under the claimed name: the recorded action
/// is verified, never sent again, and the next attempt goes past it.
#[test]
fn a_new_leader_acts_under_the_name_the_previous_leader_gave_the_incident() {
    let ch = charter();
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    let etcd = etcd();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.url()], None)
            .await
            .expect("etcd");
        let mut roots = ch.sim.components();
        roots.push("charter".into());
        for root in roots {
            let claim = serde_json::json!({
                "root": root, "incident": "inc-previous", "attempt": 1, "by": "gone",
                "local": "inc-gone", "offset": 0,
                // Its last execution: after the incident opened.
                "updated_ms": chrono::Utc::now().timestamp_millis() + 60_000,
            });
            c.put(
                format!("/heal/{}", mapek_actors::execute::run::claim_key(&root)),
                claim.to_string(),
                None,
            )
            .await
            .expect("claim");
        }
        c.put(
            "/heal/intents/inc-previous/1/a1",
            r#"{"by":"gone","request":{}}"#,
            None,
        )
        .await
        .expect("intent");
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut p, addr) = replica(dir.path(), &etcd.url(), &prom.url(), ch.addr, "a");
    wait_until(Duration::from_secs(20), "a leads", || {
        (cluster(addr)["leading"] == true).then_some(())
    });
    ch.sim.inject(FaultKind::NodeCrash).expect("inject");
    let healed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(90), "the fault healed", || {
            ch.sim.active_faults().is_empty().then_some(())
        })
    }));
    if healed.is_err() {
        panic!("not healed; mapek said:\n{}", p.output());
    }
    let applied: Vec<String> = applied_per_key(&ch.sim).into_keys().collect();
    assert!(!applied.is_empty(), "something was applied");
    for k in &applied {
        assert!(
            k.starts_with("inc-previous/") && !k.starts_with("inc-previous/1/"),
            "applied {k}: expected the claimed name, past the recorded attempt ({applied:?})"
        );
    }
    let execs = get(&format!("http://{addr}/api/v1/executions")).expect("executions");
    let verified_only = execs["executions"]
        .as_array()
        .expect("executions")
        .iter()
        .any(|e| e["acted_as"] == "inc-previous/1" && e["interrupted"] == true);
    assert!(
        verified_only,
        "the recorded attempt was only verified: {execs}"
    );
    eprintln!("claimed name: applied {applied:?}");
}

fn ids_of(addr: SocketAddr, what: &str) -> std::collections::BTreeSet<String> {
    let field = if what == "outcomes" {
        "execution_id"
    } else {
        "id"
    };
    get(&format!("http://{addr}/api/v1/{what}"))
        .and_then(|v| {
            v[what].as_array().map(|xs| {
                xs.iter()
                    .filter_map(|x| x[field].as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// What the leader learns reaches the standby's own Knowledge (its API
/// shows the same executions and outcomes), and a new leader works with
/// the old one's guard state: a pause set on the old leader holds on the
/// new one.
#[test]
fn the_standby_learns_what_the_leader_learns_and_keeps_its_pause() {
    let ch = charter();
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    let etcd = etcd();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, aa) = replica(dir.path(), &etcd.url(), &prom.url(), ch.addr, "a");
    let (pb, ab) = replica(dir.path(), &etcd.url(), &prom.url(), ch.addr, "b");
    let addrs = [aa, ab];
    let mut procs = [Some(pa), Some(pb)];
    let (l, s) = leader_of(addrs);
    ch.sim.inject(FaultKind::NodeCrash).expect("inject");
    wait_until(Duration::from_secs(90), "the fault healed", || {
        ch.sim.active_faults().is_empty().then_some(())
    });
    // The leader records the outcome after its verification window.
    let outcomes = wait_until(Duration::from_secs(30), "an outcome on the leader", || {
        let o = ids_of(addrs[l], "outcomes");
        (!o.is_empty()).then_some(o)
    });
    let executions = ids_of(addrs[l], "executions");
    wait_until(
        Duration::from_secs(15),
        "the leader's executions and outcomes on the standby",
        || {
            (executions.is_subset(&ids_of(addrs[s], "executions"))
                && outcomes.is_subset(&ids_of(addrs[s], "outcomes")))
            .then_some(())
        },
    );
    // Pause, asking the standby: it forwards the call to the leader.
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{}/api/v1/pause", addrs[s]))
        .json(&serde_json::json!({"by": "sre", "reason": "change freeze"}))
        .send()
        .expect("pause");
    assert!(r.status().is_success(), "pause: {}", r.status());
    let leader_name = if l == 0 { "a" } else { "b" };
    assert_eq!(
        r.headers()
            .get("x-mapek-applied-by")
            .and_then(|v| v.to_str().ok()),
        Some(leader_name),
        "applied by the leader"
    );
    let on_leader = get(&format!("http://{}/api/v1/safety", addrs[l])).expect("safety");
    assert_eq!(on_leader["paused"], true, "{on_leader}");
    // Approving an unknown policy on the standby: answered there (404).
    let r = reqwest::blocking::Client::new()
        .post(format!(
            "http://{}/api/v1/policies/pol-nope/approve",
            addrs[s]
        ))
        .json(&serde_json::json!({}))
        .send()
        .expect("approve");
    assert_eq!(r.status().as_u16(), 404);
    // The pause is published as guard state.
    wait_until(Duration::from_secs(10), "the pause replicated", || {
        let c = etcd_client_get(&etcd.url(), "/heal/knowledge/guards/");
        c.contains("change freeze").then_some(())
    });
    let learned = get(&format!("http://{}/api/v1/knowledge/learning", addrs[l])).expect("learning");
    let mut leader = procs[l].take().expect("leader");
    leader.child.kill().expect("kill -9");
    let _ = leader.child.wait();
    wait_until(Duration::from_secs(LEASE + 2), "the standby leads", || {
        (cluster(addrs[s])["leading"] == true).then_some(())
    });
    let safety = wait_until(Duration::from_secs(5), "the new leader paused", || {
        let v = get(&format!("http://{}/api/v1/safety", addrs[s]))?;
        (v["paused"] == true).then_some(v)
    });
    assert!(safety.to_string().contains("change freeze"), "{safety}");
    // Its learned statistics are the old leader's (the outcome folded
    // once, here too).
    let learning =
        get(&format!("http://{}/api/v1/knowledge/learning", addrs[s])).expect("learning");
    assert!(learned.to_string().contains("successes"), "{learned}");
    assert_eq!(learning, learned, "the same learned statistics");
    eprintln!(
        "knowledge followed: {} executions, {} outcomes on the standby; the new leader is paused",
        executions.len(),
        outcomes.len()
    );
}

/// The values under `prefix` in etcd, concatenated (empty when etcd does
/// not answer).
fn etcd_client_get(url: &str, prefix: &str) -> String {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let Ok(mut c) = etcd_client::Client::connect([url], None).await else {
            return String::new();
        };
        c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .map(|r| {
                r.kvs()
                    .iter()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    })
}

/// With two shards led by two replicas, a pause asked of either is
/// applied by both leaders (fanned out), and so is the resume.
#[test]
fn pause_and_resume_reach_every_leader() {
    let ch = charter();
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    let etcd = etcd();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_pa, aa) = replica_with_shards(dir.path(), &etcd.url(), &prom.url(), ch.addr, "a", 2);
    let (_pb, ab) = replica_with_shards(dir.path(), &etcd.url(), &prom.url(), ch.addr, "b", 2);
    wait_until(Duration::from_secs(20), "one shard each", || {
        let (x, y) = (cluster(aa), cluster(ab));
        (x["leading_shards"].as_array().map(Vec::len) == Some(1)
            && y["leading_shards"].as_array().map(Vec::len) == Some(1))
        .then_some(())
    });
    let post = |addr: SocketAddr, what: &str| {
        reqwest::blocking::Client::new()
            .post(format!("http://{addr}/api/v1/{what}"))
            .json(&serde_json::json!({"by": "sre", "reason": "drill"}))
            .send()
            .expect("post")
    };
    let paused = |addr: SocketAddr| {
        get(&format!("http://{addr}/api/v1/safety")).map(|v| v["paused"] == true)
    };
    let r = post(aa, "pause");
    assert!(r.status().is_success(), "{}", r.status());
    let by = r
        .headers()
        .get("x-mapek-applied-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut names: Vec<&str> = by.split(',').collect();
    names.sort_unstable();
    assert_eq!(names, ["a", "b"], "applied by both leaders");
    assert_eq!((paused(aa), paused(ab)), (Some(true), Some(true)));
    // Bad input is refused as such (400, not a gateway error), by the
    // replica asked, and changes nothing anywhere.
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{ab}/api/v1/resume"))
        .header("content-type", "application/json")
        .body("garbage")
        .send()
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.headers().get("x-mapek-applied-by").is_none());
    let body: Value = r.json().expect("json error");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!((paused(aa), paused(ab)), (Some(true), Some(true)));
    let r = post(ab, "resume");
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!((paused(aa), paused(ab)), (Some(false), Some(false)));
}

/// The disruption budget is the cluster's: two replicas each leading one
/// of two shards, a budget of two disruptive actions, four components
/// (two per shard) crashing at once: two restarts in all, never more, and
/// the rest held by the budget.
#[test]
fn the_disruption_budget_is_shared_by_every_leader() {
    use mapek_actors::leadership::shard_of;
    let mut by_shard: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for i in 0..64 {
        let n = format!("node{i:02}");
        let s = shard_of(&n, 2) as usize;
        if by_shard[s].len() < 2 {
            by_shard[s].push(n);
        }
    }
    let names: Vec<String> = by_shard.concat();
    assert_eq!(names.len(), 4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sim = Simulator::with_topology(
        Topology::new(&names).expect("topology"),
        Arc::new(SystemClock),
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let charter = listener.local_addr().expect("addr");
    let router = mapek::sim::router(sim.clone(), None);
    rt.spawn(async move { axum::serve(listener, router).await });
    let prom = prometheus(&[("charter", charter)], None, None);
    let etcd = etcd();
    let dir = tempfile::tempdir().expect("tempdir");
    let start = |name: &str| {
        run_replica(
            dir.path(),
            name,
            format!(
                "monitor:\n  interval_seconds: 1\n\
                 prometheus:\n  url: {}\n  timeout_seconds: 2\n  retries: 0\n\
                 alertmanager:\n  enabled: false\n\
                 charter:\n  url: http://{charter}\n\
                 execute:\n  verification_window_seconds: 2\n  call_timeout_seconds: 5\n  preflight_validate: false\n\
                 plan:\n  cooldown_seconds: 1\n\
                 safety:\n  disruption_budget:\n    max_actions: 2\n    window_seconds: 600\n  breaker:\n    failures: 100\n  flapping:\n    relapses: 100\n\
                 cluster:\n  etcd_endpoints: [\"{}\"]\n  name: {name}\n  lease_seconds: {LEASE}\n  shards: 2\n  prefix: /budget\n",
                prom.url(),
                etcd.url()
            ),
        )
    };
    let (_pa, aa) = start("a");
    let (_pb, ab) = start("b");
    wait_until(Duration::from_secs(20), "one shard each", || {
        let (x, y) = (cluster(aa), cluster(ab));
        (x["leading_shards"].as_array().map(Vec::len) == Some(1)
            && y["leading_shards"].as_array().map(Vec::len) == Some(1))
        .then_some(())
    });
    for n in &names {
        sim.inject_at(n, FaultKind::NodeCrash).expect("inject");
    }
    let active = || -> usize {
        names
            .iter()
            .map(|n| sim.active_faults_at(n).map(|f| f.len()).unwrap_or(0))
            .sum()
    };
    let applied = || {
        sim.calls()
            .iter()
            .filter(|c| c.method == "POST" && c.status == 200 && !c.replayed)
            .count()
    };
    let held_by_budget = |addr: SocketAddr| -> bool {
        get(&format!("http://{addr}/api/v1/policies")).is_some_and(|v| {
            v["policies"].as_array().into_iter().flatten().any(|p| {
                p["guards"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|g| g["guard"] == "disruption_budget" && g["decision"] == "held")
            })
        })
    };
    let settled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            Duration::from_secs(60),
            "two faults healed, the others held by the budget",
            || {
                (active() == 2 && (held_by_budget(aa) || held_by_budget(ab)) && applied() == 2)
                    .then_some(())
            },
        )
    }));
    if settled.is_err() {
        panic!(
            "not settled: {} faults active, {} applied; policies on a: {}\non b: {}",
            active(),
            applied(),
            get(&format!("http://{aa}/api/v1/policies")).unwrap_or_default(),
            get(&format!("http://{ab}/api/v1/policies")).unwrap_or_default()
        );
    }
    let a_policies = get(&format!("http://{aa}/api/v1/policies")).unwrap_or_default();
    let b_policies = get(&format!("http://{ab}/api/v1/policies")).unwrap_or_default();
    eprintln!(
        "shared budget: {} actions applied for 4 crashes with a budget of 2; held on a: {}, on b: {}",
        applied(),
        held_by_budget(aa),
        held_by_budget(ab)
    );
    assert_eq!(applied(), 2, "a: {a_policies}\nb: {b_policies}");
    // Every policy belongs to its incident's shard (its root component's,
    // pinned when first planned).
    for (addr, ps) in [(aa, &a_policies), (ab, &b_policies)] {
        for p in ps["policies"].as_array().into_iter().flatten() {
            let root = p["scope"][0].as_str().expect("scope");
            assert_eq!(
                p["shard"].as_u64(),
                Some(u64::from(shard_of(root, 2))),
                "on {addr}: {p}"
            );
        }
    }
    // A leader that lost the race for the last slots holds its policies
    // (no execution after execution): at most one lost race per leader.
    let mut lost = std::collections::BTreeSet::new();
    for addr in [aa, ab] {
        let execs = get(&format!("http://{addr}/api/v1/executions")).unwrap_or_default();
        for e in execs["executions"].as_array().into_iter().flatten() {
            if e["error"]
                .as_str()
                .is_some_and(|x| x.starts_with("held by the cluster-wide disruption budget"))
            {
                lost.insert(e["id"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    assert!(
        lost.len() <= 2,
        "{} executions held by the budget: {lost:?}",
        lost.len()
    );
    // Each applied action holds one of the two slots in etcd (until the
    // window's lease ends).
    let slots = etcd_client_get(&etcd.url(), "/budget/budget-slots/");
    assert_eq!(slots.lines().count(), 2, "slots: {slots:?}");
}

#[test]
fn a_paused_leader_resumed_after_a_takeover_makes_no_call() {
    let ch = charter();
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    let etcd = etcd();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, aa) = replica(dir.path(), &etcd.url(), &prom.url(), ch.addr, "a");
    let (pb, ab) = replica(dir.path(), &etcd.url(), &prom.url(), ch.addr, "b");
    let addrs = [aa, ab];
    let procs = [pa, pb];
    let (l, s) = leader_of(addrs);
    let pid = procs[l].child.id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(ok.success());
    };
    // Pause the leader past its lease: the standby takes over.
    signal("-STOP");
    let stopped = Instant::now();
    wait_until(
        Duration::from_secs(LEASE + 2),
        "the standby leads while the leader is paused",
        || (cluster(addrs[s])["leading"] == true).then_some(()),
    );
    let takeover = stopped.elapsed();
    // Work arrives; the new leader heals it.
    ch.sim.inject(FaultKind::NodeCrash).expect("inject");
    wait_until(Duration::from_secs(90), "the new leader's call", || {
        ch.sim
            .calls()
            .iter()
            .any(|c| c.method == "POST" && c.status == 200)
            .then_some(())
    });
    let new_tokens: std::collections::BTreeSet<i64> = ch
        .sim
        .calls()
        .iter()
        .filter_map(|c| c.fencing_token)
        .collect();
    let new_leader_token = *new_tokens.iter().min().expect("a token");
    // Resume the old leader: it sees it no longer leads, and calls nothing,
    // though it sees the new fault as well as the new leader does.
    signal("-CONT");
    let resumed = chrono::Utc::now();
    ch.sim.inject(FaultKind::BadPolicy).expect("inject");
    wait_until(
        Duration::from_secs(20),
        "the old leader knows it no longer leads",
        || {
            let c = cluster(addrs[l]);
            (c["leading"] == false && c["shards"]["0"] != c["name"]).then_some(())
        },
    );
    // It keeps observing the fault while the new leader heals it.
    wait_until(Duration::from_secs(90), "the fault healed", || {
        ch.sim.active_faults().is_empty().then_some(())
    });
    let calls = ch.sim.calls();
    let from_old: Vec<_> = calls
        .iter()
        .filter(|c| {
            chrono::DateTime::parse_from_rfc3339(&c.at).is_ok_and(|at| at >= resumed)
                && c.fencing_token.is_none_or(|t| t < new_leader_token)
        })
        .collect();
    eprintln!(
        "paused leader: takeover {takeover:?} (lease {LEASE} s); {} calls after the resume, {} \
         from the old leader",
        calls
            .iter()
            .filter(|c| chrono::DateTime::parse_from_rfc3339(&c.at).is_ok_and(|at| at >= resumed))
            .count(),
        from_old.len()
    );
    assert!(from_old.is_empty(), "the old leader called: {from_old:?}");
    let applied = applied_per_key(&ch.sim);
    assert!(applied.values().all(|n| *n == 1), "{applied:?}");
    drop(procs);
}

/// Three replicas, 12 shards, 30 components each with a fault: every
/// incident is healed by the leader of its shard; at no sampled moment does
/// a shard have two leaders; after one replica is killed its shards are led
/// by the others within `lease_seconds` + 2 s, and the faults that follow
/// are healed too.
#[test]
fn three_replicas_twelve_shards_thirty_components_all_healed() {
    let names: Vec<String> = (0..30).map(|i| format!("svc{i:02}")).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sim = Simulator::with_topology(
        Topology::new(&names).expect("topology"),
        Arc::new(SystemClock),
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let charter = listener.local_addr().expect("addr");
    let router = mapek::sim::router(sim.clone(), None);
    rt.spawn(async move { axum::serve(listener, router).await });
    let prom = prometheus(&[("charter", charter)], None, None);
    let etcd = etcd();
    let dir = tempfile::tempdir().expect("tempdir");
    let shards = 12;
    let start = |name: &str| {
        run_replica(
            dir.path(),
            name,
            format!(
                "monitor:\n  interval_seconds: 1\n\
                 prometheus:\n  url: {}\n  timeout_seconds: 2\n  retries: 0\n\
                 alertmanager:\n  enabled: false\n\
                 charter:\n  url: http://{charter}\n\
                 execute:\n  verification_window_seconds: 3\n  call_timeout_seconds: 5\n  preflight_validate: false\n  max_concurrent: 16\n\
                 plan:\n  cooldown_seconds: 1\n\
                 safety:\n  disruption_budget:\n    max_actions: 1000\n  component_rate_limit:\n    max_actions: 1000\n  breaker:\n    failures: 100\n  flapping:\n    relapses: 100\n\
                 cluster:\n  etcd_endpoints: [\"{}\"]\n  name: {name}\n  lease_seconds: {LEASE}\n  shards: {shards}\n  prefix: /three\n",
                prom.url(),
                etcd.url()
            ),
        )
    };
    let mut replicas: Vec<(String, Option<Proc>, SocketAddr)> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let (p, a) = start(n);
            (n.to_string(), Some(p), a)
        })
        .collect();
    // Shard leaders as each live replica claims them: never two at once.
    let sample = |replicas: &[(String, Option<Proc>, SocketAddr)]| -> Vec<(u32, String)> {
        let mut claims = Vec::new();
        for (name, p, addr) in replicas {
            if p.is_none() {
                continue;
            }
            let c = cluster(*addr);
            for s in c["leading_shards"].as_array().into_iter().flatten() {
                if let Some(s) = s.as_u64() {
                    claims.push((s as u32, name.clone()));
                }
            }
        }
        claims
    };
    let mut samples = 0;
    let mut check = |replicas: &[(String, Option<Proc>, SocketAddr)]| -> usize {
        let claims = sample(replicas);
        let mut seen = std::collections::BTreeSet::new();
        for (s, who) in &claims {
            assert!(
                seen.insert(*s),
                "shard {s} has two leaders ({who} and another): {claims:?}"
            );
        }
        samples += 1;
        claims.len()
    };
    wait_until(Duration::from_secs(30), "12 shards led", || {
        (check(&replicas) == shards as usize).then_some(())
    });
    let kinds = [
        FaultKind::NodeCrash,
        FaultKind::BadPolicy,
        FaultKind::LoadSpike,
    ];
    for (i, n) in names.iter().enumerate() {
        sim.inject_at(n, kinds[i % kinds.len()]).expect("inject");
    }
    let all_healthy = |sim: &Simulator| {
        let st = sim.state();
        names.iter().all(|n| {
            st["components"][n]["active_faults"]
                .as_array()
                .is_some_and(|a| a.is_empty())
        })
    };
    let healed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(300), "30 components healed", || {
            check(&replicas);
            all_healthy(&sim).then_some(())
        })
    }));
    if healed.is_err() {
        let out: Vec<String> = replicas
            .iter_mut()
            .filter_map(|(_, p, _)| p.as_mut().map(|p| p.output()))
            .collect();
        panic!("not healed:\n{}", out.join("\n----\n"));
    }
    // Kill one replica: its shards are taken over.
    let victim = 0;
    let theirs: Vec<u32> = cluster(replicas[victim].2)["leading_shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_u64().map(|s| s as u32))
        .collect();
    let mut p = replicas[victim].1.take().expect("victim");
    p.child.kill().expect("kill -9");
    let _ = p.child.wait();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(LEASE + 2),
        "the dead replica's shards led by the others",
        || (check(&replicas) == shards as usize).then_some(()),
    );
    let takeover = killed.elapsed();
    for (i, n) in names.iter().enumerate() {
        sim.inject_at(n, kinds[(i + 1) % kinds.len()])
            .expect("inject");
    }
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            Duration::from_secs(300),
            "30 components healed again",
            || {
                check(&replicas);
                all_healthy(&sim).then_some(())
            },
        )
    }));
    if again.is_err() {
        let st = sim.state();
        let left: Vec<&String> = names
            .iter()
            .filter(|n| {
                st["components"][n.as_str()]["active_faults"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
            })
            .collect();
        let views: Vec<String> = replicas
            .iter()
            .filter(|(_, p, _)| p.is_some())
            .map(|(n, _, a)| {
                let incidents =
                    get(&format!("http://{a}/api/v1/incidents?limit=100")).unwrap_or(Value::Null);
                format!("{n}: cluster {} incidents {incidents}", cluster(*a))
            })
            .collect();
        panic!("not healed again: {left:?}\n{}", views.join("\n"));
    }
    let applied = applied_per_key(&sim);
    let twice: Vec<_> = applied.iter().filter(|(_, n)| **n > 1).collect();
    // How the remedies went: incidents, attempts per incident, actions.
    let mut attempts: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
        Default::default();
    for k in applied.keys() {
        let mut it = k.split('/');
        if let (Some(inc), Some(att)) = (it.next(), it.next()) {
            attempts.entry(inc).or_default().insert(att);
        }
    }
    let most = attempts.values().map(|a| a.len()).max().unwrap_or(0);
    let paths: std::collections::BTreeMap<String, usize> = sim
        .calls()
        .iter()
        .filter(|c| c.method == "POST" && c.status == 200 && !c.replayed)
        .fold(Default::default(), |mut m, c| {
            *m.entry(c.path.clone()).or_insert(0) += 1;
            m
        });
    eprintln!(
        "three replicas: {} shards of the killed replica taken over in {takeover:?} (lease {LEASE} \
         s); {samples} samples, never two leaders of a shard; {} keys applied, {} twice; {} \
         incidents, at most {most} attempts each; calls by path {paths:?}",
        theirs.len(),
        applied.len(),
        twice.len(),
        attempts.len()
    );
    assert!(twice.is_empty(), "applied twice: {twice:?}");
    assert!(!theirs.is_empty(), "the killed replica led shards");
}
