//! Per-worker scratch state for rayon pools: one slot per pool thread, so
//! hot loops reuse compression contexts and buffers instead of allocating
//! them per block.

use std::sync::{Mutex, MutexGuard};

/// One `T` per worker thread of a rayon pool.
pub struct PerThread<T>(Vec<Mutex<T>>);

impl<T> PerThread<T> {
    /// Slots for every thread of `pool`, made by `make`.
    pub fn new(pool: &rayon::ThreadPool, make: impl Fn() -> T) -> Self {
        PerThread(
            (0..pool.current_num_threads().max(1))
                .map(|_| Mutex::new(make()))
                .collect(),
        )
    }

    /// The calling worker's slot. Slots are only ever contended if called
    /// from outside the pool, which then shares slot 0.
    pub fn get(&self) -> MutexGuard<'_, T> {
        let i = rayon::current_thread_index().unwrap_or(0) % self.0.len().max(1);
        let slot = match self.0.get(i) {
            Some(slot) => slot,
            None => &self.0[0],
        };
        slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}
