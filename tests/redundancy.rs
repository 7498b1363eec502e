//! LRS replicas, the GRS secondary, rebuild-index and scrub, end to end
//! with the real binary: copies are byte-identical, each stands alone,
//! damage on one copy is found and repaired from another, damage on every
//! copy is reported exactly and never zero-filled.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::common::*;

/// Records of a segment file: (offset, length, chunk id in hex).
fn records(seg: &Path) -> Vec<(u64, u64, String)> {
    let b = fs::read(seg).unwrap();
    let mut out = Vec::new();
    let mut at = 32usize;
    while at + 56 <= b.len() && &b[at..at + 4] == b"CFCK" {
        let stored = u32::from_le_bytes(b[at + 12..at + 16].try_into().unwrap()) as usize;
        out.push((at as u64, (56 + stored) as u64, hex(&b[at + 16..at + 48])));
        at += 56 + stored;
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn seg_of(copy: &Path) -> PathBuf {
    first_segment(copy)
}

fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
}

fn punch(path: &Path, at: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    // SAFETY: fallocate on an fd we own.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        // No hole punching here: write zeros instead (the bytes are gone
        // either way).
        use std::os::unix::fs::FileExt;
        f.write_all_at(&vec![0u8; len as usize], at).unwrap();
    }
}

/// A vault with two replicas and a 72 MiB random image backed up once
/// (1,152 data chunks of 64 KiB).
fn three_copy_vault(t: &Path) -> (PathBuf, [PathBuf; 2], PathBuf) {
    let r1 = t.join("r1");
    let r2 = t.join("r2");
    let vault = new_vault(t, &["--replica", s(&r1), "--replica", s(&r2)]);
    let img = t.join("disk.img");
    random_file(&img, 72 << 20, 7);
    ok(&["backup", "--vault", s(&vault), "--item", "disk", s(&img)]);
    (vault, [r1, r2], img)
}

#[test]
fn lrs_copies_are_identical_listed_and_each_can_rebuild_the_index() {
    let t = tempfile::tempdir().unwrap();
    let r1 = t.path().join("r1");
    let r2 = t.path().join("r2");
    let vault = new_vault(t.path(), &["--replica", s(&r1), "--replica", s(&r2)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    mixed_image(&img, 24 << 20, 3);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    let day1 = t.path().join("day1.img");
    fs::copy(&img, &day1).unwrap();
    churn(&img, 40, 50_000, 9);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    // Same bytes at the same offsets on every copy, and the catalog files.
    let primary = fs::read(seg_of(&vault)).unwrap();
    for r in [&r1, &r2] {
        assert!(
            fs::read(seg_of(r)).unwrap() == primary,
            "{} differs",
            r.display()
        );
        assert_eq!(fs::read_dir(r.join("points/vm")).unwrap().count(), 2);
        assert!(r.join("items/vm.item").is_file());
    }
    let show = json(&["vault", "show", "--vault", v]);
    let copies = show["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 3, "{show}");
    assert_eq!(copies[1]["role"], "replica");
    assert!(copies[1]["space"]["free_bytes"].as_u64().unwrap() > 0);
    let warnings = show["copy_warnings"].to_string();
    assert!(warnings.contains("same device"), "{warnings}");
    // The index is a cache: delete it, rebuild it from a replica, and
    // every point restores byte-identical.
    fs::remove_dir_all(vault.join("index")).unwrap();
    let err = fails(&["points", "--vault", v, "--item", "vm"], 1);
    assert!(
        err.contains("no index") && err.contains("rebuild-index"),
        "{err}"
    );
    let report = json(&["vault", "rebuild-index", "--vault", v, "--from", s(&r2)]);
    assert_eq!(report["points"], 2, "{report}");
    assert_eq!(report["items"], 1, "{report}");
    let verify = json(&["verify", "--vault", v, "--read-data"]);
    assert_eq!(verify["detected"], 0, "{verify}");
    assert!(
        verify["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["severity"] != "error"),
        "{verify}"
    );
    let pts = vault_points(&vault, "vm");
    assert_eq!(pts.len(), 2);
    for (p, want) in pts.iter().zip([&day1, &img]) {
        let out = t.path().join(format!("{}.img", p["id"].as_str().unwrap()));
        ok(&restore_args(&vault, "vm", p["id"].as_str(), &out, false));
        assert_same(&out, want);
    }
    // The policy and the protection came back too.
    let again = json(&["points", "--vault", v, "--item", "vm"]);
    assert_eq!(again.as_array().unwrap().len(), 2);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
}

#[test]
fn damage_on_one_copy_is_all_found_and_repaired_from_the_others() {
    let t = tempfile::tempdir().unwrap();
    let (vault, [r1, r2], img) = three_copy_vault(t.path());
    let v = s(&vault);
    let seg = seg_of(&r1);
    let recs = records(&seg);
    assert!(recs.len() >= 1000, "{} records", recs.len());
    // 1,000 chunk copies on replica 1: flip a bit in 334, delete 333
    // (their bytes punched out), truncate 333 (the file cut off before
    // the last 333 records).
    let n = recs.len();
    let cut = recs[n - 333].0 + 7;
    for (off, len, _) in recs.iter().take(334) {
        flip(&seg, off + len / 2);
    }
    for (off, len, _) in recs.iter().skip(334).take(333) {
        punch(&seg, *off, *len);
    }
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let good = [
        fs::read(seg_of(&vault)).unwrap(),
        fs::read(seg_of(&r2)).unwrap(),
    ];
    let found = run(&["--output", "json", "verify", "--vault", v, "--read-data"]);
    assert_eq!(found.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(report["detected"], 1000, "all 1,000 bad copies are found");
    assert_eq!(report["unrecoverable"].as_array().unwrap().len(), 0);
    let codes: BTreeSet<String> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect();
    for c in ["corrupt", "truncated"] {
        assert!(codes.contains(c), "{codes:?}");
    }
    // A restore reads through the damage (and repairs on the way).
    let out = t.path().join("out.img");
    ok(&restore_args(&vault, "disk", None, &out, false));
    assert_same(&out, &img);
    let fixed = json(&["verify", "--vault", v, "--read-data", "--repair"]);
    assert_eq!(fixed["repaired"], fixed["detected"], "{fixed}");
    let clean = json(&["verify", "--vault", v, "--read-data"]);
    assert_eq!(clean["detected"], 0, "{clean}");
    // The good copies were never touched; the bad one is whole again.
    assert!(fs::read(seg_of(&vault)).unwrap() == good[0]);
    assert!(fs::read(seg_of(&r2)).unwrap() == good[1]);
    assert!(fs::read(&seg).unwrap() == good[0]);
}

#[test]
fn damage_on_every_copy_is_reported_exactly_never_zero_filled_and_healed_by_a_backup() {
    let t = tempfile::tempdir().unwrap();
    let (vault, [r1, r2], img) = three_copy_vault(t.path());
    let v = s(&vault);
    let recs = records(&seg_of(&vault));
    // The same 10 data chunks (every 97th record), damaged on all three.
    let victims: Vec<&(u64, u64, String)> = recs.iter().step_by(97).take(10).collect();
    for copy in [&vault, &r1, &r2] {
        for (off, len, _) in &victims {
            flip(&seg_of(copy), off + len - 3);
        }
    }
    let want: BTreeSet<String> = victims.iter().map(|r| r.2.clone()).collect();
    let found = run(&["--output", "json", "verify", "--vault", v, "--read-data"]);
    assert_eq!(found.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    let bad = report["unrecoverable"].as_array().unwrap();
    let got: BTreeSet<String> = bad
        .iter()
        .map(|u| u["chunk"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want, "exactly the 10 damaged chunks are unrecoverable");
    for u in bad {
        let ranges = u["ranges"].as_array().unwrap();
        assert_eq!(ranges.len(), 1, "{u}");
        assert_eq!(ranges[0]["item"], "disk");
        let (a, b) = (
            ranges[0]["start"].as_u64().unwrap(),
            ranges[0]["end"].as_u64().unwrap(),
        );
        assert_eq!(b - a, 64 << 10);
    }
    // A restore fails; with --allow-damaged it writes the rest, marks the
    // damaged ranges (not zeros) and says which.
    let out = t.path().join("out.img");
    let mut plain = restore_args(&vault, "disk", None, &out, false);
    plain.extend(["--from", "vault"]);
    let err = fails(&plain, 7);
    assert!(err.contains("damaged") || err.contains("checksum"), "{err}");
    let mut args = restore_args(&vault, "disk", None, &out, true);
    args.extend(["--allow-damaged", "--from", "vault"]);
    let r = run(&[&["--output", "json"][..], &args].concat());
    assert_eq!(
        r.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let ranges = summary["damaged_ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 10, "{summary}");
    let restored = fs::read(&out).unwrap();
    let original = fs::read(&img).unwrap();
    let mut damaged_bytes = 0;
    for r in ranges {
        let (a, b) = (
            r[0].as_u64().unwrap() as usize,
            r[1].as_u64().unwrap() as usize,
        );
        assert!(
            restored[a..b].starts_with(b"COFFRE-DAMAGED-BLOCK"),
            "marker at {a}"
        );
        assert!(restored[a..b].iter().any(|&x| x != 0));
        damaged_bytes += b - a;
    }
    let differing = restored
        .iter()
        .zip(&original)
        .filter(|(a, b)| a != b)
        .count();
    assert!(differing <= damaged_bytes, "only the damaged ranges differ");
    // The next backup of the same image stores those chunks again: every
    // point that used them is whole again.
    ok(&["backup", "--vault", v, "--item", "disk", s(&img)]);
    let healed = json(&["verify", "--vault", v, "--read-data"]);
    assert_eq!(
        healed["unrecoverable"].as_array().unwrap().len(),
        0,
        "{healed}"
    );
    let first = vault_points(&vault, "disk")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out2 = t.path().join("out2.img");
    let mut a = restore_args(&vault, "disk", Some(&first), &out2, false);
    a.extend(["--from", "vault"]);
    ok(&a);
    assert_same(&out2, &img);
}

#[test]
fn a_lost_replica_fails_backups_unless_degraded_ok_and_is_refilled() {
    let t = tempfile::tempdir().unwrap();
    let (vault, [r1, _r2], img) = three_copy_vault(t.path());
    let v = s(&vault);
    fs::rename(&r1, t.path().join("r1.lost")).unwrap();
    churn(&img, 20, 70_000, 4);
    let r = run(&["backup", "--vault", v, "--item", "disk", s(&img)]);
    assert_ne!(r.status.code(), Some(0));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains(s(&r1)) && err.contains("--degraded-ok"),
        "{err}"
    );
    let r = run(&[
        "--degraded-ok",
        "backup",
        "--vault",
        v,
        "--item",
        "disk",
        s(&img),
    ]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stderr).contains("unavailable"));
    // The job completes with a warning naming the copy it left out.
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("CompletedWithWarnings"), "{out}");
    assert!(
        out.contains(&format!("warning: replica copy {} was left out", s(&r1))),
        "{out}"
    );
    let show = json(&["vault", "show", "--vault", v]);
    assert!(
        show["copy_warnings"].to_string().contains("unavailable"),
        "{show}"
    );
    // Restore still works with two copies.
    let out = t.path().join("out.img");
    ok(&restore_args(&vault, "disk", None, &out, false));
    assert_same(&out, &img);
    // A replacement directory is filled from a good copy.
    ok(&["vault", "set", "--vault", v, "--add-replica", s(&r1)]);
    assert!(fs::read(seg_of(&r1)).unwrap() == fs::read(seg_of(&vault)).unwrap());
    assert_eq!(fs::read_dir(r1.join("points/disk")).unwrap().count(), 2);
    let clean = json(&["verify", "--vault", v, "--read-data"]);
    assert_eq!(clean["detected"], 0, "{clean}");
    ok(&["backup", "--vault", v, "--item", "disk", s(&img)]);
}

#[test]
fn grs_restores_lists_and_verifies_from_the_secondary_with_the_primary_gone() {
    let t = tempfile::tempdir().unwrap();
    let sec = t.path().join("secondary");
    let vault = new_vault(t.path(), &["--secondary", s(&sec)]);
    let v = s(&vault);
    assert_eq!(json(&["vault", "show", "--vault", v])["redundancy"], "GRS");
    let img = t.path().join("vm.img");
    mixed_image(&img, 16 << 20, 5);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    let show = json(&["vault", "show", "--vault", v]);
    assert_eq!(show["secondary"]["points_behind"], 1, "{show}");
    let rep = json(&["replicate", "--vault", v]);
    assert_eq!(rep["points_replicated"], 1, "{rep}");
    let again = json(&["replicate", "--vault", v]);
    assert_eq!(again["bytes_copied"], 0, "incremental: nothing new");
    let show = json(&["vault", "show", "--vault", v]);
    assert_eq!(show["secondary"]["points_behind"], 0, "{show}");
    assert!(points(&vault, "vm")[0]["secondary_at"].is_string());
    // Day two reaches the secondary incrementally.
    let day1 = t.path().join("day1.img");
    fs::copy(&img, &day1).unwrap();
    churn(&img, 30, 40_000, 6);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    let rep = json(&["replicate", "--vault", v]);
    assert_eq!(rep["points_replicated"], 1, "{rep}");
    assert!(rep["bytes_copied"].as_u64().unwrap() < 8 << 20, "{rep}");
    // The primary region is gone.
    fs::remove_dir_all(&vault).unwrap();
    let gone = [("COFFRE_SECONDARY", s(&sec))];
    let pts = json_env(
        &gone,
        &[
            "points",
            "--vault",
            v,
            "--item",
            "vm",
            "--from",
            "secondary",
        ],
    );
    assert_eq!(pts.as_array().unwrap().len(), 2);
    let verify = json_env(
        &gone,
        &["verify", "--vault", v, "--from", "secondary", "--read-data"],
    );
    assert!(
        verify["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["severity"] != "error"),
        "{verify}"
    );
    for (p, want) in pts.as_array().unwrap().iter().zip([&day1, &img]) {
        let out = t.path().join(format!("{}.img", p["id"].as_str().unwrap()));
        let mut a = restore_args(&vault, "vm", p["id"].as_str(), &out, false);
        a.extend(["--from", "secondary"]);
        ok_env(&gone, &a);
        assert_same(&out, want);
    }
    // The secondary opened on its own is read-only.
    let err = fails(&["backup", "--vault", s(&sec), "--item", "vm", s(&img)], 1);
    assert!(err.contains("secondary copy"), "{err}");
}

fn json_env(env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let out = ok_env(env, &[&["--output", "json"][..], args].concat());
    serde_json::from_str(&out).unwrap()
}

fn ok_env(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut c = coffre();
    for (k, val) in env {
        c.env(k, val);
    }
    let out = c.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "coffre {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn replication_checks_every_record_and_sends_a_good_copy_of_a_bad_one() {
    let t = tempfile::tempdir().unwrap();
    let (r1, sec) = (t.path().join("r1"), t.path().join("sec"));
    let vault = new_vault(t.path(), &["--replica", s(&r1), "--secondary", s(&sec)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 24 << 20, 71);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    // Rot in three records of the primary, none in the replica.
    let recs = records(&seg_of(&vault));
    for (off, len, _) in [recs[3].clone(), recs[150].clone(), recs[300].clone()] {
        flip(&seg_of(&vault), off + len / 2);
    }
    let rep = json(&["replicate", "--vault", v]);
    assert_eq!(rep["records_repaired"], 3, "{rep}");
    assert_eq!(rep["records_damaged"], 0, "{rep}");
    // The secondary got the good bytes, and the primary was repaired.
    assert!(fs::read(seg_of(&sec)).unwrap() == fs::read(seg_of(&r1)).unwrap());
    assert!(fs::read(seg_of(&vault)).unwrap() == fs::read(seg_of(&r1)).unwrap());
    let verify = json(&["verify", "--vault", v, "--from", "secondary", "--read-data"]);
    assert_eq!(verify["detected"], 0, "{verify}");
}

#[test]
fn a_lost_replication_state_keeps_the_secondarys_good_bytes() {
    let t = tempfile::tempdir().unwrap();
    let sec = t.path().join("sec");
    let vault = new_vault(t.path(), &["--secondary", s(&sec)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 24 << 20, 72);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    let rep = json(&["replicate", "--vault", v]);
    assert!(rep["bytes_copied"].as_u64().unwrap() > 0, "{rep}");
    let copied = fs::read(seg_of(&sec)).unwrap();
    // Rot in two records of the primary (no replica holds them), then
    // the secondary's replication state is lost.
    let recs = records(&seg_of(&vault));
    for (off, len, _) in [recs[5].clone(), recs[200].clone()] {
        flip(&seg_of(&vault), off + len / 2);
    }
    fs::remove_file(sec.join("replication")).unwrap();
    // The next run checks what the secondary holds instead of cutting it:
    // nothing is copied again, and its good copies of the rotted records
    // stay.
    let rep = json(&["replicate", "--vault", v]);
    assert_eq!(rep["bytes_copied"], 0, "{rep}");
    assert!(fs::read(seg_of(&sec)).unwrap() == copied);
    let verify = json(&["verify", "--vault", v, "--from", "secondary", "--read-data"]);
    assert_eq!(verify["detected"], 0, "{verify}");
    // Its bytes past a damaged record of its own are copied again from
    // the primary (the state lost once more).
    let mine = records(&seg_of(&sec));
    flip(&seg_of(&sec), mine[300].0 + mine[300].1 / 2);
    fs::remove_file(sec.join("replication")).unwrap();
    let rep = json(&["replicate", "--vault", v]);
    let again = rep["bytes_copied"].as_u64().unwrap();
    assert!(
        again > 0 && again < copied.len() as u64 - mine[300].0 + 1,
        "{rep}"
    );
    // Everything before the damaged record was kept as it was, the good
    // copies of the primary's rotted records included, and the copy
    // verifies whole.
    let now = fs::read(seg_of(&sec)).unwrap();
    assert_eq!(now[..mine[300].0 as usize], copied[..mine[300].0 as usize]);
    let verify = json(&["verify", "--vault", v, "--from", "secondary", "--read-data"]);
    assert_eq!(verify["detected"], 0, "{verify}");
}
