//! SIGKILL at random moments of backups, prune, gc and replicate, on a
//! vault with two LRS replicas and a GRS secondary. After every kill:
//! the vault (and the secondary) verifies with `--read-data`, every point
//! acknowledged before the kill restores byte-identical, and the same
//! operation, run again, succeeds.
//!
//! `make test` runs `COFFRE_CRASH_RUNS` (default 20) runs from the fixed
//! seed `COFFRE_CRASH_SEED` (default 1); `make crash-test` runs from a
//! fresh seed until 200 runs were killed mid-operation
//! (`COFFRE_CRASH_KILLS`). Every run prints its seed, so a failure can be replayed
//! alone with `COFFRE_CRASH_SEED=<seed> COFFRE_CRASH_RUNS=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Backup,
    Prune,
    Gc,
    Replicate,
}

const OPS: [Op; 4] = [Op::Backup, Op::Prune, Op::Gc, Op::Replicate];

/// A point acknowledged to the user (its command exited 0), with a copy
/// of the image it must restore to, and whether prune may expire it.
struct Acked {
    id: String,
    image: PathBuf,
    expires: bool,
}

#[derive(Default)]
struct Tally {
    runs: u64,
    kills: u64,
    finished_first: u64,
    lost: u64,
    per_op: BTreeMap<String, (u64, u64)>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn at(minute: u64) -> String {
    format!("2027-01-01T{:02}:{:02}:00Z", minute / 60, minute % 60)
}

/// `coffre args…` at `now`, as a command (not yet run).
fn cmd(now: &str, args: &[&str]) -> Command {
    let mut c = coffre();
    c.env("COFFRE_NOW", now).args(args);
    c
}

fn ok_cmd(mut c: Command, what: &str, seed: u64) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "seed {seed}: {what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Restores point `id` from `from` (`vault` or `secondary`) and compares it
/// with `want`.
fn restores_identically(now: &str, vault: &str, id: &str, from: &str, want: &Path, seed: u64) {
    let out = want.with_extension(format!("{from}.restored"));
    ok_cmd(
        cmd(
            now,
            &[
                "restore",
                "--vault",
                vault,
                "--item",
                "vm",
                "--point",
                id,
                "--from",
                from,
                "--to",
                s(&out),
                "--force",
            ],
        ),
        &format!("restore of acknowledged point {id} from the {from}"),
        seed,
    );
    assert_same(&out, want);
}

fn op_args<'a>(op: Op, vault: &'a str, img: &'a str) -> Vec<&'a str> {
    match op {
        Op::Backup => vec![
            "backup",
            "--vault",
            vault,
            "--item",
            "vm",
            "--retain-until",
            "2099-01-01",
            img,
        ],
        Op::Prune => vec!["prune", "--vault", vault],
        Op::Gc => vec!["gc", "--vault", vault],
        Op::Replicate => vec!["replicate", "--vault", vault],
    }
}

/// One run: three acknowledged points, then `op` killed at a random
/// moment, then the checks, counted in `tally`.
fn run_one(seed: u64, tally: &mut Tally, durations: &mut BTreeMap<Op, Duration>) {
    let mut rng = Rng::new(seed);
    let t = tempfile::tempdir().unwrap();
    let (r1, r2, sec) = (
        t.path().join("r1"),
        t.path().join("r2"),
        t.path().join("sec"),
    );
    let vault = new_vault(
        t.path(),
        &[
            "--replica",
            s(&r1),
            "--replica",
            s(&r2),
            "--secondary",
            s(&sec),
        ],
    );
    let img = t.path().join("vm.img");
    mixed_image(&img, 6 << 20, seed);
    let mut acked: Vec<Acked> = Vec::new();
    let mut minute = 0;
    for i in 0..3u64 {
        if i > 0 {
            churn(&img, 24, 48 << 10, seed ^ (i << 32));
        }
        // Points alternate between expiring in January (prune removes
        // them at the February prune below) and being kept for good.
        let expires = i % 2 == 0;
        let until = if expires { "2027-01-02" } else { "2099-01-01" };
        let started = Instant::now();
        let out = ok_cmd(
            cmd(
                &at(minute),
                &[
                    "--output",
                    "json",
                    "backup",
                    "--vault",
                    s(&vault),
                    "--item",
                    "vm",
                    "--retain-until",
                    until,
                    s(&img),
                ],
            ),
            "backup",
            seed,
        );
        durations.insert(Op::Backup, started.elapsed());
        minute += 1;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let id = v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("seed {seed}: no point id in {v}"))
            .to_string();
        let copy = t.path().join(format!("acked-{i}.img"));
        std::fs::copy(&img, &copy).unwrap();
        acked.push(Acked {
            id,
            image: copy,
            expires,
        });
    }

    let op = OPS[rng.below(OPS.len() as u64) as usize];
    let now = match op {
        Op::Backup | Op::Replicate => at(minute),
        Op::Prune | Op::Gc => "2027-02-01T00:00:00Z".to_string(),
    };
    match op {
        // New data for the killed backup to write.
        Op::Backup => churn(&img, 64, 64 << 10, seed ^ 0xb4c4),
        // GC needs garbage: the expired points' chunks.
        Op::Gc => {
            ok_cmd(cmd(&now, &["prune", "--vault", s(&vault)]), "prune", seed);
        }
        Op::Prune | Op::Replicate => {}
    }
    let args = op_args(op, s(&vault), s(&img));
    // A random moment: up to what the operation took last (a
    // first guess of 60 ms: most operations on this small vault take less
    // than 150 ms, process start included).
    let typical = durations
        .get(&op)
        .copied()
        .unwrap_or(Duration::from_millis(60));
    let delay = Duration::from_micros(rng.below(typical.as_micros() as u64 + 1));
    let started = Instant::now();
    let mut child = cmd(&now, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Poll until the moment, so that an operation that finishes first
    // tells how long it really takes (the next moment is drawn from that).
    let mut finished_after = None;
    loop {
        if child.try_wait().unwrap().is_some() {
            finished_after = Some(started.elapsed());
            break;
        }
        let left = delay.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(1)));
    }
    let killed = finished_after.is_none();
    if killed {
        child.kill().unwrap(); // SIGKILL
    }
    let status = child.wait().unwrap();
    if !killed {
        assert!(status.success(), "seed {seed}: {op:?} failed unkilled");
    }
    tally.runs += 1;
    let e = tally.per_op.entry(format!("{op:?}")).or_default();
    e.0 += 1;
    if killed {
        tally.kills += 1;
        e.1 += 1;
    } else {
        tally.finished_first += 1;
        durations.insert(op, finished_after.unwrap_or(delay));
    }
    eprintln!(
        "crash_kill: seed {seed}: {op:?} {} after {} ms",
        if killed { "killed" } else { "finished" },
        delay.as_millis()
    );

    // 1. The vault verifies, every copy read.
    ok_cmd(
        cmd(&now, &["verify", "--vault", s(&vault), "--read-data"]),
        "verify after the kill",
        seed,
    );
    // 2. Every acknowledged point restores byte-identical (prune and gc
    //    may have removed the expired ones; nothing else).
    let listed: Vec<String> = json_at(&now, &["points", "--vault", s(&vault), "--item", "vm"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["tier"] != "Snapshot")
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    let may_expire = matches!(op, Op::Prune | Op::Gc);
    for a in &acked {
        if !listed.contains(&a.id) {
            if a.expires && may_expire {
                continue;
            }
            tally.lost += 1;
            panic!(
                "seed {seed}: acknowledged point {} is gone after a killed {op:?}",
                a.id
            );
        }
        restores_identically(&now, s(&vault), &a.id, "vault", &a.image, seed);
    }
    // 3. The same operation, run again, succeeds, and the vault still
    //    verifies.
    ok_cmd(cmd(&now, &args), "the operation after the kill", seed);
    ok_cmd(
        cmd(&now, &["verify", "--vault", s(&vault), "--read-data"]),
        "verify after the rerun",
        seed,
    );
    if op == Op::Replicate {
        // The secondary, on its own, holds every kept point.
        ok_cmd(
            cmd(
                &now,
                &[
                    "verify",
                    "--vault",
                    s(&vault),
                    "--read-data",
                    "--from",
                    "secondary",
                ],
            ),
            "verify of the secondary",
            seed,
        );
        let a = acked.last().unwrap();
        restores_identically(&now, s(&vault), &a.id, "secondary", &a.image, seed);
    }
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_point() {
    let runs = env_u64("COFFRE_CRASH_RUNS", 20);
    // With COFFRE_CRASH_KILLS=N, runs go on until N of them were killed
    // mid-operation (COFFRE_CRASH_RUNS is then the most it tries).
    let kills = env_u64("COFFRE_CRASH_KILLS", 0);
    let base = env_u64("COFFRE_CRASH_SEED", 1);
    eprintln!("crash_kill: {runs} runs (until {kills} kills) from seed {base}");
    let mut tally = Tally::default();
    let mut durations = BTreeMap::new();
    for i in 0..runs {
        if kills > 0 && tally.kills >= kills {
            break;
        }
        run_one(base.wrapping_add(i), &mut tally, &mut durations);
    }
    assert!(
        tally.kills >= kills,
        "only {} kills in {runs} runs",
        tally.kills
    );
    eprintln!(
        "crash_kill: {} runs, {} SIGKILLs, {} finished before the kill, {} points lost; per op (runs, kills): {:?}",
        tally.runs, tally.kills, tally.finished_first, tally.lost, tally.per_op
    );
    assert_eq!(tally.lost, 0);
    // (A replay of one seed may well finish before its kill.)
    assert!(
        tally.runs < 10 || tally.kills * 2 >= tally.runs,
        "only {} of {} runs were killed mid-operation: the kill moments are too late",
        tally.kills,
        tally.runs
    );
}
