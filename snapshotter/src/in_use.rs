//! Is an image in use? Two signals, both read from `/proc`:
//! - a lock on the image's inode in `/proc/locks`: QEMU takes OFD locks on
//!   every image it has open (shown with pid -1), and other tools take
//!   POSIX or flock locks;
//! - a descriptor of the image open for writing in another process
//!   (`/proc/PID/fd` resolves to the inode, `/proc/PID/fdinfo` gives the
//!   open flags).
//!
//! Processes of other users are visible only to root; an unprivileged
//! coffre sees its own user's VMs, which is where it can read images
//! anyway. A false "not in use" only makes the point claim
//! crash-consistent for an image that was written during the capture, and
//! the fallback capture detects such writes itself (it re-reads and
//! retries, or fails with `SourceChanged`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Why `image` counts as in use, or `None`.
pub fn in_use(image: &Path) -> Option<String> {
    let meta = std::fs::metadata(image).ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    if let Some(why) = locked(
        &std::fs::read_to_string("/proc/locks").unwrap_or_default(),
        dev,
        ino,
    ) {
        return Some(why);
    }
    open_for_write(dev, ino)
}

/// A lock on `dev`/`ino` in `/proc/locks` text.
fn locked(locks: &str, dev: u64, ino: u64) -> Option<String> {
    let want = (
        u64::from(libc::major(dev)),
        u64::from(libc::minor(dev)),
        ino,
    );
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: OFDLCK ADVISORY WRITE -1 fd:01:1234 0 EOF"; a blocked
        // request has an extra "->" field.
        let off = usize::from(fields.get(1) == Some(&"->"));
        let (Some(kind), Some(pid), Some(id)) = (
            fields.get(1 + off),
            fields.get(4 + off),
            fields.get(5 + off),
        ) else {
            continue;
        };
        let mut parts = id.split(':');
        let parsed = (
            parts.next().and_then(|s| u64::from_str_radix(s, 16).ok()),
            parts.next().and_then(|s| u64::from_str_radix(s, 16).ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        );
        if parsed == (Some(want.0), Some(want.1), Some(want.2)) {
            return Some(if *kind == "OFDLCK" {
                "it holds an OFD lock (as QEMU does on the images it has open)".to_string()
            } else {
                format!("process {pid} holds a {kind} lock on it")
            });
        }
    }
    None
}

/// Another process with the inode open for writing.
fn open_for_write(dev: u64, ino: u64) -> Option<String> {
    let me = std::process::id().to_string();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc_entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(m) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if m.dev() != dev || m.ino() != ino {
                continue;
            }
            let info =
                std::fs::read_to_string(proc_entry.path().join("fdinfo").join(fd.file_name()))
                    .unwrap_or_default();
            if writes(&info) {
                let comm =
                    std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                return Some(format!(
                    "process {pid} ({}) has it open for writing",
                    comm.trim()
                ));
            }
        }
    }
    None
}

/// True when fdinfo text says the descriptor was opened for writing.
fn writes(fdinfo: &str) -> bool {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_are_matched_by_device_and_inode() {
        let text = "\
1: OFDLCK ADVISORY  WRITE -1 fd:01:1234 100 101
2: POSIX  ADVISORY  WRITE 4242 08:02:99 0 EOF
2: -> POSIX  ADVISORY  WRITE 4243 08:02:77 0 EOF
";
        let dev = |maj, min| libc::makedev(maj, min);
        assert!(locked(text, dev(0xfd, 1), 1234).unwrap().contains("OFD"));
        assert!(locked(text, dev(8, 2), 99).unwrap().contains("4242"));
        assert!(locked(text, dev(8, 2), 77).unwrap().contains("4243"));
        assert!(locked(text, dev(8, 2), 1234).is_none());
    }

    #[test]
    fn open_flags_are_read_from_fdinfo() {
        assert!(writes("pos:\t0\nflags:\t0100002\nmnt_id:\t29\n"));
        assert!(writes("flags:\t01\n"));
        assert!(!writes("pos:\t0\nflags:\t0100000\n"));
        assert!(!writes(""));
    }

    #[test]
    fn a_writer_process_is_seen_and_a_reader_is_not() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        assert_eq!(in_use(&img), None);
        // A child holding the image open for writing (our own descriptors
        // do not count).
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<>\"$0\"; exec sleep 5")
            .arg(&img)
            .spawn()
            .unwrap();
        let mut seen = None;
        for _ in 0..200 {
            seen = in_use(&img);
            if seen.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        let why = seen.expect("the writer was not seen");
        assert!(why.contains("open for writing"), "{why}");
    }
}
