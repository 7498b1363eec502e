//! Tests of snapshot manifests: round trips, damage, old versions, and
//! bounds on names, sizes and offsets.

use std::fs;
use std::path::Path;

use super::*;
use crate::error::SnapError;

pub(crate) fn meta() -> SnapMeta {
    SnapMeta {
        item: "vm".into(),
        point: "0123456789ab".into(),
        job: "j1".into(),
        source: "/img".into(),
        level: Level::CrashConsistent,
        packs: vec!["a.pack".into(), "b.pack".into()],
        clone: None,
        warnings: vec![],
        cbt: None,
    }
}

fn sample(path: &Path, n: u64) -> Vec<SnapEntry> {
    let entries: Vec<SnapEntry> = (0..n)
        .map(|i| {
            if i % 3 == 0 {
                SnapEntry::default()
            } else {
                SnapEntry {
                    id: Some(ChunkId::of(&i.to_le_bytes())),
                    loc: PackLoc {
                        pack: (i % 2) as u16,
                        flags: if i % 7 == 0 { FLAG_NODE } else { 0 },
                        len: 100 + i as u32,
                        offset: i * 1000,
                    },
                }
            }
        })
        .collect();
    let header = SnapHeader {
        kind: SnapKind::Chunks,
        block_size: 65536,
        image_size: n * 65536,
        blocks: n,
        created_s: 1_700_000_000,
        created_ns: 5,
    };
    let mut w = SnapWriter::create(path, header, None).unwrap();
    for e in &entries {
        w.push(e).unwrap();
    }
    w.finish(&meta(), 12345).unwrap();
    entries
}

#[test]
fn round_trip_in_odd_windows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s/x.snap");
    let entries = sample(&path, 2500);
    let mut r = SnapReader::open(&path, None).unwrap();
    assert_eq!(r.meta(), &meta());
    let mut got = Vec::new();
    for n in [1, 700, 1024, 1000, 5000] {
        got.extend(r.next_entries(n).unwrap());
    }
    assert_eq!(got, entries);
    assert_eq!(r.finish().unwrap().stored_bytes, 12345);
    let (h, m, t) = summary(&path, None).unwrap();
    assert_eq!(
        (h.blocks, m.item.as_str(), t.stored_bytes),
        (2500, "vm", 12345)
    );
}

#[test]
fn damage_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.snap");
    sample(&path, 1500);
    let bytes = fs::read(&path).unwrap();
    assert!(fuzz_entry(&bytes));
    for at in [
        3,
        20,
        41,
        60,
        100,
        2000,
        bytes.len() - 40,
        bytes.len() - 10,
        bytes.len() - 3,
    ] {
        let mut d = bytes.clone();
        d[at] ^= 0x40;
        assert!(!fuzz_entry(&d), "flip at {at} not detected");
    }
    assert!(!fuzz_entry(&bytes[..bytes.len() - 1]));
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(!fuzz_entry(&longer));
}

#[test]
fn version_one_files_are_named_as_such() {
    let mut h = SnapHeader {
        kind: SnapKind::Chunks,
        block_size: 65536,
        image_size: 0,
        blocks: 0,
        created_s: 0,
        created_ns: 0,
    }
    .encode(false);
    h[8] = 1;
    let crc = crc32fast::hash(&h[..56]);
    h[56..60].copy_from_slice(&crc.to_le_bytes());
    let err = SnapHeader::decode(&h).unwrap_err();
    assert!(
        err.contains("version 1") && err.contains("older coffre"),
        "{err}"
    );
}

fn write_one(path: &Path, header: SnapHeader, entry: Option<SnapEntry>, meta: &SnapMeta) {
    let mut w = SnapWriter::create(path, header, None).unwrap();
    if let Some(e) = entry {
        w.push(&e).unwrap();
    }
    w.finish(meta, 0).unwrap();
}

fn one_block(block_size: u32) -> SnapHeader {
    SnapHeader {
        kind: SnapKind::Chunks,
        block_size,
        image_size: u64::from(block_size),
        blocks: 1,
        created_s: 1,
        created_ns: 0,
    }
}

#[test]
fn names_that_leave_the_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.snap");
    let entry = SnapEntry {
        id: Some(ChunkId::of(b"x")),
        loc: PackLoc {
            pack: 0,
            flags: 0,
            len: 100,
            offset: 64,
        },
    };
    let mut cases: Vec<(&str, SnapMeta)> = Vec::new();
    let mut m = meta();
    m.packs[0] = "../../etc/passwd".into();
    cases.push(("pack", m));
    let mut m = meta();
    m.item = "/tmp/x".into();
    cases.push(("item", m));
    let mut m = meta();
    m.job = "a/b".into();
    cases.push(("job", m));
    for (what, m) in cases {
        write_one(&path, one_block(65536), Some(entry), &m);
        let err = SnapReader::open(&path, None).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, SnapError::RefusedName { .. }), "{msg}");
        assert!(msg.contains(&format!("{what} name")), "{msg}");
    }
    // A clone named outside the folder.
    let mut m = meta();
    m.packs.clear();
    m.clone = Some("../../etc/passwd".into());
    let clone = SnapHeader {
        kind: SnapKind::Clone,
        blocks: 0,
        ..one_block(65536)
    };
    write_one(&path, clone, None, &m);
    let msg = SnapReader::open(&path, None).err().unwrap().to_string();
    assert!(msg.contains("clone name"), "{msg}");
    m.clone = Some("j1.img".into());
    write_one(&path, clone, None, &m);
    SnapReader::open(&path, None).unwrap();
}

#[test]
fn decoded_sizes_and_offsets_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.snap");
    // A block size that would size a 4 GiB buffer, or divide by 0.
    for bs in [0u32, 4096, 3 << 16, u32::MAX] {
        write_one(&path, one_block(bs), Some(SnapEntry::default()), &meta());
        let msg = SnapReader::open(&path, None).err().unwrap().to_string();
        assert!(msg.contains("block size"), "{bs}: {msg}");
    }
    // An entry whose record end passes u64::MAX.
    let entry = SnapEntry {
        id: Some(ChunkId::of(b"x")),
        loc: PackLoc {
            pack: 0,
            flags: 0,
            len: 100,
            offset: u64::MAX - 10,
        },
    };
    write_one(&path, one_block(65536), Some(entry), &meta());
    let mut r = SnapReader::open(&path, None).unwrap();
    let msg = r.next_entries(1).unwrap_err().to_string();
    assert!(msg.contains("largest offset"), "{msg}");
    assert_eq!(entry.loc.end(), u64::MAX);
}
