//! Metric sources: the Prometheus sensor (PromQL rules through
//! `/api/v1/query`).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use mapek_actors::clock::SharedClock;
use mapek_actors::model::{new_id, Violation};
use mapek_actors::ports::{MetricSource, Polled, RuleFailure, SourceError};
use mapek_actors::settings::RuleSpec;
use serde::Deserialize;

use crate::retry::{backoff_delay, Retry};

/// Polls PromQL rules from a Prometheus server.
pub struct PrometheusSource {
    client: reqwest::Client,
    base: String,
    timeout: Duration,
    retries: u32,
    clock: SharedClock,
}

#[derive(Debug, Deserialize)]
struct QueryResponse {
    status: String,
    #[serde(default)]
    data: Option<QueryData>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct QueryData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct Sample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

impl PrometheusSource {
    /// A source querying `base_url` (e.g. `http://127.0.0.1:9090`).
    pub fn new(
        base_url: &str,
        timeout: Duration,
        retries: u32,
        clock: SharedClock,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(PrometheusSource {
            client,
            base: base_url.trim_end_matches('/').to_string(),
            timeout,
            retries,
            clock,
        })
    }

    async fn query_once(&self, rule: &RuleSpec) -> Result<Vec<Sample>, Retry<SourceError>> {
        let url = format!("{}/api/v1/query", self.base);
        let resp = self
            .client
            .get(&url)
            .query(&[("query", rule.expr.as_str())])
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    Retry::Transient(SourceError::Timeout(self.timeout.as_secs()))
                } else {
                    Retry::Transient(SourceError::Unreachable(format!("{url}: {e}")))
                }
            })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| {
            if e.is_timeout() {
                Retry::Transient(SourceError::Timeout(self.timeout.as_secs()))
            } else {
                Retry::Transient(SourceError::Unreachable(format!(
                    "{url}: reading body: {e}"
                )))
            }
        })?;
        let parsed: Result<QueryResponse, _> = serde_json::from_slice(&body);
        if status.as_u16() == 400 || status.as_u16() == 422 {
            if let Ok(QueryResponse {
                status: s,
                error_type,
                error,
                ..
            }) = &parsed
            {
                if s == "error" {
                    return Err(Retry::Permanent(SourceError::Query {
                        rule: rule.name.clone(),
                        error_type: error_type.clone().unwrap_or_default(),
                        message: error.clone().unwrap_or_default(),
                    }));
                }
            }
        }
        if !status.is_success() {
            let err = SourceError::Status {
                status: status.as_u16(),
                body: snippet(&body),
            };
            return Err(if status.is_server_error() {
                Retry::Transient(err)
            } else {
                Retry::Permanent(err)
            });
        }
        let parsed = parsed.map_err(|e| {
            Retry::Permanent(SourceError::Garbage(format!("{e}: {}", snippet(&body))))
        })?;
        if parsed.status != "success" {
            return Err(Retry::Permanent(SourceError::Garbage(format!(
                "status `{}`: {}",
                parsed.status,
                parsed.error.unwrap_or_default()
            ))));
        }
        let data = parsed
            .data
            .ok_or_else(|| Retry::Permanent(SourceError::Garbage("success without data".into())))?;
        match data.result_type.as_str() {
            "vector" => serde_json::from_value::<Vec<Sample>>(data.result)
                .map_err(|e| Retry::Permanent(SourceError::Garbage(format!("vector result: {e}")))),
            "scalar" => Ok(Vec::new()),
            other => Err(Retry::Permanent(SourceError::Garbage(format!(
                "rule `{}` returned a {other}, expected an instant vector",
                rule.name
            )))),
        }
    }

    async fn query(&self, rule: &RuleSpec) -> Result<Vec<Sample>, SourceError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.query_once(rule).await {
                Ok(v) => return Ok(v),
                Err(Retry::Transient(e)) if attempt <= self.retries => {
                    let d = backoff_delay(attempt, 200, 2_000);
                    tracing::debug!(rule = %rule.name, error = %e, delay_ms = d.as_millis() as u64, "prometheus query failed; retrying");
                    tokio::time::sleep(d).await;
                }
                Err(Retry::Transient(e)) | Err(Retry::Permanent(e)) => return Err(e),
            }
        }
    }

    fn to_violation(&self, rule: &RuleSpec, s: Sample) -> Result<Violation, SourceError> {
        let value: f64 = s.value.1.trim().parse().map_err(|_| {
            SourceError::Garbage(format!(
                "rule `{}`: value `{}` is not a number",
                rule.name, s.value.1
            ))
        })?;
        let now = self.clock.now();
        let mut fp = format!("prom:{}", rule.name);
        for (k, v) in &s.metric {
            fp.push_str(&format!(",{k}={v}"));
        }
        let metric = s
            .metric
            .get("__name__")
            .cloned()
            .unwrap_or_else(|| metric_name(&rule.expr).unwrap_or_else(|| rule.name.clone()));
        Ok(Violation {
            id: new_id("vio"),
            fingerprint: fp,
            rule: rule.name.clone(),
            severity: rule.severity,
            component: s
                .metric
                .get("component")
                .cloned()
                .unwrap_or_else(|| rule.component.clone()),
            metric,
            value: if value.is_finite() { value } else { 0.0 },
            labels: s.metric,
            signal: rule.signal(),
            first_seen: now,
            observed_at: now,
            source: "prometheus".into(),
        })
    }
}

/// The metric a PromQL expression reads: the first vector selector in its
/// syntax tree (parsed by the `promql-parser` crate), by its name or its
/// `__name__` matcher (`increase(foo_total[5m]) > 0` → `foo_total`;
/// `sum by (job) (rate(x_total[1m]))` → `x_total`). `None` for an
/// expression without a selector or that does not parse.
pub fn metric_name(expr: &str) -> Option<String> {
    let ast = promql_parser::parser::parse(expr).ok()?;
    first_selector(&ast)
}

fn first_selector(e: &promql_parser::parser::Expr) -> Option<String> {
    use promql_parser::parser::Expr;
    match e {
        Expr::VectorSelector(vs) => selector_name(vs),
        Expr::MatrixSelector(ms) => selector_name(&ms.vs),
        Expr::Aggregate(a) => first_selector(&a.expr),
        Expr::Unary(u) => first_selector(&u.expr),
        Expr::Binary(b) => first_selector(&b.lhs).or_else(|| first_selector(&b.rhs)),
        Expr::Paren(p) => first_selector(&p.expr),
        Expr::Subquery(s) => first_selector(&s.expr),
        Expr::Call(c) => c.args.args.iter().find_map(|a| first_selector(a)),
        _ => None,
    }
}

fn selector_name(vs: &promql_parser::parser::VectorSelector) -> Option<String> {
    vs.name.clone().or_else(|| {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__" && matches!(m.op, promql_parser::label::MatchOp::Equal))
            .map(|m| m.value.clone())
    })
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    s.chars().take(200).collect()
}

impl MetricSource for PrometheusSource {
    fn name(&self) -> &str {
        "prometheus"
    }

    fn poll<'a>(
        &'a self,
        rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Vec<Violation>, SourceError>> {
        Box::pin(async move {
            let polled = self.poll_rules(rules).await?;
            match polled.failed.into_iter().next() {
                Some(f) => Err(f.error),
                None => Ok(polled.violations),
            }
        })
    }

    fn poll_rules<'a>(
        &'a self,
        rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Polled, SourceError>> {
        Box::pin(async move {
            let mut out = Polled::default();
            for rule in rules {
                let fail = |error| RuleFailure {
                    rule: rule.name.clone(),
                    component: rule.component.clone(),
                    error,
                };
                match self.query(rule).await {
                    Ok(samples) => {
                        let converted: Result<Vec<Violation>, SourceError> = samples
                            .into_iter()
                            .map(|s| self.to_violation(rule, s))
                            .collect();
                        match converted {
                            Ok(vs) => out.violations.extend(vs),
                            Err(e) => out.failed.push(fail(e)),
                        }
                    }
                    // The rule is at fault (bad PromQL, wrong result type,
                    // an answer we cannot read): only this rule lacks
                    // evidence.
                    Err(e @ (SourceError::Query { .. } | SourceError::Garbage(_))) => {
                        out.failed.push(fail(e))
                    }
                    Err(e @ SourceError::Status { status, .. }) if status < 500 => {
                        out.failed.push(fail(e))
                    }
                    // The source is at fault: no evidence at all.
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_name_skips_functions_and_selectors() {
        assert_eq!(
            metric_name("increase(westworld_charter_policy_violations_total{severity=\"critical\"}[5m]) > 0").as_deref(),
            Some("westworld_charter_policy_violations_total")
        );
        assert_eq!(
            metric_name("westworld_charter_failure_rate > 0.10").as_deref(),
            Some("westworld_charter_failure_rate")
        );
        // A label name in a grouping is not the metric (the hand-written
        // tokenizer this replaced said `job`).
        assert_eq!(
            metric_name("sum by (job) (rate(x_total[1m]))").as_deref(),
            Some("x_total")
        );
        assert_eq!(
            metric_name("histogram_quantile(0.99, sum by (le) (rate(lat_bucket[5m]))) > 1")
                .as_deref(),
            Some("lat_bucket")
        );
        assert_eq!(
            metric_name("{__name__=\"up\", job=\"x\"} == 0").as_deref(),
            Some("up")
        );
        assert_eq!(metric_name("1 > 0"), None);
        assert_eq!(metric_name("rate(oops["), None, "does not parse");
    }
}
