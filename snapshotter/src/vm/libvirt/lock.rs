//! The host-wide lock of one domain: one coffre run at a time backs a
//! domain up on this host, whichever vault or registry it works for (two
//! vaults, or a manual backup while the daemon runs). Without it, one
//! run's clean-up of what a killed run left (the thaw, the stale job, the
//! checkpoints no point names) could thaw the other run's guest between
//! its freeze and its instant, or delete the checkpoint it just created.
//!
//! The lock is an exclusive `flock` on a file in `libvirt/` of a private
//! folder owned by the effective user: `/run/coffre` as root, else
//! `$XDG_RUNTIME_DIR/coffre`, else `$TMPDIR/coffre-UID`; both folders are
//! created 0700 and refused when a symlink, another user's, or open to
//! others. The file is `<UUID>.lock` after the domain's UUID (one domain
//! reached through two connection URIs is one domain), or
//! `<16 hex of BLAKE3(URI, name)>.lock` when libvirt gives none;
//! it is opened with `O_NOFOLLOW` and holds the holder's pid. The lock
//! belongs to the open file, so a run that is killed frees it: nothing is
//! ever stale. A second run fails at once ([`SnapError::DomainInUse`],
//! naming the domain and the holder's pid).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::domain::Domain;
use crate::error::{Result, SnapError};

/// A held lock of a domain; dropping it frees the lock.
#[derive(Debug)]
pub struct DomainLock {
    // Held for its lock: closing it releases the flock.
    _file: File,
    path: PathBuf,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// coffre's private runtime folder (not created): `/run/coffre` as root,
/// else `$XDG_RUNTIME_DIR/coffre` (when it is an absolute path), else
/// `$TMPDIR/coffre-UID`.
pub fn runtime_dir() -> PathBuf {
    let uid = euid();
    if uid == 0 && Path::new("/run").is_dir() {
        return PathBuf::from("/run/coffre");
    }
    if uid != 0
        && let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && x.is_absolute()
        && x.is_dir()
    {
        return x.join("coffre");
    }
    std::env::temp_dir().join(format!("coffre-{uid}"))
}

/// The folder the domains' locks live in: `libvirt` in [`runtime_dir`],
/// both made private ([`private_dir`]).
pub fn lock_dir() -> std::result::Result<PathBuf, String> {
    let base = runtime_dir();
    private_dir(&base)?;
    let dir = base.join("libvirt");
    private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (mode 0700) when missing, and checks it is a folder of
/// the effective user's that nobody else can enter: not a symlink, owned
/// by the effective user, no group or other permission.
pub fn private_dir(dir: &Path) -> std::result::Result<(), String> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create lock folder {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("lock folder {}: {e}", dir.display()))?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(format!(
            "lock folder {} is a symlink or not a folder; remove it",
            dir.display()
        ));
    }
    if meta.uid() != euid() {
        return Err(format!(
            "lock folder {} belongs to uid {}, not to this user (uid {}); remove it",
            dir.display(),
            meta.uid(),
            euid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "lock folder {} is open to other users (mode {:o}); make it 0700",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The lock file's name for a domain.
fn lock_name(connect: &str, name: &str, uuid: Option<&str>) -> String {
    match uuid {
        Some(u) => format!("{u}.lock"),
        None => {
            let h = blake3::hash(format!("{connect}\0{name}").as_bytes()).to_hex();
            format!("{}.lock", &h[..16])
        }
    }
}

/// What a lock file says of its holder: `pid N`, or that it does not say.
fn holder(file: &mut File) -> String {
    for attempt in 0..3 {
        let mut buf = Vec::new();
        let _ = file.by_ref().take(64).read_to_end(&mut buf);
        let _ = std::io::Seek::rewind(file);
        let text = String::from_utf8_lossy(&buf);
        if let Some(pid) = text
            .trim()
            .strip_prefix("pid ")
            .and_then(|p| p.parse::<u32>().ok())
        {
            return format!("pid {pid}");
        }
        // The holder took the lock and has not written its pid yet.
        if attempt < 2 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    "pid unknown".into()
}

impl DomainLock {
    /// Takes the lock of `domain` (whose UUID is `uuid`, when known) in
    /// [`lock_dir`], or fails at once with [`SnapError::DomainInUse`] when
    /// another process holds it.
    pub fn acquire(domain: &Domain, uuid: Option<&str>) -> Result<DomainLock> {
        let dir = lock_dir().map_err(|reason| SnapError::Libvirt {
            domain: domain.name.clone(),
            reason,
        })?;
        Self::acquire_in(&dir, domain, uuid)
    }

    /// [`DomainLock::acquire`] with the locks in `dir`.
    pub fn acquire_in(dir: &Path, domain: &Domain, uuid: Option<&str>) -> Result<DomainLock> {
        let fail = |reason: String| SnapError::Libvirt {
            domain: domain.name.clone(),
            reason,
        };
        private_dir(dir).map_err(fail)?;
        let path = dir.join(lock_name(&domain.connect, &domain.name, uuid));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| fail(format!("cannot open lock file {}: {e}", path.display())))?;
        let meta = file
            .metadata()
            .map_err(|e| fail(format!("lock file {}: {e}", path.display())))?;
        if !meta.is_file() || meta.uid() != euid() {
            return Err(fail(format!(
                "lock file {} is not a regular file of this user's; remove it",
                path.display()
            )));
        }
        // SAFETY: flock on a descriptor `file` owns.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(SnapError::DomainInUse {
                    domain: domain.name.clone(),
                    connect: domain.connect.clone(),
                    holder: holder(&mut file),
                    lock: path,
                });
            }
            return Err(fail(format!("cannot lock {}: {e}", path.display())));
        }
        let pid = format!("pid {}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
            .map_err(|e| fail(format!("cannot write lock file {}: {e}", path.display())))?;
        Ok(DomainLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        drop(held);
        DomainLock::acquire_in(&dir, &dom("web1"), uuid).unwrap();
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
        std::os::unix::fs::symlink(&target, dir.join(lock_name("qemu:///system", "w", None)))
            .unwrap();
        assert!(DomainLock::acquire_in(&dir, &dom("w"), None).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
