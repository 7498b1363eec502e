//! `vault copy`: recovery points copied from one vault into another, as
//! restic's `copy` and Proxmox Backup Server's sync do. It is how an
//! existing vault becomes encrypted (copy into a new encrypted vault), or
//! moves to another block size, and a feature on its own.
//!
//! Every point is re-chunked: it is read block by block through the
//! verified read path of the source ([`PointSource`]) and ingested into
//! the destination as a new point of the same item ([`ingest`]), with the
//! source point's creation time, consistency level, changed-block record,
//! scheduled flag and retention date, and its id unless the destination
//! uses it already. The destination hashes, compares with the item's
//! previous point there, deduplicates, compresses and seals as a backup
//! does, so day-to-day points stay incremental, whatever the two vaults'
//! keys and block sizes. When the destination's parent is the copy of
//! the source point before, the blocks whose chunk ids did not change
//! between the two source points are not even read (the source's block
//! maps are the changed-block list; a sample of them is checked).
//!
//! Points are copied oldest first, one committed point at a time. A point
//! the destination holds already (the same item, creation time and image
//! size: a point's identity across vaults, since no digest of its bytes is
//! kept) is skipped, so a run that was interrupted (even by SIGKILL: an
//! uncommitted point leaves nothing but bytes the next session reuses or
//! reclaims) is completed by running it again. A point whose source block
//! is damaged fails alone, naming the point and the block; nothing of it
//! is committed, and the other points are still copied.
//!
//! An item the destination lacks is created with the source item's name,
//! image path, identity and hooks, and its protection **stopped** (no
//! backups, no expiry): the host registry keeps the image protected by
//! the source vault until `coffre protect` moves it. Policies are not
//! copied.

use std::path::PathBuf;

use coffre_vault_store::Vault;
use coffre_vault_store::format::catalog::{ItemRecord, PointRecord, PointStats, Protection};
use jiff::Timestamp;
use serde::Serialize;

use crate::backup::{PointTerms, point_id, thread_pool};
use crate::error::{EngineError, Result};
use crate::ingest::{CleanBlocks, IngestRequest, ingest};
use crate::point_source::PointSource;
use crate::progress::Progress;
use crate::reader::BlockMapReader;
use coffre_vault_store::format::blockmap::{LEAF_ENTRIES, block_count};

/// What to copy and how.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Only these items (all items when empty; a soft-deleted item only
    /// when named).
    pub items: Vec<String>,
    /// List what would be copied; copy nothing.
    pub dry_run: bool,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Read at most this many bytes per second of each source point.
    pub rate_limit: Option<u64>,
}

/// What was done with one point of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyAction {
    /// Copied into the destination.
    Copied,
    /// The destination holds it already (or a different point of the
    /// same instant: see `reason`).
    Skipped,
    /// `--dry-run`: it would be copied.
    WouldCopy,
    /// It could not be copied (`reason`); nothing of it was committed.
    Failed,
}

/// One point of the source and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct PointCopy {
    /// Item name.
    pub item: String,
    /// The point's id in the source.
    pub point: String,
    /// When it was taken.
    pub created: Timestamp,
    /// Image size in bytes.
    pub image_size: u64,
    /// What was done.
    pub action: CopyAction,
    /// Its id in the destination (copied or skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_point: Option<String>,
    /// The copy's statistics in the destination (bytes read and stored,
    /// blocks changed, time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<PointStats>,
    /// Why it was skipped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the copy did less than perfectly.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// An item of the source that was not looked at, and why.
#[derive(Debug, Clone, Serialize)]
pub struct ItemSkipped {
    /// Item name.
    pub item: String,
    /// Why.
    pub reason: String,
}

/// The outcome of a copy.
#[derive(Debug, Serialize)]
pub struct CopyReport {
    /// The source vault.
    pub from: PathBuf,
    /// The destination vault.
    pub to: PathBuf,
    /// Nothing was copied (`--dry-run`).
    pub dry_run: bool,
    /// Every point of the items copied, oldest first per item.
    pub points: Vec<PointCopy>,
    /// Items created in the destination.
    pub items_created: Vec<String>,
    /// Items not looked at.
    pub items_skipped: Vec<ItemSkipped>,
    /// Points copied (or, with `--dry-run`, that would be).
    pub copied: u64,
    /// Points the destination held already.
    pub skipped: u64,
    /// Points that failed.
    pub failed: u64,
    /// Bytes of the source points read.
    pub bytes_read: u64,
    /// Bytes the copies added to the destination's segments.
    pub stored_bytes: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// The errors of the failed points, in order (for exit codes).
    #[serde(skip)]
    pub errors: Vec<EngineError>,
}

/// Copies the points of `src` (opened read-only) into `dst` (opened for
/// writing). `now` stamps the protection of the items it creates;
/// `progress` follows each point; `each` sees every point's outcome as it
/// is known; `stop` is polled between windows.
pub fn copy_points(
    src: &Vault,
    dst: &Vault,
    opts: &CopyOptions,
    now: Timestamp,
    progress: &dyn Progress,
    each: &mut dyn FnMut(&PointCopy),
    stop: &dyn Fn() -> bool,
) -> Result<CopyReport> {
    let started = std::time::Instant::now();
    let refused = |reason: String| EngineError::CopyRefused {
        from: src.dir().to_path_buf(),
        to: dst.dir().to_path_buf(),
        reason,
    };
    if src.config().vault_id == dst.config().vault_id {
        return Err(refused(
            "they are the same vault (or copies of it): a point is copied into another vault"
                .into(),
        ));
    }
    let (items, items_skipped) = select_items(src, &opts.items)?;
    let mut report = CopyReport {
        from: src.dir().to_path_buf(),
        to: dst.dir().to_path_buf(),
        dry_run: opts.dry_run,
        points: Vec::new(),
        items_created: Vec::new(),
        items_skipped,
        copied: 0,
        skipped: 0,
        failed: 0,
        bytes_read: 0,
        stored_bytes: 0,
        duration_ms: 0,
        errors: Vec::new(),
    };
    let pool = thread_pool(opts.threads)?;
    // Point ids the destination uses, in any item: a copy keeps its id
    // only where it is free.
    let mut taken: std::collections::HashSet<String> = dst
        .index()
        .all_points()?
        .into_iter()
        .map(|p| p.id)
        .collect();
    for item in &items {
        let mut points = src.points(&item.name)?;
        points.sort_by_key(|p| (p.created, p.seq));
        let mut created_item = false;
        for p in &points {
            let there = dst.points(&item.name)?;
            let mut done = PointCopy {
                item: item.name.clone(),
                point: p.id.clone(),
                created: p.created,
                image_size: p.image_size,
                action: CopyAction::Skipped,
                to_point: None,
                stats: None,
                reason: None,
                warnings: Vec::new(),
            };
            if let Some(q) = there.iter().find(|q| q.created == p.created) {
                done.to_point = Some(q.id.clone());
                if q.image_size != p.image_size {
                    done.reason = Some(format!(
                        "the destination holds a different point of the same instant ({}, {} bytes)",
                        q.id, q.image_size
                    ));
                }
                report.skipped += 1;
            } else if opts.dry_run {
                done.action = CopyAction::WouldCopy;
                report.copied += 1;
            } else {
                let id = if taken.contains(&p.id) {
                    point_id(
                        &dst.config().vault_id,
                        &item.name,
                        &format!("copy-{}-{}", src.config().vault_id, p.id),
                    )
                } else {
                    p.id.clone()
                };
                match copy_one(
                    src, dst, item, p, &id, &there, opts, now, &pool, progress, stop,
                ) {
                    Ok(outcome) => {
                        taken.insert(outcome.point.id.clone());
                        created_item |= outcome.new_item;
                        report.bytes_read += outcome.point.stats.bytes_read;
                        report.stored_bytes += outcome.point.stats.stored_bytes;
                        done.action = CopyAction::Copied;
                        done.to_point = Some(outcome.point.id);
                        done.stats = Some(outcome.point.stats);
                        done.warnings = outcome.warnings;
                        report.copied += 1;
                    }
                    Err(EngineError::Abandoned) => return Err(EngineError::Abandoned),
                    Err(e) => {
                        done.action = CopyAction::Failed;
                        done.reason = Some(e.to_string());
                        report.failed += 1;
                        report.errors.push(e);
                    }
                }
            }
            each(&done);
            report.points.push(done);
        }
        if created_item {
            report.items_created.push(item.name.clone());
        }
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// The items to copy: those named (each must exist), else every item but
/// the soft-deleted ones (reported).
fn select_items(src: &Vault, names: &[String]) -> Result<(Vec<ItemRecord>, Vec<ItemSkipped>)> {
    if !names.is_empty() {
        let mut out = Vec::new();
        for name in names {
            match src.item(name)? {
                Some(item) if !out.iter().any(|i: &ItemRecord| i.name == item.name) => {
                    out.push(item)
                }
                Some(_) => {}
                None => return Err(EngineError::ItemNotFound { item: name.clone() }),
            }
        }
        return Ok((out, Vec::new()));
    }
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    let mut items = src.index().items()?;
    items.sort_by(|a, b| a.name.cmp(&b.name));
    for item in items {
        if matches!(item.protection, Protection::SoftDeleted { .. }) {
            skipped.push(ItemSkipped {
                item: item.name,
                reason: "soft-deleted in the source: name it with --item to copy it".into(),
            });
        } else {
            out.push(item);
        }
    }
    Ok((out, skipped))
}

/// Copies one point; `there` are the item's points in the destination.
#[expect(clippy::too_many_arguments, reason = "the inputs of one point's copy")]
fn copy_one(
    src: &Vault,
    dst: &Vault,
    item: &ItemRecord,
    p: &PointRecord,
    id: &str,
    there: &[PointRecord],
    opts: &CopyOptions,
    now: Timestamp,
    pool: &rayon::ThreadPool,
    progress: &dyn Progress,
    stop: &dyn Fn() -> bool,
) -> Result<crate::backup::BackupOutcome> {
    let source = PointSource::open(src, p, pool)?;
    // The destination's point closest before this one is the parent: the
    // blocks they share cost an entry.
    let parent = there
        .iter()
        .filter(|q| q.created < p.created)
        .max_by_key(|q| (q.created, q.seq))
        .cloned();
    let clean = match &parent {
        Some(q) => clean_blocks(src, p, q, dst.config().block_size)?,
        None => None,
    };
    let req = IngestRequest {
        item: ItemRecord {
            name: item.name.clone(),
            source: item.source.clone(),
            created: item.created,
            next_seq: 1,
            policy: None,
            protection: Protection::Stopped { since: now },
            last_slot: None,
            identity: item.identity,
            hooks: item.hooks.clone(),
        },
        point_id: id.to_string(),
        created: p.created,
        level: p.level,
        cbt: p.cbt.clone(),
        terms: PointTerms {
            scheduled: p.scheduled,
            retain_until: p.retain_until,
            // The source's job records stay in the source.
            job: None,
        },
        parent,
        clean,
        rate_limit: opts.rate_limit,
    };
    ingest(dst, &source, &req, pool, progress, stop).map_err(|e| {
        // The source's own words for a damaged block, with its point and
        // block, rather than the window that carried it.
        source.take_failure().unwrap_or(e)
    })
}

/// The blocks of the copy of `p` known to hold what `parent` (a point of
/// the destination) holds, left unread: when `parent` is the copy of a
/// point of the source (the same id, creation time, size, level,
/// changed-block record and retention), the destination blocks whose
/// source blocks have the same chunk ids in both source points. `None`
/// when there is nothing to go by. The ingest checks a sample before it
/// trusts them.
fn clean_blocks(
    src: &Vault,
    p: &PointRecord,
    parent: &PointRecord,
    dst_block_size: u32,
) -> Result<Option<CleanBlocks>> {
    // A copy keeps all of these; a point of the destination's own that
    // matched them all by chance would need a 48-bit id collision.
    let Some(was) = src.points(&p.item)?.into_iter().find(|s| {
        s.id == parent.id
            && s.created == parent.created
            && s.image_size == parent.image_size
            && s.level == parent.level
            && s.cbt == parent.cbt
            && s.scheduled == parent.scheduled
            && s.retain_until == parent.retain_until
    }) else {
        return Ok(None);
    };
    if was.image_size != p.image_size || was.block_size != p.block_size || was.id == p.id {
        return Ok(None);
    }
    let size = p.image_size;
    let (sbs, dbs) = (u64::from(p.block_size), u64::from(dst_block_size));
    let mut clean = CleanBlocks::all_clean(block_count(size, dst_block_size));
    let mut now = BlockMapReader::open(src, p)?;
    let mut then = BlockMapReader::open(src, &was)?;
    let blocks = now.blocks();
    let mut first = 0u64;
    while first < blocks {
        let n = (blocks - first).min(LEAF_ENTRIES as u64) as usize;
        let (a, b) = (now.entries(first, n)?, then.entries(first, n)?);
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            if x != y {
                let sb = first + k as u64;
                let (start, end) = (sb * sbs, ((sb + 1) * sbs).min(size));
                clean.dirty(start / dbs..end.div_ceil(dbs));
            }
        }
        first += n as u64;
    }
    Ok(Some(clean))
}
