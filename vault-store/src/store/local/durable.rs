//! The one door for durable file-system state: atomic replace and
//! directory fsync. Nothing else in coffre calls `rename` for state that
//! must survive a crash.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{Result, StoreError};
use crate::store::local::private;

/// Flushes a directory's entries (new, renamed or removed files) to disk.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| StoreError::io("open directory", dir, e))?;
    f.sync_all()
        .map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// Flushes a file's data and metadata to disk.
pub fn fsync_file(file: &File, path: &Path) -> Result<()> {
    file.sync_all()
        .map_err(|e| StoreError::io("fsync", path, e))
}

/// Starts writing `offset..offset+len` of `file` back to disk without
/// waiting (`sync_file_range`), so that a later fsync overlaps with the
/// work that follows instead of coming after it. Best effort: the fsync
/// still covers everything.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    sync_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE);
}

/// `sync_file_range(2)` with `flags`. Best effort: it only schedules or
/// waits for I/O, and the fsync that must follow covers everything.
pub fn sync_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on an open descriptor; it only schedules or
    // waits for I/O.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            flags,
        );
    }
}

/// Replaces `path` with `bytes` atomically: write a temporary file beside
/// it, fsync it, rename it over `path`, fsync the directory. A crash at any
/// point leaves either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    // A new file of an unguessable name (`O_EXCL | O_NOFOLLOW`): nothing
    // planted beside `path` is followed or truncated.
    let (mut f, tmp) =
        private::create_temp(dir, &name, "tmp").map_err(|e| StoreError::io("create", dir, e))?;
    let result = (|| {
        f.write_all(bytes)
            .map_err(|e| StoreError::io("write", &tmp, e))?;
        fsync_file(&f, &tmp)?;
        fs::rename(&tmp, path).map_err(|e| StoreError::io("rename", path, e))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates an owner-only directory (and parents) and makes its entry
/// durable. An existing `dir` is made owner-only too.
pub fn create_dir_durable(dir: &Path) -> Result<()> {
    private::create_private_dir(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
    fsync_dir(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync_dir(parent)?;
    }
    Ok(())
}
