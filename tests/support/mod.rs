//! Shared helpers of the integration tests: running the `mapek` binary and
//! awaiting what it says.
#![allow(dead_code)]

pub mod live;
pub mod servers;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::thread;
use std::time::{Duration, Instant};

/// Path of the built binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mapek")
}

/// A free loopback port (bound then released).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A running `mapek` process whose stderr lines are collected.
pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    /// Starts `mapek ARGS` with extra environment.
    pub fn start(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn mapek");
        let (tx, rx) = channel();
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx2.send(line).is_err() {
                    break;
                }
            }
        });
        let out = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits until a line containing `needle` is printed; panics with
    /// everything seen after `limit`.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "`{needle}` not printed within {limit:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Drains what was printed so far.
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// Sends SIGTERM.
    pub fn term(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits for the process to exit, panicking after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                // Collect the rest of the output.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "mapek did not exit within {limit:?}; output:\n{}",
                    self.seen.join("\n")
                );
            }
            // Process exit has no event to await from std; poll briefly.
            self.drain();
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// All output so far, one string.
    pub fn output(&mut self) -> String {
        self.drain();
        self.seen.join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client whose requests say `Content-Type: application/json`, as
/// Alertmanager's and every JSON client's do (mapek refuses other bodies).
#[allow(dead_code)]
pub fn json_client() -> reqwest::blocking::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::CONTENT_TYPE,
        reqwest::header::HeaderValue::from_static("application/json"),
    );
    reqwest::blocking::Client::builder()
        .default_headers(h)
        .build()
        .unwrap_or_default()
}
