//! An image that grew or shrank since its last point backs up correctly.

use crate::common::*;

#[test]
fn grown_and_shrunk_images_restore_exactly() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 3 << 20, 5);
    ok(&["backup", "--vault", s(&vault), s(&img)]);

    // Grow by 5 MiB + 7 bytes of new data.
    let f = std::fs::OpenOptions::new().append(true).open(&img).unwrap();
    let mut tail = vec![0u8; (5 << 20) + 7];
    Rng::new(6).fill(&mut tail);
    std::io::Write::write_all(&mut &f, &tail).unwrap();
    drop(f);
    let grown = t.path().join("grown.copy");
    std::fs::copy(&img, &grown).unwrap();
    ok(&["backup", "--vault", s(&vault), s(&img)]);

    // Shrink to 1 MiB - 1.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len((1 << 20) - 1)
        .unwrap();
    ok(&["backup", "--vault", s(&vault), s(&img)]);

    let pts = points(&vault, "vm");
    let sizes: Vec<u64> = pts
        .iter()
        .map(|p| p["image_size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![3 << 20, (8 << 20) + 7, (1 << 20) - 1]);
    let out = t.path().join("out.img");
    ok(&restore_args(
        &vault,
        "vm",
        Some(pts[1]["id"].as_str().unwrap()),
        &out,
        false,
    ));
    assert_same(&out, &grown);
    ok(&restore_args(&vault, "vm", None, &out, true));
    assert_same(&out, &img);
}
