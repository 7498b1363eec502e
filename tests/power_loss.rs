//! Power loss, failed fsyncs, short writes and a full disk, injected
//! through the storage seam (`FaultStore`) under real backups of a vault
//! with an LRS replica, and of a vault alone, whose backups link their
//! snapshot's pack in as a segment (`Store::link`). The checks after each fault use the real binary:
//! the vault verifies with `--read-data`, and every acknowledged point
//! restores byte-identical from the vault.
//!
//! Power loss drops every byte the copies had not made durable, on every
//! copy at once (one machine), at a seeded random operation, and tears
//! the operation it hits (a `put` left old or new, a `delete`, `truncate`
//! or `punch` done or not, a `write_at` with some of its sectors, a sync
//! with or without its directory entry; see `FaultStore`).
//! `COFFRE_POWER_RUNS` (default 20; 10 for the vault alone) backup runs from `COFFRE_POWER_SEED`
//! (default 1); each prints its seed. The other commands that write
//! (prune, gc, `verify --repair`, and the recovering open itself) lose
//! power at a few sampled operations each, or with `COFFRE_POWER_EVERY=1`
//! (`make crash-test`) at every one of their operations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use coffre_engine::store::copies::StoreWrap;
use coffre_engine::store::store::{FaultStore, Faults};
use coffre_engine::store::{Access, OpenOptions, StoreError, Vault};
use coffre_engine::{BackupOptions, EngineError, FileImage, ManualClock, NoProgress, backup};

use crate::common::*;

fn wrap_all(faults: &Faults) -> StoreWrap {
    let f = faults.clone();
    Arc::new(move |_role, inner| Arc::new(FaultStore::new(inner, f.clone())))
}

fn wrap_replicas(faults: &Faults) -> StoreWrap {
    let f = faults.clone();
    Arc::new(move |role, inner| {
        if role == coffre_engine::store::format::catalog_files::Role::Replica {
            Arc::new(FaultStore::new(inner, f.clone()))
        } else {
            inner
        }
    })
}

fn open(vault: &Path, wrap: Option<StoreWrap>) -> Vault {
    Vault::open_with(
        vault,
        Access::Write,
        &OpenOptions {
            wrap,
            // Another test thread forking a `coffre` child at the moment
            // this one drops its vault can hold the lock's flock for the
            // instant before the child's exec closes it: wait that out.
            wait: std::time::Duration::from_secs(10),
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("cannot open {}: {e}", vault.display()))
}

fn backup_once(vault: &Vault, img: &Path, clock: &ManualClock) -> coffre_engine::Result<String> {
    clock.advance(jiff::SignedDuration::from_secs(60));
    let src = FileImage::open(img).unwrap();
    backup(
        vault,
        &src,
        &BackupOptions::new("vm", img),
        clock,
        &NoProgress,
    )
    .map(|o| o.point.id)
}

/// The vault verifies and each `(point, image)` restores identically.
fn check(vault: &Path, acked: &[(String, PathBuf)], seed: u64) {
    let out = run(&["verify", "--vault", s(vault), "--read-data"]);
    assert!(
        out.status.success(),
        "seed {seed}: verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = vault.parent().unwrap().join("restored.img");
    for (id, want) in acked {
        let mut a = restore_args(vault, "vm", Some(id), &restored, true);
        a.extend(["--from", "vault"]);
        let out = run(&a);
        assert!(
            out.status.success(),
            "seed {seed}: acknowledged point {id} does not restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same(&restored, want);
    }
}

fn setup(t: &Path, seed: u64) -> (PathBuf, PathBuf, ManualClock) {
    setup_with(t, seed, true)
}

/// A vault (with an LRS replica, or alone: then a backup adopts its
/// snapshot's pack as a segment) and an image.
fn setup_with(t: &Path, seed: u64, replica: bool) -> (PathBuf, PathBuf, ManualClock) {
    let replica_dir = t.join("replica");
    let args: Vec<&str> = if replica {
        vec!["--replica", s(&replica_dir)]
    } else {
        Vec::new()
    };
    let vault = new_vault(t, &args);
    let img = t.join("vm.img");
    mixed_image(&img, 4 << 20, seed);
    let clock = ManualClock::new("2027-01-01T00:00:00Z".parse().unwrap());
    (vault, img, clock)
}

fn keep(t: &Path, img: &Path, n: usize) -> PathBuf {
    let p = t.join(format!("acked-{n}.img"));
    std::fs::copy(img, &p).unwrap();
    p
}

#[test]
fn power_loss_at_random_moments_loses_no_acknowledged_point() {
    let runs = env_u64("COFFRE_POWER_RUNS", 20);
    power_loss_rounds(runs, true);
}

/// The same on a vault without replicas, where each backup links its
/// snapshot's pack into the vault (`Store::link`): power goes at the link
/// too, and an uncommitted link never costs an acknowledged point.
#[test]
fn power_loss_while_a_pack_is_adopted_loses_no_acknowledged_point() {
    let runs = env_u64("COFFRE_POWER_RUNS", 10);
    power_loss_rounds(runs, false);
}

/// A number from the environment variable `name`, else `default`.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `runs` seeds of three backups each, power lost at a random operation
/// of each backup after the first; the vault verifies and every
/// acknowledged point restores after each.
fn power_loss_rounds(runs: u64, replica: bool) {
    let base = env_u64("COFFRE_POWER_SEED", 1);
    let (mut losses, mut survived) = (0, 0);
    for seed in base..base + runs {
        let t = tempfile::tempdir().unwrap();
        let (vault, img, clock) = setup_with(t.path(), seed, replica);
        let mut rng = Rng::new(seed);
        // A first backup without faults counts the storage operations a
        // backup makes, so that the power goes out somewhere inside one.
        let faults = Faults::default();
        let v = open(&vault, Some(wrap_all(&faults)));
        let id = backup_once(&v, &img, &clock).unwrap();
        let per_backup = faults.ops();
        drop(v);
        assert_eq!(
            adopted_segments(&vault) > 0,
            !replica,
            "seed {seed}: a vault alone adopts its pack, one with a replica copies"
        );
        let mut acked = vec![(id, keep(t.path(), &img, 0))];
        for round in 1..4 {
            churn(&img, 16, 40_000, seed * 10 + round);
            let faults = Faults::default();
            faults.seed(seed * 100 + round);
            let v = open(&vault, Some(wrap_all(&faults)));
            let at = 1 + rng.below(per_backup);
            faults.power_loss_at(at);
            match backup_once(&v, &img, &clock) {
                Ok(id) => {
                    assert!(
                        !faults.is_off(),
                        "seed {seed}: acknowledged after power loss"
                    );
                    survived += 1;
                    acked.push((id, keep(t.path(), &img, round as usize)));
                }
                Err(e) => {
                    assert!(
                        faults.is_off(),
                        "seed {seed}: backup failed without a fault: {e}"
                    );
                    losses += 1;
                    eprintln!(
                        "power_loss: seed {seed}: power lost at operation {at} of {per_backup} ({})",
                        faults.torn().unwrap_or_default()
                    );
                }
            }
            drop(v);
            // The machine comes back: the next writer cleans up, and every
            // acknowledged point is there.
            drop(open(&vault, None));
            check(&vault, &acked, seed);
        }
    }
    eprintln!(
        "power_loss: {runs} runs: {losses} power losses mid-backup, {survived} backups completed first, 0 acknowledged points lost"
    );
    assert!(
        losses * 2 >= runs,
        "too few power losses landed inside a backup: {losses}"
    );
}

/// A vault with one acknowledged point, and the image changed since.
/// Segments of the vault that are adopted packs (a pack header).
fn adopted_segments(vault: &Path) -> usize {
    std::fs::read_dir(vault.join("segments"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path()).is_ok_and(|b| b.starts_with(b"CFPACK")))
        .count()
}

fn one_point(t: &Path, seed: u64) -> (PathBuf, PathBuf, ManualClock, Vec<(String, PathBuf)>) {
    let (vault, img, clock) = setup(t, seed);
    let v = open(&vault, None);
    let first = backup_once(&v, &img, &clock).unwrap();
    drop(v);
    let acked = vec![(first, keep(t, &img, 0))];
    churn(&img, 16, 40_000, seed * 11);
    (vault, img, clock, acked)
}

fn poisoned(e: &EngineError) -> bool {
    matches!(e, EngineError::Store(StoreError::Poisoned { .. }))
}

#[test]
fn a_failed_fsync_on_a_replica_fails_the_backup_and_refuses_writes_until_reopened() {
    let t = tempfile::tempdir().unwrap();
    let (vault, img, clock, acked) = one_point(t.path(), 3);
    let faults = Faults::default();
    let v = open(&vault, Some(wrap_replicas(&faults)));
    faults.fail_sync_at(1);
    let err = backup_once(&v, &img, &clock).unwrap_err();
    assert_eq!(faults.failed_syncs(), 1);
    assert!(err.to_string().contains("fsync"), "{err}");
    assert!(v.is_poisoned());
    // fsyncgate: the kernel may have dropped the dirty pages, so a retry
    // on this handle must not believe a second fsync.
    let again = backup_once(&v, &img, &clock).unwrap_err();
    assert!(poisoned(&again), "expected a refusal, got {again}");
    assert!(again.to_string().contains("reopen"), "{again}");
    drop(v);
    check(&vault, &acked, 3);

    // Reopened, the vault takes the backup.
    let v = open(&vault, None);
    let id = backup_once(&v, &img, &clock).unwrap();
    drop(v);
    let mut acked = acked;
    acked.push((id, keep(t.path(), &img, 1)));
    check(&vault, &acked, 3);
}

#[test]
fn short_writes_and_a_full_replica_fail_cleanly_and_lose_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (vault, img, clock, acked) = one_point(t.path(), 4);
    let faults = Faults::default();
    let v = open(&vault, Some(wrap_replicas(&faults)));
    faults.short_write_at(2);
    let err = backup_once(&v, &img, &clock).unwrap_err();
    assert!(err.to_string().contains("short write"), "{err}");
    drop(v);
    check(&vault, &acked, 4);

    let faults = Faults::default();
    let v = open(&vault, Some(wrap_replicas(&faults)));
    faults.space_left(Some(100_000));
    let err = backup_once(&v, &img, &clock).unwrap_err();
    assert!(err.is_no_space(), "expected ENOSPC, got {err}");
    drop(v);
    check(&vault, &acked, 4);
    // No bytes of the failed sessions stay behind on any copy.
    let show = json(&["vault", "show", "--vault", s(&vault)]);
    assert_eq!(
        show["stored_bytes"].as_u64().unwrap(),
        segment_bytes(&vault),
        "{show}"
    );
    assert_eq!(
        segment_bytes(&vault),
        segment_bytes(&t.path().join("replica")),
        "the copies differ in size after the failures"
    );
}

/// The commands besides backup that write to a vault's copies, run through
/// the library on a vault whose copies are all behind one `FaultStore`.
#[derive(Clone, Copy, Debug)]
enum Cmd {
    /// Prune at February 1: the January points' manifests go.
    Prune,
    /// GC after that prune: segments deleted, rewritten, punched.
    Gc,
    /// `verify --read-data --repair` with a bad chunk on the replica and
    /// a replica's point manifest gone: `write_at` and `put`.
    Repair,
    /// The open that recovers from an interrupted backup (reclaim of the
    /// uncommitted tails on every copy: `truncate`, `delete`).
    Reopen,
}

fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Runs `cmd` on the vault, its copies wrapped with `faults`.
fn run_cmd(cmd: Cmd, vault: &Path, faults: &Faults) -> Result<(), String> {
    let opened = Vault::open_with(
        vault,
        if matches!(cmd, Cmd::Repair) {
            Access::ReadOnly
        } else {
            Access::Write
        },
        &OpenOptions {
            wrap: Some(wrap_all(faults)),
            wait: std::time::Duration::from_secs(10),
            ..OpenOptions::default()
        },
    );
    let v = match opened {
        Ok(v) => v,
        Err(e) => return Err(e.to_string()),
    };
    let r = match cmd {
        Cmd::Prune => coffre_engine::prune::prune(
            &v,
            &coffre_engine::registry::Registry::disabled(),
            "2027-02-01T00:00:00Z".parse().unwrap(),
            false,
        )
        .map(|_| ())
        .map_err(|e| e.to_string()),
        Cmd::Gc => coffre_engine::store::maintenance::gc::run(&v)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Cmd::Repair => coffre_engine::verify(
            &v,
            &coffre_engine::VerifyOptions {
                read_data: true,
                repair: true,
                threads: 1,
            },
            &NoProgress,
        )
        .map(|_| ())
        .map_err(|e| e.to_string()),
        Cmd::Reopen => Ok(()),
    };
    drop(v);
    r
}

/// A vault with an LRS replica and three points (the first and third
/// expire in January), in `work`, and what each must restore to.
fn template(work: &Path, seed: u64) -> (PathBuf, Vec<(String, PathBuf, bool)>) {
    std::fs::create_dir_all(work).unwrap();
    let (vault, img, _clock) = setup(work, seed);
    let mut acked = Vec::new();
    for i in 0..3u64 {
        if i > 0 {
            churn(&img, 16, 40_000, seed * 10 + i);
        }
        let expires = i % 2 == 0;
        let out = ok_at(
            &format!("2027-01-01T0{i}:00:00Z"),
            &[
                "--output",
                "json",
                "backup",
                "--vault",
                s(&vault),
                "--item",
                "vm",
                "--retain-until",
                if expires { "2027-01-10" } else { "2099-01-01" },
                s(&img),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let id = v["id"].as_str().unwrap().to_string();
        let keep = work.parent().unwrap().join(format!("acked-{seed}-{i}.img"));
        std::fs::copy(&img, &keep).unwrap();
        acked.push((id, keep, expires));
    }
    (vault, acked)
}

/// Makes the work tree ready for `cmd` (from the template's state).
fn prepare(cmd: Cmd, work: &Path, vault: &Path, seed: u64) {
    match cmd {
        Cmd::Prune | Cmd::Reopen => {}
        Cmd::Gc => run_cmd(Cmd::Prune, vault, &Faults::default()).unwrap(),
        Cmd::Repair => {
            let replica = work.join("replica");
            let seg = segment_files(&replica).into_iter().last().unwrap();
            let len = std::fs::metadata(&seg).unwrap().len();
            let at = 4096 + Rng::new(seed).below(len - 8192);
            let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(&[0xa5; 3], at).unwrap();
            let points = replica.join("points/vm");
            let first = std::fs::read_dir(&points).unwrap().next().unwrap().unwrap();
            std::fs::remove_file(first.path()).unwrap();
        }
    }
    if let Cmd::Reopen = cmd {
        // An interrupted backup: power lost in the middle of its transfer
        // leaves uncommitted tails (and maybe new segments) on every copy.
        let img = work.join("vm.img");
        churn(&img, 32, 40_000, seed ^ 0xdead);
        let faults = Faults::default();
        faults.seed(seed);
        let v = open(vault, Some(wrap_all(&faults)));
        faults.power_loss_at(40);
        let clock = ManualClock::new("2027-01-01T12:00:00Z".parse().unwrap());
        let _ = backup_once(&v, &img, &clock);
        drop(v);
    }
}

/// Power lost at sampled operations (every one with
/// `COFFRE_POWER_EVERY=1`) of prune, gc, `verify --repair` and the
/// recovering open: each time the vault, reopened, verifies and every
/// acknowledged point restores.
#[test]
fn power_loss_in_every_command_that_writes_loses_no_acknowledged_point() {
    let every = std::env::var("COFFRE_POWER_EVERY").is_ok_and(|v| v == "1");
    let seed = env_u64("COFFRE_POWER_SEED", 1);
    let t = tempfile::tempdir().unwrap();
    let work = t.path().join("work");
    let saved = t.path().join("template");
    let (vault, acked) = template(&work, seed);
    copy_tree(&work, &saved);
    let mut rng = Rng::new(seed);
    let started = std::time::Instant::now();
    let mut table = Vec::new();
    for cmd in [Cmd::Prune, Cmd::Gc, Cmd::Repair, Cmd::Reopen] {
        // A run without power loss counts the operations.
        copy_tree(&saved, &work);
        prepare(cmd, &work, &vault, seed);
        let faults = Faults::default();
        run_cmd(cmd, &vault, &faults).unwrap_or_else(|e| panic!("{cmd:?} without faults: {e}"));
        let total = faults.ops();
        assert!(total > 0, "{cmd:?} made no storage operation");
        // Every operation, or a few of those that change a file (where a
        // power loss tears something).
        let mut changes = faults.changing_ops();
        if changes.is_empty() {
            // (The recovering open changes files outside the seam, or
            // found nothing to clean: every operation then.)
            changes = (1..=total).collect();
        }
        let points: Vec<u64> = if every {
            (1..=total).collect()
        } else {
            (0..3)
                .map(|_| changes[rng.below(changes.len() as u64) as usize])
                .collect()
        };
        let mut torn = std::collections::BTreeMap::<String, u64>::new();
        for &n in &points {
            copy_tree(&saved, &work);
            prepare(cmd, &work, &vault, seed);
            let faults = Faults::default();
            faults.seed(seed ^ (n << 8));
            faults.power_loss_at(n);
            let r = run_cmd(cmd, &vault, &faults);
            let what = faults.torn().unwrap_or_default();
            let kind = what
                .split(": ")
                .nth(1)
                .unwrap_or("finished first")
                .split(' ')
                .next()
                .unwrap_or("")
                .to_string();
            *torn.entry(kind).or_default() += 1;
            // (A command may finish despite the loss: verify reports what
            // it could not read as findings, prune leaves a manifest it
            // could not remove to the next writer.)
            assert!(
                r.is_ok() || faults.is_off(),
                "{cmd:?} failed without a fault: {r:?}"
            );
            // The machine comes back: the next writer cleans up.
            drop(open(&vault, None));
            let want: Vec<(String, PathBuf)> = acked
                .iter()
                .filter(|(_, _, expires)| !(*expires && matches!(cmd, Cmd::Prune | Cmd::Gc)))
                .map(|(id, img, _)| (id.clone(), img.clone()))
                .collect();
            if matches!(cmd, Cmd::Repair) {
                // What the interrupted repair did not fix, a new one does.
                run_cmd(Cmd::Repair, &vault, &Faults::default()).unwrap();
            }
            eprintln!("power_loss: {cmd:?} at operation {n} of {total}: {what}");
            check(&vault, &want, n);
        }
        table.push(format!(
            "{cmd:?}: power lost at {} of its {total} operations ({} change a file); torn: {torn:?}",
            points.len(),
            changes.len()
        ));
    }
    eprintln!(
        "power_loss: in {:.0} s, 0 acknowledged points lost:\n  {}",
        started.elapsed().as_secs_f64(),
        table.join("\n  ")
    );
}
