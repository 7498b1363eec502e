//! Window buffers a fetching source lends and takes back: a source that
//! reads its windows into memory (NBD) reuses the few buffers a pass has
//! in flight instead of allocating, zeroing and faulting in 16 MiB for
//! every window.
//!
//! A window's bytes outside its data read as zeros ([`super::Window`]'s
//! promise). A lent buffer remembers which of its bytes the window before
//! may have written (its `dirty` ranges) and [`BufferPool::take`] zeroes
//! exactly those the next window will not overwrite, so a window never
//! shows another window's bytes and an unchanged hole costs nothing.
//!
//! Memory: the pool keeps at most `keep` idle buffers (the rest are
//! freed when they come back); the buffers in use are the windows alive,
//! which their caller bounds (a capture pass: two).

use std::ops::Range;
use std::sync::Mutex;

/// A buffer lent to a window; it goes back to its pool when dropped.
pub struct Lent<'a> {
    buf: Vec<u8>,
    /// Sorted, disjoint ranges of `buf` that may hold non-zero bytes.
    dirty: Vec<Range<usize>>,
    pool: &'a BufferPool,
}

impl Lent<'_> {
    /// The buffer's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The buffer's bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl std::fmt::Debug for Lent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent")
            .field("len", &self.buf.len())
            .field("dirty", &self.dirty.len())
            .finish()
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let dirty = std::mem::take(&mut self.dirty);
        self.pool.give(buf, dirty);
    }
}

/// An idle buffer and the sorted, disjoint ranges that may hold bytes.
#[derive(Debug)]
struct Idle {
    buf: Vec<u8>,
    dirty: Vec<Range<usize>>,
}

/// Idle window buffers.
#[derive(Debug)]
pub struct BufferPool {
    idle: Mutex<Vec<Idle>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` idle buffers.
    pub fn new(keep: usize) -> Self {
        BufferPool {
            idle: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A buffer of `len` bytes that are zero outside `fill` (sorted,
    /// disjoint ranges of `0..len`); the caller must overwrite every byte
    /// of `fill` before it shows the buffer to anyone (or drop it).
    pub fn take(&self, len: usize, fill: &[Range<usize>]) -> Lent<'_> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let Some(Idle { mut buf, mut dirty }) = idle else {
            return Lent {
                buf: vec![0u8; len],
                dirty: fill.to_vec(),
                pool: self,
            };
        };
        if buf.len() > len {
            buf.truncate(len);
            dirty.retain_mut(|r| {
                r.end = r.end.min(len);
                r.start < r.end
            });
        } else {
            // New bytes are zero.
            buf.resize(len, 0);
        }
        for r in minus(&dirty, fill) {
            if let Some(b) = buf.get_mut(r) {
                b.fill(0);
            }
        }
        Lent {
            buf,
            dirty: fill.to_vec(),
            pool: self,
        }
    }

    fn give(&self, buf: Vec<u8>, dirty: Vec<Range<usize>>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.keep && !buf.is_empty() {
            idle.push(Idle { buf, dirty });
        }
    }
}

/// The parts of `a` outside every range of `b` (both sorted, disjoint).
fn minus(a: &[Range<usize>], b: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in a {
        let mut at = r.start;
        // Ranges of `b` that end before `at` are behind every later `a`.
        while b.get(j).is_some_and(|x| x.end <= at) {
            j += 1;
        }
        let mut k = j;
        while at < r.end {
            match b.get(k) {
                Some(x) if x.start < r.end => {
                    if x.start > at {
                        out.push(at..x.start);
                    }
                    at = at.max(x.end);
                    k += 1;
                }
                _ => {
                    out.push(at..r.end);
                    at = r.end;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges from (start, end) pairs.
    fn r(pairs: &[(usize, usize)]) -> Vec<Range<usize>> {
        pairs.iter().map(|&(a, b)| a..b).collect()
    }

    #[test]
    fn minus_keeps_what_the_second_list_does_not_cover() {
        let m = |a: &[(usize, usize)], b: &[(usize, usize)]| minus(&r(a), &r(b));
        assert_eq!(
            m(&[(0, 10)], &[(2, 4), (6, 8)]),
            r(&[(0, 2), (4, 6), (8, 10)])
        );
        assert_eq!(m(&[(0, 10), (20, 30)], &[(5, 25)]), r(&[(0, 5), (25, 30)]));
        assert_eq!(m(&[(0, 10)], &[]), r(&[(0, 10)]));
        assert_eq!(m(&[], &[(0, 10)]), r(&[]));
        assert_eq!(m(&[(3, 7)], &[(0, 10)]), r(&[]));
        assert_eq!(m(&[(0, 4), (6, 9)], &[(2, 7)]), r(&[(0, 2), (7, 9)]));
        assert_eq!(m(&[(0, 100)], &[(0, 1), (99, 100)]), r(&[(1, 99)]));
    }

    #[test]
    fn a_reused_buffer_reads_zero_outside_what_the_next_window_fills() {
        let pool = BufferPool::new(2);
        let mut a = pool.take(64, &r(&[(0, 32)]));
        a.bytes_mut()[0..32].fill(7);
        drop(a);
        // The same buffer, for a window that fills 16..48: 0..16 must be
        // zeroed again; 48..64 was never written.
        let mut b = pool.take(64, &r(&[(16, 48)]));
        assert!(b.bytes()[0..16].iter().all(|&x| x == 0));
        assert!(b.bytes()[48..].iter().all(|&x| x == 0));
        b.bytes_mut()[16..48].fill(9);
        drop(b);
        // Shorter (an image's tail), then longer again: no old byte shows.
        let c = pool.take(40, &[]);
        assert_eq!(c.bytes(), &[0u8; 40][..]);
        drop(c);
        let d = pool.take(80, &[]);
        assert_eq!(d.bytes(), &[0u8; 80][..]);
    }

    #[test]
    fn the_pool_keeps_at_most_its_bound() {
        let pool = BufferPool::new(2);
        let all: Vec<_> = (0..4).map(|_| pool.take(16, &[])).collect();
        drop(all);
        assert_eq!(pool.idle.lock().unwrap().len(), 2);
    }
}
