//! Monitor phase: polls the metric sources, takes webhook batches, keeps the
//! set of active violations (de-duplicated by fingerprint) and the health of
//! every source, and hands snapshots to the Analyzer.
//!
//! A source that fails or goes stale is *no evidence*: its violations are
//! withdrawn from the snapshot (so nothing is planned from them) and its
//! health says why, until it answers again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::prelude::*;

use super::active::{in_scope, ActiveViolations};
use crate::clock::SharedClock;
use crate::events::LoopEvent;
use crate::mailbox::{note_restart, Inbox, PhaseAddr, PhasePort};
use crate::messages::{
    ActorRestarted, ChainTrace, GetActiveViolations, GetSources, GetViolations, MeasureNow,
    Observe, ObserveAck, ObserveError, SourceHealth, SourceStatus, ViolationsDetected,
};
use crate::metrics::{SourceLabels, SourceResultLabels};
use crate::model::Violation;
use crate::ports::{AlertState, EvidenceProbe, MetricSource, Polled, SourceError};
use crate::settings::MonitorSettings;
use crate::state::SharedState;
use crate::store::KnowledgeStore;

/// The Monitor actor.
pub struct Monitor {
    inbox: Inbox,
    settings: MonitorSettings,
    sources: Vec<Arc<dyn MetricSource>>,
    /// Names of the polled sources (the others push through the webhook).
    polled: Arc<HashSet<String>>,
    health: BTreeMap<String, SourceHealth>,
    polling: HashSet<String>,
    active: ActiveViolations,
    pending_added: HashMap<String, Arc<Violation>>,
    pending_resolved: HashSet<String>,
    pending_blind: BTreeMap<String, bool>,
    new_since_forward: usize,
    dirty: bool,
    /// A delta is on its way to the Analyzer: the next waits (changes are
    /// never shed, and arrive in order).
    delivering: bool,
    ticks_since_resync: u64,
    resync_due: bool,
    alert_state: Option<Arc<dyn AlertState>>,
    store: Option<KnowledgeStore>,
    analyzer: PhasePort<ViolationsDetected>,
    clock: SharedClock,
    state: SharedState,
    supervisor: PhasePort<ActorRestarted>,
}

impl Monitor {
    /// A Monitor polling `sources` and feeding `analyzer`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inbox: Inbox,
        settings: MonitorSettings,
        sources: Vec<Arc<dyn MetricSource>>,
        analyzer: PhasePort<ViolationsDetected>,
        clock: SharedClock,
        state: SharedState,
        supervisor: PhasePort<ActorRestarted>,
    ) -> Self {
        let health = sources
            .iter()
            .map(|s| {
                (
                    s.name().to_string(),
                    SourceHealth {
                        name: s.name().to_string(),
                        status: SourceStatus::Unknown,
                        last_success: None,
                        last_error: None,
                        consecutive_failures: 0,
                        failing_rules: Vec::new(),
                    },
                )
            })
            .collect();
        let polled = Arc::new(sources.iter().map(|s| s.name().to_string()).collect());
        Monitor {
            inbox,
            settings,
            sources,
            polled,
            health,
            polling: HashSet::new(),
            active: ActiveViolations::default(),
            pending_added: HashMap::new(),
            pending_resolved: HashSet::new(),
            pending_blind: BTreeMap::new(),
            new_since_forward: 0,
            dirty: false,
            delivering: false,
            ticks_since_resync: 0,
            resync_due: false,
            alert_state: None,
            store: None,
            analyzer,
            clock,
            state,
            supervisor,
        }
    }

    /// Keeps the active pushed (webhook) violations in `store`, and starts
    /// with those that were active when it was last written (they survive
    /// a restart; Alertmanager may not re-send them for hours).
    pub fn with_store(mut self, store: Option<KnowledgeStore>) -> Self {
        if let Some(st) = &store {
            match st.pushed_violations() {
                Ok(vs) if !vs.is_empty() => {
                    let mut by_source: BTreeMap<String, Vec<Violation>> = BTreeMap::new();
                    for v in vs {
                        by_source.entry(v.source.clone()).or_default().push(v);
                    }
                    let mut restored = 0;
                    for (source, batch) in by_source {
                        let applied = self.active.apply(&source, &batch, &[], false);
                        restored += applied.added.len();
                        for v in applied.added {
                            self.pending_added.insert(v.fingerprint.clone(), v);
                        }
                    }
                    self.dirty = true;
                    tracing::info!(restored, "active webhook violations restored");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "active webhook violations could not be restored")
                }
            }
        }
        self.store = store;
        self
    }

    fn keep_pushed(&self, added: &[Arc<Violation>], resolved: &[String]) {
        let Some(st) = &self.store else {
            return;
        };
        for v in added {
            if let Err(e) = st.put_pushed(v) {
                tracing::warn!(error = %e, fingerprint = %v.fingerprint, "webhook violation not kept");
            }
        }
        for fp in resolved {
            if let Err(e) = st.delete_pushed(fp) {
                tracing::warn!(error = %e, fingerprint = %fp, "ended webhook violation not forgotten");
            }
        }
    }

    /// Verification asks `alert_state` for the pushed alerts firing now.
    pub fn with_alert_state(mut self, alert_state: Option<Arc<dyn AlertState>>) -> Self {
        self.alert_state = alert_state;
        self
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(self.settings.interval_seconds.max(1))
    }

    fn expire_webhook_violations(&mut self) {
        let polled = self.polled.clone();
        let limit = chrono::Duration::seconds(
            self.settings
                .webhook_stale_after_seconds
                .min(i64::MAX as u64) as i64,
        );
        let gone = self
            .active
            .expire_unpolled(&polled, self.clock.now() - limit);
        if !gone.is_empty() {
            tracing::warn!(
                count = gone.len(),
                after_seconds = self.settings.webhook_stale_after_seconds,
                "webhook violations not re-sent for too long ended as if resolved"
            );
            self.inbox
                .metrics()
                .violations_active
                .set(self.active.len() as i64);
            self.keep_pushed(&[], &gone);
            self.note_resolved(gone);
            self.dirty = true;
        }
    }

    fn note_resolved(&mut self, fps: Vec<String>) {
        for fp in fps {
            self.pending_added.remove(&fp);
            self.pending_resolved.insert(fp);
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.expire_webhook_violations();
        // The iteration counts ticks (a heartbeat even without polled
        // sources) and webhook batches.
        self.inbox.metrics().iteration.inc();
        let now = self.clock.now();
        self.state.update(now, |s| s.iteration += 1);
        self.check_stale();
        // A periodic full reconcile repairs any drift between the
        // Monitor's active set and the Analyzer's window.
        self.ticks_since_resync += 1;
        let every = (RESYNC_SECONDS / self.settings.interval_seconds.max(1)).max(1);
        if self.ticks_since_resync >= every {
            self.ticks_since_resync = 0;
            self.resync_due = true;
            self.dirty = true;
        }
        for source in self.sources.clone() {
            let name = source.name().to_string();
            if !self.polling.insert(name.clone()) {
                continue; // previous poll still running: never overlap
            }
            let rules = self.settings.rules.clone();
            let metrics = self.inbox.metrics().clone();
            let fut = async move {
                let started = tokio::time::Instant::now();
                let res = source.poll_rules(&rules).await;
                let secs = started.elapsed().as_secs_f64();
                metrics
                    .source_query_duration
                    .get_or_create(&SourceResultLabels {
                        source: source.name().to_string(),
                        result: if res.is_ok() { "ok" } else { "error" },
                    })
                    .observe(secs);
                (res, secs)
            };
            ctx.spawn(fut.into_actor(self).map(move |(res, secs), act, ctx| {
                let inbox = act.inbox.clone();
                inbox.guard_internal(act, ctx, "PollResult", |act, ctx| {
                    act.polling.remove(&name);
                    act.on_poll(ctx, &name, res, secs);
                    Ok(())
                });
            }));
        }
        if self.dirty {
            self.forward(ctx, 0.0);
        }
    }

    fn check_stale(&mut self) {
        let now = self.clock.now();
        let limit = self.interval() * self.settings.stale_after_intervals.max(1);
        let limit = chrono::Duration::from_std(limit).unwrap_or(chrono::Duration::MAX);
        let mut stale = Vec::new();
        for h in self.health.values_mut() {
            if h.status == SourceStatus::Up {
                if let Some(ok) = h.last_success {
                    if now - ok > limit {
                        h.status = SourceStatus::Stale;
                        h.last_error = Some(format!(
                            "no answer since {ok} (more than {} intervals)",
                            self.settings.stale_after_intervals
                        ));
                        stale.push(h.name.clone());
                    }
                }
            }
        }
        for name in stale {
            tracing::warn!(source = %name, "source is stale: no evidence until it answers again");
            self.no_evidence(&name);
        }
    }

    fn no_evidence(&mut self, source: &str) {
        self.inbox
            .metrics()
            .source_up
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .set(0);
        // No evidence is not "no violations": the source's violations stay
        // active, and its incidents wait (no_evidence) until it answers.
        if self.pending_blind.get(source) != Some(&true) {
            self.pending_blind.insert(source.to_string(), true);
            self.dirty = true;
        }
        let reason = self
            .health
            .get(source)
            .and_then(|h| h.last_error.clone())
            .unwrap_or_default();
        let now = self.clock.now();
        self.state.update(now, |s| {
            s.error = Some(format!("source `{source}` gives no evidence: {reason}"));
        });
    }

    fn on_poll(
        &mut self,
        ctx: &mut Context<Self>,
        source: &str,
        res: Result<Polled, SourceError>,
        secs: f64,
    ) {
        let now = self.clock.now();
        // A source that evaluates none of its rules (every one failed: an
        // HTML page instead of Prometheus JSON, a wrong path) gives no
        // evidence at all: degraded, not up.
        let rules = self.settings.rules.len();
        let res = match res {
            Ok(p) if rules > 0 && p.violations.is_empty() && p.failed.len() >= rules => {
                let first = p
                    .failed
                    .first()
                    .map(|f| format!("{}: {}", f.rule, f.error))
                    .unwrap_or_default();
                Err(SourceError::Garbage(format!(
                    "every rule failed ({} of {rules}); first: {first}",
                    p.failed.len()
                )))
            }
            other => other,
        };
        match res {
            Ok(Polled {
                violations: batch,
                failed,
            }) => {
                let was = self.health.get(source).map(|h| h.status);
                let failing: Vec<String> = failed
                    .iter()
                    .map(|f| format!("{}: {}", f.rule, f.error))
                    .collect();
                if let Some(h) = self.health.get_mut(source) {
                    h.status = SourceStatus::Up;
                    h.last_success = Some(now);
                    h.consecutive_failures = 0;
                    if h.failing_rules != failing {
                        // A broken rule costs only its own evidence: its
                        // violations leave the snapshot (no evidence is not
                        // "no violations", but nothing is planned from it).
                        for f in &failing {
                            tracing::warn!(source, rule = %f, "rule gives no evidence");
                        }
                        if failing.is_empty() && !h.failing_rules.is_empty() {
                            tracing::info!(source, "every rule gives evidence again");
                        }
                        h.failing_rules = failing;
                    }
                }
                if matches!(was, Some(SourceStatus::Degraded | SourceStatus::Stale)) {
                    tracing::info!(source, "source recovered: evidence again");
                    self.state.update(now, |s| s.error = None);
                    self.pending_blind.insert(source.to_string(), false);
                }
                self.inbox
                    .metrics()
                    .source_up
                    .get_or_create(&SourceLabels {
                        source: source.to_string(),
                    })
                    .set(1);
                self.accept(source, &batch, &[], true);
                self.forward(ctx, secs);
            }
            Err(e) => {
                let mut first = false;
                if let Some(h) = self.health.get_mut(source) {
                    first = h.status != SourceStatus::Degraded;
                    h.status = SourceStatus::Degraded;
                    h.last_error = Some(e.to_string());
                    h.consecutive_failures += 1;
                }
                if first {
                    tracing::warn!(source, error = %e, "source degraded: no evidence, nothing will be planned from it");
                } else {
                    tracing::debug!(source, error = %e, "source still degraded");
                }
                self.no_evidence(source);
                if self.dirty {
                    self.forward(ctx, secs);
                }
            }
        }
    }

    fn accept(
        &mut self,
        source: &str,
        batch: &[Violation],
        resolved: &[String],
        complete: bool,
    ) -> ObserveAck {
        let applied = self.active.apply(source, batch, resolved, complete);
        if !complete {
            self.keep_pushed(&applied.added, &applied.resolved);
        }
        let m = self.inbox.metrics();
        m.violations_detected.inc_by(batch.len() as u64);
        m.violations_active.set(self.active.len() as i64);
        if !complete {
            m.iteration.inc();
        }
        let ack = ObserveAck {
            received: batch.len(),
            new: applied.new,
            duplicates: applied.duplicates,
            resolved: applied.resolved.len(),
        };
        if applied.new > 0 || !applied.resolved.is_empty() {
            tracing::info!(
                source,
                new = applied.new,
                resolved = applied.resolved.len(),
                active = self.active.len(),
                "violations changed"
            );
        }
        self.note_resolved(applied.resolved);
        for v in applied.added {
            self.pending_resolved.remove(&v.fingerprint);
            self.pending_added.insert(v.fingerprint.clone(), v);
        }
        self.new_since_forward += applied.new;
        let now = self.clock.now();
        let active = self.active.len();
        self.state.update(now, |s| {
            if !complete {
                s.iteration += 1;
            }
            s.violations_detected = active;
        });
        self.dirty = true;
        ack
    }

    /// Hands the changes since the last delivery to the Analyzer. They
    /// are never shed: while one delivery is on its way (waiting for room
    /// in the Analyzer's mailbox) the next changes accumulate, so a flood
    /// costs one delta per Analyzer cycle and arrives in order.
    fn forward(&mut self, ctx: &mut Context<Self>, detection_seconds: f64) {
        if self.delivering {
            self.dirty = true;
            return;
        }
        if self.pending_added.is_empty()
            && self.pending_resolved.is_empty()
            && self.pending_blind.is_empty()
            && !self.resync_due
        {
            self.dirty = false;
            return;
        }
        let mut chain = ChainTrace::start(self.clock.now());
        chain.timings.detection_seconds = detection_seconds;
        self.inbox.metrics().phase("detection", detection_seconds);
        let msg = ViolationsDetected {
            chain,
            added: self.pending_added.drain().map(|(_, v)| v).collect(),
            resolved: self.pending_resolved.drain().collect(),
            blind: std::mem::take(&mut self.pending_blind)
                .into_iter()
                .collect(),
            resync: std::mem::take(&mut self.resync_due).then(|| Arc::new(self.active.shared())),
        };
        let chain_id = msg.chain.chain_id.clone();
        if self.new_since_forward > 0 {
            tracing::info!(chain = %chain_id, new = self.new_since_forward, active = self.active.len(), "violations handed to the analyzer");
        } else {
            tracing::debug!(chain = %chain_id, active = self.active.len(), "changes handed to the analyzer");
        }
        self.inbox.emit(LoopEvent::Detected {
            chain_id,
            active: self.active.len(),
            new: self.new_since_forward,
        });
        self.new_since_forward = 0;
        self.dirty = false;
        self.delivering = true;
        let analyzer = self.analyzer.clone();
        ctx.spawn(
            async move { analyzer.send(msg).await }
                .into_actor(self)
                .map(|res, act, ctx| {
                    act.delivering = false;
                    let res = res.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()));
                    if let Err(e) = res {
                        // The Analyzer is restarting: its window is rebuilt
                        // by the next full reconcile.
                        tracing::warn!(error = %e, "changes not delivered; a full reconcile follows");
                        act.resync_due = true;
                        act.dirty = true;
                    }
                    if act.dirty {
                        act.forward(ctx, 0.0);
                    }
                }),
        );
    }
}

/// Seconds between two full reconciles of the Analyzer's window with the
/// Monitor's active set.
pub const RESYNC_SECONDS: u64 = 60;

impl Actor for Monitor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.inbox.started();
        self.polling.clear();
        let interval = self.interval();
        // First poll at once, then every interval.
        ctx.run_later(Duration::ZERO, |act, ctx| {
            let inbox = act.inbox.clone();
            inbox.guard_internal(act, ctx, "Tick", |act, ctx| {
                act.tick(ctx);
                Ok(())
            });
        });
        ctx.run_interval(interval, |act, ctx| {
            let inbox = act.inbox.clone();
            inbox.guard_internal(act, ctx, "Tick", |act, ctx| {
                act.tick(ctx);
                Ok(())
            });
        });
    }
}

impl Supervised for Monitor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        note_restart(&self.inbox, &self.supervisor);
    }
}

impl Handler<Observe> for Monitor {
    type Result = Result<ObserveAck, ObserveError>;

    fn handle(&mut self, msg: Observe, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox
            .guard(self, ctx, "Observe", |act, ctx| {
                let ack = act.accept(&msg.source, &msg.violations, &msg.resolved, msg.complete);
                act.forward(ctx, 0.0);
                Ok(ack)
            })
            .ok_or_else(|| {
                ObserveError::MonitorFailed("the monitor failed while handling the batch".into())
            })
    }
}

impl Handler<GetSources> for Monitor {
    type Result = Vec<SourceHealth>;

    fn handle(&mut self, _msg: GetSources, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox
            .guard(self, ctx, "GetSources", |act, _| {
                Ok(act.health.values().cloned().collect())
            })
            .unwrap_or_default()
    }
}

impl Handler<GetViolations> for Monitor {
    type Result = Vec<Violation>;

    fn handle(&mut self, msg: GetViolations, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox
            .guard(self, ctx, "GetViolations", |act, _| {
                Ok(msg
                    .fingerprints
                    .iter()
                    .filter_map(|fp| act.active.get(fp).map(|v| (**v).clone()))
                    .collect())
            })
            .unwrap_or_default()
    }
}

impl Handler<GetActiveViolations> for Monitor {
    type Result = Vec<Violation>;

    fn handle(&mut self, _msg: GetActiveViolations, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        inbox
            .guard(self, ctx, "GetActiveViolations", |act, _| {
                Ok(act.active.snapshot())
            })
            .unwrap_or_default()
    }
}

impl Handler<MeasureNow> for Monitor {
    type Result = ResponseActFuture<Self, Result<usize, SourceError>>;

    fn handle(&mut self, msg: MeasureNow, ctx: &mut Context<Self>) -> Self::Result {
        let inbox = self.inbox.clone();
        let prepared = inbox.guard(self, ctx, "MeasureNow", |act, _| {
            Ok((act.sources.clone(), act.settings.rules.clone()))
        });
        let Some((sources, rules)) = prepared else {
            return Box::pin(fut::ready(Err(SourceError::Unreachable(
                "monitor restarting".into(),
            ))));
        };
        let scope = msg.scope;
        let polled = self.polled.clone();
        // Alertmanager is asked only when pushed alerts are in scope: a
        // Prometheus-only incident does not depend on it.
        let pushed_in_scope = self
            .active
            .by_source
            .keys()
            .filter(|s| !polled.contains(*s))
            .any(|s| self.active.count_in_scope(s, &scope) > 0);
        let alert_state = self.alert_state.clone().filter(|_| pushed_in_scope);
        let fut = async move {
            let mut total = 0usize;
            for s in &sources {
                let polled = s.poll_rules(&rules).await?;
                // A rule watching this scope without evidence makes the
                // whole measurement no evidence: its violations may persist.
                if let Some(f) = polled
                    .failed
                    .into_iter()
                    .find(|f| scope.is_empty() || scope.contains(&f.component))
                {
                    return Err(f.error);
                }
                total += polled
                    .violations
                    .iter()
                    .filter(|v| in_scope(v, &scope))
                    .count();
            }
            // Pushed alerts: what Alertmanager says is firing now.
            let firing = match &alert_state {
                Some(a) => Some(a.count_firing(&scope).await?),
                None => None,
            };
            Ok::<(usize, Option<usize>, Vec<String>), SourceError>((total, firing, scope))
        };
        Box::pin(fut.into_actor(self).map(move |res, act, _ctx| {
            let (polled_total, firing, scope) = res?;
            // Without an alert-state source, violations of sources that are
            // not polled (webhooks) count as they stand now.
            let pushed: usize = firing.unwrap_or_else(|| {
                act.active
                    .by_source
                    .keys()
                    .filter(|s| !polled.contains(*s))
                    .map(|s| act.active.count_in_scope(s, &scope))
                    .sum()
            });
            Ok(polled_total + pushed)
        }))
    }
}

/// [`EvidenceProbe`] that asks the Monitor to measure now. The address is
/// filled in once the Monitor has started (it starts after the Executor).
#[derive(Clone, Default)]
pub struct MonitorProbe {
    monitor: Arc<OnceLock<PhaseAddr<Monitor>>>,
}

impl MonitorProbe {
    /// An unconnected probe.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects it to the Monitor.
    pub fn connect(&self, monitor: PhaseAddr<Monitor>) {
        let _ = self.monitor.set(monitor);
    }
}

impl EvidenceProbe for MonitorProbe {
    fn count_violations<'a>(
        &'a self,
        scope: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<usize, SourceError>> {
        Box::pin(async move {
            let monitor = self
                .monitor
                .get()
                .ok_or_else(|| SourceError::Unreachable("monitor not started".into()))?;
            monitor
                .send(MeasureNow {
                    scope: scope.to_vec(),
                })
                .await
                .map_err(|e| SourceError::Unreachable(e.to_string()))?
        })
    }
}
