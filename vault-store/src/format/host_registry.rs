//! The codec of a host's registry of protected images (the file itself,
//! its lock and its use are `coffre_engine::registry`'s): a checksummed
//! envelope (`FORMAT.md`, "Envelope") around a JSON list of entries. Here
//! so that the fuzz targets, built without RocksDB, decode it exactly as
//! a host does. Every entry's item name is checked when decoded: it passes
//! the one name rule ([`crate::format::name`]). (Its image may be an NBD URI, not
//! a path; the paths are compared, never created or removed.)

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::SourceIdentity;
use crate::format::catalog::Hooks;
use crate::format::envelope;
use crate::format::name;

/// Magic. Frozen.
pub const MAGIC: [u8; 8] = *b"CFREGST\0";
/// Format version.
pub const VERSION: u32 = 1;

/// One protected image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// Canonical image path.
    pub path: PathBuf,
    /// File or device identity.
    pub identity: Option<SourceIdentity>,
    /// Vault directory.
    pub vault_dir: PathBuf,
    /// Vault id.
    pub vault_id: String,
    /// Vault name.
    pub vault_name: String,
    /// Item name in that vault.
    pub item: String,
    /// The pre- and post-snapshot hooks set on this host for the item
    /// (`None`: none). The only hooks this host runs for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
}

/// Encodes the entries as a registry file.
pub fn encode(entries: &[RegistryEntry]) -> Vec<u8> {
    // Serialising plain records into a Vec cannot fail.
    let body = serde_json::to_vec_pretty(entries).unwrap_or_default();
    envelope::encode(&MAGIC, VERSION, &body)
}

/// Decodes a registry file; the error says what is wrong.
pub fn decode(bytes: &[u8]) -> Result<Vec<RegistryEntry>, String> {
    let (_, body) = envelope::decode(&MAGIC, VERSION, envelope::MAX_ENVELOPE_BODY, bytes)
        .map_err(|e| e.to_string())?;
    let entries: Vec<RegistryEntry> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    for e in &entries {
        name::check_name("item", &e.item).map_err(|n| n.to_string())?;
    }
    Ok(entries)
}

/// The `host_registry` fuzz target's body: what decodes encodes back to
/// entries that decode the same. Returns whether `data` decoded.
pub fn fuzz_entry(data: &[u8]) -> bool {
    let Ok(entries) = decode(data) else {
        return false;
    };
    assert_eq!(decode(&encode(&entries)).as_ref(), Ok(&entries));
    true
}
