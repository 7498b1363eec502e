//! Back up twice, restore both points byte-identical and sparse; the
//! second point stores only what changed; the JSON listing is complete.

use crate::common::*;

#[test]
fn two_points_restore_identically_and_incremental_is_small() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("disk.img");
    // 40 MiB plus an odd tail: the size is not a multiple of the block size.
    mixed_image(&img, (40 << 20) + 12_345, 1);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let day1 = t.path().join("day1.copy");
    std::fs::copy(&img, &day1).unwrap();

    churn(&img, 10, 100_000, 2);
    ok(&["backup", "--vault", s(&vault), "--item", "disk", s(&img)]);

    let pts = points(&vault, "disk");
    assert_eq!(pts.len(), 2);
    for p in &pts {
        for key in ["id", "created", "image_size", "stored_bytes"] {
            assert!(p.get(key).is_some(), "point lacks {key}: {p}");
        }
        assert!(p["id"].is_string());
        let _: jiff::Timestamp = p["created"]
            .as_str()
            .unwrap()
            .parse()
            .expect("RFC 3339 created");
    }
    let full = pts[0]["stored_bytes"].as_u64().unwrap();
    let incr = pts[1]["stored_bytes"].as_u64().unwrap();
    // Ten 100 kB random extents touch at most 30 blocks of 64 KiB (~2 MiB),
    // plus the touched block-map leaves.
    assert!(incr < 3 << 20, "incremental stored {incr} bytes");
    assert!(incr * 5 < full, "incremental {incr} vs full {full}");

    let r1 = t.path().join("r1.img");
    let r2 = t.path().join("r2.img");
    let id1 = pts[0]["id"].as_str().unwrap();
    ok(&restore_args(&vault, "disk", Some(id1), &r1, false));
    ok(&restore_args(&vault, "disk", None, &r2, false));
    assert_same(&r1, &day1);
    assert_same(&r2, &img);
    // Holes and zero blocks come back as holes.
    assert!(allocated(&r2) < std::fs::metadata(&r2).unwrap().len() * 3 / 4);

    // Refuses to overwrite without --force, then overwrites with it.
    let err = fails(&restore_args(&vault, "disk", Some(id1), &r2, false), 1);
    assert!(err.contains("--force"), "{err}");
    ok(&restore_args(&vault, "disk", Some(&id1[..6]), &r2, true));
    assert_same(&r2, &day1);

    let report = json(&["verify", "--vault", s(&vault), "--read-data"]);
    assert_eq!(report["findings"].as_array().unwrap().len(), 0, "{report}");
}

#[test]
fn backup_json_has_each_key_once() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 1 << 20, 5);
    let out = ok(&["--output", "json", "backup", "--vault", s(&vault), s(&img)]);
    // Top-level keys of the pretty-printed object are indented by two.
    let mut keys: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("  \""))
        .filter_map(|l| l.split('"').next())
        .collect();
    let all = keys.len();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), all, "a key appears twice: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["job"]["point"], v["id"], "{v}");
}

#[test]
fn zero_byte_image_backs_up_and_restores() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("empty.img");
    std::fs::write(&img, b"").unwrap();
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let out = t.path().join("out.img");
    ok(&restore_args(&vault, "empty", None, &out, false));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
}

#[test]
fn identical_images_deduplicate_across_items() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    random_file(&a, 8 << 20, 9);
    std::fs::copy(&a, &b).unwrap();
    ok(&["backup", "--vault", s(&vault), s(&a)]);
    ok(&["backup", "--vault", s(&vault), s(&b)]);
    let first = points(&vault, "a")[0]["stored_bytes"].as_u64().unwrap();
    let second = points(&vault, "b")[0]["stored_bytes"].as_u64().unwrap();
    assert!(first > 8 << 20, "random data is stored raw: {first}");
    // The second item only adds its block map root (its leaves equal a's).
    assert!(second < 4096, "duplicate image added {second} bytes");
    let show = json(&["vault", "show", "--vault", s(&vault)]);
    assert_eq!(show["points"], 2);
    assert_eq!(show["logical_bytes"], 16 << 20);
}

#[test]
fn vault_may_come_from_the_environment() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &["--name", "env-vault"]);
    let out = coffre()
        .args(["--output", "json", "vault", "show"])
        .env("COFFRE_VAULT", &vault)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "env-vault");
}
