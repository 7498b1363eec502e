//! Restore to a qcow2 image, through `qemu-img`: a **new** qcow2 file
//! (`--format qcow2`), or an existing qcow2 **VM disk replaced** (in place,
//! with the VM off). Also which format a restore writes
//! ([`target_format`]).
//!
//! `qemu-img convert` cannot read a stream, so the point is first restored
//! to a private raw **scratch** file beside the target (sparse, `0600`, an
//! unguessable name, removed whatever happens), which `qemu-img convert -f
//! raw -O qcow2` turns into a private **partial** qcow2 beside the target
//! (holes and zero blocks stay unallocated clusters). The partial is
//! fsynced (`qemu-img` itself does not flush) and only then renamed over the
//! target, and the folder fsynced: a failure at any step leaves the target
//! as it was and removes both temporaries. `qemu-img` is given both files as
//! `/proc/PID/fd/N` of descriptors coffre opened itself, so it writes into
//! the very file coffre created with `O_EXCL | O_NOFOLLOW`, never whatever
//! someone planted at a name in a shared folder.
//!
//! **A VM's qcow2 disk** is never written half-way: the whole point goes
//! into a new qcow2 laid out like the disk (its version, cluster size,
//! refcount width, extended L2), which takes the disk's owner, group and
//! mode and then replaces it in one rename. Until then the disk is
//! untouched and locked: refused while a VM (QEMU's image lock) or another
//! writer uses it, and a VM started meanwhile fails to open it. The cost:
//! every block is written (no delta), the folder needs room for the new
//! image beside the old one, and what only the old file held goes with it
//! (internal snapshots, persistent dirty bitmaps, a backing file: the new
//! image is self-contained). An encrypted qcow2 is refused: the restored
//! disk would not be encrypted.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use coffre_snapshotter::nbd::qemu::{Qcow2Layout, is_qcow2};
use coffre_vault_store::store::local::durable::fsync_dir;
use coffre_vault_store::store::local::private::{create_temp, is_same_file};

use crate::error::{EngineError, Result};
use crate::restore::{ImageFormat, RestoreOptions, RestoreSummary};
use crate::restore_target::{Target, check_new, refuse_if_in_use, temp_place, unwritable};

/// The program that writes qcow2 images.
const QEMU_IMG: &str = "qemu-img";

/// Longest part of `qemu-img`'s own error message quoted in coffre's.
const MAX_QUOTED: usize = 1000;

/// The format a restore writes: the one asked for, raw by default for a
/// new file; in place, the target's own (a file that starts with the qcow2
/// magic is qcow2). Refuses `qcow2` in place onto anything but an existing
/// qcow2 file, and a qcow2 on a block device unless `raw` is asked for.
pub fn target_format(opts: &RestoreOptions) -> Result<ImageFormat> {
    if !opts.in_place {
        return Ok(opts.format.unwrap_or_default());
    }
    let path = &opts.target;
    let Ok(meta) = std::fs::metadata(path) else {
        // The in-place open reports what is wrong with it.
        return Ok(opts.format.unwrap_or_default());
    };
    let device = meta.file_type().is_block_device();
    let qcow2 = (meta.is_file() || device) && is_qcow2(path);
    let refuse = |reason: &str| {
        Err(EngineError::TargetFormat {
            path: path.clone(),
            reason: reason.into(),
        })
    };
    match (opts.format, qcow2, device) {
        (Some(ImageFormat::Raw), _, _) | (None, false, _) => Ok(ImageFormat::Raw),
        (_, true, false) => Ok(ImageFormat::Qcow2),
        (None, true, true) => refuse(
            "it is a block device that holds a qcow2 image; coffre replaces a qcow2 disk only as a file (--format raw overwrites the device with the raw image)",
        ),
        (Some(ImageFormat::Qcow2), true, true) => {
            refuse("it is a block device; a qcow2 disk is replaced in place only as a file")
        }
        (Some(ImageFormat::Qcow2), false, _) => refuse(
            "it is not a qcow2 image; --in-place --format qcow2 replaces an existing qcow2 disk (restore to a new file with --format qcow2 instead)",
        ),
    }
}

/// Restores to a new qcow2 file at `target` (`force` replaces an existing
/// one) with `mode`: `write` fills a raw scratch file of `image_size`
/// bytes, which is converted.
pub(crate) fn to_new_file(
    target: &Path,
    force: bool,
    mode: u32,
    image_size: u64,
    write: impl FnOnce(&Target) -> Result<RestoreSummary>,
) -> Result<RestoreSummary> {
    check_new(target, force)?;
    check_qemu_img(target)?;
    let scratch = Target::scratch(target, image_size)?;
    let summary = write(&scratch)?;
    let partial = convert(&scratch, target, None)?;
    // The raw copy goes before the qcow2 is synced: its room is free
    // sooner.
    drop(scratch);
    partial.install(target, None, |f| {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
    })?;
    Ok(summary)
}

/// Replaces the existing qcow2 disk `target` (the VM off) with a new
/// qcow2 image of the point, laid out like it and with its owner, group
/// and mode: `write` fills a raw scratch file of `image_size` bytes.
pub(crate) fn replace_disk(
    target: &Path,
    image_size: u64,
    write: impl FnOnce(&Target) -> Result<RestoreSummary>,
) -> Result<RestoreSummary> {
    // A disk named through a symlink (as VM managers do) is replaced where
    // it really is, and the link kept.
    let target = &match std::fs::canonicalize(target) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EngineError::TargetMissing {
                path: target.to_path_buf(),
            });
        }
        Err(e) => return Err(unwritable(target, e)),
    };
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(|e| unwritable(target, e))?;
    let meta = disk.metadata().map_err(|e| unwritable(target, e))?;
    if !meta.is_file() {
        return Err(EngineError::TargetNotRegular {
            path: target.to_path_buf(),
        });
    }
    // Refused while in use; locked against a VM starting on it from now
    // until `disk` is closed, after the rename.
    refuse_if_in_use(&disk, target)?;
    let layout = read_layout(&disk).map_err(|reason| EngineError::TargetFormat {
        path: target.to_path_buf(),
        reason,
    })?;
    if layout.encrypted {
        return Err(EngineError::TargetFormat {
            path: target.to_path_buf(),
            reason: "it is an encrypted qcow2 image, and the restored disk would not be encrypted; restore to a new file (--format qcow2) and encrypt that with qemu-img convert".into(),
        });
    }
    check_qemu_img(target)?;
    let scratch = Target::scratch(target, image_size)?;
    let mut summary = write(&scratch)?;
    let partial = convert(&scratch, target, Some(layout.create_options()))?;
    drop(scratch);
    partial.install(target, Some(&disk), |f| {
        use std::os::unix::fs::PermissionsExt;
        let now = f.metadata()?;
        if (now.uid(), now.gid()) != (meta.uid(), meta.gid()) {
            std::os::unix::fs::fchown(f, Some(meta.uid()), Some(meta.gid()))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o777))
    })?;
    drop(disk);
    summary.in_place = true;
    Ok(summary)
}

/// The layout in the header of the open qcow2 image `disk` (read from the
/// descriptor: the file checked for use is the file read).
fn read_layout(disk: &File) -> std::result::Result<Qcow2Layout, String> {
    let mut h = vec![0u8; 100];
    let mut got = 0;
    while got < h.len() {
        match disk.read_at(h.get_mut(got..).unwrap_or_default(), got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    h.truncate(got);
    Qcow2Layout::parse(&h)
}

/// The error for `qemu-img` not starting, with the way to install it.
fn qemu_img_error(target: &Path, e: &std::io::Error) -> EngineError {
    EngineError::QemuImg {
        path: target.to_path_buf(),
        reason: if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{QEMU_IMG} is not installed; it writes qcow2 images (apt-get install qemu-utils)"
            )
        } else {
            format!("{QEMU_IMG} cannot start: {e}")
        },
        no_space: false,
    }
}

/// Fails at once, before anything is restored, where `qemu-img` is
/// missing.
fn check_qemu_img(target: &Path) -> Result<()> {
    let out = Command::new(QEMU_IMG)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| qemu_img_error(target, &e))?;
    if out.success() {
        Ok(())
    } else {
        Err(EngineError::QemuImg {
            path: target.to_path_buf(),
            reason: format!("`{QEMU_IMG} --version` failed ({out})"),
            no_space: false,
        })
    }
}

/// A path to an open descriptor of this process that another process
/// opens as the very same file.
fn fd_path(f: &File) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd())
}

/// Converts the raw `scratch` to a new private qcow2 file beside `target`
/// (with `qemu-img create -o` `options`).
fn convert(scratch: &Target, target: &Path, options: Option<String>) -> Result<Partial> {
    let (dir, name) = temp_place(target);
    let (file, path) = create_temp(&dir, &name, "coffre-qcow2").map_err(|e| unwritable(&dir, e))?;
    let partial = Partial {
        file,
        path,
        installed: false,
    };
    let (from, to) = (fd_path(scratch.file()), fd_path(&partial.file));
    let mut cmd = Command::new(QEMU_IMG);
    // The input format is said, never probed: the raw bytes are the
    // guest's, and could look like an image header naming other files.
    cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2"]);
    if let Some(o) = &options {
        cmd.arg("-o").arg(o);
    }
    let out = cmd
        .arg(&from)
        .arg(&to)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| qemu_img_error(target, &e))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr)
            .replace(&from, "the restored raw image")
            .replace(&to, &partial.path.display().to_string());
        return Err(EngineError::QemuImg {
            path: target.to_path_buf(),
            no_space: said.contains("No space left on device"),
            reason: format!(
                "{QEMU_IMG} convert failed ({}): {}",
                out.status,
                quoted(&said)
            ),
        });
    }
    Ok(partial)
}

/// `qemu-img`'s message, untrusted: one line of printable text, at most
/// [`MAX_QUOTED`] characters.
fn quoted(said: &str) -> String {
    let mut s: String = said
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_QUOTED)
        .collect();
    if said.trim().chars().count() > MAX_QUOTED {
        s.push('…');
    }
    s
}

/// The converted qcow2, beside the target; removed unless installed.
struct Partial {
    file: File,
    path: PathBuf,
    installed: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        // Only the file this restore created, never whatever replaced it.
        if !self.installed && is_same_file(&self.path, &self.file) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Partial {
    /// Gives the file its attributes (`prepare`), fsyncs it and renames it
    /// over `target` (which, when `replacing` is given, must still be that
    /// file), then fsyncs the folder.
    fn install(
        mut self,
        target: &Path,
        replacing: Option<&File>,
        prepare: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> Result<()> {
        prepare(&self.file).map_err(|e| unwritable(&self.path, e))?;
        self.file
            .sync_all()
            .map_err(|e| unwritable(&self.path, e))?;
        if !is_same_file(&self.path, &self.file) {
            return Err(unwritable(
                &self.path,
                std::io::Error::other("the temporary file was replaced while the restore wrote it"),
            ));
        }
        if let Some(disk) = replacing
            && !is_same_file(target, disk)
        {
            return Err(unwritable(
                target,
                std::io::Error::other(
                    "the disk was replaced by another file during the restore; it was left as it is",
                ),
            ));
        }
        std::fs::rename(&self.path, target).map_err(|e| unwritable(target, e))?;
        self.installed = true;
        fsync_dir(&temp_place(target).0)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_messages_are_one_bounded_line() {
        assert_eq!(quoted("  a\nb\tc \n"), "a b c");
        let long = "x".repeat(MAX_QUOTED + 5);
        let q = quoted(&long);
        assert_eq!(q.chars().count(), MAX_QUOTED + 1);
        assert!(q.ends_with('…'));
    }

    #[test]
    fn the_format_follows_the_target_in_place() {
        let t = tempfile::tempdir().unwrap();
        let raw = t.path().join("raw.img");
        std::fs::write(&raw, [0u8; 512]).unwrap();
        let qcow = t.path().join("disk.qcow2");
        let mut h = b"QFI\xfb".to_vec();
        h.resize(512, 0);
        std::fs::write(&qcow, &h).unwrap();
        let opts = |target: &Path, in_place, format| RestoreOptions {
            in_place,
            format,
            ..RestoreOptions::new(target)
        };
        let new = t.path().join("new.img");
        assert_eq!(
            target_format(&opts(&new, false, None)).unwrap(),
            ImageFormat::Raw
        );
        assert_eq!(
            target_format(&opts(&new, false, Some(ImageFormat::Qcow2))).unwrap(),
            ImageFormat::Qcow2
        );
        assert_eq!(
            target_format(&opts(&raw, true, None)).unwrap(),
            ImageFormat::Raw
        );
        assert_eq!(
            target_format(&opts(&qcow, true, None)).unwrap(),
            ImageFormat::Qcow2
        );
        assert_eq!(
            target_format(&opts(&qcow, true, Some(ImageFormat::Raw))).unwrap(),
            ImageFormat::Raw
        );
        match target_format(&opts(&raw, true, Some(ImageFormat::Qcow2))) {
            Err(EngineError::TargetFormat { reason, .. }) => {
                assert!(reason.contains("not a qcow2"), "{reason}")
            }
            other => panic!("expected TargetFormat, got {other:?}"),
        }
    }
}
