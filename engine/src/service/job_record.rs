//! Recording operations other than backups (restore, delete, prune, gc)
//! as single-phase jobs. Recording is best effort: a vault on read-only
//! media still restores, and a failure to write a job record never fails
//! the operation it describes.

use std::path::Path;

use coffre_vault_store::jobs::{JobRecord, JobStore, Operation, PhaseStatus, RunningJob};
use jiff::Timestamp;

use crate::clock::Clock;

/// What an operation's result contributes to its job's statistics.
pub trait JobStats {
    /// Named counters.
    fn job_stats(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

impl JobStats for () {}

impl JobStats for coffre_vault_store::ItemRecord {}

impl JobStats for crate::prune::PruneReport {
    fn job_stats(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("points_expired", self.expired.len() as u64),
            ("points_kept", self.kept),
            ("items_purged", self.purged_items.len() as u64),
            ("snapshots_removed", self.snapshots_removed),
            ("jobs_removed", self.jobs_removed),
        ]
    }
}

impl JobStats for coffre_vault_store::maintenance::gc::GcReport {
    fn job_stats(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("chunks_removed", self.chunks_removed),
            ("bytes_unindexed", self.plan.unreferenced_bytes),
            ("segments_rewritten", self.segments_rewritten),
            ("segments_deleted", self.segments_deleted),
            ("bytes_copied", self.bytes_copied),
            ("bytes_punched", self.bytes_punched),
            ("stored_before", self.stored_before),
            ("stored_after", self.stored_after),
            ("duration_ms", self.duration_ms),
        ]
    }
}

impl JobStats for crate::access::live::LiveSummary {
    fn job_stats(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("bytes_streamed", self.streamed),
            ("export_requests", self.requests),
            ("export_bytes_read", self.bytes_read),
        ]
    }
}

impl JobStats for crate::restore::RestoreSummary {
    fn job_stats(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("image_size", self.image_size),
            ("bytes_written", self.bytes_written),
            ("duration_ms", self.duration_ms),
            ("repaired_copies", self.repaired_copies),
        ]
    }
}

/// Starts a one-phase job named after its operation (phase `phase`).
pub fn start(
    vault_dir: &Path,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    op: Operation,
    item: Option<&str>,
    phase: &str,
    now: Timestamp,
) -> Option<RunningJob> {
    let mut job = JobStore::new(vault_dir, keys)
        .start(JobRecord::new(op, item, &[phase], now))
        .map_err(|e| tracing::warn!(error = %e, %op, "job not recorded"))
        .ok()?;
    let _ = job.set_phase(now, phase, PhaseStatus::InProgress, None);
    Some(job)
}

/// Ends a job started with [`start`], from the operation's result (its
/// statistics included).
pub fn finish<T: JobStats, E: std::fmt::Display>(
    job: Option<RunningJob>,
    phase: &str,
    now: Timestamp,
    result: &Result<T, E>,
) {
    if let Some(mut j) = job {
        let (st, e) = match result {
            Ok(v) => {
                let stats = v.job_stats();
                let _ = j.update(now, |r| {
                    for (k, n) in stats {
                        r.stats.insert(k.into(), n.into());
                    }
                });
                (PhaseStatus::Completed, None)
            }
            Err(e) => (PhaseStatus::Failed, Some(e.to_string())),
        };
        let _ = j.set_phase(now, phase, st, e);
    }
}

/// Runs `f` as a one-phase job of `op` on no particular item.
pub fn run_as_job<T: JobStats, E: std::fmt::Display>(
    vault_dir: &Path,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    op: Operation,
    clock: &dyn Clock,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let phase = op.to_string();
    let job = start(vault_dir, keys, op, None, &phase, clock.now());
    let r = f();
    finish(job, &phase, clock.now(), &r);
    r
}

/// Records an operation that already ran as a one-phase job, but only if
/// it failed or `did_work` says it changed something: a scheduler pass
/// every minute must not leave thousands of empty records.
pub fn record_if_work<T: JobStats, E: std::fmt::Display>(
    vault_dir: &Path,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    op: Operation,
    started: Timestamp,
    ended: Timestamp,
    result: &Result<T, E>,
    did_work: impl FnOnce(&T) -> bool,
) {
    if matches!(result, Ok(v) if !did_work(v)) {
        return;
    }
    let phase = op.to_string();
    let job = start(vault_dir, keys, op, None, &phase, started);
    finish(job, &phase, ended, result);
}
