//! `mapek ctl`: the operator's command line against a running daemon's
//! HTTP API (see `docs/CLI.md`), in the manner of `amtool` and `kubectl`.
//!
//! Every answer is read as loose JSON (`serde_json::Value`) so that a
//! field a daemon does not send yet (an older daemon) prints as `-` instead
//! of failing. Exit codes: 0 success, 1 the daemon answered an error, 2
//! usage error, 3 daemon unreachable or timed out, 4 unauthorized, 5 not
//! found.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::blocking::Client;
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Map, Value};

/// `mapek ctl` and its global options.
#[derive(Debug, Args)]
#[command(
    about = "Operate a running daemon over its HTTP API",
    after_help = "Exit codes: 0 success, 1 the daemon answered an error, 2 usage error, \
                  3 daemon unreachable or timed out, 4 unauthorized (token missing or wrong), \
                  5 not found."
)]
pub struct CtlArgs {
    /// Base URL of the daemon's HTTP API.
    #[arg(
        long,
        env = "MAPEK_SERVER",
        default_value = "http://127.0.0.1:8001",
        global = true,
        value_name = "URL"
    )]
    pub server: String,
    /// Bearer token of the API (`api.token` of the daemon).
    #[arg(
        long,
        env = "MAPEK_API_TOKEN",
        hide_env_values = true,
        global = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Output format: aligned tables for people, the daemon's JSON for scripts.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// Seconds to wait for each answer of the daemon.
    #[arg(long, default_value_t = 15, global = true, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Output format of `mapek ctl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned, readable tables.
    Table,
    /// The daemon's JSON, pretty-printed.
    Json,
}

/// Subcommands of `mapek ctl`.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Loop state: running, iteration, paused, mode, readiness, sources.
    Status,
    /// List incidents, newest first.
    Incidents {
        /// Only incidents in this state (open, pending, queued, acting,
        /// verifying, cooling_down, escalated, no_evidence, closed or all).
        #[arg(long, value_name = "STATE")]
        state: Option<String>,
        /// At most this many incidents (1..1000; the daemon's default is 50).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Start after this position (the `next` of a previous page).
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// One incident with its violations, policies and executions.
    Incident {
        /// Incident id (`inc-...`).
        id: String,
    },
    /// List remediation policies, newest first.
    Policies {
        /// Only policies with this approval status.
        #[arg(long, value_enum, value_name = "STATUS")]
        status: Option<PolicyStatus>,
        /// At most this many policies (1..1000; the daemon's default is 50).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Start after this position (the `next` of a previous page).
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Approve a pending policy.
    Approve(DecideArgs),
    /// Reject a pending policy.
    Reject(DecideArgs),
    /// Pause the loop: nothing new is acted on until `resume`.
    Pause(ByReason),
    /// Resume a paused loop.
    Resume(ByReason),
    /// Clear a component's soft state (flapping mark, silence, breaker...).
    Clear {
        /// Component name.
        component: String,
        #[command(flatten)]
        who: ByReason,
    },
    /// Silence a component: no remedy is planned for it until the silence ends.
    Silence {
        /// Component name.
        component: String,
        /// How long: `90s`, `30m`, `2h`, `1d`, `1h30m` or plain seconds.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        duration: u64,
        /// Why (recorded with the silence).
        #[arg(long)]
        reason: String,
        /// Who silences (default: $USER, else `operator`).
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
    },
    /// Explain a policy: why this remedy, why (not) auto-approved, which guards applied.
    Explain {
        /// Policy id (`pol-...`).
        id: String,
    },
}

/// Approval statuses `policies --status` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyStatus {
    /// Waiting for a person.
    Pending,
    /// Approved (by a person or automatically).
    Approved,
    /// Rejected by a person.
    Rejected,
    /// Overtaken before a decision.
    Superseded,
    /// Every status.
    All,
}

impl PolicyStatus {
    fn as_str(self) -> &'static str {
        match self {
            PolicyStatus::Pending => "pending",
            PolicyStatus::Approved => "approved",
            PolicyStatus::Rejected => "rejected",
            PolicyStatus::Superseded => "superseded",
            PolicyStatus::All => "all",
        }
    }
}

/// Arguments of `approve` and `reject`.
#[derive(Debug, Args)]
pub struct DecideArgs {
    /// Policy id (`pol-...`).
    pub id: String,
    #[command(flatten)]
    pub who: ByReason,
}

/// `--reason` and `--by`, recorded with an operator's action.
#[derive(Debug, Args)]
pub struct ByReason {
    /// Why (recorded in the audit trail).
    #[arg(long)]
    pub reason: Option<String>,
    /// Who acts (default: $USER, else `operator`).
    #[arg(long, value_name = "NAME")]
    pub by: Option<String>,
}

impl ByReason {
    fn body(&self) -> Value {
        let mut m = Map::new();
        m.insert("by".into(), json!(who(self.by.as_deref())));
        if let Some(r) = &self.reason {
            m.insert("reason".into(), json!(r));
        }
        Value::Object(m)
    }
}

/// The name recorded for an operator: `--by`, else `$USER`, else `operator`.
fn who(by: Option<&str>) -> String {
    by.map(str::to_string)
        .or_else(|| std::env::var("USER").ok())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "operator".into())
}

/// Parses a duration: plain seconds (`90`), or number-unit groups with
/// units `s`, `m`, `h`, `d` (`90s`, `30m`, `2h`, `1h30m`). Zero is refused.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "invalid duration `{s}`: use plain seconds or units s, m, h, d (90s, 30m, 2h, 1h30m)"
        )
    };
    if t.is_empty() {
        return Err(bad());
    }
    let total = if t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>().map_err(|_| bad())?
    } else {
        let mut total: u64 = 0;
        let mut digits = String::new();
        for c in t.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => return Err(bad()),
            };
            let n: u64 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            total = n
                .checked_mul(unit)
                .and_then(|x| total.checked_add(x))
                .ok_or_else(bad)?;
        }
        if !digits.is_empty() {
            return Err(bad());
        }
        total
    };
    if total == 0 {
        return Err(format!("invalid duration `{s}`: must be longer than zero"));
    }
    Ok(total)
}

/// Why a command failed, and its exit code.
#[derive(Debug)]
enum CtlError {
    /// The daemon answered an error (exit 1), or anything else went wrong.
    Failed(String),
    /// Bad input found before asking the daemon (exit 2).
    Usage(String),
    /// No answer from the daemon (exit 3).
    Unreachable(String),
    /// 401 (exit 4).
    Unauthorized(String),
    /// 404 (exit 5).
    NotFound(String),
}

impl CtlError {
    fn code(&self) -> u8 {
        match self {
            CtlError::Failed(_) => 1,
            CtlError::Usage(_) => 2,
            CtlError::Unreachable(_) => 3,
            CtlError::Unauthorized(_) => 4,
            CtlError::NotFound(_) => 5,
        }
    }

    fn message(&self) -> &str {
        match self {
            CtlError::Failed(m)
            | CtlError::Usage(m)
            | CtlError::Unreachable(m)
            | CtlError::Unauthorized(m)
            | CtlError::NotFound(m) => m,
        }
    }
}

/// Runs `mapek ctl`: prints the answer on stdout, errors on stderr
/// (prefixed `mapek ctl:`), and returns the exit code.
pub fn run(args: CtlArgs) -> ExitCode {
    let out = std::io::stdout();
    let mut lock = out.lock();
    match execute(&args, &mut lock) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: a closed stderr must not panic.
            let _ = writeln!(std::io::stderr(), "mapek ctl: {}", e.message());
            ExitCode::from(e.code())
        }
    }
}

fn execute(args: &CtlArgs, out: &mut dyn std::io::Write) -> Result<(), CtlError> {
    let api = Api::new(args)?;
    let text = match &args.command {
        CtlCommand::Status => status(&api, args.output)?,
        CtlCommand::Incidents {
            state,
            limit,
            cursor,
        } => {
            let mut q = Vec::new();
            if let Some(s) = state {
                q.push(("state", s.clone()));
            }
            if let Some(n) = limit {
                q.push(("limit", n.to_string()));
            }
            if let Some(c) = cursor {
                q.push(("cursor", c.clone()));
            }
            let v = api.call(Method::GET, "/api/v1/incidents", &q, None)?;
            render(args.output, &v, incidents_table)
        }
        CtlCommand::Incident { id } => {
            let v = api.call(
                Method::GET,
                &format!("/api/v1/incidents/{}", seg(id)),
                &[],
                None,
            )?;
            render(args.output, &v, incident_detail)
        }
        CtlCommand::Policies {
            status,
            limit,
            cursor,
        } => {
            let mut q = Vec::new();
            if let Some(s) = status {
                q.push(("status", s.as_str().to_string()));
            }
            if let Some(n) = limit {
                q.push(("limit", n.to_string()));
            }
            if let Some(c) = cursor {
                q.push(("cursor", c.clone()));
            }
            let v = api.call(Method::GET, "/api/v1/policies", &q, None)?;
            render(args.output, &v, policies_table)
        }
        CtlCommand::Approve(d) | CtlCommand::Reject(d) => {
            let verb = if matches!(args.command, CtlCommand::Approve(_)) {
                "approve"
            } else {
                "reject"
            };
            let v = api.call(
                Method::POST,
                &format!("/api/v1/policies/{}/{verb}", seg(&d.id)),
                &[],
                Some(d.who.body()),
            )?;
            render(args.output, &v, decided)
        }
        CtlCommand::Pause(w) => {
            let v = api.call(Method::POST, "/api/v1/pause", &[], Some(w.body()))?;
            render(args.output, &v, paused)
        }
        CtlCommand::Resume(w) => {
            let v = api.call(Method::POST, "/api/v1/resume", &[], Some(w.body()))?;
            render(args.output, &v, paused)
        }
        CtlCommand::Clear { component, who } => {
            let v = api.call(
                Method::POST,
                &format!("/api/v1/components/{}/clear", seg(component)),
                &[],
                Some(who.body()),
            )?;
            let c = component.clone();
            render(args.output, &v, move |v| cleared(&c, v))
        }
        CtlCommand::Silence {
            component,
            duration,
            reason,
            by,
        } => {
            let body = json!({
                "duration_seconds": duration,
                "reason": reason,
                "by": who(by.as_deref()),
            });
            let v = api.call(
                Method::POST,
                &format!("/api/v1/components/{}/silence", seg(component)),
                &[],
                Some(body),
            )?;
            let c = component.clone();
            render(args.output, &v, move |v| silenced(&c, v))
        }
        CtlCommand::Explain { id } => {
            let v = api.call(
                Method::GET,
                &format!("/api/v1/policies/{}", seg(id)),
                &[],
                None,
            )?;
            render(args.output, &v, explain)
        }
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| CtlError::Failed(format!("writing the output: {e}")))
}

/// The JSON pretty-printed, or the table made by `table`.
fn render(output: Output, v: &Value, table: impl FnOnce(&Value) -> String) -> String {
    match output {
        Output::Json => pretty(v),
        Output::Table => table(v),
    }
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}

/// A path segment, percent-encoded (ids and component names are plain,
/// but a stray `/` or space must not change the endpoint).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The daemon's API: base URL, token, client.
struct Api {
    base: Url,
    server: String,
    token: Option<String>,
    timeout: u64,
    client: Client,
}

impl Api {
    fn new(args: &CtlArgs) -> Result<Api, CtlError> {
        let server = args.server.trim().trim_end_matches('/').to_string();
        let base = Url::parse(&server)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                CtlError::Usage(format!(
                    "--server `{}` is not an http:// or https:// URL (e.g. http://127.0.0.1:8001)",
                    args.server
                ))
            })?;
        let client = Client::builder()
            .timeout(Duration::from_secs(args.timeout))
            .connect_timeout(Duration::from_secs(args.timeout))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CtlError::Failed(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api {
            base,
            server,
            token: args.token.clone().filter(|t| !t.is_empty()),
            timeout: args.timeout,
            client,
        })
    }

    fn url(&self, path: &str) -> Result<Url, CtlError> {
        let full = format!("{}{path}", self.base.as_str().trim_end_matches('/'));
        Url::parse(&full).map_err(|e| CtlError::Usage(format!("bad URL `{full}`: {e}")))
    }

    /// Sends a request; the status and the body read as JSON (`null` when
    /// the body is empty, a string when it is not JSON).
    fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), CtlError> {
        let url = self.url(path)?;
        let mut req = self.client.request(method, url);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().map_err(|e| self.transport(e))?;
        let status = resp.status();
        let text = resp.text().map_err(|e| self.transport(e))?;
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text.trim().to_string()))
        };
        Ok((status, v))
    }

    /// A request whose non-2xx answers are errors with their exit code.
    fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        let (status, v) = self.send(method, path, query, body)?;
        if status.is_success() {
            if v.is_object() || v.is_array() {
                return Ok(v);
            }
            return Err(CtlError::Failed(format!(
                "the daemon at {} answered {path} with something that is not JSON: {}",
                self.server,
                cut(&display(&v), 200)
            )));
        }
        let msg = match &v {
            Value::Object(m) => m.get("error").map(display).unwrap_or_else(|| v.to_string()),
            Value::Null => String::new(),
            other => display(other),
        };
        let msg = cut(&msg, 500);
        Err(match status {
            StatusCode::UNAUTHORIZED => CtlError::Unauthorized(match &self.token {
                None => format!(
                    "the daemon at {} requires an API token and none was given: set MAPEK_API_TOKEN \
                     (or pass --token) to the daemon's api.token",
                    self.server
                ),
                Some(_) => format!(
                    "the daemon at {} refused the API token as wrong: check MAPEK_API_TOKEN \
                     (or --token) against the daemon's api.token",
                    self.server
                ),
            }),
            StatusCode::NOT_FOUND if msg.is_empty() => {
                CtlError::NotFound(format!("not found: {path}"))
            }
            StatusCode::NOT_FOUND if msg == "no such endpoint" => CtlError::NotFound(format!(
                "the daemon at {} has no endpoint {path} (is it an older version?)",
                self.server
            )),
            StatusCode::NOT_FOUND => CtlError::NotFound(msg),
            s if msg.is_empty() => CtlError::Failed(format!("the daemon answered {s}")),
            s => CtlError::Failed(format!("{msg} ({s})")),
        })
    }

    fn transport(&self, e: reqwest::Error) -> CtlError {
        if e.is_timeout() {
            CtlError::Unreachable(format!(
                "the daemon at {} did not answer within {} s (check --server or MAPEK_SERVER, or raise --timeout)",
                self.server, self.timeout
            ))
        } else {
            let mut cause = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                cause = s.to_string();
                src = s.source();
            }
            CtlError::Unreachable(format!(
                "cannot reach the daemon at {}: {cause} (check --server or MAPEK_SERVER)",
                self.server
            ))
        }
    }
}

// ---------------------------------------------------------------------
// Reading loose JSON.

/// A value as text: strings bare, null/missing as `-`, numbers as given.
fn display(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => {
                let s = format!("{f:.3}");
                s.trim_end_matches('0').trim_end_matches('.').to_string()
            }
            _ => n.to_string(),
        },
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(display).collect::<Vec<_>>().join(","),
        Value::Object(_) => v.to_string(),
    }
}

/// `v[key]` as text (`-` when absent).
fn field(v: &Value, key: &str) -> String {
    display(v.get(key).unwrap_or(&Value::Null))
}

/// A float field with two decimals.
fn num2(v: &Value) -> String {
    v.as_f64()
        .map(|f| format!("{f:.2}"))
        .unwrap_or_else(|| "-".into())
}

/// At most `n` characters, with `…` when cut.
fn cut(s: &str, n: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        let mut t: String = one_line.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Age of a timestamp: `45s`, `12m`, `3h`, `2d` (`-` when absent).
fn age(v: &Value, now: DateTime<Utc>) -> String {
    match parse_time(v) {
        Some(t) => short_duration((now - t).num_seconds().max(0)),
        None => "-".into(),
    }
}

fn short_duration(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A timestamp shortened to seconds, UTC (`2026-03-01 12:00:30Z`).
fn when(v: &Value) -> String {
    match parse_time(v) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
        None => display(v),
    }
}

// ---------------------------------------------------------------------
// Tables.

/// An aligned table: columns padded to their widest cell, two spaces
/// apart, the last column unpadded.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, indent: &str) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0usize; cols];
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::from(indent);
            for (i, c) in r.iter().enumerate() {
                line.push_str(c);
                if i + 1 < r.len() {
                    let pad = widths[i] - c.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `KEY  value` lines, keys aligned.
fn pairs(items: &[(&str, String)], indent: &str) -> String {
    let mut t = Table { rows: Vec::new() };
    for (k, v) in items {
        t.row(vec![format!("{k}:"), v.clone()]);
    }
    t.render(indent)
}

// ---------------------------------------------------------------------
// status

fn status(api: &Api, output: Output) -> Result<String, CtlError> {
    let mut state = api.call(Method::GET, "/api/v1/state", &[], None)?;
    // `/ready` answers 503 with the same body when not ready.
    let ready = match api.send(Method::GET, "/ready", &[], None) {
        Ok((_, v)) if v.is_object() => v,
        Ok(_) => Value::Null,
        Err(e @ CtlError::Unreachable(_)) => return Err(e),
        Err(_) => Value::Null,
    };
    if output == Output::Json {
        if let Value::Object(m) = &mut state {
            m.insert("ready".into(), ready);
        }
        return Ok(pretty(&state));
    }
    Ok(status_table(&api.server, &state, &ready))
}

/// A field of the loop state, looked for in `state` then at the top level.
fn state_field<'a>(resp: &'a Value, key: &str) -> Option<&'a Value> {
    resp.get("state")
        .and_then(|s| s.get(key))
        .or_else(|| resp.get(key))
        .filter(|v| !v.is_null())
}

fn status_table(server: &str, resp: &Value, ready: &Value) -> String {
    let st = resp.get("state").unwrap_or(&Value::Null);
    let readiness = match ready.get("ready").and_then(Value::as_bool) {
        Some(true) => "yes".to_string(),
        Some(false) => {
            let reasons: Vec<String> = ready
                .get("reasons")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(display).collect())
                .unwrap_or_default();
            if reasons.is_empty() {
                "no".into()
            } else {
                format!("no ({})", reasons.join("; "))
            }
        }
        None => "-".into(),
    };
    let paused = match state_field(resp, "paused").and_then(Value::as_bool) {
        None => "-".to_string(),
        Some(false) => "no".into(),
        Some(true) => {
            let p = state_field(resp, "pause").unwrap_or(&Value::Null);
            let mut s = String::from("yes");
            if p.is_object() {
                let _ = write!(s, ", by {} at {}", field(p, "by"), when(&p["at"]));
                if let Some(r) = p.get("reason").and_then(Value::as_str) {
                    let _ = write!(s, ": {r}");
                }
            }
            s
        }
    };
    let mode = state_field(resp, "mode")
        .map(display)
        .unwrap_or_else(|| "-".into());
    let mut items = vec![
        ("server", server.to_string()),
        ("ready", readiness),
        ("running", field(st, "is_running")),
        ("iteration", field(st, "iteration")),
        ("paused", paused),
        ("mode", mode),
        ("started", when(&st["started_at"])),
        ("last update", when(&st["last_update"])),
        ("violations", field(st, "violations_detected")),
        ("policies executed", field(st, "policies_executed")),
        ("error", field(st, "error")),
    ];
    if let Some(depths) = resp.get("mailbox_depth").and_then(Value::as_object) {
        let d: Vec<String> = depths
            .iter()
            .map(|(k, v)| format!("{k} {}", display(v)))
            .collect();
        items.push(("mailboxes", d.join(", ")));
    }
    let mut out = pairs(&items, "");
    if let Some(sources) = resp.get("sources").and_then(Value::as_array) {
        if !sources.is_empty() {
            out.push_str("\nSOURCES\n");
            let mut t = Table::new(&["NAME", "STATUS", "LAST SUCCESS", "FAILURES", "LAST ERROR"]);
            for s in sources {
                t.row(vec![
                    field(s, "name"),
                    field(s, "status"),
                    when(&s["last_success"]),
                    field(s, "consecutive_failures"),
                    cut(&field(s, "last_error"), 80),
                ]);
            }
            out.push_str(&t.render(""));
        }
    }
    out
}

// ---------------------------------------------------------------------
// incidents

fn incidents_table(v: &Value) -> String {
    incidents_table_at(v, Utc::now())
}

fn incidents_table_at(v: &Value, now: DateTime<Utc>) -> String {
    let list = v
        .get("incidents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if list.is_empty() {
        return "No incidents.\n".into();
    }
    let mut t = Table::new(&[
        "ID",
        "STATE",
        "SEVERITY",
        "COMPONENTS",
        "CAUSE",
        "CONF",
        "VIOLATIONS",
        "AGE",
        "REASON",
    ]);
    for i in &list {
        let d = i.get("diagnosis").unwrap_or(&Value::Null);
        let mut state = field(i, "state");
        if let Some(r) = i.get("close_reason").and_then(Value::as_str) {
            let _ = write!(state, "/{r}");
        }
        t.row(vec![
            field(i, "id"),
            state,
            field(i, "severity"),
            field(i, "components"),
            field(d, "cause"),
            num2(&d["confidence"]),
            field(i, "violation_count"),
            age(&i["opened_at"], now),
            cut(&field(i, "reason"), 60),
        ]);
    }
    let mut out = t.render("");
    if let Some(n) = v.get("next").and_then(Value::as_str) {
        let _ = writeln!(out, "\nMore: --cursor {n}");
    }
    out
}

fn incident_detail(v: &Value) -> String {
    let i = v.get("incident").unwrap_or(v);
    let now = Utc::now();
    let d = i.get("diagnosis").unwrap_or(&Value::Null);
    let diagnosis = if d.is_object() {
        format!(
            "{} (confidence {}, patterns {}, at {})",
            field(d, "cause"),
            num2(&d["confidence"]),
            field(d, "patterns"),
            when(&d["at"])
        )
    } else {
        "-".into()
    };
    let mut state = field(i, "state");
    if let Some(r) = i.get("close_reason").and_then(Value::as_str) {
        let _ = write!(state, " ({r})");
    }
    let mut items = vec![
        ("incident", field(i, "id")),
        ("state", state),
        ("severity", field(i, "severity")),
        ("components", field(i, "components")),
        ("root component", field(i, "root_component")),
        ("violations", field(i, "violation_count")),
        (
            "opened",
            format!(
                "{} ({} ago)",
                when(&i["opened_at"]),
                age(&i["opened_at"], now)
            ),
        ),
        ("updated", when(&i["updated_at"])),
        ("closed", when(&i["closed_at"])),
        ("diagnosis", diagnosis),
        ("attempts", field(i, "attempts")),
        ("outcome", field(i, "outcome")),
        ("reason", field(i, "reason")),
    ];
    if let Some(m) = i.get("merged_into").and_then(Value::as_str) {
        items.push(("merged into", m.to_string()));
    }
    let mut out = pairs(&items, "");

    out.push_str("\nVIOLATIONS\n");
    match v.get("violations").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => {
            let mut t = Table::new(&[
                "RULE",
                "SEVERITY",
                "COMPONENT",
                "SIGNAL",
                "VALUE",
                "SINCE",
                "SOURCE",
            ]);
            for x in a {
                t.row(vec![
                    field(x, "rule"),
                    field(x, "severity"),
                    field(x, "component"),
                    field(x, "signal"),
                    field(x, "value"),
                    when(&x["first_seen"]),
                    field(x, "source"),
                ]);
            }
            out.push_str(&t.render("  "));
        }
        _ => out.push_str("  none active\n"),
    }

    out.push_str("\nPOLICIES\n");
    match v.get("policies").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => {
            let mut t = Table::new(&["ID", "STATUS", "CAUSE", "CONF", "ACTIONS", "RISK", "SCORE"]);
            for p in a {
                t.row(vec![
                    field(p, "id"),
                    field(p, "approval_status"),
                    field(p, "root_cause"),
                    num2(&p["root_cause_confidence"]),
                    action_types(p),
                    field(p, "risk_level"),
                    num2(&p["score"]),
                ]);
            }
            out.push_str(&t.render("  "));
        }
        _ => out.push_str("  none\n"),
    }

    out.push_str("\nEXECUTIONS\n");
    match v.get("executions").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => {
            let mut t = Table::new(&[
                "ID", "POLICY", "STATUS", "OUTCOME", "STARTED", "FINISHED", "ERROR",
            ]);
            for e in a {
                t.row(vec![
                    field(e, "id"),
                    field(e, "policy_id"),
                    field(e, "status"),
                    field(e, "outcome"),
                    when(&e["started_at"]),
                    when(&e["finished_at"]),
                    cut(&field(e, "error"), 60),
                ]);
            }
            out.push_str(&t.render("  "));
        }
        _ => out.push_str("  none\n"),
    }
    out
}

// ---------------------------------------------------------------------
// policies

/// `SCALE_UP,UPDATE_CONFIGURATION`.
fn action_types(p: &Value) -> String {
    match p.get("actions").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|x| field(x, "action_type"))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

fn policies_table(v: &Value) -> String {
    let list = v
        .get("policies")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if list.is_empty() {
        return "No policies.\n".into();
    }
    let now = Utc::now();
    let mut t = Table::new(&[
        "ID", "STATUS", "CAUSE", "CONF", "ACTIONS", "RISK", "SCORE", "INCIDENT", "AGE",
    ]);
    for p in &list {
        t.row(vec![
            field(p, "id"),
            field(p, "approval_status"),
            field(p, "root_cause"),
            num2(&p["root_cause_confidence"]),
            action_types(p),
            field(p, "risk_level"),
            num2(&p["score"]),
            field(p, "incident_id"),
            age(&p["created_at"], now),
        ]);
    }
    let mut out = t.render("");
    if let Some(n) = v.get("next").and_then(Value::as_str) {
        let _ = writeln!(out, "\nMore: --cursor {n}");
    }
    out
}

fn decided(p: &Value) -> String {
    let last = p
        .get("decisions")
        .and_then(Value::as_array)
        .and_then(|d| d.last())
        .cloned()
        .unwrap_or(Value::Null);
    let mut s = format!("policy {} {}", field(p, "id"), field(p, "approval_status"));
    if last.is_object() {
        let _ = write!(s, " by {}", field(&last, "by"));
        if let Some(r) = last.get("reason").and_then(Value::as_str) {
            let _ = write!(s, ": {r}");
        }
    }
    s.push('\n');
    s
}

// ---------------------------------------------------------------------
// pause, resume, clear, silence

fn paused(v: &Value) -> String {
    let mut s = match v.get("paused").and_then(Value::as_bool) {
        Some(true) => "loop paused".to_string(),
        Some(false) => "loop resumed".to_string(),
        None => "loop pause state unknown".to_string(),
    };
    if let Some(by) = v.get("by").and_then(Value::as_str) {
        let _ = write!(s, " by {by}");
    }
    if v.get("at").is_some_and(|a| !a.is_null()) {
        let _ = write!(s, " at {}", when(&v["at"]));
    }
    if let Some(r) = v.get("reason").and_then(Value::as_str) {
        let _ = write!(s, ": {r}");
    }
    s.push('\n');
    s
}

fn cleared(component: &str, v: &Value) -> String {
    let name = v
        .get("component")
        .and_then(Value::as_str)
        .unwrap_or(component);
    match v.get("cleared").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => {
            let what: Vec<String> = a.iter().map(display).collect();
            format!("{name}: cleared {}\n", what.join(", "))
        }
        _ => format!("{name}: nothing to clear\n"),
    }
}

fn silenced(component: &str, v: &Value) -> String {
    let name = v
        .get("component")
        .and_then(Value::as_str)
        .unwrap_or(component);
    let mut s = format!("{name} silenced until {}", when(&v["until"]));
    if let Some(by) = v.get("by").and_then(Value::as_str) {
        let _ = write!(s, " by {by}");
    }
    if let Some(r) = v.get("reason").and_then(Value::as_str) {
        let _ = write!(s, ": {r}");
    }
    s.push('\n');
    s
}

// ---------------------------------------------------------------------
// explain

fn explain(p: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Policy {} ({}), incident {}, attempt {}",
        field(p, "id"),
        field(p, "approval_status"),
        field(p, "incident_id"),
        field(p, "attempt")
    );

    // Why this remedy.
    out.push_str("\nWHY THIS REMEDY\n");
    let items = vec![
        (
            "cause",
            format!(
                "{} (confidence {})",
                field(p, "root_cause"),
                num2(&p["root_cause_confidence"])
            ),
        ),
        ("scope", field(p, "scope")),
        (
            "score",
            format!(
                "{} (benefit {} - cost {})",
                num2(&p["score"]),
                num2(&p["benefit_estimate"]),
                num2(&p["cost_estimate"])
            ),
        ),
        (
            "risk",
            format!(
                "{}, priority {}",
                field(p, "risk_level"),
                field(p, "priority")
            ),
        ),
        ("expected", field(p, "expected_impact")),
    ];
    out.push_str(&pairs(&items, "  "));
    match p.get("actions").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => {
            out.push_str("  actions:\n");
            let mut t = Table::new(&["ID", "ACTION", "TARGET", "PARAMETERS", "AFTER", "UNDO"]);
            for x in a {
                let undo = match x.get("rollback") {
                    Some(r) if r.is_object() => field(r, "action_type"),
                    _ => "not reversible".into(),
                };
                let params = match x.get("parameters") {
                    Some(Value::Object(m)) if !m.is_empty() => {
                        cut(&Value::Object(m.clone()).to_string(), 50)
                    }
                    _ => "-".into(),
                };
                t.row(vec![
                    field(x, "id"),
                    field(x, "action_type"),
                    field(x, "target"),
                    params,
                    field(x, "depends_on"),
                    undo,
                ]);
            }
            out.push_str(&t.render("    "));
        }
        _ => out.push_str("  actions:  none\n"),
    }
    match p.get("candidates").and_then(Value::as_array) {
        Some(c) if !c.is_empty() => {
            out.push_str("  candidates:\n");
            let mut t = Table::new(&["REMEDY", "SAMPLED", "SUCCESSES", "FAILURES", "CHOSEN"]);
            for x in c {
                let chosen = match x.get("chosen").and_then(Value::as_bool) {
                    Some(true) => "*".to_string(),
                    Some(false) => String::new(),
                    None => "-".into(),
                };
                t.row(vec![
                    cut(&field(x, "remedy"), 60),
                    field(x, "sampled"),
                    field(x, "successes"),
                    field(x, "failures"),
                    chosen,
                ]);
            }
            out.push_str(&t.render("    "));
        }
        Some(_) => out.push_str("  candidates:  none recorded\n"),
        None => out.push_str("  candidates:  not reported by this daemon\n"),
    }

    // Why (not) auto-approved.
    out.push_str("\nAPPROVAL\n");
    match p.get("autonomy").filter(|a| a.is_object()) {
        Some(a) => {
            let items = vec![
                ("mode", field(a, "mode")),
                ("auto-approved", field(a, "auto_approved")),
                ("reason", field(a, "reason")),
            ];
            out.push_str(&pairs(&items, "  "));
        }
        None => {
            let decisions = p
                .get("decisions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let auto = decisions
                .iter()
                .any(|d| d.get("by").and_then(Value::as_str) == Some("auto"));
            let verdict = if auto {
                "yes (a decision by `auto`)".to_string()
            } else if decisions.is_empty() {
                format!("no (no decision yet; {})", field(p, "approval_status"))
            } else {
                "no (decided by a person)".to_string()
            };
            out.push_str(&pairs(&[("auto-approved", verdict)], "  "));
        }
    }
    match p.get("decisions").and_then(Value::as_array) {
        Some(d) if !d.is_empty() => {
            out.push_str("  decisions:\n");
            let mut t = Table::new(&["STATUS", "BY", "AT", "REASON"]);
            for x in d {
                t.row(vec![
                    field(x, "status"),
                    field(x, "by"),
                    when(&x["at"]),
                    field(x, "reason"),
                ]);
            }
            out.push_str(&t.render("    "));
        }
        _ => out.push_str("  decisions:  none\n"),
    }

    // Guards.
    out.push_str("\nGUARDS\n");
    match p.get("guards").and_then(Value::as_array) {
        Some(g) if !g.is_empty() => {
            let mut t = Table::new(&["GUARD", "DECISION", "AT", "REASON"]);
            for x in g {
                t.row(vec![
                    field(x, "guard"),
                    field(x, "decision"),
                    when(&x["at"]),
                    field(x, "reason"),
                ]);
            }
            out.push_str(&t.render("  "));
        }
        _ => out.push_str("  none recorded\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_units_and_plain_seconds() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        for bad in [
            "",
            "0",
            "0s",
            "m",
            "5x",
            "10m5",
            "-3s",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tables_align_columns_and_trim_the_last() {
        let mut t = Table::new(&["ID", "STATE", "REASON"]);
        t.row(vec!["inc-1".into(), "open".into(), "-".into()]);
        t.row(vec!["i".into(), "escalated".into(), "no route".into()]);
        assert_eq!(
            t.render(""),
            "ID     STATE      REASON\ninc-1  open       -\ni      escalated  no route\n"
        );
    }

    #[test]
    fn missing_fields_print_as_a_dash() {
        let state = json!({"state": {"iteration": 3, "is_running": true, "error": null}});
        let s = status_table("http://x", &state, &Value::Null);
        assert!(s.contains("paused:") && s.contains("mode:"), "{s}");
        let paused = s.lines().find(|l| l.starts_with("paused:")).unwrap_or("");
        assert!(paused.ends_with('-'), "{s}");
        let s = status_table(
            "http://x",
            &json!({"state": {"paused": true, "pause": {"by": "al", "reason": "deploy", "at": "2026-03-01T12:00:00Z"}, "mode": "shadow"}}),
            &json!({"ready": true}),
        );
        assert!(
            s.contains("yes, by al at 2026-03-01 12:00:00Z: deploy"),
            "{s}"
        );
        assert!(s.contains("shadow"), "{s}");
    }

    #[test]
    fn incidents_table_shows_diagnosis_and_age() {
        let now = Utc::now();
        let opened = (now - chrono::Duration::seconds(600)).to_rfc3339();
        let v = json!({"incidents": [{"id": "inc-1", "state": "escalated", "severity": "critical",
            "components": ["charter", "gateway"], "violation_count": 4, "opened_at": opened,
            "diagnosis": {"cause": "cascade_failure", "confidence": 0.8123}, "reason": "no route"}],
            "next": null});
        let s = incidents_table_at(&v, now);
        let row = s.lines().nth(1).unwrap_or("");
        for want in [
            "inc-1",
            "escalated",
            "critical",
            "charter,gateway",
            "cascade_failure",
            "0.81",
            "10m",
            "no route",
        ] {
            assert!(row.contains(want), "{want}: {s}");
        }
    }

    #[test]
    fn explain_falls_back_without_the_new_fields() {
        let p = json!({"id": "pol-1", "approval_status": "approved", "root_cause": "node_crash",
            "root_cause_confidence": 0.9, "actions": [{"id": "a1", "action_type": "RESTART_SERVICE",
            "target": "charter", "parameters": {}, "depends_on": [], "rollback": null}],
            "decisions": [{"status": "approved", "by": "auto", "at": "2026-03-01T12:00:00Z", "reason": null}]});
        let s = explain(&p);
        assert!(s.contains("node_crash (confidence 0.90)"), "{s}");
        assert!(
            s.contains("RESTART_SERVICE") && s.contains("not reversible"),
            "{s}"
        );
        assert!(s.contains("yes (a decision by `auto`)"), "{s}");
        assert!(s.contains("GUARDS\n  none recorded"), "{s}");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("pol-01a_b.c"), "pol-01a_b.c");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
    }
}
