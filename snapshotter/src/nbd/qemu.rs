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

/// qcow2 version 3 incompatible-feature bit: extended L2 entries
/// (subclusters).
const QCOW2_EXTENDED_L2: u64 = 1 << 4;

/// Bytes of a version 3 qcow2 header read for [`Qcow2Layout`] (up to and
/// including `refcount_order`).
const QCOW2_LAYOUT_READ: usize = 100;

/// How a qcow2 image is laid out, from its header: what a new image that
/// replaces it keeps (`qemu-img create -o` options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Layout {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21, as QEMU accepts).
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits (version 3; 4 in version 2).
    pub refcount_order: u32,
    /// The image is encrypted (AES or LUKS).
    pub encrypted: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
}

impl Qcow2Layout {
    /// Reads the header of the qcow2 image at `path`.
    pub fn read(path: &Path) -> std::result::Result<Qcow2Layout, String> {
        use std::io::Read;
        let mut h = Vec::with_capacity(QCOW2_LAYOUT_READ);
        std::fs::File::open(path)
            .and_then(|f| f.take(QCOW2_LAYOUT_READ as u64).read_to_end(&mut h))
            .map_err(|e| e.to_string())?;
        Qcow2Layout::parse(&h)
    }

    /// Parses header bytes (big-endian, as qcow2 is). Every field is
    /// checked against what QEMU itself accepts.
    pub fn parse(h: &[u8]) -> std::result::Result<Qcow2Layout, String> {
        let be32 = |at: usize| {
            h.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or("its qcow2 header is cut short")
        };
        let be64 = |at: usize| {
            h.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or("its qcow2 header is cut short")
        };
        if h.get(..4) != Some(QCOW2_MAGIC.as_slice()) {
            return Err("it is not a qcow2 image".into());
        }
        let version = be32(4)?;
        if !(2..=3).contains(&version) {
            return Err(format!("qcow2 version {version} is not 2 or 3"));
        }
        let cluster_bits = be32(20)?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(format!(
                "its qcow2 header gives cluster bits {cluster_bits}, not 9 to 21"
            ));
        }
        let encrypted = be32(32)? != 0;
        let (refcount_order, extended_l2) = if version == 3 {
            let order = be32(96)?;
            if order > 6 {
                return Err(format!(
                    "its qcow2 header gives refcount order {order}, not 0 to 6"
                ));
            }
            (order, be64(72)? & QCOW2_EXTENDED_L2 != 0)
        } else {
            (4, false)
        };
        Ok(Qcow2Layout {
            version,
            cluster_bits,
            refcount_order,
            encrypted,
            extended_l2,
        })
    }

    /// `qemu-img create -o` options for a new image laid out the same way.
    pub fn create_options(&self) -> String {
        let mut o = format!(
            "compat={},cluster_size={}",
            if self.version == 2 { "0.10" } else { "1.1" },
            1u64 << self.cluster_bits
        );
        if self.version == 3 {
            o.push_str(&format!(",refcount_bits={}", 1u32 << self.refcount_order));
            if self.extended_l2 {
                o.push_str(",extended_l2=on");
            }
        }
        o
    }
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
        // The socket file exists once qemu-nbd has bound it, a moment
        // before it listens (a connect then is refused): it is ready when
        // a connection is taken (it serves many in turn: --persistent).
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
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
    use super::{Qcow2Layout, check_header};

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
    #[expect(clippy::big_endian_bytes, reason = "qcow2 headers are big-endian")]
    fn layouts_are_read_and_checked() {
        let mut h = header(3, 0, 1 << 4);
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        let l = Qcow2Layout::parse(&h).unwrap();
        assert_eq!((l.version, l.cluster_bits, l.encrypted), (3, 16, false));
        assert_eq!(
            l.create_options(),
            "compat=1.1,cluster_size=65536,refcount_bits=16,extended_l2=on"
        );
        let mut v2 = header(2, 0, 0);
        v2[20..24].copy_from_slice(&12u32.to_be_bytes());
        v2[32..36].copy_from_slice(&1u32.to_be_bytes());
        let l = Qcow2Layout::parse(&v2[..40]).unwrap();
        assert!(l.encrypted);
        assert_eq!(l.create_options(), "compat=0.10,cluster_size=4096");
        h[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(Qcow2Layout::parse(&h).unwrap_err().contains("cluster bits"));
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[96..100].copy_from_slice(&7u32.to_be_bytes());
        assert!(Qcow2Layout::parse(&h).unwrap_err().contains("refcount"));
        assert!(
            Qcow2Layout::parse(&h[..90])
                .unwrap_err()
                .contains("cut short")
        );
        assert!(Qcow2Layout::parse(b"RAW!").is_err());
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
