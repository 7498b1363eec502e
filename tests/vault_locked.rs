//! One writer at a time: a second writer is refused with the holder's pid
//! (or waits, with --lock-timeout), while readers keep working.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn second_writer_is_refused_with_the_holders_pid() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let small = t.path().join("small.img");
    random_file(&small, 100_000, 1);
    ok(&["backup", "--vault", s(&vault), s(&small)]);
    let big = t.path().join("big.img");
    random_file(&big, 48 << 20, 2);
    let mut child = coffre()
        .args([
            "backup",
            "--vault",
            s(&vault),
            "--rate-limit",
            "12M",
            s(&big),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    // Wait until the child's transfer phase runs: it then holds the lock
    // (its snapshot phase does not).
    let start = Instant::now();
    loop {
        let jobs = json(&["jobs", "--vault", s(&vault), "--item", "big"]);
        if jobs[0]["phases"][1]["status"] == "InProgress" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "child never reached its transfer: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read_to_string(vault.join("lock")).unwrap().trim(),
        pid
    );
    // Another item's backup: its snapshot completes, its transfer cannot
    // take the lock and fails at once (exit 4), naming the holder.
    let err = fails(&["backup", "--vault", s(&vault), s(&small)], 4);
    assert!(
        err.contains("in use by another coffre process") && err.contains(&pid),
        "{err}"
    );
    let jobs = json(&["jobs", "--vault", s(&vault), "--item", "small"]);
    assert_eq!(jobs[1]["status"], "CompletedWithWarnings", "{jobs}");
    // Readers are not blocked by the writer.
    assert_eq!(vault_points(&vault, "small").len(), 1);
    let out = t.path().join("r.img");
    ok(&restore_args(&vault, "small", None, &out, false));
    assert_same(&out, &small);
    // With --lock-timeout it waits for the holder and completes.
    let waited = coffre()
        .args([
            "--lock-timeout",
            "60",
            "backup",
            "--vault",
            s(&vault),
            s(&small),
        ])
        .output()
        .unwrap();
    assert!(waited.status.success(), "{waited:?}");
    assert!(child.wait().unwrap().success());
    assert_eq!(vault_points(&vault, "small").len(), 2);
    // The refused transfer left its snapshot: a point of tier Snapshot.
    assert_eq!(points(&vault, "small").len(), 3);
    assert_eq!(points(&vault, "big").len(), 1);
}
