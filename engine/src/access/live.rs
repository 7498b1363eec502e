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
//! The VM is reached through its QEMU monitor socket ([`LiveVm::Qmp`]),
//! or, for a libvirt domain ([`LiveVm::Domain`]), through libvirt's QMP
//! passthrough (which taints the domain): the same steps either way, over
//! a [`Monitor`]. A domain's device is named by its disk's target (`vdb`,
//! resolved to QEMU's device id from the domain's XML); its QEMU runs as
//! another user, so the export listens in a folder of its own that user
//! can pass (`$TMPDIR/coffre-libvirt-live-<16 hex>/nbd.sock`, the socket
//! handed to that user; [`workdir::live`]) and the new target is handed
//! to it too.
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
use coffre_snapshotter::vm::libvirt::domain::Domain;
use coffre_snapshotter::vm::libvirt::lock::DomainLock;
use coffre_snapshotter::vm::libvirt::monitor::DomainMonitor;
use coffre_snapshotter::vm::libvirt::workdir;
use coffre_snapshotter::vm::monitor::Monitor;
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

/// The VM a live restore gives its target to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LiveVm {
    /// A QEMU monitor socket (`-qmp unix:SOCKET,server=on,wait=off`); the
    /// device is QEMU's device id.
    Qmp(PathBuf),
    /// A running libvirt domain, driven through libvirt's QMP passthrough
    /// (which taints it); the device is one of its disks' target (`vdb`).
    Domain {
        /// The domain's name.
        name: String,
        /// The connection URI (`None`: libvirt's default).
        connect: Option<String>,
    },
}

/// What a live restore is asked.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// The qcow2 target (new, or with `resume` the one an earlier run
    /// made).
    pub target: PathBuf,
    /// The VM.
    pub vm: LiveVm,
    /// The device given the target (for a domain: the target of one of
    /// its disks, and no bus).
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
        // (As root, a target given to a libvirt domain's QEMU user.)
        if !m.file_type().is_file() || (m.uid() != me && me != 0) || m.mode() & 0o022 != 0 {
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
    let place = Place::find(opts, &target, &names)?;
    let socket = place.socket.clone();
    if opts.resume && std::fs::metadata(&target).is_ok_and(|m| m.len() == 0) {
        return Err(fail(
            &target,
            "it is empty: a run was stopped as it created it, before QEMU had it; remove it and run the command without --resume",
        ));
    }
    let entry = if opts.resume {
        match stream::read_backing(&target)? {
            None => return finish_only(item, &place, &target, &names, report),
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
    workdir::hand_to_qemu(&socket, place.qemu_user)?;
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
            place: &place,
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
    });
    drop(listener);
    // The export's folder goes once the stream is complete, or when the
    // run failed before QEMU had the target (it was removed): a resumed
    // run needs it only while the target names it.
    if outcome.is_ok() || std::fs::symlink_metadata(&target).is_err() {
        place.remove_folder(report);
    }
    let outcome = outcome?;
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
    place: &Place,
    target: &Path,
    names: &LiveNames,
    report: &dyn LiveReport,
) -> Result<LiveSummary> {
    let (_lock, mut vm) = place.connect(target)?;
    let qmp = vm.as_mut();
    if let Job::Concluded { error: Some(e) } = stream::job(qmp, names)? {
        return Err(fail(
            target,
            format!(
                "QEMU's stream job failed ({e}) yet the target has no backing: check it with qemu-img check"
            ),
        ));
    }
    stream::finish(qmp, names)?;
    place.remove_folder(report);
    report.step("the stream had completed: the target needs coffre no more");
    Ok(LiveSummary {
        target: target.to_path_buf(),
        item: item.to_string(),
        point: String::new(),
        size: 0,
        from: None,
        socket: place.socket.clone(),
        resumed: true,
        device: "already".into(),
        started_vm: false,
        streamed: 0,
        seconds: 0.0,
        requests: 0,
        bytes_read: 0,
    })
}

/// How the VM is reached.
enum Reach {
    Qmp(PathBuf),
    Domain(Domain, Option<String>),
}

/// The lock a run holds on the VM: one coffre run per monitor or domain.
enum Held {
    Monitor { _lock: MonitorLock },
    Domain { _lock: DomainLock },
}

/// The VM found: how it is reached, where the export listens, the device
/// given the target, and the user its QEMU runs as.
struct Place {
    reach: Reach,
    socket: PathBuf,
    device: DeviceChoice,
    qemu_user: Option<(u32, u32)>,
    /// A domain's live restore folder, removed once the stream is complete.
    folder: Option<PathBuf>,
}

impl Place {
    fn find(opts: &LiveOptions, target: &Path, names: &LiveNames) -> Result<Place> {
        match &opts.vm {
            LiveVm::Qmp(socket) => Ok(Place {
                reach: Reach::Qmp(socket.clone()),
                socket: names
                    .socket()
                    .map_err(|e| fail(target, format!("the export's socket: {e}")))?,
                device: opts.device.clone(),
                qemu_user: None,
                folder: None,
            }),
            LiveVm::Domain { name, connect } => {
                let domain = Domain::new(connect.as_deref(), name)?;
                let dfail = |reason: String| {
                    EngineError::from(coffre_snapshotter::SnapError::Libvirt {
                        domain: name.clone(),
                        reason,
                    })
                };
                if !domain.is_active()? {
                    return Err(dfail(
                        "it is not running: a live restore gives its disk to a running domain (`virsh start --paused` starts it waiting; coffre then lets it run)".into(),
                    ));
                }
                if opts.device.bus.is_some() {
                    return Err(dfail(
                        "--bus is for a new device behind --qmp; with --domain, --device names one of the domain's disks (vdb)".into(),
                    ));
                }
                let xml = domain.xml(false)?;
                let disk = xml
                    .disks
                    .iter()
                    .find(|d| d.target == opts.device.id)
                    .ok_or_else(|| {
                        let all: Vec<&str> = xml.disks.iter().map(|d| d.target.as_str()).collect();
                        dfail(format!(
                            "it has no disk {:?} (its disks: {})",
                            opts.device.id,
                            all.join(", ")
                        ))
                    })?;
                if disk.readonly {
                    return Err(dfail(format!(
                        "disk {} is read-only: a live restore writes to its disk",
                        disk.target
                    )));
                }
                let alias = disk.alias.clone().ok_or_else(|| {
                    dfail(format!(
                        "libvirt does not say QEMU's device id of disk {} (no <alias>)",
                        disk.target
                    ))
                })?;
                let folder = workdir::live(&std::env::temp_dir(), &names.tag)?;
                Ok(Place {
                    socket: folder.join(workdir::SOCKET),
                    reach: Reach::Domain(domain, xml.uuid.clone()),
                    device: DeviceChoice {
                        id: alias,
                        bus: None,
                        swap_running: opts.device.swap_running,
                    },
                    qemu_user: xml.qemu_user,
                    folder: Some(folder),
                })
            }
        }
    }

    /// Takes the VM's lock (refused at once when another coffre run holds
    /// it) and reaches its monitor.
    fn connect(&self, target: &Path) -> Result<(Held, Box<dyn Monitor>)> {
        let holder = format!(
            "pid {}, live restore into {}",
            std::process::id(),
            target.display()
        );
        Ok(match &self.reach {
            Reach::Qmp(socket) => {
                let lock = MonitorLock::acquire(socket, &holder)?;
                let qmp = Qmp::connect(socket, QMP_TIMEOUT)?;
                (Held::Monitor { _lock: lock }, Box::new(qmp))
            }
            Reach::Domain(domain, uuid) => {
                let lock = DomainLock::acquire(domain, uuid.as_deref())?;
                (
                    Held::Domain { _lock: lock },
                    Box::new(DomainMonitor::new(domain.clone())),
                )
            }
        })
    }

    /// Removes a domain's live restore folder (the stream is complete); a
    /// folder that cannot go is reported, not an error.
    fn remove_folder(&self, report: &dyn LiveReport) {
        if let Some(f) = &self.folder
            && let Err(why) = workdir::remove(f, &std::env::temp_dir(), &[])
        {
            report.step(&format!("the export's folder stays: {why}"));
        }
    }

    /// The device's name for messages: a domain's disk target, or the
    /// device id.
    fn shown_device<'a>(&'a self, opts: &'a LiveOptions) -> String {
        match &self.reach {
            Reach::Qmp(_) => opts.device.id.clone(),
            Reach::Domain(d, _) => format!(
                "{} (disk {} of domain {})",
                self.device.id, opts.device.id, d.name
            ),
        }
    }
}

/// One run's QEMU side, beside the export.
struct Run<'a> {
    opts: &'a LiveOptions,
    place: &'a Place,
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
            // A domain's QEMU runs as a user of its own (libvirt's DAC
            // label): the target is handed to it, as libvirt does a disk.
            workdir::hand_to_qemu(self.target, self.place.qemu_user)?;
            self.report.step(&format!(
                "created {} (qcow2, backing: point {} of item {} over NBD at {})",
                self.target.display(),
                self.entry.id,
                self.entry.item,
                self.socket.display()
            ));
        }
        // One coffre run per monitor or domain: a live backup of the same
        // VM is refused at once instead of waiting for the monitor.
        let connected = self.place.connect(self.target);
        let (_lock, mut vm) = match connected {
            Ok(c) => c,
            Err(e) => {
                if created {
                    // QEMU never heard of the target: it goes, so the same
                    // command can simply be run again.
                    let _ = std::fs::remove_file(self.target);
                }
                return Err(e);
            }
        };
        let qmp = vm.as_mut();
        // A new target never takes over nodes an earlier run left in
        // QEMU: they may hold another file (a removed target) or another
        // point's export.
        if created {
            let mut leftover = None;
            for n in [&self.names.target, &self.names.backing] {
                if stream::node_exists(qmp, n)? {
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
            qmp,
            self.names,
            self.target,
            self.socket,
            self.export,
            opts.reconnect_delay,
            &self.place.device,
        );
        let attached = match attached {
            Ok(a) => a,
            Err(e) => {
                // A new target no device took goes with its nodes, so the
                // same command can simply be run again; if QEMU cannot say
                // (its monitor gone), it stays, for --resume.
                if created && matches!(stream::attached_device(qmp, &self.names.target), Ok(None)) {
                    let _ = qmp.execute(
                        "blockdev-del",
                        Some(serde_json::json!({ "node-name": self.names.target })),
                    );
                    let _ = stream::finish(qmp, self.names);
                    // Only a file QEMU does not hold (its node gone, or
                    // never added) is removed.
                    if matches!(stream::node_exists(qmp, &self.names.target), Ok(false)) {
                        let _ = std::fs::remove_file(self.target);
                    }
                }
                if let (Reach::Domain(..), Some((uid, _))) =
                    (&self.place.reach, self.place.qemu_user)
                    && e.to_string().contains("Permission denied")
                {
                    return Err(self.fail(format!(
                        "{e}; the domain's QEMU runs as uid {uid}: the target's folder must let that user through (as /var/lib/libvirt/images does)"
                    )));
                }
                return Err(e.into());
            }
        };
        let device = self.place.shown_device(opts);
        self.report.step(&match attached {
            Attached::Handed => {
                format!("device {device} now reads and writes the target")
            }
            Attached::Added => format!(
                "device {} (virtio-blk-pci) added with the target as its disk",
                opts.device.id
            ),
            Attached::Already => format!("the target is device {device}'s disk already"),
        });
        self.report.step(&format!(
            "if coffre stops before the stream completes, the VM's reads of blocks not yet copied wait up to {} s: run the same command with --resume (guest writes are never lost: they go to the target)",
            opts.reconnect_delay
        ));
        let started_vm = stream::start_if_waiting(qmp)?;
        if started_vm {
            self.report.step("the VM was waiting (-S): started");
        }
        match stream::job(qmp, self.names)? {
            Job::Absent if stream::has_backing(qmp, self.names)? => {
                stream::start_stream(qmp, self.names, opts.speed.unwrap_or(0))?;
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
                stream::start_stream(qmp, self.names, opts.speed.unwrap_or(0))?;
            }
            Job::Concluded { error: None } => {}
            Job::Running { .. } => {
                self.report.step(&format!(
                    "following QEMU's block-stream job {}",
                    self.names.job
                ));
                if let Some(speed) = opts.speed {
                    stream::set_speed(qmp, self.names, speed)?;
                }
            }
        }
        let (streamed, seconds) = self.follow(qmp)?;
        stream::finish(qmp, self.names)?;
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
    fn follow(&self, qmp: &mut dyn Monitor) -> Result<(u64, f64)> {
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
