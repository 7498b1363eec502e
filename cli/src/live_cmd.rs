//! `restore --live`: a running VM's disk restored while the VM runs on it
//! (the work is `coffre_engine::access::live`'s). Steps and the stream's
//! progress go to stderr (a bar on a terminal, a line every
//! [`LINE_EVERY`] otherwise); the summary to stdout.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use coffre_engine::access::live::{
    Abandoned, LiveOptions, LiveReport, LiveSummary, abandon as abandon_live, restore_live,
};
use coffre_engine::store::Access;
use coffre_engine::store::holds::HoldsLock;
use coffre_engine::store::jobs::Operation;
use indicatif::{ProgressBar, ProgressStyle};

use crate::ctx::{Ctx, open};
use crate::output::{self, bytes};

/// How long a live restore waits for a prune that holds the holds lock.
const HOLDS_WAIT: Duration = Duration::from_secs(60);

/// How often a progress line is printed when stderr is no terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// The steps and progress, on stderr.
struct Report {
    bar: Option<ProgressBar>,
    last_line: Mutex<Option<Instant>>,
}

impl Report {
    fn new() -> Report {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>9} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message("stream");
            bar
        });
        Report {
            bar,
            last_line: Mutex::new(None),
        }
    }
}

impl LiveReport for Report {
    fn step(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(format!("restore --live: {line}")),
            None => eprintln!("restore --live: {line}"),
        }
    }

    fn stream(&self, done: u64, total: u64, rate: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LINE_EVERY) && done < total {
            return;
        }
        *last = Some(now);
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let left = match total.saturating_sub(done).checked_div(rate) {
            Some(s) if done < total => format!(", about {s} s left"),
            _ => String::new(),
        };
        let rate = if rate == 0 {
            "rate not measured yet".to_string()
        } else {
            format!("{}/s", bytes(rate))
        };
        eprintln!(
            "restore --live: streamed {} of {} ({pct:.0}%), {rate}{left}",
            bytes(done),
            bytes(total),
        );
    }
}

/// `restore --live`.
pub fn run(
    ctx: &Ctx,
    dir: &Path,
    item: &str,
    point: &str,
    opts: LiveOptions,
) -> anyhow::Result<ExitCode> {
    let report = Report::new();
    let stop = crate::signals::stop_flag_keep_on_hangup()?;
    let result = live(ctx, dir, item, Some(point), &opts, &report, &stop);
    if let Some(b) = &report.bar {
        b.finish_and_clear();
    }
    let summary = result?;
    output::emit(ctx.fmt, &summary, |s: &LiveSummary| {
        if s.from.is_none() {
            return format!(
                "live restore into {}: the stream had completed before this run; QEMU's leftovers were removed. The target needs coffre no more (no backing file)\n",
                s.target.display()
            );
        }
        let rate = if s.seconds > 0.0 {
            format!(", {}/s", bytes((s.streamed as f64 / s.seconds) as u64))
        } else {
            String::new()
        };
        format!(
            "live restore of point {} of item {} into {} complete{}: {} streamed in {:.1} s{rate}; {} read through the export in {} requests. The target needs coffre no more (no backing file); for a raw image: qemu-img convert -f qcow2 -O raw {} DISK.img\n",
            s.point,
            s.item,
            s.target.display(),
            if s.resumed { " (resumed)" } else { "" },
            bytes(s.streamed),
            s.seconds,
            bytes(s.bytes_read),
            s.requests,
            s.target.display()
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A live restore of `item` (new, or resumed) from the vault in `dir`:
/// the holds lock, the vault, the job record and the engine's run. Used
/// by `restore --live` and by `coffre daemon`'s resumes.
pub fn live(
    ctx: &Ctx,
    dir: &Path,
    item: &str,
    point: Option<&str>,
    opts: &LiveOptions,
    report: &dyn LiveReport,
    stop: &AtomicBool,
) -> anyhow::Result<LiveSummary> {
    // The holds lock before the vault is opened: a prune that deleted the
    // point has finished, or will read this run's hold (engine docs). A
    // folder that is no vault gets no lock file: opening it says why.
    if !dir
        .join(coffre_engine::store::format::config::CONFIG_FILE)
        .is_file()
    {
        open(ctx, dir, Access::ReadOnly)?;
    }
    let holds_lock = HoldsLock::acquire(
        dir,
        ctx.lock_timeout.max(HOLDS_WAIT),
        &format!("restore --live, pid {}", std::process::id()),
    )
    .with_context(|| {
        format!(
            "cannot hold the point for the live restore into {}",
            opts.target.display()
        )
    })?;
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let mut job = coffre_engine::job_record::start(
        dir,
        vault.config().keys(),
        Operation::Restore,
        Some(item),
        "restore --live",
        ctx.now(),
    );
    let result = restore_live(&vault, item, point, opts, report, stop, holds_lock);
    if let (Some(j), Ok(s)) = (job.as_mut(), &result) {
        let _ = j.update(ctx.now(), |r| r.point = Some(s.point.clone()));
    }
    coffre_engine::job_record::finish(job, "restore --live", ctx.now(), &result);
    result.with_context(|| {
        format!(
            "live restore of item {item} to {} did not complete",
            opts.target.display()
        )
    })
}

/// `restore --live --abandon`: the hold of an unfinished live restore
/// goes.
pub fn abandon(ctx: &Ctx, dir: &Path, item: &str, target: &Path) -> anyhow::Result<ExitCode> {
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let done = abandon_live(&vault, item, target).with_context(|| {
        format!(
            "cannot abandon the live restore of item {item} into {}",
            target.display()
        )
    })?;
    output::emit(ctx.fmt, &done, |a: &Abandoned| {
        match (&a.point, a.started) {
            (Some(p), Some(t)) => format!(
                "live restore of point {p} of item {item} into {} (begun {}) abandoned: the point is no longer held, prune and gc may remove it\n",
                a.target.display(),
                output::when(t)
            ),
            _ => format!(
                "live restore into {} abandoned: its damaged hold {} was removed\n",
                a.target.display(),
                a.hold.display()
            ),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}
