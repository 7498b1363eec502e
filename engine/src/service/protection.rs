//! Protected items: protecting an image under a policy, stopping
//! protection (keeping or soft-deleting the data), undeleting, and what
//! `item list|show` reports about each item.

use std::path::{Path, PathBuf};

use coffre_vault_store::jobs::{JobStore, Operation};
use coffre_vault_store::{IndexBatch, ItemRecord, Protection, Vault};
use jiff::{Timestamp, ToSpan};
use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::policies;
use crate::registry::{Registry, RegistryEntry, identity_of};
use crate::retention::{Tier, expiry};
use crate::schedule::{latest_slot_at_or_before, next_slot_after};

/// Days soft-deleted data stays recoverable.
pub const SOFT_DELETE_DAYS: i64 = 14;

/// What [`protect`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ProtectOutcome {
    /// The item as stored.
    pub item: ItemRecord,
    /// `protected` (new), `resumed`, `policy-changed` or `unchanged`.
    pub action: &'static str,
}

/// Canonical path of an image (the path itself if it cannot be resolved).
pub fn canonical(image: &Path) -> PathBuf {
    std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf())
}

/// Protects `image` as item `name` under `policy` (or changes the policy
/// of an item already protected, or resumes a stopped one).
pub fn protect(
    vault: &Vault,
    registry: &Registry,
    name: &str,
    policy: &str,
    image: &Path,
    now: Timestamp,
    hooks: Option<&coffre_vault_store::format::catalog::Hooks>,
) -> Result<ProtectOutcome> {
    coffre_vault_store::format::catalog::validate_item_name(name)
        .map_err(EngineError::InvalidItemName)?;
    let pol = policies::get(vault, policy)?;
    let tz = pol.tz()?;
    let text = image.to_string_lossy();
    if !image.exists()
        && !coffre_snapshotter::nbd::is_nbd_uri(&text)
        && !coffre_snapshotter::vm::is_qmp_source(&text)
        && !coffre_snapshotter::vm::libvirt::is_libvirt_source(&text)
    {
        return Err(coffre_snapshotter::SnapError::SourceNotFound {
            path: image.to_path_buf(),
        }
        .into());
    }
    let source = canonical(image);
    let identity = identity_of(&source);
    // Another item of this vault?
    for other in vault.index().items()? {
        let same = other.source == source || (identity.is_some() && other.identity == identity);
        if same && other.name != name {
            return Err(EngineError::AlreadyProtected {
                path: source,
                item: other.name,
                vault_name: vault.config().name.clone(),
                vault_dir: vault.dir().to_path_buf(),
            });
        }
    }
    // Another vault on this host?
    for e in registry.lookup(&source, identity)? {
        if e.vault_id == vault.config().vault_id || !still_protected(&e) {
            continue;
        }
        return Err(EngineError::AlreadyProtected {
            path: source,
            item: e.item,
            vault_name: e.vault_name,
            vault_dir: e.vault_dir,
        });
    }
    let existing = vault.item(name)?;
    let (item, action) = match existing {
        Some(i) if matches!(i.protection, Protection::SoftDeleted { .. }) => {
            return Err(EngineError::ItemState {
                item: name.into(),
                reason: "has its data soft-deleted; run `coffre undelete` first".into(),
            });
        }
        Some(i) if i.source != source => {
            return Err(EngineError::ItemState {
                item: name.into(),
                reason: format!(
                    "protects {}, not {}; choose another item name",
                    i.source.display(),
                    source.display()
                ),
            });
        }
        Some(mut i) => {
            let action = match (&i.protection, policies::name_of(&i)) {
                (Protection::Stopped { .. }, _) => "resumed",
                (_, p) if p != policy => "policy-changed",
                _ if hooks.is_some_and(|h| *h != i.hooks) => "hooks-changed",
                _ => "unchanged",
            };
            if let Some(h) = hooks {
                i.hooks = h.clone();
            }
            if action == "resumed" {
                i.last_slot = latest_slot_at_or_before(&pol, &tz, now);
            }
            i.protection = Protection::Protected;
            i.policy = Some(policy.into());
            i.identity = identity;
            (i, action)
        }
        None => (
            ItemRecord {
                name: name.into(),
                source: source.clone(),
                created: now,
                next_seq: 1,
                policy: Some(policy.into()),
                protection: Protection::Protected,
                last_slot: latest_slot_at_or_before(&pol, &tz, now),
                identity,
                hooks: hooks.cloned().unwrap_or_default(),
            },
            "protected",
        ),
    };
    if action != "unchanged" {
        let mut b = IndexBatch::default();
        b.put_item(item.clone());
        vault.commit_catalog(b, &[])?;
    }
    // The hooks this host runs are the ones set here: those given now,
    // else those set here before (never the catalog's, which another host
    // may have written).
    let host_hooks = match hooks {
        Some(h) => Some(h.clone()),
        None => registry
            .entry(&vault.config().vault_id, name)?
            .and_then(|e| e.hooks),
    }
    .filter(|h| h.is_set());
    registry.record(RegistryEntry {
        path: source,
        identity,
        vault_dir: canonical(vault.dir()),
        vault_id: vault.config().vault_id.clone(),
        vault_name: vault.config().name.clone(),
        item: name.into(),
        hooks: host_hooks,
    })?;
    Ok(ProtectOutcome { item, action })
}

/// True when the vault an entry names still holds that item.
fn still_protected(e: &RegistryEntry) -> bool {
    let Ok(v) = Vault::open(&e.vault_dir, coffre_vault_store::Access::ReadOnly) else {
        return false;
    };
    v.config().vault_id == e.vault_id && matches!(v.item(&e.item), Ok(Some(_)))
}

fn item_or_err(vault: &Vault, name: &str) -> Result<ItemRecord> {
    vault
        .item(name)?
        .ok_or_else(|| EngineError::ItemNotFound { item: name.into() })
}

/// Stops protection. Without `delete_data` the points are kept and never
/// expire; with it they are soft-deleted for [`SOFT_DELETE_DAYS`].
pub fn unprotect(
    vault: &Vault,
    name: &str,
    delete_data: bool,
    now: Timestamp,
) -> Result<ItemRecord> {
    let mut item = item_or_err(vault, name)?;
    item.protection = match (&item.protection, delete_data) {
        (Protection::SoftDeleted { .. }, _) => {
            return Err(EngineError::ItemState {
                item: name.into(),
                reason: "is already soft-deleted".into(),
            });
        }
        (Protection::Stopped { .. }, false) => {
            return Err(EngineError::ItemState {
                item: name.into(),
                reason: "is already unprotected (data retained)".into(),
            });
        }
        (_, false) => Protection::Stopped { since: now },
        (_, true) => Protection::SoftDeleted {
            at: now,
            purge_after: now
                .to_zoned(jiff::tz::TimeZone::UTC)
                .checked_add(SOFT_DELETE_DAYS.days())
                .map(|z| z.timestamp())
                .unwrap_or(Timestamp::MAX),
        },
    };
    let mut b = IndexBatch::default();
    b.put_item(item.clone());
    vault.commit_catalog(b, &[])?;
    Ok(item)
}

/// Brings a soft-deleted item back (protection stays stopped, data
/// retained).
pub fn undelete(vault: &Vault, name: &str, now: Timestamp) -> Result<ItemRecord> {
    let mut item = item_or_err(vault, name)?;
    match item.protection {
        Protection::SoftDeleted { purge_after, .. } if now < purge_after => {}
        Protection::SoftDeleted { purge_after, .. } => {
            return Err(EngineError::ItemState {
                item: name.into(),
                reason: format!("was soft-deleted and its recovery window ended at {purge_after}"),
            });
        }
        _ => {
            return Err(EngineError::ItemState {
                item: name.into(),
                reason: "is not soft-deleted".into(),
            });
        }
    }
    item.protection = Protection::Stopped { since: now };
    let mut b = IndexBatch::default();
    b.put_item(item.clone());
    vault.commit_catalog(b, &[])?;
    Ok(item)
}

/// Points of an item by tier.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierCounts {
    /// Instant-restore snapshots.
    pub snapshot: u64,
    /// Of those, points whose transfer has not completed (tier `Snapshot`).
    pub snapshot_only: u64,
    /// Vault points kept by the daily rule.
    pub daily: u64,
    /// … weekly rule.
    pub weekly: u64,
    /// … monthly rule.
    pub monthly: u64,
    /// … yearly rule.
    pub yearly: u64,
    /// On-demand points.
    pub on_demand: u64,
    /// Points no rule keeps (they go at the next prune, unless last).
    pub expiring: u64,
}

/// What `item list|show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ItemView {
    /// Item name.
    pub name: String,
    /// Image path.
    pub source: PathBuf,
    /// Policy.
    pub policy: String,
    /// `protected`, `stopped` or `soft_deleted`.
    pub protection: Protection,
    /// Last backup job: its id, status and end.
    pub last_backup: Option<LastBackup>,
    /// Next scheduled run (protected items only).
    pub next_run: Option<Timestamp>,
    /// Vault points.
    pub points: u64,
    /// Points by tier.
    pub tiers: TierCounts,
    /// Bytes the item's points added to the vault.
    pub stored_bytes: u64,
    /// Latest point time.
    pub latest_point: Option<Timestamp>,
    /// Bytes the item's snapshots use in the snapshot areas.
    pub snapshot_bytes: u64,
    /// Pre- and post-snapshot hooks.
    pub hooks: coffre_vault_store::format::catalog::Hooks,
}

/// The last backup job of an item.
#[derive(Debug, Clone, Serialize)]
pub struct LastBackup {
    /// Job id.
    pub job: String,
    /// Job status.
    pub status: coffre_vault_store::jobs::JobStatus,
    /// When it started.
    pub started: Timestamp,
}

/// Builds the view of one item.
pub fn item_view(vault: &Vault, item: &ItemRecord, now: Timestamp) -> Result<ItemView> {
    let jobs = JobStore::new(vault.dir(), vault.config().keys()).list()?;
    item_view_with(vault, item, &jobs, now)
}

/// Builds the views of every item (reading the job records once).
pub fn item_views(vault: &Vault, now: Timestamp) -> Result<Vec<ItemView>> {
    let jobs = JobStore::new(vault.dir(), vault.config().keys()).list()?;
    vault
        .index()
        .items()?
        .iter()
        .map(|i| item_view_with(vault, i, &jobs, now))
        .collect()
}

fn item_view_with(
    vault: &Vault,
    item: &ItemRecord,
    jobs: &[coffre_vault_store::jobs::JobRecord],
    now: Timestamp,
) -> Result<ItemView> {
    let policy_name = policies::name_of(item).to_string();
    let policy = policies::of_item(vault, item).ok();
    let points = vault.points(&item.name)?;
    let mut tiers = TierCounts::default();
    if let Some(p) = &policy {
        let tz = p.tz()?;
        for pt in &points {
            match expiry(p, &tz, pt).1 {
                Tier::Daily => tiers.daily += 1,
                Tier::Weekly => tiers.weekly += 1,
                Tier::Monthly => tiers.monthly += 1,
                Tier::Yearly => tiers.yearly += 1,
                Tier::OnDemand => tiers.on_demand += 1,
                Tier::None => tiers.expiring += 1,
            }
        }
    }
    let cfg = vault.config();
    let snaps = coffre_snapshotter::expiry::snapshots_of(
        vault.dir(),
        &cfg.vault_id,
        cfg.keys(),
        &item.name,
    );
    tiers.snapshot = snaps.len() as u64;
    tiers.snapshot_only = snaps
        .iter()
        .filter(|s| !points.iter().any(|p| p.id == s.meta.point))
        .count() as u64;
    let snapshot_bytes: u64 = coffre_snapshotter::area::Area::known_of(
        vault.dir(),
        &vault.config().vault_id,
        vault.config().keys(),
    )
    .iter()
    .map(|a| a.bytes_used(&item.name))
    .sum();
    let last_backup = jobs
        .iter()
        .rfind(|j| j.operation == Operation::Backup && j.item.as_deref() == Some(&item.name))
        .map(|j| LastBackup {
            job: j.id.clone(),
            status: j.status,
            started: j.started,
        });
    let next_run = match (&item.protection, &policy) {
        (Protection::Protected, Some(p)) => {
            let tz = p.tz()?;
            let after = item.last_slot.map_or(now, |l| l.max(now));
            // A slot already due but not yet run is the next run.
            crate::schedule::due_slot(p, &tz, item.last_slot, now)
                .or_else(|| next_slot_after(p, &tz, after))
        }
        _ => None,
    };
    Ok(ItemView {
        name: item.name.clone(),
        source: item.source.clone(),
        policy: policy_name,
        protection: item.protection.clone(),
        last_backup,
        next_run,
        points: points.len() as u64,
        tiers,
        stored_bytes: points.iter().map(|p| p.stats.stored_bytes).sum(),
        latest_point: points.last().map(|p| p.created),
        snapshot_bytes,
        hooks: item.hooks.clone(),
    })
}
