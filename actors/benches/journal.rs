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

criterion_group!(benches, journal);
criterion_main!(benches);
