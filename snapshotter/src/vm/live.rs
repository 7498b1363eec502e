//! A drive of a running QEMU as a [`LiveSource`]: the backup job takes its
//! point in time itself, in this order:
//!
//! 1. the monitor is reached, the drive resolved to its node, and what a
//!    killed run of the item left in QEMU removed ([`Fleece::prepare`]);
//! 2. the item's pre hook runs, then the guest's file systems are frozen
//!    through the guest agent, when one is given (a guest a killed run
//!    left frozen is thawed first, and the job says so);
//! 3. **the instant**: one QMP `transaction` starts the fleecing job and
//!    moves the dirty-bitmap chain on ([`super::bitmap`]);
//! 4. the guest is thawed at once (the freeze window is measured and
//!    recorded), then the post hook runs;
//! 5. the point is exported over NBD on a private socket with the parent's
//!    bitmap, read by the job's capture, and released once captured;
//! 6. once the job knows the point is in the vault, the old part of the
//!    bitmap chain is removed; otherwise the chain stays for the next run.
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
use super::fleece::{Fleece, Names};
use super::node;
use super::qmp::Qmp;
use crate::cbt::{Hint, HintSource};
use crate::error::{Result, SnapError};
use crate::hooks::{Around, HookEnv, failed_hooks_warning};
use crate::nbd::NbdImage;
use crate::source::{ImageSource as _, LiveSource, PointInTime, TakeRequest, Taken};

/// How long one exchange with the monitor may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one exchange with the guest agent (a freeze, a thaw) may take.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a drive of a running VM is: its monitor, the drive, and the
/// guest agent's socket if there is one. Recorded as the item's source,
/// `qmp+unix:///DRIVE?socket=SOCKET[&agent=SOCKET]` (`%`, `&`, `?` and `#`
/// in paths are percent-escaped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpTarget {
    /// The QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    pub socket: PathBuf,
    /// A node name, drive id or device id.
    pub drive: String,
    /// The guest agent's socket (`-chardev socket,path=…` of a
    /// `virtio-serial` port named `org.qemu.guest_agent.0`).
    pub agent: Option<PathBuf>,
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
        let (mut socket, mut agent) = (None, None);
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("socket", v)) if !v.is_empty() => socket = Some(unescape(v)?),
                Some(("agent", v)) if !v.is_empty() => agent = Some(unescape(v)?),
                _ => return Err(format!("unknown or empty query part {kv:?}")),
            }
        }
        let absolute = |p: String| -> std::result::Result<PathBuf, String> {
            if p.starts_with('/') {
                Ok(PathBuf::from(p))
            } else {
                Err(format!("socket {p:?} is not an absolute path"))
            }
        };
        Ok(QmpTarget {
            socket: absolute(socket.ok_or("qmp+unix:///DRIVE needs ?socket=PATH")?)?,
            drive,
            agent: agent.map(absolute).transpose()?,
        })
    }
}

/// A new folder of this user's alone under the temporary directory, for a
/// fleece's overlay and socket: a random name, created (0700) only if it
/// did not exist, so nothing another user planted there is used.
pub fn private_work_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let tmp = std::env::temp_dir();
    let mut last = None;
    for attempt in 0..16u64 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tag = blake3::hash(format!("{seed}-{}-{attempt}", std::process::id()).as_bytes());
        let dir = tmp.join(format!("coffre-qmp-{}", &tag.to_hex()[..16]));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no attempt made")))
}

/// What a taken point holds in QEMU until it is released and settled.
struct Running {
    qmp: Qmp,
    fleece: Fleece,
    plan: Plan,
    work: PathBuf,
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
        let work = private_work_dir().map_err(|e| {
            SnapError::damaged(
                std::env::temp_dir(),
                format!("cannot create a private folder for the point in time: {e}"),
            )
        })?;
        let prepared = (|| {
            let mut qmp = Qmp::connect(&self.target.socket, QMP_TIMEOUT)?;
            // What a killed run left goes first: its filter sits above the
            // drive and would be taken for it.
            Fleece::remove_leftovers(&mut qmp, &Names::of(req.item));
            let node = node::resolve(&mut qmp, &self.target.drive)?;
            let parent = req
                .parent
                .filter(|c| c.source == HintSource::Bitmap.name())
                .and_then(|c| c.generation.as_deref());
            let plan = Chain::of(&self.vault_id, req.item).plan(&node, parent, req.job);
            let fleece = Fleece::prepare(&mut qmp, &node.name, node.size, req.item, &work)?;
            Ok((qmp, plan, fleece))
        })();
        let (qmp, plan, fleece) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        let running = self.running.insert(Running {
            qmp,
            fleece,
            plan,
            work,
        });
        let source = self.target.source();
        let env = HookEnv {
            item: req.item,
            image: Path::new(&source),
            job: req.job,
            vault: req.vault_dir,
        };
        let mut warnings = running.plan.warnings.clone();
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
        let hint = match image.bitmap_hint()? {
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
    let actions = running.plan.actions.clone();
    let Some(socket) = &target.agent else {
        return (running.fleece.take(&mut running.qmp, actions), None);
    };
    let mut agent = match connect_agent(socket, warnings) {
        Some(a) => a,
        None => return (running.fleece.take(&mut running.qmp, actions), None),
    };
    let held = HeldSignals::hold();
    let start = Instant::now();
    // A failure's warning, and the instant when it was taken.
    let outcome = match agent.freeze() {
        Ok(guard) => {
            let took = running.fleece.take(&mut running.qmp, actions.clone());
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
            let took = took.unwrap_or_else(|| {
                let actions = running.plan.actions.clone();
                running.fleece.take(&mut running.qmp, actions)
            });
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
        }
    }

    fn settle(&mut self, committed: bool) -> Vec<String> {
        let Some(plan) = self.plan.take() else {
            return Vec::new();
        };
        if !committed {
            return Vec::new();
        }
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
        };
        let s = t.source();
        assert!(crate::vm::is_qmp_source(&s), "{s}");
        assert_eq!(QmpTarget::parse(&s).unwrap(), t);
        let plain = QmpTarget {
            agent: None,
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
            "nbd+unix:///vda?socket=/s",
        ] {
            assert!(QmpTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
