//! `export`: one point (or every point of an item) served read-only over
//! NBD, on a Unix socket or a TCP address, until a signal or the idle
//! timeout.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use coffre_engine::access::serve::serve_points;
use coffre_engine::access::{AccessOptions, PointImage, Served};
use coffre_engine::nbd::listen::{Listener, Stopped};
use coffre_engine::nbd::wire::Activity;
use coffre_engine::store::Access;
use serde::Serialize;

use crate::args::{FromTier, PointsArg};
use crate::ctx::{Ctx, open};
use crate::output;

/// What `export` was asked.
pub struct ExportArgs {
    pub points: PointsArg,
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    pub name: Option<String>,
    pub idle_timeout: Option<u64>,
}

/// The tier `export`, `mount` and `restore --live` read (`None`: a
/// point's snapshot while it has one, else the vault; `--from secondary`
/// is the vault of the secondary copy).
pub fn served_from(from: Option<FromTier>) -> Option<Served> {
    match from {
        Some(FromTier::Snapshot) => Some(Served::Snapshot),
        Some(FromTier::Vault | FromTier::Secondary) => Some(Served::Vault),
        None => None,
    }
}

/// How `export` and `mount` read the points they serve: the cache size
/// and the tier asked for.
pub fn access_options(points: &PointsArg) -> AccessOptions {
    AccessOptions {
        cache_bytes: points.cache,
        from: served_from(points.from),
        ..AccessOptions::default()
    }
}

/// The points `export` or `mount` (`what`) serves, opened for reading in
/// place: `point` of `item`, or with `all` every point of it.
pub fn open_points<'v>(
    vault: &'v coffre_engine::store::Vault,
    dir: &Path,
    asked: &PointsArg,
    opts: &AccessOptions,
    what: &str,
) -> anyhow::Result<Vec<PointImage<'v>>> {
    let (item, point) = (asked.item.as_str(), asked.point.as_str());
    let points = if asked.all {
        let all = coffre_engine::points::list_points(vault, item)
            .with_context(|| format!("vault {}", dir.display()))?;
        if all.is_empty() {
            anyhow::bail!("item {item:?} has no points to {what}");
        }
        all
    } else {
        vec![
            coffre_engine::points::select_point(vault, item, point)
                .with_context(|| format!("vault {}", dir.display()))?,
        ]
    };
    points
        .iter()
        .map(|p| {
            PointImage::open(vault, p, opts).with_context(|| {
                format!("cannot open point {} of item {} for {what}", p.id, p.item)
            })
        })
        .collect()
}

/// `ADDR:PORT`, or a port alone (loopback).
fn parse_listen(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse::<SocketAddr>().with_context(|| {
        format!("--listen {s:?} is not ADDR:PORT (e.g. 127.0.0.1:10809) or a port")
    })
}

#[derive(Serialize)]
struct ExportView {
    name: String,
    point: String,
    item: String,
    size: u64,
    from: Served,
    uri: String,
}

pub fn run(ctx: &Ctx, dir: &Path, args: ExportArgs) -> anyhow::Result<ExitCode> {
    // Watched before anything listens: a signal from then on is a clean
    // stop (and the socket is removed).
    let stop = crate::signals::stop_flag()?;
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let images = open_points(
        &vault,
        dir,
        &args.points,
        &access_options(&args.points),
        "export",
    )?;
    let names: Vec<String> = images
        .iter()
        .map(|i| match (&args.name, args.points.all) {
            (Some(n), false) => n.clone(),
            (None, false) => args.points.item.clone(),
            (_, true) => i.point().id.clone(),
        })
        .collect();
    let listener = match (&args.socket, &args.listen) {
        (Some(path), _) => Listener::unix(path)?,
        (None, Some(l)) => Listener::tcp(parse_listen(l)?)?,
        (None, None) => anyhow::bail!("give --socket PATH or --listen ADDR:PORT"),
    };
    let uri = |name: &str| match &args.socket {
        Some(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        None => format!("nbd://{}/{name}", listener.describe()),
    };
    let views: Vec<ExportView> = images
        .iter()
        .zip(&names)
        .map(|(i, n)| ExportView {
            name: n.clone(),
            point: i.point().id.clone(),
            item: i.point().item.clone(),
            size: i.size(),
            from: i.served(),
            uri: uri(n),
        })
        .collect();
    output::emit(ctx.fmt, &views, |vs| {
        let mut out = String::new();
        for v in vs {
            out.push_str(&format!(
                "exporting point {} of item {} ({} bytes, from the {}) read-only at {}\n",
                v.point,
                v.item,
                v.size,
                v.from.name(),
                v.uri
            ));
        }
        out
    })?;
    std::io::stdout().flush().ok();
    let activity = Activity::default();
    let stopped = serve_points(
        &listener,
        &images,
        &names,
        &stop,
        args.idle_timeout.map(Duration::from_secs),
        &activity,
    )?;
    drop(listener);
    let failed = activity.failed_reads.load(Ordering::Relaxed);
    eprintln!(
        "export stopped ({}): {} requests, {} bytes read, {} failed reads",
        match stopped {
            Stopped::Asked => "signal",
            Stopped::Idle => "idle timeout",
        },
        activity.requests.load(Ordering::Relaxed),
        activity.bytes_read.load(Ordering::Relaxed),
        failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::DAMAGED)
    })
}
