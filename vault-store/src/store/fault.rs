//! [`FaultStore`]: a store (usually a [`super::LocalStore`]) that fails on
//! purpose, for tests.
//!
//! A shared [`Faults`] handle arms the faults:
//! - the n-th fsync fails (`EIO`), as a dying disk does;
//! - the n-th append is short: half of it is written, then `EIO`;
//! - appends fail with `ENOSPC` once a byte budget is spent;
//! - reads of names containing a pattern fail with `EIO`;
//! - **power loss** at the n-th operation: every byte not yet made durable
//!   by a sync is dropped (files are cut to their synced length; files
//!   whose directory entry was never synced vanish), and from then on every
//!   operation fails, as on a machine that is off. A test then reopens the
//!   vault with a fresh store over the same directory.
//!
//! Only appended data is ever unsynced: every other operation of
//! [`Store`] is durable when it returns, so power loss keeps it.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Appender, SharedStore, SpaceInfo, Store};
use crate::error::{Result, StoreError};

#[derive(Debug, Default)]
struct State {
    ops: u64,
    power_loss_at: Option<u64>,
    off: bool,
    syncs: u64,
    fail_sync_at: Option<u64>,
    failed_syncs: u64,
    appends: u64,
    short_write_at: Option<u64>,
    space_left: Option<u64>,
    read_error: Option<String>,
    /// name → (synced length, directory entry synced)
    files: HashMap<String, (u64, bool)>,
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
    /// Power goes out at operation number `n` (counted from now, 1-based).
    pub fn power_loss_at(&self, n: u64) {
        let mut s = self.lock();
        s.power_loss_at = Some(s.ops + n);
    }
    /// The `n`-th fsync from now fails.
    pub fn fail_sync_at(&self, n: u64) {
        let mut s = self.lock();
        s.fail_sync_at = Some(s.syncs + n);
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
}

/// A local store with injected faults.
#[derive(Debug)]
pub struct FaultStore {
    inner: SharedStore,
    faults: Faults,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected fault: {what}"))
}

impl FaultStore {
    /// Wraps `inner`; `faults` arms the failures.
    pub fn new(inner: SharedStore, faults: Faults) -> Self {
        FaultStore { inner, faults }
    }

    /// Counts an operation; fails when the power is (or just went) off.
    fn tick(&self, name: &str) -> Result<()> {
        let mut s = self.faults.lock();
        if s.off {
            return Err(StoreError::io("power is off:", name, eio("power loss")));
        }
        s.ops += 1;
        if s.power_loss_at.is_some_and(|at| s.ops >= at) {
            let files = std::mem::take(&mut s.files);
            s.off = true;
            drop(s);
            for (file, (synced, entry)) in files {
                let _ = if entry {
                    self.inner.truncate(&file, synced)
                } else {
                    self.inner.delete(&file).map(|_| ())
                };
            }
            return Err(StoreError::io("power is off:", name, eio("power loss")));
        }
        Ok(())
    }
}

impl Store for FaultStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self, name: &str) -> Result<Box<dyn Appender>> {
        self.tick(name)?;
        let inner = self.inner.create(name)?;
        self.faults
            .lock()
            .files
            .insert(name.to_string(), (0, false));
        Ok(Box::new(FaultAppender {
            inner: Some(inner),
            name: name.to_string(),
            faults: self.faults.clone(),
            store: self.inner.clone(),
        }))
    }
    fn append_to(&self, name: &str, len: u64) -> Result<Box<dyn Appender>> {
        self.tick(name)?;
        let inner = self.inner.append_to(name, len)?;
        self.faults
            .lock()
            .files
            .entry(name.to_string())
            .and_modify(|f| f.0 = f.0.min(len))
            .or_insert((len, true));
        Ok(Box::new(FaultAppender {
            inner: Some(inner),
            name: name.to_string(),
            faults: self.faults.clone(),
            store: self.inner.clone(),
        }))
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.tick(name)?;
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
        self.tick(name)?;
        self.inner.write_at(name, offset, bytes)?;
        if let Some(f) = self.faults.lock().files.get_mut(name) {
            f.0 = f.0.max(offset + bytes.len() as u64);
            f.1 = true;
        }
        Ok(())
    }
    fn size(&self, name: &str) -> Result<Option<u64>> {
        self.tick(name)?;
        self.inner.size(name)
    }
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.tick(name)?;
        self.inner.put(name, bytes)
    }
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.tick(name)?;
        self.inner.get(name)
    }
    fn list(&self, dir: &str) -> Result<Vec<String>> {
        self.tick(dir)?;
        self.inner.list(dir)
    }
    fn delete(&self, name: &str) -> Result<bool> {
        self.tick(name)?;
        self.faults.lock().files.remove(name);
        self.inner.delete(name)
    }
    fn truncate(&self, name: &str, len: u64) -> Result<()> {
        self.tick(name)?;
        self.inner.truncate(name, len)?;
        if let Some(f) = self.faults.lock().files.get_mut(name) {
            f.0 = f.0.min(len);
        }
        Ok(())
    }
    fn punch(&self, name: &str, offset: u64, len: u64) -> Result<bool> {
        self.tick(name)?;
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
    name: String,
    faults: Faults,
    store: SharedStore,
}

impl FaultAppender {
    fn tick(&mut self) -> Result<&mut Box<dyn Appender>> {
        let s = FaultStore {
            inner: self.store.clone(),
            faults: self.faults.clone(),
        };
        let r = s.tick(&self.name);
        if r.is_err()
            && let Some(inner) = self.inner.take()
        {
            // Never flush what a machine that lost power had buffered.
            std::mem::forget(inner);
        }
        r?;
        self.inner
            .as_mut()
            .ok_or_else(|| StoreError::io("write", &self.name, eio("power loss")))
    }
}

impl Appender for FaultAppender {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let name = self.name.clone();
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
        let name = self.name.clone();
        let faults = self.faults.clone();
        let inner = self.tick()?;
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
        faults.lock().files.insert(name, (len, true));
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.len())
    }
}

impl Drop for FaultAppender {
    fn drop(&mut self) {
        if self.faults.is_off()
            && let Some(inner) = self.inner.take()
        {
            std::mem::forget(inner);
        }
    }
}
