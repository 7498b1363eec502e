//! Changed-block tracking (CBT): hints that say which blocks of an image
//! changed since the parent point, and the rules that keep them honest.
//!
//! A hint comes from one of three sources:
//! - [`list`]: a file given with `--changed-blocks` (`nbdinfo --map --json`
//!   output of a dirty bitmap, or coffre's own format);
//! - a QEMU dirty bitmap read over NBD (`crate::nbd`);
//! - [`reflink`]: the extents a reflink clone still shares with the
//!   previous clone (`FIEMAP`).
//!
//! **A hint is never trusted blindly.** Before it is used, [`Hint::check`]
//! rules out what makes it worthless (no parent, a size change, a
//! generation other than the one recorded at the last backup), and the
//! caller re-reads a random [`Sampling`] of the blocks the hint calls clean
//! and compares them with the parent. Any mismatch turns the run into a
//! full scan, with the reason recorded ([`CbtRecord::fallback`]).

pub mod list;
pub mod reflink;

use std::ops::Range;

pub use coffre_vault_store::CbtRecord;

/// Where a hint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintSource {
    /// A file given with `--changed-blocks`.
    List,
    /// A QEMU dirty bitmap over NBD.
    Bitmap,
    /// Reflink extent sharing between two clones.
    Reflink,
}

impl HintSource {
    /// The name recorded in [`CbtRecord::source`].
    pub fn name(self) -> &'static str {
        match self {
            HintSource::List => "list",
            HintSource::Bitmap => "bitmap",
            HintSource::Reflink => "reflink",
        }
    }
}

/// A changed-block hint: byte extents that may have changed since the
/// parent; everything else claims to be unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint {
    /// Where it came from.
    pub source: HintSource,
    /// The source's generation now (recorded with this capture).
    pub generation: Option<String>,
    /// The generation the hint is relative to: it must be the one the
    /// parent recorded. `None`: the source cannot tell (it is then trusted
    /// on the sample alone).
    pub since: Option<String>,
    /// The image size the source describes, when it says.
    pub image_size: Option<u64>,
    /// Dirty byte extents, sorted, disjoint and merged.
    dirty: Vec<Range<u64>>,
    /// Why the source itself says this run cannot build on the parent
    /// (its chain broke): the run reads everything and records the reason.
    refused: Option<String>,
}

/// What a hint is checked against: the parent the capture builds on.
#[derive(Clone, Debug, Default)]
pub struct Parent {
    /// The parent's image size.
    pub image_size: u64,
    /// The generation the parent recorded for this source, if any.
    pub generation: Option<String>,
    /// The source the parent recorded.
    pub source: Option<String>,
}

impl Parent {
    /// A parent of `image_size` bytes, with what it recorded of its
    /// changed-block source.
    pub fn of(image_size: u64, cbt: Option<&CbtRecord>) -> Parent {
        Parent {
            image_size,
            generation: cbt.and_then(|c| c.generation.clone()),
            source: cbt.map(|c| c.source.clone()),
        }
    }
}

/// Why a run stopped trusting its hint: sampled clean blocks that are not
/// what the parent holds.
pub fn sample_mismatch(mismatches: u64, sampled: u64, first: u64) -> String {
    format!(
        "{mismatches} of {sampled} sampled clean blocks differ from the parent point (first: block {first})"
    )
}

/// The job warning of a run that fell back to a full scan: the hint was
/// not used (a check failed) or not trusted (its sample disagreed).
pub fn fallback_warning(source: &str, why: &str, sample_disagreed: bool) -> String {
    let verdict = if sample_disagreed {
        "not trusted"
    } else {
        "not used"
    };
    format!("changed-block {source} {verdict}, full scan: {why}")
}

/// How many of the blocks a hint calls clean are re-read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Fraction of the clean blocks (0.0..=1.0).
    pub fraction: f64,
    /// At least this many (or all clean blocks, when there are fewer).
    pub min_blocks: u64,
}

impl Default for Sampling {
    /// 1 %, and at least 64 blocks.
    fn default() -> Self {
        Sampling {
            fraction: 0.01,
            min_blocks: 64,
        }
    }
}

impl Sampling {
    /// Parses `1%`, `0.5%`, `100%` or a fraction such as `0.01`.
    pub fn parse_fraction(s: &str) -> Result<f64, String> {
        let (num, scale) = match s.strip_suffix('%') {
            Some(n) => (n, 100.0),
            None => (s, 1.0),
        };
        let v: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a percentage (e.g. 1%) or a fraction (0.01)"))?;
        let f = v / scale;
        if !(0.0..=1.0).contains(&f) || f.is_nan() {
            return Err(format!("{s:?} is not between 0% and 100%"));
        }
        Ok(f)
    }

    /// How many of `clean` blocks to sample.
    pub fn count(&self, clean: u64) -> u64 {
        let by_fraction = (clean as f64 * self.fraction).ceil() as u64;
        by_fraction.max(self.min_blocks).min(clean)
    }
}

impl Hint {
    /// A hint from `dirty` byte extents (in any order, overlapping or
    /// empty ones allowed).
    pub fn new(source: HintSource, mut dirty: Vec<Range<u64>>) -> Hint {
        dirty.retain(|r| r.start < r.end);
        dirty.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(dirty.len());
        for r in dirty {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Hint {
            source,
            generation: None,
            since: None,
            image_size: None,
            dirty: merged,
            refused: None,
        }
    }

    /// A hint that only starts (or restarts) tracking: the source has
    /// nothing relative to the parent, for the reason `why` (`None`: there
    /// is no parent). Everything of the `image_size` bytes is dirty, and
    /// `generation` is recorded for the next run to build on.
    pub fn starting(
        source: HintSource,
        generation: String,
        image_size: u64,
        why: Option<String>,
    ) -> Hint {
        let mut h = Hint::new(source, std::iter::once(0..image_size).collect());
        h.generation = Some(generation);
        h.image_size = Some(image_size);
        h.refused = Some(why.unwrap_or_else(|| "this run starts tracking".into()));
        h
    }

    /// The dirty extents.
    pub fn extents(&self) -> &[Range<u64>] {
        &self.dirty
    }

    /// Bytes the source calls dirty.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.iter().map(|r| r.end - r.start).sum()
    }

    /// Why this hint cannot be used against `parent` for an image of
    /// `image_size` bytes; `None` when it can.
    pub fn check(&self, parent: Option<&Parent>, image_size: u64) -> Option<String> {
        let Some(parent) = parent else {
            return Some("there is no parent snapshot to build on".into());
        };
        if let Some(why) = &self.refused {
            return Some(why.clone());
        }
        if let Some(size) = self.image_size
            && size != image_size
        {
            return Some(format!(
                "the source describes {size} bytes but the image is {image_size}"
            ));
        }
        if parent.image_size != image_size {
            return Some(format!(
                "the image size changed from {} to {image_size} bytes since the parent point",
                parent.image_size
            ));
        }
        if let Some(since) = &self.since {
            if parent.source.as_deref() != Some(self.source.name()) {
                return Some(format!(
                    "the parent point recorded no {} generation (this run starts tracking)",
                    self.source.name()
                ));
            }
            if parent.generation.as_ref() != Some(since) {
                return Some(format!(
                    "the {} generation {since:?} is not the one recorded at the last backup ({})",
                    self.source.name(),
                    parent
                        .generation
                        .as_deref()
                        .map_or("none".to_string(), |g| format!("{g:?}"))
                ));
            }
        }
        None
    }

    /// One flag per block of `block_size` bytes over `first..first + n`:
    /// true where the block overlaps a dirty extent.
    pub fn dirty_mask(&self, block_size: u64, first: u64, n: usize) -> Vec<bool> {
        let mut mask = vec![false; n];
        let start = first * block_size;
        let end = start + n as u64 * block_size;
        let i = self.dirty.partition_point(|r| r.end <= start);
        for r in self.dirty.get(i..).unwrap_or_default() {
            if r.start >= end {
                break;
            }
            let a = (r.start.max(start) - start) / block_size;
            let b = (r.end.min(end) - start).div_ceil(block_size);
            for m in mask
                .get_mut(a as usize..(b as usize).min(n))
                .unwrap_or_default()
            {
                *m = true;
            }
        }
        mask
    }

    /// The dirty extents in whole blocks (of `blocks`), merged.
    fn block_ranges(&self, block_size: u64, blocks: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::with_capacity(self.dirty.len());
        for r in &self.dirty {
            let a = (r.start / block_size).min(blocks);
            let b = r.end.div_ceil(block_size).min(blocks);
            if a >= b {
                continue;
            }
            match out.last_mut() {
                Some(last) if a <= last.end => last.end = last.end.max(b),
                _ => out.push(a..b),
            }
        }
        out
    }

    /// Blocks (of `blocks`) the hint calls dirty.
    pub fn dirty_blocks(&self, block_size: u64, blocks: u64) -> u64 {
        self.block_ranges(block_size, blocks)
            .iter()
            .map(|r| r.end - r.start)
            .sum()
    }

    /// The clean blocks to re-read, sorted: `sampling.count(clean)` of
    /// them, chosen at random from `seed` (the job id), so two runs of one
    /// job pick the same and two jobs pick different ones.
    pub fn sample(&self, block_size: u64, blocks: u64, sampling: Sampling, seed: &str) -> Vec<u64> {
        let dirty = self.block_ranges(block_size, blocks);
        let clean = blocks - dirty.iter().map(|r| r.end - r.start).sum::<u64>();
        let want = sampling.count(clean);
        if want == 0 {
            return Vec::new();
        }
        // Ranks among the clean blocks, drawn without replacement (Floyd).
        let digest = blake3::hash(seed.as_bytes());
        let mut seed_bytes = [0u8; 8];
        seed_bytes.copy_from_slice(&digest.as_bytes()[..8]);
        let mut rng = SplitMix(u64::from_le_bytes(seed_bytes));
        let mut ranks = std::collections::BTreeSet::new();
        for j in clean - want..clean {
            let t = rng.below(j + 1);
            if !ranks.insert(t) {
                ranks.insert(j);
            }
        }
        // The clean blocks are the gaps between dirty ranges: map each
        // rank into its gap.
        let mut ranks = ranks.into_iter().peekable();
        let mut out = Vec::with_capacity(want as usize);
        let mut before = 0u64; // clean blocks in earlier gaps
        let mut at = 0u64;
        let gaps = dirty
            .iter()
            .map(|r| r.start)
            .chain(std::iter::once(blocks))
            .zip(dirty.iter().map(|r| r.end).chain(std::iter::once(blocks)));
        for (gap_end, next_start) in gaps {
            let len = gap_end - at;
            while let Some(&k) = ranks.peek()
                && k < before + len
            {
                out.push(at + (k - before));
                ranks.next();
            }
            before += len;
            at = next_start;
        }
        out
    }

    /// The record of a run that used this hint (or fell back, `fallback`).
    pub fn record(&self, block_size: u64, blocks: u64, fallback: Option<String>) -> CbtRecord {
        CbtRecord {
            source: self.source.name().to_string(),
            generation: self.generation.clone(),
            used: fallback.is_none(),
            fallback,
            dirty_blocks: self.dirty_blocks(block_size, blocks),
            dirty_bytes: self.dirty_bytes(),
            sampled: 0,
            mismatches: 0,
        }
    }
}

/// A small deterministic generator (SplitMix64): sampling needs spread,
/// not secrecy.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(extents: &[(u64, u64)]) -> Hint {
        Hint::new(
            HintSource::List,
            extents.iter().map(|&(a, l)| a..a + l).collect(),
        )
    }

    #[test]
    fn extents_merge_and_map_to_blocks() {
        let h = hint(&[(100, 10), (0, 1), (105, 100), (4096 * 3, 4096)]);
        assert_eq!(h.extents(), &[0..1, 100..205, 12288..16384]);
        assert_eq!(h.dirty_bytes(), 1 + 105 + 4096);
        let mask = h.dirty_mask(4096, 0, 5);
        assert_eq!(mask, vec![true, false, false, true, false]);
        assert_eq!(h.dirty_blocks(4096, 5), 2);
        // A window that starts later sees the same blocks.
        assert_eq!(h.dirty_mask(4096, 3, 2), vec![true, false]);
        // An extent across a block boundary dirties both blocks.
        let h = hint(&[(4095, 2)]);
        assert_eq!(h.dirty_mask(4096, 0, 3), vec![true, true, false]);
        assert_eq!(h.dirty_blocks(4096, 3), 2);
    }

    #[test]
    fn samples_are_clean_distinct_sorted_and_sized() {
        let h = hint(&[(0, 4096 * 10), (4096 * 500, 4096 * 100)]);
        let blocks = 10_000;
        let s = h.sample(4096, blocks, Sampling::default(), "job1");
        let clean = blocks - 110;
        assert_eq!(s.len() as u64, Sampling::default().count(clean));
        assert_eq!(s.len(), 99); // ceil(1 % of 9,890)
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        let mask = h.dirty_mask(4096, 0, blocks as usize);
        assert!(s.iter().all(|&b| b < blocks && !mask[b as usize]));
        assert_ne!(s, h.sample(4096, blocks, Sampling::default(), "job2"));
        assert_eq!(s, h.sample(4096, blocks, Sampling::default(), "job1"));
        // Everything clean is sampled at 100 %, and the minimum holds.
        let all = h.sample(
            4096,
            blocks,
            Sampling {
                fraction: 1.0,
                min_blocks: 0,
            },
            "x",
        );
        assert_eq!(all.len() as u64, clean);
        let few = hint(&[]).sample(4096, 1000, Sampling::default(), "x");
        assert_eq!(few.len(), 64);
    }

    #[test]
    fn checks_say_why_a_hint_cannot_be_used() {
        let mut h = hint(&[(0, 1)]);
        h.since = Some("b0".into());
        h.source = HintSource::Bitmap;
        assert!(h.check(None, 10).unwrap().contains("no parent"));
        let parent = Parent {
            image_size: 10,
            generation: Some("b0".into()),
            source: Some("bitmap".into()),
        };
        assert_eq!(h.check(Some(&parent), 10), None);
        assert!(h.check(Some(&parent), 20).unwrap().contains("size changed"));
        let other = Parent {
            generation: Some("b1".into()),
            ..parent.clone()
        };
        assert!(
            h.check(Some(&other), 10)
                .unwrap()
                .contains("not the one recorded")
        );
        let untracked = Parent {
            source: None,
            generation: None,
            ..parent
        };
        assert!(
            h.check(Some(&untracked), 10)
                .unwrap()
                .contains("starts tracking")
        );
    }

    #[test]
    fn sampling_fractions_parse() {
        assert_eq!(Sampling::parse_fraction("1%"), Ok(0.01));
        assert_eq!(Sampling::parse_fraction("100%"), Ok(1.0));
        assert_eq!(Sampling::parse_fraction("0.25"), Ok(0.25));
        assert!(Sampling::parse_fraction("101%").is_err());
        assert!(Sampling::parse_fraction("much").is_err());
    }
}
