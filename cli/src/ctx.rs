//! The context every command gets (output format, clock, lock wait, host
//! registry) and the one way commands open a vault. Every `*_cmd` module
//! depends on this one; it depends on none of them.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use coffre_engine::registry::Registry;
use coffre_engine::store::{Access, Vault};
use coffre_engine::{Clock, SystemClock};
use jiff::Timestamp;

use crate::args::{Cli, OutputFormat};

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
}

impl Ctx {
    /// The context of one command line.
    pub fn from_cli(cli: &Cli) -> anyhow::Result<Ctx> {
        Ok(Ctx {
            fmt: cli.output,
            clock: std::sync::Arc::from(clock_from_env()?),
            lock_timeout: Duration::from_secs(cli.lock_timeout),
            registry: Registry::from_env(),
            allow_clone: std::env::var("COFFRE_SNAPSHOT_CLONE").map_or(true, |v| v != "off"),
            snapshot_root: std::env::var_os("COFFRE_SNAPSHOT_ROOT")
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from),
        })
    }

    /// The current instant.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }
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
    Vault::open_wait(dir, access, ctx.lock_timeout)
        .with_context(|| format!("cannot open vault {}", dir.display()))
}
