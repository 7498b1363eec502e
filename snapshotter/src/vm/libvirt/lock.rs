//! The host-wide lock of one domain: one coffre run at a time backs a
//! domain up on this host, whichever vault or registry it works for (two
//! vaults, or a manual backup while the daemon runs). Without it, one
//! run's clean-up of what a killed run left (the thaw, the stale job, the
//! checkpoints no point names) could thaw the other run's guest between
//! its freeze and its instant, or delete the checkpoint it just created.
//!
//! The lock is a host lock ([`crate::vm::host_lock`], kind
//! [`LockKind::Domain`]): an exclusive `flock` on a file in `libvirt/` of
//! coffre's private runtime folder (`/run/coffre` as root, else
//! `$XDG_RUNTIME_DIR/coffre`, else `$TMPDIR/coffre-UID`; both folders
//! 0700 and checked, the file opened with `O_NOFOLLOW` and kept on
//! release). This module owns its name and its errors: the file is
//! `<UUID>.lock` after the domain's UUID (one domain reached through two
//! connection URIs is one domain), or `<16 hex of BLAKE3(URI, name)>.lock`
//! when libvirt gives none; it holds `pid N`. The lock belongs to the open
//! file, so a run that is killed frees it: nothing is ever stale. A second
//! run fails at once ([`SnapError::DomainInUse`], naming the domain and
//! the holder's pid).

use std::path::Path;

use super::domain::Domain;
use crate::error::{Result, SnapError};
use crate::vm::host_lock::{HostLock, LockKind, Refused};

/// A held lock of a domain; dropping it frees the lock.
#[derive(Debug)]
pub struct DomainLock(HostLock);

/// The lock key of a domain: its UUID, else 16 hex of BLAKE3(URI NUL name).
fn lock_key(connect: &str, name: &str, uuid: Option<&str>) -> String {
    match uuid {
        Some(u) => u.to_string(),
        None => {
            let h = blake3::hash(format!("{connect}\0{name}").as_bytes()).to_hex();
            h.get(..16).unwrap_or_default().to_string()
        }
    }
}

/// `pid N` when the holder's line says so, else `pid unknown`.
fn holder_pid(line: Option<&str>) -> String {
    match line
        .and_then(|l| l.strip_prefix("pid "))
        .and_then(|p| p.parse::<u32>().ok())
    {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".into(),
    }
}

impl DomainLock {
    /// Takes the lock of `domain` (whose UUID is `uuid`, when known) in
    /// coffre's private `libvirt/` lock folder, or fails at once with
    /// [`SnapError::DomainInUse`] when another process holds it.
    pub fn acquire(domain: &Domain, uuid: Option<&str>) -> Result<DomainLock> {
        let key = lock_key(&domain.connect, &domain.name, uuid);
        Self::map(
            domain,
            HostLock::acquire(LockKind::Domain, &key, &pid_line()),
        )
    }

    /// [`DomainLock::acquire`] with the locks in `dir`.
    pub fn acquire_in(dir: &Path, domain: &Domain, uuid: Option<&str>) -> Result<DomainLock> {
        let key = lock_key(&domain.connect, &domain.name, uuid);
        Self::map(
            domain,
            HostLock::acquire_in(dir, LockKind::Domain, &key, &pid_line()),
        )
    }

    fn map(domain: &Domain, taken: std::result::Result<HostLock, Refused>) -> Result<DomainLock> {
        taken.map(DomainLock).map_err(|refused| match refused {
            Refused::Held { holder, path } => SnapError::DomainInUse {
                domain: domain.name.clone(),
                connect: domain.connect.clone(),
                holder: holder_pid(holder.as_deref()),
                lock: path,
            },
            Refused::Unusable(reason) => SnapError::Libvirt {
                domain: domain.name.clone(),
                reason,
            },
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

fn pid_line() -> String {
    format!("pid {}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::host_lock::{euid, private_dir};
    use std::os::unix::fs::MetadataExt;

    fn dom(name: &str) -> Domain {
        Domain {
            connect: "qemu:///system".into(),
            name: name.into(),
        }
    }

    #[test]
    fn libvirt_lock_is_exclusive_per_domain_and_freed_on_drop() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("locks");
        let uuid = Some("341684dd-8397-44b2-8de7-2c99e058d012");
        let held = DomainLock::acquire_in(&dir, &dom("web1"), uuid).unwrap();
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::read_to_string(held.path()).unwrap(),
            format!("pid {}\n", std::process::id())
        );
        // flock is per open file: a second open in this process conflicts
        // as another process's would.
        match DomainLock::acquire_in(&dir, &dom("web1-renamed"), uuid) {
            Err(SnapError::DomainInUse { holder, lock, .. }) => {
                assert_eq!(holder, format!("pid {}", std::process::id()));
                assert_eq!(lock, held.path());
            }
            other => panic!("{other:?}"),
        }
        // Another domain is another lock.
        let other = DomainLock::acquire_in(&dir, &dom("web2"), None).unwrap();
        assert_ne!(other.path(), held.path());
        let path = held.path().to_path_buf();
        drop(held);
        // The file stays; the lock is free.
        assert!(path.exists());
        DomainLock::acquire_in(&dir, &dom("web1"), uuid).unwrap();
        // What the holder's file says is only ever shown as a pid.
        assert_eq!(holder_pid(Some("pid 12")), "pid 12");
        assert_eq!(holder_pid(Some("pid 12; rm -rf")), "pid unknown");
        assert_eq!(holder_pid(None), "pid unknown");
    }

    #[test]
    fn libvirt_lock_folder_must_be_private_and_ours() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(private_dir(&link).unwrap_err().contains("symlink"));
        private_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            private_dir(&real)
                .unwrap_err()
                .contains("open to other users")
        );
        if euid() == 0 {
            std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&real, Some(65534), Some(65534)).unwrap();
            assert!(private_dir(&real).unwrap_err().contains("uid 65534"));
        }
        // A lock file that is a symlink is not followed.
        let dir = t.path().join("locks");
        private_dir(&dir).unwrap();
        let target = t.path().join("elsewhere");
        std::fs::write(&target, "keep").unwrap();
        let name = format!("{}.lock", lock_key("qemu:///system", "w", None));
        std::os::unix::fs::symlink(&target, dir.join(name)).unwrap();
        assert!(DomainLock::acquire_in(&dir, &dom("w"), None).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
