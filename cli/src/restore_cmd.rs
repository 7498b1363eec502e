//! `restore`: to a new image file (raw or qcow2), or in place onto an
//! existing image or block device (a qcow2 VM disk is replaced whole).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::EngineError;
use coffre_engine::restore::{ImageFormat, RestoreOptions, RestoreSummary};
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
    let mut job = coffre_engine::job_record::start(
        dir,
        vault.config().keys(),
        Operation::Restore,
        Some(item),
        "restore",
        ctx.now(),
    );
    if let Some(j) = job.as_mut() {
        let _ = j.update(ctx.now(), |r| r.point = Some(point.id.clone()));
    }
    let result = coffre_engine::restore(&vault, &point, &opts, &bar);
    coffre_engine::job_record::finish(job, "restore", ctx.now(), &result);
    let mut summary = result.map_err(|e| {
        let note = match (&e, opts.in_place) {
            (_, false) => "",
            // Refused before anything was written.
            (
                EngineError::TargetExists { .. }
                | EngineError::TargetMissing { .. }
                | EngineError::TargetNotRegular { .. }
                | EngineError::TargetTooSmall { .. }
                | EngineError::TargetBusy { .. }
                | EngineError::TargetInUse { .. }
                | EngineError::TargetFormat { .. },
                true,
            ) => " (nothing was written)",
            _ if qcow2_in_place(&opts) => " (the disk was left as it was)",
            _ => " (the target is inconsistent: run the same restore again to finish it)",
        };
        anyhow::Error::new(e).context(format!(
            "restore of point {} of item {item} to {} failed{note}",
            point.id,
            to.display(),
        ))
    })?;
    // A replica or the secondary opened on its own: say which copy it was.
    let role = vault.role();
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
                match (s.in_place, s.format) {
                    (true, ImageFormat::Qcow2) =>
                        " in place, as a new qcow2 image that replaced the disk whole",
                    (true, ImageFormat::Raw) => " in place",
                    (false, ImageFormat::Qcow2) => " as a qcow2 image",
                    (false, ImageFormat::Raw) => "",
                },
                bytes(s.image_size),
                bytes(s.bytes_written),
                v.mib_per_s,
                s.duration_ms
            )
        };
        if s.in_place && s.format == ImageFormat::Raw {
            out.push_str(&format!(
                "blocks: {} read, {} written, {} zeroed, {} already identical\n",
                s.blocks_read, s.blocks_written, s.blocks_zeroed, s.blocks_skipped
            ));
        }
        let pad = s.image_size.next_multiple_of(512) - s.image_size;
        if s.format == ImageFormat::Qcow2 && pad > 0 {
            out.push_str(&format!(
                "note: a qcow2 image holds whole 512-byte sectors: the image was padded with {pad} zero bytes\n"
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

/// True when `opts` restores in place onto a qcow2 disk (replaced whole:
/// a failure leaves it as it was).
fn qcow2_in_place(opts: &RestoreOptions) -> bool {
    opts.in_place
        && coffre_engine::restore_qcow2::target_format(opts).is_ok_and(|f| f == ImageFormat::Qcow2)
}
