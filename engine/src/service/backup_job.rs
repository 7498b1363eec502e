//! A backup as a job: the snapshot phase, then the transfer phase, with
//! the decoupling rule between jobs of one item.
//!
//! - At most one snapshot phase per item runs at any moment (a second one
//!   fails at once, naming the job in the way).
//! - At most one transfer phase per item runs at any moment. When a job's
//!   snapshot completes while another job's transfer still runs, the new
//!   job's transfer is **Skipped** and the job is Completed; the next
//!   transfer diffs against the last *vault* point, so it captures every
//!   change since then.
//! - Cancellation is honoured during the snapshot phase only. Shutdown
//!   (`stop`) abandons either phase between windows.
//! - The snapshot phase needs no writer lock; the transfer takes it (or
//!   uses the writer the caller already holds).
//!
//! Phase and job status follow the table in `coffre_vault_store::jobs`.

use std::path::Path;
use std::sync::Arc;

use coffre_vault_store::crypto::VaultKeys;
use coffre_vault_store::jobs::{JobRecord, JobStore, Operation, PhaseStatus, RunningJob};
use coffre_vault_store::store::local::lock::{ItemPhase, NamedLock, item_phase_lock_path};
use coffre_vault_store::{Access, PointRecord, Vault};
use jiff::Timestamp;

use coffre_snapshotter::SnapError;
use coffre_snapshotter::capture::Captured;
use coffre_snapshotter::source::{LiveSource, PointInTime, TakeRequest};

use crate::backup::{
    BackupOptions, PointTerms, SnapshotOptions, take_snapshot, thread_pool, transfer,
};
use crate::clock::Clock;
use crate::error::{EngineError, Result};
use crate::progress::Progress;
use crate::source::ImageSource;

/// Phase names.
pub const SNAPSHOT: &str = "snapshot";
/// Phase names.
pub const TRANSFER: &str = "transfer";

/// Where the transfer phase gets its writer.
#[derive(Clone)]
pub enum Writer<'a> {
    /// The caller holds the vault open for writing (daemon, run-due).
    Held(&'a Vault),
    /// Open the vault for writing, waiting up to this long for the lock.
    Open(coffre_vault_store::OpenOptions),
}

impl Writer<'_> {
    /// The config of the vault at `vault_dir` the job writes to, unlocked
    /// (its keys seal the job's record and snapshot files).
    pub fn config(&self, vault_dir: &Path) -> Result<coffre_vault_store::VaultConfig> {
        Ok(match self {
            Writer::Held(v) => v.config().clone(),
            Writer::Open(o) => {
                coffre_vault_store::VaultConfig::load_with(vault_dir, o.unlock.as_deref())?
            }
        })
    }
}

/// Everything a backup job needs besides the image.
pub struct JobOptions<'a> {
    /// Item, path, threads, rate limit.
    pub backup: BackupOptions,
    /// How the point is kept.
    pub terms: PointTerms,
    /// Where the transfer gets its writer.
    pub writer: Writer<'a>,
    /// Polled between windows of the transfer: `true` abandons it
    /// (shutdown). Nothing of an abandoned transfer is recorded.
    pub stop: &'a (dyn Fn() -> bool + Sync),
    /// Stats the job record carries from its start (a domain backup's
    /// domain, shared job id and instant; empty for a lone image).
    pub labels: std::collections::BTreeMap<String, serde_json::Value>,
}

/// What a backup job ended with.
#[derive(Debug)]
pub struct JobOutcome {
    /// The final job record.
    pub job: JobRecord,
    /// The point, when the transfer completed.
    pub point: Option<PointRecord>,
    /// The error that failed a phase, if any.
    pub error: Option<EngineError>,
}

fn now(clock: &dyn Clock) -> Timestamp {
    clock.now()
}

/// Where a job's image comes from.
enum JobSource<'a> {
    /// An image the caller opened.
    Image(&'a dyn ImageSource),
    /// A point in time the job takes itself (a running VM's drive).
    Live(&'a mut dyn LiveSource),
}

/// Runs a backup job of `source` into the vault at `vault_dir`.
pub fn run_backup_job(
    vault_dir: &Path,
    source: &dyn ImageSource,
    opts: JobOptions<'_>,
    clock: &dyn Clock,
    snapshot_progress: &dyn Progress,
    transfer_progress: &dyn Progress,
) -> Result<JobOutcome> {
    run_job(
        vault_dir,
        JobSource::Image(source),
        opts,
        clock,
        snapshot_progress,
        transfer_progress,
    )
}

/// What a job reads, owned by the caller until the job ends.
pub enum Source {
    /// An opened image: a file, a block device, an NBD export.
    Image(Box<dyn ImageSource>),
    /// A point in time the job takes itself, at the start of its snapshot
    /// phase and under the item's snapshot lock (a running VM's drive). It
    /// is released once captured, and told at the end whether it reached
    /// the vault; `opts.backup`'s hint is not used: the source gives its
    /// own.
    Live(Box<dyn LiveSource>),
}

/// Runs a backup job of `source` into the vault at `vault_dir`.
pub fn run_source_job(
    vault_dir: &Path,
    source: &mut Source,
    opts: JobOptions<'_>,
    clock: &dyn Clock,
    snapshot_progress: &dyn Progress,
    transfer_progress: &dyn Progress,
) -> Result<JobOutcome> {
    let source = match source {
        Source::Image(image) => JobSource::Image(&**image),
        Source::Live(live) => JobSource::Live(&mut **live),
    };
    run_job(
        vault_dir,
        source,
        opts,
        clock,
        snapshot_progress,
        transfer_progress,
    )
}

fn run_job(
    vault_dir: &Path,
    mut source: JobSource<'_>,
    opts: JobOptions<'_>,
    clock: &dyn Clock,
    snapshot_progress: &dyn Progress,
    transfer_progress: &dyn Progress,
) -> Result<JobOutcome> {
    let (mut job, point, error) = run_phases(
        vault_dir,
        &mut source,
        &opts,
        clock,
        snapshot_progress,
        transfer_progress,
    )?;
    if let JobSource::Live(live) = source {
        // The source's chain moves on only with a committed point; its
        // warnings join the job's.
        let warnings = live.settle(point.is_some() && error.is_none());
        if !warnings.is_empty() {
            job.update(now(clock), |r| add_warnings(r, &warnings))?;
        }
    }
    Ok(finish(job, point, error))
}

/// Appends `more` to a job's `warnings`.
fn add_warnings(r: &mut JobRecord, more: &[String]) {
    if more.is_empty() {
        return;
    }
    if let serde_json::Value::Array(w) = r
        .stats
        .entry("warnings".into())
        .or_insert_with(|| serde_json::Value::Array(Vec::new()))
    {
        w.extend(more.iter().cloned().map(serde_json::Value::from));
    }
}

fn run_phases(
    vault_dir: &Path,
    source: &mut JobSource<'_>,
    opts: &JobOptions<'_>,
    clock: &dyn Clock,
    snapshot_progress: &dyn Progress,
    transfer_progress: &dyn Progress,
) -> Result<(RunningJob, Option<PointRecord>, Option<EngineError>)> {
    let item = opts.backup.item.clone();
    let config = opts.writer.config(vault_dir)?;
    let store = JobStore::new(vault_dir, config.keys());
    let mut record = JobRecord::new(
        Operation::Backup,
        Some(&item),
        &[SNAPSHOT, TRANSFER],
        now(clock),
    );
    record.stats.extend(opts.labels.clone());
    let mut job = store.start(record)?;

    // Snapshot phase.
    let snap = match snapshot_phase(
        vault_dir,
        source,
        opts,
        &mut job,
        &config,
        clock,
        snapshot_progress,
    ) {
        Ok(s) => s,
        Err(e) => {
            let status = if matches!(e, EngineError::Cancelled { .. }) {
                PhaseStatus::Cancelled
            } else {
                PhaseStatus::Failed
            };
            job.set_phase(now(clock), SNAPSHOT, status, Some(e.to_string()))?;
            return Ok((job, None, Some(e)));
        }
    };

    // Transfer phase, unless another job's transfer of this item runs.
    let lock_path = item_phase_lock_path(vault_dir, &item, ItemPhase::Transfer);
    let _transfer_lock = match NamedLock::try_acquire(&lock_path, &format!("job {}", job.id()))? {
        Ok(l) => l,
        Err(holder) => {
            let reason = format!(
                "the transfer of {holder} for item {item} is still running; the next transfer will capture these changes"
            );
            job.set_phase(now(clock), TRANSFER, PhaseStatus::Skipped, Some(reason))?;
            return Ok((job, None, None));
        }
    };
    job.set_phase(now(clock), TRANSFER, PhaseStatus::InProgress, None)?;
    let result = transfer_phase(vault_dir, &snap, opts, job.id(), transfer_progress);
    match result {
        Ok((point, degraded)) => {
            let p = point.clone();
            job.update(now(clock), |r| {
                add_warnings(r, &degraded);
                r.point = Some(p.id.clone());
                r.stats
                    .insert("bytes_read".into(), p.stats.bytes_read.into());
                r.stats
                    .insert("blocks_total".into(), p.stats.blocks_total.into());
                r.stats
                    .insert("blocks_changed".into(), p.stats.blocks_changed.into());
                r.stats
                    .insert("new_chunks".into(), p.stats.new_chunks.into());
                r.stats
                    .insert("stored_bytes".into(), p.stats.stored_bytes.into());
                r.stats.insert("image_size".into(), p.image_size.into());
                if let Some(cbt) = &p.cbt {
                    r.stats
                        .insert("cbt".into(), serde_json::to_value(cbt).unwrap_or_default());
                }
            })?;
            let note = (!degraded.is_empty()).then(|| degraded.join("; "));
            job.set_phase(now(clock), TRANSFER, PhaseStatus::Completed, note)?;
            Ok((job, Some(point), None))
        }
        Err(e) => {
            job.set_phase(
                now(clock),
                TRANSFER,
                PhaseStatus::Failed,
                Some(e.to_string()),
            )?;
            Ok((job, None, Some(e)))
        }
    }
}

fn finish(job: RunningJob, point: Option<PointRecord>, error: Option<EngineError>) -> JobOutcome {
    JobOutcome {
        job: job.record().clone(),
        point,
        error,
    }
}

fn snapshot_phase(
    vault_dir: &Path,
    source: &mut JobSource<'_>,
    opts: &JobOptions<'_>,
    job: &mut RunningJob,
    config: &coffre_vault_store::VaultConfig,
    clock: &dyn Clock,
    progress: &dyn Progress,
) -> Result<Captured> {
    let item = &opts.backup.item;
    let lock_path = item_phase_lock_path(vault_dir, item, ItemPhase::Snapshot);
    let _lock =
        NamedLock::try_acquire(&lock_path, &format!("job {}", job.id()))?.map_err(|holder| {
            EngineError::SnapshotBusy {
                item: item.clone(),
                holder,
            }
        })?;
    job.set_phase(now(clock), SNAPSHOT, PhaseStatus::InProgress, None)?;
    let pool = thread_pool(opts.backup.threads)?;
    let id = job.id().to_string();
    let stop = opts.stop;
    // A changed-block hint must be relative to the item's latest point
    // (a live source's always may be).
    let wants_parent = opts.backup.hint.is_some() || matches!(source, JobSource::Live(_));
    let parent = match (wants_parent, &opts.writer) {
        (false, _) => None,
        (true, Writer::Held(v)) => v.points(item)?.pop(),
        (true, Writer::Open(o)) => Vault::open_with(vault_dir, Access::ReadOnly, o)?
            .points(item)?
            .pop(),
    };
    let parent_point = parent.as_ref().map(|p| p.id.clone());
    let running: &RunningJob = job;
    let cancelled = || stop() || running.cancel_requested();
    let snapshot =
        |source: &dyn ImageSource, backup: &BackupOptions, taken: Option<&PointInTime>| {
            take_snapshot(
                vault_dir,
                config,
                source,
                backup,
                &SnapshotOptions {
                    job: &id,
                    created: now(clock),
                    pool: &pool,
                    cancelled: &cancelled,
                    parent_point: parent_point.as_deref(),
                    taken,
                },
                progress,
            )
        };
    let mut freeze_ms = None;
    let snap = match source {
        JobSource::Image(source) => snapshot(*source, &opts.backup, None),
        JobSource::Live(live) => {
            let snap = live
                .take(&TakeRequest {
                    item,
                    job: &id,
                    vault_dir,
                    hooks: &opts.backup.hooks,
                    parent: parent.as_ref().and_then(|p| p.cbt.as_ref()),
                })
                .map_err(EngineError::from)
                .and_then(|t| {
                    freeze_ms = t.instant.freeze_ms;
                    let mut backup = opts.backup.clone();
                    backup.hint = t.hint;
                    // The export is closed (with `t`) before the release.
                    snapshot(&*t.source, &backup, Some(&t.instant))
                });
            live.release();
            snap
        }
    };
    let snap = snap.map_err(|e| match e {
        // Shutdown, not the user: the phase is abandoned, not cancelled.
        EngineError::Snap(SnapError::Cancelled { .. }) if stop() => EngineError::Abandoned,
        EngineError::Snap(SnapError::Cancelled { .. }) => EngineError::Cancelled { id: id.clone() },
        e => e,
    })?;
    let s = snap.clone();
    let warnings: Vec<String> = opts
        .backup
        .notes
        .iter()
        .chain(&snap.meta.warnings)
        .cloned()
        .collect();
    job.update(now(clock), |r| {
        r.point = Some(s.meta.point.clone());
        r.stats
            .insert("snapshot_bytes_read".into(), s.bytes_read.into());
        r.stats.insert("snapshot_ms".into(), s.duration_ms.into());
        r.stats
            .insert("snapshot_stored_bytes".into(), s.stored_bytes.into());
        r.stats.insert("snapshot_passes".into(), s.passes.into());
        r.stats.insert(
            "snapshot_kind".into(),
            serde_json::to_value(s.header.kind).unwrap_or_default(),
        );
        if let Some(ms) = freeze_ms {
            r.stats.insert("freeze_ms".into(), ms.into());
        }
        r.stats.insert(
            "level".into(),
            serde_json::to_value(s.meta.level).unwrap_or_default(),
        );
        if !warnings.is_empty() {
            r.stats.insert(
                "warnings".into(),
                serde_json::to_value(&warnings).unwrap_or_default(),
            );
        }
    })?;
    let note = (!warnings.is_empty()).then(|| warnings.join("; "));
    job.set_phase(now(clock), SNAPSHOT, PhaseStatus::Completed, note)?;
    Ok(snap)
}

fn transfer_phase(
    vault_dir: &Path,
    snap: &Captured,
    opts: &JobOptions<'_>,
    job_id: &str,
    progress: &dyn Progress,
) -> Result<(PointRecord, Vec<String>)> {
    let opened;
    let vault = match &opts.writer {
        Writer::Held(v) => *v,
        Writer::Open(o) => {
            opened = Vault::open_with(vault_dir, Access::Write, o)?;
            &opened
        }
    };
    let pool = thread_pool(opts.backup.threads)?;
    let mut terms = opts.terms.clone();
    terms.job = Some(job_id.to_string());
    let out = transfer(
        vault,
        snap,
        &opts.backup,
        &terms,
        &pool,
        progress,
        opts.stop,
    )?;
    // Copies a degraded writer left out: the point is on fewer copies than
    // the vault is meant to have.
    let mut degraded: Vec<String> = vault
        .copies()
        .unavailable()
        .iter()
        .filter(|u| u.role != coffre_vault_store::format::catalog_files::Role::Secondary)
        .map(|u| {
            format!(
                "{} copy {} was left out ({}); `coffre verify --read-data --repair` refills it",
                u.role,
                u.dir.display(),
                u.reason
            )
        })
        .collect();
    degraded.extend(out.warnings);
    Ok((out.point, degraded))
}

/// Asks a running job to cancel. Allowed only while its snapshot phase
/// runs.
pub fn cancel_job(vault_dir: &Path, keys: Option<&Arc<VaultKeys>>, id: &str) -> Result<JobRecord> {
    let store = JobStore::new(vault_dir, keys);
    let job = store.find(id)?;
    let snapshot_running = job
        .phase(SNAPSHOT)
        .is_some_and(|p| matches!(p.status, PhaseStatus::InProgress | PhaseStatus::NotStarted));
    if job.status.is_final() {
        return Err(EngineError::NotCancellable {
            id: job.id,
            reason: format!("it has ended ({})", job.status),
        });
    }
    if job.operation != Operation::Backup || !snapshot_running {
        return Err(EngineError::NotCancellable {
            id: job.id,
            reason: "only a backup in its snapshot phase can be cancelled; a transfer runs to its end (or is abandoned safely at shutdown)".into(),
        });
    }
    store.request_cancel(&job.id)?;
    Ok(job)
}

/// Records a backup job whose snapshot could not even start (the image is
/// missing or unreadable), so the failure shows in `coffre jobs`.
pub fn record_failed_backup(
    vault_dir: &Path,
    keys: Option<&Arc<VaultKeys>>,
    item: &str,
    error: &EngineError,
    clock: &dyn Clock,
) -> Result<JobRecord> {
    let store = JobStore::new(vault_dir, keys);
    let mut job = store.start(JobRecord::new(
        Operation::Backup,
        Some(item),
        &[SNAPSHOT, TRANSFER],
        now(clock),
    ))?;
    job.set_phase(
        now(clock),
        SNAPSHOT,
        PhaseStatus::Failed,
        Some(error.to_string()),
    )?;
    Ok(job.record().clone())
}
