//! `coffre backup`: "Backup now". Protects an unprotected image under
//! DefaultPolicy (and says so), then runs a backup job whose point is kept
//! until `--retain-until` (default: 30 days).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::backup::PointTerms;
use coffre_engine::backup_job::{JobOptions, Source, Writer, run_source_job};
use coffre_engine::cbt::{Hint, Sampling};
use coffre_engine::nbd::{is_nbd_uri, open_any};
use coffre_engine::policy::DEFAULT_POLICY;
use coffre_engine::protection::{canonical, protect};
use coffre_engine::retention::ON_DEMAND_DEFAULT_DAYS;
use coffre_engine::snapshotter::vm::live::{QmpDrive, QmpTarget};
use coffre_engine::store::format::catalog::Hooks;
use coffre_engine::store::jobs::{JobRecord, PhaseStatus};
use coffre_engine::store::{Access, Protection};
use coffre_engine::{BackupOptions, ImageSource};
use jiff::{Timestamp, ToSpan};
use serde::Serialize;

use crate::args::CbtArgs;
use crate::ctx::{Ctx, open};
use crate::output::{self, bytes};
use crate::point_cmd::PointView;
use crate::progress::Bar;
use crate::units::mib_per_s;

/// Parses `--retain-until`: a date (kept through that day, UTC) or an
/// RFC 3339 instant, in the future.
pub fn parse_retain_until(s: Option<&str>, now: Timestamp) -> anyhow::Result<Timestamp> {
    let t = match s {
        None => now
            .to_zoned(jiff::tz::TimeZone::UTC)
            .checked_add(ON_DEMAND_DEFAULT_DAYS.days())?
            .timestamp(),
        Some(s) => match s.parse::<jiff::civil::Date>() {
            Ok(d) => d.tomorrow()?.to_zoned(jiff::tz::TimeZone::UTC)?.timestamp(),
            Err(_) => s.parse::<Timestamp>().map_err(|_| {
                anyhow::anyhow!(
                    "--retain-until {s:?} is neither a date (YYYY-MM-DD) nor an RFC 3339 instant"
                )
            })?,
        },
    };
    if t <= now {
        anyhow::bail!("--retain-until {t} is not in the future (now is {now})");
    }
    Ok(t)
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

/// Protects the image under DefaultPolicy if its item does not exist yet;
/// returns true when it did, the hooks this host runs for the item (set
/// on this host, never taken from the vault's catalog) and a warning when
/// the catalog names others.
pub(crate) fn ensure_protected(
    ctx: &Ctx,
    dir: &Path,
    item: &str,
    image: &Path,
) -> anyhow::Result<(bool, Hooks, Option<String>)> {
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let record = vault.item(item)?;
    let (hooks, warning) = match &record {
        Some(r) => ctx.registry.host_hooks(&vault.config().vault_id, r),
        None => (Hooks::default(), None),
    };
    drop(vault);
    match record.map(|i| i.protection) {
        Some(Protection::Protected) => Ok((false, hooks, warning)),
        Some(Protection::Stopped { .. }) => anyhow::bail!(
            "item {item:?} is not protected any more (stopped, data retained); run `coffre protect --item {item} --policy P` to resume"
        ),
        Some(Protection::SoftDeleted { .. }) => anyhow::bail!(
            "item {item:?} has its data soft-deleted; run `coffre undelete --item {item}` first"
        ),
        None => {
            let vault = open(ctx, dir, Access::Write)?;
            protect(
                &vault,
                &ctx.registry,
                item,
                DEFAULT_POLICY,
                image,
                ctx.now(),
                None,
            )
            .with_context(|| format!("cannot protect {}", image.display()))?;
            Ok((true, hooks, warning))
        }
    }
}

/// The JSON shape of `coffre backup`.
#[derive(Serialize)]
struct BackupView<'a> {
    /// The point's fields, without its `job` id: the job object below
    /// carries it (one key, not two).
    #[serde(flatten)]
    point: Option<serde_json::Map<String, serde_json::Value>>,
    job: &'a JobRecord,
    new_item: bool,
    auto_protected: bool,
    mib_per_s: f64,
}

/// The options of `coffre backup`.
pub struct BackupArgs<'a> {
    /// `--item`.
    pub item: Option<String>,
    /// `--retain-until`.
    pub retain_until: Option<&'a str>,
    /// `--rate-limit`.
    pub rate_limit: Option<u64>,
    /// `--threads`.
    pub threads: usize,
    /// `--changed-blocks`, `--bitmap`, `--cbt-sample`.
    pub cbt: &'a CbtArgs,
}

/// Opens the source (an NBD export, a qcow2 file or a raw image) and the
/// hint its options give (a list, or the source's dirty bitmap); a bad
/// list is refused before anything is opened.
fn open_source(
    image: &Path,
    cbt: &CbtArgs,
) -> anyhow::Result<(Box<dyn ImageSource>, Option<Hint>)> {
    if cbt.changed_blocks.is_some() && cbt.bitmap.is_some() {
        anyhow::bail!("give --changed-blocks or --bitmap, not both");
    }
    let listed = match &cbt.changed_blocks {
        None => None,
        Some(path) => Some(coffre_engine::cbt::list::read(path).map_err(|reason| {
            coffre_engine::SnapError::ChangedBlocks {
                path: path.clone(),
                reason,
            }
        })?),
    };
    let (source, bitmap_hint) = open_any(image, cbt.bitmap.as_deref()).context("cannot back up")?;
    Ok((source, listed.or(bitmap_hint)))
}

/// The item name for an NBD export: its export name, else `--item`.
fn nbd_item_name(image: &Path) -> Option<String> {
    let text = image.to_string_lossy();
    if !is_nbd_uri(&text) {
        return None;
    }
    coffre_engine::nbd::NbdUri::parse(&text)
        .ok()
        .map(|u| u.export)
        .filter(|e| !e.is_empty())
}

/// Runs `coffre backup --qmp SOCKET --drive NODE [--guest-agent SOCKET]`:
/// the job takes the drive's point in time itself, through QEMU (a
/// fleecing export and the item's dirty-bitmap chain, removed or moved on
/// at the end whatever happens), with the guest frozen for the instant when
/// an agent is given. The item records the target's `qmp+unix://` source.
pub fn run_qmp(
    ctx: &Ctx,
    dir: &Path,
    mut args: BackupArgs<'_>,
    target: QmpTarget,
) -> anyhow::Result<ExitCode> {
    if args.cbt.changed_blocks.is_some() || args.cbt.bitmap.is_some() {
        anyhow::bail!(
            "--qmp keeps its own dirty bitmaps: --changed-blocks and --bitmap do not apply"
        );
    }
    let item = args.item.take().unwrap_or_else(|| target.drive.clone());
    coffre_engine::store::format::catalog::validate_item_name(&item).map_err(|e| {
        anyhow::anyhow!(
            "drive {:?} is no item name ({e}); pass --item",
            target.drive
        )
    })?;
    args.item = Some(item);
    let vault_id = coffre_engine::store::VaultConfig::load_with(dir, Some(&*ctx.keys))
        .with_context(|| format!("cannot read the vault at {}", dir.display()))?
        .vault_id;
    let source = std::path::PathBuf::from(target.source());
    let drive = Box::new(QmpDrive::new(target, &vault_id));
    run_from(ctx, dir, args, &source, Source::Live(drive), None)
}

/// Runs `coffre backup`.
pub fn run(ctx: &Ctx, dir: &Path, args: BackupArgs<'_>, image: &Path) -> anyhow::Result<ExitCode> {
    let (source, hint) = open_source(image, args.cbt)?;
    run_from(ctx, dir, args, image, Source::Image(source), hint)
}

/// Backs up `image` (the source the item records), reading `source` with
/// the changed-block `hint` its options gave.
fn run_from(
    ctx: &Ctx,
    dir: &Path,
    args: BackupArgs<'_>,
    image: &Path,
    mut source: Source,
    hint: Option<Hint>,
) -> anyhow::Result<ExitCode> {
    let BackupArgs {
        item,
        retain_until,
        rate_limit,
        threads,
        cbt,
    } = args;
    let item = match (item, nbd_item_name(image)) {
        (Some(i), _) => i,
        (None, Some(e)) => e,
        (None, None) => item_name_for(image, None)?,
    };
    let sampling = Sampling {
        fraction: Sampling::parse_fraction(&cbt.cbt_sample)
            .map_err(|e| anyhow::anyhow!("--cbt-sample: {e}"))?,
        min_blocks: cbt.cbt_sample_min,
    };
    let retain_until = parse_retain_until(retain_until, ctx.now())?;
    let (auto_protected, hooks, hook_warning) = ensure_protected(ctx, dir, &item, image)?;
    if let Some(w) = &hook_warning {
        tracing::warn!("{w}");
    }
    if auto_protected && ctx.fmt == crate::args::OutputFormat::Table {
        eprintln!(
            "coffre: {} was not protected; it is now item {item} under {DEFAULT_POLICY} (daily at 02:00 UTC, points kept 30 days)",
            image.display()
        );
    }
    let snap_bar = Bar::new("snapshot");
    let transfer_bar = Bar::new("transfer");
    let options = JobOptions {
        backup: BackupOptions {
            item: item.clone(),
            source_path: canonical(image),
            threads,
            rate_limit,
            hooks,
            allow_clone: ctx.allow_clone,
            snapshot_root: ctx.snapshot_root.clone(),
            hint,
            sampling,
            notes: hook_warning.into_iter().collect(),
        },
        terms: PointTerms {
            scheduled: false,
            retain_until: Some(retain_until),
            job: None,
        },
        writer: Writer::Open(ctx.open_options()),
        stop: &|| false,
        labels: Default::default(),
    };
    let outcome = run_source_job(
        dir,
        &mut source,
        options,
        &*ctx.clock,
        &snap_bar,
        &transfer_bar,
    )
    .with_context(|| {
        format!(
            "backup of {} into {} failed",
            image.display(),
            dir.display()
        )
    })?;
    let job = &outcome.job;
    let view = BackupView {
        point: outcome
            .point
            .as_ref()
            .map(PointView::transferred)
            .and_then(|p| match serde_json::to_value(p) {
                Ok(serde_json::Value::Object(mut m)) => {
                    m.remove("job");
                    Some(m)
                }
                _ => None,
            }),
        job,
        new_item: outcome.point.as_ref().is_some_and(|p| p.seq == 1),
        auto_protected,
        mib_per_s: outcome
            .point
            .as_ref()
            .map_or(0.0, |p| mib_per_s(p.image_size, p.stats.duration_ms)),
    };
    output::emit(ctx.fmt, &view, |v| {
        let phases: Vec<String> = job
            .phases
            .iter()
            .map(|p| format!("{} {}", p.name, p.status))
            .collect();
        let mut out = format!("job {} {} ({})\n", job.id, job.status, phases.join(", "));
        if let Some(p) = &outcome.point {
            let s = &p.stats;
            out.push_str(&format!(
                "point {} of item {}{}: {} image, {} read, {}/{} blocks changed, {} new chunks, {} stored, {:.0} MiB/s ({} ms), kept until {}\n",
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
                s.duration_ms,
                output::when(retain_until)
            ));
        }
        if let Some(ms) = job.stats.get("freeze_ms").and_then(|v| v.as_u64()) {
            let level = job.stats.get("level").and_then(|l| l.as_str());
            out.push_str(&format!(
                "guest frozen for {ms} ms ({})\n",
                level.unwrap_or("level unknown")
            ));
        }
        if let Some(c) = outcome.point.as_ref().and_then(|p| p.cbt.as_ref()) {
            let generation = c
                .generation
                .as_deref()
                .map_or(String::new(), |g| format!(" (generation {g})"));
            let how = match &c.fallback {
                None => "read only what it marks".to_string(),
                Some(why) => format!("full scan: {why}"),
            };
            out.push_str(&format!(
                "changed blocks from {}{generation}: {} dirty blocks ({}), {} clean blocks sampled, {} mismatches; {how}\n",
                c.source,
                c.dirty_blocks,
                bytes(c.dirty_bytes),
                c.sampled,
                c.mismatches
            ));
        }
        if let Some(t) = job
            .phase("transfer")
            .filter(|t| t.status == PhaseStatus::Skipped)
        {
            out.push_str(&format!(
                "transfer skipped: {}\n",
                t.error.as_deref().unwrap_or_default()
            ));
        }
        if let Some(w) = job.stats.get("warnings").and_then(|w| w.as_array()) {
            for line in w.iter().filter_map(|l| l.as_str()) {
                out.push_str(&format!("warning: {line}\n"));
            }
        }
        out
    })?;
    match outcome.error {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => Err(anyhow::Error::new(e).context(format!(
            "backup job {} of {} ended {}",
            job.id,
            image.display(),
            job.status
        ))),
    }
}
