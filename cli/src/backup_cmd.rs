//! `coffre backup`: "Backup now". Protects an unprotected image under
//! DefaultPolicy (and says so), then runs a backup job whose point is kept
//! until `--retain-until` (default: 30 days).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::backup::PointTerms;
use coffre_engine::backup_job::{JobOptions, Writer, run_backup_job};
use coffre_engine::cbt::{Hint, Sampling};
use coffre_engine::nbd::{is_nbd_uri, open_any};
use coffre_engine::policy::DEFAULT_POLICY;
use coffre_engine::protection::{canonical, protect};
use coffre_engine::retention::ON_DEMAND_DEFAULT_DAYS;
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

/// Runs `coffre backup --qmp SOCKET --drive NODE`: the drive of a running
/// VM is taken at one instant (a fleecing export, removed at the end
/// whatever happens) and backed up from that export; the item's source is
/// recorded as `qmp+unix:///NODE?socket=SOCKET`.
pub fn run_qmp(
    ctx: &Ctx,
    dir: &Path,
    mut args: BackupArgs<'_>,
    socket: &Path,
    drive: &str,
) -> anyhow::Result<ExitCode> {
    use coffre_engine::snapshotter::vm::{fleece::Fleece, qmp::Qmp, qmp_source};
    let item = args.item.take().unwrap_or_else(|| drive.to_string());
    coffre_engine::store::format::catalog::validate_item_name(&item)
        .map_err(|e| anyhow::anyhow!("drive {drive:?} is no item name ({e}); pass --item"))?;
    args.item = Some(item.clone());
    let socket = &std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let work = private_work_dir()?;
    let result = (|| {
        let mut qmp = Qmp::connect(socket, std::time::Duration::from_secs(30))
            .context("cannot back up the drive of a running VM")?;
        let mut fleece = Fleece::start(&mut qmp, drive, &item, &work)
            .context("cannot take the drive's point in time")?;
        let uri = std::path::PathBuf::from(fleece.uri());
        let source = std::path::PathBuf::from(qmp_source(socket, drive));
        let done = run_from(ctx, dir, args, &source, &uri);
        fleece.stop(&mut qmp);
        done
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// A new folder of this user's alone under the temporary directory, for a
/// fleece's overlay and socket: a random name, created (0700) only if it
/// did not exist, so nothing another user planted there is used.
fn private_work_dir() -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let tmp = std::env::temp_dir();
    let mut last = None;
    for attempt in 0..16u64 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tag = blake3::hash(format!("{seed}-{}-{attempt}", std::process::id()).as_bytes());
        let dir = tmp.join(format!("coffre-qmp-{}", &tag.to_hex()[..16]));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow::anyhow!(
        "cannot create a private folder in {}: {}",
        tmp.display(),
        last.map_or_else(String::new, |e| e.to_string())
    ))
}

/// Runs `coffre backup`.
pub fn run(ctx: &Ctx, dir: &Path, args: BackupArgs<'_>, image: &Path) -> anyhow::Result<ExitCode> {
    run_from(ctx, dir, args, image, image)
}

/// Backs up `image` (the source the item records), reading it from
/// `read_from` (the same, or the export of a running VM's point in time).
fn run_from(
    ctx: &Ctx,
    dir: &Path,
    args: BackupArgs<'_>,
    image: &Path,
    read_from: &Path,
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
    let (source, hint) = open_source(read_from, cbt)?;
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
    let outcome = run_backup_job(
        dir,
        &*source,
        JobOptions {
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
        },
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
