//! Where an encrypted vault's key comes from: the key sources of one
//! command, in order:
//!
//! 1. `--key-file PATH` or `COFFRE_KEY_FILE`: a key file (a key-file slot);
//! 2. `COFFRE_PASSWORD_COMMAND`: a command (split like a shell would, run
//!    without one) whose first line of output is the passphrase;
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
use coffre_engine::store::crypto::slot::{MAX_KEY_FILE, MAX_PASSPHRASE, Secret, unlock_any};
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

    fn generations(&self, vault: &Path) -> Option<Arc<dyn Generations>> {
        let (dir, clock) = self.memory.as_ref()?;
        let clock = clock.clone();
        let now: NanoClock =
            Box::new(move || u64::try_from(clock.now().as_nanosecond()).unwrap_or_default());
        let memory = match dir {
            Some(dir) => match HostGenerations::open(dir, vault, now) {
                Ok(m) => m,
                Err(e) => {
                    // Refusing every file would lock the user out of the
                    // vault: say so loudly and go on without the memory.
                    tracing::warn!(error = %e, "rollback protection is off for this command");
                    return None;
                }
            },
            None => HostGenerations::in_process(vault, now),
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
    Ok(bytes)
}

/// Runs a password command (`name` names it in errors): its first line.
pub fn run_password_command(cmd: &str, name: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
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
        .spawn()
        .map_err(|e| bad(format!("cannot run {prog:?}: {e}")))?;
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > COMMAND_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(bad(format!(
                    "did not end within {} s",
                    COMMAND_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    let out = child.wait_with_output().map_err(|e| bad(e.to_string()))?;
    let stdout = Zeroizing::new(out.stdout);
    if !out.status.success() {
        return Err(bad(format!("failed ({})", out.status)));
    }
    let line: Vec<u8> = stdout
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default()
        .strip_suffix(b"\r")
        .map_or_else(
            || {
                stdout
                    .split(|&b| b == b'\n')
                    .next()
                    .unwrap_or_default()
                    .to_vec()
            },
            <[u8]>::to_vec,
        );
    let line = Zeroizing::new(line);
    if line.is_empty() {
        return Err(bad("printed an empty passphrase".into()));
    }
    if line.len() > MAX_PASSPHRASE {
        return Err(bad(format!("printed more than {MAX_PASSPHRASE} bytes")));
    }
    Ok(line)
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

/// A new secret for a new slot: `--new-key-file`, else
/// `COFFRE_NEW_PASSWORD_COMMAND`, else asked twice on the terminal.
pub fn new_secret(new_key_file: Option<&Path>) -> Result<Owned, CryptoError> {
    if let Some(path) = new_key_file {
        return read_key_file(path).map(Owned::KeyFile);
    }
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
