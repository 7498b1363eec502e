//! Reads of segments through the cache of [`WINDOW_LEN`] windows, with
//! read-ahead of the next ones.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use object_store::ObjectStoreExt;

use super::ObjectStoreCopy;
use crate::error::Result;
use crate::store::parts::part_key;

/// Reads of segments fetch aligned windows of this size.
pub const WINDOW_LEN: u64 = 8 << 20;
/// Windows the read cache holds.
pub const CACHED_WINDOWS: usize = 6;
/// Windows fetched ahead of a read.
pub const READ_AHEAD: u64 = 2;

type Fetch = Shared<BoxFuture<'static, std::result::Result<Bytes, String>>>;

#[derive(Default)]
pub(super) struct WindowCache {
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

    pub(super) fn drop_name(&mut self, name: &str) {
        self.windows.retain(|k, _| k.0 != name);
        self.order.retain(|k| k.0 != name);
    }
}

impl ObjectStoreCopy {
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

    pub(super) fn read_segment(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
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
}
