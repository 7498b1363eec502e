//! Changed blocks from reflink extent sharing, for real: a raw image on a
//! loop-mounted XFS with reflink=1 (root only; skipped with a message
//! otherwise). The second backup's clone shares every unwritten extent
//! with the first one's, so the transfer reads only the rewritten blocks
//! (and the sample) and the point restores byte-identical; without the
//! previous clone the run is a full read. A vault chunk found damaged is
//! read again from the clone even where the hint calls its block clean,
//! and the next backup heals it.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::*;
use crate::snapshot_clone_xfs::{backup_next_to_image as backup, xfs_vault};

#[test]
fn reflink_sharing_tells_the_transfer_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let Some((_xfs, vault, img)) = xfs_vault(t.path(), 128 << 20, 91) else {
        return;
    };
    let b1 = backup(&vault, &img);
    assert_eq!(b1["job"]["stats"]["snapshot_kind"], "clone", "{b1}");
    let cbt1 = &b1["job"]["stats"]["cbt"];
    assert_eq!(cbt1["source"], "reflink", "{b1}");
    assert_eq!(cbt1["used"], false);
    let full_read = b1["stats"]["bytes_read"].as_u64().unwrap();
    assert!(full_read > 32 << 20, "{b1}");

    // The guest rewrites 4 extents in place (copy-on-write: new extents).
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    let mut rng = Rng::new(92);
    for at in [3u64 << 20, 40 << 20, 77 << 20, 120 << 20] {
        let mut b = vec![0u8; 200 << 10];
        rng.fill(&mut b);
        f.write_all_at(&b, at).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let b2 = backup(&vault, &img);
    let cbt = &b2["job"]["stats"]["cbt"];
    assert_eq!(cbt["source"], "reflink", "{b2}");
    assert_eq!(cbt["used"], true, "{b2}");
    assert_eq!(cbt["mismatches"], 0);
    let read = b2["stats"]["bytes_read"].as_u64().unwrap();
    eprintln!(
        "reflink CBT: read {read} bytes of {full_read}; dirty {} bytes",
        cbt["dirty_bytes"]
    );
    // 4 extents of 200 KiB touch at most 20 blocks of 64 KiB; plus the
    // sample of 64 blocks.
    assert!(read <= (20 + 64) << 16, "read {read}: {b2}");
    assert!(b2["stats"]["blocks_changed"].as_u64().unwrap() >= 4, "{b2}");
    let r = t.path().join("r.img");
    let mut args = restore_args(&vault, "vm", None, &r, false);
    args.extend(["--from", "vault"]);
    ok(&args);
    assert_same(&r, &img);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}

/// Flips a byte inside the record of chunk `id` in `vault`'s segments;
/// false when no segment holds it.
fn damage_record(vault: &Path, id: &[u8; 32]) -> bool {
    for seg in segment_files(vault) {
        let b = std::fs::read(&seg).unwrap();
        let mut at = 32usize;
        while at + 56 <= b.len() && &b[at..at + 4] == b"CFCK" {
            let stored = u32::from_le_bytes(b[at + 12..at + 16].try_into().unwrap()) as usize;
            if &b[at + 16..at + 48] == id {
                let f = OpenOptions::new().write(true).open(&seg).unwrap();
                let flip = [b[at + 56 + stored / 2] ^ 0x5a];
                f.write_all_at(&flip, (at + 56 + stored / 2) as u64)
                    .unwrap();
                return true;
            }
            at += 56 + stored;
        }
    }
    false
}

#[test]
fn a_damaged_chunk_under_a_clean_block_is_read_from_the_clone_and_healed() {
    let t = tempfile::tempdir().unwrap();
    let Some((_xfs, vault, img)) = xfs_vault(t.path(), 64 << 20, 93) else {
        return;
    };
    backup(&vault, &img);
    // A block with data from 8 MiB on: its chunk is damaged in the vault,
    // and found so.
    let file = std::fs::File::open(&img).unwrap();
    let mut block = vec![0u8; 64 << 10];
    let mut at = 8u64 << 20;
    loop {
        file.read_exact_at(&mut block, at).unwrap();
        if block.iter().any(|&b| b != 0) {
            break;
        }
        at += 64 << 10;
        assert!(at < 32 << 20, "no data between 8 and 32 MiB");
    }
    let id = *blake3::hash(&block).as_bytes();
    assert!(damage_record(&vault, &id), "no record of the block at {at}");
    let found = run(&["verify", "--vault", s(&vault), "--read-data"]);
    assert_eq!(found.status.code(), Some(3), "the damage was not found");
    // A guest write elsewhere: the hint calls that block clean.
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0xa5; 200 << 10], 40 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let b2 = backup(&vault, &img);
    assert_eq!(b2["job"]["stats"]["cbt"]["used"], true, "{b2}");
    // It was read from the clone all the same, and stored whole again.
    let healed = json(&["verify", "--vault", s(&vault), "--read-data"]);
    assert_eq!(
        healed["unrecoverable"].as_array().unwrap().len(),
        0,
        "{healed}"
    );
    let r = t.path().join("r.img");
    let mut args = restore_args(&vault, "vm", None, &r, false);
    args.extend(["--from", "vault"]);
    ok(&args);
    assert_same(&r, &img);
}
