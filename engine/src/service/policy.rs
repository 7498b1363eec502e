//! Backup policies: a schedule, a time zone and retention rules, with the
//! validation rules of an Azure Recovery Services VM policy. This module
//! owns the policy's shape (also its JSON form, `policy create
//! --from-file`), its validation and `DefaultPolicy`; [`crate::schedule`]
//! computes run times and [`crate::retention`] expiry dates from it.

use std::fmt;
use std::ops::RangeInclusive;

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Name of the policy every vault starts with.
pub const DEFAULT_POLICY: &str = "DefaultPolicy";

/// Allowed daily retention, in days.
pub const DAILY_DAYS: RangeInclusive<u32> = 7..=9999;
/// Allowed weekly retention, in weeks.
pub const WEEKLY_WEEKS: RangeInclusive<u32> = 1..=5163;
/// Allowed monthly retention, in months.
pub const MONTHLY_MONTHS: RangeInclusive<u32> = 1..=1188;
/// Allowed yearly retention, in years.
pub const YEARLY_YEARS: RangeInclusive<u32> = 1..=99;
/// Allowed instant-restore snapshot retention for a daily schedule.
pub const INSTANT_RESTORE_DAILY: RangeInclusive<u32> = 1..=5;
/// The instant-restore retention a weekly schedule must have.
pub const INSTANT_RESTORE_WEEKLY: u32 = 5;
/// Days of the month that can be chosen by number (and `last`).
pub const MONTH_DAYS: RangeInclusive<u8> = 1..=28;

/// A day of the week, written `mon` … `sun`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Day(pub Weekday);

impl Ord for Day {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .to_monday_zero_offset()
            .cmp(&other.0.to_monday_zero_offset())
    }
}

impl PartialOrd for Day {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

const DAY_NAMES: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];

impl std::str::FromStr for Day {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let l = s.trim().to_ascii_lowercase();
        DAY_NAMES
            .iter()
            .find(|(n, w)| l == *n || l == format!("{w:?}").to_ascii_lowercase())
            .map(|(_, w)| Day(*w))
            .ok_or_else(|| format!("{s:?} is not a weekday (mon, tue, wed, thu, fri, sat, sun)"))
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = DAY_NAMES
            .iter()
            .find(|(_, w)| *w == self.0)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

/// A month, written `jan` … `dec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month(pub i8);

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const MONTH_FULL: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];

impl std::str::FromStr for Month {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let l = s.trim().to_ascii_lowercase();
        MONTH_NAMES
            .iter()
            .zip(MONTH_FULL)
            .position(|(short, full)| l == *short || l == full)
            .map(|i| Month(i as i8 + 1))
            .ok_or_else(|| format!("{s:?} is not a month (jan … dec)"))
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MONTH_NAMES.get((self.0 - 1) as usize).unwrap_or(&"?"))
    }
}

/// Week of the month: `first` (days 1–7) … `fourth` (22–28), `last` (the
/// last seven days).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeekOfMonth {
    First,
    Second,
    Third,
    Fourth,
    Last,
}

impl std::str::FromStr for WeekOfMonth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "first" => Ok(Self::First),
            "second" => Ok(Self::Second),
            "third" => Ok(Self::Third),
            "fourth" => Ok(Self::Fourth),
            "last" => Ok(Self::Last),
            _ => Err(format!(
                "{s:?} is not a week of the month (first, second, third, fourth, last)"
            )),
        }
    }
}

/// A day of the month: 1–28 or the last day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MonthDay {
    /// Day number.
    Day(u8),
    /// The last day of the month.
    Last,
}

impl std::str::FromStr for MonthDay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("last") {
            return Ok(MonthDay::Last);
        }
        t.parse::<u8>()
            .map(MonthDay::Day)
            .map_err(|_| format!("{s:?} is not a day of the month (1-28 or last)"))
    }
}

impl fmt::Display for MonthDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MonthDay::Day(d) => write!(f, "{d}"),
            MonthDay::Last => f.write_str("last"),
        }
    }
}

macro_rules! serde_as_string {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    S(String),
                    N(i64),
                }
                let s = match Raw::deserialize(d)? {
                    Raw::S(s) => s,
                    Raw::N(n) => n.to_string(),
                };
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_as_string!(Day, Month, MonthDay);

/// A time of day, `HH:MM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeOfDay(pub Time);

impl std::str::FromStr for TimeOfDay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a time of day HH:MM (00:00 to 23:59)");
        let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let h: i8 = h.parse().map_err(|_| bad())?;
        let m: i8 = m.parse().map_err(|_| bad())?;
        Time::new(h, m, 0, 0).map(TimeOfDay).map_err(|_| bad())
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0.hour(), self.0.minute())
    }
}
serde_as_string!(TimeOfDay);

/// How often backups run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frequency {
    /// Every day.
    Daily,
    /// On chosen weekdays.
    Weekly,
}

/// When backups run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Daily or weekly.
    pub frequency: Frequency,
    /// Local time of day (in the policy's time zone).
    pub time: TimeOfDay,
    /// Weekdays of a weekly schedule (empty for daily).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weekdays: Vec<Day>,
}

/// Which day of a month (or of a chosen month) keeps its point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DayChoice {
    /// By day of the month (1–28, `last`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<MonthDay>,
    /// By week of the month …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weeks: Vec<WeekOfMonth>,
    /// … and weekday.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weekdays: Vec<Day>,
}

/// Daily retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyRule {
    /// Days each daily point is kept.
    pub days: u32,
}

/// Weekly retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeeklyRule {
    /// Weeks each weekly point is kept.
    pub weeks: u32,
    /// Points taken on these weekdays are weekly points.
    pub weekdays: Vec<Day>,
}

/// Monthly retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonthlyRule {
    /// Months each monthly point is kept.
    pub months: u32,
    /// Which day of the month.
    #[serde(flatten)]
    pub on: DayChoice,
}

/// Yearly retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct YearlyRule {
    /// Years each yearly point is kept.
    pub years: u32,
    /// In which months.
    pub months: Vec<Month>,
    /// Which day of those months.
    #[serde(flatten)]
    pub on: DayChoice,
}

/// Retention rules; a point matching several is kept under the longest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Retention {
    /// Daily points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<DailyRule>,
    /// Weekly points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<WeeklyRule>,
    /// Monthly points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<MonthlyRule>,
    /// Yearly points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yearly: Option<YearlyRule>,
}

/// A backup policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Name, unique in the vault.
    pub name: String,
    /// IANA time zone of the schedule and of calendar retention.
    #[serde(default = "utc")]
    pub timezone: String,
    /// When backups run.
    pub schedule: Schedule,
    /// Days instant-restore snapshots are kept.
    pub instant_restore_days: u32,
    /// How long points are kept.
    pub retention: Retention,
}

fn utc() -> String {
    "UTC".into()
}

/// A refused policy: the field (as a CLI flag and a JSON path) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy: {field}: {message}")]
pub struct PolicyError {
    /// `--flag (json.path)`.
    pub field: &'static str,
    /// What is wrong, with the allowed range.
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field,
        message: message.into(),
    }
}

fn in_range(
    field: &'static str,
    v: u32,
    range: &RangeInclusive<u32>,
    unit: &str,
) -> Result<(), PolicyError> {
    if range.contains(&v) {
        Ok(())
    } else {
        Err(err(
            field,
            format!(
                "{v} {unit} is outside the allowed range {}-{} {unit}",
                range.start(),
                range.end()
            ),
        ))
    }
}

fn list(days: &[Day]) -> String {
    days.iter()
        .map(Day::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks a policy name: 1-64 characters, letters, digits, `-`, `_`,
/// starting with a letter.
pub fn validate_policy_name(name: &str) -> Result<(), PolicyError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(err(
            "--name (name)",
            format!(
                "{name:?} must be 1-64 characters: letters, digits, '-' or '_', starting with a letter"
            ),
        ))
    }
}

impl Policy {
    /// The policy every vault starts with: daily at 02:00 UTC, daily
    /// points kept 30 days, snapshots kept 2 days.
    pub fn default_policy() -> Policy {
        Policy {
            name: DEFAULT_POLICY.into(),
            timezone: "UTC".into(),
            schedule: Schedule {
                frequency: Frequency::Daily,
                time: TimeOfDay(Time::constant(2, 0, 0, 0)),
                weekdays: Vec::new(),
            },
            instant_restore_days: 2,
            retention: Retention {
                daily: Some(DailyRule { days: 30 }),
                ..Retention::default()
            },
        }
    }

    /// The policy's time zone.
    pub fn tz(&self) -> Result<TimeZone, PolicyError> {
        TimeZone::get(&self.timezone).map_err(|_| {
            err(
                "--timezone (timezone)",
                format!(
                    "{:?} is not an IANA time zone name (such as UTC or Europe/Paris)",
                    self.timezone
                ),
            )
        })
    }

    /// True when a point taken on weekday `d` is on the schedule.
    pub fn is_schedule_day(&self, d: Weekday) -> bool {
        match self.schedule.frequency {
            Frequency::Daily => true,
            Frequency::Weekly => self.schedule.weekdays.iter().any(|w| w.0 == d),
        }
    }

    /// Checks every field; the first problem is returned.
    pub fn validate(&self) -> Result<(), PolicyError> {
        validate_policy_name(&self.name)?;
        self.tz()?;
        let weekly_schedule = self.schedule.frequency == Frequency::Weekly;
        match self.schedule.frequency {
            Frequency::Daily if !self.schedule.weekdays.is_empty() => {
                return Err(err(
                    "--weekdays (schedule.weekdays)",
                    "a daily schedule runs every day and takes no weekdays; with a daily schedule --weekdays chooses the weekly retention days",
                ));
            }
            Frequency::Weekly if self.schedule.weekdays.is_empty() => {
                return Err(err(
                    "--weekdays (schedule.weekdays)",
                    "a weekly schedule needs at least one weekday (mon … sun)",
                ));
            }
            _ => {}
        }
        if weekly_schedule {
            if self.instant_restore_days != INSTANT_RESTORE_WEEKLY {
                return Err(err(
                    "--instant-restore-days (instant_restore_days)",
                    format!(
                        "{} days: a weekly schedule keeps instant-restore snapshots exactly {INSTANT_RESTORE_WEEKLY} days",
                        self.instant_restore_days
                    ),
                ));
            }
        } else {
            in_range(
                "--instant-restore-days (instant_restore_days)",
                self.instant_restore_days,
                &INSTANT_RESTORE_DAILY,
                "days",
            )?;
        }
        let r = &self.retention;
        match (&r.daily, weekly_schedule) {
            (Some(_), true) => {
                return Err(err(
                    "--daily-retention (retention.daily)",
                    "a weekly schedule takes no daily retention (as in Azure); use --weekly-retention",
                ));
            }
            (None, false) => {
                return Err(err(
                    "--daily-retention (retention.daily)",
                    format!(
                        "a daily schedule needs daily retention ({}-{} days)",
                        DAILY_DAYS.start(),
                        DAILY_DAYS.end()
                    ),
                ));
            }
            (Some(d), false) => in_range(
                "--daily-retention (retention.daily.days)",
                d.days,
                &DAILY_DAYS,
                "days",
            )?,
            (None, true) => {}
        }
        match &r.weekly {
            None if weekly_schedule => {
                return Err(err(
                    "--weekly-retention (retention.weekly)",
                    format!(
                        "a weekly schedule needs weekly retention ({}-{} weeks)",
                        WEEKLY_WEEKS.start(),
                        WEEKLY_WEEKS.end()
                    ),
                ));
            }
            None => {}
            Some(w) => {
                in_range(
                    "--weekly-retention (retention.weekly.weeks)",
                    w.weeks,
                    &WEEKLY_WEEKS,
                    "weeks",
                )?;
                if w.weekdays.is_empty() {
                    return Err(err(
                        "--weekly-retention-days (retention.weekly.weekdays)",
                        "weekly retention needs at least one weekday",
                    ));
                }
                let off: Vec<Day> = w
                    .weekdays
                    .iter()
                    .copied()
                    .filter(|d| !self.is_schedule_day(d.0))
                    .collect();
                if !off.is_empty() {
                    return Err(err(
                        "--weekly-retention-days (retention.weekly.weekdays)",
                        format!(
                            "{} not a schedule day (the schedule runs on {}); weekly retention days must be schedule days",
                            list(&off),
                            list(&self.schedule.weekdays)
                        ),
                    ));
                }
            }
        }
        if let Some(m) = &r.monthly {
            in_range(
                "--monthly-retention (retention.monthly.months)",
                m.months,
                &MONTHLY_MONTHS,
                "months",
            )?;
            self.validate_choice(&m.on, "monthly")?;
        }
        if let Some(y) = &r.yearly {
            in_range(
                "--yearly-retention (retention.yearly.years)",
                y.years,
                &YEARLY_YEARS,
                "years",
            )?;
            if y.months.is_empty() {
                return Err(err(
                    "--yearly-months (retention.yearly.months)",
                    "yearly retention needs at least one month (jan … dec)",
                ));
            }
            if let Some(bad) = y.months.iter().find(|m| !(1..=12).contains(&m.0)) {
                return Err(err(
                    "--yearly-months (retention.yearly.months)",
                    format!("month {} is outside 1-12", bad.0),
                ));
            }
            self.validate_choice(&y.on, "yearly")?;
        }
        Ok(())
    }

    fn validate_choice(&self, on: &DayChoice, tier: &'static str) -> Result<(), PolicyError> {
        let (f_days, f_weeks, f_weekdays) = if tier == "monthly" {
            (
                "--monthly-days (retention.monthly.days)",
                "--monthly-weeks (retention.monthly.weeks)",
                "--monthly-weekdays (retention.monthly.weekdays)",
            )
        } else {
            (
                "--yearly-days (retention.yearly.days)",
                "--yearly-weeks (retention.yearly.weeks)",
                "--yearly-weekdays (retention.yearly.weekdays)",
            )
        };
        let by_day = !on.days.is_empty();
        let by_week = !on.weeks.is_empty() || !on.weekdays.is_empty();
        if by_day == by_week {
            return Err(err(
                f_days,
                format!(
                    "{tier} retention needs either days of the month or weeks of the month with weekdays, not both and not neither"
                ),
            ));
        }
        if by_day {
            if self.schedule.frequency == Frequency::Weekly {
                return Err(err(
                    f_days,
                    format!(
                        "with a weekly schedule, {tier} points are chosen by week of the month and weekday, not by day of the month"
                    ),
                ));
            }
            for d in &on.days {
                if let MonthDay::Day(n) = d
                    && !MONTH_DAYS.contains(n)
                {
                    return Err(err(
                        f_days,
                        format!(
                            "day {n} is outside the allowed range {}-{} (or last)",
                            MONTH_DAYS.start(),
                            MONTH_DAYS.end()
                        ),
                    ));
                }
            }
        } else {
            if on.weeks.is_empty() {
                return Err(err(f_weeks, "give at least one week of the month"));
            }
            if on.weekdays.is_empty() {
                return Err(err(f_weekdays, "give at least one weekday"));
            }
            let off: Vec<Day> = on
                .weekdays
                .iter()
                .copied()
                .filter(|d| !self.is_schedule_day(d.0))
                .collect();
            if !off.is_empty() {
                return Err(err(
                    f_weekdays,
                    format!(
                        "{} not a schedule day (the schedule runs on {})",
                        list(&off),
                        list(&self.schedule.weekdays)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Parses the JSON form and validates it. Unknown top-level fields
    /// are refused here (a typo in a file), though ignored when a stored
    /// policy is read (a newer coffre may have added them).
    pub fn from_json(text: &str) -> Result<Policy, PolicyError> {
        let raw: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err("--from-file", format!("not JSON: {e}")))?;
        const KNOWN: [&str; 5] = [
            "name",
            "timezone",
            "schedule",
            "instant_restore_days",
            "retention",
        ];
        if let Some(unknown) = raw
            .as_object()
            .and_then(|o| o.keys().find(|k| !KNOWN.contains(&k.as_str())))
        {
            return Err(err(
                "--from-file",
                format!("unknown field {unknown:?} (known: {})", KNOWN.join(", ")),
            ));
        }
        let p: Policy = serde_json::from_value(raw)
            .map_err(|e| err("--from-file", format!("not a policy: {e}")))?;
        p.validate()?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_valid_and_round_trips() {
        let p = Policy::default_policy();
        p.validate().unwrap();
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(Policy::from_json(&j).unwrap(), p);
    }

    #[test]
    fn parsers() {
        assert_eq!("Mon".parse::<Day>().unwrap(), Day(Weekday::Monday));
        assert_eq!("sunday".parse::<Day>().unwrap(), Day(Weekday::Sunday));
        assert!("xyz".parse::<Day>().is_err());
        assert_eq!("dec".parse::<Month>().unwrap(), Month(12));
        assert_eq!("last".parse::<MonthDay>().unwrap(), MonthDay::Last);
        assert_eq!("02:30".parse::<TimeOfDay>().unwrap().to_string(), "02:30");
        for bad in ["24:00", "2:30", "02:60", "0230"] {
            assert!(bad.parse::<TimeOfDay>().is_err(), "{bad}");
        }
    }
}
