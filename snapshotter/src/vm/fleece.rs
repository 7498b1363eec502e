//! A point in time of a disk a running QEMU writes: a *fleecing* node.
//!
//! `blockdev-backup` with `sync: none` from the drive to a temporary qcow2
//! whose backing is the drive puts QEMU's copy-before-write filter above
//! the drive: from that instant, a block the guest overwrites is first
//! copied into the qcow2, so the qcow2 reads as the disk did at the
//! instant while the guest keeps writing. The node is exported over NBD
//! on a private Unix socket and read with coffre's NBD client. Works on
//! QEMU 7.2 (Debian 12) and later. Every node, job and export is named
//! `coffre-<tag>-…`, so a later run finds what a killed one left
//! ([`Fleece::clean_up`]).

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
    /// The names for `tag` (an item name: letters, digits, `-`, `_`, `.`).
    pub fn of(tag: &str) -> Names {
        Names {
            node: format!("coffre-{tag}-fleece"),
            job: format!("coffre-{tag}-job"),
            export: format!("coffre-{tag}-export"),
        }
    }
}

/// A running fleece: the point in time of one drive, exported over NBD.
#[derive(Debug)]
pub struct Fleece {
    names: Names,
    /// The drive's size in bytes.
    pub size: u64,
    socket: PathBuf,
    overlay: PathBuf,
    done: bool,
}

/// The virtual size of block node `node` (`query-named-block-nodes`).
pub fn node_size(qmp: &mut Qmp, node: &str) -> Result<Option<u64>> {
    let nodes = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true })))?;
    Ok(nodes.as_array().and_then(|all| {
        all.iter()
            .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
            .and_then(|n| n.get("image")?.get("virtual-size")?.as_u64())
    }))
}

impl Fleece {
    /// Takes the point in time of block node `node` and exports it as
    /// `nbd+unix:///EXPORT?socket=DIR/nbd.sock`; the temporary qcow2 goes
    /// in `dir` (private to this run). What a killed run of the same `tag`
    /// left is removed first.
    pub fn start(qmp: &mut Qmp, node: &str, tag: &str, dir: &Path) -> Result<Fleece> {
        if qmp.version() < MIN_QEMU {
            return Err(qmp.error(format!(
                "QEMU {} is too old for a live backup (coffre needs {MIN_QEMU} or later)",
                qmp.version()
            )));
        }
        let names = Names::of(tag);
        Self::clean_up(qmp, &names);
        let Some(size) = node_size(qmp, node)? else {
            return Err(qmp.error(format!(
                "no block node {node:?} in this VM (see query-named-block-nodes)"
            )));
        };
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
            size,
            socket,
            overlay,
            done: false,
        };
        if let Err(e) = fleece.begin(qmp, node) {
            fleece.stop(qmp);
            return Err(e);
        }
        Ok(fleece)
    }

    fn begin(&mut self, qmp: &mut Qmp, node: &str) -> Result<()> {
        let n = self.names.clone();
        qmp.execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": n.node,
                "file": { "driver": "file", "filename": self.overlay },
                "backing": node,
            })),
        )?;
        // The instant: from here on the filter copies before each write.
        qmp.execute(
            "transaction",
            Some(json!({ "actions": [{
                "type": "blockdev-backup",
                "data": { "device": node, "target": n.node, "sync": "none", "job-id": n.job },
            }]})),
        )?;
        qmp.execute(
            "nbd-server-start",
            Some(json!({ "addr": { "type": "unix", "data": { "path": self.socket } } })),
        )?;
        qmp.execute(
            "block-export-add",
            Some(json!({
                "type": "nbd", "id": n.export, "node-name": n.node,
                "name": n.export, "writable": false,
            })),
        )?;
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

    /// Ends the point in time: the export, the NBD server, the job and the
    /// node go, and the temporary qcow2 with them. Best effort: what
    /// cannot be removed now is removed by name by the next run.
    pub fn stop(&mut self, qmp: &mut Qmp) {
        if self.done {
            return;
        }
        self.done = true;
        Self::clean_up(qmp, &self.names);
        let _ = std::fs::remove_file(&self.overlay);
    }

    /// Removes whatever a fleece of `names` left in QEMU (a killed run):
    /// each step that finds nothing is skipped.
    pub fn clean_up(qmp: &mut Qmp, names: &Names) {
        let _ = qmp.execute("block-export-del", Some(json!({ "id": names.export })));
        let _ = qmp.execute("nbd-server-stop", None);
        if qmp
            .execute(
                "block-job-cancel",
                Some(json!({ "device": names.job, "force": true })),
            )
            .is_ok()
        {
            wait_job_gone(qmp, &names.job, Duration::from_secs(30));
        }
        let _ = qmp.execute("blockdev-del", Some(json!({ "node-name": names.node })));
    }
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
