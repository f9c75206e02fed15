//! `mapek`: the self-healing MAPE-K controller daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    },
    /// Validate a config file: exit 0 when valid, 2 with every error listed.
    CheckConfig {
        /// Config file (YAML).
        path: PathBuf,
    },
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
        Command::Run {
            config,
            listen,
            data_dir,
            log_format,
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
