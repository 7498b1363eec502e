//! Live restore (`coffre restore --live`): a VM runs on a point from the
//! first second while QEMU copies the point into its new disk.
//!
//! This process serves the point over NBD on a private Unix socket
//! ([`LiveNames::socket`]: `<runtime dir>/live/<16 hex>.sock`, named after
//! the target), on threads of its own ([`serve_points`]); the target is a
//! qcow2 whose backing is that export; QEMU is given the target as a
//! device's drive and runs `block-stream` into it (the QEMU side is
//! [`coffre_snapshotter::vm::stream`]'s). This module follows the job,
//! reporting its progress, until it completes: QEMU drops the backing,
//! the backing nodes go, the export stops.
//!
//! A run killed mid-stream loses nothing: the guest's writes go to the
//! target, never to coffre, and QEMU's NBD client waits
//! `reconnect_delay` seconds for the export to come back. A resumed run
//! ([`LiveOptions::resume`]) reads the point and the socket back from the
//! target's header, serves them again, does each step not yet done, and
//! follows the job to its end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coffre_snapshotter::nbd::listen::Listener;
use coffre_snapshotter::nbd::wire::Activity;
use coffre_snapshotter::vm::monitor_lock::MonitorLock;
use coffre_snapshotter::vm::qmp::Qmp;
use coffre_snapshotter::vm::stream::{
    self, Attached, DeviceChoice, Job, LiveNames, backing_json, export_name,
};
use coffre_vault_store::Vault;

use super::serve::serve_points;
use super::{AccessOptions, PointImage, Served};
use crate::error::{EngineError, Result};
use crate::points::{PointEntry, select_point};

/// Default seconds QEMU waits for a gone export before the reads of
/// blocks not yet streamed fail.
pub const DEFAULT_RECONNECT_DELAY: u64 = 300;
/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// The window the shown rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// What a live restore is asked.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// The qcow2 target (new, or with `resume` the one an earlier run
    /// made).
    pub target: PathBuf,
    /// The VM's QEMU monitor socket.
    pub qmp: PathBuf,
    /// The device given the target.
    pub device: DeviceChoice,
    /// Carry on an interrupted live restore of `target`.
    pub resume: bool,
    /// Most bytes a second the stream copies (`None`: no limit for a new
    /// job, and a running job's left as it is).
    pub speed: Option<u64>,
    /// Seconds QEMU waits for a gone export.
    pub reconnect_delay: u64,
    /// Permissions of the new target.
    pub mode: u32,
    /// How the point is read.
    pub access: AccessOptions,
    /// How often the job is looked at.
    pub poll: Duration,
}

/// Where a live restore tells what it does.
pub trait LiveReport: Sync {
    /// A step done or begun (one line).
    fn step(&self, line: &str);
    /// The stream's progress: bytes done of `total`, at `rate` bytes a
    /// second lately.
    fn stream(&self, done: u64, total: u64, rate: u64);
}

/// What a live restore did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LiveSummary {
    /// The target.
    pub target: PathBuf,
    /// The item.
    pub item: String,
    /// The point (empty when a resumed run found the stream complete: the
    /// target no longer names it).
    pub point: String,
    /// The disk's size (0 then).
    pub size: u64,
    /// The tier that served (`None`: the stream had completed before this
    /// run).
    pub from: Option<Served>,
    /// The export's socket.
    pub socket: PathBuf,
    /// True for a resumed run.
    pub resumed: bool,
    /// How the device got the target: `handed` (an existing device),
    /// `added` (a new one), `already` (a resumed run found it so).
    pub device: String,
    /// True when this run started the VM (it waited, `-S`).
    pub started_vm: bool,
    /// Bytes the job copied while this run followed it.
    pub streamed: u64,
    /// Seconds this run followed the job.
    pub seconds: f64,
    /// NBD requests the export answered, and bytes it read.
    pub requests: u64,
    /// Bytes the export read.
    pub bytes_read: u64,
}

fn fail(target: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::LiveRestore {
        target: target.to_path_buf(),
        reason: reason.into(),
    }
}

/// The target's absolute path, its folder resolved (the file itself is
/// new unless `resume`).
fn canonical_target(target: &Path, resume: bool) -> Result<PathBuf> {
    if resume {
        use std::os::unix::fs::MetadataExt;
        let path = std::fs::canonicalize(target).map_err(|e| {
            fail(
                target,
                format!("cannot resume: {e} (without --resume a new target is made)"),
            )
        })?;
        // A target coffre made: a regular file of this user's, writable by
        // no one else.
        let m = std::fs::metadata(&path).map_err(|e| fail(&path, e.to_string()))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !m.file_type().is_file() || m.uid() != me || m.mode() & 0o022 != 0 {
            return Err(fail(
                &path,
                "cannot resume: not a regular file of this user's that only its owner may write (a live restore's target is created so)",
            ));
        }
        return Ok(path);
    }
    let name = target
        .file_name()
        .ok_or_else(|| fail(target, "not a file name"))?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir =
        std::fs::canonicalize(parent).map_err(|e| fail(target, format!("its folder: {e}")))?;
    let path = dir.join(name);
    if std::fs::symlink_metadata(&path).is_ok() {
        return Err(fail(
            &path,
            "it already exists; if it is an interrupted live restore's target, run the same command with --resume; else remove it or choose another path",
        ));
    }
    Ok(path)
}

/// Restores point `point` (`None`: the latest; with `resume`, the one
/// the target was made from) of `item` into a running VM's disk.
pub fn restore_live(
    vault: &Vault,
    item: &str,
    point: Option<&str>,
    opts: &LiveOptions,
    report: &dyn LiveReport,
    stop: &AtomicBool,
) -> Result<LiveSummary> {
    let target = canonical_target(&opts.target, opts.resume)?;
    let names = LiveNames::of(&target);
    let socket = names
        .socket()
        .map_err(|e| fail(&target, format!("the export's socket: {e}")))?;
    if opts.resume && std::fs::metadata(&target).is_ok_and(|m| m.len() == 0) {
        return Err(fail(
            &target,
            "it is empty: a run was stopped as it created it, before QEMU had it; remove it and run the command without --resume",
        ));
    }
    let entry = if opts.resume {
        match stream::read_backing(&target)? {
            None => return finish_only(item, opts, &target, &names, &socket, report),
            Some(b) => {
                let backing = stream::parse_backing(&b).ok_or_else(|| {
                    fail(&target, format!("its backing {b:?} is not a coffre export: it is no live restore's target"))
                })?;
                if backing.socket != socket {
                    return Err(fail(
                        &target,
                        format!(
                            "its backing is served on {}, not on {} where this host's coffre serves it (was it moved, or made by another user?)",
                            backing.socket.display(),
                            socket.display()
                        ),
                    ));
                }
                let entry = select_point(vault, item, &backing.point_id).map_err(|e| {
                    fail(
                        &target,
                        format!(
                            "it was made from point {} of item {item:?}: {e}",
                            backing.point_id
                        ),
                    )
                })?;
                if let Some(p) = point
                    && p != "latest"
                    && !entry.id.starts_with(p)
                {
                    return Err(fail(
                        &target,
                        format!(
                            "it was made from point {}, not {p}: resume it without --point",
                            entry.id
                        ),
                    ));
                }
                entry
            }
        }
    } else {
        select_point(vault, item, point.unwrap_or("latest"))?
    };
    let image = PointImage::open(vault, &entry, &opts.access)?;
    let listener = Listener::unix(&socket).map_err(|e| {
        fail(
            &target,
            format!("{e} (is another coffre serving this target's restore?)"),
        )
    })?;
    let export = export_name(&entry.id);
    let export_stop = AtomicBool::new(false);
    let activity = Activity::default();
    let images = std::slice::from_ref(&image);
    let export_names = std::slice::from_ref(&export);
    let outcome = std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            serve_points(
                &listener,
                images,
                export_names,
                &export_stop,
                None,
                &activity,
            )
        });
        let run = Run {
            opts,
            target: &target,
            names: &names,
            socket: &socket,
            export: &export,
            entry: &entry,
            report,
            stop,
            activity: &activity,
        };
        let outcome = run.drive();
        export_stop.store(true, Ordering::Relaxed);
        let served = server.join();
        match (outcome, served) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(_)) => Err(fail(&target, "the export's thread panicked")),
            (Ok(_), Ok(Err(e))) => Err(e),
            (Ok(o), Ok(Ok(_))) => Ok(o),
        }
    })?;
    Ok(LiveSummary {
        target: target.clone(),
        item: entry.item.clone(),
        point: entry.id.clone(),
        size: entry.image_size,
        from: Some(image.served()),
        socket,
        resumed: opts.resume,
        device: outcome.device,
        started_vm: outcome.started_vm,
        streamed: outcome.streamed,
        seconds: outcome.seconds,
        requests: activity.requests.load(Ordering::Relaxed),
        bytes_read: activity.bytes_read.load(Ordering::Relaxed),
    })
}

/// A resumed run whose target no longer has a backing: the stream had
/// completed; what the killed run left in QEMU (the ended job, the
/// backing nodes) goes. The target no longer names its point.
fn finish_only(
    item: &str,
    opts: &LiveOptions,
    target: &Path,
    names: &LiveNames,
    socket: &Path,
    report: &dyn LiveReport,
) -> Result<LiveSummary> {
    let _lock = MonitorLock::acquire(
        &opts.qmp,
        &format!(
            "pid {}, live restore into {}",
            std::process::id(),
            target.display()
        ),
    )?;
    let mut qmp = Qmp::connect(&opts.qmp, QMP_TIMEOUT)?;
    if let Job::Concluded { error: Some(e) } = stream::job(&mut qmp, names)? {
        return Err(fail(
            target,
            format!(
                "QEMU's stream job failed ({e}) yet the target has no backing: check it with qemu-img check"
            ),
        ));
    }
    stream::finish(&mut qmp, names)?;
    report.step("the stream had completed: the target needs coffre no more");
    Ok(LiveSummary {
        target: target.to_path_buf(),
        item: item.to_string(),
        point: String::new(),
        size: 0,
        from: None,
        socket: socket.to_path_buf(),
        resumed: true,
        device: "already".into(),
        started_vm: false,
        streamed: 0,
        seconds: 0.0,
        requests: 0,
        bytes_read: 0,
    })
}

/// One run's QEMU side, beside the export.
struct Run<'a> {
    opts: &'a LiveOptions,
    target: &'a Path,
    names: &'a LiveNames,
    socket: &'a Path,
    export: &'a str,
    entry: &'a PointEntry,
    report: &'a dyn LiveReport,
    stop: &'a AtomicBool,
    activity: &'a Activity,
}

/// What the QEMU side did.
struct Outcome {
    device: String,
    started_vm: bool,
    streamed: u64,
    seconds: f64,
}

impl Run<'_> {
    fn fail(&self, reason: impl Into<String>) -> EngineError {
        fail(self.target, reason)
    }

    fn drive(&self) -> Result<Outcome> {
        let opts = self.opts;
        let backing = backing_json(self.socket, self.export, opts.reconnect_delay);
        let created = !opts.resume;
        if created {
            stream::create_overlay(self.target, &backing)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                self.target,
                std::fs::Permissions::from_mode(opts.mode & 0o7777),
            )
            .map_err(|e| self.fail(format!("cannot set its permissions: {e}")))?;
            self.report.step(&format!(
                "created {} (qcow2, backing: point {} of item {} over NBD at {})",
                self.target.display(),
                self.entry.id,
                self.entry.item,
                self.socket.display()
            ));
        }
        // One coffre run per monitor: a live backup of the same VM is
        // refused at once instead of waiting for the monitor.
        let holder = format!(
            "pid {}, live restore into {}",
            std::process::id(),
            self.target.display()
        );
        let connected = MonitorLock::acquire(&opts.qmp, &holder)
            .and_then(|lock| Ok((lock, Qmp::connect(&opts.qmp, QMP_TIMEOUT)?)));
        let (_lock, mut qmp) = match connected {
            Ok(c) => c,
            Err(e) => {
                if created {
                    // QEMU never heard of the target: it goes, so the same
                    // command can simply be run again.
                    let _ = std::fs::remove_file(self.target);
                }
                return Err(e.into());
            }
        };
        // A new target never takes over nodes an earlier run left in
        // QEMU: they may hold another file (a removed target) or another
        // point's export.
        if created {
            let mut leftover = None;
            for n in [&self.names.target, &self.names.backing] {
                if stream::node_exists(&mut qmp, n)? {
                    leftover = Some(n.clone());
                }
            }
            if let Some(n) = leftover {
                let _ = std::fs::remove_file(self.target);
                return Err(self.fail(format!(
                    "QEMU still has node {n} of an earlier live restore into this path: resume that one with --resume (if its target is still there), or remove the node (blockdev-del) first"
                )));
            }
        }
        let attached = stream::attach(
            &mut qmp,
            self.names,
            self.target,
            self.socket,
            self.export,
            opts.reconnect_delay,
            &opts.device,
        );
        let attached = match attached {
            Ok(a) => a,
            Err(e) => {
                // A new target no device took goes with its nodes, so the
                // same command can simply be run again; if QEMU cannot say
                // (its monitor gone), it stays, for --resume.
                if created
                    && matches!(
                        stream::attached_device(&mut qmp, &self.names.target),
                        Ok(None)
                    )
                {
                    let deleted = qmp
                        .execute(
                            "blockdev-del",
                            Some(serde_json::json!({ "node-name": self.names.target })),
                        )
                        .is_ok();
                    let _ = stream::finish(&mut qmp, self.names);
                    // Only a file QEMU no longer holds is removed.
                    if deleted
                        && matches!(stream::node_exists(&mut qmp, &self.names.target), Ok(false))
                    {
                        let _ = std::fs::remove_file(self.target);
                    }
                }
                return Err(e.into());
            }
        };
        self.report.step(&match attached {
            Attached::Handed => {
                format!("device {} now reads and writes the target", opts.device.id)
            }
            Attached::Added => format!(
                "device {} (virtio-blk-pci) added with the target as its disk",
                opts.device.id
            ),
            Attached::Already => format!("the target is device {}'s disk already", opts.device.id),
        });
        self.report.step(&format!(
            "if coffre stops before the stream completes, the VM's reads of blocks not yet copied wait up to {} s: run the same command with --resume (guest writes are never lost: they go to the target)",
            opts.reconnect_delay
        ));
        let started_vm = stream::start_if_waiting(&mut qmp)?;
        if started_vm {
            self.report.step("the VM was waiting (-S): started");
        }
        match stream::job(&mut qmp, self.names)? {
            Job::Absent if stream::has_backing(&mut qmp, self.names)? => {
                stream::start_stream(&mut qmp, self.names, opts.speed.unwrap_or(0))?;
                self.report.step(&format!(
                    "QEMU's block-stream job {} started",
                    self.names.job
                ));
            }
            Job::Absent => {}
            Job::Concluded { error: Some(e) } => {
                self.report.step(&format!(
                    "the earlier stream job failed ({e}): starting it again"
                ));
                qmp.execute(
                    "job-dismiss",
                    Some(serde_json::json!({ "id": self.names.job })),
                )?;
                stream::start_stream(&mut qmp, self.names, opts.speed.unwrap_or(0))?;
            }
            Job::Concluded { error: None } => {}
            Job::Running { .. } => {
                self.report.step(&format!(
                    "following QEMU's block-stream job {}",
                    self.names.job
                ));
                if let Some(speed) = opts.speed {
                    stream::set_speed(&mut qmp, self.names, speed)?;
                }
            }
        }
        let (streamed, seconds) = self.follow(&mut qmp)?;
        stream::finish(&mut qmp, self.names)?;
        if let Some(b) = stream::read_backing(self.target)? {
            return Err(self.fail(format!(
                "the job completed but the target still names a backing ({b})"
            )));
        }
        self.report
            .step("stream complete: the target has no backing file and needs coffre no more");
        Ok(Outcome {
            device: match attached {
                Attached::Handed => "handed",
                Attached::Added => "added",
                Attached::Already => "already",
            }
            .into(),
            started_vm,
            streamed,
            seconds,
        })
    }

    /// Follows the job to its end: bytes it copied, seconds.
    fn follow(&self, qmp: &mut Qmp) -> Result<(u64, f64)> {
        let began = Instant::now();
        let mut first: Option<u64> = None;
        // (when, offset) samples over the rate window.
        let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
        let mut failed_seen = self.activity.failed_reads.load(Ordering::Relaxed);
        // Set once the job paused on a damaged block: the export keeps
        // serving the VM (its reads of every other block go on), the job
        // stays paused, and this run waits for a signal.
        let mut parked = false;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(self.fail(format!(
                    "interrupted: the stream is not complete and the VM's reads of blocks not yet copied wait up to {} s for the export: run the same command with --resume",
                    self.opts.reconnect_delay
                )));
            }
            match stream::job(qmp, self.names)? {
                Job::Absent => {
                    if stream::has_backing(qmp, self.names)? {
                        return Err(self.fail("QEMU's stream job is gone (cancelled?) and the target still reads through coffre's export: run the same command with --resume to start it again"));
                    }
                    break;
                }
                Job::Concluded { error: Some(e) } => {
                    return Err(self.fail(format!("QEMU's stream job failed: {e}; the target still reads through coffre's export: run the same command with --resume to start it again")));
                }
                Job::Concluded { error: None } => {
                    break;
                }
                Job::Running {
                    offset,
                    len,
                    stopped_on_error,
                } => {
                    if stopped_on_error && !parked {
                        let failed = self.activity.failed_reads.load(Ordering::Relaxed);
                        if failed > failed_seen {
                            parked = true;
                            self.report.step(&format!(
                                "WARNING: the point has damaged blocks ({failed} reads failed; the log names them): QEMU's job {} stays paused and the export keeps serving the VM's reads of every other block. Mend the vault (`coffre verify --read-data --repair`), then stop this run (SIGTERM) and run the same command with --resume",
                                self.names.job
                            ));
                        }
                    }
                    if stopped_on_error && !parked {
                        let failed = self.activity.failed_reads.load(Ordering::Relaxed);
                        failed_seen = failed;
                        self.report.step(
                            "the stream paused on a read error (the export was away): resumed",
                        );
                        stream::resume_job(qmp, self.names)?;
                    }
                    let now = Instant::now();
                    first.get_or_insert(offset);
                    samples.push_back((now, offset));
                    while samples
                        .front()
                        .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
                    {
                        samples.pop_front();
                    }
                    let rate = match samples.front() {
                        Some((t, o)) if now > *t => {
                            let dt = now.duration_since(*t).as_secs_f64();
                            (offset.saturating_sub(*o) as f64 / dt) as u64
                        }
                        _ => 0,
                    };
                    self.report.stream(offset, len, rate);
                }
            }
            // The poll interval, in slices, so a signal is seen at once.
            let until = Instant::now() + self.opts.poll;
            while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50).min(self.opts.poll));
            }
        }
        let size = self.entry.image_size;
        let streamed = size.saturating_sub(first.unwrap_or(size));
        let seconds = began.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 {
            (streamed as f64 / seconds) as u64
        } else {
            0
        };
        self.report.stream(size, size, rate);
        Ok((streamed, seconds))
    }
}
