//! [`GcHold`]: a GC's hold on `gc/state`, taken and renewed by conditional
//! writes, so one GC runs at a time.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

use super::renewer::Renewer;
use super::{CLOCK_MARGIN, Clock, next_epoch, read_state, to_signed};
use crate::error::{Result, StoreError};
use crate::format::lease::{CONDEMNED_DIR, GC_STATE, GcHolder, GcState, encode_state};
use crate::store::Store;

/// A GC's hold on `gc/state`: taken by a conditional write, renewed by a
/// conditional write (every third of its life by a thread, and by
/// [`GcHold::confirm`] before each step that writes or deletes), and
/// lost for good once a renewal is refused or its time ran out. Another
/// GC takes `gc/state` over only after `until`, so a confirmed renewal
/// gives this GC `ttl` of exclusive work.
pub struct GcHold {
    store: crate::store::SharedStore,
    pub(crate) host_tag: u16,
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
    pub(crate) sweepable: std::collections::BTreeSet<String>,
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
    match store.put_if(GC_STATE, &encode_state(&mine), &s.version)? {
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
        let mine = encode_state(&GcState {
            epoch,
            marking: Some(GcHolder { host_tag, until }),
        });
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
            .map_err(|e| StoreError::io("start the GC hold renewer", std::path::Path::new(GC_STATE), e))?
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
            .put_if(GC_STATE, &encode_state(&idle), &s.version)?;
        Ok(())
    }
}
