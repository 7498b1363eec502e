//! Listing snapshots, expiring them, and giving their space back.
//!
//! A snapshot expires when it is older than its item's instant-restore
//! days (1–5, measured on the injected clock). Expiry removes the manifest
//! (and a clone's image), then recomputes which records the remaining
//! manifests of the item still use: packs nothing uses are deleted, and
//! the unused ranges of the others are punched (`fallocate`), so the area
//! holds about one copy of the image plus the changes the kept snapshots
//! need. Expiring one snapshot never breaks a younger one, because the
//! younger one's references are what keep records alive.
//!
//! Leftovers of captures whose job died (`.snap.tmp`, `.passN.snap`, a
//! pack or clone without a manifest) go too, unless the job still runs.
//! A finished manifest (`JOB.snap`) that cannot be read is damage, not a
//! leftover: it stays, with its job's files, and while an item folder
//! holds one no pack there is deleted or punched, since what it uses is
//! unknown (nothing is destroyed on partial knowledge); the report names
//! it. (The hash-only snapshot files of older coffre versions, version 1,
//! lived in the vault, not in an area; prune removes those.)
//!
//! Expiry runs as root and deletes, so it touches only what coffre
//! writes: an item folder that is a symlink (or whose area is one) is
//! left alone with a warning, entries that are symlinks or not regular
//! files are skipped, and only names of coffre's own patterns
//! ([`own_file`]) are ever deleted or punched; anything else stays, with
//! a warning.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::Serialize;

use crate::area::Area;
use crate::error::Result;
use crate::manifest::{SnapHeader, SnapKind, SnapMeta, SnapReader, SnapTrailer, summary};
use crate::pack::PACK_HEADER_LEN;
use coffre_vault_store::format::name::SafeName;

/// One snapshot of an item.
#[derive(Debug, Clone)]
pub struct SnapInfo {
    /// Its manifest.
    pub manifest: PathBuf,
    /// Header.
    pub header: SnapHeader,
    /// Metadata.
    pub meta: SnapMeta,
    /// Trailer.
    pub trailer: SnapTrailer,
}

impl SnapInfo {
    /// The capture instant.
    pub fn created(&self) -> Timestamp {
        Timestamp::new(self.header.created_s, self.header.created_ns as i32)
            .unwrap_or(Timestamp::UNIX_EPOCH)
    }

    /// The folder holding its files.
    pub fn dir(&self) -> &Path {
        self.manifest.parent().unwrap_or(Path::new("."))
    }
}

/// A removed (or, in a dry run, removable) snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct ExpiredSnapshot {
    /// Item.
    pub item: String,
    /// Point id.
    pub point: String,
    /// Job that captured it.
    pub job: String,
    /// Capture instant.
    pub created: Timestamp,
    /// True when the vault holds no copy of the point: it is gone for good.
    pub only_copy: bool,
}

/// What expiry did in one item folder.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpiryReport {
    /// Snapshots removed.
    pub expired: Vec<ExpiredSnapshot>,
    /// Leftover and unreadable files removed.
    pub leftovers_removed: u64,
    /// Packs deleted because nothing uses them.
    pub packs_deleted: u64,
    /// Bytes given back (deleted files, punched ranges).
    pub bytes_freed: u64,
    /// Snapshots past the cutoff kept because a live restore holds their
    /// point (their point ids).
    pub held: Vec<String>,
    /// Finished manifests that cannot be read, kept: while there is one,
    /// the folder's packs are neither deleted nor punched.
    pub unreadable: Vec<PathBuf>,
}

/// What [`scan`] finds in an item folder.
#[derive(Debug, Default)]
pub struct Scanned {
    /// The complete snapshots, oldest first.
    pub snaps: Vec<SnapInfo>,
    /// Files of coffre's names that are no finished manifest (leftovers
    /// of captures, packs, clones).
    pub other: Vec<PathBuf>,
    /// Finished manifests that cannot be read (damaged, or sealed under
    /// another key).
    pub unreadable: Vec<PathBuf>,
}

/// The complete snapshots in an item folder, oldest first, the finished
/// manifests there that cannot be read, and the other files of coffre's
/// names.
///
/// Only regular files named by coffre's patterns ([`own_file`]) count;
/// an item folder that is (or whose area is) a symlink or no directory
/// holds nothing.
pub fn scan(
    item_dir: &Path,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
) -> Scanned {
    let mut found = Scanned::default();
    if !real_item_dir(item_dir) {
        return found;
    }
    let Ok(entries) = std::fs::read_dir(item_dir) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_own_regular_file(&e, &name) {
            continue;
        }
        let is_manifest = name.ends_with(".snap") && !name.contains(".pass");
        match is_manifest.then(|| summary(&path, keys)) {
            Some(Ok((header, meta, trailer))) => found.snaps.push(SnapInfo {
                manifest: path,
                header,
                meta,
                trailer,
            }),
            Some(Err(e)) => {
                tracing::warn!(manifest = %path.display(), error = %e, "a snapshot manifest cannot be read: kept, and its item folder's packs are left as they are");
                found.unreadable.push(path);
            }
            None => found.other.push(path),
        }
    }
    found
        .snaps
        .sort_by_key(|s| (s.header.created_s, s.header.created_ns));
    found
}

/// Every snapshot of `item` in the areas of the vault `vault_id` at
/// `vault_dir` (unlocked with `keys` when it is encrypted), oldest first.
pub fn snapshots_of(
    vault_dir: &Path,
    vault_id: &str,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    item: &str,
) -> Vec<SnapInfo> {
    let name = match SafeName::new("item", item) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "skipping the snapshots of an item whose name cannot be a folder");
            return Vec::new();
        }
    };
    let keys = match coffre_vault_store::copies::state_files::file_keys(vault_dir, keys) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "the vault's snapshots cannot be listed");
            return Vec::new();
        }
    };
    let mut all: Vec<SnapInfo> = Area::known_of(vault_dir, vault_id, keys.as_ref())
        .iter()
        .flat_map(|a| scan(&a.item_dir(&name), keys.as_ref()).snaps)
        .filter(|s| s.meta.item == item)
        .collect();
    all.sort_by_key(|s| (s.header.created_s, s.header.created_ns));
    all
}

/// The job id a file of an item folder belongs to (`JOB.snap`,
/// `JOB.snap.tmp`, `JOB.pass2.snap`, `JOB.pack`, `JOB.img`).
fn job_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    own_file(&name).map(str::to_string)
}

/// The job of `name` when it is one of the names coffre writes into an
/// item folder: `JOB.snap`, `JOB.snap.tmp`, `JOB.passN.snap`,
/// `JOB.passN.snap.tmp`, `JOB.pack` or `JOB.img`, `JOB` being a job id
/// (letters, digits, `_`, `-`; a letter or digit first). Anything else is
/// not coffre's and is never deleted.
pub fn own_file(name: &str) -> Option<&str> {
    let (job, rest) = name.split_once('.')?;
    let job_ok = job
        .as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphanumeric)
        && job.len() <= coffre_vault_store::format::name::MAX_NAME_LEN
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !job_ok {
        return None;
    }
    let rest = rest
        .strip_suffix(".tmp")
        .filter(|r| r.ends_with("snap"))
        .unwrap_or(rest);
    let ok = match rest {
        "snap" | "pack" | "img" => true,
        _ => rest
            .strip_prefix("pass")
            .and_then(|r| r.strip_suffix(".snap"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
    };
    ok.then_some(job)
}

/// True when the entry is a regular file (not a symlink) with one of
/// coffre's names; warns about anything else.
fn is_own_regular_file(e: &std::fs::DirEntry, name: &str) -> bool {
    // `file_type` does not follow a symlink.
    let regular = e.file_type().is_ok_and(|t| t.is_file());
    if regular && own_file(name).is_some() {
        return true;
    }
    tracing::warn!(file = %e.path().display(), "not a snapshot file of coffre (a symlink, a folder or another name); left alone");
    false
}

/// True when `item_dir` and its area are real directories (or the item
/// folder is absent); warns otherwise.
fn real_item_dir(item_dir: &Path) -> bool {
    let parent = item_dir.parent().filter(|p| !p.as_os_str().is_empty());
    for dir in parent.into_iter().chain([item_dir]) {
        if let Err(e) = crate::area::check_real_dir(dir) {
            tracing::warn!(error = %e, "snapshots there are neither listed nor expired");
            return false;
        }
    }
    true
}

/// Expires the snapshots in `item_dir` captured at or before `cutoff`,
/// except those whose point `held` says a live restore reads, removes
/// leftovers of jobs `running` says are over, and gives unused pack space
/// back. `in_vault(point)` says whether the vault holds the point (to
/// flag the only copies).
#[allow(clippy::too_many_arguments)]
pub fn expire(
    item_dir: &Path,
    cutoff: Timestamp,
    in_vault: &dyn Fn(&str) -> bool,
    running: &dyn Fn(&str) -> bool,
    held: &dyn Fn(&str) -> bool,
    dry_run: bool,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
) -> Result<ExpiryReport> {
    let mut report = ExpiryReport::default();
    let Scanned {
        snaps,
        other,
        unreadable,
    } = scan(item_dir, keys);
    let (going, kept): (Vec<SnapInfo>, Vec<SnapInfo>) = snaps
        .into_iter()
        .partition(|s| s.created() <= cutoff && !held(&s.meta.point));
    report.held = kept
        .iter()
        .filter(|s| s.created() <= cutoff)
        .map(|s| s.meta.point.clone())
        .collect();
    // An unreadable manifest's job keeps its files too.
    let unreadable_jobs: Vec<String> = unreadable.iter().filter_map(|p| job_of(p)).collect();
    let kept_jobs: std::collections::HashSet<&str> = kept
        .iter()
        .map(|s| s.meta.job.as_str())
        .chain(unreadable_jobs.iter().map(String::as_str))
        .collect();
    report.unreadable = unreadable;
    for s in &going {
        report.expired.push(ExpiredSnapshot {
            item: s.meta.item.clone(),
            point: s.meta.point.clone(),
            job: s.meta.job.clone(),
            created: s.created(),
            only_copy: !in_vault(&s.meta.point),
        });
        if !dry_run {
            // The manifest's decoder checked the name; a clone becomes a
            // path only through the validated type all the same.
            match s.meta.clone.as_deref().map(|c| SafeName::new("clone", c)) {
                Some(Ok(clone)) => report.bytes_freed += remove(&clone.under(item_dir)),
                Some(Err(e)) => {
                    tracing::warn!(manifest = %s.manifest.display(), error = %e, "not removing a clone whose name leaves the item folder");
                }
                None => {}
            }
            report.bytes_freed += remove(&s.manifest);
        }
    }
    // Leftovers: files of no kept snapshot whose job is over. Packs are
    // judged by use below, not by name.
    for path in other {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.as_deref().is_some_and(|n| n.ends_with(".pack")) {
            continue;
        }
        let job = job_of(&path).unwrap_or_default();
        if kept_jobs.contains(job.as_str()) || running(&job) {
            continue;
        }
        if name.as_deref() == Some(crate::area::AREA_FILE) {
            continue;
        }
        report.leftovers_removed += 1;
        if !dry_run {
            report.bytes_freed += remove(&path);
        }
    }
    // What an unreadable manifest uses is unknown: no pack is deleted or
    // punched while there is one.
    if dry_run || !report.unreadable.is_empty() {
        return Ok(report);
    }
    // Packs: what the kept manifests use.
    let mut live: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for s in kept.iter().filter(|s| s.header.kind == SnapKind::Chunks) {
        let mut r = SnapReader::open(&s.manifest, keys)?;
        loop {
            let entries = r.next_entries(64 << 10)?;
            if entries.is_empty() {
                break;
            }
            for e in entries.iter().filter(|e| e.id.is_some()) {
                if let Some(name) = s.meta.packs.get(usize::from(e.loc.pack)) {
                    live.entry(name.clone())
                        .or_default()
                        .push((e.loc.offset, e.loc.end()));
                }
            }
        }
    }
    if !real_item_dir(item_dir) {
        return Ok(report);
    }
    let Ok(entries) = std::fs::read_dir(item_dir) else {
        return Ok(report);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".pack") || !is_own_regular_file(&e, &name) {
            continue;
        }
        let path = e.path();
        match live.get_mut(&name) {
            None => {
                let job = job_of(&path).unwrap_or_default();
                if running(&job) {
                    continue;
                }
                report.packs_deleted += 1;
                report.bytes_freed += remove(&path);
            }
            Some(ranges) => report.bytes_freed += punch_dead(&path, ranges),
        }
    }
    Ok(report)
}

/// Removes a file; returns the bytes it occupied.
fn remove(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    // A pack the vault adopted keeps its blocks under the segment's name.
    let bytes =
        std::fs::metadata(path).map_or(0, |m| if m.nlink() > 1 { 0 } else { m.blocks() * 512 });
    match std::fs::remove_file(path) {
        Ok(()) => bytes,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove snapshot file");
            }
            0
        }
    }
}

/// Punches the ranges of a pack outside `live` (after its header).
/// Returns the bytes given back. Best effort: a filesystem that cannot
/// punch keeps the bytes until the pack is deleted.
fn punch_dead(path: &Path, live: &mut [(u64, u64)]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(f) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    else {
        return 0;
    };
    if coffre_vault_store::copies::segment::pack_is_adopted(&f) {
        // The vault adopted this pack as a segment: the ranges no snapshot
        // uses may still be the vault's, and its GC gives them back once
        // the pack has left the area.
        return 0;
    }
    let before = f.metadata().map_or(0, |m| m.blocks() * 512);
    let len = f.metadata().map_or(0, |m| m.len());
    let gaps = coffre_vault_store::format::segment::uncovered(PACK_HEADER_LEN, len, live);
    for (s, e) in gaps {
        // Whole 4 KiB pages only: the kernel would zero partial ones, which
        // is harmless, but it gives nothing back.
        let (s, e) = (s.next_multiple_of(4096), e / 4096 * 4096);
        if e > s {
            // SAFETY: fallocate on a descriptor we own, inside the file.
            unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    s as libc::off_t,
                    (e - s) as libc::off_t,
                );
            }
        }
    }
    let _ = f.sync_all();
    let after = f.metadata().map_or(before, |m| m.blocks() * 512);
    before.saturating_sub(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::RecordBuf;
    use crate::read::SnapshotBlocks;
    use crate::test_support::{BS, area_in, count_warnings, noise, take_snapshot};

    fn take(area: &Area, vault: &Path, job: &str, image: &[u8], at: i64) -> SnapInfo {
        let manifest = take_snapshot(area, vault, job, image, at);
        let (header, meta, trailer) = summary(&manifest, None).unwrap();
        SnapInfo {
            manifest,
            header,
            meta,
            trailer,
        }
    }

    fn read_back(s: &SnapInfo) -> Vec<u8> {
        let mut b = SnapshotBlocks::open(&s.manifest, None).unwrap();
        let size = b.header().image_size as usize;
        let n = size.div_ceil(BS);
        let mut out = vec![0u8; size];
        let w = b.window(0, n, 0, size).unwrap();
        let mut buf = RecordBuf::default();
        for i in 0..n {
            if let Some((Some(id), _)) = w.block(i) {
                w.decode_record(i, &id, &mut buf).unwrap();
                out[i * BS..i * BS + buf.plain().len()].copy_from_slice(buf.plain());
            }
        }
        w.finish().unwrap();
        b.finish().unwrap();
        out
    }

    #[test]
    fn day_two_stores_the_change_and_expiry_keeps_what_younger_snapshots_use() {
        let t = tempfile::tempdir().unwrap();
        let (vault, area) = area_in(t.path());
        let mut day = noise(1, 64 * BS);
        let s1 = take(&area, &vault, "j1", &day, 1_000);
        // Day two: 4 of 64 blocks change.
        for b in [3usize, 17, 40, 41] {
            day[b * BS..(b + 1) * BS].copy_from_slice(&noise(b as u8 + 9, BS));
        }
        let s2 = take(&area, &vault, "j2", &day, 2_000);
        assert!(s1.trailer.stored_bytes > 60 * BS as u64);
        let d2 = s2.trailer.stored_bytes;
        assert!(
            d2 > 3 * BS as u64 && d2 < 5 * BS as u64,
            "day two stored {d2}"
        );
        day[0..BS].copy_from_slice(&noise(77, BS));
        let s3 = take(&area, &vault, "j3", &day, 3_000);
        let want3 = day.clone();

        // Expire the first two: the third still reads back whole, and the
        // first pack keeps only what the third uses.
        let dir = area.item_dir(&SafeName::new("item", "vm").unwrap());
        let r = expire(
            &dir,
            Timestamp::from_second(2_500).unwrap(),
            &|_| true,
            &|_| false,
            &|_| false,
            false,
            None,
        )
        .unwrap();
        assert_eq!(r.expired.len(), 2);
        assert!(r.expired.iter().all(|e| !e.only_copy));
        assert!(!s1.manifest.exists() && !s2.manifest.exists());
        assert!(r.bytes_freed > 0, "{r:?}");
        assert_eq!(read_back(&s3), want3);
        // j2's pack holds blocks j3 still uses (3, 17, 40, 41): kept.
        assert!(dir.join("j2.pack").exists());
        assert_eq!(scan(&dir, None).snaps.len(), 1);
        // A live restore holds the third's point: past the cutoff, it is
        // kept whole and said so.
        let point3 = s3.meta.point.clone();
        let r = expire(
            &dir,
            Timestamp::from_second(9_999).unwrap(),
            &|_| true,
            &|_| false,
            &|p| p == point3,
            false,
            None,
        )
        .unwrap();
        assert!(r.expired.is_empty(), "{r:?}");
        assert_eq!(r.held, vec![point3.clone()]);
        assert_eq!(r.packs_deleted, 0, "{r:?}");
        assert_eq!(read_back(&s3), want3);
        // Everything expires: every pack goes.
        let r = expire(
            &dir,
            Timestamp::from_second(9_999).unwrap(),
            &|_| false,
            &|_| false,
            &|_| false,
            false,
            None,
        )
        .unwrap();
        assert_eq!(r.expired.len(), 1);
        assert!(r.expired[0].only_copy);
        assert_eq!(r.packs_deleted, 3, "{r:?}");
    }

    #[test]
    fn an_unreadable_manifest_is_kept_and_no_pack_is_touched_while_it_is_there() {
        let t = tempfile::tempdir().unwrap();
        let (vault, area) = area_in(t.path());
        let mut day = noise(2, 16 * BS);
        let s1 = take(&area, &vault, "j1", &day, 1_000);
        day[..BS].copy_from_slice(&noise(50, BS));
        let s2 = take(&area, &vault, "j2", &day, 2_000);
        let dir = area.item_dir(&SafeName::new("item", "vm").unwrap());
        // j2's manifest damaged (its header): unreadable now.
        let mut bytes = std::fs::read(&s2.manifest).unwrap();
        bytes[24] ^= 0x40;
        std::fs::write(&s2.manifest, &bytes).unwrap();
        let size = |p: &str| std::fs::metadata(dir.join(p)).unwrap().len();
        let packs_before = (size("j1.pack"), size("j2.pack"));
        let r = expire_all(&dir);
        // j1 expires; j2's manifest stays, named; no pack is deleted or
        // punched, since what j2 uses is unknown.
        assert_eq!(r.expired.len(), 1, "{r:?}");
        assert!(!s1.manifest.exists());
        assert_eq!(r.unreadable, vec![s2.manifest.clone()]);
        assert!(s2.manifest.exists());
        assert_eq!(r.packs_deleted, 0, "{r:?}");
        assert_eq!((size("j1.pack"), size("j2.pack")), packs_before);
        assert_eq!(r.leftovers_removed, 0, "{r:?}");
        // The manifest put right, the next expiry reads it and goes on.
        bytes[24] ^= 0x40;
        std::fs::write(&s2.manifest, &bytes).unwrap();
        let r = expire_all(&dir);
        assert!(r.unreadable.is_empty());
        assert_eq!(r.expired.len(), 1, "{r:?}");
        assert_eq!(r.packs_deleted, 2, "{r:?}");
    }

    fn expire_all(dir: &Path) -> ExpiryReport {
        expire(
            dir,
            Timestamp::from_second(9_999).unwrap(),
            &|_| false,
            &|_| false,
            &|_| false,
            false,
            None,
        )
        .unwrap()
    }

    /// Files named as coffre names its own (and others), in `dir`.
    fn plant(dir: &Path) -> Vec<PathBuf> {
        let names = [
            "passwd",
            "j9.snap.tmp",
            "j9.pack",
            "j9.img",
            "j9.pass1.snap",
        ];
        names
            .iter()
            .map(|n| {
                let p = dir.join(n);
                std::fs::write(&p, vec![7u8; 8192]).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn an_item_folder_swapped_for_a_symlink_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let (vault, area) = area_in(t.path());
        take(&area, &vault, "j1", &noise(1, 8 * BS), 1_000);
        let dir = area.item_dir(&SafeName::new("item", "vm").unwrap());
        // Someone swaps the item folder for a symlink to another folder.
        let sentinel = t.path().join("etc");
        std::fs::create_dir(&sentinel).unwrap();
        let planted = plant(&sentinel);
        std::fs::rename(&dir, t.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&sentinel, &dir).unwrap();
        let (r, warned) = count_warnings(|| expire_all(&dir));
        assert!(warned > 0, "no warning");
        assert_eq!(r.expired.len() + r.leftovers_removed as usize, 0, "{r:?}");
        assert_eq!(r.packs_deleted, 0, "{r:?}");
        for p in &planted {
            assert_eq!(
                std::fs::read(p).unwrap(),
                vec![7u8; 8192],
                "{}",
                p.display()
            );
        }
        let found = scan(&dir, None);
        assert!(found.snaps.is_empty() && found.other.is_empty() && found.unreadable.is_empty());
        // Backups refuse the folder too.
        let err = area.check_unlocked("vm").unwrap_err();
        assert!(
            matches!(err, crate::error::SnapError::AreaRefused { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    #[test]
    fn only_coffres_own_regular_files_are_deleted() {
        let t = tempfile::tempdir().unwrap();
        let (vault, area) = area_in(t.path());
        take(&area, &vault, "j1", &noise(1, 8 * BS), 1_000);
        let dir = area.item_dir(&SafeName::new("item", "vm").unwrap());
        // A leftover of a dead job goes; other names and symlinks stay.
        let dead = dir.join("dead.snap.tmp");
        std::fs::write(&dead, b"x").unwrap();
        let foreign = [
            "notes.txt",
            "README",
            ".hidden.snap",
            "a.b.snap.tmp",
            "x.snap.bak",
        ];
        for n in foreign {
            std::fs::write(dir.join(n), b"mine").unwrap();
        }
        let outside = t.path().join("outside.pack");
        std::fs::write(&outside, vec![1u8; 8192]).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("zz.pack")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("zz.img")).unwrap();
        let (r, warned) = count_warnings(|| expire_all(&dir));
        assert!(warned >= foreign.len(), "{warned} warnings");
        assert_eq!(r.expired.len(), 1, "{r:?}");
        assert!(!dead.exists());
        assert!(!dir.join("j1.pack").exists() && !dir.join("j1.snap").exists());
        for n in foreign {
            assert_eq!(std::fs::read(dir.join(n)).unwrap(), b"mine", "{n}");
        }
        assert!(dir.join("zz.pack").symlink_metadata().is_ok());
        assert!(dir.join("zz.img").symlink_metadata().is_ok());
        assert_eq!(std::fs::read(&outside).unwrap(), vec![1u8; 8192]);
    }

    #[test]
    fn coffres_names_are_recognised() {
        for n in [
            "j1.snap",
            "j1.snap.tmp",
            "j1.pass2.snap",
            "j1.pass12.snap.tmp",
            "direct1a2b.pack",
            "0000000000000bad.img",
        ] {
            assert!(own_file(n).is_some(), "{n}");
        }
        for n in [
            "passwd",
            "j1.tmp",
            "j1.pass.snap",
            "j1.passx.snap",
            ".j1.snap",
            "a.b.snap",
            "j1.snap.bak",
            "j1.pack.tmp",
            "area",
        ] {
            assert!(own_file(n).is_none(), "{n}");
        }
    }
}
