//! The hold record codec (`VAULT/holds/TAG.hold`): a live restore in
//! progress whose target still reads blocks of one point through coffre's
//! export, so that point (and its snapshot) must not be pruned, expired or
//! collected until the restore completes or is abandoned (`FORMAT.md`,
//! "Holds"). An [`envelope`] with a JSON body, every field checked at
//! decode time; fuzzed: `fuzz/fuzz_targets/hold_record.rs`.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::format::envelope;
use crate::format::name::check_name;

/// Hold record magic. Frozen.
pub const HOLD_MAGIC: [u8; 8] = *b"CFHOLD\0\0";
/// Hold record version.
pub const HOLD_VERSION: u32 = 1;
/// Folder of hold records inside a vault.
pub const HOLDS_DIR: &str = "holds";
/// The suffix of a hold record's file name.
pub const HOLD_SUFFIX: &str = ".hold";
/// Largest body of a hold record.
const MAX_HOLD_BODY: usize = 16 << 10;
/// Longest point id a hold names (the export name's limit).
const MAX_POINT_ID: usize = 64;
/// Longest target path a hold names (Linux's `PATH_MAX`).
const MAX_TARGET: usize = 4096;
/// Longest tier name.
const MAX_TIER: usize = 16;

/// One live restore's hold on a point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRecord {
    /// The item.
    pub item: String,
    /// The point's id.
    pub point: String,
    /// The tier the restore serves the point from (`snapshot` or `vault`).
    pub tier: String,
    /// The live restore's target (its canonical path).
    pub target: PathBuf,
    /// When the live restore began (the first run's time).
    pub started: Timestamp,
    /// The pid of the run that last wrote the hold (informational).
    pub pid: u32,
    /// The target file the live restore made, once it is made: a resumed
    /// run that finds the stream complete lets the hold go only for this
    /// very file. Absent before the file is made, and in holds written by
    /// coffre before it recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_file: Option<FileId>,
}

/// A file's identity as it stays across remounts and reboots (a live
/// restore is resumed after a crash): its inode number and, where the
/// filesystem records it, its birth time (an inode number alone may go to
/// a later file). The device number is no part of it: it may change when
/// the filesystem is mounted again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// `st_ino`.
    pub ino: u64,
    /// The birth time (`statx`'s `stx_btime`), where the filesystem keeps
    /// one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub born: Option<Timestamp>,
}

impl FileId {
    /// The identity of the file at `path` (symbolic links followed).
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            ino: m.ino(),
            born: m.created().ok().and_then(|t| Timestamp::try_from(t).ok()),
        })
    }

    /// True when both may be the same file: the same inode, born at the
    /// same time where both know it.
    pub fn same_file(&self, other: &FileId) -> bool {
        self.ino == other.ino
            && match (self.born, other.born) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// 16 hex digits of BLAKE3(`live/<target>`): the tag a live restore's QEMU
/// nodes, socket, lock and hold record are named after. The path's own
/// bytes are hashed (a live restore's target is UTF-8: refused otherwise).
pub fn target_tag(target: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"live/");
    h.update(target.as_os_str().as_encoded_bytes());
    let h = h.finalize().to_hex();
    h.get(..16).unwrap_or_default().to_string()
}

/// The name of the hold of the live restore into `target`, under the
/// vault directory.
pub fn hold_file(target: &Path) -> String {
    format!("{HOLDS_DIR}/{}{HOLD_SUFFIX}", target_tag(target))
}

/// True for a tag (16 lower-case hex digits).
pub fn is_tag(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl HoldRecord {
    /// Encodes the record (checked first: a record that would not decode,
    /// such as a target that is not UTF-8, is refused).
    pub fn encode(&self) -> std::result::Result<Vec<u8>, String> {
        self.check()?;
        let body = serde_json::to_vec(self).map_err(|e| format!("cannot encode it: {e}"))?;
        Ok(envelope::encode(&HOLD_MAGIC, HOLD_VERSION, &body))
    }

    /// Decodes a record read as `file_tag` (the stem of its file name):
    /// every field is checked, and the record must be the hold of the
    /// target its name says.
    pub fn decode(bytes: &[u8], file_tag: &str) -> std::result::Result<Self, String> {
        let r = Self::decode_body(bytes)?;
        if target_tag(&r.target) != file_tag {
            return Err(format!(
                "it names target {:?} whose hold is not this file",
                r.target
            ));
        }
        Ok(r)
    }

    /// Decodes and checks a record, whatever its file's name.
    pub fn decode_body(bytes: &[u8]) -> std::result::Result<Self, String> {
        let (_, body) = envelope::decode(&HOLD_MAGIC, HOLD_VERSION, MAX_HOLD_BODY, bytes)
            .map_err(|e| e.to_string())?;
        let r: HoldRecord = serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
        r.check()?;
        Ok(r)
    }

    /// Checks every field.
    pub fn check(&self) -> std::result::Result<(), String> {
        check_name("item", &self.item).map_err(|e| e.to_string())?;
        if !(1..=MAX_POINT_ID).contains(&self.point.len())
            || !self
                .point
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "point id {:?} is not 1 to {MAX_POINT_ID} letters, digits, '-' or '_'",
                self.point.chars().take(80).collect::<String>()
            ));
        }
        if self.tier.is_empty()
            || self.tier.len() > MAX_TIER
            || !self.tier.bytes().all(|b| b.is_ascii_lowercase())
        {
            return Err(format!(
                "tier {:?} is not a tier name",
                self.tier.chars().take(40).collect::<String>()
            ));
        }
        check_path("target", &self.target)
    }
}

/// Checks a path a record names (`what`, for messages): absolute, at most
/// [`MAX_TARGET`] bytes, UTF-8 without control characters. The rule of a
/// hold's target, and of the paths of a live restore's run file
/// ([`crate::format::live_run`]).
pub fn check_path(what: &str, p: &Path) -> std::result::Result<(), String> {
    let shown = || {
        p.display()
            .to_string()
            .chars()
            .take(200)
            .collect::<String>()
    };
    if !p.is_absolute() || p.as_os_str().as_encoded_bytes().len() > MAX_TARGET {
        return Err(format!(
            "{what} {:?} is not an absolute path of at most {MAX_TARGET} bytes",
            shown()
        ));
    }
    match p.to_str() {
        Some(u) if !u.chars().any(char::is_control) => Ok(()),
        _ => Err(format!(
            "{what} {:?} is not UTF-8 without control characters",
            shown()
        )),
    }
}

/// Fuzz entry: decodes a hold record, and checks it under its own name.
pub fn fuzz_entry(data: &[u8]) -> bool {
    HoldRecord::decode_body(data)
        .is_ok_and(|r| HoldRecord::decode(data, &target_tag(&r.target)).is_ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn record() -> HoldRecord {
        HoldRecord {
            item: "vm".into(),
            point: "0a1b2c3d4e5f".into(),
            tier: "snapshot".into(),
            target: PathBuf::from("/srv/vm/restored.qcow2"),
            started: Timestamp::from_second(1_700_000_000).unwrap(),
            pid: 42,
            target_file: None,
        }
    }

    #[test]
    fn the_target_files_identity_is_kept_and_absent_in_older_holds() {
        let born = Timestamp::from_second(1_700_000_500).unwrap();
        let r = HoldRecord {
            target_file: Some(FileId {
                ino: 77,
                born: Some(born),
            }),
            ..record()
        };
        let tag = target_tag(&r.target);
        assert_eq!(HoldRecord::decode(&r.encode().unwrap(), &tag).unwrap(), r);
        // A hold written before the field existed has none.
        let older = serde_json::json!({
            "item": "vm", "point": "0a1b2c3d4e5f", "tier": "snapshot",
            "target": "/srv/vm/restored.qcow2", "started": "2023-11-14T22:13:20Z", "pid": 42
        });
        let e = envelope::encode(&HOLD_MAGIC, HOLD_VERSION, older.to_string().as_bytes());
        assert_eq!(HoldRecord::decode(&e, &tag).unwrap(), record());
        // Not numbers: refused.
        let bad = serde_json::json!({
            "item": "vm", "point": "0a1b2c3d4e5f", "tier": "snapshot",
            "target": "/srv/vm/restored.qcow2", "started": "2023-11-14T22:13:20Z", "pid": 42,
            "target_file": {"ino": -1, "born": "x"}
        });
        let e = envelope::encode(&HOLD_MAGIC, HOLD_VERSION, bad.to_string().as_bytes());
        assert!(HoldRecord::decode(&e, &tag).is_err());
        // The same file: the same inode, and the same birth where both
        // know one.
        let id = |ino, born| FileId { ino, born };
        let later = Timestamp::from_second(1_700_000_900).unwrap();
        assert!(id(77, Some(born)).same_file(&id(77, Some(born))));
        assert!(id(77, None).same_file(&id(77, Some(born))));
        assert!(!id(77, Some(born)).same_file(&id(77, Some(later))));
        assert!(!id(77, Some(born)).same_file(&id(78, Some(born))));
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let ida = FileId::of(&a).unwrap();
        assert!(ida.same_file(&FileId::of(&a).unwrap()));
        assert!(!ida.same_file(&FileId::of(&b).unwrap()));
    }

    #[test]
    fn round_trip_and_the_name_must_match_the_target() {
        let r = record();
        let tag = target_tag(&r.target);
        assert!(is_tag(&tag));
        assert_eq!(hold_file(&r.target), format!("holds/{tag}.hold"));
        assert_eq!(HoldRecord::decode(&r.encode().unwrap(), &tag).unwrap(), r);
        let other = target_tag(Path::new("/srv/vm/other.qcow2"));
        assert!(
            HoldRecord::decode(&r.encode().unwrap(), &other)
                .unwrap_err()
                .contains("not this file")
        );
    }

    #[test]
    fn truncated_flipped_and_bad_fields_are_refused() {
        let r = record();
        let tag = target_tag(&r.target);
        let e = r.encode().unwrap();
        for cut in 0..e.len() {
            assert!(HoldRecord::decode(&e[..cut], &tag).is_err(), "cut at {cut}");
        }
        for i in 0..e.len() {
            let mut d = e.clone();
            d[i] ^= 0x21;
            assert!(HoldRecord::decode(&d, &tag).is_err(), "flip at {i}");
        }
        let bad = [
            HoldRecord {
                item: "../x".into(),
                ..record()
            },
            HoldRecord {
                point: "a/b".into(),
                ..record()
            },
            HoldRecord {
                point: String::new(),
                ..record()
            },
            HoldRecord {
                tier: "Vault!".into(),
                ..record()
            },
            HoldRecord {
                target: PathBuf::from("relative.qcow2"),
                ..record()
            },
            HoldRecord {
                target: PathBuf::from(format!("/{}", "a".repeat(MAX_TARGET))),
                ..record()
            },
            HoldRecord {
                target: PathBuf::from("/srv/a\x1b[2Jb.qcow2"),
                ..record()
            },
            HoldRecord {
                target: PathBuf::from("/srv/a\nb.qcow2"),
                ..record()
            },
        ];
        for b in bad {
            let t = target_tag(&b.target);
            assert!(b.encode().is_err(), "{b:?}");
            // Written by hand, the same record is refused at decode time.
            let body = serde_json::to_vec(&b).unwrap();
            let e = envelope::encode(&HOLD_MAGIC, HOLD_VERSION, &body);
            assert!(HoldRecord::decode(&e, &t).is_err(), "{b:?}");
        }
        // A target that is not UTF-8 is refused when encoded (never an
        // empty body), and its tag hashes its bytes.
        use std::os::unix::ffi::OsStrExt;
        let raw = PathBuf::from(std::ffi::OsStr::from_bytes(b"/srv/\xff.qcow2"));
        let r8 = HoldRecord {
            target: raw.clone(),
            ..record()
        };
        assert!(r8.encode().unwrap_err().contains("UTF-8"));
        assert_ne!(
            target_tag(&raw),
            target_tag(Path::new("/srv/\u{fffd}.qcow2"))
        );
        // The tag of a UTF-8 path is what it always was.
        let old = blake3::hash(b"live//srv/vm/restored.qcow2").to_hex();
        assert_eq!(target_tag(&record().target), old[..16]);
        // JSON of another shape, in a good envelope.
        let odd = envelope::encode(&HOLD_MAGIC, HOLD_VERSION, b"{\"item\":1}");
        assert!(
            HoldRecord::decode(&odd, &tag)
                .unwrap_err()
                .contains("bad JSON")
        );
        assert!(fuzz_entry(&e));
        assert!(!fuzz_entry(&e[..e.len() - 1]));
        assert!(!fuzz_entry(b""));
    }
}
