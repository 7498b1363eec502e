//! An encrypted vault's catalog through the CLI (issue 23, the catalog):
//! no item name, image path, hook command or policy name in any file of
//! the vault, its replica, its secondary or its snapshot area (the host's
//! RocksDB index aside); a bit flipped in each kind of sealed file, and
//! two items', two points', two job records' and two snapshots' files swapped, are each
//! refused with a message naming the file (`verify` reports
//! `forged-file`) and never used; a plain file planted in an encrypted
//! vault and a sealed one in a plain vault are refused too.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::*;

const ITEMS: [&str; 2] = ["webfront", "dbnode"];
const POLICY: &str = "Nightly-Gold-Policy";
const HOOK: &str = "echo hookcmd-zebra-42";

struct Fixture {
    _t: tempfile::TempDir,
    dir: PathBuf,
    key: PathBuf,
    vault: PathBuf,
    replica: PathBuf,
    secondary: PathBuf,
    area: PathBuf,
    images: Vec<PathBuf>,
}

impl Fixture {
    fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--key-file", s(&self.key)];
        all.extend_from_slice(args);
        coffre().args(&all).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        succeeded(args, self.run(args))
    }

    /// `verify`'s findings: (code, message).
    fn findings(&self) -> Vec<(String, String)> {
        let out = self.run(&["--output", "json", "verify", "--vault", s(&self.vault)]);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("verify: {e}: {out:?}"));
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["code"].as_str().unwrap().to_string(),
                    f["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Asserts that verify reports `name` as forged, and only forged
    /// files.
    fn assert_forged(&self, names: &[&str]) {
        let f = self.findings();
        for name in names {
            assert!(
                f.iter()
                    .any(|(c, m)| c == "forged-file" && m.contains(name)),
                "{name} not reported: {f:#?}"
            );
        }
        assert!(f.iter().all(|(c, _)| c == "forged-file"), "{f:#?}");
    }

    fn assert_clean(&self) {
        let f = self.findings();
        assert!(f.is_empty(), "{f:#?}");
    }

    fn image_of(&self, item: &str) -> &Path {
        &self.images[ITEMS.iter().position(|i| *i == item).unwrap()]
    }

    fn point_ids(&self, item: &str) -> Vec<String> {
        let out = self.ok(&[
            "--output",
            "json",
            "points",
            "--vault",
            s(&self.vault),
            "--item",
            item,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn restore_from(&self, item: &str, point: &str, from: &str) -> Output {
        let to = self.dir.join(format!("r-{item}-{point}-{from}.img"));
        let _ = std::fs::remove_file(&to);
        self.run(&[
            "restore",
            "--vault",
            s(&self.vault),
            "--item",
            item,
            "--point",
            point,
            "--from",
            from,
            "--to",
            s(&to),
        ])
    }
}

/// An encrypted vault (a replica, a secondary, a chosen snapshot area)
/// with a policy, two items (one protected with a hook) and two points
/// each, replicated.
fn fixture() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let key = dir.join("key");
    random_file(&key, 32, 5);
    let f = Fixture {
        key,
        vault: dir.join("vault"),
        replica: dir.join("r1"),
        secondary: dir.join("sec"),
        area: dir.join("snaps"),
        images: vec![dir.join("secretimg-alpha.img"), dir.join("imgbeta.img")],
        dir,
        _t: t,
    };
    f.ok(&[
        "vault",
        "create",
        "--vault",
        s(&f.vault),
        "--encryption",
        "chacha20-poly1305",
        "--replica",
        s(&f.replica),
        "--secondary",
        s(&f.secondary),
        "--snapshot-area",
        s(&f.area),
    ]);
    f.ok(&[
        "policy",
        "create",
        "--vault",
        s(&f.vault),
        "--name",
        POLICY,
        "--schedule",
        "daily",
        "--time",
        "01:00",
        "--daily-retention",
        "7",
    ]);
    for (i, img) in f.images.iter().enumerate() {
        mixed_image(img, 2 << 20, 40 + i as u64);
    }
    f.ok(&[
        "protect",
        "--vault",
        s(&f.vault),
        "--item",
        ITEMS[0],
        "--policy",
        POLICY,
        "--pre-snapshot",
        HOOK,
        s(&f.images[0]),
    ]);
    for round in 0..2 {
        for (item, img) in ITEMS.iter().zip(&f.images) {
            if round == 1 {
                churn(img, 4, 4096, 9);
            }
            f.ok(&["backup", "--vault", s(&f.vault), "--item", item, s(img)]);
        }
    }
    f.ok(&["replicate", "--vault", s(&f.vault)]);
    f.assert_clean();
    f
}

/// Every file under `dir`, less the host's RocksDB index.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() && e.file_name() != "index" {
                todo.push(p);
            } else if t.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// Flips one bit in the middle of `path`; returns its old bytes.
fn flip(path: &Path) -> Vec<u8> {
    let old = std::fs::read(path).unwrap();
    let mut b = old.clone();
    let at = b.len() / 2;
    b[at] ^= 0x10;
    std::fs::write(path, &b).unwrap();
    old
}

/// Flips one bit of the sealed body of envelope `path` and fixes its
/// CRC-32, so that only the authentication can tell; returns its old
/// bytes.
fn flip_sealed(path: &Path) -> Vec<u8> {
    let old = std::fs::read(path).unwrap();
    let mut b = old.clone();
    let n = b.len();
    b[16 + (n - 20) / 2] ^= 0x01;
    let crc = crc32fast::hash(&b[..n - 4]);
    b[n - 4..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, &b).unwrap();
    old
}

/// Flips one bit of the first frame's sealed entries of manifest `path`
/// and fixes the frame's CRC-32; returns its old bytes.
fn flip_frame(path: &Path) -> Vec<u8> {
    let old = std::fs::read(path).unwrap();
    let mut b = old.clone();
    let n = u32::from_le_bytes(b[64..68].try_into().unwrap()) as usize;
    let end = 68 + n * 48 + 40;
    b[68 + 30] ^= 0x01;
    let crc = crc32fast::hash(&b[64..end]);
    b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, &b).unwrap();
    old
}

fn swap(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    std::fs::write(a, y).unwrap();
    std::fs::write(b, x).unwrap();
}

/// The files of `dir` ending in `ext`, sorted.
fn with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .collect();
    v.sort();
    v
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn an_encrypted_vault_keeps_no_name_path_hook_or_policy_in_clear() {
    let f = fixture();
    let secrets = [
        ITEMS[0],
        ITEMS[1],
        "secretimg-alpha",
        "hookcmd-zebra-42",
        POLICY,
    ];
    let mut checked = 0;
    for root in [&f.vault, &f.replica, &f.secondary, &f.area] {
        for file in files_under(root) {
            let data = std::fs::read(&file).unwrap();
            for secret in secrets {
                assert!(
                    !data.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret:?} in clear in {}",
                    file.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "{checked} files");
    // The check finds what it looks for: the index (host-local) and a
    // plain vault hold the names.
    let plain = new_vault(&f.dir.join("plain"), &[]);
    ok(&[
        "backup",
        "--vault",
        s(&plain),
        "--item",
        ITEMS[0],
        s(&f.images[0]),
    ]);
    assert!(files_under(&plain).iter().any(|p| {
        std::fs::read(p)
            .unwrap()
            .windows(ITEMS[0].len())
            .any(|w| w == ITEMS[0].as_bytes())
    }));
}

#[test]
fn a_flipped_bit_in_each_kind_of_sealed_file_is_refused_and_named() {
    let f = fixture();
    let point_dir = f.vault.join("points").join(ITEMS[0]);
    let points = with_ext(&point_dir, ".point");
    let policy = with_ext(&f.vault.join("policies"), ".policy")
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy() == format!("{}.policy", hex(POLICY)))
        .unwrap();
    // Catalog files: verify names each; the rebuild refuses to index it.
    for file in [
        f.vault.join("items").join(format!("{}.item", ITEMS[0])),
        points[0].clone(),
        policy,
    ] {
        let rel = file
            .strip_prefix(&f.vault)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let old = flip(&file);
        f.assert_forged(&[&rel]);
        std::fs::write(&file, &old).unwrap();
        flip_sealed(&file);
        f.assert_forged(&[&rel]);
        // The replica's intact copy is the one a rebuild reads: never the
        // forged one.
        let r = f.run(&["vault", "rebuild-index", "--vault", s(&f.vault)]);
        assert!(r.status.success(), "{r:?}");
        std::fs::write(&file, old).unwrap();
        f.assert_clean();
    }
    // A forged point manifest on every copy: the rebuild refuses, naming it.
    let rel = points[0].strip_prefix(&f.vault).unwrap().to_owned();
    let old = flip_sealed(&points[0]);
    flip_sealed(&f.replica.join(&rel));
    let r = f.run(&["vault", "rebuild-index", "--vault", s(&f.vault)]);
    assert!(!r.status.success(), "{r:?}");
    let e = stderr(&r);
    assert!(
        e.contains(&*rel.to_string_lossy()) && e.contains("authentication"),
        "{e}"
    );
    std::fs::write(&points[0], &old).unwrap();
    std::fs::write(f.replica.join(&rel), &old).unwrap();
    f.ok(&["vault", "rebuild-index", "--vault", s(&f.vault)]);
    f.assert_clean();

    // The copy identity: the replica is unusable, named.
    let old = flip(&f.replica.join("copy"));
    let fs = f.findings();
    assert!(
        fs.iter()
            .any(|(c, m)| c == "copy-unavailable" && m.contains("copy identity")),
        "{fs:#?}"
    );
    std::fs::write(f.replica.join("copy"), old).unwrap();

    // A job record: listed no more, and `job show` names it.
    let job = with_ext(&f.vault.join("jobs"), ".job").remove(0);
    let id = job.file_stem().unwrap().to_string_lossy().into_owned();
    let old = flip(&job);
    let out = f.ok(&["jobs", "--vault", s(&f.vault)]);
    assert!(!out.contains(&id), "{out}");
    f.assert_forged(&[&format!("jobs/{id}.job")]);
    let r = f.run(&["job", "show", "--vault", s(&f.vault), &id]);
    assert!(!r.status.success());
    assert!(stderr(&r).contains(&format!("{id}.job")), "{}", stderr(&r));
    std::fs::write(&job, old).unwrap();
    f.ok(&["job", "show", "--vault", s(&f.vault), &id]);

    // The replication state: refused (replication starts over, safely).
    let old = flip_sealed(&f.vault.join("replication"));
    f.assert_forged(&["replication is refused"]);
    let r = f.run(&["points", "--vault", s(&f.vault), "--item", ITEMS[1]]);
    assert!(r.status.success());
    assert!(stderr(&r).contains("replication"), "{}", stderr(&r));
    std::fs::write(f.vault.join("replication"), old).unwrap();

    // The area list and the area's identity: a backup fails, naming them.
    for file in [f.vault.join("snapshot-areas"), f.area.join("area")] {
        let old = flip(&file);
        if file.ends_with("snapshot-areas") {
            f.assert_forged(&["snapshot-areas is refused"]);
        }
        let r = f.run(&[
            "backup",
            "--vault",
            s(&f.vault),
            "--item",
            ITEMS[1],
            s(f.image_of(ITEMS[1])),
        ]);
        assert!(!r.status.success(), "{r:?}");
        assert!(
            stderr(&r).contains(&*file.to_string_lossy()),
            "{}",
            stderr(&r)
        );
        std::fs::write(&file, old).unwrap();
    }

    // A snapshot manifest: verify names it; a restore from it fails.
    let snaps = with_ext(&f.area.join(ITEMS[0]), ".snap");
    let latest = f.point_ids(ITEMS[0]).pop().unwrap();
    let newest = snaps
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    let old = flip(newest);
    f.assert_forged(&[&*newest.to_string_lossy()]);
    let r = f.restore_from(ITEMS[0], &latest, "snapshot");
    assert!(!r.status.success(), "{r:?}");
    assert!(
        stderr(&r).contains(&*newest.to_string_lossy()),
        "{}",
        stderr(&r)
    );
    std::fs::write(newest, &old).unwrap();
    flip_frame(newest);
    f.assert_forged(&[&*newest.to_string_lossy()]);
    let r = f.restore_from(ITEMS[0], &latest, "snapshot");
    assert!(!r.status.success(), "{r:?}");
    let e = stderr(&r);
    assert!(
        e.contains(&*newest.to_string_lossy()) && e.contains("authentication"),
        "{e}"
    );
    // The vault's copy of the point is intact.
    let r = f.restore_from(ITEMS[0], &latest, "vault");
    assert!(r.status.success(), "{r:?}");
    std::fs::write(newest, old).unwrap();
    f.assert_clean();
}

#[test]
fn swapped_items_points_and_snapshots_are_refused() {
    let f = fixture();
    // Two items' files.
    let (a, b) = (
        f.vault.join("items").join(format!("{}.item", ITEMS[0])),
        f.vault.join("items").join(format!("{}.item", ITEMS[1])),
    );
    swap(&a, &b);
    f.assert_forged(&["items/webfront.item", "items/dbnode.item"]);
    swap(&a, &b);
    // Two points of one item.
    let points = with_ext(&f.vault.join("points").join(ITEMS[0]), ".point");
    swap(&points[0], &points[1]);
    let names: Vec<String> = points
        .iter()
        .map(|p| {
            p.strip_prefix(&f.vault)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    f.assert_forged(&[&names[0], &names[1]]);
    swap(&points[0], &points[1]);
    f.assert_clean();
    // Two job records.
    let jobs = with_ext(&f.vault.join("jobs"), ".job");
    swap(&jobs[0], &jobs[1]);
    let ids: Vec<String> = jobs[..2]
        .iter()
        .map(|p| format!("jobs/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    f.assert_forged(&[&ids[0], &ids[1]]);
    swap(&jobs[0], &jobs[1]);
    // Two snapshots of one item, and snapshots of two items: each is
    // refused, and a restore from one fails.
    let mine = with_ext(&f.area.join(ITEMS[0]), ".snap");
    let theirs = with_ext(&f.area.join(ITEMS[1]), ".snap");
    assert_eq!((mine.len(), theirs.len()), (2, 2));
    for (x, y) in [(&mine[0], &mine[1]), (&mine[0], &theirs[0])] {
        swap(x, y);
        f.assert_forged(&[&*x.to_string_lossy(), &*y.to_string_lossy()]);
        swap(x, y);
    }
    // Swapped within the item, neither snapshot is used for a restore.
    swap(&mine[0], &mine[1]);
    for point in f.point_ids(ITEMS[0]) {
        let r = f.restore_from(ITEMS[0], &point, "snapshot");
        assert!(!r.status.success(), "{r:?}");
    }
    swap(&mine[0], &mine[1]);
    f.assert_clean();
    for point in f.point_ids(ITEMS[1]) {
        let r = f.restore_from(ITEMS[1], &point, "snapshot");
        assert!(r.status.success(), "{r:?}");
    }
}

#[test]
fn a_plain_file_in_an_encrypted_vault_and_a_sealed_one_in_a_plain_vault_are_refused() {
    let f = fixture();
    let plain = new_vault(&f.dir.join("plain"), &[]);
    ok(&[
        "backup",
        "--vault",
        s(&plain),
        "--item",
        ITEMS[0],
        s(&f.images[0]),
    ]);
    let item = format!("items/{}.item", ITEMS[0]);
    let (sealed, clear) = (
        std::fs::read(f.vault.join(&item)).unwrap(),
        std::fs::read(plain.join(&item)).unwrap(),
    );
    // A plain item file planted in the encrypted vault (and its replica).
    std::fs::write(f.vault.join(&item), &clear).unwrap();
    let fs = f.findings();
    assert!(
        fs.iter()
            .any(|(c, m)| c == "forged-file" && m.contains(&item) && m.contains("not sealed")),
        "{fs:#?}"
    );
    std::fs::write(f.vault.join(&item), &sealed).unwrap();
    // The sealed file in the plain vault.
    std::fs::write(plain.join(&item), &sealed).unwrap();
    let out = run(&["--output", "json", "verify", "--vault", s(&plain)]);
    assert!(!out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fs = v["findings"].as_array().unwrap();
    assert!(
        fs.iter().any(|x| x["code"] == "forged-file"
            && x["message"]
                .as_str()
                .unwrap()
                .contains("this vault is not encrypted")),
        "{v:#}"
    );
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn an_older_item_or_policy_file_put_back_is_refused_as_a_rollback() {
    let f = fixture();
    let item = f.vault.join("items").join(format!("{}.item", ITEMS[1]));
    let policy = f
        .vault
        .join("policies")
        .join(format!("{}.policy", hex(POLICY)));
    let (old_item, old_policy) = (
        std::fs::read(&item).unwrap(),
        std::fs::read(&policy).unwrap(),
    );
    // Protection stops (the item file is rewritten), the policy keeps more
    // days (its file is rewritten).
    f.ok(&["unprotect", "--vault", s(&f.vault), "--item", ITEMS[1]]);
    f.ok(&[
        "policy",
        "set",
        "--vault",
        s(&f.vault),
        "--name",
        POLICY,
        "--daily-retention",
        "9",
    ]);
    f.assert_clean();
    let (new_item, new_policy) = (
        std::fs::read(&item).unwrap(),
        std::fs::read(&policy).unwrap(),
    );
    assert_ne!(old_item, new_item);
    assert_ne!(old_policy, new_policy);

    // Each older file: authentic, bound to its name, and refused as a
    // rollback naming the file; put back the newer one, all is well.
    for (path, old, new) in [
        (&item, &old_item, &new_item),
        (&policy, &old_policy, &new_policy),
    ] {
        std::fs::write(path, old).unwrap();
        let rel = path
            .strip_prefix(&f.vault)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let findings = f.findings();
        assert!(
            findings
                .iter()
                .any(|(c, m)| c == "forged-file" && m.contains(&rel) && m.contains("rollback")),
            "{rel}: {findings:#?}"
        );
        std::fs::write(path, new).unwrap();
        f.assert_clean();
    }
}

#[test]
fn a_plain_config_put_in_place_of_an_encrypted_ones_is_refused_by_a_host_that_knew_it() {
    let f = fixture();
    // Another vault's plain config, put where the sealed one was.
    let plain = f.dir.join("plain");
    f.ok(&["vault", "create", "--vault", s(&plain)]);
    let sealed = std::fs::read(f.vault.join("config")).unwrap();
    std::fs::copy(plain.join("config"), f.vault.join("config")).unwrap();
    let r = f.run(&[
        "backup",
        "--vault",
        s(&f.vault),
        "--item",
        ITEMS[1],
        s(f.image_of(ITEMS[1])),
    ]);
    assert!(!r.status.success(), "{r:?}");
    let err = stderr(&r);
    assert!(
        err.contains("config") && err.contains("plain one: refused"),
        "{err}"
    );
    // Nothing was written in clear: the sealed config back, all is well.
    std::fs::write(f.vault.join("config"), sealed).unwrap();
    f.assert_clean();
    // `vault create` on a path makes a new vault: the memory is forgotten.
    std::fs::remove_dir_all(&f.vault).unwrap();
    f.ok(&["vault", "create", "--vault", s(&f.vault)]);
    f.ok(&["verify", "--vault", s(&f.vault)]);
}
