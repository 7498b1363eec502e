//! The chunk record: the unit of storage inside a segment file.
//!
//! A record is a fixed 56-byte header followed by the stored (possibly
//! compressed) bytes. The layout is specified byte by byte in `FORMAT.md`
//! ("Chunk record"). Decoding never trusts a length field: every length is
//! checked against hard limits and against the bytes actually present
//! before it is used, and no input makes the decoder panic (this module
//! denies indexing and unwrapping; it is fuzzed by `fuzz/fuzz_targets/
//! chunk_record.rs`).

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use crate::crypto::seal::OVERHEAD;
use crate::crypto::{Cipher, VaultKeys};
use crate::format::chunk_id::ChunkId;

/// Record magic. Frozen: changing it makes every vault unreadable.
pub const RECORD_MAGIC: [u8; 4] = *b"CFCK";
/// The version of a plaintext record.
pub const RECORD_VERSION: u8 = 1;
/// The version of a sealed record (an encrypted vault's): byte 6 names
/// the cipher, and the payload is `nonce ‖ ciphertext ‖ tag` of the
/// (possibly compressed) bytes, bound to header bytes 0..48.
pub const RECORD_VERSION_SEALED: u8 = 2;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 56;
/// The header bytes a sealed record's payload is bound to: everything but
/// the two CRCs (magic, version, codec, cipher, lengths, id).
pub const AD_LEN: usize = 48;
/// The largest plaintext a record may carry (8 MiB: twice the largest
/// block size, which leaves room for block-map nodes).
pub const MAX_PLAIN_LEN: usize = 8 << 20;
/// The largest stored payload: zstd's worst-case expansion of
/// [`MAX_PLAIN_LEN`] is far below this, and raw payloads equal the plain.
pub const MAX_STORED_LEN: usize = MAX_PLAIN_LEN + (MAX_PLAIN_LEN >> 7) + 4096 + OVERHEAD;

const _: () = assert!(HEADER_LEN == 4 + 1 + 1 + 2 + 4 + 4 + 32 + 4 + 4);

/// How the payload is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// Payload is the plaintext itself.
    Raw = 0,
    /// Payload is one zstd frame.
    Zstd = 1,
}

impl Codec {
    fn from_byte(b: u8) -> Result<Self, RecordError> {
        match b {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            other => Err(RecordError::UnknownCodec(other)),
        }
    }
}

/// Why a record's bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("record truncated: need {needed} bytes, only {available} present")]
    Truncated { needed: usize, available: usize },
    #[error("bad record magic {found:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported record version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    #[error("{field} {len} exceeds the limit of {max}")]
    LengthTooLarge {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("raw record has plain length {plain} but stored length {stored}")]
    RawLengthMismatch { plain: usize, stored: usize },
    #[error("header checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("data checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    DataChecksum { stored: u32, computed: u32 },
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("decompressed to {got} bytes, header says {expected}")]
    PlainLengthMismatch { expected: usize, got: usize },
    #[error("content hash {computed} does not match the record id")]
    IdMismatch { computed: ChunkId },
    #[error("record id {found} is not the requested chunk {expected}")]
    WrongChunk { expected: ChunkId, found: ChunkId },
    #[error("cannot seal the record: {0}")]
    Seal(String),
    #[error("unknown cipher {0}")]
    UnknownCipher(u8),
    #[error("the record is encrypted ({0}): the vault's key is needed to read it")]
    Sealed(Cipher),
    #[error("a plaintext record in an encrypted vault: refused")]
    NotSealed,
    #[error("the record is sealed with {found}, the vault uses {vault}")]
    CipherMismatch { found: Cipher, vault: Cipher },
    #[error("the record failed authentication: altered, or sealed with another key")]
    Unauthentic,
}

/// A validated record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub codec: Codec,
    /// The cipher of a sealed record (version 2); `None`: plaintext.
    pub sealed: Option<Cipher>,
    pub plain_len: u32,
    pub stored_len: u32,
    pub id: ChunkId,
    pub data_crc: u32,
}

/// True when `rec` is exactly one intact record (header checksum, length,
/// payload CRC-32), of chunk `id` when given: the cheap check made of
/// bytes copied between copies without decoding them.
pub fn record_intact(rec: &[u8], id: Option<&crate::format::chunk_id::ChunkId>) -> bool {
    let Ok(h) = RecordHeader::parse(rec) else {
        return false;
    };
    id.is_none_or(|id| h.id == *id)
        && h.record_len() == rec.len() as u64
        && rec
            .get(HEADER_LEN..)
            .is_some_and(|p| crc32fast::hash(p) == h.data_crc)
}

/// [`record_intact`], and sealed as the vault's records are: in an
/// encrypted vault (`keys`) sealed with its cipher and authentic (the AEAD
/// opens, into `scratch`); in a plain vault not sealed. What refill and
/// replication check before they copy a record, so that a forged record
/// whose CRCs were fixed up is never copied over a good one.
pub fn record_authentic(
    rec: &[u8],
    id: Option<&crate::format::chunk_id::ChunkId>,
    keys: Option<&VaultKeys>,
    scratch: &mut Vec<u8>,
) -> bool {
    if !record_intact(rec, id) {
        return false;
    }
    let Ok(h) = RecordHeader::parse(rec) else {
        return false;
    };
    match (h.sealed, keys) {
        (None, None) => true,
        (Some(c), Some(k)) if c == k.cipher() => {
            let ad = h.to_bytes();
            scratch.clear();
            k.records()
                .open_into(
                    ad.get(..AD_LEN).unwrap_or_default(),
                    rec.get(HEADER_LEN..).unwrap_or_default(),
                    scratch,
                    &String::new,
                )
                .is_ok()
        }
        _ => false,
    }
}

impl RecordHeader {
    /// Total record length: header plus payload.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.stored_len)
    }

    /// Serialises the header (with its checksum) into 56 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        put(&mut h, 0, &RECORD_MAGIC);
        let (version, cipher) = match self.sealed {
            None => (RECORD_VERSION, 0),
            Some(c) => (RECORD_VERSION_SEALED, c.byte()),
        };
        put(&mut h, 4, &[version, self.codec as u8, cipher, 0]);
        put(&mut h, 8, &self.plain_len.to_le_bytes());
        put(&mut h, 12, &self.stored_len.to_le_bytes());
        put(&mut h, 16, self.id.as_bytes());
        put(&mut h, 48, &self.data_crc.to_le_bytes());
        let crc = crc32fast::hash(h.get(..52).unwrap_or_default());
        put(&mut h, 52, &crc.to_le_bytes());
        h
    }

    /// Parses and validates a header from the start of `bytes`. Checks the
    /// magic, version, codec, reserved bytes, length limits and the header
    /// checksum; it does not look at the payload.
    pub fn parse(bytes: &[u8]) -> Result<Self, RecordError> {
        let h = bytes.get(..HEADER_LEN).ok_or(RecordError::Truncated {
            needed: HEADER_LEN,
            available: bytes.len(),
        })?;
        let magic = arr4(h, 0);
        if magic != RECORD_MAGIC {
            return Err(RecordError::BadMagic { found: magic });
        }
        let stored_crc = u32::from_le_bytes(arr4(h, 52));
        let computed = crc32fast::hash(h.get(..52).unwrap_or_default());
        if stored_crc != computed {
            return Err(RecordError::HeaderChecksum {
                stored: stored_crc,
                computed,
            });
        }
        let [version, codec, r0, r1] = arr4(h, 4);
        let sealed = match version {
            RECORD_VERSION if r0 == 0 => None,
            RECORD_VERSION_SEALED => {
                Some(Cipher::from_byte(r0).ok_or(RecordError::UnknownCipher(r0))?)
            }
            RECORD_VERSION => return Err(RecordError::ReservedNotZero),
            _ => return Err(RecordError::UnsupportedVersion(version)),
        };
        let codec = Codec::from_byte(codec)?;
        if r1 != 0 {
            return Err(RecordError::ReservedNotZero);
        }
        let plain_len = u32::from_le_bytes(arr4(h, 8));
        let stored_len = u32::from_le_bytes(arr4(h, 12));
        check_limit("plain length", plain_len as usize, MAX_PLAIN_LEN)?;
        check_limit("stored length", stored_len as usize, MAX_STORED_LEN)?;
        let overhead = if sealed.is_some() { OVERHEAD as u32 } else { 0 };
        if sealed.is_some() && stored_len < overhead {
            return Err(RecordError::Truncated {
                needed: OVERHEAD,
                available: stored_len as usize,
            });
        }
        if codec == Codec::Raw && plain_len.checked_add(overhead) != Some(stored_len) {
            return Err(RecordError::RawLengthMismatch {
                plain: plain_len as usize,
                stored: stored_len as usize,
            });
        }
        let id = ChunkId::from_slice(h.get(16..48).unwrap_or_default()).ok_or(
            RecordError::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            },
        )?;
        Ok(RecordHeader {
            codec,
            sealed,
            plain_len,
            stored_len,
            id,
            data_crc: u32::from_le_bytes(arr4(h, 48)),
        })
    }
}

fn check_limit(field: &'static str, len: usize, max: usize) -> Result<(), RecordError> {
    if len > max {
        Err(RecordError::LengthTooLarge { field, len, max })
    } else {
        Ok(())
    }
}

fn arr4(h: &[u8], at: usize) -> [u8; 4] {
    let mut a = [0u8; 4];
    if let Some(src) = h.get(at..at + 4) {
        a.copy_from_slice(src);
    }
    a
}

fn put(h: &mut [u8], at: usize, src: &[u8]) {
    if let Some(dst) = h.get_mut(at..at + src.len()) {
        dst.copy_from_slice(src);
    }
}

/// Turns plaintext chunks into records. Holds a reusable zstd context, so
/// keep one per worker thread.
pub struct RecordEncoder {
    level: i32,
    /// An encrypted vault's keys: records are sealed.
    keys: Option<Arc<VaultKeys>>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Where zstd compresses to: reused, so a block costs no zero-filled
    /// compress-bound buffer, only the copy of what it compressed to.
    scratch: Vec<u8>,
}

impl RecordEncoder {
    /// An encoder compressing at zstd `level`; level 0 stores raw.
    pub fn new(level: i32) -> Self {
        let zstd = if level == 0 {
            None
        } else {
            zstd::bulk::Compressor::new(level).ok()
        };
        RecordEncoder {
            level,
            keys: None,
            zstd,
            scratch: Vec::new(),
        }
    }

    /// An encoder for a vault: records sealed with `keys` when the vault
    /// is encrypted.
    pub fn for_vault(level: i32, keys: Option<Arc<VaultKeys>>) -> Self {
        RecordEncoder {
            keys,
            ..Self::new(level)
        }
    }

    /// The id of `plain` in this encoder's vault (keyed when encrypted).
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        match &self.keys {
            Some(k) => ChunkId(k.chunk_id(plain)),
            None => ChunkId::of(plain),
        }
    }

    /// The configured zstd level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Encodes `plain` (whose id is `id`) into a complete record. The
    /// payload is compressed unless compression would not shrink it.
    pub fn encode(&mut self, id: ChunkId, plain: &[u8]) -> Result<Vec<u8>, RecordError> {
        self.encode_nonce(id, plain, None)
    }

    /// [`Self::encode`], sealing with `fixed_nonce` in known-answer tests
    /// (ignored outside tests: a nonce is never chosen).
    fn encode_nonce(
        &mut self,
        id: ChunkId,
        plain: &[u8],
        fixed_nonce: Option<&[u8; crate::crypto::seal::NONCE_LEN]>,
    ) -> Result<Vec<u8>, RecordError> {
        check_limit("plain length", plain.len(), MAX_PLAIN_LEN)?;
        let mut codec = Codec::Raw;
        if let Some(z) = self.zstd.as_mut() {
            // zstd writes into the scratch's spare capacity (no zeroing).
            self.scratch.clear();
            self.scratch
                .reserve(zstd::zstd_safe::compress_bound(plain.len()));
            if let Ok(n) = z.compress_to_buffer(plain, &mut self.scratch)
                && n < plain.len()
            {
                codec = Codec::Zstd;
            }
        }
        let payload: &[u8] = match codec {
            Codec::Zstd => &self.scratch,
            Codec::Raw => plain,
        };
        let overhead = if self.keys.is_some() { OVERHEAD } else { 0 };
        let mut header = RecordHeader {
            codec,
            sealed: self.keys.as_ref().map(|k| k.cipher()),
            plain_len: plain.len() as u32,
            stored_len: (payload.len() + overhead) as u32,
            id,
            data_crc: 0,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + overhead);
        out.resize(HEADER_LEN, 0);
        match &self.keys {
            None => out.extend_from_slice(payload),
            Some(k) => {
                let ad = header.to_bytes();
                let ad = ad.get(..AD_LEN).unwrap_or_default();
                let sealed = match fixed_nonce {
                    None => k.records().seal_into(ad, payload, &mut out),
                    #[cfg(test)]
                    Some(n) => k.records().seal_with_nonce(n, ad, payload, &mut out),
                    #[cfg(not(test))]
                    Some(_) => k.records().seal_into(ad, payload, &mut out),
                };
                sealed.map_err(|e| RecordError::Seal(e.to_string()))?;
            }
        }
        let stored = out.get(HEADER_LEN..).unwrap_or_default();
        header.data_crc = crc32fast::hash(stored);
        put(&mut out, 0, &header.to_bytes());
        Ok(out)
    }
}

/// Decodes a complete record (header and payload) and returns its header
/// and plaintext. Verifies both checksums, the decompressed length and the
/// BLAKE3 id. Never panics, whatever `bytes` holds.
pub fn decode(bytes: &[u8]) -> Result<(RecordHeader, Vec<u8>), RecordError> {
    let header = RecordHeader::parse(bytes)?;
    let end = HEADER_LEN + header.stored_len as usize;
    let payload = bytes.get(HEADER_LEN..end).ok_or(RecordError::Truncated {
        needed: end,
        available: bytes.len(),
    })?;
    let plain = decode_payload(&header, payload)?;
    Ok((header, plain))
}

/// Checks a payload against its (already parsed) header and returns the
/// plaintext.
pub fn decode_payload(header: &RecordHeader, payload: &[u8]) -> Result<Vec<u8>, RecordError> {
    let mut plain = Vec::new();
    RecordDecoder::default().decode_payload_into(header, payload, &mut plain)?;
    Ok(plain)
}

/// Reusable decoding state (a zstd context); keep one per worker thread
/// and decode into a reused buffer, so reading many chunks allocates
/// nothing per chunk.
#[derive(Default)]
pub struct RecordDecoder {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// An encrypted vault's keys: records must be sealed with them.
    keys: Option<Arc<VaultKeys>>,
    /// Where a sealed payload is opened into.
    opened: Vec<u8>,
}

impl RecordDecoder {
    /// Makes this decoder one of the vault whose keys are `keys` (a reused
    /// buffer may meet several vaults).
    pub fn use_keys(&mut self, keys: Option<&Arc<VaultKeys>>) {
        let same = match (&self.keys, keys) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if !same {
            self.keys = keys.cloned();
        }
    }

    /// A decoder for a vault: with `keys` (an encrypted vault), only
    /// records sealed with them are accepted; without, only plaintext.
    pub fn for_vault(keys: Option<Arc<VaultKeys>>) -> Self {
        RecordDecoder {
            keys,
            ..Self::default()
        }
    }

    /// Checks a payload against its header and leaves the plaintext in
    /// `out` (whose previous content is discarded): data CRC, the seal
    /// (an encrypted vault's), bounded decompression, exact plain length,
    /// the id (BLAKE3, keyed in an encrypted vault).
    pub fn decode_payload_into(
        &mut self,
        header: &RecordHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let RecordDecoder { zstd, keys, opened } = self;
        let payload = open_payload(keys.as_ref(), opened, header, payload)?;
        out.clear();
        match header.codec {
            Codec::Raw => out.extend_from_slice(payload),
            Codec::Zstd => {
                out.reserve(header.plain_len as usize);
                let z = match zstd.as_mut() {
                    Some(z) => z,
                    None => zstd.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| RecordError::Decompress(e.to_string()))?,
                    ),
                };
                // Writes at most `out.capacity()` bytes; a frame that
                // inflates past the header's length is caught below.
                let got = z
                    .decompress_to_buffer(payload, out)
                    .map_err(|e| RecordError::Decompress(e.to_string()))?;
                check_plain_len(header, got)?;
            }
        }
        self.check_id(header, out)
    }

    /// [`Self::decode_payload_into`] into `out`, a slice of exactly the
    /// header's plain length (no copy through a buffer of the decoder's):
    /// the same checks, and on any error `out` holds no meaning.
    pub fn decode_payload_into_slice(
        &mut self,
        header: &RecordHeader,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<(), RecordError> {
        if out.len() != header.plain_len as usize {
            return Err(RecordError::PlainLengthMismatch {
                expected: out.len(),
                got: header.plain_len as usize,
            });
        }
        // Split borrows: the opened payload lives in `self.opened`.
        let RecordDecoder { zstd, keys, opened } = self;
        let payload = open_payload(keys.as_ref(), opened, header, payload)?;
        match header.codec {
            Codec::Raw => {
                check_plain_len(header, payload.len())?;
                out.copy_from_slice(payload);
            }
            Codec::Zstd => {
                let z = match zstd.as_mut() {
                    Some(z) => z,
                    None => zstd.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| RecordError::Decompress(e.to_string()))?,
                    ),
                };
                // zstd writes at most `out.len()` bytes: a frame that
                // would inflate further is an error.
                let got = z
                    .decompress_to_buffer(payload, &mut *out)
                    .map_err(|e| RecordError::Decompress(e.to_string()))?;
                check_plain_len(header, got)?;
            }
        }
        self.check_id(header, out)
    }

    /// The plaintext's id (keyed in an encrypted vault) against the header's.
    fn check_id(&self, header: &RecordHeader, plain: &[u8]) -> Result<(), RecordError> {
        let id = match &self.keys {
            Some(k) => ChunkId(k.chunk_id(plain)),
            None => ChunkId::of(plain),
        };
        if id != header.id {
            return Err(RecordError::IdMismatch { computed: id });
        }
        Ok(())
    }
}

/// A decompressed length against the header's.
fn check_plain_len(header: &RecordHeader, got: usize) -> Result<(), RecordError> {
    let expected = header.plain_len as usize;
    if got != expected {
        return Err(RecordError::PlainLengthMismatch { expected, got });
    }
    Ok(())
}

/// Checks a stored payload's length and CRC and, when `keys` are given
/// (an encrypted vault), opens its seal into `opened`: returns the bytes
/// to decompress.
fn open_payload<'p>(
    keys: Option<&Arc<VaultKeys>>,
    opened: &'p mut Vec<u8>,
    header: &RecordHeader,
    payload: &'p [u8],
) -> Result<&'p [u8], RecordError> {
    if payload.len() != header.stored_len as usize {
        return Err(RecordError::Truncated {
            needed: header.stored_len as usize,
            available: payload.len(),
        });
    }
    let computed = crc32fast::hash(payload);
    if computed != header.data_crc {
        return Err(RecordError::DataChecksum {
            stored: header.data_crc,
            computed,
        });
    }
    match (header.sealed, keys) {
        (None, None) => Ok(payload),
        (Some(c), None) => Err(RecordError::Sealed(c)),
        (None, Some(_)) => Err(RecordError::NotSealed),
        (Some(found), Some(k)) => {
            if found != k.cipher() {
                return Err(RecordError::CipherMismatch {
                    found,
                    vault: k.cipher(),
                });
            }
            let ad = header.to_bytes();
            opened.clear();
            k.records()
                .open_into(
                    ad.get(..AD_LEN).unwrap_or_default(),
                    payload,
                    opened,
                    &|| String::new(),
                )
                .map_err(|_| RecordError::Unauthentic)?;
            Ok(opened)
        }
    }
}

/// The fuzz entry point (also replayed over the seed corpus by `make
/// test`): decodes arbitrary bytes; a record that decodes must describe its
/// plaintext exactly. Returns whether the bytes were a valid record.
pub fn fuzz_entry(data: &[u8]) -> bool {
    match decode(data) {
        Ok((header, plain)) => {
            assert_eq!(plain.len(), header.plain_len as usize);
            assert_eq!(ChunkId::of(&plain), header.id);
            true
        }
        Err(_) => false,
    }
}

/// The fixed test keys of the sealed-record fuzz target and its seeds.
pub fn fuzz_keys(cipher: Cipher) -> Arc<VaultKeys> {
    Arc::new(VaultKeys::derive(
        &crate::crypto::MasterKey::from_bytes([0x42; 32]),
        cipher,
    ))
}

/// The sealed-record fuzz entry point (also replayed over its seed
/// corpus): decodes arbitrary bytes as a sealed chunk record of a vault
/// of each cipher, with `keys` ([`fuzz_keys`] of AES-256-GCM and
/// XChaCha20-Poly1305). What opens must describe its plaintext exactly.
/// Returns the ciphers it opened with (at most one).
pub fn fuzz_sealed_entry(keys: &[Arc<VaultKeys>], data: &[u8]) -> Vec<Cipher> {
    let Ok(header) = RecordHeader::parse(data) else {
        return Vec::new();
    };
    let end = HEADER_LEN + header.stored_len as usize;
    let Some(payload) = data.get(HEADER_LEN..end) else {
        return Vec::new();
    };
    let mut opened = Vec::new();
    let mut out = Vec::new();
    for k in keys {
        let mut dec = RecordDecoder::for_vault(Some(k.clone()));
        if dec.decode_payload_into(&header, payload, &mut out).is_ok() {
            assert_eq!(out.len(), header.plain_len as usize);
            assert_eq!(ChunkId(k.chunk_id(&out)), header.id);
            assert_eq!(header.sealed, Some(k.cipher()));
            opened.push(k.cipher());
        }
    }
    // A plain decoder never takes a sealed record.
    assert!(header.sealed.is_none() || decode(data).is_err());
    opened
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(level: i32, data: &[u8]) -> Vec<u8> {
        RecordEncoder::new(level)
            .encode(ChunkId::of(data), data)
            .unwrap()
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..70_000), level in 0i32..4) {
            let rec = encode(level, &data);
            let (h, plain) = decode(&rec).unwrap();
            prop_assert_eq!(plain, data.clone());
            prop_assert_eq!(h.plain_len as usize, data.len());
            prop_assert_eq!(h.record_len() as usize, rec.len());
        }

        #[test]
        fn any_single_byte_flip_is_detected(data in proptest::collection::vec(any::<u8>(), 1..5000), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut rec = encode(1, &data);
            let i = pos.index(rec.len());
            rec[i] ^= 1 << bit;
            prop_assert!(decode(&rec).is_err());
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn compressible_data_is_compressed_and_random_is_raw() {
        let zeros = vec![7u8; 65536];
        let rec = encode(1, &zeros);
        assert_eq!(RecordHeader::parse(&rec).unwrap().codec, Codec::Zstd);
        assert!(rec.len() < 1000);
        let noise: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let h = RecordHeader::parse(&encode(1, &noise)).unwrap();
        assert!(h.stored_len <= h.plain_len);
    }

    #[test]
    fn lying_length_fields_are_rejected() {
        let mut rec = encode(0, b"hello");
        // Claim a payload of 4 GiB - 1: must be refused before any use.
        rec[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32fast::hash(&rec[..52]);
        rec[52..56].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(&rec),
            Err(RecordError::LengthTooLarge { .. })
        ));
    }

    #[test]
    fn truncated_record_is_reported() {
        let rec = encode(1, &[1u8; 1000]);
        let err = decode(&rec[..rec.len() - 1]).unwrap_err();
        assert!(matches!(err, RecordError::Truncated { .. }), "{err}");
    }

    mod sealed {
        use super::*;
        use crate::crypto::MasterKey;

        fn keys(cipher: Cipher) -> Arc<VaultKeys> {
            Arc::new(VaultKeys::derive(
                &MasterKey::from_bytes(std::array::from_fn(|i| i as u8)),
                cipher,
            ))
        }

        fn vault_decode(keys: Option<Arc<VaultKeys>>, rec: &[u8]) -> Result<Vec<u8>, RecordError> {
            let h = RecordHeader::parse(rec)?;
            let mut out = Vec::new();
            RecordDecoder::for_vault(keys).decode_payload_into(&h, &rec[HEADER_LEN..], &mut out)?;
            Ok(out)
        }

        /// Known answer: one sealed record, byte for byte (computed
        /// independently with Python's blake3 and libsodium through PyNaCl).
        #[test]
        fn one_sealed_record_is_the_known_one() {
            let k = keys(Cipher::XChaCha20Poly1305);
            let mut enc = RecordEncoder::for_vault(0, Some(k.clone()));
            let plain = b"coffre sealed record";
            let id = enc.chunk_id(plain);
            let nonce: [u8; 24] = std::array::from_fn(|i| 0xa0 + i as u8);
            let rec = enc.encode_nonce(id, plain, Some(&nonce)).unwrap();
            assert_eq!(
                hex::encode(&rec),
                "4346434b02000200140000003c000000b8c038fa8983ef023295a83db22fa31e3ca651f4d389e048b89280675fdb03dcaa130004d3df3284a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b771f03a6994085b4465beba89e56265e5a1b2252ac6a3886e3e6fa3b117ca9693244c9633"
            );
            assert_eq!(vault_decode(Some(k), &rec).unwrap(), plain);
        }

        proptest! {
            #[test]
            fn sealed_round_trip_and_every_flip_fails(
                data in proptest::collection::vec(any::<u8>(), 0..20_000),
                level in 0i32..3,
                aes in any::<bool>(),
                pos in any::<prop::sample::Index>(),
                bit in 0u8..8,
            ) {
                let cipher = if aes { Cipher::Aes256Gcm } else { Cipher::XChaCha20Poly1305 };
                let k = keys(cipher);
                let mut enc = RecordEncoder::for_vault(level, Some(k.clone()));
                let rec = enc.encode(enc.chunk_id(&data), &data).unwrap();
                prop_assert!(record_intact(&rec, None));
                prop_assert_eq!(vault_decode(Some(k.clone()), &rec).unwrap(), data.clone());
                let mut bad = rec.clone();
                let i = pos.index(bad.len());
                bad[i] ^= 1 << bit;
                prop_assert!(vault_decode(Some(k), &bad).is_err());
            }
        }

        #[test]
        fn the_wrong_kind_of_record_or_key_is_refused() {
            let k = keys(Cipher::Aes256Gcm);
            let data = vec![5u8; 4096];
            let mut enc = RecordEncoder::for_vault(1, Some(k.clone()));
            let sealed = enc.encode(enc.chunk_id(&data), &data).unwrap();
            // Without the key; plaintext in an encrypted vault.
            assert!(matches!(
                vault_decode(None, &sealed),
                Err(RecordError::Sealed(_))
            ));
            assert!(matches!(decode(&sealed), Err(RecordError::Sealed(_))));
            let plain = RecordEncoder::new(1)
                .encode(ChunkId::of(&data), &data)
                .unwrap();
            assert!(matches!(
                vault_decode(Some(k.clone()), &plain),
                Err(RecordError::NotSealed)
            ));
            // Another vault's key; another cipher.
            let other = Arc::new(VaultKeys::derive(
                &MasterKey::from_bytes([9; 32]),
                Cipher::Aes256Gcm,
            ));
            assert!(matches!(
                vault_decode(Some(other), &sealed),
                Err(RecordError::Unauthentic)
            ));
            assert!(matches!(
                vault_decode(Some(keys(Cipher::XChaCha20Poly1305)), &sealed),
                Err(RecordError::CipherMismatch { .. })
            ));
            // Another chunk's id in the header (CRC fixed): the seal binds it.
            let mut swapped = sealed.clone();
            swapped[16..48].copy_from_slice(&[1u8; 32]);
            let crc = crc32fast::hash(&swapped[..52]);
            swapped[52..56].copy_from_slice(&crc.to_le_bytes());
            assert!(matches!(
                vault_decode(Some(k.clone()), &swapped),
                Err(RecordError::Unauthentic)
            ));
            // The keyed id is not the plain BLAKE3 of the data.
            assert_ne!(RecordHeader::parse(&sealed).unwrap().id, ChunkId::of(&data));
            // No plaintext: 4 KiB of a known pattern does not appear.
            let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut raw = RecordEncoder::for_vault(0, Some(k));
            let rec = raw.encode(raw.chunk_id(&pattern), &pattern).unwrap();
            assert!(
                !rec.windows(64)
                    .any(|w| pattern.windows(64).next() == Some(w))
            );
        }

        #[test]
        fn a_forged_payload_with_fixed_crcs_is_intact_but_not_authentic() {
            let k = keys(Cipher::Aes256Gcm);
            let data = vec![7u8; 8192];
            let mut enc = RecordEncoder::for_vault(1, Some(k.clone()));
            let id = enc.chunk_id(&data);
            let rec = enc.encode(id, &data).unwrap();
            let mut scratch = Vec::new();
            assert!(record_authentic(&rec, Some(&id), Some(&k), &mut scratch));
            // One payload bit flipped, the data CRC fixed up.
            let mut forged = rec.clone();
            let last = forged.len() - 1;
            forged[last] ^= 1;
            let crc = crc32fast::hash(&forged[HEADER_LEN..]);
            forged[48..52].copy_from_slice(&crc.to_le_bytes());
            let hcrc = crc32fast::hash(&forged[..52]);
            forged[52..56].copy_from_slice(&hcrc.to_le_bytes());
            assert!(record_intact(&forged, Some(&id)));
            assert!(!record_authentic(
                &forged,
                Some(&id),
                Some(&k),
                &mut scratch
            ));
            // A sealed record in a plain vault, a plain one in an encrypted
            // vault, another cipher: none is taken.
            assert!(!record_authentic(&rec, Some(&id), None, &mut scratch));
            let plain = RecordEncoder::new(1)
                .encode(ChunkId::of(&data), &data)
                .unwrap();
            assert!(record_authentic(&plain, None, None, &mut scratch));
            assert!(!record_authentic(&plain, None, Some(&k), &mut scratch));
            let chacha = keys(Cipher::XChaCha20Poly1305);
            assert!(!record_authentic(
                &rec,
                Some(&id),
                Some(&chacha),
                &mut scratch
            ));
        }
    }
}
