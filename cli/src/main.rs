//! The `coffre` command: parses arguments, shows progress, formats output
//! and maps errors to exit codes. The work is done by `coffre-engine`.

mod args;
mod backup_cmd;
mod bench_cmd;
mod commands;
mod copy_cmd;
mod ctx;
mod daemon;
mod daemon_live;
mod docs_cmd;
mod domain_cmd;
mod exit;
mod export_cmd;
mod item_cmd;
mod job_cmd;
mod key_cmd;
mod keys;
mod live_cmd;
mod maintenance_cmd;
mod mount_cmd;
mod mount_fs;
mod output;
mod point_cmd;
mod policy_cmd;
mod progress;
mod replicate_cmd;
mod restore_cmd;
mod signals;
mod units;
mod vault_cmd;
mod verify_cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A vault holds whole disks: whatever this process creates (RocksDB's
    // files included) is private to its owner. coffre's own files ask for
    // 0600/0700 explicitly; restored images use --mode.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    raise_open_file_limit();
    let cli = args::Cli::parse();
    // The scheduler commands report what they do; the others stay quiet.
    let chatty = matches!(
        cli.command,
        args::Command::Daemon { .. } | args::Command::RunDue { .. }
    );
    init_logging(if chatty { "info" } else { "warn" });
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("coffre: error: {err:#}");
            ExitCode::from(exit::code_for(&err))
        }
    }
}

/// Lets this process open as many files as its hard limit allows: a
/// restore keeps every segment it reads open (twice: one descriptor for
/// the page cache, one for direct reads), and a large vault has
/// thousands. The soft limit is often 1,024 for no reason but
/// `select(2)`, which coffre does not use. Best effort.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on this process with a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COFFRE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
