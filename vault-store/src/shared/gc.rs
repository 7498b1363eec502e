//! GC of a shared vault (object storage, many hosts): the run that marks,
//! waits for writers, rebuilds, sweeps what was dead at two marks and
//! condemns what is dead now. The argument is in [`crate::lease`] and
//! `FORMAT.md`, "Shared vaults: leases and GC".

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::format::lease::{CONDEMNED_DIR, Condemned, encode_condemned};
use crate::lease::{Clock, GcHold, condemned_lists, leases_or_refuse};
use crate::store::Store;

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
    /// Unlocks an encrypted vault (its catalog and coordination files are
    /// sealed).
    pub unlock: Option<std::sync::Arc<dyn crate::crypto::Unlock>>,
}

/// Runs GC on the shared vault whose cache is `dir` (see the module docs).
/// It holds `gc/state` throughout ([`GcHold`]); when it stops on an error
/// it gives `gc/state` back (if still its own), so the next GC need not
/// wait for the hold to lapse.
pub fn run_shared_gc(dir: &Path, opts: &SharedGcOptions) -> Result<SharedGcReport> {
    let started = Instant::now();
    let remote =
        crate::format::remote::Remote::load(dir)?.ok_or_else(|| StoreError::InvalidSetting {
            field: "gc",
            reason: format!("{} is not a shared vault's cache", dir.display()),
        })?;
    let config = crate::format::config::VaultConfig::load_with(dir, opts.unlock.as_deref())?;
    // A hold this host cannot read: nothing is deleted (crate::holds).
    crate::holds::HoldStore::new(dir, config.keys()).list()?;
    let store = crate::copies::sealed_state::wrap(
        crate::copies::open_url(&remote.url)?,
        config.keys().cloned(),
    );
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
    let (dead, sizes) = mark(dir, store, opts.unlock.clone())?;
    // (4) and (5).
    sweep_and_condemn(store, hold, &dead, &sizes, report)
}

/// Step (3): rebuilds the cache at `dir` from the store and returns the
/// segments no referenced chunk lives in, with their sizes. Refuses
/// (nothing condemned) when the rebuild could not decode a catalog file
/// (the chunks of a point it cannot read would look dead) or read a
/// segment (its chunks would be missing from the count).
fn mark(
    dir: &Path,
    store: &dyn Store,
    unlock: Option<std::sync::Arc<dyn crate::crypto::Unlock>>,
) -> Result<(BTreeSet<u64>, std::collections::HashMap<u64, u64>)> {
    let (vault, rebuilt) = crate::maintenance::rebuild::rebuild_index_unlocked(
        dir,
        dir,
        Duration::from_secs(60),
        unlock,
    )?;
    check_rebuild(store, &rebuilt)?;
    // A hold whose point the refreshed index no longer lists: that point's
    // chunks may be all a live restore's disk has (crate::holds).
    crate::maintenance::gc::check_holds(&vault)?;
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
            &encode_condemned(&Condemned {
                epoch,
                segments: condemned,
            }),
        )?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format::lease::{GC_STATE, GcState, encode_state};
    use crate::lease::gc_state;
    use crate::lease::testing::{at, manual};
    use std::sync::Arc;

    #[test]
    fn the_largest_epoch_does_not_wrap() {
        assert_eq!(crate::lease::next_epoch(7), Some(8));
        assert_eq!(crate::lease::next_epoch(u64::MAX), None);
    }

    const TTL: Duration = Duration::from_secs(60);

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
