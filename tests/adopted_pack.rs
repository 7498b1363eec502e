//! One write per byte: the pack a fallback capture writes becomes, by a
//! hard link, the vault segment of its records. The two tiers then share
//! those bytes, so the vault's GC never punches such a segment while the
//! snapshot area still holds the pack, snapshot expiry never punches a
//! pack the vault holds, and both tiers keep restoring byte-identical.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::common::*;

fn packs_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "pack") {
                out.push(p);
            }
        }
    }
    out
}

/// `verify --read-data` passes, and item `vm`'s latest point restores
/// byte-identical to `img` from the snapshot and from the vault.
fn whole_in_both_tiers(vault: &Path, scratch: &Path, img: &Path) {
    ok(&["verify", "--vault", s(vault), "--read-data"]);
    for from in ["snapshot", "vault"] {
        let r = scratch.join(format!("{from}.img"));
        let mut args = restore_args(vault, "vm", None, &r, false);
        args.extend(["--from", from]);
        ok(&args);
        assert_same(&r, img);
        std::fs::remove_file(&r).unwrap();
    }
}

fn is_adopted(segment: &Path) -> bool {
    std::fs::read(segment).unwrap().starts_with(b"CFPACK")
}

#[test]
fn an_adopted_pack_is_never_punched_while_its_snapshot_holds_it() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let area = t.path().join("snapshot-area");
    let img = t.path().join("vm.img");
    random_file(&img, 8 << 20, 1);
    backup_vm_until("2027-01-01T00:00:00Z", &vault, &img, "2027-01-02");

    // Day one's records are its pack: one file, two names.
    let adopted: Vec<_> = segment_files(&vault)
        .into_iter()
        .filter(|p| is_adopted(p))
        .collect();
    assert_eq!(adopted.len(), 1, "{:?}", segment_files(&vault));
    let segment = adopted[0].clone();
    let packs = packs_in(&area);
    assert_eq!(packs.len(), 1, "{packs:?}");
    let pack = packs[0].clone();
    let (sm, pm) = (segment.metadata().unwrap(), pack.metadata().unwrap());
    assert_eq!((sm.dev(), sm.ino()), (pm.dev(), pm.ino()));
    assert_eq!(sm.nlink(), 2);
    ok(&["verify", "--vault", v, "--read-data"]);
    // The vault is now at version 5: a build that knows no adopted
    // segments (and would append to or punch them) refuses it.
    assert_eq!(json(&["vault", "show", "--vault", v])["format_version"], 5);

    // Day two rewrites 1 MiB of the 8; its snapshot still uses the other
    // 7 MiB of day one's pack.
    let mut bytes = std::fs::read(&img).unwrap();
    let mut fresh = vec![0u8; 1 << 20];
    Rng::new(2).fill(&mut fresh);
    bytes[..1 << 20].copy_from_slice(&fresh);
    std::fs::write(&img, &bytes).unwrap();
    backup_vm_until("2027-01-02T12:00:00Z", &vault, &img, "2030-01-01");

    // Day one's point goes; the pack stays, for day two's snapshot.
    ok_at("2027-01-03T06:00:00Z", &["prune", "--vault", v]);
    assert_eq!(points(&vault, "vm").len(), 1);
    assert!(pack.exists());
    assert_eq!(segment.metadata().unwrap().nlink(), 2);
    let pack_before = std::fs::read(&pack).unwrap();

    // GC unindexes day one's 16 rewritten blocks, but their ranges wait:
    // the snapshot area still holds the file.
    let gc = json(&["gc", "--vault", v]);
    assert!(gc["chunks_removed"].as_u64().unwrap() >= 16, "{gc}");
    assert_eq!(gc["bytes_punched"], 0, "{gc}");
    let id = u64::from_str_radix(segment.file_stem().unwrap().to_str().unwrap(), 16).unwrap();
    let planned = gc["plan"]["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["segment"] == id)
        .cloned();
    assert_eq!(
        planned.as_ref().map(|a| a["action"].clone()),
        Some("punch".into()),
        "{gc}"
    );
    assert!(segment.exists());
    assert_eq!(std::fs::read(&pack).unwrap(), pack_before);
    whole_in_both_tiers(&vault, t.path(), &img);

    // Once the snapshots expire the packs leave the area, and the next GC
    // gives day one's dead megabyte back.
    ok_at("2027-01-10T00:00:00Z", &["prune", "--vault", v]);
    assert!(packs_in(&area).is_empty(), "{:?}", packs_in(&area));
    assert_eq!(segment.metadata().unwrap().nlink(), 1);
    let gc = json(&["gc", "--vault", v]);
    assert!(gc["bytes_punched"].as_u64().unwrap() >= 1 << 20, "{gc}");
    ok(&["verify", "--vault", v, "--read-data"]);
    let r = t.path().join("after.img");
    ok(&restore_args(&vault, "vm", None, &r, false));
    assert_same(&r, &img);
}

#[test]
fn a_vault_with_a_replica_copies_records_instead() {
    // Each copy needs bytes of its own: nothing is adopted, and the
    // replica's segments are the primary's, byte for byte.
    let t = tempfile::tempdir().unwrap();
    let replica = t.path().join("replica");
    let vault = new_vault(t.path(), &["--replica", s(&replica)]);
    let img = t.path().join("vm.img");
    random_file(&img, 4 << 20, 3);
    ok(&["backup", "--vault", s(&vault), "--item", "vm", s(&img)]);
    let segments = segment_files(&vault);
    assert!(!segments.is_empty());
    assert_eq!(
        json(&["vault", "show", "--vault", s(&vault)])["format_version"],
        3
    );
    for seg in &segments {
        assert!(!is_adopted(seg), "{}", seg.display());
        assert_eq!(seg.metadata().unwrap().nlink(), 1);
        let twin = replica.join("segments").join(seg.file_name().unwrap());
        assert_eq!(std::fs::read(seg).unwrap(), std::fs::read(&twin).unwrap());
    }
}

#[test]
fn a_link_a_crash_left_before_its_commit_goes_and_the_pack_stays() {
    // A transfer that linked its pack in and died before the index commit
    // leaves a segment file the index does not know: the next writer
    // removes that name, never the pack's bytes.
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let v = s(&vault);
    let img = t.path().join("vm.img");
    random_file(&img, 4 << 20, 5);
    ok(&["backup", "--vault", v, "--item", "vm", s(&img)]);
    let pack = packs_in(&t.path().join("snapshot-area"))[0].clone();
    let before = std::fs::read(&pack).unwrap();
    let leftover = vault.join("segments").join(format!("{:016x}.seg", 0xff));
    std::fs::hard_link(&pack, &leftover).unwrap();
    assert_eq!(pack.metadata().unwrap().nlink(), 3);
    ok(&["gc", "--vault", v]);
    assert!(!leftover.exists(), "the uncommitted link is still there");
    assert_eq!(pack.metadata().unwrap().nlink(), 2);
    assert_eq!(std::fs::read(&pack).unwrap(), before);
    whole_in_both_tiers(&vault, t.path(), &img);
}
