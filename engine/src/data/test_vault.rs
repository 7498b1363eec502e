//! Tests' vaults: a new vault holding one point of an image in memory,
//! written through `ingest` (no snapshot tier).

use std::path::Path;

use coffre_vault_store::format::catalog::{Hooks, ItemRecord, Protection};
use coffre_vault_store::{PointRecord, Vault};

use crate::backup::PointTerms;
use crate::ingest::{IngestRequest, ingest};
use crate::progress::NoProgress;
use crate::{ManualClock, MemImage};

/// `len` bytes that look random, in runs of four (they compress a
/// little), no two 64 KiB blocks alike.
pub fn noise(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = ((i / 4) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((x ^ (x >> 29)) >> 24) as u8
        })
        .collect()
}

/// The request that ingests point `id` of item `m` (source `/m.img`),
/// made at `created`, after `parent`.
pub fn request(id: &str, created: &str, parent: Option<PointRecord>) -> IngestRequest {
    let created: jiff::Timestamp = created.parse().unwrap();
    IngestRequest {
        item: ItemRecord {
            name: "m".into(),
            source: "/m.img".into(),
            created,
            next_seq: 1,
            policy: None,
            protection: Protection::Protected,
            last_slot: None,
            identity: None,
            hooks: Hooks::default(),
        },
        point_id: id.into(),
        created,
        level: None,
        cbt: None,
        terms: PointTerms::default(),
        parent,
        clean: None,
        rate_limit: None,
    }
}

/// A new vault in `dir/v` whose item `m` holds one point (`p1`) of
/// `image`, in 64 KiB blocks.
pub fn vault_with_point(
    dir: &Path,
    image: &[u8],
    pool: &rayon::ThreadPool,
) -> (Vault, PointRecord) {
    let clock = ManualClock::new("2027-01-01T00:00:00Z".parse().unwrap());
    let vault = crate::vault_ops::create_vault(
        &dir.join("v"),
        &crate::vault_ops::CreateOptions::default(),
        &clock,
    )
    .unwrap();
    let req = request("p1", "2027-01-01T00:00:00Z", None);
    let point = ingest(
        &vault,
        &MemImage::new("/m.img", image.to_vec()),
        &req,
        pool,
        &NoProgress,
        &|| false,
    )
    .unwrap()
    .point;
    (vault, point)
}
