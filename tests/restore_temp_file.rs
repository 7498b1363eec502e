//! The restore's temporary file cannot be redirected: symlinks planted at
//! every name the old scheme (`.NAME.coffre-partial-PID`) could use for
//! the next two thousand processes are not followed (their target stays
//! untouched) and the restore still succeeds.

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

#[test]
fn symlinks_planted_at_predictable_temporary_names_are_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 2 << 20, 91);
    ok(&["backup", "--vault", s(&vault), s(&img)]);

    // A shared folder, and a file an attacker wants overwritten.
    let shared = t.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    // The next process ids, as an attacker would guess them.
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for pid in last + 1..last + 2000 {
        std::os::unix::fs::symlink(
            &victim,
            shared.join(format!(".restored.img.coffre-partial-{pid}")),
        )
        .unwrap();
    }
    let target = shared.join("restored.img");
    for from in ["snapshot", "vault"] {
        ok(&[
            "restore",
            "--vault",
            s(&vault),
            "--item",
            "vm",
            "--from",
            from,
            "--force",
            "--to",
            s(&target),
        ]);
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"precious",
            "--from {from}"
        );
        assert_same(&img, &target);
        let m = std::fs::symlink_metadata(&target).unwrap();
        assert!(m.file_type().is_file());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }
    // Nothing of the restores is left beside the target but the planted
    // links.
    let left: Vec<String> = std::fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "restored.img")
        .filter(|n| {
            !std::fs::symlink_metadata(shared.join(n))
                .unwrap()
                .file_type()
                .is_symlink()
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
