//! Writes the snapshotter's fuzz seed corpus: `cargo run --release -p
//! coffre-snapshotter --example snapshot_seeds -- fuzz/corpus`. A valid
//! snapshot manifest plus a flipped and a truncated copy.

use std::path::Path;

use coffre_snapshotter::Level;
use coffre_snapshotter::manifest::{
    FLAG_NODE, PackLoc, SnapEntry, SnapHeader, SnapKind, SnapMeta, SnapWriter,
};
use coffre_vault_store::ChunkId;

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
}
