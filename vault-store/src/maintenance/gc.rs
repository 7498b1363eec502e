//! Garbage collection: unindexes chunks no point references, then gives
//! their space back to the filesystem.
//!
//! GC never walks the vault. Its work list is the `unref` family (chunks
//! whose reference count fell to 0, see [`crate::index::refs`]) and its physical
//! list is the `dead` family, so its cost is proportional to what it
//! deletes and rewrites. It runs under the writer lock, so no backup can
//! be deduplicating against a chunk while GC decides about it.
//!
//! 1. **Unindex.** Each unreferenced chunk leaves `chunks`, `refs` and
//!    `segchunks`; its range goes to `dead` and its segment's dead count
//!    grows. One synced batch per 10,000 chunks.
//! 2. **Relocate.** A segment with no live bytes is retired; a segment at
//!    least half dead is *rewritten*: its live records are copied,
//!    unchanged, to a new segment, and the index is repointed and the old
//!    segment retired in one batch. Nothing is deleted yet.
//! 3. **Give back** (only while no reader holds the reader lease, else
//!    deferred to the next run): retired segment files are deleted, and in
//!    the other segments the dead ranges are punched out
//!    (`fallocate(PUNCH_HOLE)`), which frees their blocks without moving
//!    anything.
//! 0. **Holds.** Every live restore's hold ([`crate::holds`]) is read
//!    first: one that cannot be read, or one naming a point the index no
//!    longer lists (its chunks may be all its VM's disk has), makes GC
//!    refuse before it deletes anything. A held point is kept by prune, so
//!    its references keep its chunks out of the `unref` work list; the
//!    report names the held points.
//! 4. **Quarantine.** Files the writer's open moved to `quarantine/`
//!    instead of deleting them are deleted once the (complete) index
//!    shows them unreferenced ([`crate::copies::quarantine::purge`]).

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::format::chunk_id::ChunkId;
use crate::format::record::RecordHeader;
use crate::format::segment::{SEGMENT_HEADER_LEN, segment_name};
use crate::index::{ChunkLocation, Index, IndexBatch, RefEntry, SegmentInfo};
use crate::store::local::lock::ReaderLease;
use crate::vault::Vault;

const BATCH: usize = 10_000;

/// What a segment will undergo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentAction {
    /// Segment id.
    pub segment: u64,
    /// `delete`, `rewrite` or `punch`.
    pub action: &'static str,
    /// Live bytes (copied by a rewrite).
    pub live_bytes: u64,
    /// Dead bytes (given back).
    pub dead_bytes: u64,
}

/// What GC would do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcPlan {
    /// Chunks no point references.
    pub unreferenced_chunks: u64,
    /// Their record bytes.
    pub unreferenced_bytes: u64,
    /// Per-segment actions.
    pub segments: Vec<SegmentAction>,
}

/// What GC did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// The plan it executed.
    pub plan: GcPlan,
    /// Chunks unindexed.
    pub chunks_removed: u64,
    /// Segments deleted (emptied or rewritten).
    pub segments_deleted: u64,
    /// Segments rewritten.
    pub segments_rewritten: u64,
    /// Live bytes copied by rewrites.
    pub bytes_copied: u64,
    /// Dead bytes punched out in place.
    pub bytes_punched: u64,
    /// Segment bytes before and after (committed, live segments).
    pub stored_before: u64,
    /// Segment bytes after.
    pub stored_after: u64,
    /// True when readers held the lease, so space is given back next time.
    pub reclaim_deferred: bool,
    /// Quarantined files deleted because the index shows no point needs
    /// them (see [`crate::copies::quarantine`]), on every synchronous copy.
    pub quarantine_deleted: u64,
    /// Their bytes.
    pub quarantine_bytes: u64,
    /// Quarantined files kept (something may still need them).
    pub quarantine_kept: u64,
    /// Points held by unfinished live restores (`ITEM/POINT`): their
    /// chunks are referenced, so kept.
    pub held_points: Vec<String>,
    /// Wall time.
    pub duration_ms: u64,
}

/// Minimum dead share (percent) for a segment to be rewritten.
pub const REWRITE_DEAD_PERCENT: u64 = 50;

fn action_for(info: &SegmentInfo) -> Option<(&'static str, u64)> {
    if info.retired || info.dead == 0 {
        return None;
    }
    let body = info.committed.saturating_sub(SEGMENT_HEADER_LEN);
    let live = body.saturating_sub(info.dead);
    Some(if live == 0 {
        ("delete", 0)
    } else if info.dead.saturating_mul(100) >= body.saturating_mul(REWRITE_DEAD_PERCENT) {
        ("rewrite", live)
    } else {
        ("punch", live)
    })
}

/// The points live restores hold (`ITEM/POINT`), each checked to be one
/// the index lists; an unreadable hold, or one whose point is gone, is an
/// error (GC then deletes nothing).
pub fn check_holds(vault: &Vault) -> Result<Vec<String>> {
    let holds = crate::holds::HoldStore::new(vault.dir(), vault.config().keys());
    let mut held = Vec::new();
    for h in holds.list()? {
        let known = vault.points(&h.item)?.iter().any(|p| p.id == h.point);
        if !known {
            return Err(StoreError::CorruptFile {
                path: holds.path_of(&h.target),
                what: "live restore hold",
                reason: format!(
                    "it holds point {} of item {} for the live restore into {:?}, but the vault no longer lists that point; its chunks may be all that disk has, so gc deletes nothing. If that target is gone or complete, drop the hold: coffre restore --live --abandon --item {} --to {:?}",
                    h.point, h.item, h.target, h.item, h.target
                ),
            });
        }
        held.push(format!("{}/{}", h.item, h.point));
    }
    Ok(held)
}

/// What an entry of the `unref` work list turns out to be.
enum Garbage {
    /// Referenced again since it was listed: take it off the list.
    Revived(RefEntry),
    /// Unreferenced and indexed at this location: reclaim it.
    Dead(ChunkLocation),
    /// Counted but not indexed: forget its count.
    Dangling,
}

fn classify(index: &Index, id: &ChunkId) -> Result<Garbage> {
    Ok(match (index.chunk_ref(id)?, index.chunk(id)?) {
        (Some(r), _) if r.count > 0 => Garbage::Revived(r),
        (_, Some(loc)) => Garbage::Dead(loc),
        (_, None) => Garbage::Dangling,
    })
}

/// Plans a GC (`gc --dry-run`): reads only the `unref` and `segments`
/// families, changes nothing.
pub fn plan(vault: &Vault) -> Result<GcPlan> {
    let index = vault.index();
    let mut infos = index.segment_infos()?;
    let mut plan = GcPlan::default();
    let mut after: Option<ChunkId> = None;
    loop {
        let ids = index.unreferenced_from(after.as_ref(), BATCH)?;
        for id in &ids {
            if let Garbage::Dead(loc) = classify(index, id)? {
                plan.unreferenced_chunks += 1;
                plan.unreferenced_bytes += u64::from(loc.len);
                if let Some(i) = infos.get_mut(&loc.segment) {
                    i.dead += u64::from(loc.len);
                }
            }
        }
        if ids.len() < BATCH {
            break;
        }
        after = ids.last().copied();
    }
    plan.segments = segment_actions(&infos);
    Ok(plan)
}

fn segment_actions(infos: &BTreeMap<u64, SegmentInfo>) -> Vec<SegmentAction> {
    infos
        .iter()
        .filter_map(|(&segment, info)| {
            action_for(info).map(|(action, live_bytes)| SegmentAction {
                segment,
                action,
                live_bytes,
                dead_bytes: info.dead,
            })
        })
        .collect()
}

/// Runs GC. Requires a vault opened for writing. The plan it reports is
/// what [`plan`] would have said, taken from the unindexing itself.
pub fn run(vault: &Vault) -> Result<GcReport> {
    if !vault.is_writable() {
        return Err(StoreError::ReadOnly {
            path: vault.dir().to_path_buf(),
        });
    }
    if let Some(r) = vault.remote() {
        // Other hosts may be deduplicating against any chunk right now;
        // deleting needs the lease protocol of FORMAT.md, "Shared vaults".
        return Err(StoreError::InvalidSetting {
            field: "gc",
            reason: format!(
                "GC of a vault shared in object storage ({}) is not supported yet; nothing was deleted",
                r.url
            ),
        });
    }
    let started = Instant::now();
    let held_points = check_holds(vault)?;
    let stored_before = vault.stored_bytes()?;
    let (chunks, bytes) = unindex(vault)?;
    let mut report = GcReport {
        plan: GcPlan {
            unreferenced_chunks: chunks,
            unreferenced_bytes: bytes,
            segments: segment_actions(&vault.index().segment_infos()?),
        },
        chunks_removed: chunks,
        stored_before,
        held_points,
        ..GcReport::default()
    };
    relocate(vault, &mut report)?;
    match ReaderLease::try_exclusive(vault.dir())? {
        Some(_lease) => give_back(vault, &mut report)?,
        None => {
            tracing::info!("readers are active; space is given back by the next gc");
            report.reclaim_deferred = true;
        }
    }
    // Files kept aside instead of deleted go once the complete index
    // shows them unreferenced.
    crate::index::state::check_complete(vault.dir())?;
    for c in vault.copies().sync_copies() {
        let p = crate::copies::quarantine::purge(c.store.as_ref(), vault.index(), vault.keys())?;
        report.quarantine_deleted += p.deleted;
        report.quarantine_bytes += p.bytes;
        report.quarantine_kept += p.kept;
    }
    report.stored_after = vault.stored_bytes()?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Step 1: unindexes every unreferenced chunk; returns how many, and
/// their record bytes.
fn unindex(vault: &Vault) -> Result<(u64, u64)> {
    let index = vault.index();
    let (mut removed, mut bytes) = (0, 0);
    loop {
        let ids = index.unreferenced_from(None, BATCH)?;
        if ids.is_empty() {
            return Ok((removed, bytes));
        }
        let mut infos = index.segment_infos()?;
        let mut touched = BTreeMap::new();
        let mut batch = IndexBatch::default();
        for id in &ids {
            match classify(index, id)? {
                Garbage::Revived(r) => batch.put_ref(id, r),
                Garbage::Dead(loc) => {
                    batch.delete_chunk(id, &loc);
                    batch.put_dead(loc.segment, loc.offset, loc.len);
                    if let Some(i) = infos.get_mut(&loc.segment) {
                        i.dead += u64::from(loc.len);
                        touched.insert(loc.segment, *i);
                    }
                    removed += 1;
                    bytes += u64::from(loc.len);
                }
                Garbage::Dangling => batch.delete_ref(id),
            }
        }
        for (id, info) in touched {
            batch.put_segment(id, info);
        }
        index.commit(batch)?;
    }
}

/// Step 2: rewrites the mostly dead segments and retires the empty ones.
/// Nothing is deleted yet, so no reader lease is needed: a reader with an
/// older view still finds every record where its view says.
fn relocate(vault: &Vault, report: &mut GcReport) -> Result<()> {
    let index = vault.index();
    let infos = index.segment_infos()?;
    let mut retire = IndexBatch::default();
    let mut session = vault.begin_write()?;
    session.use_fresh_segment();
    for (&seg, info) in &infos {
        match action_for(info) {
            // A segment the counters call empty is retired only once its
            // chunk places confirm it: a live chunk found there (counters
            // gone wrong) is moved out first, as in a rewrite.
            Some((action @ ("delete" | "rewrite"), _)) => {
                let mut moved = 0u64;
                for (offset, id) in index.segment_chunks(seg)? {
                    let live_here = index
                        .chunk(&id)?
                        .filter(|l| l.segment == seg && l.offset == offset);
                    let Some(loc) = live_here else {
                        // A stale entry (a rewrite interrupted after a
                        // checkpoint moved the chunk): drop it.
                        retire.delete_chunk_place(&ChunkLocation {
                            segment: seg,
                            offset,
                            len: 0,
                            plain_len: 0,
                        });
                        continue;
                    };
                    let record = vault.read_record(&id, &loc)?;
                    let header = RecordHeader::parse(&record).map_err(|reason| {
                        StoreError::CorruptChunk {
                            id,
                            path: vault.segment_path(seg),
                            offset,
                            reason: Box::new(reason),
                        }
                    })?;
                    if header.id != id {
                        return Err(StoreError::CorruptChunk {
                            id,
                            path: vault.segment_path(seg),
                            offset,
                            reason: Box::new(crate::format::record::RecordError::WrongChunk {
                                expected: id,
                                found: header.id,
                            }),
                        });
                    }
                    session.append_moved(id, &record)?;
                    retire.delete_chunk_place(&loc);
                    report.bytes_copied += u64::from(loc.len);
                    moved += 1;
                }
                if action == "rewrite" || moved > 0 {
                    report.segments_rewritten += 1;
                }
                if action == "delete" && moved > 0 {
                    tracing::warn!(
                        segment = seg,
                        chunks = moved,
                        "the counters called this segment empty, but it held live chunks: moved them before retiring it"
                    );
                }
            }
            _ => continue,
        }
        for (s, o, _) in index.dead_ranges_of(seg)? {
            retire.delete_dead(s, o);
        }
        retire.put_segment(
            seg,
            SegmentInfo {
                retired: true,
                ..*info
            },
        );
    }
    session.commit(retire)
}

/// Step 3: gives the space back: deletes retired segment files (including
/// those a deferred or interrupted run left) and punches the dead ranges
/// out of the others. The caller holds the reader lease exclusively.
fn give_back(vault: &Vault, report: &mut GcReport) -> Result<()> {
    // Retired segments are deleted on the index's word: only a complete one.
    crate::index::state::check_complete(vault.dir())?;
    vault.forget_segment_handles();
    for (id, info) in vault.index().segment_infos()? {
        if info.retired {
            if remove_segment_file(vault, id)? {
                report.segments_deleted += 1;
            }
        } else if info.dead > 0 {
            report.bytes_punched += punch(vault, id)?;
        }
    }
    Ok(())
}

/// Deletes a retired segment's file on every copy; false if the primary's
/// was already gone.
fn remove_segment_file(vault: &Vault, id: u64) -> Result<bool> {
    let name = segment_name(id);
    let mut removed = false;
    for c in vault.copies().sync_copies() {
        if c.store.delete(&name)? && c.role == crate::format::catalog_files::Role::Primary {
            removed = true;
            tracing::info!(segment = %vault.segment_path(id).display(), "deleted segment");
        }
    }
    Ok(removed)
}

/// Punches the dead ranges of segment `seg` out of its file on every copy.
fn punch(vault: &Vault, seg: u64) -> Result<u64> {
    let ranges = vault.index().dead_ranges_of(seg)?;
    if ranges.is_empty() {
        return Ok(0);
    }
    let name = segment_name(seg);
    let mut punched = 0;
    let mut batch = IndexBatch::default();
    'ranges: for (s, offset, len) in ranges {
        for c in vault.copies().sync_copies() {
            if !c.store.punch(&name, offset, u64::from(len))? {
                // The filesystem cannot punch: the range waits for a rewrite.
                break 'ranges;
            }
        }
        batch.delete_dead(s, offset);
        punched += u64::from(len);
    }
    vault.index().commit(batch)?;
    Ok(punched)
}
