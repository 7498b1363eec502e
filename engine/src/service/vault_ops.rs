//! Vault-level operations that are not a backup or a restore: creating a
//! vault with defaults, and summarising what it holds.

use std::path::{Path, PathBuf};

use coffre_vault_store::copies::SpaceInfo;
use coffre_vault_store::format::catalog_files::Role;
use coffre_vault_store::format::config::{
    DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL, validate_vault_name,
};
use coffre_vault_store::{Redundancy, Vault, VaultConfig};
use jiff::Timestamp;
use serde::Serialize;

use crate::clock::Clock;
use crate::error::Result;

/// Settings for a new vault; `None` takes the default.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Vault name; defaults to one derived from the directory name.
    pub name: Option<String>,
    /// Block size in bytes.
    pub block_size: Option<u32>,
    /// zstd level.
    pub compression_level: Option<i32>,
    /// Redundancy.
    pub redundancy: Option<Redundancy>,
    /// Where snapshots go (default: next to each image).
    pub snapshot_area: Option<PathBuf>,
    /// LRS replica directories.
    pub replicas: Vec<PathBuf>,
    /// The GRS secondary directory.
    pub secondary: Option<PathBuf>,
    /// An object store URL (`azure://…`, `s3://…`): the vault lives
    /// there and `dir` is this host's cache.
    pub store: Option<String>,
    /// Encryption: the cipher, the new master key and its first key slot.
    pub encryption: Option<NewEncryption>,
}

/// What an encrypted vault starts with.
#[derive(Clone, Debug)]
pub struct NewEncryption {
    /// The cipher, fixed for the vault's life.
    pub cipher: coffre_vault_store::crypto::Cipher,
    /// The master key (random).
    pub master: coffre_vault_store::crypto::MasterKey,
    /// Its first key slot.
    pub slot: coffre_vault_store::crypto::KeySlot,
}

/// Derives a valid vault name from a directory name.
pub fn default_vault_name(dir: &Path) -> String {
    let raw = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .skip_while(|c| !c.is_ascii_alphabetic())
        .take(50)
        .collect();
    while name.ends_with('-') && name.len() > 2 {
        name.pop();
    }
    if validate_vault_name(&name).is_ok() {
        name
    } else {
        "coffre-vault".into()
    }
}

/// Creates a vault in `dir`.
pub fn create_vault(dir: &Path, opts: &CreateOptions, clock: &dyn Clock) -> Result<Vault> {
    let created = clock.now();
    let mut h = blake3::Hasher::new();
    h.update(&created.as_nanosecond().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(dir.as_os_str().as_encoded_bytes());
    let mut vault_id = h.finalize().to_hex().to_string();
    vault_id.truncate(16);
    let config = VaultConfig {
        name: opts.name.clone().unwrap_or_else(|| default_vault_name(dir)),
        vault_id,
        block_size: opts.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
        compression_level: opts.compression_level.unwrap_or(DEFAULT_COMPRESSION_LEVEL),
        redundancy: opts.redundancy.unwrap_or_default(),
        created,
        snapshot_area: opts
            .snapshot_area
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
            .map(absolute),
        replicas: opts.replicas.iter().map(|p| absolute(p)).collect(),
        secondary: opts.secondary.as_deref().map(absolute),
        store: None,
        adopted_packs: false,
        encryption: opts.encryption.as_ref().map(|e| {
            coffre_vault_store::format::config::Encryption {
                cipher: e.cipher,
                slots: vec![e.slot.clone()],
                keys: Some(std::sync::Arc::new(
                    coffre_vault_store::crypto::VaultKeys::derive(&e.master, e.cipher),
                )),
            }
        }),
    };
    if let Some(area) = &config.snapshot_area {
        coffre_snapshotter::area::check_choice(
            area,
            &config.vault_id,
            config.keys().map(|k| k.as_ref()),
        )?;
    }
    let vault = match &opts.store {
        Some(url) => coffre_vault_store::shared::create_in_store(
            dir,
            url,
            config,
            opts.encryption.as_ref().map(|e| {
                std::sync::Arc::new(coffre_vault_store::shared::KnownKey(e.master.clone()))
                    as std::sync::Arc<dyn coffre_vault_store::crypto::Unlock>
            }),
        )?,
        None => Vault::create(dir, config)?,
    };
    let mut b = coffre_vault_store::IndexBatch::default();
    b.put_policy(
        crate::policy::DEFAULT_POLICY,
        &crate::policy::Policy::default_policy(),
    );
    vault.commit_catalog(b, &[])?;
    Ok(vault)
}

/// Attaches the empty cache directory `dir` to the shared vault at `url`
/// (another host created it): the index is built from the store.
pub fn attach_vault(
    dir: &Path,
    url: &str,
    wait: std::time::Duration,
    unlock: Option<std::sync::Arc<dyn coffre_vault_store::crypto::Unlock>>,
) -> Result<Vault> {
    Ok(coffre_vault_store::shared::attach(dir, url, wait, unlock)?)
}

/// GC of a shared vault in object storage (leases and two marks, see
/// `coffre_vault_store::lease`); waits up to `max_wait` for writers that
/// started before it.
pub fn shared_gc(
    dir: &Path,
    max_wait: std::time::Duration,
    unlock: Option<std::sync::Arc<dyn coffre_vault_store::crypto::Unlock>>,
) -> Result<coffre_vault_store::shared::gc::SharedGcReport> {
    Ok(coffre_vault_store::shared::gc::run_shared_gc(
        dir,
        &coffre_vault_store::shared::gc::SharedGcOptions {
            max_wait,
            ttl: coffre_vault_store::lease::DEFAULT_LEASE_TTL,
            clock: coffre_vault_store::lease::system_clock(),
            unlock,
        },
    )?)
}

impl crate::job_record::JobStats for coffre_vault_store::shared::gc::SharedGcReport {
    fn job_stats(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("epoch", self.epoch),
            ("deleted_segments", self.deleted_segments),
            ("deleted_bytes", self.deleted_bytes),
            ("condemned_segments", self.condemned_segments),
            ("expired_leases", self.expired_leases),
        ]
    }
}

/// Changes the vault's redundancy; refused once the vault protects (or
/// has protected) any item.
pub fn set_redundancy(vault: &Vault, redundancy: Redundancy) -> Result<()> {
    let items: Vec<String> = vault.index().items()?.into_iter().map(|i| i.name).collect();
    if !items.is_empty() && vault.config().redundancy != redundancy {
        return Err(crate::error::EngineError::RedundancyLocked {
            vault: vault.config().name.clone(),
            items: crate::policies::describe_items(&items),
        });
    }
    let mut cfg = vault.config().clone();
    cfg.redundancy = redundancy;
    vault.store_config(&cfg)?;
    Ok(())
}

/// Sets (or with `None`, clears) the vault's snapshot area. Snapshots
/// already taken stay where they are, and keep being found, listed and
/// expired there.
pub fn set_snapshot_area(vault: &Vault, dir: Option<&Path>) -> Result<()> {
    let mut cfg = vault.config().clone();
    cfg.snapshot_area = dir.filter(|p| !p.as_os_str().is_empty()).map(absolute);
    if let Some(area) = &cfg.snapshot_area {
        coffre_snapshotter::area::check_choice(
            area,
            &cfg.vault_id,
            cfg.keys().map(|k| k.as_ref()),
        )?;
    }
    vault.store_config(&cfg)?;
    Ok(())
}

/// Adds (or re-adds) an LRS replica at `dir` and fills it from a good
/// copy: every committed segment now; the catalog files when the vault is
/// next opened for writing (the caller reopens it). Returns the bytes
/// copied.
pub fn add_replica(vault: &Vault, dir: &Path) -> Result<u64> {
    let dir = absolute(dir);
    if dir == absolute(vault.dir()) || vault.config().secondary.as_deref() == Some(dir.as_path()) {
        return Err(coffre_vault_store::StoreError::InvalidSetting {
            field: "replica",
            reason: format!("{} is already a copy of this vault", dir.display()),
        }
        .into());
    }
    Ok(coffre_vault_store::maintenance::replica::add_replica(
        vault, &dir,
    )?)
}

/// Stops writing to the replica at `dir` (its files stay).
pub fn remove_replica(vault: &Vault, dir: &Path) -> Result<()> {
    let dir = absolute(dir);
    let mut cfg = vault.config().clone();
    let before = cfg.replicas.len();
    cfg.replicas.retain(|r| r != &dir);
    if cfg.replicas.len() == before {
        return Err(coffre_vault_store::StoreError::InvalidSetting {
            field: "replica",
            reason: format!("{} is not a replica of this vault", dir.display()),
        }
        .into());
    }
    vault.store_config(&cfg)?;
    Ok(())
}

/// Sets or replaces the GRS secondary (filled by the next replication).
pub fn set_secondary(vault: &Vault, dir: &Path) -> Result<()> {
    let dir = absolute(dir);
    let mut cfg = vault.config().clone();
    coffre_vault_store::copies::init_copy(&dir, &cfg, Role::Secondary)?;
    cfg.secondary = Some(dir);
    vault.store_config(&cfg)?;
    Ok(())
}

/// One copy in a vault summary.
#[derive(Debug, Clone, Serialize)]
pub struct CopySummary {
    /// primary, replica or secondary.
    pub role: Role,
    /// Directory.
    pub dir: PathBuf,
    /// Usable now.
    pub available: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Filesystem, device and free space.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub space: Option<SpaceInfo>,
}

/// The secondary's replication state in a vault summary.
#[derive(Debug, Clone, Serialize)]
pub struct SecondarySummary {
    /// Directory.
    pub dir: PathBuf,
    /// End of the last replication run.
    pub last_run: Option<Timestamp>,
    /// Points not yet on the secondary.
    pub points_behind: u64,
    /// Replication lag (the secondary's recovery point objective): 0 when
    /// every point is there, else the age of the oldest point that is not.
    pub lag_seconds: u64,
}

/// The copies of a vault, with warnings about how safe they are.
pub fn copies_summary(vault: &Vault) -> (Vec<CopySummary>, Vec<String>) {
    let mut out = Vec::new();
    for c in vault.copies().sync_copies() {
        // A shared vault's primary is its object store, not the cache.
        let dir = match (c.role, vault.remote()) {
            (Role::Primary, Some(r)) => PathBuf::from(&r.url),
            _ => c.dir.clone(),
        };
        out.push(CopySummary {
            role: c.role,
            dir,
            available: true,
            problem: None,
            space: c.store.space(),
        });
    }
    if let Some(c) = vault.copies().secondary() {
        out.push(CopySummary {
            role: c.role,
            dir: c.dir.clone(),
            available: true,
            problem: None,
            space: c.store.space(),
        });
    }
    for u in vault.copies().unavailable() {
        out.push(CopySummary {
            role: u.role,
            dir: u.dir.clone(),
            available: false,
            problem: Some(u.reason.clone()),
            space: None,
        });
    }
    let mut warnings = Vec::new();
    let sync: Vec<&CopySummary> = out.iter().filter(|c| c.role != Role::Secondary).collect();
    // An object store keeps copies of its own (the account's LRS, ZRS or GRS).
    if sync.len() == 1 && vault.config().secondary.is_none() && vault.remote().is_none() {
        warnings.push("only one copy: no protection against losing this disk".to_string());
    }
    let mut by_device: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for c in &out {
        if let Some(sp) = &c.space {
            by_device
                .entry(sp.device)
                .or_default()
                .push(c.dir.display().to_string());
        }
    }
    for dirs in by_device.values().filter(|d| d.len() > 1) {
        warnings.push(format!(
            "copies {} are on the same device: losing it loses them all",
            dirs.join(", ")
        ));
    }
    for u in vault.copies().unavailable() {
        warnings.push(format!(
            "{} copy {} is unavailable: {}",
            u.role,
            u.dir.display(),
            u.reason
        ));
    }
    (out, warnings)
}

/// Replication lag of the vault's secondary at `now`.
pub fn secondary_summary(vault: &Vault, now: Timestamp) -> Result<Option<SecondarySummary>> {
    let Some(dir) = vault.config().secondary.clone() else {
        return Ok(None);
    };
    let state =
        coffre_vault_store::maintenance::replicate::primary_state(vault.dir(), vault.keys());
    let points = vault.index().all_points()?;
    let behind: Vec<_> = points
        .iter()
        .filter(|p| !state.points.contains_key(&p.id))
        .collect();
    let lag = behind
        .iter()
        .map(|p| p.created)
        .min()
        .map_or(0, |t| now.duration_since(t).as_secs().max(0) as u64);
    Ok(Some(SecondarySummary {
        dir,
        last_run: state.last_run,
        points_behind: behind.len() as u64,
        lag_seconds: lag,
    }))
}

fn absolute(p: &Path) -> PathBuf {
    if coffre_vault_store::format::remote::is_store_url(p) {
        return p.to_path_buf();
    }
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The local cache of a GRS secondary that lives in object storage
/// (`--secondary azure://…`): `CACHE_ROOT/coffre/secondary/HASH`, attached
/// (its index built from the container) the first time. This is how
/// `--from secondary` reads the secondary with the primary gone.
pub fn secondary_cache(
    url: &str,
    wait: std::time::Duration,
    unlock: Option<std::sync::Arc<dyn coffre_vault_store::crypto::Unlock>>,
) -> Result<PathBuf> {
    let root = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let mut id = blake3::hash(url.as_bytes()).to_hex().to_string();
    id.truncate(16);
    let dir = root.join("coffre").join("secondary").join(id);
    if !dir
        .join(coffre_vault_store::format::config::CONFIG_FILE)
        .is_file()
    {
        let _ = std::fs::remove_dir_all(&dir);
        if let Some(parent) = dir.parent() {
            coffre_vault_store::store::local::private::create_dir_all(parent)
                .map_err(|e| coffre_vault_store::StoreError::io("create directory", parent, e))?;
        }
        drop(coffre_vault_store::shared::attach(&dir, url, wait, unlock)?);
    }
    Ok(dir)
}

/// One item in a vault summary.
#[derive(Debug, Clone, Serialize)]
pub struct ItemSummary {
    /// Item name.
    pub name: String,
    /// Image path.
    pub source: PathBuf,
    /// Number of points.
    pub points: u64,
    /// Time of the latest point.
    pub last_backup: Option<Timestamp>,
    /// Image size at the latest point.
    pub latest_size: u64,
    /// Bytes the item's points added to the vault.
    pub stored_bytes: u64,
    /// Instant-restore snapshots kept.
    pub snapshots: u64,
    /// Bytes they use in the snapshot areas.
    pub snapshot_bytes: u64,
}

/// What `vault show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct VaultSummary {
    /// Vault directory.
    pub path: PathBuf,
    /// Vault name.
    pub name: String,
    /// Vault id.
    pub vault_id: String,
    /// On-disk format version.
    pub format_version: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// zstd level.
    pub compression_level: i32,
    /// Redundancy.
    pub redundancy: Redundancy,
    /// The snapshot area set for every item (`None`: next to each image).
    pub snapshot_area: Option<PathBuf>,
    /// The snapshot areas the vault has used.
    pub snapshot_areas: Vec<PathBuf>,
    /// Creation time.
    pub created: Timestamp,
    /// Items.
    pub items: Vec<ItemSummary>,
    /// Points in all.
    pub points: u64,
    /// Sum of the image sizes of all points: what the points would take
    /// without deduplication, zero elision and compression.
    pub logical_bytes: u64,
    /// Bytes committed in segments.
    pub stored_bytes: u64,
    /// Bytes of records some chunk entry still references (stored minus
    /// what GC has unindexed but not yet rewritten away).
    pub live_bytes: u64,
    /// The copies: primary, replicas, secondary.
    pub copies: Vec<CopySummary>,
    /// How safe the copies are (shared devices, a single copy).
    pub copy_warnings: Vec<String>,
    /// GRS replication state.
    pub secondary: Option<SecondarySummary>,
    /// The object store the vault lives in (then `path` is this host's
    /// cache), with this host's tag.
    pub store: Option<String>,
    /// This host's tag in a shared vault.
    pub host_tag: Option<u16>,
    /// The cipher of an encrypted vault (`None`: not encrypted).
    pub encryption: Option<coffre_vault_store::crypto::Cipher>,
    /// Its key slots.
    pub key_slots: usize,
    /// A shared vault's writer leases (the backups running on any host).
    pub leases: Vec<coffre_vault_store::lease::Lease>,
    /// A shared vault's GC state.
    pub gc_state: Option<coffre_vault_store::lease::GcState>,
}

/// Summarises a vault.
pub fn summarize(vault: &Vault, now: Timestamp) -> Result<VaultSummary> {
    let cfg = vault.config();
    let mut items = Vec::new();
    let mut points_total = 0;
    let mut logical = 0;
    let areas = coffre_snapshotter::area::Area::known_of(
        vault.dir(),
        &vault.config().vault_id,
        vault.config().keys(),
    );
    let (copies, copy_warnings) = copies_summary(vault);
    for item in vault.index().items()? {
        let points = vault.points(&item.name)?;
        points_total += points.len() as u64;
        logical += points.iter().map(|p| p.image_size).sum::<u64>();
        let last = points.last();
        items.push(ItemSummary {
            name: item.name.clone(),
            source: item.source.clone(),
            points: points.len() as u64,
            last_backup: last.map(|p| p.created),
            latest_size: last.map_or(0, |p| p.image_size),
            stored_bytes: points.iter().map(|p| p.stats.stored_bytes).sum(),
            snapshots: coffre_snapshotter::expiry::snapshots_of(
                vault.dir(),
                &cfg.vault_id,
                cfg.keys(),
                &item.name,
            )
            .len() as u64,
            snapshot_bytes: areas.iter().map(|a| a.bytes_used(&item.name)).sum(),
        });
    }
    Ok(VaultSummary {
        path: vault.dir().to_path_buf(),
        name: cfg.name.clone(),
        vault_id: cfg.vault_id.clone(),
        format_version: VaultConfig::stored_version(vault.dir()),
        block_size: cfg.block_size,
        compression_level: cfg.compression_level,
        redundancy: cfg.redundancy,
        snapshot_area: cfg.snapshot_area.clone(),
        snapshot_areas: areas.iter().map(|a| a.dir().to_path_buf()).collect(),
        created: cfg.created,
        items,
        points: points_total,
        logical_bytes: logical,
        stored_bytes: vault.stored_bytes()?,
        live_bytes: vault.live_bytes()?,
        copies,
        copy_warnings,
        secondary: secondary_summary(vault, now)?,
        store: vault.remote().map(|r| r.url.clone()),
        host_tag: vault.remote().map(|r| r.host_tag),
        encryption: cfg.encryption.as_ref().map(|e| e.cipher),
        key_slots: cfg.encryption.as_ref().map_or(0, |e| e.slots.len()),
        leases: match vault.remote() {
            Some(_) => coffre_vault_store::lease::leases(vault.copies().primary().store.as_ref())?
                .into_iter()
                .map(|(_, l)| l)
                .collect(),
            None => Vec::new(),
        },
        gc_state: match vault.remote() {
            Some(_) => Some(coffre_vault_store::lease::gc_state(
                vault.copies().primary().store.as_ref(),
            )?),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_valid() {
        for (dir, want) in [
            ("/x/my_vault", "my-vault"),
            ("/x/2024-backups", "backups"),
            ("/x/_", "coffre-vault"),
            ("/x/Vault", "Vault"),
        ] {
            assert_eq!(default_vault_name(Path::new(dir)), want);
        }
    }
}
