//! GC never deletes a chunk a running backup relies on: a backup is
//! started, its parent point is pruned and the vault garbage-collected
//! while the backup runs, and the backup still records a complete point.
//! Also: GC waits for (or is refused by) a transfer in progress, and
//! `gc --dry-run` prints the plan without changing anything.

use std::process::Stdio;

use crate::common::*;

#[test]
fn backup_prune_of_its_parent_and_gc_interleave_without_losing_a_chunk() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    // Day 1: the old point, kept long. Day 2: the parent, kept one day.
    mixed_image(&img, 40 << 20, 1);
    backup_vm_until("2027-01-01T00:00:00Z", &vault, &img, "2030-01-01");
    churn(&img, 200, 64 << 10, 2);
    backup_vm_until("2027-01-02T00:00:00Z", &vault, &img, "2027-01-02");
    let parent = points(&vault, "vm")[1]["id"].as_str().unwrap().to_string();
    // Day 3's image keeps most of day 2's blocks: the new backup would
    // lean on the parent's chunks.
    churn(&img, 20, 64 << 10, 3);
    let day3 = std::fs::read(&img).unwrap();

    // A slow backup: its snapshot phase takes about four seconds.
    let child = coffre()
        .env("COFFRE_NOW", "2027-01-05T00:00:00Z")
        .args([
            "backup",
            "--vault",
            v,
            "--item",
            "vm",
            "--rate-limit",
            "10M",
            s(&img),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_job(&vault, "vm", "the snapshot phase", |j| {
        j["phases"][0]["status"] == "InProgress"
    });
    // Meanwhile: the parent expires and goes, and GC reclaims its chunks.
    let pruned = json_at("2027-01-05T00:00:00Z", &["prune", "--vault", v]);
    let gone: Vec<&str> = pruned["expired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(gone, [parent.as_str()], "{pruned}");
    let gc = json(&["gc", "--vault", v]);
    assert!(gc["chunks_removed"].as_u64().unwrap() > 100, "{gc}");
    // Both are jobs, with their statistics.
    let prune_job = json(&["jobs", "--vault", v, "--operation", "prune"]);
    assert_eq!(prune_job[0]["stats"]["points_expired"], 1, "{prune_job}");
    let gc_job = json(&["jobs", "--vault", v, "--operation", "gc"]);
    assert_eq!(
        gc_job[0]["stats"]["chunks_removed"], gc["chunks_removed"],
        "{gc_job}"
    );
    assert_eq!(gc_job[0]["status"], "Completed");
    let all = json(&["jobs", "--vault", v, "--item", "vm"]);
    let last = all.as_array().unwrap().last().cloned().unwrap();
    assert_eq!(
        last["phases"][0]["status"], "InProgress",
        "prune and gc ran during the snapshot phase"
    );

    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pts = vault_points(&vault, "vm");
    assert_eq!(pts.len(), 2);
    ok(&["verify", "--vault", v, "--read-data"]);
    let r = t.path().join("r.img");
    ok(&restore_args(&vault, "vm", None, &r, false));
    assert_eq!(std::fs::read(&r).unwrap(), day3);
    let r1 = t.path().join("r1.img");
    ok(&restore_args(
        &vault,
        "vm",
        Some(pts[0]["id"].as_str().unwrap()),
        &r1,
        false,
    ));

    // Nothing is left to collect, and the accounting is exact.
    let plan = json(&["gc", "--vault", v, "--dry-run"]);
    assert_eq!(plan["unreferenced_chunks"], 0, "{plan}");
}

#[test]
fn gc_cannot_run_during_a_transfer_and_dry_run_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    // With a replica the transfers append records (no snapshot pack is
    // adopted as a segment), so the points share one segment that GC
    // first rewrites and later punches.
    let replica = t.path().join("replica");
    let vault = new_vault(t.path(), &["--replica", s(&replica)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 8 << 20, 1);
    backup_vm_until("2027-01-01T00:00:00Z", &vault, &img, "2027-01-02");
    random_file(&img, 4 << 20, 2);
    backup_vm_until("2027-01-01T00:00:00Z", &vault, &img, "2027-02-01");
    ok_at("2027-01-10T00:00:00Z", &["prune", "--vault", v]);
    assert_eq!(points(&vault, "vm").len(), 1);
    // Free space is the filesystem's, not the vault's: leave it out.
    let show = || {
        let mut j = json(&["vault", "show", "--vault", v]);
        j.as_object_mut().unwrap().remove("copies");
        j
    };
    let before = show();
    let plan = json(&["gc", "--vault", v, "--dry-run"]);
    assert_eq!(plan["unreferenced_chunks"], 130, "{plan}");
    assert_eq!(plan["segments"][0]["action"], "rewrite", "{plan}");
    assert_eq!(show(), before, "dry run changed the vault");

    // A transfer holds the writer lock: gc is refused at once (exit 4)…
    random_file(&img, 32 << 20, 3);
    let mut child = coffre()
        .env("COFFRE_NOW", "2027-01-11T00:00:00Z")
        .args([
            "backup",
            "--vault",
            v,
            "--item",
            "vm",
            "--rate-limit",
            "12M",
            s(&img),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_job(&vault, "vm", "the transfer", |j| {
        j["phases"][1]["status"] == "InProgress"
    });
    fails(&["gc", "--vault", v], 4);
    // …or waits for it with --lock-timeout.
    let gc = json(&["--lock-timeout", "60", "gc", "--vault", v]);
    assert!(child.wait().unwrap().success());
    // The segment is now mostly live (the 32 MiB point joined it), so the
    // dead ranges are punched out in place rather than rewritten.
    assert_eq!(gc["chunks_removed"], 130, "{gc}");
    assert_eq!(gc["segments_rewritten"], 0, "{gc}");
    assert_eq!(gc["plan"]["segments"][0]["action"], "punch", "{gc}");
    assert!(gc["bytes_punched"].as_u64().unwrap() >= 8 << 20, "{gc}");
    ok(&["verify", "--vault", v, "--read-data"]);
    let r = t.path().join("r.img");
    ok(&restore_args(&vault, "vm", None, &r, false));
    assert_same(&r, &img);
}

#[test]
fn gc_defers_deleting_files_while_a_reader_holds_the_lease() {
    use std::os::fd::AsRawFd;
    let t = tempfile::tempdir().unwrap();
    // Records appended to one segment (a replica: no adopted packs), which
    // GC rewrites.
    let replica = t.path().join("replica");
    let vault = new_vault(t.path(), &["--replica", s(&replica)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 8 << 20, 1);
    backup_vm_until("2027-01-01T00:00:00Z", &vault, &img, "2027-01-02");
    random_file(&img, 2 << 20, 2);
    backup_vm_until("2027-01-01T00:00:00Z", &vault, &img, "2027-02-01");
    ok_at("2027-01-10T00:00:00Z", &["prune", "--vault", v]);
    let seg = vault.join("segments").join(format!("{:016x}.seg", 1));

    // A reader (as `restore` would) holds the lease shared.
    let lease = std::fs::File::open(vault.join("readers")).unwrap();
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(lease.as_raw_fd(), libc::LOCK_SH) }, 0);
    let gc = json(&["gc", "--vault", v]);
    assert_eq!(gc["reclaim_deferred"], true, "{gc}");
    assert_eq!(gc["segments_rewritten"], 1, "{gc}");
    assert_eq!(gc["segments_deleted"], 0, "{gc}");
    assert!(seg.exists(), "a file was deleted under a reader");
    // The live data moved; the vault is whole, readers work meanwhile.
    ok(&["verify", "--vault", v, "--read-data"]);
    drop(lease);

    let gc = json(&["gc", "--vault", v]);
    assert_eq!(gc["reclaim_deferred"], false, "{gc}");
    assert_eq!(gc["segments_deleted"], 1, "{gc}");
    assert!(!seg.exists());
    let r = t.path().join("r.img");
    ok(&restore_args(&vault, "vm", None, &r, false));
    assert_same(&r, &img);
    ok(&["verify", "--vault", v, "--read-data"]);
}
