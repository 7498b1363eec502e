//! libvirt domains: every disk of a domain backed up at one instant
//! through libvirt's own backup API, `backup-begin` in pull mode, with
//! checkpoints for incremental runs.
//!
//! coffre drives libvirt through `virsh` with XML it generates
//! ([`xml`]), not through the libvirt C library: `virsh` ships with every
//! libvirt (`libvirt-clients`), so coffre needs no libvirt headers to
//! build and links nothing more; each call runs in a process of its own
//! under a timeout ([`virsh`]), so a libvirtd that hangs cannot hang
//! coffre; and what it does is what an administrator would type, so every
//! step can be read and replayed by hand. The price is a process per call
//! (a few per backup) and output to parse: it is parsed as untrusted input
//! (bounded, XML read with a real parser, names and paths checked).
//!
//! - [`domain`]: the `virsh` calls on one domain (state, XML, checkpoints,
//!   the backup job, filesystem freeze).
//! - [`lock`]: the host-wide lock of a domain (a
//!   [`crate::vm::host_lock`]), held for a whole run, so that two coffre
//!   runs never back one domain up at once.
//! - [`pull`]: one pull-mode backup: the private folder of its NBD socket
//!   and scratch files, the freeze around the instant, `backup-begin`, the
//!   exports, and the end of the job (`domjobabort`) whatever happens;
//!   what a killed run left is found and removed by name.
//! - [`workdir`]: a pull backup's private folder (the part QEMU's user
//!   may write kept apart), a live restore's (its export's socket handed
//!   to QEMU's user), and their removal through descriptors that follow no
//!   symlink.
//! - [`monitor`]: the domain's QEMU monitor through libvirt's QMP
//!   passthrough, for a live restore (`restore --live --domain`), which
//!   taints the domain.
//!
//! Every checkpoint coffre creates is named [`CHECKPOINT_PREFIX`], 8 hex
//! digits of the vault ([`vault_checkpoint_prefix`]) and the domain job's
//! id; the NBD socket lives in `q/` of a folder named
//! `coffre-libvirt-PID-…`. A disk is recorded as the item source
//! `libvirt:///DOMAIN/TARGET?connect=URI` ([`libvirt_source`]).

pub mod domain;
pub mod lock;
pub mod monitor;
pub mod pull;
pub mod virsh;
pub mod workdir;
pub mod xml;

/// How a disk of a domain is recorded as an item's source.
pub const SCHEME: &str = "libvirt:///";

/// The prefix of every checkpoint coffre creates.
pub const CHECKPOINT_PREFIX: &str = "coffre-";

/// The prefix of the checkpoints one vault creates: `coffre-` and 8 hex
/// digits of the vault's id, so that two vaults protecting one domain each
/// delete only their own.
pub fn vault_checkpoint_prefix(vault_id: &str) -> String {
    let tag = blake3::hash(vault_id.as_bytes()).to_hex();
    format!("{CHECKPOINT_PREFIX}{}-", &tag[..8])
}

/// The source the disk `target` of `domain` is recorded as:
/// `libvirt:///DOMAIN/TARGET?connect=URI`.
pub fn libvirt_source(connect: &str, domain: &str, target: &str) -> String {
    format!("{SCHEME}{domain}/{target}?connect={connect}")
}

/// True when `s` names a disk of a libvirt domain ([`libvirt_source`]).
pub fn is_libvirt_source(s: &str) -> bool {
    s.starts_with(SCHEME)
}

/// The item a disk of a domain is backed up as: `DOMAIN-TARGET`.
pub fn item_name(domain: &str, target: &str) -> String {
    format!("{domain}-{target}")
}

/// A parsed [`libvirt_source`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSource {
    /// The libvirt connection URI.
    pub connect: String,
    /// The domain's name.
    pub domain: String,
    /// The disk's target (`vda`).
    pub target: String,
}

impl DiskSource {
    /// Parses `libvirt:///DOMAIN/TARGET?connect=URI` (the URI is the rest
    /// of the string: it may hold `?` and `&` of its own).
    pub fn parse(s: &str) -> Result<DiskSource, String> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| format!("{s:?} does not start with {SCHEME}"))?;
        let (path, connect) = rest
            .split_once("?connect=")
            .ok_or_else(|| format!("{s:?} has no ?connect=URI"))?;
        let (domain, target) = path
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not {SCHEME}DOMAIN/TARGET?connect=URI"))?;
        check_domain_name(domain)?;
        check_target(target)?;
        check_connect(connect)?;
        Ok(DiskSource {
            connect: connect.to_string(),
            domain: domain.to_string(),
            target: target.to_string(),
        })
    }
}

/// Longest domain name coffre takes (its items are `NAME-TARGET`, within
/// the item name rule's 128 bytes).
pub const MAX_DOMAIN_NAME: usize = 100;

/// A domain name coffre can name items after: the item name rule
/// (letters, digits, `.`, `_`, `-`, starting with a letter or digit), at
/// most [`MAX_DOMAIN_NAME`] bytes.
pub fn check_domain_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_DOMAIN_NAME {
        return Err(format!(
            "domain name {:?} is longer than {MAX_DOMAIN_NAME} bytes",
            name.chars().take(100).collect::<String>()
        ));
    }
    coffre_vault_store::format::name::check_name("domain", name)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A disk target coffre names an item after: `vd`, `sd`, `hd` or `xvd`
/// and one to three lower-case letters (`vda`, `sdab`).
pub fn check_target(target: &str) -> Result<(), String> {
    let letters = ["xvd", "vd", "sd", "hd"]
        .iter()
        .find_map(|p| target.strip_prefix(p));
    match letters {
        Some(l) if (1..=3).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_lowercase()) => {
            Ok(())
        }
        _ => Err(format!(
            "disk target {:?} is not vd, sd, hd or xvd and 1 to 3 lower-case letters",
            target.chars().take(40).collect::<String>()
        )),
    }
}

/// A libvirt connection URI coffre passes to `virsh --connect`: 1 to 1024
/// printable ASCII characters, a scheme (`qemu:///system`), not an option.
pub fn check_connect(uri: &str) -> Result<(), String> {
    let shown = || uri.chars().take(100).collect::<String>();
    if uri.is_empty() || uri.len() > 1024 {
        return Err(format!("connection URI {:?} is empty or too long", shown()));
    }
    if !uri.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "connection URI {:?} holds a space or a character that is not printable ASCII",
            shown()
        ));
    }
    let scheme_ok = uri.split_once(':').is_some_and(|(scheme, _)| {
        scheme
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    });
    if !scheme_ok {
        return Err(format!(
            "connection URI {:?} has no scheme (such as qemu:///system)",
            shown()
        ));
    }
    Ok(())
}

/// The host a connection URI names (`h` of `qemu+ssh://root@h:22/system`),
/// `None` for a URI of this host (`qemu:///system`, `test:///default`).
pub fn remote_host(uri: &str) -> Option<&str> {
    let (_, rest) = uri.split_once(':')?;
    let rest = rest.strip_prefix("//")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then_some(host)
}

/// Refuses a connection URI that names a host: coffre reads a running
/// domain's disks through the NBD socket libvirt opens on the domain's
/// host, and a stopped domain's image files directly, so both must be on
/// this host.
pub fn check_local(uri: &str) -> Result<(), String> {
    match remote_host(uri) {
        None => Ok(()),
        Some(host) => Err(format!(
            "connection {uri} names host {host}: coffre backs up only domains of the host it runs on (a running domain's disks are read through the Unix socket libvirt opens on the domain's host, a stopped domain's image files directly); run coffre on {host} with a local URI such as qemu:///system"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_source_round_trips_and_bad_ones_are_refused() {
        let s = libvirt_source("qemu+ssh://h/system?keyfile=/k&x=1", "vm1", "vdb");
        assert!(is_libvirt_source(&s));
        let d = DiskSource::parse(&s).unwrap();
        assert_eq!(d.domain, "vm1");
        assert_eq!(d.target, "vdb");
        assert_eq!(d.connect, "qemu+ssh://h/system?keyfile=/k&x=1");
        for bad in [
            "libvirt:///vm1/vdb",
            "libvirt:///vm1?connect=qemu:///system",
            "libvirt:///../vda?connect=qemu:///system",
            "libvirt:///vm1/vda0?connect=qemu:///system",
            "libvirt:///vm1/vda?connect=-x",
            "libvirt:///vm1/vda?connect=qemu:///sys tem",
            "nbd:///vm1/vda?connect=qemu:///system",
        ] {
            assert!(DiskSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_names_and_uris() {
        for ok in ["vda", "vdz", "sdab", "hdc", "xvdaaa"] {
            check_target(ok).unwrap();
        }
        for bad in ["", "vd", "vdA", "vd1", "vdabcd", "nvme0n1", "../a", "fda"] {
            assert!(check_target(bad).is_err(), "{bad:?}");
        }
        check_domain_name("web-1.prod_a").unwrap();
        for bad in ["", "-x", "a/b", "a b", "é", &"a".repeat(101)] {
            assert!(check_domain_name(bad).is_err(), "{bad:?}");
        }
        for local in [
            "qemu:///system",
            "qemu:///session",
            "test:///default",
            "qemu+unix:///system?socket=/run/x.sock",
        ] {
            assert_eq!(remote_host(local), None, "{local}");
            check_local(local).unwrap();
        }
        for (remote, host) in [
            ("qemu+ssh://h1/system", "h1"),
            ("qemu+ssh://root@h2:2222/system?keyfile=/k", "h2:2222"),
            ("qemu+tcp://localhost/system", "localhost"),
            ("qemu://h3", "h3"),
        ] {
            assert_eq!(remote_host(remote), Some(host), "{remote}");
            let e = check_local(remote).unwrap_err();
            assert!(e.contains(host) && e.contains("qemu:///system"), "{e}");
        }
        check_connect("qemu:///system").unwrap();
        check_connect("test:///default").unwrap();
        for bad in ["", "-c", "system", "qemu:///a b", "qemu:///\n", "1x:///a"] {
            assert!(check_connect(bad).is_err(), "{bad:?}");
        }
    }
}
