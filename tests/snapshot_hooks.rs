//! Pre- and post-snapshot hooks: they run in order around the capture, as
//! argvs with the job in their environment; success makes the point
//! application-consistent; a failure or a timeout drops it a level with a
//! warning; the post hook runs after a failed capture too.

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

fn protect_with(
    vault: &std::path::Path,
    img: &std::path::Path,
    pre: &str,
    post: &str,
    timeout: &str,
) {
    ok(&[
        "protect",
        "--vault",
        s(vault),
        "--item",
        "vm",
        "--policy",
        "DefaultPolicy",
        "--pre-snapshot",
        pre,
        "--post-snapshot",
        post,
        "--hook-timeout",
        timeout,
        s(img),
    ]);
}

fn last_job(vault: &std::path::Path) -> serde_json::Value {
    let jobs = json(&["jobs", "--vault", s(vault), "--item", "vm"]);
    jobs.as_array().unwrap().last().unwrap().clone()
}

#[test]
fn hooks_run_in_order_and_set_the_level() {
    let t = tempfile::tempdir().unwrap();
    let area = t.path().join("area");
    let vault = new_vault(t.path(), &["--snapshot-area", s(&area)]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 2 << 20, 71);
    let log = t.path().join("hooks.log");
    let hook = |phase: &str| {
        format!(
            "sh -c 'echo {phase} $COFFRE_PHASE $COFFRE_ITEM $(ls {} | wc -l) >> {}'",
            area.join("vm").display(),
            log.display()
        )
    };
    protect_with(&vault, &img, &hook("pre"), &hook("post"), "10");
    let shown = json(&["item", "show", "--vault", s(&vault), "--item", "vm"]);
    assert_eq!(shown["hooks"]["pre"][0], "sh", "{shown}");
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    // The pre hook ran before the snapshot's files existed, the post hook
    // after.
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("pre pre vm"), "{lines:?}");
    assert!(lines[1].starts_with("post post vm"), "{lines:?}");
    let files_before: u32 = lines[0].rsplit(' ').next().unwrap().parse().unwrap();
    let files_after: u32 = lines[1].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(files_after > files_before, "{lines:?}");
    let pts = points(&vault, "vm");
    assert_eq!(pts[0]["level"], "application-consistent", "{pts:?}");

    // A failing pre hook: the point is taken, one level down, with a
    // warning naming the hook.
    protect_with(
        &vault,
        &img,
        "sh -c 'echo no guest agent >&2; exit 4'",
        &hook("post"),
        "10",
    );
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let pts = points(&vault, "vm");
    assert_eq!(pts[1]["level"], "crash-consistent", "{pts:?}");
    let job = last_job(&vault);
    let warnings = job["stats"]["warnings"].to_string();
    assert!(
        warnings.contains("no guest agent") && warnings.contains("exit status: 4"),
        "{job}"
    );

    // A hook that outlives its timeout is killed, with the same effect.
    protect_with(&vault, &img, "sleep 30", "", "1");
    let started = std::time::Instant::now();
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let job = last_job(&vault);
    assert!(
        job["stats"]["warnings"]
            .to_string()
            .contains("did not finish within 1 s"),
        "{job}"
    );
    assert_eq!(points(&vault, "vm")[2]["level"], "crash-consistent");
}

#[test]
fn the_post_hook_runs_after_a_failed_capture() {
    let t = tempfile::tempdir().unwrap();
    let area = t.path().join("area");
    let vault = new_vault(t.path(), &["--snapshot-area", s(&area)]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 2 << 20, 72);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let log = t.path().join("thaw.log");
    protect_with(
        &vault,
        &img,
        "true",
        &format!("sh -c 'echo thawed >> {}'", log.display()),
        "10",
    );
    // The item's snapshot folder is locked: the capture fails.
    let item_dir = area.join("vm");
    std::fs::set_permissions(&item_dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    let out = run(&["backup", "--vault", s(&vault), s(&img)]);
    std::fs::set_permissions(&item_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "thawed\n");
}
