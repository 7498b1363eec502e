//! [`Renewer`]: the thread that keeps a lease or a GC hold alive.

use std::sync::Arc;
use std::time::Duration;

/// A thread that calls `renew` every `period` until it is stopped (by
/// [`Renewer::stop`] or on drop) or `renew` returns false. It sleeps in
/// short steps, so stopping it takes at most one step and never waits for
/// a renewal that is not under way.
pub(super) struct Renewer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Renewer {
    pub(super) fn spawn(
        name: &str,
        period: Duration,
        mut renew: impl FnMut() -> bool + Send + 'static,
    ) -> std::io::Result<Renewer> {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let step = Duration::from_millis(50);
                loop {
                    let mut slept = Duration::ZERO;
                    while slept < period {
                        if stopped.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(step);
                        slept += step;
                    }
                    if stopped.load(Ordering::Relaxed) || !renew() {
                        return;
                    }
                }
            })?;
        Ok(Renewer {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub(super) fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop();
    }
}
