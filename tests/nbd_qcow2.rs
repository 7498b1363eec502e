//! qcow2 images over real `qemu-nbd`, with a persistent QEMU dirty bitmap
//! (`qemu-img bitmap --add --enable`) changed by `qemu-io` writes: the
//! second backup reads only the dirty extents and restores byte-identical
//! to `qemu-img convert -O raw`; a bitmap that missed writes (disabled
//! while they happened) is caught by the sample and the run falls back to
//! a full scan. Skipped with a message where qemu-utils is missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const SIZE: &str = "64M";

/// True when qemu-utils is installed; says SKIP otherwise.
fn have_qemu() -> bool {
    tools_run(
        &["qemu-img", "qemu-nbd", "qemu-io"],
        "qcow2/NBD: qemu-img, qemu-nbd or qemu-io missing (apt-get install qemu-utils)",
    )
}

/// A vault, and a prepared qcow2 backed up once over an export `start`
/// makes; `None` (having said SKIP) without qemu-utils.
fn first_backup(
    start: fn(&Path, &str, &Path) -> Export,
) -> Option<(tempfile::TempDir, PathBuf, PathBuf, serde_json::Value)> {
    if !have_qemu() {
        return None;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = prepared(t.path());
    let e = start(&img, "b0", t.path());
    let b = backup(&vault, &e.uri, &[]);
    drop(e);
    assert_eq!(b["item"], "vm", "the export name is the item: {b}");
    assert_eq!(b["job"]["stats"]["cbt"]["used"], false);
    assert_eq!(b["job"]["status"], "Completed", "{b}");
    Some((t, vault, img, b))
}

fn qemu(tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(img: &Path, pattern: u8, at: u64, len: u64) {
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} {at} {len}"),
            s(img),
        ],
    );
}

/// A read-only `qemu-nbd` export of a qcow2 on a Unix socket, with its
/// dirty bitmap; killed on drop.
struct Export {
    child: Child,
    uri: String,
}

impl Export {
    /// `qemu-nbd ARGS… IMG` (export `vm`), once `ready` says it listens;
    /// killed on drop.
    fn spawn(args: &[&str], img: &Path, ready: impl Fn() -> bool, uri: String) -> Export {
        let child = Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-t", "-x", "vm"])
            .args(args)
            .arg(img)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !ready() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Export { child, uri }
    }

    /// A read-only export with `bitmap`, on TCP (127.0.0.1, a free port).
    fn start_tcp(img: &Path, bitmap: &str, _dir: &Path) -> Export {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = port.to_string();
        Export::spawn(
            &["-r", "-B", bitmap, "-b", "127.0.0.1", "-p", &p],
            img,
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            format!("nbd://127.0.0.1:{port}/vm"),
        )
    }

    /// A read-only export with `bitmap`, on a Unix socket in `dir`.
    fn start(img: &Path, bitmap: &str, dir: &Path) -> Export {
        let sock: PathBuf = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        Export::spawn(
            &["-r", "-B", bitmap, "-k", s(&sock)],
            img,
            || sock.exists(),
            format!("nbd+unix:///vm?socket={}", sock.display()),
        )
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backup(vault: &Path, uri: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backup", "--vault", s(vault), "--bitmap", "b0"];
    args.extend_from_slice(extra);
    args.push(uri);
    json(&args)
}

fn restores_like_convert(vault: &Path, dir: &Path, qcow2: &Path) {
    let raw = dir.join("convert.raw");
    let _ = std::fs::remove_file(&raw);
    qemu("qemu-img", &["convert", "-O", "raw", s(qcow2), s(&raw)]);
    let r = dir.join("restored.img");
    let _ = std::fs::remove_file(&r);
    ok(&restore_args(vault, "vm", None, &r, false));
    assert_same(&r, &raw);
}

fn prepared(dir: &Path) -> PathBuf {
    let img = dir.join("vm.qcow2");
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), SIZE]);
    for (i, at) in [0u64, 5 << 20, 20 << 20, 40 << 20].iter().enumerate() {
        write(&img, 0x10 + i as u8, *at, 3 << 20);
    }
    // Tracking starts now: the first backup is the base it is relative to.
    qemu("qemu-img", &["bitmap", "--add", "--enable", s(&img), "b0"]);
    img
}

#[test]
fn qcow2_backs_up_incrementally_over_qemu_nbd() {
    let Some((t, vault, img, _)) = first_backup(Export::start) else {
        return;
    };
    restores_like_convert(&vault, t.path(), &img);

    // The guest writes 3 extents (qemu-io updates the persistent bitmap).
    write(&img, 0x61, 1 << 20, 128 << 10);
    write(&img, 0x62, 30 << 20, 1 << 20);
    write(&img, 0x63, (60 << 20) + 4096, 4096);
    let e = Export::start(&img, "b0", t.path());
    let b2 = backup(&vault, &e.uri, &[]);
    drop(e);
    let cbt = &b2["job"]["stats"]["cbt"];
    assert_eq!(cbt["used"], true, "{b2}");
    assert_eq!(cbt["source"], "bitmap");
    assert_eq!(cbt["generation"], "b0");
    assert_eq!(cbt["mismatches"], 0);
    let dirty = cbt["dirty_bytes"].as_u64().unwrap();
    assert!(dirty >= (1 << 20) + (128 << 10) + 4096, "{cbt}");
    // Only dirty blocks and the sample (64 blocks of 64 KiB at most) are
    // read, never the 12 MiB of data the image holds.
    let read = b2["stats"]["bytes_read"].as_u64().unwrap();
    assert!(read <= dirty + (3 << 16) + (64 << 16), "read {read}: {b2}");
    assert!(b2["stats"]["blocks_changed"].as_u64().unwrap() >= 3, "{b2}");
    restores_like_convert(&vault, t.path(), &img);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}

#[test]
fn a_bitmap_that_missed_writes_is_caught_and_the_run_falls_back() {
    let Some((t, vault, img, _)) = first_backup(Export::start) else {
        return;
    };
    // A quarter of the disk is written while the bitmap is disabled (as a
    // bitmap lost across a resize or a consolidation bug would), then one
    // marked write.
    qemu("qemu-img", &["bitmap", "--disable", s(&img), "b0"]);
    for i in 0..16u64 {
        write(&img, 0x70 + i as u8, (8 << 20) + i * (1 << 20), 512 << 10);
    }
    qemu("qemu-img", &["bitmap", "--enable", s(&img), "b0"]);
    write(&img, 0x99, 2 << 20, 64 << 10);
    let e = Export::start(&img, "b0", t.path());
    let b = backup(&vault, &e.uri, &[]);
    drop(e);
    let cbt = &b["job"]["stats"]["cbt"];
    assert_eq!(cbt["used"], false, "{b}");
    assert!(cbt["mismatches"].as_u64().unwrap() > 0, "{cbt}");
    assert!(
        b["job"]["stats"]["warnings"]
            .to_string()
            .contains("not trusted, full scan"),
        "{b}"
    );
    assert_eq!(b["job"]["status"], "CompletedWithWarnings");
    restores_like_convert(&vault, t.path(), &img);

    // An export without the bitmap asked for is a clear error.
    let e = Export::start(&img, "b0", t.path());
    let mut args = vec!["backup", "--vault", s(&vault), "--bitmap", "nope"];
    args.push(&e.uri);
    let err = fails(&args, 1);
    assert!(err.contains("no dirty bitmap \"nope\""), "{err}");
}

#[test]
fn a_tcp_export_with_an_nbdinfo_map_as_the_list() {
    let Some((t, vault, img, _)) = first_backup(Export::start_tcp) else {
        return;
    };
    write(&img, 0x41, 7 << 20, 256 << 10);
    write(&img, 0x42, 50 << 20, 64 << 10);
    let e = Export::start_tcp(&img, "b0", t.path());
    let map = Command::new("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:b0", "--json", &e.uri])
        .output();
    let Ok(map) = map.map_err(|e| {
        skip(&format!(
            "nbdinfo list: nbdinfo not installed ({e}; apt-get install libnbd-bin)"
        ))
    }) else {
        return;
    };
    assert!(
        map.status.success(),
        "{}",
        String::from_utf8_lossy(&map.stderr)
    );
    let list = t.path().join("map.json");
    std::fs::write(&list, &map.stdout).unwrap();
    let b = json(&[
        "backup",
        "--vault",
        s(&vault),
        "--changed-blocks",
        s(&list),
        &e.uri,
    ]);
    drop(e);
    let cbt = &b["job"]["stats"]["cbt"];
    assert_eq!(cbt["source"], "list", "{b}");
    assert_eq!(cbt["used"], true, "{b}");
    assert_eq!(cbt["dirty_bytes"], (256 << 10) + (64 << 10), "{cbt}");
    restores_like_convert(&vault, t.path(), &img);
}

/// qemu-nbd processes serving `img`.
fn servers_of(img: &Path) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let c = String::from_utf8_lossy(c);
            c.starts_with("qemu-nbd") && c.contains(img.to_str().unwrap())
        })
        .count()
}

#[test]
fn a_qcow2_file_is_an_item_through_coffres_own_qemu_nbd() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = prepared(t.path());
    let backup_file = || json(&["backup", "--vault", s(&vault), "--bitmap", "b0", s(&img)]);
    let b1 = backup_file();
    assert_eq!(b1["item"], "vm", "the file stem is the item: {b1}");
    assert_eq!(b1["job"]["status"], "Completed", "{b1}");
    restores_like_convert(&vault, t.path(), &img);
    write(&img, 0x51, 9 << 20, 192 << 10);
    let b2 = backup_file();
    let cbt = &b2["job"]["stats"]["cbt"];
    assert_eq!(cbt["used"], true, "{b2}");
    assert_eq!(cbt["dirty_bytes"], 192 << 10, "{cbt}");
    // Our own qemu-nbd's image lock is not "in use": no warning.
    assert_eq!(b2["job"]["status"], "Completed", "{b2}");
    restores_like_convert(&vault, t.path(), &img);
    assert_eq!(servers_of(&img), 0, "coffre left its qemu-nbd running");
    // A qcow2 a running VM holds (here: another qemu-nbd writing it) is
    // refused, with the way to back it up live.
    let sock = t.path().join("holder.sock");
    let holder = Export::spawn(&["-k", s(&sock)], &img, || sock.exists(), String::new());
    let err = fails(&["backup", "--vault", s(&vault), s(&img)], 1);
    drop(holder);
    assert!(err.contains("backup-begin"), "{err}");
}

#[test]
fn an_export_that_dies_mid_backup_fails_the_job_cleanly_and_the_next_backup_works() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = prepared(t.path());
    let mut e = Export::start(&img, "b0", t.path());
    // Slowed, so the server can die mid-way: the pass fetches its windows
    // on a thread of its own, whose error must end the job (not hang it,
    // not commit a point).
    let child = slow_backup(&vault, &e.uri);
    std::thread::sleep(Duration::from_millis(1200));
    let _ = e.child.kill();
    let _ = e.child.wait();
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the backup hung after its export died"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a backup of a dead export succeeded");
    assert!(err.contains("NBD export"), "{err}");
    assert!(vault_points(&vault, "vm").is_empty());
    // A new export: the next backup runs to its end and restores exactly.
    let e = Export::start(&img, "b0", t.path());
    let b = backup(&vault, &e.uri, &[]);
    assert_eq!(b["job"]["status"], "Completed", "{b}");
    drop(e);
    restores_like_convert(&vault, t.path(), &img);
}

#[test]
fn a_qcow2_header_naming_another_file_is_refused_never_opened() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    // A secret beside the image, and a qcow2 overlay whose backing file
    // it is: a backup would read the secret into the point.
    let secret = t.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    let overlay = t.path().join("overlay.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&secret),
            "-F",
            "raw",
            s(&overlay),
        ],
    );
    let err = fails(&["backup", "--vault", s(&vault), s(&overlay)], 1);
    assert!(err.contains("backing file"), "{err}");
    // A raw disk whose guest wrote such a header into its first sector:
    // it is refused too, before any qemu-nbd runs.
    let guest = t.path().join("guest.img");
    let mut disk = std::fs::read(&overlay).unwrap();
    disk.resize(4 << 20, 0);
    std::fs::write(&guest, &disk).unwrap();
    let err = fails(&["backup", "--vault", s(&vault), s(&guest)], 1);
    assert!(err.contains("backing file"), "{err}");
    assert_eq!(servers_of(&guest), 0);
    // A self-contained qcow2 still backs up.
    let plain = t.path().join("plain.qcow2");
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&plain), "4M"],
    );
    let b = json(&["backup", "--vault", s(&vault), s(&plain)]);
    assert_eq!(b["job"]["status"], "Completed", "{b}");
}
