//! A drive of a running QEMU as a [`LiveSource`]: the backup job takes its
//! point in time itself, in this order:
//!
//! 1. the monitor's host lock is taken ([`super::monitor_lock`]: one live
//!    backup per monitor, a second fails at once naming the first), the
//!    monitor is reached, the drive resolved to its node and its device,
//!    and what a killed run of the same vault and item left is removed: in
//!    QEMU ([`Fleece::remove_leftovers`]) and its work folder;
//! 2. the item's pre hook runs, then the guest's file systems are frozen
//!    through the guest agent, when one is given (a guest a killed run
//!    left frozen is thawed first, and the job says so);
//! 3. **the instant**: coffre's copy-before-write filter becomes the
//!    device's drive, between the two transactions that move the
//!    dirty-bitmap chain on ([`super::bitmap`], [`Fleece::take`]);
//! 4. the guest is thawed at once (the freeze window is measured and
//!    recorded), then the post hook runs;
//! 5. the point is exported over NBD on a private socket with the parent's
//!    bitmap, read by the job's capture, and released once captured; a read
//!    that fails because QEMU dropped the point (its overlay full) says so;
//! 6. once the job knows the point is in the vault, the old part of the
//!    bitmap chain is removed; otherwise the chain stays for the next run.
//!
//! The overlay and an owner lock live in a work folder
//! `<fleece dir>/coffre-fleece-<16 hex of vault and item>-<8 hex>` (0700;
//! the fleece dir is `--fleece-dir`, else `$TMPDIR`), the NBD socket in the
//! private lock folder ([`super::monitor_lock::lock_dir`]) as
//! `<16 hex>-<8 hex>.sock` (a short path any fleece dir can have): a later
//! run of the same vault and item removes a folder of that name whose
//! owner lock no live run holds, and its socket
//! ([`remove_dead_work_dirs`]).
//!
//! A freeze that fails or times out thaws (through a fresh connection: the
//! old one may be out of step) and drops the point to crash-consistent
//! with a warning. SIGINT, SIGTERM, SIGHUP and SIGQUIT are held back while
//! the guest is frozen (blocked on the freezing thread, caught on the
//! others) and raised again after the thaw, so a Ctrl-C lands after it;
//! only SIGKILL can leave a guest frozen, and the next run of the item
//! thaws it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coffre_vault_store::format::level::Level;

use super::agent::GuestAgent;
use super::bitmap::{Chain, Plan};
use super::fleece::{CBW_TIMEOUT_S, Fleece, Names};
use super::monitor_lock::MonitorLock;
use super::node;
use super::qmp::Qmp;
use crate::cbt::{Hint, HintSource};
use crate::error::{Result, SnapError};
use crate::hooks::{Around, HookEnv, failed_hooks_warning};
use crate::nbd::NbdImage;
use crate::source::{ImageSource, LiveSource, PointInTime, TakeRequest, Taken, Window};

/// How long one exchange with the monitor may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one exchange with the guest agent (a freeze, a thaw) may take.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a drive of a running VM is: its monitor, the drive, the guest
/// agent's socket if there is one, and the folder for the point's overlay
/// if not `$TMPDIR`. Recorded as the item's source,
/// `qmp+unix:///DRIVE?socket=SOCKET[&agent=SOCKET][&fleece=DIR]` (`%`, `&`,
/// `?` and `#` in paths are percent-escaped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpTarget {
    /// The QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    pub socket: PathBuf,
    /// A node name, drive id or device id.
    pub drive: String,
    /// The guest agent's socket (`-chardev socket,path=…` of a
    /// `virtio-serial` port named `org.qemu.guest_agent.0`).
    pub agent: Option<PathBuf>,
    /// The folder of the point's work folder (its overlay: as big as the
    /// blocks the guest overwrites during the backup); `None`: `$TMPDIR`.
    pub fleece: Option<PathBuf>,
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '&' => out.push_str("%26"),
            '?' => out.push_str("%3F"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(rest.get(..i).unwrap_or_default());
        let code = rest.get(i + 1..i + 3).ok_or("a % escape is cut short")?;
        out.push(match code {
            "25" => '%',
            "26" => '&',
            "3F" | "3f" => '?',
            "23" => '#',
            _ => return Err(format!("unknown escape %{code}")),
        });
        rest = rest.get(i + 3..).unwrap_or_default();
    }
    out.push_str(rest);
    Ok(out)
}

impl QmpTarget {
    /// The source the item records.
    pub fn source(&self) -> String {
        let mut s = format!(
            "qmp+unix:///{}?socket={}",
            escape(&self.drive),
            escape(&self.socket.to_string_lossy())
        );
        if let Some(a) = &self.agent {
            s.push_str("&agent=");
            s.push_str(&escape(&a.to_string_lossy()));
        }
        if let Some(f) = &self.fleece {
            s.push_str("&fleece=");
            s.push_str(&escape(&f.to_string_lossy()));
        }
        s
    }

    /// Parses a recorded source.
    pub fn parse(source: &str) -> std::result::Result<QmpTarget, String> {
        let rest = source
            .strip_prefix("qmp+unix:///")
            .ok_or("a running VM's drive is qmp+unix:///DRIVE?socket=PATH")?;
        let (drive, query) = rest
            .split_once('?')
            .ok_or("qmp+unix:///DRIVE needs ?socket=PATH")?;
        let drive = unescape(drive)?;
        if drive.is_empty() || drive.len() > 1024 || drive.contains('/') {
            return Err(format!("{drive:?} is no drive name"));
        }
        let (mut socket, mut agent, mut fleece) = (None, None, None);
        for kv in query.split('&') {
            let slot = match kv.split_once('=') {
                Some(("socket", v)) if !v.is_empty() => &mut socket,
                Some(("agent", v)) if !v.is_empty() => &mut agent,
                Some(("fleece", v)) if !v.is_empty() => &mut fleece,
                _ => return Err(format!("unknown or empty query part {kv:?}")),
            };
            if slot.is_some() {
                return Err(format!("query part {kv:?} is given twice"));
            }
            *slot = Some(unescape(kv.split_once('=').map_or("", |(_, v)| v))?);
        }
        let absolute = |p: String| -> std::result::Result<PathBuf, String> {
            if p.starts_with('/') && p.len() <= 4096 {
                Ok(PathBuf::from(p))
            } else {
                Err(format!("path {p:?} is not an absolute path"))
            }
        };
        Ok(QmpTarget {
            socket: absolute(socket.ok_or("qmp+unix:///DRIVE needs ?socket=PATH")?)?,
            drive,
            agent: agent.map(absolute).transpose()?,
            fleece: fleece.map(absolute).transpose()?,
        })
    }
}

/// The prefix of a live backup's work folder:
/// `coffre-fleece-<16 hex of vault and item>-<8 hex>`.
pub const WORK_PREFIX: &str = "coffre-fleece-";
/// The owner lock in a work folder, held while its run lives.
const OWNER_LOCK: &str = "owner.lock";
/// The longest Unix socket path (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The NBD socket of work folder `dir` (whose name ends `<tag>-<8 hex>`).
fn socket_of(dir: &Path) -> Option<PathBuf> {
    let name = dir.file_name()?.to_str()?.strip_prefix(WORK_PREFIX)?;
    Some(super::monitor_lock::lock_dir().join(format!("{name}.sock")))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Checks the folder a fleece's work folder goes in: owned by this user or
/// root, and writable by no one else unless sticky (as `/tmp` is).
pub fn check_fleece_base(base: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(base).map_err(|e| e.to_string())?;
    if m.uid() != euid() && m.uid() != 0 {
        return Err(format!(
            "it belongs to user {}, neither this user nor root",
            m.uid()
        ));
    }
    let sticky = m.mode() & 0o1000 != 0;
    if m.mode() & 0o022 != 0 && !sticky {
        return Err(format!(
            "others may write in it (mode {:o}) and it is not sticky: use a folder only this user can change",
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// A new work folder of this user's alone under `base`, for the fleece of
/// `tag` (its overlay, its NBD socket), with its owner lock held: a random
/// name, created (0700) only if it did not exist, so nothing another user
/// planted there is used.
pub fn new_work_dir(base: &Path, tag: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::DirBuilderExt;
    let mut last = None;
    for attempt in 0..16u64 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let r = blake3::hash(format!("{seed}-{}-{attempt}", std::process::id()).as_bytes());
        let dir = base.join(format!("{WORK_PREFIX}{tag}-{}", &r.to_hex()[..8]));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                let owner = coffre_vault_store::store::local::private::create_new_nofollow(
                    &dir.join(OWNER_LOCK),
                )
                .and_then(|f| f.try_lock().map(|()| f).map_err(std::io::Error::from));
                return match owner {
                    Ok(f) => Ok((dir, f)),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        Err(e)
                    }
                };
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no attempt made")))
}

/// Removes the work folders under `base` that a run of `tag` left when it
/// was killed: only folders named `coffre-fleece-<tag>-<8 hex>`, of this
/// user, not symbolic links, whose owner lock no live run holds (a folder
/// without one is a run's that died creating it, once a minute old).
/// Returns the folders removed.
pub fn remove_dead_work_dirs(base: &Path, tag: &str) -> Vec<PathBuf> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let prefix = format!("{WORK_PREFIX}{tag}-");
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if rest.len() != 8 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let dir = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != euid() {
            continue;
        }
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(OWNER_LOCK));
        let dead = match &lock {
            Ok(f) => f.try_lock().is_ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60)),
            Err(_) => false,
        };
        if dead && std::fs::remove_dir_all(&dir).is_ok() {
            // QEMU removes it when its NBD server stops; not if QEMU died.
            if let Some(socket) = socket_of(&dir) {
                let _ = std::fs::remove_file(socket);
            }
            removed.push(dir);
        }
    }
    removed
}

/// The point's export as the job reads it: a read that fails because QEMU
/// dropped the point in time (its overlay could not take a block) says so.
struct PointImage {
    inner: NbdImage,
    /// The folder the overlay is in.
    work: PathBuf,
    drive: String,
    socket: PathBuf,
}

impl PointImage {
    fn explain(&self, e: SnapError) -> SnapError {
        let SnapError::Nbd { .. } = e else {
            return e;
        };
        let free = free_bytes(&self.work);
        let cause = match free {
            Some(f) if f < 1 << 20 => format!(
                "the file system of its overlay ({}) is full ({f} bytes free)",
                self.work.display()
            ),
            _ => format!(
                "its overlay in {} could not take a block the guest overwrote (an I/O error, or a copy slower than {CBW_TIMEOUT_S} s)",
                self.work.display()
            ),
        };
        SnapError::Qmp {
            socket: self.socket.clone(),
            reason: format!(
                "the point in time of drive {} broke while it was read ({e}): QEMU drops the point, and lets the guest's writes through, when {cause}; nothing was kept. Give the overlay room for every block the guest overwrites during a backup (--fleece-dir)",
                self.drive
            ),
        }
    }
}

/// The bytes free to this user on the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `st` is zeroed then written by statvfs, `c` is a valid
    // NUL-terminated path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0)
            .then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

impl ImageSource for PointImage {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn window(&self, offset: u64, len: usize) -> Result<Window<'_>> {
        self.inner.window(offset, len).map_err(|e| self.explain(e))
    }

    fn window_for(
        &self,
        offset: u64,
        len: usize,
        wanted: &[std::ops::Range<usize>],
    ) -> Result<Window<'_>> {
        self.inner
            .window_for(offset, len, wanted)
            .map_err(|e| self.explain(e))
    }

    fn check_unchanged(&self) -> Result<()> {
        self.inner.check_unchanged()
    }

    fn fetches(&self) -> bool {
        self.inner.fetches()
    }

    fn served(&self) -> bool {
        self.inner.served()
    }

    fn change_stamp(&self) -> Option<crate::source::ChangeStamp> {
        self.inner.change_stamp()
    }
}

/// What a taken point holds in QEMU until it is released and settled.
struct Running {
    qmp: Qmp,
    fleece: Fleece,
    plan: Plan,
    work: PathBuf,
    /// The work folder's owner lock (released after the folder is gone).
    _owner: std::fs::File,
    /// The monitor's host lock, held until the point is released.
    _lock: MonitorLock,
}

/// A drive of a running VM, backed up through QEMU.
pub struct QmpDrive {
    target: QmpTarget,
    vault_id: String,
    running: Option<Running>,
    /// The bitmap chain's plan, kept from the instant to the settling.
    plan: Option<Plan>,
}

impl QmpDrive {
    /// The drive `target`, for the vault `vault_id` (each vault keeps its
    /// own bitmap chain).
    pub fn new(target: QmpTarget, vault_id: &str) -> QmpDrive {
        QmpDrive {
            target,
            vault_id: vault_id.to_string(),
            running: None,
            plan: None,
        }
    }

    fn take_point(&mut self, req: &TakeRequest<'_>) -> Result<Taken> {
        let holder = format!(
            "pid {}, job {}, item {}, vault {}",
            std::process::id(),
            req.job,
            req.item,
            req.vault_dir.display()
        );
        let lock = MonitorLock::acquire(&self.target.socket, &holder)?;
        let names = Names::of(&self.vault_id, req.item);
        let base = self
            .target
            .fleece
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let fleece_dir_error = |reason: String| SnapError::Qmp {
            socket: self.target.socket.clone(),
            reason: format!("fleece folder {}: {reason}", base.display()),
        };
        if !base.is_dir() {
            return Err(fleece_dir_error(
                "not a folder (it holds the point's overlay)".into(),
            ));
        }
        // The folder may come from the vault's catalog (the item's source):
        // it must be one only this user (or root) can change, or a sticky
        // one like /tmp, so that nobody can swap coffre's work folder for a
        // link between its creation and the overlay's.
        check_fleece_base(&base).map_err(fleece_dir_error)?;
        let mut qmp = Qmp::connect(&self.target.socket, QMP_TIMEOUT)?;
        // What a killed run of this vault and item left goes first: its
        // filter sits above the drive. The lock says no live run of this
        // monitor is using it.
        Fleece::remove_leftovers(&mut qmp, &names);
        let mut warnings = Vec::new();
        for dir in [Some(base.clone()), Some(std::env::temp_dir())]
            .into_iter()
            .flatten()
            .collect::<std::collections::BTreeSet<_>>()
        {
            for gone in remove_dead_work_dirs(&dir, &names.tag) {
                tracing::info!(folder = %gone.display(), "removed the work folder a killed run left");
            }
        }
        let drive = node::resolve_drive(&mut qmp, &self.target.drive, Names::is_filter)?;
        let parent = req
            .parent
            .filter(|c| c.source == HintSource::Bitmap.name())
            .and_then(|c| c.generation.as_deref());
        let plan = Chain::of(&self.vault_id, req.item).plan(&drive.node, parent, req.job);
        let (work, owner) = new_work_dir(&base, &names.tag).map_err(|e| {
            fleece_dir_error(format!("cannot create a private work folder in it: {e}"))
        })?;
        let socket = socket_of(&work).unwrap_or_else(|| work.join("nbd.sock"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            let _ = std::fs::remove_dir_all(&work);
            return Err(SnapError::Qmp {
                socket: self.target.socket.clone(),
                reason: format!(
                    "the NBD socket path {} is longer than a Unix socket path can be ({MAX_SOCKET_PATH} bytes): set XDG_RUNTIME_DIR or TMPDIR to a shorter folder",
                    socket.display()
                ),
            });
        }
        let fleece = match Fleece::prepare(&mut qmp, &drive, &names, &work, &socket) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        warnings.extend(plan.warnings.iter().cloned());
        let running = self.running.insert(Running {
            qmp,
            fleece,
            plan,
            work,
            _owner: owner,
            _lock: lock,
        });
        let source = self.target.source();
        let env = HookEnv {
            item: req.item,
            image: Path::new(&source),
            job: req.job,
            vault: req.vault_dir,
        };
        let ((took, frozen), hooks) = Around::run(req.hooks, env, || {
            instant(&self.target, running, &mut warnings)
        });
        let hooks_ok = hooks.succeeded(req.hooks, &mut warnings);
        took?;
        // In use, and atomic when the guest was frozen for the instant.
        let level = Level::of(hooks_ok, true, frozen.is_some());
        if req.hooks.is_set() && !hooks_ok {
            warnings.push(failed_hooks_warning(level));
        }
        self.plan = Some(running.plan.clone());
        let base = running.plan.base.clone();
        running.fleece.export(&mut running.qmp, base.as_deref())?;
        let image = NbdImage::open(&running.fleece.uri(), base.as_deref())?;
        let bitmap_hint = image.bitmap_hint()?;
        let image = PointImage {
            inner: image,
            work: running.work.clone(),
            drive: self.target.drive.clone(),
            socket: self.target.socket.clone(),
        };
        let hint = match bitmap_hint {
            Some(mut h) => {
                h.since = base;
                h.generation = Some(running.plan.new.clone());
                h
            }
            None => Hint::starting(
                HintSource::Bitmap,
                running.plan.new.clone(),
                image.size(),
                running.plan.why_no_base.clone(),
            ),
        };
        Ok(Taken {
            source: Box::new(image),
            hint: Some(hint),
            instant: PointInTime {
                level,
                warnings,
                freeze_ms: frozen.map(|d| d.as_millis() as u64),
            },
        })
    }
}

/// Freezes the guest (when an agent is given), takes the instant, thaws.
/// Returns the instant's outcome and, after a freeze and thaw that both
/// worked, how long the guest was frozen.
fn instant(
    target: &QmpTarget,
    running: &mut Running,
    warnings: &mut Vec<String>,
) -> (Result<()>, Option<Duration>) {
    let take = |running: &mut Running| {
        let (before, after) = (running.plan.before.clone(), running.plan.after.clone());
        running.fleece.take(&mut running.qmp, before, after)
    };
    let Some(socket) = &target.agent else {
        return (take(running), None);
    };
    let mut agent = match connect_agent(socket, warnings) {
        Some(a) => a,
        None => return (take(running), None),
    };
    let held = HeldSignals::hold();
    let start = Instant::now();
    // A failure's warning, and the instant when it was taken.
    let outcome = match agent.freeze() {
        Ok(guard) => {
            let took = take(running);
            match guard.thaw() {
                Ok(_) => Ok((took, start.elapsed())),
                Err(e) => Err((
                    format!(
                        "the guest's file systems could not be thawed at once ({e}); thawed through a new connection: the point is crash-consistent"
                    ),
                    Some(took),
                )),
            }
        }
        Err(e) => Err((
            format!(
                "the guest's file systems could not be frozen ({e}): the point is crash-consistent"
            ),
            None,
        )),
    };
    // The agent's socket takes one client at a time (QEMU accepts the
    // next only once this one is gone): a thaw through a new connection
    // waits for this one to close.
    drop(agent);
    let (took, frozen) = match outcome {
        Ok((took, window)) => (took, Some(window)),
        Err((warning, took)) => {
            warnings.push(warning);
            thaw_anew(socket, warnings);
            let took = took.unwrap_or_else(|| take(running));
            (took, None)
        }
    };
    drop(held);
    (took, frozen)
}

/// Connects to the agent; thaws a guest a killed run left frozen. `None`
/// (with a warning) when the agent cannot be used.
fn connect_agent(socket: &Path, warnings: &mut Vec<String>) -> Option<GuestAgent> {
    let token = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut agent = match GuestAgent::connect(socket, AGENT_TIMEOUT, token) {
        Ok(a) => a,
        Err(e) => {
            warnings.push(format!(
                "no file-system freeze ({e}): the point is crash-consistent"
            ));
            return None;
        }
    };
    match agent.freeze_status().as_deref() {
        Ok("frozen") => match agent.thaw() {
            Ok(_) => warnings.push(
                "the guest's file systems were left frozen (a backup died while they were): thawed"
                    .into(),
            ),
            Err(e) => {
                warnings.push(format!(
                    "the guest's file systems are frozen and could not be thawed ({e}): no freeze, the point is crash-consistent"
                ));
                return None;
            }
        },
        Ok(_) => {}
        Err(e) => {
            warnings.push(format!(
                "no file-system freeze ({e}): the point is crash-consistent"
            ));
            return None;
        }
    }
    Some(agent)
}

/// Thaws through a fresh connection (a timed-out one may be out of step).
fn thaw_anew(socket: &Path, warnings: &mut Vec<String>) {
    let token = std::process::id() as u64 ^ 0x5eed;
    let thawed = GuestAgent::connect(socket, AGENT_TIMEOUT, token).and_then(|mut a| a.thaw());
    if let Err(e) = thawed {
        let msg = format!(
            "the guest's file systems may still be frozen ({e}); the next backup of the item thaws them, or run `virsh domfsthaw`/guest-fsfreeze-thaw"
        );
        tracing::error!("{msg}");
        warnings.push(msg);
    }
}

/// The signals that end a process, held back while the guest is frozen.
const HELD: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// A held signal that arrived (0: none), raised again once released.
static CAUGHT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// How many holds are alive, and the actions the first one replaced.
static HOLDS: std::sync::Mutex<(usize, Vec<(libc::c_int, libc::sigaction)>)> =
    std::sync::Mutex::new((0, Vec::new()));

extern "C" fn defer(sig: libc::c_int) {
    // An atomic store is async-signal-safe.
    CAUGHT.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// The signals that end a process held back while it lives: blocked on
/// this thread, and caught (not acted on) on the others (a signal sent to
/// the process goes to any thread that does not block it: the job's
/// worker threads, a progress bar's). Once the last hold is released the
/// old actions come back and a signal caught meanwhile is raised again.
struct HeldSignals {
    old_mask: Option<libc::sigset_t>,
}

impl HeldSignals {
    fn hold() -> HeldSignals {
        let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
        if holds.0 == 0 {
            for sig in HELD {
                // SAFETY: the action is zeroed then filled (an empty mask,
                // a handler that only stores to an atomic); the old one is
                // written by the kernel.
                unsafe {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = defer as extern "C" fn(libc::c_int) as usize;
                    action.sa_flags = libc::SA_RESTART;
                    libc::sigemptyset(&mut action.sa_mask);
                    let mut old: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(sig, &action, &mut old) == 0 {
                        holds.1.push((sig, old));
                    }
                }
            }
        }
        holds.0 += 1;
        // SAFETY: the sets are initialised by sigemptyset before use, and
        // pthread_sigmask only changes this thread's mask.
        let old_mask = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in HELD {
                libc::sigaddset(&mut set, s);
            }
            (libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) == 0).then_some(old)
        };
        HeldSignals { old_mask }
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        {
            let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
            holds.0 = holds.0.saturating_sub(1);
            if holds.0 == 0 {
                for (sig, old) in holds.1.drain(..) {
                    // SAFETY: restores an action the kernel returned.
                    unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
                }
                let sig = CAUGHT.swap(0, std::sync::atomic::Ordering::SeqCst);
                if sig != 0 {
                    // Pending on this thread (still blocked) until the
                    // mask is restored below, then acted on as before.
                    // SAFETY: raise has no preconditions.
                    unsafe { libc::raise(sig) };
                }
            }
        }
        if let Some(old) = &self.old_mask {
            // SAFETY: restores the mask saved by `hold` on the same thread.
            unsafe {
                libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
            }
        }
    }
}

impl LiveSource for QmpDrive {
    fn take(&mut self, req: &TakeRequest<'_>) -> Result<Taken> {
        self.take_point(req)
    }

    fn release(&mut self) {
        // The monitor is let go with the point: a `-qmp` socket serves one
        // client, and the transfer may take hours.
        if let Some(mut r) = self.running.take() {
            r.fleece.stop(&mut r.qmp);
            let _ = std::fs::remove_dir_all(&r.work);
            if let Some(socket) = socket_of(&r.work) {
                let _ = std::fs::remove_file(socket);
            }
        }
    }

    fn settle(&mut self, committed: bool) -> Vec<String> {
        let Some(plan) = self.plan.take() else {
            return Vec::new();
        };
        if !committed {
            return Vec::new();
        }
        // Another backup on the monitor holds it (and QEMU's one client
        // slot) for its whole read: the bitmaps wait for the next run.
        let holder = format!("pid {}, removing old dirty bitmaps", std::process::id());
        let _lock = match MonitorLock::acquire(&self.target.socket, &holder) {
            Ok(l) => l,
            Err(e) => {
                return vec![format!(
                    "the old dirty bitmaps stay on the drive ({e}); the next backup removes them"
                )];
            }
        };
        let mut qmp = match Qmp::connect(&self.target.socket, QMP_TIMEOUT) {
            Ok(q) => q,
            Err(e) => {
                return vec![format!(
                    "the old dirty bitmaps stay on the drive ({e}); the next backup removes them"
                )];
            }
        };
        let mut warnings = Vec::new();
        for args in plan.after_commit() {
            if let Err(e) = qmp.execute("block-dirty-bitmap-remove", Some(args)) {
                warnings.push(format!(
                    "an old dirty bitmap stays on the drive ({e}); the next backup removes it"
                ));
            }
        }
        warnings
    }
}

impl Drop for QmpDrive {
    /// A job that ended early (an error, a panic) still lets the point go.
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip_through_their_source_and_bad_ones_are_refused() {
        let t = QmpTarget {
            socket: PathBuf::from("/run/vm a&b?/qmp%.sock"),
            drive: "vda".into(),
            agent: Some(PathBuf::from("/run/vm/qga#1.sock")),
            fleece: Some(PathBuf::from("/big disk/f&?")),
        };
        let s = t.source();
        assert!(crate::vm::is_qmp_source(&s), "{s}");
        assert_eq!(QmpTarget::parse(&s).unwrap(), t);
        assert!(s.ends_with("&fleece=/big disk/f%26%3F"), "{s}");
        let plain = QmpTarget {
            agent: None,
            fleece: None,
            ..t.clone()
        };
        assert_eq!(QmpTarget::parse(&plain.source()).unwrap(), plain);
        for bad in [
            "qmp+unix:///vda",
            "qmp+unix:///?socket=/s",
            "qmp+unix:///a/b?socket=/s",
            "qmp+unix:///vda?socket=rel",
            "qmp+unix:///vda?socket=/s&x=1",
            "qmp+unix:///vda?socket=/s%2",
            "qmp+unix:///vda?socket=/s%41",
            "qmp+unix:///vda?socket=/s&fleece=rel",
            "qmp+unix:///vda?socket=/s&fleece=",
            "qmp+unix:///vda?socket=/s&fleece=/a&fleece=/b",
            "nbd+unix:///vda?socket=/s",
        ] {
            assert!(QmpTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_fleece_folder_others_can_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let mine = t.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(check_fleece_base(&mine).is_ok());
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_fleece_base(&open).unwrap_err();
        assert!(e.contains("mode 777"), "{e}");
        // Sticky, like /tmp.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_fleece_base(&open).is_ok());
        assert!(check_fleece_base(Path::new("/tmp")).is_ok());
        // Another user's (as root: chown to nobody).
        if euid() == 0 {
            std::os::unix::fs::chown(&mine, Some(65534), None).unwrap();
            let e = check_fleece_base(&mine).unwrap_err();
            assert!(e.contains("belongs to user 65534"), "{e}");
        }
        assert!(check_fleece_base(&t.path().join("missing")).is_err());
    }
}
