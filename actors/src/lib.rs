//! `mapek-actors`: the MAPE-K loop itself.
//!
//! One folder per phase — [`monitor`], [`analyze`], [`plan`], [`execute`],
//! [`knowledge`] — each holding its plain logic (functions and structs that
//! tests drive without a runtime) and, in `actor.rs`, its actix actor
//! ([`monitor::Monitor`], [`analyzer::Analyzer`], [`planner::Planner`],
//! [`executor::Executor`], [`knowledge_actor::Knowledge`]).
//! [`supervisor`] starts, wires and restarts them.
//! The crate knows nothing of HTTP: it reaches the world through the traits
//! in [`ports`].

pub mod analyze;
pub mod clock;
pub mod events;
pub mod execute;
pub mod knowledge;
pub mod leadership;
pub mod mailbox;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod plan;
pub mod ports;
pub mod settings;
pub mod state;
pub mod supervisor;
pub mod testing;

// The phase modules' parts under their earlier, flat names.
pub use analyze::actor as analyzer;
pub use analyze::incident;
pub use execute::actor as executor;
pub use knowledge::actor as knowledge_actor;
pub use knowledge::{integrity, journal, store};
pub use plan::actor as planner;
pub use plan::admission;
pub use plan::{learn, safety};
