//! The knowledge journal: one writer thread owns durability.
//!
//! Every change to the knowledge store is a [`Record`] appended to an
//! append-only journal and made durable with **one `fsync` per group**: the
//! writer thread takes everything queued while the previous group was being
//! written, appends it all, calls `File::sync_data` once, then applies the
//! group to the index (sled, see [`crate::store`]) and acknowledges every
//! record of the group. Callers on actor threads never wait for an fsync:
//! they get an [`Ack`] (a future) or submit without acknowledgement.
//!
//! # On-disk format (version 1)
//!
//! The journal lives in `<data dir>/journal/`, as numbered segments
//! `00000001.log`, `00000002.log`, ... (decimal, zero-padded to 8 digits,
//! longer if ever needed; key order = write order). A segment starts with a
//! 24-byte header, then entries back to back; all integers little-endian:
//!
//! ```text
//! segment header: magic "MAPEKJNL" (8) | version u32 | crc u32 | first_seq u64
//!                 (crc = CRC-32 of magic, version and first_seq)
//! entry:          len u32 | crc u32 | seq u64 | payload (len bytes)
//!                 (crc = CRC-32 (IEEE) of the 8 seq bytes then the payload)
//! ```
//!
//! The checksum covers the sequence number as well as the payload, so a
//! damaged `seq` is caught too. `len` is at most [`MAX_PAYLOAD`]; a larger
//! value is damage. Sequence numbers start at 1 and increase by exactly one
//! within a segment, starting at the header's `first_seq`; across segments
//! they increase. The payload is the JSON of a [`Record`], internally tagged
//! by `kind` (`policy`, `execution`, `outcome`, `analysis`, `insights`,
//! `intent`, `put`, `delete`), enough to rebuild every sled tree.
//!
//! # Snapshots, rotation and compaction
//!
//! The active segment is closed at the first group boundary after it
//! reaches the size limit ([`JournalOptions::segment_bytes`]); a new one is
//! created (header written and synced, directory synced). When the closed
//! segments reach [`JournalOptions::compact_bytes`] or the size of the last
//! snapshot, whichever is larger, the index is flushed and a **snapshot**
//! of it is written: `snapshot-<seq>.snap` (20-digit `seq`: the last entry
//! it holds), the same framing as a segment (header with `first_seq` 1,
//! then one [`Record::Raw`] row per stored value, then
//! [`Record::SnapshotEnd`] with the row count). It is written to a `.tmp`
//! file, synced, renamed into place and the directory synced; then the
//! segments and the snapshot it supersedes are deleted. The journal is
//! always the newest snapshot plus the segments after it: it describes
//! every record, so the index can be checked and rebuilt from it
//! ([`crate::integrity`]). A failed compaction is logged and retried at the
//! next rotation; it never stops the writer. Opening always starts a new
//! segment (it never appends after a possibly torn tail) and deletes the
//! segments that hold nothing, those a snapshot holds (a compaction that
//! did not finish deleting), older snapshots and `.tmp` files.
//!
//! # Replay rule
//!
//! The index stores the sequence number of the last record it applied
//! (`applied_seq`, written in the same sled transaction as the group). At
//! open, an index behind the snapshot gets the snapshot's rows, then every
//! intact entry with `seq > applied_seq` is applied again in order, so a
//! crash between the fsync and the sled apply loses nothing.
//!
//! # Damage
//!
//! [`verify`] and [`read_all`] read the snapshot and every segment and stop
//! reading a file at its first bad entry ([`Damage`]: truncated,
//! zero-filled, implausible length, checksum mismatch, sequence out of
//! order, a gap between segments, bad header, a snapshot without its end),
//! reporting the file and byte offset. A truncated or zero-filled entry at
//! the end of the **last** segment is a torn write from a crash: it was
//! never acknowledged (the ack follows the fsync), so it is ignored and cut
//! off at open. Any other damage makes the store refuse to open (see
//! [`crate::integrity`]); a **salvaging** read ([`read_all`] with
//! `salvage`, used by `--repair`) resumes at the next intact entry and
//! reports what it skipped ([`Skipped`]: bytes and sequence numbers).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::model::{
    AnalysisResult, LearningInsight, PolicyExecution, PolicyOutcome, RemediationPolicy,
};

/// First 8 bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"MAPEKJNL";
/// Version of the format described in the module documentation.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a segment header.
pub const SEGMENT_HEADER_LEN: u64 = 24;
/// Bytes of an entry header (`len`, `crc`, `seq`).
pub const ENTRY_HEADER_LEN: u64 = 16;
/// Largest payload accepted; a larger `len` is read as damage.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Default segment size limit.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;
/// Name of the journal directory inside the data directory.
pub const JOURNAL_DIR: &str = "journal";
/// Most records committed in one group (bounds the sled transaction).
const MAX_GROUP: usize = 4096;

/// One change to the knowledge, as journaled. Applying the records of a
/// journal in order rebuilds every tree of the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A policy stored or replaced (tree `policies`, key = id).
    Policy {
        /// The policy.
        policy: RemediationPolicy,
    },
    /// An execution stored or replaced (tree `executions`, key = id).
    Execution {
        /// The execution.
        execution: PolicyExecution,
    },
    /// An outcome (tree `outcomes`, key = execution id) folded into the
    /// learned statistics (tree `stats`) once per execution.
    Outcome {
        /// The outcome.
        outcome: PolicyOutcome,
        /// Confidence saturation used by the fold.
        saturation: u32,
    },
    /// An analysis result (tree `analyses`, key = id).
    Analysis {
        /// The analysis.
        analysis: AnalysisResult,
    },
    /// The latest insights (tree `insights`, one key).
    Insights {
        /// The insights.
        insights: Vec<LearningInsight>,
    },
    /// An action about to be taken (tree `intents`, key = the idempotency
    /// key `incident/attempt/action`).
    Intent {
        /// Idempotency key `incident/attempt/action`.
        key: String,
        /// The request to be sent.
        request: serde_json::Value,
    },
    /// A generic record stored or replaced.
    Put {
        /// Tree name.
        tree: String,
        /// Key.
        key: String,
        /// JSON value.
        value: serde_json::Value,
    },
    /// An outcome re-classified (a SUCCESS whose symptoms came back
    /// becomes RECURRED); the learned statistics move with it, once.
    Reclassify {
        /// Execution id of the outcome.
        execution_id: String,
        /// The new class.
        to: crate::model::OutcomeType,
    },
    /// A generic record deleted.
    Delete {
        /// Tree name.
        tree: String,
        /// Key.
        key: String,
    },
    /// One row of a snapshot: a sled value exactly as stored (JSON text).
    Raw {
        /// Tree name.
        tree: String,
        /// Key.
        key: String,
        /// The stored bytes (JSON, so UTF-8).
        value: String,
    },
    /// The last entry of a complete snapshot.
    SnapshotEnd {
        /// Sequence number of the last journal entry the snapshot holds.
        applied_seq: u64,
        /// Rows written before this entry.
        rows: u64,
    },
}

impl Record {
    /// The `kind` tag, as in the payload.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Policy { .. } => "policy",
            Record::Execution { .. } => "execution",
            Record::Outcome { .. } => "outcome",
            Record::Analysis { .. } => "analysis",
            Record::Insights { .. } => "insights",
            Record::Intent { .. } => "intent",
            Record::Put { .. } => "put",
            Record::Delete { .. } => "delete",
            Record::Reclassify { .. } => "reclassify",
            Record::Raw { .. } => "raw",
            Record::SnapshotEnd { .. } => "snapshot_end",
        }
    }
}

/// Errors of the journal. Every message names the journal directory.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// A file-system error.
    #[error("journal {}: I/O error while {op}: {source}", dir.display())]
    Io {
        /// The journal directory.
        dir: PathBuf,
        /// What was being done.
        op: String,
        /// The underlying error (shared: one failure fails a whole group).
        source: Arc<std::io::Error>,
    },
    /// A record could not be encoded (or its encoding would not decode).
    #[error("journal {}: cannot encode a {kind} record: {detail}", dir.display())]
    Encode {
        /// The journal directory.
        dir: PathBuf,
        /// Record kind.
        kind: &'static str,
        /// What serde_json reported.
        detail: String,
    },
    /// An intact entry (valid checksum) whose payload is not a record.
    #[error("journal {}: entry seq {seq} in {} does not decode: {detail}", dir.display(), segment.display())]
    Decode {
        /// The journal directory.
        dir: PathBuf,
        /// The segment file.
        segment: PathBuf,
        /// Its sequence number.
        seq: u64,
        /// What serde_json reported.
        detail: String,
    },
    /// A record larger than [`MAX_PAYLOAD`].
    #[error("journal {}: a {kind} record of {len} bytes exceeds the limit of {MAX_PAYLOAD} bytes", dir.display())]
    TooLarge {
        /// The journal directory.
        dir: PathBuf,
        /// Record kind.
        kind: &'static str,
        /// Encoded length.
        len: usize,
    },
    /// Applying a durable group to the index failed.
    #[error("journal {}: applying records to the index failed: {detail}", dir.display())]
    Index {
        /// The journal directory.
        dir: PathBuf,
        /// What the index reported.
        detail: String,
    },
    /// The writer stopped accepting records after a failure; the records
    /// it acknowledged are durable and are replayed at the next open.
    #[error(
        "journal {}: the writer stopped after a failure ({detail}); acknowledged records are \
         safe and are replayed when the store is reopened",
        dir.display()
    )]
    Failed {
        /// The journal directory.
        dir: PathBuf,
        /// The first failure.
        detail: String,
    },
    /// The writer thread is gone (the store was dropped, or it panicked).
    #[error("journal {}: the writer thread is gone", dir.display())]
    Gone {
        /// The journal directory.
        dir: PathBuf,
    },
    /// Test hook: the record was made durable, its apply was skipped.
    #[error("journal {}: apply skipped by the test hook", dir.display())]
    ApplySkipped {
        /// The journal directory.
        dir: PathBuf,
    },
}

fn io_err(dir: &Path, op: impl Into<String>, e: std::io::Error) -> JournalError {
    JournalError::Io {
        dir: dir.to_path_buf(),
        op: op.into(),
        source: Arc::new(e),
    }
}

/// Why reading a segment stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// The segment header is missing or wrong.
    #[error("bad segment header: {0}")]
    BadHeader(String),
    /// The entry runs past the end of the file (a torn write).
    #[error("truncated entry: {needed} bytes needed, {available} left in the file")]
    Truncated {
        /// Bytes the entry needs.
        needed: u64,
        /// Bytes left.
        available: u64,
    },
    /// Everything from here to the end of the file is zero (a torn write
    /// on a file system that extended the file first).
    #[error("zero-filled tail")]
    ZeroFilled,
    /// `len` above [`MAX_PAYLOAD`].
    #[error("implausible entry length {0}")]
    BadLength(u32),
    /// Stored and computed checksums differ.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Checksum in the entry.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// A snapshot without its end record (never renamed into place by
    /// mapek, so damaged or cut short).
    #[error("snapshot incomplete: no end record after {rows} rows")]
    Incomplete {
        /// Rows read.
        rows: u64,
    },
    /// An end record whose counts disagree with what was read.
    #[error("snapshot end record says {expected} rows, {found} were read")]
    RowCount {
        /// Rows the end record announces.
        expected: u64,
        /// Rows read.
        found: u64,
    },
    /// Sequence number not the one expected (or a gap: a segment missing).
    #[error("sequence {found} out of order (expected {expected})")]
    Sequence {
        /// Expected (or the least acceptable) sequence number.
        expected: u64,
        /// Sequence number found.
        found: u64,
    },
}

/// Where reading stopped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry {
    /// The segment file.
    pub segment: PathBuf,
    /// Byte offset of the first bad entry (or 0 for a bad header): a
    /// repair truncates the segment here.
    pub offset: u64,
    /// What is wrong.
    pub damage: Damage,
    /// A torn write at the end of the last segment (expected after a
    /// crash; never acknowledged).
    pub torn_tail: bool,
}

impl std::fmt::Display for BadEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at offset {}: {}{}",
            self.segment.display(),
            self.offset,
            self.damage,
            if self.torn_tail { " (torn tail)" } else { "" }
        )
    }
}

/// A snapshot as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot file.
    pub path: PathBuf,
    /// Sequence number of the last journal entry it holds.
    pub applied_seq: u64,
    /// Rows read.
    pub rows: u64,
    /// File size.
    pub bytes: u64,
}

/// Bytes skipped by a salvaging read ([`JournalOptions::salvage`]): the
/// entries there could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file.
    pub segment: PathBuf,
    /// First byte skipped.
    pub from: u64,
    /// First byte read again (the file's length when nothing followed).
    pub to: u64,
    /// Sequence numbers lost with them: `first..=last` (`last` is
    /// `u64::MAX` when the count is unknown: bytes up to the end of a
    /// file; `None` for a snapshot's rows).
    pub seqs: Option<(u64, u64)>,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes {}..{}",
            self.segment.display(),
            self.from,
            self.to
        )?;
        match self.seqs {
            Some((a, u64::MAX)) => write!(f, " (entries from seq {a} on, how many is unknown)"),
            Some((a, b)) if a == b => write!(f, " (entry seq {a})"),
            Some((a, b)) => write!(f, " (entries seq {a}..={b})"),
            None => write!(f, " (entries of unknown sequence)"),
        }
    }
}

/// Result of reading the whole journal ([`verify`], [`read_all`], and at
/// open).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Segment files read.
    pub segments: usize,
    /// Intact entries (in segments, after the snapshot).
    pub entries_ok: u64,
    /// Highest intact sequence number (or the snapshot's).
    pub last_seq: Option<u64>,
    /// Sequence number of the first entry read after the snapshot.
    pub first_seq: Option<u64>,
    /// Every place where reading stopped, in file order.
    pub damage: Vec<BadEntry>,
    /// The snapshot read, if any.
    pub snapshot: Option<SnapshotInfo>,
    /// What a salvaging read skipped.
    pub skipped: Vec<Skipped>,
}

impl VerifyReport {
    /// The first bad entry, if any.
    pub fn first_bad(&self) -> Option<&BadEntry> {
        self.damage.first()
    }

    /// Whether there is damage other than a torn tail.
    pub fn needs_repair(&self) -> bool {
        self.damage.iter().any(|d| !d.torn_tail)
    }

    /// Whether the journal describes the whole index: it holds a snapshot,
    /// or its entries start at sequence 1, or it is empty and so is the
    /// index (`applied_seq` 0).
    pub fn complete(&self, applied_seq: u64) -> bool {
        self.snapshot.is_some()
            || self.first_seq == Some(1)
            || (self.first_seq.is_none() && applied_seq == 0)
    }
}

/// A segment as read.
#[derive(Debug)]
struct SegmentScan {
    path: PathBuf,
    number: u64,
    /// The header's first sequence number (`None` for a bad header).
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    bad: Option<BadEntry>,
    /// Salvaging reads: ranges skipped to reach the next intact entry.
    skipped: Vec<Skipped>,
}

/// CRC-32 (IEEE) of `seq` then `payload`.
fn entry_crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn header_bytes(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
    b[..8].copy_from_slice(&SEGMENT_MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..12]);
    h.update(&b[16..24]);
    b[12..16].copy_from_slice(&h.finalize().to_le_bytes());
    b
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Appends one encoded entry to `buf`.
fn encode_entry(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    // Callers check the length against MAX_PAYLOAD, which fits in u32.
    let len = payload.len() as u32;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&entry_crc(seq, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Called with (segment, seq, payload) for each intact entry.
type OnEntry<'a> = dyn FnMut(&Path, u64, &[u8]) -> Result<(), JournalError> + 'a;

/// Reads one segment's bytes, calling `on_entry` for each intact entry;
/// stops at the first bad one. `after` is the highest sequence number of
/// the previous segments.
fn scan_bytes(
    path: &Path,
    number: u64,
    data: &[u8],
    after: Option<u64>,
    salvage: bool,
    on_entry: &mut OnEntry<'_>,
) -> Result<SegmentScan, JournalError> {
    let mut scan = SegmentScan {
        path: path.to_path_buf(),
        number,
        first_seq: None,
        last_seq: None,
        bad: None,
        skipped: Vec::new(),
    };
    let bad = |offset: u64, damage: Damage| BadEntry {
        segment: path.to_path_buf(),
        offset,
        damage,
        torn_tail: false,
    };
    let hl = SEGMENT_HEADER_LEN as usize;
    if data.len() < hl {
        let damage = if data.iter().all(|b| *b == 0) && !data.is_empty() {
            Damage::ZeroFilled
        } else {
            Damage::Truncated {
                needed: SEGMENT_HEADER_LEN,
                available: data.len() as u64,
            }
        };
        scan.bad = Some(bad(0, damage));
        return Ok(scan);
    }
    if data[..8] != SEGMENT_MAGIC {
        let damage = if data.iter().all(|b| *b == 0) {
            Damage::ZeroFilled
        } else {
            Damage::BadHeader("wrong magic".into())
        };
        scan.bad = Some(bad(0, damage));
        return Ok(scan);
    }
    if data[..hl] != header_bytes(le_u64(data, 16)) {
        let version = le_u32(data, 8);
        let why = if version != FORMAT_VERSION {
            format!("unsupported version {version} (this build reads {FORMAT_VERSION})")
        } else {
            "header checksum mismatch".to_string()
        };
        scan.bad = Some(bad(0, Damage::BadHeader(why)));
        return Ok(scan);
    }
    let first_seq = le_u64(data, 16);
    scan.first_seq = Some(first_seq);
    if let Some(prev) = after {
        if first_seq <= prev {
            scan.bad = Some(bad(
                0,
                Damage::Sequence {
                    expected: prev + 1,
                    found: first_seq,
                },
            ));
            return Ok(scan);
        }
    }
    let mut expected = first_seq;
    let mut at = hl;
    while at < data.len() {
        let offset = at as u64;
        let damage = match entry_at(data, at, expected, false) {
            Ok((seq, payload, total)) => {
                on_entry(path, seq, payload)?;
                scan.last_seq = Some(seq);
                expected = seq + 1;
                at += total;
                continue;
            }
            Err(damage) => damage,
        };
        if salvage && !matches!(damage, Damage::ZeroFilled) {
            // Look for the next intact entry: a plausible length, a
            // sequence number not below the expected one, and a checksum
            // that matches (the cheap checks first).
            let next = (at + 1..data.len()).find_map(|p| {
                entry_at(data, p, expected, true)
                    .ok()
                    .map(|(seq, _, _)| (p, seq))
            });
            if next.is_none() && matches!(damage, Damage::Truncated { .. }) {
                // Nothing intact follows a cut entry: a torn tail (or, in
                // a segment that is not the last, a gap the next segment
                // shows).
                if scan.bad.is_none() {
                    scan.bad = Some(bad(offset, damage));
                }
                break;
            }
            let (to, seqs) = match next {
                Some((p, seq)) => (p, (seq > expected).then(|| (expected, seq - 1))),
                // Up to the end of the file: how many entries is unknown.
                None => (data.len(), Some((expected, u64::MAX))),
            };
            scan.skipped.push(Skipped {
                segment: path.to_path_buf(),
                from: offset,
                to: to as u64,
                seqs,
            });
            if scan.bad.is_none() {
                scan.bad = Some(bad(offset, damage));
            }
            if let Some((p, seq)) = next {
                at = p;
                expected = seq;
                continue;
            }
            break;
        }
        scan.bad = Some(bad(offset, damage));
        break;
    }
    Ok(scan)
}

/// Reads the entry at `at`: its sequence number, payload and total size,
/// or what is wrong with it. `search` (a salvaging read looking for the
/// next intact entry) accepts a sequence number above `expected` (the
/// entries in between are lost) and rejects implausible ones before
/// computing a checksum.
fn entry_at(
    data: &[u8],
    at: usize,
    expected: u64,
    search: bool,
) -> Result<(u64, &[u8], usize), Damage> {
    let rest = &data[at..];
    if !search && rest.iter().all(|b| *b == 0) {
        return Err(Damage::ZeroFilled);
    }
    let ehl = ENTRY_HEADER_LEN as usize;
    if rest.len() < ehl {
        return Err(Damage::Truncated {
            needed: ENTRY_HEADER_LEN,
            available: rest.len() as u64,
        });
    }
    let len = le_u32(rest, 0);
    if len > MAX_PAYLOAD {
        return Err(Damage::BadLength(len));
    }
    let total = ehl + len as usize;
    if rest.len() < total {
        return Err(Damage::Truncated {
            needed: total as u64,
            available: rest.len() as u64,
        });
    }
    let seq = le_u64(rest, 8);
    if search && (seq < expected || seq - expected > 1 << 32) {
        return Err(Damage::Sequence {
            expected,
            found: seq,
        });
    }
    let stored = le_u32(rest, 4);
    let payload = &rest[ehl..total];
    let computed = entry_crc(seq, payload);
    if stored != computed {
        return Err(Damage::Checksum { stored, computed });
    }
    if seq != expected && !(search && seq > expected) {
        return Err(Damage::Sequence {
            expected,
            found: seq,
        });
    }
    Ok((seq, payload, total))
}

/// Segment files of `dir`, ordered by number.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir, "listing segments", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, "listing segments", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".log") else {
            continue;
        };
        if stem.is_empty() || !stem.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(n) = stem.parse::<u64>() {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Path of segment `number` in `dir`.
pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:08}.log"))
}

/// Prefix and suffix of snapshot files: `snapshot-<seq>.snap`, `seq` the
/// last journal entry the snapshot holds (20 digits).
const SNAPSHOT_PREFIX: &str = "snapshot-";
const SNAPSHOT_SUFFIX: &str = ".snap";

/// Path of the snapshot holding everything up to `applied_seq`.
pub fn snapshot_path(dir: &Path, applied_seq: u64) -> PathBuf {
    dir.join(format!(
        "{SNAPSHOT_PREFIX}{applied_seq:020}{SNAPSHOT_SUFFIX}"
    ))
}

/// Snapshot files of `dir`, ordered by the sequence number they hold.
fn list_snapshots(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir, "listing snapshots", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, "listing snapshots", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(seq) = name
            .strip_prefix(SNAPSHOT_PREFIX)
            .and_then(|n| n.strip_suffix(SNAPSHOT_SUFFIX))
        else {
            continue;
        };
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(n) = seq.parse::<u64>() {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads a file of entries (a snapshot) one entry at a time, as
/// [`scan_bytes`] does without salvage, holding one entry in memory.
fn stream_entries(
    dir: &Path,
    path: &Path,
    on_entry: &mut OnEntry<'_>,
) -> Result<SegmentScan, JournalError> {
    use std::io::Read;
    let ioe = |e| io_err(dir, format!("reading {}", path.display()), e);
    let file = File::open(path).map_err(ioe)?;
    let len = file.metadata().map_err(ioe)?.len();
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut scan = SegmentScan {
        path: path.to_path_buf(),
        number: 0,
        first_seq: None,
        last_seq: None,
        bad: None,
        skipped: Vec::new(),
    };
    let bad = |offset: u64, damage: Damage| BadEntry {
        segment: path.to_path_buf(),
        offset,
        damage,
        torn_tail: false,
    };
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    if len < SEGMENT_HEADER_LEN {
        scan.bad = Some(bad(
            0,
            Damage::Truncated {
                needed: SEGMENT_HEADER_LEN,
                available: len,
            },
        ));
        return Ok(scan);
    }
    r.read_exact(&mut header).map_err(ioe)?;
    let first_seq = le_u64(&header, 16);
    if header[..8] != SEGMENT_MAGIC || header != header_bytes(first_seq) {
        scan.bad = Some(bad(0, Damage::BadHeader("bad snapshot header".into())));
        return Ok(scan);
    }
    scan.first_seq = Some(first_seq);
    let mut expected = first_seq;
    let mut offset = SEGMENT_HEADER_LEN;
    let mut head = [0u8; ENTRY_HEADER_LEN as usize];
    let mut payload = Vec::new();
    while offset < len {
        let left = len - offset;
        if left < ENTRY_HEADER_LEN {
            scan.bad = Some(bad(
                offset,
                Damage::Truncated {
                    needed: ENTRY_HEADER_LEN,
                    available: left,
                },
            ));
            break;
        }
        r.read_exact(&mut head).map_err(ioe)?;
        let plen = le_u32(&head, 0);
        if plen > MAX_PAYLOAD {
            scan.bad = Some(bad(offset, Damage::BadLength(plen)));
            break;
        }
        let total = ENTRY_HEADER_LEN + u64::from(plen);
        if left < total {
            scan.bad = Some(bad(
                offset,
                Damage::Truncated {
                    needed: total,
                    available: left,
                },
            ));
            break;
        }
        payload.resize(plen as usize, 0);
        r.read_exact(&mut payload).map_err(ioe)?;
        let stored = le_u32(&head, 4);
        let seq = le_u64(&head, 8);
        let computed = entry_crc(seq, &payload);
        if stored != computed {
            scan.bad = Some(bad(offset, Damage::Checksum { stored, computed }));
            break;
        }
        if seq != expected {
            scan.bad = Some(bad(
                offset,
                Damage::Sequence {
                    expected,
                    found: seq,
                },
            ));
            break;
        }
        on_entry(path, seq, &payload)?;
        scan.last_seq = Some(seq);
        expected = seq + 1;
        offset += total;
    }
    Ok(scan)
}

/// Reads a snapshot file, giving each row to `on_row`.
fn scan_snapshot(
    dir: &Path,
    path: &Path,
    named_seq: u64,
    salvage: bool,
    on_row: &mut dyn FnMut(u64, Record) -> Result<(), JournalError>,
) -> Result<(SnapshotInfo, Option<BadEntry>, Vec<Skipped>), JournalError> {
    let file_len = fs::metadata(path)
        .map_err(|e| io_err(dir, format!("reading {}", path.display()), e))?
        .len();
    let mut rows = 0u64;
    let mut end: Option<(u64, u64, u64)> = None;
    let mut decode_failed: Option<BadEntry> = None;
    // Rows handed on so far (the streaming read, then a salvaging re-read
    // after damage resumes past them).
    let mut delivered = 0u64;
    let mut on_entry = |p: &Path, seq: u64, payload: &[u8]| {
        if seq <= delivered {
            return Ok(());
        }
        delivered = seq;
        match decode_payload(dir, p, seq, payload) {
            Ok(Record::SnapshotEnd {
                applied_seq,
                rows: n,
            }) => end = Some((applied_seq, n, seq)),
            Ok(row) => {
                rows += 1;
                on_row(named_seq, row)?;
            }
            Err(e) if salvage => {
                decode_failed.get_or_insert(BadEntry {
                    segment: p.to_path_buf(),
                    offset: 0,
                    damage: Damage::BadHeader(e.to_string()),
                    torn_tail: false,
                });
            }
            Err(e) => return Err(e),
        }
        Ok(())
    };
    // Streamed entry by entry (a snapshot is as large as the store); only a
    // salvaging read of a damaged one reads the whole file.
    let mut scan = stream_entries(dir, path, &mut on_entry)?;
    if salvage && scan.bad.is_some() {
        let data =
            fs::read(path).map_err(|e| io_err(dir, format!("reading {}", path.display()), e))?;
        scan = scan_bytes(path, 0, &data, None, true, &mut on_entry)?;
    }
    // Row numbers are not journal sequence numbers: what a damaged
    // snapshot lost is "snapshot rows" (seqs `None`).
    for skip in &mut scan.skipped {
        skip.seqs = None;
    }
    let mut bad = scan.bad.or(decode_failed);
    let applied_seq = match end {
        Some((applied, n, _)) => {
            if n != rows && bad.is_none() {
                bad = Some(BadEntry {
                    segment: path.to_path_buf(),
                    offset: file_len,
                    damage: Damage::RowCount {
                        expected: n,
                        found: rows,
                    },
                    torn_tail: false,
                });
            }
            applied
        }
        None => {
            if bad.is_none() {
                bad = Some(BadEntry {
                    segment: path.to_path_buf(),
                    offset: file_len,
                    damage: Damage::Incomplete { rows },
                    torn_tail: false,
                });
            }
            named_seq
        }
    };
    let info = SnapshotInfo {
        path: path.to_path_buf(),
        applied_seq,
        rows,
        bytes: file_len,
    };
    Ok((info, bad, scan.skipped))
}

/// Reads the newest snapshot and every segment of `dir`: snapshot rows
/// go to `on_row` (with the snapshot's sequence number), then every
/// intact entry after the snapshot to `on_entry`, in order. Torn tails of
/// the last segment are marked as such; a gap between segments (a
/// segment deleted) is damage.
fn scan_dir(
    dir: &Path,
    salvage: bool,
    skip_snapshot_upto: u64,
    on_row: &mut dyn FnMut(u64, Record) -> Result<(), JournalError>,
    on_entry: &mut OnEntry<'_>,
) -> Result<(VerifyReport, Vec<SegmentScan>), JournalError> {
    let mut report = VerifyReport::default();
    let mut next: Option<u64> = None;
    let mut after_snapshot = 0u64;
    if let Some((named, path)) = list_snapshots(dir)?.pop() {
        let (info, bad, skipped) = if named <= skip_snapshot_upto {
            // The reader already holds everything the snapshot does (and
            // it was verified when that was checked): not read again.
            let bytes = fs::metadata(&path)
                .map_err(|e| io_err(dir, format!("reading {}", path.display()), e))?
                .len();
            let info = SnapshotInfo {
                path: path.clone(),
                applied_seq: named,
                rows: 0,
                bytes,
            };
            (info, None, Vec::new())
        } else {
            scan_snapshot(dir, &path, named, salvage, on_row)?
        };
        after_snapshot = info.applied_seq;
        next = Some(info.applied_seq + 1);
        report.last_seq = Some(info.applied_seq);
        report.snapshot = Some(info);
        report.damage.extend(bad);
        report.skipped.extend(skipped);
    }
    let segments = list_segments(dir)?;
    let mut scans = Vec::with_capacity(segments.len());
    let count = segments.len();
    let mut previous_segment_last: Option<u64> = None;
    for (i, (number, path)) in segments.into_iter().enumerate() {
        let data =
            fs::read(&path).map_err(|e| io_err(dir, format!("reading {}", path.display()), e))?;
        let mut n = 0u64;
        let mut gap: Option<(u64, u64)> = None;
        let mut first: Option<u64> = None;
        let mut counting = |p: &Path, seq: u64, payload: &[u8]| {
            if seq <= after_snapshot {
                // Held by the snapshot (a segment left by a compaction
                // that did not finish deleting).
                return Ok(());
            }
            if let (Some(expected), None) = (next, first) {
                // Within a segment, scan_bytes checks the order itself.
                if seq > expected {
                    gap = Some((expected, seq));
                }
            }
            first.get_or_insert(seq);
            next = Some(seq + 1);
            n += 1;
            on_entry(p, seq, payload)
        };
        // Segments are checked against the previous segment, not the
        // snapshot: one a compaction did not get to delete starts below the
        // snapshot and is superseded, not damaged.
        let mut scan = scan_bytes(
            &path,
            number,
            &data,
            previous_segment_last,
            salvage,
            &mut counting,
        )?;
        if scan.last_seq.is_some() {
            previous_segment_last = scan.last_seq;
        }
        report.segments += 1;
        report.entries_ok += n;
        if report.first_seq.is_none() {
            report.first_seq = first;
        }
        if let Some(last) = scan.last_seq {
            report.last_seq = Some(report.last_seq.map_or(last, |l| l.max(last)));
        }
        if let (None, Some(f), Some(skip)) = (first, scan.first_seq, report.skipped.last_mut()) {
            // An empty segment after an unreadable end: its header tells
            // where that end stopped.
            if let Some((a, u64::MAX)) = skip.seqs {
                if f >= a {
                    skip.seqs = Some((a, f.saturating_sub(1).max(a)));
                }
            }
        }
        let open_skip = report
            .skipped
            .last_mut()
            .filter(|s| matches!((s.seqs, gap), (Some((a, u64::MAX)), Some((e, _))) if a == e));
        if let (Some(skip), Some((expected, found))) = (open_skip, gap) {
            // The previous segment's unreadable end held these entries.
            skip.seqs = Some((expected, found - 1));
        } else if let Some((expected, found)) = gap {
            // Entries between segments are missing: a segment was lost.
            report.damage.push(BadEntry {
                segment: path.clone(),
                offset: 0,
                damage: Damage::Sequence { expected, found },
                torn_tail: false,
            });
            report.skipped.push(Skipped {
                segment: path.clone(),
                from: 0,
                to: 0,
                seqs: Some((expected, found - 1)),
            });
        }
        report.skipped.append(&mut scan.skipped);
        if let Some(bad) = &mut scan.bad {
            bad.torn_tail = i + 1 == count
                && matches!(bad.damage, Damage::Truncated { .. } | Damage::ZeroFilled)
                && scan.skipped.is_empty();
            report.damage.push(bad.clone());
        }
        scans.push(scan);
    }
    Ok((report, scans))
}

/// Reads the whole journal in `journal_dir` without changing anything:
/// intact entries, the highest sequence number, and every place where
/// reading stopped (file and offset).
pub fn verify(journal_dir: &Path) -> Result<VerifyReport, JournalError> {
    read_all(journal_dir, false, &mut |_, _| Ok(()))
}

/// Reads the whole journal in `journal_dir`, giving `on_record` every
/// record in order: the snapshot's rows first (with the snapshot's
/// sequence number), then each intact entry after it. With `salvage`,
/// reading goes on past damage at the next intact entry, and what was
/// skipped is in [`VerifyReport::skipped`]. Changes nothing.
pub fn read_all(
    journal_dir: &Path,
    salvage: bool,
    on_record: &mut dyn FnMut(u64, Record) -> Result<(), JournalError>,
) -> Result<VerifyReport, JournalError> {
    let dir = journal_dir;
    // The two readers run one after the other, never together.
    let cell = std::cell::RefCell::new(on_record);
    let mut rows = |seq: u64, r: Record| (*cell.borrow_mut())(seq, r);
    let mut entries = |segment: &Path, seq: u64, payload: &[u8]| {
        let r = decode_payload(dir, segment, seq, payload)?;
        (*cell.borrow_mut())(seq, r)
    };
    scan_dir(dir, salvage, 0, &mut rows, &mut entries).map(|(r, _)| r)
}

/// Decodes a payload.
fn decode_payload(
    dir: &Path,
    segment: &Path,
    seq: u64,
    payload: &[u8],
) -> Result<Record, JournalError> {
    serde_json::from_slice(payload).map_err(|e| JournalError::Decode {
        dir: dir.to_path_buf(),
        segment: segment.to_path_buf(),
        seq,
        detail: e.to_string(),
    })
}

/// The index the journal is applied to (sled in [`crate::store`]).
pub trait Index: Send + 'static {
    /// What applying one record yields for its submitter.
    type Output: Send + 'static;

    /// Sequence number of the last record applied (0 for none).
    fn applied_seq(&self) -> u64;

    /// Applies a group of records, in order, atomically with its last
    /// sequence number; one output per record.
    fn apply(&mut self, group: &[(u64, Record)]) -> Result<Vec<Self::Output>, String>;

    /// Makes everything applied so far durable.
    fn flush(&mut self) -> Result<(), String>;

    /// Gives every row of the index to `sink` as a record that, applied
    /// to an empty index, recreates it ([`Record::Raw`] for sled).
    fn snapshot(
        &mut self,
        sink: &mut dyn FnMut(Record) -> Result<(), String>,
    ) -> Result<(), String>;
}

/// Options of the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalOptions {
    /// A segment is closed at the first group boundary after it reaches
    /// this many bytes.
    pub segment_bytes: u64,
    /// A snapshot is written (and the segments it holds deleted) when the
    /// segments since the last one reach this many bytes, or the size of
    /// the last snapshot if larger: the journal stays within about twice
    /// the size of the index plus this.
    pub compact_bytes: u64,
    /// Read past damage to the next intact entry (`--repair`).
    pub salvage: bool,
}

/// Default [`JournalOptions::compact_bytes`].
pub const DEFAULT_COMPACT_BYTES: u64 = 64 << 20;

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            compact_bytes: DEFAULT_COMPACT_BYTES,
            salvage: false,
        }
    }
}

/// Counters of the writer (prometheus-client types: clones share values,
/// so a registry and a test can both read them).
#[derive(Debug, Clone)]
pub struct JournalCounters {
    /// `fsync`s of segment data (one per group; directory syncs at
    /// rotation not counted).
    pub fsyncs: Counter,
    /// Records made durable.
    pub records: Counter,
    /// Bytes appended (entries, without segment headers).
    pub bytes: Counter,
    /// Segments deleted once a snapshot holds them.
    pub segments_deleted: Counter,
    /// Snapshots written.
    pub snapshots: Counter,
    /// Records per group commit.
    pub group_size: Histogram,
}

impl Default for JournalCounters {
    fn default() -> Self {
        JournalCounters {
            fsyncs: Counter::default(),
            records: Counter::default(),
            bytes: Counter::default(),
            segments_deleted: Counter::default(),
            snapshots: Counter::default(),
            group_size: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
        }
    }
}

/// The journal files: the newest snapshot, the closed segments after it
/// and the active segment. Owned by the writer thread.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    options: JournalOptions,
    file: File,
    number: u64,
    len: u64,
    next_seq: u64,
    /// Closed intact segments after the snapshot.
    closed: Vec<PathBuf>,
    /// Bytes of the closed segments.
    closed_bytes: u64,
    /// The newest snapshot and its size.
    snapshot: Option<(PathBuf, u64)>,
}

/// What opening the journal found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The journal as read.
    pub verify: VerifyReport,
    /// Records applied to the index by the replay.
    pub replayed: u64,
    /// Files deleted at open (older snapshots, unfinished snapshots).
    pub deleted: usize,
    /// Damaged segments kept for `--repair`.
    pub kept: Vec<PathBuf>,
}

impl Journal {
    /// Opens the journal in `dir` (created if missing): replays into
    /// `index` what it lacks (the snapshot's rows when the index is
    /// behind the snapshot, then every intact entry after its
    /// `applied_seq`), flushes the index, cuts a torn tail off the last
    /// segment (never acknowledged) and starts a new segment.
    pub fn open<I: Index>(
        dir: &Path,
        options: JournalOptions,
        index: &mut I,
    ) -> Result<(Journal, OpenReport), JournalError> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, "creating the directory", e))?;
        let applied = index.applied_seq();
        let mut pending: Vec<(u64, Record)> = Vec::new();
        let mut replayed = 0u64;
        let index_err = |detail| JournalError::Index {
            dir: dir.to_path_buf(),
            detail,
        };
        let (verify, scans) = {
            let cell = std::cell::RefCell::new((&mut pending, &mut replayed, &mut *index));
            let push = |seq: u64, record: Record| -> Result<(), JournalError> {
                let mut guard = cell.borrow_mut();
                let (pending, replayed, index) = &mut *guard;
                pending.push((seq, record));
                if pending.len() >= MAX_GROUP {
                    index.apply(pending).map_err(index_err)?;
                    **replayed += pending.len() as u64;
                    pending.clear();
                }
                Ok(())
            };
            let mut rows = |seq: u64, row: Record| {
                if seq > applied {
                    push(seq, row)
                } else {
                    Ok(())
                }
            };
            let mut entries = |segment: &Path, seq: u64, payload: &[u8]| {
                if seq <= applied {
                    return Ok(());
                }
                push(seq, decode_payload(dir, segment, seq, payload)?)
            };
            scan_dir(dir, options.salvage, applied, &mut rows, &mut entries)?
        };
        if !pending.is_empty() {
            index.apply(&pending).map_err(index_err)?;
            replayed += pending.len() as u64;
        }
        index.flush().map_err(index_err)?;
        let mut report = OpenReport {
            verify,
            replayed,
            ..OpenReport::default()
        };
        // Older snapshots, and one a crash left unfinished, are superseded.
        let newest = report.verify.snapshot.as_ref().map(|s| s.path.clone());
        for (_, path) in list_snapshots(dir)? {
            if Some(&path) != newest.as_ref() {
                remove(dir, &path)?;
                report.deleted += 1;
            }
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "tmp") {
                    remove(dir, &path)?;
                    report.deleted += 1;
                }
            }
        }
        let mut last_number = 0;
        let mut closed = Vec::new();
        let mut closed_bytes = 0;
        let superseded_upto = report.verify.snapshot.as_ref().map(|s| s.applied_seq);
        for scan in &scans {
            last_number = last_number.max(scan.number);
            let superseded = scan.bad.is_none()
                && match (scan.last_seq, superseded_upto) {
                    // Held by the snapshot (left by a compaction that did
                    // not finish deleting).
                    (Some(last), Some(upto)) => last <= upto,
                    // Holds no entry (a segment every start begins).
                    (None, _) => true,
                    _ => false,
                };
            if superseded {
                remove(dir, &scan.path)?;
                report.deleted += 1;
                continue;
            }
            match &scan.bad {
                Some(bad) if bad.torn_tail && bad.offset <= SEGMENT_HEADER_LEN => {
                    // Cut before its first entry (a crash while it was
                    // created): it holds nothing.
                    remove(dir, &scan.path)?;
                    sync_dir(dir)?;
                    report.deleted += 1;
                }
                Some(bad) if bad.torn_tail => {
                    // Never acknowledged: cut it off, so that the segment
                    // reads cleanly once it is no longer the last one.
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&scan.path)
                        .map_err(|e| io_err(dir, format!("opening {}", scan.path.display()), e))?;
                    f.set_len(bad.offset.max(SEGMENT_HEADER_LEN))
                        .and_then(|_| f.sync_all())
                        .map_err(|e| {
                            io_err(
                                dir,
                                format!("cutting the torn tail of {}", scan.path.display()),
                                e,
                            )
                        })?;
                    closed_bytes += bad.offset;
                    closed.push(scan.path.clone());
                }
                Some(_) => report.kept.push(scan.path.clone()),
                None => {
                    closed_bytes += fs::metadata(&scan.path).map(|m| m.len()).unwrap_or(0);
                    closed.push(scan.path.clone());
                }
            }
        }
        for bad in report.verify.damage.iter().filter(|b| !b.torn_tail) {
            tracing::warn!(
                journal = %dir.display(),
                damage = %bad,
                "journal damaged: entries after this point in the file were not replayed"
            );
        }
        let next_seq = applied.max(report.verify.last_seq.unwrap_or(0)) + 1;
        let number = last_number + 1;
        let file = create_segment(dir, number, next_seq)?;
        let snapshot = report
            .verify
            .snapshot
            .as_ref()
            .map(|s| (s.path.clone(), s.bytes));
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                options,
                file,
                number,
                len: SEGMENT_HEADER_LEN,
                next_seq,
                closed,
                closed_bytes,
                snapshot,
            },
            report,
        ))
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends already encoded entries and syncs them (one `fsync`).
    fn append_group(&mut self, buf: &[u8]) -> Result<(), JournalError> {
        self.file
            .write_all(buf)
            .map_err(|e| io_err(&self.dir, "appending", e))?;
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.dir, "syncing", e))?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Closes the active segment and starts the next one.
    fn rotate(&mut self) -> Result<(), JournalError> {
        let number = self.number + 1;
        let file = create_segment(&self.dir, number, self.next_seq)?;
        let old = std::mem::replace(&mut self.file, file);
        drop(old);
        self.closed.push(segment_path(&self.dir, self.number));
        self.closed_bytes += self.len;
        self.number = number;
        self.len = SEGMENT_HEADER_LEN;
        Ok(())
    }

    /// Starts a new segment if the active one is over the limit; writes a
    /// snapshot when the segments since the last one are large enough
    /// (every group is applied before the next begins, so the index holds
    /// everything written so far).
    fn maybe_rotate<I: Index>(
        &mut self,
        index: &mut I,
        counters: &JournalCounters,
    ) -> Result<(), JournalError> {
        if self.len < self.options.segment_bytes {
            return Ok(());
        }
        self.rotate()?;
        let threshold = self
            .options
            .compact_bytes
            .max(self.snapshot.as_ref().map_or(0, |(_, b)| *b));
        if self.closed_bytes >= threshold {
            // A failed compaction (a full disk) must not stop the journal:
            // the segments are intact; it is tried again at the next
            // rotation.
            if let Err(e) = self.write_snapshot(index, counters) {
                tracing::error!(journal = %self.dir.display(), error = %e, "journal compaction failed; the segments are kept and it is retried at the next rotation");
                if let Ok(entries) = fs::read_dir(&self.dir) {
                    for entry in entries.flatten() {
                        if entry.path().extension().is_some_and(|e| e == "tmp") {
                            let _ = fs::remove_file(entry.path());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a snapshot of `index` (which must hold every record written
    /// so far), then deletes the segments and the snapshot it supersedes.
    /// The snapshot is written to a temporary file, synced, renamed into
    /// place and the directory synced: a crash leaves the old state or
    /// the new one.
    pub fn write_snapshot<I: Index>(
        &mut self,
        index: &mut I,
        counters: &JournalCounters,
    ) -> Result<SnapshotInfo, JournalError> {
        if self.len > SEGMENT_HEADER_LEN {
            self.rotate()?;
        }
        let applied_seq = self.next_seq - 1;
        let index_err = |detail| JournalError::Index {
            dir: self.dir.clone(),
            detail,
        };
        index.flush().map_err(index_err)?;
        let path = snapshot_path(&self.dir, applied_seq);
        let tmp = path.with_extension("snap.tmp");
        let op = || format!("writing {}", tmp.display());
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .map_err(|e| io_err(&self.dir, op(), e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header_bytes(1))
            .map_err(|e| io_err(&self.dir, op(), e))?;
        // Rows written, bytes written, the first I/O error.
        let state = std::cell::RefCell::new((0u64, SEGMENT_HEADER_LEN, None::<std::io::Error>));
        let mut buf = Vec::new();
        let mut write = |record: &Record| -> Result<(), String> {
            let payload = serde_json::to_vec(record).map_err(|e| e.to_string())?;
            if payload.len() > MAX_PAYLOAD as usize {
                return Err(format!("a snapshot row of {} bytes", payload.len()));
            }
            let mut st = state.borrow_mut();
            st.0 += 1;
            buf.clear();
            encode_entry(&mut buf, st.0, &payload);
            st.1 += buf.len() as u64;
            out.write_all(&buf).map_err(|e| {
                let msg = e.to_string();
                st.2 = Some(e);
                msg
            })
        };
        let dir = self.dir.clone();
        let fail = |detail: String| match state.borrow_mut().2.take() {
            Some(e) => io_err(&dir, op(), e),
            None => JournalError::Index {
                dir: dir.clone(),
                detail: format!("writing a snapshot: {detail}"),
            },
        };
        index.snapshot(&mut |row| write(&row)).map_err(&fail)?;
        let rows = state.borrow().0;
        write(&Record::SnapshotEnd { applied_seq, rows }).map_err(&fail)?;
        let bytes = state.borrow().1;
        let file = out
            .into_inner()
            .map_err(|e| io_err(&self.dir, op(), e.into_error()))?;
        file.sync_all().map_err(|e| io_err(&self.dir, op(), e))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|e| io_err(&self.dir, op(), e))?;
        sync_dir(&self.dir)?;
        counters.snapshots.inc();
        for old in self.closed.drain(..) {
            remove(&self.dir, &old)?;
            counters.segments_deleted.inc();
        }
        self.closed_bytes = 0;
        if let Some((old, _)) = self.snapshot.replace((path.clone(), bytes)) {
            if old != path {
                remove(&self.dir, &old)?;
            }
        }
        tracing::info!(journal = %self.dir.display(), applied_seq, rows, bytes, "journal snapshot written");
        Ok(SnapshotInfo {
            path,
            applied_seq,
            rows,
            bytes,
        })
    }
}

fn remove(dir: &Path, path: &Path) -> Result<(), JournalError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir, format!("deleting {}", path.display()), e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "syncing the directory", e))
}

/// Creates segment `number` with its header, synced, and syncs the
/// directory so the new file survives a crash.
fn create_segment(dir: &Path, number: u64, first_seq: u64) -> Result<File, JournalError> {
    let path = segment_path(dir, number);
    let op = || format!("creating {}", path.display());
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| io_err(dir, op(), e))?;
    file.write_all(&header_bytes(first_seq))
        .map_err(|e| io_err(dir, op(), e))?;
    file.sync_all().map_err(|e| io_err(dir, op(), e))?;
    sync_dir(dir)?;
    Ok(file)
}

type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

enum Command<O> {
    Write {
        kind: &'static str,
        payload: Vec<u8>,
        ack: Option<Reply<O>>,
    },
    Barrier {
        ack: Reply<()>,
    },
}

/// Acknowledgement of a submitted record: resolves once the record is
/// durable (fsynced) and applied to the index. Dropping it does not
/// cancel the write.
#[derive(Debug)]
pub struct Ack<T> {
    dir: PathBuf,
    rx: oneshot::Receiver<Result<T, JournalError>>,
}

impl<T> Ack<T> {
    /// Blocks the calling thread until the acknowledgement (never call
    /// this on an actor's thread: it waits for an fsync).
    pub fn wait(self) -> Result<T, JournalError> {
        futures::executor::block_on(self)
    }
}

impl<T> std::future::Future for Ack<T> {
    type Output = Result<T, JournalError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match std::pin::Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(_)) => Poll::Ready(Err(JournalError::Gone {
                dir: self.dir.clone(),
            })),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Handle to the writer thread. Dropping it lets the thread finish what is
/// queued, flush the index and exit, and waits for that.
#[derive(Debug)]
pub struct Writer<O> {
    dir: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Command<O>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: JournalCounters,
    skip_apply: Arc<AtomicBool>,
}

impl<O> std::fmt::Debug for Command<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Write { kind, .. } => write!(f, "Write({kind})"),
            Command::Barrier { .. } => f.write_str("Barrier"),
        }
    }
}

impl<O: Send + 'static> Writer<O> {
    /// Starts the writer thread over an opened journal and its index.
    pub fn spawn<I: Index<Output = O>>(
        journal: Journal,
        index: I,
        counters: JournalCounters,
    ) -> Result<Writer<O>, JournalError> {
        let dir = journal.dir.clone();
        let (tx, rx) = mpsc::channel();
        let skip_apply = Arc::new(AtomicBool::new(false));
        let state = WriterThread {
            journal,
            index,
            counters: counters.clone(),
            skip_apply: skip_apply.clone(),
            failed: None,
        };
        let thread = std::thread::Builder::new()
            .name("mapek-journal".into())
            .spawn(move || state.run(rx))
            .map_err(|e| io_err(&dir, "starting the writer thread", e))?;
        Ok(Writer {
            dir,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            counters,
            skip_apply,
        })
    }

    /// The writer's counters.
    pub fn counters(&self) -> &JournalCounters {
        &self.counters
    }

    fn send(&self, cmd: Command<O>) -> Result<(), JournalError> {
        let gone = || JournalError::Gone {
            dir: self.dir.clone(),
        };
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.as_ref().ok_or_else(gone)?.send(cmd).map_err(|_| gone())
    }

    fn encode(&self, record: &Record) -> Result<Vec<u8>, JournalError> {
        let payload = serde_json::to_vec(record).map_err(|e| JournalError::Encode {
            dir: self.dir.clone(),
            kind: record.kind(),
            detail: e.to_string(),
        })?;
        if payload.len() > MAX_PAYLOAD as usize {
            return Err(JournalError::TooLarge {
                dir: self.dir.clone(),
                kind: record.kind(),
                len: payload.len(),
            });
        }
        Ok(payload)
    }

    /// Queues a record (encoded on the caller's thread, in call order) and
    /// returns its acknowledgement. Never blocks.
    pub fn submit(&self, record: &Record) -> Result<Ack<O>, JournalError> {
        let payload = self.encode(record)?;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Write {
            kind: record.kind(),
            payload,
            ack: Some(tx),
        })?;
        Ok(Ack {
            dir: self.dir.clone(),
            rx,
        })
    }

    /// Queues a record that needs no acknowledgement (a failure is logged
    /// by the writer). Never blocks.
    pub fn submit_detached(&self, record: &Record) -> Result<(), JournalError> {
        let payload = self.encode(record)?;
        self.send(Command::Write {
            kind: record.kind(),
            payload,
            ack: None,
        })
    }

    /// Resolves once everything submitted before is durable and applied.
    pub fn barrier(&self) -> Result<Ack<()>, JournalError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Barrier { ack: tx })?;
        Ok(Ack {
            dir: self.dir.clone(),
            rx,
        })
    }

    /// Test hook: when set, groups are made durable but not applied to
    /// the index (as if the process died right after the fsync).
    pub fn set_skip_apply(&self, skip: bool) {
        self.skip_apply.store(skip, Ordering::SeqCst);
    }

    /// Stops the thread after what is queued, and waits for it.
    pub fn shutdown(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!(journal = %self.dir.display(), "journal writer thread panicked");
            }
        }
    }
}

impl<O> Drop for Writer<O> {
    fn drop(&mut self) {
        drop(self.tx.get_mut().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(h) = self
            .thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
    }
}

struct WriterThread<I: Index> {
    journal: Journal,
    index: I,
    counters: JournalCounters,
    skip_apply: Arc<AtomicBool>,
    failed: Option<String>,
}

impl<I: Index> WriterThread<I> {
    fn run(mut self, rx: mpsc::Receiver<Command<I::Output>>) {
        let mut group = Vec::new();
        while let Ok(first) = rx.recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            if let Some(detail) = &self.failed {
                let e = JournalError::Failed {
                    dir: self.journal.dir.clone(),
                    detail: detail.clone(),
                };
                fail_all(group.drain(..), &e);
                continue;
            }
            if let Err(e) = self.commit(&mut group) {
                tracing::error!(error = %e, "journal writer failed; refusing further records");
                self.failed = Some(e.to_string());
                fail_all(group.drain(..), &e);
            }
        }
        if self.failed.is_none() {
            if let Err(detail) = self.index.flush() {
                tracing::error!(journal = %self.journal.dir.display(), %detail,
                    "flushing the index at shutdown failed; the journal replays it at the next open");
            }
        }
    }

    /// Appends, syncs once, applies, acknowledges. On error, the commands
    /// not yet answered are left in `group`.
    fn commit(&mut self, group: &mut Vec<Command<I::Output>>) -> Result<(), JournalError> {
        self.journal.maybe_rotate(&mut self.index, &self.counters)?;
        let dir = self.journal.dir.clone();
        let mut buf = Vec::new();
        let mut records = Vec::with_capacity(group.len());
        // Writes that made it into the group; rejected ones are answered here.
        let mut kept = Vec::with_capacity(group.len());
        for cmd in group.drain(..) {
            match cmd {
                Command::Write { kind, payload, ack } => {
                    let seq = self.journal.next_seq + records.len() as u64;
                    match serde_json::from_slice::<Record>(&payload) {
                        Ok(record) => {
                            encode_entry(&mut buf, seq, &payload);
                            records.push((seq, record));
                            kept.push(Command::Write {
                                kind,
                                payload: Vec::new(),
                                ack,
                            });
                        }
                        Err(e) => {
                            let err = JournalError::Encode {
                                dir: dir.clone(),
                                kind,
                                detail: format!("the encoding does not decode: {e}"),
                            };
                            answer(ack, Err(err));
                        }
                    }
                }
                barrier => kept.push(barrier),
            }
        }
        *group = kept;
        if !records.is_empty() {
            self.journal.append_group(&buf)?;
            self.journal.next_seq += records.len() as u64;
            self.counters.fsyncs.inc();
            self.counters.records.inc_by(records.len() as u64);
            self.counters.bytes.inc_by(buf.len() as u64);
            self.counters.group_size.observe(records.len() as f64);
        }
        let mut outputs = if records.is_empty() {
            Vec::new()
        } else if self.skip_apply.load(Ordering::SeqCst) {
            for cmd in group.drain(..) {
                match cmd {
                    Command::Write { ack, .. } => {
                        answer(ack, Err(JournalError::ApplySkipped { dir: dir.clone() }))
                    }
                    Command::Barrier { ack } => {
                        let _ = ack.send(Ok(()));
                    }
                }
            }
            return Ok(());
        } else {
            self.index
                .apply(&records)
                .map_err(|detail| JournalError::Index {
                    dir: dir.clone(),
                    detail,
                })?
        }
        .into_iter();
        for cmd in group.drain(..) {
            match cmd {
                Command::Write { ack, .. } => match outputs.next() {
                    Some(o) => answer(ack, Ok(o)),
                    None => answer(
                        ack,
                        Err(JournalError::Index {
                            dir: dir.clone(),
                            detail: "the index returned fewer outputs than records".into(),
                        }),
                    ),
                },
                Command::Barrier { ack } => {
                    let _ = ack.send(Ok(()));
                }
            }
        }
        Ok(())
    }
}

fn answer<O>(ack: Option<Reply<O>>, r: Result<O, JournalError>) {
    match ack {
        Some(tx) => {
            // The submitter may have dropped its Ack: nothing to tell.
            let _ = tx.send(r);
        }
        None => {
            if let Err(e) = r {
                tracing::error!(error = %e, "a journal record submitted without acknowledgement failed");
            }
        }
    }
}

fn fail_all<O>(cmds: impl Iterator<Item = Command<O>>, e: &JournalError) {
    for cmd in cmds {
        match cmd {
            Command::Write { ack, .. } => answer(ack, Err(e.clone())),
            Command::Barrier { ack } => {
                let _ = ack.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    /// An in-memory index: what was applied, and up to where it is
    /// "durable" (flushed).
    #[derive(Debug, Default)]
    struct Mem {
        applied: Vec<(u64, Record)>,
        flushed_seq: u64,
    }

    #[derive(Debug, Clone, Default)]
    struct MemIndex(Arc<Mutex<Mem>>);

    impl MemIndex {
        fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
            self.0.lock().unwrap()
        }

        fn records(&self) -> Vec<(u64, Record)> {
            self.lock()
                .applied
                .iter()
                .filter(|(s, _)| *s > 0)
                .cloned()
                .collect()
        }
    }

    impl Index for MemIndex {
        type Output = u64;

        fn applied_seq(&self) -> u64 {
            self.lock().applied.last().map(|(s, _)| *s).unwrap_or(0)
        }

        fn apply(&mut self, group: &[(u64, Record)]) -> Result<Vec<u64>, String> {
            let mut m = self.lock();
            m.applied.extend(group.iter().cloned());
            Ok(group.iter().map(|(s, _)| *s).collect())
        }

        fn flush(&mut self) -> Result<(), String> {
            let mut m = self.lock();
            m.flushed_seq = m.applied.last().map(|(s, _)| *s).unwrap_or(0);
            Ok(())
        }

        fn snapshot(
            &mut self,
            sink: &mut dyn FnMut(Record) -> Result<(), String>,
        ) -> Result<(), String> {
            let rows = state(&self.lock().applied);
            rows.into_iter().try_for_each(sink)
        }
    }

    fn put(i: usize) -> Record {
        Record::Put {
            tree: "incidents".into(),
            key: format!("inc-{i:05}"),
            value: serde_json::json!({"n": i, "text": "some payload of a realistic size"}),
        }
    }

    fn start(dir: &Path, o: JournalOptions, index: &MemIndex) -> (Writer<u64>, OpenReport) {
        let mut idx = index.clone();
        let (journal, report) = Journal::open(dir, o, &mut idx).unwrap();
        (
            Writer::spawn(journal, idx, JournalCounters::default()).unwrap(),
            report,
        )
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let segs = list_segments(dir).unwrap();
        assert_eq!(segs.len(), 1, "{segs:?}");
        segs[0].1.clone()
    }

    #[test]
    fn round_trip_and_replay() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let index = MemIndex::default();
        let (w, report) = start(&dir, JournalOptions::default(), &index);
        assert_eq!(report.replayed, 0);
        let records = vec![
            put(1),
            Record::Intent {
                key: "inc-1/1/scale_up".into(),
                request: serde_json::json!({"replicas": 3}),
            },
            Record::Delete {
                tree: "incidents".into(),
                key: "inc-00001".into(),
            },
            put(2),
        ];
        let acks: Vec<_> = records.iter().map(|r| w.submit(r).unwrap()).collect();
        let seqs: Vec<u64> = acks.into_iter().map(|a| a.wait().unwrap()).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        w.submit_detached(&put(3)).unwrap();
        w.barrier().unwrap().wait().unwrap();
        let mut expected: Vec<(u64, Record)> = seqs.into_iter().zip(records).collect();
        expected.push((5, put(3)));
        assert_eq!(index.records(), expected);
        drop(w);

        let v = verify(&dir).unwrap();
        assert_eq!(
            (v.segments, v.entries_ok, v.last_seq, v.damage.len()),
            (1, 5, Some(5), 0)
        );
        // A fresh index gets everything back, in order.
        let fresh = MemIndex::default();
        let (w, report) = start(&dir, JournalOptions::default(), &fresh);
        assert_eq!(report.replayed, 5);
        assert_eq!(fresh.records(), expected);
        // The replayed segment is kept (no snapshot holds it yet);
        // numbering and seqs go on in a new one.
        assert_eq!(report.deleted, 0);
        assert_eq!(w.submit(&put(9)).unwrap().wait().unwrap(), 6);
        drop(w);
        let numbers: Vec<u64> = list_segments(&dir).unwrap().iter().map(|s| s.0).collect();
        assert_eq!(numbers, vec![1, 2]);
    }

    #[test]
    fn torn_tail_stops_reading_and_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let index = MemIndex::default();
        let (w, _) = start(&dir, JournalOptions::default(), &index);
        for i in 0..9 {
            w.submit(&put(i)).unwrap().wait().unwrap();
        }
        let seg = only_segment(&dir);
        let ninth_end = fs::metadata(&seg).unwrap().len();
        w.submit(&put(9)).unwrap().wait().unwrap();
        drop(w);
        let full = fs::metadata(&seg).unwrap().len();
        // Cut the last entry in the middle of its payload.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(full - 7).unwrap();
        drop(f);

        let v = verify(&dir).unwrap();
        eprintln!("torn tail: {v:?}");
        assert_eq!(v.entries_ok, 9);
        assert_eq!(v.last_seq, Some(9));
        let bad = v.first_bad().unwrap();
        assert_eq!(bad.segment, seg);
        assert_eq!(bad.offset, ninth_end);
        assert!(matches!(bad.damage, Damage::Truncated { .. }), "{bad}");
        assert!(bad.torn_tail && !v.needs_repair());

        // Reopening replays the intact prefix, drops the torn segment and
        // reuses the torn entry's sequence number.
        let fresh = MemIndex::default();
        let (w, report) = start(&dir, JournalOptions::default(), &fresh);
        assert_eq!(report.replayed, 9);
        assert_eq!(fresh.records().len(), 9);
        assert_eq!(fresh.records()[8], (9, put(8)));
        assert!(report.kept.is_empty());
        assert_eq!(w.submit(&put(10)).unwrap().wait().unwrap(), 10);
    }

    #[test]
    fn zero_filled_tail_is_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let (w, _) = start(&dir, JournalOptions::default(), &MemIndex::default());
        for i in 0..3 {
            w.submit(&put(i)).unwrap().wait().unwrap();
        }
        drop(w);
        let seg = only_segment(&dir);
        let end = fs::metadata(&seg).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0u8; 100]).unwrap();
        drop(f);
        let v = verify(&dir).unwrap();
        let bad = v.first_bad().unwrap();
        assert_eq!((v.entries_ok, bad.offset), (3, end));
        assert_eq!(bad.damage, Damage::ZeroFilled);
        assert!(bad.torn_tail);
    }

    #[test]
    fn flipped_byte_is_a_checksum_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let (w, _) = start(&dir, JournalOptions::default(), &MemIndex::default());
        let seg = only_segment(&dir);
        let mut ends = Vec::new();
        for i in 0..10 {
            w.submit(&put(i)).unwrap().wait().unwrap();
            ends.push(fs::metadata(&seg).unwrap().len());
        }
        drop(w);
        // A byte in the payload of the 5th entry (seq 5).
        let mut bytes = fs::read(&seg).unwrap();
        let at = ends[3] as usize + ENTRY_HEADER_LEN as usize + 10;
        bytes[at] ^= 0x01;
        fs::write(&seg, &bytes).unwrap();

        let v = verify(&dir).unwrap();
        eprintln!("flipped byte: {}", v.first_bad().unwrap());
        assert_eq!((v.entries_ok, v.last_seq), (4, Some(4)));
        let bad = v.first_bad().unwrap();
        assert_eq!(bad.offset, ends[3]);
        assert!(matches!(bad.damage, Damage::Checksum { .. }), "{bad}");
        assert!(!bad.torn_tail && v.needs_repair());
        assert!(bad.to_string().contains(&format!("offset {}", ends[3])));

        // Opening replays up to the damage and keeps the segment for repair.
        let fresh = MemIndex::default();
        let (w, report) = start(&dir, JournalOptions::default(), &fresh);
        assert_eq!(report.replayed, 4);
        assert_eq!(report.kept, vec![seg.clone()]);
        assert!(seg.exists());
        let next = w.submit(&put(99)).unwrap().wait().unwrap();
        assert_eq!(next, 5);
        drop(w);
        // The next open reads past the kept segment into the new one.
        let again = MemIndex::default();
        let (_w, report) = start(&dir, JournalOptions::default(), &again);
        assert_eq!(report.replayed, 5);
        assert_eq!(again.records().last(), Some(&(5, put(99))));
    }

    #[test]
    fn damaged_length_and_header_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let (w, _) = start(&dir, JournalOptions::default(), &MemIndex::default());
        let seg = only_segment(&dir);
        w.submit(&put(0)).unwrap().wait().unwrap();
        drop(w);
        let mut bytes = fs::read(&seg).unwrap();
        let h = SEGMENT_HEADER_LEN as usize;
        bytes[h..h + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(&seg, &bytes).unwrap();
        let v = verify(&dir).unwrap();
        assert_eq!(v.first_bad().unwrap().damage, Damage::BadLength(u32::MAX));
        bytes[9] ^= 0xFF;
        fs::write(&seg, &bytes).unwrap();
        let v = verify(&dir).unwrap();
        let bad = v.first_bad().unwrap();
        assert_eq!(bad.offset, 0);
        assert!(matches!(&bad.damage, Damage::BadHeader(w) if w.contains("version")));
    }

    #[test]
    fn group_commit_needs_far_fewer_fsyncs_than_records() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let index = MemIndex::default();
        let (w, _) = start(&dir, JournalOptions::default(), &index);
        let w = Arc::new(w);
        const THREADS: usize = 8;
        const PER_THREAD: usize = 25;
        let gate = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (w, gate) = (w.clone(), gate.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    let acks: Vec<_> = (0..PER_THREAD)
                        .map(|i| w.submit(&put(t * 1000 + i)).unwrap())
                        .collect();
                    acks.into_iter()
                        .map(|a| a.wait().unwrap())
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        seqs.sort();
        assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
        let fsyncs = w.counters().fsyncs.get();
        println!("group commit: 200 records from {THREADS} threads, {fsyncs} fsyncs");
        assert!(fsyncs < 200, "{fsyncs}");
        assert!(fsyncs >= 1);
        assert_eq!(w.counters().records.get(), 200);
        assert_eq!(index.records().len(), 200);
    }

    /// The last record per key, in key order: the state a snapshot of a
    /// `MemIndex` holds.
    fn state(records: &[(u64, Record)]) -> Vec<Record> {
        let mut m = std::collections::BTreeMap::new();
        for (_, r) in records {
            if let Record::Put { key, .. } = r {
                m.insert(key.clone(), r.clone());
            }
        }
        m.into_values().collect()
    }

    #[test]
    fn compaction_snapshots_and_keeps_the_directory_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let index = MemIndex::default();
        let o = JournalOptions {
            segment_bytes: 2048,
            compact_bytes: 8192,
            salvage: false,
        };
        let (w, _) = start(&dir, o, &index);
        let mut most_bytes = 0;
        for i in 0..2000 {
            // 20 keys, each rewritten: the state stays small.
            w.submit(&put(i % 20)).unwrap().wait().unwrap();
            let bytes: u64 = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum();
            most_bytes = most_bytes.max(bytes);
        }
        let snapshots = w.counters().snapshots.get();
        let deleted = w.counters().segments_deleted.get();
        eprintln!("compaction: {snapshots} snapshots, {deleted} segments deleted, at most {most_bytes} bytes");
        assert!(snapshots >= 5, "{snapshots}");
        assert!(deleted >= 20, "{deleted}");
        // Snapshot (20 rows) + one compaction window + a segment.
        assert!(most_bytes < 8192 + 2 * 2048 + 20 * 200, "{most_bytes}");
        assert_eq!(list_snapshots(&dir).unwrap().len(), 1);
        drop(w);
        // A fresh index rebuilds the state from the snapshot and the tail.
        let fresh = MemIndex::default();
        let (w, report) = start(&dir, o, &fresh);
        assert!(report.verify.snapshot.is_some());
        assert!(report.verify.complete(0));
        assert_eq!(state(&fresh.records()), state(&index.records()));
        assert_eq!(w.submit(&put(1)).unwrap().wait().unwrap(), 2001);
        drop(w);
        // An index already up to date replays nothing.
        let (_w, report) = start(&dir, o, &fresh);
        assert_eq!(report.replayed, 0);
    }

    #[test]
    fn a_missing_segment_or_snapshot_is_damage_and_salvage_reads_past_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let index = MemIndex::default();
        let o = JournalOptions {
            segment_bytes: 1024,
            compact_bytes: u64::MAX,
            salvage: false,
        };
        let (w, _) = start(&dir, o, &index);
        for i in 0..60 {
            w.submit(&put(i)).unwrap().wait().unwrap();
        }
        drop(w);
        let segs = list_segments(&dir).unwrap();
        assert!(segs.len() >= 4, "{segs:?}");
        // Delete a middle segment: a gap in the sequence.
        fs::remove_file(&segs[1].1).unwrap();
        let v = verify(&dir).unwrap();
        assert!(v.needs_repair(), "{v:?}");
        let bad = v.first_bad().unwrap();
        assert!(matches!(bad.damage, Damage::Sequence { .. }), "{bad}");
        // A salvaging read goes on and names the lost range.
        let mut seen = Vec::new();
        let v = read_all(&dir, true, &mut |seq, _| {
            seen.push(seq);
            Ok(())
        })
        .unwrap();
        let lost = v.skipped.iter().find_map(|s| s.seqs).unwrap();
        assert_eq!(seen.len() as u64 + (lost.1 - lost.0 + 1), 60, "{v:?}");
        assert!(!seen.contains(&lost.0) && seen.contains(&(lost.1 + 1)));
    }

    #[test]
    fn salvage_resynchronises_after_a_garbled_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let (w, _) = start(&dir, JournalOptions::default(), &MemIndex::default());
        let seg = only_segment(&dir);
        let mut ends = Vec::new();
        for i in 0..10 {
            w.submit(&put(i)).unwrap().wait().unwrap();
            ends.push(fs::metadata(&seg).unwrap().len());
        }
        drop(w);
        // Garble the length and checksum of entry seq 4.
        let mut bytes = fs::read(&seg).unwrap();
        let at = ends[2] as usize;
        bytes[at..at + 8].iter_mut().for_each(|b| *b ^= 0x5A);
        fs::write(&seg, &bytes).unwrap();
        let strict = verify(&dir).unwrap();
        assert_eq!(strict.entries_ok, 3);
        let mut seen = Vec::new();
        let v = read_all(&dir, true, &mut |seq, _| {
            seen.push(seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![1, 2, 3, 5, 6, 7, 8, 9, 10], "{v:?}");
        assert_eq!(v.skipped.len(), 1, "{v:?}");
        assert_eq!(v.skipped[0].seqs, Some((4, 4)));
        assert_eq!(v.skipped[0].from, ends[2]);
        assert_eq!(v.skipped[0].to, ends[3]);
    }

    #[test]
    fn failed_apply_stops_the_writer() {
        #[derive(Debug)]
        struct Broken;
        impl Index for Broken {
            type Output = ();
            fn applied_seq(&self) -> u64 {
                0
            }
            fn apply(&mut self, _: &[(u64, Record)]) -> Result<Vec<()>, String> {
                Err("disk on fire".into())
            }
            fn flush(&mut self) -> Result<(), String> {
                Ok(())
            }
            fn snapshot(
                &mut self,
                _: &mut dyn FnMut(Record) -> Result<(), String>,
            ) -> Result<(), String> {
                Err("broken".into())
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(JOURNAL_DIR);
        let (journal, _) = Journal::open(&dir, JournalOptions::default(), &mut Broken).unwrap();
        let w = Writer::spawn(journal, Broken, JournalCounters::default()).unwrap();
        let e = w.submit(&put(1)).unwrap().wait().unwrap_err();
        assert!(matches!(e, JournalError::Index { .. }), "{e}");
        let e = w.submit(&put(2)).unwrap().wait().unwrap_err();
        assert!(matches!(e, JournalError::Failed { .. }), "{e}");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
        assert!(e.to_string().contains("disk on fire"), "{e}");
        // The first record was durable before the apply failed.
        assert_eq!(verify(&dir).unwrap().entries_ok, 1);
    }

    #[test]
    fn header_layout_is_stable() {
        let h = header_bytes(7);
        assert_eq!(&h[..8], b"MAPEKJNL");
        assert_eq!(le_u32(&h, 8), 1);
        assert_eq!(le_u64(&h, 16), 7);
        let mut e = Vec::new();
        encode_entry(&mut e, 3, b"{}");
        assert_eq!(le_u32(&e, 0), 2);
        assert_eq!(le_u32(&e, 4), entry_crc(3, b"{}"));
        assert_eq!(le_u64(&e, 8), 3);
        assert_eq!(&e[16..], b"{}");
        let json = serde_json::to_value(put(1)).unwrap();
        assert_eq!(json["kind"], "put");
    }
}
