//! `verify`: findings as a table or JSON, exit code 3 on errors.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::store::Access;
use coffre_engine::{Severity, VerifyOptions};

use crate::ctx::{Ctx, open};
use crate::exit;
use crate::output::{self, bytes};
use crate::progress::Bar;

pub fn run(
    ctx: &Ctx,
    dir: &Path,
    read_data: bool,
    repair: bool,
    threads: usize,
) -> anyhow::Result<ExitCode> {
    let fmt = ctx.fmt;
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let bar = Bar::new("verify");
    let opts = VerifyOptions {
        read_data,
        repair,
        threads,
    };
    let report = coffre_engine::verify(&vault, &opts, &bar)
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
        if r.read_data && r.copies.len() > 1 {
            out.push_str(&format!(
                "copies: {}; bad copies of chunks: {} detected, {} repaired\n",
                r.copies.len(),
                r.detected,
                r.repaired
            ));
        }
        for u in &r.unrecoverable {
            out.push_str(&format!("unrecoverable chunk {}:\n", u.chunk));
            for range in &u.ranges {
                out.push_str(&format!(
                    "  item {} point {}: bytes {}..{}\n",
                    range.item, range.point, range.start, range.end
                ));
            }
        }
        out
    })?;
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::VERIFY_PROBLEMS)
    })
}
