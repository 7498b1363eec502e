//! `coffre export` against the real NBD clients: `qemu-img convert` of
//! the export equals `coffre restore` of the same point from both tiers,
//! `nbdinfo --map` shows the image's holes, several clients read at once,
//! `nbdcopy` and `qemu-img compare` agree; a damaged block is an EIO for
//! its range (never zeros) and a bad copy is repaired from a replica while
//! served; the socket is private, a live one is refused and a stale one
//! (a killed export) replaced; `--all` and the idle timeout. Skipped with
//! a message where qemu-utils or libnbd-bin is missing.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use coffre_engine::nbd::wire::Client;

use crate::common::qemu::wait_until;
use crate::common::*;

const MIB: u64 = 1 << 20;

/// True when qemu-img, nbdinfo and nbdcopy run; says SKIP otherwise.
fn have_tools() -> bool {
    tools_run(
        &["qemu-img", "nbdinfo", "nbdcopy"],
        "NBD export: qemu-img, nbdinfo or nbdcopy missing (apt-get install qemu-utils libnbd-bin)",
    )
}

/// A running `coffre export`; killed on drop.
struct Export {
    child: Option<Child>,
}

impl Export {
    /// `coffre export ARGS`, once `ready` says it serves.
    fn start(args: &[&str], ready: impl Fn() -> bool) -> Export {
        Export::start_with(coffre(), args, ready)
    }

    /// `CMD export ARGS` (a `coffre()` with its own environment).
    fn start_with(mut cmd: Command, args: &[&str], ready: impl Fn() -> bool) -> Export {
        let child = cmd
            .arg("export")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut e = Export { child: Some(child) };
        let t0 = Instant::now();
        while !ready() {
            if let Some(status) = e.child.as_mut().unwrap().try_wait().unwrap() {
                let out = e.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "coffre export {args:?} ended ({status}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the export did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        e
    }

    /// On a Unix socket.
    fn unix(vault: &Path, sock: &Path, extra: &[&str]) -> Export {
        let mut args = vec!["--vault", s(vault), "--item", "disk", "--socket", s(sock)];
        args.extend_from_slice(extra);
        Export::start(&args, || UnixStream::connect(sock).is_ok())
    }

    /// SIGTERM, then the output.
    fn stop(mut self) -> Output {
        let child = self.child.take().unwrap();
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait_with_output().unwrap()
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name).args(args).output().unwrap()
}

fn tool_ok(name: &str, args: &[&str]) -> String {
    let out = tool(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// A 24 MiB image of text, random data, zeros and holes, with a 4 MiB
/// hole at 8 MiB; backed up once into a new vault (`extra`: create args).
fn backed_up(t: &Path, extra: &[&str]) -> (PathBuf, PathBuf) {
    let vault = new_vault(t, extra);
    let img = t.join("disk.img");
    mixed_image(&img, 24 * MIB, 7);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&vec![0u8; 4 * MIB as usize], 8 * MIB)
        .unwrap();
    drop(f);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    (vault, img)
}

/// The local addresses (hex, as `/proc/net/tcp` and `tcp6` write them)
/// listening on `port`.
fn tcp_listeners(port: u16) -> Vec<String> {
    let suffix = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    // State 0A: LISTEN.
                    let (addr, port) = w.get(1)?.split_once(':')?;
                    (w.get(3) == Some(&"0A") && format!(":{port}") == suffix)
                        .then(|| addr.to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Extents `nbdinfo --map` reports: (offset, length, type).
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    tool_ok("nbdinfo", &["--map", uri])
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn an_export_reads_as_a_restore_does_from_both_tiers_with_holes_and_several_clients() {
    if !have_tools() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (vault, img) = backed_up(t.path(), &[]);
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

    // The snapshot tier (the default while the point has a snapshot).
    let sock = t.path().join("export.sock");
    let e = Export::unix(&vault, &sock, &[]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is its owner's alone");
    let u = uri(&sock, "disk");
    let out = t.path().join("converted.raw");
    tool_ok("qemu-img", &["convert", "-O", "raw", &u, s(&out)]);
    assert_same(&restored, &out);
    assert!(tool_ok("qemu-img", &["compare", s(&img), &u]).contains("identical"));

    // The holes show: the 4 MiB hole at 8 MiB is covered by hole/zero
    // extents (type 3), and data extents are type 0.
    let extents = map(&u);
    assert_eq!(
        extents.iter().map(|e| e.1).sum::<u64>(),
        24 * MIB,
        "{extents:?}"
    );
    let hole: u64 = extents
        .iter()
        .filter(|e| e.2 == 3)
        .map(|&(o, l, _)| (o + l).min(12 * MIB).saturating_sub(o.max(8 * MIB)))
        .sum();
    assert_eq!(hole, 4 * MIB, "{extents:?}");
    assert!(extents.iter().any(|e| e.2 == 0), "{extents:?}");

    // Several clients at once (multi-conn, which libnbd sees): a client
    // of our own stays connected, part-way through the image, while
    // qemu-img and nbdcopy each read the whole of it; an export that
    // served one connection at a time would keep them waiting (past the
    // 20 s wait) until the first one left.
    assert!(
        tool("nbdinfo", &["--can", "multi-conn", &u])
            .status
            .success(),
        "the export advertises multi-conn"
    );
    let want = std::fs::read(&img).unwrap();
    let stream = UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut held = Client::handshake(stream, "disk", &[]).unwrap();
    let mut first = vec![0u8; MIB as usize];
    held.read_ranges(0, &mut first, &[(0, MIB as u32)]).unwrap();
    assert_eq!(&first[..], &want[..MIB as usize]);
    let (a, b) = (t.path().join("a.raw"), t.path().join("b.raw"));
    let ca = Command::new("qemu-img")
        .args(["convert", "-O", "raw", &u, s(&a)])
        .spawn()
        .unwrap();
    let cb = Command::new("nbdcopy")
        .args([u.as_str(), s(&b)])
        .spawn()
        .unwrap();
    // (Past the wait, the export is killed on the way out, and the
    // readers with it.)
    for (name, mut c) in [("qemu-img convert", ca), ("nbdcopy", cb)] {
        let mut status = None;
        wait_until(&format!("{name} while another client is connected"), || {
            status = c.try_wait().unwrap();
            status.is_some()
        });
        let status = status.unwrap();
        assert!(status.success(), "{name}: {status}");
    }
    assert_same(&img, &a);
    assert_same(&img, &b);
    // The first client, still connected, reads the last MiB.
    let mut last = vec![0u8; MIB as usize];
    held.read_ranges(23 * MIB, &mut last, &[(23 * MIB, MIB as u32)])
        .unwrap();
    assert_eq!(&last[..], &want[23 * MIB as usize..]);
    held.disconnect();
    let stopped = e.stop();
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(!sock.exists(), "the socket is removed at the end");
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(err.contains("0 failed reads"), "{err}");
    // It was the snapshot tier that served (the default while the point
    // has a snapshot; the vault tier follows).
    let said = String::from_utf8_lossy(&stopped.stdout);
    assert!(said.contains("from the snapshot)"), "{said}");

    // The vault tier, over TCP: `--listen PORT` alone binds loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let e = Export::start(
        &[
            "--vault",
            s(&vault),
            "--item",
            "disk",
            "--from",
            "vault",
            "--listen",
            &port.to_string(),
        ],
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    assert_eq!(
        tcp_listeners(port),
        vec!["0100007F".to_string()],
        "only 127.0.0.1 listens on port {port}"
    );
    let from_vault = t.path().join("from-vault.img");
    ok(&[
        "restore",
        "--vault",
        s(&vault),
        "--item",
        "disk",
        "--from",
        "vault",
        "--to",
        s(&from_vault),
    ]);
    let out = t.path().join("converted-vault.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            &format!("nbd://{listen}/disk"),
            s(&out),
        ],
    );
    assert_same(&from_vault, &out);
    assert_same(&img, &out);
    let stopped = e.stop();
    assert!(stopped.status.success(), "{stopped:?}");
    let said = String::from_utf8_lossy(&stopped.stdout);
    assert!(said.contains("from the vault)"), "{said}");
}

/// Flips one byte inside the first record (block 0's random bytes, stored
/// raw) of the vault's first segment: segment header 32 bytes, record
/// header 56, then 1000 into the data. Without replicas that segment is
/// the backup's snapshot pack, adopted: both tiers share it.
fn flip_first_record(vault: &Path) {
    let seg = segment_files(vault).into_iter().next().expect("a segment");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let at = 32 + 56 + 1000;
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
}

#[test]
fn a_damaged_block_is_an_eio_for_its_range_never_zeros() {
    if !have_tools() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("disk.img");
    random_file(&img, 4 * MIB as usize, 3);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    flip_first_record(&vault);
    let sock = t.path().join("export.sock");
    let e = Export::unix(&vault, &sock, &[]);
    let mut c = Client::handshake(
        UnixStream::connect(&sock).unwrap(),
        "disk",
        &["base:allocation".to_string()],
    )
    .unwrap();
    // The damaged block fails; the block after it reads exactly.
    let mut buf = vec![0u8; 64 << 10];
    let err = c.read_ranges(0, &mut buf, &[(0, 4096)]).unwrap_err();
    assert!(err.to_string().contains("error 5"), "an EIO: {err}");
    let mut next = vec![0u8; 64 << 10];
    c.read_ranges(64 << 10, &mut next, &[(64 << 10, 64 << 10)])
        .unwrap();
    let want = std::fs::read(&img).unwrap();
    assert_eq!(&next[..], &want[64 << 10..128 << 10]);
    c.disconnect();
    // A whole copy fails rather than produce zeros.
    let out = t.path().join("out.raw");
    let conv = tool(
        "qemu-img",
        &["convert", "-O", "raw", &uri(&sock, "disk"), s(&out)],
    );
    assert!(
        !conv.status.success(),
        "qemu-img convert of a damaged point succeeded"
    );
    let stopped = e.stop();
    assert_eq!(stopped.status.code(), Some(7), "exit code: damaged data");
    let log = String::from_utf8_lossy(&stopped.stderr);
    let point = points(&vault, "disk")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        log.contains(&point) && (log.contains("block 0") || log.contains("block=0")),
        "the log names the point and the block: {log}"
    );
}

#[test]
fn a_bad_copy_is_repaired_from_a_replica_while_it_is_served() {
    if !have_tools() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let replica = t.path().join("replica");
    let vault = new_vault(t.path(), &["--replica", s(&replica)]);
    let img = t.path().join("disk.img");
    random_file(&img, 4 * MIB as usize, 5);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    flip_first_record(&vault);
    // The primary's copy is bad now (verify reads every copy).
    let bad = run(&["verify", "--vault", s(&vault), "--read-data"]);
    assert_eq!(bad.status.code(), Some(3), "{bad:?}");
    let sock = t.path().join("export.sock");
    let e = Export::unix(&vault, &sock, &["--from", "vault"]);
    let out = t.path().join("out.raw");
    tool_ok(
        "qemu-img",
        &["convert", "-O", "raw", &uri(&sock, "disk"), s(&out)],
    );
    assert_same(&img, &out);
    assert!(e.stop().status.success());
    // The bad copy was rewritten from the replica.
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}

#[test]
fn the_socket_is_refused_while_served_replaced_when_stale_and_every_point_can_be_served() {
    if !have_tools() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (vault, img) = backed_up(t.path(), &[]);
    churn(&img, 8, 100_000, 9);
    ok(&["backup", "--vault", s(&vault), s(&img)]);
    let sock = t.path().join("export.sock");
    let e = Export::unix(&vault, &sock, &["--all"]);
    // A second export on the same socket is refused; the first serves on.
    let second = run(&[
        "export",
        "--vault",
        s(&vault),
        "--item",
        "disk",
        "--socket",
        s(&sock),
    ]);
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already served"),
        "{second:?}"
    );
    // --all: one export per point, named by its id.
    let list = tool_ok(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    for p in points(&vault, "disk") {
        assert!(list.contains(p["id"].as_str().unwrap()), "{list}");
    }
    let latest = points(&vault, "disk")[1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = t.path().join("latest.raw");
    tool_ok(
        "qemu-img",
        &["convert", "-O", "raw", &uri(&sock, &latest), s(&out)],
    );
    assert_same(&img, &out);
    // Killed: the socket file stays, and the next export replaces it.
    drop(e);
    assert!(sock.exists());
    let e = Export::unix(&vault, &sock, &["--idle-timeout", "1"]);
    // The idle timeout ends it on its own.
    let mut child = e;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the idle timeout did not end the export"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert!(!sock.exists());
}

#[test]
fn an_encrypted_vaults_secondary_is_served_with_its_key() {
    if !have_tools() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("vault.key");
    let secondary = t.path().join("secondary");
    let vault = new_vault(
        t.path(),
        &[
            "--encryption",
            "aes-256-gcm",
            "--generate-key-file",
            s(&key),
            "--secondary",
            s(&secondary),
        ],
    );
    let img = t.path().join("disk.img");
    mixed_image(&img, 8 * MIB, 11);
    let with_key = |args: &[&str]| {
        let out = coffre()
            .env("COFFRE_KEY_FILE", &key)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    with_key(&["backup", "--vault", s(&vault), s(&img)]);
    with_key(&["replicate", "--vault", s(&vault)]);
    // Without the key: refused (exit 15), nothing served.
    let sock = t.path().join("export.sock");
    let out = run(&[
        "export",
        "--vault",
        s(&vault),
        "--item",
        "disk",
        "--socket",
        s(&sock),
    ]);
    assert_eq!(out.status.code(), Some(15), "{out:?}");
    // With it, from the secondary alone (the primary moved away).
    let away = t.path().join("vault.away");
    std::fs::rename(&vault, &away).unwrap();
    let mut cmd = coffre();
    cmd.env("COFFRE_KEY_FILE", &key)
        .env("COFFRE_SECONDARY", &secondary);
    let e = Export::start_with(
        cmd,
        &[
            "--vault",
            s(&vault),
            "--item",
            "disk",
            "--from",
            "secondary",
            "--socket",
            s(&sock),
        ],
        || UnixStream::connect(&sock).is_ok(),
    );
    let out = t.path().join("out.raw");
    tool_ok(
        "qemu-img",
        &["convert", "-O", "raw", &uri(&sock, "disk"), s(&out)],
    );
    assert_same(&img, &out);
    assert!(e.stop().status.success());
}
