//! [`FaultAppender`]: an appender that counts its operations, fails its
//! appends and syncs on purpose, and loses what it buffered at power loss.

use std::io;

use super::{Faults, FileState, dir_sync_failed, eio, off, parent};
use crate::error::{Result, StoreError};
use crate::store::Appender;

pub(super) struct FaultAppender {
    /// `None` once power was lost: the buffered bytes die with it.
    pub(super) inner: Option<Box<dyn Appender>>,
    pub(super) key: (usize, String),
    pub(super) faults: Faults,
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
        // The power goes off whatever the tear meets (a failing sync
        // too): nothing may run on with the power half gone.
        let torn = (|| {
            if outcome == 0 {
                return Ok("did not reach the disk");
            }
            let inner = self.inner()?;
            inner.sync()?;
            let len = inner.len();
            let mut s = self.faults.lock();
            let f = s.files.entry(self.key.clone()).or_insert(FileState {
                synced: 0,
                entry: false,
            });
            f.synced = len;
            Ok(if outcome == 2 {
                f.entry = true;
                "reached the disk, unacknowledged"
            } else {
                "wrote the data, not a new file's entry"
            })
        })();
        self.lose();
        self.faults.power_off_after(&name, "sync", torn)?;
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
