//! Pre- and post-snapshot hooks (`coffre protect --pre-snapshot CMD
//! --post-snapshot CMD [--hook-timeout SECS]`), such as `virsh
//! domfsfreeze DOMAIN` / `virsh domfsthaw DOMAIN` or `fsfreeze -f MOUNT`.
//!
//! A hook is an argv, split from the command the user gave with shell
//! quoting rules ([`shlex`]) once, when it is set; it never runs through a
//! shell, and no item name is ever pasted into a command line. The hook
//! gets `COFFRE_ITEM`, `COFFRE_IMAGE`, `COFFRE_PHASE` (`pre` or `post`),
//! `COFFRE_JOB` and `COFFRE_VAULT` in its environment, no standard input,
//! and is killed when it outlives its timeout. The post hook runs whenever
//! the pre hook ran, even when the capture failed.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use coffre_vault_store::catalog::{DEFAULT_HOOK_TIMEOUT_SECS, Hooks};

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
    let mut child = Command::new(program)
        .args(args)
        .env("COFFRE_ITEM", env.item)
        .env("COFFRE_IMAGE", env.image)
        .env("COFFRE_PHASE", phase)
        .env("COFFRE_JOB", env.job)
        .env("COFFRE_VAULT", env.vault)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{phase}-snapshot hook {program:?} cannot start: {e}"))?;
    // Drain the pipes on threads so a chatty hook cannot block on them.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out);
            }
            out
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{phase}-snapshot hook {program:?}: {e}")),
        }
    };
    let _ = out.join();
    let stderr = err.join().unwrap_or_default();
    let mut said = String::from_utf8_lossy(&stderr).trim().to_string();
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
            "{phase}-snapshot hook {program:?} did not finish within {} s and was killed",
            timeout.as_secs_f64()
        )),
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!(
            "{phase}-snapshot hook {program:?} failed ({s}){said}"
        )),
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
}
