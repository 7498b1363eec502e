//! Tests of the rule "nothing is destroyed on partial knowledge": an
//! incomplete index is refused, unknown files go to the quarantine, a
//! refill copies only intact records, replication refuses a primary that
//! looks empty, and a rebuild never cuts a replica's good tail.
//!
//! This module holds the helpers the tests share; the tests are grouped by
//! topic in [`rebuild`], [`refill`] and [`quarantine`].

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

mod quarantine;
mod rebuild;
mod refill;

use std::path::{Path, PathBuf};

use crate::format::chunk_id::ChunkId;
use crate::format::config::VaultConfig;
use crate::format::segment::{SEGMENTS_DIR, segment_name};
use crate::vault::Vault;

fn config(replicas: Vec<PathBuf>, secondary: Option<PathBuf>) -> VaultConfig {
    VaultConfig {
        name: "t-vault".into(),
        vault_id: "0123456789abcdef".into(),
        block_size: 65536,
        compression_level: 1,
        redundancy: crate::format::config::Redundancy::Lrs,
        created: "2027-01-01T00:00:00Z".parse().unwrap(),
        snapshot_area: None,
        replicas,
        secondary,
        store: None,
        adopted_packs: false,
        encryption: None,
    }
}

/// Stores point `seq` of item `i` whose blocks are `blocks`.
fn store_point(v: &Vault, seq: u64, blocks: &[Vec<u8>]) {
    let blocks: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    crate::vault::tests::store_point(v, seq, &blocks);
}

fn blocks(seed: u8, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut b = vec![0u8; 20_000];
            blake3::Hasher::new()
                .update(&[seed, i as u8])
                .finalize_xof()
                .fill(&mut b);
            b
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in [SEGMENTS_DIR, "points/i", "items"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            for e in rd.flatten() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn point_file(seq: u64) -> String {
    crate::format::catalog_files::point_file("i", seq)
}

/// Every chunk of `bl` and the block-map root of point `seq` are placed by
/// the index of `v` and intact in each of `dirs`.
fn point_intact(v: &Vault, seq: u64, bl: &[Vec<u8>], dirs: &[&Path]) {
    let p = v
        .points("i")
        .unwrap()
        .into_iter()
        .find(|p| p.seq == seq)
        .unwrap_or_else(|| panic!("point {seq} is missing from the index"));
    let ids: Vec<ChunkId> = bl
        .iter()
        .map(|b| ChunkId::of(b))
        .chain([p.block_map])
        .collect();
    for id in ids {
        let loc = v
            .index()
            .chunk(&id)
            .unwrap()
            .unwrap_or_else(|| panic!("chunk {id} of point {seq} is not placed"));
        for d in dirs {
            let seg = std::fs::read(d.join(segment_name(loc.segment))).unwrap();
            let rec = &seg[loc.offset as usize..(loc.offset + u64::from(loc.len)) as usize];
            assert!(
                crate::format::record::record_intact(rec, None),
                "chunk {id} of point {seq} is damaged in {}",
                d.display()
            );
        }
    }
    for b in bl {
        assert_eq!(&v.read_chunk(&ChunkId::of(b)).unwrap(), b);
    }
}
