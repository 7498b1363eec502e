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
use std::path::Path;

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
}
