//! Shared vaults in object storage, seen from one host: creating one in a
//! store, attaching a fresh cache directory to one, and keeping the cache
//! up to date with what other hosts committed.
//!
//! The store holds the vault: config, copy identity, segments, point
//! manifests, items and policies. A host's cache directory holds the
//! RocksDB index (a cache of the store, invariant C2), the local locks and
//! job records, a copy of the config, and the pointer ([`Remote`]).
//!
//! **Refresh.** Whenever a host opens the vault, it compares the store
//! with its index: a catalog file the index lacks (or the reverse), or
//! another host's segment whose length differs from what the index
//! scanned, means other hosts committed something. The cache is then
//! rebuilt from the store ([`crate::maintenance::rebuild`]): segments are scanned for
//! chunk locations and the reference counts are derived from the points.
//! After that the host deduplicates against every chunk any host stored.
//! A rebuild reads every segment. Each commit also uploads a chunk list
//! ([`crate::format::chunk_list`]) so that a later refresh can import only what
//! changed; that import is not in use yet (see `ARCHITECTURE.md`, "Object
//! storage").

pub mod gc;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Result, StoreError};
use crate::format::catalog_files::{self, COPY_FILE, CopyIdentity, Role};
use crate::format::config::{CONFIG_FILE, VaultConfig};
use crate::format::remote::{Remote, StoreUrl, host_file};
use crate::format::segment::{SEGMENTS_DIR, parse_segment_file_name};
use crate::index::{INDEX_DIR, Index};
use crate::store::{LocalStore, SharedStore, Store};
use crate::vault::{Access, Vault};

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

fn check_empty_cache(dir: &Path) -> Result<()> {
    if LocalStore::new(dir).root_is_empty()? {
        Ok(())
    } else {
        Err(StoreError::AlreadyExists {
            path: dir.to_path_buf(),
        })
    }
}

/// Like [`check_empty_cache`], but also accepts what an interrupted
/// attach left before it wrote the config (the config comes last, so a
/// directory without it is no vault): only the files [`write_cache`]
/// writes (an empty index folder, the pointer, the identity, their
/// temporary files). Attaching again then finishes the attach.
fn check_attachable(dir: &Path) -> Result<()> {
    let left_by_attach = |name: &str| {
        name == INDEX_DIR
            || name == crate::format::remote::REMOTE_FILE
            || name == COPY_FILE
            || (name.starts_with('.') && name.contains(".tmp-"))
    };
    let cache = LocalStore::new(dir);
    let Ok(listed) = cache.list("") else {
        return check_empty_cache(dir);
    };
    let names: Vec<&str> = listed.iter().map(|n| n.trim_end_matches('/')).collect();
    let index_empty = cache.dir_is_empty(INDEX_DIR).unwrap_or(true);
    if !names.is_empty() && index_empty && names.iter().all(|n| left_by_attach(n)) {
        tracing::info!(dir = %dir.display(), "finishing an interrupted attach");
        return Ok(());
    }
    check_empty_cache(dir)
}

/// The copy identity of a shared vault's store and caches, sealed in an
/// encrypted vault.
fn identity(config: &VaultConfig) -> Result<Vec<u8>> {
    let plain = catalog_files::encode_copy(&CopyIdentity {
        vault_id: config.vault_id.clone(),
        vault_name: config.name.clone(),
        role: Role::Primary,
    });
    Ok(crate::copies::seal(COPY_FILE, &plain, config.keys().map(|k| k.as_ref()))?.into_owned())
}

/// Claims a host tag in `store` and writes the cache directory's files:
/// the pointer, the identity and, last, the config (a directory without
/// it is not a vault).
fn write_cache(dir: &Path, url: &str, store: &SharedStore, config: &VaultConfig) -> Result<()> {
    let cache = LocalStore::new(dir);
    cache.create_root()?;
    cache.create_dir(INDEX_DIR)?;
    let host = host_name();
    // In an encrypted vault the claim (the host's name) is sealed.
    let sealed = crate::copies::sealed_state::wrap(store.clone(), config.keys().cloned());
    let tag = claim_tag(sealed.as_ref(), &host, seed())?;
    Remote {
        url: url.to_string(),
        host_tag: tag,
        host,
    }
    .store(dir)?;
    cache.put(COPY_FILE, &identity(config)?)?;
    config.store(dir)
}

/// Creates a shared vault in the store at `url`, with this host's cache in
/// `dir` (empty or missing), and returns it open for writing (an encrypted
/// one, whose `config` carries its keys, unlocked with `unlock`).
pub fn create_in_store(
    dir: &Path,
    url: &str,
    mut config: VaultConfig,
    unlock: Option<Arc<dyn crate::crypto::Unlock>>,
) -> Result<Vault> {
    config.validate()?;
    if !config.replicas.is_empty() || config.secondary.is_some() {
        return Err(StoreError::InvalidSetting {
            field: "store",
            reason: "a vault in object storage takes no local replicas or secondary".into(),
        });
    }
    let url = canonical_url(url)?;
    config.store = Some(url.clone());
    check_empty_cache(dir)?;
    let store = crate::copies::open_url(&url)?;
    check_container(store.as_ref(), &url)?;
    if store.get(CONFIG_FILE)?.is_some() {
        return Err(StoreError::InvalidSetting {
            field: "store",
            reason: format!(
                "{url} already holds a vault; attach to it with `coffre vault attach --store {url} --vault DIR`"
            ),
        });
    }
    store.put(COPY_FILE, &identity(&config)?)?;
    // The config is the store's last file: a store without it is no vault.
    // It holds no host-local setting (this host keeps its own in its cache).
    let (shared, _) = config.clone().without_host_settings();
    if !store.put_new(CONFIG_FILE, &shared.encode()?)? {
        return Err(StoreError::InvalidSetting {
            field: "store",
            reason: format!("{url}: another host created a vault there at the same moment"),
        });
    }
    write_cache(dir, &url, &store, &config)?;
    Vault::open_with(
        dir,
        Access::Write,
        &crate::vault::OpenOptions {
            unlock,
            ..Default::default()
        },
    )
}

/// Attaches the cache directory `dir` (empty or missing) to the shared
/// vault at `url`: downloads its config (an encrypted vault's unlocked with
/// `unlock`), claims a host tag and builds the index from the store.
/// Returns the vault open for writing.
pub fn attach(
    dir: &Path,
    url: &str,
    wait: Duration,
    unlock: Option<Arc<dyn crate::crypto::Unlock>>,
) -> Result<Vault> {
    let url = canonical_url(url)?;
    check_attachable(dir)?;
    let store = crate::copies::open_url(&url)?;
    check_container(store.as_ref(), &url)?;
    if store.get(CONFIG_FILE)?.is_none() {
        return Err(StoreError::InvalidSetting {
            field: "store",
            reason: format!(
                "{url} holds no coffre vault (no config); create one with `coffre vault create --store {url}`"
            ),
        });
    }
    let config = crate::copies::state_files::load_config_with(
        store.as_ref(),
        Path::new(&url),
        unlock.as_deref(),
    )?;
    let config = host_config(config, &url);
    let keys = config.keys().cloned();
    write_cache(dir, &url, &store, &config)?;
    // A GRS secondary in a container keeps its role: its cache reads, and
    // never writes, the copy.
    if let Some(id) = store.get(COPY_FILE)?
        && let Ok(c) = catalog_files::decode_copy_in(&id, keys.as_deref())
        && c.role != Role::Primary
    {
        if c.vault_id != config.vault_id {
            return Err(StoreError::CopyUnavailable {
                path: dir.to_path_buf(),
                reason: format!("{url} is a copy of another vault ({})", c.vault_id),
            });
        }
        LocalStore::new(dir).put(COPY_FILE, &id)?;
    }
    let (vault, report) =
        crate::maintenance::rebuild::rebuild_index_unlocked(dir, dir, wait, unlock)?;
    tracing::info!(vault = %dir.display(), %url, chunks = report.chunks, points = report.points, "attached to the shared vault");
    Ok(vault)
}

/// The config a host keeps in its cache from the store's `config`: the
/// store's, without the host-local settings (snapshot area, replicas,
/// secondary; [`VaultConfig::without_host_settings`]). The store is
/// shared with other hosts: it must not choose where this host writes
/// snapshots as root or where it copies the vault to.
pub fn host_config(config: VaultConfig, url: &str) -> VaultConfig {
    let (config, dropped) = config.without_host_settings();
    if !dropped.is_empty() {
        tracing::warn!(store = %url, ignored = ?dropped, "the shared vault's config sets host-local settings; they are ignored (each host sets its own with `coffre vault set`)");
    }
    config
}

/// Fails with one clear line when the container or bucket `url` names
/// does not exist (a listing answers 404): coffre does not create it
/// (the credentials of a vault's hosts need not allow it), so the line
/// says how.
fn check_container(store: &dyn Store, url: &str) -> Result<()> {
    let Err(e) = store.list("") else {
        return Ok(());
    };
    let StoreError::Object { reason, .. } = &e else {
        return Err(e);
    };
    let missing = ["ContainerNotFound", "NoSuchBucket", "404 Not Found"]
        .iter()
        .any(|m| reason.contains(m));
    let Ok(u) = StoreUrl::parse(url) else {
        return Err(e);
    };
    if !missing {
        return Err(e);
    }
    let how = match u.service {
        crate::format::remote::Service::Azure => format!(
            "create it first, e.g. `az storage container create --account-name {} --name {}`",
            u.account, u.container
        ),
        crate::format::remote::Service::S3 => {
            format!("create it first, e.g. `aws s3 mb s3://{}`", u.container)
        }
        crate::format::remote::Service::Memory => "create it first".to_string(),
    };
    let what = match u.service {
        crate::format::remote::Service::S3 => "bucket",
        _ => "container",
    };
    Err(StoreError::InvalidSetting {
        field: "store",
        reason: format!(
            "{url}: the {what} {:?} does not exist; {how}, then run again",
            u.container
        ),
    })
}

fn canonical_url(url: &str) -> Result<String> {
    StoreUrl::parse(url)
        .map(|u| u.to_url())
        .map_err(|reason| StoreError::InvalidSetting {
            field: "store URL",
            reason,
        })
}

/// True when the store holds something the index of `dir` does not know
/// (or the reverse): another host committed points, items, policies or
/// segment bytes, or removed points.
pub fn is_stale(dir: &Path, store: &dyn Store, own: std::ops::Range<u64>) -> Result<bool> {
    let index_dir = dir.join(INDEX_DIR);
    if !index_dir.join("CURRENT").is_file() || !crate::index::state::is_complete(dir) {
        return Ok(true);
    }
    let index = Index::open_read(&index_dir)?;
    let mut known: HashSet<String> = HashSet::new();
    for item in index.items()? {
        known.insert(catalog_files::item_file(&item.name));
        for p in index.points(&item.name)? {
            known.insert(catalog_files::point_file(&p.item, p.seq));
        }
    }
    for (name, _) in index.policy_values()? {
        known.insert(catalog_files::policy_file(&name));
    }
    let listed: HashSet<String> = crate::copies::state_files::list_catalog_files(store)?
        .into_iter()
        .collect();
    if listed != known {
        return Ok(true);
    }
    let infos = index.segment_infos()?;
    let mut in_store = HashSet::new();
    for name in store.list(SEGMENTS_DIR)? {
        let Some(id) = parse_segment_file_name(&name) else {
            continue;
        };
        in_store.insert(id);
        if own.contains(&id) {
            continue;
        }
        let size = store
            .size(&crate::format::segment::segment_name(id))?
            .unwrap_or(0);
        if infos.get(&id).map(|i| i.committed) != Some(size) {
            return Ok(true);
        }
    }
    // A segment the index knows that the store no longer has: a GC on
    // another host deleted it.
    Ok(infos.keys().any(|id| !in_store.contains(id)))
}

/// Brings the cache at `dir` up to date with its store (see the module
/// docs; an encrypted vault's unlocked with `unlock`); a no-op when
/// nothing changed.
pub fn refresh_cache(
    dir: &Path,
    wait: Duration,
    access: Access,
    unlock: Option<Arc<dyn crate::crypto::Unlock>>,
) -> Result<()> {
    let Some(remote) = Remote::load(dir)? else {
        return Ok(());
    };
    let store: SharedStore = crate::copies::open_url(&remote.url)?;
    if !is_stale(dir, store.as_ref(), remote.namespace())? {
        return Ok(());
    }
    tracing::info!(vault = %dir.display(), url = %remote.url, "other hosts changed the vault; refreshing the cache");
    match crate::maintenance::rebuild::rebuild_index_unlocked(dir, dir, wait, unlock) {
        Ok((vault, _)) => drop(vault),
        // A reader while this host writes: the cache as it is (what this
        // host committed is in it; the others' comes at the next open).
        Err(StoreError::VaultLocked { .. }) if access == Access::ReadOnly => {
            tracing::debug!(vault = %dir.display(), "cache in use by a local writer; not refreshed");
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Unlocks with a master key already in hand: the creating host's, which
/// just generated it.
pub struct KnownKey(pub crate::crypto::MasterKey);

impl crate::crypto::Unlock for KnownKey {
    fn master_key(
        &self,
        _vault: &Path,
        _slots: &[crate::crypto::KeySlot],
    ) -> std::result::Result<crate::crypto::MasterKey, crate::crypto::CryptoError> {
        Ok(self.0.clone())
    }
}

/// Claims a free host tag in `store` for `host` (a conditional create of
/// its claim file; tags are drawn at random until one is free).
pub fn claim_tag(store: &dyn Store, host: &str, seed: u64) -> Result<u16> {
    let mut x = seed | 1;
    for _ in 0..1024 {
        // xorshift: tags spread over the whole range.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let tag = (x % 65535) as u16 + 1;
        if store.put_new(&host_file(tag), host.as_bytes())? {
            return Ok(tag);
        }
    }
    Err(StoreError::InvalidSetting {
        field: "host tag",
        reason: format!("no free host tag found in {}", store.location()),
    })
}
