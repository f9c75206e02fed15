//! Effectors: the Charter REST client (every endpoint of the Charter API).

use std::time::Duration;

use futures::future::BoxFuture;
use mapek_actors::execute::EffectorRouter;
use mapek_actors::model::{ActionType, RemediationAction, RemediationPolicy, RollbackStep};
use mapek_actors::ports::{Effector, EffectorError};
use serde_json::{json, Map, Value};

use crate::config::Config;

/// Builds the effector router from the config.
pub fn build_router(cfg: &Config) -> Result<EffectorRouter, String> {
    let charter = CharterClient::new(
        &cfg.charter.url,
        &cfg.charter.api_key,
        Duration::from_secs(cfg.charter.timeout_seconds),
    )?;
    Ok(EffectorRouter::all_to(std::sync::Arc::new(
        CharterEffector { client: charter },
    )))
}

/// A thin client of the Charter REST API. One call, no retries: the
/// Executor owns timeouts per call and retries with backoff.
#[derive(Clone)]
pub struct CharterClient {
    http: reqwest::Client,
    base: String,
    api_key: String,
}

impl CharterClient {
    /// A client of `base_url` sending `X-API-Key: api_key`.
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("building the Charter client: {e}"))?;
        Ok(CharterClient {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
        })
    }

    /// Base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`, JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value, EffectorError> {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(path, req).await
    }

    /// `POST path` with a JSON body, JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, EffectorError> {
        let req = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send(path, req).await
    }

    async fn send(&self, path: &str, req: reqwest::RequestBuilder) -> Result<Value, EffectorError> {
        let req = if self.api_key.is_empty() {
            req
        } else {
            req.header("X-API-Key", &self.api_key)
        };
        let resp = req.send().await.map_err(|e| {
            EffectorError::Transient(if e.is_timeout() {
                format!("{path}: timed out")
            } else {
                format!("{path}: {e}")
            })
        })?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| EffectorError::Transient(format!("{path}: reading body: {e}")))?;
        let value = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body).unwrap_or(Value::String(body.chars().take(500).collect()))
        };
        if status.is_success() {
            Ok(value)
        } else if status.is_server_error() || status.as_u16() == 429 {
            Err(EffectorError::Transient(format!(
                "{path}: HTTP {status}: {value}"
            )))
        } else {
            Err(EffectorError::Rejected(format!(
                "{path}: HTTP {status}: {value}"
            )))
        }
    }

    /// Current replicas from `GET /api/v1/committee/state`.
    pub async fn replicas(&self) -> Result<u64, EffectorError> {
        let state = self.get("/api/v1/committee/state").await?;
        state
            .get("replicas")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                EffectorError::Rejected(format!("committee state without replicas: {state}"))
            })
    }
}

/// Carries out remediation actions through the Charter API.
pub struct CharterEffector {
    /// The client.
    pub client: CharterClient,
}

fn param<'a>(p: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    p.get(key)
}

impl CharterEffector {
    async fn scale(&self, delta: i64) -> Result<Value, EffectorError> {
        let before = self.client.replicas().await?;
        let after = (before as i64 + delta).max(1) as u64;
        let answer = self
            .client
            .post("/api/v1/committee/scale", &json!({"replicas": after}))
            .await?;
        Ok(json!({"previous_replicas": before, "replicas": after, "answer": answer}))
    }

    async fn run(
        &self,
        action: ActionType,
        p: &Map<String, Value>,
    ) -> Result<Value, EffectorError> {
        let delta = param(p, "replicas_delta")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        match action {
            ActionType::ScaleUp => self.scale(delta).await,
            ActionType::ScaleDown => self.scale(-delta).await,
            ActionType::RestartService => {
                let body = json!({
                    "graceful": param(p, "graceful").and_then(Value::as_bool).unwrap_or(true),
                    "timeout": param(p, "timeout").and_then(Value::as_u64).unwrap_or(30),
                });
                self.client.post("/api/v1/committee/restart", &body).await
            }
            ActionType::ApplyPolicy => {
                self.client
                    .post("/api/v1/policies/apply", &Value::Object(p.clone()))
                    .await
            }
            ActionType::BypassValidation => {
                let d = param(p, "duration_seconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                self.client
                    .post("/api/v1/validation/bypass", &json!({"duration_seconds": d}))
                    .await
            }
            ActionType::ThrottleRequests => {
                let rate = param(p, "rate_limit").cloned().unwrap_or(Value::Null);
                self.client
                    .post("/api/v1/throttle", &json!({"rate_limit": rate}))
                    .await
            }
            ActionType::ActivateEmergencyOverride => {
                let d = param(p, "duration_seconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                self.client
                    .post(
                        "/api/v1/emergency-override",
                        &json!({"duration_seconds": d}),
                    )
                    .await
            }
            ActionType::RebalanceLoad => {
                let s = param(p, "strategy")
                    .cloned()
                    .unwrap_or(json!("least_loaded"));
                self.client
                    .post("/api/v1/rebalance", &json!({"strategy": s}))
                    .await
            }
            ActionType::UpdateConfiguration => {
                self.client
                    .post("/api/v1/config", &Value::Object(p.clone()))
                    .await
            }
            ActionType::Failover => {
                self.client
                    .post("/api/v1/failover", &Value::Object(p.clone()))
                    .await
            }
        }
    }
}

impl Effector for CharterEffector {
    fn name(&self) -> &str {
        "charter"
    }

    fn validate<'a>(
        &'a self,
        policy: &'a RemediationPolicy,
    ) -> BoxFuture<'a, Result<(), EffectorError>> {
        Box::pin(async move {
            let body = json!({
                "policy_id": policy.id,
                "root_cause": policy.root_cause,
                "actions": policy.actions.iter().map(|a| json!({
                    "type": a.action_type, "target": a.target, "parameters": a.parameters,
                })).collect::<Vec<_>>(),
            });
            let answer = self.client.post("/api/v1/policies/validate", &body).await?;
            if answer.get("valid").and_then(Value::as_bool) == Some(false) {
                return Err(EffectorError::Rejected(format!(
                    "Charter refused the policy: {answer}"
                )));
            }
            Ok(())
        })
    }

    fn apply<'a>(
        &'a self,
        action: &'a RemediationAction,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(self.run(action.action_type, &action.parameters))
    }

    fn rollback<'a>(
        &'a self,
        _action: &'a RemediationAction,
        step: &'a RollbackStep,
        applied: &'a Value,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(async move {
            match step.action_type {
                // Scaling back restores the replica count seen before.
                ActionType::ScaleDown | ActionType::ScaleUp
                    if applied.get("previous_replicas").is_some() =>
                {
                    let r = applied
                        .get("previous_replicas")
                        .cloned()
                        .unwrap_or(json!(1));
                    self.client
                        .post("/api/v1/committee/scale", &json!({"replicas": r}))
                        .await
                }
                ActionType::ApplyPolicy => {
                    let id = applied
                        .get("id")
                        .or_else(|| applied.get("policy_id"))
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            EffectorError::Rejected(format!(
                                "no policy id to roll back in {applied}"
                            ))
                        })?;
                    self.client
                        .post(&format!("/api/v1/policies/{id}/rollback"), &json!({}))
                        .await
                }
                other => self.run(other, &step.parameters).await,
            }
        })
    }
}
