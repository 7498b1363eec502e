//! What a local copy does beyond the [`Store`](crate::store::Store)
//! trait: its root and folders (a vault's directory, its `segments/` and
//! `index/`, a shared vault's cache), and whole folder trees (the index
//! directories a rebuild swaps). Names are checked like every other
//! name of the store ([`LocalStore::path`]).

use std::fs;
use std::io::ErrorKind;

use super::LocalStore;
use super::durable::{create_dir_durable, fsync_dir};
use crate::error::{Result, StoreError};

impl LocalStore {
    /// True when the root is missing or an empty folder.
    pub fn root_is_empty(&self) -> Result<bool> {
        empty_or_missing(self.root())
    }

    /// Creates the root (owner-only, with missing parents) durably; an
    /// existing root that is not empty is refused ([`StoreError::AlreadyExists`]).
    pub fn create_empty_root(&self) -> Result<()> {
        if !self.root_is_empty()? {
            return Err(StoreError::AlreadyExists {
                path: self.root().to_path_buf(),
            });
        }
        create_dir_durable(self.root())
    }

    /// Creates the root, or makes an existing one owner-only, durably.
    pub fn create_root(&self) -> Result<()> {
        create_dir_durable(self.root())
    }

    /// Creates folder `name` (owner-only, with missing parents) durably.
    pub fn create_dir(&self, name: &str) -> Result<()> {
        create_dir_durable(&self.path(name)?)
    }

    /// When `name` was last modified (`None` when that cannot be read).
    pub fn modified(&self, name: &str) -> Option<std::time::SystemTime> {
        fs::symlink_metadata(self.path(name).ok()?)
            .and_then(|m| m.modified())
            .ok()
    }

    /// True when `name` is a folder.
    pub fn is_dir(&self, name: &str) -> bool {
        self.path(name).is_ok_and(|p| p.is_dir())
    }

    /// True when `name` is a folder with nothing in it, or missing.
    pub fn dir_is_empty(&self, name: &str) -> Result<bool> {
        empty_or_missing(&self.path(name)?)
    }

    /// Removes folder `name` and everything in it, durably; `false` when
    /// it did not exist. A symbolic link at `name` is removed, never
    /// followed.
    pub fn remove_tree(&self, name: &str) -> Result<bool> {
        let path = self.path(name)?;
        self.forget_under(name);
        let removed = match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io("stat", &path, e)),
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io("remove", &path, e)),
        }
        if let Some(dir) = path.parent() {
            fsync_dir(dir)?;
        }
        Ok(true)
    }
}

/// True when `dir` is missing or an empty folder.
fn empty_or_missing(dir: &std::path::Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
        Err(e) => Err(StoreError::io("read directory", dir, e)),
    }
}
