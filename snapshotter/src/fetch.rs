//! Reading windows ahead: a thread that reads the windows a pass asks for,
//! one at a time, while the pass's pool works on the window before.
//!
//! For sources whose windows are read when they are made rather than
//! mapped: an NBD export (the capture's pass, [`ImageSource::fetches`])
//! and a clone read with `O_DIRECT` through a changed-block hint (the
//! transfer). Reading either on the pass's own thread waits for the
//! server or the device with both workers idle.
//!
//! The pass plans window N+1 (which blocks, which byte ranges), asks for
//! it, then works on window N: at most two windows are in memory.

use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};

use crate::error::{Result, SnapError};
use crate::source::{ImageSource, Window};

/// A request: a window's first byte, its length and the ranges to read.
type Request = (u64, usize, Vec<Range<usize>>);

/// Reads requested windows of a source on a thread of its own.
pub struct Fetcher<'scope, 'src> {
    source: &'src dyn ImageSource,
    requests: SyncSender<Request>,
    windows: Receiver<Result<Window<'src>>>,
    _thread: ScopedJoinHandle<'scope, ()>,
}

impl<'scope, 'src: 'scope> Fetcher<'scope, 'src> {
    /// Starts the reader of `source`'s windows.
    pub fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        source: &'src dyn ImageSource,
    ) -> Result<Self>
    where
        'src: 'env,
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
                        let window = source.window_for(offset, len, &wanted);
                        let failed = window.is_err();
                        if done.send(window).is_err() || failed {
                            return;
                        }
                    }
                }));
                if read.is_err() {
                    let _ = done.send(Err(SnapError::damaged(
                        source.path(),
                        "the window reader panicked",
                    )));
                }
            })
            .map_err(|e| {
                SnapError::damaged(
                    source.path(),
                    format!("cannot start the window reader: {e}"),
                )
            })?;
        Ok(Fetcher {
            source,
            requests,
            windows,
            _thread: thread,
        })
    }

    /// Asks for the `wanted` ranges of `offset..offset+len` (as
    /// [`ImageSource::window_for`]).
    pub fn request(&self, offset: u64, len: usize, wanted: Vec<Range<usize>>) -> Result<()> {
        self.requests
            .send((offset, len, wanted))
            .map_err(|_| self.stopped())
    }

    /// The window asked for first and not yet received.
    pub fn receive(&self) -> Result<Window<'src>> {
        self.windows.recv().unwrap_or_else(|_| Err(self.stopped()))
    }

    fn stopped(&self) -> SnapError {
        SnapError::damaged(self.source.path(), "the window reader stopped early")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileImage;
    use crate::test_support::cut;

    #[test]
    fn windows_come_back_in_order_and_a_failed_read_is_an_error_not_a_hang() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("clone.img");
        let bytes: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        let image = FileImage::open(&p).unwrap().with_direct_reads();
        let a: Vec<Range<usize>> = std::iter::once(4096..8192).collect();
        let b = vec![0..65536, (512 << 10)..(1 << 20)];
        std::thread::scope(|scope| {
            let f = Fetcher::start(scope, &image).unwrap();
            f.request(0, 1 << 20, a.clone()).unwrap();
            f.request(2 << 20, 1 << 20, b.clone()).unwrap();
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
            cut(&p, (2 << 20) + (256 << 10));
            f.request(2 << 20, 1 << 20, b.clone()).unwrap();
            let e = f.receive().map(|_| ()).expect_err("a cut file is an error");
            assert!(e.to_string().contains("truncated"), "{e}");
            // It stopped after the error: the next request or window says so.
            let next = f
                .request(0, 1 << 20, a)
                .and_then(|()| f.receive().map(|_| ()));
            let e = next.expect_err("a stopped reader is an error");
            assert!(e.to_string().contains("stopped early"), "{e}");
            assert!(e.to_string().contains(&*p.to_string_lossy()), "{e}");
        });
    }
}
