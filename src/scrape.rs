//! A metric source that scrapes a `/metrics` endpoint directly, so the loop
//! runs without a Prometheus server (`mapek demo`).
//!
//! Rules are evaluated by a tiny evaluator that supports exactly two forms:
//! `METRIC{label="v",...} OP NUMBER` and
//! `increase(METRIC{...}[DURATION]) OP NUMBER`, with OP one of
//! `> < >= <= == !=`. `increase` is computed from the samples this source
//! kept from its own earlier scrapes within the duration (no extrapolation;
//! a drop of a counter is a reset). Anything else is rejected as
//! `unsupported`.
//!
//! The text exposition is parsed here, strictly ([`parse_exposition`]),
//! not by a crate: the text-format parsers on crates.io were tried (issue
//! 9) and each fails on input this source must read or refuse.
//! `prometheus-parse` 0.2.5 skips every line it cannot read (an HTML page
//! gives zero samples, no error), splits label values at `,` and `=`, and
//! drops names with `:`; `prom_text_format_parser` 0.1.0 rejects
//! OpenMetrics counters (`x_total` samples under `# TYPE x counter`, as
//! prometheus-client and so the simulator write them), a trailing comma in
//! a label set and an empty exposition; `openmetrics-parser` 0.5.1 is
//! LGPL-3.0 and its Prometheus mode rejects plain untyped expositions
//! (`a 1` then `b 2`: "Invalid Name in metric family") and series of one
//! name with different label names; `prometheus-exposition-format-rs`
//! 0.1.2 (nom 5, 2020) is unmaintained.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use mapek_actors::clock::SharedClock;
use mapek_actors::model::{new_id, Timestamp, Violation};
use mapek_actors::ports::{MetricSource, Polled, RuleFailure, SourceError};
use mapek_actors::settings::RuleSpec;

/// Points kept per series for `increase`.
const MAX_POINTS_PER_SERIES: usize = 256;
/// Series kept for `increase`.
const MAX_SERIES: usize = 10_000;
/// Longest `increase` range accepted.
const MAX_RANGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels of the series.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A character cursor over one line or expression.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Cursor { s, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.s.len() - trimmed.len();
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, t: &str) -> bool {
        if self.rest().starts_with(t) {
            self.pos += t.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "expected `{c}` at column {}, found {}",
                self.pos + 1,
                self.found()
            ))
        }
    }

    fn found(&self) -> String {
        match self.peek() {
            Some(c) => format!("`{c}`"),
            None => "the end".into(),
        }
    }

    /// A metric name (`colons` allowed) or a label name.
    fn ident(&mut self, colons: bool) -> Result<&'a str, String> {
        let start = self.pos;
        for (i, c) in self.rest().char_indices() {
            let ok = c.is_ascii_alphabetic()
                || c == '_'
                || (colons && c == ':')
                || (i > 0 && c.is_ascii_digit());
            if !ok {
                break;
            }
            self.pos = start + i + c.len_utf8();
        }
        if self.pos == start {
            Err(format!(
                "expected a name at column {}, found {}",
                start + 1,
                self.found()
            ))
        } else {
            Ok(&self.s[start..self.pos])
        }
    }

    /// A double-quoted string with `\\`, `\"` and `\n` escapes.
    fn quoted(&mut self) -> Result<String, String> {
        self.expect('"')?;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, '"')) => out.push('"'),
                    Some((_, other)) => {
                        out.push('\\');
                        out.push(other);
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(format!(
            "unterminated label value starting at column {}",
            self.pos + 1
        ))
    }

    /// `{name="value",...}` (the opening brace not yet consumed).
    fn label_set(&mut self, matcher: bool) -> Result<BTreeMap<String, String>, String> {
        let mut labels = BTreeMap::new();
        self.expect('{')?;
        loop {
            self.skip_ws();
            if self.eat('}') {
                return Ok(labels);
            }
            let name = self.ident(false)?.to_string();
            self.skip_ws();
            if matcher
                && (self.rest().starts_with("!=")
                    || self.rest().starts_with("=~")
                    || self.rest().starts_with("!~"))
            {
                return Err(format!(
                    "label matcher `{}` on `{name}`: only `=` is supported",
                    &self.rest()[..2]
                ));
            }
            self.expect('=')?;
            self.skip_ws();
            let value = self.quoted()?;
            if labels.insert(name.clone(), value).is_some() {
                return Err(format!("label `{name}` given twice"));
            }
            self.skip_ws();
            if self.eat(',') {
                continue;
            }
            self.skip_ws();
            self.expect('}')?;
            return Ok(labels);
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s.to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "+inf" | "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => {
            let first = s.chars().next()?;
            if first.is_ascii_digit() || matches!(first, '+' | '-' | '.') {
                s.parse::<f64>().ok().filter(|v| v.is_finite())
            } else {
                None
            }
        }
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let mut c = Cursor::new(line);
    let name = c.ident(true)?.to_string();
    let after_name = c.pos;
    c.skip_ws();
    let labels = if c.peek() == Some('{') {
        c.label_set(false)?
    } else {
        c.pos = after_name;
        BTreeMap::new()
    };
    let rest = c.rest();
    if !rest.starts_with(char::is_whitespace) {
        return Err(format!(
            "expected a space before the value, found {}",
            c.found()
        ));
    }
    let mut tokens = rest.split_whitespace();
    let raw = tokens.next().ok_or("missing value")?;
    let value = parse_value(raw).ok_or_else(|| format!("value `{raw}` is not a number"))?;
    if let Some(ts) = tokens.next() {
        if ts.starts_with('#') {
            // An OpenMetrics exemplar: ignored.
            return Ok(Sample {
                name,
                labels,
                value,
            });
        }
        if ts.parse::<f64>().is_err() {
            return Err(format!("timestamp `{ts}` is not a number"));
        }
        if let Some(extra) = tokens.next() {
            if !extra.starts_with('#') {
                return Err(format!("unexpected `{extra}` after the timestamp"));
            }
        }
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// The default rules in the two forms this evaluator supports: the node
/// rule reads `westworld_charter_unhealthy_nodes` instead of subtracting two
/// vectors, and the policy-violation rule uses `increase` over
/// `increase_window` (e.g. `"5m"`; the demo uses a few seconds so a healed
/// fault stops counting quickly).
pub fn scrape_rules(increase_window: &str) -> Vec<RuleSpec> {
    mapek_actors::settings::default_rules()
        .into_iter()
        .map(|mut r| {
            if r.name == "CharterNodesUnhealthy" {
                r.expr = "westworld_charter_unhealthy_nodes > 0".into();
            } else if r.expr.starts_with("increase(") {
                if let (Some(open), Some(close)) = (r.expr.rfind('['), r.expr.rfind(']')) {
                    r.expr = format!(
                        "{}[{increase_window}]{}",
                        &r.expr[..open],
                        &r.expr[close + 1..]
                    );
                }
            }
            r
        })
        .collect()
}

/// Parses the Prometheus text exposition format (0.0.4; OpenMetrics text
/// mostly too): comments and blank lines are skipped, label values may hold
/// `\\`, `\"` and `\n` escapes, timestamps and exemplars are ignored. The
/// error names the first bad line (1-based). Nothing is skipped silently:
/// an HTML page or any other line that is not a sample is an error, and so
/// is a text without a single sample (an empty body, comments only),
/// which would otherwise read as "no violations".
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line)
            .map_err(|e| format!("line {}: {e}: `{}`", n + 1, snippet(line, 120)))?;
        out.push(sample);
    }
    if out.is_empty() {
        return Err("no samples: not a metrics exposition (empty, or comments only)".into());
    }
    Ok(out)
}

fn snippet(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// A comparison operator of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `>`
    Gt,
    /// `<`
    Lt,
    /// `>=`
    Ge,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl CmpOp {
    /// Whether `left OP right` holds (false for NaN, as in PromQL).
    pub fn holds(self, left: f64, right: f64) -> bool {
        match self {
            CmpOp::Gt => left > right,
            CmpOp::Lt => left < right,
            CmpOp::Ge => left >= right,
            CmpOp::Le => left <= right,
            CmpOp::Eq => left == right,
            CmpOp::Ne => left != right,
        }
    }
}

/// A rule expression in one of the two supported forms.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleExpr {
    /// Metric name of the selector.
    pub metric: String,
    /// `label="value"` matchers (an empty value matches a missing label).
    pub matchers: BTreeMap<String, String>,
    /// `Some(range)` for `increase(...[range])`.
    pub range: Option<Duration>,
    /// Comparison.
    pub op: CmpOp,
    /// Right-hand number.
    pub threshold: f64,
}

impl RuleExpr {
    /// Whether a series with `name` and `labels` is selected.
    pub fn selects(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        name == self.metric
            && self
                .matchers
                .iter()
                .all(|(k, v)| labels.get(k).map(String::as_str).unwrap_or("") == v)
    }
}

fn parse_duration(c: &mut Cursor<'_>) -> Result<Duration, String> {
    let mut total_ms: u128 = 0;
    let mut parts = 0;
    loop {
        let digits: String = c.rest().chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() {
            break;
        }
        c.pos += digits.len();
        let n: u128 = digits
            .parse()
            .map_err(|_| format!("duration number `{digits}` too large"))?;
        let unit_ms: u128 = if c.eat_str("ms") {
            1
        } else if c.eat('s') {
            1_000
        } else if c.eat('m') {
            60_000
        } else if c.eat('h') {
            3_600_000
        } else if c.eat('d') {
            86_400_000
        } else if c.eat('w') {
            7 * 86_400_000
        } else {
            return Err(format!(
                "duration unit expected at column {} (ms, s, m, h, d, w)",
                c.pos + 1
            ));
        };
        total_ms = total_ms.saturating_add(n.saturating_mul(unit_ms));
        parts += 1;
    }
    if parts == 0 || total_ms == 0 {
        return Err(format!(
            "a positive duration is expected at column {}",
            c.pos + 1
        ));
    }
    let ms = u64::try_from(total_ms).unwrap_or(u64::MAX);
    let d = Duration::from_millis(ms);
    if d > MAX_RANGE {
        return Err(format!(
            "range {d:?} is longer than the supported {MAX_RANGE:?}"
        ));
    }
    Ok(d)
}

/// Parses a rule expression; the error says why it is not one of the two
/// supported forms.
pub fn parse_rule_expr(expr: &str) -> Result<RuleExpr, String> {
    let mut c = Cursor::new(expr.trim());
    let first = c.ident(true)?;
    let mut lookahead = Cursor { s: c.s, pos: c.pos };
    lookahead.skip_ws();
    let (metric, matchers, range) = if lookahead.peek() == Some('(') {
        if first != "increase" {
            return Err(format!(
                "function `{first}` is not supported (only increase)"
            ));
        }
        c = lookahead;
        c.expect('(')?;
        c.skip_ws();
        let metric = c.ident(true)?.to_string();
        c.skip_ws();
        let matchers = if c.peek() == Some('{') {
            c.label_set(true)?
        } else {
            BTreeMap::new()
        };
        c.skip_ws();
        c.expect('[')?;
        c.skip_ws();
        let range = parse_duration(&mut c)?;
        c.skip_ws();
        c.expect(']')?;
        c.skip_ws();
        c.expect(')')?;
        (metric, matchers, Some(range))
    } else {
        let metric = first.to_string();
        c.skip_ws();
        let matchers = if c.peek() == Some('{') {
            c.label_set(true)?
        } else {
            BTreeMap::new()
        };
        (metric, matchers, None)
    };
    c.skip_ws();
    let op = if c.eat_str(">=") {
        CmpOp::Ge
    } else if c.eat_str("<=") {
        CmpOp::Le
    } else if c.eat_str("==") {
        CmpOp::Eq
    } else if c.eat_str("!=") {
        CmpOp::Ne
    } else if c.eat('>') {
        CmpOp::Gt
    } else if c.eat('<') {
        CmpOp::Lt
    } else {
        return Err(format!(
            "expected a comparison (> < >= <= == !=) at column {}, found {}",
            c.pos + 1,
            c.found()
        ));
    };
    c.skip_ws();
    let raw = c.rest().trim();
    let threshold = parse_value(raw)
        .ok_or_else(|| format!("expected a number after the comparison, found `{raw}`"))?;
    Ok(RuleExpr {
        metric,
        matchers,
        range,
        op,
        threshold,
    })
}

type SeriesKey = (String, BTreeMap<String, String>);

/// Samples kept from earlier scrapes, for `increase`.
#[derive(Debug, Default)]
struct History {
    series: HashMap<SeriesKey, VecDeque<(Timestamp, f64)>>,
}

impl History {
    fn record(&mut self, key: SeriesKey, at: Timestamp, value: f64) {
        if !self.series.contains_key(&key) && self.series.len() >= MAX_SERIES {
            return;
        }
        let points = self.series.entry(key).or_default();
        if points.back().is_some_and(|(t, _)| *t > at) {
            // The clock went back: start over rather than mix times.
            points.clear();
        }
        if points.len() >= MAX_POINTS_PER_SERIES {
            points.pop_front();
        }
        points.push_back((at, value));
    }

    fn prune(&mut self, older_than: Timestamp) {
        self.series.retain(|_, points| {
            while points.front().is_some_and(|(t, _)| *t < older_than) {
                points.pop_front();
            }
            !points.is_empty()
        });
    }

    /// Increase of the series over `(now − range, now]`: the sum of its
    /// rises, a drop counting as a reset to zero. `None` with fewer than two
    /// points in the range.
    fn increase(&self, key: &SeriesKey, now: Timestamp, range: Duration) -> Option<f64> {
        let points = self.series.get(key)?;
        let from = now - chrono::Duration::from_std(range).unwrap_or(chrono::Duration::MAX);
        let mut in_range = points.iter().filter(|(t, _)| *t > from && *t <= now);
        let (_, mut prev) = *in_range.next()?;
        let mut total = 0.0;
        let mut n = 1;
        for (_, v) in in_range {
            total += if *v >= prev { *v - prev } else { *v };
            prev = *v;
            n += 1;
        }
        (n >= 2).then_some(total)
    }
}

/// Scrapes one `/metrics` URL and evaluates the rules on what it finds.
pub struct ScrapeSource {
    client: reqwest::Client,
    url: String,
    timeout: Duration,
    clock: SharedClock,
    history: Mutex<History>,
}

fn compile(rules: &[RuleSpec]) -> Result<Vec<RuleExpr>, SourceError> {
    rules
        .iter()
        .map(|r| {
            parse_rule_expr(&r.expr).map_err(|message| SourceError::Query {
                rule: r.name.clone(),
                error_type: "unsupported".into(),
                message,
            })
        })
        .collect()
}

impl ScrapeSource {
    /// A source scraping `url` (e.g. `http://127.0.0.1:9100/metrics`) with a
    /// per-scrape `timeout`; `clock` dates the samples kept for `increase`.
    pub fn new(url: &str, timeout: Duration, clock: SharedClock) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(ScrapeSource {
            client,
            url: url.to_string(),
            timeout,
            clock,
            history: Mutex::new(History::default()),
        })
    }

    /// The scraped URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn timeout_secs(&self) -> u64 {
        self.timeout.as_secs_f64().ceil() as u64
    }

    fn map_err(&self, e: reqwest::Error, what: &str) -> SourceError {
        if e.is_timeout() {
            SourceError::Timeout(self.timeout_secs())
        } else {
            SourceError::Unreachable(format!("{}: {what}{e}", self.url))
        }
    }

    /// Fetches and parses the exposition once.
    pub async fn scrape(&self) -> Result<Vec<Sample>, SourceError> {
        let resp = self
            .client
            .get(&self.url)
            .header("Accept", "text/plain;version=0.0.4;q=1,*/*;q=0.1")
            .send()
            .await
            .map_err(|e| self.map_err(e, ""))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| self.map_err(e, "reading body: "))?;
        if !status.is_success() {
            return Err(SourceError::Status {
                status: status.as_u16(),
                body: snippet(&text, 200),
            });
        }
        parse_exposition(&text).map_err(|e| SourceError::Garbage(format!("{}: {e}", self.url)))
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `samples` as one scrape made now: keeps the series `increase`
    /// rules need, then evaluates every rule and returns one violation per
    /// breaching series.
    pub fn observe(
        &self,
        rules: &[RuleSpec],
        samples: &[Sample],
    ) -> Result<Vec<Violation>, SourceError> {
        let exprs = compile(rules)?;
        let now = self.clock.now();
        let longest = exprs.iter().filter_map(|e| e.range).max();
        let mut history = self.lock();
        if let Some(longest) = longest {
            for s in samples {
                if exprs
                    .iter()
                    .any(|e| e.range.is_some() && e.selects(&s.name, &s.labels))
                {
                    history.record((s.name.clone(), s.labels.clone()), now, s.value);
                }
            }
            history
                .prune(now - chrono::Duration::from_std(longest).unwrap_or(chrono::Duration::MAX));
        }
        let mut out = Vec::new();
        for (rule, expr) in rules.iter().zip(&exprs) {
            let mut seen = std::collections::HashSet::new();
            for s in samples.iter().filter(|s| expr.selects(&s.name, &s.labels)) {
                if !seen.insert(&s.labels) {
                    continue;
                }
                let value = match expr.range {
                    None => Some(s.value),
                    Some(range) => {
                        history.increase(&(s.name.clone(), s.labels.clone()), now, range)
                    }
                };
                if let Some(value) = value {
                    if expr.op.holds(value, expr.threshold) {
                        out.push(violation(rule, s, value, now));
                    }
                }
            }
        }
        Ok(out)
    }
}

fn violation(rule: &RuleSpec, s: &Sample, value: f64, now: Timestamp) -> Violation {
    let mut fingerprint = format!("scrape:{}", rule.name);
    for (k, v) in &s.labels {
        fingerprint.push_str(&format!(",{k}={v}"));
    }
    Violation {
        id: new_id("vio"),
        fingerprint,
        rule: rule.name.clone(),
        severity: rule.severity,
        component: s
            .labels
            .get("component")
            .cloned()
            .unwrap_or_else(|| rule.component.clone()),
        metric: s.name.clone(),
        value: if value.is_finite() { value } else { 0.0 },
        labels: s.labels.clone(),
        signal: rule.signal(),
        first_seen: now,
        observed_at: now,
        source: "scrape".into(),
    }
}

impl MetricSource for ScrapeSource {
    fn name(&self) -> &str {
        "scrape"
    }

    fn poll<'a>(
        &'a self,
        rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Vec<Violation>, SourceError>> {
        Box::pin(async move {
            compile(rules)?;
            let samples = self.scrape().await?;
            self.observe(rules, &samples)
        })
    }

    fn poll_rules<'a>(
        &'a self,
        rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Polled, SourceError>> {
        Box::pin(async move {
            // Rules this evaluator cannot read fail alone.
            let mut good = Vec::new();
            let mut failed = Vec::new();
            for rule in rules {
                match compile(std::slice::from_ref(rule)) {
                    Ok(_) => good.push(rule.clone()),
                    Err(error) => failed.push(RuleFailure {
                        rule: rule.name.clone(),
                        component: rule.component.clone(),
                        error,
                    }),
                }
            }
            let samples = self.scrape().await?;
            Ok(Polled {
                violations: self.observe(&good, &samples)?,
                failed,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{self, FaultKind, Simulator};
    use mapek_actors::clock::{ManualClock, SystemClock};
    use mapek_actors::model::{Severity, Signal};
    use std::collections::BTreeSet;
    use std::sync::Arc;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sample(name: &str, pairs: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: labels(pairs),
            value,
        }
    }

    fn rule(name: &str, expr: &str) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            expr: expr.into(),
            severity: Severity::Warning,
            component: "charter".into(),
            signal: None,
        }
    }

    fn manual() -> (ManualClock, SharedClock) {
        let start = chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let c = ManualClock::new(start);
        (c.clone(), Arc::new(c))
    }

    fn source(clock: SharedClock) -> ScrapeSource {
        ScrapeSource::new("http://127.0.0.1:9/metrics", Duration::from_secs(2), clock).unwrap()
    }

    #[test]
    fn parses_samples_comments_and_escaped_labels() {
        let text = "# HELP x_total A counter.\n# TYPE x_total counter\n\n\
                    x_total{path=\"/a \\\"b\\\" c\\\\d\\ne\",code=\"200\",} 3 1700000000000\n\
                    up 1\n\
                    temp{room=\"k\"} -1.5e2\n\
                    nan_metric NaN\n\
                    inf_metric +Inf\n\
                    ns:rule:rate5m{a=\"# not a comment\"} 0.25\n\
                    om_total 4 # {trace_id=\"abc\"} 1\n\
                    # EOF\n";
        let s = parse_exposition(text).unwrap();
        assert_eq!(s.len(), 7);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(
            s[0].labels,
            labels(&[("path", "/a \"b\" c\\d\ne"), ("code", "200")])
        );
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1], sample("up", &[], 1.0));
        assert_eq!(s[2].value, -150.0);
        assert!(s[3].value.is_nan());
        assert_eq!(s[4].value, f64::INFINITY);
        assert_eq!(
            s[5].labels.get("a").map(String::as_str),
            Some("# not a comment")
        );
        assert_eq!(s[6].value, 4.0);
    }

    #[test]
    fn html_json_and_empty_bodies_are_errors_not_zero_samples() {
        let html = "<!DOCTYPE html>\n<html><head><title>Login</title></head>\n<body>Please log in</body></html>\n";
        let e = parse_exposition(html).unwrap_err();
        assert!(e.starts_with("line 1:"), "{e}");
        let e = parse_exposition("{\"status\":\"success\",\"data\":{}}").unwrap_err();
        assert!(e.starts_with("line 1:"), "{e}");
        // Samples first, then a page: still an error, at its line.
        let e = parse_exposition("up 1\n<html>\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        for empty in ["", "\n\n", "# HELP up Up.\n# TYPE up gauge\n# EOF\n"] {
            let e = parse_exposition(empty).unwrap_err();
            assert!(e.contains("no samples"), "{empty:?}: {e}");
        }
    }

    #[test]
    fn garbage_names_its_line() {
        let err = parse_exposition("# TYPE up gauge\nup 1\nthis is garbage\n").unwrap_err();
        assert!(err.starts_with("line 3:"), "{err}");
        for bad in [
            "up",
            "up abc",
            "up{a=b} 1",
            "up{a=\"b\" 1",
            "up{a=\"b\",a=\"c\"} 1",
            "up 1 notatimestamp",
            "{a=\"b\"} 1",
            "up{a=\"unterminated} 1",
        ] {
            let e = parse_exposition(&format!("ok 1\n{bad}\n")).unwrap_err();
            assert!(e.starts_with("line 2:"), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_both_rule_forms() {
        let e = parse_rule_expr("westworld_charter_failure_rate > 0.10").unwrap();
        assert_eq!(e.metric, "westworld_charter_failure_rate");
        assert!(e.matchers.is_empty() && e.range.is_none());
        assert_eq!((e.op, e.threshold), (CmpOp::Gt, 0.10));
        let e = parse_rule_expr(
            "increase(westworld_charter_policy_violations_total{severity=\"critical\"}[5m]) > 0",
        )
        .unwrap();
        assert_eq!(e.metric, "westworld_charter_policy_violations_total");
        assert_eq!(e.matchers, labels(&[("severity", "critical")]));
        assert_eq!(e.range, Some(Duration::from_secs(300)));
        let e = parse_rule_expr(" increase ( x_total { a = \"1\" , b=\"2\" } [ 1h30m ] ) <= 2.5 ")
            .unwrap();
        assert_eq!(e.range, Some(Duration::from_secs(5400)));
        assert_eq!(e.matchers, labels(&[("a", "1"), ("b", "2")]));
        assert_eq!(parse_rule_expr("x{} >= 1").unwrap().op, CmpOp::Ge);
        assert_eq!(parse_rule_expr("x < -1").unwrap().threshold, -1.0);
        assert_eq!(parse_rule_expr("x == 3").unwrap().op, CmpOp::Eq);
        assert_eq!(parse_rule_expr("x != 3").unwrap().op, CmpOp::Ne);
        assert_eq!(
            parse_rule_expr("increase(x[30s]) > 0").unwrap().range,
            Some(Duration::from_secs(30))
        );
        for bad in [
            "rate(x[5m]) > 0",
            "sum(x) > 1",
            "x > 1 and y < 2",
            "x{a!=\"b\"} > 1",
            "x{a=~\"b.*\"} > 1",
            "x > bool 1",
            "x",
            "x > ",
            "increase(x) > 0",
            "increase(x[5]) > 0",
            "increase(x[0s]) > 0",
            "1 > 0",
            "x + 1 > 2",
        ] {
            assert!(parse_rule_expr(bad).is_err(), "{bad} should be unsupported");
        }
    }

    #[test]
    fn instant_rules_with_every_operator() {
        let (_, clock) = manual();
        let src = source(clock);
        let samples = vec![
            sample("m", &[("component", "db"), ("zone", "a")], 5.0),
            sample("m", &[("zone", "b")], 1.0),
            sample("other", &[], 5.0),
        ];
        let cases: [(&str, &[&str]); 7] = [
            ("m > 1", &["a"]),
            ("m < 5", &["b"]),
            ("m >= 1", &["a", "b"]),
            ("m <= 1", &["b"]),
            ("m == 5", &["a"]),
            ("m != 5", &["b"]),
            ("m{zone=\"b\"} > 0", &["b"]),
        ];
        for (expr, zones) in cases {
            let v = src.observe(&[rule("R", expr)], &samples).unwrap();
            let got: Vec<&str> = v.iter().map(|v| v.labels["zone"].as_str()).collect();
            assert_eq!(got, zones.to_vec(), "{expr}");
        }
        let v = src.observe(&[rule("R", "m > 1")], &samples).unwrap();
        assert_eq!(v[0].fingerprint, "scrape:R,component=db,zone=a");
        assert_eq!(v[0].component, "db");
        assert_eq!(v[0].metric, "m");
        assert_eq!(v[0].value, 5.0);
        assert_eq!(v[0].source, "scrape");
        assert_eq!(v[0].severity, Severity::Warning);
        let v = src.observe(&[rule("R", "m < 2")], &samples).unwrap();
        assert_eq!(v[0].component, "charter", "rule component without a label");
        // An empty matcher selects series without the label.
        assert!(
            src.observe(&[rule("R", "other{zone=\"\"} > 1")], &samples)
                .unwrap()
                .len()
                == 1
        );
    }

    #[test]
    fn increase_across_scrapes_window_and_reset() {
        let (clock, shared) = manual();
        let src = source(shared);
        let rules = [rule(
            "PolicyInc",
            "increase(c_total{severity=\"critical\"}[5m]) > 0",
        )];
        let at = |v: f64| {
            vec![
                sample("c_total", &[("severity", "critical")], v),
                sample("c_total", &[("severity", "warning")], v * 10.0),
            ]
        };
        // One scrape: no increase known yet.
        assert!(src.observe(&rules, &at(5.0)).unwrap().is_empty());
        clock.advance(Duration::from_secs(15));
        // Unchanged: increase 0, quiet.
        assert!(src.observe(&rules, &at(5.0)).unwrap().is_empty());
        clock.advance(Duration::from_secs(15));
        let v = src.observe(&rules, &at(8.0)).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].value, 3.0);
        assert_eq!(v[0].signal, Signal::Policy);
        assert_eq!(v[0].labels, labels(&[("severity", "critical")]));
        // Reset: 8 → 2 counts as +2.
        clock.advance(Duration::from_secs(15));
        let v = src.observe(&rules, &at(2.0)).unwrap();
        assert_eq!(v[0].value, 5.0);
        // After the window the old rises are forgotten.
        clock.advance(Duration::from_secs(301));
        assert!(src.observe(&rules, &at(2.0)).unwrap().is_empty());
        clock.advance(Duration::from_secs(15));
        assert!(src.observe(&rules, &at(2.0)).unwrap().is_empty());
        // Memory is bounded per series.
        for _ in 0..(MAX_POINTS_PER_SERIES + 10) {
            clock.advance(Duration::from_millis(10));
            src.observe(&rules, &at(2.0)).unwrap();
        }
        let h = src.lock();
        assert!(h.series.values().all(|p| p.len() <= MAX_POINTS_PER_SERIES));
        assert_eq!(
            h.series.len(),
            1,
            "only series an increase rule selects are kept"
        );
    }

    #[test]
    fn unsupported_rule_is_a_query_error() {
        let (_, clock) = manual();
        let src = source(clock);
        let err = src
            .observe(&[rule("Rate", "rate(x_total[5m]) > 1")], &[])
            .unwrap_err();
        match err {
            SourceError::Query {
                rule,
                error_type,
                message,
            } => {
                assert_eq!(rule, "Rate");
                assert_eq!(error_type, "unsupported");
                assert!(message.contains("rate"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn scrapes_the_simulator() {
        let sim = Simulator::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sim::serve(listener, sim.clone(), None, async move {
            let _ = rx.await;
        }));
        let src = ScrapeSource::new(
            &format!("http://{addr}/metrics"),
            Duration::from_secs(5),
            Arc::new(SystemClock),
        )
        .unwrap();
        assert_eq!(src.name(), "scrape");
        let rules = scrape_rules("5m");
        let names = |v: &[Violation]| v.iter().map(|v| v.rule.clone()).collect::<BTreeSet<_>>();

        assert!(src.poll(&rules).await.unwrap().is_empty());
        assert!(src.poll(&rules).await.unwrap().is_empty());

        sim.inject(FaultKind::LoadSpike).unwrap();
        let v = src.poll(&rules).await.unwrap();
        assert_eq!(
            names(&v),
            BTreeSet::from([
                "CharterValidationLatencyHigh".to_string(),
                "CharterFailureRateHigh".to_string(),
                "CharterThroughputLow".to_string(),
            ])
        );
        assert!(v
            .iter()
            .all(|v| v.component == "charter" && v.source == "scrape"));
        sim.clear_faults();
        assert!(src.poll(&rules).await.unwrap().is_empty());

        sim.inject(FaultKind::BadPolicy).unwrap();
        src.poll(&rules).await.unwrap();
        let v = src.poll(&rules).await.unwrap();
        let critical: Vec<&Violation> = v
            .iter()
            .filter(|v| v.rule == "CharterCriticalPolicyViolations")
            .collect();
        assert_eq!(
            critical.len(),
            3,
            "one series per broken policy check: {v:?}"
        );
        assert_eq!(critical[0].severity, Severity::Critical);
        assert_eq!(
            critical[0].metric,
            "westworld_charter_policy_violations_total"
        );
        assert!(critical[0].value > 0.0);

        // Errors: HTTP status, garbage.
        let bad = ScrapeSource::new(
            &format!("http://{addr}/nope"),
            Duration::from_secs(5),
            Arc::new(SystemClock),
        )
        .unwrap();
        assert!(matches!(
            bad.poll(&rules).await,
            Err(SourceError::Status { status: 404, .. })
        ));
        let garbage = ScrapeSource::new(
            &format!("http://{addr}/sim/state"),
            Duration::from_secs(5),
            Arc::new(SystemClock),
        )
        .unwrap();
        assert!(matches!(
            garbage.poll(&rules).await,
            Err(SourceError::Garbage(_))
        ));

        let _ = tx.send(());
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn unreachable_and_timeout() {
        // A port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let src = ScrapeSource::new(
            &format!("http://127.0.0.1:{port}/metrics"),
            Duration::from_secs(2),
            Arc::new(SystemClock),
        )
        .unwrap();
        assert!(matches!(
            src.poll(&scrape_rules("5m")).await,
            Err(SourceError::Unreachable(_))
        ));

        // A server that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                kept.push(sock);
            }
        });
        let src = ScrapeSource::new(
            &format!("http://{addr}/metrics"),
            Duration::from_millis(300),
            Arc::new(SystemClock),
        )
        .unwrap();
        assert!(matches!(
            src.poll(&scrape_rules("5m")).await,
            Err(SourceError::Timeout(1))
        ));
        hold.abort();
    }
}
