//! The vault writer lock: one writer per vault, across processes.
//!
//! An advisory `flock` on `VAULT/lock`, which also records the holder's pid
//! so that a second writer can be told who is in the way. The kernel drops
//! the lock when the holder dies, so a `kill -9` never leaves a stale lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};

/// File name of the lock inside a vault.
pub const LOCK_FILE: &str = "lock";

/// A held writer lock; released on drop.
#[derive(Debug)]
pub struct VaultLock {
    _file: File,
    path: PathBuf,
}

impl VaultLock {
    /// Takes the writer lock of the vault in `vault_dir`, or fails at once
    /// with [`StoreError::VaultLocked`] naming the holder's pid.
    pub fn acquire(vault_dir: &Path) -> Result<Self> {
        let path = vault_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let pid = holder.trim().to_string();
                return Err(StoreError::VaultLocked {
                    path: vault_dir.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::io("lock", &path, e)),
        }
        let record = format!("{}\n", std::process::id());
        (|| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(record.as_bytes())
        })()
        .map_err(|e| StoreError::io("write", &path, e))?;
        Ok(VaultLock { _file: file, path })
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = VaultLock::acquire(dir.path()).unwrap();
        match VaultLock::acquire(dir.path()) {
            Err(StoreError::VaultLocked { pid, .. }) => {
                assert_eq!(pid, std::process::id().to_string())
            }
            other => panic!("expected VaultLocked, got {other:?}"),
        }
        drop(held);
        VaultLock::acquire(dir.path()).unwrap();
    }
}
