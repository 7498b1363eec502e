//! Scans for plaintext at rest: every non-zero 4 KiB block of an image,
//! looked for at every offset of every file under some directories (a
//! vault, its copies, a cache, the blobs of a container downloaded to a
//! directory), and any given byte string (an item name, a path).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

const KIB: usize = 1024;

/// Every non-zero 4 KiB block of `image`.
pub fn blocks_of(image: &Path) -> HashSet<Vec<u8>> {
    std::fs::read(image)
        .unwrap()
        .chunks(4 * KIB)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(<[u8]>::to_vec)
        .collect()
}

/// Every file under `dirs`.
pub fn files_under(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo: Vec<PathBuf> = dirs.to_vec();
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(p);
            } else if t.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// The files under `dirs` that hold any of `blocks` (compared at every 4
/// KiB-aligned and every 512-byte-aligned offset: a record payload starts
/// anywhere).
pub fn files_with_plaintext(dirs: &[PathBuf], blocks: &HashSet<Vec<u8>>) -> Vec<PathBuf> {
    // Index the blocks by their first 64 bytes, then scan every offset.
    let heads: HashSet<&[u8]> = blocks.iter().map(|b| &b[..64]).collect();
    let mut found = Vec::new();
    for f in files_under(dirs) {
        let data = std::fs::read(&f).unwrap();
        let hit = data.windows(64).enumerate().any(|(i, w)| {
            heads.contains(w) && data.get(i..i + 4 * KIB).is_some_and(|b| blocks.contains(b))
        });
        if hit {
            found.push(f);
        }
    }
    found
}

/// The files under `dirs` that contain any of `needles` (item names,
/// image paths) anywhere in their bytes.
pub fn files_with_text(dirs: &[PathBuf], needles: &[&[u8]]) -> Vec<PathBuf> {
    files_under(dirs)
        .into_iter()
        .filter(|f| {
            let data = std::fs::read(f).unwrap();
            needles
                .iter()
                .any(|n| !n.is_empty() && data.windows(n.len()).any(|w| w == *n))
        })
        .collect()
}
