//! A point read in place from the vault: reads of many blocks, whose
//! records are fetched in runs; the read-ahead; a damaged record.

use std::os::unix::fs::FileExt;

use super::*;
use crate::points::PointEntry;
use crate::points::select_point;
use crate::test_vault::{noise, vault_with_point};

const BS: usize = 64 << 10;

/// 40 blocks and a bit, blocks 5 and 17 zero.
fn image() -> Vec<u8> {
    let mut image = noise(40 * BS + 1000);
    image[5 * BS..6 * BS].fill(0);
    image[17 * BS..18 * BS].fill(0);
    image
}

/// A vault in `dir` holding one point of [`image`], and the image.
fn vault_of_image(dir: &std::path::Path) -> (Vault, PointEntry, Vec<u8>) {
    let pool = crate::backup::thread_pool(2).unwrap();
    let want = image();
    let (vault, _) = vault_with_point(dir, &want, &pool);
    let point = select_point(&vault, "m", "latest").unwrap();
    (vault, point, want)
}

fn options(read_ahead: u64) -> AccessOptions {
    AccessOptions {
        cache_bytes: 64 << 20,
        read_ahead,
        from: Some(Served::Vault),
    }
}

#[test]
fn a_read_of_many_blocks_loads_them_in_runs_and_reads_what_the_point_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, point, want) = vault_of_image(dir.path());
    let img = PointImage::open(&vault, &point, &options(0)).unwrap();
    assert_eq!(img.size(), want.len() as u64);
    let mut got = vec![0xAAu8; want.len()];
    img.read_at(0, &mut got).unwrap();
    assert!(got == want, "the whole image reads as the point holds it");
    // Its 39 data blocks were decoded once, before the read copied them
    // out of the cache: loaded as a batch, not one by one as it went.
    let stats = img.stats();
    assert_eq!(stats.decoded.load(Ordering::Relaxed), 39);
    assert_eq!(stats.from_runs.load(Ordering::Relaxed), 39);
    assert_eq!(stats.hits.load(Ordering::Relaxed), 39);
    // With a cache of 4 blocks, a read of the whole image loads only
    // what the cache keeps until it is copied: each block is decoded
    // once, not loaded, dropped and decoded again.
    let small = AccessOptions {
        cache_bytes: 4 * BS as u64,
        ..options(0)
    };
    let img = PointImage::open(&vault, &point, &small).unwrap();
    got.fill(0xAA);
    img.read_at(0, &mut got).unwrap();
    assert!(got == want);
    assert_eq!(img.stats().decoded.load(Ordering::Relaxed), 39);
    // Reads at odd offsets and lengths, across zero blocks and the short
    // last block, on a fresh image (nothing cached).
    let img = PointImage::open(&vault, &point, &options(0)).unwrap();
    for (offset, len) in [
        (1000usize, 3 * BS),
        (4 * BS - 7, 3 * BS + 14),
        (16 * BS, 2 * BS + 1),
        (38 * BS + 5, 2 * BS + 995),
        (33 * BS, 1),
    ] {
        let mut got = vec![0xAAu8; len];
        img.read_at(offset as u64, &mut got).unwrap();
        assert!(got == want[offset..offset + len], "{offset}+{len}");
    }
}

#[test]
fn a_damaged_record_fails_the_reads_that_need_it_never_reading_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, point, want) = vault_of_image(dir.path());
    let img = PointImage::open(&vault, &point, &options(0)).unwrap();
    // One byte of block 3's record flipped, in its payload (the vault
    // has no other copy).
    let (_, place) = img.blocks.place(3).unwrap().expect("block 3 has a record");
    let seg = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(vault.segment_path(place.file))
        .unwrap();
    let at = place.offset + u64::from(place.len) - 100;
    let mut byte = [0u8; 1];
    seg.read_exact_at(&mut byte, at).unwrap();
    seg.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    seg.sync_all().unwrap();
    // A read of blocks 0-9 fails, naming the block; so does block 3
    // alone; the blocks around it read exactly.
    let mut got = vec![0u8; 10 * BS];
    let err = img.read_at(0, &mut got).unwrap_err().to_string();
    assert!(err.contains("block 3"), "{err}");
    let mut one = vec![0u8; 100];
    let err = img.read_at(3 * BS as u64 + 10, &mut one).unwrap_err();
    assert!(err.to_string().contains("block 3"), "{err}");
    let mut after = vec![0u8; 6 * BS];
    img.read_at(4 * BS as u64, &mut after).unwrap();
    assert!(after == want[4 * BS..10 * BS]);
    let mut before = vec![0u8; 3 * BS];
    img.read_at(0, &mut before).unwrap();
    assert!(before == want[..3 * BS]);
    assert!(img.stats().damaged.load(Ordering::Relaxed) >= 2);
    // The 8 other data blocks of the first read came from their records
    // read in runs (and stayed cached); block 3's record was read there
    // too, failed its checks, and was read again the ordinary way, which
    // reported it.
    assert_eq!(img.stats().from_runs.load(Ordering::Relaxed), 8);
}

#[test]
fn a_sequential_reader_is_read_ahead_by_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, point, want) = vault_of_image(dir.path());
    // 16 blocks ahead.
    let img = PointImage::open(&vault, &point, &options(16 * BS as u64)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| img.read_ahead_worker(&stop));
        // The worker stops however the test ends (an assertion too).
        let _stop = Stop(&stop);
        // Reading block 0 queues blocks 1-16 (5 is zero): 15 to decode,
        // which the worker does on its own.
        let mut b = vec![0u8; BS];
        img.read_at(0, &mut b).unwrap();
        assert!(b == want[..BS]);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while img.stats().decoded.load(Ordering::Relaxed) < 16 {
            assert!(std::time::Instant::now() < deadline, "no read-ahead");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Blocks 1-16 are then read from the cache.
        let hits = img.stats().hits.load(Ordering::Relaxed);
        for k in 1..=16usize {
            img.read_at((k * BS) as u64, &mut b).unwrap();
            assert!(b == want[k * BS..(k + 1) * BS], "block {k}");
        }
        assert_eq!(img.stats().hits.load(Ordering::Relaxed), hits + 15);
    });
}

/// Sets its flag when dropped.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
