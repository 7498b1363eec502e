//! The block node a user names: a node name (`-blockdev node-name=…`), a
//! drive id (`-drive id=…`) or a device id (`-device …,id=vda`), resolved
//! to its node, with the node's size, format and dirty bitmaps, from
//! `query-named-block-nodes` and `query-block`. The replies are untrusted:
//! only the fields read here are looked at, and a node without a name or a
//! size is not one.

use serde_json::{Value, json};

use super::qmp::Qmp;
use crate::error::Result;

/// One dirty bitmap of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name.
    pub name: String,
    /// True while it records writes (enabled).
    pub recording: bool,
    /// Stored in the image (qcow2), so it survives a VM restart.
    pub persistent: bool,
    /// In use by an operation (an export, a job).
    pub busy: bool,
    /// QEMU cannot vouch for its contents: a persistent bitmap whose QEMU
    /// stopped without saving it (killed). QEMU refuses to use it; it can
    /// only be removed. A reply without the field means `false`; one whose
    /// field is not a boolean counts as inconsistent.
    pub inconsistent: bool,
}

/// A block node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its node name.
    pub name: String,
    /// Its virtual size in bytes.
    pub size: u64,
    /// Its driver (`qcow2`, `raw`, …).
    pub driver: String,
    /// Its dirty bitmaps.
    pub bitmaps: Vec<BitmapInfo>,
}

impl NodeInfo {
    /// True when its bitmaps can be stored in the image (qcow2 only).
    pub fn can_persist_bitmaps(&self) -> bool {
        self.driver == "qcow2"
    }
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn node_of(v: &Value) -> Option<NodeInfo> {
    let name = text(v, "node-name").filter(|n| !n.is_empty())?;
    let size = v.get("image")?.get("virtual-size")?.as_u64()?;
    let bitmaps = v
        .get("dirty-bitmaps")
        .and_then(Value::as_array)
        .map(|all| {
            all.iter()
                .filter_map(|b| {
                    Some(BitmapInfo {
                        name: text(b, "name")?,
                        recording: b.get("recording").and_then(Value::as_bool)?,
                        persistent: b.get("persistent").and_then(Value::as_bool)?,
                        busy: b.get("busy").and_then(Value::as_bool).unwrap_or(false),
                        inconsistent: match b.get("inconsistent") {
                            None => false,
                            Some(v) => v.as_bool().unwrap_or(true),
                        },
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(NodeInfo {
        name,
        size,
        driver: text(v, "drv").unwrap_or_default(),
        bitmaps,
    })
}

/// The node called `node_name`, if QEMU has it.
pub fn named(qmp: &mut Qmp, node_name: &str) -> Result<Option<NodeInfo>> {
    let nodes = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true })))?;
    Ok(nodes
        .as_array()
        .and_then(|all| all.iter().filter_map(node_of).find(|n| n.name == node_name)))
}

/// True when `query-block` entry `dev` is the drive or device `wanted`.
fn is_device(dev: &Value, wanted: &str) -> bool {
    let device = text(dev, "device").unwrap_or_default();
    let qdev = text(dev, "qdev").unwrap_or_default();
    if wanted.is_empty() {
        return false;
    }
    device == wanted
        || qdev == wanted
        || qdev
            .strip_prefix("/machine/peripheral/")
            .and_then(|rest| rest.split('/').next())
            == Some(wanted)
}

/// Resolves `wanted` (a node name, a drive id or a device id) to its
/// node; an unknown name is an error naming it.
pub fn resolve(qmp: &mut Qmp, wanted: &str) -> Result<NodeInfo> {
    if let Some(n) = named(qmp, wanted)? {
        return Ok(n);
    }
    let devices = qmp.execute("query-block", None)?;
    let node = devices.as_array().and_then(|all| {
        all.iter()
            .filter(|d| is_device(d, wanted))
            .find_map(|d| text(d.get("inserted")?, "node-name"))
    });
    if let Some(name) = node
        && let Some(n) = named(qmp, &name)?
    {
        return Ok(n);
    }
    Err(qmp.error(format!(
        "no block node, drive or device {wanted:?} in this VM (see query-named-block-nodes and query-block)"
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_read_from_untrusted_replies_field_by_field() {
        let v = json!({
            "node-name": "disk0", "drv": "qcow2", "image": { "virtual-size": 1024 },
            "dirty-bitmaps": [
                { "name": "a", "recording": true, "persistent": true, "busy": false },
                { "name": "no-flags" },
                { "name": "bad", "recording": false, "persistent": true, "inconsistent": true },
                { "name": "odd", "recording": false, "persistent": true, "inconsistent": "no" },
                { "name": 7, "recording": true, "persistent": true },
            ],
        });
        let n = node_of(&v).unwrap();
        assert_eq!((n.name.as_str(), n.size), ("disk0", 1024));
        assert!(n.can_persist_bitmaps());
        assert_eq!(n.bitmaps.len(), 3, "{:?}", n.bitmaps);
        let flags: Vec<(&str, bool)> = n
            .bitmaps
            .iter()
            .map(|b| (b.name.as_str(), b.inconsistent))
            .collect();
        assert_eq!(flags, [("a", false), ("bad", true), ("odd", true)]);
        assert!(node_of(&json!({ "node-name": "", "image": { "virtual-size": 1 } })).is_none());
        assert!(node_of(&json!({ "node-name": "x", "image": {} })).is_none());
        assert!(node_of(&json!({ "node-name": "x", "image": { "virtual-size": -1 } })).is_none());
    }

    #[test]
    fn devices_match_by_drive_id_device_id_or_qom_path() {
        let d = json!({ "device": "drive1", "qdev": "/machine/peripheral/vdb/virtio-backend" });
        assert!(is_device(&d, "drive1"));
        assert!(is_device(&d, "vdb"));
        assert!(!is_device(&d, "vd"));
        assert!(!is_device(&d, "virtio-backend"));
        assert!(!is_device(&json!({ "device": "" }), ""));
    }
}
