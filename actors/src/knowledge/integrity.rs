//! Start-up verification of the knowledge store against its journal, and
//! `--repair`.
//!
//! The journal (a snapshot plus the segments after it, see
//! [`crate::journal`]) describes every journaled sled tree completely. At
//! every start the journal is read into a scratch sled database (the same
//! apply code as the real index), and each journaled tree of the real
//! sled is compared with it key by key, in one ordered pass per tree:
//!
//! - **The journal is intact**: it is the truth. Whatever sled lacks, or
//!   holds differently, or holds and the journal does not, is put right
//!   from the journal: that is the replay after a crash, and it also
//!   repairs a sled that silently lost records (sled drops damaged data
//!   on open). Nothing is lost; a sled that differed while it claimed to
//!   be up to date is reported as damaged (a warning naming the records).
//! - **The journal is damaged** (a bad checksum, a missing segment or
//!   snapshot, a cut snapshot): mapek refuses to start, with a message
//!   naming each damaged file and offset and what would be lost, unless
//!   started with `--repair`. A salvaging read goes on past each damage at
//!   the next intact entry. The repair keeps sled's version of every
//!   record, except records changed by readable journal entries newer
//!   than sled (those are applied) and records sled lost (restored from
//!   the journal); the damaged journal files are moved aside to
//!   `journal/damaged-<time>/`, a fresh snapshot is written, and every
//!   dropped entry (unreadable, newer than sled) is listed in the log and
//!   in `repair-<time>.txt` in the data directory.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sled::IVec;

use crate::journal::{self, Index, JournalError, Record, VerifyReport, JOURNAL_DIR};
use crate::store::{journaled_trees, SledIndex, StoreError, INSIGHTS_KEY, STATS_KEY};

/// Directory of the scratch database, inside the data directory (deleted
/// when the check ends, and at the next start if a crash left it).
pub const SCRATCH_DIR: &str = ".verify";

/// Records per group applied to the scratch database.
const GROUP: usize = 4096;
/// Writes per sled batch when putting sled right.
const BATCH: usize = 1024;
/// Records named in a log line (the repair report file names all).
const NAMED_IN_LOG: usize = 20;

/// What the start-up check found and did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct IntegrityReport {
    /// Records compared (keys of every journaled tree).
    pub compared: u64,
    /// Journal records read (snapshot rows and entries).
    pub journal_records: u64,
    /// Highest sequence number in the journal.
    pub last_seq: u64,
    /// Where sled's `applied_seq` stood before the check.
    pub sled_applied_seq: u64,
    /// Records sled lacked, restored from the journal (`tree/key`).
    pub restored: Vec<String>,
    /// Records sled held differently, replaced from the journal.
    pub replaced: Vec<String>,
    /// Records sled held that the journal had deleted (or never had).
    pub removed: Vec<String>,
    /// Repair only: records whose sled version was kept although the
    /// (damaged) journal disagreed.
    pub kept_from_sled: Vec<String>,
    /// Every damaged place in the journal.
    pub damage: Vec<String>,
    /// Repair only: journal entries that could not be read and were newer
    /// than sled: their changes are lost.
    pub dropped: Vec<String>,
    /// Repair only: journal entries that could not be read but that sled
    /// had already applied (nothing lost).
    pub covered_by_sled: Vec<String>,
    /// sled differed from the journal although it was up to date with it:
    /// sled itself was damaged (and has been put right).
    pub sled_damaged: bool,
    /// sled held no data (or could not be opened) and was rebuilt from the
    /// journal.
    pub rebuilt: bool,
    /// Where unreadable sled files were moved, when they were.
    pub moved_aside: Option<PathBuf>,
    /// A data directory of the previous release was migrated.
    pub migrated: bool,
    /// `--repair` changed something.
    pub repaired: bool,
    /// The repair report written, if any.
    pub repair_report: Option<PathBuf>,
    /// Time the check took, in milliseconds.
    pub millis: u64,
}

impl IntegrityReport {
    /// Whether anything was put right.
    pub fn changed(&self) -> bool {
        !(self.restored.is_empty() && self.replaced.is_empty() && self.removed.is_empty())
    }
}

/// The journal as read into a scratch database.
pub(crate) struct Expected {
    pub db: sled::Db,
    pub report: VerifyReport,
    /// `(tree, key)` written by readable entries after sled's
    /// `applied_seq`.
    pub touched: HashSet<(String, Vec<u8>)>,
    pub records: u64,
}

/// Reads the whole journal of `dir` (salvaging: past damage) into a
/// scratch sled database.
pub(crate) fn read_expected(dir: &Path, applied_seq: u64) -> Result<Expected, StoreError> {
    let scratch = dir.join(SCRATCH_DIR);
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(|source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    let db = sled::Config::new()
        .path(&scratch)
        .temporary(true)
        .cache_capacity(64 << 20)
        .open()
        .map_err(|e| StoreError::from_sled(dir, e))?;
    let mut index = SledIndex::open(dir, db.clone())?;
    // Large trees' values are kept as digests: the scratch costs keys and
    // 32 bytes per record, not a second copy of the store.
    index.digest = true;
    let jdir = dir.join(JOURNAL_DIR);
    let mut group: Vec<(u64, Record)> = Vec::with_capacity(GROUP);
    let mut group_bytes = 0usize;
    let mut touched = HashSet::new();
    let mut records = 0u64;
    let apply = |index: &mut SledIndex, group: &mut Vec<(u64, Record)>| {
        let r = index.apply(group).map(|_| ());
        group.clear();
        r.map_err(|detail| JournalError::Index {
            dir: jdir.clone(),
            detail: format!("rebuilding from the journal: {detail}"),
        })
    };
    let report = journal::read_all(&jdir, true, &mut |seq, record| {
        if seq > applied_seq {
            touch(&record, &mut touched);
        }
        records += 1;
        group_bytes += approx_size(&record);
        group.push((seq, record));
        if group.len() >= GROUP || group_bytes >= GROUP_BYTES {
            apply(&mut index, &mut group)?;
            group_bytes = 0;
        }
        Ok(())
    })
    .and_then(|report| {
        if !group.is_empty() {
            apply(&mut index, &mut group)?;
        }
        Ok(report)
    })
    .map_err(|source| StoreError::Journal {
        dir: dir.to_path_buf(),
        source,
    })?;
    Ok(Expected {
        db,
        report,
        touched,
        records,
    })
}

/// Bytes of records per group applied to the scratch database.
const GROUP_BYTES: usize = 8 << 20;

/// About how many bytes a record holds (its large strings).
fn approx_size(record: &Record) -> usize {
    match record {
        Record::Raw { value, key, .. } => value.len() + key.len(),
        // The typed records are bounded by the journal's entry size; count
        // them at a typical size.
        _ => 4096,
    }
}

/// The sled keys a record writes.
fn touch(record: &Record, out: &mut HashSet<(String, Vec<u8>)>) {
    let mut add = |tree: &str, key: &[u8]| {
        out.insert((tree.to_string(), key.to_vec()));
    };
    match record {
        Record::Policy { policy } => add("policies", policy.id.as_bytes()),
        Record::Execution { execution } => add("executions", execution.id.as_bytes()),
        Record::Analysis { analysis } => add("analyses", analysis.id.as_bytes()),
        Record::Insights { .. } => add("insights", INSIGHTS_KEY),
        Record::Outcome { outcome, .. } => {
            add("outcomes", outcome.execution_id.as_bytes());
            add("stats", STATS_KEY);
        }
        Record::Reclassify { execution_id, .. } => {
            add("outcomes", execution_id.as_bytes());
            add("stats", STATS_KEY);
        }
        Record::Intent { key, .. } => add(crate::store::INTENTS_TREE, key.as_bytes()),
        Record::Put { tree, key, .. }
        | Record::Delete { tree, key }
        | Record::Raw { tree, key, .. } => add(tree, key.as_bytes()),
        Record::SnapshotEnd { .. } => {}
    }
}

/// Who wins where sled and the journal disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Truth {
    /// The journal is intact: it wins everywhere.
    Journal,
    /// The journal is damaged: sled wins, except for records changed by
    /// readable entries newer than sled and records sled lacks.
    Salvage,
}

/// The differences between sled and the journal, put right in sled
/// unless `dry_run`.
#[derive(Debug, Default)]
pub(crate) struct Diff {
    pub compared: u64,
    /// Records per tree once put right (so that opening need not walk
    /// the trees again to count them).
    pub counts: std::collections::HashMap<String, usize>,
    pub restored: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

fn name(tree: &str, key: &[u8]) -> String {
    format!("{tree}/{}", String::from_utf8_lossy(key))
}

/// Compares every journaled tree of `real` with the scratch database and,
/// unless `dry_run`, puts `real` right according to `truth`.
pub(crate) fn reconcile(
    dir: &Path,
    real: &sled::Db,
    expected: &Expected,
    truth: Truth,
    dry_run: bool,
) -> Result<Diff, StoreError> {
    let err = |e| StoreError::from_sled(dir, e);
    let mut trees = journaled_trees(real).map_err(err)?;
    trees.extend(journaled_trees(&expected.db).map_err(err)?);
    trees.sort();
    trees.dedup();
    let mut diff = Diff::default();
    // Values to restore into digested trees, fetched from the journal
    // after the pass (the scratch holds only their digests).
    let mut wanted: HashSet<(String, Vec<u8>)> = HashSet::new();
    for tree_name in trees {
        let digested = crate::store::digested_name(&tree_name);
        let have = real.open_tree(&tree_name).map_err(err)?;
        let want = expected.db.open_tree(&tree_name).map_err(err)?;
        let mut batch = sled::Batch::default();
        let mut pending = 0usize;
        let mut count = 0usize;
        let mut a = have.iter();
        let mut b = want.iter();
        let mut next_a = || a.next().transpose().map_err(err);
        let mut next_b = || b.next().transpose().map_err(err);
        let mut cur_a: Option<(IVec, IVec)> = next_a()?;
        let mut cur_b: Option<(IVec, IVec)> = next_b()?;
        loop {
            enum Step {
                Both(IVec, bool, IVec),
                OnlyReal(IVec),
                OnlyJournal(IVec, IVec),
            }
            let step = match (&cur_a, &cur_b) {
                (None, None) => break,
                (Some((ka, va)), Some((kb, vb))) if ka == kb => {
                    let differs = if digested {
                        crate::store::digest(va) != vb.as_ref()
                    } else {
                        va != vb
                    };
                    Step::Both(kb.clone(), differs, vb.clone())
                }
                (Some((ka, _)), Some((kb, _))) if ka < kb => Step::OnlyReal(ka.clone()),
                (Some((ka, _)), None) => Step::OnlyReal(ka.clone()),
                (_, Some((kb, vb))) => Step::OnlyJournal(kb.clone(), vb.clone()),
            };
            let touched = |k: &[u8]| expected.touched.contains(&(tree_name.clone(), k.to_vec()));
            diff.compared += 1;
            match step {
                Step::Both(k, differs, v) => {
                    count += 1;
                    if differs {
                        if truth == Truth::Journal || touched(&k) {
                            diff.replaced.push(name(&tree_name, &k));
                            if digested {
                                wanted.insert((tree_name.clone(), k.to_vec()));
                            } else {
                                batch.insert(k, v);
                                pending += 1;
                            }
                        } else {
                            diff.kept.push(name(&tree_name, &k));
                        }
                    }
                    cur_a = next_a()?;
                    cur_b = next_b()?;
                }
                Step::OnlyReal(k) => {
                    if truth == Truth::Journal || touched(&k) {
                        diff.removed.push(name(&tree_name, &k));
                        batch.remove(k);
                        pending += 1;
                    } else {
                        count += 1;
                        diff.kept.push(name(&tree_name, &k));
                    }
                    cur_a = next_a()?;
                }
                Step::OnlyJournal(k, v) => {
                    count += 1;
                    // sled lacks it: restored whoever is the truth.
                    diff.restored.push(name(&tree_name, &k));
                    if digested {
                        wanted.insert((tree_name.clone(), k.to_vec()));
                    } else {
                        batch.insert(k, v);
                        pending += 1;
                    }
                    cur_b = next_b()?;
                }
            }
            if pending >= BATCH {
                if !dry_run {
                    have.apply_batch(std::mem::take(&mut batch)).map_err(err)?;
                } else {
                    batch = sled::Batch::default();
                }
                pending = 0;
            }
        }
        if pending > 0 && !dry_run {
            have.apply_batch(batch).map_err(err)?;
        }
        diff.counts.insert(tree_name.clone(), count);
    }
    if !dry_run && !wanted.is_empty() {
        restore_from_journal(dir, real, &wanted)?;
    }
    Ok(diff)
}

/// Writes into `real` the journal's last value of each wanted key of a
/// digested tree (one more pass over the journal, keeping only those).
fn restore_from_journal(
    dir: &Path,
    real: &sled::Db,
    wanted: &HashSet<(String, Vec<u8>)>,
) -> Result<(), StoreError> {
    let jdir = dir.join(JOURNAL_DIR);
    // Applied in journal order as read (the last write wins, a delete
    // removes): nothing but the current record is held in memory.
    let mut failed: Option<sled::Error> = None;
    journal::read_all(&jdir, true, &mut |seq, record| {
        let write =
            crate::store::plain_write(seq, &record).map_err(|detail| JournalError::Index {
                dir: jdir.clone(),
                detail,
            })?;
        let Some(w) = write else { return Ok(()) };
        if failed.is_some() || !wanted.contains(&(w.tree.clone(), w.key.clone())) {
            return Ok(());
        }
        let res = real.open_tree(&w.tree).and_then(|t| match w.value {
            Some(v) => t.insert(w.key, v).map(|_| ()),
            None => t.remove(w.key).map(|_| ()),
        });
        if let Err(e) = res {
            failed = Some(e);
        }
        Ok(())
    })
    .map_err(|source| StoreError::Journal {
        dir: dir.to_path_buf(),
        source,
    })?;
    if let Some(e) = failed {
        return Err(StoreError::from_sled(dir, e));
    }
    Ok(())
}

/// Describes unreadable journal ranges: which were newer than sled
/// (lost) and which sled had applied (covered).
pub(crate) fn classify_skipped(
    report: &VerifyReport,
    applied_seq: u64,
) -> (Vec<String>, Vec<String>) {
    let mut dropped = Vec::new();
    let mut covered = Vec::new();
    for s in &report.skipped {
        match s.seqs {
            Some((_, last)) if last <= applied_seq => covered.push(s.to_string()),
            Some((first, _)) if first > applied_seq => dropped.push(s.to_string()),
            Some(_) => dropped.push(format!(
                "{s}: those after seq {applied_seq} are newer than sled"
            )),
            None => {
                // A snapshot's rows: all as old as the snapshot.
                match &report.snapshot {
                    Some(snap) if snap.applied_seq <= applied_seq => covered.push(format!(
                        "{s}: snapshot rows as of seq {}, which sled has applied",
                        snap.applied_seq
                    )),
                    _ => dropped.push(format!("{s}: snapshot rows")),
                }
            }
        }
    }
    (dropped, covered)
}

/// The message of a refusal to start on a damaged store.
pub(crate) fn describe(
    report: &VerifyReport,
    applied_seq: u64,
    problems: &[String],
    diff: &Diff,
) -> String {
    let mut out = String::new();
    for p in problems {
        out.push_str(p);
        out.push_str("; ");
    }
    let (dropped, covered) = classify_skipped(report, applied_seq);
    if !covered.is_empty() {
        out.push_str(&format!(
            "unreadable but already in sled (nothing lost): {}; ",
            covered.join(", ")
        ));
    }
    if dropped.is_empty() {
        out.push_str("no acknowledged change would be lost");
    } else {
        out.push_str(&format!(
            "unreadable and newer than sled (their changes would be lost): {}",
            dropped.join(", ")
        ));
    }
    if !diff.restored.is_empty() {
        out.push_str(&format!(
            "; {} records sled lost would be restored from the journal ({})",
            diff.restored.len(),
            preview(&diff.restored)
        ));
    }
    if !diff.kept.is_empty() {
        out.push_str(&format!(
            "; {} records differ between sled and the damaged journal and would keep sled's version ({})",
            diff.kept.len(),
            preview(&diff.kept)
        ));
    }
    out
}

/// The first names of a list, and how many more.
pub(crate) fn preview(names: &[String]) -> String {
    let shown: Vec<&str> = names
        .iter()
        .take(NAMED_IN_LOG)
        .map(String::as_str)
        .collect();
    if names.len() > NAMED_IN_LOG {
        format!(
            "{}, and {} more",
            shown.join(", "),
            names.len() - NAMED_IN_LOG
        )
    } else {
        shown.join(", ")
    }
}

/// Moves every journal file (segments, snapshots) into
/// `journal/damaged-<stamp>/`; returns that directory.
pub(crate) fn move_journal_aside(dir: &Path, stamp: &str) -> Result<PathBuf, StoreError> {
    let jdir = dir.join(JOURNAL_DIR);
    let aside = jdir.join(format!("damaged-{stamp}"));
    let io = |source| StoreError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(&aside).map_err(io)?;
    for entry in std::fs::read_dir(&jdir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if path.is_file() {
            std::fs::rename(&path, aside.join(entry.file_name())).map_err(io)?;
        }
    }
    Ok(aside)
}

/// Writes the repair report; returns its path.
pub(crate) fn write_repair_report(
    dir: &Path,
    stamp: &str,
    report: &IntegrityReport,
) -> Result<PathBuf, StoreError> {
    let path = dir.join(format!("repair-{stamp}.txt"));
    let mut text = format!(
        "mapek knowledge store repair, {stamp}\n\
         journal records read: {}\nsled applied_seq before: {}\nhighest readable seq: {}\n",
        report.journal_records, report.sled_applied_seq, report.last_seq
    );
    let mut section = |title: &str, items: &[String]| {
        text.push_str(&format!("\n{title}: {}\n", items.len()));
        for i in items {
            text.push_str("  ");
            text.push_str(i);
            text.push('\n');
        }
    };
    section("damage", &report.damage);
    section(
        "dropped (unreadable journal entries newer than sled: lost)",
        &report.dropped,
    );
    section(
        "unreadable journal entries already in sled (kept)",
        &report.covered_by_sled,
    );
    section(
        "records restored from the journal (sled had lost them)",
        &report.restored,
    );
    section(
        "records replaced by newer journal entries",
        &report.replaced,
    );
    section(
        "records removed (deleted by newer journal entries)",
        &report.removed,
    );
    section(
        "records whose sled version was kept (the journal disagreed)",
        &report.kept_from_sled,
    );
    // Durable before the repair changes anything.
    let io = |source| StoreError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::create(&path).map_err(io)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(path)
}
