//! Execute phase: running a policy ([`run`], re-exported here: dependency
//! order, retries, rollback, verification, effector routes) and the
//! `Executor` actor ([`actor`]).

pub mod actor;
pub mod run;

pub use run::*;
