//! SIGKILL in the middle of a backup: the vault still verifies, earlier
//! points restore, and the next backup succeeds and reclaims the orphans.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn kill_minus_nine_mid_backup() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 8 << 20, 1);
    let day1 = t.path().join("day1.copy");
    std::fs::copy(&img, &day1).unwrap();
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let committed = segment_bytes(&vault);

    // Kill at three different depths into a slow backup of new data.
    for (round, wait_for) in [(0u64, 1u64 << 20), (1, 6 << 20), (2, 14 << 20)] {
        random_file(&img, 40 << 20, 100 + round);
        let mut child = slow_backup(&vault, s(&img));
        let start = Instant::now();
        while segment_bytes(&vault) < committed + wait_for {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "backup made no progress"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "backup ended before the kill"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success());

        ok(&["verify", "--vault", s(&vault), "--read-data"]);
        let in_vault = vault_points(&vault, "vm");
        assert_eq!(in_vault.len(), 1, "round {round}");
        let out = t.path().join("r.img");
        let id = in_vault[0]["id"].as_str().unwrap();
        ok(&restore_args(&vault, "vm", Some(id), &out, true));
        assert_same(&out, &day1);
    }

    // The next backup succeeds; what the killed runs checkpointed is
    // reused or reclaimed, never kept twice.
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
    let pts = vault_points(&vault, "vm");
    assert_eq!(pts.len(), 2);
    let out = t.path().join("r2.img");
    ok(&restore_args(&vault, "vm", None, &out, false));
    assert_same(&out, &img);
    let show = json(&["vault", "show", "--vault", s(&vault)]);
    assert_eq!(
        show["stored_bytes"].as_u64().unwrap(),
        segment_bytes(&vault),
        "orphan bytes left in segments"
    );
}
