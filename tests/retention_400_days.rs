//! 400 days of a weekly + monthly + yearly policy on a small image, with a
//! fake clock. The points kept at the end are exactly the ones a
//! calendar computation in this test says; every pass's GC unindexes
//! exactly the bytes of what expired; each kept point restores to the
//! image of its day.

use std::collections::{BTreeMap, BTreeSet};

use jiff::civil::{Date, Weekday};
use jiff::{Timestamp, ToSpan};

use crate::common::*;

const START: &str = "2027-01-01";
const DAYS: i64 = 400;

fn at(d: Date, hour: i8) -> String {
    d.at(hour, 0, 0, 0)
        .to_zoned(jiff::tz::TimeZone::UTC)
        .unwrap()
        .timestamp()
        .to_string()
}

/// The independent rule: a point taken on day `d` is still kept at `now`.
fn kept(d: Date, now: Timestamp) -> bool {
    let created = d.at(3, 0, 0, 0).to_zoned(jiff::tz::TimeZone::UTC).unwrap();
    let alive = |span: jiff::Span| created.checked_add(span).unwrap().timestamp() > now;
    let sunday = d.weekday() == Weekday::Sunday;
    let first_week = d.day() <= 7;
    // Weekly: Sundays and Wednesdays, 8 weeks.
    (alive(8.weeks()))
        // Monthly: first Sunday of the month, 3 months.
        || (sunday && first_week && alive(3.months()))
        // Yearly: first Sunday of January and July, 1 year.
        || (sunday && first_week && [1, 7].contains(&d.month()) && alive(1.year()))
}

#[test]
fn four_hundred_days_keep_exactly_the_expected_points() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    ok(&[
        "policy",
        "create",
        "--vault",
        v,
        "--name",
        "WMY",
        "--schedule",
        "weekly",
        "--weekdays",
        "sun,wed",
        "--time",
        "02:00",
        "--weekly-retention",
        "8",
        "--monthly-retention",
        "3",
        "--monthly-weeks",
        "first",
        "--monthly-weekdays",
        "sun",
        "--yearly-retention",
        "1",
        "--yearly-months",
        "jan,jul",
        "--yearly-weeks",
        "first",
        "--yearly-weekdays",
        "sun",
    ]);
    let img = t.path().join("vm.img");
    random_file(&img, 2 << 20, 1);
    let start: Date = START.parse().unwrap();
    ok_at(
        &at(start, 0),
        &[
            "protect",
            "--vault",
            v,
            "--item",
            "vm",
            "--policy",
            "WMY",
            s(&img),
        ],
    );

    let mut crc_by_day: BTreeMap<Date, u32> = BTreeMap::new();
    let mut taken = Vec::new();
    let mut added_total = 0;
    for offset in 0..DAYS {
        let d = start.checked_add(offset.days()).unwrap();
        // Schedule days and Fridays (on which nothing is due).
        if ![Weekday::Sunday, Weekday::Wednesday, Weekday::Friday].contains(&d.weekday()) {
            continue;
        }
        let scheduled = d.weekday() != Weekday::Friday;
        if scheduled {
            churn(&img, 2, 64 << 10, offset as u64 + 10);
        }
        let live_before = json(&["vault", "show", "--vault", v])["live_bytes"]
            .as_u64()
            .unwrap();
        let pass = json_at(&at(d, 3), &["run-due", "--vault", v]);
        let runs = pass["backups"].as_array().unwrap();
        assert_eq!(runs.len(), usize::from(scheduled), "{d}: {pass}");
        let mut added = 0;
        if scheduled {
            assert_eq!(runs[0]["status"], "Completed", "{pass}");
            taken.push(d);
            crc_by_day.insert(d, crc32fast::hash(&std::fs::read(&img).unwrap()));
            let id = runs[0]["point"].as_str().unwrap();
            let p = points(&vault, "vm")
                .into_iter()
                .find(|p| p["id"] == id)
                .unwrap();
            added = p["stored_bytes"].as_u64().unwrap();
        }
        // GC unindexed exactly what the pass's expiry left unreferenced.
        let live_after = json(&["vault", "show", "--vault", v])["live_bytes"]
            .as_u64()
            .unwrap();
        let freed = pass["gc"]["plan"]["unreferenced_bytes"].as_u64().unwrap();
        assert_eq!(live_after, live_before + added - freed, "{d}: {pass}");
        if !pass["prune"]["expired"].as_array().unwrap().is_empty() {
            assert!(
                freed > 0,
                "{d}: points expired but nothing was freed: {pass}"
            );
        }
        added_total += added;
    }

    let end = start.checked_add(DAYS.days()).unwrap();
    let now: Timestamp = at(end, 12).parse().unwrap();
    json_at(&now.to_string(), &["run-due", "--vault", v]);
    let expected: BTreeSet<Date> = taken
        .iter()
        .copied()
        .filter(|d| kept(*d, now) || Some(d) == taken.last())
        .collect();
    let pts = points(&vault, "vm");
    let actual: BTreeSet<Date> = pts
        .iter()
        .map(|p| p["created"].as_str().unwrap()[..10].parse().unwrap())
        .collect();
    assert_eq!(actual, expected);
    // Sanity of the scenario: all three long tiers are represented and
    // most points went.
    assert!(
        taken.len() > 100 && expected.len() < 25,
        "{} taken, {} kept",
        taken.len(),
        expected.len()
    );
    assert!(
        expected.contains(&"2027-07-04".parse().unwrap()),
        "the July yearly point"
    );
    assert!(
        !expected.contains(&"2027-01-03".parse().unwrap()),
        "last January's yearly point expired"
    );

    // Instant-restore snapshots are kept five days (weekly schedule).
    let recent = taken
        .iter()
        .filter(|d| **d >= end.checked_sub(5.days()).unwrap())
        .count();
    let item = json_at(
        &now.to_string(),
        &["item", "show", "--vault", v, "--item", "vm"],
    );
    assert_eq!(item["tiers"]["snapshot"], recent, "{item}");
    assert_eq!(item["points"], expected.len());

    // The vault holds only what the kept points need.
    let plan = json(&["gc", "--vault", v, "--dry-run"]);
    assert_eq!(plan["unreferenced_chunks"], 0);
    // Segments at least half dead were rewritten, so the bytes on disk
    // are at most twice the live bytes, far below all that was written.
    let show = json(&["vault", "show", "--vault", v]);
    let stored = show["stored_bytes"].as_u64().unwrap();
    let live = show["live_bytes"].as_u64().unwrap();
    assert!(live <= stored && stored <= 2 * live + 4096, "{show}");
    assert!(
        stored * 2 < added_total,
        "stored {stored} of {added_total} ever added: {show}"
    );
    ok(&["verify", "--vault", v, "--read-data"]);
    for p in &pts {
        let day: Date = p["created"].as_str().unwrap()[..10].parse().unwrap();
        let out = t.path().join(format!("{day}.img"));
        ok(&restore_args(
            &vault,
            "vm",
            Some(p["id"].as_str().unwrap()),
            &out,
            false,
        ));
        assert_eq!(
            crc32fast::hash(&std::fs::read(&out).unwrap()),
            crc_by_day[&day],
            "{day}"
        );
        std::fs::remove_file(&out).unwrap();
    }
}
