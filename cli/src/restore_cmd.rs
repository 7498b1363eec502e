//! `restore`: to a new image file, or in place onto an existing image or
//! block device.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::restore::{RestoreOptions, RestoreSummary};
use coffre_engine::store::Access;
use coffre_engine::store::jobs::Operation;
use serde::Serialize;

use crate::ctx::{Ctx, open};
use crate::output::{self, bytes};
use crate::progress::Bar;
use crate::units::mib_per_s;

pub fn run(
    ctx: &Ctx,
    dir: &Path,
    item: &str,
    point: &str,
    opts: RestoreOptions,
) -> anyhow::Result<ExitCode> {
    let fmt = ctx.fmt;
    let to = opts.target.clone();
    if opts.in_place && !opts.force {
        anyhow::bail!(
            "--in-place overwrites {}: pass --force as well to confirm",
            to.display()
        );
    }
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let point = coffre_engine::points::select_point(&vault, item, point)
        .with_context(|| format!("vault {}", dir.display()))?;
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
    let mut summary = result.with_context(|| {
        format!(
            "restore of point {} of item {item} to {} failed{}",
            point.id,
            to.display(),
            if opts.in_place {
                " (the target is inconsistent: run the same restore again to finish it)"
            } else {
                ""
            }
        )
    })?;
    // A replica or the secondary opened on its own: say which copy it was.
    let role = coffre_engine::store::vault::copy_role(vault.dir());
    if summary.from == "vault" && role != coffre_engine::store::format::catalog_files::Role::Primary
    {
        summary.from = if role == coffre_engine::store::format::catalog_files::Role::Secondary {
            "secondary"
        } else {
            "replica"
        };
    }
    #[derive(Serialize)]
    struct RestoreView<'a> {
        item: &'a str,
        point: &'a str,
        target: &'a Path,
        mib_per_s: f64,
        #[serde(flatten)]
        summary: &'a RestoreSummary,
    }
    let view = RestoreView {
        item,
        point: &point.id,
        target: &to,
        mib_per_s: mib_per_s(summary.image_size, summary.duration_ms),
        summary: &summary,
    };
    output::emit(fmt, &view, |v| {
        let s = v.summary;
        let mut out = if s.cloned {
            format!(
                "restored point {} of item {} from the snapshot to {} as a reflink clone: {} image in {} ms\n",
                v.point,
                v.item,
                v.target.display(),
                bytes(s.image_size),
                s.duration_ms
            )
        } else {
            format!(
                "restored point {} of item {} from the {} to {}{}: {} image, {} data written, {:.0} MiB/s ({} ms)\n",
                v.point,
                v.item,
                s.from,
                v.target.display(),
                if s.in_place { " in place" } else { "" },
                bytes(s.image_size),
                bytes(s.bytes_written),
                v.mib_per_s,
                s.duration_ms
            )
        };
        if s.in_place {
            out.push_str(&format!(
                "blocks: {} read, {} written, {} zeroed, {} already identical\n",
                s.blocks_read, s.blocks_written, s.blocks_zeroed, s.blocks_skipped
            ));
        }
        if s.repaired_copies > 0 {
            out.push_str(&format!(
                "note: {} bad cop(ies) of chunks were read from a good copy and repaired\n",
                s.repaired_copies
            ));
        }
        for (a, b) in &s.damaged_ranges {
            out.push_str(&format!(
                "DAMAGED: bytes {a}..{b} have no good copy; they hold the marker {:?}, not data\n",
                String::from_utf8_lossy(coffre_engine::restore::DAMAGED_MARKER).trim_end()
            ));
        }
        if s.bytes_beyond_image > 0 {
            out.push_str(&format!(
                "note: the device is {} larger than the image; those bytes were left as they were\n",
                bytes(s.bytes_beyond_image)
            ));
        }
        out
    })?;
    Ok(if summary.damaged_ranges.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::DAMAGED)
    })
}
