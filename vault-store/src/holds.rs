//! Holds (`VAULT/holds/TAG.hold`): the points live restores still read
//! through coffre's export, which prune, snapshot expiry and GC must keep.
//!
//! While `coffre restore --live` runs, and after it was killed until
//! `--resume` completes it, the VM's new disk is a qcow2 whose backing is
//! the export of point P: the blocks not yet streamed exist only in P. The
//! live restore writes a hold naming the item, P, the tier, the target and
//! when it began, before QEMU is given the target, and removes it only
//! when the target no longer needs P (the stream completed, or the run
//! failed before QEMU had the target), or when the user abandons the
//! restore. Prune keeps a held point and its snapshots; GC keeps their
//! chunks because a kept point keeps its references, and refuses to run
//! while a hold names a point the vault no longer lists.
//!
//! A hold that cannot be read (damaged, forged, of a newer version, a
//! name that is no tag) makes [`HoldStore::list`] fail naming the file:
//! prune and GC then delete nothing of the vault (nothing is destroyed on
//! partial knowledge).
//!
//! **The race with prune.** A live restore reads the point from the index
//! it opened; a prune that deleted the point after that open but before
//! the hold was written would leave the restore on a deleted point. So a
//! prune that deletes holds the vault's holds lock
//! (`VAULT/locks/holds.lock`, [`HoldsLock`]) from reading the holds until
//! its last deletion, and a live restore takes the same lock *before it
//! opens the vault* and releases it once its hold is written: either the
//! prune finished first (the restore's index no longer lists the point,
//! and it fails cleanly), or the prune reads the hold.
//!
//! Records are written through the storage seam ([`LocalStore::put`]:
//! temporary file, fsync, rename, directory fsync) in an envelope
//! ([`crate::format::hold`]); an encrypted vault's are sealed, bound to
//! their name, like job records.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Result, StoreError};
pub use crate::format::hold::{
    FileId, HOLD_MAGIC, HOLD_SUFFIX, HOLD_VERSION, HOLDS_DIR, HoldRecord, hold_file, is_tag,
    target_tag,
};
use crate::store::local::lock::NamedLock;
use crate::store::{LocalStore, Store};

/// The holds lock, under the vault's `locks/` folder.
pub const HOLDS_LOCK: &str = "locks/holds.lock";

/// The vault's holds lock, held; released on drop.
#[derive(Debug)]
pub struct HoldsLock {
    _lock: NamedLock,
}

impl HoldsLock {
    /// Takes the holds lock of the vault in `vault_dir`, waiting up to
    /// `wait` for its holder (a prune deleting points).
    pub fn acquire(vault_dir: &Path, wait: Duration, holder: &str) -> Result<HoldsLock> {
        let path = vault_dir.join(HOLDS_LOCK);
        let deadline = Instant::now() + wait;
        loop {
            match NamedLock::try_acquire(&path, holder)? {
                Ok(lock) => return Ok(HoldsLock { _lock: lock }),
                Err(who) if Instant::now() >= deadline => {
                    return Err(StoreError::CorruptFile {
                        path,
                        what: "holds lock",
                        reason: format!(
                            "held by {} for more than {} s (a prune deleting points?): try again when it is done",
                            if who.is_empty() {
                                "an unknown holder"
                            } else {
                                &who
                            },
                            wait.as_secs()
                        ),
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// The holds of a vault.
#[derive(Debug, Clone)]
pub struct HoldStore {
    dir: PathBuf,
    store: std::sync::Arc<LocalStore>,
    /// An encrypted vault's keys (`Ok(None)`: a plain vault; `Err`: an
    /// encrypted vault this process did not unlock).
    keys: std::result::Result<Option<std::sync::Arc<crate::crypto::VaultKeys>>, PathBuf>,
}

impl HoldStore {
    /// The holds of the vault in `vault_dir`, sealed with `keys` when the
    /// vault is encrypted.
    pub fn new(vault_dir: &Path, keys: Option<&std::sync::Arc<crate::crypto::VaultKeys>>) -> Self {
        HoldStore {
            dir: vault_dir.to_path_buf(),
            store: std::sync::Arc::new(LocalStore::new(vault_dir)),
            keys: crate::copies::state_files::file_keys(vault_dir, keys)
                .map_err(|_| vault_dir.to_path_buf()),
        }
    }

    fn keys(&self) -> Result<Option<&crate::crypto::VaultKeys>> {
        match &self.keys {
            Ok(k) => Ok(k.as_deref()),
            Err(dir) => Err(StoreError::KeyNeeded { path: dir.clone() }),
        }
    }

    fn corrupt(&self, name: &str, reason: String) -> StoreError {
        StoreError::CorruptFile {
            path: self.dir.join(name),
            what: "live restore hold",
            reason: format!(
                "{reason}; prune and gc delete nothing of this vault while it cannot be read. If no live restore of this vault is unfinished (no VM disk still has a coffre export as its backing), remove the file"
            ),
        }
    }

    /// Writes (or replaces) the hold of the live restore into
    /// `record.target`, durably.
    pub fn put(&self, record: &HoldRecord) -> Result<()> {
        let name = hold_file(&record.target);
        record.check().map_err(|e| self.corrupt(&name, e))?;
        let body = record.encode().map_err(|e| self.corrupt(&name, e))?;
        let bytes = crate::format::sealed_file::seal(&name, &body, self.keys()?)
            .map_err(|e| self.corrupt(&name, format!("cannot seal it: {e}")))?
            .into_owned();
        self.store.put(&name, &bytes)
    }

    /// The hold of the live restore into `target`, if any (an error when
    /// it cannot be read).
    pub fn get(&self, target: &Path) -> Result<Option<HoldRecord>> {
        let name = hold_file(target);
        match self.store.get(&name)? {
            None => Ok(None),
            Some(bytes) => self.decode(&name, &bytes).map(Some),
        }
    }

    fn decode(&self, name: &str, bytes: &[u8]) -> Result<HoldRecord> {
        let tag = name
            .strip_prefix(&format!("{HOLDS_DIR}/"))
            .and_then(|n| n.strip_suffix(HOLD_SUFFIX))
            .filter(|t| is_tag(t))
            .ok_or_else(|| self.corrupt(name, "its name is not TAG.hold (16 hex digits)".into()))?;
        let plain = crate::format::sealed_file::open(name, bytes, self.keys()?)
            .map_err(|e| self.corrupt(name, format!("refused: {e}")))?;
        HoldRecord::decode(&plain, tag).map_err(|e| self.corrupt(name, e))
    }

    /// Removes the hold of the live restore into `target`; true when there
    /// was one.
    pub fn remove(&self, target: &Path) -> Result<bool> {
        self.store.delete(&hold_file(target))
    }

    /// Every hold, by target. Fails, naming the file, on the first hold
    /// that cannot be read: whoever deletes must then delete nothing.
    /// Temporary files of an interrupted write (not `*.hold`) are skipped.
    pub fn list(&self) -> Result<Vec<HoldRecord>> {
        let mut out = Vec::new();
        for n in self.store.list(HOLDS_DIR)? {
            if !n.ends_with(HOLD_SUFFIX) || n.starts_with('.') {
                continue;
            }
            let name = format!("{HOLDS_DIR}/{n}");
            if n.ends_with('/') {
                return Err(self.corrupt(&name, "a folder where holds are files".into()));
            }
            // A hold removed meanwhile (its restore completed) holds
            // nothing.
            let Some(bytes) = self.store.get(&name)? else {
                continue;
            };
            out.push(self.decode(&name, &bytes)?);
        }
        out.sort_by(|a, b| (&a.item, &a.point, &a.target).cmp(&(&b.item, &b.point, &b.target)));
        Ok(out)
    }

    /// The path of a hold file (for messages).
    pub fn path_of(&self, target: &Path) -> PathBuf {
        self.dir.join(hold_file(target))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(target: &str, point: &str) -> HoldRecord {
        HoldRecord {
            item: "vm".into(),
            point: point.into(),
            tier: "vault".into(),
            target: PathBuf::from(target),
            started: jiff::Timestamp::from_second(1_700_000_000).unwrap(),
            pid: 7,
            target_file: None,
        }
    }

    #[test]
    fn holds_are_written_listed_and_removed_and_a_damaged_one_fails_the_list() {
        let t = tempfile::tempdir().unwrap();
        let s = HoldStore::new(t.path(), None);
        assert!(s.list().unwrap().is_empty());
        let a = record("/srv/a.qcow2", "p1");
        let b = record("/srv/b.qcow2", "p2");
        s.put(&a).unwrap();
        s.put(&b).unwrap();
        assert_eq!(s.list().unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(s.get(&a.target).unwrap(), Some(a.clone()));
        // A temporary file of an interrupted write is no hold.
        std::fs::write(t.path().join("holds/.x.hold.1234.tmp"), b"junk").unwrap();
        assert_eq!(s.list().unwrap().len(), 2);
        // A damaged hold: the list fails naming the file.
        let path = s.path_of(&b.target);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes.truncate(n - 3);
        std::fs::write(&path, &bytes).unwrap();
        let e = s.list().unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("delete nothing"), "{e}");
        // A hold copied under another target's name is refused too.
        std::fs::write(&path, a.encode().unwrap()).unwrap();
        assert!(s.list().unwrap_err().to_string().contains("not this file"));
        // A badly named one.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(t.path().join("holds/zz.hold"), a.encode().unwrap()).unwrap();
        assert!(s.list().unwrap_err().to_string().contains("16 hex"));
        std::fs::remove_file(t.path().join("holds/zz.hold")).unwrap();
        assert!(s.remove(&a.target).unwrap());
        assert!(!s.remove(&a.target).unwrap());
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn the_holds_lock_waits_then_fails_naming_its_holder() {
        let t = tempfile::tempdir().unwrap();
        let held = HoldsLock::acquire(t.path(), Duration::ZERO, "prune pid 1").unwrap();
        let e = HoldsLock::acquire(t.path(), Duration::from_millis(120), "restore")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prune pid 1"), "{e}");
        drop(held);
        HoldsLock::acquire(t.path(), Duration::ZERO, "restore").unwrap();
    }
}
