//! `coffre daemon`: runs the due backup, then stops cleanly on SIGTERM;
//! a transfer running at SIGTERM is abandoned safely (no point, a clean
//! vault, the slot still due for the next pass).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn daemon(vault: &std::path::Path, now: &str, extra: &[&str]) -> Child {
    coffre()
        .env("COFFRE_NOW", now)
        .env("COFFRE_LOG", "info")
        .args(["daemon", "--vault", s(vault), "--interval", "1"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn term_and_wait(child: Child) -> (Duration, String) {
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "daemon exit {:?}: {log}", out.status);
    (t.elapsed(), log)
}

#[test]
fn daemon_runs_due_backups_and_stops_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 1 << 20, 1);
    protect_at("2027-01-01T03:00:00Z", &vault, "vm", "DefaultPolicy", &img);

    let d = daemon(&vault, "2027-01-02T03:00:00Z", &[]);
    let j = wait_for_job(&vault, "vm", "the scheduled backup", |j| {
        j["status"] == "Completed"
    });
    assert_eq!(points(&vault, "vm").len(), 1);
    assert_eq!(points(&vault, "vm")[0]["scheduled"], true);
    let (took, log) = term_and_wait(d);
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        log.contains("daemon stopped") && log.contains(j["id"].as_str().unwrap()),
        "{log}"
    );
    // Passes with nothing to clean leave no prune or gc records.
    assert_eq!(
        json(&["jobs", "--vault", v, "--operation", "gc"]),
        serde_json::json!([])
    );
    // Between passes the daemon does not hold the vault.
    ok(&[
        "protect",
        "--vault",
        v,
        "--item",
        "vm",
        "--policy",
        "DefaultPolicy",
        s(&img),
    ]);
}

#[test]
fn sigterm_abandons_a_running_transfer_safely() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 128 << 20, 2);
    protect_at("2027-01-01T03:00:00Z", &vault, "vm", "DefaultPolicy", &img);

    let d = daemon(&vault, "2027-01-02T03:00:00Z", &["--rate-limit", "32M"]);
    wait_for_job(&vault, "vm", "the transfer", |j| {
        phase(j, 1) == "InProgress"
    });
    let (took, log) = term_and_wait(d);
    assert!(took < Duration::from_secs(10), "{took:?}: {log}");
    let j = jobs(&vault).last().cloned().unwrap();
    assert_eq!((phase(&j, 0), phase(&j, 1)), ("Completed", "Failed"), "{j}");
    assert!(
        j["phases"][1]["error"]
            .as_str()
            .unwrap()
            .contains("abandoned"),
        "{j}"
    );
    assert!(vault_points(&vault, "vm").is_empty());
    ok(&["verify", "--vault", v, "--read-data"]);
    let show = json(&["vault", "show", "--vault", v]);
    assert_eq!(
        show["stored_bytes"].as_u64().unwrap(),
        segment_bytes(&vault),
        "{show}"
    );
    // The slot is still due: the next pass runs it.
    let pass = json_at("2027-01-02T03:05:00Z", &["run-due", "--vault", v]);
    assert_eq!(pass["backups"][0]["status"], "Completed", "{pass}");
    let r = t.path().join("r.img");
    ok(&restore_args(&vault, "vm", None, &r, false));
    assert_same(&r, &img);
}

#[test]
fn sigterm_abandons_a_running_snapshot_phase_too() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 160 << 20, 3);
    protect_at("2027-01-01T03:00:00Z", &vault, "vm", "DefaultPolicy", &img);
    // 32 MiB/s over five 32 MiB windows: five seconds of snapshot.
    let d = daemon(&vault, "2027-01-02T03:00:00Z", &["--rate-limit", "32M"]);
    wait_for_job(&vault, "vm", "the snapshot phase", |j| {
        phase(j, 0) == "InProgress"
    });
    let (took, log) = term_and_wait(d);
    assert!(took < Duration::from_secs(4), "{took:?}: {log}");
    let j = jobs(&vault).last().cloned().unwrap();
    assert_eq!(
        (phase(&j, 0), phase(&j, 1)),
        ("Failed", "NotStarted"),
        "{j}"
    );
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("abandoned at shutdown"),
        "{j}"
    );
    let pass = json_at("2027-01-02T03:05:00Z", &["run-due", "--vault", v]);
    assert_eq!(
        pass["backups"][0]["status"], "Completed",
        "the slot stayed due: {pass}"
    );
}

#[test]
fn sigterm_while_waiting_for_the_vault_lock() {
    use std::os::fd::AsRawFd;
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    // Another writer holds the vault: the daemon's pass waits for it.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(vault.join("lock"))
        .unwrap();
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let d = daemon(&vault, "2027-01-02T03:00:00Z", &[]);
    std::thread::sleep(Duration::from_millis(1500));
    let (took, log) = term_and_wait(d);
    assert!(took < Duration::from_secs(3), "{took:?}: {log}");
    assert!(log.contains("daemon stopped"), "{log}");
}
