//! The `virsh` calls on one domain: whether it runs, its XML, its
//! checkpoints, its backup job, and the guest filesystem freeze. Every
//! failure is a [`SnapError::Libvirt`] naming the domain and saying what
//! libvirt said; an unknown domain says so plainly.

use std::path::Path;
use std::time::Duration;

use super::virsh::{self, Failure};
use super::xml::{self, BackupJob, Checkpoint, DomainXml};
use crate::error::{Result, SnapError};

/// How long one `virsh` call may take (a freeze waits on the guest).
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Most checkpoints coffre reads of one domain.
const MAX_CHECKPOINTS: usize = 4096;

/// A domain of a libvirt connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    /// The connection URI (`qemu:///system`), as libvirt canonicalised it.
    pub connect: String,
    /// The domain's name.
    pub name: String,
}

impl Domain {
    /// The domain `name` on `connect` (libvirt's default connection when
    /// `None`: `virsh uri` says which, and that is what is recorded). A
    /// connection URI that names a host is refused ([`super::check_local`]).
    pub fn new(connect: Option<&str>, name: &str) -> Result<Domain> {
        let fail = |reason: String| SnapError::Libvirt {
            domain: name.chars().take(100).collect(),
            reason,
        };
        super::check_domain_name(name).map_err(&fail)?;
        if let Some(c) = connect {
            super::check_connect(c).map_err(&fail)?;
            // Refused before anything connects (no ssh is started).
            super::check_local(c).map_err(&fail)?;
        }
        let said = virsh::run(connect, &["uri"], TIMEOUT)
            .map_err(|e| fail(format!("cannot reach libvirt: {e}")))?;
        let uri = said.trim();
        super::check_connect(uri)
            .map_err(|e| fail(format!("libvirt answered `virsh uri` with {e}")))?;
        // libvirt's default connection may be a remote one
        // (LIBVIRT_DEFAULT_URI, uri_default).
        super::check_local(uri).map_err(&fail)?;
        Ok(Domain {
            connect: uri.to_string(),
            name: name.to_string(),
        })
    }

    fn fail(&self, reason: impl Into<String>) -> SnapError {
        SnapError::Libvirt {
            domain: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Runs `virsh ARGS…` on this domain's connection.
    pub fn virsh(&self, args: &[&str]) -> std::result::Result<String, Failure> {
        virsh::run(Some(&self.connect), args, TIMEOUT)
    }

    /// Runs `virsh ARGS…`; a failure names the command.
    fn call(&self, args: &[&str]) -> Result<String> {
        self.virsh(args).map_err(|e| self.refused(args, &e))
    }

    fn refused(&self, args: &[&str], e: &Failure) -> SnapError {
        let unknown = matches!(e, Failure::Refused(m)
            if m.contains("failed to get domain") || m.contains("Domain not found"));
        if unknown {
            return self.fail(format!(
                "there is no domain {:?} on {} (`virsh --connect {} list --all` lists them)",
                self.name, self.connect, self.connect
            ));
        }
        let cmd = args.first().copied().unwrap_or_default();
        self.fail(format!("virsh {cmd}: {e}"))
    }

    /// True when the domain runs (has a QEMU process: running or paused);
    /// an unknown domain is an error.
    pub fn is_active(&self) -> Result<bool> {
        let id = self.call(&["domid", &self.name])?;
        let id = id.trim();
        Ok(!id.is_empty() && id != "-" && id.bytes().all(|b| b.is_ascii_digit()))
    }

    /// The domain's XML: the live one of a running domain, else the
    /// persistent definition.
    pub fn xml(&self, inactive: bool) -> Result<DomainXml> {
        let mut args = vec!["dumpxml", self.name.as_str()];
        if inactive {
            args.push("--inactive");
        }
        let text = self.call(&args)?;
        let x = xml::domain(&text).map_err(|e| self.fail(format!("its XML: {e}")))?;
        if x.name != self.name {
            return Err(self.fail(format!(
                "libvirt returned the XML of domain {:?}",
                x.name.chars().take(100).collect::<String>()
            )));
        }
        Ok(x)
    }

    /// The names of the domain's checkpoints.
    pub fn checkpoints(&self) -> Result<Vec<String>> {
        let text = self.call(&["checkpoint-list", &self.name, "--name"])?;
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        if names.len() > MAX_CHECKPOINTS {
            return Err(self.fail(format!(
                "it has {} checkpoints, more than coffre reads ({MAX_CHECKPOINTS})",
                names.len()
            )));
        }
        Ok(names)
    }

    /// Checkpoint `name`: the disks it keeps a bitmap of, and the domain
    /// as it was when it was created (each disk's image then: a bitmap is
    /// the changes of the image it lives in, whatever disk that image is
    /// now).
    pub fn checkpoint(&self, name: &str) -> Result<Checkpoint> {
        let text = self.call(&["checkpoint-dumpxml", &self.name, name])?;
        let c = xml::checkpoint(&text)
            .map_err(|e| self.fail(format!("the XML of checkpoint {name}: {e}")))?;
        if c.name != name {
            return Err(self.fail(format!(
                "libvirt returned the XML of checkpoint {:?} for {name}",
                c.name.chars().take(100).collect::<String>()
            )));
        }
        Ok(c)
    }

    /// Deletes coffre's checkpoint `name` (its bitmaps go with it).
    pub fn delete_checkpoint(&self, name: &str) -> Result<()> {
        xml::check_checkpoint_name(name).map_err(|e| self.fail(e))?;
        self.call(&["checkpoint-delete", &self.name, name])
            .map(|_| ())
    }

    /// Starts a backup job from the request files (`backup-begin`).
    pub fn backup_begin(&self, backup: &Path, checkpoint: Option<&Path>) -> Result<()> {
        let backup = backup.to_string_lossy();
        let checkpoint = checkpoint.map(|c| c.to_string_lossy().into_owned());
        let mut args = vec!["backup-begin", self.name.as_str(), &backup];
        if let Some(c) = &checkpoint {
            args.push(c);
        }
        self.call(&args).map(|_| ())
    }

    /// The domain's running backup job, if any (`backup-dumpxml`).
    pub fn backup_job(&self) -> Result<Option<BackupJob>> {
        match self.virsh(&["backup-dumpxml", &self.name]) {
            Ok(text) => xml::backup_job(&text)
                .map(Some)
                .map_err(|e| self.fail(format!("the XML of its backup job: {e}"))),
            Err(Failure::Refused(m)) if m.contains("no domain backup job") => Ok(None),
            Err(e) => Err(self.refused(&["backup-dumpxml"], &e)),
        }
    }

    /// Ends the domain's running job (`domjobabort`): for a pull-mode
    /// backup, the normal end: libvirt stops the NBD server and deletes
    /// the scratch files.
    pub fn abort_job(&self) -> Result<()> {
        self.call(&["domjobabort", &self.name]).map(|_| ())
    }

    /// Freezes the guest's filesystems through its agent (`domfsfreeze`).
    pub fn freeze(&self) -> Result<()> {
        self.call(&["domfsfreeze", &self.name]).map(|_| ())
    }

    /// Thaws the guest's filesystems (`domfsthaw`). Returns how many were
    /// frozen, when virsh says (`Thawed N filesystem(s)`).
    pub fn thaw(&self) -> Result<Option<u64>> {
        self.call(&["domfsthaw", &self.name])
            .map(|out| thawed_count(&out))
    }
}

/// The N of virsh's `Thawed N filesystem(s)`.
fn thawed_count(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Thawed "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::thawed_count;

    #[test]
    fn virshs_thaw_count_is_read() {
        assert_eq!(thawed_count("Thawed 2 filesystem(s)\n\n"), Some(2));
        assert_eq!(thawed_count("Thawed 0 filesystem(s)"), Some(0));
        assert_eq!(thawed_count(""), None);
        assert_eq!(thawed_count("Thawed lots"), None);
    }
}
