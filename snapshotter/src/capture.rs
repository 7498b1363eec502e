//! Capture: the snapshot phase of a backup. It fixes a point in time of an
//! image in the snapshot area, so that the transfer (and instant restore)
//! never need the live image again.
//!
//! 1. **Clone path.** When the area is on the image's filesystem and that
//!    filesystem can clone (XFS with reflink, btrfs), the capture is a
//!    `FICLONE` of the image: constant time, atomic, and the VM may keep
//!    writing.
//! 2. **Fallback path** (ext4, tmpfs, block devices): the image is read
//!    window by window; every block is hashed (BLAKE3) and compared with the
//!    block at the same place in the item's previous snapshot. Unchanged
//!    blocks refer to the previous snapshot's record; the others are
//!    compressed into this job's pack in the vault's record format. A
//!    day-two snapshot therefore stores about the day's change.
//!
//!    The fallback is atomic only when nothing writes to the image while
//!    it is read. It watches the image's change time (mtime/ctime, read
//!    before and after each pass): if the image changed during a pass, the
//!    pass is repeated against the manifest of the pass before, so only
//!    blocks that changed are stored again, until one whole pass sees no
//!    change (the snapshot is then the image as it was during that pass), or
//!    fails with `SourceChanged` after [`MAX_PASSES`] passes. Quiesce the
//!    image with hooks, or stop the VM, for an atomic fallback capture.
//!
//! Hooks run around the capture (the post hook even when it failed); the
//! consistency [`Level`] follows from the hooks, whether the image was
//! [`in_use`] and whether the capture was atomic. The manifest is written
//! last, after the pack is durable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coffre_vault_store::ChunkId;
use coffre_vault_store::blockmap::{Node, block_count};
use coffre_vault_store::record::RecordEncoder;
use jiff::Timestamp;
use rayon::prelude::*;

use crate::area::Area;
use crate::clone::{CloneError, clone_file};
use crate::error::{Result, SnapError};
use crate::hooks::{HookEnv, Hooks, RunHooks};
use crate::in_use::in_use;
use crate::manifest::{
    FLAG_NODE, PackLoc, SnapEntry, SnapHeader, SnapKind, SnapMeta, SnapReader, SnapWriter,
};
use crate::pack::PackWriter;
use crate::progress::Progress;
use crate::source::{ChangeStamp, FileImage, ImageSource};
use crate::throttle::Throttle;
use coffre_vault_store::level::Level;

/// Bytes mapped at a time (rounded to whole blocks).
pub const WINDOW_BYTES: usize = 32 << 20;
/// Passes of the fallback before it gives up on an image that keeps
/// changing.
pub const MAX_PASSES: u32 = 4;
/// Most new blocks remembered for deduplication within one capture.
const MAX_DEDUP_ENTRIES: usize = 256 << 10;
/// Free space a clone needs besides the shared extents (metadata, and the
/// first copy-on-write writes of the guest).
pub const CLONE_HEADROOM: u64 = 16 << 20;

/// What to capture and how.
pub struct CaptureRequest<'a> {
    /// The image, opened.
    pub source: &'a dyn ImageSource,
    /// The area to capture into.
    pub area: &'a Area,
    /// Item name.
    pub item: &'a str,
    /// Job id (names the files).
    pub job: &'a str,
    /// Point id the snapshot stands for.
    pub point: &'a str,
    /// The vault's block size.
    pub block_size: u32,
    /// The vault's zstd level.
    pub compression_level: i32,
    /// The capture instant.
    pub created: Timestamp,
    /// Worker pool.
    pub pool: &'a rayon::ThreadPool,
    /// Read rate limit (bytes per second).
    pub rate_limit: Option<u64>,
    /// Polled between windows; `true` cancels.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// The item's hooks.
    pub hooks: &'a Hooks,
    /// The vault directory (for the hooks' environment).
    pub vault_dir: &'a Path,
    /// Try the reflink clone first.
    pub allow_clone: bool,
}

/// What a capture produced.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The manifest.
    pub manifest: PathBuf,
    /// Its header.
    pub header: SnapHeader,
    /// Its metadata (level, warnings).
    pub meta: SnapMeta,
    /// Bytes the capture added to the area.
    pub stored_bytes: u64,
    /// Bytes of the image read (holes are not read; 0 for a clone).
    pub bytes_read: u64,
    /// Passes of the fallback (0 for a clone).
    pub passes: u32,
    /// Wall time.
    pub duration_ms: u64,
}

/// Manifest file of a job in an item folder.
pub fn manifest_path(item_dir: &Path, job: &str) -> PathBuf {
    item_dir.join(format!("{job}.snap"))
}

/// Captures `req.source` into the area, with hooks around it.
pub fn capture(req: &CaptureRequest<'_>, progress: &dyn Progress) -> Result<Captured> {
    let started = Instant::now();
    let image = req.source.path().to_path_buf();
    let busy = in_use(&image);
    let env = HookEnv {
        item: req.item,
        image: &image,
        job: req.job,
        vault: req.vault_dir,
    };
    let mut warnings = Vec::new();
    let pre = if req.hooks.pre.is_empty() {
        None
    } else {
        Some(req.hooks.run_pre(env))
    };
    let result = req
        .area
        .check_unlocked(req.item)
        .and_then(|item_dir| capture_files(req, &item_dir, progress));
    // The post hook runs whenever the pre hook ran, and after a failed
    // capture too (a frozen guest must be thawed).
    let post = if req.hooks.is_set() {
        Some(req.hooks.run_post(env))
    } else {
        None
    };
    for r in [&pre, &post].into_iter().flatten() {
        if let Err(e) = r {
            warnings.push(e.clone());
        }
    }
    let mut done = result?;
    let hooks_ok = req.hooks.is_set()
        && pre.as_ref().is_none_or(|r| r.is_ok())
        && post.as_ref().is_none_or(|r| r.is_ok());
    let level = Level::of(hooks_ok, busy.is_some(), done.kind == SnapKind::Clone);
    if req.hooks.is_set() && !hooks_ok {
        warnings.push(format!(
            "a hook failed: the point is {level}, not application-consistent"
        ));
    }
    if let Some(why) = &busy
        && level == Level::CrashConsistent
    {
        warnings.push(format!(
            "the image was in use ({why}) and the capture could not be atomic: the point is crash-consistent"
        ));
    }
    warnings.append(&mut done.warnings);
    let meta = SnapMeta {
        item: req.item.to_string(),
        point: req.point.to_string(),
        job: req.job.to_string(),
        source: image,
        level,
        packs: done.packs,
        clone: done.clone,
        warnings,
    };
    if let Some(pack) = done.pack.take() {
        pack.finish()?;
    }
    let manifest = done.writer.finish(&meta, done.stored_bytes)?;
    Ok(Captured {
        manifest,
        header: done.header,
        meta,
        stored_bytes: done.stored_bytes,
        bytes_read: done.bytes_read,
        passes: done.passes,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// A capture whose files are written but not yet made final.
struct Pending {
    kind: SnapKind,
    header: SnapHeader,
    writer: SnapWriter,
    pack: Option<PackWriter>,
    packs: Vec<String>,
    clone: Option<String>,
    stored_bytes: u64,
    bytes_read: u64,
    passes: u32,
    warnings: Vec<String>,
}

fn header(req: &CaptureRequest<'_>, kind: SnapKind, blocks: u64) -> SnapHeader {
    SnapHeader {
        kind,
        block_size: req.block_size,
        image_size: req.source.size(),
        blocks,
        created_s: req.created.as_second(),
        created_ns: req.created.subsec_nanosecond().max(0) as u32,
    }
}

fn capture_files(
    req: &CaptureRequest<'_>,
    item_dir: &Path,
    progress: &dyn Progress,
) -> Result<Pending> {
    if req.allow_clone
        && let Some(p) = try_clone(req, item_dir)?
    {
        progress.start(req.source.size());
        progress.advance(req.source.size());
        progress.finish();
        return Ok(p);
    }
    capture_chunks(req, item_dir, progress)
}

/// The clone path, if the image is a file on the area's filesystem that
/// can clone.
fn try_clone(req: &CaptureRequest<'_>, item_dir: &Path) -> Result<Option<Pending>> {
    use std::os::unix::fs::MetadataExt;
    let image = req.source.path();
    let (Ok(im), Ok(ar)) = (std::fs::metadata(image), std::fs::metadata(item_dir)) else {
        return Ok(None);
    };
    if !im.is_file() || im.dev() != ar.dev() {
        return Ok(None);
    }
    req.area.check_space(CLONE_HEADROOM, image)?;
    let name = format!("{}.img", req.job);
    let dst = item_dir.join(&name);
    let src = std::fs::File::open(image).map_err(|e| SnapError::SourceUnreadable {
        path: image.to_path_buf(),
        source: e,
    })?;
    match clone_file(&src, &dst) {
        Ok(()) => {}
        Err(CloneError::Unsupported(e)) => {
            tracing::debug!(image = %image.display(), error = %e, "cannot clone; copying instead");
            return Ok(None);
        }
        Err(CloneError::Failed(e)) => return Err(e),
    }
    // The clone is the point: its size is the image's size at the clone.
    let size = std::fs::metadata(&dst)
        .map_err(|e| SnapError::write(&dst, e))?
        .len();
    let mut h = header(req, SnapKind::Clone, 0);
    h.image_size = size;
    let writer = SnapWriter::create(&manifest_path(item_dir, req.job), h)?;
    Ok(Some(Pending {
        kind: SnapKind::Clone,
        header: h,
        writer,
        pack: None,
        packs: Vec::new(),
        clone: Some(name),
        stored_bytes: 0,
        bytes_read: 0,
        passes: 0,
        warnings: Vec::new(),
    }))
}

/// The newest complete chunk manifest of the item, other than `job`'s.
pub fn previous_manifest(item_dir: &Path, job: &str) -> Option<PathBuf> {
    let mut best: Option<(i64, u32, PathBuf)> = None;
    for e in std::fs::read_dir(item_dir).ok()?.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".snap") || name.starts_with(job) {
            continue;
        }
        let Ok((h, _, _)) = crate::manifest::summary(&path) else {
            continue;
        };
        if h.kind != SnapKind::Chunks {
            continue;
        }
        let key = (h.created_s, h.created_ns);
        if best.as_ref().is_none_or(|b| (b.0, b.1) < key) {
            best = Some((key.0, key.1, path));
        }
    }
    best.map(|b| b.2)
}

/// Bytes the fallback may need: the image's data when there is nothing to
/// deduplicate against, else twice the largest change an earlier capture
/// stored (at least 64 MiB). An estimate: a capture that runs out anyway
/// fails cleanly and leaves nothing behind.
fn space_needed(source: &dyn ImageSource, item_dir: &Path, has_previous: bool) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let data = std::fs::metadata(source.path())
        .ok()
        .filter(|m| m.is_file())
        .map_or(source.size(), |m| (m.blocks() * 512).min(source.size()));
    if !has_previous {
        return data;
    }
    let largest = std::fs::read_dir(item_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| crate::manifest::summary(&e.path()).ok())
                .map(|(_, _, t)| t.stored_bytes)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    (2 * largest).max(64 << 20).min(data.max(64 << 20))
}

fn capture_chunks(
    req: &CaptureRequest<'_>,
    item_dir: &Path,
    progress: &dyn Progress,
) -> Result<Pending> {
    let source = req.source;
    let previous = previous_manifest(item_dir, req.job);
    req.area.check_space(
        space_needed(source, item_dir, previous.is_some()),
        source.path(),
    )?;
    // The pack table: the previous snapshot's packs that still exist, then
    // this job's; `remap` renumbers the previous snapshot's entries.
    let old_packs = match &previous {
        Some(p) => SnapReader::open(p)?.meta().packs.clone(),
        None => Vec::new(),
    };
    let mut packs = Vec::new();
    let remap: Vec<Option<u16>> = old_packs
        .iter()
        .map(|name| {
            item_dir.join(name).exists().then(|| {
                packs.push(name.clone());
                (packs.len() - 1) as u16
            })
        })
        .collect();
    let pack_name = format!("{}.pack", req.job);
    packs.push(pack_name.clone());
    let pack_index = u16::try_from(packs.len() - 1)
        .map_err(|_| SnapError::damaged(item_dir, "more than 65,536 packs"))?;
    let mut pack = PackWriter::create(&item_dir.join(&pack_name))?;
    let blocks = block_count(source.size(), req.block_size);
    let mut against = previous;
    let mut pass_files: Vec<PathBuf> = Vec::new();
    let mut bytes_read = 0;
    let mut warnings = Vec::new();
    let mut pass = 0;
    let result = loop {
        pass += 1;
        let before = settled_stamp(source);
        let path = manifest_path(item_dir, req.job);
        let mut writer = SnapWriter::create(&path, header(req, SnapKind::Chunks, blocks))?;
        let identity: Vec<Option<u16>>;
        let renumber = if pass == 1 {
            &remap
        } else {
            identity = (0..packs.len()).map(|i| Some(i as u16)).collect();
            &identity
        };
        let read = chunk_pass(
            req,
            against.as_deref(),
            renumber,
            &mut pack,
            pack_index,
            &mut writer,
            progress,
        )?;
        bytes_read += read;
        let after = source.change_stamp();
        if before.is_ok_and(|b| b == after) {
            break Ok(writer);
        }
        if pass >= MAX_PASSES {
            break Err(SnapError::SourceChanged {
                path: source.path().to_path_buf(),
                reason: format!(
                    "it was written to during each of {MAX_PASSES} capture passes and never settled"
                ),
            });
        }
        warnings.push(format!(
            "the image changed during capture pass {pass}; it was read again"
        ));
        // The next pass deduplicates against this one: only what changed
        // is stored again.
        let interim = item_dir.join(format!("{}.pass{pass}.snap", req.job));
        let provisional = SnapMeta {
            item: req.item.to_string(),
            point: req.point.to_string(),
            job: req.job.to_string(),
            source: source.path().to_path_buf(),
            level: Level::CrashConsistent,
            packs: packs.clone(),
            clone: None,
            warnings: Vec::new(),
        };
        pack.flush()?;
        let done = writer.finish(&provisional, 0)?;
        let moved = std::fs::rename(&done, &interim).map_err(|e| SnapError::write(&interim, e));
        if let Err(e) = moved {
            break Err(e);
        }
        pass_files.push(interim.clone());
        against = Some(interim);
    };
    for f in &pass_files {
        let _ = std::fs::remove_file(f);
    }
    let writer = result?;
    let stored = pack.len() - crate::pack::PACK_HEADER_LEN;
    Ok(Pending {
        kind: SnapKind::Chunks,
        header: header(req, SnapKind::Chunks, blocks),
        writer,
        pack: Some(pack),
        packs,
        clone: None,
        stored_bytes: stored,
        bytes_read,
        passes: pass,
        warnings,
    })
}

/// The image's change stamp, once it is at least a few coarse clock ticks
/// old: a write in the same tick as the last one may leave the stamp as it
/// is, so only an old stamp proves that nothing was written since.
/// `Err(())` when the image never stayed still that long (the pass then
/// counts as changed).
fn settled_stamp(source: &dyn ImageSource) -> std::result::Result<Option<ChangeStamp>, ()> {
    const SETTLE: Duration = Duration::from_millis(20);
    for _ in 0..25 {
        let Some(stamp) = source.change_stamp() else {
            return Ok(None);
        };
        let age = stamp.age();
        if age >= SETTLE {
            return Ok(Some(stamp));
        }
        std::thread::sleep(SETTLE - age);
    }
    Err(())
}

enum Block {
    Zero,
    Reuse(SnapEntry),
    New(ChunkId, Vec<u8>, bool),
}

/// One pass over the image: entries to `writer`, new records to `pack`.
/// Returns the bytes read.
fn chunk_pass(
    req: &CaptureRequest<'_>,
    against: Option<&Path>,
    renumber: &[Option<u16>],
    pack: &mut PackWriter,
    pack_index: u16,
    writer: &mut SnapWriter,
    progress: &dyn Progress,
) -> Result<u64> {
    let source = req.source;
    let bs = req.block_size as usize;
    let size = source.size();
    let blocks = block_count(size, req.block_size);
    let mut prev = match against {
        Some(p) => {
            let r = SnapReader::open(p)?;
            (r.header().block_size == req.block_size).then_some(r)
        }
        None => None,
    };
    let encoders: Vec<std::sync::Mutex<RecordEncoder>> = (0..req.pool.current_num_threads().max(1))
        .map(|_| std::sync::Mutex::new(RecordEncoder::new(req.compression_level)))
        .collect();
    let encoder = || {
        let i = rayon::current_thread_index().unwrap_or(0) % encoders.len();
        encoders
            .get(i)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    };
    let mut seen: HashMap<ChunkId, PackLoc> = HashMap::new();
    let mut throttle = Throttle::new(req.rate_limit);
    let mut bytes_read = 0;
    progress.start(size);
    let window_blocks = (WINDOW_BYTES / bs).max(1);
    let mut first = 0u64;
    let mut ready: Option<Vec<Result<Block>>> = None;
    while first < blocks {
        if (req.cancelled)() {
            return Err(SnapError::Cancelled {
                path: source.path().to_path_buf(),
            });
        }
        let n = window_blocks.min((blocks - first) as usize);
        let offset = first * bs as u64;
        let len = (size - offset).min((n * bs) as u64) as usize;
        let before: Vec<SnapEntry> = match prev.as_mut() {
            Some(r) => r.next_entries(n)?,
            None => Vec::new(),
        };
        let window = source.window(offset, len)?;
        // While this window is hashed and compressed by the pool, one
        // thread appends the previous window's records and entries.
        let previous = ready.take();
        let (out, stored): (Vec<Result<Block>>, Result<()>) = req.pool.install(|| {
            rayon::join(
                || {
                    // Each block is copied out of the mapping before it is
                    // hashed and compressed: a guest writing to the image
                    // must never make a record whose bytes are not its id
                    // (a torn read is caught by the pass's change check).
                    (0..n)
                        .into_par_iter()
                        .map_init(
                            || Vec::with_capacity(bs),
                            |copy, i| {
                                let start = i * bs;
                                let end = (start + bs).min(len);
                                if window.is_hole(start..end) {
                                    return Ok(Block::Zero);
                                }
                                let bytes = window.bytes().get(start..end).unwrap_or_default();
                                copy.clear();
                                copy.extend_from_slice(bytes);
                                let bytes = copy.as_slice();
                                if is_zero(bytes) {
                                    return Ok(Block::Zero);
                                }
                                let id = ChunkId::of(bytes);
                                if let Some(e) = before.get(i).filter(|e| e.id == Some(id))
                                    && let Some(Some(pack)) = renumber.get(usize::from(e.loc.pack))
                                {
                                    let mut e = *e;
                                    e.loc.pack = *pack;
                                    return Ok(Block::Reuse(e));
                                }
                                let mut enc = encoder().ok_or_else(|| {
                                    SnapError::damaged(source.path(), "no encoder for a worker")
                                })?;
                                let record = enc.encode(id, bytes).map_err(|e| {
                                    SnapError::damaged(
                                        source.path(),
                                        format!("cannot encode a block: {e}"),
                                    )
                                })?;
                                Ok(Block::New(id, record, Node::decode(bytes).is_ok()))
                            },
                        )
                        .collect()
                },
                || match previous {
                    Some(blocks) => store(blocks, pack, pack_index, &mut seen, writer),
                    None => Ok(()),
                },
            )
        });
        stored?;
        bytes_read += window.data_len();
        window.finish()?;
        source.check_unchanged()?;
        ready = Some(out);
        progress.advance(len as u64);
        throttle.consume(len as u64);
        first += n as u64;
    }
    if let Some(blocks) = ready.take() {
        store(blocks, pack, pack_index, &mut seen, writer)?;
    }
    // (An image that shrank leaves the previous snapshot's tail unread.)
    drop(prev);
    progress.finish();
    Ok(bytes_read)
}

/// Appends a window's new records to the pack (once each, within the
/// capture) and its entries to the manifest, in block order; then starts
/// the pack's writeback so the final fsync has little left to do.
fn store(
    blocks: Vec<Result<Block>>,
    pack: &mut PackWriter,
    pack_index: u16,
    seen: &mut HashMap<ChunkId, PackLoc>,
    writer: &mut SnapWriter,
) -> Result<()> {
    for b in blocks {
        let entry = match b? {
            Block::Zero => SnapEntry::default(),
            Block::Reuse(e) => e,
            Block::New(id, record, node) => match seen.get(&id) {
                Some(loc) => SnapEntry {
                    id: Some(id),
                    loc: *loc,
                },
                None => {
                    let at = pack.append(&record)?;
                    let loc = PackLoc {
                        pack: pack_index,
                        flags: if node { FLAG_NODE } else { 0 },
                        len: record.len() as u32,
                        offset: at,
                    };
                    if seen.len() < MAX_DEDUP_ENTRIES {
                        seen.insert(id, loc);
                    }
                    SnapEntry { id: Some(id), loc }
                }
            },
        };
        writer.push(&entry)?;
    }
    pack.start_writeback()
}

/// True when every byte is zero (a 64-byte OR-fold vectorises well).
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, x| a | x) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// Opens a clone snapshot's image for reading.
pub fn open_clone(item_dir: &Path, meta: &SnapMeta) -> Result<FileImage> {
    let name = meta
        .clone
        .as_deref()
        .ok_or_else(|| SnapError::damaged(item_dir, "not a clone snapshot"))?;
    FileImage::open(&item_dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 65536]));
        assert!(is_zero(&[]));
        let mut b = vec![0u8; 65537];
        b[65536] = 1;
        assert!(!is_zero(&b));
        b[65536] = 0;
        b[7] = 1;
        assert!(!is_zero(&b));
    }
}
