//! `coffre bench` runs every stage and reports each with its reference
//! (or why the reference was skipped). No timing is asserted: the
//! machines are shared; the figures are for people.

use crate::common::*;

#[test]
fn coffre_bench_reports_every_stage() {
    let t = tempfile::tempdir().unwrap();
    let r = json(&["bench", "--size", "8M", "--dir", s(t.path())]);
    let names: Vec<&str> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "read",
            "blake3-1",
            "blake3-all",
            "zstd-compress",
            "zstd-decompress",
            "chunk-encode",
            "chunk-decode",
            "aes-256-gcm",
            "chacha20-poly1305",
            "backup",
            "disk-write",
            "restore",
            "restore-vault"
        ]
    );
    for s in r["stages"].as_array().unwrap() {
        assert!(s["mib_per_s"].as_f64().unwrap() > 0.0, "{s}");
        if s["name"] != "read" && s["name"] != "disk-write" {
            let reference = &s["reference"];
            assert!(
                reference["mib_per_s"].as_f64().is_some_and(|m| m > 0.0)
                    || reference["skipped"].is_string(),
                "{s}"
            );
        }
    }
    // Both restores are measured against the disk's own write of their
    // data, and say how many times its time they took.
    for restore in [&r["stages"][11], &r["stages"][12]] {
        assert_eq!(restore["reference"]["name"], "disk-write of the same data");
        assert!(restore["floor_factor"].as_f64().unwrap() > 0.0, "{restore}");
    }
    let ratio = r["compression_ratio"].as_f64().unwrap();
    assert!(ratio > 0.1 && ratio < 0.9, "{r}");
    // Nothing is left behind in the folder given.
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
}

#[test]
fn a_bench_folder_it_cannot_write_in_is_named() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("not-there");
    let err = fails(&["bench", "--size", "8M", "--dir", s(&missing)], 1);
    assert!(err.contains(s(&missing)), "{err}");
    assert!(err.contains("No such file"), "{err}");
}
