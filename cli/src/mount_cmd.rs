//! `mount`: one point (or every point of an item) as a read-only file in
//! a FUSE folder, until SIGTERM or SIGINT, then unmounted. A dead FUSE
//! mount on the folder (a `coffre mount` killed with SIGKILL leaves one:
//! "Transport endpoint is not connected") is unmounted first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use coffre_engine::access::Served;
use coffre_engine::store::Access;
use fuser::{Config, MountOption, Session, SessionACL};
use serde::Serialize;

use crate::args::PointsArg;
use crate::ctx::{Ctx, open};
use crate::mount_fs::{FileSpec, ImageFs, Owner, ReadStats, checked_name, serve_reads};
use crate::output;

/// The file of a single point.
pub const DISK_FILE: &str = "disk.img";
/// Threads answering reads.
const READERS: usize = 4;
/// Read-ahead threads per file, by how many files are served: two each
/// for a few, one each up to [`MOST_READ_AHEAD`], and beyond that (an
/// item's hundreds of points with `--all`) no read-ahead at all.
fn read_ahead_threads(files: usize) -> usize {
    match files {
        0..=4 => 2,
        5..=MOST_READ_AHEAD => 1,
        _ => 0,
    }
}
/// Most files read ahead.
const MOST_READ_AHEAD: usize = 32;
/// fuser's threads taking requests from the kernel.
const FUSE_THREADS: usize = 2;

/// What `mount` was asked.
pub struct MountArgs {
    pub points: PointsArg,
    pub allow_other: bool,
    pub dir: PathBuf,
}

#[derive(Serialize)]
struct FileView {
    path: PathBuf,
    point: String,
    item: String,
    size: u64,
    from: Served,
}

#[derive(Serialize)]
struct MountView {
    dir: PathBuf,
    files: Vec<FileView>,
}

pub fn run(ctx: &Ctx, vault_dir: &Path, args: MountArgs) -> anyhow::Result<ExitCode> {
    let dir = prepare_dir(&args.dir)?;
    let vault = open(ctx, vault_dir, Access::ReadOnly)?;
    // The read-ahead threads shrink with the number of files.
    let count = if args.points.all {
        coffre_engine::points::list_points(&vault, &args.points.item)
            .map(|p| p.len())
            .unwrap_or(1)
    } else {
        1
    };
    let threads = read_ahead_threads(count);
    let mut opts = crate::export_cmd::access_options(&args.points);
    if threads == 0 {
        opts.read_ahead = 0;
    }
    let images = crate::export_cmd::open_points(&vault, vault_dir, &args.points, &opts, "mount")?;
    let files = images
        .iter()
        .map(|i| {
            let p = i.point();
            let name = if args.points.all {
                checked_name(&format!("{}.img", p.id))
                    .with_context(|| format!("point id {:?} cannot name a file", p.id))?
            } else {
                DISK_FILE.to_string()
            };
            Ok(FileSpec {
                name,
                size: i.size(),
                time: SystemTime::from(p.created),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let owner = Owner {
        uid,
        gid,
        file_mode: if args.allow_other { 0o444 } else { 0o400 },
    };
    let (fs, jobs) = ImageFs::new(files.clone(), owner);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
        MountOption::FSName(format!("coffre:{}", args.points.item)),
        MountOption::Subtype("coffre".into()),
    ];
    config.acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(FUSE_THREADS);
    // Signals are watched before the mount exists: a SIGTERM right after
    // it still unmounts.
    let stop = crate::signals::stop_flag()?;
    let session = Session::new(fs, &dir, &config).with_context(|| {
        format!(
            "cannot mount FUSE at {} (needs /dev/fuse; as a user, fusermount3 or fusermount \
             from the fuse3 package; --allow-other as a user needs user_allow_other in \
             /etc/fuse.conf)",
            dir.display()
        )
    })?;
    let view = MountView {
        dir: dir.clone(),
        files: images
            .iter()
            .zip(&files)
            .map(|(i, f)| FileView {
                path: dir.join(&f.name),
                point: i.point().id.clone(),
                item: i.point().item.clone(),
                size: i.size(),
                from: i.served(),
            })
            .collect(),
    };
    let stats = ReadStats::default();
    let jobs = Mutex::new(jobs);
    let workers_stop = AtomicBool::new(false);
    let ended = std::thread::scope(|scope| -> anyhow::Result<Ended> {
        for image in &images {
            for _ in 0..threads {
                let workers_stop = &workers_stop;
                scope.spawn(move || image.read_ahead_worker(workers_stop));
            }
        }
        for _ in 0..READERS {
            let (jobs, images, stats) = (&jobs, &images, &stats);
            scope.spawn(move || serve_reads(jobs, images, stats));
        }
        let result = serve_until_stopped(session, &dir, &stop, ctx, &view);
        // The file system (the reads' sender) is gone with the session:
        // the readers end on their own.
        workers_stop.store(true, Ordering::Relaxed);
        for image in &images {
            image.wake();
        }
        result
    });
    let ended = ended?;
    let failed = stats.failed.load(Ordering::Relaxed);
    eprintln!(
        "mount stopped ({}), {} unmounted: {} reads, {} bytes read, {} failed reads",
        match ended {
            Ended::Signal => "signal",
            Ended::Unmounted => "unmounted from outside",
        },
        dir.display(),
        stats.reads.load(Ordering::Relaxed),
        stats.bytes.load(Ordering::Relaxed),
        failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::DAMAGED)
    })
}

enum Ended {
    Signal,
    Unmounted,
}

/// Runs the session until a signal (then unmounts, waiting while the
/// files are in use) or an unmount from outside.
fn serve_until_stopped(
    session: Session<ImageFs>,
    dir: &Path,
    stop: &AtomicBool,
    ctx: &Ctx,
    view: &MountView,
) -> anyhow::Result<Ended> {
    let mut session = session;
    let mut unmounter = session.unmount_callable();
    let background = std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || session.run())
        .with_context(|| format!("cannot serve the FUSE mount at {}", dir.display()))?;
    output::emit(ctx.fmt, view, |v| {
        let mut out = String::new();
        for f in &v.files {
            out.push_str(&format!(
                "mounted point {} of item {} ({} bytes, from the {}) read-only at {}\n",
                f.point,
                f.item,
                f.size,
                f.from.name(),
                f.path.display()
            ));
        }
        out
    })?;
    std::io::stdout().flush().ok();
    let tick = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        if background.is_finished() {
            joined(background, dir)?;
            return Ok(Ended::Unmounted);
        }
        std::thread::sleep(tick);
    }
    // A file in use (a loop device, an open file) keeps the mount busy:
    // it is served until let go, rather than cut from under its user.
    // As root, fuser's own unmount comes first (umount(2), never lazy);
    // as a user it would be lazy (`fusermount -z`), so ours comes first.
    let mut theirs = None;
    if is_root() {
        theirs = Some(unmounter.unmount());
    }
    let mut said = false;
    loop {
        if matches!(theirs, Some(Ok(()))) {
            break;
        }
        match unmount(dir) {
            Ok(()) => break,
            Err(Unmount::Busy) => {
                if !said {
                    eprintln!(
                        "coffre: {} is in use (a loop device or an open file): the mount is \
                         served until it is let go (umount the loop mount, `losetup -d` its \
                         device), then unmounted",
                        dir.display()
                    );
                    said = true;
                }
                if background.is_finished() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(Unmount::Failed(e)) => {
                tracing::warn!(dir = %dir.display(), error = %e, "unmount failed; fuser's own unmount follows");
                break;
            }
        }
    }
    // As a user, fuser's unmount runs after ours: it finds the mount gone
    // and says nothing (fuser 0.18 cannot tell an ended connection from a
    // live one, and tries anyway).
    let theirs = match theirs {
        Some(r) => r,
        None => unmounter.unmount(),
    };
    let waited = std::time::Instant::now();
    while !background.is_finished() && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !background.is_finished() {
        theirs.with_context(|| format!("cannot unmount {}", dir.display()))?;
        anyhow::bail!(
            "the FUSE mount at {} did not end after its unmount",
            dir.display()
        );
    }
    joined(background, dir)?;
    Ok(Ended::Signal)
}

/// The session thread's end.
fn joined(t: std::thread::JoinHandle<std::io::Result<()>>, dir: &Path) -> anyhow::Result<()> {
    t.join()
        .map_err(|_| anyhow::anyhow!("the FUSE thread of {} panicked", dir.display()))?
        .with_context(|| format!("the FUSE mount at {} failed", dir.display()))
}

enum Unmount {
    Busy,
    Failed(String),
}

/// Unmounts the FUSE mount at `dir`, never lazily: as root with
/// umount(2), else through fusermount.
fn unmount(dir: &Path) -> Result<(), Unmount> {
    if is_root() {
        let c = cpath(dir).map_err(Unmount::Failed)?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount(c.as_ptr()) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EBUSY) => Err(Unmount::Busy),
            // Not a mount point any more: unmounted from outside.
            Some(libc::EINVAL) => Ok(()),
            _ => Err(Unmount::Failed(e.to_string())),
        };
    }
    let bin = fusermount().ok_or_else(|| Unmount::Failed("no fusermount3 or fusermount".into()))?;
    let out = Command::new(&bin)
        .arg("-u")
        .arg("--")
        .arg(dir)
        .output()
        .map_err(|e| Unmount::Failed(format!("{}: {e}", bin.display())))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if err.contains("busy") {
        Err(Unmount::Busy)
    } else {
        Err(Unmount::Failed(format!(
            "{}: {}",
            bin.display(),
            err.trim()
        )))
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn cpath(p: &Path) -> Result<std::ffi::CString, String> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{} holds a NUL byte", p.display()))
}

/// The setuid helper that mounts and unmounts FUSE for a user.
fn fusermount() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .collect();
    ["fusermount3", "fusermount"]
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// `dir`, absolute, ready to be mounted on: a dead FUSE mount on it is
/// unmounted first; a live one is refused.
fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let abs = match std::fs::canonicalize(dir) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            // A dead FUSE mount cannot be resolved itself: its parent can.
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let name = dir
                .file_name()
                .with_context(|| format!("{} names no folder", dir.display()))?;
            std::fs::canonicalize(parent)
                .with_context(|| format!("cannot resolve {}", parent.display()))?
                .join(name)
        }
        Err(e) => return Err(e).with_context(|| format!("mount folder {}", dir.display())),
    };
    // Listing asks the server (attributes may come from the kernel's
    // cache even when the server is gone): a dead one says ENOTCONN.
    match std::fs::read_dir(&abs) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let fstype = mount_at(&abs)?;
            // Only coffre's own: another FUSE server answers ENOTCONN too
            // while its backend is away (sshfs, a network filesystem).
            if !fstype.as_deref().is_some_and(|t| t.starts_with("fuse")) || !coffre_source_at(&abs)?
            {
                anyhow::bail!(
                    "{}: {e}, and it is not a coffre mount ({}): not touched; unmount it yourself (`fusermount -u -z {}` or `umount -l`) if it is dead",
                    abs.display(),
                    fstype.as_deref().unwrap_or("no mount there"),
                    abs.display()
                );
            }
            detach(&abs)?;
            eprintln!(
                "coffre: {} was a dead FUSE mount (its server was killed): unmounted it first",
                abs.display()
            );
            std::fs::read_dir(&abs).with_context(|| format!("mount folder {}", abs.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("mount folder {}", abs.display())),
    }
    if let Some(t) = mount_at(&abs)?
        && t.starts_with("fuse")
    {
        anyhow::bail!(
            "{} is already a FUSE mount ({t}; another `coffre mount`?): unmount it first",
            abs.display()
        );
    }
    Ok(abs)
}

/// Lazily unmounts the dead FUSE mount at `dir` (nothing is served there,
/// nothing can be lost).
fn detach(dir: &Path) -> anyhow::Result<()> {
    if is_root() {
        let c = cpath(dir).map_err(anyhow::Error::msg)?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(e).with_context(|| {
                format!("cannot unmount the dead FUSE mount at {}", dir.display())
            });
        }
        return Ok(());
    }
    let bin = fusermount().with_context(|| {
        format!(
            "{} is a dead FUSE mount and no fusermount3 or fusermount is installed to unmount it",
            dir.display()
        )
    })?;
    let out = Command::new(&bin)
        .args(["-u", "-z", "--"])
        .arg(dir)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "cannot unmount the dead FUSE mount at {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The type of the topmost mount whose mount point is `dir`, if any
/// (`/proc/self/mountinfo`).
fn mount_at(dir: &Path) -> anyhow::Result<Option<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(mount_type_in(&text, dir))
}

/// True when the topmost mount at `dir` is a coffre mount (its source
/// `coffre:ITEM`, as `mount` names it).
fn coffre_source_at(dir: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(mount_source_in(&text, dir).is_some_and(|s| s.starts_with("coffre:")))
}

/// The source of the last mount of `mountinfo` whose mount point is `dir`.
fn mount_source_in(mountinfo: &str, dir: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let want = dir.as_os_str().as_bytes();
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let point = unescape(fields.get(4)?);
        let sep = fields.iter().position(|f| *f == "-")?;
        let source = fields.get(sep + 2)?;
        (point == want).then(|| String::from_utf8_lossy(&unescape(source)).into_owned())
    })
}

/// The type of the last mount of `mountinfo` whose mount point is `dir`.
fn mount_type_in(mountinfo: &str, dir: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let want = dir.as_os_str().as_bytes();
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let point = unescape(fields.get(4)?);
        let sep = fields.iter().position(|f| *f == "-")?;
        let fstype = fields.get(sep + 1)?;
        (point == want).then(|| fstype.to_string())
    })
}

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(oct) = b.get(i + 1..i + 4)
            && oct.iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(oct.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
95 22 0:50 / /tmp/a\\040b rw,nosuid,nodev - fuse.coffre coffre:vm ro,user_id=0
96 22 0:51 / /tmp/x rw shared:1 - ext4 /dev/sda1 rw
97 96 0:52 / /tmp/x rw - fuse.coffre coffre:vm ro
";

    #[test]
    fn read_ahead_threads_shrink_with_the_number_of_files() {
        assert_eq!(read_ahead_threads(1), 2);
        assert_eq!(read_ahead_threads(5), 1);
        assert_eq!(read_ahead_threads(MOST_READ_AHEAD), 1);
        assert_eq!(read_ahead_threads(MOST_READ_AHEAD + 1), 0);
    }

    #[test]
    fn the_topmost_mount_at_a_folder_is_found_with_escapes_undone() {
        assert_eq!(
            mount_type_in(INFO, Path::new("/tmp/a b")).as_deref(),
            Some("fuse.coffre")
        );
        assert_eq!(
            mount_source_in(INFO, Path::new("/tmp/a b")).as_deref(),
            Some("coffre:vm")
        );
        assert_eq!(
            mount_type_in(INFO, Path::new("/tmp/x")).as_deref(),
            Some("fuse.coffre")
        );
        assert_eq!(mount_type_in(INFO, Path::new("/tmp/a")), None);
        assert_eq!(mount_type_in("garbage\n\n- -", Path::new("/tmp")), None);
    }
}
