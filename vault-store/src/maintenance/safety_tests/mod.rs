//! Tests of the rule "nothing is destroyed on partial knowledge": an
//! incomplete index is refused, unknown files go to the quarantine, a
//! refill copies only intact records, replication refuses a primary that
//! looks empty, and a rebuild never cuts a replica's good tail.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::format::chunk_id::ChunkId;
use crate::format::config::VaultConfig;
use crate::format::record::RecordEncoder;
use crate::format::segment::{SEGMENTS_DIR, segment_name};
use crate::index::{INDEX_DIR, IndexBatch};
use crate::vault::{Access, Vault};

fn config(replicas: Vec<PathBuf>, secondary: Option<PathBuf>) -> VaultConfig {
    VaultConfig {
        name: "t-vault".into(),
        vault_id: "0123456789abcdef".into(),
        block_size: 65536,
        compression_level: 1,
        redundancy: crate::format::config::Redundancy::Lrs,
        created: "2027-01-01T00:00:00Z".parse().unwrap(),
        snapshot_area: None,
        replicas,
        secondary,
        store: None,
        adopted_packs: false,
    }
}

/// Stores point `seq` of item `i` whose blocks are `blocks`.
fn store_point(v: &Vault, seq: u64, blocks: &[Vec<u8>]) {
    let blocks: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    crate::vault::tests::store_point(v, seq, &blocks);
}

fn blocks(seed: u8, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut b = vec![0u8; 20_000];
            blake3::Hasher::new()
                .update(&[seed, i as u8])
                .finalize_xof()
                .fill(&mut b);
            b
        })
        .collect()
}

/// The synchronous copy of `v` in `dir`.
fn sync_copy(v: &Vault, dir: &Path) -> crate::copies::Copy {
    v.copies()
        .sync_copies()
        .iter()
        .find(|c| c.dir == dir)
        .unwrap()
        .clone()
}

fn seg_len(dir: &Path, id: u64) -> Option<u64> {
    std::fs::metadata(dir.join(segment_name(id)))
        .ok()
        .map(|m| m.len())
}

fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in [SEGMENTS_DIR, "points/i", "items"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            for e in rd.flatten() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn an_incomplete_index_is_refused_and_nothing_is_touched() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let r1 = t.path().join("r1");
    let v = Vault::create(&vdir, config(vec![r1.clone()], None)).unwrap();
    store_point(&v, 1, &blocks(1, 8));
    drop(v);
    // What a rebuild killed after it emptied the index looked like: an
    // index that knows nothing, and the marker.
    crate::index::state::mark_incomplete(&vdir, "test").unwrap();
    std::fs::remove_dir_all(vdir.join(INDEX_DIR)).unwrap();
    {
        let empty = crate::index::Index::open_write(&vdir.join(INDEX_DIR)).unwrap();
        let mut b = IndexBatch::default();
        b.put_gc_layout();
        empty.commit(b).unwrap();
    }
    let before = (files_under(&vdir), files_under(&r1));
    for access in [Access::Write, Access::ReadOnly] {
        match Vault::open(&vdir, access) {
            Err(StoreError::IndexIncomplete { reason, .. }) => {
                assert!(
                    reason.contains(crate::index::state::REBUILD_MARKER),
                    "{reason}"
                )
            }
            other => panic!("{access:?}: {other:?}"),
        }
    }
    assert_eq!((files_under(&vdir), files_under(&r1)), before);
    // An older coffre's leftover `index.old-*`, without the marker.
    std::fs::remove_file(vdir.join(crate::index::state::REBUILD_MARKER)).unwrap();
    std::fs::create_dir(vdir.join("index.old-4242")).unwrap();
    let e = Vault::open(&vdir, Access::Write).unwrap_err();
    assert!(matches!(e, StoreError::IndexIncomplete { .. }), "{e}");
    assert!(e.to_string().contains("rebuild-index"), "{e}");
    assert_eq!((files_under(&vdir), files_under(&r1)), before);
    // The rebuild finishes it: the point is back, nothing was lost.
    let (v, report) =
        crate::maintenance::rebuild::rebuild_index(&vdir, &vdir, std::time::Duration::from_secs(5))
            .unwrap();
    assert_eq!(report.points, 1);
    assert_eq!(v.points("i").unwrap().len(), 1);
    assert!(crate::index::state::is_complete(&vdir));
    assert_eq!((files_under(&vdir), files_under(&r1)), before);
}

#[test]
fn unknown_files_go_to_the_quarantine_and_gc_deletes_them_when_unreferenced() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let r1 = t.path().join("r1");
    let v = Vault::create(&vdir, config(vec![r1.clone()], None)).unwrap();
    store_point(&v, 1, &blocks(1, 8));
    drop(v);
    // A segment and a manifest no index entry names, on both copies (a
    // session killed before its commit).
    let stray = segment_name(99);
    let mut seg = crate::format::segment::encode_header(99).to_vec();
    let junk = b"never committed".to_vec();
    seg.extend(
        RecordEncoder::new(1)
            .encode(ChunkId::of(&junk), &junk)
            .unwrap(),
    );
    let manifest = "points/i/0000000000000007.point";
    for d in [&vdir, &r1] {
        std::fs::write(d.join(&stray), &seg).unwrap();
        std::fs::write(d.join(manifest), b"not yet").unwrap();
    }
    let v = Vault::open(&vdir, Access::Write).unwrap();
    for d in [&vdir, &r1] {
        assert!(!d.join(&stray).exists());
        assert!(!d.join(manifest).exists());
        assert_eq!(
            std::fs::read(d.join("quarantine").join(&stray)).unwrap(),
            seg,
            "kept whole"
        );
        assert!(d.join("quarantine").join(manifest).exists());
    }
    // GC: the segment holds no chunk anything references; the manifest
    // does not decode, so it stays.
    let report = crate::maintenance::gc::run(&v).unwrap();
    assert_eq!(report.quarantine_deleted, 2, "{report:?}");
    assert_eq!(report.quarantine_kept, 2, "{report:?}");
    for d in [&vdir, &r1] {
        assert!(!d.join("quarantine").join(&stray).exists());
        assert!(d.join("quarantine").join(manifest).exists());
    }
}

#[test]
fn refill_copies_only_intact_records() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let r1 = t.path().join("r1");
    let v = Vault::create(&vdir, config(vec![r1.clone()], None)).unwrap();
    let bl = blocks(3, 6);
    store_point(&v, 1, &bl);
    let loc = v.index().chunk(&ChunkId::of(&bl[2])).unwrap().unwrap();
    let name = segment_name(loc.segment);
    let committed = v.index().segment_infos().unwrap()[&loc.segment].committed;
    drop(v);
    // The primary's copy of one record is damaged; the replica lost the
    // segment.
    let p = vdir.join(&name);
    let mut bytes = std::fs::read(&p).unwrap();
    let at = (loc.offset + u64::from(loc.len) - 10) as usize;
    bytes[at] ^= 0x40;
    std::fs::write(&p, &bytes).unwrap();
    std::fs::remove_file(r1.join(&name)).unwrap();
    let v = Vault::open(&vdir, Access::ReadOnly).unwrap();
    let copies = v.copies();
    let target = sync_copy(&v, &r1);
    let done = crate::copies::segment::refill(copies, &target, &name, committed).unwrap();
    assert_eq!(done.damaged, 1, "{done:?}");
    assert_eq!(done.records, 7, "{done:?}");
    let got = std::fs::read(r1.join(&name)).unwrap();
    assert_eq!(got.len() as u64, committed);
    let range = loc.offset as usize..(loc.offset + u64::from(loc.len)) as usize;
    assert!(
        got[range.clone()].iter().all(|&b| b == 0),
        "the damaged record was not copied"
    );
    // Everything else is the primary's bytes.
    assert_eq!(got[..range.start], bytes[..range.start]);
    assert_eq!(got[range.end..], bytes[range.end..]);
}

#[test]
fn refill_finds_records_that_the_first_copy_lost_in_another_copy() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let (r1, r2) = (t.path().join("r1"), t.path().join("r2"));
    let v = Vault::create(&vdir, config(vec![r1.clone(), r2.clone()], None)).unwrap();
    let bl = blocks(4, 6);
    store_point(&v, 1, &bl);
    let loc = v.index().chunk(&ChunkId::of(&bl[2])).unwrap().unwrap();
    let name = segment_name(loc.segment);
    let committed = v.index().segment_infos().unwrap()[&loc.segment].committed;
    drop(v);
    // The primary lost one record's header (its scan skips the record);
    // r1 lost the segment; r2 holds it whole.
    let whole = std::fs::read(r2.join(&name)).unwrap();
    let p = vdir.join(&name);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[loc.offset as usize] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    std::fs::remove_file(r1.join(&name)).unwrap();
    let v = Vault::open(&vdir, Access::ReadOnly).unwrap();
    let copies = v.copies();
    let target = sync_copy(&v, &r1);
    let done = crate::copies::segment::refill(copies, &target, &name, committed).unwrap();
    assert_eq!(done.damaged, 0, "{done:?}");
    assert!(done.records >= 6, "{done:?}");
    assert_eq!(std::fs::read(r1.join(&name)).unwrap(), whole);
    // A record GC punched on the primary (zeros; r2 is never punched) is
    // not grown back on the refilled copy.
    let dead = v.index().chunk(&ChunkId::of(&bl[4])).unwrap().unwrap();
    let range = dead.offset as usize..(dead.offset + u64::from(dead.len)) as usize;
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[range.clone()].fill(0);
    std::fs::write(&p, &bytes).unwrap();
    std::fs::remove_file(r1.join(&name)).unwrap();
    crate::copies::segment::refill(copies, &target, &name, committed).unwrap();
    let got = std::fs::read(r1.join(&name)).unwrap();
    assert!(
        got[range.clone()].iter().all(|&b| b == 0),
        "a punched record came back"
    );
    assert_eq!(got[..range.start], whole[..range.start]);
}

#[test]
fn replication_refuses_a_primary_that_looks_empty() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let sec = t.path().join("sec");
    let v = Vault::create(&vdir, config(Vec::new(), Some(sec.clone()))).unwrap();
    store_point(&v, 1, &blocks(5, 4));
    let now = || jiff::Timestamp::UNIX_EPOCH;
    crate::maintenance::replicate::replicate(&v, &now, &|| false).unwrap();
    drop(v);
    let before = files_under(&sec);
    assert!(
        before
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("points"))
    );
    // The primary's index, complete but empty (a wiped primary).
    std::fs::remove_dir_all(vdir.join(INDEX_DIR)).unwrap();
    {
        let empty = crate::index::Index::open_write(&vdir.join(INDEX_DIR)).unwrap();
        let mut b = IndexBatch::default();
        b.put_gc_layout();
        empty.commit(b).unwrap();
    }
    let v = Vault::open(&vdir, Access::Write).unwrap();
    // The primary's own files went to its quarantine, not away.
    assert!(vdir.join("quarantine").join(SEGMENTS_DIR).is_dir());
    match crate::maintenance::replicate::replicate(&v, &now, &|| false) {
        Err(StoreError::ReplicationRefused { reason, .. }) => {
            assert!(reason.contains("holds no point"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(files_under(&sec), before, "the secondary is untouched");
}

#[test]
fn a_rebuild_from_a_short_copy_keeps_the_longer_copys_records() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let r1 = t.path().join("r1");
    let v = Vault::create(&vdir, config(vec![r1.clone()], None)).unwrap();
    let bl = blocks(7, 10);
    store_point(&v, 1, &bl);
    let infos = v.index().segment_infos().unwrap();
    let (&id, info) = infos.iter().next().unwrap();
    drop(v);
    let name = segment_name(id);
    // The primary lost its tail (the last records); the replica has it.
    let cut = info.committed - 30_000;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(vdir.join(&name))
        .unwrap();
    f.set_len(cut).unwrap();
    drop(f);
    let (v, report) =
        crate::maintenance::rebuild::rebuild_index(&vdir, &vdir, std::time::Duration::from_secs(5))
            .unwrap();
    assert_eq!(report.extended_segments, 1, "{report:?}");
    assert_eq!(
        v.index().segment_infos().unwrap()[&id].committed,
        info.committed
    );
    assert_eq!(
        seg_len(&r1, id),
        Some(info.committed),
        "the replica kept it"
    );
    for b in &bl {
        assert_eq!(&v.read_chunk(&ChunkId::of(b)).unwrap(), b);
    }
}

fn point_file(seq: u64) -> String {
    crate::format::catalog_files::point_file("i", seq)
}

/// Every chunk of `bl` and the block-map root of point `seq` are placed by
/// the index of `v` and intact in each of `dirs`.
fn point_intact(v: &Vault, seq: u64, bl: &[Vec<u8>], dirs: &[&Path]) {
    let p = v
        .points("i")
        .unwrap()
        .into_iter()
        .find(|p| p.seq == seq)
        .unwrap_or_else(|| panic!("point {seq} is missing from the index"));
    let ids: Vec<ChunkId> = bl
        .iter()
        .map(|b| ChunkId::of(b))
        .chain([p.block_map])
        .collect();
    for id in ids {
        let loc = v
            .index()
            .chunk(&id)
            .unwrap()
            .unwrap_or_else(|| panic!("chunk {id} of point {seq} is not placed"));
        for d in dirs {
            let seg = std::fs::read(d.join(segment_name(loc.segment))).unwrap();
            let rec = &seg[loc.offset as usize..(loc.offset + u64::from(loc.len)) as usize];
            assert!(
                crate::format::record::record_intact(rec, None),
                "chunk {id} of point {seq} is damaged in {}",
                d.display()
            );
        }
    }
    for b in bl {
        assert_eq!(&v.read_chunk(&ChunkId::of(b)).unwrap(), b);
    }
}

/// A vault with a replica and two points; returns (primary, replica,
/// blocks of point 1, blocks of point 2).
fn two_points(t: &Path) -> (PathBuf, PathBuf, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let vdir = t.join("v");
    let r1 = t.join("r1");
    let v = Vault::create(&vdir, config(vec![r1.clone()], None)).unwrap();
    let (b1, b2) = (blocks(21, 6), blocks(22, 6));
    store_point(&v, 1, &b1);
    store_point(&v, 2, &b2);
    drop(v);
    (vdir, r1, b1, b2)
}

fn damage(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn a_rebuild_reads_a_manifest_the_source_cannot_decode_from_another_copy_and_gc_keeps_the_point() {
    let t = tempfile::tempdir().unwrap();
    let (vdir, r1, b1, b2) = two_points(t.path());
    // Bit rot in point 2's manifest on the primary only.
    damage(&vdir.join(point_file(2)));
    let (v, report) =
        crate::maintenance::rebuild::rebuild_index(&vdir, &vdir, std::time::Duration::from_secs(5))
            .unwrap();
    assert_eq!(report.points, 2, "{report:?}");
    assert!(report.bad_files.is_empty(), "{report:?}");
    let gc = crate::maintenance::gc::run(&v).unwrap();
    drop(v);
    // The replica's manifest was never quarantined.
    assert!(r1.join(point_file(2)).is_file(), "{gc:?}");
    let v = Vault::open(&vdir, Access::Write).unwrap();
    let gc = crate::maintenance::gc::run(&v).unwrap();
    point_intact(&v, 1, &b1, &[&vdir, &r1]);
    point_intact(&v, 2, &b2, &[&vdir, &r1]);
    assert!(r1.join(point_file(2)).is_file(), "{gc:?}");
}

#[test]
fn a_rebuild_from_a_replica_that_lacks_the_newest_manifest_keeps_the_point() {
    let t = tempfile::tempdir().unwrap();
    let (vdir, r1, b1, b2) = two_points(t.path());
    // The replica missed point 2's manifest (it lags, or lost it).
    std::fs::remove_file(r1.join(point_file(2))).unwrap();
    let (v, report) =
        crate::maintenance::rebuild::rebuild_index(&vdir, &r1, std::time::Duration::from_secs(5))
            .unwrap();
    assert_eq!(report.points, 2, "{report:?}");
    crate::maintenance::gc::run(&v).unwrap();
    point_intact(&v, 1, &b1, &[&vdir, &r1]);
    point_intact(&v, 2, &b2, &[&vdir, &r1]);
    // The next writer's open put the manifest back on the replica.
    assert!(r1.join(point_file(2)).is_file());
    assert!(vdir.join(point_file(2)).is_file());
}

#[test]
fn a_rebuild_refuses_a_manifest_no_copy_can_decode_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (vdir, r1, b1, _) = two_points(t.path());
    for d in [&vdir, &r1] {
        damage(&d.join(point_file(2)));
    }
    let before = (files_under(&vdir), files_under(&r1));
    match crate::maintenance::rebuild::rebuild_index(
        &vdir,
        &vdir,
        std::time::Duration::from_secs(5),
    ) {
        Err(e @ StoreError::RebuildRefused { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&point_file(2)), "{msg}");
            assert!(msg.contains("rebuild-index` again"), "{msg}");
            assert!(msg.contains("move it out of the vault"), "{msg}");
        }
        Err(e) => panic!("{e}"),
        Ok((_, report)) => panic!("the rebuild installed an index: {report:?}"),
    }
    assert!(!crate::index::state::is_complete(&vdir));
    assert!(matches!(
        Vault::open(&vdir, Access::Write),
        Err(StoreError::IndexIncomplete { .. })
    ));
    assert_eq!((files_under(&vdir), files_under(&r1)), before);
    assert!(!vdir.join("quarantine").exists() && !r1.join("quarantine").exists());
    // The user moves the garbage away by hand; the rebuild then finishes.
    for d in [&vdir, &r1] {
        std::fs::rename(d.join(point_file(2)), t.path().join("moved")).unwrap();
    }
    let (v, report) =
        crate::maintenance::rebuild::rebuild_index(&vdir, &vdir, std::time::Duration::from_secs(5))
            .unwrap();
    assert_eq!(report.points, 1, "{report:?}");
    point_intact(&v, 1, &b1, &[&vdir, &r1]);
}

/// A store whose segment reads fail (for `copies`' roles).
fn failing_reads(
    roles: &'static [crate::format::catalog_files::Role],
) -> (crate::copies::StoreWrap, crate::store::fault::Faults) {
    let faults = crate::store::fault::Faults::default();
    let f = faults.clone();
    let wrap: crate::copies::StoreWrap = std::sync::Arc::new(move |role, s| {
        if roles.contains(&role) {
            std::sync::Arc::new(crate::store::fault::FaultStore::new(s, f.clone()))
                as crate::store::SharedStore
        } else {
            s
        }
    });
    (wrap, faults)
}

#[test]
fn a_rebuild_refuses_a_segment_it_cannot_read_and_cuts_nothing() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let v = Vault::create(&vdir, config(Vec::new(), None)).unwrap();
    let bl = blocks(31, 8);
    store_point(&v, 1, &bl);
    drop(v);
    let before = files_under(&vdir);
    let (wrap, faults) = failing_reads(&[crate::format::catalog_files::Role::Primary]);
    faults.read_error(Some(SEGMENTS_DIR));
    match crate::maintenance::rebuild::rebuild_index_with(
        &vdir,
        &vdir,
        std::time::Duration::from_secs(5),
        Some(wrap),
    ) {
        Err(e @ StoreError::RebuildRefused { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("segments a read failed in"), "{msg}");
            assert!(msg.contains(SEGMENTS_DIR), "{msg}");
        }
        Err(e) => panic!("{e}"),
        Ok((_, report)) => panic!("the rebuild installed an index: {report:?}"),
    }
    assert!(!crate::index::state::is_complete(&vdir));
    assert_eq!(files_under(&vdir), before, "nothing was cut");
    // Once the storage answers, the rebuild finishes and the point is whole.
    let (v, _) =
        crate::maintenance::rebuild::rebuild_index(&vdir, &vdir, std::time::Duration::from_secs(5))
            .unwrap();
    point_intact(&v, 1, &bl, &[&vdir]);
}

#[test]
fn a_rebuild_reads_a_segment_another_copy_holds_whole_when_the_source_fails() {
    let t = tempfile::tempdir().unwrap();
    let (vdir, r1, b1, b2) = two_points(t.path());
    let (wrap, faults) = failing_reads(&[crate::format::catalog_files::Role::Primary]);
    faults.read_error(Some(SEGMENTS_DIR));
    let (v, report) = crate::maintenance::rebuild::rebuild_index_with(
        &vdir,
        &vdir,
        std::time::Duration::from_secs(5),
        Some(wrap),
    )
    .unwrap();
    assert!(report.unreadable_segments.is_empty(), "{report:?}");
    point_intact(&v, 1, &b1, &[&vdir, &r1]);
    point_intact(&v, 2, &b2, &[&vdir, &r1]);
}

#[test]
fn gc_keeps_a_quarantined_manifest_of_a_point_the_index_does_not_know() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let v = Vault::create(&vdir, config(Vec::new(), None)).unwrap();
    store_point(&v, 1, &blocks(41, 4));
    // A manifest of a point the index lacks, whose chunks are nowhere.
    let mut p = v.points("i").unwrap().remove(0);
    p.seq = 9;
    p.block_map = ChunkId::of(b"a root nothing places");
    let q = format!("quarantine/{}", point_file(9));
    std::fs::create_dir_all(vdir.join(&q).parent().unwrap()).unwrap();
    std::fs::write(
        vdir.join(&q),
        crate::format::catalog_files::encode_point(&p),
    )
    .unwrap();
    // And a stale one of the point it has.
    let stale = format!("quarantine/{}", point_file(1));
    std::fs::write(
        vdir.join(&stale),
        crate::format::catalog_files::encode_point(&v.points("i").unwrap()[0]),
    )
    .unwrap();
    let report = crate::maintenance::gc::run(&v).unwrap();
    assert!(vdir.join(&q).is_file(), "{report:?}");
    assert!(!vdir.join(&stale).exists(), "{report:?}");
    assert_eq!(report.quarantine_deleted, 1, "{report:?}");
}

#[test]
fn gc_does_not_retire_a_segment_whose_counters_wrongly_call_it_empty() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let v = Vault::create(&vdir, config(Vec::new(), None)).unwrap();
    let bl = blocks(43, 5);
    store_point(&v, 1, &bl);
    // Counters gone wrong: every segment "dead" from end to end.
    let mut batch = crate::index::IndexBatch::default();
    for (id, info) in v.index().segment_infos().unwrap() {
        batch.put_segment(
            id,
            crate::index::SegmentInfo {
                dead: info.committed,
                ..info
            },
        );
    }
    v.index().commit(batch).unwrap();
    let report = crate::maintenance::gc::run(&v).unwrap();
    point_intact(&v, 1, &bl, &[&vdir]);
    assert!(report.segments_rewritten > 0, "{report:?}");
}

/// The secondary's quarantined manifest of a point retention pruned is
/// deleted by a later replication; one of another point that reused the
/// item's name and sequence (another root) stays.
#[test]
fn a_pruned_points_manifest_leaves_the_secondarys_quarantine() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let sec = t.path().join("sec");
    let v = Vault::create(&vdir, config(Vec::new(), Some(sec.clone()))).unwrap();
    store_point(&v, 1, &blocks(51, 3));
    store_point(&v, 2, &blocks(52, 3));
    let now = || jiff::Timestamp::UNIX_EPOCH;
    crate::maintenance::replicate::replicate(&v, &now, &|| false).unwrap();
    let p1 = v.points("i").unwrap().remove(0);
    assert_eq!(p1.seq, 1);
    let mut batch = IndexBatch::default();
    batch.prune_point("i", 1, &p1.block_map);
    v.commit_catalog(batch, &[p1.block_map]).unwrap();
    let first = crate::maintenance::replicate::replicate(&v, &now, &|| false).unwrap();
    assert_eq!(first.quarantined, 1, "{first:?}");
    let q = sec.join("quarantine").join(point_file(1));
    assert!(q.is_file());
    // A manifest for the same name and sequence with another root.
    let mut other = p1.clone();
    other.block_map = ChunkId::of(b"another point's root");
    let other_q = sec.join("quarantine").join(point_file(7));
    other.seq = 7;
    std::fs::write(&other_q, crate::format::catalog_files::encode_point(&other)).unwrap();
    let mut batch = IndexBatch::default();
    batch.prune_point("i", 7, &ChunkId::of(b"the pruned point 7's root"));
    v.index().commit(batch).unwrap();
    let second = crate::maintenance::replicate::replicate(&v, &now, &|| false).unwrap();
    assert!(!q.exists(), "{second:?}");
    assert!(other_q.is_file(), "{second:?}");
    assert_eq!(second.quarantine_deleted, 1, "{second:?}");
}

/// A quarantined segment whose bytes the scan cannot all read as records
/// (a damaged header) stays: GC cannot vouch that nothing needs them. One
/// whose unread bytes are zeros (a punched hole) goes.
#[test]
fn gc_keeps_a_quarantined_segment_with_bytes_it_cannot_read_as_records() {
    let t = tempfile::tempdir().unwrap();
    let vdir = t.path().join("v");
    let v = Vault::create(&vdir, config(Vec::new(), None)).unwrap();
    store_point(&v, 1, &blocks(61, 2));
    let junk = b"never committed".to_vec();
    let record = RecordEncoder::new(1)
        .encode(ChunkId::of(&junk), &junk)
        .unwrap();
    let segment = |id: u64, middle: &[u8]| {
        let mut seg = crate::format::segment::encode_header(id).to_vec();
        seg.extend(&record);
        seg.extend(middle);
        seg.extend(&record);
        seg
    };
    let damaged = format!("quarantine/{}", segment_name(97));
    let punched = format!("quarantine/{}", segment_name(98));
    std::fs::create_dir_all(vdir.join("quarantine").join(SEGMENTS_DIR)).unwrap();
    std::fs::write(vdir.join(&damaged), segment(97, &[0x5a; 300])).unwrap();
    std::fs::write(vdir.join(&punched), segment(98, &[0; 300])).unwrap();
    // A torn append (a killed session): a whole record, then part of one.
    let torn = format!("quarantine/{}", segment_name(96));
    let mut bytes = crate::format::segment::encode_header(96).to_vec();
    bytes.extend(&record);
    bytes.extend(&record[..20]);
    std::fs::write(vdir.join(&torn), bytes).unwrap();
    let report = crate::maintenance::gc::run(&v).unwrap();
    assert!(vdir.join(&damaged).is_file(), "{report:?}");
    assert!(!vdir.join(&punched).exists(), "{report:?}");
    assert!(!vdir.join(&torn).exists(), "{report:?}");
}
