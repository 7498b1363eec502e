//! `vault create`, `vault show`, `vault set`, `vault rebuild-index`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::Clock;
use coffre_engine::store::{Access, Redundancy};
use coffre_engine::vault_ops::{self, CreateOptions};

use crate::args::OutputFormat;
use crate::ctx::{Ctx, open};
use crate::output::{self, bytes, columns};

/// The settings `vault create` takes.
pub struct CreateArgs {
    pub name: Option<String>,
    pub block_size: Option<u64>,
    pub compression_level: Option<i32>,
    pub redundancy: Option<String>,
    pub snapshot_area: Option<PathBuf>,
    pub replicas: Vec<PathBuf>,
    pub secondary: Option<PathBuf>,
    pub store: Option<String>,
    pub encryption: Option<String>,
    pub generate_key_file: Option<PathBuf>,
    pub kdf: crate::args::KdfArgs,
}

/// What `vault set` changes.
pub struct SetArgs {
    pub redundancy: Option<String>,
    pub snapshot_area: Option<PathBuf>,
    pub add_replica: Vec<PathBuf>,
    pub remove_replica: Vec<PathBuf>,
    pub secondary: Option<PathBuf>,
}

fn parse_redundancy(r: &str) -> anyhow::Result<Redundancy> {
    r.parse::<Redundancy>()
        .map_err(|e| anyhow::anyhow!("--redundancy: {e}"))
}

/// True when the vault `vault create` makes sends its data off the host:
/// it lives in object storage, or its GRS secondary is a container.
fn leaves_the_host(args: &CreateArgs) -> bool {
    args.store.is_some()
        || args
            .secondary
            .as_deref()
            .is_some_and(coffre_engine::store::format::remote::is_store_url)
}

/// The encryption `vault create` starts a vault with: the cipher asked
/// for (default: aes-256-gcm when the data leaves the host, in object
/// storage or through a secondary in a container; none for a local
/// vault), a new master key, and its first slot for the command's key
/// source.
fn new_encryption(
    args: &CreateArgs,
    keys: &crate::keys::KeySources,
    clock: &dyn Clock,
) -> anyhow::Result<Option<vault_ops::NewEncryption>> {
    use coffre_engine::store::crypto::{Cipher, KeySlot, MasterKey};
    let cipher = match args.encryption.as_deref() {
        Some("none") => {
            if leaves_the_host(args) {
                eprintln!(
                    "warning: --encryption none: this vault's data leaves the host unencrypted; whoever can read the bucket or container reads every disk"
                );
            }
            return Ok(None);
        }
        Some(name) => Cipher::parse(name).ok_or_else(|| {
            anyhow::anyhow!("--encryption {name:?}: aes-256-gcm, chacha20-poly1305 or none")
        })?,
        None if leaves_the_host(args) => Cipher::Aes256Gcm,
        None => return Ok(None),
    };
    if let (Some(_), Some(k)) = (&args.generate_key_file, &keys.key_file) {
        anyhow::bail!(
            "--generate-key-file writes the key file of the vault's first slot: drop --key-file/COFFRE_KEY_FILE ({})",
            k.display()
        );
    }
    let (secret, generated) = match (
        &args.generate_key_file,
        &keys.key_file,
        &keys.password_command,
    ) {
        (Some(path), _, _) => {
            let (bytes, guard) = crate::keys::GeneratedKeyFile::create(path)?;
            (crate::keys::Owned::KeyFile(bytes), guard)
        }
        (None, Some(path), _) => (
            crate::keys::Owned::KeyFile(crate::keys::read_key_file(path)?),
            crate::keys::GeneratedKeyFile::none(),
        ),
        (None, None, Some(cmd)) => (
            crate::keys::Owned::Passphrase(crate::keys::run_password_command(
                cmd,
                "COFFRE_PASSWORD_COMMAND",
            )?),
            crate::keys::GeneratedKeyFile::none(),
        ),
        (None, None, None) => crate::keys::new_secret(crate::keys::NewKeyFile::None).map_err(|e| {
            let why = if args.encryption.is_none() {
                " (a vault whose data leaves the host is encrypted by default; `--encryption none` opts out)"
            } else {
                ""
            };
            anyhow::anyhow!("an encrypted vault needs a key{why}: {e}")
        })?,
    };
    let master = MasterKey::generate()?;
    let slot = KeySlot::new(
        &master,
        &secret.secret(),
        crate::key_cmd::kdf_params(&args.kdf)?,
        None,
        clock.now(),
    )?;
    // From here the vault is written: the key file stays, whatever
    // happens (a vault half-written with its slot must still open).
    generated.keep();
    Ok(Some(vault_ops::NewEncryption {
        cipher,
        master,
        slot,
    }))
}

pub fn create(
    fmt: OutputFormat,
    dir: &Path,
    args: CreateArgs,
    keys: &crate::keys::KeySources,
    clock: &dyn Clock,
) -> anyhow::Result<ExitCode> {
    let encryption = new_encryption(&args, keys, clock)?;
    let redundancy = args
        .redundancy
        .as_deref()
        .map(parse_redundancy)
        .transpose()?;
    let block_size = args
        .block_size
        .map(|b| u32::try_from(b).map_err(|_| anyhow::anyhow!("block size {b} is too large")))
        .transpose()?;
    let secondary = args.secondary.filter(|p| !p.as_os_str().is_empty());
    // GRS is the default when a secondary is given; GRS without one has
    // nothing to replicate to.
    let redundancy = match (redundancy, &secondary) {
        (Some(Redundancy::Grs), None) => anyhow::bail!(
            "--redundancy GRS needs a secondary: give --secondary DIR (or set COFFRE_SECONDARY)"
        ),
        (Some(r), _) => r,
        (None, Some(_)) => Redundancy::Grs,
        (None, None) => Redundancy::Lrs,
    };
    let mut fresh: Vec<std::path::PathBuf> = vec![dir.to_path_buf()];
    fresh.extend(args.replicas.iter().cloned());
    fresh.extend(secondary.iter().cloned());
    let opts = CreateOptions {
        name: args.name,
        block_size,
        compression_level: args.compression_level,
        redundancy: Some(redundancy),
        snapshot_area: args.snapshot_area,
        replicas: args.replicas,
        secondary,
        store: args.store,
        encryption,
    };
    let vault = vault_ops::create_vault(dir, &opts, clock)
        .with_context(|| format!("cannot create vault {}", dir.display()))?;
    keys.forget(
        &fresh
            .iter()
            .map(std::path::PathBuf::as_path)
            .collect::<Vec<_>>(),
    );
    let summary = vault_ops::summarize(&vault, clock.now())?;
    output::emit(fmt, &summary, |s| {
        let mut out = format!(
            "created vault {} at {} (block size {}, zstd level {}, {}, {} cop{})\n",
            s.name,
            s.path.display(),
            bytes(u64::from(s.block_size)),
            s.compression_level,
            s.redundancy,
            s.copies.len(),
            if s.copies.len() == 1 { "y" } else { "ies" }
        );
        for w in &s.copy_warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        if let Some(cipher) = s.encryption {
            out.push_str(&format!(
                "encrypted with {cipher}: a lost key means lost backups. Keep the recovery text of `coffre key export --vault {}` on paper, and add a second key slot (`coffre key add`)\n",
                s.path.display()
            ));
        }
        if let Some(url) = &s.store {
            out.push_str(&format!("the vault lives in {url}; other hosts join it with `coffre vault attach --store {url} --vault DIR`\n"));
        } else if s.secondary.is_none() {
            out.push_str("for GRS, give --secondary DIR (or set COFFRE_SECONDARY): an asynchronous copy in a second location that `coffre restore --from secondary` reads when this one is gone\n");
        }
        out
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn set(ctx: &Ctx, dir: &Path, args: SetArgs) -> anyhow::Result<ExitCode> {
    let SetArgs {
        redundancy,
        snapshot_area,
        add_replica,
        remove_replica,
        secondary,
    } = args;
    if redundancy.is_none()
        && snapshot_area.is_none()
        && add_replica.is_empty()
        && remove_replica.is_empty()
        && secondary.is_none()
    {
        anyhow::bail!(
            "nothing to set: give --redundancy, --snapshot-area, --add-replica, --remove-replica or --secondary"
        );
    }
    let r = redundancy.as_deref().map(parse_redundancy).transpose()?;
    // Replacing or dropping a lost replica must not need that replica.
    let mut ctx = ctx.clone();
    ctx.degraded_ok |= !add_replica.is_empty() || !remove_replica.is_empty();
    let ctx = &ctx;
    let mut vault = open(ctx, dir, Access::Write)?;
    for d in &remove_replica {
        vault_ops::remove_replica(&vault, d)
            .with_context(|| format!("cannot remove replica {}", d.display()))?;
    }
    for d in &add_replica {
        let copied = vault_ops::add_replica(&vault, d)
            .with_context(|| format!("cannot add replica {}", d.display()))?;
        tracing::info!(replica = %d.display(), bytes = copied, "filled the replica");
    }
    if let Some(s) = &secondary {
        if coffre_engine::store::format::remote::is_store_url(s) && vault.config().keys().is_none()
        {
            eprintln!(
                "warning: vault {} is not encrypted: its data leaves the host unencrypted for {}; whoever can read that container reads every disk (a vault created with `--secondary` in a container is encrypted by default)",
                dir.display(),
                s.display()
            );
        }
        vault_ops::set_secondary(&vault, s)
            .with_context(|| format!("cannot set secondary {}", s.display()))?;
    }
    if !add_replica.is_empty() || !remove_replica.is_empty() || secondary.is_some() {
        // Reopening writes the catalog files to the new copies.
        drop(vault);
        vault = open(ctx, dir, Access::Write)?;
    }
    if let Some(r) = r {
        vault_ops::set_redundancy(&vault, r)
            .with_context(|| format!("cannot change vault {}", dir.display()))?;
    }
    if let Some(area) = &snapshot_area {
        let area = (!area.as_os_str().is_empty()).then_some(area.as_path());
        vault_ops::set_snapshot_area(&vault, area)
            .with_context(|| format!("cannot change vault {}", dir.display()))?;
    }
    drop(vault);
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let cfg = vault.config();
    let view = serde_json::json!({
        "redundancy": cfg.redundancy,
        "snapshot_area": cfg.snapshot_area,
        "replicas": cfg.replicas,
        "secondary": cfg.secondary,
    });
    output::emit(ctx.fmt, &view, |_| {
        format!(
            "vault {}: redundancy {}, snapshot area {}, {} replica(s){}\n",
            dir.display(),
            cfg.redundancy,
            cfg.snapshot_area
                .as_ref()
                .map_or("next to each image".to_string(), |p| p
                    .display()
                    .to_string()),
            cfg.replicas.len(),
            cfg.secondary
                .as_ref()
                .map_or(String::new(), |s| format!(", secondary {}", s.display()))
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn show(ctx: &Ctx, dir: &Path) -> anyhow::Result<ExitCode> {
    let fmt = ctx.fmt;
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let s = vault_ops::summarize(&vault, ctx.now())?;
    output::emit(fmt, &s, |s| {
        let mut out = format!(
            "vault        {}\npath         {}\nid           {}\nformat       v{}\nblock size   {}\ncompression  zstd level {}\nredundancy   {}\ncreated      {}\npoints       {}\nlogical      {}\nstored       {}",
            s.name,
            s.path.display(),
            s.vault_id,
            s.format_version,
            bytes(u64::from(s.block_size)),
            s.compression_level,
            s.redundancy,
            output::when(s.created),
            s.points,
            bytes(s.logical_bytes),
            bytes(s.stored_bytes),
        );
        if s.stored_bytes > 0 {
            out.push_str(&format!(
                " ({:.1}x reduction)",
                s.logical_bytes as f64 / s.stored_bytes as f64
            ));
        }
        out.push_str(&format!(
            "\nsnapshots    {}\n\n",
            match (&s.snapshot_area, s.snapshot_areas.is_empty()) {
                (Some(a), _) => format!("in {}", a.display()),
                (None, true) => "next to each image (none taken yet)".to_string(),
                (None, false) => format!(
                    "next to each image: {}",
                    s.snapshot_areas
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        ));
        if let (Some(url), Some(tag)) = (&s.store, s.host_tag) {
            out.push_str(&format!("store        {url} (this host: tag {tag:04x})\n"));
            if let Some(g) = &s.gc_state {
                out.push_str(&format!(
                    "gc           epoch {}{}\n",
                    g.epoch,
                    g.marking
                        .as_ref()
                        .map(|h| format!(
                            ", running on host {:04x} until {}",
                            h.host_tag,
                            output::when(h.until)
                        ))
                        .unwrap_or_default()
                ));
            }
            for l in &s.leases {
                out.push_str(&format!(
                    "writer       host {:04x} since {} (lease until {})\n",
                    l.host_tag,
                    output::when(l.taken),
                    output::when(l.expires)
                ));
            }
            out.push('\n');
        }
        out.push_str("COPIES\n");
        let copy_rows: Vec<Vec<String>> = s
            .copies
            .iter()
            .map(|c| {
                vec![
                    c.role.to_string(),
                    c.dir.display().to_string(),
                    c.space
                        .as_ref()
                        .map_or("-".into(), |sp| sp.filesystem.clone()),
                    c.space
                        .as_ref()
                        .map_or("-".into(), |sp| bytes(sp.free_bytes)),
                    c.problem.clone().unwrap_or_else(|| "ok".into()),
                ]
            })
            .collect();
        out.push_str(&columns(
            &["ROLE", "DIR", "FS", "FREE", "STATE"],
            &copy_rows,
        ));
        for w in &s.copy_warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        if let Some(sec) = &s.secondary {
            out.push_str(&format!(
                "replication  {} point(s) behind, lag {} s, last run {}\n",
                sec.points_behind,
                sec.lag_seconds,
                sec.last_run.map_or("never".to_string(), |t| t.to_string())
            ));
        }
        out.push('\n');
        let rows: Vec<Vec<String>> = s
            .items
            .iter()
            .map(|i| {
                vec![
                    i.name.clone(),
                    i.points.to_string(),
                    i.last_backup.map(output::when).unwrap_or_default(),
                    bytes(i.latest_size),
                    bytes(i.stored_bytes),
                    format!("{} ({})", i.snapshots, bytes(i.snapshot_bytes)),
                    i.source.display().to_string(),
                ]
            })
            .collect();
        out + &columns(
            &[
                "ITEM",
                "POINTS",
                "LAST BACKUP",
                "SIZE",
                "STORED",
                "SNAPSHOTS",
                "SOURCE",
            ],
            &rows,
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn attach(ctx: &Ctx, dir: &Path, url: &str) -> anyhow::Result<ExitCode> {
    let vault = vault_ops::attach_vault(dir, url, ctx.lock_timeout, Some(ctx.keys.clone()))
        .with_context(|| format!("cannot attach {} to the vault in {url}", dir.display()))?;
    let summary = vault_ops::summarize(&vault, ctx.clock.now())?;
    output::emit(ctx.fmt, &summary, |s| {
        format!(
            "attached {} to vault {} in {url} ({} items, {} points)\n",
            s.path.display(),
            s.name,
            s.items.len(),
            s.points
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn rebuild_index(ctx: &Ctx, dir: &Path, from: Option<&Path>) -> anyhow::Result<ExitCode> {
    let source = from.unwrap_or(dir);
    let (vault, report) = coffre_engine::store::maintenance::rebuild::rebuild_index_unlocked(
        dir,
        source,
        ctx.lock_timeout,
        Some(ctx.keys.clone()),
    )
    .with_context(|| format!("cannot rebuild the index of vault {}", dir.display()))?;
    drop(vault);
    output::emit(ctx.fmt, &report, |r| {
        let mut out = format!(
            "rebuilt the index of {} from {}: {} segments, {} chunks, {} items, {} policies, {} points in {} ms\n",
            dir.display(),
            r.source.display(),
            r.segments,
            r.chunks,
            r.items,
            r.policies,
            r.points,
            r.duration_ms
        );
        for b in r.bad_headers.iter().chain(&r.bad_files) {
            out.push_str(&format!("warning: {b}\n"));
        }
        if r.skipped_bytes > 0 {
            out.push_str(&format!(
                "note: {} between records belong to no record (holes or damage); run `coffre verify --read-data`\n",
                bytes(r.skipped_bytes)
            ));
        }
        out
    })?;
    Ok(ExitCode::SUCCESS)
}
