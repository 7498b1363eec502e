//! Writing a manifest: entries streamed in checksummed frames, then the
//! metadata and trailer, under a temporary name until it is finished;
//! in an encrypted vault each frame and the metadata are sealed
//! ([`super::sealing`]).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use coffre_vault_store::store::local::durable::{fsync_dir, fsync_file};
use coffre_vault_store::store::local::private;

use super::codec::put;
use super::{
    ENTRY_LEN, FRAME_ENTRIES, MAX_META_LEN, SNAP_END, SNAP_TRAILER_LEN, SnapEntry, SnapHeader,
    SnapMeta,
};
use crate::error::{Result, SnapError};

/// Writes a manifest; it appears under its name only once finished.
pub struct SnapWriter {
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    frame: Vec<u8>,
    in_frame: usize,
    total: u64,
    expected: u64,
    /// An encrypted vault's keys (sealed frames and metadata).
    keys: Option<std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    /// The header's bytes and the manifest's name (the additional data).
    header: [u8; super::SNAP_HEADER_LEN],
    name: String,
    /// Frames written.
    frames: u64,
}

impl SnapWriter {
    /// Starts `path` (its folder is created if needed); with `keys` (an
    /// encrypted vault's), sealed.
    pub fn create(
        path: &Path,
        header: SnapHeader,
        keys: Option<std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    ) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        private::create_dir_all(dir).map_err(|e| SnapError::write(dir, e))?;
        let tmp = path.with_extension("snap.tmp");
        // Never through a symlink planted at the temporary name.
        use std::os::unix::fs::OpenOptionsExt;
        let f = private::open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| SnapError::write(&tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        let head = header.encode(keys.is_some());
        out.write_all(&head)
            .map_err(|e| SnapError::write(&tmp, e))?;
        Ok(SnapWriter {
            out: Some(out),
            tmp,
            path: path.to_path_buf(),
            frame: Vec::with_capacity(FRAME_ENTRIES * ENTRY_LEN),
            in_frame: 0,
            total: 0,
            expected: header.blocks,
            keys,
            header: head,
            name: super::sealing::manifest_name(path),
            frames: 0,
        })
    }

    /// Appends the next block's entry.
    pub fn push(&mut self, entry: &SnapEntry) -> Result<()> {
        entry.encode_into(&mut self.frame);
        self.in_frame += 1;
        self.total += 1;
        if self.in_frame == FRAME_ENTRIES {
            self.flush_frame()?;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match self.out.as_mut() {
            Some(out) => out
                .write_all(bytes)
                .map_err(|e| SnapError::write(&self.tmp, e)),
            None => Err(SnapError::write(
                &self.tmp,
                std::io::ErrorKind::Other.into(),
            )),
        }
    }

    fn flush_frame(&mut self) -> Result<()> {
        if self.in_frame == 0 {
            return Ok(());
        }
        let count = (self.in_frame as u32).to_le_bytes();
        let mut frame = std::mem::take(&mut self.frame);
        if let Some(k) = &self.keys {
            let ad = super::sealing::frame_ad(
                &self.header,
                &self.name,
                self.frames,
                self.in_frame as u32,
            );
            frame = k
                .catalog()
                .seal(&ad, &frame)
                .map_err(|e| SnapError::damaged(&self.tmp, e.to_string()))?;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&count);
        h.update(&frame);
        let crc = h.finalize().to_le_bytes();
        self.write(&count)?;
        self.write(&frame)?;
        self.write(&crc)?;
        self.frames += 1;
        frame.clear();
        self.frame = frame;
        self.frame.clear();
        self.in_frame = 0;
        Ok(())
    }

    /// Writes the metadata and trailer, syncs and renames the file into
    /// place.
    pub fn finish(mut self, meta: &SnapMeta, stored_bytes: u64) -> Result<PathBuf> {
        self.flush_frame()?;
        if self.total != self.expected {
            return Err(SnapError::damaged(
                &self.tmp,
                format!(
                    "{} entries written, {} announced",
                    self.total, self.expected
                ),
            ));
        }
        let mut meta = serde_json::to_vec(meta).unwrap_or_default();
        if meta.len() > MAX_META_LEN {
            return Err(SnapError::damaged(&self.tmp, "metadata too large"));
        }
        if let Some(k) = &self.keys {
            let ad = super::sealing::meta_ad(&self.header, &self.name, self.total, stored_bytes);
            meta = k
                .catalog()
                .seal(&ad, &meta)
                .map_err(|e| SnapError::damaged(&self.tmp, e.to_string()))?;
        }
        self.write(&meta)?;
        self.write(&crc32fast::hash(&meta).to_le_bytes())?;
        let mut t = [0u8; SNAP_TRAILER_LEN];
        put(&mut t, 0, &SNAP_END);
        put(&mut t, 8, &self.total.to_le_bytes());
        put(&mut t, 16, &stored_bytes.to_le_bytes());
        put(&mut t, 24, &(meta.len() as u32).to_le_bytes());
        let crc = crc32fast::hash(t.get(..28).unwrap_or_default());
        put(&mut t, 28, &crc.to_le_bytes());
        self.write(&t)?;
        let Some(out) = self.out.take() else {
            return Err(SnapError::write(
                &self.tmp,
                std::io::ErrorKind::Other.into(),
            ));
        };
        let f = out
            .into_inner()
            .map_err(|e| SnapError::write(&self.tmp, e.into_error()))?;
        fsync_file(&f, &self.tmp)?;
        fs::rename(&self.tmp, &self.path).map_err(|e| SnapError::write(&self.path, e))?;
        if let Some(dir) = self.path.parent() {
            fsync_dir(dir)?;
        }
        Ok(self.path.clone())
    }
}

impl Drop for SnapWriter {
    fn drop(&mut self) {
        // A finished writer has renamed its file away; otherwise the
        // partial file goes.
        let _ = fs::remove_file(&self.tmp);
    }
}
