//! Losing a disk for real: an LRS replica on a loop-mounted ext4 (root
//! only; skipped with a message otherwise) is unmounted under the vault.
//! Backups then fail naming it, or warn under `--degraded-ok`; restores
//! still work; when the disk comes back, scrub finds what it missed and
//! `--repair` refills it from a good copy.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// A loop-mounted ext4, unmounted on drop.
struct Disk {
    file: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl Disk {
    fn mount(&mut self) -> bool {
        let ok = Command::new("mount")
            .args(["-o", "loop", s(&self.file), s(&self.mnt)])
            .status()
            .is_ok_and(|st| st.success());
        self.mounted = ok;
        ok
    }
    fn unmount(&mut self) {
        unmount(&self.mnt);
        self.mounted = false;
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if self.mounted {
            self.unmount();
        }
    }
}

fn loop_disk(dir: &Path) -> Option<Disk> {
    if !is_root() {
        skip("replica_disk_lost: needs root to loop-mount a filesystem");
        return None;
    }
    let file = dir.join("disk2.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let made = Command::new(e2tool("mke2fs"))
        .args(["-q", "-F", "-t", "ext4", s(&file)])
        .status()
        .unwrap();
    assert!(made.success(), "mke2fs failed");
    let mnt = dir.join("disk2");
    std::fs::create_dir(&mnt).unwrap();
    let mut disk = Disk {
        file,
        mnt,
        mounted: false,
    };
    if !disk.mount() {
        skip("replica_disk_lost: cannot loop-mount ext4 here");
        return None;
    }
    Some(disk)
}

#[test]
fn a_replica_whose_disk_is_unmounted() {
    let t = tempfile::tempdir().unwrap();
    let Some(mut disk) = loop_disk(t.path()) else {
        return;
    };
    let far = disk.mnt.join("replica");
    let near = t.path().join("near");
    let vault = new_vault(t.path(), &["--replica", s(&far), "--replica", s(&near)]);
    let v = s(&vault);
    let show = json(&["vault", "show", "--vault", v]);
    let copies = show["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 3, "{show}");
    let far_fs = copies
        .iter()
        .find(|c| c["dir"] == s(&far))
        .unwrap_or_else(|| panic!("{show}"));
    assert_eq!(far_fs["space"]["filesystem"], "ext4", "{show}");
    // The near replica shares the primary's disk, the far one does not.
    let warnings = show["copy_warnings"].to_string();
    assert!(
        warnings.contains("same device") && warnings.contains(s(&near)),
        "{warnings}"
    );
    assert!(!warnings.contains(s(&far)), "{warnings}");

    let img = t.path().join("vm.img");
    mixed_image(&img, 8 << 20, 61);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);

    // The disk goes away.
    disk.unmount();
    churn(&img, 12, 50_000, 62);
    let r = run(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    assert_ne!(r.status.code(), Some(0));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains(s(&far)), "{err}");
    let r = run(&[
        "--degraded-ok",
        "backup",
        "--vault",
        v,
        "--item",
        "vm",
        s(&img),
    ]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stderr).contains("unavailable"));
    let out = t.path().join("out.img");
    let mut a = restore_args(&vault, "vm", None, &out, false);
    a.extend(["--from", "vault"]);
    ok(&a);
    assert_same(&out, &img);

    // The disk comes back, behind by one backup: scrub says so, and
    // repairs it from the good copies.
    assert!(disk.mount());
    let stale = json_code(&["verify", "--vault", v, "--read-data"]);
    assert!(stale["detected"].as_u64().unwrap() > 0, "{stale}");
    assert!(stale.to_string().contains(s(&far)), "{stale}");
    let fixed = json_code(&["verify", "--vault", v, "--read-data", "--repair"]);
    assert_eq!(fixed["detected"], fixed["repaired"], "{fixed}");
    let clean = json(&["verify", "--vault", v, "--read-data"]);
    assert_eq!(clean["detected"], 0, "{clean}");
    assert_eq!(segment_bytes(&far), segment_bytes(&vault));
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
}

/// JSON of a command that may exit non-zero (verify with findings).
fn json_code(args: &[&str]) -> serde_json::Value {
    let out = run(&[&["--output", "json"][..], args].concat());
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}
