//! Writes the snapshotter's fuzz seed corpus: `cargo run --release -p
//! coffre-snapshotter --example snapshot_seeds -- fuzz/corpus`. For each of
//! the snapshot manifest, the pack and the area files: valid inputs plus
//! flipped and truncated copies.

use std::path::Path;

use coffre_snapshotter::Level;
use coffre_snapshotter::area::{AREA_FILE, AREA_LIST_FILE, Area, AreaIdentity};
use coffre_snapshotter::manifest::{
    FLAG_NODE, PackLoc, SnapEntry, SnapHeader, SnapKind, SnapMeta, SnapWriter,
};
use coffre_snapshotter::pack::PackWriter;
use coffre_vault_store::ChunkId;
use coffre_vault_store::format::record::RecordEncoder;

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let snaps = Path::new(&out).join("snapshot_manifest");
    std::fs::create_dir_all(&snaps).unwrap();
    let tmp = std::env::temp_dir().join(format!("coffre-seed-{}.snap", std::process::id()));
    let blocks = 1100u64;
    let mut w = SnapWriter::create(
        &tmp,
        SnapHeader {
            kind: SnapKind::Chunks,
            block_size: 65536,
            image_size: blocks * 65536 - 7,
            blocks,
            created_s: 1_800_000_000,
            created_ns: 42,
        },
        None,
    )
    .unwrap();
    for i in 0..blocks {
        let entry = if i % 5 == 0 {
            SnapEntry::default()
        } else {
            SnapEntry {
                id: Some(ChunkId::of(&i.to_le_bytes())),
                loc: PackLoc {
                    pack: (i % 2) as u16,
                    flags: if i == 7 { FLAG_NODE } else { 0 },
                    len: 200,
                    offset: 32 + i * 200,
                },
            }
        };
        w.push(&entry).unwrap();
    }
    let meta = SnapMeta {
        item: "vm".into(),
        point: "0123456789ab".into(),
        job: "00000000000000aa".into(),
        source: "/var/lib/libvirt/images/vm.img".into(),
        level: Level::CrashConsistent,
        packs: vec![
            "00000000000000a9.pack".into(),
            "00000000000000aa.pack".into(),
        ],
        clone: None,
        warnings: vec![],
        cbt: None,
    };
    w.finish(&meta, 12_345).unwrap();
    let snap = std::fs::read(&tmp).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    let mut flipped = snap.clone();
    flipped[100] ^= 1;
    let truncated = snap[..snap.len() - 20].to_vec();
    for (name, bytes) in [
        ("valid.bin", &snap),
        ("flipped.bin", &flipped),
        ("truncated.bin", &truncated),
    ] {
        std::fs::write(snaps.join(name), bytes).unwrap();
    }

    write_damaged(&Path::new(&out).join("pack_scan"), &pack_seed());
    let areas = Path::new(&out).join("area_file");
    std::fs::create_dir_all(&areas).unwrap();
    let t = std::env::temp_dir().join(format!("coffre-seed-area-{}", std::process::id()));
    let vault = t.join("vault");
    std::fs::create_dir_all(&vault).unwrap();
    let owner = AreaIdentity {
        vault_id: "0123456789abcdef".into(),
        vault_name: "prod".into(),
    };
    let area = Area::for_image(
        &vault,
        None,
        &owner,
        Some(&t.join("area")),
        None,
        Path::new("/x"),
    )
    .unwrap();
    let identity = std::fs::read(area.dir().join(AREA_FILE)).unwrap();
    let list = std::fs::read(vault.join(AREA_LIST_FILE)).unwrap();
    std::fs::remove_dir_all(&t).unwrap();
    std::fs::write(areas.join("identity.bin"), &identity).unwrap();
    std::fs::write(areas.join("list.bin"), &list).unwrap();
    let mut flipped = identity.clone();
    flipped[20] ^= 1;
    std::fs::write(areas.join("flipped.bin"), &flipped).unwrap();
}

/// A pack of three records.
fn pack_seed() -> Vec<u8> {
    let p = std::env::temp_dir().join(format!("coffre-seed-{}.pack", std::process::id()));
    let mut w = PackWriter::create(&p).unwrap();
    let mut enc = RecordEncoder::new(1);
    for i in 0..3u8 {
        let block: Vec<u8> = (0..4096u32)
            .map(|j| (j as u8).wrapping_mul(i + 1))
            .collect();
        w.append(&enc.encode(ChunkId::of(&block), &block).unwrap())
            .unwrap();
    }
    w.finish().unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    bytes
}

/// `valid.bin`, `flipped.bin` and `truncated.bin` of `bytes` in `dir`.
fn write_damaged(dir: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut flipped = bytes.to_vec();
    flipped[100] ^= 1;
    let truncated = bytes[..bytes.len() - 20].to_vec();
    for (name, b) in [
        ("valid.bin", bytes),
        ("flipped.bin", &flipped[..]),
        ("truncated.bin", &truncated[..]),
    ] {
        std::fs::write(dir.join(name), b).unwrap();
    }
}
