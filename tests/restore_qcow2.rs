//! Restore to qcow2 through the real `qemu-img`: `--format qcow2` writes a
//! new qcow2 that `qemu-img check` passes and that `qemu-img convert -O
//! raw` turns back into the point byte for byte, sparse, private, with no
//! temporary left; a missing `qemu-img` and a full disk fail clearly and
//! leave nothing. In place, a VM's qcow2 disk is refused while a real QEMU
//! holds it (exit 14, the disk untouched), and once the VM is off it is
//! replaced whole by the point, keeping its cluster size, owner and mode.
//! A raw disk a running VM holds is refused the same way. Skipped with a
//! message where `qemu-img` (or, for the VM, `qemu-system-x86_64`) is
//! missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use coffre_engine::snapshotter::vm::qmp::Qmp;

use crate::common::qemu::*;
use crate::common::*;

/// True when `qemu-img` runs; says SKIP otherwise.
fn have_qemu_img() -> bool {
    tools_run(
        &["qemu-img"],
        "restore to qcow2: qemu-img missing (apt-get install qemu-utils)",
    )
}

/// `qemu-img ARGS…`, which must succeed; returns stdout.
fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The raw content of the qcow2 `img`, converted into `dir`.
fn as_raw(img: &Path, dir: &Path) -> PathBuf {
    let raw = dir.join("converted-back.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(img), s(&raw)]);
    raw
}

/// `qemu-img info` of `img` as JSON.
fn info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", "-f", "qcow2", s(img)])).unwrap()
}

/// Starts a VM on `disk` in `dir` and waits until its monitor answers:
/// QEMU then has the disk open (and locked).
fn running_vm(dir: &Path, disk: &Path, format: &str) -> Vm {
    let vm = start_vm_as(dir, disk, format, &[]);
    let mut q = Qmp::connect(&vm.qmp, Duration::from_secs(20)).unwrap();
    q.execute("query-status", None).unwrap();
    vm
}

/// Files in `dir` whose names start with a dot (coffre's temporaries).
fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A vault with one point of a 24 MiB (and 12 KiB) image with holes, as
/// item `vm`.
fn one_point(t: &Path) -> (PathBuf, PathBuf) {
    let vault = new_vault(t, &[]);
    let img = t.join("vm.img");
    mixed_image(&img, (24 << 20) + (12 << 10), 5);
    ok(&["backup", "--vault", s(&vault), "--item", "vm", s(&img)]);
    (vault, img)
}

#[test]
fn a_point_restores_to_a_qcow2_that_converts_back_byte_identical() {
    if !have_qemu_img() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (vault, img) = one_point(t.path());
    let out_dir = t.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let q = out_dir.join("vm.qcow2");
    for from in ["snapshot", "vault"] {
        let mut args = restore_args(&vault, "vm", None, &q, true);
        args.extend(["--format", "qcow2", "--from", from]);
        let r = json(&args);
        assert_eq!(r["format"], "qcow2", "{r}");
        assert_eq!(r["in_place"], false, "{r}");
        qemu_img(&["check", "-q", "-f", "qcow2", s(&q)]);
        assert_eq!(info(&q)["format"], "qcow2");
        assert_same(&as_raw(&q, t.path()), &img);
        assert_eq!(mode(&q), 0o600, "--from {from}");
        // Holes stay unallocated clusters: the qcow2 holds about the data.
        let data = std::fs::read(&img)
            .unwrap()
            .chunks(64 << 10)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count() as u64
            * (64 << 10);
        let size = std::fs::metadata(&q).unwrap().len();
        assert!(
            size < data + (2 << 20),
            "qcow2 of {size} bytes for {data} bytes of data"
        );
        assert!(hidden(&out_dir).is_empty(), "{:?}", hidden(&out_dir));
    }
    // Without --force an existing file stays.
    let mut args = restore_args(&vault, "vm", None, &q, false);
    args.extend(["--format", "qcow2"]);
    let err = fails(&args, 1);
    assert!(err.contains("already exists"), "{err}");
    // --mode applies to the qcow2.
    let mut args = restore_args(&vault, "vm", None, &q, true);
    args.extend(["--format", "qcow2", "--mode", "640"]);
    ok(&args);
    assert_eq!(mode(&q), 0o640);

    // A point whose size is not whole sectors: qcow2 pads it with zeros.
    let odd = t.path().join("odd.img");
    random_file(&odd, (1 << 20) + 1001, 6);
    ok(&["backup", "--vault", s(&vault), "--item", "odd", s(&odd)]);
    let oq = out_dir.join("odd.qcow2");
    let mut args = restore_args(&vault, "odd", None, &oq, false);
    args.extend(["--format", "qcow2"]);
    let text = ok(&args);
    assert!(text.contains("padded"), "{text}");
    let back = std::fs::read(as_raw(&oq, t.path())).unwrap();
    let want = std::fs::read(&odd).unwrap();
    assert_eq!(back.len(), want.len().next_multiple_of(512));
    assert!(back[..want.len()] == want[..] && back[want.len()..].iter().all(|&b| b == 0));
}

#[test]
fn without_qemu_img_the_error_says_so_and_nothing_is_left() {
    let t = tempfile::tempdir().unwrap();
    let (vault, _) = one_point(t.path());
    let out_dir = t.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let q = out_dir.join("vm.qcow2");
    let empty = t.path().join("no-tools");
    std::fs::create_dir(&empty).unwrap();
    let mut args = restore_args(&vault, "vm", None, &q, false);
    args.extend(["--format", "qcow2"]);
    let out = coffre().args(&args).env("PATH", &empty).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("qemu-img is not installed") && err.contains("vm.qcow2"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);
}

/// A tmpfs of `size`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_during_the_conversion_fails_clearly_and_leaves_nothing() {
    if !have_qemu_img() {
        return;
    }
    if !is_root() {
        skip("restore to qcow2 on a full disk: mounting a small tmpfs needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    random_file(&img, 6 << 20, 8);
    ok(&["backup", "--vault", s(&vault), "--item", "vm", s(&img)]);
    let mnt = t.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    // Room for the raw scratch file, not for the qcow2 beside it.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=9m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs failed");
    let _guard = Tmpfs(mnt.clone());
    let q = mnt.join("vm.qcow2");
    let mut args = restore_args(&vault, "vm", None, &q, false);
    args.extend(["--format", "qcow2"]);
    let err = fails(&args, 8);
    assert!(
        err.contains("vm.qcow2") && err.contains("qemu-img convert failed"),
        "{err}"
    );
    assert!(!err.contains("/proc/"), "{err}");
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
}

#[test]
fn a_vms_qcow2_disk_is_refused_while_it_runs_and_replaced_once_it_is_off() {
    if !have_qemu_img() || !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (vault, img) = one_point(t.path());
    // The VM's disk, a day later: other data, 128 KiB clusters, mode 0640.
    let day2 = t.path().join("day2.img");
    std::fs::copy(&img, &day2).unwrap();
    churn(&day2, 20, 100_000, 9);
    let vm_dir = t.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let disk = vm_dir.join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=131072",
        s(&day2),
        s(&disk),
    ]);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let before = std::fs::read(&disk).unwrap();
    let mut args = restore_args(&vault, "vm", None, &disk, true);
    args.push("--in-place");

    let vm = running_vm(&vm_dir, &disk, "qcow2");
    let err = fails(&args, 14);
    assert!(
        err.contains(s(&disk)) && err.contains("the VM must be off") && err.contains("lock"),
        "{err}"
    );
    assert!(err.contains("nothing was written"), "{err}");
    assert!(std::fs::read(&disk).unwrap() == before, "the disk changed");
    assert!(hidden(&vm_dir).is_empty(), "{:?}", hidden(&vm_dir));
    // Explicitly as qcow2, the same.
    let mut explicit = args.clone();
    explicit.extend(["--format", "qcow2"]);
    fails(&explicit, 14);

    // The VM stops: the disk is replaced by the point.
    drop(vm);
    let r = json(&args);
    assert_eq!(r["format"], "qcow2", "{r}");
    assert_eq!(r["in_place"], true, "{r}");
    qemu_img(&["check", "-q", "-f", "qcow2", s(&disk)]);
    assert_same(&as_raw(&disk, t.path()), &img);
    assert_eq!(info(&disk)["cluster-size"], 131072);
    assert_eq!(mode(&disk), 0o640);
    let left: Vec<String> = std::fs::read_dir(&vm_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "disk.qcow2" && n != "qmp.sock")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A VM starts on the restored disk (and holds it again).
    let again = t.path().join("vm-again");
    std::fs::create_dir(&again).unwrap();
    let vm = running_vm(&again, &disk, "qcow2");
    fails(&args, 14);
    drop(vm);
}

#[test]
fn a_raw_disk_a_running_vm_holds_is_refused_in_place() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (vault, img) = one_point(t.path());
    let disk = t.path().join("disk.raw");
    std::fs::copy(&img, &disk).unwrap();
    churn(&disk, 5, 50_000, 3);
    let before = std::fs::read(&disk).unwrap();
    let mut args = restore_args(&vault, "vm", None, &disk, true);
    args.push("--in-place");
    let vm = running_vm(t.path(), &disk, "raw");
    let err = fails(&args, 14);
    assert!(
        err.contains(s(&disk)) && err.contains("the VM must be off"),
        "{err}"
    );
    assert!(std::fs::read(&disk).unwrap() == before, "the disk changed");
    drop(vm);
    let r = json(&args);
    assert_eq!(r["format"], "raw", "{r}");
    assert_same(&disk, &img);
}

#[test]
fn qcow2_in_place_needs_a_qcow2_target() {
    let t = tempfile::tempdir().unwrap();
    let (vault, img) = one_point(t.path());
    let raw = t.path().join("disk.raw");
    std::fs::copy(&img, &raw).unwrap();
    let mut args = restore_args(&vault, "vm", None, &raw, true);
    args.extend(["--in-place", "--format", "qcow2"]);
    let err = fails(&args, 1);
    assert!(
        err.contains("not a qcow2 image") && err.contains("disk.raw"),
        "{err}"
    );
}
