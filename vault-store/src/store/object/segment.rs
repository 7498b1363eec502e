//! The part list of a segment (listed once, checked, then kept) and
//! cutting a segment back by deleting or shortening its parts.

use std::sync::Arc;

use object_store::PutMode;

use super::ObjectStoreCopy;
use crate::error::Result;
use crate::store::parts::{check_part_list, part_key, parts_of_listing};

impl ObjectStoreCopy {
    /// The parts of segment `name`, listed once and then kept.
    pub(super) fn parts(&self, name: &str) -> Result<Arc<Vec<(u64, u64)>>> {
        if let Some(p) = self.lock_parts().get(name) {
            return Ok(p.clone());
        }
        let listed = Arc::new(self.checked_parts(name)?);
        self.lock_parts().insert(name.to_string(), listed.clone());
        Ok(listed)
    }

    /// The parts of segment `name` as listed, refused when two overlap or
    /// one runs past the largest offset ([`check_part_list`]). Gaps are
    /// allowed: a punch deletes whole parts, and a read over a gap fails as
    /// a short read.
    pub(super) fn checked_parts(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let parts = self.list_parts(name)?;
        check_part_list(&parts).map_err(|reason| self.err("list", name, reason))?;
        Ok(parts)
    }

    pub(super) fn list_parts(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let prefix = self.key(name)?;
        let inner = self.s.inner.clone();
        let listed = self
            .run(async move { inner.list_with_delimiter(Some(&prefix)).await })?
            .map_err(|e| self.err("list", name, e))?;
        Ok(parts_of_listing(listed.objects.iter().map(|o| {
            (o.location.filename().unwrap_or_default(), o.size)
        })))
    }

    /// Cuts segment `name` to `len` bytes: parts past it are deleted, one
    /// that straddles it is rewritten shorter.
    pub(super) fn cut_segment(&self, name: &str, len: u64) -> Result<()> {
        let parts = self.list_parts(name)?;
        for (start, plen) in parts {
            if start >= len {
                self.delete_key(name, &format!("{name}/{}", part_key(start)))?;
            } else if start.saturating_add(plen) > len {
                let key = format!("{name}/{}", part_key(start));
                let bytes = self.get_key(name, &key)?.unwrap_or_default();
                let keep = bytes.get(..(len - start) as usize).unwrap_or_default();
                self.put_key(name, &key, keep.to_vec(), PutMode::Overwrite)?
                    .map_err(|_| self.err("cut", name, "refused"))?;
            }
        }
        self.invalidate(name);
        Ok(())
    }
}
