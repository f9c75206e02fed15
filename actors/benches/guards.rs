//! What the safety guards and the learner add to the reaction path
//! (criterion), group `guards`:
//!
//! * `admission/plain` — one approved policy through the admission queue
//!   (enqueue, admit) with no guard, behind 1000 held policies;
//! * `admission/guarded` — the same with every guard consulted (pause,
//!   silences, flapping, breakers, disruption budget, rate limits), the
//!   policy's reservation and its state changes taken for Knowledge, with
//!   50 restarts in the budget's window, 1000 components' rate windows and
//!   200 open breakers in the state;
//! * `choose/ranked` — the candidate remedies of a diagnosis planned and
//!   the first taken (no sampling);
//! * `choose/thompson` — the same candidates chosen by Thompson sampling
//!   over learned evidence, with the autonomy verdict.
//!
//! The guards' cost is `guarded − plain` plus `thompson − ranked`.
//!
//! ```text
//! cargo bench -p mapek-actors --bench guards
//! ```

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use mapek_actors::admission::Admission;
use mapek_actors::learn;
use mapek_actors::messages::ChainTrace;
use mapek_actors::model::{
    ActionType, AnalysisResult, LearnedStats, RankedCause, RemedyStats, RootCause, Severity,
};
use mapek_actors::plan::{plan, PlanDecision};
use mapek_actors::safety::{Gate, Guards};
use mapek_actors::settings::{PlanSettings, SafetySettings};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn analysis(component: &str) -> AnalysisResult {
    AnalysisResult {
        id: "ana".into(),
        chain_id: "c".into(),
        analyzed_at: chrono::Utc::now(),
        patterns: Vec::new(),
        root_causes: vec![RankedCause {
            cause: RootCause::NodeCrash,
            confidence: 0.9,
            components: vec![component.into()],
        }],
        recommendations: Vec::new(),
        confidence: 0.9,
        violation_count: 5,
        max_severity: Some(Severity::Critical),
        components: vec![component.into()],
        incident_id: Some(format!("inc-{component}")),
    }
}

fn policy(component: &str) -> mapek_actors::model::RemediationPolicy {
    match plan(
        &analysis(component),
        &LearnedStats::default(),
        &PlanSettings::default(),
        chrono::Utc::now(),
    ) {
        PlanDecision::Policies(mut p) => p.remove(0),
        other => panic!("no policy: {other:?}"),
    }
}

/// Guards with 1000 components' rate windows and 100 open breakers.
fn busy_guards() -> Guards {
    let mut s = SafetySettings::default();
    s.disruption_budget.max_actions = 100;
    let mut g = Guards::new(s);
    let now = chrono::Utc::now();
    // 50 restarts in the budget's window, and 1000 components each with
    // an action in its rate window.
    for i in 0..1000 {
        let mut p = policy(&format!("other-{i}"));
        if i >= 50 {
            for a in &mut p.actions {
                a.action_type = ActionType::ScaleUp;
            }
        }
        g.admitted(&p, now);
    }
    for i in 0..100 {
        // Another cause: its breakers do not concern the measured policy.
        let mut p = policy(&format!("broken-{i}"));
        p.root_cause = RootCause::PolicyMisconfiguration;
        let mut e = mapek_actors::execute::in_progress(&p, format!("e{i}"), "c".into(), now);
        e.status = mapek_actors::model::ExecutionStatus::Failed;
        for _ in 0..3 {
            g.record_execution(&e, &p, now);
        }
    }
    g.take_dirty();
    g
}

fn queue_with_held() -> Admission {
    let mut a = Admission::new(16, Duration::from_secs(600));
    // 16 running on other components fill the slots? No: 1000 queued
    // behind a cooldown each, so they are looked at and skipped.
    let now = tokio::time::Instant::now();
    for i in 0..1000 {
        let c = format!("held-{i}");
        a.hold_until(&c, now + Duration::from_secs(3600));
        a.enqueue(
            policy(&c),
            ChainTrace::start(chrono::Utc::now()),
            Severity::Warning,
        );
    }
    a
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut g = c.benchmark_group("guards");
    g.bench_function("admission/plain", |b| {
        b.iter_batched(
            || (queue_with_held(), policy("target")),
            |(mut a, p)| {
                a.enqueue(p, ChainTrace::start(chrono::Utc::now()), Severity::Critical);
                let admitted = a.admit(tokio::time::Instant::now());
                assert_eq!(admitted.len(), 1);
                (a, admitted)
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("admission/guarded", |b| {
        b.iter_batched(
            || (queue_with_held(), busy_guards(), policy("target")),
            |(mut a, mut guards, p)| {
                a.enqueue(p, ChainTrace::start(chrono::Utc::now()), Severity::Critical);
                let now = chrono::Utc::now();
                guards.begin_pass(now);
                let pass = a.admit_with(tokio::time::Instant::now(), |p| {
                    let gate = guards.gate(p, now);
                    if gate == Gate::Admit {
                        guards.admitted(p, now);
                    }
                    gate
                });
                assert_eq!(pass.admitted.len(), 1);
                let dirty = guards.take_dirty();
                (a, guards, pass, dirty)
            },
            BatchSize::LargeInput,
        )
    });
    let settings = PlanSettings::default();
    let mut learned = LearnedStats::default();
    let cands = match learn::candidates(&analysis("api"), &learned, &settings, chrono::Utc::now()) {
        PlanDecision::Policies(p) => p,
        other => panic!("no candidates: {other:?}"),
    };
    for (i, p) in cands.iter().enumerate() {
        learned
            .by_remedy
            .entry(RootCause::NodeCrash)
            .or_default()
            .insert(
                learn::remedy_of(p),
                RemedyStats {
                    successes: i as u64,
                    failures: 3,
                },
            );
    }
    g.bench_function("choose/ranked", |b| {
        b.iter(|| plan(&analysis("api"), &learned, &settings, chrono::Utc::now()))
    });
    let mut rng = StdRng::seed_from_u64(1);
    let mut guards = busy_guards();
    g.bench_function("choose/thompson", |b| {
        b.iter(|| {
            let now = chrono::Utc::now();
            let PlanDecision::Policies(c) =
                learn::candidates(&analysis("api"), &learned, &settings, now)
            else {
                panic!("no candidates")
            };
            let ch = learn::choose(&c, &learned, &settings, &mut rng, |p| {
                p.actions.iter().find_map(|a| {
                    guards.breaker_blocks(
                        &mapek_actors::safety::action_breaker(p.root_cause, a.action_type),
                        None,
                        now,
                    )
                })
            })
            .expect("a choice");
            let v = learn::autonomy(&c[ch.index], &learned, &settings);
            (ch, v, ActionType::ALL.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
