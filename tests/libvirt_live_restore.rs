//! `coffre restore --live --domain` against a real libvirt 9.0 (started
//! here when it is not running): a transient domain with no guest OS and
//! two virtio disks, whose vdb is blank ("broken"), gets a 16 MiB point
//! back while it runs. coffre drives the domain's QEMU through libvirt's
//! QMP passthrough with the same steps as `--qmp`: the qcow2 target over
//! its export (whose socket QEMU's user, `libvirt-qemu`, may reach and
//! nobody else), given to vdb's device, and `block-stream` slowed with
//! `--speed`. The "guest" writes whole clusters through vdb's device
//! (HMP `qemu-io`) during the stream; coffre is killed (`kill -9`) once a
//! quarter is streamed, the job must still be there, and
//! `--resume --domain` serves the export again and follows the job to its
//! end. QEMU then quits cleanly (SIGTERM) and the target must equal the
//! point with the guest's writes applied (`qemu-img compare`) and have no
//! backing file (`qemu-img info`). Skipped with a message without root,
//! libvirt or QEMU.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coffre_engine::snapshotter::vm::stream::LiveNames;
use coffre_engine::store::holds::HoldStore;
use serde_json::Value;

use crate::common::libvirt::*;
use crate::common::qemu::{job_in, wait_until};
use crate::common::*;

/// One write: a whole qcow2 cluster (it never reads the backing).
const BLOCK: usize = 64 << 10;
/// Blocks of the disk (16 MiB).
const NBLOCKS: usize = 256;

/// A coffre run, killed if the test fails before it ends.
struct Run(std::process::Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The job `name`'s (status, offset, len), through libvirt's passthrough.
fn job_of(dom: &Dom, name: &str) -> Option<(String, u64, u64)> {
    let out = virsh(&[
        "qemu-monitor-command",
        &dom.name,
        r#"{"execute":"query-jobs"}"#,
    ])
    .unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    job_in(&v["return"], name)
}

#[test]
fn a_killed_live_restore_into_a_domain_resumes_and_the_target_is_the_point_with_the_guests_writes()
{
    if !libvirt_ready() {
        return;
    }
    let began = Instant::now();
    let t = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(t.path()).unwrap();
    let size = NBLOCKS * BLOCK;
    let mut expected = vec![0u8; size];
    Rng::new(0xd0e).fill(&mut expected);
    expected[4 << 20..6 << 20].fill(0);
    let img = dir.join("point.raw");
    std::fs::write(&img, &expected).unwrap();
    let vault = new_vault(&dir, &[]);
    ok(&["backup", "--vault", s(&vault), "--item", "vm", s(&img)]);
    let (a, b) = (dir.join("a.raw"), dir.join("broken.raw"));
    std::fs::File::create(&a).unwrap().set_len(1 << 20).unwrap();
    std::fs::File::create(&b)
        .unwrap()
        .set_len(size as u64)
        .unwrap();
    let name = dom_name("live");
    let dom = create(
        &dir,
        &name,
        &domain_xml(&name, &[(&a, "raw"), (&b, "raw")], ""),
    );
    let target = dir.join("restored.qcow2");
    let names = LiveNames::of(&target);
    let folder: PathBuf = std::env::temp_dir().join(format!("coffre-libvirt-live-{}", names.tag));
    let live_on = |device: &str, extra: &[&str]| -> Vec<String> {
        let mut a = live_args(s(&vault), &target);
        a.extend([
            "--domain",
            &name,
            "--connect",
            CONNECT,
            "--device",
            device,
            // vdb is a blank disk the running guest does not use.
            "--swap-running-disk",
        ]);
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect()
    };
    let live = |extra: &[&str]| live_on("vdb", extra);

    // A disk the domain does not have: refused, nothing left.
    let out = coffre().args(live_on("vdz", &[])).output();
    let out = out.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no disk \"vdz\"") && err.contains("vda, vdb"),
        "{err}"
    );
    assert!(!target.exists(), "{err}");

    // A target in a folder QEMU's user cannot enter: refused saying so,
    // and nothing left (no target, no node).
    let private = dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let hidden = private.join("t.qcow2");
    let out = coffre()
        .args(
            live(&[])
                .iter()
                .map(|a| if a == s(&target) { s(&hidden) } else { a }),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("let that user through"), "{err}");
    assert!(!hidden.exists(), "{err}");
    let hidden_folder = std::env::temp_dir().join(format!(
        "coffre-libvirt-live-{}",
        LiveNames::of(&hidden).tag
    ));
    assert!(!hidden_folder.exists(), "the export's folder goes too");

    let log = dir.join("first.log");
    let mut first = coffre()
        .args(live(&["--speed", "2M"]))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Run)
        .unwrap();
    wait_until("the stream job", || {
        job_of(&dom, &names.job).is_some_and(|(st, _, _)| st == "running")
    });
    // The export's socket: QEMU's user's alone, in a folder it may pass.
    let sock = std::fs::symlink_metadata(folder.join("nbd.sock")).unwrap();
    assert_eq!(sock.mode() & 0o777, 0o600);
    let qemu_uid = std::fs::metadata(&target).unwrap().uid();
    assert_ne!(qemu_uid, 0, "the target is handed to QEMU's user");
    assert_eq!(sock.uid(), qemu_uid);
    assert_eq!(std::fs::metadata(&folder).unwrap().mode() & 0o7777, 0o711);
    // The guest writes whole clusters through vdb's device, here and there.
    let writes: Vec<(u8, usize)> = (0..8)
        .map(|i| (200 + i as u8, (i * 31 + 5) % NBLOCKS))
        .collect();
    for (p, blk) in &writes {
        guest_write(&dom, 1, *p, (*blk * BLOCK) as u64, BLOCK as u64);
        expected[blk * BLOCK..(blk + 1) * BLOCK].fill(*p);
    }
    wait_until("a quarter streamed", || {
        job_of(&dom, &names.job).is_some_and(|(_, o, l)| o >= l / 4)
    });
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let killed = job_of(&dom, &names.job).expect("the job waits for the export");
    assert!(killed.0 == "running" && killed.1 < killed.2, "{killed:?}");
    let held: Vec<PathBuf> = HoldStore::new(&vault, None)
        .list()
        .unwrap()
        .into_iter()
        .map(|h| h.target)
        .collect();
    assert_eq!(held.len(), 1, "the killed run still holds its point");
    let first_log = std::fs::read_to_string(&log).unwrap();
    assert!(first_log.contains("--resume"), "{first_log}");
    assert!(
        first_log.contains("virtio-disk1 (disk vdb of domain"),
        "{first_log}"
    );

    let resumed_at = Instant::now();
    let out = coffre()
        .args(live(&["--resume", "--speed", "64M"]))
        .output()
        .unwrap();
    let resume_s = resumed_at.elapsed().as_secs_f64();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "resume: {stdout}\n{stderr}");
    println!("first run:\n{first_log}\nresumed run:\n{stderr}{stdout}");
    assert!(stdout.contains("complete (resumed)"), "{stdout}");
    assert!(
        stderr.contains("following QEMU's block-stream job"),
        "{stderr}"
    );
    assert_eq!(job_of(&dom, &names.job), None, "the job is dismissed");
    assert!(!folder.exists(), "the export's folder is removed");
    assert!(
        HoldStore::new(&vault, None).list().unwrap().is_empty(),
        "the point is no longer held"
    );

    // QEMU quits cleanly (SIGTERM: its qcow2 metadata written).
    virsh(&["destroy", &dom.name, "--graceful"]).unwrap();
    let exp = dir.join("expected.raw");
    std::fs::write(&exp, &expected).unwrap();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw", s(&target), s(&exp)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "the target is not the point with the guest's writes: {cmp:?}"
    );
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", s(&target)])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info.get("backing-filename"), None, "{info}");
    drop(dom);
    println!(
        "live restore into a domain: killed at {killed:?}, resumed run took {resume_s:.1} s; {:.1} s in all",
        began.elapsed().as_secs_f64()
    );
}
