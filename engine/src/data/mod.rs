//! The data path: images → points → images. The transfer phase of a
//! backup ([`backup`], its windows in `transfer_window`), reading a point's block map back ([`reader`]),
//! restore ([`restore`], to a target [`restore_target`] owns, qcow2
//! through `qemu-img` in [`restore_qcow2`]), verify
//! ([`verify`]), the points of both tiers ([`points`]) and per-thread
//! scratch state ([`per_thread`]), records read ahead in runs for a
//! restore and a point read in place (`record_fetch`); a point of a vault read as an image
//! ([`point_source`]) and an image read straight into a point, with no
//! snapshot tier ([`ingest`]: how `vault copy` writes); [`bench`] measures every stage of it
//! against the machine's own references. Reading images and the snapshot phase
//! itself are `coffre-snapshotter`'s.

pub mod backup;
pub mod bench;
pub mod ingest;
pub mod per_thread;
pub mod point_source;
pub mod points;
pub mod reader;
pub(crate) mod record_fetch;
pub mod restore;
pub mod restore_qcow2;
pub mod restore_target;
#[cfg(test)]
pub(crate) mod test_vault;
mod transfer_window;
pub mod verify;
