//! Backup jobs: the two phases, the job-status table row by row, the
//! decoupling rule (a transfer is Skipped while another transfer of the
//! item runs, and the next one captures every change), cancellation
//! during the snapshot phase, and a crash marked Failed on the next read.

use std::process::{Child, Stdio};
use std::time::Duration;

use crate::common::*;

fn spawn_backup(vault: &std::path::Path, img: &std::path::Path, rate: &str) -> Child {
    coffre()
        .args([
            "backup",
            "--vault",
            s(vault),
            "--item",
            "vm",
            "--rate-limit",
            rate,
            s(img),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn decoupling_rule_and_the_status_table() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 6 << 20, 1);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);

    // Job 1: every block changed, 2 MiB/s: ~3 s of snapshot, ~3 s of transfer.
    random_file(&img, 6 << 20, 2);
    let day2 = std::fs::read(&img).unwrap();
    let mut job1 = spawn_backup(&vault, &img, "2M");
    let j1 = wait_for_job(&vault, "vm", "job 1's transfer", |j| {
        phase(j, 1) == "InProgress"
    });
    // Row: Completed | InProgress -> InProgress.
    assert_eq!(
        (phase(&j1, 0), j1["status"].as_str().unwrap()),
        ("Completed", "InProgress")
    );

    // Job 2 snapshots while job 1 transfers: its transfer is Skipped.
    // Row: Completed | Skipped -> Completed.
    let j2 = json(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    assert_eq!(j2["job"]["status"], "Completed", "{j2}");
    assert_eq!(phase(&j2["job"], 0), "Completed");
    assert_eq!(phase(&j2["job"], 1), "Skipped");
    assert!(
        j2["job"]["phases"][1]["error"]
            .as_str()
            .unwrap()
            .contains(j1["id"].as_str().unwrap()),
        "the skip names the running transfer's job: {j2}"
    );
    assert!(
        j2.get("id").is_none(),
        "a skipped transfer records no point: {j2}"
    );

    // Row: Completed | Completed -> Completed.
    assert!(job1.wait().unwrap().success());
    let j1 = json(&["job", "show", "--vault", v, j1["id"].as_str().unwrap()]);
    assert_eq!(
        (phase(&j1, 0), phase(&j1, 1), j1["status"].as_str().unwrap()),
        ("Completed", "Completed", "Completed")
    );
    assert_eq!(vault_points(&vault, "vm").len(), 2);

    // The next transfer captures every change since the last vault point.
    churn(&img, 20, 50_000, 3);
    let j3 = json(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    assert_eq!(j3["job"]["status"], "Completed");
    assert!(j3["stats"]["blocks_changed"].as_u64().unwrap() > 0);
    let out = t.path().join("r.img");
    ok(&restore_args(&vault, "vm", None, &out, false));
    assert_same(&out, &img);
    let first_of_day2 = &points(&vault, "vm")[1];
    let out2 = t.path().join("r2.img");
    ok(&restore_args(
        &vault,
        "vm",
        Some(first_of_day2["id"].as_str().unwrap()),
        &out2,
        false,
    ));
    assert_eq!(std::fs::read(&out2).unwrap(), day2);

    // Row: Completed | Failed -> CompletedWithWarnings (the transfer
    // cannot get the vault: another writer holds it).
    {
        let _writer = hold(&vault.join("lock"));
        let out = run(&[
            "--output",
            "json",
            "backup",
            "--vault",
            v,
            "--item",
            "vm",
            s(&img),
        ]);
        assert_eq!(out.status.code(), Some(4));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (phase(&j["job"], 0), phase(&j["job"], 1)),
            ("Completed", "Failed")
        );
        assert_eq!(j["job"]["status"], "CompletedWithWarnings");
    }

    // Row: Failed | (not started) -> Failed (another snapshot of the item
    // is running).
    {
        let _snap = hold(&vault.join("locks").join("vm.snapshot"));
        let out = run(&[
            "--output",
            "json",
            "backup",
            "--vault",
            v,
            "--item",
            "vm",
            s(&img),
        ]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("another snapshot of item \"vm\""), "{err}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (phase(&j["job"], 0), phase(&j["job"], 1)),
            ("Failed", "NotStarted")
        );
        assert_eq!(j["job"]["status"], "Failed");
    }
    // Filters.
    let failed = json(&["jobs", "--vault", v, "--status", "failed"]);
    assert_eq!(failed.as_array().unwrap().len(), 1);
    let warn = json(&[
        "jobs",
        "--vault",
        v,
        "--status",
        "CompletedWithWarnings",
        "--operation",
        "backup",
        "--item",
        "vm",
    ]);
    assert_eq!(warn.as_array().unwrap().len(), 1);
    let restores = json(&["jobs", "--vault", v, "--operation", "restore"]);
    assert_eq!(restores.as_array().unwrap().len(), 2);
    assert_eq!(restores[0]["phases"][0]["name"], "restore");
    assert_eq!(restores[0]["stats"]["bytes_written"], 6 << 20, "{restores}");
    ok(&["verify", "--vault", v, "--read-data"]);
}

#[test]
fn cancel_during_the_snapshot_phase() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 96 << 20, 4);
    // 24 MiB/s over three 32 MiB windows: about four seconds of snapshot.
    let child = spawn_backup(&vault, &img, "24M");
    let j = wait_for_job(&vault, "vm", "the snapshot phase", |j| {
        phase(j, 0) == "InProgress"
    });
    let id = j["id"].as_str().unwrap();
    ok(&["job", "cancel", "--vault", v, &id[..8]]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(11),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let waited = run(&[
        "--output",
        "json",
        "job",
        "wait",
        "--vault",
        v,
        id,
        "--timeout",
        "10",
    ]);
    assert_eq!(waited.status.code(), Some(11));
    let j: serde_json::Value = serde_json::from_slice(&waited.stdout).unwrap();
    assert_eq!(j["status"], "Cancelled");
    assert_eq!((phase(&j, 0), phase(&j, 1)), ("Cancelled", "NotStarted"));
    assert!(points(&vault, "vm").is_empty());
    // An ended job cannot be cancelled.
    let err = fails(&["job", "cancel", "--vault", v, id], 1);
    assert!(err.contains("cannot be cancelled"), "{err}");
    // A completed job waits to exit 0.
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    let last = jobs(&vault).last().cloned().unwrap();
    ok(&["job", "wait", "--vault", v, last["id"].as_str().unwrap()]);
}

#[test]
fn a_job_killed_mid_way_is_marked_failed_and_the_next_backup_works() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 64 << 20, 5);
    let mut child = spawn_backup(&vault, &img, "16M");
    wait_for_job(&vault, "vm", "the transfer", |j| {
        phase(j, 1) == "InProgress"
    });
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    let j = jobs(&vault).last().cloned().unwrap();
    assert_eq!(j["status"], "CompletedWithWarnings", "{j}");
    assert_eq!(phase(&j, 1), "Failed");
    assert!(j["error"].as_str().unwrap().contains("interrupted"), "{j}");
    let out = json(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    assert_eq!(out["job"]["status"], "Completed", "{out}");
    ok(&["verify", "--vault", v, "--read-data"]);
    let r = t.path().join("r.img");
    ok(&restore_args(&vault, "vm", None, &r, false));
    assert_same(&r, &img);

    // Killed in its snapshot phase: the job is Failed, and prune removes
    // the partial snapshot file it left.
    let mut child = spawn_backup(&vault, &img, "16M");
    wait_for_job(&vault, "vm", "the snapshot phase", |j| {
        phase(j, 0) == "InProgress"
    });
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let j = jobs(&vault).last().cloned().unwrap();
    assert_eq!(
        (phase(&j, 0), j["status"].as_str().unwrap()),
        ("Failed", "Failed"),
        "{j}"
    );
    let snaps = snapshot_dirs(&vault, "vm").pop().expect("a snapshot area");
    let partial = |d: &std::path::Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".snap.tmp")
            })
            .count()
    };
    assert_eq!(partial(&snaps), 1);
    ok(&["prune", "--vault", v]);
    assert_eq!(partial(&snaps), 0);
}
