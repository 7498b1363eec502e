//! Safety tests of the index rebuild: an incomplete index is refused until
//! a rebuild finishes it, and a rebuild reads what its source lacks from
//! another copy, or refuses and changes nothing.

use std::path::{Path, PathBuf};

use super::{blocks, config, files_under, point_file, point_intact, store_point};
use crate::error::StoreError;
use crate::format::chunk_id::ChunkId;
use crate::format::segment::{SEGMENTS_DIR, segment_name};
use crate::index::{INDEX_DIR, IndexBatch};
use crate::vault::{Access, Vault};

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

fn seg_len(dir: &Path, id: u64) -> Option<u64> {
    std::fs::metadata(dir.join(segment_name(id)))
        .ok()
        .map(|m| m.len())
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
        None,
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
        None,
    )
    .unwrap();
    assert!(report.unreadable_segments.is_empty(), "{report:?}");
    point_intact(&v, 1, &b1, &[&vdir, &r1]);
    point_intact(&v, 2, &b2, &[&vdir, &r1]);
}
