//! What the steps that drive a running QEMU need of its monitor: run one
//! QMP command and get its result, and word an error about the VM. Two
//! transports implement it: a QMP socket coffre connects to itself
//! ([`super::qmp::Qmp`]) and libvirt's QMP passthrough for a domain
//! ([`super::libvirt::monitor::DomainMonitor`]), so that the steps
//! ([`super::stream`], the node look-ups of [`super::node`]) are written
//! once.

use serde_json::Value;

use super::qmp::Qmp;
use crate::error::{Result, SnapError};

/// A QEMU monitor a command can be run on.
pub trait Monitor {
    /// Runs `command` with `arguments`; its result (`return`), or an
    /// error naming the command and what QEMU said.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value>;

    /// An error about this VM (its monitor socket, or its domain).
    fn error(&self, reason: String) -> SnapError;
}

impl Monitor for Qmp {
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        Qmp::execute(self, command, arguments)
    }

    fn error(&self, reason: String) -> SnapError {
        Qmp::error(self, reason)
    }
}
