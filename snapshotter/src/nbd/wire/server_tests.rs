//! The server against coffre's own client and against hand-made requests
//! over a socket pair: negotiation, reads, block status, refused writes,
//! requests out of bounds, one connection's reads answered at once and out
//! of order, and a client that breaks the protocol.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::*;

/// A 1 MiB export whose second half is a hole.
struct Half(Vec<u8>);

impl ExportData for Half {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        if offset == 4096 {
            return Err("block 0 of point p is damaged".into());
        }
        let at = offset as usize;
        buf.copy_from_slice(&self.0[at..at + buf.len()]);
        Ok(())
    }
    fn allocation(&self, offset: u64, len: u32) -> Result<Vec<Descriptor>, String> {
        let half = self.size() / 2;
        let end = offset + u64::from(len);
        let mut out = Vec::new();
        if offset < half {
            out.push(Descriptor {
                length: (end.min(half) - offset) as u32,
                flags: 0,
            });
        }
        if end > half {
            out.push(Descriptor {
                length: (end - offset.max(half)) as u32,
                flags: STATE_HOLE | STATE_ZERO,
            });
        }
        Ok(out)
    }
}

fn image() -> Half {
    let mut b: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    b[512 << 10..].fill(0);
    Half(b)
}

/// Runs a server of `data` as "disk" on one end of a socket pair; `f`
/// gets the other end.
fn with_server<T, D: ExportData>(
    data: &D,
    f: impl FnOnce(UnixStream) -> T,
) -> (T, Result<(), WireError>) {
    let (a, b) = UnixStream::pair().unwrap();
    let exports = [Served {
        name: "disk".into(),
        description: "test".into(),
        data,
    }];
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let activity = Activity::default();
            serve_connection(a.try_clone().unwrap(), a, &exports, 3, &activity, || {})
        });
        let r = f(b);
        (r, server.join().unwrap())
    })
}

/// A 3 MiB export that answers reads in parts, as a cache of decoded
/// blocks does: its first MiB in shared buffers of 16 bytes (more slices
/// than one vectored write takes), then 1.5 MiB of zeros (more than the
/// server's buffer of zeros), then a buffer of its own.
struct Pieces {
    bytes: Vec<u8>,
    first: Vec<Arc<Vec<u8>>>,
}

const MIB: usize = 1 << 20;

impl ExportData for Pieces {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let at = offset as usize;
        buf.copy_from_slice(&self.bytes[at..at + buf.len()]);
        Ok(())
    }
    fn read_parts(&self, offset: u64, len: usize) -> Result<ReadParts, String> {
        let mut parts = ReadParts::default();
        let (mut at, end) = (offset as usize, offset as usize + len);
        while at < end {
            let next = if at < MIB {
                (at + 16 - at % 16).min(end)
            } else if at < 5 * MIB / 2 {
                end.min(5 * MIB / 2)
            } else {
                end
            };
            if at < MIB {
                let k = at / 16;
                parts.push_shared(self.first[k].clone(), at - k * 16..next - k * 16)?;
            } else if at < 5 * MIB / 2 {
                parts.push_zeros(next - at);
            } else {
                parts.push_owned(self.bytes[at..next].to_vec());
            }
            at = next;
        }
        Ok(parts)
    }
    fn allocation(&self, _offset: u64, len: u32) -> Result<Vec<Descriptor>, String> {
        Ok(vec![Descriptor {
            length: len,
            flags: 0,
        }])
    }
}

#[test]
fn a_read_answered_in_parts_reaches_the_client_whole_and_in_order() {
    let mut bytes: Vec<u8> = (0..3 * MIB as u32).map(|i| (i % 251) as u8 | 1).collect();
    bytes[MIB..5 * MIB / 2].fill(0);
    let first = bytes[..MIB]
        .chunks(16)
        .map(|c| Arc::new(c.to_vec()))
        .collect();
    let data = Pieces { bytes, first };
    let (_, served) = with_server(&data, |sock| {
        let mut c = Client::handshake(sock, "disk", &[]).unwrap();
        // The whole export in one request: 65,536 shared slices, zeros
        // sent in pieces of the server's buffer, and an owned part.
        let mut buf = vec![0xAAu8; 3 * MIB];
        c.read_ranges(0, &mut buf, &[(0, 3 * MIB as u32)]).unwrap();
        assert!(buf == data.bytes, "the whole export");
        // Reads across the parts' edges.
        for (offset, len) in [(MIB - 5, 20), (5 * MIB / 2 - 3, 9), (7, 33)] {
            let mut got = vec![0xAAu8; len];
            c.read_ranges(offset as u64, &mut got, &[(offset as u64, len as u32)])
                .unwrap();
            assert!(got == data.bytes[offset..offset + len], "{offset}+{len}");
        }
        c.disconnect();
    });
    served.unwrap();
    // A part outside its buffer is refused, never sent; one of at least
    // half its buffer is shared, a smaller one copied (it would pin the
    // whole buffer).
    let mut parts = ReadParts::default();
    let shared = Arc::new(vec![1u8, 2, 3, 4, 5, 6, 7, 8]);
    assert!(parts.push_shared(shared.clone(), 4..9).is_err());
    parts.push_shared(shared.clone(), 2..6).unwrap();
    parts.push_shared(shared.clone(), 5..8).unwrap();
    let slices = parts.slices();
    assert_eq!(
        (slices[0], slices[1]),
        (&[3u8, 4, 5, 6][..], &[6u8, 7, 8][..])
    );
    assert_eq!(slices[0].as_ptr(), shared[2..].as_ptr(), "shared");
    assert_ne!(slices[1].as_ptr(), shared[5..].as_ptr(), "copied");
    let mut parts = ReadParts::default();
    parts.push_zeros(3);
    parts.push_zeros(2 * MIB);
    parts.push_owned(vec![7, 8]);
    assert_eq!(parts.len(), 2 * MIB + 5);
    let out = parts.slices().concat();
    assert_eq!(out.len(), parts.len());
    assert!(out[..2 * MIB + 3].iter().all(|&b| b == 0) && out[2 * MIB + 3..] == [7, 8]);
}

#[test]
fn the_client_reads_and_gets_block_status_from_the_server() {
    let data = image();
    let (_, served) = with_server(&data, |sock| {
        let mut c = Client::handshake(sock, "disk", &["base:allocation".to_string()]).unwrap();
        assert_eq!(c.export().size, 1 << 20);
        assert_eq!(c.export().flags, EXPORT_FLAGS);
        assert_eq!(c.export().contexts.len(), 1);
        // Pipelined reads answered in any order, each exactly.
        let mut buf = vec![0u8; 1 << 20];
        let ranges: Vec<(u64, u32)> = (0..16u64)
            .filter(|k| *k != 0)
            .map(|k| (k * 65536, 65536))
            .collect();
        c.read_ranges(0, &mut buf, &ranges).unwrap();
        assert_eq!(&buf[65536..], &data.0[65536..]);
        let status = c.block_status(0, 1 << 20).unwrap();
        assert_eq!(
            status[0].1,
            vec![
                Descriptor {
                    length: 512 << 10,
                    flags: 0
                },
                Descriptor {
                    length: 512 << 10,
                    flags: STATE_HOLE | STATE_ZERO
                }
            ]
        );
        // A failed read is an error reply, and the connection goes on;
        // the reason (paths, ids) stays in the server's log.
        let err = c.read_ranges(0, &mut buf, &[(4096, 4096)]).unwrap_err();
        assert!(err.to_string().contains("error 5"), "{err}");
        assert!(err.to_string().contains("cannot be read intact"), "{err}");
        assert!(!err.to_string().contains("point p"), "{err}");
        c.read_ranges(0, &mut buf, &[(0, 4096)]).unwrap();
        assert_eq!(&buf[..4096], &data.0[..4096]);
        c.disconnect();
    });
    served.unwrap();
}

#[test]
fn an_unknown_export_is_refused_and_the_only_one_is_the_default() {
    let data = image();
    let (r, _) = with_server(&data, |sock| {
        Client::handshake(sock, "other", &[]).map(|_| ())
    });
    assert!(r.unwrap_err().to_string().contains("no export"));
    let (r, served) = with_server(&data, |sock| {
        let mut c = Client::handshake(sock, "", &[]).unwrap();
        let size = c.export().size;
        c.disconnect();
        size
    });
    assert_eq!(r, 1 << 20);
    served.unwrap();
}

/// Negotiates "disk" by hand (structured replies, no contexts) and
/// returns the socket in transmission.
fn raw_session(mut sock: UnixStream) -> UnixStream {
    let mut hello = [0u8; 18];
    sock.read_exact(&mut hello).unwrap();
    sock.write_all(&u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    m.extend_from_slice(&4u32.to_be_bytes());
    m.extend_from_slice(b"disk");
    sock.write_all(&m).unwrap();
    let mut info = [0u8; 10];
    sock.read_exact(&mut info).unwrap();
    assert_eq!(u64_at(&info, 0), 1 << 20);
    sock
}

fn request(sock: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32) {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    sock.write_all(&m).unwrap();
}

/// The error and cookie of a simple reply.
fn simple_reply(sock: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    sock.read_exact(&mut h).unwrap();
    assert_eq!(u32_at(&h, 0), SIMPLE_REPLY_MAGIC);
    (u32_at(&h, 4), u64_at(&h, 8))
}

#[test]
fn writes_are_refused_and_bad_requests_are_errors_not_data() {
    let data = image();
    let (_, served) = with_server(&data, |sock| {
        let mut sock = raw_session(sock);
        // A write: its payload is read past, and EPERM.
        request(&mut sock, 1, 7, 100, 4096);
        sock.write_all(&[0xAA; 4096]).unwrap();
        assert_eq!(simple_reply(&mut sock), (EPERM, 7));
        // Trim and write-zeroes: EPERM.
        request(&mut sock, 4, 8, 0, 4096);
        assert_eq!(simple_reply(&mut sock), (EPERM, 8));
        // A read past the end, and one that wraps: EINVAL (simple
        // replies: structured ones were not negotiated).
        request(&mut sock, 0, 9, (1 << 20) - 10, 20);
        assert_eq!(simple_reply(&mut sock), (EINVAL, 9));
        request(&mut sock, 0, 10, u64::MAX - 5, 4096);
        assert_eq!(simple_reply(&mut sock), (EINVAL, 10));
        // Block status without the context: EINVAL.
        request(&mut sock, 7, 11, 0, 4096);
        assert_eq!(simple_reply(&mut sock), (EINVAL, 11));
        // An unknown command: EINVAL. Flush: fine.
        request(&mut sock, 99, 12, 0, 0);
        assert_eq!(simple_reply(&mut sock), (EINVAL, 12));
        request(&mut sock, 3, 13, 0, 0);
        assert_eq!(simple_reply(&mut sock), (0, 13));
        // A simple read reply carries the data.
        request(&mut sock, 0, 14, 100, 8);
        assert_eq!(simple_reply(&mut sock), (0, 14));
        let mut b = [0u8; 8];
        sock.read_exact(&mut b).unwrap();
        assert_eq!(&b, &data.0[100..108]);
        // (The refused write at 100 changed nothing.)
        request(&mut sock, 2, 15, 0, 0);
    });
    served.unwrap();
}

/// A 1 MiB export whose read at 0 waits (up to 10 s, then fails) until
/// a read elsewhere has been served: only a server that answers one
/// connection's requests at once, out of order, serves both.
struct Gate {
    other_read: std::sync::Mutex<bool>,
    served: std::sync::Condvar,
}

impl ExportData for Gate {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut other = self.other_read.lock().unwrap();
        if offset != 0 {
            *other = true;
            self.served.notify_all();
        } else {
            let timeout = std::time::Duration::from_secs(10);
            let (o, waited) = self
                .served
                .wait_timeout_while(other, timeout, |o| !*o)
                .unwrap();
            other = o;
            if waited.timed_out() {
                return Err("the other read never came".into());
            }
        }
        drop(other);
        buf.fill((offset >> 12) as u8 | 1);
        Ok(())
    }
    fn allocation(&self, _offset: u64, len: u32) -> Result<Vec<Descriptor>, String> {
        Ok(vec![Descriptor {
            length: len,
            flags: 0,
        }])
    }
}

#[test]
fn one_connections_reads_are_answered_at_once_and_out_of_order() {
    let data = Gate {
        other_read: std::sync::Mutex::new(false),
        served: std::sync::Condvar::new(),
    };
    let (_, served) = with_server(&data, |sock| {
        let mut sock = raw_session(sock);
        // The read at 0 waits for the read at 8192, sent after it: its
        // answer comes first.
        request(&mut sock, 0, 1, 0, 4096);
        request(&mut sock, 0, 2, 8192, 4096);
        let mut b = [0u8; 4096];
        assert_eq!(simple_reply(&mut sock), (0, 2));
        sock.read_exact(&mut b).unwrap();
        assert!(b.iter().all(|&x| x == 3), "the read at 8192");
        assert_eq!(simple_reply(&mut sock), (0, 1));
        sock.read_exact(&mut b).unwrap();
        assert!(b.iter().all(|&x| x == 1), "the read at 0");
        request(&mut sock, 2, 3, 0, 0);
    });
    served.unwrap();
}

#[test]
fn a_client_that_breaks_the_protocol_is_cut_off() {
    let data = image();
    let (_, served) = with_server(&data, |sock| {
        let mut sock = raw_session(sock);
        sock.write_all(&[0u8; 28]).unwrap();
        let mut rest = Vec::new();
        let _ = sock.read_to_end(&mut rest);
    });
    assert!(served.unwrap_err().to_string().contains("magic"));
    // A huge option is read past and refused; a garbage one ends it.
    let (_, served) = with_server(&data, |mut sock| {
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello).unwrap();
        sock.write_all(&1u32.to_be_bytes()).unwrap();
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&7u32.to_be_bytes());
        m.extend_from_slice(&(1u32 << 20).to_be_bytes());
        m.extend_from_slice(&vec![0u8; 1 << 20]);
        sock.write_all(&m).unwrap();
        let mut h = [0u8; 20];
        sock.read_exact(&mut h).unwrap();
        assert_eq!(u32_at(&h, 12), REP_FLAG_ERROR | 9);
        sock.write_all(b"not an option at all...").unwrap();
        let mut rest = Vec::new();
        let _ = sock.read_to_end(&mut rest);
    });
    assert!(served.is_err());
}

#[test]
fn the_fuzz_entry_survives_truncated_and_random_clients() {
    assert!(!fuzz_server_entry(&[]));
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for n in 0..200 {
        let mut b = vec![0u8; n * 7];
        for x in b.iter_mut() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            *x = rng as u8;
        }
        fuzz_server_entry(&b);
    }
}
