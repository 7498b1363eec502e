//! Pre- and post-snapshot hooks (`coffre protect --pre-snapshot CMD
//! --post-snapshot CMD [--hook-timeout SECS]`), such as `virsh
//! domfsfreeze DOMAIN` / `virsh domfsthaw DOMAIN` or `fsfreeze -f MOUNT`.
//!
//! A hook is an argv, split from the command the user gave with shell
//! quoting rules ([`shlex`]) once, when it is set; it never runs through a
//! shell, and no item name is ever pasted into a command line. The hook
//! gets a clean environment: `PATH`, `HOME` and `LANG` from coffre's, and
//! `COFFRE_ITEM`, `COFFRE_IMAGE`, `COFFRE_PHASE` (`pre` or `post`),
//! `COFFRE_JOB` and `COFFRE_VAULT`; nothing else (never an object store's
//! credentials). It has no standard input and runs as the leader of a
//! process group of its own: when it outlives its timeout the whole group
//! is killed (SIGKILL), children included. Its output is read without
//! blocking, so a child that keeps the pipes open cannot hold the backup
//! up: after the hook exits, its output is read for at most one more
//! second (a process it started in the background and that still runs is
//! left alone: a pre hook may start one on purpose, to hold a lock until
//! the post hook). The post hook runs whenever the pre hook ran, even when
//! the capture failed.
//!
//! Which hooks run is the caller's business: the engine passes only those
//! set on this host (the host registry), never those a vault's catalog
//! names (README, "Trust").

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub use coffre_vault_store::format::catalog::{DEFAULT_HOOK_TIMEOUT_SECS, Hooks};

use crate::error::{Result, SnapError};

/// Output of a failed hook kept for the message.
const MAX_OUTPUT: usize = 2000;

/// Splits a command into an argv with shell quoting rules (no shell runs).
pub fn parse_command(command: &str) -> Result<Vec<String>> {
    match shlex::split(command) {
        Some(argv) if !argv.is_empty() => Ok(argv),
        _ => Err(SnapError::BadHook {
            command: command.to_string(),
        }),
    }
}

/// What the hook sees of the job.
#[derive(Clone, Copy, Debug)]
pub struct HookEnv<'a> {
    /// Item name.
    pub item: &'a str,
    /// The image.
    pub image: &'a Path,
    /// Job id.
    pub job: &'a str,
    /// Vault directory.
    pub vault: &'a Path,
}

/// Running an item's hooks.
pub trait RunHooks {
    /// Runs the pre hook (nothing when unset); `Err` says why it failed.
    fn run_pre(&self, env: HookEnv<'_>) -> std::result::Result<(), String>;
    /// Runs the post hook (nothing when unset); `Err` says why it failed.
    fn run_post(&self, env: HookEnv<'_>) -> std::result::Result<(), String>;
}

impl RunHooks for Hooks {
    fn run_pre(&self, env: HookEnv<'_>) -> std::result::Result<(), String> {
        run(
            &self.pre,
            "pre",
            env,
            Duration::from_secs(self.timeout_secs),
        )
    }

    fn run_post(&self, env: HookEnv<'_>) -> std::result::Result<(), String> {
        run(
            &self.post,
            "post",
            env,
            Duration::from_secs(self.timeout_secs),
        )
    }
}

/// What a hook ended with (`None`: it was not run).
pub type HookOutcome = Option<std::result::Result<(), String>>;

/// What the hooks run around a capture or an instant ended with.
#[derive(Clone, Debug, Default)]
pub struct Around {
    /// The pre hook's outcome.
    pub pre: HookOutcome,
    /// The post hook's outcome.
    pub post: HookOutcome,
}

impl Around {
    /// Runs `hooks` around `f`: the pre hook when one is set, `f`, then the
    /// post hook whenever any hook is set, after a failed `f` too (a
    /// frozen guest must be thawed).
    pub fn run<T>(hooks: &Hooks, env: HookEnv<'_>, f: impl FnOnce() -> T) -> (T, Around) {
        let pre = (hooks.is_set() && !hooks.pre.is_empty()).then(|| hooks.run_pre(env));
        let out = f();
        let post = hooks.is_set().then(|| hooks.run_post(env));
        (out, Around { pre, post })
    }

    /// True when `hooks` are set and each that ran succeeded; the message
    /// of each that failed goes to `warnings`.
    pub fn succeeded(&self, hooks: &Hooks, warnings: &mut Vec<String>) -> bool {
        for r in [&self.pre, &self.post].into_iter().flatten() {
            if let Err(e) = r {
                warnings.push(e.clone());
            }
        }
        hooks.is_set()
            && self.pre.as_ref().is_none_or(|r| r.is_ok())
            && self.post.as_ref().is_none_or(|r| r.is_ok())
    }
}

/// The warning of a point whose hooks were set but failed: it has the
/// level it would have had without them.
pub fn failed_hooks_warning(level: coffre_vault_store::format::level::Level) -> String {
    format!("a hook failed: the point is {level}, not application-consistent")
}

/// `PATH` for a hook when coffre has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long the output of a hook that exited is still read while a
/// process it left behind holds the pipes open.
const EXITED_GRACE: Duration = Duration::from_secs(1);

/// How long the output is still read after the hook's group was killed
/// (a process that left the group may hold the pipes).
const KILLED_GRACE: Duration = Duration::from_millis(200);

/// Runs `argv` (nothing when empty) with the hook environment.
fn run(
    argv: &[String],
    phase: &str,
    env: HookEnv<'_>,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Ok(());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        // Nothing of coffre's environment (object-store keys, tokens)
        // but what a hook needs to run.
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH")
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| DEFAULT_PATH.into()),
        );
    for keep in ["HOME", "LANG"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    let mut child = cmd
        .env("COFFRE_ITEM", env.item)
        .env("COFFRE_IMAGE", env.image)
        .env("COFFRE_PHASE", phase)
        .env("COFFRE_JOB", env.job)
        .env("COFFRE_VAULT", env.vault)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills whatever it
        // started too.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{phase}-snapshot hook {program:?} cannot start: {e}"))?;
    let mut pipes = Pipes::new(child.stdout.take(), child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                // A process the hook left behind may hold the pipes: read
                // what is there, but not for long.
                pipes.drain_until((Instant::now() + EXITED_GRACE).min(deadline));
                break Some(status);
            }
            Ok(None) if Instant::now() >= deadline => {
                kill_group(&mut child);
                pipes.drain_until(Instant::now() + KILLED_GRACE);
                break None;
            }
            Ok(None) => pipes.read_for(Duration::from_millis(20)),
            Err(e) => {
                kill_group(&mut child);
                return Err(format!("{phase}-snapshot hook {program:?}: {e}"));
            }
        }
    };
    let mut said = String::from_utf8_lossy(&pipes.stderr).trim().to_string();
    if said.len() > MAX_OUTPUT {
        let mut cut = MAX_OUTPUT;
        while !said.is_char_boundary(cut) {
            cut -= 1;
        }
        said.truncate(cut);
    }
    let said = if said.is_empty() {
        String::new()
    } else {
        format!(": {said}")
    };
    match status {
        None => Err(format!(
            "{phase}-snapshot hook {program:?} did not finish within {} s and was killed{said}",
            timeout.as_secs_f64()
        )),
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!(
            "{phase}-snapshot hook {program:?} failed ({s}){said}"
        )),
    }
}

/// Kills the hook's whole process group (the hook is its leader, not yet
/// reaped, so the group id is still its own) and reaps the hook.
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: killpg has no memory preconditions; the group is the
        // hook's, which exists until the hook is reaped below.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The hook's stdout and stderr, read without blocking: nothing a hook or
/// its children do with the pipes can make coffre wait past the deadline.
struct Pipes {
    open: Vec<(std::os::fd::OwnedFd, bool)>,
    /// What the hook wrote to stderr (the first [`MAX_OUTPUT`] bytes and
    /// a little more; the rest is read and dropped).
    stderr: Vec<u8>,
}

impl Pipes {
    fn new(out: Option<ChildStdout>, err: Option<ChildStderr>) -> Pipes {
        let mut open = Vec::new();
        if let Some(o) = out {
            open.push((std::os::fd::OwnedFd::from(o), false));
        }
        if let Some(e) = err {
            open.push((std::os::fd::OwnedFd::from(e), true));
        }
        for (fd, _) in &open {
            // SAFETY: fcntl on a descriptor this struct owns.
            unsafe {
                let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                if flags >= 0 {
                    libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
                }
            }
        }
        Pipes {
            open,
            stderr: Vec::new(),
        }
    }

    /// Waits up to `wait` for output and reads what came; closes a pipe
    /// at its end.
    fn read_for(&mut self, wait: Duration) {
        if self.open.is_empty() {
            std::thread::sleep(wait);
            return;
        }
        let mut fds: Vec<libc::pollfd> = self
            .open
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return;
        }
        let mut buf = [0u8; 4096];
        let mut closed = Vec::new();
        for (i, p) in fds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            let (fd, is_err) = &self.open[i];
            // A bounded number of reads per round, so that a hook that
            // writes without end cannot keep us from the deadline.
            for _ in 0..16 {
                // SAFETY: reads into `buf` from a descriptor we own.
                let r = unsafe {
                    libc::read(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast::<libc::c_void>(),
                        buf.len(),
                    )
                };
                if r > 0 {
                    let got = &buf[..r as usize];
                    if *is_err && self.stderr.len() < MAX_OUTPUT * 2 {
                        self.stderr.extend_from_slice(got);
                    }
                    continue;
                }
                let e = std::io::Error::last_os_error();
                if r < 0 && e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if r == 0 || e.kind() != std::io::ErrorKind::WouldBlock {
                    closed.push(i);
                }
                break;
            }
        }
        for i in closed.into_iter().rev() {
            self.open.remove(i);
        }
    }

    /// Reads until both pipes are closed or `until`, then gives up on
    /// them (closing our ends).
    fn drain_until(&mut self, until: Instant) {
        loop {
            let now = Instant::now();
            if self.open.is_empty() || now >= until {
                break;
            }
            self.read_for((until - now).min(Duration::from_millis(50)));
        }
        self.open.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(item: &'a str) -> HookEnv<'a> {
        HookEnv {
            item,
            image: Path::new("/img/a b.img"),
            job: "j1",
            vault: Path::new("/v"),
        }
    }

    #[test]
    fn commands_split_like_a_shell_but_run_without_one() {
        assert_eq!(
            parse_command("virsh domfsfreeze 'my vm'").unwrap(),
            vec!["virsh", "domfsfreeze", "my vm"]
        );
        assert!(parse_command("echo 'unbalanced").is_err());
        assert!(parse_command("   ").is_err());
        // An item name full of shell syntax is only ever an env value.
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        let hooks = Hooks {
            pre: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "printf '%s|%s|%s' \"$COFFRE_ITEM\" \"$COFFRE_PHASE\" \"$COFFRE_IMAGE\" > {}",
                    out.display()
                ),
            ],
            post: vec![],
            timeout_secs: 10,
        };
        hooks.run_pre(env("x; rm -rf /")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "x; rm -rf /|pre|/img/a b.img"
        );
    }

    #[test]
    fn failure_and_timeout_are_reported() {
        let hooks = Hooks {
            pre: vec![
                "sh".into(),
                "-c".into(),
                "echo frozen fs busy >&2; exit 3".into(),
            ],
            post: vec!["sleep".into(), "5".into()],
            timeout_secs: 1,
        };
        let err = hooks.run_pre(env("vm")).unwrap_err();
        assert!(
            err.contains("exit status: 3") && err.contains("frozen fs busy"),
            "{err}"
        );
        let started = Instant::now();
        let err = hooks.run_post(env("vm")).unwrap_err();
        assert!(err.contains("did not finish within 1 s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(4));
        let missing = Hooks {
            pre: vec!["/nonexistent/freeze".into()],
            ..Hooks::default()
        };
        assert!(
            missing
                .run_pre(env("vm"))
                .unwrap_err()
                .contains("cannot start")
        );
    }

    /// Live processes (not zombies) whose command line holds `marker`.
    fn processes_with(marker: &str) -> Vec<u32> {
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            // The arguments are separated by NULs.
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !zombie && cmdline.contains(marker) {
                found.push(pid);
            }
        }
        found
    }

    /// Waits up to 2 s for no process to hold `marker`.
    fn gone(marker: &str) -> bool {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if processes_with(marker).is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn a_grandchild_holding_the_pipe_is_killed_with_the_hook_at_the_timeout() {
        let marker = format!("31.{}", std::process::id());
        let hooks = Hooks {
            pre: vec!["sh".into(), "-c".into(), format!("sleep {marker}; true")],
            post: vec![],
            timeout_secs: 1,
        };
        let started = Instant::now();
        let err = hooks.run_pre(env("vm")).unwrap_err();
        assert!(err.contains("did not finish within 1 s"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(
            gone(&format!("sleep {marker}")),
            "the hook's sleep survived it"
        );
    }

    #[test]
    fn a_background_child_holding_the_pipe_does_not_hold_the_hook_up() {
        let marker = format!("32.{}", std::process::id());
        let hooks = Hooks {
            pre: vec![
                "sh".into(),
                "-c".into(),
                format!("sleep {marker} & echo started"),
            ],
            post: vec![],
            timeout_secs: 20,
        };
        let started = Instant::now();
        hooks.run_pre(env("vm")).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // Left alone by design (a pre hook may hold a lock that way);
        // cleaned up here.
        for pid in processes_with(&format!("sleep {marker}")) {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    #[test]
    fn hooks_see_only_path_home_lang_and_the_job() {
        // The test harness runs with cargo's variables (CARGO_*, RUST_*)
        // set: none of them may reach the hook.
        assert!(std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("CARGO")));
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("env");
        let hooks = Hooks {
            pre: vec![
                "sh".into(),
                "-c".into(),
                format!("/usr/bin/env > {}", out.display()),
            ],
            post: vec![],
            timeout_secs: 10,
        };
        hooks.run_pre(env("vm")).unwrap();
        let names: Vec<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
            .collect();
        // `sh` itself adds PWD, SHLVL and `_`.
        let allowed = [
            "PATH",
            "HOME",
            "LANG",
            "COFFRE_ITEM",
            "COFFRE_IMAGE",
            "COFFRE_PHASE",
            "COFFRE_JOB",
            "COFFRE_VAULT",
            "PWD",
            "SHLVL",
            "_",
            "OLDPWD",
        ];
        for n in &names {
            assert!(allowed.contains(&n.as_str()), "the hook saw {n}: {names:?}");
        }
        assert!(names.iter().any(|n| n == "PATH") && names.iter().any(|n| n == "COFFRE_JOB"));
    }
}
