//! Monitor phase: the active-violation set ([`active`], plain logic) and
//! the `Monitor` actor ([`actor`]) that polls the sources, takes webhook
//! batches and hands the changes to the Analyzer.

pub mod active;
pub mod actor;

pub use active::*;
pub use actor::*;
