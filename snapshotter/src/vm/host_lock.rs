//! Host-wide locks of coffre runs: one `flock`ed file per thing a run must
//! have alone on this host, whichever vault or registry the run works for.
//! Three kinds use it: a QEMU monitor socket ([`LockKind::Monitor`], through
//! [`super::monitor_lock`]), a libvirt domain ([`LockKind::Domain`],
//! through [`super::libvirt::lock`]) and a live restore's target
//! ([`LockKind::Live`], through [`super::stream::TargetLock`]). This module owns what they share:
//! where the locks are, the checks of their folders and files, the lock
//! itself, and the holder line written in it and read back.
//!
//! - **Where.** coffre's runtime folder ([`runtime_dir`]): `/run/coffre`
//!   as root (when `/run` is a folder), else `$XDG_RUNTIME_DIR/coffre`
//!   (when that is an absolute path to a folder), else
//!   `$TMPDIR/coffre-<uid>`; a lock of kind K is
//!   `<runtime dir>/<K's folder>/<key>.lock` ([`lock_dir`]: `qmp`,
//!   `libvirt`, `live`). The caller names the key (a hash, a UUID): 1 to 64 ASCII
//!   letters, digits and `-`, else refused.
//! - **Folders.** Both folders are created 0700 (one at a time, never a
//!   missing parent) and refused when a symlink, not a folder, another
//!   user's, or open to the group or others ([`private_dir`]).
//! - **File.** Opened with `O_NOFOLLOW` (a symlink planted there is never
//!   followed), created 0600, and refused unless a regular file of the
//!   effective user's with no group or other permission.
//! - **Lock.** An exclusive `flock`, tried twice: a second run fails
//!   ([`Refused::Held`]) instead of waiting, after the holder's line is
//!   read (up to 100 ms for a holder that has not written it yet) and one
//!   more try 50 ms later when it was there at once (a daemon's look,
//!   [`HostLock::is_held`], holds a shared lock for an instant). The lock belongs to the open
//!   file, so the kernel frees a dead run's (`kill -9` included): nothing
//!   is ever stale. A kind whose files are removed on release
//!   ([`LockKind::Monitor`]) removes it while still holding it; a run that
//!   finds, once it holds the lock, that its file is no longer the one at
//!   the path takes the new one (at most 8 times, then refused).
//! - **Holder.** The holder writes one line saying who it is (control
//!   characters shown as `?`, at most [`MAX_HOLDER_CHARS`] characters); a
//!   refused run reads at most [`MAX_HOLDER_BYTES`] back, takes only a
//!   whole first line (waiting twice 50 ms for a holder that has the lock
//!   but has not written it yet), and shows it the same way: the file is
//!   not trusted.

use std::fs::{File, TryLockError};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use coffre_vault_store::store::local::private;

/// The most bytes of a lock file read back for its holder line.
pub const MAX_HOLDER_BYTES: u64 = 512;
/// The most characters of a holder line written, and shown.
pub const MAX_HOLDER_CHARS: usize = 200;
/// The longest key a lock file is named after.
const MAX_KEY: usize = 64;
/// How many times a lock file replaced under a run is taken again.
const REOPENS: usize = 8;
/// How long a run that finds its lock held waits before its second try
/// (a look at the lock lasts no longer than a try).
const LOOK: std::time::Duration = std::time::Duration::from_millis(50);

/// What a host lock is of: each kind has its folder in [`runtime_dir`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A QEMU monitor socket: `qmp/`, the file removed on release.
    Monitor,
    /// A libvirt domain: `libvirt/`, the file kept.
    Domain,
    /// A live restore's target: `live/` (beside its export's socket), the
    /// file removed on release.
    Live,
}

impl LockKind {
    /// The kind's folder in [`runtime_dir`].
    pub fn folder(self) -> &'static str {
        match self {
            LockKind::Monitor => "qmp",
            LockKind::Domain => "libvirt",
            LockKind::Live => "live",
        }
    }

    /// Whether the holder removes the lock file when it releases it.
    fn removed_on_release(self) -> bool {
        matches!(self, LockKind::Monitor | LockKind::Live)
    }
}

/// Why a lock was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Another process (or another open file of this one) holds it.
    Held {
        /// The holder's line, sanitised; `None` when the file has no whole
        /// line yet.
        holder: Option<String>,
        /// The lock file.
        path: PathBuf,
    },
    /// The lock cannot be used: its folder or file is refused, or a system
    /// call failed. The reason names the path and the problem.
    Unusable(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Held { holder, path } => write!(
                f,
                "lock {} is held by {}",
                path.display(),
                holder.as_deref().unwrap_or("an unknown holder")
            ),
            Refused::Unusable(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for Refused {}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// coffre's private runtime folder (not created): `/run/coffre` as root,
/// else `$XDG_RUNTIME_DIR/coffre` (when it is an absolute path to a
/// folder), else `$TMPDIR/coffre-UID`.
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

/// The folder of the locks of `kind` (not created).
pub fn lock_dir(kind: LockKind) -> PathBuf {
    runtime_dir().join(kind.folder())
}

/// [`lock_dir`] of `kind`, with it and [`runtime_dir`] made private
/// ([`private_dir`]).
pub fn private_lock_dir(kind: LockKind) -> Result<PathBuf, String> {
    let base = runtime_dir();
    private_dir(&base)?;
    let dir = base.join(kind.folder());
    private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (mode 0700) when missing (not its parents), and checks it
/// is a folder of the effective user's that nobody else can enter: not a
/// symlink, owned by the effective user, no group or other permission.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    match std::fs::DirBuilder::new()
        .mode(private::DIR_MODE)
        .create(dir)
    {
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
    if private::is_shared(meta.mode()) {
        return Err(format!(
            "lock folder {} is open to other users (mode {:o}); make it 0700",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Checks an open lock file: a regular file of the effective user's, with
/// no group or other permission.
fn check_lock_file(file: &File, path: &Path) -> Result<(), String> {
    let meta = file
        .metadata()
        .map_err(|e| format!("lock file {}: {e}", path.display()))?;
    if !meta.is_file() || meta.uid() != euid() || private::is_shared(meta.mode()) {
        return Err(format!(
            "lock file {} is not a regular file of this user's alone (owner {}, mode {:o}); remove it",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// True for a key a lock file may be named after.
fn is_key(key: &str) -> bool {
    (1..=MAX_KEY).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `s` made fit to write or show: control characters (a newline
/// included) as `?`, at most [`MAX_HOLDER_CHARS`] characters.
pub fn sanitised(s: &str) -> String {
    s.chars()
        .take(MAX_HOLDER_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The holder line of a lock file: its first whole line (one that ends in
/// a newline within [`MAX_HOLDER_BYTES`]), sanitised and trimmed; `None`
/// when there is none, or it is empty.
fn whole_line(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == b'\n')?;
    let line = sanitised(String::from_utf8_lossy(&bytes[..end]).trim());
    (!line.is_empty()).then_some(line)
}

/// Reads the holder line of `file` (at most [`MAX_HOLDER_BYTES`]), waiting
/// twice 50 ms for a holder that has the lock but has not written it yet.
fn holder_of(file: &File) -> Option<String> {
    for attempt in 0..3 {
        let mut buf = vec![0u8; MAX_HOLDER_BYTES as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], got as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        if let Some(line) = whole_line(&buf[..got]) {
            return Some(line);
        }
        if attempt < 2 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    None
}

/// A held host lock; released on drop (its file removed first when its
/// kind says so).
#[derive(Debug)]
pub struct HostLock {
    file: File,
    path: PathBuf,
    remove: bool,
}

impl HostLock {
    /// Takes the lock `key` of `kind` in [`private_lock_dir`], writing
    /// `holder` in it; fails with [`Refused::Held`], without waiting for it, when another
    /// holds it.
    pub fn acquire(kind: LockKind, key: &str, holder: &str) -> Result<HostLock, Refused> {
        let dir = private_lock_dir(kind).map_err(Refused::Unusable)?;
        Self::acquire_in(&dir, kind, key, holder)
    }

    /// [`HostLock::acquire`] with the lock in `dir` (made private, its
    /// parent not checked).
    pub fn acquire_in(
        dir: &Path,
        kind: LockKind,
        key: &str,
        holder: &str,
    ) -> Result<HostLock, Refused> {
        let fail = Refused::Unusable;
        if !is_key(key) {
            return Err(fail(format!(
                "lock key {:?} is not 1 to {MAX_KEY} ASCII letters, digits or '-': refused",
                sanitised(key)
            )));
        }
        private_dir(dir).map_err(fail)?;
        let path = dir.join(format!("{key}.lock"));
        let line = format!("{}\n", sanitised(holder));
        for _ in 0..REOPENS {
            let file = private::open_options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| fail(format!("cannot open lock file {}: {e}", path.display())))?;
            check_lock_file(&file, &path).map_err(fail)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let holder = holder_of(&file);
                    // Perhaps no run at all but a look ([`HostLock::is_held`]'s
                    // shared lock, held for no longer than a try), on a file
                    // with no line or a dead run's: tried once more, after
                    // [`LOOK`] when a line was read at once. Only the flock
                    // decides; the line is shown.
                    if holder.is_some() {
                        std::thread::sleep(LOOK);
                    }
                    match file.try_lock() {
                        Ok(()) => {}
                        Err(TryLockError::WouldBlock) => {
                            return Err(Refused::Held { holder, path });
                        }
                        Err(TryLockError::Error(e)) => {
                            return Err(fail(format!("cannot lock {}: {e}", path.display())));
                        }
                    }
                }
                Err(TryLockError::Error(e)) => {
                    return Err(fail(format!("cannot lock {}: {e}", path.display())));
                }
            }
            // The holder before removed the file once done: a lock on the
            // file it removed is no lock; take the new one.
            if !private::is_same_file(&path, &file) {
                continue;
            }
            file.set_len(0)
                .and_then(|()| file.write_all_at(line.as_bytes(), 0))
                .map_err(|e| fail(format!("cannot write lock file {}: {e}", path.display())))?;
            return Ok(HostLock {
                file,
                path,
                remove: kind.removed_on_release(),
            });
        }
        Err(fail(format!(
            "lock file {} keeps changing under coffre: refused",
            path.display()
        )))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True while a run holds the lock `key` of `kind`. Only looks: the
    /// file is opened read-only if it is there (`O_NOFOLLOW`, checked as
    /// [`HostLock::acquire`] checks it), never created, written or
    /// removed; a shared lock tried once tells (held for no longer than
    /// the try).
    pub fn is_held(kind: LockKind, key: &str) -> Result<bool, String> {
        if !is_key(key) {
            return Err(format!("lock key {:?} is not a key", sanitised(key)));
        }
        let path = private_lock_dir(kind)?.join(format!("{key}.lock"));
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(format!("cannot open lock file {}: {e}", path.display())),
        };
        check_lock_file(&file, &path)?;
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                Ok(false)
            }
            Err(TryLockError::WouldBlock) => Ok(true),
            Err(TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

impl Drop for HostLock {
    fn drop(&mut self) {
        if self.remove {
            // Removed while still held: a run that opens it now finds it
            // gone once it has the lock, and takes a new file.
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn held(r: Result<HostLock, Refused>) -> (Option<String>, PathBuf) {
        match r {
            Err(Refused::Held { holder, path }) => (holder, path),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_lock_holder_line_is_one_bounded_sanitised_line() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("locks");
        let long = format!("pid 7\n\u{1b}[2J{}", "x".repeat(1000));
        let first = HostLock::acquire_in(&dir, LockKind::Domain, "k1", &long).unwrap();
        let text = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text:?}");
        assert!(
            text.starts_with("pid 7??[2Jx") && text.ends_with("x\n"),
            "{text:?}"
        );
        assert_eq!(text.chars().count(), MAX_HOLDER_CHARS + 1);
        let (holder, path) = held(HostLock::acquire_in(&dir, LockKind::Domain, "k1", "b"));
        assert_eq!(holder.as_deref(), Some(text.trim_end()));
        assert_eq!(path, first.path());
        // What another wrote there is read back bounded and sanitised.
        std::fs::write(&path, "evil\u{7}\u{1b}]0;x\nsecond line\n").unwrap();
        let (holder, _) = held(HostLock::acquire_in(&dir, LockKind::Domain, "k1", "b"));
        assert_eq!(holder.as_deref(), Some("evil??]0;x"));
        std::fs::write(&path, vec![b'y'; 4096]).unwrap();
        let (holder, _) = held(HostLock::acquire_in(&dir, LockKind::Domain, "k1", "b"));
        assert_eq!(holder, None);
        // A Domain lock's file stays on release, a Monitor lock's goes.
        drop(first);
        assert!(path.exists());
        let m = HostLock::acquire_in(&dir, LockKind::Monitor, "k2", "m").unwrap();
        let mp = m.path().to_path_buf();
        drop(m);
        assert!(!mp.exists());
    }

    #[test]
    fn host_lock_a_look_is_no_holder() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("locks");
        private_dir(&dir).unwrap();
        let path = dir.join("k.lock");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A look (`is_held`'s shared lock, no holder line) that ends while
        // a run waits for the holder's line: the run takes the lock.
        let look = File::open(&path).unwrap();
        look.try_lock_shared().unwrap();
        let ends = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            look.unlock().unwrap();
        });
        let run = HostLock::acquire_in(&dir, LockKind::Live, "k", "run").unwrap();
        ends.join().unwrap();
        // A run that holds it is refused to the next, named.
        let (holder, _) = held(HostLock::acquire_in(&dir, LockKind::Live, "k", "b"));
        assert_eq!(holder.as_deref(), Some("run"));
        drop(run);
        // The same with a dead run's line left in the file (kill -9).
        std::fs::write(&path, "pid 1, a killed run\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let look = File::open(&path).unwrap();
        look.try_lock_shared().unwrap();
        let ends = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            look.unlock().unwrap();
        });
        let run = HostLock::acquire_in(&dir, LockKind::Live, "k", "run2").unwrap();
        ends.join().unwrap();
        drop(run);
    }

    #[test]
    fn host_lock_key_and_file_must_be_safe() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("locks");
        for bad in ["", "../x", "a/b", ".", "a.b", &"a".repeat(65)] {
            match HostLock::acquire_in(&dir, LockKind::Domain, bad, "h") {
                Err(Refused::Unusable(r)) => assert!(r.contains("lock key"), "{r}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // A lock file open to others is refused, not used.
        private_dir(&dir).unwrap();
        let path = dir.join("open.lock");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        match HostLock::acquire_in(&dir, LockKind::Domain, "open", "h") {
            Err(Refused::Unusable(r)) => assert!(r.contains("not a regular file"), "{r}"),
            other => panic!("{other:?}"),
        }
        // A folder where the file should be is refused.
        std::fs::create_dir(dir.join("d.lock")).unwrap();
        assert!(matches!(
            HostLock::acquire_in(&dir, LockKind::Domain, "d", "h"),
            Err(Refused::Unusable(_))
        ));
    }

    #[test]
    fn host_lock_dirs_are_per_kind_in_the_runtime_dir() {
        assert_eq!(lock_dir(LockKind::Monitor), runtime_dir().join("qmp"));
        assert_eq!(lock_dir(LockKind::Domain), runtime_dir().join("libvirt"));
        if euid() == 0 && Path::new("/run").is_dir() {
            assert_eq!(runtime_dir(), Path::new("/run/coffre"));
        }
    }
}
