//! Tests of the index's value encodings (chunk locations, segment states,
//! reference counts) and of its place keys.

use super::keys::{place_from_key, place_key};
use super::*;
use crate::format::chunk_id::ChunkId;
use proptest::prelude::*;

proptest! {
    #[test]
    fn location_round_trip(segment: u64, offset: u64, len: u32, plain_len: u32) {
        let loc = ChunkLocation { segment, offset, len, plain_len };
        let possible = (crate::format::record::HEADER_LEN
            ..=crate::format::record::HEADER_LEN + crate::format::record::MAX_STORED_LEN)
            .contains(&(len as usize))
            && offset.checked_add(u64::from(len)).is_some();
        let want = possible.then_some(loc);
        prop_assert_eq!(ChunkLocation::decode(&loc.encode()), want);
    }
}

#[test]
fn segment_info_round_trip_and_v1() {
    let i = SegmentInfo {
        committed: 77,
        dead: 5,
        retired: true,
    };
    assert_eq!(SegmentInfo::decode(&i.encode()), Some(i));
    let mut v1 = vec![1u8];
    v1.extend_from_slice(&9u64.to_le_bytes());
    assert_eq!(
        SegmentInfo::decode(&v1),
        Some(SegmentInfo {
            committed: 9,
            ..SegmentInfo::default()
        })
    );
    assert_eq!(SegmentInfo::decode(&[2u8; 18]), None);
    let r = RefEntry {
        kind: ChunkKind::Leaf,
        count: 3,
    };
    assert_eq!(RefEntry::decode(&r.encode()), Some(r));
    assert_eq!(place_from_key(&place_key(3, 9)), Some((3, 9)));
}

#[test]
fn location_rejects_bad_bytes() {
    assert_eq!(ChunkLocation::decode(&[1u8; 24]), None);
    let mut v = ChunkLocation {
        segment: 1,
        offset: 2,
        len: 3,
        plain_len: 4,
    }
    .encode();
    v[0] = 9;
    assert_eq!(ChunkLocation::decode(&v), None);
    let at = |offset: u64, len: u32| {
        ChunkLocation::decode(
            &ChunkLocation {
                segment: 1,
                offset,
                len,
                plain_len: 4,
            }
            .encode(),
        )
    };
    assert!(at(64, 100).is_some());
    // Shorter than a record header, a 4 GiB buffer, an end past u64::MAX.
    assert_eq!(at(64, 3), None);
    assert_eq!(at(64, u32::MAX), None);
    assert_eq!(at(u64::MAX - 10, 100), None);
}

#[test]
fn sorted_counts_read_by_walking_the_family_equal_one_lookup_each() {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open_write(dir.path()).unwrap();
    let ids: Vec<ChunkId> = (0..3000u32)
        .map(|i| ChunkId::of(&i.to_le_bytes()))
        .collect();
    let entry = |i: usize| RefEntry {
        kind: ChunkKind::Data,
        count: i as u64 + 1,
    };
    // Half the counts in a table file, half in the memtable: the walk
    // merges both.
    for half in ids.chunks(1500) {
        let mut b = IndexBatch::default();
        for id in half {
            let i = ids.iter().position(|x| x == id).unwrap();
            b.put_ref_change(id, entry(i), None);
        }
        index.commit(b).unwrap();
        if half.first() == ids.first() {
            index.flush().unwrap();
        }
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    // Most of the family, a long gap (sought, not walked), keys it lacks
    // in between and past the end, and a repeated one.
    let mut wanted: Vec<ChunkId> = sorted[..1200].to_vec();
    wanted.extend_from_slice(&sorted[2800..]);
    wanted.extend((0..300u32).map(|i| ChunkId::of(&(i + 1_000_000).to_le_bytes())));
    wanted.push(sorted[5]);
    // Before the first key and past the last: the walk starts or ends off
    // the family.
    wanted.push(ChunkId([0; 32]));
    wanted.push(ChunkId([0xff; 32]));
    wanted.sort_unstable();
    let handle = index.db.cf_handle(Cf::Refs.name()).unwrap();
    assert!(index.dense(handle, wanted.len()), "the walk must be taken");
    let one_by_one: Vec<Option<RefEntry>> = wanted
        .iter()
        .map(|id| index.chunk_ref(id).unwrap())
        .collect();
    assert_eq!(index.chunk_refs(&wanted, true).unwrap(), one_by_one);
    assert_eq!(one_by_one.iter().filter(|e| e.is_none()).count(), 302);
    let i = ids.iter().position(|x| *x == sorted[2999]).unwrap();
    assert_eq!(
        one_by_one
            .iter()
            .flatten()
            .find(|e| e.count == i as u64 + 1),
        Some(&entry(i))
    );
    // A few keys of a large family are looked up one by one.
    assert!(!index.dense(handle, 200));
    let few = &wanted[..200];
    assert_eq!(
        index.chunk_refs(few, true).unwrap(),
        one_by_one[..200].to_vec()
    );
    // A damaged count is an error, walked or not.
    let mut b = IndexBatch::default();
    b.put(Cf::Refs, sorted[7].as_bytes().to_vec(), vec![9u8; 3]);
    index.commit(b).unwrap();
    assert!(index.chunk_refs(&wanted, true).is_err());
    let damaged_at = wanted.iter().position(|id| *id == sorted[7]).unwrap();
    let few = &wanted[damaged_at.saturating_sub(10)..damaged_at + 10];
    assert!(!index.dense(handle, few.len()));
    assert!(index.chunk_refs(few, true).is_err());
}

/// A block map for [`RefCounter::incref`]: each node's children.
struct Nodes(std::collections::HashMap<ChunkId, Vec<ChunkId>>);

impl refs::NodeChildren for Nodes {
    fn children(&self, id: &ChunkId, _kind: ChunkKind) -> Result<Vec<ChunkId>> {
        Ok(self.0.get(id).cloned().unwrap_or_default())
    }
}

fn id(name: &str) -> ChunkId {
    ChunkId::of(name.as_bytes())
}

/// Commits `counts` as the index's own.
fn with_counts(index: &Index, counts: &[(ChunkId, ChunkKind, u64)]) {
    let mut b = IndexBatch::default();
    for (id, kind, count) in counts {
        b.put_ref_change(
            id,
            RefEntry {
                kind: *kind,
                count: *count,
            },
            None,
        );
    }
    index.commit(b).unwrap();
}

#[test]
fn a_new_root_counts_each_reference_once_and_only_new_nodes_children() {
    use refs::RefCounter;
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open_write(dir.path()).unwrap();
    // An older point's leaf l3 (alive) and its data d1..d3, and d0.
    with_counts(
        &index,
        &[
            (id("l3"), ChunkKind::Leaf, 1),
            (id("d0"), ChunkKind::Data, 1),
            (id("d1"), ChunkKind::Data, 1),
            (id("d2"), ChunkKind::Data, 1),
            (id("d3"), ChunkKind::Data, 1),
        ],
    );
    let nodes = Nodes(
        [
            ("r", vec!["l1", "l2", "l3"]),
            ("l1", vec!["d0", "n1", "d0"]),
            ("l2", vec!["d0", "d1"]),
            ("l3", vec!["d1", "d2", "d3"]),
        ]
        .into_iter()
        .map(|(n, c)| (id(n), c.into_iter().map(id).collect()))
        .collect(),
    );
    let mut counter = RefCounter::new(&index);
    counter.insert_new(id("r"), ChunkKind::Root);
    counter.insert_new(id("l1"), ChunkKind::Leaf);
    counter.insert_new(id("l2"), ChunkKind::Leaf);
    counter.insert_new(id("n1"), ChunkKind::Data);
    counter.incref(&id("r"), &nodes).unwrap();
    let mut b = IndexBatch::default();
    counter.write_to(&mut b);
    index.commit(b).unwrap();
    // l3 was alive: one more reference, its children untouched.
    for (name, want) in [
        ("r", 1),
        ("l1", 1),
        ("l2", 1),
        ("l3", 2),
        ("d0", 4),
        ("n1", 1),
        ("d1", 2),
        ("d2", 1),
        ("d3", 1),
    ] {
        assert_eq!(
            index.chunk_ref(&id(name)).unwrap().unwrap().count,
            want,
            "{name}"
        );
    }
    // A reference to a chunk with no count at all is an error.
    let nodes = Nodes([(id("r2"), vec![id("l4")]), (id("l4"), vec![id("lost")])].into());
    let mut counter = RefCounter::new(&index);
    counter.insert_new(id("r2"), ChunkKind::Root);
    counter.insert_new(id("l4"), ChunkKind::Leaf);
    assert!(counter.incref(&id("r2"), &nodes).is_err());
}

#[test]
fn a_root_with_more_references_than_one_batch_counts_them_all() {
    use refs::{COUNT_BATCH, RefCounter};
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open_write(dir.path()).unwrap();
    let leaves = 40usize;
    let per_leaf = COUNT_BATCH / 16;
    let mut map = std::collections::HashMap::new();
    let mut counter = RefCounter::new(&index);
    let root = id("root");
    counter.insert_new(root, ChunkKind::Root);
    let shared = id("shared");
    counter.insert_new(shared, ChunkKind::Data);
    let mut leaf_ids = Vec::new();
    for l in 0..leaves {
        let leaf = id(&format!("leaf{l}"));
        counter.insert_new(leaf, ChunkKind::Leaf);
        let mut children: Vec<ChunkId> =
            (0..per_leaf).map(|c| id(&format!("leaf{l}/{c}"))).collect();
        for c in &children {
            counter.insert_new(*c, ChunkKind::Data);
        }
        children.push(shared);
        map.insert(leaf, children);
        leaf_ids.push(leaf);
    }
    map.insert(root, leaf_ids);
    counter.incref(&root, &Nodes(map)).unwrap();
    let mut b = IndexBatch::default();
    counter.write_to(&mut b);
    index.commit(b).unwrap();
    assert_eq!(
        index.chunk_ref(&shared).unwrap().unwrap().count,
        leaves as u64
    );
    for l in [0, leaves / 2, leaves - 1] {
        for c in [0, per_leaf - 1] {
            let e = index
                .chunk_ref(&id(&format!("leaf{l}/{c}")))
                .unwrap()
                .unwrap();
            assert_eq!(e.count, 1, "leaf{l}/{c}");
        }
        assert_eq!(
            index
                .chunk_ref(&id(&format!("leaf{l}")))
                .unwrap()
                .unwrap()
                .count,
            1
        );
    }
}
