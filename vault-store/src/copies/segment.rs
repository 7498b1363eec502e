//! Writing segments on every copy ([`SegmentWriter`]) and refilling a
//! copy's segment from the others ([`refill`]). The segment format itself
//! is [`crate::format::segment`].

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::path::PathBuf;

use crate::copies::{Copies, Copy};
use crate::error::{Result, StoreError};
use crate::format::scan::gaps;
use crate::format::segment::{
    SEGMENT_HEADER_LEN, check_header, encode_header, is_adopted, parse_segment_file_name,
    segment_name,
};
use crate::store::Appender;

/// True when the snapshot pack open as the file is also a vault's segment
/// (adopted: linked in by a transfer); snapshot expiry then leaves its
/// bytes to the vault's GC.
pub use crate::store::local::shared_with_snapshot as pack_is_adopted;

/// True when bytes `start..end` of `name` read back as zeros (a hole a GC
/// punch left); false when they hold anything else or cannot be read.
pub fn reads_as_zeros(store: &dyn crate::store::Store, name: &str, start: u64, end: u64) -> bool {
    let mut buf = vec![0u8; ((end.saturating_sub(start)) as usize).min(1 << 20)];
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        let chunk = buf.get_mut(..n).unwrap_or_default();
        if store.read_at(name, at, chunk).is_err() || chunk.iter().any(|&b| b != 0) {
            return false;
        }
        at += n as u64;
    }
    true
}

/// Appends records to one segment on every synchronous copy. The same
/// bytes land at the same offsets everywhere (invariant C1).
///
/// The first copy (the primary) is written on the caller's thread; every
/// other copy has a writer thread of its own, fed batches of
/// [`REPLICA_BATCH`] bytes, so N copies cost N page-cache copies in
/// parallel rather than in a row. A replica's append error is kept by its
/// thread and returned by the next [`SegmentWriter::sync`] (nothing is
/// acknowledged before a sync of every copy succeeds).
pub struct SegmentWriter {
    id: u64,
    name: String,
    primary: Box<dyn Appender>,
    replicas: Vec<ReplicaWriter>,
    /// Bytes appended to the primary and not yet sent to the replicas.
    batch: Vec<u8>,
    len: u64,
}

/// Bytes handed to the replica threads at a time.
pub const REPLICA_BATCH: usize = 4 << 20;

/// Batches in flight per replica before the caller waits (bounds memory).
const REPLICA_QUEUE: usize = 4;

enum ToReplica {
    Data(std::sync::Arc<[u8]>),
    Writeback,
    Sync(std::sync::mpsc::SyncSender<Result<()>>),
}

/// One replica's writer thread.
struct ReplicaWriter {
    location: String,
    tx: Option<std::sync::mpsc::SyncSender<ToReplica>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReplicaWriter {
    fn spawn(location: String, mut out: Box<dyn Appender>) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<ToReplica>(REPLICA_QUEUE);
        let thread = std::thread::Builder::new()
            .name("coffre-replica".into())
            .spawn(move || {
                // The first error of an append or writeback, for the next sync.
                let mut failed: Option<StoreError> = None;
                for msg in rx {
                    match msg {
                        ToReplica::Data(bytes) => {
                            if failed.is_none() {
                                failed = out.append(&bytes).err();
                            }
                        }
                        ToReplica::Writeback => {
                            if failed.is_none() {
                                failed = out.start_writeback().err();
                            }
                        }
                        ToReplica::Sync(reply) => {
                            let r = match failed.take() {
                                Some(e) => Err(e),
                                None => out.sync(),
                            };
                            let _ = reply.send(r);
                        }
                    }
                }
            })
            .map_err(|e| StoreError::CopyUnavailable {
                path: PathBuf::from(&location),
                reason: format!("cannot start its writer thread: {e}"),
            })?;
        Ok(ReplicaWriter {
            location,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn gone(&self) -> StoreError {
        StoreError::CopyUnavailable {
            path: PathBuf::from(&self.location),
            reason: "its writer thread stopped".into(),
        }
    }

    fn send(&self, msg: ToReplica) -> Result<()> {
        match &self.tx {
            Some(tx) => tx.send(msg).map_err(|_| self.gone()),
            None => Err(self.gone()),
        }
    }

    /// Asks for a sync; the answer comes on the returned channel.
    fn request_sync(&self) -> Result<std::sync::mpsc::Receiver<Result<()>>> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.send(ToReplica::Sync(reply))?;
        Ok(answer)
    }
}

impl Drop for ReplicaWriter {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has written what it
        // was sent; waiting for it keeps a later truncate from racing it.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SegmentWriter {
    fn new(
        id: u64,
        name: String,
        outs: Vec<(String, Box<dyn Appender>)>,
        len: u64,
    ) -> Result<Self> {
        let mut outs = outs.into_iter();
        let Some((_, primary)) = outs.next() else {
            return Err(StoreError::CopyUnavailable {
                path: PathBuf::new(),
                reason: "a vault needs at least one copy".into(),
            });
        };
        let replicas = outs
            .map(|(location, out)| ReplicaWriter::spawn(location, out))
            .collect::<Result<Vec<_>>>()?;
        Ok(SegmentWriter {
            id,
            name,
            primary,
            replicas,
            batch: Vec::new(),
            len,
        })
    }

    /// Creates segment `id` on every copy with its header (not yet synced).
    pub fn create(copies: &Copies, id: u64) -> Result<Self> {
        let name = segment_name(id);
        let mut outs = Vec::new();
        for c in copies.sync_copies() {
            outs.push((c.store.location(), c.store.create(&name)?));
        }
        let mut w = SegmentWriter::new(id, name, outs, 0)?;
        w.append(&encode_header(id))?;
        Ok(w)
    }

    /// Opens segment `id` on every copy to append after its first
    /// `committed` bytes. A copy whose file is missing or short (a replica
    /// that was down) gets the committed prefix from the first copy that
    /// has it.
    pub fn append_to(copies: &Copies, id: u64, committed: u64) -> Result<Self> {
        let name = segment_name(id);
        let mut outs = Vec::new();
        for c in copies.sync_copies() {
            let have = c.store.size(&name)?.unwrap_or(0);
            if have < committed {
                refill(copies, c, &name, committed)?;
            }
            outs.push((c.store.location(), c.store.append_to(&name, committed)?));
        }
        SegmentWriter::new(id, name, outs, committed)
    }

    /// Appends bytes to every copy; returns the offset they start at.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.len;
        self.primary.append(bytes)?;
        if !self.replicas.is_empty() {
            self.batch.extend_from_slice(bytes);
            if self.batch.len() >= REPLICA_BATCH {
                self.send_batch()?;
            }
        }
        self.len += bytes.len() as u64;
        Ok(at)
    }

    /// Hands the pending batch to every replica thread.
    fn send_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let bytes: std::sync::Arc<[u8]> = std::mem::take(&mut self.batch).into();
        for r in &self.replicas {
            r.send(ToReplica::Data(bytes.clone()))?;
        }
        Ok(())
    }

    /// Starts the writeback of what was appended on every copy.
    pub fn start_writeback(&mut self) -> Result<()> {
        self.send_batch()?;
        for r in &self.replicas {
            r.send(ToReplica::Writeback)?;
        }
        self.primary.start_writeback()
    }

    /// Makes the file durable on every copy, concurrently: the replica
    /// threads sync while the caller syncs the primary. The first error
    /// wins.
    pub fn sync(&mut self) -> Result<()> {
        self.send_batch()?;
        let answers: Vec<_> = self
            .replicas
            .iter()
            .map(|r| r.request_sync().map(|a| (a, r)))
            .collect::<Result<_>>()?;
        let mut first = self.primary.sync();
        for (answer, r) in answers {
            let got = answer.recv().unwrap_or_else(|_| Err(r.gone()));
            if first.is_ok() {
                first = got;
            }
        }
        first
    }

    /// Cuts the file back to `len` bytes on every copy (or removes it when
    /// `len` is 0), discarding unflushed data.
    pub fn discard(self, copies: &Copies, len: u64) -> Result<()> {
        // Stops the replica threads (after what they were sent) first.
        drop(self.replicas);
        drop(self.primary);
        let mut first = Ok(());
        for c in copies.sync_copies() {
            let r = if len == 0 {
                c.store.delete(&self.name).map(|_| ())
            } else {
                c.store.truncate(&self.name, len)
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Segment id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes written so far, header included.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing, not even the header, was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The most a refill writes at once.
const REFILL_RUN: usize = 8 << 20;

/// What a refill did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refilled {
    /// Records copied (each checked whole first).
    pub records: u64,
    /// Records no other copy holds intact: not copied (left as a hole,
    /// which `verify --read-data` reports and reads route around).
    pub damaged: u64,
}

/// Copies the first `len` bytes of segment `name` into `target` from the
/// other copies that have them (a replica that missed writes).
///
/// Nothing is copied unchecked: the records are found by a scan of a copy
/// that has the bytes ([`crate::format::scan`]), and each is read whole and its
/// header checksum, length and payload CRC-32 checked before it is
/// written, from the first copy whose bytes pass. A record no copy holds
/// intact is not copied; nor are the bytes between records (holes punched
/// by GC, damage): they stay a hole in `target`.
pub fn refill(copies: &Copies, target: &Copy, name: &str, len: u64) -> Result<Refilled> {
    let sources: Vec<&Copy> = copies
        .readable()
        .filter(|c| c.dir != target.dir)
        .filter(|c| c.store.size(name).ok().flatten().is_some_and(|n| n >= len))
        .collect();
    if sources.is_empty() {
        return Err(StoreError::CopyUnavailable {
            path: target.dir.clone(),
            reason: format!("no copy holds the {len} committed bytes of {name}"),
        });
    }
    let id = parse_segment_file_name(name.rsplit('/').next().unwrap_or(name)).ok_or_else(|| {
        StoreError::CopyUnavailable {
            path: target.dir.clone(),
            reason: format!("{name} is not a segment name"),
        }
    })?;
    let have = target.store.size(name)?.unwrap_or(0).min(len);
    let records = records_of(&sources, id, name, len);
    let mut done = Refilled::default();
    let mut scratch = Vec::new();
    if have < SEGMENT_HEADER_LEN {
        let header = sources.iter().find_map(|c| {
            let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
            (c.store.read_at(name, 0, &mut h).is_ok()
                && (check_header(&h, id).is_ok() || is_adopted(&h)))
            .then_some(h)
        });
        match header {
            Some(h) => target.store.write_at(name, 0, &h)?,
            None => done.damaged += 1,
        }
    }
    // Checked records are written in runs of adjacent ones (one durable
    // write each, up to 8 MiB), not one write per record.
    let mut run_at = 0u64;
    let mut run: Vec<u8> = Vec::new();
    for r in records
        .iter()
        .filter(|r| r.offset + u64::from(r.len) > have)
    {
        let mut rec = vec![0u8; r.len as usize];
        let good = sources.iter().any(|c| {
            c.store.read_at(name, r.offset, &mut rec).is_ok()
                && crate::format::record::record_authentic(
                    &rec,
                    Some(&r.id),
                    copies.keys.as_deref(),
                    &mut scratch,
                )
        });
        if !good {
            done.damaged += 1;
            tracing::warn!(copy = %target.dir.display(), segment = name, offset = r.offset, chunk = %r.id, "no copy holds this record intact; not copied");
            continue;
        }
        let adjacent = !run.is_empty() && run_at + run.len() as u64 == r.offset;
        if !adjacent || run.len() + rec.len() > REFILL_RUN {
            if !run.is_empty() {
                target.store.write_at(name, run_at, &run)?;
            }
            run.clear();
            run_at = r.offset;
        }
        run.extend_from_slice(&rec);
        done.records += 1;
    }
    if !run.is_empty() {
        target.store.write_at(name, run_at, &run)?;
    }
    if target.store.size(name)?.unwrap_or(0) < len {
        // Past the last record copied: holes up to the committed length.
        target.store.truncate(name, len)?;
    }
    tracing::info!(copy = %target.dir.display(), segment = name, bytes = len - have, records = done.records, damaged = done.damaged, "refilled a copy's segment");
    Ok(done)
}

/// The records of the first `len` bytes of segment `name`, in file order,
/// as the sources show them: the first source's scan, and where it found
/// damage (bytes between records, or a short end) the other sources'
/// records too, so a record one copy lost is still found in another.
///
/// A range the first source holds as zeros is a hole GC punched (its
/// records are dead): another source's records there are not taken, or a
/// refill would grow back on the target what GC reclaimed.
fn records_of(sources: &[&Copy], id: u64, name: &str, len: u64) -> Vec<crate::format::scan::Found> {
    let mut found: std::collections::BTreeMap<u64, crate::format::scan::Found> = Default::default();
    let Some(first) = sources.first() else {
        return Vec::new();
    };
    let punched = |r: &crate::format::scan::Found| {
        reads_as_zeros(
            first.store.as_ref(),
            name,
            r.offset,
            r.offset + u64::from(r.len),
        )
    };
    for (i, src) in sources.iter().enumerate() {
        let mut read = |off: u64, buf: &mut [u8]| src.store.read_at(name, off, buf).is_ok();
        let scan = crate::format::scan::scan_segment(id, len, &mut read);
        let whole = scan.skipped == 0 && scan.end == len;
        for r in scan.records {
            if i > 0 && (found.contains_key(&r.offset) || punched(&r)) {
                continue;
            }
            found.entry(r.offset).or_insert(r);
        }
        if whole {
            break;
        }
    }
    // Records of different copies that overlap (a damaged copy can show a
    // false header inside another record): the first in file order wins.
    let mut out: Vec<crate::format::scan::Found> = Vec::with_capacity(found.len());
    for r in found.into_values() {
        let free = out
            .last()
            .is_none_or(|p| p.offset + u64::from(p.len) <= r.offset);
        if free {
            out.push(r);
        }
    }
    for (start, end) in gaps(&out, SEGMENT_HEADER_LEN.min(len), len) {
        tracing::warn!(
            segment = name,
            start,
            end,
            "no copy shows records in these bytes; they stay a hole"
        );
    }
    out
}
