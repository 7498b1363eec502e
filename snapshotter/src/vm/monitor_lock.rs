//! One live backup per QEMU monitor on this host at a time.
//!
//! A live backup holds its monitor from the drive's lookup until its point
//! in time is released (QEMU serves one client per `-qmp` socket, and has
//! one NBD server), and removes what a killed run left there: a second
//! run on the same monitor must not start meanwhile. So each run takes the
//! host lock ([`super::host_lock`], kind [`LockKind::Monitor`]) named
//! `<32 hex of BLAKE3(canonical socket path)>.lock` first, and a second
//! run fails at once naming the holder (the line written in the file)
//! instead of waiting for the monitor. Every drive of that monitor is
//! covered: two drives of one VM cannot be backed up through one monitor
//! at once anyway. The kernel drops the lock of a run that dies (`kill -9`
//! included); the file is removed by its holder on release.
//!
//! This module owns the lock's name and its errors ([`SnapError::Qmp`]);
//! the folder ([`lock_dir`]: `qmp/` of coffre's private runtime folder,
//! `/run/coffre/qmp` for root), its checks and the lock itself are
//! [`super::host_lock`]'s.

use std::path::{Path, PathBuf};

use super::host_lock::{self, HostLock, LockKind, Refused};
use crate::error::{Result, SnapError};

/// A held monitor lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct MonitorLock(HostLock);

/// Where the monitor locks of this user are (not created); the NBD sockets
/// of live backups are there too.
pub fn lock_dir() -> PathBuf {
    host_lock::lock_dir(LockKind::Monitor)
}

/// The lock key of monitor `socket`: 32 hex digits of BLAKE3 of its
/// canonical path.
fn lock_key(socket: &Path) -> String {
    let canonical = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
    let h = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
    h.get(..32).unwrap_or_default().to_string()
}

/// The lock file of monitor `socket`.
pub fn lock_path(socket: &Path) -> PathBuf {
    lock_dir().join(format!("{}.lock", lock_key(socket)))
}

impl MonitorLock {
    /// Takes the lock of monitor `socket`, recording `holder` in it; fails
    /// at once, naming the holder, when another run has it.
    pub fn acquire(socket: &Path, holder: &str) -> Result<MonitorLock> {
        let fail = |reason: String| SnapError::Qmp {
            socket: socket.to_path_buf(),
            reason,
        };
        HostLock::acquire(LockKind::Monitor, &lock_key(socket), holder)
            .map(MonitorLock)
            .map_err(|refused| match refused {
                Refused::Held { holder, path } => fail(format!(
                    "another coffre run (a live backup or a live restore) is using this QEMU monitor ({}; lock {}): one at a time per monitor, try again when it is done",
                    holder.as_deref().unwrap_or("holder unknown"),
                    path.display()
                )),
                Refused::Unusable(reason) => fail(reason),
            })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_a_released_lock_is_free() {
        let t = tempfile::tempdir().unwrap();
        let socket = t.path().join("qmp.sock");
        let first = MonitorLock::acquire(&socket, "pid 1, job a").unwrap();
        assert!(first.path().starts_with(lock_dir()));
        assert_eq!(first.path(), lock_path(&socket));
        let e = MonitorLock::acquire(&socket, "pid 2, job b").unwrap_err();
        assert!(e.to_string().contains("pid 1, job a"), "{e}");
        let other = MonitorLock::acquire(&t.path().join("other.sock"), "x").unwrap();
        let path = first.path().to_path_buf();
        drop(first);
        assert!(!path.exists());
        let again = MonitorLock::acquire(&socket, "pid 3").unwrap();
        drop((again, other));
    }
}
