//! The Monitor's logic: the set of active violations, keyed by
//! fingerprint, remembering which source reported each (plain code, tested
//! without a runtime).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::model::{Timestamp, Violation};

/// What applying a batch changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Violations not active before.
    pub new: usize,
    /// Violations already active.
    pub duplicates: usize,
    /// Fingerprints that ended.
    pub resolved: Vec<String>,
    /// The violations that were not active before (shared with the active
    /// set, not copied).
    pub added: Vec<Arc<Violation>>,
}

/// The active violations, keyed by fingerprint, remembering which source
/// reported each. Every operation is linear in the batch (plus the source's
/// active set for complete batches), never in the history.
#[derive(Debug, Default, Clone)]
pub struct ActiveViolations {
    pub(crate) by_fingerprint: HashMap<String, Arc<Violation>>,
    pub(crate) by_source: HashMap<String, HashSet<String>>,
}

impl ActiveViolations {
    /// Applies a batch from `source`. Re-observed violations keep their
    /// onset (`first_seen`) and take the new value and labels; `resolved`
    /// fingerprints end; for a `complete` batch every active violation of
    /// the source that is not in the batch ends as well.
    pub fn apply(
        &mut self,
        source: &str,
        batch: &[Violation],
        resolved: &[String],
        complete: bool,
    ) -> Applied {
        let mut out = Applied::default();
        let mut seen: HashSet<&str> = HashSet::with_capacity(batch.len());
        for v in batch {
            seen.insert(v.fingerprint.as_str());
            match self.by_fingerprint.get_mut(&v.fingerprint) {
                Some(existing) => {
                    // A re-sent duplicate changes nothing the loop acts on:
                    // keep the record (and its onset), refresh only when
                    // the newer observation differs.
                    if existing.observed_at < v.observed_at || existing.value != v.value {
                        let first_seen = existing.first_seen.min(v.first_seen);
                        let mut fresh = v.clone();
                        fresh.first_seen = first_seen;
                        *existing = Arc::new(fresh);
                    }
                    out.duplicates += 1;
                }
                None => {
                    let shared = Arc::new(v.clone());
                    self.by_fingerprint
                        .insert(v.fingerprint.clone(), shared.clone());
                    out.added.push(shared);
                    out.new += 1;
                }
            }
            self.by_source
                .entry(source.to_string())
                .or_default()
                .insert(v.fingerprint.clone());
        }
        for fp in resolved {
            if !seen.contains(fp.as_str()) && self.remove(source, fp) {
                out.resolved.push(fp.clone());
            }
        }
        if complete {
            let gone: Vec<String> = self
                .by_source
                .get(source)
                .map(|set| {
                    set.iter()
                        .filter(|fp| !seen.contains(fp.as_str()))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            for fp in gone {
                if self.remove(source, &fp) {
                    out.resolved.push(fp);
                }
            }
        }
        out
    }

    fn remove(&mut self, source: &str, fp: &str) -> bool {
        if let Some(set) = self.by_source.get_mut(source) {
            set.remove(fp);
            if set.capacity() > 4096 && set.len() < set.capacity() / 8 {
                set.shrink_to_fit();
            }
        }
        let removed = self.by_fingerprint.remove(fp).is_some();
        let cap = self.by_fingerprint.capacity();
        if cap > 4096 && self.by_fingerprint.len() < cap / 8 {
            // Give memory back once most alerts have resolved (amortised).
            self.by_fingerprint.shrink_to_fit();
        }
        removed
    }

    /// Ends the violations of sources not in `polled` (webhook sources)
    /// last observed before `cutoff`; returns their fingerprints. Linear in
    /// the active violations.
    pub fn expire_unpolled(&mut self, polled: &HashSet<String>, cutoff: Timestamp) -> Vec<String> {
        let mut gone = Vec::new();
        for (source, set) in self.by_source.iter_mut() {
            if polled.contains(source) {
                continue;
            }
            set.retain(|fp| {
                let stale = self
                    .by_fingerprint
                    .get(fp)
                    .is_some_and(|v| v.observed_at < cutoff);
                if stale {
                    gone.push(fp.clone());
                }
                !stale
            });
        }
        for fp in &gone {
            self.by_fingerprint.remove(fp);
        }
        gone
    }

    /// The active violation with this fingerprint.
    pub fn get(&self, fingerprint: &str) -> Option<&Arc<Violation>> {
        self.by_fingerprint.get(fingerprint)
    }

    /// Every active violation, shared (for a full reconcile).
    pub fn shared(&self) -> Vec<Arc<Violation>> {
        self.by_fingerprint.values().cloned().collect()
    }

    /// Active violations, oldest onset first.
    pub fn snapshot(&self) -> Vec<Violation> {
        let mut v: Vec<Violation> = self
            .by_fingerprint
            .values()
            .map(|v| (**v).clone())
            .collect();
        v.sort_by(|a, b| {
            a.first_seen
                .cmp(&b.first_seen)
                .then_with(|| a.fingerprint.cmp(&b.fingerprint))
        });
        v
    }

    /// Number of active violations.
    pub fn len(&self) -> usize {
        self.by_fingerprint.len()
    }

    /// Whether none are active.
    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty()
    }

    /// Active violations of `source` on the components in `scope` (all
    /// components when empty).
    pub fn count_in_scope(&self, source: &str, scope: &[String]) -> usize {
        self.by_source
            .get(source)
            .map(|set| {
                set.iter()
                    .filter_map(|fp| self.by_fingerprint.get(fp))
                    .filter(|v| in_scope(v, scope))
                    .count()
            })
            .unwrap_or(0)
    }
}

/// Whether a violation is on one of the components (any, when empty).
pub fn in_scope(v: &Violation, scope: &[String]) -> bool {
    scope.is_empty() || scope.contains(&v.component)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Severity, Signal};

    fn v(fp: &str, t: i64) -> Violation {
        let at = chrono::DateTime::from_timestamp(t, 0).unwrap_or_default();
        Violation {
            id: format!("id-{fp}-{t}"),
            fingerprint: fp.into(),
            rule: "r".into(),
            severity: Severity::Warning,
            component: "c".into(),
            metric: "m".into(),
            value: 1.0,
            labels: Default::default(),
            signal: Signal::Latency,
            first_seen: at,
            observed_at: at,
            source: "s".into(),
        }
    }

    #[test]
    fn re_observation_keeps_onset_and_counts_duplicate() {
        let mut a = ActiveViolations::default();
        let r = a.apply("p", &[v("x", 10)], &[], true);
        assert_eq!((r.new, r.duplicates), (1, 0));
        let r = a.apply("p", &[v("x", 40)], &[], true);
        assert_eq!((r.new, r.duplicates), (0, 1));
        let snap = a.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].first_seen.timestamp(), 10);
        assert_eq!(snap[0].observed_at.timestamp(), 40);
    }

    #[test]
    fn complete_batch_resolves_missing_series_of_that_source_only() {
        let mut a = ActiveViolations::default();
        a.apply("p", &[v("x", 1), v("y", 1)], &[], true);
        a.apply("am", &[v("z", 1)], &[], false);
        let r = a.apply("p", &[v("y", 2)], &[], true);
        assert_eq!(r.resolved, vec!["x".to_string()]);
        assert_eq!(a.len(), 2, "z from another source stays");
    }

    #[test]
    fn webhook_resolution_ends_violation_once() {
        let mut a = ActiveViolations::default();
        a.apply("am", &[v("z", 1)], &[], false);
        let r = a.apply("am", &[], &["z".into()], false);
        assert_eq!(r.resolved.len(), 1);
        let r = a.apply("am", &[], &["z".into()], false);
        assert!(r.resolved.is_empty(), "a re-sent resolution counts once");
        assert!(a.is_empty());
    }

    #[test]
    fn webhook_violations_not_re_sent_expire_but_polled_ones_do_not() {
        let mut a = ActiveViolations::default();
        a.apply("p", &[v("x", 10)], &[], true);
        a.apply("am", &[v("old", 10), v("fresh", 100)], &[], false);
        let polled: HashSet<String> = ["p".to_string()].into();
        let cutoff = chrono::DateTime::from_timestamp(50, 0).unwrap_or_default();
        assert_eq!(a.expire_unpolled(&polled, cutoff), vec!["old".to_string()]);
        assert_eq!(a.len(), 2, "x (polled) and fresh stay");
        assert_eq!(a.count_in_scope("am", &[]), 1);
        let cutoff = chrono::DateTime::from_timestamp(100, 0).unwrap_or_default();
        assert!(
            a.expire_unpolled(&polled, cutoff).is_empty(),
            "observed exactly at the cutoff stays"
        );
    }
}
