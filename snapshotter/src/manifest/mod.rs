//! Snapshot manifests (`AREA/ITEM/JOB.snap`): what one capture holds.
//!
//! A manifest names its point, item, job, source image and consistency
//! level, and says how the point's bytes are kept:
//! - **chunks** (the fallback path): one entry per block, in block order:
//!   the block's BLAKE3 id (all zeros for a hole or an all-zero block) and
//!   where its record (the vault's chunk record format) lies in a pack of
//!   the same area (`pack.rs`);
//! - **clone** (the reflink path): no entries; the point is the clone file
//!   named in the metadata.
//!
//! Layout (`FORMAT.md`, "Snapshot manifest"): a 64-byte header, frames of
//! at most 1,024 entries of 48 bytes each with a CRC-32, a JSON metadata
//! block with its own CRC-32 (last, because the consistency level is known
//! only once the post-snapshot hook has run), and a 32-byte trailer with
//! the entry total, the bytes the capture added and the metadata length.
//! Written to a temporary name and renamed once complete; streamed both
//! ways so memory stays flat for any image. No length field is trusted:
//! each is bounded before it is used.
//!
//! In an encrypted vault a manifest is **sealed** (version
//! [`SNAP_VERSION_SEALED`]): the header and trailer stay in clear (sizes
//! and times), each frame's entries and the metadata are sealed with the
//! catalog key, bound to the header's bytes, the manifest's name
//! (`ITEM/JOB.snap`) and the frame's index (the metadata to the entry
//! total and stored bytes too), so no frame or metadata moves between
//! manifests or places unnoticed ([`sealing`]). A sealed manifest in a
//! plain vault, or a plain one in an encrypted vault, is refused.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

mod codec;
mod reader;
pub mod sealing;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests;
mod writer;

use std::path::PathBuf;

use coffre_vault_store::ChunkId;
use serde::{Deserialize, Serialize};

use coffre_vault_store::format::level::Level;

pub use reader::{
    FrameRef, FrameSource, SnapReader, check, fuzz_entry, fuzz_frames_entry, summary,
};
pub use writer::SnapWriter;

/// Magic. Frozen.
pub const SNAP_MAGIC: [u8; 8] = *b"CFSNAP\0\0";
/// Trailer magic. Frozen.
pub const SNAP_END: [u8; 8] = *b"CFSNEND\0";
/// Format version (1 was the hash-only snapshot file of vault format 2).
pub const SNAP_VERSION: u32 = 2;
/// Format version of a sealed manifest (an encrypted vault's).
pub const SNAP_VERSION_SEALED: u32 = 3;
/// Header length.
pub const SNAP_HEADER_LEN: usize = 64;
/// Trailer length.
pub const SNAP_TRAILER_LEN: usize = 32;
/// Bytes per entry.
pub const ENTRY_LEN: usize = 48;
/// Most entries per frame.
pub const FRAME_ENTRIES: usize = 1024;
/// Largest metadata block.
pub const MAX_META_LEN: usize = 64 << 10;
/// Entry flag: the block's bytes decode as a block-map node.
pub const FLAG_NODE: u16 = 1;

/// How a snapshot keeps the point's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapKind {
    /// Records in packs of the area, one entry per block.
    Chunks,
    /// A reflink clone of the image.
    Clone,
}

impl SnapKind {
    fn code(self) -> u8 {
        match self {
            SnapKind::Chunks => 1,
            SnapKind::Clone => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(SnapKind::Chunks),
            2 => Some(SnapKind::Clone),
            _ => None,
        }
    }
}

/// The fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapHeader {
    /// How the bytes are kept.
    pub kind: SnapKind,
    /// Block size of the entries.
    pub block_size: u32,
    /// Image size in bytes.
    pub image_size: u64,
    /// Number of entries in the file (0 for a clone).
    pub blocks: u64,
    /// Capture instant: Unix seconds.
    pub created_s: i64,
    /// Capture instant: nanoseconds within the second.
    pub created_ns: u32,
}

/// The metadata block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapMeta {
    /// Item name.
    pub item: String,
    /// Point id.
    pub point: String,
    /// Job that captured it.
    pub job: String,
    /// The image captured.
    pub source: PathBuf,
    /// Consistency level.
    pub level: Level,
    /// Packs the entries refer to (file names in the item's folder),
    /// indexed by an entry's `pack`.
    #[serde(default)]
    pub packs: Vec<String>,
    /// The clone file (clone snapshots).
    #[serde(default)]
    pub clone: Option<String>,
    /// What went less than perfectly (a failed hook, retries).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// How a changed-block source was used by this capture, and its
    /// generation (the next capture checks its source against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt: Option<coffre_vault_store::CbtRecord>,
}

impl SnapMeta {
    /// Checks the names the metadata holds: the item, point and job, each
    /// pack and the clone ([`coffre_vault_store::format::name::check_name`]).
    pub fn check_names(
        &self,
    ) -> std::result::Result<(), coffre_vault_store::format::name::NameError> {
        use coffre_vault_store::format::name::check_name;
        check_name("item", &self.item)?;
        check_name("point", &self.point)?;
        check_name("job", &self.job)?;
        for p in &self.packs {
            check_name("pack", p)?;
        }
        if let Some(c) = &self.clone {
            check_name("clone", c)?;
        }
        Ok(())
    }
}

/// Where a block's record lies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackLoc {
    /// Index into [`SnapMeta::packs`].
    pub pack: u16,
    /// [`FLAG_NODE`] or 0.
    pub flags: u16,
    /// Record length.
    pub len: u32,
    /// Record offset in the pack.
    pub offset: u64,
}

impl PackLoc {
    /// Where the record ends (decoded entries never overflow; saturates
    /// for hand-made ones).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// One block of a chunk snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapEntry {
    /// Block id; `None` for a zero block (no record).
    pub id: Option<ChunkId>,
    /// Its record.
    pub loc: PackLoc,
}

/// What the trailer records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapTrailer {
    /// Entries written.
    pub entries: u64,
    /// Bytes the capture added to the area (new records, or the clone).
    pub stored_bytes: u64,
}
