//! Cluster mode costs, against a real etcd on loopback (Debian's
//! etcd-server; the harness starts it): what agreeing the onsets of new
//! polled violations adds to a poll, and how fast knowledge recorded by a
//! leader reaches a standby's store. One JSON line per measurement.
//!
//! `cargo bench --features cluster --bench cluster`

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mapek::cluster::onsets::{AgreedOnsets, OnsetBook};
use mapek::cluster::{replication, Cluster};
use mapek::config::ClusterSettings;
use mapek_actors::model::{Severity, Signal, Violation};
use mapek_actors::ports::MetricSource;
use mapek_actors::safety::GUARDS_TREE;
use mapek_actors::store::KnowledgeStore;
use mapek_actors::testing::ScriptedSource;

fn settings(etcd: &str, name: &str, prefix: &str) -> ClusterSettings {
    ClusterSettings {
        etcd_endpoints: vec![etcd.to_string()],
        name: name.into(),
        lease_seconds: 5,
        shards: 1,
        prefix: prefix.into(),
        advertise: String::new(),
    }
}

fn violation(i: usize) -> Violation {
    let t = chrono::Utc::now();
    Violation {
        id: format!("v{i}"),
        fingerprint: format!("prom:latency,component=c{i}"),
        rule: "latency".into(),
        severity: Severity::Warning,
        component: format!("c{i}"),
        metric: "m".into(),
        value: 1.0,
        labels: Default::default(),
        signal: Signal::Latency,
        first_seen: t,
        observed_at: t,
        source: "prometheus".into(),
    }
}

async fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t0.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let etcd = tokio::task::spawn_blocking(support::servers::etcd)
        .await
        .expect("etcd");
    let addr = "127.0.0.1:1".parse().expect("addr");
    let a = Cluster::start(&settings(&etcd.url(), "a", "/bench"), addr)
        .await
        .expect("a");
    let b = Cluster::start(&settings(&etcd.url(), "b", "/bench"), addr)
        .await
        .expect("b");
    until(Duration::from_secs(10), || {
        (a.is_leader(0) || b.is_leader(0))
            && a.view().etcd_error.is_none()
            && b.view().etcd_error.is_none()
    })
    .await;
    let (leader, standby) = if a.is_leader(0) { (&a, &b) } else { (&b, &a) };

    // Onsets: a poll that brings N new violations, then the same poll again.
    for n in [100usize, 1000] {
        let src = ScriptedSource::new("prometheus");
        let polled = AgreedOnsets::new(Arc::new(src.clone()), OnsetBook::new(leader.clone()));
        src.set(Ok((0..n).map(|i| violation(i + n * 10)).collect()));
        let t0 = Instant::now();
        polled.poll(&[]).await.expect("poll");
        let first = t0.elapsed();
        let t0 = Instant::now();
        polled.poll(&[]).await.expect("poll");
        let again = t0.elapsed();
        println!(
            "{{\"bench\":\"onsets\",\"new_violations\":{n},\"first_poll_ms\":{:.1},\"per_new_violation_us\":{:.0},\"next_poll_ms\":{:.2}}}",
            first.as_secs_f64() * 1e3,
            first.as_secs_f64() * 1e6 / n as f64,
            again.as_secs_f64() * 1e3
        );
    }

    // What cluster mode adds to one execution before its first effector
    // call, in etcd round trips: pin the incident, read and write its
    // claim, reserve one budget slot, read and write one intent (then the
    // slot is given back, as when nothing is sent).
    {
        use mapek_actors::leadership::{Budget, Leadership};
        let shard = 0;
        let n = 200;
        let t0 = Instant::now();
        for i in 0..n {
            let pins = vec![format!("incident-pins/bench-{i}")];
            assert_eq!(leader.pin_incident(shard, &pins).await, Ok(shard));
            let claim = format!("incident-claims/bench-{i}");
            let _ = leader.read(&claim).await.expect("read claim");
            leader
                .fenced_put(shard, &claim, b"{}".to_vec())
                .await
                .expect("claim");
            let Ok(Budget::Reserved { lease }) = leader
                .reserve_budget(shard, 1, 1000, Duration::from_secs(600), "bench")
                .await
            else {
                panic!("budget")
            };
            let intent = format!("intents/bench-{i}/1/a1");
            let _ = leader.read(&intent).await.expect("read intent");
            leader
                .fenced_put(shard, &intent, b"{}".to_vec())
                .await
                .expect("intent");
            leader.release_budget(lease).await;
        }
        let per = t0.elapsed().as_secs_f64() * 1e3 / n as f64;
        println!(
            "{{\"bench\":\"execution_overhead\",\"executions\":{n},\"ms_per_execution\":{per:.2}}}"
        );
    }

    // Knowledge: N guard records written on the leader, until all are in
    // etcd and until all are applied to the standby's store.
    let dl = tempfile::tempdir().expect("dir");
    let ds = tempfile::tempdir().expect("dir");
    let sl = KnowledgeStore::open(dl.path(), Duration::from_secs(10)).expect("store");
    let ss = KnowledgeStore::open(ds.path(), Duration::from_secs(10)).expect("store");
    let cl = replication::start(leader, &sl);
    let _cs = replication::start(standby, &ss);
    let n = 5000usize;
    let t0 = Instant::now();
    let writes: Vec<_> = (0..n)
        .map(|i| {
            sl.put_record_async(
                GUARDS_TREE,
                &format!("silence/c{i}"),
                &serde_json::json!({"by": "bench", "until": i}),
            )
        })
        .collect();
    for w in futures::future::join_all(writes).await {
        w.expect("write");
    }
    let local = t0.elapsed();
    until(Duration::from_secs(60), || {
        cl.published.load(Ordering::Relaxed) >= n as u64
    })
    .await;
    let published = t0.elapsed();
    let count = || {
        ss.list_records::<serde_json::Value>(GUARDS_TREE, usize::MAX)
            .map(|v| v.len())
            .unwrap_or(0)
    };
    until(Duration::from_secs(60), || count() >= n).await;
    let applied = t0.elapsed();
    println!(
        "{{\"bench\":\"replication\",\"records\":{n},\"local_ms\":{:.0},\"published_ms\":{:.0},\"applied_on_standby_ms\":{:.0},\"records_per_s\":{:.0},\"dropped\":{}}}",
        local.as_secs_f64() * 1e3,
        published.as_secs_f64() * 1e3,
        applied.as_secs_f64() * 1e3,
        n as f64 / applied.as_secs_f64(),
        cl.dropped.load(Ordering::Relaxed)
    );
}
