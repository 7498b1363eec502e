//! Where an encrypted vault's key comes from: the key sources of one
//! command, in order:
//!
//! 1. `--key-file PATH` or `COFFRE_KEY_FILE`: a key file (a key-file slot);
//! 2. `COFFRE_PASSWORD_COMMAND`: a command (split like a shell would, run
//!    without one, in its own process group; it must end within 60 s,
//!    and what it leaves in its group is killed) whose first line of
//!    output is the passphrase;
//! 3. a prompt on the terminal, when there is one.
//!
//! The daemon and the scheduler have no terminal: they need 1 or 2
//! (README, "Encryption"). `vault copy` opens a second vault, its
//! destination, with sources of its own ([`KeySources::destination`]:
//! `--to-key-file` or `COFFRE_TO_KEY_FILE`, `COFFRE_TO_PASSWORD_COMMAND`,
//! a prompt). What a source unlocked is remembered for the
//! rest of the command, so a passphrase is stretched once however often
//! the vault is opened.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffre_engine::clock::Clock;
use coffre_engine::store::copies::generations::{HostGenerations, NanoClock};
use coffre_engine::store::crypto::slot::{
    MAX_KEY_FILE, MAX_PASSPHRASE, MIN_KEY_FILE, Secret, unlock_any,
};
use coffre_engine::store::crypto::{CryptoError, Generations, KeySlot, MasterKey, Unlock};
use zeroize::Zeroizing;

/// How long a password command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A secret read from a source.
pub enum Owned {
    /// A passphrase.
    Passphrase(Zeroizing<Vec<u8>>),
    /// A key file's bytes.
    KeyFile(Zeroizing<Vec<u8>>),
}

impl Owned {
    /// The secret, borrowed.
    pub fn secret(&self) -> Secret<'_> {
        match self {
            Owned::Passphrase(p) => Secret::Passphrase(p),
            Owned::KeyFile(k) => Secret::KeyFile(k),
        }
    }
}

/// A vault this command unlocked: its slots' wrapped keys, the master
/// key, and the id of the slot that opened (none for a recovery key).
type Unlocked = (Vec<String>, MasterKey, Option<String>);

/// One command's key sources.
pub struct KeySources {
    /// `--key-file` / `COFFRE_KEY_FILE`.
    pub key_file: Option<PathBuf>,
    /// `COFFRE_PASSWORD_COMMAND`.
    pub password_command: Option<String>,
    /// The variable the password command came from, for messages.
    command_var: &'static str,
    /// A master key given directly (`key import`).
    pub master: Option<MasterKey>,
    /// What was unlocked.
    unlocked: Mutex<Vec<Unlocked>>,
    /// Where the host remembers encrypted vaults' sealed files, and the
    /// clock their generations come from (rollback protection).
    memory: Option<(Option<PathBuf>, Arc<dyn Clock>)>,
}

impl KeySources {
    /// The sources of the environment and `--key-file`.
    pub fn from_env(key_file: Option<PathBuf>) -> KeySources {
        KeySources {
            key_file: key_file.or_else(|| std::env::var_os("COFFRE_KEY_FILE").map(PathBuf::from)),
            password_command: std::env::var("COFFRE_PASSWORD_COMMAND")
                .ok()
                .filter(|c| !c.trim().is_empty()),
            command_var: "COFFRE_PASSWORD_COMMAND",
            master: None,
            unlocked: Mutex::new(Vec::new()),
            memory: None,
        }
    }

    /// The sources of `vault copy`'s destination: `--to-key-file` or
    /// `COFFRE_TO_KEY_FILE`, then `COFFRE_TO_PASSWORD_COMMAND`, then a
    /// prompt. The source vault's are never tried on it.
    pub fn destination(key_file: Option<PathBuf>) -> KeySources {
        KeySources {
            key_file: key_file
                .or_else(|| std::env::var_os("COFFRE_TO_KEY_FILE").map(PathBuf::from))
                .filter(|p| !p.as_os_str().is_empty()),
            password_command: std::env::var("COFFRE_TO_PASSWORD_COMMAND")
                .ok()
                .filter(|c| !c.trim().is_empty()),
            command_var: "COFFRE_TO_PASSWORD_COMMAND",
            master: None,
            unlocked: Mutex::new(Vec::new()),
            memory: None,
        }
    }

    /// These sources, unlocking vaults with the host's memory of their
    /// sealed files in `dir` (or this process's only, for `None`), with
    /// generations from `clock`.
    pub fn remembering(mut self, dir: Option<PathBuf>, clock: Arc<dyn Clock>) -> KeySources {
        self.memory = Some((dir, clock));
        self
    }

    /// Sources that hold one master key (a recovery text).
    pub fn with_master(master: MasterKey) -> KeySources {
        KeySources {
            key_file: None,
            password_command: None,
            command_var: "COFFRE_PASSWORD_COMMAND",
            master: Some(master),
            unlocked: Mutex::new(Vec::new()),
            memory: None,
        }
    }

    /// The id of the slot that opened the vault last (none for a master
    /// key given directly).
    pub fn opened_slot(&self) -> Option<String> {
        self.unlocked
            .lock()
            .ok()
            .and_then(|u| u.last().and_then(|(_, _, s)| s.clone()))
    }

    /// The secret of the first source that has one (`what` says what for,
    /// on a prompt).
    pub fn secret(&self, what: &str) -> Result<Owned, CryptoError> {
        if let Some(path) = &self.key_file {
            return read_key_file(path).map(Owned::KeyFile);
        }
        if let Some(cmd) = &self.password_command {
            return run_password_command(cmd, self.command_var).map(Owned::Passphrase);
        }
        let sources = if self.command_var == "COFFRE_TO_PASSWORD_COMMAND" {
            "--to-key-file, COFFRE_TO_KEY_FILE or COFFRE_TO_PASSWORD_COMMAND"
        } else {
            "--key-file, COFFRE_KEY_FILE or COFFRE_PASSWORD_COMMAND"
        };
        prompt_or(&format!("passphrase of {what}: "), sources).map(Owned::Passphrase)
    }
}

impl KeySources {
    /// Forgets what this host remembers of the vault copies at `dirs`
    /// (rollback protection, encryption): `vault create` made them anew.
    pub fn forget(&self, dirs: &[&Path]) {
        let Some((Some(memory), _)) = &self.memory else {
            return;
        };
        for dir in dirs {
            let file = coffre_engine::store::copies::generations::memory_file(memory, dir);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "cannot forget the host's memory of a re-created vault")
                }
            }
        }
    }
}

impl Unlock for KeySources {
    fn remembers_encrypted(&self, vault: &Path) -> Option<PathBuf> {
        let (Some(memory), _) = self.memory.as_ref()? else {
            return None;
        };
        let file = coffre_engine::store::copies::generations::memory_file(memory, vault);
        file.exists().then_some(file)
    }

    fn generations(&self, vault: &Path, vault_id: &str) -> Option<Arc<dyn Generations>> {
        let (dir, clock) = self.memory.as_ref()?;
        let clock = clock.clone();
        let now: NanoClock =
            Box::new(move || u64::try_from(clock.now().as_nanosecond()).unwrap_or_default());
        let memory = match dir {
            Some(dir) => match HostGenerations::open(dir, vault, vault_id, now) {
                Ok(m) => m,
                Err(e) => {
                    // Refusing every file would lock the user out of the
                    // vault: say so loudly and go on without the memory.
                    tracing::warn!(error = %e, "rollback protection is off for this command");
                    return None;
                }
            },
            None => HostGenerations::in_process(vault, vault_id, now),
        };
        Some(Arc::new(memory))
    }

    fn master_key(&self, vault: &Path, slots: &[KeySlot]) -> Result<MasterKey, CryptoError> {
        let tag: Vec<String> = slots.iter().map(|s| s.wrapped.clone()).collect();
        // A vault this command unlocked already, whose slots changed since
        // (`key add`, `key passwd`): any slot it still has wraps the same key.
        if let Ok(u) = self.unlocked.lock()
            && let Some((_, k, _)) = u.iter().find(|(t, _, _)| t.iter().any(|w| tag.contains(w)))
        {
            return Ok(k.clone());
        }
        let (key, slot) = match &self.master {
            Some(m) => (m.clone(), None),
            None => {
                let owned = self.secret(&format!("vault {}", vault.display()))?;
                let secret = owned.secret();
                let (key, slot) = unlock_any(slots, &secret)?;
                (key, Some(slot))
            }
        };
        if let Ok(mut u) = self.unlocked.lock() {
            u.push((tag, key.clone(), slot));
        }
        Ok(key)
    }
}

/// Reads a key file: at least 32 bytes, at most 1 MiB.
pub fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    use std::io::Read;
    let bad = |reason: String| CryptoError::Malformed {
        what: format!("key file {}", path.display()),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut bytes = Zeroizing::new(Vec::new());
    f.take(MAX_KEY_FILE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() > MAX_KEY_FILE {
        return Err(bad("longer than 1 MiB".into()));
    }
    if bytes.len() < MIN_KEY_FILE {
        return Err(bad(format!(
            "{} bytes: a key file is not stretched, it holds at least {MIN_KEY_FILE} random bytes (`--generate-key-file` writes one)",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// How many random bytes `--generate-key-file` writes.
pub const GENERATED_KEY_FILE: usize = 32;

/// Writes a new key file at `path`: 32 random bytes from the operating
/// system, created 0600 and exclusively (an existing file or symlink is
/// refused, never overwritten), flushed to disk with its directory entry.
/// Returns its bytes.
pub fn generate_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let bytes =
        Zeroizing::new(coffre_engine::store::crypto::random::<GENERATED_KEY_FILE>()?.to_vec());
    write_new_private_file(path, &bytes).map_err(|reason| CryptoError::Malformed {
        what: format!("new key file {}", path.display()),
        reason,
    })?;
    Ok(bytes)
}

/// Writes `bytes` to a new file at `path`: created 0600 and exclusively
/// (an existing file or a symlink is refused, never overwritten), flushed
/// to disk with its directory entry; removed again if writing fails.
pub fn write_new_private_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                "exists already: it is never overwritten (choose a new path)".to_string()
            }
            _ => e.to_string(),
        })?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            std::fs::File::open(dir)?.sync_all()
        });
    if let Err(e) = written {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(e.to_string());
    }
    Ok(())
}

/// A key file `--generate-key-file` wrote in this command: removed if the
/// command fails before its slot is stored ([`Self::keep`] once it is).
pub struct GeneratedKeyFile {
    path: Option<PathBuf>,
}

impl GeneratedKeyFile {
    /// Nothing generated.
    pub fn none() -> GeneratedKeyFile {
        GeneratedKeyFile { path: None }
    }

    /// Generates one at `path`: its bytes, and the guard that removes it.
    pub fn create(path: &Path) -> Result<(Zeroizing<Vec<u8>>, GeneratedKeyFile), CryptoError> {
        let bytes = generate_key_file(path)?;
        Ok((
            bytes,
            GeneratedKeyFile {
                path: Some(path.to_path_buf()),
            },
        ))
    }

    /// Its slot is stored: the file stays.
    pub fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for GeneratedKeyFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The most a password command may print.
const MAX_COMMAND_OUTPUT: usize = 64 * 1024;

/// Runs a password command (`name` names it in errors): its first line.
pub fn run_password_command(cmd: &str, name: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    run_password_command_within(cmd, name, COMMAND_TIMEOUT)
}

/// [`run_password_command`] with its timeout. The command is split like a
/// shell would but run without one, in its own process group. Its output
/// is read on a thread, at most [`MAX_COMMAND_OUTPUT`] bytes. When it
/// ends, whatever it left in its group is killed (a child holding its
/// output open cannot make coffre wait); when it does not end within
/// `timeout`, the whole group is killed.
fn run_password_command_within(
    cmd: &str,
    name: &str,
    timeout: Duration,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let bad = |reason: String| CryptoError::Malformed {
        what: name.to_string(),
        reason,
    };
    let argv = shlex::split(cmd)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("cannot be split into arguments (unbalanced quotes?)".into()))?;
    let (prog, args) = argv.split_first().ok_or_else(|| bad("is empty".into()))?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(|e| bad(format!("cannot run {prog:?}: {e}")))?;
    let pid = libc::pid_t::try_from(child.id()).map_err(|e| bad(e.to_string()))?;
    let stdout = child.stdout.take();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Zeroizing::new(Vec::new());
        let read = match stdout {
            Some(s) => s
                .take(MAX_COMMAND_OUTPUT as u64 + 1)
                .read_to_end(&mut out)
                .map(|_| ()),
            None => Ok(()),
        };
        let _ = tx.send(read.map(|()| out));
    });
    let deadline = std::time::Instant::now() + timeout;
    // Waits for the command to end without reaping it, so that its group
    // id stays its own while the group is killed.
    let ended = loop {
        match exited(pid) {
            Ok(true) => break true,
            Ok(false) if std::time::Instant::now() >= deadline => break false,
            Ok(false) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                kill_group(pid);
                let _ = child.wait();
                return Err(bad(e.to_string()));
            }
        }
    };
    kill_group(pid);
    let status = child.wait().map_err(|e| bad(e.to_string()))?;
    if !ended {
        return Err(bad(format!(
            "did not end within {} s (killed, with what it started)",
            timeout.as_secs_f64()
        )));
    }
    let left = deadline
        .saturating_duration_since(std::time::Instant::now())
        .max(Duration::from_millis(100));
    let stdout = match rx.recv_timeout(left) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(bad(format!("cannot read its output: {e}"))),
        Err(_) => {
            return Err(bad(format!(
                "ended, but its output was still held open {} s later (by a process it started in another group)",
                timeout.as_secs_f64()
            )));
        }
    };
    if stdout.len() > MAX_COMMAND_OUTPUT {
        return Err(bad(format!(
            "printed more than {} KiB",
            MAX_COMMAND_OUTPUT / 1024
        )));
    }
    if !status.success() {
        return Err(bad(format!("failed ({status})")));
    }
    let first = stdout.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = Zeroizing::new(first.strip_suffix(b"\r").unwrap_or(first).to_vec());
    if line.is_empty() {
        return Err(bad("printed an empty passphrase".into()));
    }
    if line.len() > MAX_PASSPHRASE {
        return Err(bad(format!("printed more than {MAX_PASSPHRASE} bytes")));
    }
    Ok(line)
}

/// Whether process `pid` (a child of ours) has ended, without reaping it.
fn exited(pid: libc::pid_t) -> std::io::Result<bool> {
    // SAFETY: a zeroed siginfo_t is a valid value; waitid writes into the
    // struct it is given and reads nothing else.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (si_pid is 0 when nothing ended).
    Ok(unsafe { info.si_pid() } != 0)
}

/// Kills process group `pgid` (a command's, whose leader is not reaped
/// yet, so the id is still its group's).
fn kill_group(pgid: libc::pid_t) {
    // SAFETY: killpg has no memory preconditions.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// Asks for a passphrase on the terminal.
pub fn prompt(text: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    prompt_or(
        text,
        "--key-file, COFFRE_KEY_FILE or COFFRE_PASSWORD_COMMAND",
    )
}

/// Asks for a passphrase on the terminal; without one, the error names
/// `sources`, the other ways to give it.
fn prompt_or(text: &str, sources: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let no_tty = || CryptoError::Malformed {
        what: "the passphrase".into(),
        reason: format!("no terminal to ask on: give {sources}"),
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .is_err()
    {
        return Err(no_tty());
    }
    let p = rpassword::prompt_password(text).map_err(|_| no_tty())?;
    let p = Zeroizing::new(p.into_bytes());
    if p.is_empty() {
        return Err(CryptoError::Malformed {
            what: "the passphrase".into(),
            reason: "empty".into(),
        });
    }
    Ok(p)
}

/// Where a new slot's key file comes from.
#[derive(Clone, Copy)]
pub enum NewKeyFile<'a> {
    /// None: the new slot is a passphrase's.
    None,
    /// `--new-key-file`: an existing file.
    Read(&'a Path),
    /// `--generate-key-file`: written now.
    Generate(&'a Path),
}

impl<'a> NewKeyFile<'a> {
    /// From the two options (clap keeps them exclusive).
    pub fn of(new_key_file: Option<&'a Path>, generate: Option<&'a Path>) -> NewKeyFile<'a> {
        match (generate, new_key_file) {
            (Some(g), _) => NewKeyFile::Generate(g),
            (None, Some(r)) => NewKeyFile::Read(r),
            (None, None) => NewKeyFile::None,
        }
    }
}

/// A new secret for a new slot: a key file read or generated, else
/// `COFFRE_NEW_PASSWORD_COMMAND`, else asked twice on the terminal. A
/// generated file is removed when the guard is dropped before
/// [`GeneratedKeyFile::keep`].
pub fn new_secret(key_file: NewKeyFile<'_>) -> Result<(Owned, GeneratedKeyFile), CryptoError> {
    match key_file {
        NewKeyFile::Read(path) => {
            return Ok((
                Owned::KeyFile(read_key_file(path)?),
                GeneratedKeyFile::none(),
            ));
        }
        NewKeyFile::Generate(path) => {
            let (bytes, guard) = GeneratedKeyFile::create(path)?;
            return Ok((Owned::KeyFile(bytes), guard));
        }
        NewKeyFile::None => {}
    }
    new_passphrase().map(|p| (p, GeneratedKeyFile::none()))
}

/// A new passphrase: `COFFRE_NEW_PASSWORD_COMMAND`, else asked twice.
fn new_passphrase() -> Result<Owned, CryptoError> {
    if let Ok(cmd) = std::env::var("COFFRE_NEW_PASSWORD_COMMAND")
        && !cmd.trim().is_empty()
    {
        return run_password_command(&cmd, "COFFRE_NEW_PASSWORD_COMMAND").map(Owned::Passphrase);
    }
    let first = prompt("new passphrase: ")?;
    let again = prompt("new passphrase again: ")?;
    if first != again {
        return Err(CryptoError::Malformed {
            what: "the new passphrase".into(),
            reason: "the two entries differ".into(),
        });
    }
    Ok(Owned::Passphrase(first))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_generated_key_file_is_32_random_bytes_0600_and_never_overwrites() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("vault.key");
        let bytes = generate_key_file(&path).unwrap();
        assert_eq!(bytes.len(), 32);
        assert_eq!(*read_key_file(&path).unwrap(), *bytes);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = t.path().join("other.key");
        assert_ne!(*generate_key_file(&other).unwrap(), *bytes);
        // An existing file, or a symlink (even a dangling one), is refused
        // and left as it was.
        let err = generate_key_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("exists already") && err.contains("vault.key"),
            "{err}"
        );
        assert_eq!(*read_key_file(&path).unwrap(), *bytes);
        let link = t.path().join("link.key");
        std::os::unix::fs::symlink(t.path().join("nowhere"), &link).unwrap();
        assert!(generate_key_file(&link).is_err());
        assert!(!t.path().join("nowhere").exists());
    }

    /// An executable script in `dir`.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Whether process `pid` is gone (or a zombie), waiting up to 2 s.
    fn gone(pid: &str) -> bool {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return true,
                Ok(stat)
                    if stat
                        .rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .starts_with('Z') =>
                {
                    return true;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    }

    #[test]
    fn a_password_command_that_leaves_a_child_holding_its_output_does_not_hang() {
        let t = tempfile::tempdir().unwrap();
        let pidfile = t.path().join("pid");
        let cmd = script(
            t.path(),
            "leaves-child.sh",
            &format!(
                "sleep 100 &\necho $! > {}\necho 'the passphrase'",
                pidfile.display()
            ),
        );
        let started = std::time::Instant::now();
        let got = run_password_command_within(
            &format!("{}", cmd.display()),
            "test",
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(&got[..], b"the passphrase");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        assert!(gone(pid.trim()), "the sleep it left is killed");
    }

    #[test]
    fn a_password_command_that_never_ends_is_killed_with_its_group() {
        let t = tempfile::tempdir().unwrap();
        let pidfile = t.path().join("pid");
        let cmd = script(
            t.path(),
            "never-ends.sh",
            &format!(
                "sleep 100 &\necho $! > {}\necho pw\nwait",
                pidfile.display()
            ),
        );
        let started = std::time::Instant::now();
        let err = run_password_command_within(
            &format!("{}", cmd.display()),
            "TEST_COMMAND",
            Duration::from_millis(500),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("TEST_COMMAND") && err.contains("did not end within 0.5 s"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        assert!(gone(pid.trim()), "its child is killed too");
    }

    #[test]
    fn a_password_command_runs_without_a_shell_and_its_output_is_bounded() {
        let t = tempfile::tempdir().unwrap();
        let run = |cmd: &str| run_password_command_within(cmd, "test", Duration::from_secs(20));
        // No shell: `$HOME` is not expanded, `;` is an argument.
        assert_eq!(&run("echo $HOME ; x").unwrap()[..], b"$HOME ; x");
        assert_eq!(&run("printf 'a b\\r\\nsecond'").unwrap()[..], b"a b");
        let err = run("yes").unwrap_err().to_string();
        assert!(
            err.contains("more than 64 KiB") || err.contains("failed"),
            "{err}"
        );
        let big = script(t.path(), "big.sh", "head -c 70000 /dev/zero");
        let err = run(&big.display().to_string()).unwrap_err().to_string();
        assert!(err.contains("more than 64 KiB"), "{err}");
        let err = run("false").unwrap_err().to_string();
        assert!(err.contains("failed"), "{err}");
        assert!(run("true").unwrap_err().to_string().contains("empty"));
        assert!(run("'unbalanced").is_err());
        assert!(run("/nonexistent/command").is_err());
    }

    #[test]
    fn a_short_key_file_is_refused_naming_it() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("short.key");
        std::fs::write(&path, [7u8; 31]).unwrap();
        let err = read_key_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("short.key") && err.contains("31 bytes"),
            "{err}"
        );
        std::fs::write(&path, [7u8; 32]).unwrap();
        assert!(read_key_file(&path).is_ok());
    }

    #[test]
    fn a_generated_key_file_is_removed_unless_kept() {
        let t = tempfile::tempdir().unwrap();
        let (gone, kept) = (t.path().join("gone.key"), t.path().join("kept.key"));
        drop(GeneratedKeyFile::create(&gone).unwrap());
        assert!(!gone.exists());
        let (_, guard) = GeneratedKeyFile::create(&kept).unwrap();
        guard.keep();
        assert!(kept.exists());
        let (secret, guard) = new_secret(NewKeyFile::Generate(&gone)).unwrap();
        assert!(matches!(secret, Owned::KeyFile(ref b) if b.len() == 32));
        drop(guard);
        assert!(!gone.exists());
    }
}
