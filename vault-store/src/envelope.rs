//! The checksummed envelope of small state files (job records): magic,
//! version, body length, JSON body, CRC-32 (`FORMAT.md`, "Envelope").
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
    #[error("version {found} is not supported (this coffre reads up to {supported})")]
    Version { found: u32, supported: u32 },
    #[error("body length {0} is out of bounds")]
    BadLength(usize),
    #[error("checksum mismatch")]
    Checksum,
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

/// Checks an envelope and returns its version and body.
pub fn decode<'a>(
    magic: &[u8; 8],
    supported: u32,
    bytes: &'a [u8],
) -> Result<(u32, &'a [u8]), EnvelopeError> {
    if bytes.len() < 20 {
        return Err(EnvelopeError::Truncated(bytes.len()));
    }
    if bytes.get(..8) != Some(&magic[..]) {
        return Err(EnvelopeError::BadMagic);
    }
    let version = le_u32(bytes, 8).ok_or(EnvelopeError::Truncated(bytes.len()))?;
    if version == 0 || version > supported {
        return Err(EnvelopeError::Version {
            found: version,
            supported,
        });
    }
    let len = le_u32(bytes, 12).ok_or(EnvelopeError::Truncated(bytes.len()))? as usize;
    if len > MAX_ENVELOPE_BODY || bytes.len() != 20 + len {
        return Err(EnvelopeError::BadLength(len));
    }
    let stored = le_u32(bytes, 16 + len).ok_or(EnvelopeError::BadLength(len))?;
    let head = bytes.get(..16 + len).ok_or(EnvelopeError::BadLength(len))?;
    if crc32fast::hash(head) != stored {
        return Err(EnvelopeError::Checksum);
    }
    let body = bytes
        .get(16..16 + len)
        .ok_or(EnvelopeError::BadLength(len))?;
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
        assert_eq!(decode(&m, 1, &e), Ok((1, &b"{\"a\":1}"[..])));
        for cut in 0..e.len() {
            assert!(decode(&m, 1, &e[..cut]).is_err());
        }
        for i in 0..e.len() {
            let mut d = e.clone();
            d[i] ^= 0x40;
            assert!(decode(&m, 1, &d).is_err(), "flip at {i}");
        }
        assert!(matches!(
            decode(&m, 0, &e),
            Err(EnvelopeError::Version { found: 1, .. })
        ));
    }
}
