//! The QEMU side of a live restore (`coffre restore --live`): a qcow2
//! target whose backing is coffre's NBD export of the point, given to a
//! VM's device, and QEMU's own `block-stream` job copying every block of
//! the backing into it while the VM runs.
//!
//! - **The target** ([`create_overlay`]) is a qcow2 whose header names its
//!   backing as `json:{"driver":"raw","file":{"driver":"nbd",…}}`
//!   ([`backing_json`]): the export's private socket, its name
//!   `coffre-live-<point id>` ([`export_name`]) and `reconnect-delay`.
//!   The header is what a resumed run reads back ([`read_backing`],
//!   [`parse_backing`]) to serve the same point on the same socket; it is
//!   untrusted there (the name and the socket are checked).
//! - **In QEMU** ([`attach`]) the backing is a `raw` node over an `nbd`
//!   node with `reconnect-delay`, so that while the export is gone (coffre
//!   killed) the VM's reads of blocks not yet streamed wait instead of
//!   failing, for that long. The target is a `qcow2` node above it, and
//!   becomes the drive of the VM's device: an existing device gets it by
//!   `qom-set` of its `drive` (QEMU allows it on a running device: the
//!   device keeps its bus address, the guest sees its disk's contents
//!   change, which is what a restore into a VM started with `-S` wants);
//!   a device id QEMU does not know is created with `device_add` (a
//!   `virtio-blk-pci`, on `bus` when given: a hot-plug, so q35 needs a
//!   free `pcie-root-port`). The device's old node is left to the user.
//! - **The job** ([`start_stream`]) is `block-stream` of the target with
//!   no base (everything is copied), `on-error: stop` (a read the export
//!   could not answer pauses the job instead of failing it; the follower
//!   resumes it, [`resume_job`]), `auto-dismiss: false` (a run killed
//!   after the job ended still finds how it ended). When it completes,
//!   QEMU writes the target's header without a backing; [`finish`]
//!   dismisses the job and deletes the backing nodes, so the NBD client
//!   leaves before the export stops.
//!
//! Every step runs over a [`Monitor`]: a QMP socket, or a libvirt
//! domain's QEMU through libvirt's passthrough
//! ([`super::libvirt::monitor`]).
//!
//! Every node and the job are named `coffre-<16 hex>-…`, the hash of the
//! target's canonical path ([`LiveNames`]), so a resumed run finds them.
//! All of it is idempotent: a resumed run does each step that is not yet
//! done ([`attached_device`], [`job`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use super::monitor::Monitor;
use super::node;
use crate::error::{Result, SnapError};

/// The prefix of a live restore's export name, before the point id.
pub const EXPORT_PREFIX: &str = "coffre-live-";
/// The longest point id an export name carries.
const MAX_POINT_ID: usize = 64;
/// The longest backing string read back from a target (qcow2's own limit
/// is 1023 bytes).
const MAX_BACKING: usize = 1023;

/// The names of one live restore's nodes and job in QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveNames {
    /// 16 hex digits of BLAKE3("live/<canonical target path>").
    pub tag: String,
    /// The qcow2 target node.
    pub target: String,
    /// The target's file node.
    pub target_file: String,
    /// The backing's raw node.
    pub backing: String,
    /// The backing's NBD node.
    pub nbd: String,
    /// The `block-stream` job.
    pub job: String,
}

impl LiveNames {
    /// The names of the live restore into `target` (its canonical path).
    pub fn of(target: &Path) -> LiveNames {
        // The same tag names the target's hold in the vault.
        let tag = coffre_vault_store::format::hold::target_tag(target);
        LiveNames {
            target: format!("coffre-{tag}-live"),
            target_file: format!("coffre-{tag}-lfile"),
            backing: format!("coffre-{tag}-lback"),
            nbd: format!("coffre-{tag}-lnbd"),
            job: format!("coffre-{tag}-stream"),
            tag,
        }
    }

    /// The export's socket: `<runtime dir>/live/<tag>.sock` in coffre's
    /// private runtime folder ([`super::host_lock::runtime_dir`]), the two
    /// folders created 0700 and checked.
    pub fn socket(&self) -> std::result::Result<PathBuf, String> {
        Ok(live_dir()?.join(format!("{}.sock", self.tag)))
    }

    /// The run file (how to run this live restore again, for `coffre
    /// daemon`): `<runtime dir>/live/<tag>.run`, beside the socket.
    pub fn run_file(&self) -> std::result::Result<PathBuf, String> {
        Ok(live_dir()?.join(format!(
            "{}{}",
            self.tag,
            coffre_vault_store::format::live_run::RUN_SUFFIX
        )))
    }
}

/// The live restores' folder, `<runtime dir>/live`, in coffre's private
/// runtime folder ([`super::host_lock::runtime_dir`]), the two folders
/// created 0700 and checked: their sockets, locks and run files.
pub fn live_dir() -> std::result::Result<PathBuf, String> {
    let base = super::host_lock::runtime_dir();
    super::host_lock::private_dir(&base)?;
    let dir = base.join("live");
    super::host_lock::private_dir(&dir)?;
    Ok(dir)
}

/// One run per live restore target on this host: held from before the
/// export's socket is bound until the run ends, so two `--resume` runs of
/// one target never replace each other's socket. A host lock
/// ([`super::host_lock`], kind [`LockKind::Live`]) named after the
/// target's tag, `<runtime dir>/live/<tag>.lock`, beside the socket;
/// removed on release.
///
/// [`LockKind::Live`]: super::host_lock::LockKind::Live
#[derive(Debug)]
pub struct TargetLock(super::host_lock::HostLock);

impl TargetLock {
    /// Takes the lock of the live restore into `target` (canonical, named
    /// `names`); fails at once, naming the holder, when another run has
    /// it.
    pub fn acquire(target: &Path, names: &LiveNames) -> Result<TargetLock> {
        use super::host_lock::{HostLock, LockKind, Refused};
        let holder = format!(
            "pid {}, live restore into {}",
            std::process::id(),
            target.display()
        );
        HostLock::acquire(LockKind::Live, &names.tag, &holder)
            .map(TargetLock)
            .map_err(|refused| SnapError::Nbd {
                uri: target.display().to_string(),
                reason: match refused {
                    Refused::Held { holder, path } => format!(
                        "a live restore of {} is already running ({}; lock {}): one run per target; wait for it, or stop it (SIGTERM) and run the command again",
                        target.display(),
                        holder.as_deref().unwrap_or("holder unknown"),
                        path.display()
                    ),
                    Refused::Unusable(reason) => reason,
                },
            })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// True while a run of the live restore named `names` holds its lock
    /// (only looks: see [`super::host_lock::HostLock::is_held`]).
    pub fn is_held(names: &LiveNames) -> std::result::Result<bool, String> {
        super::host_lock::HostLock::is_held(super::host_lock::LockKind::Live, &names.tag)
    }
}

/// The export name of point `point_id`.
pub fn export_name(point_id: &str) -> String {
    format!("{EXPORT_PREFIX}{point_id}")
}

/// True for a point id an export name may carry.
fn is_point_id(id: &str) -> bool {
    (1..=MAX_POINT_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

use coffre_vault_store::format::live_run::MAX_DEVICE_ID;
/// True for a device id or bus coffre passes to QEMU (the rule a live
/// restore's run file checks too).
pub use coffre_vault_store::format::live_run::is_device_id;

/// The NBD node's options: the export on `socket`, `reconnect_delay`
/// seconds of patience when it goes.
fn nbd_options(socket: &Path, export: &str, reconnect_delay: u64) -> Value {
    json!({
        "driver": "nbd",
        "server": { "type": "unix", "path": socket },
        "export": export,
        "reconnect-delay": reconnect_delay,
    })
}

/// The backing string written in the target's header.
pub fn backing_json(socket: &Path, export: &str, reconnect_delay: u64) -> String {
    let v = json!({ "driver": "raw", "file": nbd_options(socket, export, reconnect_delay) });
    format!("json:{v}")
}

/// What a target's backing string says: the export's socket and the
/// point id its name carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    /// The socket.
    pub socket: PathBuf,
    /// The point id.
    pub point_id: String,
}

/// Reads a target's backing string back: `None` when it is not one coffre
/// writes (the caller refuses such a target).
pub fn parse_backing(s: &str) -> Option<Backing> {
    if s.len() > MAX_BACKING {
        return None;
    }
    let v: Value = serde_json::from_str(s.strip_prefix("json:")?).ok()?;
    if v.get("driver")?.as_str()? != "raw" {
        return None;
    }
    let file = v.get("file")?;
    if file.get("driver")?.as_str()? != "nbd" {
        return None;
    }
    let server = file.get("server")?;
    if server.get("type")?.as_str()? != "unix" {
        return None;
    }
    let socket = PathBuf::from(server.get("path")?.as_str()?);
    let point_id = file
        .get("export")?
        .as_str()?
        .strip_prefix(EXPORT_PREFIX)?
        .to_string();
    (socket.is_absolute() && is_point_id(&point_id)).then_some(Backing { socket, point_id })
}

fn qemu_img_error(what: &str, target: &Path, reason: String) -> SnapError {
    SnapError::Nbd {
        uri: target.display().to_string(),
        reason: format!("{what}: {reason}"),
    }
}

/// Creates `target` (which must not exist) as a qcow2 whose backing is
/// `backing` (raw, read through the export, which must be serving: the
/// size is taken from it). The file is created owner-only first, never
/// through a link, then formatted in place.
pub fn create_overlay(target: &Path, backing: &str) -> Result<()> {
    coffre_vault_store::store::local::private::create_new_nofollow(target)
        .map_err(|e| qemu_img_error("cannot create the target", target, e.to_string()))?;
    let out = Command::new("qemu-img")
        // 2 KiB subclusters (extended L2 entries, 64 KiB clusters): a
        // guest write of whole 4 KiB blocks into a part not yet streamed
        // needs no copy-on-write read from the backing, so it completes
        // even while the export is away. (128 KiB clusters with extended
        // L2 crashed QEMU 7.2 under block-stream and a writer.)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-F",
            "raw",
            "-b",
        ])
        .arg(backing)
        .arg(target)
        .output();
    let failed = match out {
        Err(e) => Some(format!(
            "cannot run qemu-img (apt-get install qemu-utils): {e}"
        )),
        Ok(o) if !o.status.success() => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Ok(_) => None,
    };
    if let Some(reason) = failed {
        let _ = std::fs::remove_file(target);
        return Err(qemu_img_error("qemu-img create", target, reason));
    }
    Ok(())
}

/// The backing string in `target`'s header (`None`: it has none), read
/// with `qemu-img info -U` (the VM holds the target open), without
/// opening the backing.
pub fn read_backing(target: &Path) -> Result<Option<String>> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(target)
        .output()
        .map_err(|e| {
            qemu_img_error(
                "qemu-img info",
                target,
                format!("cannot run qemu-img (apt-get install qemu-utils): {e}"),
            )
        })?;
    if !out.status.success() {
        return Err(qemu_img_error(
            "qemu-img info",
            target,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| qemu_img_error("qemu-img info", target, format!("not JSON: {e}")))?;
    // coffre's targets have neither: a header naming an external data
    // file (which QEMU would write into) or encryption is not one of them.
    let data = v.pointer("/format-specific/data");
    if data.is_some_and(|d| d.get("data-file").is_some() || d.get("encrypt").is_some())
        || v.get("encrypted").and_then(Value::as_bool) == Some(true)
    {
        return Err(qemu_img_error(
            "qemu-img info",
            target,
            "its header names an external data file or encryption: not a target coffre made".into(),
        ));
    }
    Ok(v.get("backing-filename")
        .and_then(Value::as_str)
        .map(str::to_string))
}

/// Longest line of `qemu-img map --output=json` taken (one extent).
const MAX_MAP_LINE: usize = 4096;

/// The byte ranges `target` itself holds (allocated in its own layer, data
/// or zeros), sorted and merged: read with `qemu-img map -U` from the file
/// on disk, line by line (one extent a line), so what QEMU has written is
/// checked, not what it says.
pub fn allocated(target: &Path) -> Result<Vec<(u64, u64)>> {
    use std::io::{BufRead, Read};
    let what = "qemu-img map";
    let mut child = Command::new("qemu-img")
        .args(["map", "-U", "--output=json", "-f", "qcow2"])
        .arg(target)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            qemu_img_error(
                what,
                target,
                format!("cannot run qemu-img (apt-get install qemu-utils): {e}"),
            )
        })?;
    // Its messages are read beside its output, at most MAX_MAP_LINE bytes
    // kept: a chatty qemu-img neither blocks on a full pipe nor fills
    // memory.
    let messages = super::pipe::drain(child.stderr.take(), MAX_MAP_LINE as u64);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut bad = None;
    if let Some(out) = child.stdout.take() {
        let mut lines = std::io::BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match (&mut lines)
                .take(MAX_MAP_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(n) => n,
                Err(e) => {
                    bad = Some(e.to_string());
                    break;
                }
            };
            if n == 0 {
                break;
            }
            if line.len() > MAX_MAP_LINE {
                bad = Some("a line too long".to_string());
                break;
            }
            match map_line(&line) {
                Ok(Some((start, len))) => match ranges.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 += len,
                    _ => ranges.push((start, len)),
                },
                Ok(None) => {}
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
    }
    if bad.is_some() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| qemu_img_error(what, target, e.to_string()));
    let said = messages.recv().unwrap_or_default();
    if let Some(e) = bad {
        return Err(qemu_img_error(what, target, e));
    }
    if !status?.success() {
        return Err(qemu_img_error(
            what,
            target,
            super::json_lines::shown(String::from_utf8_lossy(&said).trim()),
        ));
    }
    Ok(ranges)
}

/// Fuzz entry point: `data` read as the lines of `qemu-img map
/// --output=json` (each cut at [`MAX_MAP_LINE`] as [`allocated`] reads
/// them). It panics only where a property breaks: an extent taken is not
/// empty and ends before 2^64. Returns the extents taken.
pub fn fuzz_map_lines(data: &[u8]) -> usize {
    data.split(|&b| b == b'\n')
        .filter(|l| l.len() <= MAX_MAP_LINE)
        .filter_map(|l| map_line(l).ok().flatten())
        .inspect(|&(start, len)| {
            assert!(
                len > 0 && start.checked_add(len).is_some(),
                "extent {start}+{len}"
            );
        })
        .count()
}

/// One line of `qemu-img map --output=json` (`[{ "start": …, … },`, the
/// brackets and comma around the extent optional): `Some((start,
/// length))` for an extent the image holds itself (`depth` 0, `present`),
/// `None` for one it does not or a line with no extent; an error for
/// anything else.
fn map_line(line: &[u8]) -> std::result::Result<Option<(u64, u64)>, String> {
    let text = std::str::from_utf8(line).map_err(|_| "a line that is not UTF-8".to_string())?;
    let text = text.trim().trim_start_matches('[').trim_end_matches(']');
    let text = text.trim().trim_end_matches(',').trim();
    if text.is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(text).map_err(|_| {
        format!(
            "an extent that is not JSON: {}",
            super::json_lines::shown(text)
        )
    })?;
    let field = |k: &str| v.get(k).and_then(Value::as_u64);
    let (Some(start), Some(length), Some(depth)) =
        (field("start"), field("length"), field("depth"))
    else {
        return Err(format!(
            "an extent without start, length or depth: {}",
            super::json_lines::shown(text)
        ));
    };
    if start.checked_add(length).is_none() {
        return Err(format!("an extent past 2^64: {start}+{length}"));
    }
    let present = v.get("present").and_then(Value::as_bool) == Some(true);
    Ok((depth == 0 && present && length > 0).then_some((start, length)))
}

/// How the VM's device is given the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceChoice {
    /// The device id (`-device …,id=ID`).
    pub id: String,
    /// The bus of a device created with `device_add` (`None`: QEMU's
    /// choice).
    pub bus: Option<String>,
    /// Hand the drive to an existing device of a guest that is running
    /// (`--swap-running-disk`: the guest must not use the old disk).
    pub swap_running: bool,
}

/// The QOM path of device `id`.
fn device_path(id: &str) -> String {
    format!("/machine/peripheral/{id}")
}

/// The QOM path (from `query-block`) of the device whose drive is node
/// `root`, if any.
pub fn attached_device(qmp: &mut dyn Monitor, root: &str) -> Result<Option<String>> {
    let devices = qmp.execute("query-block", None)?;
    Ok(devices.as_array().and_then(|all| {
        all.iter().find_map(|d| {
            let r = d.get("inserted")?.get("node-name")?.as_str()?;
            let q = d.get("qdev")?.as_str()?;
            (r == root && q.starts_with('/') && q.len() <= 1024).then(|| q.to_string())
        })
    }))
}

/// True when QEMU has a device `id`.
fn device_exists(qmp: &mut dyn Monitor, id: &str) -> bool {
    qmp.execute("qom-list", Some(json!({ "path": device_path(id) })))
        .is_ok()
}

/// What [`attach`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// The nodes and the device were there already (a resumed run).
    Already,
    /// An existing device was given the target (`qom-set`).
    Handed,
    /// A new device was created (`device_add`).
    Added,
}

/// True when QEMU has a block node called `name`.
pub fn node_exists(qmp: &mut dyn Monitor, name: &str) -> Result<bool> {
    Ok(node::named(qmp, name)?.is_some())
}

/// Puts the target in QEMU (the backing over the export on `socket`, the
/// qcow2 node above it) and makes it the drive of `device`. Each step
/// already done (a resumed run) is skipped.
pub fn attach(
    qmp: &mut dyn Monitor,
    names: &LiveNames,
    target: &Path,
    socket: &Path,
    export: &str,
    reconnect_delay: u64,
    device: &DeviceChoice,
) -> Result<Attached> {
    if !is_device_id(&device.id) || device.bus.as_deref().is_some_and(|b| !is_device_id(b)) {
        return Err(qmp.error(format!(
            "device {:?} (bus {:?}): an id is 1 to {MAX_DEVICE_ID} letters, digits, '-', '_' or '.', starting with a letter",
            device.id, device.bus
        )));
    }
    let mut did = Attached::Already;
    if node::named(qmp, &names.target)?.is_none() {
        if node::named(qmp, &names.backing)?.is_none() {
            let mut file = nbd_options(socket, export, reconnect_delay);
            file["node-name"] = json!(names.nbd);
            qmp.execute(
                "blockdev-add",
                Some(json!({
                    "driver": "raw", "node-name": names.backing, "read-only": true, "file": file,
                })),
            )?;
        }
        qmp.execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": names.target,
                "file": { "driver": "file", "filename": target, "node-name": names.target_file },
                "backing": names.backing,
            })),
        )?;
        did = Attached::Handed;
    }
    match attached_device(qmp, &names.target)? {
        Some(q)
            if q == device_path(&device.id)
                || q.starts_with(&format!("{}/", device_path(&device.id))) =>
        {
            Ok(did)
        }
        Some(other) => Err(qmp.error(format!(
            "the target is already the drive of device {other}, not of {}",
            device.id
        ))),
        None if device_exists(qmp, &device.id) => {
            // A guest that ran has the old disk mounted (its page cache,
            // its journal): swapped under it, its writeback would land on
            // the restored disk. Only a guest that never ran (`-S`) or that
            // shut down takes the new drive in place.
            let status = qmp.execute("query-status", None)?;
            let status = status
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string();
            if !device.swap_running && !matches!(status.as_str(), "prelaunch" | "shutdown") {
                return Err(qmp.error(format!(
                    "the VM is {status}: its device {} still has the old disk in use, and swapping the drive under a guest that ran would corrupt the restored disk. Start QEMU with -S (`virsh start --paused`, or shut the guest down) to hand it the restored disk, name a new device id to hot-plug the restored disk next to the old one, or pass --swap-running-disk if the guest does not use that disk (not mounted, no I/O)",
                    device.id
                )));
            }
            qmp.execute(
                "qom-set",
                Some(json!({
                    "path": device_path(&device.id), "property": "drive", "value": names.target,
                })),
            )
            .map_err(|e| {
                qmp.error(format!(
                    "cannot give device {} the restored disk ({e}); a device whose drive QEMU cannot change (not a disk, or in an I/O thread) cannot take it: name a new id to create a virtio-blk-pci device instead",
                    device.id
                ))
            })?;
            Ok(Attached::Handed)
        }
        None => {
            let mut args = json!({
                "driver": "virtio-blk-pci", "id": device.id, "drive": names.target,
            });
            if let Some(b) = &device.bus {
                args["bus"] = json!(b);
            }
            qmp.execute("device_add", Some(args)).map_err(|e| {
                qmp.error(format!(
                    "cannot create device {} for the restored disk ({e}); on a q35 machine a hot-plugged device needs a free pcie-root-port (--bus), or name the VM's existing disk device",
                    device.id
                ))
            })?;
            Ok(Attached::Added)
        }
    }
}

/// Starts a VM waiting for its first `cont` (`-S`: status `prelaunch`).
/// True when it did; a VM paused for another reason is left as it is.
pub fn start_if_waiting(qmp: &mut dyn Monitor) -> Result<bool> {
    if is_waiting(qmp)? {
        qmp.execute("cont", None)?;
        return Ok(true);
    }
    Ok(false)
}

/// True while the VM waits to be started (`-S`: `prelaunch`).
pub fn is_waiting(qmp: &mut dyn Monitor) -> Result<bool> {
    let status = qmp.execute("query-status", None)?;
    Ok(status.get("status").and_then(Value::as_str) == Some("prelaunch"))
}

/// True while the target node still reads through its backing.
pub fn has_backing(qmp: &mut dyn Monitor, names: &LiveNames) -> Result<bool> {
    Ok(node::child_of(qmp, &names.target, "backing")?.is_some())
}

/// Starts the stream job, at most `speed` bytes a second (0: no limit).
pub fn start_stream(qmp: &mut dyn Monitor, names: &LiveNames, speed: u64) -> Result<()> {
    qmp.execute(
        "block-stream",
        Some(json!({
            "job-id": names.job,
            "device": names.target,
            "speed": speed,
            "on-error": "stop",
            "auto-dismiss": false,
        })),
    )?;
    Ok(())
}

/// The stream job as QEMU reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    /// QEMU has no job of that name.
    Absent,
    /// Running (or between two of its states).
    Running {
        /// Bytes done.
        offset: u64,
        /// Bytes to do (QEMU's estimate; it may grow).
        len: u64,
        /// Paused after an error (`on-error: stop`), with QEMU's
        /// `io-status` (`failed`, `nospace`): resume it once the cause is
        /// gone.
        paused_on: Option<String>,
    },
    /// Ended; `error` when it failed or was cancelled.
    Concluded {
        /// QEMU's message.
        error: Option<String>,
    },
}

/// The job now.
pub fn job(qmp: &mut dyn Monitor, names: &LiveNames) -> Result<Job> {
    let jobs = qmp.execute("query-jobs", None)?;
    let Some(j) = jobs.as_array().and_then(|all| {
        all.iter()
            .find(|j| j.get("id").and_then(Value::as_str) == Some(names.job.as_str()))
            .cloned()
    }) else {
        return Ok(Job::Absent);
    };
    let status = j.get("status").and_then(Value::as_str).unwrap_or_default();
    if status == "concluded" || status == "null" {
        let error = j
            .get("error")
            .and_then(Value::as_str)
            .map(super::json_lines::shown);
        return Ok(Job::Concluded { error });
    }
    let offset = j
        .get("current-progress")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let len = j.get("total-progress").and_then(Value::as_u64).unwrap_or(0);
    let mut paused_on = None;
    if status == "paused" {
        let blocks = qmp.execute("query-block-jobs", None)?;
        paused_on = blocks.as_array().and_then(|all| {
            all.iter().find_map(|b| {
                if b.get("device").and_then(Value::as_str) != Some(names.job.as_str()) {
                    return None;
                }
                match b.get("io-status").and_then(Value::as_str) {
                    Some("ok") => None,
                    Some(other) => Some(super::json_lines::shown(other)),
                    None => Some("unknown".to_string()),
                }
            })
        });
    }
    Ok(Job::Running {
        offset,
        len,
        paused_on,
    })
}

/// Sets the job's speed limit (bytes a second; 0: none).
pub fn set_speed(qmp: &mut dyn Monitor, names: &LiveNames, speed: u64) -> Result<()> {
    qmp.execute(
        "block-job-set-speed",
        Some(json!({ "device": names.job, "speed": speed })),
    )?;
    Ok(())
}

/// Resumes a job paused after an error.
pub fn resume_job(qmp: &mut dyn Monitor, names: &LiveNames) -> Result<()> {
    qmp.execute("block-job-resume", Some(json!({ "device": names.job })))?;
    Ok(())
}

/// Makes QEMU write out what it holds of the target in memory, and sync
/// it. When the stream job concludes, QEMU has rewritten the target's
/// header without the backing already, but the streamed clusters'
/// mappings (qcow2 L2 tables and refcounts) may still be in its caches
/// only: QEMU killed then leaves a target that reads as zeros where the
/// point's blocks were, and an fsync from outside cannot reach those
/// caches. QMP has no flush command, but `blockdev-reopen` of the target
/// node with the options it was added with (its backing gone) flushes it
/// first and fails with QEMU's reason when the flush does (HMP's
/// `qemu-io NODE "flush"` would not say). The caller checks the file's
/// own mapping ([`allocated`]) all the same. Call it after [`finish`]:
/// the backing node must be gone.
pub fn flush_target(qmp: &mut dyn Monitor, names: &LiveNames) -> Result<()> {
    qmp.execute(
        "blockdev-reopen",
        Some(json!({ "options": [{
            "driver": "qcow2",
            "node-name": names.target,
            "file": names.target_file,
            "backing": null,
        }] })),
    )
    .map_err(|e| {
        qmp.error(format!(
            "QEMU could not write its target node {} out: {e}",
            names.target
        ))
    })?;
    Ok(())
}

/// After the job: it is dismissed, and the backing nodes go (the NBD
/// client leaves the export). A node already gone is not an error.
pub fn finish(qmp: &mut dyn Monitor, names: &LiveNames) -> Result<()> {
    if let Job::Concluded { .. } = job(qmp, names)? {
        qmp.execute("job-dismiss", Some(json!({ "id": names.job })))?;
    }
    if node::named(qmp, &names.backing)?.is_some() {
        qmp.execute("blockdev-del", Some(json!({ "node-name": names.backing })))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_stable_and_per_target() {
        let a = LiveNames::of(Path::new("/srv/vm/disk.qcow2"));
        assert_eq!(a, LiveNames::of(Path::new("/srv/vm/disk.qcow2")));
        assert_ne!(a.tag, LiveNames::of(Path::new("/srv/vm/other.qcow2")).tag);
        for n in [&a.target, &a.target_file, &a.backing, &a.nbd, &a.job] {
            // QEMU's node names stop at 31 bytes.
            assert!(n.len() <= 31, "{n}");
            assert!(n.starts_with(&format!("coffre-{}-", a.tag)), "{n}");
        }
    }

    #[test]
    fn the_backing_string_reads_back_and_anything_else_is_refused() {
        let s = backing_json(
            Path::new("/run/coffre/live/ab.sock"),
            &export_name("0a1b2c3d4e5f"),
            300,
        );
        assert_eq!(
            parse_backing(&s),
            Some(Backing {
                socket: PathBuf::from("/run/coffre/live/ab.sock"),
                point_id: "0a1b2c3d4e5f".into()
            })
        );
        let v: Value = serde_json::from_str(s.strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(v["file"]["reconnect-delay"], 300);
        for bad in [
            "/srv/base.img".to_string(),
            "json:{".to_string(),
            s.replace("coffre-live-", "other-"),
            s.replace("\"unix\"", "\"inet\""),
            s.replace("/run/coffre", "run/coffre"),
            s.replace("0a1b2c3d4e5f", "../x"),
            s.replace("\"raw\"", "\"qcow2\""),
            format!("{s}{}", " ".repeat(MAX_BACKING)),
        ] {
            assert_eq!(parse_backing(&bad), None, "{bad}");
        }
    }

    /// A monitor that answers every command with `reply` and keeps what
    /// it was asked.
    struct Canned {
        /// The reply, or QEMU's error.
        reply: std::result::Result<Value, String>,
        asked: Vec<(String, Option<Value>)>,
    }

    impl Monitor for Canned {
        fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
            self.asked.push((command.to_string(), arguments));
            self.reply.clone().map_err(|e| self.error(e))
        }

        fn error(&self, reason: String) -> SnapError {
            SnapError::damaged(Path::new("canned"), reason)
        }
    }

    #[test]
    fn the_target_is_flushed_by_reopening_it_with_its_own_options() {
        let names = LiveNames::of(Path::new("/srv/vm/disk.qcow2"));
        let mut ok = Canned {
            reply: Ok(json!({})),
            asked: Vec::new(),
        };
        flush_target(&mut ok, &names).unwrap();
        assert_eq!(
            ok.asked,
            vec![(
                "blockdev-reopen".to_string(),
                Some(json!({ "options": [{
                    "driver": "qcow2",
                    "node-name": names.target,
                    "file": names.target_file,
                    "backing": null,
                }] }))
            )]
        );
        let mut failing = Canned {
            reply: Err("Error flushing drive: Input/output error".into()),
            asked: Vec::new(),
        };
        let e = flush_target(&mut failing, &names).unwrap_err().to_string();
        assert!(
            e.contains(&names.target) && e.contains("Error flushing drive"),
            "{e}"
        );
    }

    #[test]
    fn map_lines_give_the_extents_the_image_holds_itself() {
        let line = |s: &str| map_line(s.as_bytes());
        assert_eq!(
            line(
                r#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},"#
            ),
            Ok(Some((0, 65536)))
        );
        assert_eq!(
            line(
                r#"{ "start": 65536, "length": 4096, "depth": 0, "present": true, "zero": true, "data": false}]"#
            ),
            Ok(Some((65536, 4096)))
        );
        // From the backing, or nowhere: not the target's own.
        assert_eq!(
            line(
                r#"{ "start": 8388608, "length": 58720256, "depth": 1, "present": true, "zero": false, "data": true},"#
            ),
            Ok(None)
        );
        assert_eq!(
            line(
                r#"{ "start": 0, "length": 67108864, "depth": 0, "present": false, "zero": true, "data": false}]"#
            ),
            Ok(None)
        );
        assert_eq!(line("]"), Ok(None));
        assert_eq!(line(""), Ok(None));
        for bad in [
            r#"{ "start": 0, "length": 5 "#,
            r#"{ "start": 0, "depth": 0, "present": true},"#,
            r#"{ "start": 18446744073709551615, "length": 2, "depth": 0, "present": true},"#,
            "not json\u{1b}[31m",
        ] {
            let e = line(bad).unwrap_err();
            assert!(!e.contains('\u{1b}'), "{e}");
        }
        assert!(map_line(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn device_ids_are_checked() {
        assert!(is_device_id("vda"));
        assert!(is_device_id("virtio-disk0"));
        assert!(is_device_id("rp1.0"));
        assert!(!is_device_id(""));
        assert!(!is_device_id("0vda"));
        assert!(!is_device_id("vda/../x"));
        assert!(!is_device_id(&"a".repeat(65)));
    }
}
