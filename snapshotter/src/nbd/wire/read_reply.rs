//! A read's reply, checked chunk by chunk as it arrives ([`ReadReply`]),
//! and the same checks as a pure function for the fuzz target and tests.

use std::io::Read;

use super::{
    MAX_READ, REPLY_ERROR_BIT, REPLY_FLAG_DONE, REPLY_NONE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE,
    STRUCTURED_REPLY_MAGIC, WireError, error_payload, proto, u16_at, u32_at, u64_at,
};

/// Most reply chunks one read may take: a content chunk covers at least
/// a byte and none overlap, so this bounds a server that would send
/// chunks without end (a 4 MiB read in 512-byte extents takes 8,192).
pub const MAX_READ_CHUNKS: usize = 16_384;

/// The reply to one `NBD_CMD_READ` of `len` bytes at `offset`, checked
/// chunk by chunk as it arrives: every chunk lies inside the request
/// (checked arithmetic on the server's offsets and lengths), is not empty,
/// overlaps no other, and there are at most [`MAX_READ_CHUNKS`]; at the
/// last chunk the request must be covered in full. A reply that covers
/// less is an error, never zeros.
#[derive(Debug)]
pub struct ReadReply {
    pub(super) offset: u64,
    pub(super) len: u32,
    /// Covered spans, relative to `offset`: start → end.
    covered: std::collections::BTreeMap<u64, u64>,
    covered_bytes: u64,
    chunks: usize,
    /// Data (not hole) spans, absolute.
    data: Vec<(u64, u64)>,
}

impl ReadReply {
    /// The reply to a read of `len` bytes at `offset`, before any chunk.
    pub fn new(offset: u64, len: u32) -> ReadReply {
        ReadReply {
            offset,
            len,
            covered: Default::default(),
            covered_bytes: 0,
            chunks: 0,
            data: Vec::new(),
        }
    }

    fn what(&self) -> String {
        format!("the reply to the read of {}+{}", self.offset, self.len)
    }

    /// This request's part of `out`, whose first byte is at `base`.
    pub(super) fn buffer<'b>(
        &self,
        base: u64,
        out: &'b mut [u8],
    ) -> Result<&'b mut [u8], WireError> {
        let at = self
            .offset
            .checked_sub(base)
            .and_then(|a| usize::try_from(a).ok());
        at.and_then(|a| out.get_mut(a..a.checked_add(self.len as usize)?))
            .ok_or_else(|| proto("a read outside its buffer"))
    }

    /// Records a content chunk of `n` bytes at `at` (absolute); returns
    /// where it goes relative to the request.
    fn cover(&mut self, at: u64, n: u64, is_data: bool) -> Result<usize, WireError> {
        let rel = at
            .checked_sub(self.offset)
            .filter(|r| r.checked_add(n).is_some_and(|e| e <= u64::from(self.len)));
        let Some(rel) = rel else {
            return Err(proto(format!(
                "{}: a chunk of {n} bytes at {at} lies outside the request",
                self.what()
            )));
        };
        if n == 0 {
            return Err(proto(format!("{}: an empty chunk at {at}", self.what())));
        }
        let end = rel + n;
        let before = self.covered.range(..end).next_back();
        if before.is_some_and(|(_, &e)| e > rel) {
            return Err(proto(format!("{}: chunks overlap at {at}", self.what())));
        }
        self.covered.insert(rel, end);
        self.covered_bytes += n;
        if is_data {
            self.data.push((at, n));
        }
        usize::try_from(rel).map_err(|_| proto("a chunk outside its buffer"))
    }

    /// Reads one structured chunk whose 16-byte header (after the magic)
    /// is `h` and its payload from `r`, into `dst` (the request's bytes).
    /// True when it was the last chunk of the reply.
    pub fn chunk(
        &mut self,
        r: &mut impl Read,
        h: &[u8; 16],
        dst: &mut [u8],
    ) -> Result<bool, WireError> {
        self.chunks += 1;
        if self.chunks > MAX_READ_CHUNKS {
            return Err(proto(format!(
                "{}: more than {MAX_READ_CHUNKS} chunks",
                self.what()
            )));
        }
        let flags = u16_at(h, 0);
        let kind = u16_at(h, 2);
        let plen = u32_at(h, 12);
        let done = flags & REPLY_FLAG_DONE != 0;
        match kind {
            REPLY_OFFSET_DATA => {
                if !(9..=self.len.saturating_add(8)).contains(&plen) {
                    return Err(proto(format!(
                        "{}: a data chunk of {plen} bytes",
                        self.what()
                    )));
                }
                let mut o = [0u8; 8];
                r.read_exact(&mut o)?;
                let at = u64::from_be_bytes(o);
                let n = u64::from(plen - 8);
                let i = self.cover(at, n, true)?;
                let to = dst
                    .get_mut(i..i + n as usize)
                    .ok_or_else(|| proto("a data chunk outside its buffer"))?;
                r.read_exact(to)?;
            }
            REPLY_OFFSET_HOLE => {
                if plen != 12 {
                    return Err(proto(format!(
                        "{}: a hole chunk of {plen} bytes, not 12",
                        self.what()
                    )));
                }
                let mut p = [0u8; 12];
                r.read_exact(&mut p)?;
                let at = u64_at(&p, 0);
                let n = u64::from(u32_at(&p, 8));
                let i = self.cover(at, n, false)?;
                dst.get_mut(i..i + n as usize)
                    .ok_or_else(|| proto("a hole chunk outside its buffer"))?
                    .fill(0);
            }
            REPLY_NONE if plen == 0 && done => {}
            k if k & REPLY_ERROR_BIT != 0 => {
                let msg = error_payload(r, plen)?;
                return Err(WireError::Refused(format!(
                    "read of {}+{} failed: {msg}",
                    self.offset, self.len
                )));
            }
            k => {
                return Err(proto(format!(
                    "{}: unexpected chunk type {k} ({plen} bytes{})",
                    self.what(),
                    if done { ", last" } else { "" }
                )));
            }
        }
        Ok(done)
    }

    /// Reads a simple reply's data (the whole request) into `dst`.
    pub(super) fn simple(
        mut self,
        r: &mut impl Read,
        dst: &mut [u8],
    ) -> Result<Vec<(u64, u64)>, WireError> {
        if self.chunks > 0 {
            return Err(proto(format!(
                "{}: a simple reply after structured chunks",
                self.what()
            )));
        }
        r.read_exact(dst)?;
        self.cover(self.offset, u64::from(self.len), true)?;
        self.finish()
    }

    /// The data spans of a complete reply; an error naming the first gap
    /// when the chunks did not cover the whole request.
    pub fn finish(self) -> Result<Vec<(u64, u64)>, WireError> {
        if self.covered_bytes != u64::from(self.len) {
            let mut gap = 0;
            for (&s, &e) in &self.covered {
                if s > gap {
                    break;
                }
                gap = e;
            }
            return Err(proto(format!(
                "{} covers {} of its {} bytes (nothing from {} on): the server answered less than asked",
                self.what(),
                self.covered_bytes,
                self.len,
                self.offset + gap
            )));
        }
        Ok(self.data)
    }
}

/// The bytes a read returned, and its data spans (offset, length; holes
/// are zeros and not listed).
pub type ReadBytes = (Vec<u8>, Vec<(u64, u64)>);

/// Decodes the structured reply to one read of `len` bytes at `offset`
/// from `reply`, all the bytes a server sent for it (chunks, each with
/// its magic; every chunk of one cookie, the last flagged done, nothing
/// after it). Returns the `len` bytes read and the data spans. The checks
/// are [`ReadReply`]'s, the same the client applies: a pure function for
/// the fuzz target and tests.
pub fn decode_read_reply(reply: &[u8], offset: u64, len: u32) -> Result<ReadBytes, WireError> {
    if len > MAX_READ {
        return Err(proto(format!(
            "a read of {len} bytes is more than asked at once"
        )));
    }
    let mut r = std::io::Cursor::new(reply);
    let mut out = vec![0u8; len as usize];
    let mut state = ReadReply::new(offset, len);
    let mut cookie = None;
    loop {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        if u32::from_be_bytes(magic) != STRUCTURED_REPLY_MAGIC {
            return Err(proto("not a structured reply chunk"));
        }
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        let c = u64_at(&h, 4);
        if *cookie.get_or_insert(c) != c {
            return Err(proto("a reply chunk for another request"));
        }
        if state.chunk(&mut r, &h, &mut out)? {
            break;
        }
    }
    if (r.position() as usize) < reply.len() {
        return Err(proto("bytes after the last chunk of the reply"));
    }
    let data = state.finish()?;
    Ok((out, data))
}

/// The `nbd_read` fuzz target's body: the first 12 bytes of `data` are
/// the request (offset, little-endian u64; length, u32 bounded by
/// [`MAX_READ`]), the rest the server's reply to it. A reply accepted must
/// return exactly the bytes asked for, with data spans inside the request,
/// in order and disjoint. Returns whether it was accepted.
pub fn fuzz_read_entry(data: &[u8]) -> bool {
    let (Some(head), Some(reply)) = (data.get(..12), data.get(12..)) else {
        return false;
    };
    let offset = u64::from_le_bytes(
        head.get(..8)
            .and_then(|b| b.try_into().ok())
            .unwrap_or_default(),
    );
    let len = u32::from_le_bytes(
        head.get(8..12)
            .and_then(|b| b.try_into().ok())
            .unwrap_or_default(),
    ) % (MAX_READ + 1);
    let Ok((bytes, spans)) = decode_read_reply(reply, offset, len) else {
        return false;
    };
    assert_eq!(bytes.len(), len as usize);
    let end = offset
        .checked_add(u64::from(len))
        .expect("an accepted read ends in range");
    let mut at = offset;
    for &(s, l) in &spans {
        assert!(s >= at && l > 0, "{spans:?}");
        at = s.checked_add(l).expect("an accepted span ends in range");
        assert!(at <= end, "{spans:?} past {end}");
    }
    true
}
