//! Encrypted vaults through the CLI (issue 23, first part): what is at
//! rest holds no block of the image, in the vault, its LRS replicas, its
//! GRS secondary and the snapshot area; every point restores byte-identical
//! from each tier; a missing or wrong key is exit code 15; key slots can be
//! added, replaced and removed (never the last), and the recovery text
//! brings a vault back when every slot is lost; a damaged sealed record is
//! found by `verify` and never restored.

use std::path::Path;
use std::process::Output;

use crate::common::plaintext::{blocks_of, files_with_plaintext};
use crate::common::*;

const KIB: usize = 1024;

/// `coffre` with the key file `key` (and extra environment).
fn with_key(key: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--key-file", s(key)];
    all.extend_from_slice(args);
    coffre().args(&all).output().unwrap()
}

fn ok_key(key: &Path, args: &[&str]) -> String {
    let mut all = vec!["--key-file", s(key)];
    all.extend_from_slice(args);
    succeeded(&all, with_key(key, args))
}

fn json_key(key: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok_key(key, &all)).unwrap()
}

#[test]
fn an_encrypted_vault_and_its_copies_hold_no_plaintext_and_restore_exactly() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = dir.join("key");
    random_file(&key, 32, 7);
    let img = dir.join("vm.img");
    mixed_image(&img, 24 << 20, 23);
    let vault = dir.join("vault");
    let (r1, r2, sec, area) = (
        dir.join("r1"),
        dir.join("r2"),
        dir.join("sec"),
        dir.join("area"),
    );
    // Raw records (level 0): compression cannot hide plaintext.
    let created = json_key(
        &key,
        &[
            "vault",
            "create",
            "--vault",
            s(&vault),
            "--encryption",
            "chacha20-poly1305",
            "--compression-level",
            "0",
            "--replica",
            s(&r1),
            "--replica",
            s(&r2),
            "--secondary",
            s(&sec),
            "--snapshot-area",
            s(&area),
        ],
    );
    assert_eq!(created["encryption"], "chacha20-poly1305", "{created:#}");
    let day1 = dir.join("day1.img");
    std::fs::copy(&img, &day1).unwrap();
    ok_key(
        &key,
        &["backup", "--vault", s(&vault), "--item", "vm", s(&img)],
    );
    churn(&img, 40, 8 * KIB, 5);
    ok_key(
        &key,
        &["backup", "--vault", s(&vault), "--item", "vm", s(&img)],
    );
    ok_key(&key, &["replicate", "--vault", s(&vault)]);

    let mut blocks = blocks_of(&day1);
    blocks.extend(blocks_of(&img));
    assert!(blocks.len() > 3000, "{} blocks", blocks.len());
    let at_rest = [
        vault.clone(),
        r1.clone(),
        r2.clone(),
        sec.clone(),
        area.clone(),
    ];
    let leaks = files_with_plaintext(&at_rest, &blocks);
    assert!(leaks.is_empty(), "plaintext blocks in {leaks:?}");
    // The check itself finds plaintext: the image is in `dir`.
    assert!(files_with_plaintext(&[dir.to_path_buf()], &blocks).len() >= 2);

    // Every point, from each tier, is the image at its time.
    let points = json_key(&key, &["points", "--vault", s(&vault), "--item", "vm"]);
    let ids: Vec<String> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{points:#}");
    for (id, want) in ids.iter().zip([&day1, &img]) {
        for from in ["snapshot", "vault", "secondary"] {
            let to = dir.join(format!("r-{id}-{from}.img"));
            ok_key(
                &key,
                &[
                    "restore",
                    "--vault",
                    s(&vault),
                    "--item",
                    "vm",
                    "--point",
                    id,
                    "--from",
                    from,
                    "--to",
                    s(&to),
                ],
            );
            assert_same(&to, want);
        }
    }
    let v = json_key(&key, &["verify", "--vault", s(&vault), "--read-data"]);
    assert_eq!(v["findings"].as_array().map(Vec::len), Some(0), "{v:#}");
    assert_eq!(v["detected"], 0, "{v:#}");
}

#[test]
fn a_missing_or_wrong_key_is_exit_code_15() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = dir.join("key");
    random_file(&key, 32, 1);
    let img = dir.join("a.img");
    random_file(&img, 256 * KIB, 2);
    let vault = dir.join("vault");
    ok_key(
        &key,
        &[
            "vault",
            "create",
            "--vault",
            s(&vault),
            "--encryption",
            "aes-256-gcm",
        ],
    );
    ok_key(&key, &["backup", "--vault", s(&vault), s(&img)]);
    let wrong = dir.join("wrong");
    random_file(&wrong, 32, 3);
    let out = with_key(&wrong, &["points", "--vault", s(&vault), "--item", "a.img"]);
    assert_eq!(out.status.code(), Some(15), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("none of the vault's 1 key slot(s) opens"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    // No key at all, no terminal.
    let out = coffre()
        .args(["points", "--vault", s(&vault), "--item", "a.img"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(15), "{out:?}");
    // A wrong passphrase from the password command.
    let out = coffre()
        .env("COFFRE_PASSWORD_COMMAND", "echo not-it")
        .args(["points", "--vault", s(&vault), "--item", "a.img"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(15), "{out:?}");
    // An unencrypted vault has no keys to list.
    let plain = new_vault(&dir.join("p"), &[]);
    let e = fails(&["key", "list", "--vault", s(&plain)], 1);
    assert!(e.contains("is not encrypted"), "{e}");
}

#[test]
fn key_slots_change_and_the_recovery_text_brings_a_vault_back() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = dir.join("key");
    random_file(&key, 32, 11);
    let img = dir.join("disk.img");
    mixed_image(&img, 4 << 20, 12);
    let vault = dir.join("vault");
    let pass = |p: &str| format!("echo {p}");
    // Argon2id below the floor of new slots is refused.
    let out = coffre()
        .env("COFFRE_PASSWORD_COMMAND", pass("first secret"))
        .args([
            "vault",
            "create",
            "--vault",
            s(&vault),
            "--encryption",
            "aes-256-gcm",
            "--kdf-memory",
            "1M",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("too weak"), "{err}");
    assert!(!vault.join("config").exists());
    // Created with a passphrase (Argon2id at the floor of new slots: the
    // test checks slots, not their cost).
    let out = coffre()
        .env("COFFRE_PASSWORD_COMMAND", pass("first secret"))
        .args([
            "vault",
            "create",
            "--vault",
            s(&vault),
            "--encryption",
            "aes-256-gcm",
            "--kdf-memory",
            "19M",
            "--kdf-passes",
            "2",
        ])
        .output()
        .unwrap();
    succeeded(&["vault", "create"], out);
    let with_pass = |p: &str, args: &[&str]| {
        coffre()
            .env("COFFRE_PASSWORD_COMMAND", pass(p))
            .env("COFFRE_NEW_PASSWORD_COMMAND", pass("second secret"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = with_pass(
        "first secret",
        &[
            "backup",
            "--vault",
            s(&vault),
            "--item",
            "disk.img",
            s(&img),
        ],
    );
    succeeded(&["backup"], out);
    // Add a key file; passwd the passphrase; the old passphrase fails.
    let out = with_pass(
        "first secret",
        &[
            "key",
            "add",
            "--vault",
            s(&vault),
            "--new-key-file",
            s(&key),
            "--label",
            "usb",
        ],
    );
    succeeded(&["key", "add"], out);
    let out = with_pass(
        "first secret",
        &[
            "key",
            "passwd",
            "--vault",
            s(&vault),
            "--kdf-memory",
            "19M",
            "--kdf-passes",
            "2",
        ],
    );
    succeeded(&["key", "passwd"], out);
    let slots = json_key(&key, &["key", "list", "--vault", s(&vault)]);
    let kinds: Vec<&str> = slots
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["key-file", "passphrase"], "{slots:#}");
    let out = with_pass(
        "first secret",
        &["points", "--vault", s(&vault), "--item", "disk.img"],
    );
    assert_eq!(
        out.status.code(),
        Some(15),
        "the old passphrase must fail: {out:?}"
    );
    let out = with_pass(
        "second secret",
        &["points", "--vault", s(&vault), "--item", "disk.img"],
    );
    succeeded(&["points"], out);

    // The recovery text round-trips; then every slot is lost but one
    // that nobody can open.
    // Never printed to a pipe unless asked to: --to writes a new 0600 file.
    let out = with_key(&key, &["key", "export", "--vault", s(&vault)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a terminal"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    let paper = dir.join("paper.txt");
    ok_key(
        &key,
        &["key", "export", "--vault", s(&vault), "--to", s(&paper)],
    );
    let text = std::fs::read_to_string(&paper).unwrap();
    assert!(
        text.starts_with("coffre recovery key v1 for vault "),
        "{text}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&paper).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = with_key(
        &key,
        &["key", "export", "--vault", s(&vault), "--to", s(&paper)],
    );
    assert!(
        !out.status.success(),
        "an existing file is never overwritten"
    );
    assert_eq!(std::fs::read_to_string(&paper).unwrap(), text);
    let forced = ok_key(&key, &["key", "export", "--vault", s(&vault), "--force"]);
    assert_eq!(forced, text);
    let pass_slot = slots[1]["id"].as_str().unwrap().to_string();
    ok_key(
        &key,
        &["key", "remove", "--vault", s(&vault), "--id", &pass_slot],
    );
    let key_slot = slots[0]["id"].as_str().unwrap().to_string();
    let e = String::from_utf8_lossy(
        &with_key(
            &key,
            &["key", "remove", "--vault", s(&vault), "--id", &key_slot],
        )
        .stderr,
    )
    .into_owned();
    assert!(e.contains("is the vault's last"), "{e}");
    std::fs::remove_file(&key).unwrap();
    let new_key = dir.join("new-key");
    random_file(&new_key, 48, 13);
    // A recovery text with one digit wrong is refused before it is tried.
    let mut bad = text.clone().into_bytes();
    let at = bad.iter().rposition(|b| b.is_ascii_hexdigit()).unwrap();
    bad[at] = if bad[at] == b'0' { b'1' } else { b'0' };
    let bad_paper = dir.join("bad.txt");
    std::fs::write(&bad_paper, bad).unwrap();
    let e = fails(
        &[
            "key",
            "import",
            "--vault",
            s(&vault),
            "--recovery",
            s(&bad_paper),
            "--new-key-file",
            s(&new_key),
        ],
        15,
    );
    assert!(e.contains("copied wrong"), "{e}");
    ok(&[
        "key",
        "import",
        "--vault",
        s(&vault),
        "--recovery",
        s(&paper),
        "--new-key-file",
        s(&new_key),
    ]);
    let to = dir.join("back.img");
    ok_key(
        &new_key,
        &[
            "restore",
            "--vault",
            s(&vault),
            "--item",
            "disk.img",
            "--to",
            s(&to),
        ],
    );
    assert_same(&to, &img);
    // Another vault's recovery text does not open this one.
    let other = dir.join("other");
    ok_key(
        &new_key,
        &[
            "vault",
            "create",
            "--vault",
            s(&other),
            "--encryption",
            "aes-256-gcm",
        ],
    );
    let other_text = ok_key(
        &new_key,
        &["key", "export", "--vault", s(&other), "--force"],
    );
    let other_paper = dir.join("other.txt");
    std::fs::write(&other_paper, other_text).unwrap();
    let out = run(&[
        "key",
        "import",
        "--vault",
        s(&vault),
        "--recovery",
        s(&other_paper),
        "--new-key-file",
        s(&new_key),
    ]);
    assert_eq!(out.status.code(), Some(15), "{out:?}");
}

#[test]
fn generated_key_files_are_strong_private_and_never_overwritten() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (key, vault) = (dir.join("vault.key"), dir.join("vault"));
    // The first slot's key file, written by `vault create`.
    ok(&[
        "vault",
        "create",
        "--vault",
        s(&vault),
        "--encryption",
        "chacha20-poly1305",
        "--generate-key-file",
        s(&key),
    ]);
    assert_eq!(std::fs::read(&key).unwrap().len(), 32);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let slots = json_key(&key, &["key", "list", "--vault", s(&vault)]);
    assert_eq!(slots.as_array().map(Vec::len), Some(1), "{slots:#}");
    // An existing file is refused, left as it was, and no slot is added.
    let before = std::fs::read(&key).unwrap();
    let out = with_key(
        &key,
        &[
            "key",
            "add",
            "--vault",
            s(&vault),
            "--generate-key-file",
            s(&key),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("exists already"),
        "{err}"
    );
    assert_eq!(std::fs::read(&key).unwrap(), before);
    let other = dir.join("other");
    let out = coffre()
        .args(["vault", "create", "--vault", s(&other), "--encryption"])
        .args(["aes-256-gcm", "--generate-key-file", s(&key)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(!other.join("config").exists());
    // A second generated key opens the vault too.
    let second = dir.join("second.key");
    ok_key(
        &key,
        &[
            "key",
            "add",
            "--vault",
            s(&vault),
            "--generate-key-file",
            s(&second),
        ],
    );
    let slots = json_key(&second, &["key", "list", "--vault", s(&vault)]);
    assert_eq!(slots.as_array().map(Vec::len), Some(2), "{slots:#}");
    assert_ne!(std::fs::read(&second).unwrap(), before);
    // A key file shorter than 32 bytes makes no slot, and opens nothing.
    let short = dir.join("short.key");
    random_file(&short, 16, 5);
    let out = with_key(
        &key,
        &[
            "key",
            "add",
            "--vault",
            s(&vault),
            "--new-key-file",
            s(&short),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("16 bytes"), "{err}");
    let out = with_key(&short, &["key", "list", "--vault", s(&vault)]);
    assert_eq!(out.status.code(), Some(15), "{out:?}");
    // --generate-key-file needs --encryption.
    let out = coffre()
        .args(["vault", "create", "--vault", s(&other)])
        .args(["--generate-key-file", s(&dir.join("x.key"))])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_damaged_sealed_record_is_found_by_verify_and_never_restored() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = dir.join("key");
    random_file(&key, 32, 21);
    let img = dir.join("d.img");
    random_file(&img, 1 << 20, 22);
    let vault = dir.join("vault");
    ok_key(
        &key,
        &[
            "vault",
            "create",
            "--vault",
            s(&vault),
            "--encryption",
            "aes-256-gcm",
            "--compression-level",
            "0",
        ],
    );
    ok_key(
        &key,
        &["backup", "--vault", s(&vault), "--item", "d.img", s(&img)],
    );
    // One bit of a sealed payload, its CRC fixed up: only the seal can
    // tell (the same forgery a bucket writer could make).
    let seg = first_segment(&vault);
    let mut bytes = std::fs::read(&seg).unwrap();
    let rec = 32; // first record, after the segment header
    let stored = u32::from_le_bytes(bytes[rec + 12..rec + 16].try_into().unwrap()) as usize;
    bytes[rec + 56 + stored / 2] ^= 0x10;
    let crc = crc32fast::hash(&bytes[rec + 56..rec + 56 + stored]);
    bytes[rec + 48..rec + 52].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32fast::hash(&bytes[rec..rec + 52]);
    bytes[rec + 52..rec + 56].copy_from_slice(&hcrc.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let out = with_key(
        &key,
        &[
            "--output",
            "json",
            "verify",
            "--vault",
            s(&vault),
            "--read-data",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("authentication"), "{report}");
    let to = dir.join("out.img");
    let out = with_key(
        &key,
        &[
            "restore",
            "--vault",
            s(&vault),
            "--item",
            "d.img",
            "--from",
            "vault",
            "--to",
            s(&to),
        ],
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(!to.exists(), "nothing restored from a forged record");
}
