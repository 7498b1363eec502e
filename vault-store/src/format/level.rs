//! Consistency levels of a point, as Azure Backup names them.
//!
//! - **application-consistent**: pre- and post-snapshot hooks are set and
//!   the pre hook succeeded (the guest flushed and froze its filesystems,
//!   e.g. `virsh domfsfreeze`), so the capture saw a quiesced image;
//! - **file-system-consistent**: the image was in use and was captured
//!   atomically by a reflink clone, without (working) hooks;
//! - **crash-consistent**: the image was not in use (nothing wrote to it),
//!   or it was in use and the capture could not be atomic (the fallback
//!   copy without hooks). The point is what a power cut would have left.
//!
//! A hook that fails drops the point to the level it would have had without
//! hooks (at most one level below application-consistent) and the job
//! records a warning.

use serde::{Deserialize, Serialize};

/// A point's consistency level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Not in use, or captured non-atomically while in use.
    CrashConsistent,
    /// Captured atomically (reflink clone) while in use.
    FileSystemConsistent,
    /// Captured while quiesced by hooks that succeeded.
    ApplicationConsistent,
}

impl Level {
    /// The level of a capture.
    pub fn of(hooks_succeeded: bool, in_use: bool, atomic: bool) -> Level {
        if hooks_succeeded {
            Level::ApplicationConsistent
        } else if in_use && atomic {
            Level::FileSystemConsistent
        } else {
            Level::CrashConsistent
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::CrashConsistent => "crash-consistent",
            Level::FileSystemConsistent => "file-system-consistent",
            Level::ApplicationConsistent => "application-consistent",
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_rules() {
        assert_eq!(Level::of(true, true, false), Level::ApplicationConsistent);
        assert_eq!(Level::of(true, false, true), Level::ApplicationConsistent);
        assert_eq!(Level::of(false, true, true), Level::FileSystemConsistent);
        assert_eq!(Level::of(false, true, false), Level::CrashConsistent);
        assert_eq!(Level::of(false, false, true), Level::CrashConsistent);
        assert_eq!(
            serde_json::to_string(&Level::FileSystemConsistent).unwrap(),
            "\"file-system-consistent\""
        );
    }
}
