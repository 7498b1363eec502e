//! Protected items: protect/unprotect, retained data that never expires,
//! soft delete and undelete within 14 days, purge after them (space given
//! back by gc), one vault per image, and the redundancy lock.

use crate::common::*;

#[test]
fn soft_delete_undelete_and_purge() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 4 << 20, 1);
    protect_at("2027-01-01T00:00:00Z", &vault, "vm", "DefaultPolicy", &img);
    ok_at("2027-01-01T03:00:00Z", &["run-due", "--vault", v]);
    churn(&img, 10, 4096, 2);
    ok_at("2027-01-02T03:00:00Z", &["run-due", "--vault", v]);
    assert_eq!(points(&vault, "vm").len(), 2);
    let show = json_at(
        "2027-01-02T04:00:00Z",
        &["item", "show", "--vault", v, "--item", "vm"],
    );
    assert_eq!(show["tiers"]["daily"], 2, "{show}");
    assert_eq!(show["tiers"]["snapshot"], 2, "{show}");
    assert_eq!(show["next_run"], "2027-01-03T02:00:00Z", "{show}");
    assert_eq!(show["last_backup"]["status"], "Completed", "{show}");
    let stored = json(&["vault", "show", "--vault", v])["stored_bytes"]
        .as_u64()
        .unwrap();
    assert!(stored > 4 << 20);

    // Stop protection, retain data: no more backups, nothing expires.
    ok_at(
        "2027-01-03T00:00:00Z",
        &["unprotect", "--vault", v, "--item", "vm"],
    );
    let r = json_at("2028-06-01T00:00:00Z", &["run-due", "--vault", v]);
    assert!(r["backups"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(points(&vault, "vm").len(), 2, "retained points expired");
    let show = json_at(
        "2028-06-01T00:00:00Z",
        &["item", "show", "--vault", v, "--item", "vm"],
    );
    assert_eq!(show["protection"]["state"], "stopped");
    assert!(show["next_run"].is_null());
    let err = fails(&["backup", "--vault", v, "--item", "vm", s(&img)], 1);
    assert!(err.contains("coffre protect"), "{err}");

    // Soft delete: recoverable for 14 days.
    ok_at(
        "2028-06-01T00:00:00Z",
        &["unprotect", "--vault", v, "--item", "vm", "--delete-data"],
    );
    let show = json_at(
        "2028-06-01T00:00:00Z",
        &["item", "show", "--vault", v, "--item", "vm"],
    );
    assert_eq!(show["protection"]["state"], "soft_deleted");
    assert_eq!(show["protection"]["purge_after"], "2028-06-15T00:00:00Z");
    ok_at("2028-06-14T23:00:00Z", &["run-due", "--vault", v]);
    assert_eq!(points(&vault, "vm").len(), 2, "purged too early");
    ok_at(
        "2028-06-14T23:30:00Z",
        &["undelete", "--vault", v, "--item", "vm"],
    );
    let out = t.path().join("r.img");
    ok(&restore_args(&vault, "vm", None, &out, false));
    let delete_jobs = json(&["jobs", "--vault", v, "--operation", "delete"]);
    assert_eq!(delete_jobs[0]["status"], "Completed");

    // Delete again; after 14 days the data is purged and the space comes back.
    ok_at(
        "2028-07-01T00:00:00Z",
        &["unprotect", "--vault", v, "--item", "vm", "--delete-data"],
    );
    let err = run_at(
        "2028-07-16T00:00:00Z",
        &["undelete", "--vault", v, "--item", "vm"],
    );
    assert!(!err.status.success());
    let pass = json_at("2028-07-16T00:00:00Z", &["run-due", "--vault", v]);
    assert_eq!(
        pass["prune"]["purged_items"],
        serde_json::json!(["vm"]),
        "{pass}"
    );
    assert!(
        pass["gc"]["chunks_removed"].as_u64().unwrap() >= 66,
        "{pass}"
    );
    let after = json(&["vault", "show", "--vault", v]);
    assert_eq!(after["items"].as_array().unwrap().len(), 0);
    assert_eq!(after["stored_bytes"], 0, "{after}");
    assert!(!vault.join("snapshots").join("vm").exists());
    ok(&["verify", "--vault", v, "--read-data"]);
    let err = run_at(
        "2028-07-16T00:00:00Z",
        &["undelete", "--vault", v, "--item", "vm"],
    );
    assert!(String::from_utf8_lossy(&err.stderr).contains("no item"));
    // Two soft deletes and the purge are delete jobs.
    let deletes = json(&["jobs", "--vault", v, "--operation", "delete"]);
    let phases: Vec<&str> = deletes
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["phases"][0]["name"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["soft-delete", "soft-delete", "purge"], "{deletes}");
    assert_eq!(deletes[2]["item"], "vm");
}

#[test]
fn an_image_is_protected_in_one_vault_only() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    ok(&["vault", "create", "--vault", s(&a), "--name", "first"]);
    ok(&["vault", "create", "--vault", s(&b), "--name", "second"]);
    let img = t.path().join("disk.img");
    random_file(&img, 256 << 10, 3);
    ok(&[
        "protect",
        "--vault",
        s(&a),
        "--item",
        "disk",
        "--policy",
        "DefaultPolicy",
        s(&img),
    ]);
    // Same image, another vault, even by another path: refused, naming the first.
    let link = t.path().join("alias.img");
    std::fs::hard_link(&img, &link).unwrap();
    for path in [&img, &link] {
        let err = fails(
            &[
                "protect",
                "--vault",
                s(&b),
                "--item",
                "x",
                "--policy",
                "DefaultPolicy",
                s(path),
            ],
            1,
        );
        assert!(
            err.contains("vault first") && err.contains("only one vault"),
            "{err}"
        );
        let err = fails(&["backup", "--vault", s(&b), s(path)], 1);
        assert!(err.contains("vault first"), "{err}");
    }
    // Same vault, another item name: refused too.
    let err = fails(
        &[
            "protect",
            "--vault",
            s(&a),
            "--item",
            "other",
            "--policy",
            "DefaultPolicy",
            s(&img),
        ],
        1,
    );
    assert!(err.contains("item \"disk\""), "{err}");
    // Once the first vault's data is purged, the second may protect it.
    ok_at(
        "2027-01-01T00:00:00Z",
        &[
            "unprotect",
            "--vault",
            s(&a),
            "--item",
            "disk",
            "--delete-data",
        ],
    );
    fails(
        &[
            "protect",
            "--vault",
            s(&b),
            "--item",
            "x",
            "--policy",
            "DefaultPolicy",
            s(&img),
        ],
        1,
    );
    ok_at("2027-02-01T00:00:00Z", &["prune", "--vault", s(&a)]);
    ok(&[
        "protect",
        "--vault",
        s(&b),
        "--item",
        "x",
        "--policy",
        "DefaultPolicy",
        s(&img),
    ]);
}

#[test]
fn redundancy_is_locked_once_an_item_is_protected() {
    let t = tempfile::tempdir().unwrap();
    let secondary = t.path().join("secondary");
    let vault = new_vault(
        t.path(),
        &["--redundancy", "GRS", "--secondary", s(&secondary)],
    );
    let v = s(&vault);
    assert_eq!(json(&["vault", "show", "--vault", v])["redundancy"], "GRS");
    ok(&["vault", "set", "--vault", v, "--redundancy", "LRS"]);
    assert_eq!(json(&["vault", "show", "--vault", v])["redundancy"], "LRS");
    let img = t.path().join("d.img");
    random_file(&img, 100_000, 4);
    ok(&[
        "protect",
        "--vault",
        v,
        "--item",
        "d",
        "--policy",
        "DefaultPolicy",
        s(&img),
    ]);
    let err = fails(&["vault", "set", "--vault", v, "--redundancy", "GRS"], 1);
    assert!(err.contains("locked") && err.contains("item d"), "{err}");
    assert_eq!(json(&["vault", "show", "--vault", v])["redundancy"], "LRS");
}
