//! Expiry: which points, items, snapshots and job records have had their
//! time, and removing them.
//!
//! Rules, in order:
//! - an item with stopped protection keeps everything;
//! - a soft-deleted item keeps everything until `purge_after`, then it is
//!   purged whole: points, item, snapshots, registry entry;
//! - a protected item loses the points whose expiry ([`crate::retention`])
//!   has passed, except that the item's newest point is kept when it would
//!   otherwise be left with none;
//! - instant-restore snapshots older than the policy's
//!   `instant_restore_days` go (`coffre_snapshotter::expiry`; a snapshot
//!   whose point never reached the vault is reported as the only copy),
//!   and so do final job records older than [`JOB_HISTORY_DAYS`]. The
//!   snapshots of an item whose snapshot phase is running are left for the
//!   next prune, so a capture never loses the snapshot it builds on.
//!
//! - a point a live restore holds ([`coffre_vault_store::holds`]: its VM's
//!   disk still reads the blocks not yet streamed from it) is kept, and so
//!   are its snapshots and, for a soft-deleted item, the whole item; the
//!   report lists each ([`HeldPoint`]). A hold that cannot be read makes
//!   prune fail before it deletes anything. A prune that deletes holds the
//!   vault's holds lock throughout, so a live restore starting meanwhile
//!   either sees the point gone or is seen.
//!
//! Removing points only drops references; [`coffre_vault_store::maintenance::gc`]
//! reclaims the chunks afterwards.

use std::path::PathBuf;

use coffre_snapshotter::area::Area;
use coffre_snapshotter::expiry::{ExpiredSnapshot, expire};
use coffre_vault_store::format::name::SafeName;
use coffre_vault_store::holds::{HoldRecord, HoldStore, HoldsLock};
use coffre_vault_store::jobs::{JobStore, Operation};
use coffre_vault_store::store::local::lock::NamedLock;
use coffre_vault_store::store::local::lock::{ItemPhase, item_phase_lock_path};
use coffre_vault_store::{ChunkId, IndexBatch, Protection, Vault};
use jiff::{Timestamp, ToSpan};
use serde::Serialize;

use crate::error::Result;
use crate::job_record;
use crate::policies;
use crate::registry::Registry;
use crate::retention::{Tier, expiry};

/// Folder of the hash-only snapshot files older coffre versions wrote.
pub const LEGACY_SNAPSHOTS_DIR: &str = "snapshots";

/// Days final job records are kept.
pub const JOB_HISTORY_DAYS: i64 = 90;

/// How long a prune waits for a live restore writing its hold.
const HOLDS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Something prune would have removed but kept, because a live restore
/// holds its point.
#[derive(Debug, Clone, Serialize)]
pub struct HeldPoint {
    /// Item.
    pub item: String,
    /// Point id.
    pub point: String,
    /// What was kept: `point`, `snapshot` or `item` (a purge put off).
    pub kept: &'static str,
    /// The live restore's target.
    pub target: PathBuf,
    /// When that live restore began.
    pub since: Timestamp,
}

impl HeldPoint {
    fn of(h: &HoldRecord, kept: &'static str) -> HeldPoint {
        HeldPoint {
            item: h.item.clone(),
            point: h.point.clone(),
            kept,
            target: h.target.clone(),
            since: h.started,
        }
    }
}

/// A point that expires.
#[derive(Debug, Clone, Serialize)]
pub struct ExpiredPoint {
    /// Item.
    pub item: String,
    /// Point id.
    pub id: String,
    /// When it was taken.
    pub created: Timestamp,
    /// The rule that kept it longest.
    pub tier: Tier,
    /// When that rule let it go (`None` for a purge).
    pub expired: Option<Timestamp>,
    #[serde(skip)]
    seq: u64,
    #[serde(skip)]
    root: ChunkId,
}

/// What a prune does or did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Points removed (or to remove, on a dry run).
    pub expired: Vec<ExpiredPoint>,
    /// Points kept.
    pub kept: u64,
    /// Items purged after their soft-delete window.
    pub purged_items: Vec<String>,
    /// Snapshots removed (or to remove).
    pub snapshots_removed: u64,
    /// The snapshots removed, each saying whether it was the point's only
    /// copy (its transfer never completed).
    pub snapshots: Vec<ExpiredSnapshot>,
    /// Bytes the snapshot areas gave back.
    pub snapshot_bytes_freed: u64,
    /// Job records removed.
    pub jobs_removed: u64,
    /// What was kept past its time because a live restore holds it.
    pub held: Vec<HeldPoint>,
    /// True for a dry run.
    pub dry_run: bool,
}

/// Works out (and unless `dry_run`, applies) expiry as of `now`.
pub fn prune(
    vault: &Vault,
    registry: &Registry,
    now: Timestamp,
    dry_run: bool,
) -> Result<PruneReport> {
    let mut report = PruneReport {
        dry_run,
        ..PruneReport::default()
    };
    // Held from reading the holds to the last deletion (a dry run deletes
    // nothing, so it does not wait).
    let _holds_lock = if dry_run {
        None
    } else {
        Some(HoldsLock::acquire(
            vault.dir(),
            HOLDS_WAIT,
            &format!("prune, pid {}", std::process::id()),
        )?)
    };
    let holds = HoldStore::new(vault.dir(), vault.config().keys()).list()?;
    let hold_of =
        |item: &str, point: &str| holds.iter().find(|h| h.item == item && h.point == point);
    let mut batch = IndexBatch::default();
    let mut purged = Vec::new();
    for item in vault.index().items()? {
        let points = vault.points(&item.name)?;
        let held: Vec<&HoldRecord> = points
            .iter()
            .filter_map(|p| hold_of(&item.name, &p.id))
            .collect();
        match item.protection {
            Protection::Stopped { .. } => {
                report.kept += points.len() as u64;
                continue;
            }
            Protection::SoftDeleted { purge_after, .. }
                if now >= purge_after && !held.is_empty() =>
            {
                // The purge waits until no live restore reads the item.
                report.kept += points.len() as u64;
                report
                    .held
                    .extend(held.iter().map(|h| HeldPoint::of(h, "item")));
                continue;
            }
            Protection::SoftDeleted { purge_after, .. } if now >= purge_after => {
                for p in &points {
                    batch.prune_point(&p.item, p.seq, &p.block_map);
                    report.expired.push(ExpiredPoint {
                        item: p.item.clone(),
                        id: p.id.clone(),
                        created: p.created,
                        tier: Tier::None,
                        expired: None,
                        seq: p.seq,
                        root: p.block_map,
                    });
                }
                batch.delete_item(&item.name);
                report.purged_items.push(item.name.clone());
                purged.push(item.name.clone());
                continue;
            }
            Protection::SoftDeleted { .. } => {
                report.kept += points.len() as u64;
                continue;
            }
            Protection::Protected => {}
        }
        let policy = match policies::of_item(vault, &item) {
            Ok(p) => p,
            Err(e) => {
                // One unreadable policy must not stop the other items.
                tracing::warn!(item = %item.name, error = %e, "cannot read the item's policy; its points are kept");
                report.kept += points.len() as u64;
                continue;
            }
        };
        let tz = policy.tz()?;
        let mut going: Vec<ExpiredPoint> = points
            .iter()
            .filter_map(|p| {
                let (until, tier) = expiry(&policy, &tz, p);
                (until <= now).then(|| ExpiredPoint {
                    item: p.item.clone(),
                    id: p.id.clone(),
                    created: p.created,
                    tier,
                    expired: Some(until),
                    seq: p.seq,
                    root: p.block_map,
                })
            })
            .collect();
        if !points.is_empty() && going.len() == points.len() {
            // Never leave an item without its last point.
            going.pop();
        }
        going.retain(|g| match hold_of(&g.item, &g.id) {
            Some(h) => {
                report.held.push(HeldPoint::of(h, "point"));
                false
            }
            None => true,
        });
        report.kept += (points.len() - going.len()) as u64;
        for g in &going {
            batch.prune_point(&g.item, g.seq, &g.root);
        }
        report.expired.extend(going);
    }
    if !dry_run && !batch.is_empty() {
        let roots: Vec<ChunkId> = report.expired.iter().map(|e| e.root).collect();
        vault.commit_catalog(batch, &roots)?;
    }
    if !dry_run {
        for name in &purged {
            // A purge is a delete job of its own, per item.
            let job = job_record::start(
                vault.dir(),
                vault.config().keys(),
                Operation::Delete,
                Some(name),
                "purge",
                now,
            );
            // A name read from the vault becomes a folder only through the
            // validated type: `/home/x` or `../x` never reaches
            // `remove_dir_all`.
            match SafeName::new("item", name) {
                Ok(safe) => {
                    for area in
                        Area::known_of(vault.dir(), &vault.config().vault_id, vault.config().keys())
                    {
                        remove_dir(area.item_dir(&safe));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "purge: not removing the snapshot folders of an item whose name cannot be a folder (`coffre verify` reports it)");
                }
            }
            for phase in [ItemPhase::Snapshot, ItemPhase::Transfer] {
                let _ = std::fs::remove_file(item_phase_lock_path(vault.dir(), name, phase));
            }
            let r = registry.forget(&vault.config().vault_id, name);
            job_record::finish(job, "purge", now, &r);
            r?;
        }
    }
    expire_snapshots(vault, now, dry_run, &holds, &mut report)?;
    report.jobs_removed = expire_jobs(vault, now, dry_run)?;
    Ok(report)
}

fn remove_dir(p: PathBuf) {
    if let Err(e) = std::fs::remove_dir_all(&p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %p.display(), error = %e, "cannot remove snapshot folder");
    }
}

/// Expires snapshots older than their item's instant-restore days, in
/// every area of the vault.
fn expire_snapshots(
    vault: &Vault,
    now: Timestamp,
    dry_run: bool,
    holds: &[HoldRecord],
    report: &mut PruneReport,
) -> Result<()> {
    let jobs = JobStore::new(vault.dir(), vault.config().keys());
    let running = |job: &str| jobs.load(job).is_ok_and(|j| !j.status.is_final());
    let areas = Area::known_of(vault.dir(), &vault.config().vault_id, vault.config().keys());
    // Hash-only snapshot files of format-2 vaults hold no data.
    let legacy = vault.dir().join(LEGACY_SNAPSHOTS_DIR);
    if legacy.exists() {
        report.snapshots_removed += 1;
        if !dry_run {
            remove_dir(legacy);
        }
    }
    for item in vault.index().items()? {
        let safe = match SafeName::new("item", &item.name) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "skipping the snapshots of an item whose name cannot be a folder (`coffre verify` reports it)");
                continue;
            }
        };
        let days = policies::of_item(vault, &item)
            .map(|p| p.instant_restore_days)
            .unwrap_or(2);
        let cutoff = now
            .checked_sub((i64::from(days) * 24).hours())
            .unwrap_or(Timestamp::MIN);
        // A running capture builds on the item's snapshots: leave them.
        let lock_path = item_phase_lock_path(vault.dir(), &item.name, ItemPhase::Snapshot);
        let Ok(_lock) = NamedLock::try_acquire(&lock_path, "prune")? else {
            tracing::info!(item = %item.name, "snapshot phase running; its snapshots expire at the next prune");
            continue;
        };
        let points: std::collections::HashSet<String> = vault
            .points(&item.name)?
            .into_iter()
            .map(|p| p.id)
            .collect();
        let in_vault = |p: &str| points.contains(p);
        let hold_of = |p: &str| holds.iter().find(|h| h.item == item.name && h.point == p);
        let held = |p: &str| hold_of(p).is_some();
        for area in &areas {
            let r = expire(
                &area.item_dir(&safe),
                cutoff,
                &in_vault,
                &running,
                &held,
                dry_run,
                vault.config().keys(),
            )?;
            for p in &r.held {
                if let Some(h) = hold_of(p) {
                    report.held.push(HeldPoint::of(h, "snapshot"));
                }
            }
            report.snapshots_removed += r.expired.len() as u64 + r.leftovers_removed;
            report.snapshot_bytes_freed += r.bytes_freed;
            for s in &r.expired {
                if s.only_copy {
                    tracing::warn!(item = %s.item, point = %s.point, "expired snapshot was the point's only copy (its transfer never completed)");
                }
            }
            report.snapshots.extend(r.expired);
        }
    }
    Ok(())
}

fn expire_jobs(vault: &Vault, now: Timestamp, dry_run: bool) -> Result<u64> {
    let store = JobStore::new(vault.dir(), vault.config().keys());
    let cutoff = now
        .checked_sub((JOB_HISTORY_DAYS * 24).hours())
        .unwrap_or(Timestamp::MIN);
    let mut removed = 0;
    for j in store.list()? {
        if j.status.is_final() && j.ended.unwrap_or(j.started) < cutoff {
            removed += 1;
            if !dry_run {
                store.remove(&j.id)?;
            }
        }
    }
    Ok(removed)
}
