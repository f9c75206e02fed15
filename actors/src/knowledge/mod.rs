//! Knowledge phase: outcome classes, statistics and insights ([`learning`],
//! re-exported here), the store ([`store`]) on its journal ([`journal`]),
//! and the `Knowledge` actor ([`actor`]).

pub mod actor;
pub mod integrity;
pub mod journal;
pub mod learning;
pub mod store;

pub use learning::*;
