//! A full backup through QEMU's fleecing export reads the same bytes as
//! the disk file: the NBD client reuses its window buffers (a window's
//! holes must read as zeros, never as an earlier window's data) and
//! splits each window into pipelined read requests, so the disk is laid out
//! to catch what a reused buffer or a split could get wrong: data that
//! crosses a window boundary and a request boundary, a hole where the
//! window two before (the same buffer) had data, and a tail shorter than
//! a window. The point backed up through QEMU has the same block map as
//! the one backed up from the file, and restores to the disk. Skipped
//! with a message where `qemu-system-x86_64` is missing.

use std::os::unix::fs::FileExt;

use crate::common::qemu::*;
use crate::common::*;

const MIB: u64 = 1 << 20;
/// The capture's window.
const WINDOW: u64 = 16 * MIB;
/// Three windows and a 12 KiB tail.
const SIZE: u64 = 3 * WINDOW + 12 * 1024;

/// A sparse disk: (offset, length) of its data, the rest holes.
const DATA: [(u64, u64); 5] = [
    // Window 0 full; window 1 but a hole at 20..24 MiB.
    (0, 20 * MIB),
    (24 * MIB, 8 * MIB),
    // Window 2 (its buffer held window 0's data): two islands, the first
    // not 64 KiB-aligned and longer than one read request.
    (33 * MIB + 4096, 700 * 1024),
    (40 * MIB, MIB),
    // Across the last window boundary into the tail, whose last 4 KiB
    // is a hole.
    (47 * MIB, MIB + 8192),
];

#[test]
fn a_backup_through_qemu_equals_the_backup_of_the_file() {
    if !have_qemu_system() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(SIZE).unwrap();
    let mut rng = Rng::new(23);
    for (at, len) in DATA {
        let mut b = vec![0u8; len as usize];
        rng.fill(&mut b);
        f.write_all_at(&b, at).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let expected = std::fs::read(&disk).unwrap();

    let file_vault = new_vault(t.path(), &[]);
    let from_file = json(&[
        "backup",
        "--vault",
        s(&file_vault),
        "--item",
        "vm",
        s(&disk),
    ]);

    let vm_dir = t.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let vault = new_vault(&vm_dir, &[]);
    let vm = start_vm(&vm_dir, &disk);
    let through = json(&live_backup_args(&vault, &vm.qmp, "disk0", &[]));
    assert_eq!(through["job"]["status"], "Completed", "{through}");
    assert_eq!(through["image_size"], SIZE, "{through}");
    assert_eq!(
        through["block_map"], from_file["block_map"],
        "the backup through QEMU has other blocks than the file's"
    );
    drop(vm);
    restores_to(&vault, t.path(), None, &expected);
}
