//! Throughput benchmarks: hashing, compression, chunk record encode and
//! decode, and whole backups of an in-memory image. Compare ratios measured
//! in one run; the machines are shared and noisy.

use std::hint::black_box;

use coffre_engine::vault_ops::{CreateOptions, create_vault};
use coffre_engine::{BackupOptions, MemImage, NoProgress, SystemClock, backup};
use coffre_vault_store::ChunkId;
use coffre_vault_store::format::record::{RecordEncoder, decode};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const BLOCK: usize = 64 << 10;

/// Deterministic data that compresses like a filesystem: text runs,
/// random runs and zero runs.
fn sample(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = 4096 + (next() % 60_000) as usize;
        match next() % 4 {
            0 | 1 => {
                let words = [
                    &b"kernel "[..],
                    b"vault ",
                    b"block ",
                    b"image\n",
                    b"restore ",
                ];
                while out.len() < len && run > 0 {
                    out.extend_from_slice(words[(next() % 5) as usize]);
                    if out.len() % run < 8 {
                        break;
                    }
                }
            }
            2 => out.extend((0..run).map(|_| next() as u8)),
            _ => out.extend(std::iter::repeat_n(0u8, run)),
        }
    }
    out.truncate(len);
    out
}

fn hashing(c: &mut Criterion) {
    let block = sample(BLOCK, 1);
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("blake3_64k", |b| b.iter(|| ChunkId::of(black_box(&block))));
    g.finish();
}

fn compression(c: &mut Criterion) {
    let block = sample(BLOCK, 2);
    let mut g = c.benchmark_group("compress");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for level in [1, 3, 6] {
        let mut z = zstd::bulk::Compressor::new(level).unwrap();
        g.bench_with_input(BenchmarkId::new("zstd", level), &level, |b, _| {
            b.iter(|| z.compress(black_box(&block)).unwrap())
        });
    }
    g.finish();
}

fn records(c: &mut Criterion) {
    let block = sample(BLOCK, 3);
    let id = ChunkId::of(&block);
    let mut enc = RecordEncoder::new(1);
    let rec = enc.encode(id, &block).unwrap();
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("encode_zstd1", |b| {
        b.iter(|| enc.encode(id, black_box(&block)).unwrap())
    });
    g.bench_function("decode_verify", |b| {
        b.iter(|| decode(black_box(&rec)).unwrap())
    });
    g.finish();
}

/// An empty vault with default settings in a temporary directory.
fn fresh_vault() -> (tempfile::TempDir, coffre_vault_store::Vault) {
    let dir = tempfile::tempdir().unwrap();
    let vault = create_vault(
        &dir.path().join("v"),
        &CreateOptions::default(),
        &SystemClock,
    )
    .unwrap();
    (dir, vault)
}

fn full_backup(c: &mut Criterion) {
    const SIZE: usize = 64 << 20;
    let image = sample(SIZE, 4);
    let mut changed = image.clone();
    for i in (0..SIZE).step_by(SIZE / 16) {
        changed[i..i + 4096].fill(0xa5);
    }
    let mut g = c.benchmark_group("backup");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    let opts = BackupOptions::new("bench", "/bench.img");
    g.bench_function("full_64MiB", |b| {
        b.iter_with_setup(fresh_vault, |(_dir, vault)| {
            let src = MemImage::new("bench.img", image.clone());
            backup(&vault, &src, &opts, &SystemClock, &NoProgress).unwrap();
        })
    });
    g.bench_function("incremental_64MiB", |b| {
        b.iter_with_setup(
            || {
                let (dir, vault) = fresh_vault();
                let src = MemImage::new("bench.img", image.clone());
                backup(&vault, &src, &opts, &SystemClock, &NoProgress).unwrap();
                (dir, vault)
            },
            |(_dir, vault)| {
                let src = MemImage::new("bench.img", changed.clone());
                backup(&vault, &src, &opts, &SystemClock, &NoProgress).unwrap();
            },
        )
    });
    g.finish();
}

fn decompression(c: &mut Criterion) {
    let block = sample(BLOCK, 5);
    let packed = zstd::bulk::compress(&block, 1).unwrap();
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    let mut g = c.benchmark_group("decompress");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("zstd1_64k", |b| {
        b.iter(|| d.decompress(black_box(&packed), BLOCK).unwrap())
    });
    g.finish();
}

/// Changed-block hints: the per-window dirty mask, the sample of clean
/// blocks, the reflink extent diff and parsing a list.
fn changed_blocks(c: &mut Criterion) {
    use coffre_snapshotter::cbt::{Hint, HintSource, Sampling, list, reflink};
    // 2 GiB in 64 KiB blocks, 300 extents of 64-256 KiB.
    let blocks = 32_768u64;
    let extents: Vec<std::ops::Range<u64>> = (0..300u64)
        .map(|i| {
            let at = i * 7_000_000 + 4096;
            at..at + 65_536 + (i % 4) * 65_536
        })
        .collect();
    let hint = Hint::new(HintSource::List, extents.clone());
    let mut g = c.benchmark_group("cbt");
    g.bench_function("mask_2GiB", |b| {
        b.iter(|| {
            (0..blocks)
                .step_by(512)
                .map(|first| hint.dirty_mask(65_536, first, 512).len())
                .sum::<usize>()
        })
    });
    g.bench_function("sample_2GiB", |b| {
        b.iter(|| hint.sample(65_536, blocks, Sampling::default(), "job"))
    });
    let json = list::to_json(&hint);
    g.bench_function("parse_list_300", |b| {
        b.iter(|| list::parse(black_box(json.as_bytes())).unwrap())
    });
    let e = |l: u64, p: u64, n: u64| reflink::Extent {
        logical: l,
        physical: p,
        length: n,
        flags: 0,
    };
    let old: Vec<reflink::Extent> = (0..4096)
        .map(|i| e(i << 19, 1 << 40 | i << 19, 1 << 19))
        .collect();
    let mut new = old.clone();
    for (i, x) in new.iter_mut().enumerate().step_by(13) {
        x.physical = 1 << 41 | (i as u64) << 19;
    }
    g.bench_function("reflink_diff_4096_extents", |b| {
        b.iter(|| reflink::changed(black_box(&new), black_box(&old), 1 << 31))
    });
    g.finish();
}

fn restore_stage(c: &mut Criterion) {
    const SIZE: usize = 64 << 20;
    let image = sample(SIZE, 6);
    let (dir, vault) = fresh_vault();
    let src = MemImage::new("bench.img", image);
    let opts = BackupOptions::new("bench", "/bench.img");
    backup(&vault, &src, &opts, &SystemClock, &NoProgress).unwrap();
    let point = coffre_engine::points::select_point(&vault, "bench", "latest").unwrap();
    let mut g = c.benchmark_group("restore");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    let out = dir.path().join("out.img");
    g.bench_function("vault_64MiB", |b| {
        b.iter(|| {
            let _ = std::fs::remove_file(&out);
            let mut o = coffre_engine::RestoreOptions::new(&out);
            o.from = coffre_engine::restore::RestoreFrom::Vault;
            coffre_engine::restore(&vault, &point, &o, &NoProgress).unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    hashing,
    compression,
    decompression,
    records,
    changed_blocks,
    full_backup,
    restore_stage
);
criterion_main!(benches);
