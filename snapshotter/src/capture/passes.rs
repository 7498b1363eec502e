//! The fallback capture's passes: the pack table, the hint's check, and
//! the loop that repeats a pass until the image held still through one.

use std::path::{Path, PathBuf};

use coffre_vault_store::format::blockmap::block_count;
use coffre_vault_store::format::level::Level;
use coffre_vault_store::format::name::SafeName;

use super::change::{hint_fallback, settled_stamp};
use super::chunk_pass::{Pass, chunk_pass};
use super::previous::previous_manifest;
use super::{CaptureRequest, MAX_PASSES, Pending, header, manifest_path};
use crate::cbt::{Hint, fallback_warning, sample_mismatch};
use crate::error::{Result, SnapError};
use crate::manifest::{SnapKind, SnapMeta, SnapReader, SnapWriter};
use crate::pack::PackWriter;
use crate::progress::Progress;
use crate::source::ImageSource;

/// Bytes the fallback may need: the image's data when there is nothing to
/// deduplicate against, else twice the largest change an earlier capture
/// stored (at least 64 MiB). An estimate: a capture that runs out anyway
/// fails cleanly and leaves nothing behind.
fn space_needed(
    source: &dyn ImageSource,
    item_dir: &Path,
    has_previous: bool,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let data = std::fs::metadata(source.path())
        .ok()
        .filter(|m| m.is_file())
        .map_or(source.size(), |m| (m.blocks() * 512).min(source.size()));
    if !has_previous {
        return data;
    }
    let largest = std::fs::read_dir(item_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| crate::manifest::summary(&e.path(), keys).ok())
                .map(|(_, _, t)| t.stored_bytes)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    (2 * largest).max(64 << 20).min(data.max(64 << 20))
}

pub(super) fn capture_chunks(
    req: &CaptureRequest<'_>,
    item_dir: &Path,
    progress: &dyn Progress,
) -> Result<Pending> {
    let source = req.source;
    let previous = previous_manifest(item_dir, req.job, req.keys.as_ref());
    req.area.check_space(
        space_needed(source, item_dir, previous.is_some(), req.keys.as_ref()),
        source.path(),
    )?;
    // The pack table: the previous snapshot's packs that still exist, then
    // this job's; `remap` renumbers the previous snapshot's entries.
    let old_packs = match &previous {
        Some(p) => SnapReader::open(p, req.keys.as_ref())?.meta().packs.clone(),
        None => Vec::new(),
    };
    let mut packs = Vec::new();
    let remap: Vec<Option<u16>> = old_packs
        .iter()
        .map(|name| {
            let exists = SafeName::new("pack", name).is_ok_and(|n| n.under(item_dir).exists());
            exists.then(|| {
                packs.push(name.clone());
                (packs.len() - 1) as u16
            })
        })
        .collect();
    let pack_name = format!("{}.pack", req.job);
    packs.push(pack_name.clone());
    let pack_index = u16::try_from(packs.len() - 1)
        .map_err(|_| SnapError::damaged(item_dir, "more than 65,536 packs"))?;
    let mut pack = PackWriter::create(&item_dir.join(&pack_name))?;
    let blocks = block_count(source.size(), req.block_size);
    let bs = u64::from(req.block_size);
    let mut warnings = Vec::new();
    // A hint is checked against the previous snapshot before it is used,
    // then sampled during the first pass.
    let mut cbt = req.hint.map(|h| h.record(bs, blocks, None));
    let mut hinted: Option<(&Hint, Vec<u64>)> = None;
    if let (Some(hint), Some(record)) = (req.hint, cbt.as_mut()) {
        match hint_fallback(req, hint, previous.as_deref(), &remap) {
            None => hinted = Some((hint, hint.sample(bs, blocks, req.sampling, req.job))),
            Some(why) => {
                // An item's first backup has nothing to build on: expected,
                // not a warning.
                if req.parent_point.is_some() || previous.is_some() {
                    warnings.push(fallback_warning(hint.source.name(), &why, false));
                }
                record.used = false;
                record.fallback = Some(why);
            }
        }
    }
    let mut against = previous;
    let mut pass_files: Vec<PathBuf> = Vec::new();
    let mut bytes_read = 0;
    let mut pass = 0;
    let result = loop {
        pass += 1;
        let before = settled_stamp(source);
        let path = manifest_path(item_dir, req.job);
        let mut writer = SnapWriter::create(
            &path,
            header(req, SnapKind::Chunks, blocks),
            req.keys.clone(),
        )?;
        let identity: Vec<Option<u16>>;
        let renumber = if pass == 1 {
            &remap
        } else {
            identity = (0..packs.len()).map(|i| Some(i as u16)).collect();
            &identity
        };
        let read = chunk_pass(Pass {
            req,
            against: against.as_deref(),
            renumber,
            hint: hinted.as_ref().map(|(h, s)| (*h, s.as_slice())),
            pack: &mut pack,
            pack_index,
            writer: &mut writer,
            progress,
        })?;
        bytes_read += read.bytes_read;
        if let (Some(record), Some(_)) = (cbt.as_mut(), hinted.as_ref()) {
            record.sampled = read.sampled;
            record.mismatches = read.mismatches;
            if read.mismatches > 0 {
                // The hint lied: this pass's entries are dropped and the
                // pass is redone reading every block.
                let why = sample_mismatch(
                    read.mismatches,
                    read.sampled,
                    read.first_mismatch.unwrap_or_default(),
                );
                warnings.push(fallback_warning(&record.source, &why, true));
                record.used = false;
                record.fallback = Some(why);
                hinted = None;
                drop(writer);
                pass -= 1;
                continue;
            }
        }
        let after = source.change_stamp();
        if before.is_ok_and(|b| b == after) {
            break Ok(writer);
        }
        if pass >= MAX_PASSES {
            break Err(SnapError::SourceChanged {
                path: source.path().to_path_buf(),
                reason: format!(
                    "it was written to during each of {MAX_PASSES} capture passes and never settled"
                ),
            });
        }
        warnings.push(format!(
            "the image changed during capture pass {pass}; it was read again"
        ));
        // The next pass deduplicates against this one, reading every
        // block: only what changed is stored again.
        hinted = None;
        let interim = item_dir.join(format!("{}.pass{pass}.snap", req.job));
        let provisional = SnapMeta {
            item: req.item.to_string(),
            point: req.point.to_string(),
            job: req.job.to_string(),
            source: source.path().to_path_buf(),
            level: Level::CrashConsistent,
            packs: packs.clone(),
            clone: None,
            warnings: Vec::new(),
            cbt: None,
        };
        pack.flush()?;
        let done = writer.finish(&provisional, 0)?;
        let moved = std::fs::rename(&done, &interim).map_err(|e| SnapError::write(&interim, e));
        if let Err(e) = moved {
            break Err(e);
        }
        pass_files.push(interim.clone());
        against = Some(interim);
    };
    for f in &pass_files {
        let _ = std::fs::remove_file(f);
    }
    let writer = result?;
    let stored = pack.len() - crate::pack::PACK_HEADER_LEN;
    Ok(Pending {
        kind: SnapKind::Chunks,
        header: header(req, SnapKind::Chunks, blocks),
        writer,
        pack: Some(pack),
        packs,
        clone: None,
        stored_bytes: stored,
        bytes_read,
        passes: pass,
        warnings,
        cbt,
        transfer_hint: None,
    })
}
