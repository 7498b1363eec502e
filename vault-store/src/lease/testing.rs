//! Test clocks for leases and GC holds.

use std::sync::Arc;

use jiff::Timestamp;

use super::Clock;

/// A clock tests move by hand.
pub(crate) fn manual(at: Timestamp) -> (Clock, Arc<std::sync::Mutex<Timestamp>>) {
    let t = Arc::new(std::sync::Mutex::new(at));
    let c = t.clone();
    (Arc::new(move || *c.lock().unwrap()), t)
}

pub(crate) fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}
