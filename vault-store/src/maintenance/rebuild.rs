//! `vault rebuild-index`: the RocksDB index is a cache of the copies, and
//! this rebuilds it from them.
//!
//! The source copy's segments are scanned record by record
//! ([`crate::format::scan`]) for the chunk locations; the catalog files of every
//! readable synchronous copy (source first) give the items, policies and
//! points, each file from the first copy whose bytes decode
//! ([`index_catalog`]), so a point on any copy is indexed. A catalog file
//! that decodes on no copy, or a segment a read failed in on every copy,
//! stops the rebuild before the index is installed ([`refusal`]): an index
//! that lacks them would let the next writer quarantine that point's
//! manifests and GC its chunks, or cut the segment at the failure. Where a chunk appears more than once (a GC rewrite whose old
//! segment was not yet deleted, a backup that crashed after its fsync), the
//! copy in the newest segment wins. The reference counts are then derived
//! from the points exactly as the one-time upgrade does, the first writer
//! cuts anything past each segment's committed length, and the catalog
//! files on every copy are made to match.
//!
//! A segment's committed length is the furthest end of intact records on
//! any synchronous copy, not only the source's (see [`index_segments`]):
//! the source may be the copy that lost a tail. The new index is built
//! aside and put in place whole, with the vault marked incomplete until
//! then (`crate::index::state`): a killed rebuild never leaves an index
//! that looks complete.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::format::catalog_files::{self, ITEMS_DIR, POINTS_DIR, POLICIES_DIR};
use crate::format::chunk_id::ChunkId;
use crate::format::record::{HEADER_LEN, RecordHeader, record_authentic};
use crate::format::scan::{Found, scan_segment};
use crate::format::segment::{
    SEGMENT_HEADER_LEN, SEGMENTS_DIR, parse_segment_file_name, segment_name,
};
use crate::index::{ChunkLocation, Index, IndexBatch, SegmentInfo};
use crate::store::local::lock::VaultLock;
use crate::store::{LocalStore, SharedStore, Store};
use crate::vault::{Access, OpenOptions, Vault};
use std::sync::Arc;

/// What a rebuild found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RebuildReport {
    /// The copy it read.
    pub source: PathBuf,
    /// Segments scanned.
    pub segments: u64,
    /// Chunks indexed.
    pub chunks: u64,
    /// Records seen again in an older segment (left as dead bytes).
    pub duplicates: u64,
    /// Where those duplicates are: (segment, chunk). A shared vault's GC
    /// keeps a segment holding a copy of a referenced chunk, whichever
    /// copy the index uses (another host's cache may use this one).
    #[serde(skip)]
    pub duplicate_places: Vec<(u64, ChunkId)>,
    /// Bytes between records that belong to none (holes, damage).
    pub skipped_bytes: u64,
    /// Segments whose committed length reaches past the source's end
    /// because another copy holds more intact records.
    pub extended_segments: u64,
    /// Segments whose header is damaged (their records are still used).
    pub bad_headers: Vec<String>,
    /// Items, policies and points restored from the catalog files.
    pub items: u64,
    /// Policies.
    pub policies: u64,
    /// Points.
    pub points: u64,
    /// Catalog files that could not be decoded (skipped).
    pub bad_files: Vec<String>,
    /// Catalog files left out because their names break the naming rule
    /// (`FORMAT.md`, "Names"): crafted or foreign, never a point coffre
    /// acknowledged. `verify` reports them.
    pub refused_names: Vec<String>,
    /// Segments a read failed in (the store did not answer, not damage):
    /// their records past the failure are missing from the index.
    pub unreadable_segments: Vec<String>,
    /// Wall time.
    pub duration_ms: u64,
}

/// Commit the chunk locations in batches of this many.
const BATCH_CHUNKS: usize = 50_000;

/// Rebuilds the index of the vault at `dir` from the copy at `source`
/// (`dir` itself, a replica or the secondary) and returns the vault open
/// for writing.
pub fn rebuild_index(dir: &Path, source: &Path, wait: Duration) -> Result<(Vault, RebuildReport)> {
    rebuild_index_with(dir, source, wait, None, None)
}

/// [`rebuild_index`] of an encrypted vault, unlocked with `unlock`.
pub fn rebuild_index_unlocked(
    dir: &Path,
    source: &Path,
    wait: Duration,
    unlock: Option<Arc<dyn crate::crypto::Unlock>>,
) -> Result<(Vault, RebuildReport)> {
    rebuild_index_with(dir, source, wait, None, unlock)
}

/// [`rebuild_index`], with each store the rebuild reads wrapped by `wrap`
/// (the source as [`crate::format::catalog_files::Role::Primary`], the other copies as
/// replicas): tests inject read errors this way.
pub(crate) fn rebuild_index_with(
    dir: &Path,
    source: &Path,
    wait: Duration,
    wrap: Option<crate::copies::StoreWrap>,
    unlock: Option<Arc<dyn crate::crypto::Unlock>>,
) -> Result<(Vault, RebuildReport)> {
    let started = std::time::Instant::now();
    if !dir.join(crate::format::config::CONFIG_FILE).is_file() {
        return Err(StoreError::NotAVault {
            path: dir.to_path_buf(),
        });
    }
    let config = crate::format::config::VaultConfig::load_with(dir, unlock.as_deref())?;
    let store: SharedStore = if source == dir {
        crate::copies::primary_store(dir)?
    } else {
        Arc::new(LocalStore::new(source))
    };
    let store = match &wrap {
        Some(w) => w(crate::format::catalog_files::Role::Primary, store),
        None => store,
    };
    if source != dir {
        crate::copies::check_copy(
            store.as_ref(),
            source,
            &config.vault_id,
            false,
            config.keys().map(|k| k.as_ref()),
        )
        .map_err(|reason| StoreError::CopyUnavailable {
            path: source.to_path_buf(),
            reason,
        })?;
    }
    let lock = VaultLock::acquire_wait(dir, wait)?;
    // The index is marked incomplete before anything of it changes, built
    // aside, and put in place whole (see `crate::index::state`): a rebuild
    // killed at any point leaves a vault every open refuses until a
    // rebuild finishes, never an index that looks complete and is not.
    crate::index::state::mark_incomplete(dir, &format!("source {}", source.display()))?;
    let built = crate::index::state::fresh_build_dir(dir)?;
    let mut report = RebuildReport {
        source: source.to_path_buf(),
        ..RebuildReport::default()
    };
    {
        let index = Index::open_write(&built)?;
        // The catalog first: in a shared vault other hosts keep writing,
        // and a point's manifest is written only after its segments, so
        // segments listed after the manifests hold every chunk they name.
        let mut others = other_copies(dir, source, &config);
        if let Some(w) = &wrap {
            others = others
                .into_iter()
                .map(|o| w(crate::format::catalog_files::Role::Replica, o))
                .collect();
        }
        index_catalog(
            store.as_ref(),
            &others,
            &index,
            &mut report,
            config.keys().map(|k| k.as_ref()),
        )?;
        index_segments(
            store.as_ref(),
            &others,
            &index,
            config.keys().map(|k| k.as_ref()),
            &mut report,
        )?;
        index.flush()?;
    }
    // An index that lacks a point some copy holds, or the records past a
    // read error, is not installed: the next writer would quarantine the
    // point's manifests and GC its chunks, or cut the segment's copies to
    // where the read failed. The marker stays; the old index is untouched.
    if let Some(reason) = refusal(&report) {
        drop(LocalStore::new(dir).remove_tree(crate::index::state::BUILD_DIR));
        tracing::error!(vault = %dir.display(), %reason, "index not rebuilt");
        return Err(StoreError::RebuildRefused {
            path: dir.to_path_buf(),
            reason,
        });
    }
    crate::index::state::install_rebuilt(dir)?;
    drop(lock);
    let vault = Vault::open_with(
        dir,
        Access::Write,
        &OpenOptions {
            unlock,
            ..rebuild_open_options(wait)
        },
    )?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(vault = %dir.display(), source = %source.display(), chunks = report.chunks, points = report.points, "rebuilt the index");
    Ok((vault, report))
}

/// Why the index built into `report` must not be installed, if it must
/// not.
fn refusal(report: &RebuildReport) -> Option<String> {
    let mut problems = Vec::new();
    if !report.bad_files.is_empty() {
        problems.push(format!(
            "catalog files no copy holds in a form that decodes: {} (the points, items or policies they hold would be missing from the index, and the next writer and gc would discard what they need). If such a file is garbage (say, a manifest of a backup that never finished), move it out of the vault by hand on every copy; otherwise restore it from a backup of the vault. Then run `coffre vault rebuild-index` again",
            report.bad_files.join("; ")
        ));
    }
    if !report.unreadable_segments.is_empty() {
        problems.push(format!(
            "segments a read failed in, on every copy that holds them: {} (the records past the failure would be missing from the index, and the next writer would cut every copy to where the read failed). Make the storage answer, or rebuild from another copy with `--from COPY`, then run `coffre vault rebuild-index` again",
            report.unreadable_segments.join("; ")
        ));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// The other synchronous copies of a local vault (its directory and its
/// LRS replicas, less `source`), those that can be read now.
fn other_copies(
    dir: &Path,
    source: &Path,
    config: &crate::format::config::VaultConfig,
) -> Vec<SharedStore> {
    // A shared vault's cache, or a replica or secondary opened on its own
    // (a vault by itself): the source is the only copy.
    if crate::format::remote::Remote::load(dir)
        .ok()
        .flatten()
        .is_some()
        || crate::vault::copy_role(dir, config.keys().map(|k| k.as_ref()))
            != crate::format::catalog_files::Role::Primary
    {
        return Vec::new();
    }
    std::iter::once(dir.to_path_buf())
        .chain(config.replicas.iter().cloned())
        .filter(|d| d != source && d.is_dir())
        .filter(|d| {
            crate::copies::check_copy(
                &LocalStore::new(d),
                d,
                &config.vault_id,
                false,
                config.keys().map(|k| k.as_ref()),
            )
            .is_ok()
        })
        .map(|d| Arc::new(LocalStore::new(d)) as SharedStore)
        .collect()
}

/// Scan of segment `name` (`id`) on `store`, when every read of it
/// succeeded.
fn whole_scan(store: &dyn Store, id: u64, name: &str) -> Option<crate::format::scan::Scan> {
    let size = store.size(name).ok().flatten()?;
    let mut ok = true;
    let mut read = |off: u64, buf: &mut [u8]| {
        let r = store.read_at(name, off, buf).is_ok();
        ok &= r;
        r
    };
    let scan = scan_segment(id, size, &mut read);
    ok.then_some(scan)
}

/// Intact records of segment `name` in `store` that follow one another
/// from `from` on (each read whole, its CRC-32 checked and, in an encrypted
/// vault, its seal opened with `keys`); stops at the first that is not.
fn intact_records_from(
    store: &dyn Store,
    name: &str,
    from: u64,
    size: u64,
    keys: Option<&crate::crypto::VaultKeys>,
) -> Vec<Found> {
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    let mut at = from;
    let mut head = [0u8; HEADER_LEN];
    while at + HEADER_LEN as u64 <= size {
        if store.read_at(name, at, &mut head).is_err() {
            break;
        }
        let Ok(h) = RecordHeader::parse(&head) else {
            break;
        };
        let len = h.record_len();
        if at + len > size {
            break;
        }
        let mut rec = vec![0u8; len as usize];
        if store.read_at(name, at, &mut rec).is_err()
            || !record_authentic(&rec, None, keys, &mut scratch)
        {
            break;
        }
        out.push(Found {
            offset: at,
            id: h.id,
            len: len as u32,
            plain_len: h.plain_len,
        });
        at += len;
    }
    out
}

/// Indexes every segment of the source copy (and those only another
/// copy still has). A segment's committed length is the furthest end of
/// intact records on any copy: the source's scan, extended by the
/// records another copy holds whole past it. So the next writer, which
/// cuts every copy to the committed length (and refills a shorter one),
/// never cuts a record a copy holds intact: a rebuild from one copy never
/// shortens the others below what they validly hold.
fn index_segments(
    store: &dyn Store,
    others: &[SharedStore],
    index: &Index,
    keys: Option<&crate::crypto::VaultKeys>,
    report: &mut RebuildReport,
) -> Result<()> {
    let mut ids: Vec<(u64, Option<usize>)> = store
        .list(SEGMENTS_DIR)?
        .iter()
        .filter_map(|n| parse_segment_file_name(n))
        .map(|id| (id, None))
        .collect();
    let known: HashSet<u64> = ids.iter().map(|(id, _)| *id).collect();
    let mut only_elsewhere: Vec<(u64, Option<usize>)> = Vec::new();
    for (i, o) in others.iter().enumerate() {
        for id in o
            .list(SEGMENTS_DIR)?
            .iter()
            .filter_map(|n| parse_segment_file_name(n))
        {
            if !known.contains(&id) && !only_elsewhere.iter().any(|(x, _)| *x == id) {
                only_elsewhere.push((id, Some(i)));
            }
        }
    }
    ids.extend(only_elsewhere);
    ids.sort_unstable_by_key(|b| std::cmp::Reverse(b.0));
    let mut seen: HashSet<ChunkId> = HashSet::new();
    for (id, base) in ids {
        let name = segment_name(id);
        let base: &dyn Store = match base.and_then(|i| others.get(i)) {
            Some(o) => o.as_ref(),
            None => store,
        };
        let size = base.size(&name)?.unwrap_or(0);
        let mut failed: Option<StoreError> = None;
        let mut read = |off: u64, buf: &mut [u8]| match base.read_at(&name, off, buf) {
            Ok(()) => true,
            Err(e) => {
                failed.get_or_insert(e);
                false
            }
        };
        let mut scan = scan_segment(id, size, &mut read);
        if let Some(e) = failed {
            // Another copy may hold the whole segment readable: its scan
            // stands in when it reaches at least as far as this copy's
            // bytes (so no record this copy may hold past the failure is
            // left out). Otherwise the rebuild refuses (see `refusal`).
            let mut alternates: Vec<&dyn Store> = Vec::new();
            if !std::ptr::addr_eq(base, store) {
                alternates.push(store);
            }
            for o in others {
                if !std::ptr::addr_eq(o.as_ref(), base) {
                    alternates.push(o.as_ref());
                }
            }
            match alternates
                .into_iter()
                .find_map(|a| whole_scan(a, id, &name).filter(|s| s.end >= size))
            {
                Some(whole) => {
                    tracing::warn!(segment = %name, error = %e, "a read failed; scanned the segment on another copy");
                    scan = whole;
                }
                // Gone since it was listed (a shared vault's GC deletes
                // condemned segments while other hosts rebuild): nothing
                // of it is left to keep, so it is not indexed.
                None if matches!(base.size(&name), Ok(None)) => {
                    tracing::warn!(segment = %name, "a segment went away during the rebuild; left out");
                    continue;
                }
                None => report.unreadable_segments.push(format!("{name}: {e}")),
            }
        }
        if let Some(p) = &scan.header_problem {
            report.bad_headers.push(format!("{name}: {p}"));
        }
        // Whole records other copies hold past the source's end.
        let end = scan.end.max(SEGMENT_HEADER_LEN);
        let mut longest: Vec<Found> = Vec::new();
        for o in others {
            let n = o.size(&name).ok().flatten().unwrap_or(0);
            if n <= end {
                continue;
            }
            let more = intact_records_from(o.as_ref(), &name, end, n, keys);
            if more.last().map(|r| r.offset + u64::from(r.len))
                > longest.last().map(|r| r.offset + u64::from(r.len))
            {
                longest = more;
            }
        }
        if let Some(last) = longest.last() {
            scan.end = last.offset + u64::from(last.len);
            report.extended_segments += 1;
            scan.records.extend(longest);
        }
        let mut batch = IndexBatch::default();
        let mut live = 0u64;
        let mut pending = 0usize;
        for r in &scan.records {
            if !seen.insert(r.id) {
                report.duplicates += 1;
                report.duplicate_places.push((id, r.id));
                continue;
            }
            live += u64::from(r.len);
            batch.put_chunk(
                r.id,
                ChunkLocation {
                    segment: id,
                    offset: r.offset,
                    len: r.len,
                    plain_len: r.plain_len,
                },
            );
            report.chunks += 1;
            pending += 1;
            if pending >= BATCH_CHUNKS {
                index.commit(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        let committed = scan.end.max(SEGMENT_HEADER_LEN);
        batch.put_segment(
            id,
            SegmentInfo {
                committed,
                dead: committed.saturating_sub(SEGMENT_HEADER_LEN + live),
                retired: false,
            },
        );
        index.commit(batch)?;
        report.segments += 1;
        report.skipped_bytes += scan.skipped;
    }
    Ok(())
}

/// Indexes the items, policies and points of the catalog files of every
/// copy: the source and `others` (the vault's other synchronous copies).
/// A file is read from the first copy, source first, whose bytes decode;
/// one that decodes on no copy holding it goes to `report.bad_files`
/// (the rebuild then refuses to install the index). So a point present
/// on any copy is indexed: a source that lags (the secondary, a replica
/// that missed a backup) or holds a damaged manifest loses no point.
/// True when every copy's bytes of catalog file `name` break the naming
/// rule ([`catalog_files::name_problem`]): a valid envelope whose names
/// no coffre writes.
fn refused_for_names(
    copies: &[&dyn Store],
    name: &str,
    keys: Option<&crate::crypto::VaultKeys>,
) -> bool {
    let mut any = false;
    for c in copies {
        match c.get(name) {
            Ok(Some(bytes)) => {
                // A file that does not open is no crafted name: it is
                // forged or damaged, and waits like any undecodable file.
                let Ok(plain) = catalog_files::open_in(name, &bytes, keys) else {
                    return false;
                };
                if catalog_files::name_problem(name, &plain).is_none() {
                    return false;
                }
                any = true;
            }
            Ok(None) => {}
            Err(_) => return false,
        }
    }
    any
}

fn index_catalog(
    store: &dyn Store,
    others: &[SharedStore],
    index: &Index,
    report: &mut RebuildReport,
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<()> {
    let mut copies: Vec<&dyn Store> = vec![store];
    copies.extend(others.iter().map(|o| o.as_ref() as &dyn Store));
    let mut names: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for c in &copies {
        for n in crate::copies::state_files::list_catalog_files(*c)? {
            if seen.insert(n.clone()) {
                names.push(n);
            }
        }
    }
    let mut batch = IndexBatch::default();
    for name in names {
        let mut errors: Vec<String> = Vec::new();
        let mut done = false;
        for (i, c) in copies.iter().enumerate() {
            let bytes = match c.get(&name) {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                // The source must answer; another copy that does not is
                // only one place less to look.
                Err(e) if i == 0 => return Err(e),
                Err(e) => {
                    errors.push(format!("{}: {e}", c.location()));
                    continue;
                }
            };
            let decoded = if name.starts_with(POINTS_DIR) {
                catalog_files::decode_point_in(&name, &bytes, keys).map(|p| {
                    batch.put_point(p);
                    report.points += 1;
                })
            } else if name.starts_with(ITEMS_DIR) {
                catalog_files::decode_item_in(&name, &bytes, keys).map(|it| {
                    batch.put_item(it);
                    report.items += 1;
                })
            } else if name.starts_with(POLICIES_DIR) {
                catalog_files::decode_policy_in(&name, &bytes, keys).map(|p| {
                    batch.put_policy_value(&p.name, &p.policy);
                    report.policies += 1;
                })
            } else {
                Ok(())
            };
            match decoded {
                Ok(()) => {
                    if i > 0 {
                        tracing::warn!(file = %name, copy = %c.location(), "read a catalog file from another copy (the source lacks it or cannot decode it)");
                    }
                    done = true;
                    break;
                }
                Err(e) => errors.push(format!("{}: {e}", c.location())),
            }
        }
        if !done && !errors.is_empty() {
            if refused_for_names(copies.as_slice(), &name, keys) {
                // Its names break the rule every name coffre writes
                // passes: no point coffre acknowledged is in it (it is
                // crafted or foreign), so it is left out, not waited for.
                tracing::warn!(file = %name, "left out a catalog file whose names break the naming rule (verify reports it)");
                report.refused_names.push(name);
            } else {
                report
                    .bad_files
                    .push(format!("{name} ({})", errors.join(", ")));
            }
        }
    }
    for bad in &report.bad_files {
        tracing::warn!(file = %bad, "a catalog file no copy holds in a form that decodes");
    }
    index.commit(batch.without_files())
}

/// Options for the vault open inside a rebuild (no refresh: the rebuild
/// is one).
pub fn rebuild_open_options(wait: Duration) -> OpenOptions {
    OpenOptions {
        wait,
        degraded_ok: true,
        allow_copy_write: true,
        skip_refresh: true,
        ..OpenOptions::default()
    }
}
