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

mod change;
mod chunk_pass;
mod clone_path;
mod passes;
mod previous;
mod window;

use std::path::{Path, PathBuf};
use std::time::Instant;

use coffre_vault_store::format::name::SafeName;
use jiff::Timestamp;

use crate::area::Area;
use crate::cbt::{CbtRecord, Hint, Sampling};
use crate::error::{Result, SnapError};
use crate::hooks::{Around, HookEnv, Hooks, failed_hooks_warning};
use crate::in_use::in_use;
use crate::manifest::{SnapHeader, SnapKind, SnapMeta, SnapWriter};
use crate::pack::PackWriter;
use crate::progress::Progress;
use crate::source::{FileImage, ImageSource, PointInTime};
use clone_path::try_clone;
use coffre_vault_store::format::level::Level;
use passes::capture_chunks;

pub use chunk_pass::is_zero;
pub use previous::previous_manifest;
pub use window::{MAX_SPAN_WINDOWS, wanted_ranges, window_span};

/// Bytes mapped at a time (rounded to whole blocks).
pub const WINDOW_BYTES: usize = 8 << 20;
/// Passes of the fallback before it gives up on an image that keeps
/// changing.
pub const MAX_PASSES: u32 = 4;

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
    /// An encrypted vault's keys: the snapshot's records are sealed and
    /// its chunk ids keyed, as in the vault.
    pub keys: Option<std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
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
    /// The point in time was taken before the capture (a running VM's,
    /// [`crate::source::LiveSource`]): its hooks already ran around the
    /// instant, and its level is the one given.
    pub taken: Option<&'a PointInTime>,
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
    let (busy, (result, hooks)) = std::thread::scope(|scope| {
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
    let hooks_ok = hooks.succeeded(req.hooks, &mut warnings);
    let mut done = result?;
    let level = match req.taken {
        Some(t) => {
            warnings.extend(t.warnings.iter().cloned());
            t.level
        }
        None => Level::of(hooks_ok, busy.is_some(), done.kind == SnapKind::Clone),
    };
    if req.hooks.is_set() && req.taken.is_none() && !hooks_ok {
        warnings.push(failed_hooks_warning(level));
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

/// The pre hook, the capture, then the post hook; a point taken before
/// the capture had its hooks run around its instant.
fn capture_with_hooks(
    req: &CaptureRequest<'_>,
    image: &Path,
    progress: &dyn Progress,
) -> (Result<Pending>, Around) {
    let capture = || {
        req.area
            .check_unlocked(req.item)
            .and_then(|item_dir| capture_files(req, &item_dir, progress))
    };
    if req.taken.is_some() {
        return (capture(), Around::default());
    }
    let env = HookEnv {
        item: req.item,
        image,
        job: req.job,
        vault: req.vault_dir,
    };
    Around::run(req.hooks, env, capture)
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
