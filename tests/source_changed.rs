//! An image truncated while it is being backed up gives a clean
//! "changed during the backup" error (no SIGBUS crash) and records no
//! point.

use std::time::Duration;

use crate::common::*;

#[test]
fn truncation_during_backup_is_a_clean_error() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("shrinking.img");
    random_file(&img, 64 << 20, 3);
    let child = slow_backup(&vault, s(&img));
    std::thread::sleep(Duration::from_millis(700));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("shrinking.img") && err.contains("changed during the backup"),
        "{err}"
    );
    // The image was protected, its job failed in the snapshot phase, no
    // point was recorded, and the vault verifies clean.
    assert!(points(&vault, "shrinking").is_empty());
    let jobs = json(&["jobs", "--vault", s(&vault), "--item", "shrinking"]);
    assert_eq!(jobs[0]["status"], "Failed", "{jobs}");
    assert_eq!(jobs[0]["phases"][0]["status"], "Failed", "{jobs}");
    assert_eq!(jobs[0]["phases"][1]["status"], "NotStarted", "{jobs}");
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
    // The uncommitted bytes were given back.
    let show = json(&["vault", "show", "--vault", s(&vault)]);
    assert_eq!(show["stored_bytes"], 0);
    assert_eq!(segment_bytes(&vault), 0, "segment bytes left behind");
}
