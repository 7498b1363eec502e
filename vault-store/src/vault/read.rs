//! Reading chunks: from the primary, from another copy when a record is
//! damaged (with repair on the fly), and the record checks.

use super::*;

impl Vault {
    /// Reads, checks (crc32, length, BLAKE3) and returns a chunk's plaintext.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let loc = self
            .index
            .chunk(id)?
            .ok_or(StoreError::ChunkMissing { id: *id })?;
        self.read_chunk_at(id, &loc)
    }

    /// Like [`Vault::read_chunk`] for a location already looked up.
    pub fn read_chunk_at(&self, id: &ChunkId, loc: &ChunkLocation) -> Result<Vec<u8>> {
        let mut buf = ChunkBuf::default();
        self.read_chunk_into(id, loc, &mut buf)?;
        Ok(buf.plain)
    }

    /// Reads and checks a chunk into reused buffers; the plaintext is then
    /// in [`ChunkBuf::plain`]. Every read checks the record's CRC-32s, its
    /// length and BLAKE3 of the plaintext. A copy that fails is skipped
    /// and, once another copy gave the right bytes, repaired with them.
    pub fn read_chunk_into(
        &self,
        id: &ChunkId,
        loc: &ChunkLocation,
        buf: &mut ChunkBuf,
    ) -> Result<()> {
        let mut first_err = None;
        let mut bad = Vec::new();
        for (i, c) in self.copies.readable().enumerate() {
            match self.read_copy(c, id, loc, buf) {
                Ok(()) => {
                    if !bad.is_empty() {
                        self.repair_from(&bad, id, loc, &buf.record);
                    }
                    return Ok(());
                }
                Err(e) => {
                    if i == 0 || first_err.is_none() {
                        tracing::warn!(copy = %c.dir.display(), error = %e, "bad copy of a chunk; trying the next copy");
                    }
                    bad.push(c.clone());
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or(StoreError::ChunkMissing { id: *id }))
    }

    /// Starts reading the records at `locs` on the copy reads try first,
    /// in a few large runs, so that [`Vault::read_chunk_into`] finds them
    /// in the page cache (advice only).
    pub fn read_ahead(&self, locs: &[ChunkLocation]) {
        let Some(c) = self.copies.readable().next() else {
            return;
        };
        let ranges = locs
            .iter()
            .map(|l| (l.segment, l.offset, l.offset + u64::from(l.len)))
            .collect();
        for (segment, start, end) in crate::store::local::read_ahead::runs(ranges) {
            c.store
                .will_need(&segment_name(segment), start, end - start);
        }
    }

    /// Reads and fully checks the record at `loc` on one copy.
    pub fn read_copy(
        &self,
        c: &crate::copies::Copy,
        id: &ChunkId,
        loc: &ChunkLocation,
        buf: &mut ChunkBuf,
    ) -> Result<()> {
        let name = segment_name(loc.segment);
        let corrupt = |reason| StoreError::CorruptChunk {
            id: *id,
            path: c.dir.join(&name),
            offset: loc.offset,
            reason: Box::new(reason),
        };
        buf.record.clear();
        buf.record.resize(loc.len as usize, 0);
        match c.store.read_at(&name, loc.offset, &mut buf.record) {
            Ok(()) => {}
            Err(StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                return Err(corrupt(record::RecordError::Truncated {
                    needed: loc.len as usize,
                    available: 0,
                }));
            }
            Err(e) => return Err(e),
        }
        let header = RecordHeader::parse(&buf.record).map_err(corrupt)?;
        if header.id != *id {
            return Err(corrupt(record::RecordError::WrongChunk {
                expected: *id,
                found: header.id,
            }));
        }
        if header.record_len() != u64::from(loc.len) {
            return Err(corrupt(record::RecordError::Truncated {
                needed: header.record_len() as usize,
                available: loc.len as usize,
            }));
        }
        let payload = buf.record.get(HEADER_LEN..).unwrap_or_default();
        buf.decoder.use_keys(self.config.keys());
        buf.decoder
            .decode_payload_into(&header, payload, &mut buf.plain)
            .map_err(corrupt)
    }

    /// Rewrites the record at `loc` on the synchronous copies in `bad`
    /// with `record`, bytes another copy proved right. The secondary is
    /// left to replication.
    pub(super) fn repair_from(
        &self,
        bad: &[crate::copies::Copy],
        id: &ChunkId,
        loc: &ChunkLocation,
        record: &[u8],
    ) {
        for c in bad.iter().filter(|c| c.role != Role::Secondary) {
            match self.write_record(c, loc, record) {
                Ok(()) => {
                    self.copies.count_repair();
                    tracing::warn!(copy = %c.dir.display(), chunk = %id.short(), segment = loc.segment, offset = loc.offset, "repaired a copy of a chunk from a good copy");
                }
                Err(e) => {
                    tracing::warn!(copy = %c.dir.display(), chunk = %id.short(), error = %e, "could not repair a copy of a chunk");
                }
            }
        }
    }

    /// Writes `record` at `loc` on copy `c` (a segment file that is gone
    /// gets its header back first).
    pub fn write_record(
        &self,
        c: &crate::copies::Copy,
        loc: &ChunkLocation,
        record: &[u8],
    ) -> Result<()> {
        let name = segment_name(loc.segment);
        if c.store.size(&name)?.is_none() {
            c.store.write_at(&name, 0, &encode_header(loc.segment))?;
        }
        c.store.write_at(&name, loc.offset, record)
    }

    /// Checks only the header of the record at `loc` (cheap verify), on
    /// the first copy that has a good one.
    pub fn check_record_header(&self, id: &ChunkId, loc: &ChunkLocation) -> Result<()> {
        let mut first_err = None;
        for c in self.copies.readable() {
            match self.check_header_on(c, id, loc) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or(StoreError::ChunkMissing { id: *id }))
    }

    pub(super) fn check_header_on(
        &self,
        c: &crate::copies::Copy,
        id: &ChunkId,
        loc: &ChunkLocation,
    ) -> Result<()> {
        let name = segment_name(loc.segment);
        let corrupt = |reason| StoreError::CorruptChunk {
            id: *id,
            path: c.dir.join(&name),
            offset: loc.offset,
            reason: Box::new(reason),
        };
        let mut bytes = vec![0u8; HEADER_LEN.min(loc.len as usize)];
        c.store.read_at(&name, loc.offset, &mut bytes)?;
        let h = RecordHeader::parse(&bytes).map_err(corrupt)?;
        if h.id != *id {
            return Err(corrupt(record::RecordError::WrongChunk {
                expected: *id,
                found: h.id,
            }));
        }
        if h.record_len() != u64::from(loc.len) {
            return Err(corrupt(record::RecordError::Truncated {
                needed: h.record_len() as usize,
                available: loc.len as usize,
            }));
        }
        Ok(())
    }

    /// Reads the raw record bytes of chunk `id` at `loc`, checked (GC
    /// copies them unchanged).
    pub fn read_record(&self, id: &ChunkId, loc: &ChunkLocation) -> Result<Vec<u8>> {
        let mut buf = ChunkBuf::default();
        self.read_chunk_into(id, loc, &mut buf)?;
        Ok(buf.record)
    }
}
