//! Fault suite: the dependency matrix. Each dependency fails in each way
//! it can, and mapek must not act without evidence, must say honestly in
//! `/ready` what it cannot see or reach, and must keep running.
//!
//! - Prometheus down (nothing listening), answering 500, answering HTML,
//!   hanging (accepts, never answers): a stand-in server on loopback
//!   (named so: a real Prometheus cannot be made to fail these ways), the
//!   simulated Charter as the effector. No Charter call may be made.
//! - Charter answering 5xx, answering 4xx, down: a REAL Prometheus
//!   scrapes the simulated Charter (evidence exists, a fault is injected),
//!   and the Charter's API fails. The executions fail and say why, nothing
//!   is applied, `/health` keeps answering.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mapek::sim::{FaultKind, Simulator, Topology};
use mapek_actors::clock::SystemClock;
use serde_json::Value;
use support::live::{get, wait_until};
use support::servers::prometheus;
use support::{free_addr, Proc};

/// How a dependency fails.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// Answers every request with this status.
    Status(u16),
    /// Answers 200 with an HTML page.
    Html,
    /// Accepts the request and never answers.
    Hang,
}

/// A server on loopback that fails every request under `prefix` the way
/// `failure` says and passes the others to `inner` (when given).
struct Failing {
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

fn failing(failure: Failure, prefix: &'static str, inner: Option<axum::Router>) -> Failing {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = inner.unwrap_or_default().layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| async move {
            use axum::response::IntoResponse;
            if !req.uri().path().starts_with(prefix) {
                return next.run(req).await;
            }
            match failure {
                Failure::Status(code) => {
                    let code = axum::http::StatusCode::from_u16(code).expect("status");
                    (code, "{\"error\":\"injected failure\"}").into_response()
                }
                Failure::Html => (
                    [(axum::http::header::CONTENT_TYPE, "text/html")],
                    "<!DOCTYPE html><html><body><h1>Login</h1></body></html>",
                )
                    .into_response(),
                Failure::Hang => {
                    std::future::pending::<()>().await;
                    unreachable!("pending never resolves")
                }
            }
        },
    ));
    rt.spawn(async move { axum::serve(listener, router).await });
    Failing { addr, _rt: rt }
}

/// The simulated Charter on loopback, with a load spike injected.
fn charter() -> (Simulator, axum::Router) {
    let sim = Simulator::with_topology(Topology::default(), Arc::new(SystemClock));
    sim.inject(FaultKind::LoadSpike).expect("inject");
    let router = mapek::sim::router(sim.clone(), None);
    (sim, router)
}

fn serve(router: axum::Router) -> (SocketAddr, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(async move { axum::serve(listener, router).await });
    (addr, rt)
}

fn start(prometheus: &str, charter: SocketAddr) -> (Proc, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("mapek.yaml");
    std::fs::write(
        &cfg,
        format!(
            "monitor:\n  interval_seconds: 1\n\
             prometheus:\n  url: {prometheus}\n  timeout_seconds: 1\n  retries: 0\n\
             alertmanager:\n  enabled: false\n\
             charter:\n  url: http://{charter}\n\
             execute:\n  call_timeout_seconds: 2\n  retries: 1\n  verification_window_seconds: 2\n  preflight_validate: false\n"
        ),
    )
    .expect("config");
    let addr = free_addr();
    let (c, d, a) = (
        cfg.display().to_string(),
        dir.path().join("data").display().to_string(),
        addr.to_string(),
    );
    let mut p = Proc::start(
        &["run", "--config", &c, "--data-dir", &d, "--listen", &a],
        &[("LOG_LEVEL", "info")],
        dir.path(),
    );
    p.wait_for("serving", Duration::from_secs(30));
    (p, addr, dir)
}

/// `/ready` (status and body).
fn ready(addr: SocketAddr) -> (u16, Value) {
    let r = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client")
        .get(format!("http://{addr}/ready"))
        .send()
        .expect("ready answers");
    (r.status().as_u16(), r.json().expect("json"))
}

/// A sample of mapek's `/metrics`.
fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = reqwest::blocking::get(format!("http://{addr}/metrics"))
        .ok()?
        .text()
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Prometheus fails `failure`'s way (or is down): after three polls the
/// source is degraded with its reason, `/ready` says no source gives
/// evidence, `mape_k_can_act` is 0, and the Charter got no call.
fn prometheus_fails(failure: Option<Failure>) {
    let (sim, router) = charter();
    let (charter_addr, _crt) = serve(router);
    let stand_in;
    let prom_url = match failure {
        Some(f) => {
            stand_in = failing(f, "/", None);
            format!("http://{}", stand_in.addr)
        }
        // Bound then released: nothing listens there.
        None => format!("http://{}", free_addr()),
    };
    let (mut p, addr, _dir) = start(&prom_url, charter_addr);
    let polls = "mape_k_source_query_duration_seconds_count{source=\"prometheus\"";
    let body = wait_until(Duration::from_secs(30), "three failed polls", || {
        let n = metric(addr, polls)?;
        let (code, body) = ready(addr);
        (n >= 3.0 && code == 503).then_some(body)
    });
    let label = format!("{failure:?}");
    assert_eq!(body["can_act"]["prometheus"], false, "{label}: {body}");
    let degraded = &body["degraded"][0];
    assert_eq!(degraded["source"], "prometheus", "{label}: {body}");
    let reason = degraded["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{label}: a reason is given: {body}");
    assert!(
        body["reasons"].as_array().is_some_and(|r| r
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.contains("no metric source")))),
        "{label}: {body}"
    );
    assert_eq!(
        metric(addr, "mape_k_can_act{source=\"prometheus\"}"),
        Some(0.0),
        "{label}"
    );
    let posts = sim.calls().iter().filter(|c| c.method == "POST").count();
    assert_eq!(posts, 0, "{label}: mapek acted without evidence");
    let health = get(&format!("http://{addr}/health")).expect("health");
    assert_eq!(health["status"], "ok");
    eprintln!("prometheus {label}: degraded ({reason}); 0 Charter calls");
    let out = p.output();
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn prometheus_down_no_action_and_ready_says_so() {
    prometheus_fails(None);
}

#[test]
fn prometheus_500_no_action_and_ready_says_so() {
    prometheus_fails(Some(Failure::Status(500)));
}

#[test]
fn prometheus_html_no_action_and_ready_says_so() {
    prometheus_fails(Some(Failure::Html));
}

#[test]
fn prometheus_hanging_no_action_and_ready_says_so() {
    prometheus_fails(Some(Failure::Hang));
}

/// The Charter's API fails `failure`'s way (or is down) while a real
/// Prometheus sees the fault: mapek plans and tries, every execution ends
/// FAILED (or ROLLED_BACK) saying why, nothing is applied, and mapek keeps
/// serving.
fn charter_fails(failure: Option<Failure>) {
    let (sim, router) = charter();
    let metrics_side = failing(
        failure.unwrap_or(Failure::Status(503)),
        "/api/",
        Some(router),
    );
    let prom = prometheus(&[("charter", metrics_side.addr)], None, None);
    // Down: mapek's effector points at a port where nothing listens; the
    // Charter's /metrics stays up for Prometheus.
    let effector_addr = match failure {
        Some(_) => metrics_side.addr,
        None => free_addr(),
    };
    let (mut p, addr, _dir) = start(&prom.url(), effector_addr);
    let label = format!("{failure:?}");
    let executions = wait_until(Duration::from_secs(90), "an execution that ended", || {
        let v = get(&format!("http://{addr}/api/v1/executions?limit=50"))?;
        let list = v["executions"].as_array()?.clone();
        list.iter()
            .any(|e| e["status"] != "IN_PROGRESS")
            .then_some(list)
    });
    let ended = executions
        .iter()
        .find(|e| e["status"] != "IN_PROGRESS")
        .expect("ended");
    assert!(
        ended["status"] == "FAILED" || ended["status"] == "ROLLED_BACK",
        "{label}: {ended}"
    );
    let error = ended["error"].as_str().unwrap_or_default().to_string();
    assert!(
        !error.is_empty(),
        "{label}: the execution says why: {ended}"
    );
    let applied = sim
        .calls()
        .iter()
        .filter(|c| c.method == "POST" && c.status == 200)
        .count();
    assert_eq!(applied, 0, "{label}: nothing reached the Charter's state");
    let health = get(&format!("http://{addr}/health")).expect("health");
    assert_eq!(health["status"], "ok");
    if failure.is_none() {
        // The background probe shows the dead effector (never fatal).
        let body = wait_until(Duration::from_secs(45), "the effector probed", || {
            let (_, body) = ready(addr);
            (body["effectors"][0]["reachable"] == false).then_some(body)
        });
        assert!(
            !body["effectors"][0]["last_error"].is_null(),
            "{label}: {body}"
        );
    }
    eprintln!(
        "charter {label}: execution {} ({error}); 0 applied",
        ended["status"]
    );
    let out = p.output();
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn charter_5xx_fails_the_execution_and_applies_nothing() {
    charter_fails(Some(Failure::Status(503)));
}

#[test]
fn charter_4xx_fails_the_execution_and_applies_nothing() {
    charter_fails(Some(Failure::Status(400)));
}

#[test]
fn charter_down_fails_the_execution_and_ready_shows_it() {
    charter_fails(None);
}
