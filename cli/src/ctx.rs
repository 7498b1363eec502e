//! The context every command gets (output format, clock, lock wait, host
//! registry) and the one way commands open a vault. Every `*_cmd` module
//! depends on this one; it depends on none of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use coffre_engine::registry::Registry;
use coffre_engine::store::{Access, OpenOptions, Vault};
use coffre_engine::{Clock, SystemClock};
use jiff::Timestamp;

use crate::args::{Cli, CopySource, OutputFormat};
use coffre_engine::store::VaultConfig;
use coffre_engine::store::format::catalog_files::Role;
use coffre_engine::store::vault::copy_role;

/// What every command gets: output format, clock, lock wait, registry.
#[derive(Clone)]
pub struct Ctx {
    /// Output format.
    pub fmt: OutputFormat,
    /// The clock (`COFFRE_NOW` fixes it).
    pub clock: std::sync::Arc<dyn Clock>,
    /// How long writers wait for the vault lock.
    pub lock_timeout: Duration,
    /// The host registry of protected images.
    pub registry: Registry,
    /// Snapshots may be reflink clones (`COFFRE_SNAPSHOT_CLONE=off` forces
    /// the fallback copy, for tests and comparisons).
    pub allow_clone: bool,
    /// `COFFRE_SNAPSHOT_ROOT`: where default snapshot areas go instead of
    /// `.coffre-snapshots` at the root of each image's filesystem.
    pub snapshot_root: Option<std::path::PathBuf>,
    /// `--degraded-ok`: writers go on without a replica that is missing
    /// or unwritable, with a warning.
    pub degraded_ok: bool,
    /// Where an encrypted vault's key comes from.
    pub keys: std::sync::Arc<crate::keys::KeySources>,
}

impl Ctx {
    /// The context of one command line.
    pub fn from_cli(cli: &Cli) -> anyhow::Result<Ctx> {
        let clock: std::sync::Arc<dyn Clock> = std::sync::Arc::from(clock_from_env()?);
        let registry = Registry::from_env();
        let keys = crate::keys::KeySources::from_env(cli.key_file.clone())
            .remembering(registry.generations_dir(), clock.clone());
        Ok(Ctx {
            fmt: cli.output,
            clock,
            lock_timeout: Duration::from_secs(cli.lock_timeout),
            registry,
            allow_clone: std::env::var("COFFRE_SNAPSHOT_CLONE").map_or(true, |v| v != "off"),
            snapshot_root: std::env::var_os("COFFRE_SNAPSHOT_ROOT")
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from),
            degraded_ok: cli.degraded_ok,
            keys: std::sync::Arc::new(keys),
        })
    }

    /// How commands open a vault.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            wait: self.lock_timeout,
            degraded_ok: self.degraded_ok,
            lease_ttl: lease_ttl_from_env(),
            unlock: Some(self.keys.clone()),
            ..OpenOptions::default()
        }
    }

    /// The current instant.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

/// `COFFRE_LEASE_TTL` (seconds): the lifetime of a shared vault's writer
/// leases (default 600).
fn lease_ttl_from_env() -> Option<Duration> {
    std::env::var("COFFRE_LEASE_TTL")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

/// `COFFRE_NOW` (RFC 3339) fixes the clock for one command.
fn clock_from_env() -> anyhow::Result<Box<dyn Clock>> {
    match std::env::var("COFFRE_NOW") {
        Ok(s) if !s.is_empty() => {
            let t: Timestamp = s
                .parse()
                .with_context(|| format!("COFFRE_NOW={s:?} is not an RFC 3339 instant"))?;
            Ok(Box::new(coffre_engine::ManualClock::new(t)))
        }
        _ => Ok(Box::new(SystemClock)),
    }
}

/// Opens a vault; writers wait up to `--lock-timeout` for the lock.
pub fn open(ctx: &Ctx, dir: &Path, access: Access) -> anyhow::Result<Vault> {
    Vault::open_with(dir, access, &ctx.open_options())
        .with_context(|| format!("cannot open vault {}", dir.display()))
}

/// The directory of the copy a read-only command reads: `dir` itself, or
/// with `Some(Secondary)` the GRS secondary, found in `dir`'s config, or
/// `dir` when it is the secondary, or `COFFRE_SECONDARY` (the primary may
/// be gone entirely).
pub fn copy_dir(ctx: &Ctx, dir: &Path, from: Option<CopySource>) -> anyhow::Result<PathBuf> {
    if from != Some(CopySource::Secondary) {
        return Ok(dir.to_path_buf());
    }
    let config = VaultConfig::load_with(dir, Some(&*ctx.keys)).ok();
    let keys = config.as_ref().and_then(|c| c.keys().cloned());
    if dir.join("config").is_file() && copy_role(dir, keys.as_deref()) == Role::Secondary {
        return Ok(dir.to_path_buf());
    }
    let found = match config.and_then(|c| c.secondary) {
        Some(s) => s,
        None => match std::env::var_os("COFFRE_SECONDARY").filter(|v| !v.is_empty()) {
            Some(s) => PathBuf::from(s),
            None => anyhow::bail!(
                "vault {} names no secondary (and it may be gone): give the secondary's directory with --vault, or set COFFRE_SECONDARY",
                dir.display()
            ),
        },
    };
    // A secondary in a blob container is read through a local cache.
    if coffre_engine::store::format::remote::is_store_url(&found) {
        let url = found.to_string_lossy().into_owned();
        return coffre_engine::vault_ops::secondary_cache(
            &url,
            Duration::from_secs(60),
            Some(ctx.keys.clone()),
        )
        .with_context(|| format!("cannot read the secondary {url}"));
    }
    Ok(found)
}
