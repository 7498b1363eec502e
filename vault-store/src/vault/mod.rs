//! An open vault: its config, its lock, its index and its segments, and the
//! write session through which every new chunk and point enters it.
//!
//! The write order (see `FORMAT.md`, "Crash invariants"):
//! 1. records are appended to a segment;
//! 2. the segment is fsynced (and its directory, if the file is new);
//! 3. the chunk locations, the new committed segment length and any
//!    catalog change are committed in one synced RocksDB `WriteBatch`;
//! 4. only then does the caller report success.
//!
//! Bytes past a segment's committed length are leftovers of a session that
//! never reached step 3; the next writer cuts them off ([`Vault::open`] with
//! [`Access::Write`]), and a failed session cuts off its own on drop.
//!
//! Every commit also carries the reference-count changes (see [`crate::index::refs`])
//! of what it adds or removes, so GC's bookkeeping never lags the catalog.
//! Readers hold a shared *reader lease* for as long as the vault is open;
//! GC gives space back to the filesystem only while it can take the lease
//! exclusively, so a running restore never loses a segment under it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::copies::segment::SegmentWriter;
use crate::copies::{Copies, StoreWrap};
use crate::error::{Result, StoreError};
use crate::format::catalog::{ItemRecord, PointRecord};
use crate::format::catalog_files::{self, COPY_FILE, Role};
use crate::format::chunk_id::ChunkId;
use crate::format::config::VaultConfig;
use crate::format::record::{self, HEADER_LEN, RecordDecoder, RecordHeader};
use crate::format::remote::Remote;
use crate::format::segment::{
    SEGMENT_HEADER_LEN, SEGMENT_TARGET_LEN, SEGMENTS_DIR, encode_header, parse_segment_file_name,
    segment_file_name, segment_name,
};
use crate::index::refs::{NodeChildren, RefCounter, node_refs};
use crate::index::{ChunkKind, ChunkLocation, INDEX_DIR, Index, IndexBatch, SegmentInfo};
use crate::store::local::lock::{ReaderLease, VaultLock};

mod adopt;
mod commit;
mod open;
mod read;
mod recovery;
mod session;
mod shared;
mod state;
#[cfg(test)]
pub(crate) mod tests;

pub use state::copy_role;

/// How a vault is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Readers: list, restore, verify. Any number, alongside a writer.
    ReadOnly,
    /// The single writer: takes the vault lock.
    Write,
}

/// How to open a vault beyond its access.
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// How long a writer waits for the lock.
    pub wait: Duration,
    /// A writer goes on without a replica that is missing or unwritable
    /// (with a warning) instead of failing.
    pub degraded_ok: bool,
    /// Wraps each copy's store (fault injection in tests).
    pub wrap: Option<StoreWrap>,
    /// Allows writing to a directory that is a replica or the secondary
    /// opened on its own (only the index rebuild does).
    pub allow_copy_write: bool,
    /// Opens a shared vault's cache as it is, without first importing what
    /// other hosts committed (only the rebuild, which is that import).
    pub skip_refresh: bool,
    /// Lifetime of a shared vault's writer leases (default
    /// [`crate::lease::DEFAULT_LEASE_TTL`]).
    pub lease_ttl: Option<Duration>,
    /// Time for leases (default: the system clock).
    pub clock: Option<crate::lease::Clock>,
    /// Unlocks an encrypted vault (without it, opening one is
    /// [`StoreError::KeyNeeded`]).
    pub unlock: Option<std::sync::Arc<dyn crate::crypto::Unlock>>,
}

/// An open vault.
pub struct Vault {
    dir: PathBuf,
    config: VaultConfig,
    index: Index,
    copies: Copies,
    lock: Option<VaultLock>,
    _lease: Option<ReaderLease>,
    /// Set when a sync failed: the kernel may have dropped dirty pages, so
    /// this handle accepts no more writes until the vault is reopened.
    poisoned: AtomicBool,
    /// True once the config says `adopted_packs` (version 5).
    adopted_packs: AtomicBool,
    /// A shared vault in object storage: this host's pointer (its segment
    /// namespace). `None` for a local vault.
    remote: Option<Remote>,
    /// Writer leases of a shared vault: lifetime and clock.
    lease_ttl: Duration,
    clock: crate::lease::Clock,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("dir", &self.dir)
            .field("name", &self.config.name)
            .finish()
    }
}

impl Vault {
    /// Children of a committed node.
    fn children(&self, id: &ChunkId, kind: ChunkKind) -> Result<Vec<ChunkId>> {
        match node_refs(&self.read_chunk(id)?) {
            Some((k, children)) if k == kind => Ok(children),
            _ => Err(StoreError::CorruptIndex {
                path: self.index.path().to_path_buf(),
                what: "reference count",
                reason: format!("chunk {id} is not a {kind:?} node"),
            }),
        }
    }

    /// The copies of the vault.
    pub fn copies(&self) -> &Copies {
        &self.copies
    }

    /// Records repaired on the fly (read from another copy and rewritten)
    /// since the vault was opened.
    pub fn read_repairs(&self) -> u64 {
        self.copies.repairs()
    }

    /// The segment ids this handle may write: this host's namespace in a
    /// shared vault, all of them in a local one.
    pub fn segment_namespace(&self) -> std::ops::Range<u64> {
        self.remote.as_ref().map_or(0..u64::MAX, |r| r.namespace())
    }

    /// This host's pointer, for a shared vault in object storage.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// The vault directory (for a shared vault: this host's cache).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The vault settings.
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// The index (catalog queries).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// True when the vault was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.lock.is_some()
    }

    /// Path of segment `id` in the primary copy.
    pub fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(SEGMENTS_DIR).join(segment_file_name(id))
    }

    /// The item called `name`.
    pub fn item(&self, name: &str) -> Result<Option<ItemRecord>> {
        self.index.item(name)
    }

    /// Points of `item`, oldest first.
    pub fn points(&self, item: &str) -> Result<Vec<PointRecord>> {
        self.index.points(item)
    }

    /// True when chunk `id` is committed in the vault.
    pub fn contains_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.index.chunk(id)?.is_some())
    }

    /// Total committed bytes in all live segments (their size on disk,
    /// before GC punches holes).
    pub fn stored_bytes(&self) -> Result<u64> {
        Ok(self.index.segments()?.values().sum())
    }

    /// Bytes of records the index still references.
    pub fn live_bytes(&self) -> Result<u64> {
        Ok(self
            .index
            .segment_infos()?
            .values()
            .map(SegmentInfo::live)
            .sum())
    }

    /// Forgets cached segment file handles (after GC removed files).
    pub fn forget_segment_handles(&self) {
        self.copies.forget();
    }

    /// True when a sync failed on this handle (no more writes).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Relaxed)
    }
}

/// Reusable buffers for reading many chunks on one thread.
#[derive(Default)]
pub struct ChunkBuf {
    record: Vec<u8>,
    plain: Vec<u8>,
    decoder: RecordDecoder,
}

impl ChunkBuf {
    /// The plaintext of the chunk read last.
    pub fn plain(&self) -> &[u8] {
        &self.plain
    }

    /// The plaintext of the chunk read last, handed over whole (no copy);
    /// the next read allocates its own.
    pub fn take_plain(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.plain)
    }

    /// The record (header and stored bytes) read last.
    pub fn record_bytes(&self) -> &[u8] {
        &self.record
    }
}

/// Appends chunks to the vault and commits them durably with catalog
/// changes. Dropping a session without [`WriteSession::commit`] discards
/// its uncommitted bytes.
pub struct WriteSession<'v> {
    vault: &'v Vault,
    writer: Option<SegmentWriter>,
    writer_is_new: bool,
    writer_committed: u64,
    fresh_segment: bool,
    pending: HashMap<ChunkId, ChunkLocation>,
    /// Kind of each pending chunk; chunks moved by GC are absent (their
    /// counts do not change).
    kinds: HashMap<ChunkId, ChunkKind>,
    /// Children of pending nodes (committed nodes are read back instead).
    pending_children: HashMap<ChunkId, Vec<ChunkId>>,
    add_roots: Vec<ChunkId>,
    drop_roots: Vec<ChunkId>,
    pending_batch_bytes: u64,
    appended_bytes: u64,
    poisoned: bool,
    finished: bool,
    /// An index commit failed: whether the index holds its batch is not
    /// known, so the drop leaves every byte for the next writer's open,
    /// which asks the index.
    index_unknown: bool,
    /// Chunks no copy holds intact (`damaged`): stored again when a
    /// backup produces them.
    heal: std::collections::HashSet<ChunkId>,
    /// Healed chunks and their old, damaged location.
    healed: Vec<(ChunkId, ChunkLocation)>,
    /// A shared vault's writer lease (see [`crate::lease`]).
    lease: Option<crate::lease::WriterLease>,
    /// Snapshot packs this session hard-linked in as segments.
    adopted: Vec<Adopted>,
}

/// A snapshot pack hard-linked into the vault as a segment by
/// [`WriteSession::adopt_pack`]: its records are indexed where they are,
/// so the transfer writes none of them again.
struct Adopted {
    id: u64,
    len: u64,
    /// True once an index commit recorded the segment.
    committed: bool,
    /// The records indexed from it: offset and length.
    used: Vec<(u64, u32)>,
}

impl WriteSession<'_> {}

/// Node children from the session's pending nodes, else from the vault.
struct VaultNodes<'a> {
    vault: &'a Vault,
    pending: &'a HashMap<ChunkId, Vec<ChunkId>>,
}

impl NodeChildren for VaultNodes<'_> {
    fn children(&self, id: &ChunkId, kind: ChunkKind) -> Result<Vec<ChunkId>> {
        match self.pending.get(id) {
            Some(c) => Ok(c.clone()),
            None => self.vault.children(id, kind),
        }
    }
}
