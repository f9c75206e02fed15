//! Wiring of the daemon: open the knowledge store, build sources and
//! effectors from the config, start the supervised loop and the HTTP server
//! in one actix system, and stop cleanly on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::System;
use mapek_actors::clock::{SharedClock, SystemClock};
use mapek_actors::execute::EffectorRouter;
use mapek_actors::journal::JournalOptions;
use mapek_actors::mailbox::FaultInjector;
use mapek_actors::messages::Shutdown;
use mapek_actors::metrics::Metrics;
use mapek_actors::ports::{EvidenceProbe, MetricSource};
use mapek_actors::store::{KnowledgeStore, StoreError};
use mapek_actors::supervisor::{start_loop, LoopHandle, LoopParts, LoopSettings};
use prometheus_client::registry::Registry;

use mapek_actors::leadership::{Leadership, Solo};

use crate::config::Config;
use crate::http::{self, ApiState};
use crate::sensors::PrometheusSource;

/// Opens the knowledge store named in the config, failing at once on a
/// lock and within `open_timeout_seconds` on a corrupt database; the store
/// is checked against its journal first (see
/// [`mapek_actors::integrity`]), and salvaged when
/// `knowledge.repair` (`mapek run --repair`) is set.
pub fn open_store(cfg: &Config) -> Result<KnowledgeStore, StoreError> {
    KnowledgeStore::open_with(
        Path::new(&cfg.knowledge.data_dir),
        Duration::from_secs(cfg.knowledge.open_timeout_seconds),
        JournalOptions {
            salvage: cfg.knowledge.repair,
            ..JournalOptions::default()
        },
    )
}

/// The phase settings of a config.
pub fn loop_settings(cfg: &Config) -> LoopSettings {
    LoopSettings {
        orchestrator: cfg.orchestrator.clone(),
        monitor: cfg.monitor.clone(),
        analyze: {
            let mut a = cfg.analyze.clone();
            a.topology = cfg.topology.clone();
            a
        },
        plan: cfg.plan.clone(),
        execute: cfg.execute.clone(),
        knowledge: cfg.knowledge.clone(),
        safety: cfg.safety.clone(),
    }
}

/// Sources configured in `cfg`.
pub fn build_sources(
    cfg: &Config,
    clock: &SharedClock,
) -> Result<Vec<Arc<dyn MetricSource>>, String> {
    let mut out: Vec<Arc<dyn MetricSource>> = Vec::new();
    if cfg.prometheus.enabled {
        out.push(Arc::new(PrometheusSource::new(
            &cfg.prometheus.url,
            Duration::from_secs(cfg.prometheus.timeout_seconds),
            cfg.prometheus.retries,
            clock.clone(),
        )?));
    }
    Ok(out)
}

/// Everything needed to start the loop, with the defaults of `cfg`;
/// callers may replace parts (the demo and tests do).
pub struct DaemonParts {
    /// Sources.
    pub sources: Vec<Arc<dyn MetricSource>>,
    /// Effectors.
    pub effectors: EffectorRouter,
    /// Verification probe (`None`: measure through the Monitor).
    pub probe: Option<Arc<dyn EvidenceProbe>>,
    /// Clock.
    pub clock: SharedClock,
    /// Fault injection for chaos tests; `None` in production.
    pub chaos: Option<Arc<dyn FaultInjector>>,
}

impl DaemonParts {
    /// Parts built from the config.
    pub fn from_config(cfg: &Config) -> Result<Self, String> {
        let clock: SharedClock = Arc::new(SystemClock);
        Ok(DaemonParts {
            sources: build_sources(cfg, &clock)?,
            effectors: crate::effectors::build_router(cfg)?,
            probe: None,
            clock,
            chaos: None,
        })
    }
}

/// A running daemon inside an actix system.
pub struct Running {
    /// The loop.
    pub handle: LoopHandle,
    /// Address the HTTP server listens on.
    pub addr: SocketAddr,
    /// Leadership: the etcd cluster in cluster mode, else [`Solo`].
    pub leadership: Arc<dyn Leadership>,
    /// The cluster replica, in cluster mode.
    #[cfg(feature = "cluster")]
    pub cluster: Option<crate::cluster::Cluster>,
}

/// Joins the cluster when `cfg` has a `cluster` section (registering its
/// metrics), else a single process that leads.
#[cfg(feature = "cluster")]
async fn leadership(
    cfg: &Config,
    addr: SocketAddr,
    registry: &mut Registry,
) -> Result<(Arc<dyn Leadership>, Option<crate::cluster::Cluster>), String> {
    match &cfg.cluster {
        Some(c) => {
            let cluster = crate::cluster::Cluster::start(c, addr)
                .await
                .map_err(|e| e.to_string())?;
            cluster.register(registry);
            Ok((Arc::new(cluster.clone()), Some(cluster)))
        }
        None => Ok((Arc::new(solo()), None)),
    }
}

/// A single process that leads, named after the host.
fn solo() -> Solo {
    Solo::new(crate::config::host_name().unwrap_or_else(|| "mapek".into()))
}

/// Starts the loop and the HTTP server. Must run inside an actix system.
pub async fn start(
    cfg: &Config,
    store: KnowledgeStore,
    parts: DaemonParts,
    listen: SocketAddr,
) -> Result<Running, String> {
    let metrics = Arc::new(Metrics::new());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    Metrics::register_journal(&mut registry, &store.journal_counters());
    let http_metrics = Arc::new(http::HttpMetrics::new());
    http_metrics.register(&mut registry);
    let listener = http::bind(listen).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("listen address: {e}"))?;
    let sources_required = !parts.sources.is_empty() && !cfg.alertmanager.enabled;
    let readiness = Arc::new(crate::readiness::Readiness::from_config(
        cfg,
        parts.clock.clone(),
    )?);
    registry.register_collector(Box::new(readiness.clone().collector(
        metrics.clone(),
        parts.sources.iter().map(|s| s.name().to_string()).collect(),
    )));
    #[cfg(feature = "cluster")]
    let (leadership, cluster) = leadership(cfg, addr, &mut registry).await?;
    #[cfg(not(feature = "cluster"))]
    let leadership: Arc<dyn Leadership> = match &cfg.cluster {
        // Config validation refuses this already; stay clear if bypassed.
        Some(_) => return Err(crate::config::NO_CLUSTER_SUPPORT.to_string()),
        None => Arc::new(solo()),
    };
    let clock_for_sink = parts.clock.clone();
    // In cluster mode polled violations carry the onset the replicas
    // agreed in etcd, so incident ids (and idempotency keys) match.
    #[cfg(feature = "cluster")]
    let sources: Vec<Arc<dyn MetricSource>> = match &cluster {
        Some(c) => {
            // Knowledge: what this replica learns is published while it
            // leads; what the others publish is applied here.
            crate::cluster::replication::start(c, &store);
            let book = crate::cluster::onsets::OnsetBook::new(c.clone());
            parts
                .sources
                .into_iter()
                .map(|s| {
                    Arc::new(crate::cluster::onsets::AgreedOnsets::new(s, book.clone()))
                        as Arc<dyn MetricSource>
                })
                .collect()
        }
        None => parts.sources,
    };
    #[cfg(not(feature = "cluster"))]
    let sources = parts.sources;
    let handle = start_loop(LoopParts {
        settings: loop_settings(cfg),
        sources,
        effectors: parts.effectors,
        probe: parts.probe,
        store,
        clock: parts.clock,
        metrics,
        chaos: parts.chaos,
        events: None,
        alert_state: if cfg.alertmanager.enabled && cfg.alertmanager.verify_with_api {
            let api = crate::alertmanager::AlertmanagerApi::new(
                &cfg.alertmanager.url,
                Duration::from_secs(10),
            )?;
            Some(Arc::new(api))
        } else {
            None
        },
        escalations: if cfg.alertmanager.enabled && cfg.alertmanager.post_escalations {
            let sink = crate::alertmanager::AlertmanagerEscalations::from_settings(
                &cfg.alertmanager,
                clock_for_sink.clone(),
            )?
            .with_generator_url(format!("http://{addr}/api/v1/incidents"));
            Some(Arc::new(sink))
        } else {
            None
        },
        // A single process leads everything: no fence to take.
        leadership: cfg.cluster.as_ref().map(|_| leadership.clone()),
    });
    let state = ApiState {
        tokens: cfg.api.credentials(),
        handle: handle.clone(),
        registry: Arc::new(registry),
        sources_required,
        request_timeout: Duration::from_secs(cfg.api.request_timeout_seconds),
        http_metrics: http_metrics.clone(),
        readiness: readiness.clone(),
        leadership: leadership.clone(),
    };
    let router = http::router(
        state,
        cfg.alertmanager
            .enabled
            .then_some(cfg.alertmanager.webhook_path.as_str()),
        cfg.alertmanager.max_body_bytes,
    );
    let sup = handle.supervisor.clone();
    let cfg_max_connections = cfg.api.max_connections;
    let request_timeout = Duration::from_secs(cfg.api.request_timeout_seconds);
    readiness.spawn(move || sup.connected());
    let sup = handle.supervisor.clone();
    tokio::spawn(async move {
        let stopped = async move {
            // The server stops when the supervisor (and so the system) does.
            while sup.connected() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let options = http::ServeOptions {
            max_connections: cfg_max_connections,
            overdue_after: request_timeout * 2,
            metrics: http_metrics,
        };
        if let Err(e) = http::serve(listener, router, options, stopped).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    tracing::info!(%addr, "serving /health, /ready, /metrics, the webhook and the API");
    Ok(Running {
        handle,
        addr,
        leadership,
        #[cfg(feature = "cluster")]
        cluster,
    })
}

/// Waits for SIGTERM or SIGINT, then asks the supervisor to shut down.
pub async fn shutdown_on_signal(handle: LoopHandle) {
    shutdown_on_signal_then(handle, async {}).await
}

/// Waits for SIGTERM or SIGINT, runs `first` (leaving the cluster), then
/// asks the supervisor to shut down.
pub async fn shutdown_on_signal_then(
    handle: LoopHandle,
    first: impl std::future::Future<Output = ()>,
) {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received"),
        r = tokio::signal::ctrl_c() => {
            if r.is_ok() { tracing::info!("SIGINT received") }
        }
    }
    first.await;
    if handle.supervisor.send(Shutdown).await.is_err() {
        System::current().stop_with_code(0);
    }
}

/// Builds the actix system the daemon runs in: actors on the system
/// thread, HTTP and clients on two tokio workers.
pub fn new_system() -> actix::SystemRunner {
    System::with_tokio_rt(|| {
        match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("mapek: cannot start the tokio runtime: {e}");
                std::process::exit(1)
            }
        }
    })
}

/// `mapek run`: runs until a signal (exit code 0) or an escalation by the
/// supervisor (non-zero, with the reason on stderr).
pub fn run(cfg: Config, listen: SocketAddr) -> anyhow::Result<i32> {
    if let Some(n) = http::raise_fd_limit() {
        tracing::info!(open_files = n, "open-files limit");
    }
    let store = open_store(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(dir = %cfg.knowledge.data_dir, "knowledge store open");
    let parts = DaemonParts::from_config(&cfg).map_err(|e| anyhow::anyhow!(e))?;
    let system = new_system();
    let running = system.block_on(async {
        let running = start(&cfg, store, parts, listen).await?;
        if cfg.prometheus.enabled {
            tracing::info!(url = %cfg.prometheus.url, rules = cfg.monitor.rules.len(), interval_seconds = cfg.monitor.interval_seconds, "polling Prometheus");
        }
        #[cfg(feature = "cluster")]
        {
            let handle = running.handle.clone();
            let cluster = running.cluster.clone();
            actix::spawn(async move {
                shutdown_on_signal_then(handle, async move {
                    // Hand the shards over at once rather than at lease
                    // expiry.
                    if let Some(c) = cluster {
                        c.shutdown().await;
                    }
                })
                .await
            });
        }
        #[cfg(not(feature = "cluster"))]
        actix::spawn(shutdown_on_signal(running.handle.clone()));
        Ok::<Running, String>(running)
    });
    let running = running.map_err(|e| anyhow::anyhow!(e))?;
    let code = system.run_with_code()?;
    let store = running.handle.store.clone();
    if let Err(e) = store.flush() {
        if !matches!(e, StoreError::Closed { .. }) {
            eprintln!("mapek: final flush of the knowledge store failed: {e}");
        }
    }
    if let Some(reason) = running.handle.exit.get() {
        eprintln!("mapek: stopped by the supervisor: {reason}");
    }
    Ok(code)
}
