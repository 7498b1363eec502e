//! One scheduler pass (`coffre run-due`, and each tick of `coffre
//! daemon`): the backups that came due by each item's policy, then prune
//! (points, snapshots, job history), then GC. Prune and GC leave a job
//! record when they changed something or failed.
//!
//! Only the items this host protects are backed up, with the hooks set
//! on this host (the host registry), whatever the vault's catalog lists.
//!
//! The disks of a libvirt domain (items whose source is
//! `libvirt:///DOMAIN/TARGET?connect=URI`, from `coffre protect --domain`)
//! that are due together are backed up together, at one instant
//! (`crate::domain_backup`), after the other items.
//!
//! A slot is marked as dealt with once its job ended, whatever the job's
//! status: like Azure, a failed scheduled backup is not retried before the
//! next slot (run `coffre backup` for an on-demand one). A pass that dies
//! mid-job leaves the slot unmarked, so the next pass runs it.

use std::collections::BTreeMap;
use std::path::Path;

use coffre_snapshotter::SnapError;
use coffre_snapshotter::vm::is_qmp_source;
use coffre_snapshotter::vm::libvirt::DiskSource;
use coffre_snapshotter::vm::live::{QmpDrive, QmpTarget};
use coffre_vault_store::format::catalog::Hooks;
use coffre_vault_store::jobs::{JobStatus, Operation};
use coffre_vault_store::maintenance::gc::{self, GcReport};
use coffre_vault_store::{IndexBatch, Protection, Vault};
use jiff::Timestamp;
use serde::Serialize;

use crate::backup::{BackupOptions, PointTerms};
use crate::backup_job::{JobOptions, Source, Writer, record_failed_backup, run_source_job};
use crate::clock::Clock;
use crate::domain_backup::{DiskRun, DomainOptions, DomainPlan, backup_domain};
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

/// A due disk of a libvirt domain.
struct DueDisk {
    item: String,
    slot: Timestamp,
    /// The disk's target (`vda`).
    target: String,
    /// The hooks this host runs for the item, and the warning of hooks it
    /// does not run.
    hooks: (Hooks, Option<String>),
}

/// The due disks of one domain.
type DueDisks = Vec<DueDisk>;

/// Records that `slot` of `item` was dealt with, unless the pass is
/// stopping (an abandoned transfer leaves the slot to the next pass).
fn mark_slot(vault: &Vault, item: &str, slot: Timestamp, opts: &PassOptions<'_>) -> Result<()> {
    if !(opts.stop)()
        && let Some(mut fresh) = vault.item(item)?
    {
        fresh.last_slot = Some(slot);
        let mut b = IndexBatch::default();
        b.put_item(fresh);
        vault.commit_catalog(b, &[])?;
    }
    Ok(())
}

/// A scheduled backup of `item` that could not run, for `reason`: its
/// failed job is recorded and its slot marked dealt with.
fn failed_run(
    vault: &Vault,
    clock: &dyn Clock,
    opts: &PassOptions<'_>,
    item: &str,
    slot: Timestamp,
    reason: String,
) -> Result<DueRun> {
    let e = EngineError::ItemState {
        item: item.to_string(),
        reason,
    };
    let job = record_failed_backup(vault.dir(), vault.config().keys(), item, &e, clock)?;
    mark_slot(vault, item, slot, opts)?;
    Ok(DueRun {
        item: item.to_string(),
        slot,
        job: job.id,
        status: job.status,
        point: None,
        error: Some(e.to_string()),
    })
}

/// Backs up the due disks of one libvirt domain at one instant
/// (`crate::domain_backup`); a domain that cannot be reached fails each
/// disk's job with the reason.
fn run_domain(
    vault: &Vault,
    clock: &dyn Clock,
    opts: &PassOptions<'_>,
    connect: &str,
    domain: &str,
    due: DueDisks,
) -> Result<Vec<DueRun>> {
    let mut runs = Vec::new();
    let plan = DomainPlan::inspect(Some(connect), domain);
    // Only disks whose item is the domain's `NAME-TARGET` and that the
    // domain still has are backed up; the others fail with the reason.
    let mut only = Vec::new();
    let mut refused = Vec::new();
    for DueDisk {
        item, slot, target, ..
    } in &due
    {
        let why = match &plan {
            Err(e) => Some(e.to_string()),
            Ok(p) if p.item(target) != *item => Some(format!(
                "its source is disk {target} of domain {domain}, which coffre backs up as item {}",
                p.item(target)
            )),
            Ok(p) if !p.xml.disks.iter().any(|d| d.target == *target) => {
                Some(format!("domain {domain} has no disk {target} any more"))
            }
            Ok(_) => None,
        };
        match why {
            Some(w) => refused.push((item.clone(), *slot, w)),
            None => only.push(target.clone()),
        }
    }
    for (item, slot, why) in refused {
        let run = failed_run(
            vault,
            clock,
            opts,
            &item,
            slot,
            format!("cannot be backed up: {why}"),
        )?;
        tracing::warn!(item = %item, job = %run.job, error = %run.error.as_deref().unwrap_or_default(), "scheduled backup did not complete");
        runs.push(run);
    }
    let Ok(plan) = plan else {
        return Ok(runs);
    };
    if only.is_empty() {
        return Ok(runs);
    }
    let slot_of = |item: &str| due.iter().find(|d| d.item == item).map(|d| d.slot);
    let none = |_: &str| -> (
        Box<dyn crate::progress::Progress>,
        Box<dyn crate::progress::Progress>,
    ) { (Box::new(NoProgress), Box::new(NoProgress)) };
    let done = backup_domain(
        vault.dir(),
        &plan,
        &DomainOptions {
            only: Some(only.clone()),
            threads: opts.threads,
            rate_limit: opts.rate_limit,
            allow_clone: true,
            snapshot_root: opts.snapshot_root.map(Into::into),
            sampling: Default::default(),
            terms: PointTerms {
                scheduled: true,
                ..PointTerms::default()
            },
            writer: Writer::Held(vault),
            stop: opts.stop,
            hooks: due
                .iter()
                .map(|d| (d.item.clone(), d.hooks.clone()))
                .collect(),
        },
        clock,
        &none,
    );
    // Each due disk is reported once: with its job when it has one, else
    // as a failed job recorded here (the domain's error, or its own).
    let (outcomes, missing) = match done {
        Ok(out) => {
            let missing = without_outcome(&only, &out.disks, out.unrecorded);
            (out.disks, missing)
        }
        Err(e) => {
            let why = e.to_string();
            (
                Vec::new(),
                only.iter().map(|t| (t.clone(), why.clone())).collect(),
            )
        }
    };
    for d in outcomes {
        let slot = slot_of(&d.item).unwrap_or_else(|| clock.now());
        let run = DueRun {
            item: d.item.clone(),
            slot,
            job: d.outcome.job.id.clone(),
            status: d.outcome.job.status,
            point: d.outcome.point.map(|p| p.id),
            error: d.outcome.error.map(|e| e.to_string()),
        };
        match &run.error {
            Some(e) => {
                tracing::warn!(item = %run.item, job = %run.job, domain, error = %e, "scheduled backup did not complete")
            }
            None => {
                tracing::info!(item = %run.item, job = %run.job, domain, status = %run.status, "scheduled backup ended")
            }
        }
        mark_slot(vault, &d.item, slot, opts)?;
        runs.push(run);
    }
    for (target, why) in missing {
        let item = plan.item(&target);
        let slot = slot_of(&item).unwrap_or_else(|| clock.now());
        let run = failed_run(
            vault,
            clock,
            opts,
            &item,
            slot,
            format!("the backup of domain {domain} failed: {why}"),
        )?;
        tracing::warn!(item = %item, job = %run.job, domain, error = %run.error.as_deref().unwrap_or_default(), "scheduled backup did not complete");
        runs.push(run);
    }
    Ok(runs)
}

/// The due disks (`only`) a domain backup gave no job, each with why: its
/// own error when not even a failed job of it could be recorded, else
/// that the backup ended before it. A disk with a job (committed or
/// failed) is never among them.
fn without_outcome(
    only: &[String],
    done: &[DiskRun],
    unrecorded: Vec<(String, EngineError)>,
) -> Vec<(String, String)> {
    only.iter()
        .filter(|t| !done.iter().any(|d| &d.disk == *t))
        .map(|t| {
            let why = unrecorded.iter().find(|(u, _)| u == t).map_or_else(
                || "the domain's backup ended before this disk".to_string(),
                |(_, e)| e.to_string(),
            );
            (t.clone(), why)
        })
        .collect()
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
    // Due disks of libvirt domains, by (connection, domain): (item, slot,
    // disk target).
    let mut domains: BTreeMap<(String, String), DueDisks> = BTreeMap::new();
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
        // A disk of a libvirt domain: the domain's due disks are backed up
        // together, at one instant, after this loop.
        let text = item.source.to_string_lossy().into_owned();
        if coffre_snapshotter::vm::libvirt::is_libvirt_source(&text) {
            match DiskSource::parse(&text) {
                Ok(d) => domains
                    .entry((d.connect.clone(), d.domain.clone()))
                    .or_default()
                    .push(DueDisk {
                        item: item.name.clone(),
                        slot,
                        target: d.target,
                        hooks: (hooks.clone(), hook_warning.clone()),
                    }),
                Err(why) => backups.push(failed_run(
                    vault,
                    clock,
                    opts,
                    &item.name,
                    slot,
                    format!("records a libvirt source coffre cannot read: {why}"),
                )?),
            }
            continue;
        }
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
            labels: Default::default(),
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
                let job = record_failed_backup(
                    vault.dir(),
                    vault.config().keys(),
                    &item.name,
                    &e,
                    clock,
                )?;
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
        mark_slot(vault, &item.name, slot, opts)?;
        backups.push(run);
    }
    for ((connect, domain), due) in domains {
        if (opts.stop)() {
            break;
        }
        backups.extend(run_domain(vault, clock, opts, &connect, &domain, due)?);
    }
    let started = clock.now();
    let pruned = prune(vault, registry, now, false);
    record_if_work(
        vault.dir(),
        vault.config().keys(),
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
        vault.config().keys(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup_job::JobOutcome;
    use coffre_vault_store::jobs::JobRecord;

    fn ran(disk: &str) -> DiskRun {
        DiskRun {
            disk: disk.into(),
            item: format!("web1-{disk}"),
            source: format!("libvirt:///web1/{disk}?connect=qemu:///system").into(),
            read_from: String::new(),
            incremental_from: None,
            full_read: None,
            outcome: JobOutcome {
                job: JobRecord::new(
                    Operation::Backup,
                    Some(&format!("web1-{disk}")),
                    &["snapshot"],
                    Timestamp::now(),
                ),
                point: None,
                error: None,
            },
        }
    }

    #[test]
    fn libvirt_only_disks_without_a_job_are_recorded_as_failed() {
        let only: Vec<String> = ["vda", "vdb", "vdc", "vdd"].map(String::from).into();
        // vda committed, vdc's job failed: both have their job; vdb could
        // not even record one; vdd was never reached.
        let done = [ran("vda"), ran("vdc")];
        let unrecorded = vec![(
            "vdb".to_string(),
            EngineError::ItemState {
                item: "web1-vdb".into(),
                reason: "the job store is gone".into(),
            },
        )];
        let missing = without_outcome(&only, &done, unrecorded);
        let targets: Vec<&str> = missing.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(targets, ["vdb", "vdd"]);
        assert!(
            missing[0].1.contains("the job store is gone"),
            "{missing:?}"
        );
        assert!(missing[1].1.contains("ended before"), "{missing:?}");
        assert!(without_outcome(&only[..1], &done, Vec::new()).is_empty());
    }
}
