//! `make install` (`scripts/install-binary.sh`): the installed binary has
//! no debug info and is under 30 MB, runs, and links to its line tables,
//! installed where backtraces and gdb look (`/usr/lib/debug/PREFIX/bin`).

use std::path::Path;
use std::process::Command;

use crate::common::*;

fn readelf(args: &[&str], file: &Path) -> String {
    let out = Command::new("readelf")
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "readelf {args:?} {}", file.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_installed_binary_is_small_and_keeps_its_line_tables_apart() {
    let t = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-binary.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(bin())
        .arg("/opt/coffre")
        .arg(t.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = t.path().join("opt/coffre/bin/coffre");
    let debug = t.path().join("usr/lib/debug/opt/coffre/bin/coffre.debug");
    let size = std::fs::metadata(&installed).unwrap().len();
    assert!(size < 30_000_000, "{} is {size} bytes", installed.display());
    let sections = readelf(&["-SW"], &installed);
    for dwarf in [".debug_info", ".debug_line", ".symtab"] {
        assert!(!sections.contains(dwarf), "{dwarf} in {sections}");
    }
    assert!(
        readelf(&["-p", ".gnu_debuglink"], &installed).contains("coffre.debug"),
        "no debug link in {}",
        installed.display()
    );
    assert!(readelf(&["-SW"], &debug).contains(".debug_line"));
    let version = Command::new(&installed).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("coffre "));
}
