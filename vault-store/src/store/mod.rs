//! The storage seam: every byte of a vault copy goes through [`Store`].
//!
//! A vault is one or more *copies* (the vault directory, LRS replicas, the
//! GRS secondary); each copy is a [`Store`] rooted at one place. Names are
//! relative, `/`-separated paths (`segments/0000000000000001.seg`,
//! `points/web/0000000000000003.point`). The trait is deliberately small
//! and speaks in whole operations rather than file handles, so that an
//! object-store implementation maps onto it (see `ARCHITECTURE.md`,
//! "Storage seam"):
//!
//! - segments are written by an [`Appender`] (create or continue, append,
//!   start writeback, sync) and never rewritten below their committed
//!   length, except by [`Store::write_at`] with bytes a checksum proved
//!   equal to the committed ones (repair);
//! - small state files are replaced whole and durably by [`Store::put`]
//!   (write, fsync, rename, directory fsync locally; a conditional put in
//!   an object store);
//! - [`Store::delete`], [`Store::truncate`] and [`Store::punch`] are durable
//!   when they return.
//!
//! Implementations: [`local::LocalStore`] (a directory) and
//! [`fault::FaultStore`] (wraps one and injects failed fsyncs, short writes,
//! ENOSPC, read errors and power loss, for tests).

pub mod fault;
pub mod local;
#[cfg(feature = "object")]
pub mod object;
pub mod parts;

use std::fmt::Debug;
use std::sync::Arc;

use crate::error::Result;

pub use fault::{FaultStore, Faults};
pub use local::LocalStore;

/// One copy's storage.
pub trait Store: Send + Sync + Debug {
    /// Where the copy lives, for messages (a path or a URL).
    fn location(&self) -> String;
    /// Creates `name` (which must not exist) for appending. Its directory
    /// entry becomes durable with the appender's first [`Appender::sync`].
    fn create(&self, name: &str) -> Result<Box<dyn Appender>>;
    /// Opens `name` to append after its first `len` bytes (anything past
    /// them is cut off first).
    fn append_to(&self, name: &str, len: u64) -> Result<Box<dyn Appender>>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Starts reading `offset..offset+len` of `name` ahead of the reads
    /// that will need it (advice: the default, for stores without a
    /// cache to fill, does nothing; errors are ignored).
    fn will_need(&self, name: &str, offset: u64, len: u64) {
        let _ = (name, offset, len);
    }
    /// Writes `bytes` at `offset`, creating the file if needed, and makes
    /// them durable (repair only: the caller proved them right).
    fn write_at(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<()>;
    /// Size of `name`, or `None` when it does not exist.
    fn size(&self, name: &str) -> Result<Option<u64>>;
    /// Replaces `name` with `bytes` atomically and durably.
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()>;
    /// Creates `name` with `bytes` only if it does not exist; `false` when
    /// it does (an object store's conditional create). The default, for
    /// local copies, relies on the vault's writer lock.
    fn put_new(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        if self.size(name)?.is_some() {
            return Ok(false);
        }
        self.put(name, bytes)?;
        Ok(true)
    }
    /// The content of `name` with its version, for [`Store::put_if`].
    fn get_version(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        Ok(self.get(name)?.map(|b| {
            let v = Version::of_bytes(&b);
            (b, v)
        }))
    }
    /// Replaces `name` only if it is still at version `expected` (an
    /// object store's `If-Match`); `None` when it changed meanwhile.
    fn put_if(&self, name: &str, bytes: &[u8], expected: &Version) -> Result<Option<Version>> {
        match self.get_version(name)? {
            Some((_, v)) if &v == expected => {
                self.put(name, bytes)?;
                Ok(Some(Version::of_bytes(bytes)))
            }
            _ => Ok(None),
        }
    }
    /// The whole content of `name`, or `None` when it does not exist.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Names of the files directly in folder `dir` (not recursive; empty
    /// when the folder does not exist). Sub-folders are listed with a
    /// trailing `/`.
    fn list(&self, dir: &str) -> Result<Vec<String>>;
    /// Removes `name` durably; `false` when it did not exist.
    fn delete(&self, name: &str) -> Result<bool>;
    /// Moves `from` to `to` (which must not exist) durably, creating its
    /// folder. The default, for stores without a rename, copies the
    /// content then deletes `from`: a crash between leaves both, never
    /// neither.
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let Some(bytes) = self.get(from)? else {
            return Ok(());
        };
        self.put(to, &bytes)?;
        self.delete(from)?;
        Ok(())
    }
    /// Links the local file `from` (outside the copy; a snapshot's pack)
    /// into the copy as `name`, which must not exist: `from` is made
    /// durable first and the new entry is durable when this returns, so
    /// its bytes are written once for both. `false` when the store cannot
    /// share the file (the default: an object store; locally, a file on
    /// another filesystem or not a regular file): the caller writes the
    /// bytes itself.
    fn link(&self, name: &str, from: &std::path::Path) -> Result<bool> {
        let _ = (name, from);
        Ok(false)
    }
    /// Cuts `name` to `len` bytes durably.
    fn truncate(&self, name: &str, len: u64) -> Result<()>;
    /// Gives the space of `offset..offset+len` back; `false` when the
    /// store cannot (the bytes stay).
    fn punch(&self, name: &str, offset: u64, len: u64) -> Result<bool>;
    /// Drops cached handles (after files were removed or cut).
    fn forget(&self);
    /// Device, filesystem and free space of the copy, when it has them.
    fn space(&self) -> Option<SpaceInfo>;
}

/// Appends to one file of a [`Store`].
pub trait Appender: Send + Sync {
    /// Appends `bytes` at the end.
    fn append(&mut self, bytes: &[u8]) -> Result<()>;
    /// Starts writing what was appended back without waiting.
    fn start_writeback(&mut self) -> Result<()>;
    /// Makes everything appended durable (and, the first time for a new
    /// file, its directory entry).
    fn sync(&mut self) -> Result<()>;
    /// Bytes in the file, appended ones included.
    fn len(&self) -> u64;
    /// True when the file is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a copy lives, for `vault show`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SpaceInfo {
    /// `st_dev` of the copy's directory: two copies with the same device
    /// die together.
    pub device: u64,
    /// Filesystem type (`ext4`, `xfs`, …) or the magic number in hex.
    pub filesystem: String,
    /// Bytes available to this user.
    pub free_bytes: u64,
    /// Size of the filesystem.
    pub total_bytes: u64,
}

/// The version of a file, for conditional replacement: an object
/// store's ETag (and version id), or a local file's content hash.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Version {
    /// ETag.
    pub e_tag: Option<String>,
    /// Version id, where the store keeps versions.
    pub version: Option<String>,
}

impl Version {
    /// The version of a local file: the BLAKE3 of its content.
    pub fn of_bytes(bytes: &[u8]) -> Version {
        Version {
            e_tag: Some(blake3::hash(bytes).to_hex().to_string()),
            version: None,
        }
    }
}

/// A shared store.
pub type SharedStore = Arc<dyn Store>;

/// Joins a folder and a name with `/`.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}
