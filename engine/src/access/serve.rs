//! Points served over NBD: each [`PointImage`] an export, its read-ahead
//! threads running beside the accept loop, everything stopped together
//! (`coffre export`, and the export behind `restore --live`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use coffre_snapshotter::nbd::listen::{Listener, ServeOptions, Stopped, serve};
use coffre_snapshotter::nbd::wire::{Activity, Served as Export};

use super::PointImage;
use crate::error::Result;

/// Read-ahead threads per export.
const READ_AHEAD_THREADS: usize = 2;
/// Threads answering one connection's reads.
const WORKERS: usize = 4;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// Serves `images` on `listener`, named `names`, until `stop` is set or
/// no client connected for `idle_timeout`.
pub fn serve_points(
    listener: &Listener,
    images: &[PointImage<'_>],
    names: &[String],
    stop: &AtomicBool,
    idle_timeout: Option<Duration>,
    activity: &Activity,
) -> Result<Stopped> {
    let exports: Vec<Export<'_>> = images
        .iter()
        .zip(names)
        .map(|(i, n)| Export {
            name: n.clone(),
            description: format!("coffre: item {} point {}", i.point().item, i.point().id),
            data: i,
        })
        .collect();
    let workers_stop = AtomicBool::new(false);
    let stopped = std::thread::scope(|scope| {
        for image in images {
            for _ in 0..READ_AHEAD_THREADS {
                let workers_stop = &workers_stop;
                scope.spawn(move || image.read_ahead_worker(workers_stop));
            }
        }
        let result = serve(
            listener,
            &exports,
            &ServeOptions {
                stop,
                idle_timeout,
                workers: WORKERS,
                max_connections: MAX_CONNECTIONS,
            },
            activity,
        );
        workers_stop.store(true, Ordering::Relaxed);
        for image in images {
            image.wake();
        }
        result
    })?;
    Ok(stopped)
}
