//! Shared-vault state files: writer leases, `gc/state` and the condemned
//! lists (`FORMAT.md`, "Shared vaults: leases and GC"). Each is JSON in an
//! [`envelope`] with its own magic.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::format::envelope;

/// The GC state object.
pub const GC_STATE: &str = "gc/state";
/// Folder of the writers' leases.
pub const LEASES_DIR: &str = "leases";
/// Folder of the condemned lists.
pub const CONDEMNED_DIR: &str = "gc/condemned";

const LEASE_MAGIC: [u8; 8] = *b"CFLEASE\0";
const STATE_MAGIC: [u8; 8] = *b"CFGCSTAT";
const CONDEMNED_MAGIC: [u8; 8] = *b"CFCONDMN";
const VERSION: u32 = 1;
const MAX_BODY: usize = 16 << 20;

/// `gc/state`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    /// The newest GC epoch.
    pub epoch: u64,
    /// The GC of `epoch`, while it marks and sweeps: who and until when.
    pub marking: Option<GcHolder>,
}

/// The GC holding `gc/state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcHolder {
    /// Host tag.
    pub host_tag: u16,
    /// Its lease ends here; another GC may take over after.
    pub until: Timestamp,
}

/// A writer's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Host tag.
    pub host_tag: u16,
    /// The session (random).
    pub session: String,
    /// The GC epoch the writer saw when it started.
    pub epoch_seen: u64,
    /// When it was taken.
    pub taken: Timestamp,
    /// When it expires unless renewed.
    pub expires: Timestamp,
}

/// A condemned list: segments that were dead at the mark of `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condemned {
    /// The GC run that wrote it.
    pub epoch: u64,
    /// Segment ids.
    pub segments: Vec<u64>,
}

fn encode<T: Serialize>(magic: &[u8; 8], v: &T) -> Vec<u8> {
    envelope::encode(magic, VERSION, &serde_json::to_vec(v).unwrap_or_default())
}

fn decode<T: for<'a> Deserialize<'a>>(magic: &[u8; 8], bytes: &[u8], what: &str) -> Result<T> {
    let bad = |reason: String| StoreError::CorruptFile {
        path: what.into(),
        what: "shared-vault state",
        reason,
    };
    let (_, body) =
        envelope::decode(magic, VERSION, MAX_BODY, bytes).map_err(|e| bad(e.to_string()))?;
    serde_json::from_slice(body).map_err(|e| bad(e.to_string()))
}

/// Encodes a lease (fuzz seeds, tests).
pub fn encode_lease(l: &Lease) -> Vec<u8> {
    encode(&LEASE_MAGIC, l)
}

/// Encodes the GC state.
pub fn encode_state(s: &GcState) -> Vec<u8> {
    encode(&STATE_MAGIC, s)
}

/// Encodes a condemned list.
pub fn encode_condemned(c: &Condemned) -> Vec<u8> {
    encode(&CONDEMNED_MAGIC, c)
}

/// Fuzz entry point: decodes arbitrary bytes as each of the three files;
/// never panics.
pub fn fuzz_entry(data: &[u8]) -> bool {
    decode::<Lease>(&LEASE_MAGIC, data, "fuzz").is_ok()
        | decode::<GcState>(&STATE_MAGIC, data, "fuzz").is_ok()
        | decode::<Condemned>(&CONDEMNED_MAGIC, data, "fuzz").is_ok()
}

/// Decodes a lease read from `name`.
pub fn decode_lease(bytes: &[u8], name: &str) -> Result<Lease> {
    decode(&LEASE_MAGIC, bytes, name)
}

/// Decodes `gc/state` read from `name`.
pub fn decode_state(bytes: &[u8], name: &str) -> Result<GcState> {
    decode(&STATE_MAGIC, bytes, name)
}

/// Decodes a condemned list read from `name`.
pub fn decode_condemned(bytes: &[u8], name: &str) -> Result<Condemned> {
    decode(&CONDEMNED_MAGIC, bytes, name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn state_files_round_trip_and_reject_damage() {
        let l = Lease {
            host_tag: 3,
            session: "ab".into(),
            epoch_seen: 7,
            taken: Timestamp::UNIX_EPOCH,
            expires: Timestamp::UNIX_EPOCH,
        };
        let b = encode(&LEASE_MAGIC, &l);
        assert_eq!(decode::<Lease>(&LEASE_MAGIC, &b, "x").unwrap(), l);
        let mut bad = b.clone();
        if let Some(x) = bad.last_mut() {
            *x ^= 1;
        }
        assert!(decode::<Lease>(&LEASE_MAGIC, &bad, "x").is_err());
        assert!(
            decode::<GcState>(&STATE_MAGIC, &b, "x").is_err(),
            "wrong magic"
        );
        assert!(!fuzz_entry(&bad));
    }
}
