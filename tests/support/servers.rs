//! Real Prometheus and Alertmanager processes on loopback ports, with
//! temporary configs, for the end-to-end tests. A missing binary is a test
//! failure (never a skip): `tests/run.sh` installs them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_addr;

fn find(names: &[&str]) -> PathBuf {
    for n in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
            let p = Path::new(dir).join(n);
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "none of {names:?} is installed: the end-to-end tests need Debian's prometheus, \
         prometheus-alertmanager and etcd-server (run `bash tests/run.sh`, which installs them)"
    );
}

/// Polls `url` until it answers 2xx (process start-up has no other event
/// to await), panicking after `limit`.
pub fn wait_http_ok(url: &str, limit: Duration, what: &str) {
    let end = Instant::now() + limit;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    loop {
        if let Ok(r) = client.get(url).send() {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < end,
            "{what} did not become ready at {url} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A server process killed on drop.
pub struct Server {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    bin: PathBuf,
    log: PathBuf,
}

impl Server {
    fn spawn(
        bin: PathBuf,
        args: Vec<String>,
        dir: tempfile::TempDir,
        addr: SocketAddr,
        log: PathBuf,
    ) -> Server {
        let mut s = Server {
            child: None,
            addr,
            dir,
            args,
            bin,
            log,
        };
        s.start();
        s
    }

    /// (Re)starts the process with the same arguments and data.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts Prometheus scraping `targets` (job name → host:port) every
/// second, evaluating `rules` (file contents) every second and alerting to
/// `alertmanager` when given.
pub fn prometheus(
    targets: &[(&str, SocketAddr)],
    rules: Option<&str>,
    alertmanager: Option<SocketAddr>,
) -> Server {
    let bin = find(&["prometheus"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = free_addr();
    let mut cfg = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n");
    if rules.is_some() {
        cfg.push_str("rule_files:\n  - rules.yml\n");
    }
    if let Some(am) = alertmanager {
        cfg.push_str(&format!(
            "alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{am}\"]\n"
        ));
    }
    cfg.push_str("scrape_configs:\n");
    for (job, t) in targets {
        cfg.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: [\"{t}\"]\n"
        ));
    }
    std::fs::write(dir.path().join("prometheus.yml"), cfg).expect("config");
    if let Some(r) = rules {
        std::fs::write(dir.path().join("rules.yml"), r).expect("rules");
    }
    let args = vec![
        format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ),
        format!("--storage.tsdb.path={}", dir.path().join("data").display()),
        format!("--web.listen-address={addr}"),
        "--web.enable-lifecycle".into(),
    ];
    let log = dir.path().join("prometheus.log");
    let s = Server::spawn(bin, args, dir, addr, log);
    wait_http_ok(
        &format!("{}/-/ready", s.url()),
        Duration::from_secs(60),
        "prometheus",
    );
    s
}

/// Starts Alertmanager routing everything to `webhook` with short group
/// timings.
pub fn alertmanager(webhook: &str) -> Server {
    alertmanager_at(webhook, free_addr())
}

/// An Alertmanager on `addr` (chosen beforehand, so mapek's
/// `alertmanager.url` can name it before it starts).
pub fn alertmanager_at(webhook: &str, addr: std::net::SocketAddr) -> Server {
    let bin = find(&["prometheus-alertmanager", "alertmanager"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = format!(
        "route:\n  receiver: mapek\n  group_by: ['alertname']\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1m\n\
         receivers:\n  - name: mapek\n    webhook_configs:\n      - url: {webhook}\n        send_resolved: true\n"
    );
    std::fs::write(dir.path().join("am.yml"), cfg).expect("config");
    let args = vec![
        format!("--config.file={}", dir.path().join("am.yml").display()),
        format!("--storage.path={}", dir.path().join("data").display()),
        format!("--web.listen-address={addr}"),
        "--cluster.listen-address=".into(),
    ];
    let log = dir.path().join("alertmanager.log");
    let s = Server::spawn(bin, args, dir, addr, log);
    wait_http_ok(
        &format!("{}/-/ready", s.url()),
        Duration::from_secs(60),
        "alertmanager",
    );
    s
}

/// Starts a single-member etcd (Debian's `etcd-server`, binary `etcd`) on
/// free loopback client and peer ports with a temporary data directory,
/// and waits until it answers `/health`. Killed on drop; `url()` is the
/// client URL.
pub fn etcd() -> Server {
    let bin = find(&["etcd"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = free_addr();
    let peer = free_addr();
    let args = vec![
        "--name=test".to_string(),
        format!("--data-dir={}", dir.path().join("data").display()),
        format!("--listen-client-urls=http://{addr}"),
        format!("--advertise-client-urls=http://{addr}"),
        format!("--listen-peer-urls=http://{peer}"),
        format!("--initial-advertise-peer-urls=http://{peer}"),
        format!("--initial-cluster=test=http://{peer}"),
        "--initial-cluster-state=new".into(),
        "--logger=zap".into(),
        "--log-level=warn".into(),
    ];
    let log = dir.path().join("etcd.log");
    let s = Server::spawn(bin, args, dir, addr, log);
    wait_http_ok(
        &format!("{}/health", s.url()),
        Duration::from_secs(60),
        "etcd",
    );
    s
}
