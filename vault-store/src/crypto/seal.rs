//! Sealing: `nonce ‖ ciphertext ‖ tag` under one of the vault's keys,
//! with additional data that binds the sealed bytes to their place.
//!
//! Every message gets a fresh **192-bit random nonce** from the operating
//! system. Many hosts write one vault at once and a crash forgets any
//! counter, so nonces are never counted, only drawn:
//!
//! - XChaCha20-Poly1305 takes the 192-bit nonce as is;
//! - AES-256-GCM takes 96-bit nonces, too few to draw at random for the
//!   life of a vault, so each message is sealed under its own subkey,
//!   `BLAKE3-derive_key("coffre 2026-12-06 aes-256-gcm subkey v1", key ‖
//!   nonce[0..12])`, with GCM nonce `nonce[12..24]`. A (subkey, GCM nonce)
//!   pair repeats only if the whole 192-bit nonce does.
//!
//! Two of 2⁶⁴ messages share a 192-bit nonce with probability below 2⁻⁶⁴
//! (the birthday bound, `n² / 2¹⁹³`). `FORMAT.md` ("Encryption") says so.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::XChaCha20Poly1305;
use zeroize::Zeroizing;

use super::keys::KEY_LEN;
use super::{Cipher, CryptoError, random};

/// Length of a nonce, in bytes.
pub const NONCE_LEN: usize = 24;
/// Length of a tag, in bytes.
pub const TAG_LEN: usize = 16;
/// What sealing adds to a message.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Context of the per-message AES-256-GCM subkeys. Frozen.
pub const AES_SUBKEY_CONTEXT: &str = "coffre 2026-12-06 aes-256-gcm subkey v1";

/// Seals and opens messages under one key.
pub struct Sealer {
    cipher: Cipher,
    key: Zeroizing<[u8; KEY_LEN]>,
    xchacha: XChaCha20Poly1305,
}

impl Sealer {
    /// A sealer of `cipher` under `key`.
    pub fn new(cipher: Cipher, key: &[u8; KEY_LEN]) -> Sealer {
        Sealer {
            cipher,
            key: Zeroizing::new(*key),
            xchacha: XChaCha20Poly1305::new(GenericArray::from_slice(key)),
        }
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Appends `plain` sealed (nonce, ciphertext, tag) to `out`, bound to
    /// `ad`.
    pub fn seal_into(&self, ad: &[u8], plain: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.seal_with_nonce(&random::<NONCE_LEN>()?, ad, plain, out)
    }

    /// `plain` sealed, bound to `ad`.
    pub fn seal(&self, ad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        self.seal_into(ad, plain, &mut out)?;
        Ok(out)
    }

    /// Seals with a given nonce: known-answer tests only (a nonce must
    /// never be chosen).
    pub(crate) fn seal_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        ad: &[u8],
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        let start = out.len();
        out.reserve(plain.len() + OVERHEAD);
        out.extend_from_slice(nonce);
        out.extend_from_slice(plain);
        let body = out.get_mut(start + NONCE_LEN..).unwrap_or_default();
        let tag = match self.cipher {
            Cipher::XChaCha20Poly1305 => {
                self.xchacha
                    .encrypt_in_place_detached(GenericArray::from_slice(nonce), ad, body)
            }
            Cipher::Aes256Gcm => {
                let (aes, gcm_nonce) = self.aes(nonce);
                aes.encrypt_in_place_detached(GenericArray::from_slice(gcm_nonce), ad, body)
            }
        };
        match tag {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(CryptoError::Malformed {
                    what: "a message".into(),
                    reason: "too long to seal".into(),
                })
            }
        }
    }

    /// Opens `sealed` (bound to `ad`) and appends the plaintext to `out`;
    /// `what` names it in the error. Nothing is appended on failure.
    pub fn open_into(
        &self,
        ad: &[u8],
        sealed: &[u8],
        out: &mut Vec<u8>,
        what: &dyn Fn() -> String,
    ) -> Result<(), CryptoError> {
        if sealed.len() < OVERHEAD {
            return Err(CryptoError::Malformed {
                what: what(),
                reason: format!(
                    "{} sealed bytes, fewer than a nonce and a tag ({OVERHEAD})",
                    sealed.len()
                ),
            });
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let start = out.len();
        out.extend_from_slice(body);
        let buf = out.get_mut(start..).unwrap_or_default();
        let tag = GenericArray::from_slice(tag);
        let opened = match self.cipher {
            Cipher::XChaCha20Poly1305 => self.xchacha.decrypt_in_place_detached(
                GenericArray::from_slice(nonce),
                ad,
                buf,
                tag,
            ),
            Cipher::Aes256Gcm => {
                let nonce: &[u8; NONCE_LEN] = nonce.try_into().unwrap_or(&[0; NONCE_LEN]);
                let (aes, gcm_nonce) = self.aes(nonce);
                aes.decrypt_in_place_detached(GenericArray::from_slice(gcm_nonce), ad, buf, tag)
            }
        };
        opened.map_err(|_| {
            out.truncate(start);
            CryptoError::Forged { what: what() }
        })
    }

    /// `sealed` opened (bound to `ad`).
    pub fn open(
        &self,
        ad: &[u8],
        sealed: &[u8],
        what: &dyn Fn() -> String,
    ) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(sealed.len().saturating_sub(OVERHEAD));
        self.open_into(ad, sealed, &mut out, what)?;
        Ok(out)
    }

    /// The AES-256-GCM instance of one message and its 96-bit GCM nonce.
    fn aes<'n>(&self, nonce: &'n [u8; NONCE_LEN]) -> (Aes256Gcm, &'n [u8]) {
        let (head, gcm_nonce) = nonce.split_at(12);
        let mut h = blake3::Hasher::new_derive_key(AES_SUBKEY_CONTEXT);
        h.update(&self.key[..]);
        h.update(head);
        let sub = Zeroizing::new(*h.finalize().as_bytes());
        (
            Aes256Gcm::new(GenericArray::from_slice(&sub[..])),
            gcm_nonce,
        )
    }
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({})", self.cipher)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// The crates' `zeroize` features are on: their key schedules and
    /// MAC keys are wiped when dropped (each line fails to build, or the
    /// assertion fails, without the feature).
    #[test]
    fn the_ciphers_keys_are_wiped_on_drop() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        fn wipeable<T: zeroize::Zeroize>() {}
        wiped_on_drop::<aes::Aes256>();
        wiped_on_drop::<aes::Aes256Enc>();
        wiped_on_drop::<XChaCha20Poly1305>();
        wipeable::<argon2::Block>();
        assert!(std::mem::needs_drop::<poly1305::Poly1305>());
    }

    fn what() -> String {
        "test message".into()
    }

    /// draft-irtf-cfrg-xchacha-03, A.3.1: our wrapper seals XChaCha20-
    /// Poly1305 as specified (nonce first, tag last).
    #[test]
    fn xchacha_matches_the_draft_vector() {
        let key: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
        let nonce: [u8; 24] = std::array::from_fn(|i| 0x40 + i as u8);
        let ad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
        let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let s = Sealer::new(Cipher::XChaCha20Poly1305, &key);
        let mut out = Vec::new();
        s.seal_with_nonce(&nonce, &ad, plain, &mut out).unwrap();
        assert_eq!(&out[..24], &nonce);
        assert_eq!(
            hex::encode(&out[24..]),
            concat!(
                "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb",
                "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452",
                "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9",
                "21f9664c97637da9768812f615c68b13b52e",
                "c0875924c1c7987947deafd8780acf49"
            )
        );
        assert_eq!(s.open(&ad, &out, &what).unwrap(), plain);
    }

    /// Our AES-256-GCM construction (subkey from the nonce's first half):
    /// the answer computed independently (Python's `blake3` and
    /// `cryptography` AESGCM), and the subkey checked against AES-GCM itself.
    #[test]
    fn aes_subkey_construction_is_the_frozen_one() {
        let key = [0x11u8; 32];
        let nonce: [u8; 24] = std::array::from_fn(|i| i as u8);
        let s = Sealer::new(Cipher::Aes256Gcm, &key);
        let mut out = Vec::new();
        s.seal_with_nonce(&nonce, b"ad", b"coffre", &mut out)
            .unwrap();
        let mut h = blake3::Hasher::new_derive_key(AES_SUBKEY_CONTEXT);
        h.update(&key);
        h.update(&nonce[..12]);
        let sub = *h.finalize().as_bytes();
        let direct = Aes256Gcm::new(GenericArray::from_slice(&sub));
        let mut buf = b"coffre".to_vec();
        let tag = direct
            .encrypt_in_place_detached(GenericArray::from_slice(&nonce[12..]), b"ad", &mut buf)
            .unwrap();
        assert_eq!(&out[24..30], &buf[..]);
        assert_eq!(&out[30..], &tag[..]);
        assert_eq!(
            hex::encode(&out[24..]),
            "d7e165d3a410a47a1d1c315fe2f0ca4400c4e1975a45"
        );
        assert_eq!(s.open(b"ad", &out, &what).unwrap(), b"coffre");
    }

    #[test]
    fn every_bit_flip_and_a_wrong_ad_or_key_fail() {
        for cipher in [Cipher::Aes256Gcm, Cipher::XChaCha20Poly1305] {
            let s = Sealer::new(cipher, &[3; 32]);
            let sealed = s.seal(b"points/a/1", b"a point record").unwrap();
            assert_eq!(sealed.len(), 14 + OVERHEAD);
            for bit in 0..sealed.len() * 8 {
                let mut bad = sealed.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let e = s.open(b"points/a/1", &bad, &what).unwrap_err();
                assert!(matches!(e, CryptoError::Forged { .. }), "{e}");
            }
            assert!(s.open(b"points/b/1", &sealed, &what).is_err());
            let other = Sealer::new(cipher, &[4; 32]);
            assert!(other.open(b"points/a/1", &sealed, &what).is_err());
            assert!(matches!(
                s.open(b"", &sealed[..OVERHEAD - 1], &what),
                Err(CryptoError::Malformed { .. })
            ));
            // Two seals of one message differ (fresh nonces).
            assert_ne!(sealed, s.seal(b"points/a/1", b"a point record").unwrap());
            // A failed open appends nothing.
            let mut out = b"kept".to_vec();
            assert!(s.open_into(b"x", &sealed, &mut out, &what).is_err());
            assert_eq!(out, b"kept");
        }
    }
}
