//! `coffre protect|unprotect|undelete` and `coffre item list|show`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::protection::{self, ItemView, item_view};
use coffre_engine::snapshotter::hooks::parse_command;
use coffre_engine::store::format::catalog::Hooks;
use coffre_engine::store::jobs::Operation;
use coffre_engine::store::{Access, Protection};

use crate::args::ItemCommand;
use crate::ctx::{Ctx, open};
use crate::output::{self, bytes, columns};

fn protection_text(p: &Protection) -> String {
    match p {
        Protection::Protected => "protected".into(),
        Protection::Stopped { since } => format!("stopped since {since} (data retained)"),
        Protection::SoftDeleted { purge_after, .. } => {
            format!("soft-deleted (purged after {purge_after})")
        }
    }
}

/// The hooks `protect` sets: `None` when no hook option was given (the
/// item's hooks stay as they are); an empty command removes a hook.
pub fn hooks_from(
    ctx: &Ctx,
    dir: &Path,
    item: &str,
    pre: Option<String>,
    post: Option<String>,
    timeout: Option<u64>,
) -> anyhow::Result<Option<Hooks>> {
    if pre.is_none() && post.is_none() && timeout.is_none() {
        return Ok(None);
    }
    // What this host set before (never the catalog's: another host, or
    // whoever writes a shared vault's bucket, may have written those).
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let mut hooks = ctx
        .registry
        .entry(&vault.config().vault_id, item)?
        .and_then(|e| e.hooks)
        .unwrap_or_default();
    drop(vault);
    let argv = |cmd: String, flag: &str| -> anyhow::Result<Vec<String>> {
        if cmd.trim().is_empty() {
            return Ok(Vec::new());
        }
        parse_command(&cmd).with_context(|| format!("--{flag}"))
    };
    if let Some(cmd) = pre {
        hooks.pre = argv(cmd, "pre-snapshot")?;
    }
    if let Some(cmd) = post {
        hooks.post = argv(cmd, "post-snapshot")?;
    }
    if let Some(t) = timeout {
        if !(1..=3600).contains(&t) {
            anyhow::bail!("--hook-timeout {t} is outside 1..=3600 seconds");
        }
        hooks.timeout_secs = t;
    }
    Ok(Some(hooks))
}

/// `coffre protect`.
pub fn protect(
    ctx: &Ctx,
    dir: &Path,
    item: &str,
    policy: &str,
    image: &Path,
    hooks: Option<Hooks>,
) -> anyhow::Result<ExitCode> {
    let vault = open(ctx, dir, Access::Write)?;
    let out = protection::protect(
        &vault,
        &ctx.registry,
        item,
        policy,
        image,
        ctx.now(),
        hooks.as_ref(),
    )
    .with_context(|| format!("cannot protect {} as item {item}", image.display()))?;
    let view = item_view(&vault, &out.item, ctx.now())?;
    output::emit(ctx.fmt, &view, |v| {
        let verb = match out.action {
            "protected" => "protected",
            "resumed" => "resumed protection of",
            "policy-changed" => "changed the policy of",
            "hooks-changed" => "changed the hooks of",
            _ => "already protected:",
        };
        format!(
            "{verb} item {} ({}) under policy {}; next backup {}\n",
            v.name,
            v.source.display(),
            v.policy,
            output::when_or_dash(v.next_run)
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `coffre unprotect`.
pub fn unprotect(ctx: &Ctx, dir: &Path, item: &str, delete_data: bool) -> anyhow::Result<ExitCode> {
    let vault = open(ctx, dir, Access::Write)?;
    let job = delete_data
        .then(|| {
            coffre_engine::job_record::start(
                dir,
                vault.config().keys(),
                Operation::Delete,
                Some(item),
                "soft-delete",
                ctx.now(),
            )
        })
        .flatten();
    let result = protection::unprotect(&vault, item, delete_data, ctx.now());
    coffre_engine::job_record::finish(job, "soft-delete", ctx.now(), &result);
    let rec = result.with_context(|| format!("cannot unprotect item {item}"))?;
    let view = item_view(&vault, &rec, ctx.now())?;
    output::emit(ctx.fmt, &view, |v| {
        format!(
            "item {}: {}; {} points kept\n",
            v.name,
            protection_text(&v.protection),
            v.points
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `coffre undelete`.
pub fn undelete(ctx: &Ctx, dir: &Path, item: &str) -> anyhow::Result<ExitCode> {
    let vault = open(ctx, dir, Access::Write)?;
    let rec = protection::undelete(&vault, item, ctx.now())
        .with_context(|| format!("cannot undelete item {item}"))?;
    let view = item_view(&vault, &rec, ctx.now())?;
    output::emit(ctx.fmt, &view, |v| {
        format!(
            "item {} undeleted: {} points back, protection stopped; `coffre protect` resumes it\n",
            v.name, v.points
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

fn row(v: &ItemView) -> Vec<String> {
    vec![
        v.name.clone(),
        match &v.protection {
            Protection::Protected => "protected",
            Protection::Stopped { .. } => "stopped",
            Protection::SoftDeleted { .. } => "soft-deleted",
        }
        .into(),
        v.policy.clone(),
        v.last_backup
            .as_ref()
            .map(|b| format!("{} {}", output::when(b.started), b.status))
            .unwrap_or_else(|| "-".into()),
        output::when_or_dash(v.next_run),
        format!("{} (+{} snap)", v.points, v.tiers.snapshot),
        bytes(v.stored_bytes),
    ]
}

/// `coffre item list|show`.
pub fn run(ctx: &Ctx, cmd: ItemCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ItemCommand::List { vault } => {
            let v = open(ctx, &vault.vault, Access::ReadOnly)?;
            let views: Vec<ItemView> = protection::item_views(&v, ctx.now())?;
            output::emit(ctx.fmt, &views, |vs| {
                columns(
                    &[
                        "ITEM",
                        "STATE",
                        "POLICY",
                        "LAST BACKUP",
                        "NEXT RUN",
                        "POINTS",
                        "STORED",
                    ],
                    &vs.iter().map(row).collect::<Vec<_>>(),
                )
            })?;
        }
        ItemCommand::Show { vault, item } => {
            let v = open(ctx, &vault.vault, Access::ReadOnly)?;
            let rec = v
                .item(&item)?
                .ok_or_else(|| coffre_engine::EngineError::ItemNotFound { item: item.clone() })
                .with_context(|| format!("vault {}", vault.vault.display()))?;
            let view = item_view(&v, &rec, ctx.now())?;
            output::emit(ctx.fmt, &view, |v| {
                let t = &v.tiers;
                format!(
                    "item         {}\nsource       {}\nstate        {}\npolicy       {}\nlast backup  {}\nnext run     {}\npoints       {} in the vault: {} daily, {} weekly, {} monthly, {} yearly, {} on-demand, {} expiring\nsnapshots    {} (instant restore tier; {} not yet in the vault), {}\nhooks        {}\nstored       {}\n",
                    v.name,
                    v.source.display(),
                    protection_text(&v.protection),
                    v.policy,
                    v.last_backup
                        .as_ref()
                        .map(|b| {
                            format!(
                                "job {} started {} {}",
                                b.job,
                                output::when(b.started),
                                b.status
                            )
                        })
                        .unwrap_or_else(|| "-".into()),
                    output::when_or_dash(v.next_run),
                    v.points,
                    t.daily,
                    t.weekly,
                    t.monthly,
                    t.yearly,
                    t.on_demand,
                    t.expiring,
                    t.snapshot,
                    t.snapshot_only,
                    bytes(v.snapshot_bytes),
                    if v.hooks.is_set() {
                        format!(
                            "pre {:?}, post {:?}, timeout {} s",
                            v.hooks.pre, v.hooks.post, v.hooks.timeout_secs
                        )
                    } else {
                        "none".to_string()
                    },
                    bytes(v.stored_bytes)
                )
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
