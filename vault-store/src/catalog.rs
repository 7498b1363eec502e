//! The vault catalog: protected items and their recovery points, as stored
//! in the index's `items` and `points` column families.
//!
//! Values are one version byte followed by JSON (see `FORMAT.md`, "Index").
//! JSON keeps the records readable with `ldb` and lets later issues add
//! fields without a migration; unknown fields are ignored on read.

use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::chunk_id::ChunkId;

/// Version byte of catalog values.
pub const CATALOG_VALUE_VERSION: u8 = 1;

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
}

/// Checks an item name: 1-128 characters of letters, digits, `.`, `_`,
/// `-`, starting with a letter or digit.
pub fn validate_item_name(name: &str) -> Result<(), String> {
    let rule =
        "1-128 characters: letters, digits, '.', '_' or '-', starting with a letter or digit";
    if name.is_empty() || name.len() > 128 {
        return Err(format!("item name {name:?} must be {rule}"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!("item name {name:?} must be {rule}"));
    }
    Ok(())
}

#[cfg(test)]
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
