//! The simulator's HTTP surface (axum): the Charter API under `/api/`,
//! `/health`, `/metrics` and the `/sim/*` control endpoints.

use std::future::Future;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::{CallRecord, SimError, Simulator};

#[derive(Clone)]
struct AppState {
    sim: Simulator,
    api_key: Option<String>,
}

/// The simulator's HTTP surface: the Charter API under `/api/v1`,
/// `/health`, `/metrics` and the `/sim/*` control endpoints. With an
/// `api_key`, the Charter API requires a matching `X-API-Key` (`/health`,
/// `/metrics` and `/sim/*` stay open).
pub fn router(sim: Simulator, api_key: Option<String>) -> Router {
    let state = AppState {
        sim,
        api_key: api_key.filter(|k| !k.is_empty()),
    };
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/sim/faults", get(list_faults).post(inject).delete(clear))
        .route("/sim/state", get(sim_state))
        .route("/sim/calls", get(calls))
        .route("/sim/reset", post(reset))
        .fallback(charter_api)
        .with_state(state)
}

/// Serves the simulator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: Simulator,
    api_key: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(sim, api_key))
        .with_graceful_shutdown(shutdown)
        .await
}

fn parse_body(body: &Bytes) -> Result<Value, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| format!("malformed JSON body: {e}"))
}

/// The `component` of the query string, if any.
fn query_component(uri: &Uri) -> Result<Option<String>, SimError> {
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| SimError::BadRequest(format!("malformed query: {e}")))?;
    Ok(pairs
        .into_iter()
        .rev()
        .find(|(k, _)| k == "component")
        .map(|(_, v)| v))
}

async fn health(State(app): State<AppState>) -> Json<Value> {
    Json(json!({"status": "ok", "service": "charter-sim", "healthy": app.sim.healthy()}))
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.sim.metrics_text(),
    )
        .into_response()
}

async fn list_faults(State(app): State<AppState>) -> Json<Value> {
    let state = app.sim.state();
    let by_component: Map<String, Value> = state["components"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(name, c)| (name.clone(), c["active_faults"].clone()))
                .collect()
        })
        .unwrap_or_default();
    Json(json!({
        "active_faults": state["active_faults"],
        "components": by_component,
    }))
}

async fn inject(State(app): State<AppState>, body: Bytes) -> Response {
    let value = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return SimError::BadRequest(e).into_response(),
    };
    let Some(kind) = value.get("kind").and_then(Value::as_str) else {
        return SimError::BadRequest("`kind` (string) is required".into()).into_response();
    };
    let component = match value.get("component") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            return SimError::BadRequest(format!("`component` must be a string (got {other})"))
                .into_response()
        }
    };
    match app.sim.inject_named_at(kind, component) {
        Ok((k, name)) => Json(json!({"injected": k, "component": name, "state": app.sim.state()}))
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn clear(State(app): State<AppState>, uri: Uri) -> Response {
    let cleared = match query_component(&uri) {
        Err(e) => Err(e),
        Ok(None) => Ok(app.sim.clear_faults()),
        Ok(Some(c)) => app.sim.clear_faults_at(&c),
    };
    match cleared {
        Ok(cleared) => Json(json!({"cleared": cleared, "state": app.sim.state()})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn sim_state(State(app): State<AppState>) -> Json<Value> {
    Json(app.sim.state())
}

async fn calls(State(app): State<AppState>) -> Json<Vec<CallRecord>> {
    Json(app.sim.calls())
}

async fn reset(State(app): State<AppState>) -> Json<Value> {
    app.sim.reset();
    Json(app.sim.state())
}

async fn charter_api(
    State(app): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if !path.starts_with("/api/") {
        return SimError::NotFound(format!("no endpoint {method} {path}")).into_response();
    }
    if let Some(key) = &app.api_key {
        let given = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        if given != Some(key.as_str()) {
            return SimError::Unauthorized.into_response();
        }
    }
    let raw = || {
        String::from_utf8_lossy(&body)
            .chars()
            .take(500)
            .collect::<String>()
    };
    let component = match query_component(&uri) {
        Ok(c) => c,
        Err(e) => {
            app.sim.record_call(
                method.as_str(),
                &path,
                Value::String(raw()),
                e.status().as_u16(),
            );
            return e.into_response();
        }
    };
    let value = if method == Method::GET || method == Method::HEAD {
        Value::Object(Map::new())
    } else {
        match parse_body(&body) {
            Ok(v) => v,
            Err(e) => {
                app.sim
                    .record_call(method.as_str(), &path, Value::String(raw()), 400);
                return SimError::BadRequest(e).into_response();
            }
        }
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty());
    // Tokens compare within their domain (a shard): one per fenced lock.
    let domain = headers
        .get("x-fencing-domain")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let fencing = headers
        .get("x-fencing-token")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .map(|t| (domain, t));
    match app.sim.apply_keyed(
        component.as_deref(),
        method.as_str(),
        &path,
        &value,
        key,
        fencing,
    ) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::parse_exposition;
    use crate::sim::test_support::*;
    use crate::sim::FaultKind;
    use mapek_actors::model::RootCause;
    use mapek_actors::ports::Effector;
    use mapek_actors::settings::PlanSettings;
    use std::time::Duration;

    #[tokio::test]
    async fn http_auth_errors_and_unknown_routes() {
        let run = start(Simulator::new(), Some("s3cret")).await;
        let c = reqwest::Client::new();
        let url = format!("{}/api/v1/committee/state", run.base);
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(&url)
            .header("X-API-Key", "wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(&url)
            .header("X-API-Key", "s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], json!("normal"));
        assert_eq!(v["replicas"], json!(3));
        assert_eq!(v["healthy_nodes"], json!(3));
        assert!(v["timestamp"].is_string());

        let r = c
            .post(format!("{}/api/v1/committee/scale", run.base))
            .header("X-API-Key", "s3cret")
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("malformed JSON"));

        for replicas in [0, 51] {
            let r = c
                .post(format!("{}/api/v1/committee/scale", run.base))
                .header("X-API-Key", "s3cret")
                .json(&json!({"replicas": replicas}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400);
            let v: Value = r.json().await.unwrap();
            assert!(v["error"].is_string());
        }
        for path in ["/api/v1/nope", "/nowhere"] {
            let r = c
                .get(format!("{}{path}", run.base))
                .header("X-API-Key", "s3cret")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404);
            let v: Value = r.json().await.unwrap();
            assert!(v["error"].is_string());
        }
        // Open endpoints.
        assert_eq!(
            c.get(format!("{}/health", run.base))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            c.get(format!("{}/metrics", run.base))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        run.stop().await;
    }

    #[tokio::test]
    async fn http_faults_state_calls_and_metrics() {
        let run = start(Simulator::new(), None).await;
        let c = reqwest::Client::new();
        let st: Value = c
            .get(format!("{}/sim/state", run.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["healthy"], json!(true));
        assert!(
            st["replicas"].is_u64()
                && st["healthy_nodes"].is_u64()
                && st["active_faults"].is_array()
        );

        let r = c
            .post(format!("{}/sim/faults", run.base))
            .json(&json!({"kind": "node_crash"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = c
            .post(format!("{}/sim/faults", run.base))
            .json(&json!({"kind": "meteor"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let st: Value = c
            .get(format!("{}/sim/state", run.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["healthy"], json!(false));
        assert_eq!(st["healthy_nodes"], json!(2));
        assert_eq!(st["active_faults"], json!(["node_crash"]));

        let r = c
            .post(format!("{}/api/v1/committee/restart", run.base))
            .json(&json!({"graceful": true, "timeout": 30}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let calls: Value = c
            .get(format!("{}/sim/calls", run.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let calls = calls.as_array().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["method"], json!("POST"));
        assert_eq!(calls[0]["path"], json!("/api/v1/committee/restart"));
        assert_eq!(calls[0]["body"], json!({"graceful": true, "timeout": 30}));
        assert!(calls[0]["at"].is_string());
        let st: Value = c
            .get(format!("{}/sim/state", run.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["healthy"], json!(true));

        c.post(format!("{}/sim/faults", run.base))
            .json(&json!({"kind": "load_spike"}))
            .send()
            .await
            .unwrap();
        let r = c
            .delete(format!("{}/sim/faults", run.base))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["cleared"], json!(["load_spike"]));

        let r = c.get(format!("{}/metrics", run.base)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let ct = r
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            ct.starts_with("application/openmetrics-text; version=1.0.0"),
            "{ct}"
        );
        let text = r.text().await.unwrap();
        let samples = parse_exposition(&text).unwrap();
        assert!(samples
            .iter()
            .any(|s| s.name == "westworld_charter_up" && s.value == 1.0));
        run.stop().await;
    }

    async fn get_json(c: &reqwest::Client, url: String) -> (u16, Value) {
        let r = c.get(url).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn post_json(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
        let r = c.post(url).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    #[tokio::test]
    async fn http_faults_and_charter_calls_aim_at_a_component() {
        let topology =
            crate::sim::Topology::parse("charter,gateway", &["gateway=charter"]).unwrap();
        let (sim, _) = sim_of(topology);
        let run = start(sim.clone(), None).await;
        let c = reqwest::Client::new();
        let b = &run.base;

        let (status, v) = post_json(
            &c,
            format!("{b}/sim/faults"),
            json!({"kind": "node_crash", "component": "gateway"}),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(v["component"], json!("gateway"));
        let (status, v) = post_json(
            &c,
            format!("{b}/sim/faults"),
            json!({"kind": "node_crash", "component": "nope"}),
        )
        .await;
        assert_eq!(status, 404);
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("unknown component `nope`"),
            "{v}"
        );
        let (status, _) = post_json(
            &c,
            format!("{b}/sim/faults"),
            json!({"kind": "node_crash", "component": 3}),
        )
        .await;
        assert_eq!(status, 400);

        let (_, faults) = get_json(&c, format!("{b}/sim/faults")).await;
        assert_eq!(faults["active_faults"], json!([]), "the default component");
        assert_eq!(faults["components"]["gateway"], json!(["node_crash"]));
        let (_, st) = get_json(&c, format!("{b}/sim/state")).await;
        assert_eq!(st["healthy"], json!(true));
        assert_eq!(st["all_healthy"], json!(false));
        assert_eq!(st["components"]["gateway"]["healthy_nodes"], json!(2));

        let (status, v) =
            get_json(&c, format!("{b}/api/v1/committee/state?component=gateway")).await;
        assert_eq!(status, 200);
        assert_eq!(
            (v["component"].clone(), v["healthy_nodes"].clone()),
            (json!("gateway"), json!(2))
        );
        let (_, v) = get_json(&c, format!("{b}/api/v1/committee/state")).await;
        assert_eq!(
            (v["component"].clone(), v["healthy_nodes"].clone()),
            (json!("charter"), json!(3))
        );
        let (status, _) = get_json(&c, format!("{b}/api/v1/violations?component=nope")).await;
        assert_eq!(status, 404);
        let (_, v) = get_json(&c, format!("{b}/api/v1/violations?component=gateway")).await;
        assert!(v.as_array().is_some_and(|a| !a.is_empty()), "{v}");

        // A restart of the default component does not help the gateway...
        let (_, v) = post_json(&c, format!("{b}/api/v1/committee/restart"), json!({})).await;
        assert_eq!(v["healed"], json!([]));
        // ... one aimed at it, in the body or the query, does.
        let (status, v) = post_json(
            &c,
            format!("{b}/api/v1/committee/restart?component=gateway"),
            json!({"component": "charter"}),
        )
        .await;
        assert_eq!(status, 400, "query and body disagree: {v}");
        let (_, v) = post_json(
            &c,
            format!("{b}/api/v1/committee/restart"),
            json!({"component": "gateway"}),
        )
        .await;
        assert_eq!(v["healed"], json!(["node_crash"]));
        assert!(sim.healthy());

        let (_, calls) = get_json(&c, format!("{b}/sim/calls")).await;
        let aimed: Vec<(Value, Value)> = calls
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["path"].clone(), c["component"].clone()))
            .collect();
        assert_eq!(
            aimed[0],
            (json!("/api/v1/committee/state"), json!("gateway"))
        );
        assert_eq!(
            aimed[1],
            (json!("/api/v1/committee/state"), json!("charter"))
        );
        assert_eq!(aimed[2], (json!("/api/v1/violations"), json!("nope")));
        assert_eq!(aimed.last().unwrap().1, json!("gateway"));

        sim.inject_at("gateway", FaultKind::LoadSpike).unwrap();
        sim.inject(FaultKind::LoadSpike).unwrap();
        let r = c
            .delete(format!("{b}/sim/faults?component=gateway"))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["cleared"], json!(["load_spike"]));
        assert_eq!(
            v["state"]["active_faults"],
            json!(["load_spike"]),
            "charter's stays"
        );

        let text = c
            .get(format!("{b}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let samples = parse_exposition(&text).unwrap();
        let ups: Vec<&str> = samples
            .iter()
            .filter(|s| s.name == "westworld_charter_up")
            .map(|s| s.labels["component"].as_str())
            .collect();
        assert_eq!(ups, ["charter", "gateway"]);
        run.stop().await;
    }

    /// mapek's own Charter client carries out its default strategies against
    /// the simulator: the endpoints and bodies fit, and each heals its fault.
    #[tokio::test]
    async fn mapek_effector_heals_each_fault_with_its_default_strategy() {
        use crate::effectors::{CharterClient, CharterEffector};
        use mapek_actors::plan::strategy;
        let cases = [
            (FaultKind::LoadSpike, RootCause::InsufficientCapacity),
            (FaultKind::BadPolicy, RootCause::PolicyMisconfiguration),
            (FaultKind::NodeCrash, RootCause::NodeCrash),
            (FaultKind::Cascade, RootCause::CascadeFailure),
        ];
        for (fault, cause) in cases {
            let sim = Simulator::new();
            let run = start(sim.clone(), Some("k")).await;
            let client = CharterClient::new(&run.base, "k", Duration::from_secs(5)).unwrap();
            let eff = CharterEffector::new(client);
            sim.inject(fault).unwrap();
            assert!(!sim.healthy());
            let actions = strategy(cause, &PlanSettings::default(), "charter");
            assert!(!actions.is_empty());
            for a in &actions {
                eff.apply(a)
                    .await
                    .unwrap_or_else(|e| panic!("{fault:?} {:?}: {e}", a.action_type));
            }
            assert!(sim.healthy(), "{fault:?} not healed: {}", sim.state());
            assert!(
                sim.calls().iter().all(|c| c.status == 200),
                "{:?}",
                sim.calls()
            );
            run.stop().await;
        }
    }

    /// What mapek's real detectors make of a fault: the simulator's
    /// `/metrics` scraped with the default rules, the violations through
    /// the Analyze phase, the top-ranked cause.
    async fn diagnose(fault: FaultKind) -> RootCause {
        use crate::scrape::{scrape_rules, ScrapeSource};
        use mapek_actors::analyze::{analyze, ViolationWindow};
        use mapek_actors::clock::Clock;
        use mapek_actors::ports::MetricSource;
        use mapek_actors::settings::AnalyzeSettings;
        use std::sync::Arc;
        let (sim, clock) = sim_of(crate::sim::Topology::default());
        let run = start(sim.clone(), None).await;
        let src = ScrapeSource::new(
            &format!("{}/metrics", run.base),
            Duration::from_secs(5),
            Arc::new(clock.clone()),
        )
        .unwrap();
        let rules = scrape_rules("5m");
        let mut window = ViolationWindow::new(1000, chrono::Duration::seconds(300));
        assert!(src.poll(&rules).await.unwrap().is_empty(), "{fault:?}");
        sim.inject(fault).unwrap();
        // Two polls a few seconds apart, as the Monitor would.
        for _ in 0..2 {
            clock.advance(Duration::from_secs(5));
            window.observe(&src.poll(&rules).await.unwrap());
        }
        let result = analyze(&window, "chain", clock.now(), &AnalyzeSettings::default());
        run.stop().await;
        result
            .root_causes
            .first()
            .unwrap_or_else(|| panic!("{fault:?}: no cause in {result:?}"))
            .cause
    }

    /// The real detectors take a memory leak for the overload it looks
    /// like: a cause whose default strategy restarts nothing.
    #[tokio::test]
    async fn memory_leak_is_diagnosed_as_an_overload_whose_strategy_restarts_nothing() {
        use mapek_actors::model::ActionType;
        use mapek_actors::plan::strategy_steps;
        let spike = diagnose(FaultKind::LoadSpike).await;
        let leak = diagnose(FaultKind::MemoryLeak).await;
        assert_eq!(leak, spike, "same symptoms, same diagnosis");
        assert!(
            matches!(
                leak,
                RootCause::ValidationLatency | RootCause::InsufficientCapacity
            ),
            "{leak:?}"
        );
        let steps = strategy_steps(leak);
        assert_eq!(steps.first(), Some(&ActionType::ScaleUp), "{steps:?}");
        assert!(!steps.contains(&ActionType::RestartService), "{steps:?}");
        // Flapping, in its breaching half, looks the same.
        assert_eq!(diagnose(FaultKind::Flapping).await, spike);
    }

    /// mapek's client carries out the strategy the leak is diagnosed as: it
    /// seems to work, until the relief ends; a restart heals it for good.
    #[tokio::test]
    async fn mapek_effector_scale_up_only_relieves_a_memory_leak() {
        use crate::effectors::{CharterClient, CharterEffector};
        use crate::sim::LEAK_RELIEF_SECONDS;
        use mapek_actors::model::ActionType;
        use mapek_actors::plan::strategy;
        let (sim, clock) = sim_of(crate::sim::Topology::default());
        let run = start(sim.clone(), None).await;
        let client = CharterClient::new(&run.base, "", Duration::from_secs(5)).unwrap();
        let eff = CharterEffector::new(client);
        sim.inject(FaultKind::MemoryLeak).unwrap();
        let settings = PlanSettings::default();
        for a in strategy(RootCause::ValidationLatency, &settings, "charter") {
            eff.apply(&a).await.unwrap();
        }
        clock.advance(Duration::from_secs(10));
        assert!(sim.violations().is_empty(), "a verification now: success");
        clock.advance(Duration::from_secs(LEAK_RELIEF_SECONDS));
        assert!(!sim.violations().is_empty(), "the symptom recurs");
        assert_eq!(sim.active_faults(), [FaultKind::MemoryLeak]);
        let restart = strategy(RootCause::NodeCrash, &settings, "charter");
        assert_eq!(restart[0].action_type, ActionType::RestartService);
        eff.apply(&restart[0]).await.unwrap();
        clock.advance(Duration::from_secs(LEAK_RELIEF_SECONDS * 4));
        assert!(sim.healthy(), "{}", sim.state());
        run.stop().await;
    }

    /// A remedy that does not fit, sent by mapek's client, leaves the fault.
    #[tokio::test]
    async fn mapek_effector_restart_does_not_heal_a_load_spike() {
        use crate::effectors::{CharterClient, CharterEffector};
        use mapek_actors::plan::strategy;
        let sim = Simulator::new();
        let run = start(sim.clone(), None).await;
        let client = CharterClient::new(&run.base, "", Duration::from_secs(5)).unwrap();
        let eff = CharterEffector::new(client);
        sim.inject(FaultKind::LoadSpike).unwrap();
        for a in strategy(
            RootCause::SystemInstability,
            &PlanSettings::default(),
            "charter",
        ) {
            eff.apply(&a).await.unwrap();
        }
        assert_eq!(sim.active_faults(), vec![FaultKind::LoadSpike]);
        run.stop().await;
    }

    /// The cascade strategy through mapek's client: aimed at the dependent
    /// it changes nothing; aimed at the upstream it heals both.
    #[tokio::test]
    async fn mapek_effector_heals_a_spread_cascade_only_at_the_upstream() {
        use crate::effectors::{CharterClient, CharterEffector};
        use mapek_actors::plan::strategy;
        let topology =
            crate::sim::Topology::parse("charter,gateway", &["gateway=charter"]).unwrap();
        let (sim, clock) = sim_of(topology);
        let run = start(sim.clone(), None).await;
        let client = CharterClient::new(&run.base, "", Duration::from_secs(5)).unwrap();
        let eff = CharterEffector::new(client);
        sim.inject_at("charter", FaultKind::Cascade).unwrap();
        clock.advance(Duration::from_secs(crate::sim::CASCADE_SPREAD_SECONDS));
        assert!(sim.reading_at("gateway").unwrap().failure_rate > 0.10);

        for a in strategy(
            RootCause::CascadeFailure,
            &PlanSettings::default(),
            "gateway",
        ) {
            eff.apply(&a).await.unwrap();
        }
        assert!(sim.reading_at("gateway").unwrap().failure_rate > 0.10);
        assert_eq!(sim.active_faults(), [FaultKind::Cascade]);

        for a in strategy(
            RootCause::CascadeFailure,
            &PlanSettings::default(),
            "charter",
        ) {
            eff.apply(&a).await.unwrap();
        }
        assert!(sim.healthy(), "{}", sim.state());
        run.stop().await;
    }
}
