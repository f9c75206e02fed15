//! The live pieces of the end-to-end tests: the simulated Charter served
//! over loopback HTTP from the test process, the `mapek` binary on a
//! temporary config, and waiting on what they show.

use std::net::SocketAddr;

use std::time::{Duration, Instant};

use mapek::sim::{Simulator, Topology};
use mapek_actors::clock::SharedClock;
use serde_json::Value;

use super::{free_addr, Proc};

/// The simulated Charter on a loopback port, served by its own runtime.
pub struct Charter {
    pub sim: Simulator,
    pub addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

/// The simulated Charter with the components of `topology`, on `clock`.
pub fn charter_on(topology: Topology, clock: SharedClock) -> Charter {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let sim = Simulator::with_topology(topology, clock);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let s = sim.clone();
    rt.spawn(async move { mapek::sim::serve(listener, s, None, std::future::pending()).await });
    Charter { sim, addr, _rt: rt }
}

/// Polls `f` every 200 ms until it returns `Some` (the daemons run in other
/// processes: their state can only be observed), panicking after `limit`.
pub fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// GET `url` as JSON (`None` on any failure).
pub fn get(url: &str) -> Option<Value> {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .ok()?
        .get(url)
        .send()
        .ok()?
        .json()
        .ok()
}

/// The `mapek` binary running on a temporary config and data directory.
pub struct Mapek {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub _dir: tempfile::TempDir,
}

/// Starts `mapek run` on `config` (YAML), once it serves.
pub fn mapek(config: &str) -> Mapek {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mapek.yaml");
    std::fs::write(&path, config).expect("config");
    let addr = free_addr();
    let data = dir.path().join("data");
    let (p, d, a) = (
        path.display().to_string(),
        data.display().to_string(),
        addr.to_string(),
    );
    let mut proc = Proc::start(
        &["run", "--config", &p, "--data-dir", &d, "--listen", &a],
        &[("LOG_LEVEL", "info")],
        dir.path(),
    );
    proc.wait_for("serving", Duration::from_secs(30));
    Mapek {
        proc,
        addr,
        _dir: dir,
    }
}

impl Mapek {
    /// URL of `path` on this daemon.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}
