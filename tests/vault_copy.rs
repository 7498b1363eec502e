//! `vault copy` (issue 23, migration): a plain vault's points copied into
//! an encrypted vault of another block size restore byte-identical, stay
//! incremental, keep their times and ids, and a second run copies
//! nothing; `--item` and `--dry-run` limit it; encrypted to encrypted
//! with different keys; a damaged source block fails its point alone,
//! named, with nothing partial committed; SIGKILL in the middle leaves a
//! destination that verifies with every earlier point intact, and a
//! re-run completes it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Days of the backups, in order.
const DAYS: [&str; 3] = [
    "2024-03-01T02:00:00Z",
    "2024-03-02T02:00:00Z",
    "2024-03-03T02:00:00Z",
];

/// `coffre` with `env` set.
fn run_env(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = coffre();
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().unwrap()
}

fn ok_env(env: &[(&str, &str)], args: &[&str]) -> String {
    succeeded(args, run_env(env, args))
}

fn json_env(env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok_env(env, &all)).expect("valid JSON")
}

/// A key file of 32 random bytes.
fn key_file(path: &Path, seed: u64) -> PathBuf {
    random_file(path, 32, seed);
    path.to_path_buf()
}

/// Creates vault `dir` with `extra` arguments (its snapshot area in the
/// test's folder).
fn create(dir: &Path, env: &[(&str, &str)], extra: &[&str]) {
    let area = dir.with_extension("area");
    let mut args = vec![
        "vault",
        "create",
        "--vault",
        s(dir),
        "--snapshot-area",
        s(&area),
        "--kdf-memory",
        "19M",
        "--kdf-passes",
        "2",
    ];
    args.extend_from_slice(extra);
    ok_env(env, &args);
}

/// Backs `img` up as `item` of `vault` at each of `DAYS`, changing it a
/// little every day after the first; returns each day's image, kept
/// aside.
fn three_days(
    vault: &Path,
    env: &[(&str, &str)],
    item: &str,
    img: &Path,
    size: u64,
    seed: u64,
) -> Vec<PathBuf> {
    mixed_image(img, size, seed);
    let mut kept = Vec::new();
    for (d, day) in DAYS.iter().enumerate() {
        if d > 0 {
            churn(img, 3, 48 << 10, seed * 10 + d as u64);
        }
        let args = ["backup", "--vault", s(vault), "--item", item, s(img)];
        let mut c = coffre();
        for (k, v) in env {
            c.env(k, v);
        }
        succeeded(&args, c.env("COFFRE_NOW", day).args(args).output().unwrap());
        let copy = img.with_extension(format!("day{d}"));
        std::fs::copy(img, &copy).unwrap();
        kept.push(copy);
    }
    kept
}

/// The vault points of `item` (key sources in `env`).
fn points_of(vault: &Path, env: &[(&str, &str)], item: &str) -> Vec<serde_json::Value> {
    json_env(env, &["points", "--vault", s(vault), "--item", item])
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["tier"] != "Snapshot")
        .cloned()
        .collect()
}

/// Points of every item of `vault`.
fn point_count(vault: &Path, env: &[(&str, &str)]) -> u64 {
    json_env(env, &["vault", "show", "--vault", s(vault)])["points"]
        .as_u64()
        .unwrap()
}

/// Restores each of `ids` from `vault` and compares it with `days`.
fn assert_restores(vault: &Path, env: &[(&str, &str)], item: &str, ids: &[&str], days: &[PathBuf]) {
    for (id, day) in ids.iter().zip(days) {
        let out = vault.with_extension(format!("{item}-{id}.img"));
        ok_env(
            env,
            &[
                "restore",
                "--vault",
                s(vault),
                "--item",
                item,
                "--point",
                id,
                "--to",
                s(&out),
                "--force",
            ],
        );
        assert_same(&out, day);
        std::fs::remove_file(&out).unwrap();
    }
}

/// The non-zero 4 KiB blocks of `image` that are incompressible (random:
/// a record stores them as they are unless it is sealed).
fn blocks_of(image: &Path) -> std::collections::HashSet<Vec<u8>> {
    std::fs::read(image)
        .unwrap()
        .chunks(4 << 10)
        .filter(|b| b.iter().any(|&x| x != 0) && b.iter().filter(|&&x| x == b' ').count() < 64)
        .map(<[u8]>::to_vec)
        .collect()
}

/// True when a file under `dir` holds one of `blocks` at any offset.
fn holds_any(dir: &Path, blocks: &std::collections::HashSet<Vec<u8>>) -> bool {
    let heads: std::collections::HashSet<&[u8]> = blocks.iter().map(|b| &b[..64]).collect();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            let data = std::fs::read(&p).unwrap();
            let hit = data.windows(64).enumerate().any(|(i, w)| {
                heads.contains(w)
                    && data
                        .get(i..i + (4 << 10))
                        .is_some_and(|b| blocks.contains(b))
            });
            if hit {
                return true;
            }
        }
    }
    false
}

/// The actions of a copy report's points, in order.
fn actions(report: &serde_json::Value) -> Vec<(String, String)> {
    report["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["item"].as_str().unwrap().to_string(),
                p["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_plain_vault_copied_into_an_encrypted_one_restores_every_point() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("plain");
    create(&src, &[], &[]);
    let days_a = three_days(&src, &[], "vm-a", &t.path().join("a.img"), 6 << 20, 1);
    let days_b = three_days(&src, &[], "vm-b", &t.path().join("b.img"), 3 << 20, 2);
    let key = key_file(&t.path().join("dst.key"), 7);
    let dst = t.path().join("sealed");
    let dkey = [("COFFRE_KEY_FILE", s(&key))];
    create(
        &dst,
        &dkey,
        &["--encryption", "aes-256-gcm", "--block-size", "256K"],
    );

    // The destination without its key: exit 15, nothing copied.
    let err = fails(&["vault", "copy", "--from", s(&src), "--to", s(&dst)], 15);
    assert!(err.contains("COFFRE_TO_KEY_FILE"), "{err}");

    let to_key = [("COFFRE_TO_KEY_FILE", s(&key))];
    let report = json_env(
        &to_key,
        &["vault", "copy", "--from", s(&src), "--to", s(&dst)],
    );
    assert_eq!(report["copied"], 6, "{report:#}");
    assert_eq!(report["skipped"], 0);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["items_created"], serde_json::json!(["vm-a", "vm-b"]));

    for (item, days) in [("vm-a", &days_a), ("vm-b", &days_b)] {
        let before = points_of(&src, &[], item);
        let after = points_of(&dst, &dkey, item);
        assert_eq!(after.len(), 3, "{item}");
        for (p, q) in before.iter().zip(&after) {
            // Same id, same instant, same consistency; the destination's
            // block size.
            assert_eq!(p["id"], q["id"]);
            assert_eq!(p["created"], q["created"]);
            assert_eq!(p["level"], q["level"]);
            assert_eq!(p["retain_until"], q["retain_until"]);
            assert_eq!(q["block_size"], 256 << 10);
        }
        let ids: Vec<&str> = after.iter().map(|p| p["id"].as_str().unwrap()).collect();
        assert_restores(&dst, &dkey, item, &ids, days);
        // Incremental: day two stored a fraction of day one. (That it
        // reads only the changed blocks, and a sample of 64 others, is the
        // engine's `ingest` test: these images are smaller than a sample.)
        let first = after[0]["stats"]["stored_bytes"].as_u64().unwrap();
        let second = after[1]["stats"]["stored_bytes"].as_u64().unwrap();
        assert!(
            second * 3 < first,
            "{item}: day two stored {second} bytes, day one {first}"
        );
    }
    ok_env(&dkey, &["verify", "--vault", s(&dst), "--read-data"]);
    // Encrypted: the plain vault holds the images' blocks in clear, the
    // copy none of them.
    let blocks = blocks_of(&days_a[0]);
    assert!(holds_any(&src, &blocks), "the check finds nothing");
    assert!(!holds_any(&dst, &blocks), "plaintext in the encrypted copy");
    // The item is there with protection stopped: nothing is scheduled.
    let item = json_env(
        &dkey,
        &["item", "show", "--vault", s(&dst), "--item", "vm-a"],
    );
    assert!(item.to_string().contains("stopped"), "{item:#}");

    // A second run copies nothing and adds nothing.
    let bytes = segment_bytes(&dst);
    let again = json_env(
        &to_key,
        &["vault", "copy", "--from", s(&src), "--to", s(&dst)],
    );
    assert_eq!(again["copied"], 0, "{again:#}");
    assert_eq!(again["skipped"], 6);
    assert_eq!(segment_bytes(&dst), bytes);

    // The same vault on both sides is refused.
    let err = fails(&["vault", "copy", "--from", s(&src), "--to", s(&src)], 1);
    assert!(err.contains("same vault"), "{err}");
    // A destination that does not exist: how to create it.
    let err = fails(
        &[
            "vault",
            "copy",
            "--from",
            s(&src),
            "--to",
            s(&t.path().join("nowhere")),
        ],
        1,
    );
    assert!(err.contains("coffre vault create"), "{err}");
}

#[test]
fn item_and_dry_run_limit_what_is_copied() {
    let t = tempfile::tempdir().unwrap();
    // The source's blocks are larger than the destination's this time,
    // and the image is not a whole number of them.
    let src = t.path().join("src");
    create(&src, &[], &["--block-size", "512K"]);
    three_days(&src, &[], "vm-a", &t.path().join("a.img"), 1 << 20, 3);
    let days_b = three_days(
        &src,
        &[],
        "vm-b",
        &t.path().join("b.img"),
        (3 << 20) + 4096,
        4,
    );
    let dst = t.path().join("dst");
    create(&dst, &[], &[]);

    let report = json(&[
        "vault",
        "copy",
        "--from",
        s(&src),
        "--to",
        s(&dst),
        "--item",
        "vm-b",
    ]);
    assert_eq!(report["copied"], 3, "{report:#}");
    assert!(
        actions(&report)
            .iter()
            .all(|(i, a)| i == "vm-b" && a == "copied")
    );
    let ids: Vec<String> = vault_points(&dst, "vm-b")
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_restores(&dst, &[], "vm-b", &ids, &days_b);
    let items = json(&["item", "list", "--vault", s(&dst)]);
    assert_eq!(items.as_array().unwrap().len(), 1, "{items:#}");

    // A dry run lists vm-a's points as to be copied, vm-b's as there, and
    // writes nothing.
    let bytes = segment_bytes(&dst);
    let dry = json(&[
        "vault",
        "copy",
        "--from",
        s(&src),
        "--to",
        s(&dst),
        "--dry-run",
    ]);
    let expected: Vec<(String, String)> = ["would_copy"; 3]
        .iter()
        .map(|a| ("vm-a".to_string(), a.to_string()))
        .chain((0..3).map(|_| ("vm-b".to_string(), "skipped".to_string())))
        .collect();
    assert_eq!(actions(&dry), expected);
    assert_eq!(dry["copied"], 3);
    assert_eq!(segment_bytes(&dst), bytes);
    let items = json(&["item", "list", "--vault", s(&dst)]);
    assert_eq!(items.as_array().unwrap().len(), 1);

    // An item the source does not have.
    let err = fails(
        &[
            "vault",
            "copy",
            "--from",
            s(&src),
            "--to",
            s(&dst),
            "--item",
            "nope",
        ],
        1,
    );
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn encrypted_to_encrypted_with_different_keys() {
    let t = tempfile::tempdir().unwrap();
    let key = key_file(&t.path().join("src.key"), 11);
    let skey = [("COFFRE_KEY_FILE", s(&key))];
    let src = t.path().join("src");
    create(&src, &skey, &["--encryption", "chacha20-poly1305"]);
    let days = three_days(&src, &skey, "vm", &t.path().join("vm.img"), 2 << 20, 5);
    // The destination opens with a passphrase from a command.
    let dst = t.path().join("dst");
    let pass = "echo 'another secret'";
    create(
        &dst,
        &[("COFFRE_PASSWORD_COMMAND", pass)],
        &["--encryption", "aes-256-gcm"],
    );
    let both = [
        ("COFFRE_KEY_FILE", s(&key)),
        ("COFFRE_TO_PASSWORD_COMMAND", pass),
    ];
    let report = json_env(
        &both,
        &["vault", "copy", "--from", s(&src), "--to", s(&dst)],
    );
    assert_eq!(report["copied"], 3, "{report:#}");
    let dpass = [("COFFRE_PASSWORD_COMMAND", pass)];
    let pts = points_of(&dst, &dpass, "vm");
    let ids: Vec<&str> = pts.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_restores(&dst, &dpass, "vm", &ids, &days);
    ok_env(&dpass, &["verify", "--vault", s(&dst), "--read-data"]);
    // The source's key does not open the destination.
    let out = run_env(
        &[
            ("COFFRE_KEY_FILE", s(&key)),
            ("COFFRE_TO_KEY_FILE", s(&key)),
        ],
        &["vault", "copy", "--from", s(&src), "--to", s(&dst)],
    );
    assert_eq!(out.status.code(), Some(15), "{out:?}");
}

#[test]
fn a_damaged_source_block_fails_its_point_and_names_it() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    create(&src, &[], &["--compression-level", "0"]);
    let img = t.path().join("vm.img");
    random_file(&img, 2 << 20, 21);
    ok(&["backup", "--vault", s(&src), "--item", "vm", s(&img)]);
    let id = vault_points(&src, "vm")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Flip a byte in the middle of the data.
    let seg = first_segment(&src);
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();

    let dst = t.path().join("dst");
    create(&dst, &[], &[]);
    let out = run(&["vault", "copy", "--from", s(&src), "--to", s(&dst)]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("point {id}")), "{err}");
    assert!(err.contains("block "), "{err}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("FAILED"), "{table}");
    // Nothing partial: no point, and the destination verifies.
    assert_eq!(point_count(&dst, &[]), 0);
    ok(&["verify", "--vault", s(&dst), "--read-data"]);
}

#[test]
fn kill_minus_nine_mid_copy_then_run_again() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    create(&src, &[], &[]);
    let img = t.path().join("vm.img");
    // Incompressible, so that the copy of each point takes a while at the
    // rate limit below.
    random_file(&img, 32 << 20, 31);
    let mut days = Vec::new();
    for (d, day) in DAYS.iter().enumerate() {
        if d > 0 {
            churn(&img, 48, 256 << 10, 40 + d as u64);
        }
        ok_at(
            day,
            &["backup", "--vault", s(&src), "--item", "vm", s(&img)],
        );
        let copy = img.with_extension(format!("day{d}"));
        std::fs::copy(&img, &copy).unwrap();
        days.push(copy);
    }
    let ids: Vec<String> = vault_points(&src, "vm")
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    let key = key_file(&t.path().join("dst.key"), 9);
    let dkey = [("COFFRE_KEY_FILE", s(&key))];
    let dst = t.path().join("dst");
    create(
        &dst,
        &dkey,
        &["--encryption", "aes-256-gcm", "--block-size", "128K"],
    );
    let copy = || {
        coffre()
            .env("COFFRE_TO_KEY_FILE", &key)
            .args([
                "vault",
                "copy",
                "--from",
                s(&src),
                "--to",
                s(&dst),
                "--rate-limit",
                "16M",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // 1. Killed during the first point: no point, a vault that verifies.
    let mut child = copy();
    let start = Instant::now();
    while segment_bytes(&dst) < 4 << 20 {
        assert!(start.elapsed() < Duration::from_secs(30), "no progress");
        assert!(child.try_wait().unwrap().is_none(), "the copy ended first");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success());
    ok_env(&dkey, &["verify", "--vault", s(&dst), "--read-data"]);
    assert_eq!(point_count(&dst, &dkey), 0);

    // 2. Killed once the first point is committed, during the second:
    // what is committed is intact.
    let mut child = copy();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("copied"), "{first}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(child.try_wait().unwrap().is_none(), "the copy ended first");
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());
    ok_env(&dkey, &["verify", "--vault", s(&dst), "--read-data"]);
    let there = points_of(&dst, &dkey, "vm");
    assert!((1..3).contains(&there.len()), "{there:?}");
    let done: Vec<&str> = ids[..there.len()].iter().map(String::as_str).collect();
    for (p, id) in there.iter().zip(&done) {
        assert_eq!(p["id"], *id);
    }
    assert_restores(&dst, &dkey, "vm", &done, &days);

    // 3. Run again: the rest is copied, what is there skipped.
    let to_key = [("COFFRE_TO_KEY_FILE", s(&key))];
    let report = json_env(
        &to_key,
        &["vault", "copy", "--from", s(&src), "--to", s(&dst)],
    );
    assert_eq!(report["skipped"], there.len(), "{report:#}");
    assert_eq!(report["copied"], 3 - there.len());
    ok_env(&dkey, &["verify", "--vault", s(&dst), "--read-data"]);
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_restores(&dst, &dkey, "vm", &id_refs, &days);
    // What the killed runs wrote was reused or reclaimed, never kept twice.
    let show = json_env(&dkey, &["vault", "show", "--vault", s(&dst)]);
    assert_eq!(
        show["stored_bytes"].as_u64().unwrap(),
        segment_bytes(&dst),
        "orphan bytes left in segments"
    );
}
