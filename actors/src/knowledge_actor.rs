//! The Knowledge actor: the only writer of the sled store. It keeps the
//! audit trail (analyses, policies, executions, outcomes), learns from each
//! verified outcome and tells the Planner what it learned.

use std::sync::{Arc, OnceLock};

use actix::prelude::*;

use crate::clock::SharedClock;
use crate::knowledge::{generate_insights, outcome_of};
use crate::mailbox::{Fault, Inbox, PhaseAddr};
use crate::messages::{
    ExecutionFinished, FlushKnowledge, KnowledgeUpdated, RecordAnalysis, RecordExecution,
    RecordPolicy,
};
use crate::planner::Planner;
use crate::settings::KnowledgeSettings;
use crate::state::SharedState;
use crate::store::{KnowledgeStore, StoreError};
use crate::supervisor::LoopSupervisor;

/// The Knowledge actor.
pub struct Knowledge {
    inbox: Inbox,
    settings: KnowledgeSettings,
    store: KnowledgeStore,
    planner: Arc<OnceLock<PhaseAddr<Planner>>>,
    clock: SharedClock,
    state: SharedState,
    supervisor: PhaseAddr<LoopSupervisor>,
    outcomes_since_insights: u32,
    writes_since_prune: usize,
}

impl Knowledge {
    /// A Knowledge actor over an open store.
    pub fn new(
        inbox: Inbox,
        settings: KnowledgeSettings,
        store: KnowledgeStore,
        planner: Arc<OnceLock<PhaseAddr<Planner>>>,
        clock: SharedClock,
        state: SharedState,
        supervisor: PhaseAddr<LoopSupervisor>,
    ) -> Self {
        Knowledge {
            inbox,
            settings,
            store,
            planner,
            clock,
            state,
            supervisor,
            outcomes_since_insights: 0,
            writes_since_prune: 0,
        }
    }

    /// Store errors: a closed store (shutdown) is logged; anything else is
    /// a fault and restarts the actor (repeated faults stop the daemon).
    fn check(&self, what: &str, r: Result<(), StoreError>) -> Result<(), Fault> {
        match r {
            Ok(()) => Ok(()),
            Err(StoreError::Closed { .. }) => {
                tracing::warn!(what, "knowledge store is closed; record dropped");
                Ok(())
            }
            Err(e) => {
                let now = self.clock.now();
                self.state
                    .update(now, |s| s.error = Some(format!("knowledge store: {e}")));
                Err(Fault(format!("{what}: {e}")))
            }
        }
    }

    fn maybe_prune(&mut self) {
        self.writes_since_prune += 1;
        if self.writes_since_prune >= 1000 {
            self.writes_since_prune = 0;
            if let Err(e) = self.store.prune(self.settings.max_records) {
                tracing::warn!(error = %e, "pruning the audit trail failed");
            }
        }
    }
}

impl Actor for Knowledge {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        self.inbox.started();
    }
}

impl Supervised for Knowledge {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        crate::monitor::note_restart(&self.inbox, &self.supervisor);
    }
}

impl Handler<RecordAnalysis> for Knowledge {
    type Result = ();

    fn handle(&mut self, msg: RecordAnalysis, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "RecordAnalysis", |act, _| {
            let r = act.store.put_analysis(&msg.0);
            act.maybe_prune();
            act.check("recording an analysis", r)
        });
    }
}

impl Handler<RecordPolicy> for Knowledge {
    type Result = Result<(), String>;

    fn handle(&mut self, msg: RecordPolicy, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox
            .guard(self, ctx, "RecordPolicy", |act, _| {
                // Policies and their approvals are critical: `put_policy`
                // flushes them before it returns.
                let r = act.store.put_policy(&msg.0);
                act.maybe_prune();
                act.check("recording a policy", r)
            })
            .ok_or_else(|| "knowledge failed while recording the policy".to_string())
    }
}

impl Handler<RecordExecution> for Knowledge {
    type Result = ();

    fn handle(&mut self, msg: RecordExecution, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "RecordExecution", |act, _| {
            // `put_execution` flushes before it returns.
            let r = act.store.put_execution(&msg.0);
            act.check("recording an execution", r)
        });
    }
}

impl Handler<ExecutionFinished> for Knowledge {
    type Result = ();

    fn handle(&mut self, msg: ExecutionFinished, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "ExecutionFinished", |act, _| {
            let exec = &msg.execution;
            let _span = tracing::info_span!("chain", chain = %exec.chain_id).entered();
            let r = act.store.put_execution(exec);
            act.check("recording an execution", r)?;
            if exec.outcome.is_some() {
                let actions = msg.policy.actions.iter().map(|a| a.action_type).collect();
                let outcome = outcome_of(exec, actions, act.clock.now());
                match act
                    .store
                    .record_outcome(&outcome, act.settings.confidence_saturation)
                {
                    Ok(stats) => {
                        tracing::info!(
                            execution = %exec.id,
                            outcome = outcome.outcome_type.as_str(),
                            "outcome recorded in knowledge"
                        );
                        act.outcomes_since_insights += 1;
                        if act.outcomes_since_insights >= act.settings.insights_every {
                            act.outcomes_since_insights = 0;
                            let insights = generate_insights(&stats, act.clock.now());
                            let r = act.store.put_insights(&insights);
                            act.check("recording insights", r)?;
                        }
                        if let Some(p) = act.planner.get() {
                            // Not level-triggered (sent once per outcome):
                            // delivered, never shed.
                            let p = p.clone();
                            actix::spawn(async move {
                                let _ = p.send(KnowledgeUpdated { stats }).await;
                            });
                        }
                    }
                    Err(e) => act.check("recording an outcome", Err(e))?,
                }
            }
            Ok(())
        });
    }
}

impl Handler<FlushKnowledge> for Knowledge {
    type Result = Result<usize, String>;

    fn handle(&mut self, _msg: FlushKnowledge, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox
            .guard(self, ctx, "FlushKnowledge", |act, _| {
                Ok(act.store.flush().map_err(|e| e.to_string()))
            })
            .unwrap_or_else(|| Err("knowledge failed while flushing".into()))
    }
}
