//! Power loss, failed fsyncs, short writes and a full disk, injected
//! through the storage seam (`FaultStore`) under real backups of a vault
//! with an LRS replica. The checks after each fault use the real binary:
//! the vault verifies with `--read-data`, and every acknowledged point
//! restores byte-identical from the vault.
//!
//! Power loss drops every byte the copies had not made durable, on every
//! copy at once (one machine), at a seeded random operation.
//! `COFFRE_POWER_RUNS` (default 20) runs from `COFFRE_POWER_SEED`
//! (default 1); each prints its seed.

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
        if role == coffre_engine::store::catalog_files::Role::Replica {
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
    let vault = new_vault(t, &["--replica", s(&t.join("replica"))]);
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
    let runs = std::env::var("COFFRE_POWER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20u64);
    let base = std::env::var("COFFRE_POWER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64);
    let (mut losses, mut survived) = (0, 0);
    for seed in base..base + runs {
        let t = tempfile::tempdir().unwrap();
        let (vault, img, clock) = setup(t.path(), seed);
        let mut rng = Rng::new(seed);
        // A first backup without faults counts the storage operations a
        // backup makes, so that the power goes out somewhere inside one.
        let faults = Faults::default();
        let v = open(&vault, Some(wrap_all(&faults)));
        let id = backup_once(&v, &img, &clock).unwrap();
        let per_backup = faults.ops();
        drop(v);
        let mut acked = vec![(id, keep(t.path(), &img, 0))];
        for round in 1..4 {
            churn(&img, 16, 40_000, seed * 10 + round);
            let faults = Faults::default();
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
                        "power_loss: seed {seed}: power lost at operation {at} of {per_backup}"
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
