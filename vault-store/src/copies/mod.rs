//! The copies of a vault: the vault directory (primary), its LRS replicas
//! and its GRS secondary, each a [`Store`].
//!
//! Synchronous copies (primary and replicas) receive every segment append
//! and every catalog file; a write is acknowledged only when all of them
//! made it durable. The copies are written concurrently where it costs:
//! the fsyncs and the catalog files run on one thread per copy.
//!
//! Reads go to the first copy that returns a record whose CRC-32 and
//! BLAKE3 match; a copy that failed is repaired on the spot with those
//! bytes (same segment, same offset: copies are byte-identical at every
//! committed offset, invariant C1) and the repair is counted.
//!
//! In an encrypted vault every catalog file is sealed on its way to a
//! copy ([`crate::format::sealed_file`], bound to its name) and every
//! copy identity opened with the vault's keys.

pub mod generations;
#[cfg(feature = "index")]
pub mod quarantine;
pub mod sealed_state;
pub mod segment;
pub mod state_files;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, StoreError};
use crate::format::catalog_files::{self, COPY_FILE, Role};
use crate::format::config::VaultConfig;
pub use crate::store::SpaceInfo;
use crate::store::{LocalStore, SharedStore};

/// Wraps each copy's store (tests inject faults this way).
pub type StoreWrap = Arc<dyn Fn(Role, SharedStore) -> SharedStore + Send + Sync>;

/// One copy.
#[derive(Clone, Debug)]
pub struct Copy {
    /// What it is.
    pub role: Role,
    /// Its directory.
    pub dir: PathBuf,
    /// Its storage.
    pub store: SharedStore,
}

/// A copy that could not be used, and why.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Unavailable {
    /// What it is.
    pub role: Role,
    /// Its directory.
    pub dir: PathBuf,
    /// Why it cannot be used.
    pub reason: String,
}

/// The copies of an open vault.
#[derive(Debug)]
pub struct Copies {
    /// Primary first, then the replicas that are usable.
    sync: Vec<Copy>,
    /// The GRS secondary, when configured and usable (read fallback only).
    secondary: Option<Copy>,
    /// Configured copies that could not be used.
    unavailable: Vec<Unavailable>,
    repairs: AtomicU64,
    /// The primary is a shared vault's object store: point manifests are
    /// created conditionally.
    shared: bool,
    /// An encrypted vault's keys: catalog files are sealed with them.
    keys: Option<Arc<crate::crypto::VaultKeys>>,
}

/// The store a URL names (`azure://…`, `s3://…`).
#[cfg(feature = "object")]
pub fn open_url(url: &str) -> Result<SharedStore> {
    Ok(Arc::new(crate::store::object::ObjectStoreCopy::open(url)?))
}

/// The store a URL names: this build has no object-store support.
#[cfg(not(feature = "object"))]
pub fn open_url(url: &str) -> Result<SharedStore> {
    Err(StoreError::InvalidSetting {
        field: "store URL",
        reason: format!("{url}: this coffre was built without object-store support"),
    })
}

/// The same catalog record, however it was encoded (`a` as stored,
/// `b` as a plain envelope).
fn same_record(name: &str, a: &[u8], b: &[u8], keys: Option<&crate::crypto::VaultKeys>) -> bool {
    if a == b {
        return true;
    }
    let Ok(a) = crate::format::sealed_file::open(name, a, keys) else {
        return false;
    };
    let a = a.as_ref();
    if a == b {
        return true;
    }
    if name.starts_with(catalog_files::ITEMS_DIR) {
        return matches!(
            (catalog_files::decode_item(a), catalog_files::decode_item(b)),
            (Ok(x), Ok(y)) if x == y
        );
    }
    if name.starts_with(catalog_files::POLICIES_DIR) {
        return matches!(
            (catalog_files::decode_policy(a), catalog_files::decode_policy(b)),
            (Ok(x), Ok(y)) if x.name == y.name && x.policy == y.policy
        );
    }
    false
}

/// Replaces (or creates) `name` in a shared vault only if the store still
/// holds `before` (or still has no such file).
fn put_unless_changed(
    store: &dyn crate::store::Store,
    name: &str,
    bytes: &[u8],
    before: Option<&Vec<u8>>,
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<()> {
    let changed = || StoreError::CatalogChanged {
        file: format!("{}/{name}", store.location()),
    };
    match (store.get_version(name)?, before) {
        (None, None) => store
            .put_new(name, &seal(name, bytes, keys)?)?
            .then_some(())
            .ok_or_else(changed),
        (Some((cur, v)), Some(b)) if same_record(name, &cur, b, keys) => store
            .put_if(name, &seal(name, bytes, keys)?, &v)?
            .map(|_| ())
            .ok_or_else(changed),
        // Our own earlier attempt at this very update (a retried commit).
        (Some((cur, _)), _) if same_record(name, &cur, bytes, keys) => Ok(()),
        _ => Err(changed()),
    }
}

/// Writes point manifest `name` of a shared vault with a conditional
/// create; when the file exists it is overwritten only if it is the same
/// point (an update of its own record), never another host's point.
fn put_point_once(
    store: &dyn crate::store::Store,
    name: &str,
    bytes: &[u8],
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<()> {
    let sealed = seal(name, bytes, keys)?;
    if store.put_new(name, &sealed)? {
        return Ok(());
    }
    let ours = catalog_files::decode_point(bytes).map(|p| p.id).ok();
    let theirs = store
        .get(name)?
        .and_then(|b| catalog_files::decode_point_in(name, &b, keys).ok())
        .map(|p| p.id);
    if ours.is_some() && ours == theirs {
        return store.put(name, &sealed);
    }
    Err(StoreError::PointTaken {
        file: format!("{}/{name}", store.location()),
    })
}

/// The plain envelope `plain` of catalog file `name` as a copy stores it:
/// sealed with `keys` in an encrypted vault.
pub fn seal<'a>(
    name: &str,
    plain: &'a [u8],
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    crate::format::sealed_file::seal(name, plain, keys).map_err(|e| StoreError::CorruptFile {
        path: PathBuf::from(name),
        what: "catalog file",
        reason: format!("cannot seal it: {e}"),
    })
}

/// The store of a configured copy: a directory, or a store URL.
pub fn copy_store(dir: &Path) -> Result<SharedStore> {
    if crate::format::remote::is_store_url(dir) {
        return open_url(&dir.to_string_lossy());
    }
    Ok(Arc::new(LocalStore::new(dir)))
}

/// The primary store of the vault at `dir`: its object store when `dir`
/// is a shared vault's cache, else the directory.
pub fn primary_store(dir: &Path) -> Result<SharedStore> {
    match crate::format::remote::Remote::load(dir)? {
        Some(r) => open_url(&r.url),
        None => Ok(Arc::new(LocalStore::new(dir))),
    }
}

/// Checks that `dir` is a copy of the vault `vault_id` (a directory with
/// a matching identity, sealed with `keys` in an encrypted vault,
/// writable when `write`).
pub fn check_copy(
    store: &dyn crate::store::Store,
    dir: &Path,
    vault_id: &str,
    write: bool,
    keys: Option<&crate::crypto::VaultKeys>,
) -> std::result::Result<Role, String> {
    let url = crate::format::remote::is_store_url(dir);
    if !url && !dir.is_dir() {
        return Err("the directory is missing".into());
    }
    let bytes = match store.get(COPY_FILE) {
        Ok(Some(b)) => b,
        Ok(None) => return Err("it holds no copy identity (not a copy of this vault)".into()),
        Err(e) => return Err(e.to_string()),
    };
    let id = catalog_files::decode_copy_in(&bytes, keys)
        .map_err(|e| format!("corrupt copy identity {COPY_FILE}: {e}"))?;
    if id.vault_id != vault_id {
        return Err(format!(
            "it is a copy of another vault ({} {})",
            id.vault_name, id.vault_id
        ));
    }
    if write && !url && !writable(dir) {
        return Err("it is not writable".into());
    }
    Ok(id.role)
}

fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) with a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

impl Copies {
    /// The copies of the vault at `dir` with `config`. With `write`, a
    /// replica that is missing or unwritable is an error unless
    /// `degraded_ok`; readers skip it.
    pub fn open(
        dir: &Path,
        config: &VaultConfig,
        write: bool,
        degraded_ok: bool,
        wrap: Option<&StoreWrap>,
    ) -> Result<Copies> {
        let make = |role: Role, d: &Path| -> SharedStore {
            let s: SharedStore = Arc::new(LocalStore::new(d));
            match wrap {
                Some(w) => w(role, s),
                None => s,
            }
        };
        let remote = crate::format::remote::Remote::load(dir)?;
        let shared = remote.is_some();
        let keys = config.keys().map(|k| k.as_ref());
        let primary: SharedStore = match remote {
            Some(r) => {
                // An encrypted shared vault's leases, GC files, chunk
                // lists and host claims are sealed on their way.
                let s = sealed_state::wrap(open_url(&r.url)?, config.keys().cloned());
                match wrap {
                    Some(w) => w(Role::Primary, s),
                    None => s,
                }
            }
            None => make(Role::Primary, dir),
        };
        let mut sync = vec![Copy {
            role: Role::Primary,
            dir: dir.to_path_buf(),
            store: primary,
        }];
        let mut unavailable = Vec::new();
        for r in &config.replicas {
            let store = make(Role::Replica, r);
            match check_copy(store.as_ref(), r, &config.vault_id, write, keys) {
                Ok(_) => sync.push(Copy {
                    role: Role::Replica,
                    dir: r.clone(),
                    store,
                }),
                Err(reason) => {
                    if write && !degraded_ok {
                        return Err(StoreError::CopyUnavailable {
                            path: r.clone(),
                            reason,
                        });
                    }
                    tracing::warn!(replica = %r.display(), %reason, "replica unavailable; continuing degraded");
                    unavailable.push(Unavailable {
                        role: Role::Replica,
                        dir: r.clone(),
                        reason,
                    });
                }
            }
        }
        let mut secondary = None;
        if let Some(s) = &config.secondary {
            let store = if crate::format::remote::is_store_url(s) {
                match open_url(&s.to_string_lossy()) {
                    Ok(st) => match wrap {
                        Some(w) => w(Role::Secondary, st),
                        None => st,
                    },
                    Err(e) => {
                        unavailable.push(Unavailable {
                            role: Role::Secondary,
                            dir: s.clone(),
                            reason: e.to_string(),
                        });
                        return Ok(Copies {
                            sync,
                            secondary: None,
                            unavailable,
                            repairs: AtomicU64::new(0),
                            shared,
                            keys: config.keys().cloned(),
                        });
                    }
                }
            } else {
                make(Role::Secondary, s)
            };
            match check_copy(store.as_ref(), s, &config.vault_id, false, keys) {
                Ok(_) => {
                    secondary = Some(Copy {
                        role: Role::Secondary,
                        dir: s.clone(),
                        store,
                    })
                }
                Err(reason) => unavailable.push(Unavailable {
                    role: Role::Secondary,
                    dir: s.clone(),
                    reason,
                }),
            }
        }
        Ok(Copies {
            sync,
            secondary,
            unavailable,
            repairs: AtomicU64::new(0),
            shared,
            keys: config.keys().cloned(),
        })
    }

    /// The copies every write goes to (primary first).
    pub fn sync_copies(&self) -> &[Copy] {
        &self.sync
    }

    /// The primary copy.
    pub fn primary(&self) -> &Copy {
        // `open` always puts the primary first.
        #[expect(clippy::indexing_slicing, reason = "the primary is always present")]
        &self.sync[0]
    }

    /// The secondary, when configured and reachable.
    pub fn secondary(&self) -> Option<&Copy> {
        self.secondary.as_ref()
    }

    /// Copies that could not be used.
    pub fn unavailable(&self) -> &[Unavailable] {
        &self.unavailable
    }

    /// Every copy a read may use: the synchronous ones, then the secondary.
    pub fn readable(&self) -> impl Iterator<Item = &Copy> {
        self.sync.iter().chain(self.secondary.iter())
    }

    /// Runs `f` on every synchronous copy, concurrently when there are
    /// several; the first error wins (naming the copy).
    pub fn for_each_sync<F>(&self, f: F) -> Result<()>
    where
        F: Fn(&Copy) -> Result<()> + Sync,
    {
        if let [only] = self.sync.as_slice() {
            return f(only);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = self.sync.iter().map(|c| s.spawn(|| f(c))).collect();
            let mut first = Ok(());
            for h in handles {
                let r = h.join().unwrap_or_else(|_| {
                    Err(StoreError::CopyUnavailable {
                        path: PathBuf::new(),
                        reason: "a copy's writer thread panicked".into(),
                    })
                });
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })
    }

    /// Writes the catalog files of `files` that have bytes on every
    /// synchronous copy (before the index commit that records them).
    ///
    /// In a shared vault, `before` holds what this host's index had for
    /// each item and policy file (`None`: no such file): such a file is
    /// replaced only if the store still holds that (`If-Match`), or
    /// created only if it is still absent (`If-None-Match: *`), so an
    /// update another host made meanwhile is never overwritten; these come
    /// first, and the point manifests, created once each, after them.
    pub fn put_files(
        &self,
        files: &[(String, Option<Vec<u8>>)],
        before: &std::collections::HashMap<String, Vec<u8>>,
    ) -> Result<()> {
        if !files.iter().any(|(_, b)| b.is_some()) {
            return Ok(());
        }
        let keys = self.keys.as_deref();
        // Sealed once: every copy gets the same bytes.
        let sealed = if self.shared {
            Vec::new()
        } else {
            files
                .iter()
                .filter_map(|(n, b)| Some((n, b.as_ref()?)))
                .map(|(n, b)| Ok((n, seal(n, b, keys)?)))
                .collect::<Result<Vec<_>>>()?
        };
        self.for_each_sync(|c| {
            let store = c.store.as_ref();
            if !self.shared {
                for (name, b) in &sealed {
                    store.put(name, b)?;
                }
                return Ok(());
            }
            let (points, others): (Vec<_>, Vec<_>) = files
                .iter()
                .filter_map(|(n, b)| Some((n, b.as_ref()?)))
                .partition(|(n, _)| n.starts_with(catalog_files::POINTS_DIR));
            for (name, b) in others {
                put_unless_changed(store, name, b, before.get(name.as_str()), keys)?;
            }
            for (name, b) in points {
                put_point_once(store, name, b, keys)?;
            }
            Ok(())
        })
    }

    /// Removes the catalog files of `files` that have no bytes from every
    /// synchronous copy (after the index commit that forgot them).
    pub fn delete_files(&self, files: &[(String, Option<Vec<u8>>)]) -> Result<()> {
        if !files.iter().any(|(_, b)| b.is_none()) {
            return Ok(());
        }
        self.for_each_sync(|c| {
            for (name, bytes) in files {
                if bytes.is_none() {
                    c.store.delete(name)?;
                }
            }
            Ok(())
        })
    }

    /// The vault's keys, when it is encrypted.
    pub fn keys(&self) -> Option<&crate::crypto::VaultKeys> {
        self.keys.as_deref()
    }

    /// Counts one repaired copy of a record.
    pub fn count_repair(&self) {
        self.repairs.fetch_add(1, Ordering::Relaxed);
    }

    /// Records repaired on the fly since the vault was opened.
    pub fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
    }

    /// Forgets cached handles on every copy.
    pub fn forget(&self) {
        for c in self.readable() {
            c.store.forget();
        }
    }
}

/// Makes `dir` a new, empty copy of `config`'s vault with `role`: the
/// identity, the config and the folders.
pub fn init_copy(dir: &Path, config: &VaultConfig, role: Role) -> Result<()> {
    if crate::format::remote::is_store_url(dir) {
        let store = copy_store(dir)?;
        if check_copy(
            store.as_ref(),
            dir,
            &config.vault_id,
            true,
            config.keys().map(|k| k.as_ref()),
        )
        .is_ok()
        {
            return Ok(());
        }
        if store.get(crate::format::config::CONFIG_FILE)?.is_some()
            || store.get(COPY_FILE)?.is_some()
        {
            return Err(StoreError::AlreadyExists {
                path: dir.to_path_buf(),
            });
        }
        return write_copy_files(store.as_ref(), config, role);
    }
    let store = LocalStore::new(dir);
    if !store.root_is_empty()? {
        // An existing copy of this vault may be reused (re-adding it).
        // One killed between its identity and its config gets the config
        // now.
        if check_copy(
            &store,
            dir,
            &config.vault_id,
            true,
            config.keys().map(|k| k.as_ref()),
        )
        .is_ok()
        {
            use crate::store::Store as _;
            if store.get(crate::format::config::CONFIG_FILE)?.is_none() {
                store.put(crate::format::config::CONFIG_FILE, &config.encode()?)?;
            }
            return Ok(());
        }
        if left_by_init(&store, &config.vault_id, config.keys().map(|k| k.as_ref())) {
            // An earlier `init_copy` of this vault was interrupted before
            // the config: finish it.
            store.create_dir(crate::format::segment::SEGMENTS_DIR)?;
            return write_copy_files(&store, config, role);
        }
        return Err(StoreError::AlreadyExists {
            path: dir.to_path_buf(),
        });
    }
    store.create_root()?;
    store.create_dir(crate::format::segment::SEGMENTS_DIR)?;
    write_copy_files(&store, config, role)
}

/// True when the copy holds only what an interrupted [`init_copy`] of
/// vault `vault_id` writes before the config (which comes last): an empty
/// segments folder, this vault's identity file, temporary files.
fn left_by_init(
    store: &LocalStore,
    vault_id: &str,
    keys: Option<&crate::crypto::VaultKeys>,
) -> bool {
    use crate::store::Store as _;
    let Ok(names) = store.list("") else {
        return false;
    };
    names.iter().all(|listed| {
        let name = listed.trim_end_matches('/');
        if name == crate::format::segment::SEGMENTS_DIR {
            listed.ends_with('/') && store.dir_is_empty(name).unwrap_or(false)
        } else if name == COPY_FILE {
            store
                .get(COPY_FILE)
                .ok()
                .flatten()
                .and_then(|b| catalog_files::decode_copy_in(&b, keys).ok())
                .is_some_and(|c| c.vault_id == vault_id)
        } else {
            name.starts_with('.') && name.contains(".tmp-")
        }
    })
}

/// The files that make a store a copy of the vault: its identity, then
/// its config.
fn write_copy_files(
    store: &dyn crate::store::Store,
    config: &VaultConfig,
    role: Role,
) -> Result<()> {
    state_files::write_identity(store, config, role)?;
    state_files::store_config(store, config)
}
