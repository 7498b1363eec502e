//! A live restore's hold (`VAULT/holds/TAG.hold`) keeps its point from
//! prune, snapshot expiry and gc: the VM's disk reads the blocks not yet
//! streamed from it. Here the hold is written as `restore --live` writes
//! it (the QEMU tests check that a real live restore writes and removes
//! it); prune, run far past the point's retention with the injected
//! clock, keeps the held point and its snapshot and says why, gc keeps
//! its chunks, and the point still restores byte-identical. A damaged hold
//! makes prune and gc delete nothing, naming the file; `restore --live
//! --abandon` removes a hold whose target needs it no more (refused while
//! the target still names the export), and the point then expires; a
//! soft-deleted item's purge waits for its hold likewise. A new live
//! restore into the path of an unfinished one is refused while its hold
//! stays, and never replaces it.

use std::path::{Path, PathBuf};

use coffre_engine::snapshotter::vm::stream::LiveNames;
use coffre_engine::store::holds::{HoldRecord, HoldStore};

use crate::common::*;

/// `restore --live --abandon` of the live restore into `target`.
fn abandon_args<'a>(vault: &'a str, target: &'a Path) -> Vec<&'a str> {
    let mut a = live_args(vault, target);
    a.push("--abandon");
    a
}

fn tier_of(vault: &Path, id: &str) -> String {
    points(vault, "vm")
        .iter()
        .find(|p| p["id"] == id)
        .map(|p| p["tier"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// In a canonical temporary folder, a vault (with a secondary at
/// `DIR/secondary` when `secondary`) whose item `vm`, `size` random bytes
/// (`seed`) at `DIR/vm.img`, is protected under DefaultPolicy and backed
/// up by `run-due` on 2027-01-01: the folder, the dir, the vault, the image.
fn protected_vm(
    size: usize,
    seed: u64,
    secondary: bool,
) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(t.path()).unwrap();
    let sec = dir.join("secondary");
    let create: Vec<&str> = if secondary {
        vec!["--secondary", s(&sec)]
    } else {
        Vec::new()
    };
    let vault = new_vault(&dir, &create);
    let img = dir.join("vm.img");
    random_file(&img, size, seed);
    protect_at("2027-01-01T00:00:00Z", &vault, "vm", "DefaultPolicy", &img);
    ok_at("2027-01-01T03:00:00Z", &["run-due", "--vault", s(&vault)]);
    (t, dir, vault, img)
}

#[test]
fn a_held_point_survives_prune_and_gc_until_abandoned() {
    let (_t, dir, vault, img) = protected_vm(4 << 20, 7, false);
    let v = s(&vault);
    let day_one = dir.join("day-one.img");
    std::fs::copy(&img, &day_one).unwrap();
    churn(&img, 64, 64 << 10, 2);
    ok_at("2027-01-02T03:00:00Z", &["run-due", "--vault", v]);
    let all = points(&vault, "vm");
    assert_eq!(all.len(), 2);
    let held = all[0]["id"].as_str().unwrap().to_string();
    assert_eq!(tier_of(&vault, &held), "SnapshotAndVault");

    // The hold of a live restore into `target` (begun on day two).
    let target = dir.join("restored.qcow2");
    let holds = HoldStore::new(&vault, None);
    let record = HoldRecord {
        item: "vm".into(),
        point: held.clone(),
        tier: "snapshot".into(),
        target: target.clone(),
        started: "2027-01-02T05:00:00Z".parse().unwrap(),
        pid: 1,
        target_file: None,
    };
    holds.put(&record).unwrap();

    // Years later every point but the last has expired, and every
    // snapshot: the held point and its snapshot stay, and prune says why.
    let later = "2040-01-01T00:00:00Z";
    let r = json_at(later, &["prune", "--vault", v]);
    assert!(
        r["expired"].as_array().unwrap().is_empty(),
        "the held point is not expired: {r}"
    );
    let kept: Vec<(&str, &str)> = r["held"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["point"].as_str().unwrap(), h["kept"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kept,
        vec![(held.as_str(), "point"), (held.as_str(), "snapshot")],
        "{r}"
    );
    assert_eq!(r["held"][0]["target"], s(&target), "{r}");
    let text = ok_at(later, &["prune", "--vault", v]);
    assert!(
        text.contains(&format!("kept point {held} of item vm"))
            && text.contains("unfinished live restore into")
            && text.contains("--abandon"),
        "{text}"
    );
    assert_eq!(points(&vault, "vm").len(), 2);
    assert_eq!(tier_of(&vault, &held), "SnapshotAndVault");

    // gc keeps its chunks, and says whose they are.
    let g = json_at(later, &["gc", "--vault", v]);
    assert_eq!(
        g["held_points"],
        serde_json::json!([format!("vm/{held}")]),
        "{g}"
    );
    for from in ["vault", "snapshot"] {
        let out = dir.join(format!("back-{from}.img"));
        ok(&[
            "restore",
            "--vault",
            v,
            "--item",
            "vm",
            "--point",
            &held,
            "--from",
            from,
            "--to",
            s(&out),
        ]);
        assert_same(&out, &day_one);
    }

    // A damaged hold: prune and gc delete nothing, naming the file.
    let path = holds.path_of(&target);
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() - 5]).unwrap();
    for cmd in ["prune", "gc"] {
        let out = run_at(later, &[cmd, "--vault", v]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd}: {err}");
        assert!(
            err.contains(s(&path)) && err.contains("delete nothing"),
            "{cmd}: {err}"
        );
    }
    assert_eq!(points(&vault, "vm").len(), 2);

    // Abandoned (the target is not there, so nothing needs the point): the
    // damaged hold goes and the point expires at the next prune.
    let other = fails(&abandon_args(v, &dir.join("elsewhere.qcow2")), 1);
    assert!(other.contains("nothing to abandon"), "{other}");
    let out = ok(&abandon_args(v, &target));
    assert!(out.contains("damaged hold"), "{out}");
    assert!(!path.exists());
    let r = json_at(later, &["prune", "--vault", v]);
    let expired: Vec<&str> = r["expired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(expired, vec![held.as_str()], "{r}");
    assert!(r["held"].as_array().unwrap().is_empty(), "{r}");
}

#[test]
fn a_target_that_still_reads_the_export_is_not_abandoned() {
    if !tools_run(
        &["qemu-img"],
        "live hold: qemu-img missing (apt-get install qemu-utils)",
    ) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(t.path()).unwrap();
    let vault = new_vault(&dir, &[]);
    let v = s(&vault);
    let img = dir.join("vm.img");
    random_file(&img, 1 << 20, 3);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    let point = points(&vault, "vm")[0]["id"].as_str().unwrap().to_string();
    // A target as a live restore leaves it: a qcow2 over the export.
    let target = dir.join("restored.qcow2");
    let backing = coffre_engine::snapshotter::vm::stream::backing_json(
        Path::new("/run/coffre/live/x.sock"),
        &coffre_engine::snapshotter::vm::stream::export_name(&point),
        300,
    );
    let made = std::process::Command::new("qemu-img")
        .args([
            "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", &backing,
        ])
        .arg(&target)
        .arg("1M")
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    HoldStore::new(&vault, None)
        .put(&HoldRecord {
            item: "vm".into(),
            point: point.clone(),
            tier: "vault".into(),
            target: target.clone(),
            started: jiff::Timestamp::now(),
            pid: 1,
            target_file: None,
        })
        .unwrap();
    let args = abandon_args(v, &target);
    let err = fails(&args, 1);
    assert!(
        err.contains("still reads") && err.contains(&point) && err.contains("--resume"),
        "{err}"
    );
    // Once the target is gone, the hold goes.
    std::fs::remove_file(&target).unwrap();
    let out = ok(&args);
    assert!(out.contains("abandoned") && out.contains(&point), "{out}");
    assert!(HoldStore::new(&vault, None).list().unwrap().is_empty());
}

#[test]
fn a_new_live_restore_never_replaces_the_hold_of_an_unfinished_one() {
    let (_t, dir, vault, img) = protected_vm(1 << 20, 13, false);
    let v = s(&vault);
    churn(&img, 4, 64 << 10, 5);
    ok_at("2027-01-02T03:00:00Z", &["run-due", "--vault", v]);
    let all = points(&vault, "vm");
    let (first, second) = (
        all[0]["id"].as_str().unwrap().to_string(),
        all[1]["id"].as_str().unwrap().to_string(),
    );
    // An earlier live restore of the first point into `target` that never
    // finished: its target was removed (a QEMU may still run on it).
    let target = dir.join("restored.qcow2");
    let holds = HoldStore::new(&vault, None);
    holds
        .put(&HoldRecord {
            item: "vm".into(),
            point: first.clone(),
            tier: "vault".into(),
            target: target.clone(),
            started: "2027-01-02T04:00:00Z".parse().unwrap(),
            pid: 1,
            target_file: None,
        })
        .unwrap();
    let path = holds.path_of(&target);
    let kept = std::fs::read(&path).unwrap();
    let no_vm = dir.join("no-vm.sock");
    let live = |point: &str| {
        let mut a = live_args(v, &target);
        a.extend(["--point", point, "--qmp", s(&no_vm), "--device", "vdb"]);
        run(&a)
    };
    // A new run, of another point or the same, is refused: the hold stays
    // as it was, and the message says how to let it go.
    for point in [&second, &first] {
        let out = live(point);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("did not end")
                && err.contains(&first)
                && err.contains(s(&path))
                && err.contains(&LiveNames::of(&target).backing)
                && err.contains("--abandon --item vm"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), kept, "the hold is untouched");
        assert!(!target.exists());
    }
    // A damaged hold is not replaced either.
    std::fs::write(&path, &kept[..kept.len() - 3]).unwrap();
    let out = live(&second);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot be read") && err.contains("--abandon"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap().len(), kept.len() - 3);
    // Abandoned, the path is free: a new run holds its own point, and,
    // failing before any VM had its target (no monitor), removes the
    // target and its own hold.
    if !tools_run(
        &["qemu-img"],
        "live hold: qemu-img missing (apt-get install qemu-utils)",
    ) {
        return;
    }
    ok(&abandon_args(v, &target));
    let out = live(&second);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is the VM running"), "{err}");
    assert!(!target.exists(), "{err}");
    assert!(holds.list().unwrap().is_empty(), "{err}");
}

#[test]
fn a_held_soft_deleted_item_is_not_purged_until_the_hold_goes() {
    let (_t, dir, vault, _img) = protected_vm(1 << 20, 9, false);
    let v = s(&vault);
    let point = points(&vault, "vm")[0]["id"].as_str().unwrap().to_string();
    let target = dir.join("restored.qcow2");
    let holds = HoldStore::new(&vault, None);
    holds
        .put(&HoldRecord {
            item: "vm".into(),
            point: point.clone(),
            tier: "vault".into(),
            target: target.clone(),
            started: "2027-01-01T04:00:00Z".parse().unwrap(),
            pid: 1,
            target_file: None,
        })
        .unwrap();
    ok_at(
        "2027-01-02T00:00:00Z",
        &["unprotect", "--vault", v, "--item", "vm", "--delete-data"],
    );
    // Past the 14 days: the purge waits for the live restore.
    let r = json_at("2027-02-01T00:00:00Z", &["prune", "--vault", v]);
    assert!(r["purged_items"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(r["held"][0]["kept"], "item", "{r}");
    assert_eq!(r["held"][0]["point"], point.as_str(), "{r}");
    assert_eq!(points(&vault, "vm").len(), 1);
    // The target is not there: the hold is abandoned, and the purge runs.
    ok(&abandon_args(v, &target));
    let r = json_at("2027-02-01T00:00:00Z", &["prune", "--vault", v]);
    assert_eq!(r["purged_items"], serde_json::json!(["vm"]), "{r}");
}

#[test]
fn a_point_held_in_the_secondary_survives_replicate_after_the_primary_pruned_it() {
    let (_t, dir, vault, img) = protected_vm(2 << 20, 11, true);
    let sec = dir.join("secondary");
    let v = s(&vault);
    let day_one = dir.join("day-one.img");
    std::fs::copy(&img, &day_one).unwrap();
    churn(&img, 32, 64 << 10, 3);
    ok_at("2027-01-02T03:00:00Z", &["run-due", "--vault", v]);
    ok_at("2027-01-02T04:00:00Z", &["replicate", "--vault", v]);
    let held = points(&vault, "vm")[0]["id"].as_str().unwrap().to_string();
    // A live restore from the secondary holds day one there.
    let holds = HoldStore::new(&sec, None);
    holds
        .put(&HoldRecord {
            item: "vm".into(),
            point: held.clone(),
            tier: "vault".into(),
            target: dir.join("restored.qcow2"),
            started: "2027-01-02T05:00:00Z".parse().unwrap(),
            pid: 1,
            target_file: None,
        })
        .unwrap();
    // The primary prunes and collects it (it knows nothing of that hold).
    let later = "2040-01-01T00:00:00Z";
    ok_at(later, &["prune", "--vault", v]);
    ok_at(later, &["gc", "--vault", v]);
    assert_eq!(points(&vault, "vm").len(), 1);
    let from_sec = |at: &str| -> Vec<String> {
        json_at(
            at,
            &[
                "points",
                "--vault",
                v,
                "--item",
                "vm",
                "--from",
                "secondary",
            ],
        )
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
    };
    // A damaged hold in the secondary: replicate stops, naming it, and
    // puts nothing aside.
    let path = holds.path_of(&dir.join("restored.qcow2"));
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() - 4]).unwrap();
    let out = run_at(later, &["replicate", "--vault", v]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(s(&path)), "{err}");
    assert!(!sec.join("quarantine").exists() || dir_is_empty(&sec.join("quarantine")));
    std::fs::write(&path, &good).unwrap();
    // Replicate keeps everything the held point needs, and says why.
    let r = json_at(later, &["replicate", "--vault", v]);
    assert_eq!(r["quarantine_skipped"], true, "{r}");
    assert_eq!(r["quarantined"], 0, "{r}");
    assert_eq!(
        r["held_points"],
        serde_json::json!([format!("vm/{held}")]),
        "{r}"
    );
    let text = ok_at(later, &["replicate", "--vault", v]);
    assert!(text.contains("nothing was quarantined"), "{text}");
    assert!(from_sec(later).contains(&held));
    let out = dir.join("back.img");
    let mut a = restore_args(&vault, "vm", Some(&held), &out, false);
    a.extend(["--from", "secondary"]);
    ok(&a);
    assert_same(&out, &day_one);
    // The hold gone, the next run puts the pruned point aside.
    assert!(holds.remove(&dir.join("restored.qcow2")).unwrap());
    let r = json_at(later, &["replicate", "--vault", v]);
    assert_eq!(r["quarantine_skipped"], false, "{r}");
    assert!(r["quarantined"].as_u64().unwrap() > 0, "{r}");
    assert!(!from_sec(later).contains(&held));
}

fn dir_is_empty(d: &Path) -> bool {
    std::fs::read_dir(d).unwrap().next().is_none()
}

#[test]
fn a_target_path_that_is_not_utf8_or_has_control_characters_is_refused_up_front() {
    use std::os::unix::ffi::OsStrExt;
    let t = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(t.path()).unwrap();
    let vault = new_vault(&dir, &[]);
    let img = dir.join("vm.img");
    random_file(&img, 1 << 20, 5);
    ok(&["backup", "--vault", s(&vault), "--item", "vm", s(&img)]);
    let raw = dir.join(std::ffi::OsStr::from_bytes(b"t\xff.qcow2"));
    for target in [raw, dir.join("t\u{1b}[2J.qcow2")] {
        let out = coffre()
            .args(["restore", "--vault", s(&vault), "--item", "vm", "--live"])
            .arg("--to")
            .arg(&target)
            .args(["--qmp", s(&dir.join("no.sock")), "--device", "vda"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("not UTF-8 without control characters"),
            "{err}"
        );
        assert!(std::fs::symlink_metadata(&target).is_err());
        assert!(HoldStore::new(&vault, None).list().unwrap().is_empty());
    }
    // A good path whose VM cannot be reached (the target is made and the
    // hold written before the monitor is dialled): refused, the new target
    // removed by the run itself, and so its hold released.
    let good = dir.join("t.qcow2");
    let out = coffre()
        .args(["restore", "--vault", s(&vault), "--item", "vm", "--live"])
        .args(["--to", s(&good)])
        .args(["--qmp", s(&dir.join("no.sock")), "--device", "vda"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(std::fs::symlink_metadata(&good).is_err(), "{err}");
    assert!(HoldStore::new(&vault, None).list().unwrap().is_empty());
}
