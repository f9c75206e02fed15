//! `mapek demo`: the whole loop on embedded defaults with no outside
//! service. A simulated Charter runs in-process; the Monitor scrapes its
//! `/metrics` directly (no Prometheus) with the default rules; the Executor
//! acts through the real Charter client over loopback HTTP; a schedule of
//! faults is injected and every step is narrated in one line.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mapek_actors::clock::{SharedClock, SystemClock};
use mapek_actors::events::LoopEvent;
use mapek_actors::messages::{DecidePolicy, Shutdown};
use mapek_actors::model::ApprovalStatus;
use serde::Serialize;
use tokio::time::Instant;

use crate::config::Config;
use crate::daemon::{self, DaemonParts};
use crate::scrape::{scrape_rules, ScrapeSource};
use crate::sim::{self, FaultKind, Simulator};

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long to run.
    pub duration: Duration,
    /// Narrate on stderr and print the JSON report on stdout.
    pub json: bool,
}

/// What happened to one injected fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    /// Fault kind.
    pub kind: String,
    /// Seconds after the demo started.
    pub injected_at_seconds: f64,
    /// Seconds from injection until the simulator was healthy again.
    pub recovered_after_seconds: Option<f64>,
}

/// The demo's closing report.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Faults injected.
    pub faults_injected: usize,
    /// Distinct violations the Monitor saw begin.
    pub violations_detected: usize,
    /// Policies the Executor ran.
    pub policies_executed: usize,
    /// Verified outcomes by class.
    pub outcomes: BTreeMap<String, usize>,
    /// Mean seconds from a fault to its healing, over healed faults.
    pub mean_time_to_recover_seconds: Option<f64>,
    /// Faults that healed.
    pub faults_recovered: usize,
    /// Per fault.
    pub faults: Vec<FaultReport>,
    /// Times the Planner escalated to a human.
    pub escalations: usize,
}

fn demo_config(charter: &str, data_dir: &str) -> Config {
    let mut cfg = Config::default();
    cfg.monitor.interval_seconds = 1;
    cfg.monitor.rules = scrape_rules("3s");
    cfg.prometheus.enabled = false;
    cfg.alertmanager.enabled = false;
    cfg.charter.url = charter.to_string();
    cfg.execute.verification_window_seconds = 5;
    cfg.execute.call_timeout_seconds = 5;
    cfg.execute.backoff_initial_ms = 100;
    cfg.execute.backoff_max_ms = 1_000;
    cfg.plan.cooldown_seconds = 3;
    cfg.orchestrator.max_cycle_time_seconds = 60;
    cfg.knowledge.data_dir = data_dir.to_string();
    cfg.knowledge.open_timeout_seconds = 5;
    cfg
}

struct Narrator {
    json: bool,
    started: Instant,
}

impl Narrator {
    fn say(&self, line: &str) {
        let t = self.started.elapsed().as_secs_f64();
        if self.json {
            eprintln!("[{t:6.1}s] {line}");
        } else {
            println!("[{t:6.1}s] {line}");
        }
    }
}

fn describe(e: &LoopEvent) -> Option<String> {
    Some(match e {
        LoopEvent::Detected { new, active, .. } if *new > 0 => {
            format!("detected   {new} new violation(s), {active} active")
        }
        LoopEvent::Detected { .. } => return None,
        LoopEvent::Analysed {
            cause,
            confidence,
            patterns,
            ..
        } => format!(
            "analysed   root cause {} (confidence {confidence:.2}, {patterns} pattern(s))",
            cause.map(|c| c.as_str()).unwrap_or("none")
        ),
        LoopEvent::Escalated { reason, .. } => format!("escalated  to a human: {reason}"),
        LoopEvent::Planned {
            policy_id,
            cause,
            actions,
            score,
            ..
        } => format!(
            "planned    {policy_id} for {cause}: {} (score {score:.2})",
            actions
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(" → ")
        ),
        LoopEvent::Approved { policy_id, by, .. } => format!("approved   {policy_id} by {by}"),
        LoopEvent::Rejected { policy_id, by } => format!("rejected   {policy_id} by {by}"),
        LoopEvent::Executed {
            policy_id, status, ..
        } => {
            format!("executed   {policy_id}: {}", status.as_str())
        }
        LoopEvent::Verified {
            policy_id,
            outcome,
            before,
            after,
            total_seconds,
            ..
        } => format!(
            "verified   {policy_id}: {} (violations {} → {}, chain {total_seconds:.1} s)",
            outcome
                .map(|o| o.as_str())
                .unwrap_or("no outcome (rolled back or failed)"),
            before.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            after.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
        ),
        LoopEvent::Restarted { actor } => format!("restarted  actor {actor}"),
    })
}

/// Runs the demo and returns its report.
pub fn run(opts: DemoOptions) -> anyhow::Result<DemoReport> {
    let data_dir = std::env::temp_dir().join(format!(
        "mapek-demo-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    ));
    let result = run_in(&opts, &data_dir);
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

fn run_in(opts: &DemoOptions, data_dir: &std::path::Path) -> anyhow::Result<DemoReport> {
    let system = daemon::new_system();
    let report = Arc::new(Mutex::new(None::<DemoReport>));
    let out = report.clone();
    let opts = opts.clone();
    let data = data_dir.display().to_string();
    let setup = system.block_on(async move {
        let narrator = Arc::new(Narrator { json: opts.json, started: Instant::now() });
        let simulator = Simulator::new();
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
        let cfg = demo_config(&format!("http://{sim_addr}"), &data);
        let store = daemon::open_store(&cfg).map_err(|e| e.to_string())?;
        let clock: SharedClock = Arc::new(SystemClock);
        let source = ScrapeSource::new(&format!("http://{sim_addr}/metrics"), Duration::from_secs(5), clock.clone())?;
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
            "simulated Charter on http://{sim_addr}, mapek API on http://{} (try /api/v1/state)",
            running.addr
        ));
        let handle = running.handle.clone();
        let mut rx = handle.events.subscribe();
        let new_violations = Arc::new(Mutex::new(0usize));
        let escalations = Arc::new(Mutex::new(0usize));
        // Narration, counting, and the demo playing the operator for
        // policies that wait for a person.
        let (n2, nv, esc, h2) = (narrator.clone(), new_violations.clone(), escalations.clone(), handle.clone());
        actix::spawn(async move {
            let mut waiting: HashMap<String, Instant> = HashMap::new();
            let mut last_analysis = None;
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                };
                // The loop re-analyses every cycle while violations last;
                // narrate an analysis only when its conclusion changes.
                let repeated = match &ev {
                    LoopEvent::Analysed { cause, patterns, .. } => {
                        let key = Some((*cause, *patterns));
                        let same = last_analysis == key;
                        last_analysis = key;
                        same
                    }
                    LoopEvent::Verified { .. } => {
                        last_analysis = None;
                        false
                    }
                    _ => false,
                };
                if let Some(line) = describe(&ev).filter(|_| !repeated) {
                    n2.say(&line);
                }
                match &ev {
                    LoopEvent::Detected { new, .. } => {
                        *nv.lock().unwrap_or_else(|p| p.into_inner()) += new;
                    }
                    LoopEvent::Escalated { .. } => {
                        *esc.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    }
                    LoopEvent::Planned { policy_id, .. } => {
                        waiting.insert(policy_id.clone(), Instant::now());
                    }
                    LoopEvent::Approved { policy_id, .. } | LoopEvent::Rejected { policy_id, .. } => {
                        waiting.remove(policy_id);
                    }
                    _ => {}
                }
                let due: Vec<String> = waiting
                    .iter()
                    .filter(|(_, t)| t.elapsed() >= Duration::from_secs(2))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in due {
                    waiting.remove(&id);
                    if let Ok(Some(p)) = h2.store.get_policy(&id) {
                        if p.approval_status == ApprovalStatus::Pending {
                            n2.say(&format!("operator   approves {id} (the demo plays the operator)"));
                            let _ = h2
                                .planner
                                .send(DecidePolicy { id, decision: ApprovalStatus::Approved, by: "demo-operator".into(), reason: None })
                                .await;
                        }
                    }
                }
            }
        });
        // The fault schedule.
        let (n3, sim3, h3) = (narrator.clone(), simulator.clone(), handle.clone());
        actix::spawn(async move {
            let deadline = Instant::now() + opts.duration;
            let mut faults = Vec::new();
            tokio::time::sleep(Duration::from_secs(2)).await;
            // Round after round until the time is up: later rounds are
            // planned with what Knowledge learned from the earlier ones.
            let schedule = [FaultKind::LoadSpike, FaultKind::BadPolicy, FaultKind::NodeCrash];
            for (round, kind) in schedule.iter().copied().cycle().enumerate() {
                if Instant::now() + Duration::from_secs(8) > deadline {
                    n3.say("no time left for more faults");
                    break;
                }
                if round > 0 && round % schedule.len() == 0 {
                    // Remedies stay in place (extra replicas, throttles):
                    // start the next round from the baseline again.
                    sim3.reset();
                    n3.say("ROUND      simulator back to its baseline; next round plans with what was learned");
                }
                if let Err(e) = sim3.inject(kind) {
                    n3.say(&format!("cannot inject {}: {e}", kind.as_str()));
                    continue;
                }
                let at = n3.started.elapsed().as_secs_f64();
                n3.say(&format!("FAULT      {} injected", kind.as_str()));
                let t0 = Instant::now();
                let mut recovered = None;
                while Instant::now() < deadline {
                    if sim3.healthy() {
                        recovered = Some(t0.elapsed().as_secs_f64());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                match recovered {
                    Some(s) => n3.say(&format!("HEALED     {} after {s:.1} s", kind.as_str())),
                    None => n3.say(&format!("NOT HEALED {} before the end of the demo", kind.as_str())),
                }
                faults.push(FaultReport { kind: kind.as_str().into(), injected_at_seconds: at, recovered_after_seconds: recovered });
                // Let verification and the cooldown finish before the next fault.
                let settle = Instant::now() + Duration::from_secs(9);
                while Instant::now() < settle.min(deadline) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            while Instant::now() < deadline && h3.executor.depth() > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let executions = h3.store.list_executions(1000).unwrap_or_default();
            let mut outcomes = BTreeMap::new();
            for e in &executions {
                if let Some(o) = e.outcome {
                    *outcomes.entry(o.as_str().to_string()).or_insert(0) += 1;
                }
            }
            let healed: Vec<f64> = faults.iter().filter_map(|f| f.recovered_after_seconds).collect();
            let report = DemoReport {
                faults_injected: faults.len(),
                violations_detected: *new_violations.lock().unwrap_or_else(|p| p.into_inner()),
                policies_executed: executions.iter().filter(|e| e.finished_at.is_some()).count(),
                outcomes,
                mean_time_to_recover_seconds: if healed.is_empty() { None } else { Some(healed.iter().sum::<f64>() / healed.len() as f64) },
                faults_recovered: healed.len(),
                faults,
                escalations: *escalations.lock().unwrap_or_else(|p| p.into_inner()),
            };
            *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
            let _ = stop_tx.send(());
            if h3.supervisor.send(Shutdown).await.is_err() {
                actix::System::current().stop_with_code(1);
            }
        });
        Ok::<(), String>(())
    });
    setup.map_err(|e| anyhow::anyhow!(e))?;
    let code = system.run_with_code()?;
    let report = report.lock().unwrap_or_else(|p| p.into_inner()).take();
    match report {
        Some(r) if code == 0 => Ok(r),
        Some(_) => anyhow::bail!("the loop stopped with exit code {code}"),
        None => anyhow::bail!("the demo ended without a report (exit code {code})"),
    }
}
