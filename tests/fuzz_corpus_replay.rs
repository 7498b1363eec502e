//! Replays the committed fuzz seed corpus through the same entry points the
//! fuzz targets use, on stable, in every test run.

use std::path::Path;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= 3,
        "corpus {target} has only {} inputs",
        out.len()
    );
    out
}

#[test]
fn chunk_record_corpus() {
    let mut accepted = 0;
    for (_name, bytes) in corpus("chunk_record") {
        if coffre_vault_store::format::record::fuzz_entry(&bytes) {
            accepted += 1;
        }
    }
    assert!(
        accepted >= 1,
        "the corpus should hold at least one valid record"
    );
}

#[test]
fn block_map_corpus() {
    let mut accepted = 0;
    for (_name, bytes) in corpus("block_map") {
        if coffre_vault_store::format::blockmap::fuzz_entry(&bytes) {
            accepted += 1;
        }
    }
    assert!(
        accepted >= 1,
        "the corpus should hold at least one valid node"
    );
}

#[test]
fn job_record_corpus() {
    let accepted = corpus("job_record")
        .iter()
        .filter(|(_, b)| coffre_vault_store::format::job::fuzz_entry(b))
        .count();
    assert_eq!(accepted, 1, "exactly the undamaged seed decodes");
}

#[test]
fn hold_record_corpus() {
    let accepted: Vec<String> = corpus("hold_record")
        .into_iter()
        .filter(|(_, b)| coffre_vault_store::format::hold::fuzz_entry(b))
        .map(|(name, _)| name)
        .collect();
    let mut accepted: Vec<&str> = accepted
        .iter()
        .map(|n| n.rsplit('/').next().unwrap_or(n))
        .collect();
    accepted.sort_unstable();
    assert_eq!(
        accepted,
        vec!["hold.bin", "hold_with_file.bin"],
        "exactly the undamaged seeds decode (with and without the target's file)"
    );
}

#[test]
fn live_run_corpus() {
    let mut accepted: Vec<String> = corpus("live_run")
        .into_iter()
        .filter(|(_, b)| coffre_vault_store::format::live_run::fuzz_entry(b))
        .map(|(name, _)| name.rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    accepted.sort_unstable();
    assert_eq!(
        accepted,
        vec!["domain.bin", "qmp.bin"],
        "exactly the undamaged seeds decode"
    );
}

#[test]
fn snapshot_manifest_corpus() {
    let accepted = corpus("snapshot_manifest")
        .iter()
        .filter(|(_, b)| coffre_engine::snapshotter::manifest::fuzz_entry(b))
        .count();
    assert_eq!(accepted, 1, "exactly the undamaged seed reads");
}

#[test]
fn snapshot_frames_corpus() {
    let t = tempfile::tempdir().unwrap();
    let read: Vec<(String, Option<(usize, usize)>)> = corpus("snapshot_frames")
        .into_iter()
        .map(|(name, b)| {
            let got =
                coffre_engine::snapshotter::manifest::fuzz_frames_entry(&t.path().join("m"), &b);
            (name.rsplit('/').next().unwrap_or_default().to_string(), got)
        })
        .collect();
    // A manifest of two frames, rewritten: a chunk id in the first frame
    // changed and four more of its bytes chosen so that the frame's CRC is
    // the same (refused all the same: the frame's digest at open; without
    // that check the oracle panics on other entries), cut in its second
    // frame, and the same bytes again.
    assert_eq!(
        read,
        vec![
            ("recrc.bin".to_string(), Some((2, 1))),
            ("same.bin".to_string(), Some((2, 2))),
            ("truncated.bin".to_string(), Some((2, 1))),
        ]
    );
}

#[test]
fn pack_scan_corpus() {
    let scanned: Vec<Option<usize>> = corpus("pack_scan")
        .iter()
        .map(|(_, b)| coffre_engine::snapshotter::pack::fuzz_entry(b))
        .collect();
    // flipped (a record's byte), truncated (the last record), valid.
    assert_eq!(scanned, vec![Some(0), Some(2), Some(3)]);
}

#[test]
fn area_file_corpus() {
    let decoded: Vec<(bool, bool)> = corpus("area_file")
        .iter()
        .map(|(_, b)| coffre_engine::snapshotter::area::fuzz_entry(b))
        .collect();
    // flipped, identity, list.
    assert_eq!(decoded, vec![(false, false), (true, false), (false, true)]);
}

#[test]
fn vault_config_corpus() {
    let accepted = corpus("vault_config")
        .iter()
        .filter(|(_, b)| coffre_vault_store::format::config::fuzz_entry(b))
        .count();
    assert_eq!(accepted, 1, "exactly the undamaged config decodes");
}

#[test]
fn segment_scan_corpus() {
    let found: Vec<usize> = corpus("segment_scan")
        .iter()
        .map(|(_, b)| coffre_vault_store::format::scan::fuzz_entry(b))
        .collect();
    // adopted (the valid records behind a pack header), holed (the second
    // record punched), torn (the last record), valid.
    assert_eq!(found, vec![3, 2, 2, 3]);
}

#[test]
fn catalog_file_corpus() {
    let decoded: Vec<bool> = corpus("catalog_file")
        .iter()
        .map(|(_, b)| coffre_vault_store::format::catalog_files::fuzz_entry(b))
        .collect();
    // copy, flipped (a point), point, policy.
    assert_eq!(decoded, vec![true, false, true, true]);
}

#[test]
fn sealed_catalog_file_corpus() {
    let keys = coffre_vault_store::format::sealed_file::fuzz_keys();
    let opened: Vec<bool> = corpus("sealed_catalog_file")
        .iter()
        .map(|(_, b)| coffre_vault_store::format::catalog_files::fuzz_sealed_entry(&keys, b))
        .collect();
    // flipped, moved (another name), plain: refused; point, policy: open.
    assert_eq!(opened, vec![false, false, false, true, true]);
}

#[test]
fn generations_memory_corpus() {
    let decoded: Vec<bool> = corpus("generations_memory")
        .iter()
        .map(|(_, b)| coffre_vault_store::format::generations::fuzz_entry(b))
        .collect();
    // flipped, a name too long, valid.
    assert_eq!(decoded, vec![false, false, true]);
}

#[test]
fn replication_state_corpus() {
    let accepted = corpus("replication_state")
        .iter()
        .filter(|(_, b)| coffre_vault_store::format::repl_state::fuzz_entry(b))
        .count();
    assert_eq!(accepted, 1, "exactly the undamaged state decodes");
}

#[test]
fn shared_state_corpus() {
    let accepted = corpus("shared_state")
        .iter()
        .filter(|(_, b)| {
            coffre_vault_store::format::remote::fuzz_entry(b)
                || coffre_vault_store::format::lease::fuzz_entry(b)
                || coffre_vault_store::format::chunk_list::fuzz_entry(b)
        })
        .count();
    assert_eq!(
        accepted, 5,
        "the pointer, lease, state, condemned and chunk lists decode; the flipped one does not"
    );
}

#[test]
fn damaged_list_corpus() {
    let accepted = corpus("damaged_list")
        .iter()
        .filter(|(_, b)| coffre_vault_store::format::damaged::fuzz_entry(b))
        .count();
    assert_eq!(accepted, 1, "exactly the undamaged list decodes");
}

#[test]
fn cbt_list_corpus() {
    let accepted: Vec<String> = corpus("cbt_list")
        .into_iter()
        .filter(|(_, b)| coffre_engine::snapshotter::cbt::list::fuzz_entry(b))
        .map(|(n, _)| n.rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(accepted, ["nbdinfo.json", "own.json"]);
}

#[test]
fn nbd_server_corpus() {
    let accepted: Vec<String> = corpus("nbd_server")
        .into_iter()
        .filter(|(_, b)| coffre_engine::snapshotter::nbd::wire::fuzz_server_entry(b))
        .map(|(n, _)| n.rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    // Both ways into transmission get there; a cut-off handshake and an
    // option whose name runs past its length do not.
    assert_eq!(accepted, ["export_name.bin", "valid.bin"]);
}

#[test]
fn nbd_reply_corpus() {
    let accepted: Vec<String> = corpus("nbd_reply")
        .into_iter()
        .filter(|(_, b)| coffre_engine::snapshotter::nbd::wire::fuzz_entry(b))
        .map(|(n, _)| n.rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    // Every transcript with a whole handshake negotiates; what follows it
    // (a huge length, a truncation) fails cleanly afterwards.
    assert_eq!(
        accepted,
        [
            "handshake_only.bin",
            "huge_length.bin",
            "truncated.bin",
            "valid.bin"
        ]
    );
}

#[test]
fn libvirt_xml_corpus() {
    let accepted: Vec<usize> = corpus("libvirt_xml")
        .iter()
        .map(|(_, b)| coffre_engine::snapshotter::vm::libvirt::xml::fuzz_entry(b))
        .collect();
    // backup_job, checkpoint (--no-domain), checkpoint_domain (with the
    // domain it records: file, block and network disks), domain: each read
    // by its own reader only; hostile: a relative path and a target with a
    // path in it, refused.
    assert_eq!(accepted, vec![1, 1, 1, 1, 0]);
}

#[test]
fn qmp_reply_corpus() {
    let accepted: Vec<usize> = corpus("qmp_reply")
        .iter()
        .map(|(_, b)| coffre_engine::snapshotter::vm::fuzz_entry(b))
        .collect();
    // agent_sync: the stale reply and the error, not the line after 0xFF
    // (read without the sync); event_error; greeting; odd: only the return
    // with the largest id.
    assert_eq!(accepted, vec![2, 2, 2, 1]);
}

#[test]
fn qemu_img_map_corpus() {
    let taken: Vec<(String, usize)> = corpus("qemu_img_map")
        .into_iter()
        .map(|(name, b)| {
            let name = name.rsplit('/').next().unwrap_or_default().to_string();
            (
                name,
                coffre_engine::snapshotter::vm::stream::fuzz_map_lines(&b),
            )
        })
        .collect();
    // backing: only the zeroed cluster of the image's own (not the
    // backing's, not one past 2^64, not a line that is not JSON);
    // long_line: an extent on a line longer than a line may be, not
    // taken; streamed: the data, not the absent rest.
    assert_eq!(
        taken,
        vec![
            ("backing.txt".to_string(), 1),
            ("long_line.txt".to_string(), 0),
            ("streamed.txt".to_string(), 1)
        ]
    );
}

#[test]
fn index_value_corpus() {
    let accepted: Vec<usize> = corpus("index_value")
        .iter()
        .map(|(_, b)| coffre_vault_store::format::index_values::fuzz_entry(b))
        .collect();
    // bad_kind, location, ref, segment_v1, segment_v2 (sorted by name).
    assert_eq!(accepted, vec![0, 1, 1, 1, 1]);
}

#[test]
fn nbd_uri_corpus() {
    let parsed: Vec<bool> = corpus("nbd_uri")
        .iter()
        .map(|(_, b)| coffre_engine::snapshotter::nbd::fuzz_uri_entry(b))
        .collect();
    // port_zero, query, tcp, unix (sorted by name).
    assert_eq!(parsed, vec![false, false, true, true]);
}

#[test]
fn nbd_read_corpus() {
    let accepted: Vec<bool> = corpus("nbd_read")
        .iter()
        .map(|(_, b)| coffre_engine::snapshotter::nbd::wire::fuzz_read_entry(b))
        .collect();
    // hole_then_data, partial (refused: half the request), whole.
    assert_eq!(accepted, vec![true, false, true]);
}

#[test]
fn part_list_corpus() {
    let passed: Vec<bool> = corpus("part_list")
        .iter()
        .map(|(_, b)| coffre_vault_store::store::parts::fuzz_part_list(b))
        .collect();
    // junk_names (only the one part name counts), overflow, overlap, two.
    assert_eq!(passed, vec![true, false, false, true]);
}

#[test]
fn host_registry_corpus() {
    let decoded: Vec<bool> = corpus("host_registry")
        .iter()
        .map(|(_, b)| coffre_vault_store::format::host_registry::fuzz_entry(b))
        .collect();
    // bad_item, flipped, valid.
    assert_eq!(decoded, vec![false, false, true]);
}

#[test]
fn key_slot_corpus() {
    let opened: Vec<usize> = corpus("key_slot")
        .iter()
        .map(|(_, b)| coffre_vault_store::crypto::slot::fuzz_entry(b))
        .collect();
    // altered (no slot opens), both (the passphrase and the key file),
    // duplicate (a slot twice: refused), hostile (the key file, the
    // out-of-bounds passphrase slot never tried), one (a lone key-file
    // slot).
    assert_eq!(opened, vec![0, 2, 0, 1, 1]);
}

#[test]
fn sealed_record_corpus() {
    use coffre_vault_store::crypto::Cipher;
    use coffre_vault_store::format::record;
    let keys = [
        record::fuzz_keys(Cipher::Aes256Gcm),
        record::fuzz_keys(Cipher::XChaCha20Poly1305),
    ];
    let opened: Vec<Vec<Cipher>> = corpus("sealed_record")
        .iter()
        .map(|(_, b)| record::fuzz_sealed_entry(&keys, b))
        .collect();
    // aes, chacha: each opens with its cipher's key only; flipped (under
    // fixed CRCs), plain, truncated: refused.
    assert_eq!(
        opened,
        vec![
            vec![Cipher::Aes256Gcm],
            vec![Cipher::XChaCha20Poly1305],
            vec![],
            vec![],
            vec![]
        ]
    );
}
