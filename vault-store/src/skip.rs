//! Test skips that CI counts.
//!
//! A test that cannot run here (no root for a loop mount, qemu-utils or
//! Azurite missing, a tmpfs that keeps every page cached) calls [`skip`]
//! and returns. Besides saying `SKIP <test>: <reason>` on standard error
//! (which the test harness hides for a passing test), it leaves a marker
//! file named after the test in `$COFFRE_SKIP_DIR` when that is set.
//! `make test` collects the markers and lists the skipped tests last;
//! `.ci/run` fails when a test skipped that `COFFRE_ALLOW_SKIP` does not
//! name (see README, "Tests").
//!
//! The test's name is the name of the thread the test harness runs it on
//! (`module::test_name`), so a skip must be reported from that thread.

use std::io::Write;

/// The variable naming the folder that collects skip markers.
pub const SKIP_DIR_VAR: &str = "COFFRE_SKIP_DIR";

/// Reports that the calling test skips, and why. Never fails: a marker
/// that cannot be written is said on standard error, so the skip still
/// shows in the test's output.
pub fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed-test")
        .to_string();
    eprintln!("SKIP {test}: {reason}");
    let Some(dir) = std::env::var_os(SKIP_DIR_VAR) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let file = dir.join(marker_name(&test));
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)?;
        writeln!(f, "{reason}")
    });
    if let Err(e) = written {
        eprintln!(
            "SKIP {test}: cannot write the skip marker {}: {e}",
            file.display()
        );
    }
}

/// A file name for a test's marker: the test's path, with anything but
/// letters, digits, `_`, `-`, `.` and `:` replaced (thread names are
/// free text).
fn marker_name(test: &str) -> String {
    let name: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match name.trim_start_matches('.') {
        "" => "unnamed-test".to_string(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::marker_name;

    #[test]
    fn marker_names_keep_the_test_path_and_nothing_that_leaves_the_folder() {
        assert_eq!(
            marker_name("nbd_qcow2::qcow2_incremental"),
            "nbd_qcow2::qcow2_incremental"
        );
        assert_eq!(marker_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(marker_name(".."), "unnamed-test");
        assert_eq!(marker_name("a b/c"), "a_b_c");
    }
}
