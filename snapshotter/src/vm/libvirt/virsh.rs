//! Running `virsh`: one process per call, no shell, a timeout after which
//! it is killed, and bounded output. What it prints is untrusted: the
//! caller parses it; an error is `virsh`'s own message, cut short.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Runs `virsh --connect CONNECT ARGS…` (no `--connect` when `connect` is
/// `None`: libvirt's default), and returns its standard output.
pub fn run(connect: Option<&str>, args: &[&str], timeout: Duration) -> Result<String, Failure> {
    let mut cmd = Command::new(PROGRAM);
    if let Some(c) = connect {
        cmd.arg("--connect").arg(c);
    }
    // `--quiet` drops virsh's chatter ("Domain backup started"); `LC_ALL=C`
    // keeps its messages in English for the callers that read them.
    cmd.arg("--quiet")
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Failure::Missing(e.to_string()))?;
    let out = child.stdout.take().map(|o| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut limited = o.take(MAX_STDOUT);
            let _ = limited.read_to_end(&mut buf);
            // Whatever is past the limit is read and dropped, so that
            // virsh never blocks on a full pipe.
            let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
            buf
        })
    });
    let err = child.stderr.take().map(|e| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut limited = e.take(64 << 10);
            let _ = limited.read_to_end(&mut buf);
            let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
            buf
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::Refused(format!("cannot wait for virsh: {e}")));
            }
        }
    };
    let stdout = out.and_then(|t| t.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|t| t.join().ok()).unwrap_or_default();
    match status {
        None => Err(Failure::TimedOut(timeout)),
        Some(s) if s.success() => Ok(String::from_utf8_lossy(&stdout).into_owned()),
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
