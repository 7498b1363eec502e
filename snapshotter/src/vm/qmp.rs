//! A QEMU Machine Protocol client: the greeting, capability negotiation,
//! commands matched to their replies by id, and events set aside. QEMU is
//! started with `-qmp unix:SOCKET,server=on,wait=off`; a reply is read
//! whole and bounded ([`super::json_lines`]), and a failed command comes
//! back as [`SnapError::Qmp`] with QEMU's error class and description.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::json_lines::{MAX_LINE, read_line, send, shown, split};
use crate::error::{Result, SnapError};

/// The most event names kept between two [`Qmp::take_events`] calls
/// (older ones are dropped, and an event's data is never kept: a chatty
/// or hostile monitor cannot grow the client's memory).
pub const MAX_EVENTS: usize = 1024;

/// QEMU's version, from the greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// One message from the monitor.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// The greeting, first on a new connection.
    Greeting(QemuVersion),
    /// A command's result.
    Return {
        /// The id the command was sent with.
        id: Option<u64>,
        /// Its value.
        value: Value,
    },
    /// A command's failure.
    Error {
        /// The id the command was sent with.
        id: Option<u64>,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, …).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An asynchronous event (`BLOCK_JOB_COMPLETED`, …).
    Event {
        /// Its name.
        name: String,
        /// Its data.
        data: Value,
    },
}

/// Decodes one line from the monitor. Anything but the four shapes QMP
/// defines is refused, naming what is wrong.
pub fn decode(line: &[u8]) -> std::result::Result<Message, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let id = match obj.get("id") {
        None => None,
        Some(i) => Some(i.as_u64().ok_or("an id that is not a number")?),
    };
    if let Some(q) = obj.get("QMP") {
        let ver = q
            .get("version")
            .and_then(|v| v.get("qemu"))
            .ok_or("a greeting without a QEMU version")?;
        let part = |k: &str| {
            ver.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("a greeting whose version has no {k}"))
        };
        return Ok(Message::Greeting(QemuVersion {
            major: part("major")?,
            minor: part("minor")?,
            micro: part("micro")?,
        }));
    }
    if let Some(value) = obj.get("return") {
        return Ok(Message::Return {
            id,
            value: value.clone(),
        });
    }
    if let Some(e) = obj.get("error") {
        let text = |k: &str| e.get(k).and_then(Value::as_str).map(shown);
        return Ok(Message::Error {
            id,
            class: text("class").ok_or("an error without a class")?,
            desc: text("desc").unwrap_or_default(),
        });
    }
    if let Some(name) = obj.get("event") {
        return Ok(Message::Event {
            name: shown(name.as_str().ok_or("an event whose name is not a string")?),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
        });
    }
    Err("neither a greeting, a return, an error nor an event".into())
}

/// A connection to a QEMU monitor.
#[derive(Debug)]
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    version: QemuVersion,
    events: std::collections::VecDeque<String>,
}

impl Qmp {
    /// Connects to the monitor at `socket`, reads its greeting and leaves
    /// capability negotiation. Every read and write waits at most
    /// `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp> {
        let fail = |reason: String| SnapError::Qmp {
            socket: socket.to_path_buf(),
            reason,
        };
        // A monitor between two clients (the last one just left) refuses
        // for a moment: it is retried for up to five seconds.
        let patience = timeout.min(Duration::from_secs(5));
        let start = std::time::Instant::now();
        let connected = loop {
            match UnixStream::connect(socket) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && start.elapsed() < patience =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => break other,
            }
        };
        let stream = connected.map_err(|e| {
            fail(match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "no such socket (is the VM running, with -qmp unix:SOCKET,server=on,wait=off?)"
                        .into()
                }
                std::io::ErrorKind::ConnectionRefused => {
                    "nothing listens on it (the VM is gone)".into()
                }
                _ => e.to_string(),
            })
        })?;
        Self::on_stream(stream, socket, timeout)
    }

    /// [`Qmp::connect`] over a stream already connected.
    pub fn on_stream(stream: UnixStream, socket: &Path, timeout: Duration) -> Result<Qmp> {
        let fail = |reason: String| SnapError::Qmp {
            socket: socket.to_path_buf(),
            reason,
        };
        let (reader, writer) = split(stream, timeout).map_err(|e| fail(e.to_string()))?;
        let mut qmp = Qmp {
            socket: socket.to_path_buf(),
            reader,
            writer,
            next_id: 1,
            version: QemuVersion {
                major: 0,
                minor: 0,
                micro: 0,
            },
            events: std::collections::VecDeque::new(),
        };
        match qmp.receive()? {
            Message::Greeting(v) => qmp.version = v,
            other => return Err(qmp.fail(format!("expected a greeting, got {other:?}"))),
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// QEMU's version.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// The monitor's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// An error about this monitor.
    pub fn error(&self, reason: String) -> SnapError {
        self.fail(reason)
    }

    fn fail(&self, reason: String) -> SnapError {
        SnapError::Qmp {
            socket: self.socket.clone(),
            reason,
        }
    }

    fn receive(&mut self) -> Result<Message> {
        let line = read_line(&mut self.reader, MAX_LINE, false)
            .map_err(|e| self.fail(e.to_string()))?
            .ok_or_else(|| self.fail("the monitor closed the connection".into()))?;
        decode(&line).map_err(|e| self.fail(format!("a reply coffre cannot use: {e}")))
    }

    /// Runs `command` with `arguments` and returns its result; events that
    /// arrive meanwhile are kept for [`Qmp::take_events`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        send(&mut self.writer, &[], &msg).map_err(|e| self.fail(format!("{command}: {e}")))?;
        loop {
            match self.receive()? {
                Message::Event { name, .. } => {
                    if self.events.len() >= MAX_EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back(name);
                }
                // A late reply to an earlier command (one that timed out):
                // skipped, so it is never taken for this one's.
                Message::Return { id: Some(got), .. } | Message::Error { id: Some(got), .. }
                    if got < id => {}
                Message::Return {
                    id: Some(got),
                    value,
                } if got == id => return Ok(value),
                Message::Error {
                    id: Some(got),
                    class,
                    desc,
                } if got == id => {
                    return Err(self.fail(format!("{command} failed: {class}: {desc}")));
                }
                other => {
                    return Err(
                        self.fail(format!("{command}: a reply that is not to it ({other:?})"))
                    );
                }
            }
        }
    }

    /// The names of the events received so far (oldest first), and
    /// forgets them.
    pub fn take_events(&mut self) -> Vec<String> {
        std::mem::take(&mut self.events).into()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A monitor that answers each command with the next of `replies`
    /// (`{id}` replaced by the command's id; an empty one hangs up) and
    /// records the commands.
    fn monitor(
        replies: Vec<&'static str>,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<Value>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            writeln!(w, "{GREETING}").unwrap();
            let mut seen = Vec::new();
            let mut r = BufReader::new(s);
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                let cmd: Value = serde_json::from_str(&line).unwrap();
                let id = cmd["id"].as_u64().unwrap();
                seen.push(cmd);
                if reply.is_empty() {
                    // Hang up instead of answering.
                    break;
                }
                for part in reply.split('\n') {
                    writeln!(w, "{}", part.replace("{id}", &id.to_string())).unwrap();
                }
            }
            seen
        });
        (dir, path, h)
    }

    #[test]
    fn commands_get_their_own_replies_and_events_are_set_aside() {
        let (_d, path, h) = monitor(vec![
            // A late reply to an earlier command comes first: skipped.
            "{\"return\": {}, \"id\": 0}\n{\"return\": {}, \"id\": {id}}",
            "{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"id\": \"j\"}, \"timestamp\": {}}\n{\"return\": [{\"name\": \"query-version\"}], \"id\": {id}}",
            r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}, "id": {id}}"#,
        ]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(
            q.version(),
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 2
            }
        );
        let r = q.execute("query-commands", None).unwrap();
        assert_eq!(r[0]["name"], "query-version");
        assert_eq!(q.take_events(), ["JOB_STATUS_CHANGE"]);
        let e = q
            .execute("block-dirty-bitmap-add", Some(json!({"node": "nope"})))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("DeviceNotFound: Device 'nope' not found"),
            "{e}"
        );
        let seen = h.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[2]["arguments"]["node"], "nope");
    }

    #[test]
    fn a_reply_to_another_command_or_a_closed_monitor_is_an_error() {
        let (_d, path, _h) = monitor(vec![r#"{"return": {}, "id": 99}"#]);
        let e = Qmp::connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("not to it"), "{e}");
        let (_d, path, _h) = monitor(vec![""]);
        let e = Qmp::connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("closed the connection"), "{e}");
        let e = Qmp::connect(&_d.path().join("none"), Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("is the VM running"), "{e}");
    }

    #[test]
    fn messages_decode_or_are_refused() {
        assert!(matches!(
            decode(GREETING.as_bytes()),
            Ok(Message::Greeting(_))
        ));
        assert!(decode(br#"{"return": 3, "id": "x"}"#).is_err());
        assert!(decode(br#"{"error": {"desc": "no class"}}"#).is_err());
        assert!(decode(br#"[1, 2]"#).is_err());
        assert!(decode(br#"{"something": 1}"#).is_err());
        assert!(decode(br#"{"QMP": {"version": {"qemu": {"major": 7}}}}"#).is_err());
        match decode(br#"{"error": {"class": "X\u001b[2J", "desc": "d"}, "id": 4}"#).unwrap() {
            Message::Error { class, id, .. } => {
                assert_eq!(class, "X?[2J");
                assert_eq!(id, Some(4));
            }
            other => panic!("{other:?}"),
        }
    }
}
