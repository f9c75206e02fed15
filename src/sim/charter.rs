//! The Charter REST API's semantics on one component: every endpoint of the
//! specification, its parameters and errors, and the remedy each call
//! carries. No HTTP here (see `api`): a call is a method, a path and a JSON
//! body.

use mapek_actors::model::Timestamp;
use serde_json::{json, Map, Value};

use super::model::{FaultKind, Remedy, BASE_REPLICAS, MAX_REPLICAS};
use super::simulator::{take_policy_id, World};
use super::SimError;

fn body_object<'a>(body: &'a Value, what: &str) -> Result<&'a Map<String, Value>, SimError> {
    body.as_object()
        .ok_or_else(|| SimError::BadRequest(format!("{what}: the body must be a JSON object")))
}

fn duration_param(body: &Value, what: &str) -> Result<u64, SimError> {
    let obj = body_object(body, what)?;
    match obj.get("duration_seconds") {
        Some(v) => v.as_u64().ok_or_else(|| {
            SimError::BadRequest(format!(
                "{what}: duration_seconds must be a non-negative integer (got {v})"
            ))
        }),
        None => Err(SimError::BadRequest(format!(
            "{what}: duration_seconds is required"
        ))),
    }
}

fn until(now: Timestamp, seconds: u64) -> Option<Timestamp> {
    if seconds == 0 {
        return None;
    }
    let secs = i64::try_from(seconds)
        .unwrap_or(i64::MAX)
        .min(10 * 365 * 86_400);
    Some(now + chrono::Duration::seconds(secs))
}

/// Every endpoint of the Charter API, with the methods it accepts.
const ENDPOINTS: &[(&str, &[&str])] = &[
    ("/api/v1/policies", &["GET"]),
    ("/api/v1/policies/apply", &["POST"]),
    ("/api/v1/policies/validate", &["POST"]),
    ("/api/v1/committee/state", &["GET"]),
    ("/api/v1/committee/scale", &["POST"]),
    ("/api/v1/committee/restart", &["POST"]),
    ("/api/v1/violations", &["GET"]),
    ("/api/v1/throttle", &["POST"]),
    ("/api/v1/emergency-override", &["POST"]),
    ("/api/v1/rebalance", &["POST"]),
    ("/api/v1/config", &["POST"]),
    ("/api/v1/validation/bypass", &["POST"]),
    ("/api/v1/failover", &["POST"]),
];

/// Handles one Charter API call on component `c` of `w` (`body` without its
/// `component`): the answer, or why it was refused. A state-changing call
/// answers `healed`, the faults of `c` it healed.
pub(crate) fn dispatch(
    w: &mut World,
    c: usize,
    method: &str,
    path: &str,
    body: &Value,
    now: Timestamp,
) -> Result<Value, SimError> {
    let segs: Vec<&str> = path.split('/').filter(|x| !x.is_empty()).collect();
    let storms = w.storms(c, now);
    let reached = w.storm_targets(c, now);
    let status = w.status(c, now);
    let violations = w.violations(c, now);
    let (s, next_policy) = w.component_and_ids(c);
    let before = s.faults();
    let (answer, remedy, by) = match (method, segs.as_slice()) {
        ("GET", ["api", "v1", "policies"]) => {
            let active = s.active_policy.clone();
            (json!({"policies": s.policies, "active": active}), None, "")
        }
        ("POST", ["api", "v1", "policies", "apply"]) => {
            let obj = body_object(body, "policies/apply")?;
            let bad = obj.get("bad").and_then(Value::as_bool) == Some(true)
                || obj.get("policy").and_then(Value::as_str) == Some("bad");
            let name = obj
                .get("policy")
                .or_else(|| obj.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("policy")
                .to_string();
            let id = take_policy_id(next_policy);
            s.add_policy(id.clone(), name, bad, body.clone(), now);
            (
                json!({"id": id, "status": "active", "bad": bad}),
                Some(Remedy::Other),
                "POST /api/v1/policies/apply",
            )
        }
        ("POST", ["api", "v1", "policies", "validate"]) => {
            let obj = body_object(body, "policies/validate")?;
            let answer = match obj.get("actions") {
                Some(Value::Array(a)) if !a.is_empty() => json!({"valid": true}),
                Some(Value::Array(_)) | None => {
                    json!({"valid": false, "reason": "the policy has no actions"})
                }
                Some(other) => {
                    return Err(SimError::BadRequest(format!(
                        "policies/validate: actions must be a list (got {other})"
                    )))
                }
            };
            (answer, None, "")
        }
        ("POST", ["api", "v1", "policies", id, "rollback"]) => {
            let id = (*id).to_string();
            let active = s.rollback_policy(&id)?;
            (
                json!({"id": id, "status": "rolled_back", "active": active}),
                Some(Remedy::Other),
                "POST /api/v1/policies/{id}/rollback",
            )
        }
        ("GET", ["api", "v1", "committee", "state"]) => (
            json!({
                "component": s.name,
                "status": status,
                "replicas": s.replicas,
                "healthy_nodes": s.healthy_nodes(),
                "timestamp": now.to_rfc3339(),
            }),
            None,
            "",
        ),
        ("POST", ["api", "v1", "committee", "scale"]) => {
            let obj = body_object(body, "committee/scale")?;
            let replicas = obj
                .get("replicas")
                .and_then(Value::as_u64)
                .filter(|r| (1..=MAX_REPLICAS).contains(r))
                .ok_or_else(|| {
                    SimError::BadRequest(format!(
                        "committee/scale: replicas must be an integer between 1 and {MAX_REPLICAS} (got {})",
                        obj.get("replicas").cloned().unwrap_or(Value::Null)
                    ))
                })?;
            let previous = s.replicas;
            s.replicas = u32::try_from(replicas).unwrap_or(BASE_REPLICAS);
            if s.replicas > previous {
                // The new replicas start with fresh memory.
                s.fresh_replicas(now);
            }
            (
                json!({"previous_replicas": previous, "replicas": s.replicas}),
                Some(Remedy::Scale),
                "POST /api/v1/committee/scale",
            )
        }
        ("POST", ["api", "v1", "committee", "restart"]) => {
            let obj = body_object(body, "committee/restart")?;
            let graceful = match obj.get("graceful") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(SimError::BadRequest(format!(
                        "committee/restart: graceful must be a boolean (got {v})"
                    )))
                }
            };
            let timeout = match obj.get("timeout") {
                None | Some(Value::Null) => 30,
                Some(v) => v.as_u64().ok_or_else(|| {
                    SimError::BadRequest(format!(
                        "committee/restart: timeout must be a non-negative integer (got {v})"
                    ))
                })?,
            };
            let recovered = s.crashed;
            s.crashed = 0;
            // Every node restarts with fresh memory: a leak is gone.
            s.leak_since = None;
            (
                json!({"restarted": true, "graceful": graceful, "timeout": timeout, "recovered_nodes": recovered}),
                Some(Remedy::Other),
                "POST /api/v1/committee/restart",
            )
        }
        ("GET", ["api", "v1", "violations"]) => (json!(violations), None, ""),
        ("POST", ["api", "v1", "throttle"]) => {
            let obj = body_object(body, "throttle")?;
            match obj.get("rate_limit") {
                None => {
                    return Err(SimError::BadRequest(
                        "throttle: rate_limit is required (null removes the limit)".into(),
                    ))
                }
                Some(Value::Null) => s.throttle = None,
                Some(v) => {
                    let rate = v
                        .as_f64()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or_else(|| {
                            SimError::BadRequest(format!(
                                "throttle: rate_limit must be a positive number or null (got {v})"
                            ))
                        })?;
                    s.throttle = Some(rate);
                }
            }
            (
                json!({"rate_limit": s.throttle}),
                Some(Remedy::Throttle),
                "POST /api/v1/throttle",
            )
        }
        ("POST", ["api", "v1", "emergency-override"]) => {
            let d = duration_param(body, "emergency-override")?;
            s.override_until = until(now, d);
            let until_s = s.override_until.map(|t| t.to_rfc3339());
            (
                json!({"active": s.override_active(now), "until": until_s}),
                Some(Remedy::Override),
                "POST /api/v1/emergency-override",
            )
        }
        ("POST", ["api", "v1", "rebalance"]) => {
            let obj = body_object(body, "rebalance")?;
            let strategy = obj
                .get("strategy")
                .and_then(Value::as_str)
                .filter(|x| !x.trim().is_empty())
                .ok_or_else(|| {
                    SimError::BadRequest("rebalance: strategy must be a non-empty string".into())
                })?;
            (
                json!({"rebalanced": true, "strategy": strategy}),
                Some(Remedy::Other),
                "POST /api/v1/rebalance",
            )
        }
        ("POST", ["api", "v1", "config"]) => {
            let obj = body_object(body, "config")?.clone();
            if obj.get("restore").and_then(Value::as_str) == Some("previous") {
                if let Some(prev) = s.previous_config.take() {
                    s.config = prev;
                }
            } else {
                s.previous_config = Some(s.config.clone());
                for (k, v) in obj {
                    s.config.insert(k, v);
                }
            }
            (
                json!({"config": s.config}),
                Some(Remedy::Other),
                "POST /api/v1/config",
            )
        }
        ("POST", ["api", "v1", "validation", "bypass"]) => {
            let d = duration_param(body, "validation/bypass")?;
            s.bypass_until = until(now, d);
            let until_s = s.bypass_until.map(|t| t.to_rfc3339());
            (
                json!({"active": s.bypass_active(now), "until": until_s}),
                Some(Remedy::Other),
                "POST /api/v1/validation/bypass",
            )
        }
        ("POST", ["api", "v1", "failover"]) => {
            let obj = body_object(body, "failover")?;
            let failback = obj.get("failback").and_then(Value::as_bool) == Some(true);
            let mut recovered = 0;
            if failback {
                s.failed_over = false;
            } else {
                s.failed_over = true;
                recovered = s.crashed;
                s.crashed = 0;
            }
            (
                json!({"failed_over": s.failed_over, "failback": failback, "recovered_nodes": recovered}),
                Some(Remedy::Other),
                "POST /api/v1/failover",
            )
        }
        _ => {
            let normal = format!("/{}", segs.join("/"));
            let known = ENDPOINTS.iter().any(|(p, _)| *p == normal)
                || matches!(segs.as_slice(), ["api", "v1", "policies", _, "rollback"]);
            return Err(if known {
                SimError::MethodNotAllowed {
                    method: method.to_string(),
                    path: path.to_string(),
                }
            } else {
                SimError::NotFound(format!("no endpoint {method} {path}"))
            });
        }
    };
    let Some(remedy) = remedy else {
        return Ok(answer);
    };
    s.check_heals(remedy, now, storms);
    let after = s.faults();
    let healed: Vec<FaultKind> = before.into_iter().filter(|f| !after.contains(f)).collect();
    s.record_heals(&healed, by, now);
    if healed.contains(&FaultKind::Cascade) {
        // The dependents' retry storm ends with the upstream's cascade.
        for d in reached {
            w.components[d].last_heal = Some(now);
        }
    }
    let mut answer = answer;
    if let Value::Object(m) = &mut answer {
        m.insert("healed".into(), json!(healed));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::model::{
        BASE_MEMORY_BYTES, FLAP_PERIOD_SECONDS, LEAK_BYTES_PER_SECOND, LEAK_RELIEF_SECONDS,
        MEMORY_PRESSURE_BYTES, RULE_FAILURE, RULE_LATENCY, RULE_NODES, RULE_POLICY,
        RULE_THROUGHPUT,
    };
    use crate::sim::test_support::*;
    use crate::sim::{Simulator, MAX_CALLS};
    use mapek_actors::clock::ManualClock;
    use mapek_actors::settings::default_rules;
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    fn names(sim: &Simulator) -> BTreeSet<String> {
        sim.violations().into_iter().map(|v| v.name).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const THREE: [&str; 3] = [RULE_LATENCY, RULE_FAILURE, RULE_THROUGHPUT];

    fn critical_count(text: &str) -> f64 {
        critical_count_of(text, "charter")
    }

    #[test]
    fn rule_names_match_the_default_rules() {
        let defaults: BTreeSet<String> = default_rules().into_iter().map(|r| r.name).collect();
        assert_eq!(
            defaults,
            set(&[
                RULE_POLICY,
                RULE_LATENCY,
                RULE_FAILURE,
                RULE_THROUGHPUT,
                RULE_NODES
            ])
        );
    }

    #[test]
    fn baseline_is_quiet_with_margin() {
        let sim = sim();
        let r = sim.reading();
        assert!(r.validation_latency_seconds < 0.5, "{r:?}");
        assert!(r.failure_rate < 0.05, "{r:?}");
        assert!(r.throughput_ops_per_sec > 200.0, "{r:?}");
        assert!(sim.violations().is_empty());
        assert!(sim.healthy());
        let a = critical_count(&sim.metrics_text());
        let b = critical_count(&sim.metrics_text());
        assert_eq!(a, b, "no new critical policy violations at baseline");
        let st = sim.state();
        assert_eq!(st["healthy"], json!(true));
        assert_eq!(st["replicas"], json!(3));
        assert_eq!(st["healthy_nodes"], json!(3));
        assert_eq!(st["active_faults"], json!([]));
        assert_eq!(st["status"], json!("normal"));
    }

    #[test]
    fn load_spike_breaches_three_rules() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        let r = sim.reading();
        assert!(r.validation_latency_seconds > 1.0, "{r:?}");
        assert!(r.failure_rate > 0.10, "{r:?}");
        assert!(r.throughput_ops_per_sec < 100.0, "{r:?}");
        assert_eq!(names(&sim), set(&THREE));
        assert!(!sim.healthy());
        assert_eq!(sim.state()["active_faults"], json!(["load_spike"]));
    }

    #[test]
    fn load_spike_healed_by_scaling_up_two() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        let answer = post(&sim, "/api/v1/committee/scale", json!({"replicas": 5})).unwrap();
        assert_eq!(answer["healed"], json!(["load_spike"]));
        assert!(sim.healthy());
        assert!(sim.active_faults().is_empty());
        assert_eq!(sim.state()["status"], json!("recovering"));
    }

    #[test]
    fn load_spike_not_healed_by_too_small_a_scale() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        scale(&sim, 4);
        assert_eq!(sim.active_faults(), vec![FaultKind::LoadSpike]);
        assert!(!sim.violations().is_empty());
        scale(&sim, 5);
        assert!(sim.healthy());
    }

    #[test]
    fn load_spike_healed_by_the_default_throttle() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        throttle(&sim, json!(2000));
        assert_eq!(
            sim.active_faults(),
            vec![FaultKind::LoadSpike],
            "a loose throttle is not enough"
        );
        throttle(&sim, json!(500));
        assert!(sim.healthy(), "{:?}", sim.violations());
    }

    #[test]
    fn load_spike_not_healed_by_unfitting_actions() {
        let sim = sim();
        sim.inject(FaultKind::LoadSpike).unwrap();
        restart(&sim);
        post(&sim, "/api/v1/failover", json!({"mode": "standby"})).unwrap();
        post(
            &sim,
            "/api/v1/rebalance",
            json!({"strategy": "least_loaded"}),
        )
        .unwrap();
        post(&sim, "/api/v1/config", json!({"worker_pool_size": "+50%"})).unwrap();
        post(
            &sim,
            "/api/v1/validation/bypass",
            json!({"duration_seconds": 60}),
        )
        .unwrap();
        override_for(&sim, 300);
        post(
            &sim,
            "/api/v1/policies/apply",
            json!({"policy": "last_known_good"}),
        )
        .unwrap();
        assert_eq!(sim.active_faults(), vec![FaultKind::LoadSpike]);
        assert_eq!(names(&sim), set(&THREE));
    }

    #[test]
    fn bad_policy_raises_critical_violations_until_corrected() {
        let sim = sim();
        let before = critical_count(&sim.metrics_text());
        sim.inject(FaultKind::BadPolicy).unwrap();
        let r = sim.reading();
        assert!(r.failure_rate > 0.10, "{r:?}");
        assert!(r.validation_latency_seconds <= 1.0);
        assert!(r.throughput_ops_per_sec >= 100.0);
        assert_eq!(names(&sim), set(&[RULE_POLICY, RULE_FAILURE]));
        let a = critical_count(&sim.metrics_text());
        let b = critical_count(&sim.metrics_text());
        assert!(a > before && b > a, "{before} {a} {b}");
        // Unfitting remedies change nothing.
        restart(&sim);
        scale(&sim, 7);
        throttle(&sim, json!(500));
        assert_eq!(sim.active_faults(), vec![FaultKind::BadPolicy]);
        let answer = post(
            &sim,
            "/api/v1/policies/apply",
            json!({"policy": "last_known_good"}),
        )
        .unwrap();
        assert_eq!(answer["healed"], json!(["bad_policy"]));
        assert!(sim.healthy(), "{:?}", sim.violations());
        let c = critical_count(&sim.metrics_text());
        let d = critical_count(&sim.metrics_text());
        assert_eq!(c, d, "the counter stops increasing after the heal");
    }

    #[test]
    fn bad_policy_healed_by_rolling_it_back() {
        let sim = sim();
        sim.inject(FaultKind::BadPolicy).unwrap();
        let bad = sim.state()["active_policy"].as_str().unwrap().to_string();
        assert_eq!(
            sim.apply("POST", "/api/v1/policies/pol-9999/rollback", &json!({})),
            Err(SimError::NotFound("policy pol-9999".into()))
        );
        let ok = post(&sim, &format!("/api/v1/policies/{bad}/rollback"), json!({})).unwrap();
        assert_eq!(ok["healed"], json!(["bad_policy"]));
        assert_eq!(ok["active"], json!("pol-0001"));
        assert!(sim.healthy());
        assert!(matches!(
            post(&sim, &format!("/api/v1/policies/{bad}/rollback"), json!({})),
            Err(SimError::Conflict(_))
        ));
    }

    #[test]
    fn a_bad_policy_can_be_applied_through_the_api() {
        let sim = sim();
        let a = post(
            &sim,
            "/api/v1/policies/apply",
            json!({"policy": "strict", "bad": true}),
        )
        .unwrap();
        assert_eq!(a["bad"], json!(true));
        assert_eq!(sim.active_faults(), vec![FaultKind::BadPolicy]);
        let id = a["id"].as_str().unwrap().to_string();
        post(&sim, &format!("/api/v1/policies/{id}/rollback"), json!({})).unwrap();
        assert!(sim.healthy());
    }

    #[test]
    fn node_crash_is_not_healed_by_scaling() {
        let sim = sim();
        sim.inject(FaultKind::NodeCrash).unwrap();
        let st = sim.state();
        assert_eq!(st["healthy_nodes"], json!(2));
        assert_eq!(st["replicas"], json!(3));
        let r = sim.reading();
        assert!(r.validation_latency_seconds > 1.0, "{r:?}");
        assert!(r.failure_rate > 0.10, "{r:?}");
        assert!(names(&sim).contains(RULE_LATENCY) && names(&sim).contains(RULE_FAILURE));
        scale(&sim, 5);
        throttle(&sim, json!(500));
        post(
            &sim,
            "/api/v1/rebalance",
            json!({"strategy": "least_loaded"}),
        )
        .unwrap();
        assert_eq!(sim.active_faults(), vec![FaultKind::NodeCrash]);
        let st = sim.state();
        assert_eq!(st["healthy_nodes"], json!(4));
        assert_eq!(st["replicas"], json!(5));
        assert!(names(&sim).contains(RULE_LATENCY) && names(&sim).contains(RULE_FAILURE));
        restart(&sim);
        assert!(sim.healthy(), "{:?}", sim.violations());
    }

    #[test]
    fn node_crash_healed_by_failover_but_not_by_failback() {
        let sim = sim();
        sim.inject(FaultKind::NodeCrash).unwrap();
        post(&sim, "/api/v1/failover", json!({"failback": true})).unwrap();
        assert_eq!(sim.active_faults(), vec![FaultKind::NodeCrash]);
        let a = post(&sim, "/api/v1/failover", json!({"mode": "standby"})).unwrap();
        assert_eq!(a["healed"], json!(["node_crash"]));
        assert!(sim.healthy());
    }

    #[test]
    fn cascade_needs_override_and_throttle() {
        let sim = sim();
        sim.inject(FaultKind::Cascade).unwrap();
        let r = sim.reading();
        assert!(
            r.validation_latency_seconds > 1.0
                && r.failure_rate > 0.10
                && r.throughput_ops_per_sec < 100.0
        );
        assert_eq!(names(&sim), set(&THREE));
        // Throttle alone: the breakers stay tripped.
        throttle(&sim, json!(500));
        assert_eq!(sim.active_faults(), vec![FaultKind::Cascade]);
        assert!(names(&sim).contains(RULE_LATENCY) && names(&sim).contains(RULE_FAILURE));
        restart(&sim);
        scale(&sim, 5);
        assert_eq!(sim.active_faults(), vec![FaultKind::Cascade]);
        // Then the override: healed.
        override_for(&sim, 300);
        assert!(sim.healthy(), "{:?}", sim.violations());

        // Other order: override alone leaves the retry storm.
        let sim2 = self::sim();
        sim2.inject(FaultKind::Cascade).unwrap();
        override_for(&sim2, 300);
        assert_eq!(sim2.active_faults(), vec![FaultKind::Cascade]);
        assert_eq!(names(&sim2), set(&THREE));
        throttle(&sim2, json!(500));
        assert!(sim2.healthy(), "{:?}", sim2.violations());
    }

    #[test]
    fn an_ended_override_does_not_heal_a_cascade() {
        let sim = sim();
        sim.inject(FaultKind::Cascade).unwrap();
        override_for(&sim, 300);
        override_for(&sim, 0);
        throttle(&sim, json!(500));
        assert_eq!(sim.active_faults(), vec![FaultKind::Cascade]);
    }

    #[test]
    fn faults_never_heal_by_themselves_and_clear_ends_them() {
        let sim = sim();
        for k in FaultKind::ALL {
            sim.inject(k).unwrap();
        }
        for _ in 0..3 {
            sim.metrics_text();
            let _ = sim.apply("GET", "/api/v1/committee/state", &json!({}));
        }
        assert_eq!(sim.active_faults(), FaultKind::ALL.to_vec());
        assert_eq!(
            sim.apply("GET", "/api/v1/committee/state", &json!({}))
                .unwrap()["status"],
            json!("critical")
        );
        let cleared = sim.clear_faults();
        assert_eq!(cleared, FaultKind::ALL.to_vec());
        assert!(sim.healthy(), "{:?}", sim.violations());
        assert!(sim.inject_named("meteor").is_err());
        assert_eq!(sim.inject_named("cascade"), Ok(FaultKind::Cascade));
    }

    #[test]
    fn validation_and_parameter_errors() {
        let sim = sim();
        let v = post(
            &sim,
            "/api/v1/policies/validate",
            json!({"policy_id": "p", "actions": []}),
        )
        .unwrap();
        assert_eq!(v["valid"], json!(false));
        assert!(v["reason"].is_string());
        let v = post(
            &sim,
            "/api/v1/policies/validate",
            json!({"actions": [{"type": "SCALE_UP", "target": "charter", "parameters": {}}]}),
        )
        .unwrap();
        assert_eq!(v, json!({"valid": true}));
        for bad in [
            json!({"replicas": 0}),
            json!({"replicas": 51}),
            json!({"replicas": "3"}),
            json!({}),
        ] {
            assert!(matches!(
                post(&sim, "/api/v1/committee/scale", bad),
                Err(SimError::BadRequest(_))
            ));
        }
        assert!(matches!(
            post(&sim, "/api/v1/throttle", json!({"rate_limit": -1})),
            Err(SimError::BadRequest(_))
        ));
        assert!(matches!(
            post(&sim, "/api/v1/emergency-override", json!({})),
            Err(SimError::BadRequest(_))
        ));
        assert!(matches!(
            post(&sim, "/api/v1/nope", json!({})),
            Err(SimError::NotFound(_))
        ));
        assert!(matches!(
            sim.apply("GET", "/api/v1/committee/scale", &json!({})),
            Err(SimError::MethodNotAllowed { .. })
        ));
        assert_eq!(sim.state()["replicas"], json!(3));
    }

    #[test]
    fn override_expires_with_the_clock() {
        let start = chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let clock = ManualClock::new(start);
        let sim = Simulator::with_clock(Arc::new(clock.clone()));
        override_for(&sim, 60);
        assert_eq!(sim.state()["emergency_override_active"], json!(true));
        clock.advance(Duration::from_secs(61));
        assert_eq!(sim.state()["emergency_override_active"], json!(false));
    }

    /// A one-component simulator and its clock.
    fn timed() -> (Simulator, ManualClock) {
        sim_of(crate::sim::Topology::default())
    }

    fn memory(sim: &Simulator) -> f64 {
        sim.reading().memory_bytes
    }

    #[test]
    fn memory_leak_breaches_like_an_overload_and_grows_worse() {
        let (sim, clock) = timed();
        assert_eq!(memory(&sim), BASE_MEMORY_BYTES);
        sim.inject(FaultKind::MemoryLeak).unwrap();
        assert_eq!(sim.active_faults(), [FaultKind::MemoryLeak]);
        assert_eq!(names(&sim), set(&THREE), "breaches at once");
        assert_eq!(memory(&sim), MEMORY_PRESSURE_BYTES);
        let first = sim.reading();
        clock.advance(Duration::from_secs(60));
        let later = sim.reading();
        assert_eq!(
            later.memory_bytes - first.memory_bytes,
            60.0 * LEAK_BYTES_PER_SECOND
        );
        assert!(
            later.validation_latency_seconds > first.validation_latency_seconds
                && later.failure_rate > first.failure_rate,
            "{first:?} {later:?}"
        );
        assert_eq!(names(&sim), set(&THREE));
        // Injected again: nothing changes.
        sim.inject(FaultKind::MemoryLeak).unwrap();
        assert_eq!(sim.reading(), later);
        let st = sim.state();
        assert_eq!(st["memory_bytes"], json!(later.memory_bytes));
        assert_eq!(st["active_faults"], json!(["memory_leak"]));
        let text = sim.metrics_text();
        let samples = crate::scrape::parse_exposition(&text).unwrap();
        let gauge = |name: &str| {
            samples
                .iter()
                .find(|s| s.name == name && s.labels["component"] == "charter")
                .map(|s| s.value)
        };
        assert_eq!(
            gauge("westworld_charter_memory_bytes"),
            Some(later.memory_bytes)
        );
        assert!(samples
            .iter()
            .any(|s| s.name == "westworld_charter_fault_active"
                && s.labels["kind"] == "memory_leak"
                && s.value == 1.0));
    }

    #[test]
    fn memory_leak_scale_up_relieves_it_for_a_while_only() {
        let (sim, clock) = timed();
        sim.inject(FaultKind::MemoryLeak).unwrap();
        let a = post(&sim, "/api/v1/committee/scale", json!({"replicas": 5})).unwrap();
        assert_eq!(a["healed"], json!([]), "relieved, not healed");
        assert!(sim.violations().is_empty(), "{:?}", sim.violations());
        assert!(memory(&sim) < MEMORY_PRESSURE_BYTES);
        assert!(
            memory(&sim) > BASE_MEMORY_BYTES,
            "the old replicas still leak"
        );
        assert_eq!(sim.active_faults(), [FaultKind::MemoryLeak]);
        clock.advance(Duration::from_secs(LEAK_RELIEF_SECONDS - 1));
        assert!(sim.violations().is_empty(), "{:?}", sim.violations());
        clock.advance(Duration::from_secs(1));
        assert_eq!(names(&sim), set(&THREE), "the leak goes on");
        // Fewer replicas bring no fresh memory.
        scale(&sim, 3);
        assert_eq!(names(&sim), set(&THREE));
        // Another scale-up relieves it again, for as long.
        scale(&sim, 6);
        assert!(sim.violations().is_empty());
        clock.advance(Duration::from_secs(LEAK_RELIEF_SECONDS));
        assert_eq!(names(&sim), set(&THREE));
        // A scale-up during the relief does not push the memory back up.
        let (sim, clock) = timed();
        sim.inject(FaultKind::MemoryLeak).unwrap();
        clock.advance(Duration::from_secs(LEAK_RELIEF_SECONDS * 3));
        scale(&sim, 5);
        let relieved = memory(&sim);
        scale(&sim, 7);
        assert_eq!(memory(&sim), relieved);
    }

    #[test]
    fn memory_leak_healed_for_good_by_a_restart() {
        let (sim, clock) = timed();
        sim.inject(FaultKind::MemoryLeak).unwrap();
        clock.advance(Duration::from_secs(30));
        let a = post(
            &sim,
            "/api/v1/committee/restart",
            json!({"graceful": true, "timeout": 30}),
        )
        .unwrap();
        assert_eq!(a["healed"], json!(["memory_leak"]));
        assert!(sim.healthy(), "{:?}", sim.violations());
        assert_eq!(memory(&sim), BASE_MEMORY_BYTES);
        assert_eq!(sim.state()["status"], json!("recovering"));
        let heals = sim.state()["heals"].clone();
        assert_eq!(heals[0]["fault"], json!("memory_leak"));
        assert_eq!(heals[0]["by"], json!("POST /api/v1/committee/restart"));
        clock.advance(Duration::from_secs(3600));
        assert!(sim.healthy(), "{:?}", sim.violations());
        assert_eq!(memory(&sim), BASE_MEMORY_BYTES);
    }

    #[test]
    fn memory_leak_not_healed_by_other_remedies() {
        let (sim, clock) = timed();
        sim.inject(FaultKind::MemoryLeak).unwrap();
        throttle(&sim, json!(500));
        override_for(&sim, 300);
        post(&sim, "/api/v1/failover", json!({"mode": "standby"})).unwrap();
        post(
            &sim,
            "/api/v1/rebalance",
            json!({"strategy": "least_loaded"}),
        )
        .unwrap();
        post(&sim, "/api/v1/config", json!({"worker_pool_size": "+50%"})).unwrap();
        post(
            &sim,
            "/api/v1/validation/bypass",
            json!({"duration_seconds": 60}),
        )
        .unwrap();
        post(
            &sim,
            "/api/v1/policies/apply",
            json!({"policy": "last_known_good"}),
        )
        .unwrap();
        assert_eq!(sim.active_faults(), [FaultKind::MemoryLeak]);
        assert!(names(&sim).contains(RULE_LATENCY) && names(&sim).contains(RULE_FAILURE));
        assert_eq!(memory(&sim), MEMORY_PRESSURE_BYTES);
        clock.advance(Duration::from_secs(600));
        assert_eq!(sim.active_faults(), [FaultKind::MemoryLeak]);
        assert!(!sim.violations().is_empty());
    }

    /// Every Charter call that carries a remedy, to the default component.
    fn every_remedy(sim: &Simulator, replicas: u64) {
        scale(sim, replicas);
        throttle(sim, json!(500));
        override_for(sim, 300);
        restart(sim);
        post(sim, "/api/v1/failover", json!({"mode": "standby"})).unwrap();
        post(
            sim,
            "/api/v1/rebalance",
            json!({"strategy": "least_loaded"}),
        )
        .unwrap();
        post(sim, "/api/v1/config", json!({"worker_pool_size": "+50%"})).unwrap();
        post(
            sim,
            "/api/v1/validation/bypass",
            json!({"duration_seconds": 60}),
        )
        .unwrap();
        post(
            sim,
            "/api/v1/policies/apply",
            json!({"policy": "last_known_good"}),
        )
        .unwrap();
    }

    #[test]
    fn flapping_toggles_on_schedule_and_survives_every_remedy() {
        let (sim, clock) = timed();
        sim.inject(FaultKind::Flapping).unwrap();
        let half = FLAP_PERIOD_SECONDS;
        let mut replicas = 3;
        // Five periods, a remedy of every kind at each phase change.
        for period in 0..5 {
            assert_eq!(names(&sim), set(&THREE), "period {period}, breaching");
            assert!(!sim.healthy());
            replicas += 1;
            every_remedy(&sim, replicas);
            assert_eq!(
                names(&sim),
                set(&THREE),
                "period {period}: no remedy ends the breach"
            );
            clock.advance(Duration::from_secs(half - 1));
            assert_eq!(names(&sim), set(&THREE), "period {period}, still breaching");
            clock.advance(Duration::from_secs(1));
            assert!(
                sim.violations().is_empty(),
                "period {period}, quiet: {:?}",
                sim.violations()
            );
            assert_eq!(sim.active_faults(), [FaultKind::Flapping], "not healed");
            assert!(!sim.healthy(), "an active fault is not healthy");
            every_remedy(&sim, replicas);
            clock.advance(Duration::from_secs(half - 1));
            assert!(sim.violations().is_empty(), "period {period}, still quiet");
            clock.advance(Duration::from_secs(1));
        }
        assert_eq!(sim.active_faults(), [FaultKind::Flapping]);
        let heals = sim.state()["heals"].clone();
        assert_eq!(heals, json!([]), "no remedy healed it");
        // Only clearing the fault ends it, in either phase.
        assert_eq!(sim.clear_faults(), [FaultKind::Flapping]);
        assert!(sim.healthy(), "{:?}", sim.violations());
        clock.advance(Duration::from_secs(half * 2));
        assert!(sim.healthy());
        sim.inject(FaultKind::Flapping).unwrap();
        clock.advance(Duration::from_secs(half + 1));
        assert!(sim.violations().is_empty());
        assert_eq!(sim.clear_faults(), [FaultKind::Flapping]);
        clock.advance(Duration::from_secs(half));
        assert!(sim.healthy());
    }

    #[test]
    fn new_faults_are_injectable_by_name() {
        let sim = sim();
        assert_eq!(sim.inject_named("memory_leak"), Ok(FaultKind::MemoryLeak));
        assert_eq!(sim.inject_named("flapping"), Ok(FaultKind::Flapping));
        assert_eq!(
            sim.active_faults(),
            [FaultKind::MemoryLeak, FaultKind::Flapping]
        );
        let Err(SimError::BadRequest(msg)) = sim.inject_named("meteor") else {
            panic!("an unknown kind is refused");
        };
        assert!(
            msg.contains("memory_leak") && msg.contains("flapping"),
            "{msg}"
        );
    }

    #[test]
    fn calls_are_recorded_and_bounded() {
        let sim = sim();
        scale(&sim, 4);
        let _ = post(&sim, "/api/v1/committee/scale", json!({"replicas": 0}));
        let calls = sim.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].method, "POST");
        assert_eq!(calls[0].path, "/api/v1/committee/scale");
        assert_eq!(calls[0].body, json!({"replicas": 4}));
        assert_eq!(calls[0].status, 200);
        assert_eq!(calls[1].status, 400);
        sim.metrics_text();
        let _ = sim.state();
        assert_eq!(sim.calls().len(), 2, "metrics and state are not calls");
        for _ in 0..(MAX_CALLS + 5) {
            let _ = sim.apply("GET", "/api/v1/violations", &json!({}));
        }
        let calls = sim.calls();
        assert_eq!(calls.len(), MAX_CALLS);
        assert!(calls.iter().all(|c| c.path == "/api/v1/violations"));
    }
}
