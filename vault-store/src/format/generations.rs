//! The codec of a host's memory of one encrypted vault copy's sealed
//! files (rollback protection; the file and its use are
//! `crate::copies::generations`'s): a checksummed envelope (`FORMAT.md`,
//! "Host memory of generations") around JSON: the copy's directory and, per
//! sealed file name, the highest generation seen and the digest of that
//! version's content. Here so that the fuzz targets decode it exactly as
//! a host does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::format::envelope;

/// Magic. Frozen.
pub const MAGIC: [u8; 8] = *b"CFGENS\0\0";
/// Format version.
pub const VERSION: u32 = 1;
/// Largest body (about 400,000 names).
pub const MAX_BODY: usize = 32 << 20;
/// Longest file name remembered.
pub const MAX_NAME: usize = 1024;

/// What a host remembers of one copy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// The copy's directory, as the host opened it (for people reading
    /// the file; the file's name is derived from it).
    pub dir: PathBuf,
    /// The vault whose copy it is (another vault found at the same path
    /// starts a new memory).
    pub vault_id: String,
    /// The highest generation this host has seen or sealed in the copy:
    /// the next seal is above it, whatever the clock says.
    pub highest: u64,
    /// Highest generation seen, by the sealed file's relative name.
    pub seen: BTreeMap<String, Seen>,
}

/// The highest version of one file a host has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seen {
    /// Its generation.
    pub generation: u64,
    /// BLAKE3 of its plain envelope, in hex (64 digits).
    pub digest: String,
}

impl Seen {
    /// The version at `generation` whose content hashes to `digest`.
    pub fn new(generation: u64, digest: &[u8; 32]) -> Seen {
        Seen {
            generation,
            digest: hex::encode(digest),
        }
    }
}

/// Encodes `memory`.
pub fn encode(memory: &Memory) -> Vec<u8> {
    envelope::encode(
        &MAGIC,
        VERSION,
        &serde_json::to_vec(memory).unwrap_or_default(),
    )
}

/// Decodes a memory file, checking every name's length.
pub fn decode(bytes: &[u8]) -> Result<Memory, String> {
    let (_, body) =
        envelope::decode(&MAGIC, VERSION, MAX_BODY, bytes).map_err(|e| e.to_string())?;
    let memory: Memory = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if let Some(name) = memory
        .seen
        .keys()
        .find(|n| n.is_empty() || n.len() > MAX_NAME)
    {
        return Err(format!("a name of {} bytes", name.len()));
    }
    if let Some((name, _)) = memory
        .seen
        .iter()
        .find(|(_, s)| s.digest.len() != 64 || !s.digest.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(format!("{name}: a digest that is not 64 hex digits"));
    }
    Ok(memory)
}

/// Fuzz entry: decodes arbitrary bytes; true when they decode, and then
/// they re-encode to bytes that decode to the same memory.
pub fn fuzz_entry(data: &[u8]) -> bool {
    match decode(data) {
        Ok(m) => {
            assert_eq!(decode(&encode(&m)).as_ref(), Ok(&m));
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_round_trips_and_a_flipped_byte_or_long_name_is_refused() {
        let mut m = Memory {
            dir: "/v".into(),
            ..Memory::default()
        };
        m.seen
            .insert("items/vm.item".into(), Seen::new(7, &[1; 32]));
        let bytes = encode(&m);
        assert_eq!(decode(&bytes), Ok(m.clone()));
        let mut bad = bytes.clone();
        if let Some(b) = bad.get_mut(20) {
            *b ^= 1;
        }
        assert!(decode(&bad).is_err());
        let mut short = m.clone();
        short.seen.insert("a".into(), Seen::default());
        assert!(decode(&encode(&short)).is_err_and(|e| e.contains("64 hex")));
        m.seen
            .insert("x".repeat(MAX_NAME + 1), Seen::new(1, &[0; 32]));
        assert!(decode(&encode(&m)).is_err_and(|e| e.contains("name of")));
    }
}
