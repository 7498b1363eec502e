//! The manifest's binary codec: little-endian fields, the header, the
//! entries and the trailer, each decoded with every length bounded.

use coffre_vault_store::ChunkId;

use super::{
    ENTRY_LEN, MAX_META_LEN, PackLoc, SNAP_END, SNAP_HEADER_LEN, SNAP_MAGIC, SNAP_VERSION,
    SNAP_VERSION_SEALED, SnapEntry, SnapHeader, SnapKind, SnapTrailer,
};

pub(super) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

pub(super) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

pub(super) fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(at..at + v.len()) {
        d.copy_from_slice(v);
    }
}

impl SnapHeader {
    pub(super) fn encode(&self, sealed: bool) -> [u8; SNAP_HEADER_LEN] {
        let mut h = [0u8; SNAP_HEADER_LEN];
        let version = if sealed {
            SNAP_VERSION_SEALED
        } else {
            SNAP_VERSION
        };
        put(&mut h, 0, &SNAP_MAGIC);
        put(&mut h, 8, &version.to_le_bytes());
        put(&mut h, 12, &[self.kind.code()]);
        put(&mut h, 16, &self.block_size.to_le_bytes());
        put(&mut h, 24, &self.image_size.to_le_bytes());
        put(&mut h, 32, &self.blocks.to_le_bytes());
        put(&mut h, 40, &self.created_s.to_le_bytes());
        put(&mut h, 48, &self.created_ns.to_le_bytes());
        let crc = crc32fast::hash(h.get(..56).unwrap_or_default());
        put(&mut h, 56, &crc.to_le_bytes());
        h
    }

    /// The header, and whether the manifest is sealed.
    pub(super) fn decode(h: &[u8]) -> std::result::Result<(Self, bool), String> {
        if h.len() < SNAP_HEADER_LEN {
            return Err("header truncated".into());
        }
        if h.get(..8) != Some(&SNAP_MAGIC[..]) {
            return Err("bad magic (not a coffre snapshot)".into());
        }
        let version = le_u32(h, 8);
        let sealed = version == SNAP_VERSION_SEALED;
        if version != SNAP_VERSION && !sealed {
            return Err(format!(
                "unsupported version {version} (this coffre reads version {SNAP_VERSION}{})",
                if version < SNAP_VERSION {
                    "; a snapshot of an older coffre holds no data and expires at the next prune"
                } else {
                    ""
                }
            ));
        }
        if crc32fast::hash(h.get(..56).unwrap_or_default()) != le_u32(h, 56) {
            return Err("header checksum mismatch".into());
        }
        if h.get(13..16) != Some(&[0u8; 3][..])
            || le_u32(h, 20) != 0
            || le_u32(h, 52) != 0
            || le_u32(h, 60) != 0
        {
            return Err("reserved header bytes are not zero".into());
        }
        let kind = h
            .get(12)
            .and_then(|&c| SnapKind::from_code(c))
            .ok_or("unknown snapshot kind")?;
        let header = SnapHeader {
            kind,
            block_size: le_u32(h, 16),
            image_size: le_u64(h, 24),
            blocks: le_u64(h, 32),
            created_s: le_u64(h, 40) as i64,
            created_ns: le_u32(h, 48),
        };
        if header.created_ns >= 1_000_000_000 {
            return Err("bad capture instant".into());
        }
        // The block size sizes buffers (`vec![0; block_size]`) and
        // divides: only the sizes a vault accepts.
        if coffre_vault_store::format::config::validate_block_size(header.block_size).is_err() {
            return Err(format!(
                "block size {} is not a power of two from 64 KiB to 4 MiB",
                header.block_size
            ));
        }
        if kind == SnapKind::Clone && header.blocks != 0 {
            return Err("a clone snapshot with entries".into());
        }
        Ok((header, sealed))
    }
}

impl SnapEntry {
    pub(super) fn encode_into(&self, out: &mut Vec<u8>) {
        match self.id {
            None => out.extend_from_slice(&[0u8; ENTRY_LEN]),
            Some(id) => {
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(&self.loc.pack.to_le_bytes());
                out.extend_from_slice(&self.loc.flags.to_le_bytes());
                out.extend_from_slice(&self.loc.len.to_le_bytes());
                out.extend_from_slice(&self.loc.offset.to_le_bytes());
            }
        }
    }

    pub(super) fn decode(b: &[u8], packs: usize) -> std::result::Result<Self, String> {
        let idb = b.get(..32).ok_or("entry truncated")?;
        if b.iter().all(|&x| x == 0) {
            return Ok(SnapEntry::default());
        }
        let id = ChunkId::from_slice(idb).ok_or("entry truncated")?;
        let pack = le_u32(b, 32) as u16;
        let loc = PackLoc {
            pack,
            flags: (le_u32(b, 32) >> 16) as u16,
            len: le_u32(b, 36),
            offset: le_u64(b, 40),
        };
        if usize::from(pack) >= packs {
            return Err(format!("entry names pack {pack} of {packs}"));
        }
        if loc.len == 0 {
            return Err("entry of a data block with no record".into());
        }
        if loc.offset.checked_add(u64::from(loc.len)).is_none() {
            return Err(format!(
                "entry's record at {} + {} runs past the largest offset",
                loc.offset, loc.len
            ));
        }
        Ok(SnapEntry { id: Some(id), loc })
    }
}

pub(super) fn decode_trailer(t: &[u8]) -> std::result::Result<(SnapTrailer, usize), String> {
    if t.get(..8) != Some(&SNAP_END[..]) {
        return Err("bad trailer".into());
    }
    if crc32fast::hash(t.get(..28).unwrap_or_default()) != le_u32(t, 28) {
        return Err("trailer checksum mismatch".into());
    }
    let meta_len = le_u32(t, 24) as usize;
    if meta_len > MAX_META_LEN + coffre_vault_store::crypto::seal::OVERHEAD {
        return Err(format!("metadata of {meta_len} bytes is too large"));
    }
    Ok((
        SnapTrailer {
            entries: le_u64(t, 8),
            stored_bytes: le_u64(t, 16),
        },
        meta_len,
    ))
}
