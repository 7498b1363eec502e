//! Running `virsh`: one process per call, no shell, in a process group of
//! its own killed whole after a timeout (with the `ssh` a remote URI
//! starts), its output awaited for a short grace period at most, and
//! bounded. What it prints is untrusted: the
//! caller parses it; an error is `virsh`'s own message, cut short.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::vm::pipe::drain;

/// The program run (`virsh`, from `PATH`).
pub const PROGRAM: &str = "virsh";

/// Most bytes of standard output kept (a domain's XML is a few KiB).
pub const MAX_STDOUT: u64 = 8 << 20;

/// Most characters of an error message kept.
const MAX_ERROR: usize = 600;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `virsh` cannot be started (not installed).
    Missing(String),
    /// It ran longer than its timeout and was killed.
    TimedOut(Duration),
    /// It exited with an error; its message (`error: ` prefixes removed).
    Refused(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Missing(why) => write!(
                f,
                "virsh cannot be started ({why}); install libvirt-clients"
            ),
            Failure::TimedOut(t) => write!(
                f,
                "virsh did not answer within {} s and was killed",
                t.as_secs()
            ),
            Failure::Refused(m) => f.write_str(m),
        }
    }
}

/// How long the output of a `virsh` that exited is still awaited while a
/// process it started holds the pipes open.
const EXITED_GRACE: Duration = Duration::from_secs(1);

/// How long the output is still awaited after the call's process group
/// was killed (a process that left the group may hold the pipes).
const KILLED_GRACE: Duration = Duration::from_millis(500);

/// Runs `virsh --connect CONNECT ARGS…` (no `--connect` when `connect` is
/// `None`: libvirt's default), and returns its standard output.
pub fn run(connect: Option<&str>, args: &[&str], timeout: Duration) -> Result<String, Failure> {
    let mut cmd = Command::new(PROGRAM);
    if let Some(c) = connect {
        cmd.arg("--connect").arg(c);
    }
    // `--quiet` drops virsh's chatter ("Domain backup started"); `LC_ALL=C`
    // keeps its messages in English for the callers that read them.
    cmd.arg("--quiet").args(args).env("LC_ALL", "C");
    run_command(cmd, timeout)
}

/// Kills the call's whole process group (virsh is its leader, not yet
/// reaped, so the group id is still its own: an `ssh` it started dies with
/// it) and reaps virsh.
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: killpg has no memory preconditions; the group is the
        // child's, which exists until the child is reaped below.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` in a process group of its own, killed whole after
/// `timeout`; its output is awaited a little longer (a process that left
/// the group may hold the pipes), never past a grace period.
fn run_command(mut cmd: Command, timeout: Duration) -> Result<String, Failure> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| Failure::Missing(e.to_string()))?;
    let out = drain(child.stdout.take(), MAX_STDOUT);
    let err = drain(child.stderr.take(), 64 << 10);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(&mut child);
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                kill_group(&mut child);
                return Err(Failure::Refused(format!("cannot wait for virsh: {e}")));
            }
        }
    };
    let grace = Instant::now()
        + if status.is_some() {
            EXITED_GRACE
        } else {
            KILLED_GRACE
        };
    let wait = || grace.saturating_duration_since(Instant::now());
    let stdout = out.recv_timeout(wait()).ok();
    let stderr = err.recv_timeout(wait()).ok().unwrap_or_default();
    match status {
        None => Err(Failure::TimedOut(timeout)),
        Some(s) if s.success() => match stdout {
            Some(o) => Ok(String::from_utf8_lossy(&o).into_owned()),
            None => Err(Failure::Refused(
                "virsh exited but a process it started still holds its output open".into(),
            )),
        },
        Some(s) => Err(Failure::Refused(message(&stderr, &s.to_string()))),
    }
}

/// virsh's error message: its non-empty lines without the `error: `
/// prefix, joined, cut to [`MAX_ERROR`] characters, control characters
/// dropped.
fn message(stderr: &[u8], status: &str) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim())
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .collect();
    let joined = if lines.is_empty() {
        format!("virsh failed ({status}) and said nothing")
    } else {
        lines.join("; ")
    };
    joined
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_ERROR)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_virsh_timeout_ends_the_call_whatever_holds_its_pipes() {
        // A child of the call holds its pipes: killed with the group.
        let start = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        assert_eq!(
            run_command(cmd, Duration::from_millis(300)),
            Err(Failure::TimedOut(Duration::from_millis(300)))
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );

        // One that left the group (setsid) still holds them: given up on
        // after the grace period.
        let start = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "setsid sleep 30 & sleep 30"]);
        assert_eq!(
            run_command(cmd, Duration::from_millis(300)),
            Err(Failure::TimedOut(Duration::from_millis(300)))
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );

        // A call that exited but left such a process: its output is not
        // taken for complete.
        let start = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hi; setsid sleep 30 &"]);
        assert!(matches!(
            run_command(cmd, Duration::from_secs(10)),
            Err(Failure::Refused(m)) if m.contains("still holds its output")
        ));
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );

        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo 'error: nope' >&2; exit 3"]);
        assert_eq!(
            run_command(cmd, Duration::from_secs(10)),
            Err(Failure::Refused("nope".into()))
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out"]);
        assert_eq!(
            run_command(cmd, Duration::from_secs(10)),
            Ok("out\n".into())
        );
    }

    #[test]
    fn messages_lose_their_prefix_and_are_bounded() {
        assert_eq!(
            message(
                b"error: failed to get domain 'x'\nerror: Domain not found\n",
                "exit 1"
            ),
            "failed to get domain 'x'; Domain not found"
        );
        assert_eq!(
            message(b"", "exit status: 1"),
            "virsh failed (exit status: 1) and said nothing"
        );
        let long = format!("error: {}\x1b[31m", "a".repeat(5000));
        let m = message(long.as_bytes(), "1");
        assert_eq!(m.len(), MAX_ERROR);
        assert!(!m.contains('\x1b'));
    }
}
