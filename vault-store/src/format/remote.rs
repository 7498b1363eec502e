//! Vaults in object storage: the pointer a host's cache directory keeps
//! (`CACHE/remote`: the store URL and this host's tag), host tags, and the
//! per-host namespaces of segment ids.
//!
//! A vault whose primary copy is an object store (`coffre vault create
//! --store URL`) is *shared*: many hosts, each with its own cache directory
//! (the RocksDB index, locks, job records and this pointer), write into
//! it at once. What keeps them apart (`FORMAT.md`, "Shared vaults"):
//!
//! - each host claims a 16-bit **tag** with a conditional create of
//!   `hosts/TAG` in the store, and writes only segments whose id carries
//!   its tag in the top 16 bits, so no two hosts ever append to one
//!   segment;
//! - point manifests are created with a conditional create, so two hosts
//!   never overwrite each other's point unseen;
//! - the store is the truth and each cache follows it: before a write and
//!   on every open, a host imports what the others committed
//!   ([`crate::vault::Vault::refresh`]), which is also how deduplication
//!   works across hosts.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::format::envelope;

/// Which service a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// `azure://ACCOUNT/CONTAINER[/PREFIX]`.
    Azure,
    /// `s3://BUCKET[/PREFIX]`.
    S3,
    /// `memory://` (tests: object_store's own in-memory store).
    Memory,
}

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    /// The service.
    pub service: Service,
    /// Account (Azure); empty otherwise.
    pub account: String,
    /// Container or bucket.
    pub container: String,
    /// Key prefix inside it (no leading or trailing `/`).
    pub prefix: String,
}

impl StoreUrl {
    /// Parses `azure://ACCOUNT/CONTAINER[/PREFIX]`, `s3://BUCKET[/PREFIX]`
    /// or `memory://[PREFIX]`.
    pub fn parse(url: &str) -> std::result::Result<StoreUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not a store URL (azure://, s3://)"))?;
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        let bad = |what: &str| format!("{url:?}: {what}");
        let (service, account, container, prefix) = match scheme {
            "azure" | "az" => {
                let [account, container, prefix @ ..] = parts.as_slice() else {
                    return Err(bad("expected azure://ACCOUNT/CONTAINER[/PREFIX]"));
                };
                (Service::Azure, *account, *container, prefix.join("/"))
            }
            "s3" => {
                let [bucket, prefix @ ..] = parts.as_slice() else {
                    return Err(bad("expected s3://BUCKET[/PREFIX]"));
                };
                (Service::S3, "", *bucket, prefix.join("/"))
            }
            "memory" => (Service::Memory, "", "", parts.join("/")),
            other => {
                return Err(bad(&format!(
                    "unknown scheme {other:?} (expected azure:// or s3://)"
                )));
            }
        };
        if parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(bad("`.` and `..` are not allowed"));
        }
        Ok(StoreUrl {
            service,
            account: account.to_string(),
            container: container.to_string(),
            prefix,
        })
    }

    /// Back to text.
    pub fn to_url(&self) -> String {
        let tail = |p: &str| {
            if p.is_empty() {
                String::new()
            } else {
                format!("/{p}")
            }
        };
        match self.service {
            Service::Azure => format!(
                "azure://{}/{}{}",
                self.account,
                self.container,
                tail(&self.prefix)
            ),
            Service::S3 => format!("s3://{}{}", self.container, tail(&self.prefix)),
            Service::Memory => format!("memory://{}", self.prefix),
        }
    }

    /// The same place with `sub` appended to the prefix.
    pub fn join(&self, sub: &str) -> StoreUrl {
        let mut u = self.clone();
        u.prefix = if self.prefix.is_empty() {
            sub.to_string()
        } else {
            format!("{}/{sub}", self.prefix)
        };
        u
    }
}

/// True when a configured copy location is a store URL rather than a
/// directory (a GRS secondary in a blob container: `--secondary azure://…`).
pub fn is_store_url(p: &Path) -> bool {
    p.to_str().is_some_and(|s| {
        ["azure://", "az://", "s3://", "memory://"]
            .iter()
            .any(|x| s.starts_with(x))
    })
}

/// The pointer file in a cache directory.
pub const REMOTE_FILE: &str = "remote";
/// Folder of host claims in the store.
pub const HOSTS_DIR: &str = "hosts";
/// Magic of the pointer file. Frozen.
pub const REMOTE_MAGIC: [u8; 8] = *b"CFREMOTE";
/// Version of the pointer file.
pub const REMOTE_VERSION: u32 = 1;

/// What a cache directory knows of its vault's store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    /// The store URL (`azure://…`, `s3://…`).
    pub url: String,
    /// This host's tag (1..=65535), claimed in the store.
    pub host_tag: u16,
    /// The host name the tag was claimed for (messages only).
    pub host: String,
}

impl Remote {
    /// Encodes the pointer file.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        envelope::encode(&REMOTE_MAGIC, REMOTE_VERSION, &body)
    }

    /// Decodes it, checking every field.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Remote> {
        let corrupt = |reason: String| StoreError::CorruptFile {
            path: path.to_path_buf(),
            what: "store pointer",
            reason,
        };
        let (_, body) = envelope::decode(&REMOTE_MAGIC, REMOTE_VERSION, 64 << 10, bytes)
            .map_err(|e| corrupt(e.to_string()))?;
        let r: Remote = serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
        if r.host_tag == 0 {
            return Err(corrupt("host tag 0 is reserved".into()));
        }
        StoreUrl::parse(&r.url).map_err(corrupt)?;
        Ok(r)
    }

    /// The segment ids this host may write.
    pub fn namespace(&self) -> Range<u64> {
        namespace(self.host_tag)
    }
}

/// The segment ids of host tag `tag`: its tag in the top 16 bits.
pub fn namespace(tag: u16) -> Range<u64> {
    let start = u64::from(tag) << 48;
    start..start.saturating_add(1u64 << 48)
}

/// The claim file of tag `tag`.
pub fn host_file(tag: u16) -> String {
    format!("{HOSTS_DIR}/{tag:04x}")
}

/// Fuzz entry point: decodes arbitrary bytes as a store pointer; never
/// panics.
pub fn fuzz_entry(data: &[u8]) -> bool {
    Remote::decode(data, Path::new("fuzz")).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_pointer_round_trips_and_bad_ones_are_refused() {
        let r = Remote {
            url: "azure://acct/cont/v".into(),
            host_tag: 7,
            host: "hv1".into(),
        };
        let p = Path::new("CACHE/remote");
        assert_eq!(Remote::decode(&r.encode(), p).unwrap(), r);
        let mut bad = r.encode();
        if let Some(b) = bad.get_mut(20) {
            *b ^= 1;
        }
        assert!(Remote::decode(&bad, p).is_err());
        let zero = Remote { host_tag: 0, ..r };
        assert!(Remote::decode(&zero.encode(), p).is_err());
    }

    #[test]
    fn urls_parse_and_print_back() {
        let u = StoreUrl::parse("azure://acct/cont/a/b").unwrap();
        assert_eq!(u.service, Service::Azure);
        assert_eq!((u.account.as_str(), u.container.as_str()), ("acct", "cont"));
        assert_eq!(u.prefix, "a/b");
        assert_eq!(u.to_url(), "azure://acct/cont/a/b");
        let s = StoreUrl::parse("s3://bucket").unwrap();
        assert_eq!(
            (s.service, s.container.as_str(), s.prefix.as_str()),
            (Service::S3, "bucket", "")
        );
        assert!(StoreUrl::parse("azure://acct").is_err());
        assert!(StoreUrl::parse("ftp://x/y").is_err());
        assert!(StoreUrl::parse("/tmp/x").is_err());
        assert!(StoreUrl::parse("s3://b/../x").is_err());
    }

    #[test]
    fn namespaces_do_not_overlap() {
        let a = namespace(1);
        let b = namespace(2);
        assert!(a.end <= b.start);
        assert!(!a.contains(&0));
        assert_eq!(namespace(u16::MAX).end, u64::MAX);
    }
}
