//! `coffre jobs` and `coffre job show|wait|cancel`.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use coffre_engine::backup_job::cancel_job;
use coffre_engine::store::jobs::{JobRecord, JobStatus, JobStore};
use jiff::Timestamp;

use crate::args::JobCommand;
use crate::ctx::Ctx;
use crate::exit;
use crate::output::{self, columns};

fn parse_since(s: &str, now: Timestamp) -> anyhow::Result<Timestamp> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    let span: jiff::Span = s.parse().map_err(|_| {
        anyhow::anyhow!(
            "--since {s:?} is neither an RFC 3339 instant nor a duration such as 24h or 7d"
        )
    })?;
    Ok(now
        .to_zoned(jiff::tz::TimeZone::UTC)
        .checked_sub(span)?
        .timestamp())
}

fn table(jobs: &[JobRecord]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.operation.to_string(),
                j.item.clone().unwrap_or_else(|| "-".into()),
                j.status.to_string(),
                j.phases
                    .iter()
                    .map(|p| format!("{}:{}", p.name, p.status))
                    .collect::<Vec<_>>()
                    .join(" "),
                output::when(j.started),
                output::when_or_dash(j.ended),
            ]
        })
        .collect();
    columns(
        &[
            "ID",
            "OPERATION",
            "ITEM",
            "STATUS",
            "PHASES",
            "STARTED",
            "ENDED",
        ],
        &rows,
    )
}

/// `coffre jobs`.
pub fn list(
    ctx: &Ctx,
    dir: &Path,
    item: Option<&str>,
    status: Option<&str>,
    operation: Option<&str>,
    since: Option<&str>,
) -> anyhow::Result<ExitCode> {
    // Jobs are files; reading the config tells a vault from anything else.
    let config = coffre_engine::store::VaultConfig::load_with(dir, Some(&*ctx.keys))
        .with_context(|| format!("cannot open vault {}", dir.display()))?;
    let since = since.map(|s| parse_since(s, ctx.now())).transpose()?;
    let store = JobStore::new(dir, config.keys());
    // A shared vault lists every host's jobs: the others' finished ones
    // come from the store.
    let mut all = store.list()?;
    all.extend(store.other_hosts());
    all.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
    let jobs: Vec<JobRecord> = all
        .into_iter()
        .filter(|j| item.is_none_or(|i| j.item.as_deref() == Some(i)))
        .filter(|j| status.is_none_or(|s| j.status.to_string().eq_ignore_ascii_case(s)))
        .filter(|j| operation.is_none_or(|o| j.operation.to_string().eq_ignore_ascii_case(o)))
        .filter(|j| since.is_none_or(|t| j.started >= t))
        .collect();
    output::emit(ctx.fmt, &jobs, |j| table(j))?;
    Ok(ExitCode::SUCCESS)
}

fn show(ctx: &Ctx, job: &JobRecord) -> anyhow::Result<()> {
    output::emit(ctx.fmt, job, |j| {
        let mut out = format!(
            "job        {}\noperation  {}\nitem       {}\nstatus     {}\nstarted    {}\nended      {}\n",
            j.id,
            j.operation,
            j.item.as_deref().unwrap_or("-"),
            j.status,
            output::when(j.started),
            output::when_or_dash(j.ended)
        );
        if let Some(p) = &j.point {
            out.push_str(&format!("point      {p}\n"));
        }
        for p in &j.phases {
            out.push_str(&format!(
                "phase      {:<9} {:<11} {}{}\n",
                p.name,
                p.status.to_string(),
                p.ended
                    .zip(p.started)
                    .map(|(e, s)| format!("{} ms", e.duration_since(s).as_millis()))
                    .unwrap_or_default(),
                p.error
                    .as_deref()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default()
            ));
        }
        for (k, v) in &j.stats {
            out.push_str(&format!("stat       {k} = {v}\n"));
        }
        out
    })
}

/// The keys of an encrypted vault, which seal its job records; `None`
/// for a plain vault, whose records need none.
fn job_keys(
    ctx: &Ctx,
    dir: &std::path::Path,
) -> anyhow::Result<Option<std::sync::Arc<coffre_engine::store::crypto::VaultKeys>>> {
    use coffre_engine::store::format::config::FORMAT_VERSION_SEALED;
    if coffre_engine::store::VaultConfig::stored_version(dir) < FORMAT_VERSION_SEALED {
        return Ok(None);
    }
    let config = coffre_engine::store::VaultConfig::load_with(dir, Some(&*ctx.keys))
        .with_context(|| format!("cannot open vault {}", dir.display()))?;
    Ok(config.keys().cloned())
}

/// `coffre job show|wait|cancel`.
pub fn run(ctx: &Ctx, cmd: JobCommand) -> anyhow::Result<ExitCode> {
    let (JobCommand::Show { vault, .. }
    | JobCommand::Wait { vault, .. }
    | JobCommand::Cancel { vault, .. }) = &cmd;
    let keys = job_keys(ctx, &vault.vault)?;
    match cmd {
        JobCommand::Show { vault, id } => {
            let job = JobStore::new(&vault.vault, keys.as_ref())
                .find(&id)
                .with_context(|| format!("vault {}", vault.vault.display()))?;
            show(ctx, &job)?;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Wait { vault, id, timeout } => {
            let store = JobStore::new(&vault.vault, keys.as_ref());
            let started = Instant::now();
            let job = loop {
                let job = store
                    .find(&id)
                    .with_context(|| format!("vault {}", vault.vault.display()))?;
                if job.status.is_final() {
                    break job;
                }
                if timeout.is_some_and(|t| started.elapsed() >= Duration::from_secs(t)) {
                    show(ctx, &job)?;
                    eprintln!(
                        "coffre: job {} still {} after {}s",
                        job.id,
                        job.status,
                        timeout.unwrap_or(0)
                    );
                    return Ok(ExitCode::from(exit::TIMEOUT));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            show(ctx, &job)?;
            Ok(match job.status {
                JobStatus::Completed => ExitCode::SUCCESS,
                JobStatus::CompletedWithWarnings => ExitCode::from(exit::JOB_WARNINGS),
                _ => ExitCode::from(exit::JOB_FAILED),
            })
        }
        JobCommand::Cancel { vault, id } => {
            let job = cancel_job(&vault.vault, keys.as_ref(), &id)
                .with_context(|| format!("vault {}", vault.vault.display()))?;
            output::emit(ctx.fmt, &job, |j| {
                format!(
                    "cancellation of job {} requested; `coffre job wait {}` to see it end\n",
                    j.id, j.id
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
