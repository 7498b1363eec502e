//! A host's memory of the generations of one encrypted vault copy's
//! sealed files ([`HostGenerations`], the [`Generations`] of the keys the
//! copy is unlocked with): rollback protection.
//!
//! The memory is a private file per copy in a host directory (the CLI
//! keeps it beside the host registry), named after the copy's canonical
//! directory and decoded by [`crate::format::generations`]; it names the
//! vault, and another vault found at the same path starts a new memory.
//! Generations come from an injected clock, in nanoseconds, and always
//! rise above every generation this host has seen or sealed in the copy
//! (so a clock that steps back, or stands still, still gives rising ones;
//! files written by other processes and hosts, whose writers read the
//! current file before replacing it, are never taken for rollbacks).
//! What is checked is what was read (see [`crate::crypto::generations`]):
//! per name, the highest generation read and its content's digest; an
//! older file with that same content (a copy sealed again) is accepted,
//! one with other content refused. The memory is loaded when the copy is
//! unlocked and synchronised with its file, under a lock, at most once a
//! second while in use and when dropped: what other processes remembered
//! is merged in (each name keeps its highest generation) and what this one
//! learnt written back. It keeps at most [`MAX_ENTRIES`] names (the
//! oldest are forgotten). Losing an update (a crash, a name forgotten)
//! only makes the memory older: it never refuses a file it should accept.
//! The file exists from the first unlock on: it is also how the host
//! remembers that the copy is encrypted (a plain config found there later
//! is refused).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::crypto::{Generations, Rollback};
use crate::error::{Result, StoreError};
use crate::format::generations::{Memory, Seen, decode, encode};
use crate::store::local::durable::write_atomic;

/// The clock generations come from: nanoseconds since the Unix epoch.
pub type NanoClock = Box<dyn Fn() -> u64 + Send + Sync>;

/// Least time between two synchronisations with the file while in use.
const SYNC_EVERY_NS: u64 = 1_000_000_000;

/// Most names a memory keeps (about 10 MB of file).
pub const MAX_ENTRIES: usize = 100_000;

/// One copy's memory, kept in a file (or only in this process).
pub struct HostGenerations {
    /// The memory's file (`None`: this process only).
    path: Option<PathBuf>,
    now: NanoClock,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    memory: Memory,
    dirty: bool,
    synced_at: u64,
}

impl std::fmt::Debug for HostGenerations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostGenerations({:?})", self.path)
    }
}

/// The file in `memory_dir` that remembers the copy at `vault_dir`.
pub fn memory_file(memory_dir: &Path, vault_dir: &Path) -> PathBuf {
    let dir = std::fs::canonicalize(vault_dir).unwrap_or_else(|_| vault_dir.to_path_buf());
    let hash = blake3::hash(dir.as_os_str().as_encoded_bytes());
    memory_dir.join(format!("{}.gen", &hash.to_hex()[..32]))
}

/// Merges `theirs` into `mine` when both are the same vault's: each name
/// keeps its highest generation.
fn merge(mine: &mut Memory, theirs: Memory) {
    if theirs.vault_id != mine.vault_id {
        return;
    }
    mine.highest = mine.highest.max(theirs.highest);
    for (name, t) in theirs.seen {
        match mine.seen.get_mut(&name) {
            Some(m) if m.generation >= t.generation => {}
            Some(m) => *m = t,
            None => {
                mine.seen.insert(name, t);
            }
        }
    }
}

/// Forgets the oldest names beyond [`MAX_ENTRIES`].
fn trim(memory: &mut Memory) {
    let extra = memory.seen.len().saturating_sub(MAX_ENTRIES);
    if extra == 0 {
        return;
    }
    let mut gens: Vec<u64> = memory.seen.values().map(|s| s.generation).collect();
    gens.sort_unstable();
    let cut = gens.get(extra).copied().unwrap_or(u64::MAX);
    memory.seen.retain(|_, s| s.generation >= cut);
}

impl HostGenerations {
    /// The memory of the copy at `vault_dir` of vault `vault_id`, kept in
    /// `memory_dir` (created private), loaded from its file (a memory of
    /// another vault at that path is started afresh, and so is a damaged
    /// file, named in a warning, which the memory then replaces).
    pub fn open(
        memory_dir: &Path,
        vault_dir: &Path,
        vault_id: &str,
        now: NanoClock,
    ) -> Result<Self> {
        crate::store::local::private::create_private_dir(memory_dir)
            .map_err(|e| StoreError::io("create directory", memory_dir, e))?;
        let path = memory_file(memory_dir, vault_dir);
        let found = read(&path).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the host's memory of the vault's files starts afresh");
            None
        });
        let fresh = found.as_ref().is_none_or(|m| m.vault_id != vault_id);
        let mut memory = found.filter(|_| !fresh).unwrap_or_default();
        memory.dir = vault_dir.to_path_buf();
        memory.vault_id = vault_id.to_string();
        Ok(HostGenerations {
            path: Some(path),
            now,
            state: Mutex::new(State {
                memory,
                // A new memory is written at once (when dropped at the
                // latest): it also marks the copy as encrypted.
                dirty: fresh,
                synced_at: 0,
            }),
        })
    }

    /// A memory of this process only (a host with no state directory).
    pub fn in_process(vault_dir: &Path, vault_id: &str, now: NanoClock) -> Self {
        HostGenerations {
            path: None,
            now,
            state: Mutex::new(State {
                memory: Memory {
                    dir: vault_dir.to_path_buf(),
                    vault_id: vault_id.to_string(),
                    highest: 0,
                    seen: BTreeMap::new(),
                },
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Synchronises with the file: merges what other processes remembered
    /// and writes back what this one learnt.
    pub fn flush(&self) -> Result<()> {
        let mut state = self.state();
        self.sync_locked(&mut state)
    }

    fn sync_locked(&self, state: &mut State) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let lock_path = path.with_extension("lock");
        let lock = crate::store::local::private::open_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| StoreError::io("open", &lock_path, e))?;
        lock.lock()
            .map_err(|e| StoreError::io("lock", &lock_path, e))?;
        match read(path) {
            Ok(Some(theirs)) => merge(&mut state.memory, theirs),
            Ok(None) => {}
            // A damaged file is replaced by this memory.
            Err(e) => {
                tracing::warn!(error = %e, "the host's memory of the vault's files is damaged; it is rewritten");
                state.dirty = true;
            }
        }
        if state.dirty {
            trim(&mut state.memory);
            write_atomic(path, &encode(&state.memory))?;
            state.dirty = false;
        }
        state.synced_at = (self.now)();
        Ok(())
    }

    /// Synchronises when the last synchronisation is a second old.
    fn maybe_sync(&self, state: &mut State) {
        if (self.now)().saturating_sub(state.synced_at) >= SYNC_EVERY_NS
            && let Err(e) = self.sync_locked(state)
        {
            tracing::warn!(error = %e, "cannot write the host's memory of the vault's files");
        }
    }
}

/// The memory at `path`, `None` when there is none yet.
fn read(path: &Path) -> Result<Option<Memory>> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes).map(Some).map_err(|reason| StoreError::CorruptFile {
            path: path.to_path_buf(),
            what: "host memory of the vault's files (remove it to start afresh; rollbacks older than now are then not detected)",
            reason,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("read", path, e)),
    }
}

impl Generations for HostGenerations {
    fn next(&self, name: &str) -> u64 {
        let mut state = self.state();
        self.maybe_sync(&mut state);
        let seen = state.memory.seen.get(name).map_or(0, |s| s.generation);
        let g = (self.now)()
            .max(seen.saturating_add(1))
            .max(state.memory.highest.saturating_add(1));
        // Remembered as sealed (the next seal is above it), never as seen:
        // this write may not land.
        state.memory.highest = g;
        state.dirty = true;
        g
    }

    fn check(
        &self,
        name: &str,
        generation: u64,
        digest: &[u8; 32],
    ) -> std::result::Result<(), Rollback> {
        let mut state = self.state();
        let known = state.memory.seen.get(name);
        let highest = known.map_or(0, |s| s.generation);
        let same = known.is_some_and(|s| s.digest == hex::encode(digest));
        let is_new = known.is_none();
        if generation < highest && !same {
            return Err(Rollback {
                generation,
                highest,
                memory: self
                    .path
                    .as_ref()
                    .map_or_else(|| "(this process)".into(), |p| p.display().to_string()),
            });
        }
        if generation > highest || is_new {
            state
                .memory
                .seen
                .insert(name.to_string(), Seen::new(generation, digest));
            state.memory.highest = state.memory.highest.max(generation);
            state.dirty = true;
        }
        Ok(())
    }
}

impl Drop for HostGenerations {
    fn drop(&mut self) {
        let dirty = self.state().dirty;
        if dirty && let Err(e) = self.flush() {
            tracing::warn!(error = %e, "cannot write the host's memory of the vault's files");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn clock(at: &Arc<AtomicU64>) -> NanoClock {
        let at = at.clone();
        Box::new(move || at.load(Ordering::SeqCst))
    }

    #[test]
    fn generations_rise_and_an_older_file_is_refused_across_processes() {
        let host = tempfile::tempdir().unwrap();
        let vault = tempfile::tempdir().unwrap();
        let t = Arc::new(AtomicU64::new(100));
        let (one, two) = ([1; 32], [2; 32]);
        let a = HostGenerations::open(host.path(), vault.path(), "v1", clock(&t)).unwrap();
        let g1 = a.next("items/vm.item");
        assert_eq!(g1, 100);
        assert!(a.check("items/vm.item", g1, &one).is_ok());
        // The clock stands still or goes back: still rising.
        t.store(50, Ordering::SeqCst);
        let g2 = a.next("items/vm.item");
        assert!(g2 > g1, "{g2} > {g1}");
        assert!(a.check("items/vm.item", g2, &two).is_ok());
        let err = a.check("items/vm.item", g1, &one).unwrap_err();
        assert_eq!((err.generation, err.highest), (g1, g2));
        assert!(err.to_string().contains("rollback"), "{err}");
        // The same content sealed again (another copy) is no rollback.
        assert!(a.check("items/vm.item", g1, &two).is_ok());
        // Another name is unaffected; a newer generation is taken.
        assert!(a.check("items/db.item", 1, &one).is_ok());
        assert!(a.check("items/vm.item", g2 + 5, &one).is_ok());
        drop(a);
        // A later process remembers, merged with a second process's memory.
        let b = HostGenerations::open(host.path(), vault.path(), "v1", clock(&t)).unwrap();
        let c = HostGenerations::open(host.path(), vault.path(), "v1", clock(&t)).unwrap();
        assert!(c.check("points/vm/1.point", 9, &one).is_ok());
        drop(c);
        assert!(b.check("items/vm.item", g2 + 4, &two).is_err());
        drop(b);
        let d = HostGenerations::open(host.path(), vault.path(), "v1", clock(&t)).unwrap();
        assert!(d.check("points/vm/1.point", 8, &two).is_err());
        assert!(d.check("items/vm.item", g2 + 4, &two).is_err());
        assert!(d.next("items/vm.item") > g2 + 5);
        // Another copy has its own memory.
        let other = tempfile::tempdir().unwrap();
        let e = HostGenerations::open(host.path(), other.path(), "v1", clock(&t)).unwrap();
        assert!(e.check("items/vm.item", 1, &two).is_ok());
    }

    #[test]
    fn another_vault_at_the_same_path_starts_afresh_and_generations_never_go_back() {
        let host = tempfile::tempdir().unwrap();
        let vault = tempfile::tempdir().unwrap();
        let t = Arc::new(AtomicU64::new(1000));
        let a = HostGenerations::open(host.path(), vault.path(), "v1", clock(&t)).unwrap();
        assert!(a.check("items/vm.item", 900, &[1; 32]).is_ok());
        drop(a);
        assert!(memory_file(host.path(), vault.path()).exists());
        let b = HostGenerations::open(host.path(), vault.path(), "v2", clock(&t)).unwrap();
        assert!(b.check("items/vm.item", 5, &[2; 32]).is_ok());
        drop(b);
        // A clock stepped back: seals still rise above all sealed before,
        // in this process and the next.
        let c = HostGenerations::open(host.path(), vault.path(), "v2", clock(&t)).unwrap();
        let g1 = c.next("jobs/a.job");
        t.store(10, Ordering::SeqCst);
        let g2 = c.next("items/other.item");
        assert!(g2 > g1, "{g2} > {g1}");
        drop(c);
        let d = HostGenerations::open(host.path(), vault.path(), "v2", clock(&t)).unwrap();
        assert!(d.next("items/new.item") > g2);
    }

    #[test]
    fn the_oldest_names_are_forgotten_beyond_the_cap() {
        let mut m = Memory::default();
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            m.seen
                .insert(format!("jobs/{i}.job"), Seen::new(i, &[0; 32]));
        }
        trim(&mut m);
        assert_eq!(m.seen.len(), MAX_ENTRIES);
        assert!(!m.seen.contains_key("jobs/9.job"));
        assert!(m.seen.contains_key("jobs/10.job"));
    }

    #[test]
    fn a_damaged_memory_file_starts_afresh_and_is_replaced() {
        let host = tempfile::tempdir().unwrap();
        let vault = tempfile::tempdir().unwrap();
        let file = memory_file(host.path(), vault.path());
        std::fs::write(&file, b"junk").unwrap();
        let t = Arc::new(AtomicU64::new(1));
        let m = HostGenerations::open(host.path(), vault.path(), "v1", clock(&t)).unwrap();
        assert!(m.check("items/vm.item", 3, &[3; 32]).is_ok());
        drop(m);
        let back = decode(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(
            back.seen.get("items/vm.item").map(|s| s.generation),
            Some(3)
        );
    }

    #[test]
    fn a_name_only_another_process_saw_at_generation_0_is_merged_whole() {
        // Files sealed before the host had a memory carry generation 0:
        // merged, they keep their digest (an empty one would make the file
        // undecodable and turn the protection off).
        let host = tempfile::tempdir().unwrap();
        let vault = tempfile::tempdir().unwrap();
        let t = Arc::new(AtomicU64::new(5));
        let a = HostGenerations::open(host.path(), vault.path(), "v1", clock(&t)).unwrap();
        let b = HostGenerations::open(host.path(), vault.path(), "v1", clock(&t)).unwrap();
        assert!(a.check("policies/00.policy", 0, &[4; 32]).is_ok());
        drop(a);
        assert!(b.check("items/vm.item", 1, &[1; 32]).is_ok());
        drop(b);
        let file = memory_file(host.path(), vault.path());
        let back = decode(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(
            back.seen.get("policies/00.policy"),
            Some(&Seen::new(0, &[4; 32]))
        );
        let c = HostGenerations::open(host.path(), vault.path(), "v1", clock(&t)).unwrap();
        assert!(c.check("policies/00.policy", 0, &[5; 32]).is_ok());
        assert!(c.check("items/vm.item", 0, &[2; 32]).is_err());
    }
}
