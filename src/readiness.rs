//! What `/ready` and `/metrics` say beyond the actors: which evidence path
//! can deliver (`can_act`, the `mape_k_can_act` gauge) and whether each
//! effector in use can be reached (`effectors`, the
//! `mape_k_effector_reachable` gauge).
//!
//! Effectors are probed in the background every [`PROBE_INTERVAL`] (each
//! probe bounded by [`PROBE_TIMEOUT`]) and the results cached: `/ready`
//! and `/metrics` read the cache and never wait on the network. An
//! unreachable effector is shown, never fatal: evidence still flows and
//! remedies still get planned, escalated or retried.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mapek_actors::clock::SharedClock;
use mapek_actors::metrics::{Metrics, SourceLabels};
use mapek_actors::model::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde::Serialize;

use crate::config::{Config, EffectorKind};

/// Time between two probes of the effectors.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Longest wait for one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Name of the webhook in `can_act` and `mape_k_can_act`.
pub const WEBHOOK: &str = "webhook";

/// The reachability of one effector, as `/ready` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectorReach {
    /// Effector: `charter`, `command` or `webhook`.
    pub name: String,
    /// What is probed: the Charter's `/health` URL, the webhook's URL
    /// (both without credentials) or the command's program.
    pub target: String,
    /// Whether the last probe succeeded; `null` before the first one.
    pub reachable: Option<bool>,
    /// Why the last probe failed.
    pub last_error: Option<String>,
    /// When the last probe ended.
    pub checked_at: Option<Timestamp>,
}

/// How an effector is probed.
#[derive(Debug, Clone)]
enum Probe {
    /// `GET` the URL (with the API key): reachable on a 2xx answer.
    Http { url: String, api_key: String },
    /// A TCP connection to the URL's host and port (no request is sent,
    /// so nothing is triggered): reachable when it opens.
    Tcp { url: String },
    /// The program exists and is executable (searched in `PATH` when
    /// its name has no `/`).
    Program { program: String },
}

/// The daemon's readiness beyond the actors, shared by `/ready`, the
/// `/metrics` collector and the probe task.
pub struct Readiness {
    webhook: bool,
    probes: Vec<Probe>,
    effectors: Mutex<Vec<EffectorReach>>,
    client: reqwest::Client,
    clock: SharedClock,
}

/// A URL without user name and password, for display.
fn display_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

impl Readiness {
    /// The effectors `cfg` uses (by `effectors.default`, `routes` or
    /// `component_routes`), not yet probed.
    pub fn from_config(cfg: &Config, clock: SharedClock) -> Result<Self, String> {
        let e = &cfg.effectors;
        let used =
            |k: EffectorKind| e.uses(k) || e.component_routes.iter().any(|r| r.effector == k);
        let mut probes = Vec::new();
        let mut effectors = Vec::new();
        let mut add = |kind: EffectorKind, probe: Probe, target: String| {
            probes.push(probe);
            effectors.push(EffectorReach {
                name: kind.as_str().to_string(),
                target,
                reachable: None,
                last_error: None,
                checked_at: None,
            });
        };
        if used(EffectorKind::Charter) {
            let url = format!("{}/health", cfg.charter.url.trim_end_matches('/'));
            add(
                EffectorKind::Charter,
                Probe::Http {
                    url: url.clone(),
                    api_key: cfg.charter.api_key.clone(),
                },
                display_url(&url),
            );
        }
        if used(EffectorKind::Webhook) {
            let url = e.webhook.url.clone();
            add(
                EffectorKind::Webhook,
                Probe::Tcp { url: url.clone() },
                display_url(&url),
            );
        }
        if used(EffectorKind::Command) {
            let program = e.command.program.clone();
            add(
                EffectorKind::Command,
                Probe::Program {
                    program: program.clone(),
                },
                program,
            );
        }
        let client = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .connect_timeout(PROBE_TIMEOUT)
            .build()
            .map_err(|e| format!("building the probe client: {e}"))?;
        Ok(Readiness {
            webhook: cfg.alertmanager.enabled,
            probes,
            effectors: Mutex::new(effectors),
            client,
            clock,
        })
    }

    /// Whether the Alertmanager webhook is served (an evidence path that
    /// needs no polling).
    pub fn webhook_enabled(&self) -> bool {
        self.webhook
    }

    /// The cached reachability of every effector in use.
    pub fn effectors(&self) -> Vec<EffectorReach> {
        self.effectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Probes every effector once (concurrently, each bounded by
    /// [`PROBE_TIMEOUT`]) and caches the results.
    pub async fn probe_once(&self) {
        let results = futures::future::join_all(self.probes.iter().map(|p| self.probe(p))).await;
        let now = self.clock.now();
        let mut effectors = self.effectors.lock().unwrap_or_else(|p| p.into_inner());
        for (e, result) in effectors.iter_mut().zip(results) {
            e.reachable = Some(result.is_ok());
            e.last_error = result.err();
            e.checked_at = Some(now);
        }
    }

    async fn probe(&self, probe: &Probe) -> Result<(), String> {
        match probe {
            Probe::Http { url, api_key } => {
                let mut req = self.client.get(url);
                if !api_key.is_empty() {
                    req = req.header("X-API-Key", api_key);
                }
                let resp = req.send().await.map_err(|e| {
                    if e.is_timeout() {
                        format!("no answer within {} s", PROBE_TIMEOUT.as_secs())
                    } else {
                        format!("unreachable: {e}")
                    }
                })?;
                let status = resp.status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}"))
                }
            }
            Probe::Tcp { url } => {
                let u = url::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
                let host = u.host_str().ok_or("the URL has no host")?.to_string();
                let host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let port = u.port_or_known_default().ok_or("the URL has no port")?;
                match tokio::time::timeout(
                    PROBE_TIMEOUT,
                    tokio::net::TcpStream::connect((host.as_str(), port)),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("cannot connect to {host}:{port}: {e}")),
                    Err(_) => Err(format!(
                        "no connection to {host}:{port} within {} s",
                        PROBE_TIMEOUT.as_secs()
                    )),
                }
            }
            Probe::Program { program } => find_program(program).map(|_| ()),
        }
    }

    /// Probes now and then every [`PROBE_INTERVAL`] while `alive()`.
    pub fn spawn(self: Arc<Self>, alive: impl Fn() -> bool + Send + 'static) {
        if self.probes.is_empty() {
            return;
        }
        tokio::spawn(async move {
            while alive() {
                self.probe_once().await;
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        });
    }

    /// The `/metrics` collector of `mape_k_can_act` and
    /// `mape_k_effector_reachable`; `sources` are the polled sources'
    /// names, whose `mape_k_source_up` it mirrors.
    pub fn collector(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        sources: Vec<String>,
    ) -> ReadinessCollector {
        ReadinessCollector {
            readiness: self,
            metrics,
            sources,
        }
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("webhook", &self.webhook)
            .field("probes", &self.probes)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ReadinessCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadinessCollector")
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

/// Finds an executable `program` (searched in `PATH` when it has no `/`).
fn find_program(program: &str) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.is_empty() {
        return Err("no program configured".into());
    }
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(format!("{program} is not an executable file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("{program} is not found in PATH"))
}

/// Encodes `mape_k_can_act{source}` and `mape_k_effector_reachable{effector}`
/// from the live state on each scrape.
pub struct ReadinessCollector {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    sources: Vec<String>,
}

impl ReadinessCollector {
    /// `(source, can act)`: each polled source gives evidence now
    /// (`mape_k_source_up` is 1, i.e. its status is `up`), and `webhook`
    /// while the webhook is served.
    pub fn can_act(&self) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = self
            .sources
            .iter()
            .map(|s| {
                let up = self
                    .metrics
                    .source_up
                    .get(&SourceLabels { source: s.clone() })
                    .is_some_and(|g| g.get() == 1);
                (s.clone(), up)
            })
            .collect();
        if self.readiness.webhook {
            out.push((WEBHOOK.to_string(), true));
        }
        out
    }
}

impl Collector for ReadinessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "mape_k_can_act",
            "Whether the evidence path can deliver now (1) or not (0): each polled source (as mape_k_source_up) and the webhook while it is on; all 0 means the loop is blind",
            None,
            MetricType::Gauge,
        )?;
        for (source, up) in self.can_act() {
            let labels = vec![("source", source)];
            ConstGauge::new(i64::from(up)).encode(family.encode_family(&labels)?)?;
        }
        let effectors = self.readiness.effectors();
        let mut family = encoder.encode_descriptor(
            "mape_k_effector_reachable",
            "Whether the effector answered its last probe (1) or not (0); absent before the first probe",
            None,
            MetricType::Gauge,
        )?;
        for e in effectors {
            if let Some(r) = e.reachable {
                let labels = vec![("effector", e.name)];
                ConstGauge::new(i64::from(r)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mapek_actors::clock::SystemClock;
    use prometheus_client::registry::Registry;

    fn cfg(yaml: &str) -> Config {
        Config::from_yaml_str(yaml, "t").expect("valid config")
    }

    fn names(r: &Readiness) -> Vec<String> {
        r.effectors().into_iter().map(|e| e.name).collect()
    }

    #[test]
    fn the_effectors_in_use_are_listed_unprobed() {
        let r = Readiness::from_config(&Config::default(), Arc::new(SystemClock)).unwrap();
        assert_eq!(names(&r), ["charter"]);
        let e = &r.effectors()[0];
        assert_eq!(e.target, "http://127.0.0.1:8080/health");
        assert_eq!((e.reachable, e.checked_at), (None, None));
        assert!(r.webhook_enabled());

        let r = Readiness::from_config(
            &cfg("effectors:\n  default: webhook\n  webhook:\n    url: http://user:secret@127.0.0.1:9/x\n  component_routes:\n    - components: [db]\n      effector: command\n  command:\n    program: sh\nalertmanager:\n  enabled: false\n"),
            Arc::new(SystemClock),
        )
        .unwrap();
        assert_eq!(names(&r), ["webhook", "command"]);
        assert!(
            !r.effectors()[0].target.contains("secret"),
            "{:?}",
            r.effectors()
        );
        assert!(!r.webhook_enabled());
    }

    #[tokio::test]
    async fn probes_tell_reachable_from_unreachable() {
        // A listening socket for the webhook, a port nobody listens on for
        // the Charter, a program that exists for the command.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let r = Readiness::from_config(
            &cfg(&format!(
                "charter:\n  url: http://{dead}\neffectors:\n  routes:\n    SCALE_UP: webhook\n    RESTART_SERVICE: command\n  webhook:\n    url: http://{open}/hook\n  command:\n    program: sh\n"
            )),
            Arc::new(SystemClock),
        )
        .unwrap();
        r.probe_once().await;
        let e = r.effectors();
        assert_eq!(names(&r), ["charter", "webhook", "command"]);
        assert_eq!(e[0].reachable, Some(false), "{e:?}");
        assert!(
            e[0].last_error
                .as_deref()
                .is_some_and(|m| m.contains("unreachable")),
            "{e:?}"
        );
        assert_eq!(e[1].reachable, Some(true), "{e:?}");
        assert_eq!(e[2].reachable, Some(true), "{e:?}");
        assert!(e.iter().all(|e| e.checked_at.is_some()));

        let missing = Readiness::from_config(
            &cfg("effectors:\n  default: command\n  command:\n    program: /nonexistent/mapek-probe\n"),
            Arc::new(SystemClock),
        )
        .unwrap();
        missing.probe_once().await;
        let e = &missing.effectors()[0];
        assert_eq!(e.reachable, Some(false));
        assert!(
            e.last_error
                .as_deref()
                .is_some_and(|m| m.contains("not an executable")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn the_charter_probe_asks_its_health() {
        let sim = crate::sim::Simulator::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::sim::serve(listener, sim, None, async move {
            let _ = rx.await;
        }));
        let r = Readiness::from_config(
            &cfg(&format!("charter:\n  url: http://{addr}\n")),
            Arc::new(SystemClock),
        )
        .unwrap();
        r.probe_once().await;
        assert_eq!(
            r.effectors()[0].reachable,
            Some(true),
            "{:?}",
            r.effectors()
        );
        assert_eq!(r.effectors()[0].last_error, None);
        let _ = tx.send(());
        task.await.unwrap().unwrap();
    }

    #[test]
    fn can_act_mirrors_source_up_and_counts_the_webhook() {
        let metrics = Arc::new(Metrics::new());
        let encode = |webhook: bool| {
            let c = if webhook {
                Config::default()
            } else {
                cfg("alertmanager:\n  enabled: false\n")
            };
            let r = Arc::new(Readiness::from_config(&c, Arc::new(SystemClock)).unwrap());
            let mut registry = Registry::default();
            registry.register_collector(Box::new(
                r.collector(metrics.clone(), vec!["prometheus".into()]),
            ));
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        };
        // Not polled yet: no evidence.
        let text = encode(false);
        assert!(
            text.contains("mape_k_can_act{source=\"prometheus\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("source=\"webhook\""), "{text}");
        assert!(
            text.contains("# TYPE mape_k_effector_reachable gauge"),
            "{text}"
        );
        assert!(
            !text.contains("mape_k_effector_reachable{"),
            "not probed yet: {text}"
        );
        metrics
            .source_up
            .get_or_create(&SourceLabels {
                source: "prometheus".into(),
            })
            .set(1);
        let text = encode(true);
        assert!(
            text.contains("mape_k_can_act{source=\"prometheus\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("mape_k_can_act{source=\"webhook\"} 1\n"),
            "{text}"
        );
    }
}
