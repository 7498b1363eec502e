//! The running-writer test of live VM backup: a raw image on ext4, and a
//! qcow2, each attached to a running QEMU whose "guest" (a writer thread on
//! a second QMP monitor, writing through the virtio device with HMP
//! `qemu-io`, so every write passes QEMU's copy-before-write filter) keeps
//! stamping numbered writes while ten `coffre backup --qmp` run one after
//! another. Every point must restore to an exact prefix state: the initial
//! image with writes 1..=G applied and none after, G between the writes
//! acknowledged before that backup started and those sent before it ended,
//! G growing from one point to the next (the test waits for two writes
//! between two backups), and at least one point strictly inside its
//! backup's writes. Then `coffre verify --read-data` passes.
//!
//! Write g fills 4 KiB block `(g - 1) * STRIDE mod NBLOCKS` with the byte
//! `lap(g) + 1`, where `lap(g) = (g - 1) / NBLOCKS`; the initial image is
//! random bytes, so a uniform block is a stamp, and its block and byte name
//! the one write that put it there. G is the largest write found in a
//! restored image; the image expected for G is built and compared byte for
//! byte. The raw disk's folder must be on ext4 (read from
//! `/proc/self/mountinfo`): where the temporary folder is not, a small ext4
//! filesystem is made and loop-mounted (root only; skipped otherwise).
//! `COFFRE_TEST_EXT4_LOOP=1` takes that path even on ext4. Skipped with a
//! message where QEMU is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coffre_engine::snapshotter::vm::qmp::Qmp;

use crate::common::qemu::*;
use crate::common::*;

/// Bytes one write stamps.
const BLOCK: usize = 4096;
/// Blocks of the disk (8 MiB).
const NBLOCKS: usize = 2048;
/// Step between the blocks of two successive writes: odd, so coprime with
/// `NBLOCKS` (every block is written once per lap), and large enough that
/// successive writes land in different 64 KiB copy-before-write clusters.
const STRIDE: usize = 389;
/// Backups taken while the writer runs.
const BACKUPS: usize = 10;
/// Writes acknowledged before the first backup and after the last.
const MARGIN: usize = 16;
/// The writer makes at most one write per `PACE` (on average from its
/// start). The stamps wrap after 255 laps (522 240 writes): paced, the
/// writer gets there only if the test runs for more than eight minutes (a
/// backup held up by the machine's fsyncs was seen to take 170 s while
/// unpaced writes ran at 2 600 a second), and it leaves QEMU's main loop
/// time for coffre's commands.
const PACE: Duration = Duration::from_millis(1);

#[test]
fn raw_on_ext4_every_live_point_is_a_prefix_of_the_writes() {
    writer_survives_live_backups("raw");
}

#[test]
fn qcow2_every_live_point_is_a_prefix_of_the_writes() {
    writer_survives_live_backups("qcow2");
}

/// The block write `g` (from 1) stamps.
fn block_of(g: usize) -> usize {
    (g - 1) * STRIDE % NBLOCKS
}

/// The byte write `g` stamps: its lap over the disk, from 1.
fn byte_of(g: usize) -> u8 {
    u8::try_from((g - 1) / NBLOCKS + 1).expect("fewer than 255 laps")
}

/// Applies write `g` to `img`.
fn apply(img: &mut [u8], g: usize) {
    let at = block_of(g) * BLOCK;
    img[at..at + BLOCK].fill(byte_of(g));
}

/// For each block, its place in a lap of writes (write `g` stamps the
/// block at place `(g - 1) % NBLOCKS`).
fn nth_of_block() -> Vec<usize> {
    let mut nth = vec![0; NBLOCKS];
    for n in 0..NBLOCKS {
        nth[block_of(n + 1)] = n;
    }
    nth
}

/// The G such that `img` is exactly `initial` with writes 1..=G applied
/// and none after (G is the largest write whose stamp `img` holds), or
/// what makes it no such state.
fn prefix_state(img: &[u8], initial: &[u8]) -> Result<usize, String> {
    if img.len() != initial.len() {
        return Err(format!(
            "{} bytes, the disk has {}",
            img.len(),
            initial.len()
        ));
    }
    let nth = nth_of_block();
    let mut g = 0;
    for (b, (got, was)) in img.chunks(BLOCK).zip(initial.chunks(BLOCK)).enumerate() {
        if got == was {
            continue;
        }
        let v = got[0];
        if v == 0 || got.iter().any(|&x| x != v) {
            return Err(format!(
                "block {b} (offset {}) is neither its initial bytes nor a write's stamp: starts {:02x?}",
                b * BLOCK,
                &got[..16]
            ));
        }
        g = g.max((usize::from(v) - 1) * NBLOCKS + nth[b] + 1);
    }
    let mut expected = initial.to_vec();
    for w in 1..=g {
        apply(&mut expected, w);
    }
    let differs =
        |b: &usize| img[b * BLOCK..(b + 1) * BLOCK] != expected[b * BLOCK..(b + 1) * BLOCK];
    if let Some(b) = (0..NBLOCKS).find(differs) {
        let last_to = (1..=g).rev().find(|&w| block_of(w) == b);
        return Err(format!(
            "holds write {g} but is not the state after writes 1..={g}: block {b} (offset {}) \
             has {:02x?}…, expected {} ({:02x?}…)",
            b * BLOCK,
            &img[b * BLOCK..b * BLOCK + 8],
            last_to.map_or("its initial bytes".to_string(), |w| format!("write {w}")),
            &expected[b * BLOCK..b * BLOCK + 8],
        ));
    }
    Ok(g)
}

/// The test's own oracle, without QEMU: it finds G in a prefix state
/// (several laps in), and refuses a state missing one write, a state with
/// an older stamp where a newer one belongs, and a torn block.
#[test]
fn the_prefix_oracle_finds_g_and_refuses_what_is_no_prefix() {
    let mut initial = vec![0u8; NBLOCKS * BLOCK];
    Rng::new(1).fill(&mut initial);
    assert_eq!(prefix_state(&initial, &initial), Ok(0));
    let g = 2 * NBLOCKS + 700;
    let mut img = initial.clone();
    for w in 1..=g {
        apply(&mut img, w);
    }
    assert_eq!(prefix_state(&img, &initial), Ok(g));
    // Write g - 1 missing (its block still holds the lap before's stamp).
    let mut missing = initial.clone();
    for w in (1..=g).filter(|&w| w != g - 1) {
        apply(&mut missing, w);
    }
    let e = prefix_state(&missing, &initial).unwrap_err();
    assert!(e.contains(&format!("expected write {}", g - 1)), "{e}");
    // Write g applied, g - 1 never reached (nor in an earlier lap).
    let mut skipped = initial.clone();
    for w in 1..=g - 2 {
        apply(&mut skipped, w);
    }
    apply(&mut skipped, g);
    assert!(prefix_state(&skipped, &initial).is_err());
    // Half of a block stamped.
    let mut torn = img.clone();
    let at = block_of(g + 1) * BLOCK;
    torn[at..at + BLOCK / 2].fill(byte_of(g + 1));
    let e = prefix_state(&torn, &initial).unwrap_err();
    assert!(
        e.contains("neither its initial bytes nor a write's stamp"),
        "{e}"
    );
}

/// One acknowledged write: when it was sent, and when QEMU answered.
#[derive(Clone, Copy)]
struct Acked {
    sent: Instant,
    answered: Instant,
}

/// The writer thread: stamps writes 1, 2, … through its own monitor until
/// told to stop, logging each as QEMU acknowledges it.
struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Acked>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(mut q: Qmp) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::<Acked>::new()));
        let (s, l) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            while !s.load(Ordering::SeqCst) {
                let g = l.lock().unwrap().len() + 1;
                let due = began + PACE * u32::try_from(g).unwrap();
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let sent = Instant::now();
                guest_write(&mut q, byte_of(g), block_of(g) * BLOCK, BLOCK);
                let answered = Instant::now();
                l.lock().unwrap().push(Acked { sent, answered });
            }
        });
        Writer {
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until `n` writes are acknowledged.
    fn wait_for(&self, n: usize) {
        let start = Instant::now();
        while self.acked() < n {
            let t = self.thread.as_ref().unwrap();
            assert!(
                !t.is_finished(),
                "the writer stopped after {} writes",
                self.acked()
            );
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the writer made {} of {n} writes in 20 s",
                self.acked()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the writer; its log of acknowledged writes.
    fn finish(mut self) -> Vec<Acked> {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.thread.take().unwrap().join() {
            std::panic::resume_unwind(e);
        }
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The filesystem type of the mount holding `path`, from
/// `/proc/self/mountinfo` (`stat -f` names ext4 "ext2/ext3").
fn fs_type(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype)) = (f.get(4), f.get(dash + 1)) else {
            continue;
        };
        let mount = PathBuf::from(mount.replace("\\040", " "));
        let depth = mount.components().count();
        // The last of equal depth wins: it is mounted over the others.
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(d, _)| depth >= *d) {
            best = Some((depth, fstype.to_string()));
        }
    }
    best.map(|(_, t)| t).unwrap_or_default()
}

/// `stat -f -c %T path`.
fn stat_fs(path: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An ext4 filesystem loop-mounted for the test, unmounted when dropped.
struct LoopExt4(PathBuf);

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A folder on ext4 inside `dir`: `dir` itself when it is on ext4, else a
/// loop-mounted ext4 image; `None` (after a visible skip) when that cannot
/// be made.
fn ext4_folder(dir: &Path) -> Option<(PathBuf, Option<LoopExt4>)> {
    let forced = std::env::var_os("COFFRE_TEST_EXT4_LOOP").is_some_and(|v| v == "1");
    if fs_type(dir) == "ext4" && !forced {
        return Some((dir.to_path_buf(), None));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            "running writer on ext4: the temporary folder is not on ext4 and mounting one needs root",
        );
        return None;
    }
    let img = dir.join("ext4.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status();
    if !mkfs.is_ok_and(|s| s.success()) {
        skip("running writer on ext4: mkfs.ext4 missing or failing (apt-get install e2fsprogs)");
        return None;
    }
    let mnt = dir.join("ext4");
    std::fs::create_dir(&mnt).unwrap();
    let mount = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt)
        .status();
    if !mount.is_ok_and(|s| s.success()) {
        skip("running writer on ext4: cannot loop-mount an ext4 image here");
        return None;
    }
    let guard = LoopExt4(mnt.clone());
    Some((mnt, Some(guard)))
}

fn have_qemu_img() -> bool {
    tools_run(
        &["qemu-img"],
        "running writer on qcow2: qemu-img missing (apt-get install qemu-utils)",
    )
}

/// Ten live backups of a `format` disk under a running writer; every point
/// restores to an exact prefix of the writes.
fn writer_survives_live_backups(format: &str) {
    if !have_qemu_system() || (format == "qcow2" && !have_qemu_img()) {
        return;
    }
    let began = Instant::now();
    let t = tempfile::tempdir().unwrap();
    let Some((place, _mounted)) = ext4_folder(t.path()) else {
        return;
    };
    let fs = fs_type(&place);
    let statfs = stat_fs(&place);
    if format == "raw" {
        assert_eq!(fs, "ext4", "the raw disk's folder {}", place.display());
        // (coreutils names ext2, ext3 and ext4 by their common magic.)
        assert!(
            matches!(statfs.as_str(), "ext2/ext3" | "ext4"),
            "stat -f of {}: {statfs}",
            place.display()
        );
    }

    let size = NBLOCKS * BLOCK;
    let mut initial = vec![0u8; size];
    Rng::new(0x5eed).fill(&mut initial);
    let disk = place.join(format!("disk.{format}"));
    if format == "raw" {
        std::fs::write(&disk, &initial).unwrap();
    } else {
        write_qcow2(&disk, &initial);
    }
    let vault = new_vault(t.path(), &[]);
    let (vm, q) = start_vm_watched(&place, &disk, format);
    let writer = Writer::start(q);

    writer.wait_for(MARGIN);
    // (started, ended, acknowledged before it started) of each backup.
    let mut runs: Vec<(Instant, Instant, usize)> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for k in 0..BACKUPS {
        if k > 0 {
            // A few writes between two backups, so G must grow.
            writer.wait_for(writer.acked() + 2);
        }
        let before = writer.acked();
        let started = Instant::now();
        let b = json(&live_backup_args(&vault, &vm.qmp, "disk0", &[]));
        let ended = Instant::now();
        assert_eq!(b["job"]["status"], "Completed", "backup {}: {b}", k + 1);
        // From the second backup on, only what the dirty bitmap marks is
        // read (and the audit's sample): the exactness below covers the
        // bitmap path too.
        assert_eq!(b["cbt"]["used"], k > 0, "backup {}: {b}", k + 1);
        let id = b["id"]
            .as_str()
            .unwrap_or_else(|| panic!("backup {}: no point id: {b}", k + 1));
        ids.push(id.to_string());
        runs.push((started, ended, before));
    }
    writer.wait_for(writer.acked() + MARGIN);
    let log = writer.finish();
    let total = log.len();
    assert!(
        total < 255 * NBLOCKS,
        "{total} writes: the stamps wrapped (the run took {:.0} s)",
        began.elapsed().as_secs_f64()
    );
    drop(vm);

    let pts = points(&vault, "vm");
    assert_eq!(pts.len(), BACKUPS, "{pts:?}");
    let pids: Vec<String> = pts
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pids, ids, "the points, in the order of the backups");

    let mut gs = Vec::new();
    let mut during = Vec::new();
    let mut windows = Vec::new();
    let mut prev = 0;
    for (k, (id, &(started, ended, acked_before))) in pids.iter().zip(&runs).enumerate() {
        let r = t.path().join(format!("point-{}.img", k + 1));
        ok(&restore_args(&vault, "vm", Some(id), &r, false));
        let got = std::fs::read(&r).unwrap();
        std::fs::remove_file(&r).unwrap();
        let g = prefix_state(&got, &initial)
            .unwrap_or_else(|e| panic!("{format} point {} ({id}): {e}", k + 1));
        let sent_before_end = log.iter().filter(|a| a.sent < ended).count();
        assert!(
            acked_before <= g && g <= sent_before_end,
            "{format} point {} ({id}): holds writes 1..={g}, but {acked_before} were acknowledged \
             before its backup started and {sent_before_end} sent before it ended",
            k + 1
        );
        assert!(g > prev, "{format} point {}: G {g} after {prev}", k + 1);
        prev = g;
        gs.push(g);
        windows.push((acked_before, sent_before_end));
        during.push(
            log.iter()
                .filter(|a| a.answered > started && a.answered < ended)
                .count(),
        );
    }
    // MARGIN writes were acknowledged before the first backup and after
    // the last (which may have held one more, in flight as it ended).
    assert!(
        gs[0] >= MARGIN && gs[BACKUPS - 1] < total,
        "{gs:?} of {total}"
    );
    // The writer really ran inside the backups: a point in time taken
    // after writes that were not yet acknowledged when its backup started,
    // and before others that were sent before it ended.
    let inside = gs
        .iter()
        .zip(&windows)
        .filter(|&(g, &(before, before_end))| *g > before && *g < before_end)
        .count();
    assert!(
        inside > 0,
        "no point fell strictly inside its backup's writes: G {gs:?}, windows {windows:?}"
    );
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
    let ms: Vec<u128> = runs.iter().map(|(a, b, _)| (*b - *a).as_millis()).collect();
    println!(
        "running writer, {format} in {} on {fs} (stat -f: {statfs}): \
         {BACKUPS}/{BACKUPS} points are exact prefixes, {inside} strictly inside their backup's \
         writes; G = {gs:?} of {total} writes; (acknowledged before start, sent before end) of \
         each backup {windows:?}; writes acknowledged during each backup {during:?}; backups took {ms:?} ms; \
         {:.1} s in all",
        place.display(),
        began.elapsed().as_secs_f64()
    );
}
