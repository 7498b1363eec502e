//! Progress reporting from long operations to whoever displays it.

/// Receives progress of a backup, restore or verify, in bytes.
pub trait Progress: Sync {
    /// The total amount of work, once known.
    fn start(&self, _total_bytes: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    /// The operation is over (successfully or not).
    fn finish(&self) {}
}

/// Progress that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
