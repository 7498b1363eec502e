//! Tests of the index's value encodings (chunk locations, segment states,
//! reference counts) and of its place keys.

use super::keys::{place_from_key, place_key};
use super::*;
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
