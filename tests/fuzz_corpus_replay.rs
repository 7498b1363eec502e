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
        if coffre_vault_store::record::fuzz_entry(&bytes) {
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
        if coffre_vault_store::blockmap::fuzz_entry(&bytes) {
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
        .filter(|(_, b)| coffre_vault_store::jobs::fuzz_entry(b))
        .count();
    assert_eq!(accepted, 1, "exactly the undamaged seed decodes");
}

#[test]
fn snapshot_manifest_corpus() {
    let accepted = corpus("snapshot_manifest")
        .iter()
        .filter(|(_, b)| coffre_engine::snapshotter::manifest::fuzz_entry(b))
        .count();
    assert_eq!(accepted, 1, "exactly the undamaged seed reads");
}
