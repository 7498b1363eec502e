//! Adoption: a snapshot's pack linked into the vault as a segment, its
//! records indexed where they are.

use super::*;
use crate::store::{LocalStore, Store};

impl Adopted {
    /// The ranges after the header that hold no indexed record (records
    /// the transfer found elsewhere): dead bytes from the start, in
    /// pieces a `dead` entry can hold.
    pub(super) fn gaps(&self) -> Vec<(u64, u32)> {
        const PIECE: u64 = 1 << 30;
        let mut used: Vec<(u64, u64)> = self
            .used
            .iter()
            .map(|&(o, l)| (o, o + u64::from(l)))
            .collect();
        let mut out = Vec::new();
        for (mut at, end) in
            crate::format::segment::uncovered(SEGMENT_HEADER_LEN, self.len, &mut used)
        {
            while at < end {
                let n = (end - at).min(PIECE);
                out.push((at, n as u32));
                at += n;
            }
        }
        out
    }
}

impl WriteSession<'_> {
    /// Hard-links the snapshot pack at `pack` into the vault as a new
    /// segment, so that its records can be indexed where they are
    /// ([`WriteSession::adopt`]) instead of being written a second time.
    /// `None` (nothing done) when the vault cannot share the file: a
    /// shared vault, synchronous replicas (each needs its own bytes), a
    /// pack on another filesystem, or a file that is not a pack. The pack
    /// is fsynced first; the link is durable before this returns.
    pub fn adopt_pack(&mut self, pack: &Path) -> Result<Option<u64>> {
        self.guard()?;
        if self.vault.remote.is_some() || self.vault.copies.sync_copies().len() != 1 {
            return Ok(None);
        }
        // The pack is read through a store of its own folder: the seam
        // refuses a symbolic link or a FIFO at its name.
        let (Some(folder), Some(file)) = (pack.parent(), pack.file_name()) else {
            return Ok(None);
        };
        let src = LocalStore::new(folder);
        let file = file.to_string_lossy();
        let Ok(Some(len)) = src.size(&file) else {
            return Ok(None);
        };
        let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
        if len <= SEGMENT_HEADER_LEN
            || src.read_at(&file, 0, &mut h).is_err()
            || !crate::format::segment::is_adopted(&h)
        {
            return Ok(None);
        }
        if !self.vault.adopted_packs.load(Ordering::Relaxed) {
            // From now on the vault is at version 5: a build that does not
            // know adopted segments would append to or punch them.
            let mut cfg = self.vault.config.clone();
            cfg.adopted_packs = true;
            let r = self.vault.store_config(&cfg);
            self.poison_vault(r)?;
            self.vault.adopted_packs.store(true, Ordering::Relaxed);
        }
        let infos = self.vault.index.segment_infos()?;
        let id = self.next_segment_id(&infos)?;
        // The store fsyncs the pack, links it and makes the link durable
        // (or refuses: another filesystem).
        let r = self
            .vault
            .copies
            .primary()
            .store
            .link(&segment_name(id), pack);
        if !self.poison_vault(r)? {
            tracing::debug!(pack = %pack.display(), "the pack cannot be linked into the vault; its records are copied");
            return Ok(None);
        }
        // What was linked is checked again, through the vault's store: the
        // pack's name may have been pointed elsewhere since the first look.
        let primary = self.vault.copies.primary().store.clone();
        let linked = segment_name(id);
        let len = match primary.size(&linked)? {
            Some(len) if len > SEGMENT_HEADER_LEN => len,
            _ => 0,
        };
        if len == 0
            || primary.read_at(&linked, 0, &mut h).is_err()
            || !crate::format::segment::is_adopted(&h)
        {
            let r = primary.delete(&linked).map(drop);
            self.poison_vault(r)?;
            return Ok(None);
        }
        self.adopted.push(Adopted {
            id,
            len,
            committed: false,
            used: Vec::new(),
        });
        Ok(Some(id))
    }

    /// Indexes data chunk `id` as the record at `loc`, in a segment this
    /// session adopted. The caller has checked the record (CRC, id). A
    /// duplicate of a pending chunk is ignored; its bytes become dead.
    pub fn adopt(&mut self, id: ChunkId, loc: ChunkLocation) -> Result<()> {
        self.guard()?;
        if self.pending.contains_key(&id) {
            return Ok(());
        }
        let path = || self.vault.segment_path(loc.segment);
        let Some(a) = self.adopted.iter_mut().find(|a| a.id == loc.segment) else {
            return Err(StoreError::CorruptFile {
                path: path(),
                what: "adopted segment",
                reason: "not a segment this session adopted".into(),
            });
        };
        if loc.offset < SEGMENT_HEADER_LEN || loc.offset + u64::from(loc.len) > a.len {
            return Err(StoreError::CorruptFile {
                path: path(),
                what: "adopted segment",
                reason: format!(
                    "a record at {} of {} bytes lies outside its {} bytes",
                    loc.offset, loc.len, a.len
                ),
            });
        }
        a.used.push((loc.offset, loc.len));
        self.place(id, loc, Some(ChunkKind::Data))
    }

    /// True when segment `id` is an adopted pack (never appended to: its
    /// file may still be a snapshot's pack).
    pub(super) fn is_adopted_segment(&self, id: u64) -> Result<bool> {
        let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
        self.vault
            .copies
            .primary()
            .store
            .read_at(&segment_name(id), 0, &mut h)?;
        Ok(crate::format::segment::is_adopted(&h))
    }
}
