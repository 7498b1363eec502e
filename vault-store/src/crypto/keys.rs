//! The vault's master key and what is derived from it.
//!
//! The master key is 32 random bytes, drawn once when the vault is
//! created and stored only wrapped (`super::slot`). Every key coffre uses
//! is derived from it with BLAKE3's `derive_key` mode, one context string
//! per use, so no two uses share a key:
//!
//! - the **chunk id key**: chunk ids are `BLAKE3-keyed(id key, plaintext)`,
//!   so deduplication works within the vault and nobody without the key can
//!   tell whether a block they know is stored;
//! - the **record key**: seals chunk records (segments, snapshot packs);
//! - the **catalog key**: seals catalog files, manifests, job records and
//!   the config's private part.
//!
//! Keys live in [`zeroize::Zeroizing`] buffers, wiped when dropped, and
//! are never printed (`Debug` shows no byte).

use zeroize::Zeroizing;

use super::seal::Sealer;
use super::{Cipher, CryptoError, Generations, random};

/// Length of every key, in bytes.
pub const KEY_LEN: usize = 32;

/// Context of the chunk id key. Frozen: changing it changes every id.
pub const ID_KEY_CONTEXT: &str = "coffre 2026-12-06 chunk id key v1";
/// Context of the record key. Frozen.
pub const RECORD_KEY_CONTEXT: &str = "coffre 2026-12-06 chunk record key v1";
/// Context of the catalog key. Frozen.
pub const CATALOG_KEY_CONTEXT: &str = "coffre 2026-12-06 catalog key v1";

/// A vault's master key.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; KEY_LEN]>);

impl MasterKey {
    /// A new random master key.
    pub fn generate() -> Result<MasterKey, CryptoError> {
        Ok(MasterKey(Zeroizing::new(random::<KEY_LEN>()?)))
    }

    /// The master key of these bytes (a recovery text, a key slot).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> MasterKey {
        MasterKey(Zeroizing::new(bytes))
    }

    /// The key's bytes: for wrapping it into a slot or a recovery text only.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A key derived from this one for `context`.
    fn derive(&self, context: &str) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(blake3::derive_key(context, &self.0[..]))
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(…)")
    }
}

/// The keys of an open encrypted vault.
pub struct VaultKeys {
    cipher: Cipher,
    id: Zeroizing<[u8; KEY_LEN]>,
    records: Sealer,
    catalog: Sealer,
    /// The host's memory of the copy's sealed files, when it has one.
    generations: Option<std::sync::Arc<dyn Generations>>,
}

impl VaultKeys {
    /// Derives the vault's keys from its master key.
    pub fn derive(master: &MasterKey, cipher: Cipher) -> VaultKeys {
        VaultKeys {
            cipher,
            id: master.derive(ID_KEY_CONTEXT),
            records: Sealer::new(cipher, &master.derive(RECORD_KEY_CONTEXT)),
            catalog: Sealer::new(cipher, &master.derive(CATALOG_KEY_CONTEXT)),
            generations: None,
        }
    }

    /// These keys with the host's memory of the copy's sealed files, so
    /// that sealed files get rising generations and older ones are refused
    /// ([`Generations`]).
    pub fn with_generations(
        mut self,
        generations: Option<std::sync::Arc<dyn Generations>>,
    ) -> Self {
        self.generations = generations;
        self
    }

    /// The host's memory of the copy's sealed files, if any.
    pub fn generations(&self) -> Option<&dyn Generations> {
        self.generations.as_deref()
    }

    /// The vault's cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// The keyed id of a chunk's plaintext (`format::chunk_id::ChunkId`
    /// wraps it).
    pub fn chunk_id(&self, plain: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id, plain).as_bytes()
    }

    /// Seals and opens chunk records.
    pub fn records(&self) -> &Sealer {
        &self.records
    }

    /// Seals and opens catalog files, manifests and the config.
    pub fn catalog(&self) -> &Sealer {
        &self.catalog
    }
}

impl std::fmt::Debug for VaultKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VaultKeys({})", self.cipher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers: the derivations are frozen (a change would make every
    /// encrypted vault unreadable). The master key is 0x00, 0x01, … 0x1f;
    /// the expected id was computed independently (Python's `blake3`).
    #[test]
    fn derived_keys_and_ids_are_the_frozen_ones() {
        let master = MasterKey::from_bytes(std::array::from_fn(|i| i as u8));
        let keys = VaultKeys::derive(&master, Cipher::XChaCha20Poly1305);
        assert_eq!(
            hex::encode(keys.chunk_id(b"coffre")),
            hex::encode(
                blake3::keyed_hash(
                    &blake3::derive_key(ID_KEY_CONTEXT, master.expose()),
                    b"coffre"
                )
                .as_bytes()
            )
        );
        assert_eq!(
            hex::encode(keys.chunk_id(b"coffre")),
            "c4a04d73255620cb8f86e291454a65ae649c0fe14989e10fc8c00edfab161fec"
        );
        assert_ne!(
            keys.chunk_id(b"coffre"),
            *blake3::hash(b"coffre").as_bytes()
        );
        let other = VaultKeys::derive(&MasterKey::from_bytes([7; 32]), Cipher::Aes256Gcm);
        assert_ne!(keys.chunk_id(b"coffre"), other.chunk_id(b"coffre"));
        assert_eq!(format!("{master:?}"), "MasterKey(…)");
    }
}
