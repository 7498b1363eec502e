//! Writes the fuzz seed corpus: `cargo run --release --example fuzz_seeds
//! -- fuzz/corpus`. Valid records and nodes plus a few damaged ones.

use std::path::Path;

use coffre_vault_store::ChunkId;
use coffre_vault_store::format::blockmap::{LEAF_ENTRIES, Node};
use coffre_vault_store::format::catalog::Hooks;
use coffre_vault_store::format::catalog_files::{self, CopyIdentity, PolicyFile, Role};
use coffre_vault_store::format::generations;
use coffre_vault_store::format::host_registry::{self, RegistryEntry};
use coffre_vault_store::format::record::RecordEncoder;
use coffre_vault_store::format::repl_state::ReplicationState;
use coffre_vault_store::format::sealed_file;
use coffre_vault_store::format::segment::encode_header;
use coffre_vault_store::jobs::{JobRecord, Operation, PhaseStatus};
use coffre_vault_store::{PointRecord, PointStats, Redundancy, VaultConfig};

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let out = Path::new(&out);
    let rec = out.join("chunk_record");
    let map = out.join("block_map");
    std::fs::create_dir_all(&rec).unwrap();
    std::fs::create_dir_all(&map).unwrap();

    let text: Vec<u8> = b"coffre chunk seed "
        .iter()
        .cycle()
        .take(3000)
        .copied()
        .collect();
    let noise: Vec<u8> = (0..512u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let zstd = RecordEncoder::new(3)
        .encode(ChunkId::of(&text), &text)
        .unwrap();
    let raw = RecordEncoder::new(0)
        .encode(ChunkId::of(&noise), &noise)
        .unwrap();
    let empty = RecordEncoder::new(1).encode(ChunkId::of(b""), b"").unwrap();
    let mut flipped = zstd.clone();
    flipped[70] ^= 0x40;
    let truncated = raw[..raw.len() - 9].to_vec();
    for (name, bytes) in [
        ("zstd.bin", &zstd),
        ("raw.bin", &raw),
        ("empty.bin", &empty),
        ("flipped.bin", &flipped),
        ("truncated.bin", &truncated),
    ] {
        std::fs::write(rec.join(name), bytes).unwrap();
    }

    let leaf = Node::Leaf {
        first_block: LEAF_ENTRIES as u64,
        entries: (0..16)
            .map(|i| (i % 3 != 0).then(|| ChunkId::of(&[i as u8])))
            .collect(),
    }
    .encode();
    let root = Node::Root {
        image_size: (3 << 20) + 5,
        block_size: 1 << 20,
        leaves: vec![ChunkId::of(b"leaf")],
    }
    .encode();
    let mut bad = leaf.clone();
    bad[30] ^= 1;
    for (name, bytes) in [
        ("leaf.bin", &leaf),
        ("root.bin", &root),
        ("bad-crc.bin", &bad),
    ] {
        std::fs::write(map.join(name), bytes).unwrap();
    }

    let jobs = out.join("job_record");
    std::fs::create_dir_all(&jobs).unwrap();
    let t = "2027-01-01T00:00:00Z".parse().unwrap();
    let mut job = JobRecord::new(Operation::Backup, Some("vm"), &["snapshot", "transfer"], t);
    job.phases[0].status = PhaseStatus::Completed;
    job.phases[1].status = PhaseStatus::Skipped;
    job.phases[1].error = Some("another transfer runs".into());
    job.settle(t);
    let job = job.encode();
    let mut flipped = job.clone();
    flipped[40] ^= 0x20;
    let truncated = job[..job.len() - 5].to_vec();
    for (name, bytes) in [
        ("backup.bin", &job),
        ("flipped.bin", &flipped),
        ("truncated.bin", &truncated),
    ] {
        std::fs::write(jobs.join(name), bytes).unwrap();
    }

    let configs = out.join("vault_config");
    std::fs::create_dir_all(&configs).unwrap();
    let config = VaultConfig {
        name: "prod-vault".into(),
        vault_id: "0123456789abcdef".into(),
        block_size: 65536,
        compression_level: 1,
        redundancy: Redundancy::Grs,
        created: t,
        snapshot_area: Some("/srv/snapshots".into()),
        replicas: vec!["/mnt/disk2/vault".into()],
        secondary: Some("/mnt/remote/vault".into()),
        store: Some("azure://acct/vaults/prod".into()),
        adopted_packs: false,
        encryption: None,
    }
    .encode()
    .unwrap();
    let mut flipped = config.clone();
    flipped[30] ^= 0x04;
    let mut newer = config.clone();
    newer[8] = 9;
    for (name, bytes) in [
        ("valid.bin", &config),
        ("flipped.bin", &flipped),
        ("newer.bin", &newer),
    ] {
        std::fs::write(configs.join(name), bytes).unwrap();
    }

    // A segment of three records; one with its second record punched (a
    // GC hole the scan resynchronises over); one torn in its last record.
    let scans = out.join("segment_scan");
    std::fs::create_dir_all(&scans).unwrap();
    let mut seg = encode_header(1).to_vec();
    let mut enc = RecordEncoder::new(1);
    let mut offs = Vec::new();
    for b in [&text[..], &noise[..], &text[..1000]] {
        offs.push(seg.len());
        seg.extend(enc.encode(ChunkId::of(b), b).unwrap());
    }
    let mut holed = seg.clone();
    holed[offs[1]..offs[2]].fill(0);
    let torn = seg[..seg.len() - 7].to_vec();
    // An adopted pack: the same records behind a pack header.
    let mut adopted = seg.clone();
    adopted[..32].copy_from_slice(&coffre_vault_store::format::segment::encode_pack_header());
    write_all(
        &scans,
        &[
            ("valid.bin", &seg),
            ("holed.bin", &holed),
            ("torn.bin", &torn),
            ("adopted.bin", &adopted),
        ],
    );

    let catalog = out.join("catalog_file");
    std::fs::create_dir_all(&catalog).unwrap();
    let point = catalog_files::encode_point(&PointRecord {
        id: "3f2a9c1d".into(),
        item: "web".into(),
        seq: 3,
        created: t,
        image_size: 3 << 20,
        block_size: 65536,
        block_map: ChunkId::of(b"root"),
        stats: PointStats::default(),
        scheduled: true,
        retain_until: None,
        job: Some("0000000000000007".into()),
        level: None,
        cbt: None,
    });
    let copy = catalog_files::encode_copy(&CopyIdentity {
        vault_id: "0123456789abcdef".into(),
        vault_name: "prod-vault".into(),
        role: Role::Replica,
    });
    let policy = catalog_files::encode_policy(&PolicyFile {
        name: "DefaultPolicy".into(),
        policy: serde_json::json!({"schedule": {"daily": "02:00"}, "daily": 30}),
    });
    let mut flipped = point.clone();
    flipped[20] ^= 0x08;
    write_all(
        &catalog,
        &[
            ("point.bin", &point),
            ("copy.bin", &copy),
            ("policy.bin", &policy),
            ("flipped.bin", &flipped),
        ],
    );

    // Sealed catalog files, under the fuzz target's key and name: a point
    // and a policy (valid), the point under another name, the point with
    // a bit flipped under a fixed CRC, and the plain point.
    let sealed = out.join("sealed_catalog_file");
    std::fs::create_dir_all(&sealed).unwrap();
    let keys = sealed_file::fuzz_keys();
    let seal =
        |name: &str, plain: &[u8]| sealed_file::seal_with(name, plain, keys.catalog(), 1).unwrap();
    let s_point = seal(sealed_file::FUZZ_NAME, &point);
    let s_policy = seal(sealed_file::FUZZ_NAME, &policy);
    let s_moved = seal("points/db/0000000000000001.point", &point);
    let mut s_flipped = s_point.clone();
    let n = s_flipped.len();
    s_flipped[40] ^= 0x04;
    let crc = crc32fast::hash(&s_flipped[..n - 4]);
    s_flipped[n - 4..].copy_from_slice(&crc.to_le_bytes());
    write_all(
        &sealed,
        &[
            ("flipped.bin", &s_flipped),
            ("moved.bin", &s_moved),
            ("plain.bin", &point),
            ("point.bin", &s_point),
            ("policy.bin", &s_policy),
        ],
    );

    let repl = out.join("replication_state");
    std::fs::create_dir_all(&repl).unwrap();
    let mut state = ReplicationState::default();
    state.segments.insert(1, 1 << 20);
    state.segments.insert(2, 4096);
    state.points.insert("3f2a9c1d".into(), t);
    state.last_run = Some(t);
    let state = state.encode();
    let mut flipped = state.clone();
    flipped[24] ^= 0x01;
    let truncated = state[..state.len() - 3].to_vec();
    write_all(
        &repl,
        &[
            ("valid.bin", &state),
            ("flipped.bin", &flipped),
            ("truncated.bin", &truncated),
        ],
    );

    let shared = out.join("shared_state");
    std::fs::create_dir_all(&shared).unwrap();
    let pointer = coffre_vault_store::format::remote::Remote {
        url: "azure://acct/vaults/fleet".into(),
        host_tag: 0x2a,
        host: "hv1".into(),
    }
    .encode();
    let lease = coffre_vault_store::format::lease::encode_lease(
        &coffre_vault_store::format::lease::Lease {
            host_tag: 0x2a,
            session: "00ff00ff00ff00ff".into(),
            epoch_seen: 3,
            taken: t,
            expires: t,
        },
    );
    let state = coffre_vault_store::format::lease::encode_state(
        &coffre_vault_store::format::lease::GcState {
            epoch: 4,
            marking: Some(coffre_vault_store::format::lease::GcHolder {
                host_tag: 7,
                until: t,
            }),
        },
    );
    let condemned = coffre_vault_store::format::lease::encode_condemned(
        &coffre_vault_store::format::lease::Condemned {
            epoch: 4,
            segments: vec![1 << 48, (2 << 48) + 5],
        },
    );
    let list = coffre_vault_store::format::chunk_list::encode(&[
        coffre_vault_store::format::chunk_list::ListedChunk {
            id: ChunkId::of(b"a"),
            offset: 32,
            len: 200,
            plain_len: 65536,
        },
        coffre_vault_store::format::chunk_list::ListedChunk {
            id: ChunkId::of(b"b"),
            offset: 232,
            len: 120,
            plain_len: 65536,
        },
    ]);
    let mut flipped = lease.clone();
    flipped[22] ^= 0x04;
    write_all(
        &shared,
        &[
            ("chunk-list.bin", &list),
            ("pointer.bin", &pointer),
            ("lease.bin", &lease),
            ("state.bin", &state),
            ("condemned.bin", &condemned),
            ("flipped.bin", &flipped),
        ],
    );

    let damaged = out.join("damaged_list");
    std::fs::create_dir_all(&damaged).unwrap();
    let list = coffre_vault_store::format::damaged::encode(
        &[ChunkId::of(b"a"), ChunkId::of(b"b")].into_iter().collect(),
    );
    let mut flipped = list.clone();
    flipped[30] ^= 0x10;
    let truncated = list[..list.len() - 1].to_vec();
    write_all(
        &damaged,
        &[
            ("valid.bin", &list),
            ("flipped.bin", &flipped),
            ("truncated.bin", &truncated),
        ],
    );

    key_slot_seeds(out, t);
    sealed_record_seeds(out, &text, &noise);

    // The host registry: one entry with hooks; a flipped byte; an entry
    // whose item name would leave its folder.
    let reg = out.join("host_registry");
    std::fs::create_dir_all(&reg).unwrap();
    let entry = RegistryEntry {
        path: "/var/lib/libvirt/images/vm.img".into(),
        identity: None,
        vault_dir: "/srv/vault".into(),
        vault_id: "0123456789abcdef".into(),
        vault_name: "vault".into(),
        item: "vm".into(),
        hooks: Some(Hooks {
            pre: vec!["fsfreeze".into(), "-f".into(), "/mnt".into()],
            post: vec!["fsfreeze".into(), "-u".into(), "/mnt".into()],
            timeout_secs: 30,
        }),
    };
    let valid = host_registry::encode(std::slice::from_ref(&entry));
    let mut flipped = valid.clone();
    flipped[40] ^= 0x01;
    let bad_item = host_registry::encode(&[RegistryEntry {
        item: "../x".into(),
        ..entry
    }]);
    write_all(
        &reg,
        &[
            ("valid.bin", &valid),
            ("flipped.bin", &flipped),
            ("bad_item.bin", &bad_item),
        ],
    );

    // A host's memory of generations: valid; a flipped byte; a name longer
    // than the longest remembered.
    let gens = out.join("generations_memory");
    std::fs::create_dir_all(&gens).unwrap();
    let mut memory = generations::Memory {
        dir: "/srv/vault".into(),
        vault_id: "0123456789abcdef".into(),
        highest: 1_765_000_000_000_000_000,
        ..Default::default()
    };
    memory.seen.insert(
        "items/vm.item".into(),
        generations::Seen::new(1_765_000_000_000_000_000, &[7; 32]),
    );
    memory
        .seen
        .insert("replication".into(), generations::Seen::new(3, &[9; 32]));
    let valid = generations::encode(&memory);
    let mut flipped = valid.clone();
    flipped[30] ^= 0x01;
    memory.seen.insert(
        "x".repeat(generations::MAX_NAME + 1),
        generations::Seen::new(1, &[0; 32]),
    );
    let long_name = generations::encode(&memory);
    write_all(
        &gens,
        &[
            ("valid.bin", &valid),
            ("flipped.bin", &flipped),
            ("long_name.bin", &long_name),
        ],
    );
}

/// Key slots (`key_slot`): a passphrase slot and a key-file slot of the
/// fuzz secrets (tiny Argon2id), one slot alone, a list with a hostile
/// passphrase slot (out-of-bounds memory) before a good key-file slot, a
/// list with one slot twice (refused, as a config is) and a list whose
/// wrapped keys were altered.
fn key_slot_seeds(out: &Path, t: jiff::Timestamp) {
    use coffre_vault_store::crypto::slot::{self, KdfParams, Secret};
    use coffre_vault_store::crypto::{KeySlot, MasterKey};
    let dir = out.join("key_slot");
    std::fs::create_dir_all(&dir).unwrap();
    let master = MasterKey::from_bytes([0x24; 32]);
    let tiny = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };
    let pass = KeySlot::new_with_weak_kdf_for_tests(
        &master,
        &Secret::Passphrase(slot::FUZZ_PASSPHRASE),
        Some(tiny),
        Some("fuzz".into()),
        t,
    )
    .unwrap();
    let file = KeySlot::new(
        &master,
        &Secret::KeyFile(&slot::FUZZ_KEY_FILE),
        None,
        None,
        t,
    )
    .unwrap();
    let mut hostile = pass.clone();
    hostile.kdf = Some(KdfParams {
        m_kib: u32::MAX,
        t: 64,
        p: 16,
    });
    let mut altered = [pass.clone(), file.clone()];
    for s in &mut altered {
        let last = s.wrapped.pop().unwrap();
        s.wrapped.push(if last == '0' { '1' } else { '0' });
    }
    let json = |v: &dyn erased::Json| v.to_json();
    write_all(
        &dir,
        &[
            ("both.json", &json(&vec![pass.clone(), file.clone()])),
            ("one.json", &json(&file)),
            (
                "duplicate.json",
                &json(&vec![pass.clone(), file.clone(), file.clone()]),
            ),
            ("hostile.json", &json(&vec![file, hostile])),
            ("altered.json", &json(&altered.to_vec())),
        ],
    );
}

/// Serializes any seed to pretty JSON bytes.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec_pretty(self).unwrap()
        }
    }
}

/// Sealed chunk records (`sealed_record`) under the fuzz keys: one per
/// cipher (zstd and raw), one with a bit flipped under a fixed CRC, a
/// truncated one and a plain record.
fn sealed_record_seeds(out: &Path, text: &[u8], noise: &[u8]) {
    use coffre_vault_store::crypto::Cipher;
    use coffre_vault_store::format::record::fuzz_keys;
    let dir = out.join("sealed_record");
    std::fs::create_dir_all(&dir).unwrap();
    let seal = |cipher, level, plain: &[u8]| {
        let mut enc = RecordEncoder::for_vault(level, Some(fuzz_keys(cipher)));
        enc.encode(enc.chunk_id(plain), plain).unwrap()
    };
    let aes = seal(Cipher::Aes256Gcm, 3, text);
    let chacha = seal(Cipher::XChaCha20Poly1305, 0, noise);
    let mut flipped = aes.clone();
    let at = flipped.len() - 20;
    flipped[at] ^= 0x10;
    // Both CRCs fixed: only the seal catches it.
    let crc = crc32fast::hash(&flipped[56..]);
    flipped[48..52].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32fast::hash(&flipped[..52]);
    flipped[52..56].copy_from_slice(&crc.to_le_bytes());
    let truncated = chacha[..chacha.len() - 3].to_vec();
    let plain = RecordEncoder::new(0)
        .encode(ChunkId::of(noise), noise)
        .unwrap();
    write_all(
        &dir,
        &[
            ("aes.bin", &aes),
            ("chacha.bin", &chacha),
            ("flipped.bin", &flipped),
            ("plain.bin", &plain),
            ("truncated.bin", &truncated),
        ],
    );
}

fn write_all(dir: &Path, files: &[(&str, &Vec<u8>)]) {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
