//! The Knowledge actor: the only writer of the sled store. It keeps the
//! audit trail (analyses, policies, executions, outcomes), learns from each
//! verified outcome and tells the Planner what it learned.
//!
//! No handler waits for an fsync: writes are queued to the journal writer
//! thread ([`crate::journal`]) in message order, and their
//! acknowledgements are awaited as futures of the actor (a failed write is
//! a fault, as before).

use std::future::Future;
use std::sync::{Arc, OnceLock};

use actix::prelude::*;

use crate::clock::SharedClock;
use crate::knowledge::{generate_insights, outcome_of};
use crate::mailbox::{Fault, Inbox, PhasePort};
use crate::messages::{
    ExecutionFinished, FlushKnowledge, KnowledgeUpdated, RecordAnalysis, RecordExecution,
    RecordPolicy,
};
use crate::model::LearnedStats;
use crate::settings::KnowledgeSettings;
use crate::state::SharedState;
use crate::store::{KnowledgeStore, StoreError};

/// The Knowledge actor.
pub struct Knowledge {
    inbox: Inbox,
    settings: KnowledgeSettings,
    store: KnowledgeStore,
    planner: Arc<OnceLock<PhasePort<KnowledgeUpdated>>>,
    clock: SharedClock,
    state: SharedState,
    supervisor: PhasePort<crate::messages::ActorRestarted>,
    outcomes_since_insights: u32,
    writes_since_prune: usize,
}

impl Knowledge {
    /// A Knowledge actor over an open store.
    pub fn new(
        inbox: Inbox,
        settings: KnowledgeSettings,
        store: KnowledgeStore,
        planner: Arc<OnceLock<PhasePort<KnowledgeUpdated>>>,
        clock: SharedClock,
        state: SharedState,
        supervisor: PhasePort<crate::messages::ActorRestarted>,
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

    /// Awaits a write's acknowledgement off the actor's thread; a failure
    /// is handled by [`check`](Self::check).
    fn await_write(
        &self,
        ctx: &mut Context<Self>,
        what: &'static str,
        write: impl Future<Output = Result<(), StoreError>> + 'static,
    ) {
        ctx.spawn(write.into_actor(self).map(move |r, act, ctx| {
            let inbox = act.inbox.clone();
            inbox.guard_internal(act, ctx, what, |act, _| act.check(what, r));
        }));
    }

    /// Learns from a durable outcome: insights now and then, and the
    /// Planner is told.
    fn outcome_recorded(
        &mut self,
        ctx: &mut Context<Self>,
        execution: &str,
        outcome: &'static str,
        stats: LearnedStats,
    ) {
        tracing::info!(execution, outcome, "outcome recorded in knowledge");
        self.outcomes_since_insights += 1;
        if self.outcomes_since_insights >= self.settings.insights_every {
            self.outcomes_since_insights = 0;
            let insights = generate_insights(&stats, self.clock.now());
            let write = self.store.put_insights_async(&insights);
            self.await_write(ctx, "recording insights", write);
        }
        if let Some(p) = self.planner.get() {
            // Not level-triggered (sent once per outcome): delivered, never
            // shed.
            let p = p.clone();
            actix::spawn(async move {
                let _ = p.send(KnowledgeUpdated { stats }).await;
            });
        }
    }

    fn maybe_prune(&mut self) {
        self.writes_since_prune += 1;
        if self.writes_since_prune >= 1000 {
            self.writes_since_prune = 0;
            // Pruning waits for its deletes to be durable: off the actor's
            // thread, which never waits for an fsync.
            let (store, max) = (self.store.clone(), self.settings.max_records);
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.prune(max) {
                    tracing::warn!(error = %e, "pruning the audit trail failed");
                }
            });
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
        crate::mailbox::note_restart(&self.inbox, &self.supervisor);
    }
}

impl Handler<RecordAnalysis> for Knowledge {
    type Result = ();

    fn handle(&mut self, msg: RecordAnalysis, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "RecordAnalysis", |act, ctx| {
            let write = act.store.put_analysis_async(&msg.0);
            act.await_write(ctx, "recording an analysis", write);
            act.maybe_prune();
            Ok(())
        });
    }
}

const POLICY_FAILED: &str = "knowledge failed while recording the policy";

impl Handler<RecordPolicy> for Knowledge {
    type Result = ResponseActFuture<Self, Result<(), String>>;

    fn handle(&mut self, msg: RecordPolicy, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        // Policies and their approvals are critical: the reply waits until
        // the policy is durable (without blocking this thread).
        let write = inbox.guard(self, ctx, "RecordPolicy", |act, _| {
            let write = act.store.put_policy_async(&msg.0);
            act.maybe_prune();
            Ok(write)
        });
        let Some(write) = write else {
            return Box::pin(actix::fut::ready(Err(POLICY_FAILED.to_string())));
        };
        Box::pin(write.into_actor(self).map(|r, act, ctx| {
            let inbox = act.inbox.clone();
            inbox
                .guard_internal(act, ctx, "RecordPolicy", |act, _| {
                    act.check("recording a policy", r)
                })
                .ok_or_else(|| POLICY_FAILED.to_string())
        }))
    }
}

impl Handler<RecordExecution> for Knowledge {
    type Result = ();

    fn handle(&mut self, msg: RecordExecution, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "RecordExecution", |act, ctx| {
            let write = act.store.put_execution_async(&msg.0);
            act.await_write(ctx, "recording an execution", write);
            Ok(())
        });
    }
}

impl Handler<ExecutionFinished> for Knowledge {
    /// Replies once the execution and its outcome are durable, so a sender
    /// awaiting the reply knows the outcome is recorded.
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: ExecutionFinished, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        let writes = inbox.guard(self, ctx, "ExecutionFinished", |act, _| {
            let exec = &msg.execution;
            // Queued in this order: the journal holds the execution before
            // its outcome.
            let execution = act.store.put_execution_async(exec);
            // An interrupted execution (stopped by a crash or a lost
            // leadership, or only verifying a previous leader's action) is
            // recorded, but teaches the learner nothing.
            let outcome = (exec.outcome.is_some() && !exec.interrupted).then(|| {
                let actions = msg.policy.actions.iter().map(|a| a.action_type).collect();
                let outcome = outcome_of(exec, actions, act.clock.now());
                let kind = outcome.outcome_type.as_str();
                let recorded = act
                    .store
                    .record_outcome_async(&outcome, act.settings.confidence_saturation);
                (kind, recorded)
            });
            Ok((exec.id.clone(), exec.chain_id.clone(), execution, outcome))
        });
        let Some((id, chain, execution, outcome)) = writes else {
            return Box::pin(actix::fut::ready(()));
        };
        let durable = async move {
            let execution = execution.await;
            let outcome = match outcome {
                Some((kind, recorded)) => Some((kind, recorded.await)),
                None => None,
            };
            (execution, outcome)
        };
        Box::pin(
            durable
                .into_actor(self)
                .map(move |(execution, outcome), act, ctx| {
                    let _span = tracing::info_span!("chain", chain = %chain).entered();
                    let inbox = act.inbox.clone();
                    inbox.guard_internal(act, ctx, "ExecutionFinished", |act, ctx| {
                        act.check("recording an execution", execution)?;
                        match outcome {
                            Some((kind, Ok(stats))) => act.outcome_recorded(ctx, &id, kind, stats),
                            Some((_, Err(e))) => act.check("recording an outcome", Err(e))?,
                            None => {}
                        }
                        Ok(())
                    });
                }),
        )
    }
}

impl Handler<FlushKnowledge> for Knowledge {
    type Result = ResponseFuture<Result<usize, String>>;

    fn handle(&mut self, _msg: FlushKnowledge, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        let store = inbox.guard(self, ctx, "FlushKnowledge", |act, _| Ok(act.store.clone()));
        Box::pin(async move {
            match store {
                Some(store) => store.flush_async().await.map_err(|e| e.to_string()),
                None => Err("knowledge failed while flushing".into()),
            }
        })
    }
}

impl Handler<crate::messages::ReclassifyOutcome> for Knowledge {
    type Result = ();

    fn handle(&mut self, msg: crate::messages::ReclassifyOutcome, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "ReclassifyOutcome", |act, ctx| {
            let write = act
                .store
                .reclassify_outcome_async(&msg.execution_id, msg.to);
            let id = msg.execution_id.clone();
            ctx.spawn(write.into_actor(act).map(move |r, act, ctx| {
                let inbox = act.inbox.clone();
                inbox.guard_internal(act, ctx, "ReclassifyOutcome", |act, _| match r {
                    Ok(stats) => {
                        tracing::info!(execution = %id, to = msg.to.as_str(), "outcome re-classified");
                        if let Some(p) = act.planner.get() {
                            let p = p.clone();
                            actix::spawn(async move {
                                let _ = p.send(KnowledgeUpdated { stats }).await;
                            });
                        }
                        Ok(())
                    }
                    Err(e) => act.check("re-classifying an outcome", Err(e)),
                });
            }));
            Ok(())
        });
    }
}
