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
//! allocated, and every reply must answer a request in flight.

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
        loop {
            let (t, payload) = c.option_reply_raw(OPT_GO)?;
            match t {
                REP_INFO if u16_at(&payload, 0) == INFO_EXPORT => {
                    if payload.len() != 12 {
                        return Err(proto("an export info reply is not 12 bytes"));
                    }
                    c.export.size = u64_at(&payload, 2);
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

    /// Reads a payload of `len` bytes, growing the buffer as bytes arrive
    /// (a length field alone never allocates).
    fn payload(&mut self, len: u32) -> Result<Vec<u8>, WireError> {
        let mut p = Vec::new();
        (&mut self.stream)
            .take(u64::from(len))
            .read_to_end(&mut p)?;
        if p.len() != len as usize {
            return Err(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the server sent {} of {len} announced bytes", p.len()),
            )));
        }
        Ok(p)
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
    pub fn read_ranges(
        &mut self,
        base: u64,
        out: &mut [u8],
        ranges: &[(u64, u32)],
    ) -> Result<Vec<(u64, u64)>, WireError> {
        let mut pending = std::collections::HashMap::new();
        for &(offset, len) in ranges {
            if len > MAX_READ
                || offset < base
                || (offset - base) as usize + len as usize > out.len()
            {
                return Err(proto("a read outside its buffer"));
            }
            self.check_range(offset, u64::from(len))?;
            let cookie = self.request(CMD_READ, 0, offset, len)?;
            pending.insert(cookie, (offset, len));
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
                    let (offset, len) = pending
                        .remove(&cookie)
                        .ok_or_else(|| proto("a reply to no request"))?;
                    if err != 0 {
                        return Err(WireError::Refused(format!(
                            "read of {offset}+{len} failed (error {err})"
                        )));
                    }
                    let at = (offset - base) as usize;
                    let dst = out
                        .get_mut(at..at + len as usize)
                        .ok_or_else(|| proto("a read outside its buffer"))?;
                    self.stream.read_exact(dst)?;
                    data.push((offset, u64::from(len)));
                }
                STRUCTURED_REPLY_MAGIC => {
                    let mut h = [0u8; 16];
                    self.stream.read_exact(&mut h)?;
                    let flags = u16_at(&h, 0);
                    let kind = u16_at(&h, 2);
                    let cookie = u64_at(&h, 4);
                    let plen = u32_at(&h, 12);
                    let (offset, len) = *pending
                        .get(&cookie)
                        .ok_or_else(|| proto("a reply chunk for no request"))?;
                    let end = offset + u64::from(len);
                    match kind {
                        REPLY_OFFSET_DATA => {
                            if !(8..=len.saturating_add(8)).contains(&plen) {
                                return Err(proto(format!("a data chunk of {plen} bytes")));
                            }
                            let mut o = [0u8; 8];
                            self.stream.read_exact(&mut o)?;
                            let at = u64::from_be_bytes(o);
                            let n = u64::from(plen - 8);
                            if at < offset || at + n > end {
                                return Err(proto("a data chunk outside its request"));
                            }
                            let i = (at - base) as usize;
                            let dst = out
                                .get_mut(i..i + n as usize)
                                .ok_or_else(|| proto("a data chunk outside its buffer"))?;
                            self.stream.read_exact(dst)?;
                            data.push((at, n));
                        }
                        REPLY_OFFSET_HOLE => {
                            if plen != 12 {
                                return Err(proto("a hole chunk is not 12 bytes"));
                            }
                            let mut p = [0u8; 12];
                            self.stream.read_exact(&mut p)?;
                            let at = u64_at(&p, 0);
                            let n = u64::from(u32_at(&p, 8));
                            if at < offset || at + n > end {
                                return Err(proto("a hole chunk outside its request"));
                            }
                            let i = (at - base) as usize;
                            if let Some(dst) = out.get_mut(i..i + n as usize) {
                                dst.fill(0);
                            }
                        }
                        REPLY_NONE if plen == 0 => {}
                        k if k & REPLY_ERROR_BIT != 0 => {
                            let msg = self.error_payload(plen)?;
                            return Err(WireError::Refused(format!(
                                "read of {offset}+{len} failed: {msg}"
                            )));
                        }
                        k => return Err(proto(format!("unexpected reply chunk type {k}"))),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        pending.remove(&cookie);
                    }
                }
                m => return Err(proto(format!("bad reply magic {m:#x}"))),
            }
        }
        data.sort_unstable();
        Ok(data)
    }

    fn error_payload(&mut self, plen: u32) -> Result<String, WireError> {
        if !(6..=1 << 16).contains(&plen) {
            return Err(proto(format!("an error chunk of {plen} bytes")));
        }
        let p = self.payload(plen)?;
        let err = u32_at(&p, 0);
        let mlen = usize::from(u16_at(&p, 4));
        let msg = p.get(6..6 + mlen).unwrap_or_default();
        Ok(format!("error {err}: {}", String::from_utf8_lossy(msg)))
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
        loop {
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
}
