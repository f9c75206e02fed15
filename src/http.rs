//! The daemon's HTTP surface on one port: health, readiness, metrics, the
//! Alertmanager webhook and the JSON API (see `docs/API.md`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mapek_actors::messages::{
    DecidePolicy, DecisionError, GetActiveViolations, GetIncident, GetIncidents, GetSources,
    GetViolations, Observe, SourceStatus,
};
use mapek_actors::model::{ApprovalStatus, IncidentState, RootCause};
use mapek_actors::supervisor::LoopHandle;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::alertmanager;

mod conns;
pub mod forward;
pub mod pages;

pub use conns::{Connections, HttpMetrics, ShedLabels, ShedReason};

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The running loop.
    pub handle: LoopHandle,
    /// Metrics registry served on `/metrics`.
    pub registry: Arc<Registry>,
    /// Whether at least one source must give evidence for `/ready`.
    pub sources_required: bool,
    /// Accepted bearer tokens with their callers' names (`api.tokens`,
    /// and `api.token` as `token`); none: the API is open.
    pub tokens: Vec<(String, String)>,
    /// Longest time a request may take to produce its response head
    /// (`api.request_timeout_seconds`).
    pub request_timeout: std::time::Duration,
    /// Metrics of the HTTP server (registered in `registry`).
    pub http_metrics: Arc<HttpMetrics>,
    /// The webhook's state and the effectors' cached reachability, for
    /// `/ready`.
    pub readiness: Arc<crate::readiness::Readiness>,
    /// Leadership: the etcd cluster in cluster mode, else a single
    /// process that leads ([`mapek_actors::leadership::Solo`]).
    pub leadership: Arc<dyn mapek_actors::leadership::Leadership>,
}

/// The routes. The webhook (when `webhook_path` is given, i.e.
/// `alertmanager.enabled`) answers on that path and on the seeds'
/// `/webhooks/alerts`.
pub fn router(state: ApiState, webhook_path: Option<&str>, max_body_bytes: usize) -> Router {
    let open = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics));
    let mut r = Router::new()
        .route("/api/v1/state", get(loop_state))
        .route("/api/v1/violations", get(violations))
        .route("/api/v1/analyses", get(analyses))
        .route("/api/v1/incidents", get(incidents))
        .route("/api/v1/incidents/{id}", get(incident))
        .route("/api/v1/policies", get(policies))
        .route("/api/v1/policies/{id}", get(policy))
        .route("/api/v1/policies/{id}/approve", post(approve))
        .route("/api/v1/policies/{id}/reject", post(reject))
        .route("/api/v1/executions", get(executions))
        .route("/api/v1/outcomes", get(outcomes))
        .route("/api/v1/knowledge/patterns", get(patterns))
        .route("/api/v1/knowledge/insights", get(insights))
        .route("/api/v1/knowledge/best-action", get(best_action))
        .route("/api/v1/knowledge/learning", get(learning))
        .route("/api/v1/knowledge/integrity", get(integrity))
        .route("/api/v1/pause", post(pause))
        .route("/api/v1/resume", post(resume))
        .route("/api/v1/components/{name}/clear", post(clear_component))
        .route("/api/v1/components/{name}/silence", post(silence_component))
        .route("/api/v1/safety", get(safety))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/shadow/report", get(shadow_report));
    if let Some(path) = webhook_path {
        r = r.route("/webhooks/alerts", post(webhook));
        if path != "/webhooks/alerts" {
            r = r.route(path, post(webhook));
        }
    }
    // Bodies must be JSON; the token is checked first (the outer layer);
    // then, in cluster mode, a mutating call goes to its shard's leader.
    let r = r
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forward::to_leader,
        ))
        .route_layer(axum::middleware::from_fn(require_json))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    let deadline = Deadline {
        limit: state.request_timeout,
        timed_out: state.http_metrics.requests_timed_out.clone(),
    };
    let app = open
        .merge(r)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .with_state(state)
        // Every error is JSON, whoever made it (axum's extractors answer
        // bad queries, paths and bodies in plain text).
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn(limit_uri));
    with_deadline(app, deadline)
}

/// Longest request target (path and query) accepted, bytes; a longer one
/// is answered `414` with a JSON error. (hyper itself answers `414` with an
/// empty body, before any handler, for targets of 64 KiB and more.)
pub const MAX_URI_BYTES: usize = 8 * 1024;

async fn limit_uri(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if len > MAX_URI_BYTES {
        return error(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {len} bytes long; at most {MAX_URI_BYTES} are accepted"),
        );
    }
    next.run(req).await
}

/// Turns an error answer that is not JSON (axum's rejections: a bad query
/// string, a path segment that is not UTF-8, a body over the size limit)
/// into the API's JSON error, keeping its status and headers.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let msg = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = error(status, msg);
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().append(k.clone(), v.clone());
        }
    }
    out
}

/// The cap on request time.
#[derive(Debug, Clone)]
struct Deadline {
    limit: std::time::Duration,
    timed_out: prometheus_client::metrics::counter::Counter,
}

/// Wraps `app` so that a request whose response head takes longer than
/// the deadline is answered `503` with a JSON error (and counted); its
/// handler is dropped. A streamed body, once its head is sent, is not cut.
fn with_deadline(app: Router, deadline: Deadline) -> Router {
    app.layer(axum::middleware::from_fn_with_state(
        deadline,
        run_with_deadline,
    ))
}

async fn run_with_deadline(
    State(d): State<Deadline>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(d.limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            d.timed_out.inc();
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the request took longer than {} s (api.request_timeout_seconds)",
                    d.limit.as_secs_f64()
                ),
            )
        }
    }
}

/// A client must send a whole request head within this time, or its
/// connection is closed (a client that sends half a header and waits
/// holds a socket for at most this long).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest wait, at shutdown, for requests in flight.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` resolves: HTTP/1 and 2,
/// with a [`HEADER_READ_TIMEOUT`] on every request head and at most
/// [`ServeOptions::max_connections`] connections (see [`Connections`] for
/// which one goes at the cap); an accept error
/// (such as running out of file descriptors) is logged and retried after a
/// short pause, never fatal; at shutdown, requests in flight get
/// [`DRAIN_TIMEOUT`] to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use tower::ServiceExt;
    let conns = Connections::new(
        options.max_connections,
        options.overdue_after,
        options.metrics,
    );
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    let mut accept_errors = 0u64;
    loop {
        let stream = tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_errors += 1;
                    if accept_errors.is_power_of_two() {
                        tracing::warn!(error = %e, count = accept_errors, "cannot accept a connection; retrying");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // At the cap, another connection is closed to admit this one, or
        // this one is refused (closed at once).
        let Some(admitted) = conns.admit() else {
            drop(stream);
            continue;
        };
        let id = admitted.guard.id();
        let service = {
            let (conns, router) = (conns.clone(), router.clone());
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                // hyper calls the service once a whole request head is in.
                let in_flight = conns.request_started(id);
                let call = router.clone().oneshot(req);
                async move {
                    let resp = match call.await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    };
                    Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked {
                        inner: body,
                        in_flight: Some(in_flight),
                    }))
                }
            })
        };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let conns::Admitted { guard, close } = admitted;
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                _ = close => tracing::debug!("connection closed to admit another (api.max_connections)"),
            }
            drop(guard);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the drain timeout; closing");
    }
    Ok(())
}

/// Limits of [`serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Most connections open at once (`api.max_connections`).
    pub max_connections: usize,
    /// At the cap, a connection busy with a request (its response being
    /// written) for longer than this may be closed to admit a new one:
    /// twice `api.request_timeout_seconds`.
    pub overdue_after: std::time::Duration,
    /// Where connections and shed connections are counted.
    pub metrics: Arc<HttpMetrics>,
}

/// A response body that keeps its connection marked busy until it is
/// written out (or dropped).
struct Tracked {
    inner: axum::body::Body,
    in_flight: Option<conns::InFlight>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None)) || this.inner.is_end_stream() {
            this.in_flight = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises this process's soft limit of open files to its hard limit (as Go
/// programs do), so that many connections at once (or stalled ones) do not
/// exhaust the default of 1024. Returns the limit in force.
pub fn raise_fd_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            None
        }
    }
}

/// Binds the listen address, with a message naming it on failure.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// How long the webhook waits for room in the Monitor's mailbox before
/// answering 503 (Alertmanager then re-sends; delivery goes on meanwhile and
/// re-sent alerts count once).
const WEBHOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a read endpoint waits for an actor's answer.
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks the Monitor, with a timeout: an actor that cannot answer is reported
/// as unavailable instead of holding the request.
async fn ask<M>(s: &ApiState, msg: M) -> Result<M::Result, String>
where
    M: actix::Message + mapek_actors::mailbox::Named + Send + 'static,
    M::Result: Send,
    mapek_actors::monitor::Monitor: actix::Handler<M>,
{
    match tokio::time::timeout(ASK_TIMEOUT, s.handle.monitor.send(msg)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "monitor did not answer within {} s",
            ASK_TIMEOUT.as_secs()
        )),
    }
}

/// Runs a knowledge-store read off the async workers (sled reads block).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, mapek_actors::store::StoreError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("knowledge read failed: {e}")),
    }
}

/// Refuses requests without the configured bearer token (401). The
/// comparison takes the same time wherever the tokens differ.
async fn require_token(
    State(s): State<ApiState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut req = req;
    if !s.tokens.is_empty() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("")
            .to_string();
        // Every token is compared (no early exit): the time does not say
        // which one matched.
        let mut caller: Option<&str> = None;
        for (name, expected) in &s.tokens {
            if same_token(&given, expected) {
                caller = Some(name);
            }
        }
        if let Some(name) = caller {
            req.extensions_mut().insert(Caller(name.to_string()));
        } else {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (see api.token and api.tokens)",
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
    }
    next.run(req).await
}

/// The authenticated caller: the name of its token.
#[derive(Debug, Clone)]
struct Caller(String);

/// Who decided: the authenticated caller's token name; without tokens,
/// the `by` the caller gave (or `operator`). With a token, a different
/// `by` given in the body is kept as a comment in the reason.
fn decider(
    caller: Option<&axum::Extension<Caller>>,
    by: Option<String>,
    reason: Option<String>,
) -> (String, Option<String>) {
    match caller {
        Some(c) => {
            let name = c.0 .0.clone();
            let reason = match by.filter(|b| b != &name) {
                Some(b) => Some(match reason {
                    Some(r) => format!("{r} (by {b:?}, as given)"),
                    None => format!("(by {b:?}, as given)"),
                }),
                None => reason,
            };
            (name, reason)
        }
        None => (by.unwrap_or_else(|| "operator".into()), reason),
    }
}

/// The token of an `Authorization` value with the bearer scheme, which is
/// case-insensitive (RFC 7235: `Bearer`, `bearer`, `BEARER`).
fn bearer_token(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares tokens in constant time, whatever their lengths: their SHA-256
/// digests (fixed length) are compared with `subtle`.
fn same_token(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.as_slice().ct_eq(b.as_slice()).into()
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

async fn health(State(s): State<ApiState>) -> Response {
    if s.handle.supervisor.connected() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "supervisor stopped")
    }
}

async fn ready(State(s): State<ApiState>) -> Response {
    let mut reasons = Vec::new();
    let mut phases = serde_json::Map::new();
    for (kind, up) in s.handle.phases_up() {
        phases.insert(kind.as_str().into(), json!(if up { "up" } else { "down" }));
        if !up {
            reasons.push(format!("actor {kind} is down"));
        }
    }
    let store_open = s.handle.store.is_open();
    if !store_open {
        reasons.push("knowledge store is closed".into());
    }
    // A healthy standby is ready (it ingests and keeps its analysis warm);
    // a replica that cannot reach etcd is not.
    let view = s.leadership.view();
    if let Some(e) = view.etcd_error.as_ref().filter(|_| view.clustered) {
        reasons.push(format!("etcd unreachable: {e}"));
    }
    let sources = ask(&s, GetSources).await.unwrap_or_default();
    let any_evidence = sources.iter().any(|h| h.status == SourceStatus::Up);
    if s.sources_required && !sources.is_empty() && !any_evidence {
        reasons.push("no metric source gives evidence".into());
    }
    // Ready stays 200 while the webhook can still deliver evidence, but the
    // body says which source can act, and why each other one cannot.
    let mut can_act: serde_json::Map<String, Value> = sources
        .iter()
        .map(|h| (h.name.clone(), json!(h.status == SourceStatus::Up)))
        .collect();
    if s.readiness.webhook_enabled() {
        can_act.insert(crate::readiness::WEBHOOK.into(), json!(true));
    }
    let degraded: Vec<Value> = sources
        .iter()
        .filter(|h| h.status != SourceStatus::Up)
        .map(|h| {
            json!({
                "source": h.name,
                "status": h.status,
                "reason": h.last_error.clone().unwrap_or_else(|| match h.status {
                    SourceStatus::Unknown => "not polled yet".into(),
                    _ => "no evidence".into(),
                }),
            })
        })
        .collect();
    let mut body = json!({
        "ready": reasons.is_empty(),
        "reasons": reasons,
        "can_act": can_act,
        "degraded": degraded,
        "phases": phases,
        "knowledge_store": if store_open { "open" } else { "closed" },
        "sources": sources,
        // Cached by the background probe: never waits on the network,
        // never makes /ready fail.
        "effectors": s.readiness.effectors(),
    });
    if view.clustered {
        body["cluster"] = cluster_json(&view);
    }
    let code = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// The cluster as the API shows it (`GET /api/v1/cluster`, and the
/// `cluster` of `/ready`).
fn cluster_json(v: &mapek_actors::leadership::LeadershipView) -> Value {
    let shards: serde_json::Map<String, Value> = v
        .leaders
        .iter()
        .map(|(s, l)| (s.to_string(), json!(l)))
        .collect();
    json!({
        "name": v.name,
        "clustered": v.clustered,
        "leading": v.leading_any(),
        "leading_shards": v.leading,
        "leader": v.leader_of(0),
        "members": v.members,
        "shards": shards,
        "etcd": match &v.etcd_error {
            None => "reachable".to_string(),
            Some(e) => format!("unreachable: {e}"),
        },
    })
}

async fn cluster(State(s): State<ApiState>) -> Response {
    Json(cluster_json(&s.leadership.view())).into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn loop_state(State(s): State<ApiState>) -> Response {
    let state = s.handle.state.snapshot();
    let sources = ask(&s, GetSources).await.unwrap_or_default();
    let depths: serde_json::Map<String, Value> = [
        ("monitor", s.handle.monitor.depth()),
        ("analyzer", s.handle.analyzer.depth()),
        ("planner", s.handle.planner.depth()),
        ("executor", s.handle.executor.depth()),
        ("knowledge", s.handle.knowledge.depth()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), json!(v)))
    .collect();
    Json(json!({
        "paused": state.paused,
        "pause": state.pause,
        "mode": state.mode,
        "state": state,
        "sources": sources,
        "mailbox_depth": depths,
    }))
    .into_response()
}

async fn violations(State(s): State<ApiState>) -> Response {
    match ask(&s, GetActiveViolations).await {
        Ok(v) => Json(json!({"violations": v})).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn store_result<T: serde::Serialize>(key: &str, r: Result<T, String>) -> Response {
    match r {
        Ok(v) => Json(json!({ key: v })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `?limit=N&cursor=C` of the paginated lists (and `status` of policies).
#[derive(Debug, Deserialize)]
struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    status: Option<String>,
}

type PageParams = Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>;

/// One page of a store list (see [`pages`]); `extra` is the query kept in
/// the `Link` to the next page (such as `status=pending&`).
async fn page(s: &ApiState, listing: pages::Listing, q: PageQuery, extra: &str) -> Response {
    let cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match pages::parse_cursor(c) {
            Some(k) => Some(k),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("bad cursor `{c}`: pass the `next` of the previous page"),
                )
            }
        },
    };
    let limit = q
        .limit
        .unwrap_or(pages::DEFAULT_PAGE_ROWS)
        .clamp(1, pages::MAX_PAGE_ROWS);
    pages::respond(
        s.handle.store.clone(),
        listing,
        limit,
        cursor,
        format!("{extra}limit={limit}&"),
    )
    .await
}

fn page_query(q: PageParams) -> Result<PageQuery, String> {
    q.map(|Query(q)| q)
        .map_err(|e| format!("bad query: {}", e.body_text()))
}

async fn analyses(State(s): State<ApiState>, q: PageParams) -> Response {
    match page_query(q) {
        Ok(q) => page(&s, pages::Listing::Analyses, q, "").await,
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

#[derive(Debug, Deserialize)]
struct IncidentQuery {
    state: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn incidents(
    State(s): State<ApiState>,
    q: Result<Query<IncidentQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad query: {}", e.body_text()),
            )
        }
    };
    let after = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match c.split_once(':').and_then(|(ms, id)| {
            Some((ms.parse::<i64>().ok()?, id.to_string())).filter(|(_, id)| !id.is_empty())
        }) {
            Some(k) => Some(k),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("bad cursor `{c}`: pass the `next` of the previous page"),
                )
            }
        },
    };
    let state = match q.state.as_deref() {
        None | Some("") | Some("all") => None,
        Some(x) => match IncidentState::parse(x) {
            Some(st) => Some(st),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown state `{x}` (expected open, pending, queued, acting, verifying, \
                         cooling_down, escalated, no_evidence, closed or all)"
                    ),
                )
            }
        },
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    match s
        .handle
        .planner
        .send(GetIncidents {
            state,
            limit,
            after,
        })
        .await
    {
        Ok(page) => Json(page).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn incident(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let found = match s.handle.planner.send(GetIncident { id: id.clone() }).await {
        Ok(Some(i)) => i,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no incident `{id}`")),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let (st, pids, eids) = (
        s.handle.store.clone(),
        found.policies.clone(),
        found.executions.clone(),
    );
    let records = blocking(move || {
        let mut policies = Vec::new();
        for p in &pids {
            if let Some(p) = st.get_policy(p)? {
                policies.push(p);
            }
        }
        let mut executions = Vec::new();
        for e in &eids {
            if let Some(e) = st.get_execution(e)? {
                executions.push(e);
            }
        }
        Ok((policies, executions))
    })
    .await;
    let (policies, executions) = match records {
        Ok(r) => r,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let violations = s
        .handle
        .monitor
        .send(GetViolations {
            fingerprints: found.fingerprints.clone(),
        })
        .await
        .unwrap_or_default();
    Json(serde_json::json!({
        "incident": found,
        "violations": violations,
        "policies": policies,
        "executions": executions,
    }))
    .into_response()
}

async fn policies(State(s): State<ApiState>, q: PageParams) -> Response {
    let q = match page_query(q) {
        Ok(q) => q,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let status = match q.status.as_deref() {
        None | Some("") | Some("all") => None,
        Some(x) => match ApprovalStatus::parse(x) {
            Some(st) => Some(st),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown status `{x}` (expected pending, approved, rejected or all)"),
                )
            }
        },
    };
    let extra = status.map_or(String::new(), |st| format!("status={}&", st.as_str()));
    page(&s, pages::Listing::Policies(status), q, &extra).await
}

async fn policy(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let (st, key) = (s.handle.store.clone(), id.clone());
    match blocking(move || st.get_policy(&key)).await {
        Ok(Some(p)) => Json(p).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no policy `{id}`")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Optional body of approve/reject.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    by: Option<String>,
    reason: Option<String>,
}

async fn decide(
    s: ApiState,
    caller: Option<axum::Extension<Caller>>,
    id: String,
    decision: ApprovalStatus,
    body: Bytes,
) -> Response {
    let d: Decision = if body.is_empty() {
        Decision::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(d) => d,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed body: {e}")),
        }
    };
    let (by, reason) = decider(caller.as_ref(), d.by, d.reason);
    let msg = DecidePolicy {
        id,
        decision,
        by,
        reason,
    };
    match s.handle.planner.send(msg).await {
        Ok(Ok(p)) => Json(p).into_response(),
        Ok(Err(DecisionError::NotFound(id))) => {
            error(StatusCode::NOT_FOUND, format!("no pending policy `{id}`"))
        }
        Ok(Err(DecisionError::Invalid(m))) => error(StatusCode::CONFLICT, m),
        Ok(Err(DecisionError::Busy(m))) => error(StatusCode::CONFLICT, m),
        Ok(Err(DecisionError::Unavailable(m))) => error(StatusCode::SERVICE_UNAVAILABLE, m),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn approve(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    body: Bytes,
) -> Response {
    decide(s, caller, id, ApprovalStatus::Approved, body).await
}

async fn reject(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    body: Bytes,
) -> Response {
    decide(s, caller, id, ApprovalStatus::Rejected, body).await
}

async fn executions(State(s): State<ApiState>, q: PageParams) -> Response {
    match page_query(q) {
        Ok(q) => page(&s, pages::Listing::Executions, q, "").await,
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

async fn outcomes(State(s): State<ApiState>, q: PageParams) -> Response {
    match page_query(q) {
        Ok(q) => page(&s, pages::Listing::Outcomes, q, "").await,
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

async fn patterns(State(s): State<ApiState>) -> Response {
    let st = s.handle.store.clone();
    store_result("patterns", blocking(move || st.stats()).await)
}

async fn insights(State(s): State<ApiState>) -> Response {
    let st = s.handle.store.clone();
    store_result("insights", blocking(move || st.insights()).await)
}

#[derive(Debug, Deserialize)]
struct CauseQuery {
    cause: Option<String>,
}

async fn best_action(State(s): State<ApiState>, Query(q): Query<CauseQuery>) -> Response {
    let Some(name) = q.cause else {
        return error(StatusCode::BAD_REQUEST, "missing query parameter `cause`");
    };
    let Some(cause) = RootCause::parse(&name) else {
        let known: Vec<&str> = RootCause::ALL.iter().map(|c| c.as_str()).collect();
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown cause `{name}` (known: {})", known.join(", ")),
        );
    };
    let st = s.handle.store.clone();
    match blocking(move || st.stats()).await {
        Ok(stats) => match stats.best_action_for_cause(cause) {
            Some((action, st)) => {
                Json(json!({"cause": cause, "action": action, "stats": st})).into_response()
            }
            None => Json(json!({"cause": cause, "action": null, "reason": "no evidence yet"}))
                .into_response(),
        },
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn webhook(State(s): State<ApiState>, body: Bytes) -> Response {
    let payload = match alertmanager::parse(&body) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "webhook payload refused");
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let m = &s.handle.metrics;
    m.alerts_received.inc_by(payload.alerts.len() as u64);
    let (firing, resolved) = alertmanager::to_violations(&payload, chrono::Utc::now());
    let n = payload.alerts.len();
    let msg = Observe {
        source: alertmanager::SOURCE.into(),
        violations: firing,
        resolved,
        complete: false,
    };
    // 2xx only once the Monitor has taken the batch: otherwise 503 and
    // Alertmanager re-sends (handling is idempotent per fingerprint).
    match tokio::time::timeout(WEBHOOK_TIMEOUT, s.handle.monitor.send(msg))
        .await
        .unwrap_or(Err(mapek_actors::mailbox::DeliveryError::Full(
            mapek_actors::metrics::ActorKind::Monitor,
        ))) {
        Ok(Ok(ack)) => {
            m.alerts_processed.inc_by(n as u64);
            Json(json!({"status": "accepted", "ack": ack})).into_response()
        }
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Optional body of pause, resume and clear.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorBody {
    by: Option<String>,
    reason: Option<String>,
}

/// A request body must be JSON: a form or a `text/plain` body (which a
/// browser may send cross-origin without asking) is refused with 415. An
/// empty body needs no type.
async fn require_json(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if let Err(m) = json_only(req.headers()) {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, m);
    }
    next.run(req).await
}

fn json_only(headers: &axum::http::HeaderMap) -> Result<(), String> {
    let empty = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "0")
        || (!headers.contains_key(header::CONTENT_LENGTH)
            && !headers.contains_key(header::TRANSFER_ENCODING));
    if empty {
        return Ok(());
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(format!(
            "Content-Type must be application/json (got {:?})",
            if ct.is_empty() { "none" } else { ct }
        ))
    }
}

fn operator_body(body: &Bytes) -> Result<OperatorBody, String> {
    if body.is_empty() {
        return Ok(OperatorBody::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("malformed body: {e}"))
}

/// How long an operator command waits for the Planner (and the
/// durability of its guard state).
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn command<M>(s: &ApiState, msg: M) -> Response
where
    M: actix::Message<Result = Result<Value, String>>
        + mapek_actors::mailbox::Named
        + Send
        + 'static,
    mapek_actors::planner::Planner: actix::Handler<M>,
{
    match tokio::time::timeout(COMMAND_TIMEOUT, s.handle.planner.send(msg)).await {
        Ok(Ok(Ok(v))) => Json(v).into_response(),
        Ok(Ok(Err(e))) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "planner did not answer within {} s",
                COMMAND_TIMEOUT.as_secs()
            ),
        ),
    }
}

async fn pause(
    State(s): State<ApiState>,
    caller: Option<axum::Extension<Caller>>,
    body: Bytes,
) -> Response {
    let b = match operator_body(&body) {
        Ok(b) => b,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (by, reason) = decider(caller.as_ref(), b.by, b.reason);
    let msg = mapek_actors::messages::Pause { by, reason };
    command(&s, msg).await
}

async fn resume(
    State(s): State<ApiState>,
    caller: Option<axum::Extension<Caller>>,
    body: Bytes,
) -> Response {
    let b = match operator_body(&body) {
        Ok(b) => b,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (by, reason) = decider(caller.as_ref(), b.by, b.reason);
    let msg = mapek_actors::messages::Resume { by, reason };
    command(&s, msg).await
}

fn valid_component(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err("a component name must be 1 to 256 printable characters");
    }
    Ok(())
}

async fn clear_component(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    body: Bytes,
) -> Response {
    if let Err(m) = valid_component(&name) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    let b = match operator_body(&body) {
        Ok(b) => b,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (by, reason) = decider(caller.as_ref(), b.by, b.reason);
    let msg = mapek_actors::messages::ClearComponent {
        component: name,
        by,
        reason,
    };
    command(&s, msg).await
}

/// Body of a silence.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SilenceBody {
    duration_seconds: u64,
    reason: String,
    by: Option<String>,
}

/// Longest silence: 30 days.
const MAX_SILENCE_SECONDS: u64 = 30 * 24 * 3600;

async fn silence_component(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    body: Bytes,
) -> Response {
    if let Err(m) = valid_component(&name) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    let b: SilenceBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "malformed body: {e} (expected {{\"duration_seconds\": N, \"reason\": \"...\", \"by\": \"...\"}})"
                ),
            )
        }
    };
    if b.duration_seconds == 0 || b.duration_seconds > MAX_SILENCE_SECONDS {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "duration_seconds must be between 1 and {MAX_SILENCE_SECONDS} (got {})",
                b.duration_seconds
            ),
        );
    }
    if b.reason.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, "a silence needs a reason");
    }
    let (by, reason) = decider(caller.as_ref(), b.by, Some(b.reason));
    let msg = mapek_actors::messages::SilenceComponent {
        component: name,
        seconds: b.duration_seconds,
        by,
        reason: reason.unwrap_or_default(),
    };
    command(&s, msg).await
}

/// Asks the Planner for a JSON view, with a timeout (`null`: it failed).
async fn ask_planner<M>(s: &ApiState, msg: M) -> Response
where
    M: actix::Message<Result = Value> + mapek_actors::mailbox::Named + Send + 'static,
    mapek_actors::planner::Planner: actix::Handler<M>,
{
    match tokio::time::timeout(ASK_TIMEOUT, s.handle.planner.send(msg)).await {
        Ok(Ok(Value::Null)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "planner failed while answering",
        ),
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "planner did not answer"),
    }
}

async fn safety(State(s): State<ApiState>) -> Response {
    ask_planner(&s, mapek_actors::messages::GetSafety).await
}

async fn shadow_report(State(s): State<ApiState>) -> Response {
    ask_planner(&s, mapek_actors::messages::GetShadowReport).await
}

/// What the learner knows per cause: each remedy's judged episodes,
/// posterior mean, and the regret so far.
/// What the start-up check of the knowledge store against its journal
/// found and did (put right, repaired, migrated; see docs/OPERATIONS.md).
async fn integrity(State(s): State<ApiState>) -> Response {
    Json(json!({ "integrity": s.handle.store.integrity() })).into_response()
}

async fn learning(State(s): State<ApiState>) -> Response {
    let st = s.handle.store.clone();
    match blocking(move || st.stats()).await {
        Ok(stats) => {
            let causes: serde_json::Map<String, Value> = stats
                .by_remedy
                .iter()
                .map(|(cause, remedies)| {
                    let list: Vec<Value> = remedies
                        .iter()
                        .map(|(r, st)| {
                            let n = st.successes + st.failures;
                            json!({
                                "remedy": r,
                                "successes": st.successes,
                                "failures": st.failures,
                                "success_rate": if n == 0 { 0.0 } else { st.successes as f64 / n as f64 },
                            })
                        })
                        .collect();
                    let regret = mapek_actors::learn::regret(&stats, *cause);
                    (
                        cause.as_str().to_string(),
                        json!({
                            "remedies": list,
                            "episodes": regret.map(|r| r.0),
                            "regret": regret.map(|r| r.1),
                        }),
                    )
                })
                .collect();
            Json(json!({"causes": causes})).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    /// A handler that never completes is answered 503 (JSON) at the
    /// deadline, on tokio's paused clock; a fast one is untouched.
    #[tokio::test(start_paused = true)]
    async fn a_request_slower_than_the_deadline_gets_a_json_503() {
        use tower::ServiceExt;
        let timed_out = prometheus_client::metrics::counter::Counter::default();
        let app = Router::new()
            .route("/slow", get(std::future::pending::<&'static str>))
            .route("/fast", get(|| async { "ok" }));
        let app = with_deadline(
            app,
            Deadline {
                limit: std::time::Duration::from_secs(30),
                timed_out: timed_out.clone(),
            },
        );
        let req = |p: &str| {
            axum::http::Request::get(p)
                .body(axum::body::Body::empty())
                .expect("request")
        };
        let started = tokio::time::Instant::now();
        let r = app.clone().oneshot(req("/slow")).await.expect("infallible");
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(30));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(r.into_body(), 4096)
            .await
            .expect("body");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("api.request_timeout_seconds")),
            "{v}"
        );
        assert_eq!(timed_out.get(), 1);
        let r = app.oneshot(req("/fast")).await.expect("infallible");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(timed_out.get(), 1);
    }

    #[test]
    fn tokens_compare_by_digest() {
        assert!(same_token("s3cret", "s3cret"));
        assert!(!same_token("s3cre", "s3cret"));
        assert!(!same_token("", "s3cret"));
        assert!(!same_token("s3cret-and-more", "s3cret"));
    }
}
