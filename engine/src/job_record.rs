//! Recording operations other than backups (restore, delete, prune, gc)
//! as single-phase jobs. Recording is best effort: a vault on read-only
//! media still restores, and a failure to write a job record never fails
//! the operation it describes.

use std::path::Path;

use coffre_vault_store::jobs::{JobRecord, JobStore, Operation, PhaseStatus, RunningJob};
use jiff::Timestamp;

use crate::clock::Clock;

/// Starts a one-phase job named after its operation (phase `phase`).
pub fn start(
    vault_dir: &Path,
    op: Operation,
    item: Option<&str>,
    phase: &str,
    now: Timestamp,
) -> Option<RunningJob> {
    let mut job = JobStore::new(vault_dir)
        .start(JobRecord::new(op, item, &[phase], now))
        .map_err(|e| tracing::warn!(error = %e, %op, "job not recorded"))
        .ok()?;
    let _ = job.set_phase(now, phase, PhaseStatus::InProgress, None);
    Some(job)
}

/// Ends a job started with [`start`], from the operation's result.
pub fn finish<T, E: std::fmt::Display>(
    job: Option<RunningJob>,
    phase: &str,
    now: Timestamp,
    result: &Result<T, E>,
) {
    if let Some(mut j) = job {
        let (st, e) = match result {
            Ok(_) => (PhaseStatus::Completed, None),
            Err(e) => (PhaseStatus::Failed, Some(e.to_string())),
        };
        let _ = j.set_phase(now, phase, st, e);
    }
}

/// Runs `f` as a one-phase job of `op` on no particular item.
pub fn run_as_job<T, E: std::fmt::Display>(
    vault_dir: &Path,
    op: Operation,
    clock: &dyn Clock,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let phase = op.to_string();
    let job = start(vault_dir, op, None, &phase, clock.now());
    let r = f();
    finish(job, &phase, clock.now(), &r);
    r
}

/// Records an operation that already ran as a one-phase job, but only if
/// it failed or `did_work` says it changed something: a scheduler pass
/// every minute must not leave thousands of empty records.
pub fn record_if_work<T, E: std::fmt::Display>(
    vault_dir: &Path,
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
    let job = start(vault_dir, op, None, &phase, started);
    finish(job, &phase, ended, result);
}
