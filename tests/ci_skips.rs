//! `scripts/skips.sh`: the list of skipped tests that `make test` prints
//! last, and the check `.ci/run` makes: a skip fails the run unless
//! `COFFRE_ALLOW_SKIP` names the test or its module.

use std::path::Path;
use std::process::{Command, Output};

fn skips(dir: &Path, allow: Option<&str>) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/skips.sh");
    let mut c = Command::new("bash");
    c.arg(script).arg("--check").arg(dir);
    match allow {
        Some(a) => c.env("COFFRE_ALLOW_SKIP", a),
        None => c.env_remove("COFFRE_ALLOW_SKIP"),
    };
    c.output().unwrap()
}

#[test]
fn a_skip_fails_the_check_unless_allowed_by_name_or_module() {
    let t = tempfile::tempdir().unwrap();
    for test in ["nbd_qcow2::one", "nbd_qcow2::two", "object_store::three"] {
        std::fs::write(t.path().join(test), "qemu-nbd missing\n").unwrap();
    }
    let out = skips(t.path(), None);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 test(s) skipped"), "{text}");
    assert!(
        text.contains("SKIPPED nbd_qcow2::one: qemu-nbd missing"),
        "{text}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nbd_qcow2::one nbd_qcow2::two object_store::three"),
        "{err}"
    );
    // A module allows its tests, not a module whose name it begins.
    assert!(!skips(t.path(), Some("nbd_qcow2")).status.success());
    assert!(
        !skips(t.path(), Some("nbd_qcow2,object_stor"))
            .status
            .success()
    );
    assert!(
        skips(t.path(), Some("nbd_qcow2,object_store::three"))
            .status
            .success()
    );
    assert!(skips(t.path(), Some("all")).status.success());
    let empty = tempfile::tempdir().unwrap();
    let out = skips(empty.path(), None);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no test skipped"));
}
