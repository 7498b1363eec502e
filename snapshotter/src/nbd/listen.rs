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

/// A bound listener.
pub enum Listener {
    /// A Unix socket, removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
    /// A TCP address.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a Unix socket at `path`, mode 0600. A socket file nobody
    /// listens on (a server that was killed) is replaced; one a server
    /// still answers on is an error, as is any other file.
    pub fn unix(path: &Path) -> Result<Listener> {
        let at = path.display().to_string();
        let io = |e: std::io::Error| nbd_err(&at, e.to_string());
        match std::fs::symlink_metadata(path) {
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt;
                if !m.file_type().is_socket() {
                    return Err(nbd_err(
                        &at,
                        "the path exists and is not a socket: not replacing it",
                    ));
                }
                if UnixStream::connect(path).is_ok() {
                    return Err(nbd_err(
                        &at,
                        "the socket is already served by a running export",
                    ));
                }
                std::fs::remove_file(path).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let l = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        l.set_nonblocking(true).map_err(io)?;
        Ok(Listener::Unix(l, path.to_path_buf()))
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
            Listener::Unix(_, p) => p.display().to_string(),
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
        }
    }

    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
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
            next += 1;
            let id = next;
            open.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, conn);
            live.fetch_add(1, Ordering::Relaxed);
            let (live, open) = (&live, &open);
            scope.spawn(move || {
                if let Err(e) = serve_connection(input, output, exports, opts.workers, activity) {
                    tracing::debug!(error = %e, "an NBD connection ended with an error");
                }
                open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                live.fetch_sub(1, Ordering::Relaxed);
            });
        };
        // Wake every connection thread blocked on its client.
        for c in open.lock().unwrap_or_else(|p| p.into_inner()).values() {
            c.shutdown();
        }
        Ok(stopped)
    })
}
