//! Shared helpers for the integration tests: running the real `coffre`
//! binary, and generating disk images at test time (nothing large is
//! committed).

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub use coffre_vault_store::skip::skip;

/// True when every one of `tools` runs here (`TOOL --version` succeeds);
/// says SKIP with `why` otherwise, which CI counts.
pub fn tools_run(tools: &[&str], why: &str) -> bool {
    let all = tools.iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !all {
        skip(why);
    }
    all
}

pub mod fake_agent;
pub mod libvirt;
pub mod plaintext;
pub mod qemu;

/// Path of the binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coffre"))
}

/// A `coffre` command with a quiet, deterministic environment.
pub fn coffre() -> Command {
    let mut c = Command::new(bin());
    c.env_remove("COFFRE_VAULT")
        .env_remove("COFFRE_NOW")
        .env("COFFRE_LOG", "warn")
        .env("COFFRE_REGISTRY", registry_path())
        .env("COFFRE_SNAPSHOT_ROOT", snapshot_root());
    c
}

/// Where this test process's snapshot areas go (never the root of the
/// machine's filesystem; the same filesystem as the test images, so that
/// clones would work where the filesystem can clone).
pub fn snapshot_root() -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    // The test harness has no "after all tests" hook: the roots of earlier
    // test processes that are gone are removed here instead.
    SWEEP.call_once(|| {
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("coffre-test-snapshots-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = fs::remove_dir_all(e.path());
            }
            // The registries of those processes (and their lock files).
            if let Some(rest) = name.strip_prefix("coffre-test-registry-") {
                let pid = rest.trim_end_matches(".lock");
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_file(e.path());
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    });
    std::env::temp_dir().join(format!("coffre-test-snapshots-{}", std::process::id()))
}

/// The registry of protected images this test process uses (never the
/// user's own; those of finished test processes are swept with their
/// snapshot roots).
pub fn registry_path() -> PathBuf {
    let _ = snapshot_root();
    std::env::temp_dir().join(format!("coffre-test-registry-{}", std::process::id()))
}

/// Runs `coffre args…` with the clock fixed at `now` (RFC 3339).
pub fn run_at(now: &str, args: &[&str]) -> Output {
    coffre()
        .env("COFFRE_NOW", now)
        .args(args)
        .output()
        .expect("run coffre")
}

/// Like [`ok`] with the clock at `now`.
pub fn ok_at(now: &str, args: &[&str]) -> String {
    let out = run_at(now, args);
    assert!(
        out.status.success(),
        "coffre {args:?} at {now} failed with {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Like [`json`] with the clock at `now`.
pub fn json_at(now: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok_at(now, &all)).expect("valid JSON")
}

/// Protects `img` as `item` under `policy` with the clock at `now`.
pub fn protect_at(now: &str, vault: &Path, item: &str, policy: &str, img: &Path) {
    ok_at(
        now,
        &[
            "protect",
            "--vault",
            s(vault),
            "--item",
            item,
            "--policy",
            policy,
            s(img),
        ],
    );
}

/// Backs `img` up as item "vm" at `now`, kept until `until`.
pub fn backup_vm_until(now: &str, vault: &Path, img: &Path, until: &str) {
    ok_at(
        now,
        &[
            "backup",
            "--vault",
            s(vault),
            "--item",
            "vm",
            "--retain-until",
            until,
            s(img),
        ],
    );
}

/// Jobs of the vault as JSON.
pub fn jobs(vault: &Path) -> Vec<serde_json::Value> {
    json(&["jobs", "--vault", s(vault)])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls `jobs` until `pred` holds for the newest job of `item`.
pub fn wait_for_job(
    vault: &Path,
    item: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let all = json(&["jobs", "--vault", s(vault), "--item", item]);
        if let Some(j) = all.as_array().and_then(|a| a.last())
            && pred(j)
        {
            return j.clone();
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "waited 30 s for {what}: {all}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Status of phase `i` of a job.
pub fn phase(job: &serde_json::Value, i: usize) -> &str {
    job["phases"][i]["status"].as_str().unwrap_or("")
}

/// Runs `coffre args…` and returns its output.
/// `coffre backup --vault VAULT --rate-limit 16M SOURCE`, started and not
/// waited for (about four seconds per 64 MiB of data: long enough for a
/// test to break something under it), its output piped.
pub fn slow_backup(vault: &Path, source: &str) -> Child {
    coffre()
        .args(["backup", "--vault", s(vault), "--rate-limit", "16M", source])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub fn run(args: &[&str]) -> Output {
    coffre().args(args).output().expect("run coffre")
}

/// Runs and asserts success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    succeeded(args, run(args))
}

/// Asserts that `coffre args…` succeeded; returns its stdout.
pub fn succeeded(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "coffre {args:?} failed with {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs and asserts failure with `code`; returns stderr.
pub fn fails(args: &[&str], code: i32) -> String {
    let out = run(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "coffre {args:?}: expected exit {code}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

/// Runs with `--output json` and parses stdout.
pub fn json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&all)).expect("valid JSON")
}

/// `restore --vault VAULT --item vm --live --to TARGET`: how every live
/// restore's arguments begin (item `vm`, as the live tests name it).
pub fn live_args<'a>(vault: &'a str, target: &'a Path) -> Vec<&'a str> {
    vec![
        "restore",
        "--vault",
        vault,
        "--item",
        "vm",
        "--live",
        "--to",
        s(target),
    ]
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Creates a vault at `dir/vault` with extra `create` args.
pub fn new_vault(dir: &Path, extra: &[&str]) -> PathBuf {
    let v = dir.join("vault");
    let area = dir.join("snapshot-area");
    let mut args = vec!["vault", "create", "--vault", s(&v)];
    // Snapshots go to the test's own folder (and away with it) unless the
    // test chooses.
    if !extra.contains(&"--snapshot-area") {
        args.extend(["--snapshot-area", s(&area)]);
    }
    args.extend_from_slice(extra);
    ok(&args);
    v
}

/// Holds an exclusive flock on `path` while alive (as another process would).
pub struct Held(#[allow(dead_code)] File);

/// Takes an exclusive flock on `path` (created if needed).
pub fn hold(path: &Path) -> Held {
    use std::os::fd::AsRawFd;
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    Held(f)
}

/// The first segment file of a vault.
/// The vault's segment files, sorted.
pub fn segment_files(vault: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(vault.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

pub fn first_segment(vault: &Path) -> PathBuf {
    fs::read_dir(vault.join("segments"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

/// The item's points the vault holds (tiers `Vault` and
/// `SnapshotAndVault`; not those that exist only as a snapshot).
pub fn vault_points(vault: &Path, item: &str) -> Vec<serde_json::Value> {
    points(vault, item)
        .into_iter()
        .filter(|p| p["tier"] != "Snapshot")
        .collect()
}

/// The snapshot folders of `item` in every area the vault has used (read
/// from `VAULT/snapshot-areas`: an envelope around a JSON list of paths).
pub fn snapshot_dirs(vault: &Path, item: &str) -> Vec<PathBuf> {
    let Ok(bytes) = fs::read(vault.join("snapshot-areas")) else {
        return Vec::new();
    };
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let dirs: Vec<PathBuf> = serde_json::from_slice(&bytes[16..16 + len]).unwrap();
    dirs.into_iter().map(|d| d.join(item)).collect()
}

/// Points of an item as JSON objects.
pub fn points(vault: &Path, item: &str) -> Vec<serde_json::Value> {
    json(&["points", "--vault", s(vault), "--item", item])
        .as_array()
        .expect("array")
        .clone()
}

/// A small deterministic PRNG (splitmix64), so images are reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Text-like compressible bytes.
pub fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "vault", "block", "chunk", "restore", "kernel", "disk", "image", "point", "backup",
        "segment", "index", "policy",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
        out.push(if rng.below(9) == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// Writes a sparse image of `size` bytes: a mix of text, random data,
/// explicit zeros and holes, in 64 KiB-ish runs.
pub fn mixed_image(path: &Path, size: u64, seed: u64) {
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut rng = Rng::new(seed);
    let mut at = 0u64;
    while at < size {
        let run = (16 << 10) + rng.below(240 << 10);
        let len = run.min(size - at) as usize;
        match rng.below(4) {
            0 => f.write_all_at(&text(&mut rng, len), at).unwrap(),
            1 => {
                let mut b = vec![0u8; len];
                rng.fill(&mut b);
                f.write_all_at(&b, at).unwrap();
            }
            2 => f.write_all_at(&vec![0u8; len], at).unwrap(),
            _ => {} // hole
        }
        at += len as u64;
    }
    f.sync_all().unwrap();
}

/// Overwrites `count` random extents of `len` bytes with fresh random data.
pub fn churn(path: &Path, count: usize, len: usize, seed: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut rng = Rng::new(seed);
    for _ in 0..count {
        let at = rng.below(size.saturating_sub(len as u64).max(1));
        let mut b = vec![0u8; len.min(size as usize)];
        rng.fill(&mut b);
        f.write_all_at(&b, at).unwrap();
    }
    f.sync_all().unwrap();
}

/// Writes a file of incompressible bytes.
pub fn random_file(path: &Path, size: usize, seed: u64) {
    let mut b = vec![0u8; size];
    Rng::new(seed).fill(&mut b);
    fs::write(path, b).unwrap();
}

/// Asserts two files have identical content.
pub fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

/// Allocated bytes of a file (to check sparseness).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// Finds mke2fs and debugfs (in /sbin on Debian).
pub fn e2tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install e2fsprogs (make deps does)");
}

/// Builds a real ext4 image of `size_mb` MiB from a generated tree of text
/// and binary files.
pub fn ext4_image(path: &Path, size_mb: u64, seed: u64) {
    let tree = path.with_extension("tree");
    let _ = fs::remove_dir_all(&tree);
    let mut rng = Rng::new(seed);
    for d in 0..6 {
        let dir = tree.join(format!("dir{d}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..20 {
            let len = 1024 + rng.below(300 << 10) as usize;
            let body = if i % 3 == 0 {
                let mut b = vec![0u8; len];
                rng.fill(&mut b);
                b
            } else {
                text(&mut rng, len)
            };
            let mut f = File::create(dir.join(format!("file{i}.dat"))).unwrap();
            f.write_all(&body).unwrap();
        }
    }
    let out = Command::new(e2tool("mke2fs"))
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(path)
        .arg(format!("{size_mb}M"))
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mke2fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_dir_all(&tree).unwrap();
}

/// A second "day" of an ext4 image: new files written and one removed,
/// through the filesystem (debugfs), not by raw byte edits.
pub fn ext4_day_two(path: &Path, seed: u64) {
    let dir = path.with_extension("new");
    fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(seed);
    let mut cmds = String::from("rm /dir0/file1.dat\nmkdir /day2\n");
    for i in 0..8 {
        let f = dir.join(format!("new{i}.dat"));
        let len = 64 * 1024 + rng.below(512 << 10) as usize;
        if i % 2 == 0 {
            fs::write(&f, text(&mut rng, len)).unwrap();
        } else {
            random_file(&f, len, rng.next());
        }
        cmds.push_str(&format!("write {} /day2/new{i}.dat\n", f.display()));
    }
    let script = dir.join("cmds");
    fs::write(&script, cmds).unwrap();
    let out = Command::new(e2tool("debugfs"))
        .args(["-w", "-f"])
        .arg(&script)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// True when running as root (some tests need it to mount or drop rights).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Arguments of `coffre restore` of `item` (the latest point when `point`
/// is `None`) to `to`.
pub fn restore_args<'a>(
    vault: &'a Path,
    item: &'a str,
    point: Option<&'a str>,
    to: &'a Path,
    force: bool,
) -> Vec<&'a str> {
    let mut args = vec![
        "restore",
        "--vault",
        s(vault),
        "--item",
        item,
        "--to",
        s(to),
    ];
    if let Some(p) = point {
        args.extend(["--point", p]);
    }
    if force {
        args.push("--force");
    }
    args
}

/// Bytes in all segment files of a vault (committed or not).
pub fn segment_bytes(vault: &Path) -> u64 {
    fs::read_dir(vault.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Unmounts `mnt`. A process that still holds a file there makes umount
/// fail: retry for five seconds, then detach lazily, so that no mount (or
/// loop device) outlives a test.
pub fn unmount(mnt: &Path) {
    for _ in 0..50 {
        if Command::new("umount")
            .arg(mnt)
            .status()
            .is_ok_and(|s| s.success())
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = Command::new("umount").arg("-l").arg(mnt).status();
}
