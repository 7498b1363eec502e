//! Safety tests of the quarantine and GC: unknown files are quarantined,
//! and GC deletes only what it can vouch nothing needs.

use super::{blocks, config, point_file, point_intact, store_point};
use crate::format::chunk_id::ChunkId;
use crate::format::record::RecordEncoder;
use crate::format::segment::{SEGMENTS_DIR, segment_name};
use crate::index::IndexBatch;
use crate::vault::{Access, Vault};

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
