//! One pull-mode backup of a domain (`virsh backup-begin`): libvirt takes
//! every listed disk at one instant and exports each, as it was then, over
//! NBD on a Unix socket, while the guest keeps writing (QEMU copies a
//! block the guest overwrites to the disk's scratch file first). With a
//! checkpoint, the same instant starts a persistent dirty bitmap on each
//! qcow2 disk, which the next backup reads as its changed blocks.
//!
//! [`PullBackup`] owns what the backup puts on the host and ends it:
//!
//! - a private folder, `$TMPDIR/coffre-libvirt-PID-RANDOM` ([`workdir`]):
//!   the request XML in it, the socket and the scratch files in its
//!   subfolder `q`, the only part handed to the user QEMU runs as;
//! - the freeze of the guest's filesystems around the instant, when the
//!   domain has a guest agent channel: `domfsfreeze` before `backup-begin`,
//!   `domfsthaw` right after, whatever happened; a freeze that fails is
//!   thawed, said in a warning, and the point is crash-consistent. A thaw
//!   is retried for about 2 s; a guest that still does not thaw fails the
//!   run with the `virsh domfsthaw` command to run (it may be frozen);
//! - the job itself, ended with `domjobabort` by [`PullBackup::end`] or,
//!   failing that, when the value is dropped; a `backup-begin` that failed
//!   or timed out yet started the job (its socket is in the folder) is
//!   ended at once.
//!
//! A run killed before its end leaves the job running: the next run,
//! holding the domain's lock ([`super::lock`]), finds it by its socket's
//! folder name and ends it ([`clean_stale_job`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;

use super::domain::Domain;
use super::lock::DomainLock;
use super::workdir;
use super::xml::{self, DiskRequest, DomainXml, Export};
use crate::error::{Result, SnapError};

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How consistent a point is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// The guest's filesystems were frozen at the instant.
    Filesystem,
    /// Like a power cut: what the guest had written, not what it cached.
    Crash,
}

impl Consistency {
    /// `filesystem` or `crash`.
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Filesystem => "filesystem",
            Consistency::Crash => "crash",
        }
    }
}

/// A running pull-mode backup.
#[derive(Debug)]
pub struct PullBackup {
    domain: Domain,
    /// The backup's folder ([`workdir`]).
    dir: PathBuf,
    /// The disks backed up (their scratch files' names).
    targets: Vec<String>,
    /// The NBD server's socket.
    pub socket: PathBuf,
    /// The exported disks.
    pub exports: Vec<Export>,
    /// When `backup-begin` was called: the instant of every disk.
    pub instant: Timestamp,
    /// Whether the guest was frozen at the instant.
    pub consistency: Consistency,
    /// What went wrong without stopping the backup (a failed freeze).
    pub warnings: Vec<String>,
    /// How long the guest's filesystems were frozen, when they were: from
    /// the freeze call to the thaw's answer.
    pub freeze_ms: Option<u64>,
    ended: bool,
}

impl PullBackup {
    /// Starts the backup of `disks` of the running `domain` (`live` is its
    /// XML), with the new checkpoint `checkpoint` (name, description) when
    /// given. Freezes the guest around the instant when it has an agent
    /// channel.
    pub fn begin(
        domain: &Domain,
        live: &DomainXml,
        disks: &[DiskRequest],
        checkpoint: Option<(&str, &str)>,
    ) -> Result<PullBackup> {
        let fail = |reason: String| SnapError::Libvirt {
            domain: domain.name.clone(),
            reason,
        };
        let dir = workdir::create(&std::env::temp_dir(), live.qemu_user)?;
        let qemu_dir = dir.join(workdir::QEMU_DIR);
        let mut backup = PullBackup {
            domain: domain.clone(),
            socket: qemu_dir.join(workdir::SOCKET),
            dir,
            targets: disks.iter().map(|d| d.target.clone()).collect(),
            exports: Vec::new(),
            instant: Timestamp::now(),
            consistency: Consistency::Crash,
            warnings: Vec::new(),
            freeze_ms: None,
            // Nothing to end until backup-begin succeeded.
            ended: true,
        };
        if backup.socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(fail(format!(
                "the socket path {} is longer than a Unix socket allows; set TMPDIR to a shorter folder",
                backup.socket.display()
            )));
        }
        // The requests are coffre's, in the folder QEMU's user cannot
        // change; the socket and the scratch files are QEMU's, in its own
        // subfolder.
        let request = workdir::write_request(
            &backup.dir,
            "backup.xml",
            &xml::backup_request(&backup.socket, &qemu_dir, disks),
        )?;
        let checkpoint_file = match checkpoint {
            Some((name, description)) => {
                xml::check_checkpoint_name(name).map_err(&fail)?;
                Some(workdir::write_request(
                    &backup.dir,
                    "checkpoint.xml",
                    &xml::checkpoint_request(name, description, disks),
                )?)
            }
            None => None,
        };

        let freezing = std::time::Instant::now();
        let frozen = match &live.agent {
            None => false,
            Some(_) => match domain.freeze() {
                Ok(()) => true,
                Err(e) => {
                    // A freeze that failed half-way may have frozen some
                    // filesystems: thaw whatever it did, or fail, since the
                    // guest may be stuck. An agent that was never reached
                    // froze nothing.
                    if !agent_unreachable(&e.to_string()) {
                        thaw_or_fail(domain)?;
                    }
                    backup.warnings.push(format!(
                        "the guest's filesystems could not be frozen ({e}); the point is crash-consistent"
                    ));
                    false
                }
            },
        };
        backup.instant = Timestamp::now();
        let begun = domain.backup_begin(&request, checkpoint_file.as_deref());
        // The guest is thawed first, whatever backup-begin did.
        let thawed = if frozen {
            let thawed = thaw_or_fail(domain);
            backup.freeze_ms =
                Some(u64::try_from(freezing.elapsed().as_millis()).unwrap_or(u64::MAX));
            thawed
        } else {
            Ok(())
        };
        if let Err(e) = begun {
            // A call that failed or timed out may still have started the
            // job (libvirt acted, the answer was lost): ended here, not
            // left to the next run.
            let e = match (backup.end_begun_anyway(), e) {
                (Some(said), SnapError::Libvirt { domain, reason }) => SnapError::Libvirt {
                    domain,
                    reason: format!("{reason}; {said}"),
                },
                (_, e) => e,
            };
            if let Err(frozen) = thawed {
                tracing::warn!(domain = %domain.name, error = %e, "backup-begin failed");
                return Err(frozen);
            }
            return Err(e);
        }
        // Ended when dropped, from here on (with the error of a guest that
        // may still be frozen).
        backup.ended = false;
        thawed?;
        if frozen {
            backup.consistency = Consistency::Filesystem;
        }
        let job = domain
            .backup_job()?
            .ok_or_else(|| fail("backup-begin succeeded but libvirt shows no backup job".into()))?;
        if job.mode != "pull" || job.socket.as_deref() != Some(backup.socket.as_path()) {
            return Err(fail(format!(
                "the running backup job is not the one coffre started (mode {}, socket {})",
                job.mode,
                job.socket
                    .as_deref()
                    .map_or("none".into(), |s| s.display().to_string())
            )));
        }
        for d in disks {
            if !job.exports.iter().any(|e| e.target == d.target) {
                return Err(fail(format!("libvirt exports no disk {}", d.target)));
            }
            if d.incremental.is_some()
                && job
                    .exports
                    .iter()
                    .any(|e| e.target == d.target && e.bitmap.is_none())
            {
                return Err(fail(format!(
                    "libvirt exports disk {} without the dirty bitmap of its incremental backup",
                    d.target
                )));
            }
        }
        backup.exports = job.exports;
        Ok(backup)
    }

    /// Ends the job a failed `backup-begin` started all the same: the
    /// domain's backup job whose socket is in this backup's folder. Says
    /// what it did, if anything.
    fn end_begun_anyway(&self) -> Option<String> {
        let job = match self.domain.backup_job() {
            Ok(Some(job)) => job,
            Ok(None) => return None,
            Err(e) => {
                return Some(format!(
                    "whether libvirt started the backup job anyway is unknown ({e})"
                ));
            }
        };
        let folder = self.socket.parent();
        if job.socket.as_deref().and_then(Path::parent) != folder {
            return None;
        }
        Some(match self.domain.abort_job() {
            Ok(()) => "libvirt had started the backup job anyway: it was ended".into(),
            Err(e) => format!(
                "libvirt started the backup job anyway and it could not be ended ({e}); the next run ends it"
            ),
        })
    }

    /// The export of disk `target`.
    pub fn export(&self, target: &str) -> Option<&Export> {
        self.exports.iter().find(|e| e.target == target)
    }

    /// The NBD URI of disk `target`'s export.
    pub fn uri(&self, target: &str) -> Option<String> {
        self.export(target).map(|e| {
            format!(
                "nbd+unix:///{}?socket={}",
                e.name,
                self.socket.to_string_lossy()
            )
        })
    }

    /// Ends the job (`domjobabort`: libvirt stops the NBD server and
    /// deletes the scratch files) and removes the folder.
    pub fn end(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let ended = if self.ended {
            Ok(())
        } else {
            self.ended = true;
            self.domain.abort_job()
        };
        if let Err(why) = workdir::remove(&self.dir, &std::env::temp_dir(), &self.targets) {
            tracing::warn!(domain = %self.domain.name, "the backup's folder was not removed: {why}");
        }
        ended
    }
}

impl Drop for PullBackup {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(domain = %self.domain.name, error = %e, "cannot end the backup job");
        }
    }
}

/// The pauses before each attempt to thaw the guest: 5 attempts over
/// about 2 s.
const THAW_PAUSES: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(500),
    Duration::from_millis(750),
];

/// True when virsh's error says the guest agent was not reached at all
/// (`QEMU guest agent is not connected`): such a freeze froze nothing.
fn agent_unreachable(error: &str) -> bool {
    error.contains("guest agent is not connected")
}

/// Calls `thaw` until it succeeds, after each pause of `pauses` in turn;
/// when every attempt failed, how many there were and the last error.
fn retry<E>(
    pauses: &[Duration],
    mut thaw: impl FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<(), (usize, E)> {
    let mut last = None;
    for (n, pause) in pauses.iter().enumerate() {
        std::thread::sleep(*pause);
        match thaw() {
            Ok(()) => return Ok(()),
            Err(e) => last = Some((n + 1, e)),
        }
    }
    last.map_or(Ok(()), Err)
}

/// The error of a guest that could not be thawed.
fn still_frozen(domain: &Domain, attempts: usize, last: &dyn std::fmt::Display) -> SnapError {
    SnapError::GuestMayBeFrozen {
        domain: domain.name.clone(),
        connect: domain.connect.clone(),
        attempts,
        last: last.to_string(),
    }
}

/// Thaws the guest, retrying for about 2 s ([`THAW_PAUSES`]); an error
/// when every attempt failed: the guest may be frozen.
fn thaw_or_fail(domain: &Domain) -> Result<()> {
    retry(&THAW_PAUSES, || domain.thaw().map(|_| ())).map_err(|(n, e)| still_frozen(domain, n, &e))
}

/// Thaws a guest a killed coffre run may have left frozen (killed between
/// `domfsfreeze` and `domfsthaw`, whether or not its backup job began),
/// when the domain has a guest agent channel. Returns a warning when some
/// filesystems were frozen. Like `virsh domfsthaw`, it also thaws a guest
/// someone froze on purpose: coffre cannot tell the two apart.
pub fn thaw_leftover(domain: &Domain, live: &DomainXml) -> Option<String> {
    live.agent.as_ref()?;
    match domain.thaw() {
        Ok(Some(n)) if n > 0 => Some(format!(
            "the guest of domain {} had {n} frozen filesystem(s), as a killed coffre run leaves them: thawed",
            domain.name
        )),
        Ok(_) => None,
        Err(e) => {
            // No agent in the guest, or not answering: nothing was frozen
            // through it either.
            tracing::debug!(domain = %domain.name, error = %e, "no thaw of a leftover freeze");
            None
        }
    }
}

/// Ends the backup job a killed coffre run left on `domain`. Returns what
/// it did (nothing when there is no job). The caller holds the domain's
/// lock, so no other coffre run of this host is backing it up: a job of
/// coffre's (its socket in a folder named after a coffre run) is stale. A
/// job coffre did not start is left alone and is an error: libvirt runs
/// one job at a time.
pub fn clean_stale_job(domain: &Domain, _held: &DomainLock) -> Result<Option<String>> {
    let Some(job) = domain.backup_job()? else {
        return Ok(None);
    };
    let fail = |reason: String| SnapError::Libvirt {
        domain: domain.name.clone(),
        reason,
    };
    let Some((folder, pid)) = job.socket.as_deref().and_then(workdir::outer_of) else {
        return Err(fail(format!(
            "it runs a backup job coffre did not start (NBD socket {}); coffre leaves it alone. End it with `virsh domjobabort {}` if nothing uses it",
            job.socket
                .as_deref()
                .map_or("none".into(), |s| s.display().to_string()),
            domain.name
        )));
    };
    domain.abort_job()?;
    // libvirt deleted the socket and the scratch files; the request files
    // are coffre's. The folder is removed only if it is one of coffre's,
    // where QEMU's user can change nothing but its subfolder, and only
    // the names coffre and libvirt put there.
    let targets: Vec<String> = job.exports.iter().map(|e| e.target.clone()).collect();
    let done = format!(
        "ended the backup job a killed coffre run (pid {pid}) left on domain {}",
        domain.name
    );
    Ok(Some(
        match workdir::remove(&folder, &std::env::temp_dir(), &targets) {
            Ok(()) => done,
            Err(why) => format!("{done}; its folder was left alone: {why}"),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_thaw_is_retried_then_fails_saying_the_guest_may_be_frozen() {
        let pauses = [Duration::from_millis(1); 5];
        let mut calls = 0;
        let r: std::result::Result<(), (usize, &str)> = retry(&pauses, || {
            calls += 1;
            if calls < 3 { Err("busy") } else { Ok(()) }
        });
        assert_eq!((r, calls), (Ok(()), 3));
        let mut calls = 0;
        let r = retry(&pauses, || {
            calls += 1;
            Err(format!("no {calls}"))
        });
        assert_eq!(r, Err((5, "no 5".to_string())));
        let total: Duration = THAW_PAUSES.iter().sum();
        assert!(
            (Duration::from_millis(1500)..=Duration::from_millis(2500)).contains(&total),
            "{total:?}"
        );
        let d = Domain {
            connect: "qemu:///system".into(),
            name: "web1".into(),
        };
        let e = still_frozen(&d, 5, &"Guest agent is not responding").to_string();
        assert!(e.contains("may still be frozen"), "{e}");
        assert!(
            e.contains("`virsh --connect qemu:///system domfsthaw web1`"),
            "{e}"
        );
        // What libvirt 9.0 says of a channel no agent answers.
        assert!(agent_unreachable(
            "libvirt domain x: virsh domfsfreeze: Unable to freeze filesystems; Guest agent is not responding: QEMU guest agent is not connected"
        ));
        assert!(!agent_unreachable(
            "virsh domfsfreeze: Guest agent is not responding: Guest agent not available for now"
        ));
    }
}
