//! Reading a child process's pipe without ever blocking the child: the
//! output of `virsh` and of `qemu-img`, both untrusted and bounded.

use std::io::Read;
use std::sync::mpsc;

/// Reads all of `pipe` (the first `limit` bytes kept, the rest read and
/// dropped, so that the writer never blocks on a full pipe) in a thread
/// of its own; the bytes arrive on the channel at the pipe's end.
pub fn drain(pipe: Option<impl Read + Send + 'static>, limit: u64) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    match pipe {
        Some(p) => {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut limited = p.take(limit);
                let _ = limited.read_to_end(&mut buf);
                let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
                let _ = tx.send(buf);
            });
        }
        None => {
            let _ = tx.send(Vec::new());
        }
    }
    rx
}
