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

use crate::store::parts::{check_part_list, part_key, parts_of_listing};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::{Appender, SpaceInfo, Store, Version};
use crate::error::{Result, StoreError};
use crate::format::remote::{Service, StoreUrl};

/// A segment part is uploaded once this many bytes are buffered.
pub const PART_LEN: usize = 8 << 20;

/// The most a whole-object read takes: objects read whole are catalog
/// files and segment parts, far smaller; a bucket that offers more is
/// refused before its bytes are read, not trusted with the memory.
pub const MAX_WHOLE_OBJECT: u64 = 256 << 20;
/// Part uploads one appender keeps in flight before it waits.
pub const UPLOADS_IN_FLIGHT: usize = 4;
/// Reads of segments fetch aligned windows of this size.
pub const WINDOW_LEN: u64 = 8 << 20;
/// Windows the read cache holds.
pub const CACHED_WINDOWS: usize = 6;
/// Windows fetched ahead of a read.
pub const READ_AHEAD: u64 = 2;

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

type Fetch = Shared<BoxFuture<'static, std::result::Result<Bytes, String>>>;

#[derive(Default)]
struct WindowCache {
    windows: HashMap<(String, u64), Fetch>,
    order: VecDeque<(String, u64)>,
}

impl WindowCache {
    fn insert(&mut self, key: (String, u64), f: Fetch) {
        self.windows.insert(key.clone(), f);
        self.order.push_back(key);
        while self.order.len() > CACHED_WINDOWS {
            if let Some(old) = self.order.pop_front() {
                self.windows.remove(&old);
            }
        }
    }

    fn drop_name(&mut self, name: &str) {
        self.windows.retain(|k, _| k.0 != name);
        self.order.retain(|k| k.0 != name);
    }
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
    /// Opens the store a URL names. Credentials come from each service's
    /// usual environment variables, as the `object_store` builders read
    /// them (`AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_USE_EMULATOR`
    /// with `AZURITE_BLOB_STORAGE_URL`; `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, …).
    pub fn open(url: &str) -> Result<ObjectStoreCopy> {
        let parsed = StoreUrl::parse(url).map_err(|reason| StoreError::InvalidSetting {
            field: "store URL",
            reason,
        })?;
        let fail = |e: object_store::Error| StoreError::Object {
            url: url.to_string(),
            op: "configure",
            reason: short_reason(&e.to_string()),
        };
        let inner: Arc<dyn ObjectStore> = match parsed.service {
            Service::Azure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_account(&parsed.account)
                    .with_container_name(&parsed.container)
                    .build()
                    .map_err(fail)?,
            ),
            Service::S3 => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&parsed.container)
                    .build()
                    .map_err(fail)?,
            ),
            Service::Memory => Arc::new(object_store::memory::InMemory::new()),
        };
        Self::with_inner(&parsed.to_url(), inner, &parsed.prefix)
    }

    /// A store over any `object_store` implementation, under `prefix`.
    pub fn with_inner(url: &str, inner: Arc<dyn ObjectStore>, prefix: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coffre-objstore")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Object {
                url: url.to_string(),
                op: "start the I/O runtime",
                reason: e.to_string(),
            })?;
        Ok(ObjectStoreCopy {
            s: Arc::new(Shared0 {
                url: url.to_string(),
                inner,
                prefix: prefix.trim_matches('/').to_string(),
                rt,
                parts: Mutex::new(HashMap::new()),
                cache: Mutex::new(WindowCache::default()),
            }),
        })
    }

    /// The same bucket or container, rooted at `sub` below this prefix.
    pub fn sub(&self, sub: &str) -> Result<ObjectStoreCopy> {
        Self::with_inner(
            &super::join(&self.s.url, sub),
            self.s.inner.clone(),
            &super::join(&self.s.prefix, sub),
        )
    }

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

    /// The parts of segment `name`, listed once and then kept.
    fn parts(&self, name: &str) -> Result<Arc<Vec<(u64, u64)>>> {
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
    fn checked_parts(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let parts = self.list_parts(name)?;
        check_part_list(&parts).map_err(|reason| self.err("list", name, reason))?;
        Ok(parts)
    }

    fn list_parts(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let prefix = self.key(name)?;
        let inner = self.s.inner.clone();
        let listed = self
            .run(async move { inner.list_with_delimiter(Some(&prefix)).await })?
            .map_err(|e| self.err("list", name, e))?;
        Ok(parts_of_listing(listed.objects.iter().map(|o| {
            (o.location.filename().unwrap_or_default(), o.size)
        })))
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

    /// Fetches byte range `r` of segment `name` from its parts.
    fn fetch_segment(
        &self,
        name: &str,
        r: Range<u64>,
    ) -> Result<BoxFuture<'static, std::result::Result<Bytes, String>>> {
        let parts = self.parts(name)?;
        let mut gets = Vec::new();
        for &(start, len) in parts.iter() {
            let end = start + len;
            if end <= r.start || start >= r.end {
                continue;
            }
            let from = r.start.max(start) - start;
            let to = r.end.min(end) - start;
            let key = self.key(&format!("{name}/{}", part_key(start)))?;
            let inner = self.s.inner.clone();
            gets.push(async move { inner.get_range(&key, from..to).await });
        }
        let want = r.end - r.start;
        Ok(async move {
            let pieces = futures::future::try_join_all(gets)
                .await
                .map_err(|e| e.to_string())?;
            if pieces.len() == 1 {
                let only = pieces.into_iter().next().unwrap_or_default();
                if only.len() as u64 == want {
                    return Ok(only);
                }
                return Err(format!("short read: {} of {want} bytes", only.len()));
            }
            let mut all = Vec::with_capacity(want as usize);
            for p in pieces {
                all.extend_from_slice(&p);
            }
            if all.len() as u64 != want {
                return Err(format!("short read: {} of {want} bytes", all.len()));
            }
            Ok(Bytes::from(all))
        }
        .boxed())
    }

    /// The window `w` of segment `name` (of `size` bytes), from the cache
    /// or fetched (and then cached).
    fn window(&self, name: &str, w: u64, size: u64) -> Result<Fetch> {
        let key = (name.to_string(), w);
        if let Some(f) = self.lock_cache().windows.get(&key) {
            return Ok(f.clone());
        }
        let start = w * WINDOW_LEN;
        let end = (start + WINDOW_LEN).min(size);
        let fut = self.fetch_segment(name, start..end)?;
        // Started at once on the runtime, so read-ahead makes progress
        // while the caller works on what it has.
        let handle = self.s.rt.spawn(fut);
        let shared: Fetch = async move { handle.await.map_err(|e| e.to_string())? }
            .boxed()
            .shared();
        self.lock_cache().insert(key, shared.clone());
        Ok(shared)
    }

    fn read_segment(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let parts = self.parts(name)?;
        // Checked when listed: no overflow.
        let size = parts.last().map(|(s, l)| s + l).unwrap_or(0);
        let end = offset.saturating_add(buf.len() as u64);
        if end > size {
            return Err(self.err(
                "read",
                name,
                format!("range {offset}..{end} is past the end ({size} bytes)"),
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / WINDOW_LEN;
        let last = (end - 1) / WINDOW_LEN;
        let windows = size.div_ceil(WINDOW_LEN);
        for w in (last + 1)..(last + 1 + READ_AHEAD).min(windows) {
            // Spawned at once; the cache keeps the result.
            let _ahead = self.window(name, w, size)?;
        }
        for w in first..=last {
            let fetch = self.window(name, w, size)?;
            let bytes = match futures::executor::block_on(fetch) {
                Ok(b) => b,
                Err(e) => {
                    self.lock_cache().windows.remove(&(name.to_string(), w));
                    return Err(self.err("read", name, e));
                }
            };
            let wstart = w * WINDOW_LEN;
            let from = offset.max(wstart);
            let to = end.min(wstart + bytes.len() as u64);
            let src = bytes
                .get((from - wstart) as usize..(to - wstart) as usize)
                .ok_or_else(|| self.err("read", name, "window shorter than the segment"))?;
            let dst = buf
                .get_mut((from - offset) as usize..(to - offset) as usize)
                .ok_or_else(|| self.err("read", name, "bad range"))?;
            dst.copy_from_slice(src);
        }
        Ok(())
    }

    /// Cuts segment `name` to `len` bytes: parts past it are deleted, one
    /// that straddles it is rewritten shorter.
    fn cut_segment(&self, name: &str, len: u64) -> Result<()> {
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

    fn get_key(&self, name: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.key(key)?;
        Ok(self.get_whole(name, path)?.map(|(b, _)| b))
    }

    /// Reads object `path` whole with its version; `None` when absent.
    /// The body is capped at [`MAX_WHOLE_OBJECT`]: by its declared size
    /// before any byte is read, then by the bytes actually sent.
    fn get_whole(&self, name: &str, path: ObjPath) -> Result<Option<(Vec<u8>, Version)>> {
        use futures::StreamExt;
        let inner = self.s.inner.clone();
        let got = self.run(async move {
            let r = match inner.get(&path).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(Ok(None)),
                Err(e) => return Err(e),
            };
            if r.meta.size > MAX_WHOLE_OBJECT {
                return Ok(Err(r.meta.size));
            }
            let v = Version {
                e_tag: r.meta.e_tag.clone(),
                version: r.meta.version.clone(),
            };
            let mut out = Vec::with_capacity(usize::try_from(r.meta.size).unwrap_or(0));
            let mut body = r.into_stream();
            while let Some(part) = body.next().await {
                let part = part?;
                let len = (out.len() + part.len()) as u64;
                if len > MAX_WHOLE_OBJECT {
                    return Ok(Err(len));
                }
                out.extend_from_slice(&part);
            }
            Ok(Ok(Some((out, v))))
        })?;
        match got.map_err(|e| self.err("get", name, e))? {
            Err(size) => Err(self.err(
                "get",
                name,
                format!("the object is {size} bytes or more, more than the {MAX_WHOLE_OBJECT} a vault object read whole may be"),
            )),
            Ok(b) => Ok(b),
        }
    }

    fn put_key(
        &self,
        name: &str,
        key: &str,
        bytes: Vec<u8>,
        mode: PutMode,
    ) -> Result<std::result::Result<Version, PutRefused>> {
        let path = self.key(key)?;
        let inner = self.s.inner.clone();
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        let r = self.run(async move {
            inner
                .put_opts(&path, PutPayload::from(Bytes::from(bytes)), opts)
                .await
        })?;
        match r {
            Ok(done) => Ok(Ok(Version {
                e_tag: done.e_tag,
                version: done.version,
            })),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Err(PutRefused::Exists)),
            Err(object_store::Error::Precondition { .. }) => Ok(Err(PutRefused::Changed)),
            Err(e) => Err(self.err("put", name, e)),
        }
    }

    fn delete_key(&self, name: &str, key: &str) -> Result<bool> {
        let path = self.key(key)?;
        let inner = self.s.inner.clone();
        let head_path = path.clone();
        let existed = self.run({
            let inner = inner.clone();
            async move { inner.head(&head_path).await.is_ok() }
        })?;
        let r = self.run(async move { inner.delete(&path).await })?;
        match r {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(existed),
            Err(e) => Err(self.err("delete", name, e)),
        }
    }

    /// Reads `name` with its version (ETag), for a later [`Store::put_if`].
    pub fn get_versioned(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let path = self.key(name)?;
        self.get_whole(name, path)
    }
}

/// The longest reason an object-store error keeps.
const MAX_REASON: usize = 400;

/// What a service answered, in one short line: the error `Code` and the
/// first line of its `Message` instead of the XML body Azure and S3 send
/// (`object_store` puts the body in its error text), whitespace folded,
/// and at most [`MAX_REASON`] characters.
pub fn short_reason(text: &str) -> String {
    let tag = |name: &str| -> Option<String> {
        let open = format!("<{name}>");
        let from = text.find(&open)? + open.len();
        let len = text.get(from..)?.find(&format!("</{name}>"))?;
        let inner = text.get(from..from + len)?;
        Some(inner.lines().next().unwrap_or_default().trim().to_string())
    };
    let xml_at = ["<?xml", "<Error"]
        .iter()
        .filter_map(|m| text.find(m))
        .min();
    let line = match xml_at {
        Some(at) => {
            let before = text.get(..at).unwrap_or_default();
            let before = before
                .trim_end()
                .trim_end_matches("body:")
                .trim_end()
                .trim_end_matches([',', ':']);
            let said = match (tag("Code"), tag("Message")) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c,
                (None, Some(m)) => m,
                (None, None) => "an error without a code".to_string(),
            };
            format!("{before}: {said}")
        }
        None => text.to_string(),
    };
    let mut out = line.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.chars().count() > MAX_REASON {
        out = out.chars().take(MAX_REASON).collect::<String>() + "…";
    }
    out
}

/// Why a conditional put was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutRefused {
    /// `put_new`: the object exists.
    Exists,
    /// `put_if`: the object changed since it was read.
    Changed,
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

/// Appends to a segment in object storage (see the module docs).
struct ObjectAppender {
    store: ObjectStoreCopy,
    name: String,
    len: u64,
    part_start: u64,
    buf: Vec<u8>,
    uploads: VecDeque<tokio::task::JoinHandle<std::result::Result<(), String>>>,
    new_parts: Vec<(u64, u64)>,
}

impl ObjectAppender {
    fn new(store: ObjectStoreCopy, name: &str, len: u64) -> Self {
        ObjectAppender {
            store,
            name: name.to_string(),
            len,
            part_start: len,
            buf: Vec::new(),
            uploads: VecDeque::new(),
            new_parts: Vec::new(),
        }
    }

    fn upload_part(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        while self.uploads.len() >= UPLOADS_IN_FLIGHT {
            self.wait_one()?;
        }
        let bytes = Bytes::from(std::mem::take(&mut self.buf));
        let plen = bytes.len() as u64;
        let key = self
            .store
            .key(&format!("{}/{}", self.name, part_key(self.part_start)))?;
        let inner = self.store.s.inner.clone();
        self.uploads.push_back(self.store.s.rt.spawn(async move {
            inner
                .put_opts(
                    &key,
                    PutPayload::from(bytes),
                    PutOptions {
                        mode: PutMode::Overwrite,
                        ..PutOptions::default()
                    },
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }));
        self.new_parts.push((self.part_start, plen));
        self.part_start += plen;
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        let Some(h) = self.uploads.pop_front() else {
            return Ok(());
        };
        match futures::executor::block_on(h) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.store.err("upload", &self.name, e)),
            Err(e) => Err(self.store.err("upload", &self.name, e)),
        }
    }
}

impl Appender for ObjectAppender {
    fn append(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let room = PART_LEN.saturating_sub(self.buf.len()).max(1);
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.buf.extend_from_slice(now);
            self.len += now.len() as u64;
            bytes = rest;
            if self.buf.len() >= PART_LEN {
                self.upload_part()?;
            }
        }
        Ok(())
    }

    fn start_writeback(&mut self) -> Result<()> {
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.upload_part()?;
        while !self.uploads.is_empty() {
            self.wait_one()?;
        }
        if !self.new_parts.is_empty() {
            let mut parts = self.store.lock_parts();
            if let Some(known) = parts.get(&self.name).cloned() {
                let mut all: Vec<(u64, u64)> = known.as_ref().clone();
                all.append(&mut self.new_parts);
                all.sort_unstable();
                parts.insert(self.name.clone(), Arc::new(all));
            } else {
                self.new_parts.clear();
            }
            drop(parts);
            self.store.lock_cache().drop_name(&self.name);
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }
}

impl Drop for ObjectAppender {
    fn drop(&mut self) {
        // Uploads still running finish on the runtime; what they leave
        // past the committed length is cut off by the next writer.
        self.uploads.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_lists_with_overlaps_or_overflow_are_refused() {
        assert!(check_part_list(&[]).is_ok());
        assert!(check_part_list(&[(0, 10), (10, 5)]).is_ok());
        // A gap is a punched part.
        assert!(check_part_list(&[(0, 10), (20, 5)]).is_ok());
        let e = check_part_list(&[(0, 10), (8, 5)]).unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let e = check_part_list(&[(0, 10), (u64::MAX - 1, 5)]).unwrap_err();
        assert!(e.contains("largest offset"), "{e}");
    }

    fn mem() -> ObjectStoreCopy {
        ObjectStoreCopy::open("memory://vault").unwrap()
    }

    #[test]
    fn a_segment_is_parts_cut_at_every_sync_and_reads_span_them() {
        let s = mem();
        let mut a = s.create("segments/01.seg").unwrap();
        let data: Vec<u8> = (0..(PART_LEN * 2 + 12345))
            .map(|i| (i % 251) as u8)
            .collect();
        a.append(&data[..100]).unwrap();
        a.sync().unwrap();
        a.append(&data[100..]).unwrap();
        a.sync().unwrap();
        drop(a);
        let parts = s.list_parts("segments/01.seg").unwrap();
        assert_eq!(parts.first(), Some(&(0, 100)));
        assert!(parts.len() >= 3, "{parts:?}");
        assert_eq!(s.size("segments/01.seg").unwrap(), Some(data.len() as u64));
        let mut buf = vec![0u8; data.len() - 100];
        s.forget();
        s.read_at("segments/01.seg", 50, &mut buf).unwrap();
        assert_eq!(&buf[..], &data[50..50 + buf.len()]);
        let mut past = [0u8; 2];
        assert!(
            s.read_at("segments/01.seg", data.len() as u64 - 1, &mut past)
                .is_err()
        );
        assert_eq!(s.list("segments").unwrap(), vec!["01.seg".to_string()]);
    }

    #[test]
    fn appending_after_a_committed_length_cuts_what_lies_past_it() {
        let s = mem();
        let mut a = s.create("segments/02.seg").unwrap();
        a.append(&[1u8; 1000]).unwrap();
        a.sync().unwrap();
        a.append(&[2u8; 1000]).unwrap();
        a.sync().unwrap();
        drop(a);
        // Only 1500 bytes were committed: the tail is cut, even inside a part.
        let mut a = s.append_to("segments/02.seg", 1500).unwrap();
        a.append(&[3u8; 10]).unwrap();
        a.sync().unwrap();
        drop(a);
        assert_eq!(s.size("segments/02.seg").unwrap(), Some(1510));
        let mut buf = [0u8; 12];
        s.read_at("segments/02.seg", 1498, &mut buf).unwrap();
        assert_eq!(buf, [2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]);
        assert!(s.delete("segments/02.seg").unwrap());
        assert_eq!(s.size("segments/02.seg").unwrap(), None);
    }

    #[test]
    fn conditional_puts_refuse_to_overwrite_unseen_changes() {
        let s = mem();
        assert!(s.put_new("points/a/1.point", b"one").unwrap());
        assert!(!s.put_new("points/a/1.point", b"two").unwrap());
        assert_eq!(s.get("points/a/1.point").unwrap().unwrap(), b"one");
        s.put("lease", b"a").unwrap();
        let (_, v) = s.get_version("lease").unwrap().unwrap();
        let v2 = s
            .put_if("lease", b"b", &v)
            .unwrap()
            .expect("first update wins");
        assert!(
            s.put_if("lease", b"c", &v).unwrap().is_none(),
            "stale version"
        );
        assert!(s.put_if("lease", b"d", &v2).unwrap().is_some());
        assert_eq!(s.get("lease").unwrap().unwrap(), b"d");
        assert_eq!(s.list("points").unwrap(), vec!["a/".to_string()]);
        assert_eq!(
            s.list("").unwrap(),
            vec!["lease".to_string(), "points/".to_string()]
        );
    }

    #[test]
    fn a_repair_rewrites_the_bytes_in_place() {
        let s = mem();
        let mut a = s.create("segments/03.seg").unwrap();
        a.append(&[7u8; 300]).unwrap();
        a.sync().unwrap();
        a.append(&[8u8; 300]).unwrap();
        a.sync().unwrap();
        drop(a);
        s.write_at("segments/03.seg", 290, &[9u8; 20]).unwrap();
        let mut buf = [0u8; 22];
        s.read_at("segments/03.seg", 289, &mut buf).unwrap();
        assert_eq!(buf[0], 7);
        assert!(buf[1..21].iter().all(|b| *b == 9));
        assert_eq!(buf[21], 8);
    }

    #[test]
    fn a_services_xml_answer_becomes_one_short_line() {
        let azure = "Generic MicrosoftAzure error: Error performing PUT http://127.0.0.1:1/devstoreaccount1/nope/v/copy in 2ms - Server returned non-success status code: 404 Not Found, body: <?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Error>\n  <Code>ContainerNotFound</Code>\n  <Message>The specified container does not exist.\nRequestId:6f1c\nTime:2026-12-05T21:00:00Z</Message>\n</Error>";
        let short = short_reason(azure);
        assert!(!short.contains('<'), "{short}");
        assert!(!short.contains("RequestId"), "{short}");
        assert!(
            short.ends_with(
                "404 Not Found: ContainerNotFound: The specified container does not exist."
            ),
            "{short}"
        );
        assert!(!short.contains('\n'));
        // As Azurite answers a refused key (no `body:` before the XML).
        let forbidden = short_reason(
            "status code: 403 Forbidden: <?xml version=\"1.0\"?><Error><Code>AuthorizationFailure</Code><Message>Server failed to authenticate the request.</Message></Error>",
        );
        assert_eq!(
            forbidden,
            "status code: 403 Forbidden: AuthorizationFailure: Server failed to authenticate the request."
        );
        let long = "x ".repeat(1000);
        assert!(short_reason(&long).chars().count() <= MAX_REASON + 1);
        assert_eq!(short_reason("connection refused"), "connection refused");
    }

    #[test]
    fn names_that_leave_the_prefix_are_refused() {
        let s = mem();
        assert!(s.put("../x", b"").is_err());
        assert!(s.put("/x", b"").is_err());
        assert!(s.put("a//b", b"").is_err());
    }
}
