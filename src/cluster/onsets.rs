//! Agreed onsets: every replica computes the same incident id.
//!
//! An incident's id is derived from its first violation's fingerprint and
//! onset ([`mapek_actors::model::incident_id`]), and so are the
//! idempotency keys of its actions (`incident/attempt/action`). An
//! Alertmanager alert carries its onset (`startsAt`, the same for every
//! receiver), but a polled source (Prometheus, a direct scrape) only knows
//! when *this* replica first saw the series breach, which differs from one
//! replica to the next. Without agreement a new leader would name the
//! incident it takes over differently, and its keys would not match the
//! intents of the old leader.
//!
//! So in cluster mode every polled source is wrapped in [`AgreedOnsets`]:
//! the first time a replica sees a fingerprint, it runs
//! `if version(key) == 0 then put(key, {fingerprint, onset}) else get(key)`
//! on `{prefix}/incident-onsets/{fnv64(fingerprint)}`. The first replica to
//! see the violation decides its onset for everyone; the answer is cached
//! while the series keeps breaching, so a poll costs etcd nothing for
//! violations already known.
//!
//! The keys are removed by the leader of shard 0 once no source of its own
//! has seen the fingerprint for [`FORGET_AFTER`] (checked every
//! [`GC_EVERY`]), so the keyspace is bounded by the active violations. A
//! violation that comes back is a new one with a new onset: a replica
//! that saw it end replaces the old onset (compare-and-swap on the key's
//! revision); a replica that did not (a blip between its polls) keeps the
//! old one, and the incident claims settle the names before anyone acts.
//!
//! While etcd cannot be asked, a replica uses its own onset (and says so
//! in the log); ids agree again for violations first seen after etcd
//! answers. No action is taken meanwhile anyway: leading needs etcd.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use futures::future::BoxFuture;
use futures::StreamExt;
use mapek_actors::model::Violation;
use mapek_actors::ports::{MetricSource, Polled, SourceError};
use mapek_actors::settings::RuleSpec;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{lock, rpc, Cluster};

/// How long a fingerprint must have been absent from every source of the
/// leader of shard 0 before its onset key is removed.
pub const FORGET_AFTER: Duration = Duration::from_secs(300);

/// How often the leader of shard 0 looks for onset keys to remove.
pub const GC_EVERY: Duration = Duration::from_secs(60);

/// Agreements asked of etcd at once.
const PARALLEL: usize = 16;

/// The value of an onset key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OnsetRecord {
    fingerprint: String,
    onset_ms: i64,
    /// The replica that saw it first.
    by: String,
}

/// (source name, fingerprint).
type SourceFingerprint = (String, String);

/// The onsets this replica agreed, shared by all its polled sources.
pub struct OnsetBook {
    cluster: Cluster,
    /// (source, fingerprint) → agreed onset (ms).
    /// Value: (agreed onset, rule, when last seen breaching), in ms.
    known: Mutex<HashMap<SourceFingerprint, (i64, String, i64)>>,
    /// Onset keys found without a local violation, and since when (GC).
    absent: Mutex<HashMap<String, Instant>>,
    /// (source, fingerprint) → when this replica last saw it breach,
    /// after it stopped: a violation that comes back is a new one, with a
    /// new onset, even if the old onset key is still in etcd. Entries
    /// older than [`FORGET_AFTER`] are dropped (the key is gone by then).
    ended: Mutex<HashMap<(String, String), i64>>,
    /// (source, fingerprint) → the earliest onset this replica saw while
    /// it could not agree one (etcd unreachable): proposed once it can.
    own: Mutex<HashMap<(String, String), i64>>,
}

impl OnsetBook {
    /// A book on `cluster`; starts the clean-up of stale keys (stopped
    /// with the cluster's tasks).
    pub fn new(cluster: Cluster) -> Arc<OnsetBook> {
        let book = Arc::new(OnsetBook {
            cluster,
            known: Mutex::new(HashMap::new()),
            absent: Mutex::new(HashMap::new()),
            ended: Mutex::new(HashMap::new()),
            own: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&book);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(GC_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(book) = weak.upgrade() else { return };
                if let Err(e) = book.collect_garbage(FORGET_AFTER).await {
                    tracing::warn!(error = %e, "cluster: removing stale onset keys failed; retrying later");
                }
            }
        });
        book.cluster.inner.track(task.abort_handle());
        book
    }

    /// The etcd key of a fingerprint's onset.
    pub fn key_of(&self, fingerprint: &str) -> String {
        self.cluster
            .key(&format!("incident-onsets/{:016x}", fnv64(fingerprint)))
    }

    /// Puts the agreed onset on every violation polled from `source`, and
    /// forgets the fingerprints it no longer reports (except those of the
    /// rules in `failed`, which gave no evidence this time).
    pub async fn agree(&self, source: &str, violations: &mut [Violation], failed: &[String]) {
        let mut need: Vec<(String, i64, Option<i64>)> = Vec::new();
        {
            let mut known = lock(&self.known);
            let ended = lock(&self.ended);
            let mut own = lock(&self.own);
            let mut asked = HashSet::new();
            for v in violations.iter_mut() {
                let k = (source.to_string(), v.fingerprint.clone());
                match known.get_mut(&k) {
                    Some((ms, _, last)) => {
                        *last = (*last).max(v.observed_at.timestamp_millis());
                        set_onset(v, *ms);
                    }
                    None => {
                        // Until agreed: the earliest this replica saw.
                        let mine = own
                            .entry(k.clone())
                            .and_modify(|o| *o = (*o).min(v.first_seen.timestamp_millis()))
                            .or_insert(v.first_seen.timestamp_millis());
                        set_onset(v, *mine);
                        if asked.insert(v.fingerprint.clone()) {
                            need.push((v.fingerprint.clone(), *mine, ended.get(&k).copied()));
                        }
                    }
                }
            }
        }
        let mut agreed: HashMap<String, i64> = HashMap::new();
        if !need.is_empty() {
            if self.cluster.view().etcd_error.is_some() {
                tracing::warn!(
                    source,
                    violations = need.len(),
                    "cluster: etcd unavailable, so new violations keep this replica's own onset (their incident ids may differ between replicas)"
                );
            } else {
                let results: Vec<(String, Result<i64, String>)> = futures::stream::iter(need)
                    .map(|(fp, ms, ended)| async move {
                        let r = self.agree_one(&fp, ms, ended).await;
                        (fp, r)
                    })
                    .buffer_unordered(PARALLEL)
                    .collect()
                    .await;
                let mut failed = 0usize;
                let mut last_error = String::new();
                for (fp, r) in results {
                    match r {
                        Ok(ms) => {
                            agreed.insert(fp, ms);
                        }
                        Err(e) => {
                            failed += 1;
                            last_error = e;
                        }
                    }
                }
                if failed > 0 {
                    tracing::warn!(source, failed, error = %last_error, "cluster: onsets not agreed; these violations keep this replica's own onset for now");
                }
            }
        }
        let mut known = lock(&self.known);
        let mut own = lock(&self.own);
        for v in violations.iter_mut() {
            if let Some(ms) = agreed.get(&v.fingerprint) {
                set_onset(v, *ms);
                let k = (source.to_string(), v.fingerprint.clone());
                own.remove(&k);
                known.insert(k, (*ms, v.rule.clone(), v.observed_at.timestamp_millis()));
            }
        }
        let current: HashSet<&str> = violations.iter().map(|v| v.fingerprint.as_str()).collect();
        let mut ended = lock(&self.ended);
        known.retain(|(s, fp), (_, rule, last)| {
            // A rule that failed this time says nothing about its series.
            let keep =
                s != source || current.contains(fp.as_str()) || failed.iter().any(|f| f == rule);
            if !keep {
                // In the source's time, as onsets are.
                ended.insert((s.clone(), fp.clone()), *last);
            }
            keep
        });
        for fp in &current {
            ended.remove(&(source.to_string(), fp.to_string()));
        }
        let now_ms = violations
            .iter()
            .map(|v| v.observed_at.timestamp_millis())
            .max()
            .unwrap_or_else(|| Utc::now().timestamp_millis());
        own.retain(|(s, fp), _| s != source || current.contains(fp.as_str()));
        let horizon = now_ms - FORGET_AFTER.as_millis() as i64 * 2;
        ended.retain(|_, at| *at > horizon);
    }

    /// Agrees the onset of one fingerprint: ours if we are first, else
    /// the one recorded, unless that one is from an episode this replica
    /// saw end (`ended`: when it last saw it breach before): then ours
    /// replaces it, if nobody replaced it first.
    async fn agree_one(
        &self,
        fingerprint: &str,
        onset_ms: i64,
        ended: Option<i64>,
    ) -> Result<i64, String> {
        let key = self.key_of(fingerprint);
        let mine = OnsetRecord {
            fingerprint: fingerprint.to_string(),
            onset_ms,
            by: self.cluster.name().to_string(),
        };
        let value = serde_json::to_vec(&mine).map_err(|e| e.to_string())?;
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut c = self.cluster.client();
        let resp = rpc(self.cluster.inner.rpc_timeout, "onset", c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(onset_ms);
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op {
                if let Some(kv) = g.kvs().first() {
                    return match serde_json::from_slice::<OnsetRecord>(kv.value()) {
                        // A hash collision (another fingerprint): keep ours.
                        Ok(r) if r.fingerprint != fingerprint => Ok(onset_ms),
                        // The episode we saw end: this is a new one.
                        Ok(r) if ended.is_some_and(|e| r.onset_ms <= e) => {
                            let txn = Txn::new()
                                .when([Compare::mod_revision(
                                    key.clone(),
                                    CompareOp::Equal,
                                    kv.mod_revision(),
                                )])
                                .and_then([TxnOp::put(
                                    key.clone(),
                                    serde_json::to_vec(&mine).map_err(|e| e.to_string())?,
                                    None,
                                )]);
                            let mut c = self.cluster.client();
                            let done = rpc(self.cluster.inner.rpc_timeout, "onset", c.txn(txn))
                                .await?
                                .succeeded();
                            if done {
                                Ok(onset_ms)
                            } else {
                                // Someone replaced it first: theirs, next poll.
                                Err(format!("{key} changed while it was replaced"))
                            }
                        }
                        Ok(r) => Ok(r.onset_ms),
                        Err(e) => Err(format!("{key} holds no onset record: {e}")),
                    };
                }
            }
        }
        // Deleted between the compare and the get: ask again next poll.
        Err(format!("{key} vanished while it was read"))
    }

    /// On the leader of shard 0: removes the onset keys whose fingerprint
    /// none of this replica's sources has reported for `after`. Returns
    /// how many were removed.
    pub async fn collect_garbage(&self, after: Duration) -> Result<usize, String> {
        if !self.cluster.is_leader(0) {
            lock(&self.absent).clear();
            return Ok(0);
        }
        let prefix = self.cluster.key("incident-onsets/");
        let mut c = self.cluster.client();
        let resp = rpc(
            self.cluster.inner.rpc_timeout,
            "list onsets",
            c.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let active: HashSet<String> = lock(&self.known).keys().map(|(_, fp)| fp.clone()).collect();
        let now = Instant::now();
        let mut stale = Vec::new();
        {
            let mut absent = lock(&self.absent);
            let mut present = HashSet::new();
            for kv in resp.kvs() {
                let Ok(key) = kv.key_str() else { continue };
                present.insert(key.to_string());
                let live = serde_json::from_slice::<OnsetRecord>(kv.value())
                    .map(|r| active.contains(&r.fingerprint))
                    .unwrap_or(false);
                if live {
                    absent.remove(key);
                    continue;
                }
                let since = *absent.entry(key.to_string()).or_insert(now);
                if now.duration_since(since) >= after {
                    stale.push((key.to_string(), kv.mod_revision()));
                }
            }
            absent.retain(|k, _| present.contains(k));
        }
        let mut removed = 0;
        for (key, rev) in stale {
            // Only if unchanged since it was read (never a fresh onset).
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::delete(key.clone(), None)]);
            let r = rpc(self.cluster.inner.rpc_timeout, "remove onset", c.txn(txn)).await?;
            if r.succeeded() {
                removed += 1;
                lock(&self.absent).remove(&key);
            }
        }
        if removed > 0 {
            tracing::debug!(removed, "cluster: removed onset keys of violations gone");
        }
        Ok(removed)
    }
}

fn set_onset(v: &mut Violation, ms: i64) {
    if let Some(t) = Utc.timestamp_millis_opt(ms).single() {
        v.first_seen = t;
    }
}

/// FNV-1a, 64 bit.
fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A polled source whose violations carry the onset agreed across the
/// cluster (see the module documentation).
pub struct AgreedOnsets {
    inner: Arc<dyn MetricSource>,
    book: Arc<OnsetBook>,
}

impl AgreedOnsets {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn MetricSource>, book: Arc<OnsetBook>) -> Self {
        AgreedOnsets { inner, book }
    }
}

impl MetricSource for AgreedOnsets {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn poll<'a>(
        &'a self,
        rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Vec<Violation>, SourceError>> {
        Box::pin(async move { Ok(self.poll_rules(rules).await?.violations) })
    }

    fn poll_rules<'a>(
        &'a self,
        rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Polled, SourceError>> {
        Box::pin(async move {
            let mut polled = self.inner.poll_rules(rules).await?;
            let failed: Vec<String> = polled.failed.iter().map(|f| f.rule.clone()).collect();
            self.book
                .agree(self.inner.name(), &mut polled.violations, &failed)
                .await;
            Ok(polled)
        })
    }
}
