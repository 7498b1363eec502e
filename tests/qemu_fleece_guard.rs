//! What keeps a live backup's point in time (`coffre backup --qmp`) from
//! hurting the guest or another backup, against a real QEMU 7.2:
//! - an overlay whose file system fills up breaks the backup, never the
//!   guest's writes (QEMU's copy-before-write filter set to
//!   `break-snapshot`), and nothing is left behind;
//! - a second backup on the same monitor fails at once, naming the first
//!   (the host lock), and the first completes;
//! - two vaults backing up one drive through two monitors never take each
//!   other's point for a leftover (names per vault and item);
//! - a killed run's work folder is removed by the next run of its vault
//!   and item, and nothing else is;
//! - `--fleece-dir` is recorded with the item's source and the scheduler
//!   uses it.
//!
//! The test watches QEMU through a second monitor (QEMU serves one client
//! per monitor). Skipped with a message where QEMU is missing, and where
//! a small file system cannot be mounted (not root).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use coffre_engine::snapshotter::vm::monitor_lock::lock_dir;
use coffre_engine::snapshotter::vm::qmp::Qmp;

use crate::common::qemu::*;
use crate::common::*;

const MIB: usize = 1 << 20;

/// `coffre backup --qmp` of `disk0` as item `vm` into `vault` through
/// monitor `qmp`, reading at 1 MiB/s so it is still reading when the test
/// acts, with `extra` arguments.
fn slow_backup(vault: &Path, qmp: &Path, extra: &[&str]) -> Child {
    let mut args = live_backup_args(vault, qmp, "disk0", &["--rate-limit", "1M"]);
    args.extend_from_slice(extra);
    let mut all = vec!["--output", "json"];
    all.extend(args);
    coffre()
        .args(all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` and returns (success, stdout, stderr).
fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The entries of folder `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut all: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    all.sort();
    all
}

#[test]
fn a_full_overlay_fails_the_backup_and_the_guests_writes_go_on() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let fleece = t.path().join("fleece");
    let Some(_mounted) = small_tmpfs(&fleece, "2m", "a full overlay") else {
        return;
    };
    let vault = new_vault(t.path(), &[]);
    let disk = t.path().join("disk.img");
    random_file(&disk, 64 * MIB, 3);
    let (vm, mut q) = start_vm_watched(t.path(), &disk, "raw");
    // Read 16 MiB at a time at 4 MiB/s: the last quarter is read seconds
    // after the guest wrote it.
    let mut args = live_backup_args(&vault, &vm.qmp, "disk0", &["--rate-limit", "4M"]);
    args.extend_from_slice(&["--fleece-dir", s(&fleece)]);
    let child = coffre()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_node(&mut q, &fleece_names(&vault, "vm").export);
    // The guest overwrites 8 MiB of data: their old data cannot all go
    // into a 2 MiB overlay.
    for i in 48..56 {
        guest_write(&mut q, 0x5a, i * MIB, MIB);
    }
    let on_disk = std::fs::read(&disk).unwrap();
    assert!(
        on_disk[48 * MIB..56 * MIB].iter().all(|&b| b == 0x5a),
        "a guest write failed"
    );
    let (ok, out, err) = finish(child);
    assert!(!ok, "the backup of a broken point succeeded: {out}");
    assert!(
        err.contains("broke while it was read") && err.contains("is full"),
        "{err}"
    );
    assert_eq!(coffre_nodes(&mut q), Vec::<String>::new(), "left in QEMU");
    assert_eq!(entries(&fleece), Vec::<String>::new(), "left in the folder");
    let status = q.execute("query-status", None).unwrap();
    assert_eq!(
        status["status"], "prelaunch",
        "the VM was not paused: {status}"
    );
}

#[test]
fn a_second_backup_on_the_same_monitor_fails_at_once_naming_the_first() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let a = new_vault(&t.path().join("a"), &[]);
    let b = new_vault(&t.path().join("b"), &[]);
    let disk = t.path().join("disk.img");
    random_file(&disk, 6 * MIB, 4);
    let (vm, mut q) = start_vm_watched(t.path(), &disk, "raw");
    let first = slow_backup(&a, &vm.qmp, &[]);
    let pid = first.id();
    wait_for_node(&mut q, &fleece_names(&a, "vm").export);
    // Into another vault, the drive named by its device (an image is
    // protected in one vault only).
    let start = Instant::now();
    let out = run(&live_backup_args(&b, &vm.qmp, "vda", &[]));
    assert!(!out.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "it waited for the monitor"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is using this QEMU monitor") && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    let (ok, out, err) = finish(first);
    assert!(ok, "{out}\n{err}");
    restores_to(&a, t.path(), None, &std::fs::read(&disk).unwrap());
    // Once it is done, the second goes through.
    let done = json(&live_backup_args(&b, &vm.qmp, "vda", &[]));
    assert_eq!(done["job"]["status"], "Completed", "{done}");
    assert_eq!(coffre_nodes(&mut q), Vec::<String>::new());
}

#[test]
fn two_vaults_on_one_drive_through_two_monitors_never_remove_each_others_point() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let a = new_vault(&t.path().join("a"), &[]);
    let b = new_vault(&t.path().join("b"), &[]);
    let disk = t.path().join("disk.img");
    random_file(&disk, 6 * MIB, 5);
    let second: PathBuf = t.path().join("second.sock");
    let (vm, mut q) = {
        let watch = t.path().join("watch.sock");
        let vm = start_vm_as(
            t.path(),
            &disk,
            "raw",
            &[
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", second.display()),
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", watch.display()),
            ],
        );
        let q = Qmp::connect(&watch, Duration::from_secs(20)).unwrap();
        (vm, q)
    };
    let first = slow_backup(&a, &vm.qmp, &[]);
    let ours = fleece_names(&a, "vm");
    wait_for_node(&mut q, &ours.export);
    // The same item into another vault, through the other monitor, while
    // the first is reading: it leaves the first's point alone.
    let out = run(&live_backup_args(&b, &second, "disk0", &[]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds another coffre backup's point in time") && err.contains(&ours.filter),
        "{err}"
    );
    let left = coffre_nodes(&mut q);
    assert!(
        left.contains(&ours.export) && left.contains(&ours.filter),
        "{left:?}"
    );
    let (ok, out, err) = finish(first);
    assert!(ok, "the first backup broke: {out}\n{err}");
    let bytes = std::fs::read(&disk).unwrap();
    restores_to(&a, t.path(), None, &bytes);
    backup_drive(&b, &second);
    restores_to(&b, t.path(), None, &bytes);
    assert_eq!(coffre_nodes(&mut q), Vec::<String>::new());
}

#[test]
fn a_killed_runs_work_folder_is_removed_by_its_next_run_and_nothing_else() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let fleece = t.path().join("fleece");
    std::fs::create_dir(&fleece).unwrap();
    let disk = t.path().join("disk.img");
    random_file(&disk, 8 * MIB, 6);
    let (vm, mut q) = start_vm_watched(t.path(), &disk, "raw");
    let names = fleece_names(&vault, "vm");
    let mut child = slow_backup(&vault, &vm.qmp, &["--fleece-dir", s(&fleece)]);
    wait_for_node(&mut q, &names.export);
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = entries(&fleece);
    assert_eq!(killed.len(), 1, "{killed:?}");
    let prefix = format!("coffre-fleece-{}-", names.tag);
    assert!(killed[0].starts_with(&prefix), "{killed:?}");
    assert_eq!(
        entries(&fleece.join(&killed[0])),
        ["overlay.qcow2", "owner.lock"]
    );
    // Its NBD socket is in the private lock folder, under the same name.
    let socket = lock_dir().join(format!(
        "{}.sock",
        killed[0].strip_prefix("coffre-fleece-").unwrap()
    ));
    assert!(socket.exists(), "{}", socket.display());
    // What is not a dead folder of this vault and item stays: another
    // vault's or item's, one whose owner lives, a name coffre does not
    // make, a file, a symbolic link.
    let other = fleece.join(format!(
        "coffre-fleece-{}-0badc0de",
        fleece_names(&vault, "vm2").tag
    ));
    std::fs::create_dir(&other).unwrap();
    let live = fleece.join(format!("{prefix}12345678"));
    std::fs::create_dir(&live).unwrap();
    let held = std::fs::File::create(live.join("owner.lock")).unwrap();
    held.lock().unwrap();
    std::fs::create_dir(fleece.join(format!("{prefix}1234567g"))).unwrap();
    std::fs::write(fleece.join(format!("{prefix}abcdef01")), b"x").unwrap();
    let target = t.path().join("not-coffres");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("owner.lock"), b"").unwrap();
    std::os::unix::fs::symlink(&target, fleece.join(format!("{prefix}0000beef"))).unwrap();
    let before = entries(&fleece);

    let b = json(&live_backup_args(
        &vault,
        &vm.qmp,
        "disk0",
        &["--fleece-dir", s(&fleece)],
    ));
    assert_eq!(b["job"]["status"], "Completed", "{b}");
    let after = entries(&fleece);
    let expected: Vec<String> = before.into_iter().filter(|e| *e != killed[0]).collect();
    assert_eq!(after, expected, "only the killed run's folder goes");
    assert!(target.join("owner.lock").exists());
    assert!(!socket.exists(), "{}", socket.display());
    assert_eq!(coffre_nodes(&mut q), Vec::<String>::new());
    restores_to(&vault, t.path(), None, &std::fs::read(&disk).unwrap());
    drop(held);
}

#[test]
fn the_fleece_dir_is_recorded_with_the_item_and_the_scheduler_uses_it() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let fleece = t.path().join("big disk & more");
    std::fs::create_dir(&fleece).unwrap();
    let disk = t.path().join("disk.img");
    random_file(&disk, 4 * MIB, 7);
    let (vm, _q) = start_vm_watched(t.path(), &disk, "raw");
    let b = json_at(
        "2027-01-01T01:00:00Z",
        &live_backup_args(&vault, &vm.qmp, "disk0", &["--fleece-dir", s(&fleece)]),
    );
    assert_eq!(b["auto_protected"], true, "{b}");
    let shown = json(&["vault", "show", "--vault", s(&vault)]);
    let source = shown["items"][0]["source"].as_str().unwrap().to_string();
    assert!(
        source.ends_with(&format!(
            "&fleece={}",
            fleece.display().to_string().replace('&', "%26")
        )),
        "{source}"
    );
    // The scheduler's run needs the recorded folder, and says so.
    std::fs::remove_dir(&fleece).unwrap();
    let out = run_at("2027-01-01T03:00:00Z", &["run-due", "--vault", s(&vault)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("fleece folder {}", fleece.display())),
        "{text}"
    );
    std::fs::create_dir(&fleece).unwrap();
    let pass = json_at("2027-01-02T03:00:00Z", &["run-due", "--vault", s(&vault)]);
    assert_eq!(pass["backups"][0]["status"], "Completed", "{pass}");
    assert_eq!(entries(&fleece), Vec::<String>::new());
}
