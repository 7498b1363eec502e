//! Policy validation: every range bound of every field, in and out by one,
//! with a message that names the field and the allowed range; the JSON
//! form; DefaultPolicy; a policy in use cannot be deleted.

use crate::common::*;

/// `policy create` with a daily base and `extra` flags.
fn daily(vault: &std::path::Path, name: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "policy",
        "create",
        "--vault",
        s(vault),
        "--name",
        name,
        "--schedule",
        "daily",
    ];
    if !extra.contains(&"--time") {
        args.extend(["--time", "02:00"]);
    }
    if !extra.contains(&"--daily-retention") {
        args.extend(["--daily-retention", "30"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

fn weekly(vault: &std::path::Path, name: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "policy",
        "create",
        "--vault",
        s(vault),
        "--name",
        name,
        "--schedule",
        "weekly",
        "--time",
        "02:00",
        "--weekdays",
        "sun,wed",
    ];
    if !extra.contains(&"--weekly-retention") {
        args.extend(["--weekly-retention", "4"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn every_range_bound_in_and_out_by_one() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let mut n = 0;
    let mut name = || {
        n += 1;
        format!("p{n}")
    };
    // (schedule, flags, accepted, words the refusal must contain)
    type Case<'a> = (&'a str, Vec<&'a str>, bool, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        ("daily", vec!["--daily-retention", "7"], true, &[]),
        (
            "daily",
            vec!["--daily-retention", "6"],
            false,
            &["--daily-retention", "7-9999"],
        ),
        ("daily", vec!["--daily-retention", "9999"], true, &[]),
        (
            "daily",
            vec!["--daily-retention", "10000"],
            false,
            &["--daily-retention", "7-9999"],
        ),
        ("daily", vec!["--weekly-retention", "1"], true, &[]),
        (
            "daily",
            vec!["--weekly-retention", "0"],
            false,
            &["--weekly-retention", "1-5163"],
        ),
        ("daily", vec!["--weekly-retention", "5163"], true, &[]),
        (
            "daily",
            vec!["--weekly-retention", "5164"],
            false,
            &["--weekly-retention", "1-5163"],
        ),
        ("daily", vec!["--monthly-retention", "1"], true, &[]),
        (
            "daily",
            vec!["--monthly-retention", "0"],
            false,
            &["--monthly-retention", "1-1188"],
        ),
        ("daily", vec!["--monthly-retention", "1188"], true, &[]),
        (
            "daily",
            vec!["--monthly-retention", "1189"],
            false,
            &["--monthly-retention", "1-1188"],
        ),
        ("daily", vec!["--yearly-retention", "1"], true, &[]),
        (
            "daily",
            vec!["--yearly-retention", "0"],
            false,
            &["--yearly-retention", "1-99"],
        ),
        ("daily", vec!["--yearly-retention", "99"], true, &[]),
        (
            "daily",
            vec!["--yearly-retention", "100"],
            false,
            &["--yearly-retention", "1-99"],
        ),
        ("daily", vec!["--instant-restore-days", "1"], true, &[]),
        (
            "daily",
            vec!["--instant-restore-days", "0"],
            false,
            &["--instant-restore-days", "1-5"],
        ),
        ("daily", vec!["--instant-restore-days", "5"], true, &[]),
        (
            "daily",
            vec!["--instant-restore-days", "6"],
            false,
            &["--instant-restore-days", "1-5"],
        ),
        ("weekly", vec!["--instant-restore-days", "5"], true, &[]),
        (
            "weekly",
            vec!["--instant-restore-days", "4"],
            false,
            &["--instant-restore-days", "exactly 5"],
        ),
        (
            "weekly",
            vec!["--instant-restore-days", "6"],
            false,
            &["--instant-restore-days", "exactly 5"],
        ),
        ("weekly", vec!["--weekly-retention", "1"], true, &[]),
        (
            "weekly",
            vec!["--weekly-retention", "0"],
            false,
            &["--weekly-retention", "1-5163"],
        ),
        ("weekly", vec!["--weekly-retention", "5163"], true, &[]),
        (
            "weekly",
            vec!["--weekly-retention", "5164"],
            false,
            &["--weekly-retention", "1-5163"],
        ),
        (
            "daily",
            vec!["--monthly-retention", "3", "--monthly-days", "1"],
            true,
            &[],
        ),
        (
            "daily",
            vec!["--monthly-retention", "3", "--monthly-days", "0"],
            false,
            &["--monthly-days", "1-28"],
        ),
        (
            "daily",
            vec!["--monthly-retention", "3", "--monthly-days", "28"],
            true,
            &[],
        ),
        (
            "daily",
            vec!["--monthly-retention", "3", "--monthly-days", "29"],
            false,
            &["--monthly-days", "1-28"],
        ),
        (
            "daily",
            vec!["--monthly-retention", "3", "--monthly-days", "last"],
            true,
            &[],
        ),
        (
            "daily",
            vec!["--yearly-retention", "2", "--yearly-days", "28"],
            true,
            &[],
        ),
        (
            "daily",
            vec!["--yearly-retention", "2", "--yearly-days", "29"],
            false,
            &["--yearly-days", "1-28"],
        ),
        ("daily", vec!["--time", "00:00"], true, &[]),
        ("daily", vec!["--time", "23:59"], true, &[]),
        (
            "daily",
            vec!["--time", "24:00"],
            false,
            &["--time", "23:59"],
        ),
        // Inconsistent values.
        (
            "weekly",
            vec!["--weekly-retention-days", "mon"],
            false,
            &["--weekly-retention-days", "not a schedule day"],
        ),
        (
            "weekly",
            vec!["--daily-retention", "30"],
            false,
            &["--daily-retention", "weekly schedule"],
        ),
        (
            "weekly",
            vec!["--monthly-retention", "2", "--monthly-days", "1"],
            false,
            &["--monthly-days", "week of the month"],
        ),
        (
            "weekly",
            vec!["--monthly-retention", "2", "--monthly-weekdays", "fri"],
            false,
            &["--monthly-weekdays", "not a schedule day"],
        ),
        (
            "daily",
            vec!["--timezone", "Mars/Olympus"],
            false,
            &["--timezone", "IANA"],
        ),
    ];
    for (schedule, flags, accepted, words) in cases {
        let p = name();
        let out = if schedule == "daily" {
            daily(&vault, &p, &flags)
        } else {
            weekly(&vault, &p, &flags)
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.success(),
            accepted,
            "{schedule} {flags:?}: exit {:?}: {err}",
            out.status.code()
        );
        for w in words {
            assert!(
                err.contains(w),
                "{schedule} {flags:?}: {w:?} missing from: {err}"
            );
        }
    }
    // A daily schedule needs daily retention.
    let out = run(&[
        "policy",
        "create",
        "--vault",
        s(&vault),
        "--name",
        "nodaily",
        "--schedule",
        "daily",
        "--time",
        "02:00",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs daily retention"));
}

#[test]
fn default_policy_json_form_and_deletion_rules() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let d = json(&[
        "policy",
        "show",
        "--vault",
        s(&vault),
        "--name",
        "DefaultPolicy",
    ]);
    assert_eq!(d["schedule"]["frequency"], "daily");
    assert_eq!(d["schedule"]["time"], "02:00");
    assert_eq!(d["timezone"], "UTC");
    assert_eq!(d["retention"]["daily"]["days"], 30);
    assert_eq!(d["instant_restore_days"], 2);

    // The JSON form (README, "Policy JSON").
    let file = t.path().join("gold.json");
    std::fs::write(
        &file,
        r#"{"name": "Gold", "timezone": "Europe/Paris",
            "schedule": {"frequency": "weekly", "time": "02:30", "weekdays": ["sun", "wed"]},
            "instant_restore_days": 5,
            "retention": {
              "weekly": {"weeks": 12, "weekdays": ["sun"]},
              "monthly": {"months": 6, "weeks": ["first"], "weekdays": ["sun"]},
              "yearly": {"years": 3, "months": ["jan", "jul"], "weeks": ["last"], "weekdays": ["wed"]}}}"#,
    )
    .unwrap();
    ok(&[
        "policy",
        "create",
        "--vault",
        s(&vault),
        "--from-file",
        s(&file),
    ]);
    let g = json(&["policy", "show", "--vault", s(&vault), "--name", "Gold"]);
    assert_eq!(
        g["retention"]["yearly"]["months"],
        serde_json::json!(["jan", "jul"])
    );
    // A refused JSON policy names its field too.
    std::fs::write(&file, r#"{"name": "Bad", "schedule": {"frequency": "daily", "time": "02:00"}, "instant_restore_days": 9, "retention": {"daily": {"days": 30}}}"#).unwrap();
    let err = fails(
        &[
            "policy",
            "create",
            "--vault",
            s(&vault),
            "--from-file",
            s(&file),
        ],
        1,
    );
    assert!(
        err.contains("instant_restore_days") && err.contains("1-5"),
        "{err}"
    );
    // Duplicate names are refused.
    let err = fails(
        &[
            "policy",
            "create",
            "--vault",
            s(&vault),
            "--name",
            "Gold",
            "--schedule",
            "daily",
            "--time",
            "01:00",
            "--daily-retention",
            "7",
        ],
        1,
    );
    assert!(err.contains("already exists"), "{err}");

    // In use: cannot be deleted; once unused, it can.
    let img = t.path().join("a.img");
    random_file(&img, 300_000, 1);
    ok(&[
        "protect",
        "--vault",
        s(&vault),
        "--item",
        "a",
        "--policy",
        "Gold",
        s(&img),
    ]);
    let err = fails(
        &["policy", "delete", "--vault", s(&vault), "--name", "Gold"],
        1,
    );
    assert!(err.contains("protects item a"), "{err}");
    let list = json(&["policy", "list", "--vault", s(&vault)]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    ok(&[
        "protect",
        "--vault",
        s(&vault),
        "--item",
        "a",
        "--policy",
        "DefaultPolicy",
        s(&img),
    ]);
    ok(&["policy", "delete", "--vault", s(&vault), "--name", "Gold"]);
    let err = fails(
        &["policy", "show", "--vault", s(&vault), "--name", "Gold"],
        1,
    );
    assert!(err.contains("no policy"), "{err}");
}

#[test]
fn changing_a_policy_applies_to_existing_points() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    ok(&[
        "policy",
        "create",
        "--vault",
        v,
        "--name",
        "P",
        "--schedule",
        "daily",
        "--time",
        "02:00",
        "--daily-retention",
        "10",
    ]);
    let img = t.path().join("a.img");
    random_file(&img, 200_000, 2);
    protect_at("2027-01-01T00:00:00Z", &vault, "a", "P", &img);
    // Ten scheduled daily points, 2027-01-01 .. 2027-01-10.
    for day in 1..=10 {
        churn(&img, 1, 1000, day);
        let now = format!("2027-01-{day:02}T03:00:00Z");
        ok_at(&now, &["run-due", "--vault", v]);
    }
    assert_eq!(points(&vault, "a").len(), 10);
    // On the 15th, 10-day retention lets the points of the 1st-5th go.
    let dry = json_at(
        "2027-01-15T12:00:00Z",
        &["prune", "--vault", v, "--dry-run"],
    );
    assert_eq!(dry["expired"].as_array().unwrap().len(), 5, "{dry}");
    // Longer retention keeps them all.
    ok(&[
        "policy",
        "set",
        "--vault",
        v,
        "--name",
        "P",
        "--daily-retention",
        "30",
    ]);
    let r = json_at("2027-01-15T12:00:00Z", &["prune", "--vault", v]);
    assert_eq!(r["expired"].as_array().unwrap().len(), 0, "{r}");
    // Shorter retention lets them go at the next clean-up.
    ok(&[
        "policy",
        "set",
        "--vault",
        v,
        "--name",
        "P",
        "--daily-retention",
        "7",
    ]);
    let r = json_at("2027-01-15T12:00:00Z", &["prune", "--vault", v]);
    assert_eq!(r["expired"].as_array().unwrap().len(), 8, "{r}");
    let left: Vec<String> = points(&vault, "a")
        .iter()
        .map(|p| p["created"].as_str().unwrap()[..10].to_string())
        .collect();
    assert_eq!(left, ["2027-01-09", "2027-01-10"]);
    ok(&["gc", "--vault", v]);
    ok(&["verify", "--vault", v, "--read-data"]);
}

#[test]
fn the_last_point_never_expires_while_it_is_the_only_one() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("d.img");
    random_file(&img, 300_000, 7);
    // "Backup now" on an unprotected image protects it, and says so.
    let out = run_at(
        "2027-01-01T00:00:00Z",
        &[
            "backup",
            "--vault",
            v,
            "--retain-until",
            "2027-01-05",
            s(&img),
        ],
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("was not protected") && err.contains("DefaultPolicy"),
        "{err}"
    );
    let item = json(&["item", "show", "--vault", v, "--item", "d"]);
    assert_eq!(item["policy"], "DefaultPolicy");
    assert_eq!(
        points(&vault, "d")[0]["retain_until"],
        "2027-01-06T00:00:00Z"
    );
    // Long expired, but the only point: kept.
    let r = json_at("2028-01-01T00:00:00Z", &["prune", "--vault", v]);
    assert_eq!(r["expired"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(points(&vault, "d").len(), 1);
    // With a newer point, it goes.
    let j = json_at("2028-01-01T00:00:00Z", &["backup", "--vault", v, s(&img)]);
    assert_eq!(j["auto_protected"], false);
    let r = json_at("2028-01-01T00:00:00Z", &["prune", "--vault", v]);
    assert_eq!(r["expired"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["expired"][0]["tier"], "on_demand");
    // A retain-until in the past is refused.
    let err = run_at(
        "2028-01-01T00:00:00Z",
        &[
            "backup",
            "--vault",
            v,
            "--retain-until",
            "2027-12-31",
            s(&img),
        ],
    );
    assert!(String::from_utf8_lossy(&err.stderr).contains("not in the future"));
}
