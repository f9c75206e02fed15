//! Watching the loop: actor metrics on `/metrics` (read over real HTTP),
//! exact mailbox depth under a flood while a handler is held, shedding,
//! and `/ready` answering 503 with the reason when a phase actor is down or
//! the knowledge store is closed. The daemon runs in-process (its HTTP
//! server on a loopback port, a real sled store in a temp dir); the edges
//! are the test doubles of `mapek_actors::testing` plus a gated effector.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use mapek::config::Config;
use mapek::daemon::{self, DaemonParts, Running};
use mapek_actors::clock::SystemClock;
use mapek_actors::events::LoopEvent;
use mapek_actors::execute::EffectorRouter;
use mapek_actors::mailbox::FaultInjector;
use mapek_actors::messages::{ChainTrace, PolicyApproved, Shutdown};
use mapek_actors::metrics::ActorKind;
use mapek_actors::model::{
    RemediationAction, RemediationPolicy, RollbackStep, Severity, Signal, Violation,
};
use mapek_actors::ports::{Effector, EffectorError};
use mapek_actors::store::KnowledgeStore;
use mapek_actors::testing::ScriptedSource;
use serde_json::Value;
use tokio::sync::Semaphore;

/// An effector whose `apply` waits until the test opens the gate.
#[derive(Clone)]
struct GatedEffector {
    gate: Arc<Semaphore>,
}

impl Effector for GatedEffector {
    fn name(&self) -> &str {
        "gated"
    }

    fn apply<'a>(
        &'a self,
        _action: &'a RemediationAction,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(async move {
            let permit = self
                .gate
                .acquire()
                .await
                .map_err(|e| EffectorError::Transient(e.to_string()))?;
            permit.forget();
            Ok(Value::Null)
        })
    }

    fn rollback<'a>(
        &'a self,
        _a: &'a RemediationAction,
        _s: &'a RollbackStep,
        _v: &'a Value,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(async { Ok(Value::Null) })
    }
}

fn incident() -> Vec<Violation> {
    let now = chrono::Utc::now();
    [
        ("lat", Signal::Latency),
        ("fail", Signal::Failure),
        ("tput", Signal::Throughput),
    ]
    .into_iter()
    .map(|(fp, signal)| Violation {
        id: fp.into(),
        fingerprint: fp.into(),
        rule: fp.into(),
        severity: Severity::Critical,
        component: "charter".into(),
        metric: fp.into(),
        value: 1.0,
        labels: Default::default(),
        signal,
        first_seen: now,
        observed_at: now,
        source: "scripted".into(),
    })
    .collect()
}

fn config(dir: &std::path::Path, capacity: usize) -> Config {
    let mut cfg = Config::default();
    cfg.monitor.interval_seconds = 1;
    cfg.prometheus.enabled = false;
    cfg.alertmanager.enabled = true;
    cfg.orchestrator.mailbox_capacity = capacity;
    cfg.orchestrator.max_restarts = 1000;
    cfg.execute.verification_window_seconds = 1;
    cfg.knowledge.data_dir = dir.display().to_string();
    cfg
}

async fn start(
    cfg: &Config,
    effector: Arc<dyn Effector>,
    chaos: Option<Arc<dyn FaultInjector>>,
) -> Running {
    let store = KnowledgeStore::open(
        std::path::Path::new(&cfg.knowledge.data_dir),
        Duration::from_secs(5),
    )
    .expect("store");
    let source = ScriptedSource::new("scripted");
    source.set(Ok(incident()));
    let parts = DaemonParts {
        sources: vec![Arc::new(source)],
        effectors: EffectorRouter::all_to(effector),
        probe: None,
        clock: Arc::new(SystemClock),
        chaos,
    };
    daemon::start(cfg, store, parts, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("start")
}

/// Reads one sample of `/metrics` over HTTP.
async fn sample(addr: std::net::SocketAddr, name: &str, labels: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l[prefix.len()..].trim().parse().ok())
}

async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<LoopEvent>,
    mut f: impl FnMut(&LoopEvent) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rx.recv().await {
                Ok(e) if f(&e) => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("bus closed: {e}"),
            }
        }
    })
    .await
    .expect("event within 30 s");
}

fn fake_policy(base: &RemediationPolicy, n: usize) -> PolicyApproved {
    let mut p = base.clone();
    p.id = format!("pol-flood-{n:03}");
    PolicyApproved {
        chain: ChainTrace::start(chrono::Utc::now()),
        policy: p,
    }
}

#[test]
fn mailbox_depth_is_exact_under_a_flood_and_shedding_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 8);
    let gate = Arc::new(Semaphore::new(0));
    let sys = daemon::new_system();
    sys.block_on(async {
        let r = start(&cfg, Arc::new(GatedEffector { gate: gate.clone() }), None).await;
        let h = r.handle.clone();
        let mut rx = h.events.subscribe();
        // Every actor's message series exist from the start, at zero for
        // what has not been handled yet (a dashboard shows idle actors).
        for (actor, message) in [
            ("executor", "Drain"),
            ("planner", "Pause"),
            ("knowledge", "ReclassifyOutcome"),
            ("analyzer", "GetAnalyses"),
        ] {
            let labels = format!("actor=\"{actor}\",message=\"{message}\"");
            assert_eq!(
                sample(r.addr, "mape_k_actor_messages_handled_total", &labels).await,
                Some(0.0),
                "{labels}"
            );
            assert_eq!(
                sample(
                    r.addr,
                    "mape_k_actor_handler_duration_seconds_count",
                    &labels
                )
                .await,
                Some(0.0),
                "{labels}"
            );
        }
        // The loop approves a policy; the Executor is now held inside it.
        wait_event(&mut rx, |e| matches!(e, LoopEvent::Approved { .. })).await;
        let policy = loop {
            if let Some(p) = h
                .store
                .list_policies(None, 10)
                .expect("policies")
                .into_iter()
                .next()
            {
                break p;
            }
            tokio::task::yield_now().await;
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while h.executor.depth() != 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the executor took its message");
        assert_eq!(
            sample(r.addr, "mape_k_actor_mailbox_depth", "actor=\"executor\"").await,
            Some(0.0)
        );

        // Flood: 8 fit (capacity), 5 more are shed, each counted.
        let mut accepted = 0;
        let mut shed = 0;
        for n in 0..13 {
            match h.executor.offer(fake_policy(&policy, n)) {
                Ok(()) => accepted += 1,
                Err(_) => shed += 1,
            }
        }
        assert_eq!((accepted, shed), (8, 5));
        assert_eq!(h.executor.depth(), 8);
        assert_eq!(
            h.metrics
                .mailbox_depth
                .get_or_create(&mapek_actors::metrics::ActorLabels { actor: "executor" })
                .get(),
            8,
            "the exported gauge follows the exact depth"
        );
        assert_eq!(
            sample(
                r.addr,
                "mape_k_actor_messages_shed_total",
                "actor=\"executor\",message=\"PolicyApproved\""
            )
            .await,
            Some(5.0)
        );
        // (Senders that wait for room while a mailbox is held are tested
        // on `PhaseAddr` itself: the Executor runs policies concurrently
        // now, so it no longer holds its mailbox while one runs.)
        gate.add_permits(1000);
        tokio::time::timeout(Duration::from_secs(30), async {
            while h.executor.depth() != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the mailbox drained");
        assert_eq!(
            sample(r.addr, "mape_k_actor_mailbox_depth", "actor=\"executor\"").await,
            Some(0.0)
        );
        let handled = sample(
            r.addr,
            "mape_k_actor_messages_handled_total",
            "actor=\"executor\",message=\"PolicyApproved\"",
        )
        .await
        .expect("handled");
        assert_eq!(handled, 9.0, "1 + 8 handled, the 5 shed ones not");
        let text = reqwest::get(format!("http://{}/metrics", r.addr))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        for actor in [
            "monitor",
            "analyzer",
            "planner",
            "executor",
            "knowledge",
            "supervisor",
        ] {
            for metric in [
                "mape_k_actor_mailbox_depth",
                "mape_k_actor_restarts_total",
                "mape_k_actor_up",
            ] {
                assert!(
                    text.contains(&format!("{metric}{{actor=\"{actor}\"}}")),
                    "{metric} for {actor} missing"
                );
            }
        }
        let has = |name: &str, labels: &str| {
            text.lines().any(|l| {
                (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                    && l.contains(labels)
            })
        };
        assert!(has(
            "mape_k_actor_handler_duration_seconds_bucket",
            "actor=\"executor\",message=\"PolicyApproved\""
        ));
        for (name, labels) in [
            ("mape_k_iteration", ""),
            ("mape_k_violations_detected_total", ""),
            ("mape_k_patterns_detected_total", "kind=\"temporal\""),
            ("mape_k_policies_generated_total", ""),
            ("mape_k_policies_executed_total", ""),
            ("mape_k_policy_executions_total", "status=\"COMPLETED\""),
            ("mape_k_policy_success_rate", ""),
            ("mape_k_cycle_duration_seconds_bucket", ""),
            ("mape_k_phase_duration_seconds_bucket", "phase=\"analysis\""),
            ("mape_k_alerts_received_total", ""),
            ("mape_k_alerts_processed_total", ""),
            (
                "mape_k_effector_call_duration_seconds_bucket",
                "effector=\"gated\",result=\"ok\"",
            ),
            (
                "mape_k_source_query_duration_seconds_bucket",
                "source=\"scripted\",result=\"ok\"",
            ),
            ("mape_k_source_up", "source=\"scripted\"} 1"),
        ] {
            assert!(
                has(name, labels),
                "`{name}` with `{labels}` missing from /metrics"
            );
        }
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}

/// Panics in every handler of one actor: a crash loop.
struct CrashLoop(ActorKind);

impl FaultInjector for CrashLoop {
    fn before_handle(&self, actor: ActorKind, message: &'static str) {
        if actor == self.0 {
            panic!("injected: {actor} cannot handle {message}");
        }
    }
}

#[test]
fn ready_is_503_naming_a_crash_looping_actor_and_a_closed_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 64);
    let sys = daemon::new_system();
    sys.block_on(async {
        let r = start(
            &cfg,
            Arc::new(GatedEffector {
                gate: Arc::new(Semaphore::new(100)),
            }),
            Some(Arc::new(CrashLoop(ActorKind::Analyzer))),
        )
        .await;
        let h = r.handle.clone();
        let mut rx = h.events.subscribe();
        wait_event(&mut rx, |e| {
            matches!(
                e,
                LoopEvent::Restarted {
                    actor: ActorKind::Analyzer
                }
            )
        })
        .await;
        let resp = reqwest::get(format!("http://{}/ready", r.addr))
            .await
            .expect("ready");
        assert_eq!(resp.status(), 503);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["phases"]["analyzer"], "down", "{body}");
        assert_eq!(body["phases"]["monitor"], "up", "{body}");
        assert!(
            body["reasons"]
                .to_string()
                .contains("actor analyzer is down"),
            "{body}"
        );
        // Liveness is still fine: the supervisor runs.
        assert_eq!(
            reqwest::get(format!("http://{}/health", r.addr))
                .await
                .expect("health")
                .status(),
            200
        );
        assert_eq!(
            sample(r.addr, "mape_k_actor_up", "actor=\"analyzer\"").await,
            Some(0.0)
        );
        assert!(
            sample(r.addr, "mape_k_actor_restarts_total", "actor=\"analyzer\"")
                .await
                .unwrap_or(0.0)
                >= 1.0
        );
        h.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 64);
    let sys = daemon::new_system();
    sys.block_on(async {
        let r = start(
            &cfg,
            Arc::new(GatedEffector {
                gate: Arc::new(Semaphore::new(100)),
            }),
            None,
        )
        .await;
        // The actors report themselves up as they start: awaited.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ok = reqwest::get(format!("http://{}/ready", r.addr))
                .await
                .expect("ready");
            if ok.status() == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never ready: {:?}",
                ok.text().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r.handle.store.close().expect("close");
        let resp = reqwest::get(format!("http://{}/ready", r.addr))
            .await
            .expect("ready");
        assert_eq!(resp.status(), 503);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["knowledge_store"], "closed");
        assert!(
            body["reasons"]
                .to_string()
                .contains("knowledge store is closed"),
            "{body}"
        );
        r.handle.supervisor.send(Shutdown).await.expect("shutdown");
    });
    sys.run_with_code().expect("run");
}
