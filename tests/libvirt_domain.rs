//! `coffre backup --domain` against a real libvirt 9.0 (started here when
//! it is not running) and transient QEMU domains with no guest OS: a
//! domain with a raw and a qcow2 disk is backed up in one libvirt job at
//! one instant, the "guest" writes through both virtio devices, the next
//! backup reads only what the checkpoint's bitmap marks on the qcow2 disk
//! (libvirt keeps no checkpoint of a raw disk: it is read whole), the
//! scheduler does the same for `protect --domain`, and every point of both
//! disks restores byte-identical to the disk at its instant. A killed run
//! leaves its libvirt job and checkpoint; the next run ends the one and
//! deletes the other by name and builds on the last committed checkpoint.
//! A domain that is not running is backed up from its files with a
//! warning; a freeze through a guest agent that does not answer is thawed
//! and the point is crash-consistent. Skipped with a message without root,
//! libvirt or QEMU.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::libvirt::*;
use crate::common::*;

const MIB: u64 = 1 << 20;

/// `coffre backup --domain` as JSON; asserts every disk's job completed
/// (`Completed`, or `CompletedWithWarnings` when `warned`).
fn backup(vault: &Path, dom: &Dom, extra: &[&str], warned: bool) -> serde_json::Value {
    let mut args = vec![
        "backup",
        "--vault",
        s(vault),
        "--domain",
        &dom.name,
        "--connect",
        CONNECT,
    ];
    args.extend_from_slice(extra);
    let b = json(&args);
    let want = if warned {
        "CompletedWithWarnings"
    } else {
        "Completed"
    };
    for d in b["disks"].as_array().unwrap() {
        assert_eq!(d["job"]["status"], want, "{d:#}");
    }
    b
}

fn disk<'a>(b: &'a serde_json::Value, target: &str) -> &'a serde_json::Value {
    b["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == target)
        .unwrap_or_else(|| panic!("no disk {target} in {b:#}"))
}

/// Restores point `point` of `item` and compares it with `expected`.
fn restores_as(vault: &Path, item: &str, point: &str, expected: &Path, dir: &Path) {
    let to = dir.join(format!("restored-{item}-{point}.img"));
    ok(&restore_args(vault, item, Some(point), &to, true));
    assert_same(&to, expected);
}

#[test]
fn a_two_disk_domain_is_backed_up_at_one_instant_then_incrementally_and_restores() {
    if !libvirt_ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let vault = new_vault(dir, &[]);
    // vda: raw, a distinct byte per 4 KiB; vdb: qcow2 with data here and
    // there (holes elsewhere).
    let a = dir.join("a.raw");
    let mut bytes = vec![0u8; (8 * MIB) as usize];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i / 4096 % 251) as u8;
    }
    std::fs::write(&a, &bytes).unwrap();
    let exp_a = dir.join("exp-a-1.img");
    std::fs::write(&exp_a, &bytes).unwrap();
    let b = dir.join("b.qcow2");
    let exp_b = dir.join("exp-b-1.img");
    qcow2_image(
        &b,
        &exp_b,
        16 * MIB,
        &[(0x22, 0, 2 * MIB), (0x23, 9 * MIB, MIB)],
    );
    let name = dom_name("two");
    let dom = create(
        dir,
        &name,
        &domain_xml(&name, &[(&a, "raw"), (&b, "qcow2")], ""),
    );

    // First backup: both disks whole, one libvirt job, one instant.
    let first = backup(&vault, &dom, &[], false);
    assert_eq!(first["running"], true);
    assert_eq!(first["disks"].as_array().unwrap().len(), 2);
    let (va, vb) = (disk(&first, "vda"), disk(&first, "vdb"));
    assert_eq!(va["item"], format!("{name}-vda"));
    assert_eq!(vb["item"], format!("{name}-vdb"));
    assert_eq!(
        vb["source"],
        format!("libvirt:///{name}/vdb?connect={CONNECT}")
    );
    for d in [va, vb] {
        let stats = &d["job"]["stats"];
        assert_eq!(stats["domain_job"], first["domain_job"], "{d:#}");
        assert_eq!(stats["instant"], first["instant"], "one instant: {d:#}");
        assert_eq!(stats["domain"], name.as_str());
        assert_eq!(d["auto_protected"], true);
    }
    let cp1 = first["checkpoint"].as_str().unwrap().to_string();
    assert_eq!(checkpoints(&dom), vec![cp1.clone()]);
    assert!(!has_backup_job(&dom), "the libvirt job was ended");
    assert!(va["full_read"].as_str().unwrap().contains("raw"), "{va:#}");
    let pa1 = va["point"]["id"].as_str().unwrap().to_string();
    let pb1 = vb["point"]["id"].as_str().unwrap().to_string();

    // The guest writes to both disks.
    let exp_a2 = dir.join("exp-a-2.img");
    let exp_b2 = dir.join("exp-b-2.img");
    std::fs::copy(&exp_a, &exp_a2).unwrap();
    std::fs::copy(&exp_b, &exp_b2).unwrap();
    for (pattern, at, len) in [(0x55, 0, 65536), (0x56, 5 * MIB, 4096)] {
        guest_write(&dom, 0, pattern, at, len);
        expect_write(&exp_a2, pattern, at, len);
    }
    for (pattern, at, len) in [(0x66, MIB, 65536), (0x67, 12 * MIB, 4096)] {
        guest_write(&dom, 1, pattern, at, len);
        expect_write(&exp_b2, pattern, at, len);
    }

    // The incremental: vdb reads only what checkpoint 1's bitmap marks.
    let second = backup(
        &vault,
        &dom,
        &["--cbt-sample", "0%", "--cbt-sample-min", "0"],
        false,
    );
    let (va, vb) = (disk(&second, "vda"), disk(&second, "vdb"));
    assert_eq!(vb["incremental_from"], cp1.as_str(), "{vb:#}");
    let cbt = &vb["job"]["stats"]["cbt"];
    assert_eq!(cbt["source"], "bitmap", "{vb:#}");
    assert_eq!(cbt["used"], true, "{vb:#}");
    assert_eq!(cbt["dirty_blocks"], 2, "{vb:#}");
    let read = vb["job"]["stats"]["bytes_read"].as_u64().unwrap();
    assert!(read <= 2 * 65536, "vdb read {read} bytes: {vb:#}");
    assert!(va["incremental_from"].is_null());
    let cp2 = second["checkpoint"].as_str().unwrap().to_string();
    assert_eq!(
        checkpoints(&dom),
        vec![cp2.clone()],
        "the previous checkpoint goes once the new points are committed"
    );
    assert_eq!(second["retired_checkpoints"][0], cp1.as_str());
    let pa2 = va["point"]["id"].as_str().unwrap().to_string();
    let pb2 = vb["point"]["id"].as_str().unwrap().to_string();

    // A second vault protecting the same domain (from another host's
    // registry: one host protects an image in one vault) keeps its own
    // checkpoint and leaves the first vault's chain alone.
    let other_dir = dir.join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = new_vault(&other_dir, &[]);
    let args = [
        "--output",
        "json",
        "backup",
        "--vault",
        s(&other),
        "--domain",
        &name,
        "--connect",
        CONNECT,
    ];
    let out = coffre()
        .env("COFFRE_REGISTRY", other_dir.join("registry"))
        .args(args)
        .output()
        .unwrap();
    let third: serde_json::Value = serde_json::from_str(&succeeded(&args, out)).unwrap();
    let cp_other = third["checkpoint"].as_str().unwrap().to_string();
    assert_ne!(cp_other[..16], cp2[..16], "each vault names its own");
    let mut both = checkpoints(&dom);
    both.sort();
    let mut want = vec![cp2.clone(), cp_other.clone()];
    want.sort();
    assert_eq!(both, want);

    // The scheduler backs the domain up the same way.
    let exp_b3 = dir.join("exp-b-3.img");
    std::fs::copy(&exp_b2, &exp_b3).unwrap();
    guest_write(&dom, 1, 0x77, 15 * MIB, 65536);
    expect_write(&exp_b3, 0x77, 15 * MIB, 65536);
    let p = json(&[
        "protect",
        "--vault",
        s(&vault),
        "--domain",
        &name,
        "--connect",
        CONNECT,
        "--policy",
        "DefaultPolicy",
    ]);
    assert_eq!(p.as_array().unwrap().len(), 2, "{p:#}");
    let later = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(49))
        .unwrap()
        .to_string();
    json_at(&later, &["run-due", "--vault", s(&vault)]);
    let jobs = jobs(&vault);
    let backups: Vec<&serde_json::Value> =
        jobs.iter().filter(|j| j["operation"] == "backup").collect();
    assert_eq!(backups.len(), 6, "{jobs:#?}");
    let scheduled = &backups[4..];
    assert_eq!(
        scheduled[0]["stats"]["domain_job"],
        scheduled[1]["stats"]["domain_job"]
    );
    let pb3 = scheduled
        .iter()
        .find(|j| j["item"] == format!("{name}-vdb"))
        .unwrap();
    assert_eq!(pb3["status"], "Completed", "{pb3:#}");
    assert_eq!(pb3["stats"]["incremental_from"], cp2.as_str());
    let pb3 = pb3["point"].as_str().unwrap().to_string();
    let now = checkpoints(&dom);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.contains(&cp_other), "the other vault's stays: {now:?}");
    assert!(
        !now.contains(&cp2),
        "this vault's previous one went: {now:?}"
    );

    // Every point of both disks is the disk at its instant.
    let item_a = format!("{name}-vda");
    let item_b = format!("{name}-vdb");
    restores_as(&vault, &item_a, &pa1, &exp_a, dir);
    restores_as(&vault, &item_b, &pb1, &exp_b, dir);
    restores_as(&vault, &item_a, &pa2, &exp_a2, dir);
    restores_as(&vault, &item_b, &pb2, &exp_b2, dir);
    restores_as(&vault, &item_b, &pb3, &exp_b3, dir);
    ok(&["verify", "--vault", s(&vault), "--read-data"]);
}

#[test]
fn a_killed_domain_backup_is_cleaned_up_by_the_next_run() {
    if !libvirt_ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let vault = new_vault(dir, &[]);
    let b = dir.join("b.qcow2");
    let exp = dir.join("exp.img");
    qcow2_image(&b, &exp, 16 * MIB, &[(0x31, 0, 16 * MIB)]);
    let name = dom_name("killed");
    let dom = create(dir, &name, &domain_xml(&name, &[(&b, "qcow2")], ""));
    let first = backup(&vault, &dom, &[], false);
    let cp1 = first["checkpoint"].as_str().unwrap().to_string();
    guest_write(&dom, 0, 0x41, 3 * MIB, 65536);
    expect_write(&exp, 0x41, 3 * MIB, 65536);

    // A run that reads slowly (all 16 MiB: it re-reads every clean block,
    // a 100% sample, at 1 MiB/s) is killed once libvirt's job runs.
    let mut slow = coffre()
        .args([
            "backup",
            "--vault",
            s(&vault),
            "--domain",
            &name,
            "--connect",
            CONNECT,
            "--rate-limit",
            "1M",
            "--cbt-sample",
            "100%",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !has_backup_job(&dom) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the slow run never started its libvirt job"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Its folder: coffre's (0711), with the requests; only the subfolder
    // q, with the socket and the scratch file, is QEMU's user's.
    {
        use std::os::unix::fs::MetadataExt;
        let prefix = format!("coffre-libvirt-{}-", slow.id());
        let work = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .expect("the run's folder")
            .path();
        let outer = std::fs::symlink_metadata(&work).unwrap();
        assert_eq!((outer.uid(), outer.mode() & 0o7777), (0, 0o711));
        assert!(work.join("backup.xml").is_file());
        let q = std::fs::symlink_metadata(work.join("q")).unwrap();
        assert_eq!(q.mode() & 0o7777, 0o700);
        assert_ne!(q.uid(), 0, "handed to the user QEMU runs as");
        assert!(work.join("q/nbd.sock").exists());
        assert!(work.join("q/vda.scratch").exists());
    }
    slow.kill().unwrap();
    slow.wait().unwrap();
    assert!(has_backup_job(&dom), "the killed run left its job");
    assert_eq!(checkpoints(&dom).len(), 2, "and its checkpoint");

    guest_write(&dom, 0, 0x42, 7 * MIB, 4096);
    expect_write(&exp, 0x42, 7 * MIB, 4096);
    let next = backup(&vault, &dom, &[], true);
    let warnings = next["warnings"].to_string();
    assert!(warnings.contains("killed coffre run"), "{next:#}");
    let d = disk(&next, "vda");
    assert_eq!(
        d["incremental_from"],
        cp1.as_str(),
        "the chain goes on from the last committed checkpoint: {d:#}"
    );
    let cp2 = next["checkpoint"].as_str().unwrap().to_string();
    assert_eq!(
        checkpoints(&dom),
        vec![cp2],
        "nothing of the killed run is left"
    );
    assert!(!has_backup_job(&dom));
    assert_eq!(
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("coffre-libvirt-{}-", slow.id()))
            })
            .count(),
        0,
        "the killed run's folder is gone"
    );
    let point = d["point"]["id"].as_str().unwrap().to_string();
    restores_as(&vault, &format!("{name}-vda"), &point, &exp, dir);
}

#[test]
fn a_stopped_domain_is_read_from_its_files_and_a_failed_freeze_is_thawed() {
    if !libvirt_ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let vault = new_vault(dir, &[]);

    let err = fails(
        &[
            "backup",
            "--vault",
            s(&vault),
            "--domain",
            "coffre-no-such-domain",
            "--connect",
            CONNECT,
        ],
        1,
    );
    assert!(err.contains("there is no domain"), "{err}");

    let b = dir.join("b.qcow2");
    let exp = dir.join("exp.img");
    qcow2_image(&b, &exp, 8 * MIB, &[(0x51, MIB, 2 * MIB)]);
    let name = dom_name("stopped");
    // A guest agent channel, and no agent in the guest to answer it.
    let agent =
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>";
    let dom = define(dir, &name, &domain_xml(&name, &[(&b, "qcow2")], agent));
    let off = backup(&vault, &dom, &[], true);
    assert_eq!(off["running"], false);
    assert!(
        off["warnings"].to_string().contains("is not running"),
        "{off:#}"
    );
    let d = disk(&off, "vda");
    assert_eq!(d["read_from"], s(&b));
    let p1 = d["point"]["id"].as_str().unwrap().to_string();
    restores_as(&vault, &format!("{name}-vda"), &p1, &exp, dir);

    // The item's hooks, set on this host, run around the domain's instant.
    let log = dir.join("hooks.log");
    let hook = |phase: &str| format!("sh -c 'echo {phase} >> {}'", log.display());
    let item = format!("{name}-vda");
    ok(&[
        "protect",
        "--vault",
        s(&vault),
        "--item",
        &item,
        "--policy",
        "DefaultPolicy",
        "--pre-snapshot",
        &hook("pre"),
        "--post-snapshot",
        &hook("post"),
        &format!("libvirt:///{name}/vda?connect={CONNECT}"),
    ]);
    virsh(&["start", &name]).unwrap();
    let on = backup(&vault, &dom, &[], true);
    assert_eq!(on["running"], true);
    assert_eq!(on["consistency"], "crash", "{on:#}");
    assert!(on["freeze_ms"].is_null(), "no freeze, no window: {on:#}");
    let text = on["warnings"].to_string();
    assert!(text.contains("could not be frozen"), "{on:#}");
    let d = disk(&on, "vda");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre\npost\n",
        "the hooks ran once, around the instant"
    );
    assert_eq!(
        d["job"]["stats"]["level"], "application-consistent",
        "hooks that succeeded make the point application-consistent, frozen or not: {d:#}"
    );
    assert!(
        d["full_read"]
            .as_str()
            .unwrap()
            .contains("recorded no checkpoint"),
        "{d:#}"
    );
    let p2 = d["point"]["id"].as_str().unwrap().to_string();
    restores_as(&vault, &format!("{name}-vda"), &p2, &exp, dir);
    // The guest is not left frozen: its disk takes writes.
    guest_write(&dom, 0, 0x52, 0, 4096);
}

/// The XML of domain `name` with a fixed `uuid` (a transient domain
/// created again is the same domain to its checkpoints only so).
fn domain_xml_uuid(name: &str, uuid: &str, disks: &[(&Path, &str)]) -> String {
    domain_xml(name, disks, "").replacen("</name>", &format!("</name><uuid>{uuid}</uuid>"), 1)
}

#[test]
fn swapped_image_files_are_read_whole_not_through_the_other_disks_bitmap() {
    if !libvirt_ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let vault = new_vault(dir, &[]);
    let (a, exp_a) = (dir.join("a.qcow2"), dir.join("exp-a-1.img"));
    let (b, exp_b) = (dir.join("b.qcow2"), dir.join("exp-b-1.img"));
    qcow2_image(&a, &exp_a, 8 * MIB, &[(0x11, 0, MIB)]);
    qcow2_image(&b, &exp_b, 8 * MIB, &[(0x21, 4 * MIB, MIB)]);
    let name = dom_name("swap");
    let uuid = format!("{:08x}-0000-4000-8000-00000000c0ff", std::process::id());
    let dom = create(
        dir,
        &name,
        &domain_xml_uuid(&name, &uuid, &[(&a, "qcow2"), (&b, "qcow2")]),
    );
    let (item_a, item_b) = (format!("{name}-vda"), format!("{name}-vdb"));
    let first = backup(&vault, &dom, &[], false);
    let cp1 = first["checkpoint"].as_str().unwrap().to_string();
    let point =
        |b: &serde_json::Value, t: &str| disk(b, t)["point"]["id"].as_str().unwrap().to_string();
    let (pa1, pb1) = (point(&first, "vda"), point(&first, "vdb"));

    // The guest writes to both disks: each image's bitmap marks its own
    // changes.
    let (exp_a2, exp_b2) = (dir.join("exp-a-2.img"), dir.join("exp-b-2.img"));
    std::fs::copy(&exp_a, &exp_a2).unwrap();
    std::fs::copy(&exp_b, &exp_b2).unwrap();
    guest_write(&dom, 0, 0x12, 2 * MIB, 65536);
    expect_write(&exp_a2, 0x12, 2 * MIB, 65536);
    guest_write(&dom, 1, 0x22, 6 * MIB, 65536);
    expect_write(&exp_b2, 0x22, 6 * MIB, 65536);

    // The domain is created again with the image files swapped (vda is
    // b.qcow2, vdb a.qcow2) and its checkpoint redefined, as libvirt
    // keeps it: cp1 still has a bitmap "of vda", but it lives in b.qcow2.
    let saved = dir.join("cp1.xml");
    std::fs::write(&saved, virsh(&["checkpoint-dumpxml", &name, &cp1]).unwrap()).unwrap();
    drop(dom);
    let dom = create(
        dir,
        &name,
        &domain_xml_uuid(&name, &uuid, &[(&b, "qcow2"), (&a, "qcow2")]),
    );
    virsh(&["checkpoint-create", &name, s(&saved), "--redefine"]).unwrap();
    assert_eq!(checkpoints(&dom), vec![cp1.clone()]);

    // No sampling: nothing but the images' identity can catch it.
    let second = backup(
        &vault,
        &dom,
        &["--cbt-sample", "0%", "--cbt-sample-min", "0"],
        true,
    );
    for (target, now, then) in [("vda", &b, &a), ("vdb", &a, &b)] {
        let d = disk(&second, target);
        assert!(d["incremental_from"].is_null(), "read whole: {d:#}");
        let why = d["full_read"].as_str().unwrap();
        assert!(
            why.contains(s(now)) && why.contains(s(then)) && why.contains(&cp1),
            "the warning names both images and the checkpoint: {d:#}"
        );
        assert!(
            d["job"].to_string().contains("recorded it as"),
            "the job carries the warning: {d:#}"
        );
    }
    let (pa2, pb2) = (point(&second, "vda"), point(&second, "vdb"));

    // The chain goes on from the new checkpoint, incrementally again.
    let cp2 = second["checkpoint"].as_str().unwrap().to_string();
    let exp_b3 = dir.join("exp-b-3.img");
    std::fs::copy(&exp_b2, &exp_b3).unwrap();
    guest_write(&dom, 0, 0x23, MIB, 4096);
    expect_write(&exp_b3, 0x23, MIB, 4096);
    let third = backup(
        &vault,
        &dom,
        &["--cbt-sample", "0%", "--cbt-sample-min", "0"],
        false,
    );
    assert_eq!(disk(&third, "vda")["incremental_from"], cp2.as_str());
    assert_eq!(disk(&third, "vdb")["incremental_from"], cp2.as_str());
    let (pa3, pb3) = (point(&third, "vda"), point(&third, "vdb"));

    // Every point is the disk at its instant.
    restores_as(&vault, &item_a, &pa1, &exp_a, dir);
    restores_as(&vault, &item_b, &pb1, &exp_b, dir);
    restores_as(&vault, &item_a, &pa2, &exp_b2, dir);
    restores_as(&vault, &item_b, &pb2, &exp_a2, dir);
    restores_as(&vault, &item_a, &pa3, &exp_b3, dir);
    restores_as(&vault, &item_b, &pb3, &exp_a2, dir);
}

#[test]
fn a_second_run_on_a_domain_being_backed_up_fails_at_once_with_exit_4() {
    if !libvirt_ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let vault = new_vault(dir, &[]);
    let b = dir.join("b.qcow2");
    let exp = dir.join("exp.img");
    qcow2_image(&b, &exp, 8 * MIB, &[(0x61, 0, MIB)]);
    let name = dom_name("busy");
    let dom = create(dir, &name, &domain_xml(&name, &[(&b, "qcow2")], ""));
    // The first run's pre-snapshot hook (run around the instant, with the
    // domain's lock held) says it started, then takes its time.
    let started = dir.join("hook-started");
    let hook = format!("sh -c 'touch {}; sleep 4'", started.display());
    ok(&[
        "protect",
        "--vault",
        s(&vault),
        "--item",
        &format!("{name}-vda"),
        "--policy",
        "DefaultPolicy",
        "--pre-snapshot",
        &hook,
        &format!("libvirt:///{name}/vda?connect={CONNECT}"),
    ]);
    let backup_args = |v: &Path| {
        [
            "--output",
            "json",
            "backup",
            "--vault",
            s(v),
            "--domain",
            &name,
            "--connect",
            CONNECT,
        ]
        .map(str::to_string)
    };
    let first = coffre()
        .args(backup_args(&vault))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !started.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the first run's hook never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A second vault of this host (its own registry), same domain.
    let other_dir = dir.join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = new_vault(&other_dir, &[]);
    let second = || {
        coffre()
            .env("COFFRE_REGISTRY", other_dir.join("registry"))
            .args(backup_args(&other))
            .output()
            .unwrap()
    };
    let mut first = first;
    let out = second();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        first.try_wait().unwrap().is_none(),
        "the second run failed while the first held the domain, without waiting for it"
    );
    assert!(err.contains(&name), "names the domain: {err}");
    assert!(
        err.contains(&format!("pid {}", first.id())),
        "names the holder: {err}"
    );
    assert!(err.contains("being backed up"), "{err}");

    let done = first.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let firsts: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    let d = disk(&firsts, "vda");
    assert_eq!(d["job"]["status"], "Completed", "{d:#}");
    assert_eq!(
        checkpoints(&dom),
        vec![firsts["checkpoint"].as_str().unwrap().to_string()]
    );
    let p = d["point"]["id"].as_str().unwrap().to_string();
    restores_as(&vault, &format!("{name}-vda"), &p, &exp, dir);

    // Once the first run is done, the other vault's goes through.
    let out = second();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(checkpoints(&dom).len(), 2, "one checkpoint per vault");
}

#[test]
fn a_backup_begin_that_fails_after_libvirt_started_the_job_leaves_no_job() {
    if !libvirt_ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let vault = new_vault(dir, &[]);
    let b = dir.join("b.qcow2");
    let exp = dir.join("exp.img");
    qcow2_image(&b, &exp, 8 * MIB, &[(0x71, MIB, MIB)]);
    let name = dom_name("lost");
    let dom = create(dir, &name, &domain_xml(&name, &[(&b, "qcow2")], ""));
    // The real virsh, whose answer to backup-begin is lost after libvirt
    // started the job (a connection that drops, a call that times out).
    let real = std::process::Command::new("sh")
        .args(["-c", "command -v virsh"])
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let wrapper = bin.join("virsh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n{real} \"$@\"\nrc=$?\ncase \" $* \" in *' backup-begin '*) echo 'error: Disconnected from {CONNECT} due to end of file' >&2; exit 1;; esac\nexit $rc\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = coffre()
        .env("PATH", &path)
        .args([
            "backup",
            "--vault",
            s(&vault),
            "--domain",
            &name,
            "--connect",
            CONNECT,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Disconnected"), "{err}");
    assert!(err.contains("it was ended"), "{err}");
    assert!(!has_backup_job(&dom), "no libvirt job is left running");

    // The next run starts clean (nothing to end) and builds the chain.
    let next = backup(&vault, &dom, &[], false);
    assert!(
        !next["warnings"].to_string().contains("killed coffre run"),
        "{next:#}"
    );
    assert_eq!(
        checkpoints(&dom),
        vec![next["checkpoint"].as_str().unwrap().to_string()],
        "the failed run's checkpoint is retired"
    );
    let p = disk(&next, "vda")["point"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    restores_as(&vault, &format!("{name}-vda"), &p, &exp, dir);
}

#[test]
fn a_remote_connection_is_refused_before_connecting() {
    // No libvirt needed: nothing connects (no ssh is started).
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    for cmd in [
        &["backup", "--vault", s(&vault)][..],
        &["protect", "--vault", s(&vault), "--policy", "DefaultPolicy"][..],
    ] {
        let mut args = cmd.to_vec();
        args.extend([
            "--domain",
            "web1",
            "--connect",
            "qemu+ssh://root@backup-host.invalid/system",
        ]);
        let start = Instant::now();
        let err = fails(&args, 1);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(err.contains("names host backup-host.invalid"), "{err}");
        assert!(err.contains("only domains of the host it runs on"), "{err}");
        assert!(err.contains("qemu:///system"), "{err}");
    }
}
