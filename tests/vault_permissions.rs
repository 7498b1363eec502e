//! Every file and directory of a vault is private to its owner (0600 and
//! 0700) whatever the umask, and `verify` warns about any that are not.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::common::*;

/// `coffre args…` under `umask`.
fn under_umask(umask: &str, args: &[&str]) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
        .arg(bin())
        .args(args)
        .env("COFFRE_REGISTRY", registry_path())
        .env("COFFRE_SNAPSHOT_ROOT", snapshot_root())
        .env("COFFRE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "coffre {args:?} under umask {umask}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every path below `dir` (itself included) whose mode lets others in.
fn shared_paths(dir: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        seen += 1;
        let mode = m.permissions().mode() & 0o777;
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        if mode != want {
            bad.push(format!("{} {mode:o}", p.display()));
        }
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(seen > 5, "only {seen} paths in {}", dir.display());
    bad
}

#[test]
fn vault_files_are_private_under_umask_022_and_000() {
    for umask in ["022", "000"] {
        let t = tempfile::tempdir().unwrap();
        let vault = t.path().join("vault");
        let img = t.path().join("disk.img");
        mixed_image(&img, 8 << 20, 3);
        under_umask(umask, &["vault", "create", "--vault", s(&vault)]);
        under_umask(umask, &["backup", "--vault", s(&vault), s(&img)]);
        churn(&img, 4, 50_000, 4);
        under_umask(umask, &["backup", "--vault", s(&vault), s(&img)]);
        let r = t.path().join("r.img");
        under_umask(
            umask,
            &[
                "restore",
                "--vault",
                s(&vault),
                "--item",
                "disk",
                "--to",
                s(&r),
            ],
        );
        under_umask(umask, &["prune", "--vault", s(&vault)]);
        under_umask(umask, &["gc", "--vault", s(&vault)]);
        // Segments, index, config, job records, locks; and the snapshot
        // area (manifests, packs).
        for sub in [
            "segments",
            "index",
            "jobs",
            "locks",
            "config",
            "snapshot-areas",
        ] {
            assert!(vault.join(sub).exists(), "no {sub} in the vault");
        }
        let bad = shared_paths(&vault);
        assert!(bad.is_empty(), "umask {umask}: not private: {bad:#?}");
        let area = snapshot_dirs(&vault, "disk").pop().unwrap();
        let area = area.parent().unwrap();
        let bad = shared_paths(area);
        assert!(
            bad.is_empty(),
            "umask {umask}: snapshot area not private: {bad:#?}"
        );
        let reg = registry_path();
        let mode = std::fs::metadata(&reg).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "registry {}", reg.display());
        let report = json(&["verify", "--vault", s(&vault)]);
        assert_eq!(report["findings"], serde_json::json!([]), "{report}");
    }
}

#[test]
fn verify_warns_about_a_vault_others_can_read() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("disk.img");
    mixed_image(&img, 4 << 20, 5);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let seg = first_segment(&vault);
    std::fs::set_permissions(&seg, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&vault, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A warning: exit 0, but the finding names both paths and the fix.
    let report = json(&["verify", "--vault", s(&vault)]);
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{report}");
    let f = &findings[0];
    assert_eq!(f["severity"], "warning");
    assert_eq!(f["code"], "permissions");
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains("2 files or directories"), "{msg}");
    assert!(msg.contains(s(&seg)) && msg.contains("(644)"), "{msg}");
    assert!(
        f["hint"].as_str().unwrap().contains("chmod -R go-rwx"),
        "{f}"
    );
    let text = ok(&["verify", "--vault", s(&vault)]);
    assert!(text.contains("warning: [permissions]"), "{text}");
}
