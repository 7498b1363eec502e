//! Shared vaults in object storage, seen from one host: creating one in a
//! store, attaching a fresh cache directory to one, and keeping the cache
//! up to date with what other hosts committed.
//!
//! The store holds the vault: config, copy identity, segments, point
//! manifests, items and policies. A host's cache directory holds the
//! RocksDB index (a cache of the store, invariant C2), the local locks and
//! job records, a copy of the config, and the pointer ([`Remote`]).
//!
//! **Refresh.** Whenever a host opens the vault, it imports what changed
//! in the store since: catalog files (new, changed and removed points,
//! items and policies), the chunk lists other hosts' commits wrote
//! ([`crate::chunk_list`]: about 48 bytes per new chunk, never the data),
//! and segments GC deleted; then it counts references again from the
//! points. After that it deduplicates against every chunk any host
//! committed. A cache without an index (a fresh host) is built by a full
//! rebuild ([`crate::rebuild`]), which scans the segments themselves.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use crate::catalog_files::{self, COPY_FILE, CopyIdentity, Role};
use crate::chunk_id::ChunkId;
use crate::config::{CONFIG_FILE, VaultConfig};
use crate::error::{Result, StoreError};
use crate::index::{INDEX_DIR, Index};
use crate::remote::{Remote, StoreUrl, claim_tag};
use crate::segment::{SEGMENTS_DIR, parse_segment_file_name};
use crate::store::{SharedStore, Store};
use crate::vault::{Access, OpenOptions, Vault};

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
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(StoreError::AlreadyExists {
                    path: dir.to_path_buf(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("read directory", dir, e)),
    }
}

fn identity(config: &VaultConfig) -> Vec<u8> {
    catalog_files::encode_copy(&CopyIdentity {
        vault_id: config.vault_id.clone(),
        vault_name: config.name.clone(),
        role: Role::Primary,
    })
}

/// Claims a host tag in `store` and writes the cache directory's files:
/// the pointer, the identity and, last, the config (a directory without
/// it is not a vault).
fn write_cache(dir: &Path, url: &str, store: &dyn Store, config: &VaultConfig) -> Result<()> {
    crate::durable::create_dir_durable(dir)?;
    crate::durable::create_dir_durable(&dir.join(INDEX_DIR))?;
    let host = host_name();
    let tag = claim_tag(store, &host, seed())?;
    Remote {
        url: url.to_string(),
        host_tag: tag,
        host,
    }
    .store(dir)?;
    crate::durable::write_atomic(&dir.join(COPY_FILE), &identity(config))?;
    config.store(dir)
}

/// Creates a shared vault in the store at `url`, with this host's cache in
/// `dir` (empty or missing), and returns it open for writing.
pub fn create_in_store(dir: &Path, url: &str, mut config: VaultConfig) -> Result<Vault> {
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
    if store.get(CONFIG_FILE)?.is_some() {
        return Err(StoreError::InvalidSetting {
            field: "store",
            reason: format!(
                "{url} already holds a vault; attach to it with `coffre vault attach --store {url} --vault DIR`"
            ),
        });
    }
    store.put(COPY_FILE, &identity(&config))?;
    // The config is the store's last file: a store without it is no vault.
    if !store.put_new(CONFIG_FILE, &config.encode())? {
        return Err(StoreError::InvalidSetting {
            field: "store",
            reason: format!("{url}: another host created a vault there at the same moment"),
        });
    }
    write_cache(dir, &url, store.as_ref(), &config)?;
    Vault::open(dir, Access::Write)
}

/// Attaches the cache directory `dir` (empty or missing) to the shared
/// vault at `url`: downloads its config, claims a host tag and builds the
/// index from the store. Returns the vault open for writing.
pub fn attach(dir: &Path, url: &str, wait: Duration) -> Result<Vault> {
    let url = canonical_url(url)?;
    check_empty_cache(dir)?;
    let store = crate::copies::open_url(&url)?;
    let Some(bytes) = store.get(CONFIG_FILE)? else {
        return Err(StoreError::InvalidSetting {
            field: "store",
            reason: format!(
                "{url} holds no coffre vault (no config); create one with `coffre vault create --store {url}`"
            ),
        });
    };
    let config = VaultConfig::decode(&bytes, Path::new(&format!("{url}/{CONFIG_FILE}")))?;
    write_cache(dir, &url, store.as_ref(), &config)?;
    // A GRS secondary in a container keeps its role: its cache reads, and
    // never writes, the copy.
    if let Some(id) = store.get(COPY_FILE)?
        && let Ok(c) = catalog_files::decode_copy(&id)
        && c.role != Role::Primary
    {
        if c.vault_id != config.vault_id {
            return Err(StoreError::CopyUnavailable {
                path: dir.to_path_buf(),
                reason: format!("{url} is a copy of another vault ({})", c.vault_id),
            });
        }
        crate::durable::write_atomic(&dir.join(COPY_FILE), &id)?;
    }
    let (vault, report) = crate::rebuild::rebuild_index(dir, dir, wait)?;
    tracing::info!(vault = %dir.display(), %url, chunks = report.chunks, points = report.points, "attached to the shared vault");
    Ok(vault)
}

fn canonical_url(url: &str) -> Result<String> {
    StoreUrl::parse(url)
        .map(|u| u.to_url())
        .map_err(|reason| StoreError::InvalidSetting {
            field: "store URL",
            reason,
        })
}

/// The chunk lists a cache has imported (`CACHE/imported-lists`: one
/// name a line; a cache, rebuilt when lost).
const IMPORTED_FILE: &str = "imported-lists";

fn load_imported(dir: &Path) -> HashSet<String> {
    std::fs::read_to_string(dir.join(IMPORTED_FILE))
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

fn store_imported(dir: &Path, names: &HashSet<String>) -> Result<()> {
    let mut v: Vec<&String> = names.iter().collect();
    v.sort();
    let text: String = v.iter().map(|n| format!("{n}\n")).collect();
    crate::durable::write_atomic(&dir.join(IMPORTED_FILE), text.as_bytes())
}

/// Every chunk list in the store.
pub fn chunk_lists(store: &dyn Store) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for seg in store.list(crate::chunk_list::CHUNK_LISTS_DIR)? {
        let Some(seg) = seg.strip_suffix('/') else {
            continue;
        };
        let dir = format!("{}/{seg}", crate::chunk_list::CHUNK_LISTS_DIR);
        for n in store.list(&dir)? {
            let name = format!("{dir}/{n}");
            if crate::chunk_list::parse_list_name(&name).is_some() {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// Records, after a full rebuild, that every list listed before its scan
/// is in the index.
pub fn mark_imported(dir: &Path, names: Vec<String>) -> Result<()> {
    store_imported(dir, &names.into_iter().collect())
}

/// Brings the cache at `dir` up to date with its store (see the module
/// docs): a full rebuild when it has no index, else an import of what
/// changed — catalog files, the chunk lists of other hosts' commits, and
/// segments GC deleted — after which the next writer recounts references.
pub fn refresh_cache(dir: &Path, wait: Duration, access: Access) -> Result<()> {
    let Some(remote) = Remote::load(dir)? else {
        return Ok(());
    };
    let store: SharedStore = crate::copies::open_url(&remote.url)?;
    let index_dir = dir.join(INDEX_DIR);
    if !index_dir.join("CURRENT").is_file() {
        tracing::info!(vault = %dir.display(), url = %remote.url, "building the cache from the store");
        drop(crate::rebuild::rebuild_index(dir, dir, wait)?);
        return Ok(());
    }
    let lock = match crate::lock::VaultLock::acquire_wait(dir, wait) {
        Ok(l) => l,
        // A reader while this host writes: the cache as it is (what this
        // host committed is in it; the others' comes at the next open).
        Err(StoreError::VaultLocked { .. }) if access == Access::ReadOnly => {
            tracing::debug!(vault = %dir.display(), "cache in use by a local writer; not refreshed");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let index = Index::open_write(&index_dir)?;
    let mut batch = crate::index::IndexBatch::default();
    let mut changed = false;
    // 1. Catalog files first: a manifest exists only once its chunks'
    // lists and parts do, so the lists listed after it name them all.
    let mut in_store: HashSet<String> = HashSet::new();
    for name in catalog_files::list_all(store.as_ref())? {
        in_store.insert(name.clone());
        let Some(bytes) = store.get(&name)? else {
            continue;
        };
        if name.starts_with(catalog_files::POINTS_DIR) {
            let Ok(p) = catalog_files::decode_point(&bytes) else {
                tracing::warn!(file = %name, "skipping an unreadable point manifest");
                continue;
            };
            if index.points(&p.item)?.iter().all(|q| q != &p) {
                batch.put_point(p);
                changed = true;
            }
        } else if name.starts_with(catalog_files::ITEMS_DIR) {
            if let Ok(i) = catalog_files::decode_item(&bytes)
                && index.item(&i.name)?.as_ref() != Some(&i)
            {
                batch.put_item(i);
                changed = true;
            }
        } else if name.starts_with(catalog_files::POLICIES_DIR)
            && let Ok(p) = catalog_files::decode_policy(&bytes)
            && index
                .policy_values()?
                .iter()
                .all(|(n, v)| n != &p.name || v != &p.policy)
        {
            batch.put_policy_value(&p.name, &p.policy);
            changed = true;
        }
    }
    for item in index.items()? {
        for p in index.points(&item.name)? {
            if !in_store.contains(&catalog_files::point_file(&p.item, p.seq)) {
                batch.delete_point(&p.item, p.seq);
                changed = true;
            }
        }
        if !in_store.contains(&catalog_files::item_file(&item.name)) {
            batch.delete_item(&item.name);
            changed = true;
        }
    }
    for (name, _) in index.policy_values()? {
        if !in_store.contains(&catalog_files::policy_file(&name)) {
            batch.delete_policy(&name);
            changed = true;
        }
    }
    let present: HashSet<u64> = store
        .list(SEGMENTS_DIR)?
        .iter()
        .filter_map(|n| parse_segment_file_name(n))
        .collect();
    // 2. Chunk lists not imported yet (of segments still there).
    let mut imported = load_imported(dir);
    let lists = chunk_lists(store.as_ref())?;
    let listed: HashSet<&String> = lists.iter().collect();
    imported.retain(|n| listed.contains(n));
    let mut infos = index.segment_infos()?;
    let mut added: std::collections::HashMap<ChunkId, crate::index::ChunkLocation> =
        std::collections::HashMap::new();
    for name in &lists {
        if imported.contains(name) {
            continue;
        }
        let Some((segment, start)) = crate::chunk_list::parse_list_name(name) else {
            continue;
        };
        if !present.contains(&segment) {
            continue;
        }
        let Some(bytes) = store.get(name)? else {
            continue;
        };
        let entries = match crate::chunk_list::decode(&bytes, start) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(list = %name, error = %e, "skipping a damaged chunk list");
                continue;
            }
        };
        let info = infos.entry(segment).or_default();
        for e in entries {
            let loc = crate::index::ChunkLocation {
                segment,
                offset: e.offset,
                len: e.len,
                plain_len: e.plain_len,
            };
            // A chunk stored twice (two hosts at once) is placed in the
            // segment with the higher id, by every host and by GC alike.
            let current = match added.get(&e.id) {
                Some(l) => Some(*l),
                None => index.chunk(&e.id)?,
            };
            match current {
                None => {
                    batch.put_chunk(e.id, loc);
                    added.insert(e.id, loc);
                }
                Some(old) if old.segment < segment => {
                    batch.delete_chunk_place(&old);
                    batch.put_chunk(e.id, loc);
                    added.insert(e.id, loc);
                }
                Some(_) => {}
            }
            info.committed = info.committed.max(e.offset + u64::from(e.len));
        }
        batch.put_segment(segment, *info);
        imported.insert(name.clone());
        changed = true;
    }
    // 3. Segments GC deleted, with the chunks placed in them.
    for (&seg, _) in infos.iter().filter(|(s, _)| !present.contains(s)) {
        for (_, id) in index.segment_chunks(seg)? {
            if added.contains_key(&id) {
                // Placed in another segment by step 2.
                continue;
            }
            if let Some(loc) = index.chunk(&id)?
                && loc.segment == seg
            {
                batch.delete_chunk(&id, &loc);
            }
        }
        batch.delete_segment(seg);
        changed = true;
    }
    if changed {
        tracing::info!(vault = %dir.display(), url = %remote.url, "imported what other hosts changed");
        batch.forget_gc_layout();
        index.commit(batch.without_files())?;
    }
    drop(index);
    store_imported(dir, &imported)?;
    drop(lock);
    if changed {
        // The references, counted again from the points now known (what
        // a reader's read-only open cannot do). A local writer that took
        // the lock meanwhile does it when it opens.
        match Vault::open_with(dir, Access::Write, &rebuild_open_options(wait)) {
            Ok(v) => drop(v),
            Err(StoreError::VaultLocked { .. }) if access == Access::ReadOnly => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Options for the vault open inside a rebuild (no refresh: the rebuild
/// is one).
pub fn rebuild_open_options(wait: Duration) -> OpenOptions {
    OpenOptions {
        wait,
        degraded_ok: true,
        allow_copy_write: true,
        skip_refresh: true,
        ..OpenOptions::default()
    }
}
