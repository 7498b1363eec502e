//! A running QEMU for the live-backup tests: no guest OS, CPUs stopped
//! (`-S`), TCG, one disk as block node `disk0` behind virtio device `vda`;
//! "guest" writes go through the device with HMP `qemu-io`, so they pass
//! QEMU's copy-before-write filter like a guest's would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coffre_engine::snapshotter::vm::fleece::Names;
use coffre_engine::snapshotter::vm::qmp::Qmp;
use serde_json::{Value, json};

use super::*;

/// A QEMU process killed when dropped.
pub struct Vm {
    /// The QEMU process.
    pub child: Child,
    /// Its monitor socket.
    pub qmp: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn have_qemu_system() -> bool {
    tools_run(
        &["qemu-system-x86_64"],
        "QEMU live backup: qemu-system-x86_64 missing (apt-get install qemu-system-x86 qemu-utils from one release)",
    )
}

/// Starts QEMU with raw `disk` as block node `disk0` behind device `vda`.
pub fn start_vm(dir: &Path, disk: &Path) -> Vm {
    start_vm_with(dir, disk, &[])
}

/// [`start_vm`] with more arguments (a second monitor, say).
pub fn start_vm_with(dir: &Path, disk: &Path, extra: &[String]) -> Vm {
    start_vm_as(dir, disk, "raw", extra)
}

/// Starts QEMU with `disk` (of `format`: `raw` or `qcow2`) as block node
/// `disk0` behind device `vda`, and `extra` arguments.
pub fn start_vm_as(dir: &Path, disk: &Path, format: &str, extra: &[String]) -> Vm {
    let qmp = dir.join("qmp.sock");
    // A socket a QEMU before left (a restart) would pass for this one's.
    let _ = std::fs::remove_file(&qmp);
    let child = Command::new("qemu-system-x86_64")
        .args(extra)
        .args([
            "-machine",
            "q35,accel=tcg",
            "-S",
            "-nodefaults",
            "-display",
            "none",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=disk0-file",
            disk.display()
        ))
        .arg("-blockdev")
        .arg(format!("driver={format},file=disk0-file,node-name=disk0"))
        .args(["-device", "virtio-blk-pci,drive=disk0,id=vda"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    let start = Instant::now();
    while !qmp.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "QEMU did not open its monitor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Vm { child, qmp }
}

/// [`start_vm_as`] with a second monitor, `watch.sock`, for the test
/// (QEMU serves one client per monitor, and coffre takes the first),
/// connected.
pub fn start_vm_watched(dir: &Path, disk: &Path, format: &str) -> (Vm, Qmp) {
    let watch = dir.join("watch.sock");
    let _ = std::fs::remove_file(&watch);
    let vm = start_vm_as(
        dir,
        disk,
        format,
        &[
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", watch.display()),
        ],
    );
    let q = Qmp::connect(&watch, Duration::from_secs(20)).unwrap();
    (vm, q)
}

/// Writes `bytes` as a qcow2 image at `disk` (a raw file beside it,
/// converted by `qemu-img`, then removed).
pub fn write_qcow2(disk: &Path, bytes: &[u8]) {
    let raw = disk.with_extension("seed.raw");
    std::fs::write(&raw, bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert to {}: {out:?}",
        disk.display()
    );
    std::fs::remove_file(&raw).unwrap();
}

/// The arguments of `coffre backup --qmp QMP --drive DRIVE --item vm`,
/// then `extra`.
pub fn live_backup_args<'a>(
    vault: &'a Path,
    qmp: &'a Path,
    drive: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "backup",
        "--vault",
        s(vault),
        "--qmp",
        s(qmp),
        "--drive",
        drive,
        "--item",
        "vm",
    ];
    args.extend_from_slice(extra);
    args
}

/// Restores point `point` (the latest: `None`) of item `vm` into `dir` and
/// compares it with `expected`, naming the first byte that differs.
pub fn restores_to(vault: &Path, dir: &Path, point: Option<&str>, expected: &[u8]) {
    let r = dir.join("restored.img");
    let _ = std::fs::remove_file(&r);
    ok(&restore_args(vault, "vm", point, &r, false));
    let got = std::fs::read(&r).unwrap();
    assert_eq!(got.len(), expected.len());
    if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("point {point:?} is not the disk at its instant: first difference at byte {i}");
    }
    std::fs::remove_file(&r).unwrap();
}

/// Writes `pattern` at `at` through the device, as a guest would.
pub fn guest_write(q: &mut Qmp, pattern: u8, at: usize, len: usize) {
    let out = q
        .execute(
            "human-monitor-command",
            Some(json!({ "command-line": format!(
                "qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P {pattern} {at} {len}\""
            )})),
        )
        .unwrap();
    assert_eq!(out, Value::String(String::new()), "qemu-io: {out}");
}

/// `coffre backup --qmp` of drive `disk0` as item `vm`, which completes.
pub fn backup_drive(vault: &Path, qmp: &Path) {
    let b = json(&live_backup_args(vault, qmp, "disk0", &[]));
    assert_eq!(b["job"]["status"], "Completed", "{b}");
}

/// Every node, job and export of coffre's (and any export) in QEMU.
pub fn coffre_nodes(q: &mut Qmp) -> Vec<String> {
    let nodes = q
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .unwrap();
    let mut names: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("coffre-"))
        .map(str::to_string)
        .collect();
    let jobs = q.execute("query-block-jobs", None).unwrap();
    names.extend(
        jobs.as_array()
            .unwrap()
            .iter()
            .filter_map(|j| j["device"].as_str().map(str::to_string)),
    );
    let exports = q.execute("query-block-exports", None).unwrap();
    names.extend(
        exports
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["id"].as_str().map(str::to_string)),
    );
    names
}

/// The names in QEMU of the live backups of `item` into `vault`.
pub fn fleece_names(vault: &Path, item: &str) -> Names {
    let config = coffre_vault_store::format::config::VaultConfig::load(vault).unwrap();
    Names::of(&config.vault_id, item)
}

/// A file system mounted for a test, unmounted when dropped.
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A tmpfs of `size` (`mount -o size=`, such as `2m`) at `dir` (created),
/// or `None` after a visible skip naming `what` when it cannot be mounted
/// (not root).
pub fn small_tmpfs(dir: &Path, size: &str, what: &str) -> Option<Mounted> {
    if !is_root() {
        skip(&format!("{what}: mounting a small tmpfs needs root"));
        return None;
    }
    std::fs::create_dir_all(dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
        .arg("tmpfs")
        .arg(dir)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        skip(&format!("{what}: cannot mount a tmpfs here"));
        return None;
    }
    Some(Mounted(dir.to_path_buf()))
}

/// Waits (at most 30 s) until QEMU has `name` among coffre's nodes, jobs
/// and exports.
pub fn wait_for_node(q: &mut Qmp, name: &str) {
    let start = Instant::now();
    while !coffre_nodes(q).iter().any(|n| n == name) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} never appeared in QEMU"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The job `name`'s (status, offset, len) in a `query-jobs` result, if
/// QEMU has it.
pub fn job_in(jobs: &Value, name: &str) -> Option<(String, u64, u64)> {
    jobs.as_array()?.iter().find_map(|j| {
        (j["id"] == name).then(|| {
            (
                j["status"].as_str().unwrap_or_default().to_string(),
                j["current-progress"].as_u64().unwrap_or(0),
                j["total-progress"].as_u64().unwrap_or(0),
            )
        })
    })
}

/// Waits (at most 20 s) until `f` holds.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "waited 20 s for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
