//! Sealed envelopes: how an encrypted vault stores its small state files
//! (point manifests, item and policy files, the copy identity, the
//! replication state, the damaged list), so that a bucket reader learns
//! nothing from them and a bucket writer can neither forge, alter nor
//! swap one unnoticed (`FORMAT.md`, "Sealed envelope").
//!
//! A sealed envelope is an [`envelope`] with the file's own magic and
//! version [`SEALED_VERSION`]; its body is the [`Sealer`] output (nonce,
//! ciphertext, tag) of `plain version (u32 LE) ‖ generation (u64 LE) ‖
//! plain body` under the vault's catalog key. The additional data binds
//! the magic (the file's role), the version and the file's relative name
//! ([`ad`]), so item A's file read as item B's, or point 3's as point
//! 4's, fails authentication.
//!
//! Writers encode the plain envelope as in a plain vault and [`seal`] it
//! on its way to a store; readers [`open`] what a store returns back into
//! the plain envelope, which the plain decoders then check as always.
//! In an encrypted vault a plain file is refused (anyone who can write
//! the storage could have planted it); in a plain vault a sealed one is.
//!
//! The generation rises at every seal and is checked at every open against
//! the host's memory of the copy, when the keys carry one
//! ([`crate::crypto::Generations`]): an older valid file than one seen
//! before (a rollback, a deleted file replayed) is refused.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use std::borrow::Cow;

use crate::crypto::{CryptoError, Sealer, VaultKeys};
use crate::format::envelope::{self, EnvelopeError};

/// The envelope version of every sealed file, whatever its magic. Frozen.
pub const SEALED_VERSION: u32 = 2;
/// Largest body of a sealed envelope (the replication state's bound, 16
/// MiB, and the sealing overhead).
pub const MAX_SEALED_BODY: usize = (16 << 20) + 64;
/// Sealed files whose content differs from copy to copy under one name
/// (a copy's identity, its replication state, its damaged list, a snapshot
/// area's identity): the host's memory of generations, which is shared by
/// the copies a process opens, leaves them out (their generation is 0).
pub const PER_COPY: [&str; 4] = ["copy", "replication", "damaged", "area"];

/// The host's memory of generations, when the keys carry one and `name`
/// is the same file on every copy.
fn memory<'a>(name: &str, keys: &'a VaultKeys) -> Option<&'a dyn crate::crypto::Generations> {
    keys.generations().filter(|_| !PER_COPY.contains(&name))
}

/// Label that starts the additional data. Frozen.
pub const AD_LABEL: &[u8] = b"coffre sealed file v1\0";
/// Bytes before the plain body in the sealed plaintext.
const INNER_HEADER: usize = 12;

/// Why a stored file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealedFileError {
    /// A plain file where the vault is encrypted.
    #[error(
        "it is not sealed, and the vault is encrypted: refused (whoever can write the storage could have planted it)"
    )]
    NotSealed,
    /// A sealed file where the vault is not encrypted.
    #[error(
        "it is sealed (a file of an encrypted vault), and this vault is not encrypted: refused"
    )]
    SealedInPlainVault,
    /// The envelope around the sealed bytes is damaged.
    #[error("damaged sealed envelope: {0}")]
    Envelope(EnvelopeError),
    /// The sealed bytes failed authentication (altered, another file's or
    /// another vault's).
    #[error("{0}")]
    Forged(CryptoError),
    /// Authentic bytes that are not what a writer seals.
    #[error("sealed content is malformed: {0}")]
    Malformed(String),
    /// Authentic, but older than a version of it seen before.
    #[error("{0}")]
    RolledBack(crate::crypto::Rollback),
}

/// The additional data of sealed file `name` with `magic`.
pub fn ad(magic: &[u8; 8], name: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_LABEL.len() + 12 + name.len());
    ad.extend_from_slice(AD_LABEL);
    ad.extend_from_slice(magic);
    ad.extend_from_slice(&SEALED_VERSION.to_le_bytes());
    ad.extend_from_slice(name.as_bytes());
    ad
}

/// The plain envelope `plain` as file `name` stores it: as it is in a
/// plain vault (`keys` is `None`), sealed with the catalog key in an
/// encrypted one, carrying the next generation of `name` in the host's
/// memory (0 when the keys carry none).
pub fn seal<'a>(
    name: &str,
    plain: &'a [u8],
    keys: Option<&VaultKeys>,
) -> Result<Cow<'a, [u8]>, SealedFileError> {
    let Some(keys) = keys else {
        return Ok(Cow::Borrowed(plain));
    };
    let generation = memory(name, keys).map_or(0, |g| g.next(name));
    seal_with(name, plain, keys.catalog(), generation).map(Cow::Owned)
}

/// [`seal`] with a given sealer.
pub fn seal_with(
    name: &str,
    plain: &[u8],
    sealer: &Sealer,
    generation: u64,
) -> Result<Vec<u8>, SealedFileError> {
    let magic: [u8; 8] =
        plain
            .get(..8)
            .and_then(|m| m.try_into().ok())
            .ok_or(SealedFileError::Envelope(EnvelopeError::Truncated(
                plain.len(),
            )))?;
    let version = envelope::claimed_version(plain).ok_or(SealedFileError::Envelope(
        EnvelopeError::Truncated(plain.len()),
    ))?;
    let (_, body) = envelope::decode(&magic, version.max(1), MAX_SEALED_BODY, plain)
        .map_err(SealedFileError::Envelope)?;
    let mut inner = Vec::with_capacity(INNER_HEADER + body.len());
    inner.extend_from_slice(&version.to_le_bytes());
    inner.extend_from_slice(&generation.to_le_bytes());
    inner.extend_from_slice(body);
    let sealed = sealer
        .seal(&ad(&magic, name), &inner)
        .map_err(SealedFileError::Forged)?;
    Ok(envelope::encode(&magic, SEALED_VERSION, &sealed))
}

/// A stored file `name` back as its plain envelope: as it is in a plain
/// vault (a sealed one is refused), opened with the catalog key in an
/// encrypted one (a plain one is refused).
pub fn open<'a>(
    name: &str,
    stored: &'a [u8],
    keys: Option<&VaultKeys>,
) -> Result<Cow<'a, [u8]>, SealedFileError> {
    let sealed = envelope::claimed_version(stored) == Some(SEALED_VERSION);
    match keys {
        None if sealed => Err(SealedFileError::SealedInPlainVault),
        None => Ok(Cow::Borrowed(stored)),
        Some(_) if !sealed => Err(SealedFileError::NotSealed),
        Some(k) => {
            let (plain, generation) = open_with(name, stored, k.catalog())?;
            if let Some(g) = memory(name, k) {
                g.check(name, generation, blake3::hash(&plain).as_bytes())
                    .map_err(SealedFileError::RolledBack)?;
            }
            Ok(Cow::Owned(plain))
        }
    }
}

/// Opens sealed file `name` with `sealer`: its plain envelope and its
/// generation.
pub fn open_with(
    name: &str,
    stored: &[u8],
    sealer: &Sealer,
) -> Result<(Vec<u8>, u64), SealedFileError> {
    let magic: [u8; 8] =
        stored
            .get(..8)
            .and_then(|m| m.try_into().ok())
            .ok_or(SealedFileError::Envelope(EnvelopeError::Truncated(
                stored.len(),
            )))?;
    let (version, body) = envelope::decode(&magic, SEALED_VERSION, MAX_SEALED_BODY, stored)
        .map_err(SealedFileError::Envelope)?;
    if version != SEALED_VERSION {
        return Err(SealedFileError::NotSealed);
    }
    let inner = sealer
        .open(&ad(&magic, name), body, &|| format!("sealed file {name}"))
        .map_err(SealedFileError::Forged)?;
    let field = |at: usize, n: usize| inner.get(at..at + n);
    let (Some(v), Some(g), Some(plain_body)) =
        (field(0, 4), field(4, 8), inner.get(INNER_HEADER..))
    else {
        return Err(SealedFileError::Malformed(format!(
            "{} bytes, fewer than its {INNER_HEADER}-byte header",
            inner.len()
        )));
    };
    let version = u32::from_le_bytes(v.try_into().unwrap_or_default());
    let generation = u64::from_le_bytes(g.try_into().unwrap_or_default());
    if version == 0 || version == SEALED_VERSION {
        return Err(SealedFileError::Malformed(format!(
            "inner version {version}"
        )));
    }
    Ok((envelope::encode(&magic, version, plain_body), generation))
}

/// The same content: `stored` (as read from file `name`) opens to exactly
/// the plain envelope `plain`. A sealed file is rewritten only when its
/// content changes, since its bytes differ at every seal.
pub fn same_content(name: &str, stored: &[u8], plain: &[u8], keys: Option<&VaultKeys>) -> bool {
    open(name, stored, keys).is_ok_and(|p| p.as_ref() == plain)
}

/// The key of the fuzz target: 32 bytes of 0x42, XChaCha20-Poly1305.
pub fn fuzz_keys() -> VaultKeys {
    VaultKeys::derive(
        &crate::crypto::MasterKey::from_bytes([0x42; 32]),
        crate::crypto::Cipher::XChaCha20Poly1305,
    )
}

/// The name the fuzz seeds are sealed under.
pub const FUZZ_NAME: &str = "points/vm/0000000000000001.point";

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::crypto::{Cipher, MasterKey};

    fn keys(b: u8, cipher: Cipher) -> VaultKeys {
        VaultKeys::derive(&MasterKey::from_bytes([b; 32]), cipher)
    }

    #[test]
    fn sealed_files_round_trip_and_refuse_every_change() {
        for cipher in [Cipher::Aes256Gcm, Cipher::XChaCha20Poly1305] {
            let k = keys(1, cipher);
            let plain = envelope::encode(b"CFITEM\0\0", 1, b"{\"name\":\"web\"}");
            let name = "items/web.item";
            let sealed = seal_with(name, &plain, k.catalog(), 7).unwrap();
            assert_eq!(&sealed[..8], b"CFITEM\0\0");
            assert_eq!(envelope::claimed_version(&sealed), Some(SEALED_VERSION));
            assert!(!sealed.windows(3).any(|w| w == b"web"));
            assert_eq!(open(name, &sealed, Some(&k)).unwrap().as_ref(), &plain[..]);
            assert_eq!(open_with(name, &sealed, k.catalog()).unwrap().1, 7);
            assert!(same_content(name, &sealed, &plain, Some(&k)));
            // Every bit flipped is refused.
            for bit in 0..sealed.len() * 8 {
                let mut bad = sealed.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(open(name, &bad, Some(&k)).is_err(), "bit {bit}");
            }
            // Another name, another key, a plain file, a sealed file in a
            // plain vault.
            assert!(matches!(
                open("items/db.item", &sealed, Some(&k)),
                Err(SealedFileError::Forged(_))
            ));
            assert!(open(name, &sealed, Some(&keys(2, cipher))).is_err());
            assert_eq!(
                open(name, &plain, Some(&k)),
                Err(SealedFileError::NotSealed)
            );
            assert_eq!(
                open(name, &sealed, None),
                Err(SealedFileError::SealedInPlainVault)
            );
            assert_eq!(open(name, &plain, None).unwrap().as_ref(), &plain[..]);
            assert_eq!(seal(name, &plain, None).unwrap().as_ref(), &plain[..]);
            // The magic is bound: the same body under another magic fails.
            let mut other = sealed.clone();
            other[..8].copy_from_slice(b"CFPOINT\0");
            let n = other.len() - 4;
            let crc = crc32fast::hash(&other[..n]);
            other[n..].copy_from_slice(&crc.to_le_bytes());
            assert!(matches!(
                open(name, &other, Some(&k)),
                Err(SealedFileError::Forged(_))
            ));
        }
    }

    #[test]
    fn the_fuzz_entry_takes_any_bytes() {
        let k = fuzz_keys();
        let plain = envelope::encode(b"CFPOLCY\0", 1, b"{\"name\":\"p\",\"policy\":{}}");
        let sealed = seal_with(FUZZ_NAME, &plain, k.catalog(), 1).unwrap();
        assert!(open(FUZZ_NAME, &sealed, Some(&k)).is_ok());
        for cut in 0..sealed.len() {
            assert!(open(FUZZ_NAME, &sealed[..cut], Some(&k)).is_err());
        }
        assert!(open(FUZZ_NAME, &plain, Some(&k)).is_err());
    }

    /// A memory of generations in the test: highest by name, and a
    /// counter for the next one.
    #[derive(Debug, Default)]
    struct Seen(std::sync::Mutex<std::collections::BTreeMap<String, u64>>);

    impl crate::crypto::Generations for Seen {
        fn next(&self, name: &str) -> u64 {
            let mut m = self.0.lock().unwrap();
            let g = m.get(&format!("next {name}")).map_or(1, |g| g + 1);
            m.insert(format!("next {name}"), g);
            g
        }
        fn check(
            &self,
            name: &str,
            generation: u64,
            _: &[u8; 32],
        ) -> Result<(), crate::crypto::Rollback> {
            let mut m = self.0.lock().unwrap();
            let highest = m.get(name).copied().unwrap_or(0);
            if generation < highest {
                return Err(crate::crypto::Rollback {
                    generation,
                    highest,
                    memory: "test".into(),
                });
            }
            m.insert(name.into(), generation);
            Ok(())
        }
    }

    #[test]
    fn with_a_memory_generations_rise_and_an_older_file_is_refused_as_a_rollback() {
        let k =
            keys(3, Cipher::Aes256Gcm).with_generations(Some(std::sync::Arc::new(Seen::default())));
        let name = "items/web.item";
        let v1 = seal(name, &envelope::encode(b"CFITEM\0\0", 1, b"one"), Some(&k))
            .unwrap()
            .into_owned();
        let v2 = seal(name, &envelope::encode(b"CFITEM\0\0", 1, b"two"), Some(&k))
            .unwrap()
            .into_owned();
        assert_eq!(open_with(name, &v1, k.catalog()).unwrap().1, 1);
        assert_eq!(open_with(name, &v2, k.catalog()).unwrap().1, 2);
        assert!(open(name, &v1, Some(&k)).is_ok());
        assert!(open(name, &v2, Some(&k)).is_ok());
        match open(name, &v1, Some(&k)) {
            Err(SealedFileError::RolledBack(r)) => assert_eq!((r.generation, r.highest), (1, 2)),
            other => panic!("{other:?}"),
        }
        // Without a memory (another host), both open.
        let fresh = keys(3, Cipher::Aes256Gcm);
        assert!(open(name, &v1, Some(&fresh)).is_ok());
    }
}
