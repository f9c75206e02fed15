//! `mapek demo`: the main job on embedded defaults, end to end (in-process
//! simulated Charter with three components over real loopback HTTP, real
//! sled in a temp dir).

mod support;

use serde_json::Value;

fn f64_of(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The first remedy of a fault, checked to target `component` only.
fn first_remedy<'a>(fault: &'a Value, component: &str) -> &'a Value {
    let r = &fault["remedies"][0];
    assert!(r.is_object(), "no remedy for {fault}");
    assert_eq!(r["targets"], serde_json::json!([component]), "{fault}");
    r
}

#[test]
fn demo_heals_concurrent_faults_and_a_cascade_and_reports_json() {
    let started = std::time::Instant::now();
    let out = std::process::Command::new(support::bin())
        .args(["demo", "--duration", "45", "--report", "json"])
        .output()
        .expect("run demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(
        started.elapsed().as_secs() < 60,
        "the demo ends near its duration"
    );
    assert_eq!(
        report["components"],
        serde_json::json!(["charter", "ledger", "gateway"])
    );
    assert_eq!(
        report["topology"]["gateway"],
        serde_json::json!(["charter"])
    );
    let injected = report["faults_injected"].as_u64().expect("faults_injected");
    assert!(injected >= 4, "{report}");
    assert_eq!(
        report["faults_recovered"], report["faults_injected"],
        "{report}"
    );
    let ok = report["outcomes"]["SUCCESS"].as_u64().unwrap_or(0)
        + report["outcomes"]["PARTIAL"].as_u64().unwrap_or(0);
    assert!(ok >= 4, "verified SUCCESS/PARTIAL outcomes: {report}");
    assert!(report["policies_executed"].as_u64().unwrap_or(0) >= 4);
    assert!(report["mean_time_to_recover_seconds"].as_f64().is_some());
    let faults = report["faults"].as_array().expect("faults");
    for f in faults {
        assert!(
            f["recovered_after_seconds"].as_f64().is_some(),
            "healed: {f}"
        );
        assert!(
            f["detected_after_seconds"].as_f64().is_some(),
            "detected: {f}"
        );
        assert!(f["incident_id"].is_string(), "{f}");
    }

    // Step 1: two faults on two unrelated components injected together,
    // two incidents, two remedies overlapping in time.
    let step1: Vec<&Value> = faults.iter().filter(|f| f["step"] == 1).collect();
    assert_eq!(step1.len(), 2, "{report}");
    let (a, b) = (step1[0], step1[1]);
    assert_eq!(
        (a["kind"].as_str(), a["component"].as_str()),
        (Some("load_spike"), Some("charter"))
    );
    assert_eq!(
        (b["kind"].as_str(), b["component"].as_str()),
        (Some("node_crash"), Some("ledger"))
    );
    assert_ne!(a["incident_id"], b["incident_id"], "two incidents");
    assert_eq!(a["incident_components"], serde_json::json!(["charter"]));
    assert_eq!(b["incident_components"], serde_json::json!(["ledger"]));
    let (ra, rb) = (first_remedy(a, "charter"), first_remedy(b, "ledger"));
    let (a0, a1) = (
        f64_of(&ra["started_at_seconds"]),
        f64_of(&ra["finished_at_seconds"]),
    );
    let (b0, b1) = (
        f64_of(&rb["started_at_seconds"]),
        f64_of(&rb["finished_at_seconds"]),
    );
    assert!(
        a0 < b1 && b0 < a1,
        "the remedies overlap: charter {a0}–{a1} s, ledger {b0}–{b1} s"
    );
    assert!(
        report["max_concurrent_remedies"].as_u64().unwrap_or(0) >= 2,
        "{report}"
    );

    // A cascade at charter: diagnosed at charter, remedied there only.
    let cascade = faults
        .iter()
        .find(|f| f["kind"] == "cascade")
        .unwrap_or_else(|| panic!("no cascade injected: {report}"));
    assert_eq!(cascade["component"], "charter");
    assert_eq!(cascade["root_component"], "charter", "{cascade}");
    assert_eq!(cascade["diagnosis"], "cascade_failure", "{cascade}");
    let remedies = cascade["remedies"].as_array().expect("remedies");
    assert!(
        remedies.iter().any(|r| r["cause"] == "cascade_failure"
            && r["targets"] == serde_json::json!(["charter"])
            && r["actions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "ACTIVATE_EMERGENCY_OVERRIDE"))),
        "{cascade}"
    );
    assert!(
        remedies
            .iter()
            .all(|r| r["targets"] == serde_json::json!(["charter"])),
        "nothing is sent to the dependents: {cascade}"
    );

    for step in [
        "FAULT",
        "detected",
        "analysed",
        "planned",
        "approved",
        "operator",
        "executed",
        "verified",
        "HEALED",
        "CONCURRENT remedies overlapped",
        "cascade injected at charter",
    ] {
        assert!(stderr.contains(step), "narration lacks `{step}`:\n{stderr}");
    }
}
