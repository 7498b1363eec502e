//! Running VMs: talking to QEMU's monitor ([`qmp`]) and to the guest
//! agent inside the VM ([`agent`]). Both speak JSON lines over a Unix
//! socket ([`json_lines`]); every byte they send back is untrusted: a line
//! is bounded, parsed whole, and only the fields a caller needs are read
//! (`FORMAT.md`, "QEMU monitor and guest agent").
//!
//! On that ground: the drive a user names ([`node`]), its point in time
//! ([`fleece`]), its dirty-bitmap chain ([`bitmap`]), the host lock that
//! keeps two live backups off one monitor ([`monitor_lock`]), and the
//! backup source that puts them together with the guest's freeze
//! ([`live`]).
//! A live restore's target, given to a VM and filled by QEMU's own
//! `block-stream` job, is [`stream`]'s, written once over a [`monitor`]
//! (a QMP socket, or libvirt's passthrough to a domain's QEMU).
//! libvirt domains are driven through `virsh` instead ([`libvirt`]).
//! The output of the tools run (`virsh`, `qemu-img`) is read without
//! blocking them, bounded ([`pipe`]).
//! The host-wide locks of both, one `flock`ed file per monitor or domain
//! in coffre's private runtime folder, are [`host_lock`]'s.

pub mod agent;
pub mod bitmap;
pub mod fleece;
pub mod host_lock;
pub mod json_lines;
pub mod libvirt;
pub mod live;
pub mod monitor;
pub mod monitor_lock;
pub mod node;
pub mod pipe;
pub mod qmp;
pub mod stream;

/// True when `s` names a drive of a running VM ([`live::QmpTarget`]).
pub fn is_qmp_source(s: &str) -> bool {
    s.starts_with("qmp+unix:///")
}

/// Fuzz entry point: reads arbitrary bytes as the lines a QEMU monitor or a
/// guest agent sends and decodes each; never panics. Returns how many
/// lines one of the two decoders accepted.
pub fn fuzz_entry(data: &[u8]) -> usize {
    let mut r = std::io::Cursor::new(data);
    let mut accepted = 0;
    for _ in 0..1024 {
        match json_lines::read_line(&mut r, json_lines::MAX_LINE, false) {
            Ok(Some(line)) => {
                let q = qmp::decode(&line).is_ok();
                let a = agent::decode(&line).is_ok();
                accepted += usize::from(q || a);
            }
            Ok(None) | Err(_) => break,
        }
    }
    accepted
}
