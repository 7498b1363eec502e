//! The coordination files of an encrypted shared vault, sealed on their
//! way to the store: writer leases (`leases/`), the GC state and the
//! condemned lists (`gc/`), the per-segment chunk lists (`chunks/`) and
//! the host claims (`hosts/`).
//!
//! [`SealedState`] wraps a shared vault's store: a whole-file write of a
//! name under those folders is sealed with the vault's catalog key
//! ([`crate::format::sealed_file::seal`], the file's name in the
//! additional data), and a read opens it again, so the lease, GC and
//! chunk-list code reads and writes the same plain envelopes as in a plain
//! vault. A file there that does not open (planted, altered, another
//! file's, or plain) is refused with [`StoreError::CorruptFile`] naming
//! it: GC stops on it, a writer never takes it for a lease. Every other
//! name (segments, catalog files, the config, job copies) passes through
//! untouched: their own code seals them.
//!
//! A host claim is the host's name in raw bytes in a plain vault; sealed,
//! it is first put in an envelope of its own ([`HOST_MAGIC`]) so that it
//! can be sealed like the others.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;

use crate::crypto::VaultKeys;
use crate::error::{Result, StoreError};
use crate::format::envelope;
use crate::format::sealed_file;
use crate::store::{Appender, SharedStore, SpaceInfo, Store, Version};

/// The folders whose files are sealed. Frozen.
pub const SEALED_STATE_DIRS: [&str; 4] = ["leases/", "gc/", "chunks/", "hosts/"];
/// Magic of the envelope a sealed host claim's name is put in. Frozen.
pub const HOST_MAGIC: [u8; 8] = *b"CFHOST\0\0";
/// Version of that envelope.
pub const HOST_VERSION: u32 = 1;

/// True when `name` is a coordination file [`SealedState`] seals.
pub fn is_sealed_state(name: &str) -> bool {
    SEALED_STATE_DIRS.iter().any(|d| name.starts_with(d))
}

/// `store` as an encrypted shared vault's code must see it: with `keys`,
/// its coordination files sealed ([`SealedState`]); without, as it is.
pub fn wrap(store: SharedStore, keys: Option<Arc<VaultKeys>>) -> SharedStore {
    match keys {
        Some(keys) => Arc::new(SealedState { inner: store, keys }),
        None => store,
    }
}

/// A shared vault's store whose coordination files are sealed (see the
/// module docs).
pub struct SealedState {
    inner: SharedStore,
    keys: Arc<VaultKeys>,
}

impl std::fmt::Debug for SealedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedState")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl SealedState {
    fn refused(&self, name: &str, reason: String) -> StoreError {
        StoreError::CorruptFile {
            path: PathBuf::from(format!("{}/{name}", self.inner.location())),
            what: "sealed shared-vault state",
            reason,
        }
    }

    /// `bytes` of `name` as the store keeps them.
    fn seal(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
        let host;
        let plain = if name.starts_with("hosts/") {
            host = envelope::encode(&HOST_MAGIC, HOST_VERSION, bytes);
            host.as_slice()
        } else {
            bytes
        };
        sealed_file::seal(name, plain, Some(&self.keys))
            .map(|c| c.into_owned())
            .map_err(|e| self.refused(name, format!("cannot seal it: {e}")))
    }

    /// The stored bytes of `name` back as their plain form.
    fn open(&self, name: &str, stored: &[u8]) -> Result<Vec<u8>> {
        let plain = sealed_file::open(name, stored, Some(&self.keys))
            .map_err(|e| self.refused(name, e.to_string()))?
            .into_owned();
        if !name.starts_with("hosts/") {
            return Ok(plain);
        }
        envelope::decode(&HOST_MAGIC, HOST_VERSION, 4096, &plain)
            .map(|(_, b)| b.to_vec())
            .map_err(|e| self.refused(name, e.to_string()))
    }
}

impl Store for SealedState {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self, name: &str) -> Result<Box<dyn Appender>> {
        self.inner.create(name)
    }
    fn append_to(&self, name: &str, len: u64) -> Result<Box<dyn Appender>> {
        self.inner.append_to(name, len)
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(name, offset, buf)
    }
    fn will_need(&self, name: &str, offset: u64, len: u64) {
        self.inner.will_need(name, offset, len);
    }
    fn write_at(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<()> {
        self.inner.write_at(name, offset, bytes)
    }
    fn size(&self, name: &str) -> Result<Option<u64>> {
        self.inner.size(name)
    }
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        if is_sealed_state(name) {
            return self.inner.put(name, &self.seal(name, bytes)?);
        }
        self.inner.put(name, bytes)
    }
    fn put_new(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        if is_sealed_state(name) {
            return self.inner.put_new(name, &self.seal(name, bytes)?);
        }
        self.inner.put_new(name, bytes)
    }
    fn get_version(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let got = self.inner.get_version(name)?;
        match got {
            Some((b, v)) if is_sealed_state(name) => Ok(Some((self.open(name, &b)?, v))),
            other => Ok(other),
        }
    }
    fn put_if(&self, name: &str, bytes: &[u8], expected: &Version) -> Result<Option<Version>> {
        if is_sealed_state(name) {
            return self.inner.put_if(name, &self.seal(name, bytes)?, expected);
        }
        self.inner.put_if(name, bytes, expected)
    }
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let got = self.inner.get(name)?;
        match got {
            Some(b) if is_sealed_state(name) => Ok(Some(self.open(name, &b)?)),
            other => Ok(other),
        }
    }
    fn list(&self, dir: &str) -> Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn delete(&self, name: &str) -> Result<bool> {
        self.inner.delete(name)
    }
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        // Sealed under its name: moved, it would not open under the new
        // one. Only coordination files need the round trip.
        if is_sealed_state(from) || is_sealed_state(to) {
            let Some(bytes) = self.get(from)? else {
                return Ok(());
            };
            self.put(to, &bytes)?;
            self.delete(from)?;
            return Ok(());
        }
        self.inner.rename(from, to)
    }
    fn link(&self, name: &str, from: &std::path::Path) -> Result<bool> {
        self.inner.link(name, from)
    }
    fn truncate(&self, name: &str, len: u64) -> Result<()> {
        self.inner.truncate(name, len)
    }
    fn punch(&self, name: &str, offset: u64, len: u64) -> Result<bool> {
        self.inner.punch(name, offset, len)
    }
    fn forget(&self) {
        self.inner.forget();
    }
    fn space(&self) -> Option<SpaceInfo> {
        self.inner.space()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crypto::{Cipher, MasterKey};
    use crate::store::LocalStore;

    fn keys() -> Arc<VaultKeys> {
        Arc::new(VaultKeys::derive(
            &MasterKey::generate().unwrap(),
            Cipher::Aes256Gcm,
        ))
    }

    #[test]
    fn coordination_files_are_sealed_and_bound_to_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let raw: SharedStore = Arc::new(LocalStore::new(dir.path()));
        let k = keys();
        let s = wrap(raw.clone(), Some(k.clone()));
        let lease = crate::format::lease::encode_lease(&crate::format::lease::Lease {
            host_tag: 7,
            session: "secret-session".into(),
            epoch_seen: 3,
            taken: jiff::Timestamp::UNIX_EPOCH,
            expires: jiff::Timestamp::UNIX_EPOCH,
        });
        s.put("leases/0007-a", &lease).unwrap();
        assert!(s.put_new("hosts/0007", b"hv-secret").unwrap());
        // At rest: neither the session nor the host name is readable.
        let stored = raw.get("leases/0007-a").unwrap().unwrap();
        assert!(!stored.windows(14).any(|w| w == b"secret-session"));
        let host = raw.get("hosts/0007").unwrap().unwrap();
        assert!(!host.windows(9).any(|w| w == b"hv-secret"));
        // Read back through the wrapper: the plain forms.
        assert_eq!(s.get("leases/0007-a").unwrap().unwrap(), lease);
        assert_eq!(s.get("hosts/0007").unwrap().unwrap(), b"hv-secret");
        let (b, v) = s.get_version("leases/0007-a").unwrap().unwrap();
        assert_eq!(b, lease);
        assert!(s.put_if("leases/0007-a", &lease, &v).unwrap().is_some());
        // Swapped to another name, a plain one planted, a flipped bit, or
        // another vault's key: refused, naming the file.
        raw.put("leases/0008-b", &stored).unwrap();
        let e = s.get("leases/0008-b").unwrap_err();
        assert!(e.to_string().contains("leases/0008-b"), "{e}");
        raw.put(
            "gc/state",
            &crate::format::lease::encode_state(&Default::default()),
        )
        .unwrap();
        assert!(s.get("gc/state").is_err());
        let mut bad = raw.get("leases/0007-a").unwrap().unwrap();
        if let Some(b) = bad.last_mut() {
            *b ^= 1;
        }
        raw.put("leases/0007-a", &bad).unwrap();
        assert!(s.get("leases/0007-a").is_err());
        s.put("leases/0007-a", &lease).unwrap();
        assert!(
            wrap(raw.clone(), Some(keys()))
                .get("leases/0007-a")
                .is_err()
        );
        // Other files pass through as they are.
        s.put("points/x", b"plain").unwrap();
        assert_eq!(raw.get("points/x").unwrap().unwrap(), b"plain");
    }
}
