//! The server side of the protocol: one connection, from the fixed
//! newstyle handshake to `NBD_CMD_DISC`, serving read-only exports.
//!
//! Options: `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (the one
//! context is `base:allocation`); anything else is `NBD_REP_ERR_UNSUP`.
//! Commands: `READ` (a structured `OFFSET_DATA` chunk, or a simple reply
//! when structured replies were not negotiated), `BLOCK_STATUS`, `FLUSH`
//! and `CACHE` (nothing to do), `DISC`; the writing commands are refused
//! with `EPERM` (a write's payload is read and dropped). An export is
//! read-only and every connection sees the same bytes, so it advertises
//! `NBD_FLAG_CAN_MULTI_CONN`.
//!
//! Nothing the client sends is trusted: option lengths are bounded before
//! anything is read into memory, every name and query is checked against
//! the option's own length, every offset and length with checked
//! arithmetic against the export's size, and a request past the end or
//! larger than [`MAX_REQUEST`] is `EINVAL`. Reads run on a few worker
//! threads per connection (replies may come out of order, as the
//! protocol allows), so one client's queue of requests is served at once.
//! A read's bytes go out as the export hands them over ([`ReadParts`]:
//! slices of its own buffers and runs of zeros, no copy), each reply in
//! vectored writes (one, unless the socket takes less or the reply has
//! more than `IOV_MAX` slices).

use std::io::{Read, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

use super::block_status::Descriptor;
use super::{
    CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_EXPORT, NBD_MAGIC, OPT_ABORT, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_FLAG_ERROR, REP_INFO, REP_META_CONTEXT, REPLY_BLOCK_STATUS, REPLY_ERROR_BIT,
    REPLY_FLAG_DONE, REPLY_MAGIC, REPLY_OFFSET_DATA, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, WireError, proto, u16_at, u32_at, u64_at,
};

/// `NBD_OPT_EXPORT_NAME`.
const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_LIST`.
const OPT_LIST: u32 = 3;
/// `NBD_OPT_INFO`.
const OPT_INFO: u32 = 6;
/// `NBD_OPT_LIST_META_CONTEXT`.
const OPT_LIST_META_CONTEXT: u32 = 9;

/// `NBD_REP_SERVER`.
const REP_SERVER: u32 = 2;
/// `NBD_REP_ERR_UNSUP`.
const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_INVALID`.
const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_UNKNOWN`.
const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_TOO_BIG`.
const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// `NBD_INFO_NAME`.
const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags: has flags, read-only, flush, multi-conn, cache.
pub const EXPORT_FLAGS: u16 = 1 | (1 << 1) | (1 << 2) | (1 << 8) | (1 << 10);

/// `NBD_CMD_WRITE`.
const CMD_WRITE: u16 = 1;
/// `NBD_CMD_FLUSH`.
const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_FLAG_REQ_ONE`.
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_REPLY_TYPE_ERROR`.
const REPLY_ERROR: u16 = REPLY_ERROR_BIT | 1;

/// `EPERM`, `EIO`, `EINVAL`, as the protocol numbers them.
pub const EPERM: u32 = 1;
/// An I/O error: the bytes could not be read (a damaged chunk).
pub const EIO: u32 = 5;
/// A request the server does not accept.
pub const EINVAL: u32 = 22;

/// Largest option payload read from a client (a meta-context query list
/// is the longest a real client sends: a few hundred bytes).
const MAX_OPTION: u32 = 64 << 10;
/// Most options one handshake may send (a client that loops is cut off).
const MAX_OPTIONS: usize = 1024;
/// Largest read served in one request (the protocol's usual maximum);
/// [`PREFERRED_MAX`] is what the export advertises.
pub const MAX_REQUEST: u32 = 32 << 20;
/// The maximum block size advertised in `NBD_INFO_BLOCK_SIZE`.
const PREFERRED_MAX: u32 = 4 << 20;
/// Requests one connection may queue beyond those its workers serve.
const QUEUE: usize = 32;
/// The id of `base:allocation` on every export.
const ALLOCATION_ID: u32 = 1;

/// What an export serves: its size, its bytes, and which of them are
/// holes. Shared by every connection (`Sync`).
pub trait ExportData: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (inside the export). An error
    /// is an `EIO` reply (the message is the implementation's to log).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// The `len` bytes at `offset` (inside the export) as parts the reply
    /// sends as they are: an export that keeps its bytes in buffers of its
    /// own (a cache of decoded blocks) hands out slices of them, with no
    /// copy. By default they are [`ExportData::read`] into one buffer.
    fn read_parts(&self, offset: u64, len: usize) -> Result<ReadParts, String> {
        let mut buf = vec![0u8; len];
        self.read(offset, &mut buf)?;
        let mut parts = ReadParts::default();
        parts.push_owned(buf);
        Ok(parts)
    }
    /// `base:allocation` of `offset..offset + len` (inside the export):
    /// descriptors covering a prefix of it, at least one.
    fn allocation(&self, offset: u64, len: u32) -> Result<Vec<Descriptor>, String>;
}

/// Zeros a reply points at for the zero runs of a read.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The bytes of one read, in order, as the reply sends them.
#[derive(Default)]
pub struct ReadParts {
    parts: Vec<Part>,
    len: usize,
}

enum Part {
    /// `range` of a buffer the export shares.
    Shared(Arc<Vec<u8>>, Range<usize>),
    /// This many zeros.
    Zeros(usize),
    /// A buffer of its own.
    Owned(Vec<u8>),
}

impl ReadParts {
    /// Appends `range` of `bytes`; an error when the range is not inside
    /// them. Less than half of them is copied rather than shared: a read
    /// keeps at most twice its length alive until its reply is sent (a
    /// small read at the edge of a 4 MiB block does not pin the block).
    pub fn push_shared(&mut self, bytes: Arc<Vec<u8>>, range: Range<usize>) -> Result<(), String> {
        if range.start > range.end || range.end > bytes.len() {
            return Err(format!(
                "a part {}..{} of a buffer of {} bytes",
                range.start,
                range.end,
                bytes.len()
            ));
        }
        if range.len() * 2 < bytes.len() {
            self.push_owned(bytes[range].to_vec());
            return Ok(());
        }
        self.len = self.len.saturating_add(range.len());
        self.parts.push(Part::Shared(bytes, range));
        Ok(())
    }

    /// Appends `n` zeros.
    pub fn push_zeros(&mut self, n: usize) {
        self.len = self.len.saturating_add(n);
        match self.parts.last_mut() {
            Some(Part::Zeros(z)) => *z += n,
            _ => self.parts.push(Part::Zeros(n)),
        }
    }

    /// Appends a buffer.
    pub fn push_owned(&mut self, bytes: Vec<u8>) {
        self.len = self.len.saturating_add(bytes.len());
        self.parts.push(Part::Owned(bytes));
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The parts as slices, in order (zero runs as slices of [`ZEROS`]).
    pub fn slices(&self) -> Vec<&[u8]> {
        let mut out = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            match p {
                Part::Shared(bytes, range) => out.push(&bytes[range.clone()]),
                Part::Owned(bytes) => out.push(&bytes[..]),
                Part::Zeros(n) => {
                    let mut left = *n;
                    while left > 0 {
                        let k = left.min(ZEROS.len());
                        out.push(&ZEROS[..k]);
                        left -= k;
                    }
                }
            }
        }
        out
    }
}

/// One export a server offers.
pub struct Served<'a> {
    /// Its name (the client asks for it).
    pub name: String,
    /// What `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST` say of it.
    pub description: String,
    /// Its bytes.
    pub data: &'a dyn ExportData,
}

/// Counters of one server, shared by its connections, and the bytes its
/// reads may hold at once.
#[derive(Debug)]
pub struct Activity {
    /// Requests answered (any command).
    pub requests: AtomicU64,
    /// Read requests answered with an error.
    pub failed_reads: AtomicU64,
    /// Bytes sent in read replies.
    pub bytes_read: AtomicU64,
    /// Bytes of reads all connections hold at once, at most
    /// [`READ_BUDGET`]: a read waits for room before it reads (a read's
    /// parts pin at most twice its length: see [`ReadParts::push_shared`]).
    held: Mutex<u64>,
    freed: std::sync::Condvar,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            requests: AtomicU64::new(0),
            failed_reads: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            held: Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }
}

impl Activity {
    /// Waits until `n` more bytes of reads fit in the budget.
    fn hold(&self, n: u64) -> Held<'_> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while *held > 0 && *held + n > READ_BUDGET {
            held = self.freed.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        *held += n;
        Held { activity: self, n }
    }
}

/// Bytes of reads held; given back when dropped.
struct Held<'a> {
    activity: &'a Activity,
    n: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = self.activity.held.lock().unwrap_or_else(|p| p.into_inner());
        *held -= self.n;
        drop(held);
        self.activity.freed.notify_all();
    }
}

/// Bytes of reads a server holds at once, whatever its clients ask (the
/// buffers their parts pin: up to twice as much).
pub const READ_BUDGET: u64 = 128 << 20;

/// Serves one connection whose bytes arrive on `input` and leave on
/// `output` (two handles of one socket), with `workers` threads for its
/// reads; `handshake_done` runs when it enters transmission (the caller
/// lifts the handshake's time limit). Returns when the client
/// disconnects; an error when it broke the protocol or the connection
/// failed.
pub fn serve_connection<R: Read + Send, W: Write + Send>(
    mut input: R,
    mut output: W,
    exports: &[Served<'_>],
    workers: usize,
    activity: &Activity,
    handshake_done: impl FnOnce(),
) -> Result<(), WireError> {
    let Some(session) = handshake(&mut input, &mut output, exports)? else {
        return Ok(());
    };
    handshake_done();
    transmission(input, output, session, workers.max(1), activity)
}

/// What the handshake agreed.
struct Session<'e, 'a> {
    export: &'e Served<'a>,
    structured: bool,
    allocation: bool,
}

/// The option phase. `None` when the client aborted or left.
fn handshake<'e, 'a>(
    input: &mut impl Read,
    output: &mut impl Write,
    exports: &'e [Served<'a>],
) -> Result<Option<Session<'e, 'a>>, WireError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    output.write_all(&hello)?;
    output.flush()?;
    let mut cf = [0u8; 4];
    input.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(proto(format!(
            "the client sent unknown handshake flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    let mut structured = false;
    // The export `base:allocation` was selected for.
    let mut allocation: Option<String> = None;
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        match input.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        if u64_at(&h, 0) != IHAVEOPT {
            return Err(proto("an option without the IHAVEOPT magic"));
        }
        let opt = u32_at(&h, 8);
        let len = u32_at(&h, 12);
        if len > MAX_OPTION {
            // Too big to keep: read past it, and say so.
            std::io::copy(&mut input.take(u64::from(len)), &mut std::io::sink())?;
            reply(output, opt, REP_ERR_TOO_BIG, b"option too long")?;
            continue;
        }
        let data = super::payload(input, len)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // No error reply exists for this option: an unknown name
                // ends the connection.
                let Some(export) = find(exports, &name) else {
                    return Ok(None);
                };
                let mut m = Vec::with_capacity(134);
                m.extend_from_slice(&export.data.size().to_be_bytes());
                m.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                output.write_all(&m)?;
                output.flush()?;
                return Ok(Some(Session {
                    export,
                    structured,
                    allocation: allocation.as_deref() == Some(name.as_ref()),
                }));
            }
            OPT_ABORT => {
                reply(output, opt, REP_ACK, &[])?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(output, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in exports {
                    let mut p = Vec::with_capacity(4 + e.name.len());
                    p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    p.extend_from_slice(e.name.as_bytes());
                    reply(output, opt, REP_SERVER, &p)?;
                }
                reply(output, opt, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(output, opt, REP_ERR_INVALID, b"the option takes no data")?;
                } else {
                    structured = true;
                    reply(output, opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                // A SET replaces the selection, even when it fails.
                if opt == OPT_SET_META_CONTEXT {
                    allocation = None;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    reply(
                        output,
                        opt,
                        REP_ERR_INVALID,
                        b"a malformed meta-context request",
                    )?;
                    continue;
                };
                if opt == OPT_SET_META_CONTEXT && !structured {
                    reply(
                        output,
                        opt,
                        REP_ERR_INVALID,
                        b"meta contexts need structured replies first",
                    )?;
                    continue;
                }
                if find(exports, &name).is_none() {
                    reply(output, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let listed = queries.iter().any(|q| {
                    q == super::super::BASE_ALLOCATION
                        || (opt == OPT_LIST_META_CONTEXT && (q.is_empty() || q == "base:"))
                }) || (opt == OPT_LIST_META_CONTEXT && queries.is_empty());
                if opt == OPT_SET_META_CONTEXT {
                    allocation = listed.then(|| name.clone());
                }
                if listed {
                    let ctx = super::super::BASE_ALLOCATION.as_bytes();
                    let mut p = Vec::with_capacity(4 + ctx.len());
                    p.extend_from_slice(&ALLOCATION_ID.to_be_bytes());
                    p.extend_from_slice(ctx);
                    reply(output, opt, REP_META_CONTEXT, &p)?;
                }
                reply(output, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, wanted)) = parse_info(&data) else {
                    reply(output, opt, REP_ERR_INVALID, b"a malformed info request")?;
                    continue;
                };
                let Some(export) = find(exports, &name) else {
                    reply(output, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.data.size().to_be_bytes());
                info.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
                reply(output, opt, REP_INFO, &info)?;
                let mut sizes = Vec::with_capacity(14);
                sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                sizes.extend_from_slice(&1u32.to_be_bytes());
                sizes.extend_from_slice(&4096u32.to_be_bytes());
                sizes.extend_from_slice(&PREFERRED_MAX.to_be_bytes());
                reply(output, opt, REP_INFO, &sizes)?;
                let mut wanted = wanted;
                wanted.sort_unstable();
                wanted.dedup();
                for w in wanted {
                    let (kind, text) = match w {
                        INFO_NAME => (INFO_NAME, &export.name),
                        INFO_DESCRIPTION => (INFO_DESCRIPTION, &export.description),
                        _ => continue,
                    };
                    let mut p = kind.to_be_bytes().to_vec();
                    p.extend_from_slice(text.as_bytes());
                    reply(output, opt, REP_INFO, &p)?;
                }
                reply(output, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(Session {
                        export,
                        structured,
                        allocation: allocation.as_deref() == Some(name.as_str()),
                    }));
                }
            }
            _ => reply(output, opt, REP_ERR_UNSUP, b"unsupported option")?,
        }
    }
    Err(proto(format!(
        "more than {MAX_OPTIONS} options in one handshake"
    )))
}

/// The export called `name`; the empty name is the only export, when
/// there is one.
fn find<'e, 'a>(exports: &'e [Served<'a>], name: &str) -> Option<&'e Served<'a>> {
    let only = match exports {
        [only] if name.is_empty() => Some(only),
        _ => None,
    };
    exports.iter().find(|e| e.name == name).or(only)
}

/// Sends one option reply.
fn reply(output: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> Result<(), WireError> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    output.write_all(&m)?;
    output.flush()?;
    Ok(())
}

/// A length-prefixed string at `*at` of `data`, moving `*at` past it.
fn string_at(data: &[u8], at: &mut usize) -> Option<String> {
    let len = usize::try_from(u32::from_be_bytes(data.get(*at..*at + 4)?.try_into().ok()?)).ok()?;
    let start = *at + 4;
    let bytes = data.get(start..start.checked_add(len)?)?;
    *at = start + len;
    String::from_utf8(bytes.to_vec()).ok()
}

/// A meta-context request: the export's name and the queries. `None`
/// when a length runs past the option or bytes are left over.
fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut at = 0;
    let name = string_at(data, &mut at)?;
    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?);
    at += 4;
    // Each query takes at least its 4-byte length.
    if u64::from(n) * 4 > (data.len() - at) as u64 {
        return None;
    }
    let queries = (0..n)
        .map(|_| string_at(data, &mut at))
        .collect::<Option<Vec<_>>>()?;
    (at == data.len()).then_some((name, queries))
}

/// An `NBD_OPT_INFO`/`GO` request: the export's name and the information
/// asked for.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut at = 0;
    let name = string_at(data, &mut at)?;
    let n = usize::from(u16_at(data.get(at..at + 2)?, 0));
    at += 2;
    let list = data.get(at..at.checked_add(n * 2)?)?;
    (at + n * 2 == data.len()).then(|| (name, list.chunks_exact(2).map(|c| u16_at(c, 0)).collect()))
}

/// One request of the transmission phase.
#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// The transmission phase: requests are read here and answered by
/// `workers` threads; returns at `NBD_CMD_DISC` or when the client goes.
fn transmission<R: Read, W: Write + Send>(
    mut input: R,
    output: W,
    session: Session<'_, '_>,
    workers: usize,
    activity: &Activity,
) -> Result<(), WireError> {
    let output = Mutex::new(output);
    let broken = AtomicBool::new(false);
    // Set when the client is gone (not at NBD_CMD_DISC, whose requests in
    // flight are still answered): queued requests are dropped unread.
    let closing = AtomicBool::new(false);
    let size = session.export.data.size();
    let (tx, rx) = sync_channel::<Request>(QUEUE);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (rx, output, session, broken, closing) =
                (&rx, &output, &session, &broken, &closing);
            scope.spawn(move || {
                loop {
                    let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(req) = next else { break };
                    if closing.load(Ordering::Relaxed) || broken.load(Ordering::Relaxed) {
                        continue;
                    }
                    if answer(&req, session, output, activity).is_err() {
                        broken.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
        let result = loop {
            if broken.load(Ordering::Relaxed) {
                break Err(proto("the connection broke while replying"));
            }
            let mut h = [0u8; 28];
            match input.read_exact(&mut h) {
                Ok(()) => {}
                // A client that leaves without NBD_CMD_DISC.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(false),
                Err(e) => break Err(e.into()),
            }
            if u32_at(&h, 0) != REQUEST_MAGIC {
                break Err(proto("a request without the request magic"));
            }
            let req = Request {
                flags: u16_at(&h, 4),
                kind: u16_at(&h, 6),
                cookie: u64_at(&h, 8),
                offset: u64_at(&h, 16),
                len: u32_at(&h, 24),
            };
            match req.kind {
                CMD_DISC => break Ok(true),
                CMD_WRITE => {
                    // Its payload follows: read past it (a huge one ends
                    // the connection, since nothing else can be trusted).
                    if req.len > MAX_REQUEST {
                        break Err(proto(format!("a write of {} bytes", req.len)));
                    }
                    if let Err(e) = std::io::copy(
                        &mut (&mut input).take(u64::from(req.len)),
                        &mut std::io::sink(),
                    ) {
                        break Err(e.into());
                    }
                    if let Err(e) = simple(&output, req.cookie, EPERM, activity) {
                        break Err(e);
                    }
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    if let Err(e) = simple(&output, req.cookie, EPERM, activity) {
                        break Err(e);
                    }
                }
                CMD_FLUSH | CMD_CACHE => {
                    let err = if in_bounds(&req, size) { 0 } else { EINVAL };
                    if let Err(e) = simple(&output, req.cookie, err, activity) {
                        break Err(e);
                    }
                }
                CMD_READ | CMD_BLOCK_STATUS => {
                    if tx.send(req).is_err() {
                        break Err(proto("the read workers stopped"));
                    }
                }
                _ => {
                    if let Err(e) = simple(&output, req.cookie, EINVAL, activity) {
                        break Err(e);
                    }
                }
            }
        };
        // At NBD_CMD_DISC the workers answer what is queued, then stop;
        // a client that is gone gets nothing more.
        if !matches!(result, Ok(true)) {
            closing.store(true, Ordering::Relaxed);
        }
        drop(tx);
        result.map(|_| ())
    })
}

/// True when the request lies inside an export of `size` bytes.
fn in_bounds(req: &Request, size: u64) -> bool {
    req.offset
        .checked_add(u64::from(req.len))
        .is_some_and(|e| e <= size)
}

/// Answers one read or block-status request.
fn answer<W: Write>(
    req: &Request,
    session: &Session<'_, '_>,
    output: &Mutex<W>,
    activity: &Activity,
) -> Result<(), WireError> {
    let data = session.export.data;
    if req.kind == CMD_BLOCK_STATUS {
        // A status request may span the whole export: it reads no data.
        if !session.allocation
            || !session.structured
            || !in_bounds(req, data.size())
            || req.len == 0
        {
            return error(
                output,
                req,
                session.structured,
                EINVAL,
                "invalid block status request",
                activity,
            );
        }
        return match data.allocation(req.offset, req.len) {
            Ok(mut extents) => {
                extents.retain(|d| d.length > 0);
                if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    extents.truncate(1);
                }
                if extents.is_empty() {
                    return error(
                        output,
                        req,
                        true,
                        EIO,
                        "no allocation information",
                        activity,
                    );
                }
                let mut p = Vec::with_capacity(4 + 8 * extents.len());
                p.extend_from_slice(&ALLOCATION_ID.to_be_bytes());
                for d in &extents {
                    p.extend_from_slice(&d.length.to_be_bytes());
                    p.extend_from_slice(&d.flags.to_be_bytes());
                }
                structured(output, req.cookie, REPLY_BLOCK_STATUS, &[&p], activity)
            }
            Err(_) => error(
                output,
                req,
                true,
                EIO,
                "the block map cannot be read",
                activity,
            ),
        };
    }
    if !in_bounds(req, data.size()) || req.len > MAX_REQUEST {
        return error(
            output,
            req,
            session.structured,
            EINVAL,
            "a read outside the export or too large",
            activity,
        );
    }
    let _held = activity.hold(u64::from(req.len));
    let read = data
        .read_parts(req.offset, req.len as usize)
        .and_then(|parts| {
            if parts.len() == req.len as usize {
                Ok(parts)
            } else {
                Err(format!("{} bytes read for {}", parts.len(), req.len))
            }
        });
    let parts = match read {
        Ok(parts) => parts,
        Err(msg) => {
            activity.failed_reads.fetch_add(1, Ordering::Relaxed);
            // The details (paths, ids) are for the export's log, not for
            // whoever can reach the listener.
            let _ = msg;
            return error(
                output,
                req,
                session.structured,
                EIO,
                "the data cannot be read intact (the export's log names the point and block)",
                activity,
            );
        }
    };
    let slices = parts.slices();
    activity
        .bytes_read
        .fetch_add(u64::from(req.len), Ordering::Relaxed);
    if session.structured {
        if req.len == 0 {
            return structured(output, req.cookie, super::REPLY_NONE, &[], activity);
        }
        let offset = req.offset.to_be_bytes();
        let mut all: Vec<&[u8]> = Vec::with_capacity(slices.len() + 1);
        all.push(&offset);
        all.extend_from_slice(&slices);
        structured(output, req.cookie, REPLY_OFFSET_DATA, &all, activity)
    } else {
        let mut m = Vec::with_capacity(16);
        m.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&req.cookie.to_be_bytes());
        let mut all: Vec<&[u8]> = Vec::with_capacity(slices.len() + 1);
        all.push(&m);
        all.extend_from_slice(&slices);
        send(output, &all, activity)
    }
}

/// An error reply: structured when negotiated, else simple.
fn error<W: Write>(
    output: &Mutex<W>,
    req: &Request,
    structured_replies: bool,
    errno: u32,
    msg: &str,
    activity: &Activity,
) -> Result<(), WireError> {
    if !structured_replies {
        return simple(output, req.cookie, errno, activity);
    }
    // The message is for a human; the protocol bounds it to a u16 length
    // and this keeps it short.
    let msg: String = msg.chars().take(1000).collect();
    let mut p = Vec::with_capacity(6 + msg.len());
    p.extend_from_slice(&errno.to_be_bytes());
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    structured(output, req.cookie, REPLY_ERROR, &[&p], activity)
}

/// A simple reply without data.
fn simple<W: Write>(
    output: &Mutex<W>,
    cookie: u64,
    errno: u32,
    activity: &Activity,
) -> Result<(), WireError> {
    let mut m = Vec::with_capacity(16);
    m.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&errno.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    send(output, &[&m], activity)
}

/// One structured chunk, the last of its reply.
fn structured<W: Write>(
    output: &Mutex<W>,
    cookie: u64,
    kind: u16,
    parts: &[&[u8]],
    activity: &Activity,
) -> Result<(), WireError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).map_err(|_| proto("a reply too long for the protocol"))?;
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
    all.push(&h);
    all.extend_from_slice(parts);
    send(output, &all, activity)
}

/// Writes one whole reply under the connection's lock, its parts
/// gathered into as few writes as the stream takes (one, mostly).
fn send<W: Write>(
    output: &Mutex<W>,
    parts: &[&[u8]],
    activity: &Activity,
) -> Result<(), WireError> {
    let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
    let mut slices: Vec<std::io::IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| std::io::IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        // (The standard library hands a socket at most IOV_MAX slices a
        // write; the rest go in the next turns.)
        let offered: usize = rest.iter().map(|s| s.len()).sum();
        match out.write_vectored(rest) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            Ok(written) if written > offered => {
                return Err(proto("the stream wrote more than it was given"));
            }
            Ok(written) => std::io::IoSlice::advance_slices(&mut rest, written),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.flush()?;
    activity.requests.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The `nbd_server` fuzz target's body: `data` is everything a client
/// sends to a server of one small export. Never panics; true when the
/// client reached the transmission phase.
pub fn fuzz_server_entry(data: &[u8]) -> bool {
    struct Bytes(Vec<u8>);
    impl ExportData for Bytes {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            let at = usize::try_from(offset).map_err(|e| e.to_string())?;
            let src = self
                .0
                .get(at..at + buf.len())
                .ok_or_else(|| "past the end".to_string())?;
            buf.copy_from_slice(src);
            Ok(())
        }
        // In parts as a cache hands them out: 4 KiB slices of shared
        // buffers, the zeros of its second half as zero runs.
        fn read_parts(&self, offset: u64, len: usize) -> Result<ReadParts, String> {
            let mut parts = ReadParts::default();
            let mut at = usize::try_from(offset).map_err(|e| e.to_string())?;
            let end = at.checked_add(len).ok_or("past the end")?;
            while at < end {
                let next = (at / 4096 + 1) * 4096;
                let next = next.min(end);
                if at >= self.0.len() / 2 {
                    parts.push_zeros(next - at);
                } else {
                    let base = at / 4096 * 4096;
                    let page = self.0.get(base..base + 4096).ok_or("past the end")?;
                    parts.push_shared(Arc::new(page.to_vec()), at - base..next - base)?;
                }
                at = next;
            }
            Ok(parts)
        }
        fn allocation(&self, _offset: u64, len: u32) -> Result<Vec<Descriptor>, String> {
            Ok(vec![Descriptor {
                length: len,
                flags: 0,
            }])
        }
    }
    let mut image = Bytes((0..=255u8).cycle().take(64 << 10).collect());
    image.0[32 << 10..].fill(0);
    let exports = [Served {
        name: "disk".into(),
        description: "fuzz".into(),
        data: &image,
    }];
    let mut input = std::io::Cursor::new(data);
    let mut sink = std::io::sink();
    match handshake(&mut input, &mut sink, &exports) {
        Ok(Some(session)) => {
            let _ = transmission(input, sink, session, 2, &Activity::default());
            true
        }
        _ => false,
    }
}
