//! A flipped byte in a segment: verify names the damaged point, block and
//! chunk; restoring that point fails cleanly, from the vault and from its
//! snapshot (which shares the bytes); other points still restore.

use std::os::unix::fs::FileExt;

use crate::common::*;

#[test]
fn verify_and_restore_after_a_flipped_byte() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("disk.img");
    random_file(&img, 4 << 20, 1);
    let day1 = t.path().join("day1.copy");
    std::fs::copy(&img, &day1).unwrap();
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let segments_after_day1 = segment_files(&vault);

    // Day two rewrites the first 256 KiB with new random data.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut b = vec![0u8; 256 << 10];
    Rng::new(99).fill(&mut b);
    f.write_all_at(&b, 0).unwrap();
    drop(f);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let pts = points(&vault, "disk");
    let (p1, p2) = (
        pts[0]["id"].as_str().unwrap(),
        pts[1]["id"].as_str().unwrap(),
    );
    ok(&["verify", "--vault", s(&vault), "--read-data"]);

    // Day two's records are its snapshot's pack, adopted as a segment of
    // its own (a hard link). Flip one byte inside its first record (the
    // data of block 0, stored raw since it is random): segment header 32
    // bytes, record header 56, then 1000 into the data.
    let day2: Vec<_> = segment_files(&vault)
        .into_iter()
        .filter(|p| !segments_after_day1.contains(p))
        .filter(|p| std::fs::read(p).unwrap().starts_with(b"CFPACK"))
        .collect();
    assert_eq!(day2.len(), 1, "day two adopted its pack: {day2:?}");
    let seg = &day2[0];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(seg)
        .unwrap();
    let at = 32 + 56 + 1000;
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
    drop(f);

    // Verify without reading data checks structure only and passes; with
    // --read-data it names the point, the block and the chunk.
    let out = run(&[
        "--output",
        "json",
        "verify",
        "--vault",
        s(&vault),
        "--read-data",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = report["findings"].as_array().unwrap();
    let block_finding = findings
        .iter()
        .find(|f| f["code"] == "block-damaged")
        .unwrap_or_else(|| panic!("no block finding: {report}"));
    assert_eq!(block_finding["point"], p2);
    assert_eq!(block_finding["block"], 0);
    assert!(block_finding["chunk"].is_string());
    assert!(
        findings.iter().all(|f| f["point"] != p1),
        "point 1 is intact: {report}"
    );
    assert!(findings.iter().any(|f| {
        f["code"] == "chunk-damaged"
            && f["message"]
                .as_str()
                .unwrap()
                .contains("data checksum mismatch")
    }));
    let table = run(&["verify", "--vault", s(&vault), "--read-data"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains(p2) && text.contains("block 0"), "{text}");

    // Restore of point 2 from the vault fails cleanly and leaves no file;
    // point 1 restores. (Its snapshot is intact: instant restore works.)
    let out2 = t.path().join("p2.img");
    let mut args = restore_args(&vault, "disk", Some(p2), &out2, false);
    args.extend(["--from", "vault"]);
    let err = fails(&args, 7);
    assert!(err.contains("block 0") && err.contains("damaged"), "{err}");
    assert!(!out2.exists());
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial")
        })
        .collect();
    assert!(leftovers.is_empty(), "partial restore left behind");
    let out1 = t.path().join("p1.img");
    let mut args = restore_args(&vault, "disk", Some(p1), &out1, false);
    args.extend(["--from", "vault"]);
    ok(&args);
    assert_same(&out1, &day1);
    // Point 2's snapshot shares those bytes (the pack is the segment): its
    // instant restore finds the same damage and fails as cleanly.
    let err = fails(&restore_args(&vault, "disk", Some(p2), &out2, false), 7);
    assert!(err.contains("checksum"), "{err}");
    assert!(!out2.exists());
}
