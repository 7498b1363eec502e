//! Live sources: an image whose point in time the backup job takes itself,
//! at the start of its snapshot phase and under the item's snapshot lock
//! (a running VM's drive, through QEMU's copy-before-write filter).
//!
//! The job asks for the point ([`LiveSource::take`]), captures it into the
//! snapshot area, lets it go as soon as it is captured
//! ([`LiveSource::release`]: the guest stops paying for the
//! copy-before-write), and says at the end whether the point reached the
//! vault ([`LiveSource::settle`]). A source that tracks changes (a dirty
//! bitmap) moves its chain on only when the point is committed, so a
//! failed or killed run never loses a change.

use std::path::Path;

use coffre_vault_store::CbtRecord;
use coffre_vault_store::format::catalog::Hooks;
use coffre_vault_store::format::level::Level;

use super::ImageSource;
use crate::cbt::Hint;
use crate::error::Result;

/// What a live source is asked for its point in time.
#[derive(Clone, Copy, Debug)]
pub struct TakeRequest<'a> {
    /// The item.
    pub item: &'a str,
    /// The job taking the point (names it, and the hooks' environment).
    pub job: &'a str,
    /// The vault (the hooks' environment).
    pub vault_dir: &'a Path,
    /// The item's hooks: they run around the instant (and its freeze).
    pub hooks: &'a Hooks,
    /// What the item's latest vault point recorded of its changed-block
    /// source: the chain a hint must continue.
    pub parent: Option<&'a CbtRecord>,
}

/// How a point in time came about, as the job records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointInTime {
    /// Its consistency level (hooks, freeze).
    pub level: Level,
    /// What went wrong on the way (a failed freeze or hook, a guest a
    /// killed run left frozen, a bitmap chain that could not be used).
    pub warnings: Vec<String>,
    /// How long the guest's file systems were frozen, when they were.
    pub freeze_ms: Option<u64>,
}

/// A point in time, taken.
pub struct Taken {
    /// The point, to read (an NBD export).
    pub source: Box<dyn ImageSource>,
    /// What changed since the parent point, as the source tracks it.
    pub hint: Option<Hint>,
    /// How it came about.
    pub instant: PointInTime,
}

/// A source whose point in time the job takes itself.
pub trait LiveSource {
    /// Takes the point in time.
    fn take(&mut self, req: &TakeRequest<'_>) -> Result<Taken>;
    /// The point is captured (or the capture failed): everything that
    /// holds it goes (what cannot go is logged, and removed by the next
    /// run).
    fn release(&mut self);
    /// The job ended; `committed` when the point is in the vault. Returns
    /// warnings for the job.
    fn settle(&mut self, committed: bool) -> Vec<String>;
}

/// A point in time taken before the job started, handed over once: the
/// disks of a libvirt domain share one instant, taken for all of them
/// before their jobs run one after the other.
pub struct Pretaken(Option<Taken>);

impl Pretaken {
    /// Wraps a point already taken.
    pub fn new(taken: Taken) -> Pretaken {
        Pretaken(Some(taken))
    }
}

impl LiveSource for Pretaken {
    fn take(&mut self, req: &TakeRequest<'_>) -> Result<Taken> {
        self.0
            .take()
            .ok_or_else(|| crate::error::SnapError::AlreadyTaken {
                item: req.item.to_string(),
            })
    }

    fn release(&mut self) {
        self.0 = None;
    }

    fn settle(&mut self, _committed: bool) -> Vec<String> {
        Vec::new()
    }
}
