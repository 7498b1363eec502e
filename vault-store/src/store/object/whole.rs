//! Whole-object requests (get, put, delete of one key), the cap on what
//! a whole read takes, and why a conditional put was refused.

use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::ObjectStoreCopy;
use crate::error::Result;
use crate::store::Version;

/// The most a whole-object read takes: objects read whole are catalog
/// files and segment parts, far smaller; a bucket that offers more is
/// refused before its bytes are read, not trusted with the memory.
pub const MAX_WHOLE_OBJECT: u64 = 256 << 20;

impl ObjectStoreCopy {
    pub(super) fn get_key(&self, name: &str, key: &str) -> Result<Option<Vec<u8>>> {
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

    pub(super) fn put_key(
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

    pub(super) fn delete_key(&self, name: &str, key: &str) -> Result<bool> {
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

    /// Reads `name` with its version (ETag), for a later
    /// [`Store::put_if`](crate::store::Store::put_if).
    pub fn get_versioned(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let path = self.key(name)?;
        self.get_whole(name, path)
    }
}

/// Why a conditional put was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutRefused {
    /// `put_new`: the object exists.
    Exists,
    /// `put_if`: the object changed since it was read.
    Changed,
}
