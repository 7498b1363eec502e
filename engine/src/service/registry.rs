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
//!
//! The registry is also this host's word on what it runs (README,
//! "Trust"): a vault's catalog may come from a bucket other hosts write,
//! so the hooks a backup runs are those `coffre protect` recorded here
//! ([`Registry::host_hooks`]), never the catalog's, and the scheduler
//! backs up only the items recorded here for the same image
//! ([`Registry::protected_here`]). With the registry off, the host has no
//! such record: no hooks run and the scheduler backs nothing up.

use std::path::{Path, PathBuf};

use coffre_vault_store::format::catalog::Hooks;
use coffre_vault_store::format::{envelope, host_registry};
use coffre_vault_store::store::local::durable::write_atomic;
use coffre_vault_store::store::local::private;
use coffre_vault_store::{ItemRecord, SourceIdentity};

use crate::error::{EngineError, Result};

pub use coffre_vault_store::format::host_registry::RegistryEntry;

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

    /// Where this host keeps its memory of encrypted vaults' sealed files
    /// (rollback protection): beside the registry, `None` when the
    /// registry is off.
    pub fn generations_dir(&self) -> Option<PathBuf> {
        self.enabled
            .then(|| PathBuf::from(format!("{}.generations", self.path.display())))
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
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.fail(e.to_string())),
        };
        // It says which commands this host runs: only a file of this
        // user's that nobody else can write is believed.
        let meta = file.metadata().map_err(|e| self.fail(e.to_string()))?;
        {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me || meta.mode() & 0o022 != 0 {
                return Err(self.fail(format!(
                    "it is owned by uid {} with mode {:o}, not private to uid {me}: refused (run chown/chmod 600, or remove it)",
                    meta.uid(),
                    meta.mode() & 0o7777
                )));
            }
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut file, envelope::MAX_ENVELOPE_BODY as u64 + 64),
            &mut bytes,
        )
        .map_err(|e| self.fail(e.to_string()))?;
        host_registry::decode(&bytes).map_err(|e| self.fail(e))
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
        write_atomic(&self.path, &host_registry::encode(&entries))
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

    /// What this host recorded for `item` of vault `vault_id`.
    pub fn entry(&self, vault_id: &str, item: &str) -> Result<Option<RegistryEntry>> {
        Ok(self
            .load()?
            .into_iter()
            .find(|e| e.vault_id == vault_id && e.item == item))
    }

    /// The items of vault `vault_id` this host protects: recorded here by
    /// `coffre protect` (or `coffre backup`) for the image the catalog
    /// names. The scheduler backs up only these.
    pub fn protected_here(&self, vault_id: &str, items: &[ItemRecord]) -> Result<Vec<String>> {
        let entries = self.load()?;
        Ok(items
            .iter()
            .filter(|i| {
                entries
                    .iter()
                    .any(|e| e.vault_id == vault_id && e.item == i.name && e.path == i.source)
            })
            .map(|i| i.name.clone())
            .collect())
    }

    /// The hooks this host runs for `item` of vault `vault_id`: those set
    /// here, never those the vault's catalog names. The second value is a
    /// warning when the catalog's differ (they do not run), or when the
    /// registry cannot say (then none run).
    pub fn host_hooks(&self, vault_id: &str, item: &ItemRecord) -> (Hooks, Option<String>) {
        let catalog = &item.hooks;
        let name = &item.name;
        let looked = if self.enabled {
            self.entry(vault_id, name)
        } else {
            Ok(None)
        };
        let own = match looked {
            Ok(e) => e.and_then(|e| e.hooks).filter(Hooks::is_set),
            Err(e) => {
                return (
                    Hooks::default(),
                    Some(format!("no hooks run for item {name}: {e}")),
                );
            }
        };
        let warning = match &own {
            Some(h) if h == catalog => None,
            None if !catalog.is_set() => None,
            _ if !self.enabled => Some(format!(
                "the vault's catalog names hooks for item {name}, but this host keeps no registry (COFFRE_REGISTRY=off): they do not run"
            )),
            None => Some(format!(
                "the vault's catalog names hooks for item {name} that were not set on this host: they do not run here (set them on this host with `coffre protect --item {name} --pre-snapshot CMD --post-snapshot CMD`)"
            )),
            Some(h) => Some(format!(
                "the vault's catalog names other hooks for item {name} than this host set: this host runs its own (pre {:?}, post {:?})",
                h.pre, h.post
            )),
        };
        (own.unwrap_or_default(), warning)
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
