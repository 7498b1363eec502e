//! Nothing read from a vault names a path: crafted catalog files (an item
//! named with an absolute path or `../x`, written with the production
//! encoder so their checksums are valid) and crafted snapshot manifests
//! (a clone or pack named `../../etc/passwd`, with valid checksums) make
//! `verify` fail naming each, and rebuild-index, prune (purge and snapshot
//! expiry), listing and restore touch nothing outside the vault or the
//! snapshot area.

use std::fs;
use std::path::{Path, PathBuf};

use coffre_vault_store::format::catalog_files::{
    decode_item, decode_point, encode_item, encode_point,
};
use coffre_vault_store::{ItemRecord, PointRecord, Protection};

use crate::common::*;

/// A folder with a file in it, outside the vault and the area.
fn sentinel(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let f = dir.join("keep");
    fs::write(&f, b"not coffre's").unwrap();
    f
}

/// The `.snap` files of an item folder.
fn manifests(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "snap"))
        .collect();
    out.sort();
    out
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The metadata JSON of a manifest, and where it starts.
fn meta_of(bytes: &[u8]) -> (serde_json::Value, usize) {
    let t = bytes.len() - 32;
    let meta_len = le_u32(bytes, t + 24) as usize;
    let at = t - 4 - meta_len;
    (
        serde_json::from_slice(&bytes[at..at + meta_len]).unwrap(),
        at,
    )
}

/// `body` (header and entries) followed by `meta`, its CRC and a trailer
/// with valid checksums.
fn with_meta(body: &[u8], meta: &serde_json::Value, entries: u64) -> Vec<u8> {
    let meta = serde_json::to_vec(meta).unwrap();
    let mut out = body.to_vec();
    out.extend_from_slice(&meta);
    out.extend_from_slice(&crc32fast::hash(&meta).to_le_bytes());
    let mut t = [0u8; 32];
    t[..8].copy_from_slice(b"CFSNEND\0");
    t[8..16].copy_from_slice(&entries.to_le_bytes());
    t[24..28].copy_from_slice(&(meta.len() as u32).to_le_bytes());
    let crc = crc32fast::hash(&t[..28]);
    t[28..].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&t);
    out
}

/// A clone snapshot manifest (no entries) taken long ago.
fn clone_manifest(meta: &serde_json::Value, block_size: u32) -> Vec<u8> {
    let mut h = [0u8; 64];
    h[..8].copy_from_slice(b"CFSNAP\0\0");
    h[8..12].copy_from_slice(&2u32.to_le_bytes());
    h[12] = 2;
    h[16..20].copy_from_slice(&block_size.to_le_bytes());
    h[24..32].copy_from_slice(&(1u64 << 20).to_le_bytes());
    h[40..48].copy_from_slice(&1_000_000_000i64.to_le_bytes());
    let crc = crc32fast::hash(&h[..56]);
    h[56..60].copy_from_slice(&crc.to_le_bytes());
    with_meta(&h, meta, 0)
}

#[test]
fn crafted_names_touch_nothing_outside_and_verify_names_each() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let area = t.path().join("snapshot-area");
    let img = t.path().join("vm.img");
    random_file(&img, 3 << 20, 7);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);

    // What a purge of `../x` or of an absolute name would remove, and what
    // a clone or pack named `../../etc/passwd` would reach from the item's
    // folder.
    let outside_abs = t.path().join("outside").join("x");
    let abs_keep = sentinel(&outside_abs);
    let dotdot_keep = sentinel(&t.path().join("x"));
    let etc = t.path().join("etc");
    fs::create_dir_all(&etc).unwrap();
    let passwd = etc.join("passwd");
    fs::write(&passwd, b"root:x:0:0").unwrap();

    // Catalog files: two soft-deleted items due for purge, and a point,
    // each with a valid envelope and checksum.
    let good = decode_item(&fs::read(vault.join("items/vm.item")).unwrap()).unwrap();
    let past = jiff::Timestamp::from_second(946_684_800).unwrap();
    for (file, name) in [("evil1", s(&outside_abs)), ("evil2", "../x")] {
        let crafted = ItemRecord {
            name: name.to_string(),
            protection: Protection::SoftDeleted {
                at: past,
                purge_after: past,
            },
            ..good.clone()
        };
        fs::write(
            vault.join(format!("items/{file}.item")),
            encode_item(&crafted),
        )
        .unwrap();
    }
    let point_file = fs::read_dir(vault.join("points/vm"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let point: PointRecord = decode_point(&fs::read(&point_file).unwrap()).unwrap();
    let crafted_point = PointRecord {
        item: "../x".into(),
        seq: 99,
        ..point
    };
    fs::write(
        vault.join("points/vm/0000000000000063.point"),
        encode_point(&crafted_point),
    )
    .unwrap();

    // Manifests: the real one's pack renamed, and an old clone snapshot
    // whose clone is outside the area.
    let item_dir = area.join("vm");
    let real = manifests(&item_dir).pop().expect("a snapshot");
    let bytes = fs::read(&real).unwrap();
    let (meta, meta_at) = meta_of(&bytes);
    let entries = u64::from_le_bytes(bytes[32..40].try_into().unwrap());
    let block_size = le_u32(&bytes, 16);
    let mut bad_pack = meta.clone();
    bad_pack["packs"][0] = "../../etc/passwd".into();
    fs::write(&real, with_meta(&bytes[..meta_at], &bad_pack, entries)).unwrap();
    let mut bad_clone = meta.clone();
    bad_clone["job"] = "0000000000000bad".into();
    bad_clone["point"] = "0123456789ab".into();
    bad_clone["packs"] = serde_json::json!([]);
    bad_clone["clone"] = "../../etc/passwd".into();
    fs::write(
        item_dir.join("0000000000000bad.snap"),
        clone_manifest(&bad_clone, block_size),
    )
    .unwrap();

    // verify: exit 3, one bad-name finding per crafted name.
    let out = run(&["verify", "--vault", v]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    for needle in [
        "items/evil1.item",
        "items/evil2.item",
        "0000000000000063.point",
        "0000000000000bad.snap",
        real.file_name().unwrap().to_str().unwrap(),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(needle) && l.contains("not allowed")),
            "verify does not name {needle}:\n{stdout}"
        );
    }

    // Listing, restore, rebuild-index and prune (a purge of the crafted
    // items is due, and every snapshot has expired) skip them with a
    // warning.
    let pts = vault_points(&vault, "vm");
    assert_eq!(pts.len(), 1, "{pts:?}");
    let restored = t.path().join("restored.img");
    ok(&restore_args(&vault, "vm", None, &restored, false));
    assert_same(&restored, &img);
    let out = run(&["vault", "rebuild-index", "--vault", v]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("evil1.item") && stderr.contains("evil2.item"),
        "rebuild-index does not warn about the crafted files:\n{stderr}"
    );
    let items = json(&["item", "list", "--vault", v]).to_string();
    assert!(
        items.contains("\"vm\"") && !items.contains("../x") && !items.contains("outside"),
        "{items}"
    );
    let out = coffre()
        .env("COFFRE_NOW", "2031-01-01T00:00:00Z")
        .args(["prune", "--vault", v])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (f, what) in [
        (&abs_keep, "the absolute item's folder"),
        (&dotdot_keep, "the ../x item's folder"),
        (&passwd, "the clone's and pack's target"),
    ] {
        assert!(f.exists(), "{what} was removed: {}", f.display());
    }
    assert_eq!(fs::read(&passwd).unwrap(), b"root:x:0:0");
    assert_eq!(fs::read(&abs_keep).unwrap(), b"not coffre's");
    assert_eq!(fs::read(&dotdot_keep).unwrap(), b"not coffre's");
    // The vault still restores.
    let again = t.path().join("again.img");
    ok(&restore_args(&vault, "vm", None, &again, false));
    assert_same(&again, &img);
}

/// `--snapshot-area DIR` never takes over a folder that holds someone's
/// files: not at `vault create`, not at `vault set`, not at a backup.
#[test]
fn a_non_empty_folder_is_not_taken_as_a_snapshot_area() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    fs::create_dir_all(&home).unwrap();
    fs::write(home.join("thesis.tex"), b"years of work").unwrap();
    let refused = |stderr: &str| {
        assert!(
            stderr.contains(s(&home)) && stderr.contains("not a coffre snapshot area"),
            "{stderr}"
        );
    };
    let v = t.path().join("vault");
    let err = fails(
        &[
            "vault",
            "create",
            "--vault",
            s(&v),
            "--snapshot-area",
            s(&home),
        ],
        1,
    );
    refused(&err);
    let vault = new_vault(t.path(), &[]);
    let err = fails(
        &[
            "vault",
            "set",
            "--vault",
            s(&vault),
            "--snapshot-area",
            s(&home),
        ],
        1,
    );
    refused(&err);
    // Filled after it was chosen: the backup refuses it.
    let later = t.path().join("later");
    fs::create_dir_all(&later).unwrap();
    ok(&[
        "vault",
        "set",
        "--vault",
        s(&vault),
        "--snapshot-area",
        s(&later),
    ]);
    fs::rename(home.join("thesis.tex"), later.join("thesis.tex")).unwrap();
    let img = t.path().join("vm.img");
    random_file(&img, 1 << 20, 3);
    let out = run(&["backup", "--vault", s(&vault), "--item", "vm", s(&img)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the backup took over {}",
        later.display()
    );
    assert!(
        stderr.contains(s(&later)) && stderr.contains("not a coffre snapshot area"),
        "{stderr}"
    );
    let left: Vec<_> = fs::read_dir(&later).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "coffre wrote into {}", later.display());
    assert_eq!(
        fs::read(later.join("thesis.tex")).unwrap(),
        b"years of work"
    );
}
