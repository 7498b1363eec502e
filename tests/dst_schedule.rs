//! Daylight saving time: a policy at 02:30 Europe/Paris runs once on each
//! day, including both days the clocks change, at the documented instant
//! (spring forward: 03:30 CEST = 01:30 UTC; fall back: the first 02:30,
//! CEST = 00:30 UTC).

use crate::common::*;

/// Runs the scheduler every 30 minutes from `from` for `hours` and returns
/// the instants at which a backup ran.
fn runs(vault: &std::path::Path, from: jiff::Timestamp, hours: i64) -> Vec<String> {
    let mut out = Vec::new();
    for step in 0..hours * 2 {
        let now = from + jiff::SignedDuration::from_mins(30 * step);
        let r = json_at(&now.to_string(), &["run-due", "--vault", s(vault)]);
        for b in r["backups"].as_array().unwrap() {
            assert_eq!(b["status"], "Completed", "{b}");
            out.push(format!("{now} slot {}", b["slot"].as_str().unwrap()));
        }
    }
    out
}

#[test]
fn both_daylight_saving_changes_run_once_at_the_documented_instant() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    ok(&[
        "policy",
        "create",
        "--vault",
        v,
        "--name",
        "Paris",
        "--schedule",
        "daily",
        "--time",
        "02:30",
        "--timezone",
        "Europe/Paris",
        "--daily-retention",
        "30",
    ]);
    let img = t.path().join("vm.img");
    random_file(&img, 128 << 10, 9);
    protect_at("2027-03-26T22:00:00Z", &vault, "vm", "Paris", &img);

    // Spring forward on Sunday 2027-03-28: 02:30 does not exist.
    let spring = runs(&vault, "2027-03-26T22:00:00Z".parse().unwrap(), 52);
    assert_eq!(
        spring,
        [
            "2027-03-27T01:30:00Z slot 2027-03-27T01:30:00Z", // 02:30 CET
            "2027-03-28T01:30:00Z slot 2027-03-28T01:30:00Z", // 03:30 CEST
            "2027-03-29T00:30:00Z slot 2027-03-29T00:30:00Z", // 02:30 CEST
        ]
    );

    // Fall back on Sunday 2027-10-31: 02:30 happens twice.
    let fall = runs(&vault, "2027-10-29T22:00:00Z".parse().unwrap(), 52);
    assert_eq!(
        fall,
        [
            // The first pass after a long gap catches up once, with the
            // latest slot (missed slots are not replayed).
            "2027-10-29T22:00:00Z slot 2027-10-29T00:30:00Z",
            "2027-10-30T00:30:00Z slot 2027-10-30T00:30:00Z", // 02:30 CEST
            "2027-10-31T00:30:00Z slot 2027-10-31T00:30:00Z", // first 02:30 (CEST)
            "2027-11-01T01:30:00Z slot 2027-11-01T01:30:00Z", // 02:30 CET
        ]
    );
    // Each of those days has exactly one scheduled point.
    let days: Vec<String> = points(&vault, "vm")
        .iter()
        .map(|p| p["created"].as_str().unwrap()[..10].to_string())
        .collect();
    let mut dedup = days.clone();
    dedup.dedup();
    assert_eq!(days, dedup, "a day with two points: {days:?}");
}
