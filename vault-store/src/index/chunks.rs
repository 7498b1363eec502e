//! Reads of where chunks live: chunk locations, segment states, the
//! chunks of a segment, reference counts, GC's work list and dead ranges.

use std::collections::BTreeMap;

use super::keys::{place_from_key, seq_from_key, seq_key};
use super::{Cf, ChunkLocation, GC_LAYOUT_VERSION, Index, META_GC_LAYOUT, RefEntry, SegmentInfo};
use crate::error::Result;
use crate::format::chunk_id::ChunkId;

/// Fewest sorted keys read by walking their family instead of one
/// lookup each.
const DENSE_MIN: usize = 1024;

/// Walked when the keys wanted are at least one in this many of the
/// family's (RocksDB's estimate).
const DENSE_SHARE: u64 = 4;

/// Steps taken from one wanted key towards the next before seeking it.
const WALK_STEPS: usize = 8;

impl Index {
    /// Where chunk `id` lives, if it is indexed.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLocation>> {
        match self.get(Cf::Chunks, id.as_bytes())? {
            None => Ok(None),
            Some(v) => ChunkLocation::decode(&v)
                .map(Some)
                .ok_or_else(|| self.corrupt("chunk location", format!("chunk {id}"))),
        }
    }

    /// Where each of `ids` lives (in their order; `None` where one is not
    /// indexed), read in one batch.
    pub fn chunk_locations(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkLocation>>> {
        self.multi_get(Cf::Chunks, ids, false, |v, id| {
            ChunkLocation::decode(v)
                .ok_or_else(|| self.corrupt("chunk location", format!("chunk {id}")))
        })
    }

    /// The values of `ids` in `cf` (in their order), read in one batch
    /// (lookups grouped by table block; `sorted` when `ids` are in key
    /// order, which spares RocksDB sorting them), each decoded by `decode`.
    fn multi_get<T: Clone>(
        &self,
        cf: Cf,
        ids: &[ChunkId],
        sorted: bool,
        decode: impl Fn(&[u8], &ChunkId) -> Result<T>,
    ) -> Result<Vec<Option<T>>> {
        let Some(handle) = self.db.cf_handle(cf.name()) else {
            return Ok(vec![None; ids.len()]);
        };
        if sorted && self.dense(handle, ids.len()) {
            return self.walk(handle, ids, decode);
        }
        self.db
            .batched_multi_get_cf(
                handle,
                ids.iter().map(|id| id.as_bytes().as_slice()),
                sorted,
            )
            .into_iter()
            .zip(ids)
            .map(|(v, id)| match v.map_err(|e| self.err(e))? {
                None => Ok(None),
                Some(v) => decode(&v, id).map(Some),
            })
            .collect()
    }

    /// Whether `wanted` sorted keys are enough of the family behind
    /// `handle` that walking it beats looking each one up: a day's point
    /// wants the counts of most of an item's chunks (one lookup each costs
    /// about as much as walking ten entries).
    pub(super) fn dense(&self, handle: &rocksdb::ColumnFamily, wanted: usize) -> bool {
        wanted >= DENSE_MIN
            && self
                .db
                .property_int_value_cf(handle, "rocksdb.estimate-num-keys")
                .ok()
                .flatten()
                // None at all: deletions (GC) count against the estimate,
                // so the family may hold many after all.
                .is_some_and(|keys| keys > 0 && (wanted as u64).saturating_mul(DENSE_SHARE) >= keys)
    }

    /// The values of sorted `ids`, found by walking the family from the
    /// first: each key is reached by a few steps from the one before, or
    /// sought where it is further away.
    fn walk<T: Clone>(
        &self,
        handle: &rocksdb::ColumnFamily,
        ids: &[ChunkId],
        decode: impl Fn(&[u8], &ChunkId) -> Result<T>,
    ) -> Result<Vec<Option<T>>> {
        let mut it = self.db.raw_iterator_cf(handle);
        let mut out = Vec::with_capacity(ids.len());
        let Some(first) = ids.first() else {
            return Ok(out);
        };
        it.seek(first.as_bytes());
        for id in ids {
            let want = id.as_bytes().as_slice();
            let mut steps = 0;
            while it.key().is_some_and(|k| k < want) {
                if steps == WALK_STEPS {
                    it.seek(want);
                    break;
                }
                it.next();
                steps += 1;
            }
            out.push(match (it.key(), it.value()) {
                (Some(k), Some(v)) if k == want => Some(decode(v, id)?),
                _ => None,
            });
        }
        it.status().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Every indexed chunk, in id order.
    pub fn chunks(&self) -> Result<Vec<(ChunkId, ChunkLocation)>> {
        let mut out = Vec::new();
        self.scan(Cf::Chunks, &[], |k, v| {
            let id =
                ChunkId::from_slice(k).ok_or_else(|| self.corrupt("chunk key", hex::encode(k)))?;
            let loc = ChunkLocation::decode(v)
                .ok_or_else(|| self.corrupt("chunk location", format!("chunk {id}")))?;
            out.push((id, loc));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The chunks recorded in segment `segment` (from `segchunks`), in
    /// offset order.
    pub fn segment_chunks(&self, segment: u64) -> Result<Vec<(u64, ChunkId)>> {
        let mut out = Vec::new();
        self.scan(Cf::SegChunks, &seq_key(segment), |k, v| {
            let (_, offset) =
                place_from_key(k).ok_or_else(|| self.corrupt("segchunks key", hex::encode(k)))?;
            let id = ChunkId::from_slice(v)
                .ok_or_else(|| self.corrupt("segchunks value", hex::encode(v)))?;
            out.push((offset, id));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every segment's state, by segment id.
    pub fn segment_infos(&self) -> Result<BTreeMap<u64, SegmentInfo>> {
        let mut out = BTreeMap::new();
        self.scan(Cf::Segments, &[], |k, v| {
            let id = seq_from_key(k).ok_or_else(|| self.corrupt("segment key", hex::encode(k)))?;
            let info = SegmentInfo::decode(v)
                .ok_or_else(|| self.corrupt("segment state", format!("segment {id}")))?;
            out.insert(id, info);
            Ok(true)
        })?;
        Ok(out)
    }

    /// One segment's state.
    pub fn segment_info(&self, id: u64) -> Result<Option<SegmentInfo>> {
        self.get(Cf::Segments, &seq_key(id))?
            .map(|v| {
                SegmentInfo::decode(&v)
                    .ok_or_else(|| self.corrupt("segment state", format!("segment {id}")))
            })
            .transpose()
    }

    /// Committed length of every live (not retired) segment, by segment id.
    pub fn segments(&self) -> Result<BTreeMap<u64, u64>> {
        Ok(self
            .segment_infos()?
            .into_iter()
            .filter(|(_, i)| !i.retired)
            .map(|(id, i)| (id, i.committed))
            .collect())
    }

    /// A chunk's reference count entry.
    pub fn chunk_ref(&self, id: &ChunkId) -> Result<Option<RefEntry>> {
        self.get(Cf::Refs, id.as_bytes())?
            .map(|v| {
                RefEntry::decode(&v).ok_or_else(|| self.corrupt("reference count", id.to_string()))
            })
            .transpose()
    }

    /// The reference counts of `ids` (in their order), read in one batch
    /// (lookups grouped by table block); `sorted` when `ids` are in key
    /// order, which spares RocksDB sorting them.
    pub fn chunk_refs(&self, ids: &[ChunkId], sorted: bool) -> Result<Vec<Option<RefEntry>>> {
        self.multi_get(Cf::Refs, ids, sorted, |v, id| {
            RefEntry::decode(v).ok_or_else(|| self.corrupt("reference count", id.to_string()))
        })
    }

    /// Up to `limit` chunks on GC's work list (count 0), after `after`.
    pub fn unreferenced_from(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        let from = after.map_or(&[][..], |a| a.as_bytes());
        self.scan_from(Cf::Unref, from, &[], |k, _| {
            let id =
                ChunkId::from_slice(k).ok_or_else(|| self.corrupt("unref key", hex::encode(k)))?;
            if Some(&id) != after {
                out.push(id);
            }
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    /// Dead ranges of segment `segment` awaiting physical reclamation:
    /// (segment, offset, length).
    pub fn dead_ranges_of(&self, segment: u64) -> Result<Vec<(u64, u64, u32)>> {
        let mut out = Vec::new();
        self.scan(Cf::Dead, &seq_key(segment), |k, v| {
            let (s, o) =
                place_from_key(k).ok_or_else(|| self.corrupt("dead key", hex::encode(k)))?;
            let len = v
                .try_into()
                .map(u32::from_le_bytes)
                .map_err(|_| self.corrupt("dead length", format!("segment {s} offset {o}")))?;
            out.push((s, o, len));
            Ok(true)
        })?;
        Ok(out)
    }

    /// True when the GC column families are built at the current layout.
    pub fn has_gc_layout(&self) -> Result<bool> {
        Ok(self.get(Cf::Meta, META_GC_LAYOUT)?.as_deref() == Some(&[GC_LAYOUT_VERSION][..]))
    }
}
