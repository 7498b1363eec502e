//! Verify: does the vault hold everything its points need, intact?
//!
//! Three passes, each producing typed [`Finding`]s instead of stopping at
//! the first problem (after a check that no vault file or directory lets
//! other users in, a warning):
//! 1. segments: every committed segment exists, is long enough and has a
//!    valid header;
//! 2. chunks: every index entry points inside a committed segment at a
//!    record with the right id (with `read_data`, the whole record is read,
//!    its crc32 checked, decompressed and re-hashed), in parallel;
//! 3. points: every point's block map decodes, and every block's chunk is
//!    indexed and was not found damaged. Findings name the item, point,
//!    block and chunk.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::time::Instant;

use coffre_vault_store::private;
use coffre_vault_store::segment::{SEGMENT_HEADER_LEN, check_header};
use coffre_vault_store::{ChunkBuf, ChunkId, ChunkLocation, StoreError, Vault};
use rayon::prelude::*;
use serde::Serialize;

use crate::backup::thread_pool;
use crate::error::Result;
use crate::per_thread::PerThread;
use crate::progress::Progress;
use crate::reader::BlockMapReader;
use coffre_vault_store::blockmap::LEAF_ENTRIES;

/// Findings listed per point before they are summarised.
const MAX_BLOCK_FINDINGS_PER_POINT: usize = 20;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Data a point needs is missing or damaged.
    Error,
    /// Something is off but no point is affected.
    Warning,
}

/// One problem found by verify.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Severity.
    pub severity: Severity,
    /// Stable machine-readable kind, e.g. `chunk-damaged`.
    pub code: &'static str,
    /// Human-readable description.
    pub message: String,
    /// Item affected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    /// Point affected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    /// Block affected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
    /// Chunk affected (hex id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk: Option<String>,
    /// What the user can do.
    pub hint: &'static str,
}

impl Finding {
    fn new(severity: Severity, code: &'static str, message: String, hint: &'static str) -> Self {
        Finding {
            severity,
            code,
            message,
            item: None,
            point: None,
            block: None,
            chunk: None,
            hint,
        }
    }
}

/// Verify options.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Read, decompress and re-hash every chunk.
    pub read_data: bool,
    /// Worker threads (0 = all cores).
    pub threads: usize,
}

/// The outcome of verify.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Segments checked.
    pub segments: u64,
    /// Chunks checked.
    pub chunks: u64,
    /// Points checked.
    pub points: u64,
    /// Record bytes read.
    pub bytes_checked: u64,
    /// Whether chunk data was read.
    pub read_data: bool,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Problems found.
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    /// True when no error-level finding was made.
    pub fn is_clean(&self) -> bool {
        !self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

/// Paths named in the permissions finding before it only counts.
const MAX_SHARED_PATHS_NAMED: usize = 5;

/// A warning when any file or directory of the vault lets the group or
/// others in (made by an older coffre, copied, or chmod-ed by hand).
fn shared_files_finding(dir: &std::path::Path) -> Option<Finding> {
    use std::os::unix::fs::PermissionsExt;
    let mut shared = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        if private::is_shared(meta.permissions().mode()) {
            shared.push((path.clone(), meta.permissions().mode() & 0o777));
        }
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
    if shared.is_empty() {
        return None;
    }
    shared.sort();
    let named: Vec<String> = shared
        .iter()
        .take(MAX_SHARED_PATHS_NAMED)
        .map(|(p, m)| format!("{} ({m:03o})", p.display()))
        .collect();
    let more = shared.len().saturating_sub(named.len());
    Some(Finding::new(
        Severity::Warning,
        "permissions",
        format!(
            "{} files or directories of vault {} can be read by other users: {}{}",
            shared.len(),
            dir.display(),
            named.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
        "a vault holds whole disks: run `chmod -R go-rwx` on the vault directory \
         (coffre creates directories 0700 and files 0600)",
    ))
}

const HINT_RESTORE_OTHER: &str =
    "restore an older point, or back the item up again to store a fresh copy of the data";

/// Verifies the vault.
pub fn verify(
    vault: &Vault,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let mut findings = Vec::new();

    // 0. File modes: a vault holds whole disks.
    findings.extend(shared_files_finding(vault.dir()));

    // 1. Segments.
    let committed = vault.index().segments()?;
    let mut bad_segments = HashSet::new();
    for (&id, &len) in &committed {
        let path = vault.segment_path(id);
        let actual = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) => {
                findings.push(Finding::new(
                    Severity::Error,
                    "segment-missing",
                    format!("segment {} cannot be read: {e}", path.display()),
                    HINT_RESTORE_OTHER,
                ));
                bad_segments.insert(id);
                continue;
            }
        };
        if actual < len {
            findings.push(Finding::new(
                Severity::Error,
                "segment-truncated",
                format!(
                    "segment {} is {actual} bytes, the index records {len} committed bytes",
                    path.display()
                ),
                HINT_RESTORE_OTHER,
            ));
        }
        // Only the header: never the whole segment.
        let header = std::fs::File::open(&path).and_then(|f| {
            let mut h = Vec::with_capacity(SEGMENT_HEADER_LEN as usize);
            f.take(SEGMENT_HEADER_LEN).read_to_end(&mut h).map(|_| h)
        });
        if let Err(reason) = header
            .map_err(|e| e.to_string())
            .and_then(|h| check_header(&h, id))
        {
            findings.push(Finding::new(
                Severity::Error,
                "segment-header",
                format!("segment {}: {reason}", path.display()),
                HINT_RESTORE_OTHER,
            ));
        }
    }

    // 2. Chunks, in segment order so that reads are sequential.
    let mut chunks = vault.index().chunks()?;
    chunks.sort_by_key(|(_, l)| (l.segment, l.offset));
    let total_bytes: u64 = chunks.iter().map(|(_, l)| u64::from(l.len)).sum();
    progress.start(if opts.read_data {
        total_bytes
    } else {
        chunks.len() as u64
    });
    let pool = thread_pool(opts.threads)?;
    let buffers = PerThread::new(&pool, ChunkBuf::default);
    let check = |(id, loc): &(ChunkId, ChunkLocation)| -> Option<(ChunkId, String)> {
        let seg_len = committed.get(&loc.segment).copied();
        let r = match seg_len {
            None => Err(format!("segment {} is not committed", loc.segment)),
            Some(_) if bad_segments.contains(&loc.segment) => {
                Err(format!("segment {} is missing", loc.segment))
            }
            Some(len)
                if loc.offset < SEGMENT_HEADER_LEN || loc.offset + u64::from(loc.len) > len =>
            {
                Err(format!(
                    "location {}+{} lies outside the committed {len} bytes of segment {}",
                    loc.offset, loc.len, loc.segment
                ))
            }
            Some(_) => if opts.read_data {
                vault.read_chunk_into(id, loc, &mut buffers.get())
            } else {
                vault.check_record_header(id, loc)
            }
            .map_err(|e| describe(&e)),
        };
        progress.advance(if opts.read_data {
            u64::from(loc.len)
        } else {
            1
        });
        r.err().map(|reason| (*id, reason))
    };
    let damaged: HashMap<ChunkId, String> =
        pool.install(|| chunks.par_iter().filter_map(check).collect());
    for (id, reason) in &damaged {
        let mut f = Finding::new(
            Severity::Error,
            "chunk-damaged",
            format!("chunk {id}: {reason}"),
            HINT_RESTORE_OTHER,
        );
        f.chunk = Some(id.to_string());
        findings.push(f);
    }
    let indexed: HashSet<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();

    // 3. Points.
    let points = vault.index().all_points()?;
    let mut tally = RefTally::default();
    for point in &points {
        findings.extend(check_point(vault, point, &indexed, &damaged, &mut tally));
    }

    // 4. Reference counts: GC deletes what they say is unreferenced, so
    // they must equal what the points actually reference.
    if vault.index().has_gc_layout()? {
        let mut wrong = 0usize;
        for (id, _) in &chunks {
            let expected = tally.counts.get(id).copied().unwrap_or(0);
            let stored = vault.index().chunk_ref(id)?.map(|r| r.count);
            if stored != Some(expected) {
                wrong += 1;
                if wrong <= MAX_BLOCK_FINDINGS_PER_POINT {
                    let mut f = Finding::new(
                        Severity::Error,
                        "refcount-mismatch",
                        format!(
                            "chunk {}: the index counts {} references, the points make {expected}",
                            id.short(),
                            stored.map_or("no".to_string(), |c| c.to_string())
                        ),
                        "do not run gc on this vault; restore what you need and report the bug",
                    );
                    f.chunk = Some(id.to_string());
                    findings.push(f);
                }
            }
        }
    }
    progress.finish();
    findings.sort_by_key(|f| (f.severity != Severity::Error, f.code));
    Ok(VerifyReport {
        segments: committed.len() as u64,
        chunks: chunks.len() as u64,
        points: points.len() as u64,
        bytes_checked: if opts.read_data { total_bytes } else { 0 },
        read_data: opts.read_data,
        duration_ms: started.elapsed().as_millis() as u64,
        findings,
    })
}

fn describe(e: &StoreError) -> String {
    match e {
        StoreError::CorruptChunk {
            path,
            offset,
            reason,
            ..
        } => format!("{reason} (in {} at offset {offset})", path.display()),
        other => other.to_string(),
    }
}

/// References the points make, counted the way `coffre_vault_store::refs`
/// counts them: points → roots, distinct roots → leaves, distinct leaves →
/// data chunks.
#[derive(Default)]
struct RefTally {
    counts: HashMap<ChunkId, u64>,
    leaves_seen: HashSet<ChunkId>,
}

impl RefTally {
    fn add(&mut self, id: ChunkId) -> u64 {
        let c = self.counts.entry(id).or_insert(0);
        *c += 1;
        *c
    }
}

fn check_point(
    vault: &Vault,
    point: &coffre_vault_store::PointRecord,
    indexed: &HashSet<ChunkId>,
    damaged: &HashMap<ChunkId, String>,
    tally: &mut RefTally,
) -> Vec<Finding> {
    let first_use_of_root = tally.add(point.block_map) == 1;
    let mut out = Vec::new();
    let tag = |mut f: Finding| {
        f.item = Some(point.item.clone());
        f.point = Some(point.id.clone());
        f
    };
    let mut map = match BlockMapReader::open(vault, point) {
        Ok(m) => m,
        Err(e) => {
            let mut f = tag(Finding::new(
                Severity::Error,
                "block-map-damaged",
                format!("point {} of item {}: {e}", point.id, point.item),
                HINT_RESTORE_OTHER,
            ));
            f.chunk = Some(point.block_map.to_string());
            out.push(f);
            return out;
        }
    };
    let mut block_problems = 0usize;
    for k in 0..map.leaf_count() {
        let leaf_id = map.leaf_id(k);
        let count_entries = match leaf_id {
            Some(l) if first_use_of_root => {
                tally.add(l);
                tally.leaves_seen.insert(l)
            }
            _ => false,
        };
        let entries = match map.leaf(k) {
            Ok(e) => e.to_vec(),
            Err(e) => {
                let mut f = tag(Finding::new(
                    Severity::Error,
                    "block-map-damaged",
                    format!(
                        "point {} of item {}: blocks {}..{} unreadable: {e}",
                        point.id,
                        point.item,
                        k * LEAF_ENTRIES,
                        (k + 1) * LEAF_ENTRIES
                    ),
                    HINT_RESTORE_OTHER,
                ));
                f.chunk = map.leaf_id(k).map(|id| id.to_string());
                out.push(f);
                continue;
            }
        };
        if count_entries {
            for id in entries.iter().flatten() {
                tally.add(*id);
            }
        }
        for (i, entry) in entries.iter().enumerate() {
            let Some(id) = entry else { continue };
            let block = (k * LEAF_ENTRIES + i) as u64;
            let problem = if !indexed.contains(id) {
                Some(("chunk-missing", "is missing from the index".to_string()))
            } else {
                damaged
                    .get(id)
                    .map(|r| ("block-damaged", format!("is damaged: {r}")))
            };
            if let Some((code, what)) = problem {
                block_problems += 1;
                if block_problems <= MAX_BLOCK_FINDINGS_PER_POINT {
                    let mut f = tag(Finding::new(
                        Severity::Error,
                        code,
                        format!(
                            "point {} of item {}, block {block}: chunk {} {what}",
                            point.id,
                            point.item,
                            id.short()
                        ),
                        HINT_RESTORE_OTHER,
                    ));
                    f.block = Some(block);
                    f.chunk = Some(id.to_string());
                    out.push(f);
                }
            }
        }
    }
    if block_problems > MAX_BLOCK_FINDINGS_PER_POINT {
        out.push(tag(Finding::new(
            Severity::Error,
            "more-damaged-blocks",
            format!(
                "point {} of item {}: {} more damaged blocks not listed",
                point.id,
                point.item,
                block_problems - MAX_BLOCK_FINDINGS_PER_POINT
            ),
            HINT_RESTORE_OTHER,
        )));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::{BackupOptions, ManualClock, MemImage};
    use coffre_vault_store::index::{ChunkKind, RefEntry};

    #[test]
    fn a_wrong_reference_count_is_a_finding() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new("2027-01-01T00:00:00Z".parse().unwrap());
        let vault = crate::vault_ops::create_vault(
            &dir.path().join("v"),
            &crate::vault_ops::CreateOptions::default(),
            &clock,
        )
        .unwrap();
        let bytes: Vec<u8> = (0..(256u32 << 10)).map(|i| (i * 7 % 251) as u8).collect();
        let opts = BackupOptions {
            threads: 1,
            ..BackupOptions::new("m", "/m.img")
        };
        let out = crate::backup(
            &vault,
            &MemImage::new("/m.img", bytes),
            &opts,
            &clock,
            &NoProgress,
        )
        .unwrap();
        let clean = verify(&vault, &VerifyOptions::default(), &NoProgress).unwrap();
        assert!(clean.is_clean(), "{:?}", clean.findings);
        // The root is referenced once; pretend it is referenced twice.
        let mut b = coffre_vault_store::IndexBatch::default();
        b.put_ref(
            &out.point.block_map,
            RefEntry {
                kind: ChunkKind::Root,
                count: 2,
            },
        );
        vault.index().commit(b).unwrap();
        let report = verify(&vault, &VerifyOptions::default(), &NoProgress).unwrap();
        // (This process has no umask of 077, so RocksDB's own files may
        // draw a `permissions` warning: only errors count here.)
        let errors: Vec<_> = report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .collect();
        assert_eq!(errors.len(), 1, "{:?}", report.findings);
        assert_eq!(errors[0].code, "refcount-mismatch");
    }
}
