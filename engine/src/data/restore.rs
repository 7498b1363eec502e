//! Restore: a recovery point → an image, byte-identical.
//!
//! A point is read from its **snapshot** while it has one (instant
//! restore: no vault needed; a clone snapshot restored onto its own
//! filesystem is a reflink clone again, constant time) or else from the
//! **vault**. Groups of blocks are decoded and checked in parallel (crc32,
//! length, BLAKE3) while one thread writes the groups decoded before, one
//! write per run of blocks, and the target is fsynced once at the end. The
//! records of the group after are read meanwhile by a thread of their own,
//! in large runs, each in pieces read four at once (`data::record_fetch`:
//! from the page cache where it holds the file whole, else with
//! `O_DIRECT`), and decoded straight into the group;
//! in place the kernel is asked to read them ahead (`read_ahead`). Where
//! the image goes is [`restore_target`]'s
//! business: a new sparse file (temporary file, then rename), or an
//! existing file or block device replaced **in place**. A qcow2 image
//! (a new one, or a VM's qcow2 disk replaced) is written through a raw
//! scratch file that `qemu-img` converts ([`restore_qcow2`]).
//!
//! In place, the restore is a **delta**: each target block is read and
//! hashed first, and only blocks whose content differs from the point are
//! written; blocks that are zero in the point are punched (or discarded on
//! a block device) where they are not zero already. Rolling a disk back by
//! a day then writes about a day of change. Rerunning an interrupted
//! in-place restore finishes it.
//!
//! [`restore_target`]: crate::restore_target
//! [`restore_qcow2`]: crate::restore_qcow2

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use coffre_snapshotter::ImageSource;
use coffre_snapshotter::capture::is_zero;
use coffre_snapshotter::manifest::PackLoc;
use coffre_snapshotter::pack::RecordBuf;
use coffre_snapshotter::read::{SnapWindow, SnapshotBlocks};
use coffre_vault_store::format::blockmap::{Entry, block_count};
use coffre_vault_store::format::record::RecordDecoder;
use coffre_vault_store::index::ChunkLocation;
use coffre_vault_store::store::local::direct::{AlignedBuf, DIRECT_ALIGN};
use coffre_vault_store::store::local::durable::{start_writeback, sync_range};
use coffre_vault_store::{ChunkBuf, ChunkId, StoreError, Vault};
use rayon::prelude::*;
use serde::Serialize;

use crate::backup::thread_pool;
use crate::data::record_fetch::{Fetched, Fetcher, Place, decode_fetched};
use crate::error::{EngineError, Result};
use crate::per_thread::PerThread;
use crate::points::PointEntry;
use crate::progress::Progress;
use crate::reader::BlockMapReader;
use crate::restore_target::{DEFAULT_MODE, Target, TargetKind, unwritable};

/// Restore options.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Where to write the image.
    pub target: PathBuf,
    /// Replace an existing file (and, with `in_place`, allow overwriting).
    pub force: bool,
    /// Write into an existing file or block device, changed blocks only.
    pub in_place: bool,
    /// Mode of a new image file.
    pub mode: u32,
    /// Which tier to read the point from.
    pub from: RestoreFrom,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Write everything that can be read, fill the blocks whose chunk no
    /// copy holds intact with [`DAMAGED_MARKER`] (never zeros), and list
    /// them, instead of failing.
    pub allow_damaged: bool,
    /// Format of the image written. `None`: raw for a new file; in place,
    /// the target's own (a file that starts with the qcow2 magic is
    /// qcow2).
    pub format: Option<ImageFormat>,
}

/// Format of a restored image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// The point's bytes as they are (sparse).
    #[default]
    Raw,
    /// A qcow2 image written by `qemu-img` (see [`restore_qcow2`]).
    ///
    /// [`restore_qcow2`]: crate::restore_qcow2
    Qcow2,
}

/// What a block no copy holds intact is filled with under
/// `--allow-damaged`: recognisable, never mistaken for zeros or data.
pub const DAMAGED_MARKER: &[u8] = b"COFFRE-DAMAGED-BLOCK-NO-GOOD-COPY\n";

impl RestoreOptions {
    /// A restore to a new file at `target`, mode 0600, all cores.
    pub fn new(target: impl Into<PathBuf>) -> Self {
        RestoreOptions {
            target: target.into(),
            force: false,
            in_place: false,
            mode: DEFAULT_MODE,
            from: RestoreFrom::Auto,
            threads: 0,
            allow_damaged: false,
            format: None,
        }
    }
}

/// Which tier a restore reads from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestoreFrom {
    /// The snapshot while the point has one (instant restore), else the
    /// vault.
    #[default]
    Auto,
    /// The snapshot only.
    Snapshot,
    /// The vault only.
    Vault,
}

/// What a restore did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreSummary {
    /// Bytes of data written (holes and skipped blocks excluded).
    pub bytes_written: u64,
    /// Image size.
    pub image_size: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Whether the target was written in place.
    pub in_place: bool,
    /// Format of the image written.
    pub format: ImageFormat,
    /// The tier read: `snapshot` or `vault` (the CLI says `secondary` or
    /// `replica` when that copy was opened on its own).
    pub from: &'static str,
    /// True when the restore was a reflink clone of the snapshot.
    pub cloned: bool,
    /// Target blocks read and compared (in place only).
    pub blocks_read: u64,
    /// Blocks written with the point's data.
    pub blocks_written: u64,
    /// Blocks that already held the point's content (in place only).
    pub blocks_skipped: u64,
    /// Blocks zero in the point that were punched or zeroed (in place only).
    pub blocks_zeroed: u64,
    /// Bytes of the target beyond the image, left as they were (a larger
    /// block device; a larger regular file is cut to the image size).
    pub bytes_beyond_image: u64,
    /// Byte ranges `[start, end)` that no copy holds intact, filled with
    /// the damaged-block marker (`--allow-damaged` only).
    pub damaged_ranges: Vec<(u64, u64)>,
    /// Copies of chunks found bad and repaired from a good copy on the way.
    pub repaired_copies: u64,
}

/// Restores `point` to `opts.target`, from its snapshot when it still has
/// one (unless `opts.from` says the vault), else from the vault.
pub fn restore(
    vault: &Vault,
    point: &PointEntry,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let snapshot = match (opts.from, &point.snapshot, &point.vault) {
        (RestoreFrom::Vault, _, None) | (RestoreFrom::Auto, None, None) => {
            return Err(EngineError::PointNotInTier {
                item: point.item.clone(),
                point: point.id.clone(),
                tier: "vault",
            });
        }
        (RestoreFrom::Snapshot, None, _) => {
            return Err(EngineError::PointNotInTier {
                item: point.item.clone(),
                point: point.id.clone(),
                tier: "snapshot",
            });
        }
        (RestoreFrom::Vault, _, Some(_)) => None,
        (_, Some(s), _) => Some(SnapshotBlocks::open(&s.manifest, vault.config().keys())?),
        (RestoreFrom::Auto, None, Some(_)) => None,
    };
    // The block size is read from a vault file and divides below: only
    // the sizes a vault accepts, and the snapshot's own when it serves.
    let snap_bs = snapshot.as_ref().map(|s| s.header().block_size);
    if coffre_vault_store::format::config::validate_block_size(point.block_size).is_err()
        || snap_bs.is_some_and(|b| b != point.block_size)
    {
        return Err(EngineError::DamagedBlockMap {
            item: point.item.clone(),
            point: point.id.clone(),
            reason: format!(
                "the point records a block size of {} bytes{}; a vault's is a power of two from 64 KiB to 4 MiB",
                point.block_size,
                snap_bs.map_or(String::new(), |b| format!(" and its snapshot {b}"))
            ),
        });
    }
    if opts.in_place && !opts.force {
        return Err(EngineError::TargetExists {
            path: opts.target.clone(),
        });
    }
    let format = crate::restore_qcow2::target_format(opts)?;
    let image_size = point.image_size;
    let write = |target: &Target| write_point(vault, point, opts, snapshot, target, progress);
    let mut summary = match (format, opts.in_place) {
        (ImageFormat::Raw, true) => {
            let target = Target::open_in_place(&opts.target, image_size)?;
            let summary = write(&target)?;
            target.finish()?;
            summary
        }
        (ImageFormat::Raw, false) => {
            let target = Target::create(&opts.target, opts.force, opts.mode, image_size)?;
            let summary = write(&target)?;
            target.finish()?;
            summary
        }
        (ImageFormat::Qcow2, false) => crate::restore_qcow2::to_new_file(
            &opts.target,
            opts.force,
            opts.mode,
            image_size,
            write,
        )?,
        (ImageFormat::Qcow2, true) => {
            crate::restore_qcow2::replace_disk(&opts.target, image_size, write)?
        }
    };
    progress.finish();
    summary.format = format;
    summary.duration_ms = started.elapsed().as_millis() as u64;
    Ok(summary)
}

/// Writes the point into `target` (a new, scratch or in-place target),
/// reading it from `snapshot` when given, else from the vault; the caller
/// finishes the target.
fn write_point(
    vault: &Vault,
    point: &PointEntry,
    opts: &RestoreOptions,
    snapshot: Option<SnapshotBlocks>,
    target: &Target,
    progress: &dyn Progress,
) -> Result<RestoreSummary> {
    let image_size = point.image_size;
    let mut summary = RestoreSummary {
        image_size,
        in_place: target.kind().in_place(),
        from: if snapshot.is_some() {
            "snapshot"
        } else {
            "vault"
        },
        bytes_beyond_image: if target.kind() == TargetKind::BlockDevice {
            target.len_before.saturating_sub(image_size)
        } else {
            0
        },
        ..RestoreSummary::default()
    };
    // A clone snapshot restored to a new file on its own filesystem is a
    // clone again: constant time.
    if let Some(clone) = snapshot.as_ref().and_then(|s| s.clone_image())
        && target.kind().is_new()
    {
        let src = std::fs::File::open(clone.path()).map_err(|e| unwritable(clone.path(), e))?;
        if target.clone_from(&src)? {
            progress.start(image_size);
            progress.advance(image_size);
            summary.cloned = true;
            return Ok(summary);
        }
    }

    let mut data = match (snapshot, &point.vault) {
        (Some(s), _) => Data::Snapshot(Box::new(s)),
        (None, Some(p)) => Data::Vault(BlockMapReader::open(vault, p)?),
        (None, None) => unreachable_tier(point)?,
    };
    let pool = thread_pool(opts.threads)?;
    let buffers = PerThread::new(&pool, ChunkBuf::default);
    let records = PerThread::new(&pool, RecordBuf::default);
    let decoders = PerThread::new(&pool, RecordDecoder::default);
    // Records are read ahead in runs, from the page cache where they are
    // in it and else directly (`record_fetch`). An in-place restore reads few
    // records (most blocks are already right): advice only.
    let fetcher = match &data {
        _ if !target.kind().is_new() => None,
        Data::Snapshot(s) => Fetcher::of_packs(FETCH_CAP, s.pack_files()),
        Data::Vault(_) => Some(Fetcher::of_segments(FETCH_CAP, vault)),
    };
    let bs = u64::from(point.block_size);
    let blocks = block_count(image_size, point.block_size);
    let group_blocks = (GROUP_BYTES / bs).max(1) as usize;
    let in_place = summary.in_place;
    let out = Output {
        file: target.file(),
        path: target.path(),
        image_size,
        block_size: bs,
        // Direct writes skip the page-cache copy of a whole image that is
        // not read back; in-place restores read the target, so they stay
        // buffered.
        direct: if target.kind().is_new() {
            Direct::from(target.reopen_direct())
        } else {
            Direct::none()
        },
    };
    let source = Source {
        vault,
        point,
        block_size: bs,
        buffers: &buffers,
        records: &records,
        compare_with: in_place.then_some(&out),
        allow_damaged: opts.allow_damaged,
        damaged: std::sync::Mutex::new(Vec::new()),
    };
    let repairs_before = vault.read_repairs();
    progress.start(image_size);
    // A pipeline of three stages: one thread (and its short-lived read
    // helpers) fetches the records of the group after next (direct
    // reads), the pool decodes a group (while this thread reads a vault
    // point's block map for the group after next), and one thread writes
    // the groups decoded before it, one after the other, so the device
    // always has the next group waiting. Buffers go round: GROUP_BUFFERS
    // decoded groups, two fetched ones.
    let (to_writer, written_rx) = std::sync::mpsc::sync_channel::<Group>(GROUP_BUFFERS - 2);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<AlignedBuf>();
    for _ in 0..GROUP_BUFFERS {
        let _ = free_tx.send(AlignedBuf::default());
    }
    let (fetch_tx, fetch_rx) = std::sync::mpsc::channel::<(Vec<Option<Place>>, Fetched)>();
    let (fetched_tx, fetched_rx) = std::sync::mpsc::channel::<Fetched>();
    let mut written = RestoreSummary {
        in_place,
        ..RestoreSummary::default()
    };
    let decoded = std::thread::scope(|scope| -> Result<()> {
        let writer = {
            let (out, written) = (&out, &mut written);
            scope.spawn(move || -> Result<()> {
                for group in written_rx {
                    let (span, data) = out.write(group, written)?;
                    progress.advance(span);
                    // The loop may be gone (it failed): nothing to give
                    // the buffer back to.
                    let _ = free_tx.send(data);
                }
                Ok(())
            })
        };
        let direct = fetcher.is_some();
        if let Some(mut f) = fetcher {
            scope.spawn(move || {
                for (places, into) in fetch_rx {
                    if fetched_tx.send(f.fetch(&places, into)).is_err() {
                        return;
                    }
                }
            });
        } else {
            drop((fetch_rx, fetched_tx));
        }
        let mut spare_fetch = Some(Fetched::default());
        let mut fetching = false;
        // A vault point's entries (and their chunks' places): the next
        // group's, whose records are asked for while this one is decoded,
        // and the one after, read from the block map meanwhile.
        let mut ahead = None;
        let mut later = None;
        let (mut map, mut snapshot) = match &mut data {
            Data::Vault(map) => (Some(map), None),
            Data::Snapshot(s) => (None, Some(&mut **s)),
        };
        let size_at = |at: u64| group_blocks.min(blocks.saturating_sub(at) as usize);
        let mut first = 0u64;
        let result = (|| -> Result<()> {
            while first < blocks {
                let n = size_at(first);
                let offset = first * bs;
                let len = (image_size - offset).min(n as u64 * bs) as usize;
                let next = first + n as u64;
                let (entries, locs, window) = match (map.as_deref_mut(), snapshot.as_deref_mut()) {
                    (Some(map), _) => {
                        let (entries, locs) = match ahead.take() {
                            Some(g) => g,
                            None => vault_group(vault, map, first, n, !direct)?,
                        };
                        // The next group's records start coming in while
                        // this one is decoded.
                        if next < blocks {
                            ahead = Some(match later.take() {
                                Some(g) => g,
                                None => vault_group(vault, map, next, size_at(next), !direct)?,
                            });
                        }
                        (entries, locs, None)
                    }
                    (None, Some(s)) => {
                        let w = s.window(first, n, offset, len)?;
                        if !direct {
                            w.prefetch();
                        }
                        (vec![None; n], Vec::new(), Some(w))
                    }
                    (None, None) => unreachable_tier(point)?,
                };
                let mut this_fetch = None;
                if direct {
                    // This group's records: asked for in the round before
                    // (the first group's now).
                    if !fetching {
                        let places = match &window {
                            Some(w) => snapshot_places(
                                &(0..n)
                                    .map(|i| w.block(i).and_then(|(id, _)| id).and(w.loc(i)))
                                    .collect::<Vec<_>>(),
                            ),
                            None => vault_places(&locs),
                        };
                        let into = spare_fetch.take().unwrap_or_default();
                        fetching = fetch_tx.send((places, into)).is_ok();
                    }
                    this_fetch = fetching.then(|| fetched_rx.recv().ok()).flatten();
                    fetching = false;
                    // The next group's, read while this one is decoded.
                    let next_places = match (&window, &ahead) {
                        (Some(w), _) => snapshot_places(
                            &w.ahead()
                                .iter()
                                .map(|e| e.id.map(|_| e.loc))
                                .collect::<Vec<_>>(),
                        ),
                        (None, Some((_, locs))) => vault_places(locs),
                        (None, None) => Vec::new(),
                    };
                    if !next_places.is_empty() {
                        let into = spare_fetch.take().unwrap_or_default();
                        fetching = fetch_tx.send((next_places, into)).is_ok();
                    }
                }
                let data = free_rx.recv().map_err(|_| writer_gone())?;
                let mut group = Group {
                    first,
                    entries,
                    locs,
                    actions: Vec::with_capacity(n),
                    data,
                };
                // The pool decodes this group while this thread reads the
                // block map for the one after next, so the pool does not
                // wait for that between groups.
                let after = next + size_at(next) as u64;
                let mut filled = Ok(());
                let mut read_later = Ok(None);
                pool.in_place_scope(|scope| {
                    scope.spawn(|_| {
                        filled = source.fill(
                            &mut group,
                            window.as_ref(),
                            this_fetch.as_ref(),
                            &decoders,
                        );
                    });
                    if let Some(map) = map.as_deref_mut()
                        && next < blocks
                        && after < blocks
                    {
                        read_later =
                            vault_group(vault, map, after, size_at(after), !direct).map(Some);
                    }
                });
                // This group's failure first: it is the block being restored.
                filled?;
                later = read_later?;
                if let Some(f) = this_fetch {
                    spare_fetch = Some(f);
                }
                if let Some(w) = window {
                    w.finish()?;
                }
                to_writer.send(group).map_err(|_| writer_gone())?;
                first += n as u64;
            }
            Ok(())
        })();
        // The writer finishes what it was given and stops; its error, if
        // any, is the one that counts (the loop then saw it gone).
        drop(to_writer);
        drop(fetch_tx);
        let wrote = writer.join().unwrap_or_else(|_| {
            Err(EngineError::Threads(
                "the restore writer thread panicked".into(),
            ))
        });
        wrote.and(result)
    });
    decoded?;
    summary.bytes_written += written.bytes_written;
    summary.blocks_written += written.blocks_written;
    summary.blocks_skipped += written.blocks_skipped;
    summary.blocks_zeroed += written.blocks_zeroed;
    summary.blocks_read += written.blocks_read;
    if let Data::Snapshot(s) = data {
        s.finish()?;
    }
    let mut blocks = std::mem::take(&mut *source.damaged.lock().unwrap_or_else(|p| p.into_inner()));
    drop(source);
    summary.repaired_copies = vault.read_repairs() - repairs_before;
    blocks.sort_unstable();
    for b in blocks {
        let (start, end) = (b * bs, ((b + 1) * bs).min(image_size));
        match summary.damaged_ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => summary.damaged_ranges.push((start, end)),
        }
    }
    Ok(summary)
}

fn writer_gone() -> EngineError {
    EngineError::Threads("the restore writer thread stopped".into())
}

fn unreachable_tier<T>(point: &PointEntry) -> Result<T> {
    Err(EngineError::PointNotInTier {
        item: point.item.clone(),
        point: point.id.clone(),
        tier: "vault",
    })
}

/// Entries of blocks `first..first + n` of a vault point, with their
/// chunks' locations; starts reading those chunks ahead.
fn vault_group(
    vault: &Vault,
    map: &mut BlockMapReader<'_>,
    first: u64,
    n: usize,
    advise: bool,
) -> Result<(Vec<Entry>, Vec<Option<ChunkLocation>>)> {
    let entries = map.entries(first, n)?;
    let ids: Vec<ChunkId> = entries.iter().flatten().copied().collect();
    // A bad index entry fails the batch: the blocks then look their
    // chunks up one by one, and the bad one is reported with its block.
    let mut found = vault
        .index()
        .chunk_locations(&ids)
        .unwrap_or_else(|_| vec![None; ids.len()])
        .into_iter();
    let locs: Vec<Option<ChunkLocation>> = entries
        .iter()
        .map(|e| e.and_then(|_| found.next().flatten()))
        .collect();
    if advise {
        vault.read_ahead(&locs.iter().flatten().copied().collect::<Vec<_>>());
    }
    Ok((entries, locs))
}

/// The places of a vault group's records.
fn vault_places(locs: &[Option<ChunkLocation>]) -> Vec<Option<Place>> {
    locs.iter()
        .map(|l| l.as_ref().map(Place::in_segment))
        .collect()
}

/// The places of a snapshot window's records.
fn snapshot_places(locs: &[Option<PackLoc>]) -> Vec<Option<Place>> {
    locs.iter()
        .map(|l| l.as_ref().map(Place::in_pack))
        .collect()
}

/// Where a restore reads the point from.
enum Data<'v> {
    /// The vault's block map.
    Vault(BlockMapReader<'v>),
    /// The snapshot area.
    Snapshot(Box<SnapshotBlocks>),
}

/// Waits until `offset..offset+len` is on disk and drops it from the page
/// cache. Best effort: failure only costs memory.
fn release_written(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    sync_range(
        file,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    );
    // SAFETY: an advisory system call on a descriptor we own.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// Bytes of decoded blocks held per group.
const GROUP_BYTES: u64 = 6 << 20;

/// Groups of decoded blocks in flight: one decoded, one written, the
/// others waiting for the writer.
const GROUP_BUFFERS: usize = 3;

/// Most bytes of records fetched ahead for one group (two are held):
/// blocks past it are read record by record.
const FETCH_CAP: usize = (GROUP_BYTES + GROUP_BYTES / 4) as usize;

/// What the writer does with one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Zero in the point, and a hole already (new file): nothing.
    Hole,
    /// The target already holds the point's content: nothing.
    Skip,
    /// Write the decoded block.
    Write,
    /// Zero in the point but not in the target: punch or zero it.
    Zero,
}

/// Consecutive blocks, decoded into one buffer (`block_size` bytes each).
struct Group {
    first: u64,
    entries: Vec<Entry>,
    /// Where the entries' chunks are (vault groups; empty for a snapshot).
    locs: Vec<Option<ChunkLocation>>,
    actions: Vec<Action>,
    data: AlignedBuf,
}

/// Where blocks come from (the vault, or a snapshot window), after
/// comparing with the target when restoring in place.
struct Source<'a> {
    vault: &'a Vault,
    point: &'a PointEntry,
    block_size: u64,
    buffers: &'a PerThread<ChunkBuf>,
    records: &'a PerThread<RecordBuf>,
    /// In place: the target whose blocks are read and compared first.
    compare_with: Option<&'a Output<'a>>,
    /// Fill unreadable blocks with the marker instead of failing.
    allow_damaged: bool,
    /// Blocks filled with the marker.
    damaged: std::sync::Mutex<Vec<u64>>,
}

/// One block of the point, as its source knows it.
enum Known<'w> {
    /// Zero in the point.
    Zero,
    /// A chunk id, bytes to be read from the vault or a pack.
    Id(ChunkId),
    /// Bytes at hand (a clone), not yet known to be zero or not.
    Bytes(&'w [u8]),
}

impl Source<'_> {
    /// Decides each block's action and decodes the blocks to write, in
    /// parallel, into the group's buffer.
    fn fill(
        &self,
        group: &mut Group,
        window: Option<&SnapWindow<'_>>,
        fetched: Option<&Fetched>,
        decoders: &PerThread<RecordDecoder>,
    ) -> Result<()> {
        let bs = self.block_size;
        let need = group.entries.len() * bs as usize;
        group.data.reserve(need);
        let first = group.first;
        group.actions = group
            .data
            .as_mut_slice()
            .par_chunks_mut(bs as usize)
            .zip(group.entries.par_iter())
            .enumerate()
            .map(|(i, (slot, entry))| {
                let known = match window {
                    None => entry.map_or(Known::Zero, Known::Id),
                    Some(w) => match w.block(i) {
                        None => Known::Zero,
                        Some((Some(id), _)) => Known::Id(id),
                        Some((None, Some(bytes))) => Known::Bytes(bytes),
                        Some((None, None)) => Known::Zero,
                    },
                };
                let loc = group.locs.get(i).copied().flatten();
                let record = fetched.and_then(|f| f.record(i));
                self.block(
                    first + i as u64,
                    i,
                    slot,
                    known,
                    loc,
                    window,
                    record,
                    decoders,
                )
            })
            .collect::<Result<Vec<Action>>>()?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        index: u64,
        i: usize,
        slot: &mut [u8],
        known: Known<'_>,
        loc: Option<ChunkLocation>,
        window: Option<&SnapWindow<'_>>,
        fetched: Option<&[u8]>,
        decoders: &PerThread<RecordDecoder>,
    ) -> Result<Action> {
        let point = self.point;
        let expected = self
            .block_size
            .min(point.image_size - index * self.block_size) as usize;
        let known = match known {
            Known::Bytes(b) if is_zero(b) => Known::Zero,
            k => k,
        };
        if let Some(target) = self.compare_with {
            let current = slot.get_mut(..expected).unwrap_or_default();
            target
                .file
                .read_exact_at(current, index * self.block_size)
                .map_err(|e| unwritable(target.path, e))?;
            let same = match &known {
                Known::Zero => is_zero(current),
                Known::Id(id) => !is_zero(current) && self.vault.config().chunk_id(current) == *id,
                Known::Bytes(b) => current == *b,
            };
            if same {
                return Ok(Action::Skip);
            }
        }
        let id = match known {
            Known::Zero => {
                return Ok(if self.compare_with.is_some() {
                    Action::Zero
                } else {
                    Action::Hole
                });
            }
            Known::Bytes(b) => {
                return match slot.get_mut(..b.len()) {
                    Some(dst) if b.len() == expected => {
                        dst.copy_from_slice(b);
                        Ok(Action::Write)
                    }
                    _ => Err(self.bad_length(index, b.len(), expected)),
                };
            }
            Known::Id(id) => id,
        };
        // The record fetched ahead, decoded in place; anything wrong with
        // it and the block is read again below, where damage is reported
        // (and repaired from another copy).
        if let Some(record) = fetched
            && let Some(dst) = slot.get_mut(..expected)
            && decode_fetched(
                record,
                &id,
                &mut decoders.get(),
                self.vault.config().keys(),
                dst,
            )
        {
            return Ok(Action::Write);
        }
        let damaged = |source: EngineError| EngineError::DamagedBlock {
            item: point.item.clone(),
            point: point.id.clone(),
            block: index,
            chunk: id,
            source: Box::new(match source {
                EngineError::Store(s) => s,
                other => StoreError::CorruptFile {
                    path: PathBuf::from("snapshot"),
                    what: "snapshot record",
                    reason: other.to_string(),
                },
            }),
        };
        let copy = |data: &[u8], slot: &mut [u8]| match slot.get_mut(..data.len()) {
            Some(dst) if data.len() == expected => {
                dst.copy_from_slice(data);
                Ok(Action::Write)
            }
            _ => Err(self.bad_length(index, data.len(), expected)),
        };
        if let Some(w) = window {
            let mut buf = self.records.get();
            w.decode_record(i, &id, &mut buf)
                .map_err(|e| damaged(e.into()))?;
            return copy(buf.plain(), slot);
        }
        let loc = match loc {
            Some(l) => l,
            None => self
                .vault
                .index()
                .chunk(&id)
                .map_err(|e| damaged(e.into()))?
                .ok_or_else(|| damaged(StoreError::ChunkMissing { id }.into()))?,
        };
        let mut buf = self.buffers.get();
        match self.vault.read_chunk_into(&id, &loc, &mut buf) {
            Ok(()) => copy(buf.plain(), slot),
            Err(e) if self.allow_damaged => {
                tracing::error!(item = %point.item, point = %point.id, block = index, error = %e, "no good copy of a block; filled with the damaged-block marker");
                let dst = slot.get_mut(..expected).unwrap_or_default();
                for (d, m) in dst.iter_mut().zip(DAMAGED_MARKER.iter().cycle()) {
                    *d = *m;
                }
                self.damaged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(index);
                Ok(Action::Write)
            }
            Err(e) => Err(damaged(e.into())),
        }
    }

    fn bad_length(&self, index: u64, got: usize, expected: usize) -> EngineError {
        EngineError::DamagedBlockMap {
            item: self.point.item.clone(),
            point: self.point.id.clone(),
            reason: format!("block {index} holds {got} bytes, expected {expected}"),
        }
    }
}

/// The file or device being restored to.
struct Output<'a> {
    file: &'a File,
    path: &'a Path,
    image_size: u64,
    block_size: u64,
    /// A second descriptor opened with `O_DIRECT` (new files only).
    direct: Direct,
}

/// An `O_DIRECT` descriptor of the target, while the filesystem takes
/// direct writes.
struct Direct {
    file: Option<File>,
    /// Set once the filesystem refused a direct write.
    refused: std::sync::atomic::AtomicBool,
}

impl Direct {
    /// Direct writes through `file` (`None` where the filesystem, such
    /// as tmpfs, refuses `O_DIRECT`).
    fn from(file: Option<File>) -> Direct {
        Direct {
            file,
            refused: Default::default(),
        }
    }

    fn none() -> Direct {
        Direct {
            file: None,
            refused: Default::default(),
        }
    }

    fn get(&self) -> Option<&File> {
        if self.refused.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        self.file.as_ref()
    }

    fn disable(&self) {
        self.refused
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Output<'_> {
    /// Carries out a group's actions, one write (or punch) per run of
    /// blocks with the same action, and starts its writeback. Adds to the
    /// summary; returns the image span covered and the buffer for reuse.
    fn write(&self, group: Group, summary: &mut RestoreSummary) -> Result<(u64, AlignedBuf)> {
        let bs = self.block_size;
        let start = group.first * bs;
        let end = ((group.first + group.entries.len() as u64) * bs).min(self.image_size);
        let mut i = 0;
        let mut runs: Vec<(u64, &[u8])> = Vec::new();
        while let Some(&action) = group.actions.get(i) {
            let run_start = i;
            while group.actions.get(i) == Some(&action) {
                i += 1;
            }
            let blocks = (i - run_start) as u64;
            let from = start + run_start as u64 * bs;
            let to = (start + i as u64 * bs).min(end);
            match action {
                Action::Hole => {}
                Action::Skip => summary.blocks_skipped += blocks,
                Action::Write => {
                    let bytes = group
                        .data
                        .as_slice()
                        .get((from - start) as usize..(to - start) as usize)
                        .unwrap_or_default();
                    runs.push((from, bytes));
                    summary.bytes_written += to - from;
                    summary.blocks_written += blocks;
                }
                Action::Zero => {
                    self.zero(from, to - from)?;
                    summary.blocks_zeroed += blocks;
                }
            }
        }
        self.write_runs(&runs)?;
        drop(runs);
        if summary.in_place {
            summary.blocks_read += group.actions.len() as u64;
        }
        start_writeback(self.file, start, end - start);
        // Let the page cache of a range written two groups ago go once it is
        // on disk: a restore then streams through a few groups' worth of
        // cache instead of forcing the kernel to reclaim other pages.
        let behind = 2 * GROUP_BYTES;
        if start >= behind {
            release_written(self.file, start - behind, GROUP_BYTES);
        }
        Ok((end - start, group.data))
    }

    /// Writes a group's runs, one after the other, each whole: a new
    /// file's holes are filled under the filesystem's exclusive inode lock
    /// (ext4), so more writes in flight would only wait for each other,
    /// and a few large writes keep the device busiest.
    fn write_runs(&self, runs: &[(u64, &[u8])]) -> Result<()> {
        runs.iter().try_for_each(|&(at, b)| self.write_run(b, at))
    }

    /// Writes a run of decoded blocks: directly (`O_DIRECT`, no page-cache
    /// copy) when the target allows it and the run is aligned, else
    /// through the page cache.
    fn write_run(&self, bytes: &[u8], at: u64) -> Result<()> {
        let aligned = |n: usize| n.is_multiple_of(DIRECT_ALIGN);
        if let Some(direct) = self.direct.get()
            && aligned(at as usize)
            && aligned(bytes.len())
            && bytes.as_ptr().align_offset(DIRECT_ALIGN) == 0
        {
            match direct.write_all_at(bytes, at) {
                Ok(()) => return Ok(()),
                // The filesystem refuses direct I/O after all: buffered from
                // now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct.disable(),
                Err(e) => return Err(unwritable(self.path, e)),
            }
        }
        self.file
            .write_all_at(bytes, at)
            .map_err(|e| unwritable(self.path, e))
    }

    /// Makes `len` bytes at `offset` read as zeros: a hole punched in a
    /// file, a discard that guarantees zeros on a device, or else written
    /// zeros.
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on a descriptor we own, inside the image.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {}
            _ => return Err(unwritable(self.path, err)),
        }
        let zeros = vec![0u8; self.block_size as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(self.block_size);
            self.file
                .write_all_at(zeros.get(..n as usize).unwrap_or_default(), at)
                .map_err(|e| unwritable(self.path, e))?;
            at += n;
        }
        Ok(())
    }
}
