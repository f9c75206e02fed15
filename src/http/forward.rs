//! Cluster mode: a mutating API call that reaches a replica which does
//! not lead the shard it concerns is forwarded to the replica that does.
//!
//! | call | concerns |
//! |---|---|
//! | `POST /api/v1/policies/{id}/approve`, `/reject` | the shard of the policy's component |
//! | `POST /api/v1/components/{name}/clear`, `/silence` | the shard of the component |
//! | `POST /api/v1/pause`, `/resume` | every shard: sent to each replica that leads one |
//!
//! The forwarded request carries `X-Mapek-Forwarded: <this replica>` and
//! is never forwarded again (a replica that stopped leading meanwhile
//! answers `503`). The answer names who applied the call in
//! `X-Mapek-Applied-By`. When no replica leads the shard (an election is
//! under way), the answer is `503` with `Retry-After: 1` and the shard's
//! last known leader. The webhook and every `GET` are answered by
//! whichever replica is asked.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ApiState;

/// Header marking a forwarded request (its value: the replica that
/// forwarded it).
pub const FORWARDED: &str = "x-mapek-forwarded";
/// Header naming the replicas that applied a call.
pub const APPLIED_BY: &str = "x-mapek-applied-by";

/// Largest body forwarded (the API's bodies are small JSON documents).
const MAX_BODY: usize = 1024 * 1024;

/// A forwarded call's answer: status, the headers passed back, and body;
/// or why there is none.
type Answer = Result<(StatusCode, Vec<(&'static str, HeaderValue)>, Bytes), String>;

/// Headers of a leader's answer passed back to the caller.
const PASSED_BACK: [&str; 4] = ["content-type", "retry-after", "www-authenticate", "allow"];

fn answer(status: StatusCode, headers: Vec<(&'static str, HeaderValue)>, body: Bytes) -> Response {
    let mut r = (status, body).into_response();
    for (h, v) in headers {
        r.headers_mut().insert(h, v);
    }
    r
}

enum Target {
    All,
    Component(String),
    Policy(String),
}

fn target_of(path: &str) -> Option<Target> {
    let rest = path.strip_prefix("/api/v1/")?;
    match rest {
        "pause" | "resume" => return Some(Target::All),
        _ => {}
    }
    if let Some(r) = rest.strip_prefix("policies/") {
        let (id, action) = r.rsplit_once('/')?;
        return matches!(action, "approve" | "reject").then(|| Target::Policy(decode(id)));
    }
    if let Some(r) = rest.strip_prefix("components/") {
        let (name, action) = r.rsplit_once('/')?;
        return matches!(action, "clear" | "silence").then(|| Target::Component(decode(name)));
    }
    None
}

/// Percent-decodes a path segment (a malformed escape is kept as is;
/// the handler refuses it, with its own error, when it is local).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn client() -> &'static reqwest::Client {
    static C: OnceLock<reqwest::Client> = OnceLock::new();
    C.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default()
    })
}

fn unavailable(msg: String, leader: Option<&str>) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({"error": msg, "leader": leader})),
    )
        .into_response();
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r
}

/// The middleware (see the module documentation).
pub async fn to_leader(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let l = s.leadership.clone();
    let view = l.view();
    if !view.clustered {
        return next.run(req).await;
    }
    let Some(target) = target_of(req.uri().path()) else {
        return next.run(req).await;
    };
    let me = view.name.clone();
    if let Some(e) = &view.etcd_error {
        return unavailable(
            format!("{me} cannot reach etcd, so it cannot tell who leads ({e}); retry, or ask another replica"),
            None,
        );
    }
    let forwarded = req.headers().contains_key(FORWARDED);
    let shards: Vec<u32> = match &target {
        Target::All => (0..view.shards).collect(),
        Target::Component(c) => vec![l.shard_of(c)],
        Target::Policy(id) => {
            let (store, id) = (s.handle.store.clone(), id.clone());
            match tokio::task::spawn_blocking(move || store.get_policy(&id)).await {
                Ok(Ok(Some(p))) => vec![mapek_actors::leadership::policy_shard(l.as_ref(), &p)],
                // Unknown here: answered here (404), as alone.
                _ => return next.run(req).await,
            }
        }
    };
    let mut leaders: Vec<String> = Vec::new();
    for sh in &shards {
        match view.leader_of(*sh) {
            Some(name) if !leaders.iter().any(|x| x == name) => leaders.push(name.to_string()),
            Some(_) => {}
            None if !matches!(target, Target::All) => {
                return unavailable(
                    format!(
                        "no replica leads shard {sh} right now (an election is under way); retry"
                    ),
                    None,
                )
            }
            None => {}
        }
    }
    if leaders.is_empty() {
        return unavailable("no replica leads any shard right now; retry".into(), None);
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            let mut chain: Option<&dyn std::error::Error> = Some(&e);
            let mut too_large = false;
            while let Some(err) = chain {
                too_large |= err.to_string().contains("length limit");
                chain = err.source();
            }
            return if too_large {
                super::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is larger than {MAX_BODY} bytes"),
                )
            } else {
                super::error(StatusCode::BAD_REQUEST, format!("unreadable body: {e}"))
            };
        }
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let headers: Vec<(&'static str, Vec<u8>)> = ["authorization", "content-type"]
        .into_iter()
        .filter_map(|h| parts.headers.get(h).map(|v| (h, v.as_bytes().to_vec())))
        .collect();
    let mut local: Option<Response> = None;
    let mut remote: Vec<(String, Answer)> = Vec::new();
    let mut calls = Vec::new();
    for leader in &leaders {
        if *leader == me {
            continue;
        }
        if forwarded {
            // Never forwarded twice: this replica was asked because it led.
            if !matches!(target, Target::All) {
                return unavailable(
                    format!("{me} no longer leads the shard; {leader} does"),
                    Some(leader),
                );
            }
            continue;
        }
        let Some(addr) = l.address_of(leader) else {
            remote.push((leader.clone(), Err("its address is unknown".into())));
            continue;
        };
        calls.push(forward(
            leader.clone(),
            addr,
            pq.clone(),
            headers.clone(),
            body.clone(),
            me.clone(),
            // Shorter than this request's own deadline, so that a slow
            // leader is reported as such (502), not as a timeout here.
            s.request_timeout.mul_f64(0.8),
        ));
    }
    if leaders.contains(&me) {
        let req = Request::from_parts(parts, Body::from(body));
        let r = next.run(req).await;
        // Forwarded here (this replica's part of a fan-out), or refused as
        // bad input (the others would refuse it alike): the answer as is,
        // nothing sent on.
        if forwarded || r.status().is_client_error() {
            return r;
        }
        local = Some(r);
    } else if forwarded {
        return unavailable(format!("{me} does not lead the shard"), None);
    }
    remote.extend(futures::future::join_all(calls).await);
    // Every leader refused it as bad input: the first refusal as is.
    if local.is_none()
        && !remote.is_empty()
        && remote
            .iter()
            .all(|(_, r)| matches!(r, Ok((st, _, _)) if st.is_client_error()))
    {
        if let Some((_, Ok((st, h, b)))) = remote.into_iter().next() {
            return answer(st, h, b);
        }
        return unavailable("no leader answered".into(), None);
    }
    // One target: its answer as is.
    if leaders.len() == 1 {
        if let Some(mut r) = local {
            applied_by(&mut r, std::slice::from_ref(&me));
            return r;
        }
        let Some((leader, res)) = remote.pop() else {
            return unavailable("no leader to ask".into(), None);
        };
        return match res {
            Ok((status, headers, bytes)) => {
                let mut r = answer(status, headers, bytes);
                if status.is_success() {
                    applied_by(&mut r, &[leader]);
                }
                r
            }
            Err(e) => super::error(
                StatusCode::BAD_GATEWAY,
                format!("forwarding to the leader {leader} failed: {e}"),
            ),
        };
    }
    // Every leader: all must have applied it.
    let mut done: Vec<String> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    if let Some(r) = &local {
        if r.status().is_success() {
            done.push(me.clone());
        } else {
            failed.push(format!("{me}: HTTP {}", r.status().as_u16()));
        }
    }
    for (leader, res) in &remote {
        match res {
            Ok((st, _, _)) if st.is_success() => done.push(leader.clone()),
            Ok((st, _, b)) => failed.push(format!(
                "{leader}: HTTP {} {}",
                st.as_u16(),
                String::from_utf8_lossy(b)
            )),
            Err(e) => failed.push(format!("{leader}: {e}")),
        }
    }
    if !failed.is_empty() {
        let mut r = super::error(
            StatusCode::BAD_GATEWAY,
            format!(
                "applied by {} but not by {}: retry (it is idempotent)",
                if done.is_empty() {
                    "none".to_string()
                } else {
                    done.join(", ")
                },
                failed.join("; ")
            ),
        );
        applied_by(&mut r, &done);
        return r;
    }
    let mut r = match local {
        Some(r) => r,
        None => match remote.into_iter().next() {
            Some((_, Ok((st, h, b)))) => answer(st, h, b),
            _ => return unavailable("no leader answered".into(), None),
        },
    };
    applied_by(&mut r, &done);
    r
}

fn applied_by(r: &mut Response, names: &[String]) {
    if names.is_empty() {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&names.join(",")) {
        r.headers_mut().insert(APPLIED_BY, v);
    }
}

async fn forward(
    leader: String,
    addr: String,
    pq: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Bytes,
    me: String,
    timeout: Duration,
) -> (String, Answer) {
    let mut rb = client()
        .post(format!("http://{addr}{pq}"))
        .timeout(timeout)
        .header(FORWARDED, me)
        .body(body);
    for (h, v) in headers {
        rb = rb.header(h, v);
    }
    let res = async {
        let resp = rb.send().await.map_err(|e| e.to_string())?;
        let status =
            StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let headers: Vec<(&'static str, HeaderValue)> = PASSED_BACK
            .into_iter()
            .filter_map(|h| {
                let v = resp.headers().get(h)?;
                Some((h, HeaderValue::from_bytes(v.as_bytes()).ok()?))
            })
            .collect();
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        Ok((status, headers, bytes))
    }
    .await;
    (leader, res)
}
