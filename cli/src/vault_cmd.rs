//! `vault create`, `vault show`, `vault set`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::Clock;
use coffre_engine::store::{Access, Redundancy};
use coffre_engine::vault_ops::{self, CreateOptions};

use crate::args::OutputFormat;
use crate::ctx::{Ctx, open};
use crate::output::{self, bytes, columns};

/// The settings `vault create` takes.
pub struct CreateArgs {
    pub name: Option<String>,
    pub block_size: Option<u64>,
    pub compression_level: Option<i32>,
    pub redundancy: Option<String>,
    pub snapshot_area: Option<PathBuf>,
}

fn parse_redundancy(r: &str) -> anyhow::Result<Redundancy> {
    r.parse::<Redundancy>()
        .map_err(|e| anyhow::anyhow!("--redundancy: {e}"))
}

pub fn create(
    fmt: OutputFormat,
    dir: &Path,
    args: CreateArgs,
    clock: &dyn Clock,
) -> anyhow::Result<ExitCode> {
    let redundancy = args
        .redundancy
        .as_deref()
        .map(parse_redundancy)
        .transpose()?;
    let block_size = args
        .block_size
        .map(|b| u32::try_from(b).map_err(|_| anyhow::anyhow!("block size {b} is too large")))
        .transpose()?;
    let opts = CreateOptions {
        name: args.name,
        block_size,
        compression_level: args.compression_level,
        redundancy,
        snapshot_area: args.snapshot_area,
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

pub fn set(
    ctx: &Ctx,
    dir: &Path,
    redundancy: Option<String>,
    snapshot_area: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    if redundancy.is_none() && snapshot_area.is_none() {
        anyhow::bail!("nothing to set: give --redundancy or --snapshot-area");
    }
    let r = redundancy.as_deref().map(parse_redundancy).transpose()?;
    let vault = open(ctx, dir, Access::Write)?;
    if let Some(r) = r {
        vault_ops::set_redundancy(&vault, r)
            .with_context(|| format!("cannot change vault {}", dir.display()))?;
    }
    if let Some(area) = &snapshot_area {
        let area = (!area.as_os_str().is_empty()).then_some(area.as_path());
        vault_ops::set_snapshot_area(&vault, area)
            .with_context(|| format!("cannot change vault {}", dir.display()))?;
    }
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let cfg = vault.config();
    let view = serde_json::json!({
        "redundancy": cfg.redundancy,
        "snapshot_area": cfg.snapshot_area,
    });
    output::emit(ctx.fmt, &view, |_| {
        format!(
            "vault {}: redundancy {}, snapshot area {}\n",
            dir.display(),
            cfg.redundancy,
            cfg.snapshot_area
                .as_ref()
                .map_or("next to each image".to_string(), |p| p
                    .display()
                    .to_string())
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn show(ctx: &Ctx, dir: &Path) -> anyhow::Result<ExitCode> {
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
        out.push_str(&format!(
            "\nsnapshots    {}\n\n",
            match (&s.snapshot_area, s.snapshot_areas.is_empty()) {
                (Some(a), _) => format!("in {}", a.display()),
                (None, true) => "next to each image (none taken yet)".to_string(),
                (None, false) => format!(
                    "next to each image: {}",
                    s.snapshot_areas
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        ));
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
                    format!("{} ({})", i.snapshots, bytes(i.snapshot_bytes)),
                    i.source.display().to_string(),
                ]
            })
            .collect();
        out + &columns(
            &[
                "ITEM",
                "POINTS",
                "LAST BACKUP",
                "SIZE",
                "STORED",
                "SNAPSHOTS",
                "SOURCE",
            ],
            &rows,
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
