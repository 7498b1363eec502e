//! `scripts/install-deps.sh --detect-libclang` finds libclang where bindgen
//! (clang-sys) looks for it, and only there: fake library trees in a
//! temporary directory stand in for a machine's /usr.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-deps.sh")
}

/// A fake shared library: a 64-bit ELF header is what clang-sys checks.
fn fake_lib(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
    bytes.resize(64, 0);
    std::fs::write(path, bytes).unwrap();
}

fn detect(root: &Path, libclang_path: Option<&Path>) -> Output {
    let mut c = Command::new("bash");
    c.arg(script())
        .arg("--detect-libclang")
        .env("COFFRE_LIBCLANG_ROOT", root)
        .env_remove("LIBCLANG_PATH")
        .env_remove("LD_LIBRARY_PATH");
    if let Some(p) = libclang_path {
        c.env("LIBCLANG_PATH", p);
    }
    c.output().unwrap()
}

fn found(out: &Output) -> String {
    assert!(
        out.status.success(),
        "detection failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let t = tempfile::tempdir().unwrap();
    // What llvm-14-dev brings without libclang-dev (the fresh machine of
    // the bug report).
    fake_lib(&t.path().join("usr/lib/llvm-14/lib/libclang-cpp.so.14"));
    fake_lib(&t.path().join("usr/lib/x86_64-linux-gnu/libclang-cpp.so.14"));
    let out = detect(t.path(), None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn libclang_dev_layouts_are_found() {
    // libclang1-14 / libclang-dev on Debian: a versioned name in the
    // multiarch dir, and libclang.so in the LLVM dir.
    for rel in [
        "usr/lib/x86_64-linux-gnu/libclang-14.so.1",
        "usr/lib/llvm-14/lib/libclang.so",
        "usr/lib/llvm-16/lib/libclang.so.16.0.6",
        "usr/local/lib/libclang-17.so",
    ] {
        let t = tempfile::tempdir().unwrap();
        fake_lib(&t.path().join("usr/lib/llvm-14/lib/libclang-cpp.so.14"));
        fake_lib(&t.path().join(rel));
        assert_eq!(
            found(&detect(t.path(), None)),
            s(&t.path().join(rel)),
            "{rel}"
        );
    }
}

#[test]
fn a_file_that_is_not_a_64_bit_elf_library_does_not_count() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("usr/lib/libclang.so");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, b"INPUT(libclang.so.1)\n").unwrap();
    assert_eq!(detect(t.path(), None).status.code(), Some(1));
    // A 32-bit ELF is refused too.
    let mut b = b"\x7fELF\x01".to_vec();
    b.resize(64, 0);
    std::fs::write(&p, b).unwrap();
    assert_eq!(detect(t.path(), None).status.code(), Some(1));
}

#[test]
fn libclang_path_is_honoured_and_searched_alone() {
    let t = tempfile::tempdir().unwrap();
    let custom = t.path().join("opt/llvm/lib");
    fake_lib(&custom.join("libclang.so.18"));
    // Found through LIBCLANG_PATH, a directory or the file itself.
    assert_eq!(
        found(&detect(t.path(), Some(&custom))),
        s(&custom.join("libclang.so.18"))
    );
    assert_eq!(
        found(&detect(t.path(), Some(&custom.join("libclang.so.18")))),
        s(&custom.join("libclang.so.18"))
    );
    // While it is set, bindgen looks nowhere else: neither do we.
    fake_lib(&t.path().join("usr/lib/libclang.so"));
    let empty = t.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(detect(t.path(), Some(&empty)).status.code(), Some(1));
    // And without it, the standard directories are searched.
    assert_eq!(
        found(&detect(t.path(), None)),
        s(&t.path().join("usr/lib/libclang.so"))
    );
}

#[test]
fn a_wrong_libclang_path_gets_a_clear_message_not_an_install() {
    let t = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(script())
        .env("COFFRE_LIBCLANG_ROOT", t.path())
        .env("LIBCLANG_PATH", t.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("LIBCLANG_PATH") && err.contains("holds no libclang"),
        "{err}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
