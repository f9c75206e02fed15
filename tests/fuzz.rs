//! Property-based fuzzing of the two parsers that read what strangers
//! send: the Alertmanager webhook payload (`alertmanager::parse` and
//! `to_violations`) and the config loader (`Config::load`,
//! `Config::from_yaml_str`).
//!
//! Every input, arbitrary bytes or a valid payload/config with
//! structure-aware mutations, must either parse or give a clear error,
//! never panic; what parses must hold the invariants below. The seed
//! corpus in `tests/corpus/{webhook,config}` (`valid-*` must parse,
//! `bad-*` must be refused) is replayed on every run.
//!
//! Bounded by `PROPTEST_CASES` (proptest's default: 256 cases per
//! property, a few seconds). A longer run (see tests/README.md):
//! `PROPTEST_CASES=100000 cargo test --release -p mapek --test fuzz`.

use std::path::{Path, PathBuf};

use chrono::Utc;
use mapek::alertmanager;
use mapek::config::{Config, ConfigError};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    files
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Parses `body` as the webhook does; on success checks the invariants of
/// the payload and of its violations. Returns whether it parsed.
fn check_webhook(body: &[u8]) -> Result<(), String> {
    let p = match alertmanager::parse(body) {
        Ok(p) => p,
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.trim().is_empty(), "an error without a message");
            return Err(msg);
        }
    };
    assert_eq!(p.version, "4");
    assert!(p
        .alerts
        .iter()
        .all(|a| a.status == "firing" || a.status == "resolved"));
    let now = Utc::now();
    let (firing, resolved) = alertmanager::to_violations(&p, now);
    assert!(
        firing.len() + resolved.len() <= p.alerts.len(),
        "more results than alerts"
    );
    for v in &firing {
        assert!(!v.component.trim().is_empty(), "empty component: {v:?}");
        assert!(!v.rule.trim().is_empty(), "empty rule: {v:?}");
        assert!(!v.metric.trim().is_empty(), "empty metric: {v:?}");
        assert!(v.fingerprint.starts_with("am:"), "{v:?}");
        assert!(v.first_seen <= now, "onset in the future: {v:?}");
        assert_eq!(v.observed_at, now);
        assert!(v.value.is_finite(), "{v:?}");
        assert_eq!(v.source, alertmanager::SOURCE);
        assert!(!alertmanager::is_escalation(&v.labels), "{v:?}");
    }
    // One result per fingerprint: the payload's last alert decides.
    let mut fps: Vec<&str> = firing
        .iter()
        .map(|v| v.fingerprint.as_str())
        .chain(resolved.iter().map(String::as_str))
        .collect();
    let n = fps.len();
    fps.sort_unstable();
    fps.dedup();
    assert_eq!(fps.len(), n, "a fingerprint twice");
    Ok(())
}

/// Loads a config text; on success it validates clean, on failure every
/// issue names its key and says what is wrong.
fn check_config_text(text: &str) -> Result<(), String> {
    match Config::from_yaml_str(text, "fuzz.yaml") {
        Ok(cfg) => {
            assert!(
                cfg.validate().is_empty(),
                "a loaded config that does not validate"
            );
            Ok(())
        }
        Err(e) => Err(check_config_error(&e)),
    }
}

fn check_config_error(e: &ConfigError) -> String {
    let msg = e.to_string();
    assert!(!msg.trim().is_empty());
    match e {
        ConfigError::Invalid { issues, .. } => {
            assert!(!issues.is_empty(), "invalid without an issue");
            for i in issues {
                assert!(!i.path.is_empty(), "an issue without a path: {i:?}");
                assert!(
                    !i.reason.trim().is_empty(),
                    "an issue without a reason: {i:?}"
                );
            }
        }
        ConfigError::Syntax { message, .. } => {
            assert!(!message.trim().is_empty());
            assert!(!message.contains('\n'), "{message}");
        }
        ConfigError::Read { .. } => {}
    }
    msg
}

#[test]
fn webhook_corpus_replays() {
    let files = corpus("webhook");
    let bad = files
        .iter()
        .filter(|p| name_of(p).starts_with("bad-"))
        .count();
    assert!(bad >= 30, "at least 30 malformed samples, got {bad}");
    for path in &files {
        let name = name_of(path);
        let body = std::fs::read(path).expect("read");
        let result = check_webhook(&body);
        if name.starts_with("valid-") {
            assert!(result.is_ok(), "{name} refused: {result:?}");
        } else {
            assert!(name.starts_with("bad-"), "{name}: valid-* or bad-*");
            assert!(result.is_err(), "{name} accepted");
        }
    }
}

#[test]
fn webhook_corpus_invariants_that_matter() {
    // A firing and a resolved alert of one fingerprint: the last decides.
    let body = std::fs::read(
        corpus("webhook")
            .into_iter()
            .find(|p| name_of(p) == "valid-firing-then-resolved-same-fingerprint.json")
            .expect("sample"),
    )
    .expect("read");
    let p = alertmanager::parse(&body).expect("parses");
    let (firing, resolved) = alertmanager::to_violations(&p, Utc::now());
    assert!(firing.is_empty());
    assert_eq!(resolved, ["am:a1b2c3d4e5f60718"]);
    // Blank component labels fall through to the next label, then
    // `unknown`; never an empty component.
    let body = std::fs::read(
        corpus("webhook")
            .into_iter()
            .find(|p| name_of(p) == "valid-empty-component-label.json")
            .expect("sample"),
    )
    .expect("read");
    let p = alertmanager::parse(&body).expect("parses");
    let (firing, _) = alertmanager::to_violations(&p, Utc::now());
    assert_eq!(firing[0].component, "unknown");
    // A blank alertname or metric label: `unnamed`, never an empty rule
    // (found by a longer run).
    let body = std::fs::read(
        corpus("webhook")
            .into_iter()
            .find(|p| name_of(p) == "valid-empty-alertname.json")
            .expect("sample"),
    )
    .expect("read");
    let p = alertmanager::parse(&body).expect("parses");
    let (firing, _) = alertmanager::to_violations(&p, Utc::now());
    assert_eq!(
        (firing[0].rule.as_str(), firing[0].metric.as_str()),
        ("unnamed", "unnamed")
    );
}

#[test]
fn config_corpus_replays() {
    let files = corpus("config");
    assert!(files.iter().any(|p| name_of(p).starts_with("valid-")));
    assert!(
        files
            .iter()
            .filter(|p| name_of(p).starts_with("bad-"))
            .count()
            >= 15
    );
    for path in &files {
        let name = name_of(path);
        let result = match Config::load(path) {
            Ok(cfg) => {
                assert!(cfg.validate().is_empty(), "{name}");
                Ok(())
            }
            Err(e) => Err(check_config_error(&e)),
        };
        if name.starts_with("valid-") {
            assert!(result.is_ok(), "{name} refused: {result:?}");
        } else {
            assert!(name.starts_with("bad-"), "{name}: valid-* or bad-*");
            assert!(result.is_err(), "{name} accepted");
        }
    }
}

// ---------- structure-aware mutation ----------

/// A JSON value of any shape, small.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::String),
        Just(json!("")),
        Just(json!("firing")),
        Just(json!("resolved")),
        Just(json!("4")),
        Just(json!("9999-12-31T23:59:59Z")),
        Just(json!("0001-01-01T00:00:00Z")),
        Just(json!("2026-02-30T25:61:61Z")),
        Just(json!("1970-01-01T00:00:00+14:00")),
        Just(json!("-0001-01-01T00:00:00Z")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_]{0,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<String, Value>>())),
        ]
    })
}

/// One edit of a JSON tree at the node picked by `at` (an index into the
/// tree's nodes in pre-order).
#[derive(Debug, Clone)]
enum Edit {
    Replace(prop::sample::Index, Value),
    Delete(prop::sample::Index),
    Nest(prop::sample::Index, usize),
    Duplicate(prop::sample::Index),
    AddKey(prop::sample::Index, String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), any_json()).prop_map(|(i, v)| Edit::Replace(i, v)),
        2 => any::<prop::sample::Index>().prop_map(Edit::Delete),
        1 => (any::<prop::sample::Index>(), 1usize..300).prop_map(|(i, d)| Edit::Nest(i, d)),
        1 => any::<prop::sample::Index>().prop_map(Edit::Duplicate),
        1 => (any::<prop::sample::Index>(), "[a-zA-Z_]{1,12}", any_json())
            .prop_map(|(i, k, v)| Edit::AddKey(i, k, v)),
    ]
}

/// Paths (keys and indexes) of every node of `v`, pre-order.
fn node_paths(v: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                prefix.push(Step::Key(k.clone()));
                node_paths(c, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                prefix.push(Step::Index(i));
                node_paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn node_mut<'v>(v: &'v mut Value, path: &[Step]) -> Option<&'v mut Value> {
    path.iter().try_fold(v, |v, s| match (v, s) {
        (Value::Object(m), Step::Key(k)) => m.get_mut(k),
        (Value::Array(a), Step::Index(i)) => a.get_mut(*i),
        _ => None,
    })
}

fn apply(v: &mut Value, e: &Edit) {
    let mut paths = Vec::new();
    node_paths(v, &mut Vec::new(), &mut paths);
    let pick = |i: &prop::sample::Index| paths[i.index(paths.len())].clone();
    match e {
        Edit::Replace(i, new) => {
            if let Some(n) = node_mut(v, &pick(i)) {
                *n = new.clone();
            }
        }
        Edit::Delete(i) => {
            let path = pick(i);
            if let Some((last, parent)) = path.split_last() {
                match (node_mut(v, parent), last) {
                    (Some(Value::Object(m)), Step::Key(k)) => {
                        m.remove(k);
                    }
                    (Some(Value::Array(a)), Step::Index(i)) if *i < a.len() => {
                        a.remove(*i);
                    }
                    _ => {}
                }
            }
        }
        Edit::Nest(i, depth) => {
            if let Some(n) = node_mut(v, &pick(i)) {
                let mut inner = n.take();
                for d in 0..*depth {
                    inner = if d % 2 == 0 {
                        Value::Array(vec![inner])
                    } else {
                        json!({ "x": inner })
                    };
                }
                *n = inner;
            }
        }
        Edit::Duplicate(i) => {
            if let Some(Value::Array(a)) = node_mut(v, &pick(i)) {
                if let Some(first) = a.first().cloned() {
                    a.push(first);
                }
            }
        }
        Edit::AddKey(i, k, new) => {
            if let Some(Value::Object(m)) = node_mut(v, &pick(i)) {
                m.insert(k.clone(), new.clone());
            }
        }
    }
}

/// Byte-level damage after serialising: none, truncation, or one byte
/// replaced (possibly making it invalid UTF-8).
#[derive(Debug, Clone)]
enum Damage {
    None,
    Truncate(prop::sample::Index),
    Byte(prop::sample::Index, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        6 => Just(Damage::None),
        1 => any::<prop::sample::Index>().prop_map(Damage::Truncate),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Byte(i, b)),
    ]
}

fn damaged(mut bytes: Vec<u8>, d: &Damage) -> Vec<u8> {
    match d {
        Damage::None => {}
        Damage::Truncate(i) => {
            let at = i.index(bytes.len() + 1);
            bytes.truncate(at);
        }
        Damage::Byte(i, b) => {
            if !bytes.is_empty() {
                let at = i.index(bytes.len());
                bytes[at] = *b;
            }
        }
    }
    bytes
}

fn valid_payload() -> Value {
    json!({
        "receiver": "mapek",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "HighLatency", "severity": "critical", "component": "payments"},
                "annotations": {"summary": "p99 above 2 s", "value": "2.7"},
                "startsAt": "2026-03-01T12:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": "a1b2c3d4e5f60718"
            },
            {
                "status": "resolved",
                "labels": {"alertname": "DiskFull", "service": "db"},
                "annotations": {},
                "startsAt": "2026-03-01T11:00:00Z",
                "endsAt": "2026-03-01T11:30:00Z",
                "fingerprint": "0102030405060708"
            }
        ],
        "groupLabels": {"alertname": "HighLatency"},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "version": "4",
        "groupKey": "{}:{alertname=\"HighLatency\"}",
        "truncatedAlerts": 0
    })
}

fn valid_config() -> Value {
    serde_json::to_value(Config::default()).expect("the defaults serialise")
}

proptest! {
    #[test]
    fn webhook_arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = check_webhook(&body);
    }

    #[test]
    fn webhook_mutated_payloads_parse_or_fail_clearly(
        edits in prop::collection::vec(edit(), 0..6),
        dmg in damage(),
    ) {
        let mut v = valid_payload();
        for e in &edits {
            apply(&mut v, e);
        }
        let body = damaged(serde_json::to_vec(&v).expect("serialise"), &dmg);
        let _ = check_webhook(&body);
    }

    #[test]
    fn config_arbitrary_text_never_panics(text in "(?s).{0,400}") {
        let _ = check_config_text(&text);
    }

    #[test]
    fn config_yamlish_text_never_panics(text in "[a-z_:\\- \n\t\\[\\]{},0-9\"'&*!|>#.~%@`]{0,300}") {
        let _ = check_config_text(&text);
    }

    #[test]
    fn config_mutated_files_load_or_list_their_issues(
        edits in prop::collection::vec(edit(), 0..6),
        dmg in damage(),
    ) {
        let mut v = valid_config();
        for e in &edits {
            apply(&mut v, e);
        }
        let bytes = damaged(serde_json::to_vec_pretty(&v).expect("serialise"), &dmg);
        // The loader reads text: bytes that are not UTF-8 are refused
        // when the file is read; the rest is checked here.
        if let Ok(text) = String::from_utf8(bytes) {
            let _ = check_config_text(&text);
        }
    }
}
