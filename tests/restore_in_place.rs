//! `restore --in-place`: a delta restore onto an existing image or block
//! device writes only the blocks that differ, ends byte-identical, finishes
//! an interrupted run when rerun, and refuses targets it must not touch.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use crate::common::*;

const BS: u64 = 64 << 10;

/// Blocks of `BS` bytes that differ between two files of the same size.
fn differing_blocks(a: &Path, b: &Path) -> u64 {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    x.chunks(BS as usize)
        .zip(y.chunks(BS as usize))
        .filter(|(p, q)| p != q)
        .count() as u64
}

fn in_place(vault: &Path, point: Option<&str>, to: &Path) -> serde_json::Value {
    let mut args = restore_args(vault, "disk", point, to, true);
    args.push("--in-place");
    json(&args)
}

/// Day one, then day two with churn and a data range zeroed; two points.
fn two_days(t: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let vault = new_vault(t, &[]);
    let img = t.join("disk.img");
    mixed_image(&img, (24 << 20) + 4_321, 7);
    // Blocks 16..20 hold data on day one (they are zeroed on day two).
    let mut data = vec![0u8; 4 * BS as usize];
    Rng::new(70).fill(&mut data);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&data, 16 * BS).unwrap();
    drop(f);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let day1 = t.join("day1.img");
    std::fs::copy(&img, &day1).unwrap();
    churn(&img, 12, 70_000, 8);
    // A range that held data on day one and is zero on day two: in place,
    // it must be punched (it is a hole in the point).
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&vec![0u8; 4 * BS as usize], 16 * BS)
        .unwrap();
    f.sync_all().unwrap();
    ok(&["backup", "--vault", s(&vault), "--item", "disk", s(&img)]);
    (vault, img, day1)
}

#[test]
fn day_two_onto_day_one_writes_only_the_change() {
    let t = tempfile::tempdir().unwrap();
    let (vault, img, day1) = two_days(t.path());
    let target = t.path().join("target.img");
    std::fs::copy(&day1, &target).unwrap();
    let changed = differing_blocks(&day1, &img);
    assert!(changed > 10, "the churn changed only {changed} blocks");

    let r = in_place(&vault, None, &target);
    assert_same(&target, &img);
    let total = std::fs::metadata(&img).unwrap().len().div_ceil(BS);
    assert_eq!(r["in_place"], true, "{r}");
    assert_eq!(r["blocks_read"].as_u64(), Some(total), "{r}");
    let written = r["blocks_written"].as_u64().unwrap();
    let zeroed = r["blocks_zeroed"].as_u64().unwrap();
    // Exactly the blocks that differ are touched, and nothing else.
    assert_eq!(written + zeroed, changed, "{r}");
    assert_eq!(zeroed, 4, "the zeroed range was not punched: {r}");
    assert_eq!(r["blocks_skipped"].as_u64(), Some(total - changed), "{r}");
    assert!(r["bytes_written"].as_u64().unwrap() <= written * BS, "{r}");

    // A second run has nothing left to do.
    let again = in_place(&vault, None, &target);
    assert_eq!(again["blocks_written"].as_u64(), Some(0), "{again}");
    assert_eq!(again["blocks_zeroed"].as_u64(), Some(0), "{again}");
    assert_same(&target, &img);

    // Rolling back to day one works the same way.
    let pts = points(&vault, "disk");
    let back = in_place(&vault, pts[0]["id"].as_str(), &target);
    assert_same(&target, &day1);
    let n = back["blocks_written"].as_u64().unwrap() + back["blocks_zeroed"].as_u64().unwrap();
    assert_eq!(n, changed, "{back}");
}

#[test]
fn an_interrupted_in_place_restore_is_finished_by_a_rerun() {
    let t = tempfile::tempdir().unwrap();
    let (vault, img, day1) = two_days(t.path());
    let target = t.path().join("target.img");
    std::fs::copy(&day1, &target).unwrap();
    // A restore killed part-way leaves a mix of old, new and torn blocks:
    // model it with day two's first half over day one plus torn blocks.
    let half = std::fs::metadata(&img).unwrap().len() / 2;
    let new = std::fs::read(&img).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    f.write_all_at(&new[..half as usize], 0).unwrap();
    churn(&target, 5, 10_000, 99);
    drop(f);
    in_place(&vault, None, &target);
    assert_same(&target, &img);

    // A larger regular file is cut to the image: the result is the point.
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&target)
        .unwrap();
    f.write_all_at(&[7u8; 100_000], std::fs::metadata(&img).unwrap().len())
        .unwrap();
    drop(f);
    in_place(&vault, None, &target);
    assert_same(&target, &img);
}

#[test]
fn in_place_refuses_missing_small_and_unconfirmed_targets() {
    let t = tempfile::tempdir().unwrap();
    let (vault, img, _) = two_days(t.path());
    let size = std::fs::metadata(&img).unwrap().len();

    let missing = t.path().join("missing.img");
    let mut args = restore_args(&vault, "disk", None, &missing, true);
    args.push("--in-place");
    let err = fails(&args, 1);
    assert!(
        err.contains("does not exist") && err.contains("missing.img"),
        "{err}"
    );

    let small = t.path().join("small.img");
    std::fs::write(&small, vec![1u8; (size - 1) as usize]).unwrap();
    let mut args = restore_args(&vault, "disk", None, &small, true);
    args.push("--in-place");
    let err = fails(&args, 1);
    assert!(
        err.contains("smaller than") && err.contains("small.img"),
        "{err}"
    );
    // Nothing was written to it.
    assert!(std::fs::read(&small).unwrap().iter().all(|&b| b == 1));

    let mut args = restore_args(&vault, "disk", None, &small, false);
    args.push("--in-place");
    let err = fails(&args, 1);
    assert!(err.contains("--force"), "{err}");
}

#[test]
fn restored_images_are_private_unless_mode_says_otherwise() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let (vault, img, _) = two_days(t.path());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let r = t.path().join("r.img");
    // Under a permissive umask too.
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(bin())
        .args(restore_args(&vault, "disk", None, &r, false))
        .env("COFFRE_REGISTRY", registry_path())
        .env("COFFRE_SNAPSHOT_ROOT", snapshot_root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&r), 0o600);
    assert_same(&r, &img);
    let mut args = restore_args(&vault, "disk", None, &r, true);
    args.extend(["--mode", "0640"]);
    ok(&args);
    assert_eq!(mode(&r), 0o640);
    let mut args = restore_args(&vault, "disk", None, &r, true);
    args.extend(["--mode", "999"]);
    let err = fails(&args, 2);
    assert!(err.contains("octal"), "{err}");
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", s(file)])
            .output()
            .ok()?;
        if !out.status.success() {
            skip(&format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            return None;
        }
        Some(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn in_place_onto_a_loop_device_and_refusal_when_mounted() {
    if !is_root() {
        skip("in_place_onto_a_loop_device: needs root for losetup and mount");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (vault, img, day1) = two_days(t.path());
    let size = std::fs::metadata(&img).unwrap().len();
    // The device is larger than the image (whole MiB): the tail stays.
    let backing = t.path().join("backing.img");
    std::fs::copy(&day1, &backing).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    f.set_len(size.next_multiple_of(1 << 20) + (1 << 20))
        .unwrap();
    f.write_all_at(b"tail", size + 10).unwrap();
    drop(f);
    let Some(lo) = Loop::attach(&backing) else {
        return;
    };
    let dev = Path::new(&lo.dev);
    let r = in_place(&vault, None, dev);
    assert!(r["bytes_beyond_image"].as_u64().unwrap() > 0, "{r}");
    let written = r["blocks_written"].as_u64().unwrap() + r["blocks_zeroed"].as_u64().unwrap();
    assert_eq!(written, differing_blocks(&day1, &img), "{r}");
    let on_dev = std::fs::read(dev).unwrap();
    assert!(
        on_dev[..size as usize] == std::fs::read(&img).unwrap()[..],
        "device differs from day two"
    );
    assert_eq!(&on_dev[size as usize + 10..size as usize + 14], b"tail");
    drop(lo);

    // A mounted device is refused, naming the device and the mount point.
    let fs_file = t.path().join("fs.img");
    std::fs::File::create(&fs_file)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let Some(lo) = Loop::attach(&fs_file) else {
        return;
    };
    let mkfs = Command::new(e2tool("mke2fs"))
        .args(["-q", "-t", "ext4", &lo.dev])
        .status()
        .unwrap();
    assert!(mkfs.success());
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args([&lo.dev, s(&mnt)])
        .status()
        .unwrap();
    if !mounted.success() {
        skip("mounted-device refusal: mount failed");
        return;
    }
    let mut args = restore_args(&vault, "disk", None, Path::new(&lo.dev), true);
    args.push("--in-place");
    let err = fails(&args, 14);
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(
        err.contains(&lo.dev) && err.contains("mounted at") && err.contains(s(&mnt)),
        "{err}"
    );
}
