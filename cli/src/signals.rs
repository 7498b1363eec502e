//! A stop flag that SIGTERM and SIGINT set, for commands that serve until
//! told to stop (`export`, `mount`, `restore --live`): a thread of its own
//! waits for the signals on a small tokio runtime; the command's loops
//! look at the flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

/// The flag, set at the first SIGTERM or SIGINT.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let flag = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    // The signal handlers are installed now, before the command serves.
    let (mut term, mut int) = rt.block_on(async {
        anyhow::Ok((
            signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        ))
    })?;
    let set = flag.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            set.store(true, Ordering::Relaxed);
        })
        .context("cannot start the signal watcher")?;
    Ok(flag)
}
