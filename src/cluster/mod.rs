//! Cluster mode on etcd (v3 API): membership, leader election per shard
//! with leases, fenced writes. Built with the `cluster` feature.
//!
//! # Keys (under `cluster.prefix`, default `/mapek`)
//!
//! | key | value | lease |
//! |---|---|---|
//! | `{prefix}/members/{name}` | JSON `{name, api, started_at}` | the replica's membership lease |
//! | `{prefix}/shards/{n}/leader` | the leader's name | that shard's leadership lease |
//! | `{prefix}/intents/…`, `{prefix}/incident-claims/…` | written by [`Cluster::fenced_put`] | a shared lease of TTL [`RECORD_TTL`] |
//! | `{prefix}/incident-pins/{hash}` | the shard an incident belongs to, one key per member fingerprint | the same lease |
//! | `{prefix}/...` anything else | written by [`Cluster::fenced_put`] | none |
//!
//! # Election
//!
//! Every lease has the TTL `lease_seconds` and is kept alive every third of
//! it. To lead shard `n` a replica grants a lease and runs the transaction
//! `if create_revision(leader key) == 0 then put(leader key, name, lease)
//! else get(leader key)`. The winner's fence is the key's create revision,
//! which only grows from one leader to the next.
//!
//! A leader **stops leading on its own** at `sent + TTL - margin`, where
//! `sent` is when the last successful keep-alive (or the grant) was *sent*
//! (etcd counts the TTL from a later moment), and `margin` is a fifth of
//! the TTL, between 0.3 s and 1 s. [`Cluster::is_leader`] checks that
//! deadline at every call, so even a process that was frozen (SIGSTOP)
//! past its lease sees at once that it no longer leads. A failed or late
//! keep-alive, a keep-alive answered with TTL 0 (the lease is gone), or a
//! watch event showing the leader key deleted or replaced end leadership
//! immediately; the lease is then revoked (best effort) so that another
//! replica can take over without waiting for it to expire.
//!
//! # Spreading the shards
//!
//! Each replica watches `{prefix}/` and so knows the members and every
//! shard's leader. With `m` members (itself included) its share is
//! `ceil(shards / m)`. It campaigns at once for a vacant shard while it
//! leads fewer than its share (a replica that leads `k` shards waits until
//! the shard has been vacant for `k × 25 ms`, so the least loaded wins
//! ties), and after [`TAKEOVER_GRACE`] even when it has its share: a shard
//! whose leader key is gone is always taken over. A replica that leads
//! more than its share while another member leads fewer releases the
//! surplus (highest shard numbers first). With 12 shards and 3 replicas
//! this settles at 4/4/4.
//!
//! Components map to shards by rendezvous hashing of their names
//! ([`mapek_actors::leadership::shard_of`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::future::BoxFuture;
use mapek_actors::leadership::{
    Budget, Fence, FenceError, FencedWrite, Leadership, LeadershipView,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::ClusterSettings;

pub mod onsets;
pub mod replication;

/// How long a shard's leader key must have been gone before a replica
/// that already leads its share campaigns for it anyway.
pub const TAKEOVER_GRACE: Duration = Duration::from_millis(500);

/// How long an intent (`intents/…`) or an incident claim
/// (`incident-claims/…`) stays in etcd: they are written on a shared lease
/// of this TTL, granted anew every [`RECORD_LEASE_ROTATE`], so each one
/// goes between 24 and 25 hours after its last write and the keyspace
/// stays bounded by a day of actions. A day is far longer than any action
/// and its verification can be in flight.
pub const RECORD_TTL: Duration = Duration::from_secs(25 * 3600);

/// How often a new lease for intents and claims is granted.
pub const RECORD_LEASE_ROTATE: Duration = Duration::from_secs(3600);

/// How often the election is re-evaluated without any event.
const TICK: Duration = Duration::from_millis(100);

/// Per lead already held, how long a fresh vacancy waits (ties go to the
/// least loaded replica).
const LOAD_DELAY: Duration = Duration::from_millis(25);

/// Why a cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The settings cannot be used (an endpoint etcd-client refuses).
    #[error("cluster: {0}")]
    Setup(String),
}

/// What a replica publishes under `{prefix}/members/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The replica's name.
    pub name: String,
    /// Address of its HTTP API.
    pub api: String,
    /// When it started (RFC 3339).
    pub started_at: String,
}

/// `{shard}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabels {
    shard: String,
}

/// The cluster's metrics.
#[derive(Default)]
struct ClusterMetrics {
    leader: Family<ShardLabels, Gauge>,
    transitions: Family<ShardLabels, Counter>,
}

impl ClusterMetrics {
    fn labels(shard: u32) -> ShardLabels {
        ShardLabels {
            shard: shard.to_string(),
        }
    }

    fn set(&self, shard: u32, leading: bool) {
        self.leader
            .get_or_create(&Self::labels(shard))
            .set(i64::from(leading));
        self.transitions.get_or_create(&Self::labels(shard)).inc();
    }
}

/// A shard this replica leads.
struct Lead {
    fence: Fence,
    /// When leading ends unless the lease is renewed first.
    valid_until: Instant,
    keeper: Option<AbortHandle>,
}

/// Who holds a shard's leader key, as seen in etcd.
#[derive(Debug, Clone)]
struct Holder {
    name: String,
    create_revision: i64,
}

/// A shard as seen in etcd.
#[derive(Debug, Clone)]
struct ShardSeen {
    holder: Option<Holder>,
    /// Revision of the last change applied (older events are ignored).
    rev: i64,
    /// Since when it has had no holder.
    vacant_since: Instant,
}

/// What the watch has shown.
#[derive(Default)]
struct Seen {
    members: BTreeMap<String, MemberRecord>,
    shards: BTreeMap<u32, ShardSeen>,
}

impl Seen {
    fn set_shard(&mut self, shard: u32, holder: Option<Holder>, rev: i64) {
        let now = Instant::now();
        let entry = self.shards.entry(shard).or_insert(ShardSeen {
            holder: None,
            rev: 0,
            vacant_since: now,
        });
        if rev < entry.rev {
            return;
        }
        if holder.is_none() && entry.holder.is_some() {
            entry.vacant_since = now;
        }
        entry.holder = holder;
        entry.rev = rev;
    }
}

/// What a key under the prefix is.
enum KeyKind {
    Member(String),
    Leader(u32),
    Other,
}

struct Inner {
    name: String,
    prefix: String,
    shards: u32,
    ttl: Duration,
    margin: Duration,
    rpc_timeout: Duration,
    record: MemberRecord,
    client: Client,
    leads: Mutex<BTreeMap<u32, Lead>>,
    seen: Mutex<Seen>,
    etcd_error: Mutex<Option<String>>,
    member_lease: Mutex<Option<i64>>,
    /// The lease that intents and incident claims are written on (see
    /// [`RECORD_TTL`]) and when it was granted.
    record_lease: Mutex<Option<(i64, Instant)>>,
    tx: watch::Sender<LeadershipView>,
    wake: Notify,
    tasks: Mutex<Vec<AbortHandle>>,
    stopping: AtomicBool,
    metrics: ClusterMetrics,
}

/// Aborts every background task when the last [`Cluster`] handle goes
/// (without releasing anything: like a crash, the leases then expire).
struct Owner(Arc<Inner>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.abort_tasks();
    }
}

/// A replica of the cluster; cheap to clone. See the module documentation.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
    _owner: Arc<Owner>,
}

/// Locks a mutex, recovering the data of a poisoned one (every critical
/// section here leaves the data consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn rpc<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {limit:?}")),
    }
}

impl Cluster {
    /// Starts the replica: connects (lazily: a dead etcd is reported by
    /// [`LeadershipView::etcd_error`], never waited for), then registers
    /// and campaigns in the background. `api` is the address of this
    /// replica's HTTP API, published in its membership record. Must run
    /// inside a tokio runtime.
    pub async fn start(
        settings: &ClusterSettings,
        api: SocketAddr,
    ) -> Result<Cluster, ClusterError> {
        let name = settings.effective_name();
        let ttl = Duration::from_secs(settings.lease_seconds.max(2));
        let margin = (ttl / 5).clamp(Duration::from_millis(300), Duration::from_secs(1));
        let rpc_timeout = (ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(5));
        let shards = settings.shards.max(1);
        let ka = (ttl / 5).clamp(Duration::from_millis(500), Duration::from_secs(5));
        let options = ConnectOptions::new()
            .with_connect_timeout(rpc_timeout)
            .with_keep_alive(ka, ka)
            .with_keep_alive_while_idle(true);
        let client = match tokio::time::timeout(
            rpc_timeout,
            Client::connect(&settings.etcd_endpoints, Some(options)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(ClusterError::Setup(format!("etcd client: {e}"))),
            Err(_) => {
                return Err(ClusterError::Setup(format!(
                    "etcd client: not set up within {rpc_timeout:?}"
                )))
            }
        };
        let advertised = if !settings.advertise.trim().is_empty() {
            settings.advertise.trim().to_string()
        } else if api.ip().is_unspecified() {
            format!(
                "{}:{}",
                crate::config::host_name().unwrap_or_else(|| "localhost".into()),
                api.port()
            )
        } else {
            api.to_string()
        };
        let record = MemberRecord {
            name: name.clone(),
            api: advertised,
            started_at: chrono::Utc::now().to_rfc3339(),
        };
        let view = LeadershipView {
            name: name.clone(),
            clustered: true,
            shards,
            leading: BTreeSet::new(),
            leaders: (0..shards).map(|s| (s, None)).collect(),
            members: vec![name.clone()],
            etcd_error: Some("not connected yet".into()),
        };
        let (tx, _) = watch::channel(view);
        let metrics = ClusterMetrics::default();
        for s in 0..shards {
            metrics
                .leader
                .get_or_create(&ClusterMetrics::labels(s))
                .set(0);
            let _ = metrics
                .transitions
                .get_or_create(&ClusterMetrics::labels(s));
        }
        let inner = Arc::new(Inner {
            name,
            prefix: settings.prefix.trim_end_matches('/').to_string(),
            shards,
            ttl,
            margin,
            rpc_timeout,
            record,
            client,
            leads: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(Seen::default()),
            etcd_error: Mutex::new(Some("not connected yet".into())),
            member_lease: Mutex::new(None),
            record_lease: Mutex::new(None),
            tx,
            wake: Notify::new(),
            tasks: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            metrics,
        });
        let driver = tokio::spawn(drive(inner.clone()));
        inner.track(driver.abort_handle());
        tracing::info!(name = %inner.name, endpoints = ?settings.etcd_endpoints, shards, lease_seconds = settings.lease_seconds, prefix = %inner.prefix, "cluster mode: joining");
        Ok(Cluster {
            _owner: Arc::new(Owner(inner.clone())),
            inner,
        })
    }

    /// This replica's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.inner.shards
    }

    /// Whether this replica leads `shard` now (holds its leader key, and
    /// the lease cannot have expired yet).
    pub fn is_leader(&self, shard: u32) -> bool {
        self.inner.fence(shard).is_some()
    }

    /// The fence of `shard` while this replica leads it.
    pub fn fence(&self, shard: u32) -> Option<Fence> {
        self.inner.fence(shard).map(|(f, _)| f)
    }

    /// Every change of the view (leadership, members, etcd reachable).
    pub fn subscribe(&self) -> watch::Receiver<LeadershipView> {
        self.inner.tx.subscribe()
    }

    /// The current view.
    pub fn view(&self) -> LeadershipView {
        self.inner.publish();
        self.inner.tx.borrow().clone()
    }

    /// The full etcd key of `rel` (`{prefix}/{rel}`).
    pub fn key(&self, rel: &str) -> String {
        format!("{}/{}", self.inner.prefix, rel)
    }

    /// The etcd client, for what this module does not cover yet (such as
    /// watching replicated knowledge).
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// Writes `value` at `{prefix}/{key}` in one transaction that succeeds
    /// only while `shard`'s leader key still has this replica's create
    /// revision and lease. On [`FenceError::Deposed`] this replica steps
    /// down. A success that comes back after the local deadline is
    /// reported as [`FenceError::NotLeader`] (the write happened, but the
    /// caller must not act on it).
    pub async fn fenced_put(
        &self,
        shard: u32,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<FencedWrite, FenceError> {
        self.inner.fenced_put(shard, key, value.into()).await
    }

    /// Reads `{prefix}/{key}`.
    pub async fn read(&self, key: &str) -> Result<Option<Vec<u8>>, FenceError> {
        let full = self.key(key);
        let mut c = self.inner.client.clone();
        let resp = rpc(self.inner.rpc_timeout, "get", c.get(full, None))
            .await
            .map_err(FenceError::Unavailable)?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Registers `mape_k_cluster_leader{shard}` and
    /// `mape_k_cluster_leadership_transitions_total{shard}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mape_k_cluster_leader",
            "Whether this replica leads the shard (1) or not (0)",
            self.inner.metrics.leader.clone(),
        );
        registry.register(
            "mape_k_cluster_leadership_transitions",
            "Times this replica started or stopped leading the shard",
            self.inner.metrics.transitions.clone(),
        );
    }

    /// Leaves the cluster gracefully: stops leading (revoking the shard
    /// leases, so another replica takes over at once), removes the
    /// membership and stops the background tasks. Bounded by a few
    /// request timeouts even when etcd does not answer.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        inner.abort_tasks();
        let leads: Vec<(u32, Lead)> = std::mem::take(&mut *lock(&inner.leads))
            .into_iter()
            .collect();
        let mut revokes = Vec::new();
        for (shard, lead) in leads {
            if let Some(k) = &lead.keeper {
                k.abort();
            }
            inner.metrics.set(shard, false);
            tracing::info!(shard, "stopped leading shard: shutting down");
            revokes.push(inner.revoke(lead.fence.lease_id));
        }
        if let Some(id) = lock(&inner.member_lease).take() {
            revokes.push(inner.revoke(id));
        }
        futures::future::join_all(revokes).await;
        inner.publish();
    }

    /// Stops every background task **without** releasing anything, as a
    /// crash or a frozen process would: the leases expire at etcd after
    /// their TTL. The handle still answers: [`Cluster::is_leader`] turns
    /// false at the local deadline, and a fenced write is refused by etcd
    /// once another replica leads. For tests and chaos drills.
    pub fn halt(&self) {
        self.inner.abort_tasks();
    }
}

impl Inner {
    fn track(&self, h: AbortHandle) {
        let mut t = lock(&self.tasks);
        t.retain(|h| !h.is_finished());
        t.push(h);
    }

    fn abort_tasks(&self) {
        for h in lock(&self.tasks).drain(..) {
            h.abort();
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn leader_key(&self, shard: u32) -> String {
        format!("{}/shards/{shard}/leader", self.prefix)
    }

    fn member_key(&self, name: &str) -> String {
        format!("{}/members/{name}", self.prefix)
    }

    fn kind_of(&self, key: &str) -> KeyKind {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return KeyKind::Other;
        };
        if let Some(name) = rest.strip_prefix("members/") {
            return KeyKind::Member(name.to_string());
        }
        if let Some(n) = rest
            .strip_prefix("shards/")
            .and_then(|r| r.strip_suffix("/leader"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            if n < self.shards {
                return KeyKind::Leader(n);
            }
        }
        KeyKind::Other
    }

    /// The fence and deadline of `shard` while leading it.
    fn fence(&self, shard: u32) -> Option<(Fence, Instant)> {
        if self.stopping() {
            return None;
        }
        let leads = lock(&self.leads);
        let l = leads.get(&shard)?;
        (Instant::now() < l.valid_until).then(|| (l.fence.clone(), l.valid_until))
    }

    fn set_etcd_error(&self, e: Option<String>) {
        *lock(&self.etcd_error) = e;
        self.publish();
    }

    /// Recomputes the view and tells the subscribers when it changed.
    fn publish(&self) {
        let now = Instant::now();
        let leading: BTreeSet<u32> = lock(&self.leads)
            .iter()
            .filter(|(_, l)| now < l.valid_until && !self.stopping())
            .map(|(s, _)| *s)
            .collect();
        let (leaders, members) = {
            let seen = lock(&self.seen);
            let leaders: BTreeMap<u32, Option<String>> = (0..self.shards)
                .map(|s| {
                    let holder = if leading.contains(&s) {
                        Some(self.name.clone())
                    } else {
                        seen.shards
                            .get(&s)
                            .and_then(|x| x.holder.as_ref())
                            .map(|h| h.name.clone())
                            .filter(|n| *n != self.name)
                    };
                    (s, holder)
                })
                .collect();
            let mut members: BTreeSet<String> = seen.members.keys().cloned().collect();
            if !self.stopping() {
                members.insert(self.name.clone());
            }
            (leaders, members.into_iter().collect::<Vec<_>>())
        };
        let view = LeadershipView {
            name: self.name.clone(),
            clustered: true,
            shards: self.shards,
            leading,
            leaders,
            members,
            etcd_error: lock(&self.etcd_error).clone(),
        };
        self.tx.send_if_modified(|v| {
            if *v == view {
                false
            } else {
                *v = view;
                true
            }
        });
    }

    async fn revoke(&self, lease: i64) {
        let mut c = self.client.clone();
        if let Err(e) = rpc(self.rpc_timeout, "lease revoke", c.lease_revoke(lease)).await {
            tracing::debug!(lease, error = %e, "lease not revoked (it expires by itself)");
        }
    }

    /// Ends the lead of `shard` (if it is still the one on `lease`, when
    /// given), revoking its lease in the background when `revoke`.
    fn step_down(self: &Arc<Self>, shard: u32, lease: Option<i64>, reason: &str, revoke: bool) {
        let lead = {
            let mut leads = lock(&self.leads);
            match leads.get(&shard) {
                Some(l) if lease.is_none_or(|id| id == l.fence.lease_id) => leads.remove(&shard),
                _ => None,
            }
        };
        let Some(lead) = lead else { return };
        self.metrics.set(shard, false);
        tracing::warn!(
            shard,
            revision = lead.fence.revision,
            reason,
            "stopped leading shard"
        );
        if revoke {
            let me = self.clone();
            let id = lead.fence.lease_id;
            tokio::spawn(async move { me.revoke(id).await });
        }
        self.publish();
        self.wake.notify_one();
        if let Some(k) = lead.keeper {
            // Last: this may be the keeper itself.
            k.abort();
        }
    }

    /// Ends the leads whose deadline passed (no task may have said so).
    fn expire_leads(self: &Arc<Self>) {
        let now = Instant::now();
        let expired: Vec<(u32, i64)> = lock(&self.leads)
            .iter()
            .filter(|(_, l)| now >= l.valid_until)
            .map(|(s, l)| (*s, l.fence.lease_id))
            .collect();
        for (s, lease) in expired {
            self.step_down(s, Some(lease), "the lease was not renewed in time", true);
        }
    }

    /// Applies one key-value (a PUT) or deletion seen in etcd.
    fn apply(self: &Arc<Self>, key: &str, kv: Option<&KeyValue>, rev: i64) -> Result<(), String> {
        match self.kind_of(key) {
            KeyKind::Member(name) => {
                let mut seen = lock(&self.seen);
                match kv {
                    Some(kv) => {
                        let record = serde_json::from_slice::<MemberRecord>(kv.value())
                            .unwrap_or_else(|_| MemberRecord {
                                name: name.clone(),
                                api: String::new(),
                                started_at: String::new(),
                            });
                        seen.members.insert(name, record);
                    }
                    None => {
                        seen.members.remove(&name);
                        if name == self.name && !self.stopping() {
                            return Err("this replica's membership key was deleted".into());
                        }
                    }
                }
            }
            KeyKind::Leader(shard) => {
                let holder = kv.map(|kv| Holder {
                    name: String::from_utf8_lossy(kv.value()).into_owned(),
                    create_revision: kv.create_revision(),
                });
                // Is our own lead of this shard gone?
                let ours = lock(&self.leads)
                    .get(&shard)
                    .map(|l| (l.fence.revision, l.fence.lease_id));
                if let Some((our_rev, our_lease)) = ours {
                    let replaced = match &holder {
                        None => rev > our_rev,
                        Some(h) => h.create_revision != our_rev && rev > our_rev,
                    };
                    if replaced {
                        self.step_down(
                            shard,
                            Some(our_lease),
                            "the leader key was deleted or replaced",
                            true,
                        );
                    }
                }
                lock(&self.seen).set_shard(shard, holder, rev);
            }
            KeyKind::Other => {}
        }
        Ok(())
    }

    async fn fenced_put(
        self: &Arc<Self>,
        shard: u32,
        key: &str,
        value: Vec<u8>,
    ) -> Result<FencedWrite, FenceError> {
        if shard >= self.shards {
            return Err(FenceError::NoSuchShard {
                shard,
                shards: self.shards,
            });
        }
        let bad = |reason: &str| FenceError::InvalidKey {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        if key.is_empty() || key.starts_with('/') {
            return Err(bad("must be a non-empty key relative to the prefix"));
        }
        if key.starts_with("shards/") || key.starts_with("members/") {
            return Err(bad("shards/ and members/ belong to the election"));
        }
        let (fence, _) = self.fence(shard).ok_or(FenceError::NotLeader { shard })?;
        let lk = fence.leader_key.clone();
        let expiring = key.starts_with("intents/") || key.starts_with("incident-claims/");
        let options = if expiring {
            Some(PutOptions::new().with_lease(self.record_lease().await?))
        } else {
            None
        };
        let txn = Txn::new()
            .when(Self::fence_compares(&fence))
            .and_then([TxnOp::put(format!("{}/{key}", self.prefix), value, options)])
            .or_else([TxnOp::get(lk, None)]);
        let mut c = self.client.clone();
        let resp = match rpc(self.rpc_timeout, "fenced put", c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                if expiring && e.contains("lease") {
                    // The shared lease is gone (etcd lost it): a new one
                    // next time.
                    *lock(&self.record_lease) = None;
                }
                return Err(FenceError::Unavailable(e));
            }
        };
        if resp.succeeded() {
            if self.fence(shard).is_none() {
                return Err(FenceError::NotLeader { shard });
            }
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            return Ok(FencedWrite { fence, revision });
        }
        let holder = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        self.step_down(
            shard,
            Some(fence.lease_id),
            "deposed: a fenced write found the leader key changed",
            true,
        );
        Err(FenceError::Deposed { shard, holder })
    }

    /// Puts (`Some`) or deletes (`None`) each key (relative to the
    /// prefix) in one transaction that succeeds only while this replica
    /// holds `shard`'s leader key (as [`Inner::fenced_put`]).
    async fn fenced_ops(
        self: &Arc<Self>,
        shard: u32,
        ops: &[(String, Option<Vec<u8>>)],
    ) -> Result<(), String> {
        let (fence, _) = self
            .fence(shard)
            .ok_or_else(|| format!("not the leader of shard {shard}"))?;
        let txn = Txn::new().when(Self::fence_compares(&fence)).and_then(
            ops.iter()
                .map(|(k, v)| {
                    let key = format!("{}/{k}", self.prefix);
                    match v {
                        Some(v) => TxnOp::put(key, v.clone(), None),
                        None => TxnOp::delete(key, None),
                    }
                })
                .collect::<Vec<_>>(),
        );
        let mut c = self.client.clone();
        let resp = rpc(self.rpc_timeout, "fenced publish", c.txn(txn)).await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(format!(
                "deposed as leader of shard {shard}: nothing published"
            ))
        }
    }

    /// The lease intents and claims are written on: the current one, or
    /// a new one (TTL [`RECORD_TTL`]) once it is [`RECORD_LEASE_ROTATE`]
    /// old.
    async fn record_lease(&self) -> Result<i64, FenceError> {
        if let Some((id, at)) = *lock(&self.record_lease) {
            if at.elapsed() < RECORD_LEASE_ROTATE {
                return Ok(id);
            }
        }
        let mut c = self.client.clone();
        let id = rpc(
            self.rpc_timeout,
            "lease grant",
            c.lease_grant(RECORD_TTL.as_secs() as i64, None),
        )
        .await
        .map_err(FenceError::Unavailable)?
        .id();
        *lock(&self.record_lease) = Some((id, Instant::now()));
        Ok(id)
    }

    /// The compares that make a transaction fenced: `fence`'s leader key
    /// still has its create revision and lease.
    fn fence_compares(fence: &Fence) -> Vec<Compare> {
        vec![
            Compare::create_revision(fence.leader_key.clone(), CompareOp::Equal, fence.revision),
            Compare::lease(fence.leader_key.clone(), CompareOp::Equal, fence.lease_id),
        ]
    }

    /// After a fenced transaction (whose `or_else` read the leader key)
    /// failed: when the leader key is no longer ours, steps down (saying
    /// `why`) and gives the error; `None` when only another compare
    /// failed (a race to retry).
    fn deposed_by(
        self: &Arc<Self>,
        shard: u32,
        fence: &Fence,
        resp: &etcd_client::TxnResponse,
        why: &str,
    ) -> Option<FenceError> {
        let still = resp.op_responses().into_iter().any(|op| match op {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == fence.revision),
            _ => false,
        });
        if still {
            return None;
        }
        self.step_down(shard, Some(fence.lease_id), why, true);
        Some(FenceError::Deposed {
            shard,
            holder: None,
        })
    }

    /// See [`Leadership::pin_incident`]: reads the keys; the earliest
    /// written decides; none written: writes them all (each only if still
    /// absent) under `shard`'s fence, on the lease of intents (they go a
    /// day after the last write).
    async fn pin_incident(
        self: &Arc<Self>,
        shard: u32,
        keys: &[String],
    ) -> Result<u32, FenceError> {
        if keys.is_empty() {
            return Ok(shard);
        }
        let full: Vec<String> = keys
            .iter()
            .map(|k| format!("{}/{k}", self.prefix))
            .collect();
        let mut c = self.client.clone();
        for _ in 0..3 {
            let read = Txn::new().and_then(
                full.iter()
                    .map(|k| TxnOp::get(k.clone(), None))
                    .collect::<Vec<_>>(),
            );
            let resp = rpc(self.rpc_timeout, "incident pins", c.txn(read))
                .await
                .map_err(FenceError::Unavailable)?;
            let first = resp
                .op_responses()
                .into_iter()
                .filter_map(|op| match op {
                    TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| {
                        let s = std::str::from_utf8(kv.value())
                            .ok()?
                            .trim()
                            .parse::<u32>()
                            .ok()?;
                        Some((kv.create_revision(), s))
                    }),
                    _ => None,
                })
                .min();
            if let Some((_, pinned)) = first {
                return Ok(pinned);
            }
            let (fence, _) = self.fence(shard).ok_or(FenceError::NotLeader { shard })?;
            let lease = self.record_lease().await?;
            let lk = fence.leader_key.clone();
            let mut when = Self::fence_compares(&fence);
            when.extend(
                full.iter()
                    .map(|k| Compare::version(k.clone(), CompareOp::Equal, 0)),
            );
            let puts: Vec<TxnOp> = full
                .iter()
                .map(|k| {
                    TxnOp::put(
                        k.clone(),
                        shard.to_string(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            let txn = Txn::new()
                .when(when)
                .and_then(puts)
                .or_else([TxnOp::get(lk, None)]);
            let resp = rpc(self.rpc_timeout, "pin incident", c.txn(txn))
                .await
                .map_err(FenceError::Unavailable)?;
            if resp.succeeded() {
                return Ok(shard);
            }
            if let Some(e) = self.deposed_by(
                shard,
                &fence,
                &resp,
                "deposed: pinning an incident found the leader key changed",
            ) {
                return Err(e);
            }
            // Another leader pinned one of them first: read again.
        }
        Err(FenceError::Unavailable(
            "the incident's pin kept changing".into(),
        ))
    }

    /// See [`Leadership::reserve_budget`]: the slots are
    /// `{prefix}/budget-slots/{k}` for `k < max`, each put on a lease of
    /// TTL `window` in one transaction that also compares the shard's
    /// leader key (so only its leader reserves).
    async fn reserve_budget(
        self: &Arc<Self>,
        shard: u32,
        n: u32,
        max: u32,
        window: Duration,
        holder: &str,
    ) -> Result<Budget, FenceError> {
        if n == 0 {
            return Ok(Budget::Reserved { lease: 0 });
        }
        if n > max {
            return Ok(Budget::Full { frees_in: window });
        }
        let slots = format!("{}/budget-slots/", self.prefix);
        let mut c = self.client.clone();
        for _ in 0..3 {
            let (fence, _) = self.fence(shard).ok_or(FenceError::NotLeader { shard })?;
            let taken = rpc(
                self.rpc_timeout,
                "budget slots",
                c.get(
                    slots.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            )
            .await
            .map_err(FenceError::Unavailable)?;
            let used: BTreeSet<u32> = taken
                .kvs()
                .iter()
                .filter_map(|kv| {
                    kv.key_str()
                        .ok()?
                        .strip_prefix(slots.as_str())?
                        .parse()
                        .ok()
                })
                .collect();
            let free: Vec<u32> = (0..max)
                .filter(|k| !used.contains(k))
                .take(n as usize)
                .collect();
            if free.len() < n as usize {
                // When the earliest of the taken slots' leases ends.
                let leases: BTreeSet<i64> = taken
                    .kvs()
                    .iter()
                    .map(|kv| kv.lease())
                    .filter(|l| *l != 0)
                    .take(32)
                    .collect();
                let mut frees_in = window;
                for lease in leases {
                    if let Ok(t) = rpc(
                        self.rpc_timeout,
                        "lease ttl",
                        c.lease_time_to_live(lease, None),
                    )
                    .await
                    {
                        frees_in = frees_in.min(Duration::from_secs(t.ttl().max(1) as u64));
                    }
                }
                return Ok(Budget::Full { frees_in });
            }
            let lease = rpc(
                self.rpc_timeout,
                "lease grant",
                c.lease_grant(window.as_secs().max(1) as i64, None),
            )
            .await
            .map_err(FenceError::Unavailable)?
            .id();
            let lk = fence.leader_key.clone();
            let mut when = Self::fence_compares(&fence);
            let mut puts = Vec::new();
            for k in &free {
                let key = format!("{slots}{k}");
                when.push(Compare::version(key.clone(), CompareOp::Equal, 0));
                puts.push(TxnOp::put(
                    key,
                    holder.to_string(),
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
            let txn = Txn::new()
                .when(when)
                .and_then(puts)
                .or_else([TxnOp::get(lk, None)]);
            let resp = match rpc(self.rpc_timeout, "reserve budget", c.txn(txn)).await {
                Ok(r) => r,
                Err(e) => {
                    self.revoke_later(lease);
                    return Err(FenceError::Unavailable(e));
                }
            };
            if resp.succeeded() {
                if self.fence(shard).is_none() {
                    self.revoke_later(lease);
                    return Err(FenceError::NotLeader { shard });
                }
                return Ok(Budget::Reserved { lease });
            }
            self.revoke_later(lease);
            // Deposed, or another leader took a slot first (try again).
            if let Some(e) = self.deposed_by(
                shard,
                &fence,
                &resp,
                "deposed: a budget reservation found the leader key changed",
            ) {
                return Err(e);
            }
        }
        // Lost the race for free slots three times: full for now.
        Ok(Budget::Full {
            frees_in: Duration::from_secs(1),
        })
    }

    /// Tries to become the leader of `shard`. `Ok(false)`: someone else
    /// holds it.
    async fn campaign(self: &Arc<Self>, shard: u32) -> Result<bool, String> {
        let key = self.leader_key(shard);
        let mut c = self.client.clone();
        let sent = Instant::now();
        let grant = rpc(
            self.rpc_timeout,
            "lease grant",
            c.lease_grant(self.ttl.as_secs() as i64, None),
        )
        .await?;
        let lease = grant.id();
        let granted = Duration::from_secs(grant.ttl().max(0) as u64);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = match rpc(self.rpc_timeout, "campaign", c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke_later(lease);
                return Err(e);
            }
        };
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        if !resp.succeeded() {
            self.revoke_later(lease);
            for op in resp.op_responses() {
                if let TxnOpResponse::Get(g) = op {
                    if let Some(kv) = g.kvs().first() {
                        let holder = Holder {
                            name: String::from_utf8_lossy(kv.value()).into_owned(),
                            create_revision: kv.create_revision(),
                        };
                        lock(&self.seen).set_shard(shard, Some(holder), kv.mod_revision());
                    }
                }
            }
            return Ok(false);
        }
        let (keeper, stream) = match rpc(
            self.rpc_timeout,
            "lease keep-alive",
            c.lease_keep_alive(lease),
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                // Revoking deletes the key we just created.
                self.revoke_later(lease);
                return Err(e);
            }
        };
        let valid_until = sent + granted.saturating_sub(self.margin);
        let fence = Fence {
            shard,
            lease_id: lease,
            leader_key: key,
            revision: rev,
        };
        let task = tokio::spawn(keep(
            self.clone(),
            shard,
            lease,
            keeper,
            stream,
            valid_until,
        ));
        let handle = task.abort_handle();
        lock(&self.leads).insert(
            shard,
            Lead {
                fence,
                valid_until,
                keeper: Some(handle.clone()),
            },
        );
        self.track(handle);
        lock(&self.seen).set_shard(
            shard,
            Some(Holder {
                name: self.name.clone(),
                create_revision: rev,
            }),
            rev,
        );
        self.metrics.set(shard, true);
        tracing::info!(shard, revision = rev, lease, "leading shard");
        self.publish();
        Ok(true)
    }

    fn revoke_later(self: &Arc<Self>, lease: i64) {
        let me = self.clone();
        tokio::spawn(async move { me.revoke(lease).await });
    }

    /// One round of the election: release the surplus, campaign for the
    /// vacant shards this replica should take.
    async fn reconcile(self: &Arc<Self>) -> Result<(), String> {
        self.expire_leads();
        if self.stopping() {
            return Ok(());
        }
        let mine: BTreeSet<u32> = lock(&self.leads).keys().copied().collect();
        let now = Instant::now();
        let (members, counts, vacant) = {
            let seen = lock(&self.seen);
            let mut members: BTreeSet<String> = seen.members.keys().cloned().collect();
            members.insert(self.name.clone());
            let mut counts: BTreeMap<String, u32> = BTreeMap::new();
            let mut vacant = Vec::new();
            for s in 0..self.shards {
                if mine.contains(&s) {
                    continue;
                }
                match seen.shards.get(&s) {
                    Some(ShardSeen {
                        holder: Some(h), ..
                    }) => *counts.entry(h.name.clone()).or_default() += 1,
                    Some(x) => vacant.push((s, now.saturating_duration_since(x.vacant_since))),
                    // Never seen: vacant since the view was loaded.
                    None => vacant.push((s, Duration::ZERO)),
                }
            }
            (members, counts, vacant)
        };
        let m = members.len().max(1) as u32;
        let share = self.shards.div_ceil(m);
        let mut held = mine.len() as u32;
        let someone_short = members
            .iter()
            .any(|n| *n != self.name && counts.get(n).copied().unwrap_or(0) < share);
        if held > share && someone_short {
            for s in mine.iter().rev().take((held - share) as usize) {
                self.step_down(
                    *s,
                    None,
                    "rebalancing: more than this replica's share",
                    true,
                );
            }
            return Ok(());
        }
        // Start at a different shard on each replica to avoid contention.
        let offset = mapek_actors::leadership::shard_of(&self.name, self.shards);
        let mut vacant = vacant;
        vacant.sort_by_key(|(s, _)| (s + self.shards - offset) % self.shards);
        for (s, for_how_long) in vacant {
            if self.stopping() {
                break;
            }
            let go = if held < share {
                for_how_long >= LOAD_DELAY * held
            } else {
                for_how_long >= TAKEOVER_GRACE
            };
            if go && self.campaign(s).await? {
                held += 1;
            }
        }
        self.publish();
        Ok(())
    }

    /// Registers this replica under a fresh membership lease, kept alive
    /// by a task; returns the lease and the task's handle (which ends with
    /// the reason when the lease is lost).
    async fn register(self: &Arc<Self>) -> Result<(i64, tokio::task::JoinHandle<String>), String> {
        let mut c = self.client.clone();
        let grant = rpc(
            self.rpc_timeout,
            "lease grant",
            c.lease_grant(self.ttl.as_secs() as i64, None),
        )
        .await?;
        let lease = grant.id();
        let value = serde_json::to_vec(&self.record).map_err(|e| e.to_string())?;
        let put = rpc(
            self.rpc_timeout,
            "register",
            c.put(
                self.member_key(&self.name),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await;
        if let Err(e) = put {
            self.revoke_later(lease);
            return Err(e);
        }
        let (mut keeper, mut stream) = match rpc(
            self.rpc_timeout,
            "lease keep-alive",
            c.lease_keep_alive(lease),
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                self.revoke_later(lease);
                return Err(e);
            }
        };
        *lock(&self.member_lease) = Some(lease);
        let ttl = self.ttl;
        let limit = self.rpc_timeout;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                let r = tokio::time::timeout(limit, async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await;
                match r {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => return "the membership lease expired".to_string(),
                    Ok(Ok(None)) => return "the membership keep-alive stream closed".to_string(),
                    Ok(Err(e)) => return format!("membership keep-alive: {e}"),
                    Err(_) => return format!("membership keep-alive: no answer within {limit:?}"),
                }
            }
        });
        self.track(task.abort_handle());
        Ok((lease, task))
    }

    /// One connected session: register, load the view, then follow the
    /// watch and campaign until something fails (the error) or the
    /// replica stops (`Ok`).
    async fn session(self: &Arc<Self>, healthy: &mut bool) -> Result<(), String> {
        let (member_lease, mut member_task) = self.register().await?;
        let result = self.follow(&mut member_task, healthy).await;
        member_task.abort();
        if result.is_err() {
            lock(&self.member_lease).take();
            self.revoke_later(member_lease);
        }
        result
    }

    async fn follow(
        self: &Arc<Self>,
        member_task: &mut tokio::task::JoinHandle<String>,
        healthy: &mut bool,
    ) -> Result<(), String> {
        let mut c = self.client.clone();
        // Only the election's keys: `members/` up to and with `shards/`
        // (the replicated knowledge, intents and onsets sort before
        // `members/` and never reach this watch).
        let root = format!("{}/members/", self.prefix);
        let end = format!("{}/shards0", self.prefix);
        let resp = rpc(
            self.rpc_timeout,
            "get",
            c.get(
                root.clone(),
                Some(GetOptions::new().with_range(end.clone())),
            ),
        )
        .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        {
            let mut seen = lock(&self.seen);
            seen.members.clear();
            let now = Instant::now();
            for s in 0..self.shards {
                let e = seen.shards.entry(s).or_insert(ShardSeen {
                    holder: None,
                    rev: 0,
                    vacant_since: now,
                });
                if e.holder.is_some() {
                    e.vacant_since = now;
                }
                e.holder = None;
                e.rev = 0;
            }
        }
        let mut stale = Vec::new();
        for kv in resp.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            if let KeyKind::Leader(s) = self.kind_of(key) {
                // A leader key in our name that we do not hold is left
                // from an earlier run of this replica: release it.
                let ours = lock(&self.leads).get(&s).map(|l| l.fence.lease_id);
                if kv.value() == self.name.as_bytes() && ours != Some(kv.lease()) {
                    stale.push(kv.lease());
                }
            }
            self.apply(key, Some(kv), kv.mod_revision())?;
        }
        // A lead whose key is gone or was re-created while the session was
        // down has ended (an operator may have deleted the key while the
        // lease lived on).
        let lost: Vec<(u32, i64)> = {
            let leads = lock(&self.leads);
            let seen = lock(&self.seen);
            leads
                .iter()
                .filter(|(s, l)| {
                    seen.shards
                        .get(s)
                        .and_then(|x| x.holder.as_ref())
                        .is_none_or(|h| h.create_revision != l.fence.revision)
                })
                .map(|(s, l)| (*s, l.fence.lease_id))
                .collect()
        };
        for (s, lease) in lost {
            self.step_down(s, Some(lease), "the leader key is gone", true);
        }
        for lease in stale {
            tracing::info!(
                lease,
                "revoking a leader lease left by an earlier run of this replica"
            );
            self.revoke(lease).await;
        }
        let mut watch = rpc(
            self.rpc_timeout,
            "watch",
            c.watch(
                root,
                Some(
                    WatchOptions::new()
                        .with_range(end)
                        .with_start_revision(rev + 1),
                ),
            ),
        )
        .await?;
        self.set_etcd_error(None);
        *healthy = true;
        tracing::info!(name = %self.name, "cluster: registered and watching");
        self.reconcile().await?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = watch.message() => {
                    let resp = match m {
                        Ok(Some(r)) => r,
                        Ok(None) => return Err("the watch stream closed".into()),
                        Err(e) => return Err(format!("watch: {e}")),
                    };
                    if resp.canceled() {
                        return Err(format!("the watch was cancelled: {} (compacted at {})", resp.cancel_reason(), resp.compact_revision()));
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let Ok(key) = kv.key_str() else { continue };
                        match ev.event_type() {
                            EventType::Put => self.apply(key, Some(kv), kv.mod_revision())?,
                            EventType::Delete => self.apply(key, None, kv.mod_revision())?,
                        }
                    }
                }
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
                r = &mut *member_task => {
                    return Err(r.unwrap_or_else(|e| format!("membership keep-alive task: {e}")));
                }
            }
            if self.stopping() {
                return Ok(());
            }
            self.reconcile().await?;
        }
    }
}

/// Keeps the lease of a led shard alive every third of the TTL; ends the
/// lead on the first failure, or at the deadline.
async fn keep(
    inner: Arc<Inner>,
    shard: u32,
    lease: i64,
    mut keeper: LeaseKeeper,
    mut stream: LeaseKeepAliveStream,
    mut valid_until: Instant,
) {
    let period = inner.ttl / 3;
    let mut next = Instant::now() + period;
    loop {
        tokio::time::sleep_until(next.min(valid_until)).await;
        if Instant::now() >= valid_until {
            return inner.step_down(
                shard,
                Some(lease),
                "the lease was not renewed in time",
                true,
            );
        }
        let sent = Instant::now();
        let r = tokio::time::timeout_at(valid_until, async {
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        let reason = match r {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                valid_until =
                    sent + Duration::from_secs(resp.ttl() as u64).saturating_sub(inner.margin);
                let mut leads = lock(&inner.leads);
                match leads.get_mut(&shard) {
                    Some(l) if l.fence.lease_id == lease => l.valid_until = valid_until,
                    _ => return,
                }
                next = sent + period;
                continue;
            }
            Ok(Ok(Some(_))) => "the lease expired at etcd".to_string(),
            Ok(Ok(None)) => "the keep-alive stream closed".to_string(),
            Ok(Err(e)) => format!("keep-alive failed: {e}"),
            Err(_) => "keep-alive not answered before the lease could expire".to_string(),
        };
        return inner.step_down(shard, Some(lease), &reason, true);
    }
}

/// Runs sessions until the replica stops, backing off after failures.
async fn drive(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(200);
    let max_backoff = (inner.ttl / 2).max(Duration::from_secs(1));
    loop {
        let mut healthy = false;
        let r = inner.session(&mut healthy).await;
        if inner.stopping() {
            return;
        }
        if healthy {
            backoff = Duration::from_millis(200);
        }
        let e = match r {
            Ok(()) => return,
            Err(e) => e,
        };
        tracing::warn!(error = %e, retry_in = ?backoff, "cluster: etcd session failed");
        inner.set_etcd_error(Some(e));
        inner.wake.notify_one();
        // Leads keep running on their own keep-alives (and end at their
        // deadline); the view is reloaded by the next session.
        tokio::time::sleep(backoff).await;
        inner.expire_leads();
        backoff = (backoff * 2).min(max_backoff);
    }
}

impl Leadership for Cluster {
    fn name(&self) -> &str {
        Cluster::name(self)
    }

    fn shards(&self) -> u32 {
        Cluster::shards(self)
    }

    fn is_leader(&self, shard: u32) -> bool {
        Cluster::is_leader(self, shard)
    }

    fn fence(&self, shard: u32) -> Option<Fence> {
        Cluster::fence(self, shard)
    }

    fn reserve_budget<'a>(
        &'a self,
        shard: u32,
        n: u32,
        max: u32,
        window: Duration,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<Budget, FenceError>> {
        Box::pin(self.inner.reserve_budget(shard, n, max, window, holder))
    }

    fn pin_incident<'a>(
        &'a self,
        shard: u32,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<u32, FenceError>> {
        Box::pin(self.inner.pin_incident(shard, keys))
    }

    fn release_budget(&self, lease: i64) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.inner.revoke(lease).await })
    }

    fn address_of(&self, member: &str) -> Option<String> {
        lock(&self.inner.seen)
            .members
            .get(member)
            .map(|m| m.api.clone())
    }

    fn fenced_put<'a>(
        &'a self,
        shard: u32,
        key: &'a str,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<FencedWrite, FenceError>> {
        Box::pin(Cluster::fenced_put(self, shard, key, value))
    }

    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, FenceError>> {
        Box::pin(Cluster::read(self, key))
    }

    fn subscribe(&self) -> watch::Receiver<LeadershipView> {
        Cluster::subscribe(self)
    }

    fn view(&self) -> LeadershipView {
        Cluster::view(self)
    }
}
