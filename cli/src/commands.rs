//! One function per command: open the vault, call the engine, print.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::store::{Access, PointRecord, PointStats, Vault};
use coffre_engine::vault_ops::{self, CreateOptions};
use coffre_engine::{
    BackupOptions, Clock, FileImage, ImageSource, RestoreOptions, Severity, SystemClock,
    VerifyOptions,
};
use jiff::Timestamp;
use serde::Serialize;

use crate::args::{Cli, Command, OutputFormat, VaultCommand};
use crate::exit;
use crate::output::{self, bytes, columns};
use crate::progress::Bar;
use crate::units::mib_per_s;

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let clock = clock_from_env()?;
    let fmt = cli.output;
    match cli.command {
        Command::Vault(VaultCommand::Create {
            vault,
            name,
            block_size,
            compression_level,
        }) => vault_create(
            fmt,
            &vault.vault,
            name,
            block_size,
            compression_level,
            &*clock,
        ),
        Command::Vault(VaultCommand::Show { vault }) => vault_show(fmt, &vault.vault),
        Command::Backup {
            vault,
            item,
            rate_limit,
            threads,
            image,
        } => backup(
            fmt,
            &vault.vault,
            item,
            rate_limit,
            threads.threads,
            &image,
            &*clock,
        ),
        Command::Points { vault, item } => points(fmt, &vault.vault, &item),
        Command::Restore {
            vault,
            item,
            point,
            to,
            force,
            threads,
        } => restore(
            fmt,
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
        } => verify(fmt, &vault.vault, read_data, threads.threads),
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

fn open(dir: &Path, access: Access) -> anyhow::Result<Vault> {
    Vault::open(dir, access).with_context(|| format!("cannot open vault {}", dir.display()))
}

fn vault_create(
    fmt: OutputFormat,
    dir: &Path,
    name: Option<String>,
    block_size: Option<u64>,
    compression_level: Option<i32>,
    clock: &dyn Clock,
) -> anyhow::Result<ExitCode> {
    let block_size = block_size
        .map(|b| u32::try_from(b).map_err(|_| anyhow::anyhow!("block size {b} is too large")))
        .transpose()?;
    let opts = CreateOptions {
        name,
        block_size,
        compression_level,
        redundancy: None,
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

fn vault_show(fmt: OutputFormat, dir: &Path) -> anyhow::Result<ExitCode> {
    let vault = open(dir, Access::ReadOnly)?;
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
struct PointView<'a> {
    id: &'a str,
    item: &'a str,
    created: Timestamp,
    image_size: u64,
    block_size: u32,
    stored_bytes: u64,
    block_map: String,
    stats: &'a PointStats,
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
        }
    }
}

fn item_name_for(image: &Path, item: Option<String>) -> anyhow::Result<String> {
    if let Some(item) = item {
        return Ok(item);
    }
    image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .with_context(|| {
            format!(
                "cannot derive an item name from {}; pass --item",
                image.display()
            )
        })
}

fn backup(
    fmt: OutputFormat,
    dir: &Path,
    item: Option<String>,
    rate_limit: Option<u64>,
    threads: usize,
    image: &Path,
    clock: &dyn Clock,
) -> anyhow::Result<ExitCode> {
    let item = item_name_for(image, item)?;
    let source = FileImage::open(image).context("cannot back up")?;
    let vault = open(dir, Access::Write)?;
    let source_path = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let opts = BackupOptions {
        item: item.clone(),
        source_path,
        threads,
        rate_limit,
    };
    let bar = Bar::new("backup");
    let outcome = coffre_engine::backup(&vault, &source as &dyn ImageSource, &opts, clock, &bar)
        .with_context(|| {
            format!(
                "backup of {} into {} failed",
                image.display(),
                dir.display()
            )
        })?;
    let p = &outcome.point;
    #[derive(Serialize)]
    struct BackupView<'a> {
        #[serde(flatten)]
        point: PointView<'a>,
        new_item: bool,
        mib_per_s: f64,
    }
    let view = BackupView {
        point: p.into(),
        new_item: outcome.new_item,
        mib_per_s: mib_per_s(p.image_size, p.stats.duration_ms),
    };
    output::emit(fmt, &view, |v| {
        let s = &p.stats;
        format!(
            "point {} of item {}{}: {} image, {} read, {}/{} blocks changed, {} new chunks, {} stored, {:.0} MiB/s ({} ms)\n",
            p.id,
            p.item,
            if v.new_item { " (new item)" } else { "" },
            bytes(p.image_size),
            bytes(s.bytes_read),
            s.blocks_changed,
            s.blocks_total,
            s.new_chunks,
            bytes(s.stored_bytes),
            v.mib_per_s,
            s.duration_ms
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

fn points(fmt: OutputFormat, dir: &Path, item: &str) -> anyhow::Result<ExitCode> {
    let vault = open(dir, Access::ReadOnly)?;
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
    fmt: OutputFormat,
    dir: &Path,
    item: &str,
    point: &str,
    to: &Path,
    force: bool,
    threads: usize,
) -> anyhow::Result<ExitCode> {
    let vault = open(dir, Access::ReadOnly)?;
    let point = coffre_engine::points::select_point(&vault, item, point)
        .with_context(|| format!("vault {}", dir.display()))?;
    let opts = RestoreOptions {
        target: to.to_path_buf(),
        force,
        threads,
    };
    let bar = Bar::new("restore");
    let summary = coffre_engine::restore(&vault, &point, &opts, &bar).with_context(|| {
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

fn verify(
    fmt: OutputFormat,
    dir: &Path,
    read_data: bool,
    threads: usize,
) -> anyhow::Result<ExitCode> {
    let vault = open(dir, Access::ReadOnly)?;
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
