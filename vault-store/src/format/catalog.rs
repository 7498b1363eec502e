//! The vault catalog: protected items and their recovery points, as stored
//! in the index's `items` and `points` column families.
//!
//! Values are one version byte followed by JSON (see `FORMAT.md`, "Index").
//! JSON keeps the records readable with `ldb` and lets later issues add
//! fields without a migration; unknown fields are ignored on read.

use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::format::chunk_id::ChunkId;

/// Version byte of catalog values.
pub const CATALOG_VALUE_VERSION: u8 = 1;

/// Protection state of an item (Azure's "protection status").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Protection {
    /// Backed up on its policy's schedule; points expire by the policy.
    #[default]
    Protected,
    /// "Stop protection, retain data": no backups, and no point expires.
    Stopped {
        /// When protection stopped.
        since: Timestamp,
    },
    /// "Stop protection, delete data": points are kept, unexpiring, until
    /// `purge_after`, then purged; `undelete` before then brings the item
    /// back to [`Protection::Stopped`].
    SoftDeleted {
        /// When the data was deleted.
        at: Timestamp,
        /// When the purge may happen.
        purge_after: Timestamp,
    },
}

/// Identity of the file or device an item protects, so that the same
/// image is recognised under another path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    /// `st_dev` of a file, or 0 for a block device.
    pub dev: u64,
    /// `st_ino` of a file, or `st_rdev` of a block device.
    pub ino: u64,
}

/// A protected item: one disk image backed up into the vault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRecord {
    /// Item name (unique in the vault).
    pub name: String,
    /// Absolute path of the image the item protects.
    pub source: PathBuf,
    /// When the item was first backed up.
    pub created: Timestamp,
    /// Sequence number the next point of this item gets.
    pub next_seq: u64,
    /// Policy the item is protected under (`None` for items written
    /// before policies existed: treated as `DefaultPolicy`).
    #[serde(default)]
    pub policy: Option<String>,
    /// Protection state.
    #[serde(default)]
    pub protection: Protection,
    /// The last schedule slot the scheduler has dealt with.
    #[serde(default)]
    pub last_slot: Option<Timestamp>,
    /// Identity of the image file or device.
    #[serde(default)]
    pub identity: Option<SourceIdentity>,
    /// Pre- and post-snapshot hooks.
    #[serde(default, skip_serializing_if = "Hooks::is_unset")]
    pub hooks: Hooks,
}

/// An item's pre- and post-snapshot hooks: argvs, never shell lines (run
/// by the snapshotter's `hooks` module).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    /// Runs before the capture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre: Vec<String>,
    /// Runs after the capture (also after a failed one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post: Vec<String>,
    /// Seconds each may run.
    #[serde(default = "default_hook_timeout")]
    pub timeout_secs: u64,
}

/// Default seconds a hook may run.
pub const DEFAULT_HOOK_TIMEOUT_SECS: u64 = 60;

fn default_hook_timeout() -> u64 {
    DEFAULT_HOOK_TIMEOUT_SECS
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            pre: Vec::new(),
            post: Vec::new(),
            timeout_secs: DEFAULT_HOOK_TIMEOUT_SECS,
        }
    }
}

impl Hooks {
    /// True when any hook is set.
    pub fn is_set(&self) -> bool {
        !self.pre.is_empty() || !self.post.is_empty()
    }

    fn is_unset(&self) -> bool {
        !self.is_set()
    }
}

/// Statistics of the backup that produced a point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointStats {
    /// Bytes read from the image (holes are not read).
    pub bytes_read: u64,
    /// Number of blocks in the image.
    pub blocks_total: u64,
    /// Blocks whose content differs from the previous point.
    pub blocks_changed: u64,
    /// Blocks that are holes or all zero.
    pub blocks_zero: u64,
    /// Chunks this point added to the vault (data and block-map nodes).
    pub new_chunks: u64,
    /// Bytes this point added to the segments.
    pub stored_bytes: u64,
    /// Wall time of the backup in milliseconds.
    pub duration_ms: u64,
}

/// One recovery point of an item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRecord {
    /// Short unique id shown to users.
    pub id: String,
    /// Item the point belongs to.
    pub item: String,
    /// Per-item sequence number (orders points).
    pub seq: u64,
    /// When the point was taken.
    pub created: Timestamp,
    /// Image size in bytes.
    pub image_size: u64,
    /// Block size the block map uses.
    pub block_size: u32,
    /// Root node of the block map.
    pub block_map: ChunkId,
    /// Backup statistics.
    pub stats: PointStats,
    /// True for a point taken on the policy's schedule: the policy's
    /// retention rules apply to it.
    #[serde(default)]
    pub scheduled: bool,
    /// On-demand points: kept until this instant whatever the policy says.
    #[serde(default)]
    pub retain_until: Option<Timestamp>,
    /// Job that produced the point.
    #[serde(default)]
    pub job: Option<String>,
    /// Consistency level of the capture (absent for points taken before
    /// snapshots had levels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<crate::format::level::Level>,
    /// How a changed-block source was used (absent: none was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt: Option<CbtRecord>,
}

/// What a changed-block source said and how far it was trusted, recorded
/// with the snapshot and the point: the next backup checks its source's
/// generation against `generation`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtRecord {
    /// `list`, `bitmap` or `reflink`.
    pub source: String,
    /// The source's generation at this capture (a bitmap's name, a list's
    /// `generation`, the clone a reflink diff starts from next time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// True when only the source's dirty blocks (and the sample) were
    /// read; false when the run fell back to a full scan.
    pub used: bool,
    /// Why the run fell back to a full scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Blocks the source called dirty.
    pub dirty_blocks: u64,
    /// Bytes the source called dirty (its own extents).
    pub dirty_bytes: u64,
    /// Clean blocks re-read and compared with the parent point.
    pub sampled: u64,
    /// Sampled blocks that were not what the parent point holds.
    pub mismatches: u64,
}

/// Checks an item name given by a user: the rule of every name that
/// becomes a path ([`crate::format::name::check_name`]).
pub fn validate_item_name(name: &str) -> Result<(), String> {
    crate::format::name::check_name("item", name)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl ItemRecord {
    /// Checks the names a decoded item holds.
    pub fn check_names(&self) -> Result<(), crate::format::name::NameError> {
        crate::format::name::check_name("item", &self.name)?;
        Ok(())
    }
}

impl PointRecord {
    /// Checks the names a decoded point holds (its item, id and job).
    /// (Its block size is checked where it is used: `coffre verify`
    /// reports a bad one, a restore refuses it.)
    pub fn check_names(&self) -> Result<(), crate::format::name::NameError> {
        crate::format::name::check_name("item", &self.item)?;
        crate::format::name::check_name("point", &self.id)?;
        if let Some(job) = &self.job {
            crate::format::name::check_name("job", job)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn item_names() {
        for ok in ["a", "vm-01.disk_0", "9lives"] {
            validate_item_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", "a\0b", &"x".repeat(129)] {
            assert!(validate_item_name(bad).is_err(), "{bad:?}");
        }
    }
}
