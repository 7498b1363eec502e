//! How long a recovery point is kept.
//!
//! Expiry is computed afresh from the item's *current* policy every time
//! it is asked for, so a changed policy applies to existing points: longer
//! retention keeps them longer, shorter retention lets them go at the next
//! prune. Calendar arithmetic happens in the policy's time zone.
//!
//! - A scheduled point is kept under every rule it matches, and the
//!   longest wins: daily (N days), weekly (taken on a weekly weekday; N
//!   weeks), monthly (taken on the chosen day of the month; N months),
//!   yearly (taken on the chosen day of a chosen month; N years).
//! - An on-demand point is kept until its `retain_until`.
//! - The caller ([`crate::prune`]) adds the item-level rules: stopped
//!   protection keeps everything, and an item's last point is never
//!   removed by expiry.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ToSpan};
use serde::Serialize;

use coffre_vault_store::PointRecord;

use crate::policy::{DayChoice, MonthDay, Policy, WeekOfMonth};

/// Default lifetime of an on-demand point without `retain_until`.
pub const ON_DEMAND_DEFAULT_DAYS: i64 = 30;

/// Why a point is kept until its expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Daily rule.
    Daily,
    /// Weekly rule.
    Weekly,
    /// Monthly rule.
    Monthly,
    /// Yearly rule.
    Yearly,
    /// On-demand backup with a retain-until date.
    OnDemand,
    /// Scheduled, but no rule keeps it.
    None,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Daily => "daily",
            Tier::Weekly => "weekly",
            Tier::Monthly => "monthly",
            Tier::Yearly => "yearly",
            Tier::OnDemand => "on-demand",
            Tier::None => "none",
        })
    }
}

/// True when local date `d` is the chosen day.
pub fn matches_day(on: &DayChoice, d: Date) -> bool {
    let last = d.last_of_month();
    if !on.days.is_empty() {
        return on.days.iter().any(|m| match m {
            MonthDay::Day(n) => d.day() == *n as i8,
            MonthDay::Last => d == last,
        });
    }
    if !on.weekdays.iter().any(|w| w.0 == d.weekday()) {
        return false;
    }
    let day = d.day();
    on.weeks.iter().any(|w| match w {
        WeekOfMonth::First => (1..=7).contains(&day),
        WeekOfMonth::Second => (8..=14).contains(&day),
        WeekOfMonth::Third => (15..=21).contains(&day),
        WeekOfMonth::Fourth => (22..=28).contains(&day),
        WeekOfMonth::Last => day > last.day() - 7,
    })
}

fn plus(created: Timestamp, tz: &TimeZone, span: Span) -> Timestamp {
    created
        .to_zoned(tz.clone())
        .checked_add(span)
        .map(|z| z.timestamp())
        .unwrap_or(Timestamp::MAX)
}

/// When `point` expires under `policy`, and the rule that keeps it longest.
pub fn expiry(policy: &Policy, tz: &TimeZone, point: &PointRecord) -> (Timestamp, Tier) {
    if !point.scheduled {
        let until = point
            .retain_until
            .unwrap_or_else(|| plus(point.created, tz, ON_DEMAND_DEFAULT_DAYS.days()));
        return (until, Tier::OnDemand);
    }
    let d = point.created.to_zoned(tz.clone()).date();
    let r = &policy.retention;
    let mut best = (point.created, Tier::None);
    let mut consider = |t: Timestamp, tier: Tier| {
        if t > best.0 {
            best = (t, tier);
        }
    };
    if let Some(daily) = &r.daily {
        consider(
            plus(point.created, tz, i64::from(daily.days).days()),
            Tier::Daily,
        );
    }
    if let Some(w) = &r.weekly
        && w.weekdays.iter().any(|x| x.0 == d.weekday())
    {
        consider(
            plus(point.created, tz, (i64::from(w.weeks) * 7).days()),
            Tier::Weekly,
        );
    }
    if let Some(m) = &r.monthly
        && matches_day(&m.on, d)
    {
        consider(
            plus(point.created, tz, i64::from(m.months).months()),
            Tier::Monthly,
        );
    }
    if let Some(y) = &r.yearly
        && y.months.iter().any(|m| m.0 == d.month())
        && matches_day(&y.on, d)
    {
        consider(
            plus(point.created, tz, i64::from(y.years).years()),
            Tier::Yearly,
        );
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Day, MonthlyRule, WeeklyRule, YearlyRule};

    fn point(created: &str, scheduled: bool) -> PointRecord {
        PointRecord {
            id: "p".into(),
            item: "i".into(),
            seq: 1,
            created: created.parse().unwrap(),
            image_size: 0,
            block_size: 65536,
            block_map: coffre_vault_store::ChunkId::of(b"x"),
            stats: Default::default(),
            scheduled,
            retain_until: None,
            job: None,
            level: None,
            cbt: None,
        }
    }

    #[test]
    fn longest_rule_wins() {
        let mut p = Policy::default_policy();
        let sun: Day = "sun".parse().unwrap();
        p.retention.weekly = Some(WeeklyRule {
            weeks: 10,
            weekdays: vec![sun],
        });
        p.retention.monthly = Some(MonthlyRule {
            months: 6,
            on: DayChoice {
                weeks: vec![WeekOfMonth::First],
                weekdays: vec![sun],
                ..DayChoice::default()
            },
        });
        p.retention.yearly = Some(YearlyRule {
            years: 2,
            months: vec!["jan".parse().unwrap()],
            on: DayChoice {
                days: vec![MonthDay::Last],
                ..DayChoice::default()
            },
        });
        p.validate().unwrap();
        let tz = TimeZone::UTC;
        let at = |s: &str| -> Timestamp { s.parse().unwrap() };
        // A Wednesday: daily only.
        assert_eq!(
            expiry(&p, &tz, &point("2027-01-06T02:00:00Z", true)),
            (at("2027-02-05T02:00:00Z"), Tier::Daily)
        );
        // Sunday 2027-01-03 is the first Sunday: monthly beats weekly.
        assert_eq!(
            expiry(&p, &tz, &point("2027-01-03T02:00:00Z", true)),
            (at("2027-07-03T02:00:00Z"), Tier::Monthly)
        );
        // Sunday 2027-01-10: weekly.
        assert_eq!(
            expiry(&p, &tz, &point("2027-01-10T02:00:00Z", true)),
            (at("2027-03-21T02:00:00Z"), Tier::Weekly)
        );
        // Sunday 2027-01-31 is the last day of January: yearly.
        assert_eq!(
            expiry(&p, &tz, &point("2027-01-31T02:00:00Z", true)),
            (at("2029-01-31T02:00:00Z"), Tier::Yearly)
        );
        // On demand: 30 days unless told.
        assert_eq!(
            expiry(&p, &tz, &point("2027-01-06T02:00:00Z", false)),
            (at("2027-02-05T02:00:00Z"), Tier::OnDemand)
        );
    }

    #[test]
    fn week_of_month() {
        let on = DayChoice {
            weeks: vec![WeekOfMonth::Last],
            weekdays: vec!["fri".parse().unwrap()],
            ..DayChoice::default()
        };
        // Last Friday of February 2027 is the 26th.
        assert!(matches_day(&on, jiff::civil::date(2027, 2, 26)));
        assert!(!matches_day(&on, jiff::civil::date(2027, 2, 19)));
    }
}
