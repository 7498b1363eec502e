//! A real process rewrites the image in a loop while it is backed up (the
//! fallback path, which is not atomic): every point restores to a state
//! the image really had, or the backup fails cleanly with SourceChanged
//! (exit 6). Never a mix of two states.

use std::process::{Command, Stdio};

use crate::common::*;

#[test]
fn a_writer_never_produces_a_mixed_point() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    let size = 8 << 20;
    // Four whole-image states; the writer copies them over the image in
    // turn, pausing between states for a random 0-30 ms.
    let states: Vec<Vec<u8>> = (0..4)
        .map(|g| {
            let p = t.path().join(format!("state{g}"));
            random_file(&p, size, 90 + g as u64);
            std::fs::read(&p).unwrap()
        })
        .collect();
    std::fs::write(&img, &states[0]).unwrap();
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(
            "cd \"$0\"; while :; do for g in 0 1 2 3; do \
             dd if=state$g of=vm.img bs=1M conv=notrunc status=none; \
             sleep 0.0$(( $(od -An -N1 -tu1 /dev/urandom) % 4 )); done; done",
        )
        .arg(t.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut consistent = 0;
    let mut changed = 0;
    for _ in 0..10 {
        let out = run(&[
            "--output",
            "json",
            "backup",
            "--vault",
            s(&vault),
            "--item",
            "vm",
            s(&img),
        ]);
        match out.status.code() {
            Some(0) => consistent += 1,
            Some(6) => {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("changed during the backup"), "{err}");
                changed += 1;
            }
            other => panic!(
                "backup ended {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    let _ = writer.kill();
    let _ = writer.wait();
    eprintln!("writer test: {consistent} consistent points, {changed} SourceChanged");
    let r = t.path().join("r.img");
    for p in points(&vault, "vm") {
        let id = p["id"].as_str().unwrap();
        for from in ["snapshot", "vault"] {
            let mut args = restore_args(&vault, "vm", Some(id), &r, true);
            args.extend(["--from", from]);
            ok(&args);
            let got = std::fs::read(&r).unwrap();
            assert!(
                states.contains(&got),
                "point {id} from the {from} is not a state the image had"
            );
        }
    }
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}
