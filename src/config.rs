//! Daemon configuration: the YAML file, environment overrides and validation.
//!
//! The configuration is read from a YAML file (see `config/mapek.yaml` for a
//! commented example listing every key with its default), then overridden by
//! environment variables, then validated. Every problem is collected and
//! reported at once, each with the dotted path of its key:
//!
//! * unknown keys (`monitor.intervall_seconds: unknown key`), found anywhere,
//!   including inside list items (`monitor.rules[0].foo: unknown key`);
//! * values of the wrong type (`plan.min_confidence: invalid type: ...`),
//!   every one of them, in every section (a wrong value is set aside and
//!   the rest of its section is still read and validated);
//! * unparseable environment overrides (`env MAPE_K_INTERVAL: ...`);
//! * values out of range and inconsistent combinations (`validate`).
//!
//! Library users who do not want a file can start from [`Config::builder`].
//!
//! Values given in the file are laid over the defaults key by key, also in
//! nested tables; lists (such as `monitor.rules`) replace the default list.
//! Beware of YAML 1.1 booleans: an unquoted `y`, `n`, `yes`, `no`, `on` or
//! `off` is a boolean, not a string.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mapek_actors::model::ActionType;
use mapek_actors::settings::{
    AnalyzeSettings, ConfigIssue, ExecuteSettings, Issues, KnowledgeSettings, Mode,
    MonitorSettings, OrchestratorSettings, PlanSettings, RuleSpec, SafetySettings,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Origin name used for configurations that do not come from a file.
const DEFAULTS_ORIGIN: &str = "defaults";

/// The whole daemon configuration, one field per section of the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Orchestrator and supervisor: chain time limit, restart intensity,
    /// mailbox sizes.
    pub orchestrator: OrchestratorSettings,
    /// Monitor phase: poll interval, staleness and the PromQL rules.
    pub monitor: MonitorSettings,
    /// Prometheus server the Monitor queries.
    pub prometheus: PrometheusSettings,
    /// Analyze phase: window and pattern detectors.
    pub analyze: AnalyzeSettings,
    /// Plan phase: thresholds, approval and action costs.
    pub plan: PlanSettings,
    /// Execute phase: effector calls, retries and verification.
    pub execute: ExecuteSettings,
    /// Knowledge base: storage and learning.
    pub knowledge: KnowledgeSettings,
    /// The managed "Charter" system (the default effector).
    pub charter: CharterSettings,
    /// Which effector carries out which action type, and the settings of
    /// the command and webhook effectors.
    pub effectors: EffectorsSettings,
    /// Alertmanager: alerts pushed to the webhook.
    pub alertmanager: AlertmanagerSettings,
    /// HTTP API of the daemon.
    pub api: ApiSettings,
    /// Logging.
    pub logging: LoggingSettings,
    /// Dependency map: component → the components it depends on. Violations
    /// on components joined by a direct edge, with onsets within
    /// `analyze.causal.max_lag_seconds`, form one incident; a cascade is
    /// remedied at the upstream component.
    pub topology: BTreeMap<String, Vec<String>>,
    /// Safety guards: mode (act, dry_run, shadow), disruption budget,
    /// rate limits, circuit breakers, flapping, recurrence (docs/SAFETY.md).
    pub safety: SafetySettings,
    /// Cluster mode on etcd (docs/OPERATIONS.md, "Cluster mode"): replicas
    /// elect a leader per shard. Absent: one process, no outside service.
    /// Needs a build with the `cluster` feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSettings>,
}

/// Cluster mode: replicas coordinate through etcd (v3 API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterSettings {
    /// etcd client URLs (`http://host:port`). Environment override:
    /// `MAPEK_ETCD_ENDPOINTS`, comma-separated (which also turns cluster
    /// mode on when the file has no `cluster` section).
    pub etcd_endpoints: Vec<String>,
    /// This replica's name, unique in the cluster (1 to 64 characters of
    /// `A-Z a-z 0-9 . _ -`); empty: the host name.
    pub name: String,
    /// TTL of the leases (membership and each shard's leadership), seconds
    /// (at least 2): a dead leader's shards are taken over within about
    /// this time. A leader renews its leases every third of it and stops
    /// leading before a lease it could not renew can have expired.
    pub lease_seconds: u64,
    /// Number of shards (at least 1): components map to shards by
    /// rendezvous hashing of their names; each shard has its own leader.
    pub shards: u32,
    /// Prefix of every etcd key of this cluster (starts with `/`, does not
    /// end with `/`): two clusters on one etcd need different prefixes.
    pub prefix: String,
    /// `host:port` at which the other replicas reach this one's API (a
    /// mutating call that reaches a replica not leading its shard is
    /// forwarded there). Empty: the listen address, with the host name in
    /// place of an unspecified IP (`0.0.0.0`). Environment override:
    /// `MAPEK_ADVERTISE_ADDRESS` (in Kubernetes, the pod IP and port).
    pub advertise: String,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            etcd_endpoints: Vec::new(),
            name: String::new(),
            lease_seconds: 10,
            shards: 1,
            prefix: "/mapek".into(),
            advertise: String::new(),
        }
    }
}

/// The reason given for a `cluster` section in a build without the
/// `cluster` feature.
pub const NO_CLUSTER_SUPPORT: &str = "built without cluster support; build with --features cluster";

/// Largest `cluster.shards`.
pub const MAX_SHARDS: u32 = 1024;

impl ClusterSettings {
    /// The replica's name: `name`, or the host name when it is empty
    /// (`mapek` when even that cannot be read).
    pub fn effective_name(&self) -> String {
        if !self.name.trim().is_empty() {
            return self.name.trim().to_string();
        }
        host_name().unwrap_or_else(|| "mapek".to_string())
    }

    fn validate(&self, out: &mut Vec<ConfigIssue>) {
        if !cfg!(feature = "cluster") {
            // Everything else would be moot: say the one thing to do.
            return Issues::new("", out).push("cluster", NO_CLUSTER_SUPPORT);
        }
        let mut i = Issues::new("cluster", out);
        if self.etcd_endpoints.is_empty() {
            i.push(
                "etcd_endpoints",
                "must list at least one etcd URL such as http://127.0.0.1:2379 (or set MAPEK_ETCD_ENDPOINTS)",
            );
        }
        for (n, e) in self.etcd_endpoints.iter().enumerate() {
            let key = format!("etcd_endpoints[{n}]");
            if e.starts_with("https://") {
                i.push(
                    &key,
                    format!("TLS to etcd is not supported yet: use http:// (got {e:?})"),
                );
                continue;
            }
            if !e.starts_with("http://") {
                i.push(&key, format!("must start with http:// (got {e:?})"));
                continue;
            }
            match ::url::Url::parse(e) {
                Err(err) => i.push(&key, format!("is not a valid URL: {err} (got {e:?})")),
                Ok(u) if u.host_str().is_none_or(str::is_empty) => {
                    i.push(&key, format!("has no host (got {e:?})"))
                }
                Ok(u) if u.path() != "/" || u.query().is_some() => {
                    i.push(&key, format!("must be a bare http://host:port (got {e:?})"))
                }
                Ok(_) => {}
            }
        }
        let name = self.effective_name();
        let ok_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !ok_name {
            let what = if self.name.trim().is_empty() {
                format!("the host name {name:?} is not a valid replica name: set cluster.name")
            } else {
                format!("must be 1 to 64 characters of A-Z a-z 0-9 . _ - (got {name:?})")
            };
            i.push("name", what);
        }
        i.at_least("lease_seconds", self.lease_seconds, 2);
        if self.lease_seconds > 3600 {
            i.push(
                "lease_seconds",
                format!("must be at most 3600 (got {})", self.lease_seconds),
            );
        }
        i.at_least("shards", self.shards, 1);
        if self.shards > MAX_SHARDS {
            i.push(
                "shards",
                format!("must be at most {MAX_SHARDS} (got {})", self.shards),
            );
        }
        let p = &self.prefix;
        if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') || p.contains(char::is_whitespace)
        {
            i.push(
                "prefix",
                format!("must start with `/`, not end with `/` and have no spaces, such as /mapek (got {p:?})"),
            );
        }
        let a = self.advertise.trim();
        if !a.is_empty() {
            let ok = a.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.contains(['/', ' '])
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                i.push(
                    "advertise",
                    format!("must be host:port where the other replicas reach this one's API, such as 10.0.0.5:8001 (got {a:?})"),
                );
            }
        }
    }
}

/// The host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else
/// `/etc/hostname`).
pub fn host_name() -> Option<String> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    [
        read("/proc/sys/kernel/hostname"),
        std::env::var("HOSTNAME").ok(),
        read("/etc/hostname"),
    ]
    .into_iter()
    .flatten()
    .map(|s| s.trim().to_string())
    .find(|s| !s.is_empty())
}

/// Prometheus server queried by the Monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrometheusSettings {
    /// Base URL of the Prometheus HTTP API (`http://` or `https://`).
    /// Environment override: `PROMETHEUS_URL`.
    pub url: String,
    /// Timeout of one query, seconds (at least 1).
    pub timeout_seconds: u64,
    /// Retries of a failed query (at most 10).
    pub retries: u32,
    /// Poll Prometheus at all; when false only Alertmanager alerts feed the
    /// loop.
    pub enabled: bool,
}

impl Default for PrometheusSettings {
    fn default() -> Self {
        PrometheusSettings {
            url: "http://127.0.0.1:9090".into(),
            timeout_seconds: 10,
            retries: 2,
            enabled: true,
        }
    }
}

/// The managed "Charter" system, which is also the effector.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CharterSettings {
    /// Base URL of the Charter API (`http://` or `https://`).
    /// Environment override: `CHARTER_URL`.
    pub url: String,
    /// API key sent to Charter; empty for none. Prefer the environment
    /// variable `CHARTER_API_KEY` to keeping it in the file.
    pub api_key: String,
    /// Timeout of one request to Charter, seconds (at least 1).
    pub timeout_seconds: u64,
}

impl Default for CharterSettings {
    fn default() -> Self {
        CharterSettings {
            url: "http://127.0.0.1:8080".into(),
            api_key: String::new(),
            timeout_seconds: 30,
        }
    }
}

impl fmt::Debug for CharterSettings {
    /// Like the derived `Debug`, but never prints the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.api_key.is_empty() {
            "<none>"
        } else {
            "<redacted>"
        };
        f.debug_struct("CharterSettings")
            .field("url", &self.url)
            .field("api_key", &key)
            .field("timeout_seconds", &self.timeout_seconds)
            .finish()
    }
}

/// An effector that `effectors.default` and `effectors.routes` can name.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EffectorKind {
    /// The Charter REST API (section `charter`).
    #[default]
    Charter,
    /// A local program (section `effectors.command`).
    Command,
    /// An HTTP webhook (section `effectors.webhook`).
    Webhook,
    /// No effector: the Executor fails policies containing such actions with
    /// "no effector configured", before running any of their actions.
    None,
}

impl EffectorKind {
    /// Every effector name.
    pub const ALL: [EffectorKind; 4] = [
        EffectorKind::Charter,
        EffectorKind::Command,
        EffectorKind::Webhook,
        EffectorKind::None,
    ];

    /// Lower-case name, as written in the file (`charter`).
    pub fn as_str(self) -> &'static str {
        match self {
            EffectorKind::Charter => "charter",
            EffectorKind::Command => "command",
            EffectorKind::Webhook => "webhook",
            EffectorKind::None => "none",
        }
    }
}

impl fmt::Display for EffectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One route by component (`effectors.component_routes[N]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComponentRouteSettings {
    /// Component globs (`payments-*`); at least one.
    pub components: Vec<String>,
    /// Action types the route carries (empty: every type).
    pub actions: Vec<ActionType>,
    /// Effector of the matching actions.
    pub effector: EffectorKind,
    /// The route's own safety mode (`act`, `dry_run`, `shadow`); the
    /// stricter of it and `safety.mode` applies.
    pub mode: Option<Mode>,
}

/// Which effector carries out which action type, and the settings of the
/// effectors other than Charter (whose settings are the `charter` section).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EffectorsSettings {
    /// Effector for the action types not listed in `routes`.
    pub default: EffectorKind,
    /// Effector per action type (`RESTART_SERVICE: command`), overriding
    /// `default`.
    #[serde(deserialize_with = "deserialize_routes")]
    pub routes: BTreeMap<ActionType, EffectorKind>,
    /// Components (globs: `*`, `?`, `[..]`) that `default` and `routes`
    /// cover; empty means every component. An action on a component that
    /// neither these nor `component_routes` cover is escalated to a person,
    /// never sent to an unrelated system.
    pub default_components: Vec<String>,
    /// Routes by component, checked first, in order (first match wins).
    pub component_routes: Vec<ComponentRouteSettings>,
    /// The command effector: runs a local program per action.
    pub command: CommandSettings,
    /// The webhook effector: POSTs each action as JSON.
    pub webhook: WebhookSettings,
}

impl EffectorsSettings {
    /// The effector carrying out `action`: its route, else the default.
    pub fn kind_for(&self, action: ActionType) -> EffectorKind {
        self.routes.get(&action).copied().unwrap_or(self.default)
    }

    /// Whether any action type is carried out by `kind`.
    pub fn uses(&self, kind: EffectorKind) -> bool {
        ActionType::ALL.iter().any(|a| self.kind_for(*a) == kind)
    }

    /// Key paths that make some action type use `kind`
    /// (`effectors.default`, `effectors.routes.FAILOVER`).
    fn users_of(&self, kind: EffectorKind) -> Vec<String> {
        let mut users = Vec::new();
        let default_used = ActionType::ALL.iter().any(|a| !self.routes.contains_key(a));
        if self.default == kind && default_used {
            users.push("effectors.default".to_string());
        }
        for (action, k) in &self.routes {
            if *k == kind {
                users.push(format!("effectors.routes.{}", action.as_str()));
            }
        }
        for (n, r) in self.component_routes.iter().enumerate() {
            if r.effector == kind {
                users.push(format!("effectors.component_routes[{n}].effector"));
            }
        }
        users
    }

    /// Records the problems of the section under `effectors`.
    fn validate(&self, out: &mut Vec<ConfigIssue>) {
        let mut i = Issues::new("effectors", out);
        for (n, g) in self.default_components.iter().enumerate() {
            if let Err(e) = glob::Pattern::new(g) {
                i.push(
                    &format!("default_components[{n}]"),
                    format!("invalid glob `{g}`: {e}"),
                );
            }
        }
        for (n, r) in self.component_routes.iter().enumerate() {
            if r.components.is_empty() {
                i.push(
                    &format!("component_routes[{n}].components"),
                    "must list at least one component glob",
                );
            }
            for (m, g) in r.components.iter().enumerate() {
                if let Err(e) = glob::Pattern::new(g) {
                    i.push(
                        &format!("component_routes[{n}].components[{m}]"),
                        format!("invalid glob `{g}`: {e}"),
                    );
                }
            }
        }
        let command_users = self.users_of(EffectorKind::Command);
        if !command_users.is_empty() && self.command.program.trim().is_empty() {
            i.push(
                "command.program",
                format!(
                    "required because {} the command effector",
                    name_users(&command_users)
                ),
            );
        }
        for (n, arg) in self.command.args.iter().enumerate() {
            if let Err(why) = crate::effectors::check_template(arg) {
                i.push(&format!("command.args[{n}]"), why);
            }
        }
        i.at_least("command.timeout_seconds", self.command.timeout_seconds, 1);
        for (n, code) in self.command.retry_exit_codes.iter().enumerate() {
            if !(1..=255).contains(code) {
                i.push(
                    &format!("command.retry_exit_codes[{n}]"),
                    format!("must be an exit code between 1 and 255 (got {code})"),
                );
            }
        }

        let webhook_users = self.users_of(EffectorKind::Webhook);
        if self.webhook.url.is_empty() && !webhook_users.is_empty() {
            i.push(
                "webhook.url",
                format!(
                    "required because {} the webhook effector",
                    name_users(&webhook_users)
                ),
            );
        }
        for (name, value) in &self.webhook.headers {
            let key = format!("webhook.headers.{name}");
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                i.push(&key, "is not a valid HTTP header name");
            } else if reqwest::header::HeaderValue::from_str(value).is_err() {
                i.push(
                    &key,
                    "is not a valid HTTP header value (control characters or non-ASCII)",
                );
            }
        }
        i.at_least("webhook.timeout_seconds", self.webhook.timeout_seconds, 1);
        if !self.webhook.url.is_empty() {
            check_url(
                &mut Issues::new("effectors.webhook", out),
                &self.webhook.url,
            );
        }
    }
}

/// Reads `effectors.routes`, reporting an unknown action type at its own
/// path (`effectors.routes.SCALE_SIDEWAYS`) rather than at the map's: the
/// error is raised while the key's value is read, once the path tracker has
/// recorded the key.
fn deserialize_routes<'de, D>(d: D) -> Result<BTreeMap<ActionType, EffectorKind>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::{DeserializeSeed, Error, MapAccess, Visitor};

    /// Fails the value of an unknown action type with a helpful reason.
    struct UnknownActionType(String);

    impl<'de> DeserializeSeed<'de> for UnknownActionType {
        type Value = ();
        fn deserialize<D2: serde::Deserializer<'de>>(self, _d: D2) -> Result<(), D2::Error> {
            Err(D2::Error::custom(unknown_action_type(&self.0)))
        }
    }

    struct Routes;

    impl<'de> Visitor<'de> for Routes {
        type Value = BTreeMap<ActionType, EffectorKind>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping of action types to effector names")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut routes = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                match ActionType::ALL.into_iter().find(|a| a.as_str() == key) {
                    Some(action) => {
                        routes.insert(action, map.next_value::<EffectorKind>()?);
                    }
                    None => {
                        map.next_value_seed(UnknownActionType(key.clone()))?;
                        return Err(A::Error::custom(unknown_action_type(&key)));
                    }
                }
            }
            Ok(routes)
        }
    }

    d.deserialize_map(Routes)
}

fn unknown_action_type(key: &str) -> String {
    match ActionType::parse(key) {
        Some(a) => format!("unknown action type `{key}` (action types are upper case: `{a}`)"),
        None => format!(
            "unknown action type `{key}`, expected one of {}",
            ActionType::ALL
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// "`a` uses" / "`a` and `b` use" / "`a`, `b` and `c` use".
fn name_users(users: &[String]) -> String {
    match users {
        [] => String::new(),
        [one] => format!("{one} uses"),
        [init @ .., last] => format!("{} and {last} use", init.join(", ")),
    }
}

/// The command effector: runs a program per action, without a shell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CommandSettings {
    /// Path of the program (searched in `PATH` when it has no `/`);
    /// required when an action type uses the command effector.
    pub program: String,
    /// Argument templates, one argument each (never split, never given to a
    /// shell). Placeholders: `{action}` (`SCALE_UP`), `{target}`,
    /// `{param.NAME}` (a parameter as plain text; missing or null: empty),
    /// `{params_json}`; `{{` and `}}` are literal braces.
    pub args: Vec<String>,
    /// The program is killed after this many seconds (at least 1); a
    /// timeout is a transient failure, retried by the Executor.
    pub timeout_seconds: u64,
    /// Exit codes meaning "try again later" (1..255), retried by the
    /// Executor; other non-zero codes reject the action.
    pub retry_exit_codes: Vec<i32>,
}

impl Default for CommandSettings {
    fn default() -> Self {
        CommandSettings {
            program: String::new(),
            args: Vec::new(),
            timeout_seconds: 30,
            // EX_TEMPFAIL of sysexits.h.
            retry_exit_codes: vec![75],
        }
    }
}

/// The webhook effector: POSTs each action, rollback and pre-flight
/// validation as JSON to one URL.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookSettings {
    /// URL the requests are POSTed to (`http://` or `https://`); required
    /// when an action type uses the webhook effector.
    pub url: String,
    /// Extra HTTP headers sent with every request (`Authorization: ...`).
    pub headers: BTreeMap<String, String>,
    /// Timeout of one request, seconds (at least 1).
    pub timeout_seconds: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            url: String::new(),
            headers: BTreeMap::new(),
            timeout_seconds: 10,
        }
    }
}

impl fmt::Debug for WebhookSettings {
    /// Like the derived `Debug`, but never prints header values (they often
    /// hold credentials).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: BTreeMap<&str, &str> = self
            .headers
            .keys()
            .map(|k| (k.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("WebhookSettings")
            .field("url", &self.url)
            .field("headers", &headers)
            .field("timeout_seconds", &self.timeout_seconds)
            .finish()
    }
}

/// Alertmanager, which pushes alerts to the daemon's webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AlertmanagerSettings {
    /// Accept alerts on the webhook.
    pub enabled: bool,
    /// Base URL of Alertmanager (`http://` or `https://`).
    /// Environment override: `ALERTMANAGER_URL`.
    pub url: String,
    /// Path of the webhook on the daemon's HTTP port (starts with `/`).
    pub webhook_path: String,
    /// Largest accepted webhook body, bytes (at least 1024).
    pub max_body_bytes: usize,
    /// Verify remedies of webhook alerts by asking Alertmanager which alerts
    /// fire now (`GET /api/v2/alerts` on `url`), not by waiting for resolved
    /// notifications; Alertmanager unreachable at verification means no
    /// evidence (outcome UNKNOWN).
    pub verify_with_api: bool,
    /// Post every escalation to Alertmanager as an alert of its own
    /// (`POST /api/v2/alerts` on `url`, `alertname="MapekEscalation"`),
    /// re-posted while it lasts and resolved when the incident is remedied
    /// or closes, so it reaches the on-call route.
    pub post_escalations: bool,
}

impl Default for AlertmanagerSettings {
    fn default() -> Self {
        AlertmanagerSettings {
            enabled: true,
            url: "http://127.0.0.1:9093".into(),
            webhook_path: "/api/v1/alerts".into(),
            max_body_bytes: 1_048_576,
            verify_with_api: true,
            post_escalations: true,
        }
    }
}

/// HTTP API of the daemon (health, metrics, webhook, JSON API).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiSettings {
    /// Address and port to listen on, such as `127.0.0.1:8001` or
    /// `0.0.0.0:8001`.
    pub listen: String,
    /// Bearer token required on the JSON API and the webhook
    /// (`Authorization: Bearer TOKEN`); empty for none. `/health`, `/ready`
    /// and `/metrics` stay open for probes and scrapers. Prefer the
    /// environment variable `MAPEK_API_TOKEN` to keeping it in the file.
    /// Its caller is named `token` in the audit trail.
    pub token: String,
    /// Named tokens, `name: token`: a caller is known by the name of its
    /// token, which is recorded as `by` on approvals, rejections, pauses,
    /// silences and clears.
    pub tokens: BTreeMap<String, String>,
    /// Listen on a non-loopback address without any token. Off by
    /// default: `mapek run` refuses to expose an open API.
    pub allow_unauthenticated: bool,
    /// Most connections open at once. At the cap, a new connection
    /// closes the oldest one that has not sent a complete request head
    /// (else the oldest idle keep-alive one, else one busy for more than
    /// twice `request_timeout_seconds`); otherwise the new one is refused.
    pub max_connections: usize,
    /// Longest time a request may take to produce its response head; a
    /// slower one is answered `503` with a JSON error.
    pub request_timeout_seconds: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            listen: "127.0.0.1:8001".into(),
            token: String::new(),
            tokens: BTreeMap::new(),
            allow_unauthenticated: false,
            max_connections: 1024,
            request_timeout_seconds: 30,
        }
    }
}

/// Name of the caller of the single `api.token`.
pub const LEGACY_TOKEN_NAME: &str = "token";

impl ApiSettings {
    /// Every accepted token with its caller's name (`api.tokens`, then
    /// `api.token` as `token`).
    pub fn credentials(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .tokens
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        if !self.token.is_empty() {
            out.push((LEGACY_TOKEN_NAME.to_string(), self.token.clone()));
        }
        out
    }

    /// Why listening on `addr` would expose an open API, if it would: a
    /// non-loopback address with no token, unless `allow_unauthenticated`.
    pub fn exposure(&self, addr: SocketAddr) -> Option<String> {
        if addr.ip().is_loopback()
            || self.allow_unauthenticated
            || !self.token.is_empty()
            || !self.tokens.is_empty()
        {
            return None;
        }
        Some(format!(
            "{addr} is not a loopback address and no token is set: set api.token (or MAPEK_API_TOKEN) or api.tokens, or api.allow_unauthenticated: true to expose an open API on purpose"
        ))
    }
}

impl fmt::Debug for ApiSettings {
    /// Like the derived `Debug`, but never prints the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = if self.token.is_empty() {
            "<none>"
        } else {
            "<redacted>"
        };
        let names: Vec<&String> = self.tokens.keys().collect();
        f.debug_struct("ApiSettings")
            .field("listen", &self.listen)
            .field("token", &token)
            .field("tokens", &names)
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .field("max_connections", &self.max_connections)
            .field("request_timeout_seconds", &self.request_timeout_seconds)
            .finish()
    }
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoggingSettings {
    /// Lowest level logged: `trace`, `debug`, `info`, `warn` or `error`.
    /// Environment override: `LOG_LEVEL`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LoggingSettings {
    fn default() -> Self {
        LoggingSettings {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Accepted values of `logging.level`.
pub const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not valid YAML.
    #[error("{origin}: YAML syntax error: {message}")]
    Syntax {
        /// File name (or other origin) of the text.
        origin: String,
        /// What is wrong, with line and column when known.
        message: String,
    },
    /// The YAML is well-formed but the configuration is wrong: every problem
    /// found (unknown keys, wrong types, bad environment values, values out
    /// of range), each with its key path.
    #[error("{}", render_issues(origin, issues))]
    Invalid {
        /// File name (or other origin) of the configuration.
        origin: String,
        /// Every problem found.
        issues: Vec<ConfigIssue>,
    },
}

impl ConfigError {
    /// The issues of an `Invalid` error; empty for the other variants.
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            ConfigError::Invalid { issues, .. } => issues,
            _ => &[],
        }
    }
}

fn render_issues(origin: &str, issues: &[ConfigIssue]) -> String {
    let noun = if issues.len() == 1 { "issue" } else { "issues" };
    let mut s = format!(
        "invalid configuration in {origin} ({} {noun}):",
        issues.len()
    );
    for issue in issues {
        s.push_str("\n  - ");
        s.push_str(&issue.to_string());
    }
    s
}

/// Reads an environment variable of the process; the usual lookup for
/// [`Config::apply_env`] and [`Config::load_with_env`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Config {
    /// Parses and validates a YAML configuration. `origin` names the text in
    /// messages (usually the file name). An empty document gives the
    /// defaults.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let (config, mut issues) = parse_yaml(text, origin)?;
        issues.extend(config.validate());
        finish(config, origin, issues)
    }

    /// Reads, parses and validates a YAML configuration file (no environment
    /// overrides; see [`Config::load_with_env`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_file(path)?;
        Config::from_yaml_str(&text, &path.display().to_string())
    }

    /// The configuration of the daemon: the file at `path` (or the defaults
    /// when `None`), then the environment overrides read through `get`
    /// (see [`Config::apply_env`]), then validation. All problems of the
    /// three steps are reported together.
    pub fn load_with_env(
        path: Option<&Path>,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (mut config, mut issues, origin) = match path {
            Some(path) => {
                let origin = path.display().to_string();
                let text = read_file(path)?;
                let (config, issues) = parse_yaml(&text, &origin)?;
                (config, issues, origin)
            }
            None => (Config::default(), Vec::new(), DEFAULTS_ORIGIN.to_string()),
        };
        issues.extend(config.apply_env(get));
        issues.extend(config.validate());
        finish(config, &origin, issues)
    }

    /// Applies the environment overrides read through `get` (pass
    /// [`process_env`] for the real environment):
    ///
    /// | variable              | key                         |
    /// |-----------------------|-----------------------------|
    /// | `PROMETHEUS_URL`      | `prometheus.url`            |
    /// | `CHARTER_URL`         | `charter.url`               |
    /// | `CHARTER_API_KEY`     | `charter.api_key`           |
    /// | `MAPEK_API_TOKEN`     | `api.token`                 |
    /// | `MAPEK_MODE`          | `safety.mode`               |
    /// | `ALERTMANAGER_URL`    | `alertmanager.url`          |
    /// | `MAPE_K_INTERVAL`     | `monitor.interval_seconds`  |
    /// | `MAPE_K_THRESHOLD`    | `plan.plan_threshold`       |
    /// | `MAPE_K_AUTO_APPROVE` | `plan.auto_approve`         |
    /// | `LOG_LEVEL`           | `logging.level`             |
    /// | `MAPEK_ETCD_ENDPOINTS`| `cluster.etcd_endpoints` (comma-separated; turns cluster mode on) |
    /// | `MAPEK_ADVERTISE_ADDRESS` | `cluster.advertise` (with a `cluster` section) |
    ///
    /// Variables that are unset or empty are ignored. Values that cannot be
    /// parsed leave the key unchanged and are returned as issues with the
    /// path `env NAME`. The result is not validated here.
    pub fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let lookup = |name: &str| -> Option<String> {
            get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let mut bad = |name: &str, reason: String| {
            issues.push(ConfigIssue {
                path: format!("env {name}"),
                reason,
            });
        };

        if let Some(v) = lookup("PROMETHEUS_URL") {
            self.prometheus.url = v;
        }
        if let Some(v) = lookup("CHARTER_URL") {
            self.charter.url = v;
        }
        if let Some(v) = lookup("CHARTER_API_KEY") {
            self.charter.api_key = v;
        }
        if let Some(v) = lookup("MAPEK_API_TOKEN") {
            self.api.token = v;
        }
        if let Some(v) = lookup("ALERTMANAGER_URL") {
            self.alertmanager.url = v;
        }
        if let Some(v) = lookup("MAPEK_MODE") {
            match Mode::parse(&v) {
                Some(m) => self.safety.mode = m,
                None => bad(
                    "MAPEK_MODE",
                    format!("must be one of act, dry_run, shadow (got {v:?})"),
                ),
            }
        }
        if let Some(v) = lookup("MAPE_K_INTERVAL") {
            match v.parse::<u64>() {
                Ok(n) => self.monitor.interval_seconds = n,
                Err(_) => bad(
                    "MAPE_K_INTERVAL",
                    format!("must be a whole number of seconds (got {v:?})"),
                ),
            }
        }
        if let Some(v) = lookup("MAPE_K_THRESHOLD") {
            match v.parse::<usize>() {
                Ok(n) => self.plan.plan_threshold = n,
                Err(_) => bad(
                    "MAPE_K_THRESHOLD",
                    format!("must be a whole number of violations (got {v:?})"),
                ),
            }
        }
        if let Some(v) = lookup("MAPE_K_AUTO_APPROVE") {
            match parse_bool(&v) {
                Some(b) => self.plan.auto_approve = b,
                None => bad(
                    "MAPE_K_AUTO_APPROVE",
                    format!("must be one of true, false, 1, 0, yes, no (got {v:?})"),
                ),
            }
        }
        if let Some(v) = lookup("LOG_LEVEL") {
            self.logging.level = v.to_ascii_lowercase();
        }
        if let Some(v) = lookup("MAPEK_ETCD_ENDPOINTS") {
            let endpoints: Vec<String> = v
                .split(',')
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect();
            self.cluster
                .get_or_insert_with(ClusterSettings::default)
                .etcd_endpoints = endpoints;
        }
        if let Some(v) = lookup("MAPEK_ADVERTISE_ADDRESS") {
            if let Some(c) = self.cluster.as_mut() {
                c.advertise = v.trim().to_string();
            }
        }
        issues
    }

    /// Every problem of the configuration: those of each section plus the
    /// URL, address and cross-section checks. Empty when it is valid.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        self.orchestrator.validate(&mut out);
        self.monitor.validate(&mut out);
        self.analyze.validate(&mut out);
        self.plan.validate(&mut out);
        self.execute.validate(&mut out);
        self.knowledge.validate(&mut out);
        self.safety.validate(&mut out);
        if let Some(c) = &self.cluster {
            c.validate(&mut out);
        }

        {
            let mut i = Issues::new("prometheus", &mut out);
            check_url(&mut i, &self.prometheus.url);
            i.at_least("timeout_seconds", self.prometheus.timeout_seconds, 1);
            if self.prometheus.retries > 10 {
                i.push(
                    "retries",
                    format!("must be at most 10 (got {})", self.prometheus.retries),
                );
            }
        }
        {
            let mut i = Issues::new("charter", &mut out);
            check_url(&mut i, &self.charter.url);
            i.at_least("timeout_seconds", self.charter.timeout_seconds, 1);
        }
        self.effectors.validate(&mut out);
        {
            let mut i = Issues::new("topology", &mut out);
            for (component, deps) in &self.topology {
                if component.trim().is_empty() {
                    i.push(component, "component names must not be empty");
                }
                for (n, d) in deps.iter().enumerate() {
                    if d.trim().is_empty() {
                        i.push(&format!("{component}[{n}]"), "must not be empty");
                    } else if d == component {
                        i.push(
                            &format!("{component}[{n}]"),
                            format!("`{component}` cannot depend on itself"),
                        );
                    }
                }
            }
        }
        {
            let mut i = Issues::new("alertmanager", &mut out);
            check_url(&mut i, &self.alertmanager.url);
            if !self.alertmanager.webhook_path.starts_with('/') {
                i.push(
                    "webhook_path",
                    format!(
                        "must start with `/` (got {:?})",
                        self.alertmanager.webhook_path
                    ),
                );
            }
            i.at_least("max_body_bytes", self.alertmanager.max_body_bytes, 1024);
        }
        {
            let mut i = Issues::new("api", &mut out);
            // Exposure without a token is refused by `mapek run` (the token
            // may come from MAPEK_API_TOKEN at run time only).
            if self.api.listen.parse::<SocketAddr>().is_err() {
                i.push(
                    "listen",
                    format!(
                        "must be an IP address and port such as 127.0.0.1:8001 (got {:?})",
                        self.api.listen
                    ),
                );
            }
            let mut seen: Vec<&str> = Vec::new();
            for (name, token) in &self.api.tokens {
                let key = format!("tokens.{name}");
                let ok_name = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
                if !ok_name {
                    i.push(
                        &key,
                        "a token's name must be 1 to 64 characters of A-Z a-z 0-9 . _ @ -",
                    );
                }
                if token.trim().is_empty() {
                    i.push(&key, "must not be empty");
                } else if seen.contains(&token.as_str()) || *token == self.api.token {
                    i.push(&key, "the same token is given to two callers");
                }
                seen.push(token);
            }
            i.at_least("max_connections", self.api.max_connections, 1);
            i.at_least(
                "request_timeout_seconds",
                self.api.request_timeout_seconds,
                1,
            );
        }
        {
            let mut i = Issues::new("logging", &mut out);
            if !LOG_LEVELS.contains(&self.logging.level.as_str()) {
                i.push(
                    "level",
                    format!(
                        "must be one of {} (got {:?})",
                        LOG_LEVELS.join(", "),
                        self.logging.level
                    ),
                );
            }
        }

        // Cross-section rules.
        let mut i = Issues::new("", &mut out);
        let acting = self
            .execute
            .verification_window_seconds
            .saturating_add(self.execute.call_timeout_seconds);
        if acting >= self.orchestrator.max_cycle_time_seconds {
            i.push(
                "execute.verification_window_seconds",
                format!(
                    "execute.verification_window_seconds ({}) + execute.call_timeout_seconds ({}) = {acting} \
                     must be less than orchestrator.max_cycle_time_seconds ({}): otherwise every chain \
                     that acts and then waits to verify its outcome is cut off before it can finish",
                    self.execute.verification_window_seconds,
                    self.execute.call_timeout_seconds,
                    self.orchestrator.max_cycle_time_seconds
                ),
            );
        }
        if self.monitor.interval_seconds > self.analyze.window_seconds {
            i.push(
                "monitor.interval_seconds",
                format!(
                    "must not exceed analyze.window_seconds ({}) (got {}): violations would leave \
                     the analysis window before the next poll could add to them",
                    self.analyze.window_seconds, self.monitor.interval_seconds
                ),
            );
        }
        out
    }

    /// Starts a builder from the defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }
}

/// Builds a [`Config`] in code, starting from the defaults; `build`
/// validates it.
#[derive(Debug, Clone, Default)]
pub struct ConfigBuilder {
    config: Config,
}

/// Whole seconds of `d`, rounded up (so 500 ms is 1 s, not an invalid 0).
fn ceil_secs(d: Duration) -> u64 {
    if d.subsec_nanos() > 0 {
        d.as_secs().saturating_add(1)
    } else {
        d.as_secs()
    }
}

impl ConfigBuilder {
    /// Starts from an existing configuration instead of the defaults.
    pub fn from_config(config: Config) -> Self {
        ConfigBuilder { config }
    }

    /// Sets `monitor.interval_seconds` (rounded up to whole seconds).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.config.monitor.interval_seconds = ceil_secs(interval);
        self
    }

    /// Sets `plan.plan_threshold`.
    pub fn with_plan_threshold(mut self, threshold: usize) -> Self {
        self.config.plan.plan_threshold = threshold;
        self
    }

    /// Sets `plan.auto_approve`.
    pub fn with_auto_approve(mut self, auto_approve: bool) -> Self {
        self.config.plan.auto_approve = auto_approve;
        self
    }

    /// Sets `prometheus.url`.
    pub fn with_prometheus_url(mut self, url: impl Into<String>) -> Self {
        self.config.prometheus.url = url.into();
        self
    }

    /// Sets `charter.url`.
    pub fn with_charter_url(mut self, url: impl Into<String>) -> Self {
        self.config.charter.url = url.into();
        self
    }

    /// Sets `charter.api_key`.
    pub fn with_charter_api_key(mut self, key: impl Into<String>) -> Self {
        self.config.charter.api_key = key.into();
        self
    }

    /// Sets `alertmanager.url`.
    pub fn with_alertmanager_url(mut self, url: impl Into<String>) -> Self {
        self.config.alertmanager.url = url.into();
        self
    }

    /// Sets `api.listen` (such as `127.0.0.1:8001`).
    pub fn with_listen(mut self, listen: impl Into<String>) -> Self {
        self.config.api.listen = listen.into();
        self
    }

    /// Sets `knowledge.data_dir`.
    pub fn with_data_dir(mut self, dir: impl Into<String>) -> Self {
        self.config.knowledge.data_dir = dir.into();
        self
    }

    /// Sets `orchestrator.max_cycle_time_seconds` (rounded up to whole
    /// seconds).
    pub fn with_max_cycle_time(mut self, max: Duration) -> Self {
        self.config.orchestrator.max_cycle_time_seconds = ceil_secs(max);
        self
    }

    /// Sets `execute.verification_window_seconds` (rounded up to whole
    /// seconds).
    pub fn with_verification_window(mut self, window: Duration) -> Self {
        self.config.execute.verification_window_seconds = ceil_secs(window);
        self
    }

    /// Replaces `monitor.rules`.
    pub fn with_rules(mut self, rules: Vec<RuleSpec>) -> Self {
        self.config.monitor.rules = rules;
        self
    }

    /// Sets `logging.level`.
    pub fn with_log_level(mut self, level: impl Into<String>) -> Self {
        self.config.logging.level = level.into();
        self
    }

    /// Changes anything else through a closure.
    pub fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// Validates and returns the configuration, or every problem found
    /// (origin `builder`).
    pub fn build(self) -> Result<Config, ConfigError> {
        let issues = self.config.validate();
        finish(self.config, "builder", issues)
    }
}

fn finish(config: Config, origin: &str, issues: Vec<ConfigIssue>) -> Result<Config, ConfigError> {
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            origin: origin.to_string(),
            issues,
        })
    }
}

/// Largest config file read: 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Reads a config file: only a regular file (a FIFO, a device such as
/// `/dev/zero` or a directory is refused at once, never read), of at most
/// [`MAX_CONFIG_BYTES`].
fn read_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let err = |source: std::io::Error| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(err(std::io::Error::other(format!(
            "{kind}: a config file must be a regular file"
        ))));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(err(std::io::Error::other(format!(
            "{} bytes, more than the {MAX_CONFIG_BYTES} a config file may have",
            meta.len()
        ))));
    }
    let file = std::fs::File::open(path).map_err(err)?;
    let mut text = String::new();
    // Bounded even if the file grows while it is read.
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(err)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(err(std::io::Error::other(format!(
            "more than the {MAX_CONFIG_BYTES} bytes a config file may have"
        ))));
    }
    Ok(text)
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// A URL is parsed by the `url` crate (WHATWG rules): an `http` or
/// `https` scheme, a host, a valid port, no spaces.
fn check_url(i: &mut Issues<'_>, url: &str) {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return i.push(
            "url",
            format!("must start with http:// or https:// (got {url:?})"),
        );
    }
    if url.chars().any(char::is_whitespace) {
        return i.push("url", format!("must not contain spaces (got {url:?})"));
    }
    match ::url::Url::parse(url) {
        Err(e) => i.push("url", format!("is not a valid URL: {e} (got {url:?})")),
        Ok(u) if u.host_str().is_none_or(str::is_empty) => {
            i.push("url", format!("has no host (got {url:?})"))
        }
        Ok(_) => {}
    }
}

/// Parses YAML into a configuration, collecting unknown keys and type errors
/// as issues (the section with a type error keeps its defaults). Only YAML
/// syntax errors are returned as errors. Does not validate.
fn parse_yaml(text: &str, origin: &str) -> Result<(Config, Vec<ConfigIssue>), ConfigError> {
    let value: Option<Value> = serde_saphyr::from_str(text).map_err(|e| ConfigError::Syntax {
        origin: origin.to_string(),
        message: syntax_message(&e),
    })?;
    let mut issues = Vec::new();
    let mut map = match value {
        None | Some(Value::Null) => return Ok((Config::default(), issues)),
        Some(Value::Object(map)) => map,
        Some(other) => {
            issues.push(ConfigIssue {
                path: "(root)".into(),
                reason: format!(
                    "expected a mapping of sections (orchestrator, monitor, ...), got {}",
                    kind_of(&other)
                ),
            });
            return Ok((Config::default(), issues));
        }
    };
    let config = Config {
        orchestrator: section(&mut map, "orchestrator", &mut issues),
        monitor: section(&mut map, "monitor", &mut issues),
        prometheus: section(&mut map, "prometheus", &mut issues),
        analyze: section(&mut map, "analyze", &mut issues),
        plan: section(&mut map, "plan", &mut issues),
        execute: section(&mut map, "execute", &mut issues),
        knowledge: section(&mut map, "knowledge", &mut issues),
        charter: section(&mut map, "charter", &mut issues),
        effectors: section(&mut map, "effectors", &mut issues),
        alertmanager: section(&mut map, "alertmanager", &mut issues),
        api: section(&mut map, "api", &mut issues),
        logging: section(&mut map, "logging", &mut issues),
        topology: section(&mut map, "topology", &mut issues),
        safety: section(&mut map, "safety", &mut issues),
        // Present (even empty) means cluster mode; absent means one process.
        cluster: if map.contains_key("cluster") {
            Some(section(&mut map, "cluster", &mut issues))
        } else {
            None
        },
    };
    for key in map.keys() {
        issues.push(unknown_key(key_name(key)));
    }
    issues.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((config, issues))
}

fn unknown_key(path: String) -> ConfigIssue {
    ConfigIssue {
        path,
        reason: "unknown key".into(),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// At most this many type errors are listed per section (each one costs a
/// deserialisation of the section); a section with more says so once.
const MAX_TYPE_ERRORS_PER_SECTION: usize = 50;

/// One step of a key path inside a section.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    /// A mapping key (or an enum variant).
    Key(String),
    /// A list index.
    Index(usize),
}

/// The dotted form of a path inside section `name`: `name.a.b[2].c`.
fn render_path(name: &str, segs: &[Seg]) -> String {
    let mut out = name.to_string();
    for s in segs {
        match s {
            Seg::Key(k) => {
                out.push('.');
                out.push_str(&key_name(k));
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// A key as it appears in a path; an empty key is shown as `""`, so no
/// issue has an empty path.
fn key_name(k: &str) -> String {
    if k.is_empty() {
        "\"\"".to_string()
    } else {
        k.to_string()
    }
}

/// The path of a `serde_path_to_error` error. A map key that failed to
/// parse (`Unknown`) ends the path there: the reason names the key.
fn error_segs(path: &serde_path_to_error::Path) -> Vec<Seg> {
    let mut out = Vec::new();
    for seg in path {
        match seg {
            serde_path_to_error::Segment::Seq { index } => out.push(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => out.push(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => out.push(Seg::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => break,
        }
    }
    out
}

/// The path of a key `serde_ignored` reports.
fn ignored_segs(p: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
    match p {
        serde_ignored::Path::Root => {}
        serde_ignored::Path::Seq { parent, index } => {
            ignored_segs(parent, out);
            out.push(Seg::Index(*index));
        }
        serde_ignored::Path::Map { parent, key } => {
            ignored_segs(parent, out);
            out.push(Seg::Key(key.clone()));
        }
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => ignored_segs(parent, out),
    }
}

fn node<'v>(v: &'v Value, segs: &[Seg]) -> Option<&'v Value> {
    segs.iter().try_fold(v, |v, s| match (v, s) {
        (Value::Object(m), Seg::Key(k)) => m.get(k),
        (Value::Array(a), Seg::Index(i)) => a.get(*i),
        _ => None,
    })
}

fn node_mut<'v>(v: &'v mut Value, segs: &[Seg]) -> Option<&'v mut Value> {
    segs.iter().try_fold(v, |v, s| match (v, s) {
        (Value::Object(m), Seg::Key(k)) => m.get_mut(k),
        (Value::Array(a), Seg::Index(i)) => a.get_mut(*i),
        _ => None,
    })
}

/// Items removed from lists while repairing a section, in order: the
/// list's path and the index removed, both as they were at the time.
type Removals = Vec<(Vec<Seg>, usize)>;

/// A path in the repaired value as it is in the file: every list index
/// behind a removed item moves back up by one, latest removal first.
fn original_path(segs: &[Seg], removals: &Removals) -> Vec<Seg> {
    let mut p = segs.to_vec();
    for (list, removed) in removals.iter().rev() {
        if p.len() > list.len() && p[..list.len()] == list[..] {
            if let Seg::Index(i) = &mut p[list.len()] {
                if *i >= *removed {
                    *i += 1;
                }
            }
        }
    }
    p
}

/// Takes the value at `segs` (whose type is wrong) out of the way so the
/// next attempt gets past it: outside lists it becomes the default value
/// of that key; otherwise (or when that changes nothing) it is removed,
/// from its mapping or from its list. Falls back to the parent when the
/// path does not exist. False when nothing can be changed (the section's
/// root itself is wrong).
fn repair(
    value: &mut Value,
    segs: &[Seg],
    defaults: Option<&Value>,
    removals: &mut Removals,
) -> bool {
    let mut segs = segs;
    while let Some((last, parent)) = segs.split_last() {
        let in_list = segs.iter().any(|s| matches!(s, Seg::Index(_)));
        if !in_list {
            if let Some(d) = defaults.and_then(|d| node(d, segs)) {
                if let Some(slot) = node_mut(value, segs) {
                    if slot != d {
                        *slot = d.clone();
                        return true;
                    }
                }
            }
        }
        match (node_mut(value, parent), last) {
            (Some(Value::Object(m)), Seg::Key(k)) if m.contains_key(k) => {
                m.remove(k);
                return true;
            }
            (Some(Value::Array(a)), Seg::Index(i)) if *i < a.len() => {
                a.remove(*i);
                removals.push((parent.to_vec(), *i));
                return true;
            }
            _ => segs = parent,
        }
    }
    false
}

/// Deserialises section `name` of `map` (removing it), reporting every
/// unknown key and every value of the wrong type with their full paths.
/// A missing or empty section gives the defaults.
///
/// The file's values are laid over the serialised defaults of the section,
/// so a partly given nested table (`analyze.temporal` with only
/// `confidence`) keeps the section's defaults for its other keys.
///
/// serde stops at the first type error, so after each one the wrong value
/// is taken out of the way ([`repair`]: replaced by its default, or
/// removed) and the section is read again, up to
/// [`MAX_TYPE_ERRORS_PER_SECTION`] times. What then parses is returned,
/// so `validate` also checks the section's other keys. An error caused
/// only by an earlier repair (a list item missing the field just removed)
/// is not listed again.
fn section<T: DeserializeOwned + Serialize + Default>(
    map: &mut Map<String, Value>,
    name: &str,
    issues: &mut Vec<ConfigIssue>,
) -> T {
    let defaults = serde_json::to_value(T::default()).ok();
    let mut value = match map.remove(name) {
        None | Some(Value::Null) => return T::default(),
        Some(user) => match defaults.clone() {
            Some(mut base) => {
                overlay(&mut base, user);
                base
            }
            None => user,
        },
    };
    let mut unknown: std::collections::BTreeSet<Vec<Seg>> = Default::default();
    let mut reported: Vec<Vec<Seg>> = Vec::new();
    let mut removals = Removals::new();
    let mut parsed = None;
    let mut stuck = false;
    for _ in 0..MAX_TYPE_ERRORS_PER_SECTION {
        let mut seen = Vec::new();
        let result: Result<T, _> = {
            let mut record = |p: serde_ignored::Path<'_>| {
                let mut segs = Vec::new();
                ignored_segs(&p, &mut segs);
                seen.push(segs);
            };
            let de = serde_ignored::Deserializer::new(&value, &mut record);
            serde_path_to_error::deserialize(de)
        };
        unknown.extend(seen.iter().map(|s| original_path(s, &removals)));
        match result {
            Ok(v) => {
                parsed = Some(v);
                break;
            }
            Err(e) => {
                let segs = error_segs(e.path());
                let original = original_path(&segs, &removals);
                // An error at (or above) a path already listed comes from
                // its repair, not from the file.
                if !reported.iter().any(|r| r.starts_with(&original)) {
                    issues.push(ConfigIssue {
                        path: render_path(name, &original),
                        reason: e.inner().to_string(),
                    });
                    reported.push(original);
                }
                if !repair(&mut value, &segs, defaults.as_ref(), &mut removals) {
                    stuck = true;
                    break;
                }
            }
        }
    }
    issues.extend(unknown.iter().map(|s| unknown_key(render_path(name, s))));
    match parsed {
        Some(v) => v,
        None => {
            if !stuck {
                issues.push(ConfigIssue {
                    path: name.to_string(),
                    reason: format!(
                        "more values of the wrong type than the {} listed; fix these and check again",
                        reported.len()
                    ),
                });
            }
            T::default()
        }
    }
}

/// Lays `user` over `base`: mappings are merged key by key (recursively),
/// anything else replaces the base value. A null over a mapping keeps the
/// mapping (an empty table in YAML means "defaults").
fn overlay(base: &mut Value, user: Value) {
    match (base, user) {
        (Value::Object(b), Value::Object(u)) => {
            for (k, v) in u {
                match b.get_mut(&k) {
                    Some(slot) => overlay(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Object(_), Value::Null) => {}
        (slot, v) => *slot = v,
    }
}

/// The core message of a YAML error (no source snippet), prefixed with its
/// line and column when known.
fn syntax_message(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::MessageFormatter;
    let core = serde_saphyr::DefaultMessageFormatter.format_message(e.without_snippet());
    match e.location() {
        Some(loc) if loc.line() > 0 => {
            format!("line {}, column {}: {core}", loc.line(), loc.column())
        }
        _ => core.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const EXAMPLE: &str = include_str!("../config/mapek.yaml");

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    fn issues_of(r: Result<Config, ConfigError>) -> Vec<ConfigIssue> {
        match r {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn find<'a>(issues: &'a [ConfigIssue], path: &str) -> &'a ConfigIssue {
        issues
            .iter()
            .find(|i| i.path == path)
            .unwrap_or_else(|| panic!("no issue at {path} in {issues:?}"))
    }

    #[test]
    fn example_file_is_the_defaults() {
        let parsed = Config::from_yaml_str(EXAMPLE, "config/mapek.yaml").unwrap();
        assert_eq!(parsed, Config::default());
    }

    fn collect_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.push(p.clone());
                    collect_paths(child, &p, out);
                }
            }
            Value::Array(items) => {
                for (n, child) in items.iter().enumerate() {
                    let p = format!("{prefix}[{n}]");
                    out.push(p.clone());
                    collect_paths(child, &p, out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn example_file_lists_every_key() {
        let mut want = Vec::new();
        collect_paths(
            &serde_json::to_value(Config::default()).unwrap(),
            "",
            &mut want,
        );
        let example: Value = serde_saphyr::from_str(EXAMPLE).unwrap();
        let mut have = Vec::new();
        collect_paths(&example, "", &mut have);
        let missing: Vec<&String> = want.iter().filter(|p| !have.contains(p)).collect();
        assert!(missing.is_empty(), "missing from the example: {missing:?}");
        let extra: Vec<&String> = have.iter().filter(|p| !want.contains(p)).collect();
        assert!(extra.is_empty(), "unknown in the example: {extra:?}");
        // Maps and lists empty by default are written as such, so the walk
        // above sees their keys; and the maps take the documented types.
        for p in [
            "effectors.routes",
            "effectors.command.args",
            "effectors.webhook.headers",
            "effectors.command.retry_exit_codes[0]",
        ] {
            assert!(want.contains(&p.to_string()), "{p} not in {want:?}");
        }
        assert_eq!(example["effectors"]["routes"], serde_json::json!({}));
        assert_eq!(
            example["effectors"]["webhook"]["headers"],
            serde_json::json!({})
        );
        assert_eq!(
            example["effectors"]["command"]["args"],
            serde_json::json!([])
        );
        // All ten action types are listed.
        assert_eq!(
            example["plan"]["action_costs"].as_object().unwrap().len(),
            10
        );
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate(), vec![]);
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(Config::from_yaml_str("", "t").unwrap(), Config::default());
        assert_eq!(
            Config::from_yaml_str("# only a comment\n", "t").unwrap(),
            Config::default()
        );
        assert_eq!(
            Config::from_yaml_str("monitor:\n", "t").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn component_routes_and_topology_are_validated_with_every_path() {
        let yaml = "effectors:\n  default_components: [\"charter\", \"[\"]\n  component_routes:\n    - components: []\n      effector: webhook\n    - components: [\"ok-*\", \"bad[\"]\n      actions: [RESTART_SERVICE]\n      effector: none\ntopology:\n  gateway: [gateway, \"\"]\n";
        let issues = match Config::from_yaml_str(yaml, "t") {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("expected invalid, got {other:?}"),
        };
        for path in [
            "effectors.default_components[1]",
            "effectors.component_routes[0].components",
            "effectors.component_routes[1].components[1]",
            "effectors.webhook.url",
            "topology.gateway[0]",
            "topology.gateway[1]",
        ] {
            find(&issues, path);
        }
        assert!(find(&issues, "effectors.webhook.url")
            .reason
            .contains("effectors.component_routes[0].effector"));
    }

    #[test]
    fn component_routes_parse() {
        let c = Config::from_yaml_str(
            "effectors:\n  default_components: [\"charter*\"]\n  component_routes:\n    - components: [\"batch-?\"]\n      actions: [RESTART_SERVICE]\n      effector: none\ntopology:\n  gateway: [charter]\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.effectors.default_components, vec!["charter*"]);
        assert_eq!(
            c.effectors.component_routes[0].actions,
            vec![ActionType::RestartService]
        );
        assert_eq!(c.topology["gateway"], vec!["charter"]);
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_yaml_str(
            "monitor:\n  interval_seconds: 15\nlogging:\n  format: json\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.monitor.interval_seconds, 15);
        assert_eq!(c.monitor.rules, MonitorSettings::default().rules);
        assert_eq!(c.logging.format, LogFormat::Json);
        assert_eq!(c.plan, PlanSettings::default());
    }

    #[test]
    fn partial_nested_table_keeps_section_defaults() {
        let c = Config::from_yaml_str(
            "analyze:\n  temporal:\n    confidence: 0.9\n  spatial:\nplan:\n  action_costs:\n    FAILOVER: 0.9\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.analyze.temporal.confidence, 0.9);
        assert_eq!(
            c.analyze.temporal.window_seconds,
            AnalyzeSettings::default().temporal.window_seconds
        );
        assert_eq!(c.analyze.spatial, AnalyzeSettings::default().spatial);
        let mut costs = PlanSettings::default().action_costs;
        costs.insert(mapek_actors::model::ActionType::Failover, 0.9);
        assert_eq!(c.plan.action_costs, costs);
    }

    #[test]
    fn unknown_key_and_bad_value_reported_together() {
        let yaml = "monitor:\n  interval_seconds: 0\n  intervall_seconds: 10\n";
        let err = Config::from_yaml_str(yaml, "mapek.yaml").unwrap_err();
        let text = err.to_string();
        let issues = err.issues();
        assert!(find(issues, "monitor.interval_seconds")
            .reason
            .contains("must be at least 1"));
        assert_eq!(
            find(issues, "monitor.intervall_seconds").reason,
            "unknown key"
        );
        assert!(text.contains("mapek.yaml"), "{text}");
        assert!(
            text.contains("\n  - monitor.intervall_seconds: unknown key"),
            "{text}"
        );
        assert!(
            text.contains("\n  - monitor.interval_seconds: must be at least 1"),
            "{text}"
        );
    }

    #[test]
    fn every_unknown_key_is_reported() {
        let yaml = "\
bogus: 1
monitor:
  foo: 1
analyze:
  temporal:
    bar: 2
plan:
  baz: true
execute:
  qux: 3
";
        let issues = issues_of(Config::from_yaml_str(yaml, "t"));
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        for p in [
            "bogus",
            "monitor.foo",
            "analyze.temporal.bar",
            "plan.baz",
            "execute.qux",
        ] {
            assert!(paths.contains(&p), "{p} not in {paths:?}");
        }
        assert_eq!(issues.len(), 5, "{issues:?}");
    }

    #[test]
    fn unknown_key_in_rule_item_has_index_path() {
        let yaml = "\
monitor:
  rules:
    - name: a
      expr: up == 0
      severity: critical
      component: db
    - name: b
      expr: up == 0
      severity: warning
      component: web
      foo: 1
";
        let issues = issues_of(Config::from_yaml_str(yaml, "t"));
        assert_eq!(
            issues,
            vec![ConfigIssue {
                path: "monitor.rules[1].foo".into(),
                reason: "unknown key".into()
            }]
        );
    }

    #[test]
    fn type_error_has_path() {
        let issues = issues_of(Config::from_yaml_str("plan:\n  min_confidence: x\n", "t"));
        let i = find(&issues, "plan.min_confidence");
        assert!(
            i.reason
                .contains("invalid type: string \"x\", expected f64"),
            "{i}"
        );
    }

    #[test]
    fn type_errors_in_several_sections_and_unknown_keys_together() {
        let yaml = "\
plan:
  min_confidence: x
monitor:
  rules:
    - name: a
      expr: up
      severity: loud
      component: c
execute:
  retries: many
  nope: 1
";
        let issues = issues_of(Config::from_yaml_str(yaml, "t"));
        find(&issues, "plan.min_confidence");
        assert!(find(&issues, "monitor.rules[0].severity")
            .reason
            .contains("loud"));
        find(&issues, "execute.retries");
        assert_eq!(find(&issues, "execute.nope").reason, "unknown key");
    }

    #[test]
    fn every_type_error_is_listed_across_sections() {
        // Three wrong keys in one section and one in each of two others:
        // all five are listed (serde alone stops at the first of a
        // section), and the section's good keys are still validated.
        let yaml = "\
safety:
  breaker:
    failures: many
    open_seconds: [1]
  component_rate_limit:
    max_actions: {a: 1}
plan:
  min_confidence: x
execute:
  retries: lots
monitor:
  interval_seconds: 0
";
        let issues = issues_of(Config::from_yaml_str(yaml, "t"));
        let type_errors: Vec<&str> = issues
            .iter()
            .filter(|i| i.reason.starts_with("invalid type"))
            .map(|i| i.path.as_str())
            .collect();
        assert_eq!(
            type_errors,
            [
                "execute.retries",
                "plan.min_confidence",
                "safety.breaker.failures",
                "safety.breaker.open_seconds",
                "safety.component_rate_limit.max_actions",
            ],
            "{issues:?}"
        );
        assert!(find(&issues, "safety.breaker.failures")
            .reason
            .contains("expected u32"));
        // A range error in a section without type errors is there too.
        find(&issues, "monitor.interval_seconds");
    }

    #[test]
    fn type_errors_in_list_items_keep_their_file_index() {
        // Item 1 is dropped to get past its error; item 3 is still named
        // by its index in the file, and so is the unknown key of item 4.
        let yaml = "\
monitor:
  interval_seconds: x
  rules:
    - {name: a, expr: up == 0, severity: critical, component: db}
    - {name: b, expr: up == 0, severity: loud, component: db}
    - {name: c, expr: up == 0, severity: warning, component: db}
    - {name: d, expr: [1], severity: warning, component: db}
    - {name: e, expr: up == 0, severity: warning, component: db, foo: 1}
topology:
  api: [db, {x: 1}]
  db: 7
";
        let issues = issues_of(Config::from_yaml_str(yaml, "t"));
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "monitor.interval_seconds",
                "monitor.rules[1].severity",
                "monitor.rules[3].expr",
                "monitor.rules[4].foo",
                "topology.api[1]",
                "topology.db",
            ],
            "{issues:?}"
        );
        assert!(find(&issues, "monitor.rules[1].severity")
            .reason
            .contains("loud"));
    }

    #[test]
    fn an_empty_key_is_named() {
        // Found by tests/fuzz.rs: an issue with an empty path.
        let issues = issues_of(Config::from_yaml_str("'': 1\nmonitor:\n  '': 2\n", "t"));
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["\"\"", "monitor.\"\""], "{issues:?}");
    }

    #[test]
    fn a_flood_of_type_errors_is_capped() {
        let mut yaml = String::from("topology:\n");
        for n in 0..(MAX_TYPE_ERRORS_PER_SECTION + 20) {
            yaml.push_str(&format!("  c{n:03}: {n}\n"));
        }
        let issues = issues_of(Config::from_yaml_str(&yaml, "t"));
        let listed = issues
            .iter()
            .filter(|i| i.reason.starts_with("invalid type"))
            .count();
        assert_eq!(listed, MAX_TYPE_ERRORS_PER_SECTION, "{issues:?}");
        assert!(find(&issues, "topology")
            .reason
            .contains("more values of the wrong type"));
    }

    #[test]
    fn bad_action_cost_key_and_value() {
        let issues = issues_of(Config::from_yaml_str(
            "plan:\n  action_costs:\n    SCALE_UP: 1.5\n",
            "t",
        ));
        assert!(find(&issues, "plan.action_costs.SCALE_UP")
            .reason
            .contains("between 0 and 1"));
        let issues = issues_of(Config::from_yaml_str(
            "plan:\n  action_costs:\n    SCALE_SIDEWAYS: 0.5\n",
            "t",
        ));
        assert!(
            issues[0].path.starts_with("plan.action_costs"),
            "{issues:?}"
        );
        assert!(issues[0].reason.contains("SCALE_SIDEWAYS"), "{issues:?}");
    }

    #[test]
    fn non_mapping_root_and_section() {
        let issues = issues_of(Config::from_yaml_str("- 1\n- 2\n", "t"));
        assert_eq!(issues[0].path, "(root)");
        let issues = issues_of(Config::from_yaml_str("monitor: 5\n", "t"));
        assert_eq!(issues[0].path, "monitor");
        assert!(issues[0].reason.contains("invalid type"), "{issues:?}");
    }

    #[test]
    fn syntax_error() {
        let err = Config::from_yaml_str("monitor:\n  a: [1, 2\n  b: {\n", "bad.yaml").unwrap_err();
        match &err {
            ConfigError::Syntax { origin, message } => {
                assert_eq!(origin, "bad.yaml");
                assert!(message.starts_with("line 3, column 4: "), "{message}");
                assert!(!message.contains('\n'), "{message}");
            }
            other => panic!("expected Syntax, got {other:?}"),
        }
        assert!(err.to_string().starts_with("bad.yaml: YAML syntax error"));
    }

    #[test]
    fn env_overrides_apply() {
        let get = env(&[
            ("PROMETHEUS_URL", "http://prom:9090"),
            ("CHARTER_URL", "https://charter.example"),
            ("CHARTER_API_KEY", "s3cret"),
            ("ALERTMANAGER_URL", "http://am:9093"),
            ("MAPE_K_INTERVAL", "15"),
            ("MAPE_K_THRESHOLD", "7"),
            ("MAPE_K_AUTO_APPROVE", "no"),
            ("LOG_LEVEL", "DEBUG"),
        ]);
        let mut c = Config::default();
        assert_eq!(c.apply_env(&get), vec![]);
        assert_eq!(c.prometheus.url, "http://prom:9090");
        assert_eq!(c.charter.url, "https://charter.example");
        assert_eq!(c.charter.api_key, "s3cret");
        assert_eq!(c.alertmanager.url, "http://am:9093");
        assert_eq!(c.monitor.interval_seconds, 15);
        assert_eq!(c.plan.plan_threshold, 7);
        assert!(!c.plan.auto_approve);
        assert_eq!(c.logging.level, "debug");
        assert_eq!(c.validate(), vec![]);
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn env_overrides_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapek.yaml");
        std::fs::write(&path, "monitor:\n  interval_seconds: 20\n").unwrap();
        let c = Config::load_with_env(Some(&path), &env(&[("MAPE_K_INTERVAL", "5")])).unwrap();
        assert_eq!(c.monitor.interval_seconds, 5);
        let c = Config::load_with_env(Some(&path), &env(&[])).unwrap();
        assert_eq!(c.monitor.interval_seconds, 20);
        assert_eq!(Config::load(&path).unwrap().monitor.interval_seconds, 20);
        let c = Config::load_with_env(None, &env(&[("MAPE_K_AUTO_APPROVE", "")])).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn bad_env_values_reported_with_names_and_file_issues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapek.yaml");
        std::fs::write(&path, "api:\n  lissen: x\n").unwrap();
        let get = env(&[
            ("MAPE_K_INTERVAL", "ten"),
            ("MAPE_K_THRESHOLD", "-1"),
            ("MAPE_K_AUTO_APPROVE", "maybe"),
            ("PROMETHEUS_URL", "prom:9090"),
            ("LOG_LEVEL", "loud"),
        ]);
        let issues = issues_of(Config::load_with_env(Some(&path), &get));
        assert!(find(&issues, "env MAPE_K_INTERVAL").reason.contains("ten"));
        find(&issues, "env MAPE_K_THRESHOLD");
        find(&issues, "env MAPE_K_AUTO_APPROVE");
        find(&issues, "api.lissen");
        assert!(find(&issues, "prometheus.url").reason.contains("http://"));
        find(&issues, "logging.level");
        assert_eq!(issues.len(), 6, "{issues:?}");
    }

    #[test]
    fn an_open_api_is_not_exposed_and_named_tokens_are_checked() {
        let mut c = Config::default();
        let open: SocketAddr = "0.0.0.0:8001".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:8001".parse().expect("addr");
        assert!(c.api.exposure(open).is_some_and(|w| w.contains("no token")));
        assert!(c.api.exposure(local).is_none());
        c.api.allow_unauthenticated = true;
        assert!(c.api.exposure(open).is_none());
        c.api.allow_unauthenticated = false;
        c.api.tokens.insert("alice".into(), "t1".into());
        c.api.tokens.insert("bob".into(), "t1".into());
        c.api.tokens.insert("bad name".into(), "t2".into());
        assert!(c.api.exposure(open).is_none());
        let issues = c.validate();
        assert!(find(&issues, "api.tokens.bob")
            .reason
            .contains("two callers"));
        assert!(find(&issues, "api.tokens.bad name").reason.contains("name"));
        assert_eq!(
            c.api
                .credentials()
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            vec!["alice", "bad name", "bob"]
        );
        let dbg = format!("{:?}", c.api);
        assert!(!dbg.contains("t1") && !dbg.contains("t2"), "{dbg}");
    }

    /// The URLs that used to pass check-config and fail only at run time.
    #[test]
    fn urls_are_parsed_by_a_url_library() {
        for bad in [
            "http://[::1",
            "http://exa mple.com:99999/x y",
            "https://:80",
            "http://host:99999",
            "https://",
        ] {
            let mut c = Config::default();
            c.prometheus.url = bad.into();
            let issues = c.validate();
            assert!(
                issues.iter().any(|i| i.path == "prometheus.url"),
                "{bad}: {issues:?}"
            );
        }
        for good in [
            "http://127.0.0.1:9090",
            "https://prom.example/sub/",
            "http://[::1]:9090",
        ] {
            let mut c = Config::default();
            c.prometheus.url = good.into();
            assert!(
                !c.validate().iter().any(|i| i.path == "prometheus.url"),
                "{good}"
            );
        }
    }

    /// A FIFO or a device is refused at once (never read: no hang, no
    /// memory blow-up), and so is an oversized file.
    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let err = Config::load(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("regular file"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo.yaml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let err = Config::load(&fifo).unwrap_err();
        assert!(err.to_string().contains("regular file"), "{err}");
        let err = Config::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, "#".repeat(MAX_CONFIG_BYTES as usize + 1)).expect("write");
        let err = Config::load(&big).unwrap_err();
        assert!(err.to_string().contains("bytes"), "{err}");
    }

    #[test]
    fn missing_file_is_read_error() {
        let err = Config::load(Path::new("/nonexistent/mapek.yaml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/mapek.yaml"));
    }

    #[test]
    fn validation_of_own_sections() {
        let mut c = Config::default();
        c.charter.url = "ftp://x".into();
        c.alertmanager.url = "https://".into();
        c.alertmanager.webhook_path = "alerts".into();
        c.alertmanager.max_body_bytes = 10;
        c.api.listen = "localhost".into();
        c.api.max_connections = 0;
        c.api.request_timeout_seconds = 0;
        c.logging.level = "verbose".into();
        let issues = c.validate();
        for p in [
            "charter.url",
            "alertmanager.url",
            "alertmanager.webhook_path",
            "alertmanager.max_body_bytes",
            "api.listen",
            "api.max_connections",
            "api.request_timeout_seconds",
            "logging.level",
        ] {
            find(&issues, p);
        }
        assert_eq!(issues.len(), 8, "{issues:?}");
    }

    #[test]
    fn cross_field_rules() {
        let yaml = "\
orchestrator:
  max_cycle_time_seconds: 90
execute:
  verification_window_seconds: 60
  call_timeout_seconds: 30
monitor:
  interval_seconds: 400
";
        let issues = issues_of(Config::from_yaml_str(yaml, "t"));
        let i = find(&issues, "execute.verification_window_seconds");
        assert!(i
            .reason
            .contains("orchestrator.max_cycle_time_seconds (90)"));
        assert!(i.reason.contains("cut off"));
        assert!(find(&issues, "monitor.interval_seconds")
            .reason
            .contains("analyze.window_seconds"));
        assert_eq!(issues.len(), 2, "{issues:?}");
    }

    #[test]
    fn builder_builds_and_validates() {
        let c = Config::builder()
            .with_interval(Duration::from_secs(10))
            .with_plan_threshold(5)
            .with_auto_approve(false)
            .with_prometheus_url("http://prom:9090")
            .with_charter_url("http://charter:8080")
            .with_listen("0.0.0.0:9000")
            .with_data_dir("/var/lib/mapek")
            .with_max_cycle_time(Duration::from_secs(120))
            .with_verification_window(Duration::from_millis(1500))
            .with_rules(vec![])
            .build()
            .unwrap();
        assert_eq!(c.monitor.interval_seconds, 10);
        assert_eq!(c.plan.plan_threshold, 5);
        assert!(!c.plan.auto_approve);
        assert_eq!(c.api.listen, "0.0.0.0:9000");
        assert_eq!(c.knowledge.data_dir, "/var/lib/mapek");
        assert_eq!(c.orchestrator.max_cycle_time_seconds, 120);
        assert_eq!(c.execute.verification_window_seconds, 2);
        assert!(c.monitor.rules.is_empty());

        let err = Config::builder()
            .with_interval(Duration::ZERO)
            .with_listen("nowhere")
            .with_max_cycle_time(Duration::from_secs(60))
            .build()
            .unwrap_err();
        let issues = err.issues();
        find(issues, "monitor.interval_seconds");
        find(issues, "api.listen");
        find(issues, "execute.verification_window_seconds");
        assert!(err.to_string().contains("builder"));
    }

    #[test]
    fn effectors_section_parses_and_keeps_defaults() {
        let yaml = "\
effectors:
  default: webhook
  routes:
    RESTART_SERVICE: command
    FAILOVER: none
  command:
    program: /usr/local/bin/remedy
    args: [\"--action={action}\", \"{param.replicas_delta}\"]
  webhook:
    url: https://hooks.example/mapek
    headers:
      Authorization: Bearer s3cret
";
        let c = Config::from_yaml_str(yaml, "t").unwrap();
        let e = &c.effectors;
        assert_eq!(e.default, EffectorKind::Webhook);
        assert_eq!(
            e.kind_for(ActionType::RestartService),
            EffectorKind::Command
        );
        assert_eq!(e.kind_for(ActionType::Failover), EffectorKind::None);
        assert_eq!(e.kind_for(ActionType::ScaleUp), EffectorKind::Webhook);
        assert!(e.uses(EffectorKind::Command) && !e.uses(EffectorKind::Charter));
        assert_eq!(
            e.command.args,
            vec!["--action={action}", "{param.replicas_delta}"]
        );
        assert_eq!(e.command.timeout_seconds, 30);
        assert_eq!(e.command.retry_exit_codes, vec![75]);
        assert_eq!(e.webhook.timeout_seconds, 10);
        assert_eq!(e.webhook.headers["Authorization"], "Bearer s3cret");
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("s3cret") && debug.contains("Authorization"),
            "{debug}"
        );
    }

    #[test]
    fn effector_names_and_route_keys_are_checked() {
        let issues = issues_of(Config::from_yaml_str(
            "effectors:\n  routes:\n    SCALE_UP: ansible\n",
            "t",
        ));
        let i = find(&issues, "effectors.routes.SCALE_UP");
        assert!(
            i.reason.contains("ansible") && i.reason.contains("`webhook`"),
            "{i}"
        );

        let issues = issues_of(Config::from_yaml_str(
            "effectors:\n  routes:\n    SCALE_SIDEWAYS: command\n",
            "t",
        ));
        let i = find(&issues, "effectors.routes.SCALE_SIDEWAYS");
        assert!(
            i.reason.contains("unknown action type") && i.reason.contains("`SCALE_UP`"),
            "{i}"
        );
        assert_eq!(issues.len(), 1, "{issues:?}");

        let issues = issues_of(Config::from_yaml_str(
            "effectors:\n  routes:\n    failover: webhook\n",
            "t",
        ));
        assert!(find(&issues, "effectors.routes.failover")
            .reason
            .contains("upper case: `FAILOVER`"));

        let issues = issues_of(Config::from_yaml_str("effectors:\n  routes: [1]\n", "t"));
        assert!(find(&issues, "effectors.routes")
            .reason
            .contains("a mapping of action types"));

        let issues = issues_of(Config::from_yaml_str("effectors:\n  default: shell\n", "t"));
        assert!(find(&issues, "effectors.default").reason.contains("shell"));

        let issues = issues_of(Config::from_yaml_str(
            "effectors:\n  command:\n    programme: /bin/true\n",
            "t",
        ));
        assert_eq!(
            find(&issues, "effectors.command.programme").reason,
            "unknown key"
        );
    }

    #[test]
    fn used_effectors_need_their_settings() {
        let mut c = Config::default();
        c.effectors
            .routes
            .insert(ActionType::RestartService, EffectorKind::Command);
        c.effectors
            .routes
            .insert(ActionType::Failover, EffectorKind::Webhook);
        let issues = c.validate();
        assert_eq!(
            find(&issues, "effectors.command.program").reason,
            "required because effectors.routes.RESTART_SERVICE uses the command effector"
        );
        assert_eq!(
            find(&issues, "effectors.webhook.url").reason,
            "required because effectors.routes.FAILOVER uses the webhook effector"
        );
        assert_eq!(issues.len(), 2, "{issues:?}");

        c.effectors.default = EffectorKind::Command;
        let issues = c.validate();
        assert_eq!(
            find(&issues, "effectors.command.program").reason,
            "required because effectors.default and effectors.routes.RESTART_SERVICE use \
             the command effector"
        );

        c.effectors.command.program = "/usr/local/bin/remedy".into();
        c.effectors.webhook.url = "https://hooks.example/x".into();
        assert_eq!(c.validate(), vec![]);

        // A default that no action type falls back to is not in use.
        let mut c = Config::default();
        c.effectors.default = EffectorKind::Webhook;
        for a in ActionType::ALL {
            c.effectors.routes.insert(a, EffectorKind::Charter);
        }
        assert_eq!(c.validate(), vec![]);
        // Unused effectors need nothing.
        assert!(!Config::default().effectors.uses(EffectorKind::Command));
    }

    #[test]
    fn effector_settings_out_of_range() {
        let mut c = Config::default();
        c.effectors.command.timeout_seconds = 0;
        c.effectors.command.retry_exit_codes = vec![75, 0, 256];
        c.effectors.command.args = vec!["{action}".into(), "{actoin}".into(), "{".into()];
        c.effectors.webhook.timeout_seconds = 0;
        c.effectors.webhook.url = "ftp://hooks.example".into();
        c.effectors
            .webhook
            .headers
            .insert("Bad Header".into(), "x".into());
        c.effectors
            .webhook
            .headers
            .insert("X-Ok".into(), "line\nbreak".into());
        let issues = c.validate();
        assert!(find(&issues, "effectors.command.timeout_seconds")
            .reason
            .contains("at least 1"));
        find(&issues, "effectors.command.retry_exit_codes[1]");
        find(&issues, "effectors.command.retry_exit_codes[2]");
        assert!(find(&issues, "effectors.command.args[1]")
            .reason
            .contains("{actoin}"));
        assert!(find(&issues, "effectors.command.args[2]")
            .reason
            .contains("unclosed"));
        find(&issues, "effectors.webhook.timeout_seconds");
        assert!(find(&issues, "effectors.webhook.url")
            .reason
            .contains("http://"));
        assert!(find(&issues, "effectors.webhook.headers.Bad Header")
            .reason
            .contains("name"));
        assert!(find(&issues, "effectors.webhook.headers.X-Ok")
            .reason
            .contains("value"));
        assert_eq!(issues.len(), 9, "{issues:?}");
    }

    #[test]
    fn serialises_round_trip() {
        let c = Config::default();
        let v = serde_json::to_value(&c).unwrap();
        let back: Config = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn no_cluster_section_is_one_process() {
        let c = Config::from_yaml_str("api:\n  listen: 127.0.0.1:8001\n", "t").unwrap();
        assert_eq!(c.cluster, None);
        let c = Config::load_with_env(None, &env(&[])).unwrap();
        assert_eq!(c.cluster, None);
    }

    #[cfg(not(feature = "cluster"))]
    #[test]
    fn a_cluster_section_needs_the_feature() {
        let issues = issues_of(Config::from_yaml_str(
            "cluster:\n  etcd_endpoints: [\"http://127.0.0.1:2379\"]\n",
            "t",
        ));
        assert_eq!(find(&issues, "cluster").reason, NO_CLUSTER_SUPPORT);
        let issues = issues_of(Config::load_with_env(
            None,
            &env(&[("MAPEK_ETCD_ENDPOINTS", "http://127.0.0.1:2379")]),
        ));
        assert_eq!(find(&issues, "cluster").reason, NO_CLUSTER_SUPPORT);
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn cluster_section_defaults_and_env() {
        let c = Config::from_yaml_str(
            "cluster:\n  etcd_endpoints: [\"http://127.0.0.1:2379\"]\n  name: a\n",
            "t",
        )
        .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.lease_seconds, 10);
        assert_eq!(cl.shards, 1);
        assert_eq!(cl.prefix, "/mapek");
        assert_eq!(cl.effective_name(), "a");
        // The host name by default.
        let d = ClusterSettings::default();
        assert!(!d.effective_name().is_empty());

        // The environment turns cluster mode on and replaces the list.
        let c = Config::load_with_env(
            None,
            &env(&[(
                "MAPEK_ETCD_ENDPOINTS",
                " http://10.0.0.1:2379, http://10.0.0.2:2379 ,",
            )]),
        )
        .unwrap();
        assert_eq!(
            c.cluster.unwrap().etcd_endpoints,
            vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn cluster_section_errors_have_paths() {
        let issues = issues_of(Config::from_yaml_str(
            "cluster:\n  etcd_endpoints: [\"127.0.0.1:2379\", \"https://e:2379\", \"http://e:2379/x\"]\n  name: \"a/b\"\n  lease_seconds: 1\n  shards: 0\n  prefix: \"mapek/\"\n  advertise: \"http://x\"\n  bogus: 1\n",
            "t",
        ));
        for p in [
            "cluster.etcd_endpoints[0]",
            "cluster.etcd_endpoints[1]",
            "cluster.etcd_endpoints[2]",
            "cluster.name",
            "cluster.lease_seconds",
            "cluster.shards",
            "cluster.prefix",
            "cluster.advertise",
            "cluster.bogus",
        ] {
            find(&issues, p);
        }
        let issues = issues_of(Config::from_yaml_str("cluster: {}\n", "t"));
        assert!(find(&issues, "cluster.etcd_endpoints")
            .reason
            .contains("MAPEK_ETCD_ENDPOINTS"));
        let issues = issues_of(Config::from_yaml_str("cluster:\n  shards: many\n", "t"));
        find(&issues, "cluster.shards");
        // A good advertise address, and the environment's.
        let c = Config::load_with_env(
            None,
            &env(&[
                ("MAPEK_ETCD_ENDPOINTS", "http://10.0.0.1:2379"),
                ("MAPEK_ADVERTISE_ADDRESS", " 10.1.2.3:8001 "),
            ]),
        )
        .unwrap();
        assert_eq!(c.cluster.unwrap().advertise, "10.1.2.3:8001");
    }
}
