//! Block-status replies: the extents and flags a server reports for each
//! selected meta context.

use super::{WireError, proto, u32_at};

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
