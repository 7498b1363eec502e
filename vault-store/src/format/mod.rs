//! Pure codecs: bytes ⇄ values, no I/O.
//!
//! Every on-disk format of a vault is encoded and decoded here, and only
//! here: chunk records, the envelope of state files, block-map nodes,
//! catalog files, the config, the damaged list, the replication state,
//! chunk lists, segment headers, lease and GC state files, index values,
//! job records, live restores' holds and the host registry. A decoder trusts no length field
//! (`FORMAT.md`); the fuzz targets call the `fuzz_entry` functions of
//! these modules.
//!
//! No decoder may panic on any input: `unwrap` and unchecked indexing are
//! denied in the whole folder (in the style of fjall); the few justified
//! exceptions say why with `#[expect(.., reason)]`.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod blockmap;
pub mod catalog;
pub mod catalog_files;
pub mod chunk_id;
pub mod chunk_list;
pub mod config;
pub mod damaged;
pub mod envelope;
pub mod generations;
pub mod hold;
pub mod host_registry;
pub mod index_values;
pub mod job;
pub mod lease;
pub mod level;
pub mod live_run;
pub mod name;
pub mod record;
pub mod remote;
pub mod repl_state;
pub mod scan;
pub mod sealed_file;
pub mod segment;
