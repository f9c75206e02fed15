//! The Planner actor: a thin shell over [`crate::plan`]. It plans from each
//! analysis, records every policy in Knowledge, auto-approves what the
//! approval settings allow, hands approved policies to the Executor, and
//! holds back a cause while a remedy for it is running or cooling down.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;

use crate::clock::SharedClock;
use crate::events::LoopEvent;
use crate::executor::Executor;
use crate::knowledge_actor::Knowledge;
use crate::mailbox::{Inbox, PhaseAddr};
use crate::messages::{
    AnalysisReady, ChainTrace, DecidePolicy, DecisionError, ExecutionFinished, KnowledgeUpdated,
    PolicyApproved, RecordPolicy,
};
use crate::model::{ApprovalStatus, LearnedStats, RemediationPolicy};
use crate::plan::{auto_approvable, decide, plan, PlanDecision};
use crate::settings::PlanSettings;
use crate::state::SharedState;
use crate::store::KnowledgeStore;
use crate::supervisor::LoopSupervisor;

/// The Planner actor.
pub struct Planner {
    inbox: Inbox,
    settings: PlanSettings,
    learned: LearnedStats,
    pending: HashMap<String, (RemediationPolicy, ChainTrace)>,
    /// Component → (policy running on it, lease end). The lease ends a
    /// hold whose execution never reported back (an Executor crash).
    in_flight: HashMap<String, (String, Instant)>,
    cooldown_until: HashMap<String, Instant>,
    lease: Duration,
    last_escalation: Option<String>,
    executor: PhaseAddr<Executor>,
    knowledge: PhaseAddr<Knowledge>,
    store: KnowledgeStore,
    clock: SharedClock,
    state: SharedState,
    supervisor: PhaseAddr<LoopSupervisor>,
}

impl Planner {
    /// A Planner; pending policies and learned statistics are loaded from
    /// the store so approvals survive a restart of the daemon.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inbox: Inbox,
        settings: PlanSettings,
        executor: PhaseAddr<Executor>,
        knowledge: PhaseAddr<Knowledge>,
        store: KnowledgeStore,
        clock: SharedClock,
        state: SharedState,
        supervisor: PhaseAddr<LoopSupervisor>,
        lease: Duration,
    ) -> Self {
        let learned = store.stats().unwrap_or_default();
        let pending = store
            .list_policies(Some(ApprovalStatus::Pending), 1000)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let mut chain = ChainTrace::start(clock.now());
                chain.chain_id = p.chain_id.clone();
                (p.id.clone(), (p, chain))
            })
            .collect();
        Planner {
            inbox,
            settings,
            learned,
            pending,
            in_flight: HashMap::new(),
            cooldown_until: HashMap::new(),
            lease,
            last_escalation: None,
            executor,
            knowledge,
            store,
            clock,
            state,
            supervisor,
        }
    }

    /// A policy is held back while a remedy runs or cools down on one of
    /// its components (one remedy at a time per component, so verification
    /// measures one remedy), or while a policy for the same cause waits for
    /// a person.
    fn busy(&mut self, p: &RemediationPolicy) -> Option<String> {
        let now = Instant::now();
        self.in_flight.retain(|component, (policy, lease)| {
            let live = now < *lease;
            if !live {
                tracing::warn!(%component, %policy, "execution never reported back; releasing the component");
            }
            live
        });
        self.cooldown_until.retain(|_, until| now < *until);
        scope_of(p).into_iter().find_map(|c| {
            if let Some((id, _)) = self.in_flight.get(&c) {
                Some(format!("a remedy ({id}) is running on component `{c}`"))
            } else {
                self.cooldown_until.get(&c).map(|until| {
                    format!(
                        "component `{c}` is cooling down for {} s after its last remedy",
                        until.saturating_duration_since(now).as_secs()
                    )
                })
            }
        })
    }

    /// Whether a policy for this cause already waits for a person.
    fn pending_for(&self, p: &RemediationPolicy) -> bool {
        self.pending
            .values()
            .any(|(q, _)| q.root_cause == p.root_cause)
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

    fn dispatch(&mut self, ctx: &mut Context<Self>, policy: RemediationPolicy, chain: ChainTrace) {
        let lease = Instant::now() + self.lease;
        for c in scope_of(&policy) {
            self.in_flight.insert(c, (policy.id.clone(), lease));
        }
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
        tracing::info!(chain = %chain.chain_id, policy = %policy.id, cause = %policy.root_cause,
            actions = ?policy.actions.iter().map(|a| a.action_type.as_str()).collect::<Vec<_>>(), "approved; handing to the executor");
        // Approved policies must not be lost: wait for room in the
        // Executor's mailbox (backpressure) rather than shed.
        ctx.spawn(
            async move {
                if let Err(e) = executor.send(PolicyApproved { chain, policy }).await {
                    tracing::error!(error = %e, "approved policy could not reach the executor");
                }
            }
            .into_actor(self),
        );
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
        crate::monitor::note_restart(&self.inbox, &self.supervisor);
    }
}

impl Handler<AnalysisReady> for Planner {
    type Result = ();

    fn handle(&mut self, msg: AnalysisReady, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "AnalysisReady", |act, ctx| {
            let started = Instant::now();
            let now = act.clock.now();
            let mut chain = msg.chain;
            let _span = tracing::info_span!("chain", chain = %chain.chain_id).entered();
            if !act.state.lock().is_running {
                return Ok(()); // shutting down: no new remedies
            }
            let decision = plan(&msg.analysis, &act.learned, &act.settings, now);
            let policies = match decision {
                PlanDecision::BelowThreshold { violations, threshold } => {
                    tracing::debug!(chain = %chain.chain_id, violations, threshold, "below plan threshold");
                    act.state.update(now, |s| s.policies_generated = 0);
                    return Ok(());
                }
                PlanDecision::Escalate { reason } => {
                    if act.last_escalation.as_deref() != Some(reason.as_str()) {
                        tracing::warn!(chain = %chain.chain_id, %reason, "escalating to a human; acting on nothing");
                        act.inbox.emit(LoopEvent::Escalated { chain_id: chain.chain_id.clone(), reason: reason.clone() });
                        act.last_escalation = Some(reason);
                    }
                    act.state.update(now, |s| s.policies_generated = 0);
                    return Ok(());
                }
                PlanDecision::Policies(ps) => ps,
            };
            act.last_escalation = None;
            let fresh: Vec<RemediationPolicy> =
                policies.into_iter().filter(|p| act.busy(p).is_none()).collect();
            act.state.update(now, |s| s.policies_generated = fresh.len());
            if fresh.is_empty() {
                return Ok(());
            }
            act.inbox.metrics().policies_generated.inc_by(fresh.len() as u64);
            chain.timings.planning_seconds = started.elapsed().as_secs_f64();
            act.inbox.metrics().phase("planning", chain.timings.planning_seconds);
            // The best policy that may be auto-approved runs; the others
            // wait for a person (or are superseded by the next analysis).
            let mut chosen = None;
            for (i, p) in fresh.iter().enumerate() {
                if chosen.is_none() && auto_approvable(p, &act.settings) {
                    chosen = Some(i);
                }
            }
            let mut dispatched = false;
            for (i, mut p) in fresh.into_iter().enumerate() {
                if Some(i) == chosen {
                    act.announce(&p);
                    if let Err(e) = decide(&mut p, ApprovalStatus::Approved, "auto", Some("auto-approved by risk level".into()), now) {
                        tracing::error!(error = %e, "auto-approval failed");
                        continue;
                    }
                    act.record(ctx, p.clone());
                    dispatched = true;
                    act.dispatch(ctx, p, chain.clone());
                } else if !dispatched && !act.pending_for(&p) {
                    tracing::info!(chain = %chain.chain_id, policy = %p.id, cause = %p.root_cause, risk = ?p.risk_level, "policy waits for approval");
                    act.announce(&p);
                    act.record(ctx, p.clone());
                    act.pending.insert(p.id.clone(), (p, chain.clone()));
                }
            }
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
                if msg.decision == ApprovalStatus::Approved {
                    // An approval does not bypass the holds: one remedy at a
                    // time per component.
                    if let Some(why) = act.busy(&policy) {
                        act.pending.insert(msg.id.clone(), (policy, chain));
                        return Ok(Err(DecisionError::Busy(format!(
                            "{why}; the policy stays pending, approve it again later"
                        ))));
                    }
                }
                if let Err(e) = decide(&mut policy, msg.decision, &msg.by, msg.reason.clone(), now)
                {
                    act.pending.insert(msg.id.clone(), (policy, chain));
                    return Ok(Err(DecisionError::Invalid(e.to_string())));
                }
                act.record(ctx, policy.clone());
                if policy.approval_status == ApprovalStatus::Approved {
                    // The chain's clock restarts at approval: time spent
                    // waiting for a person is not the loop's cycle time.
                    chain.started = Instant::now();
                    act.dispatch(ctx, policy.clone(), chain);
                } else {
                    tracing::info!(policy = %policy.id, by = %msg.by, "policy rejected");
                    act.inbox.emit(LoopEvent::Rejected {
                        policy_id: policy.id.clone(),
                        by: msg.by.clone(),
                    });
                }
                Ok(Ok(policy))
            })
            .unwrap_or_else(|| {
                Err(DecisionError::Unavailable(
                    "planner failed while deciding".into(),
                ))
            })
    }
}

impl Handler<ExecutionFinished> for Planner {
    type Result = ();

    fn handle(&mut self, msg: ExecutionFinished, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "ExecutionFinished", |act, _| {
            let until = Instant::now() + Duration::from_secs(act.settings.cooldown_seconds);
            for c in scope_of(&msg.policy) {
                if act
                    .in_flight
                    .get(&c)
                    .is_some_and(|(id, _)| *id == msg.policy.id)
                {
                    act.in_flight.remove(&c);
                }
                act.cooldown_until.insert(c, until);
            }
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

/// Components a policy acts on (its scope, or its actions' targets).
fn scope_of(p: &RemediationPolicy) -> Vec<String> {
    if p.scope.is_empty() {
        let mut t: Vec<String> = p.actions.iter().map(|a| a.target.clone()).collect();
        t.sort();
        t.dedup();
        t
    } else {
        p.scope.clone()
    }
}
