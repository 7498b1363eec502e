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

#[cfg(feature = "index")]
use std::collections::BTreeSet;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
#[cfg(feature = "index")]
use std::time::Instant;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::format::envelope;
use crate::store::Store;

/// The GC state object.
pub const GC_STATE: &str = "gc/state";
/// Folder of the writers' leases.
pub const LEASES_DIR: &str = "leases";
/// Folder of the condemned lists.
pub const CONDEMNED_DIR: &str = "gc/condemned";
/// Default lifetime of a lease; renewed at half-life.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(600);
/// Safety margin: a writer stops committing this long before its lease
/// expires (bounds the clock skew between hosts, see FORMAT.md).
pub const CLOCK_MARGIN: Duration = Duration::from_secs(30);

const LEASE_MAGIC: [u8; 8] = *b"CFLEASE\0";
const STATE_MAGIC: [u8; 8] = *b"CFGCSTAT";
const CONDEMNED_MAGIC: [u8; 8] = *b"CFCONDMN";
const VERSION: u32 = 1;
const MAX_BODY: usize = 16 << 20;

/// The time source of leases (injected; tests pass their own).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Timestamp::now)
}

/// `gc/state`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    /// The newest GC epoch.
    pub epoch: u64,
    /// The GC of `epoch`, while it marks and sweeps: who and until when.
    pub marking: Option<GcHolder>,
}

/// The GC holding `gc/state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcHolder {
    /// Host tag.
    pub host_tag: u16,
    /// Its lease ends here; another GC may take over after.
    pub until: Timestamp,
}

/// A writer's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Host tag.
    pub host_tag: u16,
    /// The session (random).
    pub session: String,
    /// The GC epoch the writer saw when it started.
    pub epoch_seen: u64,
    /// When it was taken.
    pub taken: Timestamp,
    /// When it expires unless renewed.
    pub expires: Timestamp,
}

/// A condemned list: segments that were dead at the mark of `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condemned {
    /// The GC run that wrote it.
    pub epoch: u64,
    /// Segment ids.
    pub segments: Vec<u64>,
}

fn encode<T: Serialize>(magic: &[u8; 8], v: &T) -> Vec<u8> {
    envelope::encode(magic, VERSION, &serde_json::to_vec(v).unwrap_or_default())
}

fn decode<T: for<'a> Deserialize<'a>>(magic: &[u8; 8], bytes: &[u8], what: &str) -> Result<T> {
    let bad = |reason: String| StoreError::CorruptFile {
        path: what.into(),
        what: "shared-vault state",
        reason,
    };
    let (_, body) =
        envelope::decode(magic, VERSION, MAX_BODY, bytes).map_err(|e| bad(e.to_string()))?;
    serde_json::from_slice(body).map_err(|e| bad(e.to_string()))
}

/// Encodes a lease (fuzz seeds, tests).
pub fn encode_lease(l: &Lease) -> Vec<u8> {
    encode(&LEASE_MAGIC, l)
}

/// Encodes the GC state.
pub fn encode_state(s: &GcState) -> Vec<u8> {
    encode(&STATE_MAGIC, s)
}

/// Encodes a condemned list.
pub fn encode_condemned(c: &Condemned) -> Vec<u8> {
    encode(&CONDEMNED_MAGIC, c)
}

/// Fuzz entry point: decodes arbitrary bytes as each of the three files;
/// never panics.
pub fn fuzz_entry(data: &[u8]) -> bool {
    decode::<Lease>(&LEASE_MAGIC, data, "fuzz").is_ok()
        | decode::<GcState>(&STATE_MAGIC, data, "fuzz").is_ok()
        | decode::<Condemned>(&CONDEMNED_MAGIC, data, "fuzz").is_ok()
}

fn read_state(store: &dyn Store) -> Result<(GcState, Option<crate::store::Version>)> {
    match store.get_version(GC_STATE)? {
        Some((b, v)) => Ok((decode(&STATE_MAGIC, &b, GC_STATE)?, Some(v))),
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
            out.push((name.clone(), decode(&CONDEMNED_MAGIC, &b, &name)?));
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
        if let Some(b) = store.get(&name)? {
            match decode(&LEASE_MAGIC, &b, &name) {
                Ok(l) => good.push((name, l)),
                Err(e) => bad.push((name, e.to_string())),
            }
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
    match store.put_if(name, &encode(&LEASE_MAGIC, &next), &h.version)? {
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

/// A thread that calls `renew` every `period` until it is stopped (by
/// [`Renewer::stop`] or on drop) or `renew` returns false. It sleeps in
/// short steps, so stopping it takes at most one step and never waits for
/// a renewal that is not under way.
struct Renewer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Renewer {
    fn spawn(
        name: &str,
        period: Duration,
        mut renew: impl FnMut() -> bool + Send + 'static,
    ) -> std::io::Result<Renewer> {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let step = Duration::from_millis(50);
                loop {
                    let mut slept = Duration::ZERO;
                    while slept < period {
                        if stopped.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(step);
                        slept += step;
                    }
                    if stopped.load(Ordering::Relaxed) || !renew() {
                        return;
                    }
                }
            })?;
        Ok(Renewer {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop();
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
            store.put(&name, &encode(&LEASE_MAGIC, &lease))?;
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
            .map_err(|e| StoreError::io("start the lease renewer", Path::new(&name), e))?
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

/// What a shared GC run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SharedGcReport {
    /// Its epoch.
    pub epoch: u64,
    /// Leases it waited for (ended while it waited).
    pub waited_for: u64,
    /// Expired leases it removed.
    pub expired_leases: u64,
    /// Segments deleted (dead at two marks).
    pub deleted_segments: u64,
    /// Their bytes.
    pub deleted_bytes: u64,
    /// Segments condemned now (deleted by the next run if still dead).
    pub condemned_segments: u64,
    /// Wall time.
    pub duration_ms: u64,
}

/// Options of a shared GC run.
#[derive(Clone)]
pub struct SharedGcOptions {
    /// How long to wait for writers that started before the run.
    pub max_wait: Duration,
    /// The GC's own lease.
    pub ttl: Duration,
    /// Time.
    pub clock: Clock,
}

/// A GC's hold on `gc/state`: taken by a conditional write, renewed by a
/// conditional write (every third of its life by a thread, and by
/// [`GcHold::confirm`] before each step that writes or deletes), and
/// lost for good once a renewal is refused or its time ran out. Another
/// GC takes `gc/state` over only after `until`, so a confirmed renewal
/// gives this GC `ttl` of exclusive work.
pub struct GcHold {
    store: crate::store::SharedStore,
    host_tag: u16,
    epoch: u64,
    ttl: Duration,
    clock: Clock,
    state: Arc<std::sync::Mutex<HoldState>>,
    /// Renews the hold every third of its life while the run lasts.
    renewer: Renewer,
    /// The condemned lists that existed once this GC held `gc/state`: the
    /// only ones it may sweep. A list that appears later can be the late
    /// write of an earlier GC that stalled past its hold; a writer that
    /// started since may deduplicate against its segments without having
    /// seen it, so only a later GC, which waits for that writer, sweeps it.
    sweepable: std::collections::BTreeSet<String>,
}

#[derive(Debug)]
struct HoldState {
    /// The version of `gc/state` this GC last wrote.
    version: crate::store::Version,
    /// The holder's `until` in it.
    until: Timestamp,
    /// Why the hold was lost, once it was.
    lost: Option<String>,
}

impl std::fmt::Debug for GcHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcHold")
            .field("epoch", &self.epoch)
            .finish()
    }
}

/// Renews the hold once (see [`GcHold`]); the lock is held across the
/// request, so renewals never race each other.
fn renew_hold(
    store: &dyn Store,
    host_tag: u16,
    epoch: u64,
    ttl: Duration,
    clock: &Clock,
    state: &std::sync::Mutex<HoldState>,
) -> Result<()> {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let lost = |reason: String| StoreError::GcHoldLost {
        url: store.location(),
        epoch,
        reason,
    };
    if let Some(why) = &s.lost {
        return Err(lost(why.clone()));
    }
    let now = clock();
    // Past `until` (less the clock margin), another GC may have taken
    // over and be deleting by its own list.
    if now + to_signed(CLOCK_MARGIN.min(ttl / 4)) >= s.until {
        let why = format!("it lapsed at {} without a renewal", s.until);
        s.lost = Some(why.clone());
        return Err(lost(why));
    }
    let until = now + to_signed(ttl);
    let mine = GcState {
        epoch,
        marking: Some(GcHolder { host_tag, until }),
    };
    match store.put_if(GC_STATE, &encode(&STATE_MAGIC, &mine), &s.version)? {
        Some(v) => {
            s.version = v;
            s.until = until;
            Ok(())
        }
        None => {
            let why = match read_state(store) {
                Ok((st, _)) => format!(
                    "gc/state changed under it: now epoch {}{}",
                    st.epoch,
                    st.marking
                        .map(|h| format!(", held by host {:04x}", h.host_tag))
                        .unwrap_or_default()
                ),
                Err(e) => format!("gc/state changed under it ({e})"),
            };
            s.lost = Some(why.clone());
            Err(lost(why))
        }
    }
}

impl GcHold {
    /// Step (1): moves `gc/state` to the next epoch, held by host `tag`
    /// until `ttl` from now; refused while another GC holds it.
    pub fn take(
        store: crate::store::SharedStore,
        host_tag: u16,
        ttl: Duration,
        clock: Clock,
    ) -> Result<GcHold> {
        let url = store.location();
        let now = clock();
        let (state, version) = read_state(store.as_ref())?;
        if let Some(h) = &state.marking
            && h.until > now
        {
            return Err(StoreError::GcRunning {
                url,
                host_tag: h.host_tag,
                until: h.until.to_string(),
            });
        }
        let epoch = next_epoch(state.epoch).ok_or_else(|| StoreError::CorruptFile {
            path: format!("{url}/{GC_STATE}").into(),
            what: "shared-vault state",
            reason: format!("epoch {} cannot grow", state.epoch),
        })?;
        let until = now + to_signed(ttl);
        let mine = encode(
            &STATE_MAGIC,
            &GcState {
                epoch,
                marking: Some(GcHolder { host_tag, until }),
            },
        );
        let taken = match &version {
            Some(v) => store.put_if(GC_STATE, &mine, v)?,
            None => {
                if store.put_new(GC_STATE, &mine)? {
                    store
                        .get_version(GC_STATE)?
                        .filter(|(b, _)| *b == mine)
                        .map(|(_, v)| v)
                } else {
                    None
                }
            }
        };
        let Some(version) = taken else {
            return Err(StoreError::GcRunning {
                url,
                host_tag: 0,
                until: "now (another GC took gc/state first)".into(),
            });
        };
        // Listed once the hold is ours (a failure here leaves gc/state to
        // lapse at `until`, before any renewer runs).
        let sweepable = store
            .list(CONDEMNED_DIR)?
            .iter()
            .filter(|n| !n.ends_with('/'))
            .map(|n| crate::store::join(CONDEMNED_DIR, n))
            .collect();
        let state = Arc::new(std::sync::Mutex::new(HoldState {
            version,
            until,
            lost: None,
        }));
        let renewer = {
            let (store, clock, state) = (store.clone(), clock.clone(), state.clone());
            Renewer::spawn("coffre-gc-hold", ttl / 3, move || {
                match renew_hold(store.as_ref(), host_tag, epoch, ttl, &clock, &state) {
                    Ok(()) => true,
                    Err(e @ StoreError::GcHoldLost { .. }) => {
                        tracing::warn!(error = %e, "the GC lost its hold on gc/state");
                        false
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not renew the GC's hold on gc/state; retrying");
                        true
                    }
                }
            })
            .map_err(|e| StoreError::io("start the GC hold renewer", Path::new(GC_STATE), e))?
        };
        Ok(GcHold {
            store,
            host_tag,
            epoch,
            ttl,
            clock,
            state,
            renewer,
            sweepable,
        })
    }

    /// The epoch held.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Renews the hold by a conditional write of `gc/state` and so proves
    /// it is still this GC's; called before every write or delete. Err
    /// ([`StoreError::GcHoldLost`]) once the hold lapsed or another GC
    /// took over: the GC must then stop.
    pub fn confirm(&self) -> Result<()> {
        renew_hold(
            self.store.as_ref(),
            self.host_tag,
            self.epoch,
            self.ttl,
            &self.clock,
            &self.state,
        )
    }

    /// Step (6): idle again at this epoch (only if the hold is still this
    /// GC's: a conditional write).
    pub fn release(mut self) -> Result<()> {
        self.renewer.stop();
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.lost.is_some() {
            return Ok(());
        }
        let idle = GcState {
            epoch: self.epoch,
            marking: None,
        };
        self.store
            .put_if(GC_STATE, &encode(&STATE_MAGIC, &idle), &s.version)?;
        Ok(())
    }
}

/// Runs GC on the shared vault whose cache is `dir` (see the module docs).
/// It holds `gc/state` throughout ([`GcHold`]); when it stops on an error
/// it gives `gc/state` back (if still its own), so the next GC need not
/// wait for the hold to lapse.
#[cfg(feature = "index")]
pub fn run_shared_gc(dir: &Path, opts: &SharedGcOptions) -> Result<SharedGcReport> {
    let started = Instant::now();
    let remote =
        crate::format::remote::Remote::load(dir)?.ok_or_else(|| StoreError::InvalidSetting {
            field: "gc",
            reason: format!("{} is not a shared vault's cache", dir.display()),
        })?;
    let store = crate::copies::open_url(&remote.url)?;
    // (1) Take gc/state.
    let hold = GcHold::take(store.clone(), remote.host_tag, opts.ttl, opts.clock.clone())?;
    let mut report = SharedGcReport {
        epoch: hold.epoch(),
        ..SharedGcReport::default()
    };
    match gc_steps(dir, store.as_ref(), &hold, opts, &mut report) {
        Ok(()) => {
            // (6) Idle again.
            hold.release()?;
            report.duration_ms = started.elapsed().as_millis() as u64;
            Ok(report)
        }
        Err(e) => {
            if let Err(r) = hold.release() {
                tracing::warn!(error = %r, "could not give gc/state back; it lapses by itself");
            }
            Err(e)
        }
    }
}

/// Steps (2) to (5) of a shared GC run, under `hold`.
#[cfg(feature = "index")]
fn gc_steps(
    dir: &Path,
    store: &dyn Store,
    hold: &GcHold,
    opts: &SharedGcOptions,
    report: &mut SharedGcReport,
) -> Result<()> {
    let epoch = hold.epoch();
    // (2) Wait for the writers that started before this epoch. A lease
    // that cannot be read may be a running writer's: stop.
    let deadline = Instant::now() + opts.max_wait;
    let mut waited: BTreeSet<String> = BTreeSet::new();
    loop {
        let now = (opts.clock)();
        let mut blocking = 0;
        for (name, l) in leases_or_refuse(store)? {
            if l.epoch_seen >= epoch {
                continue;
            }
            if l.expires <= now {
                hold.confirm()?;
                store.delete(&name)?;
                report.expired_leases += 1;
                tracing::info!(lease = %name, "removed an expired writer lease");
                continue;
            }
            waited.insert(name);
            blocking += 1;
        }
        if blocking == 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(StoreError::GcRunning {
                url: store.location(),
                host_tag: hold.host_tag,
                until: format!(
                    "{blocking} writers are still running after {:?}; nothing was deleted",
                    opts.max_wait
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    report.waited_for = waited.len() as u64;
    // (3) Mark: the cache rebuilt from the store counts every point.
    let (dead, sizes) = mark(dir, store)?;
    // (4) and (5).
    sweep_and_condemn(store, hold, &dead, &sizes, report)
}

/// Step (3): rebuilds the cache at `dir` from the store and returns the
/// segments no referenced chunk lives in, with their sizes. Refuses
/// (nothing condemned) when the rebuild could not decode a catalog file
/// (the chunks of a point it cannot read would look dead) or read a
/// segment (its chunks would be missing from the count).
#[cfg(feature = "index")]
fn mark(
    dir: &Path,
    store: &dyn Store,
) -> Result<(BTreeSet<u64>, std::collections::HashMap<u64, u64>)> {
    let (vault, rebuilt) =
        crate::maintenance::rebuild::rebuild_index(dir, dir, Duration::from_secs(60))?;
    check_rebuild(store, &rebuilt)?;
    let index = vault.index();
    let referenced = |id: &crate::ChunkId| -> Result<bool> {
        Ok(index.chunk_ref(id)?.is_some_and(|r| r.count > 0))
    };
    // A segment lives while it holds a copy of a referenced chunk: the
    // one this index uses, or a duplicate another host's cache may use.
    let mut live: BTreeSet<u64> = BTreeSet::new();
    for (seg, id) in &rebuilt.duplicate_places {
        if !live.contains(seg) && referenced(id)? {
            live.insert(*seg);
        }
    }
    let mut dead: BTreeSet<u64> = BTreeSet::new();
    let mut sizes = std::collections::HashMap::new();
    for (seg, info) in index.segment_infos()? {
        sizes.insert(seg, info.committed);
        if live.contains(&seg) {
            continue;
        }
        let mut used = false;
        for (_, id) in index.segment_chunks(seg)? {
            if referenced(&id)? {
                used = true;
                break;
            }
        }
        if !used {
            dead.insert(seg);
        }
    }
    Ok((dead, sizes))
}

/// GC marks only on complete knowledge: every catalog file decoded and
/// every segment read to its end.
#[cfg(feature = "index")]
fn check_rebuild(
    store: &dyn Store,
    rebuilt: &crate::maintenance::rebuild::RebuildReport,
) -> Result<()> {
    let mut problems = Vec::new();
    if !rebuilt.bad_files.is_empty() {
        problems.push(format!(
            "catalog files it cannot decode: {} (their points' chunks would look unreferenced; repair or remove them, then run gc again)",
            rebuilt.bad_files.join(", ")
        ));
    }
    if !rebuilt.unreadable_segments.is_empty() {
        problems.push(format!(
            "segments it could not read: {} (run gc again once the store answers)",
            rebuilt.unreadable_segments.join(", ")
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(StoreError::GcIncomplete {
        url: store.location(),
        reason: problems.join("; "),
    })
}

/// Steps (4) and (5): deletes each segment of an older condemned list
/// that is still `dead`, then writes the segments dead now as condemned
/// list `epoch`. Every write and delete comes after a confirmed renewal
/// of `hold`; once it is lost, nothing more is written or deleted.
pub fn sweep_and_condemn(
    store: &dyn Store,
    hold: &GcHold,
    dead: &std::collections::BTreeSet<u64>,
    sizes: &std::collections::HashMap<u64, u64>,
    report: &mut SharedGcReport,
) -> Result<()> {
    let epoch = hold.epoch();
    // (4) Sweep what was condemned before and is still dead.
    let mut deleted = std::collections::BTreeSet::new();
    for (name, list) in condemned_lists(store)? {
        if list.epoch >= epoch || !hold.sweepable.contains(&name) {
            continue;
        }
        for seg in list.segments {
            if dead.contains(&seg) && !deleted.contains(&seg) {
                hold.confirm()?;
                if store.delete(&crate::format::segment::segment_name(seg))? {
                    report.deleted_segments += 1;
                    report.deleted_bytes += sizes.get(&seg).copied().unwrap_or(0);
                }
                // Its chunk lists go with it (after it: a list never names
                // a segment that is still there but unlisted).
                let lists = format!("{}/{seg:016x}", crate::format::chunk_list::CHUNK_LISTS_DIR);
                for n in store.list(&lists)? {
                    store.delete(&crate::store::join(&lists, &n))?;
                }
                deleted.insert(seg);
            }
        }
        hold.confirm()?;
        store.delete(&name)?;
    }
    // (5) Condemn what is dead now, once the hold is proven still ours.
    let condemned: Vec<u64> = dead.difference(&deleted).copied().collect();
    report.condemned_segments = condemned.len() as u64;
    if !condemned.is_empty() {
        hold.confirm()?;
        store.put(
            &format!("{CONDEMNED_DIR}/{epoch:016x}"),
            &encode(
                &CONDEMNED_MAGIC,
                &Condemned {
                    epoch,
                    segments: condemned,
                },
            ),
        )?;
    }
    Ok(())
}

/// The GC epoch after `epoch` (`None` when a decoded epoch is already the
/// largest: never wrap back to an epoch other hosts have seen).
fn next_epoch(epoch: u64) -> Option<u64> {
    epoch.checked_add(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_epoch_does_not_wrap() {
        assert_eq!(next_epoch(7), Some(8));
        assert_eq!(next_epoch(u64::MAX), None);
    }

    #[test]
    fn state_files_round_trip_and_reject_damage() {
        let l = Lease {
            host_tag: 3,
            session: "ab".into(),
            epoch_seen: 7,
            taken: Timestamp::UNIX_EPOCH,
            expires: Timestamp::UNIX_EPOCH,
        };
        let b = encode(&LEASE_MAGIC, &l);
        assert_eq!(decode::<Lease>(&LEASE_MAGIC, &b, "x").unwrap(), l);
        let mut bad = b.clone();
        if let Some(x) = bad.last_mut() {
            *x ^= 1;
        }
        assert!(decode::<Lease>(&LEASE_MAGIC, &bad, "x").is_err());
        assert!(
            decode::<GcState>(&STATE_MAGIC, &b, "x").is_err(),
            "wrong magic"
        );
        assert!(!fuzz_entry(&bad));
    }

    /// A clock tests move by hand.
    fn manual(at: Timestamp) -> (Clock, Arc<std::sync::Mutex<Timestamp>>) {
        let t = Arc::new(std::sync::Mutex::new(at));
        let c = t.clone();
        (Arc::new(move || *c.lock().unwrap()), t)
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

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
        let stored: Lease = decode(
            &LEASE_MAGIC,
            &store.get(&lease.name).unwrap().unwrap(),
            "lease",
        )
        .unwrap();
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

    #[cfg(feature = "object")]
    fn memory_vault(condemned: &[u64]) -> crate::store::SharedStore {
        let store: crate::store::SharedStore =
            Arc::new(crate::store::object::ObjectStoreCopy::open("memory://v").unwrap());
        for seg in condemned {
            let mut a = store
                .create(&crate::format::segment::segment_name(*seg))
                .unwrap();
            a.append(&[7u8; 100]).unwrap();
            a.sync().unwrap();
        }
        store
            .put(
                &format!("{CONDEMNED_DIR}/{:016x}", 1),
                &encode_condemned(&Condemned {
                    epoch: 1,
                    segments: condemned.to_vec(),
                }),
            )
            .unwrap();
        store
            .put(
                GC_STATE,
                &encode_state(&GcState {
                    epoch: 1,
                    marking: None,
                }),
            )
            .unwrap();
        store
    }

    #[cfg(feature = "object")]
    fn untouched(store: &dyn Store, seg: u64, epoch: u64) {
        assert!(
            store
                .size(&crate::format::segment::segment_name(seg))
                .unwrap()
                .is_some(),
            "segment {seg} deleted"
        );
        assert!(
            store
                .get(&format!("{CONDEMNED_DIR}/{:016x}", 1))
                .unwrap()
                .is_some(),
            "condemned list 1 deleted"
        );
        assert_eq!(
            store.get(&format!("{CONDEMNED_DIR}/{epoch:016x}")).unwrap(),
            None,
            "condemned list {epoch} written"
        );
    }

    #[cfg(feature = "object")]
    #[test]
    fn a_condemned_list_written_after_the_hold_was_taken_is_not_swept() {
        // No list yet when B takes gc/state; then a GC that stalled past
        // its hold writes list 1 late, naming segment 7, which a writer
        // that started under B's epoch may have deduplicated against.
        let store = memory_vault(&[]);
        store
            .put(
                GC_STATE,
                &encode_state(&GcState {
                    epoch: 5,
                    marking: None,
                }),
            )
            .unwrap();
        let mut a = store
            .create(&crate::format::segment::segment_name(7))
            .unwrap();
        a.append(&[7u8; 100]).unwrap();
        a.sync().unwrap();
        let (clock, _) = manual(at(0));
        let b = GcHold::take(store.clone(), 2, TTL, clock).unwrap();
        assert_eq!(b.epoch(), 6);
        store
            .put(
                &format!("{CONDEMNED_DIR}/{:016x}", 4),
                &encode_condemned(&Condemned {
                    epoch: 4,
                    segments: vec![7],
                }),
            )
            .unwrap();
        let dead: std::collections::BTreeSet<u64> = [7u64].into_iter().collect();
        let mut report = SharedGcReport::default();
        sweep_and_condemn(
            store.as_ref(),
            &b,
            &dead,
            &std::collections::HashMap::new(),
            &mut report,
        )
        .unwrap();
        assert_eq!(report.deleted_segments, 0, "{report:?}");
        assert!(
            store
                .size(&crate::format::segment::segment_name(7))
                .unwrap()
                .is_some(),
            "the late list's segment was deleted"
        );
        assert!(
            store
                .get(&format!("{CONDEMNED_DIR}/{:016x}", 4))
                .unwrap()
                .is_some(),
            "the late list was swept"
        );
        b.release().unwrap();
    }

    #[cfg(feature = "object")]
    #[test]
    fn a_gc_whose_hold_was_taken_over_writes_and_deletes_nothing() {
        let store = memory_vault(&[7]);
        let (clock_a, _) = manual(at(0));
        let a = GcHold::take(store.clone(), 1, TTL, clock_a).unwrap();
        assert_eq!(a.epoch(), 2);
        // A second GC, two minutes later by its clock: A's hold lapsed.
        let (clock_b, _) = manual(at(120));
        let b = GcHold::take(store.clone(), 2, TTL, clock_b).unwrap();
        assert_eq!(b.epoch(), 3);
        let dead: std::collections::BTreeSet<u64> = [7u64, 8].into_iter().collect();
        let sizes = std::collections::HashMap::new();
        let mut report = SharedGcReport::default();
        let e = sweep_and_condemn(store.as_ref(), &a, &dead, &sizes, &mut report).unwrap_err();
        assert!(matches!(e, StoreError::GcHoldLost { epoch: 2, .. }), "{e}");
        assert!(e.to_string().contains("epoch 3"), "{e}");
        untouched(store.as_ref(), 7, 2);
        assert_eq!(report.deleted_segments, 0);
        // A lost hold stays lost, and releasing it leaves B's state alone.
        assert!(a.confirm().is_err());
        a.release().unwrap();
        assert_eq!(gc_state(store.as_ref()).unwrap().epoch, 3);
        // B, holding, does the work.
        let mut report = SharedGcReport::default();
        sweep_and_condemn(store.as_ref(), &b, &dead, &sizes, &mut report).unwrap();
        assert_eq!(report.deleted_segments, 1);
        assert_eq!(
            store
                .size(&crate::format::segment::segment_name(7))
                .unwrap(),
            None
        );
        let lists = condemned_lists(store.as_ref()).unwrap();
        assert_eq!(lists.len(), 1);
        assert_eq!(lists[0].1.epoch, 3);
        assert_eq!(lists[0].1.segments, vec![8]);
        b.release().unwrap();
        assert_eq!(gc_state(store.as_ref()).unwrap().marking, None);
    }

    #[cfg(feature = "object")]
    #[test]
    fn a_gc_whose_hold_lapsed_by_its_own_clock_stops() {
        let store = memory_vault(&[7]);
        let (clock, now) = manual(at(0));
        let a = GcHold::take(store.clone(), 1, TTL, clock).unwrap();
        // Within the clock margin of `until`: another GC may take over.
        *now.lock().unwrap() = at(50);
        let dead: std::collections::BTreeSet<u64> = [7u64, 8].into_iter().collect();
        let mut report = SharedGcReport::default();
        let e = sweep_and_condemn(
            store.as_ref(),
            &a,
            &dead,
            &std::collections::HashMap::new(),
            &mut report,
        )
        .unwrap_err();
        assert!(matches!(e, StoreError::GcHoldLost { .. }), "{e}");
        untouched(store.as_ref(), 7, 2);
    }

    #[cfg(feature = "object")]
    #[test]
    fn a_renewed_hold_keeps_a_second_gc_out() {
        let store = memory_vault(&[]);
        let (clock_a, now_a) = manual(at(0));
        let a = GcHold::take(store.clone(), 1, TTL, clock_a).unwrap();
        let (clock_b, now_b) = manual(at(30));
        assert!(matches!(
            GcHold::take(store.clone(), 2, TTL, clock_b.clone()),
            Err(StoreError::GcRunning { host_tag: 1, .. })
        ));
        // Renewed at 40: held until 100, so B at 90 is still refused.
        *now_a.lock().unwrap() = at(40);
        a.confirm().unwrap();
        *now_b.lock().unwrap() = at(90);
        assert!(matches!(
            GcHold::take(store.clone(), 2, TTL, clock_b.clone()),
            Err(StoreError::GcRunning { .. })
        ));
        a.release().unwrap();
        let b = GcHold::take(store.clone(), 2, TTL, clock_b).unwrap();
        assert_eq!(b.epoch(), 3);
    }

    #[cfg(feature = "index")]
    #[test]
    fn gc_refuses_to_mark_on_a_rebuild_that_could_not_read_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::LocalStore::new(dir.path());
        let ok = crate::maintenance::rebuild::RebuildReport::default();
        check_rebuild(&store, &ok).unwrap();
        let bad = crate::maintenance::rebuild::RebuildReport {
            bad_files: vec!["points/web/0000000000000003.point: bad checksum".into()],
            ..Default::default()
        };
        let e = check_rebuild(&store, &bad).unwrap_err();
        assert!(matches!(e, StoreError::GcIncomplete { .. }), "{e}");
        assert!(
            e.to_string().contains("points/web/0000000000000003.point"),
            "{e}"
        );
        let unread = crate::maintenance::rebuild::RebuildReport {
            unreadable_segments: vec!["segments/0001000000000001.seg: timed out".into()],
            ..Default::default()
        };
        let e = check_rebuild(&store, &unread).unwrap_err();
        assert!(e.to_string().contains("0001000000000001.seg"), "{e}");
    }
}
