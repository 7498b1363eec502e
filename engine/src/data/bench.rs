//! `coffre bench`: what this machine does with coffre's data path, stage
//! by stage, each figure next to the machine's own reference for the same
//! work, like `proxmox-backup-client benchmark`:
//!
//! | stage | what | reference |
//! |---|---|---|
//! | `read` | page-cache read of the generated image | — (it is the reference) |
//! | `blake3-1` / `blake3-all` | chunk ids of 64 KiB blocks, one / all threads | `b3sum --num-threads 1` / `b3sum` |
//! | `zstd-compress` / `zstd-decompress` | the vault's level, per block, one thread | `zstd -b<level> -B<block size> --single-thread` |
//! | `chunk-encode` / `chunk-decode` | a whole record: compress + CRC / CRC + decompress + BLAKE3 check, one thread | the zstd figures |
//! | `aes-256-gcm` / `chacha20-poly1305` | sealing blocks as an encrypted vault does (a fresh nonce each; AES under a per-block subkey), one thread | `openssl speed -evp aes-256-gcm` / `… chacha20-poly1305`, 64 KiB |
//! | `backup` | end to end over a generated image in a temporary vault | `read` |
//! | `disk-write` | the disk floor: the restore's data bytes written to a new file like `dd bs=4M oflag=direct conv=fsync` (the median of three, around the restores) | — |
//! | `restore` / `restore-vault` | end to end, from the snapshot tier (the default) / from the vault, to a new file | `disk-write` |
//!
//! zstd's own benchmark compresses its input as independent blocks of the
//! vault's block size (`-B`), as the vault does: on the whole file at once
//! (`-B0`), one long frame, it runs 20–30 % faster (measured on the ext4
//! image of the shared benchmark: 404–440 against 318–338 MB/s compressing
//! at level 1, 1,063–1,076 against 705–993 MB/s decompressing), which is
//! the gap an earlier reference showed, not a slower build of the library.
//! The restore's ratio is its time over the floor's (`floor_factor`), so
//! 1.25 means a quarter slower than the disk alone. The floor writes from
//! small pages, as `dd` does, and a restore writes from huge pages
//! (`direct`'s module words): with its records cached a restore can come in
//! under the floor (measured 0.71–0.96 on the shared day-two image).
//!
//! External references are skipped (and say so) where the tool is not
//! installed. Ratios are what to compare: the machines are shared.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use coffre_vault_store::ChunkId;
use coffre_vault_store::format::record::{RecordDecoder, RecordEncoder, RecordHeader};
use coffre_vault_store::store::local::direct::{AlignedBuf, DIRECT_ALIGN, open_direct};
use rayon::prelude::*;
use serde::Serialize;

use crate::clock::SystemClock;
use crate::error::{EngineError, Result};
use crate::progress::NoProgress;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Size of the generated image (bytes).
    pub image_size: u64,
    /// zstd level (the vault default unless given).
    pub level: i32,
    /// Block size.
    pub block_size: u32,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Where the image and the vault go (a temporary folder inside it).
    pub dir: std::path::PathBuf,
}

/// A reference figure.
#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    /// What was run.
    pub name: String,
    /// MiB/s, when it ran.
    pub mib_per_s: Option<f64>,
    /// Why it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// One stage's figure.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    /// Stage name.
    pub name: &'static str,
    /// What it measures.
    pub what: String,
    /// MiB of input per second.
    pub mib_per_s: f64,
    /// The machine's reference for the same work.
    pub reference: Option<Reference>,
    /// `mib_per_s` / the reference's.
    pub ratio: Option<f64>,
    /// Restores only: the restore's time over the disk floor's (1.25: a
    /// quarter slower than the disk alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_factor: Option<f64>,
}

/// Everything `coffre bench` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Threads used.
    pub threads: usize,
    /// Image size (bytes).
    pub image_size: u64,
    /// Compressed / plain on the generated data.
    pub compression_ratio: f64,
    /// zstd level.
    pub level: i32,
    /// The stages.
    pub stages: Vec<Stage>,
}

/// Deterministic data that compresses like a filesystem image: text runs,
/// incompressible runs, zero runs and holes-to-be, about 2:1 with zstd 1.
pub fn generated(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    const WORDS: [&[u8]; 8] = [
        b"kernel: ",
        b"vault ",
        b"block ",
        b"image\n",
        b"restore ",
        b"0x7f3a ",
        b"ok ",
        b"eth0 ",
    ];
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = 4096 + (next() % 120_000) as usize;
        let end = (out.len() + run).min(len);
        match next() % 8 {
            0..=3 => {
                while out.len() < end {
                    out.extend_from_slice(WORDS[(next() % 8) as usize]);
                }
                out.truncate(end);
            }
            4 | 5 => {
                while out.len() < end {
                    out.extend_from_slice(&next().to_le_bytes());
                }
                out.truncate(end);
            }
            _ => out.resize(end, 0),
        }
    }
    out
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

/// Runs `f` until at least `min_secs` passed (at least once); MiB/s of
/// `bytes` per run.
fn rate(bytes: u64, min_secs: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    let mut runs = 0u64;
    loop {
        f()?;
        runs += 1;
        if t.elapsed().as_secs_f64() >= min_secs {
            break;
        }
    }
    Ok(mib_s(bytes * runs, t.elapsed().as_secs_f64()))
}

fn tool_rate(name: &str, file_bytes: u64, cmd: &mut Command) -> Reference {
    let t = Instant::now();
    match cmd.output() {
        Ok(o) if o.status.success() => Reference {
            name: name.to_string(),
            mib_per_s: Some(mib_s(file_bytes, t.elapsed().as_secs_f64())),
            skipped: None,
        },
        Ok(o) => Reference {
            name: name.to_string(),
            mib_per_s: None,
            skipped: Some(format!(
                "failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
        },
        Err(e) => Reference {
            name: name.to_string(),
            mib_per_s: None,
            skipped: Some(format!("not installed ({e})")),
        },
    }
}

/// `openssl speed -evp ALG -bytes 65536 -seconds 1`: MiB/s from its last
/// line `AES-256-GCM    5769892.53k` (thousands of bytes per second).
fn openssl_speed(alg: &str) -> Reference {
    let name = format!("openssl speed -evp {alg} -bytes 65536");
    let skipped = |why: String| Reference {
        name: name.clone(),
        mib_per_s: None,
        skipped: Some(why),
    };
    let out = match Command::new("openssl")
        .args(["speed", "-evp", alg, "-bytes", "65536", "-seconds", "1"])
        .output()
    {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return skipped(format!(
                "failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(e) => return skipped(format!("not installed ({e})")),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let k = text
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.strip_suffix('k'))
        .and_then(|v| v.parse::<f64>().ok());
    match k {
        Some(k) => Reference {
            name: name.clone(),
            mib_per_s: Some(k * 1000.0 / (1 << 20) as f64),
            skipped: None,
        },
        None => skipped(format!("unreadable output {text:?}")),
    }
}

/// `zstd -b`: (compress, decompress) MiB/s from its report line
/// `-1  431562622 (4.976) 1194.17 MB/s 3915.9 MB/s  name`.
fn zstd_bench(file: &Path, level: i32, block_size: usize) -> (Reference, Reference) {
    let kib = block_size >> 10;
    let name_c = format!("zstd -b{level} -B{kib}K --single-thread (compress)");
    let name_d = format!("zstd -b{level} -B{kib}K --single-thread (decompress)");
    let out = Command::new("zstd")
        .arg(format!("-b{level}"))
        .arg(format!("-B{block_size}"))
        .args(["-i1", "--single-thread", "-q"])
        .arg(file)
        .output();
    let skipped = |why: String| Reference {
        name: String::new(),
        mib_per_s: None,
        skipped: Some(why),
    };
    let (c, d) = match out {
        Ok(o) if o.status.success() => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let speeds: Vec<f64> = text
                .lines()
                .last()
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|w| w[1] == "MB/s")
                .filter_map(|w| w[0].parse::<f64>().ok())
                .map(|mb| mb * 1e6 / (1 << 20) as f64)
                .collect();
            match speeds.as_slice() {
                [c, d, ..] => (
                    Reference {
                        name: String::new(),
                        mib_per_s: Some(*c),
                        skipped: None,
                    },
                    Reference {
                        name: String::new(),
                        mib_per_s: Some(*d),
                        skipped: None,
                    },
                ),
                _ => (
                    skipped(format!("unreadable output {text:?}")),
                    skipped(format!("unreadable output {text:?}")),
                ),
            }
        }
        Ok(o) => {
            let why = format!("failed: {}", String::from_utf8_lossy(&o.stderr).trim());
            (skipped(why.clone()), skipped(why))
        }
        Err(e) => (
            skipped(format!("not installed ({e})")),
            skipped(format!("not installed ({e})")),
        ),
    };
    (
        Reference { name: name_c, ..c },
        Reference { name: name_d, ..d },
    )
}

fn stage(name: &'static str, what: String, mib_per_s: f64, reference: Option<Reference>) -> Stage {
    let ratio = reference
        .as_ref()
        .and_then(|r| r.mib_per_s)
        .map(|r| mib_per_s / r.max(1e-9));
    Stage {
        name,
        what,
        mib_per_s,
        reference,
        ratio,
        floor_factor: None,
    }
}

/// Seconds to write `bytes` to a new file at `path` and fsync it, as
/// `dd bs=4M oflag=direct conv=fsync` does: `O_DIRECT` in 4 MiB writes,
/// one at a time, where the filesystem allows it, else buffered. The file
/// is removed afterwards.
fn disk_write(path: &Path, bytes: u64) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let io = |e: std::io::Error| EngineError::Bench(format!("{}: {e}", path.display()));
    const PIECE: usize = 4 << 20;
    // Small pages, as `dd`'s buffer: its requests are split alike.
    let mut buf = AlignedBuf::small_pages();
    buf.reserve(PIECE);
    buf.as_mut_slice().copy_from_slice(&generated(PIECE, 3));
    let file = std::fs::File::create(path).map_err(io)?;
    let direct = open_direct(path);
    let t = Instant::now();
    let mut at = 0u64;
    while at < bytes {
        let n = (bytes - at).min(PIECE as u64) as usize;
        let piece = buf.as_slice().get(..n).unwrap_or_default();
        match &direct {
            Some(d) if n.is_multiple_of(DIRECT_ALIGN) => d.write_all_at(piece, at),
            _ => file.write_all_at(piece, at),
        }
        .map_err(io)?;
        at += n as u64;
    }
    file.sync_all().map_err(io)?;
    let secs = t.elapsed().as_secs_f64();
    drop((file, direct));
    std::fs::remove_file(path).map_err(io)?;
    Ok(secs)
}

/// Measures every stage.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let io = |e: std::io::Error| EngineError::Bench(e.to_string());
    // File errors name the folder the benchmark writes in (a full disk).
    let file_io = |e: std::io::Error| EngineError::Bench(format!("in {}: {e}", opts.dir.display()));
    let dir = tempfile::Builder::new()
        .prefix("coffre-bench-")
        .tempdir_in(&opts.dir)
        .map_err(file_io)?;
    let pool = crate::backup::thread_pool(opts.threads)?;
    let threads = pool.current_num_threads();
    let bs = opts.block_size as usize;
    // The sample the in-memory stages work on, and the image on disk.
    let sample = generated(64 << 20, 7);
    let image = dir.path().join("bench.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&image).map_err(file_io)?;
        let mut written = 0u64;
        let mut seed = 11;
        while written < opts.image_size {
            let n = (opts.image_size - written).min(64 << 20) as usize;
            let part = generated(n, seed);
            f.write_all(&part).map_err(file_io)?;
            written += n as u64;
            seed += 1;
        }
        f.sync_all().map_err(file_io)?;
    }
    let image_bytes = opts.image_size;
    let mut stages = Vec::new();

    // Page-cache read (after one warming read).
    let read_file = || -> Result<()> {
        let mut f = std::fs::File::open(&image).map_err(file_io)?;
        let mut buf = vec![0u8; 4 << 20];
        while f.read(&mut buf).map_err(file_io)? > 0 {}
        Ok(())
    };
    read_file()?;
    let read = rate(image_bytes, 0.5, read_file)?;
    stages.push(stage(
        "read",
        "page-cache read of the generated image, 4 MiB reads".into(),
        read,
        None,
    ));
    let read_ref = || Reference {
        name: "page-cache read".into(),
        mib_per_s: Some(read),
        skipped: None,
    };

    let blocks: Vec<&[u8]> = sample.chunks(bs).collect();
    let sample_bytes = sample.len() as u64;
    let b3_one = rate(sample_bytes, 0.5, || {
        for b in &blocks {
            std::hint::black_box(ChunkId::of(b));
        }
        Ok(())
    })?;
    let b3sum_one = tool_rate(
        "b3sum --num-threads 1",
        image_bytes,
        Command::new("b3sum")
            .args(["--num-threads", "1"])
            .arg(&image),
    );
    stages.push(stage(
        "blake3-1",
        format!("chunk ids of {} KiB blocks, one thread", bs >> 10),
        b3_one,
        Some(b3sum_one),
    ));
    let b3_all = rate(sample_bytes, 0.5, || {
        pool.install(|| {
            blocks.par_iter().for_each(|b| {
                std::hint::black_box(ChunkId::of(b));
            })
        });
        Ok(())
    })?;
    let b3sum_all = tool_rate("b3sum", image_bytes, Command::new("b3sum").arg(&image));
    stages.push(stage(
        "blake3-all",
        format!("chunk ids, {threads} threads"),
        b3_all,
        Some(b3sum_all),
    ));

    // Compression at the vault's level, block by block.
    let mut z = zstd::bulk::Compressor::new(opts.level).map_err(io)?;
    let mut compressed: Vec<Vec<u8>> = Vec::with_capacity(blocks.len());
    let c = rate(sample_bytes, 0.5, || {
        compressed.clear();
        for b in &blocks {
            compressed.push(z.compress(b).map_err(io)?);
        }
        Ok(())
    })?;
    let packed: u64 = compressed.iter().map(|c| c.len() as u64).sum();
    let (zc, zd) = zstd_bench(&image, opts.level, bs);
    stages.push(stage(
        "zstd-compress",
        format!("zstd level {} per block, one thread", opts.level),
        c,
        Some(zc),
    ));
    let mut dz = zstd::bulk::Decompressor::new().map_err(io)?;
    let d = rate(sample_bytes, 0.5, || {
        for c in &compressed {
            std::hint::black_box(dz.decompress(c, bs).map_err(io)?);
        }
        Ok(())
    })?;
    stages.push(stage(
        "zstd-decompress",
        "zstd decompression per block, one thread".into(),
        d,
        Some(zd.clone()),
    ));

    // Whole chunk records.
    let mut enc = RecordEncoder::new(opts.level);
    let mut records: Vec<Vec<u8>> = Vec::with_capacity(blocks.len());
    let e = rate(sample_bytes, 0.5, || {
        records.clear();
        for b in &blocks {
            records.push(
                enc.encode(ChunkId::of(b), b)
                    .map_err(|e| EngineError::Bench(e.to_string()))?,
            );
        }
        Ok(())
    })?;
    let zc_again = stages
        .iter()
        .find(|s| s.name == "zstd-compress")
        .and_then(|s| s.reference.clone());
    stages.push(stage(
        "chunk-encode",
        "BLAKE3 id + zstd + CRC-32 + header, one thread".into(),
        e,
        zc_again,
    ));
    let mut dec = RecordDecoder::default();
    let mut plain = Vec::new();
    let de = rate(sample_bytes, 0.5, || {
        for r in &records {
            let h = RecordHeader::parse(r).map_err(|e| EngineError::Bench(e.to_string()))?;
            let payload = r
                .get(coffre_vault_store::format::record::HEADER_LEN..)
                .unwrap_or_default();
            dec.decode_payload_into(&h, payload, &mut plain)
                .map_err(|e| EngineError::Bench(e.to_string()))?;
        }
        Ok(())
    })?;
    stages.push(stage(
        "chunk-decode",
        "CRC-32 + zstd + BLAKE3 check, one thread".into(),
        de,
        Some(zd),
    ));

    // Sealing, as an encrypted vault seals records.
    for cipher in [
        coffre_vault_store::crypto::Cipher::Aes256Gcm,
        coffre_vault_store::crypto::Cipher::XChaCha20Poly1305,
    ] {
        let keys = coffre_vault_store::crypto::VaultKeys::derive(
            &coffre_vault_store::crypto::MasterKey::from_bytes([0x42; 32]),
            cipher,
        );
        let mut sealed = Vec::with_capacity(bs + 64);
        let r = rate(sample_bytes, 0.5, || {
            for b in &blocks {
                sealed.clear();
                keys.records()
                    .seal_into(b"bench", b, &mut sealed)
                    .map_err(|e| EngineError::Bench(e.to_string()))?;
            }
            Ok(())
        })?;
        let (name, alg) = match cipher {
            coffre_vault_store::crypto::Cipher::Aes256Gcm => ("aes-256-gcm", "aes-256-gcm"),
            coffre_vault_store::crypto::Cipher::XChaCha20Poly1305 => {
                ("chacha20-poly1305", "chacha20-poly1305")
            }
        };
        stages.push(stage(
            name,
            format!("sealing {} KiB blocks, one thread", bs >> 10),
            r,
            Some(openssl_speed(alg)),
        ));
    }

    // End to end: a backup into a fresh vault, then a restore.
    let vault = crate::vault_ops::create_vault(
        &dir.path().join("vault"),
        &crate::vault_ops::CreateOptions {
            block_size: Some(opts.block_size),
            compression_level: Some(opts.level),
            snapshot_area: Some(dir.path().join("snapshots")),
            ..Default::default()
        },
        &SystemClock,
    )?;
    let source = crate::source::FileImage::open(&image)?;
    let mut bopts = crate::backup::BackupOptions::new("bench", &image);
    bopts.threads = opts.threads;
    bopts.allow_clone = false;
    let t = Instant::now();
    crate::backup::backup(&vault, &source, &bopts, &SystemClock, &NoProgress)?;
    let backup = mib_s(image_bytes, t.elapsed().as_secs_f64());
    stages.push(stage(
        "backup",
        "full backup job of the generated image (snapshot + transfer, fsynced)".into(),
        backup,
        Some(read_ref()),
    ));
    let point = crate::points::select_point(&vault, "bench", "latest")?;
    // The two tiers, each restored once, with the disk floor measured
    // before, between and after them (its median counts: the disks are
    // shared).
    let restore_from = |from, name: &str| -> Result<(f64, u64)> {
        let mut ropts = crate::restore::RestoreOptions::new(dir.path().join(name));
        ropts.threads = opts.threads;
        ropts.from = from;
        let t = Instant::now();
        let restored = crate::restore::restore(&vault, &point, &ropts, &NoProgress)?;
        let secs = t.elapsed().as_secs_f64();
        std::fs::remove_file(dir.path().join(name)).map_err(file_io)?;
        Ok((secs, restored.bytes_written))
    };
    // The floor writes the restore's data bytes: a first restore says how
    // many (it is the snapshot tier's first, right after the backup, as a
    // user's would be).
    let (snap_secs, data_bytes) = restore_from(crate::restore::RestoreFrom::Auto, "restored.img")?;
    let floor = |_| disk_write(&dir.path().join("write.bin"), data_bytes);
    let mut floors = vec![floor(())?];
    let (vault_secs, _) = restore_from(crate::restore::RestoreFrom::Vault, "restored.img")?;
    floors.push(floor(())?);
    floors.push(floor(())?);
    floors.sort_by(f64::total_cmp);
    let floor_secs = floors.get(1).copied().unwrap_or_default();
    stages.push(stage(
        "disk-write",
        format!(
            "the disk floor: {:.0} MiB (the restore's data) to a new file like dd bs=4M oflag=direct conv=fsync, median of 3",
            data_bytes as f64 / (1 << 20) as f64
        ),
        mib_s(data_bytes, floor_secs),
        None,
    ));
    for (name, tier, secs) in [
        ("restore", "the snapshot tier (the default)", snap_secs),
        ("restore-vault", "the vault", vault_secs),
    ] {
        let mut s = stage(
            name,
            format!(
                "restore from {tier} to a new file (fsynced): {secs:.2} s, {:.2}x the disk floor's {floor_secs:.2} s; per image MiB",
                secs / floor_secs.max(1e-9)
            ),
            mib_s(image_bytes, secs),
            Some(Reference {
                name: "disk-write of the same data".into(),
                mib_per_s: Some(mib_s(image_bytes, floor_secs)),
                skipped: None,
            }),
        );
        s.floor_factor = Some(secs / floor_secs.max(1e-9));
        stages.push(s);
    }
    Ok(BenchReport {
        threads,
        image_size: opts.image_size,
        compression_ratio: packed as f64 / sample_bytes as f64,
        level: opts.level,
        stages,
    })
}
