//! `mapek`: the daemon around the MAPE-K loop of `mapek-actors` — config,
//! HTTP API and Alertmanager webhook, Prometheus sensor, effectors, logging.

pub mod alertmanager;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod demo;
pub mod effectors;
pub mod http;
pub mod readiness;
pub mod retry;
pub mod scenarios;
pub mod scrape;
pub mod sensors;
pub mod sim;
pub mod telemetry;
