//! Incremental incident analysis (criterion), group `analysis`:
//!
//! * `full/N` — build the incident index from a batch of N distinct
//!   violations over 50 components, 4 signals, onsets spread over 270 s,
//!   then diagnose every incident (what a start or a full reconcile costs);
//! * `update/100000` — one new violation into a 100 000-violation index,
//!   and its incident diagnosed again (what each new alert costs);
//! * `duplicate/100000` — a re-sent violation (nothing to do).
//!
//! ```text
//! cargo bench -p mapek-actors --bench analysis
//! ```

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use mapek_actors::incident::IncidentIndex;
use mapek_actors::model::{Severity, Signal, Violation};
use mapek_actors::settings::AnalyzeSettings;

const SIGNALS: [Signal; 4] = [
    Signal::Latency,
    Signal::Failure,
    Signal::Throughput,
    Signal::Policy,
];

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
}

fn violation(i: usize) -> Arc<Violation> {
    let onset = t0() + Duration::milliseconds(((i * 7919) % 270_000) as i64);
    Arc::new(Violation {
        id: format!("v-{i}"),
        fingerprint: format!("fp-{i:08}"),
        rule: "rule".into(),
        severity: if i % 3 == 0 {
            Severity::Critical
        } else {
            Severity::Warning
        },
        component: format!("svc-{:02}", i % 50),
        metric: "metric".into(),
        value: 1.0,
        labels: Default::default(),
        signal: SIGNALS[(i / 50) % 4],
        first_seen: onset,
        observed_at: onset,
        source: "alertmanager".into(),
    })
}

fn settings() -> AnalyzeSettings {
    AnalyzeSettings {
        max_window_violations: 1_000_000,
        ..AnalyzeSettings::default()
    }
}

fn now() -> DateTime<Utc> {
    t0() + Duration::seconds(280)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("analysis");
    for n in [10_000usize, 100_000] {
        let batch: Vec<Arc<Violation>> = (0..n).map(violation).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.sample_size(if n >= 100_000 { 10 } else { 30 });
        g.bench_with_input(BenchmarkId::new("full", n), &batch, |b, batch| {
            b.iter_batched(
                || batch.clone(),
                |batch| {
                    let mut ix = IncidentIndex::new(&settings());
                    for v in batch {
                        ix.insert(v);
                    }
                    let reports = ix.diagnose_all(now(), "bench");
                    assert_eq!(reports.len(), 50);
                    (ix, reports)
                },
                BatchSize::PerIteration,
            )
        });
    }
    let n = 100_000usize;
    let mut ix = IncidentIndex::new(&settings());
    for i in 0..n {
        ix.insert(violation(i));
    }
    let _ = ix.diagnose_all(now(), "bench");
    let mut next = n;
    g.throughput(Throughput::Elements(1));
    g.sample_size(100);
    g.bench_function(BenchmarkId::new("update", n), |b| {
        b.iter_batched(
            || {
                next += 1;
                violation(next)
            },
            |v| {
                ix.insert(v);
                ix.diagnose_dirty(now(), "bench", true)
            },
            BatchSize::SmallInput,
        )
    });
    let dup = violation(7);
    g.bench_function(BenchmarkId::new("duplicate", n), |b| {
        b.iter(|| {
            ix.insert(dup.clone());
            ix.diagnose_dirty(now(), "bench", true)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
