//! One writer at a time: a second writer is refused with the holder's pid,
//! while readers keep working.

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
    // Wait until the child holds the lock.
    let lock = vault.join("lock");
    let start = Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != pid {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "child never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = fails(&["backup", "--vault", s(&vault), s(&small)], 4);
    assert!(
        err.contains("in use by another coffre process") && err.contains(&pid),
        "{err}"
    );
    // Readers are not blocked by the writer.
    assert_eq!(points(&vault, "small").len(), 1);
    let out = t.path().join("r.img");
    ok(&restore_args(&vault, "small", None, &out, false));
    assert_same(&out, &small);
    assert!(child.wait().unwrap().success());
    assert_eq!(points(&vault, "small").len(), 1);
    assert_eq!(points(&vault, "big").len(), 1);
}
