//! Change detection for the fallback: whether a changed-block hint may be
//! used against the previous snapshot, and the image's settled change stamp.

use std::path::Path;
use std::time::Duration;

use super::CaptureRequest;
use crate::cbt::{Hint, Parent};
use crate::source::{ChangeStamp, ImageSource};

/// Why `hint` cannot be used against the previous snapshot `previous`
/// (`remap`: where its packs went; `None` for a lost one).
pub(super) fn hint_fallback(
    req: &CaptureRequest<'_>,
    hint: &Hint,
    previous: Option<&Path>,
    remap: &[Option<u16>],
) -> Option<String> {
    let Some(previous) = previous else {
        return Some("the item has no previous snapshot to build on".into());
    };
    let (header, meta, _) = match crate::manifest::summary(previous, req.keys.as_ref()) {
        Ok(s) => s,
        Err(e) => return Some(format!("the previous snapshot cannot be read: {e}")),
    };
    if header.block_size != req.block_size {
        return Some("the previous snapshot has another block size".into());
    }
    if req.parent_point != Some(meta.point.as_str()) {
        return Some(format!(
            "the previous snapshot (point {}) is not the item's latest vault point ({})",
            meta.point,
            req.parent_point.unwrap_or("none")
        ));
    }
    if remap.iter().any(Option::is_none) {
        return Some("a pack of the previous snapshot is missing".into());
    }
    let parent = Parent::of(header.image_size, meta.cbt.as_ref());
    hint.check(Some(&parent), req.source.size())
}

/// The image's change stamp, once it is at least a few coarse clock ticks
/// old: a write in the same tick as the last one may leave the stamp as it
/// is, so only an old stamp proves that nothing was written since.
/// `Err(())` when the image never stayed still that long (the pass then
/// counts as changed).
pub(super) fn settled_stamp(
    source: &dyn ImageSource,
) -> std::result::Result<Option<ChangeStamp>, ()> {
    const SETTLE: Duration = Duration::from_millis(20);
    for _ in 0..25 {
        let Some(stamp) = source.change_stamp() else {
            return Ok(None);
        };
        let age = stamp.age();
        if age >= SETTLE {
            return Ok(Some(stamp));
        }
        std::thread::sleep(SETTLE - age);
    }
    Err(())
}
