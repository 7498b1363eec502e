//! Pack files (`AREA/ITEM/JOB.pack`): the records a fallback capture
//! stored, in the vault's chunk record format (magic, header CRC, id,
//! payload CRC, zstd or raw), after a 32-byte pack header.
//!
//! A capture appends only blocks its item's previous snapshot did not hold
//! at the same place, so a day-two pack holds about the day's change. The
//! transfer adopts the pack as a vault segment (a hard link: its records
//! are indexed where they are), or, where the vault cannot share the file,
//! copies the records into segments as they are (a CRC check, no
//! recompression, no rehash). Packs are written with `O_DIRECT` where the
//! filesystem allows. Expiry punches the ranges no remaining manifest
//! refers to (never in a pack the vault adopted) and deletes packs nothing
//! refers to.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use coffre_vault_store::ChunkId;
use coffre_vault_store::format::record::{HEADER_LEN, MAX_STORED_LEN, RecordDecoder, RecordHeader};
use coffre_vault_store::store::local::direct::DirectAppender;
use coffre_vault_store::store::local::durable::{fsync_dir, fsync_file};
use coffre_vault_store::store::local::private;

use crate::error::{Result, SnapError};

/// Magic. Frozen.
pub use coffre_vault_store::format::segment::PACK_MAGIC;
/// Format version.
pub use coffre_vault_store::format::segment::PACK_VERSION;
/// Header length.
pub const PACK_HEADER_LEN: u64 = coffre_vault_store::format::segment::SEGMENT_HEADER_LEN;

/// Checks a pack header.
pub fn check_header(h: &[u8]) -> std::result::Result<(), String> {
    coffre_vault_store::format::segment::check_pack_header(h)
}

/// Appends records to a new pack.
pub struct PackWriter {
    out: DirectAppender,
    path: PathBuf,
    done: bool,
}

impl PackWriter {
    /// Creates `path` (owner-only) with its header. Records go to the
    /// device directly (`O_DIRECT`) where the filesystem allows: a pack is
    /// written once and read rarely, so the page cache gains nothing.
    pub fn create(path: &Path) -> Result<Self> {
        let f = private::open_options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| SnapError::write(path, e))?;
        let mut out = DirectAppender::new(f, path);
        out.append(&coffre_vault_store::format::segment::encode_pack_header())
            .map_err(|e| SnapError::write(path, e))?;
        Ok(PackWriter {
            out,
            path: path.to_path_buf(),
            done: false,
        })
    }

    /// Appends one record; returns its offset.
    pub fn append(&mut self, record: &[u8]) -> Result<u64> {
        let at = self.out.len();
        self.out
            .append(record)
            .map_err(|e| SnapError::write(&self.path, e))?;
        Ok(at)
    }

    /// Writes what is buffered and, for page-cache writes, starts their
    /// writeback (`sync_file_range`) so the fsync at the end has little
    /// left to do.
    pub fn start_writeback(&mut self) -> Result<()> {
        self.out
            .start_writeback()
            .map_err(|e| SnapError::write(&self.path, e))
    }

    /// Hands everything appended to the kernel (not a sync).
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| SnapError::write(&self.path, e))
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.out.len()
    }

    /// True when only the header was written.
    pub fn is_empty(&self) -> bool {
        self.out.len() == PACK_HEADER_LEN
    }

    /// The pack's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes and fsyncs the pack and its directory.
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        fsync_file(self.out.file(), &self.path)?;
        fsync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads records back from a pack.
#[derive(Debug)]
pub struct PackReader {
    file: File,
    path: PathBuf,
    /// An encrypted vault's keys: its records are sealed.
    keys: Option<std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
}

/// The open files of `packs`, by number (`None` for a pack that is gone).
pub fn files_of(packs: &[Option<PackReader>]) -> Vec<Option<&File>> {
    packs
        .iter()
        .map(|p| p.as_ref().map(PackReader::file))
        .collect()
}

/// Per-thread buffers for reading records.
#[derive(Default)]
pub struct RecordBuf {
    record: Vec<u8>,
    plain: Vec<u8>,
    decoder: RecordDecoder,
}

impl RecordBuf {
    /// The plaintext of the record decoded last.
    pub fn plain(&self) -> &[u8] {
        &self.plain
    }

    /// The plaintext of the record decoded last, handed over whole (no
    /// copy); the next decode allocates its own.
    pub fn take_plain(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.plain)
    }

    /// The raw record read last.
    pub fn record(&self) -> &[u8] {
        &self.record
    }

    /// Takes the raw record read last (the buffer starts empty again).
    pub fn take_record(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.record)
    }
}

impl PackReader {
    /// Opens a pack and checks its header; `keys`: an encrypted vault's
    /// (its records are sealed).
    pub fn open(
        path: &Path,
        keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    ) -> Result<Self> {
        let file = File::open(path).map_err(|e| SnapError::damaged(path, e.to_string()))?;
        let mut h = [0u8; PACK_HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| SnapError::damaged(path, format!("header: {e}")))?;
        check_header(&h).map_err(|r| SnapError::damaged(path, r))?;
        Ok(PackReader {
            file,
            path: path.to_path_buf(),
            keys: keys.cloned(),
        })
    }

    /// The open pack file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Asks the kernel to start reading `offset..offset+len` into the page
    /// cache (advice: failure is harmless).
    pub fn will_need(&self, offset: u64, len: u64) {
        coffre_vault_store::store::local::read_ahead::will_need(&self.file, offset, len);
    }

    /// Reads the record of `id` at `offset..offset+len` into `buf.record`
    /// and checks its header, id and payload CRC (no decompression).
    pub fn read_raw(&self, id: &ChunkId, offset: u64, len: u32, buf: &mut RecordBuf) -> Result<()> {
        let header = self.read_checked_header(id, offset, len, buf)?;
        let payload = buf.record.get(HEADER_LEN..).unwrap_or_default();
        if crc32fast::hash(payload) != header.data_crc {
            return Err(self.bad(offset, "payload checksum mismatch".into()));
        }
        Ok(())
    }

    /// Reads the record into `buf.record` and checks its header and id
    /// (not the payload).
    fn read_checked_header(
        &self,
        id: &ChunkId,
        offset: u64,
        len: u32,
        buf: &mut RecordBuf,
    ) -> Result<RecordHeader> {
        let len = check_place(offset, len).map_err(|r| self.bad(offset, r))?;
        buf.record.resize(len, 0);
        self.file
            .read_exact_at(&mut buf.record, offset)
            .map_err(|e| self.bad(offset, e.to_string()))?;
        check_record(id, &buf.record).map_err(|r| self.bad(offset, r))
    }

    /// Reads and decodes the record of `id` (CRC, decompression, BLAKE3):
    /// the plaintext is left in `buf.plain()`.
    pub fn read_plain(
        &self,
        id: &ChunkId,
        offset: u64,
        len: u32,
        buf: &mut RecordBuf,
    ) -> Result<()> {
        // The decoder checks the payload CRC itself.
        let header = self.read_checked_header(id, offset, len, buf)?;
        let RecordBuf {
            record,
            plain,
            decoder,
        } = buf;
        decoder.use_keys(self.keys.as_ref());
        decoder
            .decode_payload_into(&header, record.get(HEADER_LEN..).unwrap_or_default(), plain)
            .map_err(|e| self.bad(offset, e.to_string()))
    }

    fn bad(&self, offset: u64, reason: String) -> SnapError {
        SnapError::damaged(&self.path, format!("record at offset {offset}: {reason}"))
    }
}

/// Checks a record's place as a manifest gives it (offset and length),
/// before anything is read or allocated: returns the length to read.
fn check_place(offset: u64, len: u32) -> std::result::Result<usize, String> {
    let len = len as usize;
    if !(HEADER_LEN..=HEADER_LEN + MAX_STORED_LEN).contains(&len) || offset < PACK_HEADER_LEN {
        return Err(format!("record length {len} is impossible"));
    }
    Ok(len)
}

/// Checks a record read at its place: its header, that it holds `id`, and
/// that its own length is the length read (not the payload).
fn check_record(id: &ChunkId, record: &[u8]) -> std::result::Result<RecordHeader, String> {
    let header = RecordHeader::parse(record).map_err(|e| e.to_string())?;
    if header.id != *id {
        return Err(format!("holds chunk {} instead of {id}", header.id));
    }
    if header.record_len() != record.len() as u64 {
        return Err("record length disagrees with the manifest".into());
    }
    Ok(header)
}

/// Fuzz entry point: reads arbitrary bytes as a pack, header then records
/// in order, each through the checks a [`PackReader`] makes (its place,
/// its header and id, then its payload's CRC, decompression and hash), as
/// if a manifest named each record where it lies; never panics. Returns
/// the number of valid records before the first bad byte, or `None` when
/// the header is bad.
pub fn fuzz_entry(data: &[u8]) -> Option<usize> {
    check_header(data).ok()?;
    let mut at = PACK_HEADER_LEN;
    let mut decoder = RecordDecoder::default();
    let mut plain = Vec::new();
    let mut records = 0;
    while let Some(rest) = usize::try_from(at)
        .ok()
        .and_then(|a| data.get(a..))
        .filter(|r| !r.is_empty())
    {
        // What a manifest would say of this record: its id and length.
        let Ok(named) = RecordHeader::parse(rest) else {
            break;
        };
        let Ok(len) = u32::try_from(named.record_len()) else {
            break;
        };
        let Ok(len) = check_place(at, len) else {
            break;
        };
        let Some(record) = rest.get(..len) else {
            break;
        };
        let Ok(header) = check_record(&named.id, record) else {
            break;
        };
        if decoder
            .decode_payload_into(
                &header,
                record.get(HEADER_LEN..).unwrap_or_default(),
                &mut plain,
            )
            .is_err()
        {
            break;
        }
        records += 1;
        at += len as u64;
    }
    Some(records)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use coffre_vault_store::format::record::RecordEncoder;

    #[test]
    fn records_round_trip_and_damage_is_caught() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("j.pack");
        let mut w = PackWriter::create(&p).unwrap();
        let mut enc = RecordEncoder::new(1);
        let blocks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 65536]).collect();
        let mut locs = Vec::new();
        for b in &blocks {
            let id = ChunkId::of(b);
            let rec = enc.encode(id, b).unwrap();
            locs.push((id, w.append(&rec).unwrap(), rec.len() as u32));
        }
        w.finish().unwrap();
        let r = PackReader::open(&p, None).unwrap();
        let mut buf = RecordBuf::default();
        for ((id, off, len), b) in locs.iter().zip(&blocks) {
            r.read_plain(id, *off, *len, &mut buf).unwrap();
            assert_eq!(buf.plain(), &b[..]);
        }
        // Wrong id, wrong length, flipped payload byte.
        let (id0, off0, len0) = locs[0];
        assert!(r.read_raw(&locs[1].0, off0, len0, &mut buf).is_err());
        assert!(r.read_raw(&id0, off0, len0 + 1, &mut buf).is_err());
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], off0 + HEADER_LEN as u64 + 3)
            .unwrap();
        let e = r.read_raw(&id0, off0, len0, &mut buf).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        // The scan stops at the damaged record; the header alone is valid.
        assert_eq!(fuzz_entry(&std::fs::read(&p).unwrap()), Some(0));
        assert_eq!(
            fuzz_entry(&coffre_vault_store::format::segment::encode_pack_header()),
            Some(0)
        );
        assert_eq!(fuzz_entry(b"CFPACK"), None);
    }

    #[test]
    fn an_unfinished_pack_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("j.pack");
        let mut w = PackWriter::create(&p).unwrap();
        w.append(b"partial").unwrap();
        drop(w);
        assert!(!p.exists());
    }
}
