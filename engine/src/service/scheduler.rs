//! One scheduler pass (`coffre run-due`, and each tick of `coffre
//! daemon`): the backups that came due by each item's policy, then prune
//! (points, snapshots, job history), then GC. Prune and GC leave a job
//! record when they changed something or failed.
//!
//! Only the items this host protects are backed up, with the hooks set
//! on this host (the host registry), whatever the vault's catalog lists.
//!
//! A slot is marked as dealt with once its job ended, whatever the job's
//! status: like Azure, a failed scheduled backup is not retried before the
//! next slot (run `coffre backup` for an on-demand one). A pass that dies
//! mid-job leaves the slot unmarked, so the next pass runs it.

use std::path::Path;

use coffre_snapshotter::SnapError;
use coffre_snapshotter::vm::is_qmp_source;
use coffre_snapshotter::vm::live::{QmpDrive, QmpTarget};
use coffre_vault_store::jobs::{JobStatus, Operation};
use coffre_vault_store::maintenance::gc::{self, GcReport};
use coffre_vault_store::{IndexBatch, Protection, Vault};
use jiff::Timestamp;
use serde::Serialize;

use crate::backup::{BackupOptions, PointTerms};
use crate::backup_job::{JobOptions, Source, Writer, record_failed_backup, run_source_job};
use crate::clock::Clock;
use crate::error::{EngineError, Result};
use crate::job_record::record_if_work;
use crate::policies;
use crate::progress::NoProgress;
use crate::prune::{PruneReport, prune};
use crate::registry::Registry;
use crate::schedule::due_slot;

/// Settings of a pass.
pub struct PassOptions<'a> {
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// Read rate limit for backups.
    pub rate_limit: Option<u64>,
    /// Polled by transfers: `true` abandons them (shutdown).
    pub stop: &'a (dyn Fn() -> bool + Sync),
    /// Where default snapshot areas go instead of each filesystem's
    /// `.coffre-snapshots` (`COFFRE_SNAPSHOT_ROOT`).
    pub snapshot_root: Option<&'a std::path::Path>,
}

/// One backup the pass ran.
#[derive(Debug, Clone, Serialize)]
pub struct DueRun {
    /// Item.
    pub item: String,
    /// The slot it ran for.
    pub slot: Timestamp,
    /// Job id.
    pub job: String,
    /// Job status.
    pub status: JobStatus,
    /// Point recorded.
    pub point: Option<String>,
    /// Error, if a phase failed.
    pub error: Option<String>,
}

/// What a pass did.
#[derive(Debug, Clone, Serialize)]
pub struct PassReport {
    /// The pass's instant.
    pub now: Timestamp,
    /// Backups run.
    pub backups: Vec<DueRun>,
    /// Expiry.
    pub prune: PruneReport,
    /// Garbage collection.
    pub gc: GcReport,
}

/// Runs one pass on a vault open for writing.
pub fn run_pass(
    vault: &Vault,
    registry: &Registry,
    clock: &dyn Clock,
    opts: &PassOptions<'_>,
) -> Result<PassReport> {
    let now = clock.now();
    let mut backups = Vec::new();
    let items = vault.index().items()?;
    let vault_id = vault.config().vault_id.clone();
    // Only the items this host protects: a shared vault's catalog lists
    // every host's, and nothing the catalog says makes this host read an
    // image or run a command (README, "Trust").
    let here = registry
        .protected_here(&vault_id, &items)
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the host registry: no scheduled backup runs");
            Vec::new()
        });
    for item in items {
        if item.protection != Protection::Protected || (opts.stop)() {
            continue;
        }
        if !here.contains(&item.name) {
            tracing::info!(item = %item.name, source = %item.source.display(), "not protected on this host (no entry in its registry for this image): no scheduled backup here");
            continue;
        }
        let (hooks, hook_warning) = registry.host_hooks(&vault_id, &item);
        if let Some(w) = &hook_warning {
            tracing::warn!(item = %item.name, "{w}");
        }
        let policy = match policies::of_item(vault, &item) {
            Ok(p) => p,
            Err(e) => {
                // One unreadable policy must not stop the other items.
                tracing::warn!(item = %item.name, error = %e, "cannot read the item's policy; no backup runs for it");
                continue;
            }
        };
        let tz = policy.tz()?;
        let Some(slot) = due_slot(&policy, &tz, item.last_slot, now) else {
            continue;
        };
        tracing::info!(item = %item.name, %slot, "scheduled backup due");
        let job_options = || JobOptions {
            backup: BackupOptions {
                item: item.name.clone(),
                source_path: item.source.clone(),
                threads: opts.threads,
                rate_limit: opts.rate_limit,
                hooks: hooks.clone(),
                notes: hook_warning.iter().cloned().collect(),
                allow_clone: true,
                snapshot_root: opts.snapshot_root.map(Into::into),
                hint: None,
                sampling: Default::default(),
            },
            terms: PointTerms {
                scheduled: true,
                ..PointTerms::default()
            },
            writer: Writer::Held(vault),
            stop: opts.stop,
        };
        let run = match open_scheduled(&item.source, &vault_id) {
            Ok(mut source) => {
                let out = run_source_job(
                    vault.dir(),
                    &mut source,
                    job_options(),
                    clock,
                    &NoProgress,
                    &NoProgress,
                )?;
                DueRun {
                    item: item.name.clone(),
                    slot,
                    job: out.job.id.clone(),
                    status: out.job.status,
                    point: out.point.map(|p| p.id),
                    error: out.error.map(|e| e.to_string()),
                }
            }
            Err(e) => {
                let e = EngineError::from(e);
                let job = record_failed_backup(vault.dir(), &item.name, &e, clock)?;
                DueRun {
                    item: item.name.clone(),
                    slot,
                    job: job.id,
                    status: job.status,
                    point: None,
                    error: Some(e.to_string()),
                }
            }
        };
        match &run.error {
            Some(e) => {
                tracing::warn!(item = %run.item, job = %run.job, error = %e, "scheduled backup did not complete")
            }
            None => {
                tracing::info!(item = %run.item, job = %run.job, status = %run.status, "scheduled backup ended")
            }
        }
        // An abandoned transfer (shutdown) leaves the slot to the next pass.
        if !(opts.stop)()
            && let Some(mut fresh) = vault.item(&item.name)?
        {
            fresh.last_slot = Some(slot);
            let mut b = IndexBatch::default();
            b.put_item(fresh);
            vault.commit_catalog(b, &[])?;
        }
        backups.push(run);
    }
    let started = clock.now();
    let pruned = prune(vault, registry, now, false);
    record_if_work(
        vault.dir(),
        Operation::Prune,
        started,
        clock.now(),
        &pruned,
        |r| !r.expired.is_empty() || r.snapshots_removed > 0 || r.jobs_removed > 0,
    );
    let started = clock.now();
    // A shared vault's GC waits for every host's writers; it is run by
    // one host (`coffre gc`, from cron), not by each daemon's pass.
    let collected = if vault.remote().is_some() {
        Ok(GcReport::default())
    } else {
        gc::run(vault)
    };
    record_if_work(
        vault.dir(),
        Operation::Gc,
        started,
        clock.now(),
        &collected,
        |r| r.chunks_removed > 0 || r.segments_deleted > 0 || r.bytes_punched > 0,
    );
    let (prune, gc) = (pruned?, collected?);
    Ok(PassReport {
        now,
        backups,
        prune,
        gc,
    })
}

/// Opens the source an item records: an image file, block device or NBD
/// export, or a running VM's drive (`qmp+unix://`), whose point in time
/// the job takes through QEMU.
fn open_scheduled(source: &Path, vault_id: &str) -> std::result::Result<Source, SnapError> {
    let text = source.to_string_lossy();
    if is_qmp_source(&text) {
        let target = QmpTarget::parse(&text).map_err(|reason| SnapError::Qmp {
            socket: source.to_path_buf(),
            reason: format!("the item's source is not a drive of a running VM: {reason}"),
        })?;
        return Ok(Source::Live(Box::new(QmpDrive::new(target, vault_id))));
    }
    Ok(Source::Image(
        coffre_snapshotter::nbd::open_any(source, None)?.0,
    ))
}
