//! Newline-delimited JSON over a byte stream, bounded: a peer that sends a
//! line longer than [`MAX_LINE`] (or never ends one) gets an error, never
//! an unbounded buffer.

use std::io::BufRead;

/// The longest line a peer may send (QMP's largest replies, a
/// `query-block` of many drives, are far smaller).
pub const MAX_LINE: usize = 1 << 20;

/// Why a line could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum LineError {
    /// The stream failed (a timeout included).
    Io(String),
    /// A line longer than the limit.
    TooLong(usize),
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::Io(e) => write!(f, "{e}"),
            LineError::TooLong(max) => write!(f, "a reply longer than {max} bytes"),
        }
    }
}

/// Reads one line (without its `\n`) of at most `max` bytes; `None` at the
/// end of the stream. With `after_sync`, bytes up to and including a
/// `0xFF` are dropped first: a guest agent's answer to
/// `guest-sync-delimited` starts with one, after whatever stale replies it
/// still had buffered.
pub fn read_line(
    r: &mut impl BufRead,
    max: usize,
    after_sync: bool,
) -> Result<Option<Vec<u8>>, LineError> {
    if after_sync {
        let mut skipped = Vec::new();
        loop {
            skipped.clear();
            let n = std::io::Read::take(&mut *r, max as u64 + 1)
                .read_until(0xFF, &mut skipped)
                .map_err(|e| LineError::Io(e.to_string()))?;
            if n == 0 {
                return Ok(None);
            }
            if skipped.last() == Some(&0xFF) {
                break;
            }
            if n > max {
                return Err(LineError::TooLong(max));
            }
        }
    }
    let mut line = Vec::new();
    let n = std::io::Read::take(&mut *r, max as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| LineError::Io(e.to_string()))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if n > max {
        return Err(LineError::TooLong(max));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// Splits a connected socket into a buffered reader and a writer, each
/// exchange bounded by `timeout`.
pub fn split(
    stream: std::os::unix::net::UnixStream,
    timeout: std::time::Duration,
) -> std::io::Result<(
    std::io::BufReader<std::os::unix::net::UnixStream>,
    std::os::unix::net::UnixStream,
)> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let writer = stream.try_clone()?;
    Ok((std::io::BufReader::new(stream), writer))
}

/// Writes `msg` as one line, after `prefix` bytes (a guest agent's `0xFF`
/// resync).
pub fn send(
    w: &mut impl std::io::Write,
    prefix: &[u8],
    msg: &serde_json::Value,
) -> std::io::Result<()> {
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(msg.to_string().as_bytes());
    bytes.push(b'\n');
    w.write_all(&bytes)
}

/// A string a peer sent, as it may be shown in a message: at most 200
/// characters, control characters replaced.
pub fn shown(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_and_a_sync_byte_skips_stale_replies() {
        let mut r = std::io::Cursor::new(b"{\"a\":1}\r\n{\"b\":2}\n".to_vec());
        assert_eq!(read_line(&mut r, 64, false).unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(read_line(&mut r, 64, false).unwrap().unwrap(), b"{\"b\":2}");
        assert_eq!(read_line(&mut r, 64, false).unwrap(), None);
        let mut long = std::io::Cursor::new(vec![b'x'; 100]);
        assert_eq!(read_line(&mut long, 64, false), Err(LineError::TooLong(64)));
        let mut sync = std::io::Cursor::new(b"{\"stale\":1}\n\xff{\"return\":7}\n".to_vec());
        assert_eq!(
            read_line(&mut sync, 64, true).unwrap().unwrap(),
            b"{\"return\":7}"
        );
        assert_eq!(shown("a\u{1b}[2Jb"), "a?[2Jb");
    }
}
