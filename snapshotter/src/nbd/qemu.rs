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
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("coffre-qemu-nbd-{}-{nanos}", std::process::id()));
        coffre_vault_store::private::create_dir_all(&dir)
            .map_err(|e| fail(format!("cannot make {}: {e}", dir.display())))?;
        let sock = dir.join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
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
