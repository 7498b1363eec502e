//! The block map of a recovery point: block index → chunk id (or zero).
//!
//! The map is a two-level Merkle-style tree. Leaves hold the entries of
//! [`LEAF_ENTRIES`] consecutive blocks; the root holds the ids of the
//! leaves, plus the image size and block size. Leaves and root are stored
//! as ordinary content-addressed chunks, so a leaf that did not change
//! since the previous point is the same chunk and costs nothing: an
//! incremental point stores only the leaves its changes touched. Every
//! point still restores on its own, from its root.
//!
//! Node layout (`FORMAT.md`, "Block map node"): a 24-byte header, 32-byte
//! entries, a crc32 trailer. The decoder checks every field against hard
//! limits and never panics (fuzzed by `fuzz/fuzz_targets/block_map.rs`).
//! The engine builds maps with [`BlockMapBuilder`] and walks them with its
//! `reader` module; this crate only owns the bytes.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use crate::format::chunk_id::ChunkId;
use crate::format::record::MAX_PLAIN_LEN;

/// Node magic. Frozen.
pub const NODE_MAGIC: [u8; 4] = *b"CFBM";
/// Node format version.
pub const NODE_VERSION: u16 = 1;
/// Header length.
pub const NODE_HEADER_LEN: usize = 24;
/// Blocks per leaf.
pub const LEAF_ENTRIES: usize = 1024;
/// Most leaves a root may list (it must fit one chunk).
pub const MAX_ROOT_ENTRIES: usize = (MAX_PLAIN_LEN - NODE_HEADER_LEN - 4) / 32;

const KIND_LEAF: u8 = 1;
const KIND_ROOT: u8 = 2;
const ZERO: [u8; 32] = [0u8; 32];

/// One block's entry: `None` for a hole or an all-zero block.
pub type Entry = Option<ChunkId>;

/// A decoded node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// Entries of blocks `first_block..first_block + entries.len()`.
    Leaf {
        first_block: u64,
        entries: Vec<Entry>,
    },
    /// The root: image geometry and the leaf ids, in order.
    Root {
        image_size: u64,
        block_size: u32,
        leaves: Vec<ChunkId>,
    },
}

/// Why node bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("node truncated: {0} bytes")]
    Truncated(usize),
    #[error("bad node magic")]
    BadMagic,
    #[error("unsupported node version {0}")]
    UnsupportedVersion(u16),
    #[error("unknown node kind {0}")]
    UnknownKind(u8),
    #[error("reserved node bytes are not zero")]
    ReservedNotZero,
    #[error("node has {count} entries, at most {max} allowed")]
    TooManyEntries { count: usize, max: usize },
    #[error("node length {len} does not match {count} entries")]
    LengthMismatch { len: usize, count: usize },
    #[error("node checksum mismatch")]
    Checksum,
    #[error("leaf starts at block {0}, which is not a multiple of {LEAF_ENTRIES}")]
    Misaligned(u64),
    #[error(
        "root of a {image_size}-byte image with {block_size}-byte blocks needs {expected} leaves, has {found}"
    )]
    WrongLeafCount {
        image_size: u64,
        block_size: u32,
        expected: u64,
        found: usize,
    },
    #[error("invalid block size {0}")]
    BadBlockSize(u32),
    #[error("a root may not list a zero leaf id")]
    ZeroLeaf,
}

/// Number of blocks of an image.
pub fn block_count(image_size: u64, block_size: u32) -> u64 {
    image_size.div_ceil(u64::from(block_size.max(1)))
}

/// Number of leaves of an image's block map.
pub fn leaf_count(image_size: u64, block_size: u32) -> u64 {
    block_count(image_size, block_size).div_ceil(LEAF_ENTRIES as u64)
}

impl Node {
    /// Serialises the node.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, field, extra, ids): (u8, u64, u32, Vec<&[u8; 32]>) = match self {
            Node::Leaf {
                first_block,
                entries,
            } => (
                KIND_LEAF,
                *first_block,
                0,
                entries
                    .iter()
                    .map(|e| e.as_ref().map_or(&ZERO, |id| id.as_bytes()))
                    .collect(),
            ),
            Node::Root {
                image_size,
                block_size,
                leaves,
            } => (
                KIND_ROOT,
                *image_size,
                *block_size,
                leaves.iter().map(|id| id.as_bytes()).collect(),
            ),
        };
        let mut out = Vec::with_capacity(NODE_HEADER_LEN + 32 * ids.len() + 4);
        out.extend_from_slice(&NODE_MAGIC);
        out.extend_from_slice(&NODE_VERSION.to_le_bytes());
        out.push(kind);
        out.push(0);
        out.extend_from_slice(&field.to_le_bytes());
        out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        out.extend_from_slice(&extra.to_le_bytes());
        for id in ids {
            out.extend_from_slice(id);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and validates node bytes.
    pub fn decode(bytes: &[u8]) -> Result<Node, NodeError> {
        let h = bytes
            .get(..NODE_HEADER_LEN)
            .ok_or(NodeError::Truncated(bytes.len()))?;
        if h.get(..4) != Some(&NODE_MAGIC[..]) {
            return Err(NodeError::BadMagic);
        }
        let version = u16::from_le_bytes(arr(h, 4));
        if version != NODE_VERSION {
            return Err(NodeError::UnsupportedVersion(version));
        }
        let kind = h.get(6).copied().unwrap_or(0);
        if h.get(7) != Some(&0) {
            return Err(NodeError::ReservedNotZero);
        }
        let field = u64::from_le_bytes(arr(h, 8));
        let count = u32::from_le_bytes(arr(h, 16)) as usize;
        let extra = u32::from_le_bytes(arr(h, 20));
        let max = match kind {
            KIND_LEAF => LEAF_ENTRIES,
            KIND_ROOT => MAX_ROOT_ENTRIES,
            other => return Err(NodeError::UnknownKind(other)),
        };
        if count > max {
            return Err(NodeError::TooManyEntries { count, max });
        }
        let body_end = NODE_HEADER_LEN + 32 * count;
        if bytes.len() != body_end + 4 {
            return Err(NodeError::LengthMismatch {
                len: bytes.len(),
                count,
            });
        }
        let stored = u32::from_le_bytes(arr(bytes, body_end));
        if crc32fast::hash(bytes.get(..body_end).unwrap_or_default()) != stored {
            return Err(NodeError::Checksum);
        }
        let ids = bytes
            .get(NODE_HEADER_LEN..body_end)
            .unwrap_or_default()
            .chunks_exact(32);
        match kind {
            KIND_LEAF => {
                if extra != 0 {
                    return Err(NodeError::ReservedNotZero);
                }
                if field % LEAF_ENTRIES as u64 != 0 {
                    return Err(NodeError::Misaligned(field));
                }
                let entries = ids
                    .map(|b| {
                        if b == ZERO {
                            None
                        } else {
                            ChunkId::from_slice(b)
                        }
                    })
                    .collect();
                Ok(Node::Leaf {
                    first_block: field,
                    entries,
                })
            }
            _ => {
                if !extra.is_power_of_two() || !(64 << 10..=4 << 20).contains(&extra) {
                    return Err(NodeError::BadBlockSize(extra));
                }
                let expected = leaf_count(field, extra);
                if expected != count as u64 {
                    return Err(NodeError::WrongLeafCount {
                        image_size: field,
                        block_size: extra,
                        expected,
                        found: count,
                    });
                }
                let mut leaves = Vec::with_capacity(count);
                for b in ids {
                    if b == ZERO {
                        return Err(NodeError::ZeroLeaf);
                    }
                    leaves.extend(ChunkId::from_slice(b));
                }
                Ok(Node::Root {
                    image_size: field,
                    block_size: extra,
                    leaves,
                })
            }
        }
    }
}

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(src) = b.get(at..at + N) {
        a.copy_from_slice(src);
    }
    a
}

/// Accumulates entries in block order and cuts them into leaves.
#[derive(Debug)]
pub struct BlockMapBuilder {
    current: Vec<Entry>,
    next_first_block: u64,
    leaves: Vec<ChunkId>,
}

impl Default for BlockMapBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockMapBuilder {
    /// An empty map.
    pub fn new() -> Self {
        BlockMapBuilder {
            current: Vec::with_capacity(LEAF_ENTRIES),
            next_first_block: 0,
            leaves: Vec::new(),
        }
    }

    /// Adds the next block's entry. Returns a full leaf, encoded, when this
    /// entry completed one; the caller stores it and reports its id with
    /// [`BlockMapBuilder::leaf_stored`].
    pub fn push(&mut self, entry: Entry) -> Option<Vec<u8>> {
        self.current.push(entry);
        if self.current.len() == LEAF_ENTRIES {
            Some(self.cut())
        } else {
            None
        }
    }

    fn cut(&mut self) -> Vec<u8> {
        let node = Node::Leaf {
            first_block: self.next_first_block,
            entries: std::mem::take(&mut self.current),
        };
        self.next_first_block += LEAF_ENTRIES as u64;
        self.current.reserve(LEAF_ENTRIES);
        node.encode()
    }

    /// Records the id under which the last leaf was stored.
    pub fn leaf_stored(&mut self, id: ChunkId) {
        self.leaves.push(id);
    }

    /// Returns the last, partial leaf (if any) to store.
    pub fn flush(&mut self) -> Option<Vec<u8>> {
        if self.current.is_empty() {
            None
        } else {
            Some(self.cut())
        }
    }

    /// The root node, once every leaf is stored.
    pub fn root(self, image_size: u64, block_size: u32) -> Vec<u8> {
        Node::Root {
            image_size,
            block_size,
            leaves: self.leaves,
        }
        .encode()
    }
}

/// The fuzz entry point (also replayed over the seed corpus by `make
/// test`): decodes arbitrary bytes; a node that decodes must re-encode to
/// the same bytes. Returns whether the bytes were a valid node.
pub fn fuzz_entry(data: &[u8]) -> bool {
    match Node::decode(data) {
        Ok(node) => {
            assert_eq!(node.encode(), data);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            Just(None),
            any::<[u8; 32]>()
                .prop_filter_map("non-zero id", |b| (b != ZERO).then_some(Some(ChunkId(b))))
        ]
    }

    proptest! {
        #[test]
        fn leaf_round_trip(k in 0u64..1_000_000, entries in proptest::collection::vec(entry(), 0..=LEAF_ENTRIES)) {
            let node = Node::Leaf { first_block: k * LEAF_ENTRIES as u64, entries };
            prop_assert_eq!(Node::decode(&node.encode()).unwrap(), node);
        }

        #[test]
        fn root_round_trip(blocks in 0u64..20_000, shift in 16u32..=22, seed: u8) {
            let block_size = 1u32 << shift;
            let image_size = blocks * u64::from(block_size);
            let n = leaf_count(image_size, block_size) as usize;
            let leaves = (0..n).map(|i| ChunkId::of(&[seed, i as u8, (i >> 8) as u8])).collect();
            let node = Node::Root { image_size, block_size, leaves };
            prop_assert_eq!(Node::decode(&node.encode()).unwrap(), node);
        }

        #[test]
        fn flipped_bytes_are_rejected(entries in proptest::collection::vec(entry(), 1..50), pos: prop::sample::Index, bit in 0u8..8) {
            let mut b = Node::Leaf { first_block: 0, entries }.encode();
            let i = pos.index(b.len());
            b[i] ^= 1 << bit;
            prop_assert!(Node::decode(&b).is_err());
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Node::decode(&bytes);
        }
    }

    #[test]
    fn builder_cuts_leaves_and_root_counts_them() {
        let mut b = BlockMapBuilder::new();
        let mut leaves = 0;
        for i in 0..(LEAF_ENTRIES * 2 + 5) {
            if let Some(leaf) = b.push((i % 3 == 0).then(|| ChunkId::of(&i.to_le_bytes()))) {
                leaves += 1;
                b.leaf_stored(ChunkId::of(&leaf));
            }
        }
        let last = b.flush().unwrap();
        b.leaf_stored(ChunkId::of(&last));
        assert_eq!(leaves, 2);
        let size = (LEAF_ENTRIES * 2 + 5) as u64 * 65536 - 100;
        match Node::decode(&b.root(size, 65536)).unwrap() {
            Node::Root { leaves, .. } => assert_eq!(leaves.len(), 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn root_with_wrong_leaf_count_is_rejected() {
        let node = Node::Root {
            image_size: 1 << 30,
            block_size: 65536,
            leaves: vec![],
        };
        assert!(matches!(
            Node::decode(&node.encode()),
            Err(NodeError::WrongLeafCount { .. })
        ));
    }
}
