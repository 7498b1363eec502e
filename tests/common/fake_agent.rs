//! A fake QEMU guest agent on a unix socket, for the live-backup tests
//! (qemu-ga itself must not run on the host: it would freeze the host's
//! file systems). It speaks the agent's protocol as QEMU's chardev
//! delivers it: one client at a time, served in sequence (a second client
//! waits until the first has gone, as with QEMU's `-chardev socket`);
//! JSON objects one a line, a `0xFF` before one resets the parser;
//! `guest-sync-delimited` answers `0xFF` then `{"return": id}`;
//! `guest-fsfreeze-status`, `-freeze` (the count of file systems) and
//! `-thaw`; while frozen, any other command is refused as qemu-ga does.
//! It records every command with its wall-clock time, keeps the frozen
//! flag across connections, and can be slow to freeze or thaw, fail the
//! freeze, or never answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// How the fake agent behaves (changeable while it runs: a delay under
/// way ends early when it is shortened).
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// How long a freeze takes (the guest is frozen from its start).
    pub freeze_delay: Duration,
    /// How long a thaw takes (the guest is thawed at its end).
    pub thaw_delay: Duration,
    /// The freeze fails (nothing stays frozen, as with qemu-ga).
    pub fail_freeze: bool,
    /// Reads commands and never answers.
    pub silent: bool,
}

/// What the agent went through.
#[derive(Debug, Default)]
pub struct Agent {
    /// The guest's file systems are frozen.
    pub frozen: bool,
    /// Freezes that took effect.
    pub freezes: u32,
    /// Every command, in order, with when it arrived (nanoseconds since
    /// the Unix epoch, comparable with `date +%s%N`).
    pub log: Vec<(u128, String)>,
    /// Connections accepted.
    pub connections: u32,
    pub behaviour: Behaviour,
}

impl Agent {
    /// The commands in order, without `guest-` prefixes: `sync`, `freeze`,
    /// `thaw`, `status`…
    pub fn commands(&self) -> Vec<String> {
        self.log
            .iter()
            .map(|(_, c)| {
                c.strip_prefix("guest-fsfreeze-")
                    .or_else(|| c.strip_prefix("guest-"))
                    .map(|c| c.strip_suffix("-delimited").unwrap_or(c))
                    .unwrap_or(c)
                    .to_string()
            })
            .collect()
    }

    /// When command `name` (as [`Agent::commands`] names it) arrived for
    /// the `nth` time (from 0).
    pub fn at(&self, name: &str, nth: usize) -> Option<u128> {
        self.commands()
            .iter()
            .zip(&self.log)
            .filter(|(c, _)| *c == name)
            .nth(nth)
            .map(|(_, (t, _))| *t)
    }
}

/// A fake agent serving `path` until dropped.
pub struct FakeAgent {
    pub path: PathBuf,
    state: Arc<Mutex<Agent>>,
    stop: Arc<AtomicBool>,
}

/// The state, also after a test thread panicked holding it.
fn lock(state: &Mutex<Agent>) -> MutexGuard<'_, Agent> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

impl FakeAgent {
    /// Listens on `path` and serves clients in sequence.
    pub fn start(path: &Path, behaviour: Behaviour) -> FakeAgent {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let state = Arc::new(Mutex::new(Agent {
            behaviour,
            ..Agent::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, halt) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                lock(&st).connections += 1;
                serve(conn, &st, &halt);
            }
        });
        FakeAgent {
            path: path.to_path_buf(),
            state,
            stop,
        }
    }

    /// The agent's state, locked.
    pub fn state(&self) -> MutexGuard<'_, Agent> {
        lock(&self.state)
    }

    /// Changes how it behaves.
    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state().behaviour);
    }

    /// Runs `f` (given the number of freezes so far) with the guest held
    /// thawed, as a guest's write would: a freeze that arrives meanwhile
    /// waits for it to end. `None`, without running it, while frozen.
    pub fn unless_frozen<R>(&self, f: impl FnOnce(u32) -> R) -> Option<R> {
        let st = self.state();
        (!st.frozen).then(|| f(st.freezes))
    }

    /// Waits (at most `limit`) until `pred` holds of the agent.
    pub fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&Agent) -> bool) {
        let start = Instant::now();
        while !pred(&self.state()) {
            assert!(
                start.elapsed() < limit,
                "waited {limit:?} for the agent: {what}: {:?}",
                self.state().log
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept.
        let _ = UnixStream::connect(&self.path);
    }
}

/// Sleeps while `delay` (read afresh) has not passed.
fn pause(state: &Mutex<Agent>, delay: impl Fn(&Behaviour) -> Duration) {
    let start = Instant::now();
    while start.elapsed() < delay(&lock(state).behaviour) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn error(desc: &str) -> Value {
    json!({ "error": { "class": "GenericError", "desc": desc } })
}

/// Serves one client until it goes. Write errors (a client killed before
/// its answer) are ignored, as the agent would.
fn serve(conn: UnixStream, state: &Mutex<Agent>, halt: &AtomicBool) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut raw = Vec::new();
        match r.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if halt.load(Ordering::SeqCst) {
            return;
        }
        // A 0xFF resets the parser: what comes before it is dropped.
        let text = match raw.iter().rposition(|&b| b == 0xFF) {
            Some(i) => &raw[i + 1..],
            None => &raw[..],
        };
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (reply, prefix) = match serde_json::from_slice::<Value>(text) {
            Err(e) => (Some(error(&format!("JSON parse error, {e}"))), false),
            Ok(cmd) => answer(&cmd, state),
        };
        let Some(reply) = reply else { continue };
        let mut bytes = if prefix { vec![0xFF] } else { Vec::new() };
        bytes.extend_from_slice(reply.to_string().as_bytes());
        bytes.push(b'\n');
        let _ = w.write_all(&bytes);
    }
}

/// The answer to `cmd` (`None`: none), and whether a 0xFF goes first.
fn answer(cmd: &Value, state: &Mutex<Agent>) -> (Option<Value>, bool) {
    let name = cmd["execute"].as_str().unwrap_or("").to_string();
    let mut st = lock(state);
    st.log.push((now_ns(), name.clone()));
    if st.behaviour.silent {
        return (None, false);
    }
    let allowed_frozen = [
        "guest-sync-delimited",
        "guest-sync",
        "guest-ping",
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
    ];
    if st.frozen && !allowed_frozen.contains(&name.as_str()) {
        return (
            Some(error(&format!(
                "Command {name} has been disabled: the agent is in frozen state"
            ))),
            false,
        );
    }
    let id = cmd["arguments"]["id"].clone();
    match name.as_str() {
        "guest-sync-delimited" => (Some(json!({ "return": id })), true),
        "guest-sync" => (Some(json!({ "return": id })), false),
        "guest-ping" => (Some(json!({ "return": {} })), false),
        "guest-fsfreeze-status" => {
            let s = if st.frozen { "frozen" } else { "thawed" };
            (Some(json!({ "return": s })), false)
        }
        "guest-fsfreeze-freeze" if st.behaviour.fail_freeze => {
            drop(st);
            pause(state, |b| b.freeze_delay);
            (
                Some(error(
                    "failed to freeze /srv: Device or resource busy (fake agent)",
                )),
                false,
            )
        }
        "guest-fsfreeze-freeze" => {
            st.frozen = true;
            st.freezes += 1;
            drop(st);
            pause(state, |b| b.freeze_delay);
            (Some(json!({ "return": 2 })), false)
        }
        "guest-fsfreeze-thaw" => {
            drop(st);
            pause(state, |b| b.thaw_delay);
            let mut st = lock(state);
            let n = if st.frozen { 2 } else { 0 };
            st.frozen = false;
            (Some(json!({ "return": n })), false)
        }
        _ => (
            Some(
                json!({ "error": { "class": "CommandNotFound", "desc": format!("The command {name} has not been found") } }),
            ),
            false,
        ),
    }
}
