//! `mapek demo --scenario learning|guards`: the safety guards and the
//! learner at work on an in-process simulated Charter (no outside service).
//!
//! * `learning` — a `memory_leak` on one component, injected again each
//!   time it heals. The seeds' remedy for its diagnosis (scale up) holds
//!   only while the new replicas are fresh: the symptoms come back, the
//!   outcome is re-classified RECURRED, and the learner (Thompson sampling)
//!   moves to the remedy that heals it (a restart). The closing table gives,
//!   per episode (one remedy run), the remedy chosen and the cumulative
//!   regret against always restarting, next to the regret of always using
//!   the seeds' remedy (one per episode: it never heals a leak).
//! * `guards` — six components: four node crashes at once against a
//!   disruption budget of two restarts (two wait, then are escalated after
//!   the queue timeout), a memory leak whose scale-up does not hold, and a
//!   flapping component whose remedies fail until its breakers open and it
//!   is found flapping (automatic action stops).
//!
//! The simulator runs on a clock ten (learning) or three (guards) times
//! faster than the wall clock, so the leak's relief (75 s) and the flap
//! period (30 s) pass quickly; mapek runs in real time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mapek_actors::clock::{SharedClock, SystemClock};
use mapek_actors::events::LoopEvent;
use mapek_actors::messages::Shutdown;
use serde::Serialize;
use tokio::time::Instant;

use crate::daemon::{self, DaemonParts};
use crate::demo::{demo_config, describe, Narrator};
use crate::scrape::ScrapeSource;
use crate::sim::{self, FaultKind, Simulator, Topology};

/// Episodes of the learning scenario.
pub const LEARNING_EPISODES: usize = 20;

/// `safety.recurrence_window_seconds` of the learning scenario; a healed
/// leak is injected again only after this (a new leak, not a recurrence).
const LEARNING_RECURRENCE_SECONDS: u64 = 10;

/// One episode of the learning scenario: one remedy run for the leak.
#[derive(Debug, Clone, Serialize)]
pub struct Episode {
    /// 1, 2, …
    pub episode: usize,
    /// The remedy (action types joined by `+`).
    pub remedy: String,
    /// Its outcome as finally recorded (RECURRED once its symptoms came back).
    pub outcome: Option<String>,
    /// Whether it healed the leak (only a restart does).
    pub heals: bool,
    /// Cumulative regret of the learner: episodes whose remedy does not heal.
    pub regret: f64,
    /// Cumulative regret of always using the seeds' remedy.
    pub default_regret: f64,
}

/// The closing report of a scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioReport {
    /// `learning` or `guards`.
    pub scenario: String,
    /// Learning: every episode.
    pub episodes: Vec<Episode>,
    /// Learning: leaks injected and healed.
    pub leaks_healed: usize,
    /// Guard decisions seen, `guard/decision` → count.
    pub guard_decisions: BTreeMap<String, usize>,
    /// Breakers that opened.
    pub breakers_opened: Vec<String>,
    /// Components found flapping.
    pub flapping: Vec<String>,
    /// Escalations, by reason text.
    pub escalations: Vec<String>,
    /// Restarts the Charter received.
    pub restarts: usize,
}

struct World {
    narrator: Arc<Narrator>,
    sim: Simulator,
    running: daemon::Running,
    stop_sim: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn world(
    components: &[&str],
    factor: u32,
    data: &str,
    json: bool,
    tune: impl FnOnce(&mut crate::config::Config),
) -> Result<World, String> {
    let narrator = Arc::new(Narrator {
        json,
        started: Instant::now(),
        started_wall: chrono::Utc::now(),
    });
    let sim_clock: SharedClock = Arc::new(sim::FastClock::new(factor));
    let topology = Topology::new(components).map_err(|e| e.to_string())?;
    let simulator = Simulator::with_topology(topology, sim_clock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("simulator listener: {e}"))?;
    let sim_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s2 = simulator.clone();
    tokio::spawn(async move {
        let _ = sim::serve(listener, s2, None, async {
            let _ = stop_rx.await;
        })
        .await;
    });
    let mut cfg = demo_config(&format!("http://{sim_addr}"), data);
    cfg.topology = BTreeMap::new();
    cfg.execute.verification_window_seconds = 3;
    cfg.plan.cooldown_seconds = 2;
    cfg.plan.learning.seed = Some(42);
    tune(&mut cfg);
    let clock: SharedClock = Arc::new(SystemClock);
    let store = daemon::open_store(&cfg).map_err(|e| e.to_string())?;
    let source = ScrapeSource::new(
        &format!("http://{sim_addr}/metrics"),
        Duration::from_secs(5),
        clock.clone(),
    )?;
    let parts = DaemonParts {
        sources: vec![Arc::new(source)],
        effectors: crate::effectors::build_router(&cfg)?,
        probe: None,
        clock,
        chaos: None,
    };
    let listen = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
    let running = daemon::start(&cfg, store, parts, listen).await?;
    narrator.say(&format!(
        "simulated Charter on http://{sim_addr} (clock x{factor}), mapek API on http://{} (try /api/v1/safety)",
        running.addr
    ));
    Ok(World {
        narrator,
        sim: simulator,
        running,
        stop_sim: Some(stop_tx),
    })
}

/// Narrates every loop event worth a line and counts the guards' work.
fn narrate(w: &World, report: Arc<Mutex<ScenarioReport>>) {
    let mut rx = w.running.handle.events.subscribe();
    let n = w.narrator.clone();
    actix::spawn(async move {
        let mut last = None;
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            };
            let repeated = match &ev {
                LoopEvent::Analysed {
                    cause, patterns, ..
                } => {
                    let key = Some((*cause, *patterns));
                    let same = last == key;
                    last = key;
                    same
                }
                LoopEvent::Detected { .. } => true,
                _ => false,
            };
            {
                let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                match &ev {
                    LoopEvent::Guard {
                        guard, decision, ..
                    } => {
                        *r.guard_decisions
                            .entry(format!("{guard}/{decision}"))
                            .or_default() += 1;
                    }
                    LoopEvent::BreakerOpened { key } => r.breakers_opened.push(key.clone()),
                    LoopEvent::Flapping { component } => r.flapping.push(component.clone()),
                    LoopEvent::Escalated { reason, .. } => r.escalations.push(reason.clone()),
                    _ => {}
                }
            }
            if repeated {
                continue;
            }
            if let Some(line) = describe(&ev) {
                n.say(&line);
            }
        }
    });
}

fn restarts(sim: &Simulator) -> usize {
    sim.calls()
        .iter()
        .filter(|c| c.path == "/api/v1/committee/restart")
        .count()
}

async fn shutdown(mut w: World) {
    let _ = w.running.handle.supervisor.send(Shutdown).await;
    if let Some(tx) = w.stop_sim.take() {
        let _ = tx.send(());
    }
}

/// Runs a scenario and returns its report.
pub fn run(scenario: &str, duration: Duration, json: bool) -> anyhow::Result<ScenarioReport> {
    let data_dir = std::env::temp_dir().join(format!(
        "mapek-scenario-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    ));
    let data = data_dir.display().to_string();
    let system = daemon::new_system();
    let scenario = scenario.to_string();
    let result = system.block_on(async move {
        match scenario.as_str() {
            "learning" => learning(&data, duration, json).await,
            "guards" => guards(&data, duration, json).await,
            other => Err(format!(
                "unknown scenario `{other}` (default, learning, guards)"
            )),
        }
    });
    let _ = std::fs::remove_dir_all(&data_dir);
    result.map_err(|e| anyhow::anyhow!(e))
}

async fn learning(data: &str, duration: Duration, json: bool) -> Result<ScenarioReport, String> {
    let w = world(&["charter"], 10, data, json, |cfg| {
        // The learner alone: breakers and flapping would stop a lesson that
        // takes failures to learn (they are what protects production).
        cfg.safety.breaker.failures = 1000;
        cfg.safety.flapping.relapses = 1000;
        cfg.safety.component_rate_limit.max_actions = 1000;
        // Longer than the leak's relief after a scale-up (75 s at x10:
        // 7.5 s), shorter than the quiet time before the next leak.
        cfg.safety.recurrence_window_seconds = LEARNING_RECURRENCE_SECONDS;
    })
    .await?;
    let report = Arc::new(Mutex::new(ScenarioReport {
        scenario: "learning".into(),
        ..ScenarioReport::default()
    }));
    narrate(&w, report.clone());
    let n = w.narrator.clone();
    n.say("SCENARIO   learning: a memory leak, injected again each time it heals; its diagnosis' default remedy (scale up) does not hold");
    let deadline = Instant::now() + duration;
    let store = w.running.handle.store.clone();
    let mut leaks = 0usize;
    let mut injected = false;
    while Instant::now() < deadline {
        let execs = store.list_executions(1000).unwrap_or_default();
        let done = execs.iter().filter(|e| e.finished_at.is_some()).count();
        if done >= LEARNING_EPISODES {
            break;
        }
        if !injected || w.sim.active_faults().is_empty() {
            if injected {
                leaks += 1;
                n.say(&format!(
                    "HEALED     leak {leaks} (episode {done}); the next one in {} s (past the recurrence window)",
                    LEARNING_RECURRENCE_SECONDS + 6
                ));
                // The restart is verified a few seconds after the heal;
                // the window counts from then.
                tokio::time::sleep(Duration::from_secs(LEARNING_RECURRENCE_SECONDS + 6)).await;
            }
            if let Err(e) = w.sim.inject(FaultKind::MemoryLeak) {
                n.say(&format!("cannot inject memory_leak: {e}"));
                break;
            }
            injected = true;
            n.say("FAULT      memory_leak injected at charter");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The last outcomes (and re-classifications) settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut execs = store.list_executions(1000).unwrap_or_default();
    execs.retain(|e| e.finished_at.is_some());
    execs.sort_by_key(|e| e.started_at);
    let mut episodes = Vec::new();
    let (mut regret, mut default_regret) = (0.0, 0.0);
    for (i, e) in execs.iter().take(LEARNING_EPISODES).enumerate() {
        let remedy = e
            .actions
            .iter()
            .map(|a| a.action_type.as_str())
            .collect::<Vec<_>>()
            .join("+");
        let heals = remedy.contains("RESTART_SERVICE");
        if !heals {
            regret += 1.0;
        }
        default_regret += 1.0;
        let outcome = store
            .get_outcome(&e.id)
            .ok()
            .flatten()
            .map(|o| o.outcome_type.as_str().to_string())
            .or_else(|| e.outcome.map(|o| o.as_str().to_string()));
        episodes.push(Episode {
            episode: i + 1,
            remedy,
            outcome,
            heals,
            regret,
            default_regret,
        });
    }
    n.say("EPISODES   remedy chosen, outcome, cumulative regret (learner vs always the seeds' remedy)");
    for e in &episodes {
        n.say(&format!(
            "  {:>2}  {:<32} {:<12} {:>4.0} vs {:>4.0}",
            e.episode,
            e.remedy,
            e.outcome.as_deref().unwrap_or("-"),
            e.regret,
            e.default_regret
        ));
    }
    let mut r = report.lock().unwrap_or_else(|p| p.into_inner()).clone();
    r.episodes = episodes;
    r.leaks_healed = leaks;
    r.restarts = restarts(&w.sim);
    shutdown(w).await;
    Ok(r)
}

async fn guards(data: &str, duration: Duration, json: bool) -> Result<ScenarioReport, String> {
    let comps = ["alpha", "bravo", "charlie", "delta", "billing", "search"];
    let w = world(&comps, 3, data, json, |cfg| {
        cfg.safety.disruption_budget.max_actions = 2;
        cfg.safety.disruption_budget.window_seconds = 120;
        cfg.safety.queue_timeout_seconds = 15;
        cfg.safety.breaker.failures = 2;
        cfg.safety.breaker.open_seconds = 300;
        cfg.safety.flapping.relapses = 2;
        cfg.safety.flapping.window_seconds = 300;
        cfg.safety.recurrence_window_seconds = 300;
        cfg.plan.learning.selection = mapek_actors::settings::Selection::Ranked;
    })
    .await?;
    let report = Arc::new(Mutex::new(ScenarioReport {
        scenario: "guards".into(),
        ..ScenarioReport::default()
    }));
    narrate(&w, report.clone());
    let n = w.narrator.clone();
    n.say("SCENARIO   guards: a disruption budget of 2 restarts per 120 s, breakers after 2 failures, flapping after 2 relapses");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for c in ["alpha", "bravo", "charlie", "delta"] {
        if let Err(e) = w.sim.inject_at(c, FaultKind::NodeCrash) {
            n.say(&format!("cannot inject node_crash at {c}: {e}"));
        }
    }
    n.say("FAULT      node_crash at alpha, bravo, charlie and delta at once: 4 restarts wanted, 2 in the budget");
    for (c, k) in [
        ("billing", FaultKind::MemoryLeak),
        ("search", FaultKind::Flapping),
    ] {
        if let Err(e) = w.sim.inject_at(c, k) {
            n.say(&format!("cannot inject {} at {c}: {e}", k.as_str()));
        }
    }
    n.say("FAULT      memory_leak at billing (scaling up does not hold), flapping at search (no remedy holds: breakers open, then it is found flapping)");
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let done = {
            let r = report.lock().unwrap_or_else(|p| p.into_inner());
            let budget_escalated = r.escalations.iter().any(|e| e.contains("admission queue"));
            budget_escalated && !r.breakers_opened.is_empty() && !r.flapping.is_empty()
        };
        if done {
            n.say("every guard has acted: budget, breaker, flapping");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut r = report.lock().unwrap_or_else(|p| p.into_inner()).clone();
    r.restarts = restarts(&w.sim);
    shutdown(w).await;
    Ok(r)
}
