//! Encryption at rest: the vault's master key and the keys derived from it
//! ([`keys`]), sealing and opening bytes with an AEAD ([`seal`]), the key
//! slots that keep the master key wrapped by a passphrase or a key file
//! ([`slot`]), and the recovery text a user keeps on paper
//! ([`recovery`]).
//!
//! No cryptography is written here: the AEADs are aws-lc's AES-256-GCM
//! and ChaCha20-Poly1305 (`aws-lc-rs`: AES-NI, VAES and CLMUL where the
//! CPU has them), XChaCha's subkey the `chacha20` crate's HChaCha20, the
//! password hash RustCrypto's `argon2`, key
//! derivation and keyed chunk ids BLAKE3's `derive_key` and `keyed_hash`
//! modes, and the random bytes the operating system's (`getrandom`). This
//! module chooses the constructions and their labels; `FORMAT.md`
//! ("Encryption") specifies them byte by byte and argues why a nonce never
//! repeats.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

pub mod generations;
pub mod keys;
pub mod recovery;
pub mod seal;
pub mod slot;

pub use generations::{Generations, Rollback};
pub use keys::{MasterKey, VaultKeys};
pub use seal::Sealer;
pub use slot::{KdfParams, KeySlot, SlotKind};

/// The AEAD of an encrypted vault, fixed for its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Cipher {
    /// AES-256-GCM with a fresh subkey per sealed message (derived from
    /// the message's 192-bit random nonce): the hardware-accelerated
    /// choice on x86-64 and ARMv8.
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// XChaCha20-Poly1305 (192-bit random nonces): fast without AES
    /// instructions.
    #[serde(rename = "chacha20-poly1305")]
    XChaCha20Poly1305,
}

impl Cipher {
    /// The name users give and the config records.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::XChaCha20Poly1305 => "chacha20-poly1305",
        }
    }

    /// The cipher a name names (`xchacha20-poly1305` is accepted for
    /// `chacha20-poly1305`).
    pub fn parse(name: &str) -> Option<Cipher> {
        match name {
            "aes-256-gcm" => Some(Cipher::Aes256Gcm),
            "chacha20-poly1305" | "xchacha20-poly1305" => Some(Cipher::XChaCha20Poly1305),
            _ => None,
        }
    }

    /// The byte a sealed record or file carries for it.
    pub fn byte(self) -> u8 {
        match self {
            Cipher::Aes256Gcm => 1,
            Cipher::XChaCha20Poly1305 => 2,
        }
    }

    /// The cipher of a stored byte.
    pub fn from_byte(b: u8) -> Option<Cipher> {
        match b {
            1 => Some(Cipher::Aes256Gcm),
            2 => Some(Cipher::XChaCha20Poly1305),
            _ => None,
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a key, a slot or sealed bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// No key slot opens with the passphrase or key file given.
    #[error("wrong passphrase or key file: none of the vault's {slots} key slot(s) opens with it")]
    WrongKey { slots: usize },
    /// Sealed bytes failed authentication.
    #[error(
        "{what} failed authentication: it was altered or damaged, or it belongs to another vault, file or key"
    )]
    Forged { what: String },
    /// Bytes that cannot be what they claim (too short, a bad field).
    #[error("{what}: {reason}")]
    Malformed { what: String, reason: String },
    /// The operating system gave no random bytes.
    #[error("the operating system gave no random bytes: {0}")]
    Random(String),
    /// The password hash refused its parameters.
    #[error("key derivation (Argon2id) failed: {0}")]
    Kdf(String),
}

/// What unlocks an encrypted vault: the caller's key sources (a key
/// file, a passphrase command or prompt, a recovery key). Kept by
/// `OpenOptions`; an implementation may remember what it unlocked, so that
/// one command derives a passphrase's key once.
pub trait Unlock: Send + Sync {
    /// The master key of the vault at `vault`, whose key slots are `slots`.
    fn master_key(
        &self,
        vault: &std::path::Path,
        slots: &[KeySlot],
    ) -> Result<MasterKey, CryptoError>;

    /// This host's memory of the sealed files of the copy at `vault` of
    /// the vault `vault_id` (rollback protection); `None` when there is
    /// none.
    fn generations(
        &self,
        _vault: &std::path::Path,
        _vault_id: &str,
    ) -> Option<std::sync::Arc<dyn Generations>> {
        None
    }

    /// Where this host remembers the vault copy at `vault` as encrypted
    /// (it opened it encrypted before), if it does: a plain config found
    /// there since is refused (a bucket writer could have put it in place
    /// of the sealed one, and new data would go in clear).
    fn remembers_encrypted(&self, _vault: &std::path::Path) -> Option<std::path::PathBuf> {
        None
    }
}

/// `N` random bytes from the operating system.
pub fn random<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| CryptoError::Random(e.to_string()))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_names_and_bytes_round_trip() {
        for c in [Cipher::Aes256Gcm, Cipher::XChaCha20Poly1305] {
            assert_eq!(Cipher::parse(c.name()), Some(c));
            assert_eq!(Cipher::from_byte(c.byte()), Some(c));
            let json = serde_json::to_string(&c).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", c.name()));
        }
        assert_eq!(Cipher::parse("none"), None);
        assert_eq!(Cipher::from_byte(0), None);
        assert_eq!(
            Cipher::parse("xchacha20-poly1305"),
            Some(Cipher::XChaCha20Poly1305)
        );
    }

    #[test]
    fn random_bytes_differ() {
        let (a, b) = (random::<32>(), random::<32>());
        assert!(a.is_ok() && b.is_ok());
        assert_ne!(a, b);
    }
}
