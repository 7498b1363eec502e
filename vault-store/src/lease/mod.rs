//! Writer leases and the GC of shared vaults (object storage, many hosts
//! writing at once). `FORMAT.md`, "Shared vaults: leases and GC", gives the
//! argument; in short:
//!
//! - `gc/state` holds the **GC epoch** and whether a GC is marking. It
//!   changes only by conditional update (`If-Match`), so one GC runs at a
//!   time; a GC that died is taken over once its own lease has expired.
//! - A **writer** (a backup session) reads the epoch, writes its lease
//!   `leases/TAG-SESSION` recording the epoch it saw, reads the epoch again
//!   (retrying until it is stable), and then reads every **condemned
//!   list** `gc/condemned/EPOCH`. It never deduplicates against a chunk in
//!   a condemned segment: such chunks are stored again, like damaged ones.
//!   Before it commits it checks that its lease has not expired, and it
//!   renews the lease as it goes; once the manifest is in the store it
//!   renews it once more by conditional write ([`WriterLease::confirm_held`],
//!   the fence), and a refusal fails the commit. It deletes the lease when
//!   done.
//! - **GC** run `N`: (1) moves `gc/state` to epoch `N`, marking; (2) waits
//!   until every lease that saw an epoch below `N` has ended or expired;
//!   (3) rebuilds its cache from the store, so its reference counts cover
//!   every point committed by then; (4) deletes each segment of an older
//!   condemned list that is still dead; (5) writes the segments dead now
//!   as condemned list `N`; (6) goes back to idle.
//!
//! A segment is deleted only if it was dead at two marks, and every writer
//! that could have deduplicated against it either committed before the
//! second mark (so its point was marked), or read the condemned list and
//! did not use it, or lost its lease and cannot commit.
//!
//! Leases and the GC's hold on `gc/state` ([`GcHold`]) are renewed by
//! conditional writes; an expiry advances only once the store confirmed
//! the write. GC confirms its hold before every write or delete and stops
//! once it lost it; it stops before condemning anything when it could not
//! read a lease, a catalog file or a segment.

mod hold;
mod renewer;
/// The GC epoch after `epoch` (`None` when a decoded epoch is already the
/// largest: never wrap back to an epoch other hosts have seen).
pub(crate) fn next_epoch(epoch: u64) -> Option<u64> {
    epoch.checked_add(1)
}

#[cfg(test)]
pub(crate) mod testing;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::error::{Result, StoreError};
use crate::store::Store;

pub use crate::format::lease::{
    CONDEMNED_DIR, Condemned, GC_STATE, GcHolder, GcState, LEASES_DIR, Lease, decode_condemned,
    decode_lease, decode_state, encode_condemned, encode_lease, encode_state, fuzz_entry,
};
pub use hold::GcHold;
pub use writer::WriterLease;

/// Default lifetime of a lease; renewed at half-life.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(600);
/// Safety margin: a writer stops committing this long before its lease
/// expires (bounds the clock skew between hosts, see FORMAT.md).
pub const CLOCK_MARGIN: Duration = Duration::from_secs(30);

/// The time source of leases (injected; tests pass their own).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Timestamp::now)
}

fn read_state(store: &dyn Store) -> Result<(GcState, Option<crate::store::Version>)> {
    match store.get_version(GC_STATE)? {
        Some((b, v)) => Ok((decode_state(&b, GC_STATE)?, Some(v))),
        None => Ok((GcState::default(), None)),
    }
}

/// The GC state of a shared vault (idle at epoch 0 when none ran).
pub fn gc_state(store: &dyn Store) -> Result<GcState> {
    Ok(read_state(store)?.0)
}

fn to_signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// Every condemned list in the store.
pub fn condemned_lists(store: &dyn Store) -> Result<Vec<(String, Condemned)>> {
    let mut out = Vec::new();
    for n in store.list(CONDEMNED_DIR)? {
        if n.ends_with('/') {
            continue;
        }
        let name = crate::store::join(CONDEMNED_DIR, &n);
        if let Some(b) = store.get(&name)? {
            out.push((name.clone(), decode_condemned(&b, &name)?));
        }
    }
    Ok(out)
}

/// Every lease in the store (`vault show`): one that cannot be decoded is
/// skipped with a warning. GC uses [`leases_or_refuse`].
pub fn leases(store: &dyn Store) -> Result<Vec<(String, Lease)>> {
    let (good, bad) = read_leases(store)?;
    for (name, e) in bad {
        tracing::warn!(lease = %name, error = %e, "ignoring an unreadable lease");
    }
    Ok(good)
}

/// Leases read (name, lease) and those that cannot be decoded (name,
/// problem).
type ReadLeases = (Vec<(String, Lease)>, Vec<(String, String)>);

/// Every lease in the store, and those that cannot be decoded.
fn read_leases(store: &dyn Store) -> Result<ReadLeases> {
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for n in store.list(LEASES_DIR)? {
        if n.ends_with('/') {
            continue;
        }
        let name = crate::store::join(LEASES_DIR, &n);
        // A sealed lease that does not open (an encrypted vault's,
        // `crate::copies::sealed_state`) is unreadable like a damaged one.
        match store.get(&name) {
            Ok(Some(b)) => match decode_lease(&b, &name) {
                Ok(l) => good.push((name, l)),
                Err(e) => bad.push((name, e.to_string())),
            },
            Ok(None) => {}
            Err(e @ crate::error::StoreError::CorruptFile { .. }) => {
                bad.push((name, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((good, bad))
}

/// Every lease in the store, for GC: a lease it cannot decode may be a
/// running writer's, so it is a reason to stop (naming the files), never
/// one to ignore.
pub fn leases_or_refuse(store: &dyn Store) -> Result<Vec<(String, Lease)>> {
    let (good, bad) = read_leases(store)?;
    if bad.is_empty() {
        return Ok(good);
    }
    let names: Vec<String> = bad.iter().map(|(n, e)| format!("{n} ({e})")).collect();
    Err(StoreError::GcIncomplete {
        url: store.location(),
        reason: format!(
            "unreadable writer leases: {}; a writer may hold them. Once no backup of that host (the first 4 hex digits) runs, delete them from the store and run gc again",
            names.join(", ")
        ),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_gc_cannot_read_stops_it_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::LocalStore::new(dir.path());
        store.put("leases/0001-feed", b"not a lease").unwrap();
        assert!(leases(&store).unwrap().is_empty(), "vault show skips it");
        let e = leases_or_refuse(&store).unwrap_err();
        assert!(matches!(e, StoreError::GcIncomplete { .. }), "{e}");
        assert!(e.to_string().contains("leases/0001-feed"), "{e}");
    }
}
