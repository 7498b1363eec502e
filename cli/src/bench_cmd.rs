//! `coffre bench`: this machine's figures for every stage of the data
//! path, each next to the machine's own reference (see
//! `coffre_engine::bench`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::bench::{BenchOptions, BenchReport, run as measure};
use coffre_engine::store::format::config::{DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL};

use crate::ctx::Ctx;
use crate::output;

/// Runs `coffre bench`.
pub fn run(
    ctx: &Ctx,
    size: u64,
    level: Option<i32>,
    block_size: Option<u64>,
    dir: Option<PathBuf>,
    threads: usize,
) -> anyhow::Result<ExitCode> {
    let block_size = match block_size {
        None => DEFAULT_BLOCK_SIZE,
        Some(b) => u32::try_from(b).context("--block-size is too large")?,
    };
    let opts = BenchOptions {
        image_size: size.max(u64::from(block_size)),
        level: level.unwrap_or(DEFAULT_COMPRESSION_LEVEL),
        block_size,
        threads,
        dir: dir.unwrap_or_else(std::env::temp_dir),
    };
    if ctx.fmt == crate::args::OutputFormat::Table {
        eprintln!(
            "coffre: measuring ({} image in {}) …",
            output::bytes(opts.image_size),
            opts.dir.display()
        );
    }
    let report = measure(&opts).context("coffre bench failed")?;
    output::emit(ctx.fmt, &report, table)?;
    Ok(ExitCode::SUCCESS)
}

fn table(r: &BenchReport) -> String {
    let mut out = format!(
        "{} threads, zstd level {}, generated data compresses to {:.0} %\n\n{:<16} {:>10}  {:<44} {:>10} {:>7}\n",
        r.threads,
        r.level,
        r.compression_ratio * 100.0,
        "stage",
        "MiB/s",
        "reference",
        "MiB/s",
        "ratio"
    );
    for s in &r.stages {
        let (name, rate) = match &s.reference {
            None => (String::from("-"), String::from("-")),
            Some(x) => match (x.mib_per_s, &x.skipped) {
                (Some(m), _) => (x.name.clone(), format!("{m:.0}")),
                (None, Some(why)) => (format!("{} ({why})", x.name), String::from("-")),
                (None, None) => (x.name.clone(), String::from("-")),
            },
        };
        let ratio = s.ratio.map_or(String::from("-"), |r| format!("{r:.2}"));
        out.push_str(&format!(
            "{:<16} {:>10.0}  {:<44} {:>10} {:>7}\n",
            s.name, s.mib_per_s, name, rate, ratio
        ));
    }
    for s in &r.stages {
        if let Some(f) = s.floor_factor {
            out.push_str(&format!(
                "\n{}: {f:.2}x the disk floor's time (1.00 = as fast as the disk writes)",
                s.name
            ));
        }
    }
    out.push('\n');
    out
}
