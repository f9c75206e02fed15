//! HTTP hardening through the real binary (issue 9): every error is JSON,
//! the connection cap sheds stalled connections so `/health` answers, and
//! the store lists are paginated and streamed within a memory bound.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use mapek_actors::model::{new_id, AnalysisResult};
use mapek_actors::store::KnowledgeStore;
use support::{free_addr, Proc};

/// `mapek run` with `extra` appended to a config whose Prometheus is
/// unreachable, on `dir/data` and a free port, once it serves.
fn run_daemon(dir: &std::path::Path, extra: &str) -> (Proc, std::net::SocketAddr) {
    let cfg = dir.join("mapek.yaml");
    std::fs::write(
        &cfg,
        format!(
            "monitor:\n  interval_seconds: 1\nprometheus:\n  url: http://127.0.0.1:9\n  timeout_seconds: 1\n  retries: 0\n{extra}"
        ),
    )
    .expect("write config");
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
        &[],
        dir,
    );
    p.wait_for("serving", Duration::from_secs(20));
    (p, addr)
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// The status and JSON body of a response, failing if the body is not
/// a JSON object with a string `error`.
fn json_error(r: reqwest::blocking::Response, what: &str) -> (u16, String) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r.text().expect("body");
    assert!(ct.starts_with("application/json"), "{what}: {ct} {body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error string: {body}"))
        .to_string();
    assert!(!msg.is_empty(), "{what}: empty error");
    (status, msg)
}

#[test]
fn every_error_is_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut p, addr) = run_daemon(dir.path(), "");
    let c = client();
    let url = |p: &str| format!("http://{addr}{p}");
    let cases: Vec<(&str, reqwest::blocking::RequestBuilder, u16, &str)> = vec![
        (
            "unknown route",
            c.get(url("/api/v1/nope")),
            404,
            "no such endpoint",
        ),
        (
            "wrong method",
            c.delete(url("/api/v1/state")),
            405,
            "method not allowed",
        ),
        (
            "body too large",
            // Its own client: the server closes this connection without
            // reading the body, which a pooled connection would carry
            // over to the next request.
            client()
                .post(url("/api/v1/alerts"))
                .header("content-type", "application/json")
                .body(vec![b' '; 2 * 1024 * 1024]),
            413,
            "",
        ),
        (
            "long URI",
            c.get(url(&format!("/api/v1/state?x={}", "a".repeat(9000)))),
            414,
            "at most 8192",
        ),
        (
            "non-numeric limit",
            c.get(url("/api/v1/analyses?limit=abc")),
            400,
            "bad query",
        ),
        (
            "negative limit",
            c.get(url("/api/v1/executions?limit=-1")),
            400,
            "bad query",
        ),
        (
            "bad limit on policies",
            c.get(url("/api/v1/policies?limit=1e3")),
            400,
            "bad query",
        ),
        (
            "bad cursor",
            c.get(url("/api/v1/outcomes?cursor=zz")),
            400,
            "bad cursor",
        ),
        (
            "bad UTF-8 in an id",
            c.get(url("/api/v1/policies/%FF")),
            400,
            "",
        ),
        (
            "bad percent-encoding in an id",
            c.post(url("/api/v1/policies/%C3%28/approve"))
                .header("content-type", "application/json")
                .body("{}"),
            400,
            "",
        ),
        (
            "not JSON",
            c.post(url("/api/v1/pause"))
                .header("content-type", "text/plain")
                .body("pause"),
            415,
            "application/json",
        ),
    ];
    for (what, req, status, needle) in cases {
        let r = req.send().unwrap_or_else(|e| panic!("{what}: {e}"));
        let (got, msg) = json_error(r, what);
        assert_eq!(got, status, "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg}");
    }
    // 405 keeps its Allow header.
    let r = c.delete(url("/api/v1/state")).send().expect("delete");
    assert!(r.headers().get("allow").is_some(), "{:?}", r.headers());
    // A target over hyper's own limit (64 KiB) is refused by hyper before
    // any handler: 414, with no body (documented in docs/API.md).
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET /health?x={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(70 * 1024)
    )
    .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("status line");
    assert_eq!(&head, b"HTTP/1.1 414");
    // And the daemon serves on.
    assert_eq!(c.get(url("/health")).send().expect("health").status(), 200);
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

/// The value of one sample of `/metrics`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in\n{text}"))
}

/// With `api.max_connections: 50`, 200 clients that send half a request
/// head and wait: the oldest are closed to admit the newest, `/health`
/// answers, and the shed connections are counted.
#[test]
fn at_the_connection_cap_stalled_connections_are_shed_and_health_answers() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut p, addr) = run_daemon(dir.path(), "api:\n  max_connections: 50\n");
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .expect("half a head");
        stalled.push(s);
    }
    let c = client();
    let r = c
        .get(format!("http://{addr}/health"))
        .send()
        .expect("health answers at the cap");
    assert_eq!(r.status(), 200);
    // The oldest stalled connection was closed by the cap: it reads EOF
    // (or a reset) long before its 5 s header timeout would have come,
    // which the read timeout below (4 s) tells apart.
    let first = &mut stalled[0];
    first
        .set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    match first.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the oldest stalled connection is still open: {other:?}"),
    }
    let text = c
        .get(format!("http://{addr}/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    let shed = metric(
        &text,
        "mape_k_http_connections_shed_total{reason=\"no_request_head\"}",
    );
    // 200 stalled + /health + /metrics through a cap of 50.
    assert!(shed >= 150.0, "shed {shed}");
    assert_eq!(
        metric(
            &text,
            "mape_k_http_connections_shed_total{reason=\"refused\"}"
        ),
        0.0
    );
    let open = metric(&text, "mape_k_http_connections");
    assert!(open <= 50.0, "open {open}");
    p.term();
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

fn analysis(pad: usize) -> AnalysisResult {
    AnalysisResult {
        id: new_id("ana"),
        chain_id: "chn-big".into(),
        analyzed_at: chrono::Utc::now(),
        patterns: vec![],
        root_causes: vec![],
        recommendations: vec!["r".repeat(pad)],
        confidence: 0.5,
        violation_count: 1,
        max_severity: None,
        components: vec!["api".into()],
        incident_id: None,
    }
}

/// A field of `/proc/<pid>/status`, in kB.
fn proc_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} not in {s}"))
}

/// Seeds `dir/data` with 1000 analyses of ~100 KB (100 MB); their ids.
fn seed_large_analyses(dir: &std::path::Path) -> std::collections::HashSet<String> {
    let mut ids = std::collections::HashSet::new();
    let store =
        KnowledgeStore::open(&dir.join("data"), Duration::from_secs(20)).expect("open store");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for chunk in 0..10 {
            let mut pending = Vec::new();
            for _ in 0..100 {
                let a = analysis(100 * 1024);
                ids.insert(a.id.clone());
                pending.push(store.put_analysis_async(&a));
            }
            for f in pending {
                f.await.unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
            }
        }
    });
    store.close().expect("close");
    ids
}

/// Six parallel `GET /api/v1/analyses?limit=1000`, each checked; returns
/// the rows of each.
fn six_parallel_maximum_reads(addr: std::net::SocketAddr) -> Vec<usize> {
    let threads: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                let r = client()
                    .get(format!("http://{addr}/api/v1/analyses?limit=1000"))
                    .send()
                    .expect("read");
                assert_eq!(r.status(), 200);
                let body = r.bytes().expect("body");
                assert!(body.len() <= 4 * 1024 * 1024, "{}", body.len());
                let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
                v["analyses"].as_array().map_or(0, Vec::len)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("reader"))
        .collect()
}

/// Resets the peak RSS (`VmHWM`) of a process (Linux: `5` to
/// `/proc/<pid>/clear_refs`).
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
}

/// 1000 analyses of ~100 KB (100 MB): six parallel maximum reads add less
/// than 32 MB to the daemon's peak RSS (before paging and streaming, each
/// read built its whole answer in memory: ~1 GB for six), and a walk
/// through the `Link`s returns every analysis once, each page within
/// 4 MiB.
#[test]
fn six_parallel_maximum_reads_are_bounded_in_memory_and_pages_walk_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = seed_large_analyses(dir.path());
    let (mut p, addr) = run_daemon(dir.path(), "");
    let pid = p.child.id();
    reset_peak(pid);
    let before = proc_kb(pid, "VmRSS");
    for n in six_parallel_maximum_reads(addr) {
        assert!((30..1000).contains(&n), "a 4 MiB page of ~100 KB rows: {n}");
    }
    let hwm = proc_kb(pid, "VmHWM");
    eprintln!(
        "daemon RSS before the reads {before} kB, peak during six parallel maximum reads {hwm} kB"
    );
    assert!(
        hwm.saturating_sub(before) < 32 * 1024,
        "six reads added {} kB",
        hwm - before
    );

    // Walk every page through the Link header.
    let c = client();
    let mut next = Some("/api/v1/analyses?limit=1000".to_string());
    let mut seen = Vec::new();
    while let Some(path) = next.take() {
        let r = c.get(format!("http://{addr}{path}")).send().expect("page");
        assert_eq!(r.status(), 200);
        let link = r
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let cursor = r
            .headers()
            .get("x-next-cursor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = r.bytes().expect("body");
        assert!(body.len() <= 4 * 1024 * 1024);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["next"].as_str(), cursor.as_deref());
        for a in v["analyses"].as_array().expect("array") {
            seen.push(a["id"].as_str().expect("id").to_string());
        }
        next = link.map(|l| {
            l.strip_prefix('<')
                .and_then(|l| l.split_once(">; rel=\"next\""))
                .map(|(u, _)| u.to_string())
                .unwrap_or_else(|| panic!("bad Link {l}"))
        });
    }
    assert_eq!(seen.len(), 1000);
    let unique: std::collections::HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique, ids);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first");
    p.term();
    assert!(p.wait_exit(Duration::from_secs(30)).success());
}

/// The bound of issue 9 on the whole process: with 100 MB of analyses, six
/// parallel maximum reads keep the daemon's RSS under 128 MB. The start-up
/// check reads every record once (the daemon's peak at start is reported,
/// not bounded here); once the memory it used is given back (jemalloc
/// purges freed pages within about a second: awaited by polling the
/// resident size), the reads run and the peak is taken over them.
#[test]
fn six_parallel_maximum_reads_keep_the_daemon_under_128_mb() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed_large_analyses(dir.path());
    let (mut p, addr) = run_daemon(dir.path(), "");
    let pid = p.child.id();
    let start_peak = proc_kb(pid, "VmHWM");
    let settled = support::live::wait_until(
        Duration::from_secs(30),
        "the start-up memory given back",
        || {
            let rss = proc_kb(pid, "VmRSS");
            (rss < 96 * 1024).then_some(rss)
        },
    );
    reset_peak(pid);
    for n in six_parallel_maximum_reads(addr) {
        assert!((30..1000).contains(&n), "{n}");
    }
    let hwm = proc_kb(pid, "VmHWM");
    eprintln!(
        "daemon RSS: start-up peak {start_peak} kB, settled {settled} kB, peak during six \
         parallel maximum reads {hwm} kB"
    );
    assert!(hwm < 128 * 1024, "peak RSS {hwm} kB");
    p.term();
    assert!(p.wait_exit(Duration::from_secs(30)).success());
}
