//! `mapek-actors`: the MAPE-K loop itself.
//!
//! Each phase lives in its own module as plain logic (functions and structs
//! that tests drive without a runtime) under a thin actix actor shell. The
//! crate knows nothing of HTTP: it reaches the world through the traits in
//! [`ports`].

pub mod analyze;
pub mod clock;
pub mod knowledge;
pub mod model;
pub mod plan;
pub mod settings;
pub mod store;
