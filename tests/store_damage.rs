//! A damaged knowledge store, as an operator meets it through the `mapek`
//! binary: a damaged journal makes `mapek run` refuse with what is damaged
//! and what would be lost (no panic trace), `mapek run --repair` starts and
//! says what it did in `GET /api/v1/knowledge/integrity`, and a sled that
//! lost its files is rebuilt from the journal without being asked.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mapek_actors::journal::JournalOptions;
use mapek_actors::model::{
    new_id, ApprovalStatus, Priority, RemediationPolicy, RiskLevel, RootCause,
};
use mapek_actors::store::KnowledgeStore;
use serde_json::Value;
use support::live::get;
use support::{free_addr, Proc};

fn policy() -> RemediationPolicy {
    RemediationPolicy {
        id: new_id("pol"),
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

/// A store of 60 policies in small segments; its data directory.
fn seeded(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let store = KnowledgeStore::open_with(
        &data,
        Duration::from_secs(10),
        JournalOptions {
            segment_bytes: 4096,
            ..JournalOptions::default()
        },
    )
    .expect("open");
    for _ in 0..60 {
        store.put_policy(&policy()).expect("put");
    }
    store.close().expect("close");
    data
}

fn segments(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("journal"))
        .expect("journal")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn config(dir: &Path) -> String {
    let cfg = dir.join("mapek.yaml");
    std::fs::write(
        &cfg,
        "prometheus:\n  enabled: false\nalertmanager:\n  enabled: true\n",
    )
    .expect("config");
    cfg.display().to_string()
}

fn run(dir: &Path, data: &Path, extra: &[&str]) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let (c, d, a) = (config(dir), data.display().to_string(), addr.to_string());
    let mut args = vec!["run", "--config", &c, "--data-dir", &d, "--listen", &a];
    args.extend_from_slice(extra);
    (Proc::start(&args, &[], dir), addr)
}

fn policies(addr: std::net::SocketAddr) -> usize {
    let mut n = 0;
    let mut next = Some("/api/v1/policies?limit=1000".to_string());
    while let Some(path) = next.take() {
        let v = get(&format!("http://{addr}{path}")).expect("policies");
        n += v["policies"].as_array().map_or(0, Vec::len);
        next = v["next"]
            .as_str()
            .map(|c| format!("/api/v1/policies?limit=1000&cursor={c}"));
    }
    n
}

#[test]
fn a_damaged_journal_is_refused_then_repaired_through_the_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = seeded(dir.path());
    let segs = segments(&data);
    assert!(segs.len() >= 3, "{segs:?}");
    let victim = segs[1].clone();
    let mut b = std::fs::read(&victim).expect("read");
    let mid = b.len() / 2;
    b[mid..mid + 16].iter_mut().for_each(|x| *x ^= 0xFF);
    std::fs::write(&victim, b).expect("write");

    let (mut p, _) = run(dir.path(), &data, &[]);
    let status = p.wait_exit(Duration::from_secs(30));
    let out = p.output();
    eprintln!("refusal:\n{out}");
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("is damaged"), "{out}");
    assert!(
        out.contains(&victim.display().to_string()),
        "names the file: {out}"
    );
    assert!(out.contains("--repair"), "{out}");
    assert!(!out.contains("panicked"), "{out}");

    let (mut p, addr) = run(dir.path(), &data, &["--repair"]);
    p.wait_for("serving", Duration::from_secs(30));
    let v: Value = get(&format!("http://{addr}/api/v1/knowledge/integrity")).expect("integrity");
    let r = &v["integrity"];
    assert_eq!(r["repaired"], true, "{v}");
    let report = r["repair_report"].as_str().expect("a repair report");
    assert!(Path::new(report).exists());
    assert_eq!(policies(addr), 60, "every readable record kept");
    assert!(p.output().contains("knowledge store repaired"));
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());

    // Repaired: the next start needs nothing.
    let (mut p, addr) = run(dir.path(), &data, &[]);
    p.wait_for("serving", Duration::from_secs(30));
    let v: Value = get(&format!("http://{addr}/api/v1/knowledge/integrity")).expect("integrity");
    assert_eq!(v["integrity"]["repaired"], false, "{v}");
    assert_eq!(v["integrity"]["damage"], serde_json::json!([]), "{v}");
    assert_eq!(policies(addr), 60);
}

#[test]
fn a_sled_that_lost_its_files_is_rebuilt_from_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = seeded(dir.path());
    std::fs::remove_file(data.join("db")).expect("delete db");
    let (mut p, addr) = run(dir.path(), &data, &[]);
    p.wait_for("serving", Duration::from_secs(30));
    let v: Value = get(&format!("http://{addr}/api/v1/knowledge/integrity")).expect("integrity");
    let r = &v["integrity"];
    assert!(
        r["rebuilt"] == true || r["sled_damaged"] == true,
        "the loss is reported: {v}"
    );
    assert_eq!(policies(addr), 60, "nothing lost");
    let out = p.output();
    assert!(
        out.contains("rebuilt") || out.contains("put right"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}
