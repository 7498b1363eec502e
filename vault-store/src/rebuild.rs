//! `vault rebuild-index`: the RocksDB index is a cache of the copies, and
//! this rebuilds it from one copy alone.
//!
//! The copy's segments are scanned record by record ([`crate::scan`]) for
//! the chunk locations; its catalog files give the items, policies and
//! points. Where a chunk appears more than once (a GC rewrite whose old
//! segment was not yet deleted, a backup that crashed after its fsync), the
//! copy in the newest segment wins. The reference counts are then derived
//! from the points exactly as the one-time upgrade does, the first writer
//! cuts anything past each segment's scanned end, and the catalog files on
//! every copy are made to match.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::catalog_files::{self, ITEMS_DIR, POINTS_DIR, POLICIES_DIR};
use crate::chunk_id::ChunkId;
use crate::error::{Result, StoreError};
use crate::index::{ChunkLocation, INDEX_DIR, Index, IndexBatch, SegmentInfo};
use crate::lock::VaultLock;
use crate::scan::scan_segment;
use crate::segment::{SEGMENT_HEADER_LEN, SEGMENTS_DIR, parse_segment_file_name, segment_name};
use crate::store::{LocalStore, SharedStore, Store};
use crate::vault::{Access, Vault};
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
    let started = std::time::Instant::now();
    if !dir.join(crate::config::CONFIG_FILE).is_file() {
        return Err(StoreError::NotAVault {
            path: dir.to_path_buf(),
        });
    }
    let config = crate::config::VaultConfig::load(dir)?;
    let store: SharedStore = if source == dir {
        crate::copies::primary_store(dir)?
    } else {
        Arc::new(LocalStore::new(source))
    };
    if source != dir {
        crate::copies::check_copy(store.as_ref(), source, &config.vault_id, false).map_err(
            |reason| StoreError::CopyUnavailable {
                path: source.to_path_buf(),
                reason,
            },
        )?;
    }
    let lock = VaultLock::acquire_wait(dir, wait)?;
    let index_dir = dir.join(INDEX_DIR);
    let old = dir.join(format!("{INDEX_DIR}.old-{}", std::process::id()));
    if index_dir.exists() {
        std::fs::rename(&index_dir, &old).map_err(|e| StoreError::io("rename", &index_dir, e))?;
    }
    crate::durable::create_dir_durable(&index_dir)?;
    let mut report = RebuildReport {
        source: source.to_path_buf(),
        ..RebuildReport::default()
    };
    {
        let index = Index::open_write(&index_dir)?;
        // The catalog first: in a shared vault other hosts keep writing,
        // and a point's manifest is written only after its segments, so
        // segments listed after the manifests hold every chunk they name.
        index_catalog(store.as_ref(), &index, &mut report)?;
        index_segments(store.as_ref(), &index, &mut report)?;
    }
    drop(lock);
    let vault = Vault::open_with(
        dir,
        Access::Write,
        &crate::shared::rebuild_open_options(wait),
    )?;
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(vault = %dir.display(), source = %source.display(), chunks = report.chunks, points = report.points, "rebuilt the index");
    Ok((vault, report))
}

fn index_segments(store: &dyn Store, index: &Index, report: &mut RebuildReport) -> Result<()> {
    let mut ids: Vec<u64> = store
        .list(SEGMENTS_DIR)?
        .iter()
        .filter_map(|n| parse_segment_file_name(n))
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let mut seen: HashSet<ChunkId> = HashSet::new();
    for id in ids {
        let name = segment_name(id);
        let size = store.size(&name)?.unwrap_or(0);
        let mut failed: Option<StoreError> = None;
        let mut read = |off: u64, buf: &mut [u8]| match store.read_at(&name, off, buf) {
            Ok(()) => true,
            Err(e) => {
                failed.get_or_insert(e);
                false
            }
        };
        let scan = scan_segment(id, size, &mut read);
        if let Some(e) = failed {
            report.unreadable_segments.push(format!("{name}: {e}"));
        }
        if let Some(p) = &scan.header_problem {
            report.bad_headers.push(format!("{name}: {p}"));
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

fn index_catalog(store: &dyn Store, index: &Index, report: &mut RebuildReport) -> Result<()> {
    let mut batch = IndexBatch::default();
    for name in catalog_files::list_all(store)? {
        let Some(bytes) = store.get(&name)? else {
            continue;
        };
        let bad = |e: String| format!("{name}: {e}");
        if name.starts_with(POINTS_DIR) {
            match catalog_files::decode_point(&bytes) {
                Ok(p) => {
                    batch.put_point(p);
                    report.points += 1;
                }
                Err(e) => report.bad_files.push(bad(e)),
            }
        } else if name.starts_with(ITEMS_DIR) {
            match catalog_files::decode_item(&bytes) {
                Ok(i) => {
                    batch.put_item(i);
                    report.items += 1;
                }
                Err(e) => report.bad_files.push(bad(e)),
            }
        } else if name.starts_with(POLICIES_DIR) {
            match catalog_files::decode_policy(&bytes) {
                Ok(p) => {
                    batch.put_policy_value(&p.name, &p.policy);
                    report.policies += 1;
                }
                Err(e) => report.bad_files.push(bad(e)),
            }
        }
    }
    index.commit(batch.without_files())
}
