//! The connected client: the fixed newstyle handshake with its option
//! negotiation, then pipelined reads and block-status requests.

use std::io::{Read, Write};

use super::block_status::{Descriptor, decode_block_status};
use super::read_reply::ReadReply;
use super::{
    CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_EXPORT, MAX_EXPORT_SIZE, MAX_INFO_REPLIES, MAX_PAYLOAD, MAX_READ, NBD_MAGIC, OPT_GO,
    OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK, REP_FLAG_ERROR, REP_INFO,
    REP_META_CONTEXT, REPLY_BLOCK_STATUS, REPLY_ERROR_BIT, REPLY_FLAG_DONE, REPLY_MAGIC,
    REPLY_NONE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, WireError,
    error_payload, payload, proto, u16_at, u32_at, u64_at,
};

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
