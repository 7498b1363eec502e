//! Hooks and sources are the host's own: what a vault's catalog says —
//! which another host, or whoever can write a shared vault's bucket, may
//! have written — makes no host run a command or read an image. "Another
//! host" here is a second host registry (`COFFRE_REGISTRY`), which is
//! where a host keeps that word; the last test uses two caches of one
//! vault in an Azurite container, as two hosts would.

use std::path::Path;
use std::process::Output;

use crate::common::*;

/// Runs `coffre args…` as the other host (its own registry), at `now`.
fn as_other(registry: &Path, now: &str, args: &[&str]) -> Output {
    let out = coffre()
        .env("COFFRE_REGISTRY", registry)
        .env("COFFRE_NOW", now)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "other host: coffre {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn protect_args<'a>(
    vault: &'a Path,
    item: &'a str,
    img: &'a Path,
    hooks: &'a [&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "protect",
        "--vault",
        s(vault),
        "--item",
        item,
        "--policy",
        "DefaultPolicy",
    ];
    a.extend_from_slice(hooks);
    a.push(s(img));
    a
}

fn log_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn last_warnings(vault: &Path, item: &str) -> String {
    let jobs = json(&["jobs", "--vault", s(vault), "--item", item]);
    jobs.as_array().unwrap().last().unwrap()["stats"]["warnings"].to_string()
}

#[test]
fn hooks_set_on_another_host_never_run_here() {
    let t = tempfile::tempdir().unwrap();
    let other = t.path().join("other-host-registry");
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 2 << 20, 75);
    let log = t.path().join("hooks.log");
    let echo = |word: &str| format!("sh -c 'echo {word} >> {}'", log.display());
    let now = "2027-01-01T03:00:00Z";

    let mine = echo("mine");
    ok(&protect_args(
        &vault,
        "vm",
        &img,
        &["--pre-snapshot", &mine],
    ));
    // The other host puts its own hook into the catalog.
    let theirs = echo("theirs");
    as_other(
        &other,
        now,
        &protect_args(&vault, "vm", &img, &["--pre-snapshot", &theirs]),
    );
    let shown = json(&["item", "show", "--vault", s(&vault), "--item", "vm"]);
    assert!(shown["hooks"].to_string().contains("theirs"), "{shown}");

    // This host runs its own, and says the catalog's differ.
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    assert_eq!(log_of(&log), ["mine"]);
    let w = last_warnings(&vault, "vm");
    assert!(
        w.contains("other hooks for item vm than this host set"),
        "{w}"
    );
    assert_eq!(points(&vault, "vm")[0]["level"], "application-consistent");

    // Changing only the post hook here keeps this host's pre hook, not
    // the catalog's.
    let post = echo("post");
    ok(&protect_args(
        &vault,
        "vm",
        &img,
        &["--post-snapshot", &post],
    ));
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    assert_eq!(log_of(&log), ["mine", "mine", "post"]);

    // An item only the other host protects, with a hook: backed up here
    // (the image given on the command line), its hook does not run.
    let img2 = t.path().join("vm2.img");
    mixed_image(&img2, 1 << 20, 76);
    let theirs2 = echo("theirs2");
    as_other(
        &other,
        now,
        &protect_args(&vault, "vm2", &img2, &["--pre-snapshot", &theirs2]),
    );
    ok(&["backup", "--vault", s(&vault), "--item", "vm2", s(&img2)]);
    assert_eq!(log_of(&log), ["mine", "mine", "post"]);
    let w = last_warnings(&vault, "vm2");
    assert!(w.contains("not set on this host"), "{w}");
    assert_eq!(points(&vault, "vm2")[0]["level"], "crash-consistent");
}

#[test]
fn the_scheduler_backs_up_only_the_items_this_host_protects() {
    let t = tempfile::tempdir().unwrap();
    let other = t.path().join("other-host-registry");
    let vault = new_vault(t.path(), &[]);
    let mine = t.path().join("mine.img");
    let theirs = t.path().join("theirs.img");
    mixed_image(&mine, 1 << 20, 77);
    mixed_image(&theirs, 1 << 20, 78);
    let marker = t.path().join("their-hook-ran");
    let hook = format!("touch {}", marker.display());
    let t0 = "2027-01-01T03:00:00Z";
    let t1 = "2027-01-02T03:00:00Z";
    protect_at(t0, &vault, "mine", "DefaultPolicy", &mine);
    as_other(
        &other,
        t0,
        &protect_args(&vault, "theirs", &theirs, &["--pre-snapshot", &hook]),
    );

    // Both are due; this host backs up its own only.
    ok_at(t1, &["run-due", "--vault", s(&vault)]);
    assert_eq!(points(&vault, "mine").len(), 1);
    assert!(points(&vault, "theirs").is_empty());
    assert!(!marker.exists(), "this host ran the other host's hook");

    // The other host's pass backs its item up (it was due) and runs its
    // hook.
    as_other(&other, t1, &["run-due", "--vault", s(&vault)]);
    assert_eq!(points(&vault, "theirs").len(), 1);
    assert!(marker.exists());
    assert_eq!(points(&vault, "mine").len(), 1);
}

#[test]
fn a_shared_vaults_catalog_makes_no_host_run_a_hook_or_read_an_image() {
    let Some(az) = crate::object_store::Emulator::azurite(&["trust"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = "azure://devstoreaccount1/trust/v";
    let (ha, hb) = (t.path().join("host-a"), t.path().join("host-b"));
    let registry_b = t.path().join("host-b-registry");
    az.ok(&[
        "vault",
        "create",
        "--store",
        store,
        "--encryption",
        "none",
        "--vault",
        s(&ha),
        "--snapshot-area",
        s(&t.path().join("area-a")),
    ]);
    az.ok(&["vault", "attach", "--store", store, "--vault", s(&hb)]);
    let as_b = |now: &str, args: &[&str]| {
        let out = az
            .coffre()
            .env("COFFRE_REGISTRY", &registry_b)
            .env("COFFRE_NOW", now)
            .args(args)
            .output()
            .unwrap();
        succeeded(args, out)
    };
    let img = t.path().join("b.img");
    mixed_image(&img, 1 << 20, 79);
    let marker = t.path().join("b-hook-ran");
    let hook = format!("touch {}", marker.display());
    let (t0, t1) = ("2027-01-01T03:00:00Z", "2027-01-02T03:00:00Z");
    // Host B protects its VM, with a hook, into the shared bucket.
    as_b(
        t0,
        &protect_args(&hb, "vm-b", &img, &["--pre-snapshot", &hook]),
    );
    let shown = az.json(&["item", "show", "--vault", s(&ha), "--item", "vm-b"]);
    assert!(shown["hooks"].to_string().contains("touch"), "{shown}");

    // Host A's scheduler sees the item due and leaves it alone.
    let args = ["run-due", "--vault", s(&ha)];
    succeeded(
        &args,
        az.coffre()
            .env("COFFRE_NOW", t1)
            .args(args)
            .output()
            .unwrap(),
    );
    let jobs = az.json(&["jobs", "--vault", s(&ha), "--item", "vm-b"]);
    assert_eq!(
        jobs,
        serde_json::json!([]),
        "host A backed up host B's item"
    );
    assert!(!marker.exists(), "host A ran host B's hook");
    // Backed up on demand on host A, the hook does not run either.
    let b = az.json(&["backup", "--vault", s(&ha), "--item", "vm-b", s(&img)]);
    assert!(!marker.exists(), "host A ran host B's hook");
    assert!(
        b["job"]["stats"]["warnings"]
            .to_string()
            .contains("not set on this host"),
        "{b}"
    );
    // Host B's own scheduler runs it, hook included.
    as_b(t1, &["run-due", "--vault", s(&hb)]);
    assert!(marker.exists(), "host B did not run its own hook");
}
