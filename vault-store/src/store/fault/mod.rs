//! [`FaultStore`]: a store (usually a [`super::LocalStore`]) that fails on
//! purpose, for tests.
//!
//! A shared [`Faults`] handle arms the faults. Every copy of one vault
//! wraps its store with the same handle: they are one machine, and lose
//! power together.
//! - the n-th fsync of appended data fails (`EIO`), as a dying disk does;
//! - the n-th directory fsync fails (`EIO`) after the operation it makes
//!   durable (a new file's first sync, `put`, `delete`, a `write_at` that
//!   creates its file): the operation happened, but its directory entry
//!   may be undone by a later power loss;
//! - the n-th append is short: half of it is written, then `EIO`;
//! - appends fail with `ENOSPC` once a byte budget is spent;
//! - reads of names containing a pattern fail with `EIO`;
//! - **power loss** at the n-th operation (of every kind, on every copy).
//!   The operation it hits is *torn*: it is left half done the way a
//!   real filesystem could leave it, one of several outcomes drawn from
//!   the handle's seed ([`Faults::seed`]):
//!   - `put` (write a temporary file, fsync, rename, fsync the
//!     directory): the old content (or no file), with or without a
//!     leftover temporary file holding part of the new bytes; or the new
//!     content (the rename reached the disk, but the caller never heard);
//!     with [`Faults::unordered_renames`], also the new name holding an
//!     empty or partial file, as a filesystem that does not order a
//!     file's data before its rename leaves it;
//!   - `delete`, `truncate`, `punch`: done or not done;
//!   - `write_at`: any subset of its 512-byte sectors reached the disk
//!     (a file it was creating may be gone altogether);
//!   - an appender's `sync`: not done, or the data durable but a new
//!     file's directory entry not, or all done (unacknowledged).
//!
//!   Then every byte not made durable is dropped, on every copy: a file is
//!   cut back to its synced length plus any prefix of what was appended
//!   since (the kernel may have written some of it back); a file whose
//!   directory entry was never synced vanishes or survives with any
//!   prefix of its data; a rename or removal whose directory fsync failed
//!   is undone or not. From then on every operation fails, as on a machine
//!   that is off. A test then reopens the vault with a fresh store over
//!   the same directory.
//!
//! The RocksDB index is not behind this seam: power loss here models the
//! copies' files only.

mod appender;
mod faults;
mod power;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::collections::HashMap;
use std::io;

use super::{Appender, SharedStore, SpaceInfo, Store};
use crate::error::{Result, StoreError};
use appender::FaultAppender;

pub use faults::Faults;

/// What power loss does to a file written through an appender.
#[derive(Debug, Clone, Copy)]
struct FileState {
    /// Bytes made durable by a sync.
    synced: u64,
    /// The directory entry is durable.
    entry: bool,
}

/// A rename or removal whose directory fsync failed: power loss may undo
/// it.
#[derive(Debug, Clone)]
enum Volatile {
    /// `put` replaced this content (`None`: the name did not exist).
    Put(Option<Vec<u8>>),
    /// `delete` removed a file with this content.
    Delete(Vec<u8>),
}

#[derive(Debug, Default)]
struct State {
    ops: u64,
    power_loss_at: Option<u64>,
    off: bool,
    /// State of the generator that picks torn outcomes (splitmix64).
    rng: u64,
    unordered_renames: bool,
    syncs: u64,
    fail_sync_at: Option<u64>,
    failed_syncs: u64,
    dir_syncs: u64,
    fail_dir_sync_at: Option<u64>,
    failed_dir_syncs: u64,
    appends: u64,
    short_write_at: Option<u64>,
    space_left: Option<u64>,
    read_error: Option<String>,
    /// The wrapped stores, by [`FaultStore`] number.
    stores: Vec<SharedStore>,
    /// (store, name) → appended file
    files: HashMap<(usize, String), FileState>,
    /// (store, name) → an entry change not yet durable
    volatile: HashMap<(usize, String), Volatile>,
    /// What the torn operation left, for messages.
    torn: Option<String>,
    /// Numbers of the operations that change a file.
    changes: Vec<u64>,
}

impl State {
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Counts a directory fsync; true when this one fails on purpose.
    fn dir_sync_fails(&mut self) -> bool {
        self.dir_syncs += 1;
        let fail = self.fail_dir_sync_at == Some(self.dir_syncs);
        if fail {
            self.failed_dir_syncs += 1;
        }
        fail
    }
    /// A directory fsync of `dir` on store `id` succeeded: the entry
    /// changes made there before are durable.
    fn dir_synced(&mut self, id: usize, dir: &str) {
        self.volatile
            .retain(|(i, name), _| *i != id || parent(name) != dir);
    }
}

/// The folder of `name` (`""` at the root).
fn parent(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(d, _)| d)
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected fault: {what}"))
}

fn off(name: &str) -> StoreError {
    StoreError::io("power is off:", name, eio("power loss"))
}

fn dir_sync_failed(name: &str) -> StoreError {
    StoreError::io("fsync directory of", name, eio("directory fsync failed"))
}

/// A local store with injected faults.
#[derive(Debug)]
pub struct FaultStore {
    inner: SharedStore,
    faults: Faults,
    /// This store's number in the handle.
    id: usize,
}

impl FaultStore {
    /// Wraps `inner`; `faults` arms the failures.
    pub fn new(inner: SharedStore, faults: Faults) -> Self {
        let id = {
            let mut s = faults.lock();
            s.stores.push(inner.clone());
            s.stores.len() - 1
        };
        FaultStore { inner, faults, id }
    }

    fn key(&self, name: &str) -> (usize, String) {
        (self.id, name.to_string())
    }

    /// The end of an operation that made a directory entry durable:
    /// counts the directory fsync, which may fail on purpose.
    /// Power goes during a change of `name`: it reached the disk or not
    /// (`apply` runs or not, a coin toss), then everything stops. Returns
    /// the error the change fails with.
    fn lose_power_during(
        &self,
        name: &str,
        op: &str,
        apply: impl FnOnce() -> Result<()>,
    ) -> Result<StoreError> {
        let done = self.faults.pick(2) == 0;
        let torn = if done {
            apply().map(|()| "reached the disk")
        } else {
            Ok("did not reach the disk")
        };
        self.faults.power_off_after(name, op, torn)?;
        Ok(off(name))
    }

    fn dir_sync(&self, name: &str, undo: Option<Volatile>) -> Result<()> {
        let mut s = self.faults.lock();
        if s.dir_sync_fails() {
            if let Some(v) = undo {
                // An earlier undo of the same name stays the one to apply.
                s.volatile.entry(self.key(name)).or_insert(v);
            }
            return Err(dir_sync_failed(name));
        }
        s.dir_synced(self.id, parent(name));
        Ok(())
    }
}

impl Store for FaultStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self, name: &str) -> Result<Box<dyn Appender>> {
        self.faults.tick_as(name, true)?;
        let inner = self.inner.create(name)?;
        self.faults.lock().files.insert(
            self.key(name),
            FileState {
                synced: 0,
                entry: false,
            },
        );
        Ok(Box::new(FaultAppender {
            inner: Some(inner),
            key: self.key(name),
            faults: self.faults.clone(),
        }))
    }
    fn append_to(&self, name: &str, len: u64) -> Result<Box<dyn Appender>> {
        self.faults.tick_as(name, true)?;
        let inner = self.inner.append_to(name, len)?;
        self.faults
            .lock()
            .files
            .entry(self.key(name))
            .and_modify(|f| f.synced = f.synced.min(len))
            .or_insert(FileState {
                synced: len,
                entry: true,
            });
        Ok(Box::new(FaultAppender {
            inner: Some(inner),
            key: self.key(name),
            faults: self.faults.clone(),
        }))
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.faults.tick(name)?;
        if let Some(p) = &self.faults.lock().read_error
            && name.contains(p.as_str())
        {
            return Err(StoreError::io("read", name, eio("read error")));
        }
        self.inner.read_at(name, offset, buf)
    }
    fn will_need(&self, name: &str, offset: u64, len: u64) {
        self.inner.will_need(name, offset, len);
    }
    fn write_at(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<()> {
        if self.faults.begin_change(name)? {
            self.torn_write_at(name, offset, bytes)?;
            return Err(off(name));
        }
        let existed = self.inner.size(name)?.is_some();
        self.inner.write_at(name, offset, bytes)?;
        if let Some(f) = self.faults.lock().files.get_mut(&self.key(name)) {
            f.synced = f.synced.max(offset + bytes.len() as u64);
            f.entry = true;
        }
        if !existed {
            self.dir_sync(name, Some(Volatile::Put(None)))?;
        }
        Ok(())
    }
    fn size(&self, name: &str) -> Result<Option<u64>> {
        self.faults.tick(name)?;
        self.inner.size(name)
    }
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        if self.faults.begin_change(name)? {
            self.torn_put(name, bytes)?;
            return Err(off(name));
        }
        let old = if self.faults.dir_sync_armed() {
            self.inner.get(name)?
        } else {
            None
        };
        self.inner.put(name, bytes)?;
        self.dir_sync(name, Some(Volatile::Put(old)))
    }
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.faults.tick(name)?;
        self.inner.get(name)
    }
    fn list(&self, dir: &str) -> Result<Vec<String>> {
        self.faults.tick(dir)?;
        self.inner.list(dir)
    }
    fn delete(&self, name: &str) -> Result<bool> {
        if self.faults.begin_change(name)? {
            return Err(self.lose_power_during(name, "delete", || {
                self.faults.lock().files.remove(&self.key(name));
                self.inner.delete(name).map(drop)
            })?);
        }
        let content = if self.faults.dir_sync_armed() {
            self.inner.get(name)?
        } else {
            None
        };
        self.faults.lock().files.remove(&self.key(name));
        let existed = self.inner.delete(name)?;
        if existed {
            self.dir_sync(name, content.map(Volatile::Delete))?;
        }
        Ok(existed)
    }
    fn link(&self, name: &str, from: &std::path::Path) -> Result<bool> {
        if self.faults.begin_change(name)? {
            return Err(
                self.lose_power_during(name, "link", || self.inner.link(name, from).map(drop))?
            );
        }
        if !self.inner.link(name, from)? {
            return Ok(false);
        }
        // The source was fsynced before the link: every byte is durable,
        // the entry once the directory is.
        let synced = self.inner.size(name)?.unwrap_or(0);
        self.faults.lock().files.insert(
            self.key(name),
            FileState {
                synced,
                entry: true,
            },
        );
        // A failed directory fsync may lose the new entry; the link goes
        // again, as LocalStore's does.
        if let Err(e) = self.dir_sync(name, Some(Volatile::Put(None))) {
            self.faults.lock().files.remove(&self.key(name));
            let _ = self.inner.delete(name);
            return Err(e);
        }
        Ok(true)
    }
    fn truncate(&self, name: &str, len: u64) -> Result<()> {
        if self.faults.begin_change(name)? {
            return Err(self.lose_power_during(name, "truncate", || {
                self.inner.truncate(name, len).map(drop)
            })?);
        }
        self.inner.truncate(name, len)?;
        if let Some(f) = self.faults.lock().files.get_mut(&self.key(name)) {
            f.synced = f.synced.min(len);
        }
        Ok(())
    }
    fn punch(&self, name: &str, offset: u64, len: u64) -> Result<bool> {
        if self.faults.begin_change(name)? {
            return Err(self.lose_power_during(name, "punch", || {
                self.inner.punch(name, offset, len).map(drop)
            })?);
        }
        self.inner.punch(name, offset, len)
    }
    fn forget(&self) {
        self.inner.forget();
    }
    fn space(&self) -> Option<SpaceInfo> {
        self.inner.space()
    }
}
