//! The Executor actor: runs the policies the Planner's admission queue
//! admits, concurrently (the queue bounds how many act at once and keeps
//! two remedies off one component), tells the Planner when a policy's
//! actions are over (its verification window is a timer that holds no
//! slot), then reports the verified execution to Knowledge and back to the
//! Planner.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::prelude::*;
use futures::FutureExt;
use tracing::Instrument;

use crate::events::LoopEvent;
use crate::execute::ExecutionEnv;
use crate::mailbox::{panic_message, Inbox, PhaseAddr, PhasePort};
use crate::messages::{ActionsDone, Drain, ExecutionFinished, PolicyApproved, RecordExecution};
use crate::metrics::StatusLabels;
use crate::model::{new_id, ExecutionStatus, PolicyExecution};
use crate::state::SharedState;

/// Where the Executor records executions (the Knowledge phase).
#[derive(Clone)]
pub struct KnowledgePorts {
    /// An execution in progress.
    pub execution: PhasePort<RecordExecution>,
    /// A verified execution and its outcome.
    pub finished: PhasePort<ExecutionFinished>,
}

/// Where the Executor reports to the Plan phase.
#[derive(Clone)]
pub struct PlannerPorts {
    /// A verified execution (releases the holds).
    pub finished: PhasePort<ExecutionFinished>,
    /// A policy's actions are over (frees its slot).
    pub actions_done: PhasePort<ActionsDone>,
}

/// The Executor actor.
pub struct Executor {
    inbox: Inbox,
    env: ExecutionEnv,
    max_cycle_time: Duration,
    knowledge: KnowledgePorts,
    planner: Arc<OnceLock<PlannerPorts>>,
    state: SharedState,
    supervisor: PhasePort<crate::messages::ActorRestarted>,
    judged: u64,
    succeeded: u64,
    running: tokio::sync::watch::Sender<usize>,
}

impl Executor {
    /// An Executor; `planner` is filled in once the Planner has started.
    pub fn new(
        inbox: Inbox,
        env: ExecutionEnv,
        max_cycle_time: Duration,
        knowledge: KnowledgePorts,
        planner: Arc<OnceLock<PlannerPorts>>,
        state: SharedState,
        supervisor: PhasePort<crate::messages::ActorRestarted>,
    ) -> Self {
        Executor {
            inbox,
            env,
            max_cycle_time,
            knowledge,
            planner,
            state,
            supervisor,
            judged: 0,
            succeeded: 0,
            running: tokio::sync::watch::channel(0).0,
        }
    }

    fn account(&mut self, exec: &PolicyExecution, total_seconds: f64) {
        let m = self.inbox.metrics();
        m.policies_executed.inc();
        m.policy_executions
            .get_or_create(&StatusLabels {
                status: exec.status.as_str(),
            })
            .inc();
        m.phase("execution", exec.timings.execution_seconds);
        m.cycle_duration.observe(total_seconds);
        if exec.timings.cut_off {
            m.chains_cut_off.inc();
        }
        if let Some(o) = exec.outcome {
            m.outcomes
                .get_or_create(&StatusLabels { status: o.as_str() })
                .inc();
            if o != crate::model::OutcomeType::Unknown {
                self.judged += 1;
                if o.is_success() {
                    self.succeeded += 1;
                }
                m.policy_success_rate
                    .set(self.succeeded as f64 / self.judged as f64);
            }
        }
        let now = self.env.clock.now();
        self.state.update(now, |s| s.policies_executed += 1);
    }
}

impl Actor for Executor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        self.inbox.started();
    }
}

impl Supervised for Executor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        crate::mailbox::note_restart(&self.inbox, &self.supervisor);
    }
}

impl Handler<PolicyApproved> for Executor {
    type Result = ();

    fn handle(&mut self, msg: PolicyApproved, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        let prepared = inbox.guard(self, ctx, "PolicyApproved", |act, _ctx| {
            let deadline = msg.chain.started + act.max_cycle_time;
            Ok((
                act.env.clone(),
                act.knowledge.clone(),
                act.planner.clone(),
                deadline,
            ))
        });
        let Some((env, knowledge, planner, deadline)) = prepared else {
            // The actor restarts; the admitted policy must not be lost:
            // it goes back into the mailbox and runs after the restart
            // (repeated failures trip the restart intensity).
            tracing::warn!(policy = %msg.policy.id, "executor failed before running the policy; it runs after the restart");
            PhaseAddr::new(ctx.address(), self.inbox.clone()).push(msg);
            return;
        };
        let PolicyApproved { mut chain, policy } = msg;
        let exec_id = new_id("exe");
        tracing::info!(chain = %chain.chain_id, policy = %policy.id, execution = %exec_id, "executing");
        self.running.send_modify(|n| *n += 1);
        let (acted_tx, acted_rx) = tokio::sync::oneshot::channel::<()>();
        {
            // The slot is free once the actions are over (or the run ended).
            let planner = planner.clone();
            let policy_id = policy.id.clone();
            tokio::spawn(async move {
                let _ = acted_rx.await;
                if let Some(p) = planner.get() {
                    let _ = p.actions_done.send(ActionsDone { policy_id }).await;
                }
            });
        }
        let span = tracing::info_span!("chain", chain = %chain.chain_id);
        let fut = async move {
            let mut started_record = crate::execute::in_progress(
                &policy,
                exec_id.clone(),
                chain.chain_id.clone(),
                env.clock.now(),
            );
            started_record.timings = chain.timings.clone();
            // The audit trail shows the execution while it runs. Not
            // awaited: the actions' intents (journaled first, in the run)
            // must not wait behind this record's group commit. A dry run
            // ends at once: its record is the finished one only (an
            // in-progress record arriving late must not replace it).
            if env.mode_of(&policy) == crate::settings::Mode::Act {
                match &env.store {
                    // Queued now, ahead of the intents and of each action's
                    // start (journal order = call order), not awaited.
                    Some(store) => {
                        let write = store.put_execution_async(&started_record);
                        let id = started_record.id.clone();
                        tokio::spawn(async move {
                            if let Err(e) = write.await {
                                tracing::error!(execution = %id, error = %e, "cannot record the execution's start");
                            }
                        });
                    }
                    None => {
                        let knowledge = knowledge.clone();
                        let record = RecordExecution(started_record.clone());
                        tokio::spawn(async move {
                            let _ = knowledge.execution.send(record).await;
                        });
                    }
                }
            }
            let run = AssertUnwindSafe(env.run_policy_with(
                &policy,
                exec_id,
                chain.chain_id.clone(),
                deadline,
                acted_tx,
            ))
            .catch_unwind()
            .await;
            let (mut exec, panicked) = match run {
                Ok(e) => (e, None),
                Err(p) => {
                    let why = panic_message(&p);
                    // The record as journaled so far lists the actions sent
                    // (with their requests): kept, the call under way
                    // UNKNOWN.
                    let mut e = env
                        .store
                        .as_ref()
                        .and_then(|s| s.get_execution(&started_record.id).ok().flatten())
                        .unwrap_or(started_record);
                    for a in e
                        .actions
                        .iter_mut()
                        .filter(|a| a.status == ExecutionStatus::InProgress)
                    {
                        a.status = ExecutionStatus::Unknown;
                        a.error = Some(format!("the executor panicked during this call: {why}"));
                    }
                    e.status = ExecutionStatus::Failed;
                    e.error = Some(format!("executor panicked: {why}"));
                    e.finished_at = Some(env.clock.now());
                    (e, Some(why))
                }
            };
            let mut timings = chain.timings.clone();
            timings.execution_seconds = exec.timings.execution_seconds;
            timings.cut_off = exec.timings.cut_off;
            timings.total_seconds = chain.elapsed_seconds();
            exec.timings = timings.clone();
            chain.timings = timings;
            tracing::info!(
                chain = %chain.chain_id, policy = %policy.id, execution = %exec.id,
                status = exec.status.as_str(),
                outcome = exec.outcome.map(|o| o.as_str()).unwrap_or("none"),
                before = ?exec.violations_before, after = ?exec.violations_after,
                total_seconds = exec.timings.total_seconds,
                "execution finished"
            );
            let finished = ExecutionFinished {
                chain,
                execution: exec.clone(),
                policy,
            };
            if let Err(e) = knowledge.finished.send(finished.clone()).await {
                tracing::error!(error = %e, "execution outcome could not reach knowledge");
            }
            if let Some(p) = planner.get() {
                if let Err(e) = p.finished.send(finished).await {
                    tracing::error!(error = %e, "execution outcome could not reach the planner");
                }
            }
            (exec, panicked)
        }
        .instrument(span);
        // Policies run concurrently: the admission queue decides how many.
        ctx.spawn(fut.into_actor(self).map(|(exec, panicked), act, ctx| {
            act.running.send_modify(|n| *n = n.saturating_sub(1));
            let total = exec.timings.total_seconds;
            act.inbox.emit(LoopEvent::Verified {
                chain_id: exec.chain_id.clone(),
                policy_id: exec.policy_id.clone(),
                cause: exec.root_cause,
                outcome: exec.outcome,
                before: exec.violations_before,
                after: exec.violations_after,
                total_seconds: total,
            });
            act.account(&exec, total);
            if let Some(why) = panicked {
                tracing::error!(actor = "executor", panic = %why, "execution panicked; restarting actor");
                act.inbox.mark_down();
                ctx.stop();
            }
        }));
    }
}

impl Handler<Drain> for Executor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Drain, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "Drain", |_, _| Ok(()));
        // Answered once every running execution has ended.
        let mut rx = self.running.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|n| *n == 0).await;
        })
    }
}
