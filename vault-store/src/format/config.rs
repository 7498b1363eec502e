//! The vault config file (`VAULT/config`): identity and settings fixed at
//! creation, inside a checksummed, versioned envelope (see `FORMAT.md`,
//! "Vault config").
//!
//! An encrypted vault's config (version 6) keeps in clear only what
//! opening needs: the version, the cipher and the key slots. The settings
//! are sealed with the catalog key, bound to the cipher and the slots
//! ([`StoredConfig`]).

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::path::Path;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crypto::{Cipher, KeySlot, VaultKeys};
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
/// holds adopted packs (`adopted_packs`). Version 6 is an encrypted vault
/// (`encryption`), whatever else it has: a build without encryption would
/// write plaintext into it.
pub const FORMAT_VERSION: u32 = 6;
/// The version of an encrypted vault.
pub const FORMAT_VERSION_SEALED: u32 = 6;
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
    /// The vault's encryption: its cipher and key slots, kept in clear
    /// beside the sealed settings (never inside them).
    #[serde(skip)]
    pub encryption: Option<Encryption>,
}

/// An encrypted vault's cipher and key slots, and once it is unlocked,
/// its keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Encryption {
    /// Fixed for the vault's life.
    pub cipher: Cipher,
    /// The master key, wrapped; at least one.
    pub slots: Vec<KeySlot>,
    /// The keys, once unlocked (never stored).
    #[serde(skip)]
    pub keys: Option<std::sync::Arc<VaultKeys>>,
}

impl PartialEq for Encryption {
    fn eq(&self, other: &Self) -> bool {
        self.cipher == other.cipher && self.slots == other.slots
    }
}

impl Eq for Encryption {}

impl Encryption {
    /// Checks the slots (untrusted: read from the config).
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.slots.is_empty() {
            return Err("an encrypted vault without key slots".into());
        }
        if self.slots.len() > crate::crypto::slot::MAX_SLOTS {
            return Err(format!(
                "{} key slots, more than {}",
                self.slots.len(),
                crate::crypto::slot::MAX_SLOTS
            ));
        }
        for (i, s) in self.slots.iter().enumerate() {
            // The fields only: a slot with out-of-bounds Argon2id
            // parameters is kept but never tried (`unlock_any`).
            s.check_fields().map_err(|e| e.to_string())?;
            if self.slots.iter().skip(i + 1).any(|o| o.id == s.id) {
                return Err(format!("two key slots {}", s.id));
            }
        }
        Ok(())
    }

    /// The additional data of the sealed settings: the cipher and every
    /// slot, so that neither can be swapped without the key.
    fn ad(&self) -> Vec<u8> {
        let mut ad = format!("coffre vault config v6\0{}\0", self.cipher.name()).into_bytes();
        ad.extend(serde_json::to_vec(&self.slots).unwrap_or_default());
        ad
    }
}

/// The clear part of an encrypted config's body.
#[derive(Serialize, Deserialize)]
struct SealedBody {
    encryption: Encryption,
    /// The settings, sealed (hex).
    sealed: String,
}

/// A config as read from its file.
#[derive(Debug)]
pub enum StoredConfig {
    /// An unencrypted vault's.
    Plain(VaultConfig),
    /// An encrypted vault's: its settings need the key.
    Sealed {
        /// The cipher and slots.
        encryption: Encryption,
        /// The sealed settings.
        sealed: Vec<u8>,
        /// Where it was read (messages).
        path: std::path::PathBuf,
    },
}

impl StoredConfig {
    /// The cipher and slots, when encrypted.
    pub fn encryption(&self) -> Option<&Encryption> {
        match self {
            StoredConfig::Plain(_) => None,
            StoredConfig::Sealed { encryption, .. } => Some(encryption),
        }
    }

    /// The config: a plain one as it is, a sealed one opened with `keys`
    /// (which must be the vault's; the config keeps them).
    pub fn open(self, keys: Option<std::sync::Arc<VaultKeys>>) -> Result<VaultConfig> {
        match self {
            StoredConfig::Plain(c) => Ok(c),
            StoredConfig::Sealed {
                encryption,
                sealed,
                path,
            } => {
                let keys = keys.ok_or_else(|| StoreError::KeyNeeded {
                    path: path.parent().unwrap_or(&path).to_path_buf(),
                })?;
                let corrupt = |reason: String| StoreError::CorruptConfig {
                    path: path.clone(),
                    reason,
                };
                if keys.cipher() != encryption.cipher {
                    return Err(corrupt(format!(
                        "it says {}, the key is for {}",
                        encryption.cipher,
                        keys.cipher()
                    )));
                }
                let body = keys
                    .catalog()
                    .open(&encryption.ad(), &sealed, &|| {
                        format!("the settings in {}", path.display())
                    })
                    .map_err(|e| StoreError::Crypto {
                        path: path.clone(),
                        error: e,
                    })?;
                let mut cfg: VaultConfig =
                    serde_json::from_slice(&body).map_err(|e| corrupt(format!("body: {e}")))?;
                cfg.validate()
                    .map_err(|e| corrupt(format!("invalid setting: {e}")))?;
                cfg.encryption = Some(Encryption {
                    keys: Some(keys),
                    ..encryption
                });
                Ok(cfg)
            }
        }
    }
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
        if self.encryption.is_some() {
            FORMAT_VERSION_SEALED
        } else if self.store.is_some() {
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

    /// The keys of an unlocked encrypted vault.
    pub fn keys(&self) -> Option<&std::sync::Arc<VaultKeys>> {
        self.encryption.as_ref().and_then(|e| e.keys.as_ref())
    }

    /// The id of a chunk's plaintext in this vault: BLAKE3, keyed with the
    /// id key in an encrypted vault.
    pub fn chunk_id(&self, plain: &[u8]) -> crate::format::chunk_id::ChunkId {
        match self.keys() {
            Some(k) => crate::format::chunk_id::ChunkId(k.chunk_id(plain)),
            None => crate::format::chunk_id::ChunkId::of(plain),
        }
    }

    /// A record encoder for this vault (sealing when encrypted).
    pub fn encoder(&self) -> crate::format::record::RecordEncoder {
        crate::format::record::RecordEncoder::for_vault(
            self.compression_level,
            self.keys().cloned(),
        )
    }

    /// A record decoder for this vault (only sealed records when
    /// encrypted).
    pub fn decoder(&self) -> crate::format::record::RecordDecoder {
        crate::format::record::RecordDecoder::for_vault(self.keys().cloned())
    }

    /// Encodes the config into its envelope; an encrypted vault's settings
    /// are sealed with its keys (which it needs).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        let Some(enc) = &self.encryption else {
            return Ok(envelope::encode(
                &CONFIG_MAGIC,
                self.format_version(),
                &body,
            ));
        };
        let keys = enc
            .keys
            .as_ref()
            .ok_or_else(|| StoreError::InvalidSetting {
                field: "encryption",
                reason: "an encrypted vault's config is written only with its key".into(),
            })?;
        let sealed = keys
            .catalog()
            .seal(&enc.ad(), &body)
            .map_err(|e| StoreError::Crypto {
                path: CONFIG_FILE.into(),
                error: e,
            })?;
        let clear = SealedBody {
            encryption: Encryption {
                keys: None,
                ..enc.clone()
            },
            sealed: hex::encode(sealed),
        };
        let body = serde_json::to_vec_pretty(&clear).unwrap_or_default();
        Ok(envelope::encode(
            &CONFIG_MAGIC,
            self.format_version(),
            &body,
        ))
    }

    /// Decodes an unencrypted vault's envelope (an encrypted one's is
    /// [`StoreError::KeyNeeded`]). `path` is used in messages only.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        Self::read(bytes, path)?.open(None)
    }

    /// Decodes an envelope: a plain config, or an encrypted one's clear
    /// part and sealed settings. `path` is used in messages only.
    pub fn read(bytes: &[u8], path: &Path) -> Result<StoredConfig> {
        let corrupt = |reason: String| StoreError::CorruptConfig {
            path: path.to_path_buf(),
            reason,
        };
        let vault_dir = || path.parent().unwrap_or(path).to_path_buf();
        let (version, body) = envelope::decode(&CONFIG_MAGIC, FORMAT_VERSION, MAX_BODY, bytes)
            .map_err(|e| match e {
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
            })?;
        if version >= FORMAT_VERSION_SEALED {
            let clear: SealedBody =
                serde_json::from_slice(body).map_err(|e| corrupt(format!("body: {e}")))?;
            clear
                .encryption
                .check()
                .map_err(|e| corrupt(format!("encryption: {e}")))?;
            let sealed =
                hex::decode(&clear.sealed).map_err(|e| corrupt(format!("sealed settings: {e}")))?;
            return Ok(StoredConfig::Sealed {
                encryption: clear.encryption,
                sealed,
                path: path.to_path_buf(),
            });
        }
        let cfg: VaultConfig =
            serde_json::from_slice(body).map_err(|e| corrupt(format!("body: {e}")))?;
        cfg.validate()
            .map_err(|e| corrupt(format!("invalid setting: {e}")))?;
        Ok(StoredConfig::Plain(cfg))
    }
}

/// Fuzz entry point: decodes arbitrary bytes as a vault config; never
/// panics. Returns whether they were a valid config.
pub fn fuzz_entry(data: &[u8]) -> bool {
    VaultConfig::read(data, Path::new("fuzz/config")).is_ok()
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
            encryption: None,
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let p = Path::new("/v/config");
        let bytes = sample().encode().unwrap();
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
        let single = sample().encode().unwrap();
        assert_eq!(envelope::claimed_version(&single), Some(2));
        let mut lrs = sample();
        lrs.replicas.push("/mnt/d2/v".into());
        let bytes = lrs.encode().unwrap();
        assert_eq!(envelope::claimed_version(&bytes), Some(3));
        assert_eq!(VaultConfig::decode(&bytes, p).unwrap(), lrs);
        let mut grs = sample();
        grs.secondary = Some("/mnt/far/v".into());
        assert_eq!(envelope::claimed_version(&grs.encode().unwrap()), Some(3));
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
        let bytes = adopted.encode().unwrap();
        assert_eq!(envelope::claimed_version(&bytes), Some(5));
        assert_eq!(VaultConfig::decode(&bytes, p).unwrap(), adopted);
        // A GRS vault without replicas adopts too: 5, not 3.
        adopted.secondary = Some("/mnt/far/v".into());
        assert_eq!(
            envelope::claimed_version(&adopted.encode().unwrap()),
            Some(5)
        );
        // The field is absent while false, so older files read unchanged.
        assert!(!String::from_utf8_lossy(&sample().encode().unwrap()).contains("adopted_packs"));
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

    #[test]
    fn a_slot_with_out_of_bounds_argon2id_parameters_is_kept_but_a_bad_field_is_refused() {
        use crate::crypto::slot::{KdfParams, Secret};
        use crate::crypto::{KeySlot, MasterKey};
        let master = MasterKey::generate().unwrap();
        let mut hostile = KeySlot::new_with_weak_kdf_for_tests(
            &master,
            &Secret::Passphrase(b"pw"),
            Some(KdfParams {
                m_kib: 64,
                t: 1,
                p: 1,
            }),
            None,
            Timestamp::now(),
        )
        .unwrap();
        hostile.kdf = Some(KdfParams {
            m_kib: u32::MAX,
            t: 1,
            p: 1,
        });
        let key_file = KeySlot::new(
            &master,
            &Secret::KeyFile(&[5; 32]),
            None,
            None,
            Timestamp::now(),
        )
        .unwrap();
        let mut enc = Encryption {
            cipher: Cipher::XChaCha20Poly1305,
            slots: vec![key_file, hostile],
            keys: None,
        };
        // Read, so that the key file still opens the vault (the hostile
        // slot is never tried).
        assert_eq!(enc.check(), Ok(()));
        assert!(crate::crypto::slot::unlock_any(&enc.slots, &Secret::KeyFile(&[5; 32])).is_ok());
        enc.slots[1].id = "../x".into();
        assert!(enc.check().is_err());
    }

    #[test]
    fn an_encrypted_config_keeps_only_cipher_and_slots_in_clear() {
        use crate::crypto::slot::{KdfParams, Secret};
        use crate::crypto::{KeySlot, MasterKey};
        let p = Path::new("/v/config");
        let master = MasterKey::generate().unwrap();
        let fast = KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let slot = KeySlot::new_with_weak_kdf_for_tests(
            &master,
            &Secret::Passphrase(b"pw"),
            Some(fast),
            None,
            Timestamp::now(),
        )
        .unwrap();
        let keys = std::sync::Arc::new(VaultKeys::derive(&master, Cipher::Aes256Gcm));
        let mut cfg = sample();
        cfg.replicas.push("/mnt/secret-place/v".into());
        cfg.encryption = Some(Encryption {
            cipher: Cipher::Aes256Gcm,
            slots: vec![slot],
            keys: Some(keys.clone()),
        });
        let bytes = cfg.encode().unwrap();
        assert_eq!(envelope::claimed_version(&bytes), Some(6));
        let text = String::from_utf8_lossy(&bytes);
        for hidden in ["vm-vault-1", "secret-place", "block_size", "\"abc\""] {
            assert!(!text.contains(hidden), "{hidden} in clear: {text}");
        }
        assert!(text.contains("aes-256-gcm"));
        // Without the key: it says so.
        assert!(matches!(
            VaultConfig::decode(&bytes, p),
            Err(StoreError::KeyNeeded { .. })
        ));
        let stored = VaultConfig::read(&bytes, p).unwrap();
        assert_eq!(stored.encryption().unwrap().slots.len(), 1);
        let back = stored.open(Some(keys.clone())).unwrap();
        assert_eq!(back, cfg);
        assert!(back.keys().is_some());
        // Another key; a slot removed in the clear part (bound into the seal).
        let other = std::sync::Arc::new(VaultKeys::derive(
            &MasterKey::generate().unwrap(),
            Cipher::Aes256Gcm,
        ));
        assert!(matches!(
            VaultConfig::read(&bytes, p).unwrap().open(Some(other)),
            Err(StoreError::Crypto { .. })
        ));
        let mut two = cfg.clone();
        let extra = KeySlot::new(
            &master,
            &Secret::KeyFile(&[1; 32]),
            None,
            None,
            Timestamp::now(),
        )
        .unwrap();
        two.encryption.as_mut().unwrap().slots.push(extra);
        let two_bytes = two.encode().unwrap();
        let StoredConfig::Sealed { sealed, path, .. } = VaultConfig::read(&two_bytes, p).unwrap()
        else {
            panic!()
        };
        let forged = StoredConfig::Sealed {
            encryption: Encryption {
                keys: None,
                ..cfg.encryption.clone().unwrap()
            },
            sealed,
            path,
        };
        assert!(matches!(
            forged.open(Some(keys)),
            Err(StoreError::Crypto { .. })
        ));
        // Hostile clear parts are refused at read time.
        let mut none = cfg.clone();
        none.encryption.as_mut().unwrap().slots.clear();
        assert!(none.encode().is_ok());
        assert!(matches!(
            VaultConfig::read(&none.encode().unwrap(), p),
            Err(StoreError::CorruptConfig { .. })
        ));
    }
}
