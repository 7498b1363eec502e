//! `vault copy --from SRC --to DST`: opens both vaults (each with its own
//! key sources), hands them to `coffre_engine::vault_copy` and reports
//! every point copied, skipped or failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::Context;
use coffre_engine::Progress;
use coffre_engine::store::{Access, Vault};
use coffre_engine::vault_copy::{CopyAction, CopyOptions, CopyReport, PointCopy, copy_points};

use crate::args::OutputFormat;
use crate::ctx::{Ctx, open};
use crate::output::{self, bytes, when};

/// What `vault copy` was given.
pub struct CopyArgs {
    pub from: PathBuf,
    pub to: PathBuf,
    pub to_key_file: Option<PathBuf>,
    pub items: Vec<String>,
    pub dry_run: bool,
    pub rate_limit: Option<u64>,
    pub threads: usize,
}

/// A progress bar per point (a bar ends with its point).
struct PerPoint(Mutex<Option<crate::progress::Bar>>);

impl Progress for PerPoint {
    fn start(&self, total: u64) {
        let bar = crate::progress::Bar::new("copy");
        bar.start(total);
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            b.advance(n);
        }
    }
    fn finish(&self) {
        if let Some(b) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish();
        }
    }
}

/// The vault at `dir`, which must exist (`what` names it in the error).
fn existing(dir: &Path, what: &str, hint: &str) -> anyhow::Result<PathBuf> {
    if !dir.join("config").is_file() {
        anyhow::bail!("the {what} vault {} does not exist{hint}", dir.display());
    }
    dir.canonicalize()
        .with_context(|| format!("cannot resolve the {what} vault {}", dir.display()))
}

pub fn run(ctx: &Ctx, args: CopyArgs) -> anyhow::Result<ExitCode> {
    let from = existing(&args.from, "source", "")?;
    let to = existing(
        &args.to,
        "destination",
        &format!(
            ": create it first with `coffre vault create --vault {} [--encryption aes-256-gcm] [--block-size SIZE]`, which chooses its encryption and block size",
            args.to.display()
        ),
    )?;
    if from == to {
        anyhow::bail!(
            "--from and --to are the same vault ({}): copy into another vault",
            from.display()
        );
    }
    let src = open(ctx, &args.from, Access::ReadOnly)?;
    let dst = open_destination(ctx, &args.to, args.to_key_file.clone())?;
    let opts = CopyOptions {
        items: args.items,
        dry_run: args.dry_run,
        threads: args.threads,
        rate_limit: args.rate_limit,
    };
    let fmt = ctx.fmt;
    let progress = PerPoint(Mutex::new(None));
    // The table is written point by point, as they are copied.
    let mut each = |p: &PointCopy| {
        if fmt == OutputFormat::Table {
            let _ = output::write_stdout(line(p).as_bytes());
        }
    };
    let mut report = copy_points(&src, &dst, &opts, ctx.now(), &progress, &mut each, &|| {
        false
    })
    .with_context(|| {
        format!(
            "cannot copy from vault {} to vault {}",
            args.from.display(),
            args.to.display()
        )
    })?;
    let errors = std::mem::take(&mut report.errors);
    output::emit(fmt, &report, summary)?;
    for (p, e) in report
        .points
        .iter()
        .filter(|p| p.action == CopyAction::Failed)
        .zip(&errors)
    {
        eprintln!(
            "coffre: error: point {} of item {} was not copied: {e}",
            p.point, p.item
        );
    }
    match errors.into_iter().next() {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => Ok(ExitCode::from(crate::exit::code_for(&anyhow::Error::from(
            e,
        )))),
    }
}

/// The destination, opened for writing with its own key sources.
fn open_destination(ctx: &Ctx, dir: &Path, key_file: Option<PathBuf>) -> anyhow::Result<Vault> {
    let keys = std::sync::Arc::new(
        crate::keys::KeySources::destination(key_file)
            .remembering(ctx.registry.generations_dir(), ctx.clock.clone()),
    );
    let opts = coffre_engine::store::OpenOptions {
        unlock: Some(keys),
        ..ctx.open_options()
    };
    Vault::open_with(dir, Access::Write, &opts)
        .with_context(|| format!("cannot open the destination vault {}", dir.display()))
}

/// One point's line of the table.
fn line(p: &PointCopy) -> String {
    let what = match p.action {
        CopyAction::Copied => "copied",
        CopyAction::Skipped => "skipped",
        CopyAction::WouldCopy => "would copy",
        CopyAction::Failed => "FAILED",
    };
    let detail = match (p.action, &p.stats, &p.reason) {
        (CopyAction::Copied, Some(s), _) => format!(
            "as {}: {} read, {} stored, {} of {} blocks changed, {:.1} s",
            p.to_point.as_deref().unwrap_or("?"),
            bytes(s.bytes_read),
            bytes(s.stored_bytes),
            s.blocks_changed,
            s.blocks_total,
            s.duration_ms as f64 / 1000.0
        ),
        (CopyAction::Skipped, _, None) => format!(
            "already in the destination as {}",
            p.to_point.as_deref().unwrap_or("?")
        ),
        (_, _, Some(r)) => r.clone(),
        _ => String::new(),
    };
    let mut out = format!(
        "{what:<10} {:<20} {:<12} {}  {:>10}  {detail}\n",
        p.item,
        p.point,
        when(p.created),
        bytes(p.image_size)
    );
    for w in &p.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// The table's last lines.
fn summary(r: &CopyReport) -> String {
    let mut out = String::new();
    for s in &r.items_skipped {
        out.push_str(&format!("item {} not copied: {}\n", s.item, s.reason));
    }
    if r.dry_run {
        out.push_str(&format!(
            "dry run: {} point(s) would be copied, {} are in {} already\n",
            r.copied,
            r.skipped,
            r.to.display()
        ));
        return out;
    }
    out.push_str(&format!(
        "copied {} point(s) ({} read, {} stored in {}), skipped {} already there{}, in {:.1} s\n",
        r.copied,
        bytes(r.bytes_read),
        bytes(r.stored_bytes),
        r.to.display(),
        r.skipped,
        if r.failed > 0 {
            format!(
                ", {} FAILED (repair the source, e.g. `coffre verify --vault {} --read-data --repair` when it has another copy, and run again)",
                r.failed,
                r.from.display()
            )
        } else {
            String::new()
        },
        r.duration_ms as f64 / 1000.0
    ));
    if !r.items_created.is_empty() {
        out.push_str(&format!(
            "created item(s) {} in {}, protection stopped (no backups, no expiry); `coffre protect --vault {} --item NAME --policy POLICY IMAGE` resumes one once {} no longer holds it (an image is protected in one vault only)\n",
            r.items_created.join(", "),
            r.to.display(),
            r.to.display(),
            r.from.display()
        ));
    }
    out
}
