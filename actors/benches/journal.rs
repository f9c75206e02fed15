//! Knowledge journal throughput: records made durable per second with 1
//! and 64 concurrent submitters (each waits for its acknowledgement before
//! submitting the next), through the full store path (journal append,
//! group fsync, sled apply).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mapek_actors::store::KnowledgeStore;

const RECORDS: u64 = 512;

/// Writes `RECORDS` records with `submitters` concurrent threads; returns
/// the elapsed time.
fn run(store: &Arc<KnowledgeStore>, submitters: u64) -> Duration {
    let per = RECORDS / submitters;
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..submitters {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..per {
                    let value = serde_json::json!({"t": t, "i": i, "pad": "x".repeat(200)});
                    store
                        .put_record("bench", &format!("{t:03}-{i:06}"), &value)
                        .expect("durable write");
                }
            });
        }
    });
    started.elapsed()
}

fn journal(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        Arc::new(KnowledgeStore::open(dir.path(), Duration::from_secs(10)).expect("open store"));
    let mut g = c.benchmark_group("journal");
    g.sample_size(10);
    g.throughput(Throughput::Elements(RECORDS));
    for submitters in [1u64, 64] {
        g.bench_function(format!("durable_records_{submitters}_submitters"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| run(&store, submitters)).sum())
        });
        let before = store.journal_counters();
        let (f0, r0) = (before.fsyncs.get(), before.records.get());
        run(&store, submitters);
        let after = store.journal_counters();
        eprintln!(
            "journal/{submitters} submitters: {} records, {} fsyncs",
            after.records.get() - r0,
            after.fsyncs.get() - f0
        );
    }
    g.finish();
}

/// Opening a store: the start-up check reads the whole journal (snapshot
/// and segments) and compares every record of sled with it. Stores of
/// 20 000 small records (~1 KB) and of 1 000 large ones (100 KB).
fn open_and_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("open_and_check");
    g.sample_size(10);
    for (name, records, pad) in [
        ("20000x1KB", 20_000u64, 1_000usize),
        ("1000x100KB", 1_000, 100_000),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store =
                KnowledgeStore::open(dir.path(), Duration::from_secs(60)).expect("open store");
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async {
                let mut pending = Vec::new();
                for i in 0..records {
                    let value = serde_json::json!({"i": i, "pad": "x".repeat(pad)});
                    pending.push(store.submit(&mapek_actors::journal::Record::Put {
                        tree: "bench".into(),
                        key: format!("{i:08}"),
                        value,
                    }));
                    if pending.len() >= 256 {
                        for f in pending.drain(..) {
                            f.await.expect("durable");
                        }
                    }
                }
                for f in pending {
                    f.await.expect("durable");
                }
            });
            store.close().expect("close");
        }
        g.throughput(Throughput::Elements(records));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(60))
                        .expect("open store");
                    total += started.elapsed();
                    assert_eq!(store.integrity().compared, records);
                    store.close().expect("close");
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, journal, open_and_check);
criterion_main!(benches);
