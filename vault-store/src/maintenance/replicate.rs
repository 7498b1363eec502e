//! GRS replication: bringing the secondary copy up to date, incrementally
//! and resumably, without the writer lock.
//!
//! Order, so that the secondary is a consistent vault after every step
//! (invariant C3):
//! 1. segment bytes: for each committed segment, the bytes between what
//!    the secondary holds (its `replication` state, never more than its
//!    file) and the primary's committed length are appended and fsynced;
//!    committed bytes never change, so any synced prefix is right and a
//!    killed run resumes where it stopped; every indexed record is checked
//!    (header, id, length, CRC-32) on the way, and a bad one is replaced
//!    by the bytes of a copy whose hash matches;
//! 2. catalog files: manifests of points whose data is now there, item
//!    and policy files; removed ones go to the secondary's quarantine;
//! 3. segments the primary no longer has (GC) go to the quarantine too;
//! 4. the secondary's index cache is dropped (it is rebuilt when the
//!    secondary is opened), and the primary's `replication` state records
//!    when each point reached the secondary.
//!
//! The secondary never loses data on the primary's word alone:
//! - the run refuses to start unless the primary's index is complete
//!   (`crate::index::state`), and refuses when the primary looks empty (no
//!   point, no live segment) while the secondary holds points (a wiped or
//!   lost primary looks like that; the secondary is then the only copy);
//! - what the primary no longer has is *moved* to the secondary's
//!   `quarantine/`, not deleted; a later run deletes a quarantined file
//!   only when the primary's complete index shows it unreferenced (every
//!   chunk of a segment placed elsewhere or referenced by nothing, a
//!   manifest whose block-map root nothing references), see
//!   [`crate::copies::quarantine`]. A primary that lost a point it still
//!   references therefore never costs the secondary its copy.
//! - while a live restore from the secondary holds a point
//!   (`SECONDARY/holds/`, [`crate::holds`]), the run moves nothing to the
//!   quarantine and purges nothing (catalog files, segments): the VM's
//!   disk reads the blocks it has not streamed yet from that point, which
//!   the primary may have pruned. It copies what is new as usual and
//!   reports the holds (`held_points`); a hold it cannot read stops it
//!   before anything is deleted, naming the file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use jiff::Timestamp;
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::format::catalog_files::{self, Role};
use crate::format::config::CONFIG_FILE;
pub use crate::format::repl_state::{ReplicationState, STATE_FILE};
use crate::format::segment::{SEGMENTS_DIR, parse_segment_file_name, segment_name};
use crate::store::local::lock::NamedLock;
use crate::store::{LocalStore, Store as _};
use crate::vault::Vault;

/// The primary's replication state of the vault at `dir` (`keys`: an
/// encrypted vault's).
pub fn primary_state(dir: &Path, keys: Option<&crate::crypto::VaultKeys>) -> ReplicationState {
    crate::copies::state_files::load_replication_state(&LocalStore::new(dir), keys)
}

/// What one replication run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicateReport {
    /// The secondary.
    pub secondary: std::path::PathBuf,
    /// Segments that received bytes.
    pub segments_copied: u64,
    /// Bytes appended to the secondary.
    pub bytes_copied: u64,
    /// Catalog files written or removed.
    pub files_changed: u64,
    /// Segments removed from the secondary (GC'd on the primary).
    pub segments_deleted: u64,
    /// Points that reached the secondary in this run.
    pub points_replicated: u64,
    /// Points on the secondary in all.
    pub points_on_secondary: u64,
    /// Records found bad on the primary and sent from a good copy instead.
    pub records_repaired: u64,
    /// Records no copy holds intact (replicated as they are; `verify
    /// --read-data` reports them as unrecoverable).
    pub records_damaged: u64,
    /// Files of the secondary the primary no longer has, moved to the
    /// secondary's quarantine rather than deleted.
    pub quarantined: u64,
    /// Quarantined files of the secondary deleted (the primary's complete
    /// index shows no point needs them).
    pub quarantine_deleted: u64,
    /// Points of the secondary held by unfinished live restores from it
    /// (`ITEM/POINT`): while there is one, nothing was quarantined or
    /// purged.
    pub held_points: Vec<String>,
    /// True when quarantining and purging were skipped because of holds.
    pub quarantine_skipped: bool,
    /// True when the run was stopped before it finished.
    pub interrupted: bool,
    /// Wall time.
    pub duration_ms: u64,
}

/// Bytes copied per read/append.
const COPY_CHUNK: usize = 8 << 20;

/// Brings the secondary of `vault` up to date. `stop` is polled between
/// copies; a stopped run leaves a consistent secondary and resumes later.
pub fn replicate(
    vault: &Vault,
    now: &dyn Fn() -> Timestamp,
    stop: &dyn Fn() -> bool,
) -> Result<ReplicateReport> {
    let started = std::time::Instant::now();
    let cfg = vault.config();
    let Some(sec_dir) = cfg.secondary.clone() else {
        return Err(StoreError::InvalidSetting {
            field: "secondary",
            reason: format!(
                "vault {} has no secondary (create it with --secondary, or `vault set --secondary DIR`)",
                vault.dir().display()
            ),
        });
    };
    let lock_path = vault.dir().join("locks").join("replicate.lock");
    LocalStore::new(vault.dir()).create_dir("locks")?;
    let _lock = match NamedLock::try_acquire(&lock_path, "replicate")? {
        Ok(l) => l,
        Err(holder) => {
            return Err(StoreError::VaultLocked {
                path: lock_path,
                pid: holder,
            });
        }
    };
    crate::copies::init_copy(&sec_dir, cfg, Role::Secondary)?;
    let keys = vault.keys();
    let sec = crate::copies::copy_store(&sec_dir)?;
    let sec = sec.as_ref();
    if let Err(reason) = crate::copies::check_copy(sec, &sec_dir, &cfg.vault_id, true, keys) {
        return Err(StoreError::CopyUnavailable {
            path: sec_dir,
            reason,
        });
    }
    let primary = vault.copies().primary().store.clone();
    let mut report = ReplicateReport {
        secondary: sec_dir.clone(),
        ..ReplicateReport::default()
    };
    // The primary's index decides what the secondary may lose: only a
    // complete one (`crate::index::state`).
    crate::index::state::check_complete(vault.dir())?;
    let mut sec_state = crate::copies::state_files::load_replication_state(sec, keys);
    let infos = vault.index().segment_infos()?;
    refuse_empty_primary(vault, sec, &sec_dir, &infos)?;
    // Live restores from the secondary: while one holds a point, nothing
    // of the secondary is put aside or deleted (the primary may have
    // pruned that point). A hold that cannot be read stops the run here.
    report.held_points = secondary_holds(&sec_dir, cfg.keys())?;
    report.quarantine_skipped = !report.held_points.is_empty();
    if report.quarantine_skipped {
        tracing::warn!(held = ?report.held_points, "live restores from the secondary hold points: nothing quarantined or purged this run");
    } else {
        // What earlier runs put aside and the index now shows unreferenced.
        let purged = crate::copies::quarantine::purge(sec, vault.index(), keys)?;
        report.quarantine_deleted = purged.deleted;
    }

    // 1. Segment bytes.
    for (&id, info) in infos.iter().filter(|(_, i)| !i.retired) {
        let name = segment_name(id);
        let on_disk = sec.size(&name)?.unwrap_or(0);
        let recorded = sec_state
            .segments
            .get(&id)
            .copied()
            .unwrap_or(0)
            .min(on_disk);
        if recorded >= info.committed {
            continue;
        }
        if stop() {
            report.interrupted = true;
            break;
        }
        let records = indexed_records(vault, id)?;
        // The secondary may hold more than the state says (a state lost,
        // damaged or behind): what it holds is kept as far as it checks
        // (records intact, the bytes between them the primary's), never
        // cut for want of knowing it.
        let have = if on_disk > recorded {
            checked_prefix(
                vault,
                &primary,
                sec,
                &name,
                recorded,
                on_disk.min(info.committed),
                &records,
                keys,
            )?
        } else {
            recorded
        };
        if have >= info.committed {
            sec_state.segments.insert(id, have);
            continue;
        }
        let mut out = if on_disk == 0 && sec.size(&name)?.is_none() {
            sec.create(&name)?
        } else {
            sec.append_to(&name, have)?
        };
        let mut next = records.partition_point(|r| r.0 < have);
        let mut at = have;
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut scratch = Vec::new();
        while at < info.committed {
            // Reads end at a record boundary, so that every indexed record
            // is checked whole before it leaves for the secondary.
            let limit = (at + COPY_CHUNK as u64).min(info.committed);
            let rest = records.get(next..).unwrap_or_default();
            let fits = rest.partition_point(|r| record_end(r) <= limit);
            // The index's locations are decoded values: a record that
            // ends at or before `at` (overlapping ones) must not move the
            // copy backwards.
            let end = match fits.checked_sub(1).and_then(|i| rest.get(i)) {
                Some(r) if limit < info.committed && record_end(r) > at => record_end(r),
                _ => limit,
            };
            let n = usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let chunk = buf.get_mut(..n).unwrap_or_default();
            read_any(vault, &primary, &name, at, chunk)?;
            let upto = next + rest.partition_point(|r| record_end(r) <= end);
            for (off, cid, loc) in records.get(next..upto).unwrap_or_default() {
                let range = record_range(*off, loc.len, at);
                let rec = match range {
                    Some(r) => chunk.get_mut(r),
                    None => None,
                };
                let Some(rec) = rec else {
                    // Overlapping locations: never copy a record unchecked.
                    return Err(StoreError::CorruptIndex {
                        path: vault.dir().join(crate::index::INDEX_DIR),
                        what: "chunk location",
                        reason: format!(
                            "chunk {cid} at {off}..{} of {name} overlaps the record before it (bytes from {at} were being copied); run `coffre verify`",
                            off.saturating_add(u64::from(loc.len))
                        ),
                    });
                };
                if record_ok(rec, cid, keys, &mut scratch) {
                    continue;
                }
                // A bad record on the primary: take the bytes from a copy
                // whose hash matches (and repair the primary with them).
                let mut good = crate::vault::ChunkBuf::default();
                match vault.read_chunk_into(cid, loc, &mut good) {
                    Ok(()) if good.record_bytes().len() == rec.len() => {
                        rec.copy_from_slice(good.record_bytes());
                        report.records_repaired += 1;
                    }
                    _ => {
                        report.records_damaged += 1;
                        tracing::warn!(chunk = %cid, segment = %name, "no copy holds this record intact; replicated as it is (verify --read-data reports it)");
                    }
                }
            }
            next = upto;
            out.append(chunk)?;
            at = end;
            if stop() {
                report.interrupted = true;
                break;
            }
        }
        out.sync()?;
        report.bytes_copied += at - have;
        report.segments_copied += 1;
        sec_state.segments.insert(id, at);
        crate::copies::state_files::put_sealed(sec, STATE_FILE, &sec_state.encode(), keys)?;
        if report.interrupted {
            break;
        }
    }
    let complete_segments: HashSet<u64> = infos
        .iter()
        .filter(|(id, i)| {
            !i.retired && sec_state.segments.get(id).copied().unwrap_or(0) >= i.committed
        })
        .map(|(id, _)| *id)
        .collect();

    // 2. Catalog files: only when every segment is there, so no manifest
    // ever names data the secondary lacks.
    let mut primary_state = primary_state(vault.dir(), keys);
    if !report.interrupted
        && complete_segments.len() == infos.values().filter(|i| !i.retired).count()
    {
        let mut want: HashMap<String, Vec<u8>> = HashMap::new();
        let mut points = Vec::new();
        for item in vault.index().items()? {
            want.insert(
                catalog_files::item_file(&item.name),
                catalog_files::encode_item(&item),
            );
            for p in vault.index().points(&item.name)? {
                want.insert(
                    catalog_files::point_file(&p.item, p.seq),
                    catalog_files::encode_point(&p),
                );
                points.push(p);
            }
        }
        for (name, value) in vault.index().policy_values()? {
            let f = catalog_files::PolicyFile {
                name: name.clone(),
                policy: value,
            };
            want.insert(
                catalog_files::policy_file(&name),
                catalog_files::encode_policy(&f),
            );
        }
        let have: HashSet<String> = crate::copies::state_files::list_catalog_files(sec)?
            .into_iter()
            .collect();
        for (name, bytes) in &want {
            let same = have.contains(name)
                && sec.get(name)?.is_some_and(|stored| {
                    crate::format::sealed_file::same_content(name, &stored, bytes, keys)
                });
            if !same {
                sec.put(name, &crate::copies::seal(name, bytes, keys)?)?;
                report.files_changed += 1;
            }
        }
        // A live restore from the secondary may have begun since the holds
        // were listed: under the holds lock it takes to begin, they are
        // listed again, and the lock is kept until nothing more is put
        // aside.
        let _holds_lock =
            if report.quarantine_skipped || crate::format::remote::is_store_url(&sec_dir) {
                None
            } else {
                let lock = crate::holds::HoldsLock::acquire(
                    &sec_dir,
                    std::time::Duration::from_secs(60),
                    &format!("replicate pid {}", std::process::id()),
                )?;
                report.held_points = secondary_holds(&sec_dir, cfg.keys())?;
                report.quarantine_skipped = !report.held_points.is_empty();
                Some(lock)
            };
        let gone = have.iter().filter(|n| !want.contains_key(*n));
        for name in gone.filter(|_| !report.quarantine_skipped) {
            crate::copies::quarantine::quarantine(sec, name, "the primary no longer has it")?;
            report.files_changed += 1;
            report.quarantined += 1;
        }
        // 3. Segments GC removed from the primary.
        for n in sec.list(SEGMENTS_DIR)? {
            if let Some(id) = parse_segment_file_name(&n)
                && !complete_segments.contains(&id)
                && !report.quarantine_skipped
            {
                crate::copies::quarantine::quarantine(
                    sec,
                    &segment_name(id),
                    "the primary no longer has it",
                )?;
                sec_state.segments.remove(&id);
                report.segments_deleted += 1;
                report.quarantined += 1;
            }
        }
        sec.put(CONFIG_FILE, &cfg.encode()?)?;
        sec_state.last_run = Some(now());
        crate::copies::state_files::put_sealed(sec, STATE_FILE, &sec_state.encode(), keys)?;
        if report.files_changed > 0 || report.bytes_copied > 0 || report.segments_deleted > 0 {
            drop_index_cache(&sec_dir);
        }
        // 4. When each point arrived.
        let t = now();
        let ids: HashSet<&str> = points.iter().map(|p| p.id.as_str()).collect();
        primary_state
            .points
            .retain(|id, _| ids.contains(id.as_str()));
        for p in &points {
            if !primary_state.points.contains_key(&p.id) {
                primary_state.points.insert(p.id.clone(), t);
                report.points_replicated += 1;
            }
        }
        report.points_on_secondary = points.len() as u64;
        primary_state.segments = sec_state.segments.clone();
        primary_state.last_run = Some(t);
        crate::copies::state_files::store_replication_state(
            &LocalStore::new(vault.dir()),
            &primary_state,
            keys,
        )?;
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(secondary = %sec_dir.display(), bytes = report.bytes_copied, points = report.points_replicated, "replicated");
    Ok(report)
}

/// The points live restores from the secondary at `sec_dir` hold
/// (`ITEM/POINT`); an error, naming the file, when a hold cannot be read.
/// A secondary in object storage is not searched: a live restore from it
/// writes its hold in the local cache it reads it through, which this run
/// cannot see.
fn secondary_holds(
    sec_dir: &Path,
    keys: Option<&std::sync::Arc<crate::crypto::VaultKeys>>,
) -> Result<Vec<String>> {
    if crate::format::remote::is_store_url(sec_dir) {
        return Ok(Vec::new());
    }
    Ok(crate::holds::HoldStore::new(sec_dir, keys)
        .list()?
        .into_iter()
        .map(|h| format!("{}/{}", h.item, h.point))
        .collect())
}

/// Refuses a run from a primary that looks empty (no point, no live
/// segment) to a secondary that holds points: that is what a lost or
/// wiped primary looks like, and replicating it would take the secondary
/// down with it.
fn refuse_empty_primary(
    vault: &Vault,
    sec: &dyn crate::store::Store,
    sec_dir: &Path,
    infos: &std::collections::BTreeMap<u64, crate::index::SegmentInfo>,
) -> Result<()> {
    let primary_points = vault.index().all_points()?.len();
    let live = infos.values().filter(|i| !i.retired).count();
    if primary_points > 0 || live > 0 {
        return Ok(());
    }
    let sec_points = crate::copies::state_files::list_catalog_files(sec)?
        .iter()
        .filter(|n| n.starts_with(catalog_files::POINTS_DIR))
        .count();
    if sec_points == 0 {
        return Ok(());
    }
    Err(StoreError::ReplicationRefused {
        path: sec_dir.to_path_buf(),
        reason: format!(
            "the primary {} holds no point and no segment, and the secondary holds {sec_points} points; nothing was changed. If the primary lost its data, restore from the secondary (`--from secondary`) or make it the vault; if every point was deleted on purpose, point the vault at a fresh secondary (`vault set --secondary DIR`)",
            vault.dir().display()
        ),
    })
}

/// Reads committed bytes from the primary, or from a replica when the
/// primary's read fails.
fn read_any(
    vault: &Vault,
    primary: &crate::store::SharedStore,
    name: &str,
    at: u64,
    buf: &mut [u8],
) -> Result<()> {
    match primary.read_at(name, at, buf) {
        Ok(()) => Ok(()),
        Err(e) => {
            for c in vault.copies().sync_copies().iter().skip(1) {
                if c.store.read_at(name, at, buf).is_ok() {
                    return Ok(());
                }
            }
            Err(e)
        }
    }
}

/// The records the index places in segment `id`: (offset, chunk, location),
/// in offset order.
fn indexed_records(
    vault: &Vault,
    id: u64,
) -> Result<Vec<(u64, crate::ChunkId, crate::index::ChunkLocation)>> {
    let mut out = Vec::new();
    for (off, cid) in vault.index().segment_chunks(id)? {
        if let Some(loc) = vault.index().chunk(&cid)?
            && loc.segment == id
            && loc.offset == off
        {
            out.push((off, cid, loc));
        }
    }
    Ok(out)
}

/// How far from `from` (up to `upto`) the secondary's segment `name`
/// holds what the primary's does: every record of `records` there intact
/// (its own bytes checked, so a good secondary copy of a record that rotted
/// on the primary counts), and the bytes around and between them equal to
/// the primary's. Read in pieces of [`COPY_CHUNK`]; stops at the first
/// byte that does not check. A read that fails is an error: nothing is
/// cut on what could not be read.
#[allow(clippy::too_many_arguments)]
fn checked_prefix(
    vault: &Vault,
    primary: &crate::store::SharedStore,
    sec: &dyn crate::store::Store,
    name: &str,
    from: u64,
    upto: u64,
    records: &[(u64, crate::ChunkId, crate::index::ChunkLocation)],
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<u64> {
    let mut at = from;
    let mut next = records.partition_point(|r| r.0 < from);
    let mut scratch = Vec::new();
    let (mut theirs, mut ours) = (Vec::new(), Vec::new());
    while at < upto {
        let limit = (at + COPY_CHUNK as u64).min(upto);
        let n = (limit - at) as usize;
        theirs.resize(n, 0);
        ours.resize(n, 0);
        // A read that fails stops the run with nothing cut (a passing
        // network error must not cost the secondary its bytes).
        sec.read_at(name, at, &mut theirs)?;
        read_any(vault, primary, name, at, &mut ours)?;
        // Offsets in this piece, relative to `at`.
        let rel = |x: u64| (x - at) as usize;
        let equal = |a: u64, b: u64| theirs.get(rel(a)..rel(b)) == ours.get(rel(a)..rel(b));
        let mut pos = at;
        while let Some(r) = records.get(next) {
            let end = record_end(r);
            if end > limit {
                break;
            }
            if r.0 < pos || !equal(pos, r.0) {
                tracing::warn!(
                    segment = name,
                    offset = pos,
                    "the secondary's bytes differ from the primary's here: copied again from here"
                );
                return Ok(pos);
            }
            let rec = theirs.get(rel(r.0)..rel(end)).unwrap_or_default();
            if !record_ok(rec, &r.1, keys, &mut scratch) {
                tracing::warn!(segment = name, offset = r.0, chunk = %r.1, "the secondary's copy of this record is damaged: copied again from here");
                return Ok(r.0);
            }
            pos = end;
            next += 1;
        }
        // Up to the next record (which runs past this piece), or the end.
        let stop = records.get(next).map_or(limit, |r| r.0.clamp(pos, limit));
        if !equal(pos, stop) {
            return Ok(pos);
        }
        if stop == at {
            // A record longer than a piece, or one past `upto`: no further.
            return Ok(at);
        }
        at = stop;
    }
    Ok(at)
}

/// Where a record of [`indexed_records`] ends.
fn record_end(r: &(u64, crate::ChunkId, crate::index::ChunkLocation)) -> u64 {
    r.0.saturating_add(u64::from(r.2.len))
}

/// True when `rec` is an intact record of chunk `id` (header, id, length,
/// payload CRC-32) and, in an encrypted vault (`keys`), authentic: the
/// check replication makes of every record it copies.
fn record_ok(
    rec: &[u8],
    id: &crate::ChunkId,
    keys: Option<&crate::crypto::VaultKeys>,
    scratch: &mut Vec<u8>,
) -> bool {
    crate::format::record::record_authentic(rec, Some(id), keys, scratch)
}

/// Removes the secondary's own index (a cache), so that the next open of
/// the secondary rebuilds it from what is now there. Skipped while a
/// reader uses it (it then stays as it was: older, but consistent).
fn drop_index_cache(sec_dir: &Path) {
    if crate::format::remote::is_store_url(sec_dir) {
        // Caches attached to a secondary in object storage see for
        // themselves that the store changed (`shared::is_stale`).
        return;
    }
    let sec = LocalStore::new(sec_dir);
    if !sec.is_dir(crate::index::INDEX_DIR) {
        return;
    }
    if let Ok(Some(_lease)) = crate::store::local::lock::ReaderLease::try_exclusive(sec_dir) {
        // Renamed away first: a removal cut short leaves an `index.old-*`,
        // which marks the cache incomplete (rebuilt on the next open),
        // never a partial `index` that looks whole.
        let old = format!("{}{}", crate::index::state::OLD_PREFIX, std::process::id());
        if sec.remove_tree(&old).is_ok() && sec.rename(crate::index::INDEX_DIR, &old).is_ok() {
            let _ = sec.remove_tree(&old);
        }
    }
}
/// Where a record at `off` of `len` bytes lies in a buffer read from
/// `at`: `None` when it starts before `at` or its end overflows.
fn record_range(off: u64, len: u32, at: u64) -> Option<std::ops::Range<usize>> {
    let from = usize::try_from(off.checked_sub(at)?).ok()?;
    Some(from..from.checked_add(usize::try_from(len).ok()?)?)
}

#[cfg(test)]
mod range_tests {
    use super::record_range;

    #[test]
    fn a_record_before_the_window_has_no_range() {
        assert_eq!(record_range(100, 10, 100), Some(0..10));
        assert_eq!(record_range(150, 10, 100), Some(50..60));
        // `off - at` would wrap: 99 - 100.
        assert_eq!(record_range(99, 10, 100), None);
        assert_eq!(record_range(0, 1, u64::MAX), None);
    }
}
