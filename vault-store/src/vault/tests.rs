//! Tests of the open vault and its write session; `store_point` is shared
//! with the maintenance tests.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
use super::*;
use crate::format::blockmap::Node;
use crate::format::catalog::{PointStats, Protection};
use crate::format::record::RecordEncoder;
use crate::index::RefEntry;

#[test]
fn an_adopted_packs_dead_ranges_are_the_gaps_between_its_indexed_records() {
    let a = Adopted {
        id: 7,
        len: 1000,
        committed: false,
        used: vec![(500, 100), (32, 68), (700, 50)],
    };
    assert_eq!(a.gaps(), vec![(100, 400), (600, 100), (750, 250)]);
    let all = Adopted {
        used: vec![(32, 968)],
        ..a
    };
    assert!(all.gaps().is_empty());
    // A huge unused stretch is cut into pieces a `dead` entry holds.
    let none = Adopted {
        id: 8,
        len: (3 << 30) + 32,
        committed: false,
        used: Vec::new(),
    };
    let gaps = none.gaps();
    assert_eq!(gaps.len(), 3);
    assert_eq!(gaps.iter().map(|g| u64::from(g.1)).sum::<u64>(), 3 << 30);
}

fn config() -> VaultConfig {
    VaultConfig {
        name: "t-vault".into(),
        vault_id: "0123456789abcdef".into(),
        block_size: 65536,
        compression_level: 1,
        redundancy: crate::format::config::Redundancy::Lrs,
        created: "2027-01-01T00:00:00Z".parse().unwrap(),
        snapshot_area: None,
        replicas: Vec::new(),
        secondary: None,
        store: None,
        adopted_packs: false,
        encryption: None,
    }
}

/// Stores a point whose block map is `blocks` (duplicates allowed).
pub(crate) fn store_point(v: &Vault, seq: u64, blocks: &[&[u8]]) -> ChunkId {
    let mut enc = RecordEncoder::new(1);
    let mut s = v.begin_write().unwrap();
    let entries: Vec<Option<ChunkId>> = blocks.iter().map(|b| Some(ChunkId::of(b))).collect();
    for b in blocks {
        let id = ChunkId::of(b);
        if !s.contains(&id).unwrap() {
            s.append(id, &enc.encode(id, b).unwrap()).unwrap();
        }
    }
    let leaf = Node::Leaf {
        first_block: 0,
        entries: entries.clone(),
    }
    .encode();
    let leaf_id = ChunkId::of(&leaf);
    if !s.contains(&leaf_id).unwrap() {
        let kids = entries.iter().flatten().copied().collect();
        s.append_node(
            leaf_id,
            &enc.encode(leaf_id, &leaf).unwrap(),
            ChunkKind::Leaf,
            kids,
        )
        .unwrap();
    }
    let root = Node::Root {
        image_size: blocks.len() as u64 * 65536,
        block_size: 65536,
        leaves: vec![leaf_id],
    }
    .encode();
    let root_id = ChunkId::of(&root);
    if !s.contains(&root_id).unwrap() {
        s.append_node(
            root_id,
            &enc.encode(root_id, &root).unwrap(),
            ChunkKind::Root,
            vec![leaf_id],
        )
        .unwrap();
    }
    let mut b = IndexBatch::default();
    b.put_item(ItemRecord {
        name: "i".into(),
        source: "/i".into(),
        created: "2027-01-01T00:00:00Z".parse().unwrap(),
        next_seq: seq + 1,
        policy: None,
        protection: Protection::Protected,
        last_slot: None,
        identity: None,
        hooks: Default::default(),
    });
    b.put_point(PointRecord {
        id: format!("p{seq}"),
        item: "i".into(),
        seq,
        created: "2027-01-01T00:00:00Z".parse().unwrap(),
        image_size: blocks.len() as u64 * 65536,
        block_size: 65536,
        block_map: root_id,
        stats: PointStats::default(),
        scheduled: false,
        retain_until: None,
        job: None,
        level: None,
        cbt: None,
    });
    s.reference_root(root_id);
    s.commit(b).unwrap();
    root_id
}

fn counts(v: &Vault) -> Vec<(ChunkId, Option<RefEntry>)> {
    v.index()
        .chunks()
        .unwrap()
        .into_iter()
        .map(|(id, _)| (id, v.index().chunk_ref(&id).unwrap()))
        .collect()
}

#[test]
fn a_points_commit_leaves_no_log_to_replay_and_counts_read_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let vdir = dir.path().join("v");
    let v = Vault::create(&vdir, config()).unwrap();
    let blocks: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().repeat(64)).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    store_point(&v, 1, &refs);
    // The commit was flushed into table files: every write-ahead log
    // is empty, so the next open replays nothing.
    let logged: u64 = std::fs::read_dir(vdir.join(INDEX_DIR))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(logged, 0);
    drop(v);
    let r = Vault::open(&vdir, Access::ReadOnly).unwrap();
    assert_eq!(r.points("i").unwrap().len(), 1);
    // A batched read gives what one lookup at a time gives, in order.
    let mut ids: Vec<ChunkId> = refs.iter().map(|b| ChunkId::of(b)).collect();
    ids.push(ChunkId::of(b"never stored"));
    let one_by_one: Vec<_> = ids
        .iter()
        .map(|id| r.index().chunk_ref(id).unwrap())
        .collect();
    assert_eq!(r.index().chunk_refs(&ids, false).unwrap(), one_by_one);
    assert_eq!(one_by_one.last(), Some(&None));
    assert!(
        one_by_one[..300]
            .iter()
            .all(|e| e.is_some_and(|e| e.count == 1))
    );
    ids.sort_unstable();
    let sorted: Vec<_> = ids
        .iter()
        .map(|id| r.index().chunk_ref(id).unwrap())
        .collect();
    assert_eq!(r.index().chunk_refs(&ids, true).unwrap(), sorted);
}

#[test]
fn locations_read_in_one_batch_and_read_ahead_brings_their_records_in() {
    use crate::store::local::read_ahead::{drop_cached, resident};
    let dir = tempfile::tempdir().unwrap();
    let vdir = dir.path().join("v");
    let v = Vault::create(&vdir, config()).unwrap();
    // Incompressible blocks of 64 KiB: records of 64 KiB and more.
    let blocks: Vec<Vec<u8>> = (0..64u32)
        .map(|i| {
            let mut b = vec![0u8; 65536];
            blake3::Hasher::new()
                .update(&i.to_le_bytes())
                .finalize_xof()
                .fill(&mut b);
            b
        })
        .collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    store_point(&v, 1, &refs);
    let mut ids: Vec<ChunkId> = refs.iter().map(|b| ChunkId::of(b)).collect();
    ids.insert(5, ChunkId::of(b"never stored"));
    let batched = v.index().chunk_locations(&ids).unwrap();
    let one_by_one: Vec<_> = ids.iter().map(|id| v.index().chunk(id).unwrap()).collect();
    assert_eq!(batched, one_by_one);
    assert_eq!(batched[5], None);
    let locs: Vec<ChunkLocation> = batched.into_iter().flatten().collect();
    assert_eq!(locs.len(), 64);
    let seg = |l: &ChunkLocation| std::fs::File::open(vdir.join(segment_name(l.segment))).unwrap();
    let cached = |ls: &[ChunkLocation]| -> usize {
        ls.iter()
            .map(|l| resident(&seg(l), l.offset..l.offset + u64::from(l.len)).unwrap())
            .sum()
    };
    let pages = |ls: &[ChunkLocation]| -> usize {
        ls.iter()
            .map(|l| {
                (l.offset + u64::from(l.len)).div_ceil(4096) as usize - l.offset as usize / 4096
            })
            .sum()
    };
    for l in &locs {
        drop_cached(&seg(l));
    }
    if cached(&locs) > 0 {
        crate::skip::skip(&format!("the page cache keeps {} (tmpfs?)", vdir.display()));
        return;
    }
    // The first 24 records, in no particular order.
    let mut wanted = locs[..24].to_vec();
    wanted.reverse();
    v.read_ahead(&wanted);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cached(&wanted) < pages(&wanted) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        cached(&wanted),
        pages(&wanted),
        "the records were read ahead"
    );
    // Segment order follows the point's blocks: the last records, far
    // from the wanted ones, were not read.
    let far: Vec<ChunkLocation> = locs[40..]
        .iter()
        .filter(|l| {
            locs[..24].iter().all(|w| {
                w.segment != l.segment
                    || l.offset > w.offset + 2 * crate::store::local::read_ahead::RUN_GAP
            })
        })
        .copied()
        .collect();
    assert!(!far.is_empty());
    assert_eq!(
        cached(&far),
        0,
        "records far from the wanted ones stay unread"
    );
}

#[test]
fn counts_follow_points_and_the_upgrade_rebuilds_them() {
    let dir = tempfile::tempdir().unwrap();
    let vdir = dir.path().join("v");
    let v = Vault::create(&vdir, config()).unwrap();
    let a: &[u8] = b"block a";
    let b: &[u8] = b"block b";
    let c: &[u8] = b"block c";
    // A leaf left behind by an interrupted backup: indexed, never
    // referenced.
    let orphan = Node::Leaf {
        first_block: 0,
        entries: vec![Some(ChunkId::of(b"block z"))],
    }
    .encode();
    let orphan_id = ChunkId::of(&orphan);
    {
        let mut s = v.begin_write().unwrap();
        let rec = RecordEncoder::new(1).encode(orphan_id, &orphan).unwrap();
        s.append_node(orphan_id, &rec, ChunkKind::Leaf, vec![])
            .unwrap();
        s.checkpoint().unwrap();
        s.commit(IndexBatch::default()).unwrap();
    }
    let r1 = store_point(&v, 1, &[a, b, a]);
    let r2 = store_point(&v, 2, &[a, c]);
    let count = |id: &ChunkId| v.index().chunk_ref(id).unwrap().unwrap().count;
    // a twice in leaf 1 and once in leaf 2; b once; c once; roots once.
    assert_eq!(count(&ChunkId::of(a)), 3);
    assert_eq!(count(&ChunkId::of(b)), 1);
    assert_eq!((count(&r1), count(&r2)), (1, 1));
    assert_eq!(v.index().unreferenced_from(None, 10).unwrap(), [orphan_id]);

    // Dropping point 1 releases its root, its leaf, and b.
    let mut batch = IndexBatch::default();
    batch.delete_point("i", 1);
    v.commit_catalog(batch, &[r1]).unwrap();
    assert_eq!(count(&ChunkId::of(a)), 1);
    assert_eq!(count(&ChunkId::of(b)), 0);
    assert_eq!(v.index().unreferenced_from(None, 10).unwrap().len(), 4);
    let before = counts(&v);

    // An old vault: no counts at all. The first writer rebuilds them.
    let ids: Vec<ChunkId> = before.iter().map(|(id, _)| *id).collect();
    let mut wipe = IndexBatch::default();
    wipe.wipe_gc_layout(&ids);
    v.index().commit(wipe).unwrap();
    assert!(!v.index().has_gc_layout().unwrap());
    drop(v);
    let v = Vault::open(&vdir, Access::Write).unwrap();
    assert!(v.index().has_gc_layout().unwrap());
    assert_eq!(
        counts(&v),
        before,
        "the orphan leaf, the dead root and leaf keep their kinds"
    );
    assert_eq!(v.index().unreferenced_from(None, 10).unwrap().len(), 4);
}
