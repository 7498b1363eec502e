//! An open vault: its config, its lock, its index and its segments, and the
//! write session through which every new chunk and point enters it.
//!
//! The write order (see `FORMAT.md`, "Crash invariants"):
//! 1. records are appended to a segment;
//! 2. the segment is fsynced (and its directory, if the file is new);
//! 3. the chunk locations, the new committed segment length and any
//!    catalog change are committed in one synced RocksDB `WriteBatch`;
//! 4. only then does the caller report success.
//!
//! Bytes past a segment's committed length are leftovers of a session that
//! never reached step 3; the next writer cuts them off ([`Vault::open`] with
//! [`Access::Write`]), and a failed session cuts off its own on drop.
//!
//! Every commit also carries the reference-count changes (see [`crate::index::refs`])
//! of what it adds or removes, so GC's bookkeeping never lags the catalog.
//! Readers hold a shared *reader lease* for as long as the vault is open;
//! GC gives space back to the filesystem only while it can take the lease
//! exclusively, so a running restore never loses a segment under it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::copies::segment::SegmentWriter;
use crate::copies::{Copies, StoreWrap};
use crate::error::{Result, StoreError};
use crate::format::catalog::{ItemRecord, PointRecord};
use crate::format::catalog_files::{self, COPY_FILE, CopyIdentity, Role};
use crate::format::chunk_id::ChunkId;
use crate::format::config::VaultConfig;
use crate::format::record::{self, HEADER_LEN, RecordDecoder, RecordHeader};
use crate::format::remote::Remote;
use crate::format::segment::{
    SEGMENT_HEADER_LEN, SEGMENT_TARGET_LEN, SEGMENTS_DIR, encode_header, parse_segment_file_name,
    segment_file_name, segment_name,
};
use crate::index::refs::{NodeChildren, RefCounter, node_refs};
use crate::index::{ChunkKind, ChunkLocation, INDEX_DIR, Index, IndexBatch, SegmentInfo};
use crate::store::local::durable::create_dir_durable;
use crate::store::local::lock::{ReaderLease, VaultLock};

/// How a vault is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Readers: list, restore, verify. Any number, alongside a writer.
    ReadOnly,
    /// The single writer: takes the vault lock.
    Write,
}

/// How to open a vault beyond its access.
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// How long a writer waits for the lock.
    pub wait: Duration,
    /// A writer goes on without a replica that is missing or unwritable
    /// (with a warning) instead of failing.
    pub degraded_ok: bool,
    /// Wraps each copy's store (fault injection in tests).
    pub wrap: Option<StoreWrap>,
    /// Allows writing to a directory that is a replica or the secondary
    /// opened on its own (only the index rebuild does).
    pub allow_copy_write: bool,
    /// Opens a shared vault's cache as it is, without first importing what
    /// other hosts committed (only the rebuild, which is that import).
    pub skip_refresh: bool,
    /// Lifetime of a shared vault's writer leases (default
    /// [`crate::lease::DEFAULT_LEASE_TTL`]).
    pub lease_ttl: Option<Duration>,
    /// Time for leases (default: the system clock).
    pub clock: Option<crate::lease::Clock>,
}

/// An open vault.
pub struct Vault {
    dir: PathBuf,
    config: VaultConfig,
    index: Index,
    copies: Copies,
    lock: Option<VaultLock>,
    _lease: Option<ReaderLease>,
    /// Set when a sync failed: the kernel may have dropped dirty pages, so
    /// this handle accepts no more writes until the vault is reopened.
    poisoned: AtomicBool,
    /// True once the config says `adopted_packs` (version 5).
    adopted_packs: AtomicBool,
    /// A shared vault in object storage: this host's pointer (its segment
    /// namespace). `None` for a local vault.
    remote: Option<Remote>,
    /// Writer leases of a shared vault: lifetime and clock.
    lease_ttl: Duration,
    clock: crate::lease::Clock,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("dir", &self.dir)
            .field("name", &self.config.name)
            .finish()
    }
}

impl Vault {
    /// Creates a new vault in `dir` (which must not exist or be empty) and
    /// returns it open for writing.
    pub fn create(dir: &Path, config: VaultConfig) -> Result<Vault> {
        Self::create_with(dir, config, &OpenOptions::default())
    }

    /// [`Vault::create`] with options (store wrapping).
    pub fn create_with(dir: &Path, config: VaultConfig, opts: &OpenOptions) -> Result<Vault> {
        config.validate()?;
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(StoreError::AlreadyExists {
                        path: dir.to_path_buf(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("read directory", dir, e)),
        }
        create_dir_durable(dir)?;
        let lock = VaultLock::acquire(dir)?;
        create_dir_durable(&dir.join(SEGMENTS_DIR))?;
        create_dir_durable(&dir.join(INDEX_DIR))?;
        let index = Index::open_write(&dir.join(INDEX_DIR))?;
        for r in &config.replicas {
            crate::copies::init_copy(r, &config, Role::Replica)?;
        }
        if let Some(s) = &config.secondary {
            crate::copies::init_copy(s, &config, Role::Secondary)?;
        }
        write_identity(dir, &config, Role::Primary)?;
        // The config is written last: a directory without it is not a vault,
        // so a crash during creation leaves nothing that looks like one.
        config.store(dir)?;
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

    /// Opens an existing vault. Writers take the lock and clean up what an
    /// interrupted writer left behind.
    pub fn open(dir: &Path, access: Access) -> Result<Vault> {
        Self::open_wait(dir, access, Duration::ZERO)
    }

    /// Like [`Vault::open`], but a writer waits up to `wait` for the lock.
    pub fn open_wait(dir: &Path, access: Access, wait: Duration) -> Result<Vault> {
        Self::open_with(
            dir,
            access,
            &OpenOptions {
                wait,
                ..OpenOptions::default()
            },
        )
    }

    /// [`Vault::open`] with options.
    pub fn open_with(dir: &Path, access: Access, opts: &OpenOptions) -> Result<Vault> {
        let wait = opts.wait;
        if !dir.is_dir() {
            return Err(StoreError::NotAVault {
                path: dir.to_path_buf(),
            });
        }
        let mut config = VaultConfig::load(dir)?;
        let role = copy_role(dir);
        let index_dir = dir.join(INDEX_DIR);
        let remote = Remote::load(dir)?;
        if !opts.skip_refresh && remote.is_some() {
            crate::shared::refresh_cache(dir, wait, access)?;
        }
        if role != Role::Primary {
            // A replica or the secondary opened on its own (the primary is
            // gone): a vault by itself, whose index is a local cache.
            if access == Access::Write && !opts.allow_copy_write {
                return Err(StoreError::CopyNotWritable {
                    path: dir.to_path_buf(),
                    role: role.to_string(),
                });
            }
            config.replicas.clear();
            config.secondary = None;
            // Its index is a cache of this copy alone: missing or
            // incomplete (an interrupted rebuild), it is rebuilt from the
            // copy, which deletes nothing before the new index is whole.
            if (!index_dir.is_dir() || !crate::index::state::is_complete(dir))
                && !opts.allow_copy_write
            {
                drop(crate::maintenance::rebuild::rebuild_index(dir, dir, wait)?);
            }
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
            if !dir.join(COPY_FILE).exists() {
                write_identity(dir, &vault.config, Role::Primary)?;
            }
            vault.reclaim_uncommitted()?;
            vault.ensure_gc_layout()?;
            vault.reconcile_catalog_files()?;
            if VaultConfig::stored_version(dir) < vault.config.format_version() {
                // The index now has everything a version-2 reader expects.
                vault.config.store(dir)?;
                tracing::info!(vault = %dir.display(), "upgraded the vault format");
            }
        }
        Ok(vault)
    }

    /// Builds the reference counts and the segment → chunk map of a vault
    /// written before they existed (once; proportional to the vault).
    fn ensure_gc_layout(&self) -> Result<()> {
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

    /// Children of a committed node.
    fn children(&self, id: &ChunkId, kind: ChunkKind) -> Result<Vec<ChunkId>> {
        match node_refs(&self.read_chunk(id)?) {
            Some((k, children)) if k == kind => Ok(children),
            _ => Err(StoreError::CorruptIndex {
                path: self.index.path().to_path_buf(),
                what: "reference count",
                reason: format!("chunk {id} is not a {kind:?} node"),
            }),
        }
    }

    /// Applies catalog changes (items, policies, deleted points), with the
    /// reference changes they imply: each of `released_roots` (roots of
    /// deleted points) loses one reference. Requires [`Access::Write`].
    /// New points come through a [`WriteSession`] instead.
    pub fn commit_catalog(&self, batch: IndexBatch, released_roots: &[ChunkId]) -> Result<()> {
        let mut s = self.begin_write()?;
        s.drop_roots.extend_from_slice(released_roots);
        s.commit(batch)
    }

    /// Cuts every segment back to its committed length and moves segment
    /// files the index does not know to the quarantine, on every
    /// synchronous copy; only with a complete index. Returns the bytes
    /// reclaimed on the primary.
    fn reclaim_uncommitted(&self) -> Result<u64> {
        let infos = self.index.segment_infos()?;
        let mut reclaimed = 0;
        for c in self.copies.sync_copies() {
            let primary = c.role == Role::Primary;
            for name in c.store.list(SEGMENTS_DIR)? {
                let Some(id) = parse_segment_file_name(&name) else {
                    if name.starts_with('.') && name.contains(".tmp-") {
                        let _ = c.store.delete(&crate::store::join(SEGMENTS_DIR, &name));
                    }
                    continue;
                };
                if !self.segment_namespace().contains(&id) {
                    // Another host's segment in a shared vault.
                    continue;
                }
                let full = segment_name(id);
                let len = c.store.size(&full)?.unwrap_or(0);
                match infos.get(&id) {
                    // GC retired it; it goes when no reader can still need it.
                    Some(i) if i.retired => {}
                    // A segment the (complete) index does not know: a
                    // session killed before its first commit left it. It
                    // is kept aside, not deleted (`crate::copies::quarantine`).
                    None => {
                        crate::index::state::check_complete(&self.dir)?;
                        crate::copies::quarantine::quarantine(
                            c.store.as_ref(),
                            &full,
                            "a segment the index does not know",
                        )?;
                        if primary {
                            reclaimed += len;
                        }
                    }
                    Some(&SegmentInfo { committed, .. }) if len > committed => {
                        // Bytes past the committed length of a complete
                        // index were never acknowledged.
                        crate::index::state::check_complete(&self.dir)?;
                        c.store.truncate(&full, committed)?;
                        tracing::info!(copy = %c.dir.display(), segment = %full, bytes = len - committed, "cut uncommitted tail");
                        if primary {
                            reclaimed += len - committed;
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        self.copies.forget();
        Ok(reclaimed)
    }

    /// Makes every synchronous copy's catalog files match the index: a
    /// manifest written by a session that crashed before its index commit
    /// names a point that was never acknowledged (and chunks just cut
    /// off), so it goes to the quarantine; a missing one (a vault older than the files, a
    /// copy that was down) is written. Item and policy files are rewritten
    /// when they differ.
    fn reconcile_catalog_files(&self) -> Result<()> {
        let mut want: HashMap<String, Vec<u8>> = HashMap::new();
        for item in self.index.items()? {
            want.insert(
                catalog_files::item_file(&item.name),
                catalog_files::encode_item(&item),
            );
            for p in self.index.points(&item.name)? {
                want.insert(
                    catalog_files::point_file(&p.item, p.seq),
                    catalog_files::encode_point(&p),
                );
            }
        }
        for (name, value) in self.index.policy_values()? {
            let file = catalog_files::PolicyFile {
                name: name.clone(),
                policy: value,
            };
            want.insert(
                catalog_files::policy_file(&name),
                catalog_files::encode_policy(&file),
            );
        }
        self.copies.for_each_sync(|c| {
            let have = catalog_files::list_all(c.store.as_ref())?;
            for name in &have {
                if !want.contains_key(name) {
                    crate::index::state::check_complete(&self.dir)?;
                    crate::copies::quarantine::quarantine(
                        c.store.as_ref(),
                        name,
                        "a catalog file the index does not know",
                    )?;
                }
            }
            for (name, bytes) in &want {
                let is_point = name.starts_with(catalog_files::POINTS_DIR);
                let same = if is_point {
                    have.contains(name)
                } else {
                    c.store.get(name)?.as_deref() == Some(bytes.as_slice())
                };
                if !same {
                    c.store.put(name, bytes)?;
                }
            }
            Ok(())
        })
    }

    /// The copies of the vault.
    pub fn copies(&self) -> &Copies {
        &self.copies
    }

    /// Replaces the vault config on every synchronous copy.
    /// In a shared vault the store gets the config without the host-local
    /// settings ([`VaultConfig::without_host_settings`]), which go to this
    /// host's cache alone.
    pub fn store_config(&self, cfg: &VaultConfig) -> Result<()> {
        self.store_config_joining(cfg, None)
    }

    /// [`Vault::store_config`] for a config that adds the copy `joining`:
    /// the new copy gets the config first, so a copy that the vault's
    /// config names always holds a config of its own (an `init_copy`
    /// reused after a kill may have left it without one).
    pub fn store_config_joining(
        &self,
        cfg: &VaultConfig,
        joining: Option<&crate::copies::Copy>,
    ) -> Result<()> {
        cfg.validate()?;
        let bytes = if self.remote.is_some() {
            cfg.clone().without_host_settings().0.encode()
        } else {
            cfg.encode()
        };
        if let Some(copy) = joining {
            copy.store.put(crate::format::config::CONFIG_FILE, &bytes)?;
        }
        self.copies
            .for_each_sync(|c| c.store.put(crate::format::config::CONFIG_FILE, &bytes))?;
        if self.remote.is_some() {
            return cfg.store(&self.dir);
        }
        Ok(())
    }

    /// Records repaired on the fly (read from another copy and rewritten)
    /// since the vault was opened.
    pub fn read_repairs(&self) -> u64 {
        self.copies.repairs()
    }

    /// What the index holds now for the item and policy files among
    /// `files` (those it has), encoded as their files are: a shared vault
    /// replaces them only if the store still holds the same.
    fn catalog_before(
        &self,
        files: &[(String, Option<Vec<u8>>)],
    ) -> Result<HashMap<String, Vec<u8>>> {
        let wanted: std::collections::HashSet<&str> =
            files.iter().map(|(n, _)| n.as_str()).collect();
        let mut out = HashMap::new();
        for item in self.index.items()? {
            let name = catalog_files::item_file(&item.name);
            if wanted.contains(name.as_str()) {
                out.insert(name, catalog_files::encode_item(&item));
            }
        }
        for (name, policy) in self.index.policy_values()? {
            let file = catalog_files::policy_file(&name);
            if wanted.contains(file.as_str()) {
                out.insert(
                    file,
                    catalog_files::encode_policy(&catalog_files::PolicyFile { name, policy }),
                );
            }
        }
        Ok(out)
    }

    /// The segment ids this handle may write: this host's namespace in a
    /// shared vault, all of them in a local one.
    pub fn segment_namespace(&self) -> std::ops::Range<u64> {
        self.remote.as_ref().map_or(0..u64::MAX, |r| r.namespace())
    }

    /// This host's pointer, for a shared vault in object storage.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// The vault directory (for a shared vault: this host's cache).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The vault settings.
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// The index (catalog queries).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// True when the vault was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.lock.is_some()
    }

    /// Path of segment `id` in the primary copy.
    pub fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(SEGMENTS_DIR).join(segment_file_name(id))
    }

    /// The item called `name`.
    pub fn item(&self, name: &str) -> Result<Option<ItemRecord>> {
        self.index.item(name)
    }

    /// Points of `item`, oldest first.
    pub fn points(&self, item: &str) -> Result<Vec<PointRecord>> {
        self.index.points(item)
    }

    /// True when chunk `id` is committed in the vault.
    pub fn contains_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.index.chunk(id)?.is_some())
    }

    /// Reads, checks (crc32, length, BLAKE3) and returns a chunk's plaintext.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let loc = self
            .index
            .chunk(id)?
            .ok_or(StoreError::ChunkMissing { id: *id })?;
        self.read_chunk_at(id, &loc)
    }

    /// Like [`Vault::read_chunk`] for a location already looked up.
    pub fn read_chunk_at(&self, id: &ChunkId, loc: &ChunkLocation) -> Result<Vec<u8>> {
        let mut buf = ChunkBuf::default();
        self.read_chunk_into(id, loc, &mut buf)?;
        Ok(buf.plain)
    }

    /// Reads and checks a chunk into reused buffers; the plaintext is then
    /// in [`ChunkBuf::plain`]. Every read checks the record's CRC-32s, its
    /// length and BLAKE3 of the plaintext. A copy that fails is skipped
    /// and, once another copy gave the right bytes, repaired with them.
    pub fn read_chunk_into(
        &self,
        id: &ChunkId,
        loc: &ChunkLocation,
        buf: &mut ChunkBuf,
    ) -> Result<()> {
        let mut first_err = None;
        let mut bad = Vec::new();
        for (i, c) in self.copies.readable().enumerate() {
            match self.read_copy(c, id, loc, buf) {
                Ok(()) => {
                    if !bad.is_empty() {
                        self.repair_from(&bad, id, loc, &buf.record);
                    }
                    return Ok(());
                }
                Err(e) => {
                    if i == 0 || first_err.is_none() {
                        tracing::warn!(copy = %c.dir.display(), error = %e, "bad copy of a chunk; trying the next copy");
                    }
                    bad.push(c.clone());
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or(StoreError::ChunkMissing { id: *id }))
    }

    /// Starts reading the records at `locs` on the copy reads try first,
    /// in a few large runs, so that [`Vault::read_chunk_into`] finds them
    /// in the page cache (advice only).
    pub fn read_ahead(&self, locs: &[ChunkLocation]) {
        let Some(c) = self.copies.readable().next() else {
            return;
        };
        let ranges = locs
            .iter()
            .map(|l| (l.segment, l.offset, l.offset + u64::from(l.len)))
            .collect();
        for (segment, start, end) in crate::store::local::read_ahead::runs(ranges) {
            c.store
                .will_need(&segment_name(segment), start, end - start);
        }
    }

    /// Reads and fully checks the record at `loc` on one copy.
    pub fn read_copy(
        &self,
        c: &crate::copies::Copy,
        id: &ChunkId,
        loc: &ChunkLocation,
        buf: &mut ChunkBuf,
    ) -> Result<()> {
        let name = segment_name(loc.segment);
        let corrupt = |reason| StoreError::CorruptChunk {
            id: *id,
            path: c.dir.join(&name),
            offset: loc.offset,
            reason: Box::new(reason),
        };
        buf.record.clear();
        buf.record.resize(loc.len as usize, 0);
        match c.store.read_at(&name, loc.offset, &mut buf.record) {
            Ok(()) => {}
            Err(StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                return Err(corrupt(record::RecordError::Truncated {
                    needed: loc.len as usize,
                    available: 0,
                }));
            }
            Err(e) => return Err(e),
        }
        let header = RecordHeader::parse(&buf.record).map_err(corrupt)?;
        if header.id != *id {
            return Err(corrupt(record::RecordError::WrongChunk {
                expected: *id,
                found: header.id,
            }));
        }
        if header.record_len() != u64::from(loc.len) {
            return Err(corrupt(record::RecordError::Truncated {
                needed: header.record_len() as usize,
                available: loc.len as usize,
            }));
        }
        let payload = buf.record.get(HEADER_LEN..).unwrap_or_default();
        buf.decoder
            .decode_payload_into(&header, payload, &mut buf.plain)
            .map_err(corrupt)
    }

    /// Rewrites the record at `loc` on the synchronous copies in `bad`
    /// with `record`, bytes another copy proved right. The secondary is
    /// left to replication.
    fn repair_from(
        &self,
        bad: &[crate::copies::Copy],
        id: &ChunkId,
        loc: &ChunkLocation,
        record: &[u8],
    ) {
        for c in bad.iter().filter(|c| c.role != Role::Secondary) {
            match self.write_record(c, loc, record) {
                Ok(()) => {
                    self.copies.count_repair();
                    tracing::warn!(copy = %c.dir.display(), chunk = %id.short(), segment = loc.segment, offset = loc.offset, "repaired a copy of a chunk from a good copy");
                }
                Err(e) => {
                    tracing::warn!(copy = %c.dir.display(), chunk = %id.short(), error = %e, "could not repair a copy of a chunk");
                }
            }
        }
    }

    /// Writes `record` at `loc` on copy `c` (a segment file that is gone
    /// gets its header back first).
    pub fn write_record(
        &self,
        c: &crate::copies::Copy,
        loc: &ChunkLocation,
        record: &[u8],
    ) -> Result<()> {
        let name = segment_name(loc.segment);
        if c.store.size(&name)?.is_none() {
            c.store.write_at(&name, 0, &encode_header(loc.segment))?;
        }
        c.store.write_at(&name, loc.offset, record)
    }

    /// Checks only the header of the record at `loc` (cheap verify), on
    /// the first copy that has a good one.
    pub fn check_record_header(&self, id: &ChunkId, loc: &ChunkLocation) -> Result<()> {
        let mut first_err = None;
        for c in self.copies.readable() {
            match self.check_header_on(c, id, loc) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or(StoreError::ChunkMissing { id: *id }))
    }

    fn check_header_on(
        &self,
        c: &crate::copies::Copy,
        id: &ChunkId,
        loc: &ChunkLocation,
    ) -> Result<()> {
        let name = segment_name(loc.segment);
        let corrupt = |reason| StoreError::CorruptChunk {
            id: *id,
            path: c.dir.join(&name),
            offset: loc.offset,
            reason: Box::new(reason),
        };
        let mut bytes = vec![0u8; HEADER_LEN.min(loc.len as usize)];
        c.store.read_at(&name, loc.offset, &mut bytes)?;
        let h = RecordHeader::parse(&bytes).map_err(corrupt)?;
        if h.id != *id {
            return Err(corrupt(record::RecordError::WrongChunk {
                expected: *id,
                found: h.id,
            }));
        }
        if h.record_len() != u64::from(loc.len) {
            return Err(corrupt(record::RecordError::Truncated {
                needed: h.record_len() as usize,
                available: loc.len as usize,
            }));
        }
        Ok(())
    }

    /// Total committed bytes in all live segments (their size on disk,
    /// before GC punches holes).
    pub fn stored_bytes(&self) -> Result<u64> {
        Ok(self.index.segments()?.values().sum())
    }

    /// Bytes of records the index still references.
    pub fn live_bytes(&self) -> Result<u64> {
        Ok(self
            .index
            .segment_infos()?
            .values()
            .map(SegmentInfo::live)
            .sum())
    }

    /// Forgets cached segment file handles (after GC removed files).
    pub fn forget_segment_handles(&self) {
        self.copies.forget();
    }

    /// Reads the raw record bytes of chunk `id` at `loc`, checked (GC
    /// copies them unchanged).
    pub fn read_record(&self, id: &ChunkId, loc: &ChunkLocation) -> Result<Vec<u8>> {
        let mut buf = ChunkBuf::default();
        self.read_chunk_into(id, loc, &mut buf)?;
        Ok(buf.record)
    }

    /// True when a sync failed on this handle (no more writes).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Relaxed)
    }

    /// Starts a write session. Requires [`Access::Write`].
    pub fn begin_write(&self) -> Result<WriteSession<'_>> {
        if self.lock.is_none() {
            return Err(StoreError::ReadOnly {
                path: self.dir.clone(),
            });
        }
        if self.is_poisoned() {
            return Err(StoreError::Poisoned {
                path: self.dir.clone(),
            });
        }
        // A shared vault: a lease first, and what GC condemned is stored
        // again rather than deduplicated against (like damaged chunks).
        let mut heal: std::collections::HashSet<ChunkId> = crate::format::damaged::load(&self.dir)
            .into_iter()
            .filter(|id| self.index.chunk(id).ok().flatten().is_some())
            .collect();
        let lease = match &self.remote {
            Some(r) => {
                let (lease, condemned, present) = crate::lease::WriterLease::take(
                    self.copies.primary().store.clone(),
                    r.host_tag,
                    self.lease_ttl,
                    self.clock.clone(),
                )?;
                let gone = self
                    .index
                    .segment_infos()?
                    .into_keys()
                    .filter(|s| !present.contains(s));
                for seg in condemned.into_iter().chain(gone) {
                    heal.extend(
                        self.index
                            .segment_chunks(seg)?
                            .into_iter()
                            .map(|(_, id)| id),
                    );
                }
                Some(lease)
            }
            None => None,
        };
        Ok(WriteSession {
            lease,
            vault: self,
            writer: None,
            writer_is_new: false,
            writer_committed: 0,
            // In a shared vault every session writes a segment of its own,
            // so nothing uploaded is ever cut (see `Vault::open_with`).
            fresh_segment: self.remote.is_some(),
            pending: HashMap::new(),
            kinds: HashMap::new(),
            pending_children: HashMap::new(),
            add_roots: Vec::new(),
            drop_roots: Vec::new(),
            pending_batch_bytes: 0,
            appended_bytes: 0,
            poisoned: false,
            finished: false,
            heal,
            healed: Vec::new(),
            adopted: Vec::new(),
        })
    }
}

/// The role the copy at `dir` says it has (a vault from before copies
/// existed has no identity: it is a primary).
pub fn copy_role(dir: &Path) -> Role {
    std::fs::read(dir.join(COPY_FILE))
        .ok()
        .and_then(|b| catalog_files::decode_copy(&b).ok())
        .map_or(Role::Primary, |c| c.role)
}

/// Writes the identity file of a copy at `dir`.
fn write_identity(dir: &Path, config: &VaultConfig, role: Role) -> Result<()> {
    crate::store::local::durable::write_atomic(
        &dir.join(COPY_FILE),
        &catalog_files::encode_copy(&CopyIdentity {
            vault_id: config.vault_id.clone(),
            vault_name: config.name.clone(),
            role,
        }),
    )
}

/// Reusable buffers for reading many chunks on one thread.
#[derive(Default)]
pub struct ChunkBuf {
    record: Vec<u8>,
    plain: Vec<u8>,
    decoder: RecordDecoder,
}

impl ChunkBuf {
    /// The plaintext of the chunk read last.
    pub fn plain(&self) -> &[u8] {
        &self.plain
    }

    /// The record (header and stored bytes) read last.
    pub fn record_bytes(&self) -> &[u8] {
        &self.record
    }
}

/// Commit a checkpoint once this much new data is pending, to bound memory
/// and the work a crash can lose.
const CHECKPOINT_BYTES: u64 = 512 << 20;
const CHECKPOINT_CHUNKS: usize = 65_536;

/// Appends chunks to the vault and commits them durably with catalog
/// changes. Dropping a session without [`WriteSession::commit`] discards
/// its uncommitted bytes.
pub struct WriteSession<'v> {
    vault: &'v Vault,
    writer: Option<SegmentWriter>,
    writer_is_new: bool,
    writer_committed: u64,
    fresh_segment: bool,
    pending: HashMap<ChunkId, ChunkLocation>,
    /// Kind of each pending chunk; chunks moved by GC are absent (their
    /// counts do not change).
    kinds: HashMap<ChunkId, ChunkKind>,
    /// Children of pending nodes (committed nodes are read back instead).
    pending_children: HashMap<ChunkId, Vec<ChunkId>>,
    add_roots: Vec<ChunkId>,
    drop_roots: Vec<ChunkId>,
    pending_batch_bytes: u64,
    appended_bytes: u64,
    poisoned: bool,
    finished: bool,
    /// Chunks no copy holds intact (`damaged`): stored again when a
    /// backup produces them.
    heal: std::collections::HashSet<ChunkId>,
    /// Healed chunks and their old, damaged location.
    healed: Vec<(ChunkId, ChunkLocation)>,
    /// A shared vault's writer lease (see [`crate::lease`]).
    lease: Option<crate::lease::WriterLease>,
    /// Snapshot packs this session hard-linked in as segments.
    adopted: Vec<Adopted>,
}

/// A snapshot pack hard-linked into the vault as a segment by
/// [`WriteSession::adopt_pack`]: its records are indexed where they are,
/// so the transfer writes none of them again.
struct Adopted {
    id: u64,
    len: u64,
    /// True once an index commit recorded the segment.
    committed: bool,
    /// The records indexed from it: offset and length.
    used: Vec<(u64, u32)>,
}

impl Adopted {
    /// The ranges after the header that hold no indexed record (records
    /// the transfer found elsewhere): dead bytes from the start, in
    /// pieces a `dead` entry can hold.
    fn gaps(&self) -> Vec<(u64, u32)> {
        const PIECE: u64 = 1 << 30;
        let mut used: Vec<(u64, u64)> = self
            .used
            .iter()
            .map(|&(o, l)| (o, o + u64::from(l)))
            .collect();
        let mut out = Vec::new();
        for (mut at, end) in
            crate::format::segment::uncovered(SEGMENT_HEADER_LEN, self.len, &mut used)
        {
            while at < end {
                let n = (end - at).min(PIECE);
                out.push((at, n as u32));
                at += n;
            }
        }
        out
    }
}

impl WriteSession<'_> {
    /// True when `id` is committed or pending in this session (a damaged
    /// chunk counts as absent, so that it is stored again).
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        if self.pending.contains_key(id) {
            return Ok(true);
        }
        if self.heal.contains(id) {
            return Ok(false);
        }
        self.vault.contains_chunk(id)
    }

    /// True when `id` is a damaged chunk this session has not stored again
    /// yet (a backup must not keep it as "same as before").
    pub fn is_damaged(&self, id: &ChunkId) -> bool {
        self.heal.contains(id) && !self.pending.contains_key(id)
    }

    /// True when `id` is pending in this session (not yet committed).
    pub fn is_pending(&self, id: &ChunkId) -> bool {
        self.pending.contains_key(id)
    }

    /// Bytes appended by this session so far.
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes
    }

    fn guard(&self) -> Result<()> {
        if self.poisoned {
            return Err(StoreError::Poisoned {
                path: self.vault.dir.clone(),
            });
        }
        Ok(())
    }

    fn poison<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Like [`WriteSession::poison`], and a failed sync poisons the vault
    /// handle too (fsyncgate: the dirty pages may be gone for good).
    fn poison_vault<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.vault.poisoned.store(true, Ordering::Relaxed);
        }
        self.poison(r)
    }

    /// Makes this session write to a new segment rather than append to
    /// the newest one (GC, which may be rewriting that one).
    pub fn use_fresh_segment(&mut self) {
        self.fresh_segment = true;
    }

    fn open_writer(&mut self) -> Result<()> {
        let mut infos = self.vault.index.segment_infos()?;
        let space = self.vault.segment_namespace();
        infos.retain(|id, _| space.contains(id));
        let copies = &self.vault.copies;
        if let Some((&id, info)) = infos.iter().next_back()
            && !info.retired
            && !self.fresh_segment
            && (SEGMENT_HEADER_LEN..SEGMENT_TARGET_LEN).contains(&info.committed)
            && !self.is_adopted_segment(id)?
        {
            let len = info.committed;
            self.writer = Some(SegmentWriter::append_to(copies, id, len)?);
            self.writer_is_new = false;
            self.writer_committed = len;
            return Ok(());
        }
        let next = self.next_segment_id(&infos)?;
        self.fresh_segment = false;
        self.writer = Some(SegmentWriter::create(copies, next)?);
        self.writer_is_new = true;
        self.writer_committed = 0;
        Ok(())
    }

    /// True when segment `id` is an adopted pack (never appended to: its
    /// file may still be a snapshot's pack).
    fn is_adopted_segment(&self, id: u64) -> Result<bool> {
        let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
        self.vault
            .copies
            .primary()
            .store
            .read_at(&segment_name(id), 0, &mut h)?;
        Ok(crate::format::segment::is_adopted(&h))
    }

    /// The id a new segment of this session gets: past every segment the
    /// index knows, this session's own (the writer's, adopted ones) and,
    /// in a shared vault, every part listed in the store.
    fn next_segment_id(&self, infos: &std::collections::BTreeMap<u64, SegmentInfo>) -> Result<u64> {
        let space = self.vault.segment_namespace();
        let copies = &self.vault.copies;
        let mut next = infos
            .keys()
            .next_back()
            .map_or(space.start.max(1), |id| id + 1);
        let own = self
            .adopted
            .iter()
            .map(|a| a.id)
            .chain(self.writer.as_ref().map(SegmentWriter::id));
        for id in own {
            next = next.max(id + 1);
        }
        if self.vault.remote.is_some() {
            // A session of ours that died before its commit left parts the
            // index never recorded; their id stays taken (they are GC's).
            let listed = copies.primary().store.list(SEGMENTS_DIR)?;
            if let Some(max) = listed
                .iter()
                .filter_map(|n| parse_segment_file_name(n))
                .filter(|id| space.contains(id))
                .max()
            {
                next = next.max(max + 1);
            }
        }
        Ok(next)
    }

    /// Hard-links the snapshot pack at `pack` into the vault as a new
    /// segment, so that its records can be indexed where they are
    /// ([`WriteSession::adopt`]) instead of being written a second time.
    /// `None` (nothing done) when the vault cannot share the file: a
    /// shared vault, synchronous replicas (each needs its own bytes), a
    /// pack on another filesystem, or a file that is not a pack. The pack
    /// is fsynced first; the link is durable before this returns.
    pub fn adopt_pack(&mut self, pack: &Path) -> Result<Option<u64>> {
        use std::io::Read;
        self.guard()?;
        if self.vault.remote.is_some() || self.vault.copies.sync_copies().len() != 1 {
            return Ok(None);
        }
        let Ok(mut file) = std::fs::File::open(pack) else {
            return Ok(None);
        };
        let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
        if file.read_exact(&mut h).is_err() || !crate::format::segment::is_adopted(&h) {
            return Ok(None);
        }
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat", pack, e))?
            .len();
        if len <= SEGMENT_HEADER_LEN {
            return Ok(None);
        }
        crate::store::local::durable::fsync_file(&file, pack)?;
        if !self.vault.adopted_packs.load(Ordering::Relaxed) {
            // From now on the vault is at version 5: a build that does not
            // know adopted segments would append to or punch them.
            let mut cfg = self.vault.config.clone();
            cfg.adopted_packs = true;
            let r = self.vault.store_config(&cfg);
            self.poison_vault(r)?;
            self.vault.adopted_packs.store(true, Ordering::Relaxed);
        }
        let infos = self.vault.index.segment_infos()?;
        let id = self.next_segment_id(&infos)?;
        let dst = self.vault.segment_path(id);
        if let Err(e) = std::fs::hard_link(pack, &dst) {
            tracing::debug!(pack = %pack.display(), error = %e, "the pack cannot be linked into the vault; its records are copied");
            return Ok(None);
        }
        let r = crate::store::local::durable::fsync_dir(&self.vault.dir.join(SEGMENTS_DIR));
        if let Err(e) = self.poison_vault(r) {
            let _ = std::fs::remove_file(&dst);
            return Err(e);
        }
        self.adopted.push(Adopted {
            id,
            len,
            committed: false,
            used: Vec::new(),
        });
        Ok(Some(id))
    }

    /// Indexes data chunk `id` as the record at `loc`, in a segment this
    /// session adopted. The caller has checked the record (CRC, id). A
    /// duplicate of a pending chunk is ignored; its bytes become dead.
    pub fn adopt(&mut self, id: ChunkId, loc: ChunkLocation) -> Result<()> {
        self.guard()?;
        if self.pending.contains_key(&id) {
            return Ok(());
        }
        let path = || self.vault.segment_path(loc.segment);
        let Some(a) = self.adopted.iter_mut().find(|a| a.id == loc.segment) else {
            return Err(StoreError::CorruptFile {
                path: path(),
                what: "adopted segment",
                reason: "not a segment this session adopted".into(),
            });
        };
        if loc.offset < SEGMENT_HEADER_LEN || loc.offset + u64::from(loc.len) > a.len {
            return Err(StoreError::CorruptFile {
                path: path(),
                what: "adopted segment",
                reason: format!(
                    "a record at {} of {} bytes lies outside its {} bytes",
                    loc.offset, loc.len, a.len
                ),
            });
        }
        a.used.push((loc.offset, loc.len));
        self.place(id, loc, Some(ChunkKind::Data))
    }

    /// Appends an encoded record for data chunk `id`. Duplicates of a
    /// pending chunk are ignored. May checkpoint or roll to a new segment.
    pub fn append(&mut self, id: ChunkId, record: &[u8]) -> Result<()> {
        self.append_kind(id, record, Some(ChunkKind::Data))
    }

    /// Appends a block-map node with its children (non-zero entries of a
    /// leaf, leaves of a root).
    pub fn append_node(
        &mut self,
        id: ChunkId,
        record: &[u8],
        kind: ChunkKind,
        children: Vec<ChunkId>,
    ) -> Result<()> {
        if !self.pending.contains_key(&id) {
            self.pending_children.insert(id, children);
        }
        self.append_kind(id, record, Some(kind))
    }

    /// Appends a copy of an existing chunk's record (GC rewrite): the chunk
    /// gets a new location and keeps its reference count.
    pub fn append_moved(&mut self, id: ChunkId, record: &[u8]) -> Result<()> {
        self.append_kind(id, record, None)
    }

    /// Adds a reference to `root` when the session commits (a new point).
    pub fn reference_root(&mut self, root: ChunkId) {
        self.add_roots.push(root);
    }

    fn append_kind(&mut self, id: ChunkId, record: &[u8], kind: Option<ChunkKind>) -> Result<()> {
        self.guard()?;
        if self.pending.contains_key(&id) {
            return Ok(());
        }
        let header = RecordHeader::parse(record).map_err(|reason| StoreError::CorruptChunk {
            id,
            path: self.vault.dir.clone(),
            offset: 0,
            reason: Box::new(reason),
        })?;
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.len() >= SEGMENT_TARGET_LEN)
        {
            self.checkpoint()?;
            self.writer = None;
        }
        if self.writer.is_none() {
            let r = self.open_writer();
            self.poison(r)?;
        }
        let Some(w) = self.writer.as_mut() else {
            return Err(StoreError::Poisoned {
                path: self.vault.dir.clone(),
            });
        };
        let r = w.append(record).map(|off| (w.id(), off));
        let (segment, offset) = self.poison(r)?;
        let loc = ChunkLocation {
            segment,
            offset,
            len: record.len() as u32,
            plain_len: header.plain_len,
        };
        self.place(id, loc, kind)
    }

    /// Records where chunk `id` now is (appended or adopted), then
    /// checkpoints when enough is pending.
    fn place(
        &mut self,
        id: ChunkId,
        loc: ChunkLocation,
        mut kind: Option<ChunkKind>,
    ) -> Result<()> {
        if self.heal.contains(&id)
            && let Some(old) = self.vault.index.chunk(&id)?
        {
            // A fresh copy of a damaged chunk: it moves (its reference
            // count stays) and the old record becomes dead bytes.
            kind = None;
            self.healed.push((id, old));
        }
        if let Some(k) = kind {
            self.kinds.insert(id, k);
        }
        self.pending.insert(id, loc);
        self.pending_batch_bytes += u64::from(loc.len);
        self.appended_bytes += u64::from(loc.len);
        if self.pending_batch_bytes >= CHECKPOINT_BYTES || self.pending.len() >= CHECKPOINT_CHUNKS {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Starts writing what was appended so far back to disk without
    /// waiting, so the fsync of the commit overlaps with the work between.
    pub fn start_writeback(&mut self) -> Result<()> {
        self.guard()?;
        match self.writer.as_mut() {
            Some(w) => {
                let r = w.start_writeback();
                self.poison(r)
            }
            None => Ok(()),
        }
    }

    /// Makes everything appended so far durable and indexed, without
    /// recording a point. Chunks committed this way are unreferenced until
    /// a point uses them; a later session deduplicates against them.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.commit_inner(IndexBatch::default(), false)
    }

    fn commit_inner(&mut self, mut batch: IndexBatch, final_commit: bool) -> Result<()> {
        self.guard()?;
        // Healed chunks: their old, damaged records become dead bytes.
        let mut healed_now = Vec::new();
        let mut dead_add: std::collections::BTreeMap<u64, u64> = Default::default();
        for (id, old) in self.healed.drain(..) {
            batch.delete_chunk_place(&old);
            batch.put_dead(old.segment, old.offset, old.len);
            *dead_add.entry(old.segment).or_default() += u64::from(old.len);
            healed_now.push(id);
        }
        let needs_sync = !self.pending.is_empty() || self.writer_is_new;
        if let (Some(w), true) = (self.writer.as_mut(), needs_sync) {
            let r = w.sync().map(|()| (w.id(), w.len()));
            let (id, len) = self.poison_vault(r)?;
            let mut info = self.vault.index.segment_info(id)?.unwrap_or_default();
            info.committed = len;
            info.dead += dead_add.remove(&id).unwrap_or(0);
            batch.put_segment(id, info);
        }
        let adopting = self
            .adopted
            .iter()
            .any(|a| !a.committed && !a.used.is_empty())
            || final_commit && !self.adopted.is_empty();
        if adopting {
            for a in &self.adopted {
                // Its bytes are durable already (the pack was fsynced, the
                // link too); the dead ranges are known once every record
                // was placed, at the final commit.
                let mut info = SegmentInfo {
                    committed: a.len,
                    ..SegmentInfo::default()
                };
                if final_commit {
                    for (offset, len) in a.gaps() {
                        batch.put_dead(a.id, offset, len);
                        info.dead += u64::from(len);
                    }
                }
                info.dead += dead_add.remove(&a.id).unwrap_or(0);
                batch.put_segment(a.id, info);
            }
        }
        for (seg, dead) in dead_add {
            if let Some(mut i) = self.vault.index.segment_info(seg)? {
                i.dead += dead;
                batch.put_segment(seg, i);
            }
        }
        for (id, loc) in self.pending.iter() {
            batch.put_chunk(*id, *loc);
        }

        let mut counter = RefCounter::new(&self.vault.index);
        for (id, kind) in &self.kinds {
            counter.insert_new(*id, *kind);
        }
        if final_commit {
            let nodes = VaultNodes {
                vault: self.vault,
                pending: &self.pending_children,
            };
            for root in &self.add_roots {
                counter.incref(root, &nodes)?;
            }
            for root in &self.drop_roots {
                counter.decref(root, &nodes)?;
            }
        }
        counter.write_to(&mut batch);
        if batch.is_empty() {
            return Ok(());
        }
        // New and changed catalog files reach the copies before the index
        // records them, removed ones leave the copies after it forgets
        // them (invariant C2): a crash in between leaves a copy with an
        // extra file, which the next writer removes, never one without a
        // file the index has.
        if self.vault.remote.is_some() && !self.pending.is_empty() {
            // Shared vault: the list of what this commit appended, for the
            // other hosts' caches (after the parts, before the manifest).
            let r = self.put_chunk_lists();
            self.poison_vault(r)?;
        }
        let files = batch.catalog_files().to_vec();
        if let Some(l) = self.lease.as_mut() {
            // In a shared vault the manifest is the commit: never after
            // the lease ran out (a GC may have acted on it).
            let r = l.check_and_renew();
            self.poison(r)?;
        }
        let before = if self.vault.remote.is_some() {
            self.vault.catalog_before(&files)?
        } else {
            HashMap::new()
        };
        let r = self.vault.copies.put_files(&files, &before);
        self.poison_vault(r)?;
        if let Some(l) = self.lease.as_ref() {
            // The fence: the manifests are in the store; one conditional
            // renewal now proves no GC removed the lease (and deleted what
            // they count on) before they were there for its mark. A writer
            // that stalled past its lease fails here, unacknowledged, and
            // takes back the manifests of points it just added.
            let r = l.confirm_held();
            if r.is_err() {
                let added = self.points_added(&files);
                if let Err(e) = self.vault.copies.delete_files(&added) {
                    tracing::warn!(error = %e, "could not take back the manifests of an unconfirmed commit; `coffre verify` reports them");
                }
            }
            self.poison(r)?;
        }
        let r = self.vault.index.commit(batch);
        self.poison(r)?;
        if let Err(e) = self.vault.copies.delete_files(&files) {
            // Committed already; the next writer removes what is left.
            tracing::warn!(error = %e, "could not remove deleted catalog files from every copy");
        }
        if !healed_now.is_empty() {
            let mut list = crate::format::damaged::load(&self.vault.dir);
            for id in &healed_now {
                list.remove(id);
                self.heal.remove(id);
            }
            tracing::info!(
                chunks = healed_now.len(),
                "healed damaged chunks with fresh copies"
            );
            if let Err(e) = crate::format::damaged::store(&self.vault.dir, &list) {
                tracing::warn!(error = %e, "could not update the list of damaged chunks");
            }
        }
        if let Some(w) = self.writer.as_ref() {
            self.writer_committed = w.len();
        }
        if adopting {
            for a in &mut self.adopted {
                a.committed = true;
            }
        }
        self.writer_is_new = false;
        self.pending.clear();
        self.kinds.clear();
        self.pending_children.clear();
        self.pending_batch_bytes = 0;
        Ok(())
    }

    /// The manifests among `files` of points the index does not have yet
    /// (added by this commit), as deletions; a manifest rewritten for a
    /// point already committed is never among them.
    fn points_added(&self, files: &[(String, Option<Vec<u8>>)]) -> Vec<(String, Option<Vec<u8>>)> {
        files
            .iter()
            .filter(|(name, _)| name.starts_with(catalog_files::POINTS_DIR))
            .filter_map(|(name, bytes)| {
                let p = catalog_files::decode_point(bytes.as_deref()?).ok()?;
                let known = self
                    .vault
                    .index
                    .points(&p.item)
                    .map_or(true, |ps| ps.iter().any(|k| k.seq == p.seq));
                (!known).then(|| (name.clone(), None))
            })
            .collect()
    }

    /// Uploads one chunk list per segment this commit appended to.
    fn put_chunk_lists(&self) -> Result<()> {
        let mut by_segment: std::collections::BTreeMap<
            u64,
            Vec<crate::format::chunk_list::ListedChunk>,
        > = Default::default();
        for (id, loc) in &self.pending {
            by_segment.entry(loc.segment).or_default().push(
                crate::format::chunk_list::ListedChunk {
                    id: *id,
                    offset: loc.offset,
                    len: loc.len,
                    plain_len: loc.plain_len,
                },
            );
        }
        let store = &self.vault.copies.primary().store;
        for (segment, entries) in by_segment {
            let start = entries.iter().map(|e| e.offset).min().unwrap_or(0);
            store.put(
                &crate::format::chunk_list::list_name(segment, start),
                &crate::format::chunk_list::encode(&entries),
            )?;
        }
        Ok(())
    }

    /// Commits everything appended, plus `batch` (a point and its item),
    /// in one synced index write. When this returns `Ok`, the point is
    /// durable.
    pub fn commit(mut self, batch: IndexBatch) -> Result<()> {
        self.commit_inner(batch, true)?;
        self.finished = true;
        // A point's commit is large (its block map, counts and chunks):
        // written out now, it is not replayed by every later open.
        if let Err(e) = self.vault.index.flush() {
            tracing::warn!(error = %e, "could not flush the index after a commit");
        }
        if let Some(l) = self.lease.take()
            && let Err(e) = l.release()
        {
            tracing::warn!(error = %e, "could not end the writer lease; it expires by itself");
        }
        Ok(())
    }
}

impl Drop for WriteSession<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Reclaim the uncommitted tail at once (a full disk wants its space
        // back); the next writer would do it anyway.
        if self.vault.remote.is_some() {
            return;
        }
        for a in self.adopted.iter().filter(|a| !a.committed) {
            // Only the link goes: the pack stays the snapshot's.
            let _ = std::fs::remove_file(self.vault.segment_path(a.id));
        }
        if let Some(w) = self.writer.take() {
            let keep = if self.writer_is_new {
                0
            } else {
                self.writer_committed
            };
            let result = w.discard(&self.vault.copies, keep);
            if let Err(e) = result {
                tracing::warn!(error = %e, "could not discard uncommitted segment bytes; the next writer will");
            }
        }
    }
}

/// Node children from the session's pending nodes, else from the vault.
struct VaultNodes<'a> {
    vault: &'a Vault,
    pending: &'a HashMap<ChunkId, Vec<ChunkId>>,
}

impl NodeChildren for VaultNodes<'_> {
    fn children(&self, id: &ChunkId, kind: ChunkKind) -> Result<Vec<ChunkId>> {
        match self.pending.get(id) {
            Some(c) => Ok(c.clone()),
            None => self.vault.children(id, kind),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
pub(crate) mod tests {
    use super::*;
    use crate::format::blockmap::Node;
    use crate::format::catalog::{PointStats, Protection};
    use crate::format::record::RecordEncoder;
    use crate::index::RefEntry;

    #[test]
    fn an_adopted_packs_dead_ranges_are_the_gaps_between_its_indexed_records() {
        let a = Adopted {
            id: 7,
            len: 1000,
            committed: false,
            used: vec![(500, 100), (32, 68), (700, 50)],
        };
        assert_eq!(a.gaps(), vec![(100, 400), (600, 100), (750, 250)]);
        let all = Adopted {
            used: vec![(32, 968)],
            ..a
        };
        assert!(all.gaps().is_empty());
        // A huge unused stretch is cut into pieces a `dead` entry holds.
        let none = Adopted {
            id: 8,
            len: (3 << 30) + 32,
            committed: false,
            used: Vec::new(),
        };
        let gaps = none.gaps();
        assert_eq!(gaps.len(), 3);
        assert_eq!(gaps.iter().map(|g| u64::from(g.1)).sum::<u64>(), 3 << 30);
    }

    fn config() -> VaultConfig {
        VaultConfig {
            name: "t-vault".into(),
            vault_id: "0123456789abcdef".into(),
            block_size: 65536,
            compression_level: 1,
            redundancy: crate::format::config::Redundancy::Lrs,
            created: "2027-01-01T00:00:00Z".parse().unwrap(),
            snapshot_area: None,
            replicas: Vec::new(),
            secondary: None,
            store: None,
            adopted_packs: false,
        }
    }

    /// Stores a point whose block map is `blocks` (duplicates allowed).
    pub(crate) fn store_point(v: &Vault, seq: u64, blocks: &[&[u8]]) -> ChunkId {
        let mut enc = RecordEncoder::new(1);
        let mut s = v.begin_write().unwrap();
        let entries: Vec<Option<ChunkId>> = blocks.iter().map(|b| Some(ChunkId::of(b))).collect();
        for b in blocks {
            let id = ChunkId::of(b);
            if !s.contains(&id).unwrap() {
                s.append(id, &enc.encode(id, b).unwrap()).unwrap();
            }
        }
        let leaf = Node::Leaf {
            first_block: 0,
            entries: entries.clone(),
        }
        .encode();
        let leaf_id = ChunkId::of(&leaf);
        if !s.contains(&leaf_id).unwrap() {
            let kids = entries.iter().flatten().copied().collect();
            s.append_node(
                leaf_id,
                &enc.encode(leaf_id, &leaf).unwrap(),
                ChunkKind::Leaf,
                kids,
            )
            .unwrap();
        }
        let root = Node::Root {
            image_size: blocks.len() as u64 * 65536,
            block_size: 65536,
            leaves: vec![leaf_id],
        }
        .encode();
        let root_id = ChunkId::of(&root);
        if !s.contains(&root_id).unwrap() {
            s.append_node(
                root_id,
                &enc.encode(root_id, &root).unwrap(),
                ChunkKind::Root,
                vec![leaf_id],
            )
            .unwrap();
        }
        let mut b = IndexBatch::default();
        b.put_item(ItemRecord {
            name: "i".into(),
            source: "/i".into(),
            created: "2027-01-01T00:00:00Z".parse().unwrap(),
            next_seq: seq + 1,
            policy: None,
            protection: Protection::Protected,
            last_slot: None,
            identity: None,
            hooks: Default::default(),
        });
        b.put_point(PointRecord {
            id: format!("p{seq}"),
            item: "i".into(),
            seq,
            created: "2027-01-01T00:00:00Z".parse().unwrap(),
            image_size: blocks.len() as u64 * 65536,
            block_size: 65536,
            block_map: root_id,
            stats: PointStats::default(),
            scheduled: false,
            retain_until: None,
            job: None,
            level: None,
            cbt: None,
        });
        s.reference_root(root_id);
        s.commit(b).unwrap();
        root_id
    }

    fn counts(v: &Vault) -> Vec<(ChunkId, Option<RefEntry>)> {
        v.index()
            .chunks()
            .unwrap()
            .into_iter()
            .map(|(id, _)| (id, v.index().chunk_ref(&id).unwrap()))
            .collect()
    }

    #[test]
    fn a_points_commit_leaves_no_log_to_replay_and_counts_read_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("v");
        let v = Vault::create(&vdir, config()).unwrap();
        let blocks: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().repeat(64)).collect();
        let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
        store_point(&v, 1, &refs);
        // The commit was flushed into table files: every write-ahead log
        // is empty, so the next open replays nothing.
        let logged: u64 = std::fs::read_dir(vdir.join(INDEX_DIR))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert_eq!(logged, 0);
        drop(v);
        let r = Vault::open(&vdir, Access::ReadOnly).unwrap();
        assert_eq!(r.points("i").unwrap().len(), 1);
        // A batched read gives what one lookup at a time gives, in order.
        let mut ids: Vec<ChunkId> = refs.iter().map(|b| ChunkId::of(b)).collect();
        ids.push(ChunkId::of(b"never stored"));
        let one_by_one: Vec<_> = ids
            .iter()
            .map(|id| r.index().chunk_ref(id).unwrap())
            .collect();
        assert_eq!(r.index().chunk_refs(&ids, false).unwrap(), one_by_one);
        assert_eq!(one_by_one.last(), Some(&None));
        assert!(
            one_by_one[..300]
                .iter()
                .all(|e| e.is_some_and(|e| e.count == 1))
        );
        ids.sort_unstable();
        let sorted: Vec<_> = ids
            .iter()
            .map(|id| r.index().chunk_ref(id).unwrap())
            .collect();
        assert_eq!(r.index().chunk_refs(&ids, true).unwrap(), sorted);
    }

    #[test]
    fn locations_read_in_one_batch_and_read_ahead_brings_their_records_in() {
        use crate::store::local::read_ahead::{drop_cached, resident};
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("v");
        let v = Vault::create(&vdir, config()).unwrap();
        // Incompressible blocks of 64 KiB: records of 64 KiB and more.
        let blocks: Vec<Vec<u8>> = (0..64u32)
            .map(|i| {
                let mut b = vec![0u8; 65536];
                blake3::Hasher::new()
                    .update(&i.to_le_bytes())
                    .finalize_xof()
                    .fill(&mut b);
                b
            })
            .collect();
        let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
        store_point(&v, 1, &refs);
        let mut ids: Vec<ChunkId> = refs.iter().map(|b| ChunkId::of(b)).collect();
        ids.insert(5, ChunkId::of(b"never stored"));
        let batched = v.index().chunk_locations(&ids).unwrap();
        let one_by_one: Vec<_> = ids.iter().map(|id| v.index().chunk(id).unwrap()).collect();
        assert_eq!(batched, one_by_one);
        assert_eq!(batched[5], None);
        let locs: Vec<ChunkLocation> = batched.into_iter().flatten().collect();
        assert_eq!(locs.len(), 64);
        let seg =
            |l: &ChunkLocation| std::fs::File::open(vdir.join(segment_name(l.segment))).unwrap();
        let cached = |ls: &[ChunkLocation]| -> usize {
            ls.iter()
                .map(|l| resident(&seg(l), l.offset..l.offset + u64::from(l.len)).unwrap())
                .sum()
        };
        let pages = |ls: &[ChunkLocation]| -> usize {
            ls.iter()
                .map(|l| {
                    (l.offset + u64::from(l.len)).div_ceil(4096) as usize - l.offset as usize / 4096
                })
                .sum()
        };
        for l in &locs {
            drop_cached(&seg(l));
        }
        if cached(&locs) > 0 {
            crate::skip::skip(&format!("the page cache keeps {} (tmpfs?)", vdir.display()));
            return;
        }
        // The first 24 records, in no particular order.
        let mut wanted = locs[..24].to_vec();
        wanted.reverse();
        v.read_ahead(&wanted);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while cached(&wanted) < pages(&wanted) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(
            cached(&wanted),
            pages(&wanted),
            "the records were read ahead"
        );
        // Segment order follows the point's blocks: the last records, far
        // from the wanted ones, were not read.
        let far: Vec<ChunkLocation> = locs[40..]
            .iter()
            .filter(|l| {
                locs[..24].iter().all(|w| {
                    w.segment != l.segment
                        || l.offset > w.offset + 2 * crate::store::local::read_ahead::RUN_GAP
                })
            })
            .copied()
            .collect();
        assert!(!far.is_empty());
        assert_eq!(
            cached(&far),
            0,
            "records far from the wanted ones stay unread"
        );
    }

    #[test]
    fn counts_follow_points_and_the_upgrade_rebuilds_them() {
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("v");
        let v = Vault::create(&vdir, config()).unwrap();
        let a: &[u8] = b"block a";
        let b: &[u8] = b"block b";
        let c: &[u8] = b"block c";
        // A leaf left behind by an interrupted backup: indexed, never
        // referenced.
        let orphan = Node::Leaf {
            first_block: 0,
            entries: vec![Some(ChunkId::of(b"block z"))],
        }
        .encode();
        let orphan_id = ChunkId::of(&orphan);
        {
            let mut s = v.begin_write().unwrap();
            let rec = RecordEncoder::new(1).encode(orphan_id, &orphan).unwrap();
            s.append_node(orphan_id, &rec, ChunkKind::Leaf, vec![])
                .unwrap();
            s.checkpoint().unwrap();
            s.commit(IndexBatch::default()).unwrap();
        }
        let r1 = store_point(&v, 1, &[a, b, a]);
        let r2 = store_point(&v, 2, &[a, c]);
        let count = |id: &ChunkId| v.index().chunk_ref(id).unwrap().unwrap().count;
        // a twice in leaf 1 and once in leaf 2; b once; c once; roots once.
        assert_eq!(count(&ChunkId::of(a)), 3);
        assert_eq!(count(&ChunkId::of(b)), 1);
        assert_eq!((count(&r1), count(&r2)), (1, 1));
        assert_eq!(v.index().unreferenced_from(None, 10).unwrap(), [orphan_id]);

        // Dropping point 1 releases its root, its leaf, and b.
        let mut batch = IndexBatch::default();
        batch.delete_point("i", 1);
        v.commit_catalog(batch, &[r1]).unwrap();
        assert_eq!(count(&ChunkId::of(a)), 1);
        assert_eq!(count(&ChunkId::of(b)), 0);
        assert_eq!(v.index().unreferenced_from(None, 10).unwrap().len(), 4);
        let before = counts(&v);

        // An old vault: no counts at all. The first writer rebuilds them.
        let ids: Vec<ChunkId> = before.iter().map(|(id, _)| *id).collect();
        let mut wipe = IndexBatch::default();
        wipe.wipe_gc_layout(&ids);
        v.index().commit(wipe).unwrap();
        assert!(!v.index().has_gc_layout().unwrap());
        drop(v);
        let v = Vault::open(&vdir, Access::Write).unwrap();
        assert!(v.index().has_gc_layout().unwrap());
        assert_eq!(
            counts(&v),
            before,
            "the orphan leaf, the dead root and leaf keep their kinds"
        );
        assert_eq!(v.index().unreferenced_from(None, 10).unwrap().len(), 4);
    }
}
