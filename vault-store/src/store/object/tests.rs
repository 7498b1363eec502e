//! Tests of the object store, on the in-memory `object_store` backend.

use super::*;
use crate::store::parts::check_part_list;

#[test]
fn part_lists_with_overlaps_or_overflow_are_refused() {
    assert!(check_part_list(&[]).is_ok());
    assert!(check_part_list(&[(0, 10), (10, 5)]).is_ok());
    // A gap is a punched part.
    assert!(check_part_list(&[(0, 10), (20, 5)]).is_ok());
    let e = check_part_list(&[(0, 10), (8, 5)]).unwrap_err();
    assert!(e.contains("overlaps"), "{e}");
    let e = check_part_list(&[(0, 10), (u64::MAX - 1, 5)]).unwrap_err();
    assert!(e.contains("largest offset"), "{e}");
}

fn mem() -> ObjectStoreCopy {
    ObjectStoreCopy::open("memory://vault").unwrap()
}

#[test]
fn a_segment_is_parts_cut_at_every_sync_and_reads_span_them() {
    let s = mem();
    let mut a = s.create("segments/01.seg").unwrap();
    let data: Vec<u8> = (0..(PART_LEN * 2 + 12345))
        .map(|i| (i % 251) as u8)
        .collect();
    a.append(&data[..100]).unwrap();
    a.sync().unwrap();
    a.append(&data[100..]).unwrap();
    a.sync().unwrap();
    drop(a);
    let parts = s.list_parts("segments/01.seg").unwrap();
    assert_eq!(parts.first(), Some(&(0, 100)));
    assert!(parts.len() >= 3, "{parts:?}");
    assert_eq!(s.size("segments/01.seg").unwrap(), Some(data.len() as u64));
    let mut buf = vec![0u8; data.len() - 100];
    s.forget();
    s.read_at("segments/01.seg", 50, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[50..50 + buf.len()]);
    let mut past = [0u8; 2];
    assert!(
        s.read_at("segments/01.seg", data.len() as u64 - 1, &mut past)
            .is_err()
    );
    assert_eq!(s.list("segments").unwrap(), vec!["01.seg".to_string()]);
}

#[test]
fn appending_after_a_committed_length_cuts_what_lies_past_it() {
    let s = mem();
    let mut a = s.create("segments/02.seg").unwrap();
    a.append(&[1u8; 1000]).unwrap();
    a.sync().unwrap();
    a.append(&[2u8; 1000]).unwrap();
    a.sync().unwrap();
    drop(a);
    // Only 1500 bytes were committed: the tail is cut, even inside a part.
    let mut a = s.append_to("segments/02.seg", 1500).unwrap();
    a.append(&[3u8; 10]).unwrap();
    a.sync().unwrap();
    drop(a);
    assert_eq!(s.size("segments/02.seg").unwrap(), Some(1510));
    let mut buf = [0u8; 12];
    s.read_at("segments/02.seg", 1498, &mut buf).unwrap();
    assert_eq!(buf, [2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]);
    assert!(s.delete("segments/02.seg").unwrap());
    assert_eq!(s.size("segments/02.seg").unwrap(), None);
}

#[test]
fn conditional_puts_refuse_to_overwrite_unseen_changes() {
    let s = mem();
    assert!(s.put_new("points/a/1.point", b"one").unwrap());
    assert!(!s.put_new("points/a/1.point", b"two").unwrap());
    assert_eq!(s.get("points/a/1.point").unwrap().unwrap(), b"one");
    s.put("lease", b"a").unwrap();
    let (_, v) = s.get_version("lease").unwrap().unwrap();
    let v2 = s
        .put_if("lease", b"b", &v)
        .unwrap()
        .expect("first update wins");
    assert!(
        s.put_if("lease", b"c", &v).unwrap().is_none(),
        "stale version"
    );
    assert!(s.put_if("lease", b"d", &v2).unwrap().is_some());
    assert_eq!(s.get("lease").unwrap().unwrap(), b"d");
    assert_eq!(s.list("points").unwrap(), vec!["a/".to_string()]);
    assert_eq!(
        s.list("").unwrap(),
        vec!["lease".to_string(), "points/".to_string()]
    );
}

#[test]
fn a_repair_rewrites_the_bytes_in_place() {
    let s = mem();
    let mut a = s.create("segments/03.seg").unwrap();
    a.append(&[7u8; 300]).unwrap();
    a.sync().unwrap();
    a.append(&[8u8; 300]).unwrap();
    a.sync().unwrap();
    drop(a);
    s.write_at("segments/03.seg", 290, &[9u8; 20]).unwrap();
    let mut buf = [0u8; 22];
    s.read_at("segments/03.seg", 289, &mut buf).unwrap();
    assert_eq!(buf[0], 7);
    assert!(buf[1..21].iter().all(|b| *b == 9));
    assert_eq!(buf[21], 8);
}

#[test]
fn names_that_leave_the_prefix_are_refused() {
    let s = mem();
    assert!(s.put("../x", b"").is_err());
    assert!(s.put("/x", b"").is_err());
    assert!(s.put("a//b", b"").is_err());
}
