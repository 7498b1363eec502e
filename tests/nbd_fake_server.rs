//! A fake NBD server (newstyle fixed handshake, structured replies, over a
//! Unix socket in the test's folder) that answers reads in part: the
//! backup fails with an error saying so, and no point is recorded. The
//! same server answering in full is backed up and restores byte-identical
//! (so the failure is the partial reply's, not the server's dialect).

#![allow(clippy::big_endian_bytes, reason = "NBD is big-endian on the wire")]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use crate::common::*;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const FLAG_DONE: u16 = 1;
const OFFSET_DATA: u16 = 1;

/// How the server answers a read.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// Every byte asked for.
    Full,
    /// The first half only, then "done".
    FirstHalf,
}

fn option_reply(s: &mut UnixStream, opt: u32, kind: u32, payload: &[u8]) {
    let mut m = REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).unwrap();
}

/// Serves one connection: the handshake, then reads until a disconnect.
fn serve(mut s: UnixStream, disk: &[u8], answer: Answer) -> std::io::Result<()> {
    let mut hello = NBD_MAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&hello)?;
    let mut client_flags = [0u8; 4];
    s.read_exact(&mut client_flags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            // Structured replies: yes. Meta contexts: none (so every
            // byte is read, none skipped as a hole).
            8 | 10 => option_reply(&mut s, opt, REP_ACK, &[]),
            OPT_GO => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&(disk.len() as u64).to_be_bytes());
                info.extend_from_slice(&1u16.to_be_bytes());
                option_reply(&mut s, opt, REP_INFO, &info);
                option_reply(&mut s, opt, REP_ACK, &[]);
                break;
            }
            _ => option_reply(&mut s, opt, REP_ERR_UNSUP, &[]),
        }
    }
    loop {
        let mut r = [0u8; 28];
        s.read_exact(&mut r)?;
        assert_eq!(
            u32::from_be_bytes(r[0..4].try_into().unwrap()),
            REQUEST_MAGIC
        );
        let cmd = u16::from_be_bytes(r[6..8].try_into().unwrap());
        let cookie = &r[8..16];
        let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(r[24..28].try_into().unwrap());
        match cmd {
            CMD_READ => {
                let n = match answer {
                    Answer::Full => len,
                    Answer::FirstHalf => len / 2,
                };
                let at = offset as usize;
                let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&FLAG_DONE.to_be_bytes());
                m.extend_from_slice(&OFFSET_DATA.to_be_bytes());
                m.extend_from_slice(cookie);
                m.extend_from_slice(&(n + 8).to_be_bytes());
                m.extend_from_slice(&offset.to_be_bytes());
                m.extend_from_slice(&disk[at..at + n as usize]);
                s.write_all(&m)?;
            }
            CMD_DISC => return Ok(()),
            c => panic!("the fake server got command {c}"),
        }
    }
}

/// A server on a socket in `dir`, answering every connection; returns
/// the export's URI.
fn start(dir: &Path, disk: Arc<Vec<u8>>, answer: Answer) -> String {
    let sock = dir.join(format!("nbd-{}.sock", answer as u8));
    let listener = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let disk = disk.clone();
            std::thread::spawn(move || {
                let _ = serve(conn, &disk, answer);
            });
        }
    });
    format!("nbd+unix:///disk?socket={}", sock.display())
}

#[test]
fn a_server_that_answers_a_read_in_part_fails_the_backup() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("disk.img");
    mixed_image(&img, 2 << 20, 81);
    let disk = Arc::new(std::fs::read(&img).unwrap());

    let partial = start(t.path(), disk.clone(), Answer::FirstHalf);
    let args = ["backup", "--vault", s(&vault), "--item", "disk", &partial];
    let out = run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a partial read was backed up: {stderr}"
    );
    assert!(
        stderr.contains("answered less than asked") && stderr.contains("covers"),
        "{stderr}"
    );
    assert!(points(&vault, "disk").is_empty());

    // The same server answering in full: the backup works and restores.
    let full = start(t.path(), disk, Answer::Full);
    ok(&["backup", "--vault", s(&vault), "--item", "disk", &full]);
    let restored = t.path().join("restored.img");
    ok(&[
        "restore",
        "--vault",
        s(&vault),
        "--item",
        "disk",
        "--to",
        s(&restored),
    ]);
    assert_same(&img, &restored);
}
