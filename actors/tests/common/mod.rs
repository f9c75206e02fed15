//! Helpers shared by the loop's integration tests.
#![allow(dead_code)]

use actix::prelude::*;
use chrono::Utc;
use mapek_actors::model::{Severity, Signal, Violation};

/// An actix system on a paused tokio clock (virtual time advances when
/// every task waits).
pub fn paused_system() -> SystemRunner {
    System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
    })
}

/// A critical violation `fp` on `component`, begun `onset_offset`
/// seconds from now.
pub fn v(fp: &str, component: &str, signal: Signal, onset_offset: i64) -> Violation {
    let now = Utc::now() + chrono::Duration::seconds(onset_offset);
    Violation {
        id: format!("v-{fp}"),
        fingerprint: fp.into(),
        rule: format!("rule-{fp}"),
        severity: Severity::Critical,
        component: component.into(),
        metric: format!("metric_{fp}"),
        value: 2.0,
        labels: Default::default(),
        signal,
        first_seen: now,
        observed_at: now,
        source: "scripted".into(),
    }
}
