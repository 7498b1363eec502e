//! `coffre key list|add|remove|passwd|export|import`: an encrypted vault's
//! key slots and its recovery text. Every command but `import` opens the
//! vault with the command's key sources (`crate::keys`); `import` opens it
//! with the master key of a recovery text.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::store::crypto::slot::KdfParams;
use coffre_engine::store::crypto::{KeySlot, MasterKey, recovery};
use coffre_engine::store::format::config::Encryption;
use coffre_engine::store::{Access, OpenOptions, Vault};
use serde::Serialize;

use crate::args::{KdfArgs, KeyCommand};
use crate::ctx::{Ctx, open};
use crate::keys::{KeySources, NewKeyFile, new_secret};
use crate::output;

/// Runs a `coffre key` command.
pub fn run(ctx: &Ctx, cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeyCommand::List { vault } => list(ctx, &vault.vault),
        KeyCommand::Add {
            vault,
            new_key_file,
            generate_key_file,
            label,
            kdf,
        } => {
            let v = open(ctx, &vault.vault, Access::Write)?;
            let new_key = NewKeyFile::of(new_key_file.as_deref(), generate_key_file.as_deref());
            let slot = add(ctx, &v, new_key, label, &kdf)?;
            say(ctx, &format!("added key slot {}", slot.id));
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Remove { vault, id } => {
            let v = open(ctx, &vault.vault, Access::Write)?;
            remove(&v, &id)?;
            say(ctx, &format!("removed key slot {id}"));
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Passwd {
            vault,
            new_key_file,
            generate_key_file,
            kdf,
        } => {
            let v = open(ctx, &vault.vault, Access::Write)?;
            let old = ctx.keys.opened_slot().ok_or_else(|| {
                anyhow::anyhow!(
                    "no key slot opened the vault: give its current passphrase or key file"
                )
            })?;
            let label = encryption(&v)?
                .slots
                .iter()
                .find(|s| s.id == old)
                .and_then(|s| s.label.clone());
            let new_key = NewKeyFile::of(new_key_file.as_deref(), generate_key_file.as_deref());
            let slot = add(ctx, &v, new_key, label, &kdf)?;
            // The handle's config is the one before the new slot.
            drop(v);
            let v = open(ctx, &vault.vault, Access::Write)?;
            remove(&v, &old)?;
            say(
                ctx,
                &format!("key slot {} replaces key slot {old}", slot.id),
            );
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Export { vault, to, force } => {
            use std::io::IsTerminal;
            if to.is_none() && !force && !std::io::stdout().is_terminal() {
                anyhow::bail!(
                    "refusing to print the master key to a stdout that is not a terminal (a pipe or a file would keep it): give --to FILE (written 0600) or --force"
                );
            }
            let v = open(ctx, &vault.vault, Access::ReadOnly)?;
            encryption(&v)?;
            let keys = master_of(ctx, &v)?;
            let text = recovery::export(&keys, &v.config().vault_id);
            match to {
                Some(path) => {
                    crate::keys::write_new_private_file(&path, text.as_bytes()).map_err(|e| {
                        anyhow::anyhow!("cannot write the recovery text to {}: {e}", path.display())
                    })?;
                    say(
                        ctx,
                        &format!(
                            "wrote the recovery text of vault {} to {}: print it, keep it on paper away from the vault, then delete the file",
                            v.dir().display(),
                            path.display()
                        ),
                    );
                }
                None => print!("{}", &*text),
            }
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Import {
            vault,
            recovery: file,
            new_key_file,
            generate_key_file,
            label,
            kdf,
        } => {
            let text = read_recovery(&file)?;
            let master = recovery::import(&text)?;
            let from_paper = Ctx {
                keys: std::sync::Arc::new(KeySources::with_master(master)),
                ..ctx.clone()
            };
            let v = Vault::open_with(
                &vault.vault,
                Access::Write,
                &OpenOptions {
                    unlock: Some(from_paper.keys.clone()),
                    ..from_paper.open_options()
                },
            )
            .with_context(|| {
                format!(
                    "the recovery text does not open vault {} (another vault's key?)",
                    vault.vault.display()
                )
            })?;
            let new_key = NewKeyFile::of(new_key_file.as_deref(), generate_key_file.as_deref());
            let slot = add(&from_paper, &v, new_key, label, &kdf)?;
            say(
                ctx,
                &format!(
                    "the recovery text opened the vault; added key slot {}",
                    slot.id
                ),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The vault's encryption, or an error for a vault without.
fn encryption(v: &Vault) -> anyhow::Result<&Encryption> {
    v.config().encryption.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "vault {} is not encrypted: it has no keys (`coffre vault copy` makes an encrypted copy)",
            v.dir().display()
        )
    })
}

/// The master key that opened `v` (from the command's sources).
fn master_of(ctx: &Ctx, v: &Vault) -> anyhow::Result<MasterKey> {
    use coffre_engine::store::crypto::Unlock;
    let enc = encryption(v)?;
    Ok(ctx.keys.master_key(v.dir(), &enc.slots)?)
}

/// Argon2id's parameters from the options.
pub fn kdf_params(kdf: &KdfArgs) -> anyhow::Result<Option<KdfParams>> {
    if kdf.kdf_memory.is_none() && kdf.kdf_passes.is_none() {
        return Ok(None);
    }
    let d = KdfParams::DEFAULT;
    let m_kib = match kdf.kdf_memory {
        Some(b) => {
            u32::try_from(b / 1024).map_err(|_| anyhow::anyhow!("--kdf-memory {b} is too large"))?
        }
        None => d.m_kib,
    };
    let p = KdfParams {
        m_kib,
        t: kdf.kdf_passes.unwrap_or(d.t),
        p: d.p,
    };
    p.check_new()
        .map_err(|e| anyhow::anyhow!("--kdf-memory/--kdf-passes: {e}"))?;
    Ok(Some(p))
}

/// A new slot for a new secret, added to the vault's config.
fn add(
    ctx: &Ctx,
    v: &Vault,
    new_key: NewKeyFile<'_>,
    label: Option<String>,
    kdf: &KdfArgs,
) -> anyhow::Result<KeySlot> {
    let enc = encryption(v)?;
    if enc.slots.len() >= coffre_engine::store::crypto::slot::MAX_SLOTS {
        anyhow::bail!(
            "the vault has {} key slots already, the most it keeps",
            enc.slots.len()
        );
    }
    let master = master_of(ctx, v)?;
    let kdf = kdf_params(kdf)?;
    let (secret, generated) = new_secret(new_key)?;
    let slot = KeySlot::new(&master, &secret.secret(), kdf, label, ctx.now())?;
    // From here the config is written: the key file stays, whatever
    // happens (a slot stored without its file would open nothing).
    generated.keep();
    let mut cfg = v.config().clone();
    if let Some(e) = cfg.encryption.as_mut() {
        e.slots.push(slot.clone());
    }
    v.store_config(&cfg)
        .with_context(|| format!("cannot write the config of vault {}", v.dir().display()))?;
    Ok(slot)
}

/// Removes slot `id`; refuses to remove the last one.
fn remove(v: &Vault, id: &str) -> anyhow::Result<()> {
    let enc = encryption(v)?;
    if !enc.slots.iter().any(|s| s.id == id) {
        anyhow::bail!(
            "vault {} has no key slot {id} (`coffre key list`)",
            v.dir().display()
        );
    }
    if enc.slots.len() == 1 {
        anyhow::bail!(
            "key slot {id} is the vault's last: add another first (`coffre key add`); without a slot, only the recovery text opens the vault"
        );
    }
    let mut cfg = v.config().clone();
    if let Some(e) = cfg.encryption.as_mut() {
        e.slots.retain(|s| s.id != id);
    }
    v.store_config(&cfg)
        .with_context(|| format!("cannot write the config of vault {}", v.dir().display()))
}

fn read_recovery(file: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    let limit = recovery::MAX_TEXT as u64 + 1;
    if file == Path::new("-") {
        std::io::stdin().take(limit).read_to_string(&mut text)?;
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("cannot read {}", file.display()))?
            .take(limit)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", file.display()))?;
    }
    Ok(text)
}

fn say(ctx: &Ctx, text: &str) {
    if ctx.fmt == crate::args::OutputFormat::Table {
        println!("{text}");
    } else {
        println!("{}", serde_json::json!({ "message": text }));
    }
}

/// One slot as `key list` shows it.
#[derive(Serialize)]
struct SlotView<'a> {
    id: &'a str,
    kind: &'a str,
    created: jiff::Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kdf: Option<KdfParams>,
}

fn list(ctx: &Ctx, dir: &Path) -> anyhow::Result<ExitCode> {
    let v = open(ctx, dir, Access::ReadOnly)?;
    let enc = encryption(&v)?;
    let views: Vec<SlotView<'_>> = enc
        .slots
        .iter()
        .map(|s| SlotView {
            id: &s.id,
            kind: match s.kind {
                coffre_engine::store::crypto::SlotKind::Passphrase => "passphrase",
                coffre_engine::store::crypto::SlotKind::KeyFile => "key-file",
            },
            created: s.created,
            label: s.label.as_deref(),
            kdf: s.kdf,
        })
        .collect();
    output::emit(ctx.fmt, &views, |vs| {
        let mut out = format!("cipher {}\n", enc.cipher);
        for s in vs {
            out.push_str(&format!(
                "{}  {:<10}  {}{}{}\n",
                s.id,
                s.kind,
                output::when(s.created),
                s.kdf.map_or(String::new(), |k| format!(
                    "  argon2id {} MiB, {} passes",
                    k.m_kib / 1024,
                    k.t
                )),
                s.label.map_or(String::new(), |l| format!("  {l}"))
            ));
        }
        out
    })?;
    Ok(ExitCode::SUCCESS)
}
