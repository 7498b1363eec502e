//! The clone path for real: an XFS filesystem with reflink=1 in a file,
//! loop-mounted (root only; skipped with a message otherwise). The
//! snapshot is a reflink clone, the transfer reads it, an image in use is
//! file-system-consistent, and a restore onto the same filesystem is a
//! clone again, byte-identical.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::common::*;

/// A loop-mounted XFS, unmounted on drop.
pub(crate) struct Xfs {
    pub(crate) mnt: PathBuf,
}

impl Drop for Xfs {
    fn drop(&mut self) {
        unmount(&self.mnt);
    }
}

pub(crate) fn mount_xfs(dir: &Path) -> Option<Xfs> {
    if !is_root() {
        skip("clone path: needs root to loop-mount an XFS filesystem");
        return None;
    }
    let mkfs = ["/usr/sbin/mkfs.xfs", "/sbin/mkfs.xfs"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(mkfs) = mkfs else {
        skip("clone path: mkfs.xfs not installed (apt-get install xfsprogs; `make test` does)");
        return None;
    };
    let file = dir.join("xfs.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let made = Command::new(mkfs)
        .args(["-q", "-m", "reflink=1", s(&file)])
        .status()
        .unwrap();
    assert!(made.success(), "mkfs.xfs failed");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-o", "loop", s(&file), s(&mnt)])
        .status()
        .unwrap();
    if !mounted.success() {
        skip("clone path: cannot loop-mount XFS here");
        return None;
    }
    Some(Xfs { mnt })
}

/// `coffre backup` with the snapshot area in its default place, at the
/// root of the image's filesystem (the tests' COFFRE_SNAPSHOT_ROOT is
/// elsewhere, so it is unset); the backup's JSON.
pub(crate) fn backup_next_to_image(vault: &Path, img: &Path) -> serde_json::Value {
    let out = coffre()
        .env_remove("COFFRE_SNAPSHOT_ROOT")
        .args(["--output", "json", "backup", "--vault", s(vault), s(img)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A loop-mounted XFS in `dir` holding a generated image `vm.img` of
/// `size` bytes (`seed`), and an empty vault next to it (not on the XFS);
/// `None` (having said SKIP) where XFS cannot be mounted.
pub(crate) fn xfs_vault(dir: &Path, size: u64, seed: u64) -> Option<(Xfs, PathBuf, PathBuf)> {
    let xfs = mount_xfs(dir)?;
    let vault = dir.join("vault");
    ok(&["vault", "create", "--vault", s(&vault)]);
    let img = xfs.mnt.join("vm.img");
    mixed_image(&img, size, seed);
    Some((xfs, vault, img))
}

#[test]
fn clone_snapshots_on_xfs() {
    let t = tempfile::tempdir().unwrap();
    // No --snapshot-area: the default place is what is tested.
    let Some((xfs, vault, img)) = xfs_vault(t.path(), 256 << 20, 81) else {
        return;
    };
    let original = std::fs::read(&img).unwrap();
    // Default placement: the area is at the root of the image's filesystem
    // (the tests' COFFRE_SNAPSHOT_ROOT is elsewhere, so unset it here).
    let started = Instant::now();
    let b = backup_next_to_image(&vault, &img);
    eprintln!(
        "clone path: 256 MiB backup job in {:?}, snapshot phase {} ms",
        started.elapsed(),
        b["job"]["stats"]["snapshot_ms"]
    );
    assert_eq!(b["job"]["stats"]["snapshot_kind"], "clone", "{b}");
    assert_eq!(b["level"], "crash-consistent", "{b}");
    let area = xfs.mnt.join(".coffre-snapshots").join("vault_1").join("vm");
    assert!(area.is_dir(), "no area at {}", area.display());

    // The image changes at once: the point is the clone's.
    random_file(&img, 1 << 20, 82);
    let r = t.path().join("r.img");
    let mut args = restore_args(&vault, "vm", None, &r, false);
    args.extend(["--from", "vault"]);
    ok(&args);
    assert!(std::fs::read(&r).unwrap() == original);

    // Restore from the snapshot onto the same filesystem: a clone again.
    let near = xfs.mnt.join("restored.img");
    let started = Instant::now();
    let out = json(&restore_args(&vault, "vm", None, &near, false));
    eprintln!(
        "clone path: restore from the snapshot in {:?}",
        started.elapsed()
    );
    assert_eq!(out["from"], "snapshot", "{out}");
    assert_eq!(out["cloned"], true, "{out}");
    assert!(std::fs::read(&near).unwrap() == original);
    // Elsewhere it is a copy from the clone.
    let far = t.path().join("far.img");
    let out = json(&restore_args(&vault, "vm", None, &far, false));
    assert_eq!(
        (out["from"].as_str(), out["cloned"].as_bool()),
        (Some("snapshot"), Some(false))
    );
    assert!(std::fs::read(&far).unwrap() == original);

    // An image held open for writing (as by a running VM) is captured
    // atomically by the clone: file-system-consistent.
    let mut vm = Command::new("sh")
        .arg("-c")
        .arg("exec 3<>\"$0\"; exec sleep 30")
        .arg(&img)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = coffre()
        .env_remove("COFFRE_SNAPSHOT_ROOT")
        .args(["--output", "json", "backup", "--vault", s(&vault), s(&img)])
        .output()
        .unwrap();
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["level"], "file-system-consistent", "{b}");
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
    // Expiry removes the clones (they are the area's only big files).
    ok_at("2100-01-01T00:00:00Z", &["prune", "--vault", s(&vault)]);
    drop(xfs);
}
