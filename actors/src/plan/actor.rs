//! The Planner actor: the reconciler of incidents. It keeps one state
//! machine per incident (open, pending, queued, acting, verifying,
//! cooling_down, escalated, no_evidence, closed), plans for an incident
//! from its latest diagnosis ([`crate::plan`]), passes every approved
//! policy through the one [`Admission`] queue, and hands admitted policies
//! to the Executor. Incidents are kept in Knowledge and restored at start.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;

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
use crate::plan::{auto_approvable, decide, plan, PlanDecision};
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
}

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
            // A restart interrupts what was running: the incident is
            // planned again from fresh evidence. A remedy that was acting or
            // verifying may have taken effect: its components rest for a
            // cooldown first, so the remedy is not repeated at once.
            if matches!(inc.state, IncidentState::Acting | IncidentState::Verifying) {
                let rest = chrono::Duration::seconds(
                    i64::try_from(settings.cooldown_seconds).unwrap_or(i64::MAX / 2),
                );
                inc.hold_until = Some(clock.now() + rest);
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
                    rejected: false,
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
        let p = Planner {
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
        };
        p.refresh_gauges();
        p
    }

    fn refresh_gauges(&self) {
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
                e.incident.state = state;
                e.incident.reason = reason;
                e.incident.updated_at = now;
                self.persist(id);
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
            },
            analysis: None,
            chain: chain.clone(),
            pending: None,
            running: None,
            no_evidence: false,
            cooldown_until: None,
            state_timer: None,
            rejected: false,
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
            entry.rejected = false;
        }
        let id = r.id;
        if rediagnosed {
            self.drop_pending(ctx, &id, "the incident was diagnosed again");
        }
        self.persist(&id);
        self.reconcile(ctx, &id);
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
            return self.set_state(
                id,
                IncidentState::Escalated,
                Some("its remedy was rejected: a person must act".into()),
            );
        }
        if !self.state.lock().is_running {
            return; // shutting down: no new remedies
        }
        let Some(analysis) = e.analysis.clone() else {
            return self.set_state(id, IncidentState::Open, None);
        };
        let chain = e.chain.clone();
        let severity = e.incident.severity.unwrap_or(Severity::Warning);
        if e.incident
            .components
            .iter()
            .all(|c| NO_COMPONENT.contains(&c.as_str()))
        {
            return self.escalate(
                id,
                "its violations name no component: a person must diagnose".into(),
            );
        }
        let started = Instant::now();
        let policies = match plan(&analysis, &self.learned, &self.settings, now) {
            PlanDecision::BelowThreshold { .. } => {
                return self.set_state(id, IncidentState::Open, None)
            }
            PlanDecision::Escalate { reason } => return self.escalate(id, reason),
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
                format!("no effector route covers component `{target}`: a person must act"),
            );
        }
        self.inbox
            .metrics()
            .policies_generated
            .inc_by(covered.len() as u64);
        let mut chain = chain;
        // A re-plan is a new attempt: its deadline counts from now, not
        // from the diagnosis it was planned from.
        chain.started = Instant::now();
        chain.timings.planning_seconds = started.elapsed().as_secs_f64();
        self.inbox
            .metrics()
            .phase("planning", chain.timings.planning_seconds);
        self.state
            .update(now, |s| s.policies_generated = covered.len());
        let chosen = covered
            .iter()
            .position(|p| auto_approvable(p, &self.settings));
        let mut p = match chosen {
            Some(i) => covered[i].clone(),
            None => covered[0].clone(),
        };
        self.announce(&p);
        if let Some(e) = self.incidents.get_mut(id) {
            e.incident.policies.push(p.id.clone());
        }
        if chosen.is_some() {
            if let Err(err) = decide(
                &mut p,
                ApprovalStatus::Approved,
                "auto",
                Some("auto-approved by risk level".into()),
                now,
            ) {
                tracing::error!(error = %err, "auto-approval failed");
                return;
            }
            self.record(ctx, p.clone());
            self.enqueue(ctx, p, chain, severity);
        } else {
            tracing::info!(incident = %id, policy = %p.id, cause = %p.root_cause, risk = ?p.risk_level, "policy waits for approval");
            self.record(ctx, p.clone());
            if let Some(e) = self.incidents.get_mut(id) {
                e.pending = Some(p.id.clone());
            }
            self.pending.insert(p.id.clone(), (p, chain));
            self.set_state(id, IncidentState::Pending, None);
        }
    }

    fn escalate(&mut self, id: &str, reason: String) {
        let already = self
            .incidents
            .get(id)
            .is_some_and(|e| e.incident.reason.as_deref() == Some(reason.as_str()));
        if !already {
            tracing::warn!(incident = %id, %reason, "escalating to a human; acting on nothing");
            let chain_id = self
                .incidents
                .get(id)
                .map(|e| e.chain.chain_id.clone())
                .unwrap_or_default();
            self.inbox.emit(LoopEvent::Escalated {
                chain_id,
                reason: reason.clone(),
            });
        }
        self.set_state(id, IncidentState::Escalated, Some(reason));
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

    /// Hands every policy the admission queue admits now to the Executor.
    fn admit(&mut self, ctx: &mut Context<Self>) {
        if !self.state.lock().is_running {
            return; // shutting down: nothing new starts
        }
        let admitted = self.admission.admit(Instant::now());
        for mut q in admitted {
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
        // Policies still waiting behind a cooldown or a hold: try again
        // when the earliest of those ends (nothing else may happen).
        if let Some(at) = self.admission.next_wakeup() {
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

    fn started(&mut self, _ctx: &mut Context<Self>) {
        self.inbox.started();
    }
}

impl Supervised for Planner {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
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
            let cooldown = Duration::from_secs(act.settings.cooldown_seconds);
            act.admission
                .finished(&msg.policy, Instant::now(), cooldown);
            let origin = msg.policy.incident_id.clone().unwrap_or_default();
            let now = act.clock.now();
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
