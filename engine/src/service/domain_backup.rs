//! A libvirt domain backed up as one: every disk at one instant, through
//! libvirt's own pull-mode backup (`coffre_snapshotter::vm::libvirt`),
//! each disk into its own item `DOMAIN-TARGET`.
//!
//! **One job covers the domain.** coffre's job model is one job per point
//! of an item, so a domain backup is one libvirt backup job (one instant,
//! one checkpoint) and one coffre backup job per disk, tied together by
//! the stats every one of them records from its start: `domain`,
//! `domain_job` (an id shared by the disks' jobs and naming the
//! checkpoint), `instant`, `disk`, `consistency`, `checkpoint` and
//! `incremental_from`. [`DomainOutcome`] is the domain's summary.
//!
//! **Incremental through checkpoints.** Each qcow2 disk's point records the
//! checkpoint created at its instant as its changed-block generation. The
//! next backup of the disk reads only what libvirt's bitmap since that
//! checkpoint marks (`qemu:dirty-bitmap:backup-TARGET` on the export), and
//! coffre checks the hint like any other: its `since` is the checkpoint
//! the item's latest point recorded. A checkpoint is deleted only when no
//! disk's latest point names it any more, after the new points are
//! committed: a failed or killed run leaves the older checkpoint, which
//! the next run builds on. A disk whose checkpoint is gone is read whole,
//! with a warning, and so is a disk that is not the image it was when the
//! checkpoint was created (libvirt records each disk's image with the
//! checkpoint; a bitmap is its image's changes, so after the image files
//! of two disks were swapped, each bitmap is the other disk's). libvirt keeps no checkpoint of a raw disk: such a disk
//! is read whole every time (said once per run, not as a job warning).
//!
//! **One run at a time.** A run holds the domain's host-wide lock
//! (`vm::libvirt::lock`) from start to end; a second run on the domain, for
//! this vault or another, fails at once.
//!
//! **Clean-up.** The libvirt job ends (`domjobabort`) whatever happens; a
//! job or checkpoints a killed run left are found by name by the next run
//! and removed.
//!
//! **A domain that is not running** has no QEMU to ask: its image files
//! are backed up directly (a qcow2 through a `qemu-nbd` of coffre's own),
//! each at its own moment, with a warning saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use coffre_snapshotter::SnapError;
use coffre_snapshotter::cbt::{Hint, HintSource, Sampling};
use coffre_snapshotter::hooks::{Around, HookEnv, failed_hooks_warning};
use coffre_snapshotter::nbd::{NbdImage, open_any};
use coffre_snapshotter::source::live::{PointInTime, Pretaken, Taken};
use coffre_snapshotter::vm::libvirt::domain::Domain;
use coffre_snapshotter::vm::libvirt::lock::DomainLock;
use coffre_snapshotter::vm::libvirt::pull::{self, PullBackup};
use coffre_snapshotter::vm::libvirt::xml::{self, DiskRequest, DomainXml};
use coffre_snapshotter::vm::libvirt::{self as lv, vault_checkpoint_prefix};
use coffre_vault_store::format::catalog::Hooks;
use coffre_vault_store::format::level::Level;
use coffre_vault_store::{Access, PointRecord, Vault};
use jiff::Timestamp;

use crate::backup::{BackupOptions, PointTerms};
use crate::backup_job::{
    JobOptions, JobOutcome, Source, Writer, record_failed_backup, run_source_job,
};
use crate::clock::Clock;
use crate::error::{EngineError, Result};
use crate::progress::Progress;
use crate::source::ImageSource;

/// A domain as coffre found it: its connection, whether it runs, its
/// disks.
#[derive(Clone, Debug)]
pub struct DomainPlan {
    /// The domain and its connection.
    pub domain: Domain,
    /// It has a QEMU process (running or paused).
    pub running: bool,
    /// Its XML: the live one when it runs.
    pub xml: DomainXml,
}

impl DomainPlan {
    /// Looks the domain `name` up on `connect` (libvirt's default when
    /// `None`); an unknown domain or one without disks is an error.
    pub fn inspect(connect: Option<&str>, name: &str) -> Result<DomainPlan> {
        let domain = Domain::new(connect, name)?;
        let running = domain.is_active()?;
        let xml = domain.xml(!running)?;
        if xml.disks.is_empty() {
            return Err(SnapError::Libvirt {
                domain: name.into(),
                reason: "it has no disk to back up".into(),
            }
            .into());
        }
        Ok(DomainPlan {
            domain,
            running,
            xml,
        })
    }

    /// The item disk `target` is backed up as.
    pub fn item(&self, target: &str) -> String {
        lv::item_name(&self.domain.name, target)
    }

    /// The source disk `target`'s item records.
    pub fn source(&self, target: &str) -> PathBuf {
        PathBuf::from(lv::libvirt_source(
            &self.domain.connect,
            &self.domain.name,
            target,
        ))
    }
}

/// How a domain is backed up.
pub struct DomainOptions<'a> {
    /// Only these disks (targets); `None`: every disk.
    pub only: Option<Vec<String>>,
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// Read rate limit, bytes per second.
    pub rate_limit: Option<u64>,
    /// Snapshots of image files may be reflink clones.
    pub allow_clone: bool,
    /// Where default snapshot areas go.
    pub snapshot_root: Option<PathBuf>,
    /// How many clean blocks a checkpoint's bitmap is checked on.
    pub sampling: Sampling,
    /// How the points are kept.
    pub terms: PointTerms,
    /// Where the transfers get their writer.
    pub writer: Writer<'a>,
    /// Polled by the transfers: `true` abandons them.
    pub stop: &'a (dyn Fn() -> bool + Sync),
    /// The hooks this host runs for each disk's item, with the warning of
    /// an item whose catalog names hooks this host does not run. They run
    /// around the domain's instant and its freeze (pre hooks in disk
    /// order, post hooks in reverse); for a stopped domain, around each
    /// disk's read, as for an image file.
    pub hooks: BTreeMap<String, (Hooks, Option<String>)>,
}

impl DomainOptions<'_> {
    /// The hooks this host runs for `item` (none when it set none).
    fn hooks_of(&self, item: &str) -> Hooks {
        self.hooks
            .get(item)
            .map(|(h, _)| h.clone())
            .unwrap_or_default()
    }

    /// The job notes of `item`'s disk: the domain's warnings, and the
    /// item's hook warning.
    fn notes_of(&self, item: &str, domain_warnings: &[String]) -> Vec<String> {
        let mut notes = domain_warnings.to_vec();
        notes.extend(self.hooks.get(item).and_then(|(_, w)| w.clone()));
        notes
    }
}

/// Runs each item's hooks around `f`: the pre hooks in order, `f`, then the
/// post hooks in reverse order (nested, as [`Around::run`] nests). Returns
/// what `f` returned and each item's hooks' outcome, in `items`' order.
fn around_all<T>(
    items: &[(String, PathBuf, Hooks)],
    job: &str,
    vault: &std::path::Path,
    f: impl FnOnce() -> T,
) -> (T, Vec<Around>) {
    match items.split_first() {
        None => (f(), Vec::new()),
        Some(((item, image, hooks), rest)) => {
            let env = HookEnv {
                item,
                image,
                job,
                vault,
            };
            let ((out, mut inner), first) =
                Around::run(hooks, env, || around_all(rest, job, vault, f));
            inner.insert(0, first);
            (out, inner)
        }
    }
}

/// One disk's backup.
#[derive(Debug)]
pub struct DiskRun {
    /// The disk's target.
    pub disk: String,
    /// Its item.
    pub item: String,
    /// The source its item records.
    pub source: PathBuf,
    /// What was read: the NBD export, or the image file.
    pub read_from: String,
    /// The checkpoint whose changed blocks were read (`None`: the whole
    /// disk).
    pub incremental_from: Option<String>,
    /// Why the whole disk was read, when it was.
    pub full_read: Option<String>,
    /// The disk's backup job.
    pub outcome: JobOutcome,
}

/// What a domain backup did.
#[derive(Debug)]
pub struct DomainOutcome {
    /// The domain.
    pub domain: String,
    /// Its connection.
    pub connect: String,
    /// The id shared by the disks' jobs.
    pub domain_job: String,
    /// The instant of every disk (a running domain).
    pub instant: Option<Timestamp>,
    /// The domain was running (else its files were read directly).
    pub running: bool,
    /// `filesystem` (frozen through the guest agent) or `crash`.
    pub consistency: &'static str,
    /// How long the guest's filesystems were frozen, when they were.
    pub freeze_ms: Option<u64>,
    /// The checkpoint created at the instant.
    pub checkpoint: Option<String>,
    /// coffre's checkpoints deleted (superseded, or left by killed runs).
    pub retired: Vec<String>,
    /// Warnings of the domain as a whole.
    pub warnings: Vec<String>,
    /// One entry per disk whose job ran or was recorded as failed.
    pub disks: Vec<DiskRun>,
    /// The disks (targets) whose backup failed before even a failed job
    /// of theirs could be recorded, with the error.
    pub unrecorded: Vec<(String, EngineError)>,
}

impl DomainOutcome {
    /// The first disk's error, if any failed.
    pub fn first_error(&self) -> Option<(&DiskRun, &EngineError)> {
        self.disks
            .iter()
            .find_map(|d| d.outcome.error.as_ref().map(|e| (d, e)))
    }
}

/// Progress sinks (snapshot, transfer) for one disk.
pub type Bars<'a> = &'a dyn Fn(&str) -> (Box<dyn Progress>, Box<dyn Progress>);

/// A new domain job id: `YYYYMMDDtHHMMSS-` and 8 hex digits.
fn domain_job_id(now: Timestamp) -> String {
    let seed = format!(
        "{}-{}-{}",
        now.as_nanosecond(),
        std::process::id(),
        Timestamp::now().as_nanosecond()
    );
    let tag = blake3::hash(seed.as_bytes()).to_hex();
    format!(
        "{}-{}",
        now.strftime("%Y%m%dt%H%M%S"),
        tag.get(..8).unwrap_or_default()
    )
}

/// The latest vault point of each item.
fn latest_points(
    vault_dir: &std::path::Path,
    writer: &Writer<'_>,
    items: &[String],
) -> Result<BTreeMap<String, Option<PointRecord>>> {
    let opened;
    let vault = match writer {
        Writer::Held(v) => *v,
        Writer::Open(o) => {
            opened = Vault::open_with(vault_dir, Access::ReadOnly, o)?;
            &opened
        }
    };
    let mut out = BTreeMap::new();
    for item in items {
        let latest = match vault.item(item)? {
            Some(_) => vault.points(item)?.pop(),
            None => None,
        };
        out.insert(item.clone(), latest);
    }
    Ok(out)
}

/// The checkpoint a point recorded as its changed-block generation.
fn checkpoint_of(point: Option<&PointRecord>) -> Option<String> {
    point
        .and_then(|p| p.cbt.as_ref())
        .filter(|c| c.source == HintSource::Bitmap.name())
        .and_then(|c| c.generation.clone())
        .filter(|g| xml::check_checkpoint_name(g).is_ok())
}

/// The id of the vault the disks' points go to.
fn vault_id(vault_dir: &std::path::Path, writer: &Writer<'_>) -> Result<String> {
    Ok(match writer {
        Writer::Held(v) => v.config().vault_id.clone(),
        Writer::Open(o) => Vault::open_with(vault_dir, Access::ReadOnly, o)?
            .config()
            .vault_id
            .clone(),
    })
}

/// Deletes this vault's checkpoints of the domain (named `ours`…) that no
/// name in `keep` names; returns those deleted, and warnings for those
/// that could not be. Another vault's checkpoints are left alone.
fn retire(
    domain: &Domain,
    ours: &str,
    keep: &BTreeSet<String>,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut gone = Vec::new();
    let mut warnings = Vec::new();
    for c in domain.checkpoints()? {
        if !c.starts_with(ours) || xml::check_checkpoint_name(&c).is_err() || keep.contains(&c) {
            continue;
        }
        match domain.delete_checkpoint(&c) {
            Ok(()) => gone.push(c),
            Err(e) => warnings.push(format!("cannot delete checkpoint {c}: {e}")),
        }
    }
    Ok((gone, warnings))
}

/// The checkpoints the latest points of every disk's item name.
fn referenced(
    vault_dir: &std::path::Path,
    plan: &DomainPlan,
    writer: &Writer<'_>,
) -> Result<BTreeSet<String>> {
    let items: Vec<String> = plan
        .xml
        .disks
        .iter()
        .map(|d| plan.item(&d.target))
        .collect();
    Ok(latest_points(vault_dir, writer, &items)?
        .values()
        .filter_map(|p| checkpoint_of(p.as_ref()))
        .collect())
}

/// Backs up the disks of the domain `plan` describes (every disk, or
/// `opts.only`), each into item `DOMAIN-TARGET`, which must exist.
///
/// An error means no disk's job ran (the domain, its lock, its clean-up
/// or its backup job failed first); once the disks' jobs start, each
/// disk's failure is its own job's (or, when not even that could be
/// recorded, in [`DomainOutcome::unrecorded`]).
pub fn backup_domain(
    vault_dir: &std::path::Path,
    plan: &DomainPlan,
    opts: &DomainOptions<'_>,
    clock: &dyn Clock,
    bars: Bars<'_>,
) -> Result<DomainOutcome> {
    let disks: Vec<&xml::Disk> = plan
        .xml
        .disks
        .iter()
        .filter(|d| opts.only.as_ref().is_none_or(|o| o.contains(&d.target)))
        .collect();
    if let Some(only) = &opts.only
        && let Some(missing) = only
            .iter()
            .find(|t| !plan.xml.disks.iter().any(|d| &d.target == *t))
    {
        return Err(SnapError::Libvirt {
            domain: plan.domain.name.clone(),
            reason: format!("it has no disk {missing} any more"),
        }
        .into());
    }
    // One coffre run at a time backs the domain up on this host, from
    // the clean-up of what a killed run left to the retirement of the
    // superseded checkpoints.
    let lock = DomainLock::acquire(&plan.domain, plan.xml.uuid.as_deref())?;
    let domain_job = domain_job_id(clock.now());
    let mut out = DomainOutcome {
        domain: plan.domain.name.clone(),
        connect: plan.domain.connect.clone(),
        domain_job,
        instant: None,
        running: plan.running,
        consistency: "crash",
        freeze_ms: None,
        checkpoint: None,
        retired: Vec::new(),
        warnings: Vec::new(),
        disks: Vec::new(),
        unrecorded: Vec::new(),
    };
    if plan.running {
        backup_running(vault_dir, plan, &lock, &disks, opts, clock, bars, &mut out)?;
    } else {
        backup_files(vault_dir, plan, &disks, opts, clock, bars, &mut out)?;
    }
    for w in &out.warnings {
        tracing::warn!(domain = %out.domain, "{w}");
    }
    Ok(out)
}

/// The backup options of one disk's job.
fn disk_options(
    opts: &DomainOptions<'_>,
    item: &str,
    source: PathBuf,
    hint: Option<Hint>,
    notes: Vec<String>,
) -> BackupOptions {
    let hooks = opts.hooks_of(item);
    BackupOptions {
        item: item.to_string(),
        source_path: source,
        threads: opts.threads,
        rate_limit: opts.rate_limit,
        // A running domain's disks were taken before their jobs (the
        // hooks ran around that instant, `Pretaken`); a stopped domain's
        // files are captured like any image, with their item's hooks.
        hooks,
        allow_clone: opts.allow_clone,
        snapshot_root: opts.snapshot_root.clone(),
        hint,
        sampling: opts.sampling,
        notes,
    }
}

/// Runs one disk's job; when its source cannot be opened or the job
/// cannot run (an error of the job's own bookkeeping), records a failed
/// job of the disk instead, so that one disk's failure ends that disk's
/// job, not the domain's loop. An error only when not even a failed job
/// could be recorded.
#[allow(clippy::too_many_arguments)]
fn run_disk(
    vault_dir: &std::path::Path,
    opts: &DomainOptions<'_>,
    clock: &dyn Clock,
    bars: Bars<'_>,
    item: &str,
    target: &str,
    opened: Result<Source>,
    backup: BackupOptions,
    labels: BTreeMap<String, serde_json::Value>,
) -> Result<JobOutcome> {
    let ran = opened.and_then(|mut source| {
        let (snap_bar, transfer_bar) = bars(target);
        run_source_job(
            vault_dir,
            &mut source,
            JobOptions {
                backup,
                terms: opts.terms.clone(),
                writer: opts.writer.clone(),
                stop: opts.stop,
                labels,
            },
            clock,
            &*snap_bar,
            &*transfer_bar,
        )
    });
    match ran {
        Ok(outcome) => Ok(outcome),
        Err(e) => match opts
            .writer
            .config(vault_dir)
            .and_then(|cfg| record_failed_backup(vault_dir, cfg.keys(), item, &e, clock))
        {
            Ok(job) => Ok(JobOutcome {
                job,
                point: None,
                error: Some(e),
            }),
            Err(record) => {
                tracing::warn!(item, error = %record, "cannot record the failed backup job");
                Err(e)
            }
        },
    }
}

/// Keeps a disk's outcome, or, when not even a failed job of it could be
/// recorded, its error and a warning.
fn keep_outcome(
    out: &mut DomainOutcome,
    ran: Result<JobOutcome>,
    run: impl FnOnce(JobOutcome) -> DiskRun,
    target: &str,
) {
    match ran {
        Ok(outcome) => out.disks.push(run(outcome)),
        Err(e) => {
            out.warnings.push(format!(
                "disk {target}: its backup failed and no job of it could be recorded: {e}"
            ));
            out.unrecorded.push((target.to_string(), e));
        }
    }
}

fn labels(
    out: &DomainOutcome,
    target: &str,
    incremental_from: Option<&str>,
) -> BTreeMap<String, serde_json::Value> {
    let mut l = BTreeMap::new();
    l.insert("domain".into(), out.domain.clone().into());
    l.insert("domain_job".into(), out.domain_job.clone().into());
    l.insert("disk".into(), target.into());
    l.insert("running".into(), out.running.into());
    l.insert("consistency".into(), out.consistency.into());
    if let Some(i) = out.instant {
        l.insert("instant".into(), i.to_string().into());
    }
    if let Some(c) = &out.checkpoint {
        l.insert("checkpoint".into(), c.clone().into());
    }
    if let Some(i) = incremental_from {
        l.insert("incremental_from".into(), i.into());
    }
    l
}

#[allow(clippy::too_many_arguments)]
fn backup_running(
    vault_dir: &std::path::Path,
    plan: &DomainPlan,
    lock: &DomainLock,
    disks: &[&xml::Disk],
    opts: &DomainOptions<'_>,
    clock: &dyn Clock,
    bars: Bars<'_>,
    out: &mut DomainOutcome,
) -> Result<()> {
    let domain = &plan.domain;
    // What a killed run left: its job, then the checkpoints no point
    // names (the killed run's, never committed).
    if let Some(done) = pull::clean_stale_job(domain, lock)? {
        out.warnings.push(done);
    }
    if let Some(thawed) = pull::thaw_leftover(domain, &plan.xml) {
        out.warnings.push(thawed);
    }
    let ours = vault_checkpoint_prefix(&vault_id(vault_dir, &opts.writer)?);
    let keep = referenced(vault_dir, plan, &opts.writer)?;
    let (gone, w) = retire(domain, &ours, &keep)?;
    out.retired.extend(gone);
    out.warnings.extend(w);

    // Each disk's base: the checkpoint its item's latest point recorded,
    // if libvirt still has it with a bitmap of the disk.
    let items: Vec<String> = disks.iter().map(|d| plan.item(&d.target)).collect();
    let latest = latest_points(vault_dir, &opts.writer, &items)?;
    let existing: BTreeSet<String> = domain.checkpoints()?.into_iter().collect();
    let mut checkpoints: BTreeMap<String, std::result::Result<xml::Checkpoint, String>> =
        BTreeMap::new();
    let mut requests = Vec::new();
    let mut full_reads: BTreeMap<String, (String, bool)> = BTreeMap::new();
    for d in disks {
        let item = plan.item(&d.target);
        let point = latest.get(&item).and_then(Option::as_ref);
        let base = checkpoint_of(point);
        let mut incremental = None;
        if !d.can_checkpoint() {
            full_reads.insert(
                d.target.clone(),
                (
                    format!(
                        "disk {} is {}: libvirt keeps no checkpoint of it, so every backup reads it whole (a qcow2 disk is backed up incrementally)",
                        d.target,
                        d.format.as_deref().unwrap_or("of an unknown format")
                    ),
                    false,
                ),
            );
        } else if let Some(b) = base {
            let recorded = if existing.contains(&b) {
                if !checkpoints.contains_key(&b) {
                    // One that cannot be read (a recorded domain coffre
                    // would refuse today) only costs a whole read.
                    let read = domain.checkpoint(&b).map_err(|e| e.to_string());
                    checkpoints.insert(b.clone(), read);
                }
                checkpoints.get(&b)
            } else {
                None
            };
            match recorded {
                Some(Err(e)) => {
                    full_reads.insert(
                        d.target.clone(),
                        (
                            format!(
                                "checkpoint {b}, which the last point of item {item} recorded, cannot be read ({e}): the whole disk was read"
                            ),
                            true,
                        ),
                    );
                }
                Some(Ok(c)) if c.bitmaps.contains(&d.target) => {
                    // A bitmap lives in an image: it is this disk's changes
                    // only if the disk is still the image it was at the
                    // checkpoint (a redefined domain may have swapped them).
                    match (c.identity_of(&d.target), d.identity.as_deref()) {
                        (Some(then), Some(now)) if then == now => incremental = Some(b),
                        (then, now) => {
                            full_reads.insert(
                                d.target.clone(),
                                (
                                    format!(
                                        "disk {} of domain {} is {} now, but checkpoint {b} recorded it as {}: its bitmap is not this disk's changes since item {item}'s last point, so the whole disk was read",
                                        d.target,
                                        domain.name,
                                        now.unwrap_or("an image libvirt does not name"),
                                        then.unwrap_or("an image it does not name"),
                                    ),
                                    true,
                                ),
                            );
                        }
                    }
                }
                _ => {
                    full_reads.insert(
                        d.target.clone(),
                        (
                            format!(
                                "checkpoint {b}, which the last point of item {item} recorded, is gone from domain {} (or keeps no bitmap of disk {}): the whole disk was read",
                                domain.name, d.target
                            ),
                            true,
                        ),
                    );
                }
            }
        } else if point.is_some() {
            full_reads.insert(
                d.target.clone(),
                (
                    format!(
                        "the last point of item {item} recorded no checkpoint (taken while the domain was off, or by an older coffre): the whole disk was read"
                    ),
                    true,
                ),
            );
        }
        requests.push(DiskRequest {
            target: d.target.clone(),
            incremental,
            checkpoint: d.can_checkpoint(),
        });
    }
    let checkpoint = requests
        .iter()
        .any(|r| r.checkpoint)
        .then(|| format!("{ours}{}", out.domain_job));
    let description = format!("coffre domain job {}", out.domain_job);
    // Each disk's item's hooks run around the one instant (and the freeze
    // inside it).
    let hooked: Vec<(String, PathBuf, Hooks)> = requests
        .iter()
        .map(|r| {
            let item = plan.item(&r.target);
            let hooks = opts.hooks_of(&item);
            (item, plan.source(&r.target), hooks)
        })
        .collect();
    let domain_job = out.domain_job.clone();
    let (session, arounds) = around_all(&hooked, &domain_job, vault_dir, || {
        begin_session(
            domain,
            plan,
            &mut requests,
            checkpoint.as_deref().map(|c| (c, description.as_str())),
            &mut full_reads,
            &mut out.warnings,
        )
    });
    let session = session?;
    out.instant = Some(session.instant);
    out.consistency = session.consistency.name();
    out.freeze_ms = session.freeze_ms;
    out.checkpoint = checkpoint.clone();
    out.warnings.extend(session.warnings.iter().cloned());
    // A raw disk is read whole every time: said here, not as a warning
    // of every job.
    for (why, _) in full_reads.values().filter(|(_, warn)| !warn) {
        tracing::warn!(domain = %domain.name, "{why}");
    }

    for (r, around) in requests.iter().zip(&arounds) {
        let item = plan.item(&r.target);
        let source = plan.source(&r.target);
        let uri = session.uri(&r.target).unwrap_or_default();
        let bitmap = session
            .export(&r.target)
            .and_then(|e| e.bitmap.clone())
            .filter(|_| r.incremental.is_some());
        let hooks = opts.hooks_of(&item);
        let mut warnings = Vec::new();
        let hooks_ok = around.succeeded(&hooks, &mut warnings);
        // In use, and atomic when the guest was frozen for the instant.
        let level = Level::of(
            hooks_ok,
            true,
            session.consistency == pull::Consistency::Filesystem,
        );
        if hooks.is_set() && !hooks_ok {
            warnings.push(failed_hooks_warning(level));
        }
        let instant = PointInTime {
            level,
            warnings,
            freeze_ms: session.freeze_ms,
        };
        let opened = (|| -> Result<Source> {
            let nbd = NbdImage::open(&uri, bitmap.as_deref())?;
            let hint = match (&r.incremental, &checkpoint) {
                (Some(base), Some(new)) => nbd.bitmap_hint()?.map(|mut h| {
                    h.since = Some(base.clone());
                    h.generation = Some(new.clone());
                    h
                }),
                // The whole disk, marked as read from the new checkpoint
                // on: the next run builds on it.
                (None, Some(new)) if r.checkpoint => {
                    let size = nbd.size();
                    let mut h = Hint::new(HintSource::Bitmap, std::iter::once(0..size).collect());
                    h.generation = Some(new.clone());
                    h.image_size = Some(size);
                    Some(h)
                }
                _ => None,
            };
            Ok(Source::Live(Box::new(Pretaken::new(Taken {
                source: Box::new(nbd),
                hint,
                instant,
            }))))
        })();
        let mut notes = opts.notes_of(&item, &out.warnings);
        if let Some((why, true)) = full_reads.get(&r.target) {
            notes.push(why.clone());
        }
        let labels = labels(out, &r.target, r.incremental.as_deref());
        let backup = disk_options(opts, &item, source.clone(), None, notes);
        let ran = run_disk(
            vault_dir, opts, clock, bars, &item, &r.target, opened, backup, labels,
        );
        let full_read = full_reads.get(&r.target).map(|(w, _)| w.clone());
        let run = |outcome| DiskRun {
            disk: r.target.clone(),
            item,
            source,
            read_from: uri,
            incremental_from: r.incremental.clone(),
            full_read,
            outcome,
        };
        keep_outcome(out, ran, run, &r.target);
    }
    if let Err(e) = session.end() {
        out.warnings
            .push(format!("cannot end the libvirt backup job: {e}"));
    }
    // The new points are committed: the checkpoints no latest point names
    // any more go (the previous one, or the new one if no disk's point was
    // recorded).
    match referenced(vault_dir, plan, &opts.writer).and_then(|keep| retire(domain, &ours, &keep)) {
        Ok((gone, w)) => {
            out.retired.extend(gone);
            out.warnings.extend(w);
        }
        Err(e) => out
            .warnings
            .push(format!("cannot delete the superseded checkpoints: {e}")),
    }
    Ok(())
}

/// Begins the domain's pull backup; when libvirt refuses an incremental
/// one (a bitmap it cannot use: lost, inconsistent), every disk is read
/// whole instead, and `full_reads` and `warnings` say why.
fn begin_session(
    domain: &Domain,
    plan: &DomainPlan,
    requests: &mut [DiskRequest],
    checkpoint: Option<(&str, &str)>,
    full_reads: &mut BTreeMap<String, (String, bool)>,
    warnings: &mut Vec<String>,
) -> Result<PullBackup> {
    let begun = PullBackup::begin(domain, &plan.xml, requests, checkpoint);
    match begun {
        Ok(s) => Ok(s),
        // A guest that may be frozen is not frozen again.
        Err(e @ SnapError::GuestMayBeFrozen { .. }) => Err(e.into()),
        Err(e) if requests.iter().any(|r| r.incremental.is_some()) => {
            // A bitmap libvirt cannot use (lost, inconsistent): read every
            // disk whole rather than fail.
            let why =
                format!("libvirt refused the incremental backup ({e}); every disk was read whole");
            warnings.push(why.clone());
            for r in requests.iter_mut() {
                if r.incremental.take().is_some() {
                    full_reads.insert(r.target.clone(), (why.clone(), true));
                }
            }
            if let Some((c, _)) = checkpoint
                && domain.checkpoints()?.iter().any(|have| have == c)
            {
                let _ = domain.delete_checkpoint(c);
            }
            Ok(PullBackup::begin(domain, &plan.xml, requests, checkpoint)?)
        }
        Err(e) => Err(e.into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn backup_files(
    vault_dir: &std::path::Path,
    plan: &DomainPlan,
    disks: &[&xml::Disk],
    opts: &DomainOptions<'_>,
    clock: &dyn Clock,
    bars: Bars<'_>,
    out: &mut DomainOutcome,
) -> Result<()> {
    out.warnings.push(format!(
        "domain {} is not running: its image files were backed up directly, one after the other (nothing must write them meanwhile)",
        plan.domain.name
    ));
    for d in disks {
        let item = plan.item(&d.target);
        let source = plan.source(&d.target);
        let opened: Result<(Box<dyn ImageSource>, Option<Hint>)> = match &d.source {
            Some(path) => open_any(path, None).map_err(EngineError::from),
            None => Err(SnapError::Libvirt {
                domain: plan.domain.name.clone(),
                reason: format!(
                    "disk {} is of type {}, not a file or block device coffre can read while the domain is off",
                    d.target, d.kind
                ),
            }
            .into()),
        };
        let read_from = d
            .source
            .as_deref()
            .map_or(String::new(), |p| p.display().to_string());
        let labels = labels(out, &d.target, None);
        let notes = opts.notes_of(&item, &out.warnings);
        let (opened, hint) = match opened {
            Ok((image, hint)) => (Ok(Source::Image(image)), hint),
            Err(e) => (Err(e), None),
        };
        let backup = disk_options(opts, &item, source.clone(), hint, notes);
        let ran = run_disk(
            vault_dir, opts, clock, bars, &item, &d.target, opened, backup, labels,
        );
        let run = |outcome| DiskRun {
            disk: d.target.clone(),
            item,
            source,
            read_from,
            incremental_from: None,
            full_read: Some("the domain is not running".into()),
            outcome,
        };
        keep_outcome(out, ran, run, &d.target);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_job_ids_make_checkpoint_names() {
        let now: Timestamp = "2026-12-06T06:15:49Z".parse().unwrap();
        let id = domain_job_id(now);
        assert!(id.starts_with("20261206t061549-"), "{id}");
        let name = format!("{}{id}", vault_checkpoint_prefix("a vault id"));
        xml::check_checkpoint_name(&name).unwrap();
        assert_ne!(
            vault_checkpoint_prefix("a vault id"),
            vault_checkpoint_prefix("another vault id")
        );
        assert_ne!(id, domain_job_id(now));
    }
}
