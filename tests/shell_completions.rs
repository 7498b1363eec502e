//! `coffre completions SHELL` and `coffre man` come from the same clap
//! definitions as the parser: every command appears in them.

use crate::common::*;

#[test]
fn completion_scripts_name_every_command() {
    let bash = ok(&["completions", "bash"]);
    assert!(
        bash.contains("complete -F _coffre"),
        "{}",
        &bash[..200.min(bash.len())]
    );
    for cmd in [
        "backup",
        "restore",
        "verify",
        "policy",
        "daemon",
        "completions",
    ] {
        assert!(bash.contains(cmd), "bash completion lacks {cmd}");
    }
    assert!(bash.contains("--in-place"));
    let zsh = ok(&["completions", "zsh"]);
    assert!(
        zsh.starts_with("#compdef coffre"),
        "{}",
        &zsh[..100.min(zsh.len())]
    );
    let fish = ok(&["completions", "fish"]);
    assert!(fish.contains("complete -c coffre"));
    let err = fails(&["completions", "tcsh"], 2);
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn a_reader_that_went_away_is_no_panic() {
    // `coffre completions bash | head -1`: the pipe is closed under the
    // writer. A pipe whose read end is already closed makes it certain.
    use std::os::fd::FromRawFd;
    for args in [
        &["completions", "bash"][..],
        &["man"],
        &["--output", "json", "man"],
    ] {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
        // SAFETY: the write end is ours and handed over to the child.
        let write_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
        let out = coffre()
            .args(args)
            .stdout(std::process::Stdio::from(write_end))
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

#[test]
fn man_pages_cover_the_commands() {
    let page = ok(&["man"]);
    assert!(
        page.contains(".TH coffre 1"),
        "{}",
        &page[..200.min(page.len())]
    );
    assert!(page.contains("restore"));
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("man1");
    ok(&["man", "--dir", s(&dir)]);
    for page in ["coffre.1", "coffre-restore.1", "coffre-vault-create.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let restore = std::fs::read_to_string(dir.join("coffre-restore.1")).unwrap();
    assert!(
        restore.contains("in\\-place"),
        "restore page lacks --in-place"
    );
}
