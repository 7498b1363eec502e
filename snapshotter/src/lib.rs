//! coffre snapshotter: the snapshot phase of a backup and the instant-restore
//! tier.
//!
//! It owns reading disk images ([`source`], with the [`sigbus`] guard and
//! the [`throttle`]), the **capture** of a point in time (a reflink
//! [`clone`], or the fallback copy into a local chunk store of [`pack`]s
//! described by a [`manifest`]), the snapshot [`area`] next to the disks,
//! snapshot expiry and space accounting, consistency [`level`]s, [`hooks`]
//! and [`in_use`] detection, and reading snapshots back for the transfer
//! and for restore, with windows read ahead on a thread of their own
//! ([`fetch`]), and the conversation with a running VM's QEMU and guest
//! agent ([`vm`]). It knows the vault's chunk record format
//! (`coffre-vault-store`, without its RocksDB index) and nothing of the
//! engine, which orchestrates it. `FORMAT.md` specifies the files.

pub mod area;
pub mod capture;
pub mod cbt;
pub mod clone;
pub mod error;
pub mod expiry;
pub mod fetch;
pub mod hooks;
pub mod in_use;
pub mod manifest;
pub mod nbd;
pub mod pack;
pub mod progress;
pub mod read;
pub mod read_at;
pub mod sigbus;
pub mod source;
#[cfg(test)]
mod test_support;
pub mod throttle;
pub mod vm;

pub use coffre_vault_store::format::catalog::Hooks;
pub use coffre_vault_store::format::level::{self, Level};
pub use error::{Result, SnapError};
pub use source::{ChangeStamp, FileImage, ImageSource, MemImage, Window};
