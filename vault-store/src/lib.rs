//! coffre vault storage.
//!
//! This crate owns everything a vault keeps on disk, and nothing about how
//! images are read: the chunk record codec ([`record`]), the block-map node
//! codec ([`blockmap`]), append-only segment files ([`segment`]), the
//! RocksDB index and catalog ([`index`], [`catalog`]), the vault config
//! ([`config`]), the writer lock ([`lock`]), durable file replacement
//! ([`durable`]) and the `vault::Vault` that ties them together. The byte
//! layouts are specified in `FORMAT.md`.
//!
//! Without the default `index` feature only the codecs are built (no
//! RocksDB); the fuzz targets use that.

pub mod blockmap;
pub mod catalog;
pub mod chunk_id;
pub mod config;
pub mod durable;
pub mod error;
#[cfg(feature = "index")]
pub mod index;
pub mod lock;
pub mod record;
pub mod segment;
#[cfg(feature = "index")]
pub mod vault;

pub use catalog::{ItemRecord, PointRecord, PointStats};
pub use chunk_id::ChunkId;
pub use config::{Redundancy, VaultConfig};
pub use error::{Result, StoreError};
#[cfg(feature = "index")]
pub use index::{ChunkLocation, IndexBatch};
pub use record::{RecordDecoder, RecordEncoder, RecordError};
#[cfg(feature = "index")]
pub use vault::{Access, ChunkBuf, Vault, WriteSession};
