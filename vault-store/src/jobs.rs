//! Job records (`VAULT/jobs/ID.job`): every backup, restore, delete, prune
//! and GC is a job with phases, per-phase status, errors and statistics.
//!
//! Jobs are files, not index entries, because jobs run in processes that
//! do not hold the index writer lock: a backup's snapshot phase, a
//! restore. Each record is written only by the process running the job
//! (atomically, in a checksummed envelope), which holds `ID.lock` while it
//! runs; a record still "in progress" whose lock nobody holds belongs to a
//! process that died, and is marked Failed, with the reason, when read.
//!
//! Records and cancel requests go through the storage seam
//! ([`crate::store::Store`], a [`LocalStore`] over the vault directory);
//! the run locks are flock(2) files and stay local.
//!
//! The record types and their codec live in [`crate::format::job`] and are
//! re-exported here. An encrypted vault's records are sealed
//! ([`crate::format::sealed_file`], bound to `jobs/ID.job`) with the keys
//! the caller unlocked the vault with, passed to [`JobStore::new`]; without
//! them a record is neither read nor written ([`StoreError::KeyNeeded`]).

use std::path::{Path, PathBuf};

use jiff::Timestamp;

use crate::error::{Result, StoreError};
use crate::format::job::valid_id;
pub use crate::format::job::{
    JOB_MAGIC, JOB_VERSION, JOBS_DIR, JobRecord, JobStatus, Operation, Phase, PhaseStatus,
    derive_status, fuzz_entry,
};
use crate::store::local::lock::NamedLock;
use crate::store::{LocalStore, Store};

/// The job records of a vault.
#[derive(Debug, Clone)]
pub struct JobStore {
    dir: PathBuf,
    store: std::sync::Arc<LocalStore>,
    /// A shared vault's store and this host's tag: every finished record
    /// is copied to `jobs/TAG/ID.job` there, so that each host sees all.
    shared: Option<(String, u16)>,
    /// An encrypted vault's keys (`Ok(None)`: a plain vault; `Err`: an
    /// encrypted vault this process did not unlock).
    keys: std::result::Result<Option<std::sync::Arc<crate::crypto::VaultKeys>>, PathBuf>,
}

impl JobStore {
    /// The store of the vault in `vault_dir`, whose records are sealed
    /// with `keys` when the vault is encrypted (see
    /// [`crate::copies::state_files::file_keys`]).
    pub fn new(vault_dir: &Path, keys: Option<&std::sync::Arc<crate::crypto::VaultKeys>>) -> Self {
        JobStore {
            dir: vault_dir.join(JOBS_DIR),
            store: std::sync::Arc::new(LocalStore::new(vault_dir)),
            shared: crate::format::remote::Remote::load(vault_dir)
                .ok()
                .flatten()
                .map(|r| (r.url, r.host_tag)),
            keys: crate::copies::state_files::file_keys(vault_dir, keys)
                .map_err(|_| vault_dir.to_path_buf()),
        }
    }

    /// The keys of an encrypted vault, `None` for a plain one.
    fn keys(&self) -> Result<Option<&crate::crypto::VaultKeys>> {
        match &self.keys {
            Ok(k) => Ok(k.as_deref()),
            Err(dir) => Err(StoreError::KeyNeeded { path: dir.clone() }),
        }
    }

    /// Record `bytes` read as `name` (at `path`), opened in an encrypted
    /// vault (a record that does not open is refused: damaged or forged).
    fn decode(&self, name: &str, bytes: &[u8], path: &Path) -> Result<JobRecord> {
        let plain = crate::format::sealed_file::open(name, bytes, self.keys()?).map_err(|e| {
            StoreError::CorruptFile {
                path: path.to_path_buf(),
                what: "job record",
                reason: format!("refused: {e}"),
            }
        })?;
        JobRecord::decode(&plain, path)
    }

    /// `r` encoded as record `name` stores it (sealed in an encrypted vault).
    fn encode(&self, name: &str, r: &JobRecord) -> Result<Vec<u8>> {
        crate::format::sealed_file::seal(name, &r.encode(), self.keys()?)
            .map(std::borrow::Cow::into_owned)
            .map_err(|e| StoreError::CorruptFile {
                path: self.dir.join(name),
                what: "job record",
                reason: format!("cannot seal it: {e}"),
            })
    }

    /// The finished jobs of the other hosts of a shared vault (empty for a
    /// local vault), oldest first. A store that cannot be read is a
    /// warning, not an error: this host's own records still list.
    pub fn other_hosts(&self) -> Vec<JobRecord> {
        let Some((url, tag)) = &self.shared else {
            return Vec::new();
        };
        let read = || -> Result<Vec<JobRecord>> {
            let store = crate::copies::open_url(url)?;
            let mut out = Vec::new();
            for host in store.list(JOBS_DIR)? {
                let Some(host) = host.strip_suffix('/') else {
                    continue;
                };
                if host == format!("{tag:04x}") {
                    continue;
                }
                let dir = format!("{JOBS_DIR}/{host}");
                for name in store.list(&dir)? {
                    let name = format!("{dir}/{name}");
                    if let Some(b) = store.get(&name)? {
                        match self.decode(&name, &b, Path::new(&name)) {
                            Ok(r) => out.push(r),
                            Err(e) => tracing::warn!(error = %e, "skipping a damaged job record"),
                        }
                    }
                }
            }
            out.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
            Ok(out)
        };
        read().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list the other hosts' jobs");
            Vec::new()
        })
    }

    fn record_name(id: &str) -> String {
        format!("{JOBS_DIR}/{id}.job")
    }

    fn cancel_name(id: &str) -> String {
        format!("{JOBS_DIR}/{id}.cancel")
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.job"))
    }

    fn lock_name(id: &str) -> String {
        format!("{JOBS_DIR}/{id}.lock")
    }

    fn lock_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.lock"))
    }

    /// Starts `record`: takes its run lock and persists it.
    pub fn start(&self, record: JobRecord) -> Result<RunningJob> {
        crate::store::local::private::create_dir_all(&self.dir)
            .map_err(|e| StoreError::io("create directory", &self.dir, e))?;
        let lock = NamedLock::try_acquire(&self.lock_path(&record.id), &record.pid.to_string())?
            .map_err(|_| StoreError::CorruptFile {
                path: self.lock_path(&record.id),
                what: "job lock",
                reason: "job id already running".into(),
            })?;
        let job = RunningJob {
            store: self.clone(),
            record,
            _lock: Some(lock),
        };
        job.persist()?;
        Ok(job)
    }

    /// Reads one record, marking it Failed if its process died.
    pub fn load(&self, id: &str) -> Result<JobRecord> {
        let path = self.record_path(id);
        let name = Self::record_name(id);
        let Some(bytes) = self.store.get(&name)? else {
            return Err(StoreError::JobNotFound { id: id.into() });
        };
        let mut r = self.decode(&name, &bytes, &path)?;
        if !r.status.is_final() && !NamedLock::is_held(&self.lock_path(id))? {
            // Re-read: the job may have finished between the two reads.
            if let Ok(Some(b)) = self.store.get(&name)
                && let Ok(again) = self.decode(&name, &b, &path)
                && again.status.is_final()
            {
                return Ok(again);
            }
            let reason = format!(
                "interrupted: the coffre process (pid {}) ended before the job finished",
                r.pid
            );
            for p in &mut r.phases {
                if p.status == PhaseStatus::InProgress {
                    p.status = PhaseStatus::Failed;
                    p.error = Some(reason.clone());
                }
            }
            if derive_status(&r.phases) == JobStatus::InProgress {
                // A phase that never began leaves the job unfinished.
                for p in &mut r.phases {
                    if p.status == PhaseStatus::NotStarted {
                        p.status = PhaseStatus::Failed;
                        p.error.get_or_insert_with(|| reason.clone());
                    }
                }
            }
            r.error.get_or_insert(reason);
            let ended = self
                .store
                .modified(&name)
                .and_then(|t| Timestamp::try_from(t).ok())
                .unwrap_or(r.started);
            r.settle(ended);
            // Best effort: another reader may do the same at once, with the
            // same result.
            if let Ok(b) = self.encode(&name, &r) {
                let _ = self.store.put(&name, &b);
            }
            let _ = self.store.delete(&Self::lock_name(id));
        }
        Ok(r)
    }

    /// Every record, oldest first.
    pub fn list(&self) -> Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for name in self.store.list(JOBS_DIR)? {
            let Some(id) = name.strip_suffix(".job") else {
                continue;
            };
            if !valid_id(id) {
                continue;
            }
            match self.load(id) {
                Ok(r) => out.push(r),
                Err(StoreError::JobNotFound { .. }) => {}
                // One damaged record must not hide the others.
                Err(e @ StoreError::CorruptFile { .. }) => {
                    tracing::warn!(error = %e, "skipping a damaged job record");
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
        Ok(out)
    }

    /// The job whose id is `id` or starts with it (unique prefix).
    pub fn find(&self, id: &str) -> Result<JobRecord> {
        if !valid_id(id) {
            return Err(StoreError::JobNotFound { id: id.into() });
        }
        if self.store.size(&Self::record_name(id))?.is_some() {
            return self.load(id);
        }
        let matches: Vec<JobRecord> = self
            .list()?
            .into_iter()
            .filter(|r| r.id.starts_with(id))
            .collect();
        match matches.len() {
            0 => Err(StoreError::JobNotFound { id: id.into() }),
            1 => Ok(matches
                .into_iter()
                .next()
                .ok_or(StoreError::JobNotFound { id: id.into() })?),
            n => Err(StoreError::JobAmbiguous {
                id: id.into(),
                count: n,
            }),
        }
    }

    /// Asks the running job `id` to cancel (it checks between windows).
    pub fn request_cancel(&self, id: &str) -> Result<()> {
        self.store.put(&Self::cancel_name(id), b"cancel\n")
    }

    /// Deletes a final record (job history expiry).
    pub fn remove(&self, id: &str) -> Result<()> {
        self.store.delete(&Self::record_name(id))?;
        self.store.delete(&Self::cancel_name(id))?;
        self.store.delete(&Self::lock_name(id))?;
        Ok(())
    }
}

/// A job this process runs; its record is persisted on every update.
#[derive(Debug)]
pub struct RunningJob {
    store: JobStore,
    record: JobRecord,
    _lock: Option<NamedLock>,
}

impl RunningJob {
    fn persist(&self) -> Result<()> {
        let local = JobStore::record_name(&self.record.id);
        let bytes = self.store.encode(&local, &self.record)?;
        self.store.store.put(&local, &bytes)?;
        if let (Some((url, tag)), true) = (&self.store.shared, self.record.status.is_final()) {
            let name = format!("{JOBS_DIR}/{tag:04x}/{}.job", self.record.id);
            let bytes = self.store.encode(&name, &self.record)?;
            // The local record is the one that counts; the store's copy is
            // for the other hosts.
            if let Err(e) = crate::copies::open_url(url).and_then(|st| st.put(&name, &bytes)) {
                tracing::warn!(error = %e, job = %self.record.id, "could not copy the job record to the store");
            }
        }
        Ok(())
    }

    /// The record as last persisted.
    pub fn record(&self) -> &JobRecord {
        &self.record
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Changes the record, re-derives its status and persists it.
    pub fn update(&mut self, now: Timestamp, f: impl FnOnce(&mut JobRecord)) -> Result<()> {
        f(&mut self.record);
        self.record.settle(now);
        self.persist()
    }

    /// Sets a phase's status (stamping its start or end) and persists.
    pub fn set_phase(
        &mut self,
        now: Timestamp,
        name: &str,
        status: PhaseStatus,
        error: Option<String>,
    ) -> Result<()> {
        self.update(now, |r| {
            if let Some(p) = r.phase_mut(name) {
                if status == PhaseStatus::InProgress {
                    p.started = Some(now);
                } else {
                    p.started.get_or_insert(now);
                    p.ended = Some(now);
                }
                p.status = status;
                p.error = error;
            }
        })
    }

    /// True once somebody asked this job to cancel.
    pub fn cancel_requested(&self) -> bool {
        self.store
            .store
            .size(&JobStore::cancel_name(&self.record.id))
            .ok()
            .flatten()
            .is_some()
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        let _ = self
            .store
            .store
            .delete(&JobStore::cancel_name(&self.record.id));
        if self.record.status.is_final() {
            let _ = self
                .store
                .store
                .delete(&JobStore::lock_name(&self.record.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn dead_process_marks_the_job_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::new(dir.path(), None);
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut job = store
            .start(JobRecord::new(
                Operation::Backup,
                Some("vm"),
                &["snapshot", "transfer"],
                t,
            ))
            .unwrap();
        job.set_phase(t, "snapshot", PhaseStatus::InProgress, None)
            .unwrap();
        let id = job.id().to_string();
        assert_eq!(store.load(&id).unwrap().status, JobStatus::InProgress);
        // Simulate a crash: the lock goes, the record stays in progress.
        std::mem::forget(job);
        let lock = dir.path().join(JOBS_DIR).join(format!("{id}.lock"));
        // The forgotten handle still holds the flock; drop it by reopening
        // the path as a fresh file (the lock belongs to the old inode).
        fs::remove_file(&lock).unwrap();
        let r = store.load(&id).unwrap();
        assert_eq!(r.status, JobStatus::Failed);
        assert!(r.error.unwrap().contains("interrupted"));
        assert_eq!(store.find(&id[..6]).unwrap().id, id);

        // A damaged record is skipped by the listing, and named when asked for.
        let bad = dir.path().join(JOBS_DIR).join("00000000000000aa.job");
        fs::write(&bad, b"CFJOB\0\0\0garbage").unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(matches!(
            store.load("00000000000000aa"),
            Err(StoreError::CorruptFile { .. })
        ));
    }
}
