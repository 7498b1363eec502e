//! libvirt's XML, both ways: the backup and checkpoint requests coffre
//! generates (every value escaped), and what coffre reads back from
//! `virsh` (a domain's disks, the user its QEMU runs as and whether it has
//! a guest agent channel; a running backup job's socket and exports; the
//! disks a checkpoint keeps a bitmap of, and the image each of them was
//! when the checkpoint was created).
//!
//! What libvirt prints is untrusted: it is parsed with a real XML parser
//! into a small bounded tree ([`parse`]: size, depth and element count
//! limited), only the fields coffre uses are read, and every name that
//! becomes an argument, an export or a path is checked (disk targets by
//! [`super::check_target`], checkpoint names by [`check_checkpoint_name`],
//! paths absolute and free of NUL).

use std::path::{Path, PathBuf};

use quick_xml::events::Event;

/// Largest XML document read.
pub const MAX_XML: usize = 4 << 20;
/// Deepest element nesting read.
const MAX_DEPTH: usize = 64;
/// Most elements read.
const MAX_ELEMENTS: usize = 200_000;

/// An element: its name, attributes, text and children.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// Element name.
    pub name: String,
    /// Attributes, in document order.
    pub attrs: Vec<(String, String)>,
    /// The element's own text (entities resolved), trimmed.
    pub text: String,
    /// Child elements.
    pub children: Vec<Node>,
}

impl Node {
    /// The value of attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first child element called `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child element called `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// Parses a whole XML document into its root element.
pub fn parse(text: &str) -> Result<Node, String> {
    if text.len() > MAX_XML {
        return Err(format!(
            "the XML is {} bytes, more than {MAX_XML}",
            text.len()
        ));
    }
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut elements = 0usize;
    let bad = |e: &dyn std::fmt::Display| format!("malformed XML: {e}");
    loop {
        let event = reader.read_event().map_err(|e| bad(&e))?;
        let empty = matches!(event, Event::Empty(_));
        match event {
            Event::Start(e) | Event::Empty(e) => {
                elements += 1;
                if elements > MAX_ELEMENTS || stack.len() >= MAX_DEPTH {
                    return Err("the XML is too large or too deep".into());
                }
                if root.is_some() {
                    return Err("malformed XML: more than one root element".into());
                }
                let mut node = Node {
                    name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                    ..Node::default()
                };
                for a in e.attributes() {
                    let a = a.map_err(|e| bad(&e))?;
                    let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
                    let value = a
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map_err(|e| bad(&e))?
                        .into_owned();
                    node.attrs.push((key, value));
                }
                if empty {
                    attach(&mut stack, &mut root, node);
                } else {
                    stack.push(node);
                }
            }
            Event::End(_) => {
                let mut node = stack
                    .pop()
                    .ok_or_else(|| "malformed XML: an end tag without a start".to_string())?;
                node.text = node.text.trim().to_string();
                attach(&mut stack, &mut root, node);
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.decode().map_err(|e| bad(&e))?);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.decode().map_err(|e| bad(&e))?);
                }
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| bad(&e))? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().map_err(|e| bad(&e))?;
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| format!("malformed XML: unknown entity &{name};"))?
                            .to_string()
                    }
                };
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&resolved);
                }
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err("malformed XML: an element is not closed".into());
    }
    root.ok_or_else(|| "the XML holds no element".into())
}

fn attach(stack: &mut [Node], root: &mut Option<Node>, node: Node) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(node),
        None => *root = Some(node),
    }
}

/// Escapes `s` for an attribute value or text.
pub fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// One disk of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The target (`vda`): the disk's name in every libvirt call.
    pub target: String,
    /// The image format (`raw`, `qcow2`), when the XML says.
    pub format: Option<String>,
    /// The disk's type: `file`, `block`, `network`, `volume`, …
    pub kind: String,
    /// The image file or block device, for `file` and `block` disks.
    pub source: Option<PathBuf>,
    /// What the disk is an image of, to tell two apart: the file or
    /// device path, `network PROTOCOL NAME` or `volume POOL/VOLUME`
    /// (`None` when the XML does not say, or says it with control
    /// characters or at more than 4096 bytes).
    pub identity: Option<String>,
    /// QEMU's device id (`virtio-disk0`), on a running domain.
    pub alias: Option<String>,
    /// The disk is read-only (`<readonly/>`).
    pub readonly: bool,
}

impl Disk {
    /// True when libvirt can keep a checkpoint (a persistent dirty bitmap)
    /// of this disk: a qcow2 image. A raw disk cannot.
    pub fn can_checkpoint(&self) -> bool {
        self.format.as_deref() == Some("qcow2")
    }
}

/// What coffre reads of a domain's XML (`virsh dumpxml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainXml {
    /// The domain's name.
    pub name: String,
    /// Its UUID (lower-case, `8-4-4-4-12` hex digits), when the XML has a
    /// well-formed one.
    pub uuid: Option<String>,
    /// Its disks (`device='disk'` only: no CD-ROM, floppy or LUN).
    pub disks: Vec<Disk>,
    /// The user and group QEMU runs as (the DAC label `+UID:+GID` of a
    /// running domain), when libvirt says.
    pub qemu_user: Option<(u32, u32)>,
    /// The domain has a guest agent channel (`org.qemu.guest_agent.0`);
    /// its state (`connected`, `disconnected`) when libvirt says.
    pub agent: Option<Option<String>>,
}

/// The name of the guest agent's channel.
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// Reads a domain's XML.
pub fn domain(text: &str) -> Result<DomainXml, String> {
    domain_of(&parse(text)?)
}

/// Reads a `<domain>` element (a whole document's root, or the domain a
/// checkpoint records).
fn domain_of(root: &Node) -> Result<DomainXml, String> {
    if root.name != "domain" {
        return Err(format!("expected a <domain>, got <{}>", root.name));
    }
    let name = root
        .child("name")
        .map(|n| n.text.clone())
        .ok_or("the domain XML has no <name>")?;
    let mut disks = Vec::new();
    let mut agent = None;
    if let Some(devices) = root.child("devices") {
        for d in devices.all("disk") {
            if d.attr("device").unwrap_or("disk") != "disk" {
                continue;
            }
            let target = d
                .child("target")
                .and_then(|t| t.attr("dev"))
                .ok_or("a <disk> has no <target dev=…>")?;
            super::check_target(target)?;
            if disks.iter().any(|x: &Disk| x.target == target) {
                return Err(format!("disk target {target} appears twice"));
            }
            let kind = d.attr("type").unwrap_or("file").to_string();
            let source = d.child("source").and_then(|s| match kind.as_str() {
                "file" => s.attr("file"),
                "block" => s.attr("dev"),
                _ => None,
            });
            let source = match source {
                Some(p) => Some(check_path(p)?),
                None => None,
            };
            let identity = match (&source, d.child("source")) {
                (Some(p), _) => Some(p.to_string_lossy().into_owned()),
                (None, Some(s)) => match kind.as_str() {
                    "network" => s
                        .attr("protocol")
                        .zip(s.attr("name"))
                        .map(|(p, n)| format!("network {p} {n}")),
                    "volume" => s
                        .attr("pool")
                        .zip(s.attr("volume"))
                        .map(|(p, v)| format!("volume {p}/{v}")),
                    _ => None,
                },
                (None, None) => None,
            }
            .filter(|i| i.len() <= 4096 && !i.chars().any(char::is_control));
            disks.push(Disk {
                target: target.to_string(),
                format: d
                    .child("driver")
                    .and_then(|x| x.attr("type"))
                    .map(str::to_string),
                kind,
                source,
                identity,
                alias: d
                    .child("alias")
                    .and_then(|a| a.attr("name"))
                    .map(str::to_string),
                readonly: d.child("readonly").is_some(),
            });
        }
        for c in devices.all("channel") {
            if let Some(t) = c.child("target")
                && t.attr("name") == Some(AGENT_CHANNEL)
            {
                agent = Some(t.attr("state").map(str::to_string));
            }
        }
    }
    let qemu_user = root
        .all("seclabel")
        .find(|s| s.attr("model") == Some("dac"))
        .and_then(|s| s.child("label"))
        .and_then(|l| dac_label(&l.text));
    let uuid = root
        .child("uuid")
        .map(|u| u.text.to_ascii_lowercase())
        .filter(|u| is_uuid(u));
    Ok(DomainXml {
        name,
        uuid,
        disks,
        qemu_user,
        agent,
    })
}

/// True for a UUID in its usual form: 36 characters, hex digits and `-`
/// at 8, 13, 18 and 23.
fn is_uuid(u: &str) -> bool {
    u.len() == 36
        && u.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Reads a DAC label `+UID:+GID` (or `UID:GID`); names are not resolved.
pub fn dac_label(label: &str) -> Option<(u32, u32)> {
    let (u, g) = label.split_once(':')?;
    let num = |s: &str| s.strip_prefix('+').unwrap_or(s).parse::<u32>().ok();
    Some((num(u)?, num(g)?))
}

/// An absolute path without NUL, as libvirt names files.
fn check_path(p: &str) -> Result<PathBuf, String> {
    if !p.starts_with('/') || p.contains('\0') || p.len() > 4096 {
        return Err(format!(
            "path {:?} is not an absolute path",
            p.chars().take(100).collect::<String>()
        ));
    }
    Ok(PathBuf::from(p))
}

/// A checkpoint name coffre creates or deletes: [`super::CHECKPOINT_PREFIX`]
/// and 1 to 64 lower-case letters, digits and `-`.
pub fn check_checkpoint_name(name: &str) -> Result<(), String> {
    let ok = name
        .strip_prefix(super::CHECKPOINT_PREFIX)
        .is_some_and(|r| {
            (1..=64).contains(&r.len())
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "checkpoint name {:?} is not coffre's ({}…)",
            name.chars().take(100).collect::<String>(),
            super::CHECKPOINT_PREFIX
        ))
    }
}

/// One disk's export in a running pull-mode backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// The disk's target.
    pub target: String,
    /// The NBD export name.
    pub name: String,
    /// The dirty bitmap exported with it (`backup-vda`) in an incremental
    /// backup: read as meta context `qemu:dirty-bitmap:NAME`.
    pub bitmap: Option<String>,
}

/// What coffre reads of a running backup job (`virsh backup-dumpxml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupJob {
    /// `pull` or `push`.
    pub mode: String,
    /// The NBD server's Unix socket (pull mode over a Unix socket).
    pub socket: Option<PathBuf>,
    /// The exported disks.
    pub exports: Vec<Export>,
}

/// A name libvirt gives an export or bitmap: 1 to 255 bytes of ASCII
/// letters, digits, `-`, `_` and `.`.
fn check_export_name(what: &str, name: &str) -> Result<(), String> {
    if (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Ok(())
    } else {
        Err(format!(
            "{what} name {:?} is not one coffre reads",
            name.chars().take(100).collect::<String>()
        ))
    }
}

/// Reads a running backup job's XML.
pub fn backup_job(text: &str) -> Result<BackupJob, String> {
    let root = parse(text)?;
    if root.name != "domainbackup" {
        return Err(format!("expected a <domainbackup>, got <{}>", root.name));
    }
    let socket = match root.child("server") {
        Some(s) if s.attr("transport") == Some("unix") => match s.attr("socket") {
            Some(p) => Some(check_path(p)?),
            None => None,
        },
        _ => None,
    };
    let mut exports = Vec::new();
    if let Some(disks) = root.child("disks") {
        for d in disks.all("disk") {
            if d.attr("backup") == Some("no") {
                continue;
            }
            let target = d.attr("name").ok_or("a backup <disk> has no name")?;
            super::check_target(target)?;
            let name = d.attr("exportname").unwrap_or(target);
            check_export_name("export", name)?;
            let bitmap = d.attr("exportbitmap");
            if let Some(b) = bitmap {
                check_export_name("bitmap", b)?;
            }
            exports.push(Export {
                target: target.to_string(),
                name: name.to_string(),
                bitmap: bitmap.map(str::to_string),
            });
        }
    }
    Ok(BackupJob {
        mode: root.attr("mode").unwrap_or("push").to_string(),
        socket,
        exports,
    })
}

/// What coffre reads of a checkpoint (`virsh checkpoint-dumpxml`, with
/// the domain it records).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Its name.
    pub name: String,
    /// The disks it keeps a dirty bitmap of.
    pub bitmaps: Vec<String>,
    /// The domain as it was when the checkpoint was created (libvirt
    /// records it; `None` when the XML holds none, as with
    /// `--no-domain` or a checkpoint redefined without it).
    pub domain: Option<DomainXml>,
}

impl Checkpoint {
    /// What disk `target` was an image of when the checkpoint was created
    /// ([`Disk::identity`]), when the checkpoint says.
    pub fn identity_of(&self, target: &str) -> Option<&str> {
        self.domain
            .as_ref()?
            .disks
            .iter()
            .find(|d| d.target == target)?
            .identity
            .as_deref()
    }
}

/// Reads a checkpoint's XML: the disks it keeps a bitmap of, and the
/// domain it records.
pub fn checkpoint(text: &str) -> Result<Checkpoint, String> {
    let root = parse(text)?;
    if root.name != "domaincheckpoint" {
        return Err(format!(
            "expected a <domaincheckpoint>, got <{}>",
            root.name
        ));
    }
    let name = root
        .child("name")
        .map(|n| n.text.clone())
        .ok_or("the checkpoint XML has no <name>")?;
    let mut bitmaps = Vec::new();
    if let Some(disks) = root.child("disks") {
        for d in disks.all("disk") {
            if d.attr("checkpoint") != Some("bitmap") {
                continue;
            }
            let target = d.attr("name").ok_or("a checkpoint <disk> has no name")?;
            super::check_target(target)?;
            bitmaps.push(target.to_string());
        }
    }
    let domain = match root.child("domain") {
        Some(d) => Some(domain_of(d).map_err(|e| format!("the domain it records: {e}"))?),
        None => None,
    };
    Ok(Checkpoint {
        name,
        bitmaps,
        domain,
    })
}

/// One disk of a backup request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRequest {
    /// The disk's target.
    pub target: String,
    /// Read only what changed since this checkpoint (`None`: the whole
    /// disk).
    pub incremental: Option<String>,
    /// The new checkpoint keeps a bitmap of this disk (qcow2 only).
    pub checkpoint: bool,
}

/// The `<domainbackup>` of a pull-mode backup of `disks`, exported on the
/// Unix socket `socket`, each disk's scratch file (the blocks the guest
/// overwrites while the backup runs) `TARGET.scratch` in `scratch_dir`.
pub fn backup_request(socket: &Path, scratch_dir: &Path, disks: &[DiskRequest]) -> String {
    let mut x = String::from("<domainbackup mode='pull'>\n");
    x.push_str(&format!(
        "  <server transport='unix' socket='{}'/>\n  <disks>\n",
        escape(&socket.to_string_lossy())
    ));
    for d in disks {
        let mode = match &d.incremental {
            Some(c) => format!("backupmode='incremental' incremental='{}'", escape(c)),
            None => "backupmode='full'".to_string(),
        };
        let scratch = scratch_dir.join(format!("{}.scratch", d.target));
        x.push_str(&format!(
            "    <disk name='{}' backup='yes' type='file' {mode}><scratch file='{}'/></disk>\n",
            escape(&d.target),
            escape(&scratch.to_string_lossy())
        ));
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

/// The `<domaincheckpoint>` created with the backup: a bitmap of every
/// disk that can keep one, `checkpoint='no'` for the others.
pub fn checkpoint_request(name: &str, description: &str, disks: &[DiskRequest]) -> String {
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>{}</description>\n  <disks>\n",
        escape(name),
        escape(description)
    );
    for d in disks {
        x.push_str(&format!(
            "    <disk name='{}' checkpoint='{}'/>\n",
            escape(&d.target),
            if d.checkpoint { "bitmap" } else { "no" }
        ));
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    x
}

/// Fuzz entry point: reads arbitrary bytes (when UTF-8) as each XML
/// libvirt sends coffre (a domain, a backup job, a checkpoint with the
/// domain it records); never
/// panics. Returns how many of the three readers accepted them.
pub fn fuzz_entry(data: &[u8]) -> usize {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    let d = domain(text).inspect(|d| {
        for disk in &d.disks {
            assert!(super::check_target(&disk.target).is_ok(), "{disk:?}");
            assert!(disk.source.as_ref().is_none_or(|p| p.is_absolute()));
        }
    });
    let b = backup_job(text);
    let c = checkpoint(text).inspect(|c| {
        for t in &c.bitmaps {
            assert!(super::check_target(t).is_ok(), "{t:?}");
        }
        if let Some(d) = &c.domain {
            for disk in &d.disks {
                assert!(disk.identity.as_ref().is_none_or(|i| i.len() <= 4096));
            }
        }
    });
    usize::from(d.is_ok()) + usize::from(b.is_ok()) + usize::from(c.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<domain type='qemu' id='2'>
  <name>coffre-t1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/tmp/lv/a.raw' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/tmp/lv/b &amp; c.qcow2' index='1'/>
      <backingStore type='file'><format type='raw'/><source file='/base.raw'/></backingStore>
      <target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/run/x.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
    </channel>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+107</label>
  </seclabel>
</domain>"#;

    #[test]
    fn a_domains_disks_user_and_agent_are_read() {
        let d = domain(LIVE).unwrap();
        assert_eq!(d.name, "coffre-t1");
        assert_eq!(d.disks.len(), 2, "the CD-ROM is no disk: {d:?}");
        assert_eq!(d.disks[0].target, "vda");
        assert!(!d.disks[0].can_checkpoint());
        assert_eq!(d.disks[0].alias.as_deref(), Some("virtio-disk0"));
        assert_eq!(
            d.disks[1].source.as_deref(),
            Some(Path::new("/tmp/lv/b & c.qcow2")),
            "the backing store's source is not the disk's"
        );
        assert!(d.disks[1].can_checkpoint());
        assert_eq!(d.qemu_user, Some((64055, 107)));
        assert_eq!(d.uuid, None);
        let u = domain(&LIVE.replace(
            "</name>",
            "</name><uuid>341684DD-8397-44b2-8de7-2c99e058d012</uuid>",
        ))
        .unwrap();
        assert_eq!(
            u.uuid.as_deref(),
            Some("341684dd-8397-44b2-8de7-2c99e058d012")
        );
        let bad = domain(&LIVE.replace("</name>", "</name><uuid>../../x</uuid>")).unwrap();
        assert_eq!(bad.uuid, None);
        assert_eq!(d.agent, Some(Some("disconnected".into())));
    }

    #[test]
    fn hostile_domain_xml_is_refused() {
        for bad in [
            "",
            "<domain>",
            "<domain><name>x</name></domainx>",
            "<other/>",
            "<domain/>",
            "<domain><name>x</name><devices><disk><target dev='../../x'/></disk></devices></domain>",
            "<domain><name>x</name><devices><disk><target dev='vda'/><source file='rel'/></disk></devices></domain>",
            "<domain><name>x</name><devices><disk><target dev='vda'/></disk><disk><target dev='vda'/></disk></devices></domain>",
            "<domain><name>&bogus;</name></domain>",
        ] {
            assert!(domain(bad).is_err(), "{bad:?}");
        }
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn backup_jobs_and_checkpoints_are_read() {
        let j = backup_job(
            "<domainbackup mode='pull'><server transport='unix' socket='/tmp/w/nbd.sock'/><disks>\
             <disk name='vda' backup='yes' exportname='vda'/>\
             <disk name='vdb' backup='yes' exportname='vdb' exportbitmap='backup-vdb'/>\
             <disk name='vdc' backup='no'/></disks></domainbackup>",
        )
        .unwrap();
        assert_eq!(j.mode, "pull");
        assert_eq!(j.socket.as_deref(), Some(Path::new("/tmp/w/nbd.sock")));
        assert_eq!(j.exports.len(), 2);
        assert_eq!(j.exports[1].bitmap.as_deref(), Some("backup-vdb"));
        assert!(
            backup_job(
                "<domainbackup mode='pull'><disks><disk name='vda' exportname='a/b'/></disks></domainbackup>"
            )
            .is_err()
        );
        let c = checkpoint(
            "<domaincheckpoint><name>coffre-1</name><disks><disk name='vda' checkpoint='no'/>\
             <disk name='vdb' checkpoint='bitmap' bitmap='coffre-1'/></disks></domaincheckpoint>",
        )
        .unwrap();
        assert_eq!(c.name, "coffre-1");
        assert_eq!(c.bitmaps, vec!["vdb".to_string()]);
        assert_eq!(c.domain, None, "--no-domain: no record of the images");
        assert_eq!(c.identity_of("vdb"), None);
        let with = format!(
            "<domaincheckpoint><name>coffre-1</name><disks>\
             <disk name='vda' checkpoint='bitmap'/><disk name='vdb' checkpoint='bitmap'/></disks>{}\
             </domaincheckpoint>",
            LIVE.replace("id='2'", "")
        );
        let c = checkpoint(&with).unwrap();
        assert_eq!(c.bitmaps, vec!["vda".to_string(), "vdb".to_string()]);
        assert_eq!(c.identity_of("vda"), Some("/tmp/lv/a.raw"));
        assert_eq!(c.identity_of("vdb"), Some("/tmp/lv/b & c.qcow2"));
        assert_eq!(c.identity_of("vdc"), None);
        assert!(
            checkpoint(&with.replace("dev='vdb'", "dev='../b'")).is_err(),
            "the recorded domain is checked like a live one"
        );
        let net = domain(
            "<domain><name>n</name><devices>\
             <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/><target dev='vda'/></disk>\
             <disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdb'/></disk>\
             <disk type='network' device='disk'><source protocol='nbd' name='a&#10;b'/><target dev='vdc'/></disk>\
             </devices></domain>",
        )
        .unwrap();
        assert_eq!(
            net.disks[0].identity.as_deref(),
            Some("network rbd pool/img")
        );
        assert_eq!(net.disks[1].identity.as_deref(), Some("volume p/v"));
        assert_eq!(net.disks[2].identity, None, "no control characters");
        check_checkpoint_name("coffre-20260101t000000-0a1b2c3d").unwrap();
        for bad in ["coffre-", "other-1", "coffre-A", "coffre-a/b", "coffre-a b"] {
            assert!(check_checkpoint_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_are_escaped_and_read_back() {
        let disks = [
            DiskRequest {
                target: "vda".into(),
                incremental: None,
                checkpoint: false,
            },
            DiskRequest {
                target: "vdb".into(),
                incremental: Some("coffre-1".into()),
                checkpoint: true,
            },
        ];
        let b = backup_request(
            Path::new("/tmp/a'b/nbd.sock"),
            Path::new("/tmp/a'b"),
            &disks,
        );
        let root = parse(&b).unwrap();
        assert_eq!(
            root.child("server").unwrap().attr("socket"),
            Some("/tmp/a'b/nbd.sock")
        );
        let d: Vec<&Node> = root.child("disks").unwrap().all("disk").collect();
        assert_eq!(d[0].attr("backupmode"), Some("full"));
        assert_eq!(d[1].attr("incremental"), Some("coffre-1"));
        assert_eq!(
            d[1].child("scratch").unwrap().attr("file"),
            Some("/tmp/a'b/vdb.scratch")
        );
        let c = checkpoint_request("coffre-2", "job <x> & y", &disks);
        assert_eq!(checkpoint(&c).unwrap().bitmaps, vec!["vdb".to_string()]);
        assert_eq!(
            parse(&c).unwrap().child("description").unwrap().text,
            "job <x> & y"
        );
    }
}
