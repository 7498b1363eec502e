//! `coffre policy create|set|show|list|delete`: policy flags to a
//! [`Policy`], and policies to tables.

use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::Context;
use coffre_engine::policies;
use coffre_engine::policy::{
    DailyRule, Day, DayChoice, Frequency, Month, MonthDay, MonthlyRule, Policy, Retention,
    Schedule, TimeOfDay, WeekOfMonth, WeeklyRule, YearlyRule,
};
use coffre_engine::store::Access;

use crate::args::{OutputFormat, PolicyCommand, PolicyFields};
use crate::ctx::{Ctx, open};
use crate::output::{self, columns};

fn parse_list<T: FromStr<Err = String>>(flag: &str, v: &[String]) -> anyhow::Result<Vec<T>> {
    v.iter()
        .map(|s| s.parse::<T>().map_err(|e| anyhow::anyhow!("{flag}: {e}")))
        .collect()
}

fn choice(
    days: &Option<Vec<String>>,
    weeks: &Option<Vec<String>>,
    weekdays: &Option<Vec<String>>,
    tier: &str,
    default_day: Day,
) -> anyhow::Result<DayChoice> {
    let f = |s: &str| format!("--{tier}-{s}");
    let mut c = DayChoice {
        days: parse_list::<MonthDay>(&f("days"), days.as_deref().unwrap_or_default())?,
        weeks: parse_list::<WeekOfMonth>(&f("weeks"), weeks.as_deref().unwrap_or_default())?,
        weekdays: parse_list::<Day>(&f("weekdays"), weekdays.as_deref().unwrap_or_default())?,
    };
    if c.days.is_empty() && c.weeks.is_empty() && c.weekdays.is_empty() {
        // Azure's default: the first occurrence of the weekly day.
        c.weeks = vec![WeekOfMonth::First];
        c.weekdays = vec![default_day];
    } else if c.days.is_empty() {
        if c.weeks.is_empty() {
            c.weeks = vec![WeekOfMonth::First];
        }
        if c.weekdays.is_empty() {
            c.weekdays = vec![default_day];
        }
    }
    Ok(c)
}

/// Applies the flags to `p` (a fresh skeleton when creating).
fn apply(fields: &PolicyFields, p: &mut Policy, creating: bool) -> anyhow::Result<()> {
    if let Some(s) = &fields.schedule {
        p.schedule.frequency = match s.to_ascii_lowercase().as_str() {
            "daily" => Frequency::Daily,
            "weekly" => Frequency::Weekly,
            _ => anyhow::bail!("--schedule: {s:?} is neither daily nor weekly"),
        };
    } else if creating {
        anyhow::bail!("--schedule daily|weekly is required");
    }
    if let Some(t) = &fields.time {
        p.schedule.time = t
            .parse::<TimeOfDay>()
            .map_err(|e| anyhow::anyhow!("--time: {e}"))?;
    } else if creating {
        anyhow::bail!("--time HH:MM is required");
    }
    if let Some(z) = &fields.timezone {
        p.timezone = z.clone();
    }
    let weekly = p.schedule.frequency == Frequency::Weekly;
    let given_days = fields
        .weekdays
        .as_deref()
        .map(|d| parse_list::<Day>("--weekdays", d))
        .transpose()?;
    // Weekly schedule: --weekdays are the schedule days. Daily: they pick
    // the weekly retention points.
    let weekly_points_days = if weekly {
        if let Some(d) = &given_days {
            p.schedule.weekdays = d.clone();
        }
        p.schedule.weekdays.clone()
    } else {
        p.schedule.weekdays.clear();
        given_days
            .clone()
            .or_else(|| p.retention.weekly.as_ref().map(|w| w.weekdays.clone()))
            .unwrap_or_else(|| vec![Day(jiff::civil::Weekday::Sunday)])
    };
    if let Some(n) = fields.instant_restore_days {
        p.instant_restore_days = n;
    } else if creating || fields.schedule.is_some() {
        p.instant_restore_days = if weekly { 5 } else { 2 };
    }
    if let Some(d) = fields.daily_retention {
        p.retention.daily = Some(DailyRule { days: d });
    } else if weekly && fields.schedule.is_some() {
        p.retention.daily = None;
    }
    let retention_days = match &fields.weekly_retention_days {
        Some(d) => Some(parse_list::<Day>("--weekly-retention-days", d)?),
        None => None,
    };
    if let Some(w) = fields.weekly_retention {
        p.retention.weekly = Some(WeeklyRule {
            weeks: w,
            weekdays: retention_days.clone().unwrap_or(weekly_points_days.clone()),
        });
    } else if let (Some(w), Some(d)) = (p.retention.weekly.as_mut(), retention_days.clone()) {
        w.weekdays = d;
    } else if let (Some(w), Some(d)) = (p.retention.weekly.as_mut(), given_days.clone()) {
        w.weekdays = d;
    }
    let default_day = p
        .retention
        .weekly
        .as_ref()
        .and_then(|w| w.weekdays.first().copied())
        .or_else(|| weekly_points_days.first().copied())
        .unwrap_or(Day(jiff::civil::Weekday::Sunday));
    let monthly_flags = fields.monthly_days.is_some()
        || fields.monthly_weeks.is_some()
        || fields.monthly_weekdays.is_some();
    if let Some(m) = fields.monthly_retention {
        let on = if monthly_flags || p.retention.monthly.is_none() {
            choice(
                &fields.monthly_days,
                &fields.monthly_weeks,
                &fields.monthly_weekdays,
                "monthly",
                default_day,
            )?
        } else {
            p.retention
                .monthly
                .as_ref()
                .map(|r| r.on.clone())
                .unwrap_or_default()
        };
        p.retention.monthly = Some(MonthlyRule { months: m, on });
    } else if monthly_flags {
        let on = choice(
            &fields.monthly_days,
            &fields.monthly_weeks,
            &fields.monthly_weekdays,
            "monthly",
            default_day,
        )?;
        match p.retention.monthly.as_mut() {
            Some(r) => r.on = on,
            None => anyhow::bail!("--monthly-days/--monthly-weeks need --monthly-retention"),
        }
    }
    let yearly_flags = fields.yearly_days.is_some()
        || fields.yearly_weeks.is_some()
        || fields.yearly_weekdays.is_some()
        || fields.yearly_months.is_some();
    if fields.yearly_retention.is_some() || yearly_flags {
        let years = match (fields.yearly_retention, &p.retention.yearly) {
            (Some(y), _) => y,
            (None, Some(r)) => r.years,
            (None, None) => anyhow::bail!("--yearly-* options need --yearly-retention"),
        };
        let months = match &fields.yearly_months {
            Some(m) => parse_list::<Month>("--yearly-months", m)?,
            None => p
                .retention
                .yearly
                .as_ref()
                .map(|r| r.months.clone())
                .unwrap_or_else(|| vec![Month(1)]),
        };
        let day_flags = fields.yearly_days.is_some()
            || fields.yearly_weeks.is_some()
            || fields.yearly_weekdays.is_some();
        let on = match (&p.retention.yearly, day_flags) {
            (Some(r), false) => r.on.clone(),
            _ => choice(
                &fields.yearly_days,
                &fields.yearly_weeks,
                &fields.yearly_weekdays,
                "yearly",
                default_day,
            )?,
        };
        p.retention.yearly = Some(YearlyRule { years, months, on });
    }
    Ok(())
}

fn skeleton(name: &str) -> Policy {
    Policy {
        name: name.into(),
        timezone: "UTC".into(),
        schedule: Schedule {
            frequency: Frequency::Daily,
            time: TimeOfDay(jiff::civil::Time::midnight()),
            weekdays: Vec::new(),
        },
        instant_restore_days: 2,
        retention: Retention::default(),
    }
}

fn from_file(path: &Path) -> anyhow::Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    Policy::from_json(&text).with_context(|| format!("policy file {}", path.display()))
}

/// Runs a `policy` subcommand.
pub fn run(ctx: &Ctx, cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Create {
            vault,
            name,
            from_file: file,
            fields,
        } => {
            let policy = match (file, name) {
                (Some(f), _) => from_file(&f)?,
                (None, Some(n)) => {
                    let mut p = skeleton(&n);
                    apply(&fields, &mut p, true)?;
                    p
                }
                (None, None) => anyhow::bail!("give --name or --from-file"),
            };
            let v = open(ctx, &vault.vault, Access::Write)?;
            policies::create(&v, &policy)
                .with_context(|| format!("cannot create policy {}", policy.name))?;
            show(ctx.fmt, &policy, "created ")
        }
        PolicyCommand::Set {
            vault,
            name,
            from_file: file,
            fields,
        } => {
            let v = open(ctx, &vault.vault, Access::Write)?;
            let policy = match (file, name) {
                (Some(f), _) => from_file(&f)?,
                (None, Some(n)) => {
                    let mut p = policies::get(&v, &n)?;
                    apply(&fields, &mut p, false)?;
                    p
                }
                (None, None) => anyhow::bail!("give --name or --from-file"),
            };
            policies::set(&v, &policy)
                .with_context(|| format!("cannot change policy {}", policy.name))?;
            show(ctx.fmt, &policy, "changed ")
        }
        PolicyCommand::Show { vault, name } => {
            let v = open(ctx, &vault.vault, Access::ReadOnly)?;
            let p = policies::get(&v, &name)?;
            show(ctx.fmt, &p, "")
        }
        PolicyCommand::List { vault } => {
            let v = open(ctx, &vault.vault, Access::ReadOnly)?;
            let list = policies::list(&v)?;
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|p| {
                    Ok(vec![
                        p.name.clone(),
                        schedule_text(p),
                        retention_text(p),
                        p.instant_restore_days.to_string(),
                        policies::users(&v, &p.name)?.len().to_string(),
                    ])
                })
                .collect::<anyhow::Result<_>>()?;
            output::emit(ctx.fmt, &list, |_| {
                columns(
                    &["POLICY", "SCHEDULE", "RETENTION", "SNAPSHOT DAYS", "ITEMS"],
                    &rows,
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Delete { vault, name } => {
            let v = open(ctx, &vault.vault, Access::Write)?;
            policies::delete(&v, &name).with_context(|| format!("cannot delete policy {name}"))?;
            output::emit(ctx.fmt, &serde_json::json!({ "deleted": name }), |_| {
                format!("deleted policy {name}\n")
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn days(d: &[Day]) -> String {
    d.iter().map(Day::to_string).collect::<Vec<_>>().join(",")
}

fn choice_text(c: &DayChoice) -> String {
    if !c.days.is_empty() {
        format!(
            "day {}",
            c.days
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    } else {
        format!(
            "{} {}",
            c.weeks
                .iter()
                .map(|w| format!("{w:?}").to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(","),
            days(&c.weekdays)
        )
    }
}

fn schedule_text(p: &Policy) -> String {
    match p.schedule.frequency {
        Frequency::Daily => format!("daily {} {}", p.schedule.time, p.timezone),
        Frequency::Weekly => format!(
            "weekly {} {} {}",
            days(&p.schedule.weekdays),
            p.schedule.time,
            p.timezone
        ),
    }
}

fn retention_text(p: &Policy) -> String {
    let r = &p.retention;
    let mut parts = Vec::new();
    if let Some(d) = &r.daily {
        parts.push(format!("daily {}d", d.days));
    }
    if let Some(w) = &r.weekly {
        parts.push(format!("weekly {}w ({})", w.weeks, days(&w.weekdays)));
    }
    if let Some(m) = &r.monthly {
        parts.push(format!("monthly {}m ({})", m.months, choice_text(&m.on)));
    }
    if let Some(y) = &r.yearly {
        parts.push(format!(
            "yearly {}y ({} {})",
            y.years,
            y.months
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
                .join(","),
            choice_text(&y.on)
        ));
    }
    parts.join("; ")
}

fn show(fmt: OutputFormat, p: &Policy, verb: &str) -> anyhow::Result<ExitCode> {
    output::emit(fmt, p, |p| {
        format!(
            "{verb}policy {}\nschedule         {}\ninstant restore  {} days\nretention        {}\n",
            p.name,
            schedule_text(p),
            p.instant_restore_days,
            retention_text(p)
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
