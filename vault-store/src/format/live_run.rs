//! The run file codec (`<runtime dir>/live/TAG.run`): how an unfinished
//! live restore was started (its vault, tier, item, target, VM and device),
//! written by each run of it into coffre's private runtime folder so that
//! `coffre daemon` can resume it without a human once the run is gone
//! (`FORMAT.md`, "Live restore run files"). An [`envelope`] with a JSON
//! body, every field checked at decode time; fuzzed:
//! `fuzz/fuzz_targets/live_run.rs`.
//!
//! It is the host's file, not the vault's: the daemon trusts the folder
//! (its user's, `0700`) for *which* QEMU to drive; nothing of it comes
//! from a vault, whose holds name targets but never a monitor.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::format::envelope;
use crate::format::hold::{check_path, target_tag};
use crate::format::name::check_name;

/// Run file magic. Frozen.
pub const RUN_MAGIC: [u8; 8] = *b"CFLVRUN\0";
/// Run file version.
pub const RUN_VERSION: u32 = 1;
/// The suffix of a run file's name.
pub const RUN_SUFFIX: &str = ".run";
/// Largest body of a run file.
const MAX_RUN_BODY: usize = 16 << 10;
/// Largest run file (its envelope's 20 bytes around the body).
pub const MAX_RUN_FILE: u64 = MAX_RUN_BODY as u64 + 20;
/// Longest libvirt domain name or connection URI.
const MAX_DOMAIN: usize = 1024;
/// Longest device id or bus (QEMU's ids as coffre passes them).
pub const MAX_DEVICE_ID: usize = 64;
/// Longest reconnect delay, in seconds (QEMU's field is 32 bits).
const MAX_RECONNECT_DELAY: u64 = u32::MAX as u64;
/// The tiers `--from` names.
const TIERS: [&str; 3] = ["snapshot", "vault", "secondary"];

/// How to run an unfinished live restore again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRun {
    /// The vault as `--vault` named it (canonical).
    pub vault: PathBuf,
    /// The tier `--from` asked (`None`: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The item.
    pub item: String,
    /// The target's canonical path; its tag names the file.
    pub target: PathBuf,
    /// The VM's QEMU monitor socket (exactly one of `qmp` and `domain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp: Option<PathBuf>,
    /// The libvirt domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The libvirt connection URI (`None`: libvirt's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    /// The device given the target.
    pub device: String,
    /// The bus of a new device (`--bus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// `--swap-running-disk`.
    #[serde(default)]
    pub swap_running: bool,
    /// Seconds QEMU waits for a gone export.
    pub reconnect_delay: u64,
}

/// The name of the run file of the live restore into `target`, in the
/// runtime folder's `live/`.
pub fn run_file_name(target: &Path) -> String {
    format!("{}{RUN_SUFFIX}", target_tag(target))
}

/// True for a device id or bus coffre passes to QEMU: 1 to 64 letters,
/// digits, `-`, `_` or `.`, a letter first.
pub fn is_device_id(id: &str) -> bool {
    (1..=MAX_DEVICE_ID).contains(&id.len())
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Checks a libvirt name or URI: 1 to [`MAX_DOMAIN`] bytes without
/// control characters.
fn check_text(what: &str, s: &str) -> Result<(), String> {
    if (1..=MAX_DOMAIN).contains(&s.len()) && !s.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(format!(
            "{what} {:?} is not 1 to {MAX_DOMAIN} bytes without control characters",
            s.chars().take(80).collect::<String>()
        ))
    }
}

impl LiveRun {
    /// Encodes the run file (checked first: one that would not decode is
    /// refused).
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        self.check()?;
        let body = serde_json::to_vec(self).map_err(|e| format!("cannot encode it: {e}"))?;
        Ok(envelope::encode(&RUN_MAGIC, RUN_VERSION, &body))
    }

    /// Decodes a run file read as `file_name`: every field is checked, and
    /// the file must be the one of the target it names.
    pub fn decode(bytes: &[u8], file_name: &str) -> Result<Self, String> {
        let r = Self::decode_body(bytes)?;
        if run_file_name(&r.target) != file_name {
            return Err(format!(
                "it names target {:?} whose run file is not this one",
                r.target
            ));
        }
        Ok(r)
    }

    /// Decodes and checks a run file, whatever its name.
    pub fn decode_body(bytes: &[u8]) -> Result<Self, String> {
        let (_, body) = envelope::decode(&RUN_MAGIC, RUN_VERSION, MAX_RUN_BODY, bytes)
            .map_err(|e| e.to_string())?;
        let r: LiveRun = serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
        r.check()?;
        Ok(r)
    }

    /// Checks every field.
    pub fn check(&self) -> Result<(), String> {
        check_path("vault", &self.vault)?;
        check_path("target", &self.target)?;
        check_name("item", &self.item).map_err(|e| e.to_string())?;
        if let Some(t) = &self.from
            && !TIERS.contains(&t.as_str())
        {
            return Err(format!(
                "tier {:?} is not one of {}",
                t.chars().take(40).collect::<String>(),
                TIERS.join(", ")
            ));
        }
        match (&self.qmp, &self.domain) {
            (Some(q), None) => {
                check_path("QMP socket", q)?;
                if self.connect.is_some() {
                    return Err("a connection URI without a domain".into());
                }
            }
            (None, Some(d)) => {
                check_text("domain", d)?;
                if let Some(c) = &self.connect {
                    check_text("connection URI", c)?;
                }
            }
            _ => return Err("it must name exactly one of a QMP socket and a domain".into()),
        }
        for (what, id) in [("device", Some(&self.device)), ("bus", self.bus.as_ref())] {
            if let Some(id) = id
                && !is_device_id(id)
            {
                return Err(format!(
                    "{what} {:?} is not 1 to {MAX_DEVICE_ID} letters, digits, '-', '_' or '.', a letter first",
                    id.chars().take(80).collect::<String>()
                ));
            }
        }
        if self.reconnect_delay > MAX_RECONNECT_DELAY {
            return Err(format!(
                "reconnect delay {} s is over {MAX_RECONNECT_DELAY}",
                self.reconnect_delay
            ));
        }
        Ok(())
    }
}

/// Fuzz entry: decodes a run file, and checks it under its own name.
pub fn fuzz_entry(data: &[u8]) -> bool {
    LiveRun::decode_body(data)
        .is_ok_and(|r| LiveRun::decode(data, &run_file_name(&r.target)).is_ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn run() -> LiveRun {
        LiveRun {
            vault: PathBuf::from("/srv/vault"),
            from: None,
            item: "vm".into(),
            target: PathBuf::from("/srv/vm/restored.qcow2"),
            qmp: Some(PathBuf::from("/run/vm/qmp.sock")),
            domain: None,
            connect: None,
            device: "vda".into(),
            bus: None,
            swap_running: false,
            reconnect_delay: 300,
        }
    }

    fn name(r: &LiveRun) -> String {
        run_file_name(&r.target)
    }

    #[test]
    fn a_run_file_round_trips_under_its_targets_name_only() {
        for r in [
            run(),
            LiveRun {
                from: Some("secondary".into()),
                qmp: None,
                domain: Some("web-1".into()),
                connect: Some("qemu:///system".into()),
                bus: Some("pcie.1".into()),
                swap_running: true,
                ..run()
            },
        ] {
            let bytes = r.encode().unwrap();
            assert_eq!(LiveRun::decode(&bytes, &name(&r)).unwrap(), r);
            let other = run_file_name(Path::new("/srv/vm/other.qcow2"));
            let e = LiveRun::decode(&bytes, &other).unwrap_err();
            assert!(e.contains("not this one"), "{e}");
            assert!(fuzz_entry(&bytes));
        }
    }

    #[test]
    fn every_field_is_checked_when_encoding_and_decoding() {
        let bad = [
            LiveRun {
                vault: "relative".into(),
                ..run()
            },
            LiveRun {
                target: "/a\nb".into(),
                ..run()
            },
            LiveRun {
                item: "../x".into(),
                ..run()
            },
            LiveRun {
                from: Some("tape".into()),
                ..run()
            },
            LiveRun {
                domain: Some("web".into()),
                ..run()
            },
            LiveRun { qmp: None, ..run() },
            LiveRun {
                connect: Some("qemu:///system".into()),
                ..run()
            },
            LiveRun {
                qmp: None,
                domain: Some("a\u{7}b".into()),
                ..run()
            },
            LiveRun {
                qmp: Some("sock".into()),
                ..run()
            },
            LiveRun {
                device: "vd a".into(),
                ..run()
            },
            LiveRun {
                device: "1vda".into(),
                ..run()
            },
            LiveRun {
                bus: Some(String::new()),
                ..run()
            },
            LiveRun {
                reconnect_delay: u64::MAX,
                ..run()
            },
        ];
        for r in bad {
            assert!(r.encode().is_err(), "{r:?}");
            let body = serde_json::to_vec(&r).unwrap();
            let bytes = envelope::encode(&RUN_MAGIC, RUN_VERSION, &body);
            assert!(LiveRun::decode_body(&bytes).is_err(), "{r:?}");
            assert!(!fuzz_entry(&bytes));
        }
    }

    #[test]
    fn damaged_files_are_refused() {
        let bytes = run().encode().unwrap();
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(
            LiveRun::decode_body(&flipped)
                .unwrap_err()
                .contains("checksum")
        );
        assert!(LiveRun::decode_body(&bytes[..bytes.len() - 1]).is_err());
        let newer = envelope::encode(&RUN_MAGIC, RUN_VERSION + 1, b"{}");
        assert!(
            LiveRun::decode_body(&newer)
                .unwrap_err()
                .contains("version")
        );
        let hold = envelope::encode(&crate::format::hold::HOLD_MAGIC, 1, b"{}");
        assert!(LiveRun::decode_body(&hold).unwrap_err().contains("magic"));
        let odd = envelope::encode(&RUN_MAGIC, RUN_VERSION, b"{\"vault\":1}");
        assert!(LiveRun::decode_body(&odd).unwrap_err().contains("JSON"));
    }
}
