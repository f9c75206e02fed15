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
//! Writes of policies, executions and outcomes are flushed to disk before
//! the call returns; analyses and insights are flushed by sled's background
//! flusher (within 500 ms) or by [`KnowledgeStore::flush`].

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::model::{
    AnalysisResult, ApprovalStatus, Incident, IncidentState, LearnedStats, LearningInsight,
    PolicyExecution, PolicyOutcome, RemediationPolicy,
};

/// Schema version written into the `meta` tree; a database with another
/// version is refused.
pub const SCHEMA_VERSION: u32 = 1;

const STATS_KEY: &[u8] = b"learned";
const INSIGHTS_KEY: &[u8] = b"latest";
const SCHEMA_KEY: &[u8] = b"schema_version";

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
        "knowledge store {} did not open within {seconds} s: the database is probably corrupt \
         (move the directory aside to start with empty knowledge)",
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

    fn from_sled(dir: &Path, e: sled::Error) -> StoreError {
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
    count: AtomicUsize,
}

impl Records {
    fn open(db: &sled::Db, name: &'static str) -> sled::Result<Records> {
        let tree = db.open_tree(name)?;
        let count = AtomicUsize::new(tree.len());
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
    incidents: sled::Tree,
    stats: sled::Tree,
    insights: sled::Tree,
    closed: AtomicBool,
    prune_lock: Mutex<()>,
}

impl Inner {
    fn open(dir: &Path) -> Result<Inner, StoreError> {
        let err = |e| StoreError::from_sled(dir, e);
        let marker = dir.join(MARKER_FILE);
        let had_marker = marker.exists();
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| StoreError::from_sled_open(dir, e))?;
        let meta = db.open_tree("meta").map_err(err)?;
        match meta.get(SCHEMA_KEY).map_err(err)? {
            None if had_marker => {
                return Err(StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    detail: format!(
                        "{MARKER_FILE} says this directory holds a mapek store, but sled \
                         recovered no mapek data from it (sled discards unreadable data on \
                         open)"
                    ),
                });
            }
            None => {
                meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_string().as_bytes())
                    .map_err(err)?;
                db.flush().map_err(err)?;
            }
            Some(v) => {
                let found = String::from_utf8_lossy(&v).into_owned();
                if found != SCHEMA_VERSION.to_string() {
                    return Err(StoreError::Corrupt {
                        dir: dir.to_path_buf(),
                        detail: format!(
                            "unsupported schema version {found:?} (this build reads \
                             {SCHEMA_VERSION})"
                        ),
                    });
                }
            }
        }
        if !had_marker {
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
        Ok(Inner {
            dir: dir.to_path_buf(),
            policies: Records::open(&db, "policies").map_err(err)?,
            executions: Records::open(&db, "executions").map_err(err)?,
            outcomes: Records::open(&db, "outcomes").map_err(err)?,
            analyses: Records::open(&db, "analyses").map_err(err)?,
            incidents: db.open_tree("incidents").map_err(err)?,
            stats: db.open_tree("stats").map_err(err)?,
            insights: db.open_tree("insights").map_err(err)?,
            db,
            closed: AtomicBool::new(false),
            prune_lock: Mutex::new(()),
        })
    }

    fn err(&self, e: sled::Error) -> StoreError {
        StoreError::from_sled(&self.dir, e)
    }

    fn encode<T: Serialize>(
        &self,
        what: impl FnOnce() -> String,
        v: &T,
    ) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(v).map_err(|source| StoreError::Encode {
            dir: self.dir.clone(),
            what: what(),
            source,
        })
    }

    fn decode<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        decode(&self.dir, tree, key, bytes)
    }

    /// Inserts (or replaces) a record, counting it when its key is new.
    fn put<T: Serialize>(&self, records: &Records, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = self.encode(|| format!("{} record {key}", records.name), value)?;
        let old = records
            .tree
            .insert(key.as_bytes(), bytes)
            .map_err(|e| self.err(e))?;
        if old.is_none() {
            records.count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
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

    /// Deletes the oldest records of `records` beyond `max`; returns how
    /// many were deleted.
    fn prune(&self, records: &Records, max: usize) -> Result<usize, StoreError> {
        let excess = records.len().saturating_sub(max);
        if excess == 0 {
            return Ok(0);
        }
        let mut keys = Vec::with_capacity(excess);
        for item in records.tree.iter().keys().take(excess) {
            keys.push(item.map_err(|e| self.err(e))?);
        }
        let mut removed = 0;
        for k in keys {
            if records.tree.remove(&k).map_err(|e| self.err(e))?.is_some() {
                records.count.fetch_sub(1, Ordering::Relaxed);
                removed += 1;
            }
        }
        Ok(removed)
    }
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
    /// Opening counts the records of each tree once (`O(records)`).
    pub fn open(dir: &Path, timeout: Duration) -> Result<KnowledgeStore, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let path = dir.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("mapek-sled-open".into())
            .spawn(move || {
                let res = panic::catch_unwind(AssertUnwindSafe(|| Inner::open(&path)));
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
        match rx.recv_timeout(timeout) {
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
            Ok(Err(payload)) => Err(StoreError::Corrupt {
                dir: dir.to_path_buf(),
                detail: format!("sled panicked while opening: {}", panic_message(&*payload)),
            }),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(StoreError::Timeout {
                dir: dir.to_path_buf(),
                seconds: timeout.as_secs_f64(),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(StoreError::Corrupt {
                dir: dir.to_path_buf(),
                detail: "the opening thread ended without an answer".to_string(),
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

    /// Stores (or replaces, e.g. after an approval decision) a policy, and
    /// flushes it to disk.
    pub fn put_policy(&self, policy: &RemediationPolicy) -> Result<(), StoreError> {
        let inner = self.live()?;
        inner.put(&inner.policies, &policy.id, policy)?;
        inner.flush().map(|_| ())
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

    /// Stores (or replaces) an execution record, and flushes it to disk.
    pub fn put_execution(&self, execution: &PolicyExecution) -> Result<(), StoreError> {
        let inner = self.live()?;
        inner.put(&inner.executions, &execution.id, execution)?;
        inner.flush().map(|_| ())
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

    /// Stores an analysis result (not flushed at once: an analysis lost in a
    /// crash is recomputed from fresh evidence).
    pub fn put_analysis(&self, analysis: &AnalysisResult) -> Result<(), StoreError> {
        let inner = self.live()?;
        inner.put(&inner.analyses, &analysis.id, analysis)
    }

    /// The analysis with this id.
    pub fn get_analysis(&self, id: &str) -> Result<Option<AnalysisResult>, StoreError> {
        let inner = self.live()?;
        inner.get(&inner.analyses, id)
    }

    /// Stores (or replaces) an incident record, keyed by its id (flushed
    /// by sled's background flusher within 500 ms, or by [`Self::flush`]).
    pub fn put_incident(&self, incident: &Incident) -> Result<(), StoreError> {
        let inner = self.live()?;
        let bytes = inner.encode(|| format!("incident {}", incident.id), incident)?;
        inner
            .incidents
            .insert(incident.id.as_bytes(), bytes)
            .map_err(|e| inner.err(e))?;
        Ok(())
    }

    /// Deletes an incident record (a closed one beyond the bound).
    pub fn delete_incident(&self, id: &str) -> Result<(), StoreError> {
        let inner = self.live()?;
        inner
            .incidents
            .remove(id.as_bytes())
            .map_err(|e| inner.err(e))?;
        Ok(())
    }

    /// Every incident record kept (open ones and the bounded closed ones).
    pub fn all_incidents(&self) -> Result<Vec<Incident>, StoreError> {
        let inner = self.live()?;
        let mut out = Vec::new();
        for item in inner.incidents.iter() {
            let (k, v) = item.map_err(|e| inner.err(e))?;
            out.push(inner.decode("incidents", &k, &v)?);
        }
        Ok(out)
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
    /// transaction over the `outcomes` and `stats` trees, then flushes.
    /// Returns the statistics after the update.
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
        let inner = self.live()?;
        let key = outcome.execution_id.as_bytes();
        let value = inner.encode(|| format!("outcome {}", outcome.execution_id), outcome)?;
        let dir = &inner.dir;
        let res = (&inner.outcomes.tree, &inner.stats).transaction(|(outcomes, stats)| {
            let current: LearnedStats = match stats.get(STATS_KEY)? {
                Some(v) => decode(dir, "stats", STATS_KEY, &v)
                    .map_err(ConflictableTransactionError::Abort)?,
                None => LearnedStats::default(),
            };
            if outcomes.get(key)?.is_some() {
                return Ok((false, current));
            }
            let mut updated = current;
            updated.record(outcome, saturation);
            let bytes = serde_json::to_vec(&updated).map_err(|source| {
                ConflictableTransactionError::Abort(StoreError::Encode {
                    dir: dir.clone(),
                    what: "learned statistics".to_string(),
                    source,
                })
            })?;
            outcomes.insert(key, value.as_slice())?;
            stats.insert(STATS_KEY, bytes)?;
            Ok((true, updated))
        });
        let (inserted, stats) = match res {
            Ok(v) => v,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(inner.err(e)),
        };
        if inserted {
            inner.outcomes.count.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::debug!(
                execution_id = %outcome.execution_id,
                "outcome already recorded; statistics unchanged"
            );
        }
        inner.flush()?;
        Ok(stats)
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

    /// Replaces the stored insights with `insights`.
    pub fn put_insights(&self, insights: &[LearningInsight]) -> Result<(), StoreError> {
        let inner = self.live()?;
        let bytes = inner.encode(|| "insights".to_string(), &insights)?;
        inner
            .insights
            .insert(INSIGHTS_KEY, bytes)
            .map_err(|e| inner.err(e))?;
        Ok(())
    }

    /// The latest insights stored (empty if none).
    pub fn insights(&self) -> Result<Vec<LearningInsight>, StoreError> {
        let inner = self.live()?;
        match inner.insights.get(INSIGHTS_KEY).map_err(|e| inner.err(e))? {
            Some(v) => inner.decode("insights", INSIGHTS_KEY, &v),
            None => Ok(Vec::new()),
        }
    }

    /// Makes every write so far durable (blocking); returns the bytes
    /// flushed.
    pub fn flush(&self) -> Result<usize, StoreError> {
        self.live()?.flush()
    }

    /// Like [`flush`](Self::flush), without blocking the async runtime.
    pub async fn flush_async(&self) -> Result<usize, StoreError> {
        let inner = self.live()?;
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
        self.inner.flush().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                "store::tests::lock_holder_child",
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

    fn expect_corrupt(name: &str, garble: impl Fn(&Path)) {
        let (tmp, res, took) = damage_and_reopen(garble);
        match res {
            Err(e @ StoreError::Corrupt { .. }) => {
                eprintln!("{name}: {e} after {took:?}");
                let msg = e.to_string();
                assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
                assert!(took < Duration::from_secs(2), "{took:?}");
            }
            other => panic!("{name}: expected Corrupt, got {other:?}"),
        }
    }

    fn garbage(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ 0xA5)
            .collect()
    }

    #[test]
    fn corrupt_conf_and_db() {
        expect_corrupt("conf+db", |dir| {
            std::fs::write(dir.join("conf"), garbage(64, 1)).unwrap();
            std::fs::write(dir.join("db"), garbage(4096, 2)).unwrap();
        });
    }

    #[test]
    fn corrupt_conf_only() {
        expect_corrupt("conf", |dir| {
            std::fs::write(dir.join("conf"), garbage(64, 4)).unwrap();
        });
    }

    #[test]
    fn corrupt_db_is_not_silently_empty() {
        // sled itself opens these as empty databases; the marker catches it.
        expect_corrupt("db garbage", |dir| {
            let len = std::fs::metadata(dir.join("db")).unwrap().len() as usize;
            std::fs::write(dir.join("db"), garbage(len, 3)).unwrap();
        });
        expect_corrupt("db zeroed", |dir| {
            let len = std::fs::metadata(dir.join("db")).unwrap().len() as usize;
            std::fs::write(dir.join("db"), vec![0u8; len]).unwrap();
        });
        expect_corrupt("db head flipped", |dir| {
            let mut b = std::fs::read(dir.join("db")).unwrap();
            b.iter_mut().take(64).for_each(|x| *x ^= 0xFF);
            std::fs::write(dir.join("db"), b).unwrap();
        });
    }

    #[test]
    fn damaged_tail_keeps_a_consistent_prefix() {
        let (_tmp, res, _) = damage_and_reopen(|dir| {
            let mut b = std::fs::read(dir.join("db")).unwrap();
            let n = b.len();
            b.truncate(n / 2);
            std::fs::write(dir.join("db"), b).unwrap();
        });
        match res {
            Ok(store) => {
                let c = store.counts().unwrap();
                let stats = store.stats().unwrap();
                eprintln!("truncated db: opened with {c:?}");
                assert!(c.outcomes < 100, "{c:?}");
                // One transaction per outcome: never one without the other.
                assert_eq!(stats.outcomes_recorded, c.outcomes as u64);
            }
            Err(e) => assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}"),
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
        assert!(err.to_string().contains("probably corrupt"));
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
            t.starts_with("knowledge store /x did not open within 2.5 s"),
            "{t}"
        );
    }
}
