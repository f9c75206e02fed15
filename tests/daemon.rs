//! The `mapek` binary: config checking, `run` with real HTTP and a real
//! sled data directory, the lock between two daemons, clean shutdown on
//! SIGTERM, and a source that is down.

mod support;

use std::time::Duration;

use mapek_actors::model::{ApprovalStatus, Priority, RemediationPolicy, RiskLevel, RootCause};
use mapek_actors::store::KnowledgeStore;
use support::{bin, free_addr, Proc};

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_config_accepts_the_example_and_lists_every_error() {
    let ok = std::process::Command::new(bin())
        .args(["check-config", "config/mapek.yaml"])
        .current_dir(repo())
        .output()
        .expect("run");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "monitor:\n  interval_seconds: 0\n  intervall: 5\nplan:\n  min_confidence: 2\n",
    )
    .expect("write");
    let out = std::process::Command::new(bin())
        .arg("check-config")
        .arg(&bad)
        .env_remove("MAPE_K_INTERVAL")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("monitor.interval_seconds") && err.contains("at least 1"),
        "{err}"
    );
    assert!(
        err.contains("monitor.intervall") && err.contains("unknown"),
        "{err}"
    );
    assert!(err.contains("plan.min_confidence"), "{err}");
}

#[test]
fn run_rejects_a_bad_environment_override_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(bin())
        .args(["run", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("MAPE_K_INTERVAL", "ten")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAPE_K_INTERVAL"));
}

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("mapek.yaml");
    std::fs::write(
        &path,
        "monitor:\n  interval_seconds: 1\nprometheus:\n  url: http://127.0.0.1:9\n  timeout_seconds: 1\n  retries: 0\n",
    )
    .expect("write config");
    path
}

/// `mapek run` on `config(dir)` with `dir/data` and a free port, once it
/// serves.
fn run_daemon(dir: &std::path::Path, env: &[(&str, &str)]) -> (Proc, std::net::SocketAddr) {
    run_daemon_on(dir, &config(dir), env)
}

/// `mapek run` on the config file `cfg` with `dir/data` and a free port,
/// once it serves.
fn run_daemon_on(
    dir: &std::path::Path,
    cfg: &std::path::Path,
    env: &[(&str, &str)],
) -> (Proc, std::net::SocketAddr) {
    let cfg = cfg.display().to_string();
    let data = dir.join("data").display().to_string();
    let addr = free_addr();
    let listen = addr.to_string();
    let mut p = Proc::start(
        &[
            "run",
            "--config",
            &cfg,
            "--data-dir",
            &data,
            "--listen",
            &listen,
        ],
        env,
        dir,
    );
    p.wait_for("serving", Duration::from_secs(20));
    (p, addr)
}

#[test]
fn run_serves_health_keeps_running_without_its_source_and_a_second_daemon_fails_on_the_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let data = dir.path().join("data");
    let addr = free_addr();
    let cfg_s = cfg.display().to_string();
    let data_s = data.display().to_string();
    let addr_s = addr.to_string();
    let mut first = Proc::start(
        &[
            "run",
            "--config",
            &cfg_s,
            "--data-dir",
            &data_s,
            "--listen",
            &addr_s,
        ],
        &[],
        dir.path(),
    );
    first.wait_for("serving", Duration::from_secs(20));
    // Prometheus is down: the daemon says so and keeps running.
    first.wait_for("source degraded", Duration::from_secs(20));

    let health = reqwest::blocking::get(format!("http://{addr}/health")).expect("health");
    assert_eq!(health.status(), 200);
    let ready: serde_json::Value = reqwest::blocking::get(format!("http://{addr}/ready"))
        .expect("ready")
        .json()
        .expect("json");
    assert_eq!(ready["phases"]["analyzer"], "up");
    assert_eq!(ready["knowledge_store"], "open");
    assert_eq!(ready["sources"][0]["status"], "degraded");
    let state: serde_json::Value = reqwest::blocking::get(format!("http://{addr}/api/v1/state"))
        .expect("state")
        .json()
        .expect("json");
    assert!(
        state["state"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("prometheus"),
        "{state}"
    );
    assert_eq!(state["state"]["is_running"], true);

    // A second daemon on the same data directory fails at once, naming the lock.
    let started = std::time::Instant::now();
    let other = free_addr().to_string();
    let mut second = Proc::start(
        &[
            "run",
            "--config",
            &cfg_s,
            "--data-dir",
            &data_s,
            "--listen",
            &other,
        ],
        &[],
        dir.path(),
    );
    let status = second.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let out = second.output();
    assert!(out.contains("lock") && out.contains(&data_s), "{out}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The first one is still serving.
    assert_eq!(
        reqwest::blocking::get(format!("http://{addr}/health"))
            .expect("health")
            .status(),
        200
    );

    first.term();
    let status = first.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit {status:?}: {}", first.output());
    assert!(first.output().contains("knowledge flushed"));
}

fn policy(id: &str) -> RemediationPolicy {
    RemediationPolicy {
        id: id.into(),
        chain_id: "chn-test".into(),
        analysis_id: "ana-test".into(),
        created_at: chrono::Utc::now(),
        root_cause: RootCause::ValidationLatency,
        root_cause_confidence: 0.85,
        actions: Vec::new(),
        expected_impact: "test".into(),
        risk_level: RiskLevel::High,
        priority: Priority::High,
        cost_estimate: 0.2,
        benefit_estimate: 0.8,
        score: 0.6,
        approval_status: ApprovalStatus::Pending,
        decisions: Vec::new(),
        violations_at_planning: 3,
        scope: vec!["charter".into()],
        incident_id: None,
        attempt: 0,
        guards: Vec::new(),
        autonomy: None,
        candidates: Vec::new(),
        shard: None,
    }
}

#[test]
fn knowledge_survives_a_restart_of_the_daemon_and_pending_policies_can_be_decided() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let data = dir.path().join("data");
    {
        let store = KnowledgeStore::open(&data, Duration::from_secs(5)).expect("open");
        store.put_policy(&policy("pol-0001")).expect("put");
        store
            .put_execution(&serde_json::from_value(serde_json::json!({
                "id": "exe-0001", "policy_id": "pol-0000", "chain_id": "chn-x", "root_cause": "validation_latency",
                "status": "IN_PROGRESS", "actions": [], "started_at": "2026-01-01T00:00:00Z", "finished_at": null,
                "success_rate": 0.0, "error": null, "violations_before": 3, "violations_after": null, "outcome": null,
                "timings": {"detection_seconds": 0.0, "analysis_seconds": 0.0, "planning_seconds": 0.0,
                            "execution_seconds": 0.0, "total_seconds": 0.0, "cut_off": false}
            }))
            .expect("execution json"))
            .expect("put execution");
        store.close().expect("close");
    }
    let addr = free_addr();
    let (cfg_s, data_s, addr_s) = (
        cfg.display().to_string(),
        data.display().to_string(),
        addr.to_string(),
    );
    let mut p = Proc::start(
        &[
            "run",
            "--config",
            &cfg_s,
            "--data-dir",
            &data_s,
            "--listen",
            &addr_s,
        ],
        &[],
        dir.path(),
    );
    p.wait_for("serving", Duration::from_secs(20));
    let client = support::json_client();
    let list: serde_json::Value = client
        .get(format!("http://{addr}/api/v1/policies?status=pending"))
        .send()
        .expect("list")
        .json()
        .expect("json");
    assert_eq!(list["policies"][0]["id"], "pol-0001", "{list}");
    let execs: serde_json::Value = client
        .get(format!("http://{addr}/api/v1/executions"))
        .send()
        .expect("list")
        .json()
        .expect("json");
    assert_eq!(execs["executions"][0]["id"], "exe-0001");
    assert_eq!(
        execs["executions"][0]["status"], "UNKNOWN",
        "an execution interrupted by a stop is closed: {execs}"
    );
    assert_eq!(execs["executions"][0]["interrupted"], true, "{execs}");
    assert!(execs["executions"][0]["error"]
        .as_str()
        .unwrap_or("")
        .contains("interrupted"));
    let bad = client
        .get(format!("http://{addr}/api/v1/policies?status=maybe"))
        .send()
        .expect("list");
    assert_eq!(bad.status(), 400);
    let rejected = client
        .post(format!("http://{addr}/api/v1/policies/pol-0001/reject"))
        .json(&serde_json::json!({"by": "alice", "reason": "not now"}))
        .send()
        .expect("reject");
    assert_eq!(rejected.status(), 200, "{:?}", rejected.text());
    let again = client
        .post(format!("http://{addr}/api/v1/policies/pol-0001/approve"))
        .send()
        .expect("approve");
    assert_eq!(
        again.status(),
        409,
        "a decided policy cannot be decided again"
    );
    let missing = client
        .post(format!("http://{addr}/api/v1/policies/nope/approve"))
        .send()
        .expect("approve");
    assert_eq!(missing.status(), 404);
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());

    // Reopen the data directory: the decision is there.
    let store = KnowledgeStore::open(&data, Duration::from_secs(5)).expect("reopen");
    let stored = store.get_policy("pol-0001").expect("get").expect("present");
    assert_eq!(stored.approval_status, ApprovalStatus::Rejected);
    assert_eq!(stored.decisions[0].by, "alice");
    assert_eq!(stored.decisions[0].reason.as_deref(), Some("not now"));
}

#[test]
fn a_corrupt_data_directory_fails_within_seconds_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(
        data.join("conf"),
        b"\x00\xffgarbage that is not a sled config",
    )
    .expect("write");
    std::fs::write(data.join("db"), vec![0xA5u8; 4096]).expect("write");
    let started = std::time::Instant::now();
    let out = std::process::Command::new(bin())
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&data.display().to_string()), "{err}");
    assert!(
        err.contains("is damaged") || err.contains("did not open"),
        "{err}"
    );
    assert!(err.contains("--repair"), "says what to do: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn webhook_refuses_bad_input_clearly_counts_resent_alerts_once_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut p, addr) = run_daemon(dir.path(), &[]);
    let client = support::json_client();
    let url = format!("http://{addr}/api/v1/alerts");

    // A body that is not JSON by its type is refused before it is read.
    let r = reqwest::blocking::Client::new()
        .post(&url)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .expect("post");
    assert_eq!(r.status(), 415);
    let body: serde_json::Value = r.json().expect("json error body");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("application/json"),
        "{body}"
    );

    let r = client.post(&url).body("{not json").send().expect("post");
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().expect("json error body");
    assert!(
        body["error"].as_str().unwrap_or("").contains("malformed"),
        "{body}"
    );

    let r = client
        .post(&url)
        .body(r#"{"version":"3","alerts":[]}"#)
        .send()
        .expect("post");
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap_or_default().contains("version"));

    let big = format!(
        r#"{{"version":"4","alerts":[],"pad":"{}"}}"#,
        "x".repeat(1_100_000)
    );
    let r = client.post(&url).body(big).send().expect("post");
    assert_eq!(r.status(), 413);

    let payload = r#"{"receiver":"mapek","status":"firing","version":"4","groupKey":"{}","truncatedAlerts":0,
      "groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"",
      "alerts":[{"status":"firing","labels":{"alertname":"CharterValidationLatencyHigh","severity":"warning","component":"charter"},
        "annotations":{"value":"2.5"},"startsAt":"2026-01-01T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"f00d"}]}"#;
    let first: serde_json::Value = client
        .post(&url)
        .body(payload)
        .send()
        .expect("post")
        .json()
        .expect("json");
    assert_eq!(first["ack"]["new"], 1, "{first}");
    let again: serde_json::Value = client
        .post(format!("http://{addr}/webhooks/alerts"))
        .body(payload)
        .send()
        .expect("post")
        .json()
        .expect("json");
    assert_eq!(
        (
            again["ack"]["new"].as_u64(),
            again["ack"]["duplicates"].as_u64()
        ),
        (Some(0), Some(1)),
        "re-sent: {again}"
    );
    let v: serde_json::Value = client
        .get(format!("http://{addr}/api/v1/violations"))
        .send()
        .expect("get")
        .json()
        .expect("json");
    let active = v["violations"].as_array().expect("list");
    assert_eq!(active.len(), 1, "{v}");
    assert_eq!(active[0]["fingerprint"], "am:f00d");

    let resolved = payload.replace(
        r#""status":"firing","labels""#,
        r#""status":"resolved","labels""#,
    );
    let r: serde_json::Value = client
        .post(&url)
        .body(resolved)
        .send()
        .expect("post")
        .json()
        .expect("json");
    assert_eq!(r["ack"]["resolved"], 1, "{r}");
    let v: serde_json::Value = client
        .get(format!("http://{addr}/api/v1/violations"))
        .send()
        .expect("get")
        .json()
        .expect("json");
    assert_eq!(v["violations"].as_array().map(|a| a.len()), Some(0));

    let wrong = client.get(&url).send().expect("get");
    assert_eq!(wrong.status(), 405);
    assert_eq!(
        client
            .get(format!("http://{addr}/health"))
            .send()
            .expect("health")
            .status(),
        200,
        "still serving"
    );
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn shipped_deployment_files_match_the_binary_and_the_config_schema() {
    // The config embedded in the Kubernetes ConfigMap is valid.
    let k8s = std::fs::read_to_string(repo().join("config/kubernetes/mapek.yaml")).expect("k8s");
    let start = k8s.find("mapek.yaml: |").expect("configmap entry") + "mapek.yaml: |".len();
    let end = start + k8s[start..].find("\n---").expect("end of document");
    let embedded: String = k8s[start..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    mapek::config::Config::from_yaml_str(&embedded, "configmap").unwrap_or_else(|e| panic!("{e}"));
    // So is the three-replica one's (with cluster support built in).
    let k8s = std::fs::read_to_string(repo().join("config/kubernetes/mapek-cluster.yaml"))
        .expect("k8s cluster");
    let start = k8s.find("mapek.yaml: |").expect("configmap entry") + "mapek.yaml: |".len();
    let end = start + k8s[start..].find("\n---").expect("end of document");
    let embedded: String = k8s[start..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let parsed = mapek::config::Config::from_yaml_str(&embedded, "configmap");
    if cfg!(feature = "cluster") {
        let cfg = parsed.unwrap_or_else(|e| panic!("{e}"));
        let c = cfg.cluster.expect("a cluster section");
        assert_eq!((c.etcd_endpoints.len(), c.shards), (3, 12));
        assert!(k8s.contains("replicas: 3") && k8s.contains("MAPEK_ADVERTISE_ADDRESS"));
    }
    // The flags the unit and the manifest pass exist.
    let help = std::process::Command::new(bin())
        .args(["run", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    let unit = std::fs::read_to_string(repo().join("config/systemd/mapek.service")).expect("unit");
    for flag in ["--config", "--data-dir", "--log-format", "--listen"] {
        assert!(help.contains(flag), "`mapek run` lacks {flag}");
    }
    assert!(
        unit.contains("mapek check-config /etc/mapek/mapek.yaml")
            && unit.contains("--log-format json")
    );
    let version = std::process::Command::new(bin())
        .arg("--version")
        .output()
        .expect("version");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("mapek "));
}

#[test]
fn with_a_token_the_api_and_webhook_require_it_and_probes_stay_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut p, addr) = run_daemon(dir.path(), &[("MAPEK_API_TOKEN", "s3cret")]);
    let client = support::json_client();
    for open in ["/health", "/metrics"] {
        assert_eq!(
            client
                .get(format!("http://{addr}{open}"))
                .send()
                .expect("get")
                .status(),
            200,
            "{open}"
        );
    }
    let denied = client
        .get(format!("http://{addr}/api/v1/state"))
        .send()
        .expect("get");
    assert_eq!(denied.status(), 401);
    assert_eq!(
        denied
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let wrong = client
        .get(format!("http://{addr}/api/v1/state"))
        .bearer_auth("s3cre")
        .send()
        .expect("get");
    assert_eq!(wrong.status(), 401);
    let ok = client
        .get(format!("http://{addr}/api/v1/state"))
        .bearer_auth("s3cret")
        .send()
        .expect("get");
    assert_eq!(ok.status(), 200);
    let hook = client
        .post(format!("http://{addr}/api/v1/alerts"))
        .body(r#"{"version":"4","alerts":[]}"#)
        .send()
        .expect("post");
    assert_eq!(hook.status(), 401, "the webhook needs the token too");
    let approve = client
        .post(format!("http://{addr}/api/v1/policies/x/approve"))
        .send()
        .expect("post");
    assert_eq!(approve.status(), 401);
    assert!(!p.output().contains("s3cret"), "the token is never logged");
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn incidents_api_pages_by_position_and_refuses_bad_input_with_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut p, addr) = run_daemon(dir.path(), &[]);
    let client = support::json_client();
    // Three components, one alert each (below the plan threshold: nothing
    // is acted on, three open incidents).
    for (n, c) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let payload = format!(
            r#"{{"receiver":"mapek","status":"firing","version":"4","groupKey":"g","alerts":[
              {{"status":"firing","labels":{{"alertname":"ErrorsHigh","severity":"warning","component":"{c}"}},
               "annotations":{{}},"startsAt":"2026-01-01T00:00:0{n}Z","endsAt":"0001-01-01T00:00:00Z",
               "generatorURL":"","fingerprint":"fp-{c}"}}]}}"#
        );
        let r = client
            .post(format!("http://{addr}/api/v1/alerts"))
            .body(payload)
            .send()
            .expect("post");
        assert!(r.status().is_success());
    }
    let get = |q: &str| {
        client
            .get(format!("http://{addr}/api/v1/incidents{q}"))
            .send()
            .expect("get")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let all = loop {
        let v: serde_json::Value = get("").json().expect("json");
        if v["incidents"].as_array().map(Vec::len) == Some(3) {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "three incidents: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Newest onset first; pages of one chain through `next` to the end.
    let comps: Vec<&str> = all["incidents"]
        .as_array()
        .expect("list")
        .iter()
        .map(|i| i["components"][0].as_str().unwrap_or(""))
        .collect();
    assert_eq!(comps, vec!["gamma", "beta", "alpha"]);
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let v: serde_json::Value = get(&format!("?limit=1&cursor={cursor}"))
            .json()
            .expect("json");
        seen.push(v["incidents"][0]["id"].as_str().unwrap_or("").to_string());
        match v["next"].as_str() {
            Some(n) => cursor = n.to_string(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], all["incidents"][0]["id"].as_str().unwrap_or(""));
    let open: serde_json::Value = get("?state=open").json().expect("json");
    assert_eq!(open["incidents"].as_array().map(Vec::len), Some(3));
    // The detail carries the member violation.
    let id = seen[2].clone();
    let d: serde_json::Value = client
        .get(format!("http://{addr}/api/v1/incidents/{id}"))
        .send()
        .expect("get")
        .json()
        .expect("json");
    assert_eq!(d["incident"]["id"], id.as_str());
    assert_eq!(d["violations"][0]["fingerprint"], "am:fp-alpha", "{d}");
    // Bad input: a clear JSON error each.
    for (q, needle) in [
        ("?state=sleeping", "unknown state"),
        ("?cursor=garbage", "bad cursor"),
        ("?limit=abc", "bad query"),
    ] {
        let r = get(q);
        assert_eq!(r.status(), 400, "{q}");
        let body: serde_json::Value = r.json().expect("json error");
        assert!(
            body["error"].as_str().unwrap_or("").contains(needle),
            "{q}: {body}"
        );
    }
    let r = client
        .get(format!("http://{addr}/api/v1/incidents/inc-nope"))
        .send()
        .expect("get");
    assert_eq!(r.status(), 404);
    assert!(r.json::<serde_json::Value>().expect("json")["error"].is_string());
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

/// Named tokens: each caller is known by its token's name, which is what
/// the audit trail records as `by` (a `by` given in the body is kept as a
/// comment); an open API is not exposed on a non-loopback address.
#[test]
fn named_tokens_name_the_caller_and_an_open_api_is_not_exposed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("open.yaml");
    std::fs::write(&cfg, "api:\n  listen: 0.0.0.0:0\n").expect("write");
    let out = std::process::Command::new(support::bin())
        .args(["run", "--config", &cfg.display().to_string()])
        .env_remove("MAPEK_API_TOKEN")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("api.listen") && err.contains("no token"),
        "{err}"
    );
    // --listen on a non-loopback address is refused the same way.
    let out = std::process::Command::new(support::bin())
        .args(["run", "--listen", "0.0.0.0:0"])
        .env_remove("MAPEK_API_TOKEN")
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cfg = dir.path().join("named.yaml");
    std::fs::write(
        &cfg,
        "monitor:\n  interval_seconds: 1\nprometheus:\n  url: http://127.0.0.1:9\n  timeout_seconds: 1\n  retries: 0\napi:\n  tokens:\n    alice: token-of-alice\n    bob: token-of-bob\n",
    )
    .expect("write");
    let (mut p, addr) = run_daemon_on(dir.path(), &cfg, &[]);
    let client = support::json_client();
    let r: serde_json::Value = client
        .post(format!("http://{addr}/api/v1/pause"))
        .bearer_auth("token-of-bob")
        .body(r#"{"by":"mallory","reason":"freeze"}"#)
        .send()
        .expect("pause")
        .json()
        .expect("json");
    assert_eq!(r["by"], "bob", "{r}");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("mallory"),
        "{r}"
    );
    // The scheme is case-insensitive; a wrong token is refused.
    let ok = client
        .get(format!("http://{addr}/api/v1/state"))
        .header("authorization", "bearer token-of-alice")
        .send()
        .expect("state");
    assert_eq!(ok.status(), 200);
    let state: serde_json::Value = ok.json().expect("json");
    assert_eq!(state["pause"]["by"], "bob");
    let wrong = client
        .get(format!("http://{addr}/api/v1/state"))
        .bearer_auth("token-of-eve")
        .send()
        .expect("state");
    assert_eq!(wrong.status(), 401);
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

/// A "Prometheus" that answers every query with an HTML page (a proxy's
/// login page, a wrong path) gives no evidence: the source is degraded,
/// not up. `/ready` stays 200 (the webhook can still deliver evidence) and
/// its body names the degraded source with its reason.
#[test]
fn a_source_answering_html_is_degraded_and_ready_says_so() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let html_addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = "<html><body>Please log in</body></html>";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("html.yaml");
    std::fs::write(
        &cfg,
        format!(
            "monitor:\n  interval_seconds: 1\nprometheus:\n  url: http://{html_addr}\n  timeout_seconds: 1\n  retries: 0\n"
        ),
    )
    .expect("write");
    let (mut p, addr) = run_daemon_on(dir.path(), &cfg, &[]);
    let client = support::json_client();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let state = loop {
        let s: serde_json::Value = client
            .get(format!("http://{addr}/api/v1/state"))
            .send()
            .expect("state")
            .json()
            .expect("json");
        if s["sources"][0]["status"] != "unknown" {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "never polled: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(state["sources"][0]["status"], "degraded", "{state}");
    let r = client
        .get(format!("http://{addr}/ready"))
        .send()
        .expect("ready");
    assert_eq!(r.status(), 200, "the webhook can still deliver evidence");
    let ready: serde_json::Value = r.json().expect("json");
    assert_eq!(ready["can_act"]["prometheus"], false, "{ready}");
    assert_eq!(ready["can_act"]["webhook"], true, "{ready}");
    assert_eq!(ready["degraded"][0]["source"], "prometheus", "{ready}");
    assert!(
        ready["degraded"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("every rule failed")),
        "{ready}"
    );
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

/// A blind loop is visible at once: with the webhook off and Prometheus
/// unreachable, `mape_k_can_act` has no series at 1 and `/ready` says so;
/// the effector's reachability (a live Charter here) is in `/ready`'s body
/// and in `mape_k_effector_reachable`, from the background probe.
#[test]
fn a_blind_loop_and_effector_reachability_are_visible() {
    use std::io::{Read, Write};
    let charter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let charter_addr = charter.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut conn in charter.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = r#"{"status":"normal"}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("blind.yaml");
    std::fs::write(
        &cfg,
        format!(
            "monitor:\n  interval_seconds: 1\nprometheus:\n  url: http://{dead}\n  timeout_seconds: 1\n  retries: 0\nalertmanager:\n  enabled: false\ncharter:\n  url: http://{charter_addr}\n"
        ),
    )
    .expect("write");
    let (mut p, addr) = run_daemon_on(dir.path(), &cfg, &[]);
    let client = support::json_client();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (code, ready) = loop {
        let r = client
            .get(format!("http://{addr}/ready"))
            .send()
            .expect("ready");
        let code = r.status();
        let ready: serde_json::Value = r.json().expect("json");
        if ready["sources"][0]["status"] != "unknown"
            && !ready["effectors"][0]["checked_at"].is_null()
        {
            break (code, ready);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never polled or probed: {ready}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 503, "no evidence path: {ready}");
    assert_eq!(
        ready["can_act"],
        serde_json::json!({"prometheus": false}),
        "no webhook entry while it is off: {ready}"
    );
    let e = &ready["effectors"][0];
    assert_eq!(e["name"], "charter", "{ready}");
    assert_eq!(e["reachable"], true, "{ready}");
    assert_eq!(
        e["target"],
        format!("http://{charter_addr}/health"),
        "{ready}"
    );
    let metrics = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    assert!(
        metrics.contains("mape_k_can_act{source=\"prometheus\"} 0\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("mape_k_can_act{source=\"webhook\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mape_k_effector_reachable{effector=\"charter\"} 1\n"),
        "{metrics}"
    );
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

/// 1,100 clients that send half a request head and wait do not keep
/// `/health` from answering; the server closes them after its header read
/// timeout (5 s).
#[test]
fn stalled_connections_do_not_take_the_api_down_and_are_closed() {
    use std::io::{Read, Write};
    // This test process holds 1,100 sockets too.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut p, addr) = run_daemon(dir.path(), &[]);
    let mut stalled = Vec::new();
    for _ in 0..1100 {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .expect("half a head");
        stalled.push(s);
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let r = client
        .get(format!("http://{addr}/health"))
        .send()
        .expect("health answers while 1,100 connections stall");
    assert_eq!(r.status(), 200);
    // Every stalled connection is closed by the server (EOF or reset)
    // after the header read timeout; the read waits at most 20 s.
    let mut closed = 0;
    for s in stalled.iter_mut().step_by(100) {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        // A 408 answer may come before the close: read until the end.
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    closed += 1;
                    break;
                }
                Err(e) => panic!("a stalled connection stayed open: {e}"),
            }
        }
    }
    assert_eq!(closed, 11);
    let r = client
        .get(format!("http://{addr}/health"))
        .send()
        .expect("health");
    assert_eq!(r.status(), 200);
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}
