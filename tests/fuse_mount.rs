//! `coffre mount` for real (root, /dev/fuse): an ext4 image backed up,
//! mounted through FUSE, loop-mounted read-only, a known file read back
//! identical; SIGTERM unmounts; a SIGKILLed mount leaves a dead FUSE
//! mount that the next `coffre mount` on the folder clears; `--all`; a
//! partitioned image through `losetup -P`; a damaged block is EIO, never
//! zeros.

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Root and /dev/fuse, or a visible skip.
fn can_mount(what: &str) -> bool {
    if !is_root() {
        skip(&format!("{what}: needs root (FUSE and loop mounts)"));
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        skip(&format!(
            "{what}: /dev/fuse missing (modprobe fuse; in a container, pass the device)"
        ));
        return false;
    }
    true
}

/// A running `coffre mount`, killed and its folder lazily unmounted if a
/// test fails before it stops it.
struct Mounted {
    child: Child,
    dir: PathBuf,
}

impl Mounted {
    /// Starts `coffre mount … DIR` and waits until `files` are there.
    fn start(vault: &Path, extra: &[&str], dir: &Path, files: &[&str]) -> Mounted {
        let mut args = vec!["mount", "--vault", s(vault)];
        args.extend_from_slice(extra);
        args.push(s(dir));
        let child = coffre()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = Mounted {
            child,
            dir: dir.to_path_buf(),
        };
        let start = Instant::now();
        while !files.iter().all(|f| dir.join(f).exists()) {
            if let Some(status) = m.child.try_wait().unwrap() {
                let out = m.child_output();
                panic!("coffre {args:?} ended with {status} before mounting:\n{out}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "coffre {args:?}: {files:?} not in {} after 20 s",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    fn child_output(&mut self) -> String {
        use std::io::Read;
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut out);
        }
        out
    }

    /// Waits (20 s at most) for the process to end; its status and output.
    fn wait(&mut self) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.child_output());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "coffre mount did not end 20 s after its signal"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mount_point(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A read-only mount of a file or device, unmounted on drop.
struct RoMount(PathBuf);

impl RoMount {
    fn new(what: &Path, opts: &str, at: &Path) -> RoMount {
        fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-o", opts])
            .arg(what)
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -o {opts} {}: {}",
            what.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        RoMount(at.to_path_buf())
    }
}

impl Drop for RoMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Whether `dir` is a mount point (`/proc/self/mountinfo`).
fn is_mount_point(dir: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_str().unwrap().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A folder of files for an ext4 image, with one known file; its bytes.
fn known_tree(dir: &Path, seed: u64) -> Vec<u8> {
    fs::create_dir_all(dir.join("etc")).unwrap();
    let mut rng = Rng::new(seed);
    let mut known = text(&mut rng, 300 << 10);
    let mut bin = vec![0u8; 200 << 10];
    rng.fill(&mut bin);
    known.extend_from_slice(&bin);
    fs::write(dir.join("etc/known.dat"), &known).unwrap();
    for i in 0..8 {
        fs::write(dir.join(format!("other{i}.txt")), text(&mut rng, 50 << 10)).unwrap();
    }
    known
}

/// `mke2fs -d tree` into `img`, `mb` MiB.
fn mkfs_into(tree: &Path, img: &Path, mb: u64) {
    let out = Command::new(e2tool("mke2fs"))
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg(img)
        .arg(format!("{mb}M"))
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mke2fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The canonical form of a fresh folder under the test's tempdir.
fn mount_dir(t: &Path) -> PathBuf {
    let m = t.join("m");
    fs::create_dir(&m).unwrap();
    m.canonicalize().unwrap()
}

#[test]
fn a_known_file_comes_back_through_a_loop_mount_and_sigterm_unmounts() {
    if !can_mount("fuse_mount") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let tree = t.path().join("tree");
    let known = known_tree(&tree, 1);
    let img = t.path().join("fs.img");
    mkfs_into(&tree, &img, 32);
    ok(&["backup", "--vault", s(&vault), "--item", "fs", s(&img)]);
    let m = mount_dir(t.path());

    // From each tier in turn (the snapshot is the default while kept).
    for from in ["snapshot", "vault"] {
        let started = Instant::now();
        let mut mounted =
            Mounted::start(&vault, &["--item", "fs", "--from", from], &m, &["disk.img"]);
        let disk = m.join("disk.img");
        let meta = fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), fs::metadata(&img).unwrap().len());
        // The owner's alone, read-only.
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        let err = fs::OpenOptions::new().write(true).open(&disk).unwrap_err();
        assert!(
            matches!(
                err.raw_os_error(),
                Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
            ),
            "opening for writing: {err}"
        );
        {
            let lo = RoMount::new(&disk, "ro,loop", &t.path().join("lo"));
            let back = fs::read(lo.0.join("etc/known.dat")).unwrap();
            assert!(
                back == known,
                "known.dat differs through the mount ({from})"
            );
        }
        eprintln!(
            "mount, loop mount and read back from the {from}: {:?}",
            started.elapsed()
        );
        mounted.signal(libc::SIGTERM);
        let (status, out) = mounted.wait();
        assert!(status.success(), "coffre mount: {status}\n{out}");
        assert!(out.contains("mount stopped (signal)"), "{out}");
        assert!(
            !is_mount_point(&m),
            "{} is still a mount point",
            m.display()
        );
    }
}

#[test]
fn a_killed_mount_leaves_nothing_that_blocks_the_next_and_all_serves_every_point() {
    if !can_mount("fuse_mount") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("disk.img");
    random_file(&img, 3 << 20, 7);
    let day1 = t.path().join("day1.copy");
    fs::copy(&img, &day1).unwrap();
    ok(&["backup", "--vault", s(&vault), "--item", "d", s(&img)]);
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0xa5; 100_000], 1 << 20).unwrap();
    drop(f);
    ok(&["backup", "--vault", s(&vault), "--item", "d", s(&img)]);
    let m = mount_dir(t.path());

    // SIGKILL: the FUSE mount stays, dead.
    let mut first = Mounted::start(&vault, &["--item", "d"], &m, &["disk.img"]);
    first.signal(libc::SIGKILL);
    first.wait();
    assert!(is_mount_point(&m));
    // (Listing asks the server; attributes may come from the cache.)
    let err = fs::read_dir(&m).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");

    // The next mount on the folder clears it and serves every point.
    let pts = points(&vault, "d");
    let names: Vec<String> = pts
        .iter()
        .map(|p| format!("{}.img", p["id"].as_str().unwrap()))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut next = Mounted::start(&vault, &["--item", "d", "--all"], &m, &refs);
    let mut listed: Vec<String> = fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(listed, want);
    assert_same(&m.join(&names[0]), &day1);
    assert_same(&m.join(&names[1]), &img);
    next.signal(libc::SIGINT);
    let (status, out) = next.wait();
    assert!(status.success(), "{status}\n{out}");
    assert!(out.contains("dead FUSE mount"), "{out}");
    assert!(!is_mount_point(&m));
    assert!(fs::metadata(&m).unwrap().is_dir());

    // A live mount on the folder is refused, not stacked.
    let live = Mounted::start(&vault, &["--item", "d"], &m, &["disk.img"]);
    let out = run(&["mount", "--vault", s(&vault), "--item", "d", s(&m)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already a FUSE mount"), "{err}");
    drop(live);
}

/// A DOS partition table with one Linux partition of `sectors` sectors
/// at sector 2048.
fn mbr(sectors: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    let e = &mut b[0x1be..0x1ce];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    b[510] = 0x55;
    b[511] = 0xaa;
    b
}

#[test]
fn a_partitioned_image_through_losetup_partscan() {
    if !can_mount("fuse_mount") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let tree = t.path().join("tree");
    let known = known_tree(&tree, 2);
    let part = t.path().join("part.img");
    mkfs_into(&tree, &part, 30);
    let img = t.path().join("disk.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(32 << 20).unwrap();
    f.write_all_at(&mbr(30 * 2048), 0).unwrap();
    f.write_all_at(&fs::read(&part).unwrap(), 1 << 20).unwrap();
    drop(f);
    ok(&["backup", "--vault", s(&vault), "--item", "pt", s(&img)]);
    let m = mount_dir(t.path());
    let mut mounted = Mounted::start(&vault, &["--item", "pt"], &m, &["disk.img"]);

    let out = Command::new("losetup")
        .args(["-r", "-P", "-f", "--show"])
        .arg(m.join("disk.img"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let detach = Detach(dev.clone());
    let p1 = PathBuf::from(format!("{dev}p1"));
    // The scan runs within losetup's ioctl; the node follows at once.
    let start = Instant::now();
    while !p1.exists() && start.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !p1.exists() {
        // A kernel built without the DOS partition parser (as some VM
        // kernels are): partx reads the table in user space, as the
        // README says.
        let out = Command::new("partx").args(["-a", &dev]).output().unwrap();
        assert!(
            out.status.success(),
            "partx -a: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("losetup -P found no partition (kernel without its parser): partx -a did");
    }
    {
        let lo = RoMount::new(&p1, "ro", &t.path().join("lo"));
        assert!(fs::read(lo.0.join("etc/known.dat")).unwrap() == known);
    }
    drop(detach);
    mounted.signal(libc::SIGTERM);
    let (status, out) = mounted.wait();
    assert!(status.success(), "{status}\n{out}");
    assert!(!is_mount_point(&m));
}

#[test]
fn a_damaged_block_is_an_io_error_never_zeros() {
    if !can_mount("fuse_mount") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("disk.img");
    random_file(&img, 2 << 20, 3);
    ok(&["backup", "--vault", s(&vault), "--item", "d", s(&img)]);
    // The first record of the point's pack (block 0's data, stored raw as
    // it is random): segment header 32 bytes, record header 56.
    let packs: Vec<_> = segment_files(&vault)
        .into_iter()
        .filter(|p| fs::read(p).unwrap().starts_with(b"CFPACK"))
        .collect();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&packs[0])
        .unwrap();
    let at = 32 + 56 + 1000;
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 1], at).unwrap();
    drop(f);

    let m = mount_dir(t.path());
    let mut mounted = Mounted::start(
        &vault,
        &["--item", "d", "--from", "vault"],
        &m,
        &["disk.img"],
    );
    let disk = fs::File::open(m.join("disk.img")).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = disk.read_exact_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Other blocks read as they were.
    let want = fs::read(&img).unwrap();
    let at = 1 << 20;
    disk.read_exact_at(&mut buf, at).unwrap();
    assert!(buf[..] == want[at as usize..at as usize + 4096]);
    drop(disk);
    mounted.signal(libc::SIGTERM);
    let (status, out) = mounted.wait();
    // The failed reads are counted and the exit says damaged (7).
    assert_eq!(status.code(), Some(7), "{out}");
    assert!(!out.contains(" 0 failed reads"), "{out}");
    assert!(!is_mount_point(&m));
}
