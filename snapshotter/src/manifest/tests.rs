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
    sample_with(path, n, None)
}

fn sample_with(
    path: &Path,
    n: u64,
    keys: Option<std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
) -> Vec<SnapEntry> {
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
    let mut w = SnapWriter::create(path, header, keys).unwrap();
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

fn keys(b: u8) -> std::sync::Arc<coffre_vault_store::crypto::VaultKeys> {
    std::sync::Arc::new(coffre_vault_store::crypto::VaultKeys::derive(
        &coffre_vault_store::crypto::MasterKey::from_bytes([b; 32]),
        coffre_vault_store::crypto::Cipher::Aes256Gcm,
    ))
}

/// Reads every entry of the manifest at `path`.
fn read_all(
    path: &Path,
    k: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
) -> Result<Vec<SnapEntry>, SnapError> {
    let mut r = SnapReader::open(path, k)?;
    let mut out = Vec::new();
    loop {
        let e = r.next_entries(4096)?;
        if e.is_empty() {
            break;
        }
        out.extend(e);
    }
    r.finish()?;
    Ok(out)
}

#[test]
fn a_sealed_manifest_round_trips_and_refuses_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm/j1.snap");
    let k = keys(1);
    let entries = sample_with(&path, 2100, Some(k.clone()));
    let bytes = fs::read(&path).unwrap();
    assert_eq!(codec::le_u32(&bytes, 8), SNAP_VERSION_SEALED);
    // No entry's chunk id and no name of the metadata in clear.
    let id = entries[1].id.unwrap();
    assert!(!bytes.windows(32).any(|w| w == id.as_bytes()));
    assert!(!bytes.windows(7).any(|w| w == b"a.pack\""));
    assert_eq!(read_all(&path, Some(&k)).unwrap(), entries);
    assert_eq!(summary(&path, Some(&k)).unwrap().1, meta());
    // Without the key, with another key: refused.
    assert!(
        SnapReader::open(&path, None)
            .err()
            .unwrap()
            .to_string()
            .contains("sealed")
    );
    assert!(read_all(&path, Some(&keys(2))).is_err());
    // A plain manifest where the vault is encrypted: refused.
    let plain = dir.path().join("vm/j2.snap");
    sample(&plain, 10);
    assert!(
        SnapReader::open(&plain, Some(&k))
            .err()
            .unwrap()
            .to_string()
            .contains("not sealed")
    );
    // Moved to another item's or job's name: refused.
    for other in ["db/j1.snap", "vm/j3.snap"] {
        let to = dir.path().join(other);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(&path, &to).unwrap();
        assert!(read_all(&to, Some(&k)).is_err(), "{other}");
    }
    // Every byte changed (one bit each, a sample of offsets): refused.
    let bad = dir.path().join("vm/j1.snap");
    for at in (0..bytes.len()).step_by(37) {
        let mut b = bytes.clone();
        b[at] ^= 0x20;
        fs::write(&bad, &b).unwrap();
        assert!(read_all(&bad, Some(&k)).is_err(), "byte {at}");
    }
    // Two frames swapped (CRCs intact): refused.
    let frame = 8 + 1024 * ENTRY_LEN + coffre_vault_store::crypto::seal::OVERHEAD;
    let mut b = bytes.clone();
    let (f0, f1) = (64..64 + frame, 64 + frame..64 + 2 * frame);
    let first = b[f0.clone()].to_vec();
    let second = b[f1.clone()].to_vec();
    b[f0].copy_from_slice(&second);
    b[f1].copy_from_slice(&first);
    fs::write(&bad, &b).unwrap();
    let e = read_all(&bad, Some(&k)).unwrap_err().to_string();
    assert!(e.contains("authentication"), "{e}");
}

#[test]
fn frames_read_in_any_order_equal_the_stream_plain_and_sealed() {
    for k in [None, Some(keys(1))] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm/j1.snap");
        let entries = sample_with(&path, 2500, k.clone());
        let frames = SnapReader::open(&path, k.as_ref())
            .unwrap()
            .into_frames()
            .unwrap();
        for i in [2usize, 0, 1, 2] {
            let f = frames.frame(i).unwrap();
            assert_eq!(
                frames.read(i).unwrap(),
                entries[f.first as usize..][..f.count as usize],
                "frame {i}, sealed: {}",
                k.is_some()
            );
        }
        assert!(frames.frame(3).is_none());
        assert!(frames.read(3).is_err());
        for b in [0u64, 1023, 1024, 2047, 2048, 2499] {
            assert_eq!(frames.frame_of(b), Some((b / 1024) as usize), "block {b}");
        }
        assert_eq!(frames.frame_of(2500), None);
    }
    // A sealed manifest read whole with another key: refused at open.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm/j1.snap");
    sample_with(&path, 1500, Some(keys(1)));
    assert!(
        SnapReader::open(&path, Some(&keys(2)))
            .and_then(SnapReader::into_frames)
            .is_err()
    );
}
