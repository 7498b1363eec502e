//! A full disk during a backup: a clear error, no point recorded, earlier
//! points intact, and the space given back. Uses a small tmpfs, which needs
//! root; elsewhere the test says so and checks nothing.

use std::process::Command;

use crate::common::*;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn used_bytes(dir: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=used"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn full_disk_during_backup() {
    if !is_root() {
        skip("mounting a small tmpfs needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("small-fs");
    std::fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs failed");
    let _guard = Mount(mnt.clone());

    let vault = mnt.join("vault");
    ok(&["vault", "create", "--vault", s(&vault)]);
    let small = t.path().join("small.img");
    random_file(&small, 2 << 20, 1);
    ok(&["backup", "--vault", s(&vault), s(&small)]);
    let used_before = used_bytes(&mnt);

    let big = t.path().join("big.img");
    random_file(&big, 96 << 20, 2);
    let err = fails(&["backup", "--vault", s(&vault), s(&big)], 8);
    assert!(err.contains("no space left on device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // The space came back at once (within a little index growth).
    let used_after = used_bytes(&mnt);
    assert!(
        used_after < used_before + (4 << 20),
        "used {used_before} before, {used_after} after the failed backup"
    );
    // The snapshot phase completed, the transfer failed: no point.
    assert!(vault_points(&vault, "big").is_empty());
    let jobs = json(&["jobs", "--vault", s(&vault), "--item", "big"]);
    assert_eq!(jobs[0]["status"], "CompletedWithWarnings", "{jobs}");
    assert_eq!(jobs[0]["phases"][1]["status"], "Failed", "{jobs}");
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
    let out = t.path().join("small.out");
    ok(&restore_args(&vault, "small", None, &out, false));
    assert_same(&out, &small);
    // And the vault keeps working once there is room.
    let medium = t.path().join("medium.img");
    random_file(&medium, 8 << 20, 3);
    ok(&["backup", "--vault", s(&vault), s(&medium)]);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}
