//! The bounded cache of decoded blocks a point read in place keeps, and
//! the guard that makes two readers of one block decode it once.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Condvar, Mutex};

/// Decoded blocks by index, least recently used dropped first.
pub struct BlockCache {
    inner: Mutex<Inner>,
    loaded: Condvar,
}

struct Inner {
    blocks: lru::LruCache<u64, Arc<Vec<u8>>>,
    /// Blocks being decoded now.
    loading: HashSet<u64>,
}

impl BlockCache {
    /// A cache of at most `blocks` blocks (at least one).
    pub fn new(blocks: usize) -> Self {
        BlockCache {
            inner: Mutex::new(Inner {
                blocks: lru::LruCache::new(
                    NonZeroUsize::new(blocks.max(1)).unwrap_or(NonZeroUsize::MIN),
                ),
                loading: HashSet::new(),
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
            if !inner.loading.contains(&b) {
                break;
            }
            inner = self.loaded.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.loading.insert(b);
        drop(inner);
        // Whatever happens to `load` (an error, a panic), the block stops
        // being "loading" and the waiters wake.
        let guard = Loading { cache: self, b };
        let result = load();
        if let Ok(bytes) = &result {
            self.lock().blocks.put(b, bytes.clone());
        }
        drop(guard);
        result.map(|bytes| (bytes, false))
    }
}

/// Marks a block as no longer loading when dropped.
struct Loading<'c> {
    cache: &'c BlockCache,
    b: u64,
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        self.cache.lock().loading.remove(&self.b);
        self.cache.loaded.notify_all();
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
}
