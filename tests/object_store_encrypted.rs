//! Encrypted vaults in object storage and GRS secondaries in containers,
//! against a real Azurite (issue 23): nothing of the disks at rest in the
//! bucket or in a host's cache; two hosts writing one encrypted vault at
//! once, a fresh host restoring it, and no nonce ever used twice; a
//! secondary in a container restoring with the primary gone; bits flipped
//! in the bucket reported and never used. Every blob is downloaded through
//! Azurite's REST API (`scripts/azure-download.js`), as a bucket reader
//! would. Without Azurite the tests say SKIP and pass.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::plaintext::{blocks_of, files_with_plaintext, files_with_text};
use crate::common::*;
use crate::object_store::{Emulator, azure_download, azure_put, url};

const MIB: u64 = 1 << 20;

/// One host: its cache directory and its own registry of protected
/// images, all commands with the vault's key file.
struct Host<'a> {
    az: &'a Emulator,
    cache: PathBuf,
    registry: PathBuf,
    key: PathBuf,
}

impl Host<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.az.coffre();
        c.env("COFFRE_REGISTRY", &self.registry)
            .env("COFFRE_KEY_FILE", &self.key)
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        succeeded(args, self.run(args))
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    fn backup(&self, item: &str, img: &Path) {
        self.ok(&["backup", "--vault", s(&self.cache), "--item", item, s(img)]);
    }

    /// The ids of `item`'s points in the vault tier, oldest first.
    fn points(&self, item: &str) -> Vec<String> {
        let pts = self.json(&["points", "--vault", s(&self.cache), "--item", item]);
        pts.as_array()
            .unwrap()
            .iter()
            .filter(|p| p["tier"].as_str().is_some_and(|t| t.contains("Vault")))
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn restore(&self, item: &str, point: &str, to: &Path) -> Output {
        self.run(&[
            "restore",
            "--vault",
            s(&self.cache),
            "--item",
            item,
            "--point",
            point,
            "--from",
            "vault",
            "--to",
            s(to),
        ])
    }
}

fn host<'a>(az: &'a Emulator, dir: &Path, name: &str, key: &Path) -> Host<'a> {
    Host {
        az,
        cache: dir.join(name),
        registry: dir.join(format!("{name}-registry")),
        key: key.to_path_buf(),
    }
}

fn key_file(dir: &Path) -> PathBuf {
    let key = dir.join("vault.key");
    random_file(&key, 32, 0x5eed);
    key
}

/// Creates the vault at `store` from `h`, raw records (level 0:
/// compression cannot hide plaintext), with `extra` options.
fn create(h: &Host, store: &str, extra: &[&str]) -> serde_json::Value {
    let area = h.cache.with_extension("area");
    let mut args = vec![
        "vault",
        "create",
        "--store",
        store,
        "--vault",
        s(&h.cache),
        "--compression-level",
        "0",
        "--snapshot-area",
        s(&area),
    ];
    args.extend_from_slice(extra);
    h.json(&args)
}

#[test]
fn an_encrypted_vault_in_azurite_leaves_no_plaintext_in_the_bucket_or_the_cache() {
    let Some(az) = Emulator::azurite(&["enc", "plain"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = key_file(dir);
    let h = host(&az, dir, "h1", &key);
    // No --encryption: in object storage, the default is encrypted.
    let created = create(&h, &url("enc", "v"), &[]);
    assert_eq!(created["encryption"], "aes-256-gcm", "{created:#}");
    let item = "payroll-db-vm";
    let img = dir.join("images-of-the-payroll-server").join("disk0.img");
    std::fs::create_dir_all(img.parent().unwrap()).unwrap();
    mixed_image(&img, 16 * MIB, 41);
    let day1 = dir.join("day1.img");
    std::fs::copy(&img, &day1).unwrap();
    h.backup(item, &img);
    churn(&img, 40, 16 << 10, 42);
    h.backup(item, &img);
    let mut blocks = blocks_of(&day1);
    blocks.extend(blocks_of(&img));
    assert!(blocks.len() > 2000, "{} blocks", blocks.len());

    let bucket = dir.join("bucket-enc");
    let n = azure_download(&az, "enc", &bucket);
    assert!(n >= 8, "{n} blobs");
    let names: [&[u8]; 3] = [
        item.as_bytes(),
        b"images-of-the-payroll-server",
        s(&img).as_bytes(),
    ];
    let leaks = files_with_plaintext(std::slice::from_ref(&bucket), &blocks);
    assert!(leaks.is_empty(), "image blocks in blobs {leaks:?}");
    let named = files_with_text(std::slice::from_ref(&bucket), &names);
    assert!(
        named.is_empty(),
        "item name or image path in blobs {named:?}"
    );
    // The host's cache: its index and files; no block of the image.
    let leaks = files_with_plaintext(std::slice::from_ref(&h.cache), &blocks);
    assert!(leaks.is_empty(), "image blocks in the cache {leaks:?}");
    // Every point restores.
    let ids = h.points(item);
    assert_eq!(ids.len(), 2);
    for (id, want) in ids.iter().zip([&day1, &img]) {
        let to = dir.join(format!("{id}.restored"));
        succeeded(&["restore"], h.restore(item, id, &to));
        assert_same(&to, want);
        std::fs::remove_file(&to).unwrap();
    }

    // The same scan finds the plaintext of a plain vault's bucket.
    let p = host(&az, dir, "p1", &key);
    create(&p, &url("plain", "v"), &["--encryption", "none"]);
    let plain_img = dir.join("plain").join("disk0.img");
    std::fs::create_dir_all(plain_img.parent().unwrap()).unwrap();
    std::fs::copy(&img, &plain_img).unwrap();
    p.backup(item, &plain_img);
    let plain_bucket = dir.join("bucket-plain");
    azure_download(&az, "plain", &plain_bucket);
    assert!(
        !files_with_plaintext(std::slice::from_ref(&plain_bucket), &blocks).is_empty(),
        "the scan finds nothing even in a plain vault"
    );
    assert!(
        !files_with_text(std::slice::from_ref(&plain_bucket), &[item.as_bytes()]).is_empty(),
        "the name scan finds nothing even in a plain vault"
    );
}

/// Every blob under `root` (a downloaded container), with its name.
fn blobs(root: &Path) -> Vec<(String, PathBuf)> {
    crate::common::plaintext::files_under(&[root.to_path_buf()])
        .into_iter()
        .map(|p| {
            let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (name, p)
        })
        .collect()
}

/// The segments of a downloaded container: each `NAME.seg/OFFSET` part
/// put back at its offset (`FORMAT.md`, "Shared vaults in object
/// storage").
fn segments(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut segs: std::collections::BTreeMap<String, Vec<(u64, PathBuf)>> = Default::default();
    for (name, path) in blobs(root) {
        let Some((seg, part)) = name.split_once(".seg/") else {
            continue;
        };
        let off = u64::from_str_radix(part, 16).unwrap();
        segs.entry(seg.to_string()).or_default().push((off, path));
    }
    segs.into_iter()
        .map(|(name, mut parts)| {
            parts.sort();
            let mut bytes = Vec::new();
            for (off, p) in parts {
                assert_eq!(bytes.len() as u64, off, "{name}: a gap before part {off}");
                bytes.extend(std::fs::read(p).unwrap());
            }
            (name, bytes)
        })
        .collect()
}

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

/// The nonce of every sealed chunk record in `seg` (`FORMAT.md`, "Chunk
/// record" and "Sealed chunk record": a 56-byte header, `CFCK`, version
/// 2, stored length at 12; the stored bytes start with the 24-byte
/// nonce), walking the records back to back from the 32-byte segment
/// header.
fn record_nonces(name: &str, seg: &[u8]) -> Vec<[u8; 24]> {
    assert_eq!(&seg[..8], b"CFSEGMT\0", "{name}");
    let mut at = 32;
    let mut out = Vec::new();
    while at + 56 <= seg.len() {
        let h = &seg[at..at + 56];
        assert_eq!(&h[..4], b"CFCK", "{name}: no record at {at}");
        assert_eq!(
            h[4], 2,
            "{name}: a plaintext record (version {}) at {at}",
            h[4]
        );
        let stored = u32_at(h, 12);
        let payload = &seg[at + 56..at + 56 + stored];
        out.push(payload[..24].try_into().unwrap());
        at += 56 + stored;
    }
    assert_eq!(at, seg.len(), "{name}: trailing bytes");
    out
}

/// The nonce of a sealed file (`FORMAT.md`, "Sealed files of an
/// encrypted vault": envelope version 2, the body starts with the nonce),
/// or of the config (its sealed settings, hex in its JSON body).
fn file_nonce(name: &str, b: &[u8]) -> [u8; 24] {
    assert!(b.len() >= 16 + 24 + 16, "{name}: {} bytes", b.len());
    let version = u32_at(b, 8);
    if name.ends_with("config") {
        let len = u32_at(b, 12);
        let v: serde_json::Value = serde_json::from_slice(&b[16..16 + len]).unwrap();
        let sealed = hex::decode(v["sealed"].as_str().unwrap()).unwrap();
        return sealed[..24].try_into().unwrap();
    }
    assert_eq!(version, 2, "{name}: not a sealed file (version {version})");
    b[16..40].try_into().unwrap()
}

#[test]
fn two_hosts_write_one_encrypted_vault_at_once_and_no_nonce_repeats() {
    let Some(az) = Emulator::azurite(&["shared"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = key_file(dir);
    let store = url("shared", "v");
    let (h1, h2) = (host(&az, dir, "h1", &key), host(&az, dir, "h2", &key));
    create(&h1, &store, &["--encryption", "chacha20-poly1305"]);
    h2.ok(&[
        "vault",
        "attach",
        "--store",
        &store,
        "--vault",
        s(&h2.cache),
    ]);
    // Each host its own item, three days, both at once; every day's image
    // kept to compare.
    let days = 3;
    let run_host = |h: &Host, item: &str, seed: u64| -> Vec<PathBuf> {
        let img = dir.join(format!("{item}.img"));
        mixed_image(&img, 8 * MIB, seed);
        let mut kept = Vec::new();
        for d in 0..days {
            if d > 0 {
                churn(&img, 20, 64 << 10, seed + d);
            }
            h.backup(item, &img);
            let k = dir.join(format!("{item}.day{d}"));
            std::fs::copy(&img, &k).unwrap();
            kept.push(k);
        }
        kept
    };
    let (days1, days2) = std::thread::scope(|sc| {
        let a = sc.spawn(|| run_host(&h1, "vm-one", 11));
        let b = sc.spawn(|| run_host(&h2, "vm-two", 22));
        (a.join().unwrap(), b.join().unwrap())
    });

    // A fresh third host restores every point byte-identical.
    let h3 = host(&az, dir, "h3", &key);
    h3.ok(&[
        "vault",
        "attach",
        "--store",
        &store,
        "--vault",
        s(&h3.cache),
    ]);
    for (item, kept) in [("vm-one", &days1), ("vm-two", &days2)] {
        let ids = h3.points(item);
        assert_eq!(ids.len(), days as usize, "{item}: {ids:?}");
        for (id, want) in ids.iter().zip(kept) {
            let to = dir.join(format!("{item}-{id}.restored"));
            succeeded(&["restore", item, id], h3.restore(item, id, &to));
            assert_same(&to, want);
            std::fs::remove_file(&to).unwrap();
        }
    }
    let v = h3.json(&["verify", "--vault", s(&h3.cache), "--read-data"]);
    assert_eq!(v["findings"].as_array().map(Vec::len), Some(0), "{v:#}");

    // Every nonce in the bucket: each sealed record's and each sealed
    // file's; none twice.
    let bucket = dir.join("bucket");
    azure_download(&az, "shared", &bucket);
    let mut seen: HashSet<[u8; 24]> = HashSet::new();
    let (mut records, mut files) = (0, 0);
    let segs = segments(&bucket);
    assert!(segs.len() >= 2, "each host writes its own segments");
    for (name, bytes) in &segs {
        for n in record_nonces(name, bytes) {
            assert!(seen.insert(n), "nonce {} repeats ({name})", hex::encode(n));
            records += 1;
        }
    }
    for (name, path) in blobs(&bucket) {
        if name.contains(".seg/") {
            continue;
        }
        let b = std::fs::read(&path).unwrap();
        let n = file_nonce(&name, &b);
        assert!(seen.insert(n), "nonce {} repeats ({name})", hex::encode(n));
        files += 1;
    }
    // 2 × 8 MiB of 64 KiB blocks, and the changes: hundreds of records;
    // points, items, policies, chunk lists, jobs, host claims, config.
    assert!(records > 250, "{records} records");
    assert!(files > 15, "{files} sealed files");
    eprintln!("nonces: {records} records, {files} sealed files, none repeated");
}

#[test]
fn an_encrypted_vaults_secondary_in_a_container_restores_with_the_primary_gone() {
    let Some(az) = Emulator::azurite(&["secondary"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = key_file(dir);
    let sec = url("secondary", "vault-a");
    let primary = dir.join("primary");
    let h = Host {
        az: &az,
        cache: primary.clone(),
        registry: dir.join("registry"),
        key: key.clone(),
    };
    // A local vault with its secondary in a container: encrypted by
    // default, as its data leaves the host.
    let created = h.json(&[
        "vault",
        "create",
        "--vault",
        s(&primary),
        "--secondary",
        &sec,
        "--compression-level",
        "0",
        "--snapshot-area",
        s(&dir.join("area")),
    ]);
    assert_eq!(created["encryption"], "aes-256-gcm", "{created:#}");
    let img = dir.join("disk.img");
    mixed_image(&img, 12 * MIB, 31);
    let day1 = dir.join("day1.img");
    std::fs::copy(&img, &day1).unwrap();
    h.backup("disk", &img);
    churn(&img, 10, 64 << 10, 32);
    h.backup("disk", &img);
    h.ok(&["replicate", "--vault", s(&primary)]);

    std::fs::rename(&primary, dir.join("primary.gone")).unwrap();
    let xdg = dir.join("xdg");
    let from_secondary = |args: &[&str]| -> String {
        let out = h
            .cmd(args)
            .env("COFFRE_SECONDARY", &sec)
            .env("XDG_CACHE_HOME", &xdg)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        succeeded(args, out)
    };
    let pts: serde_json::Value = serde_json::from_str(&from_secondary(&[
        "--output",
        "json",
        "points",
        "--vault",
        s(&primary),
        "--item",
        "disk",
        "--from",
        "secondary",
    ]))
    .unwrap();
    let ids: Vec<&str> = pts
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 2, "{pts}");
    for (id, want) in ids.iter().zip([&day1, &img]) {
        let to = dir.join(format!("{id}.restored"));
        from_secondary(&[
            "restore",
            "--vault",
            s(&primary),
            "--from",
            "secondary",
            "--item",
            "disk",
            "--point",
            id,
            "--to",
            s(&to),
        ]);
        assert_same(want, &to);
        std::fs::remove_file(&to).unwrap();
    }
    // Without the key the secondary does not open.
    let mut no_key = az.coffre();
    no_key
        .env("COFFRE_SECONDARY", &sec)
        .env("XDG_CACHE_HOME", dir.join("xdg2"))
        .env_remove("COFFRE_KEY_FILE")
        .args(["points", "--vault", s(&primary), "--from", "secondary"])
        .stdin(Stdio::null());
    let out = no_key.output().unwrap();
    assert!(!out.status.success(), "opened without the key");

    // No block of either day in the container, nor in the local cache.
    let mut blocks = blocks_of(&day1);
    blocks.extend(blocks_of(&img));
    let bucket = dir.join("bucket");
    assert!(azure_download(&az, "secondary", &bucket) >= 6);
    let leaks = files_with_plaintext(&[bucket.clone(), xdg.clone()], &blocks);
    assert!(leaks.is_empty(), "image blocks at rest: {leaks:?}");
    let named = files_with_text(std::slice::from_ref(&bucket), &[s(&img).as_bytes()]);
    assert!(named.is_empty(), "the image path in {named:?}");
}

/// Flips one bit at `at` of blob `name` in `container` (downloaded to
/// `scratch`, changed, uploaded again).
fn flip_blob_bit(az: &Emulator, container: &str, name: &str, at: usize, scratch: &Path) {
    let _ = std::fs::remove_dir_all(scratch);
    azure_download(az, container, scratch);
    let path = scratch.join(name);
    let mut b = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    b[at] ^= 0x10;
    std::fs::write(&path, &b).unwrap();
    azure_put(az, container, name, &path);
}

#[test]
fn bits_flipped_in_the_bucket_are_reported_and_never_used() {
    let Some(az) = Emulator::azurite(&["tamper"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let key = key_file(dir);
    let store = url("tamper", "v");
    let h = host(&az, dir, "h1", &key);
    create(&h, &store, &[]);
    // Random data (nothing deduplicates): item b's records come first in
    // the segment, then a's.
    let (img_a, img_b) = (dir.join("a.img"), dir.join("b.img"));
    random_file(&img_b, 4 * MIB as usize, 1);
    random_file(&img_a, 4 * MIB as usize, 2);
    h.backup("b", &img_b);
    h.backup("a", &img_a);
    h.ok(&["gc", "--vault", s(&h.cache)]);
    let v = h.json(&["verify", "--vault", s(&h.cache), "--read-data"]);
    assert_eq!(v["findings"].as_array().map(Vec::len), Some(0), "{v:#}");

    // A bit of a's point manifest, and one in the middle of b's records.
    let scratch = dir.join("scratch");
    azure_download(&az, "tamper", &scratch);
    let point_a = "v/points/a/0000000000000001.point";
    let len = std::fs::metadata(scratch.join(point_a)).unwrap().len() as usize;
    flip_blob_bit(&az, "tamper", point_a, len / 2, &scratch);
    let part = blobs(&scratch)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".seg/0000000000000000"))
        .min()
        .expect("a segment part");
    flip_blob_bit(&az, "tamper", &part, (2 * MIB) as usize, &scratch);
    // And the GC state.
    let gc_len = std::fs::metadata(scratch.join("v/gc/state")).unwrap().len() as usize;
    flip_blob_bit(&az, "tamper", "v/gc/state", gc_len / 2, &scratch);

    // verify names the forged manifest and the damaged chunk.
    let out = h.run(&[
        "--output",
        "json",
        "verify",
        "--vault",
        s(&h.cache),
        "--read-data",
    ]);
    assert!(!out.status.success(), "verify found nothing");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings: Vec<(String, String)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["code"].as_str().unwrap_or_default().to_string(),
                f["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(
        findings
            .iter()
            .any(|(c, m)| c == "forged-file" && m.contains("points/a/0000000000000001.point")),
        "{findings:#?}"
    );
    assert!(
        findings.iter().any(|(c, _)| c != "forged-file"),
        "the damaged record is not reported: {findings:#?}"
    );

    // b's point reads the damaged record: the restore fails cleanly and
    // leaves no image behind.
    let b_point = h.points("b").remove(0);
    let to = dir.join("b.restored");
    let out = h.restore("b", &b_point, &to);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restored from a forged record");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!to.exists(), "a restore that failed left {to:?}");

    // A fresh host does not index the forged manifest: its attach
    // refuses, naming it.
    let h2 = host(&az, dir, "h2", &key);
    let out = h2.run(&[
        "vault",
        "attach",
        "--store",
        &store,
        "--vault",
        s(&h2.cache),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attached over a forged manifest");
    assert!(err.contains("points/a/0000000000000001.point"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // GC refuses the forged GC state, naming it.
    let out = h.run(&["gc", "--vault", s(&h.cache)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "gc ran on a forged gc/state");
    assert!(err.contains("gc/state"), "{err}");
}
