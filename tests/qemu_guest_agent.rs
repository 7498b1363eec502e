//! The guest-agent freeze of `coffre backup --qmp --guest-agent`, against
//! a real QEMU and a fake agent (qemu-ga must not run on the host: it
//! would freeze the host's file systems): the guest is frozen around the
//! instant and thawed at once (the point holds every write before the
//! freeze and none after the thaw), the window is measured and the point
//! is file-system-consistent; a freeze that fails or times out, or an
//! agent that is missing or silent, leaves a crash-consistent point with a
//! warning and a thawed guest; a guest a killed run left frozen is thawed
//! by the next run; a SIGTERM during the freeze lands after the thaw; the
//! item's hooks run around the freeze and make the point
//! application-consistent. Skipped with a message where QEMU is missing.

use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coffre_engine::snapshotter::vm::live::QmpTarget;
use coffre_engine::snapshotter::vm::qmp::Qmp;
use serde_json::Value;

use crate::common::fake_agent::{Behaviour, FakeAgent};
use crate::common::qemu::*;
use crate::common::*;

const SIZE: usize = 16 << 20;

/// A VM over a raw disk of `SIZE` bytes (returned), with a second monitor
/// for the test.
fn vm(dir: &Path) -> (Vm, Qmp, Vec<u8>) {
    let disk = dir.join("disk.raw");
    let bytes: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 247) as u8 + 1).collect();
    std::fs::write(&disk, &bytes).unwrap();
    let (vm, q) = start_vm_watched(dir, &disk, "raw");
    (vm, q, bytes)
}

fn backup_args<'a>(vault: &'a Path, qmp: &'a Path, agent: &'a Path) -> Vec<&'a str> {
    live_backup_args(vault, qmp, "vda", &["--guest-agent", s(agent)])
}

/// `coffre backup --qmp … --guest-agent AGENT` of device `vda` as item
/// `vm`, which ends `status`; its JSON and how long it took.
fn backup(vault: &Path, qmp: &Path, agent: &Path, status: &str) -> (Value, Duration) {
    let start = Instant::now();
    let b = json(&backup_args(vault, qmp, agent));
    let took = start.elapsed();
    assert_eq!(b["job"]["status"], status, "{b}");
    (b, took)
}

fn warnings(b: &Value) -> String {
    b["job"]["stats"]["warnings"].to_string()
}

fn level(b: &Value) -> &str {
    assert_eq!(b["level"], b["job"]["stats"]["level"], "{b}");
    b["level"].as_str().unwrap()
}

/// The guest keeps writing through the device while it is not frozen (a
/// frozen file system lets no write through; a freeze waits for a write
/// under way). The point must hold every write before the freeze and none
/// after the thaw: QEMU's instant lies inside the freeze window.
#[test]
fn the_guest_is_frozen_around_the_instant_and_thawed_at_once() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let (vm, mut q, bytes) = vm(t.path());
    let agent = FakeAgent::start(
        &t.path().join("qga.sock"),
        Behaviour {
            thaw_delay: Duration::from_millis(200),
            ..Behaviour::default()
        },
    );
    let done = AtomicBool::new(false);
    // (freezes before it, pattern, offset, length) of each write.
    let writes = Mutex::new(Vec::<(u32, u8, usize, usize)>::new());
    let (b, took, mut q) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut k = 0usize;
            while !done.load(Ordering::SeqCst) {
                let pattern = (k % 250) as u8 + 3;
                let at = (k * 7 * 65536 + k % 3 * 4096) % (SIZE - 65536);
                let len = if k.is_multiple_of(2) { 4096 } else { 65536 };
                let wrote = agent.unless_frozen(|freezes| {
                    guest_write(&mut q, pattern, at, len);
                    writes.lock().unwrap().push((freezes, pattern, at, len));
                });
                if wrote.is_some() {
                    k += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            q
        });
        // Some writes before the backup starts.
        while writes.lock().unwrap().len() < 5 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (b, took) = backup(&vault, &vm.qmp, &agent.path, "Completed");
        done.store(true, Ordering::SeqCst);
        (b, took, writer.join().unwrap())
    });
    let st = agent.state();
    assert_eq!(st.commands(), ["sync", "status", "freeze", "thaw"], "{b}");
    assert!(!st.frozen, "the guest stays frozen");
    drop(st);
    assert_eq!(level(&b), "file-system-consistent", "{b}");
    let freeze_ms = b["job"]["stats"]["freeze_ms"].as_u64().unwrap();
    assert!(
        (200..5000).contains(&freeze_ms),
        "frozen for {freeze_ms} ms with a thaw of 200 ms"
    );
    let writes = writes.into_inner().unwrap();
    let before = writes.iter().filter(|w| w.0 == 0).count();
    let after = writes.len() - before;
    assert!(before >= 5, "{before} writes before the freeze");
    assert!(
        after > 0,
        "no write after the thaw: the test proves nothing"
    );
    let mut model = bytes;
    for &(_, pattern, at, len) in writes.iter().filter(|w| w.0 == 0) {
        model[at..at + len].fill(pattern);
    }
    restores_to(&vault, t.path(), None, &model);
    assert_eq!(coffre_nodes(&mut q), Vec::<String>::new());
    eprintln!(
        "freeze around the instant: backup {took:?}, frozen {freeze_ms} ms, {before} writes before, {after} after"
    );
}

/// The agent refuses the freeze: the point is crash-consistent, a warning
/// names the failure, the agent is told to thaw (in case it froze some),
/// and nothing waits on a timeout.
#[test]
fn a_failed_freeze_thaws_and_leaves_a_crash_consistent_point() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let (vm, _q, bytes) = vm(t.path());
    let agent = FakeAgent::start(
        &t.path().join("qga.sock"),
        Behaviour {
            fail_freeze: true,
            ..Behaviour::default()
        },
    );
    let (b, took) = backup(&vault, &vm.qmp, &agent.path, "CompletedWithWarnings");
    assert_eq!(level(&b), "crash-consistent", "{b}");
    let w = warnings(&b);
    assert!(w.contains("could not be frozen"), "{w}");
    assert!(w.contains("failed to freeze /srv"), "{w}");
    assert!(!w.contains("may still be frozen"), "{w}");
    assert!(b["job"]["stats"]["freeze_ms"].is_null(), "{b}");
    let st = agent.state();
    let cmds = st.commands();
    let freeze = cmds.iter().position(|c| c == "freeze").unwrap();
    assert!(cmds[freeze..].contains(&"thaw".to_string()), "{cmds:?}");
    assert!(!st.frozen);
    drop(st);
    assert!(took < Duration::from_secs(8), "took {took:?}");
    restores_to(&vault, t.path(), None, &bytes);
    eprintln!("a failed freeze: backup {took:?}");
}

/// No agent at the socket, then one that never answers: the backup goes
/// on without a freeze, crash-consistent, with a warning (the silent one
/// costs the agent timeout, 10 s).
#[test]
fn a_missing_or_silent_agent_leaves_a_crash_consistent_point() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let (vm, _q, bytes) = vm(t.path());
    let missing = t.path().join("no-agent.sock");
    let (b, took) = backup(&vault, &vm.qmp, &missing, "CompletedWithWarnings");
    assert_eq!(level(&b), "crash-consistent", "{b}");
    let w = warnings(&b);
    assert!(w.contains("no file-system freeze"), "{w}");
    assert!(w.contains("no-agent.sock"), "{w}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    restores_to(&vault, t.path(), None, &bytes);

    let agent = FakeAgent::start(
        &t.path().join("qga.sock"),
        Behaviour {
            silent: true,
            ..Behaviour::default()
        },
    );
    let (b, took_silent) = backup(&vault, &vm.qmp, &agent.path, "CompletedWithWarnings");
    assert_eq!(level(&b), "crash-consistent", "{b}");
    let w = warnings(&b);
    assert!(w.contains("no file-system freeze"), "{w}");
    assert_eq!(agent.state().commands(), ["sync"], "{b}");
    assert!(
        took_silent < Duration::from_secs(20),
        "took {took_silent:?}"
    );
    eprintln!("no agent: backup {took:?}; a silent agent: {took_silent:?}");
}

/// A freeze that outlasts the agent timeout: the backup gives up on it,
/// the guest is thawed (not left frozen), the point is crash-consistent.
#[test]
fn a_freeze_that_times_out_is_thawed() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let (vm, _q, _bytes) = vm(t.path());
    let agent = FakeAgent::start(
        &t.path().join("qga.sock"),
        Behaviour {
            freeze_delay: Duration::from_millis(10_500),
            ..Behaviour::default()
        },
    );
    let (b, took) = backup(&vault, &vm.qmp, &agent.path, "CompletedWithWarnings");
    assert_eq!(level(&b), "crash-consistent", "{b}");
    let w = warnings(&b);
    assert!(w.contains("could not be frozen"), "{w}");
    assert!(!w.contains("may still be frozen"), "{w}");
    let st = agent.state();
    assert!(!st.frozen, "left frozen: {:?}", st.commands());
    let cmds = st.commands();
    let freeze = cmds.iter().position(|c| c == "freeze").unwrap();
    assert!(cmds[freeze..].contains(&"thaw".to_string()), "{cmds:?}");
    drop(st);
    assert!(took < Duration::from_secs(16), "took {took:?}");
    eprintln!("a freeze that times out: backup {took:?}");
}

/// coffre is SIGKILLed while the guest is frozen (its freeze under way):
/// the guest stays frozen until the next run, which thaws it, says so,
/// and takes its own file-system-consistent point.
#[test]
fn a_guest_a_killed_run_left_frozen_is_thawed_by_the_next() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let (vm, mut q, bytes) = vm(t.path());
    let agent = FakeAgent::start(
        &t.path().join("qga.sock"),
        Behaviour {
            freeze_delay: Duration::from_secs(30),
            ..Behaviour::default()
        },
    );
    let mut child = coffre()
        .args(backup_args(&vault, &vm.qmp, &agent.path))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    agent.wait_for("a freeze", Duration::from_secs(30), |a| a.frozen);
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(agent.state().frozen, "the kill left the guest frozen");
    // The dead run's freeze ends (its answer goes nowhere).
    agent.set(|b| b.freeze_delay = Duration::ZERO);
    let killed = agent.state().log.len();

    let (b, took) = backup(&vault, &vm.qmp, &agent.path, "CompletedWithWarnings");
    let w = warnings(&b);
    assert!(w.contains("were left frozen"), "{w}");
    assert_eq!(level(&b), "file-system-consistent", "{b}");
    assert!(b["job"]["stats"]["freeze_ms"].as_u64().is_some(), "{b}");
    let st = agent.state();
    assert_eq!(
        st.commands()[killed..],
        ["sync", "status", "thaw", "freeze", "thaw"],
        "{b}"
    );
    assert!(!st.frozen);
    drop(st);
    assert_eq!(coffre_nodes(&mut q), Vec::<String>::new());
    restores_to(&vault, t.path(), None, &bytes);
    eprintln!("the run after a kill: backup {took:?}");
}

/// SIGTERM while the guest is frozen: the thaw comes first, then the
/// signal ends coffre; the guest is not left frozen.
#[test]
fn a_sigterm_during_the_freeze_lands_after_the_thaw() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let (vm, _q, _bytes) = vm(t.path());
    let agent = FakeAgent::start(
        &t.path().join("qga.sock"),
        Behaviour {
            freeze_delay: Duration::from_millis(1500),
            ..Behaviour::default()
        },
    );
    let mut child = coffre()
        .args(backup_args(&vault, &vm.qmp, &agent.path))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    agent.wait_for("a freeze", Duration::from_secs(30), |a| a.frozen);
    // SAFETY: a signal to the child this test started and has not reaped.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = child.wait().unwrap();
    let st = agent.state();
    assert!(
        !st.frozen,
        "SIGTERM left the guest frozen ({status:?}): {:?}",
        st.commands()
    );
    assert_eq!(st.commands(), ["sync", "status", "freeze", "thaw"]);
    drop(st);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
}

/// The item's hooks run around the freeze (pre before it, post after the
/// thaw) and the point is application-consistent.
#[test]
fn hooks_run_around_the_freeze_and_make_the_point_application_consistent() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let (vm, _q, bytes) = vm(t.path());
    let agent = FakeAgent::start(
        &t.path().join("qga.sock"),
        Behaviour {
            thaw_delay: Duration::from_millis(200),
            ..Behaviour::default()
        },
    );
    let log = t.path().join("hooks.log");
    let hook = |phase: &str| format!("sh -c 'echo {phase} $(date +%s%N) >> {}'", log.display());
    let source = QmpTarget {
        socket: vm.qmp.clone(),
        drive: "vda".into(),
        agent: Some(agent.path.clone()),
        fleece: None,
    }
    .source();
    ok(&[
        "protect",
        "--vault",
        s(&vault),
        "--item",
        "vm",
        "--policy",
        "DefaultPolicy",
        "--pre-snapshot",
        &hook("pre"),
        "--post-snapshot",
        &hook("post"),
        &source,
    ]);
    let (b, took) = backup(&vault, &vm.qmp, &agent.path, "Completed");
    assert_eq!(level(&b), "application-consistent", "{b}");
    assert!(
        b["job"]["stats"]["freeze_ms"].as_u64().unwrap() >= 200,
        "{b}"
    );
    let times: Vec<(String, u128)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let (p, t) = l.split_once(' ').unwrap();
            (p.to_string(), t.parse().unwrap())
        })
        .collect();
    assert_eq!(times.len(), 2, "{times:?}");
    assert_eq!((times[0].0.as_str(), times[1].0.as_str()), ("pre", "post"));
    let st = agent.state();
    assert_eq!(st.commands(), ["sync", "status", "freeze", "thaw"]);
    let (freeze, thaw) = (st.at("freeze", 0).unwrap(), st.at("thaw", 0).unwrap());
    assert!(times[0].1 < freeze, "pre hook after the freeze");
    // The thaw takes 200 ms: the post hook runs after it ended.
    assert!(
        times[1].1 >= thaw + 200_000_000,
        "post hook before the thaw ended"
    );
    assert!(!st.frozen);
    drop(st);
    restores_to(&vault, t.path(), None, &bytes);
    // The table output shows the window and the level.
    let table = ok(&backup_args(&vault, &vm.qmp, &agent.path));
    let line = table
        .lines()
        .find(|l| l.starts_with("guest frozen for "))
        .unwrap_or_else(|| panic!("no freeze window shown:\n{table}"));
    assert!(line.ends_with(" ms (application-consistent)"), "{line}");
    eprintln!("hooks around the freeze: backup {took:?}; table: {line}");
}
