//! A point in time of a disk a running QEMU writes: a *fleecing* node.
//!
//! `blockdev-backup` with `sync: none` from the drive to a temporary qcow2
//! whose backing is the drive puts QEMU's copy-before-write filter above
//! the drive: from that instant, a block the guest overwrites is first
//! copied into the qcow2, so the qcow2 reads as the disk did at the
//! instant while the guest keeps writing. The node is exported over NBD
//! on a private Unix socket and read with coffre's NBD client. Works on
//! QEMU 7.2 (Debian 12) and later. Every node, job and export is named
//! `coffre-<hash of the item>-…` (QEMU's node names are short), so a later
//! run finds what a killed one left ([`Fleece::remove_leftovers`]). The
//! NBD server is stopped only when this fleece started it, or when a
//! killed run's server is left with no export at all: QEMU has one NBD
//! server, and another user's (libvirt's) exports must survive.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::qmp::{QemuVersion, Qmp};
use crate::error::Result;

/// The oldest QEMU whose fleecing coffre has tested (Debian 12's).
pub const MIN_QEMU: QemuVersion = QemuVersion {
    major: 7,
    minor: 2,
    micro: 0,
};

/// The names a fleece of `tag` uses in QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// The temporary qcow2 node.
    pub node: String,
    /// The backup job.
    pub job: String,
    /// The NBD export (and its name on the wire).
    pub export: String,
}

impl Names {
    /// The names for item `tag`: `coffre-` and 8 hex digits of its hash
    /// (a node name must stay under 32 bytes, an item name may not).
    pub fn of(tag: &str) -> Names {
        let h = blake3::hash(tag.as_bytes()).to_hex();
        let short = h.get(..8).unwrap_or_default();
        Names {
            node: format!("coffre-{short}-fleece"),
            job: format!("coffre-{short}-job"),
            export: format!("coffre-{short}-export"),
        }
    }
}

/// A running fleece: the point in time of one drive, exported over NBD.
#[derive(Debug)]
pub struct Fleece {
    names: Names,
    /// The node whose point in time this is.
    source: String,
    /// The drive's size in bytes.
    pub size: u64,
    socket: PathBuf,
    overlay: PathBuf,
    /// This fleece started QEMU's NBD server (and so stops it).
    server_started: bool,
    done: bool,
}

impl Fleece {
    /// Takes the point in time of block node `node` (a node name, a drive
    /// id or a device id) and exports it as
    /// `nbd+unix:///EXPORT?socket=DIR/nbd.sock`; the temporary qcow2 goes
    /// in `dir` (private to this run). What a killed run of the same `tag`
    /// left is removed first.
    pub fn start(qmp: &mut Qmp, node: &str, tag: &str, dir: &Path) -> Result<Fleece> {
        // A killed run's filter sits above the drive and would be taken
        // for it: what it left goes before the drive is looked up.
        Self::remove_leftovers(qmp, &Names::of(tag));
        let info = super::node::resolve(qmp, node)?;
        let mut fleece = Self::prepare(qmp, &info.name, info.size, tag, dir)?;
        let done = fleece
            .take(qmp, Vec::new())
            .and_then(|()| fleece.export(qmp, None));
        if let Err(e) = done {
            fleece.stop(qmp);
            return Err(e);
        }
        Ok(fleece)
    }

    /// Readies a fleece of node `node` (`size` bytes) without taking its
    /// instant yet: the temporary qcow2 (in `dir`) is created and added as
    /// a node. The caller removes what a killed run of the same `tag` left
    /// ([`Fleece::remove_leftovers`]) before it looks the drive up.
    pub fn prepare(qmp: &mut Qmp, node: &str, size: u64, tag: &str, dir: &Path) -> Result<Fleece> {
        if qmp.version() < MIN_QEMU {
            return Err(qmp.error(format!(
                "QEMU {} is too old for a live backup (coffre needs {MIN_QEMU} or later)",
                qmp.version()
            )));
        }
        let names = Names::of(tag);
        let overlay = dir.join(format!("{}.qcow2", names.node));
        let socket = dir.join("nbd.sock");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&overlay)
            .arg(size.to_string())
            .output()
            .map_err(|e| qmp.error(format!("qemu-img create: {e}")))?;
        if !out.status.success() {
            return Err(qmp.error(format!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut fleece = Fleece {
            names,
            source: node.to_string(),
            size,
            socket,
            overlay,
            server_started: false,
            done: false,
        };
        let added = qmp.execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": fleece.names.node,
                "file": { "driver": "file", "filename": fleece.overlay },
                "backing": node,
            })),
        );
        if let Err(e) = added {
            fleece.stop(qmp);
            return Err(e);
        }
        Ok(fleece)
    }

    /// The instant: one QMP `transaction` of `actions` (a dirty bitmap's
    /// chain) and the backup job that puts the copy-before-write filter
    /// above the drive. From here on the fleece reads as the drive did at
    /// this instant. On failure the caller stops the fleece, once the guest
    /// is thawed (the tear-down may take seconds).
    pub fn take(&mut self, qmp: &mut Qmp, mut actions: Vec<Value>) -> Result<()> {
        actions.push(json!({
            "type": "blockdev-backup",
            "data": {
                "device": self.source, "target": self.names.node,
                "sync": "none", "job-id": self.names.job,
            },
        }));
        qmp.execute("transaction", Some(json!({ "actions": actions })))
            .map(drop)
    }

    /// Exports the fleece over NBD on the private socket, with `bitmap`
    /// (on the drive, disabled) as meta context `qemu:dirty-bitmap:NAME`.
    /// On failure the caller stops the fleece.
    pub fn export(&mut self, qmp: &mut Qmp, bitmap: Option<&str>) -> Result<()> {
        let n = self.names.clone();
        qmp.execute(
            "nbd-server-start",
            Some(json!({ "addr": { "type": "unix", "data": { "path": self.socket } } })),
        )?;
        self.server_started = true;
        let mut export = json!({
            "type": "nbd", "id": n.export, "node-name": n.node,
            "name": n.export, "writable": false,
        });
        if let Some(b) = bitmap {
            export["bitmaps"] = json!([b]);
        }
        qmp.execute("block-export-add", Some(export))?;
        Ok(())
    }

    /// The export's URI, for [`crate::nbd::NbdImage::open`].
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.names.export,
            self.socket.display()
        )
    }

    /// Ends the point in time: the export, the NBD server (if this fleece
    /// started it), the job and the node go, and the temporary qcow2 with
    /// them. What cannot be removed now is named in a warning, and removed
    /// by name by the next run.
    pub fn stop(&mut self, qmp: &mut Qmp) {
        if self.done {
            return;
        }
        self.done = true;
        remove_export(qmp, &self.names.export);
        if self.server_started {
            let _ = qmp.execute("nbd-server-stop", None);
        }
        remove_job_and_node(qmp, &self.names);
        let _ = std::fs::remove_file(&self.overlay);
        let left = leftovers(qmp, &self.names);
        if !left.is_empty() {
            tracing::warn!(left = ?left, "could not remove all of the point in time from QEMU; the next backup of the item removes it");
        }
    }

    /// Removes what a killed run of the same item left in QEMU: its export,
    /// its job and its node, and the NBD server only when no export at all
    /// is left on it.
    pub fn remove_leftovers(qmp: &mut Qmp, names: &Names) {
        remove_export(qmp, &names.export);
        remove_job_and_node(qmp, names);
        let exports = qmp
            .execute("query-block-exports", None)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len));
        if exports == Some(0) {
            let _ = qmp.execute("nbd-server-stop", None);
        }
    }
}

/// Removes export `id` and waits (at most 5 s) until QEMU let it go: the
/// removal ends asynchronously once its last client left.
fn remove_export(qmp: &mut Qmp, id: &str) {
    if qmp
        .execute("block-export-del", Some(json!({ "id": id })))
        .is_err()
    {
        return;
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) && named_in(qmp, "query-block-exports", "id", id)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Cancels the job, waits for it to end, and deletes the node (retried
/// for a moment: it stays in use until the job and the export let go).
fn remove_job_and_node(qmp: &mut Qmp, names: &Names) {
    if qmp
        .execute(
            "block-job-cancel",
            Some(json!({ "device": names.job, "force": true })),
        )
        .is_ok()
    {
        wait_job_gone(qmp, &names.job, Duration::from_secs(30));
    }
    let start = Instant::now();
    while qmp
        .execute("blockdev-del", Some(json!({ "node-name": names.node })))
        .is_err()
        && start.elapsed() < Duration::from_secs(5)
        && named_in(qmp, "query-named-block-nodes", "node-name", &names.node)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when `command` lists an entry whose `key` is `value`.
fn named_in(qmp: &mut Qmp, command: &str, key: &str, value: &str) -> bool {
    qmp.execute(command, None)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|all| {
            all.iter()
                .any(|e| e.get(key).and_then(Value::as_str) == Some(value))
        })
}

/// Which of `names` QEMU still has.
fn leftovers(qmp: &mut Qmp, names: &Names) -> Vec<String> {
    let mut left = Vec::new();
    if named_in(qmp, "query-named-block-nodes", "node-name", &names.node) {
        left.push(names.node.clone());
    }
    if named_in(qmp, "query-block-jobs", "device", &names.job) {
        left.push(names.job.clone());
    }
    if named_in(qmp, "query-block-exports", "id", &names.export) {
        left.push(names.export.clone());
    }
    left
}

/// Waits until job `id` left `query-block-jobs` (a cancelled job ends
/// asynchronously), at most `limit`.
fn wait_job_gone(qmp: &mut Qmp, id: &str, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        let running = qmp
            .execute("query-block-jobs", None)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|jobs| {
                jobs.iter()
                    .any(|j| j.get("device").and_then(Value::as_str) == Some(id))
            });
        if !running {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
