//! [`ObjectStoreCopy`]: a vault copy in object storage (Azure Blob, S3),
//! through the `object_store` crate.
//!
//! Names map onto keys under the URL's prefix. Small files are whole
//! objects: [`Store::put`] is an atomic overwrite, [`Store::put_new`] a
//! conditional create (`If-None-Match: *`), and [`Store::put_if`] an
//! update on an ETag (`If-Match`), so two hosts never overwrite each
//! other's work unseen.
//!
//! Object stores cannot append. A segment (`*.seg`) is therefore a folder
//! of immutable **parts**, `NAME.seg/OFFSET` (the offset in 16 hex digits),
//! each holding the segment's bytes from `OFFSET` up to the next part. An
//! [`Appender`] buffers what is appended, uploads a part whenever
//! [`PART_LEN`] bytes are buffered (up to [`UPLOADS_IN_FLIGHT`] at once,
//! which bounds memory), and on [`Appender::sync`] uploads the tail as a
//! last, shorter part and waits for every upload: a sync point is always a
//! part boundary. Cutting a segment back deletes the parts past the cut.
//! `ARCHITECTURE.md` ("Object storage") argues the part size.
//!
//! Reads of segments go through a small cache of [`WINDOW_LEN`] windows
//! with read-ahead of the next ones, so a restore that walks a segment in
//! order issues few, large, concurrent ranged GETs instead of one request
//! per chunk. The cache holds at most [`CACHED_WINDOWS`] windows.
//!
//! All network waits run on a tokio runtime this store owns (two worker
//! threads); the [`Store`] methods stay synchronous, and may be called
//! from any thread, inside another runtime or not.

mod appender;
mod client;
mod reason;
mod segment;
#[cfg(test)]
mod tests;
mod whole;
mod window;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, UpdateVersion};

use super::{Appender, SpaceInfo, Store, Version};
use crate::error::{Result, StoreError};
use crate::store::parts::part_key;
use appender::ObjectAppender;
use window::WindowCache;

pub use appender::{PART_LEN, UPLOADS_IN_FLIGHT};
pub use reason::short_reason;
pub use whole::{MAX_WHOLE_OBJECT, PutRefused};
pub use window::{CACHED_WINDOWS, READ_AHEAD, WINDOW_LEN};

/// Segment name → its parts (start, length), sorted.
type PartLists = HashMap<String, Arc<Vec<(u64, u64)>>>;

struct Shared0 {
    url: String,
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    rt: tokio::runtime::Runtime,
    /// Part lists of segments (start, length), sorted; parts are
    /// immutable, so a list stays right until this store changes it.
    parts: Mutex<PartLists>,
    cache: Mutex<WindowCache>,
}

/// A vault copy in object storage.
#[derive(Clone)]
pub struct ObjectStoreCopy {
    s: Arc<Shared0>,
}

impl fmt::Debug for ObjectStoreCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreCopy")
            .field("url", &self.s.url)
            .finish()
    }
}

fn is_segment(name: &str) -> bool {
    name.ends_with(".seg")
}

impl ObjectStoreCopy {
    fn key(&self, name: &str) -> Result<ObjPath> {
        if name.is_empty()
            || name.starts_with('/')
            || name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(StoreError::InvalidSetting {
                field: "store name",
                reason: format!("{name:?} is not a relative path inside the copy"),
            });
        }
        Ok(ObjPath::from(super::join(&self.s.prefix, name)))
    }

    fn err(&self, op: &'static str, name: &str, e: impl fmt::Display) -> StoreError {
        StoreError::Object {
            url: format!("{}/{name}", self.s.url),
            op,
            reason: short_reason(&e.to_string()),
        }
    }

    /// Runs `fut` on this store's runtime and waits for it, from any
    /// thread (also from inside another runtime).
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        futures::executor::block_on(self.s.rt.spawn(fut)).map_err(|e| StoreError::Object {
            url: self.s.url.clone(),
            op: "run a request",
            reason: e.to_string(),
        })
    }

    fn lock_parts(&self) -> std::sync::MutexGuard<'_, PartLists> {
        self.s.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, WindowCache> {
        self.s.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn invalidate(&self, name: &str) {
        self.lock_parts().remove(name);
        self.lock_cache().drop_name(name);
    }
}

impl Store for ObjectStoreCopy {
    fn location(&self) -> String {
        self.s.url.clone()
    }

    fn create(&self, name: &str) -> Result<Box<dyn Appender>> {
        if !is_segment(name) {
            return Err(self.err("create", name, "only segments are appended to"));
        }
        if !self.list_parts(name)?.is_empty() {
            return Err(self.err("create", name, "it exists already"));
        }
        self.invalidate(name);
        Ok(Box::new(ObjectAppender::new(self.clone(), name, 0)))
    }

    fn append_to(&self, name: &str, len: u64) -> Result<Box<dyn Appender>> {
        if !is_segment(name) {
            return Err(self.err("append", name, "only segments are appended to"));
        }
        self.cut_segment(name, len)?;
        Ok(Box::new(ObjectAppender::new(self.clone(), name, len)))
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if is_segment(name) {
            return self.read_segment(name, offset, buf);
        }
        let bytes = self
            .get(name)?
            .ok_or_else(|| self.err("read", name, "not found"))?;
        let src = usize::try_from(offset)
            .ok()
            .and_then(|from| bytes.get(from..from.checked_add(buf.len())?))
            .ok_or_else(|| self.err("read", name, "range past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<()> {
        if !is_segment(name) {
            let mut all = self.get(name)?.unwrap_or_default();
            let end = offset as usize + bytes.len();
            if all.len() < end {
                all.resize(end, 0);
            }
            if let Some(d) = all.get_mut(offset as usize..end) {
                d.copy_from_slice(bytes);
            }
            return self.put(name, &all);
        }
        // A repair: rewrite each part the range touches with the proven
        // bytes patched in.
        let end = offset.saturating_add(bytes.len() as u64);
        for (start, plen) in self.checked_parts(name)? {
            let pend = start + plen;
            if pend <= offset || start >= end {
                continue;
            }
            let key = format!("{name}/{}", part_key(start));
            let mut part = self.get_key(name, &key)?.unwrap_or_default();
            let from = offset.max(start);
            let to = end.min(pend);
            if let (Some(d), Some(s)) = (
                part.get_mut((from - start) as usize..(to - start) as usize),
                bytes.get((from - offset) as usize..(to - offset) as usize),
            ) {
                d.copy_from_slice(s);
            }
            self.put_key(name, &key, part, PutMode::Overwrite)?
                .map_err(|_| self.err("repair", name, "refused"))?;
        }
        self.invalidate(name);
        Ok(())
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        if is_segment(name) {
            let parts = self.checked_parts(name)?;
            return Ok(parts.last().map(|(s, l)| s + l));
        }
        let path = self.key(name)?;
        let inner = self.s.inner.clone();
        match self.run(async move { inner.head(&path).await })? {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("head", name, e)),
        }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.put_key(name, name, bytes.to_vec(), PutMode::Overwrite)?
            .map_err(|_| self.err("put", name, "refused"))?;
        Ok(())
    }

    fn put_new(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        Ok(self
            .put_key(name, name, bytes.to_vec(), PutMode::Create)?
            .is_ok())
    }

    fn get_version(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        self.get_versioned(name)
    }

    fn put_if(&self, name: &str, bytes: &[u8], expected: &Version) -> Result<Option<Version>> {
        let mode = PutMode::Update(UpdateVersion {
            e_tag: expected.e_tag.clone(),
            version: expected.version.clone(),
        });
        Ok(self.put_key(name, name, bytes.to_vec(), mode)?.ok())
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.get_key(name, name)
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let prefix = if dir.is_empty() {
            (!self.s.prefix.is_empty()).then(|| ObjPath::from(self.s.prefix.as_str()))
        } else {
            Some(self.key(dir)?)
        };
        let inner = self.s.inner.clone();
        let listed = self
            .run(async move { inner.list_with_delimiter(prefix.as_ref()).await })?
            .map_err(|e| self.err("list", dir, e))?;
        let mut names: Vec<String> = listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        for p in &listed.common_prefixes {
            if let Some(last) = p.filename() {
                if is_segment(last) {
                    names.push(last.to_string());
                } else {
                    names.push(format!("{last}/"));
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn delete(&self, name: &str) -> Result<bool> {
        if is_segment(name) {
            let parts = self.list_parts(name)?;
            for (start, _) in &parts {
                self.delete_key(name, &format!("{name}/{}", part_key(*start)))?;
            }
            self.invalidate(name);
            return Ok(!parts.is_empty());
        }
        self.delete_key(name, name)
    }

    fn truncate(&self, name: &str, len: u64) -> Result<()> {
        if is_segment(name) {
            return self.cut_segment(name, len);
        }
        let mut all = self.get(name)?.unwrap_or_default();
        all.truncate(len as usize);
        self.put(name, &all)
    }

    fn punch(&self, name: &str, offset: u64, len: u64) -> Result<bool> {
        // Parts wholly inside the range can go; anything else stays.
        if !is_segment(name) {
            return Ok(false);
        }
        let mut freed = false;
        for (start, plen) in self.list_parts(name)? {
            if start >= offset
                && start.saturating_add(plen) <= offset.saturating_add(len)
                && start != 0
            {
                self.delete_key(name, &format!("{name}/{}", part_key(start)))?;
                freed = true;
            }
        }
        self.invalidate(name);
        Ok(freed)
    }

    fn forget(&self) {
        self.lock_parts().clear();
        *self.lock_cache() = WindowCache::default();
    }

    fn space(&self) -> Option<SpaceInfo> {
        None
    }
}
