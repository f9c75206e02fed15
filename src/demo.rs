//! `mapek demo`: the whole loop on embedded defaults with no outside
//! service. A simulated Charter with three components runs in-process
//! (`charter`, `ledger`, `gateway`; `gateway` depends on `charter`, in the
//! simulator and in the demo's `topology`); the Monitor scrapes its
//! `/metrics` directly (no Prometheus) with the default rules; the Executor
//! acts through the real Charter client over loopback HTTP (every request
//! names the component acted on); a schedule of faults is injected and
//! every step is narrated in one line.
//!
//! # Schedule
//!
//! Steps ([`SCHEDULE`]), each injecting its faults at once; the next starts
//! once every fault of the step healed and every incident closed (remedy
//! verified, cooldown over):
//!
//! 1. `load_spike` at `charter` and `node_crash` at `ledger` together: two
//!    incidents on unrelated components, remedied concurrently (their
//!    remedies overlap in time);
//! 2. `bad_policy` at `gateway`;
//! 3. `cascade` at `charter`: the retry storm shows at `charter` at once and
//!    reaches `gateway` 10 s later; one incident, diagnosed
//!    `cascade_failure` at `charter` and remedied there (high risk: the demo
//!    plays the operator and approves it).
//!
//! Then the simulator is reset and the schedule starts over until the time
//! is up.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mapek_actors::clock::{SharedClock, SystemClock};
use mapek_actors::events::LoopEvent;
use mapek_actors::messages::{DecidePolicy, GetIncidents, Shutdown};
use mapek_actors::model::{
    ApprovalStatus, CloseReason, Incident, IncidentState, PolicyExecution, Timestamp,
};
use mapek_actors::supervisor::LoopHandle;
use serde::Serialize;
use tokio::time::Instant;

use crate::config::Config;
use crate::daemon::{self, DaemonParts};
use crate::scrape::{scrape_rules, ScrapeSource};
use crate::sim::{self, FaultKind, Simulator, Topology};

/// The simulated components; the first is the simulator's default one.
pub const COMPONENTS: [&str; 3] = ["charter", "ledger", "gateway"];

/// The demo's topology, dependent → upstream (in the simulator and in the
/// configuration's `topology`).
pub const DEPENDS_ON: [(&str, &str); 1] = [("gateway", "charter")];

/// One step of the schedule: faults injected together.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Fault kind and the component it is injected into.
    pub faults: &'static [(FaultKind, &'static str)],
    /// Seconds the step needs at least; it is not started with less left.
    pub needs_seconds: u64,
}

/// The fault schedule, played in order, round after round.
pub const SCHEDULE: [Step; 3] = [
    Step {
        faults: &[
            (FaultKind::LoadSpike, "charter"),
            (FaultKind::NodeCrash, "ledger"),
        ],
        needs_seconds: 8,
    },
    Step {
        faults: &[(FaultKind::BadPolicy, "gateway")],
        needs_seconds: 8,
    },
    Step {
        faults: &[(FaultKind::Cascade, "charter")],
        // The spread (10 s), the operator's approval (2 s), verification
        // (5 s) and cooldown (3 s).
        needs_seconds: 22,
    },
];

/// Longest wait, after a step's faults healed, for its incidents to close.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long to run.
    pub duration: Duration,
    /// Narrate on stderr and print the JSON report on stdout.
    pub json: bool,
}

/// One remedy (an execution of a policy) run for a fault's incident.
#[derive(Debug, Clone, Serialize)]
pub struct RemedyReport {
    /// Policy run.
    pub policy_id: String,
    /// Execution.
    pub execution_id: String,
    /// Root cause the policy addressed.
    pub cause: String,
    /// Its actions, in order.
    pub actions: Vec<String>,
    /// Components its actions were sent to.
    pub targets: Vec<String>,
    /// Seconds after the demo started when it began acting.
    pub started_at_seconds: f64,
    /// Seconds after the demo started when its last action finished.
    pub acted_at_seconds: Option<f64>,
    /// Seconds after the demo started when it ended (after verification).
    pub finished_at_seconds: Option<f64>,
    /// Final status of the execution.
    pub status: String,
    /// Verified outcome.
    pub outcome: Option<String>,
}

/// What happened to one injected fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    /// Fault kind.
    pub kind: String,
    /// Component the fault was injected into.
    pub component: String,
    /// Step of the schedule (counting from 1 over the whole demo): faults
    /// of one step were injected together.
    pub step: usize,
    /// Seconds after the demo started.
    pub injected_at_seconds: f64,
    /// Seconds from injection until the onset of the first violation of its
    /// incident (null: no incident found).
    pub detected_after_seconds: Option<f64>,
    /// The incident it caused (the earliest one on its component opened
    /// after the injection).
    pub incident_id: Option<String>,
    /// Components of that incident.
    pub incident_components: Vec<String>,
    /// Its root component.
    pub root_component: Option<String>,
    /// Its latest diagnosis.
    pub diagnosis: Option<String>,
    /// Remedies run for it, in order.
    pub remedies: Vec<RemedyReport>,
    /// Seconds from injection until the simulator was healthy again: the
    /// component (and, for a cascade, the components depending on it).
    pub recovered_after_seconds: Option<f64>,
}

/// The demo's closing report.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Components simulated.
    pub components: Vec<String>,
    /// Topology, dependent → upstreams.
    pub topology: BTreeMap<String, Vec<String>>,
    /// Faults injected.
    pub faults_injected: usize,
    /// Distinct violations the Monitor saw begin.
    pub violations_detected: usize,
    /// Policies the Executor ran.
    pub policies_executed: usize,
    /// Largest number of executions running at once (acting or verifying).
    pub max_concurrent_remedies: usize,
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

fn demo_topology() -> BTreeMap<String, Vec<String>> {
    let mut t: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (dependent, upstream) in DEPENDS_ON {
        t.entry(dependent.to_string())
            .or_default()
            .push(upstream.to_string());
    }
    t
}

pub(crate) fn demo_config(charter: &str, data_dir: &str) -> Config {
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
    cfg.topology = demo_topology();
    cfg
}

pub(crate) struct Narrator {
    pub(crate) json: bool,
    pub(crate) started: Instant,
    pub(crate) started_wall: Timestamp,
}

impl Narrator {
    pub(crate) fn say(&self, line: &str) {
        let t = self.started.elapsed().as_secs_f64();
        if self.json {
            eprintln!("[{t:6.1}s] {line}");
        } else {
            println!("[{t:6.1}s] {line}");
        }
    }

    /// Seconds from the start of the demo to `t`.
    fn at(&self, t: Timestamp) -> f64 {
        (t - self.started_wall).num_milliseconds() as f64 / 1000.0
    }
}

pub(crate) fn describe(e: &LoopEvent) -> Option<String> {
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
        LoopEvent::Guard {
            incident_id,
            policy_id,
            guard,
            decision,
            reason,
        } => format!(
            "guard      {guard} {decision} {}: {reason}",
            policy_id.as_deref().unwrap_or(incident_id)
        ),
        LoopEvent::Paused { paused, by, reason } => format!(
            "{}     by {by}{}",
            if *paused { "paused " } else { "resumed" },
            reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
        ),
        LoopEvent::BreakerOpened { key } => format!("breaker    `{key}` opened"),
        LoopEvent::Flapping { component } => {
            format!("flapping   component `{component}`: automatic action stops")
        }
        LoopEvent::Recurred {
            execution_id,
            incident_id,
        } => format!(
            "recurred   the symptoms remedied by {execution_id} came back ({incident_id}): outcome re-classified RECURRED"
        ),
        LoopEvent::Chose {
            cause,
            remedy,
            candidates,
            ..
        } => format!("chose      {remedy} for {cause} among {candidates} candidate remedies"),
    })
}

/// The policy an event is about, if any.
fn policy_of(e: &LoopEvent) -> Option<&str> {
    match e {
        LoopEvent::Planned { policy_id, .. }
        | LoopEvent::Approved { policy_id, .. }
        | LoopEvent::Rejected { policy_id, .. }
        | LoopEvent::Executed { policy_id, .. }
        | LoopEvent::Verified { policy_id, .. } => Some(policy_id),
        _ => None,
    }
}

/// Every incident the Planner keeps (active and recently closed).
async fn incidents(h: &LoopHandle) -> Vec<Incident> {
    h.planner
        .send(GetIncidents {
            state: None,
            limit: 1000,
            after: None,
        })
        .await
        .map(|p| p.incidents)
        .unwrap_or_default()
}

/// Whether the simulator shows `kind` at `component` healed: the component
/// is healthy, and for a cascade the components depending on it too.
fn healed(sim: &Simulator, topology: &Topology, kind: FaultKind, component: &str) -> bool {
    let own = sim.healthy_at(component).unwrap_or(false);
    if kind != FaultKind::Cascade {
        return own;
    }
    own && topology
        .dependents(component)
        .iter()
        .all(|d| sim.healthy_at(d).unwrap_or(false))
}

/// The remedies recorded for the incident `id` (or for incidents merged
/// into it), oldest first.
fn remedies_of(
    h: &LoopHandle,
    narrator: &Narrator,
    incidents: &[Incident],
    executions: &[PolicyExecution],
    id: &str,
) -> Vec<RemedyReport> {
    let mut ids: Vec<&str> = vec![id];
    ids.extend(
        incidents
            .iter()
            .filter(|i| i.merged_into.as_deref() == Some(id))
            .map(|i| i.id.as_str()),
    );
    let mut out: Vec<(Timestamp, RemedyReport)> = executions
        .iter()
        .filter(|e| e.incident_id.as_deref().is_some_and(|i| ids.contains(&i)))
        .map(|e| {
            let policy = h.store.get_policy(&e.policy_id).ok().flatten();
            let mut targets: Vec<String> = policy
                .iter()
                .flat_map(|p| p.actions.iter().map(|a| a.target.clone()))
                .collect();
            targets.sort();
            targets.dedup();
            let acted = e.actions.iter().filter_map(|a| a.finished_at).max();
            let report = RemedyReport {
                policy_id: e.policy_id.clone(),
                execution_id: e.id.clone(),
                cause: e.root_cause.as_str().to_string(),
                actions: e
                    .actions
                    .iter()
                    .map(|a| a.action_type.as_str().to_string())
                    .collect(),
                targets,
                started_at_seconds: narrator.at(e.started_at),
                acted_at_seconds: acted.map(|t| narrator.at(t)),
                finished_at_seconds: e.finished_at.map(|t| narrator.at(t)),
                status: e.status.as_str().to_string(),
                outcome: e.outcome.map(|o| o.as_str().to_string()),
            };
            (e.started_at, report)
        })
        .collect();
    out.sort_by_key(|(t, _)| *t);
    out.into_iter().map(|(_, r)| r).collect()
}

/// A fault injected and the wall time it was.
struct Injected {
    kind: FaultKind,
    component: String,
    step: usize,
    at: Timestamp,
    at_seconds: f64,
    recovered: Option<f64>,
}

/// Fills in what the loop did about `f`: the earliest incident on its
/// component with an onset at or after the injection and before `until`,
/// and that incident's remedies.
fn fault_report(
    h: &LoopHandle,
    narrator: &Narrator,
    incidents: &[Incident],
    executions: &[PolicyExecution],
    f: &Injected,
    until: Timestamp,
) -> FaultReport {
    // Onsets are stamped when a scrape sees the violation: after the
    // injection (a little slack for the clock's resolution).
    let since = f.at - chrono::Duration::milliseconds(500);
    let incident = incidents
        .iter()
        .filter(|i| i.close_reason != Some(CloseReason::Merged))
        .filter(|i| i.components.contains(&f.component))
        .filter(|i| i.opened_at >= since && i.opened_at < until)
        .min_by_key(|i| i.opened_at);
    let remedies = incident
        .map(|i| remedies_of(h, narrator, incidents, executions, &i.id))
        .unwrap_or_default();
    FaultReport {
        kind: f.kind.as_str().into(),
        component: f.component.clone(),
        step: f.step,
        injected_at_seconds: f.at_seconds,
        detected_after_seconds: incident
            .map(|i| ((i.opened_at - f.at).num_milliseconds().max(0)) as f64 / 1000.0),
        incident_id: incident.map(|i| i.id.clone()),
        incident_components: incident.map(|i| i.components.clone()).unwrap_or_default(),
        root_component: incident.and_then(|i| i.root_component.clone()),
        diagnosis: incident
            .and_then(|i| i.diagnosis.as_ref())
            .map(|d| d.cause.as_str().to_string()),
        remedies,
        recovered_after_seconds: f.recovered,
    }
}

/// Largest number of executions whose `[started_at, finished_at]` overlap
/// (an unfinished one runs until `now`).
fn max_overlap(executions: &[PolicyExecution], now: Timestamp) -> usize {
    let mut edges: Vec<(Timestamp, i32)> = Vec::new();
    for e in executions {
        edges.push((e.started_at, 1));
        edges.push((e.finished_at.unwrap_or(now), -1));
    }
    // Ends before starts at the same instant: touching is not overlapping.
    edges.sort();
    let (mut cur, mut best) = (0i32, 0i32);
    for (_, d) in edges {
        cur += d;
        best = best.max(cur);
    }
    best.max(0) as usize
}

fn span(r: &RemedyReport) -> String {
    format!(
        "{} at {} {:.1}–{} s",
        r.policy_id,
        r.targets.join(","),
        r.started_at_seconds,
        r.finished_at_seconds
            .map(|s| format!("{s:.1}"))
            .unwrap_or_else(|| "…".into())
    )
}

/// Whether the first remedies of every fault of a step overlap pairwise.
fn overlapping(faults: &[FaultReport]) -> bool {
    let firsts: Vec<&RemedyReport> = faults.iter().filter_map(|f| f.remedies.first()).collect();
    if firsts.len() < faults.len() || firsts.len() < 2 {
        return false;
    }
    firsts.iter().enumerate().all(|(i, a)| {
        firsts.iter().skip(i + 1).all(|b| {
            let a_end = a.finished_at_seconds.unwrap_or(f64::INFINITY);
            let b_end = b.finished_at_seconds.unwrap_or(f64::INFINITY);
            a.started_at_seconds < b_end && b.started_at_seconds < a_end
        })
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
    let topology = DEPENDS_ON
        .iter()
        .try_fold(Topology::new(&COMPONENTS)?, |t, (dependent, upstream)| {
            t.with_dependency(dependent, &[upstream])
        })?;
    let system = daemon::new_system();
    let report = Arc::new(Mutex::new(None::<DemoReport>));
    let out = report.clone();
    let opts = opts.clone();
    let data = data_dir.display().to_string();
    let setup = system.block_on(async move {
        let narrator = Arc::new(Narrator {
            json: opts.json,
            started: Instant::now(),
            started_wall: chrono::Utc::now(),
        });
        let clock: SharedClock = Arc::new(SystemClock);
        let simulator = Simulator::with_topology(topology.clone(), clock.clone());
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
        let cooldown = chrono::Duration::seconds(cfg.plan.cooldown_seconds.min(86_400) as i64);
        let store = daemon::open_store(&cfg).map_err(|e| e.to_string())?;
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
            "simulated Charter on http://{sim_addr}, mapek API on http://{} (try /api/v1/incidents)",
            running.addr
        ));
        narrator.say(&format!(
            "components {} ({})",
            COMPONENTS.join(", "),
            DEPENDS_ON
                .iter()
                .map(|(d, u)| format!("{d} depends on {u}"))
                .collect::<Vec<_>>()
                .join(", ")
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
            // Policy → "incident … at COMPONENT", learned when it is planned.
            let mut whereabouts: HashMap<String, String> = HashMap::new();
            // Pending policies are checked on every event and at least
            // every 250 ms (a pending cascade remedy may be the only thing
            // going on).
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                let ev = tokio::select! {
                    r = rx.recv() => match r {
                        Ok(ev) => Some(ev),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => break,
                    },
                    _ = tick.tick() => None,
                };
                if let Some(ev) = ev {
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
                if let LoopEvent::Planned { policy_id, .. } = &ev {
                    // The Planner handles this ask after the step that
                    // planned the policy: the incident lists it by now.
                    if let Some(i) = incidents(&h2).await.into_iter().find(|i| i.policies.contains(policy_id)) {
                        let at = i.root_component.clone().unwrap_or_else(|| i.components.join(","));
                        whereabouts.insert(policy_id.clone(), format!("{} at {at}", i.id));
                    }
                }
                if let Some(line) = describe(&ev).filter(|_| !repeated) {
                    match policy_of(&ev).and_then(|p| whereabouts.get(p)) {
                        Some(w) => n2.say(&format!("{line} [{w}]")),
                        None => n2.say(&line),
                    }
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
            let mut faults: Vec<FaultReport> = Vec::new();
            tokio::time::sleep(Duration::from_secs(2)).await;
            // Round after round until the time is up: later rounds are
            // planned with what Knowledge learned from the earlier ones.
            for (n, step) in SCHEDULE.iter().cycle().enumerate() {
                if Instant::now() + Duration::from_secs(step.needs_seconds) > deadline {
                    n3.say("no time left for more faults");
                    break;
                }
                if n > 0 && n % SCHEDULE.len() == 0 {
                    // Remedies stay in place (extra replicas, throttles):
                    // start the next round from the baseline again.
                    sim3.reset();
                    n3.say("ROUND      simulator back to its baseline; next round plans with what was learned");
                }
                let mut injected: Vec<Injected> = Vec::new();
                for (kind, component) in step.faults {
                    if let Err(e) = sim3.inject_at(component, *kind) {
                        n3.say(&format!("cannot inject {} at {component}: {e}", kind.as_str()));
                        continue;
                    }
                    injected.push(Injected {
                        kind: *kind,
                        component: component.to_string(),
                        step: n + 1,
                        at: chrono::Utc::now(),
                        at_seconds: n3.started.elapsed().as_secs_f64(),
                        recovered: None,
                    });
                    let extra = match kind {
                        FaultKind::Cascade => {
                            let deps = topology.dependents(component);
                            if deps.is_empty() {
                                String::new()
                            } else {
                                format!(" (reaches {} after {} s)", deps.join(", "), sim::CASCADE_SPREAD_SECONDS)
                            }
                        }
                        _ => String::new(),
                    };
                    n3.say(&format!("FAULT      {} injected at {component}{extra}", kind.as_str()));
                }
                if injected.len() > 1 {
                    n3.say(&format!(
                        "           {} faults at once on {}: one incident each, remedied concurrently",
                        injected.len(),
                        injected.iter().map(|f| f.component.as_str()).collect::<Vec<_>>().join(" and ")
                    ));
                }
                let t0 = Instant::now();
                while Instant::now() < deadline && injected.iter().any(|f| f.recovered.is_none()) {
                    for f in injected.iter_mut().filter(|f| f.recovered.is_none()) {
                        if healed(&sim3, &topology, f.kind, &f.component) {
                            let s = t0.elapsed().as_secs_f64();
                            f.recovered = Some(s);
                            n3.say(&format!("HEALED     {} at {} after {s:.1} s", f.kind.as_str(), f.component));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                for f in injected.iter().filter(|f| f.recovered.is_none()) {
                    n3.say(&format!("NOT HEALED {} at {} before the end of the demo", f.kind.as_str(), f.component));
                }
                // Let verification and the cooldown finish before the next
                // step: every incident closed, every execution finished,
                // and the cooldown after the last one over.
                let settle = (Instant::now() + SETTLE_LIMIT).min(deadline);
                while Instant::now() < settle {
                    let open = incidents(&h3).await.iter().any(|i| i.state != IncidentState::Closed);
                    let executions = h3.store.list_executions(1000).unwrap_or_default();
                    let running = executions.iter().any(|e| e.finished_at.is_none());
                    let last = executions.iter().filter_map(|e| e.finished_at).max();
                    let cooling = last.is_some_and(|t| chrono::Utc::now() < t + cooldown);
                    if !open && !running && !cooling {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let all = incidents(&h3).await;
                let executions = h3.store.list_executions(1000).unwrap_or_default();
                let until = chrono::Utc::now();
                let step_reports: Vec<FaultReport> = injected
                    .iter()
                    .map(|f| fault_report(&h3, &n3, &all, &executions, f, until))
                    .collect();
                for f in &step_reports {
                    n3.say(&format!(
                        "REPORT     {} at {}: incident {} on {} diagnosed {}, remedies {}",
                        f.kind,
                        f.component,
                        f.incident_id.as_deref().unwrap_or("none"),
                        f.incident_components.join(","),
                        f.diagnosis.as_deref().unwrap_or("none"),
                        if f.remedies.is_empty() {
                            "none".to_string()
                        } else {
                            f.remedies.iter().map(|r| format!("{} {}", r.cause, span(r))).collect::<Vec<_>>().join("; ")
                        }
                    ));
                }
                if step_reports.len() > 1 {
                    let spans = step_reports.iter().filter_map(|f| f.remedies.first()).map(span).collect::<Vec<_>>().join(" and ");
                    if overlapping(&step_reports) {
                        n3.say(&format!("CONCURRENT remedies overlapped in time: {spans}"));
                    } else {
                        n3.say(&format!("SEQUENTIAL remedies did not overlap: {spans}"));
                    }
                }
                faults.extend(step_reports);
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
                components: COMPONENTS.iter().map(|c| c.to_string()).collect(),
                topology: demo_topology(),
                faults_injected: faults.len(),
                violations_detected: *new_violations.lock().unwrap_or_else(|p| p.into_inner()),
                policies_executed: executions.iter().filter(|e| e.finished_at.is_some()).count(),
                max_concurrent_remedies: max_overlap(&executions, chrono::Utc::now()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_names_simulated_components_and_the_concurrent_step_is_unlinked() {
        let topology = demo_topology();
        for step in SCHEDULE {
            for (_, c) in step.faults {
                assert!(COMPONENTS.contains(c), "{c}");
            }
        }
        // Faults injected together must not share an incident: their
        // components are not joined by an edge of the topology.
        for step in SCHEDULE.iter().filter(|s| s.faults.len() > 1) {
            for (_, a) in step.faults {
                for (_, b) in step.faults {
                    let linked = topology.get(*a).is_some_and(|u| u.iter().any(|x| x == b));
                    assert!(a == b || !linked, "{a} and {b} are linked");
                }
            }
        }
        assert!(SCHEDULE
            .iter()
            .any(|s| s.faults.iter().any(|(k, c)| *k == FaultKind::Cascade
                && topology.values().any(|u| u.iter().any(|x| x == c)))));
    }

    #[test]
    fn max_overlap_counts_executions_running_together() {
        let t0 = chrono::Utc::now();
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        let exec = |from: i64, to: Option<i64>| {
            let mut e: PolicyExecution = serde_json::from_value(serde_json::json!({
                "id": "e", "policy_id": "p", "chain_id": "c", "root_cause": "node_crash",
                "status": "COMPLETED", "actions": [], "started_at": at(from),
                "finished_at": null, "success_rate": 1.0, "error": null,
                "violations_before": null, "violations_after": null, "outcome": null,
                "timings": {"detection_seconds": 0.0, "analysis_seconds": 0.0, "planning_seconds": 0.0,
                            "execution_seconds": 0.0, "total_seconds": 0.0, "cut_off": false}
            }))
            .expect("execution");
            e.finished_at = to.map(at);
            e
        };
        assert_eq!(max_overlap(&[], at(0)), 0);
        assert_eq!(
            max_overlap(&[exec(0, Some(5)), exec(5, Some(9))], at(20)),
            1
        );
        assert_eq!(
            max_overlap(&[exec(0, Some(5)), exec(3, Some(9))], at(20)),
            2
        );
        assert_eq!(
            max_overlap(
                &[exec(0, Some(5)), exec(3, None), exec(10, Some(12))],
                at(20)
            ),
            2
        );
    }
}
