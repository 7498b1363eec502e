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
//!
//! The AEADs are aws-lc's (through `aws-lc-rs`): AES-256-GCM with AES-NI,
//! VAES and carry-less multiplication where the CPU has them, and the IETF
//! ChaCha20-Poly1305 (96-bit nonce) with its vector code. XChaCha20-
//! Poly1305 is that AEAD under the subkey `HChaCha20(key, nonce[0..16])`
//! (the `chacha20` crate's `hchacha`) with nonce `0⁴ ‖ nonce[16..24]`, as
//! draft-irtf-cfrg-xchacha defines it: the bytes are the same as
//! libsodium's and RustCrypto's (tests cross-check both ways).

use aws_lc_rs::aead::{AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce};
use aws_lc_rs::aead::{NONCE_LEN as IETF_NONCE_LEN, UnboundKey};
use chacha20::cipher::consts::U10;
use chacha20::cipher::generic_array::GenericArray;
use zeroize::{Zeroize, Zeroizing};

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
///
/// Both ciphers seal each message under its own subkey (derived from the
/// key and the message's nonce), so there is no cipher instance to keep
/// per key: a subkey's setup (a BLAKE3 derivation and an AES key schedule,
/// or one HChaCha20 block, and one small aws-lc context allocation) costs
/// about a microsecond, a few percent of sealing a 64 KiB record. Sealing
/// and opening work in place in the caller's buffer, tags detached.
pub struct Sealer {
    cipher: Cipher,
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl Sealer {
    /// A sealer of `cipher` under `key`.
    pub fn new(cipher: Cipher, key: &[u8; KEY_LEN]) -> Sealer {
        Sealer {
            cipher,
            key: Zeroizing::new(*key),
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
        let sealed = self.message_key(nonce).and_then(|(key, ietf_nonce)| {
            let body = out.get_mut(start + NONCE_LEN..).unwrap_or_default();
            key.seal_in_place_separate_tag(ietf_nonce, Aad::from(ad), body)
                .map_err(|_| "too long to seal")
        });
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(reason) => {
                out.truncate(start);
                Err(CryptoError::Malformed {
                    what: "a message".into(),
                    reason: reason.into(),
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
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().unwrap_or(&[0; NONCE_LEN]);
        let start = out.len();
        out.extend_from_slice(body);
        let opened = self.message_key(nonce).ok().and_then(|(key, ietf_nonce)| {
            let buf = out.get_mut(start..).unwrap_or_default();
            key.open_in_place_separate_tag(ietf_nonce, Aad::from(ad), tag, buf)
                .ok()
        });
        if opened.is_none() {
            out.truncate(start);
            return Err(CryptoError::Forged { what: what() });
        }
        Ok(())
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

    /// The IETF AEAD key of one message and its 96-bit nonce: for
    /// AES-256-GCM the BLAKE3 subkey of `nonce[0..12]` and `nonce[12..24]`,
    /// for XChaCha20-Poly1305 `HChaCha20(key, nonce[0..16])` and
    /// `0⁴ ‖ nonce[16..24]`.
    fn message_key(&self, nonce: &[u8; NONCE_LEN]) -> Result<(LessSafeKey, Nonce), &'static str> {
        let (algorithm, subkey, ietf_nonce) = match self.cipher {
            Cipher::Aes256Gcm => {
                let (head, tail) = nonce.split_at(NONCE_LEN - IETF_NONCE_LEN);
                let mut h = blake3::Hasher::new_derive_key(AES_SUBKEY_CONTEXT);
                h.update(&self.key[..]);
                h.update(head);
                let subkey = Zeroizing::new(*h.finalize().as_bytes());
                let mut ietf = [0; IETF_NONCE_LEN];
                ietf.copy_from_slice(tail);
                (&AES_256_GCM, subkey, ietf)
            }
            Cipher::XChaCha20Poly1305 => {
                let (head, tail) = nonce.split_at(16);
                let mut derived = chacha20::hchacha::<U10>(
                    GenericArray::from_slice(&self.key[..]),
                    GenericArray::from_slice(head),
                );
                let mut subkey = Zeroizing::new([0; KEY_LEN]);
                subkey.copy_from_slice(&derived);
                derived.as_mut_slice().zeroize();
                let mut ietf = [0; IETF_NONCE_LEN];
                let (_, low) = ietf.split_at_mut(IETF_NONCE_LEN - tail.len());
                low.copy_from_slice(tail);
                (&CHACHA20_POLY1305, subkey, ietf)
            }
        };
        let key = ietf_key(algorithm, &subkey)?;
        Ok((key, Nonce::assume_unique_for_key(ietf_nonce)))
    }
}

/// An aws-lc key of `algorithm` (whose context wipes the key schedule
/// when dropped).
fn ietf_key(
    algorithm: &'static Algorithm,
    subkey: &[u8; KEY_LEN],
) -> Result<LessSafeKey, &'static str> {
    UnboundKey::new(algorithm, subkey)
        .map(LessSafeKey::new)
        .map_err(|_| "the AEAD refused its key")
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
    use aes_gcm::Aes256Gcm;
    use aes_gcm::aead::{AeadInPlace, KeyInit};

    /// Argon2's `zeroize` feature is on: its blocks can be wiped (fails
    /// to build without it). The AEADs' key schedules are aws-lc's, wiped
    /// when it frees them.
    #[test]
    fn argon2_blocks_can_be_wiped() {
        fn wipeable<T: zeroize::Zeroize>() {}
        wipeable::<argon2::Block>();
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

    /// Random messages (lengths across block and record sizes, random keys,
    /// nonces and additional data) seal to the same bytes as RustCrypto's
    /// `aes-gcm` and `chacha20poly1305` give for the same construction, and
    /// each side opens the other's.
    #[test]
    fn seals_byte_identical_to_rustcrypto() {
        use chacha20poly1305::XChaCha20Poly1305;
        let seed = random::<32>().unwrap();
        let mut xof = blake3::Hasher::new_keyed(&seed).finalize_xof();
        let mut draw = |n: usize| {
            let mut v = vec![0u8; n];
            xof.fill(&mut v);
            v
        };
        let lens = [
            0, 1, 15, 16, 17, 63, 64, 255, 4096, 4097, 65_536, 65_559, 200_003,
        ];
        for (i, &len) in lens.iter().chain(&[0; 20]).enumerate() {
            let sizes = draw(3);
            let len = if i < lens.len() {
                len
            } else {
                usize::from(u16::from_le_bytes([sizes[0], sizes[1]])) + 1
            };
            let key: [u8; 32] = draw(32).try_into().unwrap();
            let nonce: [u8; 24] = draw(24).try_into().unwrap();
            let ad = draw(usize::from(sizes[2] % 64));
            let plain = draw(len);
            let ctx = format!("seed {} message {i} of {len} bytes", hex::encode(seed));
            for cipher in [Cipher::Aes256Gcm, Cipher::XChaCha20Poly1305] {
                let s = Sealer::new(cipher, &key);
                let mut ours = Vec::new();
                s.seal_with_nonce(&nonce, &ad, &plain, &mut ours).unwrap();
                let mut theirs = plain.clone();
                let tag = match cipher {
                    Cipher::Aes256Gcm => {
                        let mut h = blake3::Hasher::new_derive_key(AES_SUBKEY_CONTEXT);
                        h.update(&key);
                        h.update(&nonce[..12]);
                        Aes256Gcm::new(GenericArray::from_slice(h.finalize().as_bytes()))
                            .encrypt_in_place_detached(
                                GenericArray::from_slice(&nonce[12..]),
                                &ad,
                                &mut theirs,
                            )
                            .unwrap()
                    }
                    Cipher::XChaCha20Poly1305 => {
                        XChaCha20Poly1305::new(GenericArray::from_slice(&key))
                            .encrypt_in_place_detached(
                                GenericArray::from_slice(&nonce),
                                &ad,
                                &mut theirs,
                            )
                            .unwrap()
                    }
                };
                theirs.splice(0..0, nonce);
                theirs.extend_from_slice(&tag);
                assert!(ours == theirs, "{cipher}: {ctx}: sealed bytes differ");
                assert_eq!(
                    s.open(&ad, &theirs, &what).unwrap(),
                    plain,
                    "{cipher}: {ctx}"
                );
                // RustCrypto opens ours.
                let mut body = ours[24..ours.len() - 16].to_vec();
                let tag = GenericArray::from_slice(&ours[ours.len() - 16..]);
                match cipher {
                    Cipher::Aes256Gcm => {
                        let mut h = blake3::Hasher::new_derive_key(AES_SUBKEY_CONTEXT);
                        h.update(&key);
                        h.update(&nonce[..12]);
                        Aes256Gcm::new(GenericArray::from_slice(h.finalize().as_bytes()))
                            .decrypt_in_place_detached(
                                GenericArray::from_slice(&nonce[12..]),
                                &ad,
                                &mut body,
                                tag,
                            )
                            .unwrap();
                    }
                    Cipher::XChaCha20Poly1305 => {
                        XChaCha20Poly1305::new(GenericArray::from_slice(&key))
                            .decrypt_in_place_detached(
                                GenericArray::from_slice(&nonce),
                                &ad,
                                &mut body,
                                tag,
                            )
                            .unwrap()
                    }
                }
                assert!(
                    body == plain,
                    "{cipher}: {ctx}: RustCrypto opened other bytes"
                );
            }
        }
    }
}
