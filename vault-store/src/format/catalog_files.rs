//! The self-describing catalog files every copy holds, so that a copy can
//! be reopened without the others and without the RocksDB index:
//!
//! - `points/ITEM/SEQ.point`: one point manifest per recovery point (the
//!   `PointRecord`: image size, block size, block-map root, …);
//! - `items/ITEM.item`: the protected item (source, policy, protection);
//! - `policies/NAME.policy`: a backup policy;
//! - `copy`: the copy's identity (vault id and name, its role).
//!
//! Each is an [`envelope`](crate::format::envelope) (magic, version, length, JSON,
//! CRC-32); in an encrypted vault, a sealed one
//! ([`crate::format::sealed_file`]): the `*_in` decoders open it with the
//! vault's keys (`None` for a plain vault) and the name it was read
//! under, and [`crate::format::sealed_file::seal`] seals what the encoders
//! return. They are written with [`Store::put`](crate::store::Store::put)
//! on every copy *before* the index batch that records the same change is
//! committed (`FORMAT.md`, invariant C2), so the copies are the truth and
//! the index is a cache `vault rebuild-index` can rebuild.

use serde::{Deserialize, Serialize};

use crate::format::catalog::{ItemRecord, PointRecord};
use crate::format::envelope::{self, EnvelopeError};

/// Point manifest magic. Frozen.
pub const POINT_MAGIC: [u8; 8] = *b"CFPOINT\0";
/// Item file magic. Frozen.
pub const ITEM_MAGIC: [u8; 8] = *b"CFITEM\0\0";
/// Policy file magic. Frozen.
pub const POLICY_MAGIC: [u8; 8] = *b"CFPOLCY\0";
/// Copy identity magic. Frozen.
pub const COPY_MAGIC: [u8; 8] = *b"CFCOPY\0\0";
/// Version of all four.
pub const CATALOG_FILE_VERSION: u32 = 1;

/// Folder of the point manifests.
pub const POINTS_DIR: &str = "points";
/// Folder of the item files.
pub const ITEMS_DIR: &str = "items";
/// Folder of the policy files.
pub const POLICIES_DIR: &str = "policies";
/// Name of the copy identity file.
pub const COPY_FILE: &str = "copy";

/// Name of the manifest of point `seq` of `item`.
pub fn point_file(item: &str, seq: u64) -> String {
    format!("{POINTS_DIR}/{item}/{seq:016x}.point")
}

/// Name of the file of `item`.
pub fn item_file(item: &str) -> String {
    format!("{ITEMS_DIR}/{item}.item")
}

/// Name of the file of policy `name` (hex, since policy names are free
/// text).
pub fn policy_file(name: &str) -> String {
    format!("{POLICIES_DIR}/{}.policy", hex::encode(name.as_bytes()))
}

/// Encodes a point manifest.
pub fn encode_point(p: &PointRecord) -> Vec<u8> {
    let body = serde_json::to_vec(p).unwrap_or_default();
    envelope::encode(&POINT_MAGIC, CATALOG_FILE_VERSION, &body)
}

/// Decodes a point manifest; its names must pass [`crate::format::name::check_name`].
pub fn decode_point(bytes: &[u8]) -> Result<PointRecord, String> {
    let p: PointRecord = decode_json(&POINT_MAGIC, bytes)?;
    p.check_names().map_err(|e| e.to_string())?;
    crate::format::config::validate_block_size(p.block_size)
        .map_err(|e| format!("point {}: {e}", p.id))?;
    Ok(p)
}

/// Encodes an item file.
pub fn encode_item(i: &ItemRecord) -> Vec<u8> {
    let body = serde_json::to_vec(i).unwrap_or_default();
    envelope::encode(&ITEM_MAGIC, CATALOG_FILE_VERSION, &body)
}

/// Decodes an item file; its name must pass [`crate::format::name::check_name`].
pub fn decode_item(bytes: &[u8]) -> Result<ItemRecord, String> {
    let i: ItemRecord = decode_json(&ITEM_MAGIC, bytes)?;
    i.check_names().map_err(|e| e.to_string())?;
    Ok(i)
}

/// A stored policy: its name and its JSON as the engine wrote it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyFile {
    /// Policy name.
    pub name: String,
    /// The policy JSON.
    pub policy: serde_json::Value,
}

/// Encodes a policy file.
pub fn encode_policy(p: &PolicyFile) -> Vec<u8> {
    let body = serde_json::to_vec(p).unwrap_or_default();
    envelope::encode(&POLICY_MAGIC, CATALOG_FILE_VERSION, &body)
}

/// Decodes a policy file.
pub fn decode_policy(bytes: &[u8]) -> Result<PolicyFile, String> {
    decode_json(&POLICY_MAGIC, bytes)
}

/// The role of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The vault directory (holds the index and the locks).
    Primary,
    /// A synchronous LRS copy.
    Replica,
    /// The asynchronous GRS copy.
    Secondary,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Secondary => "secondary",
        })
    }
}

/// A copy's identity file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyIdentity {
    /// The vault's id.
    pub vault_id: String,
    /// The vault's name.
    pub vault_name: String,
    /// What this copy is.
    pub role: Role,
}

/// Encodes a copy identity.
pub fn encode_copy(c: &CopyIdentity) -> Vec<u8> {
    let body = serde_json::to_vec(c).unwrap_or_default();
    envelope::encode(&COPY_MAGIC, CATALOG_FILE_VERSION, &body)
}

/// Decodes a copy identity.
pub fn decode_copy(bytes: &[u8]) -> Result<CopyIdentity, String> {
    decode_json(&COPY_MAGIC, bytes)
}

/// The plain envelope of stored file `name` (opened with `keys` in an
/// encrypted vault), or why it was refused.
pub fn open_in<'a>(
    name: &str,
    bytes: &'a [u8],
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<std::borrow::Cow<'a, [u8]>, String> {
    crate::format::sealed_file::open(name, bytes, keys).map_err(|e| e.to_string())
}

/// [`decode_point`] of stored file `name` of a vault with `keys`.
pub fn decode_point_in(
    name: &str,
    bytes: &[u8],
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<PointRecord, String> {
    decode_point(&open_in(name, bytes, keys)?)
}

/// [`decode_item`] of stored file `name` of a vault with `keys`.
pub fn decode_item_in(
    name: &str,
    bytes: &[u8],
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<ItemRecord, String> {
    decode_item(&open_in(name, bytes, keys)?)
}

/// [`decode_policy`] of stored file `name` of a vault with `keys`.
pub fn decode_policy_in(
    name: &str,
    bytes: &[u8],
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<PolicyFile, String> {
    decode_policy(&open_in(name, bytes, keys)?)
}

/// [`decode_copy`] of a stored copy identity of a vault with `keys`.
pub fn decode_copy_in(
    bytes: &[u8],
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<CopyIdentity, String> {
    decode_copy(&open_in(COPY_FILE, bytes, keys)?)
}

/// Checks stored catalog file `name` (a point manifest, an item or a
/// policy file) of a vault with `keys`: `Ok` when it opens and decodes.
pub fn check_in(
    name: &str,
    bytes: &[u8],
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<(), String> {
    if name.starts_with(POINTS_DIR) {
        decode_point_in(name, bytes, keys).map(drop)
    } else if name.starts_with(ITEMS_DIR) {
        decode_item_in(name, bytes, keys).map(drop)
    } else if name.starts_with(POLICIES_DIR) {
        decode_policy_in(name, bytes, keys).map(drop)
    } else {
        open_in(name, bytes, keys).map(drop)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(magic: &[u8; 8], bytes: &[u8]) -> Result<T, String> {
    let (_, body) = envelope::decode(
        magic,
        CATALOG_FILE_VERSION,
        envelope::MAX_ENVELOPE_BODY,
        bytes,
    )
    .map_err(|e: EnvelopeError| e.to_string())?;
    serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))
}

/// The naming-rule problem of catalog file `name` of a copy, if it has
/// one: the item its path names (`points/ITEM/…`, `items/ITEM.item`) or a
/// name it holds breaks [`crate::format::name::check_name`]. Files that do not
/// decode at all have no name problem (the decoders report them).
pub fn name_problem(name: &str, bytes: &[u8]) -> Option<crate::format::name::NameError> {
    use crate::format::name::check_name;
    if let Some(rest) = name.strip_prefix(&format!("{POINTS_DIR}/")) {
        let item = rest.split('/').next().unwrap_or_default();
        if let Err(e) = check_name("item", item) {
            return Some(e);
        }
        return decode_json::<PointRecord>(&POINT_MAGIC, bytes)
            .ok()
            .and_then(|p| p.check_names().err());
    }
    if let Some(rest) = name.strip_prefix(&format!("{ITEMS_DIR}/")) {
        let item = rest.strip_suffix(".item").unwrap_or(rest);
        if let Err(e) = check_name("item", item) {
            return Some(e);
        }
        return decode_json::<ItemRecord>(&ITEM_MAGIC, bytes)
            .ok()
            .and_then(|i| i.check_names().err());
    }
    None
}

/// Fuzz entry: decodes `data` as each of the four files; true when one
/// accepted it.
pub fn fuzz_entry(data: &[u8]) -> bool {
    let p = decode_point(data).is_ok();
    let i = decode_item(data).is_ok();
    let q = decode_policy(data).is_ok();
    let c = decode_copy(data).is_ok();
    p || i || q || c
}

/// Fuzz entry of a sealed catalog file: opens `data` as sealed file
/// [`crate::format::sealed_file::FUZZ_NAME`] with `keys`
/// ([`crate::format::sealed_file::fuzz_keys`]) and decodes what opens as
/// each catalog file ([`fuzz_entry`]); true when it opened.
pub fn fuzz_sealed_entry(keys: &crate::crypto::VaultKeys, data: &[u8]) -> bool {
    match crate::format::sealed_file::open(crate::format::sealed_file::FUZZ_NAME, data, Some(keys))
    {
        Ok(plain) => {
            fuzz_entry(&plain);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn copy_identity_round_trips_and_rejects_other_magics() {
        let c = CopyIdentity {
            vault_id: "0123456789abcdef".into(),
            vault_name: "v".into(),
            role: Role::Replica,
        };
        let bytes = encode_copy(&c);
        assert_eq!(decode_copy(&bytes).unwrap(), c);
        assert!(decode_point(&bytes).is_err());
        let mut bad = bytes.clone();
        let n = bad.len() - 6;
        bad[n] ^= 1;
        assert!(decode_copy(&bad).is_err());
        assert!(decode_copy(&bytes[..bytes.len() - 1]).is_err());
        assert_eq!(policy_file("a b"), "policies/612062.policy");
        assert_eq!(point_file("web", 3), "points/web/0000000000000003.point");
    }

    fn item(name: &str) -> ItemRecord {
        ItemRecord {
            name: name.into(),
            source: "/img".into(),
            created: jiff::Timestamp::UNIX_EPOCH,
            next_seq: 1,
            policy: None,
            protection: Default::default(),
            last_slot: None,
            identity: None,
            hooks: Default::default(),
        }
    }

    #[test]
    fn a_file_naming_a_path_is_refused_and_its_problem_named() {
        for bad in ["/tmp/x", "../x", "a/b", ""] {
            let bytes = encode_item(&item(bad));
            let e = decode_item(&bytes).unwrap_err();
            assert!(e.contains("item name"), "{e}");
            assert!(name_problem("items/ok.item", &bytes).is_some(), "{bad}");
        }
        let good = encode_item(&item("ok"));
        assert_eq!(decode_item(&good).unwrap().name, "ok");
        assert!(name_problem("items/ok.item", &good).is_none());
        assert!(name_problem("items/..x.item", &good).is_some());
        assert!(name_problem("points/a b/0000000000000001.point", &good).is_some());
    }
}
