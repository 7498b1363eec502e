//! When a policy's backups run: the schedule's *slots*, computed in the
//! policy's time zone.
//!
//! Daylight saving time: a slot is the schedule's wall-clock time on a
//! schedule day, resolved with RFC 5545 ("compatible") rules. When the
//! time falls in a spring-forward gap it moves forward by the gap (02:30
//! Europe/Paris on the last Sunday of March runs at 03:30 CEST, 01:30
//! UTC); when it occurs twice in an autumn fold the earlier instant is
//! used (02:30 CEST, 00:30 UTC). Either way there is exactly one slot on
//! every schedule day.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

use crate::policy::Policy;

/// The slot on local date `date`, if `date` is a schedule day.
pub fn slot_on(policy: &Policy, tz: &TimeZone, date: Date) -> Option<Timestamp> {
    if !policy.is_schedule_day(date.weekday()) {
        return None;
    }
    date.to_datetime(policy.schedule.time.0)
        .to_zoned(tz.clone())
        .ok()
        .map(|z| z.timestamp())
}

fn local_date(tz: &TimeZone, t: Timestamp) -> Date {
    t.to_zoned(tz.clone()).date()
}

/// The latest slot at or before `t`.
pub fn latest_slot_at_or_before(policy: &Policy, tz: &TimeZone, t: Timestamp) -> Option<Timestamp> {
    let mut d = local_date(tz, t).tomorrow().ok()?;
    for _ in 0..10 {
        if let Some(s) = slot_on(policy, tz, d)
            && s <= t
        {
            return Some(s);
        }
        d = d.yesterday().ok()?;
    }
    None
}

/// The first slot strictly after `t`.
pub fn next_slot_after(policy: &Policy, tz: &TimeZone, t: Timestamp) -> Option<Timestamp> {
    let mut d = local_date(tz, t).yesterday().ok()?;
    for _ in 0..10 {
        if let Some(s) = slot_on(policy, tz, d)
            && s > t
        {
            return Some(s);
        }
        d = d.tomorrow().ok()?;
    }
    None
}

/// The slot to run now, if one came due after `last` (the last slot dealt
/// with). Missed slots are not replayed: one run catches up.
pub fn due_slot(
    policy: &Policy,
    tz: &TimeZone,
    last: Option<Timestamp>,
    now: Timestamp,
) -> Option<Timestamp> {
    let s = latest_slot_at_or_before(policy, tz, now)?;
    match last {
        Some(l) if s <= l => None,
        _ => Some(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, TimeOfDay};

    fn paris_0230() -> (Policy, TimeZone) {
        let mut p = Policy::default_policy();
        p.timezone = "Europe/Paris".into();
        p.schedule.time = "02:30".parse::<TimeOfDay>().unwrap();
        p.validate().unwrap();
        let tz = p.tz().unwrap();
        (p, tz)
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// Walks every hour across a DST change and collects the slots that
    /// come due: exactly one per local day, at the documented instant.
    fn due_runs(p: &Policy, tz: &TimeZone, from: &str, hours: i64) -> Vec<Timestamp> {
        let mut last = latest_slot_at_or_before(p, tz, ts(from));
        let mut runs = Vec::new();
        for h in 1..=hours * 4 {
            let now = ts(from) + jiff::SignedDuration::from_mins(15 * h);
            if let Some(s) = due_slot(p, tz, last, now) {
                runs.push(s);
                last = Some(s);
            }
        }
        runs
    }

    #[test]
    fn spring_forward_runs_once_at_0330_cest() {
        let (p, tz) = paris_0230();
        // 2027-03-28: clocks go from 02:00 CET to 03:00 CEST.
        let runs = due_runs(&p, &tz, "2027-03-26T12:00:00Z", 72);
        assert_eq!(
            runs,
            vec![
                ts("2027-03-27T01:30:00Z"), // 02:30 CET
                ts("2027-03-28T01:30:00Z"), // 02:30 does not exist: 03:30 CEST
                ts("2027-03-29T00:30:00Z"), // 02:30 CEST
            ]
        );
    }

    #[test]
    fn fall_back_runs_once_at_the_first_0230() {
        let (p, tz) = paris_0230();
        // 2027-10-31: clocks go from 03:00 CEST back to 02:00 CET.
        let runs = due_runs(&p, &tz, "2027-10-29T12:00:00Z", 72);
        assert_eq!(
            runs,
            vec![
                ts("2027-10-30T00:30:00Z"), // 02:30 CEST
                ts("2027-10-31T00:30:00Z"), // first 02:30 (CEST), not 01:30Z
                ts("2027-11-01T01:30:00Z"), // 02:30 CET
            ]
        );
    }

    #[test]
    fn weekly_slots_and_catch_up() {
        let mut p = Policy::default_policy();
        p.schedule.frequency = crate::policy::Frequency::Weekly;
        p.schedule.weekdays = vec!["mon".parse().unwrap(), "thu".parse().unwrap()];
        let tz = TimeZone::UTC;
        // 2027-01-04 is a Monday.
        assert_eq!(
            next_slot_after(&p, &tz, ts("2027-01-04T02:00:00Z")),
            Some(ts("2027-01-07T02:00:00Z"))
        );
        // Down for two weeks: one catch-up run, the latest missed slot.
        let last = Some(ts("2027-01-04T02:00:00Z"));
        assert_eq!(
            due_slot(&p, &tz, last, ts("2027-01-19T09:00:00Z")),
            Some(ts("2027-01-18T02:00:00Z"))
        );
        assert_eq!(due_slot(&p, &tz, last, ts("2027-01-07T01:59:59Z")), None);
    }
}
