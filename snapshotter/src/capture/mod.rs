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
//!    compressed into this job's pack in the vault's record format, by a
//!    pack-writer thread of its own while the pool works on the next
//!    window. A day-two snapshot therefore stores about the day's change.
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
use coffre_vault_store::name::SafeName;
use coffre_vault_store::record::RecordEncoder;
use jiff::Timestamp;
use rayon::prelude::*;

use crate::area::Area;
use crate::cbt::{
    CbtRecord, Hint, HintSource, Parent, Sampling, fallback_warning, sample_mismatch,
};
use crate::clone::{CloneError, clone_file};
use crate::error::{Result, SnapError};
use crate::fetch::Fetcher;
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
pub const WINDOW_BYTES: usize = 16 << 20;
/// Passes of the fallback before it gives up on an image that keeps
/// changing.
pub const MAX_PASSES: u32 = 4;
/// Most new blocks remembered for deduplication within one capture (about
/// 5 MiB; the transfer deduplicates against the whole vault anyway).
const MAX_DEDUP_ENTRIES: usize = 64 << 10;
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
    /// A changed-block hint (never trusted blindly: checked and sampled).
    pub hint: Option<&'a Hint>,
    /// How many clean blocks a hint is checked on.
    pub sampling: Sampling,
    /// The item's latest point in the vault (the parent a hint must be
    /// relative to), if any.
    pub parent_point: Option<&'a str>,
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
    /// A changed-block hint for the transfer to check and use (clone
    /// snapshots: the given one, or the reflink diff against the previous
    /// clone).
    pub transfer_hint: Option<Hint>,
}

/// Manifest file of a job in an item folder.
pub fn manifest_path(item_dir: &Path, job: &str) -> PathBuf {
    item_dir.join(format!("{job}.snap"))
}

/// Captures `req.source` into the area, with hooks around it.
pub fn capture(req: &CaptureRequest<'_>, progress: &dyn Progress) -> Result<Captured> {
    let started = Instant::now();
    let image = req.source.path().to_path_buf();
    // Whether the image is in use is asked of /proc on a thread of its
    // own while the capture runs: reading /proc/locks waits for an RCU
    // grace period (10-20 ms here), which would otherwise delay every
    // capture by as much.
    let (busy, (result, pre, post)) = std::thread::scope(|scope| {
        let checker = (!req.source.served()).then(|| {
            std::thread::Builder::new()
                .name("coffre-in-use".into())
                .spawn_scoped(scope, || in_use(&image))
        });
        let captured = capture_with_hooks(req, &image, progress);
        let busy = match checker {
            None => None,
            Some(Ok(t)) => t.join().unwrap_or_else(|_| in_use(&image)),
            Some(Err(_)) => in_use(&image),
        };
        (busy, captured)
    });
    let mut warnings = Vec::new();
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
        cbt: done.cbt,
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
        transfer_hint: done.transfer_hint,
    })
}

/// What a hook ended with (`None`: it was not run).
type HookOutcome = Option<std::result::Result<(), String>>;

/// The pre hook, the capture, then the post hook.
fn capture_with_hooks(
    req: &CaptureRequest<'_>,
    image: &Path,
    progress: &dyn Progress,
) -> (Result<Pending>, HookOutcome, HookOutcome) {
    let env = HookEnv {
        item: req.item,
        image,
        job: req.job,
        vault: req.vault_dir,
    };
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
    (result, pre, post)
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
    cbt: Option<CbtRecord>,
    transfer_hint: Option<Hint>,
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
        && !req.source.served()
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
        transfer_hint: req
            .hint
            .cloned()
            .or_else(|| reflink_hint(item_dir, req.job, &dst, &name)),
        clone: Some(name),
        stored_bytes: 0,
        bytes_read: 0,
        passes: 0,
        warnings: Vec::new(),
        cbt: None,
    }))
}

/// The newest complete chunk manifest of the item, other than `job`'s.
pub fn previous_manifest(item_dir: &Path, job: &str) -> Option<PathBuf> {
    previous_of_kind(item_dir, job, SnapKind::Chunks)
}

/// The reflink hint of a new clone: the extents it no longer shares with
/// the item's previous clone (`None` without a previous clone, or where
/// `FIEMAP` is refused).
fn reflink_hint(item_dir: &Path, job: &str, clone: &Path, name: &str) -> Option<Hint> {
    let previous = previous_of_kind(item_dir, job, SnapKind::Clone)?;
    let (h, meta, _) = crate::manifest::summary(&previous).ok()?;
    let old_name = meta.clone?;
    let old = std::fs::File::open(SafeName::new("clone", &old_name).ok()?.under(item_dir)).ok()?;
    let new = std::fs::File::open(clone).ok()?;
    let size = new.metadata().ok()?.len();
    let diff = crate::cbt::reflink::extents(&new)
        .and_then(|n| crate::cbt::reflink::extents(&old).map(|o| (n, o)));
    let (n, o) = match diff {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "FIEMAP refused; no reflink hint");
            return None;
        }
    };
    let mut hint = Hint::new(
        HintSource::Reflink,
        crate::cbt::reflink::changed(&n, &o, size.max(h.image_size)),
    );
    hint.since = Some(old_name);
    hint.generation = Some(name.to_string());
    Some(hint)
}

fn previous_of_kind(item_dir: &Path, job: &str, kind: SnapKind) -> Option<PathBuf> {
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
        if h.kind != kind {
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
            let exists = SafeName::new("pack", name).is_ok_and(|n| n.under(item_dir).exists());
            exists.then(|| {
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
    let bs = u64::from(req.block_size);
    let mut warnings = Vec::new();
    // A hint is checked against the previous snapshot before it is used,
    // then sampled during the first pass.
    let mut cbt = req.hint.map(|h| h.record(bs, blocks, None));
    let mut hinted: Option<(&Hint, Vec<u64>)> = None;
    if let (Some(hint), Some(record)) = (req.hint, cbt.as_mut()) {
        match hint_fallback(req, hint, previous.as_deref(), &remap) {
            None => hinted = Some((hint, hint.sample(bs, blocks, req.sampling, req.job))),
            Some(why) => {
                // An item's first backup has nothing to build on: expected,
                // not a warning.
                if req.parent_point.is_some() || previous.is_some() {
                    warnings.push(fallback_warning(hint.source.name(), &why, false));
                }
                record.used = false;
                record.fallback = Some(why);
            }
        }
    }
    let mut against = previous;
    let mut pass_files: Vec<PathBuf> = Vec::new();
    let mut bytes_read = 0;
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
            hinted.as_ref().map(|(h, s)| (*h, s.as_slice())),
            progress,
        )?;
        bytes_read += read.bytes_read;
        if let (Some(record), Some(_)) = (cbt.as_mut(), hinted.as_ref()) {
            record.sampled = read.sampled;
            record.mismatches = read.mismatches;
            if read.mismatches > 0 {
                // The hint lied: this pass's entries are dropped and the
                // pass is redone reading every block.
                let why = sample_mismatch(
                    read.mismatches,
                    read.sampled,
                    read.first_mismatch.unwrap_or_default(),
                );
                warnings.push(fallback_warning(&record.source, &why, true));
                record.used = false;
                record.fallback = Some(why);
                hinted = None;
                drop(writer);
                pass -= 1;
                continue;
            }
        }
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
        // The next pass deduplicates against this one, reading every
        // block: only what changed is stored again.
        hinted = None;
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
            cbt: None,
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
        cbt,
        transfer_hint: None,
    })
}

/// Why `hint` cannot be used against the previous snapshot `previous`
/// (`remap`: where its packs went; `None` for a lost one).
fn hint_fallback(
    req: &CaptureRequest<'_>,
    hint: &Hint,
    previous: Option<&Path>,
    remap: &[Option<u16>],
) -> Option<String> {
    let Some(previous) = previous else {
        return Some("the item has no previous snapshot to build on".into());
    };
    let (header, meta, _) = match crate::manifest::summary(previous) {
        Ok(s) => s,
        Err(e) => return Some(format!("the previous snapshot cannot be read: {e}")),
    };
    if header.block_size != req.block_size {
        return Some("the previous snapshot has another block size".into());
    }
    if req.parent_point != Some(meta.point.as_str()) {
        return Some(format!(
            "the previous snapshot (point {}) is not the item's latest vault point ({})",
            meta.point,
            req.parent_point.unwrap_or("none")
        ));
    }
    if remap.iter().any(Option::is_none) {
        return Some("a pack of the previous snapshot is missing".into());
    }
    let parent = Parent::of(header.image_size, meta.cbt.as_ref());
    hint.check(Some(&parent), req.source.size())
}

/// What one pass read.
struct PassRead {
    bytes_read: u64,
    sampled: u64,
    mismatches: u64,
    first_mismatch: Option<u64>,
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
/// With a `hint` (its dirty extents and the sorted clean blocks to
/// sample), clean blocks are taken from the previous snapshot unread and
/// the sampled ones are read and compared with it.
#[expect(clippy::too_many_arguments, reason = "one pass and its outputs")]
fn chunk_pass(
    req: &CaptureRequest<'_>,
    against: Option<&Path>,
    renumber: &[Option<u16>],
    pack: &mut PackWriter,
    pack_index: u16,
    writer: &mut SnapWriter,
    hint: Option<(&Hint, &[u64])>,
    progress: &dyn Progress,
) -> Result<PassRead> {
    use std::sync::atomic::{AtomicU64, Ordering};
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
    if hint.is_some() && prev.is_none() {
        return Err(SnapError::damaged(
            source.path(),
            "a changed-block hint needs the previous snapshot",
        ));
    }
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
    let mut read = PassRead {
        bytes_read: 0,
        sampled: 0,
        mismatches: 0,
        first_mismatch: None,
    };
    let first_mismatch = AtomicU64::new(u64::MAX);
    let mismatches = AtomicU64::new(0);
    progress.start(size);
    let window_blocks = (WINDOW_BYTES / bs).max(1);
    let mut first = 0u64;
    // One ordered writer: a thread of its own appends each window's new
    // records to the pack and its entries to the manifest while the pool
    // hashes and compresses the next window. The channel holds nothing
    // (a rendezvous), so at most two windows are in memory.
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Result<Block>>>(0);
        let seen = &mut seen;
        let pack_thread = std::thread::Builder::new()
            .name("coffre-pack".into())
            .spawn_scoped(scope, move || -> Result<()> {
                for blocks in rx {
                    store(blocks, pack, pack_index, seen, writer)?;
                }
                Ok(())
            })
            .map_err(|e| {
                SnapError::damaged(source.path(), format!("cannot start the pack writer: {e}"))
            })?;
        let joined = |t: std::thread::ScopedJoinHandle<'_, Result<()>>| {
            t.join().unwrap_or_else(|_| {
                Err(SnapError::damaged(
                    source.path(),
                    "the pack writer panicked",
                ))
            })
        };
        // A source that fetches its bytes (NBD) fetches the next window
        // on a thread of its own while the pool works on this one.
        let fetcher = if source.fetches() {
            Some(Fetcher::start(scope, source)?)
        } else {
            None
        };
        let plan = |at: u64| -> Result<Planned> {
            let p = plan_window(source, hint, bs, at, window_blocks);
            if let Some(f) = &fetcher
                && !p.ranges.is_empty()
            {
                f.request(p.offset, p.len, p.ranges.clone())?;
            }
            Ok(p)
        };
        let mut next = (first < blocks).then(|| plan(first)).transpose()?;
        while let Some(Planned {
            offset,
            n,
            len,
            dirty,
            sampled,
            ranges,
        }) = next.take()
        {
            if (req.cancelled)() {
                return Err(SnapError::Cancelled {
                    path: source.path().to_path_buf(),
                });
            }
            let window = match (&fetcher, ranges.is_empty()) {
                (_, true) => None,
                (Some(f), false) => Some(f.receive()?),
                (None, false) => Some(source.window_for(offset, len, &ranges)?),
            };
            if first + (n as u64) < blocks {
                next = Some(plan(first + n as u64)?);
            }
            read.sampled += sampled.iter().filter(|&&s| s).count() as u64;
            let before: Vec<SnapEntry> = match prev.as_mut() {
                Some(r) => r.next_entries(n)?,
                None => Vec::new(),
            };
            let wanted = |i: usize| is_read(dirty.as_deref(), &sampled, i);
            let out: Vec<Result<Block>> = req.pool.install(|| {
                // Each block is copied out of the mapping before it is
                // hashed and compressed: a guest writing to the image
                // must never make a record whose bytes are not its id
                // (a torn read is caught by the pass's change check).
                (0..n)
                    .into_par_iter()
                    .with_max_len(1)
                    .map_init(
                        || Vec::with_capacity(bs),
                        |copy, i| {
                            let reuse = |e: Option<&SnapEntry>| -> Result<Block> {
                                let e = e.ok_or_else(|| {
                                    SnapError::damaged(
                                        source.path(),
                                        "the previous snapshot ends early",
                                    )
                                })?;
                                if e.id.is_none() {
                                    return Ok(Block::Zero);
                                }
                                let mut e = *e;
                                e.loc.pack = renumber
                                    .get(usize::from(e.loc.pack))
                                    .copied()
                                    .flatten()
                                    .ok_or_else(|| {
                                        SnapError::damaged(
                                            source.path(),
                                            "a pack of the previous snapshot is missing",
                                        )
                                    })?;
                                Ok(Block::Reuse(e))
                            };
                            let Some(window) = window.as_ref().filter(|_| wanted(i)) else {
                                return reuse(before.get(i));
                            };
                            let start = i * bs;
                            let end = (start + bs).min(len);
                            let id = if window.is_hole(start..end) {
                                None
                            } else {
                                let bytes = window.bytes().get(start..end).unwrap_or_default();
                                copy.clear();
                                copy.extend_from_slice(bytes);
                                (!is_zero(copy)).then(|| ChunkId::of(copy))
                            };
                            if sampled.get(i) == Some(&true)
                                && before.get(i).and_then(|e| e.id) != id
                            {
                                mismatches.fetch_add(1, Ordering::Relaxed);
                                first_mismatch.fetch_min(first + i as u64, Ordering::Relaxed);
                            }
                            let Some(id) = id else {
                                return Ok(Block::Zero);
                            };
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
                            let record = enc.encode(id, copy).map_err(|e| {
                                SnapError::damaged(
                                    source.path(),
                                    format!("cannot encode a block: {e}"),
                                )
                            })?;
                            Ok(Block::New(id, record, Node::decode(copy).is_ok()))
                        },
                    )
                    .collect()
            });
            if let Some(window) = window {
                read.bytes_read += if dirty.is_some() {
                    ranges
                        .iter()
                        .map(|r| {
                            (r.start..r.end)
                                .step_by(bs)
                                .filter(|&s| !window.is_hole(s..(s + bs).min(r.end)))
                                .map(|s| ((s + bs).min(r.end) - s) as u64)
                                .sum::<u64>()
                        })
                        .sum()
                } else {
                    window.data_len()
                };
                window.finish()?;
            }
            source.check_unchanged()?;
            if tx.send(out).is_err() {
                // The writer stopped: its error says why.
                break;
            }
            progress.advance(len as u64);
            throttle.consume(len as u64);
            first += n as u64;
        }
        drop(tx);
        joined(pack_thread)
    })?;
    // (An image that shrank leaves the previous snapshot's tail unread.)
    drop(prev);
    progress.finish();
    read.mismatches = mismatches.into_inner();
    read.first_mismatch = Some(first_mismatch.into_inner()).filter(|&b| b != u64::MAX);
    Ok(read)
}

/// One window of a pass, planned: where it is, which of its blocks are
/// dirty and sampled (with a hint), and the byte ranges to read (none:
/// nothing in it is read).
struct Planned {
    offset: u64,
    n: usize,
    len: usize,
    dirty: Option<Vec<bool>>,
    sampled: Vec<bool>,
    ranges: Vec<std::ops::Range<usize>>,
}

/// Plans the window of a pass that starts at block `first`.
fn plan_window(
    source: &dyn ImageSource,
    hint: Option<(&Hint, &[u64])>,
    bs: usize,
    first: u64,
    window_blocks: usize,
) -> Planned {
    let size = source.size();
    let blocks = block_count(size, bs as u32);
    let n = window_span(hint, bs as u64, first, blocks, window_blocks);
    let offset = first * bs as u64;
    let len = (size - offset).min((n * bs) as u64) as usize;
    // Which blocks are read: all of them, or a hint's dirty and sampled
    // ones.
    let (dirty, sampled) = match hint {
        Some((h, samples)) => {
            let mut sampled = vec![false; n];
            let from = samples.partition_point(|&b| b < first);
            for &b in samples.get(from..).unwrap_or_default() {
                match sampled.get_mut((b - first) as usize) {
                    Some(flag) => *flag = true,
                    None => break,
                }
            }
            (Some(h.dirty_mask(bs as u64, first, n)), sampled)
        }
        None => (None, Vec::new()),
    };
    let ranges = wanted_ranges(n, bs, len, &|i| is_read(dirty.as_deref(), &sampled, i));
    Planned {
        offset,
        n,
        len,
        dirty,
        sampled,
        ranges,
    }
}

/// Whether a pass reads block `i` of its window: every block without a
/// hint (`dirty` is `None`), else the dirty and the sampled ones.
fn is_read(dirty: Option<&[bool]>, sampled: &[bool], i: usize) -> bool {
    dirty.is_none_or(|d| d.get(i).copied().unwrap_or(true) || sampled.get(i) == Some(&true))
}

/// Most windows one window of a hinted pass may span: 256 MiB of 64 KiB
/// blocks, a bound on the buffer a fetched or direct-read window
/// reserves (only the parts read are touched).
pub const MAX_SPAN_WINDOWS: usize = 16;

/// How many blocks from `first` (of `blocks`) the next window of a pass
/// spans: `window_blocks`, or with a hint (its dirty extents and sorted
/// samples) as many as hold `window_blocks` blocks to read, up to
/// [`MAX_SPAN_WINDOWS`] windows. A sparse hint's window then still gives
/// the pool enough work to share between its threads, and the records in
/// memory stay bounded by `window_blocks`.
pub fn window_span(
    hint: Option<(&Hint, &[u64])>,
    bs: u64,
    first: u64,
    blocks: u64,
    window_blocks: usize,
) -> usize {
    let rest = usize::try_from(blocks - first).unwrap_or(usize::MAX);
    let Some((h, samples)) = hint else {
        return window_blocks.min(rest);
    };
    let span = window_blocks.saturating_mul(MAX_SPAN_WINDOWS).min(rest);
    let dirty = h.dirty_mask(bs, first, span);
    let from = samples.partition_point(|&b| b < first);
    let mut sampled = samples.get(from..).unwrap_or_default().iter().peekable();
    let mut wanted = 0;
    for (i, d) in dirty.iter().enumerate() {
        let s = sampled.next_if(|&&b| b == first + i as u64).is_some();
        if *d || s {
            wanted += 1;
            if wanted >= window_blocks {
                return i + 1;
            }
        }
    }
    span
}

/// The byte ranges (relative to a window of `n` blocks, `len` bytes) of
/// the blocks `wanted` selects, merged.
pub fn wanted_ranges(
    n: usize,
    bs: usize,
    len: usize,
    wanted: &dyn Fn(usize) -> bool,
) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for i in (0..n).filter(|&i| wanted(i)) {
        let (a, b) = (i * bs, ((i + 1) * bs).min(len));
        match out.last_mut() {
            Some(last) if last.end == a => last.end = b,
            _ => out.push(a..b),
        }
    }
    out
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
    Ok(FileImage::open(&SafeName::new("clone", name)?.under(item_dir))?.with_direct_reads())
}

#[cfg(test)]
mod tests {
    use super::{MAX_SPAN_WINDOWS, is_zero, window_span};
    use crate::cbt::{Hint, HintSource};

    #[test]
    fn a_hinted_window_spans_until_it_holds_a_windows_worth_of_blocks_to_read() {
        let bs = 4096;
        // Without a hint: plain windows, the last one short.
        assert_eq!(window_span(None, bs, 0, 1000, 256), 256);
        assert_eq!(window_span(None, bs, 900, 1000, 256), 100);
        // Dirty blocks 0..100 and 3000..3200, samples at 300 and 301: the
        // first window ends at the 256th block to read (block 3153).
        let hint = Hint::new(HintSource::List, vec![0..100 * bs, 3000 * bs..3200 * bs]);
        let samples = [300, 301];
        let h = Some((&hint, &samples[..]));
        assert_eq!(window_span(h, bs, 0, 100_000, 256), 3154);
        // From there, 46 dirty blocks are left: the window runs to the
        // most a window may span.
        assert_eq!(
            window_span(h, bs, 3154, 100_000, 256),
            256 * MAX_SPAN_WINDOWS
        );
        // And never past the image's end.
        assert_eq!(window_span(h, bs, 3154, 4000, 256), 846);
        // A dense hint gives plain windows.
        let whole: std::ops::Range<u64> = 0..100_000 * bs;
        let all = Hint::new(HintSource::List, std::iter::once(whole).collect());
        assert_eq!(window_span(Some((&all, &[])), bs, 0, 100_000, 256), 256);
    }

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
