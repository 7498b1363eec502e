//! The dirty-bitmap chain of `coffre backup --qmp`, against a real QEMU:
//! a day two reads only what the bitmap marks; a qcow2's persistent
//! bitmap survives a VM restart (a raw disk's cannot, and the backup says
//! so and reads everything); a bitmap that lies is caught by the sampling
//! audit; a run killed after its instant leaves a chain the next run
//! merges, so no write is lost. Every point restores byte-identical to the
//! disk at its instant. Skipped with a message where QEMU is missing.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use coffre_engine::snapshotter::vm::qmp::Qmp;
use serde_json::{Value, json};

use crate::common::qemu::*;
use crate::common::*;

const SIZE: usize = 16 << 20;
const BLOCK: usize = 64 << 10;

/// The chain's bitmaps on node `disk0`: (name, recording, persistent).
fn chain(q: &mut Qmp) -> Vec<(String, bool, bool)> {
    let nodes = q
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .unwrap();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap()
        .clone();
    let mut found = node["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        // The fleecing job's own bitmap has no name.
        .filter(|b| {
            b["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("coffre-cbt-"))
        })
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["recording"].as_bool().unwrap(),
                b["persistent"].as_bool().unwrap(),
            )
        })
        .collect::<Vec<_>>();
    found.sort();
    found
}

/// `coffre backup --qmp` of device `vda` as item `vm`, which ends
/// `status`.
fn backup_as(vault: &Path, qmp: &Path, status: &str) -> Value {
    let b = json(&live_backup_args(vault, qmp, "vda", &[]));
    assert_eq!(b["job"]["status"], status, "{b}");
    b
}

/// `coffre backup --qmp` of device `vda` as item `vm`, which completes.
fn backup(vault: &Path, qmp: &Path) -> Value {
    backup_as(vault, qmp, "Completed")
}

/// Stops QEMU cleanly (`quit`: persistent bitmaps are written to the
/// qcow2) and waits for it.
fn quit(mut vm: Vm, mut q: Qmp) {
    let _ = q.execute("quit", None);
    let start = Instant::now();
    while vm.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "QEMU did not quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A qcow2 disk holding `bytes`.
fn qcow2_disk(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
    let disk = dir.join("disk.qcow2");
    write_qcow2(&disk, bytes);
    disk
}

fn write(q: &mut Qmp, model: &mut [u8], pattern: u8, at: usize, len: usize) {
    guest_write(q, pattern, at, len);
    model[at..at + len].fill(pattern);
}

#[test]
fn a_day_two_reads_the_bitmap_and_a_qcow2s_chain_survives_a_restart() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 249) as u8 + 1).collect();
    let disk = qcow2_disk(t.path(), &model);
    let (vm1, mut q) = start_vm_watched(t.path(), &disk, "qcow2");

    let b1 = backup(&vault, &vm1.qmp);
    let first = b1["cbt"]["generation"].as_str().unwrap().to_string();
    assert_eq!(b1["cbt"]["source"], "bitmap", "{b1}");
    assert_eq!(chain(&mut q), [(first.clone(), true, true)]);
    restores_to(&vault, t.path(), b1["id"].as_str(), &model);

    write(&mut q, &mut model, 0x5a, 1 << 20, BLOCK);
    let b2 = backup(&vault, &vm1.qmp);
    let c = &b2["cbt"];
    assert_eq!(c["used"], true, "{b2}");
    assert_eq!(c["dirty_bytes"], BLOCK as u64, "{b2}");
    assert_eq!(c["mismatches"], 0, "{b2}");
    // What the bitmap marks, and the audit's sample of the clean blocks.
    let read = b2["stats"]["bytes_read"].as_u64().unwrap();
    let sampled = c["sampled"].as_u64().unwrap();
    assert_eq!(read, (1 + sampled) * BLOCK as u64, "{b2}");
    let second = c["generation"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    // The parent's bitmap went once the point was committed.
    assert_eq!(chain(&mut q), [(second.clone(), true, true)]);
    restores_to(&vault, t.path(), b2["id"].as_str(), &model);

    // A restart: the persistent bitmap comes back from the qcow2.
    quit(vm1, q);
    let (vm2, mut q) = start_vm_watched(t.path(), &disk, "qcow2");
    assert_eq!(chain(&mut q), [(second.clone(), true, true)]);
    write(&mut q, &mut model, 0x6b, 5 << 20, BLOCK);
    let b3 = backup(&vault, &vm2.qmp);
    assert_eq!(b3["cbt"]["used"], true, "{b3}");
    assert_eq!(b3["cbt"]["dirty_bytes"], BLOCK as u64, "{b3}");
    restores_to(&vault, t.path(), b3["id"].as_str(), &model);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}

#[test]
fn a_raw_disks_chain_ends_with_its_qemu_and_the_next_backup_reads_all() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let disk = t.path().join("disk.raw");
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 241) as u8).collect();
    std::fs::write(&disk, &model).unwrap();
    let (vm1, mut q) = start_vm_watched(t.path(), &disk, "raw");
    backup(&vault, &vm1.qmp);
    let bitmaps = chain(&mut q);
    assert_eq!(bitmaps.len(), 1);
    assert!(!bitmaps[0].2, "a raw node cannot store a persistent bitmap");
    quit(vm1, q);
    let (vm2, mut q) = start_vm_watched(t.path(), &disk, "raw");
    write(&mut q, &mut model, 0x33, 2 << 20, BLOCK);
    let b = backup_as(&vault, &vm2.qmp, "CompletedWithWarnings");
    assert_eq!(b["cbt"]["used"], false, "{b}");
    let warnings = b["job"]["stats"]["warnings"].to_string();
    assert!(warnings.contains("is not on node"), "{warnings}");
    restores_to(&vault, t.path(), b["id"].as_str(), &model);
}

#[test]
fn a_lying_bitmap_is_caught_by_the_audit() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 239) as u8).collect();
    let disk = qcow2_disk(t.path(), &model);
    let (vm, mut q) = start_vm_watched(t.path(), &disk, "qcow2");
    let b1 = backup(&vault, &vm.qmp);
    // Every block changes, then the bitmap is wiped: it now says nothing
    // changed.
    for at in (0..SIZE).step_by(1 << 20) {
        write(&mut q, &mut model, 0x77, at, 1 << 20);
    }
    let name = b1["cbt"]["generation"].as_str().unwrap();
    q.execute(
        "block-dirty-bitmap-clear",
        Some(json!({ "node": "disk0", "name": name })),
    )
    .unwrap();
    let b2 = backup_as(&vault, &vm.qmp, "CompletedWithWarnings");
    let c = &b2["cbt"];
    assert_eq!(c["used"], false, "{b2}");
    assert!(c["mismatches"].as_u64().unwrap() > 0, "{b2}");
    assert!(
        c["fallback"]
            .as_str()
            .unwrap()
            .contains("differ from the parent"),
        "{b2}"
    );
    restores_to(&vault, t.path(), b2["id"].as_str(), &model);
}

/// A backup killed after its instant (mid-transfer) leaves the chain with
/// the parent's bitmap disabled and its own recording: the next backup
/// merges the two, reads every write since the parent, and the chain ends
/// with one bitmap again.
#[test]
fn a_run_killed_after_its_instant_leaves_a_chain_the_next_merges() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let mut model = vec![0u8; 32 << 20];
    random_file(&t.path().join("seed.bin"), model.len(), 11);
    model.copy_from_slice(&std::fs::read(t.path().join("seed.bin")).unwrap());
    let disk = qcow2_disk(t.path(), &model);
    let (vm, mut q) = start_vm_watched(t.path(), &disk, "qcow2");
    let b1 = backup(&vault, &vm.qmp);
    write(&mut q, &mut model, 0x41, 1 << 20, BLOCK);
    // Enough changes that the killed run is still reading when killed.
    for at in (8 << 20..24 << 20).step_by(1 << 20) {
        write(&mut q, &mut model, 0x42, at, 1 << 20);
    }
    let mut child = coffre()
        .args(live_backup_args(
            &vault,
            &vm.qmp,
            "vda",
            &["--rate-limit", "1M"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while chain(&mut q).len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no instant taken"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let left = chain(&mut q);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        !left[0].1 && left[1].1,
        "base disabled, new recording: {left:?}"
    );
    write(&mut q, &mut model, 0x43, 3 << 20, BLOCK);

    let b3 = backup(&vault, &vm.qmp);
    let c = &b3["cbt"];
    assert_eq!(c["used"], true, "{b3}");
    assert_eq!(
        c["dirty_bytes"].as_u64().unwrap(),
        (2 * BLOCK + (16 << 20)) as u64,
        "{b3}"
    );
    assert_ne!(c["generation"], b1["cbt"]["generation"]);
    assert_eq!(chain(&mut q).len(), 1, "{:?}", chain(&mut q));
    restores_to(&vault, t.path(), b3["id"].as_str(), &model);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}

/// An item `coffre backup --qmp` protected is backed up on its schedule
/// through QEMU too (`run-due`), continuing the same bitmap chain.
#[test]
fn the_scheduler_backs_up_a_running_vms_drive_through_its_chain() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 233) as u8).collect();
    let disk = qcow2_disk(t.path(), &model);
    let (vm, mut q) = start_vm_watched(t.path(), &disk, "qcow2");
    let b1 = json_at(
        "2027-01-01T01:00:00Z",
        &live_backup_args(&vault, &vm.qmp, "vda", &[]),
    );
    assert_eq!(b1["auto_protected"], true, "{b1}");
    write(&mut q, &mut model, 0x21, 7 << 20, BLOCK);
    let pass = json_at("2027-01-01T03:00:00Z", &["run-due", "--vault", s(&vault)]);
    assert_eq!(pass["backups"][0]["status"], "Completed", "{pass}");
    let pts = json(&["points", "--vault", s(&vault), "--item", "vm"]);
    let last = pts.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["scheduled"], true, "{last}");
    assert_eq!(last["cbt"]["used"], true, "{last}");
    assert_eq!(last["cbt"]["dirty_bytes"], BLOCK as u64, "{last}");
    assert_eq!(chain(&mut q).len(), 1);
    restores_to(&vault, t.path(), last["id"].as_str(), &model);
}

/// The chain's bitmaps on node `disk0` that QEMU reports `inconsistent`.
fn inconsistent(q: &mut Qmp) -> Vec<String> {
    let nodes = q
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .unwrap();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap()
        .clone();
    node["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|b| b["inconsistent"] == true)
        .filter_map(|b| b["name"].as_str().map(str::to_string))
        .collect()
}

/// A qcow2 whose QEMU was killed (SIGKILL) while it held the chain's
/// persistent bitmap comes back with the bitmap `inconsistent`: the next
/// backup never reads it as its base (QEMU would refuse to export it), reads
/// everything with a warning naming it, and removes it once its point is
/// committed; the chain then goes on from the new bitmap.
#[test]
fn an_inconsistent_bitmap_after_a_killed_qemu_is_never_a_base_and_is_removed() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 229) as u8).collect();
    let disk = qcow2_disk(t.path(), &model);
    let (vm1, q) = start_vm_watched(t.path(), &disk, "qcow2");
    let b1 = backup(&vault, &vm1.qmp);
    let first = b1["cbt"]["generation"].as_str().unwrap().to_string();
    // A clean stop stores the bitmap in the qcow2; the next QEMU marks it
    // in use there, and is killed while it records.
    quit(vm1, q);
    let (vm2, mut q) = start_vm_watched(t.path(), &disk, "qcow2");
    assert_eq!(chain(&mut q), [(first.clone(), true, true)]);
    write(&mut q, &mut model, 0x3c, 2 << 20, BLOCK);
    drop(q);
    drop(vm2);
    let (vm3, mut q) = start_vm_watched(t.path(), &disk, "qcow2");
    assert_eq!(inconsistent(&mut q), [first.as_str()], "QEMU 7.2 flags it");
    write(&mut q, &mut model, 0x4d, 6 << 20, BLOCK);

    let b2 = backup_as(&vault, &vm3.qmp, "CompletedWithWarnings");
    let c = &b2["cbt"];
    assert_eq!(c["used"], false, "{b2}");
    let warnings = b2["job"]["stats"]["warnings"].to_string();
    assert!(
        warnings.contains(&first) && warnings.contains("inconsistent"),
        "{warnings}"
    );
    let second = c["generation"].as_str().unwrap().to_string();
    assert_eq!(
        chain(&mut q),
        [(second, true, true)],
        "removed once committed"
    );
    assert_eq!(inconsistent(&mut q), Vec::<String>::new());
    restores_to(&vault, t.path(), b2["id"].as_str(), &model);

    write(&mut q, &mut model, 0x5e, 9 << 20, BLOCK);
    let b3 = backup(&vault, &vm3.qmp);
    assert_eq!(b3["cbt"]["used"], true, "{b3}");
    assert_eq!(b3["cbt"]["dirty_bytes"], BLOCK as u64, "{b3}");
    restores_to(&vault, t.path(), b3["id"].as_str(), &model);
}
