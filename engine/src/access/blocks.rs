//! Where a point's blocks come from when it is read in place: the
//! snapshot tier ([`SnapshotAt`]) or the vault (the point's block map, its
//! leaves kept once read). A block is always decoded whole and checked
//! like a restore checks it; a snapshot record that fails is read from
//! the vault instead when the point is there too, and a vault chunk that
//! fails on one copy is read (and repaired) from another by the vault's
//! own read path. A block no copy holds intact is an error naming the
//! point and the block, never zeros.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use coffre_snapshotter::pack::RecordBuf;
use coffre_snapshotter::read_at::{BlockAt, SnapshotAt};
use coffre_vault_store::format::blockmap::{Entry, LEAF_ENTRIES};
use coffre_vault_store::format::record::RecordDecoder;
use coffre_vault_store::{ChunkBuf, ChunkId, StoreError, Vault};

use crate::data::record_fetch::{Fetcher, Place, decode_fetched_owned};
use crate::error::{EngineError, Result};
use crate::points::PointEntry;
use crate::reader::BlockMapReader;

/// Leaves of a vault point's block map kept at most (1,024 blocks each:
/// 64 GiB of image in 64 KiB blocks, about 4 MiB of memory).
const LEAVES_KEPT: usize = 128;

/// Segment files one record fetcher keeps open at most.
const SEGMENTS_KEPT: usize = 64;

/// Which tier serves the reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Served {
    /// The instant-restore snapshot.
    Snapshot,
    /// The vault (or the copy that was opened: a replica, the secondary).
    Vault,
}

impl Served {
    /// The tier's name, as JSON and messages say it.
    pub fn name(self) -> &'static str {
        match self {
            Served::Snapshot => "snapshot",
            Served::Vault => "vault",
        }
    }
}

/// What a block is, without decoding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Zeros.
    Zero,
    /// Stored bytes.
    Data,
}

/// Scratch space of one decoding thread.
#[derive(Default)]
pub struct Scratch {
    chunk: ChunkBuf,
    record: RecordBuf,
}

/// The blocks of one point.
pub struct Blocks<'v> {
    vault: &'v Vault,
    point: PointEntry,
    snapshot: Option<SnapshotAt>,
    map: Option<Leaves<'v>>,
}

/// A vault point's block map, its leaves read on demand.
struct Leaves<'v> {
    reader: Mutex<BlockMapReader<'v>>,
    kept: Mutex<HashMap<usize, Arc<Vec<Entry>>>>,
}

impl<'v> Blocks<'v> {
    /// The blocks of `point`, from the snapshot when `from` says so (or
    /// when it is `None` and the point still has one), else the vault.
    pub fn open(vault: &'v Vault, point: &PointEntry, from: Option<Served>) -> Result<Self> {
        let not_in = |tier| EngineError::PointNotInTier {
            item: point.item.clone(),
            point: point.id.clone(),
            tier,
        };
        let use_snapshot = match (from, &point.snapshot, &point.vault) {
            (Some(Served::Snapshot), None, _) => return Err(not_in("snapshot")),
            (Some(Served::Vault), _, None) => return Err(not_in("vault")),
            (None, None, None) => return Err(not_in("vault")),
            (Some(Served::Snapshot), Some(_), _) | (None, Some(_), _) => true,
            (Some(Served::Vault), _, Some(_)) | (None, None, Some(_)) => false,
        };
        if coffre_vault_store::format::config::validate_block_size(point.block_size).is_err() {
            return Err(EngineError::DamagedBlockMap {
                item: point.item.clone(),
                point: point.id.clone(),
                reason: format!(
                    "the point records a block size of {} bytes; a vault's is a power of two from 64 KiB to 4 MiB",
                    point.block_size
                ),
            });
        }
        let snapshot = match (&point.snapshot, use_snapshot) {
            (Some(s), true) => {
                let snap = SnapshotAt::open(&s.manifest, vault.config().keys())?;
                let h = snap.header();
                if h.block_size != point.block_size || h.image_size != point.image_size {
                    return Err(EngineError::DamagedBlockMap {
                        item: point.item.clone(),
                        point: point.id.clone(),
                        reason: format!(
                            "its snapshot {} holds {} bytes in {}-byte blocks, the point {} bytes in {}-byte blocks",
                            snap.manifest().display(),
                            h.image_size,
                            h.block_size,
                            point.image_size,
                            point.block_size
                        ),
                    });
                }
                Some(snap)
            }
            _ => None,
        };
        // The vault serves, or stands behind the snapshot's records.
        let map = match &point.vault {
            Some(p) => Some(Leaves {
                reader: Mutex::new(BlockMapReader::open(vault, p)?),
                kept: Mutex::default(),
            }),
            None => None,
        };
        Ok(Blocks {
            vault,
            point: point.clone(),
            snapshot,
            map,
        })
    }

    /// The tier that serves.
    pub fn served(&self) -> Served {
        if self.snapshot.is_some() {
            Served::Snapshot
        } else {
            Served::Vault
        }
    }

    /// The point.
    pub fn point(&self) -> &PointEntry {
        &self.point
    }

    /// Number of blocks.
    pub fn count(&self) -> u64 {
        self.point
            .image_size
            .div_ceil(u64::from(self.point.block_size))
    }

    /// Bytes of block `b` (the last may be short).
    pub fn len_of(&self, b: u64) -> usize {
        let bs = u64::from(self.point.block_size);
        bs.min(self.point.image_size.saturating_sub(b * bs)) as usize
    }

    /// The vault's entry of block `b`.
    fn entry(&self, b: u64) -> Result<Entry> {
        let Some(map) = &self.map else {
            return Ok(None);
        };
        let k = (b / LEAF_ENTRIES as u64) as usize;
        let within = (b % LEAF_ENTRIES as u64) as usize;
        let kept = map
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&k)
            .cloned();
        let leaf = match kept {
            Some(l) => l,
            None => {
                let leaf = Arc::new(
                    map.reader
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .leaf(k)?
                        .to_vec(),
                );
                let mut kept = map.kept.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() >= LEAVES_KEPT {
                    kept.clear();
                }
                kept.insert(k, leaf.clone());
                leaf
            }
        };
        leaf.get(within)
            .copied()
            .ok_or_else(|| EngineError::DamagedBlockMap {
                item: self.point.item.clone(),
                point: self.point.id.clone(),
                reason: format!("no entry for block {b}"),
            })
    }

    /// What block `b` is.
    pub fn kind(&self, b: u64) -> Result<Kind> {
        match &self.snapshot {
            Some(s) => Ok(match s.block(b)? {
                Some(BlockAt::Zero) => Kind::Zero,
                Some(_) => Kind::Data,
                None => return Err(self.past_end(b)),
            }),
            None => Ok(self.entry(b)?.map_or(Kind::Zero, |_| Kind::Data)),
        }
    }

    fn past_end(&self, b: u64) -> EngineError {
        EngineError::DamagedBlockMap {
            item: self.point.item.clone(),
            point: self.point.id.clone(),
            reason: format!(
                "block {b} is past the image's {} bytes",
                self.point.image_size
            ),
        }
    }

    /// Decodes block `b` into `out` (its whole length).
    pub fn decode(&self, b: u64, scratch: &mut Scratch, out: &mut Vec<u8>) -> Result<()> {
        if let Some(s) = &self.snapshot {
            let first = match s.read_block(b, &mut scratch.record, out) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            // (A frame of the manifest that no longer reads names no
            // chunk: nothing to look for in the vault.)
            let Ok(Some(BlockAt::Chunk(id))) = s.block(b) else {
                return Err(first.into());
            };
            // The vault stands in only when it holds the same chunk for
            // the block: tiers that disagree mean one is damaged.
            if self.map.is_none() || self.entry(b)? != Some(id) {
                return Err(self.damaged(b, id, first.to_string()));
            }
            tracing::warn!(item = %self.point.item, point = %self.point.id, block = b, error = %first,
                "a snapshot record is damaged; the block is read from the vault");
        }
        let id = match self.entry(b)? {
            None => {
                out.clear();
                out.resize(self.len_of(b), 0);
                return Ok(());
            }
            Some(id) => id,
        };
        let damaged = |source: StoreError| EngineError::DamagedBlock {
            item: self.point.item.clone(),
            point: self.point.id.clone(),
            block: b,
            chunk: id,
            source: Box::new(source),
        };
        let loc = self
            .vault
            .index()
            .chunk(&id)
            .map_err(damaged)?
            .ok_or_else(|| damaged(StoreError::ChunkMissing { id }))?;
        self.vault
            .read_chunk_into(&id, &loc, &mut scratch.chunk)
            .map_err(damaged)?;
        let plain = scratch.chunk.plain();
        if plain.len() != self.len_of(b) {
            return Err(self.damaged(
                b,
                id,
                format!(
                    "it holds {} bytes, expected {}",
                    plain.len(),
                    self.len_of(b)
                ),
            ));
        }
        // The decoded bytes themselves (no copy; see `SnapshotAt::read_block`).
        *out = scratch.chunk.take_plain();
        Ok(())
    }

    /// Where block `b`'s record lies in the tier that serves, for reading
    /// records ahead in runs: its chunk and place (a pack's number, or a
    /// segment's). `None` for a zero block, a clone's, or a chunk the
    /// vault's index does not place (the ordinary read reports that). The
    /// place is only where to look: whatever is read there is checked
    /// when it is decoded.
    pub(crate) fn place(&self, b: u64) -> Result<Option<(ChunkId, Place)>> {
        if let Some(s) = &self.snapshot {
            return Ok(s.record_place(b)?.map(|(id, l)| (id, Place::in_pack(&l))));
        }
        let Some(id) = self.entry(b)? else {
            return Ok(None);
        };
        let loc = self.vault.index().chunk(&id).ok().flatten();
        Ok(loc.map(|l| (id, Place::in_segment(&l))))
    }

    /// A reader of the serving tier's records in runs, holding at most
    /// `cap` bytes at once; `None` when none of its files opens again.
    pub(crate) fn fetcher(&self, cap: usize) -> Option<Fetcher<'v>> {
        match &self.snapshot {
            Some(s) => Fetcher::of_packs(cap, s.pack_files()),
            // An export lives for hours; a large vault has thousands of
            // segments.
            None => Some(Fetcher::of_segments(cap, self.vault).keeping_files(SEGMENTS_KEPT)),
        }
    }

    /// Block `b` decoded from its record fetched ahead (chunk `id`), when
    /// the record passes every check a read makes (header, id, length,
    /// CRC, authentication, BLAKE3) and holds the block's length; `None`
    /// otherwise, and the block is read the ordinary way ([`Self::decode`]),
    /// which reports damage and repairs copies.
    pub(crate) fn decode_fetched(
        &self,
        b: u64,
        id: &ChunkId,
        record: &[u8],
        decoder: &mut RecordDecoder,
    ) -> Option<Vec<u8>> {
        decode_fetched_owned(
            record,
            id,
            decoder,
            self.vault.config().keys(),
            self.len_of(b),
        )
    }

    fn damaged(&self, b: u64, id: ChunkId, reason: String) -> EngineError {
        EngineError::DamagedBlock {
            item: self.point.item.clone(),
            point: self.point.id.clone(),
            block: b,
            chunk: id,
            source: Box::new(StoreError::CorruptFile {
                path: std::path::PathBuf::from(format!("block {b}")),
                what: "block",
                reason,
            }),
        }
    }
}
