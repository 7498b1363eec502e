//! Where an NBD export listens, and its accept loop: a Unix socket (made
//! private to its owner, a stale one left by a killed server replaced,
//! a live one refused) or a TCP address; one thread per connection; the
//! loop ends when asked to stop (a signal sets the flag) or after an idle
//! time with no connection, and then closes every connection.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::wire::{Activity, Served, serve_connection};
use crate::error::{Result, SnapError};

fn nbd_err(at: &str, reason: impl Into<String>) -> SnapError {
    SnapError::Nbd {
        uri: at.to_string(),
        reason: reason.into(),
    }
}

/// How often the accept loop looks at the stop flag.
const TICK: Duration = Duration::from_millis(50);
/// Time a client has for its handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(30);
/// Time a reply may wait for a client that does not read.
const WRITE_LIMIT: Duration = Duration::from_secs(120);

/// One open connection's place: given back when dropped.
struct Slot<'a> {
    live: &'a AtomicUsize,
    open: &'a Mutex<std::collections::HashMap<u64, Conn>>,
    id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A bound listener.
pub enum Listener {
    /// A Unix socket, removed when the listener is dropped (if the path
    /// is still this socket: device and inode).
    Unix(UnixListener, PathBuf, (u64, u64)),
    /// A TCP address.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a Unix socket at `path`, mode 0600 from the start: it is
    /// bound in a private (0700) folder beside `path`, made 0600 there,
    /// then renamed onto `path` (which never follows a symlink there). A
    /// socket file nobody listens on (a server that was killed:
    /// connection refused) is replaced; one a server answers on is an
    /// error, as is any other file.
    pub fn unix(path: &Path) -> Result<Listener> {
        use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
        let at = path.display().to_string();
        let io = |e: std::io::Error| nbd_err(&at, e.to_string());
        match std::fs::symlink_metadata(path) {
            Ok(m) => {
                if !m.file_type().is_socket() {
                    return Err(nbd_err(
                        &at,
                        "the path exists and is not a socket: not replacing it",
                    ));
                }
                match UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(nbd_err(
                            &at,
                            "the socket is already served by a running export",
                        ));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => {
                        return Err(nbd_err(
                            &at,
                            format!(
                                "the socket exists and cannot be checked ({e}): not replacing it"
                            ),
                        ));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| nbd_err(&at, "the socket path names no file"))?;
        let private = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(io)?;
        let staged = private.join("s");
        let bound = (|| {
            let l = UnixListener::bind(&staged)?;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&staged, path)?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })();
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&private);
        let l = bound.map_err(io)?;
        let m = std::fs::symlink_metadata(path).map_err(io)?;
        Ok(Listener::Unix(l, path.to_path_buf(), (m.dev(), m.ino())))
    }

    /// Binds a TCP address.
    pub fn tcp(addr: SocketAddr) -> Result<Listener> {
        let io = |e: std::io::Error| nbd_err(&addr.to_string(), format!("cannot listen: {e}"));
        let l = TcpListener::bind(addr).map_err(io)?;
        l.set_nonblocking(true).map_err(io)?;
        Ok(Listener::Tcp(l))
    }

    /// Where it listens, for messages.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(_, p, _) => p.display().to_string(),
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
        }
    }

    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Unix(l, ..) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Listener::Unix(_, p, id) = self
            && std::fs::symlink_metadata(&*p).is_ok_and(|m| (m.dev(), m.ino()) == *id)
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One accepted connection.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn halves(&self) -> std::io::Result<(Conn, Conn)> {
        Ok(match self {
            Conn::Unix(s) => {
                s.set_nonblocking(false)?;
                (Conn::Unix(s.try_clone()?), Conn::Unix(s.try_clone()?))
            }
            Conn::Tcp(s) => {
                s.set_nonblocking(false)?;
                (Conn::Tcp(s.try_clone()?), Conn::Tcp(s.try_clone()?))
            }
        })
    }

    /// The handshake's time limit (`None` lifts it), and a limit on
    /// writes so that a client that stops reading its replies is dropped.
    fn limit_reads(&self, t: Option<Duration>) {
        let _ = match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        };
    }

    fn limit_writes(&self, t: Duration) {
        let _ = match self {
            Conn::Unix(s) => s.set_write_timeout(Some(t)),
            Conn::Tcp(s) => s.set_write_timeout(Some(t)),
        };
    }

    /// TCP keepalive: a peer that vanished is noticed (its thread ends).
    fn keepalive(&self) {
        if let Conn::Tcp(s) = self {
            use std::os::fd::AsRawFd;
            let on: libc::c_int = 1;
            // SAFETY: setsockopt on a socket we own, with a c_int option.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_KEEPALIVE,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl std::io::Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(b),
            Conn::Tcp(s) => s.read(b),
        }
    }
}

impl std::io::Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(b),
            Conn::Tcp(s) => s.write(b),
        }
    }
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.write_all(b),
            Conn::Tcp(s) => s.write_all(b),
        }
    }
    fn write_vectored(&mut self, b: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write_vectored(b),
            Conn::Tcp(s) => s.write_vectored(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a server runs.
pub struct ServeOptions<'s> {
    /// Set (by a signal) to stop: connections are closed.
    pub stop: &'s AtomicBool,
    /// Stop after this long without any connection.
    pub idle_timeout: Option<Duration>,
    /// Threads per connection answering reads.
    pub workers: usize,
    /// Most connections at once; more are closed at once.
    pub max_connections: usize,
}

/// Why a server stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The stop flag was set.
    Asked,
    /// No connection for the idle timeout.
    Idle,
}

/// Serves `exports` on `listener` until stopped.
pub fn serve(
    listener: &Listener,
    exports: &[Served<'_>],
    opts: &ServeOptions<'_>,
    activity: &Activity,
) -> Result<Stopped> {
    let live = AtomicUsize::new(0);
    // Every open connection, by number, so that a stop can close them.
    let open: Mutex<std::collections::HashMap<u64, Conn>> = Mutex::default();
    let mut next = 0u64;
    std::thread::scope(|scope| {
        let mut idle_since = Instant::now();
        let stopped = loop {
            if opts.stop.load(Ordering::Relaxed) {
                break Stopped::Asked;
            }
            if live.load(Ordering::Relaxed) > 0 {
                idle_since = Instant::now();
            } else if opts.idle_timeout.is_some_and(|t| idle_since.elapsed() >= t) {
                break Stopped::Idle;
            }
            let conn = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(TICK);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(listener = %listener.describe(), error = %e, "accepting a connection failed");
                    std::thread::sleep(TICK);
                    continue;
                }
            };
            if live.load(Ordering::Relaxed) >= opts.max_connections {
                tracing::warn!(
                    "a connection was refused: {} are open already",
                    opts.max_connections
                );
                conn.shutdown();
                continue;
            }
            let Ok((input, output)) = conn.halves() else {
                continue;
            };
            conn.keepalive();
            conn.limit_writes(WRITE_LIMIT);
            conn.limit_reads(Some(HANDSHAKE_LIMIT));
            let Ok(control) = conn.halves().map(|(c, _)| c) else {
                continue;
            };
            next += 1;
            let id = next;
            open.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, conn);
            live.fetch_add(1, Ordering::Relaxed);
            let (live, open) = (&live, &open);
            scope.spawn(move || {
                // Whatever ends the connection (a panic too), its slot is
                // given back.
                let _slot = Slot { live, open, id };
                let lift = || control.limit_reads(None);
                if let Err(e) =
                    serve_connection(input, output, exports, opts.workers, activity, lift)
                {
                    tracing::debug!(error = %e, "an NBD connection ended with an error");
                }
            });
        };
        // Wake every connection thread blocked on its client.
        for c in open.lock().unwrap_or_else(|p| p.into_inner()).values() {
            c.shutdown();
        }
        Ok(stopped)
    })
}
