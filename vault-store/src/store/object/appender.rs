//! [`ObjectAppender`]: appends to a segment by uploading immutable parts,
//! a few at a time, and waits for them all on sync.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use object_store::{PutMode, PutOptions, PutPayload};

use super::ObjectStoreCopy;
use crate::error::Result;
use crate::store::Appender;
use crate::store::parts::part_key;

/// A segment part is uploaded once this many bytes are buffered.
pub const PART_LEN: usize = 8 << 20;
/// Part uploads one appender keeps in flight before it waits.
pub const UPLOADS_IN_FLIGHT: usize = 4;

/// Appends to a segment in object storage (see the module docs).
pub(super) struct ObjectAppender {
    store: ObjectStoreCopy,
    name: String,
    len: u64,
    part_start: u64,
    buf: Vec<u8>,
    uploads: VecDeque<tokio::task::JoinHandle<std::result::Result<(), String>>>,
    new_parts: Vec<(u64, u64)>,
}

impl ObjectAppender {
    pub(super) fn new(store: ObjectStoreCopy, name: &str, len: u64) -> Self {
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
