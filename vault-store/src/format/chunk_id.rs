//! The chunk identifier: the BLAKE3 hash of a chunk's plaintext.

use std::fmt;
use std::str::FromStr;

/// A 32-byte BLAKE3 digest naming a chunk by its plaintext content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Length of an id in bytes.
    pub const LEN: usize = 32;

    /// Hashes `data` into its id (an unencrypted vault's).
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// The id of `data` in a vault whose keys are `keys`: keyed BLAKE3 in
    /// an encrypted vault, plain BLAKE3 otherwise.
    pub fn in_vault(keys: Option<&crate::crypto::VaultKeys>, data: &[u8]) -> Self {
        match keys {
            Some(k) => ChunkId(k.chunk_id(data)),
            None => Self::of(data),
        }
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads an id from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(ChunkId)
    }

    /// Short form for messages: the first 12 hex digits.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(12);
        s
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}

impl FromStr for ChunkId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|e| format!("invalid chunk id {s:?}: {e}"))?;
        ChunkId::from_slice(&bytes).ok_or_else(|| format!("chunk id {s:?} is not 32 bytes"))
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
