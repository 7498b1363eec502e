//! Owner-only file modes for everything a vault keeps.
//!
//! A vault holds whole disks (passwords, keys, databases), so every
//! directory coffre creates for it is `0700` and every file `0600`,
//! whatever the process umask (a umask can only take bits away, never add
//! them, so asking for these modes is enough). Every create of vault state
//! goes through this module. RocksDB creates its own files inside the
//! `0700` index directory; the `coffre` binary also sets umask `077` so
//! that they are `0600` too.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every vault file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every vault directory.
pub const DIR_MODE: u32 = 0o700;
/// Permission bits that must be clear on vault files and directories.
pub const GROUP_OTHER_BITS: u32 = 0o077;

/// `OpenOptions` whose `create`/`create_new` make an owner-only file.
pub fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates `dir` and any missing parents as owner-only directories. An
/// existing directory keeps its mode.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Creates `dir` like [`create_dir_all`] and makes `dir` itself owner-only
/// even if it already existed (a vault root the user made beforehand).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    create_dir_all(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Creates a new owner-only file in `dir` named `.{stem}.{tag}-{pid}-{random}`
/// with `O_CREAT | O_EXCL | O_NOFOLLOW`: it never opens a file or follows
/// a symlink that someone planted there, and its name cannot be guessed
/// beforehand. Returns the open file and its path.
pub fn create_temp(dir: &Path, stem: &str, tag: &str) -> io::Result<(std::fs::File, PathBuf)> {
    for _ in 0..16 {
        let path = dir.join(format!(
            ".{stem}.{tag}-{}-{:016x}",
            std::process::id(),
            random_u64()?
        ));
        match create_new_nofollow(&path) {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free temporary name in {}", dir.display()),
    ))
}

/// Creates `path` as a new owner-only file, opened for reading and
/// writing, with `O_CREAT | O_EXCL | O_NOFOLLOW`: anything already there,
/// a symlink included (dangling or not), makes it fail with
/// `AlreadyExists` and is left untouched.
pub fn create_new_nofollow(path: &Path) -> io::Result<std::fs::File> {
    open_options()
        .write(true)
        .read(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// True when `path` (not followed if a symlink) is the very file `file`
/// is open on: same device and inode.
pub fn is_same_file(path: &Path, file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.file_type().is_file() && a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// 64 random bits from the kernel (`getrandom(2)`).
fn random_u64() -> io::Result<u64> {
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let n = unsafe {
            libc::getrandom(
                b[got..].as_mut_ptr().cast::<libc::c_void>(),
                b.len() - got,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    Ok(u64::from_le_bytes(b))
}

/// True when `mode` lets the group or others read, write or enter.
pub fn is_shared(mode: u32) -> bool {
    mode & GROUP_OTHER_BITS != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn files_and_directories_are_owner_only_even_over_a_shared_parent() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("v");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&root).unwrap();
        create_dir_all(&root.join("a/b")).unwrap();
        let mut f = open_options()
            .write(true)
            .create_new(true)
            .open(root.join("a/b/f"))
            .unwrap();
        f.write_all(b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("a")), 0o700);
        assert_eq!(mode(&root.join("a/b")), 0o700);
        assert_eq!(mode(&root.join("a/b/f")), 0o600);
        assert!(is_shared(0o640) && is_shared(0o701) && !is_shared(0o700));
    }

    #[test]
    fn temporary_files_are_new_private_and_never_follow_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let (a, pa) = create_temp(t.path(), "img", "part").unwrap();
        let (_b, pb) = create_temp(t.path(), "img", "part").unwrap();
        assert_ne!(pa, pb);
        assert!(is_same_file(&pa, &a) && !is_same_file(&pb, &a));
        let mode = std::fs::metadata(&pa).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A symlink is never "the same file", even to it.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&pa, &link).unwrap();
        assert!(!is_same_file(&link, &a));
        // A planted symlink, to a file or to nothing, is never followed.
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dangling = t.path().join("dangling");
        std::os::unix::fs::symlink(t.path().join("nothing"), &dangling).unwrap();
        for planted in [&link, &dangling] {
            let e = create_new_nofollow(planted).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        }
        std::os::unix::fs::symlink(&victim, link.with_extension("v")).unwrap();
        assert!(create_new_nofollow(&link.with_extension("v")).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!t.path().join("nothing").exists());
    }
}
