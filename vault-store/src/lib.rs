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
//! `rebuild`), owner-only file modes ([`private`]), read-ahead of records ([`read_ahead`]), job records ([`jobs`], in an [`envelope`]), consistency
//! [`level`]s, reference counts (`refs`) and garbage collection
//! (`gc`), and the `vault::Vault` that ties them together. The byte
//! layouts are specified in `FORMAT.md`.
//!
//! Without the default `index` feature only the codecs are built (no
//! RocksDB); the fuzz targets use that.

pub mod blockmap;
pub mod catalog;
pub mod catalog_files;
pub mod chunk_id;
pub mod chunk_list;
pub mod config;
pub mod copies;
pub mod damaged;
pub mod direct;
pub mod durable;
pub mod envelope;
pub mod error;
#[cfg(feature = "index")]
pub mod gc;
#[cfg(feature = "index")]
pub mod index;
#[cfg(feature = "index")]
pub mod index_state;
pub mod jobs;
pub mod lease;
pub mod level;
pub mod lock;
pub mod private;
#[cfg(feature = "index")]
pub mod quarantine;
pub mod read_ahead;
#[cfg(feature = "index")]
pub mod rebuild;
pub mod record;
#[cfg(feature = "index")]
pub mod refs;
pub mod remote;
pub mod repl_state;
#[cfg(feature = "index")]
pub mod replicate;
#[cfg(all(test, feature = "index"))]
mod safety_tests;
pub mod scan;
pub mod segment;
#[cfg(feature = "index")]
pub mod shared;
pub mod store;
#[cfg(feature = "index")]
pub mod vault;

pub use catalog::{CbtRecord, ItemRecord, PointRecord, PointStats, Protection, SourceIdentity};
pub use chunk_id::ChunkId;
pub use config::{Redundancy, VaultConfig};
pub use error::{Result, StoreError};
#[cfg(feature = "index")]
pub use index::{ChunkKind, ChunkLocation, IndexBatch, SegmentInfo};
pub use record::{RecordDecoder, RecordEncoder, RecordError};
#[cfg(feature = "index")]
pub use vault::{Access, ChunkBuf, OpenOptions, Vault, WriteSession};
