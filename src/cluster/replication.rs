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
//!
//! Each value is `{"origin": replica, "record": <journal record>}`.
//! Publication is **fenced** by the record's shard: a policy's (its
//! component's), an execution's and an outcome's (their policy's), a
//! per-component guard key's (`rate/`, `flap/`, `success/`, `silence/`);
//! what belongs to no component (insights, pause, budget, breakers) goes
//! under the lowest shard this replica leads. Each batch is one
//! transaction per shard that succeeds only while this replica holds that
//! shard's leader key, so a deposed leader publishes nothing, and a
//! record of a shard this replica does not lead (a standby's held
//! policies, its own closing of what a restart interrupted) is never
//! published. Executions still acting or verifying are not published
//! either: only the acting replica may close or re-verify them.
//! Incident records are not replicated: each replica names its incidents
//! from its own analysis, and the claims in etcd reconcile the names
//! before anyone acts.
//!
//! # Applying
//!
//! Every replica reads `knowledge/` once (in pages, at one revision) and
//! then watches it from that revision (list and watch, as a Kubernetes
//! informer does). A record from another replica is submitted to the
//! local journal as is (outcomes fold into the local statistics once per
//! execution); one of its own only when its store lacks it (it came back
//! with an empty data directory). Deletions of current-state keys by
//! another replica are applied; its own are not (they could undo a later
//! write of its own), nor deletions of history keys (the trimming below):
//! older history lives on in sled only. A watch that falls behind a
//! compaction lists again.
//!
//! # Bounded
//!
//! The leader of shard 0 trims each history kind to its newest
//! [`HISTORY_KEPT`] keys every [`TRIM_EVERY`]. Compaction of etcd's
//! revision history is etcd's own (`--auto-compaction-mode`,
//! `--auto-compaction-retention`): it spans the whole keyspace, which
//! other clusters may share. A watch that falls behind it lists again.

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

/// Keys per page when listing the knowledge.
const PAGE: i64 = 500;

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
    /// Records not published because this replica does not lead their
    /// shard (a standby's own records).
    pub skipped: AtomicU64,
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
    let h = tokio::spawn(publish(
        cluster.clone(),
        store.clone(),
        rx,
        counters.clone(),
    ));
    inner.track(h.abort_handle());
    let h = tokio::spawn(apply(cluster.clone(), store.clone(), counters.clone()));
    inner.track(h.abort_handle());
    let h = tokio::spawn(trim(cluster.clone()));
    inner.track(h.abort_handle());
    counters
}

/// The shard a record belongs to: `Some(shard)`, or `None` for what is
/// not about one component (insights, the pause, the budget, breakers).
fn shard_of_record(cluster: &Cluster, store: &KnowledgeStore, r: &Record) -> Option<u32> {
    let of_policy = |id: &str| -> Option<u32> {
        let p = store.get_policy(id).ok().flatten()?;
        Some(mapek_actors::leadership::policy_shard(cluster, &p))
    };
    match r {
        Record::Policy { policy } => Some(mapek_actors::leadership::policy_shard(cluster, policy)),
        Record::Execution { execution } => of_policy(&execution.policy_id),
        Record::Outcome { outcome, .. } => of_policy(&outcome.policy_id),
        Record::Reclassify { execution_id, .. } => store
            .get_outcome(execution_id)
            .ok()
            .flatten()
            .and_then(|o| of_policy(&o.policy_id)),
        Record::Put { key, .. } | Record::Delete { key, .. } => {
            let (kind, component) = key.split_once('/')?;
            matches!(kind, "rate" | "flap" | "success" | "silence")
                .then(|| Leadership::shard_of(cluster, component))
        }
        _ => None,
    }
}

/// Whether an execution is still under way (acting, or verifying without
/// an outcome): the acting replica's own business, not published (a
/// replica restarting must not close or re-verify another's).
fn under_way(r: &Record) -> bool {
    use mapek_actors::model::ExecutionStatus;
    match r {
        Record::Execution { execution } => {
            matches!(execution.status, ExecutionStatus::InProgress)
                || (matches!(execution.status, ExecutionStatus::Completed)
                    && execution.outcome.is_none())
        }
        _ => false,
    }
}

/// Writes to publish under one shard's fence: the shard, the ops in
/// order (`None`: delete), and each key's index among them.
type Group = (u32, Vec<(String, Option<Vec<u8>>)>, HashMap<String, usize>);

/// Largest transaction published, bytes (etcd refuses requests above
/// 1.5 MiB by default).
const MAX_TXN_BYTES: usize = 1024 * 1024;

async fn publish(
    cluster: Cluster,
    store: KnowledgeStore,
    mut rx: mpsc::Receiver<Record>,
    counters: Arc<ReplicationCounters>,
) {
    let mut warned_at: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH * 4 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let view = cluster.view();
        // Per fence (the shard it is published under): ops in order, the
        // last write of each key winning.
        let mut groups: Vec<Group> = Vec::new();
        for r in batch {
            if under_way(&r) {
                continue;
            }
            // Only what this replica leads: a standby's records (held
            // policies, its own closing of what a restart interrupted)
            // and other shards' stay its own.
            let fence = match shard_of_record(&cluster, &store, &r) {
                Some(shard) if view.leads(shard) => shard,
                Some(_) => {
                    counters.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                None => match view.leading.first() {
                    Some(&s) => s,
                    None => {
                        counters.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                },
            };
            // The disruption budget is counted per leader, shared by all:
            // each leader's window is its own key (`budget@<replica>`).
            let r = match r {
                Record::Put { tree, key, value }
                    if tree == mapek_actors::safety::GUARDS_TREE && key == "budget" =>
                {
                    Record::Put {
                        tree,
                        key: format!("budget@{}", cluster.name()),
                        value,
                    }
                }
                Record::Delete { tree, key }
                    if tree == mapek_actors::safety::GUARDS_TREE && key == "budget" =>
                {
                    Record::Delete {
                        tree,
                        key: format!("budget@{}", cluster.name()),
                    }
                }
                other => other,
            };
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
            let g = match groups.iter().position(|(s, _, _)| *s == fence) {
                Some(g) => g,
                None => {
                    groups.push((fence, Vec::new(), HashMap::new()));
                    groups.len() - 1
                }
            };
            let (_, ops, at) = &mut groups[g];
            match at.get(&key) {
                Some(&i) => ops[i].1 = value,
                None => {
                    at.insert(key.clone(), ops.len());
                    ops.push((key, value));
                }
            }
        }
        for (shard, ops, _) in groups {
            // Chunks within etcd's limits on operations and bytes.
            let mut chunk: Vec<(String, Option<Vec<u8>>)> = Vec::new();
            let mut bytes = 0usize;
            let mut chunks = Vec::new();
            for op in ops {
                let size = op.0.len() + op.1.as_ref().map_or(0, Vec::len);
                if !chunk.is_empty() && (chunk.len() >= BATCH || bytes + size > MAX_TXN_BYTES) {
                    chunks.push(std::mem::take(&mut chunk));
                    bytes = 0;
                }
                bytes += size;
                chunk.push(op);
            }
            if !chunk.is_empty() {
                chunks.push(chunk);
            }
            for ops in chunks {
                let n = ops.len() as u64;
                let mut result = Err(String::new());
                for attempt in 0..5u32 {
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
                        if warned_at.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
                        {
                            warned_at = Some(now);
                            tracing::warn!(error = %e, records = n, shard, "cluster: knowledge not published (the other replicas will not see these records)");
                        }
                    }
                }
            }
        }
    }
}

/// Lists `knowledge/`, then watches it, applying other replicas'
/// records; starts over after any error.
async fn apply(cluster: Cluster, store: KnowledgeStore, counters: Arc<ReplicationCounters>) {
    let mut failures = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        match follow(&cluster, &store, &counters).await {
            Ok(()) => failures = 0,
            Err(e) => {
                // A watch that ran a while and then broke starts over.
                if started.elapsed() > Duration::from_secs(60) {
                    failures = 0;
                }
                failures += 1;
                // Said once, then every 30th time (etcd may be down for
                // long: the election reports that too).
                if failures == 1 || failures % 30 == 0 {
                    tracing::warn!(error = %e, failures, "cluster: following the replicated knowledge failed; listing again");
                }
            }
        }
        // 1 s, doubling to 30 s while it keeps failing.
        let wait = Duration::from_secs(1 << failures.saturating_sub(1).min(5))
            .min(Duration::from_secs(30));
        tokio::time::sleep(wait).await;
    }
}

async fn follow(
    cluster: &Cluster,
    store: &KnowledgeStore,
    counters: &ReplicationCounters,
) -> Result<(), String> {
    let prefix = cluster.key("knowledge/");
    // Everything under the prefix: up to `knowledge0` ('0' follows '/').
    let end = format!("{}0", prefix.trim_end_matches('/'));
    let limit = cluster.inner.rpc_timeout * 4;
    let mut c = cluster.client();
    // Listed in pages at one revision (a whole history would exceed the
    // client's 4 MiB message limit).
    let mut from = prefix.clone().into_bytes();
    let mut rev = 0i64;
    let guards_prefix = format!("{prefix}{}/", mapek_actors::safety::GUARDS_TREE);
    let mut listed_guards: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if rev > 0 {
            opts = opts.with_revision(rev);
        }
        let resp = rpc(limit, "list knowledge", c.get(from.clone(), Some(opts))).await?;
        if rev == 0 {
            rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        }
        let mut pending = Vec::new();
        for kv in resp.kvs() {
            if let Some(rest) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(guards_prefix.as_str()))
            {
                listed_guards.insert(rest.to_string());
            }
            if let Some(f) = apply_listed(cluster, store, kv.value(), counters) {
                pending.push(f);
            }
        }
        settle(pending).await?;
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    forget_unlisted(cluster, store, &listed_guards, counters).await?;
    let mut stream = rpc(
        cluster.inner.rpc_timeout,
        "watch knowledge",
        c.watch(
            prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
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
                    // Our own deletion (already done here): not again,
                    // it could undo a later write of ours.
                    let ours = ev
                        .prev_kv()
                        .and_then(|p| serde_json::from_slice::<Envelope>(p.value()).ok())
                        .is_some_and(|e| e.origin == cluster.name());
                    if ours {
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

/// After a list: another leader's budget record that etcd no longer has
/// goes. Other guard keys are kept even when etcd no longer has them (a
/// deletion missed while not watching, or state this replica could not
/// publish): what they keep is conservative (a pause, a silence, an open
/// breaker, a full window), visible in `/api/v1/safety`, and ended by a
/// resume or a clear, whereas dropping one could let mapek act where it
/// was told not to.
async fn forget_unlisted(
    cluster: &Cluster,
    store: &KnowledgeStore,
    listed: &std::collections::HashSet<String>,
    counters: &ReplicationCounters,
) -> Result<(), String> {
    use mapek_actors::safety::GUARDS_TREE;
    let mine = format!("budget@{}", cluster.name());
    let local = store
        .list_records_prefixed::<serde_json::Value>(GUARDS_TREE, "budget@")
        .map_err(|e| e.to_string())?;
    let mut pending = Vec::new();
    for (key, _) in local {
        if listed.contains(&key) || key == mine {
            continue;
        }
        if key.starts_with("budget@") {
            let record = Record::Delete {
                tree: GUARDS_TREE.to_string(),
                key,
            };
            counters.applied.fetch_add(1, Ordering::Relaxed);
            pending.push(Box::pin(store.submit_replica(&record)) as Pending);
        }
    }
    settle(pending).await
}

/// Like [`apply_put`], for a listed record: one of our own is applied
/// too when this replica's store lacks it (it came back with an empty
/// data directory).
fn apply_listed(
    cluster: &Cluster,
    store: &KnowledgeStore,
    value: &[u8],
    counters: &ReplicationCounters,
) -> Option<Pending> {
    let env: Envelope = serde_json::from_slice(value).ok()?;
    if env.origin != cluster.name() {
        return apply_put(cluster, store, value, counters);
    }
    let missing = match &env.record {
        Record::Policy { policy } => matches!(store.get_policy(&policy.id), Ok(None)),
        Record::Execution { execution } => {
            matches!(store.get_execution(&execution.id), Ok(None))
        }
        Record::Outcome { outcome, .. } => {
            matches!(store.get_outcome(&outcome.execution_id), Ok(None))
        }
        Record::Put { tree, key, .. } if tree == mapek_actors::safety::GUARDS_TREE => matches!(
            store.get_record::<serde_json::Value>(mapek_actors::safety::GUARDS_TREE, key),
            Ok(None)
        ),
        _ => false,
    };
    if !missing {
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
/// [`HISTORY_KEPT`] keys. (Compacting etcd's revision history is left to
/// etcd's `--auto-compaction-*`: it applies to the whole keyspace, which
/// other clusters and applications may share.)
async fn trim(cluster: Cluster) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !cluster.is_leader(0) {
            continue;
        }
        match trim_once(&cluster, HISTORY_KEPT).await {
            Ok((removed, _)) => {
                if removed > 0 {
                    tracing::debug!(removed, "cluster: old knowledge history trimmed from etcd");
                }
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
