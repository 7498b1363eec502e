//! The list of chunks no copy holds intact (`VAULT/damaged`).
//!
//! `verify --read-data` writes it when it finds unrecoverable chunks; a
//! later backup that produces one of these chunks stores it again instead
//! of deduplicating against the damaged record, which heals every point
//! that uses it, and takes it off the list. An envelope (`FORMAT.md`),
//! fuzzed with the catalog files.

use std::collections::BTreeSet;

use crate::format::chunk_id::ChunkId;
use crate::format::envelope;

/// Magic. Frozen.
pub const DAMAGED_MAGIC: [u8; 8] = *b"CFDAMGD\0";
/// Version.
pub const DAMAGED_VERSION: u32 = 1;
/// File name in the vault directory.
pub const DAMAGED_FILE: &str = "damaged";

/// Encodes a list of chunk ids.
pub fn encode(ids: &BTreeSet<ChunkId>) -> Vec<u8> {
    let hex: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    envelope::encode(
        &DAMAGED_MAGIC,
        DAMAGED_VERSION,
        &serde_json::to_vec(&hex).unwrap_or_default(),
    )
}

/// Decodes a list of chunk ids.
pub fn decode(bytes: &[u8]) -> std::result::Result<BTreeSet<ChunkId>, String> {
    let (_, body) = envelope::decode(
        &DAMAGED_MAGIC,
        DAMAGED_VERSION,
        envelope::MAX_ENVELOPE_BODY,
        bytes,
    )
    .map_err(|e| e.to_string())?;
    let hex: Vec<String> = serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
    hex.iter()
        .map(|h| {
            hex::decode(h)
                .ok()
                .and_then(|b| ChunkId::from_slice(&b))
                .ok_or_else(|| format!("{h:?} is not a chunk id"))
        })
        .collect()
}

/// Fuzz entry.
pub fn fuzz_entry(data: &[u8]) -> bool {
    decode(data).is_ok()
}
