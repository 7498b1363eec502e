//! Changed-block lists (`--changed-blocks`) on the fallback capture path:
//! only the listed extents (and a sample of the rest) are read, a list
//! that misses a change is caught by the sample and the run falls back to
//! a full scan, and every reason a list cannot be trusted (a size change,
//! a generation other than the one recorded, a lost parent snapshot) makes
//! a full scan with a warning. Every point restores byte-identical.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::*;

const SIZE: u64 = 64 << 20;

/// Writes `len` fresh random bytes at each offset; returns the extents.
fn write_at(img: &Path, offsets: &[u64], len: usize, seed: u64) -> Vec<(u64, u64)> {
    let f = OpenOptions::new().write(true).open(img).unwrap();
    let mut rng = Rng::new(seed);
    for &at in offsets {
        let mut b = vec![0u8; len];
        rng.fill(&mut b);
        f.write_all_at(&b, at).unwrap();
    }
    f.sync_all().unwrap();
    offsets.iter().map(|&o| (o, len as u64)).collect()
}

fn list(path: &Path, extents: &[(u64, u64)], extra: serde_json::Value) {
    let mut v = serde_json::json!({
        "format": "coffre-changed-blocks",
        "version": 1,
        "extents": extents.iter().map(|&(o, l)| serde_json::json!({"offset": o, "length": l})).collect::<Vec<_>>(),
    });
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    std::fs::write(path, v.to_string()).unwrap();
}

fn backup(vault: &Path, img: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backup", "--vault", s(vault), "--item", "vm"];
    args.extend_from_slice(extra);
    args.push(s(img));
    json(&args)
}

fn restores_to(vault: &Path, dir: &Path, img: &Path) {
    let r = dir.join("restored.img");
    let _ = std::fs::remove_file(&r);
    ok(&restore_args(vault, "vm", None, &r, false));
    assert_same(&r, img);
}

/// Backs `img` up with the list `l` and asserts that the run fell back to a
/// full scan for a reason that says `why`; returns the backup's JSON.
fn falls_back(vault: &Path, img: &Path, l: &Path, why: &str) -> serde_json::Value {
    let b = backup(vault, img, &["--changed-blocks", s(l)]);
    let cbt = &b["job"]["stats"]["cbt"];
    assert_eq!(cbt["used"], false, "{b}");
    assert!(
        cbt["fallback"].as_str().unwrap_or_default().contains(why),
        "{cbt}"
    );
    b
}

fn warnings(b: &serde_json::Value) -> String {
    b["job"]["stats"]["warnings"].to_string()
}

#[test]
fn a_list_reads_only_what_it_lists_and_the_point_is_exact() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, SIZE, 1);
    let b1 = backup(&vault, &img, &[]);
    let full_read = b1["stats"]["bytes_read"].as_u64().unwrap();
    let offsets: Vec<u64> = (0..8).map(|i| i * (7 << 20) + 12_345).collect();
    let changed = write_at(&img, &offsets, 100 << 10, 2);
    let l = t.path().join("day2.json");
    list(
        &l,
        &changed,
        serde_json::json!({"image_size": SIZE, "generation": "d2"}),
    );
    let b2 = backup(&vault, &img, &["--changed-blocks", s(&l)]);
    let cbt = &b2["job"]["stats"]["cbt"];
    assert_eq!(cbt["used"], true, "{b2}");
    assert_eq!(cbt["source"], "list");
    assert_eq!(cbt["generation"], "d2");
    assert_eq!(cbt["mismatches"], 0);
    assert!(cbt["sampled"].as_u64().unwrap() >= 64, "{cbt}");
    // 8 extents of 100 KiB touch at most 24 blocks of 64 KiB; with the
    // sample, far less than the full read.
    let read = b2["stats"]["bytes_read"].as_u64().unwrap();
    assert!(
        read <= (24 + 64) * 65536 && read * 4 < full_read,
        "read {read} of {full_read}: {b2}"
    );
    assert_eq!(b2["job"]["status"], "Completed", "{b2}");
    restores_to(&vault, t.path(), &img);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}

#[test]
fn a_list_that_misses_a_change_is_caught_and_the_run_falls_back() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, SIZE, 3);
    backup(&vault, &img, &[]);
    // A quarter of the image changes; the list names one extent only.
    let listed = write_at(&img, &[1 << 20], 64 << 10, 4);
    // 256 of the 1,024 blocks: a sample of 64 misses them all with a
    // chance of 0.75^64 (1e-8).
    let unlisted: Vec<u64> = (0..256).map(|i| (8 << 20) + i * (128 << 10)).collect();
    write_at(&img, &unlisted, 64 << 10, 5);
    let l = t.path().join("wrong.json");
    list(&l, &listed, serde_json::json!({}));
    let b = falls_back(&vault, &img, &l, "differ from the parent");
    let cbt = &b["job"]["stats"]["cbt"];
    assert!(cbt["mismatches"].as_u64().unwrap() > 0, "{cbt}");
    assert!(warnings(&b).contains("not trusted, full scan"), "{b}");
    assert_eq!(b["job"]["status"], "CompletedWithWarnings");
    // The full scan found every change.
    assert!(b["stats"]["blocks_changed"].as_u64().unwrap() >= 257, "{b}");
    restores_to(&vault, t.path(), &img);

    // One unlisted block is found when every clean block is sampled.
    let one = write_at(&img, &[40 << 20], 4096, 6);
    write_at(&img, &[50 << 20], 4096, 7);
    list(&l, &one, serde_json::json!({}));
    let b = backup(
        &vault,
        &img,
        &["--changed-blocks", s(&l), "--cbt-sample", "100%"],
    );
    let cbt = &b["job"]["stats"]["cbt"];
    assert_eq!(cbt["used"], false, "{b}");
    assert_eq!(cbt["mismatches"], 1, "{cbt}");
    restores_to(&vault, t.path(), &img);
}

#[test]
fn sizes_generations_and_lost_parents_make_a_full_scan() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    let l = t.path().join("l.json");
    mixed_image(&img, SIZE, 8);
    // The first backup has nothing to build on: a full scan, no warning.
    list(&l, &[], serde_json::json!({"generation": "g1"}));
    let b = falls_back(&vault, &img, &l, "no previous snapshot");
    assert_eq!(b["job"]["status"], "Completed", "{b}");

    // A list relative to another generation than the recorded one.
    let e = write_at(&img, &[2 << 20], 8192, 9);
    list(
        &l,
        &e,
        serde_json::json!({"since": "g0", "generation": "g2"}),
    );
    let b = falls_back(&vault, &img, &l, "not the one recorded");
    assert!(warnings(&b).contains("full scan"), "{b}");
    restores_to(&vault, t.path(), &img);

    // The right generation (the fallback run recorded g2) is used.
    let e = write_at(&img, &[3 << 20], 8192, 10);
    list(
        &l,
        &e,
        serde_json::json!({"since": "g2", "generation": "g3"}),
    );
    let b = backup(&vault, &img, &["--changed-blocks", s(&l)]);
    assert_eq!(b["job"]["stats"]["cbt"]["used"], true, "{b}");
    restores_to(&vault, t.path(), &img);

    // The image grew: the list says nothing of the new space.
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(SIZE + (4 << 20))
        .unwrap();
    let e = write_at(&img, &[SIZE + 4096], 8192, 11);
    list(&l, &e, serde_json::json!({}));
    falls_back(&vault, &img, &l, "size");
    restores_to(&vault, t.path(), &img);

    // The parent snapshot is gone (expired, deleted): nothing to build on.
    for d in snapshot_dirs(&vault, "vm") {
        for f in std::fs::read_dir(&d).unwrap().flatten() {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    let e = write_at(&img, &[5 << 20], 8192, 12);
    list(&l, &e, serde_json::json!({}));
    let b = falls_back(&vault, &img, &l, "no previous snapshot");
    assert!(warnings(&b).contains("full scan"), "{b}");
    restores_to(&vault, t.path(), &img);
}

#[test]
fn bad_lists_are_refused_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 4 << 20, 13);
    let l = t.path().join("bad.json");
    let refused = |list: &[u8], extra: &[&str]| {
        std::fs::write(&l, list).unwrap();
        let mut args = vec!["backup", "--vault", s(&vault)];
        args.extend_from_slice(extra);
        args.push(s(&img));
        fails(&args, 1)
    };
    let with_list = ["--changed-blocks", s(&l)];
    let err = refused(
        br#"[{"offset": 0, "length": 4096, "type": 0, "description": "data"}]"#,
        &with_list,
    );
    assert!(
        err.contains("bad.json") && err.contains("base:allocation"),
        "{err}"
    );
    let err = refused(
        br#"{"format": "coffre-changed-blocks", "version": 9, "extents": []}"#,
        &with_list,
    );
    assert!(err.contains("version 9"), "{err}");
    let err = refused(b"[]", &["--bitmap", "b0"]);
    assert!(
        err.contains("needs a qcow2 image or an NBD source"),
        "{err}"
    );
    let err = refused(b"[]", &["--changed-blocks", s(&l), "--bitmap", "b0"]);
    assert!(err.contains("not both"), "{err}");
}
