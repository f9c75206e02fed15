//! Analyze phase: the incremental incident index ([`incident`]), the
//! reference detectors over a whole window ([`detectors`], re-exported here)
//! and the `Analyzer` actor ([`actor`]).

pub mod actor;
pub mod detectors;
pub mod incident;

pub use detectors::*;
