//! The Analyzer actor: a thin shell over [`crate::analyze`]. It keeps the
//! sliding window of violations, runs the detectors on every snapshot and
//! hands the analysis to the Planner.

use std::collections::VecDeque;

use actix::prelude::*;

use crate::analyze::{analyze, ViolationWindow};
use crate::clock::SharedClock;
use crate::events::LoopEvent;
use crate::knowledge_actor::Knowledge;
use crate::mailbox::{Inbox, PhaseAddr};
use crate::messages::{AnalysisReady, GetAnalyses, RecordAnalysis, ViolationsDetected};
use crate::metrics::KindLabels;
use crate::model::AnalysisResult;
use crate::planner::Planner;
use crate::settings::AnalyzeSettings;
use crate::supervisor::LoopSupervisor;

/// The Analyzer actor.
pub struct Analyzer {
    inbox: Inbox,
    settings: AnalyzeSettings,
    window: ViolationWindow,
    history: VecDeque<AnalysisResult>,
    planner: PhaseAddr<Planner>,
    knowledge: PhaseAddr<Knowledge>,
    clock: SharedClock,
    supervisor: PhaseAddr<LoopSupervisor>,
}

impl Analyzer {
    /// An Analyzer feeding `planner` and recording into `knowledge`.
    pub fn new(
        inbox: Inbox,
        settings: AnalyzeSettings,
        planner: PhaseAddr<Planner>,
        knowledge: PhaseAddr<Knowledge>,
        clock: SharedClock,
        supervisor: PhaseAddr<LoopSupervisor>,
    ) -> Self {
        let window = ViolationWindow::new(
            settings.max_window_violations,
            chrono::Duration::seconds(settings.window_seconds as i64),
        );
        Analyzer {
            inbox,
            settings,
            window,
            history: VecDeque::new(),
            planner,
            knowledge,
            clock,
            supervisor,
        }
    }
}

impl Actor for Analyzer {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        self.inbox.started();
    }
}

impl Supervised for Analyzer {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        crate::monitor::note_restart(&self.inbox, &self.supervisor);
    }
}

impl Handler<ViolationsDetected> for Analyzer {
    type Result = ();

    fn handle(&mut self, msg: ViolationsDetected, ctx: &mut Context<Self>) {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "ViolationsDetected", |act, _ctx| {
            let started = tokio::time::Instant::now();
            let now = act.clock.now();
            let mut chain = msg.chain;
            let _span = tracing::info_span!("chain", chain = %chain.chain_id).entered();
            act.window.resolve(&msg.resolved);
            act.window.observe(&msg.violations);
            act.window.expire(now);
            if act.window.is_empty() {
                return Ok(());
            }
            let analysis = analyze(&act.window, &chain.chain_id, now, &act.settings);
            let m = act.inbox.metrics();
            m.analyses.inc();
            for p in &analysis.patterns {
                m.patterns_detected.get_or_create(&KindLabels { kind: p.kind.as_str() }).inc();
            }
            chain.timings.analysis_seconds = started.elapsed().as_secs_f64();
            m.phase("analysis", chain.timings.analysis_seconds);
            tracing::info!(
                chain = %chain.chain_id,
                violations = analysis.violation_count,
                patterns = analysis.patterns.len(),
                top_cause = analysis.root_causes.first().map(|c| c.cause.as_str()).unwrap_or("none"),
                confidence = analysis.confidence,
                "analysed"
            );
            act.inbox.emit(LoopEvent::Analysed {
                chain_id: chain.chain_id.clone(),
                cause: analysis.root_causes.first().map(|c| c.cause),
                confidence: analysis.root_causes.first().map(|c| c.confidence).unwrap_or(0.0),
                patterns: analysis.patterns.len(),
            });
            if act.history.len() >= act.settings.max_history {
                act.history.pop_front();
            }
            act.history.push_back(analysis.clone());
            // Both are level-triggered: the next snapshot supersedes them,
            // so they are shed (and counted) rather than queued unboundedly.
            let _ = act.knowledge.offer(RecordAnalysis(analysis.clone()));
            let _ = act.planner.offer(AnalysisReady { chain, analysis });
            Ok(())
        });
    }
}

impl Handler<GetAnalyses> for Analyzer {
    type Result = Vec<AnalysisResult>;

    fn handle(&mut self, msg: GetAnalyses, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox
            .guard(self, ctx, "GetAnalyses", |act, _| {
                Ok(act.history.iter().rev().take(msg.limit).cloned().collect())
            })
            .unwrap_or_default()
    }
}
