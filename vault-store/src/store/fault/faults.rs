//! [`Faults`]: the shared handle that arms the faults and counts the
//! operations of every store wrapped with it.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{State, off};
use crate::error::Result;

/// The switchboard of a [`FaultStore`](super::FaultStore); clone it to arm
/// faults from a test.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    state: Arc<Mutex<State>>,
}

impl Faults {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Seeds the choice of torn outcomes (default 0).
    pub fn seed(&self, seed: u64) {
        self.lock().rng = seed;
    }
    /// Power goes out at operation number `n` (counted from now, 1-based).
    pub fn power_loss_at(&self, n: u64) {
        let mut s = self.lock();
        s.power_loss_at = Some(s.ops + n);
    }
    /// A torn `put` may also leave the new name with an empty or partial
    /// file (a filesystem that does not order data before renames).
    pub fn unordered_renames(&self, on: bool) {
        self.lock().unordered_renames = on;
    }
    /// The `n`-th fsync from now fails.
    pub fn fail_sync_at(&self, n: u64) {
        let mut s = self.lock();
        s.fail_sync_at = Some(s.syncs + n);
    }
    /// The `n`-th directory fsync from now fails.
    pub fn fail_dir_sync_at(&self, n: u64) {
        let mut s = self.lock();
        s.fail_dir_sync_at = Some(s.dir_syncs + n);
    }
    /// The `n`-th append from now is short.
    pub fn short_write_at(&self, n: u64) {
        let mut s = self.lock();
        s.short_write_at = Some(s.appends + n);
    }
    /// Appends fail with ENOSPC once `bytes` more have been appended.
    pub fn space_left(&self, bytes: Option<u64>) {
        self.lock().space_left = bytes;
    }
    /// Reads of names containing `pattern` fail with EIO (`None`: none).
    pub fn read_error(&self, pattern: Option<&str>) {
        self.lock().read_error = pattern.map(str::to_string);
    }
    /// True once power was lost.
    pub fn is_off(&self) -> bool {
        self.lock().off
    }
    /// Operations counted so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }
    /// Fsyncs that failed on purpose.
    pub fn failed_syncs(&self) -> u64 {
        self.lock().failed_syncs
    }
    /// Directory fsyncs that failed on purpose.
    pub fn failed_dir_syncs(&self) -> u64 {
        self.lock().failed_dir_syncs
    }
    /// What the operation power loss hit was left as (`None` before).
    pub fn torn(&self) -> Option<String> {
        self.lock().torn.clone()
    }

    /// True while a directory fsync failure is still to come (the undo
    /// of a rename or removal is only kept then).
    pub(super) fn dir_sync_armed(&self) -> bool {
        let s = self.lock();
        s.fail_dir_sync_at.is_some_and(|n| n > s.dir_syncs)
    }

    /// Counts an operation. `Ok(true)`: power goes out during this one
    /// (the caller tears it, then calls [`Faults::power_off`]). Only one
    /// operation tears: from that moment every other one, on any thread,
    /// finds the power gone. (Two torn at once, on two threads, would
    /// each drop what was not durable, the second after the first had
    /// already forgotten which files existed before.)
    pub(super) fn begin(&self, name: &str) -> Result<bool> {
        let mut s = self.lock();
        if s.off {
            return Err(off(name));
        }
        s.ops += 1;
        let torn = s.power_loss_at.is_some_and(|at| s.ops >= at);
        s.off = torn;
        Ok(torn)
    }

    /// Like [`Faults::begin`] for an operation that changes a file.
    pub(super) fn begin_change(&self, name: &str) -> Result<bool> {
        let torn = self.begin(name)?;
        let mut s = self.lock();
        let n = s.ops;
        s.changes.push(n);
        Ok(torn)
    }

    /// The numbers of the operations so far that changed a file (put,
    /// delete, truncate, punch, write_at, create, append, sync): where a
    /// power loss tears something.
    pub fn changing_ops(&self) -> Vec<u64> {
        self.lock().changes.clone()
    }

    pub(super) fn pick(&self, n: u64) -> u64 {
        self.lock().below(n)
    }
}
