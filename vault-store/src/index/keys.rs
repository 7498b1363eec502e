//! Key layouts of the index's column families: big-endian sequence and
//! place keys, point keys and the `meta` keys of pruned points.

use super::META_PRUNED;

#[expect(
    clippy::big_endian_bytes,
    reason = "big-endian keys sort numerically in RocksDB"
)]
pub(super) fn seq_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

#[expect(
    clippy::big_endian_bytes,
    reason = "big-endian keys sort numerically in RocksDB"
)]
pub(super) fn seq_from_key(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

pub(super) fn point_key(item: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(item.len() + 9);
    k.extend_from_slice(item.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq_key(seq));
    k
}

/// Key in `meta` of a point retention pruned: `pruned\0ITEM\0SEQ`.
pub(super) fn pruned_key(item: &str, seq: u64) -> Vec<u8> {
    let mut k = META_PRUNED.to_vec();
    k.extend_from_slice(&point_key(item, seq));
    k
}

pub(super) fn point_prefix(item: &str) -> Vec<u8> {
    let mut k = item.as_bytes().to_vec();
    k.push(0);
    k
}

/// Key of a (segment, offset) pair in `segchunks` and `dead`.
pub(super) fn place_key(segment: u64, offset: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    let (a, b) = k.split_at_mut(8);
    a.copy_from_slice(&seq_key(segment));
    b.copy_from_slice(&seq_key(offset));
    k
}

pub(super) fn place_from_key(k: &[u8]) -> Option<(u64, u64)> {
    Some((seq_from_key(k.get(..8)?)?, seq_from_key(k.get(8..16)?)?))
}
