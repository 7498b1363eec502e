//! The checksummed envelope of small state files (the vault config, job
//! records, the host registry): magic, version, body length, JSON body,
//! CRC-32 (`FORMAT.md`, "Vault config" and "Envelope").
//! The decoder checks every field and never trusts the length.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

/// Largest body an envelope may carry.
pub const MAX_ENVELOPE_BODY: usize = 1 << 20;

/// Why envelope bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    #[error("file too short ({0} bytes)")]
    Truncated(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("version {found} is not supported (this coffre reads 1 to {supported})")]
    Version { found: u32, supported: u32 },
    #[error("body length {len} exceeds {max}")]
    BadLength { len: usize, max: usize },
    #[error("body of {0} bytes is truncated")]
    BodyTruncated(usize),
    #[error("checksum missing")]
    ChecksumMissing,
    #[error("trailing bytes after checksum")]
    TrailingBytes,
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
}

/// Wraps `body` in an envelope.
pub fn encode(magic: &[u8; 8], version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 20);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The version field of envelope bytes, unchecked (what a file claims).
pub fn claimed_version(bytes: &[u8]) -> Option<u32> {
    le_u32(bytes, 8)
}

/// Checks an envelope and returns its version and body. The magic is
/// checked first and the version before anything else, so a file of a
/// newer version is reported as such whatever else it holds; a body may
/// be at most `max_body` bytes.
pub fn decode<'a>(
    magic: &[u8; 8],
    supported: u32,
    max_body: usize,
    bytes: &'a [u8],
) -> Result<(u32, &'a [u8]), EnvelopeError> {
    let short = || EnvelopeError::Truncated(bytes.len());
    if bytes.get(..8).ok_or_else(short)? != magic {
        return Err(EnvelopeError::BadMagic);
    }
    let version = le_u32(bytes, 8).ok_or_else(short)?;
    if version == 0 || version > supported {
        return Err(EnvelopeError::Version {
            found: version,
            supported,
        });
    }
    let len = le_u32(bytes, 12).ok_or_else(short)? as usize;
    if len > max_body {
        return Err(EnvelopeError::BadLength { len, max: max_body });
    }
    let body = bytes
        .get(16..16 + len)
        .ok_or(EnvelopeError::BodyTruncated(len))?;
    let stored = le_u32(bytes, 16 + len).ok_or(EnvelopeError::ChecksumMissing)?;
    if bytes.len() != 20 + len {
        return Err(EnvelopeError::TrailingBytes);
    }
    let computed = crc32fast::hash(bytes.get(..16 + len).unwrap_or_default());
    if stored != computed {
        return Err(EnvelopeError::Checksum { stored, computed });
    }
    Ok((version, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let m = *b"TESTMAG\0";
        let e = encode(&m, 1, b"{\"a\":1}");
        assert_eq!(decode(&m, 1, 64, &e), Ok((1, &b"{\"a\":1}"[..])));
        for cut in 0..e.len() {
            assert!(decode(&m, 1, 64, &e[..cut]).is_err());
        }
        for i in 0..e.len() {
            let mut d = e.clone();
            d[i] ^= 0x40;
            assert!(decode(&m, 1, 64, &d).is_err(), "flip at {i}");
        }
        assert!(matches!(
            decode(&m, 0, 64, &e),
            Err(EnvelopeError::Version { found: 1, .. })
        ));
        assert_eq!(
            decode(&m, 1, 3, &e),
            Err(EnvelopeError::BadLength { len: 7, max: 3 })
        );
    }
}
