//! Where a restore writes: a new image file, or an existing file or block
//! device replaced in place.
//!
//! A **new file** is written as a temporary file beside the target, created
//! with an unguessable name and `O_EXCL | O_NOFOLLOW` (a symlink or file
//! planted in a shared folder is never followed, truncated or written),
//! mode 0600 while it is written, sized first so zero blocks stay holes,
//! given the requested mode (0600 by default), fsynced and only then
//! renamed over the target: a failed restore leaves no partial file.
//!
//! An **in-place** target (an existing image, an LVM volume, `/dev/nbd0`) is
//! opened for writing without truncation. A block device must not be
//! mounted or held open exclusively (it is opened with `O_EXCL`, which the
//! kernel refuses while a filesystem, device mapper or md holds it; the
//! message names the mount point or holder). The target must be at least as
//! large as the image; a regular file larger than the image is cut to its
//! size, so it ends byte-identical to the point. The target is inconsistent
//! until the restore completes; an interrupted in-place restore is finished
//! by running it again. An existing regular file is refused while a running
//! VM (QEMU's image lock) or another process holds it ([`refuse_if_in_use`]),
//! and stays locked against a VM starting on it until the restore ends.
//!
//! A **scratch** file is a new private file beside the target that is never
//! renamed: the raw image `qemu-img` converts to qcow2, removed afterwards
//! (see `restore_qcow2`).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use coffre_vault_store::store::local::durable::fsync_dir;

use crate::error::{EngineError, Result};

/// Mode of a restored image unless asked otherwise: a disk is private.
pub const DEFAULT_MODE: u32 = 0o600;

/// What kind of target is being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A new image file (temporary file, then rename).
    NewFile,
    /// A private raw file beside the target, never renamed and removed
    /// when dropped (the input of a qcow2 conversion).
    Scratch,
    /// An existing regular file, written in place.
    ExistingFile,
    /// A block device, written in place.
    BlockDevice,
}

impl TargetKind {
    /// True for the two in-place kinds.
    pub fn in_place(self) -> bool {
        matches!(self, TargetKind::ExistingFile | TargetKind::BlockDevice)
    }

    /// True for the kinds this restore creates (written from empty,
    /// removed on failure).
    pub fn is_new(self) -> bool {
        matches!(self, TargetKind::NewFile | TargetKind::Scratch)
    }
}

/// An open restore target.
pub struct Target {
    file: File,
    /// The path written to (the temporary file for a new file).
    path: PathBuf,
    /// The path the user named.
    final_path: PathBuf,
    kind: TargetKind,
    /// The target's size before the restore (0 for a new file).
    pub len_before: u64,
    image_size: u64,
    keep_tmp: bool,
    /// Mode a new file gets when it is renamed into place.
    mode: u32,
}

impl Drop for Target {
    fn drop(&mut self) {
        // Only the file this restore created, never whatever replaced it.
        if self.kind.is_new()
            && !self.keep_tmp
            && coffre_vault_store::store::local::private::is_same_file(&self.path, &self.file)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The error for a target that cannot be written.
pub(crate) fn unwritable(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::TargetUnwritable {
        path: path.to_path_buf(),
        source,
    }
}

fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Target {
    /// Prepares a new image file at `target` (`force` replaces an existing
    /// one), created with `mode`, `image_size` bytes long.
    pub fn create(target: &Path, force: bool, mode: u32, image_size: u64) -> Result<Target> {
        check_new(target, force)?;
        Target::new_temp(
            target,
            "coffre-partial",
            TargetKind::NewFile,
            mode,
            image_size,
        )
    }

    /// Prepares a private raw scratch file of `image_size` bytes beside
    /// `target`, never renamed and removed when dropped.
    pub fn scratch(target: &Path, image_size: u64) -> Result<Target> {
        Target::new_temp(
            target,
            "coffre-raw",
            TargetKind::Scratch,
            DEFAULT_MODE,
            image_size,
        )
    }

    fn new_temp(
        target: &Path,
        tag: &str,
        kind: TargetKind,
        mode: u32,
        image_size: u64,
    ) -> Result<Target> {
        // A new file with an unguessable name, `O_EXCL | O_NOFOLLOW` and
        // mode 0600 while it is written: nothing planted in a shared
        // folder is followed or truncated, and nobody else can open it
        // before the restore is done (`finish` sets `mode`).
        let (dir, name) = temp_place(target);
        let (file, path) = coffre_vault_store::store::local::private::create_temp(&dir, &name, tag)
            .map_err(|e| unwritable(&dir, e))?;
        let t = Target {
            file,
            path,
            final_path: target.to_path_buf(),
            kind,
            len_before: 0,
            image_size,
            keep_tmp: false,
            mode,
        };
        t.file
            .set_len(image_size)
            .map_err(|e| unwritable(&t.path, e))?;
        Ok(t)
    }

    /// Opens an existing file or block device to be overwritten in place.
    pub fn open_in_place(target: &Path, image_size: u64) -> Result<Target> {
        let meta = match std::fs::metadata(target) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::TargetMissing {
                    path: target.to_path_buf(),
                });
            }
            Err(e) => return Err(unwritable(target, e)),
        };
        let kind = if meta.file_type().is_block_device() {
            TargetKind::BlockDevice
        } else if meta.is_file() {
            TargetKind::ExistingFile
        } else {
            return Err(EngineError::TargetNotRegular {
                path: target.to_path_buf(),
            });
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if kind == TargetKind::BlockDevice {
            // Exclusive open: the kernel refuses it (EBUSY) while the device
            // is mounted or claimed by dm, md, swap or another O_EXCL user.
            opts.custom_flags(libc::O_EXCL);
        }
        let mut file = match opts.open(target) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(EngineError::TargetBusy {
                    path: target.to_path_buf(),
                    reason: busy_reason(meta.rdev()),
                });
            }
            Err(e) => return Err(unwritable(target, e)),
        };
        if kind == TargetKind::ExistingFile {
            refuse_if_in_use(&file, target)?;
        }
        let len = if kind == TargetKind::BlockDevice {
            file.seek(SeekFrom::End(0))
                .map_err(|e| unwritable(target, e))?
        } else {
            meta.len()
        };
        if len < image_size {
            return Err(EngineError::TargetTooSmall {
                path: target.to_path_buf(),
                size: len,
                needed: image_size,
            });
        }
        Ok(Target {
            file,
            path: target.to_path_buf(),
            final_path: target.to_path_buf(),
            kind,
            len_before: len,
            image_size,
            keep_tmp: false,
            mode: 0,
        })
    }

    /// A second descriptor of the same file opened with `O_DIRECT` for
    /// writing (`None` where the filesystem refuses it). It is opened
    /// through `/proc/self/fd`, so it is the file this target holds open
    /// even if its name was replaced meanwhile.
    pub fn reopen_direct(&self) -> Option<File> {
        use std::os::fd::AsRawFd;
        coffre_vault_store::store::local::direct::open_direct(Path::new(&format!(
            "/proc/self/fd/{}",
            self.file.as_raw_fd()
        )))
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What kind of target this is.
    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    /// Makes a new file a reflink clone of `src` (a clone snapshot on the
    /// same filesystem). `Ok(false)` when the filesystem cannot, with the
    /// file left at its size for a copy instead.
    pub fn clone_from(&self, src: &File) -> Result<bool> {
        if !self.kind.is_new() {
            return Ok(false);
        }
        match coffre_snapshotter::clone::clone_into(src, &self.file) {
            Ok(true) => {
                let len = self
                    .file
                    .metadata()
                    .map_err(|e| unwritable(&self.path, e))?
                    .len();
                if len != self.image_size {
                    return Err(unwritable(
                        &self.path,
                        std::io::Error::other(format!(
                            "the clone is {len} bytes, the point {}",
                            self.image_size
                        )),
                    ));
                }
                Ok(true)
            }
            Ok(false) => {
                self.file
                    .set_len(self.image_size)
                    .map_err(|e| unwritable(&self.path, e))?;
                Ok(false)
            }
            Err(e) => Err(unwritable(&self.path, e)),
        }
    }

    /// Makes the restore durable: cuts a larger regular file to the image
    /// size, fsyncs once, and for a new file renames it into place. A
    /// scratch file has nothing to finish (it is removed when dropped).
    pub fn finish(mut self) -> Result<()> {
        if self.kind == TargetKind::Scratch {
            return Ok(());
        }
        if self.kind == TargetKind::ExistingFile && self.len_before > self.image_size {
            self.file
                .set_len(self.image_size)
                .map_err(|e| unwritable(&self.path, e))?;
        }
        if self.kind == TargetKind::NewFile {
            // The umask may have taken bits away from `mode`: set it
            // exactly, now that the content is complete.
            use std::os::unix::fs::PermissionsExt;
            self.file
                .set_permissions(std::fs::Permissions::from_mode(self.mode))
                .map_err(|e| unwritable(&self.path, e))?;
        }
        self.file
            .sync_all()
            .map_err(|e| unwritable(&self.path, e))?;
        if self.kind == TargetKind::NewFile {
            // Rename only the file written (a rename never follows a
            // symlink at either name; this checks nobody swapped ours).
            if !coffre_vault_store::store::local::private::is_same_file(&self.path, &self.file) {
                return Err(unwritable(
                    &self.path,
                    std::io::Error::other(
                        "the temporary file was replaced while the restore wrote it",
                    ),
                ));
            }
            std::fs::rename(&self.path, &self.final_path)
                .map_err(|e| unwritable(&self.final_path, e))?;
            self.keep_tmp = true;
            fsync_dir(&parent_dir(&self.final_path))?;
        }
        Ok(())
    }
}

/// Refuses a restore onto an existing file that is a new file's target
/// when it exists without `force`, or is a directory.
pub(crate) fn check_new(target: &Path, force: bool) -> Result<()> {
    if target.is_dir() {
        return Err(unwritable(
            target,
            std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
        ));
    }
    if target.exists() && !force {
        return Err(EngineError::TargetExists {
            path: target.to_path_buf(),
        });
    }
    Ok(())
}

/// The folder a temporary file for `target` goes to (beside it), and the
/// stem of its name.
pub(crate) fn temp_place(target: &Path) -> (PathBuf, String) {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    (parent_dir(target), name)
}

/// Refuses an in-place restore onto the existing file `path` (open as
/// `file`, for writing) while something uses it, and then locks it for as
/// long as `file` stays open. In use: a lock on it (QEMU holds OFD locks on
/// every image a VM has open, running or paused) or another process that
/// has it open for writing. The lock coffre then takes is a write lock
/// over the whole file, the kind QEMU checks for: a VM started on the disk
/// meanwhile fails to open it instead of running on a disk being replaced.
pub(crate) fn refuse_if_in_use(file: &File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let in_use = |reason: String| EngineError::TargetInUse {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(why) = coffre_snapshotter::in_use::in_use(path) {
        return Err(in_use(why));
    }
    // SAFETY: a zeroed `flock` is a valid value (all integer fields).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start 0, l_len 0: the whole file, however long; l_pid 0, as OFD
    // locks require.
    // SAFETY: fcntl on a descriptor we own, with a valid `flock`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(in_use(
            "another process holds a lock on it (as QEMU does on the disks of a running VM)".into(),
        )),
        // A filesystem without locks: the /proc check above is all there is.
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(unwritable(path, err)),
    }
}

/// Why the block device `rdev` could not be opened exclusively: where it
/// (or a partition of it) is mounted, or what holds it.
fn busy_reason(rdev: u64) -> String {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    // The device and its partitions, as "major:minor".
    let mut devs = vec![format!("{major}:{minor}")];
    if let Ok(entries) = std::fs::read_dir(&sys) {
        for e in entries.flatten() {
            if let Ok(d) = std::fs::read_to_string(e.path().join("dev")) {
                devs.push(d.trim().to_string());
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mounted_at(&mounts, &devs);
    if !mounted.is_empty() {
        return format!("mounted at {}", mounted.join(", "));
    }
    let holders: Vec<String> = std::fs::read_dir(sys.join("holders"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !holders.is_empty() {
        return format!("held by {}", holders.join(", "));
    }
    "held open exclusively by another process (swap, a hypervisor, or another tool)".into()
}

/// Mount points in `mountinfo` text whose device is one of `devs`.
fn mounted_at(mountinfo: &str, devs: &[String]) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let dev = fields.nth(2)?;
            let mount_point = fields.nth(1)?;
            devs.iter()
                .any(|d| d == dev)
                .then(|| mount_point.replace("\\040", " "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found_by_device_number() {
        let info = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
97 22 7:0 / /mnt/my\\040disk rw,relatime shared:50 - xfs /dev/loop0 rw
98 22 7:1 / /mnt/other rw shared:51 - xfs /dev/loop1 rw
";
        assert_eq!(mounted_at(info, &["7:0".into()]), vec!["/mnt/my disk"]);
        assert_eq!(
            mounted_at(info, &["7:5".into(), "7:1".into()]),
            vec!["/mnt/other"]
        );
        assert!(mounted_at(info, &["8:0".into()]).is_empty());
    }

    #[test]
    fn in_place_refuses_missing_small_and_odd_targets() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("nope.img");
        assert!(matches!(
            Target::open_in_place(&missing, 10),
            Err(EngineError::TargetMissing { .. })
        ));
        let small = t.path().join("small.img");
        std::fs::write(&small, [1u8; 100]).unwrap();
        match Target::open_in_place(&small, 101) {
            Err(EngineError::TargetTooSmall { size, needed, .. }) => {
                assert_eq!((size, needed), (100, 101));
            }
            other => panic!("expected TargetTooSmall, got {:?}", other.err()),
        }
        assert!(matches!(
            Target::open_in_place(t.path(), 10),
            Err(EngineError::TargetNotRegular { .. })
        ));
    }

    #[test]
    fn new_files_get_the_mode_asked_for_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o640, 0o644] {
            let p = t.path().join(format!("r{mode:o}.img"));
            Target::create(&p, false, mode, 4096)
                .unwrap()
                .finish()
                .unwrap();
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, mode);
            assert_eq!(m.len(), 4096);
        }
    }

    #[test]
    fn a_symlink_planted_at_the_old_temporary_name_is_not_followed() {
        use std::os::unix::fs::{FileExt, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"do not truncate me").unwrap();
        let target = t.path().join("disk.img");
        let old_name = t
            .path()
            .join(format!(".disk.img.coffre-partial-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_name).unwrap();
        let out = Target::create(&target, false, 0o644, 8192).unwrap();
        assert!(!out.path().starts_with(&old_name) && out.path() != old_name);
        // Private while it is written, whatever mode was asked for.
        let m = std::fs::symlink_metadata(out.path()).unwrap();
        assert!(m.file_type().is_file());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        out.file().write_all_at(b"restored", 0).unwrap();
        out.finish().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"do not truncate me");
        assert_eq!(&std::fs::read(&target).unwrap()[..8], b"restored");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // A symlink at the target itself is replaced, not followed.
        std::fs::remove_file(&target).unwrap();
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let out = Target::create(&target, true, 0o600, 4096).unwrap();
        out.finish().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"do not truncate me");
        assert!(std::fs::symlink_metadata(&target).unwrap().is_file());
    }

    #[test]
    fn a_swapped_temporary_file_is_neither_renamed_nor_removed() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("disk.img");
        let out = Target::create(&target, false, 0o600, 4096).unwrap();
        let tmp = out.path().to_path_buf();
        std::fs::remove_file(&tmp).unwrap();
        std::fs::write(&tmp, b"someone else's").unwrap();
        assert!(out.finish().is_err());
        assert!(!target.exists());
        assert_eq!(std::fs::read(&tmp).unwrap(), b"someone else's");
    }
}
