//! SIGKILL at random moments of `coffre vault rebuild-index` on a vault
//! with an LRS replica, then the next ordinary command (a backup): no
//! acknowledged point is lost on any copy, no segment file shrinks or
//! vanishes on any copy, and `verify --read-data` finds nothing.
//!
//! An interrupted rebuild leaves the index marked incomplete: the backup
//! then refuses (exit 13) without touching anything and says to run
//! `rebuild-index` again, which finishes it. `COFFRE_REBUILD_KILLS`
//! (default 4) kills from the seed `COFFRE_REBUILD_SEED` (default 1).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Size of every segment file of the copy at `dir`.
fn segment_sizes(dir: &Path) -> BTreeMap<String, u64> {
    let Ok(entries) = fs::read_dir(dir.join("segments")) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

/// Every segment of `before` is still there, at least as long.
fn none_shrank(copy: &Path, before: &BTreeMap<String, u64>, what: &str) {
    let after = segment_sizes(copy);
    for (name, len) in before {
        let now = after.get(name).copied();
        assert!(
            now.is_some_and(|n| n >= *len),
            "{what}: segment {name} of {} went from {len} bytes to {now:?}",
            copy.display()
        );
    }
}

/// Copies a directory tree (a replica, to open it on its own without
/// leaving an index cache in it).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name();
        if name == "index" || name == "locks" {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            copy_tree(&p, &to.join(&name));
        } else {
            fs::copy(&p, to.join(&name)).unwrap();
        }
    }
}

/// Restores every acknowledged point from `copy` and compares.
fn all_restore(copy: &Path, acked: &[(String, PathBuf)], scratch: &Path, what: &str) {
    for (id, want) in acked {
        let out = scratch.join(format!("{id}.restored"));
        let args = restore_args(copy, "vm", Some(id), &out, true);
        let o = run(&args);
        assert!(
            o.status.success(),
            "{what}: acknowledged point {id} does not restore from {}: {}",
            copy.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_same(&out, want);
        fs::remove_file(&out).unwrap();
    }
}

#[test]
fn a_killed_rebuild_index_loses_nothing_on_any_copy() {
    let seed = env_u64("COFFRE_REBUILD_SEED", 1);
    let kills = env_u64("COFFRE_REBUILD_KILLS", 4);
    let t = tempfile::tempdir().unwrap();
    let r1 = t.path().join("r1");
    let vault = new_vault(t.path(), &["--replica", s(&r1)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    mixed_image(&img, 48 << 20, seed);
    let mut acked: Vec<(String, PathBuf)> = Vec::new();
    // Records the point just acknowledged, with a copy of its image.
    let record = |n: usize, acked: &mut Vec<(String, PathBuf)>| {
        let id = vault_points(&vault, "vm").last().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(acked.iter().all(|(a, _)| *a != id), "a new point");
        let keep = t.path().join(format!("point-{n}.img"));
        fs::copy(&img, &keep).unwrap();
        acked.push((id, keep));
    };
    let backup = |n: usize, acked: &mut Vec<(String, PathBuf)>| {
        ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
        record(n, acked);
    };
    backup(0, &mut acked);
    churn(&img, 60, 60_000, seed + 1);
    backup(1, &mut acked);
    // How long a whole rebuild takes (the process included): the kills
    // fall anywhere in it.
    let started = Instant::now();
    ok(&["vault", "rebuild-index", "--vault", v]);
    let full = started.elapsed().as_millis().max(20) as u64;
    let mut rng = Rng::new(seed);
    let mut refused = 0;
    for k in 0..kills {
        let before = [
            (vault.clone(), segment_sizes(&vault)),
            (r1.clone(), segment_sizes(&r1)),
        ];
        let delay = rng.below(full);
        let mut child = coffre()
            .args(["vault", "rebuild-index", "--vault", v])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        let what = format!("seed {seed}, kill {k} after {delay} of {full} ms");
        for (copy, sizes) in &before {
            none_shrank(copy, sizes, &what);
        }
        // The next ordinary command.
        churn(&img, 20, 40_000, seed + 10 + k);
        let args = ["backup", "--vault", v, "--item", "vm", s(&img)];
        let o = run(&args);
        if o.status.success() {
            record(2 + k as usize, &mut acked);
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(13), "{what}: backup failed: {err}");
            assert!(err.contains("rebuild-index"), "{what}: {err}");
            refused += 1;
            for (copy, sizes) in &before {
                none_shrank(copy, sizes, &format!("{what}, refused backup"));
            }
            // Reading is refused too, with the same advice.
            let list = run(&["points", "--vault", v, "--item", "vm"]);
            assert_eq!(list.status.code(), Some(13), "{what}");
            ok(&["vault", "rebuild-index", "--vault", v]);
            backup(2 + k as usize, &mut acked);
        }
        for (copy, sizes) in &before {
            none_shrank(copy, sizes, &format!("{what}, after the backup"));
        }
        let verify = json(&["verify", "--vault", v, "--read-data"]);
        assert_eq!(verify["detected"], 0, "{what}: {verify}");
        all_restore(&vault, &acked, t.path(), &what);
        let alone = t.path().join(format!("r1-alone-{k}"));
        copy_tree(&r1, &alone);
        all_restore(&alone, &acked, t.path(), &format!("{what}, replica"));
        fs::remove_dir_all(&alone).unwrap();
    }
    eprintln!("rebuild_kill: seed {seed}, {kills} kills, {refused} left an incomplete index");
}

#[test]
fn a_segment_the_index_does_not_know_is_quarantined_reported_and_collected() {
    let t = tempfile::tempdir().unwrap();
    let r1 = t.path().join("r1");
    let vault = new_vault(t.path(), &["--replica", s(&r1)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    mixed_image(&img, 4 << 20, 5);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    // A segment no index entry names (a header and garbage), on both copies.
    let stray = "segments/00000000000000ff.seg";
    let mut bytes = fs::read(first_segment(&vault)).unwrap();
    bytes.truncate(32 + 1000);
    for d in [&vault, &r1] {
        fs::write(d.join(stray), &bytes).unwrap();
    }
    churn(&img, 5, 10_000, 6);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    for d in [&vault, &r1] {
        assert!(!d.join(stray).exists(), "{}", d.display());
        assert_eq!(
            fs::read(d.join("quarantine").join(stray)).unwrap(),
            bytes,
            "kept whole in {}",
            d.display()
        );
    }
    let verify = json(&["verify", "--vault", v]);
    let q: Vec<&serde_json::Value> = verify["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["code"] == "quarantined")
        .collect();
    assert_eq!(q.len(), 2, "{verify}");
    assert!(
        q[0]["hint"].as_str().unwrap().contains("coffre gc"),
        "{verify}"
    );
    let gc = json(&["gc", "--vault", v]);
    assert_eq!(gc["quarantine_deleted"], 2, "{gc}");
    for d in [&vault, &r1] {
        assert!(!d.join("quarantine").join(stray).exists());
    }
    let verify = json(&["verify", "--vault", v]);
    assert!(!verify.to_string().contains("quarantined"), "{verify}");
}

/// The newest point manifest of item `vm` in the copy at `dir`.
fn newest_manifest(dir: &Path) -> PathBuf {
    let mut m: Vec<PathBuf> = fs::read_dir(dir.join("points").join("vm"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "point"))
        .collect();
    m.sort();
    m.pop().unwrap()
}

fn flip_middle(path: &Path) {
    let mut b = fs::read(path).unwrap();
    let n = b.len() / 2;
    b[n] ^= 0x21;
    fs::write(path, &b).unwrap();
}

#[test]
fn a_manifest_damaged_on_the_primary_survives_rebuild_and_gc_and_one_damaged_everywhere_stops_the_rebuild()
 {
    let t = tempfile::tempdir().unwrap();
    let r1 = t.path().join("r1");
    let vault = new_vault(t.path(), &["--replica", s(&r1)]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    mixed_image(&img, 8 << 20, 5);
    let mut acked: Vec<(String, PathBuf)> = Vec::new();
    for n in 0..2 {
        if n > 0 {
            churn(&img, 40, 60_000, 6);
        }
        ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
        let id = vault_points(&vault, "vm").last().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let keep = t.path().join(format!("point-{n}.img"));
        fs::copy(&img, &keep).unwrap();
        acked.push((id, keep));
    }
    let manifest = newest_manifest(&vault);
    let name = manifest.strip_prefix(&vault).unwrap().to_path_buf();
    flip_middle(&manifest);
    ok(&["vault", "rebuild-index", "--vault", v]);
    ok(&["gc", "--vault", v]);
    all_restore(&vault, &acked, t.path(), "after rebuild and gc");
    let alone = t.path().join("r1-alone");
    copy_tree(&r1, &alone);
    all_restore(&alone, &acked, t.path(), "replica, after rebuild and gc");
    fs::remove_dir_all(&alone).unwrap();
    // Damaged on every copy: the rebuild stops, names the file, and
    // leaves the index incomplete with every copy as it was.
    flip_middle(&r1.join(&name));
    let before = (segment_sizes(&vault), segment_sizes(&r1));
    let err = fails(&["vault", "rebuild-index", "--vault", v], 13);
    assert!(err.contains(&name.to_string_lossy().into_owned()), "{err}");
    assert!(err.contains("rebuild-index` again"), "{err}");
    assert_eq!((segment_sizes(&vault), segment_sizes(&r1)), before);
    assert!(r1.join(&name).is_file() && manifest.is_file());
    fails(&["gc", "--vault", v], 13);
}
