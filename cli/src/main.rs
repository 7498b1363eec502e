//! The `coffre` command: parses arguments, shows progress, formats output
//! and maps errors to exit codes. The work is done by `coffre-engine`.

mod args;
mod commands;
mod exit;
mod output;
mod progress;
mod units;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    init_logging();
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("coffre: error: {err:#}");
            ExitCode::from(exit::code_for(&err))
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COFFRE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
