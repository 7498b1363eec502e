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
//!
//! **The point is held** until the target no longer needs it: before QEMU
//! is given the target, a hold naming the item, the point, the tier and
//! the target is written in the vault ([`coffre_vault_store::holds`]), so
//! prune, snapshot expiry and GC keep the point, its snapshot and their
//! chunks while the stream is unfinished, a killed run included. The
//! caller takes the vault's holds lock before it opens the vault and hands
//! it here ([`restore_live`]); it is released once the hold is written.
//! The hold goes when the stream completes and the target is durable
//! (written out by QEMU, whose caches hold the streamed clusters'
//! mappings until a flush; fsynced; its backing read again; its own
//! mapping holding every range where the point has data), when a run of
//! a new target fails before QEMU had it and the run removed the target
//! itself, or on [`abandon`]. A new run never replaces a hold: one
//! found for its (absent) target is an earlier run's that never finished,
//! whose VM may still read the point through a removed file; the run is
//! refused until the user abandons that hold. The hold names the target
//! file once it is made (inode and birth time), and every resumed run
//! carries on only in that very file (a copy reads the same backing, but
//! is not what a VM may still use); its hold names the point its target's
//! backing reads.
//!
//! **One run per target**: a [`TargetLock`] is taken before the export's
//! socket is bound, so a second run (two `--resume`s at once) fails at
//! once naming the first instead of replacing its socket.
//!
//! **A job paused on an error** that is no damaged block (the export was
//! away, QEMU's `nospace`) is resumed at once, then with a backoff
//! ([`Backoff`]: 250 ms doubling to 30 s while it keeps pausing with no
//! progress); each pause is said once, with QEMU's reason.

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
    self, Attached, DeviceChoice, Job, LiveNames, TargetLock, backing_json, export_name,
};
use coffre_vault_store::Vault;
pub use coffre_vault_store::format::live_run::LiveRun;
use coffre_vault_store::holds::{FileId, HoldRecord, HoldStore, HoldsLock};
use jiff::Timestamp;

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
/// The first wait before a job that paused again is resumed.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between two resumes of a job that keeps pausing.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

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
    /// Now (the injected clock): when a new hold says the restore began.
    pub now: Timestamp,
    /// How this restore is run again, written as its run file once its
    /// hold is (the target replaced by its canonical path), for `coffre
    /// daemon` to resume it ([`super::live_runs`]); `None`: no run file.
    pub rerun: Option<LiveRun>,
    /// An unattended resume (`coffre daemon`'s): it only serves the export
    /// again to the QEMU that still has the target on a device, and
    /// follows the job. No one decides here, so it refuses what a human
    /// `--resume` may do: a target path that is no longer canonical (a
    /// symlink on the way), one whose hold does not name this very file,
    /// a QEMU without the target (restarted: attaching it again could
    /// swap a running guest's disk), and starting a VM that waits (`-S`).
    pub unattended: bool,
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

/// An unattended resume's refusal: what needs a human to decide.
fn needs_human(target: &Path, reason: impl std::fmt::Display) -> EngineError {
    EngineError::LiveNeedsHuman {
        target: target.to_path_buf(),
        reason: format!(
            "{reason}: an unattended resume leaves this to a human: run `coffre restore --live --resume` yourself, or `--abandon` it"
        ),
    }
}

fn fail(target: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::LiveRestore {
        target: target.to_path_buf(),
        reason: reason.into(),
    }
}

/// The target's absolute path, its folder resolved (the file itself is
/// new unless `resume`): UTF-8 without control characters, as its hold
/// records it.
fn canonical_target(target: &Path, resume: bool) -> Result<PathBuf> {
    let path = resolve_target(target, resume)?;
    match path.to_str() {
        Some(p) if !p.chars().any(char::is_control) => Ok(path),
        _ => Err(fail(
            &path,
            "its path is not UTF-8 without control characters: a live restore's target must be (its hold names it); choose another path",
        )),
    }
}

fn resolve_target(target: &Path, resume: bool) -> Result<PathBuf> {
    if resume {
        use std::os::unix::fs::MetadataExt;
        let path = std::fs::canonicalize(target).map_err(|e| {
            fail(
                target,
                format!("cannot resume: {e} (without --resume a new target is made, once no unfinished live restore holds this path)"),
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
///
/// `holds_lock` is the vault's holds lock, taken by the caller *before*
/// it opened `vault` (see [`coffre_vault_store::holds`]); it is released
/// once the point's hold is written.
pub fn restore_live(
    vault: &Vault,
    item: &str,
    point: Option<&str>,
    opts: &LiveOptions,
    report: &dyn LiveReport,
    stop: &AtomicBool,
    holds_lock: HoldsLock,
) -> Result<LiveSummary> {
    let target = canonical_target(&opts.target, opts.resume)?;
    if opts.unattended && (!opts.resume || target != opts.target) {
        return Err(needs_human(
            &opts.target,
            format_args!("the target's canonical path is now {}", target.display()),
        ));
    }
    let names = LiveNames::of(&target);
    // One run per target, before anything of it is touched.
    let _target_lock = TargetLock::acquire(&target, &names)?;
    // Again under the lock: another run may have made it meanwhile.
    if !opts.resume && std::fs::symlink_metadata(&target).is_ok() {
        return Err(fail(
            &target,
            "it already exists (another run made it as this one started); if it is an interrupted live restore's target, run the same command with --resume",
        ));
    }
    let holds = HoldStore::new(vault.dir(), vault.config().keys());
    if !opts.resume {
        refuse_unfinished(&holds, &target, &names, item)?;
    }
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
            None => {
                drop(holds_lock);
                return finish_only(vault, item, &place, &target, &names, &holds, opts, report);
            }
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
    let hold = hold_point(&holds, &target, &entry, image.served(), opts, report)?;
    // The hold is written: a prune from now on reads it.
    drop(holds_lock);
    // The run file says how a human last ran it: an unattended resume
    // leaves it as it is; a run without one (--no-daemon-resume) removes
    // an earlier run's.
    match &opts.rerun {
        _ if opts.unattended => {}
        Some(run) => {
            let run = LiveRun {
                target: target.clone(),
                ..run.clone()
            };
            if let Err(e) = super::live_runs::write(&names, &run) {
                report.step(&format!(
                    "WARNING: its run file cannot be written ({e}): if this run stops, `coffre daemon` cannot resume it; run the same command with --resume"
                ));
            }
        }
        None => {
            if let Err(e) = super::live_runs::remove(&target) {
                report.step(&format!("WARNING: {e}"));
            }
        }
    }
    // Whether this run's new target is there (made, and not removed by
    // the run itself because QEMU never had it).
    let made = AtomicBool::new(false);
    let served = serve_and_drive(
        &place, &target, &names, &entry, &image, opts, report, stop, &made, &holds, &hold,
    );
    // The export's folder and the hold go once the stream is complete (and
    // the target durable), or when a new target's run failed and the
    // target is not there because this run never made it or removed it
    // itself: a resumed run needs them while the target names the point.
    if served.is_ok() || (!opts.resume && !made.load(Ordering::Relaxed)) {
        place.remove_folder(report);
        release_hold(&holds, &target, &entry.id, report);
    }
    let (outcome, requests, bytes_read) = served?;
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
        requests,
        bytes_read,
    })
}

/// What a stopped run's message adds when `coffre daemon` may resume it.
fn daemon_hint(opts: &LiveOptions) -> &'static str {
    if opts.rerun.is_some() {
        ", or let `coffre daemon` of this vault resume it (it does so within seconds when it runs)"
    } else {
        ""
    }
}

/// Refuses a new run (its target absent, checked under the target lock)
/// into a path whose hold exists: an earlier run's that never finished,
/// whose target was removed, or never made because that run was killed
/// first. A removed file stays open in a QEMU that had it, and that VM may
/// still read the held point through its nodes; coffre cannot tell from
/// here (it may be another VM), so the hold is never replaced, nor
/// released by this run's failure: the user lets it go once no VM uses
/// it. Done before anything of the run is made (a domain's folder).
fn refuse_unfinished(
    holds: &HoldStore,
    target: &Path,
    names: &LiveNames,
    item: &str,
) -> Result<()> {
    let path = holds.path_of(target);
    let how = |item: &str| {
        format!(
            "once no VM uses it (the VM stopped, or its QEMU nodes {} and {} removed with blockdev-del), `coffre restore --live --abandon --item {item} --to {:?}` with this command's --vault (and --from) lets it go; then run this command again",
            names.target, names.backing, target
        )
    };
    match holds.get(target) {
        Ok(None) => Ok(()),
        Ok(Some(h)) => Err(fail(
            target,
            format!(
                "a live restore into this path that began {} (point {} of item {}) did not end, and its target is absent (removed, or never made); a QEMU may still run a VM on a removed target and read the point through coffre, so its hold {} stays and this run is not started: {}",
                h.started,
                h.point,
                h.item,
                path.display(),
                how(&h.item)
            ),
        )),
        Err(e) => Err(fail(
            target,
            format!(
                "its hold {} cannot be read ({e}): an earlier live restore into this path may still need the point it names, so it stays and this run is not started: {}",
                path.display(),
                how(item)
            ),
        )),
    }
}

/// Writes (or, on a resumed run, rewrites) the hold of the live restore
/// into `target` on `entry`, and returns it; a restore whose point cannot
/// be held does not start. A new run's caller has refused an unfinished
/// restore's hold first ([`refuse_unfinished`], under the same locks).
fn hold_point(
    holds: &HoldStore,
    target: &Path,
    entry: &PointEntry,
    served: Served,
    opts: &LiveOptions,
    report: &dyn LiveReport,
) -> Result<HoldRecord> {
    // A resumed run's target is there; a new run's is made later
    // (`Run::note_target_file`).
    let target_file = if opts.resume {
        Some(FileId::of(target).map_err(|e| fail(target, e.to_string()))?)
    } else {
        None
    };
    let found = holds.get(target);
    // A resumed run carries on only in the file the restore made (a copy
    // of it reads the same backing, but is not what a VM may still use).
    // Its hold names the point the target's own backing reads (the target
    // says what it needs): an earlier run's hold of the same point keeps
    // its start; one of another point, or a damaged one, is replaced.
    if let (Ok(Some(h)), Some(now)) = (&found, &target_file) {
        check_target_file(holds, target, h, now)?;
    }
    if opts.unattended {
        // The hold must name this very file and the point the target
        // reads; then it is kept as it is (nothing rewritten).
        return match &found {
            Ok(Some(h))
                if h.target_file.is_some() && h.item == entry.item && h.point == entry.id =>
            {
                Ok(h.clone())
            }
            _ => Err(needs_human(
                target,
                format_args!(
                    "its hold {} is absent, unreadable, older, or names another point than the target's backing reads",
                    holds.path_of(target).display()
                ),
            )),
        };
    }
    let found = match found {
        Ok(f) => f,
        Err(e) => {
            report.step(&format!(
                "WARNING: the hold {} could not be read ({e}): it is written again for point {} of item {}, which the target's backing reads",
                holds.path_of(target).display(),
                entry.id,
                entry.item
            ));
            None
        }
    };
    if let Some(h) = &found
        && (h.item != entry.item || h.point != entry.id)
    {
        report.step(&format!(
            "WARNING: the hold {} named point {} of item {}, but the target's backing reads point {} of item {}: it now holds that one",
            holds.path_of(target).display(),
            h.point,
            h.item,
            entry.id,
            entry.item
        ));
    }
    let earlier = found.filter(|h| h.item == entry.item && h.point == entry.id);
    let record = HoldRecord {
        item: entry.item.clone(),
        point: entry.id.clone(),
        tier: served.name().to_string(),
        target: target.to_path_buf(),
        started: earlier.as_ref().map_or(opts.now, |h| h.started),
        pid: std::process::id(),
        target_file,
    };
    holds.put(&record).map_err(|e| {
        fail(
            target,
            format!(
                "cannot write the hold that keeps point {} from prune and gc while the VM reads it ({e}): not started",
                entry.id
            ),
        )
    })?;
    if earlier.is_none() {
        report.step(&format!(
            "point {} of item {} is held ({}): prune and gc keep it until the stream completes",
            entry.id,
            entry.item,
            holds.path_of(target).display()
        ));
    }
    Ok(record)
}

/// Refuses a resumed run on a file that is not the one `hold`'s live
/// restore made, when the hold names it: that restore's target may have
/// been removed while a VM still reads the point through it, and a copy or
/// another file at the path must not end it. The hold stays as it is.
/// `now` is the file at `target`.
fn check_target_file(
    holds: &HoldStore,
    target: &Path,
    hold: &HoldRecord,
    now: &FileId,
) -> Result<()> {
    let Some(made) = hold.target_file else {
        return Ok(());
    };
    if now.same_file(&made) {
        return Ok(());
    }
    let shown = |f: &FileId| match f.born {
        Some(b) => format!("inode {} born {b}", f.ino),
        None => format!("inode {}", f.ino),
    };
    Err(fail(
        target,
        format!(
            "it is not the file the live restore of point {} made ({}, that one {}): its hold {} stays and this run is not started; if that restore's target is gone and no VM uses it, `coffre restore --live --abandon` with this command's --vault (and --from) lets the hold go",
            hold.point,
            shown(now),
            shown(&made),
            holds.path_of(target).display()
        ),
    ))
}

/// Removes the hold of the live restore into `target` (the target no
/// longer needs point `point`); one that cannot go is reported.
fn release_hold(holds: &HoldStore, target: &Path, point: &str, report: &dyn LiveReport) {
    // Nothing is left to resume: the run file goes first, so that a hold
    // that cannot go (or a kill between the two) never leaves the daemon
    // a run to repeat.
    if let Err(e) = super::live_runs::remove(target) {
        report.step(&format!("WARNING: {e}"));
    }
    match holds.remove(target) {
        Ok(true) => report.step(&format!(
            "point {point} is no longer held: the target needs it no more"
        )),
        Ok(false) => {}
        Err(e) => report.step(&format!(
            "WARNING: the hold {} stays ({e}): prune keeps point {point} until it is removed (`coffre restore --live --abandon`)",
            holds.path_of(target).display()
        )),
    }
}

/// Serves the point on the export's socket and drives QEMU's side until
/// the stream completes: the outcome, the export's requests and bytes
/// read.
#[allow(clippy::too_many_arguments)]
fn serve_and_drive(
    place: &Place,
    target: &Path,
    names: &LiveNames,
    entry: &PointEntry,
    image: &PointImage,
    opts: &LiveOptions,
    report: &dyn LiveReport,
    stop: &AtomicBool,
    made: &AtomicBool,
    holds: &HoldStore,
    hold: &HoldRecord,
) -> Result<(Outcome, u64, u64)> {
    let socket = &place.socket;
    let listener = Listener::unix(socket).map_err(|e| {
        fail(
            target,
            format!("{e} (is another coffre serving this target's restore?)"),
        )
    })?;
    workdir::hand_to_qemu(socket, place.qemu_user)?;
    let export = export_name(&entry.id);
    let export_stop = AtomicBool::new(false);
    let activity = Activity::default();
    let images = std::slice::from_ref(image);
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
            place,
            target,
            names,
            socket,
            export: &export,
            entry,
            image,
            report,
            stop,
            activity: &activity,
            made,
            holds,
            hold,
        };
        let outcome = run.drive();
        export_stop.store(true, Ordering::Relaxed);
        let served = server.join();
        match (outcome, served) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(_)) => Err(fail(target, "the export's thread panicked")),
            (Ok(_), Ok(Err(e))) => Err(e),
            (Ok(o), Ok(Ok(_))) => Ok(o),
        }
    });
    drop(listener);
    Ok((
        outcome?,
        activity.requests.load(Ordering::Relaxed),
        activity.bytes_read.load(Ordering::Relaxed),
    ))
}

/// What [`abandon`] removed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Abandoned {
    /// The target.
    pub target: PathBuf,
    /// The hold file removed.
    pub hold: PathBuf,
    /// The point no longer held (`None`: the hold could not be read).
    pub point: Option<String>,
    /// When that live restore began (`None` likewise).
    pub started: Option<Timestamp>,
}

/// Gives up the live restore into `target`: removes its hold, so prune and
/// gc may take its point again. Refused while a run of it is going, and
/// while `target` still reads a point through coffre's export (the VM's
/// disk would lose the blocks not yet streamed): finish it with
/// `--resume`, or remove the target first. A hold that cannot be read (it
/// stops prune and gc) is removed the same way.
pub fn abandon(vault: &Vault, item: &str, target: &Path) -> Result<Abandoned> {
    let target = match std::fs::canonicalize(target) {
        Ok(t) => t,
        Err(_) => canonical_target(target, false)?,
    };
    let names = LiveNames::of(&target);
    let _target_lock = TargetLock::acquire(&target, &names)?;
    let holds = HoldStore::new(vault.dir(), vault.config().keys());
    let path = holds.path_of(&target);
    let hold = match holds.get(&target) {
        Ok(Some(h)) => Some(h),
        Ok(None) => {
            // A run file of this item left without its hold goes all the
            // same: nothing is left to resume.
            let run_file = LiveNames::of(&target)
                .run_file()
                .ok()
                .filter(|f| super::live_runs::read(f).is_ok_and(|r| r.item == item));
            if run_file.is_some() {
                let _ = super::live_runs::remove(&target);
            }
            return Err(fail(
                &target,
                format!(
                    "no live restore of this vault holds a point for it ({} is absent): nothing to abandon{}",
                    path.display(),
                    match run_file {
                        Some(f) => format!(
                            " (its run file {} was removed: `coffre daemon` no longer resumes it)",
                            f.display()
                        ),
                        None => String::new(),
                    }
                ),
            ));
        }
        // Damaged: its item and point are unknown, the target says what
        // it needs.
        Err(_) => None,
    };
    if let Some(h) = &hold
        && h.item != item
    {
        return Err(fail(
            &target,
            format!("its hold is on item {:?}, not {item:?}", h.item),
        ));
    }
    if std::fs::symlink_metadata(&target).is_ok()
        && let Some(b) = stream::read_backing(&target)?
        && let Some(backing) = stream::parse_backing(&b)
    {
        return Err(fail(
            &target,
            format!(
                "it still reads the blocks not yet streamed from point {} through coffre's export: finish it with --resume; to give it up, stop the VM that uses it and remove the target first",
                backing.point_id
            ),
        ));
    }
    // Given up: `coffre daemon` must not resume it. The run file goes
    // first: a kill between the two leaves a hold without one (a human's
    // `--abandon` again), never a run file the daemon would repeat.
    super::live_runs::remove(&target).map_err(|e| fail(&target, e))?;
    holds.remove(&target)?;
    Ok(Abandoned {
        target,
        hold: path,
        point: hold.as_ref().map(|h| h.point.clone()),
        started: hold.map(|h| h.started),
    })
}

/// QEMU could not write the target out: the hold stays.
fn not_durable(target: &Path, e: impl std::fmt::Display) -> EngineError {
    fail(
        target,
        format!(
            "the stream completed but QEMU could not write the target out ({e}): its hold stays (the point is kept); run the same command with --resume"
        ),
    )
}

/// Checks that `target`'s file holds, in its own layer, every range where
/// the point has data: the stream copied them, and a guest's writes only
/// add to them (the target is attached without discard). QEMU's word that
/// it wrote the target out is not taken: this reads the file's mapping
/// (`qemu-img map`). Only then may the hold go.
fn check_streamed(image: &PointImage<'_>, target: &Path) -> Result<()> {
    let own = stream::allocated(target).map_err(|e| {
        fail(
            target,
            format!("its mapping cannot be read back ({e}), so the stream cannot be checked: its hold stays (the point is kept); run the same command with --resume"),
        )
    })?;
    let mut at = 0u64;
    for (len, kind) in image.extents(0, image.size())? {
        if kind == super::Kind::Data
            && let Some(gap) = first_gap(&own, at, len)
        {
            return Err(fail(
                target,
                format!(
                    "its file lacks blocks of point {} from byte {gap} although the stream completed (did QEMU stop before writing them out?): its hold stays and the point is kept; restore the point to a new target (this one is not resumable), or once the target is known good, `coffre restore --live --abandon` lets the hold go",
                    image.point().id
                ),
            ));
        }
        at += len;
    }
    Ok(())
}

/// The first byte of `from..from + len` that no range of `own` (sorted,
/// adjacent ones merged) covers.
fn first_gap(own: &[(u64, u64)], from: u64, len: u64) -> Option<u64> {
    let end = from.saturating_add(len);
    let i = own.partition_point(|r| r.0 <= from);
    match i.checked_sub(1).and_then(|i| own.get(i)) {
        Some(&(start, n)) if start.saturating_add(n) >= end => None,
        Some(&(start, n)) => Some(from.max(start.saturating_add(n))),
        None => Some(from),
    }
}

/// Makes the target durable (its data and metadata on stable storage),
/// before its hold may go.
fn sync_target(target: &Path) -> Result<()> {
    std::fs::File::open(target)
        .and_then(|f| f.sync_all())
        .map_err(|e| {
            fail(
                target,
                format!("the stream completed but the target cannot be made durable ({e}): its hold stays; run the same command with --resume"),
            )
        })
}

/// A resumed run whose target no longer has a backing: the stream had
/// completed; what the killed run left in QEMU (the ended job, the
/// backing nodes) goes, and so does the hold once the target is written
/// out and checked against the point the hold names. The target no
/// longer names its point.
#[expect(
    clippy::too_many_arguments,
    reason = "the resumed run's vault, target and where QEMU is"
)]
fn finish_only(
    vault: &Vault,
    item: &str,
    place: &Place,
    target: &Path,
    names: &LiveNames,
    holds: &HoldStore,
    opts: &LiveOptions,
    report: &dyn LiveReport,
) -> Result<LiveSummary> {
    // Only the file this live restore made ends it: another file put at
    // the path (the target removed meanwhile, a VM perhaps still on it)
    // leaves the hold and QEMU as they are.
    let hold = holds.get(target);
    if let Ok(Some(h)) = &hold {
        let now = FileId::of(target).map_err(|e| fail(target, e.to_string()))?;
        check_target_file(holds, target, h, &now)?;
    }
    if opts.unattended && !matches!(&hold, Ok(Some(h)) if h.target_file.is_some()) {
        return Err(needs_human(
            target,
            format_args!(
                "the stream had completed and its hold {} is absent, unreadable or older",
                holds.path_of(target).display()
            ),
        ));
    }
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
    // The killed run may have stopped before QEMU wrote the target out. A
    // QEMU without the target node was restarted since: a clean shutdown
    // wrote it out, a crash may have lost the streamed blocks' mappings,
    // which the check below finds.
    if stream::node_exists(qmp, &names.target)? {
        stream::flush_target(qmp, names).map_err(|e| not_durable(target, e))?;
    }
    sync_target(target)?;
    if let Some(b) = stream::read_backing(target)? {
        return Err(fail(
            target,
            format!("it names a backing again ({b}): run the same command with --resume"),
        ));
    }
    // The target is checked against the point its hold names; only a
    // point gone (nothing left to keep) or no hold at all skips that.
    let hold = hold.map_err(|e| {
        fail(
            target,
            format!("its hold cannot be read ({e}), so the target cannot be checked against its point: the hold stays; once the target is known good, `coffre restore --live --abandon` removes it"),
        )
    })?;
    if let Some(h) = &hold {
        match select_point(vault, &h.item, &h.point) {
            Ok(entry) => {
                check_streamed(&PointImage::open(vault, &entry, &opts.access)?, target)?;
            }
            Err(EngineError::PointNotFound { .. } | EngineError::NoPoints { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    place.remove_folder(report);
    let point = hold.map(|h| h.point).unwrap_or_default();
    release_hold(holds, target, &point, report);
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

/// When a job paused on an error (no damaged block) is resumed: at once
/// the first time; while it keeps pausing, after `first`, then twice as
/// long each time, at most `max`. A job seen running for `max` without a
/// pause starts it over (a job that runs a moment after each resume, as
/// on a full disk, does not). Time is given, so it is tested without
/// waiting.
#[derive(Debug)]
struct Backoff {
    first: Duration,
    max: Duration,
    /// The wait before the next resume after this one.
    delay: Duration,
    /// The earliest next resume.
    next: Option<Instant>,
    /// Since when the job is seen running, after a resume.
    running_since: Option<Instant>,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            delay: Duration::ZERO,
            next: None,
            running_since: None,
        }
    }

    /// The job runs at `now`; true when it has run long enough since the
    /// last pause for the pauses to be forgotten (then they are).
    fn running(&mut self, now: Instant) -> bool {
        if self.next.is_none() {
            return false;
        }
        let since = *self.running_since.get_or_insert(now);
        if now.duration_since(since) >= self.max {
            *self = Backoff::new(self.first, self.max);
            return true;
        }
        false
    }

    /// The job is paused at `now`: true when it is to be resumed now.
    fn paused(&mut self, now: Instant) -> bool {
        self.running_since = None;
        if self.next.is_some_and(|t| now < t) {
            return false;
        }
        self.delay = if self.delay.is_zero() {
            self.first
        } else {
            (self.delay * 2).min(self.max)
        };
        self.next = Some(now + self.delay);
        true
    }
}

/// One run's QEMU side, beside the export.
struct Run<'a, 'v> {
    opts: &'a LiveOptions,
    place: &'a Place,
    target: &'a Path,
    names: &'a LiveNames,
    socket: &'a Path,
    export: &'a str,
    entry: &'a PointEntry,
    /// The point as the export serves it.
    image: &'a PointImage<'v>,
    report: &'a dyn LiveReport,
    stop: &'a AtomicBool,
    activity: &'a Activity,
    /// True while the new target this run made is there.
    made: &'a AtomicBool,
    /// The vault's holds, and this run's (which names the target's file
    /// once it is made).
    holds: &'a HoldStore,
    hold: &'a HoldRecord,
}

/// What the QEMU side did.
struct Outcome {
    device: String,
    started_vm: bool,
    streamed: u64,
    seconds: f64,
}

impl Run<'_, '_> {
    fn fail(&self, reason: impl Into<String>) -> EngineError {
        fail(self.target, reason)
    }

    /// Removes the new target QEMU never had; `made` says whether it is
    /// gone (removed, or never there).
    fn remove_target(&self) {
        match std::fs::remove_file(self.target) {
            Ok(()) => self.made.store(false, Ordering::Relaxed),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.made.store(false, Ordering::Relaxed)
            }
            Err(_) => {}
        }
    }

    /// Records the new target's file in this run's hold, so that a
    /// `--resume` finding the stream complete releases the hold for this
    /// very file only. Not done, the hold still keeps the point (a resume
    /// then cannot tell the file): said, not an error.
    fn note_target_file(&self) {
        // The run holds the target's lock: the hold is still the one it
        // wrote.
        let noted = FileId::of(self.target)
            .map_err(|e| e.to_string())
            .and_then(|id| {
                let hold = HoldRecord {
                    target_file: Some(id),
                    ..self.hold.clone()
                };
                self.holds.put(&hold).map_err(|e| e.to_string())
            });
        if let Err(e) = noted {
            self.report.step(&format!(
                "WARNING: the hold {} does not name the target's file ({e}); it still keeps point {}",
                self.holds.path_of(self.target).display(),
                self.entry.id
            ));
        }
    }

    fn drive(&self) -> Result<Outcome> {
        let opts = self.opts;
        let backing = backing_json(self.socket, self.export, opts.reconnect_delay);
        let created = !opts.resume;
        if created {
            // From here until this run removes it, the new target may be
            // there (a failed `qemu-img create` may leave a file).
            self.made.store(true, Ordering::Relaxed);
            if let Err(e) = stream::create_overlay(self.target, &backing) {
                self.remove_target();
                return Err(e.into());
            }
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
            self.note_target_file();
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
                    self.remove_target();
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
                self.remove_target();
                return Err(self.fail(format!(
                    "QEMU still has node {n} of an earlier live restore into this path: resume that one with --resume (if its target is still there), or remove the node (blockdev-del) first"
                )));
            }
        }
        if opts.unattended && stream::attached_device(qmp, &self.names.target)?.is_none() {
            return Err(needs_human(
                self.target,
                format_args!(
                    "QEMU has no device reading the target (node {}): was it restarted? Giving a device the target again could swap a running guest's disk",
                    self.names.target
                ),
            ));
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
                        self.remove_target();
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
            "if coffre stops before the stream completes, the VM's reads of blocks not yet copied wait up to {} s: run the same command with --resume{} (guest writes are never lost: they go to the target)",
            opts.reconnect_delay,
            daemon_hint(opts)
        ));
        let started_vm = if opts.unattended {
            if stream::is_waiting(qmp)? {
                self.report.step(
                    "the VM is waiting (-S): an unattended resume does not start it (`virsh resume`, or QMP `cont`, once you decide)",
                );
            }
            false
        } else {
            stream::start_if_waiting(qmp)?
        };
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
        // Durable before the hold goes: what QEMU holds of the target in
        // memory written out (the streamed blocks' mappings), the file
        // synced, its header without a backing read again.
        stream::flush_target(qmp, self.names).map_err(|e| not_durable(self.target, e))?;
        sync_target(self.target)?;
        if let Some(b) = stream::read_backing(self.target)? {
            return Err(self.fail(format!(
                "the job completed but the target still names a backing ({b})"
            )));
        }
        check_streamed(self.image, self.target)?;
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
        // Other pauses are resumed with a backoff, each said once.
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
        let mut pause_said = false;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(self.fail(format!(
                    "interrupted: the stream is not complete and the VM's reads of blocks not yet copied wait up to {} s for the export: run the same command with --resume{}",
                    self.opts.reconnect_delay,
                    daemon_hint(self.opts)
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
                    paused_on,
                } => {
                    match &paused_on {
                        Some(_) if parked => {}
                        Some(reason) => {
                            let failed = self.activity.failed_reads.load(Ordering::Relaxed);
                            if failed > failed_seen {
                                parked = true;
                                self.report.step(&format!(
                                    "WARNING: the point has damaged blocks ({failed} reads failed; the log names them): QEMU's job {} stays paused and the export keeps serving the VM's reads of every other block. Mend the vault (`coffre verify --read-data --repair`), then stop this run (SIGTERM) and run the same command with --resume",
                                    self.names.job
                                ));
                            } else {
                                if !pause_said {
                                    pause_said = true;
                                    let what = if reason == "nospace" {
                                        "the stream paused: the target's file system is full (QEMU io-status nospace); free space there".to_string()
                                    } else {
                                        format!(
                                            "the stream paused on a read error (QEMU io-status {reason}; the export was away?)"
                                        )
                                    };
                                    self.report.step(&format!(
                                        "{what}: resumed now, then after {} ms, doubling to {} s while it keeps pausing",
                                        BACKOFF_FIRST.as_millis(),
                                        BACKOFF_MAX.as_secs()
                                    ));
                                }
                                if backoff.paused(Instant::now()) {
                                    failed_seen = failed;
                                    stream::resume_job(qmp, self.names)?;
                                }
                            }
                        }
                        None => {
                            if backoff.running(Instant::now()) {
                                pause_said = false;
                            }
                        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_data_run_is_covered_only_by_one_range_of_the_targets_own() {
        let own = [(0, 100), (100 + 50, 50), (400, 1000)];
        assert_eq!(first_gap(&own, 0, 100), None);
        assert_eq!(first_gap(&own, 10, 90), None);
        assert_eq!(first_gap(&own, 10, 91), Some(100));
        assert_eq!(first_gap(&own, 120, 10), Some(120));
        assert_eq!(first_gap(&own, 150, 60), Some(200));
        assert_eq!(first_gap(&own, 500, 900), None);
        assert_eq!(first_gap(&own, 500, 901), Some(1400));
        assert_eq!(first_gap(&own, 2000, 1), Some(2000));
        assert_eq!(first_gap(&[], 0, 1), Some(0));
        assert_eq!(first_gap(&[(5, 10)], 0, 10), Some(0));
        assert_eq!(first_gap(&[(0, u64::MAX)], u64::MAX - 1, 5), None);
    }

    /// The waits between the resumes of a job that pauses again at every
    /// poll (every 50 ms), over `total`.
    fn resumes(b: &mut Backoff, start: Instant, total: Duration) -> Vec<Duration> {
        let mut at = Vec::new();
        let mut t = start;
        while t <= start + total {
            if b.paused(t) {
                at.push(t - start);
            }
            t += Duration::from_millis(50);
        }
        at
    }

    #[test]
    fn a_job_that_keeps_pausing_is_resumed_at_once_then_doubling_to_the_cap() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(250), Duration::from_secs(2));
        let t0 = Instant::now();
        let at = resumes(&mut b, t0, Duration::from_secs(9));
        // 0, +0.25, +0.5, +1, +2, +2, +2 (capped).
        assert_eq!(
            at,
            vec![
                ms(0),
                ms(250),
                ms(750),
                ms(1750),
                ms(3750),
                ms(5750),
                ms(7750)
            ],
        );
        // A job that runs a moment after each resume (a full disk) keeps
        // its backoff: the next resume is still 2 s after the last.
        let t = t0 + ms(7800);
        assert!(!b.running(t));
        assert!(!b.paused(t + ms(100)));
        assert!(b.paused(t0 + ms(9750)));
    }

    #[test]
    fn a_job_that_runs_long_enough_starts_the_backoff_over() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(250), Duration::from_secs(2));
        let t0 = Instant::now();
        assert!(b.paused(t0));
        assert!(b.paused(t0 + ms(250)));
        assert!(!b.paused(t0 + ms(300)));
        // Running from 0.3 s: not yet forgotten at 2.2 s, forgotten at 2.3 s.
        assert!(!b.running(t0 + ms(300)));
        assert!(!b.running(t0 + ms(2200)));
        assert!(b.running(t0 + ms(2300)));
        // A new pause is resumed at once, then after 250 ms again.
        assert!(b.paused(t0 + ms(5000)));
        assert!(!b.paused(t0 + ms(5200)));
        assert!(b.paused(t0 + ms(5250)));
        // A job that never paused has nothing to forget.
        let mut fresh = Backoff::new(ms(250), Duration::from_secs(2));
        assert!(!fresh.running(t0));
        assert!(!fresh.running(t0 + Duration::from_secs(60)));
    }
}
