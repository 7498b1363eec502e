//! The snapshot tier: the transfer reads the snapshot, never the live
//! image; a day-two snapshot stores about the change; points restore from
//! their snapshot (instant restore) or the vault; a skipped transfer leaves
//! a `Snapshot` point that expires with its snapshot; snapshots are kept
//! exactly the policy's 1–5 days; a locked or full area fails the backup.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::*;

fn point_ids(vault: &Path, item: &str) -> Vec<(String, String)> {
    points(vault, item)
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["tier"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_transfer_records_the_snapshot_whatever_happens_to_the_image() {
    for case in ["rewritten", "resized", "deleted"] {
        let t = tempfile::tempdir().unwrap();
        let vault = new_vault(t.path(), &[]);
        let img = t.path().join("vm.img");
        mixed_image(&img, (8 << 20) + 123, 11);
        let original = std::fs::read(&img).unwrap();
        ok(&[
            "protect",
            "--vault",
            s(&vault),
            "--item",
            "vm",
            "--policy",
            "DefaultPolicy",
            s(&img),
        ]);
        // The writer lock is busy: the transfer waits for it, after the
        // snapshot phase has completed.
        let lock = hold(&vault.join("lock"));
        let child = coffre()
            .args(["--lock-timeout", "60", "--output", "json"])
            .args(["backup", "--vault", s(&vault), "--item", "vm", s(&img)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_job(&vault, "vm", "the transfer phase", |j| {
            phase(j, 1) == "InProgress"
        });
        match case {
            "rewritten" => random_file(&img, (8 << 20) + 123, 12),
            "resized" => std::fs::OpenOptions::new()
                .write(true)
                .open(&img)
                .unwrap()
                .set_len(3 << 20)
                .unwrap(),
            _ => std::fs::remove_file(&img).unwrap(),
        }
        drop(lock);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = t.path().join("r.img");
        let mut args = restore_args(&vault, "vm", None, &r, false);
        args.extend(["--from", "vault"]);
        ok(&args);
        assert!(
            std::fs::read(&r).unwrap() == original,
            "{case}: the point is not the snapshot"
        );
        ok(&["verify", "--vault", s(&vault), "--read-data"]);
    }
}

#[test]
fn a_day_two_snapshot_stores_about_the_change_and_restores_instantly() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 32 << 20, 21);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let day1 = std::fs::read(&img).unwrap();
    churn(&img, 12, 90_000, 22);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let pts = points(&vault, "vm");
    assert_eq!(pts.len(), 2);
    for p in &pts {
        assert_eq!(p["tier"], "SnapshotAndVault", "{p}");
        assert_eq!(p["level"], "crash-consistent", "{p}");
    }
    let snap1 = pts[0]["snapshot_bytes"].as_u64().unwrap();
    let snap2 = pts[1]["snapshot_bytes"].as_u64().unwrap();
    let vault2 = pts[1]["stored_bytes"].as_u64().unwrap();
    assert!(snap1 > 8 << 20, "day one holds the image: {snap1}");
    assert!(
        snap2 * 2 <= vault2 * 3,
        "day two's snapshot ({snap2} B) is more than 1.5x its vault bytes ({vault2} B)"
    );

    // Instant restore reads the snapshot: it works without the vault's
    // segments; the vault restore then fails, naming the damage.
    let segments = vault.join("segments");
    let hidden = t.path().join("segments.away");
    std::fs::rename(&segments, &hidden).unwrap();
    let r = t.path().join("r.img");
    let id1 = pts[0]["id"].as_str().unwrap();
    let out = json(&restore_args(&vault, "vm", Some(id1), &r, false));
    assert_eq!(out["from"], "snapshot", "{out}");
    assert!(std::fs::read(&r).unwrap() == day1);
    let mut args = restore_args(&vault, "vm", None, &r, true);
    args.extend(["--from", "vault"]);
    let err = fails(&args, 7);
    assert!(err.contains("damaged") || err.contains("segment"), "{err}");
    std::fs::rename(&hidden, &segments).unwrap();
    let out = json(&args);
    assert_eq!(out["from"], "vault", "{out}");
    assert_same(&r, &img);
}

#[test]
fn a_skipped_transfer_leaves_a_snapshot_point_that_expires_with_it() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    let now1 = "2027-03-01T10:00:00Z";
    mixed_image(&img, 6 << 20, 31);
    ok_at(
        now1,
        &["backup", "--vault", s(&vault), "--item", "vm", s(&img)],
    );
    churn(&img, 5, 50_000, 32);
    let day2 = std::fs::read(&img).unwrap();
    // Another job's transfer of the item runs: this one is Skipped.
    let held = hold(&vault.join("locks").join("vm.transfer"));
    let out = json_at(
        "2027-03-02T10:00:00Z",
        &["backup", "--vault", s(&vault), "--item", "vm", s(&img)],
    );
    drop(held);
    assert_eq!(phase(&out["job"], 1), "Skipped", "{out}");
    let tiers = point_ids(&vault, "vm");
    assert_eq!(tiers.len(), 2, "{tiers:?}");
    assert_eq!(tiers[0].1, "SnapshotAndVault");
    assert_eq!(tiers[1].1, "Snapshot");
    // It restores at once, from its snapshot.
    let r = t.path().join("r.img");
    ok(&restore_args(&vault, "vm", Some(&tiers[1].0), &r, false));
    assert!(std::fs::read(&r).unwrap() == day2);
    let mut args = restore_args(&vault, "vm", Some(&tiers[1].0), &r, true);
    args.extend(["--from", "vault"]);
    let err = fails(&args, 1);
    assert!(err.contains("no copy in the vault tier"), "{err}");

    // The next transfer captures every change since the last vault point.
    churn(&img, 3, 40_000, 33);
    let day3 = std::fs::read(&img).unwrap();
    ok_at(
        "2027-03-03T10:00:00Z",
        &["backup", "--vault", s(&vault), "--item", "vm", s(&img)],
    );
    // DefaultPolicy keeps snapshots 2 days: on 03-04 12:00 the first two
    // snapshots expire; the skipped point's was its only copy.
    let pruned = json_at("2027-03-04T12:00:00Z", &["prune", "--vault", s(&vault)]);
    let snaps = pruned["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2, "{pruned}");
    let only: Vec<_> = snaps.iter().filter(|s| s["only_copy"] == true).collect();
    assert_eq!(only.len(), 1, "{pruned}");
    assert_eq!(only[0]["point"], tiers[1].0.as_str());
    let after = point_ids(&vault, "vm");
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0], (tiers[0].0.clone(), "Vault".to_string()));
    assert_eq!(after[1].1, "SnapshotAndVault");
    let mut args = restore_args(&vault, "vm", None, &r, true);
    args.extend(["--from", "vault"]);
    ok(&args);
    assert!(std::fs::read(&r).unwrap() == day3);
    // The younger snapshot still restores after the older ones expired.
    let mut args = restore_args(&vault, "vm", None, &r, true);
    args.extend(["--from", "snapshot"]);
    ok(&args);
    assert!(std::fs::read(&r).unwrap() == day3);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}

#[test]
fn snapshots_are_kept_exactly_the_instant_restore_days() {
    for days in [1u32, 5] {
        let t = tempfile::tempdir().unwrap();
        let vault = new_vault(t.path(), &[]);
        let img = t.path().join("vm.img");
        mixed_image(&img, 4 << 20, 40 + u64::from(days));
        let start = "2027-05-01T00:00:00Z";
        ok_at(
            start,
            &[
                "policy",
                "create",
                "--vault",
                s(&vault),
                "--name",
                "P",
                "--schedule",
                "daily",
                "--time",
                "23:00",
                "--instant-restore-days",
                &days.to_string(),
                "--daily-retention",
                "30",
            ],
        );
        protect_at(start, &vault, "vm", "P", &img);
        let mut ids = Vec::new();
        for day in 1..=10u32 {
            churn(&img, 2, 30_000, u64::from(day) * 7);
            let now = format!("2027-05-{day:02}T12:00:00Z");
            let out = json_at(
                &now,
                &["backup", "--vault", s(&vault), "--item", "vm", s(&img)],
            );
            ids.push(out["id"].as_str().unwrap().to_string());
            let later = format!("2027-05-{day:02}T12:01:00Z");
            ok_at(&later, &["prune", "--vault", s(&vault)]);
            let with_snapshot: Vec<String> = points(&vault, "vm")
                .iter()
                .filter(|p| p["tier"] == "SnapshotAndVault")
                .map(|p| p["id"].as_str().unwrap().to_string())
                .collect();
            let keep = (days as usize).min(ids.len());
            assert_eq!(
                with_snapshot,
                ids[ids.len() - keep..].to_vec(),
                "{days} days, day {day}"
            );
        }
        // The newest snapshot restores byte-identical after 9 expiries
        // (or 5) of snapshots it built on.
        let r = t.path().join("r.img");
        let mut args = restore_args(&vault, "vm", None, &r, false);
        args.extend(["--from", "snapshot"]);
        ok(&args);
        assert_same(&r, &img);
    }
}

#[test]
fn a_locked_snapshot_area_fails_the_backup_naming_the_lock() {
    let t = tempfile::tempdir().unwrap();
    let area = t.path().join("area");
    let vault = new_vault(t.path(), &["--snapshot-area", s(&area)]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 2 << 20, 51);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    assert!(area.join("vm").is_dir());
    std::fs::set_permissions(&area, std::fs::Permissions::from_mode(0o500)).unwrap();
    let out = run(&["backup", "--vault", s(&vault), s(&img)]);
    std::fs::set_permissions(&area, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is locked (read-only directory") && err.contains(s(&area)),
        "{err}"
    );
    let jobs = json(&["jobs", "--vault", s(&vault), "--item", "vm"]);
    let last = jobs.as_array().unwrap().last().unwrap();
    assert_eq!(last["status"], "Failed", "{jobs}");
    assert_eq!(points(&vault, "vm").len(), 1);

    // An immutable item folder (chattr +i, root only) is a lock too.
    let item = area.join("vm");
    let immutable = is_root()
        && std::process::Command::new("chattr")
            .args(["+i", s(&item)])
            .status()
            .is_ok_and(|st| st.success());
    if !immutable {
        skip("chattr +i lock: needs root and a filesystem with inode flags");
        return;
    }
    let out = run(&["backup", "--vault", s(&vault), s(&img)]);
    let _ = std::process::Command::new("chattr")
        .args(["-i", s(&item)])
        .status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("immutable attribute (chattr +i)") && err.contains(s(&item)),
        "{err}"
    );
    assert_eq!(points(&vault, "vm").len(), 1);
}

#[test]
fn a_capture_that_may_not_fit_is_refused() {
    if !is_root() {
        skip("a_capture_that_may_not_fit_is_refused: needs root to mount a small tmpfs");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", s(&small)])
        .status()
        .unwrap();
    if !mounted.success() {
        skip("a_capture_that_may_not_fit_is_refused: cannot mount tmpfs");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let vault = new_vault(t.path(), &["--snapshot-area", s(&small.join("area"))]);
    let img = t.path().join("vm.img");
    random_file(&img, 16 << 20, 61);
    let out = run(&["backup", "--vault", s(&vault), s(&img)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert!(
        err.contains("may need up to") && err.contains("vm.img") && err.contains("free"),
        "{err}"
    );
    assert!(points(&vault, "vm").is_empty());
}
