//! Plan phase: strategies, scoring and approval ([`mod@strategy`], re-exported
//! here), the admission queue ([`admission`]) and the `Planner` actor
//! ([`actor`]), which reconciles one incident at a time.

pub mod actor;
pub mod admission;
pub mod strategy;

pub use strategy::*;
