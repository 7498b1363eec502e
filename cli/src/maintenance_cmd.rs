//! `coffre prune`, `coffre gc` and `coffre run-due`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::job_record::run_as_job;
use coffre_engine::prune::{PruneReport, prune as prune_vault};
use coffre_engine::scheduler::{PassOptions, PassReport, run_pass};
use coffre_engine::store::jobs::Operation;
use coffre_engine::store::maintenance::gc::{self, GcPlan, GcReport};
use coffre_engine::store::{Access, Vault};
use std::time::Duration;

use crate::ctx::{Ctx, open};
use crate::output::{self, bytes, columns};

fn prune_table(r: &PruneReport) -> String {
    let rows: Vec<Vec<String>> = r
        .expired
        .iter()
        .map(|e| {
            vec![
                e.item.clone(),
                e.id.clone(),
                output::when(e.created),
                e.tier.to_string(),
                e.expired.map_or_else(|| "purge".into(), output::when),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        String::new()
    } else {
        columns(&["ITEM", "POINT", "CREATED", "KEPT BY", "EXPIRED"], &rows)
    };
    out.push_str(&format!(
        "{} {} points, kept {}; {} items purged; {} snapshots and {} job records {}\n",
        if r.dry_run { "would expire" } else { "expired" },
        r.expired.len(),
        r.kept,
        r.purged_items.len(),
        r.snapshots_removed,
        r.jobs_removed,
        if r.dry_run { "would go" } else { "removed" },
    ));
    for h in &r.held {
        let what = match h.kept {
            "item" => format!("put off the purge of item {} (point {})", h.item, h.point),
            "snapshot" => format!("kept the snapshot of point {} of item {}", h.point, h.item),
            _ => format!("kept point {} of item {}", h.point, h.item),
        };
        out.push_str(&format!(
            "{what}: held by the unfinished live restore into {:?} (begun {}); `coffre restore --live --resume --to {:?}` finishes it, `--abandon` gives it up\n",
            h.target,
            output::when(h.since),
            h.target
        ));
    }
    out
}

fn plan_table(p: &GcPlan) -> String {
    let rows: Vec<Vec<String>> = p
        .segments
        .iter()
        .map(|s| {
            vec![
                format!("{:016x}", s.segment),
                s.action.to_string(),
                bytes(s.live_bytes),
                bytes(s.dead_bytes),
            ]
        })
        .collect();
    let mut out = format!(
        "plan: {} unreferenced chunks ({}) to unindex\n",
        p.unreferenced_chunks,
        bytes(p.unreferenced_bytes)
    );
    if !rows.is_empty() {
        out.push_str(&columns(&["SEGMENT", "ACTION", "LIVE", "DEAD"], &rows));
    }
    out
}

fn gc_table(r: &GcReport) -> String {
    format!(
        "{}gc: {} chunks unindexed, {} segments rewritten ({} copied), {} segments deleted, {} punched in place; segments {} -> {} in {} ms{}\n",
        plan_table(&r.plan),
        r.chunks_removed,
        r.segments_rewritten,
        bytes(r.bytes_copied),
        r.segments_deleted,
        bytes(r.bytes_punched),
        bytes(r.stored_before),
        bytes(r.stored_after),
        r.duration_ms,
        if r.reclaim_deferred {
            "; readers were active, so the space comes back at the next gc"
        } else {
            ""
        }
    ) + &quarantine_line(r)
        + &held_line(r)
}

/// The points live restores hold (nothing when none).
fn held_line(r: &GcReport) -> String {
    if r.held_points.is_empty() {
        return String::new();
    }
    format!(
        "kept the chunks of {} held by unfinished live restores\n",
        r.held_points.join(", ")
    )
}

/// What gc did with the quarantine (nothing when it is empty).
fn quarantine_line(r: &GcReport) -> String {
    if r.quarantine_deleted == 0 && r.quarantine_kept == 0 {
        return String::new();
    }
    format!(
        "quarantine: {} files deleted ({}), no point needs them; {} kept (see `coffre verify`)\n",
        r.quarantine_deleted,
        bytes(r.quarantine_bytes),
        r.quarantine_kept
    )
}

/// `coffre prune`.
pub fn prune(ctx: &Ctx, dir: &Path, dry_run: bool) -> anyhow::Result<ExitCode> {
    let vault = open(ctx, dir, Access::Write)?;
    let report = if dry_run {
        prune_vault(&vault, &ctx.registry, ctx.now(), true)?
    } else {
        run_as_job(
            dir,
            vault.config().keys(),
            Operation::Prune,
            &*ctx.clock,
            || prune_vault(&vault, &ctx.registry, ctx.now(), false),
        )
        .with_context(|| format!("prune of {} failed", dir.display()))?
    };
    output::emit(ctx.fmt, &report, prune_table)?;
    Ok(ExitCode::SUCCESS)
}

/// `coffre gc`.
pub fn gc(ctx: &Ctx, dir: &Path, dry_run: bool) -> anyhow::Result<ExitCode> {
    if coffre_engine::store::format::remote::Remote::load(dir)?.is_some() && !dry_run {
        return shared_gc(ctx, dir);
    }
    let vault = open(ctx, dir, Access::Write)?;
    if dry_run {
        let plan = gc::plan(&vault)?;
        output::emit(ctx.fmt, &plan, plan_table)?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = run_as_job(
        dir,
        vault.config().keys(),
        Operation::Gc,
        &*ctx.clock,
        || gc::run(&vault),
    )
    .with_context(|| format!("gc of {} failed", dir.display()))?;
    output::emit(ctx.fmt, &report, gc_table)?;
    Ok(ExitCode::SUCCESS)
}

/// `coffre gc` of a shared vault in object storage.
fn shared_gc(ctx: &Ctx, dir: &Path) -> anyhow::Result<ExitCode> {
    let config = coffre_engine::store::VaultConfig::load_with(dir, Some(&*ctx.keys))
        .with_context(|| format!("cannot open vault {}", dir.display()))?;
    let report = run_as_job(dir, config.keys(), Operation::Gc, &*ctx.clock, || {
        coffre_engine::vault_ops::shared_gc(
            dir,
            ctx.lock_timeout.max(Duration::from_secs(60)),
            Some(ctx.keys.clone()),
        )
    })
    .with_context(|| format!("gc of {} failed", dir.display()))?;
    output::emit(ctx.fmt, &report, |r| {
        format!(
            "gc epoch {}: {} segments deleted ({}), {} condemned (deleted by the next gc if still dead), waited for {} writers, {} expired leases removed, in {} ms\n",
            r.epoch,
            r.deleted_segments,
            crate::output::bytes(r.deleted_bytes),
            r.condemned_segments,
            r.waited_for,
            r.expired_leases,
            r.duration_ms
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a pass report.
pub fn pass_table(r: &PassReport) -> String {
    let mut out = format!("pass at {}\n", r.now);
    if r.backups.is_empty() {
        out.push_str("no backup due\n");
    }
    for b in &r.backups {
        out.push_str(&format!(
            "backup of {} (slot {}): job {} {}{}{}\n",
            b.item,
            b.slot,
            b.job,
            b.status,
            b.point
                .as_ref()
                .map(|p| format!(", point {p}"))
                .unwrap_or_default(),
            b.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&prune_table(&r.prune));
    out.push_str(&gc_table(&r.gc));
    out
}

/// One pass on an open vault.
pub fn pass(
    ctx: &Ctx,
    vault: &Vault,
    rate_limit: Option<u64>,
    threads: usize,
    stop: &(dyn Fn() -> bool + Sync),
) -> anyhow::Result<PassReport> {
    run_pass(
        vault,
        &ctx.registry,
        &*ctx.clock,
        &PassOptions {
            threads,
            rate_limit,
            stop,
            snapshot_root: ctx.snapshot_root.as_deref(),
        },
    )
    .with_context(|| format!("scheduler pass on {} failed", vault.dir().display()))
}

/// `coffre run-due`.
pub fn run_due(
    ctx: &Ctx,
    dir: &Path,
    rate_limit: Option<u64>,
    threads: usize,
) -> anyhow::Result<ExitCode> {
    let vault = open(ctx, dir, Access::Write)?;
    let report = pass(ctx, &vault, rate_limit, threads, &|| false)?;
    output::emit(ctx.fmt, &report, pass_table)?;
    Ok(ExitCode::SUCCESS)
}
