//! The bounded cache of decoded blocks a point read in place keeps, and
//! the guard that makes two readers of one block decode it once.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Condvar, Mutex};

/// Decoded blocks by index, least recently used dropped first.
pub struct BlockCache {
    inner: Mutex<Inner>,
    loaded: Condvar,
}

struct Inner {
    blocks: lru::LruCache<u64, Arc<Vec<u8>>>,
    /// Blocks being decoded now, each with whether a reader waits for it
    /// (only then does its end wake the waiters: readers of other blocks
    /// sleep on).
    loading: HashMap<u64, bool>,
}

impl BlockCache {
    /// A cache of at most `blocks` blocks (at least one).
    pub fn new(blocks: usize) -> Self {
        BlockCache {
            inner: Mutex::new(Inner {
                blocks: lru::LruCache::new(
                    NonZeroUsize::new(blocks.max(1)).unwrap_or(NonZeroUsize::MIN),
                ),
                loading: HashMap::new(),
            }),
            loaded: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when block `b` is cached (it is not marked as used).
    pub fn contains(&self, b: u64) -> bool {
        self.lock().blocks.contains(&b)
    }

    /// Claims block `b` for loading when it is neither cached nor being
    /// loaded: until the claim is filled or dropped, every reader of the
    /// block waits for it (a read-ahead that claims the blocks it fetches
    /// keeps the readers who catch up with it from reading them twice).
    pub fn claim(&self, b: u64) -> Option<Claim<'_>> {
        let mut inner = self.lock();
        if inner.blocks.contains(&b) || inner.loading.contains_key(&b) {
            return None;
        }
        inner.loading.insert(b, false);
        Some(Claim {
            cache: self,
            b,
            bytes: None,
        })
    }

    /// Block `b`, from the cache or from `load` (run once however many
    /// readers ask at the same time; a failed load is not cached, and
    /// every waiting reader then tries on its own). The flag says whether
    /// it came from the cache.
    pub fn get_or_load<E>(
        &self,
        b: u64,
        load: impl FnOnce() -> Result<Arc<Vec<u8>>, E>,
    ) -> Result<(Arc<Vec<u8>>, bool), E> {
        let mut inner = self.lock();
        loop {
            if let Some(bytes) = inner.blocks.get(&b) {
                return Ok((bytes.clone(), true));
            }
            match inner.loading.get_mut(&b) {
                None => break,
                Some(waited) => *waited = true,
            }
            inner = self.loaded.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.loading.insert(b, false);
        drop(inner);
        // Whatever happens to `load` (an error, a panic), the block stops
        // being "loading" and the waiters wake.
        let claim = Claim {
            cache: self,
            b,
            bytes: None,
        };
        let bytes = load()?;
        claim.fill(bytes.clone());
        Ok((bytes, false))
    }
}

/// A block being loaded by its holder: filled, it is cached; dropped
/// unfilled (an error, a panic), its readers wake and load it themselves.
pub struct Claim<'c> {
    cache: &'c BlockCache,
    b: u64,
    /// The bytes it was filled with.
    bytes: Option<Arc<Vec<u8>>>,
}

impl Claim<'_> {
    /// The block this claim is for.
    pub fn block(&self) -> u64 {
        self.b
    }

    /// Caches the block's bytes and wakes its readers.
    pub fn fill(mut self, bytes: Arc<Vec<u8>>) {
        self.bytes = Some(bytes);
        // (Dropped here: cached and woken under one lock.)
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut inner = self.cache.lock();
        if let Some(bytes) = self.bytes.take() {
            inner.blocks.put(self.b, bytes);
        }
        let waited = inner.loading.remove(&self.b);
        drop(inner);
        if waited == Some(true) {
            self.cache.loaded.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_loaded_once_and_the_oldest_is_dropped() {
        let cache = BlockCache::new(2);
        let loads = std::sync::atomic::AtomicUsize::new(0);
        let load = |v: u8| {
            loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<Arc<Vec<u8>>, ()>(Arc::new(vec![v; 4]))
        };
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let (b, _) = cache.get_or_load(1, || load(1)).unwrap();
                    assert_eq!(&b[..], &[1; 4]);
                });
            }
        });
        assert_eq!(loads.load(std::sync::atomic::Ordering::Relaxed), 1);
        cache.get_or_load(2, || load(2)).unwrap();
        cache.get_or_load(3, || load(3)).unwrap();
        assert!(!cache.contains(1) && cache.contains(2) && cache.contains(3));
        // A failed load is not kept.
        assert!(
            cache
                .get_or_load(4, || Err::<Arc<Vec<u8>>, ()>(()))
                .is_err()
        );
        assert!(!cache.contains(4));
        let (_, hit) = cache.get_or_load(3, || load(9)).unwrap();
        assert!(hit);
        // A load that panics leaves no reader waiting for it.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = cache.get_or_load(5, || -> Result<Arc<Vec<u8>>, ()> { panic!("decoder bug") });
        }));
        assert!(caught.is_err());
        let (b, hit) = cache.get_or_load(5, || load(5)).unwrap();
        assert!(!hit && b[0] == 5);
    }

    #[test]
    fn a_claimed_block_is_waited_for_and_a_dropped_claim_leaves_it_to_the_reader() {
        let cache = BlockCache::new(4);
        let claim = cache.claim(7).expect("a block no one has");
        assert!(cache.claim(7).is_none(), "claimed twice");
        let loads = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                cache.get_or_load(7, || {
                    loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok::<_, ()>(Arc::new(vec![0u8; 4]))
                })
            });
            // The reader waits for the claim (it does not load) ...
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!reader.is_finished());
            claim.fill(Arc::new(vec![7u8; 4]));
            // ... and gets what the claim was filled with.
            let (bytes, hit) = reader.join().unwrap().unwrap();
            assert_eq!((&bytes[..], hit), (&[7u8; 4][..], true));
        });
        assert_eq!(loads.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(cache.claim(7).is_none(), "a cached block is not claimed");
        // A claim dropped unfilled (a failed fetch): its reader loads the
        // block itself.
        let claim = cache.claim(8).unwrap();
        std::thread::scope(|s| {
            let reader = s.spawn(|| cache.get_or_load(8, || Ok::<_, ()>(Arc::new(vec![8u8; 4]))));
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(claim);
            let (bytes, hit) = reader.join().unwrap().unwrap();
            assert_eq!((&bytes[..], hit), (&[8u8; 4][..], false));
        });
        assert!(cache.contains(8));
    }
}
