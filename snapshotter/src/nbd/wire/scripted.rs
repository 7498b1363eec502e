//! A scripted peer that answers with fixed bytes, and the client fuzz
//! target's entry that drives a [`Client`] against it.

use std::io::{Read, Write};

use super::client::Client;

/// A peer that answers with fixed bytes and swallows what it is sent
/// (the fuzz target's server).
pub struct Scripted(std::io::Cursor<Vec<u8>>);

impl Scripted {
    /// A server that will send `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Scripted(std::io::Cursor::new(bytes))
    }
}

impl Read for Scripted {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Scripted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The fuzz target's entry: `data` is everything a server sends. The
/// client negotiates, then asks for the block status and a read of the
/// first 128 KiB. Never panics, never allocates what a length field
/// claims before checking it. True when the handshake succeeded.
pub fn fuzz_entry(data: &[u8]) -> bool {
    let contexts = [
        "base:allocation".to_string(),
        "qemu:dirty-bitmap:b0".to_string(),
    ];
    let Ok(mut c) = Client::handshake(Scripted::new(data.to_vec()), "disk", &contexts) else {
        return false;
    };
    let len = c.export().size.min(128 << 10);
    if len > 0 {
        let _ = c.block_status(0, len as u32);
        let mut buf = vec![0u8; len as usize];
        let _ = c.read_ranges(0, &mut buf, &[(0, len as u32)]);
    }
    true
}
