//! The sled-backed knowledge store: the audit trail (policies and their
//! approval decisions, executions, outcomes, analyses) and the learned
//! statistics, surviving restarts.
//!
//! Layout: one sled database per data directory, with the trees
//! `policies`, `executions`, `outcomes`, `analyses` (records keyed by their
//! time-ordered ids, so key order is creation order), `stats` (one key
//! holding the [`LearnedStats`]), `insights` (one key holding the latest
//! insights) and `meta` (schema version). Values are JSON.
//!
//! Opening is guarded: sled can hang or panic on a corrupted file instead of
//! returning an error, so [`KnowledgeStore::open`] opens on a separate
//! thread, catches panics and gives up after a timeout. A directory locked
//! by another process fails at once with [`StoreError::Locked`].
//!
//! What sled 0.34.7 does with damaged files (measured): a damaged `conf`
//! fails at once ("unsupported", reported here as [`StoreError::Corrupt`]);
//! a damaged `db` opens **without error**, keeping only the records written
//! before the first unreadable segment (a consistent prefix: outcomes and
//! statistics stay in step because they are written in one transaction).
//! When nothing is left, the marker file [`MARKER_FILE`] turns that silent
//! loss into [`StoreError::Corrupt`]; a lost tail cannot be told apart from
//! a crash before the last flush.
//!
//! Durability is the journal's ([`crate::journal`]): every write is a
//! record submitted to one writer thread, which appends it to the journal,
//! makes each group durable with one fsync, applies it to sled and then
//! acknowledges it. sled is an index rebuilt from the journal: its own
//! flush stays lazy, and at open the journal entries after sled's
//! `applied_seq` (tree `meta`) are applied again. The synchronous write
//! methods wait for the acknowledgement (do not call them on an actor's
//! thread); the `_async` variants return a future that resolves once the
//! record is durable and applied, and queue the record when they are
//! called, so records are written in call order even before the futures
//! are polled. Generic trees ([`KnowledgeStore::put_record`]) and intents
//! ([`KnowledgeStore::journal_intent`]) go the same way.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::integrity::{self, IntegrityReport};
use crate::journal::{
    Index, Journal, JournalCounters, JournalError, JournalOptions, OpenReport, Record, Writer,
    JOURNAL_DIR,
};
use crate::model::{
    AnalysisResult, ApprovalStatus, Incident, IncidentState, LearnedStats, LearningInsight,
    PolicyExecution, PolicyOutcome, RemediationPolicy, Violation,
};

/// Schema version written into the `meta` tree; a database with another
/// version is refused.
pub const SCHEMA_VERSION: u32 = 2;
/// The schema of the previous release (sled as the record, the journal
/// only its tail): migrated once at open by writing a snapshot.
pub const PREVIOUS_SCHEMA_VERSION: u32 = 1;

/// Tree of incident records (key: incident id).
pub const INCIDENTS_TREE: &str = "incidents";

/// Tree of the active pushed (webhook) violations (key: fingerprint), so
/// they survive a restart.
pub const PUSHED_TREE: &str = "pushed_violations";

/// A pushed violation as kept in [`PUSHED_TREE`] (the key is its
/// fingerprint).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PushedRecord {
    r: String,
    s: crate::model::Severity,
    c: String,
    m: String,
    v: f64,
    l: std::collections::BTreeMap<String, String>,
    g: crate::model::Signal,
    o: i64,
    t: i64,
    src: String,
}

impl From<&Violation> for PushedRecord {
    fn from(v: &Violation) -> Self {
        PushedRecord {
            r: v.rule.clone(),
            s: v.severity,
            c: v.component.clone(),
            m: v.metric.clone(),
            v: v.value,
            l: v.labels.clone(),
            g: v.signal,
            o: v.first_seen.timestamp_millis(),
            t: v.observed_at.timestamp_millis(),
            src: v.source.clone(),
        }
    }
}

impl PushedRecord {
    fn into_violation(self, fingerprint: String) -> Violation {
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
        Violation {
            id: crate::model::new_id("vio"),
            fingerprint,
            rule: self.r,
            severity: self.s,
            component: self.c,
            metric: self.m,
            value: self.v,
            labels: self.l,
            signal: self.g,
            first_seen: at(self.o),
            observed_at: at(self.t),
            source: self.src,
        }
    }
}

pub(crate) const STATS_KEY: &[u8] = b"learned";
pub(crate) const INSIGHTS_KEY: &[u8] = b"latest";
const SCHEMA_KEY: &[u8] = b"schema_version";
const APPLIED_KEY: &[u8] = b"applied_seq";

/// Tree holding the intents ([`IntentRecord`], keyed by idempotency key).
pub const INTENTS_TREE: &str = "intents";

/// Trees the generic record methods refuse to write: their records have
/// typed methods (and counts, or statistics) of their own.
pub const RESERVED_TREES: [&str; 7] = [
    "meta",
    "policies",
    "executions",
    "outcomes",
    "analyses",
    "stats",
    "insights",
];

/// File written next to sled's files once the store is initialised. sled
/// silently discards unreadable data when it opens a damaged file (measured
/// with 0.34.7: a damaged first segment opens as an empty database); the
/// marker turns "the store was there and now holds nothing" into
/// [`StoreError::Corrupt`] instead of a silent loss of the audit trail.
pub const MARKER_FILE: &str = "mapek-store";

/// Errors of the knowledge store. Every message names the data directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds sled's exclusive file lock on the directory
    /// (returned at once, without waiting for the open timeout).
    #[error(
        "knowledge store {} is locked by another process (could not acquire the sled lock): \
         is another mapek running on this data directory?",
        dir.display()
    )]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// sled reported corruption, or panicked while opening the database.
    #[error(
        "knowledge store {} is corrupt: {detail} (move the directory aside to start with \
         empty knowledge)",
        dir.display()
    )]
    Corrupt {
        /// The data directory.
        dir: PathBuf,
        /// What sled reported (error or panic message).
        detail: String,
    },
    /// Opening did not finish within the timeout; sled hangs on some
    /// corrupted files, so the database is probably corrupt.
    #[error(
        "knowledge store {}: sled did not open within {seconds} s (sled hangs on some damaged \
         files; or the disk is very slow): check the disk, raise \
         knowledge.open_timeout_seconds, or start with --repair to move sled's files aside and \
         rebuild them from the journal",
        dir.display()
    )]
    Timeout {
        /// The data directory.
        dir: PathBuf,
        /// The timeout that expired, in seconds.
        seconds: f64,
    },
    /// A file-system error (permissions, disk full, ...).
    #[error("knowledge store {}: I/O error: {source}", dir.display())]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Any other sled error (unsupported use, sled bug).
    #[error("knowledge store {}: sled error: {source}", dir.display())]
    Sled {
        /// The data directory.
        dir: PathBuf,
        /// The underlying error.
        source: sled::Error,
    },
    /// A record could not be serialised to JSON.
    #[error("knowledge store {}: cannot encode {what}: {source}", dir.display())]
    Encode {
        /// The data directory.
        dir: PathBuf,
        /// What was being written (`policy pol-…`).
        what: String,
        /// The serde_json error.
        source: serde_json::Error,
    },
    /// A stored record could not be read back from JSON.
    #[error("knowledge store {}: cannot decode {tree} record {key:?}: {source}", dir.display())]
    Decode {
        /// The data directory.
        dir: PathBuf,
        /// Tree of the record.
        tree: &'static str,
        /// Its key.
        key: String,
        /// The serde_json error.
        source: serde_json::Error,
    },
    /// The store was used after [`KnowledgeStore::close`].
    #[error("knowledge store {} is closed", dir.display())]
    Closed {
        /// The data directory.
        dir: PathBuf,
    },
    /// The journal or sled is damaged in a way the journal cannot put
    /// right: start with `--repair` (see [`crate::integrity`]).
    #[error(
        "knowledge store {} is damaged, so mapek will not start on it (no record was changed): \
         {detail}. Start with --repair to salvage every readable record (each dropped one is \
         listed), or restore the directory from a backup",
        dir.display()
    )]
    Damaged {
        /// The data directory.
        dir: PathBuf,
        /// What is damaged, and what a repair would lose.
        detail: String,
    },
    /// The journal failed (I/O, damage, the writer stopped).
    #[error("knowledge store {}: {source}", dir.display())]
    Journal {
        /// The data directory.
        dir: PathBuf,
        /// The journal's error.
        source: JournalError,
    },
    /// A generic record was aimed at a tree with typed methods.
    #[error(
        "knowledge store {}: tree {tree:?} is reserved (use its typed methods)",
        dir.display()
    )]
    ReservedTree {
        /// The data directory.
        dir: PathBuf,
        /// The tree named.
        tree: String,
    },
}

impl StoreError {
    /// Maps an error of `sled::Config::open`: there, sled's "unsupported"
    /// and "bug" reports come from unreadable files (a damaged `conf` reads
    /// as a database from an old sled version), so they mean corruption.
    fn from_sled_open(dir: &Path, e: sled::Error) -> StoreError {
        match e {
            sled::Error::Unsupported(detail) | sled::Error::ReportableBug(detail) => {
                StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    detail,
                }
            }
            other => StoreError::from_sled(dir, other),
        }
    }

    pub(crate) fn from_sled(dir: &Path, e: sled::Error) -> StoreError {
        let dir = dir.to_path_buf();
        match e {
            sled::Error::Io(io) => {
                let msg = io.to_string();
                if msg.contains("could not acquire lock")
                    || io.kind() == std::io::ErrorKind::WouldBlock
                {
                    StoreError::Locked { dir }
                } else {
                    StoreError::Io { dir, source: io }
                }
            }
            sled::Error::Corruption { at, .. } => StoreError::Corrupt {
                dir,
                detail: match at {
                    Some(at) => format!("sled detected corruption at {at:?}"),
                    None => "sled detected corruption".to_string(),
                },
            },
            other => StoreError::Sled { dir, source: other },
        }
    }
}

/// Records per tree, as returned by [`KnowledgeStore::counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCounts {
    /// Remediation policies.
    pub policies: usize,
    /// Policy executions.
    pub executions: usize,
    /// Recorded outcomes.
    pub outcomes: usize,
    /// Analysis results.
    pub analyses: usize,
}

/// A record tree with its entry count kept in memory (sled's `len` walks
/// the whole tree; this makes [`KnowledgeStore::counts`] and
/// [`KnowledgeStore::prune`] independent of the tree size).
#[derive(Debug)]
struct Records {
    name: &'static str,
    tree: sled::Tree,
    /// Shared with the journal writer, which counts the records it adds.
    count: Arc<AtomicUsize>,
}

impl Records {
    /// Opens a record tree; its count is `known` or, without one, counted
    /// by walking the tree (`O(records)`, and sled keeps large pages it
    /// read resident: the start-up check counts them once instead).
    fn open(
        db: &sled::Db,
        name: &'static str,
        known: Option<&HashMap<String, usize>>,
    ) -> sled::Result<Records> {
        let tree = db.open_tree(name)?;
        let n = match known.and_then(|k| k.get(name)) {
            Some(n) => *n,
            None => tree.len(),
        };
        let count = Arc::new(AtomicUsize::new(n));
        Ok(Records { name, tree, count })
    }

    fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    db: sled::Db,
    policies: Records,
    executions: Records,
    outcomes: Records,
    analyses: Records,
    stats: sled::Tree,
    insights: sled::Tree,
    intents: sled::Tree,
    /// Soft state: the active pushed violations (see `put_pushed`).
    pushed: sled::Tree,
    /// Soft state: the incident records (see `put_incident`).
    incidents: sled::Tree,
    closed: AtomicBool,
    prune_lock: Mutex<()>,
    /// The journal writer thread (owns the journal and every sled write
    /// except pruning).
    writer: Writer<Applied>,
    journal: OpenReport,
    integrity: IntegrityReport,
    /// Cluster mode: where the records this replica originates are copied
    /// for publication (see [`KnowledgeStore::tap`]).
    tap: std::sync::OnceLock<TapCell>,
}

/// The tap and the lock that keeps its calls in journal order.
struct TapCell(Tap, Mutex<()>);

fn lock_tap(m: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for TapCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tap")
    }
}

/// The receiver of replicable records ([`KnowledgeStore::tap`]): called
/// in submission order, must not block.
pub type Tap = Arc<dyn Fn(&Record) + Send + Sync>;

/// Trees of generic records that are replicated in cluster mode (guard
/// state); the others stay local. (Incident records are each replica's
/// own view: every replica keeps its analysis warm and names incidents
/// itself; the claims in etcd reconcile the names before acting.)
pub const REPLICATED_TREES: [&str; 1] = [crate::safety::GUARDS_TREE];

/// Whether a record is knowledge other replicas need (cluster mode):
/// policies, executions, outcomes and their re-classification, insights,
/// and the generic records of [`REPLICATED_TREES`]. Analyses (each replica
/// diagnoses for itself), intents (in etcd already), pushed violations
/// and snapshot rows are not.
pub fn replicable(record: &Record) -> bool {
    match record {
        Record::Policy { .. }
        | Record::Execution { .. }
        | Record::Outcome { .. }
        | Record::Reclassify { .. }
        | Record::Insights { .. } => true,
        Record::Put { tree, .. } | Record::Delete { tree, .. } => {
            REPLICATED_TREES.contains(&tree.as_str())
        }
        Record::Analysis { .. }
        | Record::Intent { .. }
        | Record::Raw { .. }
        | Record::SnapshotEnd { .. } => false,
    }
}

/// Data directories whose store this process dropped, and when: sled frees
/// its file lock from background threads shortly after the last handle is
/// gone, so a reopen by this process waits briefly for it (a lock held by
/// a live store, or by another process, is still reported at once).
fn recently_closed() -> &'static Mutex<std::collections::HashMap<PathBuf, std::time::Instant>> {
    static CLOSED: std::sync::OnceLock<
        Mutex<std::collections::HashMap<PathBuf, std::time::Instant>>,
    > = std::sync::OnceLock::new();
    CLOSED.get_or_init(Default::default)
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut closed = recently_closed().lock().unwrap_or_else(|p| p.into_inner());
        closed.retain(|_, at| at.elapsed() < Duration::from_secs(10));
        closed.insert(self.dir.clone(), std::time::Instant::now());
    }
}

/// Whether the journal of `dir` is intact and holds every record (a
/// snapshot, or entries from seq 1), so sled can be rebuilt from it; if
/// not, why.
fn journal_can_rebuild(dir: &Path) -> Result<(), String> {
    let r = crate::journal::verify(&dir.join(JOURNAL_DIR)).map_err(|e| e.to_string())?;
    if let Some(bad) = r.damage.iter().find(|d| !d.torn_tail) {
        return Err(format!("the journal is damaged too: {bad}"));
    }
    if r.snapshot.is_some() || r.first_seq == Some(1) {
        Ok(())
    } else {
        Err(format!(
            "the journal holds no snapshot{}",
            match r.first_seq {
                Some(f) => format!(" and starts at seq {f}"),
                None => " and no entries".to_string(),
            }
        ))
    }
}

/// Moves sled's own files (`conf`, `db`, `blobs`, `snap.*`) of `dir` into
/// `dir/damaged-sled-<time>/`; returns that directory.
fn move_sled_aside(dir: &Path) -> Result<PathBuf, StoreError> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let aside = dir.join(format!("damaged-sled-{stamp}"));
    let io = |source| StoreError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(&aside).map_err(io)?;
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let n = name.to_string_lossy();
        if n == "conf" || n == "db" || n == "blobs" || n.starts_with("snap.") {
            std::fs::rename(entry.path(), aside.join(&name)).map_err(io)?;
        }
    }
    Ok(aside)
}

/// Keeps sled's panics while opening a damaged file off stderr: they are
/// caught and reported as [`StoreError::Corrupt`] with their message; any
/// other panic goes to the hook in place before.
fn quiet_sled_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let quiet = std::thread::current()
                .name()
                .is_some_and(|n| n == "mapek-sled-open" || n == "mapek-store-check");
            if !quiet {
                previous(info);
            }
        }));
    });
}

/// sled's cache, per store: sled keeps what it read up to this much (it
/// defaults to 1 GiB).
const SLED_CACHE_BYTES: u64 = 32 << 20;

fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(SLED_CACHE_BYTES)
        .open()
        .map_err(|e| StoreError::from_sled_open(dir, e))
}

/// Opens sled again right after this thread dropped it: sled frees its
/// file lock from background threads, so a lock still held is waited for
/// (up to 5 s).
fn reopen_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match open_sled(dir) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// `applied_seq` of a `meta` tree (0 when absent).
fn read_applied_seq(dir: &Path, meta: &sled::Tree) -> Result<u64, StoreError> {
    match meta
        .get(APPLIED_KEY)
        .map_err(|e| StoreError::from_sled(dir, e))?
    {
        None => Ok(0),
        Some(v) => String::from_utf8_lossy(&v)
            .parse::<u64>()
            .map_err(|e| StoreError::Corrupt {
                dir: dir.to_path_buf(),
                detail: format!("unreadable applied_seq in the meta tree: {e}"),
            }),
    }
}

/// Logs what the start-up check found: a warning for anything put right
/// or lost, an info line otherwise.
fn log_integrity(dir: &Path, r: &IntegrityReport) {
    use crate::integrity::preview;
    if r.repaired {
        tracing::warn!(
            dir = %dir.display(),
            damage = %r.damage.join("; "),
            dropped = r.dropped.len(),
            dropped_entries = %preview(&r.dropped),
            covered_by_sled = %preview(&r.covered_by_sled),
            restored = r.restored.len(),
            kept_from_sled = r.kept_from_sled.len(),
            report = %r.repair_report.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            "knowledge store repaired: every readable record salvaged; dropped entries listed"
        );
    } else if r.rebuilt {
        tracing::warn!(
            dir = %dir.display(),
            restored = r.restored.len(),
            "sled held no data although this directory held a store: rebuilt from the journal, \
             nothing lost"
        );
    } else if r.sled_damaged {
        tracing::warn!(
            dir = %dir.display(),
            restored = r.restored.len(),
            replaced = r.replaced.len(),
            removed = r.removed.len(),
            records = %preview(&[r.restored.clone(), r.replaced.clone(), r.removed.clone()].concat()),
            "sled had lost or changed records: put right from the journal, nothing lost"
        );
    } else if r.changed() {
        tracing::info!(
            dir = %dir.display(),
            brought_forward = r.restored.len() + r.replaced.len() + r.removed.len(),
            "sled was behind the journal: brought forward"
        );
    } else {
        tracing::debug!(dir = %dir.display(), compared = r.compared, "knowledge store verified against its journal");
    }
}

impl Inner {
    /// Checks sled (just opened) against the journal, puts it right or
    /// refuses, and starts the journal's writer.
    fn open_on(dir: &Path, db: sled::Db, options: JournalOptions) -> Result<Inner, StoreError> {
        let started = std::time::Instant::now();
        let err = |e| StoreError::from_sled(dir, e);
        let marker = dir.join(MARKER_FILE);
        let had_marker = marker.exists();
        let journal_dir = dir.join(JOURNAL_DIR);
        let had_journal = std::fs::read_dir(&journal_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        let meta = db.open_tree("meta").map_err(err)?;
        let schema = meta
            .get(SCHEMA_KEY)
            .map_err(err)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let applied_seq = read_applied_seq(dir, &meta)?;
        // sled held a store once (the marker, or a journal) but recovered
        // nothing: sled discards unreadable data on open.
        let (migrating, sled_lost) = match schema.as_deref() {
            None => (false, had_marker || had_journal),
            Some(v) if v == PREVIOUS_SCHEMA_VERSION.to_string() => (true, false),
            Some(v) if v == SCHEMA_VERSION.to_string() => (false, false),
            Some(found) => {
                return Err(StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    detail: format!(
                        "unsupported schema version {found:?} (this build reads \
                         {PREVIOUS_SCHEMA_VERSION} and {SCHEMA_VERSION})"
                    ),
                });
            }
        };
        let mut integrity = IntegrityReport {
            sled_applied_seq: applied_seq,
            migrated: migrating,
            ..IntegrityReport::default()
        };
        let mut snapshot_needed = migrating;
        let mut counts: Option<HashMap<String, usize>> = None;
        if migrating {
            // The previous release kept damaged segments for a repair: they
            // are not migrated silently.
            let v = crate::journal::verify(&journal_dir).map_err(|source| StoreError::Journal {
                dir: dir.to_path_buf(),
                source,
            })?;
            let damage: Vec<String> = v
                .damage
                .iter()
                .filter(|d| !d.torn_tail)
                .map(|d| format!("journal damaged: {d}"))
                .collect();
            if !damage.is_empty() && !options.salvage {
                return Err(StoreError::Damaged {
                    dir: dir.to_path_buf(),
                    detail: format!(
                        "{} (a data directory of the previous release, not migrated); entries \
                         after the damage that sled had not applied would be lost",
                        damage.join("; ")
                    ),
                });
            }
            integrity.damage = damage;
        }
        let mut db = db;
        let mut meta = meta;
        if !migrating {
            // The previous release kept only the journal's tail: its sled
            // is the record and cannot be checked. Every later start
            // checks sled against the whole journal.
            let expected = integrity::read_expected(dir, applied_seq)?;
            let report = &expected.report;
            integrity.journal_records = expected.records;
            integrity.last_seq = report.last_seq.unwrap_or(0);
            let mut problems: Vec<String> = report
                .damage
                .iter()
                .filter(|d| !d.torn_tail)
                .map(|d| format!("journal damaged: {d}"))
                .collect();
            if sled_lost && report.snapshot.is_none() && report.first_seq != Some(1) {
                problems.push(format!(
                    "sled recovered no mapek data from {} (sled discards unreadable data on \
                     open), and the journal cannot rebuild it: it holds no snapshot{}",
                    dir.display(),
                    match report.first_seq {
                        Some(f) => format!(" and starts at seq {f}"),
                        None => " and no entries".to_string(),
                    }
                ));
            } else if !sled_lost && report.last_seq.unwrap_or(0) < applied_seq {
                problems.push(format!(
                    "the journal ends at seq {} but sled has applied up to seq {applied_seq}: \
                     the journal lost its last entries (a segment deleted or cut short)",
                    report.last_seq.unwrap_or(0)
                ));
            } else if !sled_lost && !report.complete(applied_seq) {
                problems.push(format!(
                    "the journal's snapshot is missing: its entries start at seq {} while sled \
                     has applied {applied_seq}, so sled cannot be checked",
                    report.first_seq.unwrap_or(0)
                ));
            }
            integrity.damage = problems.clone();
            let truth = if problems.is_empty() {
                integrity::Truth::Journal
            } else if options.salvage {
                integrity::Truth::Salvage
            } else {
                let diff =
                    integrity::reconcile(dir, &db, &expected, integrity::Truth::Salvage, true)?;
                return Err(StoreError::Damaged {
                    dir: dir.to_path_buf(),
                    detail: integrity::describe(report, applied_seq, &problems, &diff),
                });
            };
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
            if truth == integrity::Truth::Salvage {
                // What the repair will do is on disk before anything
                // changes: a crash in the middle of it loses no listing.
                let plan = integrity::reconcile(dir, &db, &expected, truth, true)?;
                let (dropped, covered) = integrity::classify_skipped(report, applied_seq);
                let planned = IntegrityReport {
                    restored: plan.restored,
                    replaced: plan.replaced,
                    removed: plan.removed,
                    kept_from_sled: plan.kept,
                    dropped,
                    covered_by_sled: covered,
                    repaired: true,
                    ..integrity.clone()
                };
                integrity.repair_report =
                    Some(integrity::write_repair_report(dir, &stamp, &planned)?);
            }
            let diff = integrity::reconcile(dir, &db, &expected, truth, false)?;
            integrity.compared = diff.compared;
            counts = Some(diff.counts.clone());
            let sled_current = applied_seq >= integrity.last_seq;
            let changed =
                !(diff.restored.is_empty() && diff.replaced.is_empty() && diff.removed.is_empty());
            integrity.sled_damaged = changed && sled_current && !sled_lost;
            integrity.rebuilt = sled_lost;
            integrity.restored = diff.restored;
            integrity.replaced = diff.replaced;
            integrity.removed = diff.removed;
            integrity.kept_from_sled = diff.kept;
            let last = integrity.last_seq.max(applied_seq);
            meta.insert(APPLIED_KEY, last.to_string().as_bytes())
                .map_err(err)?;
            if truth == integrity::Truth::Salvage {
                let (dropped, covered) = integrity::classify_skipped(report, applied_seq);
                integrity.dropped = dropped;
                integrity.covered_by_sled = covered;
                integrity.repaired = true;
                snapshot_needed = true;
            }
            if sled_lost {
                snapshot_needed = true;
            }
            drop(expected);
            db.flush().map_err(err)?;
            // The check read every record; sled keeps large pages it read
            // resident whatever its cache size. Reopening lets them go.
            drop(meta);
            drop(db);
            db = reopen_sled(dir)?;
            meta = db.open_tree("meta").map_err(err)?;
            if integrity.repaired {
                let aside = integrity::move_journal_aside(dir, &stamp)?;
                integrity.moved_aside.get_or_insert(aside);
            }
            log_integrity(dir, &integrity);
        }
        let known = counts.as_ref();
        let policies = Records::open(&db, "policies", known).map_err(err)?;
        let executions = Records::open(&db, "executions", known).map_err(err)?;
        let outcomes = Records::open(&db, "outcomes", known).map_err(err)?;
        let analyses = Records::open(&db, "analyses", known).map_err(err)?;
        let stats = db.open_tree("stats").map_err(err)?;
        let insights = db.open_tree("insights").map_err(err)?;
        let intents = db.open_tree(INTENTS_TREE).map_err(err)?;
        let pushed = db.open_tree(PUSHED_TREE).map_err(err)?;
        let incidents = db.open_tree(INCIDENTS_TREE).map_err(err)?;
        let mut index = SledIndex::open(dir, db.clone())?;
        index.counts = [
            policies.count.clone(),
            executions.count.clone(),
            outcomes.count.clone(),
            analyses.count.clone(),
        ];
        let journal_err = |source| StoreError::Journal {
            dir: dir.to_path_buf(),
            source,
        };
        let counters = JournalCounters::default();
        let (mut journal, report) = Journal::open(
            &journal_dir,
            JournalOptions {
                salvage: false,
                ..options
            },
            &mut index,
        )
        .map_err(journal_err)?;
        if report.replayed > 0 {
            tracing::info!(
                dir = %dir.display(),
                replayed = report.replayed,
                "journal records replayed into the knowledge store"
            );
        }
        if snapshot_needed {
            let snap = journal
                .write_snapshot(&mut index, &counters)
                .map_err(journal_err)?;
            if migrating && !report.kept.is_empty() {
                // `--repair` on a previous-release directory: its damaged
                // segments are superseded by the snapshot; kept aside.
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
                let aside = journal_dir.join(format!("damaged-{stamp}"));
                let io = |source| StoreError::Io {
                    dir: dir.to_path_buf(),
                    source,
                };
                std::fs::create_dir_all(&aside).map_err(io)?;
                for path in &report.kept {
                    if let Some(name) = path.file_name() {
                        std::fs::rename(path, aside.join(name)).map_err(io)?;
                    }
                }
                integrity.repaired = true;
                integrity.moved_aside = Some(aside);
            }
            if migrating {
                tracing::info!(
                    dir = %dir.display(),
                    rows = snap.rows,
                    "knowledge store migrated: the journal now holds a snapshot of every record"
                );
            }
        }
        if schema.as_deref() != Some(SCHEMA_VERSION.to_string().as_str()) {
            meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_string().as_bytes())
                .map_err(err)?;
            db.flush().map_err(err)?;
        }
        if !had_marker || migrating {
            // Written only once the schema version is durable in sled.
            std::fs::write(
                &marker,
                format!("mapek knowledge store, schema {SCHEMA_VERSION}\n"),
            )
            .map_err(|source| StoreError::Io {
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        integrity.millis = started.elapsed().as_millis() as u64;
        let writer = Writer::spawn(journal, index, counters).map_err(journal_err)?;
        Ok(Inner {
            dir: dir.to_path_buf(),
            policies,
            executions,
            outcomes,
            analyses,
            stats,
            insights,
            intents,
            pushed,
            incidents,
            db,
            closed: AtomicBool::new(false),
            prune_lock: Mutex::new(()),
            writer,
            journal: report,
            integrity,
            tap: std::sync::OnceLock::new(),
        })
    }

    fn journal_err(&self, source: JournalError) -> StoreError {
        StoreError::Journal {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Waits until everything submitted so far is durable and applied.
    fn barrier(&self) -> Result<(), StoreError> {
        self.writer
            .barrier()
            .and_then(|ack| ack.wait())
            .map_err(|e| self.journal_err(e))
    }

    /// Writes a soft-state record straight to its sled tree (no journal,
    /// no fsync: durable with sled's next flush).
    fn put_soft<T: Serialize>(
        &self,
        tree: &sled::Tree,
        key: &str,
        value: &T,
        what: &str,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Encode {
            dir: self.dir.clone(),
            what: format!("{what} {key}"),
            source,
        })?;
        tree.insert(key.as_bytes(), bytes)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Deletes a soft-state record (see [`Inner::put_soft`]).
    fn delete_soft(&self, tree: &sled::Tree, key: &str) -> Result<(), StoreError> {
        tree.remove(key.as_bytes()).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn err(&self, e: sled::Error) -> StoreError {
        StoreError::from_sled(&self.dir, e)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        decode(&self.dir, tree, key, bytes)
    }

    fn get<T: DeserializeOwned>(
        &self,
        records: &Records,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match records.tree.get(key.as_bytes()).map_err(|e| self.err(e))? {
            Some(v) => self.decode(records.name, key.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    /// Newest first (reverse key order), decoded, filtered, at most `limit`.
    fn list<T: DeserializeOwned>(
        &self,
        records: &Records,
        limit: usize,
        keep: impl Fn(&T) -> bool,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for item in records.tree.iter().rev() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let rec: T = self.decode(records.name, &k, &v)?;
            if keep(&rec) {
                out.push(rec);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<usize, StoreError> {
        self.db.flush().map_err(|e| self.err(e))
    }

    fn stats(&self) -> Result<LearnedStats, StoreError> {
        match self.stats.get(STATS_KEY).map_err(|e| self.err(e))? {
            Some(v) => self.decode("stats", STATS_KEY, &v),
            None => Ok(LearnedStats::default()),
        }
    }

    /// Deletes the oldest records of `records` beyond `max`, through the
    /// journal (so that the journal keeps describing sled); returns how
    /// many were deleted.
    fn prune(&self, records: &Records, max: usize) -> Result<usize, StoreError> {
        let excess = records.len().saturating_sub(max);
        if excess == 0 {
            return Ok(0);
        }
        let mut acks = Vec::with_capacity(excess);
        for item in records.tree.iter().keys().take(excess) {
            let k = item.map_err(|e| self.err(e))?;
            let record = Record::Delete {
                tree: records.name.to_string(),
                key: String::from_utf8_lossy(&k).into_owned(),
            };
            acks.push(
                self.writer
                    .submit(&record)
                    .map_err(|e| self.journal_err(e))?,
            );
        }
        let removed = acks.len();
        for ack in acks {
            ack.wait().map_err(|e| self.journal_err(e))?;
        }
        Ok(removed)
    }
}

/// What applying one journal record yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The record was applied.
    Done,
    /// An outcome: the learned statistics after it (unchanged when the
    /// execution already had an outcome).
    Stats(LearnedStats),
}

/// An intent journaled before acting ([`KnowledgeStore::journal_intent`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentRecord {
    /// Idempotency key `incident/attempt/action`.
    pub key: String,
    /// The request to be sent.
    pub request: serde_json::Value,
    /// Journal sequence number of the intent.
    pub seq: u64,
}

// Indexes of the fixed trees in `SledIndex::trees`.
const T_META: usize = 0;
const T_OUTCOMES: usize = 3;
const T_STATS: usize = 5;
const FIXED_TREES: [&str; 8] = [
    "meta",
    "policies",
    "executions",
    "outcomes",
    "analyses",
    "stats",
    "insights",
    INTENTS_TREE,
];

/// One sled write of a group, prepared outside the transaction (which
/// may run more than once).
enum Op<'a> {
    Put {
        tree: usize,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        tree: usize,
        key: Vec<u8>,
    },
    Outcome {
        value: Vec<u8>,
        outcome: &'a PolicyOutcome,
        saturation: u32,
    },
    Reclassify {
        execution_id: &'a str,
        to: crate::model::OutcomeType,
    },
    /// A record that changes nothing (a snapshot's end).
    Nothing,
}

/// sled as the index of the journal: applied by the writer thread only.
pub(crate) struct SledIndex {
    dir: PathBuf,
    db: sled::Db,
    /// The fixed trees (see `FIXED_TREES`), then generic ones per group.
    trees: Vec<sled::Tree>,
    /// Counts of policies, executions, outcomes, analyses (tree indexes
    /// 1 to 4).
    counts: [Arc<AtomicUsize>; 4],
    generic: HashMap<String, sled::Tree>,
    applied_seq: u64,
    /// Keep only digests of large trees' values (the start-up check's
    /// scratch index: see [`digested`]).
    pub(crate) digest: bool,
}

impl SledIndex {
    /// An index over `db` (its fixed trees opened, its `applied_seq`
    /// read), with counts of its own.
    pub(crate) fn open(dir: &Path, db: sled::Db) -> Result<SledIndex, StoreError> {
        let err = |e| StoreError::from_sled(dir, e);
        let mut trees = Vec::with_capacity(FIXED_TREES.len());
        for name in FIXED_TREES {
            trees.push(db.open_tree(name).map_err(err)?);
        }
        let applied_seq = read_applied_seq(dir, &trees[T_META])?;
        // Counts are the store's (see `Records`); an index of its own
        // starts them at zero.
        let count = || Arc::new(AtomicUsize::new(0));
        let counts = [count(), count(), count(), count()];
        Ok(SledIndex {
            dir: dir.to_path_buf(),
            trees,
            counts,
            generic: HashMap::new(),
            db,
            applied_seq,
            digest: false,
        })
    }

    /// Index of `name` in `trees`, opening a generic tree if needed.
    fn tree_index(&mut self, name: &str, extra: &mut Vec<String>) -> Result<usize, String> {
        if let Some(i) = FIXED_TREES.iter().position(|t| *t == name) {
            return Ok(i);
        }
        if let Some(i) = extra.iter().position(|t| t == name) {
            return Ok(FIXED_TREES.len() + i);
        }
        if !self.generic.contains_key(name) {
            let tree = self
                .db
                .open_tree(name)
                .map_err(|e| format!("cannot open tree {name:?}: {e}"))?;
            self.generic.insert(name.to_string(), tree);
        }
        extra.push(name.to_string());
        Ok(FIXED_TREES.len() + extra.len() - 1)
    }

    fn prepare<'a>(
        &mut self,
        group: &'a [(u64, Record)],
        extra: &mut Vec<String>,
    ) -> Result<Vec<Op<'a>>, String> {
        let mut ops = Vec::with_capacity(group.len());
        for (seq, record) in group {
            let op = match record {
                Record::Outcome {
                    outcome,
                    saturation,
                } => Op::Outcome {
                    value: serde_json::to_vec(outcome)
                        .map_err(|e| format!("cannot encode an outcome: {e}"))?,
                    outcome,
                    saturation: *saturation,
                },
                Record::Reclassify { execution_id, to } => Op::Reclassify {
                    execution_id,
                    to: *to,
                },
                Record::SnapshotEnd { .. } => Op::Nothing,
                plain => match plain_write(*seq, plain)? {
                    None => Op::Nothing,
                    Some(PlainWrite { tree, key, value }) => {
                        let tree = self.tree_index(&tree, extra)?;
                        match value {
                            Some(value) if self.digest && digested(tree) => Op::Put {
                                tree,
                                key,
                                value: digest(&value),
                            },
                            Some(value) => Op::Put { tree, key, value },
                            None => Op::Delete { tree, key },
                        }
                    }
                },
            };
            ops.push(op);
        }
        Ok(ops)
    }
}

/// What a record that is a plain write (no folding) writes: one key of
/// one tree, set (`Some`) or deleted (`None`); exactly the bytes the index
/// stores.
pub(crate) struct PlainWrite {
    pub tree: String,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// The write of a plain record (`None` for the folding ones: outcomes,
/// re-classifications, a snapshot's end).
pub(crate) fn plain_write(seq: u64, record: &Record) -> Result<Option<PlainWrite>, String> {
    fn json<T: Serialize>(what: &str, v: &T) -> Result<Option<Vec<u8>>, String> {
        serde_json::to_vec(v)
            .map(Some)
            .map_err(|e| format!("cannot encode {what}: {e}"))
    }
    let w = |tree: &str, key: &[u8], value| PlainWrite {
        tree: tree.to_string(),
        key: key.to_vec(),
        value,
    };
    Ok(Some(match record {
        Record::Policy { policy } => w("policies", policy.id.as_bytes(), json("a policy", policy)?),
        Record::Execution { execution } => w(
            "executions",
            execution.id.as_bytes(),
            json("an execution", execution)?,
        ),
        Record::Analysis { analysis } => w(
            "analyses",
            analysis.id.as_bytes(),
            json("an analysis", analysis)?,
        ),
        Record::Insights { insights } => w("insights", INSIGHTS_KEY, json("insights", insights)?),
        Record::Intent { key, request } => w(
            INTENTS_TREE,
            key.as_bytes(),
            json(
                "an intent",
                &IntentRecord {
                    key: key.clone(),
                    request: request.clone(),
                    seq,
                },
            )?,
        ),
        Record::Put { tree, key, value } => w(tree, key.as_bytes(), json("a record", value)?),
        Record::Delete { tree, key } => w(tree, key.as_bytes(), None),
        Record::Raw { tree, key, value } => {
            w(tree, key.as_bytes(), Some(value.as_bytes().to_vec()))
        }
        Record::Outcome { .. } | Record::Reclassify { .. } | Record::SnapshotEnd { .. } => {
            return Ok(None)
        }
    }))
}

/// Whether a digesting index (the start-up check's scratch) keeps only a
/// digest of this tree's values: every tree but those the folding records
/// read (outcomes, statistics) and `meta`.
fn digested(tree: usize) -> bool {
    !matches!(tree, T_META | T_OUTCOMES | T_STATS)
}

/// Whether the tree named `name` is digested (see [`digested`]).
pub(crate) fn digested_name(name: &str) -> bool {
    !matches!(name, "meta" | "outcomes" | "stats")
}

/// SHA-256 of a value (what a digesting index stores for it).
pub(crate) fn digest(value: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(value).to_vec()
}

impl Index for SledIndex {
    type Output = Applied;

    fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    fn apply(&mut self, group: &[(u64, Record)]) -> Result<Vec<Applied>, String> {
        let Some(last_seq) = group.last().map(|(seq, _)| *seq) else {
            return Ok(Vec::new());
        };
        let mut extra = Vec::new();
        let ops = self.prepare(group, &mut extra)?;
        let mut trees = self.trees.clone();
        for name in &extra {
            match self.generic.get(name) {
                Some(t) => trees.push(t.clone()),
                None => return Err(format!("tree {name:?} is not open")),
            }
        }
        let dir = &self.dir;
        let applied = last_seq.to_string();
        let res = trees[..].transaction(|tx| {
            let mut outputs = Vec::with_capacity(ops.len());
            let mut deltas = [0i64; 4];
            let mut stats: Option<LearnedStats> = None;
            let mut stats_dirty = false;
            for op in &ops {
                match op {
                    Op::Put { tree, key, value } => {
                        let old = tx[*tree].insert(key.as_slice(), value.as_slice())?;
                        if old.is_none() && (1..=4).contains(tree) {
                            deltas[*tree - 1] += 1;
                        }
                        outputs.push(Applied::Done);
                    }
                    Op::Nothing => outputs.push(Applied::Done),
                    Op::Delete { tree, key } => {
                        let old = tx[*tree].remove(key.as_slice())?;
                        if old.is_some() && (1..=4).contains(tree) {
                            deltas[*tree - 1] -= 1;
                        }
                        outputs.push(Applied::Done);
                    }
                    Op::Outcome {
                        value,
                        outcome,
                        saturation,
                    } => {
                        let mut current = match stats.take() {
                            Some(s) => s,
                            None => match tx[T_STATS].get(STATS_KEY)? {
                                Some(v) => decode(dir, "stats", STATS_KEY, &v).map_err(|e| {
                                    ConflictableTransactionError::Abort(e.to_string())
                                })?,
                                None => LearnedStats::default(),
                            },
                        };
                        let key = outcome.execution_id.as_bytes();
                        // Idempotent per execution: a retried outcome must
                        // not be counted twice.
                        if tx[T_OUTCOMES].get(key)?.is_none() {
                            current.record(outcome, *saturation);
                            tx[T_OUTCOMES].insert(key, value.as_slice())?;
                            deltas[T_OUTCOMES - 1] += 1;
                            stats_dirty = true;
                        } else {
                            tracing::debug!(
                                execution_id = %outcome.execution_id,
                                "outcome already recorded; statistics unchanged"
                            );
                        }
                        outputs.push(Applied::Stats(current.clone()));
                        stats = Some(current);
                    }
                    Op::Reclassify { execution_id, to } => {
                        let mut current = match stats.take() {
                            Some(s) => s,
                            None => match tx[T_STATS].get(STATS_KEY)? {
                                Some(v) => decode(dir, "stats", STATS_KEY, &v).map_err(|e| {
                                    ConflictableTransactionError::Abort(e.to_string())
                                })?,
                                None => LearnedStats::default(),
                            },
                        };
                        let key = execution_id.as_bytes();
                        if let Some(v) = tx[T_OUTCOMES].get(key)? {
                            let mut o: PolicyOutcome = decode(dir, "outcomes", key, &v)
                                .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
                            // Once: an outcome already re-classified stays.
                            if o.outcome_type != *to && o.outcome_type.is_success() {
                                current.reclassify(o.root_cause, &o.actions, o.outcome_type, *to);
                                o.outcome_type = *to;
                                o.success_confidence = to.confidence();
                                let bytes = serde_json::to_vec(&o).map_err(|e| {
                                    ConflictableTransactionError::Abort(format!(
                                        "cannot encode an outcome: {e}"
                                    ))
                                })?;
                                tx[T_OUTCOMES].insert(key, bytes)?;
                                stats_dirty = true;
                            }
                        }
                        outputs.push(Applied::Stats(current.clone()));
                        stats = Some(current);
                    }
                }
            }
            if let (true, Some(s)) = (stats_dirty, &stats) {
                let bytes = serde_json::to_vec(s).map_err(|e| {
                    ConflictableTransactionError::Abort(format!(
                        "cannot encode the learned statistics: {e}"
                    ))
                })?;
                tx[T_STATS].insert(STATS_KEY, bytes)?;
            }
            tx[T_META].insert(APPLIED_KEY, applied.as_bytes())?;
            Ok((outputs, deltas))
        });
        let (outputs, deltas) = match res {
            Ok(v) => v,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(format!("sled error: {e}")),
        };
        for (count, delta) in self.counts.iter().zip(deltas) {
            if delta > 0 {
                count.fetch_add(delta as usize, Ordering::Relaxed);
            } else if delta < 0 {
                count.fetch_sub(delta.unsigned_abs() as usize, Ordering::Relaxed);
            }
        }
        self.applied_seq = last_seq;
        Ok(outputs)
    }

    fn flush(&mut self) -> Result<(), String> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| format!("sled flush: {e}"))
    }

    fn snapshot(
        &mut self,
        sink: &mut dyn FnMut(Record) -> Result<(), String>,
    ) -> Result<(), String> {
        for name in journaled_trees(&self.db).map_err(|e| format!("listing trees: {e}"))? {
            let tree = self
                .db
                .open_tree(&name)
                .map_err(|e| format!("cannot open tree {name:?}: {e}"))?;
            for item in tree.iter() {
                let (k, v) = item.map_err(|e| format!("reading tree {name:?}: {e}"))?;
                let key = String::from_utf8(k.to_vec())
                    .map_err(|_| format!("tree {name:?}: a key is not UTF-8"))?;
                let value = String::from_utf8(v.to_vec())
                    .map_err(|_| format!("tree {name:?}: the value of {key:?} is not UTF-8"))?;
                sink(Record::Raw {
                    tree: name.clone(),
                    key,
                    value,
                })?;
            }
        }
        Ok(())
    }
}

/// The trees whose content the journal describes: every tree except
/// `meta`, the soft-state trees and sled's default tree, sorted.
pub(crate) fn journaled_trees(db: &sled::Db) -> sled::Result<Vec<String>> {
    let mut names: Vec<String> = db
        .tree_names()
        .into_iter()
        .filter_map(|n| String::from_utf8(n.to_vec()).ok())
        .filter(|n| {
            n != "meta" && n != PUSHED_TREE && n != INCIDENTS_TREE && n != "__sled__default"
        })
        .collect();
    for fixed in &FIXED_TREES[1..] {
        if !names.iter().any(|n| n == fixed) {
            names.push(fixed.to_string());
        }
    }
    names.sort();
    Ok(names)
}

fn decode<T: DeserializeOwned>(
    dir: &Path,
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        dir: dir.to_path_buf(),
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// The persistent knowledge of mapek. Cheap to clone (clones share one sled
/// database); `Send + Sync`.
#[derive(Debug, Clone)]
pub struct KnowledgeStore {
    inner: Arc<Inner>,
}

impl KnowledgeStore {
    /// Opens (or creates) the store in `dir`.
    ///
    /// sled is opened on a separate thread, under `catch_unwind`, and this
    /// call waits at most `timeout` for it:
    /// - another process holds the directory: [`StoreError::Locked`] at once;
    /// - sled reports corruption, cannot read its `conf`, panics, or
    ///   recovers no data from a directory that held a store (see
    ///   [`MARKER_FILE`]): [`StoreError::Corrupt`];
    /// - sled does not finish in time (it hangs on some corrupted files):
    ///   [`StoreError::Timeout`]. The opening thread cannot be cancelled; it
    ///   is left behind and drops the database if it ever finishes.
    ///
    /// Opening counts the records of each tree once (`O(records)`), and
    /// replays the journal entries sled has not applied (see
    /// [`crate::journal`]).
    pub fn open(dir: &Path, timeout: Duration) -> Result<KnowledgeStore, StoreError> {
        KnowledgeStore::open_with(dir, timeout, JournalOptions::default())
    }

    /// How long an open waits for a lock that a store of this process,
    /// dropped moments ago, is still releasing (sled frees its file lock
    /// from background threads). A live holder is reported at once.
    pub const LOCK_WAIT: Duration = Duration::from_secs(2);

    /// [`open`](Self::open) with journal options.
    pub fn open_with(
        dir: &Path,
        timeout: Duration,
        options: JournalOptions,
    ) -> Result<KnowledgeStore, StoreError> {
        quiet_sled_panics();
        let deadline = std::time::Instant::now() + Self::LOCK_WAIT.min(timeout);
        let mut moved: Option<PathBuf> = None;
        loop {
            match Self::open_once(dir, timeout, options) {
                Err(StoreError::Locked { .. })
                    if std::time::Instant::now() < deadline && Self::closed_here(dir) =>
                {
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(StoreError::Corrupt { detail, .. })
                    if moved.is_none() && !options.salvage && journal_can_rebuild(dir).is_err() =>
                {
                    let why = journal_can_rebuild(dir).err().unwrap_or_default();
                    return Err(StoreError::Damaged {
                        dir: dir.to_path_buf(),
                        detail: format!(
                            "sled cannot read its files ({detail}), and they cannot be rebuilt: \
                             {why}; a repair keeps what the journal holds"
                        ),
                    });
                }
                Err(StoreError::Timeout { seconds, .. }) if moved.is_none() && options.salvage => {
                    let aside = move_sled_aside(dir)?;
                    tracing::warn!(
                        dir = %dir.display(),
                        seconds,
                        moved_to = %aside.display(),
                        "sled did not open in time; with --repair its files were moved aside and \
                         sled is rebuilt from the journal"
                    );
                    moved = Some(aside);
                }
                Err(StoreError::Corrupt { detail, .. }) if moved.is_none() => {
                    // sled cannot read its files, but the journal holds
                    // every record: move sled's files aside and rebuild.
                    let aside = move_sled_aside(dir)?;
                    tracing::warn!(
                        dir = %dir.display(),
                        sled_error = %detail,
                        moved_to = %aside.display(),
                        "sled cannot open its files; they were moved aside and sled is rebuilt \
                         from the journal"
                    );
                    moved = Some(aside);
                }
                Ok(mut store) => {
                    if let (Some(aside), Some(inner)) = (moved, Arc::get_mut(&mut store.inner)) {
                        inner.integrity.moved_aside = Some(aside);
                        inner.integrity.rebuilt = true;
                    }
                    return Ok(store);
                }
                other => return other,
            }
        }
    }

    /// What the start-up check of the store against its journal found
    /// and did (see [`crate::integrity`]).
    pub fn integrity(&self) -> &IntegrityReport {
        &self.inner.integrity
    }

    /// Whether this process dropped a store of `dir` moments ago.
    fn closed_here(dir: &Path) -> bool {
        recently_closed()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(dir)
            .is_some_and(|at| at.elapsed() < Duration::from_secs(10))
    }

    fn open_once(
        dir: &Path,
        timeout: Duration,
        options: JournalOptions,
    ) -> Result<KnowledgeStore, StoreError> {
        // Only sled's own open is timed (it hangs on some damaged files);
        // the check against the journal that follows takes as long as the
        // store is large.
        let (tx, rx) = mpsc::sync_channel(1);
        let path = dir.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("mapek-sled-open".into())
            .spawn(move || {
                let res = panic::catch_unwind(AssertUnwindSafe(|| open_sled(&path)));
                // The receiver is gone after a timeout: the late database is
                // dropped here, releasing its lock.
                let _ = tx.send(res);
            });
        if let Err(source) = spawned {
            return Err(StoreError::Io {
                dir: dir.to_path_buf(),
                source,
            });
        }
        let db = match rx.recv_timeout(timeout) {
            Ok(Ok(Ok(db))) => db,
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(payload)) => {
                return Err(StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    detail: format!("sled panicked while opening: {}", panic_message(&*payload)),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(StoreError::Timeout {
                    dir: dir.to_path_buf(),
                    seconds: timeout.as_secs_f64(),
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    detail: "the opening thread ended without an answer".to_string(),
                })
            }
        };
        // The check runs on a thread of its own: sled can panic on a page
        // it cannot read; that is reported, not printed.
        let path = dir.to_path_buf();
        let checked = std::thread::Builder::new()
            .name("mapek-store-check".into())
            .spawn(move || {
                panic::catch_unwind(AssertUnwindSafe(|| Inner::open_on(&path, db, options)))
            })
            .map_err(|source| StoreError::Io {
                dir: dir.to_path_buf(),
                source,
            })?
            .join();
        match checked {
            Ok(Ok(Ok(inner))) => {
                tracing::info!(
                    dir = %dir.display(),
                    policies = inner.policies.len(),
                    executions = inner.executions.len(),
                    outcomes = inner.outcomes.len(),
                    analyses = inner.analyses.len(),
                    "knowledge store opened"
                );
                Ok(KnowledgeStore {
                    inner: Arc::new(inner),
                })
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(payload)) | Err(payload) => Err(StoreError::Damaged {
                dir: dir.to_path_buf(),
                detail: format!(
                    "the start-up check stopped on a record it could not read ({})",
                    panic_message(&*payload)
                ),
            }),
        }
    }

    fn live(&self) -> Result<&Inner, StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(StoreError::Closed {
                dir: self.inner.dir.clone(),
            })
        } else {
            Ok(&self.inner)
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Whether [`close`](Self::close) has not been called (on any clone).
    pub fn is_open(&self) -> bool {
        !self.inner.closed.load(Ordering::Acquire)
    }

    /// Queues a record for the journal writer; the future resolves once it
    /// is durable and applied to sled. The record is queued by this call
    /// (call order = journal order), not when the future is first polled;
    /// dropping the future does not cancel the write.
    pub fn submit(
        &self,
        record: &Record,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send + 'static {
        let dir = self.inner.dir.clone();
        let ack = self.live().and_then(|inner| {
            // The tap sees records in journal order, and only those queued.
            let _order = inner.tap.get().map(|t| lock_tap(&t.1));
            let ack = inner
                .writer
                .submit(record)
                .map_err(|e| inner.journal_err(e))?;
            self.tapped(record);
            Ok(ack)
        });
        async move {
            ack?.await
                .map_err(|source| StoreError::Journal { dir, source })
        }
    }

    /// Cluster mode: from now on every [`replicable`] record this replica
    /// submits is also handed to `tap` (in submission order), for the
    /// leader to publish. Records applied from other replicas
    /// ([`submit_replica`](Self::submit_replica)) are not. Set once;
    /// `false` when a tap was set already.
    pub fn tap(&self, tap: Tap) -> bool {
        self.inner.tap.set(TapCell(tap, Mutex::new(()))).is_ok()
    }

    fn tapped(&self, record: &Record) {
        if let Some(tap) = self.inner.tap.get() {
            if replicable(record) {
                (tap.0)(record);
            }
        }
    }

    /// [`submit`](Self::submit) without the tap: for records received
    /// from another replica (never published again).
    pub fn submit_replica(
        &self,
        record: &Record,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send + 'static {
        let dir = self.inner.dir.clone();
        let ack = self.live().and_then(|inner| {
            inner
                .writer
                .submit(record)
                .map_err(|e| inner.journal_err(e))
        });
        async move {
            ack?.await
                .map_err(|source| StoreError::Journal { dir, source })
        }
    }

    /// Queues a record without acknowledgement (fire and forget: a failure
    /// is logged by the writer). Never blocks.
    pub fn submit_detached(&self, record: &Record) -> Result<(), StoreError> {
        let inner = self.live()?;
        let _order = inner.tap.get().map(|t| lock_tap(&t.1));
        inner
            .writer
            .submit_detached(record)
            .map_err(|e| inner.journal_err(e))?;
        self.tapped(record);
        Ok(())
    }

    /// Waits for an async write on the calling thread.
    fn wait<T>(fut: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        futures::executor::block_on(fut)
    }

    /// Stores (or replaces, e.g. after an approval decision) a policy;
    /// returns once it is durable. Blocks: not for an actor's thread.
    pub fn put_policy(&self, policy: &RemediationPolicy) -> Result<(), StoreError> {
        Self::wait(self.put_policy_async(policy))
    }

    /// [`put_policy`](Self::put_policy) as a future (queued at the call).
    pub fn put_policy_async(
        &self,
        policy: &RemediationPolicy,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let fut = self.submit(&Record::Policy {
            policy: policy.clone(),
        });
        async move { fut.await.map(|_| ()) }
    }

    /// The policy with this id.
    pub fn get_policy(&self, id: &str) -> Result<Option<RemediationPolicy>, StoreError> {
        let inner = self.live()?;
        inner.get(&inner.policies, id)
    }

    /// Up to `limit` policies, newest first, optionally only those with the
    /// given approval status (a filtered listing may walk the whole tree).
    pub fn list_policies(
        &self,
        status: Option<ApprovalStatus>,
        limit: usize,
    ) -> Result<Vec<RemediationPolicy>, StoreError> {
        let inner = self.live()?;
        inner.list(&inner.policies, limit, |p: &RemediationPolicy| {
            status.is_none_or(|s| p.approval_status == s)
        })
    }

    /// Stores (or replaces) an execution record; returns once it is
    /// durable. Blocks: not for an actor's thread.
    pub fn put_execution(&self, execution: &PolicyExecution) -> Result<(), StoreError> {
        Self::wait(self.put_execution_async(execution))
    }

    /// [`put_execution`](Self::put_execution) as a future (queued at the
    /// call).
    pub fn put_execution_async(
        &self,
        execution: &PolicyExecution,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let fut = self.submit(&Record::Execution {
            execution: execution.clone(),
        });
        async move { fut.await.map(|_| ()) }
    }

    /// The execution with this id.
    pub fn get_execution(&self, id: &str) -> Result<Option<PolicyExecution>, StoreError> {
        let inner = self.live()?;
        inner.get(&inner.executions, id)
    }

    /// Up to `limit` executions, newest first.
    pub fn list_executions(&self, limit: usize) -> Result<Vec<PolicyExecution>, StoreError> {
        let inner = self.live()?;
        inner.list(&inner.executions, limit, |_: &PolicyExecution| true)
    }

    /// Stores an analysis result; returns once it is durable. Blocks: not
    /// for an actor's thread.
    pub fn put_analysis(&self, analysis: &AnalysisResult) -> Result<(), StoreError> {
        Self::wait(self.put_analysis_async(analysis))
    }

    /// [`put_analysis`](Self::put_analysis) as a future (queued at the
    /// call).
    pub fn put_analysis_async(
        &self,
        analysis: &AnalysisResult,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let fut = self.submit(&Record::Analysis {
            analysis: analysis.clone(),
        });
        async move { fut.await.map(|_| ()) }
    }

    /// Queues an analysis result without acknowledgement (an analysis lost
    /// in a crash is recomputed from fresh evidence).
    pub fn put_analysis_detached(&self, analysis: &AnalysisResult) -> Result<(), StoreError> {
        self.submit_detached(&Record::Analysis {
            analysis: analysis.clone(),
        })
    }

    /// The analysis with this id.
    pub fn get_analysis(&self, id: &str) -> Result<Option<AnalysisResult>, StoreError> {
        let inner = self.live()?;
        inner.get(&inner.analyses, id)
    }

    /// Stores (or replaces) an incident record, keyed by its id. Soft state
    /// like the pushed violations: written to sled directly (durable within
    /// 500 ms, or at the next flush), so a state change never puts an fsync
    /// in front of an action's intent; the audit trail (policies,
    /// executions, outcomes, intents) stays on the journal.
    pub fn put_incident(&self, incident: &Incident) -> Result<(), StoreError> {
        let inner = self.live()?;
        inner.put_soft(&inner.incidents, &incident.id, incident, "incident")
    }

    /// Deletes an incident record (a closed one beyond the bound).
    pub fn delete_incident(&self, id: &str) -> Result<(), StoreError> {
        let inner = self.live()?;
        inner.delete_soft(&inner.incidents, id)
    }

    /// Keeps an active pushed violation, in a compact form (~150 bytes:
    /// short keys, times in ms, no observation id) since there may be
    /// 100 000 of them. Soft state: written to sled directly, not through
    /// the journal, so webhook ingest never adds an fsync in front of an
    /// action's intent; sled makes it durable within 500 ms, and after a
    /// crash a change of the last moment returns when Alertmanager re-sends.
    pub fn put_pushed(&self, v: &Violation) -> Result<(), StoreError> {
        let inner = self.live()?;
        inner.put_soft(
            &inner.pushed,
            &v.fingerprint,
            &PushedRecord::from(v),
            "violation",
        )
    }

    /// Forgets a pushed violation that ended (soft state, like
    /// [`Self::put_pushed`]).
    pub fn delete_pushed(&self, fingerprint: &str) -> Result<(), StoreError> {
        let inner = self.live()?;
        inner.delete_soft(&inner.pushed, fingerprint)
    }

    /// The pushed violations that were active when the store was last
    /// written.
    pub fn pushed_violations(&self) -> Result<Vec<Violation>, StoreError> {
        Ok(self
            .list_records::<PushedRecord>(PUSHED_TREE, usize::MAX)?
            .into_iter()
            .map(|(fp, r)| r.into_violation(fp))
            .collect())
    }

    /// Every incident record kept (open ones and the bounded closed ones).
    pub fn all_incidents(&self) -> Result<Vec<Incident>, StoreError> {
        Ok(self
            .list_records::<Incident>(INCIDENTS_TREE, usize::MAX)?
            .into_iter()
            .map(|(_, i)| i)
            .collect())
    }

    /// The incidents that are not closed.
    pub fn open_incidents(&self) -> Result<Vec<Incident>, StoreError> {
        Ok(self
            .all_incidents()?
            .into_iter()
            .filter(|i| i.state != IncidentState::Closed)
            .collect())
    }

    /// Up to `limit` analyses, newest first.
    pub fn list_analyses(&self, limit: usize) -> Result<Vec<AnalysisResult>, StoreError> {
        let inner = self.live()?;
        inner.list(&inner.analyses, limit, |_: &AnalysisResult| true)
    }

    /// Stores the outcome (keyed by its execution id) and folds it into the
    /// learned statistics ([`LearnedStats::record`]) in one sled
    /// transaction over the `outcomes` and `stats` trees, once durable in
    /// the journal. Returns the statistics after the update. Blocks: not
    /// for an actor's thread.
    ///
    /// Idempotent per execution: an outcome for an execution that already
    /// has one is not stored again and not counted twice (a retry after a
    /// crash must not skew the statistics); the current statistics are
    /// returned unchanged.
    pub fn record_outcome(
        &self,
        outcome: &PolicyOutcome,
        saturation: u32,
    ) -> Result<LearnedStats, StoreError> {
        Self::wait(self.record_outcome_async(outcome, saturation))
    }

    /// [`record_outcome`](Self::record_outcome) as a future (queued at the
    /// call).
    pub fn record_outcome_async(
        &self,
        outcome: &PolicyOutcome,
        saturation: u32,
    ) -> impl Future<Output = Result<LearnedStats, StoreError>> + Send + 'static {
        let dir = self.inner.dir.clone();
        let fut = self.submit(&Record::Outcome {
            outcome: outcome.clone(),
            saturation,
        });
        async move {
            match fut.await? {
                Applied::Stats(stats) => Ok(stats),
                Applied::Done => Err(StoreError::Corrupt {
                    dir,
                    detail: "the journal writer returned no statistics for an outcome".into(),
                }),
            }
        }
    }

    /// Re-classifies the outcome of `execution_id` as `to` (only a
    /// SUCCESS or PARTIAL, once), moving the learned statistics with it;
    /// resolves with the statistics once durable.
    pub fn reclassify_outcome_async(
        &self,
        execution_id: &str,
        to: crate::model::OutcomeType,
    ) -> impl Future<Output = Result<LearnedStats, StoreError>> + Send + 'static {
        let dir = self.inner.dir.clone();
        let fut = self.submit(&Record::Reclassify {
            execution_id: execution_id.to_string(),
            to,
        });
        async move {
            match fut.await? {
                Applied::Stats(stats) => Ok(stats),
                Applied::Done => Err(StoreError::Corrupt {
                    dir,
                    detail: "the journal writer returned no statistics for a re-classification"
                        .into(),
                }),
            }
        }
    }

    /// The outcome recorded for this execution id.
    pub fn get_outcome(&self, execution_id: &str) -> Result<Option<PolicyOutcome>, StoreError> {
        let inner = self.live()?;
        inner.get(&inner.outcomes, execution_id)
    }

    /// Up to `limit` outcomes, newest execution first.
    pub fn list_outcomes(&self, limit: usize) -> Result<Vec<PolicyOutcome>, StoreError> {
        let inner = self.live()?;
        inner.list(&inner.outcomes, limit, |_: &PolicyOutcome| true)
    }

    /// The learned statistics (empty before the first outcome). They are
    /// cumulative: pruning old outcomes does not change them.
    pub fn stats(&self) -> Result<LearnedStats, StoreError> {
        self.live()?.stats()
    }

    /// Replaces the stored insights with `insights`; returns once durable.
    /// Blocks: not for an actor's thread.
    pub fn put_insights(&self, insights: &[LearningInsight]) -> Result<(), StoreError> {
        Self::wait(self.put_insights_async(insights))
    }

    /// [`put_insights`](Self::put_insights) as a future (queued at the
    /// call).
    pub fn put_insights_async(
        &self,
        insights: &[LearningInsight],
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let fut = self.submit(&Record::Insights {
            insights: insights.to_vec(),
        });
        async move { fut.await.map(|_| ()) }
    }

    fn generic_put(
        &self,
        tree: &str,
        key: &str,
        value: Result<serde_json::Value, serde_json::Error>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let dir = self.inner.dir.clone();
        let record = if RESERVED_TREES.contains(&tree) {
            Err(StoreError::ReservedTree {
                dir: dir.clone(),
                tree: tree.to_string(),
            })
        } else {
            value
                .map(|value| Record::Put {
                    tree: tree.to_string(),
                    key: key.to_string(),
                    value,
                })
                .map_err(|source| StoreError::Encode {
                    dir: dir.clone(),
                    what: format!("{tree} record {key}"),
                    source,
                })
        };
        let fut = record.map(|r| self.submit(&r));
        async move { fut?.await.map(|_| ()) }
    }

    /// Stores (or replaces) `value` as JSON under `key` in the generic
    /// tree `tree` (e.g. `incidents`); returns once durable. Trees in
    /// [`RESERVED_TREES`] are refused. Blocks: not for an actor's thread.
    pub fn put_record<T: Serialize>(
        &self,
        tree: &'static str,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        Self::wait(self.put_record_async(tree, key, value))
    }

    /// [`put_record`](Self::put_record) as a future (queued at the call).
    pub fn put_record_async<T: Serialize>(
        &self,
        tree: &'static str,
        key: &str,
        value: &T,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        self.generic_put(tree, key, serde_json::to_value(value))
    }

    /// Deletes `key` from the generic tree `tree` (no error if absent);
    /// returns once durable. Blocks: not for an actor's thread.
    pub fn delete_record(&self, tree: &'static str, key: &str) -> Result<(), StoreError> {
        Self::wait(self.delete_record_async(tree, key))
    }

    /// [`delete_record`](Self::delete_record) as a future (queued at the
    /// call).
    pub fn delete_record_async(
        &self,
        tree: &'static str,
        key: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let record = if RESERVED_TREES.contains(&tree) {
            Err(StoreError::ReservedTree {
                dir: self.inner.dir.clone(),
                tree: tree.to_string(),
            })
        } else {
            Ok(self.submit(&Record::Delete {
                tree: tree.to_string(),
                key: key.to_string(),
            }))
        };
        async move { record?.await.map(|_| ()) }
    }

    /// The record under `key` in tree `tree`.
    pub fn get_record<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let inner = self.live()?;
        let t = inner.db.open_tree(tree).map_err(|e| inner.err(e))?;
        match t.get(key.as_bytes()).map_err(|e| inner.err(e))? {
            Some(v) => inner.decode(tree, key.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    /// Up to `limit` records of tree `tree` with their keys, in reverse key
    /// order (newest first for time-ordered keys).
    pub fn list_records<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let inner = self.live()?;
        let t = inner.db.open_tree(tree).map_err(|e| inner.err(e))?;
        let mut out = Vec::new();
        for item in t.iter().rev().take(limit) {
            let (k, v) = item.map_err(|e| inner.err(e))?;
            let rec: T = inner.decode(tree, &k, &v)?;
            out.push((String::from_utf8_lossy(&k).into_owned(), rec));
        }
        Ok(out)
    }

    /// The records of tree `tree` whose keys start with `prefix`, with
    /// their keys, in key order.
    pub fn list_records_prefixed<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let inner = self.live()?;
        let t = inner.db.open_tree(tree).map_err(|e| inner.err(e))?;
        let mut out = Vec::new();
        for item in t.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item.map_err(|e| inner.err(e))?;
            let rec: T = inner.decode(tree, &k, &v)?;
            out.push((String::from_utf8_lossy(&k).into_owned(), rec));
        }
        Ok(out)
    }

    /// Journals the intent to act before acting: one record per action,
    /// keyed by its deterministic idempotency key `incident/attempt/action`,
    /// with the request to be sent (tree [`INTENTS_TREE`]; journaling the
    /// same key again replaces it). Queued at the call; the future resolves
    /// once the intent is durable.
    pub fn journal_intent(
        &self,
        key: &str,
        request: &serde_json::Value,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let fut = self.submit(&Record::Intent {
            key: key.to_string(),
            request: request.clone(),
        });
        async move { fut.await.map(|_| ()) }
    }

    /// The intents whose key starts with `prefix` (e.g. `incident/` or
    /// `incident/attempt/`), in key order.
    pub fn intents_for(&self, prefix: &str) -> Result<Vec<IntentRecord>, StoreError> {
        let inner = self.live()?;
        let mut out = Vec::new();
        for item in inner.intents.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item.map_err(|e| inner.err(e))?;
            out.push(inner.decode(INTENTS_TREE, &k, &v)?);
        }
        Ok(out)
    }

    /// The journal writer's counters (fsyncs, records, group sizes).
    pub fn journal_counters(&self) -> JournalCounters {
        self.inner.writer.counters().clone()
    }

    /// What opening found in the journal (replayed records, damage).
    pub fn journal_report(&self) -> &OpenReport {
        &self.inner.journal
    }

    /// Test hook: make records durable but skip their sled apply.
    #[cfg(test)]
    pub(crate) fn set_skip_apply(&self, skip: bool) {
        self.inner.writer.set_skip_apply(skip);
    }

    /// The latest insights stored (empty if none).
    pub fn insights(&self) -> Result<Vec<LearningInsight>, StoreError> {
        let inner = self.live()?;
        match inner.insights.get(INSIGHTS_KEY).map_err(|e| inner.err(e))? {
            Some(v) => inner.decode("insights", INSIGHTS_KEY, &v),
            None => Ok(Vec::new()),
        }
    }

    /// Waits until every write submitted so far is durable and applied,
    /// then flushes sled (blocking); returns the bytes sled flushed.
    pub fn flush(&self) -> Result<usize, StoreError> {
        let inner = self.live()?;
        inner.barrier()?;
        inner.flush()
    }

    /// Like [`flush`](Self::flush), without blocking the async runtime.
    pub async fn flush_async(&self) -> Result<usize, StoreError> {
        let inner = self.live()?;
        let barrier = inner.writer.barrier().map_err(|e| inner.journal_err(e))?;
        barrier.await.map_err(|e| inner.journal_err(e))?;
        inner.db.flush_async().await.map_err(|e| inner.err(e))
    }

    /// Records per tree, in `O(1)`.
    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        let inner = self.live()?;
        Ok(StoreCounts {
            policies: inner.policies.len(),
            executions: inner.executions.len(),
            outcomes: inner.outcomes.len(),
            analyses: inner.analyses.len(),
        })
    }

    /// Deletes the oldest records of each record tree (policies,
    /// executions, outcomes, analyses) beyond `max_records`, in
    /// `O(deleted)`; returns how many were deleted in all. The learned
    /// statistics are kept.
    pub fn prune(&self, max_records: usize) -> Result<usize, StoreError> {
        let inner = self.live()?;
        let _guard = inner.prune_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut removed = 0;
        for records in [
            &inner.policies,
            &inner.executions,
            &inner.outcomes,
            &inner.analyses,
        ] {
            removed += inner.prune(records, max_records)?;
        }
        if removed > 0 {
            tracing::info!(removed, max_records, "knowledge store pruned");
        }
        Ok(removed)
    }

    /// Flushes and marks the store closed: afterwards every call (on every
    /// clone) returns [`StoreError::Closed`]. Closing twice is a no-op. The
    /// file lock is released when the last clone is dropped.
    pub fn close(&self) -> Result<(), StoreError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.barrier()?;
        self.inner.flush().map(|_| ())
    }

    /// Walks one record list newest first (reverse key order, i.e. reverse
    /// creation order) over the keys between `lower` and `upper`, calling
    /// `visit(key, stored JSON)` for each record until it returns `false`.
    /// Nothing is collected: one record at a time is held, so a reader can
    /// stream a list of any size in bounded memory (the paginated read
    /// endpoints). Returns how many records were visited.
    pub fn scan_newest_first(
        &self,
        list: RecordList,
        upper: std::ops::Bound<&[u8]>,
        lower: std::ops::Bound<&[u8]>,
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<usize, StoreError> {
        let inner = self.live()?;
        let records = match list {
            RecordList::Policies => &inner.policies,
            RecordList::Executions => &inner.executions,
            RecordList::Outcomes => &inner.outcomes,
            RecordList::Analyses => &inner.analyses,
        };
        let empty = match (lower, upper) {
            (std::ops::Bound::Included(l), std::ops::Bound::Included(u)) => l > u,
            (std::ops::Bound::Included(l), std::ops::Bound::Excluded(u))
            | (std::ops::Bound::Excluded(l), std::ops::Bound::Included(u))
            | (std::ops::Bound::Excluded(l), std::ops::Bound::Excluded(u)) => l >= u,
            _ => false,
        };
        if empty {
            // sled panics on an inverted range.
            return Ok(0);
        }
        let mut n = 0;
        for item in records.tree.range::<&[u8], _>((lower, upper)).rev() {
            let (k, v) = item.map_err(|e| inner.err(e))?;
            n += 1;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(n)
    }
}

/// A record list of the store, for [`KnowledgeStore::scan_newest_first`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordList {
    /// Remediation policies (JSON of [`RemediationPolicy`]).
    Policies,
    /// Executions (JSON of [`PolicyExecution`]).
    Executions,
    /// Outcomes, keyed by execution id (JSON of [`PolicyOutcome`]).
    Outcomes,
    /// Analyses (JSON of [`AnalysisResult`]).
    Analyses,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::JournalError;
    use crate::knowledge::outcome_of;
    use crate::model::{
        new_id, ActionType, ApprovalDecision, ChainTimings, ExecutionStatus, OutcomeType, Priority,
        RiskLevel, RootCause, Timestamp,
    };
    use chrono::{TimeZone, Utc};
    use std::time::Instant;

    const OPEN: Duration = Duration::from_secs(10);

    fn t0() -> Timestamp {
        Utc.with_ymd_and_hms(2025, 3, 1, 8, 0, 0).unwrap()
    }

    fn policy(status: ApprovalStatus) -> RemediationPolicy {
        RemediationPolicy {
            id: new_id("pol"),
            chain_id: new_id("chain"),
            analysis_id: new_id("ana"),
            created_at: t0(),
            root_cause: RootCause::ValidationLatency,
            root_cause_confidence: 0.8,
            actions: vec![],
            expected_impact: "latency below 1 s".into(),
            risk_level: RiskLevel::Low,
            priority: Priority::High,
            cost_estimate: 0.15,
            benefit_estimate: 0.7,
            score: 0.55,
            approval_status: status,
            decisions: vec![ApprovalDecision {
                status,
                by: "auto".into(),
                at: t0(),
                reason: Some("low risk".into()),
            }],
            violations_at_planning: 4,
            scope: vec!["charter".into()],
            incident_id: None,
            attempt: 0,
            guards: Vec::new(),
            autonomy: None,
            candidates: Vec::new(),
            shard: None,
        }
    }

    fn execution(before: usize, after: usize) -> PolicyExecution {
        PolicyExecution {
            id: new_id("exe"),
            policy_id: new_id("pol"),
            chain_id: new_id("chain"),
            root_cause: RootCause::ValidationLatency,
            status: ExecutionStatus::Completed,
            actions: vec![],
            started_at: t0(),
            finished_at: Some(t0()),
            success_rate: 1.0,
            error: None,
            violations_before: Some(before),
            violations_after: Some(after),
            outcome: None,
            timings: ChainTimings::default(),
            incident_id: None,
            interrupted: false,
            acted_as: None,
        }
    }

    fn analysis() -> AnalysisResult {
        AnalysisResult {
            id: new_id("ana"),
            chain_id: new_id("chain"),
            analyzed_at: t0(),
            patterns: vec![],
            root_causes: vec![],
            recommendations: vec!["scale up".into()],
            confidence: 0.75,
            violation_count: 4,
            max_severity: None,
            components: vec!["charter".into()],
            incident_id: None,
        }
    }

    fn outcome(before: usize, after: usize) -> PolicyOutcome {
        let e = execution(before, after);
        outcome_of(
            &e,
            vec![ActionType::ScaleUp, ActionType::RebalanceLoad],
            t0() + chrono::Duration::seconds(30),
        )
    }

    #[test]
    fn survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        let policies: Vec<_> = (0..3).map(|_| policy(ApprovalStatus::Approved)).collect();
        let executions: Vec<_> = (0..3).map(|i| execution(10, i)).collect();
        let analyses: Vec<_> = (0..3).map(|_| analysis()).collect();
        let outcomes: Vec<_> = [(10, 0), (10, 4), (10, 5), (3, 9)]
            .into_iter()
            .map(|(b, a)| outcome(b, a))
            .collect();
        for p in &policies {
            store.put_policy(p).unwrap();
        }
        for e in &executions {
            store.put_execution(e).unwrap();
        }
        for a in &analyses {
            store.put_analysis(a).unwrap();
        }
        let mut stats = LearnedStats::default();
        for o in &outcomes {
            stats = store.record_outcome(o, 30).unwrap();
        }
        let insights = crate::knowledge::generate_insights(&stats, t0());
        assert!(!insights.is_empty());
        store.put_insights(&insights).unwrap();
        let counts = store.counts().unwrap();
        drop(store);

        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        assert_eq!(store.counts().unwrap(), counts);
        assert_eq!(
            counts,
            StoreCounts {
                policies: 3,
                executions: 3,
                outcomes: 4,
                analyses: 3
            }
        );
        for p in &policies {
            assert_eq!(store.get_policy(&p.id).unwrap().as_ref(), Some(p));
        }
        for e in &executions {
            assert_eq!(store.get_execution(&e.id).unwrap().as_ref(), Some(e));
        }
        for a in &analyses {
            assert_eq!(store.get_analysis(&a.id).unwrap().as_ref(), Some(a));
        }
        for o in &outcomes {
            assert_eq!(
                store.get_outcome(&o.execution_id).unwrap().as_ref(),
                Some(o)
            );
        }
        let mut rev_out = outcomes.clone();
        rev_out.reverse();
        assert_eq!(store.list_outcomes(10).unwrap(), rev_out);
        assert_eq!(store.stats().unwrap(), stats);
        assert_eq!(stats.outcomes_recorded, 4);
        let su = &stats.by_action[&ActionType::ScaleUp];
        assert_eq!((su.executions, su.successes), (4, 2));
        assert_eq!(store.insights().unwrap(), insights);
        assert_eq!(store.get_policy("pol-missing").unwrap(), None);
    }

    #[test]
    fn crash_between_fsync_and_apply_loses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        let before = policy(ApprovalStatus::Approved);
        store.put_policy(&before).unwrap();
        let p = policy(ApprovalStatus::Pending);
        let o = outcome(4, 1);
        let request = serde_json::json!({"action": "scale_up", "replicas": 3});
        store.set_skip_apply(true);
        let skipped = |r: Result<(), StoreError>| match r {
            Err(StoreError::Journal {
                source: JournalError::ApplySkipped { .. },
                ..
            }) => {}
            other => panic!("expected ApplySkipped, got {other:?}"),
        };
        skipped(store.put_policy(&p));
        skipped(store.record_outcome(&o, 30).map(|_| ()));
        skipped(futures::executor::block_on(
            store.journal_intent("inc-1/1/scale_up", &request),
        ));
        // Durable in the journal, absent from sled: the crash window.
        assert_eq!(store.get_policy(&p.id).unwrap(), None);
        assert_eq!(store.counts().unwrap().outcomes, 0);
        assert!(store.intents_for("inc-1/").unwrap().is_empty());
        drop(store);

        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        // The start-up check brought sled forward from the journal (sled
        // was behind, not damaged).
        let r = store.integrity();
        assert!(r.changed() && !r.sled_damaged, "{r:?}");
        assert!(r.restored.contains(&format!("policies/{}", p.id)), "{r:?}");
        assert_eq!(store.get_policy(&p.id).unwrap(), Some(p));
        assert_eq!(store.get_policy(&before.id).unwrap(), Some(before));
        assert_eq!(store.get_outcome(&o.execution_id).unwrap(), Some(o));
        assert_eq!(store.stats().unwrap().outcomes_recorded, 1);
        let c = store.counts().unwrap();
        assert_eq!((c.policies, c.outcomes), (2, 1));
        let intents = store.intents_for("inc-1/").unwrap();
        assert_eq!(intents.len(), 1);
        assert_eq!(
            (intents[0].key.as_str(), &intents[0].request),
            ("inc-1/1/scale_up", &request)
        );
        drop(store);
        // Replayed once: the next open has nothing left to apply.
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        assert_eq!(store.journal_report().replayed, 0);
        assert_eq!(store.stats().unwrap().outcomes_recorded, 1);
    }

    #[test]
    fn generic_records_and_intents() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Incident {
            id: String,
            state: String,
        }
        let inc = |id: &str, state: &str| Incident {
            id: id.into(),
            state: state.into(),
        };
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        store
            .put_record("incidents", "inc-1", &inc("inc-1", "open"))
            .unwrap();
        store
            .put_record("incidents", "inc-2", &inc("inc-2", "open"))
            .unwrap();
        store
            .put_record("incidents", "inc-1", &inc("inc-1", "resolved"))
            .unwrap();
        assert_eq!(
            store.get_record::<Incident>("incidents", "inc-1").unwrap(),
            Some(inc("inc-1", "resolved"))
        );
        let listed: Vec<(String, Incident)> = store.list_records("incidents", 10).unwrap();
        assert_eq!(
            listed,
            vec![
                ("inc-2".into(), inc("inc-2", "open")),
                ("inc-1".into(), inc("inc-1", "resolved"))
            ]
        );
        assert_eq!(
            store
                .list_records::<Incident>("incidents", 1)
                .unwrap()
                .len(),
            1
        );
        store.delete_record("incidents", "inc-2").unwrap();
        store.delete_record("incidents", "inc-404").unwrap();
        assert_eq!(
            store.get_record::<Incident>("incidents", "inc-2").unwrap(),
            None
        );
        let err = store
            .put_record("policies", "x", &inc("x", "y"))
            .unwrap_err();
        assert!(matches!(err, StoreError::ReservedTree { .. }), "{err:?}");
        assert!(err.to_string().contains(&tmp.path().display().to_string()));
        assert!(matches!(
            store.delete_record("stats", "learned"),
            Err(StoreError::ReservedTree { .. })
        ));

        let block = futures::executor::block_on;
        for key in ["inc-1/1/scale_up", "inc-1/1/restart", "inc-10/1/scale_up"] {
            block(store.journal_intent(key, &serde_json::json!({ "key": key }))).unwrap();
        }
        let intents = store.intents_for("inc-1/").unwrap();
        let keys: Vec<_> = intents.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, vec!["inc-1/1/restart", "inc-1/1/scale_up"]);
        assert!(intents[1].seq < intents[0].seq);
        assert_eq!(intents[0].request["key"], "inc-1/1/restart");
        assert_eq!(store.intents_for("inc-").unwrap().len(), 3);
        drop(store);

        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        assert_eq!(store.intents_for("inc-1/").unwrap(), intents);
        assert_eq!(
            store.get_record::<Incident>("incidents", "inc-1").unwrap(),
            Some(inc("inc-1", "resolved"))
        );
        assert_eq!(
            store.get_record::<Incident>("incidents", "inc-2").unwrap(),
            None
        );
    }

    #[test]
    fn concurrent_async_writes_share_fsyncs() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let results = rt.block_on(async {
            let futs: Vec<_> = (0..200)
                .map(|i| {
                    store.put_record_async(
                        "incidents",
                        &format!("inc-{i:03}"),
                        &serde_json::json!(i),
                    )
                })
                .collect();
            futures::future::join_all(futs).await
        });
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let c = store.journal_counters();
        let fsyncs = c.fsyncs.get();
        println!("store: 200 concurrent async writes, {fsyncs} fsyncs");
        assert!(fsyncs < 200, "{fsyncs}");
        assert_eq!(c.records.get(), 200);
        assert_eq!(
            store.list_records::<u32>("incidents", 1000).unwrap().len(),
            200
        );
    }

    #[test]
    fn rotation_keeps_the_journal_bounded_across_reopens() {
        let tmp = tempfile::tempdir().unwrap();
        let options = JournalOptions {
            segment_bytes: 16 * 1024,
            compact_bytes: 32 * 1024,
            ..JournalOptions::default()
        };
        let journal = tmp.path().join(JOURNAL_DIR);
        let mut ids = Vec::new();
        for _round in 0..3 {
            let store = KnowledgeStore::open_with(tmp.path(), OPEN, options).unwrap();
            for _ in 0..100 {
                let p = policy(ApprovalStatus::Pending);
                store.put_policy(&p).unwrap();
                ids.push(p.id);
            }
            drop(store);
            let listing: Vec<(String, u64)> = std::fs::read_dir(&journal)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, e.metadata().unwrap().len())
                })
                .collect();
            let snapshot: u64 = listing
                .iter()
                .filter(|(n, _)| n.ends_with(".snap"))
                .map(|(_, b)| *b)
                .sum();
            let total: u64 = listing.iter().map(|(_, b)| *b).sum();
            // One snapshot; the segments after it stay under one
            // compaction window (the snapshot's size, at least 32 KiB)
            // plus the segment being written when it filled.
            assert_eq!(
                listing.iter().filter(|(n, _)| n.ends_with(".snap")).count(),
                1,
                "{listing:?}"
            );
            assert!(
                total <= 2 * snapshot.max(32 * 1024) + 2 * 17 * 1024,
                "{total} bytes: {listing:?}"
            );
        }
        let store = KnowledgeStore::open_with(tmp.path(), OPEN, options).unwrap();
        assert!(!store.integrity().changed(), "{:?}", store.integrity());
        assert_eq!(store.counts().unwrap().policies, 300);
        for id in &ids {
            assert!(store.get_policy(id).unwrap().is_some());
        }
    }

    #[test]
    fn listing_order_limit_and_filter() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        let statuses = [
            ApprovalStatus::Pending,
            ApprovalStatus::Approved,
            ApprovalStatus::Pending,
            ApprovalStatus::Rejected,
            ApprovalStatus::Pending,
        ];
        let policies: Vec<_> = statuses.iter().map(|s| policy(*s)).collect();
        for p in &policies {
            store.put_policy(p).unwrap();
        }
        let ids = |v: Vec<RemediationPolicy>| v.into_iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.list_policies(None, 100).unwrap()),
            policies
                .iter()
                .rev()
                .map(|p| p.id.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            ids(store.list_policies(None, 2).unwrap()),
            vec![policies[4].id.clone(), policies[3].id.clone()]
        );
        assert_eq!(
            ids(store
                .list_policies(Some(ApprovalStatus::Pending), 2)
                .unwrap()),
            vec![policies[4].id.clone(), policies[2].id.clone()]
        );
        assert_eq!(
            ids(store
                .list_policies(Some(ApprovalStatus::Rejected), 10)
                .unwrap()),
            vec![policies[3].id.clone()]
        );
        assert!(store.list_policies(None, 0).unwrap().is_empty());

        // Approving replaces the record in place: order and count unchanged.
        let mut approved = policies[0].clone();
        approved.approval_status = ApprovalStatus::Approved;
        store.put_policy(&approved).unwrap();
        assert_eq!(store.counts().unwrap().policies, 5);
        assert_eq!(
            ids(store
                .list_policies(Some(ApprovalStatus::Approved), 10)
                .unwrap()),
            vec![policies[1].id.clone(), policies[0].id.clone()]
        );

        let execs: Vec<_> = (0..4).map(|i| execution(5, i)).collect();
        for e in &execs {
            store.put_execution(e).unwrap();
        }
        let listed = store.list_executions(3).unwrap();
        assert_eq!(
            listed,
            vec![execs[3].clone(), execs[2].clone(), execs[1].clone()]
        );
        let ans: Vec<_> = (0..3).map(|_| analysis()).collect();
        for a in &ans {
            store.put_analysis(a).unwrap();
        }
        assert_eq!(store.list_analyses(1).unwrap(), vec![ans[2].clone()]);
    }

    #[test]
    fn record_outcome_updates_stats_atomically_and_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        assert_eq!(store.stats().unwrap(), LearnedStats::default());
        let o1 = outcome(10, 0);
        let s1 = store.record_outcome(&o1, 30).unwrap();
        let mut expected = LearnedStats::default();
        expected.record(&o1, 30);
        assert_eq!(s1, expected);
        assert_eq!(store.stats().unwrap(), expected);
        assert_eq!(o1.outcome_type, OutcomeType::Success);

        // Recording the same execution again changes nothing.
        let again = store.record_outcome(&o1, 30).unwrap();
        assert_eq!(again, expected);
        assert_eq!(store.counts().unwrap().outcomes, 1);

        // Concurrent recorders: every outcome counted exactly once.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..5 {
                        s.record_outcome(&outcome(4, 1), 30).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let stats = store.stats().unwrap();
        assert_eq!(stats.outcomes_recorded, 21);
        assert_eq!(stats.by_action[&ActionType::ScaleUp].executions, 21);
        assert_eq!(stats.by_action[&ActionType::ScaleUp].successes, 21);
        assert_eq!(
            stats
                .get(RootCause::ValidationLatency, ActionType::RebalanceLoad)
                .unwrap()
                .executions,
            21
        );
        assert_eq!(store.counts().unwrap().outcomes, 21);
        assert_eq!(store.list_outcomes(100).unwrap().len(), 21);
    }

    #[test]
    fn prune_keeps_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        let policies: Vec<_> = (0..7).map(|_| policy(ApprovalStatus::Pending)).collect();
        for p in &policies {
            store.put_policy(p).unwrap();
        }
        for _ in 0..2 {
            store.put_analysis(&analysis()).unwrap();
        }
        let stats_before = {
            store.record_outcome(&outcome(2, 0), 30).unwrap();
            store.record_outcome(&outcome(2, 0), 30).unwrap();
            store.record_outcome(&outcome(2, 0), 30).unwrap()
        };
        assert_eq!(store.prune(2).unwrap(), 5 + 1);
        let c = store.counts().unwrap();
        assert_eq!(
            (c.policies, c.analyses, c.outcomes, c.executions),
            (2, 2, 2, 0)
        );
        let left: Vec<_> = store
            .list_policies(None, 10)
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(left, vec![policies[6].id.clone(), policies[5].id.clone()]);
        assert_eq!(store.stats().unwrap(), stats_before);
        assert_eq!(store.prune(2).unwrap(), 0);
        drop(store);
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        assert_eq!(store.counts().unwrap(), c);
    }

    #[test]
    fn closed_store_refuses_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        let other = store.clone();
        store.put_policy(&policy(ApprovalStatus::Pending)).unwrap();
        assert!(store.is_open());
        store.close().unwrap();
        store.close().unwrap();
        assert!(!store.is_open() && !other.is_open());
        let closed = |r: Result<(), StoreError>| match r {
            Err(StoreError::Closed { dir }) => assert_eq!(dir, tmp.path()),
            other => panic!("expected Closed, got {other:?}"),
        };
        closed(other.put_policy(&policy(ApprovalStatus::Pending)));
        closed(other.get_policy("x").map(|_| ()));
        closed(other.list_policies(None, 1).map(|_| ()));
        closed(other.put_execution(&execution(1, 0)));
        closed(other.get_execution("x").map(|_| ()));
        closed(other.list_executions(1).map(|_| ()));
        closed(other.put_analysis(&analysis()));
        closed(other.list_analyses(1).map(|_| ()));
        closed(other.record_outcome(&outcome(1, 0), 30).map(|_| ()));
        closed(other.list_outcomes(1).map(|_| ()));
        closed(other.stats().map(|_| ()));
        closed(other.put_insights(&[]));
        closed(other.insights().map(|_| ()));
        closed(other.flush().map(|_| ()));
        closed(futures::executor::block_on(other.flush_async()).map(|_| ()));
        closed(other.counts().map(|_| ()));
        closed(other.prune(1).map(|_| ()));
        let msg = other.stats().unwrap_err().to_string();
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    }

    #[test]
    fn flush_and_flush_async() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        store.put_analysis(&analysis()).unwrap();
        store.flush().unwrap();
        store.put_analysis(&analysis()).unwrap();
        futures::executor::block_on(store.flush_async()).unwrap();
        assert_eq!(store.dir(), tmp.path());
    }

    #[test]
    fn store_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<KnowledgeStore>();
        fn check_err<T: std::error::Error + Send + Sync + 'static>() {}
        check_err::<StoreError>();
    }

    #[test]
    fn second_open_in_process_is_locked_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let _first = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        let started = Instant::now();
        let err = KnowledgeStore::open(tmp.path(), OPEN).unwrap_err();
        let took = started.elapsed();
        eprintln!("in-process second open: {err} after {took:?}");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        let msg = err.to_string();
        assert!(msg.contains("locked by another process"), "{msg}");
        assert!(msg.contains("lock"), "{msg}");
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    }

    const HOLDER_ENV: &str = "MAPEK_TEST_LOCK_HOLDER_DIR";
    const HOLDER_READY: &str = "MAPEK-LOCK-HOLDER-READY";

    /// Helper run as a child process by `another_process_holds_the_lock`:
    /// a no-op unless the env var is set.
    #[test]
    fn lock_holder_child() {
        let Some(dir) = std::env::var_os(HOLDER_ENV) else {
            return;
        };
        let _store = KnowledgeStore::open(Path::new(&dir), OPEN).unwrap();
        println!("{HOLDER_READY}");
        // Hold the lock until killed (or for a minute at most).
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn another_process_holds_the_lock() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let tmp = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "knowledge::store::tests::lock_holder_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HOLDER_ENV, tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut ready = false;
        for line in std::io::BufReader::new(stdout).lines() {
            if line.unwrap().contains(HOLDER_READY) {
                ready = true;
                break;
            }
        }
        assert!(ready, "the lock-holding child did not start");

        let started = Instant::now();
        let res = KnowledgeStore::open(tmp.path(), OPEN);
        let took = started.elapsed();
        child.kill().unwrap();
        child.wait().unwrap();
        let err = res.unwrap_err();
        eprintln!("cross-process open: {err} after {took:?}");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");

        // The holder was killed (-9): the lock died with it.
        let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
        store.put_policy(&policy(ApprovalStatus::Pending)).unwrap();
    }

    /// Fills a store, drops it, damages its files with `garble`, reopens.
    fn damage_and_reopen(
        garble: impl Fn(&Path),
    ) -> (
        tempfile::TempDir,
        Result<KnowledgeStore, StoreError>,
        Duration,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = KnowledgeStore::open(tmp.path(), OPEN).unwrap();
            for _ in 0..100 {
                store.put_policy(&policy(ApprovalStatus::Pending)).unwrap();
                store.record_outcome(&outcome(4, 1), 30).unwrap();
            }
        }
        garble(tmp.path());
        let started = Instant::now();
        let res = KnowledgeStore::open(tmp.path(), Duration::from_secs(3));
        (tmp, res, started.elapsed())
    }

    /// sled's files are damaged, the journal is intact: the store opens
    /// with every record, rebuilt (or put right) from the journal, and
    /// says so.
    fn expect_recovered(name: &str, garble: impl Fn(&Path)) {
        let (_tmp, res, took) = damage_and_reopen(garble);
        let store = res.unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = store.integrity().clone();
        eprintln!(
            "{name}: opened after {took:?}: rebuilt {}, sled damaged {}, {} restored, moved aside {:?}",
            r.rebuilt,
            r.sled_damaged,
            r.restored.len(),
            r.moved_aside
        );
        assert!(
            r.rebuilt || r.sled_damaged,
            "{name}: damage went unnoticed: {r:?}"
        );
        let c = store.counts().unwrap();
        assert_eq!((c.policies, c.outcomes), (100, 100), "{name}: {c:?}");
        assert_eq!(store.stats().unwrap().outcomes_recorded, 100, "{name}");
    }

    fn garbage(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ 0xA5)
            .collect()
    }

    #[test]
    fn corrupt_conf_and_db() {
        expect_recovered("conf+db", |dir| {
            std::fs::write(dir.join("conf"), garbage(64, 1)).unwrap();
            std::fs::write(dir.join("db"), garbage(4096, 2)).unwrap();
        });
    }

    #[test]
    fn corrupt_conf_only() {
        expect_recovered("conf", |dir| {
            std::fs::write(dir.join("conf"), garbage(64, 4)).unwrap();
        });
    }

    #[test]
    fn corrupt_db_is_not_silently_empty() {
        // sled itself opens these as empty databases; the marker catches it.
        expect_recovered("db garbage", |dir| {
            let len = std::fs::metadata(dir.join("db")).unwrap().len() as usize;
            std::fs::write(dir.join("db"), garbage(len, 3)).unwrap();
        });
        expect_recovered("db zeroed", |dir| {
            let len = std::fs::metadata(dir.join("db")).unwrap().len() as usize;
            std::fs::write(dir.join("db"), vec![0u8; len]).unwrap();
        });
        expect_recovered("db head flipped", |dir| {
            let mut b = std::fs::read(dir.join("db")).unwrap();
            b.iter_mut().take(64).for_each(|x| *x ^= 0xFF);
            std::fs::write(dir.join("db"), b).unwrap();
        });
    }

    #[test]
    fn damaged_sled_tail_is_restored_from_the_journal() {
        // sled alone keeps a consistent prefix of a truncated `db` (fewer
        // than 100 outcomes, measured before the journal); its
        // `applied_seq` is part of that prefix, so the journal replays
        // the rest and nothing is lost.
        let (_tmp, res, _) = damage_and_reopen(|dir| {
            let mut b = std::fs::read(dir.join("db")).unwrap();
            let n = b.len();
            b.truncate(n / 2);
            std::fs::write(dir.join("db"), b).unwrap();
        });
        let store = res.unwrap();
        let c = store.counts().unwrap();
        let stats = store.stats().unwrap();
        let r = store.integrity();
        eprintln!("truncated db: opened with {c:?}: {r:?}");
        assert!(r.changed(), "{r:?}");
        assert_eq!((c.outcomes, c.policies), (100, 100), "{c:?}");
        // Restored outcomes are counted exactly once.
        assert_eq!(stats.outcomes_recorded, 100);
    }

    /// A store with 100 policies and 100 outcomes, in segments of 4 KiB,
    /// closed; returns its directory and the policy ids.
    fn filled(options: JournalOptions) -> (tempfile::TempDir, Vec<String>) {
        let tmp = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open_with(tmp.path(), OPEN, options).unwrap();
        let mut ids = Vec::new();
        for _ in 0..100 {
            let p = policy(ApprovalStatus::Pending);
            store.put_policy(&p).unwrap();
            ids.push(p.id);
            store.record_outcome(&outcome(4, 1), 30).unwrap();
        }
        store.close().unwrap();
        drop(store);
        (tmp, ids)
    }

    fn small_segments() -> JournalOptions {
        JournalOptions {
            segment_bytes: 4096,
            compact_bytes: u64::MAX,
            salvage: false,
        }
    }

    /// Every file of a directory tree with its bytes.
    fn files_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn damaged_journal_refuses_then_repair_salvages_and_lists_what_was_dropped() {
        let (tmp, ids) = filled(small_segments());
        let segs: Vec<PathBuf> = {
            let mut v: Vec<PathBuf> = std::fs::read_dir(tmp.path().join(JOURNAL_DIR))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            v.sort();
            v
        };
        assert!(segs.len() >= 5, "{segs:?}");
        // Garble the middle of the third segment.
        let victim = &segs[2];
        let mut b = std::fs::read(victim).unwrap();
        let mid = b.len() / 2;
        b[mid..mid + 32].iter_mut().for_each(|x| *x ^= 0xA5);
        std::fs::write(victim, &b).unwrap();
        let before = files_of(&tmp.path().join(JOURNAL_DIR));

        let err = KnowledgeStore::open_with(tmp.path(), OPEN, small_segments()).unwrap_err();
        let msg = err.to_string();
        eprintln!("refusal: {msg}");
        assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
        assert!(msg.contains(&victim.display().to_string()), "{msg}");
        assert!(msg.contains("--repair"), "{msg}");
        // sled had applied everything: nothing acknowledged would be lost.
        assert!(
            msg.contains("nothing lost") || msg.contains("no acknowledged change would be lost"),
            "{msg}"
        );
        // Refusing changed nothing.
        assert!(
            files_of(&tmp.path().join(JOURNAL_DIR)) == before,
            "the refusal changed the journal"
        );

        let repair = JournalOptions {
            salvage: true,
            ..small_segments()
        };
        let store = KnowledgeStore::open_with(tmp.path(), OPEN, repair).unwrap();
        let r = store.integrity().clone();
        eprintln!("repair: {r:?}");
        assert!(r.repaired);
        assert!(r.dropped.is_empty(), "{r:?}");
        assert!(!r.covered_by_sled.is_empty(), "{r:?}");
        let report = std::fs::read_to_string(r.repair_report.as_ref().unwrap()).unwrap();
        assert!(
            report.contains(&victim.file_name().unwrap().to_string_lossy().to_string()),
            "{report}"
        );
        let aside = r.moved_aside.clone().unwrap();
        assert!(aside.join(victim.file_name().unwrap()).exists());
        let c = store.counts().unwrap();
        assert_eq!((c.policies, c.outcomes), (100, 100), "{c:?}");
        assert_eq!(store.stats().unwrap().outcomes_recorded, 100);
        for id in &ids {
            assert!(store.get_policy(id).unwrap().is_some(), "{id}");
        }
        store.put_policy(&policy(ApprovalStatus::Pending)).unwrap();
        store.close().unwrap();
        drop(store);
        // After the repair the store verifies cleanly, without --repair.
        let store = KnowledgeStore::open_with(tmp.path(), OPEN, small_segments()).unwrap();
        let r = store.integrity();
        assert!(!r.changed() && !r.repaired && r.damage.is_empty(), "{r:?}");
        assert_eq!(store.counts().unwrap().policies, 101);
    }

    #[test]
    fn unreadable_entries_newer_than_sled_are_listed_as_dropped() {
        let (tmp, _) = filled(small_segments());
        // Entries made durable but never applied to sled (the crash
        // window), then damaged: their changes are lost, and listed.
        let store = KnowledgeStore::open_with(tmp.path(), OPEN, small_segments()).unwrap();
        store.set_skip_apply(true);
        let late = policy(ApprovalStatus::Pending);
        assert!(store.put_policy(&late).is_err());
        drop(store);
        let jdir = tmp.path().join(JOURNAL_DIR);
        let mut segs: Vec<PathBuf> = std::fs::read_dir(&jdir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segs.sort();
        let last = segs.last().unwrap();
        let mut b = std::fs::read(last).unwrap();
        assert!(b.len() > SEGMENT_HEADER + 40, "{}", b.len());
        // Flip a byte of the entry's payload (its checksum then fails).
        let at = SEGMENT_HEADER + 30;
        b[at] ^= 0xFF;
        b.extend_from_slice(&[7u8; 64]);
        std::fs::write(last, &b).unwrap();
        let err = KnowledgeStore::open_with(tmp.path(), OPEN, small_segments()).unwrap_err();
        let msg = err.to_string();
        eprintln!("refusal: {msg}");
        assert!(msg.contains("would be lost"), "{msg}");
        let repair = JournalOptions {
            salvage: true,
            ..small_segments()
        };
        let store = KnowledgeStore::open_with(tmp.path(), OPEN, repair).unwrap();
        let r = store.integrity();
        assert!(!r.dropped.is_empty(), "{r:?}");
        assert_eq!(store.get_policy(&late.id).unwrap(), None);
        assert_eq!(store.counts().unwrap().policies, 100);
    }

    const SEGMENT_HEADER: usize = crate::journal::SEGMENT_HEADER_LEN as usize;

    #[test]
    fn sled_lost_and_journal_without_snapshot_is_refused() {
        let (tmp, _) = filled(small_segments());
        // The earliest segments are gone and so is sled's data: nothing
        // can rebuild the records.
        let jdir = tmp.path().join(JOURNAL_DIR);
        let mut segs: Vec<PathBuf> = std::fs::read_dir(&jdir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        std::fs::remove_file(&segs[0]).unwrap();
        std::fs::remove_file(tmp.path().join("db")).unwrap();
        let err = KnowledgeStore::open_with(tmp.path(), OPEN, small_segments()).unwrap_err();
        eprintln!("refusal: {err}");
        assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
        assert!(err.to_string().contains("no snapshot"), "{err}");
    }

    #[test]
    fn previous_release_directory_is_migrated_once() {
        let (tmp, ids) = filled(small_segments());
        // Make it look like the previous release: schema 1, and only the
        // journal's tail (it deleted applied segments).
        {
            let db = sled::open(tmp.path()).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(SCHEMA_KEY, b"1".as_slice())
                .unwrap();
            db.flush().unwrap();
        }
        let jdir = tmp.path().join(JOURNAL_DIR);
        let mut segs: Vec<PathBuf> = std::fs::read_dir(&jdir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        for s in &segs[..segs.len() - 1] {
            std::fs::remove_file(s).unwrap();
        }
        let store = KnowledgeStore::open_with(tmp.path(), OPEN, small_segments()).unwrap();
        assert!(store.integrity().migrated);
        assert_eq!(store.counts().unwrap().policies, 100);
        drop(store);
        let snaps = std::fs::read_dir(&jdir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "snap")
            })
            .count();
        assert_eq!(snaps, 1);
        // The next start verifies against the snapshot: no change.
        let store = KnowledgeStore::open_with(tmp.path(), OPEN, small_segments()).unwrap();
        let r = store.integrity();
        assert!(!r.migrated && !r.changed() && r.damage.is_empty(), "{r:?}");
        assert!(r.compared >= 200, "{r:?}");
        for id in &ids {
            assert!(store.get_policy(id).unwrap().is_some());
        }
    }

    #[test]
    fn deleted_sled_files_are_rebuilt_from_the_journal() {
        for victim in ["db", "conf", "blobs"] {
            let (tmp, ids) = filled(small_segments());
            let path = tmp.path().join(victim);
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else if path.exists() {
                std::fs::remove_file(&path).unwrap();
            } else {
                continue;
            }
            let store = KnowledgeStore::open_with(tmp.path(), OPEN, small_segments())
                .unwrap_or_else(|e| panic!("{victim}: {e}"));
            let r = store.integrity();
            eprintln!(
                "{victim} deleted: rebuilt {} damaged {} restored {}",
                r.rebuilt,
                r.sled_damaged,
                r.restored.len()
            );
            // Without `db` sled holds nothing: rebuilt. sled recreates a
            // missing `conf` and keeps no blobs for small values: nothing
            // to put right, and nothing lost.
            assert!(
                r.rebuilt || r.sled_damaged || victim != "db",
                "{victim}: {r:?}"
            );
            assert_eq!(store.counts().unwrap().policies, 100, "{victim}");
            assert_eq!(store.stats().unwrap().outcomes_recorded, 100, "{victim}");
            for id in &ids {
                assert!(store.get_policy(id).unwrap().is_some());
            }
        }
    }

    /// Everything a store holds that matters, comparable.
    fn content(store: &KnowledgeStore) -> (Vec<String>, Vec<String>, String) {
        let mut policies: Vec<String> = store
            .list_policies(None, 10_000)
            .unwrap()
            .iter()
            .map(|p| serde_json::to_string(p).unwrap())
            .collect();
        policies.sort();
        let mut outcomes: Vec<String> = store
            .list_outcomes(10_000)
            .unwrap()
            .iter()
            .map(|o| serde_json::to_string(o).unwrap())
            .collect();
        outcomes.sort();
        let stats = serde_json::to_string(&store.stats().unwrap()).unwrap();
        (policies, outcomes, stats)
    }

    /// The damage matrix: every file of a store (sled's, the journal's,
    /// the marker) truncated, garbled at its head, garbled at its tail,
    /// or deleted. The store either opens with exactly the content it had,
    /// or refuses with a message naming the directory; never opens with a
    /// silent change. `--repair` then opens it and says what it dropped.
    #[test]
    fn damage_matrix_never_changes_the_knowledge_silently() {
        let options = JournalOptions {
            segment_bytes: 8192,
            compact_bytes: 32 * 1024,
            salvage: false,
        };
        let (template, _) = filled(options);
        let expected = {
            let store = KnowledgeStore::open_with(template.path(), OPEN, options).unwrap();
            let c = content(&store);
            store.close().unwrap();
            c
        };
        let files: Vec<PathBuf> = files_of(template.path())
            .into_iter()
            .map(|(p, _)| p.strip_prefix(template.path()).unwrap().to_path_buf())
            .collect();
        assert!(files.iter().any(|f| f.ends_with("db")));
        assert!(
            files
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "snap")),
            "{files:?}"
        );
        let copy = |to: &Path| {
            for (p, bytes) in files_of(template.path()) {
                let rel = p.strip_prefix(template.path()).unwrap();
                let dest = to.join(rel);
                std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
                std::fs::write(dest, bytes).unwrap();
            }
        };
        type Damage = fn(&Path);
        let damages: [(&str, Damage); 4] = [
            ("truncated", |p| {
                let n = std::fs::metadata(p).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(n / 2).unwrap();
            }),
            ("head garbled", |p| {
                let mut b = std::fs::read(p).unwrap();
                b.iter_mut().take(64).for_each(|x| *x ^= 0x5A);
                std::fs::write(p, b).unwrap();
            }),
            ("tail garbled", |p| {
                let mut b = std::fs::read(p).unwrap();
                let n = b.len();
                b.iter_mut()
                    .skip(n.saturating_sub(64))
                    .for_each(|x| *x ^= 0x5A);
                std::fs::write(p, b).unwrap();
            }),
            ("deleted", |p| std::fs::remove_file(p).unwrap()),
        ];
        let mut table = Vec::new();
        for file in &files {
            for (what, damage) in &damages {
                let tmp = tempfile::tempdir().unwrap();
                copy(tmp.path());
                damage(&tmp.path().join(file));
                let verdict = match KnowledgeStore::open_with(tmp.path(), OPEN, options) {
                    Ok(store) => {
                        let got = content(&store);
                        assert!(
                            got == expected,
                            "{} {what}: opened with different knowledge: {:?}",
                            file.display(),
                            store.integrity()
                        );
                        let r = store.integrity();
                        if r.rebuilt || r.sled_damaged || r.changed() {
                            "recovered exactly".to_string()
                        } else {
                            "unaffected".to_string()
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        assert!(
                            msg.contains(&tmp.path().display().to_string()),
                            "{} {what}: {msg}",
                            file.display()
                        );
                        assert!(
                            matches!(e, StoreError::Damaged { .. } | StoreError::Corrupt { .. }),
                            "{} {what}: {e:?}",
                            file.display()
                        );
                        // --repair salvages it.
                        let repair = JournalOptions {
                            salvage: true,
                            ..options
                        };
                        let store = KnowledgeStore::open_with(tmp.path(), OPEN, repair)
                            .unwrap_or_else(|e| {
                                panic!("{} {what}: --repair failed: {e}", file.display())
                            });
                        let r = store.integrity();
                        let exact = content(&store) == expected;
                        assert!(
                            exact || !r.dropped.is_empty() || !r.kept_from_sled.is_empty(),
                            "{} {what}: repaired with a difference it did not list: {r:?}",
                            file.display()
                        );
                        format!(
                            "refused; --repair: {} dropped, {} restored, {}",
                            r.dropped.len(),
                            r.restored.len(),
                            if exact {
                                "content exact"
                            } else {
                                "content differs (listed)"
                            }
                        )
                    }
                };
                table.push(format!("{:<45} {what:<13} {verdict}", file.display()));
            }
        }
        eprintln!("damage matrix:\n{}", table.join("\n"));
    }

    #[test]
    fn a_compaction_cut_short_or_a_segment_cut_at_creation_is_not_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let jdir = tmp.path().join(JOURNAL_DIR);
        let no_compaction = JournalOptions {
            segment_bytes: 4096,
            compact_bytes: u64::MAX,
            salvage: false,
        };
        let (ids, before) = {
            let store = KnowledgeStore::open_with(tmp.path(), OPEN, no_compaction).unwrap();
            let mut ids = Vec::new();
            for _ in 0..60 {
                let p = policy(ApprovalStatus::Pending);
                store.put_policy(&p).unwrap();
                ids.push(p.id);
            }
            store.close().unwrap();
            (ids, files_of(&jdir))
        };
        // Compaction runs and deletes those segments...
        {
            let compacting = JournalOptions {
                compact_bytes: 8192,
                ..no_compaction
            };
            let store = KnowledgeStore::open_with(tmp.path(), OPEN, compacting).unwrap();
            for _ in 0..30 {
                store.put_policy(&policy(ApprovalStatus::Pending)).unwrap();
            }
            assert!(store.journal_counters().snapshots.get() > 0);
            store.close().unwrap();
        }
        // ...but the process died before they were all gone: put them back.
        for (path, bytes) in &before {
            if !path.exists() {
                std::fs::write(path, bytes).unwrap();
            }
        }
        // And a segment the next start began was cut before its header.
        let mut segs: Vec<PathBuf> = std::fs::read_dir(&jdir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segs.sort();
        let last = segs.last().unwrap().clone();
        let n: u64 = last.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        std::fs::write(crate::journal::segment_path(&jdir, n + 1), b"").unwrap();
        for round in 0..2 {
            let store = KnowledgeStore::open_with(tmp.path(), OPEN, no_compaction)
                .unwrap_or_else(|e| panic!("start {round}: {e}"));
            let r = store.integrity();
            assert!(r.damage.is_empty() && !r.changed(), "start {round}: {r:?}");
            assert_eq!(store.counts().unwrap().policies, 90);
            for id in &ids {
                assert!(store.get_policy(id).unwrap().is_some());
            }
            store.close().unwrap();
        }
        // The superseded segments were deleted.
        for (path, _) in &before {
            assert!(!path.exists(), "{} is superseded", path.display());
        }
    }

    #[test]
    fn hanging_open_times_out() {
        // A FIFO as `conf` makes sled's open block in open(2), like the
        // hangs seen on corrupted files.
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("conf");
        let made = std::process::Command::new("mkfifo")
            .arg(&conf)
            .status()
            .unwrap();
        assert!(made.success());
        let timeout = Duration::from_millis(700);
        let started = Instant::now();
        let err = KnowledgeStore::open(tmp.path(), timeout).unwrap_err();
        let took = started.elapsed();
        eprintln!("hanging open: {err} after {took:?}");
        assert!(matches!(err, StoreError::Timeout { .. }), "{err:?}");
        assert!(took >= timeout && took < timeout + Duration::from_secs(1));
        assert!(err.to_string().contains("did not open within"));
        // Unblock the abandoned thread (it gets EOF and finishes; its late
        // database is dropped, releasing the lock).
        drop(std::fs::OpenOptions::new().write(true).open(&conf).unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            std::fs::remove_file(&conf).ok();
            match KnowledgeStore::open(tmp.path(), OPEN) {
                Ok(_) => break,
                Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("reopen after the hang: {e:?}"),
            }
        }
    }

    #[test]
    fn open_errors_name_the_directory() {
        let dir = PathBuf::from("/x");
        let locked = StoreError::Locked { dir: dir.clone() }.to_string();
        assert_eq!(
            locked,
            "knowledge store /x is locked by another process (could not acquire the sled \
             lock): is another mapek running on this data directory?"
        );
        let t = StoreError::Timeout {
            dir: dir.clone(),
            seconds: 2.5,
        }
        .to_string();
        assert!(
            t.starts_with("knowledge store /x: sled did not open within 2.5 s"),
            "{t}"
        );
    }
}
