//! `mapek`: the self-healing MAPE-K controller daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc, configured to give freed memory back: a background thread
/// purges dirty pages after 1 s and muzzy pages at once, so the resident
/// size falls after a burst of alerts resolves (glibc's allocator kept
/// ~170 MB resident after 100 000 alerts had come and gone; see
/// benches/README.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options (read by jemalloc itself).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";
use mapek::config::{Config, ConfigError, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "mapek",
    version,
    about = "Self-healing MAPE-K controller: Monitor, Analyze, Plan, Execute over Knowledge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM/SIGINT.
    Run {
        /// Config file (YAML); embedded defaults when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address of the HTTP API (overrides api.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Knowledge data directory (overrides knowledge.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Log format (overrides logging.format).
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
        /// Start on a damaged knowledge store: salvage every readable
        /// record, list each dropped one (log and repair-<time>.txt in the
        /// data directory) and move the damaged files aside.
        #[arg(long)]
        repair: bool,
    },
    /// Validate a config file: exit 0 when valid, 2 with every error listed.
    CheckConfig {
        /// Config file (YAML).
        path: PathBuf,
    },
    /// Run the whole loop against an in-process simulated Charter, inject a
    /// schedule of faults and narrate every step (no outside service).
    Demo {
        /// How long to run, seconds.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Print a closing report (`json`: one JSON object on stdout; the
        /// narration then goes to stderr).
        #[arg(long, value_enum)]
        report: Option<ReportFormat>,
        /// `default` (faults healed concurrently), `learning` (a memory leak
        /// whose default remedy is wrong: the choice shifts, the regret
        /// falls) or `guards` (budget, breaker and flapping at work).
        #[arg(long, value_enum, default_value = "default")]
        scenario: Scenario,
    },
    /// Serve the simulated Charter (API, /metrics, /sim/faults) on its own.
    Sim {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Require this X-API-Key on the Charter API.
        #[arg(long, env = "CHARTER_API_KEY")]
        api_key: Option<String>,
        /// Components to simulate, comma-separated; the first is the one
        /// requests without a `component` address.
        #[arg(long, default_value = "charter", value_name = "NAME,...")]
        components: String,
        /// A dependency, `DEPENDENT=UPSTREAM[,UPSTREAM...]` (repeatable): a
        /// cascade at an upstream spreads to its dependents.
        #[arg(long = "depends-on", value_name = "DEPENDENT=UPSTREAMS")]
        depends_on: Vec<String>,
    },
    /// Operate a running daemon over its HTTP API (see docs/CLI.md).
    Ctl(mapek::ctl::CtlArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Default,
    Learning,
    Guards,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Json,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ConfigError> {
    Config::load_with_env(path, &|k| std::env::var(k).ok())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Ctl(args) => mapek::ctl::run(args),
        Command::CheckConfig { path } => match load(Some(&path)) {
            Ok(_) => {
                println!("{}: valid", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Demo {
            duration,
            report,
            scenario,
        } if scenario != Scenario::Default => {
            mapek::telemetry::init("warn", LogFormat::Text);
            let json = matches!(report, Some(ReportFormat::Json));
            let name = match scenario {
                Scenario::Learning => "learning",
                _ => "guards",
            };
            // A scenario runs until it has shown what it shows (at most
            // `duration`, at least 60 s).
            let limit = std::time::Duration::from_secs(duration.max(60));
            match mapek::scenarios::run(name, limit, json) {
                Ok(r) => {
                    if json {
                        match serde_json::to_string(&r) {
                            Ok(s) => println!("{s}"),
                            Err(e) => eprintln!("mapek demo: report: {e}"),
                        }
                    } else if name == "learning" {
                        let last = r.episodes.last();
                        println!(
                            "\nepisodes {}, leaks healed {}, regret {} (always the seeds' remedy: {})",
                            r.episodes.len(),
                            r.leaks_healed,
                            last.map(|e| e.regret).unwrap_or(0.0),
                            last.map(|e| e.default_regret).unwrap_or(0.0)
                        );
                    } else {
                        println!(
                            "\nguard decisions {:?}, breakers opened {:?}, flapping {:?}, escalations {}, restarts {}",
                            r.guard_decisions,
                            r.breakers_opened,
                            r.flapping,
                            r.escalations.len(),
                            r.restarts
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mapek demo: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo {
            duration, report, ..
        } => {
            mapek::telemetry::init("warn", LogFormat::Text);
            let json = matches!(report, Some(ReportFormat::Json));
            let opts = mapek::demo::DemoOptions {
                duration: std::time::Duration::from_secs(duration.max(10)),
                json,
            };
            match mapek::demo::run(opts) {
                Ok(r) => {
                    if json {
                        match serde_json::to_string(&r) {
                            Ok(s) => println!("{s}"),
                            Err(e) => eprintln!("mapek demo: report: {e}"),
                        }
                    } else {
                        println!(
                            "\nfaults injected {}, healed {}, policies executed {}, outcomes {:?}, mean time to recover {}",
                            r.faults_injected,
                            r.faults_recovered,
                            r.policies_executed,
                            r.outcomes,
                            r.mean_time_to_recover_seconds.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "n/a".into())
                        );
                    }
                    if r.faults_recovered == r.faults_injected && r.faults_injected > 0 {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("mapek demo: not every injected fault healed");
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("mapek demo: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Sim {
            listen,
            api_key,
            components,
            depends_on,
        } => {
            let topology = match mapek::sim::Topology::parse(&components, &depends_on) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("mapek sim: {e}");
                    return ExitCode::from(2);
                }
            };
            mapek::telemetry::init("info", LogFormat::Text);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("mapek sim: {e}");
                    return ExitCode::from(1);
                }
            };
            let res: Result<(), String> = rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
                eprintln!(
                    "mapek sim: simulated Charter on http://{listen}, components {} (POST /sim/faults, GET /sim/state, /metrics)",
                    topology.components().join(", ")
                );
                let shutdown = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                let sim = mapek::sim::Simulator::with_topology(topology, std::sync::Arc::new(mapek_actors::clock::SystemClock));
                mapek::sim::serve(listener, sim, api_key, shutdown).await.map_err(|e| e.to_string())
            });
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mapek sim: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run {
            config,
            listen,
            data_dir,
            log_format,
            repair,
        } => {
            let mut cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(d) = data_dir {
                cfg.knowledge.data_dir = d.display().to_string();
            }
            cfg.knowledge.repair = repair;
            if let Some(f) = log_format {
                cfg.logging.format = match f {
                    LogFormatArg::Text => LogFormat::Text,
                    LogFormatArg::Json => LogFormat::Json,
                };
            }
            let listen = match listen.map(Ok).unwrap_or_else(|| cfg.api.listen.parse()) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("api.listen: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(why) = cfg.api.exposure(listen) {
                eprintln!("api.listen: {why}");
                return ExitCode::from(2);
            }
            mapek::telemetry::init(&cfg.logging.level, cfg.logging.format);
            match mapek::daemon::run(cfg, listen) {
                Ok(0) => ExitCode::SUCCESS,
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                Err(e) => {
                    eprintln!("mapek: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
