//! One live backup per QEMU monitor on this host at a time.
//!
//! A live backup holds its monitor from the drive's lookup until its point
//! in time is released (QEMU serves one client per `-qmp` socket, and has
//! one NBD server), and removes what a killed run left there: a second
//! run on the same monitor must not start meanwhile. So each run takes an
//! advisory `flock` on `<lock dir>/<32 hex of BLAKE3(canonical socket
//! path)>.lock` first, and a second run fails at once naming the holder
//! (written in the file) instead of waiting for the monitor. Every drive
//! of that monitor is covered: two drives of one VM cannot be backed up
//! through one monitor at once anyway. The kernel drops the lock of a run
//! that dies (`kill -9` included); the file is removed by its holder on
//! release.
//!
//! The lock dir ([`lock_dir`]) is private to the user: `/run/coffre/qmp`
//! for root, else `$XDG_RUNTIME_DIR/coffre/qmp`, else
//! `$TMPDIR/coffre-<uid>/qmp`; a folder there that is not the user's
//! alone (0700) is refused.

use std::fs::{File, TryLockError};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Result, SnapError};

/// The most bytes of a holder's description read back.
const MAX_HOLDER: u64 = 512;

/// A held monitor lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct MonitorLock {
    file: File,
    path: PathBuf,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Where the monitor locks of this user are.
pub fn lock_dir() -> PathBuf {
    if euid() == 0 {
        return PathBuf::from("/run/coffre/qmp");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("coffre").join("qmp"),
        _ => std::env::temp_dir()
            .join(format!("coffre-{}", euid()))
            .join("qmp"),
    }
}

/// The lock file of monitor `socket`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
    let h = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
    lock_dir().join(format!("{}.lock", h.get(..32).unwrap_or_default()))
}

/// Creates `dir` (0700) and checks that it, and the `coffre…` folder
/// above it, are this user's alone.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    coffre_vault_store::store::local::private::create_dir_all(dir)?;
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let meta = std::fs::symlink_metadata(d)?;
        if !meta.is_dir() || meta.uid() != euid() || meta.mode() & 0o077 != 0 {
            return Err(std::io::Error::other(format!(
                "{} is not a folder private to uid {} (owner {}, mode {:o}): refused",
                d.display(),
                euid(),
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

impl MonitorLock {
    /// Takes the lock of monitor `socket`, recording `holder` in it; fails
    /// at once, naming the holder, when another run has it.
    pub fn acquire(socket: &Path, holder: &str) -> Result<MonitorLock> {
        let path = lock_path(socket);
        let fail = |reason: String| SnapError::Qmp {
            socket: socket.to_path_buf(),
            reason,
        };
        let dir = path.parent().unwrap_or(Path::new("/"));
        private_dir(dir).map_err(|e| fail(format!("cannot use the lock folder: {e}")))?;
        for _ in 0..8 {
            let mut file = coffre_vault_store::store::local::private::open_options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| fail(format!("cannot open lock {}: {e}", path.display())))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut who = String::new();
                    let _ = (&mut file).take(MAX_HOLDER).read_to_string(&mut who);
                    let who = super::json_lines::shown(who.trim());
                    return Err(fail(format!(
                        "another coffre backup is using this QEMU monitor ({}; lock {}): one live backup per monitor at a time, try again when it is done",
                        if who.is_empty() {
                            "holder unknown"
                        } else {
                            &who
                        },
                        path.display()
                    )));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(fail(format!("cannot lock {}: {e}", path.display())));
                }
            }
            // The holder before removed the file once done: a lock on the
            // file it removed is no lock; take the new one.
            let same = match (file.metadata(), std::fs::symlink_metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            let written = file
                .set_len(0)
                .and_then(|()| file.write_all(format!("{holder}\n").as_bytes()));
            if let Err(e) = written {
                return Err(fail(format!("cannot write lock {}: {e}", path.display())));
            }
            return Ok(MonitorLock { file, path });
        }
        Err(fail(format!(
            "lock {} keeps changing under coffre: refused",
            path.display()
        )))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MonitorLock {
    fn drop(&mut self) {
        // Removed while still held: a run that opens it now finds it gone
        // once it has the lock, and takes a new file.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
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
