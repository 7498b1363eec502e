//! Safety tests of refilling a copy and replicating to the secondary:
//! only intact records are copied, and a primary that looks empty is
//! refused.

use std::path::Path;

use super::{blocks, config, files_under, store_point};
use crate::error::StoreError;
use crate::format::chunk_id::ChunkId;
use crate::format::segment::{SEGMENTS_DIR, segment_name};
use crate::index::{INDEX_DIR, IndexBatch};
use crate::vault::{Access, Vault};

/// The synchronous copy of `v` in `dir`.
fn sync_copy(v: &Vault, dir: &Path) -> crate::copies::Copy {
    v.copies()
        .sync_copies()
        .iter()
        .find(|c| c.dir == dir)
        .unwrap()
        .clone()
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
