//! Tests of the fault store: torn operations and power loss over a
//! [`LocalStore`].

use super::*;
use crate::store::LocalStore;
use std::sync::Arc;

fn stores(seed: u64) -> (tempfile::TempDir, SharedStore, FaultStore, Faults) {
    let t = tempfile::tempdir().unwrap();
    let inner: SharedStore = Arc::new(LocalStore::new(t.path()));
    let faults = Faults::default();
    faults.seed(seed);
    let f = FaultStore::new(inner.clone(), faults.clone());
    (t, inner, f, faults)
}

/// Every outcome of a torn `put` is the old or the new content (plus,
/// at most, a temporary file), never a mix, unless renames are
/// unordered.
#[test]
fn a_torn_put_leaves_the_old_or_the_new_content() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let (_t, inner, f, faults) = stores(seed);
        f.put("state/x", b"old content").unwrap();
        faults.power_loss_at(1);
        assert!(f.put("state/x", b"the new content").is_err());
        assert!(faults.is_off());
        assert!(f.get("state/x").is_err(), "the power is off");
        let now = inner.get("state/x").unwrap().unwrap();
        assert!(
            now == b"old content" || now == b"the new content",
            "seed {seed}: {:?}",
            String::from_utf8_lossy(&now)
        );
        let tmp = inner.list("state").unwrap().len() == 2;
        seen.insert((now == b"old content", tmp));
    }
    assert_eq!(seen.len(), 3, "outcomes seen: {seen:?}");
    let mut partial = false;
    for seed in 0..64 {
        let (_t, inner, f, faults) = stores(seed);
        faults.unordered_renames(true);
        faults.power_loss_at(1);
        assert!(f.put("y", b"0123456789").is_err());
        if let Some(b) = inner.get("y").unwrap() {
            partial |= b.len() < 10;
            assert_eq!(b, b"0123456789"[..b.len()]);
        }
    }
    assert!(partial, "no torn put left a partial file");
}

#[test]
fn torn_removals_cuts_and_writes_are_done_or_not() {
    let (mut gone, mut kept, mut cut, mut sectors) = (0, 0, 0, 0);
    for seed in 0..32 {
        let (_t, inner, f, faults) = stores(seed);
        f.put("a", &[1u8; 4096]).unwrap();
        f.put("b", &[2u8; 4096]).unwrap();
        faults.power_loss_at(1);
        assert!(f.delete("a").is_err());
        match inner.get("a").unwrap() {
            None => gone += 1,
            Some(b) => {
                assert_eq!(b, vec![1u8; 4096]);
                kept += 1;
            }
        }
        let (_t, inner, f, faults) = stores(seed);
        f.put("b", &[2u8; 4096]).unwrap();
        faults.power_loss_at(1);
        assert!(f.truncate("b", 100).is_err());
        let len = inner.size("b").unwrap().unwrap();
        assert!(len == 100 || len == 4096);
        cut += u64::from(len == 100);
        let (_t, inner, f, faults) = stores(seed);
        f.put("c", &[3u8; 4096]).unwrap();
        faults.power_loss_at(1);
        assert!(f.write_at("c", 0, &[4u8; 4096]).is_err());
        let b = inner.get("c").unwrap().unwrap();
        for s in b.chunks(512) {
            assert!(s == [3u8; 512] || s == [4u8; 512], "a sector is torn");
            sectors += u64::from(s == [4u8; 512]);
        }
    }
    assert!(gone > 0 && kept > 0 && cut > 0 && cut < 32 && sectors > 0);
}

/// The power goes out at one operation: another thread's operation that
/// comes while the first is being torn finds it gone, and is not torn
/// too. A second tear would drop what was not durable again, after the
/// first had forgotten which files already existed: a segment written
/// by an earlier, completed backup could then vanish.
#[test]
fn only_one_operation_tears_when_the_power_goes() {
    let (t, inner, f, faults) = stores(1);
    let mut a = f.create("seg").unwrap();
    a.append(&[7u8; 1000]).unwrap();
    a.sync().unwrap();
    drop(a);
    let mut a = f.append_to("seg", 1000).unwrap();
    a.append(&[8u8; 1000]).unwrap();
    faults.power_loss_at(1);
    // The torn operation has begun (another thread's, say) and not yet
    // called power_off; a sync now must not tear as well.
    assert!(faults.begin("other").unwrap(), "this one tears");
    assert!(faults.is_off());
    assert!(
        faults.begin("another").is_err(),
        "no second operation tears"
    );
    assert!(
        a.sync().is_err(),
        "the power is gone for every other operation"
    );
    faults.power_off("other", "not done");
    // The segment that existed before keeps at least its synced bytes.
    let len = inner.size("seg").unwrap().unwrap();
    assert!((1000..=2000).contains(&len), "{len}");
    drop(t);
}

/// Unsynced appends are cut back (to any prefix), on every store of
/// the handle at once; a file never synced may vanish.
#[test]
fn power_loss_drops_what_no_sync_covered_on_every_store() {
    let mut vanished = 0;
    for seed in 0..32 {
        let (t, inner, f, faults) = stores(seed);
        let inner2: SharedStore = Arc::new(LocalStore::new(t.path().join("copy2")));
        let f2 = FaultStore::new(inner2.clone(), faults.clone());
        for (st, inn) in [(&f, &inner), (&f2, &inner2)] {
            let mut a = st.create("seg").unwrap();
            a.append(&[7u8; 1000]).unwrap();
            a.sync().unwrap();
            a.append(&[8u8; 1000]).unwrap();
            a.sync().unwrap();
            drop(a);
            let mut a = st.append_to("seg", 2000).unwrap();
            a.append(&[9u8; 3000]).unwrap();
            a.start_writeback().unwrap();
            let _ = inn;
            std::mem::forget(a);
            let mut n = st.create("new").unwrap();
            n.append(&[1u8; 10]).unwrap();
            std::mem::forget(n);
        }
        faults.power_loss_at(1);
        assert!(f.size("seg").is_err());
        for inn in [&inner, &inner2] {
            let len = inn.size("seg").unwrap().unwrap();
            assert!((2000..=5000).contains(&len), "{len}");
            vanished += u64::from(inn.size("new").unwrap().is_none());
        }
    }
    assert!(vanished > 0);
}

#[test]
fn a_failed_directory_fsync_fails_the_operation_and_may_be_undone() {
    let mut undone = 0;
    for seed in 0..16 {
        let (_t, inner, f, faults) = stores(seed);
        f.put("d/x", b"old").unwrap();
        faults.fail_dir_sync_at(1);
        let e = f.put("d/x", b"new").unwrap_err();
        assert!(e.to_string().contains("directory fsync"), "{e}");
        assert_eq!(faults.failed_dir_syncs(), 1);
        faults.power_loss_at(1);
        assert!(f.get("d/x").is_err());
        undone += u64::from(inner.get("d/x").unwrap().unwrap() == b"old");
    }
    assert!(undone > 0 && undone < 16, "{undone}");
    // A later directory fsync of the same folder makes it durable.
    let (_t, inner, f, faults) = stores(1);
    f.put("e/x", b"old").unwrap();
    faults.fail_dir_sync_at(1);
    assert!(f.put("e/x", b"new").is_err());
    f.put("e/y", b"other").unwrap();
    faults.power_loss_at(1);
    assert!(f.get("e/x").is_err());
    assert_eq!(inner.get("e/x").unwrap().unwrap(), b"new");
}
