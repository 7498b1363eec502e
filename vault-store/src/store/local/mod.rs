//! [`LocalStore`]: a vault copy in a local directory.
//!
//! Files are created owner-only ([`crate::store::local::private`]); state files are
//! replaced through [`crate::store::local::durable::write_atomic`]; every removal and
//! every new file's entry is made durable with a directory fsync. Read
//! handles are cached and shared between threads.

pub mod direct;
mod dirs;
pub mod durable;
pub mod lock;
pub mod private;
pub mod read_ahead;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Appender, SpaceInfo, Store};
use crate::error::{Result, StoreError};
use crate::store::local::direct::DirectAppender;
use crate::store::local::durable::{create_dir_durable, fsync_dir, fsync_file, write_atomic};

/// A vault copy in a directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    files: Mutex<HashMap<String, Arc<File>>>,
}

impl LocalStore {
    /// A store rooted at `root` (which need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore {
            root: root.into(),
            files: Mutex::new(HashMap::new()),
        }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of `name`; names that would leave the root are refused.
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        let rel = Path::new(name);
        if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(StoreError::InvalidSetting {
                field: "store name",
                reason: format!("{name:?} is not a relative path inside the copy"),
            });
        }
        Ok(self.root.join(rel))
    }

    fn parent_dir(&self, path: &Path) -> Result<()> {
        match path.parent() {
            Some(dir) if !dir.is_dir() => create_dir_durable(dir),
            _ => Ok(()),
        }
    }

    fn handle(&self, name: &str) -> Result<Arc<File>> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(name) {
            return Ok(f.clone());
        }
        let path = self.path(name)?;
        let f = Arc::new(
            no_follow(OpenOptions::new().read(true))
                .open(&path)
                .map_err(|e| StoreError::io("open", &path, e))?,
        );
        files.insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn forget_one(&self, name: &str) {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Drops the cached handles of `name` and of everything under it.
    fn forget_under(&self, name: &str) {
        let prefix = format!("{name}/");
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n, _| n != name && !n.starts_with(&prefix));
    }
}

/// Links the open `file` at `dst` (`linkat` of `/proc/self/fd/N` with
/// `AT_SYMLINK_FOLLOW`): the inode this process holds, whatever its path
/// names now.
fn link_open_file(file: &File, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let src = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let dst = std::ffi::CString::new(dst.as_os_str().as_bytes())?;
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            src.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The most a whole-file read ([`Store::get`]) takes: files read whole
/// are catalog files, far smaller; a larger one is refused by its size
/// before any byte is read.
pub const MAX_WHOLE_FILE: u64 = 256 << 20;

/// Opens refuse a symbolic link as the last component (`O_NOFOLLOW`): a
/// vault's files are its own, never a link a crafted vault planted to
/// make coffre read or write a file elsewhere. Only the last component:
/// a vault whose `segments/` itself is a link is still followed (the
/// vault directory's owner made it; see ARCHITECTURE.md, trust). They
/// are non-blocking (`O_NONBLOCK`, no effect on regular files), so a
/// FIFO planted at a file's name fails instead of hanging the open.
fn no_follow(o: &mut OpenOptions) -> &mut OpenOptions {
    o.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
}

impl Store for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn create(&self, name: &str) -> Result<Box<dyn Appender>> {
        let path = self.path(name)?;
        self.parent_dir(&path)?;
        let file = crate::store::local::private::open_options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io("create", &path, e))?;
        Ok(Box::new(LocalAppender {
            out: DirectAppender::new(file, &path),
            path,
            new_file: true,
        }))
    }

    fn append_to(&self, name: &str, len: u64) -> Result<Box<dyn Appender>> {
        let path = self.path(name)?;
        let file = no_follow(OpenOptions::new().read(true).write(true))
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        let actual = file
            .metadata()
            .map_err(|e| StoreError::io("stat", &path, e))?
            .len();
        if actual < len {
            return Err(StoreError::SegmentTruncated {
                path,
                committed: len,
                actual,
            });
        }
        file.set_len(len)
            .map_err(|e| StoreError::io("truncate", &path, e))?;
        self.forget_one(name);
        let out = DirectAppender::resume(file, &path, len)
            .map_err(|e| StoreError::io("read", &path, e))?;
        Ok(Box::new(LocalAppender {
            out,
            path,
            new_file: false,
        }))
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.handle(name)?;
        f.read_exact_at(buf, offset).map_err(|e| {
            let path = self.path(name).unwrap_or_default();
            StoreError::io("read", path, e)
        })
    }

    fn will_need(&self, name: &str, offset: u64, len: u64) {
        if let Ok(f) = self.handle(name) {
            crate::store::local::read_ahead::will_need(&f, offset, len);
        }
    }

    fn write_at(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<()> {
        let path = self.path(name)?;
        self.parent_dir(&path)?;
        let existed = path.exists();
        let f = no_follow(
            crate::store::local::private::open_options()
                .write(true)
                .create(true)
                .truncate(false),
        )
        .open(&path)
        .map_err(|e| StoreError::io("open", &path, e))?;
        f.write_all_at(bytes, offset)
            .map_err(|e| StoreError::io("write", &path, e))?;
        fsync_file(&f, &path)?;
        if !existed && let Some(dir) = path.parent() {
            fsync_dir(dir)?;
        }
        self.forget_one(name);
        Ok(())
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path(name)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => Err(StoreError::io(
                "stat",
                &path,
                std::io::Error::other("a symbolic link where a vault file belongs (not followed)"),
            )),
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("stat", &path, e)),
        }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(name)?;
        self.parent_dir(&path)?;
        write_atomic(&path, bytes)
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(name)?;
        let file = match no_follow(OpenOptions::new().read(true)).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("read", &path, e)),
        };
        let too_big = || {
            StoreError::io(
                "read",
                &path,
                std::io::Error::other(format!(
                    "more than the {MAX_WHOLE_FILE} bytes a vault file read whole may be"
                )),
            )
        };
        match file.metadata() {
            Ok(m) if m.is_file() && m.len() > MAX_WHOLE_FILE => return Err(too_big()),
            Ok(m) if m.is_file() => {}
            _ => {
                return Err(StoreError::io(
                    "read",
                    &path,
                    std::io::Error::other("not a regular file"),
                ));
            }
        }
        let mut out = Vec::new();
        // Read one byte past the limit to tell a file at it from a larger one.
        let read = std::io::Read::read_to_end(
            &mut std::io::Read::take(&file, MAX_WHOLE_FILE + 1),
            &mut out,
        )
        .map_err(|e| StoreError::io("read", &path, e))?;
        // It may have grown since the stat.
        if read as u64 > MAX_WHOLE_FILE {
            return Err(too_big());
        }
        Ok(Some(out))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let path = if dir.is_empty() {
            self.root.clone()
        } else {
            self.path(dir)?
        };
        let entries = match fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io("read directory", &path, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("read directory", &path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            names.push(if is_dir { format!("{name}/") } else { name });
        }
        names.sort();
        Ok(names)
    }

    fn delete(&self, name: &str) -> Result<bool> {
        let path = self.path(name)?;
        self.forget_one(name);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    fsync_dir(dir)?;
                }
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("remove", &path, e)),
        }
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let src = self.path(from)?;
        let dst = self.path(to)?;
        self.parent_dir(&dst)?;
        self.forget_one(from);
        fs::rename(&src, &dst).map_err(|e| StoreError::io("rename", &src, e))?;
        if let Some(dir) = dst.parent() {
            fsync_dir(dir)?;
        }
        if let Some(dir) = src.parent() {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    fn link(&self, name: &str, from: &Path) -> Result<bool> {
        let dst = self.path(name)?;
        let Ok(file) = no_follow(OpenOptions::new().read(true)).open(from) else {
            return Ok(false);
        };
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Ok(false);
        }
        fsync_file(&file, from)?;
        self.parent_dir(&dst)?;
        // The file opened and fsynced above is linked, not whatever
        // `from` names by now.
        if let Err(e) = link_open_file(&file, &dst) {
            tracing::debug!(from = %from.display(), error = %e, "cannot link into the copy");
            return Ok(false);
        }
        if let Some(dir) = dst.parent()
            && let Err(e) = fsync_dir(dir)
        {
            let _ = fs::remove_file(&dst);
            return Err(e);
        }
        Ok(true)
    }
    fn truncate(&self, name: &str, len: u64) -> Result<()> {
        let path = self.path(name)?;
        let f = no_follow(OpenOptions::new().write(true))
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        f.set_len(len)
            .map_err(|e| StoreError::io("truncate", &path, e))?;
        fsync_file(&f, &path)?;
        self.forget_one(name);
        Ok(())
    }

    fn punch(&self, name: &str, offset: u64, len: u64) -> Result<bool> {
        use std::os::fd::AsRawFd;
        let path = self.path(name)?;
        let f = no_follow(OpenOptions::new().write(true))
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        if shared_with_snapshot(&f) {
            // An adopted pack a snapshot still holds: its bytes are the
            // snapshot's too, so they wait until it expires.
            return Ok(false);
        }
        // SAFETY: fallocate on an open descriptor; punching never changes
        // the file size.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                return Ok(false);
            }
            return Err(StoreError::io("punch hole in", &path, e));
        }
        fsync_file(&f, &path)?;
        Ok(true)
    }

    fn forget(&self) {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn space(&self) -> Option<SpaceInfo> {
        space_of(&self.root)
    }
}

/// Device, filesystem type and free space of the filesystem holding `dir`.
pub fn space_of(dir: &Path) -> Option<SpaceInfo> {
    use std::os::unix::ffi::OsStrExt;
    let device = fs::metadata(dir).ok()?.dev();
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs with a NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let bsize = st.f_bsize as u64;
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    let filesystem = match magic {
        0xEF53 => "ext4".to_string(),
        0x5846_5342 => "xfs".to_string(),
        0x9123_683E => "btrfs".to_string(),
        0x0102_1994 => "tmpfs".to_string(),
        0x794c_7630 => "overlayfs".to_string(),
        0x6969 => "nfs".to_string(),
        0x2FC1_2FC1 => "zfs".to_string(),
        other => format!("0x{other:x}"),
    };
    Some(SpaceInfo {
        device,
        filesystem,
        free_bytes: (st.f_bavail as u64).saturating_mul(bsize),
        total_bytes: (st.f_blocks as u64).saturating_mul(bsize),
    })
}

/// Appends to a segment: direct where the filesystem allows (a segment
/// is written once and read rarely; see [`crate::store::local::direct`]).
struct LocalAppender {
    path: PathBuf,
    out: DirectAppender,
    new_file: bool,
}

impl Appender for LocalAppender {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .append(bytes)
            .map_err(|e| StoreError::io("write", &self.path, e))
    }

    fn start_writeback(&mut self) -> Result<()> {
        self.out
            .start_writeback()
            .map_err(|e| StoreError::io("write", &self.path, e))
    }

    fn sync(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| StoreError::io("write", &self.path, e))?;
        fsync_file(self.out.file(), &self.path)?;
        if self.new_file {
            if let Some(dir) = self.path.parent() {
                fsync_dir(dir)?;
            }
            self.new_file = false;
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.out.len()
    }
}

/// True when `file` has another name (an adopted segment whose pack is
/// still in the snapshot area): its bytes must never be punched or cut.
pub fn shared_with_snapshot(file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.metadata().is_ok_and(|m| m.nlink() > 1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A crafted vault's symbolic link at a file's name is never followed:
    /// no read, write, size or cut reaches the file it points to.
    #[test]
    fn a_symbolic_link_at_a_vault_files_name_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"not the vault's").unwrap();
        let root = t.path().join("v");
        std::fs::create_dir_all(root.join("segments")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("segments/0000000000000001.seg")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("config")).unwrap();
        // A FIFO where a catalog file belongs: refused, not waited on.
        let fifo =
            std::ffi::CString::new(root.join("item").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(LocalStore::new(&root).get("item").is_err());
        let fifo_seg = std::ffi::CString::new(
            root.join("segments/0000000000000002.seg")
                .as_os_str()
                .as_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::mkfifo(fifo_seg.as_ptr(), 0o600) }, 0);
        let mut one = [0u8; 1];
        assert!(
            LocalStore::new(&root)
                .read_at("segments/0000000000000002.seg", 0, &mut one)
                .is_err()
        );
        let store = LocalStore::new(&root);
        let seg = "segments/0000000000000001.seg";
        let mut buf = [0u8; 4];
        assert!(store.read_at(seg, 0, &mut buf).is_err());
        assert!(store.size(seg).is_err());
        assert!(store.get("config").is_err());
        assert!(store.write_at(seg, 0, b"evil").is_err());
        assert!(store.truncate(seg, 0).is_err());
        assert!(store.punch(seg, 0, 4).is_err());
        assert!(store.append_to(seg, 0).is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"not the vault's");
    }

    /// A catalog file larger than any can be is refused with its name,
    /// not read into memory (a sparse file: no disk space needed).
    #[test]
    fn a_whole_file_read_stops_at_the_limit() {
        let t = tempfile::tempdir().unwrap();
        let store = LocalStore::new(t.path());
        std::fs::write(t.path().join("config"), b"small").unwrap();
        assert_eq!(store.get("config").unwrap().unwrap(), b"small");
        let f = std::fs::File::options()
            .write(true)
            .open(t.path().join("config"))
            .unwrap();
        f.set_len(MAX_WHOLE_FILE + 1).unwrap();
        let e = store.get("config").unwrap_err().to_string();
        assert!(e.contains("config") && e.contains("more than"), "{e}");
    }
}
