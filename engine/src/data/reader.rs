//! Reading a point's block map back: root, then leaves on demand.

use coffre_vault_store::{ChunkId, PointRecord, Vault};

use crate::error::{EngineError, Result};
use coffre_vault_store::format::blockmap::{Entry, LEAF_ENTRIES, Node, block_count};

/// Walks the block map of one point, one leaf at a time (memory stays at
/// one leaf whatever the image size).
pub struct BlockMapReader<'v> {
    vault: &'v Vault,
    item: String,
    point: String,
    image_size: u64,
    block_size: u32,
    leaves: Vec<ChunkId>,
    cached: Option<(usize, Vec<Entry>)>,
}

impl<'v> BlockMapReader<'v> {
    /// Loads and checks the root of `point`.
    pub fn open(vault: &'v Vault, point: &PointRecord) -> Result<Self> {
        let damaged = |reason: String| EngineError::DamagedBlockMap {
            item: point.item.clone(),
            point: point.id.clone(),
            reason,
        };
        let bytes = vault
            .read_chunk(&point.block_map)
            .map_err(|e| damaged(format!("root chunk {}: {e}", point.block_map)))?;
        match Node::decode(&bytes).map_err(|e| damaged(format!("root: {e}")))? {
            Node::Root {
                image_size,
                block_size,
                leaves,
            } => {
                if image_size != point.image_size || block_size != point.block_size {
                    return Err(damaged(format!(
                        "root describes {image_size} bytes in {block_size}-byte blocks, the point {} bytes in {}-byte blocks",
                        point.image_size, point.block_size
                    )));
                }
                Ok(BlockMapReader {
                    vault,
                    item: point.item.clone(),
                    point: point.id.clone(),
                    image_size,
                    block_size,
                    leaves,
                    cached: None,
                })
            }
            Node::Leaf { .. } => Err(damaged("root chunk is a leaf".into())),
        }
    }

    /// Number of blocks in the image.
    pub fn blocks(&self) -> u64 {
        block_count(self.image_size, self.block_size)
    }

    /// Number of leaves.
    pub fn leaf_count(&self) -> usize {
        self.leaves.len()
    }

    /// Id of leaf `k`.
    pub fn leaf_id(&self, k: usize) -> Option<ChunkId> {
        self.leaves.get(k).copied()
    }

    fn damaged(&self, reason: String) -> EngineError {
        EngineError::DamagedBlockMap {
            item: self.item.clone(),
            point: self.point.clone(),
            reason,
        }
    }

    /// Entries of leaf `k`, checked against the geometry.
    pub fn leaf(&mut self, k: usize) -> Result<&[Entry]> {
        if self.cached.as_ref().is_none_or(|(c, _)| *c != k) {
            let id = self
                .leaves
                .get(k)
                .copied()
                .ok_or_else(|| self.damaged(format!("leaf {k} does not exist")))?;
            let bytes = self
                .vault
                .read_chunk(&id)
                .map_err(|e| self.damaged(format!("leaf {k} (chunk {id}): {e}")))?;
            let node = Node::decode(&bytes)
                .map_err(|e| self.damaged(format!("leaf {k} (chunk {id}): {e}")))?;
            let first = (k * LEAF_ENTRIES) as u64;
            let expected = (self.blocks() - first).min(LEAF_ENTRIES as u64) as usize;
            match node {
                Node::Leaf {
                    first_block,
                    entries,
                } if first_block == first && entries.len() == expected => {
                    self.cached = Some((k, entries));
                }
                _ => {
                    return Err(self.damaged(format!(
                        "leaf {k} (chunk {id}) does not cover blocks {first}..{}",
                        first + expected as u64
                    )));
                }
            }
        }
        Ok(self
            .cached
            .as_ref()
            .map(|(_, e)| e.as_slice())
            .unwrap_or(&[]))
    }

    /// Entries of blocks `first..first + n`; blocks past the end of this
    /// map (the image grew since) are `None`.
    pub fn entries(&mut self, first: u64, n: usize) -> Result<Vec<Entry>> {
        let mut out = Vec::with_capacity(n);
        let total = self.blocks();
        let mut b = first;
        while out.len() < n {
            if b >= total {
                out.resize(n, None);
                break;
            }
            let k = (b / LEAF_ENTRIES as u64) as usize;
            let within = (b % LEAF_ENTRIES as u64) as usize;
            let take = (n - out.len()).min(LEAF_ENTRIES - within);
            let leaf = self.leaf(k)?;
            let part = leaf
                .get(within..(within + take).min(leaf.len()))
                .unwrap_or(&[]);
            if part.is_empty() {
                out.resize(n, None);
                break;
            }
            out.extend_from_slice(part);
            b += part.len() as u64;
        }
        Ok(out)
    }
}
