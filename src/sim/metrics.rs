//! The simulator's `/metrics`: the `westworld_charter_*` families, one
//! series per component (label `component`), written by prometheus-client.
//! The values are computed from the state on each read, so instead of
//! metrics kept between reads (which would only drift from the state) a
//! [`Collector`] encodes a snapshot taken under the lock, in component
//! order.

use mapek_actors::model::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::model::{Component, FaultKind, Reading};
use super::simulator::World;

/// Label set of a series: `component` first, then the metric's own labels.
type Labels = Vec<(&'static str, String)>;

/// Checks a bad policy is evaluated against; a bad policy breaks all of them.
const POLICY_CHECKS: [&str; 3] = ["quorum", "signature", "scope"];

/// A gauge family: name, help and the value of one component.
type GaugeSpec = (
    &'static str,
    &'static str,
    fn(&Component, &Reading, Timestamp) -> f64,
);

const GAUGES: [GaugeSpec; 14] = [
    (
        "westworld_charter_validation_latency_seconds",
        "Validation latency of policy checks, in seconds.",
        |_, r, _| r.validation_latency_seconds,
    ),
    (
        "westworld_charter_failure_rate",
        "Share of admitted operations that fail (0..1).",
        |_, r, _| r.failure_rate,
    ),
    (
        "westworld_charter_throughput_ops_per_sec",
        "Operations completed successfully per second.",
        |_, r, _| r.throughput_ops_per_sec,
    ),
    (
        "westworld_charter_replicas",
        "Committee replicas configured.",
        |c, _, _| f64::from(c.replicas),
    ),
    (
        "westworld_charter_healthy_nodes",
        "Committee nodes that are up.",
        |c, _, _| f64::from(c.healthy_nodes()),
    ),
    (
        "westworld_charter_load_ops_per_sec",
        "Offered load, in operations per second.",
        |_, r, _| r.load_ops_per_sec,
    ),
    (
        "westworld_charter_admitted_ops_per_sec",
        "Load admitted past the throttle, in operations per second.",
        |_, r, _| r.admitted_ops_per_sec,
    ),
    (
        "westworld_charter_capacity_ops_per_sec",
        "Capacity of the healthy nodes, in operations per second.",
        |_, r, _| r.capacity_ops_per_sec,
    ),
    (
        "westworld_charter_throttle_rate_limit",
        "Rate limit of the throttle in operations per second (0 = none).",
        |c, _, _| c.throttle.unwrap_or(0.0),
    ),
    (
        "westworld_charter_emergency_override_active",
        "1 while an emergency override is active.",
        |c, _, now| if c.override_active(now) { 1.0 } else { 0.0 },
    ),
    (
        "westworld_charter_validation_bypass_active",
        "1 while validation is bypassed.",
        |c, _, now| if c.bypass_active(now) { 1.0 } else { 0.0 },
    ),
    (
        "westworld_charter_up",
        "1 while the Charter answers.",
        |_, _, _| 1.0,
    ),
    (
        "westworld_charter_memory_bytes",
        "Memory of one committee node, in bytes.",
        |_, r, _| r.memory_bytes,
    ),
    (
        "westworld_charter_unhealthy_nodes",
        "Committee replicas that are not healthy.",
        |c, _, _| f64::from(c.replicas.saturating_sub(c.healthy_nodes())),
    ),
];

/// The series of one family.
#[derive(Debug)]
enum Series {
    Gauge(Vec<(Labels, f64)>),
    Counter(Vec<(Labels, u64)>),
}

/// One metric family: name (a counter's without `_total`, which the
/// encoder appends to its samples), help, series.
#[derive(Debug)]
struct FamilySnapshot {
    name: &'static str,
    help: &'static str,
    series: Series,
}

/// Every family, as read under the lock.
#[derive(Debug)]
struct Snapshot(Vec<FamilySnapshot>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.series {
                Series::Gauge(_) => MetricType::Gauge,
                Series::Counter(_) => MetricType::Counter,
            };
            let mut family = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            match &f.series {
                Series::Gauge(series) => {
                    for (labels, value) in series {
                        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
                    }
                }
                Series::Counter(series) => {
                    for (labels, value) in series {
                        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn labels(component: &str, extra: &[(&'static str, &str)]) -> Labels {
    let mut l = vec![("component", component.to_string())];
    l.extend(extra.iter().map(|(k, v)| (*k, (*v).to_string())));
    l
}

fn snapshot(w: &World, now: Timestamp) -> Snapshot {
    let readings: Vec<Reading> = (0..w.components.len()).map(|i| w.reading(i, now)).collect();
    let mut families: Vec<FamilySnapshot> = GAUGES
        .iter()
        .map(|(name, help, value)| FamilySnapshot {
            name,
            help,
            series: Series::Gauge(
                w.components
                    .iter()
                    .zip(&readings)
                    .map(|(c, r)| (labels(&c.name, &[]), value(c, r, now)))
                    .collect(),
            ),
        })
        .collect();

    let mut violations = Vec::new();
    for c in &w.components {
        // A bad policy breaks every check it is evaluated against: one
        // series per check, all counting together.
        for check in POLICY_CHECKS {
            violations.push((
                labels(&c.name, &[("severity", "critical"), ("check", check)]),
                c.critical_violations,
            ));
        }
        violations.push((
            labels(&c.name, &[("severity", "warning")]),
            c.warning_violations,
        ));
    }
    families.push(FamilySnapshot {
        name: "westworld_charter_policy_violations",
        help: "Policy violations detected, by severity.",
        series: Series::Counter(violations),
    });

    let mut faults = Vec::new();
    for c in &w.components {
        let active = c.faults();
        for kind in FaultKind::ALL {
            faults.push((
                labels(&c.name, &[("kind", kind.as_str())]),
                if active.contains(&kind) { 1.0 } else { 0.0 },
            ));
        }
    }
    families.push(FamilySnapshot {
        name: "westworld_charter_fault_active",
        help: "1 while the simulated fault is active.",
        series: Series::Gauge(faults),
    });
    Snapshot(families)
}

/// The exposition of every component of `w` at `now` (OpenMetrics text,
/// ending in `# EOF`).
pub(crate) fn encode(w: &World, now: Timestamp) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot(w, now)));
    let mut out = String::with_capacity(8192);
    // Writing into a String cannot fail; an error would only come from a
    // broken encoder, and the partial text is still the best answer.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "encoding the simulator's metrics");
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::scrape::parse_exposition;
    use crate::sim::test_support::*;
    use crate::sim::{FaultKind, Topology};
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn metrics_text_is_valid_exposition() {
        let sim = sim();
        let text = sim.metrics_text();
        let samples = parse_exposition(&text).unwrap();
        let have: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        for name in [
            "westworld_charter_validation_latency_seconds",
            "westworld_charter_failure_rate",
            "westworld_charter_throughput_ops_per_sec",
            "westworld_charter_policy_violations_total",
            "westworld_charter_replicas",
            "westworld_charter_healthy_nodes",
            "westworld_charter_load_ops_per_sec",
            "westworld_charter_throttle_rate_limit",
            "westworld_charter_emergency_override_active",
            "westworld_charter_up",
        ] {
            assert!(have.contains(name), "{name} missing");
            // OpenMetrics names a counter's family without `_total`.
            let family = name.trim_end_matches("_total");
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{name} TYPE missing"
            );
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{name} HELP missing"
            );
        }
        assert!(text.contains("# TYPE westworld_charter_policy_violations counter"));
        assert!(text.contains("# TYPE westworld_charter_failure_rate gauge"));
        assert!(text.trim_end().ends_with("# EOF"));
        assert!(
            text.contains("# HELP westworld_charter_replicas Committee replicas configured.\n"),
            "one period at the end of a help text"
        );
        let sev: BTreeSet<&str> = samples
            .iter()
            .filter(|s| s.name == "westworld_charter_policy_violations_total")
            .filter_map(|s| s.labels.get("severity").map(String::as_str))
            .collect();
        assert_eq!(sev, BTreeSet::from(["critical", "warning"]));
        assert!(samples.iter().all(|s| s.value.is_finite()));
        assert!(
            samples
                .iter()
                .all(|s| s.labels.get("component").map(String::as_str) == Some("charter")),
            "every series carries component=\"charter\""
        );
        let critical: Vec<_> = samples
            .iter()
            .filter(|s| s.labels.get("severity").map(String::as_str) == Some("critical"))
            .map(|s| s.labels.get("check").cloned())
            .collect();
        assert_eq!(
            critical,
            ["quorum", "signature", "scope"].map(|c| Some(c.to_string()))
        );
    }

    #[test]
    fn every_component_has_its_own_series() {
        let (sim, _) = sim_of(Topology::new(&["charter", "gateway"]).unwrap());
        sim.inject_at("gateway", FaultKind::BadPolicy).unwrap();
        sim.metrics_text();
        let text = sim.metrics_text();
        let samples = parse_exposition(&text).unwrap();
        let by_name = |name: &str| -> BTreeMap<String, f64> {
            samples
                .iter()
                .filter(|s| s.name == name)
                .map(|s| (s.labels["component"].clone(), s.value))
                .collect()
        };
        assert_eq!(
            by_name("westworld_charter_up"),
            BTreeMap::from([("charter".into(), 1.0), ("gateway".into(), 1.0)])
        );
        let failure = by_name("westworld_charter_failure_rate");
        assert!(
            failure["charter"] < 0.05 && failure["gateway"] > 0.10,
            "{failure:?}"
        );
        // Two reads: the gateway's critical counter grew twice, charter's not.
        assert_eq!(critical_count_of(&text, "gateway"), 2.0);
        assert_eq!(critical_count_of(&text, "charter"), 0.0);
        let kinds: Vec<_> = samples
            .iter()
            .filter(|s| s.name == "westworld_charter_fault_active" && s.value == 1.0)
            .map(|s| (s.labels["component"].as_str(), s.labels["kind"].as_str()))
            .collect();
        assert_eq!(kinds, [("gateway", "bad_policy")]);
    }
}
