//! The one validator for names that become paths.
//!
//! A vault's files come from replicas, secondaries, shared buckets and
//! other hosts, so every name read from them (item names in catalog files
//! and point manifests, the item, job, pack and clone names of snapshot
//! manifests) is untrusted. Such a name becomes a file or folder name only
//! through [`SafeName`], whose constructor is [`check_name`]'s rule
//! (`FORMAT.md`, "Names"):
//!
//! - 1 to [`MAX_NAME_LEN`] bytes;
//! - ASCII letters, digits, `.`, `_` and `-` only (so no `/`, no NUL, no
//!   space, no control character);
//! - the first character a letter or digit (so not `.`, `..`, a hidden
//!   file, or an option-looking `-x`).
//!
//! A name that passes is one normal path component: joined to a folder it
//! stays inside that folder. Item names given on the command line pass the
//! same rule when the item is created ([`crate::format::catalog::validate_item_name`]).

use std::path::{Path, PathBuf};

/// Longest name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// The rule, as error messages state it.
pub const NAME_RULE: &str =
    "1-128 characters: letters, digits, '.', '_' or '-', starting with a letter or digit";

/// A name that breaks the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} name {shown:?} is not allowed: {reason} (a name is {NAME_RULE})")]
pub struct NameError {
    /// What the name names (`item`, `pack`, `clone`, …).
    pub what: &'static str,
    /// The name, cut to 100 characters for messages.
    pub shown: String,
    /// Which part of the rule it breaks.
    pub reason: &'static str,
}

/// Checks `name` against the rule; `what` says what it names, for the
/// message.
pub fn check_name<'a>(what: &'static str, name: &'a str) -> Result<&'a str, NameError> {
    let fail = |reason| NameError {
        what,
        shown: name.chars().take(100).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(fail("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(fail("it is too long"));
    }
    if !name
        .as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphanumeric)
    {
        return Err(fail("it does not start with a letter or digit"));
    }
    if let Some(b) = name
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        return Err(fail(match b {
            b'/' | b'\\' => "it holds a path separator",
            0 => "it holds a NUL byte",
            _ => "it holds a character outside the rule",
        }));
    }
    Ok(name)
}

/// A name that passed [`check_name`]: one normal path component.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SafeName(String);

impl SafeName {
    /// Checks `name` (see [`check_name`]).
    pub fn new(what: &'static str, name: &str) -> Result<SafeName, NameError> {
        check_name(what, name).map(|n| SafeName(n.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `base/name`: always a direct child of `base`.
    pub fn under(&self, base: &Path) -> PathBuf {
        base.join(&self.0)
    }
}

impl std::fmt::Display for SafeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SafeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Component;

    #[test]
    fn accepts_and_refuses() {
        for ok in ["a", "vm-01.disk_0", "9lives", "0123abcd.pack", "j1.img"] {
            check_name("item", ok).unwrap();
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "../../etc/passwd",
            "/tmp/x",
            "/home/x",
            ".hidden",
            "-rf",
            "a/b",
            "a\\b",
            "a b",
            "a\0b",
            "a\nb",
            "é",
            long.as_str(),
        ] {
            let e = check_name("item", bad).unwrap_err();
            assert!(e.to_string().contains("item name"), "{e}");
        }
        assert_eq!(
            check_name("pack", "/tmp/x").unwrap_err().reason,
            "it does not start with a letter or digit"
        );
        assert_eq!(
            check_name("pack", "a/../../x").unwrap_err().reason,
            "it holds a path separator"
        );
        assert_eq!(check_name("x", &"y".repeat(128)).map(str::len), Ok(128));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever the validator accepts, joined to a base, is a direct
        /// child of the base.
        #[test]
        fn accepted_names_stay_inside(name in "\\PC{0,40}|[./a-z\\\\-]{0,12}") {
            let base = Path::new("/srv/area");
            if let Ok(n) = SafeName::new("x", &name) {
                let p = n.under(base);
                prop_assert_eq!(p.parent(), Some(base));
                let comps: Vec<Component> = p.strip_prefix(base).unwrap().components().collect();
                prop_assert_eq!(comps.len(), 1);
                prop_assert!(matches!(comps[0], Component::Normal(_)));
            }
        }

        #[test]
        fn bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = check_name("x", &s);
        }
    }
}
