//! Every file and directory the library creates for a vault is private
//! (0600 and 0700) by its own explicit mode, not by the umask: the
//! `coffre` binary sets umask 077, which would hide a path that forgets
//! its mode. This test binary runs the library itself under umask 022
//! (its own process, so no other test sees the change): a vault with an
//! LRS replica and a GRS secondary, two backup jobs with their snapshot
//! area, replication, GC and an index rebuild. RocksDB's own files inside
//! the 0700 `index` directory are left to that directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use coffre_engine::backup::PointTerms;
use coffre_engine::backup_job::{JobOptions, Writer, run_backup_job};
use coffre_engine::store::{Access, OpenOptions, Vault};
use coffre_engine::vault_ops::{CreateOptions, create_vault};
use coffre_engine::{BackupOptions, FileImage, ManualClock, NoProgress};

/// Every path below `dir` (itself included) whose mode is not exactly
/// 0700 (directories) or 0600 (files), skipping what is inside an
/// `index` directory (RocksDB's).
fn not_private(dir: &Path, bad: &mut Vec<String>, seen: &mut usize) {
    let m = std::fs::symlink_metadata(dir).unwrap();
    *seen += 1;
    let mode = m.permissions().mode() & 0o777;
    let want = if m.is_dir() { 0o700 } else { 0o600 };
    if mode != want {
        bad.push(format!("{} {mode:o}", dir.display()));
    }
    if m.is_dir() && dir.file_name().is_none_or(|n| n != "index") {
        for e in std::fs::read_dir(dir).unwrap() {
            not_private(&e.unwrap().path(), bad, seen);
        }
    }
}

fn write_image(path: &Path, seed: u8) {
    let bytes: Vec<u8> = (0..(4u32 << 20))
        .map(|i| {
            if (i >> 16) % 3 == 0 {
                0
            } else {
                (i.wrapping_mul(31) as u8) ^ seed
            }
        })
        .collect();
    std::fs::write(path, bytes).unwrap();
}

fn backup(vault_dir: &Path, img: &Path, area: &Path, clock: &ManualClock) {
    let source = FileImage::open(img).unwrap();
    let mut backup = BackupOptions::new("vm", img);
    backup.threads = 1;
    backup.snapshot_root = Some(area.to_path_buf());
    let outcome = run_backup_job(
        vault_dir,
        &source,
        JobOptions {
            backup,
            terms: PointTerms {
                scheduled: false,
                retain_until: Some("2030-01-01T00:00:00Z".parse().unwrap()),
                job: None,
            },
            writer: Writer::Open(OpenOptions::default()),
            stop: &|| false,
            labels: Default::default(),
        },
        clock,
        &NoProgress,
        &NoProgress,
    )
    .unwrap();
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert!(outcome.point.is_some(), "{:?}", outcome.job);
}

#[test]
fn the_library_makes_every_vault_path_private_under_umask_022() {
    // SAFETY: umask only sets this process's file-creation mask; this
    // test binary holds this one test.
    unsafe {
        libc::umask(0o022);
    }
    let t = tempfile::tempdir().unwrap();
    let vault_dir = t.path().join("vault");
    let replica = t.path().join("replica");
    let secondary = t.path().join("secondary");
    let area = t.path().join("snapshots");
    let img = t.path().join("disk.img");
    let clock = ManualClock::new("2027-01-01T00:00:00Z".parse().unwrap());
    create_vault(
        &vault_dir,
        &CreateOptions {
            replicas: vec![replica.clone()],
            secondary: Some(secondary.clone()),
            ..CreateOptions::default()
        },
        &clock,
    )
    .unwrap();
    write_image(&img, 1);
    backup(&vault_dir, &img, &area, &clock);
    write_image(&img, 2);
    backup(&vault_dir, &img, &area, &clock);
    {
        let vault = Vault::open(&vault_dir, Access::Write).unwrap();
        let now = || clock_now();
        coffre_engine::store::maintenance::replicate::replicate(&vault, &now, &|| false).unwrap();
        coffre_engine::store::maintenance::gc::run(&vault).unwrap();
    }
    drop(
        coffre_engine::store::maintenance::rebuild::rebuild_index(
            &vault_dir,
            &replica,
            Default::default(),
        )
        .unwrap(),
    );

    for dir in [&vault_dir, &replica, &secondary, &area] {
        let (mut bad, mut seen) = (Vec::new(), 0);
        not_private(dir, &mut bad, &mut seen);
        assert!(seen > 3, "only {seen} paths in {}", dir.display());
        assert!(bad.is_empty(), "not private under umask 022: {bad:#?}");
    }
}

fn clock_now() -> jiff::Timestamp {
    "2027-01-01T01:00:00Z".parse().unwrap()
}
