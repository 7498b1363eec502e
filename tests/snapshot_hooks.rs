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

/// Live processes (not zombies) whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        // The arguments are separated by NULs.
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !zombie && cmdline.contains(marker) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_hook_whose_child_holds_its_output_is_killed_with_it_at_the_timeout() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 2 << 20, 73);
    // `sh` waits for a `sleep` that holds the hook's stdout and stderr.
    let marker = format!("sleep 41.{}", std::process::id());
    protect_with(&vault, &img, &format!("sh -c '{marker}; true'"), "", "1");
    let started = std::time::Instant::now();
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(15), "{took:?}");
    let job = last_job(&vault);
    assert!(
        job["stats"]["warnings"]
            .to_string()
            .contains("did not finish within 1 s"),
        "{job}"
    );
    assert_eq!(points(&vault, "vm")[0]["level"], "crash-consistent");
    // The whole process group went with it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !processes_with(&marker).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        processes_with(&marker).is_empty(),
        "the hook's child outlived the timeout"
    );
}

#[test]
fn hooks_never_see_the_object_store_credentials() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 2 << 20, 74);
    let dump = t.path().join("env.txt");
    protect_with(
        &vault,
        &img,
        &format!("sh -c 'env > {}'", dump.display()),
        "",
        "10",
    );
    let secrets = [
        ("AZURE_STORAGE_ACCOUNT_KEY", "azure-key-0xfeed"),
        ("AZURE_STORAGE_SAS_KEY", "azure-sas-0xfeed"),
        ("AZURE_CLIENT_SECRET", "azure-client-0xfeed"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret-0xfeed"),
        ("AWS_ACCESS_KEY_ID", "aws-id-0xfeed"),
        ("AWS_SESSION_TOKEN", "aws-token-0xfeed"),
        ("SOME_OTHER_TOKEN", "other-0xfeed"),
    ];
    let mut cmd = coffre();
    for (k, v) in secrets {
        cmd.env(k, v);
    }
    let args = ["backup", "--vault", s(&vault), s(&img)];
    succeeded(&args, cmd.args(args).output().unwrap());
    let env = std::fs::read_to_string(&dump).unwrap();
    assert!(!env.contains("0xfeed"), "the hook saw a secret:\n{env}");
    for (k, _) in secrets {
        assert!(!env.contains(k), "the hook saw {k}:\n{env}");
    }
    // What a hook needs is there.
    for k in [
        "PATH=",
        "HOME=",
        "COFFRE_ITEM=vm",
        "COFFRE_PHASE=pre",
        "COFFRE_JOB=",
    ] {
        assert!(env.contains(k), "{k} missing:\n{env}");
    }
    assert_eq!(points(&vault, "vm")[0]["level"], "application-consistent");
}
