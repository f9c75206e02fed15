//! Benchmarks of the MAPE-K loop (criterion).
//!
//! Groups:
//!
//! * `analyze` — `analyze()` over windows of N = 100, 1 000, 10 000 and
//!   100 000 distinct violations with mixed signals, 50 components and
//!   onsets spread over the 300 s window; and, from N = 1 000 up,
//!   `ViolationWindow::observe` of a batch of N violations into an empty
//!   window (`observe_insert/N`) and into a window already holding the same
//!   fingerprints (`observe_update/N`, the re-observation path).
//!   Throughput is in violations, so a flat elements/s across sizes means
//!   linear scaling (n log n shows as a slow decline, n² as a collapse).
//!   Expect a drop in elements/s between 10 000 and 100 000 that is not
//!   algorithmic: 100 000 violations (~45 MB with their strings) outgrow the
//!   CPU caches; compare with the `baseline_*` yardsticks.
//! * `detectors` — each detector alone (`temporal`, `spatial`, `causal`,
//!   `frequency`) over 10 000 and 100 000 violations, next to
//!   `baseline_sort` (a std sort of the same references by onset).
//! * `monitor_apply` — `ActiveViolations::apply` of a complete batch of N
//!   violations of which half are already active (the other half of the
//!   active set resolves because the batch is complete), next to
//!   `baseline_clone_batch` (cloning the batch).
//! * `plan` — `plan()` for a typical multi-cause analysis, without learned
//!   statistics and with statistics for every (cause, action) pair (which
//!   adds learned alternative policies).
//! * `store` — the sled store on a real file in a temporary directory:
//!   `record_outcome` (one transaction over `outcomes` + `stats`, then the
//!   flush the API always does), `put_policy` (insert + flush), `put_analysis`
//!   (insert, no flush), `put_analysis` + `flush` (isolates the fsync cost)
//!   and `flush` of a clean database. `record_outcome` and `put_policy`
//!   always flush: the store has no unflushed variant of them.
//! * `reaction` — the real actor loop (supervisor, all five phases, sled
//!   store) in an actix system with real time: `ScriptedSource` (empty),
//!   `RecordingEffector`, `ScriptedProbe`, monitor interval 1 s, cooldown 0,
//!   verification window 0 s. Each iteration pushes a webhook-style batch
//!   (`Observe`, `complete: false`) of three latency violations on a fresh
//!   component into the Monitor and measures until the `Verified` event of
//!   that chain; it then resolves the batch (not timed). The criterion
//!   figure is the time to `Verified`; afterwards p50/p95/max of the time to
//!   `Executed` and to `Verified` over every run are printed.
//!
//! Run (from the workspace root):
//!
//! ```text
//! cargo bench --bench loop -- --warm-up-time 1 --measurement-time 3
//! cargo bench --bench loop -- detectors      # one group
//! cargo test --bench loop                    # each bench once (CI)
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{System, SystemRunner};
use chrono::{DateTime, Utc};
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use mapek_actors::analyze::{
    analyze, detect_causal, detect_frequency, detect_spatial, detect_temporal, ViolationWindow,
};
use mapek_actors::clock::SystemClock;
use mapek_actors::events::LoopEvent;
use mapek_actors::execute::EffectorRouter;
use mapek_actors::messages::{Observe, Shutdown};
use mapek_actors::metrics::Metrics;
use mapek_actors::model::{
    new_id, ActionType, AnalysisResult, LearnedStats, OutcomeType, PolicyOutcome,
    RemediationPolicy, RootCause, Severity, Signal, Timestamp, Violation,
};
use mapek_actors::monitor::ActiveViolations;
use mapek_actors::plan::{plan, PlanDecision};
use mapek_actors::settings::{AnalyzeSettings, PlanSettings};
use mapek_actors::store::KnowledgeStore;
use mapek_actors::supervisor::{start_loop, LoopHandle, LoopParts, LoopSettings};
use mapek_actors::testing::{RecordingEffector, ScriptedProbe, ScriptedSource};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;

/// Length of the analysis window used by the synthetic data, seconds.
const WINDOW_SECONDS: i64 = 300;

/// Window sizes of the `analyze` group.
const WINDOW_SIZES: [usize; 4] = [100, 1_000, 10_000, 100_000];

/// `observe` is measured from this window size up (keeps the run short).
const OBSERVE_MIN_SIZE: usize = 1_000;

/// Input sizes of the `detectors` group.
const DETECTOR_SIZES: [usize; 2] = [10_000, 100_000];

/// Batch sizes of the `monitor_apply` group.
const APPLY_SIZES: [usize; 2] = [1_000, 10_000];

const SIGNALS: [Signal; 8] = [
    Signal::Latency,
    Signal::Failure,
    Signal::Throughput,
    Signal::Policy,
    Signal::Node,
    Signal::Network,
    Signal::Resource,
    Signal::Other,
];

const SEVERITIES: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

/// Deterministic pseudo-random mixing (splitmix64), so every run measures the
/// same data.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn t0() -> Timestamp {
    DateTime::from_timestamp(1_700_000_000, 0).expect("valid timestamp")
}

/// End of the synthetic window: every onset and observation is before it.
fn window_end() -> Timestamp {
    t0() + chrono::Duration::seconds(WINDOW_SECONDS)
}

fn violation(
    fingerprint: String,
    component: String,
    signal: Signal,
    severity: Severity,
    first_seen: Timestamp,
    observed_at: Timestamp,
) -> Violation {
    let rule = format!("rule_{}", signal_name(signal));
    let labels = BTreeMap::from([
        ("component".to_string(), component.clone()),
        ("alertname".to_string(), rule.clone()),
    ]);
    Violation {
        id: format!("v-{fingerprint}"),
        fingerprint,
        rule: rule.clone(),
        severity,
        component,
        metric: format!("metric_{rule}"),
        value: 2.0,
        labels,
        signal,
        first_seen,
        observed_at,
        source: "bench".into(),
    }
}

fn signal_name(s: Signal) -> &'static str {
    match s {
        Signal::Latency => "latency",
        Signal::Throughput => "throughput",
        Signal::Failure => "failure",
        Signal::Policy => "policy",
        Signal::Node => "node",
        Signal::Network => "network",
        Signal::Resource => "resource",
        Signal::Other => "other",
    }
}

/// `n` distinct violations (`fp{offset+i}`) with mixed signals, severities
/// and 50 components; onsets pseudo-randomly spread over the first 270 s of
/// the window, each observed up to 30 s after its onset (`observed_shift`
/// seconds later still, for re-observations).
fn synthetic(n: usize, offset: usize, observed_shift: i64) -> Vec<Violation> {
    let span_ms = (WINDOW_SECONDS - 30) * 1000;
    (offset..offset + n)
        .map(|i| {
            let h = mix(i as u64);
            let onset_ms = (h % span_ms as u64) as i64;
            let lag_ms = ((h >> 20) % 30_000) as i64;
            let first_seen = t0() + chrono::Duration::milliseconds(onset_ms);
            let observed_at = first_seen
                + chrono::Duration::milliseconds(lag_ms)
                + chrono::Duration::seconds(observed_shift);
            violation(
                format!("fp{i}"),
                format!("svc-{}", (h >> 8) % 50),
                SIGNALS[((h >> 40) % SIGNALS.len() as u64) as usize],
                SEVERITIES[((h >> 48) % SEVERITIES.len() as u64) as usize],
                first_seen,
                observed_at.min(window_end()),
            )
        })
        .collect()
}

fn window_of(vs: &[Violation]) -> ViolationWindow {
    let mut w = ViolationWindow::new(vs.len(), chrono::Duration::seconds(WINDOW_SECONDS));
    w.observe(vs);
    w
}

fn bench_analyze(c: &mut Criterion) {
    let settings = AnalyzeSettings::default();
    let mut g = c.benchmark_group("analyze");
    // 100 000 takes up to ~0.6 s per iteration: 10 samples keep the group short.
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for n in WINDOW_SIZES {
        let batch = synthetic(n, 0, 0);
        let again = synthetic(n, 0, 5);
        let full = window_of(&batch);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("analyze", n), &full, |b, w| {
            b.iter(|| analyze(w, "bench", window_end(), &settings))
        });
        if n < OBSERVE_MIN_SIZE {
            continue;
        }
        g.bench_with_input(BenchmarkId::new("observe_insert", n), &batch, |b, batch| {
            b.iter_batched(
                || ViolationWindow::new(n, chrono::Duration::seconds(WINDOW_SECONDS)),
                |mut w| {
                    w.observe(batch);
                    w
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_with_input(BenchmarkId::new("observe_update", n), &again, |b, again| {
            b.iter_batched(
                || full.clone(),
                |mut w| {
                    w.observe(again);
                    w
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn bench_detectors(c: &mut Criterion) {
    let s = AnalyzeSettings::default();
    let now = window_end();
    let mut g = c.benchmark_group("detectors");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    for n in DETECTOR_SIZES {
        let vs = synthetic(n, 0, 0);
        let refs: Vec<&Violation> = vs.iter().collect();
        let refs = refs.as_slice();
        g.throughput(Throughput::Elements(n as u64));
        // Yardstick: a plain std sort of the same references by onset. Its
        // time per element grows with n as much as the detectors' do
        // (cache misses once the data outgrows the caches), so growth
        // beyond n log n that the baseline shares is not the detectors'.
        g.bench_with_input(BenchmarkId::new("baseline_sort", n), refs, |b, r| {
            b.iter(|| {
                let mut v = r.to_vec();
                v.sort_by(|a, b| {
                    a.first_seen
                        .cmp(&b.first_seen)
                        .then_with(|| a.fingerprint.cmp(&b.fingerprint))
                });
                v
            })
        });
        g.bench_with_input(BenchmarkId::new("temporal", n), refs, |b, r| {
            b.iter(|| detect_temporal(r, &s.temporal))
        });
        g.bench_with_input(BenchmarkId::new("spatial", n), refs, |b, r| {
            b.iter(|| detect_spatial(r, &s.spatial))
        });
        g.bench_with_input(BenchmarkId::new("causal", n), refs, |b, r| {
            b.iter(|| detect_causal(r, &s.causal))
        });
        g.bench_with_input(BenchmarkId::new("frequency", n), refs, |b, r| {
            b.iter(|| detect_frequency(r, now, &s.frequency))
        });
    }
    g.finish();
}

fn bench_monitor_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("monitor_apply");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    for n in APPLY_SIZES {
        // Active: fp0 .. fp{n}. Batch: fp{n/2} .. fp{3n/2}, so half of the
        // batch is already active, half is new, and the half of the active
        // set missing from this complete batch resolves.
        let mut active = ActiveViolations::default();
        active.apply("prometheus", &synthetic(n, 0, 0), &[], true);
        let batch = synthetic(n, n / 2, 10);
        let probe = active.clone().apply("prometheus", &batch, &[], true);
        assert_eq!(
            (probe.new, probe.duplicates, probe.resolved.len()),
            (n - n / 2, n / 2, n / 2),
            "half of the batch is already active"
        );
        g.throughput(Throughput::Elements(n as u64));
        // Yardstick: cloning the batch (the allocations apply makes anyway).
        g.bench_with_input(
            BenchmarkId::new("baseline_clone_batch", n),
            &batch,
            |b, batch| b.iter(|| batch.clone()),
        );
        g.bench_with_input(
            BenchmarkId::new("complete_half_active", n),
            &batch,
            |b, batch| {
                b.iter_batched(
                    || active.clone(),
                    |mut a| {
                        let applied = a.apply("prometheus", batch, &[], true);
                        (a, applied)
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

/// An incident on two components: latency, then failures, low throughput
/// and a policy violation, all within the last minute.
fn typical_analysis() -> AnalysisResult {
    let now = window_end();
    let at = |s: i64| now - chrono::Duration::seconds(s);
    let spec: [(&str, &str, Signal, Severity, i64); 12] = [
        ("l1", "charter", Signal::Latency, Severity::Warning, 58),
        ("l2", "charter", Signal::Latency, Severity::Warning, 55),
        ("l3", "validator", Signal::Latency, Severity::Warning, 50),
        ("l4", "charter", Signal::Latency, Severity::Warning, 45),
        ("f1", "charter", Signal::Failure, Severity::Critical, 40),
        ("f2", "validator", Signal::Failure, Severity::Critical, 35),
        ("f3", "charter", Signal::Failure, Severity::Critical, 30),
        ("t1", "charter", Signal::Throughput, Severity::Warning, 25),
        ("t2", "charter", Signal::Throughput, Severity::Warning, 20),
        ("t3", "validator", Signal::Throughput, Severity::Warning, 15),
        ("p1", "charter", Signal::Policy, Severity::Critical, 10),
        ("p2", "validator", Signal::Policy, Severity::Warning, 5),
    ];
    let vs: Vec<Violation> = spec
        .iter()
        .map(|(fp, comp, sig, sev, ago)| {
            violation(fp.to_string(), comp.to_string(), *sig, *sev, at(*ago), now)
        })
        .collect();
    analyze(
        &window_of(&vs),
        "chain-bench",
        now,
        &AnalyzeSettings::default(),
    )
}

/// Statistics for every (cause, action) pair: ten outcomes each, successful
/// for half of the pairs, so that learned alternatives are proposed.
fn learned_stats() -> LearnedStats {
    let mut stats = LearnedStats::default();
    for (ci, cause) in RootCause::ALL.into_iter().enumerate() {
        for (ai, action) in ActionType::ALL.into_iter().enumerate() {
            let outcome_type = if (ci + ai) % 2 == 0 {
                OutcomeType::Success
            } else {
                OutcomeType::Ineffective
            };
            for _ in 0..10 {
                stats.record(&outcome(cause, vec![action], outcome_type), 30);
            }
        }
    }
    stats
}

fn outcome(cause: RootCause, actions: Vec<ActionType>, outcome_type: OutcomeType) -> PolicyOutcome {
    PolicyOutcome {
        execution_id: new_id("exe"),
        policy_id: new_id("pol"),
        root_cause: cause,
        actions,
        executed_at: Utc::now(),
        outcome_type,
        violations_before: Some(4),
        violations_after: Some(0),
        violations_resolved: 4,
        time_to_effect_seconds: 42.0,
        success_confidence: outcome_type.confidence(),
    }
}

fn policies_of(d: PlanDecision) -> Vec<RemediationPolicy> {
    match d {
        PlanDecision::Policies(p) => p,
        other => panic!("the typical analysis should plan policies, got {other:?}"),
    }
}

fn bench_plan(c: &mut Criterion) {
    let analysis = typical_analysis();
    let settings = PlanSettings::default();
    let none = LearnedStats::default();
    let learned = learned_stats();
    let now = window_end();
    let without = policies_of(plan(&analysis, &none, &settings, now));
    let with = policies_of(plan(&analysis, &learned, &settings, now));
    assert!(!without.is_empty() && !with.is_empty());
    let mut g = c.benchmark_group("plan");
    g.bench_function("typical_no_stats", |b| {
        b.iter(|| plan(&analysis, &none, &settings, now))
    });
    g.bench_function("typical_learned_stats", |b| {
        b.iter(|| plan(&analysis, &learned, &settings, now))
    });
    g.finish();
}

fn bench_store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KnowledgeStore::open(dir.path(), Duration::from_secs(10)).expect("open store");
    let analysis = typical_analysis();
    let template = policies_of(plan(
        &analysis,
        &LearnedStats::default(),
        &PlanSettings::default(),
        window_end(),
    ))
    .remove(0);
    // Some history, so the trees are not trivially small.
    for _ in 0..200 {
        let mut p = template.clone();
        p.id = new_id("pol");
        store.put_policy(&p).expect("seed policy");
    }
    let mut g = c.benchmark_group("store");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    g.bench_function("record_outcome_with_flush", |b| {
        b.iter_batched(
            || {
                outcome(
                    RootCause::ValidationLatency,
                    vec![ActionType::ScaleUp, ActionType::UpdateConfiguration],
                    OutcomeType::Success,
                )
            },
            |o| store.record_outcome(&o, 30).expect("record outcome"),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("put_policy_with_flush", |b| {
        b.iter_batched(
            || {
                let mut p = template.clone();
                p.id = new_id("pol");
                p
            },
            |p| store.put_policy(&p).expect("put policy"),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("put_analysis_no_flush", |b| {
        b.iter_batched(
            || {
                let mut a = analysis.clone();
                a.id = new_id("ana");
                a
            },
            |a| store.put_analysis(&a).expect("put analysis"),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("put_analysis_then_flush", |b| {
        b.iter_batched(
            || {
                let mut a = analysis.clone();
                a.id = new_id("ana");
                a
            },
            |a| {
                store.put_analysis(&a).expect("put analysis");
                store.flush().expect("flush")
            },
            BatchSize::SmallInput,
        )
    });
    store.flush().expect("flush");
    g.bench_function("flush_clean", |b| b.iter(|| store.flush().expect("flush")));
    g.finish();
    store.close().expect("close store");
}

/// The running loop of the `reaction` group and what it measured.
struct ReactionRig {
    sys: SystemRunner,
    handle: LoopHandle,
    events: Receiver<LoopEvent>,
    next_component: u64,
    to_executed: Vec<Duration>,
    to_verified: Vec<Duration>,
    _dir: tempfile::TempDir,
}

impl ReactionRig {
    fn start() -> ReactionRig {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KnowledgeStore::open(dir.path(), Duration::from_secs(10)).expect("open store");
        let source = ScriptedSource::new("scripted");
        source.set(Ok(Vec::new()));
        let mut settings = LoopSettings::default();
        settings.monitor.interval_seconds = 1;
        settings.plan.cooldown_seconds = 0;
        settings.execute.verification_window_seconds = 0;
        let sys = System::new();
        let handle = sys.block_on(async {
            start_loop(LoopParts {
                settings,
                sources: vec![Arc::new(source)],
                effectors: EffectorRouter::all_to(Arc::new(RecordingEffector::new())),
                probe: Some(Arc::new(ScriptedProbe::new(vec![Ok(0)]))),
                store,
                clock: Arc::new(SystemClock),
                metrics: Arc::new(Metrics::new()),
                chaos: None,
                events: None,
                alert_state: None,
                escalations: None,
                leadership: None,
            })
        });
        let events = handle.events.subscribe();
        ReactionRig {
            sys,
            handle,
            events,
            next_component: 0,
            to_executed: Vec::new(),
            to_verified: Vec::new(),
            _dir: dir,
        }
    }

    /// One reaction; returns the time from the push to `Verified`.
    fn react(&mut self) -> Duration {
        let component = format!("bench-{}", self.next_component);
        self.next_component += 1;
        let ReactionRig {
            sys,
            handle,
            events,
            ..
        } = self;
        let (executed, verified) = sys.block_on(react_once(handle, events, &component));
        self.to_executed.push(executed);
        self.to_verified.push(verified);
        verified
    }

    fn report(&self) {
        if self.to_verified.is_empty() {
            return;
        }
        println!(
            "reaction over {} runs (incl. warm-up), push -> Executed: {}",
            self.to_executed.len(),
            percentiles(&self.to_executed)
        );
        println!(
            "reaction over {} runs (incl. warm-up), push -> Verified: {}",
            self.to_verified.len(),
            percentiles(&self.to_verified)
        );
    }

    fn stop(self) {
        let ReactionRig { sys, handle, .. } = self;
        sys.block_on(async {
            let _ = handle.supervisor.send(Shutdown).await;
        });
    }
}

fn percentiles(samples: &[Duration]) -> String {
    let mut v = samples.to_vec();
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.2?}  p95 {:.2?}  max {:.2?}",
        at(0.50),
        at(0.95),
        at(1.0)
    )
}

/// Pushes three latency violations on `component` into the Monitor, as the
/// Alertmanager webhook does, and waits for its chain to be executed and
/// verified; then resolves them again (untimed).
async fn react_once(
    h: &LoopHandle,
    rx: &mut Receiver<LoopEvent>,
    component: &str,
) -> (Duration, Duration) {
    // Forget events of earlier iterations.
    while let Ok(_) | Err(TryRecvError::Lagged(_)) = rx.try_recv() {}
    let now = Utc::now();
    let batch: Vec<Violation> = (0..3)
        .map(|i| {
            violation(
                format!("{component}-lat{i}"),
                component.to_string(),
                Signal::Latency,
                Severity::Warning,
                now,
                now,
            )
        })
        .collect();
    let fingerprints: Vec<String> = batch.iter().map(|v| v.fingerprint.clone()).collect();

    let started = Instant::now();
    let ack = h
        .monitor
        .send(Observe {
            source: "webhook".into(),
            violations: batch,
            resolved: Vec::new(),
            complete: false,
        })
        .await
        .expect("monitor reachable")
        .expect("batch accepted");
    assert_eq!(ack.new, 3, "fresh component, fresh violations");
    let wait = async {
        let mut chain: Option<String> = None;
        let mut executed = None;
        loop {
            let event = match rx.recv().await {
                Ok(e) => e,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => panic!("event bus closed"),
            };
            match event {
                LoopEvent::Detected { chain_id, new, .. } if chain.is_none() && new == 3 => {
                    chain = Some(chain_id);
                }
                LoopEvent::Executed { chain_id, .. } if chain.as_ref() == Some(&chain_id) => {
                    executed = Some(started.elapsed());
                }
                LoopEvent::Verified { chain_id, .. } if chain.as_ref() == Some(&chain_id) => {
                    let verified = started.elapsed();
                    return (executed.unwrap_or(verified), verified);
                }
                LoopEvent::Escalated { reason, .. } => {
                    panic!("the loop escalated instead of acting: {reason}")
                }
                _ => {}
            }
        }
    };
    let times = tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("chain verified within 30 s");

    h.monitor
        .send(Observe {
            source: "webhook".into(),
            violations: Vec::new(),
            resolved: fingerprints,
            complete: false,
        })
        .await
        .expect("monitor reachable")
        .expect("resolution accepted");
    times
}

fn bench_reaction(c: &mut Criterion) {
    let mut rig = ReactionRig::start();
    let mut g = c.benchmark_group("reaction");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    g.bench_function("push_to_verified", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.react()).sum())
    });
    g.finish();
    rig.report();
    rig.stop();
}

criterion_group!(
    benches,
    bench_analyze,
    bench_detectors,
    bench_monitor_apply,
    bench_plan,
    bench_store,
    bench_reaction
);
criterion_main!(benches);
