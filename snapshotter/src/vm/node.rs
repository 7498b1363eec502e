//! The block node a user names: a node name (`-blockdev node-name=…`), a
//! drive id (`-drive id=…`) or a device id (`-device …,id=vda`), resolved
//! to its node, with the node's size, format and dirty bitmaps, from
//! `query-named-block-nodes` and `query-block`, and to the device that
//! writes through it ([`resolve_drive`]; a live backup puts its filter
//! between the two). The replies are untrusted: only the fields read here
//! are looked at, and a node without a name or a size is not one.

use serde_json::{Value, json};

use super::monitor::Monitor;
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
pub fn named(qmp: &mut (impl Monitor + ?Sized), node_name: &str) -> Result<Option<NodeInfo>> {
    let nodes = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true })))?;
    Ok(nodes
        .as_array()
        .and_then(|all| all.iter().filter_map(node_of).find(|n| n.name == node_name)))
}

/// A drive a device writes through, as a live backup sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    /// The node whose point in time is taken (under a coffre filter at the
    /// device's root, if one is there).
    pub node: NodeInfo,
    /// The QOM path of the device whose `drive` is the node (`None`: no
    /// device writes through it).
    pub device: Option<String>,
    /// The device's root node now, when it is not `node`: a filter above
    /// it (a copy-before-write filter of coffre's or of a backup job).
    pub above: Option<AboveNode>,
}

/// A node between a device and the node a backup names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AboveNode {
    /// Its node name (QEMU's `#block…` when it has none of its own).
    pub name: String,
    /// Its driver.
    pub driver: String,
}

/// The longest QOM path coffre accepts from QEMU.
const MAX_QOM_PATH: usize = 1024;

/// The device of a `query-block` entry: its QOM path, when it is one.
fn qom_path(dev: &Value) -> Option<String> {
    text(dev, "qdev").filter(|q| {
        q.starts_with('/') && q.len() <= MAX_QOM_PATH && !q.chars().any(char::is_control)
    })
}

/// The node child `child` (`file`, `backing`, …) of node `parent`, from
/// QEMU's block graph (`x-debug-query-block-graph`, in QEMU since 4.0).
pub fn child_of(
    qmp: &mut (impl Monitor + ?Sized),
    parent: &str,
    child: &str,
) -> Result<Option<String>> {
    let graph = qmp.execute("x-debug-query-block-graph", None)?;
    Ok(child_in(&graph, parent, child))
}

fn child_in(graph: &Value, parent: &str, child: &str) -> Option<String> {
    let nodes = graph.get("nodes")?.as_array()?;
    let id_of = |name: &str| {
        nodes.iter().find_map(|n| {
            (n.get("type")?.as_str()? == "block-driver" && n.get("name")?.as_str()? == name)
                .then(|| n.get("id")?.as_u64())
                .flatten()
        })
    };
    let parent_id = id_of(parent)?;
    let child_id = graph
        .get("edges")?
        .as_array()?
        .iter()
        .find(|e| {
            e.get("parent").and_then(Value::as_u64) == Some(parent_id)
                && e.get("name").and_then(Value::as_str) == Some(child)
        })?
        .get("child")?
        .as_u64()?;
    nodes
        .iter()
        .find(|n| n.get("id").and_then(Value::as_u64) == Some(child_id))?
        .get("name")?
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// Resolves `wanted` (a node name, a drive id or a device id) to the node
/// whose point in time is taken and the device that writes through it. A
/// device whose root is a coffre filter (`is_coffre_filter(root)`) is seen through
/// it: its node is the filter's `file` child.
pub fn resolve_drive(
    qmp: &mut Qmp,
    wanted: &str,
    is_coffre_filter: impl Fn(&str) -> bool,
) -> Result<Drive> {
    let devices = qmp.execute("query-block", None)?;
    let mut found = Vec::new();
    for d in devices.as_array().map(Vec::as_slice).unwrap_or_default() {
        let Some(root) = d.get("inserted").and_then(|i| text(i, "node-name")) else {
            continue;
        };
        let under = if is_coffre_filter(&root) {
            child_of(qmp, &root, "file")?
        } else {
            None
        };
        found.push((d, root, under));
    }
    let hit = found
        .iter()
        .find(|(d, _, _)| is_device(d, wanted))
        .or_else(|| {
            found.iter().find(|(_, root, under)| {
                under.as_deref().unwrap_or(root) == wanted || root == wanted
            })
        });
    let Some((dev, root, under)) = hit else {
        // A node no device writes through.
        return match named(qmp, wanted)? {
            Some(node) => Ok(Drive {
                node,
                device: None,
                above: None,
            }),
            None => Err(not_found(qmp, wanted)),
        };
    };
    let name = under.as_deref().unwrap_or(root);
    let node = named(qmp, name)?.ok_or_else(|| not_found(qmp, wanted))?;
    let above = match under {
        Some(_) => Some(AboveNode {
            name: root.clone(),
            driver: named(qmp, root)?.map(|n| n.driver).unwrap_or_default(),
        }),
        // Somebody else's copy-before-write filter (a backup job's) at
        // the root is not the drive either.
        None if node.driver == "copy-before-write" => Some(AboveNode {
            name: root.clone(),
            driver: node.driver.clone(),
        }),
        None => None,
    };
    Ok(Drive {
        node,
        device: qom_path(dev),
        above,
    })
}

fn not_found(qmp: &Qmp, wanted: &str) -> crate::error::SnapError {
    qmp.error(format!(
        "no block node, drive or device {wanted:?} in this VM (see query-named-block-nodes and query-block)"
    ))
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

    #[test]
    fn a_child_is_read_from_the_untrusted_graph_edge_by_edge() {
        let g = json!({
            "nodes": [
                { "id": 1, "name": "/machine/peripheral/vda/virtio-backend", "type": "block-backend" },
                { "id": 2, "name": "coffre-0123456789abcdef-cbw", "type": "block-driver" },
                { "id": 4, "name": "disk0", "type": "block-driver" },
                { "id": 6, "name": "ovl", "type": "block-driver" },
                { "id": 7, "name": "", "type": "block-driver" },
            ],
            "edges": [
                { "parent": 1, "child": 2, "name": "root" },
                { "parent": 2, "child": 6, "name": "target" },
                { "parent": 2, "child": 4, "name": "file" },
                { "parent": 4, "child": 7, "name": "file" },
                { "parent": "x", "child": 4, "name": "file" },
            ],
        });
        let cbw = "coffre-0123456789abcdef-cbw";
        assert_eq!(child_in(&g, cbw, "file").as_deref(), Some("disk0"));
        assert_eq!(child_in(&g, cbw, "target").as_deref(), Some("ovl"));
        assert_eq!(child_in(&g, "disk0", "file"), None, "an unnamed child");
        assert_eq!(child_in(&g, "nope", "file"), None);
        assert_eq!(child_in(&json!({ "nodes": 3 }), cbw, "file"), None);
        assert_eq!(qom_path(&json!({ "qdev": "vda" })), None);
        assert_eq!(
            qom_path(&json!({ "qdev": "/machine/peripheral/vda/virtio-backend" })).as_deref(),
            Some("/machine/peripheral/vda/virtio-backend")
        );
    }
}
