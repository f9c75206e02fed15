//! The Analyzer actor: a thin shell over [`crate::incident`]. It applies
//! the Monitor's changes to the incident index, diagnoses again only the
//! incidents a batch touched, records an analysis only when an incident's
//! diagnosis changed, and hands the reports to the Planner.

use std::collections::{HashSet, VecDeque};

use actix::prelude::*;

use crate::clock::SharedClock;
use crate::events::LoopEvent;
use crate::incident::IncidentIndex;
use crate::mailbox::{Inbox, PhasePort};
use crate::messages::{
    AnalysisReady, AnalyzerFailed, GetAnalyses, RecordAnalysis, ViolationsDetected,
};
use crate::metrics::KindLabels;
use crate::model::{AnalysisResult, IncidentState};
use crate::settings::AnalyzeSettings;
use crate::store::KnowledgeStore;

/// The Analyzer actor.
pub struct Analyzer {
    inbox: Inbox,
    settings: AnalyzeSettings,
    index: IncidentIndex,
    history: VecDeque<AnalysisResult>,
    planner: PhasePort<AnalysisReady>,
    knowledge: PhasePort<RecordAnalysis>,
    clock: SharedClock,
    supervisor: PhasePort<crate::messages::ActorRestarted>,
    dropped_reported: u64,
    /// A report did not reach the Planner: the next chance sends a full
    /// report of every incident.
    report_all: bool,
}

impl Analyzer {
    /// An Analyzer feeding `planner` and recording into `knowledge`; the
    /// open incidents in `store` are restored (their ids and members).
    pub fn new(
        inbox: Inbox,
        settings: AnalyzeSettings,
        planner: PhasePort<AnalysisReady>,
        knowledge: PhasePort<RecordAnalysis>,
        store: &KnowledgeStore,
        clock: SharedClock,
        supervisor: PhasePort<crate::messages::ActorRestarted>,
    ) -> Self {
        let mut index = IncidentIndex::new(&settings);
        let mut restored = 0usize;
        for inc in store.open_incidents().unwrap_or_default() {
            if inc.state != IncidentState::Closed {
                index.restore(&inc.id, &inc.fingerprints);
                restored += 1;
            }
        }
        if restored > 0 {
            tracing::info!(restored, "open incidents restored");
        }
        Analyzer {
            inbox,
            settings,
            index,
            history: VecDeque::new(),
            planner,
            knowledge,
            clock,
            supervisor,
            dropped_reported: 0,
            report_all: false,
        }
    }
}

impl Actor for Analyzer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.inbox.started();
        ctx.run_interval(REPORT_RETRY, |act, ctx| {
            if act.report_all {
                let inbox = act.inbox.clone();
                inbox.guard_internal(act, ctx, "ReportAll", |act, ctx| {
                    act.report_all = false;
                    let chain = crate::messages::ChainTrace::start(act.clock.now());
                    let reports = act.index.diagnose_all(act.clock.now(), &chain.chain_id);
                    act.deliver(ctx, chain, reports, true);
                    Ok(())
                });
            }
        });
    }
}

/// How soon a report that did not reach the Planner is sent again (as a
/// full report of every incident).
const REPORT_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl Analyzer {
    /// Hands reports to the Planner; they must arrive (they carry closures
    /// and evidence changes), so this waits for room rather than shed, and
    /// a failed delivery is repaired by a full report.
    fn deliver(
        &mut self,
        ctx: &mut Context<Self>,
        chain: crate::messages::ChainTrace,
        reports: Vec<crate::incident::IncidentReport>,
        full: bool,
    ) {
        if reports.is_empty() && !full {
            return;
        }
        let planner = self.planner.clone();
        let open_ids = full.then(|| self.index.open_ids());
        ctx.spawn(
            async move {
                planner
                    .send(AnalysisReady {
                        chain,
                        reports,
                        open_ids,
                    })
                    .await
            }
                .into_actor(self)
                .map(|res, act, _| {
                    if let Err(e) = res {
                        tracing::warn!(error = %e, "incident reports did not reach the planner; a full report follows");
                        act.report_all = true;
                    }
                }),
        );
    }
}

impl Supervised for Analyzer {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        crate::mailbox::note_restart(&self.inbox, &self.supervisor);
    }
}

impl Handler<ViolationsDetected> for Analyzer {
    type Result = Result<(), AnalyzerFailed>;

    fn handle(&mut self, msg: ViolationsDetected, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox.guard(self, ctx, "ViolationsDetected", |act, ctx| {
            let started = tokio::time::Instant::now();
            let now = act.clock.now();
            let mut chain = msg.chain;
            let _span = tracing::info_span!("chain", chain = %chain.chain_id).entered();
            for fp in &msg.resolved {
                act.index.remove(fp);
            }
            for (source, blind) in &msg.blind {
                act.index.set_blind(source, *blind);
            }
            if let Some(all) = &msg.resync {
                let keep: HashSet<&str> = all.iter().map(|v| v.fingerprint.as_str()).collect();
                let gone: Vec<String> = act
                    .index
                    .violations()
                    .filter(|v| !keep.contains(v.fingerprint.as_str()))
                    .map(|v| v.fingerprint.clone())
                    .collect();
                if !gone.is_empty() {
                    tracing::warn!(count = gone.len(), "reconcile: violations no longer active removed");
                }
                for fp in gone {
                    act.index.remove(&fp);
                }
                for v in all.iter() {
                    act.index.insert(v.clone());
                }
            }
            for v in msg.added {
                act.index.insert(v);
            }
            let dropped = act.index.dropped_total();
            if dropped > act.dropped_reported {
                act.inbox
                    .metrics()
                    .window_dropped
                    .inc_by(dropped - act.dropped_reported);
                act.dropped_reported = dropped;
            }
            let full = msg.resync.is_some() || act.report_all;
            if msg.resync.is_some() {
                // Restored memberships that have not come back by the first
                // full reconcile will not: their incidents close.
                let forgotten = act.index.forget_restored();
                if forgotten > 0 {
                    tracing::info!(forgotten, "restored violations that did not come back forgotten");
                }
            }
            let reports = if full {
                act.report_all = false;
                act.index.diagnose_all(now, &chain.chain_id)
            } else {
                act.index.diagnose_dirty(now, &chain.chain_id, true)
            };
            act.inbox
                .metrics()
                .incidents_open_in_window
                .set(act.index.incident_count() as i64);
            if reports.is_empty() && !full {
                return Ok(());
            }
            let m = act.inbox.metrics();
            for r in &reports {
                let Some(analysis) = r.analysis.as_ref().filter(|_| r.diagnosis_changed) else {
                    continue;
                };
                m.analyses.inc();
                for p in &analysis.patterns {
                    m.patterns_detected.get_or_create(&KindLabels { kind: p.kind.as_str() }).inc();
                }
                tracing::info!(
                    chain = %chain.chain_id,
                    incident = %r.id,
                    violations = analysis.violation_count,
                    patterns = analysis.patterns.len(),
                    top_cause = analysis.root_causes.first().map(|c| c.cause.as_str()).unwrap_or("none"),
                    confidence = analysis.confidence,
                    "incident diagnosed"
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
                // An analysis is recorded only when a diagnosis changed.
                let _ = act.knowledge.offer(RecordAnalysis(analysis.clone()));
            }
            chain.timings.analysis_seconds = started.elapsed().as_secs_f64();
            m.phase("analysis", chain.timings.analysis_seconds);
            act.deliver(ctx, chain, reports, full);
            Ok(())
        })
        .ok_or(AnalyzerFailed)
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
