//! One function per command: open the vault, call the engine, print.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use coffre_engine::registry::Registry;
use coffre_engine::store::jobs::Operation;
use coffre_engine::store::{Access, PointRecord, PointStats, Redundancy, Vault};
use coffre_engine::vault_ops::{self, CreateOptions};
use coffre_engine::{Clock, RestoreOptions, Severity, SystemClock, VerifyOptions};
use jiff::Timestamp;
use serde::Serialize;

use crate::args::{Cli, Command, OutputFormat, VaultCommand};
use crate::exit;
use crate::output::{self, bytes, columns};
use crate::progress::Bar;
use crate::units::mib_per_s;

/// What every command gets: output format, clock, lock wait, registry.
#[derive(Clone)]
pub struct Ctx {
    /// Output format.
    pub fmt: OutputFormat,
    /// The clock (`COFFRE_NOW` fixes it).
    pub clock: std::sync::Arc<dyn Clock>,
    /// How long writers wait for the vault lock.
    pub lock_timeout: Duration,
    /// The host registry of protected images.
    pub registry: Registry,
}

impl Ctx {
    /// The current instant.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Ctx {
        fmt: cli.output,
        clock: std::sync::Arc::from(clock_from_env()?),
        lock_timeout: Duration::from_secs(cli.lock_timeout),
        registry: Registry::from_env(),
    };
    let fmt = ctx.fmt;
    let clock = &*ctx.clock;
    match cli.command {
        Command::Vault(VaultCommand::Create {
            vault,
            name,
            block_size,
            compression_level,
            redundancy,
        }) => vault_create(
            fmt,
            &vault.vault,
            name,
            block_size,
            compression_level,
            redundancy,
            clock,
        ),
        Command::Vault(VaultCommand::Show { vault }) => vault_show(&ctx, &vault.vault),
        Command::Vault(VaultCommand::Set { vault, redundancy }) => {
            vault_set(&ctx, &vault.vault, &redundancy)
        }
        Command::Backup {
            vault,
            item,
            retain_until,
            rate_limit,
            threads,
            image,
        } => crate::backup_cmd::run(
            &ctx,
            &vault.vault,
            item,
            retain_until.as_deref(),
            rate_limit,
            threads.threads,
            &image,
        ),
        Command::Points { vault, item } => points(&ctx, &vault.vault, &item),
        Command::Restore {
            vault,
            item,
            point,
            to,
            force,
            threads,
        } => restore(
            &ctx,
            &vault.vault,
            &item,
            &point,
            &to,
            force,
            threads.threads,
        ),
        Command::Verify {
            vault,
            read_data,
            threads,
        } => verify(&ctx, &vault.vault, read_data, threads.threads),
        Command::Policy(cmd) => crate::policy_cmd::run(&ctx, *cmd),
        Command::Protect {
            vault,
            item,
            policy,
            image,
        } => crate::item_cmd::protect(&ctx, &vault.vault, &item, &policy, &image),
        Command::Unprotect {
            vault,
            item,
            delete_data,
        } => crate::item_cmd::unprotect(&ctx, &vault.vault, &item, delete_data),
        Command::Undelete { vault, item } => crate::item_cmd::undelete(&ctx, &vault.vault, &item),
        Command::Item(cmd) => crate::item_cmd::run(&ctx, cmd),
        Command::Jobs {
            vault,
            item,
            status,
            operation,
            since,
        } => crate::job_cmd::list(
            &ctx,
            &vault.vault,
            item.as_deref(),
            status.as_deref(),
            operation.as_deref(),
            since.as_deref(),
        ),
        Command::Job(cmd) => crate::job_cmd::run(&ctx, cmd),
        Command::Prune { vault, dry_run } => {
            crate::maintenance_cmd::prune(&ctx, &vault.vault, dry_run)
        }
        Command::Gc { vault, dry_run } => crate::maintenance_cmd::gc(&ctx, &vault.vault, dry_run),
        Command::RunDue {
            vault,
            rate_limit,
            threads,
        } => crate::maintenance_cmd::run_due(&ctx, &vault.vault, rate_limit, threads.threads),
        Command::Daemon {
            vault,
            interval,
            rate_limit,
            threads,
        } => crate::daemon::run(&ctx, &vault.vault, interval, rate_limit, threads.threads),
    }
}

/// `COFFRE_NOW` (RFC 3339) fixes the clock for one command.
fn clock_from_env() -> anyhow::Result<Box<dyn Clock>> {
    match std::env::var("COFFRE_NOW") {
        Ok(s) if !s.is_empty() => {
            let t: Timestamp = s
                .parse()
                .with_context(|| format!("COFFRE_NOW={s:?} is not an RFC 3339 instant"))?;
            Ok(Box::new(coffre_engine::ManualClock::new(t)))
        }
        _ => Ok(Box::new(SystemClock)),
    }
}

/// Opens a vault; writers wait up to `--lock-timeout` for the lock.
pub fn open(ctx: &Ctx, dir: &Path, access: Access) -> anyhow::Result<Vault> {
    Vault::open_wait(dir, access, ctx.lock_timeout)
        .with_context(|| format!("cannot open vault {}", dir.display()))
}

fn vault_create(
    fmt: OutputFormat,
    dir: &Path,
    name: Option<String>,
    block_size: Option<u64>,
    compression_level: Option<i32>,
    redundancy: Option<String>,
    clock: &dyn Clock,
) -> anyhow::Result<ExitCode> {
    let redundancy = redundancy
        .map(|r| {
            r.parse::<Redundancy>()
                .map_err(|e| anyhow::anyhow!("--redundancy: {e}"))
        })
        .transpose()?;
    let block_size = block_size
        .map(|b| u32::try_from(b).map_err(|_| anyhow::anyhow!("block size {b} is too large")))
        .transpose()?;
    let opts = CreateOptions {
        name,
        block_size,
        compression_level,
        redundancy,
    };
    let vault = vault_ops::create_vault(dir, &opts, clock)
        .with_context(|| format!("cannot create vault {}", dir.display()))?;
    let summary = vault_ops::summarize(&vault)?;
    output::emit(fmt, &summary, |s| {
        format!(
            "created vault {} at {} (block size {}, zstd level {}, {})\n",
            s.name,
            s.path.display(),
            bytes(u64::from(s.block_size)),
            s.compression_level,
            s.redundancy
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

fn vault_set(ctx: &Ctx, dir: &Path, redundancy: &str) -> anyhow::Result<ExitCode> {
    let r = redundancy
        .parse::<Redundancy>()
        .map_err(|e| anyhow::anyhow!("--redundancy: {e}"))?;
    let vault = open(ctx, dir, Access::Write)?;
    vault_ops::set_redundancy(&vault, r)
        .with_context(|| format!("cannot change vault {}", dir.display()))?;
    output::emit(ctx.fmt, &serde_json::json!({ "redundancy": r }), |_| {
        format!("vault {} redundancy is now {r}\n", dir.display())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn vault_show(ctx: &Ctx, dir: &Path) -> anyhow::Result<ExitCode> {
    let fmt = ctx.fmt;
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let s = vault_ops::summarize(&vault)?;
    output::emit(fmt, &s, |s| {
        let mut out = format!(
            "vault        {}\npath         {}\nid           {}\nformat       v{}\nblock size   {}\ncompression  zstd level {}\nredundancy   {}\ncreated      {}\npoints       {}\nlogical      {}\nstored       {}",
            s.name,
            s.path.display(),
            s.vault_id,
            s.format_version,
            bytes(u64::from(s.block_size)),
            s.compression_level,
            s.redundancy,
            s.created,
            s.points,
            bytes(s.logical_bytes),
            bytes(s.stored_bytes),
        );
        if s.stored_bytes > 0 {
            out.push_str(&format!(
                " ({:.1}x reduction)",
                s.logical_bytes as f64 / s.stored_bytes as f64
            ));
        }
        out.push_str("\n\n");
        let rows: Vec<Vec<String>> = s
            .items
            .iter()
            .map(|i| {
                vec![
                    i.name.clone(),
                    i.points.to_string(),
                    i.last_backup.map(|t| t.to_string()).unwrap_or_default(),
                    bytes(i.latest_size),
                    bytes(i.stored_bytes),
                    i.source.display().to_string(),
                ]
            })
            .collect();
        out + &columns(
            &["ITEM", "POINTS", "LAST BACKUP", "SIZE", "STORED", "SOURCE"],
            &rows,
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The JSON shape of a point (stable: documented in the README).
#[derive(Serialize)]
pub struct PointView<'a> {
    id: &'a str,
    item: &'a str,
    created: Timestamp,
    image_size: u64,
    block_size: u32,
    stored_bytes: u64,
    block_map: String,
    stats: &'a PointStats,
    scheduled: bool,
    retain_until: Option<Timestamp>,
    job: Option<&'a str>,
}

impl<'a> From<&'a PointRecord> for PointView<'a> {
    fn from(p: &'a PointRecord) -> Self {
        PointView {
            id: &p.id,
            item: &p.item,
            created: p.created,
            image_size: p.image_size,
            block_size: p.block_size,
            stored_bytes: p.stats.stored_bytes,
            block_map: p.block_map.to_string(),
            stats: &p.stats,
            scheduled: p.scheduled,
            retain_until: p.retain_until,
            job: p.job.as_deref(),
        }
    }
}

fn points(ctx: &Ctx, dir: &Path, item: &str) -> anyhow::Result<ExitCode> {
    let fmt = ctx.fmt;
    let vault = open(ctx, dir, Access::ReadOnly)?;
    if vault.item(item)?.is_none() {
        return Err(coffre_engine::EngineError::ItemNotFound { item: item.into() })
            .with_context(|| format!("vault {}", dir.display()));
    }
    let points = vault.points(item)?;
    let views: Vec<PointView<'_>> = points.iter().map(PointView::from).collect();
    output::emit(fmt, &views, |views| {
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|p| {
                vec![
                    p.id.to_string(),
                    p.created.to_string(),
                    bytes(p.image_size),
                    p.stats.blocks_changed.to_string(),
                    bytes(p.stored_bytes),
                ]
            })
            .collect();
        columns(
            &["ID", "CREATED", "SIZE", "CHANGED BLOCKS", "STORED"],
            &rows,
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

fn restore(
    ctx: &Ctx,
    dir: &Path,
    item: &str,
    point: &str,
    to: &Path,
    force: bool,
    threads: usize,
) -> anyhow::Result<ExitCode> {
    let fmt = ctx.fmt;
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let point = coffre_engine::points::select_point(&vault, item, point)
        .with_context(|| format!("vault {}", dir.display()))?;
    let opts = RestoreOptions {
        target: to.to_path_buf(),
        force,
        threads,
    };
    let bar = Bar::new("restore");
    // The restore is a job too; recording it is best effort (a vault on
    // read-only media still restores).
    let mut job =
        coffre_engine::job_record::start(dir, Operation::Restore, Some(item), "restore", ctx.now());
    if let Some(j) = job.as_mut() {
        let _ = j.update(ctx.now(), |r| r.point = Some(point.id.clone()));
    }
    let result = coffre_engine::restore(&vault, &point, &opts, &bar);
    coffre_engine::job_record::finish(job, "restore", ctx.now(), &result);
    let summary = result.with_context(|| {
        format!(
            "restore of point {} of item {item} to {} failed",
            point.id,
            to.display()
        )
    })?;
    #[derive(Serialize)]
    struct RestoreView<'a> {
        item: &'a str,
        point: &'a str,
        target: &'a Path,
        image_size: u64,
        bytes_written: u64,
        duration_ms: u64,
        mib_per_s: f64,
    }
    let view = RestoreView {
        item,
        point: &point.id,
        target: to,
        image_size: summary.image_size,
        bytes_written: summary.bytes_written,
        duration_ms: summary.duration_ms,
        mib_per_s: mib_per_s(summary.image_size, summary.duration_ms),
    };
    output::emit(fmt, &view, |v| {
        format!(
            "restored point {} of item {} to {}: {} image, {} data written, {:.0} MiB/s ({} ms)\n",
            v.point,
            v.item,
            v.target.display(),
            bytes(v.image_size),
            bytes(v.bytes_written),
            v.mib_per_s,
            v.duration_ms
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

fn verify(ctx: &Ctx, dir: &Path, read_data: bool, threads: usize) -> anyhow::Result<ExitCode> {
    let fmt = ctx.fmt;
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let bar = Bar::new("verify");
    let report = coffre_engine::verify(&vault, &VerifyOptions { read_data, threads }, &bar)
        .with_context(|| format!("verify of {} failed", dir.display()))?;
    output::emit(fmt, &report, |r| {
        let mut out = String::new();
        for f in &r.findings {
            let severity = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            out.push_str(&format!(
                "{severity}: [{}] {}\n  hint: {}\n",
                f.code, f.message, f.hint
            ));
        }
        out.push_str(&format!(
            "verified {} segments, {} chunks{}, {} points in {} ms: {}\n",
            r.segments,
            r.chunks,
            if r.read_data {
                format!(" ({} read and re-hashed)", bytes(r.bytes_checked))
            } else {
                String::new()
            },
            r.points,
            r.duration_ms,
            if r.is_clean() {
                "no problems found".to_string()
            } else {
                format!("{} problems found", r.findings.len())
            }
        ));
        out
    })?;
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::VERIFY_PROBLEMS)
    })
}
