//! `replicate`: brings the GRS secondary up to date.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::store::Access;

use crate::ctx::{Ctx, open};
use crate::output::{self, bytes};

pub fn run(ctx: &Ctx, dir: &Path) -> anyhow::Result<ExitCode> {
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let clock = ctx.clock.clone();
    let report =
        coffre_engine::store::maintenance::replicate::replicate(&vault, &|| clock.now(), &|| false)
            .with_context(|| format!("replication of vault {} failed", dir.display()))?;
    output::emit(ctx.fmt, &report, |r| {
        let mut s = format!(
            "replicated to {}: {} in {} segment(s), {} catalog file(s), {} point(s) new, {} on the secondary ({} ms)\n",
            r.secondary.display(),
            bytes(r.bytes_copied),
            r.segments_copied,
            r.files_changed,
            r.points_replicated,
            r.points_on_secondary,
            r.duration_ms
        );
        if r.quarantine_skipped {
            s.push_str(&format!(
                "live restores from the secondary hold {}: nothing was quarantined or purged on the secondary (it keeps what the primary no longer has until they complete or are abandoned)\n",
                r.held_points.join(", ")
            ));
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}
