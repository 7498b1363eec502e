//! A QEMU guest agent client: the handshake (`guest-sync-delimited`, which
//! skips stale replies), and the file-system freeze around a point in
//! time. A freeze hands back a [`Frozen`] guard that thaws when dropped,
//! so no error path leaves the guest frozen.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::json_lines::{MAX_LINE, read_line, send, shown, split};
use crate::error::{Result, SnapError};

/// What the agent answered.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// A command's result.
    Return(Value),
    /// A command's failure: class and description.
    Error(String, String),
}

/// Decodes one line from the agent.
pub fn decode(line: &[u8]) -> std::result::Result<Answer, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    if let Some(r) = obj.get("return") {
        return Ok(Answer::Return(r.clone()));
    }
    if let Some(e) = obj.get("error") {
        let text = |k: &str| e.get(k).and_then(Value::as_str).map(shown);
        return Ok(Answer::Error(
            text("class").ok_or("an error without a class")?,
            text("desc").unwrap_or_default(),
        ));
    }
    Err("neither a return nor an error".into())
}

/// A connection to a guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl GuestAgent {
    /// Connects to the agent's socket and synchronises with it (replies a
    /// previous client left unread are skipped). Each exchange waits at
    /// most `timeout`: an agent that does not answer is an error, never a
    /// hang.
    pub fn connect(socket: &Path, timeout: Duration, token: u64) -> Result<GuestAgent> {
        let fail = |reason: String| SnapError::GuestAgent {
            socket: socket.to_path_buf(),
            reason,
        };
        let stream = UnixStream::connect(socket).map_err(|e| fail(e.to_string()))?;
        let (reader, writer) = split(stream, timeout).map_err(|e| fail(e.to_string()))?;
        let mut agent = GuestAgent {
            socket: socket.to_path_buf(),
            reader,
            writer,
        };
        // The token is echoed after a 0xFF byte: what comes before it is
        // stale.
        let token = token & ((1 << 53) - 1);
        match agent.call("guest-sync-delimited", Some(json!({ "id": token })), true)? {
            v if v.as_u64() == Some(token) => Ok(agent),
            other => Err(agent.fail(format!(
                "guest-sync-delimited answered {other} instead of {token}"
            ))),
        }
    }

    fn fail(&self, reason: String) -> SnapError {
        SnapError::GuestAgent {
            socket: self.socket.clone(),
            reason,
        }
    }

    fn call(&mut self, command: &str, arguments: Option<Value>, sync: bool) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        // With the sync, a 0xFF first makes the agent drop a partial
        // command a dead client left.
        let prefix: &[u8] = if sync { &[0xFF] } else { &[] };
        send(&mut self.writer, prefix, &msg).map_err(|e| self.fail(format!("{command}: {e}")))?;
        let line = read_line(&mut self.reader, MAX_LINE, sync)
            .map_err(|e| self.fail(format!("{command}: {e}")))?
            .ok_or_else(|| self.fail(format!("{command}: the agent closed the connection")))?;
        match decode(&line).map_err(|e| self.fail(format!("{command}: {e}")))? {
            Answer::Return(v) => Ok(v),
            Answer::Error(class, desc) => {
                Err(self.fail(format!("{command} failed: {class}: {desc}")))
            }
        }
    }

    /// `frozen` or `thawed`, as the agent says.
    pub fn freeze_status(&mut self) -> Result<String> {
        let v = self.call("guest-fsfreeze-status", None, false)?;
        v.as_str()
            .map(shown)
            .ok_or_else(|| self.fail(format!("guest-fsfreeze-status answered {v}")))
    }

    /// Freezes the guest's file systems; the guard thaws them when it is
    /// dropped (or by [`Frozen::thaw`], which reports a failure). A freeze
    /// that fails is thawed at once, in case it froze some of them.
    pub fn freeze(&mut self) -> Result<Frozen<'_>> {
        match self.call("guest-fsfreeze-freeze", None, false) {
            Ok(v) => Ok(Frozen {
                filesystems: v.as_u64().unwrap_or(0),
                agent: self,
                thawed: false,
            }),
            Err(e) => {
                let _ = self.call("guest-fsfreeze-thaw", None, false);
                Err(e)
            }
        }
    }

    /// Thaws the guest's file systems (also those a killed coffre left
    /// frozen); returns how many the agent thawed.
    pub fn thaw(&mut self) -> Result<u64> {
        let v = self.call("guest-fsfreeze-thaw", None, false)?;
        Ok(v.as_u64().unwrap_or(0))
    }
}

/// File systems frozen by [`GuestAgent::freeze`]; thawed when dropped.
#[derive(Debug)]
pub struct Frozen<'a> {
    agent: &'a mut GuestAgent,
    /// How many the agent froze.
    pub filesystems: u64,
    thawed: bool,
}

impl Frozen<'_> {
    /// Thaws now, reporting a failure.
    pub fn thaw(mut self) -> Result<u64> {
        // Marked thawed only once the agent said so: a failed thaw is
        // tried again by the drop.
        let n = self.agent.thaw()?;
        self.thawed = true;
        Ok(n)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if !self.thawed
            && let Err(e) = self.agent.thaw()
        {
            tracing::warn!(error = %e, "could not thaw the guest's file systems");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A fake guest agent speaking the agent's JSON protocol: it records
    /// each command, answers the sync after a stale reply and a 0xFF, and
    /// fails the freeze when `fail_freeze`.
    fn agent(fail_freeze: bool) -> (tempfile::TempDir, PathBuf, Arc<Mutex<Vec<String>>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut frozen = false;
            loop {
                let mut line = Vec::new();
                if r.read_until(b'\n', &mut line).unwrap() == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line)
                    .trim_start_matches('\u{fffd}')
                    .to_string();
                let cmd: Value = serde_json::from_str(text.trim()).unwrap();
                let name = cmd["execute"].as_str().unwrap().to_string();
                seen.lock().unwrap().push(name.clone());
                match name.as_str() {
                    "guest-sync-delimited" => {
                        w.write_all(b"{\"return\": 12345}\n\xff").unwrap();
                        writeln!(w, "{{\"return\": {}}}", cmd["arguments"]["id"]).unwrap();
                    }
                    "guest-fsfreeze-freeze" if fail_freeze => {
                        writeln!(w, r#"{{"error": {{"class": "GenericError", "desc": "failed to freeze /"}}}}"#).unwrap();
                    }
                    "guest-fsfreeze-freeze" => {
                        frozen = true;
                        writeln!(w, r#"{{"return": 2}}"#).unwrap();
                    }
                    "guest-fsfreeze-thaw" => {
                        writeln!(w, r#"{{"return": {}}}"#, if frozen { 2 } else { 0 }).unwrap();
                        frozen = false;
                    }
                    "guest-fsfreeze-status" => {
                        writeln!(
                            w,
                            r#"{{"return": "{}"}}"#,
                            if frozen { "frozen" } else { "thawed" }
                        )
                        .unwrap();
                    }
                    _ => writeln!(
                        w,
                        r#"{{"error": {{"class": "CommandNotFound", "desc": "?"}}}}"#
                    )
                    .unwrap(),
                }
            }
        });
        (dir, path, log)
    }

    #[test]
    fn a_freeze_is_thawed_by_its_guard_on_every_path() {
        let (_d, path, log) = agent(false);
        let mut a = GuestAgent::connect(&path, Duration::from_secs(5), 777).unwrap();
        {
            let f = a.freeze().unwrap();
            assert_eq!(f.filesystems, 2);
            // Dropped without a thaw (an error path): it thaws.
        }
        assert_eq!(a.freeze_status().unwrap(), "thawed");
        let f = a.freeze().unwrap();
        assert_eq!(f.thaw().unwrap(), 2);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "guest-sync-delimited",
                "guest-fsfreeze-freeze",
                "guest-fsfreeze-thaw",
                "guest-fsfreeze-status",
                "guest-fsfreeze-freeze",
                "guest-fsfreeze-thaw",
            ]
        );
    }

    #[test]
    fn a_failed_freeze_is_thawed_at_once_and_named() {
        let (_d, path, log) = agent(true);
        let mut a = GuestAgent::connect(&path, Duration::from_secs(5), 5).unwrap();
        let e = a.freeze().unwrap_err();
        assert!(e.to_string().contains("failed to freeze /"), "{e}");
        assert_eq!(a.freeze_status().unwrap(), "thawed");
        assert_eq!(
            log.lock().unwrap()[1..3],
            ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
        );
    }

    #[test]
    fn an_agent_that_does_not_answer_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let t = std::time::Instant::now();
        let e = GuestAgent::connect(&path, Duration::from_millis(200), 1).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(e.to_string().contains("guest agent"), "{e}");
    }
}
