//! The Analyze phase as plain logic: a bounded sliding window of distinct
//! violations, four pattern detectors (temporal, spatial, causal,
//! frequency), root-cause ranking, recommendations and the overall
//! confidence of an analysis.
//!
//! Nothing here does I/O or reads a clock: the current time is always a
//! parameter, so tests drive time explicitly. Every operation is
//! `O(n log n)` in the number of violations or better; no detector is
//! quadratic in the window.
//!
//! Detectors take violations as `&[&Violation]`. Violations are identified
//! by `fingerprint`; should a slice contain the same fingerprint more than
//! once, the detectors count it once (its first occurrence).

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::Duration;

use crate::model::{
    new_id, AnalysisResult, Pattern, PatternKind, RankedCause, RootCause, Severity, Signal,
    Timestamp, Violation,
};
use crate::settings::{AnalyzeSettings, CausalSettings, DetectorSettings};

/// Weight of a signal that is present in a pattern but is not (one of) the
/// most frequent signals among its violations.
const MINOR_SIGNAL_WEIGHT: f64 = 0.8;

/// One violation held by the window, with the sequence number that makes
/// its index key unique.
#[derive(Debug, Clone)]
struct Entry {
    violation: Violation,
    seq: u64,
}

/// Key of the age index: oldest `observed_at` first, ties by insertion
/// sequence.
type IndexKey = (Timestamp, u64, String);

/// The sliding window of distinct violations, keyed by `fingerprint`.
///
/// Re-observing a fingerprint updates its entry in place (earliest
/// `first_seen` kept, latest observation otherwise). The window is bounded
/// in time ([`ViolationWindow::expire`]) and in size: above `max_len`
/// entries, those with the oldest `observed_at` are dropped first. Every
/// update costs `O(log n)`.
#[derive(Debug, Clone)]
pub struct ViolationWindow {
    max_len: usize,
    window: Duration,
    entries: HashMap<String, Entry>,
    index: BTreeSet<IndexKey>,
    next_seq: u64,
    dropped: u64,
}

impl ViolationWindow {
    /// An empty window holding at most `max_len` violations, each for
    /// `window` after its latest observation (a negative `window` counts as
    /// zero).
    pub fn new(max_len: usize, window: Duration) -> Self {
        ViolationWindow {
            max_len,
            window: window.max(Duration::zero()),
            entries: HashMap::new(),
            index: BTreeSet::new(),
            next_seq: 0,
            dropped: 0,
        }
    }

    /// Inserts or updates each violation by fingerprint, then drops the
    /// oldest entries (by `observed_at`) while the window holds more than
    /// `max_len`.
    ///
    /// An update keeps the earliest `first_seen`; the rest of the entry
    /// (value, labels, severity, `observed_at`, ...) comes from the newest
    /// observation, so an out-of-order older observation only contributes
    /// its `first_seen`.
    pub fn observe(&mut self, vs: &[Violation]) {
        for v in vs {
            self.observe_one(v);
        }
        self.enforce_capacity();
    }

    fn observe_one(&mut self, v: &Violation) {
        let seq = self.next_seq;
        self.next_seq += 1;
        match self.entries.get_mut(&v.fingerprint) {
            Some(entry) => {
                let first_seen = entry.violation.first_seen.min(v.first_seen);
                if v.observed_at >= entry.violation.observed_at {
                    self.index.remove(&(
                        entry.violation.observed_at,
                        entry.seq,
                        v.fingerprint.clone(),
                    ));
                    entry.violation = v.clone();
                    entry.seq = seq;
                    self.index
                        .insert((v.observed_at, seq, v.fingerprint.clone()));
                }
                entry.violation.first_seen = first_seen;
            }
            None => {
                self.index
                    .insert((v.observed_at, seq, v.fingerprint.clone()));
                self.entries.insert(
                    v.fingerprint.clone(),
                    Entry {
                        violation: v.clone(),
                        seq,
                    },
                );
            }
        }
    }

    fn enforce_capacity(&mut self) {
        while self.entries.len() > self.max_len {
            match self.index.pop_first() {
                Some((_, _, fingerprint)) => {
                    self.entries.remove(&fingerprint);
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    /// Removes the violations with these fingerprints (resolved alerts).
    /// Returns how many were present.
    pub fn resolve(&mut self, fingerprints: &[String]) -> usize {
        let mut removed = 0;
        for fp in fingerprints {
            if let Some(entry) = self.entries.remove(fp) {
                self.index
                    .remove(&(entry.violation.observed_at, entry.seq, fp.clone()));
                removed += 1;
            }
        }
        removed
    }

    /// Drops the violations last observed strictly before `now - window`
    /// (one observed exactly at the edge stays). Returns how many expired.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        let Some(cutoff) = now.checked_sub_signed(self.window) else {
            return 0;
        };
        let mut expired = 0;
        while let Some((observed_at, _, _)) = self.index.first() {
            if *observed_at >= cutoff {
                break;
            }
            if let Some((_, _, fingerprint)) = self.index.pop_first() {
                self.entries.remove(&fingerprint);
                expired += 1;
            }
        }
        expired
    }

    /// Number of violations dropped because the window was full (expiry and
    /// resolution are not counted).
    pub fn dropped_total(&self) -> u64 {
        self.dropped
    }

    /// Number of distinct violations in the window.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the window holds no violation.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The violation with this fingerprint, if held.
    pub fn get(&self, fingerprint: &str) -> Option<&Violation> {
        self.entries.get(fingerprint).map(|e| &e.violation)
    }

    /// Maximum number of violations held.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// How long a violation stays after its latest observation.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The violations, oldest `observed_at` first.
    pub fn iter(&self) -> impl Iterator<Item = &Violation> + '_ {
        self.index
            .iter()
            .filter_map(|(_, _, fp)| self.entries.get(fp).map(|e| &e.violation))
    }
}

/// `n` seconds as a chrono duration, saturating instead of overflowing.
fn seconds(n: u64) -> Duration {
    Duration::try_seconds(i64::try_from(n).unwrap_or(i64::MAX)).unwrap_or(Duration::MAX)
}

/// The violations with their first occurrence per fingerprint only.
fn distinct<'a>(vs: &[&'a Violation]) -> Vec<&'a Violation> {
    let mut seen = HashSet::with_capacity(vs.len());
    vs.iter()
        .copied()
        .filter(|v| seen.insert(v.fingerprint.as_str()))
        .collect()
}

/// `Some(component)` when every violation is on the same component.
fn common_component<'a>(vs: impl IntoIterator<Item = &'a Violation>) -> Option<String> {
    let mut it = vs.into_iter();
    let first = it.next()?;
    if it.all(|v| v.component == first.component) {
        Some(first.component.clone())
    } else {
        None
    }
}

/// Burst detector: the largest set of violations whose onsets
/// (`first_seen`) all fall within one `s.window_seconds`-long interval
/// (inclusive: onsets exactly `window_seconds` apart are within it). Fires
/// when that set has at least `s.min_violations` members, with confidence
/// `s.confidence`. `window_seconds == 0` means no time limit (all the
/// given violations form one interval). `O(n log n)`.
pub fn detect_temporal(vs: &[&Violation], s: &DetectorSettings) -> Option<Pattern> {
    let mut sorted = distinct(vs);
    if sorted.is_empty() || sorted.len() < s.min_violations {
        return None;
    }
    sorted.sort_by(|a, b| {
        a.first_seen
            .cmp(&b.first_seen)
            .then_with(|| a.fingerprint.cmp(&b.fingerprint))
    });
    let width = if s.window_seconds == 0 {
        Duration::MAX
    } else {
        seconds(s.window_seconds)
    };
    // Two pointers: for each right end, the leftmost onset within `width`.
    let (mut best_lo, mut best_hi) = (0usize, 0usize);
    let mut lo = 0usize;
    for hi in 0..sorted.len() {
        while sorted[hi].first_seen - sorted[lo].first_seen > width {
            lo += 1;
        }
        if hi - lo > best_hi - best_lo {
            best_lo = lo;
            best_hi = hi;
        }
    }
    let burst = &sorted[best_lo..=best_hi];
    if burst.len() < s.min_violations.max(1) {
        return None;
    }
    let span = (burst[burst.len() - 1].first_seen - burst[0].first_seen).num_seconds();
    let limit = if s.window_seconds == 0 {
        "the analysis window".to_string()
    } else {
        format!("{} s", s.window_seconds)
    };
    Some(Pattern {
        kind: PatternKind::Temporal,
        confidence: s.confidence,
        component: common_component(burst.iter().copied()),
        violations: burst.iter().map(|v| v.fingerprint.clone()).collect(),
        description: format!(
            "burst of {} violations with onsets within {span} s (limit {limit}), from {} to {}",
            burst.len(),
            burst[0].first_seen.to_rfc3339(),
            burst[burst.len() - 1].first_seen.to_rfc3339(),
        ),
    })
}

/// Same-component detector: one pattern per component with at least
/// `s.min_violations` distinct violations (confidence `s.confidence`),
/// sorted by count descending, then component name. Time is not
/// considered (select the violations beforehand). `O(n log n)`.
pub fn detect_spatial(vs: &[&Violation], s: &DetectorSettings) -> Vec<Pattern> {
    let mut by_component: HashMap<&str, Vec<&str>> = HashMap::new();
    for v in distinct(vs) {
        by_component
            .entry(v.component.as_str())
            .or_default()
            .push(v.fingerprint.as_str());
    }
    let mut groups: Vec<(&str, Vec<&str>)> = by_component
        .into_iter()
        .filter(|(_, fps)| !fps.is_empty() && fps.len() >= s.min_violations)
        .collect();
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(b.0)));
    groups
        .into_iter()
        .map(|(component, mut fps)| {
            fps.sort_unstable();
            Pattern {
                kind: PatternKind::Spatial,
                confidence: s.confidence,
                component: Some(component.to_string()),
                description: format!(
                    "{} distinct violations on component `{component}`",
                    fps.len()
                ),
                violations: fps.into_iter().map(str::to_string).collect(),
            }
        })
        .collect()
}

/// Pearson correlation of per-bucket onset counts, computed sparsely: empty
/// buckets contribute only to the bucket count. Returns `(r, buckets)`, or
/// `None` when there are fewer than 2 buckets or either series has zero
/// variance.
fn bucket_correlation(
    origin: Timestamp,
    end: Timestamp,
    bucket_seconds: u64,
    latency: &[(Timestamp, &str)],
    failure: &[(Timestamp, &str)],
) -> Option<(f64, u64)> {
    let bucket_ms = i64::try_from(bucket_seconds.max(1))
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    let bucket_of = |t: Timestamp| -> i64 { (t - origin).num_milliseconds().max(0) / bucket_ms };
    let n_buckets = u64::try_from(bucket_of(end)).unwrap_or(0).saturating_add(1);
    if n_buckets < 2 {
        return None;
    }
    let mut counts: HashMap<i64, (f64, f64)> = HashMap::new();
    for (t, _) in latency {
        counts.entry(bucket_of(*t)).or_default().0 += 1.0;
    }
    for (t, _) in failure {
        counts.entry(bucket_of(*t)).or_default().1 += 1.0;
    }
    sparse_pearson(counts.values().copied(), n_buckets)
}

/// Pearson correlation of two series given sparsely: the non-empty
/// buckets' `(x, y)` counts, out of `n_buckets` in all (the empty ones count
/// as zeros). `None` without variance in either series. Returns `(r,
/// n_buckets)`.
pub(crate) fn sparse_pearson(
    buckets: impl IntoIterator<Item = (f64, f64)>,
    n_buckets: u64,
) -> Option<(f64, u64)> {
    let (mut sx, mut sy, mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (x, y) in buckets {
        sx += x;
        sy += y;
        sxx += x * x;
        syy += y * y;
        sxy += x * y;
    }
    let n = n_buckets as f64;
    let var_x = n * sxx - sx * sx;
    let var_y = n * syy - sy * sy;
    if var_x <= f64::EPSILON || var_y <= f64::EPSILON {
        return None;
    }
    let r = (n * sxy - sx * sy) / (var_x.sqrt() * var_y.sqrt());
    r.is_finite().then_some((r.clamp(-1.0, 1.0), n_buckets))
}

/// Latency → failure detector: latency violations (`Signal::Latency`)
/// followed by failure or enforcement violations (`Signal::Failure`,
/// `Signal::Policy`). Needs at least one of each kind, and fires (with
/// confidence `s.confidence`) when either
///
/// * the Pearson correlation of latency and failure onset counts per
///   `s.bucket_seconds` bucket, over the span from the earliest to the
///   latest onset of all the given violations, is at least
///   `s.min_correlation` (with at least 2 buckets and non-zero variance in
///   both series), or
/// * some failure onset follows a latency onset by `0..=s.max_lag_seconds`
///   (lagged co-occurrence).
///
/// The description names the criteria that fired. `O(n log n)`.
pub fn detect_causal(vs: &[&Violation], s: &CausalSettings) -> Option<Pattern> {
    let vs = distinct(vs);
    let mut latency: Vec<(Timestamp, &str)> = Vec::new();
    let mut failure: Vec<(Timestamp, &str)> = Vec::new();
    for v in &vs {
        match v.signal {
            Signal::Latency => latency.push((v.first_seen, v.fingerprint.as_str())),
            Signal::Failure | Signal::Policy => {
                failure.push((v.first_seen, v.fingerprint.as_str()))
            }
            _ => {}
        }
    }
    if latency.is_empty() || failure.is_empty() {
        return None;
    }
    latency.sort_unstable();
    failure.sort_unstable();

    // (b) lagged co-occurrence: the latest latency onset at or before each
    // failure onset, found by binary search.
    let max_lag = seconds(s.max_lag_seconds);
    let mut lagged: Vec<(&str, &str)> = Vec::new();
    for (f_at, f_fp) in &failure {
        let idx = latency.partition_point(|(l_at, _)| l_at <= f_at);
        if idx > 0 {
            let (l_at, l_fp) = latency[idx - 1];
            if *f_at - l_at <= max_lag {
                lagged.push((l_fp, f_fp));
            }
        }
    }

    // (a) correlation of per-bucket counts over the span of all onsets.
    let origin = vs.iter().map(|v| v.first_seen).min()?;
    let end = vs.iter().map(|v| v.first_seen).max()?;
    let correlation = bucket_correlation(origin, end, s.bucket_seconds, &latency, &failure)
        .filter(|(r, _)| *r >= s.min_correlation);

    let mut criteria = Vec::new();
    if let Some((r, n)) = correlation {
        criteria.push(format!(
            "correlation {r:.2} ≥ {:.2} of latency and failure onsets over {n} buckets of {} s",
            s.min_correlation, s.bucket_seconds
        ));
    }
    if !lagged.is_empty() {
        criteria.push(format!(
            "lagged co-occurrence: {} of {} failure onsets follow a latency onset within {} s",
            lagged.len(),
            failure.len(),
            s.max_lag_seconds
        ));
    }
    if criteria.is_empty() {
        return None;
    }

    let mut fps: Vec<&str> = if correlation.is_some() {
        latency
            .iter()
            .chain(failure.iter())
            .map(|(_, fp)| *fp)
            .collect()
    } else {
        lagged.iter().flat_map(|(l, f)| [*l, *f]).collect()
    };
    fps.sort_unstable();
    fps.dedup();
    let by_fp: HashMap<&str, &Violation> =
        vs.iter().map(|v| (v.fingerprint.as_str(), *v)).collect();
    let component = common_component(fps.iter().filter_map(|fp| by_fp.get(fp).copied()));
    Some(Pattern {
        kind: PatternKind::Causal,
        confidence: s.confidence,
        component,
        violations: fps.into_iter().map(str::to_string).collect(),
        description: format!(
            "latency violations followed by failure/enforcement violations: {}",
            criteria.join("; ")
        ),
    })
}

/// Frequency detector: at least `s.min_violations` distinct violations
/// whose onset (`first_seen`) is no earlier than `now - s.window_seconds`
/// (the edge included; onsets after `now`, from clock skew, count as
/// recent). Confidence `s.confidence`. `window_seconds == 0` means every
/// given violation counts. `O(n)`.
pub fn detect_frequency(
    vs: &[&Violation],
    now: Timestamp,
    s: &DetectorSettings,
) -> Option<Pattern> {
    let cutoff = if s.window_seconds == 0 {
        None
    } else {
        now.checked_sub_signed(seconds(s.window_seconds))
    };
    let mut recent: Vec<&Violation> = distinct(vs)
        .into_iter()
        .filter(|v| cutoff.is_none_or(|c| v.first_seen >= c))
        .collect();
    if recent.is_empty() || recent.len() < s.min_violations {
        return None;
    }
    recent.sort_by(|a, b| {
        a.first_seen
            .cmp(&b.first_seen)
            .then_with(|| a.fingerprint.cmp(&b.fingerprint))
    });
    let within = if s.window_seconds == 0 {
        "the analysis window".to_string()
    } else {
        format!("the last {} s", s.window_seconds)
    };
    Some(Pattern {
        kind: PatternKind::Frequency,
        confidence: s.confidence,
        component: common_component(recent.iter().copied()),
        violations: recent.iter().map(|v| v.fingerprint.clone()).collect(),
        description: format!(
            "{} violations began within {within} (threshold {})",
            recent.len(),
            s.min_violations
        ),
    })
}

/// The root cause a kind of symptom points to.
pub fn cause_for_signal(signal: Signal) -> RootCause {
    match signal {
        Signal::Latency => RootCause::ValidationLatency,
        Signal::Throughput => RootCause::InsufficientCapacity,
        Signal::Policy => RootCause::PolicyMisconfiguration,
        Signal::Failure => RootCause::SystemInstability,
        Signal::Node => RootCause::NodeCrash,
        Signal::Network => RootCause::NetworkPartition,
        Signal::Resource => RootCause::ResourceExhaustion,
        Signal::Other => RootCause::PerformanceDegradation,
    }
}

/// Ranks root causes from the patterns found over `vs`.
///
/// A causal pattern contributes `CascadeFailure` with its confidence. Every
/// other pattern contributes, for each signal among its violations, the
/// cause of that signal ([`cause_for_signal`]) with the pattern's
/// confidence × 1.0 when the signal is (one of) the most frequent among the
/// pattern's violations, × 0.8 otherwise. A cause's confidence is the
/// maximum over patterns. Sorted by confidence descending, ties by
/// [`RootCause::precedence`]. No patterns → empty (the planner reads that
/// as "unknown: escalate"). Fingerprints not found in `vs` are ignored.
pub fn rank_root_causes(patterns: &[Pattern], vs: &[&Violation]) -> Vec<RankedCause> {
    let by_fp: HashMap<&str, &Violation> =
        vs.iter().map(|v| (v.fingerprint.as_str(), *v)).collect();
    let mut best: HashMap<RootCause, f64> = HashMap::new();
    let mut raise = |cause: RootCause, confidence: f64| {
        let slot = best.entry(cause).or_insert(confidence);
        if confidence > *slot {
            *slot = confidence;
        }
    };
    for p in patterns {
        if p.kind == PatternKind::Causal {
            raise(RootCause::CascadeFailure, p.confidence);
            continue;
        }
        let mut counts: HashMap<Signal, usize> = HashMap::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for fp in &p.violations {
            if !seen.insert(fp.as_str()) {
                continue;
            }
            if let Some(v) = by_fp.get(fp.as_str()) {
                *counts.entry(v.signal).or_default() += 1;
            }
        }
        let top = counts.values().copied().max().unwrap_or(0);
        for (signal, count) in counts {
            let weight = if count == top {
                1.0
            } else {
                MINOR_SIGNAL_WEIGHT
            };
            raise(cause_for_signal(signal), p.confidence * weight);
        }
    }
    // Failures that a causal pattern explains (latency came first) are
    // effects, not causes: they weigh as a minor signal.
    if patterns.iter().any(|p| p.kind == PatternKind::Causal) {
        if let Some(c) = best.get_mut(&RootCause::SystemInstability) {
            *c *= MINOR_SIGNAL_WEIGHT;
        }
    }
    let mut ranked: Vec<RankedCause> = best
        .into_iter()
        .map(|(cause, confidence)| RankedCause {
            cause,
            confidence,
            components: Vec::new(),
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then_with(|| a.cause.precedence().cmp(&b.cause.precedence()))
    });
    attribute_components(&mut ranked, patterns, &by_fp, vs);
    ranked
}

/// Fills each cause's components: where the violations behind it are, most
/// violations first (ties by name). A signal's cause takes the components
/// of the violations with that signal; a cascade those of the causal
/// patterns. Linear in the violations.
fn attribute_components(
    ranked: &mut [RankedCause],
    patterns: &[Pattern],
    by_fp: &HashMap<&str, &Violation>,
    vs: &[&Violation],
) {
    let mut counts: HashMap<RootCause, HashMap<&str, usize>> = HashMap::new();
    for v in vs {
        *counts
            .entry(cause_for_signal(v.signal))
            .or_default()
            .entry(v.component.as_str())
            .or_default() += 1;
    }
    for p in patterns.iter().filter(|p| p.kind == PatternKind::Causal) {
        for fp in &p.violations {
            if let Some(v) = by_fp.get(fp.as_str()) {
                *counts
                    .entry(RootCause::CascadeFailure)
                    .or_default()
                    .entry(v.component.as_str())
                    .or_default() += 1;
            }
        }
    }
    for rc in ranked.iter_mut() {
        if let Some(c) = counts.get(&rc.cause) {
            let mut list: Vec<(&str, usize)> = c.iter().map(|(k, n)| (*k, *n)).collect();
            list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            rc.components = list.into_iter().map(|(k, _)| k.to_string()).collect();
        }
    }
}

/// `0.7 × mean(pattern confidence) + 0.3 × min(1, sample_size /
/// saturation)`, clamped to `0..=1`. The mean is 0 without patterns; a
/// `saturation` of 0 makes any non-zero sample saturate.
pub fn overall_confidence(patterns: &[Pattern], sample_size: usize, saturation: usize) -> f64 {
    let mean = if patterns.is_empty() {
        0.0
    } else {
        patterns.iter().map(|p| p.confidence).sum::<f64>() / patterns.len() as f64
    };
    let sample_factor = if saturation == 0 {
        if sample_size > 0 {
            1.0
        } else {
            0.0
        }
    } else {
        (sample_size as f64 / saturation as f64).min(1.0)
    };
    let c = 0.7 * mean + 0.3 * sample_factor;
    if c.is_finite() {
        c.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// The readable recommendation for one root cause.
pub fn recommendation(cause: RootCause) -> &'static str {
    match cause {
        RootCause::ValidationLatency => {
            "Scale up validation workers and tune validation configuration"
        }
        RootCause::InsufficientCapacity => "Add capacity: scale up replicas to match the load",
        RootCause::PolicyMisconfiguration => {
            "Apply the corrected policy (keeping the previous one for rollback)"
        }
        RootCause::CascadeFailure => {
            "Contain the cascade: activate the emergency override and throttle requests"
        }
        RootCause::SystemInstability => {
            "Rebalance load across nodes and restart unhealthy services"
        }
        RootCause::NodeCrash => "Restart or replace the crashed node, failing over if needed",
        RootCause::NetworkPartition => {
            "Investigate connectivity between components and fail over to a reachable replica"
        }
        RootCause::ResourceExhaustion => {
            "Relieve the exhausted resource: scale up and throttle requests"
        }
        RootCause::PerformanceDegradation => {
            "Investigate the degradation; rebalance load and review recent configuration changes"
        }
        RootCause::Unknown => "Not enough evidence for a diagnosis: escalate to a human operator",
    }
}

/// One readable recommendation line per cause, in the given order.
pub fn recommendations(causes: &[RankedCause]) -> Vec<String> {
    causes
        .iter()
        .map(|c| recommendation(c.cause).to_string())
        .collect()
}

/// A detector's settings with `window_seconds == 0` replaced by the whole
/// analysis window.
fn with_window(d: &DetectorSettings, analysis_window: u64) -> DetectorSettings {
    let mut d = d.clone();
    if d.window_seconds == 0 {
        d.window_seconds = analysis_window;
    }
    d
}

/// Runs the Analyze phase over the window's current content at `now`.
///
/// Runs the four detectors (temporal and frequency with their own
/// `window_seconds`, 0 meaning the whole analysis window; spatial over
/// every violation, or when its `window_seconds` is non-zero over those
/// observed within that many seconds before `now`), sorts the patterns by
/// confidence (strongest first, detector order on ties), ranks root causes
/// and computes the overall confidence with `sample_size_saturation`.
/// When violations are present but no pattern is found, the only
/// recommendation is to escalate to a person. The caller expires the
/// window beforehand.
pub fn analyze(
    window: &ViolationWindow,
    chain_id: &str,
    now: Timestamp,
    s: &AnalyzeSettings,
) -> AnalysisResult {
    let vs: Vec<&Violation> = window.iter().collect();

    let mut patterns = Vec::new();
    if let Some(p) = detect_temporal(&vs, &with_window(&s.temporal, s.window_seconds)) {
        patterns.push(p);
    }
    let spatial_input: Vec<&Violation> = if s.spatial.window_seconds == 0 {
        vs.clone()
    } else {
        match now.checked_sub_signed(seconds(s.spatial.window_seconds)) {
            Some(cutoff) => vs
                .iter()
                .copied()
                .filter(|v| v.observed_at >= cutoff)
                .collect(),
            None => vs.clone(),
        }
    };
    patterns.extend(detect_spatial(&spatial_input, &s.spatial));
    if let Some(p) = detect_causal(&vs, &s.causal) {
        patterns.push(p);
    }
    if let Some(p) = detect_frequency(&vs, now, &with_window(&s.frequency, s.window_seconds)) {
        patterns.push(p);
    }
    patterns.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));

    let root_causes = rank_root_causes(&patterns, &vs);
    let mut recs = recommendations(&root_causes);
    if recs.is_empty() && !vs.is_empty() {
        recs.push(recommendation(RootCause::Unknown).to_string());
    }
    let confidence = overall_confidence(&patterns, vs.len(), s.sample_size_saturation);
    let components: Vec<String> = vs
        .iter()
        .map(|v| v.component.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(str::to_string)
        .collect();
    let max_severity: Option<Severity> = vs.iter().map(|v| v.severity).max();

    AnalysisResult {
        id: new_id("ana"),
        chain_id: chain_id.to_string(),
        analyzed_at: now,
        patterns,
        root_causes,
        recommendations: recs,
        confidence,
        violation_count: vs.len(),
        max_severity,
        components,
        incident_id: None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone;

    use super::*;

    fn t0() -> Timestamp {
        chrono::Utc
            .timestamp_opt(1_700_000_000, 0)
            .single()
            .expect("valid timestamp")
    }

    fn at(secs: i64) -> Timestamp {
        t0() + Duration::seconds(secs)
    }

    /// A violation with onset and observation at `t0 + onset` seconds.
    fn v(fp: &str, component: &str, signal: Signal, onset: i64) -> Violation {
        vo(fp, component, signal, onset, onset)
    }

    /// A violation with onset `t0 + onset` and observation `t0 + observed`.
    fn vo(fp: &str, component: &str, signal: Signal, onset: i64, observed: i64) -> Violation {
        Violation {
            id: format!("id-{fp}-{observed}"),
            fingerprint: fp.to_string(),
            rule: format!("rule-{fp}"),
            severity: Severity::Warning,
            component: component.to_string(),
            metric: "metric".to_string(),
            value: 1.0,
            labels: BTreeMap::new(),
            signal,
            first_seen: at(onset),
            observed_at: at(observed),
            source: "test".to_string(),
        }
    }

    fn refs(vs: &[Violation]) -> Vec<&Violation> {
        vs.iter().collect()
    }

    fn det(min: usize, window: u64, confidence: f64) -> DetectorSettings {
        DetectorSettings {
            min_violations: min,
            window_seconds: window,
            confidence,
        }
    }

    fn temporal() -> DetectorSettings {
        AnalyzeSettings::default().temporal
    }

    fn pattern(kind: PatternKind, confidence: f64, fps: &[&str]) -> Pattern {
        Pattern {
            kind,
            confidence,
            component: None,
            violations: fps.iter().map(|s| s.to_string()).collect(),
            description: String::new(),
        }
    }

    fn approx(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    // ---- window -------------------------------------------------------

    #[test]
    fn window_expiry_keeps_the_edge_and_drops_beyond_it() {
        let mut w = ViolationWindow::new(100, Duration::seconds(300));
        w.observe(&[
            v("edge", "c", Signal::Other, 0),
            v("old", "c", Signal::Other, -1),
            v("new", "c", Signal::Other, 200),
        ]);
        assert_eq!(w.expire(at(300)), 1);
        assert_eq!(w.len(), 2);
        assert!(w.get("old").is_none());
        assert!(w.get("edge").is_some());
        assert_eq!(w.expire(at(301)), 1);
        assert!(w.get("edge").is_none());
        assert_eq!(w.len(), 1);
        assert_eq!(w.dropped_total(), 0);
    }

    #[test]
    fn reobservation_updates_in_place_without_duplicates() {
        let mut w = ViolationWindow::new(100, Duration::seconds(300));
        w.observe(&[vo("a", "c", Signal::Latency, 10, 10)]);
        let mut newer = vo("a", "c", Signal::Latency, 20, 50);
        newer.value = 7.5;
        newer.labels.insert("k".into(), "v".into());
        w.observe(&[newer]);
        assert_eq!(w.len(), 1);
        assert_eq!(w.iter().count(), 1);
        let got = w.get("a").expect("present");
        assert_eq!(got.first_seen, at(10), "earliest onset kept");
        assert_eq!(got.observed_at, at(50));
        assert_eq!(got.value, 7.5);
        assert_eq!(got.labels.get("k").map(String::as_str), Some("v"));

        // An out-of-order older observation only contributes its onset.
        let mut older = vo("a", "c", Signal::Latency, 5, 30);
        older.value = 1.0;
        w.observe(&[older]);
        let got = w.get("a").expect("present");
        assert_eq!(got.first_seen, at(5));
        assert_eq!(got.observed_at, at(50));
        assert_eq!(got.value, 7.5);

        // The index followed the update: expiry uses the new observed_at.
        assert_eq!(w.expire(at(340)), 0);
        assert_eq!(w.len(), 1);
        assert_eq!(w.expire(at(351)), 1);
        assert!(w.is_empty());
    }

    #[test]
    fn max_len_evicts_oldest_observed_first() {
        let mut w = ViolationWindow::new(3, Duration::seconds(10_000));
        w.observe(&[
            v("b", "c", Signal::Other, 20),
            v("a", "c", Signal::Other, 10),
            v("c", "c", Signal::Other, 30),
        ]);
        // Refresh `a`: now `b` is the oldest observation.
        w.observe(&[vo("a", "c", Signal::Other, 10, 40)]);
        assert_eq!(w.dropped_total(), 0);
        w.observe(&[v("d", "c", Signal::Other, 35)]);
        assert_eq!(w.len(), 3);
        assert_eq!(w.dropped_total(), 1);
        assert!(w.get("b").is_none());
        let order: Vec<&str> = w.iter().map(|x| x.fingerprint.as_str()).collect();
        assert_eq!(order, vec!["c", "d", "a"]);
        w.observe(&[
            v("e", "c", Signal::Other, 50),
            v("f", "c", Signal::Other, 5),
        ]);
        assert_eq!(w.dropped_total(), 3);
        let order: Vec<&str> = w.iter().map(|x| x.fingerprint.as_str()).collect();
        assert_eq!(order, vec!["d", "a", "e"]);
    }

    #[test]
    fn resolve_removes_and_keeps_index_consistent() {
        let mut w = ViolationWindow::new(2, Duration::seconds(10_000));
        w.observe(&[v("a", "c", Signal::Other, 1), v("b", "c", Signal::Other, 2)]);
        assert_eq!(w.resolve(&["a".to_string(), "zzz".to_string()]), 1);
        assert_eq!(w.len(), 1);
        assert!(w.get("a").is_none());
        // Room for one more without eviction.
        w.observe(&[v("c", "c", Signal::Other, 3)]);
        assert_eq!(w.dropped_total(), 0);
        assert_eq!(w.len(), 2);
        assert_eq!(w.iter().count(), 2);
        assert_eq!(w.resolve(&["b".to_string(), "c".to_string()]), 2);
        assert!(w.is_empty());
        assert_eq!(w.iter().count(), 0);
    }

    // ---- temporal -----------------------------------------------------

    #[test]
    fn temporal_two_in_window_do_not_fire_three_do() {
        let two = [
            v("a", "c", Signal::Other, 0),
            v("b", "c", Signal::Other, 30),
        ];
        assert!(detect_temporal(&refs(&two), &temporal()).is_none());
        let three = [
            v("a", "c", Signal::Other, 0),
            v("b", "c", Signal::Other, 30),
            v("x", "c", Signal::Other, 59),
        ];
        let p = detect_temporal(&refs(&three), &temporal()).expect("burst");
        assert_eq!(p.kind, PatternKind::Temporal);
        assert_eq!(p.confidence, 0.85);
        assert_eq!(p.violations, vec!["a", "b", "x"]);
        assert_eq!(p.component.as_deref(), Some("c"));
    }

    #[test]
    fn temporal_onsets_exactly_60s_apart_fire_61s_do_not() {
        let exact = [
            v("a", "c", Signal::Other, 0),
            v("b", "c", Signal::Other, 30),
            v("x", "c", Signal::Other, 60),
        ];
        assert!(detect_temporal(&refs(&exact), &temporal()).is_some());
        let beyond = [
            v("a", "c", Signal::Other, 0),
            v("b", "c", Signal::Other, 30),
            v("x", "c", Signal::Other, 61),
        ];
        assert!(detect_temporal(&refs(&beyond), &temporal()).is_none());
    }

    #[test]
    fn temporal_reports_the_largest_burst_and_duplicates_count_once() {
        let vs = [
            v("a1", "c", Signal::Other, 0),
            v("a2", "c", Signal::Other, 10),
            v("a3", "d", Signal::Other, 20),
            v("b1", "c", Signal::Other, 1000),
            v("b2", "c", Signal::Other, 1010),
            v("b3", "c", Signal::Other, 1020),
            v("b4", "c", Signal::Other, 1060),
        ];
        let p = detect_temporal(&refs(&vs), &temporal()).expect("burst");
        assert_eq!(p.violations, vec!["b1", "b2", "b3", "b4"]);
        let dup = [
            v("a", "c", Signal::Other, 0),
            v("a", "c", Signal::Other, 1),
            v("b", "c", Signal::Other, 2),
        ];
        assert!(detect_temporal(&refs(&dup), &temporal()).is_none());
    }

    // ---- spatial ------------------------------------------------------

    #[test]
    fn spatial_two_vs_three_on_a_component() {
        let s = AnalyzeSettings::default().spatial;
        let two = [v("a", "c", Signal::Other, 0), v("b", "c", Signal::Other, 0)];
        assert!(detect_spatial(&refs(&two), &s).is_empty());
        let three = [
            v("a", "c", Signal::Other, 0),
            v("b", "c", Signal::Other, 0),
            v("x", "c", Signal::Other, 900),
        ];
        let ps = detect_spatial(&refs(&three), &s);
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].component.as_deref(), Some("c"));
        assert_eq!(ps[0].confidence, 0.80);
        assert_eq!(ps[0].violations.len(), 3);
    }

    #[test]
    fn spatial_does_not_sum_across_components_and_sorts_by_count_then_name() {
        let s = AnalyzeSettings::default().spatial;
        let split = [
            v("a", "x", Signal::Other, 0),
            v("b", "x", Signal::Other, 0),
            v("c", "y", Signal::Other, 0),
            v("d", "y", Signal::Other, 0),
        ];
        assert!(detect_spatial(&refs(&split), &s).is_empty());
        let mut vs = Vec::new();
        for i in 0..3 {
            vs.push(v(&format!("z{i}"), "zeta", Signal::Other, 0));
            vs.push(v(&format!("a{i}"), "alpha", Signal::Other, 0));
        }
        for i in 0..4 {
            vs.push(v(&format!("m{i}"), "mid", Signal::Other, 0));
        }
        let names: Vec<Option<String>> = detect_spatial(&refs(&vs), &s)
            .into_iter()
            .map(|p| p.component)
            .collect();
        assert_eq!(
            names,
            vec![
                Some("mid".to_string()),
                Some("alpha".to_string()),
                Some("zeta".to_string())
            ]
        );
    }

    // ---- causal -------------------------------------------------------

    #[test]
    fn causal_latency_then_failure_within_lag_fires() {
        let s = CausalSettings::default();
        let vs = [
            v("lat", "c", Signal::Latency, 0),
            v("fail", "c", Signal::Failure, 120),
        ];
        let p = detect_causal(&refs(&vs), &s).expect("causal");
        assert_eq!(p.kind, PatternKind::Causal);
        assert_eq!(p.confidence, 0.75);
        assert!(p.description.contains("lagged"), "{}", p.description);
        assert_eq!(p.violations, vec!["fail", "lat"]);
        // Policy (enforcement) violations count as failures too.
        let pol = [
            v("lat", "c", Signal::Latency, 0),
            v("pol", "c", Signal::Policy, 10),
        ];
        assert!(detect_causal(&refs(&pol), &s).is_some());
    }

    #[test]
    fn causal_beyond_lag_or_wrong_order_does_not_fire() {
        let s = CausalSettings::default();
        let late = [
            v("lat", "c", Signal::Latency, 0),
            v("fail", "c", Signal::Failure, 121),
        ];
        assert!(detect_causal(&refs(&late), &s).is_none());
        let reversed = [
            v("fail", "c", Signal::Failure, 0),
            v("lat", "c", Signal::Latency, 200),
        ];
        assert!(detect_causal(&refs(&reversed), &s).is_none());
        let only_latency = [
            v("l1", "c", Signal::Latency, 0),
            v("l2", "c", Signal::Latency, 10),
        ];
        assert!(detect_causal(&refs(&only_latency), &s).is_none());
    }

    #[test]
    fn causal_fires_on_correlation_without_lagged_pairs() {
        // Lag 5 s: failures 10 s after latency are not lagged pairs, but
        // they share 30 s buckets, so the per-bucket counts correlate.
        let s = CausalSettings {
            max_lag_seconds: 5,
            ..CausalSettings::default()
        };
        let vs = [
            v("l1", "c", Signal::Latency, 0),
            v("f1", "c", Signal::Failure, 10),
            v("l2", "c", Signal::Latency, 300),
            v("f2", "c", Signal::Failure, 310),
        ];
        let p = detect_causal(&refs(&vs), &s).expect("correlated");
        assert!(
            p.description.contains("correlation 1.00"),
            "{}",
            p.description
        );
        assert!(!p.description.contains("lagged"), "{}", p.description);
        assert_eq!(p.violations.len(), 4);

        // Anti-correlated buckets do not fire.
        let apart = [
            v("l1", "c", Signal::Latency, 0),
            v("f1", "c", Signal::Failure, 100),
            v("l2", "c", Signal::Latency, 300),
            v("f2", "c", Signal::Failure, 400),
        ];
        assert!(detect_causal(&refs(&apart), &s).is_none());
    }

    // ---- frequency ----------------------------------------------------

    #[test]
    fn frequency_eight_vs_nine_and_the_inclusive_edge() {
        let s = AnalyzeSettings::default().frequency;
        let now = at(1000);
        let make = |n: usize, oldest: i64| -> Vec<Violation> {
            (0..n)
                .map(|i| {
                    let onset = if i == 0 { oldest } else { 1000 - i as i64 };
                    v(&format!("v{i}"), "c", Signal::Other, onset)
                })
                .collect()
        };
        assert!(detect_frequency(&refs(&make(8, 990)), now, &s).is_none());
        let p = detect_frequency(&refs(&make(9, 990)), now, &s).expect("frequent");
        assert_eq!(p.confidence, 0.70);
        assert_eq!(p.violations.len(), 9);
        // Oldest onset exactly 300 s before now counts; 301 s does not.
        assert!(detect_frequency(&refs(&make(9, 700)), now, &s).is_some());
        assert!(detect_frequency(&refs(&make(9, 699)), now, &s).is_none());
    }

    // ---- ranking, confidence, recommendations --------------------------

    #[test]
    fn ranking_ties_resolved_by_precedence_and_minor_signals_weighted() {
        let vs = [
            v("l", "c", Signal::Latency, 0),
            v("p", "c", Signal::Policy, 0),
            v("t1", "c", Signal::Throughput, 0),
            v("t2", "c", Signal::Throughput, 0),
            v("f", "c", Signal::Failure, 0),
        ];
        let tie = [pattern(PatternKind::Spatial, 0.8, &["l", "p"])];
        let ranked = rank_root_causes(&tie, &refs(&vs));
        let causes: Vec<RootCause> = ranked.iter().map(|r| r.cause).collect();
        assert_eq!(
            causes,
            vec![
                RootCause::PolicyMisconfiguration,
                RootCause::ValidationLatency
            ]
        );
        assert!(ranked.iter().all(|r| approx(r.confidence, 0.8)));

        let patterns = [
            pattern(PatternKind::Temporal, 0.85, &["t1", "t2", "f"]),
            pattern(PatternKind::Frequency, 0.70, &["f"]),
            pattern(PatternKind::Causal, 0.75, &["l", "f"]),
        ];
        let ranked = rank_root_causes(&patterns, &refs(&vs));
        let got: Vec<(RootCause, f64)> = ranked.iter().map(|r| (r.cause, r.confidence)).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, RootCause::InsufficientCapacity);
        assert!(approx(got[0].1, 0.85));
        assert_eq!(got[1].0, RootCause::CascadeFailure);
        assert!(approx(got[1].1, 0.75));
        // max(0.85 × 0.8 = 0.68, 0.70 × 1.0) = 0.70, then × 0.8 because
        // the causal pattern explains the failure: 0.56
        assert_eq!(got[2].0, RootCause::SystemInstability);
        assert!(approx(got[2].1, 0.56));

        assert!(rank_root_causes(&[], &refs(&vs)).is_empty());
    }

    #[test]
    fn signal_mapping_covers_the_vocabulary() {
        assert_eq!(cause_for_signal(Signal::Node), RootCause::NodeCrash);
        assert_eq!(
            cause_for_signal(Signal::Network),
            RootCause::NetworkPartition
        );
        assert_eq!(
            cause_for_signal(Signal::Resource),
            RootCause::ResourceExhaustion
        );
        assert_eq!(
            cause_for_signal(Signal::Other),
            RootCause::PerformanceDegradation
        );
    }

    #[test]
    fn overall_confidence_formula() {
        let ps = [
            pattern(PatternKind::Temporal, 0.85, &[]),
            pattern(PatternKind::Causal, 0.75, &[]),
        ];
        // 0.7 × 0.8 + 0.3 × 0.5
        assert!(approx(overall_confidence(&ps, 5, 10), 0.71));
        // Sample factor saturates at 1: 0.56 + 0.3
        assert!(approx(overall_confidence(&ps, 20, 10), 0.86));
        // No patterns: only the sample factor.
        assert!(approx(overall_confidence(&[], 5, 10), 0.15));
        assert!(approx(overall_confidence(&[], 0, 10), 0.0));
        assert!(approx(overall_confidence(&[], 3, 0), 0.3));
    }

    #[test]
    fn recommendations_one_line_per_cause() {
        let causes = [
            RankedCause {
                cause: RootCause::ValidationLatency,
                confidence: 0.9,
                components: Vec::new(),
            },
            RankedCause {
                cause: RootCause::Unknown,
                confidence: 0.1,
                components: Vec::new(),
            },
        ];
        let recs = recommendations(&causes);
        assert_eq!(recs.len(), 2);
        assert!(recs[0].contains("Scale up validation workers"));
        assert!(recs[1].contains("escalate"));
        assert!(recommendations(&[]).is_empty());
    }

    // ---- analyze ------------------------------------------------------

    #[test]
    fn analyze_end_to_end() {
        let s = AnalyzeSettings::default();
        let mut w = ViolationWindow::new(s.max_window_violations, seconds(s.window_seconds));
        let mut crit = v("f1", "charter", Signal::Failure, 40);
        crit.severity = Severity::Critical;
        w.observe(&[
            v("l1", "charter", Signal::Latency, 0),
            v("l2", "charter", Signal::Latency, 10),
            v("l3", "charter", Signal::Latency, 20),
            crit,
            v("x1", "api", Signal::Other, 250),
        ]);
        let r = analyze(&w, "chain-1", at(260), &s);
        assert!(r.id.starts_with("ana-"));
        assert_eq!(r.chain_id, "chain-1");
        assert_eq!(r.analyzed_at, at(260));
        assert_eq!(r.violation_count, 5);
        assert_eq!(r.max_severity, Some(Severity::Critical));
        assert_eq!(r.components, vec!["api", "charter"]);
        let kinds: Vec<PatternKind> = r.patterns.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            vec![
                PatternKind::Temporal,
                PatternKind::Spatial,
                PatternKind::Causal
            ]
        );
        assert_eq!(r.root_causes[0].cause, RootCause::ValidationLatency);
        assert!(approx(r.root_causes[0].confidence, 0.85));
        assert!(r
            .root_causes
            .iter()
            .any(|c| c.cause == RootCause::CascadeFailure));
        assert_eq!(r.recommendations.len(), r.root_causes.len());
        // 0.7 × mean(0.85, 0.80, 0.75) + 0.3 × 5/10
        assert!(approx(r.confidence, 0.7 * 0.8 + 0.15));
    }

    #[test]
    fn analyze_zero_detector_window_means_whole_analysis_window() {
        let mut s = AnalyzeSettings::default();
        let mut w = ViolationWindow::new(100, Duration::seconds(300));
        w.observe(&[
            v("a", "x", Signal::Other, 0),
            v("b", "y", Signal::Other, 150),
            v("c", "z", Signal::Other, 299),
        ]);
        let r = analyze(&w, "c", at(299), &s);
        assert!(r.patterns.is_empty());
        assert!(r.root_causes.is_empty());
        assert_eq!(r.recommendations.len(), 1);
        assert!(r.recommendations[0].contains("escalate"));
        s.temporal.window_seconds = 0;
        let r = analyze(&w, "c", at(299), &s);
        assert_eq!(r.patterns.len(), 1);
        assert_eq!(r.patterns[0].kind, PatternKind::Temporal);
    }

    #[test]
    fn analyze_empty_window() {
        let w = ViolationWindow::new(10, Duration::seconds(300));
        let r = analyze(&w, "c", at(0), &AnalyzeSettings::default());
        assert_eq!(r.violation_count, 0);
        assert!(r.patterns.is_empty());
        assert!(r.root_causes.is_empty());
        assert!(r.recommendations.is_empty());
        assert_eq!(r.max_severity, None);
        assert_eq!(r.confidence, 0.0);
    }

    #[test]
    fn twenty_thousand_violations() {
        let signals = [
            Signal::Latency,
            Signal::Failure,
            Signal::Throughput,
            Signal::Policy,
        ];
        let vs: Vec<Violation> = (0..20_000)
            .map(|i| {
                v(
                    &format!("fp{i}"),
                    &format!("comp{}", i % 50),
                    signals[i % signals.len()],
                    (i / 100) as i64,
                )
            })
            .collect();
        let mut w = ViolationWindow::new(10_000, Duration::seconds(600));
        w.observe(&vs);
        assert_eq!(w.len(), 10_000);
        assert_eq!(w.dropped_total(), 10_000);
        w.observe(&vs);
        assert_eq!(w.len(), 10_000);

        let s = AnalyzeSettings::default();
        let r = analyze(&w, "big", at(200), &s);
        assert_eq!(r.violation_count, 10_000);
        assert_eq!(r.components.len(), 50);
        assert!(r.patterns.iter().any(|p| p.kind == PatternKind::Temporal));
        assert!(r.patterns.iter().any(|p| p.kind == PatternKind::Causal));

        let all = refs(&vs);
        assert!(detect_temporal(&all, &temporal()).is_some());
        assert_eq!(detect_spatial(&all, &det(3, 0, 0.8)).len(), 50);
        assert!(detect_causal(&all, &CausalSettings::default()).is_some());
        assert!(detect_frequency(&all, at(200), &det(9, 300, 0.7)).is_some());
        assert!(!rank_root_causes(&r.patterns, &all).is_empty());
        assert_eq!(w.expire(at(10_000)), 10_000);
        assert!(w.is_empty());
    }

    #[test]
    fn failures_explained_by_preceding_latency_rank_below_the_latency_cause() {
        let vs = vec![
            v("lat", "charter", Signal::Latency, 0),
            v("fail", "charter", Signal::Failure, 10),
            v("tput", "charter", Signal::Throughput, 20),
        ];
        let r = refs(&vs);
        let burst = pattern(PatternKind::Temporal, 0.85, &["lat", "fail", "tput"]);
        let without = rank_root_causes(std::slice::from_ref(&burst), &r);
        let instability = |rs: &[RankedCause]| {
            rs.iter()
                .find(|c| c.cause == RootCause::SystemInstability)
                .map(|c| c.confidence)
        };
        assert!(approx(instability(&without).unwrap_or(0.0), 0.85));
        let causal = pattern(PatternKind::Causal, 0.75, &["lat", "fail"]);
        let with = rank_root_causes(&[burst, causal], &r);
        assert_eq!(with[0].cause, RootCause::ValidationLatency);
        assert!(approx(instability(&with).unwrap_or(0.0), 0.85 * 0.8));
    }

    #[test]
    fn each_cause_names_the_components_its_evidence_is_on() {
        let vs = vec![
            v("l1", "api", Signal::Latency, 0),
            v("l2", "api", Signal::Latency, 5),
            v("l3", "db", Signal::Latency, 6),
            v("f1", "db", Signal::Failure, 10),
        ];
        let r = refs(&vs);
        let burst = pattern(PatternKind::Temporal, 0.85, &["l1", "l2", "l3", "f1"]);
        let ranked = rank_root_causes(&[burst], &r);
        let of = |c: RootCause| {
            ranked
                .iter()
                .find(|x| x.cause == c)
                .map(|x| x.components.clone())
        };
        assert_eq!(
            of(RootCause::ValidationLatency),
            Some(vec!["api".to_string(), "db".to_string()]),
            "most violations first"
        );
        assert_eq!(
            of(RootCause::SystemInstability),
            Some(vec!["db".to_string()])
        );
    }
}
