//! End-to-end measurements through the release binary and real HTTP
//! (not criterion: each prints one JSON line).
//!
//! * `ingest` — 100 000 distinct alerts, 100 per webhook payload, posted
//!   over one keep-alive connection: alerts/s overall, per 10 000, RSS and
//!   data-directory size afterwards, then RSS 60 s after they all resolve.
//! * `reaction` — 100 incidents (3 alerts each, distinct components) posted
//!   20 ms apart: webhook POST → first effector call of that component,
//!   p50/p99 (default verification window and pre-flight validation).
//! * `burst` — 20 incidents on 20 components posted at once: how many were
//!   acted on, and when the last one was.
//!
//! The effector is mapek's webhook effector posting to a receiver in this
//! process that records when each component's first action arrives.
//!
//! ```text
//! cargo build --release && cargo bench --bench e2e -- ingest reaction burst
//! ```
//! (`benches/run.sh` does both.) Under `cargo test` (CI) it runs nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

async fn receive(State(a): State<Arrivals>, Json(body): Json<Value>) -> Json<Value> {
    if body["kind"] == "apply" {
        if let Some(t) = body["action"]["target"].as_str() {
            a.lock()
                .expect("lock")
                .entry(t.to_string())
                .or_insert_with(Instant::now);
        }
    }
    Json(json!({"ok": true}))
}

async fn receiver() -> (SocketAddr, Arrivals) {
    let arrivals: Arrivals = Arc::default();
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, arrivals)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Daemon {
    child: Child,
    api: String,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    root.join("target/release/mapek")
}

fn start_daemon(hook: SocketAddr, extra: &str) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let data = dir.path().join("data");
    let config = format!(
        "prometheus:\n  enabled: false\napi:\n  listen: 127.0.0.1:{port}\nknowledge:\n  data_dir: {}\n\
         effectors:\n  default: webhook\n  webhook:\n    url: http://{hook}/hook\n\
         logging:\n  level: warn\n{extra}",
        data.display()
    );
    let path = dir.path().join("mapek.yaml");
    std::fs::write(&path, config).expect("config");
    let child = Command::new(binary())
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the release binary (cargo build --release first)");
    let api = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{api}/health"))
        .send()
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "mapek did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon {
        child,
        api,
        data,
        _dir: dir,
    }
}

fn alert(component: &str, name: &str, status: &str) -> Value {
    json!({
        "status": status,
        "labels": {"alertname": name, "severity": "critical", "component": component},
        "annotations": {},
        "startsAt": chrono::Utc::now().to_rfc3339(),
        "endsAt": if status == "firing" { "0001-01-01T00:00:00Z".to_string() } else { chrono::Utc::now().to_rfc3339() },
        "generatorURL": "",
        "fingerprint": format!("{component}-{name}"),
    })
}

fn payload(alerts: Vec<Value>) -> Value {
    json!({"receiver": "mapek", "status": "firing", "alerts": alerts, "groupLabels": {},
        "commonLabels": {}, "commonAnnotations": {}, "externalURL": "", "version": "4",
        "groupKey": "bench", "truncatedAlerts": 0})
}

fn incident(component: &str) -> Value {
    payload(
        ["FailureRateHigh", "ErrorsHigh", "FailuresHigh"]
            .iter()
            .map(|n| alert(component, n, "firing"))
            .collect(),
    )
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn dir_mb(p: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(p) as f64 / 1_048_576.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn ingest() {
    let (hook, _arrivals) = receiver().await;
    let d = start_daemon(
        hook,
        "analyze:\n  max_window_violations: 200000\nalertmanager:\n  max_body_bytes: 4194304\n",
    );
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts", d.api);
    let total = 100_000usize;
    let per = 100usize;
    let mut chunk_secs = Vec::new();
    let started = Instant::now();
    let mut chunk_start = Instant::now();
    for b in 0..total / per {
        let alerts: Vec<Value> = (0..per)
            .map(|i| {
                let n = b * per + i;
                alert(&format!("svc-{:02}", n % 50), &format!("A{n}"), "firing")
            })
            .collect();
        let r = client
            .post(&url)
            .json(&payload(alerts))
            .send()
            .await
            .expect("post");
        assert!(r.status().is_success(), "webhook answered {}", r.status());
        if (b + 1) * per % 10_000 == 0 {
            chunk_secs.push(chunk_start.elapsed().as_secs_f64());
            chunk_start = Instant::now();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = d.child.id();
    let rss_after = rss_mb(pid);
    let disk_after = dir_mb(&d.data);
    // Resolve everything.
    for b in 0..total / per {
        let alerts: Vec<Value> = (0..per)
            .map(|i| {
                let n = b * per + i;
                alert(&format!("svc-{:02}", n % 50), &format!("A{n}"), "resolved")
            })
            .collect();
        let _ = client.post(&url).json(&payload(alerts)).send().await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    let rss_resolved = rss_mb(pid);
    let first = chunk_secs.first().copied().unwrap_or(f64::NAN);
    let last = chunk_secs.last().copied().unwrap_or(f64::NAN);
    println!(
        "{}",
        json!({"bench": "ingest", "alerts": total, "per_payload": per,
            "alerts_per_second": (total as f64 / secs).round(),
            "first_10k_seconds": first, "last_10k_seconds": last,
            "last_over_first": last / first,
            "rss_mb_after": rss_after, "data_dir_mb_after": disk_after,
            "rss_mb_60s_after_resolved": rss_resolved})
    );
}

async fn reaction() {
    let (hook, arrivals) = receiver().await;
    let d = start_daemon(hook, "");
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts", d.api);
    let mut sent: Vec<(String, Instant)> = Vec::new();
    for i in 0..100 {
        let comp = format!("rx-{i:03}");
        let body = incident(&comp);
        let at = Instant::now();
        let r = client.post(&url).json(&body).send().await.expect("post");
        assert!(r.status().is_success());
        sent.push((comp, at));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrivals.lock().expect("lock").len() < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let a = arrivals.lock().expect("lock").clone();
    let mut ms: Vec<f64> = sent
        .iter()
        .filter_map(|(c, t)| {
            a.get(c)
                .map(|r| r.duration_since(*t).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({"bench": "reaction", "incidents": 100, "acted_on": ms.len(),
            "p50_ms": pct(&ms, 0.5), "p99_ms": pct(&ms, 0.99), "max_ms": pct(&ms, 1.0)})
    );
    drop(d);
}

async fn burst() {
    let (hook, arrivals) = receiver().await;
    let d = start_daemon(hook, "");
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts", d.api);
    let bodies: Vec<Value> = (0..20).map(|i| incident(&format!("bx-{i:02}"))).collect();
    let started = Instant::now();
    let posts = bodies.into_iter().map(|b| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { client.post(&url).json(&b).send().await })
    });
    for p in futures::future::join_all(posts).await {
        let r = p.expect("join").expect("post");
        assert!(r.status().is_success());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrivals.lock().expect("lock").len() < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a = arrivals.lock().expect("lock").clone();
    let last = a
        .values()
        .map(|t| t.duration_since(started).as_secs_f64() * 1000.0)
        .fold(0.0, f64::max);
    println!(
        "{}",
        json!({"bench": "burst", "incidents": 20, "acted_on": a.len(), "last_ms": last})
    );
    drop(d);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --benches` passes no selection (or `--bench` only): run
    // nothing there, the measurements need the release binary.
    let selected: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["ingest", "reaction", "burst"].contains(a))
        .collect();
    if selected.is_empty() {
        return;
    }
    assert!(
        binary().exists(),
        "{} missing: cargo build --release first",
        binary().display()
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for s in selected {
        match s {
            "ingest" => rt.block_on(ingest()),
            "reaction" => rt.block_on(reaction()),
            _ => rt.block_on(burst()),
        }
    }
}
