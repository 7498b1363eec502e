//! [`WriterLease`]: a writer's lease on a shared vault, taken before a
//! write session, renewed as it runs, and confirmed after the manifest is
//! in the store (the fence).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

use super::renewer::Renewer;
use super::{CLOCK_MARGIN, Clock, condemned_lists, read_state, to_signed};
use crate::error::{Result, StoreError};
use crate::format::lease::{LEASES_DIR, Lease, encode_lease};
use crate::store::Store;

/// A writer's lease, held while a write session of a shared vault runs.
pub struct WriterLease {
    store: crate::store::SharedStore,
    name: String,
    held: Arc<std::sync::Mutex<Held>>,
    ttl: Duration,
    clock: Clock,
    released: bool,
    /// The renewer: a thread that extends the lease every third of its
    /// life for as long as the session runs.
    renewer: Renewer,
}

/// A writer's lease as the store last confirmed it.
#[derive(Debug)]
struct Held {
    /// The lease; `expires` is what the store holds.
    lease: Lease,
    /// Its version in the store, for the conditional renewal.
    version: crate::store::Version,
    /// Set when a renewal was refused (the object changed or is gone: a
    /// GC removed it as expired): the lease is lost for good.
    lost: Option<String>,
}

/// Renews the lease once: writes it with a new expiry, conditionally on
/// the version this writer last wrote, and advances the expiry in memory
/// only once the store confirmed the write. `Ok(false)` when the lease
/// had expired or was lost (it is never brought back). The lock is held
/// across the request, so two renewals never race each other.
fn renew_once(
    store: &dyn Store,
    name: &str,
    held: &std::sync::Mutex<Held>,
    ttl: Duration,
    clock: &Clock,
) -> Result<bool> {
    let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
    let now = clock();
    if h.lost.is_some() || now >= h.lease.expires {
        return Ok(false);
    }
    let mut next = h.lease.clone();
    next.expires = now + to_signed(ttl);
    match store.put_if(name, &encode_lease(&next), &h.version)? {
        Some(v) => {
            h.version = v;
            if next.expires > h.lease.expires {
                h.lease.expires = next.expires;
            }
            Ok(true)
        }
        None => {
            h.lost = Some(
                "the store refused its renewal: the lease object changed or is gone (a GC removed it as expired)"
                    .into(),
            );
            Ok(false)
        }
    }
}

impl std::fmt::Debug for WriterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterLease")
            .field("name", &self.name)
            .finish()
    }
}

impl WriterLease {
    /// Takes a lease for host `tag` and returns it with the segments no
    /// write may deduplicate against (every condemned list) and the
    /// segments the store holds (any other the cache knows is gone).
    pub fn take(
        store: crate::store::SharedStore,
        tag: u16,
        ttl: Duration,
        clock: Clock,
    ) -> Result<(WriterLease, HashSet<u64>, HashSet<u64>)> {
        let now = clock();
        let seed = [
            now.as_nanosecond().to_le_bytes(),
            u128::from(std::process::id()).to_le_bytes(),
        ]
        .concat();
        let session: String = blake3::hash(&seed).to_hex().chars().take(16).collect();
        let name = format!("{LEASES_DIR}/{tag:04x}-{session}");
        let mut epoch = read_state(store.as_ref())?.0.epoch;
        let mut lease = Lease {
            host_tag: tag,
            session,
            epoch_seen: epoch,
            taken: now,
            expires: now + to_signed(ttl),
        };
        loop {
            lease.epoch_seen = epoch;
            store.put(&name, &encode_lease(&lease))?;
            let again = read_state(store.as_ref())?.0.epoch;
            if again == epoch {
                break;
            }
            epoch = again;
        }
        // The version renewals are conditional on (only this writer
        // writes the lease; a GC may delete it once it expired).
        let Some((_, version)) = store.get_version(&name)? else {
            return Err(StoreError::LeaseExpired {
                lease: format!("{}/{name}", store.location()),
                expired: "its creation (the lease object vanished at once)".into(),
            });
        };
        let mut condemned = HashSet::new();
        for (_, c) in condemned_lists(store.as_ref())? {
            condemned.extend(c.segments);
        }
        // A GC may have deleted segments (and then their condemned list)
        // since this host's cache was refreshed: listed after the lists,
        // the segments still present tell.
        let present: HashSet<u64> = store
            .list(crate::format::segment::SEGMENTS_DIR)?
            .iter()
            .filter_map(|n| crate::format::segment::parse_segment_file_name(n))
            .collect();
        let held = Arc::new(std::sync::Mutex::new(Held {
            lease,
            version,
            lost: None,
        }));
        // Renewed every third of its life; never past an expiry it
        // missed (the writer then fails its commit check instead).
        let renewer = {
            let (store, owned, held, clock) =
                (store.clone(), name.clone(), held.clone(), clock.clone());
            Renewer::spawn("coffre-lease", ttl / 3, move || {
                match renew_once(store.as_ref(), &owned, &held, ttl, &clock) {
                    Ok(renewed) => renewed,
                    Err(e) => {
                        tracing::warn!(lease = %owned, error = %e, "could not renew the writer lease; retrying");
                        true
                    }
                }
            })
            .map_err(|e| StoreError::io("start the lease renewer", std::path::Path::new(&name), e))?
        };
        Ok((
            WriterLease {
                store,
                name,
                held,
                ttl,
                clock,
                released: false,
                renewer,
            },
            condemned,
            present,
        ))
    }

    /// Refuses once the lease is about to expire, or was lost (a GC may
    /// then act as if this writer were gone); the renewer keeps it from
    /// expiring while the session runs. Only an expiry the store
    /// confirmed counts.
    pub fn check_and_renew(&mut self) -> Result<()> {
        let now = (self.clock)();
        let h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &h.lost {
            return Err(StoreError::LeaseExpired {
                lease: format!("{}/{}", self.store.location(), self.name),
                expired: format!("{} ({why})", h.lease.expires),
            });
        }
        if now + to_signed(CLOCK_MARGIN.min(self.ttl / 4)) >= h.lease.expires {
            return Err(StoreError::LeaseExpired {
                lease: format!("{}/{}", self.store.location(), self.name),
                expired: h.lease.expires.to_string(),
            });
        }
        Ok(())
    }

    /// Renews the lease now (what the renewer does every third of its
    /// life); `Ok(false)` when it had expired or was lost.
    pub fn renew_now(&self) -> Result<bool> {
        renew_once(
            self.store.as_ref(),
            &self.name,
            &self.held,
            self.ttl,
            &self.clock,
        )
    }

    /// Proves after the fact that the lease was held all along, by one
    /// conditional renewal. A commit calls it once its manifest is in the
    /// store: success means no GC removed the lease before the manifest
    /// was there for its mark to count, so no GC deleted a segment the
    /// commit relies on. A writer that stalled past its lease (a GC took
    /// it away meanwhile) fails here, even if its last local check passed.
    pub fn confirm_held(&self) -> Result<()> {
        if self.renew_now()? {
            return Ok(());
        }
        let h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        Err(StoreError::LeaseExpired {
            lease: format!("{}/{}", self.store.location(), self.name),
            expired: format!(
                "{} ({})",
                h.lease.expires,
                h.lost
                    .as_deref()
                    .unwrap_or("it ran out before the commit was confirmed")
            ),
        })
    }

    /// When the lease expires, as the store last confirmed it.
    pub fn expires(&self) -> Timestamp {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lease
            .expires
    }

    /// Ends the lease.
    pub fn release(mut self) -> Result<()> {
        self.renewer.stop();
        self.released = true;
        self.store.delete(&self.name).map(|_| ())
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        self.renewer.stop();
        if !self.released
            && let Err(e) = self.store.delete(&self.name)
        {
            tracing::warn!(lease = %self.name, error = %e, "could not end the lease; it expires by itself");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format::lease::decode_lease;
    use crate::lease::testing::{at, manual};

    /// A local store whose puts fail while `fail` is set.
    #[derive(Debug)]
    struct FlakyPuts {
        inner: crate::store::LocalStore,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Store for FlakyPuts {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn create(&self, name: &str) -> Result<Box<dyn crate::store::Appender>> {
            self.inner.create(name)
        }
        fn append_to(&self, name: &str, len: u64) -> Result<Box<dyn crate::store::Appender>> {
            self.inner.append_to(name, len)
        }
        fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.inner.read_at(name, offset, buf)
        }
        fn write_at(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<()> {
            self.inner.write_at(name, offset, bytes)
        }
        fn size(&self, name: &str) -> Result<Option<u64>> {
            self.inner.size(name)
        }
        fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Object {
                    url: name.into(),
                    op: "put",
                    reason: "injected failure".into(),
                });
            }
            self.inner.put(name, bytes)
        }
        fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
            self.inner.get(name)
        }
        fn list(&self, dir: &str) -> Result<Vec<String>> {
            self.inner.list(dir)
        }
        fn delete(&self, name: &str) -> Result<bool> {
            self.inner.delete(name)
        }
        fn truncate(&self, name: &str, len: u64) -> Result<()> {
            self.inner.truncate(name, len)
        }
        fn punch(&self, name: &str, offset: u64, len: u64) -> Result<bool> {
            self.inner.punch(name, offset, len)
        }
        fn forget(&self) {
            self.inner.forget()
        }
        fn space(&self) -> Option<crate::store::SpaceInfo> {
            None
        }
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_writer_whose_lease_a_gc_removed_cannot_confirm_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::LocalStore::new(dir.path()));
        let (clock, now) = manual(at(0));
        let (mut lease, _, _) = WriterLease::take(store.clone(), 1, TTL, clock).unwrap();
        *now.lock().unwrap() = at(10);
        lease.confirm_held().unwrap();
        assert_eq!(lease.expires(), at(70));
        // The writer stalled past its lease; a GC removed it meanwhile.
        store.delete(&lease.name).unwrap();
        // Its own clock and memory see nothing wrong: only the store knows.
        lease.check_and_renew().unwrap();
        assert!(matches!(
            lease.confirm_held(),
            Err(StoreError::LeaseExpired { .. })
        ));
        // And it stays lost: a later check refuses too.
        assert!(lease.check_and_renew().is_err());
    }

    #[test]
    fn a_renewal_the_store_did_not_confirm_never_advances_the_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FlakyPuts {
            inner: crate::store::LocalStore::new(dir.path()),
            fail: false.into(),
        });
        let (clock, now) = manual(at(0));
        let (mut lease, _, _) = WriterLease::take(store.clone(), 1, TTL, clock).unwrap();
        assert_eq!(lease.expires(), at(60));
        *now.lock().unwrap() = at(20);
        store.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(lease.renew_now().is_err(), "the put failed");
        assert_eq!(lease.expires(), at(60), "not confirmed, not advanced");
        // Still refused where the store's expiry says so.
        *now.lock().unwrap() = at(50);
        assert!(matches!(
            lease.check_and_renew(),
            Err(StoreError::LeaseExpired { .. })
        ));
        *now.lock().unwrap() = at(30);
        store
            .fail
            .store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(lease.renew_now().unwrap());
        assert_eq!(lease.expires(), at(90), "confirmed, advanced");
        let stored: Lease =
            decode_lease(&store.get(&lease.name).unwrap().unwrap(), "lease").unwrap();
        assert_eq!(stored.expires, at(90));
        lease.check_and_renew().unwrap();
    }

    #[test]
    fn a_lease_a_gc_removed_is_lost_and_never_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: crate::store::SharedStore = Arc::new(crate::store::LocalStore::new(dir.path()));
        let (clock, now) = manual(at(0));
        let (mut lease, _, _) = WriterLease::take(store.clone(), 1, TTL, clock).unwrap();
        // A GC removed it (it believed the lease expired).
        assert!(store.delete(&lease.name).unwrap());
        *now.lock().unwrap() = at(10);
        assert!(!lease.renew_now().unwrap(), "refused: the object is gone");
        assert_eq!(store.get(&lease.name).unwrap(), None, "not written back");
        assert_eq!(lease.expires(), at(60));
        assert!(matches!(
            lease.check_and_renew(),
            Err(StoreError::LeaseExpired { .. })
        ));
    }
}
