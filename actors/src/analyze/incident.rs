//! Incidents: the unit of work of the loop, kept incrementally.
//!
//! [`IncidentIndex`] holds the active violations (the Analyzer's window)
//! grouped into incidents, with each incident's detector state kept as
//! indexes that a change updates in `O(log k)` (k = the incident's size):
//! onsets per second in a `BTreeMap`, latency and failure onsets, counters
//! per signal, severity, source and component. Diagnosing an incident reads
//! those indexes; only the incidents a change touched are diagnosed again,
//! once per batch ([`IncidentIndex::diagnose_dirty`]).
//!
//! # Grouping
//! A violation joins the incident of its component; or, when its component
//! has none, the incident of a component joined to it by a direct edge of
//! the topology (either direction) that has a violation on that component
//! with an onset within `causal.max_lag_seconds` of its own. When both its
//! component's incident and such a neighbour's incident exist and differ,
//! they merge: the older incident (earlier first onset, then smaller id)
//! keeps its id and the other closes as `merged`. Incidents never split:
//! a violation that leaves does not regroup the rest (a later issue may add
//! splitting; a closed incident's components are free again).
//!
//! # Detectors, per incident
//! The four detectors of [`crate::analyze`] with the same settings, on the
//! incident's violations, with onsets compared at one-second resolution:
//! * temporal: the largest set of onsets within `temporal.window_seconds`
//!   (inclusive), found by one sweep of the incident's distinct onset
//!   seconds when a changed incident is diagnosed (not per insertion);
//! * spatial: per component, at least `spatial.min_violations`;
//! * causal: a failure/enforcement onset `0..=max_lag` after a latency onset
//!   (checked by one range lookup per insertion), or the bucket correlation
//!   of latency and failure onsets (recomputed only when those change);
//! * frequency: onsets no earlier than `now − frequency.window_seconds`.
//!
//! Root causes are ranked as in [`crate::analyze::rank_root_causes`], with
//! one addition: when an incident spans components linked by the topology
//! and a causal pattern has its latency at the upstream component and its
//! failures at dependents, the cascade is corroborated by the topology
//! ([`TOPOLOGY_CORROBORATION`] is added to its confidence) and every other
//! cause is one of its symptoms (weighted as a minor signal).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use chrono::TimeZone;

use crate::analyze::{cause_for_signal, overall_confidence, recommendation};
use crate::model::{
    incident_id, new_id, AnalysisResult, CloseReason, Pattern, PatternKind, RankedCause, RootCause,
    Severity, Signal, Timestamp, Violation,
};
use crate::settings::AnalyzeSettings;

/// Confidence added to a cascade that the topology corroborates (latency
/// upstream, failures downstream), capped at 0.95.
pub const TOPOLOGY_CORROBORATION: f64 = 0.15;

/// Fingerprints listed per pattern (the count is in the description).
pub const PATTERN_FINGERPRINTS_KEPT: usize = 20;

const MINOR_SIGNAL_WEIGHT: f64 = 0.8;
const SIGNALS: usize = 8;

fn signal_index(s: Signal) -> usize {
    match s {
        Signal::Latency => 0,
        Signal::Throughput => 1,
        Signal::Failure => 2,
        Signal::Policy => 3,
        Signal::Node => 4,
        Signal::Network => 5,
        Signal::Resource => 6,
        Signal::Other => 7,
    }
}

const SIGNAL_OF: [Signal; SIGNALS] = [
    Signal::Latency,
    Signal::Throughput,
    Signal::Failure,
    Signal::Policy,
    Signal::Node,
    Signal::Network,
    Signal::Resource,
    Signal::Other,
];

fn severity_index(s: Severity) -> usize {
    match s {
        Severity::Info => 0,
        Severity::Warning => 1,
        Severity::Critical => 2,
    }
}

const SEVERITY_OF: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

/// Interned name (component or source).
type Sym = u32;

#[derive(Debug, Default)]
struct Interner {
    map: HashMap<Arc<str>, Sym>,
    names: Vec<Arc<str>>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> Sym {
        if let Some(&k) = self.map.get(s) {
            return k;
        }
        let k = self.names.len() as Sym;
        let name: Arc<str> = Arc::from(s);
        self.names.push(name.clone());
        self.map.insert(name, k);
        k
    }

    fn name(&self, k: Sym) -> &str {
        self.names.get(k as usize).map(|s| &**s).unwrap_or("")
    }
}

/// Multiset of integer keys (seconds) with counts.
type Counts = BTreeMap<i64, u32>;

fn add(c: &mut Counts, k: i64) {
    *c.entry(k).or_default() += 1;
}

fn sub(c: &mut Counts, k: i64) {
    if let Some(n) = c.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            c.remove(&k);
        }
    }
}

fn any_in(c: &Counts, lo: i64, hi: i64) -> bool {
    lo <= hi && c.range(lo..=hi).next().is_some()
}

/// Largest count of keys within any `[s, s + width]` window among the
/// windows starting at keys in `[lo, hi]`; returns `(count, start)`.
fn best_window(c: &Counts, width: i64, lo: i64, hi: i64) -> Option<(u32, i64)> {
    if lo > hi {
        return None;
    }
    let keys: Vec<(i64, u32)> = c
        .range(lo..=hi.saturating_add(width))
        .map(|(k, n)| (*k, *n))
        .collect();
    let mut best: Option<(u32, i64)> = None;
    let (mut j, mut sum) = (0usize, 0u32);
    for i in 0..keys.len() {
        if keys[i].0 > hi {
            break;
        }
        if j < i {
            j = i;
            sum = 0;
        }
        while j < keys.len() && keys[j].0 - keys[i].0 <= width {
            sum += keys[j].1;
            j += 1;
        }
        if best.is_none_or(|(b, _)| sum > b) {
            best = Some((sum, keys[i].0));
        }
        sum -= keys[i].1;
    }
    best
}

#[derive(Debug)]
struct Member {
    violation: Arc<Violation>,
    component: Sym,
    source: Sym,
    onset_ms: i64,
    signal: Signal,
    severity: Severity,
    incident: u32,
}

impl Member {
    fn onset_s(&self) -> i64 {
        self.onset_ms.div_euclid(1000)
    }
}

#[derive(Debug, Default)]
struct ComponentAgg {
    count: u32,
    signals: [u32; SIGNALS],
    onsets: Counts,
    latency: u32,
    failure: u32,
}

/// How to fill in a pattern's fingerprints and description.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Temporal {
        lo: i64,
        hi: i64,
        count: u32,
        start: i64,
    },
    Spatial {
        k: Sym,
        n: u32,
    },
    Causal,
    Frequency {
        lo: i64,
        recent: u32,
    },
}

/// Cached result of a detector: `None` = must be computed again.
#[derive(Debug, Clone, Copy, Default)]
struct Burst {
    count: u32,
    start: i64,
}

/// Comparable summary of a diagnosis: a new analysis is recorded only when
/// this changes (not on a mere count).
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiagnosisKey {
    cause: Option<RootCause>,
    band: i64,
    components: Vec<String>,
    actionable: bool,
    no_evidence: bool,
}

#[derive(Debug)]
struct Agg {
    id: String,
    first_onset_ms: i64,
    members: BTreeSet<(i64, u32)>,
    components: BTreeMap<Sym, ComponentAgg>,
    onsets: Counts,
    latency: Counts,
    failure: Counts,
    signals: [u32; SIGNALS],
    severities: [u32; 3],
    sources: HashMap<Sym, u32>,
    burst: Option<Burst>,
    lagged: Option<bool>,
    correlation: Option<Option<(f64, u64)>>,
    last: Option<DiagnosisKey>,
    evicted: bool,
}

impl Agg {
    fn new(id: String, first_onset_ms: i64) -> Self {
        Agg {
            id,
            first_onset_ms,
            members: BTreeSet::new(),
            components: BTreeMap::new(),
            onsets: Counts::new(),
            latency: Counts::new(),
            failure: Counts::new(),
            signals: [0; SIGNALS],
            severities: [0; 3],
            sources: HashMap::new(),
            burst: Some(Burst::default()),
            lagged: Some(false),
            correlation: Some(None),
            last: None,
            evicted: false,
        }
    }

    fn len(&self) -> usize {
        self.members.len()
    }

    fn is_older_than(&self, other: &Agg) -> bool {
        (self.first_onset_ms, &self.id) < (other.first_onset_ms, &other.id)
    }
}

pub use crate::model::IncidentReport;

/// Result of adding a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A new member.
    New,
    /// Already held: nothing changed (a re-sent duplicate costs nothing).
    Duplicate,
}

/// The window of active violations grouped into incidents.
#[derive(Debug)]
pub struct IncidentIndex {
    settings: AnalyzeSettings,
    max_lag_s: i64,
    neighbours: HashMap<Sym, Vec<Sym>>,
    depends: HashSet<(Sym, Sym)>,
    components: Interner,
    sources: Interner,
    by_fingerprint: HashMap<Arc<str>, u32>,
    slots: Vec<Option<Member>>,
    free: Vec<u32>,
    by_onset: BTreeSet<(i64, u32)>,
    owner: HashMap<Sym, u32>,
    incidents: HashMap<u32, Agg>,
    next_key: u32,
    dirty: HashSet<u32>,
    closed: Vec<IncidentReport>,
    restored: HashMap<Arc<str>, String>,
    blind: HashSet<Sym>,
    dropped: u64,
    diagnosed_total: u64,
    full_report: bool,
    candidates: Vec<u32>,
    by_id: HashMap<String, u32>,
    onset_index: bool,
}

/// The report of an incident that closed.
fn closed_report(a: &Agg, reason: CloseReason, into: Option<String>) -> IncidentReport {
    IncidentReport {
        id: a.id.clone(),
        opened_at: ts(a.first_onset_ms),
        components: Vec::new(),
        root_component: None,
        severity: None,
        violation_count: 0,
        fingerprints: Vec::new(),
        analysis: None,
        diagnosis_changed: false,
        no_evidence: false,
        closed: Some((reason, into)),
    }
}

fn ts(ms: i64) -> Timestamp {
    chrono::Utc
        .timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
}

impl IncidentIndex {
    /// An empty index with these settings (window bound, detectors,
    /// topology, plan threshold).
    pub fn new(settings: &AnalyzeSettings) -> Self {
        let mut components = Interner::default();
        let mut neighbours: HashMap<Sym, Vec<Sym>> = HashMap::new();
        let mut depends = HashSet::new();
        for (from, tos) in &settings.topology {
            let a = components.intern(from);
            for to in tos {
                let b = components.intern(to);
                if a == b {
                    continue;
                }
                depends.insert((a, b));
                for (x, y) in [(a, b), (b, a)] {
                    let list = neighbours.entry(x).or_default();
                    if !list.contains(&y) {
                        list.push(y);
                    }
                }
            }
        }
        IncidentIndex {
            max_lag_s: i64::try_from(settings.causal.max_lag_seconds).unwrap_or(i64::MAX / 4),
            settings: settings.clone(),
            neighbours,
            depends,
            components,
            sources: Interner::default(),
            by_fingerprint: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_onset: BTreeSet::new(),
            owner: HashMap::new(),
            incidents: HashMap::new(),
            next_key: 0,
            dirty: HashSet::new(),
            closed: Vec::new(),
            restored: HashMap::new(),
            blind: HashSet::new(),
            dropped: 0,
            diagnosed_total: 0,
            full_report: false,
            candidates: Vec::new(),
            by_id: HashMap::new(),
            onset_index: false,
        }
    }

    /// Violations held.
    pub fn len(&self) -> usize {
        self.by_fingerprint.len()
    }

    /// Whether no violation is held.
    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty()
    }

    /// Open incidents.
    pub fn incident_count(&self) -> usize {
        self.incidents.len()
    }

    /// Violations dropped at the window's bound so far.
    pub fn dropped_total(&self) -> u64 {
        self.dropped
    }

    /// Incident diagnoses run so far (a test sees which changes caused work).
    pub fn diagnosed_total(&self) -> u64 {
        self.diagnosed_total
    }

    /// Whether this fingerprint is held.
    pub fn contains(&self, fingerprint: &str) -> bool {
        self.by_fingerprint.contains_key(fingerprint)
    }

    /// The incident holding this fingerprint.
    pub fn incident_of(&self, fingerprint: &str) -> Option<&str> {
        let slot = *self.by_fingerprint.get(fingerprint)?;
        let m = self.slots.get(slot as usize)?.as_ref()?;
        self.incidents.get(&m.incident).map(|a| a.id.as_str())
    }

    /// Every held violation (shared, not copied).
    pub fn violations(&self) -> impl Iterator<Item = &Arc<Violation>> + '_ {
        self.slots.iter().flatten().map(|m| &m.violation)
    }

    /// Remembers an incident restored from Knowledge: when one of these
    /// fingerprints arrives it joins that incident (same id), so ids
    /// survive a restart even where onsets do not (polled sources).
    pub fn restore(&mut self, id: &str, fingerprints: &[String]) {
        for fp in fingerprints {
            self.restored.insert(Arc::from(fp.as_str()), id.to_string());
        }
    }

    /// Ids of the open incidents (sent with a full report, so the Planner
    /// closes what the index no longer holds).
    pub fn open_ids(&self) -> Vec<String> {
        self.by_id.keys().cloned().collect()
    }

    /// Forgets the restored memberships that did not come back (called at
    /// the first full reconcile after a start).
    pub fn forget_restored(&mut self) -> usize {
        let n = self.restored.len();
        self.restored = HashMap::new();
        n
    }

    /// Marks a source as blind (no evidence) or seeing again; the
    /// incidents with violations from it report the change.
    pub fn set_blind(&mut self, source: &str, blind: bool) {
        let s = self.sources.intern(source);
        let changed = if blind {
            self.blind.insert(s)
        } else {
            self.blind.remove(&s)
        };
        if changed {
            let keys: Vec<u32> = self
                .incidents
                .iter()
                .filter(|(_, a)| a.sources.contains_key(&s))
                .map(|(k, _)| *k)
                .collect();
            self.dirty.extend(keys);
        }
    }

    /// Adds a violation (idempotent by fingerprint). `O(log n)` plus, for
    /// a merge, the size of the younger incident.
    pub fn insert(&mut self, v: Arc<Violation>) -> Added {
        if self.by_fingerprint.contains_key(v.fingerprint.as_str()) {
            return Added::Duplicate;
        }
        let bound = self.settings.max_window_violations.max(1);
        if !self.onset_index && self.by_fingerprint.len() + 1 >= bound / 2 {
            // The age index is kept only near the bound (built once here,
            // dropped again when the window empties below a quarter).
            self.by_onset = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, m)| m.as_ref().map(|m| (m.onset_ms, i as u32)))
                .collect();
            self.onset_index = true;
        }
        while self.by_fingerprint.len() >= bound {
            let Some(&(_, slot)) = self.by_onset.first() else {
                break;
            };
            if let Some(m) = self.slots.get(slot as usize).and_then(|m| m.as_ref()) {
                let fp = m.violation.fingerprint.clone();
                let key = m.incident;
                tracing::warn!(fingerprint = %fp, bound = self.settings.max_window_violations,
                    "analysis window full: dropping the violation with the oldest onset");
                if let Some(a) = self.incidents.get_mut(&key) {
                    a.evicted = true;
                }
                self.remove(&fp);
                self.dropped += 1;
            } else {
                self.by_onset.pop_first();
            }
        }
        let component = self.components.intern(v.component.as_str());
        let source = self.sources.intern(v.source.as_str());
        let onset_ms = v.first_seen.timestamp_millis();
        let onset_s = onset_ms.div_euclid(1000);
        let fp: Arc<str> = Arc::from(v.fingerprint.as_str());

        // Which incident: a restored one, the component's, and joinable
        // neighbours' (merged into the oldest).
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        if let Some(id) = self.restored.remove(&fp) {
            if let Some(&k) = self.by_id.get(&id) {
                candidates.push(k);
            } else {
                let key = self.new_incident(id, onset_ms);
                candidates.push(key);
            }
        }
        if let Some(&k) = self.owner.get(&component) {
            if !candidates.contains(&k) {
                candidates.push(k);
            }
        }
        if let Some(ns) = self.neighbours.get(&component) {
            for n in ns {
                if let Some(&k) = self.owner.get(n) {
                    let near = self.incidents.get(&k).is_some_and(|a| {
                        a.components.get(n).is_some_and(|c| {
                            any_in(
                                &c.onsets,
                                onset_s.saturating_sub(self.max_lag_s),
                                onset_s.saturating_add(self.max_lag_s),
                            )
                        })
                    });
                    if near && !candidates.contains(&k) {
                        candidates.push(k);
                    }
                }
            }
        }
        let key = match candidates.len() {
            0 => {
                let id = incident_id(&v.fingerprint, v.first_seen);
                self.new_incident(id, onset_ms)
            }
            _ => {
                let mut survivor = candidates[0];
                for &k in &candidates[1..] {
                    survivor = self.merge(survivor, k);
                }
                survivor
            }
        };
        self.candidates = candidates;
        self.owner.entry(component).or_insert(key);

        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let member = Member {
            signal: v.signal,
            severity: v.severity,
            violation: v,
            component,
            source,
            onset_ms,
            incident: key,
        };
        self.attach(key, slot, &member);
        if self.onset_index {
            self.by_onset.insert((onset_ms, slot));
        }
        self.by_fingerprint.insert(fp, slot);
        self.slots[slot as usize] = Some(member);
        self.dirty.insert(key);
        Added::New
    }

    fn new_incident(&mut self, id: String, onset_ms: i64) -> u32 {
        let key = self.next_key;
        self.next_key = self.next_key.wrapping_add(1);
        self.by_id.insert(id.clone(), key);
        self.incidents.insert(key, Agg::new(id, onset_ms));
        key
    }

    /// Adds a member's contribution to an incident's indexes.
    fn attach(&mut self, key: u32, slot: u32, m: &Member) {
        let lag = self.max_lag_s;
        let linked = self.neighbours.contains_key(&m.component);
        let Some(a) = self.incidents.get_mut(&key) else {
            return;
        };
        let t = m.onset_s();
        a.members.insert((m.onset_ms, slot));
        a.first_onset_ms = a.first_onset_ms.min(m.onset_ms);
        add(&mut a.onsets, t);
        let si = signal_index(m.signal);
        a.signals[si] += 1;
        a.severities[severity_index(m.severity)] += 1;
        *a.sources.entry(m.source).or_default() += 1;
        let c = a.components.entry(m.component).or_default();
        c.count += 1;
        c.signals[si] += 1;
        // Onsets per component serve the topology (joins, the upstream
        // component): kept only for components that have neighbours.
        if linked {
            add(&mut c.onsets, t);
        }
        match m.signal {
            Signal::Latency => {
                c.latency += 1;
                add(&mut a.latency, t);
                if a.lagged == Some(false) && any_in(&a.failure, t, t.saturating_add(lag)) {
                    a.lagged = Some(true);
                }
                a.correlation = None;
            }
            Signal::Failure | Signal::Policy => {
                c.failure += 1;
                add(&mut a.failure, t);
                if a.lagged == Some(false) && any_in(&a.latency, t.saturating_sub(lag), t) {
                    a.lagged = Some(true);
                }
                a.correlation = None;
            }
            _ => {}
        }
        // The largest burst is found again at the next diagnosis (one sweep
        // of the incident's onset seconds), not on every insertion.
        a.burst = None;
    }

    /// Removes a member's contribution from an incident's indexes.
    fn detach(&mut self, key: u32, slot: u32, m: &Member) {
        let linked = self.neighbours.contains_key(&m.component);
        let width = i64::try_from(self.settings.temporal.window_seconds).unwrap_or(i64::MAX / 4);
        let Some(a) = self.incidents.get_mut(&key) else {
            return;
        };
        let t = m.onset_s();
        a.members.remove(&(m.onset_ms, slot));
        sub(&mut a.onsets, t);
        let si = signal_index(m.signal);
        a.signals[si] = a.signals[si].saturating_sub(1);
        let sev = severity_index(m.severity);
        a.severities[sev] = a.severities[sev].saturating_sub(1);
        if let Some(n) = a.sources.get_mut(&m.source) {
            *n -= 1;
            if *n == 0 {
                a.sources.remove(&m.source);
            }
        }
        let mut component_empty = false;
        if let Some(c) = a.components.get_mut(&m.component) {
            c.count = c.count.saturating_sub(1);
            c.signals[si] = c.signals[si].saturating_sub(1);
            if linked {
                sub(&mut c.onsets, t);
            }
            match m.signal {
                Signal::Latency => c.latency = c.latency.saturating_sub(1),
                Signal::Failure | Signal::Policy => c.failure = c.failure.saturating_sub(1),
                _ => {}
            }
            component_empty = c.count == 0;
        }
        if component_empty {
            a.components.remove(&m.component);
        }
        match m.signal {
            Signal::Latency => {
                sub(&mut a.latency, t);
                if a.lagged == Some(true) {
                    a.lagged = None;
                }
                a.correlation = None;
            }
            Signal::Failure | Signal::Policy => {
                sub(&mut a.failure, t);
                if a.lagged == Some(true) {
                    a.lagged = None;
                }
                a.correlation = None;
            }
            _ => {}
        }
        if let Some(b) = a.burst {
            if t >= b.start && t <= b.start.saturating_add(width) {
                a.burst = None;
            }
        }
        if component_empty && self.owner.get(&m.component) == Some(&key) {
            self.owner.remove(&m.component);
        }
    }

    /// Merges two incidents; the older keeps its id. Returns the survivor.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == b {
            return a;
        }
        let (Some(x), Some(y)) = (self.incidents.get(&a), self.incidents.get(&b)) else {
            return a;
        };
        let (keep, gone) = if x.is_older_than(y) { (a, b) } else { (b, a) };
        let Some(old) = self.incidents.remove(&gone) else {
            return keep;
        };
        self.by_id.remove(&old.id);
        for (_, slot) in &old.members {
            if let Some(m) = self.slots.get_mut(*slot as usize).and_then(|m| m.take()) {
                let mut m = m;
                m.incident = keep;
                self.attach(keep, *slot, &m);
                self.slots[*slot as usize] = Some(m);
            }
        }
        for c in old.components.keys() {
            if self.owner.get(c) == Some(&gone) {
                self.owner.insert(*c, keep);
            }
        }
        let keep_id = self
            .incidents
            .get(&keep)
            .map(|k| k.id.clone())
            .unwrap_or_default();
        tracing::info!(incident = %old.id, into = %keep_id, "incidents merged");
        self.dirty.remove(&gone);
        self.dirty.insert(keep);
        self.closed
            .push(closed_report(&old, CloseReason::Merged, Some(keep_id)));
        keep
    }

    /// Removes a violation (resolved); returns whether it was held.
    /// `O(log n)`.
    pub fn remove(&mut self, fingerprint: &str) -> bool {
        let Some(slot) = self.by_fingerprint.remove(fingerprint) else {
            return false;
        };
        let Some(m) = self.slots.get_mut(slot as usize).and_then(|m| m.take()) else {
            return false;
        };
        if self.onset_index {
            self.by_onset.remove(&(m.onset_ms, slot));
            if self.by_fingerprint.len() < self.settings.max_window_violations / 4 {
                self.by_onset = BTreeSet::new();
                self.onset_index = false;
            }
        }
        self.free.push(slot);
        self.shrink_if_sparse();
        let key = m.incident;
        self.detach(key, slot, &m);
        let empty = self.incidents.get(&key).is_some_and(|a| a.len() == 0);
        if empty {
            if let Some(a) = self.incidents.remove(&key) {
                self.by_id.remove(&a.id);
                self.dirty.remove(&key);
                let reason = if a.evicted {
                    CloseReason::Expired
                } else {
                    CloseReason::ResolvedWithoutAction
                };
                self.closed.push(closed_report(&a, reason, None));
            }
        } else {
            self.dirty.insert(key);
        }
        true
    }

    /// Gives memory back once most of the window has emptied (amortised
    /// O(1): at most once per halving).
    fn shrink_if_sparse(&mut self) {
        let cap = self.by_fingerprint.capacity();
        if cap > 4096 && self.by_fingerprint.len() < cap / 8 {
            self.by_fingerprint.shrink_to_fit();
            if self.by_fingerprint.is_empty() {
                self.slots = Vec::new();
                self.free = Vec::new();
            }
        }
    }

    fn fingerprints_of(&self, a: &Agg, limit: usize) -> Vec<String> {
        a.members
            .iter()
            .take(limit)
            .filter_map(|(_, s)| self.slots.get(*s as usize)?.as_ref())
            .map(|m| m.violation.fingerprint.clone())
            .collect()
    }

    /// Fingerprints of members with onsets from `from_ms` matching `keep`,
    /// by onset, at most `limit` (scanning at most `4 × limit` members).
    fn sample(
        &self,
        a: &Agg,
        limit: usize,
        from_ms: i64,
        keep: impl Fn(&Member) -> bool,
    ) -> Vec<String> {
        a.members
            .range((from_ms, 0)..)
            .take(limit.saturating_mul(4).max(limit))
            .filter_map(|(_, s)| self.slots.get(*s as usize)?.as_ref())
            .filter(|m| keep(m))
            .take(limit)
            .map(|m| m.violation.fingerprint.clone())
            .collect()
    }

    /// The upstream component of an incident: one that another of its
    /// components depends on and that depends on none of them (earliest
    /// onset first); else the one with the most violations.
    fn root_of(&self, a: &Agg) -> Option<Sym> {
        let comps: Vec<Sym> = a.components.keys().copied().collect();
        if comps.len() > 1 {
            let upstream = comps
                .iter()
                .copied()
                .filter(|&c| {
                    comps.iter().any(|&d| self.depends.contains(&(d, c)))
                        && !comps.iter().any(|&d| self.depends.contains(&(c, d)))
                })
                .min_by_key(|c| {
                    a.components
                        .get(c)
                        .and_then(|x| x.onsets.keys().next().copied())
                        .unwrap_or(i64::MAX)
                });
            if upstream.is_some() {
                return upstream;
            }
        }
        a.components
            .iter()
            .max_by(|x, y| {
                x.1.count
                    .cmp(&y.1.count)
                    .then_with(|| self.components.name(*y.0).cmp(self.components.name(*x.0)))
            })
            .map(|(c, _)| *c)
    }

    fn ensure_caches(&mut self, key: u32) {
        let width = i64::try_from(self.settings.temporal.window_seconds).unwrap_or(i64::MAX / 4);
        let lag = self.max_lag_s;
        let bucket = self.settings.causal.bucket_seconds;
        let Some(a) = self.incidents.get_mut(&key) else {
            return;
        };
        if a.burst.is_none() {
            let (lo, hi) = match (a.onsets.keys().next(), a.onsets.keys().next_back()) {
                (Some(l), Some(h)) => (*l, *h),
                _ => (0, -1),
            };
            let (count, start) = best_window(&a.onsets, width, lo, hi).unwrap_or((0, 0));
            a.burst = Some(Burst { count, start });
        }
        if a.lagged.is_none() {
            let found = a.failure.keys().any(|&f| {
                a.latency
                    .range(..=f)
                    .next_back()
                    .is_some_and(|(l, _)| f - l <= lag)
            });
            a.lagged = Some(found);
        }
        // The correlation matters only when the lagged criterion does not
        // already fire (it would only add to the description).
        if a.correlation.is_none() && a.lagged == Some(false) {
            a.correlation = Some(correlation(&a.onsets, &a.latency, &a.failure, bucket));
        }
    }

    /// Diagnoses every incident touched since the last call (once each) and
    /// returns the reports of those whose diagnosis changed, plus the
    /// incidents closed or merged meanwhile. `refresh` adds a report (no
    /// analysis) for every touched incident whose diagnosis did not change,
    /// so counts stay current.
    pub fn diagnose_dirty(
        &mut self,
        now: Timestamp,
        chain_id: &str,
        refresh: bool,
    ) -> Vec<IncidentReport> {
        let mut out = std::mem::take(&mut self.closed);
        let mut keys: Vec<u32> = self.dirty.drain().collect();
        keys.sort_unstable();
        for key in keys {
            if let Some(r) = self.diagnose(key, now, chain_id, refresh) {
                out.push(r);
            }
        }
        out
    }

    /// Diagnoses every open incident (a full reconcile) and reports all,
    /// each with its diagnosis (recorded only where it changed).
    pub fn diagnose_all(&mut self, now: Timestamp, chain_id: &str) -> Vec<IncidentReport> {
        let mut out = std::mem::take(&mut self.closed);
        self.dirty.clear();
        let mut keys: Vec<u32> = self.incidents.keys().copied().collect();
        keys.sort_unstable();
        self.full_report = true;
        for key in keys {
            if let Some(r) = self.diagnose(key, now, chain_id, true) {
                out.push(r);
            }
        }
        self.full_report = false;
        out
    }

    fn diagnose(
        &mut self,
        key: u32,
        now: Timestamp,
        chain_id: &str,
        always: bool,
    ) -> Option<IncidentReport> {
        let always_analysis = self.full_report;
        self.ensure_caches(key);
        self.diagnosed_total += 1;
        let s = &self.settings;
        let a = self.incidents.get(&key)?;
        let root = self.root_of(a);
        let single: Option<String> = (a.components.len() == 1)
            .then(|| {
                a.components
                    .keys()
                    .next()
                    .map(|c| self.components.name(*c).to_string())
            })
            .flatten();
        let mut patterns: Vec<Pattern> = Vec::new();
        // Signal counts behind each pattern (for ranking).
        let mut behind: Vec<[u32; SIGNALS]> = Vec::new();
        // How to list each pattern's fingerprints and describe it, done
        // only when the diagnosis is reported in full.
        let mut fills: Vec<Fill> = Vec::new();

        let width = i64::try_from(s.temporal.window_seconds).unwrap_or(i64::MAX / 4);
        if let Some(b) = a.burst {
            if b.count as usize >= s.temporal.min_violations.max(1) {
                let (lo, hi) = (b.start * 1000, (b.start.saturating_add(width) + 1) * 1000);
                patterns.push(Pattern {
                    kind: PatternKind::Temporal,
                    confidence: s.temporal.confidence,
                    component: single.clone(),
                    violations: Vec::new(),
                    description: String::new(),
                });
                fills.push(Fill::Temporal {
                    lo,
                    hi,
                    count: b.count,
                    start: b.start,
                });
                behind.push(a.signals);
            }
        }
        let mut spatial: Vec<(&str, Sym, u32)> = a
            .components
            .iter()
            .filter(|(_, c)| c.count as usize >= s.spatial.min_violations.max(1))
            .map(|(k, c)| (self.components.name(*k), *k, c.count))
            .collect();
        spatial.sort_by(|x, y| y.2.cmp(&x.2).then_with(|| x.0.cmp(y.0)));
        for (name, k, n) in spatial {
            patterns.push(Pattern {
                kind: PatternKind::Spatial,
                confidence: s.spatial.confidence,
                component: Some(name.to_string()),
                violations: Vec::new(),
                description: String::new(),
            });
            fills.push(Fill::Spatial { k, n });
            behind.push(
                a.components
                    .get(&k)
                    .map(|c| c.signals)
                    .unwrap_or([0; SIGNALS]),
            );
        }
        let corr = a
            .correlation
            .flatten()
            .filter(|(r, _)| *r >= s.causal.min_correlation);
        let lagged = a.lagged == Some(true);
        let mut corroborated = false;
        if lagged || corr.is_some() {
            let mut criteria = Vec::new();
            if let Some((r, n)) = corr {
                criteria.push(format!(
                    "correlation {r:.2} ≥ {:.2} of latency and failure onsets over {n} buckets of {} s",
                    s.causal.min_correlation, s.causal.bucket_seconds
                ));
            }
            if lagged {
                criteria.push(format!(
                    "a failure onset follows a latency onset within {} s",
                    s.causal.max_lag_seconds
                ));
            }
            // Corroborated by the topology: latency at the upstream
            // component, failures at components that depend on it.
            if let Some(r) = root {
                let upstream_latency = a.components.get(&r).is_some_and(|c| c.latency > 0);
                let downstream_failure = a
                    .components
                    .iter()
                    .any(|(k, c)| *k != r && c.failure > 0 && self.depends.contains(&(*k, r)));
                corroborated = upstream_latency && downstream_failure;
                if corroborated {
                    criteria.push(format!(
                        "latency at upstream `{}` and failures at components depending on it",
                        self.components.name(r)
                    ));
                }
            }
            patterns.push(Pattern {
                kind: PatternKind::Causal,
                confidence: s.causal.confidence,
                component: if corroborated {
                    root.map(|r| self.components.name(r).to_string())
                } else {
                    single.clone()
                },
                violations: Vec::new(),
                description: format!(
                    "latency violations followed by failure/enforcement violations: {}",
                    criteria.join("; ")
                ),
            });
            fills.push(Fill::Causal);
            behind.push([0; SIGNALS]);
        }
        let fwin = i64::try_from(s.frequency.window_seconds).unwrap_or(i64::MAX / 4);
        let cutoff = now.timestamp().saturating_sub(fwin);
        let recent: u32 = a.onsets.range(cutoff..).map(|(_, n)| *n).sum();
        if recent as usize >= s.frequency.min_violations.max(1) {
            let lo = cutoff * 1000;
            patterns.push(Pattern {
                kind: PatternKind::Frequency,
                confidence: s.frequency.confidence,
                component: single.clone(),
                violations: Vec::new(),
                description: String::new(),
            });
            fills.push(Fill::Frequency { lo, recent });
            behind.push(a.signals);
        }

        // Rank causes (as analyze::rank_root_causes, from the counters).
        let mut best: HashMap<RootCause, f64> = HashMap::new();
        let mut raise = |cause: RootCause, c: f64| {
            let slot = best.entry(cause).or_insert(c);
            if c > *slot {
                *slot = c;
            }
        };
        for (p, counts) in patterns.iter().zip(&behind) {
            if p.kind == PatternKind::Causal {
                let c = if corroborated {
                    (p.confidence + TOPOLOGY_CORROBORATION).min(0.95)
                } else {
                    p.confidence
                };
                raise(RootCause::CascadeFailure, c);
                continue;
            }
            let top = counts.iter().copied().max().unwrap_or(0);
            for (i, n) in counts.iter().enumerate() {
                if *n == 0 {
                    continue;
                }
                let w = if *n == top { 1.0 } else { MINOR_SIGNAL_WEIGHT };
                raise(cause_for_signal(SIGNAL_OF[i]), p.confidence * w);
            }
        }
        let causal = patterns.iter().any(|p| p.kind == PatternKind::Causal);
        if causal {
            if let Some(c) = best.get_mut(&RootCause::SystemInstability) {
                *c *= MINOR_SIGNAL_WEIGHT;
            }
        }
        // Components per cause, most violations first (ties by name).
        let comp_list = |cause: RootCause| -> Vec<String> {
            if cause == RootCause::CascadeFailure {
                let mut v: Vec<String> = Vec::new();
                if let Some(r) = root {
                    v.push(self.components.name(r).to_string());
                }
                for k in a.components.keys() {
                    let n = self.components.name(*k).to_string();
                    if !v.contains(&n) {
                        v.push(n);
                    }
                }
                return v;
            }
            let mut v: Vec<(&str, u32)> = a
                .components
                .iter()
                .map(|(k, c)| {
                    let n: u32 = (0..SIGNALS)
                        .filter(|i| cause_for_signal(SIGNAL_OF[*i]) == cause)
                        .map(|i| c.signals[i])
                        .sum();
                    (self.components.name(*k), n)
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            v.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(y.0)));
            v.into_iter().map(|(k, _)| k.to_string()).collect()
        };
        let mut ranked: Vec<RankedCause> = best
            .into_iter()
            .map(|(cause, confidence)| RankedCause {
                cause,
                confidence,
                components: comp_list(cause),
            })
            .collect();
        if corroborated {
            // The cascade explains the latency upstream and the failures
            // downstream: every other cause is one of its symptoms.
            for rc in ranked.iter_mut() {
                if rc.cause != RootCause::CascadeFailure {
                    rc.confidence *= MINOR_SIGNAL_WEIGHT;
                }
            }
        }
        ranked.sort_by(|x, y| {
            y.confidence
                .total_cmp(&x.confidence)
                .then_with(|| x.cause.precedence().cmp(&y.cause.precedence()))
        });
        let count = a.len();
        let no_evidence = a.sources.keys().any(|s| self.blind.contains(s));
        let components: Vec<String> = {
            let mut v: Vec<String> = a
                .components
                .keys()
                .map(|k| self.components.name(*k).to_string())
                .collect();
            v.sort();
            v
        };
        let top = ranked.first();
        let diag_key = DiagnosisKey {
            cause: top.map(|r| r.cause),
            band: top
                .map(|r| (r.confidence * 10.0).floor() as i64)
                .unwrap_or(-1),
            // The set, not the order: a count that reorders the
            // components is not a new diagnosis.
            components: top
                .map(|r| {
                    let mut c = r.components.clone();
                    c.sort();
                    c
                })
                .unwrap_or_default(),
            actionable: count >= s.plan_threshold,
            no_evidence,
        };
        let changed = a.last.as_ref() != Some(&diag_key);
        if !changed && !always {
            return None;
        }
        let severity = (0..3)
            .rev()
            .find(|i| a.severities[*i] > 0)
            .map(|i| SEVERITY_OF[i]);
        let detail = changed || always_analysis;
        if detail {
            for (p, f) in patterns.iter_mut().zip(&fills) {
                match *f {
                    Fill::Temporal {
                        lo,
                        hi,
                        count,
                        start,
                    } => {
                        p.violations =
                            self.sample(a, PATTERN_FINGERPRINTS_KEPT, lo, |m| m.onset_ms < hi);
                        p.description = format!(
                            "burst of {count} violations with onsets within {} s from {}",
                            s.temporal.window_seconds,
                            ts(start * 1000).to_rfc3339()
                        );
                    }
                    Fill::Spatial { k, n } => {
                        p.violations = self
                            .sample(a, PATTERN_FINGERPRINTS_KEPT, i64::MIN, |m| m.component == k);
                        p.description = format!(
                            "{n} distinct violations on component `{}`",
                            self.components.name(k)
                        );
                    }
                    Fill::Causal => {
                        p.violations = self.sample(a, PATTERN_FINGERPRINTS_KEPT, i64::MIN, |m| {
                            matches!(m.signal, Signal::Latency | Signal::Failure | Signal::Policy)
                        });
                    }
                    Fill::Frequency { lo, recent } => {
                        p.violations = self.sample(a, PATTERN_FINGERPRINTS_KEPT, lo, |_| true);
                        p.description = format!(
                            "{recent} violations began within the last {} s (threshold {})",
                            s.frequency.window_seconds, s.frequency.min_violations
                        );
                    }
                }
            }
            patterns.sort_by(|x, y| y.confidence.total_cmp(&x.confidence));
        }
        let analysis = detail.then(|| {
            let mut recs: Vec<String> = ranked
                .iter()
                .map(|c| recommendation(c.cause).to_string())
                .collect();
            if recs.is_empty() {
                recs.push(recommendation(RootCause::Unknown).to_string());
            }
            AnalysisResult {
                id: new_id("ana"),
                chain_id: chain_id.to_string(),
                analyzed_at: now,
                confidence: overall_confidence(&patterns, count, s.sample_size_saturation),
                patterns,
                root_causes: ranked,
                recommendations: recs,
                violation_count: count,
                max_severity: severity,
                components: components.clone(),
                incident_id: Some(a.id.clone()),
            }
        });
        let report = IncidentReport {
            id: a.id.clone(),
            opened_at: ts(a.first_onset_ms),
            components,
            root_component: root.map(|r| self.components.name(r).to_string()),
            severity,
            violation_count: count,
            fingerprints: if detail {
                self.fingerprints_of(a, crate::model::INCIDENT_FINGERPRINTS_KEPT)
            } else {
                Vec::new()
            },
            analysis,
            diagnosis_changed: changed,
            no_evidence,
            closed: None,
        };
        if let Some(a) = self.incidents.get_mut(&key) {
            a.last = Some(diag_key);
        }
        Some(report)
    }
}

/// Pearson correlation of latency and failure onset counts per bucket over
/// the span of all onsets (sparse: empty buckets only count); `None` with
/// fewer than 2 buckets or without variance.
fn correlation(
    all: &Counts,
    lat: &Counts,
    fail: &Counts,
    bucket_seconds: u64,
) -> Option<(f64, u64)> {
    if lat.is_empty() || fail.is_empty() {
        return None;
    }
    let origin = *all.keys().next()?;
    let end = *all.keys().next_back()?;
    let b = i64::try_from(bucket_seconds.max(1)).unwrap_or(i64::MAX);
    let n_buckets = u64::try_from((end - origin) / b)
        .unwrap_or(0)
        .saturating_add(1);
    if n_buckets < 2 {
        return None;
    }
    let mut counts: HashMap<i64, (f64, f64)> = HashMap::new();
    for (t, n) in lat {
        counts.entry((t - origin) / b).or_default().0 += f64::from(*n);
    }
    for (t, n) in fail {
        counts.entry((t - origin) / b).or_default().1 += f64::from(*n);
    }
    crate::analyze::detectors::sparse_pearson(counts.into_values(), n_buckets)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Duration;

    use super::*;
    use crate::analyze::{analyze, ViolationWindow};

    fn t0() -> Timestamp {
        chrono::Utc
            .timestamp_opt(1_700_000_000, 0)
            .single()
            .expect("valid timestamp")
    }

    fn v(fp: &str, component: &str, signal: Signal, onset: i64) -> Arc<Violation> {
        Arc::new(Violation {
            id: format!("id-{fp}"),
            fingerprint: fp.to_string(),
            rule: "r".into(),
            severity: Severity::Critical,
            component: component.to_string(),
            metric: "m".into(),
            value: 1.0,
            labels: BTreeMap::new(),
            signal,
            first_seen: t0() + Duration::seconds(onset),
            observed_at: t0() + Duration::seconds(onset),
            source: "alertmanager".into(),
        })
    }

    fn settings(topology: &[(&str, &[&str])]) -> AnalyzeSettings {
        AnalyzeSettings {
            topology: topology
                .iter()
                .map(|(a, bs)| (a.to_string(), bs.iter().map(|b| b.to_string()).collect()))
                .collect(),
            ..AnalyzeSettings::default()
        }
    }

    fn open_ids(reports: &[IncidentReport]) -> Vec<String> {
        let mut v: Vec<String> = reports
            .iter()
            .filter(|r| r.closed.is_none())
            .map(|r| r.id.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    #[test]
    fn independent_components_are_independent_incidents() {
        let mut ix = IncidentIndex::new(&settings(&[]));
        for c in 0..20 {
            for i in 0..3 {
                ix.insert(v(
                    &format!("c{c}-{i}"),
                    &format!("svc{c}"),
                    Signal::Failure,
                    i,
                ));
            }
        }
        let reports = ix.diagnose_dirty(t0() + Duration::seconds(5), "chn", false);
        assert_eq!(ix.incident_count(), 20);
        assert_eq!(open_ids(&reports).len(), 20);
        for r in &reports {
            assert_eq!(r.components.len(), 1);
            assert_eq!(r.violation_count, 3);
            let a = r.analysis.as_ref().expect("first diagnosis");
            assert_eq!(a.root_causes[0].cause, RootCause::SystemInstability);
            assert_eq!(a.root_causes[0].components, r.components);
            assert_eq!(a.incident_id.as_deref(), Some(r.id.as_str()));
        }
    }

    #[test]
    fn ids_are_content_derived_and_stable() {
        let mut a = IncidentIndex::new(&settings(&[]));
        let mut b = IncidentIndex::new(&settings(&[]));
        a.insert(v("x", "svc", Signal::Latency, 0));
        b.insert(v("x", "svc", Signal::Latency, 0));
        let (ra, rb) = (
            a.diagnose_dirty(t0(), "c1", false),
            b.diagnose_dirty(t0(), "c2", false),
        );
        assert_eq!(ra[0].id, rb[0].id);
        assert_eq!(ra[0].id, incident_id("x", t0()));
        let mut c = IncidentIndex::new(&settings(&[]));
        c.insert(v("x", "svc", Signal::Latency, 1));
        assert_ne!(c.diagnose_dirty(t0(), "c3", false)[0].id, ra[0].id);
    }

    #[test]
    fn topology_edge_within_lag_joins_and_beyond_lag_does_not() {
        let s = settings(&[("api", &["db"])]);
        let mut ix = IncidentIndex::new(&s);
        ix.insert(v("db1", "db", Signal::Latency, 0));
        ix.insert(v("api1", "api", Signal::Failure, 120)); // lag 120 = max_lag: joins
        assert_eq!(ix.incident_count(), 1);
        let mut far = IncidentIndex::new(&s);
        far.insert(v("db1", "db", Signal::Latency, 0));
        far.insert(v("api1", "api", Signal::Failure, 121));
        assert_eq!(far.incident_count(), 2);
        // No edge: never joined.
        let mut none = IncidentIndex::new(&settings(&[]));
        none.insert(v("db1", "db", Signal::Latency, 0));
        none.insert(v("web1", "web", Signal::Failure, 1));
        assert_eq!(none.incident_count(), 2);
    }

    #[test]
    fn cascade_over_three_linked_components_is_one_incident_rooted_upstream() {
        // web → api → db (web depends on api, api on db).
        let s = settings(&[("web", &["api"]), ("api", &["db"])]);
        let mut ix = IncidentIndex::new(&s);
        ix.insert(v("db-lat", "db", Signal::Latency, 0));
        ix.insert(v("db-lat2", "db", Signal::Latency, 1));
        ix.insert(v("api-fail", "api", Signal::Failure, 20));
        ix.insert(v("api-thr", "api", Signal::Throughput, 21));
        ix.insert(v("api-fail2", "api", Signal::Failure, 22));
        ix.insert(v("api-fail3", "api", Signal::Failure, 23));
        ix.insert(v("web-fail", "web", Signal::Failure, 40));
        ix.insert(v("web-thr", "web", Signal::Throughput, 41));
        let reports = ix.diagnose_dirty(t0() + Duration::seconds(60), "chn", false);
        assert_eq!(ix.incident_count(), 1, "{reports:#?}");
        let r = reports
            .iter()
            .find(|r| r.closed.is_none())
            .expect("open incident");
        assert_eq!(r.root_component.as_deref(), Some("db"));
        let a = r.analysis.as_ref().expect("diagnosis");
        assert_eq!(a.root_causes[0].cause, RootCause::CascadeFailure, "{a:#?}");
        assert_eq!(a.root_causes[0].components[0], "db");
        assert_eq!(r.components, vec!["api", "db", "web"]);
    }

    #[test]
    fn merge_keeps_the_older_id() {
        // a and c both depend on b; a and c start separately, b joins them.
        let s = settings(&[("a", &["b"]), ("c", &["b"])]);
        let mut ix = IncidentIndex::new(&s);
        ix.insert(v("a1", "a", Signal::Failure, 10));
        ix.insert(v("c1", "c", Signal::Failure, 0));
        let first = ix.diagnose_dirty(t0() + Duration::seconds(20), "chn", false);
        assert_eq!(open_ids(&first).len(), 2);
        let older = incident_id("c1", t0());
        let younger = incident_id("a1", t0() + Duration::seconds(10));
        // b is adjacent to both: the two incidents merge into the older.
        ix.insert(v("b1", "b", Signal::Latency, 5));
        let reports = ix.diagnose_dirty(t0() + Duration::seconds(20), "chn", false);
        assert_eq!(ix.incident_count(), 1);
        let merged = reports
            .iter()
            .find(|r| r.closed.is_some())
            .expect("a merged report");
        assert_eq!(merged.id, younger);
        assert_eq!(
            merged.closed,
            Some((CloseReason::Merged, Some(older.clone())))
        );
        assert_eq!(open_ids(&reports), vec![older.clone()]);
        assert_eq!(ix.incident_of("a1"), Some(older.as_str()));
    }

    #[test]
    fn duplicate_costs_nothing_and_a_change_touches_only_its_incident() {
        let mut ix = IncidentIndex::new(&settings(&[]));
        for c in ["x", "y"] {
            for i in 0..3 {
                ix.insert(v(&format!("{c}{i}"), c, Signal::Failure, i));
            }
        }
        let _ = ix.diagnose_dirty(t0(), "chn", false);
        let before = ix.diagnosed_total();
        assert_eq!(
            ix.insert(v("x0", "x", Signal::Failure, 0)),
            Added::Duplicate
        );
        assert!(ix.diagnose_dirty(t0(), "chn", false).is_empty());
        assert_eq!(
            ix.diagnosed_total(),
            before,
            "a duplicate diagnoses nothing"
        );
        ix.insert(v("x9", "x", Signal::Failure, 2));
        let reports = ix.diagnose_dirty(t0(), "chn", true);
        assert_eq!(ix.diagnosed_total(), before + 1, "only x diagnosed again");
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].components, vec!["x"]);
        assert!(
            reports[0].analysis.is_none(),
            "same diagnosis: no new analysis"
        );
        assert_eq!(reports[0].violation_count, 4);
    }

    #[test]
    fn a_count_that_reorders_components_is_not_a_new_diagnosis() {
        let mut ix = IncidentIndex::new(&settings(&[("a", &["b"])]));
        for i in 0..3 {
            ix.insert(v(&format!("a{i}"), "a", Signal::Failure, i));
        }
        for i in 0..2 {
            ix.insert(v(&format!("b{i}"), "b", Signal::Failure, i));
        }
        let first = ix.diagnose_dirty(t0() + Duration::seconds(10), "c", false);
        assert!(first[0].diagnosis_changed);
        for i in 2..4 {
            ix.insert(v(&format!("b{i}"), "b", Signal::Failure, i));
        }
        let r = ix.diagnose_dirty(t0() + Duration::seconds(10), "c", true);
        assert_eq!(r.len(), 1);
        assert!(
            !r[0].diagnosis_changed,
            "b now leads, but cause and components are the same"
        );
        assert_eq!(r[0].violation_count, 7);
    }

    #[test]
    fn resolution_closes_an_empty_incident() {
        let mut ix = IncidentIndex::new(&settings(&[]));
        ix.insert(v("a", "svc", Signal::Failure, 0));
        ix.insert(v("b", "svc", Signal::Failure, 1));
        let _ = ix.diagnose_dirty(t0(), "chn", false);
        assert!(ix.remove("a"));
        assert!(!ix.remove("a"));
        assert!(ix.remove("b"));
        let reports = ix.diagnose_dirty(t0(), "chn", false);
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0].closed,
            Some((CloseReason::ResolvedWithoutAction, None))
        );
        assert_eq!(ix.incident_count(), 0);
        assert!(ix.is_empty());
    }

    #[test]
    fn bound_drops_the_oldest_counted_and_expires_its_incident() {
        let mut s = settings(&[]);
        s.max_window_violations = 2;
        let mut ix = IncidentIndex::new(&s);
        ix.insert(v("old", "a", Signal::Failure, 0));
        ix.insert(v("mid", "b", Signal::Failure, 1));
        ix.insert(v("new", "c", Signal::Failure, 2));
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.dropped_total(), 1);
        assert!(!ix.contains("old"));
        let reports = ix.diagnose_dirty(t0(), "chn", false);
        assert!(reports
            .iter()
            .any(|r| r.closed == Some((CloseReason::Expired, None))));
    }

    #[test]
    fn blind_source_marks_its_incidents_without_closing_them() {
        let mut ix = IncidentIndex::new(&settings(&[]));
        ix.insert(v("a", "svc", Signal::Failure, 0));
        let _ = ix.diagnose_dirty(t0(), "chn", false);
        ix.set_blind("alertmanager", true);
        let r = ix.diagnose_dirty(t0(), "chn", false);
        assert_eq!(r.len(), 1);
        assert!(r[0].no_evidence);
        assert!(r[0].closed.is_none());
        ix.set_blind("alertmanager", false);
        let r = ix.diagnose_dirty(t0(), "chn", false);
        assert!(!r[0].no_evidence);
        assert_eq!(ix.incident_count(), 1);
    }

    #[test]
    fn restored_membership_keeps_the_id() {
        let mut ix = IncidentIndex::new(&settings(&[]));
        ix.restore("inc-restored", &["p1".to_string()]);
        ix.insert(v("p1", "svc", Signal::Failure, 500));
        ix.insert(v("p2", "svc", Signal::Failure, 501));
        let r = ix.diagnose_dirty(t0(), "chn", false);
        assert_eq!(open_ids(&r), vec!["inc-restored".to_string()]);
    }

    /// The incremental detectors fire exactly when the reference detectors
    /// (over the same single-component violations) fire.
    #[test]
    fn incremental_detectors_agree_with_the_reference() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let signals = [
            Signal::Latency,
            Signal::Failure,
            Signal::Throughput,
            Signal::Policy,
        ];
        for round in 0..300 {
            let s = settings(&[]);
            let mut ix = IncidentIndex::new(&s);
            let mut window = ViolationWindow::new(10_000, Duration::seconds(100_000));
            let n = 1 + next(12) as usize;
            let spread = 1 + next(400) as i64;
            let mut live: Vec<Arc<Violation>> = Vec::new();
            for i in 0..n {
                let x = v(
                    &format!("r{round}-{i}"),
                    "svc",
                    signals[next(4) as usize],
                    next(spread as u64) as i64,
                );
                ix.insert(x.clone());
                live.push(x);
            }
            // Remove a few, so the removal paths are exercised too.
            for _ in 0..next(3) {
                if live.len() > 1 {
                    let gone = live.remove(next(live.len() as u64) as usize);
                    ix.remove(&gone.fingerprint);
                }
            }
            let list: Vec<Violation> = live.iter().map(|x| (**x).clone()).collect();
            window.observe(&list);
            let now = t0() + Duration::seconds(spread);
            let reference = analyze(&window, "ref", now, &s);
            let mut reports = ix.diagnose_all(now, "inc");
            reports.retain(|r| r.closed.is_none());
            assert_eq!(reports.len(), 1);
            let ours = reports[0].analysis.as_ref().expect("diagnosis");
            let kinds = |a: &AnalysisResult| {
                let mut k: Vec<PatternKind> = a.patterns.iter().map(|p| p.kind).collect();
                k.sort();
                k
            };
            assert_eq!(kinds(ours), kinds(&reference), "round {round}: {list:#?}");
            // Burst and frequency patterns weigh the incident's signal
            // counts (the reference weighs their members'): the causes agree
            // whenever those patterns cover every violation.
            let whole = reference
                .patterns
                .iter()
                .filter(|p| matches!(p.kind, PatternKind::Temporal | PatternKind::Frequency))
                .all(|p| p.violations.len() == list.len());
            if whole {
                assert_eq!(
                    ours.root_causes.first().map(|c| c.cause),
                    reference.root_causes.first().map(|c| c.cause),
                    "round {round}"
                );
            }
            assert!((ours.confidence - reference.confidence).abs() < 1e-9);
        }
    }
}
