//! A vault in object storage, shared by several hosts, against a real
//! Azurite (Microsoft's Azure Storage emulator) that each test starts on
//! a free port in a temporary directory and stops afterwards. Each "host"
//! is a separate cache directory; nothing of the HTTP layer is mocked.
//! Without Azurite (`make azurite` installs it with npm) the tests say
//! SKIP and pass.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Azurite's well-known development account.
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running Azurite blob service, stopped on drop.
pub struct Azurite {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

fn npm_root() -> Option<PathBuf> {
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

impl Azurite {
    /// Starts Azurite with `containers`; `None` (having said SKIP) when
    /// Azurite or its client library is not installed.
    pub fn start(containers: &[&str]) -> Option<Azurite> {
        let Some(bin) = azurite_bin() else {
            eprintln!(
                "SKIP object store: azurite-blob not installed (make azurite, or npm install -g azurite @azure/storage-blob)"
            );
            return None;
        };
        let Some(root) = npm_root().filter(|r| r.join("@azure/storage-blob").is_dir()) else {
            eprintln!(
                "SKIP object store: @azure/storage-blob not installed (npm install -g @azure/storage-blob)"
            );
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
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
        let az = Azurite {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "azurite did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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

    /// `coffre` talking to this Azurite (the usual environment variables).
    pub fn coffre(&self) -> Command {
        let mut c = coffre();
        c.env("AZURE_STORAGE_USE_EMULATOR", "true")
            .env("AZURITE_BLOB_STORAGE_URL", &self.endpoint)
            .env_remove("AZURE_STORAGE_ACCOUNT_KEY");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.coffre().args(args).output().expect("run coffre")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "coffre {args:?} failed with {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("JSON")
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url(container: &str, prefix: &str) -> String {
    format!("azure://{ACCOUNT}/{container}/{prefix}")
}

/// Backs `img` up as `item` from the host whose cache is `cache`.
fn backup(az: &Azurite, cache: &Path, item: &str, img: &Path) -> serde_json::Value {
    az.json(&["backup", "--vault", s(cache), "--item", item, s(img)])
}

/// Restores the `n`-th point (1 = oldest) of `item` and compares it.
fn restore_same(az: &Azurite, cache: &Path, item: &str, n: usize, want: &Path) {
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
    let Some(az) = Azurite::start(&["vaults"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("vaults", "v1");
    let h1 = t.path().join("host1");
    az.ok(&[
        "vault",
        "create",
        "--store",
        &store,
        "--vault",
        s(&h1),
        "--snapshot-area",
        s(&t.path().join("area")),
    ]);
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
        "--vault",
        s(&t.path().join("h3")),
    ]);
    assert!(!over.status.success());
    assert!(String::from_utf8_lossy(&over.stderr).contains("already holds a vault"));
}

#[test]
fn an_image_a_second_host_backs_up_again_adds_almost_nothing() {
    let Some(az) = Azurite::start(&["dedup"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("dedup", "shared");
    let (h1, h2) = (t.path().join("h1"), t.path().join("h2"));
    az.ok(&[
        "vault",
        "create",
        "--store",
        &store,
        "--vault",
        s(&h1),
        "--snapshot-area",
        s(&t.path().join("a1")),
    ]);
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
    let Some(az) = Azurite::start(&["fleet"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("fleet", "v");
    let hosts: Vec<PathBuf> = (0..4).map(|i| t.path().join(format!("host{i}"))).collect();
    az.ok(&[
        "vault",
        "create",
        "--store",
        &store,
        "--vault",
        s(&hosts[0]),
        "--snapshot-area",
        s(&t.path().join("area")),
    ]);
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
}

#[test]
fn gc_of_a_shared_vault_is_refused_and_deletes_nothing() {
    let Some(az) = Azurite::start(&["gcvault"]) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = url("gcvault", "v");
    let h1 = t.path().join("h1");
    az.ok(&[
        "vault",
        "create",
        "--store",
        &store,
        "--vault",
        s(&h1),
        "--snapshot-area",
        s(&t.path().join("a")),
    ]);
    let img = t.path().join("d.img");
    mixed_image(&img, 8 << 20, 5);
    backup(&az, &h1, "d", &img);
    let out = az.run(&["gc", "--vault", s(&h1)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not supported yet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    restore_same(&az, &h1, "d", 1, &img);
}
