//! `mapek demo`: the main job on embedded defaults, end to end (in-process
//! simulated Charter over real loopback HTTP, real sled in a temp dir).

mod support;

#[test]
fn demo_heals_every_injected_fault_and_reports_json() {
    let out = std::process::Command::new(support::bin())
        .args(["demo", "--duration", "35", "--report", "json"])
        .output()
        .expect("run demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let injected = report["faults_injected"].as_u64().expect("faults_injected");
    assert!(injected >= 3, "{report}");
    assert_eq!(
        report["faults_recovered"], report["faults_injected"],
        "{report}"
    );
    let ok = report["outcomes"]["SUCCESS"].as_u64().unwrap_or(0)
        + report["outcomes"]["PARTIAL"].as_u64().unwrap_or(0);
    assert!(ok >= 3, "verified SUCCESS/PARTIAL outcomes: {report}");
    assert!(report["policies_executed"].as_u64().unwrap_or(0) >= 3);
    assert!(report["mean_time_to_recover_seconds"].as_f64().is_some());
    for step in [
        "FAULT", "detected", "analysed", "planned", "approved", "executed", "verified", "HEALED",
    ] {
        assert!(stderr.contains(step), "narration lacks `{step}`:\n{stderr}");
    }
}
