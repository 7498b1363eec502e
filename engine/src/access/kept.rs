//! A few values kept between uses (decoders' scratch spaces, record
//! fetchers with their buffers), so that the next user need not make one,
//! while a burst of users does not leave all of theirs behind.

use std::sync::Mutex;

/// At most `most` values kept for the next user.
pub(crate) struct Kept<T> {
    values: Mutex<Vec<T>>,
    most: usize,
}

impl<T> Kept<T> {
    /// Keeps at most `most` values.
    pub(crate) fn new(most: usize) -> Self {
        Kept {
            values: Mutex::default(),
            most,
        }
    }

    /// A kept value, or `make`'s.
    pub(crate) fn take_or(&self, make: impl FnOnce() -> T) -> T {
        let kept = self.values.lock().unwrap_or_else(|p| p.into_inner()).pop();
        kept.unwrap_or_else(make)
    }

    /// Keeps `value` for the next user, unless `most` are kept already.
    pub(crate) fn give(&self, value: T) {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        if values.len() < self.most {
            values.push(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_kept_up_to_the_bound_and_made_when_none_is() {
        let kept = Kept::new(2);
        for v in [1, 2, 3] {
            kept.give(v);
        }
        // The third was dropped; the last kept comes back first.
        assert_eq!(kept.take_or(|| 0), 2);
        assert_eq!(kept.take_or(|| 0), 1);
        assert_eq!(kept.take_or(|| 9), 9);
    }
}
