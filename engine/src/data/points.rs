//! An item's recovery points across both tiers, and choosing one:
//! `latest`, an id, or an unambiguous id prefix.
//!
//! A point exists as soon as its snapshot phase completes. It lives in the
//! snapshot area, in the vault, or both, which is its **tier**:
//! - `Snapshot`: the transfer has not completed (still running, skipped
//!   under the decoupling rule, or failed); the snapshot is the only copy
//!   and the point disappears when the snapshot expires;
//! - `SnapshotAndVault`: transferred, and its snapshot is still kept for
//!   instant restore;
//! - `Vault`: its snapshot has expired.

use coffre_snapshotter::expiry::{SnapInfo, snapshots_of};
use coffre_vault_store::format::level::Level;
use coffre_vault_store::{PointRecord, Vault};
use jiff::Timestamp;
use serde::Serialize;

use crate::error::{EngineError, Result};

/// Shortest id prefix accepted.
pub const MIN_PREFIX: usize = 4;

/// Where a point's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Tier {
    /// Only in the snapshot area.
    Snapshot,
    /// In the snapshot area and in the vault.
    SnapshotAndVault,
    /// Only in the vault.
    Vault,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Snapshot => "Snapshot",
            Tier::SnapshotAndVault => "SnapshotAndVault",
            Tier::Vault => "Vault",
        })
    }
}

/// One recovery point, in whichever tiers hold it.
#[derive(Debug, Clone)]
pub struct PointEntry {
    /// Point id.
    pub id: String,
    /// Item.
    pub item: String,
    /// The snapshot's instant.
    pub created: Timestamp,
    /// Image size.
    pub image_size: u64,
    /// Block size.
    pub block_size: u32,
    /// Tier.
    pub tier: Tier,
    /// Consistency level, when known.
    pub level: Option<Level>,
    /// The vault's record, when transferred.
    pub vault: Option<PointRecord>,
    /// The snapshot, while kept.
    pub snapshot: Option<SnapInfo>,
}

/// Every point of `item`, oldest first.
pub fn list_points(vault: &Vault, item: &str) -> Result<Vec<PointEntry>> {
    if vault.item(item)?.is_none() {
        return Err(EngineError::ItemNotFound { item: item.into() });
    }
    let mut snaps = snapshots_of(
        vault.dir(),
        &vault.config().vault_id,
        vault.config().keys(),
        item,
    );
    let mut out: Vec<PointEntry> = vault
        .points(item)?
        .into_iter()
        .map(|p| {
            let snap = snaps
                .iter()
                .position(|s| s.meta.point == p.id)
                .map(|i| snaps.remove(i));
            PointEntry {
                id: p.id.clone(),
                item: p.item.clone(),
                created: p.created,
                image_size: p.image_size,
                block_size: p.block_size,
                tier: if snap.is_some() {
                    Tier::SnapshotAndVault
                } else {
                    Tier::Vault
                },
                level: p.level.or(snap.as_ref().map(|s| s.meta.level)),
                vault: Some(p),
                snapshot: snap,
            }
        })
        .collect();
    out.extend(snaps.into_iter().map(|s| PointEntry {
        id: s.meta.point.clone(),
        item: s.meta.item.clone(),
        created: s.created(),
        image_size: s.header.image_size,
        block_size: s.header.block_size,
        tier: Tier::Snapshot,
        level: Some(s.meta.level),
        vault: None,
        snapshot: Some(s),
    }));
    out.sort_by_key(|p| (p.created, p.vault.as_ref().map(|v| v.seq)));
    Ok(out)
}

/// Finds the point of `item` named by `selector` (`latest`, an id, or an
/// id prefix of at least four characters), in either tier.
pub fn select_point(vault: &Vault, item: &str, selector: &str) -> Result<PointEntry> {
    let mut points = list_points(vault, item)?;
    if points.is_empty() {
        return Err(EngineError::NoPoints { item: item.into() });
    }
    if selector == "latest" {
        return points
            .pop()
            .ok_or_else(|| EngineError::NoPoints { item: item.into() });
    }
    if let Some(i) = points.iter().position(|p| p.id == selector) {
        return Ok(points.swap_remove(i));
    }
    let not_found = || EngineError::PointNotFound {
        item: item.into(),
        point: selector.into(),
    };
    if selector.len() < MIN_PREFIX {
        return Err(not_found());
    }
    let mut matches = points.into_iter().filter(|p| p.id.starts_with(selector));
    match (matches.next(), matches.next()) {
        (Some(p), None) => Ok(p),
        (Some(_), Some(_)) => Err(EngineError::PointAmbiguous {
            item: item.into(),
            point: selector.into(),
        }),
        (None, _) => Err(not_found()),
    }
}
