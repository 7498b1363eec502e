//! One pass of the fallback over the image: blocks hashed, compared with
//! the previous snapshot, and new records stored by an ordered pack writer.

use std::collections::HashMap;
use std::path::Path;

use coffre_vault_store::ChunkId;
use coffre_vault_store::format::blockmap::{Node, block_count};
use coffre_vault_store::format::record::RecordEncoder;
use rayon::prelude::*;

use super::window::{Planned, is_read, plan_window};
use super::{CaptureRequest, WINDOW_BYTES};
use crate::cbt::Hint;
use crate::error::{Result, SnapError};
use crate::fetch::Fetcher;
use crate::manifest::{FLAG_NODE, PackLoc, SnapEntry, SnapReader, SnapWriter};
use crate::pack::PackWriter;
use crate::progress::Progress;
use crate::throttle::Throttle;

/// Most new blocks remembered for deduplication within one capture (about
/// 5 MiB; the transfer deduplicates against the whole vault anyway).
const MAX_DEDUP_ENTRIES: usize = 64 << 10;

/// One pass, as one value: the capture's options, what the pass builds
/// on, the hint it follows, and where its entries and records go.
pub(super) struct Pass<'p, 'r> {
    /// The capture's options.
    pub req: &'p CaptureRequest<'r>,
    /// The manifest the pass deduplicates against (the previous snapshot,
    /// or the pass before).
    pub against: Option<&'p Path>,
    /// Where the packs of `against` are in this capture's pack table
    /// (`None`: lost).
    pub renumber: &'p [Option<u16>],
    /// The hint's dirty extents and the sorted clean blocks to sample.
    pub hint: Option<(&'p Hint, &'p [u64])>,
    /// This job's pack, which every pass appends to.
    pub pack: &'p mut PackWriter,
    /// Its index in the pack table.
    pub pack_index: u16,
    /// The pass's manifest.
    pub writer: &'p mut SnapWriter,
    /// Told of the bytes the pass went through.
    pub progress: &'p dyn Progress,
}

/// What one pass read.
pub(super) struct PassRead {
    pub bytes_read: u64,
    pub sampled: u64,
    pub mismatches: u64,
    pub first_mismatch: Option<u64>,
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
pub(super) fn chunk_pass(pass: Pass<'_, '_>) -> Result<PassRead> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let Pass {
        req,
        against,
        renumber,
        hint,
        pack,
        pack_index,
        writer,
        progress,
    } = pass;
    let source = req.source;
    let bs = req.block_size as usize;
    let size = source.size();
    let blocks = block_count(size, req.block_size);
    let mut prev = match against {
        Some(p) => {
            let r = SnapReader::open(p, req.keys.as_ref())?;
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
        .map(|_| {
            std::sync::Mutex::new(RecordEncoder::for_vault(
                req.compression_level,
                req.keys.clone(),
            ))
        })
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
    // (a rendezvous), so at most two windows' records are in memory; a
    // third window may be mapped, not yet read (the next one, mapped
    // while the pool works).
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
        // A window's bytes (mapped, read or fetched) and the previous
        // snapshot's entries for it.
        type Acquired<'w> = (Option<crate::source::Window<'w>>, Vec<SnapEntry>);
        let acquire = |p: &Planned, prev: &mut Option<SnapReader<_>>| -> Result<Acquired<'_>> {
            let window = match (&fetcher, p.ranges.is_empty()) {
                (_, true) => None,
                (Some(f), false) => Some(f.receive()?),
                (None, false) => Some(source.window_for(p.offset, p.len, &p.ranges)?),
            };
            let before = match prev.as_mut() {
                Some(r) => r.next_entries(p.n)?,
                None => Vec::new(),
            };
            Ok((window, before))
        };
        let mut ready: Option<Acquired<'_>> = None;
        let mut next = (first < blocks).then(|| plan(first)).transpose()?;
        while let Some(planned) = next.take() {
            let (window, before) = match ready.take() {
                Some(r) => r,
                None => acquire(&planned, &mut prev)?,
            };
            let Planned {
                offset: _,
                n,
                len,
                dirty,
                sampled,
                ranges,
            } = planned;
            if (req.cancelled)() {
                return Err(SnapError::Cancelled {
                    path: source.path().to_path_buf(),
                });
            }
            if first + (n as u64) < blocks {
                next = Some(plan(first + n as u64)?);
            }
            read.sampled += sampled.iter().filter(|&&s| s).count() as u64;
            let wanted = |i: usize| is_read(dirty.as_deref(), &sampled, i);
            let work = || -> Vec<Result<Block>> {
                // Each block is copied out of the mapping before it is
                // hashed and compressed: a guest writing to the image
                // must never make a record whose bytes are not its id
                // (a torn read is caught by the pass's change check). A
                // window in memory of its own (fetched over NBD, read
                // with O_DIRECT) cannot change and is used in place.
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
                            let block: &[u8] = if window.is_hole(start..end) {
                                &[]
                            } else {
                                let bytes = window.bytes().get(start..end).unwrap_or_default();
                                if window.is_private() {
                                    bytes
                                } else {
                                    // A block the previous snapshot holds
                                    // at the same place makes no record:
                                    // hashed where it lies, it needs no
                                    // copy (most blocks of a day two). A
                                    // torn read cannot pass for the old
                                    // bytes, and the pass's change check
                                    // catches it anyway.
                                    if let Some(e) = before.get(i).filter(|e| e.id.is_some())
                                        && let Some(Some(pack)) =
                                            renumber.get(usize::from(e.loc.pack))
                                        && !is_zero(bytes)
                                        && Some(ChunkId::in_vault(req.keys.as_deref(), bytes))
                                            == e.id
                                    {
                                        let mut e = *e;
                                        e.loc.pack = *pack;
                                        return Ok(Block::Reuse(e));
                                    }
                                    copy.clear();
                                    copy.extend_from_slice(bytes);
                                    copy
                                }
                            };
                            let id = (!block.is_empty() && !is_zero(block))
                                .then(|| ChunkId::in_vault(req.keys.as_deref(), block));
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
                            let record = enc.encode(id, block).map_err(|e| {
                                SnapError::damaged(
                                    source.path(),
                                    format!("cannot encode a block: {e}"),
                                )
                            })?;
                            Ok(Block::New(id, record, Node::decode(block).is_ok()))
                        },
                    )
                    .collect()
            };
            // A mapped or read window: the next one is mapped (and its
            // previous entries read) while the pool works on this one, so
            // the pool does not wait for that between windows. A fetched
            // one (NBD) keeps one request ahead, as its fetcher does.
            let (out, got) = match next.as_ref().filter(|_| fetcher.is_none()) {
                Some(p) => {
                    let mut out = Vec::new();
                    let got = req.pool.in_place_scope(|scope| {
                        scope.spawn(|_| out = work());
                        acquire(p, &mut prev)
                    });
                    (out, Some(got))
                }
                None => (req.pool.install(work), None),
            };
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
            // (This window's own failure, above, is the one reported.)
            if let Some(got) = got {
                ready = Some(got?);
            }
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
