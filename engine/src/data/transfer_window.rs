//! The transfer's windows: which blocks of each window are read
//! ([`plan`]), and, for a clone read through a changed-block hint, a
//! thread that reads the next window while the pool hashes and
//! compresses this one ([`Fetcher`]).
//!
//! A hinted clone is read with `O_DIRECT`, in large requests, into a
//! buffer of the window's own: the calling thread waits for the device
//! and faults the buffer in. Done on the transfer's own thread that was
//! 40–53 ms of a 0.3 s reflink day two, with both workers idle.

use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};

use coffre_snapshotter::capture::{wanted_ranges, window_span};
use coffre_snapshotter::cbt::Hint;
use coffre_snapshotter::{FileImage, ImageSource, Window};
use coffre_vault_store::blockmap::Entry;
use coffre_vault_store::vault::WriteSession;

use crate::error::{EngineError, Result};
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

/// A request: a window's first byte, its length and the ranges to read.
type Request = (u64, usize, Vec<Range<usize>>);

/// Reads requested windows of a clone on a thread of its own, one ahead.
pub(crate) struct Fetcher<'scope, 'img> {
    requests: SyncSender<Request>,
    windows: Receiver<Result<Window<'img>>>,
    _thread: ScopedJoinHandle<'scope, ()>,
}

impl<'scope, 'img: 'scope> Fetcher<'scope, 'img> {
    /// Starts the reader of `image`'s windows.
    pub fn start<'env>(scope: &'scope Scope<'scope, 'env>, image: &'img FileImage) -> Result<Self>
    where
        'img: 'env,
    {
        let (requests, todo) = sync_channel::<Request>(1);
        let (done, windows) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("coffre-fetch".into())
            .spawn_scoped(scope, move || {
                // A panic is reported as an error, never re-raised when the
                // scope joins this thread.
                let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    for (offset, len, wanted) in todo {
                        let window = image
                            .window_for(offset, len, &wanted)
                            .map_err(EngineError::from);
                        let failed = window.is_err();
                        if done.send(window).is_err() || failed {
                            return;
                        }
                    }
                }));
                if read.is_err() {
                    let _ = done.send(Err(EngineError::Threads(format!(
                        "the window reader of {} panicked",
                        image.path().display()
                    ))));
                }
            })
            .map_err(|e| EngineError::Threads(format!("cannot start the window reader: {e}")))?;
        Ok(Fetcher {
            requests,
            windows,
            _thread: thread,
        })
    }

    /// Asks for the window `plan` reads (all of it without ranges).
    pub fn request(&self, plan: &Plan) -> Result<()> {
        let wanted = plan
            .wanted
            .clone()
            .unwrap_or_else(|| std::iter::once(0..plan.len).collect());
        self.requests
            .send((plan.offset, plan.len, wanted))
            .map_err(|_| self.stopped())
    }

    /// The window asked for first and not yet received.
    pub fn receive(&self) -> Result<Window<'img>> {
        self.windows.recv().unwrap_or_else(|_| Err(self.stopped()))
    }

    fn stopped(&self) -> EngineError {
        EngineError::Threads("the window reader stopped early".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(offset: u64, len: usize, wanted: Vec<Range<usize>>) -> Plan {
        Plan {
            first: 0,
            n: 0,
            offset,
            len,
            prev: Vec::new(),
            dirty: None,
            wanted: Some(wanted),
        }
    }

    #[test]
    fn windows_come_back_in_order_and_a_failed_read_is_an_error_not_a_hang() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("clone.img");
        let bytes: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        let image = FileImage::open(&p).unwrap().with_direct_reads();
        std::thread::scope(|scope| {
            let f = Fetcher::start(scope, &image).unwrap();
            let a = plan_of(0, 1 << 20, std::iter::once(4096..8192).collect());
            let b = plan_of(2 << 20, 1 << 20, vec![0..65536, (512 << 10)..(1 << 20)]);
            f.request(&a).unwrap();
            f.request(&b).unwrap();
            let wa = f.receive().unwrap();
            assert_eq!(wa.bytes()[4096..8192], bytes[4096..8192]);
            let wb = f.receive().unwrap();
            let at = 2 << 20;
            assert_eq!(wb.bytes()[..65536], bytes[at..at + 65536]);
            assert_eq!(
                wb.bytes()[512 << 10..1 << 20],
                bytes[at + (512 << 10)..at + (1 << 20)]
            );
            // The file is cut short inside the window: the reader says so
            // and stops.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len((2 << 20) + (256 << 10))
                .unwrap();
            f.request(&b).unwrap();
            let e = f.receive().map(|_| ()).expect_err("a cut file is an error");
            assert!(e.to_string().contains("truncated"), "{e}");
            // It stopped after the error: the next request or window says so.
            let next = f.request(&a).and_then(|()| f.receive().map(|_| ()));
            let e = next.expect_err("a stopped reader is an error");
            assert!(e.to_string().contains("stopped early"), "{e}");
        });
    }
}
