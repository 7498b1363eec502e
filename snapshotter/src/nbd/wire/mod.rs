//! The NBD client protocol (newstyle fixed handshake, structured replies,
//! block status), as a small module of its own so that a later NBD export
//! of a point can share its constants and codecs.
//!
//! Spec: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.
//! The client negotiates `NBD_OPT_STRUCTURED_REPLY`, selects the meta
//! contexts it wants (`base:allocation`, `qemu:dirty-bitmap:NAME`) with
//! `NBD_OPT_SET_META_CONTEXT`, enters transmission with `NBD_OPT_GO`, then
//! issues `NBD_CMD_READ` and `NBD_CMD_BLOCK_STATUS`.
//!
//! Nothing the server sends is trusted: every length is checked against
//! what was asked for and against [`MAX_PAYLOAD`] before anything is
//! allocated, every offset and length with checked arithmetic, and every
//! reply must answer a request in flight. A read's reply must cover the
//! request exactly, in non-overlapping chunks ([`ReadReply`]; the same
//! checks as a pure function: [`decode_read_reply`]); the number of reply
//! chunks, of meta contexts and of option replies is bounded.

#![allow(
    clippy::big_endian_bytes,
    reason = "NBD is big-endian on the wire, unlike coffre's own formats"
)]

use std::io::{Read, Write};

/// `NBDMAGIC`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the option magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no zero padding after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 2;

/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Replies with this bit are errors.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_REPLY_FLAG_DONE`.
pub const REPLY_FLAG_DONE: u16 = 1;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_BLOCK_STATUS: u16 = 5;
/// Error reply types have this bit.
pub const REPLY_ERROR_BIT: u16 = 1 << 15;

/// `base:allocation` status bit: a hole.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` status bit: reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` status bit: dirty.
pub const STATE_DIRTY: u32 = 1;

/// Largest payload accepted from a server (a read is at most this; the
/// export's own maximum is usually 32 MiB).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Largest read request sent.
pub const MAX_READ: u32 = 4 << 20;
/// Most replies accepted to `NBD_OPT_GO` (information replies, then the
/// acknowledgement).
pub const MAX_INFO_REPLIES: usize = 64;

/// The largest export size accepted: `i64::MAX`, the size limit of qemu
/// and of files, so that any offset plus any request length fits in a u64.
pub const MAX_EXPORT_SIZE: u64 = i64::MAX as u64;

/// What can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused something.
    #[error("{0}")]
    Refused(String),
}

fn proto(msg: impl Into<String>) -> WireError {
    WireError::Protocol(msg.into())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// Reads a payload of `len` bytes, growing the buffer as bytes arrive
/// (a length field alone never allocates).
fn payload(r: &mut impl Read, len: u32) -> Result<Vec<u8>, WireError> {
    let mut p = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut p)?;
    if p.len() != len as usize {
        return Err(WireError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the server sent {} of {len} announced bytes", p.len()),
        )));
    }
    Ok(p)
}

/// The message of an error chunk of `plen` bytes.
fn error_payload(r: &mut impl Read, plen: u32) -> Result<String, WireError> {
    if !(6..=1 << 16).contains(&plen) {
        return Err(proto(format!("an error chunk of {plen} bytes")));
    }
    let p = payload(r, plen)?;
    let err = u32_at(&p, 0);
    let mlen = usize::from(u16_at(&p, 4));
    let msg = p.get(6..6 + mlen).unwrap_or_default();
    Ok(format!("error {err}: {}", String::from_utf8_lossy(msg)))
}

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
    offset: u64,
    len: u32,
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
    fn buffer<'b>(&self, base: u64, out: &'b mut [u8]) -> Result<&'b mut [u8], WireError> {
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
    fn simple(mut self, r: &mut impl Read, dst: &mut [u8]) -> Result<Vec<(u64, u64)>, WireError> {
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

/// One extent of a block-status reply: `length` bytes with `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Bytes it covers.
    pub length: u32,
    /// Status flags of its context.
    pub flags: u32,
}

/// Decodes a block-status payload: a context id, then descriptors.
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<Descriptor>), WireError> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(proto(format!(
            "a block-status reply of {} bytes is not a context id and whole descriptors",
            payload.len()
        )));
    }
    let id = u32_at(payload, 0);
    let descs = payload
        .get(4..)
        .unwrap_or_default()
        .chunks_exact(8)
        .map(|c| Descriptor {
            length: u32_at(c, 0),
            flags: u32_at(c, 4),
        })
        .collect();
    Ok((id, descs))
}

/// The export a client connected to.
#[derive(Clone, Debug)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Context ids the server gave, by name.
    pub contexts: Vec<(u32, String)>,
}

/// A connected client, in transmission phase.
pub struct Client<S: Read + Write> {
    stream: S,
    export: Export,
    cookie: u64,
}

impl<S: Read + Write> Client<S> {
    /// Negotiates `export` over `stream` with structured replies and the
    /// `contexts` asked for (those the server lacks are left out of
    /// [`Export::contexts`]).
    pub fn handshake(mut stream: S, export: &str, contexts: &[String]) -> Result<Self, WireError> {
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello)?;
        if u64_at(&hello, 0) != NBD_MAGIC || u64_at(&hello, 8) != IHAVEOPT {
            return Err(proto(
                "the server is not a newstyle NBD server (bad greeting magic)",
            ));
        }
        let flags = u16_at(&hello, 16);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("the server does not speak fixed newstyle"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        stream.write_all(&client_flags.to_be_bytes())?;
        let mut c = Client {
            stream,
            export: Export {
                size: 0,
                flags: 0,
                contexts: Vec::new(),
            },
            cookie: 0,
        };
        c.option(OPT_STRUCTURED_REPLY, &[])?;
        match c.option_reply(OPT_STRUCTURED_REPLY)? {
            (REP_ACK, _) => {}
            (t, msg) => {
                return Err(WireError::Refused(format!(
                    "the server refuses structured replies (reply {t:#x}: {msg})"
                )));
            }
        }
        if !contexts.is_empty() {
            let mut data = Vec::new();
            data.extend_from_slice(&(export.len() as u32).to_be_bytes());
            data.extend_from_slice(export.as_bytes());
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                data.extend_from_slice(&(q.len() as u32).to_be_bytes());
                data.extend_from_slice(q.as_bytes());
            }
            c.option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (t, payload) = c.option_reply_raw(OPT_SET_META_CONTEXT)?;
                match t {
                    REP_META_CONTEXT if payload.len() >= 4 => {
                        let id = u32_at(&payload, 0);
                        let name = String::from_utf8_lossy(payload.get(4..).unwrap_or_default())
                            .into_owned();
                        // Exact names were asked for: each may come back
                        // once, and nothing else.
                        if !contexts.contains(&name)
                            || c.export.contexts.iter().any(|(_, n)| *n == name)
                        {
                            return Err(proto(format!(
                                "the server selected a meta context that was not asked for, or twice: {:?}",
                                name.chars().take(100).collect::<String>()
                            )));
                        }
                        c.export.contexts.push((id, name));
                    }
                    REP_ACK => break,
                    t if t & REP_FLAG_ERROR != 0 => break,
                    t => return Err(proto(format!("unexpected meta-context reply {t:#x}"))),
                }
            }
        }
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        c.option(OPT_GO, &data)?;
        let mut have_size = false;
        let mut replies = 0;
        loop {
            replies += 1;
            if replies > MAX_INFO_REPLIES {
                return Err(proto(format!(
                    "more than {MAX_INFO_REPLIES} replies to NBD_OPT_GO"
                )));
            }
            let (t, payload) = c.option_reply_raw(OPT_GO)?;
            match t {
                REP_INFO if u16_at(&payload, 0) == INFO_EXPORT => {
                    if payload.len() != 12 {
                        return Err(proto("an export info reply is not 12 bytes"));
                    }
                    let size = u64_at(&payload, 2);
                    // NBD sizes are off_t on every server (qemu caps them at
                    // INT64_MAX); a larger one could only make offsets wrap.
                    if size > MAX_EXPORT_SIZE {
                        return Err(proto(format!(
                            "the export claims {size} bytes, more than the {MAX_EXPORT_SIZE} an NBD export may have"
                        )));
                    }
                    c.export.size = size;
                    c.export.flags = u16_at(&payload, 10);
                    have_size = true;
                }
                REP_INFO => {}
                REP_ACK => break,
                t if t & REP_FLAG_ERROR != 0 => {
                    return Err(WireError::Refused(format!(
                        "the server has no export {export:?} ({})",
                        String::from_utf8_lossy(&payload)
                    )));
                }
                t => return Err(proto(format!("unexpected reply {t:#x} to NBD_OPT_GO"))),
            }
        }
        if !have_size {
            return Err(proto("the server never said the export's size"));
        }
        Ok(c)
    }

    /// The export.
    pub fn export(&self) -> &Export {
        &self.export
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Result<(), WireError> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.stream.write_all(&m)?;
        self.stream.flush()?;
        Ok(())
    }

    fn option_reply_raw(&mut self, opt: u32) -> Result<(u32, Vec<u8>), WireError> {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h)?;
        if u64_at(&h, 0) != REPLY_MAGIC {
            return Err(proto("bad option reply magic"));
        }
        if u32_at(&h, 8) != opt {
            return Err(proto(format!(
                "a reply to option {} where {opt} was asked",
                u32_at(&h, 8)
            )));
        }
        let len = u32_at(&h, 16);
        if len > 1 << 20 {
            return Err(proto(format!("an option reply of {len} bytes")));
        }
        let payload = self.payload(len)?;
        Ok((u32_at(&h, 12), payload))
    }

    fn payload(&mut self, len: u32) -> Result<Vec<u8>, WireError> {
        payload(&mut self.stream, len)
    }

    fn option_reply(&mut self, opt: u32) -> Result<(u32, String), WireError> {
        let (t, p) = self.option_reply_raw(opt)?;
        Ok((t, String::from_utf8_lossy(&p).into_owned()))
    }

    fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32) -> Result<u64, WireError> {
        self.cookie = self.cookie.wrapping_add(1);
        let mut m = [0u8; 28];
        m[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m[4..6].copy_from_slice(&flags.to_be_bytes());
        m[6..8].copy_from_slice(&cmd.to_be_bytes());
        m[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        m[16..24].copy_from_slice(&offset.to_be_bytes());
        m[24..28].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&m)?;
        Ok(self.cookie)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), WireError> {
        if offset.checked_add(len).is_none_or(|e| e > self.export.size) {
            return Err(proto(format!(
                "{offset}+{len} is past the export's {} bytes",
                self.export.size
            )));
        }
        Ok(())
    }

    /// Reads `ranges` (offset, length; each at most [`MAX_READ`]) into
    /// `out` at `out_at + (offset - base)`, pipelined. Returns the data
    /// ranges (holes the server reported are left zero and not listed).
    /// Every request must be answered in full: a reply whose chunks leave
    /// part of it uncovered, overlap, or fall outside it is an error,
    /// never zeros ([`ReadReply`]).
    pub fn read_ranges(
        &mut self,
        base: u64,
        out: &mut [u8],
        ranges: &[(u64, u32)],
    ) -> Result<Vec<(u64, u64)>, WireError> {
        let mut pending = std::collections::HashMap::new();
        for &(offset, len) in ranges {
            let fits = offset
                .checked_sub(base)
                .and_then(|rel| usize::try_from(rel).ok())
                .and_then(|rel| rel.checked_add(len as usize))
                .is_some_and(|e| e <= out.len());
            if len > MAX_READ || !fits {
                return Err(proto("a read outside its buffer"));
            }
            self.check_range(offset, u64::from(len))?;
            let cookie = self.request(CMD_READ, 0, offset, len)?;
            pending.insert(cookie, ReadReply::new(offset, len));
        }
        self.stream.flush()?;
        let mut data = Vec::new();
        while !pending.is_empty() {
            let mut magic = [0u8; 4];
            self.stream.read_exact(&mut magic)?;
            match u32::from_be_bytes(magic) {
                SIMPLE_REPLY_MAGIC => {
                    let mut h = [0u8; 12];
                    self.stream.read_exact(&mut h)?;
                    let err = u32_at(&h, 0);
                    let cookie = u64_at(&h, 4);
                    let reply = pending
                        .remove(&cookie)
                        .ok_or_else(|| proto("a reply to no request"))?;
                    if err != 0 {
                        return Err(WireError::Refused(format!(
                            "read of {}+{} failed (error {err})",
                            reply.offset, reply.len
                        )));
                    }
                    let dst = reply.buffer(base, out)?;
                    data.extend(reply.simple(&mut self.stream, dst)?);
                }
                STRUCTURED_REPLY_MAGIC => {
                    let mut h = [0u8; 16];
                    self.stream.read_exact(&mut h)?;
                    let cookie = u64_at(&h, 4);
                    let reply = pending
                        .get_mut(&cookie)
                        .ok_or_else(|| proto("a reply chunk for no request"))?;
                    let dst = reply.buffer(base, out)?;
                    if reply.chunk(&mut self.stream, &h, dst)?
                        && let Some(done) = pending.remove(&cookie)
                    {
                        data.extend(done.finish()?);
                    }
                }
                m => return Err(proto(format!("bad reply magic {m:#x}"))),
            }
        }
        data.sort_unstable();
        Ok(data)
    }

    fn error_payload(&mut self, plen: u32) -> Result<String, WireError> {
        error_payload(&mut self.stream, plen)
    }

    /// Block status of `offset..offset + len` for every selected context:
    /// extents per context id, covering a prefix of the range (the server
    /// may answer less than asked; ask again from where it stopped).
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, Vec<Descriptor>)>, WireError> {
        self.check_range(offset, u64::from(len))?;
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len)?;
        self.stream.flush()?;
        let mut out = Vec::new();
        let mut chunks = 0;
        loop {
            // One block-status chunk per selected context, and the end.
            chunks += 1;
            if chunks > self.export.contexts.len() + 1 {
                return Err(proto(format!(
                    "more block-status chunks for {offset}+{len} than the {} contexts selected",
                    self.export.contexts.len()
                )));
            }
            let mut h = [0u8; 20];
            self.stream.read_exact(&mut h)?;
            match u32_at(&h, 0) {
                STRUCTURED_REPLY_MAGIC => {}
                SIMPLE_REPLY_MAGIC => {
                    return Err(WireError::Refused(format!(
                        "the server cannot report block status (error {})",
                        u32_at(&h, 4)
                    )));
                }
                m => return Err(proto(format!("bad reply magic {m:#x}"))),
            }
            let flags = u16_at(&h, 4);
            let kind = u16_at(&h, 6);
            if u64_at(&h, 8) != cookie {
                return Err(proto("a block-status chunk for another request"));
            }
            let plen = u32_at(&h, 16);
            match kind {
                REPLY_BLOCK_STATUS => {
                    if plen > MAX_PAYLOAD {
                        return Err(proto(format!("a block-status chunk of {plen} bytes")));
                    }
                    let p = self.payload(plen)?;
                    out.push(decode_block_status(&p)?);
                }
                REPLY_NONE if plen == 0 => {}
                k if k & REPLY_ERROR_BIT != 0 => {
                    let msg = self.error_payload(plen)?;
                    return Err(WireError::Refused(format!(
                        "block status of {offset}+{len} failed: {msg}"
                    )));
                }
                k => return Err(proto(format!("unexpected reply chunk type {k}"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok(out);
            }
        }
    }

    /// Ends the session politely.
    pub fn disconnect(&mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0);
        let _ = self.stream.flush();
    }
}

/// A peer that answers with fixed bytes and swallows what it is sent
/// (the fuzz target's server).
pub struct Scripted(std::io::Cursor<Vec<u8>>);

impl Scripted {
    /// A server that will send `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Scripted(std::io::Cursor::new(bytes))
    }
}

impl Read for Scripted {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Scripted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The fuzz target's entry: `data` is everything a server sends. The
/// client negotiates, then asks for the block status and a read of the
/// first 128 KiB. Never panics, never allocates what a length field
/// claims before checking it. True when the handshake succeeded.
pub fn fuzz_entry(data: &[u8]) -> bool {
    let contexts = [
        "base:allocation".to_string(),
        "qemu:dirty-bitmap:b0".to_string(),
    ];
    let Ok(mut c) = Client::handshake(Scripted::new(data.to_vec()), "disk", &contexts) else {
        return false;
    };
    let len = c.export().size.min(128 << 10);
    if len > 0 {
        let _ = c.block_status(0, len as u32);
        let mut buf = vec![0u8; len as usize];
        let _ = c.read_ranges(0, &mut buf, &[(0, len as u32)]);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_status_payloads_decode_and_bad_ones_are_refused() {
        let mut p = 7u32.to_be_bytes().to_vec();
        for (l, f) in [(4096u32, 1u32), (8192, 0)] {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        let (id, d) = decode_block_status(&p).unwrap();
        assert_eq!(id, 7);
        assert_eq!(
            d,
            vec![
                Descriptor {
                    length: 4096,
                    flags: 1
                },
                Descriptor {
                    length: 8192,
                    flags: 0
                }
            ]
        );
        assert!(decode_block_status(&p[..7]).is_err());
        assert!(decode_block_status(&p[..4]).is_err());
    }

    #[test]
    fn a_server_that_lies_is_a_clean_error() {
        let mut s = NBD_MAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&3u16.to_be_bytes());
        // Structured replies acknowledged, then an export info that claims
        // a huge payload.
        s.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        s.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        s.extend_from_slice(&REP_ACK.to_be_bytes());
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        s.extend_from_slice(&OPT_GO.to_be_bytes());
        s.extend_from_slice(&REP_INFO.to_be_bytes());
        s.extend_from_slice(&u32::MAX.to_be_bytes());
        let err = Client::handshake(Scripted::new(s), "disk", &[])
            .err()
            .unwrap();
        assert!(err.to_string().contains("protocol error"), "{err}");
        // A truncated greeting.
        let short = Client::handshake(Scripted::new(vec![0x4e, 0x42]), "d", &[]);
        assert!(matches!(short, Err(WireError::Io(_))));
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut c = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        c.extend_from_slice(&flags.to_be_bytes());
        c.extend_from_slice(&kind.to_be_bytes());
        c.extend_from_slice(&cookie.to_be_bytes());
        c.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        c.extend_from_slice(payload);
        c
    }

    fn data(done: bool, at: u64, bytes: &[u8]) -> Vec<u8> {
        let mut p = at.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        chunk(u16::from(done), REPLY_OFFSET_DATA, 1, &p)
    }

    fn hole(done: bool, at: u64, n: u32) -> Vec<u8> {
        let mut p = at.to_be_bytes().to_vec();
        p.extend_from_slice(&n.to_be_bytes());
        chunk(u16::from(done), REPLY_OFFSET_HOLE, 1, &p)
    }

    fn err_of(r: Result<ReadBytes, WireError>) -> String {
        match r {
            Ok(_) => panic!("the reply must be refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_read_reply_must_cover_its_request_exactly() {
        // Data then a hole: the whole request, in order or not.
        let bytes: Vec<u8> = (0..100u8).collect();
        let whole = [hole(false, 1100, 28), data(true, 1000, &bytes)].concat();
        let (out, spans) = decode_read_reply(&whole, 1000, 128).unwrap();
        assert_eq!(&out[..100], &bytes[..]);
        assert!(out[100..].iter().all(|&b| b == 0));
        assert_eq!(spans, vec![(1000, 100)]);

        // Half of it, then done: an error naming the gap, never zeros.
        let e = err_of(decode_read_reply(&data(true, 1000, &[7; 64]), 1000, 128));
        assert!(
            e.contains("covers 64 of its 128 bytes") && e.contains("from 1064"),
            "{e}"
        );
        let none = chunk(REPLY_FLAG_DONE, REPLY_NONE, 1, &[]);
        let e = err_of(decode_read_reply(&none, 1000, 128));
        assert!(e.contains("covers 0 of its 128"), "{e}");
        // A gap in the middle.
        let gap = [data(false, 1000, &[1; 10]), hole(true, 1020, 108)].concat();
        let e = err_of(decode_read_reply(&gap, 1000, 128));
        assert!(e.contains("covers 118") && e.contains("from 1010"), "{e}");
    }

    #[test]
    fn read_chunks_that_overlap_stray_or_overflow_are_refused() {
        let overlap = [data(false, 1000, &[1; 64]), data(true, 1032, &[2; 96])].concat();
        assert!(err_of(decode_read_reply(&overlap, 1000, 128)).contains("overlap"));
        let same = [hole(false, 1000, 128), hole(true, 1000, 128)].concat();
        assert!(err_of(decode_read_reply(&same, 1000, 128)).contains("overlap"));
        for stray in [
            data(true, 999, &[0; 10]),
            data(true, 1100, &[0; 40]),
            hole(true, 1127, 2),
            hole(true, 0, 4000),
        ] {
            let e = err_of(decode_read_reply(&stray, 1000, 128));
            assert!(e.contains("outside the request"), "{e}");
        }
        // Offsets near the end of the 64-bit range: no wrap-around.
        let top = u64::MAX - 127;
        let e = err_of(decode_read_reply(&hole(true, u64::MAX - 3, 10), top, 128));
        assert!(e.contains("outside the request"), "{e}");
        let e = err_of(decode_read_reply(&hole(true, u64::MAX, u32::MAX), top, 128));
        assert!(e.contains("outside the request"), "{e}");
        assert!(decode_read_reply(&hole(true, top, 128), top, 128).is_ok());
        // Empty chunks, a data chunk longer than the request, bytes after
        // the end, another cookie, a NONE chunk that is not the last.
        assert!(err_of(decode_read_reply(&hole(true, 1000, 0), 1000, 128)).contains("empty"));
        assert!(
            err_of(decode_read_reply(&data(true, 1000, &[]), 1000, 128)).contains("data chunk")
        );
        let long = data(true, 1000, &[0; 129]);
        assert!(decode_read_reply(&long, 1000, 128).is_err());
        let trailing = [hole(true, 1000, 128), vec![0]].concat();
        assert!(err_of(decode_read_reply(&trailing, 1000, 128)).contains("after the last"));
        let mut other = hole(true, 1064, 64);
        other[8..16].copy_from_slice(&2u64.to_be_bytes());
        let two = [hole(false, 1000, 64), other].concat();
        assert!(err_of(decode_read_reply(&two, 1000, 128)).contains("another request"));
        let early_none = [chunk(0, REPLY_NONE, 1, &[]), hole(true, 1000, 128)].concat();
        assert!(decode_read_reply(&early_none, 1000, 128).is_err());
        // A truncated reply.
        let cut = hole(true, 1000, 128);
        assert!(matches!(
            decode_read_reply(&cut[..cut.len() - 1], 1000, 128),
            Err(WireError::Io(_))
        ));
    }

    #[test]
    fn a_read_takes_a_bounded_number_of_chunks() {
        let n = MAX_READ_CHUNKS as u32 + 10;
        let mut reply = Vec::new();
        for i in 0..n {
            reply.extend(data(i + 1 == n, 1000 + u64::from(i), &[9]));
        }
        let e = err_of(decode_read_reply(&reply, 1000, n));
        assert!(e.contains("more than 16384 chunks"), "{e}");
        // As many one-byte chunks as allowed is fine.
        let n = 4096u32;
        let mut reply = Vec::new();
        for i in 0..n {
            reply.extend(data(i + 1 == n, u64::from(i), &[9]));
        }
        let (out, spans) = decode_read_reply(&reply, 0, n).unwrap();
        assert!(out.iter().all(|&b| b == 9));
        assert_eq!(spans.len(), n as usize);
    }

    /// A server's handshake: structured replies, no meta context, an
    /// export of `size` bytes.
    fn handshake(size: u64) -> Vec<u8> {
        let mut s = NBD_MAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&3u16.to_be_bytes());
        let reply = |s: &mut Vec<u8>, opt: u32, t: u32, p: &[u8]| {
            s.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
            s.extend_from_slice(&opt.to_be_bytes());
            s.extend_from_slice(&t.to_be_bytes());
            s.extend_from_slice(&(p.len() as u32).to_be_bytes());
            s.extend_from_slice(p);
        };
        reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&0u16.to_be_bytes());
        reply(&mut s, OPT_GO, REP_INFO, &info);
        reply(&mut s, OPT_GO, REP_ACK, &[]);
        s
    }

    #[test]
    fn the_client_refuses_a_read_answered_in_part() {
        let mut s = handshake(1 << 20);
        s.extend(data(true, 0, &[5; 4096]));
        let mut c = Client::handshake(Scripted::new(s), "disk", &[]).unwrap();
        let mut buf = vec![0u8; 8192];
        let e = c.read_ranges(0, &mut buf, &[(0, 8192)]).unwrap_err();
        assert!(
            e.to_string().contains("covers 4096 of its 8192 bytes"),
            "{e}"
        );
        // Answered in full (two chunks), it reads.
        let mut s = handshake(1 << 20);
        s.extend(data(false, 0, &[5; 4096]));
        s.extend(hole(true, 4096, 4096));
        let mut c = Client::handshake(Scripted::new(s), "disk", &[]).unwrap();
        let spans = c.read_ranges(0, &mut buf, &[(0, 8192)]).unwrap();
        assert_eq!(spans, vec![(0, 4096)]);
        assert!(buf[..4096].iter().all(|&b| b == 5) && buf[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn an_export_larger_than_any_file_can_be_is_refused() {
        let err = Client::handshake(Scripted::new(handshake(u64::MAX - 4095)), "disk", &[])
            .err()
            .unwrap();
        assert!(err.to_string().contains("more than"), "{err}");
        let c = Client::handshake(Scripted::new(handshake(MAX_EXPORT_SIZE)), "disk", &[]).unwrap();
        assert_eq!(c.export.size, MAX_EXPORT_SIZE);
    }

    #[test]
    fn meta_contexts_not_asked_for_are_refused() {
        let mut s = NBD_MAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&3u16.to_be_bytes());
        let reply = |s: &mut Vec<u8>, opt: u32, t: u32, p: &[u8]| {
            s.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
            s.extend_from_slice(&opt.to_be_bytes());
            s.extend_from_slice(&t.to_be_bytes());
            s.extend_from_slice(&(p.len() as u32).to_be_bytes());
            s.extend_from_slice(p);
        };
        reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut ctx = 1u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        // The same context twice.
        reply(&mut s, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
        reply(&mut s, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
        let err = Client::handshake(Scripted::new(s), "disk", &["base:allocation".into()])
            .err()
            .unwrap();
        assert!(err.to_string().contains("meta context"), "{err}");
    }
}
