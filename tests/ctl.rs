//! `mapek ctl` against the real `mapek` binary running as a daemon: every
//! subcommand in table and JSON output, and the exit codes scripts rely on
//! (see docs/CLI.md).
//!
//! The tests of pause, resume, clear, silence, the `paused`/`mode` fields of
//! the state and the `autonomy`/`guards` of a policy need those daemon
//! endpoints and fields.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{bin, free_addr, Proc};

/// A daemon on a free loopback port with its own data directory; alerts
/// come through the webhook only, nothing is auto-approved and effectors
/// point at a closed port.
struct Daemon {
    proc: Proc,
    addr: SocketAddr,
    token: Option<String>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(token: Option<&str>) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("mapek.yaml");
        std::fs::write(
            &cfg,
            "monitor:\n  interval_seconds: 1\nprometheus:\n  enabled: false\n\
             plan:\n  auto_approve: false\nalertmanager:\n  verify_with_api: false\n\
             charter:\n  url: http://127.0.0.1:9\n  timeout_seconds: 1\n\
             execute:\n  retries: 0\n  call_timeout_seconds: 1\n",
        )
        .expect("write config");
        let addr = free_addr();
        let (cfg_s, data_s, addr_s) = (
            cfg.display().to_string(),
            dir.path().join("data").display().to_string(),
            addr.to_string(),
        );
        let env: Vec<(&str, &str)> = token.map(|t| ("MAPEK_API_TOKEN", t)).into_iter().collect();
        let mut proc = Proc::start(
            &[
                "run",
                "--config",
                &cfg_s,
                "--data-dir",
                &data_s,
                "--listen",
                &addr_s,
            ],
            &env,
            dir.path(),
        );
        proc.wait_for("serving", Duration::from_secs(30));
        Daemon {
            proc,
            addr,
            token: token.map(str::to_string),
            _dir: dir,
        }
    }

    fn server(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `mapek ctl --server URL ARGS` with the daemon's token (if any).
    fn ctl(&self, args: &[&str]) -> Out {
        ctl(&self.server(), self.token.as_deref(), args)
    }

    /// Posts firing alerts `(alertname, signal)` on `component`.
    fn alert(&self, component: &str, alerts: &[(&str, &str)]) {
        let now = chrono::Utc::now().to_rfc3339();
        let alerts: Vec<Value> = alerts
            .iter()
            .map(|(name, signal)| {
                json!({"status": "firing",
                       "labels": {"alertname": name, "severity": "critical", "component": component, "signal": signal},
                       "annotations": {}, "startsAt": now, "endsAt": "0001-01-01T00:00:00Z",
                       "generatorURL": "", "fingerprint": format!("fp-{component}-{name}")})
            })
            .collect();
        let payload = json!({"receiver": "mapek", "status": "firing", "version": "4", "groupKey": "g",
                             "alerts": alerts});
        let mut req = reqwest::blocking::Client::new()
            .post(format!("{}/api/v1/alerts", self.server()))
            .json(&payload);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let r = req.send().expect("post alerts");
        assert!(r.status().is_success(), "webhook: {:?}", r.text());
    }

    /// Three alerts on `component`: enough for a diagnosis and a policy,
    /// which waits for a person (`plan.auto_approve: false`).
    fn pending_policy(&self, component: &str) -> Value {
        self.alert(
            component,
            &[
                ("ValidationLatencyHigh", "latency"),
                ("FailureRateHigh", "failure"),
                ("ThroughputLow", "throughput"),
            ],
        );
        wait_until(
            Duration::from_secs(30),
            &format!("a pending policy for {component}"),
            || {
                let v = self.get("/api/v1/policies?status=pending")?;
                v["policies"]
                    .as_array()?
                    .iter()
                    .find(|p| p["scope"] == json!([component]))
                    .cloned()
            },
        )
    }

    fn get(&self, path: &str) -> Option<Value> {
        let mut req = reqwest::blocking::Client::new().get(format!("{}{path}", self.server()));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req.send().ok()?.json().ok()
    }

    fn stop(mut self) {
        self.proc.term();
        let status = self.proc.wait_exit(Duration::from_secs(20));
        assert!(status.success(), "{}", self.proc.output());
    }
}

/// What a `mapek ctl` run printed, and its exit code.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "{self:?}");
        assert!(self.stderr.is_empty(), "{self:?}");
        &self.stdout
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The line of stdout starting with `start`.
    fn line(&self, start: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting `{start}`: {self:?}"))
    }
}

/// Runs `mapek ctl --server SERVER ARGS` with a clean environment: the
/// token only when given (through `MAPEK_API_TOKEN`), `USER=carol`.
fn ctl(server: &str, token: Option<&str>, args: &[&str]) -> Out {
    let mut cmd = Command::new(bin());
    cmd.arg("ctl")
        .args(["--server", server])
        .args(args)
        .env_remove("MAPEK_API_TOKEN")
        .env_remove("MAPEK_SERVER")
        .env("USER", "carol");
    if let Some(t) = token {
        cmd.env("MAPEK_API_TOKEN", t);
    }
    let out = cmd.output().expect("run mapek ctl");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Polls `f` until it gives a value (the daemon's state changes have no
/// event a client can await), panicking after `limit`.
fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The split columns of a table line.
fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

#[test]
fn status_incidents_policies_explain_approve_and_reject_show_what_the_daemon_holds() {
    let d = Daemon::start(None);

    // status, before anything happened.
    let st = d.ctl(&["status"]);
    st.ok();
    assert_eq!(cells(st.line("server:"))[1], d.server());
    assert_eq!(cells(st.line("ready:"))[1], "yes");
    assert_eq!(cells(st.line("running:"))[1], "yes");
    assert!(st.line("iteration:").len() > "iteration:".len());
    let sj = d.ctl(&["status", "-o", "json"]).json();
    assert_eq!(sj["state"]["is_running"], true, "{sj}");
    assert_eq!(sj["ready"]["ready"], true, "{sj}");
    assert!(sj["state"]["iteration"].is_u64(), "{sj}");

    // No incidents, no policies yet.
    assert_eq!(d.ctl(&["incidents"]).ok(), "No incidents.\n");
    assert_eq!(d.ctl(&["policies"]).ok(), "No policies.\n");

    // Two pending policies (charter, ledger) and an open incident (quiet).
    let p_charter = d.pending_policy("charter");
    let p_ledger = d.pending_policy("ledger");
    d.alert("quiet", &[("DiskAlmostFull", "resource")]);
    let all = wait_until(Duration::from_secs(20), "three incidents", || {
        let v = d.ctl(&["incidents", "-o", "json"]).json();
        (v["incidents"].as_array().map(Vec::len) == Some(3)).then_some(v)
    });

    // incidents: the table holds what the JSON holds.
    let t = d.ctl(&["incidents"]);
    let header = cells(t.stdout.lines().next().unwrap_or(""));
    assert_eq!(
        header,
        [
            "ID",
            "STATE",
            "SEVERITY",
            "COMPONENTS",
            "CAUSE",
            "CONF",
            "VIOLATIONS",
            "AGE",
            "REASON"
        ]
    );
    for inc in all["incidents"].as_array().expect("list") {
        let id = inc["id"].as_str().expect("id");
        let row = cells(t.line(id));
        assert_eq!(row[1], inc["state"].as_str().expect("state"), "{t:?}");
        assert_eq!(row[2], "critical", "{t:?}");
        assert_eq!(row[3], inc["components"][0].as_str().expect("c"), "{t:?}");
        assert_eq!(row[6], inc["violation_count"].to_string(), "{t:?}");
        if let Some(cause) = inc["diagnosis"]["cause"].as_str() {
            assert_eq!(row[4], cause, "{t:?}");
            let conf = inc["diagnosis"]["confidence"].as_f64().expect("conf");
            assert_eq!(row[5], format!("{conf:.2}"), "{t:?}");
        }
        assert!(row[7].ends_with('s') || row[7].ends_with('m'), "age: {t:?}");
    }
    let charter_inc = p_charter["incident_id"].as_str().expect("incident id");
    assert_eq!(cells(t.line(charter_inc))[1], "pending");

    // --state and --limit reach the daemon.
    let pending = d
        .ctl(&["incidents", "--state", "pending", "-o", "json"])
        .json();
    let states: Vec<&str> = pending["incidents"]
        .as_array()
        .expect("list")
        .iter()
        .map(|i| i["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(states, ["pending", "pending"], "{pending}");
    let open = d.ctl(&["incidents", "--state", "open"]);
    assert!(
        open.ok().contains("quiet") && !open.stdout.contains("charter"),
        "{open:?}"
    );
    let one = d.ctl(&["incidents", "--limit", "1", "-o", "json"]).json();
    assert_eq!(one["incidents"].as_array().map(Vec::len), Some(1));
    assert!(one["next"].is_string(), "{one}");
    let one_t = d.ctl(&["incidents", "--limit", "1"]);
    assert!(one_t
        .ok()
        .contains(&format!("--cursor {}", one["next"].as_str().unwrap_or(""))));
    let page2 = d
        .ctl(&[
            "incidents",
            "--limit",
            "1",
            "--cursor",
            one["next"].as_str().unwrap_or(""),
            "-o",
            "json",
        ])
        .json();
    assert_ne!(page2["incidents"][0]["id"], one["incidents"][0]["id"]);
    let bad = d.ctl(&["incidents", "--state", "sleeping"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(
        bad.stderr
            .starts_with("mapek ctl: unknown state `sleeping`"),
        "{bad:?}"
    );

    // incident: detail with violations and the policy.
    let it = d.ctl(&["incident", charter_inc]);
    it.ok();
    assert_eq!(cells(it.line("incident:"))[1], charter_inc);
    assert_eq!(cells(it.line("state:"))[1], "pending");
    assert_eq!(cells(it.line("components:"))[1], "charter");
    for rule in ["ValidationLatencyHigh", "FailureRateHigh", "ThroughputLow"] {
        let row = cells(it.line(&format!("  {rule}")));
        assert_eq!(&row[1..3], ["critical", "charter"], "{it:?}");
    }
    let pol_id = p_charter["id"].as_str().expect("policy id");
    assert!(
        cells(it.line(&format!("  {pol_id}"))).contains(&"pending"),
        "{it:?}"
    );
    let ij = d.ctl(&["incident", charter_inc, "-o", "json"]).json();
    assert_eq!(ij["incident"]["id"], charter_inc);
    assert_eq!(ij["violations"].as_array().map(Vec::len), Some(3), "{ij}");
    assert_eq!(ij["policies"][0]["id"], pol_id, "{ij}");

    // policies: both pending policies, with cause, actions and incident.
    let pt = d.ctl(&["policies", "--status", "pending"]);
    pt.ok();
    assert_eq!(
        cells(pt.stdout.lines().next().unwrap_or("")),
        ["ID", "STATUS", "CAUSE", "CONF", "ACTIONS", "RISK", "SCORE", "INCIDENT", "AGE"]
    );
    for p in [&p_charter, &p_ledger] {
        let row = cells(pt.line(p["id"].as_str().expect("id")));
        assert_eq!(row[1], "pending");
        assert_eq!(row[2], p["root_cause"].as_str().expect("cause"));
        let actions: Vec<&str> = p["actions"]
            .as_array()
            .expect("actions")
            .iter()
            .map(|a| a["action_type"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(row[4], actions.join(","));
        assert_eq!(row[7], p["incident_id"].as_str().expect("incident"));
    }
    let pj = d
        .ctl(&[
            "policies", "--status", "pending", "--limit", "1", "-o", "json",
        ])
        .json();
    assert_eq!(pj["policies"].as_array().map(Vec::len), Some(1), "{pj}");
    assert_eq!(pj["policies"][0]["approval_status"], "pending");

    // explain: why this remedy, approval, guards (today's fields).
    let ex = d.ctl(&["explain", pol_id]);
    ex.ok();
    for section in ["WHY THIS REMEDY", "APPROVAL", "GUARDS"] {
        assert!(ex.stdout.contains(&format!("\n{section}\n")), "{ex:?}");
    }
    let cause = p_charter["root_cause"].as_str().expect("cause");
    assert!(ex.line("  cause:").contains(cause), "{ex:?}");
    for a in p_charter["actions"].as_array().expect("actions") {
        let row = cells(ex.line(&format!("    {}", a["id"].as_str().expect("id"))));
        assert_eq!(row[1], a["action_type"].as_str().expect("type"), "{ex:?}");
        assert_eq!(row[2], "charter", "{ex:?}");
    }
    assert!(ex.line("  auto-approved:").contains("no"), "{ex:?}");
    let exj = d.ctl(&["explain", pol_id, "-o", "json"]).json();
    assert_eq!(exj["id"], pol_id);
    assert_eq!(exj["root_cause"], cause);

    // approve with --by and --reason; reject with the default by ($USER).
    let ap = d.ctl(&[
        "approve",
        pol_id,
        "--by",
        "alice",
        "--reason",
        "checked capacity",
    ]);
    assert_eq!(
        ap.ok(),
        format!("policy {pol_id} approved by alice: checked capacity\n")
    );
    let ledger_id = p_ledger["id"].as_str().expect("id");
    let rj = d.ctl(&["reject", ledger_id, "-o", "json"]).json();
    assert_eq!(rj["approval_status"], "rejected", "{rj}");
    assert_eq!(rj["decisions"][0]["by"], "carol", "{rj}");
    let ex = d.ctl(&["explain", ledger_id]);
    assert!(cells(ex.line("    rejected")).contains(&"carol"), "{ex:?}");
    let approved = d
        .ctl(&["policies", "--status", "approved", "-o", "json"])
        .json();
    assert_eq!(approved["policies"][0]["id"], pol_id, "{approved}");
    assert_eq!(approved["policies"][0]["decisions"][0]["by"], "alice");
    assert_eq!(
        approved["policies"][0]["decisions"][0]["reason"],
        "checked capacity"
    );

    // Deciding again: the daemon's 409, exit 1, its message on stderr.
    let again = d.ctl(&["reject", pol_id]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(
        again.stderr.starts_with("mapek ctl: ") && again.stderr.contains("only pending"),
        "{again:?}"
    );
    assert!(again.stdout.is_empty());

    // Unknown ids: exit 5.
    for args in [
        &["explain", "pol-nope"][..],
        &["approve", "pol-nope"][..],
        &["reject", "pol-nope", "-o", "json"][..],
        &["incident", "inc-nope"][..],
    ] {
        let o = d.ctl(args);
        assert_eq!(o.code, 5, "{args:?}: {o:?}");
        assert!(
            o.stderr.starts_with("mapek ctl: ") && o.stderr.contains("nope"),
            "{o:?}"
        );
    }
    d.stop();
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["policies", "--status", "maybe"][..],
        &[
            "silence",
            "charter",
            "--duration",
            "5parsecs",
            "--reason",
            "x",
        ][..],
        &["silence", "charter", "--duration", "0s", "--reason", "x"][..],
        &["silence", "charter", "--reason", "x"][..],
        &["status", "-o", "yaml"][..],
        &["approve"][..],
        &["frobnicate"][..],
    ] {
        let o = ctl("http://127.0.0.1:9", None, args);
        assert_eq!(o.code, 2, "{args:?}: {o:?}");
    }
    let o = ctl("not a url", None, &["status"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("--server"), "{o:?}");
}

#[test]
fn an_unreachable_or_silent_daemon_exits_3_naming_the_server() {
    // Nothing listens: refused at once.
    let addr = free_addr();
    let server = format!("http://{addr}");
    let o = ctl(&server, None, &["status"]);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(
        o.stderr.starts_with("mapek ctl: ")
            && o.stderr.contains(&server)
            && o.stderr.contains("--server")
            && o.stderr.contains("MAPEK_SERVER"),
        "{o:?}"
    );
    assert!(o.stdout.is_empty());
    // The default server comes from MAPEK_SERVER.
    let out = Command::new(bin())
        .args(["ctl", "incidents"])
        .env("MAPEK_SERVER", &server)
        .env_remove("MAPEK_API_TOKEN")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&server));

    // A listener that never answers: timed out after --timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = format!("http://{}", silent.local_addr().expect("addr"));
    let started = Instant::now();
    let o = ctl(&server, None, &["--timeout", "1", "policies"]);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(
        o.stderr.contains(&server) && o.stderr.contains("within 1 s"),
        "{o:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    drop(silent);
}

#[test]
fn a_missing_or_wrong_token_exits_4_and_the_right_one_works() {
    let d = Daemon::start(Some("s3cret"));
    let server = d.server();
    let none = ctl(&server, None, &["status"]);
    assert_eq!(none.code, 4, "{none:?}");
    assert!(
        none.stderr.contains("MAPEK_API_TOKEN") && none.stderr.contains("none was given"),
        "{none:?}"
    );
    let wrong = ctl(&server, Some("s3cre"), &["policies"]);
    assert_eq!(wrong.code, 4, "{wrong:?}");
    assert!(
        wrong.stderr.contains("MAPEK_API_TOKEN") && wrong.stderr.contains("wrong"),
        "{wrong:?}"
    );
    let flag = ctl(&server, None, &["--token", "nope", "approve", "pol-x"]);
    assert_eq!(flag.code, 4, "{flag:?}");
    // The right token, from the environment or from --token.
    assert_eq!(d.ctl(&["status"]).code, 0);
    let o = ctl(
        &server,
        None,
        &["incidents", "--token", "s3cret", "-o", "json"],
    );
    assert_eq!(o.json()["incidents"], json!([]));
    // With the right token an unknown policy is still 5.
    assert_eq!(d.ctl(&["explain", "pol-x"]).code, 5);
    d.stop();
}

// ---------------------------------------------------------------------
// The operator endpoints (pause, resume, clear, silence) and the new
// fields of the state and of a policy.

/// `paused` and `mode` of `status -o json`, in `state` or at the top.
fn state_field(v: &Value, key: &str) -> Value {
    match &v["state"][key] {
        Value::Null => v[key].clone(),
        x => x.clone(),
    }
}

#[test]
fn pause_and_resume_show_in_status() {
    let d = Daemon::start(None);
    let sj = d.ctl(&["status", "-o", "json"]).json();
    assert_eq!(state_field(&sj, "paused"), false, "{sj}");
    let mode = state_field(&sj, "mode");
    assert!(
        ["act", "dry_run", "shadow"].contains(&mode.as_str().unwrap_or("")),
        "{sj}"
    );
    let st = d.ctl(&["status"]);
    assert_eq!(cells(st.line("paused:"))[1], "no");
    assert_eq!(cells(st.line("mode:"))[1], mode.as_str().unwrap_or(""));

    let p = d.ctl(&["pause", "--by", "alice", "--reason", "deploy"]);
    assert!(
        p.ok().starts_with("loop paused by alice at ") && p.stdout.ends_with(": deploy\n"),
        "{p:?}"
    );
    let st = d.ctl(&["status"]);
    let line = st.line("paused:");
    assert!(
        line.contains("yes, by alice at") && line.ends_with(": deploy"),
        "{st:?}"
    );
    let sj = d.ctl(&["status", "-o", "json"]).json();
    assert_eq!(state_field(&sj, "paused"), true, "{sj}");
    let pause = state_field(&sj, "pause");
    assert_eq!(pause["by"], "alice", "{sj}");
    assert_eq!(pause["reason"], "deploy", "{sj}");

    // Resume (JSON), pause again with the default by ($USER), resume (table).
    let r = d.ctl(&["resume", "--reason", "done", "-o", "json"]).json();
    assert_eq!(r["paused"], false, "{r}");
    let st = d.ctl(&["status"]);
    assert_eq!(cells(st.line("paused:"))[1], "no");
    let again = d.ctl(&["pause", "-o", "json"]).json();
    assert_eq!(again["paused"], true, "{again}");
    assert_eq!(again["by"], "carol", "{again}");
    let r = d.ctl(&["resume"]);
    assert!(r.ok().starts_with("loop resumed"), "{r:?}");
    let sj = d.ctl(&["status", "-o", "json"]).json();
    assert_eq!(state_field(&sj, "paused"), false, "{sj}");
    d.stop();
}

#[test]
fn silence_and_clear_a_component() {
    let d = Daemon::start(None);
    // Both components are known to the daemon (one alert each).
    d.alert("charter", &[("ErrorsHigh", "failure")]);
    d.alert("ledger", &[("ErrorsHigh", "failure")]);
    wait_until(Duration::from_secs(20), "two incidents", || {
        let v = d.get("/api/v1/incidents")?;
        (v["incidents"].as_array()?.len() == 2).then_some(())
    });
    let before = chrono::Utc::now();
    let s = d.ctl(&[
        "silence",
        "charter",
        "--duration",
        "30m",
        "--reason",
        "maintenance",
        "-o",
        "json",
    ]);
    let sj = s.json();
    assert_eq!(sj["component"], "charter", "{sj}");
    assert_eq!(sj["reason"], "maintenance", "{sj}");
    assert_eq!(sj["by"], "carol", "{sj}");
    let until = chrono::DateTime::parse_from_rfc3339(sj["until"].as_str().unwrap_or(""))
        .expect("until is a timestamp");
    let secs = (until.with_timezone(&chrono::Utc) - before).num_seconds();
    assert!((1790..=1810).contains(&secs), "30 min ahead: {secs} s");
    let t = d.ctl(&[
        "silence",
        "ledger",
        "--duration",
        "90",
        "--reason",
        "noisy",
        "--by",
        "bob",
    ]);
    assert!(
        t.ok().starts_with("ledger silenced until ") && t.stdout.ends_with(" by bob: noisy\n"),
        "{t:?}"
    );

    let c = d.ctl(&["clear", "charter", "--reason", "back", "-o", "json"]);
    let cj = c.json();
    assert_eq!(cj["component"], "charter", "{cj}");
    assert!(
        cj["cleared"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "silence")),
        "{cj}"
    );
    let c = d.ctl(&["clear", "ledger"]);
    assert!(
        c.ok().starts_with("ledger: cleared ") && c.stdout.contains("silence"),
        "{c:?}"
    );
    // Nothing left to clear.
    let c = d.ctl(&["clear", "ledger", "-o", "json"]).json();
    assert!(
        c["cleared"]
            .as_array()
            .is_some_and(|a| !a.iter().any(|x| x == "silence")),
        "{c}"
    );
    d.stop();
}

#[test]
fn explain_reports_autonomy_and_guards() {
    let d = Daemon::start(None);
    let p = d.pending_policy("charter");
    let id = p["id"].as_str().expect("id");
    let j = d.ctl(&["explain", id, "-o", "json"]).json();
    assert_eq!(j["autonomy"]["auto_approved"], false, "{j}");
    assert!(j["autonomy"]["mode"].is_string(), "{j}");
    assert!(j["autonomy"]["reason"].is_string(), "{j}");
    assert!(j["guards"].is_array(), "{j}");
    let t = d.ctl(&["explain", id]);
    assert_eq!(
        cells(t.line("  mode:"))[1],
        j["autonomy"]["mode"].as_str().unwrap_or("")
    );
    assert_eq!(cells(t.line("  auto-approved:"))[1], "no");
    assert_eq!(
        cells(t.line("  reason:"))[1],
        j["autonomy"]["reason"].as_str().unwrap_or("")
    );
    let guards = t
        .stdout
        .split("\nGUARDS\n")
        .nth(1)
        .expect("a GUARDS section");
    match j["guards"].as_array() {
        Some(g) if !g.is_empty() => {
            for x in g {
                assert!(guards.contains(x["guard"].as_str().unwrap_or("")), "{t:?}");
            }
        }
        _ => assert_eq!(guards, "  none recorded\n"),
    }
    d.stop();
}
