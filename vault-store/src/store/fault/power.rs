//! Power loss: the operation it hits is torn, then whatever no sync made
//! durable is dropped on every store of the handle.

use super::{FaultStore, Faults, Volatile, off};
use crate::error::Result;

/// The temporary name a torn `put` leaves behind (as
/// [`crate::store::local::durable::write_atomic`] names its own).
fn tmp_name(name: &str) -> String {
    match name.rsplit_once('/') {
        Some((d, f)) => format!("{d}/.{f}.tmp-0"),
        None => format!(".{name}.tmp-0"),
    }
}

impl Faults {
    /// Counts an operation that changes nothing when torn.
    pub(super) fn tick(&self, name: &str) -> Result<()> {
        self.tick_as(name, false)
    }

    /// [`Faults::tick`], counting a change when `change`.
    pub(super) fn tick_as(&self, name: &str, change: bool) -> Result<()> {
        let torn = if change {
            self.begin_change(name)?
        } else {
            self.begin(name)?
        };
        if torn {
            self.power_off(name, "not done");
            return Err(off(name));
        }
        Ok(())
    }

    /// Turns the power off after a tear whose outcome is `torn` (what it
    /// left, or the error the inner store met doing it), and returns that
    /// error, if any.
    pub(super) fn power_off_after(
        &self,
        name: &str,
        op: &str,
        torn: Result<impl std::fmt::Display>,
    ) -> Result<()> {
        let outcome = match &torn {
            Ok(left) => format!("{op} {left}"),
            Err(e) => format!("{op} failed while torn: {e}"),
        };
        self.power_off(name, &outcome);
        torn.map(drop)
    }

    /// The power goes out: whatever was not durable is dropped, on every
    /// store. `name` was the torn operation's, left as `outcome`.
    pub(super) fn power_off(&self, name: &str, outcome: &str) {
        let (stores, files, volatile) = {
            let mut s = self.lock();
            s.off = true;
            s.torn = Some(format!("{name}: {outcome}"));
            (
                s.stores.clone(),
                std::mem::take(&mut s.files),
                std::mem::take(&mut s.volatile),
            )
        };
        for ((id, file), f) in files {
            let Some(store) = stores.get(id) else {
                continue;
            };
            let now = store.size(&file).ok().flatten().unwrap_or(0);
            let unsynced = now.saturating_sub(f.synced);
            // The kernel may have written any prefix of the rest back.
            let kept = f.synced.min(now) + self.pick(unsynced + 1);
            let _ = if !f.entry && self.pick(2) == 0 {
                store.delete(&file).map(|_| ())
            } else {
                store.truncate(&file, kept)
            };
        }
        for ((id, file), v) in volatile {
            let Some(store) = stores.get(id) else {
                continue;
            };
            if self.pick(2) == 0 {
                continue; // the change had reached the disk after all
            }
            let _ = match v {
                Volatile::Put(Some(old)) | Volatile::Delete(old) => store.put(&file, &old),
                Volatile::Put(None) => store.delete(&file).map(|_| ()),
            };
        }
        for s in &stores {
            s.forget();
        }
    }
}

impl FaultStore {
    pub(super) fn torn_put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        // The power goes off whatever the tear meets (a failing inner
        // store too): nothing may run on with the power half gone.
        let torn = (|| {
            let existed = self.inner.size(name)?.is_some();
            let unordered = self.faults.lock().unordered_renames;
            let part = bytes
                .get(..self.faults.pick(bytes.len() as u64 + 1) as usize)
                .unwrap_or_default();
            Ok(match self.faults.pick(if unordered { 4 } else { 3 }) {
                0 => "the old content",
                1 => {
                    self.inner.put(&tmp_name(name), part)?;
                    "the old content and a partial temporary file"
                }
                2 => {
                    self.inner.put(name, bytes)?;
                    "the new content"
                }
                _ => {
                    self.inner.put(name, part)?;
                    if existed {
                        "a partial file replacing the old content"
                    } else {
                        "a partial new file"
                    }
                }
            })
        })();
        self.faults.power_off_after(name, "put left", torn)
    }

    pub(super) fn torn_write_at(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<()> {
        let torn = (|| {
            let existed = self.inner.size(name)?.is_some();
            if !existed && self.faults.pick(2) == 0 {
                return Ok("a new file: the file is gone".to_string());
            }
            let mut sectors = 0;
            for (i, sector) in bytes.chunks(512).enumerate() {
                if self.faults.pick(2) == 0 {
                    self.inner
                        .write_at(name, offset + (i as u64) * 512, sector)?;
                    sectors += 1;
                }
            }
            Ok(format!(
                "{sectors} of {} sectors written",
                bytes.len().div_ceil(512)
            ))
        })();
        self.faults.power_off_after(name, "write_at:", torn)
    }
}
