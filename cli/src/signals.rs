//! A stop flag that SIGTERM, SIGINT and SIGHUP set, for commands that
//! serve until told to stop (`export`, `mount`, `restore --live`): a
//! thread of its own waits for the signals on a small tokio runtime; the
//! command's loops look at the flag. A second signal ends the process at
//! once (exit 130), for a stop that hangs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

/// The flag, set at the first SIGTERM, SIGINT or SIGHUP.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    watch(true)
}

/// The flag, set at the first SIGTERM or SIGINT; SIGHUP (a terminal or an
/// SSH session that went) is ignored: `restore --live`, whose export a
/// running VM reads, must not stop because its terminal did.
pub fn stop_flag_keep_on_hangup() -> anyhow::Result<Arc<AtomicBool>> {
    watch(false)
}

fn watch(hangup_stops: bool) -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let flag = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    // The signal handlers are installed now, before the command serves.
    let (mut term, mut int, mut hup) = rt.block_on(async {
        anyhow::Ok((
            signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
        ))
    })?;
    let set = flag.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut next = || {
                rt.block_on(async {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                        _ = hup.recv(), if hangup_stops => {}
                    }
                })
            };
            next();
            set.store(true, Ordering::Relaxed);
            next();
            eprintln!("coffre: a second signal: stopping at once");
            std::process::exit(130);
        })
        .context("cannot start the signal watcher")?;
    Ok(flag)
}
