//! `coffre backup --domain NAME [--connect URI]` and `coffre protect
//! --domain NAME --policy P`: a libvirt domain's disks, each as item
//! `NAME-TARGET`, backed up at one instant (`coffre_engine::domain_backup`).
//! The output is one summary for the domain, with every disk's job and
//! point.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::backup::PointTerms;
use coffre_engine::backup_job::Writer;
use coffre_engine::cbt::Sampling;
use coffre_engine::domain_backup::{DomainOptions, DomainOutcome, DomainPlan, backup_domain};
use coffre_engine::protection;
use coffre_engine::store::Access;
use coffre_engine::store::jobs::JobRecord;
use jiff::Timestamp;
use serde::Serialize;

use crate::backup_cmd::{BackupArgs, ensure_protected, parse_retain_until};
use crate::ctx::{Ctx, open};
use crate::output::{self, bytes};
use crate::point_cmd::PointView;
use crate::progress::Bar;

/// The JSON shape of one disk in `coffre backup --domain`.
#[derive(Serialize)]
struct DiskView<'a> {
    disk: &'a str,
    item: &'a str,
    source: String,
    read_from: &'a str,
    incremental_from: Option<&'a str>,
    full_read: Option<&'a str>,
    auto_protected: bool,
    new_item: bool,
    /// The point's fields, without its `job` id (the job object carries it).
    point: Option<serde_json::Value>,
    job: &'a JobRecord,
}

/// The JSON shape of `coffre backup --domain`.
#[derive(Serialize)]
struct DomainView<'a> {
    domain: &'a str,
    connect: &'a str,
    domain_job: &'a str,
    instant: Option<Timestamp>,
    running: bool,
    consistency: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    freeze_ms: Option<u64>,
    checkpoint: Option<&'a str>,
    retired_checkpoints: &'a [String],
    warnings: &'a [String],
    disks: Vec<DiskView<'a>>,
}

fn inspect(domain: &str, connect: Option<&str>) -> anyhow::Result<DomainPlan> {
    DomainPlan::inspect(connect, domain).context("cannot back up")
}

/// Runs `coffre backup --domain NAME [--connect URI]`.
pub fn backup(
    ctx: &Ctx,
    dir: &Path,
    args: BackupArgs<'_>,
    domain: &str,
    connect: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let BackupArgs {
        retain_until,
        rate_limit,
        threads,
        cbt,
        ..
    } = args;
    let sampling = Sampling {
        fraction: Sampling::parse_fraction(&cbt.cbt_sample)
            .map_err(|e| anyhow::anyhow!("--cbt-sample: {e}"))?,
        min_blocks: cbt.cbt_sample_min,
    };
    let retain_until = parse_retain_until(retain_until, ctx.now())?;
    let plan = inspect(domain, connect)?;
    // Every disk's item, protected under DefaultPolicy when new.
    let mut auto = Vec::new();
    let mut hooks = std::collections::BTreeMap::new();
    for d in &plan.xml.disks {
        let item = plan.item(&d.target);
        coffre_engine::store::format::catalog::validate_item_name(&item)
            .map_err(|e| anyhow::anyhow!("disk {} of domain {domain}: {e}", d.target))?;
        let (new, item_hooks, warning) =
            ensure_protected(ctx, dir, &item, &plan.source(&d.target))?;
        hooks.insert(item.clone(), (item_hooks, warning));
        if new {
            auto.push(item);
        }
    }
    if !auto.is_empty() && ctx.fmt == crate::args::OutputFormat::Table {
        eprintln!(
            "coffre: {} {} not protected; now under {} (daily at 02:00 UTC, points kept 30 days)",
            auto.join(", "),
            if auto.len() == 1 { "was" } else { "were" },
            coffre_engine::policy::DEFAULT_POLICY
        );
    }
    let bars = |disk: &str| -> (
        Box<dyn coffre_engine::Progress>,
        Box<dyn coffre_engine::Progress>,
    ) {
        (
            Box::new(Bar::new(&format!("{disk} snap"))),
            Box::new(Bar::new(&format!("{disk} xfer"))),
        )
    };
    let out = backup_domain(
        dir,
        &plan,
        &DomainOptions {
            only: None,
            threads,
            rate_limit,
            allow_clone: ctx.allow_clone,
            snapshot_root: ctx.snapshot_root.clone(),
            sampling,
            terms: PointTerms {
                scheduled: false,
                retain_until: Some(retain_until),
                job: None,
            },
            writer: Writer::Open(ctx.open_options()),
            stop: &|| false,
            hooks,
        },
        &*ctx.clock,
        &bars,
    )
    .with_context(|| format!("backup of libvirt domain {domain} failed"))?;
    print(ctx, &out, &auto, retain_until)?;
    let failed: Vec<usize> = (0..out.disks.len())
        .filter(|&i| out.disks[i].outcome.error.is_some())
        .collect();
    let mut out = out;
    if !out.unrecorded.is_empty() {
        let n = out.unrecorded.len() + failed.len();
        let (disk, e) = out.unrecorded.swap_remove(0);
        return Err(anyhow::Error::new(e).context(format!(
            "backup of libvirt domain {domain}: {n} disk(s) failed; disk {disk} failed and no job of it could be recorded"
        )));
    }
    let Some(&first) = failed.first() else {
        return Ok(ExitCode::SUCCESS);
    };
    // The first failure's error, for its exit code.
    let d = out.disks.swap_remove(first);
    let (job, status) = (d.outcome.job.id.clone(), d.outcome.job.status);
    let e = d.outcome.error.map_or_else(
        || anyhow::anyhow!("disk {} failed", d.disk),
        anyhow::Error::new,
    );
    Err(e.context(format!(
        "backup of libvirt domain {domain}: {} disk(s) failed; disk {} (item {}, job {job}) ended {status}",
        failed.len(),
        d.disk,
        d.item
    )))
}

fn print(
    ctx: &Ctx,
    out: &DomainOutcome,
    auto: &[String],
    retain_until: Timestamp,
) -> anyhow::Result<()> {
    let disks: Vec<DiskView<'_>> = out
        .disks
        .iter()
        .map(|d| DiskView {
            disk: &d.disk,
            item: &d.item,
            source: d.source.display().to_string(),
            read_from: &d.read_from,
            incremental_from: d.incremental_from.as_deref(),
            full_read: d.full_read.as_deref(),
            auto_protected: auto.contains(&d.item),
            new_item: d.outcome.point.as_ref().is_some_and(|p| p.seq == 1),
            point: d
                .outcome
                .point
                .as_ref()
                .map(PointView::transferred)
                .and_then(|p| match serde_json::to_value(p) {
                    Ok(serde_json::Value::Object(mut m)) => {
                        m.remove("job");
                        Some(serde_json::Value::Object(m))
                    }
                    _ => None,
                }),
            job: &d.outcome.job,
        })
        .collect();
    let view = DomainView {
        domain: &out.domain,
        connect: &out.connect,
        domain_job: &out.domain_job,
        instant: out.instant,
        running: out.running,
        consistency: out.consistency,
        freeze_ms: out.freeze_ms,
        checkpoint: out.checkpoint.as_deref(),
        retired_checkpoints: &out.retired,
        warnings: &out.warnings,
        disks,
    };
    output::emit(ctx.fmt, &view, |v| {
        let mut s = match v.instant {
            Some(i) => format!(
                "domain {} ({}): {} disk(s) at one instant {} ({}-consistent{}), domain job {}\n",
                v.domain,
                v.connect,
                v.disks.len(),
                output::when(i),
                v.consistency,
                v.freeze_ms
                    .map_or(String::new(), |ms| format!(", guest frozen for {ms} ms")),
                v.domain_job
            ),
            None => format!(
                "domain {} ({}) is not running: {} image file(s) read directly, domain job {}\n",
                v.domain,
                v.connect,
                v.disks.len(),
                v.domain_job
            ),
        };
        for (d, run) in v.disks.iter().zip(&out.disks) {
            let job = d.job;
            s.push_str(&format!(
                "  {} → item {}: job {} {}",
                d.disk, d.item, job.id, job.status
            ));
            if let Some(p) = &run.outcome.point {
                let st = &p.stats;
                s.push_str(&format!(
                    ", point {}{}: {} image, {} read, {}/{} blocks changed, {} stored",
                    p.id,
                    if d.new_item { " (new item)" } else { "" },
                    bytes(p.image_size),
                    bytes(st.bytes_read),
                    st.blocks_changed,
                    st.blocks_total,
                    bytes(st.stored_bytes),
                ));
            }
            s.push('\n');
            match (d.incremental_from, d.full_read) {
                (Some(c), _) => s.push_str(&format!(
                    "    read only what changed since checkpoint {c}\n"
                )),
                (None, Some(why)) => s.push_str(&format!("    whole disk read: {why}\n")),
                (None, None) => {}
            }
            if let Some(e) = &job.error {
                s.push_str(&format!("    error: {e}\n"));
            }
        }
        if let Some(c) = v.checkpoint {
            s.push_str(&format!("checkpoint {c} created"));
            if !v.retired_checkpoints.is_empty() {
                s.push_str(&format!("; deleted {}", v.retired_checkpoints.join(", ")));
            }
            s.push('\n');
        }
        s.push_str(&format!(
            "points kept until {}\n",
            output::when(retain_until)
        ));
        for w in v.warnings {
            s.push_str(&format!("warning: {w}\n"));
        }
        s
    })
}

/// The JSON shape of one disk in `coffre protect --domain`.
#[derive(Serialize)]
struct ProtectedDisk {
    disk: String,
    item: String,
    source: String,
    action: &'static str,
}

/// Runs `coffre protect --domain NAME [--connect URI] --policy P`.
pub fn protect(
    ctx: &Ctx,
    dir: &Path,
    domain: &str,
    connect: Option<&str>,
    policy: &str,
) -> anyhow::Result<ExitCode> {
    let plan = DomainPlan::inspect(connect, domain)
        .with_context(|| format!("cannot protect libvirt domain {domain}"))?;
    let vault = open(ctx, dir, Access::Write)?;
    let mut done = Vec::new();
    for d in &plan.xml.disks {
        let item = plan.item(&d.target);
        let source = plan.source(&d.target);
        let out = protection::protect(
            &vault,
            &ctx.registry,
            &item,
            policy,
            &source,
            ctx.now(),
            None,
        )
        .with_context(|| {
            format!(
                "cannot protect disk {} of domain {domain} as item {item}",
                d.target
            )
        })?;
        done.push(ProtectedDisk {
            disk: d.target.clone(),
            item,
            source: source.display().to_string(),
            action: out.action,
        });
    }
    output::emit(ctx.fmt, &done, |v| {
        let mut s = String::new();
        for d in v {
            s.push_str(&format!(
                "{} {} → item {} under policy {policy} ({})\n",
                domain, d.disk, d.item, d.action
            ));
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}
