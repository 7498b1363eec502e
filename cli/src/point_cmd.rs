//! `points`, and the JSON shape of a point that `backup` prints too.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use coffre_engine::points::{PointEntry, Tier, list_points};
use coffre_engine::store::format::level::Level;
use coffre_engine::store::{Access, PointRecord, PointStats};
use jiff::Timestamp;
use serde::Serialize;

use crate::ctx::{Ctx, open};
use crate::output::{self, bytes, columns};

/// The JSON shape of a point (stable: documented in the README). Fields
/// that only the vault knows are absent for a point of tier `Snapshot`.
#[derive(Serialize)]
pub struct PointView<'a> {
    id: &'a str,
    item: &'a str,
    created: Timestamp,
    image_size: u64,
    block_size: u32,
    tier: Tier,
    #[serde(skip_serializing_if = "Option::is_none")]
    level: Option<Level>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stored_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_map: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<&'a PointStats>,
    scheduled: bool,
    retain_until: Option<Timestamp>,
    job: Option<&'a str>,
    /// When the point reached the GRS secondary (`null`: not yet, or no
    /// secondary).
    #[serde(skip_serializing_if = "Option::is_none")]
    secondary_at: Option<Timestamp>,
    /// Seconds from the point's creation to its arrival on the secondary.
    #[serde(skip_serializing_if = "Option::is_none")]
    replication_lag_s: Option<i64>,
    /// How a changed-block source was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    cbt: Option<&'a coffre_engine::store::CbtRecord>,
}

impl<'a> PointView<'a> {
    fn vault_fields(mut self, p: &'a PointRecord) -> Self {
        self.stored_bytes = Some(p.stats.stored_bytes);
        self.block_map = Some(p.block_map.to_string());
        self.stats = Some(&p.stats);
        self.scheduled = p.scheduled;
        self.retain_until = p.retain_until;
        self.job = p.job.as_deref();
        self.cbt = p.cbt.as_ref();
        self
    }

    /// A point a backup just transferred (its snapshot is kept too).
    pub fn transferred(p: &'a PointRecord) -> Self {
        PointView {
            id: &p.id,
            item: &p.item,
            created: p.created,
            image_size: p.image_size,
            block_size: p.block_size,
            tier: Tier::SnapshotAndVault,
            level: p.level,
            snapshot_bytes: None,
            stored_bytes: None,
            block_map: None,
            stats: None,
            scheduled: false,
            retain_until: None,
            job: None,
            secondary_at: None,
            replication_lag_s: None,
            cbt: None,
        }
        .vault_fields(p)
    }

    fn of(e: &'a PointEntry) -> Self {
        let v = PointView {
            id: &e.id,
            item: &e.item,
            created: e.created,
            image_size: e.image_size,
            block_size: e.block_size,
            tier: e.tier,
            level: e.level,
            snapshot_bytes: e.snapshot.as_ref().map(|s| s.trailer.stored_bytes),
            stored_bytes: None,
            block_map: None,
            stats: None,
            scheduled: false,
            retain_until: None,
            job: e.snapshot.as_ref().map(|s| s.meta.job.as_str()),
            secondary_at: None,
            replication_lag_s: None,
            cbt: None,
        };
        match &e.vault {
            Some(p) => v.vault_fields(p),
            None => v,
        }
    }
}

pub fn list(ctx: &Ctx, dir: &Path, item: &str) -> anyhow::Result<ExitCode> {
    let fmt = ctx.fmt;
    let vault = open(ctx, dir, Access::ReadOnly)?;
    let points = list_points(&vault, item).with_context(|| format!("vault {}", dir.display()))?;
    let replicated =
        coffre_engine::store::maintenance::replicate::primary_state(dir, vault.keys()).points;
    let views: Vec<PointView<'_>> = points
        .iter()
        .map(|e| {
            let mut v = PointView::of(e);
            if let Some(t) = replicated.get(&e.id) {
                v.secondary_at = Some(*t);
                v.replication_lag_s = Some(t.duration_since(e.created).as_secs());
            }
            v
        })
        .collect();
    output::emit(fmt, &views, |views| {
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|p| {
                vec![
                    p.id.to_string(),
                    output::when(p.created),
                    p.tier.to_string(),
                    p.level.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                    bytes(p.image_size),
                    p.stats.map_or("-".into(), |s| s.blocks_changed.to_string()),
                    p.stored_bytes.map_or("-".into(), bytes),
                    p.snapshot_bytes.map_or("-".into(), bytes),
                ]
            })
            .collect();
        columns(
            &[
                "ID",
                "CREATED",
                "TIER",
                "CONSISTENCY",
                "SIZE",
                "CHANGED BLOCKS",
                "STORED",
                "SNAPSHOT",
            ],
            &rows,
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
