//! A point in time of a disk a running QEMU writes: a *fleecing* node.
//!
//! A `copy-before-write` filter goes between the drive's device and its
//! node: from that instant, a block the guest overwrites is first copied
//! into a temporary qcow2 (the *overlay*), and a `snapshot-access` node
//! above the filter reads as the disk did at the instant while the guest
//! keeps writing. That node is exported over NBD on a private Unix socket
//! and read with coffre's NBD client.
//!
//! The filter is configured `on-cbw-error: break-snapshot` with a
//! `cbw-timeout`: when the overlay cannot take a block (its file system is
//! full, an I/O error, a copy slower than [`CBW_TIMEOUT_S`]), QEMU drops
//! the point in time (every read of it fails from then on, so the backup
//! fails) and lets the guest's write through. The filter `blockdev-backup
//! sync=none` puts in fails the guest's write instead (its only setting),
//! which is why coffre does not use it. QEMU 7.2 (Debian 12) has both
//! settings and `snapshot-access`, but no command to put a node above
//! another: the filter becomes the device's drive (`qom-set` of the
//! device's `drive`, allowed on a running device), so the drive must be
//! one a device writes through, and the device gets its node back when the
//! point ends.
//!
//! Every node and export is named `coffre-<16 hex of vault and item>-…`
//! ([`Names`], the hash of the item's dirty-bitmap chain), so a later run
//! of the same vault and item finds what a killed one left
//! ([`Fleece::remove_leftovers`]) and never touches another's. The NBD
//! server is stopped only when this fleece started it, or when a killed
//! run's server is left with no export at all: QEMU has one NBD server,
//! and another user's (libvirt's) exports must survive.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::node::{self, Drive};
use super::qmp::{QemuVersion, Qmp};
use crate::error::Result;

/// The oldest QEMU whose fleecing coffre has tested (Debian 12's).
pub const MIN_QEMU: QemuVersion = QemuVersion {
    major: 7,
    minor: 2,
    micro: 0,
};

/// How long (seconds) QEMU may take to copy a block into the overlay
/// before it drops the point in time rather than hold the guest's write:
/// well under a guest's own I/O timeouts (30 s for Linux's SCSI disks).
pub const CBW_TIMEOUT_S: u64 = 15;

/// The names a fleece of one item in one vault uses in QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// 16 hex digits of BLAKE3("<vault id>/<item>").
    pub tag: String,
    /// The copy-before-write filter.
    pub filter: String,
    /// The temporary qcow2 node (the overlay).
    pub overlay: String,
    /// The `snapshot-access` node: the point in time.
    pub access: String,
    /// The NBD export (and its name on the wire).
    pub export: String,
}

impl Names {
    /// The names for item `item` of vault `vault_id`: `coffre-` and 16 hex
    /// digits of their hash (a node name must stay under 32 bytes).
    pub fn of(vault_id: &str, item: &str) -> Names {
        let h = blake3::hash(format!("{vault_id}/{item}").as_bytes()).to_hex();
        let tag = h.get(..16).unwrap_or_default().to_string();
        Names {
            filter: format!("coffre-{tag}-cbw"),
            overlay: format!("coffre-{tag}-ovl"),
            access: format!("coffre-{tag}-snap"),
            export: format!("coffre-{tag}-export"),
            tag,
        }
    }

    /// True when `node` is named like a filter of coffre's (of any vault
    /// and item): `coffre-<16 hex>-cbw`.
    pub fn is_filter(node: &str) -> bool {
        node.strip_prefix("coffre-")
            .and_then(|r| r.strip_suffix("-cbw"))
            .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

/// A running fleece: the point in time of one drive, exported over NBD.
#[derive(Debug)]
pub struct Fleece {
    names: Names,
    /// The node whose point in time this is.
    source: String,
    /// The QOM path of the device that writes through it.
    device: String,
    /// The drive's size in bytes.
    pub size: u64,
    socket: PathBuf,
    overlay: PathBuf,
    /// The filter is the device's drive (and must be taken out).
    inserted: bool,
    /// This fleece started QEMU's NBD server (and so stops it).
    server_started: bool,
    done: bool,
}

impl Fleece {
    /// Takes the point in time of `drive` (a node name, a drive id or a
    /// device id) and exports it as `nbd+unix:///EXPORT?socket=DIR/nbd.sock`;
    /// the overlay goes in `dir` (private to this run). What a killed run
    /// of the same names left is removed first.
    pub fn start(qmp: &mut Qmp, drive: &str, names: &Names, dir: &Path) -> Result<Fleece> {
        // A killed run's filter sits above the drive: what it left goes
        // before the drive is looked up.
        Self::remove_leftovers(qmp, names);
        let drive = node::resolve_drive(qmp, drive, Names::is_filter)?;
        let mut fleece = Self::prepare(qmp, &drive, names, dir, &dir.join("nbd.sock"))?;
        let done = fleece
            .take(qmp, Vec::new(), Vec::new())
            .and_then(|()| fleece.export(qmp, None));
        if let Err(e) = done {
            fleece.stop(qmp);
            return Err(e);
        }
        Ok(fleece)
    }

    /// Readies a fleece of `drive` without taking its instant yet: the
    /// overlay (`dir/overlay.qcow2`) is created and added as a node, and
    /// the filter above the drive's node; the export will listen on
    /// `socket`. The caller removes what a killed run of the same names
    /// left ([`Fleece::remove_leftovers`]) before it looks the drive up.
    pub fn prepare(
        qmp: &mut Qmp,
        drive: &Drive,
        names: &Names,
        dir: &Path,
        socket: &Path,
    ) -> Result<Fleece> {
        if qmp.version() < MIN_QEMU {
            return Err(qmp.error(format!(
                "QEMU {} is too old for a live backup (coffre needs {MIN_QEMU} or later)",
                qmp.version()
            )));
        }
        let node = &drive.node;
        if let Some(above) = &drive.above {
            return Err(qmp.error(if above.name == names.filter {
                format!(
                    "the point in time a killed backup of this item left on node {} (node {}) could not be removed; remove it by hand: qom-set the device's drive back to {}, then blockdev-del {}, {} and {}",
                    node.name,
                    above.name,
                    node.name,
                    names.filter,
                    names.overlay,
                    names.access
                )
            } else if Names::is_filter(&above.name) {
                let tag = above.name.get(7..23).unwrap_or_default();
                format!(
                    "drive {} holds another coffre backup's point in time (filter {}: of another vault or item, running through another monitor, or killed); it goes when that backup ends or with its vault's and item's next run, or by hand: qom-set the device's drive back to {}, then blockdev-del coffre-{tag}-snap, coffre-{tag}-cbw and coffre-{tag}-ovl",
                    node.name, above.name, node.name
                )
            } else {
                format!(
                    "the device of node {} writes through a {} filter ({}): another backup job is running on it (see query-block-jobs); try again when it is done",
                    node.name, above.driver, above.name
                )
            }));
        }
        let Some(device) = drive.device.clone() else {
            return Err(qmp.error(format!(
                "node {} is not what a device writes through: coffre puts its copy-before-write filter between a device and its drive; name the device (such as vda) or its root node (query-block's inserted.node-name)",
                node.name
            )));
        };
        let overlay = dir.join("overlay.qcow2");
        let socket = socket.to_path_buf();
        // The overlay holds the guest's old blocks: created here first,
        // owner-only and never through a link, then formatted in place
        // (qemu-img keeps an existing file's mode).
        // (An overlay left in this folder by a killed run of the same
        // folder goes: the folder is this run's, 0700.)
        match std::fs::remove_file(&overlay) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(qmp.error(format!("cannot remove {}: {e}", overlay.display())));
            }
            _ => {}
        }
        coffre_vault_store::store::local::private::create_new_nofollow(&overlay)
            .map_err(|e| qmp.error(format!("cannot create {}: {e}", overlay.display())))?;
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&overlay)
            .arg(node.size.to_string())
            .output()
            .map_err(|e| qmp.error(format!("qemu-img create: {e}")))?;
        if !out.status.success() {
            return Err(qmp.error(format!(
                "qemu-img create {} failed: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut fleece = Fleece {
            names: names.clone(),
            source: node.name.clone(),
            device,
            size: node.size,
            socket,
            overlay,
            inserted: false,
            server_started: false,
            done: false,
        };
        let added = qmp
            .execute(
                "blockdev-add",
                Some(json!({
                    "driver": "qcow2",
                    "node-name": fleece.names.overlay,
                    "file": { "driver": "file", "filename": fleece.overlay },
                })),
            )
            .and_then(|_| {
                qmp.execute(
                    "blockdev-add",
                    Some(json!({
                        "driver": "copy-before-write",
                        "node-name": fleece.names.filter,
                        "file": fleece.source,
                        "target": fleece.names.overlay,
                        "on-cbw-error": "break-snapshot",
                        "cbw-timeout": CBW_TIMEOUT_S,
                    })),
                )
            });
        if let Err(e) = added {
            fleece.stop(qmp);
            return Err(e);
        }
        Ok(fleece)
    }

    /// The instant: the filter becomes the device's drive. `before` (a
    /// QMP `transaction`, the new dirty bitmap) runs just before it and
    /// `after` (the old bitmaps stop recording) just after, so that both
    /// hold every write on their side of the instant (and a few more).
    /// From here on the point reads as the drive did at this instant. On
    /// failure the caller stops the fleece, once the guest is thawed (the
    /// tear-down may take seconds).
    pub fn take(&mut self, qmp: &mut Qmp, before: Vec<Value>, after: Vec<Value>) -> Result<()> {
        if !before.is_empty() {
            qmp.execute("transaction", Some(json!({ "actions": before })))?;
        }
        // Marked before it is asked: a `qom-set` whose answer times out may
        // still take effect, and giving the drive back when it did not is
        // only a warning.
        self.inserted = true;
        qmp.execute(
            "qom-set",
            Some(json!({ "path": self.device, "property": "drive", "value": self.names.filter })),
        )?;
        if !after.is_empty() {
            qmp.execute("transaction", Some(json!({ "actions": after })))?;
        }
        Ok(())
    }

    /// Exports the point over NBD on the private socket, with `bitmap` (on
    /// the drive's node, disabled) as meta context `qemu:dirty-bitmap:NAME`.
    /// On failure the caller stops the fleece.
    pub fn export(&mut self, qmp: &mut Qmp, bitmap: Option<&str>) -> Result<()> {
        let n = self.names.clone();
        // Only once the filter is the device's drive: a snapshot-access
        // node takes the write permission the device still held.
        qmp.execute(
            "blockdev-add",
            Some(json!({ "driver": "snapshot-access", "node-name": n.access, "file": n.filter })),
        )?;
        qmp.execute(
            "nbd-server-start",
            Some(json!({ "addr": { "type": "unix", "data": { "path": self.socket } } })),
        )?;
        self.server_started = true;
        let mut export = json!({
            "type": "nbd", "id": n.export, "node-name": n.access,
            "name": n.export, "writable": false,
        });
        if let Some(b) = bitmap {
            export["bitmaps"] = json!([{ "node": self.source, "name": b }]);
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

    /// The overlay file.
    pub fn overlay(&self) -> &Path {
        &self.overlay
    }

    /// Ends the point in time: the export, the NBD server (if this fleece
    /// started it), the device's drive back to its node, the filter and
    /// the overlay go. What cannot be removed now is named in a warning,
    /// and removed by name by the next run.
    pub fn stop(&mut self, qmp: &mut Qmp) {
        if self.done {
            return;
        }
        self.done = true;
        remove_export(qmp, &self.names.export);
        if self.server_started {
            let _ = qmp.execute("nbd-server-stop", None);
        }
        delete_node(qmp, &self.names.access);
        if self.inserted {
            give_back(qmp, &self.device, &self.source);
        }
        delete_node(qmp, &self.names.filter);
        delete_node(qmp, &self.names.overlay);
        let _ = std::fs::remove_file(&self.overlay);
        let left = leftovers(qmp, &self.names);
        if !left.is_empty() {
            tracing::warn!(left = ?left, "could not remove all of the point in time from QEMU; the next backup of the item removes it");
        }
    }

    /// Removes what a killed run of the same vault and item (`names`) left
    /// in QEMU: its export, its nodes (a device whose drive is its filter
    /// gets the filter's node back), and the NBD server only when no export
    /// at all is left on it. The caller makes sure no live run of these
    /// names exists.
    pub fn remove_leftovers(qmp: &mut Qmp, names: &Names) {
        remove_export(qmp, &names.export);
        delete_node(qmp, &names.access);
        if let Some(device) = device_on(qmp, &names.filter)
            && let Ok(Some(source)) = node::child_of(qmp, &names.filter, "file")
        {
            give_back(qmp, &device, &source);
        }
        delete_node(qmp, &names.filter);
        delete_node(qmp, &names.overlay);
        let exports = qmp
            .execute("query-block-exports", None)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len));
        if exports == Some(0) {
            let _ = qmp.execute("nbd-server-stop", None);
        }
    }
}

/// Makes `source` the drive of `device` again.
fn give_back(qmp: &mut Qmp, device: &str, source: &str) {
    if let Err(e) = qmp.execute(
        "qom-set",
        Some(json!({ "path": device, "property": "drive", "value": source })),
    ) {
        tracing::warn!("could not give device {device} its drive {source} back: {e}");
    }
}

/// The QOM path of the device whose drive is node `root`.
fn device_on(qmp: &mut Qmp, root: &str) -> Option<String> {
    let devices = qmp.execute("query-block", None).ok()?;
    devices.as_array()?.iter().find_map(|d| {
        let r = d.get("inserted")?.get("node-name")?.as_str()?;
        let q = d.get("qdev")?.as_str()?;
        (r == root && q.starts_with('/') && q.len() <= 1024).then(|| q.to_string())
    })
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

/// Deletes node `name` (retried for a moment while it is still in use,
/// by an export that is going, say).
fn delete_node(qmp: &mut Qmp, name: &str) {
    let start = Instant::now();
    while qmp
        .execute("blockdev-del", Some(json!({ "node-name": name })))
        .is_err()
        && start.elapsed() < Duration::from_secs(5)
        && named_in(qmp, "query-named-block-nodes", "node-name", name)
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
    let mut left: Vec<String> = [&names.access, &names.filter, &names.overlay]
        .into_iter()
        .filter(|n| named_in(qmp, "query-named-block-nodes", "node-name", n))
        .cloned()
        .collect();
    if named_in(qmp, "query-block-exports", "id", &names.export) {
        left.push(names.export.clone());
    }
    left
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_per_vault_and_item_short_and_recognised() {
        let n = Names::of("v1", "vm");
        assert_ne!(n, Names::of("v2", "vm"));
        assert_ne!(n, Names::of("v1", "vm2"));
        for name in [&n.filter, &n.overlay, &n.access] {
            assert!(name.len() < 32, "{name}");
        }
        assert!(Names::is_filter(&n.filter));
        for not in [
            n.overlay.as_str(),
            "coffre-cbw",
            "coffre-0123456789abcdeg-cbw",
            "coffre-0123456789abcdef0-cbw",
            "xcoffre-0123456789abcdef-cbw",
        ] {
            assert!(!Names::is_filter(not), "{not}");
        }
    }
}
