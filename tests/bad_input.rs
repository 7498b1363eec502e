//! Bad input gets a clear error naming the file, never a panic, and
//! changes nothing in the vault.

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

fn no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
}

#[test]
fn missing_image() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("nope.img");
    let err = fails(&["backup", "--vault", s(&vault), s(&img)], 1);
    assert!(
        err.contains("nope.img") && err.contains("does not exist"),
        "{err}"
    );
    no_panic(&err);
}

#[test]
fn directory_as_image() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let err = fails(
        &["backup", "--vault", s(&vault), "--item", "d", s(t.path())],
        1,
    );
    assert!(err.contains("is a directory"), "{err}");
    no_panic(&err);
}

#[test]
fn unreadable_image() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("secret.img");
    random_file(&img, 1 << 20, 1);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o000)).unwrap();
    let out = if is_root() {
        // Root reads anything; drop to an unprivileged user for the check.
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        for entry in walk(&vault) {
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin())
            .args(["backup", "--vault", s(&vault), s(&img)])
            .output()
            .expect("setpriv (util-linux) is needed to test as root")
    } else {
        run(&["backup", "--vault", s(&vault), s(&img)])
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("secret.img") && err.contains("cannot be read"),
        "{err}"
    );
    no_panic(&err);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn path_that_is_not_a_vault() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.img");
    random_file(&img, 4096, 1);
    let err = fails(&["backup", "--vault", s(t.path()), s(&img)], 5);
    assert!(err.contains("is not a coffre vault"), "{err}");
    let err = fails(
        &[
            "points",
            "--vault",
            s(&t.path().join("missing")),
            "--item",
            "a",
        ],
        5,
    );
    assert!(err.contains("is not a coffre vault"), "{err}");
    let err = fails(&["verify", "--vault", s(&img)], 5);
    assert!(err.contains("is not a coffre vault"), "{err}");
}

#[test]
fn vault_of_a_newer_format_version_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let cfg = vault.join("config");
    // A vault with copies is at version 3 (builds without copies refuse
    // it); one without, at 2.
    assert_eq!(
        json(&["vault", "show", "--vault", s(&vault)])["format_version"],
        2
    );
    let copied = new_vault(
        &t.path().join("copied"),
        &["--replica", s(&t.path().join("r"))],
    );
    assert_eq!(
        json(&["vault", "show", "--vault", s(&copied)])["format_version"],
        3
    );
    // Version 4 is a vault in object storage (tests/object_store.rs), 5
    // one holding adopted packs (tests/adopted_pack.rs), 6 an encrypted
    // vault (tests/encryption.rs).
    set_config_version(&cfg, 7);
    let err = fails(&["vault", "show", "--vault", s(&vault)], 5);
    assert!(err.contains("format version 7 is newer"), "{err}");
    let img = t.path().join("a.img");
    random_file(&img, 4096, 1);
    let err = fails(&["backup", "--vault", s(&vault), s(&img)], 5);
    assert!(err.contains("upgrade coffre"), "{err}");
}

fn set_config_version(cfg: &std::path::Path, version: u32) {
    let mut bytes = std::fs::read(cfg).unwrap();
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    let n = bytes.len();
    let crc = crc32fast::hash(&bytes[..n - 4]);
    bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(cfg, bytes).unwrap();
}

#[test]
fn a_version_1_vault_is_read_as_is_and_upgraded_by_the_first_writer() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("a.img");
    random_file(&img, 200_000, 1);
    ok(&["backup", "--vault", v, s(&img)]);
    set_config_version(&vault.join("config"), 1);
    // Readers leave it at version 1 (a version-1 build can still use it).
    assert_eq!(json(&["vault", "show", "--vault", v])["format_version"], 1);
    ok(&["verify", "--vault", v, "--read-data"]);
    assert_eq!(json(&["vault", "show", "--vault", v])["format_version"], 1);
    // The first writer upgrades it, so a version-1 build refuses it from
    // then on (it would not keep the reference counts GC relies on).
    // (At 5, not 2: its first backup adopted its pack as a segment.)
    ok(&["backup", "--vault", v, s(&img)]);
    assert_eq!(json(&["vault", "show", "--vault", v])["format_version"], 5);
    ok(&["verify", "--vault", v, "--read-data"]);
}

/// A format upgrade reaches every copy: a replica whose config stayed
/// at an older version gets the new one from the first writer, even when
/// the primary's is already current.
#[test]
fn a_format_upgrade_writes_the_config_to_every_copy() {
    let t = tempfile::tempdir().unwrap();
    let replica = t.path().join("replica");
    let vault = new_vault(t.path(), &["--replica", s(&replica)]);
    let v = s(&vault);
    let img = t.path().join("a.img");
    random_file(&img, 200_000, 1);
    ok(&["backup", "--vault", v, s(&img)]);
    let version = |dir: &std::path::Path| {
        let b = std::fs::read(dir.join("config")).unwrap();
        u32::from_le_bytes(b[8..12].try_into().unwrap())
    };
    let current = version(&vault);
    assert_eq!(version(&replica), current);
    set_config_version(&replica.join("config"), 1);
    // A reader leaves the replica as it is.
    ok(&["verify", "--vault", v, "--read-data"]);
    assert_eq!(version(&replica), 1);
    // The first writer brings it up to the primary's version.
    ok(&["backup", "--vault", v, s(&img)]);
    assert_eq!(version(&replica), current);
    assert_eq!(version(&vault), current);
    ok(&["verify", "--vault", v, "--read-data"]);
}

#[test]
fn corrupt_config_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let cfg = vault.join("config");
    let mut bytes = std::fs::read(&cfg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&cfg, bytes).unwrap();
    let err = fails(&["vault", "show", "--vault", s(&vault)], 5);
    assert!(
        err.contains("corrupt vault config") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn unknown_item_and_point() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("a.img");
    random_file(&img, 70_000, 1);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let out = t.path().join("o.img");
    let err = fails(&restore_args(&vault, "b", None, &out, false), 1);
    assert!(err.contains("no item \"b\""), "{err}");
    let err = fails(&restore_args(&vault, "a", Some("ffffffff"), &out, false), 1);
    assert!(err.contains("no recovery point \"ffffffff\""), "{err}");
    let err = fails(
        &["backup", "--vault", s(&vault), "--item", "../x", s(&img)],
        1,
    );
    assert!(err.contains("item name"), "{err}");
}
