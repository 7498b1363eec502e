//! The values of the vault index (`FORMAT.md`, "Index"): a chunk's
//! location, a segment's entry, a chunk's reference count. Pure codecs, no
//! RocksDB, so the fuzz targets (built without RocksDB) call exactly these.
//! Every decoder takes bytes read from disk and checks their length and
//! version before it reads a field.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

const LOCATION_VERSION: u8 = 1;
const LOCATION_LEN: usize = 25;
const SEGMENT_VALUE_V1: u8 = 1;
const SEGMENT_VALUE_V2: u8 = 2;
const REF_VALUE_VERSION: u8 = 1;

/// Where a chunk's record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// Segment id.
    pub segment: u64,
    /// Offset of the record in the segment.
    pub offset: u64,
    /// Record length (header and payload).
    pub len: u32,
    /// Plaintext length.
    pub plain_len: u32,
}

impl ChunkLocation {
    /// Encodes as version byte + fixed little-endian fields.
    pub fn encode(&self) -> [u8; LOCATION_LEN] {
        let mut v = [0u8; LOCATION_LEN];
        let parts: [&[u8]; 5] = [
            &[LOCATION_VERSION],
            &self.segment.to_le_bytes(),
            &self.offset.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.plain_len.to_le_bytes(),
        ];
        let mut at = 0;
        for p in parts {
            if let Some(dst) = v.get_mut(at..at + p.len()) {
                dst.copy_from_slice(p);
            }
            at += p.len();
        }
        v
    }

    /// Decodes; `None` if the bytes are not a valid location.
    pub fn decode(v: &[u8]) -> Option<Self> {
        if v.len() != LOCATION_LEN || v.first() != Some(&LOCATION_VERSION) {
            return None;
        }
        let loc = ChunkLocation {
            segment: u64::from_le_bytes(v.get(1..9)?.try_into().ok()?),
            offset: u64::from_le_bytes(v.get(9..17)?.try_into().ok()?),
            len: u32::from_le_bytes(v.get(17..21)?.try_into().ok()?),
            plain_len: u32::from_le_bytes(v.get(21..25)?.try_into().ok()?),
        };
        // The length sizes a read buffer and the end a range: only a
        // record's possible lengths, and no end past `u64::MAX`.
        let len = usize::try_from(loc.len).ok()?;
        if !(crate::format::record::HEADER_LEN
            ..=crate::format::record::HEADER_LEN + crate::format::record::MAX_STORED_LEN)
            .contains(&len)
            || loc.offset.checked_add(u64::from(loc.len)).is_none()
        {
            return None;
        }
        Some(loc)
    }
}

/// What a segment's entry in `segments` records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Committed length: bytes past it are garbage of a failed session.
    pub committed: u64,
    /// Bytes of records GC has unindexed (dead) inside the committed part.
    pub dead: u64,
    /// The segment was emptied or rewritten by GC; its file is deleted (or
    /// about to be). Its id is never reused.
    pub retired: bool,
}

impl SegmentInfo {
    /// Live bytes: records some chunk entry references (committed bytes
    /// minus the header and the dead records).
    pub fn live(&self) -> u64 {
        if self.retired {
            0
        } else {
            self.committed
                .saturating_sub(crate::format::segment::SEGMENT_HEADER_LEN)
                .saturating_sub(self.dead)
        }
    }

    /// Encodes as version 2.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![SEGMENT_VALUE_V2];
        v.extend_from_slice(&self.committed.to_le_bytes());
        v.extend_from_slice(&self.dead.to_le_bytes());
        v.push(u8::from(self.retired));
        v
    }

    /// Decodes version 1 or 2; `None` if the bytes are not a valid entry.
    pub fn decode(v: &[u8]) -> Option<Self> {
        let u = |r: std::ops::Range<usize>| -> Option<u64> {
            Some(u64::from_le_bytes(v.get(r)?.try_into().ok()?))
        };
        match *v.first()? {
            SEGMENT_VALUE_V1 if v.len() == 9 => Some(SegmentInfo {
                committed: u(1..9)?,
                ..SegmentInfo::default()
            }),
            SEGMENT_VALUE_V2 if v.len() == 18 => Some(SegmentInfo {
                committed: u(1..9)?,
                dead: u(9..17)?,
                retired: match v.get(17)? {
                    0 => false,
                    1 => true,
                    _ => return None,
                },
            }),
            _ => None,
        }
    }
}

/// What kind of content a chunk holds; GC follows node references.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkKind {
    /// Image data.
    Data,
    /// A block-map leaf (references data chunks).
    Leaf,
    /// A block-map root (references leaves).
    Root,
}

/// A chunk's reference count: how many points (for roots), roots (for
/// leaves) or leaf entries (for data) refer to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefEntry {
    /// Kind of the chunk.
    pub kind: ChunkKind,
    /// Number of references.
    pub count: u64,
}

impl RefEntry {
    /// Encodes as version byte, kind byte, little-endian count.
    pub fn encode(&self) -> [u8; 10] {
        let kind = match self.kind {
            ChunkKind::Data => 0,
            ChunkKind::Leaf => 1,
            ChunkKind::Root => 2,
        };
        let c = self.count.to_le_bytes();
        [
            REF_VALUE_VERSION,
            kind,
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            c[6],
            c[7],
        ]
    }

    /// Decodes; `None` if the bytes are not a valid entry.
    pub fn decode(v: &[u8]) -> Option<Self> {
        if v.len() != 10 || v.first() != Some(&REF_VALUE_VERSION) {
            return None;
        }
        let kind = match v.get(1)? {
            0 => ChunkKind::Data,
            1 => ChunkKind::Leaf,
            2 => ChunkKind::Root,
            _ => return None,
        };
        Some(RefEntry {
            kind,
            count: u64::from_le_bytes(v.get(2..10)?.try_into().ok()?),
        })
    }
}

/// The `index_value` fuzz target's body: each decoder on `data`; what
/// decodes must encode back to the same bytes (a version-1 segment entry
/// comes back as version 2 with the same fields). Returns how many of
/// the three decoders accepted `data`.
pub fn fuzz_entry(data: &[u8]) -> usize {
    let mut accepted = 0;
    if let Some(loc) = ChunkLocation::decode(data) {
        assert_eq!(loc.encode().as_slice(), data);
        accepted += 1;
    }
    if let Some(info) = SegmentInfo::decode(data) {
        assert_eq!(SegmentInfo::decode(&info.encode()), Some(info));
        if data.first() == Some(&SEGMENT_VALUE_V2) {
            assert_eq!(info.encode(), data);
        }
        let _ = info.live();
        accepted += 1;
    }
    if let Some(r) = RefEntry::decode(data) {
        assert_eq!(r.encode().as_slice(), data);
        accepted += 1;
    }
    accepted
}
