//! libvirt for the domain-backup tests: the daemons started when they are
//! not running (CI has no systemd: `virtlogd -d`, then `libvirtd -d`, as
//! root), transient domains with no guest OS (TCG, q35, 64 MiB, virtio
//! disks) destroyed when dropped, and "guest" writes through a disk's
//! virtio device with HMP `qemu-io`, which pass QEMU's backup filters like
//! a guest's would.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::*;

/// The connection every test uses.
pub const CONNECT: &str = "qemu:///system";

/// Runs `virsh -c qemu:///system ARGS…`; its stdout, or its stderr as the
/// error.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .args(["-c", CONNECT, "-q"])
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

static STARTED: Mutex<bool> = Mutex::new(false);

/// True when libvirt can run a QEMU domain here, starting `virtlogd` and
/// `libvirtd` when they are not running; otherwise says SKIP and why.
pub fn libvirt_ready() -> bool {
    if !is_root() {
        skip("libvirt domain backup: needs root (qemu:///system)");
        return false;
    }
    for program in [
        "virsh",
        "libvirtd",
        "virtlogd",
        "qemu-system-x86_64",
        "qemu-img",
    ] {
        if !have(program) {
            skip(&format!(
                "libvirt domain backup: {program} missing (scripts/install-deps.sh installs libvirt-daemon-system, libvirt-clients, libvirt-daemon-driver-qemu and QEMU)"
            ));
            return false;
        }
    }
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    if !*started {
        if let Err(why) = start_daemons() {
            skip(&format!("libvirt domain backup: {why}"));
            return false;
        }
        *started = true;
    }
    true
}

fn running(name: &str) -> bool {
    Command::new("pgrep")
        .args(["-x", name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start_daemons() -> Result<(), String> {
    // Without udev, /dev/kvm stays root-only, and libvirt 9.0 then probes
    // QEMU's capabilities again at every lookup (it finds KVM usable when
    // probing, not usable for the QEMU user after): a domain takes a minute
    // to start. Debian's udev rule gives the device to group kvm.
    let kvm = Path::new("/dev/kvm");
    if kvm.exists() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(kvm).map_err(|e| format!("/dev/kvm: {e}"))?;
        if meta.gid() == 0 && meta.mode() & 0o060 != 0o060 {
            let _ = Command::new("chgrp").args(["kvm", "/dev/kvm"]).status();
            let _ = std::fs::set_permissions(kvm, std::fs::Permissions::from_mode(0o660));
        }
    }
    for daemon in ["virtlogd", "libvirtd"] {
        if !running(daemon) {
            let status = Command::new(daemon)
                .arg("-d")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("cannot start {daemon}: {e}"))?;
            if !status.success() {
                return Err(format!("{daemon} -d failed ({status})"));
            }
        }
    }
    let start = Instant::now();
    loop {
        match virsh(&["uri"]) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(20) => {
                return Err(format!("libvirtd does not answer: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A domain destroyed (and undefined, with its checkpoints) when dropped.
pub struct Dom {
    pub name: String,
}

impl Drop for Dom {
    fn drop(&mut self) {
        let _ = virsh(&["domjobabort", &self.name]);
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name, "--checkpoints-metadata"]);
    }
}

/// A domain name unique to this test process and `tag`.
pub fn dom_name(tag: &str) -> String {
    format!("coffre-t{}-{tag}", std::process::id())
}

/// The XML of domain `name` with `disks` (path, format: `raw` or `qcow2`)
/// as vda, vdb, …, and `extra` devices.
pub fn domain_xml(name: &str, disks: &[(&Path, &str)], extra: &str) -> String {
    let mut devices = String::new();
    for (i, (path, format)) in disks.iter().enumerate() {
        devices.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{format}'/><source file='{}'/><target dev='vd{}' bus='virtio'/></disk>\n",
            path.display(),
            (b'a' + i as u8) as char
        ));
    }
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {devices}{extra}
  </devices>
</domain>
"
    )
}

/// Makes `dir` and the disk files in it reachable by the QEMU user.
pub fn share(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// Starts a transient domain from `xml` (written to `dir`).
pub fn create(dir: &Path, name: &str, xml: &str) -> Dom {
    let file = dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    share(dir);
    virsh(&["create", s(&file)]).unwrap_or_else(|e| panic!("virsh create {name}: {e}"));
    Dom {
        name: name.to_string(),
    }
}

/// Defines a persistent domain from `xml`, not started.
pub fn define(dir: &Path, name: &str, xml: &str) -> Dom {
    let file = dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    share(dir);
    virsh(&["define", s(&file)]).unwrap_or_else(|e| panic!("virsh define {name}: {e}"));
    Dom {
        name: name.to_string(),
    }
}

/// Writes `len` bytes of `pattern` at `at` through disk `index` (0 = vda)
/// of the running domain, as the guest would.
pub fn guest_write(dom: &Dom, index: usize, pattern: u8, at: u64, len: u64) {
    let cmd = format!(
        "qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend \"write -P {pattern} {at} {len}\""
    );
    let out = virsh(&["qemu-monitor-command", &dom.name, "--hmp", &cmd])
        .unwrap_or_else(|e| panic!("qemu-io on {}: {e}", dom.name));
    assert!(out.trim().is_empty(), "qemu-io: {out}");
}

/// What `write -P pattern at len` does to an expected image.
pub fn expect_write(image: &Path, pattern: u8, at: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&vec![pattern; len as usize], at).unwrap();
}

/// The names of the domain's checkpoints.
pub fn checkpoints(dom: &Dom) -> Vec<String> {
    virsh(&["checkpoint-list", &dom.name, "--name"])
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// True when the domain runs a backup job.
pub fn has_backup_job(dom: &Dom) -> bool {
    virsh(&["backup-dumpxml", &dom.name]).is_ok()
}

/// A qcow2 image of `size` bytes holding what `writes` (pattern, offset,
/// length) put there, and its expected raw content at `expected`.
pub fn qcow2_image(path: &Path, expected: &Path, size: u64, writes: &[(u8, u64, u64)]) {
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", s(path), &size.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::write(expected, vec![0u8; size as usize]).unwrap();
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for (p, at, len) in writes {
        io.arg("-c").arg(format!("write -P {p} {at} {len}"));
        expect_write(expected, *p, *at, *len);
    }
    let out = io.arg(s(path)).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}
