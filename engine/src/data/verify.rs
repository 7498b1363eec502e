//! Verify: does the vault hold everything its points need, intact?
//!
//! Four passes, each producing typed [`Finding`]s instead of stopping at
//! the first problem (after a check that no vault file or directory lets
//! other users in, a warning):
//! 1. segments: every committed segment exists, is long enough and has a
//!    valid header;
//! 2. chunks: every index entry points inside a committed segment at a
//!    record with the right id (with `read_data`, the whole record is read,
//!    its crc32 checked, decompressed and re-hashed), in parallel;
//! 3. points: every point's block map decodes, and every block's chunk is
//!    indexed and was not found damaged. Findings name the item, point,
//!    block and chunk;
//! 4. names: every name that becomes a path (index, catalog files on every
//!    copy, snapshot manifests in the areas) passes the naming rule.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use coffre_vault_store::format::catalog_files::Role;
use coffre_vault_store::format::segment::{
    SEGMENT_HEADER_LEN, SEGMENTS_DIR, check_header, parse_segment_file_name, segment_name,
};
use coffre_vault_store::store::local::private;
use coffre_vault_store::{ChunkBuf, ChunkId, ChunkLocation, StoreError, Vault};
use rayon::prelude::*;
use serde::Serialize;

use crate::backup::thread_pool;
use crate::error::Result;
use crate::per_thread::PerThread;
use crate::progress::Progress;
use crate::reader::BlockMapReader;
use coffre_vault_store::format::blockmap::LEAF_ENTRIES;

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
    /// Read, decompress and re-hash every chunk on every copy.
    pub read_data: bool,
    /// With `read_data`: rewrite bad copies from a good one.
    pub repair: bool,
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
    /// The copies checked.
    pub copies: Vec<CopyView>,
    /// Bad copies of chunks found (with `read_data`).
    pub detected: u64,
    /// Bad copies rewritten from a good one and read back right.
    pub repaired: u64,
    /// Chunks with no good copy, and what they break.
    pub unrecoverable: Vec<Unrecoverable>,
    /// Problems found.
    pub findings: Vec<Finding>,
}

/// A copy verify read.
#[derive(Debug, Clone, Serialize)]
pub struct CopyView {
    /// Its role.
    pub role: Role,
    /// Its directory.
    pub dir: std::path::PathBuf,
}

/// A chunk no copy holds intact.
#[derive(Debug, Clone, Serialize)]
pub struct Unrecoverable {
    /// Chunk id (hex).
    pub chunk: String,
    /// The byte ranges of the points' images it breaks.
    pub ranges: Vec<DamagedRange>,
}

/// Bytes of one point's image that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DamagedRange {
    /// Item.
    pub item: String,
    /// Point id.
    pub point: String,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Sorts ranges and joins those of one point that touch.
fn merge_ranges(mut ranges: Vec<DamagedRange>) -> Vec<DamagedRange> {
    ranges.sort();
    let mut out: Vec<DamagedRange> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.item == r.item && last.point == r.point && r.start <= last.end => {
                last.end = last.end.max(r.end);
            }
            _ => out.push(r),
        }
    }
    out
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

const HINT_REPAIR: &str = "run `coffre verify --read-data --repair`: it rewrites a bad copy from a copy whose hash matches";
const HINT_COPY_UNAVAILABLE: &str = "mount or recreate the directory (`coffre vault set --add-replica DIR` refills it); backups fail until then unless --degraded-ok";

/// What reading every copy of one chunk found.
struct ChunkCheck {
    /// Some copy holds the right bytes.
    good: bool,
    /// Bad copies: finding code, reason, copy directory.
    bad: Vec<(&'static str, String, String)>,
    /// Bad copies rewritten and read back right.
    repaired: u64,
}

/// The finding code of a failed read of one copy.
fn classify(e: &StoreError) -> &'static str {
    match e {
        StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => "missing",
        StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
            "truncated"
        }
        StoreError::CorruptChunk { reason, .. } => match **reason {
            coffre_vault_store::RecordError::Truncated { .. } => "truncated",
            coffre_vault_store::RecordError::WrongChunk { .. } => "misplaced",
            _ => "corrupt",
        },
        _ => "unreadable",
    }
}

/// Compares every synchronous copy's catalog files (point manifests,
/// item and policy files) with the index: a missing one is a finding (with
/// `repair`, rewritten from the index), an extra one a warning.
fn catalog_file_findings(vault: &Vault, repair: bool) -> Result<Vec<Finding>> {
    use coffre_vault_store::format::catalog_files as cf;
    let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // Items and points with a bad name are `name_findings`' business.
    for item in vault.index().items()? {
        if item.check_names().is_err() {
            continue;
        }
        want.insert(cf::item_file(&item.name), cf::encode_item(&item));
        for p in vault.index().points(&item.name)? {
            want.insert(cf::point_file(&p.item, p.seq), cf::encode_point(&p));
        }
    }
    let mut out = Vec::new();
    for c in vault.copies().sync_copies() {
        let have: HashSet<String> =
            coffre_vault_store::copies::state_files::list_catalog_files(c.store.as_ref())?
                .into_iter()
                .collect();
        for (name, bytes) in want.iter().filter(|(n, _)| !have.contains(*n)) {
            let fixed = repair
                && coffre_vault_store::copies::seal(name, bytes, vault.keys())
                    .and_then(|b| c.store.put(name, &b))
                    .is_ok();
            out.push(Finding::new(
                if fixed {
                    Severity::Warning
                } else {
                    Severity::Error
                },
                "missing",
                format!(
                    "{}: catalog file {name} is missing{}",
                    c.dir.display(),
                    if fixed {
                        " (rewritten from the index)"
                    } else {
                        ""
                    }
                ),
                HINT_REPAIR,
            ));
        }
        for name in have
            .iter()
            .filter(|n| n.starts_with(cf::POINTS_DIR) && !want.contains_key(*n))
        {
            out.push(Finding::new(
                Severity::Warning,
                "orphaned",
                format!(
                    "{}: point manifest {name} names no point of the index",
                    c.dir.display()
                ),
                "left by an interrupted write; the next writer moves it to the copy's quarantine/",
            ));
        }
    }
    Ok(out)
}

const HINT_FORGED: &str = "a vault file failed authentication or is not what the vault's writers write (forged, swapped with another, or damaged); coffre refuses it. `coffre vault rebuild-index` or the next writer rewrites item and policy files from the index; restore a point manifest from another copy";

const HINT_FORGED_SNAPSHOT: &str = "the snapshot is refused wherever it would be read (a restore from it fails; the next capture does not build on it); the vault's copy of the point is unaffected";

const HINT_FORGED_STATE: &str = "a state file of the vault failed authentication or is not sealed (forged, swapped or damaged); coffre does not use it: a job record is left out of listings, a replication state or damaged list counts as absent (replication and healing start over), a list of snapshot areas stops backups until it is removed";

const HINT_BAD_NAME: &str = "a vault file names a path outside its folder (crafted, or damaged); coffre skips it. Remove the file, or restore the copy it came from";

/// Names that break the naming rule ([`coffre_vault_store::format::name`]): in the
/// index, in every synchronous copy's catalog files, and in the snapshot
/// manifests of the vault's areas. Everything else skips them with a
/// warning; verify names each one.
fn name_findings(vault: &Vault) -> Result<Vec<Finding>> {
    use coffre_vault_store::format::catalog_files as cf;
    let mut out = Vec::new();
    let mut forged = Vec::new();
    let mut bad = |message: String, item: Option<&str>| {
        let mut f = Finding::new(Severity::Error, "bad-name", message, HINT_BAD_NAME);
        f.item = item.map(|i| i.chars().take(100).collect());
        out.push(f);
    };
    for item in vault.index().items()? {
        if let Err(e) = item.check_names() {
            bad(format!("index: {e}"), Some(&item.name));
        }
    }
    let mut sizes = Vec::new();
    for p in vault.index().all_points()? {
        if let Err(e) = p.check_names() {
            bad(format!("index: point {}: {e}", p.seq), Some(&p.item));
        }
        if let Err(e) = coffre_vault_store::format::config::validate_block_size(p.block_size) {
            let mut f = Finding::new(
                Severity::Error,
                "bad-block-size",
                format!("index: point {} of item {}: {e}", p.id, p.item),
                HINT_BAD_NAME,
            );
            f.item = Some(p.item.clone());
            f.point = Some(p.id.clone());
            sizes.push(f);
        }
    }
    let keys = vault.keys();
    for c in vault.copies().sync_copies() {
        for name in coffre_vault_store::copies::state_files::list_catalog_files(c.store.as_ref())? {
            let Some(bytes) = c.store.get(&name)? else {
                continue;
            };
            // In an encrypted vault, a file that does not open and decode
            // is forged (or damaged: the two cannot be told apart); in a
            // plain vault, a sealed file is. Either is never used.
            let problem = match cf::open_in(&name, &bytes, keys) {
                Err(e) => Some(e),
                Ok(_) if keys.is_some() => cf::check_in(&name, &bytes, keys).err(),
                Ok(_) => None,
            };
            if let Some(e) = problem {
                forged.push(Finding::new(
                    Severity::Error,
                    "forged-file",
                    format!("{}: catalog file {name} is refused: {e}", c.dir.display()),
                    HINT_FORGED,
                ));
                continue;
            }
            let plain = cf::open_in(&name, &bytes, keys).unwrap_or_default();
            if let Some(e) = cf::name_problem(&name, &plain) {
                bad(
                    format!("{}: catalog file {name}: {e}", c.dir.display()),
                    None,
                );
            }
        }
    }
    for area in coffre_snapshotter::area::Area::known_of(
        vault.dir(),
        &vault.config().vault_id,
        vault.config().keys(),
    ) {
        let Ok(items) = std::fs::read_dir(area.dir()) else {
            continue;
        };
        for item in items.flatten().filter(|e| e.path().is_dir()) {
            let Ok(files) = std::fs::read_dir(item.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".snap") || name.contains(".pass") {
                    continue;
                }
                match coffre_snapshotter::manifest::check(&f.path(), vault.config().keys()) {
                    Err(e @ coffre_snapshotter::SnapError::RefusedName { .. }) => {
                        bad(e.to_string(), None);
                    }
                    // An encrypted vault's manifest that does not open
                    // whole is forged or damaged; it is never used.
                    Err(e) if keys.is_some() => forged.push(Finding::new(
                        Severity::Error,
                        "forged-file",
                        format!("snapshot manifest refused: {e}"),
                        HINT_FORGED_SNAPSHOT,
                    )),
                    _ => {}
                }
            }
        }
    }
    if let Some(k) = keys {
        for (name, e) in
            coffre_vault_store::copies::state_files::refused_state_files(vault.dir(), k)
        {
            forged.push(Finding::new(
                Severity::Error,
                "forged-file",
                format!("{}: {name} is refused: {e}", vault.dir().display()),
                HINT_FORGED_STATE,
            ));
        }
    }
    out.extend(sizes);
    out.extend(forged);
    Ok(out)
}

/// Reads and checks chunk `id` on every synchronous copy; with `repair`,
/// rewrites the bad copies from a good one and reads them back.
fn scrub_chunk(
    vault: &Vault,
    id: &ChunkId,
    loc: &ChunkLocation,
    buf: &mut ChunkBuf,
    repair: bool,
) -> ChunkCheck {
    let mut good: Option<Vec<u8>> = None;
    let mut bad = Vec::new();
    let mut bad_copies = Vec::new();
    for c in vault.copies().sync_copies() {
        match vault.read_copy(c, id, loc, buf) {
            Ok(()) => {
                if good.is_none() {
                    good = Some(buf.record_bytes().to_vec());
                }
            }
            Err(e) => {
                bad.push((classify(&e), describe(&e), c.dir.display().to_string()));
                bad_copies.push(c.clone());
            }
        }
    }
    let mut repaired = 0;
    if repair && let Some(record) = &good {
        for c in &bad_copies {
            let ok = vault.write_record(c, loc, record).is_ok()
                && vault.read_copy(c, id, loc, buf).is_ok();
            if ok {
                repaired += 1;
                tracing::debug!(copy = %c.dir.display(), chunk = %id.short(), "scrub repaired a copy of a chunk");
            }
        }
    }
    ChunkCheck {
        good: good.is_some(),
        bad,
        repaired,
    }
}

const HINT_RESTORE_OTHER: &str =
    "restore an older point, or back the item up again to store a fresh copy of the data";

/// What `quarantine/` of copy `c` holds: files a writer or replication
/// kept aside instead of deleting (see `coffre_vault_store::copies::quarantine`).
fn quarantine_findings(c: &coffre_vault_store::copies::Copy) -> Result<Vec<Finding>> {
    let files = coffre_vault_store::copies::quarantine::list(c.store.as_ref())?;
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let bytes: u64 = files
        .iter()
        .map(|f| c.store.size(f).ok().flatten().unwrap_or(0))
        .sum();
    let shown: Vec<&str> = files.iter().take(5).map(String::as_str).collect();
    Ok(vec![Finding::new(
        Severity::Warning,
        "quarantined",
        format!(
            "{}: {} file(s), {bytes} bytes, in quarantine/ (the index did not know them, so they were kept instead of deleted): {}{}",
            c.dir.display(),
            files.len(),
            shown.join(", "),
            if files.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        ),
        "`coffre gc` deletes those the index shows no point needs and keeps the rest; if a point is missing, move its files back out of quarantine/ and run `coffre vault rebuild-index`",
    )])
}

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

    // 1. Segments, on every synchronous copy.
    let committed = vault.index().segments()?;
    let infos = vault.index().segment_infos()?;
    let copies = vault.copies().sync_copies();
    let several = copies.len() > 1;
    for u in vault.copies().unavailable() {
        findings.push(Finding::new(
            if u.role == Role::Secondary {
                Severity::Warning
            } else {
                Severity::Error
            },
            "copy-unavailable",
            format!("{} copy {}: {}", u.role, u.dir.display(), u.reason),
            HINT_COPY_UNAVAILABLE,
        ));
    }
    // Segments whose file is unusable on *every* copy.
    let mut bad_on: HashMap<u64, usize> = HashMap::new();
    for c in copies {
        let listed: HashSet<u64> = c
            .store
            .list(SEGMENTS_DIR)?
            .iter()
            .filter_map(|n| parse_segment_file_name(n))
            .collect();
        for id in listed.iter().filter(|id| !infos.contains_key(id)) {
            findings.push(Finding::new(
                Severity::Warning,
                "orphaned",
                format!(
                    "{}: segment {} is not in the index",
                    c.dir.display(),
                    segment_name(*id)
                ),
                "left by an interrupted write; the next backup (any writer) moves it to the copy's quarantine/",
            ));
        }
        findings.extend(quarantine_findings(c)?);
        for (&id, &len) in &committed {
            let name = segment_name(id);
            let where_ = c.dir.join(&name);
            let (code, problem) = match c.store.size(&name) {
                Ok(None) => (
                    "missing",
                    format!("segment {} is missing", where_.display()),
                ),
                Err(e) => (
                    "missing",
                    format!("segment {} cannot be read: {e}", where_.display()),
                ),
                Ok(Some(actual)) if actual < len => (
                    "truncated",
                    format!(
                        "segment {} is {actual} bytes, the index records {len} committed bytes",
                        where_.display()
                    ),
                ),
                Ok(Some(_)) => {
                    let mut h = vec![0u8; SEGMENT_HEADER_LEN as usize];
                    match c
                        .store
                        .read_at(&name, 0, &mut h)
                        .map_err(|e| e.to_string())
                        .and_then(|()| check_header(&h, id))
                    {
                        Ok(()) => continue,
                        Err(reason) => {
                            ("corrupt", format!("segment {}: {reason}", where_.display()))
                        }
                    }
                }
            };
            *bad_on.entry(id).or_default() += 1;
            let repairable = several && opts.read_data;
            findings.push(Finding::new(
                if repairable && opts.repair {
                    Severity::Warning
                } else {
                    Severity::Error
                },
                code,
                problem,
                if several {
                    HINT_REPAIR
                } else {
                    HINT_RESTORE_OTHER
                },
            ));
        }
    }
    let bad_segments: HashSet<u64> = bad_on
        .iter()
        .filter(|(_, n)| **n >= copies.len())
        .map(|(id, _)| *id)
        .collect();

    // 2. Chunks, in segment order so that reads are sequential. With
    // `read_data` every copy of every chunk is read and fully checked.
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
    let check = |(id, loc): &(ChunkId, ChunkLocation)| -> Option<(ChunkId, ChunkCheck)> {
        let seg_len = committed.get(&loc.segment).copied();
        let r = match seg_len {
            None => Err(format!("segment {} is not committed", loc.segment)),
            Some(_) if bad_segments.contains(&loc.segment) && !opts.read_data => {
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
            Some(_) if opts.read_data => {
                let c = scrub_chunk(vault, id, loc, &mut buffers.get(), opts.repair);
                progress.advance(u64::from(loc.len));
                return (!c.bad.is_empty()).then_some((*id, c));
            }
            Some(_) => vault.check_record_header(id, loc).map_err(|e| describe(&e)),
        };
        progress.advance(if opts.read_data {
            u64::from(loc.len)
        } else {
            1
        });
        r.err().map(|reason| {
            (
                *id,
                ChunkCheck {
                    good: false,
                    bad: vec![("unreadable", reason, String::new())],
                    repaired: 0,
                },
            )
        })
    };
    let checked: HashMap<ChunkId, ChunkCheck> =
        pool.install(|| chunks.par_iter().filter_map(check).collect());
    let mut damaged: HashMap<ChunkId, String> = HashMap::new();
    let (mut detected, mut repaired) = (0u64, 0u64);
    let mut per_copy: BTreeMap<String, usize> = BTreeMap::new();
    for (id, c) in &checked {
        detected += c.bad.len() as u64;
        repaired += c.repaired;
        if !c.good {
            let reasons: Vec<String> = c.bad.iter().map(|(_, r, _)| r.clone()).collect();
            damaged.insert(*id, reasons.join("; "));
            continue;
        }
        for (code, reason, copy) in &c.bad {
            let listed = per_copy.entry(copy.clone()).or_insert(0usize);
            *listed += 1;
            if *listed > MAX_BLOCK_FINDINGS_PER_POINT {
                continue;
            }
            let fixed = opts.repair && c.repaired > 0;
            let mut f = Finding::new(
                if fixed {
                    Severity::Warning
                } else {
                    Severity::Error
                },
                code,
                format!(
                    "chunk {} on copy {copy}: {reason}{}",
                    id.short(),
                    if fixed {
                        " (repaired from a good copy)"
                    } else {
                        ""
                    }
                ),
                HINT_REPAIR,
            );
            f.chunk = Some(id.to_string());
            findings.push(f);
        }
    }
    for (copy, n) in &per_copy {
        if *n > MAX_BLOCK_FINDINGS_PER_POINT {
            findings.push(Finding::new(
                if opts.repair && repaired >= detected {
                    Severity::Warning
                } else {
                    Severity::Error
                },
                "more-bad-copies",
                format!(
                    "copy {copy}: {} more bad copies of chunks not listed",
                    n - MAX_BLOCK_FINDINGS_PER_POINT
                ),
                HINT_REPAIR,
            ));
        }
    }
    findings.extend(catalog_file_findings(vault, opts.repair)?);
    findings.extend(name_findings(vault)?);
    if opts.read_data && vault.role() == Role::Primary {
        // The next backup that produces one of these chunks stores it again.
        let list: std::collections::BTreeSet<ChunkId> = damaged.keys().copied().collect();
        if list != vault.damaged_list()
            && let Err(e) = vault.store_damaged_list(&list)
        {
            tracing::warn!(error = %e, "could not record the damaged chunks");
        }
    }
    for (id, reason) in &damaged {
        let mut f = Finding::new(
            Severity::Error,
            if several {
                "unrecoverable"
            } else {
                "chunk-damaged"
            },
            format!("chunk {id}: no good copy: {reason}"),
            HINT_RESTORE_OTHER,
        );
        f.chunk = Some(id.to_string());
        findings.push(f);
    }
    let indexed: HashSet<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();

    // 3. Points.
    let points = vault.index().all_points()?;
    let mut tally = RefTally::default();
    let mut broken: BTreeMap<ChunkId, Vec<DamagedRange>> = BTreeMap::new();
    for point in &points {
        findings.extend(check_point(
            vault,
            point,
            &indexed,
            &damaged,
            &mut tally,
            &mut broken,
        ));
    }
    let unrecoverable: Vec<Unrecoverable> = damaged
        .keys()
        .map(|id| Unrecoverable {
            chunk: id.to_string(),
            ranges: merge_ranges(broken.remove(id).unwrap_or_default()),
        })
        .collect();

    // 4. Reference counts: GC deletes what they say is unreferenced, so
    // they must equal what the points actually reference.
    if vault.index().has_gc_layout()? {
        let mut wrong = 0usize;
        let (mut unreferenced, mut unreferenced_bytes) = (0u64, 0u64);
        for (id, loc) in &chunks {
            let expected = tally.counts.get(id).copied().unwrap_or(0);
            let stored = vault.index().chunk_ref(id)?.map(|r| r.count);
            if stored == Some(0) && expected == 0 {
                unreferenced += 1;
                unreferenced_bytes += u64::from(loc.len);
            }
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
        if unreferenced > 0 {
            findings.push(Finding::new(
                Severity::Warning,
                "unreferenced",
                format!(
                    "{unreferenced} chunk(s), {unreferenced_bytes} bytes, are stored but no point references them (expired points, or an interrupted backup)"
                ),
                "`coffre gc` gives their space back; a later backup may reuse them first",
            ));
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
        copies: copies
            .iter()
            .map(|c| CopyView {
                role: c.role,
                dir: c.dir.clone(),
            })
            .collect(),
        detected,
        repaired,
        unrecoverable,
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

/// References the points make, counted the way `coffre_vault_store::index::refs`
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
    broken: &mut BTreeMap<ChunkId, Vec<DamagedRange>>,
) -> Vec<Finding> {
    let first_use_of_root = tally.add(point.block_map) == 1;
    let bs = u64::from(point.block_size);
    let mut breaks = |id: ChunkId, first_block: u64, blocks: u64| {
        // Block numbers come from a decoded block map: saturate, never wrap.
        let start = first_block.saturating_mul(bs);
        broken.entry(id).or_default().push(DamagedRange {
            item: point.item.clone(),
            point: point.id.clone(),
            start: start.min(point.image_size),
            end: start
                .saturating_add(blocks.saturating_mul(bs))
                .min(point.image_size),
        });
    };
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
            breaks(point.block_map, 0, point.image_size.div_ceil(bs.max(1)));
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
                if let Some(l) = map.leaf_id(k) {
                    breaks(l, (k * LEAF_ENTRIES) as u64, LEAF_ENTRIES as u64);
                }
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
                damaged.get(id).map(|r| {
                    breaks(*id, block, 1);
                    ("block-damaged", format!("is damaged: {r}"))
                })
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

    /// A new vault in a temporary folder, with the clock that made it.
    fn new_vault() -> (tempfile::TempDir, ManualClock, coffre_vault_store::Vault) {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new("2027-01-01T00:00:00Z".parse().unwrap());
        let vault = crate::vault_ops::create_vault(
            &dir.path().join("v"),
            &crate::vault_ops::CreateOptions::default(),
            &clock,
        )
        .unwrap();
        (dir, clock, vault)
    }

    #[test]
    fn a_wrong_reference_count_is_a_finding() {
        let (_dir, clock, vault) = new_vault();
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

    /// An item whose name leaves the area, already in the index (as a
    /// coffre before the naming rule could have indexed it from a crafted
    /// copy): verify names it, and a due purge removes nothing outside the
    /// snapshot area.
    #[test]
    fn an_indexed_bad_name_is_a_finding_and_prune_leaves_the_outside_alone() {
        use coffre_snapshotter::area::{Area, AreaIdentity};
        use coffre_vault_store::{ItemRecord, Protection};
        let (dir, clock, vault) = new_vault();
        let owner = AreaIdentity {
            vault_id: vault.config().vault_id.clone(),
            vault_name: vault.config().name.clone(),
        };
        let area_dir = dir.path().join("area");
        Area::for_image(
            vault.dir(),
            vault.config().keys(),
            &owner,
            Some(&area_dir),
            None,
            std::path::Path::new("/m.img"),
        )
        .unwrap();
        let outside = dir.path().join("x");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"keep").unwrap();
        let abs = dir.path().join("abs");
        std::fs::create_dir(&abs).unwrap();
        std::fs::write(abs.join("keep"), b"keep").unwrap();
        let past: jiff::Timestamp = "2020-01-01T00:00:00Z".parse().unwrap();
        let mut b = coffre_vault_store::IndexBatch::default();
        for name in ["../x", abs.to_str().unwrap()] {
            b.put_item(ItemRecord {
                name: name.into(),
                source: "/m.img".into(),
                created: past,
                next_seq: 1,
                policy: None,
                protection: Protection::SoftDeleted {
                    at: past,
                    purge_after: past,
                },
                last_slot: None,
                identity: None,
                hooks: Default::default(),
            });
        }
        vault.index().commit(b.without_files()).unwrap();

        let report = verify(&vault, &VerifyOptions::default(), &NoProgress).unwrap();
        let bad: Vec<_> = report
            .findings
            .iter()
            .filter(|f| f.code == "bad-name" && f.severity == Severity::Error)
            .collect();
        assert_eq!(bad.len(), 2, "{:?}", report.findings);
        assert!(!report.is_clean());

        crate::service::prune::prune(
            &vault,
            &crate::service::registry::Registry::disabled(),
            crate::Clock::now(&clock),
            false,
        )
        .unwrap();
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
        assert_eq!(std::fs::read(abs.join("keep")).unwrap(), b"keep");
        assert!(area_dir.join("area").exists());
    }
}
