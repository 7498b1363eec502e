//! The clone path of a capture: a reflink clone of the image on the
//! area's filesystem, and the changed-block hint it gives the transfer.

use std::path::Path;

use coffre_vault_store::format::name::SafeName;

use super::previous::previous_of_kind;
use super::{CLONE_HEADROOM, CaptureRequest, Pending, header, manifest_path};
use crate::cbt::{Hint, HintSource};
use crate::clone::{CloneError, clone_file};
use crate::error::{Result, SnapError};
use crate::manifest::{SnapKind, SnapWriter};

/// The clone path, if the image is a file on the area's filesystem that
/// can clone.
pub(super) fn try_clone(req: &CaptureRequest<'_>, item_dir: &Path) -> Result<Option<Pending>> {
    use std::os::unix::fs::MetadataExt;
    let image = req.source.path();
    let (Ok(im), Ok(ar)) = (std::fs::metadata(image), std::fs::metadata(item_dir)) else {
        return Ok(None);
    };
    if !im.is_file() || im.dev() != ar.dev() {
        return Ok(None);
    }
    req.area.check_space(CLONE_HEADROOM, image)?;
    let name = format!("{}.img", req.job);
    let dst = item_dir.join(&name);
    let src = std::fs::File::open(image).map_err(|e| SnapError::SourceUnreadable {
        path: image.to_path_buf(),
        source: e,
    })?;
    match clone_file(&src, &dst) {
        Ok(()) => {}
        Err(CloneError::Unsupported(e)) => {
            tracing::debug!(image = %image.display(), error = %e, "cannot clone; copying instead");
            return Ok(None);
        }
        Err(CloneError::Failed(e)) => return Err(e),
    }
    // The clone is the point: its size is the image's size at the clone.
    let size = std::fs::metadata(&dst)
        .map_err(|e| SnapError::write(&dst, e))?
        .len();
    let mut h = header(req, SnapKind::Clone, 0);
    h.image_size = size;
    let writer = SnapWriter::create(&manifest_path(item_dir, req.job), h, req.keys.clone())?;
    Ok(Some(Pending {
        kind: SnapKind::Clone,
        header: h,
        writer,
        pack: None,
        packs: Vec::new(),
        transfer_hint: req
            .hint
            .cloned()
            .or_else(|| reflink_hint(item_dir, req, &dst, &name)),
        clone: Some(name),
        stored_bytes: 0,
        bytes_read: 0,
        passes: 0,
        warnings: Vec::new(),
        cbt: None,
    }))
}

/// The reflink hint of a new clone: the extents it no longer shares with
/// the item's previous clone (`None` without a previous clone, or where
/// `FIEMAP` is refused).
fn reflink_hint(
    item_dir: &Path,
    req: &CaptureRequest<'_>,
    clone: &Path,
    name: &str,
) -> Option<Hint> {
    let keys = req.keys.as_ref();
    let previous = previous_of_kind(item_dir, req.job, SnapKind::Clone, keys)?;
    let (h, meta, _) = crate::manifest::summary(&previous, keys).ok()?;
    let old_name = meta.clone?;
    let old = std::fs::File::open(SafeName::new("clone", &old_name).ok()?.under(item_dir)).ok()?;
    let new = std::fs::File::open(clone).ok()?;
    let size = new.metadata().ok()?.len();
    let diff = crate::cbt::reflink::extents(&new)
        .and_then(|n| crate::cbt::reflink::extents(&old).map(|o| (n, o)));
    let (n, o) = match diff {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "FIEMAP refused; no reflink hint");
            return None;
        }
    };
    let mut hint = Hint::new(
        HintSource::Reflink,
        crate::cbt::reflink::changed(&n, &o, size.max(h.image_size)),
    );
    hint.since = Some(old_name);
    hint.generation = Some(name.to_string());
    Some(hint)
}
