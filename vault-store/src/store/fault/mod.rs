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

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Appender, SharedStore, SpaceInfo, Store};
use crate::error::{Result, StoreError};

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

/// The temporary name a torn `put` leaves behind (as
/// [`crate::store::local::durable::write_atomic`] names its own).
fn tmp_name(name: &str) -> String {
    match name.rsplit_once('/') {
        Some((d, f)) => format!("{d}/.{f}.tmp-0"),
        None => format!(".{name}.tmp-0"),
    }
}

/// The switchboard of a [`FaultStore`]; clone it to arm faults from a test.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    state: Arc<Mutex<State>>,
}

impl Faults {
    fn lock(&self) -> MutexGuard<'_, State> {
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
    fn dir_sync_armed(&self) -> bool {
        let s = self.lock();
        s.fail_dir_sync_at.is_some_and(|n| n > s.dir_syncs)
    }

    /// Counts an operation. `Ok(true)`: power goes out during this one
    /// (the caller tears it, then calls [`Faults::power_off`]).
    fn begin(&self, name: &str) -> Result<bool> {
        let mut s = self.lock();
        if s.off {
            return Err(off(name));
        }
        s.ops += 1;
        Ok(s.power_loss_at.is_some_and(|at| s.ops >= at))
    }

    /// Like [`Faults::begin`] for an operation that changes a file.
    fn begin_change(&self, name: &str) -> Result<bool> {
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

    /// Counts an operation that changes nothing when torn.
    fn tick(&self, name: &str) -> Result<()> {
        self.tick_as(name, false)
    }

    /// [`Faults::tick`], counting a change when `change`.
    fn tick_as(&self, name: &str, change: bool) -> Result<()> {
        let torn = if change {
            self.begin_change(name)?
        } else {
            self.begin(name)?
        };
        if torn {
            self.power_off(name, "not done");
            return Err(off(name));
        }
        Ok(())
    }

    fn pick(&self, n: u64) -> u64 {
        self.lock().below(n)
    }

    /// The power goes out: whatever was not durable is dropped, on every
    /// store. `name` was the torn operation's, left as `outcome`.
    fn power_off(&self, name: &str, outcome: &str) {
        let (stores, files, volatile) = {
            let mut s = self.lock();
            s.off = true;
            s.torn = Some(format!("{name}: {outcome}"));
            (
                s.stores.clone(),
                std::mem::take(&mut s.files),
                std::mem::take(&mut s.volatile),
            )
        };
        for ((id, file), f) in files {
            let Some(store) = stores.get(id) else {
                continue;
            };
            let now = store.size(&file).ok().flatten().unwrap_or(0);
            let unsynced = now.saturating_sub(f.synced);
            // The kernel may have written any prefix of the rest back.
            let kept = f.synced.min(now) + self.pick(unsynced + 1);
            let _ = if !f.entry && self.pick(2) == 0 {
                store.delete(&file).map(|_| ())
            } else {
                store.truncate(&file, kept)
            };
        }
        for ((id, file), v) in volatile {
            let Some(store) = stores.get(id) else {
                continue;
            };
            if self.pick(2) == 0 {
                continue; // the change had reached the disk after all
            }
            let _ = match v {
                Volatile::Put(Some(old)) | Volatile::Delete(old) => store.put(&file, &old),
                Volatile::Put(None) => store.delete(&file).map(|_| ()),
            };
        }
        for s in &stores {
            s.forget();
        }
    }
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

    fn torn_put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let existed = self.inner.size(name)?.is_some();
        let unordered = self.faults.lock().unordered_renames;
        let part = bytes
            .get(..self.faults.pick(bytes.len() as u64 + 1) as usize)
            .unwrap_or_default();
        let outcome = match self.faults.pick(if unordered { 4 } else { 3 }) {
            0 => "the old content",
            1 => {
                self.inner.put(&tmp_name(name), part)?;
                "the old content and a partial temporary file"
            }
            2 => {
                self.inner.put(name, bytes)?;
                "the new content"
            }
            _ => {
                self.inner.put(name, part)?;
                if existed {
                    "a partial file replacing the old content"
                } else {
                    "a partial new file"
                }
            }
        };
        self.faults.power_off(name, &format!("put left {outcome}"));
        Ok(())
    }

    fn torn_write_at(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<()> {
        let existed = self.inner.size(name)?.is_some();
        if !existed && self.faults.pick(2) == 0 {
            self.faults
                .power_off(name, "write_at of a new file: the file is gone");
            return Ok(());
        }
        let mut sectors = 0;
        for (i, sector) in bytes.chunks(512).enumerate() {
            if self.faults.pick(2) == 0 {
                self.inner
                    .write_at(name, offset + (i as u64) * 512, sector)?;
                sectors += 1;
            }
        }
        self.faults.power_off(
            name,
            &format!(
                "write_at: {sectors} of {} sectors written",
                bytes.len().div_ceil(512)
            ),
        );
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
            let done = self.faults.pick(2) == 0;
            if done {
                self.faults.lock().files.remove(&self.key(name));
                self.inner.delete(name)?;
            }
            self.faults.power_off(
                name,
                if done {
                    "delete reached the disk"
                } else {
                    "delete did not reach the disk"
                },
            );
            return Err(off(name));
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
    fn truncate(&self, name: &str, len: u64) -> Result<()> {
        if self.faults.begin_change(name)? {
            let done = self.faults.pick(2) == 0;
            if done {
                self.inner.truncate(name, len)?;
            }
            self.faults.power_off(
                name,
                if done {
                    "truncate reached the disk"
                } else {
                    "truncate did not reach the disk"
                },
            );
            return Err(off(name));
        }
        self.inner.truncate(name, len)?;
        if let Some(f) = self.faults.lock().files.get_mut(&self.key(name)) {
            f.synced = f.synced.min(len);
        }
        Ok(())
    }
    fn punch(&self, name: &str, offset: u64, len: u64) -> Result<bool> {
        if self.faults.begin_change(name)? {
            let done = self.faults.pick(2) == 0;
            if done {
                self.inner.punch(name, offset, len)?;
            }
            self.faults.power_off(
                name,
                if done {
                    "punch reached the disk"
                } else {
                    "punch did not reach the disk"
                },
            );
            return Err(off(name));
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

struct FaultAppender {
    /// `None` once power was lost: the buffered bytes die with it.
    inner: Option<Box<dyn Appender>>,
    key: (usize, String),
    faults: Faults,
}

impl FaultAppender {
    /// Drops the wrapped appender without flushing what it buffered, as a
    /// machine that lost power would.
    fn lose(&mut self) {
        if let Some(inner) = self.inner.take() {
            std::mem::forget(inner);
        }
    }

    fn inner(&mut self) -> Result<&mut Box<dyn Appender>> {
        let name = self.key.1.clone();
        self.inner.as_mut().ok_or_else(|| off(&name))
    }

    /// Counts an operation that changes nothing when torn.
    fn tick(&mut self) -> Result<&mut Box<dyn Appender>> {
        let name = self.key.1.clone();
        let torn = match self.faults.begin_change(&name) {
            Ok(t) => t,
            Err(e) => {
                self.lose();
                return Err(e);
            }
        };
        if torn {
            self.lose();
            self.faults.power_off(&name, "not done");
            return Err(off(&name));
        }
        self.inner()
    }

    /// Power goes out during a sync: nothing of it, the data but not a new
    /// file's entry, or all of it reached the disk.
    fn torn_sync(&mut self) -> Result<()> {
        let name = self.key.1.clone();
        let outcome = self.faults.pick(3);
        let mut what = "sync did not reach the disk";
        if outcome > 0 {
            let inner = self.inner()?;
            inner.sync()?;
            let len = inner.len();
            let mut s = self.faults.lock();
            let f = s.files.entry(self.key.clone()).or_insert(FileState {
                synced: 0,
                entry: false,
            });
            f.synced = len;
            if outcome == 2 {
                f.entry = true;
                what = "sync reached the disk, unacknowledged";
            } else {
                what = "sync wrote the data, not a new file's entry";
            }
        }
        self.lose();
        self.faults.power_off(&name, what);
        Err(off(&name))
    }
}

impl Appender for FaultAppender {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let name = self.key.1.clone();
        let faults = self.faults.clone();
        let inner = self.tick()?;
        let (short, budget) = {
            let mut s = faults.lock();
            s.appends += 1;
            let short = s.short_write_at == Some(s.appends);
            let budget = s.space_left;
            if let Some(left) = s.space_left.as_mut() {
                *left = left.saturating_sub(bytes.len() as u64);
            }
            (short, budget)
        };
        if short {
            inner.append(bytes.get(..bytes.len() / 2).unwrap_or_default())?;
            return Err(StoreError::io("write", name, eio("short write")));
        }
        if let Some(left) = budget
            && left < bytes.len() as u64
        {
            inner.append(bytes.get(..left as usize).unwrap_or_default())?;
            return Err(StoreError::io(
                "write",
                name,
                io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        inner.append(bytes)
    }
    fn start_writeback(&mut self) -> Result<()> {
        self.tick()?.start_writeback()
    }
    fn sync(&mut self) -> Result<()> {
        let name = self.key.1.clone();
        match self.faults.begin_change(&name) {
            Err(e) => {
                self.lose();
                return Err(e);
            }
            Ok(true) => return self.torn_sync(),
            Ok(false) => {}
        }
        let faults = self.faults.clone();
        let key = self.key.clone();
        let inner = self.inner()?;
        let fail = {
            let mut s = faults.lock();
            s.syncs += 1;
            let fail = s.fail_sync_at == Some(s.syncs);
            if fail {
                s.failed_syncs += 1;
            }
            fail
        };
        if fail {
            return Err(StoreError::io("fsync", name, eio("fsync failed")));
        }
        inner.sync()?;
        let len = inner.len();
        let mut s = faults.lock();
        let new_entry = s.files.get(&key).is_some_and(|f| !f.entry);
        // A new file's first sync fsyncs its directory too.
        let dir_failed = new_entry && s.dir_sync_fails();
        if new_entry && !dir_failed {
            s.dir_synced(key.0, parent(&key.1));
        }
        s.files.insert(
            key,
            FileState {
                synced: len,
                entry: !dir_failed,
            },
        );
        if dir_failed {
            return Err(dir_sync_failed(&name));
        }
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.len())
    }
}

impl Drop for FaultAppender {
    fn drop(&mut self) {
        if self.faults.is_off() {
            self.lose();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn stores(seed: u64) -> (tempfile::TempDir, SharedStore, FaultStore, Faults) {
        let t = tempfile::tempdir().unwrap();
        let inner: SharedStore = Arc::new(LocalStore::new(t.path()));
        let faults = Faults::default();
        faults.seed(seed);
        let f = FaultStore::new(inner.clone(), faults.clone());
        (t, inner, f, faults)
    }

    /// Every outcome of a torn `put` is the old or the new content (plus,
    /// at most, a temporary file), never a mix, unless renames are
    /// unordered.
    #[test]
    fn a_torn_put_leaves_the_old_or_the_new_content() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let (_t, inner, f, faults) = stores(seed);
            f.put("state/x", b"old content").unwrap();
            faults.power_loss_at(1);
            assert!(f.put("state/x", b"the new content").is_err());
            assert!(faults.is_off());
            assert!(f.get("state/x").is_err(), "the power is off");
            let now = inner.get("state/x").unwrap().unwrap();
            assert!(
                now == b"old content" || now == b"the new content",
                "seed {seed}: {:?}",
                String::from_utf8_lossy(&now)
            );
            let tmp = inner.list("state").unwrap().len() == 2;
            seen.insert((now == b"old content", tmp));
        }
        assert_eq!(seen.len(), 3, "outcomes seen: {seen:?}");
        let mut partial = false;
        for seed in 0..64 {
            let (_t, inner, f, faults) = stores(seed);
            faults.unordered_renames(true);
            faults.power_loss_at(1);
            assert!(f.put("y", b"0123456789").is_err());
            if let Some(b) = inner.get("y").unwrap() {
                partial |= b.len() < 10;
                assert_eq!(b, b"0123456789"[..b.len()]);
            }
        }
        assert!(partial, "no torn put left a partial file");
    }

    #[test]
    fn torn_removals_cuts_and_writes_are_done_or_not() {
        let (mut gone, mut kept, mut cut, mut sectors) = (0, 0, 0, 0);
        for seed in 0..32 {
            let (_t, inner, f, faults) = stores(seed);
            f.put("a", &[1u8; 4096]).unwrap();
            f.put("b", &[2u8; 4096]).unwrap();
            faults.power_loss_at(1);
            assert!(f.delete("a").is_err());
            match inner.get("a").unwrap() {
                None => gone += 1,
                Some(b) => {
                    assert_eq!(b, vec![1u8; 4096]);
                    kept += 1;
                }
            }
            let (_t, inner, f, faults) = stores(seed);
            f.put("b", &[2u8; 4096]).unwrap();
            faults.power_loss_at(1);
            assert!(f.truncate("b", 100).is_err());
            let len = inner.size("b").unwrap().unwrap();
            assert!(len == 100 || len == 4096);
            cut += u64::from(len == 100);
            let (_t, inner, f, faults) = stores(seed);
            f.put("c", &[3u8; 4096]).unwrap();
            faults.power_loss_at(1);
            assert!(f.write_at("c", 0, &[4u8; 4096]).is_err());
            let b = inner.get("c").unwrap().unwrap();
            for s in b.chunks(512) {
                assert!(s == [3u8; 512] || s == [4u8; 512], "a sector is torn");
                sectors += u64::from(s == [4u8; 512]);
            }
        }
        assert!(gone > 0 && kept > 0 && cut > 0 && cut < 32 && sectors > 0);
    }

    /// Unsynced appends are cut back (to any prefix), on every store of
    /// the handle at once; a file never synced may vanish.
    #[test]
    fn power_loss_drops_what_no_sync_covered_on_every_store() {
        let mut vanished = 0;
        for seed in 0..32 {
            let (t, inner, f, faults) = stores(seed);
            let inner2: SharedStore = Arc::new(LocalStore::new(t.path().join("copy2")));
            let f2 = FaultStore::new(inner2.clone(), faults.clone());
            for (st, inn) in [(&f, &inner), (&f2, &inner2)] {
                let mut a = st.create("seg").unwrap();
                a.append(&[7u8; 1000]).unwrap();
                a.sync().unwrap();
                a.append(&[8u8; 1000]).unwrap();
                a.sync().unwrap();
                drop(a);
                let mut a = st.append_to("seg", 2000).unwrap();
                a.append(&[9u8; 3000]).unwrap();
                a.start_writeback().unwrap();
                let _ = inn;
                std::mem::forget(a);
                let mut n = st.create("new").unwrap();
                n.append(&[1u8; 10]).unwrap();
                std::mem::forget(n);
            }
            faults.power_loss_at(1);
            assert!(f.size("seg").is_err());
            for inn in [&inner, &inner2] {
                let len = inn.size("seg").unwrap().unwrap();
                assert!((2000..=5000).contains(&len), "{len}");
                vanished += u64::from(inn.size("new").unwrap().is_none());
            }
        }
        assert!(vanished > 0);
    }

    #[test]
    fn a_failed_directory_fsync_fails_the_operation_and_may_be_undone() {
        let mut undone = 0;
        for seed in 0..16 {
            let (_t, inner, f, faults) = stores(seed);
            f.put("d/x", b"old").unwrap();
            faults.fail_dir_sync_at(1);
            let e = f.put("d/x", b"new").unwrap_err();
            assert!(e.to_string().contains("directory fsync"), "{e}");
            assert_eq!(faults.failed_dir_syncs(), 1);
            faults.power_loss_at(1);
            assert!(f.get("d/x").is_err());
            undone += u64::from(inner.get("d/x").unwrap().unwrap() == b"old");
        }
        assert!(undone > 0 && undone < 16, "{undone}");
        // A later directory fsync of the same folder makes it durable.
        let (_t, inner, f, faults) = stores(1);
        f.put("e/x", b"old").unwrap();
        faults.fail_dir_sync_at(1);
        assert!(f.put("e/x", b"new").is_err());
        f.put("e/y", b"other").unwrap();
        faults.power_loss_at(1);
        assert!(f.get("e/x").is_err());
        assert_eq!(inner.get("e/x").unwrap().unwrap(), b"new");
    }
}
