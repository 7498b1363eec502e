//! FORMAT.md, invariant C2: a crash after the copies received a point's
//! manifest but before the index committed it (steps 3 and 4 of the write
//! order) leaves a manifest naming bytes past the committed length. The
//! next writer removes it from every copy and cuts the bytes, and a rebuilt
//! index knows exactly the acknowledged points.

use std::fs;
use std::path::Path;

use crate::common::*;

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn manifests(copy: &Path) -> usize {
    fs::read_dir(copy.join("points/vm"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_manifest_without_its_commit_is_removed() {
    let t = tempfile::tempdir().unwrap();
    let replica = t.path().join("replica");
    let vault = new_vault(t.path(), &["--replica", s(&replica)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    mixed_image(&img, 8 << 20, 21);
    let day1 = t.path().join("day1.img");
    fs::copy(&img, &day1).unwrap();
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    let seg_len = segment_bytes(&vault);

    // The index as it was before the second backup: putting it back is the
    // state a crash between the manifests' put and the index commit leaves.
    let saved = t.path().join("index-before");
    copy_dir(&vault.join("index"), &saved);
    churn(&img, 20, 60_000, 22);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    assert_eq!(manifests(&vault), 2);
    assert_eq!(manifests(&replica), 2);
    assert!(segment_bytes(&replica) > seg_len);
    fs::remove_dir_all(vault.join("index")).unwrap();
    copy_dir(&saved, &vault.join("index"));

    // Readers see only the committed point; the next writer cleans up.
    assert_eq!(vault_points(&vault, "vm").len(), 1);
    ok(&["prune", "--vault", v]);
    assert_eq!(
        manifests(&vault),
        1,
        "the primary keeps the orphan manifest"
    );
    assert_eq!(
        manifests(&replica),
        1,
        "the replica keeps the orphan manifest"
    );
    assert_eq!(segment_bytes(&vault), seg_len);
    assert_eq!(segment_bytes(&replica), seg_len);
    ok(&["verify", "--vault", v, "--read-data"]);

    // Rebuilt from the replica, the index knows exactly point 1.
    fs::remove_dir_all(vault.join("index")).unwrap();
    ok(&[
        "vault",
        "rebuild-index",
        "--vault",
        v,
        "--from",
        s(&replica),
    ]);
    let pts = vault_points(&vault, "vm");
    assert_eq!(pts.len(), 1);
    let out = t.path().join("out.img");
    let mut a = restore_args(&vault, "vm", pts[0]["id"].as_str(), &out, false);
    a.extend(["--from", "vault"]);
    ok(&a);
    assert_same(&out, &day1);
    ok(&["verify", "--vault", v, "--read-data"]);
}

/// The other side of C2: a crash after the index forgot a pruned point but
/// before the copies lost its manifest (steps 4 and 5) leaves an extra
/// manifest: `verify` warns (exit 0), and the next writer removes it.
#[test]
fn a_pruned_points_manifest_left_behind_is_only_a_warning() {
    let t = tempfile::tempdir().unwrap();
    let replica = t.path().join("replica");
    let vault = new_vault(t.path(), &["--replica", s(&replica)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    mixed_image(&img, 4 << 20, 23);
    // Point 1 expires at the February prune, point 2 is kept.
    for until in ["2027-01-02", "2099-01-01"] {
        ok_at(
            "2027-01-01T00:00:00Z",
            &[
                "backup",
                "--vault",
                v,
                "--item",
                "vm",
                "--retain-until",
                until,
                s(&img),
            ],
        );
        churn(&img, 8, 30_000, 24);
    }
    let first = "points/vm/0000000000000001.point";
    let saved = fs::read(replica.join(first)).unwrap();
    ok_at("2027-02-01T00:00:00Z", &["prune", "--vault", v]);
    assert!(!replica.join(first).exists());
    // Put it back, as a crash between the commit and the deletion leaves it.
    fs::write(replica.join(first), &saved).unwrap();
    let report = json(&["verify", "--vault", v]);
    let orphaned: Vec<&serde_json::Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["code"] == "orphaned")
        .collect();
    assert_eq!(orphaned.len(), 1, "{report}");
    assert_eq!(orphaned[0]["severity"], "warning", "{report}");
    ok(&["gc", "--vault", v]);
    assert!(!replica.join(first).exists(), "the next writer removes it");
    assert_eq!(manifests(&replica), 1);
    ok(&["verify", "--vault", v, "--read-data"]);
}
