//! Creating a vault and opening one whose cache is current and whose
//! index is there: the locks, the index, the copies, and on a local
//! writer's open the recovery of what an interrupted writer left
//! ([`super::recovery`]). [`crate::open`] decides first whether a shared
//! vault's cache needs a refresh or a copy's index a rebuild.

use super::*;
use crate::copies::state_files;
use crate::store::LocalStore;

impl Vault {
    /// Creates a new vault in `dir` (which must not exist or be empty) and
    /// returns it open for writing.
    pub fn create(dir: &Path, config: VaultConfig) -> Result<Vault> {
        Self::create_with(dir, config, &OpenOptions::default())
    }

    /// [`Vault::create`] with options (store wrapping).
    pub fn create_with(dir: &Path, config: VaultConfig, opts: &OpenOptions) -> Result<Vault> {
        config.validate()?;
        let root = LocalStore::new(dir);
        root.create_empty_root()?;
        let lock = VaultLock::acquire(dir)?;
        root.create_dir(SEGMENTS_DIR)?;
        root.create_dir(INDEX_DIR)?;
        let index = Index::open_write(&dir.join(INDEX_DIR))?;
        for r in &config.replicas {
            crate::copies::init_copy(r, &config, Role::Replica)?;
        }
        if let Some(s) = &config.secondary {
            crate::copies::init_copy(s, &config, Role::Secondary)?;
        }
        state_files::write_identity(&root, &config, Role::Primary)?;
        // The config is written last: a directory without it is not a vault,
        // so a crash during creation leaves nothing that looks like one.
        state_files::store_config(&root, &config)?;
        let copies = Copies::open(dir, &config, true, false, opts.wrap.as_ref())?;
        Ok(Vault {
            dir: dir.to_path_buf(),
            adopted_packs: AtomicBool::new(config.adopted_packs),
            config,
            index,
            copies,
            lock: Some(lock),
            _lease: None,
            poisoned: AtomicBool::new(false),
            remote: None,
            lease_ttl: crate::lease::DEFAULT_LEASE_TTL,
            clock: crate::lease::system_clock(),
        })
        .and_then(|v| {
            let mut b = IndexBatch::default();
            b.put_gc_layout();
            v.index.commit(b)?;
            Ok(v)
        })
    }

    /// Opens the vault at `dir` once [`crate::open`] made its cache current
    /// (a shared vault) or its index whole (a copy opened on its own):
    /// `config`, `role` and `remote` are what it read before.
    pub(crate) fn open_prepared(
        dir: &Path,
        access: Access,
        opts: &OpenOptions,
        mut config: VaultConfig,
        role: Role,
        remote: Option<Remote>,
    ) -> Result<Vault> {
        let wait = opts.wait;
        let index_dir = dir.join(INDEX_DIR);
        if role != Role::Primary {
            // A replica or the secondary opened on its own (the primary is
            // gone): a vault by itself, whose index is a local cache.
            config.replicas.clear();
            config.secondary = None;
        }
        // An index not known complete is never trusted: no open, no
        // reclaim, no reconcile (they would delete what it lacks).
        crate::index::state::check_complete(dir)?;
        let (lock, lease) = match access {
            Access::Write => (Some(VaultLock::acquire_wait(dir, wait)?), None),
            Access::ReadOnly => (None, Some(ReaderLease::shared(dir)?)),
        };
        // Checked again under the lock: a rebuild may have started.
        crate::index::state::check_complete(dir)?;
        if !index_dir.is_dir() {
            return Err(StoreError::IndexMissing {
                path: dir.to_path_buf(),
            });
        }
        let index = match access {
            Access::Write => Index::open_write(&index_dir)?,
            Access::ReadOnly => Index::open_read(&index_dir)?,
        };
        let copies = Copies::open(
            dir,
            &config,
            access == Access::Write,
            opts.degraded_ok,
            opts.wrap.as_ref(),
        )?;
        let vault = Vault {
            dir: dir.to_path_buf(),
            adopted_packs: AtomicBool::new(config.adopted_packs),
            config,
            index,
            copies,
            lock,
            _lease: lease,
            poisoned: AtomicBool::new(false),
            remote,
            lease_ttl: opts.lease_ttl.unwrap_or(crate::lease::DEFAULT_LEASE_TTL),
            clock: opts
                .clock
                .clone()
                .unwrap_or_else(crate::lease::system_clock),
        };
        if vault.remote.is_some() {
            // The store is the truth and the cache was refreshed above.
            // Nothing is reclaimed or reconciled: no host cuts what it
            // uploaded (another may deduplicate against it after a
            // refresh) and no host removes another's manifests. Dead bytes
            // are left for GC.
            if access == Access::Write {
                vault.ensure_gc_layout()?;
            }
            return Ok(vault);
        }
        if access == Access::Write {
            let primary = vault.copies.primary().store.clone();
            // A vault from before copies had identities gets one; an
            // identity that cannot be read (a symbolic link, say) is never
            // replaced: the open fails instead.
            if primary.size(COPY_FILE)?.is_none() {
                state_files::write_identity(primary.as_ref(), &vault.config, Role::Primary)?;
            }
            vault.reclaim_uncommitted()?;
            vault.ensure_gc_layout()?;
            vault.reconcile_catalog_files()?;
            let behind = |c: &crate::copies::Copy| {
                state_files::stored_config_version(c.store.as_ref()) < vault.config.format_version()
            };
            if vault.copies.sync_copies().iter().any(behind) {
                // The index now has everything a version-2 reader expects;
                // every copy gets the new config.
                vault.store_config(&vault.config)?;
                tracing::info!(vault = %dir.display(), "upgraded the vault format");
            }
        }
        Ok(vault)
    }

    /// Builds the reference counts and the segment → chunk map of a vault
    /// written before they existed (once; proportional to the vault).
    pub(super) fn ensure_gc_layout(&self) -> Result<()> {
        if self.index.has_gc_layout()? {
            return Ok(());
        }
        tracing::info!(vault = %self.dir.display(), "building reference counts (one-time upgrade)");
        let mut counter = RefCounter::new(&self.index);
        let chunks = self.index.chunks()?;
        let mut batch = IndexBatch::default();
        let roots: Vec<ChunkId> = self
            .index
            .all_points()?
            .iter()
            .map(|p| p.block_map)
            .collect();
        // Roots and leaves are found by walking the points; everything
        // else is data.
        let mut kinds: HashMap<ChunkId, ChunkKind> = HashMap::new();
        for root in &roots {
            kinds.insert(*root, ChunkKind::Root);
            for leaf in self.children(root, ChunkKind::Root)? {
                kinds.insert(leaf, ChunkKind::Leaf);
            }
        }
        for (id, loc) in &chunks {
            counter.insert_new(*id, kinds.get(id).copied().unwrap_or(ChunkKind::Data));
            batch.put_chunk(*id, *loc);
        }
        let nodes = VaultNodes {
            vault: self,
            pending: &HashMap::new(),
        };
        for root in &roots {
            counter.incref(root, &nodes)?;
        }
        // What no point references may still be a block-map node (left by
        // an interrupted backup); a later point can reuse it, and then its
        // children must be counted, so classify it by its bytes.
        // (Not in a shared vault: there GC counts from a fresh rebuild of
        // its own, and reading every unreferenced chunk back from the
        // store, while other hosts' GC deletes garbage, costs requests.)
        if self.remote.is_none() {
            for id in counter.unreferenced_data() {
                if let Some((kind, _)) = self.read_chunk(&id).ok().and_then(|b| node_refs(&b)) {
                    counter.set_kind(&id, kind);
                }
            }
        }
        counter.write_to(&mut batch);
        batch.put_gc_layout();
        self.index.commit(batch)
    }
}
