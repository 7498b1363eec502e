//! Key slots: the master key wrapped by a passphrase or a key file.
//!
//! A vault keeps one or more slots in its config, in clear: that is all
//! opening needs. Each slot holds the master key sealed with
//! XChaCha20-Poly1305 under a key-encryption key (KEK):
//!
//! - **passphrase**: `KEK = Argon2id(passphrase, salt, m, t, p)`, 32 bytes,
//!   with the parameters recorded in the slot;
//! - **key file**: `KEK = BLAKE3-derive_key("coffre 2026-12-06 key file kek
//!   v1", salt ‖ file bytes)`: a key file holds at least 32 random bytes,
//!   so it needs no stretching.
//!
//! The additional data binds the slot's id, kind, parameters and salt:
//! a slot whose fields were changed does not open. A slot read from a
//! config is untrusted: its fields are checked (lengths, hex, parameter
//! bounds, so that a forged slot cannot make coffre allocate gigabytes)
//! before any key is derived.

use argon2::{Algorithm, Argon2, Block, Params, Version};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::keys::{KEY_LEN, MasterKey};
use super::seal::{OVERHEAD, Sealer};
use super::{Cipher, CryptoError, random};

/// Context of a key file's KEK. Frozen.
pub const KEY_FILE_CONTEXT: &str = "coffre 2026-12-06 key file kek v1";
/// Length of a slot's salt, in bytes.
pub const SALT_LEN: usize = 32;
/// The fewest bytes a key file holds.
pub const MIN_KEY_FILE: usize = 32;
/// The most bytes of a key file read.
pub const MAX_KEY_FILE: usize = 1 << 20;
/// Longest passphrase accepted.
pub const MAX_PASSPHRASE: usize = 4096;
/// Most slots a vault keeps.
pub const MAX_SLOTS: usize = 32;

/// What unlocks a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotKind {
    /// A passphrase, through Argon2id.
    Passphrase,
    /// A key file.
    KeyFile,
}

impl SlotKind {
    fn name(self) -> &'static str {
        match self {
            SlotKind::Passphrase => "passphrase",
            SlotKind::KeyFile => "key-file",
        }
    }
}

/// Argon2id's parameters for one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory, KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// The default: 64 MiB, 3 passes, 1 lane (about a third of a second
    /// on the machines we measured; RFC 9106's second recommendation is 64
    /// MiB and 3 passes).
    pub const DEFAULT: KdfParams = KdfParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };
    /// The most memory a slot may ask for: 1 GiB.
    pub const MAX_M_KIB: u32 = 1024 * 1024;
    /// The most passes a slot may ask for.
    pub const MAX_T: u32 = 10;
    /// The most lanes a slot may ask for.
    pub const MAX_P: u32 = 8;
    /// The most work a slot may ask for: memory × passes ≤ 4 GiB·passes
    /// (in KiB·passes; e.g. 1 GiB × 4 passes, 512 MiB × 8): about 10 s of
    /// one core (measured: 9.6 s for 1 GiB × 4, 0.33 s for the default),
    /// so that a hostile config cannot make an unlock take minutes.
    pub const MAX_WORK: u64 = 4 * 1024 * 1024;
    /// The least memory of a new slot: 19 MiB (OWASP's minimum for
    /// Argon2id, with [`Self::MIN_NEW_T`] passes).
    pub const MIN_NEW_M_KIB: u32 = 19 * 1024;
    /// The fewest passes of a new slot.
    pub const MIN_NEW_T: u32 = 2;

    /// Memory × passes, KiB·passes: what one unlock of the slot costs.
    pub fn work(&self) -> u64 {
        u64::from(self.m_kib) * u64::from(self.t)
    }

    /// Checks the parameters are within coffre's bounds and Argon2's: what
    /// a slot must meet to be tried at all (an existing slot may be below
    /// the floor of new ones, [`Self::check_new`]: it was made by whoever
    /// held the master key, and its parameters are bound into its seal).
    pub fn check(&self) -> Result<(), String> {
        if self.p == 0 || self.p > Self::MAX_P {
            return Err(format!(
                "Argon2id lanes {} not in 1..={}",
                self.p,
                Self::MAX_P
            ));
        }
        if self.t == 0 || self.t > Self::MAX_T {
            return Err(format!(
                "Argon2id passes {} not in 1..={}",
                self.t,
                Self::MAX_T
            ));
        }
        if self.m_kib < 8 * self.p || self.m_kib > Self::MAX_M_KIB {
            return Err(format!(
                "Argon2id memory {} KiB not in {}..={} KiB",
                self.m_kib,
                8 * self.p,
                Self::MAX_M_KIB
            ));
        }
        if self.work() > Self::MAX_WORK {
            return Err(format!(
                "Argon2id memory × passes {} MiB × {} is more than {} GiB·passes",
                self.m_kib / 1024,
                self.t,
                Self::MAX_WORK / (1024 * 1024)
            ));
        }
        Ok(())
    }

    /// [`Self::check`], and the floor of a new slot: at least
    /// [`Self::MIN_NEW_M_KIB`] of memory and [`Self::MIN_NEW_T`] passes.
    pub fn check_new(&self) -> Result<(), String> {
        self.check()?;
        if self.m_kib < Self::MIN_NEW_M_KIB || self.t < Self::MIN_NEW_T {
            return Err(format!(
                "Argon2id {} KiB × {} passes is too weak for a new passphrase: at least {} MiB and {} passes",
                self.m_kib,
                self.t,
                Self::MIN_NEW_M_KIB / 1024,
                Self::MIN_NEW_T
            ));
        }
        Ok(())
    }
}

/// One key slot, as the config records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySlot {
    /// 8 hex digits, unique in the vault.
    pub id: String,
    /// What unlocks it.
    pub kind: SlotKind,
    /// Argon2id's parameters (passphrase slots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// The salt, hex.
    pub salt: String,
    /// The master key sealed under the KEK: nonce, ciphertext, tag, hex.
    pub wrapped: String,
    /// When it was added.
    pub created: Timestamp,
    /// A note of the user's (`--label`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// A secret that unlocks a slot.
pub enum Secret<'a> {
    /// A passphrase.
    Passphrase(&'a [u8]),
    /// A key file's bytes.
    KeyFile(&'a [u8]),
}

impl Secret<'_> {
    fn kind(&self) -> SlotKind {
        match self {
            Secret::Passphrase(_) => SlotKind::Passphrase,
            Secret::KeyFile(_) => SlotKind::KeyFile,
        }
    }

    /// Checks the secret's length: a passphrase of at most
    /// [`MAX_PASSPHRASE`] bytes, a key file of [`MIN_KEY_FILE`] to
    /// [`MAX_KEY_FILE`] bytes (a key file is not stretched: it must be
    /// strong by itself).
    pub fn check(&self) -> Result<(), CryptoError> {
        match self {
            Secret::Passphrase(p) if p.len() > MAX_PASSPHRASE => Err(CryptoError::Kdf(format!(
                "the passphrase is longer than {MAX_PASSPHRASE} bytes"
            ))),
            Secret::KeyFile(bytes) if bytes.len() < MIN_KEY_FILE || bytes.len() > MAX_KEY_FILE => {
                Err(CryptoError::Malformed {
                    what: "the key file".into(),
                    reason: format!(
                        "{} bytes: a key file holds {MIN_KEY_FILE} bytes to 1 MiB (`--generate-key-file` writes one)",
                        bytes.len()
                    ),
                })
            }
            _ => Ok(()),
        }
    }
}

impl KeySlot {
    /// A new slot wrapping `master` for `secret` (with `kdf` for a
    /// passphrase; `None`: [`KdfParams::DEFAULT`]). Parameters below the
    /// floor of new slots ([`KdfParams::check_new`]) are refused, and a
    /// key file must hold at least [`MIN_KEY_FILE`] bytes.
    pub fn new(
        master: &MasterKey,
        secret: &Secret<'_>,
        kdf: Option<KdfParams>,
        label: Option<String>,
        now: Timestamp,
    ) -> Result<KeySlot, CryptoError> {
        Self::build(master, secret, kdf, label, now, true)
    }

    /// [`Self::new`] without the floor of new slots: **tests, benches and
    /// fuzz seeds only**, which use tiny Argon2id parameters to check the
    /// construction, not its cost. Never for a user's slot.
    pub fn new_with_weak_kdf_for_tests(
        master: &MasterKey,
        secret: &Secret<'_>,
        kdf: Option<KdfParams>,
        label: Option<String>,
        now: Timestamp,
    ) -> Result<KeySlot, CryptoError> {
        Self::build(master, secret, kdf, label, now, false)
    }

    fn build(
        master: &MasterKey,
        secret: &Secret<'_>,
        kdf: Option<KdfParams>,
        label: Option<String>,
        now: Timestamp,
        floor: bool,
    ) -> Result<KeySlot, CryptoError> {
        let kind = secret.kind();
        let kdf = match kind {
            SlotKind::Passphrase => Some(kdf.unwrap_or(KdfParams::DEFAULT)),
            SlotKind::KeyFile => None,
        };
        if floor && let Some(k) = kdf {
            k.check_new().map_err(|reason| CryptoError::Malformed {
                what: "the new key slot".into(),
                reason,
            })?;
        }
        secret.check()?;
        let id = hex::encode(random::<4>()?);
        let salt = random::<SALT_LEN>()?;
        let mut slot = KeySlot {
            id,
            kind,
            kdf,
            salt: hex::encode(salt),
            wrapped: String::new(),
            created: now,
            label,
        };
        slot.check()?;
        let kek = kek(&slot, &salt, secret)?;
        let sealed = Sealer::new(Cipher::XChaCha20Poly1305, &kek)
            .seal(slot.ad().as_bytes(), master.expose())?;
        slot.wrapped = hex::encode(sealed);
        Ok(slot)
    }

    /// The master key, when `secret` opens this slot. `Ok(None)`: it does
    /// not (another secret, or a slot of the other kind).
    pub fn unlock(&self, secret: &Secret<'_>) -> Result<Option<MasterKey>, CryptoError> {
        self.check()?;
        if secret.kind() != self.kind {
            return Ok(None);
        }
        let salt = self.salt_bytes()?;
        let wrapped =
            hex::decode(&self.wrapped).map_err(|e| self.bad(format!("wrapped key: {e}")))?;
        let kek = kek(self, &salt, secret)?;
        let opened = Sealer::new(Cipher::XChaCha20Poly1305, &kek).open(
            self.ad().as_bytes(),
            &wrapped,
            &|| format!("key slot {}", self.id),
        );
        match opened {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let key: [u8; KEY_LEN] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| self.bad(format!("wraps {} bytes, not a key", bytes.len())))?;
                Ok(Some(MasterKey::from_bytes(key)))
            }
            Err(CryptoError::Forged { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks the slot's fields (untrusted: read from a config) and its
    /// Argon2id parameters ([`KdfParams::check`]): what a slot must meet to
    /// be tried.
    pub fn check(&self) -> Result<(), CryptoError> {
        self.check_fields()?;
        if let Some(k) = &self.kdf {
            k.check().map_err(|e| self.bad(e))?;
        }
        Ok(())
    }

    /// Checks the slot's fields but not the bounds of its Argon2id
    /// parameters: what a config must meet to be read. A slot whose
    /// parameters are out of bounds is kept (and shown by `key list`) but
    /// never tried, so that the vault's other slots still open it.
    pub fn check_fields(&self) -> Result<(), CryptoError> {
        if self.id.len() != 8 || !self.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(self.bad("its id is not 8 hex digits".into()));
        }
        self.salt_bytes()?;
        match (self.kind, &self.kdf) {
            (SlotKind::Passphrase, Some(_)) => {}
            (SlotKind::Passphrase, None) => {
                return Err(self.bad("a passphrase slot without Argon2id parameters".into()));
            }
            (SlotKind::KeyFile, Some(_)) => {
                return Err(self.bad("a key-file slot with Argon2id parameters".into()));
            }
            (SlotKind::KeyFile, None) => {}
        }
        // Filled in by `new` after this check.
        if !self.wrapped.is_empty() && self.wrapped.len() != 2 * (KEY_LEN + OVERHEAD) {
            return Err(self.bad(format!(
                "its wrapped key is {} hex digits, not {}",
                self.wrapped.len(),
                2 * (KEY_LEN + OVERHEAD)
            )));
        }
        if self.label.as_ref().is_some_and(|l| l.len() > 200) {
            return Err(self.bad("its label is longer than 200 bytes".into()));
        }
        Ok(())
    }

    /// The additional data of the wrapped key: every field but the key.
    fn ad(&self) -> String {
        let kdf = self.kdf.map_or(String::from("-"), |k| {
            format!("argon2id m={} t={} p={}", k.m_kib, k.t, k.p)
        });
        format!(
            "coffre key slot v1\0{}\0{}\0{kdf}\0{}",
            self.id,
            self.kind.name(),
            self.salt
        )
    }

    fn salt_bytes(&self) -> Result<[u8; SALT_LEN], CryptoError> {
        let v = hex::decode(&self.salt).map_err(|e| self.bad(format!("salt: {e}")))?;
        v.try_into()
            .map_err(|_| self.bad(format!("its salt is not {SALT_LEN} bytes")))
    }

    fn bad(&self, reason: String) -> CryptoError {
        CryptoError::Malformed {
            what: format!("key slot {}", self.id.chars().take(16).collect::<String>()),
            reason,
        }
    }
}

/// The key-encryption key of `slot` for `secret`.
fn kek(
    slot: &KeySlot,
    salt: &[u8; SALT_LEN],
    secret: &Secret<'_>,
) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    match (secret, slot.kdf) {
        (Secret::Passphrase(p), Some(k)) => {
            secret.check()?;
            // Never Argon2id out of bounds, whoever calls.
            k.check().map_err(|e| slot.bad(e))?;
            let params = Params::new(k.m_kib, k.t, k.p, Some(KEY_LEN))
                .map_err(|e| CryptoError::Kdf(e.to_string()))?;
            // Argon2's memory, wiped when dropped (`hash_password_into`
            // would free it as it is: blocks derived from the passphrase).
            let mut blocks = Zeroizing::new(vec![Block::default(); params.block_count()]);
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password_into_with_memory(p, salt, &mut out[..], &mut blocks[..])
                .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        }
        (Secret::KeyFile(bytes), _) => {
            secret.check()?;
            let mut h = blake3::Hasher::new_derive_key(KEY_FILE_CONTEXT);
            h.update(salt);
            h.update(bytes);
            out.copy_from_slice(h.finalize().as_bytes());
        }
        (Secret::Passphrase(_), None) => {
            return Err(slot.bad("a passphrase slot without Argon2id parameters".into()));
        }
    }
    Ok(out)
}

/// The most Argon2id work one [`unlock_any`] does over all the slots it
/// tries: 8 GiB·passes (two slots at [`KdfParams::MAX_WORK`], or every
/// slot of a full vault at the default), so that a config of many costly
/// slots cannot make an unlock take minutes either.
pub const MAX_UNLOCK_WORK: u64 = 2 * KdfParams::MAX_WORK;

/// The master key `secret` opens among `slots`, and the id of the slot
/// that opened.
///
/// Only the slots of the secret's kind are tried (a key file never runs
/// Argon2id), the last added first. A slot that cannot be tried (fields
/// or Argon2id parameters out of bounds, or past [`MAX_UNLOCK_WORK`]) is
/// skipped; that is reported only when no slot opens.
pub fn unlock_any(
    slots: &[KeySlot],
    secret: &Secret<'_>,
) -> Result<(MasterKey, String), CryptoError> {
    unlock_within(slots, secret, MAX_UNLOCK_WORK)
}

/// [`unlock_any`] with at most `budget` KiB·passes of Argon2id in all.
fn unlock_within(
    slots: &[KeySlot],
    secret: &Secret<'_>,
    mut budget: u64,
) -> Result<(MasterKey, String), CryptoError> {
    secret.check()?;
    let kind = secret.kind();
    let mut refused: Vec<CryptoError> = Vec::new();
    for s in slots.iter().rev().filter(|s| s.kind == kind) {
        if let Err(e) = s.check() {
            refused.push(e);
            continue;
        }
        if let Some(k) = s.kdf {
            if k.work() > budget {
                refused.push(s.bad(format!(
                    "not tried: with the slots tried before it, one unlock would run more than {} GiB·passes of Argon2id",
                    MAX_UNLOCK_WORK / (1024 * 1024)
                )));
                continue;
            }
            budget -= k.work();
        }
        match s.unlock(secret) {
            Ok(Some(k)) => return Ok((k, s.id.clone())),
            Ok(None) => {}
            Err(e) => refused.push(e),
        }
    }
    match refused.first() {
        None => Err(CryptoError::WrongKey { slots: slots.len() }),
        Some(first) => Err(CryptoError::Malformed {
            what: format!("the vault's {} key slot(s)", slots.len()),
            reason: format!(
                "none opens with the {} given, and {} could not be tried: {first}",
                kind.name(),
                refused.len()
            ),
        }),
    }
}

/// The passphrase the fuzz seeds' passphrase slots open with.
pub const FUZZ_PASSPHRASE: &[u8] = b"coffre fuzz passphrase";
/// The key file the fuzz seeds' key-file slots open with.
pub const FUZZ_KEY_FILE: [u8; 32] = [0x5c; 32];
/// The most Argon2id work the fuzz entry lets an unlock do: tiny, so
/// that fuzzing stays fast (the seeds use 64 KiB × 1 pass).
pub const FUZZ_WORK: u64 = 256;

/// The fuzz entry point (also replayed over the seed corpus): `data` read
/// as a config's key slots (a JSON list, or one slot; 1 to 32 with
/// distinct ids, as a config is read), checked, and
/// unlocked with [`FUZZ_PASSPHRASE`] and [`FUZZ_KEY_FILE`] (at most
/// [`FUZZ_WORK`] of Argon2id; never out of bounds). Never panics; returns
/// how many of the two secrets opened a slot.
pub fn fuzz_entry(data: &[u8]) -> usize {
    let slots: Vec<KeySlot> = match serde_json::from_slice::<Vec<KeySlot>>(data) {
        Ok(v) => v,
        Err(_) => match serde_json::from_slice::<KeySlot>(data) {
            Ok(s) => vec![s],
            Err(_) => return 0,
        },
    };
    // As a config is read: 1 to 32 slots, distinct ids.
    if slots.is_empty()
        || slots.len() > MAX_SLOTS
        || slots
            .iter()
            .enumerate()
            .any(|(i, s)| slots.iter().skip(i + 1).any(|o| o.id == s.id))
    {
        return 0;
    }
    let mut opened = 0;
    for secret in [
        Secret::Passphrase(FUZZ_PASSPHRASE),
        Secret::KeyFile(&FUZZ_KEY_FILE),
    ] {
        if let Ok((key, id)) = unlock_within(&slots, &secret, FUZZ_WORK) {
            // What opened is a slot of the secret's kind, within bounds,
            // and opens again with the same key.
            let slot = slots.iter().find(|s| s.id == id);
            let again = slot.map(|s| (s.kind, s.check().is_ok(), s.unlock(&secret)));
            let same = matches!(
                again,
                Some((kind, true, Ok(Some(ref k)))) if kind == secret.kind() && k.expose() == key.expose()
            );
            assert!(
                same,
                "slot {id} opened but does not open again, within bounds, with the same key"
            );
            opened += 1;
        }
    }
    opened
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// Small Argon2id parameters: the tests check the construction, not
    /// its cost.
    const FAST: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    fn now() -> Timestamp {
        "2026-12-06T08:00:00Z".parse().unwrap()
    }

    #[test]
    fn passphrase_and_key_file_slots_open_with_their_secret_only() {
        let master = MasterKey::generate().unwrap();
        let pass = KeySlot::new_with_weak_kdf_for_tests(
            &master,
            &Secret::Passphrase(b"correct horse"),
            Some(FAST),
            None,
            now(),
        )
        .unwrap();
        let file = [9u8; 32];
        let kf = KeySlot::new(
            &master,
            &Secret::KeyFile(&file),
            None,
            Some("usb".into()),
            now(),
        )
        .unwrap();
        let slots = [pass.clone(), kf.clone()];
        let (got, id) = unlock_any(&slots, &Secret::Passphrase(b"correct horse")).unwrap();
        assert_eq!(got.expose(), master.expose());
        assert_eq!(id, pass.id);
        let (got, id) = unlock_any(&slots, &Secret::KeyFile(&file)).unwrap();
        assert_eq!(got.expose(), master.expose());
        assert_eq!(id, kf.id);
        assert_eq!(
            unlock_any(&slots, &Secret::Passphrase(b"wrong")).unwrap_err(),
            CryptoError::WrongKey { slots: 2 }
        );
        assert!(unlock_any(&slots, &Secret::KeyFile(&[8u8; 32])).is_err());
        assert!(matches!(
            unlock_any(&slots, &Secret::KeyFile(&[8u8; 31])),
            Err(CryptoError::Malformed { .. })
        ));
        // JSON round trip.
        let json = serde_json::to_string(&slots).unwrap();
        let back: Vec<KeySlot> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, slots);
    }

    #[test]
    fn a_changed_field_or_hostile_parameters_do_not_open() {
        let master = MasterKey::generate().unwrap();
        let slot = KeySlot::new_with_weak_kdf_for_tests(
            &master,
            &Secret::Passphrase(b"pw"),
            Some(FAST),
            None,
            now(),
        )
        .unwrap();
        let secret = Secret::Passphrase(b"pw");
        // Cheaper parameters: authentication fails (they are bound).
        let mut s = slot.clone();
        s.kdf = Some(KdfParams { m_kib: 32, ..FAST });
        assert!(s.unlock(&secret).unwrap().is_none());
        let mut s = slot.clone();
        s.salt = hex::encode([0u8; 32]);
        assert!(s.unlock(&secret).unwrap().is_none());
        let mut s = slot.clone();
        s.id = "00000000".into();
        assert!(s.unlock(&secret).unwrap().is_none());
        // Parameters past the bounds are refused before any work.
        let mut s = slot.clone();
        s.kdf = Some(KdfParams {
            m_kib: u32::MAX,
            ..FAST
        });
        assert!(matches!(
            s.unlock(&secret),
            Err(CryptoError::Malformed { .. })
        ));
        let mut s = slot.clone();
        s.kdf = None;
        assert!(s.unlock(&secret).is_err());
        let mut s = slot.clone();
        s.wrapped.pop();
        assert!(s.unlock(&secret).is_err());
        let mut s = slot;
        s.id = "../../x".into();
        assert!(s.unlock(&secret).is_err());
    }

    #[test]
    fn argon2id_parameters_are_bounded_in_memory_passes_lanes_and_work() {
        let ok = |m_kib, t, p| KdfParams { m_kib, t, p }.check().is_ok();
        assert!(ok(1024 * 1024, 4, 1), "1 GiB × 4 passes");
        assert!(ok(512 * 1024, 8, 8));
        assert!(ok(8, 1, 1), "Argon2's own minimum still opens");
        assert!(!ok(1024 * 1024 + 1, 1, 1), "more than 1 GiB");
        assert!(!ok(2 * 1024 * 1024, 1, 1));
        assert!(!ok(64 * 1024, 11, 1), "more than 10 passes");
        assert!(!ok(64 * 1024, 3, 9), "more than 8 lanes");
        assert!(!ok(1024 * 1024, 5, 1), "more than 4 GiB·passes");
        assert!(!ok(600 * 1024, 7, 1), "more than 4 GiB·passes");
        assert!(!ok(16, 1, 4), "less than 8 KiB a lane");
        assert!(!ok(64 * 1024, 0, 1));
        assert!(!ok(64 * 1024, 3, 0));
        assert!(KdfParams::DEFAULT.check_new().is_ok());
    }

    #[test]
    fn a_new_slot_refuses_weak_parameters_unless_made_for_tests() {
        let master = MasterKey::generate().unwrap();
        let secret = Secret::Passphrase(b"pw");
        for weak in [
            FAST,
            KdfParams {
                m_kib: 18 * 1024,
                t: 3,
                p: 1,
            },
            KdfParams {
                m_kib: 64 * 1024,
                t: 1,
                p: 1,
            },
        ] {
            let err = KeySlot::new(&master, &secret, Some(weak), None, now()).unwrap_err();
            assert!(err.to_string().contains("too weak"), "{weak:?}: {err}");
        }
        // Over the bounds: refused before any work.
        let huge = KdfParams {
            m_kib: 2 * 1024 * 1024,
            t: 3,
            p: 1,
        };
        assert!(KeySlot::new(&master, &secret, Some(huge), None, now()).is_err());
        // OWASP's minimum is accepted, and opens.
        let floor = KdfParams {
            m_kib: KdfParams::MIN_NEW_M_KIB,
            t: KdfParams::MIN_NEW_T,
            p: 1,
        };
        let slot = KeySlot::new(&master, &secret, Some(floor), None, now()).unwrap();
        assert_eq!(
            slot.unlock(&secret).unwrap().unwrap().expose(),
            master.expose()
        );
        // The test constructor takes tiny parameters, and they open.
        let weak = KeySlot::new_with_weak_kdf_for_tests(&master, &secret, Some(FAST), None, now())
            .unwrap();
        assert_eq!(
            weak.unlock(&secret).unwrap().unwrap().expose(),
            master.expose()
        );
        // A key file shorter than 32 bytes makes no slot.
        assert!(KeySlot::new(&master, &Secret::KeyFile(&[7; 31]), None, None, now()).is_err());
        assert!(KeySlot::new(&master, &Secret::KeyFile(&[7; 32]), None, None, now()).is_ok());
    }

    fn weak(master: &MasterKey, secret: &Secret<'_>) -> KeySlot {
        KeySlot::new_with_weak_kdf_for_tests(master, secret, Some(FAST), None, now()).unwrap()
    }

    #[test]
    fn unlock_any_tries_the_last_added_first_and_skips_refused_slots() {
        let master = MasterKey::generate().unwrap();
        let pw = Secret::Passphrase(b"pw");
        let (a, b) = (weak(&master, &pw), weak(&master, &pw));
        // Both open: the last added is tried first.
        let (_, id) = unlock_any(&[a.clone(), b.clone()], &pw).unwrap();
        assert_eq!(id, b.id);
        // A slot whose parameters are out of bounds is skipped, wherever
        // it is, and the next one opens.
        let mut hostile = weak(&master, &pw);
        hostile.kdf = Some(KdfParams {
            m_kib: u32::MAX,
            t: u32::MAX,
            p: 1,
        });
        assert!(hostile.check_fields().is_ok());
        // Argon2id itself refuses it, whoever would call it.
        let salt = hostile.salt_bytes().unwrap();
        assert!(matches!(
            kek(&hostile, &salt, &pw),
            Err(CryptoError::Malformed { .. })
        ));
        for slots in [
            vec![a.clone(), hostile.clone()],
            vec![hostile.clone(), a.clone()],
        ] {
            let (got, id) = unlock_any(&slots, &pw).unwrap();
            assert_eq!(
                (got.expose(), id.as_str()),
                (master.expose(), a.id.as_str())
            );
        }
        // When none opens, the refusal is reported with the wrong key.
        let err =
            unlock_any(&[a.clone(), hostile.clone()], &Secret::Passphrase(b"no")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("none opens")
                && text.contains("1 could not be tried")
                && text.contains(&hostile.id),
            "{text}"
        );
        assert_eq!(
            unlock_any(&[a], &Secret::Passphrase(b"no")).unwrap_err(),
            CryptoError::WrongKey { slots: 1 }
        );
    }

    #[test]
    fn a_key_file_never_runs_argon2id_nor_trips_on_passphrase_slots() {
        let master = MasterKey::generate().unwrap();
        let file = [3u8; 32];
        let kf = KeySlot::new(&master, &Secret::KeyFile(&file), None, None, now()).unwrap();
        // A passphrase slot that would take 1 GiB × 4 passes and one out
        // of bounds: a key file must open at once, never trying them.
        let mut costly = weak(&master, &Secret::Passphrase(b"pw"));
        costly.kdf = Some(KdfParams {
            m_kib: 1024 * 1024,
            t: 4,
            p: 1,
        });
        let mut hostile = costly.clone();
        hostile.id = "0badf00d".into();
        hostile.kdf = Some(KdfParams {
            m_kib: u32::MAX,
            ..FAST
        });
        let started = std::time::Instant::now();
        let slots = [kf.clone(), costly.clone(), hostile.clone()];
        let (got, id) = unlock_any(&slots, &Secret::KeyFile(&file)).unwrap();
        assert_eq!((got.expose(), id), (master.expose(), kf.id.clone()));
        assert_eq!(
            unlock_any(&slots, &Secret::KeyFile(&[4u8; 32])).unwrap_err(),
            CryptoError::WrongKey { slots: 3 }
        );
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        // A key file too short is refused before any slot is tried.
        let err = unlock_any(&slots, &Secret::KeyFile(&[3u8; 31])).unwrap_err();
        assert!(err.to_string().contains("31 bytes"), "{err}");
    }

    #[test]
    fn the_work_of_one_unlock_is_bounded_over_all_slots() {
        let master = MasterKey::generate().unwrap();
        let a = weak(&master, &Secret::Passphrase(b"first"));
        let b = weak(&master, &Secret::Passphrase(b"second"));
        let c = weak(&master, &Secret::Passphrase(b"third"));
        let slots = [a.clone(), b, c];
        let first = Secret::Passphrase(b"first");
        // Tried c, b, a: a budget of two slots never reaches a.
        let err = unlock_within(&slots, &first, 2 * FAST.work()).unwrap_err();
        assert!(
            err.to_string().contains("not tried") && err.to_string().contains(&a.id),
            "{err}"
        );
        let (_, id) = unlock_within(&slots, &first, 3 * FAST.work()).unwrap();
        assert_eq!(id, a.id);
        // The budget of a real unlock: every slot of a full vault at the
        // default parameters, or two at the most work each.
        assert!(MAX_UNLOCK_WORK >= MAX_SLOTS as u64 * KdfParams::DEFAULT.work());
        assert_eq!(MAX_UNLOCK_WORK, 2 * KdfParams::MAX_WORK);
    }

    /// Known answer: the passphrase KEK is Argon2id v1.3 (computed
    /// independently with argon2-cffi's `hash_secret_raw`).
    #[test]
    fn the_passphrase_kek_is_argon2id() {
        let slot = KeySlot {
            id: "0a0b0c0d".into(),
            kind: SlotKind::Passphrase,
            kdf: Some(FAST),
            salt: hex::encode([0x5au8; 32]),
            wrapped: String::new(),
            created: now(),
            label: None,
        };
        let kek = kek(&slot, &[0x5a; 32], &Secret::Passphrase(b"password")).unwrap();
        assert_eq!(
            hex::encode(&kek[..]),
            "dff64cbd69fade35973ad3505fd6f2c7362e71badfb16b4afb439eb3c59f4b1b"
        );
    }
}
