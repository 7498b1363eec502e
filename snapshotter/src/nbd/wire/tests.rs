//! Tests of the NBD wire protocol: the decoders, read replies, and the
//! client against scripted servers.

use super::*;

#[test]
fn block_status_payloads_decode_and_bad_ones_are_refused() {
    let mut p = 7u32.to_be_bytes().to_vec();
    for (l, f) in [(4096u32, 1u32), (8192, 0)] {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    let (id, d) = decode_block_status(&p).unwrap();
    assert_eq!(id, 7);
    assert_eq!(
        d,
        vec![
            Descriptor {
                length: 4096,
                flags: 1
            },
            Descriptor {
                length: 8192,
                flags: 0
            }
        ]
    );
    assert!(decode_block_status(&p[..7]).is_err());
    assert!(decode_block_status(&p[..4]).is_err());
}

#[test]
fn a_server_that_lies_is_a_clean_error() {
    let mut s = NBD_MAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&3u16.to_be_bytes());
    // Structured replies acknowledged, then an export info that claims
    // a huge payload.
    s.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    s.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    s.extend_from_slice(&REP_ACK.to_be_bytes());
    s.extend_from_slice(&0u32.to_be_bytes());
    s.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    s.extend_from_slice(&OPT_GO.to_be_bytes());
    s.extend_from_slice(&REP_INFO.to_be_bytes());
    s.extend_from_slice(&u32::MAX.to_be_bytes());
    let err = Client::handshake(Scripted::new(s), "disk", &[])
        .err()
        .unwrap();
    assert!(err.to_string().contains("protocol error"), "{err}");
    // A truncated greeting.
    let short = Client::handshake(Scripted::new(vec![0x4e, 0x42]), "d", &[]);
    assert!(matches!(short, Err(WireError::Io(_))));
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut c = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    c.extend_from_slice(&flags.to_be_bytes());
    c.extend_from_slice(&kind.to_be_bytes());
    c.extend_from_slice(&cookie.to_be_bytes());
    c.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    c.extend_from_slice(payload);
    c
}

fn data(done: bool, at: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = at.to_be_bytes().to_vec();
    p.extend_from_slice(bytes);
    chunk(u16::from(done), REPLY_OFFSET_DATA, 1, &p)
}

fn hole(done: bool, at: u64, n: u32) -> Vec<u8> {
    let mut p = at.to_be_bytes().to_vec();
    p.extend_from_slice(&n.to_be_bytes());
    chunk(u16::from(done), REPLY_OFFSET_HOLE, 1, &p)
}

fn err_of(r: Result<ReadBytes, WireError>) -> String {
    match r {
        Ok(_) => panic!("the reply must be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_read_reply_must_cover_its_request_exactly() {
    // Data then a hole: the whole request, in order or not.
    let bytes: Vec<u8> = (0..100u8).collect();
    let whole = [hole(false, 1100, 28), data(true, 1000, &bytes)].concat();
    let (out, spans) = decode_read_reply(&whole, 1000, 128).unwrap();
    assert_eq!(&out[..100], &bytes[..]);
    assert!(out[100..].iter().all(|&b| b == 0));
    assert_eq!(spans, vec![(1000, 100)]);

    // Half of it, then done: an error naming the gap, never zeros.
    let e = err_of(decode_read_reply(&data(true, 1000, &[7; 64]), 1000, 128));
    assert!(
        e.contains("covers 64 of its 128 bytes") && e.contains("from 1064"),
        "{e}"
    );
    let none = chunk(REPLY_FLAG_DONE, REPLY_NONE, 1, &[]);
    let e = err_of(decode_read_reply(&none, 1000, 128));
    assert!(e.contains("covers 0 of its 128"), "{e}");
    // A gap in the middle.
    let gap = [data(false, 1000, &[1; 10]), hole(true, 1020, 108)].concat();
    let e = err_of(decode_read_reply(&gap, 1000, 128));
    assert!(e.contains("covers 118") && e.contains("from 1010"), "{e}");
}

#[test]
fn read_chunks_that_overlap_stray_or_overflow_are_refused() {
    let overlap = [data(false, 1000, &[1; 64]), data(true, 1032, &[2; 96])].concat();
    assert!(err_of(decode_read_reply(&overlap, 1000, 128)).contains("overlap"));
    let same = [hole(false, 1000, 128), hole(true, 1000, 128)].concat();
    assert!(err_of(decode_read_reply(&same, 1000, 128)).contains("overlap"));
    for stray in [
        data(true, 999, &[0; 10]),
        data(true, 1100, &[0; 40]),
        hole(true, 1127, 2),
        hole(true, 0, 4000),
    ] {
        let e = err_of(decode_read_reply(&stray, 1000, 128));
        assert!(e.contains("outside the request"), "{e}");
    }
    // Offsets near the end of the 64-bit range: no wrap-around.
    let top = u64::MAX - 127;
    let e = err_of(decode_read_reply(&hole(true, u64::MAX - 3, 10), top, 128));
    assert!(e.contains("outside the request"), "{e}");
    let e = err_of(decode_read_reply(&hole(true, u64::MAX, u32::MAX), top, 128));
    assert!(e.contains("outside the request"), "{e}");
    assert!(decode_read_reply(&hole(true, top, 128), top, 128).is_ok());
    // Empty chunks, a data chunk longer than the request, bytes after
    // the end, another cookie, a NONE chunk that is not the last.
    assert!(err_of(decode_read_reply(&hole(true, 1000, 0), 1000, 128)).contains("empty"));
    assert!(err_of(decode_read_reply(&data(true, 1000, &[]), 1000, 128)).contains("data chunk"));
    let long = data(true, 1000, &[0; 129]);
    assert!(decode_read_reply(&long, 1000, 128).is_err());
    let trailing = [hole(true, 1000, 128), vec![0]].concat();
    assert!(err_of(decode_read_reply(&trailing, 1000, 128)).contains("after the last"));
    let mut other = hole(true, 1064, 64);
    other[8..16].copy_from_slice(&2u64.to_be_bytes());
    let two = [hole(false, 1000, 64), other].concat();
    assert!(err_of(decode_read_reply(&two, 1000, 128)).contains("another request"));
    let early_none = [chunk(0, REPLY_NONE, 1, &[]), hole(true, 1000, 128)].concat();
    assert!(decode_read_reply(&early_none, 1000, 128).is_err());
    // A truncated reply.
    let cut = hole(true, 1000, 128);
    assert!(matches!(
        decode_read_reply(&cut[..cut.len() - 1], 1000, 128),
        Err(WireError::Io(_))
    ));
}

#[test]
fn a_read_takes_a_bounded_number_of_chunks() {
    let n = MAX_READ_CHUNKS as u32 + 10;
    let mut reply = Vec::new();
    for i in 0..n {
        reply.extend(data(i + 1 == n, 1000 + u64::from(i), &[9]));
    }
    let e = err_of(decode_read_reply(&reply, 1000, n));
    assert!(e.contains("more than 16384 chunks"), "{e}");
    // As many one-byte chunks as allowed is fine.
    let n = 4096u32;
    let mut reply = Vec::new();
    for i in 0..n {
        reply.extend(data(i + 1 == n, u64::from(i), &[9]));
    }
    let (out, spans) = decode_read_reply(&reply, 0, n).unwrap();
    assert!(out.iter().all(|&b| b == 9));
    assert_eq!(spans.len(), n as usize);
}

/// A server's handshake: structured replies, no meta context, an
/// export of `size` bytes.
fn handshake(size: u64) -> Vec<u8> {
    let mut s = NBD_MAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&3u16.to_be_bytes());
    let reply = |s: &mut Vec<u8>, opt: u32, t: u32, p: &[u8]| {
        s.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        s.extend_from_slice(&opt.to_be_bytes());
        s.extend_from_slice(&t.to_be_bytes());
        s.extend_from_slice(&(p.len() as u32).to_be_bytes());
        s.extend_from_slice(p);
    };
    reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&0u16.to_be_bytes());
    reply(&mut s, OPT_GO, REP_INFO, &info);
    reply(&mut s, OPT_GO, REP_ACK, &[]);
    s
}

#[test]
fn the_client_refuses_a_read_answered_in_part() {
    let mut s = handshake(1 << 20);
    s.extend(data(true, 0, &[5; 4096]));
    let mut c = Client::handshake(Scripted::new(s), "disk", &[]).unwrap();
    let mut buf = vec![0u8; 8192];
    let e = c.read_ranges(0, &mut buf, &[(0, 8192)]).unwrap_err();
    assert!(
        e.to_string().contains("covers 4096 of its 8192 bytes"),
        "{e}"
    );
    // Answered in full (two chunks), it reads.
    let mut s = handshake(1 << 20);
    s.extend(data(false, 0, &[5; 4096]));
    s.extend(hole(true, 4096, 4096));
    let mut c = Client::handshake(Scripted::new(s), "disk", &[]).unwrap();
    let spans = c.read_ranges(0, &mut buf, &[(0, 8192)]).unwrap();
    assert_eq!(spans, vec![(0, 4096)]);
    assert!(buf[..4096].iter().all(|&b| b == 5) && buf[4096..].iter().all(|&b| b == 0));
}

#[test]
fn an_export_larger_than_any_file_can_be_is_refused() {
    let err = Client::handshake(Scripted::new(handshake(u64::MAX - 4095)), "disk", &[])
        .err()
        .unwrap();
    assert!(err.to_string().contains("more than"), "{err}");
    let c = Client::handshake(Scripted::new(handshake(MAX_EXPORT_SIZE)), "disk", &[]).unwrap();
    assert_eq!(c.export().size, MAX_EXPORT_SIZE);
}

#[test]
fn meta_contexts_not_asked_for_are_refused() {
    let mut s = NBD_MAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&3u16.to_be_bytes());
    let reply = |s: &mut Vec<u8>, opt: u32, t: u32, p: &[u8]| {
        s.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        s.extend_from_slice(&opt.to_be_bytes());
        s.extend_from_slice(&t.to_be_bytes());
        s.extend_from_slice(&(p.len() as u32).to_be_bytes());
        s.extend_from_slice(p);
    };
    reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    let mut ctx = 1u32.to_be_bytes().to_vec();
    ctx.extend_from_slice(b"base:allocation");
    // The same context twice.
    reply(&mut s, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
    reply(&mut s, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
    let err = Client::handshake(Scripted::new(s), "disk", &["base:allocation".into()])
        .err()
        .unwrap();
    assert!(err.to_string().contains("meta context"), "{err}");
}
