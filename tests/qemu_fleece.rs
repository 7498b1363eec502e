//! A running QEMU (no guest OS, CPUs stopped: `-S`) with a raw disk
//! attached as a virtio device: coffre takes the disk's point in time
//! through QMP (a fleecing node, `coffre_snapshotter::vm::fleece`), the
//! "guest" overwrites blocks through the device (`qemu-io` on the device,
//! so the writes pass QEMU's copy-before-write filter), coffre backs the
//! export up over NBD, and the point restores byte-identical to the disk
//! as it was at the instant, not as it is after the writes. Then every
//! node, job and export coffre added is gone from QEMU. Skipped with a
//! message where `qemu-system-x86_64` is missing.

use std::process::Stdio;
use std::time::{Duration, Instant};

use coffre_engine::snapshotter::vm::fleece::{Fleece, Names};
use coffre_engine::snapshotter::vm::qmp::Qmp;
use serde_json::json;

use crate::common::qemu::*;
use crate::common::*;

const SIZE: usize = 8 << 20;

#[test]
fn a_running_vms_disk_is_backed_up_as_it_was_at_the_instant() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let disk = t.path().join("disk.img");
    let at_instant = t.path().join("instant.img");
    let mut bytes = vec![0u8; SIZE];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i / 4096 % 251) as u8;
    }
    std::fs::write(&disk, &bytes).unwrap();
    std::fs::write(&at_instant, &bytes).unwrap();
    let vm = start_vm(t.path(), &disk);
    let mut q = Qmp::connect(&vm.qmp, Duration::from_secs(20)).unwrap();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();

    let mut fleece = Fleece::start(&mut q, "disk0", &Names::of("v", "vm"), &work).unwrap();
    assert_eq!(fleece.size, SIZE as u64);
    // The guest keeps writing after the instant: first blocks, a middle
    // range, the last block.
    guest_write(&mut q, 0x55, 0, 65536);
    guest_write(&mut q, 0x66, 3 << 20, 1 << 20);
    guest_write(&mut q, 0x77, SIZE - 4096, 4096);
    assert_eq!(
        std::fs::read(&disk).unwrap()[0],
        0x55,
        "the write reached the disk"
    );

    let uri = fleece.uri();
    let b = json(&["backup", "--vault", s(&vault), "--item", "vm", &uri]);
    assert_eq!(b["job"]["status"], "Completed", "{b}");
    fleece.stop(&mut q);
    assert_eq!(
        coffre_nodes(&mut q),
        Vec::<String>::new(),
        "left behind in QEMU"
    );

    let r = t.path().join("restored.img");
    ok(&restore_args(&vault, "vm", None, &r, false));
    assert_same(&r, &at_instant);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}

#[test]
fn what_a_killed_run_left_in_qemu_is_removed_by_name_by_the_next() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk.img");
    std::fs::write(&disk, vec![0x11u8; 1 << 20]).unwrap();
    let vm = start_vm(t.path(), &disk);
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let names = Names::of("v", "vm");
    {
        // A run that dies holding the fleece: its connection just goes.
        let mut q = Qmp::connect(&vm.qmp, Duration::from_secs(20)).unwrap();
        let f = Fleece::start(&mut q, "disk0", &names, &work).unwrap();
        std::mem::forget(f);
    }
    let mut q = Qmp::connect(&vm.qmp, Duration::from_secs(20)).unwrap();
    let left = coffre_nodes(&mut q);
    assert!(
        left.contains(&names.filter) && left.contains(&names.access),
        "{left:?}"
    );
    // Another vault's or item's run does not take them for its own, and
    // will not take its point beside them.
    let e = Fleece::start(&mut q, "disk0", &Names::of("v2", "vm"), &work).unwrap_err();
    assert!(e.to_string().contains("another coffre backup"), "{e}");
    assert_eq!(coffre_nodes(&mut q), left);
    // The next run of the same item cleans up first, then works: the
    // device writes through its filter again, and gets its node back.
    let mut f = Fleece::start(&mut q, "vda", &names, &work).unwrap();
    f.stop(&mut q);
    assert_eq!(coffre_nodes(&mut q), Vec::<String>::new());
    let devices = q.execute("query-block", None).unwrap();
    assert_eq!(devices[0]["inserted"]["node-name"], "disk0", "{devices}");
    // A node that does not exist, and a monitor that is gone, are named.
    let e = Fleece::start(&mut q, "nope", &names, &work).unwrap_err();
    assert!(
        e.to_string()
            .contains("no block node, drive or device \"nope\""),
        "{e}"
    );
    drop(q);
    drop(vm);
    let e = Qmp::connect(&t.path().join("qmp.sock"), Duration::from_secs(2)).unwrap_err();
    assert!(e.to_string().contains("QEMU monitor"), "{e}");
}

#[test]
fn coffre_backup_qmp_backs_up_a_running_vms_drive_and_cleans_up() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let disk = t.path().join("disk.img");
    let first = t.path().join("first.img");
    let bytes: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 239) as u8).collect();
    std::fs::write(&disk, &bytes).unwrap();
    std::fs::write(&first, &bytes).unwrap();
    let vm = start_vm(t.path(), &disk);
    backup_drive(&vault, &vm.qmp);
    {
        let mut q = Qmp::connect(&vm.qmp, Duration::from_secs(20)).unwrap();
        assert_eq!(coffre_nodes(&mut q), Vec::<String>::new(), "left behind");
        guest_write(&mut q, 0x42, 1 << 20, 65536);
    }
    backup_drive(&vault, &vm.qmp);
    let pts = json(&["points", "--vault", s(&vault), "--item", "vm"]);
    let pts = pts.as_array().unwrap();
    assert_eq!(pts.len(), 2, "{pts:?}");
    let r = t.path().join("r.img");
    ok(&restore_args(
        &vault,
        "vm",
        pts[0]["id"].as_str(),
        &r,
        false,
    ));
    assert_same(&r, &first);
    std::fs::remove_file(&r).unwrap();
    ok(&restore_args(&vault, "vm", None, &r, false));
    assert_same(&r, &disk);
    // A drive the VM does not have is named.
    let out = run(&[
        "backup",
        "--vault",
        s(&vault),
        "--qmp",
        s(&vm.qmp),
        "--drive",
        "nope",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no block node, drive or device \"nope\""),
        "{err}"
    );
}

/// QEMU has one NBD server: one another user started (libvirt's, with an
/// export of its own) is never stopped by coffre, even when coffre cannot
/// take its point in time beside it.
#[test]
fn a_foreign_nbd_server_and_its_export_are_left_alone() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk.img");
    std::fs::write(&disk, vec![0x11u8; 1 << 20]).unwrap();
    let vm = start_vm(t.path(), &disk);
    let mut q = Qmp::connect(&vm.qmp, Duration::from_secs(20)).unwrap();
    let theirs = t.path().join("theirs.sock");
    q.execute(
        "nbd-server-start",
        Some(json!({ "addr": { "type": "unix", "data": { "path": theirs } } })),
    )
    .unwrap();
    q.execute(
        "block-export-add",
        Some(json!({ "type": "nbd", "id": "libvirt-export", "node-name": "disk0", "writable": false })),
    )
    .unwrap();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let e = Fleece::start(&mut q, "disk0", &Names::of("v", "vm"), &work).unwrap_err();
    assert!(e.to_string().contains("nbd-server-start"), "{e}");
    let exports = q.execute("query-block-exports", None).unwrap();
    let ids: Vec<&str> = exports
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(ids, ["libvirt-export"], "their export survives");
    assert_eq!(
        coffre_nodes(&mut q),
        ["libvirt-export"],
        "nothing of coffre's is left"
    );
}

/// `coffre backup --qmp` killed with SIGKILL in the middle of its transfer
/// leaves its fleece in QEMU; the next backup of the item removes it by
/// name and succeeds, and nothing of coffre's is left after it. (The test
/// watches through a second monitor: QEMU serves one client per monitor.)
#[test]
fn a_backup_killed_mid_transfer_is_cleaned_up_by_the_next() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let disk = t.path().join("disk.img");
    random_file(&disk, 32 << 20, 7);
    let (vm, mut q) = start_vm_watched(t.path(), &disk, "raw");
    let mut child = coffre()
        .args(live_backup_args(
            &vault,
            &vm.qmp,
            "disk0",
            &["--rate-limit", "1M"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let names = fleece_names(&vault, "vm");
    let start = Instant::now();
    while !coffre_nodes(&mut q).contains(&names.export) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the backup never exported its point in time"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Mid-transfer: the export is being read at 1 MiB/s.
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let left = coffre_nodes(&mut q);
    assert!(
        left.contains(&names.filter) && left.contains(&names.export),
        "{left:?}"
    );
    backup_drive(&vault, &vm.qmp);
    assert_eq!(coffre_nodes(&mut q), Vec::<String>::new(), "left behind");
    let r = t.path().join("r.img");
    ok(&restore_args(&vault, "vm", None, &r, false));
    assert_same(&r, &disk);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}
