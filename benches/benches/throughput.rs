//! Throughput benchmarks: hashing, compression, chunk record encode and
//! decode, and whole backups of an in-memory image. Compare ratios measured
//! in one run; the machines are shared and noisy.

use std::hint::black_box;

use coffre_engine::vault_ops::{CreateOptions, create_vault};
use coffre_engine::{BackupOptions, MemImage, NoProgress, SystemClock, backup};
use coffre_vault_store::ChunkId;
use coffre_vault_store::record::{RecordEncoder, decode};
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

criterion_group!(benches, hashing, compression, records, full_backup);
criterion_main!(benches);
