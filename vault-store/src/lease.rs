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
//!   renews the lease as it goes. It deletes the lease when done.
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

use crate::envelope;
use crate::error::{Result, StoreError};
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

/// Every lease in the store.
pub fn leases(store: &dyn Store) -> Result<Vec<(String, Lease)>> {
    let mut out = Vec::new();
    for n in store.list(LEASES_DIR)? {
        if n.ends_with('/') {
            continue;
        }
        let name = crate::store::join(LEASES_DIR, &n);
        if let Some(b) = store.get(&name)? {
            match decode(&LEASE_MAGIC, &b, &name) {
                Ok(l) => out.push((name, l)),
                Err(e) => tracing::warn!(lease = %name, error = %e, "ignoring an unreadable lease"),
            }
        }
    }
    Ok(out)
}

/// A writer's lease, held while a write session of a shared vault runs.
pub struct WriterLease {
    store: crate::store::SharedStore,
    name: String,
    lease: Arc<std::sync::Mutex<Lease>>,
    ttl: Duration,
    clock: Clock,
    released: bool,
    /// The renewer: a thread that extends the lease every third of its
    /// life for as long as the session runs.
    stop: Arc<std::sync::atomic::AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

/// Renews `lease` every `ttl / 3` until `stop`; never past an expiry it
/// missed (the writer then fails its commit check instead).
fn renew_loop(
    store: crate::store::SharedStore,
    name: String,
    lease: Arc<std::sync::Mutex<Lease>>,
    ttl: Duration,
    clock: Clock,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let step = Duration::from_millis(50);
    loop {
        let mut slept = Duration::ZERO;
        while slept < ttl / 3 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(step);
            slept += step;
        }
        let bytes = {
            let mut l = lease.lock().unwrap_or_else(|p| p.into_inner());
            let now = clock();
            if now >= l.expires {
                return;
            }
            l.expires = now + to_signed(ttl);
            encode(&LEASE_MAGIC, &*l)
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = store.put(&name, &bytes) {
            tracing::warn!(lease = %name, error = %e, "could not renew the writer lease");
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
            store.put(&name, &encode(&LEASE_MAGIC, &lease))?;
            let again = read_state(store.as_ref())?.0.epoch;
            if again == epoch {
                break;
            }
            epoch = again;
        }
        let mut condemned = HashSet::new();
        for (_, c) in condemned_lists(store.as_ref())? {
            condemned.extend(c.segments);
        }
        // A GC may have deleted segments (and then their condemned list)
        // since this host's cache was refreshed: listed after the lists,
        // the segments still present tell.
        let present: HashSet<u64> = store
            .list(crate::segment::SEGMENTS_DIR)?
            .iter()
            .filter_map(|n| crate::segment::parse_segment_file_name(n))
            .collect();
        let lease = Arc::new(std::sync::Mutex::new(lease));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renewer = {
            let (store, owned, lease, clock, stop) = (
                store.clone(),
                name.clone(),
                lease.clone(),
                clock.clone(),
                stop.clone(),
            );
            std::thread::Builder::new()
                .name("coffre-lease".into())
                .spawn(move || renew_loop(store, owned, lease, ttl, clock, stop))
                .map_err(|e| StoreError::io("start the lease renewer", Path::new(&name), e))?
        };
        Ok((
            WriterLease {
                store,
                name,
                lease,
                ttl,
                clock,
                released: false,
                stop,
                renewer: Some(renewer),
            },
            condemned,
            present,
        ))
    }

    /// Refuses once the lease is about to expire (a GC may then act as if
    /// this writer were gone); the renewer keeps it from expiring while
    /// the session runs.
    pub fn check_and_renew(&mut self) -> Result<()> {
        let now = (self.clock)();
        let l = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if now + to_signed(CLOCK_MARGIN.min(self.ttl / 4)) >= l.expires {
            return Err(StoreError::LeaseExpired {
                lease: format!("{}/{}", self.store.location(), self.name),
                expired: l.expires.to_string(),
            });
        }
        Ok(())
    }

    fn stop_renewer(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
    }

    /// Ends the lease.
    pub fn release(mut self) -> Result<()> {
        self.stop_renewer();
        self.released = true;
        self.store.delete(&self.name).map(|_| ())
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        self.stop_renewer();
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

/// Runs GC on the shared vault whose cache is `dir` (see the module docs).
#[cfg(feature = "index")]
pub fn run_shared_gc(dir: &Path, opts: &SharedGcOptions) -> Result<SharedGcReport> {
    let started = Instant::now();
    let remote = crate::remote::Remote::load(dir)?.ok_or_else(|| StoreError::InvalidSetting {
        field: "gc",
        reason: format!("{} is not a shared vault's cache", dir.display()),
    })?;
    let store = crate::copies::open_url(&remote.url)?;
    let now = (opts.clock)();
    // (1) Take gc/state.
    let (state, version) = read_state(store.as_ref())?;
    if let Some(h) = &state.marking
        && h.until > now
    {
        return Err(StoreError::GcRunning {
            url: remote.url.clone(),
            host_tag: h.host_tag,
            until: h.until.to_string(),
        });
    }
    let epoch = next_epoch(state.epoch).ok_or_else(|| StoreError::CorruptFile {
        path: std::path::PathBuf::from(format!("{}/{GC_STATE}", remote.url)),
        what: "GC state",
        reason: format!("epoch {} cannot grow any more", state.epoch),
    })?;
    let mine = GcState {
        epoch,
        marking: Some(GcHolder {
            host_tag: remote.host_tag,
            until: now + to_signed(opts.ttl),
        }),
    };
    let taken = match &version {
        Some(v) => store
            .put_if(GC_STATE, &encode(&STATE_MAGIC, &mine), v)?
            .is_some(),
        None => store.put_new(GC_STATE, &encode(&STATE_MAGIC, &mine))?,
    };
    if !taken {
        return Err(StoreError::GcRunning {
            url: remote.url.clone(),
            host_tag: 0,
            until: "now (another GC took gc/state first)".into(),
        });
    }
    let mut report = SharedGcReport {
        epoch,
        ..SharedGcReport::default()
    };
    // (2) Wait for the writers that started before this epoch.
    let deadline = Instant::now() + opts.max_wait;
    let mut waited: BTreeSet<String> = BTreeSet::new();
    loop {
        let now = (opts.clock)();
        let mut blocking = 0;
        for (name, l) in leases(store.as_ref())? {
            if l.epoch_seen >= epoch {
                continue;
            }
            if l.expires <= now {
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
            release_state(store.as_ref(), epoch)?;
            return Err(StoreError::GcRunning {
                url: remote.url.clone(),
                host_tag: remote.host_tag,
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
    let (vault, rebuilt) = crate::rebuild::rebuild_index(dir, dir, Duration::from_secs(60))?;
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
    drop(vault);
    // (4) Sweep what was condemned before and is still dead.
    let mut deleted = BTreeSet::new();
    for (name, list) in condemned_lists(store.as_ref())? {
        if list.epoch >= epoch {
            continue;
        }
        if read_state(store.as_ref())?.0.epoch != epoch {
            return Err(StoreError::GcRunning {
                url: remote.url.clone(),
                host_tag: 0,
                until: "now (another GC took over; this one stopped)".into(),
            });
        }
        for seg in list.segments {
            if dead.contains(&seg) && !deleted.contains(&seg) {
                if store.delete(&crate::segment::segment_name(seg))? {
                    report.deleted_segments += 1;
                    report.deleted_bytes += sizes.get(&seg).copied().unwrap_or(0);
                }
                // Its chunk lists go with it (after it: a list never names
                // a segment that is still there but unlisted).
                let lists = format!("{}/{seg:016x}", crate::chunk_list::CHUNK_LISTS_DIR);
                for n in store.list(&lists)? {
                    store.delete(&crate::store::join(&lists, &n))?;
                }
                deleted.insert(seg);
            }
        }
        store.delete(&name)?;
    }
    // (5) Condemn what is dead now.
    let condemned: Vec<u64> = dead.difference(&deleted).copied().collect();
    report.condemned_segments = condemned.len() as u64;
    if !condemned.is_empty() {
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
    // (6) Idle again.
    release_state(store.as_ref(), epoch)?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

#[cfg(feature = "index")]
fn release_state(store: &dyn Store, epoch: u64) -> Result<()> {
    let (state, version) = read_state(store)?;
    if state.epoch != epoch {
        return Ok(());
    }
    let idle = GcState {
        epoch,
        marking: None,
    };
    if let Some(v) = version {
        store.put_if(GC_STATE, &encode(&STATE_MAGIC, &idle), &v)?;
    }
    Ok(())
}

/// The GC epoch after `epoch` (`None` when a decoded epoch is already the
/// largest: never wrap back to an epoch other hosts have seen).
#[cfg(feature = "index")]
fn next_epoch(epoch: u64) -> Option<u64> {
    epoch.checked_add(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[cfg(feature = "index")]
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
}
