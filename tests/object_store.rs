//! A vault in object storage, shared by several hosts, against a real
//! Azurite (Microsoft's Azure Storage emulator), and one test against
//! moto's S3 server, each started by the test on a free port in a
//! temporary directory and stopped afterwards. Each "host" is a separate
//! cache directory; nothing of the HTTP layer is mocked. Without the
//! emulators (`make azurite` installs them, with npm and pip) the tests
//! say SKIP and pass.

use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Azurite's well-known development account.
pub(crate) const ACCOUNT: &str = "devstoreaccount1";
pub(crate) const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running storage emulator (Azurite, or moto's S3 server), stopped on
/// drop, with the environment variables that point coffre at it.
pub struct Emulator {
    child: Child,
    pub endpoint: String,
    env: Vec<(&'static str, String)>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_for_port(port: u16, what: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < until,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn npm_root() -> Option<PathBuf> {
    let out = Command::new("npm").args(["root", "-g"]).output().ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn azurite_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("azurite-blob"))
            .find(|c| c.is_file())
    });
    on_path.or_else(|| {
        let c = npm_root()?.join("azurite/dist/src/blob/main.js");
        c.is_file().then_some(c)
    })
}

impl Emulator {
    /// Starts Azurite with `containers`; `None` (having said SKIP) when
    /// Azurite or its client library is not installed.
    pub fn azurite(containers: &[&str]) -> Option<Emulator> {
        let Some(bin) = azurite_bin() else {
            skip(
                "object store: azurite-blob not installed (make azurite, or npm install -g azurite @azure/storage-blob)",
            );
            return None;
        };
        let Some(root) = npm_root().filter(|r| r.join("@azure/storage-blob").is_dir()) else {
            skip(
                "object store: @azure/storage-blob not installed (npm install -g @azure/storage-blob)",
            );
            return None;
        };
        let port = free_port();
        let dir = tempfile::tempdir().expect("azurite dir");
        let mut cmd = if bin.extension().is_some_and(|e| e == "js") {
            let mut c = Command::new("node");
            c.arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let child = cmd
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path())
            .args(["--silent", "--skipApiVersionCheck", "--disableTelemetry"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite-blob");
        let endpoint = format!("http://127.0.0.1:{port}");
        let az = Emulator {
            child,
            env: vec![
                ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
                ("AZURITE_BLOB_STORAGE_URL", endpoint.clone()),
            ],
            endpoint,
            _dir: dir,
        };
        wait_for_port(port, "azurite");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/azure-container.js");
        let made = Command::new("node")
            .env("NODE_PATH", &root)
            .arg(script)
            .args([az.endpoint.as_str(), ACCOUNT, KEY])
            .args(containers)
            .output()
            .expect("run node");
        assert!(
            made.status.success(),
            "creating containers failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        Some(az)
    }

    /// moto's S3 server with `buckets`; `None` (having said SKIP) when
    /// moto is not installed.
    pub fn moto(buckets: &[&str]) -> Option<Emulator> {
        if Command::new("moto_server").arg("--help").output().is_err() {
            skip("S3: moto_server not installed (pip install 'moto[server]')");
            return None;
        }
        let port = free_port();
        let dir = tempfile::tempdir().expect("moto dir");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let m = Emulator {
            child,
            env: vec![
                ("AWS_ENDPOINT", endpoint.clone()),
                ("AWS_ALLOW_HTTP", "true".into()),
                ("AWS_ACCESS_KEY_ID", "test".into()),
                ("AWS_SECRET_ACCESS_KEY", "test".into()),
                ("AWS_REGION", "us-east-1".into()),
            ],
            endpoint,
            _dir: dir,
        };
        wait_for_port(port, "moto_server");
        let made = Command::new("python3")
            .args(["-c", "import boto3, sys; s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1'); [s3.create_bucket(Bucket=b) for b in sys.argv[2:]]"])
            .arg(&m.endpoint)
            .args(buckets)
            .output()
            .expect("run python3");
        assert!(
            made.status.success(),
            "creating buckets failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        Some(m)
    }

    /// `coffre` talking to this emulator (the usual environment variables).
    pub fn coffre(&self) -> Command {
        let mut c = coffre();
        c.env_remove("AZURE_STORAGE_ACCOUNT_KEY");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.coffre().args(args).output().expect("run coffre")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        succeeded(args, self.run(args))
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("JSON")
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn url(container: &str, prefix: &str) -> String {
    format!("azure://{ACCOUNT}/{container}/{prefix}")
}

/// Waits until `vault show` on `cache` lists a running writer's lease.
/// Starts `cmd` (an `Emulator::coffre` command) as a backup of `img` into
/// `item` on the host whose cache is `cache`, throttled to `rate`, and
/// returns once it is in its transfer and `observer` (another host's
/// cache) sees its lease.
#[expect(clippy::too_many_arguments, reason = "one slow backup, spelled out")]
fn start_slow_backup(
    az: &Emulator,
    mut cmd: Command,
    cache: &Path,
    item: &str,
    rate: &str,
    img: &Path,
    stderr: Stdio,
    observer: &Path,
) -> Child {
    let child = cmd
        .args([
            "backup",
            "--vault",
            s(cache),
            "--item",
            item,
            "--rate-limit",
            rate,
            s(img),
        ])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    wait_for_transfer(az, cache, item);
    wait_for_lease(az, observer);
    child
}

/// Deletes `item`'s data from the host whose cache is `owner`, then prunes
/// from `pruner` as if 30 days had passed (the soft-delete retention).
fn delete_and_prune(em: &Emulator, owner: &Path, item: &str, pruner: &Path) {
    em.ok(&[
        "unprotect",
        "--vault",
        s(owner),
        "--item",
        item,
        "--delete-data",
    ]);
    let later = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(30 * 86400)).to_string();
    let pruned = em
        .coffre()
        .env("COFFRE_NOW", &later)
        .args(["prune", "--vault", s(pruner)])
        .output()
        .unwrap();
    assert!(pruned.status.success());
}

/// Waits until the backup of `item` on the host whose cache is `cache` is
/// in its transfer, so that the lease a test then sees is the transfer's
/// (not the short one of the commit that registers a new item).
fn wait_for_transfer(az: &Emulator, cache: &Path, item: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = az.json(&["jobs", "--vault", s(cache)]);
        let transferring = jobs.as_array().is_some_and(|j| {
            j.iter()
                .any(|j| j["item"] == item && j["phases"][1]["status"] == "InProgress")
        });
        if transferring {
            return;
        }
        assert!(Instant::now() < until, "the transfer never started: {jobs}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_lease(az: &Emulator, cache: &Path) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let show = az.json(&["vault", "show", "--vault", s(cache)]);
        if show["leases"].as_array().is_some_and(|l| !l.is_empty()) {
            return;
        }
        assert!(
            Instant::now() < until,
            "no writer ever took a lease: {show}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates the vault at `store` from the host whose cache is `cache`.
fn create_in_store(az: &Emulator, store: &str, cache: &Path, area: &Path) {
    az.ok(&[
        "vault",
        "create",
        "--store",
        store,
        "--encryption",
        "none",
        "--vault",
        s(cache),
        "--snapshot-area",
        s(area),
    ]);
}

/// Backs `img` up as `item` from the host whose cache is `cache`.
fn backup(az: &Emulator, cache: &Path, item: &str, img: &Path) -> serde_json::Value {
    az.json(&["backup", "--vault", s(cache), "--item", item, s(img)])
}

/// Restores the `n`-th point (1 = oldest) of `item` and compares it.
fn restore_same(az: &Emulator, cache: &Path, item: &str, n: usize, want: &Path) {
    let pts = az.json(&["points", "--vault", s(cache), "--item", item]);
    let ids: Vec<&str> = pts
        .as_array()
        .expect("points")
        .iter()
        .filter(|p| p["tier"].as_str().is_some_and(|t| t.contains("Vault")))
        .filter_map(|p| p["id"].as_str())
        .collect();
    let point = *ids
        .get(n - 1)
        .unwrap_or_else(|| panic!("no point {n} of {item}: {pts}"));
    let to = cache.with_extension(format!("{item}-{n}.restored"));
    let _ = std::fs::remove_file(&to);
    // From the store, never from a snapshot this machine still has.
    let mut args = restore_args(cache, item, Some(point), &to, false);
    args.extend(["--from", "vault"]);
    az.ok(&args);
    assert_same(want, &to);
    let _ = std::fs::remove_file(&to);
}

#[test]
fn a_fresh_host_opens_the_vault_from_its_url_and_restores_every_point() {
    let Some(az) = Emulator::azurite(&["vaults"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("vaults", "v1");
    let h1 = t.path().join("host1");
    create_in_store(&az, &store, &h1, &t.path().join("area"));
    // The cache holds no segment and no catalog file: the vault is in the store.
    assert!(
        !h1.join("segments").exists()
            || std::fs::read_dir(h1.join("segments"))
                .unwrap()
                .next()
                .is_none()
    );
    let img = t.path().join("disk.img");
    mixed_image(&img, 24 << 20, 11);
    let day1 = t.path().join("day1.img");
    std::fs::copy(&img, &day1).unwrap();
    backup(&az, &h1, "vm", &img);
    churn(&img, 20, 100 << 10, 12);
    let second = backup(&az, &h1, "vm", &img);
    assert!(
        second["stored_bytes"].as_u64().unwrap() < 8 << 20,
        "{second}"
    );

    // A fresh host with an empty cache and only the URL.
    let h2 = t.path().join("host2");
    let attached = az.json(&["vault", "attach", "--store", &store, "--vault", s(&h2)]);
    assert_eq!(attached["points"].as_u64(), Some(2), "{attached}");
    assert_eq!(attached["store"].as_str(), Some(store.as_str()));
    // Version 4: a build without object storage refuses the cache.
    assert_eq!(attached["format_version"].as_u64(), Some(4), "{attached}");
    restore_same(&az, &h2, "vm", 1, &day1);
    restore_same(&az, &h2, "vm", 2, &img);
    let v = az.json(&["verify", "--vault", s(&h2), "--read-data"]);
    assert_eq!(v["findings"].as_array().map(Vec::len), Some(0), "{v}");

    // Attaching again to a used cache, or creating over a vault, is refused.
    let again = az.run(&["vault", "attach", "--store", &store, "--vault", s(&h2)]);
    assert!(!again.status.success());
    let over = az.run(&[
        "vault",
        "create",
        "--store",
        &store,
        "--encryption",
        "none",
        "--vault",
        s(&t.path().join("h3")),
    ]);
    assert!(!over.status.success());
    assert!(String::from_utf8_lossy(&over.stderr).contains("already holds a vault"));
    // A URL with nothing there, and a URL that is no store URL.
    let empty = az.run(&[
        "vault",
        "attach",
        "--store",
        &url("vaults", "nothing"),
        "--vault",
        s(&t.path().join("h4")),
    ]);
    assert_eq!(empty.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&empty.stderr).contains("holds no coffre vault"),
        "{}",
        String::from_utf8_lossy(&empty.stderr)
    );
    let bad = az.run(&[
        "vault",
        "create",
        "--store",
        "ftp://host/x",
        "--encryption",
        "none",
        "--vault",
        s(&t.path().join("h5")),
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unknown scheme"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn an_image_a_second_host_backs_up_again_adds_almost_nothing() {
    let Some(az) = Emulator::azurite(&["dedup"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("dedup", "shared");
    let (h1, h2) = (t.path().join("h1"), t.path().join("h2"));
    create_in_store(&az, &store, &h1, &t.path().join("a1"));
    az.ok(&["vault", "attach", "--store", &store, "--vault", s(&h2)]);
    let img = t.path().join("golden.img");
    mixed_image(&img, 32 << 20, 21);
    let first = backup(&az, &h1, "web-1", &img);
    let stored = first["stored_bytes"].as_u64().unwrap();
    assert!(stored > 4 << 20, "{first}");
    // The same golden image on another hypervisor: h2 learns of h1's
    // chunks when it opens the vault, and stores (almost) nothing.
    let copy = t.path().join("golden-copy.img");
    std::fs::copy(&img, &copy).unwrap();
    let second = backup(&az, &h2, "web-2", &copy);
    let added = second["stored_bytes"].as_u64().unwrap();
    assert!(
        added * 100 < stored,
        "host 2 added {added} bytes of {stored}: {second}"
    );
    restore_same(&az, &h1, "web-2", 1, &img);
}

#[test]
fn four_hosts_back_up_into_one_vault_at_once() {
    let Some(az) = Emulator::azurite(&["fleet"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("fleet", "v");
    let hosts: Vec<PathBuf> = (0..4).map(|i| t.path().join(format!("host{i}"))).collect();
    create_in_store(&az, &store, &hosts[0], &t.path().join("area"));
    for h in &hosts[1..] {
        az.ok(&["vault", "attach", "--store", &store, "--vault", s(h)]);
    }
    let imgs: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = t.path().join(format!("vm{i}.img"));
            mixed_image(&p, 16 << 20, 100 + i);
            p
        })
        .collect();
    // All four at once, each from its own cache.
    let children: Vec<Child> = hosts
        .iter()
        .zip(&imgs)
        .enumerate()
        .map(|(i, (h, img))| {
            az.coffre()
                .args([
                    "backup",
                    "--vault",
                    s(h),
                    "--item",
                    &format!("vm{i}"),
                    s(img),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a concurrent backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Host tags keep their segments apart.
    let tags: std::collections::HashSet<u64> = hosts
        .iter()
        .map(|h| {
            az.json(&["vault", "show", "--vault", s(h)])["host_tag"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(tags.len(), 4);
    // A fifth, fresh host sees all four points and restores each.
    let h5 = t.path().join("host5");
    let attached = az.json(&["vault", "attach", "--store", &store, "--vault", s(&h5)]);
    assert_eq!(attached["points"].as_u64(), Some(4), "{attached}");
    for (i, img) in imgs.iter().enumerate() {
        restore_same(&az, &h5, &format!("vm{i}"), 1, img);
    }
    let v = az.json(&["verify", "--vault", s(&h5), "--read-data"]);
    assert_eq!(v["findings"].as_array().map(Vec::len), Some(0), "{v}");
    // Job records live in the store too: a host lists every host's jobs.
    let jobs = az.json(&["jobs", "--vault", s(&h5)]);
    let backups = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["operation"] == "backup" && j["status"] == "Completed")
        .count();
    assert_eq!(backups, 4, "{jobs}");
}

#[test]
fn gc_gives_a_deleted_items_space_back_in_two_runs_and_runs_one_at_a_time() {
    let Some(az) = Emulator::azurite(&["gcvault"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("gcvault", "v");
    let (h1, h2) = (t.path().join("h1"), t.path().join("h2"));
    create_in_store(&az, &store, &h1, &t.path().join("a"));
    az.ok(&["vault", "attach", "--store", &store, "--vault", s(&h2)]);
    let (keep, drop) = (t.path().join("keep.img"), t.path().join("drop.img"));
    mixed_image(&keep, 8 << 20, 5);
    random_file(&drop, 8 << 20, 6);
    backup(&az, &h1, "keep", &keep);
    backup(&az, &h2, "drop", &drop);
    delete_and_prune(&az, &h1, "drop", &h1);
    // The first run only condemns; the second deletes what is still dead.
    let first = az.json(&["gc", "--vault", s(&h1)]);
    assert_eq!(first["deleted_segments"].as_u64(), Some(0), "{first}");
    assert!(
        first["condemned_segments"].as_u64().unwrap() >= 1,
        "{first}"
    );
    let second = az.json(&["gc", "--vault", s(&h2)]);
    assert!(
        second["deleted_bytes"].as_u64().unwrap() >= 8 << 20,
        "{second}"
    );
    let show = az.json(&["vault", "show", "--vault", s(&h1)]);
    assert!(show["stored_bytes"].as_u64().unwrap() < 8 << 20, "{show}");
    assert_eq!(show["gc_state"]["epoch"].as_u64(), Some(2), "{show}");
    restore_same(&az, &h1, "keep", 1, &keep);
    assert_clean(
        &az.json(&["verify", "--vault", s(&h2), "--read-data"]),
        "after gc",
    );

    // While one GC waits for a running writer, a second GC is refused.
    let slow = t.path().join("slow.img");
    random_file(&slow, 24 << 20, 8);
    let mut writer = start_slow_backup(
        &az,
        az.coffre(),
        &h1,
        "slow",
        "8M",
        &slow,
        Stdio::null(),
        &h2,
    );
    let waiting = az
        .coffre()
        .args(["--output", "json", "gc", "--vault", s(&h2)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while az.json(&["vault", "show", "--vault", s(&h1)])["gc_state"]["marking"].is_null() {
        assert!(Instant::now() < until, "the first GC never took gc/state");
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = az.run(&["gc", "--vault", s(&h1)]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("another GC"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(writer.wait().unwrap().success());
    let out = waiting.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["waited_for"].as_u64(), Some(1), "{report}");
    restore_same(&az, &h2, "slow", 1, &slow);
}

/// A verify report without errors: unreferenced chunks (garbage a later
/// GC takes) are the only warning a shared vault may show.
fn assert_clean(v: &serde_json::Value, what: &str) {
    for f in v["findings"].as_array().expect("findings") {
        assert!(
            f["severity"] == "warning" && f["code"] == "unreferenced",
            "{what}: {f}"
        );
    }
    assert_eq!(
        v["unrecoverable"].as_array().map(Vec::len),
        Some(0),
        "{what}: {v}"
    );
    assert_eq!(v["detected"].as_u64(), Some(0), "{what}: {v}");
}

/// Points expire an hour after they are taken: a prune run "later" (its
/// clock two hours ahead) deletes every point but each item's last.
fn soon() -> String {
    (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600)).to_string()
}

#[test]
fn four_writers_and_gc_at_once_never_lose_a_live_chunk() {
    let Some(az) = Emulator::azurite(&["gcrace"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("gcrace", "v");
    let gc_host = t.path().join("gc-host");
    create_in_store(&az, &store, &gc_host, &t.path().join("area"));
    let hosts: Vec<PathBuf> = (0..4).map(|i| t.path().join(format!("host{i}"))).collect();
    for h in &hosts {
        az.ok(&["vault", "attach", "--store", &store, "--vault", s(h)]);
    }
    // Each host's disk flips between two states, A on even runs and B on
    // odd ones (with a little churn of its own each time). Once B is
    // backed up, prune deletes A's point, so GC condemns A's chunks; the
    // next run brings A back while GC runs: the writer must not reuse a
    // chunk GC is about to delete. A golden image shared by all hosts
    // adds chunks that several hosts' points hold.
    let golden = t.path().join("golden.img");
    mixed_image(&golden, 2 << 20, 7);
    let variants: Vec<[PathBuf; 2]> = (0..4u64)
        .map(|i| {
            [0u64, 1].map(|v| {
                let p = t.path().join(format!("vm{i}-{v}.img"));
                mixed_image(&p, 8 << 20, 1000 + i * 2 + v);
                let g = std::fs::read(&golden).unwrap();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .write_all_at(&g, 0)
                    .unwrap();
                p
            })
        })
        .collect();
    let imgs: Vec<PathBuf> = (0..4)
        .map(|i| t.path().join(format!("vm{i}.img")))
        .collect();
    // Every point ever acknowledged, with a copy of what it must restore to.
    let mut expected: Vec<(String, String, PathBuf)> = Vec::new();
    let later = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(7200)).to_string();
    let runs: u64 = 20;
    let mut deleted_segments = 0;
    for seed in 0..runs {
        let mut rng = Rng::new(seed);
        for (i, img) in imgs.iter().enumerate() {
            std::fs::copy(&variants[i][(seed % 2) as usize], img).unwrap();
            churn(img, rng.below(3) as usize, 64 << 10, seed * 10 + i as u64);
        }
        let snaps: Vec<PathBuf> = imgs
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let c = t.path().join(format!("expect-{seed}-{i}.img"));
                std::fs::copy(img, &c).unwrap();
                c
            })
            .collect();
        let until = soon();
        let mut rng2 = Rng::new(seed + 1000);
        let writers: Vec<Child> = hosts
            .iter()
            .zip(&imgs)
            .enumerate()
            .map(|(i, (h, img))| {
                let rng = &mut rng2;
                az.coffre()
                    .args([
                        "--output",
                        "json",
                        "backup",
                        "--vault",
                        s(h),
                        "--item",
                        &format!("vm{i}"),
                    ])
                    // Slow enough to span several GC runs.
                    .args(["--rate-limit", &format!("{}M", 12 + rng.below(24))])
                    .args(["--retain-until", &until, s(img)])
                    // Files, not pipes: nobody reads them until the writer ends.
                    .stdout(std::fs::File::create(t.path().join(format!("w{i}.out"))).unwrap())
                    .stderr(std::fs::File::create(t.path().join(format!("w{i}.err"))).unwrap())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // Meanwhile, from a fifth host: prune (deleting the points the
        // writers are deduplicating against), then GC after GC until every
        // writer is done.
        std::thread::sleep(Duration::from_millis(rng.below(100)));
        let pruned = az
            .coffre()
            .env("COFFRE_NOW", &later)
            .args(["prune", "--vault", s(&gc_host)])
            .output()
            .unwrap();
        assert!(
            pruned.status.success(),
            "prune: {}",
            String::from_utf8_lossy(&pruned.stderr)
        );
        let mut writers = writers;
        let mut gcs = 0;
        loop {
            let gc = az.json(&["gc", "--vault", s(&gc_host)]);
            deleted_segments += gc["deleted_segments"].as_u64().unwrap();
            gcs += 1;
            if gcs >= 2
                && writers
                    .iter_mut()
                    .all(|w| matches!(w.try_wait(), Ok(Some(_))))
            {
                break;
            }
        }
        for (i, mut w) in writers.into_iter().enumerate() {
            let status = w.wait().unwrap();
            let err = std::fs::read_to_string(t.path().join(format!("w{i}.err"))).unwrap();
            assert!(status.success(), "seed {seed}: writer {i}: {err}");
            let out = std::fs::read(t.path().join(format!("w{i}.out"))).unwrap();
            let done: serde_json::Value = serde_json::from_slice(&out).unwrap();
            expected.push((
                format!("vm{i}"),
                done["id"].as_str().unwrap().to_string(),
                snaps[i].clone(),
            ));
        }
        // Every point still in the vault restores byte-identical, read
        // from the store by a host that did not write it.
        let reader = &hosts[(seed % 4) as usize];
        for i in 0..4 {
            let item = format!("vm{i}");
            let pts = az.json(&["points", "--vault", s(reader), "--item", &item]);
            let live: Vec<&str> = pts
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["tier"].as_str().is_some_and(|t| t.contains("Vault")))
                .filter_map(|p| p["id"].as_str())
                .collect();
            assert!(
                !live.is_empty(),
                "seed {seed}: item {item} lost every point"
            );
            for id in live {
                let (_, _, want) = expected
                    .iter()
                    .find(|(it, pid, _)| *it == item && pid == id)
                    .unwrap_or_else(|| panic!("seed {seed}: unknown point {id}"));
                let to = t.path().join("restored.img");
                let _ = std::fs::remove_file(&to);
                let mut args = restore_args(reader, &item, Some(id), &to, false);
                args.extend(["--from", "vault"]);
                az.ok(&args);
                assert_same(want, &to);
            }
        }
        let v = az.json(&["verify", "--vault", s(reader), "--read-data"]);
        assert_clean(&v, &format!("seed {seed}"));
    }
    // GC did reclaim space while all this ran (not a GC that never acts).
    assert!(
        deleted_segments > 0,
        "no segment was ever deleted in {runs} runs"
    );
    eprintln!(
        "{runs} seeded runs: 4 writers, prune and 2 GC runs each; {deleted_segments} segments deleted; every point restored identically"
    );
}

#[test]
fn a_writer_that_dies_holding_a_lease_blocks_gc_only_until_the_lease_expires() {
    let Some(az) = Emulator::azurite(&["leases"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("leases", "v");
    let (h1, h2) = (t.path().join("h1"), t.path().join("h2"));
    create_in_store(&az, &store, &h1, &t.path().join("area"));
    az.ok(&["vault", "attach", "--store", &store, "--vault", s(&h2)]);
    let img = t.path().join("big.img");
    random_file(&img, 64 << 20, 3);
    // A slow backup on h1 with a 3-second lease, killed once its lease is
    // in the store.
    let mut short_lease = az.coffre();
    short_lease.env("COFFRE_LEASE_TTL", "3");
    let mut writer =
        start_slow_backup(&az, short_lease, &h1, "big", "8M", &img, Stdio::null(), &h2);
    // Let it upload a few parts (8 MiB each, at 8 MiB/s) that no manifest
    // will name, then SIGKILL: no chance to end the lease.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the writer finished too soon"
    );
    writer.kill().unwrap();
    writer.wait().unwrap();
    let started = Instant::now();
    let gc = az.json(&["gc", "--vault", s(&h2)]);
    assert_eq!(gc["expired_leases"].as_u64(), Some(1), "{gc}");
    assert!(
        gc["condemned_segments"].as_u64().unwrap() >= 1,
        "the dead session's upload: {gc}"
    );
    // It found the lease live, waited, and went on once it expired.
    assert_eq!(gc["waited_for"].as_u64(), Some(1), "{gc}");
    assert!(started.elapsed() < Duration::from_secs(30), "{gc}");
    // The same host backs up again: the dead session's segment (condemned,
    // not yet deleted) keeps its id, since nothing uploaded is ever cut,
    // so the new session takes the next.
    let small = t.path().join("small.img");
    mixed_image(&small, 4 << 20, 9);
    backup(&az, &h1, "small", &small);
    // The dead session's uploads are deleted by the next run; the vault
    // stays clean.
    let gc2 = az.json(&["gc", "--vault", s(&h2)]);
    assert!(
        gc2["deleted_segments"].as_u64().unwrap() >= 1,
        "{gc} then {gc2}"
    );
    let show = az.json(&["vault", "show", "--vault", s(&h2)]);
    assert_eq!(show["leases"].as_array().map(Vec::len), Some(0), "{show}");
    restore_same(&az, &h2, "small", 1, &small);
    let v = az.json(&["verify", "--vault", s(&h2), "--read-data"]);
    assert_eq!(v["findings"].as_array().map(Vec::len), Some(0), "{v}");
}

#[test]
fn a_grs_secondary_in_a_blob_container_restores_with_the_primary_gone() {
    let Some(az) = Emulator::azurite(&["secondary"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let sec = url("secondary", "vault-a");
    let primary = t.path().join("primary");
    az.ok(&[
        "vault",
        "create",
        "--vault",
        s(&primary),
        "--secondary",
        &sec,
        "--encryption",
        "none",
        "--snapshot-area",
        s(&t.path().join("area")),
    ]);
    let img = t.path().join("disk.img");
    mixed_image(&img, 16 << 20, 31);
    let day1 = t.path().join("day1.img");
    std::fs::copy(&img, &day1).unwrap();
    backup(&az, &primary, "disk", &img);
    az.ok(&["replicate", "--vault", s(&primary)]);
    churn(&img, 10, 64 << 10, 32);
    backup(&az, &primary, "disk", &img);
    // Asynchronous: the second day is not on the secondary until replicated.
    let show = az.json(&["vault", "show", "--vault", s(&primary)]);
    assert_eq!(
        show["secondary"]["points_behind"].as_u64(),
        Some(1),
        "{show}"
    );
    let r = az.json(&["replicate", "--vault", s(&primary)]);
    assert_eq!(r["points_replicated"].as_u64(), Some(1), "{r}");
    let show = az.json(&["vault", "show", "--vault", s(&primary)]);
    assert_eq!(
        show["secondary"]["points_behind"].as_u64(),
        Some(0),
        "{show}"
    );

    // The primary is gone: only the container's URL is left.
    std::fs::rename(&primary, t.path().join("primary.gone")).unwrap();
    let cache_root = t.path().join("xdg");
    let from_secondary = |args: &[&str]| {
        let out = az
            .coffre()
            .env("COFFRE_SECONDARY", &sec)
            .env("XDG_CACHE_HOME", &cache_root)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let pts: serde_json::Value = serde_json::from_str(&from_secondary(&[
        "--output",
        "json",
        "points",
        "--vault",
        s(&primary),
        "--item",
        "disk",
        "--from",
        "secondary",
    ]))
    .unwrap();
    let ids: Vec<&str> = pts
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 2, "{pts}");
    for (id, want) in ids.iter().zip([&day1, &img]) {
        let to = t.path().join(format!("{id}.restored"));
        from_secondary(&[
            "restore",
            "--vault",
            s(&primary),
            "--from",
            "secondary",
            "--item",
            "disk",
            "--point",
            id,
            "--to",
            s(&to),
        ]);
        assert_same(want, &to);
    }
    // The secondary's cache reads the copy and never writes it.
    let cache = std::fs::read_dir(cache_root.join("coffre/secondary"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let refused = az.run(&["backup", "--vault", s(&cache), "--item", "other", s(&img)]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("secondary"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn s3_a_vault_in_a_bucket_serves_two_hosts_and_collects_garbage() {
    let Some(m) = Emulator::moto(&["vaults"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = "s3://vaults/fleet";
    let (h1, h2) = (t.path().join("h1"), t.path().join("h2"));
    create_in_store(&m, store, &h1, &t.path().join("a"));
    m.ok(&["vault", "attach", "--store", store, "--vault", s(&h2)]);
    let (keep, drop) = (t.path().join("keep.img"), t.path().join("drop.img"));
    mixed_image(&keep, 8 << 20, 41);
    random_file(&drop, 4 << 20, 42);
    backup(&m, &h1, "keep", &keep);
    let copy = t.path().join("keep-copy.img");
    std::fs::copy(&keep, &copy).unwrap();
    let again = backup(&m, &h2, "keep-2", &copy);
    assert!(
        again["stored_bytes"].as_u64().unwrap() < 64 << 10,
        "{again}"
    );
    backup(&m, &h2, "drop", &drop);
    delete_and_prune(&m, &h2, "drop", &h1);
    m.ok(&["gc", "--vault", s(&h1)]);
    let second = m.json(&["gc", "--vault", s(&h2)]);
    assert!(
        second["deleted_bytes"].as_u64().unwrap() >= 4 << 20,
        "{second}"
    );
    let h3 = t.path().join("h3");
    m.ok(&["vault", "attach", "--store", store, "--vault", s(&h3)]);
    restore_same(&m, &h3, "keep", 1, &keep);
    restore_same(&m, &h3, "keep-2", 1, &keep);
    assert_clean(&m.json(&["verify", "--vault", s(&h3), "--read-data"]), "s3");
}

#[test]
fn two_hosts_backing_up_one_item_at_once_never_overwrite_each_other() {
    let Some(az) = Emulator::azurite(&["sameitem"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("sameitem", "v");
    let (h1, h2) = (t.path().join("h1"), t.path().join("h2"));
    create_in_store(&az, &store, &h1, &t.path().join("area"));
    az.ok(&["vault", "attach", "--store", &store, "--vault", s(&h2)]);
    // The same VM's disk, seen from two hypervisors (a migration).
    let (a, b) = (t.path().join("on-h1.img"), t.path().join("on-h2.img"));
    mixed_image(&a, 16 << 20, 51);
    std::fs::copy(&a, &b).unwrap();
    churn(&b, 8, 64 << 10, 52);
    // h2 starts first but slowly; h1 commits the item while h2 transfers.
    let slow = start_slow_backup(&az, az.coffre(), &h2, "vm", "2M", &b, Stdio::piped(), &h1);
    backup(&az, &h1, "vm", &a);
    let out = slow.wait_with_output().unwrap();
    // h2 must not overwrite h1's commit of the item: it is refused (exit 4)…
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (the item file is replaced only if unchanged, before the point's
    // manifest is created)
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another host changed it meanwhile"), "{err}");
    // …and succeeds when run again, on top of h1's point.
    backup(&az, &h2, "vm", &b);
    let h3 = t.path().join("h3");
    az.ok(&["vault", "attach", "--store", &store, "--vault", s(&h3)]);
    restore_same(&az, &h3, "vm", 1, &a);
    restore_same(&az, &h3, "vm", 2, &b);
    assert_clean(
        &az.json(&["verify", "--vault", s(&h3), "--read-data"]),
        "same item",
    );
}

/// The error line of a failed `coffre` run: exactly one line, with no XML.
fn one_clear_line(out: &Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: not one line:\n{err}");
    assert!(
        !err.contains('<') && !err.contains("RequestId"),
        "{what}: the service's raw answer leaked:\n{err}"
    );
    err
}

#[test]
fn create_on_a_missing_container_fails_in_one_line_saying_how_to_create_it() {
    let Some(az) = Emulator::azurite(&["present"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    // Encrypted by default in a store: the key is given, so the one line
    // is about the container.
    let key = t.path().join("key");
    random_file(&key, 32, 9);
    let store = url("absent", "v");
    let h = t.path().join("h");
    let out = az.run(&[
        "vault",
        "create",
        "--store",
        &store,
        "--key-file",
        s(&key),
        "--vault",
        s(&h),
        "--snapshot-area",
        s(&t.path().join("a")),
    ]);
    let err = one_clear_line(&out, "create in a missing container");
    assert!(err.contains("\"absent\" does not exist"), "{err}");
    assert!(
        err.contains("az storage container create --account-name devstoreaccount1 --name absent"),
        "{err}"
    );
    let out = az.run(&["vault", "attach", "--store", &store, "--vault", s(&h)]);
    let err = one_clear_line(&out, "attach to a missing container");
    assert!(err.contains("\"absent\" does not exist"), "{err}");
    // Credentials the service refuses: its answer in one short line.
    let out = az
        .coffre()
        .env(
            "AZURE_STORAGE_ACCOUNT_KEY",
            "d3JvbmdrZXl3cm9uZ2tleXdyb25na2V5d3Jvbmdr",
        )
        .args(["vault", "create", "--store", &url("present", "v")])
        .args(["--key-file", s(&key)])
        .args(["--vault", s(&t.path().join("h2"))])
        .args(["--snapshot-area", s(&t.path().join("a2"))])
        .output()
        .unwrap();
    let err = one_clear_line(&out, "create with a wrong key");
    assert!(err.contains("403"), "{err}");
    // The container that exists works.
    create_in_store(&az, &url("present", "v"), &h, &t.path().join("a"));
}

/// Runs boto3 against moto: `code` sees `s3` (a client) and `argv`.
fn boto3(m: &Emulator, code: &str, args: &[&str]) -> String {
    let prelude = "import boto3, sys\ns3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\nargv = sys.argv[2:]\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("{prelude}{code}"))
        .arg(&m.endpoint)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s3_put(m: &Emulator, key: &str, body: &str) {
    boto3(
        m,
        "s3.put_object(Bucket='vaults', Key=argv[0], Body=argv[1].encode())",
        &[key, body],
    );
}

fn s3_delete(m: &Emulator, key: &str) {
    boto3(m, "s3.delete_object(Bucket='vaults', Key=argv[0])", &[key]);
}

/// Every key under `prefix`, sorted.
fn s3_keys(m: &Emulator, prefix: &str) -> Vec<String> {
    let out = boto3(
        m,
        "p = s3.get_paginator('list_objects_v2')\nfor page in p.paginate(Bucket='vaults', Prefix=argv[0]):\n    for o in page.get('Contents', []):\n        print(o['Key'])",
        &[prefix],
    );
    let mut keys: Vec<String> = out.lines().map(str::to_string).collect();
    keys.sort();
    keys
}

#[test]
fn s3_gc_stops_on_a_point_it_cannot_decode_and_on_a_lease_it_cannot_read() {
    let Some(m) = Emulator::moto(&["vaults"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("key");
    random_file(&key, 32, 9);
    // A missing bucket: one line, saying how to create it.
    let out = m.run(&[
        "vault",
        "create",
        "--store",
        "s3://nobucket/v",
        "--key-file",
        s(&key),
        "--vault",
        s(&t.path().join("nb")),
        "--snapshot-area",
        s(&t.path().join("nba")),
    ]);
    let err = one_clear_line(&out, "create in a missing bucket");
    assert!(err.contains("\"nobucket\" does not exist"), "{err}");
    assert!(err.contains("aws s3 mb s3://nobucket"), "{err}");

    let store = "s3://vaults/v";
    let h = t.path().join("h");
    create_in_store(&m, store, &h, &t.path().join("a"));
    let (keep, drop) = (t.path().join("keep.img"), t.path().join("drop.img"));
    mixed_image(&keep, 4 << 20, 51);
    random_file(&drop, 2 << 20, 52);
    backup(&m, &h, "keep", &keep);
    backup(&m, &h, "drop", &drop);
    delete_and_prune(&m, &h, "drop", &h);
    let segments = s3_keys(&m, "v/segments/");
    assert!(!segments.is_empty());

    // A point file GC cannot decode: the chunks of its point would look
    // dead. GC stops, naming it, and condemns nothing.
    let bad_point = "v/points/keep/00000000000000ff.point";
    s3_put(&m, bad_point, "not a point");
    let out = m.run(&["gc", "--vault", s(&h)]);
    assert!(
        !out.status.success(),
        "gc went on over an undecodable point"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("points/keep/00000000000000ff.point"), "{err}");
    // (The rebuild GC marks with refuses first, leaving the cache's
    // index incomplete until the file is gone.)
    assert!(
        err.contains("nothing was condemned or deleted")
            || err.contains("nothing was deleted or cut"),
        "{err}"
    );
    assert_eq!(s3_keys(&m, "v/gc/condemned/"), Vec::<String>::new());
    assert_eq!(s3_keys(&m, "v/segments/"), segments);
    s3_delete(&m, bad_point);

    // A lease GC cannot read may be a running writer's: stop, naming it.
    let bad_lease = "v/leases/0001-0123456789abcdef";
    s3_put(&m, bad_lease, "not a lease");
    let out = m.run(&["gc", "--vault", s(&h)]);
    assert!(!out.status.success(), "gc ignored an unreadable lease");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leases/0001-0123456789abcdef"), "{err}");
    assert_eq!(s3_keys(&m, "v/gc/condemned/"), Vec::<String>::new());
    assert_eq!(s3_keys(&m, "v/segments/"), segments);
    s3_delete(&m, bad_lease);

    // A live restore's hold on a point the store no longer lists: its
    // chunks may be all that disk has. GC stops, naming the hold.
    let holds = coffre_engine::store::holds::HoldStore::new(&h, None);
    let target = t.path().join("restored.qcow2");
    holds
        .put(&coffre_engine::store::holds::HoldRecord {
            item: "keep".into(),
            point: "0123456789abcdef".into(),
            tier: "vault".into(),
            target: target.clone(),
            started: jiff::Timestamp::now(),
            pid: 1,
            target_file: None,
        })
        .unwrap();
    let out = m.run(&["gc", "--vault", s(&h)]);
    assert!(!out.status.success(), "gc ignored a dangling hold");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(s(&holds.path_of(&target))) && err.contains("no longer lists"),
        "{err}"
    );
    assert_eq!(s3_keys(&m, "v/gc/condemned/"), Vec::<String>::new());
    assert_eq!(s3_keys(&m, "v/segments/"), segments);
    assert!(holds.remove(&target).unwrap());

    // With both gone, GC runs: the dropped item's segment is condemned,
    // then deleted by the next run, and the kept point still restores.
    let first = m.json(&["gc", "--vault", s(&h)]);
    assert!(
        first["condemned_segments"].as_u64().unwrap() >= 1,
        "{first}"
    );
    let second = m.json(&["gc", "--vault", s(&h)]);
    assert!(
        second["deleted_segments"].as_u64().unwrap() >= 1,
        "{second}"
    );
    restore_same(&m, &h, "keep", 1, &keep);
}

/// Downloads every blob of `container` in Azurite into `to`, one file per
/// blob at its name (`scripts/azure-download.js`): what a bucket reader
/// holds. Returns how many blobs there were.
pub(crate) fn azure_download(az: &Emulator, container: &str, to: &Path) -> usize {
    let root = npm_root().expect("npm root");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/azure-download.js");
    let out = Command::new("node")
        .env("NODE_PATH", &root)
        .arg(script)
        .args([az.endpoint.as_str(), ACCOUNT, KEY, container])
        .arg(to)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "download failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("blob count")
}

/// Uploads the file `from` as blob `name` of `container` in Azurite.
pub(crate) fn azure_put(az: &Emulator, container: &str, name: &str, from: &Path) {
    let root = npm_root().expect("npm root");
    let code = r#"const { BlobServiceClient, StorageSharedKeyCredential } = require("@azure/storage-blob");
const [endpoint, account, key, container, name, file] = process.argv.slice(1);
const svc = new BlobServiceClient(`${endpoint}/${account}`, new StorageSharedKeyCredential(account, key));
svc.getContainerClient(container).getBlockBlobClient(name).uploadFile(file)
  .catch((e) => { console.error(e.message); process.exit(1); });"#;
    let out = Command::new("node")
        .env("NODE_PATH", &root)
        .args(["-e", code])
        .args([az.endpoint.as_str(), ACCOUNT, KEY, container, name])
        .arg(from)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_shared_bucket_cannot_choose_a_hosts_snapshot_area_replicas_or_secondary() {
    use coffre_vault_store::format::config::VaultConfig;
    let Some(az) = Emulator::azurite(&["hostlocal"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("hostlocal", "v1");
    let (a, b) = (t.path().join("hostA"), t.path().join("hostB"));
    let area_a = t.path().join("areaA");
    create_in_store(&az, &store, &a, &area_a);
    // Host A keeps its area; the bucket does not get it.
    let show_a = az.json(&["vault", "show", "--vault", s(&a)]);
    assert_eq!(
        show_a["snapshot_area"].as_str(),
        Some(s(&area_a)),
        "{show_a}"
    );
    let img_a = t.path().join("a.img");
    mixed_image(&img_a, 4 << 20, 3);
    backup(&az, &a, "vm-a", &img_a);

    // Someone holding the bucket's credentials writes a config (with the
    // production encoder) that points every host's snapshots at host A's
    // area and the vault's copies at places of their choosing.
    let mut cfg = VaultConfig::load(&a).unwrap();
    assert!(cfg.snapshot_area.is_some());
    cfg.snapshot_area = Some(area_a.clone());
    cfg.replicas = vec![t.path().join("their-replica")];
    cfg.secondary = Some(PathBuf::from("s3://attacker-bucket/loot"));
    let planted = t.path().join("planted-config");
    std::fs::write(&planted, cfg.encode().unwrap()).unwrap();
    azure_put(&az, "hostlocal", "v1/config", &planted);

    // Host B: its own cache and its own registry.
    let host_b = |args: &[&str]| {
        let out = az
            .coffre()
            .env("COFFRE_REGISTRY", t.path().join("registry-b"))
            .env("COFFRE_LOG", "warn")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let attached = host_b(&["vault", "attach", "--store", &store, "--vault", s(&b)]);
    let warned = String::from_utf8_lossy(&attached.stderr).into_owned();
    assert!(
        warned.contains("snapshot_area") && warned.contains("secondary"),
        "no warning naming what was ignored: {warned}"
    );
    let kept = VaultConfig::load(&b).unwrap();
    assert_eq!(kept.snapshot_area, None, "{kept:?}");
    assert_eq!(kept.secondary, None, "{kept:?}");
    assert!(kept.replicas.is_empty(), "{kept:?}");
    assert_eq!(kept.vault_id, cfg.vault_id);
    let out = host_b(&["--output", "json", "vault", "show", "--vault", s(&b)]);
    let show_b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(show_b["snapshot_area"].is_null(), "{show_b}");

    // A backup on B writes nothing into A's area.
    let before: Vec<_> = std::fs::read_dir(&area_a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let img_b = t.path().join("b.img");
    mixed_image(&img_b, 4 << 20, 4);
    host_b(&["backup", "--vault", s(&b), "--item", "vm-b", s(&img_b)]);
    let after: Vec<_> = std::fs::read_dir(&area_a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "host B wrote into host A's area");
    assert!(!area_a.join("vm-b").exists());
    assert!(!t.path().join("their-replica").exists());
    // B's own setting stays B's: `vault set` keeps it out of the bucket.
    let area_b = t.path().join("areaB");
    host_b(&[
        "vault",
        "set",
        "--vault",
        s(&b),
        "--snapshot-area",
        s(&area_b),
    ]);
    assert_eq!(
        VaultConfig::load(&b).unwrap().snapshot_area.as_deref(),
        Some(area_b.as_path())
    );
    let c = t.path().join("hostC");
    az.ok(&["vault", "attach", "--store", &store, "--vault", s(&c)]);
    assert_eq!(VaultConfig::load(&c).unwrap().snapshot_area, None);
}
