//! The window plan of a pass: how far each window spans, which of its
//! blocks are read, and the byte ranges to fetch.

use coffre_vault_store::format::blockmap::block_count;

use crate::cbt::Hint;
use crate::source::ImageSource;

/// One window of a pass, planned: where it is, which of its blocks are
/// dirty and sampled (with a hint), and the byte ranges to read (none:
/// nothing in it is read).
pub(super) struct Planned {
    pub offset: u64,
    pub n: usize,
    pub len: usize,
    pub dirty: Option<Vec<bool>>,
    pub sampled: Vec<bool>,
    pub ranges: Vec<std::ops::Range<usize>>,
}

/// Plans the window of a pass that starts at block `first`.
pub(super) fn plan_window(
    source: &dyn ImageSource,
    hint: Option<(&Hint, &[u64])>,
    bs: usize,
    first: u64,
    window_blocks: usize,
) -> Planned {
    let size = source.size();
    let blocks = block_count(size, bs as u32);
    let n = window_span(hint, bs as u64, first, blocks, window_blocks);
    let offset = first * bs as u64;
    let len = (size - offset).min((n * bs) as u64) as usize;
    // Which blocks are read: all of them, or a hint's dirty and sampled
    // ones.
    let (dirty, sampled) = match hint {
        Some((h, samples)) => {
            let mut sampled = vec![false; n];
            let from = samples.partition_point(|&b| b < first);
            for &b in samples.get(from..).unwrap_or_default() {
                match sampled.get_mut((b - first) as usize) {
                    Some(flag) => *flag = true,
                    None => break,
                }
            }
            (Some(h.dirty_mask(bs as u64, first, n)), sampled)
        }
        None => (None, Vec::new()),
    };
    let ranges = wanted_ranges(n, bs, len, &|i| is_read(dirty.as_deref(), &sampled, i));
    Planned {
        offset,
        n,
        len,
        dirty,
        sampled,
        ranges,
    }
}

/// Whether a pass reads block `i` of its window: every block without a
/// hint (`dirty` is `None`), else the dirty and the sampled ones.
pub(super) fn is_read(dirty: Option<&[bool]>, sampled: &[bool], i: usize) -> bool {
    dirty.is_none_or(|d| d.get(i).copied().unwrap_or(true) || sampled.get(i) == Some(&true))
}

/// Most windows one window of a hinted pass may span: 256 MiB of 64 KiB
/// blocks, a bound on the buffer a fetched or direct-read window
/// reserves (only the parts read are touched).
pub const MAX_SPAN_WINDOWS: usize = 16;

/// How many blocks from `first` (of `blocks`) the next window of a pass
/// spans: `window_blocks`, or with a hint (its dirty extents and sorted
/// samples) as many as hold `window_blocks` blocks to read, up to
/// [`MAX_SPAN_WINDOWS`] windows. A sparse hint's window then still gives
/// the pool enough work to share between its threads, and the records in
/// memory stay bounded by `window_blocks`.
pub fn window_span(
    hint: Option<(&Hint, &[u64])>,
    bs: u64,
    first: u64,
    blocks: u64,
    window_blocks: usize,
) -> usize {
    let rest = usize::try_from(blocks - first).unwrap_or(usize::MAX);
    let Some((h, samples)) = hint else {
        return window_blocks.min(rest);
    };
    let span = window_blocks.saturating_mul(MAX_SPAN_WINDOWS).min(rest);
    let dirty = h.dirty_mask(bs, first, span);
    let from = samples.partition_point(|&b| b < first);
    let mut sampled = samples.get(from..).unwrap_or_default().iter().peekable();
    let mut wanted = 0;
    for (i, d) in dirty.iter().enumerate() {
        let s = sampled.next_if(|&&b| b == first + i as u64).is_some();
        if *d || s {
            wanted += 1;
            if wanted >= window_blocks {
                return i + 1;
            }
        }
    }
    span
}

/// The byte ranges (relative to a window of `n` blocks, `len` bytes) of
/// the blocks `wanted` selects, merged.
pub fn wanted_ranges(
    n: usize,
    bs: usize,
    len: usize,
    wanted: &dyn Fn(usize) -> bool,
) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for i in (0..n).filter(|&i| wanted(i)) {
        let (a, b) = (i * bs, ((i + 1) * bs).min(len));
        match out.last_mut() {
            Some(last) if last.end == a => last.end = b,
            _ => out.push(a..b),
        }
    }
    out
}
