//! Leadership and fencing: the port through which the loop asks whether
//! this replica may act for a shard, and records an intent so that only the
//! current leader can.
//!
//! The daemon implements [`Leadership`] with etcd (`mapek::cluster::Cluster`,
//! built with the `cluster` feature); a single process uses [`Solo`], which
//! always leads its one shard and needs no fence.
//!
//! How the Executor is meant to use it, before each effector call:
//!
//! 1. `let shard = leadership.shard_of(&root_component);`
//! 2. `leadership.fenced_put(shard, "intents/<incident>/<attempt>/<action>", intent)`:
//!    the write succeeds only while this replica still holds the shard's
//!    leader key (same create revision, same lease). An error means *do not
//!    call*: a deposed or paused leader calls nothing.
//! 3. The returned [`FencedWrite::fence`]'s `revision` is the fencing token
//!    to send with the call (a header): it only ever grows from one leader
//!    to the next, so a receiver can reject a lower token than the highest
//!    it has seen.
//!
//! [`Leadership::subscribe`] gives every change (leadership gained or lost,
//! members, etcd reachable or not) for the Planner and Executor to gate on;
//! [`Leadership::is_leader`] is the authoritative check at a given instant
//! (it also ends leadership locally when the lease could have expired,
//! even if no task ran to say so, e.g. after SIGSTOP).

use std::collections::{BTreeMap, BTreeSet};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::watch;

/// The fencing token of a shard's leadership: which lease holds the shard's
/// leader key, and the key's create revision. A new leader always creates
/// the key anew, so its `revision` is higher than any earlier leader's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fence {
    /// The shard.
    pub shard: u32,
    /// The etcd lease the leader key is attached to.
    pub lease_id: i64,
    /// The full etcd key of the shard's leader (`{prefix}/shards/{n}/leader`).
    pub leader_key: String,
    /// The leader key's create revision: the fencing token.
    pub revision: i64,
}

/// A write that succeeded under a fence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FencedWrite {
    /// The fence the write was checked against.
    pub fence: Fence,
    /// The etcd revision of the write.
    pub revision: i64,
}

/// Why a fenced operation was refused. Every variant means: this replica
/// must not act for the shard now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// This replica does not lead the shard (never did, stepped down, or
    /// its lease could have expired).
    #[error("not the leader of shard {shard}")]
    NotLeader {
        /// The shard.
        shard: u32,
    },
    /// The leader key changed under us: another replica leads the shard
    /// now (or nobody does). This replica has stepped down.
    #[error("deposed as leader of shard {shard}{}", holder.as_ref().map(|h| format!(" (now held by {h})")).unwrap_or_default())]
    Deposed {
        /// The shard.
        shard: u32,
        /// Who holds the leader key now, if anyone.
        holder: Option<String>,
    },
    /// No such shard.
    #[error("no shard {shard} (there are {shards})")]
    NoSuchShard {
        /// The shard asked for.
        shard: u32,
        /// How many there are.
        shards: u32,
    },
    /// The key is not one a caller may write (empty, or inside the
    /// election's own `shards/` and `members/` keys).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The coordination service could not be asked in time: whether the
    /// write happened is unknown, so the caller must not act.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
}

/// The answer to a disruption-budget reservation
/// ([`Leadership::reserve_budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Reserved; `lease` gives it back early ([`Leadership::release_budget`];
    /// 0: nothing to give back).
    Reserved {
        /// The reservation's lease.
        lease: i64,
    },
    /// Not enough free slots; the earliest frees in about this time.
    Full {
        /// Until a slot frees.
        frees_in: std::time::Duration,
    },
}

/// What a replica knows of the cluster at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeadershipView {
    /// This replica's name.
    pub name: String,
    /// Whether this is a cluster (false: a single process, which leads).
    pub clustered: bool,
    /// Number of shards.
    pub shards: u32,
    /// The shards this replica leads now.
    pub leading: BTreeSet<u32>,
    /// Every shard's leader as last seen in etcd (`None`: no leader).
    pub leaders: BTreeMap<u32, Option<String>>,
    /// The members (replicas registered in etcd), sorted, this one included.
    pub members: Vec<String>,
    /// Why etcd cannot be used right now; `None` while it answers.
    pub etcd_error: Option<String>,
}

impl LeadershipView {
    /// Whether this replica leads `shard` according to this view (for an
    /// authoritative check at the moment of acting, use
    /// [`Leadership::is_leader`]).
    pub fn leads(&self, shard: u32) -> bool {
        self.leading.contains(&shard)
    }

    /// Whether this replica leads at least one shard.
    pub fn leading_any(&self) -> bool {
        !self.leading.is_empty()
    }

    /// The leader of `shard`, if any is known.
    pub fn leader_of(&self, shard: u32) -> Option<&str> {
        self.leaders.get(&shard).and_then(|l| l.as_deref())
    }
}

/// Leadership of shards and fenced writes; see the module documentation.
pub trait Leadership: Send + Sync + 'static {
    /// This replica's name.
    fn name(&self) -> &str;

    /// Number of shards (at least 1).
    fn shards(&self) -> u32;

    /// The shard of a component ([`shard_of`]).
    fn shard_of(&self, component: &str) -> u32 {
        shard_of(component, self.shards())
    }

    /// Whether this replica leads `shard` now: it holds the leader key and
    /// its lease cannot have expired yet at etcd.
    fn is_leader(&self, shard: u32) -> bool;

    /// The fence of `shard` while this replica leads it.
    fn fence(&self, shard: u32) -> Option<Fence>;

    /// Writes `value` at `key` (relative to the cluster's prefix, such as
    /// `intents/inc-1/2/restart`) in one transaction that succeeds only
    /// while this replica still holds `shard`'s leader key with its
    /// lease. An error means the caller must not act.
    fn fenced_put<'a>(
        &'a self,
        shard: u32,
        key: &'a str,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<FencedWrite, FenceError>>;

    /// Reads the value at `key` (relative to the prefix); `None` when absent.
    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, FenceError>>;

    /// Every change of the view, starting with the current one.
    fn subscribe(&self) -> watch::Receiver<LeadershipView>;

    /// The current view.
    fn view(&self) -> LeadershipView {
        self.subscribe().borrow().clone()
    }

    /// Reserves `n` of the cluster's `max` disruption-budget slots for
    /// `window` (each slot is an etcd key on a lease of that TTL, so a
    /// reservation leaves the window by itself), in a transaction fenced
    /// on `shard`. [`Budget::Full`]: fewer than `n` slots are free (the
    /// budget is exhausted cluster-wide). Alone: always reserved (the
    /// Planner's own budget is the whole budget).
    fn reserve_budget<'a>(
        &'a self,
        _shard: u32,
        _n: u32,
        _max: u32,
        _window: std::time::Duration,
        _holder: &'a str,
    ) -> BoxFuture<'a, Result<Budget, FenceError>> {
        Box::pin(async { Ok(Budget::Reserved { lease: 0 }) })
    }

    /// Pins an incident to `shard` cluster-wide: `keys` (relative to the
    /// prefix, one per member fingerprint) name the incident; the first
    /// leader to act on it writes them (fenced on `shard`), and every
    /// later caller learns the shard it was pinned to, which is returned.
    /// Alone: `shard`.
    fn pin_incident<'a>(
        &'a self,
        shard: u32,
        _keys: &'a [String],
    ) -> BoxFuture<'a, Result<u32, FenceError>> {
        Box::pin(async move { Ok(shard) })
    }

    /// Gives back a reservation that was not used (nothing was sent).
    fn release_budget(&self, _lease: i64) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The `host:port` of a member's API, as it published it (`None`
    /// when unknown, and always alone).
    fn address_of(&self, _member: &str) -> Option<String> {
        None
    }
}

/// The component that decides a policy's shard: its incident's first
/// component (the root, where a cascade is remedied), else its first
/// action's target. The Planner (which holds policies of shards it does
/// not lead) and the Executor (which fences each call) agree on it.
pub fn policy_component(policy: &crate::model::RemediationPolicy) -> &str {
    policy
        .scope
        .first()
        .map(String::as_str)
        .or_else(|| policy.actions.first().map(|a| a.target.as_str()))
        .unwrap_or("")
}

/// The shard a policy belongs to: the one pinned on it (its incident's,
/// see [`crate::model::RemediationPolicy::shard`]), else that of its
/// component.
pub fn policy_shard(l: &dyn Leadership, policy: &crate::model::RemediationPolicy) -> u32 {
    policy
        .shard
        .filter(|s| *s < l.shards())
        .unwrap_or_else(|| l.shard_of(policy_component(policy)))
}

/// A shard of `policy` this replica does not lead now, if any: its pinned
/// shard, else (a policy planned alone, or before pinning) any shard its
/// actions' targets are in. `None`: this replica may act on it.
pub fn shard_not_led(l: &dyn Leadership, policy: &crate::model::RemediationPolicy) -> Option<u32> {
    match policy.shard.filter(|s| *s < l.shards()) {
        Some(s) => (!l.is_leader(s)).then_some(s),
        None => policy_components(policy)
            .into_iter()
            .map(|c| l.shard_of(c))
            .find(|s| !l.is_leader(*s)),
    }
}

/// The components whose shards a policy acts in: its actions' targets
/// (each action is fenced on its own target's shard), or the policy's
/// component when no action names one.
pub fn policy_components(policy: &crate::model::RemediationPolicy) -> Vec<&str> {
    let mut out: Vec<&str> = policy
        .actions
        .iter()
        .map(|a| a.target.as_str())
        .filter(|t| !t.is_empty())
        .collect();
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        out.push(policy_component(policy));
    }
    out
}

/// The shard of `component` among `shards`, by rendezvous (highest random
/// weight) hashing: every shard gets a weight `mix(fnv1a(component) ^
/// mix(shard))` and the highest wins. It depends only on the name and the
/// number of shards (stable across processes, versions and restarts), and
/// going from `n` to `n + 1` shards moves only about `1 / (n + 1)` of the
/// components (those whose new shard wins).
pub fn shard_of(component: &str, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    let h = fnv1a(component.as_bytes());
    let mut best = (0u64, 0u32);
    for s in 0..shards {
        let w = mix(h ^ mix(u64::from(s).wrapping_add(0x9e37_79b9_7f4a_7c15)));
        if s == 0 || w > best.0 {
            best = (w, s);
        }
    }
    best.1
}

/// A stable 64-bit hash of a name (FNV-1a), for etcd keys derived from
/// component names (which may hold any character).
pub fn name_hash(name: &str) -> u64 {
    fnv1a(name.as_bytes())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: spreads the bits of `x`.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A single process: one shard, always led by itself; fenced writes need
/// no fence and store nothing (there is no other replica to fence off).
pub struct Solo {
    name: String,
    tx: watch::Sender<LeadershipView>,
}

impl Solo {
    /// A single process named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        let view = LeadershipView {
            name: name.clone(),
            clustered: false,
            shards: 1,
            leading: BTreeSet::from([0]),
            leaders: BTreeMap::from([(0, Some(name.clone()))]),
            members: vec![name.clone()],
            etcd_error: None,
        };
        let (tx, _) = watch::channel(view);
        Solo { name, tx }
    }

    fn solo_fence(&self) -> Fence {
        Fence {
            shard: 0,
            lease_id: 0,
            leader_key: String::new(),
            revision: 0,
        }
    }
}

impl Leadership for Solo {
    fn name(&self) -> &str {
        &self.name
    }

    fn shards(&self) -> u32 {
        1
    }

    fn is_leader(&self, shard: u32) -> bool {
        shard == 0
    }

    fn fence(&self, shard: u32) -> Option<Fence> {
        (shard == 0).then(|| self.solo_fence())
    }

    fn fenced_put<'a>(
        &'a self,
        shard: u32,
        _key: &'a str,
        _value: Vec<u8>,
    ) -> BoxFuture<'a, Result<FencedWrite, FenceError>> {
        Box::pin(async move {
            if shard != 0 {
                return Err(FenceError::NoSuchShard { shard, shards: 1 });
            }
            Ok(FencedWrite {
                fence: self.solo_fence(),
                revision: 0,
            })
        })
    }

    fn read<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, FenceError>> {
        Box::pin(async { Ok(None) })
    }

    fn subscribe(&self) -> watch::Receiver<LeadershipView> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_is_stable_and_in_range() {
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(shard_of("anything", 0), 0);
        for n in 1..20u32 {
            for c in ["api", "db", "cache", "checkout-7"] {
                let s = shard_of(c, n);
                assert!(s < n);
                assert_eq!(s, shard_of(c, n), "deterministic");
            }
        }
        // Pinned values: a change of the hash moves every component's
        // shard across a rolling upgrade, so it must be deliberate.
        let pinned: Vec<u32> = ["api", "db", "cache", "web"]
            .iter()
            .map(|c| shard_of(c, 12))
            .collect();
        assert_eq!(pinned, PINNED_12);
    }

    const PINNED_12: [u32; 4] = [5, 7, 7, 0];

    #[test]
    fn shard_of_spreads_and_moves_little() {
        let names: Vec<String> = (0..12_000).map(|i| format!("component-{i}")).collect();
        let mut counts = [0usize; 12];
        for n in &names {
            counts[shard_of(n, 12) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
        // 12 -> 13 shards: only the components that now hash to shard 12
        // move (about 1/13), and none moves between old shards.
        let mut moved = 0;
        for n in &names {
            let (a, b) = (shard_of(n, 12), shard_of(n, 13));
            if a != b {
                assert_eq!(b, 12, "{n} moved between old shards");
                moved += 1;
            }
        }
        assert!((600..1300).contains(&moved), "moved {moved}");
    }

    #[tokio::test]
    async fn solo_always_leads_shard_zero() {
        let s = Solo::new("one");
        assert!(s.is_leader(0));
        assert!(!s.is_leader(1));
        assert_eq!(s.shard_of("x"), 0);
        assert!(s.fenced_put(0, "intents/a", vec![1]).await.is_ok());
        assert!(matches!(
            s.fenced_put(1, "intents/a", vec![1]).await,
            Err(FenceError::NoSuchShard { .. })
        ));
        let v = s.view();
        assert!(v.leading_any() && !v.clustered);
        assert_eq!(v.leader_of(0), Some("one"));
    }
}
