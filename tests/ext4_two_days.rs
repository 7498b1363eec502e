//! A real ext4 filesystem, changed through the filesystem for a second
//! day: both points restore byte-identical, day two costs little.

use crate::common::*;

#[test]
fn ext4_day_one_and_day_two() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("fs.img");
    ext4_image(&img, 64, 11);
    let day1 = t.path().join("day1.copy");
    std::fs::copy(&img, &day1).unwrap();
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    ext4_day_two(&img, 12);
    ok(&["backup", "--vault", s(&vault), s(&img)]);

    let pts = points(&vault, "fs");
    let day2_stored = pts[1]["stored_bytes"].as_u64().unwrap();
    let day1_stored = pts[0]["stored_bytes"].as_u64().unwrap();
    assert!(
        day2_stored < day1_stored / 2,
        "day two {day2_stored} vs day one {day1_stored}"
    );

    for (p, want) in [(&pts[0], &day1), (&pts[1], &img)] {
        let out = t.path().join(format!("{}.out", p["id"].as_str().unwrap()));
        ok(&restore_args(
            &vault,
            "fs",
            Some(p["id"].as_str().unwrap()),
            &out,
            false,
        ));
        assert_same(&out, want);
    }
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}
