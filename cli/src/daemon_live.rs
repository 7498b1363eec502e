//! `coffre daemon`'s live restores: an unfinished `restore --live` from
//! the daemon's vault whose run is gone (killed, crashed) is resumed from
//! its run file (`coffre_engine::access::live_runs`), so that the VM's
//! reads of blocks not yet streamed are served again within about
//! [`LIVE_CHECK`], instead of waiting for someone to run `--resume` before
//! QEMU's reconnect delay runs out.
//!
//! A thread of its own looks every [`LIVE_CHECK`]; each resume runs on a
//! thread of its own until the stream completes or the daemon stops
//! (SIGTERM: the export stops and QEMU waits, as after a killed run; the
//! next daemon, or `--resume`, carries on). A resume is unattended
//! (`LiveOptions::unattended`): it only reconnects the QEMU that still
//! has the target, in the file the hold names, and leaves anything else
//! to a human: such a refusal (`EngineError::LiveNeedsHuman`) is logged
//! once and not tried again until a run of the restore writes its run
//! file anew. One that fails otherwise (QEMU gone, the export's socket
//! busy) is logged and tried again after a wait that doubles from
//! [`RETRY_FIRST`] up to a quarter of the restore's reconnect delay (at
//! most [`RETRY_MAX`]), at the next look once its run file changes (a
//! human's run wrote it); `restore --live --abandon` removes the run file
//! with the hold.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;
use coffre_engine::access::live::{LiveOptions, LiveReport, LiveRun, LiveSummary, LiveVm};
use coffre_engine::access::live_runs;
use coffre_engine::snapshotter::vm::stream::DeviceChoice;

use crate::args::FromTier;
use crate::ctx::Ctx;

/// How often the daemon looks for live restores to resume.
pub const LIVE_CHECK: Duration = Duration::from_secs(2);
/// The first wait before a failed resume is tried again.
const RETRY_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between two tries.
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How often a resume's progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// The run file of a live restore being started from `--vault vault`
/// (`None` when the vault's folder cannot be resolved: the restore runs,
/// and only `--resume` carries it on).
pub fn run_file(
    vault: &Path,
    from: Option<FromTier>,
    item: &str,
    target: &Path,
    vm: &LiveVm,
    device: &DeviceChoice,
    reconnect_delay: u64,
) -> Option<LiveRun> {
    let (qmp, domain, connect) = match vm {
        LiveVm::Qmp(q) => (Some(std::path::absolute(q).ok()?), None, None),
        LiveVm::Domain { name, connect } => (None, Some(name.clone()), connect.clone()),
    };
    Some(LiveRun {
        vault: std::fs::canonicalize(vault).ok()?,
        from: from.and_then(|f| f.to_possible_value().map(|v| v.get_name().to_string())),
        item: item.to_string(),
        target: target.to_path_buf(),
        qmp,
        domain,
        connect,
        device: device.id.clone(),
        bus: device.bus.clone(),
        swap_running: device.swap_running,
        reconnect_delay,
    })
}

/// The VM a run file names.
pub fn vm_of(run: &LiveRun) -> anyhow::Result<LiveVm> {
    match (&run.qmp, &run.domain) {
        (Some(q), _) => Ok(LiveVm::Qmp(q.clone())),
        (None, Some(name)) => Ok(LiveVm::Domain {
            name: name.clone(),
            connect: run.connect.clone(),
        }),
        (None, None) => anyhow::bail!("its run file names no VM"),
    }
}

/// The device a run file names.
pub fn device_of(run: &LiveRun) -> DeviceChoice {
    DeviceChoice {
        id: run.device.clone(),
        bus: run.bus.clone(),
        swap_running: run.swap_running,
    }
}

/// The run file an earlier run of the live restore of `item` from
/// `--vault vault` into `target` wrote (for a `--resume` that names no
/// VM; `device`: the one it names instead, whose bus the file gives when
/// it is the same device): an error saying what to give instead when
/// there is none, or it is another vault's, item's or target's.
pub fn earlier_run(
    vault: &Path,
    item: &str,
    target: &Path,
    device: Option<&str>,
) -> anyhow::Result<LiveRun> {
    let needs = if device.is_some() {
        "give --qmp SOCKET (or --domain NAME)"
    } else {
        "give --qmp SOCKET (or --domain NAME) and --device ID"
    };
    let canonical = std::fs::canonicalize(target).with_context(|| {
        format!(
            "cannot resume the live restore into {} (is it there?)",
            target.display()
        )
    })?;
    let file = coffre_engine::snapshotter::vm::stream::LiveNames::of(&canonical)
        .run_file()
        .map_err(|e| anyhow::anyhow!("{e}; {needs}"))?;
    let mut run = live_runs::read(&file).map_err(|e| {
        anyhow::anyhow!(
            "no earlier run of the live restore into {} says which VM ({e}): {needs}",
            canonical.display()
        )
    })?;
    let vault = std::fs::canonicalize(vault)
        .with_context(|| format!("cannot open vault {}", vault.display()))?;
    if run.vault != vault || run.item != item || run.target != canonical {
        anyhow::bail!(
            "the run file {} of the earlier live restore into {} is of item {} of vault {}, not of item {item} of {}: {needs}",
            file.display(),
            run.target.display(),
            run.item,
            run.vault.display(),
            vault.display()
        );
    }
    if let Some(d) = device
        && d != run.device
    {
        run.device = d.to_string();
        run.bus = None;
    }
    Ok(run)
}

/// The tier of a resume whose VM comes from the earlier run's run file:
/// the file's, unless `--from` names it too; another is refused.
pub fn tier_of(run: &LiveRun, from: Option<FromTier>) -> anyhow::Result<Option<FromTier>> {
    let earlier = match run.from.as_deref() {
        Some(f) => {
            Some(FromTier::from_str(f, false).map_err(|e| anyhow::anyhow!("tier {f:?}: {e}"))?)
        }
        None => None,
    };
    match from {
        None => Ok(earlier),
        Some(f) if Some(f) == earlier => Ok(earlier),
        Some(_) => anyhow::bail!(
            "the earlier run of this live restore read {}, and its hold is there: resume it with the same --from (or none)",
            run.from.as_deref().unwrap_or("the default tier")
        ),
    }
}

/// Starts the daemon's watch over the live restores of the vault in
/// `dir`; it ends, after its resumes, once `stop` is set.
pub fn spawn(ctx: Arc<Ctx>, dir: &Path, stop: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<()>> {
    let vault = std::fs::canonicalize(dir)
        .with_context(|| format!("cannot resolve vault {}", dir.display()))?;
    match coffre_engine::snapshotter::vm::stream::live_dir() {
        Ok(d) => {
            tracing::info!(folder = %d.display(), "resuming this vault's live restores whose run is gone, from their run files")
        }
        Err(e) => {
            tracing::warn!(error = %e, "the live restores' folder is unusable: none is resumed")
        }
    }
    let mut watch = Watch {
        ctx,
        vault,
        stop,
        running: HashMap::new(),
        retry: HashMap::new(),
        reported: HashSet::new(),
    };
    std::thread::Builder::new()
        .name("coffre-live-watch".into())
        .spawn(move || watch.run())
        .context("cannot start the live restores' watch")
}

/// A failed resume's next try.
struct Retry {
    /// When (`None`: parked, until the run file is written anew: what
    /// failed needs a human).
    at: Option<Instant>,
    wait: Duration,
    written: Option<std::time::SystemTime>,
}

/// True when `e` is an unattended resume's refusal of what needs a human.
fn needs_human(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<coffre_engine::EngineError>(),
            Some(coffre_engine::EngineError::LiveNeedsHuman { .. })
        )
    })
}

/// When the run file at `path` was last written.
fn written(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
}

struct Watch {
    ctx: Arc<Ctx>,
    /// The daemon's vault (canonical): run files of other vaults are left
    /// to their own daemons.
    vault: PathBuf,
    stop: Arc<AtomicBool>,
    /// Resumes under way, by target: their thread, run file and reconnect
    /// delay.
    running: HashMap<PathBuf, (JoinHandle<anyhow::Result<LiveSummary>>, PathBuf, u64)>,
    /// Targets whose resume failed: when to try again, the wait, and
    /// the run file's time then (a new one starts the waits again).
    retry: HashMap<PathBuf, Retry>,
    /// Run files already reported unreadable (reported once).
    reported: HashSet<PathBuf>,
}

impl Watch {
    fn run(&mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            self.reap();
            self.start();
            let until = Instant::now() + LIVE_CHECK;
            while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Stopped: the resumes stop too (their exports end; QEMU waits).
        for (_, (h, _, _)) in self.running.drain() {
            let _ = h.join();
        }
    }

    /// Collects the resumes that ended.
    fn reap(&mut self) {
        let ended: Vec<PathBuf> = self
            .running
            .iter()
            .filter(|(_, (h, _, _))| h.is_finished())
            .map(|(t, _)| t.clone())
            .collect();
        for target in ended {
            let Some((h, file, delay)) = self.running.remove(&target) else {
                continue;
            };
            let (failed, parked) = match h.join() {
                // Done, and nothing left to resume.
                Ok(Ok(_)) if !file.exists() => {
                    self.retry.remove(&target);
                    continue;
                }
                Ok(Ok(_)) => (
                    format!(
                        "it completed but its run file {} stays (it could not be removed)",
                        file.display()
                    ),
                    true,
                ),
                Ok(Err(e)) => (format!("{e:#}"), needs_human(&e)),
                Err(_) => ("its thread panicked".to_string(), true),
            };
            if self.stop.load(Ordering::Relaxed) {
                continue;
            }
            if parked {
                tracing::warn!(target = %target.display(), error = %failed, "live restore not resumed, and not tried again until a run of it writes its run file anew");
                self.retry.insert(
                    target,
                    Retry {
                        at: None,
                        wait: RETRY_FIRST,
                        written: written(&file),
                    },
                );
                continue;
            }
            let most = (Duration::from_secs(delay) / 4).clamp(RETRY_FIRST, RETRY_MAX);
            let wait = self
                .retry
                .get(&target)
                .map_or(RETRY_FIRST, |r| (r.wait * 2).min(most));
            tracing::warn!(target = %target.display(), error = %failed, retry_in_s = wait.as_secs(), "live restore could not be resumed; `coffre restore --live --resume` carries it on, `--abandon` gives it up");
            self.retry.insert(
                target,
                Retry {
                    at: Some(Instant::now() + wait),
                    wait,
                    written: written(&file),
                },
            );
        }
    }

    /// Starts a resume of each live restore of this vault whose run is
    /// gone.
    fn start(&mut self) {
        let runs = match live_runs::list() {
            Ok(r) => r,
            Err(e) => {
                if self.reported.insert(PathBuf::new()) {
                    tracing::warn!(error = %e, "the live restores' run files cannot be listed");
                }
                return;
            }
        };
        for (path, run) in runs {
            let run = match run {
                Ok(r) => r,
                Err(e) => {
                    if self.reported.insert(path) {
                        tracing::warn!(error = %e, "a live restore's run file is not used");
                    }
                    continue;
                }
            };
            if run.vault != self.vault || self.running.contains_key(&run.target) {
                continue;
            }
            if let Some(r) = self.retry.get(&run.target) {
                if r.written != written(&path) {
                    // Written again (a human's run): tried at once.
                    self.retry.remove(&run.target);
                } else if r.at.is_none_or(|at| Instant::now() < at) {
                    continue;
                }
            }
            match live_runs::running(&run.target) {
                Ok(false) => {}
                Ok(true) => continue,
                Err(e) => {
                    if self.reported.insert(path) {
                        tracing::warn!(target = %run.target.display(), error = %e, "cannot tell whether a live restore's run is going: it is not resumed");
                    }
                    continue;
                }
            }
            // Finished as it was looked at: its run file went with it.
            if !path.exists() {
                continue;
            }
            tracing::info!(target = %run.target.display(), item = %run.item, "resuming a live restore whose run is gone");
            let (ctx, stop, target) = (self.ctx.clone(), self.stop.clone(), run.target.clone());
            let delay = run.reconnect_delay;
            let spawned = std::thread::Builder::new()
                .name("coffre-live-resume".into())
                .spawn(move || {
                    let done = resume(&ctx, &run, &stop);
                    if let Ok(s) = &done {
                        tracing::info!(target = %run.target.display(), item = %s.item, point = %s.point, streamed = s.streamed, "live restore resumed by the daemon: complete; the target needs coffre no more");
                    }
                    done
                });
            match spawned {
                Ok(h) => {
                    self.running.insert(target, (h, path, delay));
                }
                Err(e) => {
                    tracing::warn!(target = %target.display(), error = %e, "cannot start a thread to resume a live restore")
                }
            }
        }
    }
}

/// Resumes the live restore `run` names, as `restore --live --resume`
/// with its first run's arguments would.
fn resume(ctx: &Ctx, run: &LiveRun, stop: &AtomicBool) -> anyhow::Result<LiveSummary> {
    let from = tier_of(run, None)?;
    // Cheap checks first: a resume that cannot start writes no job record.
    if std::fs::canonicalize(&run.target).ok().as_ref() != Some(&run.target) {
        anyhow::bail!(
            "its target {} is gone, or no longer at that canonical path",
            run.target.display()
        );
    }
    let dir = crate::commands::tier_dir(ctx, &run.vault, from)?;
    if let Some(q) = &run.qmp {
        std::os::unix::net::UnixStream::connect(q).with_context(|| {
            format!(
                "QEMU's monitor {} does not answer (QEMU gone?)",
                q.display()
            )
        })?;
    }
    let opts = LiveOptions {
        target: run.target.clone(),
        vm: vm_of(run)?,
        device: device_of(run),
        resume: true,
        speed: None,
        reconnect_delay: run.reconnect_delay,
        mode: 0o600,
        access: coffre_engine::access::AccessOptions {
            from: crate::export_cmd::served_from(from),
            ..Default::default()
        },
        poll: Duration::from_millis(250),
        now: ctx.now(),
        rerun: Some(run.clone()),
        unattended: true,
    };
    let report = LogReport {
        target: run.target.display().to_string(),
        last: Mutex::new(None),
    };
    crate::live_cmd::live(ctx, &dir, &run.item, None, &opts, &report, stop)
}

/// A resume's steps and progress, in the daemon's log.
struct LogReport {
    target: String,
    last: Mutex<Option<Instant>>,
}

impl LiveReport for LogReport {
    fn step(&self, line: &str) {
        tracing::info!(target = %self.target, "live restore: {line}");
    }

    fn stream(&self, done: u64, total: u64, rate: u64) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) && done < total {
            return;
        }
        *last = Some(Instant::now());
        tracing::info!(target = %self.target, done, total, rate, "live restore: streaming");
    }
}
