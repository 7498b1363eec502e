//! The replication state file (`VAULT/replication` and
//! `SECONDARY/replication`): which segment bytes the GRS secondary holds
//! durably and when each point reached it. An envelope (`FORMAT.md`),
//! fuzzed: `fuzz/fuzz_targets/replication_state.rs`.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::format::envelope;

/// Replication state magic (both sides). Frozen.
pub const STATE_MAGIC: [u8; 8] = *b"CFREPL\0\0";
/// Replication state version.
pub const STATE_VERSION: u32 = 1;
/// Name of the state file, in the primary and in the secondary.
pub const STATE_FILE: &str = "replication";

/// What the primary knows of its secondary; the secondary's copy of it
/// says how many bytes of each segment it holds durably.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicationState {
    /// Durable bytes of each segment on the secondary.
    #[serde(default)]
    pub segments: BTreeMap<u64, u64>,
    /// When each point (by id) reached the secondary.
    #[serde(default)]
    pub points: BTreeMap<String, Timestamp>,
    /// End of the last run that completed.
    #[serde(default)]
    pub last_run: Option<Timestamp>,
}

impl ReplicationState {
    /// Encodes the state.
    pub fn encode(&self) -> Vec<u8> {
        envelope::encode(
            &STATE_MAGIC,
            STATE_VERSION,
            &serde_json::to_vec(self).unwrap_or_default(),
        )
    }
    /// Decodes a state file.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        let (_, body) = envelope::decode(
            &STATE_MAGIC,
            STATE_VERSION,
            envelope::MAX_ENVELOPE_BODY * 16,
            bytes,
        )
        .map_err(|e| e.to_string())?;
        serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))
    }
}

/// Fuzz entry: decodes a replication state file.
pub fn fuzz_entry(data: &[u8]) -> bool {
    ReplicationState::decode(data).is_ok()
}
