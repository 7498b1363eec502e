//! The vault config file (`VAULT/config`): identity and settings fixed at
//! creation, inside a checksummed, versioned envelope (see `FORMAT.md`,
//! "Vault config").

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::path::Path;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::format::envelope::{self, EnvelopeError};

/// Config file name inside a vault.
pub const CONFIG_FILE: &str = "config";
/// Envelope magic. Frozen.
pub const CONFIG_MAGIC: [u8; 8] = *b"CFVAULT\0";
/// The newest vault format version this build reads.
/// Version 2 (reference counts, policies, jobs) is written by the first
/// writer that opens a version-1 vault, so that a version-1 build, which
/// would not maintain the counts GC relies on, refuses it from then on.
/// Version 3 is written while the vault has LRS replicas or a GRS
/// secondary, so that a build without copies, which would write to the
/// vault directory alone, refuses it ([`VaultConfig::format_version`]).
/// Version 4 is written for a vault in object storage (`store`), so that
/// a build without it, which would treat the host's cache directory as a
/// local vault, refuses it. Version 5 is written once a vault with one
/// synchronous copy (a GRS secondary allowed)
/// holds adopted packs (`adopted_packs`).
pub const FORMAT_VERSION: u32 = 5;
/// The version of a vault in object storage.
pub const FORMAT_VERSION_STORE: u32 = 4;
/// The version of a vault holding adopted packs.
pub const FORMAT_VERSION_ADOPTED: u32 = 5;
/// The version of a vault with copies.
pub const FORMAT_VERSION_COPIES: u32 = 3;
/// The version of a vault without copies.
pub const FORMAT_VERSION_SINGLE: u32 = 2;
const MAX_BODY: usize = 64 << 10;

/// Smallest and largest block size (both powers of two).
pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;
/// Default block size, chosen by measurement (see README, "Choosing the
/// block size").
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
/// Default zstd level, chosen by measurement.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;
/// Allowed zstd levels (0 stores raw).
pub const COMPRESSION_LEVELS: std::ops::RangeInclusive<i32> = 0..=19;

/// Storage redundancy of a vault. Fixed once the vault protects an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Redundancy {
    /// Locally redundant: copies on this machine.
    #[default]
    Lrs,
    /// Geo redundant: LRS plus an asynchronous secondary.
    Grs,
}

impl std::fmt::Display for Redundancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Redundancy::Lrs => "LRS",
            Redundancy::Grs => "GRS",
        })
    }
}

impl std::str::FromStr for Redundancy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "LRS" => Ok(Redundancy::Lrs),
            "GRS" => Ok(Redundancy::Grs),
            _ => Err(format!("{s:?} is neither LRS nor GRS")),
        }
    }
}

/// Settings and identity of a vault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultConfig {
    /// Vault name (Azure rules: 2-50 chars, letter first, letters, digits, hyphens).
    pub name: String,
    /// Random identity, distinguishing vaults with equal names.
    pub vault_id: String,
    /// Fixed block size in bytes.
    pub block_size: u32,
    /// zstd level for new chunks (0 = raw).
    pub compression_level: i32,
    /// Storage redundancy.
    pub redundancy: Redundancy,
    /// When the vault was created.
    pub created: Timestamp,
    /// Where every item's instant-restore snapshots go (`vault set
    /// --snapshot-area`); `None`: next to each image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_area: Option<std::path::PathBuf>,
    /// LRS replica directories: synchronous copies besides the vault
    /// directory itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<std::path::PathBuf>,
    /// The GRS secondary: an asynchronous copy (`coffre replicate`); a
    /// directory or a store URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<std::path::PathBuf>,
    /// The object store the vault lives in (`vault create --store`): the
    /// vault directory is then one host's cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// True once a transfer adopted a snapshot pack as a segment (a hard
    /// link shared with the snapshot area; see FORMAT.md, "Adopted
    /// packs"). Such a vault is written at version 5, so that a build that
    /// would append to, punch or cut an adopted segment refuses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted_packs: bool,
}

impl VaultConfig {
    /// Checks every field against its rule.
    pub fn validate(&self) -> Result<()> {
        validate_vault_name(&self.name)?;
        validate_block_size(self.block_size)?;
        if !COMPRESSION_LEVELS.contains(&self.compression_level) {
            return Err(StoreError::InvalidSetting {
                field: "compression-level",
                reason: format!(
                    "{} is outside {}..={}",
                    self.compression_level,
                    COMPRESSION_LEVELS.start(),
                    COMPRESSION_LEVELS.end()
                ),
            });
        }
        Ok(())
    }

    /// The format version this config is written at: 4 in object storage,
    /// 5 once it holds adopted packs (a GRS vault without replicas adopts
    /// too), 3 with copies (a replica or a secondary), else 2.
    pub fn format_version(&self) -> u32 {
        if self.store.is_some() {
            FORMAT_VERSION_STORE
        } else if self.adopted_packs {
            FORMAT_VERSION_ADOPTED
        } else if !self.replicas.is_empty() || self.secondary.is_some() {
            FORMAT_VERSION_COPIES
        } else {
            FORMAT_VERSION_SINGLE
        }
    }

    /// The config without the host-local settings a shared vault's store
    /// must not choose for its hosts: the snapshot area (where a host
    /// writes, as root, full-disk snapshots) and the replicas and secondary
    /// (where a host copies the vault). Returns it with the names of the
    /// settings it dropped. Each host sets its own with `coffre vault set`.
    pub fn without_host_settings(mut self) -> (VaultConfig, Vec<&'static str>) {
        let mut dropped = Vec::new();
        if self.snapshot_area.take().is_some() {
            dropped.push("snapshot_area");
        }
        if !std::mem::take(&mut self.replicas).is_empty() {
            dropped.push("replicas");
        }
        if self.secondary.take().is_some() {
            dropped.push("secondary");
        }
        (self, dropped)
    }

    /// Encodes the config into its envelope.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        envelope::encode(&CONFIG_MAGIC, self.format_version(), &body)
    }

    /// Decodes an envelope. `path` is used in messages only.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let corrupt = |reason: String| StoreError::CorruptConfig {
            path: path.to_path_buf(),
            reason,
        };
        let vault_dir = || path.parent().unwrap_or(path).to_path_buf();
        let (_, body) = envelope::decode(&CONFIG_MAGIC, FORMAT_VERSION, MAX_BODY, bytes).map_err(
            |e| match e {
                EnvelopeError::BadMagic => StoreError::NotAVault { path: vault_dir() },
                EnvelopeError::Version { found: 0, .. } => {
                    corrupt("format version 0 is invalid".into())
                }
                EnvelopeError::Version { found, supported } => StoreError::UnsupportedVersion {
                    path: vault_dir(),
                    found,
                    supported,
                },
                EnvelopeError::Truncated(_) => corrupt("file too short".into()),
                other => corrupt(other.to_string()),
            },
        )?;
        let cfg: VaultConfig =
            serde_json::from_slice(body).map_err(|e| corrupt(format!("body: {e}")))?;
        cfg.validate()
            .map_err(|e| corrupt(format!("invalid setting: {e}")))?;
        Ok(cfg)
    }
}

/// Fuzz entry point: decodes arbitrary bytes as a vault config; never
/// panics. Returns whether they were a valid config.
pub fn fuzz_entry(data: &[u8]) -> bool {
    VaultConfig::decode(data, Path::new("fuzz/config")).is_ok()
}

/// Azure's rule for vault names: 2-50 characters, starting with a letter,
/// containing only letters, digits and hyphens.
pub fn validate_vault_name(name: &str) -> Result<()> {
    let bad = |reason: &str| StoreError::InvalidSetting {
        field: "name",
        reason: format!(
            "{name:?}: {reason} (2-50 characters, a letter first, then letters, digits or hyphens)"
        ),
    };
    let len = name.chars().count();
    if !(2..=50).contains(&len) {
        return Err(bad(&format!("is {len} characters long")));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(bad("does not start with a letter"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(bad(&format!("contains {c:?}")));
    }
    Ok(())
}

/// Block sizes must be powers of two from 64 KiB to 4 MiB.
pub fn validate_block_size(size: u32) -> Result<()> {
    if !size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) {
        return Err(StoreError::InvalidSetting {
            field: "block-size",
            reason: format!("{size} is not a power of two from 64 KiB to 4 MiB"),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn sample() -> VaultConfig {
        VaultConfig {
            name: "vm-vault-1".into(),
            vault_id: "abc".into(),
            block_size: 1 << 20,
            compression_level: 3,
            redundancy: Redundancy::Lrs,
            created: Timestamp::from_second(1_700_000_000).unwrap(),
            snapshot_area: None,
            replicas: Vec::new(),
            secondary: None,
            store: None,
            adopted_packs: false,
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let p = Path::new("/v/config");
        let bytes = sample().encode();
        assert_eq!(VaultConfig::decode(&bytes, p).unwrap(), sample());
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        assert!(matches!(
            VaultConfig::decode(&bad, p),
            Err(StoreError::CorruptConfig { .. })
        ));
        let mut newer = bytes;
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(
            VaultConfig::decode(&newer, p),
            Err(StoreError::UnsupportedVersion { found, .. }) if found == FORMAT_VERSION + 1
        ));
    }

    #[test]
    fn a_vault_with_copies_is_written_at_version_3_so_builds_without_copies_refuse_it() {
        let p = Path::new("/v/config");
        let single = sample().encode();
        assert_eq!(envelope::claimed_version(&single), Some(2));
        let mut lrs = sample();
        lrs.replicas.push("/mnt/d2/v".into());
        let bytes = lrs.encode();
        assert_eq!(envelope::claimed_version(&bytes), Some(3));
        assert_eq!(VaultConfig::decode(&bytes, p).unwrap(), lrs);
        let mut grs = sample();
        grs.secondary = Some("/mnt/far/v".into());
        assert_eq!(envelope::claimed_version(&grs.encode()), Some(3));
        // What a version-2 build sees.
        assert!(matches!(
            envelope::decode(&CONFIG_MAGIC, 2, MAX_BODY, &bytes),
            Err(EnvelopeError::Version {
                found: 3,
                supported: 2
            })
        ));
    }

    #[test]
    fn a_vault_holding_adopted_packs_is_written_at_version_5() {
        let p = Path::new("/v/config");
        let mut adopted = sample();
        adopted.adopted_packs = true;
        let bytes = adopted.encode();
        assert_eq!(envelope::claimed_version(&bytes), Some(5));
        assert_eq!(VaultConfig::decode(&bytes, p).unwrap(), adopted);
        // A GRS vault without replicas adopts too: 5, not 3.
        adopted.secondary = Some("/mnt/far/v".into());
        assert_eq!(envelope::claimed_version(&adopted.encode()), Some(5));
        // The field is absent while false, so older files read unchanged.
        assert!(!String::from_utf8_lossy(&sample().encode()).contains("adopted_packs"));
        // What a version-4 build sees.
        assert!(matches!(
            envelope::decode(&CONFIG_MAGIC, 4, MAX_BODY, &bytes),
            Err(EnvelopeError::Version {
                found: 5,
                supported: 4
            })
        ));
    }

    #[test]
    fn vault_names_follow_azure_rules() {
        for ok in ["ab", "a1", "My-Vault-2", &"a".repeat(50)] {
            validate_vault_name(ok).unwrap();
        }
        for bad in [
            "a",
            "1abc",
            "-ab",
            "ab_c",
            "ab c",
            &"a".repeat(51),
            "é-vault",
        ] {
            assert!(validate_vault_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn block_sizes() {
        for ok in [64 << 10, 128 << 10, 1 << 20, 4 << 20] {
            validate_block_size(ok).unwrap();
        }
        for bad in [32 << 10, 8 << 20, 100_000, 0] {
            assert!(validate_block_size(bad).is_err(), "{bad}");
        }
    }
}
