//! NBD sources: a disk exported over the Network Block Device protocol
//! (`qemu-nbd` over a qcow2 or any format QEMU reads, a libvirt pull-mode
//! `backup-begin` export, nbdkit) read as an [`ImageSource`], and its QEMU
//! dirty bitmaps read as changed-block [`Hint`]s.
//!
//! Addresses are NBD URIs: `nbd://HOST[:PORT]/EXPORT` (port 10809 by
//! default) and `nbd+unix:///EXPORT?socket=PATH`. The protocol itself is in
//! [`wire`]. Holes and zero extents (`base:allocation`) are never read.

pub mod listen;
pub mod qemu;
pub mod wire;

use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::cbt::{Hint, HintSource};
use crate::error::{Result, SnapError};
use crate::source::{BufferPool, ImageSource, Window, overlaps};
use wire::{Client, STATE_DIRTY, STATE_HOLE, STATE_ZERO, WireError};

/// The `base:allocation` meta context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of QEMU dirty-bitmap meta contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// Most bytes one block-status request asks about.
const STATUS_SPAN: u64 = 1 << 30;
/// Bytes one read request asks for (a window's requests are pipelined;
/// nbdcopy's default size). QEMU's NBD server (7.2) allocates a buffer per
/// request: one of 1 MiB or more is a fresh mapping every time, and freed
/// heap pages go back to the kernel (`madvise`) between requests.
/// Reading 1.1 GB through a fleecing export cost it ~250,000 page faults in
/// 4 MiB requests, ~128,000 in 512 KiB ones and ~51,000 in 256 KiB ones,
/// and a full backup 0.1 s more CPU in 4 MiB requests than in any of
/// 128-512 KiB.
const REQUEST_BYTES: usize = 256 << 10;
/// Idle window buffers an image keeps for its next windows (a capture
/// pass has two windows alive: the one it hashes, the one being read).
const IDLE_BUFFERS: usize = 2;

/// Where an NBD export is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// TCP host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix {
        /// The socket's path.
        socket: PathBuf,
    },
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: Address,
    /// The export name (may be empty: the default export).
    pub export: String,
}

/// The `nbd_uri` fuzz target's body: parses `data` as a URI (when it is
/// UTF-8) and checks what a parsed URI promises. True when it parsed.
pub fn fuzz_uri_entry(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(uri) = NbdUri::parse(text) else {
        return false;
    };
    assert!(is_nbd_uri(text), "{text:?}");
    if let Address::Tcp { host, port } = &uri.address {
        assert!(*port != 0 && !host.is_empty(), "{text:?}: {uri:?}");
    }
    true
}

/// True when `s` looks like an NBD URI (and not like a file name).
pub fn is_nbd_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+unix://")
}

impl NbdUri {
    /// Parses `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(uri: &str) -> std::result::Result<NbdUri, String> {
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !path.is_empty() && !path.starts_with('/') {
                return Err("nbd+unix URIs have no host: nbd+unix:///EXPORT?socket=PATH".into());
            }
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or("an nbd+unix URI needs ?socket=PATH")?;
            return Ok(NbdUri {
                address: Address::Unix {
                    socket: PathBuf::from(socket),
                },
                export: path.trim_start_matches('/').to_string(),
            });
        }
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or("an NBD URI starts with nbd:// or nbd+unix://")?;
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        if export.contains('?') {
            return Err("nbd:// URIs take no query (TLS is not supported)".into());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?,
            ),
            _ => (authority, 10809),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("an nbd:// URI needs a host".into());
        }
        Ok(NbdUri {
            address: Address::Tcp {
                host: host.to_string(),
                port,
            },
            export: export.to_string(),
        })
    }
}

/// Opens an image by its source: an NBD URI, a qcow2 file (through a
/// `qemu-nbd` of our own), or a raw file or block device; with `bitmap`,
/// also the hint its dirty bitmap gives (a raw image has none).
pub fn open_any(
    source: &Path,
    bitmap: Option<&str>,
) -> Result<(Box<dyn ImageSource>, Option<Hint>)> {
    let text = source.to_string_lossy();
    let nbd = if is_nbd_uri(&text) {
        NbdImage::open(&text, bitmap)?
    } else if qemu::is_qcow2(source) {
        NbdImage::open_file(source, bitmap)?
    } else {
        if let Some(b) = bitmap {
            return Err(SnapError::BitmapNeedsNbd {
                path: source.to_path_buf(),
                bitmap: b.to_string(),
            });
        }
        return Ok((Box::new(crate::source::FileImage::open(source)?), None));
    };
    let hint = nbd.bitmap_hint()?;
    Ok((Box::new(nbd), hint))
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// An NBD export opened for reading.
pub struct NbdImage {
    name: PathBuf,
    client: Mutex<Client<Box<dyn Stream>>>,
    size: u64,
    allocation: Option<u32>,
    bitmap: Option<(String, u32)>,
    /// Window buffers, reused.
    buffers: BufferPool,
    /// The `qemu-nbd` coffre started for a qcow2 file (stopped last).
    server: Option<qemu::QemuNbd>,
}

impl std::fmt::Debug for NbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdImage")
            .field("uri", &self.name)
            .field("size", &self.size)
            .field("bitmap", &self.bitmap)
            .finish()
    }
}

impl NbdImage {
    /// Connects to `uri` and, with `bitmap`, asks for its dirty bitmap.
    pub fn open(uri: &str, bitmap: Option<&str>) -> Result<NbdImage> {
        let fail = |reason: String| SnapError::Nbd {
            uri: uri.to_string(),
            reason,
        };
        let parsed = NbdUri::parse(uri).map_err(&fail)?;
        let stream: Box<dyn Stream> = match &parsed.address {
            Address::Tcp { host, port } => {
                let s = std::net::TcpStream::connect((host.as_str(), *port))
                    .map_err(|e| fail(format!("cannot connect to {host}:{port}: {e}")))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Address::Unix { socket } => Box::new(
                std::os::unix::net::UnixStream::connect(socket)
                    .map_err(|e| fail(format!("cannot connect to {}: {e}", socket.display())))?,
            ),
        };
        let mut contexts = vec![BASE_ALLOCATION.to_string()];
        if let Some(b) = bitmap {
            contexts.push(format!("{DIRTY_BITMAP_PREFIX}{b}"));
        }
        let client = Client::handshake(stream, &parsed.export, &contexts)
            .map_err(|e| fail(e.to_string()))?;
        let export = client.export().clone();
        let find = |name: &str| {
            export
                .contexts
                .iter()
                .find(|(_, n)| n == name)
                .map(|(id, _)| *id)
        };
        let bitmap = match bitmap {
            None => None,
            Some(b) => {
                let id = find(&format!("{DIRTY_BITMAP_PREFIX}{b}")).ok_or_else(|| {
                    fail(format!(
                        "the export has no dirty bitmap {b:?} (start qemu-nbd with -B {b}, or check the libvirt checkpoint)"
                    ))
                })?;
                Some((b.to_string(), id))
            }
        };
        Ok(NbdImage {
            name: PathBuf::from(uri),
            client: Mutex::new(client),
            size: export.size,
            allocation: find(BASE_ALLOCATION),
            bitmap,
            buffers: BufferPool::new(IDLE_BUFFERS),
            server: None,
        })
    }

    /// Opens a qcow2 (or other QEMU-format) file through a `qemu-nbd`
    /// coffre starts for it; `path()` is the file.
    pub fn open_file(image: &Path, bitmap: Option<&str>) -> Result<NbdImage> {
        let mut server = qemu::QemuNbd::start(image, bitmap)?;
        let opened = NbdImage::open(&server.uri, bitmap);
        let mut nbd = match opened {
            Ok(n) => n,
            Err(e) => {
                let reason = match (server.failure(), e) {
                    (Some(why), _) => why,
                    (None, SnapError::Nbd { reason, .. }) => reason,
                    (None, e) => return Err(e),
                };
                return Err(SnapError::Nbd {
                    uri: image.display().to_string(),
                    reason,
                });
            }
        };
        nbd.name = image.to_path_buf();
        nbd.server = Some(server);
        Ok(nbd)
    }

    fn err(&self, e: WireError) -> SnapError {
        SnapError::Nbd {
            uri: self.name.display().to_string(),
            reason: e.to_string(),
        }
    }

    fn client(&self) -> std::sync::MutexGuard<'_, Client<Box<dyn Stream>>> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Extents of `offset..offset + len` whose status in `context` has
    /// any of `bits`, relative to `offset`.
    fn extents_with(
        &self,
        context: u32,
        bits: u32,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Range<u64>>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        let mut client = self.client();
        while at < end {
            let span = (end - at).min(STATUS_SPAN) as u32;
            let replies = client.block_status(at, span).map_err(|e| self.err(e))?;
            let descs = replies
                .into_iter()
                .find(|(id, _)| *id == context)
                .map(|(_, d)| d)
                .unwrap_or_default();
            let mut pos = at;
            for d in descs {
                if d.length == 0 {
                    break;
                }
                let stop = (pos + u64::from(d.length)).min(end);
                if d.flags & bits != 0 {
                    match out.last_mut() {
                        Some(last) if last.end == pos - offset => last.end = stop - offset,
                        _ => out.push(pos - offset..stop - offset),
                    }
                }
                pos = stop;
                if pos >= end {
                    break;
                }
            }
            if pos == at {
                return Err(self.err(WireError::Protocol(format!(
                    "block status at {at} made no progress"
                ))));
            }
            at = pos;
        }
        Ok(out)
    }

    /// The dirty-bitmap hint: the extents the bitmap marks dirty. Its
    /// generation is the bitmap's name.
    pub fn bitmap_hint(&self) -> Result<Option<Hint>> {
        let Some((name, id)) = self.bitmap.clone() else {
            return Ok(None);
        };
        let dirty = self.extents_with(id, STATE_DIRTY, 0, self.size)?;
        let mut hint = Hint::new(HintSource::Bitmap, dirty);
        hint.generation = Some(name.clone());
        hint.since = Some(name);
        hint.image_size = Some(self.size);
        Ok(Some(hint))
    }
}

impl ImageSource for NbdImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        &self.name
    }

    fn window(&self, offset: u64, len: usize) -> Result<Window<'_>> {
        self.window_for(offset, len, std::slice::from_ref(&(0..len)))
    }

    fn window_for(&self, offset: u64, len: usize, wanted: &[Range<usize>]) -> Result<Window<'_>> {
        // Holes and zero extents are not read.
        let data: Vec<Range<u64>> = match self.allocation {
            Some(id) => {
                let empty = self.extents_with(id, STATE_HOLE | STATE_ZERO, offset, len as u64)?;
                complement(&empty, len as u64)
            }
            None => std::iter::once(0..len as u64).collect(),
        };
        // Both are relative to `offset`, within the window's `len` bytes.
        let data: Vec<Range<usize>> = data
            .iter()
            .map(|d| d.start as usize..d.end as usize)
            .collect();
        let mut ranges: Vec<Range<usize>> = overlaps(wanted, &data).collect();
        ranges.sort_by_key(|r| r.start);
        // Every byte of `ranges` is overwritten by the replies (a reply
        // must cover its request in full); the rest of a reused buffer is
        // zeroed.
        let mut buf = self.buffers.take(len, &ranges);
        let mut requests = Vec::new();
        for r in &ranges {
            let mut at = r.start;
            while at < r.end {
                let n = (r.end - at).min(REQUEST_BYTES);
                requests.push((offset + at as u64, n as u32));
                at += n;
            }
        }
        if !requests.is_empty() {
            self.client()
                .read_ranges(offset, buf.bytes_mut(), &requests)
                .map_err(|e| self.err(e))?;
        }
        Ok(Window::lent(buf, ranges, &self.name))
    }

    fn check_unchanged(&self) -> Result<()> {
        Ok(())
    }

    fn served(&self) -> bool {
        self.server.is_some()
    }

    fn fetches(&self) -> bool {
        true
    }
}

/// `0..len` minus the sorted, disjoint `holes`.
fn complement(holes: &[Range<u64>], len: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = 0;
    for h in holes {
        if h.start > at {
            out.push(at..h.start);
        }
        at = at.max(h.end);
    }
    if at < len {
        out.push(at..len);
    }
    out
}

impl Drop for NbdImage {
    fn drop(&mut self) {
        // Dropping the client closes the connection; say goodbye first
        // (and only then stop a qemu-nbd of our own).
        self.client
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .disconnect();
        self.server.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        assert_eq!(
            NbdUri::parse("nbd://localhost/disk").unwrap(),
            NbdUri {
                address: Address::Tcp {
                    host: "localhost".into(),
                    port: 10809
                },
                export: "disk".into()
            }
        );
        assert_eq!(
            NbdUri::parse("nbd://10.0.0.1:10810/").unwrap().address,
            Address::Tcp {
                host: "10.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///vda?socket=/run/x.sock").unwrap(),
            NbdUri {
                address: Address::Unix {
                    socket: "/run/x.sock".into()
                },
                export: "vda".into()
            }
        );
        assert!(NbdUri::parse("nbd+unix:///vda").is_err());
        assert!(NbdUri::parse("nbd://host:99999/x").is_err());
        assert!(NbdUri::parse("nbd:///x").is_err());
        assert!(is_nbd_uri("nbd://h/x") && !is_nbd_uri("/var/lib/x.img"));
    }

    #[test]
    fn data_is_the_complement_of_holes() {
        assert_eq!(complement(&[0..10, 20..30], 40), vec![10..20, 30..40]);
        assert_eq!(complement(&[], 5), vec![0..5]);
        assert_eq!(
            complement(std::slice::from_ref(&(0..5)), 5),
            Vec::<Range<u64>>::new()
        );
    }
}
