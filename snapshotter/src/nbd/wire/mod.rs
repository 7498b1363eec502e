//! The NBD protocol (newstyle fixed handshake, structured replies, block
//! status): the client coffre reads exports with ([`Client`]) and the
//! server side of `coffre export` ([`serve_connection`]), sharing one set
//! of constants and codecs.
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

mod block_status;
mod client;
mod read_reply;
mod scripted;
mod server;
#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod tests;

use std::io::Read;

pub use block_status::{Descriptor, decode_block_status};
pub use client::{Client, Export};
pub use read_reply::{MAX_READ_CHUNKS, ReadBytes, ReadReply, decode_read_reply, fuzz_read_entry};
pub use scripted::{Scripted, fuzz_entry};
pub use server::{
    Activity, EINVAL, EIO, EPERM, EXPORT_FLAGS, ExportData, MAX_REQUEST, ReadParts, Served,
    fuzz_server_entry, serve_connection,
};

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
