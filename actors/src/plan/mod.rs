//! Plan phase: strategies, scoring and approval ([`mod@strategy`], re-exported
//! here), learning that chooses among candidate remedies ([`learn`]), the
//! safety guards ([`safety`]), the admission queue ([`admission`]) and the
//! `Planner` actor ([`actor`]), which reconciles one incident at a time.

pub mod actor;
pub mod admission;
pub mod learn;
pub mod safety;
pub mod strategy;

pub use strategy::*;
