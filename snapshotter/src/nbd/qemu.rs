//! qcow2 (and any other format QEMU reads) given as a file: coffre starts
//! its own read-only `qemu-nbd` on a private Unix socket, reads the image
//! through it like any NBD export, and stops it when the image is closed.
//! `qemu-nbd` takes QEMU's image lock, so nothing can write to the image
//! while it is read: the capture is a point in time. An image a running VM
//! holds is refused with the way to back it up live (a libvirt pull-mode
//! backup); coffre never forces a shared read of a disk being written.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Result, SnapError};

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// True when the file at `path` starts with the qcow2 magic.
pub fn is_qcow2(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == QCOW2_MAGIC)
}

/// Bytes of a qcow2 header read for [`check_self_contained`]: version 3's
/// fields up to and including its incompatible-feature bits.
const QCOW2_HEADER_READ: usize = 80;

/// qcow2 version 3 incompatible-feature bit: the guest data lives in an
/// external data file the header names.
const QCOW2_EXTERNAL_DATA_FILE: u64 = 1 << 2;

/// Checks the header of the qcow2 image `path`: a version QEMU writes (2
/// or 3), no backing file and no external data file. A header names such
/// files by path, and the image's first bytes are whatever its guest
/// wrote when the image was raw: QEMU would open those paths with
/// coffre's rights and put their bytes in the backup. coffre reads only
/// self-contained qcow2 images.
pub fn check_self_contained(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut h = [0u8; QCOW2_HEADER_READ];
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let got = f.read(&mut h).map_err(|e| e.to_string())?;
    check_header(h.get(..got).unwrap_or_default())
}

/// [`check_self_contained`] on the header bytes (big-endian, as qcow2
/// is).
pub fn check_header(h: &[u8]) -> std::result::Result<(), String> {
    let be32 = |at: usize| {
        h.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    let be64 = |at: usize| {
        h.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    };
    if h.get(..4) != Some(QCOW2_MAGIC.as_slice()) {
        return Err("it is not a qcow2 image".into());
    }
    let version = be32(4).ok_or("its qcow2 header is cut short")?;
    if !(2..=3).contains(&version) {
        return Err(format!("qcow2 version {version} is not 2 or 3"));
    }
    if be64(8).ok_or("its qcow2 header is cut short")? != 0 {
        return Err("its qcow2 header names a backing file: coffre reads only self-contained images (`qemu-img convert -O qcow2` or `qemu-img commit` it first)".into());
    }
    if version == 3
        && be64(72).ok_or("its qcow2 header is cut short")? & QCOW2_EXTERNAL_DATA_FILE != 0
    {
        return Err(
            "its qcow2 header names an external data file: coffre reads only self-contained images"
                .into(),
        );
    }
    Ok(())
}

/// A `qemu-nbd` coffre started; stopped on drop.
pub struct QemuNbd {
    child: Child,
    dir: PathBuf,
    /// The export's URI.
    pub uri: String,
}

impl std::fmt::Debug for QemuNbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuNbd").field("uri", &self.uri).finish()
    }
}

impl QemuNbd {
    /// Exports `image` read-only (with its dirty `bitmap`, if named).
    pub fn start(image: &Path, bitmap: Option<&str>) -> Result<QemuNbd> {
        let fail = |reason: String| SnapError::Nbd {
            uri: image.display().to_string(),
            reason,
        };
        check_self_contained(image).map_err(&fail)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("coffre-qemu-nbd-{}-{nanos}", std::process::id()));
        // Created new (never an existing directory someone else planted at
        // the name, where they could swap the socket), owner-only.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&dir)
            .map_err(|e| fail(format!("cannot make {}: {e}", dir.display())))?;
        let sock = dir.join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        // The format is said, never probed: QEMU opens nothing the header
        // could name beyond what check_self_contained allowed.
        cmd.args([
            "--format=qcow2",
            "--read-only",
            "--persistent",
            "--export-name",
            "disk",
            "--socket",
        ])
        .arg(&sock);
        if let Some(b) = bitmap {
            cmd.args(["--bitmap", b]);
        }
        let mut child = cmd
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                fail(format!(
                    "it is a qcow2 image, read through qemu-nbd, which cannot start ({e}); apt-get install qemu-utils"
                ))
            })?;
        let started = Instant::now();
        while !sock.exists() {
            if let Ok(Some(_)) = child.try_wait() {
                let why = refusal(&mut child);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(fail(why));
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(fail("qemu-nbd did not start within 30 s".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(QemuNbd {
            child,
            uri: format!("nbd+unix:///disk?socket={}", sock.display()),
            dir,
        })
    }
}

impl QemuNbd {
    /// Why the server went away (it refuses an image only once a client
    /// connects), if it did within a second.
    pub fn failure(&mut self) -> Option<String> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(1) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(refusal(&mut self.child));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

/// What a qemu-nbd that exited said, with the way out of a lock.
fn refusal(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let hint = if err.contains("lock") {
        "; a running VM holds it: back it up live with a libvirt pull-mode backup (virsh backup-begin) and `coffre backup --bitmap CHECKPOINT nbd://HOST/EXPORT`"
    } else {
        ""
    };
    format!("qemu-nbd refused it: {}{hint}", err.trim())
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::check_header;

    #[expect(clippy::big_endian_bytes, reason = "qcow2 headers are big-endian")]
    fn header(version: u32, backing: u64, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[8..16].copy_from_slice(&backing.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h
    }

    #[test]
    fn only_self_contained_qcow2_headers_pass() {
        assert_eq!(check_header(&header(3, 0, 0)), Ok(()));
        assert_eq!(check_header(&header(2, 0, 0)), Ok(()));
        assert!(
            check_header(&header(3, 0x200, 0))
                .unwrap_err()
                .contains("backing file")
        );
        assert!(
            check_header(&header(3, 0, 1 << 2))
                .unwrap_err()
                .contains("external data file")
        );
        // Version 2 has no feature bits: what lies there is not read.
        assert_eq!(check_header(&header(2, 0, 1 << 2)), Ok(()));
        assert!(check_header(&header(4, 0, 0)).is_err());
        assert!(check_header(&header(3, 0, 0)[..40]).is_err());
        assert!(check_header(b"RAW!").is_err());
    }
}
