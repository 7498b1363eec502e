//! Command-line grammar (clap derive). Names here are a public contract:
//! scripts rely on them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// coffre: block-level incremental backups of raw disk images.
#[derive(Debug, Parser)]
#[command(name = "coffre", version, about, propagate_version = true)]
pub struct Cli {
    /// Output format of commands that print data.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables.
    Table,
    /// Stable JSON (documented in the README).
    Json,
}

/// The vault a command works on.
#[derive(Debug, Args)]
pub struct VaultArg {
    /// Vault directory.
    #[arg(long, env = "COFFRE_VAULT", value_name = "DIR")]
    pub vault: PathBuf,
}

/// Worker threads.
#[derive(Debug, Args)]
pub struct ThreadsArg {
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or inspect a vault.
    #[command(subcommand)]
    Vault(VaultCommand),

    /// Back an image up now, as a new recovery point.
    Backup {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name (default: the image's file stem).
        #[arg(long)]
        item: Option<String>,
        /// Limit read throughput, e.g. 50M (bytes per second; K, M, G are binary units).
        #[arg(long, value_name = "RATE", value_parser = crate::units::parse_size)]
        rate_limit: Option<u64>,
        #[command(flatten)]
        threads: ThreadsArg,
        /// The raw disk image (file or block device).
        image: PathBuf,
    },

    /// List the recovery points of an item.
    Points {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name.
        #[arg(long)]
        item: String,
    },

    /// Restore a recovery point to a sparse image file.
    Restore {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name.
        #[arg(long)]
        item: String,
        /// Point id, unique id prefix, or `latest`.
        #[arg(long, default_value = "latest", value_name = "ID")]
        point: String,
        /// File to write.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        threads: ThreadsArg,
    },

    /// Check that the index and segments agree and every point is complete.
    Verify {
        #[command(flatten)]
        vault: VaultArg,
        /// Also read, decompress and re-hash every chunk.
        #[arg(long)]
        read_data: bool,
        #[command(flatten)]
        threads: ThreadsArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Create a new vault.
    Create {
        #[command(flatten)]
        vault: VaultArg,
        /// Vault name: 2-50 characters, a letter first, then letters, digits or hyphens.
        #[arg(long)]
        name: Option<String>,
        /// Block size: a power of two from 64K to 4M (default 64K).
        #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size)]
        block_size: Option<u64>,
        /// zstd level, 0 (store raw) to 19 (default 1).
        #[arg(long, value_name = "N")]
        compression_level: Option<i32>,
    },
    /// Show settings, items, points and space used.
    Show {
        #[command(flatten)]
        vault: VaultArg,
    },
}
