//! Cluster mode against a real etcd (Debian's etcd-server, started by the
//! test on loopback ports; its absence fails the test): election,
//! takeover after a crash, fencing, spreading shards.
#![cfg(feature = "cluster")]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mapek::cluster::Cluster;
use mapek::config::ClusterSettings;
use mapek_actors::leadership::FenceError;

fn settings(
    etcd: &str,
    name: &str,
    lease_seconds: u64,
    shards: u32,
    prefix: &str,
) -> ClusterSettings {
    ClusterSettings {
        etcd_endpoints: vec![etcd.to_string()],
        name: name.into(),
        lease_seconds,
        shards,
        prefix: prefix.into(),
        advertise: String::new(),
    }
}

/// A fresh etcd (started off the runtime: its readiness check blocks).
async fn etcd() -> support::servers::Server {
    tokio::task::spawn_blocking(support::servers::etcd)
        .await
        .expect("etcd starts")
}

async fn start(s: &ClusterSettings) -> Cluster {
    Cluster::start(s, "127.0.0.1:1".parse().expect("addr"))
        .await
        .expect("cluster starts")
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after
/// `limit`. Returns how long it took.
async fn until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if cond() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replicas `a` and `b` of two shards, each leading one: (a, its shard,
/// b, its shard).
async fn two_leaders(etcd: &str, prefix: &str) -> (Cluster, u32, Cluster, u32) {
    let a = start(&settings(etcd, "a", 2, 2, prefix)).await;
    let b = start(&settings(etcd, "b", 2, 2, prefix)).await;
    until(Duration::from_secs(10), "one shard each", || {
        a.view().leading.len() == 1 && b.view().leading.len() == 1
    })
    .await;
    let sa = *a.view().leading.first().expect("a leads");
    let sb = *b.view().leading.first().expect("b leads");
    (a, sa, b, sb)
}

/// How many of `replicas` lead `shard` now.
fn leaders_of(replicas: &[&Cluster], shard: u32) -> usize {
    replicas.iter().filter(|c| c.is_leader(shard)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_leads_and_the_other_takes_over_after_a_crash() {
    let etcd = etcd().await;
    let lease = 2;
    let a = start(&settings(&etcd.url(), "a", lease, 1, "/t1")).await;
    let b = start(&settings(&etcd.url(), "b", lease, 1, "/t1")).await;
    until(Duration::from_secs(10), "one leader", || {
        leaders_of(&[&a, &b], 0) == 1
    })
    .await;
    // Both see each other and the same leader.
    until(Duration::from_secs(5), "both see both", || {
        a.view().members.len() == 2 && b.view().members.len() == 2
    })
    .await;
    let (leader, standby) = if a.is_leader(0) { (a, b) } else { (b, a) };
    let first = leader.fence(0).expect("fence");
    until(
        Duration::from_secs(5),
        "the standby sees the leader",
        || standby.view().leader_of(0) == Some(leader.name()),
    )
    .await;
    assert!(!standby.view().leading_any());
    // The standby's view changes are delivered through subscribe().
    let mut rx = standby.subscribe();
    rx.borrow_and_update();

    // Crash: every task of the leader stops, nothing is released.
    let name = leader.name().to_string();
    drop(leader);
    let t0 = Instant::now();
    let limit = Duration::from_secs(lease + 2);
    loop {
        if standby.is_leader(0) {
            break;
        }
        let left = limit.saturating_sub(t0.elapsed());
        assert!(!left.is_zero(), "no takeover within {limit:?}");
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
    let took = t0.elapsed();
    println!("takeover after the crash of {name} (lease {lease} s): {took:?}");
    assert!(took <= limit);
    let second = standby.fence(0).expect("fence");
    assert!(
        second.revision > first.revision,
        "the fencing token grows: {first:?} then {second:?}"
    );
    assert_eq!(standby.view().leader_of(0), Some(standby.name()));
    // The crashed member's registration expires too.
    until(
        Duration::from_secs(lease + 3),
        "the dead member leaves",
        || standby.view().members == vec![standby.name().to_string()],
    )
    .await;
    standby.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_write() {
    let etcd = etcd().await;
    let lease = 10;
    let a = start(&settings(&etcd.url(), "a", lease, 1, "/t2")).await;
    until(Duration::from_secs(10), "a leads", || a.is_leader(0)).await;
    let b = start(&settings(&etcd.url(), "b", lease, 1, "/t2")).await;
    until(Duration::from_secs(5), "b sees a lead", || {
        b.view().leader_of(0) == Some("a")
    })
    .await;

    // The leader writes under its fence; the standby cannot.
    let w = a
        .fenced_put(0, "intents/inc-1/1/restart", b"a".to_vec())
        .await
        .expect("the leader writes");
    assert_eq!(w.fence, a.fence(0).expect("fence"));
    assert_eq!(
        b.read("intents/inc-1/1/restart").await.expect("read"),
        Some(b"a".to_vec())
    );
    assert_eq!(
        b.fenced_put(0, "intents/inc-1/1/restart", b"b".to_vec())
            .await,
        Err(FenceError::NotLeader { shard: 0 })
    );
    assert!(matches!(
        a.fenced_put(0, "shards/0/leader", b"x".to_vec()).await,
        Err(FenceError::InvalidKey { .. })
    ));
    assert!(matches!(
        a.fenced_put(1, "intents/x", b"x".to_vec()).await,
        Err(FenceError::NoSuchShard { .. })
    ));

    // Freeze a (like SIGSTOP: it still believes it leads, its lease is
    // valid for seconds), and take the key away from it: an operator
    // deletes the leader key; b takes over at once.
    a.halt();
    let mut etcdc = etcd_client::Client::connect([etcd.url()], None)
        .await
        .expect("etcd client");
    etcdc
        .delete("/t2/shards/0/leader", None)
        .await
        .expect("delete");
    until(Duration::from_secs(5), "b leads", || b.is_leader(0)).await;
    assert!(a.is_leader(0), "a's local deadline has not passed yet");
    // a's fenced write is refused by etcd, and a steps down.
    let r = a
        .fenced_put(0, "intents/inc-1/2/restart", b"a".to_vec())
        .await;
    assert_eq!(
        r,
        Err(FenceError::Deposed {
            shard: 0,
            holder: Some("b".into())
        })
    );
    assert!(!a.is_leader(0));
    assert_eq!(
        a.fenced_put(0, "intents/inc-1/2/restart", b"a".to_vec())
            .await,
        Err(FenceError::NotLeader { shard: 0 })
    );
    assert_eq!(b.read("intents/inc-1/2/restart").await.expect("read"), None);
    b.fenced_put(0, "intents/inc-1/2/restart", b"b".to_vec())
        .await
        .expect("the new leader writes");

    // A live leader whose lease is revoked from outside steps down at once
    // (the watch shows its key deleted), without waiting for its deadline.
    let lease_b = b.fence(0).expect("fence").lease_id;
    etcdc.lease_revoke(lease_b).await.expect("revoke");
    // (It may win the vacant shard again at once, under a new lease: what
    // must end at once is the lead on the revoked lease.)
    let took = until(Duration::from_secs(3), "b steps down", || {
        b.fence(0).map(|f| f.lease_id) != Some(lease_b)
    })
    .await;
    println!("step-down after the lease was revoked: {took:?}");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_shards_spread_over_three_replicas_and_survive_one() {
    let etcd = etcd().await;
    let lease = 3;
    let shards = 12;
    let a = start(&settings(&etcd.url(), "a", lease, shards, "/t3")).await;
    let b = start(&settings(&etcd.url(), "b", lease, shards, "/t3")).await;
    let c = start(&settings(&etcd.url(), "c", lease, shards, "/t3")).await;
    let mut samples = 0usize;
    let mut check = |rs: &[&Cluster]| {
        samples += 1;
        for s in 0..shards {
            let n = leaders_of(rs, s);
            assert!(n <= 1, "shard {s} has {n} leaders at one sampled moment");
        }
    };
    let counts = |rs: &[&Cluster]| -> Vec<usize> {
        rs.iter()
            .map(|c| (0..shards).filter(|s| c.is_leader(*s)).count())
            .collect()
    };
    let t0 = Instant::now();
    loop {
        check(&[&a, &b, &c]);
        if counts(&[&a, &b, &c]) == vec![4, 4, 4] {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no 4/4/4 spread within 20 s: {:?}",
            counts(&[&a, &b, &c])
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("4/4/4 after {:?}", t0.elapsed());
    // It stays so, and every replica's view agrees.
    let settled = Instant::now();
    while settled.elapsed() < Duration::from_secs(2) {
        check(&[&a, &b, &c]);
        assert_eq!(counts(&[&a, &b, &c]), vec![4, 4, 4]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    until(Duration::from_secs(3), "views agree", || {
        let va = a.view();
        va.leaders == b.view().leaders
            && va.leaders == c.view().leaders
            && va.leaders.values().all(|l| l.is_some())
    })
    .await;

    // Kill c: its shards are led by a and b within lease + 2 s.
    let c_shards: Vec<u32> = (0..shards).filter(|s| c.is_leader(*s)).collect();
    drop(c);
    let t0 = Instant::now();
    let limit = Duration::from_secs(lease + 2);
    loop {
        check(&[&a, &b]);
        if c_shards.iter().all(|s| leaders_of(&[&a, &b], *s) == 1) {
            break;
        }
        assert!(
            t0.elapsed() < limit,
            "c's shards {c_shards:?} not taken over within {limit:?}: {:?}",
            counts(&[&a, &b])
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "c's shards {c_shards:?} taken over in {:?} (lease {lease} s)",
        t0.elapsed()
    );
    // Then 6/6 once c's membership has expired.
    let t1 = Instant::now();
    loop {
        check(&[&a, &b]);
        if counts(&[&a, &b]) == vec![6, 6] {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(lease * 3),
            "no 6/6 spread: {:?}",
            counts(&[&a, &b])
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "6/6 after {:?}; {samples} samples with at most one leader per shard",
        t0.elapsed()
    );
    let by_name: BTreeMap<u32, Option<String>> = a.view().leaders;
    assert!(by_name
        .values()
        .all(|l| matches!(l.as_deref(), Some("a" | "b"))));
    a.shutdown().await;
    // A graceful leave hands the shards over at once.
    let t2 = Instant::now();
    until(Duration::from_secs(2), "b leads everything", || {
        (0..shards).all(|s| b.is_leader(s))
    })
    .await;
    println!("graceful hand-over of a's shards: {:?}", t2.elapsed());
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_etcd_is_reported_never_waited_for() {
    // A port nobody listens on.
    let dead = format!("http://{}", support::free_addr());
    let t0 = Instant::now();
    let a = start(&settings(&dead, "a", 2, 1, "/t4")).await;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "start waited for etcd"
    );
    until(Duration::from_secs(5), "the error is reported", || {
        a.view()
            .etcd_error
            .is_some_and(|e| e.contains("lease grant"))
    })
    .await;
    let t1 = Instant::now();
    assert_eq!(
        a.fenced_put(0, "intents/x", b"x".to_vec()).await,
        Err(FenceError::NotLeader { shard: 0 })
    );
    assert!(!a.is_leader(0));
    assert!(t1.elapsed() < Duration::from_secs(1));
    println!("etcd error: {:?}", a.view().etcd_error);
    a.shutdown().await;
}

/// GET `url` as JSON (status, body).
fn get_json(url: &str) -> (u16, serde_json::Value) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    match client.get(url).send() {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().unwrap_or(serde_json::Value::Null))
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}

/// `mapek run` as replica `name` of the cluster on `etcd`.
fn replica(
    dir: &std::path::Path,
    etcd: &str,
    name: &str,
    lease: u64,
) -> (support::Proc, std::net::SocketAddr) {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "prometheus:\n  enabled: false\ncluster:\n  etcd_endpoints: [\"{etcd}\"]\n  name: {name}\n  lease_seconds: {lease}\n  prefix: /procs\n"
        ),
    )
    .expect("config");
    let data = dir.join(format!("data-{name}")).display().to_string();
    let addr = support::free_addr();
    let listen = addr.to_string();
    let cfg = cfg.display().to_string();
    let mut p = support::Proc::start(
        &[
            "run",
            "--config",
            &cfg,
            "--data-dir",
            &data,
            "--listen",
            &listen,
        ],
        &[],
        dir,
    );
    p.wait_for("serving", Duration::from_secs(20));
    (p, addr)
}

/// Two `mapek run` processes: one leads, the standby is ready and says it
/// does not lead; kill -9 the leader and the standby leads within
/// `lease_seconds` + 2 s.
#[test]
fn two_daemons_kill_the_leader_and_the_standby_leads() {
    let mut etcd = support::servers::etcd();
    let dir = tempfile::tempdir().expect("tempdir");
    let lease = 2;
    let (pa, aa) = replica(dir.path(), &etcd.url(), "a", lease);
    let (pb, ab) = replica(dir.path(), &etcd.url(), "b", lease);
    let cluster = |addr: std::net::SocketAddr| get_json(&format!("http://{addr}/api/v1/cluster")).1;
    let t0 = Instant::now();
    let (leader, standby) = loop {
        let (ca, cb) = (cluster(aa), cluster(ab));
        let both = |c: &serde_json::Value| c["members"].as_array().map(Vec::len) == Some(2);
        if both(&ca) && both(&cb) && ca["leader"] == cb["leader"] && ca["leader"].is_string() {
            assert_ne!(ca["leading"], cb["leading"], "exactly one leads: {ca} {cb}");
            break if ca["leading"] == true {
                ("a", "b")
            } else {
                ("b", "a")
            };
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no leader: {ca} {cb}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut lp, _sp, laddr, saddr) = if leader == "a" {
        (pa, pb, aa, ab)
    } else {
        (pb, pa, ab, aa)
    };
    let c = cluster(saddr);
    assert_eq!(c["name"], standby);
    assert_eq!(c["leader"], leader);
    assert_eq!(c["shards"]["0"], leader);
    assert_eq!(c["etcd"], "reachable");
    // Both are ready; the standby's /ready says it does not lead.
    let (code, ready) = get_json(&format!("http://{saddr}/ready"));
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["cluster"]["leading"], false, "{ready}");
    let (code, ready) = get_json(&format!("http://{laddr}/ready"));
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["cluster"]["leading"], true, "{ready}");
    let metrics = reqwest::blocking::get(format!("http://{laddr}/metrics"))
        .and_then(|r| r.text())
        .expect("metrics");
    assert!(
        metrics.contains("mape_k_cluster_leader{shard=\"0\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("mape_k_cluster_leadership_transitions_total{shard=\"0\"} 1"));

    // kill -9 the leader.
    lp.child.kill().expect("kill -9");
    let _ = lp.child.wait();
    let t0 = Instant::now();
    let limit = Duration::from_secs(lease + 2);
    loop {
        let c = cluster(saddr);
        if c["leading"] == true {
            break;
        }
        assert!(t0.elapsed() < limit, "no takeover within {limit:?}: {c}");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "daemon {standby} took over from the killed {leader} in {:?} (lease {lease} s)",
        t0.elapsed()
    );
    let metrics = reqwest::blocking::get(format!("http://{saddr}/metrics"))
        .and_then(|r| r.text())
        .expect("metrics");
    assert!(metrics.contains("mape_k_cluster_leader{shard=\"0\"} 1"));

    // etcd goes away: the replica cannot tell who leads, so a mutating
    // call is refused (503, saying why), never sent to a stale leader.
    etcd.kill();
    let t0 = Instant::now();
    loop {
        if !cluster(saddr)["etcd"]
            .as_str()
            .unwrap_or("reachable")
            .starts_with("reachable")
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(lease + 5),
            "etcd still reachable"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{saddr}/api/v1/pause"))
        .json(&serde_json::json!({"by": "sre"}))
        .send()
        .expect("post");
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().expect("json");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot reach etcd"),
        "{body}"
    );
}

fn polled(fingerprint: &str, onset_s: i64) -> mapek_actors::model::Violation {
    use chrono::TimeZone;
    let t = chrono::Utc
        .timestamp_opt(1_800_000_000 + onset_s, 0)
        .single()
        .expect("time");
    mapek_actors::model::Violation {
        id: format!("v-{fingerprint}-{onset_s}"),
        fingerprint: fingerprint.into(),
        rule: "r".into(),
        severity: mapek_actors::model::Severity::Critical,
        component: "api".into(),
        metric: "m".into(),
        value: 1.0,
        labels: Default::default(),
        signal: mapek_actors::model::Signal::Latency,
        first_seen: t,
        observed_at: t,
        source: "prometheus".into(),
    }
}

/// Polled sources see a violation at different moments on each replica;
/// in cluster mode the first replica's onset is everyone's, so the
/// incident ids (and the idempotency keys derived from them) match. The
/// leader of shard 0 removes the onsets of violations gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_on_onsets_so_incident_ids_match() {
    use mapek::cluster::onsets::{AgreedOnsets, OnsetBook};
    use mapek_actors::ports::MetricSource;
    use mapek_actors::testing::ScriptedSource;
    use std::sync::Arc;
    let etcd = etcd().await;
    let a = start(&settings(&etcd.url(), "a", 2, 1, "/on")).await;
    let b = start(&settings(&etcd.url(), "b", 2, 1, "/on")).await;
    until(Duration::from_secs(10), "one leader", || {
        leaders_of(&[&a, &b], 0) == 1
    })
    .await;
    let (src_a, src_b) = (
        ScriptedSource::new("prometheus"),
        ScriptedSource::new("prometheus"),
    );
    let (book_a, book_b) = (OnsetBook::new(a.clone()), OnsetBook::new(b.clone()));
    let pa = AgreedOnsets::new(Arc::new(src_a.clone()), book_a.clone());
    let pb = AgreedOnsets::new(Arc::new(src_b.clone()), book_b.clone());
    // a sees x at 10 s; b sees it 7 s later (its own first poll), and y
    // first.
    src_a.set(Ok(vec![polled("x", 10)]));
    src_b.set(Ok(vec![polled("x", 17), polled("y", 20)]));
    let va = pa.poll(&[]).await.expect("poll a");
    let vb = pb.poll(&[]).await.expect("poll b");
    assert_eq!(va[0].first_seen, polled("x", 10).first_seen);
    let bx = vb.iter().find(|v| v.fingerprint == "x").expect("x");
    assert_eq!(
        bx.first_seen,
        polled("x", 10).first_seen,
        "b takes a's onset"
    );
    let id = |v: &mapek_actors::model::Violation| {
        mapek_actors::model::incident_id(&v.fingerprint, v.first_seen)
    };
    assert_eq!(id(&va[0]), id(bx));
    // a sees y later: b's onset.
    src_a.set(Ok(vec![polled("x", 11), polled("y", 25)]));
    let va = pa.poll(&[]).await.expect("poll a");
    let ay = va.iter().find(|v| v.fingerprint == "y").expect("y");
    assert_eq!(ay.first_seen, polled("y", 20).first_seen);
    // Cached: a later poll keeps the agreed onset even if etcd's key goes.
    let mut c = a.client();
    c.delete(book_a.key_of("x"), None).await.expect("delete");
    let va = pa.poll(&[]).await.expect("poll a");
    assert_eq!(va[0].first_seen, polled("x", 10).first_seen);
    // Garbage: x and y gone from both; the leader of shard 0 removes their
    // keys once they have been absent long enough (zero here), never a
    // live one.
    src_a.set(Ok(vec![polled("y", 30)]));
    src_b.set(Ok(vec![polled("y", 30)]));
    pa.poll(&[]).await.expect("poll a");
    pb.poll(&[]).await.expect("poll b");
    let (leader_book, leader_src, leader) = if a.is_leader(0) {
        (&book_a, &pa, &src_a)
    } else {
        (&book_b, &pb, &src_b)
    };
    let count = |prefix: &str| {
        let mut c = a.client();
        let key = a.key(prefix);
        async move {
            c.get(
                key,
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only(),
                ),
            )
            .await
            .expect("count")
            .count()
        }
    };
    c.put(
        book_a.key_of("z"),
        r#"{"fingerprint":"z","onset_ms":1,"by":"gone"}"#,
        None,
    )
    .await
    .expect("put z");
    assert_eq!(count("incident-onsets/").await, 2, "y and z");
    // z has been absent "long enough" (zero) at once; y is live.
    assert_eq!(leader_book.collect_garbage(Duration::ZERO).await, Ok(1));
    assert_eq!(count("incident-onsets/").await, 1, "y stays: it is live");
    leader.set(Ok(Vec::new()));
    leader_src.poll(&[]).await.expect("poll");
    assert_eq!(leader_book.collect_garbage(Duration::ZERO).await, Ok(1));
    assert_eq!(count("incident-onsets/").await, 0);
    // The standby never removes anything.
    let standby_book = if a.is_leader(0) { &book_b } else { &book_a };
    c.put(
        book_a.key_of("w"),
        r#"{"fingerprint":"w","onset_ms":1,"by":"gone"}"#,
        None,
    )
    .await
    .expect("put w");
    assert_eq!(standby_book.collect_garbage(Duration::ZERO).await, Ok(0));
    assert_eq!(count("incident-onsets/").await, 1);
}

/// The replicated history in etcd is trimmed to the newest `keep` keys
/// per kind (oldest first); current-state keys are never trimmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_history_is_trimmed_oldest_first() {
    let etcd = etcd().await;
    let a = start(&settings(&etcd.url(), "a", 2, 1, "/tr")).await;
    until(Duration::from_secs(10), "a leads", || a.is_leader(0)).await;
    let mut c = a.client();
    for i in 0..5 {
        c.put(a.key(&format!("knowledge/executions/e{i}")), "{}", None)
            .await
            .expect("put");
    }
    c.put(a.key("knowledge/guards/pause"), "{}", None)
        .await
        .expect("put");
    let (removed, _) = mapek::cluster::replication::trim_once(&a, 2)
        .await
        .expect("trim");
    assert_eq!(removed, 3);
    let left = c
        .get(
            a.key("knowledge/"),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("get");
    let keys: Vec<String> = left
        .kvs()
        .iter()
        .map(|kv| kv.key_str().expect("utf8").to_string())
        .collect();
    assert_eq!(
        keys,
        vec![
            "/tr/knowledge/executions/e3",
            "/tr/knowledge/executions/e4",
            "/tr/knowledge/guards/pause"
        ]
    );
}

/// A violation that ends and comes back is a new one: the replica that
/// saw it end replaces the old onset in etcd, and a replica seeing it
/// for the first time then takes the new onset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_violation_that_came_back_gets_a_new_onset() {
    use mapek::cluster::onsets::{AgreedOnsets, OnsetBook};
    use mapek_actors::ports::MetricSource;
    use mapek_actors::testing::ScriptedSource;
    use std::sync::Arc;
    let etcd = etcd().await;
    let a = start(&settings(&etcd.url(), "a", 2, 1, "/back")).await;
    let b = start(&settings(&etcd.url(), "b", 2, 1, "/back")).await;
    until(Duration::from_secs(10), "both connected", || {
        a.view().etcd_error.is_none() && b.view().etcd_error.is_none()
    })
    .await;
    let src_a = ScriptedSource::new("prometheus");
    let pa = AgreedOnsets::new(Arc::new(src_a.clone()), OnsetBook::new(a.clone()));
    src_a.set(Ok(vec![polled("x", 10)]));
    assert_eq!(
        pa.poll(&[]).await.expect("poll")[0].first_seen,
        polled("x", 10).first_seen
    );
    // A failed rule hides its series without ending them.
    src_a.fail_rules(vec![mapek_actors::ports::RuleFailure {
        rule: "r".into(),
        component: "api".into(),
        error: mapek_actors::ports::SourceError::Timeout(1),
    }]);
    src_a.set(Ok(Vec::new()));
    pa.poll(&[]).await.expect("poll");
    src_a.fail_rules(Vec::new());
    src_a.set(Ok(vec![polled("x", 30)]));
    assert_eq!(
        pa.poll(&[]).await.expect("poll")[0].first_seen,
        polled("x", 10).first_seen,
        "the same episode"
    );
    // Ended, then back: a new onset, for a and for a newcomer b.
    src_a.set(Ok(Vec::new()));
    pa.poll(&[]).await.expect("poll");
    src_a.set(Ok(vec![polled("x", 40)]));
    assert_eq!(
        pa.poll(&[]).await.expect("poll")[0].first_seen,
        polled("x", 40).first_seen
    );
    let src_b = ScriptedSource::new("prometheus");
    let pb = AgreedOnsets::new(Arc::new(src_b.clone()), OnsetBook::new(b.clone()));
    src_b.set(Ok(vec![polled("x", 45)]));
    assert_eq!(
        pb.poll(&[]).await.expect("poll")[0].first_seen,
        polled("x", 40).first_seen
    );
}

/// A replica applies what other replicas published through its own
/// journal (listing in pages: more records than one page), skips its own
/// unless its store lacks them, applies another replica's deletions, and
/// publishes what it records itself while it leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_applies_published_knowledge_and_publishes_its_own() {
    use mapek_actors::safety::GUARDS_TREE;
    use mapek_actors::store::KnowledgeStore;
    let etcd = etcd().await;
    let a = start(&settings(&etcd.url(), "a", 2, 1, "/rp")).await;
    until(Duration::from_secs(10), "a leads", || a.is_leader(0)).await;
    let mut c = a.client();
    let env = |origin: &str, key: &str| {
        serde_json::json!({
            "origin": origin,
            "record": {"kind": "put", "tree": "guards", "key": key, "value": {"by": origin}},
        })
        .to_string()
    };
    for i in 0..1200 {
        let key = format!("silence/c{i}");
        c.put(
            a.key(&format!("knowledge/guards/{key}")),
            env("z", &key),
            None,
        )
        .await
        .expect("put");
    }
    // One of a's own, which its (empty) store lacks: applied too.
    c.put(
        a.key("knowledge/guards/silence/own"),
        env("a", "silence/own"),
        None,
    )
    .await
    .expect("put");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(10)).expect("store");
    let counters = mapek::cluster::replication::start(&a, &store);
    let count = |store: &KnowledgeStore| {
        store
            .list_records::<serde_json::Value>(GUARDS_TREE, usize::MAX)
            .map(|v| v.len())
            .unwrap_or(0)
    };
    until(Duration::from_secs(20), "1201 records applied", || {
        count(&store) == 1201
    })
    .await;
    // Another replica's deletion is applied.
    c.delete(a.key("knowledge/guards/silence/c0"), None)
        .await
        .expect("delete");
    until(Duration::from_secs(5), "the deletion applied", || {
        count(&store) == 1200
    })
    .await;
    // What a records itself is published (a leads), as a's.
    store
        .put_record(GUARDS_TREE, "pause", &serde_json::json!({"by": "sre"}))
        .expect("put");
    let key = a.key("knowledge/guards/pause");
    let published = {
        let mut found = None;
        for _ in 0..250 {
            let r = c.get(key.clone(), None).await.expect("get");
            if let Some(kv) = r.kvs().first() {
                found = Some(String::from_utf8_lossy(kv.value()).into_owned());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        found.expect("published within 5 s")
    };
    assert!(published.contains(r#""origin":"a""#), "{published}");
    // Its own echo is not applied again: a marker written after it (so
    // seen after it by the watch) is the only further record applied.
    c.put(
        a.key("knowledge/guards/silence/marker"),
        env("z", "silence/marker"),
        None,
    )
    .await
    .expect("put");
    until(Duration::from_secs(5), "the marker applied", || {
        matches!(
            store.get_record::<serde_json::Value>(GUARDS_TREE, "silence/marker"),
            Ok(Some(_))
        )
    })
    .await;
    let applied = counters.applied.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        applied, 1203,
        "1200 + own missing + one deletion + the marker"
    );
    assert_eq!(
        counters.dropped.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// The disruption budget's slots in etcd: shared by every leader, never
/// over-reserved, freed by their lease at the end of the window, and
/// reserved only by a shard's leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_slots_are_shared_and_free_themselves() {
    use mapek_actors::leadership::{Budget, Leadership};
    let etcd = etcd().await;
    let (a, sa, b, sb) = two_leaders(&etcd.url(), "/slots").await;
    let window = Duration::from_secs(2);
    let reserved =
        |r: &Result<Budget, FenceError>| matches!(r, Ok(Budget::Reserved { lease }) if *lease != 0);
    let full = |r: &Result<Budget, FenceError>| match r {
        Ok(Budget::Full { frees_in }) => *frees_in <= window,
        _ => false,
    };
    let r = a.reserve_budget(sa, 2, 3, window, "pa").await;
    assert!(reserved(&r), "{r:?}");
    let r = b.reserve_budget(sb, 2, 3, window, "pb").await;
    assert!(full(&r), "only 1 of 3 left: {r:?}");
    let r = b.reserve_budget(sb, 1, 3, window, "pb").await;
    assert!(reserved(&r), "{r:?}");
    let r = a.reserve_budget(sa, 1, 3, window, "pc").await;
    assert!(full(&r), "all 3 used: {r:?}");
    // A reservation given back frees its slots at once.
    let Ok(Budget::Reserved { lease }) = b.reserve_budget(sb, 0, 3, window, "none").await else {
        panic!("nothing to reserve")
    };
    assert_eq!(lease, 0);
    // Concurrent reservations for the last slots never over-reserve.
    // The window ends: etcd expires the leases and the slots go.
    let mut c = a.client();
    let slots = a.key("budget-slots/");
    let t0 = Instant::now();
    loop {
        let n = c
            .get(
                slots.clone(),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only(),
                ),
            )
            .await
            .expect("count")
            .count();
        if n == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "slots never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (x, y) = tokio::join!(
        a.reserve_budget(sa, 2, 3, Duration::from_secs(30), "px"),
        b.reserve_budget(sb, 2, 3, Duration::from_secs(30), "py")
    );
    let won = [&x, &y].iter().filter(|r| reserved(r)).count();
    // Whichever came second found only one slot: exactly one wins (both
    // free slots may also have gone to one if the first read was slow).
    assert_eq!(won, 1, "{x:?} {y:?}");
    // The winner gives its reservation back (it sent nothing): all three
    // slots are free again at once.
    let (winner, lease) = match (&x, &y) {
        (Ok(Budget::Reserved { lease }), _) => (&a, *lease),
        (_, Ok(Budget::Reserved { lease })) => (&b, *lease),
        _ => unreachable!("one won"),
    };
    winner.release_budget(lease).await;
    let r = a.reserve_budget(sa, 3, 3, window, "all").await;
    assert!(reserved(&r), "{r:?}");
    // Not the leader of the shard: refused.
    assert!(a.reserve_budget(sb, 1, 3, window, "pz").await.is_err());
}

/// Intents and incident claims expire by themselves (a shared lease of
/// about a day): the keyspace stays bounded by a day of actions. Other
/// fenced writes do not expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_and_claims_expire_other_fenced_writes_do_not() {
    let etcd = etcd().await;
    let a = start(&settings(&etcd.url(), "a", 2, 1, "/exp")).await;
    until(Duration::from_secs(10), "a leads", || a.is_leader(0)).await;
    for k in ["intents/inc-1/1/a1", "incident-claims/00ff", "notes/x"] {
        a.fenced_put(0, k, b"v".to_vec()).await.expect("put");
    }
    let mut c = a.client();
    let lease_of = |k: &str| {
        let key = a.key(k);
        let mut c = a.client();
        async move { c.get(key, None).await.expect("get").kvs()[0].lease() }
    };
    let (i, cl, n) = (
        lease_of("intents/inc-1/1/a1").await,
        lease_of("incident-claims/00ff").await,
        lease_of("notes/x").await,
    );
    assert!(i != 0 && i == cl, "one shared lease: {i} {cl}");
    assert_eq!(n, 0, "no lease on other keys");
    let ttl = c.lease_time_to_live(i, None).await.expect("ttl").ttl();
    let day = 24 * 3600;
    assert!((day..=day + 3600).contains(&ttl), "ttl {ttl}");
}

/// An incident is pinned to a shard cluster-wide by the first leader that
/// acts on it (one key per member fingerprint): a leader of another shard
/// that names the incident by an overlapping set of fingerprints learns
/// where it belongs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_leader_to_act_pins_an_incident_for_everyone() {
    use mapek_actors::leadership::Leadership;
    let etcd = etcd().await;
    let (a, sa, b, sb) = two_leaders(&etcd.url(), "/pins").await;
    let keys = |names: &[&str]| -> Vec<String> {
        names.iter().map(|n| format!("incident-pins/{n}")).collect()
    };
    assert_eq!(a.pin_incident(sa, &keys(&["f1", "f2"])).await, Ok(sa));
    // b saw the incident with f2 and f3 first: it belongs to a's shard.
    assert_eq!(b.pin_incident(sb, &keys(&["f2", "f3"])).await, Ok(sa));
    // Again from a: unchanged.
    assert_eq!(a.pin_incident(sa, &keys(&["f1"])).await, Ok(sa));
    // Another incident: b's.
    assert_eq!(b.pin_incident(sb, &keys(&["f9"])).await, Ok(sb));
    // A replica pins only for a shard it leads.
    assert!(a.pin_incident(sb, &keys(&["f7"])).await.is_err());
}
