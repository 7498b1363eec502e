//! Live restore (`coffre restore --live`) into a real QEMU, killed with
//! SIGKILL mid-stream and resumed.
//!
//! A point of a 16 MiB disk (random bytes, and a hole) is restored into a
//! VM started with `-S` whose disk device `vda` has a blank "broken"
//! drive. coffre creates the qcow2 target over its export, gives it to
//! `vda`, starts the VM and QEMU's `block-stream` (slowed with `--speed`
//! so the test can kill it). A "guest" writer (HMP `qemu-io` through the
//! device, on a monitor of its own, as in `qemu_running_writer`) stamps
//! numbered writes of whole 64 KiB clusters (a quarter of the disk's
//! clusters, so the rest must come through the stream) from the moment
//! the job runs. coffre is killed
//! (`kill -9`) once a quarter is streamed; the job must still be there,
//! waiting; `--resume` serves the export again and follows the job to its
//! end. Then the target must equal the point with every acknowledged
//! write applied (`qemu-img compare` with an expected image) and have no
//! backing file (`qemu-img info`). A second run without `--resume` is
//! refused, and `--resume` of a complete target says so. The point is
//! held in the vault from the first run until the stream completes (the
//! kill included), and a second run of the same target while one runs
//! is refused at once. Once a run has released its hold, QEMU killed with
//! SIGKILL leaves a target equal to the point (coffre made QEMU write it
//! out first). A `--resume` of a complete target checks it against its
//! hold's point, and keeps a hold it cannot read. Skipped with a message
//! where QEMU is missing.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coffre_engine::access::live::LiveRun;
use coffre_engine::snapshotter::vm::qmp::Qmp;
use coffre_engine::snapshotter::vm::stream::LiveNames;
use coffre_engine::store::holds::{FileId, HoldRecord, HoldStore};
use serde_json::{Value, json};

use crate::common::qemu::*;
use crate::common::*;

/// Bytes one write stamps: one whole qcow2 cluster, so that a write
/// never reads the backing (HMP `qemu-io` holds QEMU's main loop, every
/// monitor included, while its write waits, and a write that copied the
/// rest of its cluster from the backing would wait for the export).
const BLOCK: usize = 64 << 10;
/// Blocks of the disk (16 MiB).
const NBLOCKS: usize = 256;
/// The writer stamps every `SPREAD`th block only: the others must come
/// from the point, through the stream.
const SPREAD: usize = 4;
/// Blocks the writer stamps.
const WRITTEN: usize = NBLOCKS / SPREAD;
/// Step between two writes among those blocks (odd: coprime with
/// `WRITTEN`).
const STRIDE: usize = 37;
/// The stream's speed limit, bytes a second.
const SPEED: &str = "4M";
/// At most one write per `PACE`.
const PACE: Duration = Duration::from_millis(3);

fn block_of(g: usize) -> usize {
    (g - 1) * STRIDE % WRITTEN * SPREAD
}

fn byte_of(g: usize) -> u8 {
    u8::try_from((g - 1) / WRITTEN % 250 + 1).unwrap()
}

/// `initial` with the writer's writes 1 to `n` applied.
fn with_writes(initial: &[u8], n: usize) -> Vec<u8> {
    let mut expected = initial.to_vec();
    for g in 1..=n {
        let at = block_of(g) * BLOCK;
        expected[at..at + BLOCK].fill(byte_of(g));
    }
    expected
}

/// The writer: stamps writes 1, 2, … through its own monitor until
/// stopped; the count of acknowledged writes.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<usize>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(mut q: Qmp) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(0usize));
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let g = *a.lock().unwrap() + 1;
                guest_write(&mut q, byte_of(g), block_of(g) * BLOCK, BLOCK);
                *a.lock().unwrap() = g;
                std::thread::sleep(PACE);
            }
        });
        Writer {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> usize {
        *self.acked.lock().unwrap()
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.thread.take().unwrap().join() {
            std::panic::resume_unwind(e);
        }
        self.acked()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The job `name`'s (status, offset, len), if QEMU has it.
fn job_of(q: &mut Qmp, name: &str) -> Option<(String, u64, u64)> {
    job_in(&q.execute("query-jobs", None).unwrap(), name)
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

/// A coffre run, killed if the test fails before it ends.
struct Run(std::process::Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A vault with a point of a 16 MiB disk, a VM waiting with `-S` whose
/// device `vda` has a blank drive, and the test's monitors.
struct Setup {
    _t: tempfile::TempDir,
    dir: PathBuf,
    initial: Vec<u8>,
    vault: PathBuf,
    vm: Vm,
    watch: Qmp,
    writer_sock: PathBuf,
    target: PathBuf,
    job: String,
}

impl Setup {
    /// `None` (after a visible skip) where QEMU is missing.
    fn new() -> Option<Setup> {
        if !have_qemu_system() {
            return None;
        }
        if !tools_run(
            &["qemu-img"],
            "live restore: qemu-img missing (apt-get install qemu-utils)",
        ) {
            return None;
        }
        let t = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(t.path()).unwrap();
        let size = NBLOCKS * BLOCK;
        let mut initial = vec![0u8; size];
        Rng::new(0x11fe).fill(&mut initial);
        // A hole: 2 MiB of zeros the export reports as such.
        initial[4 << 20..6 << 20].fill(0);
        let img = dir.join("point.raw");
        std::fs::write(&img, &initial).unwrap();
        let vault = new_vault(&dir, &[]);
        ok(&["backup", "--vault", s(&vault), "--item", "vm", s(&img)]);
        // The VM: its disk device vda has a blank ("broken") drive.
        let broken = dir.join("broken.raw");
        std::fs::File::create(&broken)
            .unwrap()
            .set_len(size as u64)
            .unwrap();
        let (writer_sock, watch_sock) = (dir.join("writer.sock"), dir.join("watch.sock"));
        let vm = start_vm_as(
            &dir,
            &broken,
            "raw",
            &[
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", writer_sock.display()),
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", watch_sock.display()),
            ],
        );
        let watch = Qmp::connect(&watch_sock, Duration::from_secs(20)).unwrap();
        let target = dir.join("restored.qcow2");
        let job = LiveNames::of(&target).job;
        Some(Setup {
            _t: t,
            dir,
            initial,
            vault,
            vm,
            watch,
            writer_sock,
            target,
            job,
        })
    }

    /// A set-up whose live restore (no speed limit) ran to its end, the
    /// point no longer held; `None` where QEMU is missing.
    fn completed() -> Option<Setup> {
        let st = Setup::new()?;
        let out = coffre().args(st.live(&["--speed", "0"])).output().unwrap();
        assert!(out.status.success(), "live restore: {out:?}");
        assert_eq!(st.holds(), vec![], "the point is no longer held");
        Some(st)
    }

    /// The arguments of the live restore, then `extra`.
    fn live(&self, extra: &[&str]) -> Vec<String> {
        let mut a = live_args(s(&self.vault), &self.target);
        a.extend(["--qmp", s(&self.vm.qmp), "--device", "vda"]);
        if !extra.contains(&"--speed") {
            a.extend(["--speed", SPEED]);
        }
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect()
    }

    /// The points the vault's live restore holds are on, and their
    /// targets.
    fn holds(&self) -> Vec<(String, PathBuf)> {
        HoldStore::new(&self.vault, None)
            .list()
            .unwrap()
            .into_iter()
            .map(|h| (h.point, h.target))
            .collect()
    }

    /// Starts `coffre daemon` of the vault (no pass due for an hour),
    /// logging to the returned file.
    fn daemon(&self) -> (Run, PathBuf) {
        let log = self.dir.join("daemon.log");
        let child = coffre()
            .env("COFFRE_LOG", "info")
            .args(["daemon", "--vault", s(&self.vault), "--interval", "3600"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .map(Run)
            .unwrap();
        (child, log)
    }

    /// The job's (status, offset, len).
    fn job(&mut self) -> Option<(String, u64, u64)> {
        job_of(&mut self.watch, &self.job)
    }

    /// Starts the first run, and waits until its job runs.
    fn first_run(&mut self, extra: &[&str]) -> (Run, PathBuf) {
        let log = self.dir.join("first.log");
        let child = coffre()
            .args(self.live(extra))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .map(Run)
            .unwrap();
        wait_until("the stream job", || {
            self.job().is_some_and(|(st, _, _)| st == "running")
        });
        (child, log)
    }

    /// QEMU quits cleanly (its qcow2 metadata written); then the target
    /// must equal `expected` and have no backing file.
    fn quit_and_compare(mut self, expected: &[u8], what: &str) {
        let _ = self.watch.execute("quit", None);
        let _ = self.vm.child.wait();
        self.compare(expected, what);
    }

    /// QEMU is killed (`SIGKILL`: nothing it holds in memory reaches the
    /// target); then the target must equal `expected` all the same.
    fn kill_and_compare(mut self, expected: &[u8], what: &str) {
        let _ = self.vm.child.kill();
        let _ = self.vm.child.wait();
        self.compare(expected, what);
    }

    /// The target equals `expected` and has no backing file.
    fn compare(&self, expected: &[u8], what: &str) {
        let exp = self.dir.join("expected.raw");
        std::fs::write(&exp, expected).unwrap();
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(&self.target),
            s(&exp),
        ]);
        assert!(
            cmp.status.success(),
            "the target is not {what}: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
        let info = qemu_img(&["info", "--output=json", s(&self.target)]);
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info.get("backing-filename"), None, "{info}");
        assert_eq!(info["virtual-size"], json!(expected.len()));
    }
}

#[test]
fn a_killed_live_restore_resumes_and_the_target_is_the_point_with_the_guests_writes() {
    let Some(mut st) = Setup::new() else {
        return;
    };
    let began = Instant::now();
    let (mut first, log) = st.first_run(&[]);
    let status = st.watch.execute("query-status", None).unwrap();
    assert_eq!(
        status["status"], "running",
        "coffre starts a VM waiting with -S"
    );
    // The point is held while the VM reads it.
    let point = points(&st.vault, "vm")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(st.holds(), vec![(point.clone(), st.target.clone())]);
    // A second run of the same target is refused at once, naming the
    // first, and leaves its export alone.
    let second = coffre().args(st.live(&["--resume"])).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(
        err.contains("is already running") && err.contains(&format!("pid {}", first.0.id())),
        "{err}"
    );
    let writer = Writer::start(Qmp::connect(&st.writer_sock, Duration::from_secs(20)).unwrap());
    wait_until("a quarter streamed and writes under way", || {
        st.job().is_some_and(|(_, o, l)| o >= l / 4) && writer.acked() >= 20
    });
    // The job's last state before the kill (the stream is slowed by
    // --speed, so it is still mid-way when the kill lands).
    let killed_at = st.job().unwrap();
    assert!(
        killed_at.0 == "running" && killed_at.1 < killed_at.2,
        "killed mid-stream: {killed_at:?}"
    );
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let acked_at_kill = writer.acked();
    // Killed, it still holds the point: prune and gc keep it. The hold
    // names the very file made.
    assert_eq!(st.holds(), vec![(point.clone(), st.target.clone())]);
    let holds = HoldStore::new(&st.vault, None);
    let held = holds.get(&st.target).unwrap().unwrap();
    let made = FileId::of(&st.target).unwrap();
    assert_eq!(held.target_file, Some(made));
    // A resume in another file than the one made (a copy reads the same
    // backing) is refused before it serves anything; the hold stays.
    let path = holds.path_of(&st.target);
    let kept = std::fs::read(&path).unwrap();
    holds
        .put(&HoldRecord {
            target_file: Some(FileId {
                ino: made.ino + 1,
                born: made.born,
            }),
            ..held.clone()
        })
        .unwrap();
    let theirs = std::fs::read(&path).unwrap();
    let out = coffre().args(st.live(&["--resume"])).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("not the file the live restore"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), theirs, "the hold stays");
    std::fs::write(&path, &kept).unwrap();
    // The export is gone for a while; the writer goes on. The monitors
    // are not asked meanwhile: a write that meets the stream's stalled
    // read of the same cluster waits for the export, holding them all.
    // That the job waited (neither failed nor ended) is what the resumed
    // run finds and says.
    std::thread::sleep(Duration::from_millis(700));
    let first_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        first_log.contains("--resume"),
        "coffre says how to resume before it streams: {first_log}"
    );

    let resumed_at = Instant::now();
    // (The resumed run changes the running job's speed limit.)
    let out = coffre()
        .args(st.live(&["--resume", "--speed", "8M"]))
        .output()
        .unwrap();
    let resume_s = resumed_at.elapsed().as_secs_f64();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "resume: {stdout}\n{stderr}");
    println!("first run:\n{first_log}\nresumed run:\n{stderr}{stdout}");
    assert!(stdout.contains("complete (resumed)"), "{stdout}");
    assert!(
        stderr.contains("following QEMU's block-stream job"),
        "{stderr}"
    );
    assert!(!stderr.contains("failed"), "{stderr}");
    assert!(stderr.contains("streamed"), "progress is shown: {stderr}");
    assert_eq!(st.job(), None, "the job is dismissed");
    assert_eq!(st.holds(), vec![], "the point is no longer held");
    assert!(stderr.contains("no longer held"), "{stderr}");
    let nodes = coffre_nodes(&mut st.watch);
    assert!(
        nodes
            .iter()
            .all(|n| !n.ends_with("-lback") && !n.ends_with("-lnbd")),
        "the backing nodes are gone: {nodes:?}"
    );
    // More writes once the export is back.
    let acked_after = writer.acked();
    wait_until("writes after the resume", || {
        writer.acked() >= acked_after + 10
    });
    let n = writer.finish();

    // Once complete: a second run is refused, a resume says it is done.
    let again = coffre().args(st.live(&[])).output().unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already exists") && err.contains("--resume"),
        "{err}"
    );
    let done = coffre().args(st.live(&["--resume"])).output().unwrap();
    assert!(done.status.success(), "{done:?}");
    assert!(
        String::from_utf8_lossy(&done.stderr).contains("the stream had completed"),
        "{done:?}"
    );

    let expected = with_writes(&st.initial, n);
    st.quit_and_compare(&expected, &format!("the point with the {n} writes applied"));
    println!(
        "live restore: killed at {killed_at:?} (status, offset, len) after {acked_at_kill} writes, resumed run took {resume_s:.1} s \
         ({acked_after} writes when it ended), {n} writes in all, target equal to the expected image; {:.1} s in all",
        began.elapsed().as_secs_f64()
    );
}

/// SIGTERM to a daemon: its exit status and its log.
fn stop_daemon(mut daemon: Run, log: &std::path::Path) -> (std::process::ExitStatus, String) {
    // SAFETY: kill(2) of our own child.
    assert_eq!(
        unsafe { libc::kill(i32::try_from(daemon.0.id()).unwrap(), libc::SIGTERM) },
        0
    );
    let status = daemon.0.wait().unwrap();
    (status, std::fs::read_to_string(log).unwrap())
}

/// Files the test put in the host's runtime folder, removed when it ends.
struct Planted(Vec<PathBuf>);

impl Drop for Planted {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `coffre daemon` of the vault resumes a live restore whose run was
/// killed mid-stream, with no one running `--resume`: from the run file
/// the first run wrote (the vault, the monitor, the device). The daemon
/// leaves alone a run file of another vault (naming this very VM) and
/// reports a damaged one once. The target ends as the point with the
/// guest's writes applied; the hold and the run file go.
#[test]
fn a_killed_live_restore_is_resumed_by_the_daemon() {
    let Some(mut st) = Setup::new() else {
        return;
    };
    let began = Instant::now();
    let (mut first, log) = st.first_run(&[]);
    let run_file = LiveNames::of(&st.target).run_file().unwrap();
    let run = LiveRun::decode(
        &std::fs::read(&run_file).unwrap(),
        run_file.file_name().unwrap().to_str().unwrap(),
    )
    .unwrap();
    assert_eq!(run.vault, std::fs::canonicalize(&st.vault).unwrap());
    assert_eq!(run.target, st.target);
    assert_eq!(run.qmp.as_deref(), Some(st.vm.qmp.as_path()));
    assert_eq!((run.item.as_str(), run.device.as_str()), ("vm", "vda"));
    let writer = Writer::start(Qmp::connect(&st.writer_sock, Duration::from_secs(20)).unwrap());
    wait_until("a quarter streamed and writes under way", || {
        st.job().is_some_and(|(_, o, l)| o >= l / 4) && writer.acked() >= 20
    });
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let first_log = std::fs::read_to_string(&log).unwrap();
    assert!(first_log.contains("coffre daemon"), "{first_log}");
    assert!(run_file.exists(), "a killed run leaves its run file");
    // Another vault's unfinished restore, naming this VM's monitor: not
    // this daemon's. And a damaged run file.
    let other_target = st.dir.join("other.qcow2");
    let other = LiveRun {
        vault: st.dir.join("another-vault"),
        target: other_target.clone(),
        ..run.clone()
    };
    let other_file = LiveNames::of(&other_target).run_file().unwrap();
    let bad_file = LiveNames::of(&st.dir.join("bad.qcow2")).run_file().unwrap();
    // (Removed however the test ends: other tests' daemons see the folder.)
    let _planted = Planted(vec![other_file.clone(), bad_file.clone()]);
    std::fs::write(&other_file, other.encode().unwrap()).unwrap();
    let mut bad = run.encode().unwrap();
    bad[24] ^= 1;
    std::fs::write(&bad_file, &bad).unwrap();

    let (daemon, daemon_log) = st.daemon();
    wait_until("the daemon's resume to complete the stream", || {
        st.holds().is_empty()
    });
    assert_eq!(st.job(), None, "the job is dismissed");
    assert!(!run_file.exists(), "the run file goes with the hold");
    let acked_after = writer.acked();
    wait_until("writes after the resume", || {
        writer.acked() >= acked_after + 10
    });
    let n = writer.finish();
    let (status, dlog) = stop_daemon(daemon, &daemon_log);
    println!("daemon:\n{dlog}");
    assert!(status.success(), "{dlog}");
    assert!(
        dlog.contains("resuming a live restore whose run is gone")
            && dlog.contains("resumed by the daemon: complete")
            && dlog.contains("daemon stopped"),
        "{dlog}"
    );
    assert!(!dlog.contains("other.qcow2"), "{dlog}");
    assert!(other_file.exists(), "another vault's run file stays");
    assert_eq!(
        dlog.matches(bad_file.to_str().unwrap()).count(),
        1,
        "a damaged run file is reported once: {dlog}"
    );

    let expected = with_writes(&st.initial, n);
    st.quit_and_compare(&expected, &format!("the point with the {n} writes applied"));
    println!(
        "live restore resumed by the daemon: {n} writes, target equal to the expected image; {:.1} s in all",
        began.elapsed().as_secs_f64()
    );
}

/// The daemon's resume is unattended: when the QEMU that had the target
/// is gone and another one listens on the same monitor (a restarted VM,
/// waiting with `-S`), it neither gives that VM's device the target nor
/// starts it; it says why, and the hold and the run file stay for a
/// human's `--resume` or `--abandon`.
#[test]
fn the_daemon_never_gives_the_target_to_a_restarted_qemu() {
    let Some(mut st) = Setup::new() else {
        return;
    };
    let (mut first, _log) = st.first_run(&[]);
    wait_until("a quarter streamed", || {
        st.job().is_some_and(|(_, o, l)| o >= l / 4)
    });
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let run_file = LiveNames::of(&st.target).run_file().unwrap();
    let _planted = Planted(vec![run_file.clone()]);
    assert!(run_file.exists());
    // The VM restarts: a new QEMU on the same monitor, its disk the blank
    // one, waiting.
    let watch2 = st.dir.join("watch2.sock");
    st.vm = start_vm_as(
        &st.dir,
        &st.dir.join("broken.raw"),
        "raw",
        &[
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", watch2.display()),
        ],
    );
    let mut watch = Qmp::connect(&watch2, Duration::from_secs(20)).unwrap();
    let hold_file = HoldStore::new(&st.vault, None).path_of(&st.target);
    let (hold_bytes, run_bytes) = (
        std::fs::read(&hold_file).unwrap(),
        std::fs::read(&run_file).unwrap(),
    );
    let (daemon, daemon_log) = st.daemon();
    wait_until("the daemon to refuse", || {
        std::fs::read_to_string(&daemon_log)
            .unwrap()
            .contains("not tried again until a run of it writes its run file anew")
    });
    // Parked: not tried again at the next looks.
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(coffre_nodes(&mut watch), Vec::<String>::new());
    let status = watch.execute("query-status", None).unwrap();
    assert_eq!(status["status"], "prelaunch", "the VM is not started");
    assert_eq!(
        std::fs::read(&hold_file).unwrap(),
        hold_bytes,
        "the hold stays as it was"
    );
    assert_eq!(
        std::fs::read(&run_file).unwrap(),
        run_bytes,
        "the run file stays as it was"
    );
    let (status, dlog) = stop_daemon(daemon, &daemon_log);
    assert!(status.success(), "{dlog}");
    assert!(!dlog.contains("resumed by the daemon: complete"), "{dlog}");
    assert_eq!(
        dlog.matches("QEMU has no device reading the target")
            .count(),
        1,
        "refused once: {dlog}"
    );
    assert_eq!(coffre_nodes(&mut watch), Vec::<String>::new());
}

/// SIGTERM mid-stream: coffre stops, saying how to resume. The export
/// then stays gone for longer than `--reconnect-delay`: the stream's read
/// fails and the job pauses (`on-error: stop`) instead of failing; the
/// resumed run resumes it and the target is the point.
#[test]
fn an_export_gone_past_the_reconnect_delay_pauses_the_job_and_resume_carries_on() {
    let Some(mut st) = Setup::new() else {
        return;
    };
    let began = Instant::now();
    let (mut first, log) = st.first_run(&["--reconnect-delay", "1"]);
    wait_until("a quarter streamed", || {
        st.job().is_some_and(|(_, o, l)| o >= l / 4)
    });
    // SAFETY: kill(2) of our own child.
    assert_eq!(
        unsafe { libc::kill(i32::try_from(first.0.id()).unwrap(), libc::SIGTERM) },
        0
    );
    let status = first.0.wait().unwrap();
    let first_log = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{first_log}");
    assert!(
        first_log.contains("interrupted")
            && first_log.contains("run the same command with --resume"),
        "{first_log}"
    );
    wait_until("the job paused on its read error", || {
        st.job().is_some_and(|(status, _, _)| status == "paused")
    });
    let paused = st.job().unwrap();
    assert!(paused.1 < paused.2, "{paused:?}");
    // A --resume that names no VM: the earlier run's file says which (of
    // this item only).
    let bare = |item: &str| {
        let mut a = live_args(s(&st.vault), &st.target);
        a[4] = item;
        a.push("--resume");
        coffre().args(a).output().unwrap()
    };
    let other = bare("other");
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{err}");
    assert!(
        err.contains("not of item other") && err.contains("--qmp"),
        "{err}"
    );
    // Nor from another tier than the earlier run's (its hold is there).
    let mut a = live_args(s(&st.vault), &st.target);
    a.extend(["--resume", "--from", "vault"]);
    let tier = coffre().args(a).output().unwrap();
    let err = String::from_utf8_lossy(&tier.stderr);
    assert!(!tier.status.success(), "{err}");
    assert!(err.contains("same --from"), "{err}");
    let out = bare("vm");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!(
            "resuming with QEMU monitor {}, device vda",
            st.vm.qmp.display()
        )),
        "{said}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "resume: {out:?}");
    assert!(stderr.contains("paused on a read error"), "{stderr}");
    assert_eq!(
        stderr.matches("paused on a read error").count(),
        1,
        "a pause is said once: {stderr}"
    );
    assert_eq!(st.job(), None, "the job is dismissed");
    assert_eq!(st.holds(), vec![], "the point is no longer held");
    let initial = st.initial.clone();
    st.quit_and_compare(&initial, "the point");
    println!(
        "live restore past the reconnect delay: paused at {paused:?}, resumed and complete; {:.1} s in all",
        began.elapsed().as_secs_f64()
    );
}

/// Once a live restore says the target needs coffre no more (its hold
/// released, the point free to expire), the target holds the point on
/// disk: QEMU killed right after, with the streamed clusters' qcow2
/// mappings still in its caches had coffre not made it write them out,
/// leaves a target equal to the point.
#[test]
fn a_completed_live_restore_survives_qemu_killed_at_once() {
    let Some(st) = Setup::completed() else {
        return;
    };
    let initial = st.initial.clone();
    st.kill_and_compare(&initial, "the point after QEMU was killed");
}

/// A `--resume` that finds the stream complete (the run that completed it
/// was killed before its hold went) checks the target against the point
/// its hold names: a hold it cannot read stays (the point is kept) and the
/// message says how to let it go; a readable one goes once the target
/// holds every block of the point.
#[test]
fn a_resume_after_the_stream_completed_checks_the_target_against_its_hold() {
    let Some(st) = Setup::completed() else {
        return;
    };
    // The hold as the completing run left it when killed at its end: for
    // another file first (the target replaced at its path), kept as it
    // is; then damaged; then this very file's.
    let point = points(&st.vault, "vm")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let holds = HoldStore::new(&st.vault, None);
    let hold = |file| HoldRecord {
        item: "vm".into(),
        point: point.clone(),
        tier: "snapshot".into(),
        target: st.target.clone(),
        started: jiff::Timestamp::now(),
        pid: 1,
        target_file: file,
    };
    let this = FileId::of(&st.target).unwrap();
    let other = FileId {
        ino: this.ino + 1,
        born: this.born,
    };
    holds.put(&hold(Some(other))).unwrap();
    let path = holds.path_of(&st.target);
    let theirs = std::fs::read(&path).unwrap();
    let resume = || coffre().args(st.live(&["--resume"])).output().unwrap();
    let out = resume();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("not the file the live restore") && err.contains("--abandon"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), theirs, "that hold stays");
    holds.put(&hold(Some(this))).unwrap();
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() - 4]).unwrap();
    let out = resume();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("hold cannot be read") && err.contains("--abandon"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap().len(),
        good.len() - 4,
        "the damaged hold stays"
    );
    std::fs::write(&path, &good).unwrap();
    let out = resume();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("had completed"), "{text}");
    assert_eq!(st.holds(), vec![], "the hold went");
    let initial = st.initial.clone();
    st.kill_and_compare(&initial, "the point, checked by the resume");
}

/// A device id QEMU does not know: coffre creates a virtio-blk-pci device
/// with the target as its drive, on the bus given (a q35 machine's free
/// `pcie-root-port`; without it the run fails and leaves nothing); no
/// speed limit.
#[test]
fn a_new_device_is_added_on_the_bus_given() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(t.path()).unwrap();
    let mut initial = vec![0u8; 8 << 20];
    Rng::new(0xadd).fill(&mut initial);
    let img = dir.join("point.raw");
    std::fs::write(&img, &initial).unwrap();
    let vault = new_vault(&dir, &[]);
    ok(&["backup", "--vault", s(&vault), "--item", "vm", s(&img)]);
    let other = dir.join("other.raw");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let watch_sock = dir.join("watch.sock");
    let vm = start_vm_as(
        &dir,
        &other,
        "raw",
        &[
            "-device".into(),
            "pcie-root-port,id=rp1,bus=pcie.0,chassis=1".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", watch_sock.display()),
        ],
    );
    let mut watch = Qmp::connect(&watch_sock, Duration::from_secs(20)).unwrap();
    let target = dir.join("new.qcow2");
    // The live restore of the point into `target` through monitor `qmp`,
    // to device `device`, then `extra`.
    let live = |qmp: &std::path::Path, device: &str, extra: &[&str]| -> Vec<String> {
        let mut a = live_args(s(&vault), &target);
        a.extend(["--qmp", s(qmp), "--device", device]);
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_string).collect()
    };
    fn strs(a: &[String]) -> Vec<&str> {
        a.iter().map(String::as_str).collect()
    }
    // A monitor that is not there: the run fails, and leaves no target.
    let gone = run(&strs(&live(&dir.join("nothing.sock"), "vdb", &[])));
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(!gone.status.success(), "{err}");
    assert!(err.contains("is the VM running"), "{err}");
    assert!(!target.exists(), "the target is removed: {err}");
    // A guest that runs keeps its disk (vda) in use: the restored disk is
    // not swapped under it, nothing is left, and the message says why.
    watch.execute("cont", None).unwrap();
    let running = run(&strs(&live(&vm.qmp, "vda", &[])));
    let err = String::from_utf8_lossy(&running.stderr);
    assert!(!running.status.success(), "{err}");
    assert!(
        err.contains("the VM is running") && err.contains("would corrupt"),
        "{err}"
    );
    assert!(!target.exists(), "the target is removed: {err}");
    assert_eq!(coffre_nodes(&mut watch), Vec::<String>::new());
    // Without --bus, q35's root bus refuses a hot-plug: the run fails
    // naming the way out, and leaves nothing (no target, no node), so the
    // same command with --bus simply runs.
    let refused = run(&strs(&live(&vm.qmp, "vdb", &[])));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("pcie-root-port"), "{err}");
    assert!(!target.exists(), "the target is removed: {err}");
    assert_eq!(coffre_nodes(&mut watch), Vec::<String>::new());
    assert!(
        HoldStore::new(&vault, None).list().unwrap().is_empty(),
        "a run that left no target holds no point"
    );
    let out = json(&strs(&live(&vm.qmp, "vdb", &["--bus", "rp1"])));
    assert_eq!(out["device"], "added", "{out}");
    assert!(HoldStore::new(&vault, None).list().unwrap().is_empty());
    // It runs already (continued above): nothing to start.
    assert_eq!(out["started_vm"], false, "{out}");
    assert_eq!(out["size"], json!(8 << 20), "{out}");
    let devices = watch.execute("query-block", None).unwrap();
    let vdb = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| {
            d["qdev"]
                .as_str()
                .is_some_and(|q| q.starts_with("/machine/peripheral/vdb"))
        })
        .unwrap_or_else(|| panic!("no device vdb: {devices}"));
    assert_eq!(vdb["inserted"]["file"], json!(s(&target)), "{vdb}");
    let _ = watch.execute("quit", None);
    drop(vm);
    let exp = dir.join("expected.raw");
    std::fs::write(&exp, &initial).unwrap();
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&target), s(&exp)]);
    assert!(cmp.status.success(), "{cmp:?}");
}

/// `stream::allocated` reads what a qcow2 file holds itself from
/// `qemu-img map`: nothing for a new one, the clusters written (merged),
/// not what its backing holds; a file qemu-img refuses is an error with
/// its message.
#[test]
fn a_targets_own_mapping_is_read_from_its_file() {
    use coffre_engine::snapshotter::vm::stream::allocated;
    if !tools_run(
        &["qemu-img", "qemu-io"],
        "allocated: qemu-img or qemu-io missing (apt-get install qemu-utils)",
    ) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.qcow2");
    let top = t.path().join("top.qcow2");
    assert!(
        qemu_img(&["create", "-f", "qcow2", s(&base), "4M"])
            .status
            .success()
    );
    let io = |file: &std::path::Path, cmd: &str| {
        let o = Command::new("qemu-io")
            .args(["-c", cmd, s(file)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    };
    io(&base, "write -P 7 0 1M");
    assert!(
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top)
        ])
        .status
        .success()
    );
    assert_eq!(allocated(&top).unwrap(), vec![]);
    io(&top, "write -P 9 1M 128k");
    io(&top, "write -P 9 1152k 64k");
    io(&top, "write -z 3M 64k");
    assert_eq!(
        allocated(&top).unwrap(),
        vec![(1 << 20, 192 << 10), (3 << 20, 64 << 10)]
    );
    let raw = t.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let e = allocated(&raw).unwrap_err().to_string();
    assert!(e.contains("qemu-img map") && e.contains("qcow2"), "{e}");
}
