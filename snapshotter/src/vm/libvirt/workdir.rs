//! The private folder of one pull-mode backup, and its safe removal.
//!
//! `$TMPDIR/coffre-libvirt-PID-16HEX` (the outer folder) belongs to the
//! user coffre runs as, mode 0711: it holds the request XML coffre writes
//! (`backup.xml`, `checkpoint.xml`, mode 0600) and one subfolder, `q`
//! (mode 0700), the only thing handed to the user QEMU runs as: QEMU
//! creates the NBD socket (`q/nbd.sock`) and the scratch files
//! (`q/TARGET.scratch`) there. QEMU's user can do what it likes inside `q`
//! but cannot rename, replace or add anything in the outer folder, nor
//! (in a sticky `/tmp`) the outer folder itself.
//!
//! A live restore into a domain (`restore --live --domain`) has a folder
//! of its own, `$TMPDIR/coffre-libvirt-live-16HEX` ([`live`]), named after
//! the target (not after the run: a resumed run serves the same socket,
//! which the target's header names). It is the same outer folder (0711,
//! coffre's user's) without the subfolder: coffre, not QEMU, makes the
//! export's socket there (`nbd.sock`), and hands the socket itself to
//! QEMU's user ([`hand_to_qemu`], mode 0600): QEMU's user can reach it and
//! nobody else, and coffre never works in a folder another user controls.
//!
//! Removal ([`remove`]) is what a root-run clean-up does with a folder a
//! killed run left, so it trusts nothing it finds: the folder must be
//! directly under the temporary directory, carry a work folder's name, not
//! be a symlink and belong to the effective user; it is opened with
//! `O_NOFOLLOW` and everything in it is removed by name relative to the
//! opened descriptors (`unlinkat`, which never follows a symlink), only
//! the names coffre and libvirt put there. A folder holding anything else
//! is left, with the reason.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Result, SnapError};

/// The prefix of a backup's outer folder.
pub const PREFIX: &str = "coffre-libvirt-";

/// The subfolder handed to QEMU's user.
pub const QEMU_DIR: &str = "q";

/// The request files coffre writes in the outer folder.
pub const REQUESTS: [&str; 2] = ["backup.xml", "checkpoint.xml"];

/// The NBD socket's name in [`QEMU_DIR`] (in a live restore's folder: in
/// the folder itself).
pub const SOCKET: &str = "nbd.sock";

/// The prefix of a live restore's folder, before 16 hex digits.
pub const LIVE_PREFIX: &str = "coffre-libvirt-live-";

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A new backup folder under `tmp`, named after this process: the outer
/// folder (0711) and its [`QEMU_DIR`] (0700), handed to `qemu_user` (uid,
/// gid) when given and coffre runs as root. Returns the outer folder.
pub fn create(tmp: &Path, qemu_user: Option<(u32, u32)>) -> Result<PathBuf> {
    let mut last = None;
    for attempt in 0..16u64 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tag = blake3::hash(format!("{seed}-{}-{attempt}", std::process::id()).as_bytes());
        let dir = tmp.join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            &tag.to_hex()[..16]
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                passable(&dir)?;
                let inner = dir.join(QEMU_DIR);
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&inner)
                    .map_err(|e| SnapError::write(&inner, e))?;
                if euid() == 0
                    && let Some((uid, gid)) = qemu_user
                {
                    std::os::unix::fs::lchown(&inner, Some(uid), Some(gid))
                        .map_err(|e| SnapError::write(&inner, e))?;
                }
                return Ok(dir);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(SnapError::write(
        tmp,
        last.unwrap_or_else(|| std::io::Error::other("no attempt")),
    ))
}

/// Makes the folder just created `dir` mode 0711 whatever the umask:
/// QEMU's user passes through it, and lists nothing. Set through the
/// folder, opened without following a link.
fn passable(dir: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o711)))
        .map_err(|e| SnapError::write(dir, e))
}

/// True for a live restore's folder name (`coffre-libvirt-live-16 hex`).
fn is_live_name(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(LIVE_PREFIX))
        .is_some_and(|tag| tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The folder of the live restore tagged `tag` (16 hex digits) under
/// `tmp`: made (0711), or, when an earlier run left it, checked: a folder,
/// not a symlink, the effective user's, mode 0711. The export's socket is
/// [`SOCKET`] in it.
pub fn live(tmp: &Path, tag: &str) -> Result<PathBuf> {
    let dir = tmp.join(format!("{LIVE_PREFIX}{tag}"));
    let refuse = |why: String| {
        SnapError::write(
            &dir,
            std::io::Error::other(format!(
                "{why}: not a live restore's folder coffre made; remove it if it is stale"
            )),
        )
    };
    if !is_live_name(&dir) {
        return Err(refuse(format!("{tag:?} is not 16 hex digits")));
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => passable(&dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(&dir).map_err(|e| SnapError::write(&dir, e))?;
            if m.file_type().is_symlink() || !m.is_dir() {
                return Err(refuse("a symlink or not a folder".into()));
            }
            if m.uid() != euid() {
                return Err(refuse(format!("it belongs to uid {}", m.uid())));
            }
            if m.mode() & 0o7777 != 0o711 {
                return Err(refuse(format!("its mode is {:o}", m.mode() & 0o7777)));
            }
        }
        Err(e) => return Err(SnapError::write(&dir, e)),
    }
    Ok(dir)
}

/// Hands the socket coffre just bound at `socket` to QEMU's user (uid,
/// gid), when given and coffre runs as root; its mode stays 0600. The
/// socket itself is changed, never what a link points to.
pub fn hand_to_qemu(socket: &Path, qemu_user: Option<(u32, u32)>) -> Result<()> {
    if euid() == 0
        && let Some((uid, gid)) = qemu_user
    {
        std::os::unix::fs::lchown(socket, Some(uid), Some(gid))
            .map_err(|e| SnapError::write(socket, e))?;
    }
    Ok(())
}

/// Writes a request file `name` (mode 0600, a new file) in the outer
/// folder `dir`; returns its path.
pub fn write_request(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| SnapError::write(&path, e))?;
    Ok(path)
}

/// The pid a work folder's name carries (`coffre-libvirt-PID-16 hex`).
pub fn owner_pid(dir: &Path) -> Option<u32> {
    let name = dir.file_name()?.to_str()?;
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, tag) = rest.split_once('-')?;
    if tag.len() != 16 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok()
}

/// The outer folder of a backup whose NBD socket is `socket`: the
/// socket's folder's parent when that folder is [`QEMU_DIR`], else (a
/// folder of an older coffre, which handed the whole folder to QEMU's
/// user) the socket's folder; `None` when it does not carry a work
/// folder's name.
pub fn outer_of(socket: &Path) -> Option<(PathBuf, u32)> {
    let folder = socket.parent()?;
    let outer = if folder.file_name().is_some_and(|n| n == QEMU_DIR) {
        folder.parent()?
    } else {
        folder
    };
    owner_pid(outer).map(|pid| (outer.to_path_buf(), pid))
}

fn cstr(s: &str) -> CString {
    // The names here are coffre's constants and checked disk targets: no
    // NUL in them.
    CString::new(s).unwrap_or_default()
}

fn open_dir_at(dirfd: libc::c_int, name: &CString) -> std::io::Result<OwnedFd> {
    // SAFETY: openat with a valid descriptor (or AT_FDCWD) and a
    // NUL-terminated name; the descriptor returned is owned here.
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes the entry `name` of the folder `dir` (a folder itself with
/// `AT_REMOVEDIR`); a missing one is not an error.
fn unlink_at(dir: &OwnedFd, name: &str, flags: libc::c_int) -> std::io::Result<()> {
    let c = cstr(name);
    // SAFETY: unlinkat with a descriptor we own and a NUL-terminated name;
    // it removes a symlink itself, never what it points to.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Removes the backup folder `outer` (directly under `tmp`) and what
/// coffre and libvirt put in it for the disks `targets`; refuses (and
/// touches nothing) when `outer` is not directly under `tmp`, has no work
/// folder's name, is a symlink, or is not the effective user's. A folder
/// holding anything else is left, with the reason.
pub fn remove(outer: &Path, tmp: &Path, targets: &[String]) -> std::result::Result<(), String> {
    let shown = outer.display();
    if outer.parent() != Some(tmp) {
        return Err(format!(
            "{shown} is not directly under the temporary directory {}",
            tmp.display()
        ));
    }
    if owner_pid(outer).is_none() && !is_live_name(outer) {
        return Err(format!("{shown} is not named as coffre's work folders are"));
    }
    let meta = std::fs::symlink_metadata(outer).map_err(|e| format!("{shown}: {e}"))?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(format!("{shown} is a symlink or not a folder"));
    }
    if meta.uid() != euid() {
        return Err(format!(
            "{shown} belongs to uid {}, not to this user (uid {})",
            meta.uid(),
            euid()
        ));
    }
    let path = CString::new(outer.as_os_str().as_bytes())
        .map_err(|_| format!("{shown} holds a NUL byte"))?;
    let dir = open_dir_at(libc::AT_FDCWD, &path).map_err(|e| format!("{shown}: {e}"))?;
    let opened = std::fs::File::from(dir.try_clone().map_err(|e| format!("{shown}: {e}"))?)
        .metadata()
        .map_err(|e| format!("{shown}: {e}"))?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) || opened.uid() != euid() {
        return Err(format!("{shown} changed while it was checked"));
    }
    let err = |what: &str, e: std::io::Error| format!("{shown}/{what}: {e}");
    match open_dir_at(dir.as_raw_fd(), &cstr(QEMU_DIR)) {
        Ok(inner) => {
            let mut names = vec![SOCKET.to_string()];
            names.extend(targets.iter().map(|t| format!("{t}.scratch")));
            for n in &names {
                unlink_at(&inner, n, 0).map_err(|e| err(&format!("{QEMU_DIR}/{n}"), e))?;
            }
            drop(inner);
            unlink_at(&dir, QEMU_DIR, libc::AT_REMOVEDIR).map_err(|e| {
                format!("{shown}/{QEMU_DIR} holds what coffre did not put there, left ({e})")
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(QEMU_DIR, e)),
    }
    // A live restore's socket is in the folder itself (so was an older
    // coffre's pull socket).
    for n in REQUESTS.into_iter().chain([SOCKET]) {
        unlink_at(&dir, n, 0).map_err(|e| err(n, e))?;
    }
    drop(dir);
    // rmdir does not follow a symlink put in the folder's place since.
    std::fs::remove_dir(outer)
        .map_err(|e| format!("{shown} holds what coffre did not put there, left ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "coffre-libvirt-12-0123456789abcdef";

    /// A work folder as a run leaves it, with a scratch "file" that is a
    /// symlink to `victim`.
    fn planted(tmp: &Path, victim: &Path) -> PathBuf {
        let outer = tmp.join(NAME);
        std::fs::create_dir_all(outer.join(QEMU_DIR)).unwrap();
        std::fs::write(outer.join("backup.xml"), "x").unwrap();
        std::fs::write(outer.join(QEMU_DIR).join(SOCKET), "").unwrap();
        std::os::unix::fs::symlink(victim, outer.join(QEMU_DIR).join("vda.scratch")).unwrap();
        outer
    }

    #[test]
    fn libvirt_work_folders_are_made_and_named_after_their_owner() {
        let t = tempfile::tempdir().unwrap();
        let d = create(t.path(), None).unwrap();
        assert_eq!(owner_pid(&d), Some(std::process::id()));
        assert_eq!(
            std::fs::metadata(&d).unwrap().mode() & 0o7777,
            0o711,
            "QEMU's user passes, lists nothing"
        );
        let q = std::fs::metadata(d.join(QEMU_DIR)).unwrap();
        assert_eq!(q.mode() & 0o7777, 0o700);
        let r = write_request(&d, "backup.xml", "<x/>").unwrap();
        assert_eq!(std::fs::metadata(&r).unwrap().mode() & 0o777, 0o600);
        assert!(
            write_request(&d, "backup.xml", "again").is_err(),
            "a new file"
        );
        assert_eq!(
            outer_of(&d.join(QEMU_DIR).join(SOCKET)),
            Some((d.clone(), std::process::id()))
        );
        remove(&d, t.path(), &[]).unwrap();
        assert!(!d.exists());
        for bad in [
            "/tmp/coffre-libvirt-12-abc",
            "/tmp/coffre-libvirt-x-0123456789abcdef",
            "/tmp/other-12-0123456789abcdef",
        ] {
            assert_eq!(owner_pid(Path::new(bad)), None, "{bad}");
        }
        let old = Path::new("/tmp/coffre-libvirt-12-0123456789abcdef/nbd.sock");
        assert_eq!(
            outer_of(old).map(|(_, p)| p),
            Some(12),
            "an older coffre's folder"
        );
        assert_eq!(outer_of(Path::new("/tmp/x/q/nbd.sock")), None);
    }

    #[test]
    fn libvirt_live_folders_are_stable_checked_and_removed() {
        let t = tempfile::tempdir().unwrap();
        let tag = "0123456789abcdef";
        let d = live(t.path(), tag).unwrap();
        assert_eq!(d, t.path().join(format!("{LIVE_PREFIX}{tag}")));
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o711);
        std::fs::write(d.join(SOCKET), "").unwrap();
        assert_eq!(live(t.path(), tag).unwrap(), d, "a resumed run's folder");
        hand_to_qemu(&d.join(SOCKET), None).unwrap();
        assert!(live(t.path(), "../x").is_err());
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = live(t.path(), tag).unwrap_err().to_string();
        assert!(e.contains("mode is 777"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        remove(&d, t.path(), &[]).unwrap();
        assert!(!d.exists());
        // A symlink in its place is refused, and what it points to kept.
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, &d).unwrap();
        assert!(
            live(t.path(), tag)
                .unwrap_err()
                .to_string()
                .contains("symlink")
        );
        assert!(real.exists());
        if euid() == 0 {
            std::fs::remove_file(&d).unwrap();
            let d = live(t.path(), tag).unwrap();
            std::fs::write(d.join(SOCKET), "").unwrap();
            hand_to_qemu(&d.join(SOCKET), Some((65534, 65534))).unwrap();
            assert_eq!(std::fs::metadata(d.join(SOCKET)).unwrap().uid(), 65534);
        }
    }

    #[test]
    fn libvirt_work_folder_removal_follows_no_symlink() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let outer = planted(t.path(), &victim);
        remove(&outer, t.path(), &["vda".to_string()]).unwrap();
        assert!(!outer.exists());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

        // Something QEMU's user left in its subfolder: the rest goes, the
        // subfolder stays, and the error says why.
        let outer = planted(t.path(), &victim);
        std::fs::write(outer.join(QEMU_DIR).join("other"), "").unwrap();
        let e = remove(&outer, t.path(), &["vda".to_string()]).unwrap_err();
        assert!(e.contains("did not put there"), "{e}");
        assert!(outer.join(QEMU_DIR).join("other").exists());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn libvirt_work_folder_removal_refuses_what_is_not_ours() {
        let t = tempfile::tempdir().unwrap();
        let tmp = t.path();
        let victim = tmp.join("victim");
        std::fs::write(&victim, "precious").unwrap();

        // Nested: not directly under the temporary directory.
        let sub = tmp.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let nested = planted(&sub, &victim);
        let e = remove(&nested, tmp, &["vda".into()]).unwrap_err();
        assert!(e.contains("not directly under"), "{e}");
        assert!(nested.join("backup.xml").exists());

        // A symlink in the folder's place, to a folder with the same names.
        let real = sub.join("real");
        std::fs::create_dir_all(real.join(QEMU_DIR)).unwrap();
        std::fs::write(real.join("backup.xml"), "keep").unwrap();
        let link = tmp.join(NAME);
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = remove(&link, tmp, &["vda".into()]).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        assert_eq!(
            std::fs::read_to_string(real.join("backup.xml")).unwrap(),
            "keep"
        );
        std::fs::remove_file(&link).unwrap();

        // Not a work folder's name.
        let other = tmp.join("coffre-libvirt-12-xyz");
        std::fs::create_dir(&other).unwrap();
        assert!(remove(&other, tmp, &[]).unwrap_err().contains("not named"));

        // Another user's (as QEMU's user would own it).
        if euid() == 0 {
            let outer = planted(tmp, &victim);
            std::os::unix::fs::lchown(&outer, Some(65534), Some(65534)).unwrap();
            let e = remove(&outer, tmp, &["vda".into()]).unwrap_err();
            assert!(e.contains("uid 65534"), "{e}");
            assert!(outer.join("backup.xml").exists());
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
