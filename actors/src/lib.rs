//! `mapek-actors`: the MAPE-K loop itself.
//!
//! Each phase lives in its own module as plain logic (functions and structs
//! that tests drive without a runtime) — [`analyze`], [`plan`], [`execute`],
//! [`knowledge`] and the active-violation set of [`monitor`] — under a thin
//! actix actor shell ([`monitor::Monitor`], [`analyzer::Analyzer`],
//! [`planner::Planner`], [`executor::Executor`],
//! [`knowledge_actor::Knowledge`]). [`supervisor`] starts and restarts them.
//! The crate knows nothing of HTTP: it reaches the world through the traits
//! in [`ports`].

pub mod admission;
pub mod analyze;
pub mod analyzer;
pub mod clock;
pub mod events;
pub mod execute;
pub mod executor;
pub mod incident;
pub mod journal;
pub mod knowledge;
pub mod knowledge_actor;
pub mod mailbox;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod plan;
pub mod planner;
pub mod ports;
pub mod settings;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod testing;
