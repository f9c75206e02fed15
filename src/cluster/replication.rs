//! Knowledge across replicas.
//!
//! Each replica keeps its own journal and sled. What a leader learns is
//! published to etcd and applied by every other replica **through its own
//! journal**, so a new leader plans with everything the old one learned,
//! and every replica's API shows the same history.
//!
//! # What, and where
//!
//! The Knowledge store hands every record this replica originates to a
//! tap ([`mapek_actors::store::KnowledgeStore::tap`]); those that other
//! replicas need ([`mapek_actors::store::replicable`]) are published here
//! under `{prefix}/knowledge/`:
//!
//! | key | record | kept in etcd |
//! |---|---|---|
//! | `knowledge/policies/{id}` | a policy (pending approvals included) | the newest [`HISTORY_KEPT`] |
//! | `knowledge/executions/{id}` | an execution | the newest [`HISTORY_KEPT`] |
//! | `knowledge/outcomes/{execution}` | an outcome (folded into the statistics once, where applied) | the newest [`HISTORY_KEPT`] |
//! | `knowledge/reclassified/{execution}` | an outcome re-classified | the newest [`HISTORY_KEPT`] |
//! | `knowledge/insights` | the latest insights | current state |
//! | `knowledge/guards/{key}` | guard state: pause, silences, flapping, breakers, budget and rate windows | current state |
//! | `knowledge/incidents/{id}` | incident records (holds, cooldowns, attempts) | current state |
//!
//! Each value is `{"origin": replica, "record": <journal record>}`.
//! Publication is **fenced**: the batch is one transaction that succeeds
//! only while this replica holds the leader key of a shard it leads, so a
//! deposed leader publishes nothing. A replica that leads no shard
//! publishes nothing (a standby's held policies are its own business),
//! and neither are policies of shards it does not lead.
//!
//! # Applying
//!
//! Every replica reads `knowledge/` once and then watches it from the
//! revision read (list and watch, as a Kubernetes informer does). A record
//! from another replica is submitted to the local journal as is (outcomes
//! fold into the local statistics once per execution). Deletions of
//! current-state keys are applied; deletions of history keys (the trimming
//! below) are not: older history lives on in sled only. A watch that falls
//! behind a compaction lists again.
//!
//! # Bounded
//!
//! The leader of shard 0 trims each history kind to its newest
//! [`HISTORY_KEPT`] keys every [`TRIM_EVERY`], and compacts etcd's
//! revision history to what it was one trim earlier.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions};
use mapek_actors::journal::Record;
use mapek_actors::leadership::Leadership;
use mapek_actors::store::{KnowledgeStore, REPLICATED_TREES};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{rpc, Cluster};

/// History keys of each kind kept in etcd.
pub const HISTORY_KEPT: usize = 1000;

/// How often the leader of shard 0 trims the history and compacts.
pub const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Records waiting for publication; more are dropped (and counted).
const QUEUE: usize = 65_536;

/// Records published in one transaction (etcd allows 128 operations).
const BATCH: usize = 64;

/// The history kinds (trimmed; their deletions are not applied).
const HISTORY: [&str; 4] = ["policies", "executions", "outcomes", "reclassified"];

/// A published value.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    origin: String,
    record: Record,
}

/// Counters of the replication, for the log and tests.
#[derive(Debug, Default)]
pub struct ReplicationCounters {
    /// Records published.
    pub published: AtomicU64,
    /// Records not published: the queue was full, or publishing failed.
    pub dropped: AtomicU64,
    /// Records of other replicas applied here.
    pub applied: AtomicU64,
}

/// The etcd key (relative to the prefix) of a record, and whether the
/// record deletes it; `None` for records that are not published.
fn key_of(record: &Record) -> Option<(String, bool)> {
    Some(match record {
        Record::Policy { policy } => (format!("knowledge/policies/{}", policy.id), false),
        Record::Execution { execution } => {
            (format!("knowledge/executions/{}", execution.id), false)
        }
        Record::Outcome { outcome, .. } => (
            format!("knowledge/outcomes/{}", outcome.execution_id),
            false,
        ),
        Record::Reclassify { execution_id, .. } => {
            (format!("knowledge/reclassified/{execution_id}"), false)
        }
        Record::Insights { .. } => ("knowledge/insights".to_string(), false),
        Record::Put { tree, key, .. } if REPLICATED_TREES.contains(&tree.as_str()) => {
            (format!("knowledge/{tree}/{key}"), false)
        }
        Record::Delete { tree, key } if REPLICATED_TREES.contains(&tree.as_str()) => {
            (format!("knowledge/{tree}/{key}"), true)
        }
        _ => return None,
    })
}

/// Starts publishing what `store` records here and applying what the
/// other replicas publish. The tasks stop with the cluster's.
pub fn start(cluster: &Cluster, store: &KnowledgeStore) -> Arc<ReplicationCounters> {
    let counters = Arc::new(ReplicationCounters::default());
    let (tx, rx) = mpsc::channel::<Record>(QUEUE);
    let dropped = counters.clone();
    let tapped = store.tap(Arc::new(move |r: &Record| {
        if tx.try_send(r.clone()).is_err() {
            dropped.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }));
    if !tapped {
        tracing::warn!("cluster: the knowledge store already has a tap; not replicating");
        return counters;
    }
    let inner = &cluster.inner;
    let h = tokio::spawn(publish(cluster.clone(), rx, counters.clone()));
    inner.track(h.abort_handle());
    let h = tokio::spawn(apply(cluster.clone(), store.clone(), counters.clone()));
    inner.track(h.abort_handle());
    let h = tokio::spawn(trim(cluster.clone()));
    inner.track(h.abort_handle());
    counters
}

async fn publish(
    cluster: Cluster,
    mut rx: mpsc::Receiver<Record>,
    counters: Arc<ReplicationCounters>,
) {
    let mut warned_at: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let view = cluster.view();
        let Some(&shard) = view.leading.first() else {
            // A standby's records (closing what a restart interrupted,
            // held policies) stay its own.
            continue;
        };
        // The last write of each key wins; order is kept otherwise.
        let mut ops: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(batch.len());
        let mut at: HashMap<String, usize> = HashMap::new();
        for r in batch {
            // Only finished executions: one acting or verifying is the
            // acting replica's own business (another replica restarting
            // must not close or re-verify it).
            if let Record::Execution { execution } = &r {
                use mapek_actors::model::ExecutionStatus;
                let open = matches!(execution.status, ExecutionStatus::InProgress)
                    || (matches!(execution.status, ExecutionStatus::Completed)
                        && execution.outcome.is_none());
                if open {
                    continue;
                }
            }
            if let Record::Policy { policy } = &r {
                let c = mapek_actors::leadership::policy_component(policy);
                if !view.leads(Leadership::shard_of(&cluster, c)) {
                    continue;
                }
            }
            let Some((key, delete)) = key_of(&r) else {
                continue;
            };
            let value = if delete {
                None
            } else {
                let env = Envelope {
                    origin: cluster.name().to_string(),
                    record: r,
                };
                match serde_json::to_vec(&env) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        tracing::error!(error = %e, key, "cluster: a record could not be encoded; not published");
                        continue;
                    }
                }
            };
            match at.get(&key) {
                Some(&i) => ops[i].1 = value,
                None => {
                    at.insert(key.clone(), ops.len());
                    ops.push((key, value));
                }
            }
        }
        if ops.is_empty() {
            continue;
        }
        let n = ops.len() as u64;
        let mut result = Err(String::new());
        for attempt in 0..3u32 {
            result = cluster.inner.fenced_ops(shard, &ops).await;
            if result.is_ok() || !cluster.is_leader(shard) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        match result {
            Ok(()) => {
                counters.published.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                counters.dropped.fetch_add(n, Ordering::Relaxed);
                let now = tokio::time::Instant::now();
                if warned_at.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10)) {
                    warned_at = Some(now);
                    tracing::warn!(error = %e, records = n, "cluster: knowledge not published (the other replicas will not see these records)");
                }
            }
        }
    }
}

/// Lists `knowledge/`, then watches it, applying other replicas'
/// records; starts over after any error.
async fn apply(cluster: Cluster, store: KnowledgeStore, counters: Arc<ReplicationCounters>) {
    loop {
        if let Err(e) = follow(&cluster, &store, &counters).await {
            tracing::warn!(error = %e, "cluster: following the replicated knowledge failed; listing again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow(
    cluster: &Cluster,
    store: &KnowledgeStore,
    counters: &ReplicationCounters,
) -> Result<(), String> {
    let prefix = cluster.key("knowledge/");
    let limit = cluster.inner.rpc_timeout * 4;
    let mut c = cluster.client();
    let resp = rpc(
        limit,
        "list knowledge",
        c.get(
            prefix.clone(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Mod, SortOrder::Ascend),
            ),
        ),
    )
    .await?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
    let mut pending = Vec::new();
    for kv in resp.kvs() {
        if let Some(f) = apply_put(cluster, store, kv.value(), counters) {
            pending.push(f);
        }
    }
    settle(pending).await?;
    let mut stream = rpc(
        cluster.inner.rpc_timeout,
        "watch knowledge",
        c.watch(
            prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        ),
    )
    .await?;
    while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
        if msg.compact_revision() > 0 {
            return Err(format!(
                "the watch fell behind a compaction (revision {})",
                msg.compact_revision()
            ));
        }
        if msg.canceled() {
            return Err(format!("the watch was cancelled: {}", msg.cancel_reason()));
        }
        let mut pending = Vec::new();
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    if let Some(f) = apply_put(cluster, store, kv.value(), counters) {
                        pending.push(f);
                    }
                }
                EventType::Delete => {
                    let Ok(key) = kv.key_str() else { continue };
                    let Some(rel) = key.strip_prefix(prefix.as_str()) else {
                        continue;
                    };
                    let Some((tree, k)) = rel.split_once('/') else {
                        continue;
                    };
                    if HISTORY.contains(&tree) || !REPLICATED_TREES.contains(&tree) {
                        // Trimmed history stays in sled.
                        continue;
                    }
                    let record = Record::Delete {
                        tree: tree.to_string(),
                        key: k.to_string(),
                    };
                    pending.push(Box::pin(store.submit_replica(&record))
                        as futures::future::BoxFuture<'static, _>);
                    counters.applied.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        settle(pending).await?;
    }
    Err("the watch ended".into())
}

type Pending = futures::future::BoxFuture<
    'static,
    Result<mapek_actors::store::Applied, mapek_actors::store::StoreError>,
>;

/// Queues a published record in the local journal (not ours, decodable);
/// the future resolves when it is durable.
fn apply_put(
    cluster: &Cluster,
    store: &KnowledgeStore,
    value: &[u8],
    counters: &ReplicationCounters,
) -> Option<Pending> {
    let env: Envelope = match serde_json::from_slice(value) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "cluster: a replicated record could not be read; skipped");
            return None;
        }
    };
    if env.origin == cluster.name() {
        return None;
    }
    counters.applied.fetch_add(1, Ordering::Relaxed);
    Some(Box::pin(store.submit_replica(&env.record)))
}

async fn settle(pending: Vec<Pending>) -> Result<(), String> {
    for r in futures::future::join_all(pending).await {
        if let Err(e) = r {
            return Err(format!("a replicated record was not stored: {e}"));
        }
    }
    Ok(())
}

/// On the leader of shard 0: keeps each history kind to its newest
/// [`HISTORY_KEPT`] keys and compacts etcd to the revision of the
/// previous round.
async fn trim(cluster: Cluster) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: Option<i64> = None;
    loop {
        tick.tick().await;
        if !cluster.is_leader(0) {
            previous = None;
            continue;
        }
        match trim_once(&cluster, HISTORY_KEPT).await {
            Ok((removed, rev)) => {
                if removed > 0 {
                    tracing::debug!(removed, "cluster: old knowledge history trimmed from etcd");
                }
                if let Some(r) = previous {
                    let mut c = cluster.client();
                    if let Err(e) =
                        rpc(cluster.inner.rpc_timeout, "compact", c.compact(r, None)).await
                    {
                        if !e.contains("compacted") {
                            tracing::warn!(error = %e, "cluster: etcd compaction failed");
                        }
                    }
                }
                previous = Some(rev);
            }
            Err(e) => tracing::warn!(error = %e, "cluster: trimming the knowledge history failed"),
        }
    }
}

/// Deletes the oldest history keys beyond `keep` per kind; returns how
/// many, and the revision seen.
pub async fn trim_once(cluster: &Cluster, keep: usize) -> Result<(usize, i64), String> {
    let mut c = cluster.client();
    let mut removed = 0;
    let mut rev = 0;
    for kind in HISTORY {
        let prefix = cluster.key(&format!("knowledge/{kind}/"));
        let count = rpc(
            cluster.inner.rpc_timeout,
            "count history",
            c.get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        )
        .await?;
        rev = rev.max(count.header().map(|h| h.revision()).unwrap_or_default());
        let excess = (count.count().max(0) as usize).saturating_sub(keep);
        if excess == 0 {
            continue;
        }
        let oldest = rpc(
            cluster.inner.rpc_timeout * 4,
            "oldest history",
            c.get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(excess as i64),
                ),
            ),
        )
        .await?;
        let keys: Vec<Vec<u8>> = oldest.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        for chunk in keys.chunks(BATCH) {
            let txn = Txn::new().and_then(
                chunk
                    .iter()
                    .map(|k| TxnOp::delete(k.clone(), None))
                    .collect::<Vec<_>>(),
            );
            rpc(cluster.inner.rpc_timeout, "trim history", c.txn(txn)).await?;
            removed += chunk.len();
        }
    }
    Ok((removed, rev))
}
