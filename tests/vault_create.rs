//! Vault creation enforces names, block sizes and levels, and never
//! overwrites an existing directory's content; the snapshot area setting
//! is set and reset.

use crate::common::*;

#[test]
fn settings_are_validated_and_shown() {
    let t = tempfile::tempdir().unwrap();
    let v = t.path().join("v");
    for (args, needle) in [
        (vec!["--name", "1vault"], "does not start with a letter"),
        (vec!["--name", "a"], "2-50 characters"),
        (vec!["--name", "bad_name"], "contains '_'"),
        (vec!["--block-size", "32K"], "block-size"),
        (vec!["--block-size", "100000"], "power of two"),
        (vec!["--block-size", "8M"], "block-size"),
        (vec!["--compression-level", "25"], "compression-level"),
    ] {
        let mut all = vec!["vault", "create", "--vault", s(&v)];
        all.extend(args);
        let err = fails(&all, 1);
        assert!(err.contains(needle), "{err}");
        assert!(!v.join("config").exists());
    }
    let json = json(&[
        "vault",
        "create",
        "--vault",
        s(&v),
        "--name",
        "Prod-Vault-01",
        "--block-size",
        "1M",
        "--compression-level",
        "3",
    ]);
    assert_eq!(json["block_size"], 1 << 20);
    assert_eq!(json["compression_level"], 3);
    assert_eq!(json["redundancy"], "LRS");
    let table = ok(&["vault", "show", "--vault", s(&v)]);
    assert!(
        table.contains("Prod-Vault-01") && table.contains("1.00 MiB"),
        "{table}"
    );
    // Creating again over a vault is refused.
    let err = fails(&["vault", "create", "--vault", s(&v)], 1);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn the_snapshot_area_is_set_and_reset() {
    let t = tempfile::tempdir().unwrap();
    let v = t.path().join("v");
    let created = json(&["vault", "create", "--vault", s(&v), "--snapshot-area", ""]);
    assert!(created["snapshot_area"].is_null(), "{created}");
    let area = t.path().join("area");
    let set = json(&[
        "vault",
        "set",
        "--vault",
        s(&v),
        "--snapshot-area",
        s(&area),
    ]);
    assert_eq!(set["snapshot_area"], s(&area));
    let shown = json(&["vault", "show", "--vault", s(&v)]);
    assert_eq!(shown["snapshot_area"], s(&area));
    let reset = json(&["vault", "set", "--vault", s(&v), "--snapshot-area", ""]);
    assert!(reset["snapshot_area"].is_null(), "{reset}");
    let err = fails(&["vault", "set", "--vault", s(&v)], 1);
    assert!(err.contains("nothing to set"), "{err}");
}
