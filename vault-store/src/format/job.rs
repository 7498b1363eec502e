//! The job record codec (`VAULT/jobs/ID.job`): the record types, the job
//! status table, and their encoding in an [`envelope`].

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::format::envelope;

/// Job record magic. Frozen.
pub const JOB_MAGIC: [u8; 8] = *b"CFJOB\0\0\0";
/// Job record version.
pub const JOB_VERSION: u32 = 1;
/// Folder of job records inside a vault.
pub const JOBS_DIR: &str = "jobs";

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Snapshot then transfer of an item.
    Backup,
    /// Restore of a point.
    Restore,
    /// Deleting an item's data (soft delete, purge).
    Delete,
    /// Expiring points by policy.
    Prune,
    /// Reclaiming unreferenced chunks.
    Gc,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Backup => "backup",
            Operation::Restore => "restore",
            Operation::Delete => "delete",
            Operation::Prune => "prune",
            Operation::Gc => "gc",
        })
    }
}

/// Status of a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PhaseStatus {
    /// Not begun.
    NotStarted,
    /// Running.
    InProgress,
    /// Done.
    Completed,
    /// Not run, by rule (a transfer while another transfer runs).
    Skipped,
    /// Failed; the phase's `error` says why.
    Failed,
    /// Cancelled by the user.
    Cancelled,
}

/// Status of a job, derived from its phases by [`derive_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    /// A phase is running or still to run.
    InProgress,
    /// Every phase completed or was skipped.
    Completed,
    /// The first phase completed, a later one failed.
    CompletedWithWarnings,
    /// The first phase failed.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl JobStatus {
    /// True once the job can change no more.
    pub fn is_final(self) -> bool {
        self != JobStatus::InProgress
    }
}

macro_rules! display_as_debug {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self, f)
            }
        }
    )*};
}
display_as_debug!(PhaseStatus, JobStatus);

/// One phase of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    /// Phase name (`snapshot`, `transfer`, `restore`, …).
    pub name: String,
    /// Status.
    pub status: PhaseStatus,
    /// When it began.
    #[serde(default)]
    pub started: Option<Timestamp>,
    /// When it ended.
    #[serde(default)]
    pub ended: Option<Timestamp>,
    /// Why it failed, was skipped or was cancelled.
    #[serde(default)]
    pub error: Option<String>,
}

impl Phase {
    /// A phase not yet started.
    pub fn new(name: &str) -> Self {
        Phase {
            name: name.into(),
            status: PhaseStatus::NotStarted,
            started: None,
            ended: None,
            error: None,
        }
    }
}

/// The job status table: the first phase decides failure, later phases
/// can only downgrade a completed job to "completed with warnings".
///
/// | first | later | job |
/// |---|---|---|
/// | InProgress/NotStarted | – | InProgress |
/// | Failed | – | Failed |
/// | Cancelled | – | Cancelled |
/// | Completed | any InProgress/NotStarted | InProgress |
/// | Completed | any Failed/Cancelled | CompletedWithWarnings |
/// | Completed | all Completed/Skipped | Completed |
///
/// ([`JobRecord::settle`] then makes a Completed job with warnings in its
/// statistics CompletedWithWarnings.)
pub fn derive_status(phases: &[Phase]) -> JobStatus {
    let Some((first, rest)) = phases.split_first() else {
        return JobStatus::Completed;
    };
    match first.status {
        PhaseStatus::NotStarted | PhaseStatus::InProgress => return JobStatus::InProgress,
        PhaseStatus::Failed => return JobStatus::Failed,
        PhaseStatus::Cancelled => return JobStatus::Cancelled,
        PhaseStatus::Completed | PhaseStatus::Skipped => {}
    }
    if rest
        .iter()
        .any(|p| matches!(p.status, PhaseStatus::NotStarted | PhaseStatus::InProgress))
    {
        JobStatus::InProgress
    } else if rest
        .iter()
        .any(|p| matches!(p.status, PhaseStatus::Failed | PhaseStatus::Cancelled))
    {
        JobStatus::CompletedWithWarnings
    } else {
        JobStatus::Completed
    }
}

/// A persisted job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Unique id (16 hex digits).
    pub id: String,
    /// What the job does.
    pub operation: Operation,
    /// Item it works on, if any.
    pub item: Option<String>,
    /// Status, kept equal to [`derive_status`] of the phases.
    pub status: JobStatus,
    /// Start time.
    pub started: Timestamp,
    /// End time, once final.
    pub ended: Option<Timestamp>,
    /// Phases in order.
    pub phases: Vec<Phase>,
    /// The first error, if any.
    pub error: Option<String>,
    /// Statistics (bytes read, blocks changed, bytes stored, …).
    pub stats: BTreeMap<String, serde_json::Value>,
    /// Point the job produced or used.
    pub point: Option<String>,
    /// Process that ran the job.
    pub pid: u32,
}

impl JobRecord {
    /// A new job, phases not started.
    pub fn new(operation: Operation, item: Option<&str>, phases: &[&str], now: Timestamp) -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_i128(now.as_nanosecond());
        h.write_u32(std::process::id());
        h.write_i128(Timestamp::now().as_nanosecond());
        let phases: Vec<Phase> = phases.iter().map(|n| Phase::new(n)).collect();
        JobRecord {
            id: format!("{:016x}", h.finish()),
            operation,
            item: item.map(str::to_string),
            status: derive_status(&phases),
            started: now,
            ended: None,
            phases,
            error: None,
            stats: BTreeMap::new(),
            point: None,
            pid: std::process::id(),
        }
    }

    /// The phase called `name`.
    pub fn phase_mut(&mut self, name: &str) -> Option<&mut Phase> {
        self.phases.iter_mut().find(|p| p.name == name)
    }

    /// The phase called `name`.
    pub fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// Re-derives the status (and the end time once final).
    pub fn settle(&mut self, now: Timestamp) {
        self.status = derive_status(&self.phases);
        // Warnings (a failed hook, a copy left out under `--degraded-ok`)
        // make a completed job CompletedWithWarnings.
        let warned = self
            .stats
            .get("warnings")
            .and_then(|w| w.as_array())
            .is_some_and(|w| !w.is_empty());
        if self.status == JobStatus::Completed && warned {
            self.status = JobStatus::CompletedWithWarnings;
        }
        if self.error.is_none() {
            self.error = self.phases.iter().find_map(|p| match p.status {
                PhaseStatus::Failed | PhaseStatus::Cancelled => p.error.clone(),
                _ => None,
            });
        }
        if self.status.is_final() && self.ended.is_none() {
            self.ended = Some(now);
        }
    }

    /// Encodes the record in its envelope.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        envelope::encode(&JOB_MAGIC, JOB_VERSION, &body)
    }

    /// Decodes a record; `path` is used in messages.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let corrupt = |reason: String| StoreError::CorruptFile {
            path: path.to_path_buf(),
            what: "job record",
            reason,
        };
        let (_, body) =
            envelope::decode(&JOB_MAGIC, JOB_VERSION, envelope::MAX_ENVELOPE_BODY, bytes)
                .map_err(|e| corrupt(e.to_string()))?;
        let r: JobRecord = serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
        // The id names the record's lock file and the item a folder: both
        // must stay where they belong.
        if !valid_id(&r.id) {
            return Err(corrupt(format!(
                "job id {:?} is not 1-16 hex digits",
                r.id.chars().take(100).collect::<String>()
            )));
        }
        if let Some(item) = &r.item {
            crate::format::name::check_name("item", item).map_err(|e| corrupt(e.to_string()))?;
        }
        Ok(r)
    }
}

/// Fuzz entry point: decoding arbitrary bytes never panics, and a record
/// that decodes re-encodes to bytes that decode to the same record.
pub fn fuzz_entry(data: &[u8]) -> bool {
    match JobRecord::decode(data, Path::new("fuzz")) {
        Ok(r) => JobRecord::decode(&r.encode(), Path::new("fuzz")).ok() == Some(r),
        Err(_) => false,
    }
}

pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases(s: &[PhaseStatus]) -> Vec<Phase> {
        s.iter()
            .enumerate()
            .map(|(i, st)| Phase {
                status: *st,
                ..Phase::new(&i.to_string())
            })
            .collect()
    }

    #[test]
    fn status_table() {
        use JobStatus as J;
        use PhaseStatus as P;
        let rows = [
            (P::Completed, P::InProgress, J::InProgress),
            (P::Completed, P::Skipped, J::Completed),
            (P::Completed, P::Completed, J::Completed),
            (P::Completed, P::Failed, J::CompletedWithWarnings),
            (P::Failed, P::NotStarted, J::Failed),
            (P::InProgress, P::NotStarted, J::InProgress),
            (P::Cancelled, P::NotStarted, J::Cancelled),
        ];
        for (a, b, want) in rows {
            assert_eq!(derive_status(&phases(&[a, b])), want, "{a:?} {b:?}");
        }
    }
}
