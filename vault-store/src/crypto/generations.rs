//! The rollback seam: what a host remembers of an encrypted vault's sealed
//! files, so that an older valid version of a file put back in place of a
//! newer one (a rollback) is refused. (A deleted file put back whole is
//! the version that was seen: the index, not this memory, tells it is no
//! longer the vault's.)
//!
//! Every sealed file carries a generation inside its sealed part
//! (`FORMAT.md`, "Sealed envelope"). A writer seals a file with a
//! generation above every one this host has seen of that name
//! ([`Generations::next`]); a reader refuses a file whose generation is
//! below the highest it has seen, unless its content is that very
//! version's (a copy sealed again: replicas, repairs)
//! ([`Generations::check`]). What a host saw is what it read: a seal is
//! not remembered, since its write may never land (a crash, a full disk),
//! and the file on disk would then be refused. Only the seam
//! is here: the memory itself (a file on the host, a clock) lives in
//! `copies::generations`, above the layers that do input and output.

/// A host's memory of the generations of one vault copy's sealed files.
pub trait Generations: Send + Sync + std::fmt::Debug {
    /// The generation to seal file `name` with now: above every one this
    /// host has seen or sealed in the copy.
    fn next(&self, name: &str) -> u64;

    /// Records that file `name` was read at `generation` with content
    /// `digest` (a hash of its plain envelope); a [`Rollback`] when a
    /// higher generation of it, with other content, was seen before.
    fn check(&self, name: &str, generation: u64, digest: &[u8; 32]) -> Result<(), Rollback>;
}

/// An older version of a sealed file than one this host has seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The generation of the file read.
    pub generation: u64,
    /// The highest generation of it this host has seen.
    pub highest: u64,
    /// Where the host keeps that memory (to remove when a vault was put
    /// back from a backup on purpose).
    pub memory: String,
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "it is an older version (generation {}) than one this host has seen (generation {}): a rollback or a replayed file, refused (if the vault's files were put back from a backup on purpose, remove {} to accept them)",
            self.generation, self.highest, self.memory
        )
    }
}
