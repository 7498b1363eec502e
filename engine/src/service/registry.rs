//! The host registry of protected images: which vault protects which
//! image file or device on this machine, so that a second vault refuses
//! to protect the same image (an image is protected in only one vault).
//!
//! One small file (`COFFRE_REGISTRY`, else `$XDG_STATE_HOME/coffre/
//! protected`, else `~/.local/state/coffre/protected`, or
//! `/var/lib/coffre/protected` for root) in a checksummed envelope
//! (`FORMAT.md`, "Envelope"), changed under an exclusive `flock`. An entry
//! whose vault or item no longer exists is stale and ignored.
//! `COFFRE_REGISTRY=off` turns the cross-vault check off (throw-away
//! benchmark rigs that reuse one image path in many vaults); the check
//! inside a vault stays.

use std::path::{Path, PathBuf};

use coffre_vault_store::SourceIdentity;
use coffre_vault_store::durable::write_atomic;
use coffre_vault_store::envelope;
use coffre_vault_store::private;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

const MAGIC: [u8; 8] = *b"CFREGST\0";
const VERSION: u32 = 1;

/// One protected image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// Canonical image path.
    pub path: PathBuf,
    /// File or device identity.
    pub identity: Option<SourceIdentity>,
    /// Vault directory.
    pub vault_dir: PathBuf,
    /// Vault id.
    pub vault_id: String,
    /// Vault name.
    pub vault_name: String,
    /// Item name in that vault.
    pub item: String,
}

/// The registry file.
#[derive(Clone, Debug)]
pub struct Registry {
    path: PathBuf,
    enabled: bool,
}

impl Registry {
    /// The registry at `path`.
    pub fn at(path: PathBuf) -> Self {
        Registry {
            path,
            enabled: true,
        }
    }

    /// A registry that records nothing and finds nothing.
    pub fn disabled() -> Self {
        Registry {
            path: PathBuf::new(),
            enabled: false,
        }
    }

    /// The registry chosen by the environment (see the module doc).
    pub fn from_env() -> Self {
        match std::env::var_os("COFFRE_REGISTRY") {
            Some(p) if p == "off" => return Registry::disabled(),
            Some(p) if !p.is_empty() => return Registry::at(PathBuf::from(p)),
            _ => {}
        }
        let state = std::env::var_os("XDG_STATE_HOME")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } == 0 {
                    Some(PathBuf::from("/var/lib"))
                } else {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state"))
                }
            })
            .unwrap_or_else(std::env::temp_dir);
        Registry::at(state.join("coffre").join("protected"))
    }

    fn fail(&self, reason: impl Into<String>) -> EngineError {
        EngineError::Registry {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn load(&self) -> Result<Vec<RegistryEntry>> {
        if !self.enabled {
            return Ok(Vec::new());
        }
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.fail(e.to_string())),
        };
        let (_, body) = envelope::decode(&MAGIC, VERSION, envelope::MAX_ENVELOPE_BODY, &bytes)
            .map_err(|e| self.fail(e.to_string()))?;
        serde_json::from_slice(body).map_err(|e| self.fail(e.to_string()))
    }

    /// Runs `f` on the entries under the registry's lock and stores them.
    fn update(&self, f: impl FnOnce(&mut Vec<RegistryEntry>)) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        private::create_dir_all(dir).map_err(|e| self.fail(e.to_string()))?;
        let lock_path = self.path.with_extension("lock");
        let lock = private::open_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.fail(e.to_string()))?;
        lock.lock().map_err(|e| self.fail(e.to_string()))?;
        let mut entries = self.load()?;
        f(&mut entries);
        let body = serde_json::to_vec_pretty(&entries).unwrap_or_default();
        write_atomic(&self.path, &envelope::encode(&MAGIC, VERSION, &body))
            .map_err(|e| self.fail(e.to_string()))
    }

    /// Entries for the image at `path` or with `identity`.
    pub fn lookup(
        &self,
        path: &Path,
        identity: Option<SourceIdentity>,
    ) -> Result<Vec<RegistryEntry>> {
        Ok(self
            .load()?
            .into_iter()
            .filter(|e| e.path == path || (identity.is_some() && e.identity == identity))
            .collect())
    }

    /// Records that `entry.vault_id` protects the image (replacing any
    /// entry of the same vault and item).
    pub fn record(&self, entry: RegistryEntry) -> Result<()> {
        self.update(|v| {
            v.retain(|e| !(e.vault_id == entry.vault_id && e.item == entry.item));
            v.push(entry);
        })
    }

    /// Forgets what `vault_id` recorded for `item`.
    pub fn forget(&self, vault_id: &str, item: &str) -> Result<()> {
        self.update(|v| v.retain(|e| !(e.vault_id == vault_id && e.item == item)))
    }
}

/// The identity of the file or block device at `path`.
pub fn identity_of(path: &Path) -> Option<SourceIdentity> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    Some(if m.file_type().is_block_device() {
        SourceIdentity {
            dev: 0,
            ino: m.rdev(),
        }
    } else {
        SourceIdentity {
            dev: m.dev(),
            ino: m.ino(),
        }
    })
}
