//! A bandwidth limiter for backups (`--rate-limit`): sleeps so that the
//! bytes processed never run ahead of the allowed rate.

use std::time::{Duration, Instant};

/// Limits throughput to a number of bytes per second.
#[derive(Debug)]
pub struct Throttle {
    rate: Option<u64>,
    start: Instant,
    done: u64,
}

impl Throttle {
    /// `None` means unlimited.
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Throttle {
            rate: bytes_per_sec.filter(|r| *r > 0),
            start: Instant::now(),
            done: 0,
        }
    }

    /// Accounts for `bytes` and sleeps if ahead of the rate.
    pub fn consume(&mut self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        self.done += bytes;
        let due = Duration::from_secs_f64(self.done as f64 / rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}
