//! A running domain's QEMU monitor reached through libvirt's QMP
//! passthrough (`virsh qemu-monitor-command DOMAIN '{"execute": …}'`), one
//! `virsh` process per command under the domain's timeout: the
//! [`Monitor`] that lets the steps written for a QMP socket
//! ([`crate::vm::stream`]) drive a libvirt domain. libvirt marks a domain
//! it passed a command through as tainted (`custom-monitor`, in its log):
//! it no longer vouches for the block graph, which coffre changes behind
//! its back (the domain's XML still names the disk's old image).
//!
//! What virsh prints is QEMU's reply, untrusted: one bounded JSON object
//! with `return` (the result) or `error` (`class`, `desc`, shown cut and
//! without control characters).

use serde_json::{Value, json};

use super::domain::Domain;
use crate::error::{Result, SnapError};
use crate::vm::json_lines::shown;
use crate::vm::monitor::Monitor;

/// Most bytes of one reply read (a `query-named-block-nodes` of a domain
/// with many disks is tens of KiB).
const MAX_REPLY: usize = 4 << 20;

/// A domain's QEMU monitor, through libvirt.
#[derive(Clone, Debug)]
pub struct DomainMonitor {
    domain: Domain,
}

impl DomainMonitor {
    /// The monitor of `domain` (which must be running when a command is
    /// run).
    pub fn new(domain: Domain) -> DomainMonitor {
        DomainMonitor { domain }
    }

    /// The domain.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }
}

/// QEMU's reply to `command`, as virsh printed it: its result, or the
/// reason it failed.
pub fn reply(command: &str, text: &str) -> std::result::Result<Value, String> {
    if text.len() > MAX_REPLY {
        return Err(format!(
            "{command}: a reply of {} bytes, more than coffre reads",
            text.len()
        ));
    }
    let v: Value = serde_json::from_str(text.trim())
        .map_err(|e| format!("{command}: a reply coffre cannot use (not JSON: {e})"))?;
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    if let Some(e) = v.get("error") {
        let part = |k: &str| shown(e.get(k).and_then(Value::as_str).unwrap_or("?"));
        return Err(format!(
            "{command} failed: {}: {}",
            part("class"),
            part("desc")
        ));
    }
    Err(format!(
        "{command}: a reply coffre cannot use (neither a return nor an error)"
    ))
}

impl Monitor for DomainMonitor {
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let text = self
            .domain
            .virsh(&["qemu-monitor-command", &self.domain.name, &msg.to_string()])
            .map_err(|e| self.error(format!("virsh qemu-monitor-command {command}: {e}")))?;
        reply(command, &text).map_err(|e| self.error(e))
    }

    fn error(&self, reason: String) -> SnapError {
        SnapError::Libvirt {
            domain: self.domain.name.clone(),
            reason,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_replies_are_read_as_untrusted() {
        assert_eq!(
            reply(
                "query-status",
                "{\"return\":{\"status\":\"running\"},\"id\":\"libvirt-4\"}\n\n"
            ),
            Ok(json!({ "status": "running" }))
        );
        let e = reply(
            "blockdev-del",
            r#"{"id":"libvirt-5","error":{"class":"GenericError","desc":"Failed to find node\u001b[31m"}}"#,
        )
        .unwrap_err();
        assert!(
            e.starts_with("blockdev-del failed: GenericError: Failed to find node"),
            "{e}"
        );
        assert!(!e.contains('\u{1b}'), "{e}");
        for bad in ["", "not json", "{\"id\":1}", "[1]"] {
            assert!(reply("x", bad).is_err(), "{bad}");
        }
        assert!(
            reply("x", &" ".repeat(MAX_REPLY + 1))
                .unwrap_err()
                .contains("more than")
        );
    }
}
