//! The Planner actor: the reconciler of incidents. It keeps one state
//! machine per incident (open, pending, queued, acting, verifying,
//! cooling_down, escalated, no_evidence, closed), plans for an incident
//! from its latest diagnosis ([`crate::plan`]), passes every approved
//! policy through the one [`Admission`] queue, and hands admitted policies
//! to the Executor. Incidents are kept in Knowledge and restored at start.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::time::Instant;

use crate::learn;
use crate::model::ExecutionStatus;
use crate::model::{GuardDecision, OutcomeType};
use crate::ports::{Escalation, EscalationKind, EscalationSink};
use crate::safety::{Gate, Guards, PauseState, Silence, GUARDS_TREE};
use crate::settings::{Mode, SafetySettings, Selection};

use crate::admission::{scope_of, Admission};
use crate::clock::SharedClock;
use crate::events::LoopEvent;
use crate::execute::EffectorRouter;
use crate::incident::IncidentReport;
use crate::mailbox::{Inbox, PhasePort};
use crate::messages::{
    ActionsDone, AnalysisReady, ChainTrace, DecidePolicy, DecisionError, ExecutionFinished,
    GetIncident, GetIncidents, IncidentPage, KnowledgeUpdated, PolicyApproved, RecordPolicy,
};
use crate::metrics::StateLabels;
use crate::model::{
    AnalysisResult, ApprovalStatus, CloseReason, Diagnosis, Incident, IncidentState, LearnedStats,
    RemediationPolicy, Severity, INCIDENT_DIAGNOSES_KEPT,
};
use crate::plan::{decide, plan, PlanDecision};
use crate::settings::PlanSettings;
use crate::state::SharedState;
use crate::store::KnowledgeStore;

/// Closed incidents kept (in memory and in Knowledge) for the API and for
/// recurrence checks; older ones are forgotten.
pub const CLOSED_INCIDENTS_KEPT: usize = 1000;

/// Components that name no component: their incidents are escalated.
const NO_COMPONENT: [&str; 2] = ["", "unknown"];

/// One incident as the Planner tracks it.
struct Entry {
    incident: Incident,
    analysis: Option<AnalysisResult>,
    chain: ChainTrace,
    pending: Option<String>,
    running: Option<String>,
    no_evidence: bool,
    cooldown_until: Option<Instant>,
    /// The cooldown a timer is armed for (one timer per cooldown).
    state_timer: Option<Instant>,
    rejected: bool,
    /// An escalation that stays until the diagnosis changes, the incident
    /// closes or an operator clears its component (queue timeout, a remedy
    /// larger than the whole budget).
    sticky: Option<(EscalationKind, String)>,
    /// A dry run or a shadow plan was made for this diagnosis: mapek does
    /// not plan again until it changes.
    held: Option<String>,
}

/// The Planner actor.
pub struct Planner {
    inbox: Inbox,
    settings: PlanSettings,
    learned: LearnedStats,
    incidents: HashMap<String, Entry>,
    closed_order: VecDeque<String>,
    pending: HashMap<String, (RemediationPolicy, ChainTrace)>,
    admission: Admission,
    router: Option<EffectorRouter>,
    executor: PhasePort<PolicyApproved>,
    knowledge: PhasePort<RecordPolicy>,
    store: KnowledgeStore,
    clock: SharedClock,
    state: SharedState,
    supervisor: PhasePort<crate::messages::ActorRestarted>,
    /// When admission is next tried by a timer (one timer at a time).
    wakeup: Option<Instant>,
    guards: Guards,
    mode: Mode,
    sink: Option<Arc<dyn EscalationSink>>,
    escalations: HashMap<String, Escalation>,
    rng: StdRng,
    reclassify: Option<PhasePort<crate::messages::ReclassifyOutcome>>,
    ticking: bool,
    last_repost: Option<Instant>,
    /// Leadership of shards (cluster mode): policies of a shard this
    /// replica does not lead are held (standby), and admitted as soon as it
    /// leads.
    leadership: Option<Arc<dyn crate::leadership::Leadership>>,
    /// The shards this replica led at the last leadership change.
    led: std::collections::BTreeSet<u32>,
    /// Cluster mode: incidents whose escalation this replica posted (only
    /// those are resolved by it).
    posted_escalations: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Whether the leadership watch is armed (re-armed after a restart).
    watching: bool,
}

/// The mode a policy runs in: the stricter of `global` and its routes'.
fn mode_of(router: Option<&EffectorRouter>, p: &RemediationPolicy, global: Mode) -> Mode {
    router.map_or(global, |r| r.mode_of(p, global))
}

/// Records `guard`'s `decision` on the policy unless it is already the
/// policy's last one; whether it was recorded.
fn note_decision(
    p: &mut RemediationPolicy,
    guard: &str,
    decision: &str,
    reason: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> bool {
    let same = p
        .guards
        .last()
        .is_some_and(|g| g.guard == guard && g.decision == decision);
    if !same {
        p.guards.push(GuardDecision {
            guard: guard.to_string(),
            decision: decision.to_string(),
            reason: reason.to_string(),
            at,
        });
    }
    !same
}

/// A guard's decision in metrics, the log and the loop events.
fn announce_guard(
    inbox: &Inbox,
    incident: &str,
    policy_id: Option<String>,
    guard: &'static str,
    decision: &'static str,
    reason: &str,
) {
    inbox
        .metrics()
        .guard_decisions
        .get_or_create(&crate::metrics::GuardLabels { guard, decision })
        .inc();
    tracing::info!(
        incident,
        policy = policy_id.as_deref().unwrap_or(""),
        guard,
        decision,
        reason,
        "guard"
    );
    inbox.emit(LoopEvent::Guard {
        incident_id: incident.to_string(),
        policy_id,
        guard: guard.to_string(),
        decision: decision.to_string(),
        reason: reason.to_string(),
    });
}

/// How often the Planner re-checks its guards (breakers half-opening,
/// silences ending, flapping going quiet) and the queue timeout.
const SAFETY_TICK: Duration = Duration::from_secs(5);

/// How often firing escalations are posted again (so Alertmanager keeps
/// them active).
const ESCALATION_REPOST: Duration = Duration::from_secs(60);

impl Planner {
    /// A Planner; incidents, pending policies and learned statistics are
    /// loaded from the store so they survive a restart of the daemon.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inbox: Inbox,
        settings: PlanSettings,
        max_concurrent: usize,
        router: Option<EffectorRouter>,
        executor: PhasePort<PolicyApproved>,
        knowledge: PhasePort<RecordPolicy>,
        store: KnowledgeStore,
        clock: SharedClock,
        state: SharedState,
        supervisor: PhasePort<crate::messages::ActorRestarted>,
        lease: Duration,
    ) -> Self {
        let learned = store.stats().unwrap_or_default();
        let pending: HashMap<String, (RemediationPolicy, ChainTrace)> = store
            .list_policies(Some(ApprovalStatus::Pending), 1000)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let mut chain = ChainTrace::start(clock.now());
                chain.chain_id = p.chain_id.clone();
                (p.id.clone(), (p, chain))
            })
            .collect();
        let mut incidents = HashMap::new();
        let mut closed: Vec<(chrono::DateTime<chrono::Utc>, String)> = Vec::new();
        let mut holds: Vec<(String, Instant)> = Vec::new();
        for mut inc in store.all_incidents().unwrap_or_default() {
            // The attempt number is part of every idempotency key
            // (`incident/attempt/action`); the incident record is soft state
            // and may have lost its last update in a crash, the intents
            // (journaled before any call) have not: a key is never reused.
            if let Ok(intents) = store.intents_for(&format!("{}/", inc.id)) {
                let highest = intents
                    .iter()
                    .filter_map(|i| i.key.split('/').nth(1)?.parse().ok())
                    .max();
                if let Some(h) = highest {
                    inc.attempts = inc.attempts.max(h);
                }
            }
            // A restart interrupts what was running: the incident is
            // planned again from fresh evidence. A remedy that was acting or
            // verifying may have taken effect: its components rest for a
            // cooldown first, so the remedy is not repeated at once.
            if matches!(inc.state, IncidentState::Acting | IncidentState::Verifying) {
                let rest = chrono::Duration::seconds(
                    i64::try_from(settings.cooldown_seconds).unwrap_or(i64::MAX / 2),
                );
                // At least the cooldown; longer if the restart asked for
                // it (an interrupted execution is re-measured first).
                let until = clock.now() + rest;
                inc.hold_until = Some(inc.hold_until.map_or(until, |h| h.max(until)));
                inc.state = IncidentState::CoolingDown;
            } else if inc.state == IncidentState::Queued {
                inc.state = IncidentState::Open;
            }
            if inc.state == IncidentState::Closed {
                closed.push((inc.closed_at.unwrap_or(inc.updated_at), inc.id.clone()));
            }
            let pending_id = pending
                .values()
                .find(|(p, _)| p.incident_id.as_deref() == Some(inc.id.as_str()))
                .map(|(p, _)| p.id.clone());
            let mut chain = ChainTrace::start(clock.now());
            chain.chain_id = format!("chn-restored-{}", inc.id);
            // A hold outlives a restart: the rest of it is kept.
            let cooldown_until = inc.hold_until.and_then(|until| {
                let left = (until - clock.now()).to_std().ok()?;
                Some(Instant::now() + left)
            });
            if let Some(until) = cooldown_until {
                for c in &inc.components {
                    holds.push((c.clone(), until));
                }
            }
            let rejected = inc
                .handed_off
                .as_ref()
                .is_some_and(|h| h.kind == EscalationKind::Rejected);
            let sticky = inc
                .handed_off
                .as_ref()
                .filter(|h| h.kind != EscalationKind::Rejected)
                .map(|h| (h.kind, h.reason.clone()));
            incidents.insert(
                inc.id.clone(),
                Entry {
                    incident: inc,
                    analysis: None,
                    chain,
                    pending: pending_id,
                    running: None,
                    no_evidence: false,
                    cooldown_until,
                    state_timer: None,
                    rejected,
                    sticky,
                    held: None,
                },
            );
        }
        closed.sort();
        // A pending policy whose incident is gone or closed can no longer
        // be approved.
        let mut pending = pending;
        let stale: Vec<String> = pending
            .values()
            .filter(|(p, _)| {
                p.incident_id.as_ref().is_some_and(|i| {
                    incidents
                        .get(i)
                        .is_none_or(|e: &Entry| e.incident.state == IncidentState::Closed)
                })
            })
            .map(|(p, _)| p.id.clone())
            .collect();
        for id in stale {
            if let Some((mut p, _)) = pending.remove(&id) {
                p.approval_status = ApprovalStatus::Superseded;
                p.decisions.push(crate::model::ApprovalDecision {
                    status: ApprovalStatus::Superseded,
                    by: "mapek".into(),
                    at: clock.now(),
                    reason: Some("its incident closed".into()),
                });
                if let Err(e) = store.submit_detached(&crate::journal::Record::Policy { policy: p })
                {
                    tracing::warn!(error = %e, "superseded policy not recorded");
                }
            }
        }
        let mut admission = Admission::new(max_concurrent, lease);
        for (component, until) in holds {
            admission.hold_until(&component, until);
        }
        let mut p = Planner {
            inbox,
            settings,
            learned,
            incidents,
            closed_order: closed.into_iter().map(|(_, id)| id).collect(),
            pending,
            admission,
            router,
            executor,
            knowledge,
            store,
            clock,
            state,
            supervisor,
            wakeup: None,
            guards: Guards::new(SafetySettings::default()),
            mode: Mode::Act,
            sink: None,
            escalations: HashMap::new(),
            leadership: None,
            led: std::collections::BTreeSet::new(),
            posted_escalations: Default::default(),
            watching: false,
            rng: StdRng::seed_from_u64(0),
            reclassify: None,
            ticking: false,
            last_repost: None,
        };
        let seed = p
            .settings
            .learning
            .seed
            .unwrap_or_else(|| p.clock.now().timestamp_nanos_opt().unwrap_or_default() as u64);
        p.rng = StdRng::seed_from_u64(seed);
        // Escalations posted before a restart: kept, so they are re-posted
        // and resolved (not left to lapse).
        let restored: Vec<Escalation> = p
            .incidents
            .values()
            .filter(|e| e.incident.state == IncidentState::Escalated)
            .filter_map(|e| {
                Some(Escalation {
                    incident_id: e.incident.id.clone(),
                    kind: e.incident.escalation?,
                    reason: e.incident.reason.clone().unwrap_or_default(),
                    components: e.incident.components.clone(),
                    severity: e.incident.severity,
                    since: e.incident.updated_at,
                })
            })
            .collect();
        for esc in restored {
            p.escalations.insert(esc.incident_id.clone(), esc);
        }
        p.refresh_gauges();
        p
    }

    /// Hands an incident to people until its diagnosis changes, it closes or
    /// an operator clears its component (a sticky escalation).
    fn stick(&mut self, id: &str, kind: EscalationKind, why: &str) {
        if let Some(e) = self.incidents.get_mut(id) {
            e.sticky = Some((kind, why.to_string()));
        }
        self.hand_off(id, Some((kind, why.to_string())));
    }

    /// Keeps the lasting hand-off of an incident (sticky escalation or
    /// rejection) on its record, so a restart does not plan it again.
    fn hand_off(&mut self, id: &str, h: Option<(EscalationKind, String)>) {
        if let Some(e) = self.incidents.get_mut(id) {
            let rec = h.map(|(kind, reason)| crate::model::HandOff { kind, reason });
            if e.incident.handed_off != rec {
                e.incident.handed_off = rec;
                self.persist(id);
            }
        }
    }

    /// The safety guards' settings, where escalations go, and where
    /// re-classified outcomes go (Knowledge); the guards' state is rebuilt
    /// from Knowledge.
    /// Cluster mode: hold the policies of shards this replica does not
    /// lead (see [`crate::leadership`]).
    pub fn with_leadership(
        mut self,
        leadership: Option<Arc<dyn crate::leadership::Leadership>>,
    ) -> Self {
        self.leadership = leadership;
        self
    }

    /// Cluster mode: when this replica starts leading a shard, what the
    /// previous leaders published (and this replica applied to its
    /// Knowledge meanwhile) becomes its working state: learned
    /// statistics, guard state (pause, silences, breakers, flapping,
    /// budget and rate windows) and pending approvals.
    fn took_over(&mut self) {
        let Some(l) = &self.leadership else { return };
        let leading = l.view().leading;
        let gained: std::collections::BTreeSet<u32> =
            leading.difference(&self.led).copied().collect();
        self.led = leading;
        if gained.is_empty() {
            return;
        }
        let l = l.clone();
        if let Ok(stats) = self.store.stats() {
            self.learned = stats;
        }
        let settings = self.guards.settings().clone();
        self.restore_guards(settings);
        // Approvals decided elsewhere meanwhile are no longer pending here.
        let decided: Vec<String> = self
            .pending
            .keys()
            .filter(|id| {
                matches!(self.store.get_policy(id), Ok(Some(p)) if p.approval_status != ApprovalStatus::Pending)
            })
            .cloned()
            .collect();
        for id in &decided {
            self.pending.remove(id);
        }
        let mut adopted = 0usize;
        for p in self
            .store
            .list_policies(Some(ApprovalStatus::Pending), 1000)
            .unwrap_or_default()
        {
            let shard = crate::leadership::policy_shard(l.as_ref(), &p);
            if gained.contains(&shard) && !self.pending.contains_key(&p.id) {
                let mut chain = ChainTrace::start(self.clock.now());
                chain.chain_id = p.chain_id.clone();
                self.pending.insert(p.id.clone(), (p, chain));
                adopted += 1;
            }
        }
        self.refresh_gauges();
        tracing::info!(shards = ?self.led, adopted_pending = adopted, decided_elsewhere = decided.len(), "leading: learned statistics, guard state and pending approvals taken from Knowledge");
    }

    /// Cluster mode: the disruption budget is the cluster's: the other
    /// leaders' recent disruptive actions (their `budget@<replica>`
    /// records, replicated into this Knowledge) count against it too.
    fn refresh_cluster_budget(&mut self, now: chrono::DateTime<chrono::Utc>) {
        let Some(l) = &self.leadership else { return };
        let mine = format!("budget@{}", l.name());
        match self
            .store
            .list_records_prefixed::<serde_json::Value>(GUARDS_TREE, "budget@")
        {
            Ok(mut records) => {
                records.retain(|(k, _)| *k != mine);
                self.guards.set_others_budget(records, now);
            }
            Err(e) => tracing::warn!(error = %e, "the other leaders' budget use could not be read"),
        }
    }

    /// Whether this replica may act on `policy` now (always, alone): it
    /// leads the shard of every component the policy acts on.
    fn leads(&self, policy: &RemediationPolicy) -> bool {
        self.leadership
            .as_ref()
            .is_none_or(|l| crate::leadership::shard_not_led(l.as_ref(), policy).is_none())
    }

    pub fn with_safety(
        mut self,
        settings: SafetySettings,
        sink: Option<Arc<dyn EscalationSink>>,
        reclassify: Option<PhasePort<crate::messages::ReclassifyOutcome>>,
    ) -> Self {
        self.mode = settings.mode;
        self.sink = sink;
        self.reclassify = reclassify;
        self.restore_guards(settings);
        self.refresh_gauges();
        self
    }

    fn restore_guards(&mut self, settings: SafetySettings) {
        let mut g = Guards::new(settings);
        match self
            .store
            .list_records::<serde_json::Value>(GUARDS_TREE, usize::MAX)
        {
            Ok(records) => g.restore(records),
            Err(e) => tracing::error!(error = %e, "guard state not restored"),
        }
        if let Some(p) = g.pause() {
            tracing::warn!(by = %p.by, reason = p.reason.as_deref().unwrap_or(""), "mapek is paused (kept from before the restart): nothing is executed until POST /api/v1/resume");
        }
        self.guards = g;
    }

    /// Writes the guards' changed keys to Knowledge; the future resolves
    /// once they are durable.
    fn save_guards(&mut self) -> impl std::future::Future<Output = Result<(), String>> + 'static {
        let writes: Vec<_> = self
            .guards
            .take_dirty()
            .into_iter()
            .map(|(k, v)| {
                let fut: futures::future::BoxFuture<'static, Result<(), crate::store::StoreError>> =
                    match v {
                        Some(v) => Box::pin(self.store.put_record_async(GUARDS_TREE, &k, &v)),
                        None => Box::pin(self.store.delete_record_async(GUARDS_TREE, &k)),
                    };
                fut
            })
            .collect();
        async move {
            for r in futures::future::join_all(writes).await {
                if let Err(e) = r {
                    tracing::error!(error = %e, "guard state not recorded");
                    return Err(e.to_string());
                }
            }
            Ok(())
        }
    }

    /// [`save_guards`](Self::save_guards) without waiting.
    fn save_guards_detached(&mut self) {
        let fut = self.save_guards();
        actix::spawn(async move {
            let _ = fut.await;
        });
    }

    /// The mode a policy runs in: the stricter of `safety.mode` and the
    /// modes of the effector routes its actions take.
    fn mode_of(&self, p: &RemediationPolicy) -> Mode {
        mode_of(self.router.as_ref(), p, self.mode)
    }

    /// Records a guard's decision: on the policy (when it differs from the
    /// last one), in metrics and as a loop event.
    fn guard_decision(
        &self,
        incident: &str,
        policy: Option<&mut RemediationPolicy>,
        guard: &'static str,
        decision: &'static str,
        reason: &str,
    ) -> bool {
        let policy_id = policy.as_ref().map(|p| p.id.clone());
        let changed = policy
            .map(|p| note_decision(p, guard, decision, reason, self.clock.now()))
            .unwrap_or(true);
        if changed {
            announce_guard(&self.inbox, incident, policy_id, guard, decision, reason);
        }
        changed
    }

    fn post_escalations(&self, mut firing: Vec<Escalation>, resolved: Vec<Escalation>) {
        let Some(sink) = self.sink.clone() else {
            return;
        };
        // Cluster mode: an incident's escalation is posted by the leader
        // of its shard only (a standby takes over the reposting when it
        // starts leading) and resolved by the replica that posted it.
        let mut resolved = resolved;
        if let Some(l) = &self.leadership {
            let shard_of = |e: &Escalation| -> u32 {
                let inc = self.incidents.get(&e.incident_id).map(|x| &x.incident);
                inc.and_then(|i| i.shard.filter(|s| *s < l.shards()))
                    .unwrap_or_else(|| {
                        let root = inc
                            .and_then(|i| i.root_component.as_deref())
                            .or(e.components.first().map(String::as_str))
                            .unwrap_or("");
                        l.shard_of(root)
                    })
            };
            firing.retain(|e| l.is_leader(shard_of(e)));
            let mut posted = self
                .posted_escalations
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            resolved.retain(|e| posted.remove(&e.incident_id));
            posted.extend(firing.iter().map(|e| e.incident_id.clone()));
        }
        if firing.is_empty() && resolved.is_empty() {
            return;
        }
        actix::spawn(async move {
            if let Err(e) = sink.post(&firing, &resolved).await {
                tracing::warn!(sink = sink.name(), error = %e, firing = firing.len(), resolved = resolved.len(), "escalations not posted; posted again at the next repost");
            }
        });
    }

    fn resolve_escalation(&mut self, id: &str) {
        if let Some(e) = self.escalations.remove(id) {
            self.post_escalations(Vec::new(), vec![e]);
        }
    }

    /// The periodic safety check: guards whose time passed (breakers
    /// half-opening, silences ending, flapping going quiet), the queue
    /// timeout, and the escalations posted again.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let waiting: Vec<String> = self
            .incidents
            .iter()
            .filter(|(_, e)| {
                e.sticky.is_none()
                    && matches!(
                        e.incident.state,
                        IncidentState::Escalated | IncidentState::Held
                    )
            })
            .map(|(k, _)| k.clone())
            .collect();
        // Executions that never reported back (their lease ran out).
        let lost: Vec<String> = self
            .incidents
            .iter()
            .filter(|(_, e)| e.running.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for id in lost {
            let gone = self
                .incidents
                .get(&id)
                .and_then(|e| e.running.clone())
                .is_some_and(|p| !self.admission.is_live(&p));
            if gone {
                self.reconcile(ctx, &id);
            }
        }
        for id in waiting {
            self.reconcile(ctx, &id);
        }
        self.admit(ctx);
        if self
            .last_repost
            .is_none_or(|t| t.elapsed() >= ESCALATION_REPOST)
        {
            self.last_repost = Some(Instant::now());
            let firing: Vec<Escalation> = self.escalations.values().cloned().collect();
            self.post_escalations(firing, Vec::new());
        }
        self.save_guards_detached();
    }

    /// The pause and mode as the state API shows them.
    fn publish_pause(&self) {
        let now = self.clock.now();
        let pause = self.guards.pause().cloned();
        let mode = self.mode.as_str().to_string();
        self.state.update(now, |s| {
            s.paused = pause.is_some();
            s.pause = pause;
            s.mode = mode;
        });
    }

    fn refresh_gauges(&mut self) {
        self.publish_pause();
        let m = self.inbox.metrics();
        let mut counts: HashMap<IncidentState, i64> = HashMap::new();
        for e in self.incidents.values() {
            *counts.entry(e.incident.state).or_default() += 1;
        }
        for s in IncidentState::ALL {
            m.incidents
                .get_or_create(&StateLabels { state: s.as_str() })
                .set(counts.get(&s).copied().unwrap_or(0));
        }
        m.admission_queue_depth.set(self.admission.queued() as i64);
        m.executions_running.set(self.admission.running() as i64);
        let now = self.clock.now();
        m.paused.set(i64::from(self.guards.pause().is_some()));
        let (open, half) = self.guards.breaker_counts(now);
        m.breakers
            .get_or_create(&StateLabels { state: "open" })
            .set(open);
        m.breakers
            .get_or_create(&StateLabels { state: "half_open" })
            .set(half);
        m.disruption_budget_remaining
            .set(self.guards.budget_remaining(now) as i64);
        m.admission_oldest_wait_seconds.set(
            self.admission
                .oldest()
                .map(|t| t.elapsed().as_secs() as i64)
                .unwrap_or(0),
        );
        m.escalations_active.set(self.escalations.len() as i64);
        m.flapping_components
            .set(self.guards.flapping().count() as i64);
        m.silenced_components.set(
            self.guards
                .silences()
                .filter(|(_, s)| s.until > now)
                .count() as i64,
        );
    }

    fn persist(&self, id: &str) {
        if let Some(e) = self.incidents.get(id) {
            if let Err(e) = self.store.put_incident(&e.incident) {
                tracing::error!(incident = %id, error = %e, "incident not recorded");
            }
        }
    }

    fn set_state(&mut self, id: &str, state: IncidentState, reason: Option<String>) {
        let now = self.clock.now();
        if let Some(e) = self.incidents.get_mut(id) {
            if e.incident.state != state || e.incident.reason != reason {
                tracing::info!(incident = %id, from = e.incident.state.as_str(), to = state.as_str(),
                    reason = reason.as_deref().unwrap_or(""), "incident state");
                let left = e.incident.state == IncidentState::Escalated
                    && state != IncidentState::Escalated;
                if left {
                    e.incident.escalation = None;
                }
                e.incident.state = state;
                e.incident.reason = reason;
                e.incident.updated_at = now;
                self.persist(id);
                if left {
                    self.resolve_escalation(id);
                }
            }
        }
    }

    fn announce(&self, p: &RemediationPolicy) {
        self.inbox.emit(LoopEvent::Planned {
            chain_id: p.chain_id.clone(),
            policy_id: p.id.clone(),
            cause: p.root_cause,
            actions: p.actions.iter().map(|a| a.action_type).collect(),
            score: p.score,
        });
    }

    fn record(&self, ctx: &mut Context<Self>, policy: RemediationPolicy) {
        let knowledge = self.knowledge.clone();
        ctx.spawn(
            async move {
                match knowledge.send(RecordPolicy(policy)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "policy not recorded"),
                    Err(e) => tracing::error!(error = %e, "policy not recorded"),
                }
            }
            .into_actor(self),
        );
    }

    /// Marks a pending or queued policy superseded: it can no longer be
    /// approved.
    fn supersede(&mut self, ctx: &mut Context<Self>, mut p: RemediationPolicy, why: &str) {
        let now = self.clock.now();
        p.approval_status = ApprovalStatus::Superseded;
        p.decisions.push(crate::model::ApprovalDecision {
            status: ApprovalStatus::Superseded,
            by: "mapek".into(),
            at: now,
            reason: Some(why.to_string()),
        });
        tracing::info!(policy = %p.id, reason = why, "policy superseded");
        self.record(ctx, p);
    }

    fn drop_pending(&mut self, ctx: &mut Context<Self>, id: &str, why: &str) {
        let pid = self.incidents.get_mut(id).and_then(|e| e.pending.take());
        if let Some(pid) = pid {
            if let Some((p, _)) = self.pending.remove(&pid) {
                self.supersede(ctx, p, why);
            }
        }
    }

    /// Applies one report of the Analyzer.
    fn apply_report(&mut self, ctx: &mut Context<Self>, chain: &ChainTrace, r: IncidentReport) {
        let now = self.clock.now();
        if let Some((reason, into)) = r.closed {
            self.close(ctx, &r.id, reason, into);
            return;
        }
        let is_new = !self.incidents.contains_key(&r.id);
        let entry = self.incidents.entry(r.id.clone()).or_insert_with(|| Entry {
            incident: Incident {
                id: r.id.clone(),
                state: IncidentState::Open,
                close_reason: None,
                merged_into: None,
                opened_at: r.opened_at,
                updated_at: now,
                closed_at: None,
                components: Vec::new(),
                root_component: None,
                severity: None,
                violation_count: 0,
                fingerprints: Vec::new(),
                diagnosis: None,
                diagnoses: Vec::new(),
                policies: Vec::new(),
                executions: Vec::new(),
                outcome: None,
                reason: None,
                hold_until: None,
                attempts: 0,
                recurrence_of: None,
                shadow: None,
                escalation: None,
                handed_off: None,
                shard: None,
            },
            analysis: None,
            chain: chain.clone(),
            pending: None,
            running: None,
            no_evidence: false,
            cooldown_until: None,
            state_timer: None,
            rejected: false,
            sticky: None,
            held: None,
        });
        let reopened = entry.incident.state == IncidentState::Closed;
        if reopened {
            // A fingerprint of a closed incident came back (same onset):
            // the incident reopens under its id.
            entry.incident.state = IncidentState::Open;
            entry.incident.close_reason = None;
            entry.incident.closed_at = None;
            self.closed_order.retain(|c| c != &r.id);
        }
        let inc = &mut entry.incident;
        inc.components = r.components;
        inc.root_component = r.root_component;
        inc.severity = r.severity;
        inc.violation_count = r.violation_count;
        if !r.fingerprints.is_empty() {
            inc.fingerprints = r.fingerprints;
        }
        inc.updated_at = now;
        entry.no_evidence = r.no_evidence;
        let mut rediagnosed = false;
        let fresh = r.diagnosis_changed || entry.analysis.is_none();
        if let Some(a) = r.analysis.filter(|_| fresh) {
            let d = Diagnosis {
                analysis_id: a.id.clone(),
                at: a.analyzed_at,
                cause: a
                    .root_causes
                    .first()
                    .map(|c| c.cause)
                    .unwrap_or(crate::model::RootCause::Unknown),
                confidence: a.root_causes.first().map(|c| c.confidence).unwrap_or(0.0),
                components: a
                    .root_causes
                    .first()
                    .map(|c| c.components.clone())
                    .unwrap_or_default(),
                patterns: a.patterns.iter().map(|p| p.kind).collect(),
                violation_count: a.violation_count,
            };
            let set = |c: &[String]| {
                let mut c = c.to_vec();
                c.sort();
                c
            };
            rediagnosed = inc.diagnosis.as_ref().is_some_and(|old| {
                old.cause != d.cause || set(&old.components) != set(&d.components)
            });
            if let Some(old) = inc.diagnosis.replace(d) {
                inc.diagnoses.push(old);
                if inc.diagnoses.len() > INCIDENT_DIAGNOSES_KEPT {
                    inc.diagnoses.remove(0);
                }
            }
            entry.analysis = Some(a);
            entry.chain = chain.clone();
        }
        if rediagnosed {
            // A new diagnosis: what was decided for the old one (a dry
            // run, a hand-off, a rejection) no longer holds.
            entry.held = None;
            entry.sticky = None;
            entry.rejected = false;
        }
        let id = r.id;
        if rediagnosed {
            self.hand_off(&id, None);
            self.drop_pending(ctx, &id, "the incident was diagnosed again");
            // A remedy queued for the earlier diagnosis (held by a pause or
            // a budget) must not run for the new one.
            for p in self.admission.withdraw(&id) {
                self.supersede(ctx, p, "the incident was diagnosed again");
            }
        }
        if is_new || reopened {
            self.opened(&id, now);
        }
        self.persist(&id);
        self.reconcile(ctx, &id);
    }

    /// An incident opened (or reopened): its components' relapses count
    /// towards flapping, and one opening soon after a success there makes
    /// that success a recurrence.
    fn opened(&mut self, id: &str, now: chrono::DateTime<chrono::Utc>) {
        let Some(components) = self
            .incidents
            .get(id)
            .map(|e| e.incident.components.clone())
        else {
            return;
        };
        for c in self.guards.incident_opened(id, &components, now) {
            tracing::warn!(component = %c, incident = %id, "component is flapping: automatic action stops for it");
            self.inbox.emit(LoopEvent::Flapping { component: c });
        }
        if let Some(last) = self.guards.recurrence(id, &components, now) {
            tracing::warn!(incident = %id, execution = %last.execution_id, cause = %last.cause,
                "symptoms came back after a success: the outcome is re-classified RECURRED");
            self.learned.reclassify(
                last.cause,
                &last.actions,
                last.outcome,
                OutcomeType::Recurred,
            );
            let m = self.inbox.metrics();
            m.outcomes_reclassified.inc();
            m.outcomes
                .get_or_create(&crate::metrics::StatusLabels { status: "RECURRED" })
                .inc();
            if let Some(e) = self.incidents.get_mut(id) {
                e.incident.recurrence_of = Some(last.execution_id.clone());
            }
            // The remedy did not hold: its breakers count a failure.
            let what = format!("RECURRED ({} came back as {id})", last.execution_id);
            for k in self.guards.recurred(&last, &what, now) {
                self.inbox.emit(LoopEvent::BreakerOpened { key: k });
            }
            self.inbox.emit(LoopEvent::Recurred {
                execution_id: last.execution_id.clone(),
                incident_id: id.to_string(),
            });
            if let Some(k) = &self.reclassify {
                let (k, execution_id) = (k.clone(), last.execution_id.clone());
                actix::spawn(async move {
                    let _ = k
                        .send(crate::messages::ReclassifyOutcome {
                            execution_id,
                            to: OutcomeType::Recurred,
                        })
                        .await;
                });
            }
        }
        self.save_guards_detached();
    }

    fn close(
        &mut self,
        ctx: &mut Context<Self>,
        id: &str,
        reason: CloseReason,
        into: Option<String>,
    ) {
        let now = self.clock.now();
        let Some(e) = self.incidents.get_mut(id) else {
            return;
        };
        if e.incident.state == IncidentState::Closed {
            return;
        }
        let reason = if reason == CloseReason::ResolvedWithoutAction
            && (!e.incident.executions.is_empty() || e.running.is_some())
        {
            CloseReason::Remedied
        } else {
            reason
        };
        e.incident.state = IncidentState::Closed;
        e.incident.close_reason = Some(reason);
        e.incident.merged_into = into.clone();
        e.incident.closed_at = Some(now);
        e.incident.updated_at = now;
        e.incident.reason = None;
        tracing::info!(incident = %id, reason = ?reason, merged_into = into.as_deref().unwrap_or(""), "incident closed");
        let why = match reason {
            CloseReason::Merged => "the incident merged into another",
            _ => "the incident closed",
        };
        self.drop_pending(ctx, id, why);
        for p in self.admission.withdraw(id) {
            self.supersede(ctx, p, why);
        }
        self.resolve_escalation(id);
        self.persist(id);
        self.closed_order.push_back(id.to_string());
        while self.closed_order.len() > CLOSED_INCIDENTS_KEPT {
            if let Some(old) = self.closed_order.pop_front() {
                self.incidents.remove(&old);
                if let Err(e) = self.store.delete_incident(&old) {
                    tracing::warn!(incident = %old, error = %e, "closed incident not forgotten");
                }
            }
        }
    }

    /// Brings one incident's state in line with what is known about it:
    /// plans, queues, escalates or waits.
    fn reconcile(&mut self, ctx: &mut Context<Self>, id: &str) {
        let now = self.clock.now();
        let Some(e) = self.incidents.get(id) else {
            return;
        };
        if e.incident.state == IncidentState::Closed {
            return;
        }
        if let Some(p) = &e.running {
            if self.admission.is_live(p) {
                return;
            }
            // Its hold's lease ran out: the execution never reported back.
            tracing::warn!(incident = %id, policy = %p, "execution never reported back; planning again");
            self.guards.release_trial(p);
            if let Some(e) = self.incidents.get_mut(id) {
                e.running = None;
            }
        }
        let Some(e) = self.incidents.get(id) else {
            return;
        };
        if e.no_evidence {
            return self.set_state(
                id,
                IncidentState::NoEvidence,
                Some("a source behind the incident gives no evidence".into()),
            );
        }
        if let Some(until) = e.cooldown_until {
            let left = until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                let key = id.to_string();
                if e.state_timer != Some(until) {
                    ctx.run_later(left, move |act, ctx| {
                        if let Some(e) = act.incidents.get_mut(&key) {
                            e.state_timer = None;
                            // Only the timer of the current cooldown ends it.
                            if e.cooldown_until.is_some_and(|u| u <= Instant::now()) {
                                e.cooldown_until = None;
                            }
                        }
                        act.reconcile(ctx, &key);
                    });
                    if let Some(e) = self.incidents.get_mut(id) {
                        e.state_timer = Some(until);
                    }
                }
                return self.set_state(id, IncidentState::CoolingDown, None);
            }
        }
        if self.admission.has_queued(id) {
            return self.set_state(id, IncidentState::Queued, None);
        }
        if e.pending.is_some() {
            return self.set_state(id, IncidentState::Pending, None);
        }
        if e.rejected {
            return self.escalate(
                id,
                EscalationKind::Rejected,
                "its remedy was rejected: a person must act".into(),
            );
        }
        if let Some((kind, reason)) = e.sticky.clone() {
            return self.escalate(id, kind, reason);
        }
        if let Some(why) = e.held.clone() {
            return self.set_state(id, IncidentState::Held, Some(why));
        }
        if !self.state.lock().is_running {
            return; // shutting down: no new remedies
        }
        let Some(analysis) = e.analysis.clone() else {
            return self.set_state(id, IncidentState::Open, None);
        };
        let chain = e.chain.clone();
        let severity = e.incident.severity.unwrap_or(Severity::Warning);
        let components = e.incident.components.clone();
        if components
            .iter()
            .all(|c| NO_COMPONENT.contains(&c.as_str()))
        {
            return self.escalate(
                id,
                EscalationKind::UnknownComponent,
                "its violations name no component: a person must diagnose".into(),
            );
        }
        // Guards on the incident's components: a silence holds it, a
        // flapping component or an open component breaker escalates it.
        for c in &components {
            if let Some(why) = self.guards.silence_of(c, now) {
                if self
                    .incidents
                    .get(id)
                    .is_some_and(|e| e.incident.reason.as_deref() != Some(why.as_str()))
                {
                    self.guard_decision(id, None, "silence", "held", &why);
                }
                return self.set_state(id, IncidentState::Held, Some(why));
            }
            if let Some(why) = self.guards.flapping_of(c, now) {
                if self
                    .incidents
                    .get(id)
                    .is_some_and(|e| e.incident.state != IncidentState::Escalated)
                {
                    self.guard_decision(id, None, "flapping", "escalated", &why);
                }
                return self.escalate(id, EscalationKind::Flapping, why);
            }
            let key = crate::safety::component_breaker(c);
            // Half-open: a trial may be planned (the admission gate lets
            // one through); only an open breaker escalates.
            if let Some(why) = self
                .guards
                .breaker_blocks(&key, None, now)
                .filter(|w| !w.contains("half-open"))
            {
                if self
                    .incidents
                    .get(id)
                    .is_some_and(|e| e.incident.state != IncidentState::Escalated)
                {
                    self.guard_decision(id, None, "breaker", "escalated", &why);
                }
                return self.escalate(id, EscalationKind::BreakerOpen, why);
            }
        }
        let started = Instant::now();
        let thompson = self.settings.learning.selection == Selection::Thompson;
        let decision = if thompson {
            learn::candidates(&analysis, &self.learned, &self.settings, now)
        } else {
            plan(&analysis, &self.learned, &self.settings, now)
        };
        let policies = match decision {
            PlanDecision::BelowThreshold { .. } => {
                return self.set_state(id, IncidentState::Open, None)
            }
            PlanDecision::Escalate { reason } => {
                return self.escalate(id, EscalationKind::NoConfidentCause, reason)
            }
            PlanDecision::Policies(ps) => ps,
        };
        // A remedy reaches only a system that owns its component.
        let (covered, uncovered): (Vec<RemediationPolicy>, Vec<RemediationPolicy>) =
            policies.into_iter().partition(|p| {
                p.actions.iter().all(|a| {
                    !NO_COMPONENT.contains(&a.target.as_str())
                        && self
                            .router
                            .as_ref()
                            .is_none_or(|r| r.covers(a.action_type, &a.target))
                })
            });
        if covered.is_empty() {
            let target = uncovered
                .first()
                .and_then(|p| p.actions.first())
                .map(|a| a.target.clone())
                .unwrap_or_default();
            return self.escalate(
                id,
                EscalationKind::NoRoute,
                format!("no effector route covers component `{target}`: a person must act"),
            );
        }
        // The choice: Thompson sampling among the candidates whose
        // breakers are closed (or ranked: the first whose breakers are).
        let mut p = {
            let guards = &mut self.guards;
            let mut blocked = |p: &RemediationPolicy| {
                p.actions.iter().find_map(|a| {
                    guards.breaker_blocks(
                        &crate::safety::action_breaker(p.root_cause, a.action_type),
                        None,
                        now,
                    )
                })
            };
            if thompson {
                match learn::choose(
                    &covered,
                    &self.learned,
                    &self.settings,
                    &mut self.rng,
                    &mut blocked,
                ) {
                    Some(ch) => {
                        let mut p = covered[ch.index].clone();
                        p.candidates = ch.considered;
                        p
                    }
                    None => {
                        let why = blocked(&covered[0]).unwrap_or_default();
                        return self.escalate(
                            id,
                            EscalationKind::BreakerOpen,
                            format!("every candidate remedy is held by an open circuit breaker ({why}): a person must act"),
                        );
                    }
                }
            } else {
                let open: Vec<Option<String>> = covered.iter().map(&mut blocked).collect();
                let usable: Vec<usize> =
                    (0..covered.len()).filter(|i| open[*i].is_none()).collect();
                let Some(first) = usable.first().copied() else {
                    let why = open.into_iter().flatten().next().unwrap_or_default();
                    return self.escalate(
                        id,
                        EscalationKind::BreakerOpen,
                        format!("every remedy is held by an open circuit breaker ({why}): a person must act"),
                    );
                };
                let chosen = usable
                    .iter()
                    .copied()
                    .find(|i| {
                        learn::autonomy(&covered[*i], &self.learned, &self.settings).auto_approved
                    })
                    .unwrap_or(first);
                covered[chosen].clone()
            }
        };
        // Cluster mode: the incident belongs to the shard of its root
        // component when it is first planned, and stays there.
        if let Some(l) = &self.leadership {
            let fallback = crate::leadership::policy_component(&p).to_string();
            p.shard = self.incidents.get_mut(id).map(|e| {
                let root = e.incident.root_component.clone().unwrap_or(fallback);
                *e.incident.shard.get_or_insert_with(|| l.shard_of(&root))
            });
        }
        if thompson {
            self.inbox.emit(LoopEvent::Chose {
                incident_id: id.to_string(),
                cause: p.root_cause,
                remedy: learn::remedy_of(&p),
                candidates: p.candidates.len(),
            });
        }
        self.inbox.metrics().policies_generated.inc();
        let mut chain = chain;
        // A re-plan is a new attempt: its deadline counts from now, not
        // from the diagnosis it was planned from.
        chain.started = Instant::now();
        chain.timings.planning_seconds = started.elapsed().as_secs_f64();
        self.inbox
            .metrics()
            .phase("planning", chain.timings.planning_seconds);
        self.state.update(now, |s| s.policies_generated = 1);
        let verdict = learn::autonomy(&p, &self.learned, &self.settings);
        let auto = verdict.auto_approved;
        p.autonomy = Some(verdict.clone());
        self.announce(&p);
        if let Some(e) = self.incidents.get_mut(id) {
            e.incident.policies.push(p.id.clone());
        }
        let mode = self.mode_of(&p);
        if mode == Mode::Shadow {
            let why = format!(
                "shadow mode: would have {} {} ({}); mapek watches what happens without acting",
                if auto {
                    "run"
                } else {
                    "asked a person to approve"
                },
                p.id,
                learn::remedy_of(&p)
            );
            self.guard_decision(id, Some(&mut p), "mode", "shadow", &why);
            p.approval_status = ApprovalStatus::Superseded;
            p.decisions.push(crate::model::ApprovalDecision {
                status: ApprovalStatus::Superseded,
                by: "mapek".into(),
                at: now,
                reason: Some("shadow mode: recorded, never executed".into()),
            });
            if let Some(e) = self.incidents.get_mut(id) {
                e.held = Some(why.clone());
                e.incident.shadow = Some(crate::model::ShadowPlan {
                    policy_id: p.id.clone(),
                    cause: p.root_cause,
                    remedy: learn::remedy_of(&p),
                    auto_approved: auto,
                    at: now,
                });
            }
            self.record(ctx, p);
            return self.set_state(id, IncidentState::Held, Some(why));
        }
        if auto {
            if let Err(err) = decide(
                &mut p,
                ApprovalStatus::Approved,
                crate::plan::AUTO_APPROVER,
                Some(verdict.reason.clone()),
                now,
            ) {
                tracing::error!(error = %err, "auto-approval failed");
                return;
            }
            self.record(ctx, p.clone());
            self.enqueue(ctx, p, chain, severity);
        } else {
            tracing::info!(incident = %id, policy = %p.id, cause = %p.root_cause, risk = ?p.risk_level, why = %verdict.reason, "policy waits for approval");
            self.record(ctx, p.clone());
            if let Some(e) = self.incidents.get_mut(id) {
                e.pending = Some(p.id.clone());
            }
            self.pending.insert(p.id.clone(), (p, chain));
            self.set_state(id, IncidentState::Pending, None);
        }
    }

    fn escalate(&mut self, id: &str, kind: EscalationKind, reason: String) {
        let already = self.incidents.get(id).is_some_and(|e| {
            e.incident.state == IncidentState::Escalated
                && e.incident.reason.as_deref() == Some(reason.as_str())
        });
        if !already {
            tracing::warn!(incident = %id, %reason, kind = kind.as_str(), "escalating to a human; acting on nothing");
            let chain_id = self
                .incidents
                .get(id)
                .map(|e| e.chain.chain_id.clone())
                .unwrap_or_default();
            self.inbox.emit(LoopEvent::Escalated {
                chain_id,
                reason: reason.clone(),
            });
            let known = self.escalations.get(id).is_some_and(|e| e.kind == kind);
            if !known {
                // Another reason: the earlier alert (another `reason`
                // label) is resolved, not left to lapse.
                if let Some(old) = self.escalations.remove(id) {
                    self.post_escalations(Vec::new(), vec![old]);
                }
                self.inbox
                    .metrics()
                    .escalations
                    .get_or_create(&crate::metrics::ReasonLabels {
                        reason: kind.as_str(),
                    })
                    .inc();
            }
            if let Some(e) = self.incidents.get(id) {
                let esc = Escalation {
                    incident_id: id.to_string(),
                    kind,
                    reason: reason.clone(),
                    components: e.incident.components.clone(),
                    severity: e.incident.severity,
                    since: self
                        .escalations
                        .get(id)
                        .filter(|x| x.kind == kind)
                        .map(|x| x.since)
                        .unwrap_or_else(|| self.clock.now()),
                };
                self.escalations.insert(id.to_string(), esc.clone());
                self.post_escalations(vec![esc], Vec::new());
            }
        }
        // Set after the escalation is recorded: leaving and re-entering
        // the state is one escalation.
        if let Some(e) = self.incidents.get_mut(id) {
            if e.incident.state != IncidentState::Escalated
                || e.incident.reason.as_deref() != Some(reason.as_str())
                || e.incident.escalation != Some(kind)
            {
                e.incident.escalation = Some(kind);
                e.incident.state = IncidentState::Escalated;
                e.incident.reason = Some(reason);
                e.incident.updated_at = self.clock.now();
                self.persist(id);
            }
        }
    }

    fn enqueue(
        &mut self,
        ctx: &mut Context<Self>,
        policy: RemediationPolicy,
        chain: ChainTrace,
        severity: Severity,
    ) {
        let id = policy.incident_id.clone().unwrap_or_default();
        self.admission.enqueue(policy, chain, severity);
        self.set_state(&id, IncidentState::Queued, None);
        self.admit(ctx);
    }

    /// Hands every policy the admission queue admits now to the Executor;
    /// the safety guards are the queue's last gate.
    fn admit(&mut self, ctx: &mut Context<Self>) {
        if !self.state.lock().is_running {
            return; // shutting down: nothing new starts
        }
        let wall = self.clock.now();
        self.refresh_cluster_budget(wall);
        // The queue timeout (time paused does not count).
        if self.guards.pause().is_none() {
            let timeout = Duration::from_secs(self.guards.settings().queue_timeout_seconds);
            for mut q in self.admission.overdue(Instant::now(), timeout) {
                let id = q.policy.incident_id.clone().unwrap_or_default();
                if !self.leads(&q.policy) {
                    // A standby's waiting is not a remedy stuck in the
                    // queue: the shard's leader acts (or escalates) on it.
                    let severity = self
                        .incidents
                        .get(&id)
                        .and_then(|e| e.incident.severity)
                        .unwrap_or(Severity::Warning);
                    self.admission.enqueue(q.policy, q.chain, severity);
                    continue;
                }
                let last = q
                    .policy
                    .guards
                    .last()
                    .map(|g| format!(" (last held by {}: {})", g.guard, g.reason))
                    .unwrap_or_default();
                let why = format!(
                    "its remedy {} waited {} s in the admission queue{last}: a person must act",
                    q.policy.id,
                    timeout.as_secs()
                );
                self.guard_decision(&id, Some(&mut q.policy), "queue_timeout", "escalated", &why);
                self.supersede(ctx, q.policy, &why);
                self.stick(&id, EscalationKind::QueueTimeout, &why);
                self.escalate(&id, EscalationKind::QueueTimeout, why);
            }
        }
        let pass = {
            let mode = self.mode;
            let router = self.router.clone();
            self.guards.begin_pass(wall);
            let guards = &mut self.guards;
            let mut changed: Vec<RemediationPolicy> = Vec::new();
            let inbox = self.inbox.clone();
            let clock = self.clock.clone();
            let leadership = self.leadership.clone();
            let pass = self.admission.admit_with(Instant::now(), |p| {
                let standby = leadership.as_ref().and_then(|l| {
                    let shard = crate::leadership::shard_not_led(l.as_ref(), p)?;
                    Some(()).map(|_| {
                        let view = l.view();
                        format!(
                            "standby: shard {shard} is led by {}",
                            view.leader_of(shard).unwrap_or("nobody yet")
                        )
                    })
                });
                let g = match standby {
                    Some(why) => Gate::Hold("leadership", why),
                    None => guards.gate(p, wall),
                };
                let dry = mode_of(router.as_ref(), p, mode) != Mode::Act;
                let (guard, decision, reason) = match &g {
                    Gate::Admit => {
                        if !dry {
                            guards.admitted(p, wall);
                        }
                        if p.guards.iter().any(|x| x.decision == "held") {
                            (
                                "admission",
                                "admitted",
                                "every guard lets it run now".to_string(),
                            )
                        } else {
                            return g;
                        }
                    }
                    Gate::Hold(guard, why) => (*guard, "held", why.clone()),
                    Gate::Escalate(guard, _, why) => (*guard, "escalated", why.clone()),
                };
                // Recorded (and counted) once per decision, not per pass.
                if note_decision(p, guard, decision, &reason, clock.now()) {
                    changed.push(p.clone());
                    let incident = p.incident_id.clone().unwrap_or_default();
                    announce_guard(
                        &inbox,
                        &incident,
                        Some(p.id.clone()),
                        guard,
                        decision,
                        &reason,
                    );
                }
                g
            });
            for p in changed {
                self.record(ctx, p);
            }
            pass
        };
        for (id, guard, why) in pass.held {
            let reason = format!("held by {guard}: {why}");
            let same = self.incidents.get(&id).is_some_and(|e| {
                e.incident.state == IncidentState::Queued
                    && e.incident
                        .reason
                        .as_deref()
                        .is_some_and(|r| r.starts_with(&format!("held by {guard}")))
            });
            if !same {
                self.set_state(&id, IncidentState::Queued, Some(reason));
            }
        }
        for (q, guard, kind, why) in pass.escalated {
            let id = q.policy.incident_id.clone().unwrap_or_default();
            self.supersede(ctx, q.policy, &why);
            if guard == "disruption_budget" || guard == "component_rate_limit" {
                self.stick(&id, kind, &why);
            }
            self.escalate(&id, kind, why);
        }
        for mut q in pass.admitted {
            // Time spent waiting in the queue (for a guard, a pause, a
            // cooldown) is not the chain's cycle time: its clock restarts.
            q.chain.started = Instant::now();
            let id = q.policy.incident_id.clone().unwrap_or_default();
            if let Some(e) = self.incidents.get_mut(&id) {
                e.running = Some(q.policy.id.clone());
                e.incident.reason = None;
                e.incident.attempts = e.incident.attempts.saturating_add(1);
                q.policy.attempt = e.incident.attempts;
            }
            self.set_state(&id, IncidentState::Acting, None);
            self.dispatch(ctx, q.policy, q.chain);
        }
        self.save_guards_detached();
        // Policies still waiting behind a cooldown, a hold or a guard's
        // window: try again when the earliest of those ends (nothing else
        // may happen).
        let guard_release = self.guards.next_release().and_then(|at| {
            let left = (at - self.clock.now()).to_std().unwrap_or_default();
            (self.admission.queued() > 0).then(|| Instant::now() + left)
        });
        let next = [self.admission.next_wakeup(), guard_release]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = next {
            if self.wakeup.is_none_or(|w| at < w || w <= Instant::now()) {
                self.wakeup = Some(at);
                let wait = at.saturating_duration_since(Instant::now()) + Duration::from_millis(1);
                ctx.run_later(wait, |act, ctx| {
                    let inbox = act.inbox.clone();
                    inbox.guard_internal(act, ctx, "AdmissionWakeup", |act, ctx| {
                        act.wakeup = None;
                        act.admit(ctx);
                        Ok(())
                    });
                });
            }
        }
        self.refresh_gauges();
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>, policy: RemediationPolicy, chain: ChainTrace) {
        self.inbox.emit(LoopEvent::Approved {
            chain_id: chain.chain_id.clone(),
            policy_id: policy.id.clone(),
            by: policy
                .decisions
                .last()
                .map(|d| d.by.clone())
                .unwrap_or_default(),
        });
        let executor = self.executor.clone();
        tracing::info!(chain = %chain.chain_id, policy = %policy.id, incident = policy.incident_id.as_deref().unwrap_or(""),
            cause = %policy.root_cause, scope = ?scope_of(&policy),
            actions = ?policy.actions.iter().map(|a| a.action_type.as_str()).collect::<Vec<_>>(), "admitted; handing to the executor");
        // Admitted policies must not be lost: wait for room in the
        // Executor's mailbox (backpressure) rather than shed.
        let sent = policy.clone();
        ctx.spawn(
            async move { executor.send(PolicyApproved { chain, policy }).await }
                .into_actor(self)
                .map(move |res, act, ctx| {
                    if let Err(e) = res {
                        // The Executor failed before running it: nothing
                        // ran, so the incident is planned again.
                        tracing::error!(policy = %sent.id, error = %e, "admitted policy could not reach the executor; planning again");
                        act.admission.finished(&sent, Instant::now(), Duration::ZERO);
                        act.guards.release_trial(&sent.id);
                        let id = sent.incident_id.clone().unwrap_or_default();
                        if let Some(e) = act.incidents.get_mut(&id) {
                            if e.running.as_deref() == Some(sent.id.as_str()) {
                                e.running = None;
                            }
                        }
                        act.reconcile(ctx, &id);
                        act.admit(ctx);
                    }
                }),
        );
    }

    /// Breakers opened: queued policies they now refuse leave the queue
    /// and their incidents are planned again (another remedy, or an
    /// escalation).
    fn breakers_opened(&mut self, ctx: &mut Context<Self>, keys: &[String], by: &str) {
        for k in keys {
            tracing::warn!(breaker = %k, policy = %by, "circuit breaker opened");
            self.inbox.emit(LoopEvent::BreakerOpened { key: k.clone() });
        }
        let hit: Vec<String> = self
            .admission
            .queued_policies()
            .filter(|q| {
                q.policy.actions.iter().any(|a| {
                    keys.contains(&crate::safety::action_breaker(
                        q.policy.root_cause,
                        a.action_type,
                    )) || keys.contains(&crate::safety::component_breaker(&a.target))
                })
            })
            .filter_map(|q| q.policy.incident_id.clone())
            .collect();
        for id in hit {
            for p in self.admission.withdraw(&id) {
                self.supersede(ctx, p, "a circuit breaker of its remedy opened");
            }
            self.reconcile(ctx, &id);
        }
    }

    /// The incident an execution belongs to now (following merges).
    fn owner_of(&self, id: &str) -> Option<String> {
        let mut cur = id.to_string();
        for _ in 0..16 {
            let e = self.incidents.get(&cur)?;
            match &e.incident.merged_into {
                Some(next) if e.incident.state == IncidentState::Closed => cur = next.clone(),
                _ => return Some(cur),
            }
        }
        Some(cur)
    }

    fn page(&self, msg: &GetIncidents) -> IncidentPage {
        // Newest first by (onset, id); the cursor is a position in that
        // order, so a page boundary survives state changes and evictions.
        let key = |i: &Incident| (i.opened_at.timestamp_millis(), i.id.clone());
        let mut all: Vec<&Incident> = self
            .incidents
            .values()
            .map(|e| &e.incident)
            .filter(|i| msg.state.is_none_or(|s| i.state == s))
            .filter(|i| msg.after.as_ref().is_none_or(|after| key(i) < *after))
            .collect();
        all.sort_by_key(|i| std::cmp::Reverse(key(i)));
        let limit = msg.limit.max(1);
        let slice: Vec<Incident> = all.iter().take(limit).map(|i| (*i).clone()).collect();
        let next = (all.len() > slice.len())
            .then(|| {
                slice
                    .last()
                    .map(|i| format!("{}:{}", i.opened_at.timestamp_millis(), i.id))
            })
            .flatten();
        IncidentPage {
            incidents: slice,
            next,
        }
    }
}

impl Actor for Planner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.inbox.started();
        if let (Some(l), false) = (&self.leadership, self.watching) {
            // Every change of leadership: the held policies of a shard just
            // won are admitted at once.
            self.watching = true;
            let rx = l.subscribe();
            let changes = futures::stream::unfold(rx, |mut rx| async move {
                rx.changed().await.ok().map(|_| ((), rx))
            });
            ctx.add_stream(changes);
        }
        if !self.ticking {
            self.ticking = true;
            ctx.run_interval(SAFETY_TICK, |act, ctx| {
                let inbox = act.inbox.clone();
                inbox.guard_internal(act, ctx, "SafetyTick", |act, ctx| {
                    act.tick(ctx);
                    act.refresh_gauges();
                    Ok(())
                });
            });
        }
    }
}

impl StreamHandler<()> for Planner {
    fn handle(&mut self, _: (), ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard_internal(self, ctx, "LeadershipChanged", |act, ctx| {
            act.took_over();
            act.admit(ctx);
            Ok(())
        });
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        // The leadership's sender is gone (shutdown): nothing to watch.
    }
}

impl Supervised for Planner {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // A restart drops the context's timers: they are armed again.
        self.ticking = false;
        self.watching = false;
        self.wakeup = None;
        for e in self.incidents.values_mut() {
            e.state_timer = None;
        }
        crate::mailbox::note_restart(&self.inbox, &self.supervisor);
    }
}

impl Handler<AnalysisReady> for Planner {
    type Result = ();

    fn handle(&mut self, msg: AnalysisReady, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "AnalysisReady", |act, ctx| {
            let chain = msg.chain;
            let _span = tracing::info_span!("chain", chain = %chain.chain_id).entered();
            for r in msg.reports {
                act.apply_report(ctx, &chain, r);
            }
            if let Some(open) = msg.open_ids {
                // A full report: whatever the Analyzer no longer holds has
                // ended (while mapek was down, or its report was lost).
                let held: std::collections::HashSet<String> = open.into_iter().collect();
                let gone: Vec<String> = act
                    .incidents
                    .iter()
                    .filter(|(id, e)| {
                        e.incident.state != IncidentState::Closed
                            && e.running.is_none()
                            && !held.contains(*id)
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in gone {
                    act.close(ctx, &id, CloseReason::ResolvedWithoutAction, None);
                }
            }
            act.refresh_gauges();
            Ok(())
        });
    }
}

impl Handler<DecidePolicy> for Planner {
    type Result = Result<RemediationPolicy, DecisionError>;

    fn handle(&mut self, msg: DecidePolicy, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox
            .guard(self, ctx, "DecidePolicy", |act, ctx| {
                let now = act.clock.now();
                let Some((mut policy, mut chain)) = act.pending.remove(&msg.id) else {
                    return Ok(Err(match act.store.get_policy(&msg.id) {
                        Ok(Some(p)) => DecisionError::Invalid(format!(
                            "policy `{}` is {}, only pending policies can be decided",
                            p.id,
                            p.approval_status.as_str()
                        )),
                        _ => DecisionError::NotFound(msg.id.clone()),
                    }));
                };
                if msg.decision == ApprovalStatus::Approved && !act.state.lock().is_running {
                    act.pending.insert(msg.id.clone(), (policy, chain));
                    return Ok(Err(DecisionError::Busy(
                        "mapek is shutting down; the policy stays pending".into(),
                    )));
                }
                if let Err(e) = decide(&mut policy, msg.decision, &msg.by, msg.reason.clone(), now)
                {
                    act.pending.insert(msg.id.clone(), (policy, chain));
                    return Ok(Err(DecisionError::Invalid(e.to_string())));
                }
                let incident = policy.incident_id.clone().unwrap_or_default();
                if let Some(e) = act.incidents.get_mut(&incident) {
                    if e.pending.as_deref() == Some(policy.id.as_str()) {
                        e.pending = None;
                    }
                }
                act.record(ctx, policy.clone());
                if policy.approval_status == ApprovalStatus::Approved {
                    // The chain's clock restarts at approval: time spent
                    // waiting for a person is not the loop's cycle time.
                    chain.started = Instant::now();
                    let severity = act
                        .incidents
                        .get(&incident)
                        .and_then(|e| e.incident.severity)
                        .unwrap_or(Severity::Warning);
                    act.enqueue(ctx, policy.clone(), chain, severity);
                } else {
                    tracing::info!(policy = %policy.id, by = %msg.by, "policy rejected");
                    act.inbox.emit(LoopEvent::Rejected {
                        policy_id: policy.id.clone(),
                        by: msg.by.clone(),
                    });
                    if let Some(e) = act.incidents.get_mut(&incident) {
                        e.rejected = true;
                    }
                    act.hand_off(
                        &incident,
                        Some((
                            EscalationKind::Rejected,
                            "its remedy was rejected: a person must act".into(),
                        )),
                    );
                    act.reconcile(ctx, &incident);
                }
                act.refresh_gauges();
                Ok(Ok(policy))
            })
            .unwrap_or_else(|| {
                Err(DecisionError::Unavailable(
                    "planner failed while deciding".into(),
                ))
            })
    }
}

impl Handler<ActionsDone> for Planner {
    type Result = ();

    fn handle(&mut self, msg: ActionsDone, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "ActionsDone", |act, ctx| {
            if act.admission.actions_done(&msg.policy_id) {
                let owner = act
                    .incidents
                    .iter()
                    .find(|(_, e)| e.running.as_deref() == Some(msg.policy_id.as_str()))
                    .map(|(k, _)| k.clone());
                if let Some(id) = owner {
                    if act
                        .incidents
                        .get(&id)
                        .is_some_and(|e| e.incident.state == IncidentState::Acting)
                    {
                        act.set_state(&id, IncidentState::Verifying, None);
                    }
                }
            }
            act.admit(ctx);
            Ok(())
        });
    }
}

impl Handler<ExecutionFinished> for Planner {
    type Result = ();

    fn handle(&mut self, msg: ExecutionFinished, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "ExecutionFinished", |act, ctx| {
            let dry = msg.execution.status == ExecutionStatus::DryRun;
            let held = crate::execute::run::held_before_acting(&msg.execution);
            let by_budget = msg
                .execution
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(crate::execute::run::HELD_BY_BUDGET));
            // Cluster mode: nothing sent, nothing spent (the Executor gave
            // its slots back too).
            let sent = msg.execution.actions.iter().any(|a| a.attempts > 0);
            if act.leadership.is_some() && !sent {
                act.guards.release_budget(&msg.policy.id);
            }
            // Cluster mode: another leader pinned the incident to its
            // shard first; it belongs there (this replica holds it from
            // now on unless it leads that shard).
            if let Some(shard) = crate::execute::run::pinned_elsewhere(&msg.execution) {
                let id = msg.policy.incident_id.clone().unwrap_or_default();
                if let Some(e) = act.incidents.get_mut(&id) {
                    tracing::info!(incident = %id, shard, "the incident belongs to another shard, pinned cluster-wide");
                    e.incident.shard = Some(shard);
                }
            }
            if by_budget {
                // Disruptive policies wait (in the admission queue, not
                // planned again and again) until a slot frees.
                let wait = crate::execute::run::budget_frees_in(&msg.execution)
                    .unwrap_or(Duration::from_secs(1));
                act.guards.cluster_budget_full_until(
                    act.clock.now() + chrono::Duration::from_std(wait).unwrap_or_default(),
                );
            }
            let cooldown = if dry || held {
                Duration::ZERO
            } else {
                Duration::from_secs(act.settings.cooldown_seconds)
            };
            act.admission
                .finished(&msg.policy, Instant::now(), cooldown);
            let origin = msg.policy.incident_id.clone().unwrap_or_default();
            let now = act.clock.now();
            if dry {
                let why = format!(
                    "dry run: {} recorded as {} (nothing left mapek); planned again only when the diagnosis changes",
                    msg.policy.id, msg.execution.id
                );
                act.guard_decision(&origin, None, "mode", "dry_run", &why);
                if let Some(e) = act.incidents.get_mut(&origin) {
                    e.held = Some(why);
                }
                act.guards.release_trial(&msg.policy.id);
            } else {
                act.guards.rolled_back(&msg.execution, &msg.policy, now);
                let opened = act.guards.record_execution(&msg.execution, &msg.policy, now);
                act.guards.success(&msg.execution, &msg.policy, now);
                if !opened.is_empty() {
                    act.breakers_opened(ctx, &opened, &msg.policy.id);
                }
                act.save_guards_detached();
            }
            let mut ids = vec![origin.clone()];
            if let Some(owner) = act.owner_of(&origin) {
                if owner != origin {
                    ids.push(owner);
                }
            }
            for id in &ids {
                if let Some(e) = act.incidents.get_mut(id) {
                    if e.running.as_deref() == Some(msg.policy.id.as_str()) {
                        e.running = None;
                    }
                    if !e.incident.executions.contains(&msg.execution.id) {
                        e.incident.executions.push(msg.execution.id.clone());
                    }
                    e.incident.outcome = msg.execution.outcome;
                    e.incident.updated_at = now;
                    e.cooldown_until = (!cooldown.is_zero()).then(|| Instant::now() + cooldown);
                    e.incident.hold_until = (!cooldown.is_zero())
                        .then(|| now + chrono::Duration::from_std(cooldown).unwrap_or_default());
                    if e.incident.state == IncidentState::Closed
                        && e.incident.close_reason == Some(CloseReason::ResolvedWithoutAction)
                    {
                        e.incident.close_reason = Some(CloseReason::Remedied);
                    }
                }
                act.persist(id);
            }
            for id in &ids {
                act.reconcile(ctx, id);
            }
            act.admit(ctx);
            Ok(())
        });
    }
}

impl Handler<KnowledgeUpdated> for Planner {
    type Result = ();

    fn handle(&mut self, msg: KnowledgeUpdated, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "KnowledgeUpdated", |act, _| {
            act.learned = msg.stats;
            let m = act.inbox.metrics();
            for cause in act.learned.by_remedy.keys() {
                if let Some((_, r)) = learn::regret(&act.learned, *cause) {
                    m.learning_regret
                        .get_or_create(&crate::metrics::CauseLabels {
                            cause: cause.as_str(),
                        })
                        .set(r);
                }
            }
            Ok(())
        });
    }
}

impl Handler<GetIncidents> for Planner {
    type Result = MessageResult<GetIncidents>;

    fn handle(&mut self, msg: GetIncidents, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        MessageResult(
            inbox
                .guard(self, ctx, "GetIncidents", |act, _| Ok(act.page(&msg)))
                .unwrap_or_default(),
        )
    }
}

impl Handler<GetIncident> for Planner {
    type Result = Option<Incident>;

    fn handle(&mut self, msg: GetIncident, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox
            .guard(self, ctx, "GetIncident", |act, _| {
                Ok(act.incidents.get(&msg.id).map(|e| e.incident.clone()))
            })
            .flatten()
    }
}

/// A reply of an operator command: JSON once the guard state is durable.
type OperatorReply = ResponseActFuture<Planner, Result<serde_json::Value, String>>;

impl Planner {
    /// The reply of an operator command: `value` once the guard state is
    /// durable (`None`: the handler failed while `what`).
    fn durable_reply(&mut self, value: Option<serde_json::Value>, what: &str) -> OperatorReply {
        let Some(value) = value else {
            return Box::pin(actix::fut::ready(Err(format!(
                "planner failed while {what}"
            ))));
        };
        let write = self.save_guards();
        self.refresh_gauges();
        Box::pin(
            write
                .into_actor(self)
                .map(move |r, _act, _ctx| r.map(|()| value)),
        )
    }

    /// The incidents not closed that involve `component`.
    fn open_on(&self, component: &str) -> Vec<String> {
        self.incidents
            .iter()
            .filter(|(_, e)| {
                e.incident.state != IncidentState::Closed
                    && e.incident.components.iter().any(|c| c == component)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn safety_view(&mut self) -> serde_json::Value {
        let now = self.clock.now();
        let budget = self.guards.settings().disruption_budget.clone();
        let rate = self.guards.settings().component_rate_limit.clone();
        let used = self.guards.budget_used(now);
        let queue: Vec<serde_json::Value> = self
            .admission
            .queued_policies()
            .map(|q| {
                serde_json::json!({
                    "policy_id": q.policy.id,
                    "incident_id": q.policy.incident_id,
                    "waiting_seconds": q.since.elapsed().as_secs(),
                    "held_by": q.policy.guards.last().map(|g| g.guard.clone()),
                    "reason": q.policy.guards.last().map(|g| g.reason.clone()),
                })
            })
            .collect();
        let flapping: Vec<serde_json::Value> = self
            .guards
            .flapping()
            .map(|(c, f)| {
                serde_json::json!({
                    "component": c,
                    "since": f.since,
                    "incidents": f.openings.iter().map(|(at, i)| serde_json::json!({"incident": i, "at": at})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let silences: Vec<serde_json::Value> = self
            .guards
            .silences()
            .filter(|(_, s)| s.until > now)
            .map(|(c, s)| {
                serde_json::json!({"component": c, "until": s.until, "reason": s.reason, "by": s.by, "at": s.at})
            })
            .collect();
        let breakers: Vec<serde_json::Value> = self
            .guards
            .breakers()
            .map(|b| {
                let state = match b.state {
                    crate::safety::BreakerState::Open if b.open_until.is_some_and(|u| u <= now) => {
                        "half_open"
                    }
                    s => s.as_str(),
                };
                serde_json::json!({
                    "key": b.key,
                    "state": state,
                    "failures": b.failures,
                    "open_until": b.open_until,
                    "trial": b.trial,
                    "last_failure": b.last_failure,
                })
            })
            .collect();
        let escalations: Vec<&Escalation> = self.escalations.values().collect();
        serde_json::json!({
            "mode": self.mode.as_str(),
            "paused": self.guards.pause().is_some(),
            "pause": self.guards.pause(),
            "disruption_budget": {
                "max_actions": budget.max_actions,
                "window_seconds": budget.window_seconds,
                "action_types": budget.action_types,
                "used": used,
                "remaining": (budget.max_actions as usize).saturating_sub(used),
            },
            "component_rate_limit": {"max_actions": rate.max_actions, "window_seconds": rate.window_seconds},
            "breakers": breakers,
            "flapping": flapping,
            "silences": silences,
            "queue": queue,
            "escalations": escalations,
        })
    }

    fn shadow_report(&self) -> serde_json::Value {
        #[derive(Default, serde::Serialize)]
        struct PerCause {
            would_have_acted: u64,
            would_have_auto_approved: u64,
            healed_without_mapek: u64,
            not_healed: u64,
            still_active: u64,
            remedies: std::collections::BTreeMap<String, u64>,
            incidents: Vec<String>,
        }
        let mut by: std::collections::BTreeMap<&'static str, PerCause> = Default::default();
        for e in self.incidents.values() {
            let Some(s) = &e.incident.shadow else {
                continue;
            };
            let c = by.entry(s.cause.as_str()).or_default();
            c.would_have_acted += 1;
            c.would_have_auto_approved += u64::from(s.auto_approved);
            *c.remedies.entry(s.remedy.clone()).or_default() += 1;
            match (e.incident.state, e.incident.close_reason) {
                (IncidentState::Closed, Some(CloseReason::ResolvedWithoutAction)) => {
                    c.healed_without_mapek += 1
                }
                (IncidentState::Closed, _) => c.not_healed += 1,
                _ => c.still_active += 1,
            }
            if c.incidents.len() < 20 {
                c.incidents.push(e.incident.id.clone());
            }
        }
        serde_json::json!({
            "mode": self.mode.as_str(),
            "causes": by,
        })
    }
}

impl Handler<crate::messages::Pause> for Planner {
    type Result = OperatorReply;

    fn handle(&mut self, msg: crate::messages::Pause, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        let r = inbox.guard(self, ctx, "Pause", |act, _| {
            let p = act.guards.set_pause(PauseState {
                by: msg.by.clone(),
                reason: msg.reason.clone(),
                at: act.clock.now(),
            });
            tracing::warn!(by = %p.by, reason = p.reason.as_deref().unwrap_or(""), "mapek paused: nothing is executed until resumed");
            act.inbox.emit(LoopEvent::Paused {
                paused: true,
                by: p.by.clone(),
                reason: p.reason.clone(),
            });
            Ok(serde_json::json!({"paused": true, "by": p.by, "reason": p.reason, "at": p.at}))
        });
        self.durable_reply(r, "pausing")
    }
}

impl Handler<crate::messages::Resume> for Planner {
    type Result = OperatorReply;

    fn handle(&mut self, msg: crate::messages::Resume, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        let r = inbox.guard(self, ctx, "Resume", |act, ctx| {
            let was = act.guards.resume();
            tracing::warn!(by = %msg.by, reason = msg.reason.as_deref().unwrap_or(""), was_paused = was.is_some(), "mapek resumed");
            act.inbox.emit(LoopEvent::Paused {
                paused: false,
                by: msg.by.clone(),
                reason: msg.reason.clone(),
            });
            // Time paused does not count towards the queue timeout; the
            // incidents still active are remedied (level-triggered).
            act.admission.restart_waits(Instant::now());
            act.admit(ctx);
            Ok(serde_json::json!({
                "paused": false,
                "by": msg.by,
                "reason": msg.reason,
                "at": act.clock.now(),
                "was": was,
            }))
        });
        self.durable_reply(r, "resuming")
    }
}

impl Handler<crate::messages::ClearComponent> for Planner {
    type Result = OperatorReply;

    fn handle(
        &mut self,
        msg: crate::messages::ClearComponent,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        let inbox = self.inbox.clone();
        let r = inbox.guard(self, ctx, "ClearComponent", |act, ctx| {
            let mut cleared: Vec<&'static str> = act.guards.clear(&msg.component);
            // Sticky escalations of its incidents (queue timeout, budget)
            // end too: they are planned again.
            let ids = act.open_on(&msg.component);
            for id in &ids {
                if let Some(e) = act.incidents.get_mut(id) {
                    if e.sticky.take().is_some() && !cleared.contains(&"escalation") {
                        cleared.push("escalation");
                    }
                    e.rejected = false;
                }
            }
            tracing::warn!(component = %msg.component, by = %msg.by, reason = msg.reason.as_deref().unwrap_or(""), ?cleared, "component cleared by an operator");
            for id in &ids {
                act.hand_off(id, None);
                act.guard_decision(id, None, "clear", "cleared", &format!("component `{}` cleared by {}", msg.component, msg.by));
                act.reconcile(ctx, id);
            }
            act.admit(ctx);
            Ok(serde_json::json!({
                "component": msg.component,
                "cleared": cleared,
                "by": msg.by,
                "reason": msg.reason,
                "incidents": ids,
            }))
        });
        self.durable_reply(r, "clearing")
    }
}

impl Handler<crate::messages::SilenceComponent> for Planner {
    type Result = OperatorReply;

    fn handle(
        &mut self,
        msg: crate::messages::SilenceComponent,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        let inbox = self.inbox.clone();
        let r = inbox.guard(self, ctx, "SilenceComponent", |act, ctx| {
            let now = act.clock.now();
            let until = now
                + chrono::Duration::seconds(i64::try_from(msg.seconds).unwrap_or(i64::MAX / 4));
            act.guards.silence(
                &msg.component,
                Silence {
                    until,
                    reason: msg.reason.clone(),
                    by: msg.by.clone(),
                    at: now,
                },
            );
            tracing::warn!(component = %msg.component, by = %msg.by, reason = %msg.reason, until = %until, "component silenced: observed, not acted on");
            let ids = act.open_on(&msg.component);
            for id in &ids {
                act.reconcile(ctx, id);
            }
            Ok(serde_json::json!({
                "component": msg.component,
                "until": until,
                "reason": msg.reason,
                "by": msg.by,
                "incidents": ids,
            }))
        });
        self.durable_reply(r, "silencing")
    }
}

impl Handler<crate::messages::GetSafety> for Planner {
    type Result = MessageResult<crate::messages::GetSafety>;

    fn handle(
        &mut self,
        _msg: crate::messages::GetSafety,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        let inbox = self.inbox.clone();
        MessageResult(
            inbox
                .guard(self, ctx, "GetSafety", |act, _| Ok(act.safety_view()))
                .unwrap_or_default(),
        )
    }
}

impl Handler<crate::messages::GetShadowReport> for Planner {
    type Result = MessageResult<crate::messages::GetShadowReport>;

    fn handle(
        &mut self,
        _msg: crate::messages::GetShadowReport,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        let inbox = self.inbox.clone();
        MessageResult(
            inbox
                .guard(self, ctx, "GetShadowReport", |act, _| {
                    Ok(act.shadow_report())
                })
                .unwrap_or_default(),
        )
    }
}
