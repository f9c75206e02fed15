//! Effectors: the Charter REST client (every endpoint of the Charter API), a
//! command effector running a configured program, and a generic HTTP webhook;
//! [`build_router`] routes the action types to them as configured in the
//! `effectors` section.
//!
//! None of them retries or imposes the Executor's per-call timeout: the
//! Executor owns both. They classify failures: [`EffectorError::Transient`]
//! (retried with backoff) or [`EffectorError::Rejected`] (not retried).

use std::collections::HashMap;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use mapek_actors::execute::{ComponentRoute, EffectorRouter};
use mapek_actors::model::{ActionType, RemediationAction, RemediationPolicy, RollbackStep};
use mapek_actors::ports::{Effector, EffectorError};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::{CommandSettings, Config, EffectorKind, WebhookSettings};

/// Builds the effector router from the `effectors` section: every action
/// type goes to its route or to the default effector. Only the effectors in
/// use are built, each once. Action types whose effector is `none` are not
/// routed, so the Executor fails their policies with "no effector
/// configured".
pub fn build_router(cfg: &Config) -> Result<EffectorRouter, String> {
    let mut built: HashMap<EffectorKind, Arc<dyn Effector>> = HashMap::new();
    let mut router = EffectorRouter::empty();
    for action in ActionType::ALL {
        let kind = cfg.effectors.kind_for(action);
        let effector = match built.get(&kind) {
            Some(e) => e.clone(),
            None => match build_effector(cfg, kind)? {
                Some(e) => {
                    built.insert(kind, e.clone());
                    e
                }
                None => continue,
            },
        };
        router = router.route(action, effector);
    }
    for (n, r) in cfg.effectors.component_routes.iter().enumerate() {
        // `none` stays a route: those components are owned by no system
        // (escalated), never left to fall through to the default.
        let effector = match built.get(&r.effector) {
            Some(e) => Some(e.clone()),
            None => {
                let e = build_effector(cfg, r.effector)?;
                if let Some(e) = &e {
                    built.insert(r.effector, e.clone());
                }
                e
            }
        };
        let components = globs(&r.components, &format!("effectors.component_routes[{n}]"))?;
        router = router.component_route(ComponentRoute {
            components,
            actions: (!r.actions.is_empty()).then(|| r.actions.clone()),
            effector,
            mode: r.mode,
        });
    }
    if !cfg.effectors.default_components.is_empty() {
        router = router.restrict_default(globs(
            &cfg.effectors.default_components,
            "effectors.default_components",
        )?);
    }
    Ok(router)
}

fn globs(list: &[String], at: &str) -> Result<Vec<glob::Pattern>, String> {
    list.iter()
        .map(|g| glob::Pattern::new(g).map_err(|e| format!("{at}: invalid glob `{g}`: {e}")))
        .collect()
}

/// The effector of one kind, built from its settings; `None` for `none`.
fn build_effector(cfg: &Config, kind: EffectorKind) -> Result<Option<Arc<dyn Effector>>, String> {
    Ok(match kind {
        EffectorKind::Charter => {
            let client = CharterClient::new(
                &cfg.charter.url,
                &cfg.charter.api_key,
                Duration::from_secs(cfg.charter.timeout_seconds),
            )?;
            Some(Arc::new(CharterEffector::new(client)))
        }
        EffectorKind::Command => Some(Arc::new(CommandEffector::new(&cfg.effectors.command)?)),
        EffectorKind::Webhook => Some(Arc::new(WebhookEffector::new(&cfg.effectors.webhook)?)),
        EffectorKind::None => None,
    })
}

/// An error and its sources, joined with `: ` (reqwest's own message says
/// little: "error sending request"; the cause is in the sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// Sends an HTTP request and classifies the answer, for every HTTP effector:
/// 2xx is the JSON body (`null` when empty, a string when not JSON); 5xx,
/// 429, timeouts and connection errors are transient; any other status is a
/// rejection. `what` names the call in messages (the URL is left out of
/// them: it may hold credentials).
async fn exchange(what: &str, req: reqwest::RequestBuilder) -> Result<Value, EffectorError> {
    let resp = req.send().await.map_err(|e| {
        EffectorError::Transient(if e.is_timeout() {
            format!("timed out: {what}")
        } else {
            format!("{what}: {}", error_chain(&e.without_url()))
        })
    })?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| {
        EffectorError::Transient(format!(
            "{what}: reading the answer: {}",
            error_chain(&e.without_url())
        ))
    })?;
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body)
            .unwrap_or_else(|_| Value::String(body.chars().take(500).collect()))
    };
    if status.is_success() {
        Ok(value)
    } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        Err(EffectorError::Transient(format!(
            "{what}: HTTP {status}: {value}"
        )))
    } else {
        Err(EffectorError::Rejected(format!(
            "{what}: HTTP {status}: {value}"
        )))
    }
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
        self.send(path, req, false).await
    }

    /// `GET path?query` (the pairs URL-encoded), JSON answer.
    pub async fn get_with_query(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Value, EffectorError> {
        let req = self.http.get(format!("{}{path}", self.base)).query(query);
        self.send(path, req, false).await
    }

    /// `POST path` with a JSON body, JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, EffectorError> {
        let req = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send(path, req, true).await
    }

    async fn send(
        &self,
        path: &str,
        req: reqwest::RequestBuilder,
        mutating: bool,
    ) -> Result<Value, EffectorError> {
        let req = if self.api_key.is_empty() {
            req
        } else {
            req.header("X-API-Key", &self.api_key)
        };
        // The action's idempotency key, the same on every attempt and
        // never sent for a different action: the Charter can tell a retry
        // from a new request.
        let marks = MARKS.try_with(Clone::clone).unwrap_or_default();
        let req = match (marks.idempotency_key, mutating) {
            (Some(key), true) => req.header("Idempotency-Key", key),
            _ => req,
        };
        // The fencing token goes on every request of the action: a Charter
        // that saw a newer leader's token refuses this one.
        let req = match marks.fencing_token {
            Some(token) => req.header("X-Fencing-Token", token.to_string()),
            None => req,
        };
        let req = match marks.fencing_domain {
            Some(domain) => req.header("X-Fencing-Domain", domain),
            None => req,
        };
        exchange(path, req).await
    }

    /// Current replicas of `component` from `GET
    /// /api/v1/committee/state?component=...` (no query for an empty
    /// `component`: the Charter's default one).
    pub async fn replicas(&self, component: &str) -> Result<u64, EffectorError> {
        let path = "/api/v1/committee/state";
        let state = if component.is_empty() {
            self.get(path).await?
        } else {
            self.get_with_query(path, &[("component", component)])
                .await?
        };
        state
            .get("replicas")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                EffectorError::Rejected(format!("committee state without replicas: {state}"))
            })
    }
}

/// Carries out remediation actions through the Charter API. Every request
/// names the component acted on: `component` = the action's `target` in
/// each JSON body it sends (and `?component=` on the state it reads), so a
/// Charter that runs several components applies the remedy to that one
/// only. An empty target sends no `component` (the Charter's default).
pub struct CharterEffector {
    /// The client.
    pub client: CharterClient,
    /// Replica counts decided per idempotency key (`previous`, `target`),
    /// so a retried scale (its first attempt may have succeeded and timed
    /// out) sets the same count instead of adding the delta again.
    scale_plans: std::sync::Mutex<HashMap<String, (u64, u64)>>,
}

impl CharterEffector {
    /// An effector over `client`.
    pub fn new(client: CharterClient) -> Self {
        CharterEffector {
            client,
            scale_plans: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

/// What goes with the requests of the action being applied.
#[derive(Clone, Default)]
struct CallMarks {
    /// Sent as `Idempotency-Key`.
    idempotency_key: Option<String>,
    /// Sent as `X-Fencing-Token` (cluster mode).
    fencing_token: Option<i64>,
    /// Sent as `X-Fencing-Domain`: what the token fences (its shard).
    fencing_domain: Option<String>,
}

tokio::task_local! {
    /// The marks of the action being applied (headers of its mutating
    /// requests).
    static MARKS: CallMarks;
}

/// The key the Executor puts on each action (`execution/action`), the same
/// for every attempt of one action.
fn idempotency_key(p: &Map<String, Value>) -> Option<&str> {
    p.get(mapek_actors::execute::IDEMPOTENCY_KEY)
        .and_then(Value::as_str)
}

fn param<'a>(p: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    p.get(key)
}

/// `body` with `"component": target` (the target wins over a parameter of
/// that name); unchanged for an empty target or a body that is not an
/// object.
fn aimed(mut body: Value, target: &str) -> Value {
    if let (Value::Object(m), false) = (&mut body, target.is_empty()) {
        m.insert("component".into(), json!(target));
    }
    body
}

impl CharterEffector {
    async fn scale(
        &self,
        delta: i64,
        key: Option<&str>,
        target: &str,
    ) -> Result<Value, EffectorError> {
        let planned = key.and_then(|k| {
            self.scale_plans
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(k)
                .copied()
        });
        let (before, after) = match planned {
            Some(plan) => plan,
            None => {
                let before = self.client.replicas(target).await?;
                let after = (before as i64 + delta).max(1) as u64;
                if let Some(k) = key {
                    let mut plans = self.scale_plans.lock().unwrap_or_else(|p| p.into_inner());
                    if plans.len() >= 1024 {
                        plans.clear();
                    }
                    plans.insert(k.to_string(), (before, after));
                }
                (before, after)
            }
        };
        let answer = self
            .client
            .post(
                "/api/v1/committee/scale",
                &aimed(json!({"replicas": after}), target),
            )
            .await?;
        Ok(json!({"previous_replicas": before, "replicas": after, "answer": answer}))
    }

    async fn run(
        &self,
        action: ActionType,
        p: &Map<String, Value>,
        target: &str,
    ) -> Result<Value, EffectorError> {
        let delta = param(p, "replicas_delta")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        match action {
            ActionType::ScaleUp => self.scale(delta, idempotency_key(p), target).await,
            ActionType::ScaleDown => self.scale(-delta, idempotency_key(p), target).await,
            ActionType::RestartService => {
                let body = json!({
                    "graceful": param(p, "graceful").and_then(Value::as_bool).unwrap_or(true),
                    "timeout": param(p, "timeout").and_then(Value::as_u64).unwrap_or(30),
                });
                self.client
                    .post("/api/v1/committee/restart", &aimed(body, target))
                    .await
            }
            ActionType::ApplyPolicy => {
                self.client
                    .post(
                        "/api/v1/policies/apply",
                        &aimed(Value::Object(p.clone()), target),
                    )
                    .await
            }
            ActionType::BypassValidation => {
                let d = param(p, "duration_seconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                self.client
                    .post(
                        "/api/v1/validation/bypass",
                        &aimed(json!({"duration_seconds": d}), target),
                    )
                    .await
            }
            ActionType::ThrottleRequests => {
                let rate = param(p, "rate_limit").cloned().unwrap_or(Value::Null);
                self.client
                    .post(
                        "/api/v1/throttle",
                        &aimed(json!({"rate_limit": rate}), target),
                    )
                    .await
            }
            ActionType::ActivateEmergencyOverride => {
                let d = param(p, "duration_seconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                self.client
                    .post(
                        "/api/v1/emergency-override",
                        &aimed(json!({"duration_seconds": d}), target),
                    )
                    .await
            }
            ActionType::RebalanceLoad => {
                let s = param(p, "strategy")
                    .cloned()
                    .unwrap_or(json!("least_loaded"));
                self.client
                    .post("/api/v1/rebalance", &aimed(json!({"strategy": s}), target))
                    .await
            }
            ActionType::UpdateConfiguration => {
                self.client
                    .post("/api/v1/config", &aimed(Value::Object(p.clone()), target))
                    .await
            }
            ActionType::Failover => {
                self.client
                    .post("/api/v1/failover", &aimed(Value::Object(p.clone()), target))
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
            // The policy's component, when its actions share one.
            let target = match policy.actions.split_first() {
                Some((first, rest)) if rest.iter().all(|a| a.target == first.target) => {
                    first.target.as_str()
                }
                _ => "",
            };
            let body = aimed(body, target);
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
        let marks = CallMarks {
            idempotency_key: idempotency_key(&action.parameters).map(str::to_string),
            fencing_token: action
                .parameters
                .get(mapek_actors::execute::FENCING_TOKEN)
                .and_then(Value::as_i64),
            fencing_domain: action
                .parameters
                .get(mapek_actors::execute::FENCING_DOMAIN)
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        Box::pin(MARKS.scope(
            marks,
            self.run(action.action_type, &action.parameters, &action.target),
        ))
    }

    fn rollback<'a>(
        &'a self,
        action: &'a RemediationAction,
        step: &'a RollbackStep,
        applied: &'a Value,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        // The undo carries the action's fencing token (a deposed leader's
        // undo is refused like its actions), not its idempotency key (it is
        // another request).
        let marks = CallMarks {
            idempotency_key: None,
            fencing_token: action
                .parameters
                .get(mapek_actors::execute::FENCING_TOKEN)
                .and_then(Value::as_i64),
            fencing_domain: action
                .parameters
                .get(mapek_actors::execute::FENCING_DOMAIN)
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        Box::pin(MARKS.scope(marks, async move {
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
                        .post(
                            "/api/v1/committee/scale",
                            &aimed(json!({"replicas": r}), &action.target),
                        )
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
                        .post(
                            &format!("/api/v1/policies/{id}/rollback"),
                            &aimed(json!({}), &action.target),
                        )
                        .await
                }
                other => self.run(other, &step.parameters, &action.target).await,
            }
        }))
    }
}

/// One piece of an argument template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    /// Literal text.
    Text(String),
    /// `{action}`: the action type (`SCALE_UP`).
    Action,
    /// `{target}`: the component acted on.
    Target,
    /// `{params_json}`: every parameter, as a JSON object.
    ParamsJson,
    /// `{param.NAME}`: one parameter as plain text.
    Param(String),
}

/// Parses an argument template of the command effector.
fn parse_template(template: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = template;
    while let Some(c) = rest.chars().next() {
        let at = template.len() - rest.len();
        if rest.starts_with("{{") {
            text.push('{');
            rest = &rest[2..];
        } else if rest.starts_with("}}") {
            text.push('}');
            rest = &rest[2..];
        } else if c == '}' {
            return Err(format!(
                "unmatched `}}` at byte {at}; write `}}}}` for a literal brace"
            ));
        } else if c == '{' {
            let Some(end) = rest.find('}') else {
                return Err(format!(
                    "unclosed `{{` at byte {at}; write `{{{{` for a literal brace"
                ));
            };
            let name = &rest[1..end];
            let piece = match name {
                "action" => Piece::Action,
                "target" => Piece::Target,
                "params_json" => Piece::ParamsJson,
                _ => match name.strip_prefix("param.") {
                    Some(p) if !p.is_empty() => Piece::Param(p.to_string()),
                    _ => {
                        return Err(format!(
                            "unknown placeholder `{{{name}}}`; known: {{action}}, {{target}}, \
                             {{param.NAME}}, {{params_json}}"
                        ))
                    }
                },
            };
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(piece);
            rest = &rest[end + 1..];
        } else {
            text.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// Checks an argument template of the command effector (used by config
/// validation): placeholders must be known and braces balanced.
pub fn check_template(template: &str) -> Result<(), String> {
    parse_template(template).map(|_| ())
}

/// A parameter as plain text: strings without quotes, numbers and booleans
/// as written, null as nothing, lists and objects as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render(
    pieces: &[Piece],
    action: ActionType,
    target: &str,
    params: &Map<String, Value>,
) -> String {
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Action => out.push_str(action.as_str()),
            Piece::Target => out.push_str(target),
            Piece::ParamsJson => out.push_str(&Value::Object(params.clone()).to_string()),
            Piece::Param(name) => out.push_str(&params.get(name).map(plain).unwrap_or_default()),
        }
    }
    out
}

/// Renders an argument template of the command effector for an action
/// type, target and parameters (`{param.NAME}` of a missing parameter is
/// empty).
pub fn render_template(
    template: &str,
    action: ActionType,
    target: &str,
    params: &Map<String, Value>,
) -> Result<String, String> {
    Ok(render(&parse_template(template)?, action, target, params))
}

/// Most bytes of standard output, and of standard error, kept from one run
/// of the command effector's program.
pub const OUTPUT_LIMIT: usize = 4096;

/// How long the output of a program that exited is still read, for
/// processes it left behind holding its pipes.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// Which end of an output is kept.
#[derive(Debug, Clone, Copy)]
enum Keep {
    /// The first [`OUTPUT_LIMIT`] bytes (standard output: the answer).
    Head,
    /// The last [`OUTPUT_LIMIT`] bytes (standard error: the final error).
    Tail,
}

/// Output of a program, read to the end, of which at most [`OUTPUT_LIMIT`]
/// bytes are kept.
#[derive(Debug)]
struct Capture {
    keep: Keep,
    buf: Vec<u8>,
    total: usize,
}

impl Capture {
    fn new(keep: Keep) -> Self {
        Capture {
            keep,
            buf: Vec::new(),
            total: 0,
        }
    }

    /// Reads `reader` to its end (or first error), keeping what fits.
    async fn fill<R: AsyncRead + Unpin>(&mut self, reader: Option<R>) {
        let Some(mut reader) = reader else { return };
        let mut chunk = vec![0u8; 8192];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => self.push(&chunk[..n]),
            }
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len();
        match self.keep {
            Keep::Head => {
                let room = OUTPUT_LIMIT.saturating_sub(self.buf.len());
                self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
            Keep::Tail => {
                self.buf.extend_from_slice(bytes);
                if self.buf.len() > OUTPUT_LIMIT {
                    let cut = self.buf.len() - OUTPUT_LIMIT;
                    self.buf.drain(..cut);
                }
            }
        }
    }

    fn truncated(&self) -> bool {
        self.total > self.buf.len()
    }

    /// The kept bytes as text, at most [`OUTPUT_LIMIT`] bytes long, without
    /// the halves of characters cut by the truncation.
    fn text(&self) -> String {
        let mut bytes = &self.buf[..];
        if self.truncated() {
            match self.keep {
                Keep::Head => {
                    if let Err(e) = std::str::from_utf8(bytes) {
                        if e.error_len().is_none() {
                            bytes = &bytes[..e.valid_up_to()];
                        }
                    }
                }
                Keep::Tail => {
                    let skip = bytes
                        .iter()
                        .take(3)
                        .take_while(|b| (**b & 0xC0) == 0x80)
                        .count();
                    bytes = &bytes[skip..];
                }
            }
        }
        let text = String::from_utf8_lossy(bytes);
        if text.len() <= OUTPUT_LIMIT {
            return text.into_owned();
        }
        // Replacement characters of invalid bytes made it longer.
        match self.keep {
            Keep::Head => {
                let mut end = OUTPUT_LIMIT;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text[..end].to_string()
            }
            Keep::Tail => {
                let mut start = text.len() - OUTPUT_LIMIT;
                while !text.is_char_boundary(start) {
                    start += 1;
                }
                text[start..].to_string()
            }
        }
    }
}

/// The signal that ended a process, if one did.
#[cfg(unix)]
fn signal_of(status: &ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.signal()
}

/// The signal that ended a process, if one did.
#[cfg(not(unix))]
fn signal_of(_status: &ExitStatus) -> Option<i32> {
    None
}

/// The last characters of a program's standard error, for a message.
fn stderr_tail(stderr: &str) -> String {
    let trimmed = stderr.trim_end();
    let count = trimmed.chars().count();
    let tail: String = trimmed.chars().skip(count.saturating_sub(500)).collect();
    if tail.is_empty() {
        String::new()
    } else {
        format!("; stderr: {tail}")
    }
}

/// Carries out actions by running a configured program, in the spirit of
/// prometheus-am-executor, but without a shell: the program is started
/// directly with its templated arguments (see [`render_template`]), so
/// values from actions can never inject commands.
///
/// The program's environment is the daemon's plus `MAPEK_ACTION`
/// (`SCALE_UP`), `MAPEK_TARGET` and `MAPEK_PARAMS` (JSON object); rollbacks
/// run the same command for the rollback step's action type and parameters
/// with `MAPEK_ROLLBACK=1` and `MAPEK_APPLIED` (the JSON result of the
/// action undone). Standard input is empty.
///
/// Exit code 0 is success, with the result `{exit_code, stdout, stderr,
/// duration_ms, stdout_truncated, stderr_truncated}` (the first
/// [`OUTPUT_LIMIT`] bytes of standard output, the last of standard error).
/// Exit codes listed in `retry_exit_codes` are transient failures, other
/// ones and deaths by signal rejections. A program still running after the
/// timeout is killed, which is a transient failure; so is a program that
/// cannot be started for lack of resources, while a missing or
/// non-executable program is a rejection. The program is also killed when
/// the call is abandoned (the Executor's own timeout).
#[derive(Debug, Clone)]
pub struct CommandEffector {
    program: String,
    args: Vec<Vec<Piece>>,
    timeout: Duration,
    retry_exit_codes: Vec<i32>,
}

impl CommandEffector {
    /// A command effector from its settings; fails on an empty program or
    /// an invalid argument template.
    pub fn new(settings: &CommandSettings) -> Result<Self, String> {
        if settings.program.trim().is_empty() {
            return Err(
                "effectors.command.program is empty: the command effector has no program to run"
                    .into(),
            );
        }
        let args = settings
            .args
            .iter()
            .enumerate()
            .map(|(n, a)| {
                parse_template(a).map_err(|e| format!("effectors.command.args[{n}]: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CommandEffector {
            program: settings.program.clone(),
            args,
            timeout: Duration::from_secs(settings.timeout_seconds.max(1)),
            retry_exit_codes: settings.retry_exit_codes.clone(),
        })
    }

    /// The program run.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The arguments for an action type, target and parameters.
    pub fn render_args(
        &self,
        action: ActionType,
        target: &str,
        params: &Map<String, Value>,
    ) -> Vec<String> {
        self.args
            .iter()
            .map(|p| render(p, action, target, params))
            .collect()
    }

    /// Runs the program once for `action` on `target`; `applied` is the
    /// result of the action undone for a rollback.
    async fn run(
        &self,
        action: ActionType,
        target: &str,
        params: &Map<String, Value>,
        applied: Option<&Value>,
    ) -> Result<Value, EffectorError> {
        check_target(target)?;
        let program = &self.program;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(self.render_args(action, target, params))
            .env("MAPEK_ACTION", action.as_str())
            .env("MAPEK_TARGET", target)
            .env("MAPEK_PARAMS", Value::Object(params.clone()).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match applied {
            Some(applied) => {
                cmd.env("MAPEK_ROLLBACK", "1")
                    .env("MAPEK_APPLIED", applied.to_string());
            }
            None => {
                cmd.env_remove("MAPEK_ROLLBACK").env_remove("MAPEK_APPLIED");
            }
        }
        let started = std::time::Instant::now();
        let mut child = cmd.spawn().map_err(|e| {
            let msg = format!("cannot run {program:?}: {e}");
            match e.kind() {
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::Interrupted
                | std::io::ErrorKind::OutOfMemory => EffectorError::Transient(msg),
                _ => EffectorError::Rejected(msg),
            }
        })?;
        let mut out = Capture::new(Keep::Head);
        let mut err = Capture::new(Keep::Tail);
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let finished = tokio::time::timeout(self.timeout, async {
            let mut reading =
                std::pin::pin!(futures::future::join(out.fill(stdout), err.fill(stderr)));
            let mut waiting = std::pin::pin!(child.wait());
            let mut read_done = false;
            let status = loop {
                tokio::select! {
                    status = &mut waiting => break status,
                    _ = &mut reading, if !read_done => read_done = true,
                }
            };
            if !read_done {
                // Something the program started may hold its pipes open.
                let _ = tokio::time::timeout(PIPE_GRACE, &mut reading).await;
            }
            status
        })
        .await;
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let status = match finished {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                kill(&mut child).await;
                return Err(EffectorError::Transient(format!(
                    "waiting for {program:?}: {e}"
                )));
            }
            Err(_) => {
                kill(&mut child).await;
                return Err(EffectorError::Transient(format!(
                    "timed out after {} s: {program:?} ({action}) killed{}",
                    self.timeout.as_secs(),
                    stderr_tail(&err.text())
                )));
            }
        };
        let stderr = err.text();
        let result = json!({
            "exit_code": status.code(),
            "stdout": out.text(),
            "stderr": stderr,
            "duration_ms": duration_ms,
            "stdout_truncated": out.truncated(),
            "stderr_truncated": err.truncated(),
        });
        match status.code() {
            Some(0) => Ok(result),
            Some(code) if self.retry_exit_codes.contains(&code) => {
                Err(EffectorError::Transient(format!(
                    "{program:?} ({action}) exited with code {code} (retryable){}",
                    stderr_tail(&stderr)
                )))
            }
            Some(code) => Err(EffectorError::Rejected(format!(
                "{program:?} ({action}) exited with code {code}{}",
                stderr_tail(&stderr)
            ))),
            None => Err(EffectorError::Rejected(format!(
                "{program:?} ({action}) was killed by signal {}{}",
                signal_of(&status).map_or_else(|| "?".to_string(), |s| s.to_string()),
                stderr_tail(&stderr)
            ))),
        }
    }
}

/// Kills a child and reaps it (bounded: a process stuck in the kernel is
/// left to the runtime's reaper).
async fn kill(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
}

/// Component names come from alert labels, so they are refused as program
/// arguments unless they look like a name: no leading `-` (it would read as
/// an option), nothing but ASCII letters, digits and `._:/-`, at most 253
/// characters.
pub fn check_target(target: &str) -> Result<(), EffectorError> {
    let ok = !target.is_empty()
        && target.len() <= 253
        && !target.starts_with('-')
        && target
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-'));
    if ok {
        Ok(())
    } else {
        Err(EffectorError::Rejected(format!(
            "refusing to pass component {target:?} to a program: it must be letters, digits and ._:/- and not start with -"
        )))
    }
}

impl Effector for CommandEffector {
    fn name(&self) -> &str {
        "command"
    }

    fn apply<'a>(
        &'a self,
        action: &'a RemediationAction,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(self.run(action.action_type, &action.target, &action.parameters, None))
    }

    fn rollback<'a>(
        &'a self,
        action: &'a RemediationAction,
        step: &'a RollbackStep,
        applied: &'a Value,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(self.run(
            step.action_type,
            &action.target,
            &step.parameters,
            Some(applied),
        ))
    }
}

/// Carries out actions by POSTing them as JSON to a configured URL:
/// `{"kind": "apply", "action", "rollback": null, "applied": null}`, for a
/// rollback `{"kind": "rollback", "action", "rollback": step, "applied":
/// result of the action}`, and for the pre-flight validation `{"kind":
/// "validate", "policy"}` (an answer `{"valid": false}` refuses the policy).
///
/// 2xx succeeds with the JSON answer (`null` when empty); 5xx, 429,
/// timeouts and connection errors are transient; other statuses (redirects
/// are not followed) reject the action.
#[derive(Debug, Clone)]
pub struct WebhookEffector {
    http: reqwest::Client,
    url: String,
}

impl WebhookEffector {
    /// A webhook effector from its settings; fails on an empty URL or an
    /// invalid header.
    pub fn new(settings: &WebhookSettings) -> Result<Self, String> {
        if settings.url.trim().is_empty() {
            return Err(
                "effectors.webhook.url is empty: the webhook effector has nowhere to send".into(),
            );
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &settings.headers {
            let key = reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
                format!("effectors.webhook.headers.{name}: invalid header name: {e}")
            })?;
            let mut value = reqwest::header::HeaderValue::from_str(value).map_err(|e| {
                format!("effectors.webhook.headers.{name}: invalid header value: {e}")
            })?;
            value.set_sensitive(true);
            headers.insert(key, value);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_seconds.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers)
            .build()
            .map_err(|e| format!("building the webhook client: {e}"))?;
        Ok(WebhookEffector {
            http,
            url: settings.url.clone(),
        })
    }

    /// The URL posted to.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn post(&self, kind: &str, body: Value) -> Result<Value, EffectorError> {
        exchange(
            &format!("webhook {kind}"),
            self.http.post(&self.url).json(&body),
        )
        .await
    }
}

impl Effector for WebhookEffector {
    fn name(&self) -> &str {
        "webhook"
    }

    fn validate<'a>(
        &'a self,
        policy: &'a RemediationPolicy,
    ) -> BoxFuture<'a, Result<(), EffectorError>> {
        Box::pin(async move {
            let answer = self
                .post("validate", json!({"kind": "validate", "policy": policy}))
                .await?;
            if answer.get("valid").and_then(Value::as_bool) == Some(false) {
                return Err(EffectorError::Rejected(format!(
                    "the webhook refused the policy: {answer}"
                )));
            }
            Ok(())
        })
    }

    fn apply<'a>(
        &'a self,
        action: &'a RemediationAction,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(self.post(
            "apply",
            json!({"kind": "apply", "action": action, "rollback": null, "applied": null}),
        ))
    }

    fn rollback<'a>(
        &'a self,
        action: &'a RemediationAction,
        step: &'a RollbackStep,
        applied: &'a Value,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        Box::pin(self.post(
            "rollback",
            json!({"kind": "rollback", "action": action, "rollback": step, "applied": applied}),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_names_that_could_be_options_are_refused() {
        assert!(check_target("charter").is_ok());
        assert!(check_target("ns/charter-0.svc:8080").is_ok());
        for bad in ["--all", "-rf", "a b", "x;y", "", "ä"] {
            assert!(
                matches!(check_target(bad), Err(EffectorError::Rejected(_))),
                "{bad:?}"
            );
        }
    }
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::Instant;

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use mapek_actors::model::{ApprovalStatus, Priority, RiskLevel, RootCause};

    fn action(action_type: ActionType, params: Value) -> RemediationAction {
        RemediationAction {
            id: "a1".into(),
            action_type,
            target: "charter".into(),
            parameters: params.as_object().cloned().unwrap_or_default(),
            priority: Priority::High,
            cost: 0.15,
            depends_on: vec![],
            rollback: Some(RollbackStep {
                action_type: ActionType::ScaleDown,
                parameters: json!({"replicas_delta": 2}).as_object().cloned().unwrap(),
                description: "remove the replicas again".into(),
            }),
        }
    }

    fn policy(actions: Vec<RemediationAction>) -> RemediationPolicy {
        RemediationPolicy {
            id: "pol-1".into(),
            chain_id: "chain-1".into(),
            analysis_id: "ana-1".into(),
            created_at: chrono::Utc::now(),
            root_cause: RootCause::ValidationLatency,
            root_cause_confidence: 0.9,
            actions,
            expected_impact: "faster validation".into(),
            risk_level: RiskLevel::Low,
            priority: Priority::High,
            cost_estimate: 0.15,
            benefit_estimate: 0.8,
            score: 0.65,
            approval_status: ApprovalStatus::Approved,
            decisions: vec![],
            violations_at_planning: 3,
            scope: vec!["charter".into()],
            incident_id: None,
            attempt: 0,
            guards: Vec::new(),
            autonomy: None,
            candidates: Vec::new(),
            shard: None,
        }
    }

    fn command(program: &str, args: &[&str], timeout_seconds: u64) -> CommandEffector {
        CommandEffector::new(&CommandSettings {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout_seconds,
            ..CommandSettings::default()
        })
        .unwrap()
    }

    fn scale_up() -> RemediationAction {
        action(
            ActionType::ScaleUp,
            json!({"replicas_delta": 2, "name": "web one", "flag": true, "gone": null}),
        )
    }

    fn env_lines(result: &Value) -> Vec<String> {
        result["stdout"]
            .as_str()
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Whether a live or zombie process has `marker` among its arguments.
    fn process_with_arg(marker: &str) -> bool {
        std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|arg| arg == marker.as_bytes()))
                .unwrap_or(false)
        })
    }

    #[test]
    fn templates_render_and_check() {
        let p = scale_up().parameters;
        let r = |t: &str| render_template(t, ActionType::ScaleUp, "charter", &p).unwrap();
        assert_eq!(r("{action}"), "SCALE_UP");
        assert_eq!(r("--target={target}"), "--target=charter");
        assert_eq!(r("{param.replicas_delta}"), "2");
        assert_eq!(r("{param.name}"), "web one");
        assert_eq!(r("{param.flag}"), "true");
        assert_eq!(r("[{param.gone}{param.missing}]"), "[]");
        assert_eq!(r("{{literal}} {{{action}}}"), "{literal} {SCALE_UP}");
        let j: Value = serde_json::from_str(&r("{params_json}")).unwrap();
        assert_eq!(j, Value::Object(p.clone()));
        for bad in ["{nope}", "{param.}", "{action", "x}", "{}"] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
        assert!(check_template("{nope}").unwrap_err().contains("{nope}"));
        assert!(check_template("plain ünïcode").is_ok());
    }

    #[tokio::test]
    async fn command_renders_arguments_without_a_shell() {
        let eff = command(
            "/bin/echo",
            &[
                "{action}",
                "{target}",
                "{param.replicas_delta}",
                "$(id) ;|",
                "{param.name}",
            ],
            5,
        );
        let result = eff.apply(&scale_up()).await.unwrap();
        assert_eq!(result["stdout"], "SCALE_UP charter 2 $(id) ;| web one\n");
        assert_eq!(result["exit_code"], 0);
        assert_eq!(result["stderr"], "");
        assert!(result["duration_ms"].as_u64().is_some());
        assert_eq!(eff.name(), "command");
        assert_eq!(eff.validate(&policy(vec![scale_up()])).await, Ok(()));
    }

    #[tokio::test]
    async fn command_environment_carries_the_action() {
        let eff = command("/usr/bin/env", &[], 5);
        let lines = env_lines(&eff.apply(&scale_up()).await.unwrap());
        assert!(
            lines.contains(&"MAPEK_ACTION=SCALE_UP".to_string()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"MAPEK_TARGET=charter".to_string()),
            "{lines:?}"
        );
        let params = lines
            .iter()
            .find_map(|l| l.strip_prefix("MAPEK_PARAMS="))
            .unwrap();
        let params: Value = serde_json::from_str(params).unwrap();
        assert_eq!(params["replicas_delta"], 2);
        assert!(
            !lines.iter().any(|l| l.starts_with("MAPEK_ROLLBACK=")),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn command_rollback_runs_the_step() {
        let eff = command("/usr/bin/env", &[], 5);
        let a = scale_up();
        let step = a.rollback.clone().unwrap();
        let applied = json!({"exit_code": 0, "stdout": "done"});
        let lines = env_lines(&eff.rollback(&a, &step, &applied).await.unwrap());
        for want in [
            "MAPEK_ROLLBACK=1",
            "MAPEK_ACTION=SCALE_DOWN",
            "MAPEK_TARGET=charter",
            "MAPEK_PARAMS={\"replicas_delta\":2}",
        ] {
            assert!(lines.contains(&want.to_string()), "{want} not in {lines:?}");
        }
        let applied_line = lines
            .iter()
            .find_map(|l| l.strip_prefix("MAPEK_APPLIED="))
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(applied_line).unwrap(),
            applied
        );

        let echo = command("/bin/echo", &["{action}", "{param.replicas_delta}"], 5);
        let out = echo.rollback(&a, &step, &applied).await.unwrap();
        assert_eq!(out["stdout"], "SCALE_DOWN 2\n");
    }

    #[tokio::test]
    async fn non_zero_exit_is_rejected_with_code() {
        let err = command("/bin/false", &[], 5)
            .apply(&scale_up())
            .await
            .unwrap_err();
        match &err {
            EffectorError::Rejected(m) => {
                assert!(m.contains("exited with code 1"), "{m}");
                assert!(m.contains("/bin/false"), "{m}");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        // ls exits 2 on a missing file, with the reason on stderr.
        let ls = command("/bin/ls", &["/nonexistent/{param.name}"], 5);
        let err = ls.apply(&scale_up()).await.unwrap_err();
        match &err {
            EffectorError::Rejected(m) => {
                assert!(m.contains("exited with code 2"), "{m}");
                assert!(m.contains("stderr: ") && m.contains("web one"), "{m}");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn retry_exit_codes_are_transient() {
        let eff = CommandEffector::new(&CommandSettings {
            program: "/bin/ls".into(),
            args: vec!["/nonexistent".into()],
            timeout_seconds: 5,
            retry_exit_codes: vec![75, 2],
        })
        .unwrap();
        let err = eff.apply(&scale_up()).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("code 2 (retryable)"), "{err}");
    }

    #[tokio::test]
    async fn timeout_kills_the_program() {
        let eff = command("/bin/sleep", &["5.0417"], 1);
        let started = Instant::now();
        let err = eff.apply(&scale_up()).await.unwrap_err();
        let took = started.elapsed();
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("timed out after 1 s"), "{err}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "{took:?}"
        );
        assert!(!process_with_arg("5.0417"), "sleep still running");
    }

    #[tokio::test]
    async fn abandoned_call_kills_the_program() {
        let eff = command("/bin/sleep", &["6.0311"], 30);
        let a = scale_up();
        let mut call = eff.apply(&a);
        let seen = tokio::select! {
            r = &mut call => panic!("sleep ended early: {r:?}"),
            seen = async {
                for _ in 0..60 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if process_with_arg("6.0311") {
                        return true;
                    }
                }
                false
            } => seen,
        };
        assert!(seen, "the program never ran");
        drop(call);
        let gone = async {
            while process_with_arg("6.0311") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(3), gone)
            .await
            .expect("sleep survived the abandoned call");
    }

    #[tokio::test]
    async fn missing_program_is_rejected_by_name() {
        let err = command("/nonexistent/mapek-remedy", &[], 5)
            .apply(&scale_up())
            .await
            .unwrap_err();
        match &err {
            EffectorError::Rejected(m) => assert!(m.contains("/nonexistent/mapek-remedy"), "{m}"),
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn output_is_truncated_to_the_limit() {
        let big = "é".repeat(5000) + "END";
        let a = action(ActionType::ScaleUp, json!({ "big": big }));
        let result = command("/bin/echo", &["{param.big}"], 5)
            .apply(&a)
            .await
            .unwrap();
        let stdout = result["stdout"].as_str().unwrap();
        assert!(
            stdout.len() <= OUTPUT_LIMIT && stdout.len() > OUTPUT_LIMIT - 4,
            "{}",
            stdout.len()
        );
        assert!(stdout.starts_with("éé") && !stdout.contains('\u{FFFD}'));
        assert_eq!(result["stdout_truncated"], true);
        assert_eq!(result["stderr_truncated"], false);

        // stderr keeps its end: ls names the too-long path, then says why.
        let long = "x/".repeat(3000);
        let a = action(ActionType::ScaleUp, json!({ "p": long }));
        let eff = CommandEffector::new(&CommandSettings {
            program: "/bin/ls".into(),
            args: vec!["{param.p}".into()],
            retry_exit_codes: vec![2],
            ..CommandSettings::default()
        })
        .unwrap();
        let err = eff.apply(&a).await.unwrap_err().to_string();
        assert!(err.contains("File name too long"), "{err}");
        let mut c = Capture::new(Keep::Tail);
        c.push(&vec![b'a'; 10_000]);
        c.push(b"the end");
        assert!(c.truncated());
        assert_eq!(c.text().len(), OUTPUT_LIMIT);
        assert!(c.text().ends_with("athe end"));
    }

    #[test]
    fn command_settings_are_checked() {
        assert!(CommandEffector::new(&CommandSettings::default()).is_err());
        let err = CommandEffector::new(&CommandSettings {
            program: "/bin/echo".into(),
            args: vec!["ok".into(), "{bad}".into()],
            ..CommandSettings::default()
        })
        .unwrap_err();
        assert!(err.contains("args[1]"), "{err}");
    }

    /// A webhook receiver on loopback: records each request body and the
    /// `x-token` header, answers with the scripted statuses and bodies
    /// (then 200 `{}`), sleeping first when the path is `/slow`.
    #[derive(Clone, Default)]
    struct Receiver {
        bodies: Arc<Mutex<Vec<Value>>>,
        tokens: Arc<Mutex<Vec<String>>>,
        script: Arc<Mutex<VecDeque<(u16, String)>>>,
    }

    async fn receive(
        State(r): State<Receiver>,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, String) {
        r.bodies
            .lock()
            .unwrap()
            .push(serde_json::from_str(&body).unwrap_or(Value::Null));
        let token = headers
            .get("x-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        r.tokens.lock().unwrap().push(token.to_string());
        let (status, body) = r
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or((200, "{}".into()));
        (StatusCode::from_u16(status).unwrap(), body)
    }

    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_secs(5)).await;
        "{}"
    }

    async fn receiver(script: &[(u16, &str)]) -> (Receiver, SocketAddr) {
        let r = Receiver::default();
        r.script
            .lock()
            .unwrap()
            .extend(script.iter().map(|(s, b)| (*s, b.to_string())));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .route("/slow", axum::routing::post(slow))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, addr)
    }

    fn webhook(url: String, timeout_seconds: u64) -> WebhookEffector {
        WebhookEffector::new(&WebhookSettings {
            url,
            headers: [("X-Token".to_string(), "s3cret".to_string())]
                .into_iter()
                .collect(),
            timeout_seconds,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn webhook_posts_the_action_and_classifies_statuses() {
        let (r, addr) = receiver(&[
            (200, r#"{"ok": true}"#),
            (204, ""),
            (503, "busy"),
            (429, "{}"),
            (400, r#"{"error": "no such target"}"#),
            (404, ""),
            (302, ""),
        ])
        .await;
        let eff = webhook(format!("http://{addr}/hook"), 5);
        assert_eq!(eff.name(), "webhook");
        let a = scale_up();
        assert_eq!(eff.apply(&a).await.unwrap(), json!({"ok": true}));
        assert_eq!(eff.apply(&a).await.unwrap(), Value::Null);
        let e = eff.apply(&a).await.unwrap_err();
        assert!(e.is_transient() && e.to_string().contains("503"), "{e}");
        assert!(eff.apply(&a).await.unwrap_err().is_transient());
        let e = eff.apply(&a).await.unwrap_err();
        assert!(
            matches!(&e, EffectorError::Rejected(m) if m.contains("400") && m.contains("no such target")),
            "{e:?}"
        );
        assert!(matches!(
            eff.apply(&a).await.unwrap_err(),
            EffectorError::Rejected(_)
        ));
        assert!(matches!(
            eff.apply(&a).await.unwrap_err(),
            EffectorError::Rejected(_)
        ));

        let bodies = r.bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 7);
        let b = &bodies[0];
        assert_eq!(b["kind"], "apply");
        assert_eq!(b["action"], serde_json::to_value(&a).unwrap());
        assert_eq!(b["action"]["action_type"], "SCALE_UP");
        assert_eq!(b["rollback"], Value::Null);
        assert_eq!(b["applied"], Value::Null);
        assert!(r.tokens.lock().unwrap().iter().all(|t| t == "s3cret"));
    }

    #[tokio::test]
    async fn webhook_rollback_and_validate_bodies() {
        let (r, addr) = receiver(&[
            (200, r#"{"undone": 1}"#),
            (200, r#"{"valid": true}"#),
            (200, r#"{"valid": false, "why": "no"}"#),
        ])
        .await;
        let eff = webhook(format!("http://{addr}/hook"), 5);
        let a = scale_up();
        let step = a.rollback.clone().unwrap();
        let applied = json!({"replicas": 5});
        assert_eq!(
            eff.rollback(&a, &step, &applied).await.unwrap(),
            json!({"undone": 1})
        );
        let p = policy(vec![a.clone()]);
        assert_eq!(eff.validate(&p).await, Ok(()));
        let e = eff.validate(&p).await.unwrap_err();
        assert!(
            matches!(&e, EffectorError::Rejected(m) if m.contains("refused")),
            "{e:?}"
        );

        let bodies = r.bodies.lock().unwrap().clone();
        assert_eq!(bodies[0]["kind"], "rollback");
        assert_eq!(bodies[0]["action"]["id"], "a1");
        assert_eq!(bodies[0]["rollback"], serde_json::to_value(&step).unwrap());
        assert_eq!(bodies[0]["applied"], applied);
        assert_eq!(bodies[1]["kind"], "validate");
        assert_eq!(bodies[1]["policy"], serde_json::to_value(&p).unwrap());
        assert_eq!(bodies[1].as_object().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn webhook_connection_errors_and_timeouts_are_transient() {
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let e = webhook(format!("http://{closed}/hook?token=abc"), 5)
            .apply(&scale_up())
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        assert!(!e.to_string().contains("token=abc"), "{e}");

        let (_r, addr) = receiver(&[]).await;
        let started = Instant::now();
        let e = webhook(format!("http://{addr}/slow"), 1)
            .apply(&scale_up())
            .await
            .unwrap_err();
        assert!(
            e.is_transient() && e.to_string().contains("timed out"),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn webhook_settings_are_checked() {
        assert!(WebhookEffector::new(&WebhookSettings::default()).is_err());
        let err = WebhookEffector::new(&WebhookSettings {
            url: "http://127.0.0.1:1/".into(),
            headers: [("bad header".to_string(), "x".to_string())]
                .into_iter()
                .collect(),
            timeout_seconds: 1,
        })
        .unwrap_err();
        assert!(err.contains("headers.bad header"), "{err}");
    }

    #[test]
    fn router_follows_the_config() {
        let mut cfg = Config::default();
        let names = |cfg: &Config| -> Vec<(ActionType, Option<String>)> {
            let router = build_router(cfg).unwrap();
            ActionType::ALL
                .into_iter()
                .map(|a| (a, router.get(a).map(|e| e.name().to_string())))
                .collect()
        };
        assert!(names(&cfg)
            .iter()
            .all(|(_, n)| n.as_deref() == Some("charter")));

        cfg.effectors.command.program = "/bin/echo".into();
        cfg.effectors.webhook.url = "http://127.0.0.1:9/hook".into();
        cfg.effectors
            .routes
            .insert(ActionType::RestartService, EffectorKind::Command);
        cfg.effectors
            .routes
            .insert(ActionType::Failover, EffectorKind::Webhook);
        cfg.effectors
            .routes
            .insert(ActionType::BypassValidation, EffectorKind::None);
        for (a, name) in names(&cfg) {
            let want = match a {
                ActionType::RestartService => Some("command"),
                ActionType::Failover => Some("webhook"),
                ActionType::BypassValidation => None,
                _ => Some("charter"),
            };
            assert_eq!(name.as_deref(), want, "{a}");
        }

        cfg.effectors.default = EffectorKind::None;
        let routed: Vec<_> = names(&cfg)
            .into_iter()
            .filter(|(_, n)| n.is_some())
            .collect();
        assert_eq!(
            routed,
            vec![
                (ActionType::RestartService, Some("command".to_string())),
                (ActionType::Failover, Some("webhook".to_string())),
            ]
        );

        // An effector in use without its settings cannot be built.
        cfg.effectors.command.program.clear();
        match build_router(&cfg) {
            Err(e) => assert!(e.contains("effectors.command.program"), "{e}"),
            Ok(_) => panic!("built a command effector without a program"),
        }
        // ... but one not in use need not be configured.
        cfg.effectors.routes.remove(&ActionType::RestartService);
        assert!(build_router(&cfg).is_ok());
    }

    #[tokio::test]
    async fn a_retried_scale_with_the_same_key_scales_once() {
        let sim = crate::sim::Simulator::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::sim::serve(
            listener,
            sim.clone(),
            None,
            std::future::pending(),
        ));
        let client =
            CharterClient::new(&format!("http://{addr}"), "", Duration::from_secs(5)).unwrap();
        let eff = CharterEffector::new(client);
        let action = |key: &str| RemediationAction {
            id: "a1".into(),
            action_type: ActionType::ScaleUp,
            target: "charter".into(),
            parameters: serde_json::from_value(
                json!({"replicas_delta": 2, "idempotency_key": key}),
            )
            .unwrap(),
            priority: mapek_actors::model::Priority::High,
            cost: 0.15,
            depends_on: Vec::new(),
            rollback: None,
        };
        let first = eff.apply(&action("exe-1/a1")).await.unwrap();
        assert_eq!(
            (
                first["previous_replicas"].as_u64(),
                first["replicas"].as_u64()
            ),
            (Some(3), Some(5))
        );
        // The retry of the same action (its first attempt may have timed
        // out after succeeding) sets the same count again.
        let retry = eff.apply(&action("exe-1/a1")).await.unwrap();
        assert_eq!(retry["replicas"].as_u64(), Some(5));
        assert_eq!(sim.state()["replicas"], json!(5));
        // Another execution scales from where the system is now.
        let next = eff.apply(&action("exe-2/a1")).await.unwrap();
        assert_eq!(next["replicas"].as_u64(), Some(7));
    }

    /// Every request the Charter effector sends names the action's target:
    /// with two components, each action and each rollback lands on the
    /// target only.
    #[tokio::test]
    async fn charter_requests_name_the_target_component() {
        let sim = crate::sim::Simulator::with_components(&["charter", "gateway"]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::sim::serve(
            listener,
            sim.clone(),
            None,
            std::future::pending(),
        ));
        let client =
            CharterClient::new(&format!("http://{addr}"), "", Duration::from_secs(5)).unwrap();
        let eff = CharterEffector::new(client);
        let on_gateway = |action_type, params: Value| RemediationAction {
            target: "gateway".into(),
            ..action(action_type, params)
        };

        // Scale up, then its rollback.
        let scale = on_gateway(
            ActionType::ScaleUp,
            json!({"replicas_delta": 2, "idempotency_key": "exe-1/a1"}),
        );
        let applied = eff.apply(&scale).await.unwrap();
        assert_eq!(applied["previous_replicas"], json!(3));
        let st = sim.state();
        assert_eq!(st["components"]["gateway"]["replicas"], json!(5));
        assert_eq!(st["components"]["charter"]["replicas"], json!(3));
        let step = scale.rollback.clone().unwrap();
        eff.rollback(&scale, &step, &applied).await.unwrap();
        assert_eq!(sim.state()["components"]["gateway"]["replicas"], json!(3));

        // A corrected policy and its rollback: the policy id exists on the
        // gateway only, so a rollback sent elsewhere would be refused.
        let apply = on_gateway(
            ActionType::ApplyPolicy,
            json!({"policy": "last_known_good"}),
        );
        let applied = eff.apply(&apply).await.unwrap();
        let id = applied["id"].as_str().unwrap().to_string();
        assert_eq!(
            sim.state()["components"]["gateway"]["active_policy"],
            json!(id)
        );
        let undo = RollbackStep {
            action_type: ActionType::ApplyPolicy,
            parameters: Map::new(),
            description: "restore the previous policy".into(),
        };
        eff.rollback(&apply, &undo, &applied).await.unwrap();
        assert_eq!(
            sim.state()["components"]["gateway"]["active_policy"],
            json!("pol-0002")
        );

        // Every other action type, then a policy on one target.
        for (t, p) in [
            (ActionType::RestartService, json!({})),
            (ActionType::ThrottleRequests, json!({"rate_limit": 500})),
            (
                ActionType::ActivateEmergencyOverride,
                json!({"duration_seconds": 60}),
            ),
            (
                ActionType::BypassValidation,
                json!({"duration_seconds": 60}),
            ),
            (ActionType::RebalanceLoad, json!({})),
            (
                ActionType::UpdateConfiguration,
                json!({"worker_pool_size": 32}),
            ),
            (
                ActionType::Failover,
                json!({"mode": "standby", "component": "charter"}),
            ),
        ] {
            eff.apply(&on_gateway(t, p)).await.unwrap();
        }
        eff.validate(&policy(vec![on_gateway(ActionType::ScaleUp, json!({}))]))
            .await
            .unwrap();
        let st = sim.state();
        assert_eq!(
            st["components"]["gateway"]["throttle_rate_limit"],
            json!(500.0)
        );
        assert_eq!(st["components"]["gateway"]["failed_over"], json!(true));
        assert_eq!(st["throttle_rate_limit"], Value::Null, "charter untouched");
        assert_eq!(
            st["failed_over"],
            json!(false),
            "the target wins over a parameter"
        );

        let calls = sim.calls();
        assert_eq!(calls.len(), 13, "{calls:#?}");
        for c in &calls {
            assert_eq!(c.status, 200, "{c:?}");
            assert_eq!(c.component.as_deref(), Some("gateway"), "{c:?}");
            if c.method == "POST" {
                assert_eq!(c.body["component"], json!("gateway"), "{c:?}");
            }
        }
        assert!(calls
            .iter()
            .any(|c| c.method == "GET" && c.path == "/api/v1/committee/state"));

        // A policy over several targets names none (the default component).
        let mixed = policy(vec![
            on_gateway(ActionType::ScaleUp, json!({})),
            action(ActionType::ScaleUp, json!({})),
        ]);
        eff.validate(&mixed).await.unwrap();
        let last = sim.calls().pop().unwrap();
        assert_eq!(last.path, "/api/v1/policies/validate");
        assert!(last.body.get("component").is_none(), "{last:?}");
        assert_eq!(last.component.as_deref(), Some("charter"));
    }
}
