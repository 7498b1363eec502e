//! coffre vault storage.
//!
//! This crate owns everything a vault keeps on disk, and nothing about how
//! images are read: the chunk record codec ([`record`]), the block-map node
//! codec ([`blockmap`]), append-only segment files ([`segment`]), the
//! RocksDB index and catalog ([`index`], [`catalog`]), the vault config
//! ([`config`]), the vault's locks ([`lock`]), durable file replacement
//! ([`durable`]), the storage seam every copy goes through ([`store`]),
//! the copies of a vault ([`copies`]) and the catalog files that make each
//! copy stand alone ([`catalog_files`], read back by [`scan`] and
//! `rebuild`), owner-only file modes ([`private`]), the one validator of names that become paths ([`name`]), read-ahead of records ([`read_ahead`]), job records ([`jobs`], in an [`envelope`]), live restores' holds on points ([`holds`]), consistency
//! [`level`]s, reference counts (`refs`) and garbage collection
//! (`gc`), and the `vault::Vault` that ties them together. The byte
//! layouts are specified in `FORMAT.md`.
//!
//! Without the default `index` feature only the codecs are built (no
//! RocksDB); the fuzz targets use that.

pub mod copies;
pub mod crypto;
pub mod error;
pub mod format;
pub mod holds;
#[cfg(feature = "index")]
pub mod index;
pub mod jobs;
#[cfg(feature = "index")]
pub mod lease;
#[cfg(feature = "index")]
pub mod maintenance;
#[cfg(feature = "index")]
mod open;
#[cfg(feature = "index")]
pub mod shared;
pub mod skip;
pub mod store;
#[cfg(feature = "index")]
pub mod vault;

pub use error::{Result, StoreError};
pub use format::catalog::{
    CbtRecord, ItemRecord, PointRecord, PointStats, Protection, SourceIdentity,
};
pub use format::chunk_id::ChunkId;
pub use format::config::{Redundancy, VaultConfig};
pub use format::record::{RecordDecoder, RecordEncoder, RecordError};
#[cfg(feature = "index")]
pub use index::{ChunkKind, ChunkLocation, IndexBatch, SegmentInfo};
#[cfg(feature = "index")]
pub use vault::{Access, ChunkBuf, OpenOptions, Vault, WriteSession};
