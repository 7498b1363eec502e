//! The transfer's windows: which blocks of each window are read
//! ([`plan`]), and asking for them ahead ([`request`]) when a clone read
//! through a changed-block hint is read by a
//! `coffre_snapshotter::fetch::Fetcher` while the pool hashes and
//! compresses the window before.
//!
//! A hinted clone is read with `O_DIRECT`, in large requests, into a
//! buffer of the window's own: the calling thread waits for the device
//! and faults the buffer in. Done on the transfer's own thread that was
//! 40–53 ms of a 0.3 s reflink day two, with both workers idle.

use std::ops::Range;

use coffre_snapshotter::capture::{wanted_ranges, window_span};
use coffre_snapshotter::cbt::Hint;
use coffre_snapshotter::fetch::Fetcher;
use coffre_vault_store::format::blockmap::Entry;
use coffre_vault_store::vault::WriteSession;

use crate::error::Result;
use crate::reader::BlockMapReader;

/// One window of the transfer, planned.
pub(crate) struct Plan {
    /// Its first block.
    pub first: u64,
    /// Its blocks.
    pub n: usize,
    /// Its first byte.
    pub offset: u64,
    /// Its bytes.
    pub len: usize,
    /// The previous point's entries for its blocks.
    pub prev: Vec<Entry>,
    /// With a hint: which blocks the hint calls dirty.
    pub dirty: Option<Vec<bool>>,
    /// With a hint: the byte ranges to read (relative to `offset`).
    pub wanted: Option<Vec<Range<usize>>>,
}

/// What [`plan`] needs to know of the transfer.
pub(crate) struct Shape<'h> {
    /// The image's blocks.
    pub blocks: u64,
    /// The image's size.
    pub size: u64,
    /// Block size.
    pub block_size: usize,
    /// Blocks of an unhinted window.
    pub window_blocks: usize,
    /// The checked changed-block hint, if any.
    pub hint: Option<&'h Hint>,
}

/// Plans the window that starts at block `first`: a hint's windows span
/// until they hold a window's worth of dirty blocks, and only its dirty
/// blocks are read, with the clean ones whose parent chunk is damaged
/// (reading heals it).
pub(crate) fn plan(
    shape: &Shape<'_>,
    first: u64,
    prev_map: Option<&mut BlockMapReader<'_>>,
    session: &WriteSession<'_>,
) -> Result<Plan> {
    let bs = shape.block_size;
    let n = window_span(
        shape.hint.map(|h| (h, &[][..])),
        bs as u64,
        first,
        shape.blocks,
        shape.window_blocks,
    );
    let offset = first * bs as u64;
    let len = (shape.size - offset).min((n * bs) as u64) as usize;
    let prev: Vec<Entry> = match prev_map {
        Some(m) => m.entries(first, n)?,
        None => vec![None; n],
    };
    let dirty = shape.hint.map(|h| h.dirty_mask(bs as u64, first, n));
    let wanted = dirty.as_ref().map(|d| {
        wanted_ranges(n, bs, len, &|i| {
            d.get(i).copied().unwrap_or(true)
                || prev
                    .get(i)
                    .copied()
                    .flatten()
                    .is_some_and(|id| session.is_damaged(&id))
        })
    });
    Ok(Plan {
        first,
        n,
        offset,
        len,
        prev,
        dirty,
        wanted,
    })
}

/// Asks `fetcher` for the window `plan` reads (all of it without ranges).
pub(crate) fn request(fetcher: &Fetcher<'_, '_>, plan: &Plan) -> Result<()> {
    let wanted = plan
        .wanted
        .clone()
        .unwrap_or_else(|| std::iter::once(0..plan.len).collect());
    Ok(fetcher.request(plan.offset, plan.len, wanted)?)
}
