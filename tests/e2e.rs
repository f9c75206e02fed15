//! End to end against REAL servers: Debian's `prometheus` and
//! `prometheus-alertmanager`, started here on loopback ports with temporary
//! configs, the `mapek` binary, and the simulated Charter (served over real
//! HTTP from this test process, so the test can inject faults and read the
//! calls it received). A missing server binary fails these tests.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mapek::sim::{FaultKind, Topology};
use mapek_actors::clock::SystemClock;
use serde_json::Value;
use support::live::{charter_on, get, mapek, wait_until, Charter, Mapek};
use support::servers::{alertmanager_at, prometheus, wait_http_ok};
use support::{free_addr, Proc};

fn charter() -> Charter {
    charter_with(Topology::default())
}

/// The simulated Charter with the components of `topology`.
fn charter_with(topology: Topology) -> Charter {
    charter_on(topology, Arc::new(SystemClock))
}

impl Mapek {
    /// The first execution with a verified outcome.
    fn wait_outcome(&mut self, limit: Duration) -> Value {
        let url = self.url("/api/v1/executions");
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until(limit, "a verified execution in mapek's knowledge", || {
                get(&url)?["executions"]
                    .as_array()?
                    .iter()
                    .find(|e| e["outcome"].is_string())
                    .cloned()
            })
        }));
        match found {
            Ok(v) => v,
            Err(_) => panic!("no verified execution; mapek said:\n{}", self.proc.output()),
        }
    }
}

fn common(charter: SocketAddr) -> String {
    format!(
        "monitor:\n  interval_seconds: 1\n\
         charter:\n  url: http://{charter}\n\
         execute:\n  verification_window_seconds: 8\n  call_timeout_seconds: 5\n\
         plan:\n  cooldown_seconds: 5\n"
    )
}

fn charter_rules() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/prometheus/charter-alerts.yml"
    ))
    .expect("rules")
}

#[test]
fn alertmanager_path_prometheus_alerts_reach_mapek_which_heals_the_charter() {
    let ch = charter();
    // mapek first (Alertmanager needs its webhook address); mapek verifies
    // by asking this Alertmanager which alerts fire now.
    let am_addr = free_addr();
    let mut m = mapek(&format!(
        "{}prometheus:\n  enabled: false\nalertmanager:\n  enabled: true\n  url: http://{am_addr}\n",
        common(ch.addr)
    ));
    let am = alertmanager_at(&m.url("/api/v1/alerts"), am_addr);
    let prom = prometheus(
        &[("charter", ch.addr)],
        Some(&charter_rules()),
        Some(am.addr),
    );
    wait_until(
        Duration::from_secs(30),
        "prometheus scraping the charter",
        || {
            let r = get(&format!(
                "{}/api/v1/query?query=up{{job=\"charter\"}}",
                prom.url()
            ))?;
            (r["data"]["result"][0]["value"][1] == "1").then_some(())
        },
    );

    ch.sim.inject(FaultKind::LoadSpike).expect("inject");
    let exec = m.wait_outcome(Duration::from_secs(120));
    let outcome = exec["outcome"].as_str().unwrap_or("");
    assert!(outcome == "SUCCESS" || outcome == "PARTIAL", "{exec}");
    assert_eq!(exec["status"], "COMPLETED");
    assert!(
        exec["violations_before"].as_u64().unwrap_or(0) >= 1,
        "{exec}"
    );
    assert!(ch.sim.healthy(), "the fault healed: {}", ch.sim.state());
    let calls = ch.sim.calls();
    assert!(
        calls.iter().any(|c| c.path == "/api/v1/committee/scale"),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|c| c.path == "/api/v1/policies/validate"),
        "pre-flight: {calls:?}"
    );
    // The outcome is in Knowledge, learned per (cause, action).
    let patterns = get(&m.url("/api/v1/knowledge/patterns")).expect("patterns");
    assert!(
        patterns["patterns"]["by_action"]["SCALE_UP"]["executions"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{patterns}"
    );
    let metrics = reqwest::blocking::get(m.url("/metrics"))
        .expect("metrics")
        .text()
        .expect("text");
    let received = metrics
        .lines()
        .find(|l| l.starts_with("mape_k_alerts_received_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        received >= 1.0,
        "alerts came through Alertmanager's webhook:\n{metrics}"
    );
    drop(prom);
    drop(am);
    m.proc.term();
    assert!(m.proc.wait_exit(Duration::from_secs(20)).success());
}

fn polling_config(charter: SocketAddr, prometheus: &str) -> String {
    format!(
        "{}prometheus:\n  enabled: true\n  url: {prometheus}\n  timeout_seconds: 2\n  retries: 0\nalertmanager:\n  enabled: false\n",
        common(charter)
    )
}

#[test]
fn promql_polling_path_detects_a_node_crash_and_restarts_the_committee() {
    let ch = charter();
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    // One rule is broken PromQL on another component: it fails alone.
    let rules = "monitor:\n  interval_seconds: 1\n  rules:\n".to_string()
        + &mapek_actors::settings::default_rules()
            .iter()
            .map(|r| {
                format!(
                    "    - {{name: {}, expr: '{}', severity: {}, component: {}}}\n",
                    r.name,
                    r.expr,
                    r.severity.as_str(),
                    r.component
                )
            })
            .collect::<String>()
        + "    - {name: Typo, expr: 'rate(oops[', severity: warning, component: elsewhere}\n";
    let cfg =
        polling_config(ch.addr, &prom.url()).replace("monitor:\n  interval_seconds: 1\n", &rules);
    let mut m = mapek(&format!("{cfg}logging:\n  format: json\n"));
    wait_until(
        Duration::from_secs(30),
        "mapek's prometheus source to be up",
        || {
            let s = get(&m.url("/api/v1/state"))?;
            (s["sources"][0]["status"] == "up").then_some(())
        },
    );
    ch.sim.inject(FaultKind::NodeCrash).expect("inject");
    let exec = m.wait_outcome(Duration::from_secs(120));
    assert_eq!(exec["outcome"], "SUCCESS", "{exec}");
    assert_eq!(exec["root_cause"], "node_crash", "{exec}");
    assert!(ch.sim.healthy());
    assert!(ch
        .sim
        .calls()
        .iter()
        .any(|c| c.path == "/api/v1/committee/restart"));
    let state = get(&m.url("/api/v1/state")).expect("state");
    assert_eq!(state["sources"][0]["status"], "up", "{state}");
    assert!(
        state["sources"][0]["failing_rules"][0]
            .as_str()
            .unwrap_or("")
            .starts_with("Typo: "),
        "the broken rule is named: {state}"
    );
    let best = get(&m.url("/api/v1/knowledge/best-action?cause=node_crash")).expect("best");
    assert_eq!(best["action"], "RESTART_SERVICE", "{best}");
    let analyses = get(&m.url("/api/v1/analyses?limit=5")).expect("analyses");
    assert!(!analyses["analyses"]
        .as_array()
        .map(|a| a.is_empty())
        .unwrap_or(true));

    // One incident, followed through every phase by its chain id in the
    // JSON logs (as a field or in the span).
    let chain = exec["chain_id"].as_str().expect("chain id").to_string();
    m.proc
        .wait_for("outcome recorded in knowledge", Duration::from_secs(10));
    let output = m.proc.output();
    let lines: Vec<Value> = output
        .lines()
        .filter(|l| l.contains(&chain))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    for step in [
        "incident diagnosed",
        "admitted; handing to the executor",
        "executing",
        "action completed",
        "execution finished",
        "outcome recorded in knowledge",
    ] {
        assert!(
            messages.contains(&step),
            "no `{step}` log line for chain {chain}: {messages:?}"
        );
    }
    m.proc.term();
    assert!(m.proc.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn prometheus_down_mid_run_means_no_evidence_and_no_action_until_it_returns() {
    let ch = charter();
    let mut prom = prometheus(&[("charter", ch.addr)], None, None);
    let mut m = mapek(&polling_config(ch.addr, &prom.url()));
    wait_until(
        Duration::from_secs(30),
        "mapek's prometheus source to be up",
        || {
            let s = get(&m.url("/api/v1/state"))?;
            (s["sources"][0]["status"] == "up").then_some(())
        },
    );

    prom.kill();
    ch.sim.inject(FaultKind::LoadSpike).expect("inject");
    // Five failed polls in a row: the Monitor has seen no evidence for a while.
    let state = wait_until(
        Duration::from_secs(60),
        "the source to be degraded for 5 polls",
        || {
            let s = get(&m.url("/api/v1/state"))?;
            (s["sources"][0]["status"] == "degraded"
                && s["sources"][0]["consecutive_failures"].as_u64()? >= 5)
                .then_some(s)
        },
    );
    assert!(
        state["state"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("prometheus"),
        "{state}"
    );
    let acted: Vec<_> = ch
        .sim
        .calls()
        .into_iter()
        .filter(|c| c.method == "POST")
        .collect();
    assert!(acted.is_empty(), "no action on missing evidence: {acted:?}");
    let execs = get(&m.url("/api/v1/executions")).expect("executions");
    assert_eq!(
        execs["executions"].as_array().map(|a| a.len()),
        Some(0),
        "{execs}"
    );
    let ready = reqwest::blocking::get(m.url("/ready")).expect("ready");
    assert_eq!(ready.status(), 503, "not ready without evidence");
    assert!(m.proc.output().contains("source degraded"));

    // Prometheus returns: evidence again, and the loop acts.
    prom.start();
    wait_http_ok(
        &format!("{}/-/ready", prom.url()),
        Duration::from_secs(60),
        "prometheus",
    );
    let exec = m.wait_outcome(Duration::from_secs(120));
    assert!(
        exec["outcome"] == "SUCCESS" || exec["outcome"] == "PARTIAL",
        "{exec}"
    );
    assert!(ch.sim.healthy());
    m.proc.term();
    assert!(m.proc.wait_exit(Duration::from_secs(20)).success());
}

/// Metrics whose series appear only once something happened (an
/// escalation, a guard decision, a learned choice, a breaker tripped): a
/// panel on them may have no data in a short run, as long as mapek declares
/// their families.
const EVENT_DRIVEN: [&str; 4] = [
    "mape_k_escalations_total",
    "mape_k_guard_decisions_total",
    "mape_k_learning_regret",
    "mape_k_breakers",
];

/// The `mape_k_*` metric names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("mape_k_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Whether the exposition `text` declares the family of `metric` (a
/// counter's family is named without `_total`, a histogram's samples add
/// `_bucket`, `_count` and `_sum`).
fn declares(text: &str, metric: &str) -> bool {
    let family = ["_total", "_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| metric.strip_suffix(s))
        .unwrap_or(metric);
    [metric, family]
        .iter()
        .any(|name| text.contains(&format!("# TYPE {name} ")))
}

/// Every expression of every panel of the shipped Grafana dashboard (rows
/// have none).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/grafana/dashboards/mapek.json"
    ))
    .expect("dashboard");
    let dash: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        for t in p["targets"].as_array().expect("targets") {
            out.push((
                p["title"].as_str().unwrap_or("?").to_string(),
                t["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    out
}

#[test]
fn every_dashboard_panel_returns_data_from_a_real_prometheus_scraping_mapek_under_load() {
    let ch = charter();
    let m_addr = free_addr();
    let prom = prometheus(&[("charter", ch.addr), ("mapek", m_addr)], None, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mapek.yaml");
    std::fs::write(
        &path,
        format!(
            "{}alertmanager:\n  enabled: true\n",
            polling_config(ch.addr, &prom.url())
        )
        .replace("alertmanager:\n  enabled: false\n", ""),
    )
    .expect("config");
    let (p, d, a) = (
        path.display().to_string(),
        dir.path().join("data").display().to_string(),
        m_addr.to_string(),
    );
    let mut proc = Proc::start(
        &["run", "--config", &p, "--data-dir", &d, "--listen", &a],
        &[],
        dir.path(),
    );
    proc.wait_for("serving", Duration::from_secs(30));
    let mut m = Mapek {
        proc,
        addr: m_addr,
        _dir: dir,
    };

    // Load: a fault the loop must heal, plus a burst of webhook batches.
    ch.sim.inject(FaultKind::LoadSpike).expect("inject");
    let client = support::json_client();
    for i in 0..200 {
        let body = format!(
            r#"{{"version":"4","status":"firing","receiver":"mapek","alerts":[{{"status":"firing","labels":{{"alertname":"Burst{i}","severity":"info","component":"other"}},"annotations":{{}},"startsAt":"2026-01-01T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","fingerprint":"burst{i}"}}]}}"#
        );
        let r = client
            .post(m.url("/api/v1/alerts"))
            .body(body)
            .send()
            .expect("webhook");
        assert!(r.status().is_success());
    }
    let exec = m.wait_outcome(Duration::from_secs(120));
    assert!(exec["outcome"].is_string());
    // Prometheus has scraped mapek after the outcome.
    wait_until(
        Duration::from_secs(60),
        "prometheus to scrape mapek's executed policy",
        || {
            let r = get(&format!(
                "{}/api/v1/query?query=mape_k_policies_executed_total",
                prom.url()
            ))?;
            let v: f64 = r["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
            (v >= 1.0).then_some(())
        },
    );
    wait_until(
        Duration::from_secs(60),
        "two scrapes after the outcome",
        || {
            let q = "count_over_time(mape_k_policies_executed_total[1m]) >= 3 and mape_k_policies_executed_total >= 1";
            let r = get(&format!(
                "{}/api/v1/query?query={}",
                prom.url(),
                urlencode(q)
            ))?;
            (!r["data"]["result"].as_array()?.is_empty()).then_some(())
        },
    );
    let mut empty = Vec::new();
    let mut missing = Vec::new();
    let queries = dashboard_queries();
    assert!(queries.len() >= 14, "the dashboard has its panels");
    let exposition = reqwest::blocking::get(m.url("/metrics"))
        .and_then(|r| r.text())
        .expect("mapek's /metrics");
    for (title, expr) in &queries {
        let names = metric_names(expr);
        let undeclared: Vec<&String> = names.iter().filter(|n| !declares(&exposition, n)).collect();
        if !undeclared.is_empty() {
            missing.push(format!("{title}: {expr} reads {undeclared:?}"));
            continue;
        }
        let r = get(&format!(
            "{}/api/v1/query?query={}",
            prom.url(),
            urlencode(expr)
        ))
        .expect("query");
        assert_eq!(r["status"], "success", "{title}: {expr}: {r}");
        let result = r["data"]["result"].as_array().cloned().unwrap_or_default();
        let real = result
            .iter()
            .any(|s| s["value"][1].as_str().is_some_and(|v| v != "NaN"));
        let event_driven = names.iter().any(|n| EVENT_DRIVEN.contains(&n.as_str()));
        if !real && !event_driven {
            empty.push(format!("{title}: {expr} → {r}"));
        }
    }
    assert!(
        missing.is_empty(),
        "panels reading metrics mapek does not export:\n{}",
        missing.join("\n")
    );
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    m.proc.term();
    assert!(m.proc.wait_exit(Duration::from_secs(20)).success());
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Charter {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Whether `/sim/state` shows every one of `components` healthy.
    fn healthy_over_http(&self, components: &[&str]) -> Option<()> {
        let s = get(&self.url("/sim/state"))?;
        components
            .iter()
            .all(|c| s["components"][*c]["healthy"] == true)
            .then_some(())
    }

    /// The Charter API calls received, from `/sim/calls`.
    fn calls_over_http(&self) -> Vec<Value> {
        get(&self.url("/sim/calls"))
            .and_then(|v| v.as_array().cloned())
            .expect("/sim/calls")
    }
}

fn post_json(url: &str, body: &Value) -> Option<(u16, Value)> {
    let r = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .ok()?
        .post(url)
        .json(body)
        .send()
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().unwrap_or(Value::Null)))
}

fn time_of(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|| panic!("not an RFC 3339 time: {v}"))
}

/// Incidents from mapek's API (every state), merged ones left out.
fn incidents(m: &Mapek) -> Option<Vec<Value>> {
    let page = get(&m.url("/api/v1/incidents?state=all&limit=1000"))?;
    Some(
        page["incidents"]
            .as_array()?
            .iter()
            .filter(|i| i["close_reason"] != "merged")
            .cloned()
            .collect(),
    )
}

/// POST calls carrying out a remedy (the pre-flight validation left out).
fn remedy_calls(calls: &[Value]) -> Vec<&Value> {
    calls
        .iter()
        .filter(|c| c["method"] == "POST" && c["path"] != "/api/v1/policies/validate")
        .collect()
}

#[test]
fn two_faults_on_two_components_are_two_incidents_remedied_concurrently() {
    let ch = charter_with(Topology::new(&["charter", "ledger"]).expect("topology"));
    // The Alertmanager path with the shipped rules: each alert keeps its
    // series' component, so the two components' alerts stay apart.
    let am_addr = free_addr();
    let mut m = mapek(&format!(
        "{}prometheus:\n  enabled: false\nalertmanager:\n  enabled: true\n  url: http://{am_addr}\n",
        common(ch.addr)
    ));
    let am = alertmanager_at(&m.url("/api/v1/alerts"), am_addr);
    let prom = prometheus(
        &[("charter", ch.addr)],
        Some(&charter_rules()),
        Some(am.addr),
    );
    wait_until(
        Duration::from_secs(90),
        "prometheus scraping both components",
        || {
            let r = get(&format!(
                "{}/api/v1/query?query=westworld_charter_up",
                prom.url()
            ))?;
            (r["data"]["result"].as_array()?.len() == 2).then_some(())
        },
    );

    ch.sim
        .inject_at("charter", FaultKind::LoadSpike)
        .expect("inject");
    ch.sim
        .inject_at("ledger", FaultKind::NodeCrash)
        .expect("inject");
    let healed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            Duration::from_secs(120),
            "charter and ledger healthy in /sim/state",
            || ch.healthy_over_http(&["charter", "ledger"]),
        )
    }));
    if healed.is_err() {
        panic!(
            "not healed: {}\nmapek said:\n{}",
            ch.sim.state(),
            m.proc.output()
        );
    }
    // Both remedies verified, one incident per component.
    let (charter_inc, ledger_inc) = wait_until(
        Duration::from_secs(60),
        "two incidents, each with a verified execution",
        || {
            let all = incidents(&m)?;
            let on = |c: &str| {
                let mut found = all
                    .iter()
                    .filter(|i| i["components"] == serde_json::json!([c]))
                    .filter(|i| i["outcome"].is_string());
                let first = found.next()?.clone();
                found.next().is_none().then_some(first)
            };
            Some((on("charter")?, on("ledger")?))
        },
    );
    assert_ne!(charter_inc["id"], ledger_inc["id"]);
    assert_eq!(charter_inc["root_component"], "charter", "{charter_inc}");
    assert_eq!(ledger_inc["root_component"], "ledger", "{ledger_inc}");
    let executions = get(&m.url("/api/v1/executions?limit=100")).expect("executions");
    let executions = executions["executions"].as_array().expect("executions");
    let first_of = |inc: &Value| {
        let id = inc["executions"][0].clone();
        assert!(id.is_string(), "an execution for {inc}");
        executions
            .iter()
            .find(|e| e["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("execution {id} not listed"))
    };
    let (ec, el) = (first_of(&charter_inc), first_of(&ledger_inc));
    assert_eq!(el["root_cause"], "node_crash", "{el}");
    for e in [&ec, &el] {
        assert_eq!(e["status"], "COMPLETED", "{e}");
        let o = e["outcome"].as_str().unwrap_or("");
        assert!(o == "SUCCESS" || o == "PARTIAL", "{e}");
    }
    // Each started before the other finished (its verification window
    // included): neither waited for the other.
    let (c0, c1) = (time_of(&ec["started_at"]), time_of(&ec["finished_at"]));
    let (l0, l1) = (time_of(&el["started_at"]), time_of(&el["finished_at"]));
    assert!(
        c0 < l1 && l0 < c1,
        "the remedies overlap: charter {c0}..{c1}, ledger {l0}..{l1}"
    );
    // Every remedy call named its component; each component got its own.
    let calls = ch.calls_over_http();
    let remedies = remedy_calls(&calls);
    assert!(
        remedies
            .iter()
            .any(|c| c["component"] == "charter" && c["status"] == 200),
        "{calls:?}"
    );
    assert!(
        remedies.iter().any(|c| c["component"] == "ledger"
            && c["path"] == "/api/v1/committee/restart"
            && c["status"] == 200),
        "{calls:?}"
    );
    assert!(
        remedies
            .iter()
            .all(|c| c["component"] == "charter" || c["component"] == "ledger"),
        "{calls:?}"
    );
    drop(prom);
    drop(am);
    m.proc.term();
    assert!(m.proc.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn a_cascade_is_one_incident_diagnosed_and_remedied_at_the_upstream() {
    let topology = Topology::parse("charter,gateway", &["gateway=charter"]).expect("topology");
    let ch = charter_with(topology);
    let prom = prometheus(&[("charter", ch.addr)], None, None);
    let mut m = mapek(&format!(
        "{}topology:\n  gateway: [charter]\n",
        polling_config(ch.addr, &prom.url())
    ));
    wait_until(
        Duration::from_secs(30),
        "mapek's prometheus source to be up",
        || {
            let s = get(&m.url("/api/v1/state"))?;
            (s["sources"][0]["status"] == "up").then_some(())
        },
    );

    ch.sim
        .inject_at("charter", FaultKind::Cascade)
        .expect("inject");
    // The storm reaches gateway 10 s later: one incident over both,
    // diagnosed as a cascade at charter.
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            Duration::from_secs(90),
            "one incident over charter and gateway diagnosed cascade_failure",
            || {
                incidents(&m)?
                    .into_iter()
                    .find(|i| {
                        i["components"] == serde_json::json!(["charter", "gateway"])
                            && i["diagnosis"]["cause"] == "cascade_failure"
                    })
                    .map(|i| i["id"].clone())
            },
        )
    }));
    let incident_id = match found {
        Ok(id) => id,
        Err(_) => panic!(
            "no cascade incident: {}\nmapek said:\n{}",
            ch.sim.state(),
            m.proc.output()
        ),
    };
    // The remedy (emergency override) is high risk: it waits for a person.
    // Approve it (again while a remedy is running or cooling down on
    // charter: 409, the policy stays pending).
    let approved = wait_until(
        Duration::from_secs(60),
        "the cascade remedy to be approved",
        || {
            let pending = get(&m.url("/api/v1/policies?status=pending"))?;
            let p = pending["policies"]
                .as_array()?
                .iter()
                .find(|p| p["root_cause"] == "cascade_failure")?
                .clone();
            let id = p["id"].as_str()?;
            let (status, _) = post_json(
                &m.url(&format!("/api/v1/policies/{id}/approve")),
                &serde_json::json!({"by": "e2e"}),
            )?;
            (status == 200).then_some(p)
        },
    );
    assert_eq!(approved["incident_id"], incident_id, "{approved}");
    let actions = approved["actions"].as_array().expect("actions");
    assert!(
        actions.iter().all(|a| a["target"] == "charter"),
        "{approved}"
    );
    assert!(
        actions
            .iter()
            .any(|a| a["action_type"] == "ACTIVATE_EMERGENCY_OVERRIDE"),
        "{approved}"
    );
    wait_until(
        Duration::from_secs(60),
        "charter and gateway healthy in /sim/state",
        || ch.healthy_over_http(&["charter", "gateway"]),
    );
    let exec = wait_until(
        Duration::from_secs(60),
        "the cascade remedy verified",
        || {
            get(&m.url("/api/v1/executions"))?["executions"]
                .as_array()?
                .iter()
                .find(|e| e["policy_id"] == approved["id"] && e["outcome"].is_string())
                .cloned()
        },
    );
    assert_eq!(exec["status"], "COMPLETED", "{exec}");
    assert_eq!(exec["root_cause"], "cascade_failure", "{exec}");
    // One incident over both components, rooted upstream, with that
    // execution.
    let all = incidents(&m).expect("incidents");
    let touching: Vec<&Value> = all
        .iter()
        .filter(|i| {
            i["components"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c == "charter" || c == "gateway"))
        })
        .collect();
    assert_eq!(touching.len(), 1, "{touching:#?}");
    let inc = touching[0];
    assert_eq!(inc["id"], incident_id);
    assert_eq!(inc["root_component"], "charter", "{inc}");
    assert_eq!(inc["diagnosis"]["cause"], "cascade_failure", "{inc}");
    assert!(
        inc["executions"]
            .as_array()
            .is_some_and(|es| es.contains(&exec["id"])),
        "{inc}"
    );
    // The remedy went to charter only: override and throttle, nothing at
    // gateway.
    let calls = ch.calls_over_http();
    let remedies = remedy_calls(&calls);
    for path in ["/api/v1/emergency-override", "/api/v1/throttle"] {
        assert!(
            remedies
                .iter()
                .any(|c| c["path"] == path && c["component"] == "charter" && c["status"] == 200),
            "{path} at charter: {calls:?}"
        );
    }
    assert!(
        remedies.iter().all(|c| c["component"] == "charter"),
        "no remedy at a dependent: {calls:?}"
    );
    m.proc.term();
    assert!(m.proc.wait_exit(Duration::from_secs(20)).success());
}
