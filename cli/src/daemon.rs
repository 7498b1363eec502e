//! `coffre daemon`: runs scheduler passes (due backups, prune, gc,
//! snapshot expiry) every `--interval` seconds until SIGTERM or SIGINT,
//! and resumes the vault's live restores whose run is gone
//! ([`crate::daemon_live`]).
//!
//! tokio waits (signals, the interval); each pass runs on a blocking
//! thread with the vault opened for writing only for its duration, so the
//! CLI can use the vault between passes. On a signal the running pass is
//! told to stop: a transfer between windows is abandoned (nothing of it is
//! recorded; the slot stays due), anything else finishes; then the daemon
//! exits 0.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use coffre_engine::store::{Access, StoreError, Vault};
use tokio::signal::unix::{SignalKind, signal};

use crate::ctx::Ctx;
use crate::maintenance_cmd::pass;

/// How long a pass waits for another writer before it gives up (and the
/// next tick retries).
const PASS_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Runs the daemon until a signal.
pub fn run(
    ctx: &Ctx,
    dir: &Path,
    interval: u64,
    rate_limit: Option<u64>,
    threads: usize,
) -> anyhow::Result<ExitCode> {
    // Fail early, in the foreground, if the directory is not a vault.
    drop(
        Vault::open_with(dir, Access::ReadOnly, &ctx.open_options())
            .with_context(|| format!("cannot open vault {}", dir.display()))?,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let ctx = Arc::new(ctx.clone());
    rt.block_on(daemon_loop(
        ctx,
        dir.to_path_buf(),
        Duration::from_secs(interval.max(1)),
        rate_limit,
        threads,
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn daemon_loop(
    ctx: Arc<Ctx>,
    dir: std::path::PathBuf,
    interval: Duration,
    rate_limit: Option<u64>,
    threads: usize,
) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let live = crate::daemon_live::spawn(ctx.clone(), &dir, stop.clone())?;
    tracing::info!(vault = %dir.display(), interval_s = interval.as_secs(), "daemon started");
    loop {
        let (c, d, s) = (ctx.clone(), dir.clone(), stop.clone());
        let mut task = tokio::task::spawn_blocking(move || {
            let stopped = || s.load(Ordering::Relaxed);
            let vault = open_for_pass(&d, &stopped)?;
            let report = pass(&c, &vault, rate_limit, threads, &stopped);
            drop(vault);
            replicate_after_pass(&c, &d, &stopped);
            report
        });
        let signalled = tokio::select! {
            r = &mut task => { log_pass(r); false }
            _ = term.recv() => true,
            _ = int.recv() => true,
        };
        if signalled {
            tracing::info!("signal received: stopping; a running transfer is abandoned safely");
            stop.store(true, Ordering::Relaxed);
            log_pass(task.await);
            break;
        }
        let signalled = tokio::select! {
            _ = tokio::time::sleep(interval) => false,
            _ = term.recv() => true,
            _ = int.recv() => true,
        };
        if signalled {
            break;
        }
    }
    // The live restores' watch and its resumes stop too.
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || live.join()).await;
    tracing::info!("daemon stopped");
    Ok(())
}

/// Opens the vault for a pass, waiting up to [`PASS_LOCK_WAIT`] for
/// another writer, but giving up at once when the daemon is told to stop.
fn open_for_pass(dir: &Path, stopped: &dyn Fn() -> bool) -> anyhow::Result<Vault> {
    let deadline = std::time::Instant::now() + PASS_LOCK_WAIT;
    loop {
        match Vault::open_wait(dir, Access::Write, Duration::from_millis(500)) {
            Err(StoreError::VaultLocked { .. })
                if !stopped() && std::time::Instant::now() < deadline => {}
            r => return r.with_context(|| format!("cannot open vault {}", dir.display())),
        }
    }
}

/// GRS: after each pass, the secondary catches up (without the writer
/// lock, so backups are not held up; a stop leaves it consistent).
fn replicate_after_pass(ctx: &Ctx, dir: &Path, stopped: &dyn Fn() -> bool) {
    let Ok(vault) = Vault::open_with(dir, Access::ReadOnly, &ctx.open_options()) else {
        return;
    };
    if vault.config().secondary.is_none() || stopped() {
        return;
    }
    let clock = ctx.clock.clone();
    match coffre_engine::store::maintenance::replicate::replicate(&vault, &|| clock.now(), stopped)
    {
        Ok(r) => tracing::info!(
            secondary = %r.secondary.display(),
            bytes = r.bytes_copied,
            points = r.points_replicated,
            interrupted = r.interrupted,
            "replicated"
        ),
        Err(e) => tracing::error!(error = %e, "replication failed; the next pass retries"),
    }
}

fn log_pass(
    r: Result<anyhow::Result<coffre_engine::scheduler::PassReport>, tokio::task::JoinError>,
) {
    match r {
        Ok(Ok(report)) => {
            for b in &report.backups {
                tracing::info!(item = %b.item, job = %b.job, status = %b.status, error = b.error.as_deref().unwrap_or(""), "backup");
            }
            tracing::info!(
                backups = report.backups.len(),
                expired = report.prune.expired.len(),
                gc_chunks = report.gc.chunks_removed,
                "pass done"
            );
        }
        Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "pass failed"),
        Err(e) => tracing::error!(error = %e, "pass panicked"),
    }
}
