//! The admission queue: the single gate every approved policy passes
//! before the Executor runs it, as a plain value tested without a runtime.
//!
//! Policies wait in one queue served by severity (critical first), then
//! age (older first). A policy is admitted when an execution slot is free
//! (at most `max_concurrent` policies acting at once; a verification
//! window holds no slot) and none of its components is held by a running
//! remedy or cooling down after one. A blocked policy does not block the
//! ones behind it that touch other components. Later guards (rate limits,
//! budgets, pause) plug in here as further gates.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::messages::ChainTrace;
use crate::model::{RemediationPolicy, Severity};
use crate::plan::safety::Gate;
use crate::ports::EscalationKind;

/// A policy waiting for admission.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The approved policy.
    pub policy: RemediationPolicy,
    /// Its chain.
    pub chain: ChainTrace,
    /// When it entered the queue.
    pub since: Instant,
}

/// What one admission pass decided.
#[derive(Debug, Default)]
pub struct Pass {
    /// Policies admitted (now holding their components and a slot).
    pub admitted: Vec<Queued>,
    /// Policies a guard holds: (incident, guard, reason).
    pub held: Vec<(String, &'static str, String)>,
    /// Policies a guard refused for good, removed from the queue.
    pub escalated: Vec<(Queued, &'static str, EscalationKind, String)>,
}

type QueueKey = (Reverse<Severity>, chrono::DateTime<chrono::Utc>, u64);

/// A component held by a running remedy.
#[derive(Debug, Clone)]
struct Hold {
    policy_id: String,
    lease_until: Instant,
}

/// The admission queue with its holds and slots.
#[derive(Debug)]
pub struct Admission {
    max_concurrent: usize,
    lease: Duration,
    queue: BTreeMap<QueueKey, Queued>,
    /// Queued policies per incident (an O(1) `has_queued`).
    by_incident: HashMap<String, usize>,
    seq: u64,
    slots: HashSet<String>,
    holds: HashMap<String, Hold>,
    cooldown: HashMap<String, Instant>,
}

/// Components a policy acts on (its scope, or its actions' targets).
pub fn scope_of(p: &RemediationPolicy) -> Vec<String> {
    if p.scope.is_empty() {
        let mut t: Vec<String> = p.actions.iter().map(|a| a.target.clone()).collect();
        t.sort();
        t.dedup();
        t
    } else {
        p.scope.clone()
    }
}

impl Admission {
    /// At most `max_concurrent` policies acting at once; a hold whose
    /// execution never reports back ends after `lease`.
    pub fn new(max_concurrent: usize, lease: Duration) -> Self {
        Admission {
            max_concurrent: max_concurrent.max(1),
            lease,
            queue: BTreeMap::new(),
            by_incident: HashMap::new(),
            seq: 0,
            slots: HashSet::new(),
            holds: HashMap::new(),
            cooldown: HashMap::new(),
        }
    }

    /// Policies waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Slots in use.
    pub fn running(&self) -> usize {
        self.slots.len()
    }

    /// Puts an approved policy in the queue (severity of its incident).
    pub fn enqueue(&mut self, policy: RemediationPolicy, chain: ChainTrace, severity: Severity) {
        self.seq += 1;
        let key = (Reverse(severity), policy.created_at, self.seq);
        *self
            .by_incident
            .entry(policy.incident_id.clone().unwrap_or_default())
            .or_default() += 1;
        self.queue.insert(
            key,
            Queued {
                policy,
                chain,
                since: Instant::now(),
            },
        );
    }

    /// Removes the queued policies of an incident (closed or merged).
    pub fn withdraw(&mut self, incident_id: &str) -> Vec<RemediationPolicy> {
        if !self.has_queued(incident_id) {
            return Vec::new();
        }
        let keys: Vec<QueueKey> = self
            .queue
            .iter()
            .filter(|(_, q)| q.policy.incident_id.as_deref() == Some(incident_id))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.take(&k).map(|q| q.policy))
            .collect()
    }

    /// Removes one queued policy, keeping the per-incident index.
    fn take(&mut self, k: &QueueKey) -> Option<Queued> {
        let q = self.queue.remove(k)?;
        let id = q.policy.incident_id.clone().unwrap_or_default();
        if let Some(n) = self.by_incident.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.by_incident.remove(&id);
            }
        }
        Some(q)
    }

    /// Whether a policy of this incident waits in the queue.
    pub fn has_queued(&self, incident_id: &str) -> bool {
        self.by_incident.contains_key(incident_id)
    }

    fn expire(&mut self, now: Instant) {
        self.holds.retain(|component, h| {
            let live = now < h.lease_until;
            if !live {
                tracing::warn!(%component, policy = %h.policy_id, "execution never reported back; releasing the component");
            }
            live
        });
        let held: HashSet<&str> = self.holds.values().map(|h| h.policy_id.as_str()).collect();
        self.slots.retain(|p| held.contains(p.as_str()));
        self.cooldown.retain(|_, until| now < *until);
    }

    /// Why a policy with this scope cannot run now (a hold or a cooldown on
    /// one of its components), if it cannot.
    pub fn blocked(&mut self, scope: &[String], now: Instant) -> Option<String> {
        self.expire(now);
        scope.iter().find_map(|c| {
            if let Some(h) = self.holds.get(c) {
                Some(format!(
                    "a remedy ({}) is running on component `{c}`",
                    h.policy_id
                ))
            } else {
                self.cooldown.get(c).map(|until| {
                    format!(
                        "component `{c}` is cooling down for {} s after its last remedy",
                        until.saturating_duration_since(now).as_secs()
                    )
                })
            }
        })
    }

    /// Admits every policy that may run now, in queue order: a free slot,
    /// and no component held or cooling down. Each admitted policy holds
    /// its components and a slot.
    pub fn admit(&mut self, now: Instant) -> Vec<Queued> {
        self.admit_with(now, |_| Gate::Admit).admitted
    }

    /// [`admit`](Self::admit) with the safety guards as a further gate:
    /// `gate` is asked, in queue order, about each policy that a slot and
    /// its components would let run (it may record its decision on the
    /// policy). A held policy stays queued and does not block the ones
    /// behind it; an escalated one leaves the queue.
    pub fn admit_with(
        &mut self,
        now: Instant,
        mut gate: impl FnMut(&mut RemediationPolicy) -> Gate,
    ) -> Pass {
        self.expire(now);
        let mut pass = Pass::default();
        let mut taken: Vec<QueueKey> = Vec::new();
        let mut refused: Vec<(QueueKey, &'static str, EscalationKind, String)> = Vec::new();
        let mut claimed: HashSet<String> = HashSet::new();
        for (k, q) in self.queue.iter_mut() {
            if self.slots.len() + taken.len() >= self.max_concurrent {
                break;
            }
            let scope = scope_of(&q.policy);
            let clash = scope.iter().any(|c| {
                self.holds.contains_key(c) || self.cooldown.contains_key(c) || claimed.contains(c)
            });
            if clash {
                continue;
            }
            match gate(&mut q.policy) {
                Gate::Admit => {
                    claimed.extend(scope);
                    taken.push(*k);
                }
                Gate::Hold(guard, why) => {
                    let incident = q.policy.incident_id.clone().unwrap_or_default();
                    pass.held.push((incident, guard, why));
                }
                Gate::Escalate(guard, kind, why) => refused.push((*k, guard, kind, why)),
            }
        }
        for (k, guard, kind, why) in refused {
            if let Some(q) = self.take(&k) {
                pass.escalated.push((q, guard, kind, why));
            }
        }
        for k in taken {
            if let Some(q) = self.take(&k) {
                let until = now + self.lease;
                for c in scope_of(&q.policy) {
                    self.holds.insert(
                        c,
                        Hold {
                            policy_id: q.policy.id.clone(),
                            lease_until: until,
                        },
                    );
                }
                self.slots.insert(q.policy.id.clone());
                pass.admitted.push(q);
            }
        }
        pass
    }

    /// Removes and returns the policies that waited `timeout` or longer.
    pub fn overdue(&mut self, now: Instant, timeout: Duration) -> Vec<Queued> {
        let keys: Vec<QueueKey> = self
            .queue
            .iter()
            .filter(|(_, q)| q.since + timeout <= now)
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter().filter_map(|k| self.take(&k)).collect()
    }

    /// When the oldest queued policy entered the queue.
    pub fn oldest(&self) -> Option<Instant> {
        self.queue.values().map(|q| q.since).min()
    }

    /// The queued policies, in queue order.
    pub fn queued_policies(&self) -> impl Iterator<Item = &Queued> {
        self.queue.values()
    }

    /// Restarts every queued policy's wait (after a pause: time paused does
    /// not count towards the queue timeout).
    pub fn restart_waits(&mut self, now: Instant) {
        for q in self.queue.values_mut() {
            q.since = now;
        }
    }

    /// Whether a running policy still holds its slot or components.
    pub fn is_live(&mut self, policy_id: &str) -> bool {
        self.expire(Instant::now());
        self.slots.contains(policy_id) || self.holds.values().any(|h| h.policy_id == policy_id)
    }

    /// The policy's actions are over: its slot is free (its components stay
    /// held until it is verified).
    pub fn actions_done(&mut self, policy_id: &str) -> bool {
        self.slots.remove(policy_id)
    }

    /// The policy was verified: its components are released and cool down
    /// for `cooldown`; its slot is free if it still held one.
    pub fn finished(&mut self, policy: &RemediationPolicy, now: Instant, cooldown: Duration) {
        self.slots.remove(&policy.id);
        for c in scope_of(policy) {
            if self.holds.get(&c).is_some_and(|h| h.policy_id == policy.id) {
                self.holds.remove(&c);
            }
            if !cooldown.is_zero() {
                self.cooldown.insert(c, now + cooldown);
            }
        }
    }

    /// The earliest moment a block (a cooldown or a hold's lease) ends
    /// while policies wait: when admission must be tried again even if
    /// nothing else happens.
    pub fn next_wakeup(&self) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        self.cooldown
            .values()
            .copied()
            .chain(self.holds.values().map(|h| h.lease_until))
            .min()
    }

    /// Holds a component until `until` (a cooldown restored at start).
    pub fn hold_until(&mut self, component: &str, until: Instant) {
        self.cooldown.insert(component.to_string(), until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ApprovalStatus, Priority, RiskLevel, RootCause};

    fn policy(id: &str, scope: &[&str], created: i64) -> RemediationPolicy {
        RemediationPolicy {
            id: id.into(),
            chain_id: "c".into(),
            analysis_id: "a".into(),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000 + created, 0)
                .unwrap_or_default(),
            root_cause: RootCause::SystemInstability,
            root_cause_confidence: 0.8,
            actions: Vec::new(),
            expected_impact: String::new(),
            risk_level: RiskLevel::Low,
            priority: Priority::High,
            cost_estimate: 0.1,
            benefit_estimate: 0.5,
            score: 0.4,
            approval_status: ApprovalStatus::Approved,
            decisions: Vec::new(),
            violations_at_planning: 3,
            scope: scope.iter().map(|s| s.to_string()).collect(),
            incident_id: Some(format!("inc-{id}")),
            attempt: 0,
            guards: Vec::new(),
            autonomy: None,
            candidates: Vec::new(),
            shard: None,
        }
    }

    fn chain() -> ChainTrace {
        ChainTrace::start(chrono::Utc::now())
    }

    fn ids(q: &[Queued]) -> Vec<String> {
        q.iter().map(|q| q.policy.id.clone()).collect()
    }

    #[test]
    fn slots_bound_concurrency_and_verification_frees_them() {
        let now = Instant::now();
        let mut a = Admission::new(2, Duration::from_secs(600));
        for (i, c) in ["a", "b", "c"].iter().enumerate() {
            a.enqueue(policy(c, &[c], i as i64), chain(), Severity::Warning);
        }
        assert_eq!(ids(&a.admit(now)), vec!["a", "b"]);
        assert!(a.admit(now).is_empty(), "no slot left");
        // a's actions are over: its verification holds no slot.
        assert!(a.actions_done("a"));
        assert_eq!(ids(&a.admit(now)), vec!["c"]);
        assert_eq!(a.running(), 2);
    }

    #[test]
    fn shared_component_never_runs_twice_and_does_not_block_others() {
        let now = Instant::now();
        let mut a = Admission::new(8, Duration::from_secs(600));
        a.enqueue(policy("p1", &["db"], 0), chain(), Severity::Critical);
        a.enqueue(policy("p2", &["db", "api"], 1), chain(), Severity::Critical);
        a.enqueue(policy("p3", &["web"], 2), chain(), Severity::Warning);
        assert_eq!(ids(&a.admit(now)), vec!["p1", "p3"]);
        assert!(a.blocked(&["db".into()], now).is_some());
        a.actions_done("p1");
        assert!(a.admit(now).is_empty(), "db still held while p1 verifies");
        a.finished(&policy("p1", &["db"], 0), now, Duration::from_secs(30));
        assert!(a.admit(now).is_empty(), "db cools down");
        let later = now + Duration::from_secs(31);
        assert_eq!(ids(&a.admit(later)), vec!["p2"]);
    }

    #[test]
    fn served_by_severity_then_age() {
        let now = Instant::now();
        let mut a = Admission::new(1, Duration::from_secs(600));
        a.enqueue(policy("old-warn", &["a"], 0), chain(), Severity::Warning);
        a.enqueue(policy("new-crit", &["b"], 5), chain(), Severity::Critical);
        a.enqueue(policy("old-crit", &["c"], 1), chain(), Severity::Critical);
        let mut order = Vec::new();
        for _ in 0..3 {
            let got = a.admit(now);
            assert_eq!(got.len(), 1);
            a.actions_done(&got[0].policy.id);
            order.push(got[0].policy.id.clone());
        }
        assert_eq!(order, vec!["old-crit", "new-crit", "old-warn"]);
    }

    #[test]
    fn a_lost_execution_releases_its_hold_after_the_lease() {
        let now = Instant::now();
        let mut a = Admission::new(1, Duration::from_secs(10));
        a.enqueue(policy("p1", &["a"], 0), chain(), Severity::Warning);
        a.enqueue(policy("p2", &["a"], 1), chain(), Severity::Warning);
        assert_eq!(ids(&a.admit(now)), vec!["p1"]);
        assert!(a.admit(now + Duration::from_secs(9)).is_empty());
        assert_eq!(ids(&a.admit(now + Duration::from_secs(11))), vec!["p2"]);
    }

    #[test]
    fn withdraw_removes_an_incidents_queued_policies() {
        let mut a = Admission::new(1, Duration::from_secs(10));
        a.enqueue(policy("p1", &["a"], 0), chain(), Severity::Warning);
        assert!(a.has_queued("inc-p1"));
        assert_eq!(a.withdraw("inc-p1").len(), 1);
        assert!(!a.has_queued("inc-p1"));
        assert_eq!(a.queued(), 0);
    }
}
