//! The run files of unfinished live restores on this host
//! (`<runtime dir>/live/TAG.run`, [`LiveRun`]): each run of `restore
//! --live` writes its own once its hold is written, and removes it with
//! the hold; `coffre daemon` reads them to resume a live restore whose run
//! is gone (killed, crashed), so that the VM's reads are served again
//! before QEMU's reconnect delay runs out, with no one at the keyboard.
//!
//! Only the folder's own files are read: the folder is this user's and
//! private (checked), each file a regular file of this user's that no one
//! else may write, decoded with every field checked. A vault's content
//! never says which QEMU to drive.

use std::path::{Path, PathBuf};

use coffre_snapshotter::vm::stream::{LiveNames, TargetLock, live_dir};
use coffre_vault_store::format::live_run::{LiveRun, MAX_RUN_FILE, RUN_SUFFIX};
use coffre_vault_store::store::local::durable::write_atomic;

/// Writes (or rewrites) the run file of the live restore named `names`.
pub fn write(names: &LiveNames, run: &LiveRun) -> Result<PathBuf, String> {
    let path = names.run_file()?;
    let bytes = run.encode()?;
    write_atomic(&path, &bytes).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Removes the run file of the live restore into `target` (canonical), if
/// there is one.
pub fn remove(target: &Path) -> Result<(), String> {
    let path = LiveNames::of(target).run_file()?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
    }
}

/// A run file's path, and what it says (`Err`: why it is not used,
/// naming the file).
pub type Listed = (PathBuf, Result<LiveRun, String>);

/// The run files of this host's unfinished live restores, each decoded.
/// A file this user does not own, or that others may write, is reported
/// and not read.
pub fn list() -> Result<Vec<Listed>, String> {
    let dir = live_dir()?;
    let entries =
        std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        if !e
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(RUN_SUFFIX))
        {
            continue;
        }
        let path = e.path();
        let read = read(&path);
        out.push((path, read));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The run file at `path`, decoded under its name (`Err`: why it is not
/// used, naming it). Opened without following a symlink or waiting on a
/// FIFO; only a regular file of this user's that no one else may write is
/// read, and no more than a run file may hold.
pub fn read(path: &Path) -> Result<LiveRun, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let fail = |e: String| format!("run file {}: {e}", path.display());
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| fail("not a run file's name".into()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    let m = file.metadata().map_err(|e| fail(e.to_string()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !m.file_type().is_file() {
        return Err(fail("not a regular file".into()));
    }
    if m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(fail(format!(
            "owned by uid {} with mode {:o}: a run file is this user's (uid {me}) and no one else may write it",
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_RUN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    LiveRun::decode(&bytes, name).map_err(fail)
}

/// True while a run of the live restore into `target` is going on this
/// host (its target lock is held; only looked at, never taken).
pub fn running(target: &Path) -> Result<bool, String> {
    TargetLock::is_held(&LiveNames::of(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_file_is_written_private_listed_and_removed() {
        let t = tempfile::tempdir().unwrap();
        let target = std::fs::canonicalize(t.path()).unwrap().join("r.qcow2");
        let run = LiveRun {
            vault: PathBuf::from("/srv/vault"),
            from: Some("vault".into()),
            item: "vm".into(),
            target: target.clone(),
            qmp: Some(PathBuf::from("/run/vm/qmp.sock")),
            domain: None,
            connect: None,
            device: "vda".into(),
            bus: None,
            swap_running: false,
            reconnect_delay: 30,
        };
        let names = LiveNames::of(&target);
        let path = write(&names, &run).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        // What the listing says of the file at `p`.
        let listed = |p: &Path| {
            let mut found = list().unwrap().into_iter().filter(|(f, _)| f == p);
            let one = found.next().expect("listed");
            assert!(found.next().is_none());
            one.1
        };
        assert_eq!(listed(&path).unwrap(), run);
        assert!(!running(&target).unwrap());
        let lock = TargetLock::acquire(&target, &names).unwrap();
        assert!(running(&target).unwrap());
        drop(lock);
        assert!(!running(&target).unwrap());
        // Writable by others: reported, not read.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o622)).unwrap();
        let e = listed(&path).unwrap_err();
        assert!(e.contains("no one else may write it"), "{e}");
        // A file of another target's name: refused.
        let other = names
            .run_file()
            .unwrap()
            .with_file_name(format!("{}{RUN_SUFFIX}", "0".repeat(16)));
        std::fs::write(&other, run.encode().unwrap()).unwrap();
        let e = listed(&other).unwrap_err();
        assert!(e.contains("not this one"), "{e}");
        std::fs::remove_file(&other).unwrap();
        remove(&target).unwrap();
        assert!(!path.exists());
        remove(&target).unwrap();
    }
}
