//! SIGKILL at random (seeded) moments of every command that writes to a
//! vault: backup, prune, gc, replicate, `vault rebuild-index` (from the
//! vault directory or from a replica), `verify --read-data --repair`,
//! `vault set --add-replica`, snapshot expiry (a prune that expires
//! snapshots but no point) and `restore --in-place`, on a vault with two
//! LRS replicas and a GRS secondary; and (in their own test, against a real
//! Azurite) `vault attach` and the shared-vault GC.
//!
//! After every kill: the next ordinary command (a backup) succeeds; then
//! `verify --read-data` passes, and every acknowledged point (its command
//! exited 0) restores byte-identical from every copy on its own: the
//! primary, each replica (a scratch copy of its directory opened as a
//! vault), and the secondary (the points replicated by an acknowledged
//! `replicate`). No copy shrinks below what was acknowledged: every
//! segment file of a copy keeps at least the size it had after the last
//! acknowledged command (unless the GC plan made before the kill deletes
//! or rewrites it), and every acknowledged point's manifest stays on every
//! copy. Then the killed command, run again, finishes.
//!
//! `make test` runs `COFFRE_CRASH_RUNS` (default 12, one per operation)
//! runs from the fixed seed `COFFRE_CRASH_SEED` (default 1) and
//! `COFFRE_CRASH_SHARED_RUNS` (default 2) shared-vault runs; `make
//! crash-test` runs from a fresh seed until `COFFRE_CRASH_KILLS` (and
//! `COFFRE_CRASH_SHARED_KILLS`) runs were killed mid-operation. The
//! operation of a run is `seed % 12` (every operation comes in turn); each
//! run prints its seed, so a failure can be replayed alone with
//! `COFFRE_CRASH_SEED=<seed> COFFRE_CRASH_RUNS=1`. A table of kills,
//! finished-first runs and lost points per operation ends each test.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Backup,
    Prune,
    Gc,
    Replicate,
    /// `replicate` after the secondary's replication state was lost: it
    /// must keep the secondary's bytes that check, never cut them.
    ReplicateStateLost,
    RebuildIndex,
    RebuildFromReplica,
    VerifyRepair,
    AddReplica,
    SnapshotExpiry,
    RestoreInPlace,
    /// `restore --in-place` from the point's snapshot (the default tier).
    RestoreInPlaceSnapshot,
}

const OPS: [Op; 12] = [
    Op::Backup,
    Op::Prune,
    Op::Gc,
    Op::Replicate,
    Op::ReplicateStateLost,
    Op::RebuildIndex,
    Op::RebuildFromReplica,
    Op::VerifyRepair,
    Op::AddReplica,
    Op::SnapshotExpiry,
    Op::RestoreInPlace,
    Op::RestoreInPlaceSnapshot,
];

/// A point acknowledged to the user (its command exited 0), with a copy
/// of the image it must restore to, and whether prune may expire it.
#[derive(Clone)]
struct Acked {
    id: String,
    image: PathBuf,
    expires: bool,
}

/// Kills, finished-first runs and lost points of one operation.
#[derive(Default, Clone, Copy)]
struct OpTally {
    runs: u64,
    kills: u64,
    finished_first: u64,
    lost: u64,
}

/// Counts per operation, and what went wrong.
#[derive(Default)]
pub struct Tally {
    per_op: BTreeMap<String, OpTally>,
    failures: Vec<String>,
}

impl Tally {
    fn kills(&self) -> u64 {
        self.per_op.values().map(|t| t.kills).sum()
    }
    fn runs(&self) -> u64 {
        self.per_op.values().map(|t| t.runs).sum()
    }
    fn lost(&self) -> u64 {
        self.per_op.values().map(|t| t.lost).sum()
    }
    fn op(&mut self, op: &str) -> &mut OpTally {
        self.per_op.entry(op.to_string()).or_default()
    }
    /// Prints the table and fails on any loss or failed check.
    fn finish(&self, what: &str, started: Instant, min_kills: u64) {
        let mut out = format!(
            "{what}: {} runs, {} SIGKILLs, {} lost points, in {:.0} s\n  {:<24} {:>6} {:>6} {:>9} {:>5}\n",
            self.runs(),
            self.kills(),
            self.lost(),
            started.elapsed().as_secs_f64(),
            "operation",
            "runs",
            "kills",
            "finished",
            "lost"
        );
        for (op, t) in &self.per_op {
            out.push_str(&format!(
                "  {op:<24} {:>6} {:>6} {:>9} {:>5}\n",
                t.runs, t.kills, t.finished_first, t.lost
            ));
        }
        eprint!("{out}");
        assert!(
            self.failures.is_empty(),
            "{} runs failed their checks:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
        assert_eq!(self.lost(), 0);
        assert!(
            self.kills() >= min_kills,
            "only {} kills in {} runs",
            self.kills(),
            self.runs()
        );
        // (A replay of one seed may well finish before its kill.)
        assert!(
            self.runs() < 10 || self.kills() * 2 >= self.runs(),
            "only {} of {} runs were killed mid-operation: the kill moments are too late",
            self.kills(),
            self.runs()
        );
    }
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Day `day` (0 = 2027-01-01) at `minute` past midnight.
fn at(day: u64, minute: u64) -> String {
    format!(
        "2027-01-{:02}T{:02}:{:02}:00Z",
        day + 1,
        minute / 60,
        minute % 60
    )
}

/// `coffre args…` at `now`, as a command (not yet run).
fn cmd(now: &str, args: &[&str]) -> Command {
    let mut c = coffre();
    c.env("COFFRE_NOW", now).args(args);
    c
}

/// Runs `c`; its stdout, or a description of its failure.
fn try_cmd(mut c: Command, what: &str) -> Result<String, String> {
    let out = c.output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn ok_cmd(c: Command, what: &str, seed: u64) -> String {
    try_cmd(c, what).unwrap_or_else(|e| panic!("seed {seed}: {e}"))
}

/// A backup of `img` at `now`, as JSON arguments.
fn backup_args<'a>(vault: &'a str, img: &'a str, until: &'a str) -> Vec<&'a str> {
    vec![
        "--output",
        "json",
        "backup",
        "--vault",
        vault,
        "--item",
        "vm",
        "--retain-until",
        until,
        img,
    ]
}

/// The point id in a backup's JSON output.
fn point_id(out: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(out).ok()?;
    v["id"].as_str().map(str::to_string)
}

/// Segment sizes and point manifests of one copy.
#[derive(Clone, Debug, Default)]
struct CopyState {
    segments: BTreeMap<String, u64>,
    manifests: BTreeSet<String>,
}

fn copy_state(dir: &Path) -> CopyState {
    let mut st = CopyState::default();
    if let Ok(entries) = std::fs::read_dir(dir.join("segments")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".seg") {
                st.segments
                    .insert(name, e.metadata().map_or(0, |m| m.len()));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir.join("points/vm")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".point") {
                st.manifests.insert(name);
            }
        }
    }
    st
}

/// A copy of the vault: its role in messages, its directory.
#[derive(Clone)]
struct CopyDir {
    name: &'static str,
    dir: PathBuf,
}

/// Everything one run knows.
struct Run {
    seed: u64,
    t: tempfile::TempDir,
    vault: PathBuf,
    img: PathBuf,
    copies: Vec<CopyDir>,
    acked: Vec<Acked>,
    /// Points the secondary holds (acknowledged by a replicate).
    on_secondary: Vec<String>,
    /// Each copy's state after the last acknowledged command.
    states: BTreeMap<&'static str, CopyState>,
    /// Problems found (each one a lost point or a failed check).
    problems: Vec<String>,
    lost: u64,
    n: u64,
}

impl Run {
    fn v(&self) -> &str {
        s(&self.vault)
    }

    /// An acknowledged backup at `now`.
    fn backup(&mut self, now: &str, until: &str, expires: bool) -> Result<(), String> {
        let out = try_cmd(
            cmd(now, &backup_args(self.v(), s(&self.img), until)),
            "backup",
        )?;
        let id = point_id(&out).ok_or_else(|| format!("no point id in {out}"))?;
        self.ack(id, expires);
        Ok(())
    }

    fn ack(&mut self, id: String, expires: bool) {
        let copy = self.t.path().join(format!("acked-{}.img", self.n));
        self.n += 1;
        std::fs::copy(&self.img, &copy).unwrap();
        self.acked.push(Acked {
            id,
            image: copy,
            expires,
        });
        self.record_states();
    }

    fn record_states(&mut self) {
        self.states = self
            .copies
            .iter()
            .map(|c| (c.name, copy_state(&c.dir)))
            .collect();
    }

    fn problem(&mut self, p: String) {
        eprintln!("crash_kill: seed {}: {p}", self.seed);
        self.problems.push(p);
    }

    /// The acknowledged points that must still be there after `op`.
    fn kept(&self, op: Op) -> Vec<Acked> {
        let may_expire = matches!(op, Op::Prune | Op::Gc);
        self.acked
            .iter()
            .filter(|a| !(a.expires && may_expire))
            .cloned()
            .collect()
    }

    /// Restores every point of `want` from `vault` (a copy's directory,
    /// opened on its own) with `--from from`, and compares.
    fn restore_all(&mut self, now: &str, vault: &Path, from: &str, copy: &str, want: &[Acked]) {
        for a in want {
            let out = self.t.path().join(format!("restored-{copy}-{from}.img"));
            let r = try_cmd(
                cmd(
                    now,
                    &[
                        "restore",
                        "--vault",
                        s(vault),
                        "--item",
                        "vm",
                        "--point",
                        &a.id,
                        "--from",
                        from,
                        "--to",
                        s(&out),
                        "--force",
                    ],
                ),
                &format!("restore of acknowledged point {} from the {copy}", a.id),
            );
            let same = r.and_then(|_| {
                let (x, y) = (std::fs::read(&out).unwrap(), std::fs::read(&a.image).unwrap());
                if x == y {
                    Ok(())
                } else {
                    Err(format!(
                        "acknowledged point {} restored from the {copy} differs from what was backed up",
                        a.id
                    ))
                }
            });
            if let Err(e) = same {
                self.lost += 1;
                self.problem(e);
            }
            let _ = std::fs::remove_file(&out);
        }
    }

    /// Every acknowledged point restores from every copy on its own.
    fn restore_everywhere(&mut self, now: &str, op: Op) {
        let kept = self.kept(op);
        let vault = self.vault.clone();
        self.restore_all(now, &vault, "vault", "primary", &kept);
        for c in self.copies.clone() {
            if c.name.starts_with('r') {
                // A replica opened on its own builds an index in its
                // directory: open a scratch copy instead.
                let scratch = self.t.path().join(format!("scratch-{}", c.name));
                let _ = std::fs::remove_dir_all(&scratch);
                let st = Command::new("cp")
                    .arg("-a")
                    .arg(&c.dir)
                    .arg(&scratch)
                    .status()
                    .unwrap();
                assert!(st.success());
                self.restore_all(now, &scratch, "vault", c.name, &kept);
                let _ = std::fs::remove_dir_all(&scratch);
            }
        }
        let on_sec: Vec<Acked> = kept
            .iter()
            .filter(|a| self.on_secondary.contains(&a.id))
            .cloned()
            .collect();
        self.restore_all(now, &vault, "secondary", "secondary", &on_sec);
    }

    /// No copy shrank below what the last acknowledged command left.
    /// `gc_may_remove`: segments the GC plan deletes or rewrites.
    fn no_copy_shrank(&mut self, op: Op, gc_may_remove: &BTreeSet<String>) {
        for c in self.copies.clone() {
            let Some(before) = self.states.get(c.name).cloned() else {
                continue;
            };
            let now = copy_state(&c.dir);
            for (seg, len) in &before.segments {
                if gc_may_remove.contains(seg) {
                    continue;
                }
                match now.segments.get(seg) {
                    None => self.problem(format!(
                        "the {} lost segment {seg} ({len} acknowledged bytes) after a killed {op:?}",
                        c.name
                    )),
                    Some(l) if l < len => self.problem(format!(
                        "the {}'s segment {seg} shrank from {len} to {l} bytes after a killed {op:?}",
                        c.name
                    )),
                    Some(_) => {}
                }
            }
            if !matches!(op, Op::Prune | Op::Gc) {
                for m in before.manifests.difference(&now.manifests) {
                    self.problem(format!(
                        "the {} lost point manifest {m} after a killed {op:?}",
                        c.name
                    ));
                }
            }
        }
    }

    /// `verify --read-data` (with `extra` arguments) passes.
    fn verifies(&mut self, now: &str, extra: &[&str], what: &str) {
        let mut args = vec!["verify", "--vault", self.v(), "--read-data"];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = try_cmd(cmd(now, &args), what) {
            self.problem(e);
        }
    }
}

fn op_args(op: Op, r: &Run, replica3: &Path, target: &Path) -> Vec<String> {
    let v = r.v().to_string();
    match op {
        Op::Backup => backup_args(&v, s(&r.img), "2099-01-01")
            .iter()
            .map(|x| x.to_string())
            .collect(),
        Op::Prune | Op::SnapshotExpiry => vec!["prune".into(), "--vault".into(), v],
        Op::Gc => vec!["gc".into(), "--vault".into(), v],
        Op::Replicate | Op::ReplicateStateLost => {
            vec!["replicate".into(), "--vault".into(), v]
        }
        Op::RebuildIndex => vec!["vault".into(), "rebuild-index".into(), "--vault".into(), v],
        Op::RebuildFromReplica => vec![
            "vault".into(),
            "rebuild-index".into(),
            "--vault".into(),
            v,
            "--from".into(),
            s(&r.copies[1].dir).into(),
        ],
        Op::VerifyRepair => vec![
            "verify".into(),
            "--vault".into(),
            v,
            "--read-data".into(),
            "--repair".into(),
        ],
        Op::AddReplica => vec![
            "vault".into(),
            "set".into(),
            "--vault".into(),
            v,
            "--add-replica".into(),
            s(replica3).into(),
        ],
        Op::RestoreInPlace | Op::RestoreInPlaceSnapshot => {
            let last = r.acked.last().unwrap();
            let mut a = vec![
                "restore".into(),
                "--vault".into(),
                v,
                "--item".into(),
                "vm".into(),
                "--point".into(),
                last.id.clone(),
                "--to".into(),
                s(target).into(),
                "--force".into(),
                "--in-place".into(),
            ];
            if op == Op::RestoreInPlace {
                a.extend(["--from".into(), "vault".into()]);
            }
            a
        }
    }
}

/// Flips a byte in the middle of the largest segment of `dir`.
fn damage_a_segment(dir: &Path, seed: u64) {
    let segs = segment_files(dir);
    let seg = segs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(seg).unwrap().len();
    let at = 4096 + Rng::new(seed).below(len - 8192);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(seg)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    f.sync_all().unwrap();
}

/// Spawns `c` and SIGKILLs it after `delay`, unless it ends first; then
/// whether it was killed, and its stdout when it finished.
fn kill_after(
    mut c: Command,
    delay: Duration,
) -> (bool, Duration, std::process::ExitStatus, String) {
    let started = Instant::now();
    let mut child: Child = c
        .stdout(Stdio::piped())
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
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    (killed, finished_after.unwrap_or(delay), status, out)
}

/// The moment of a kill: up to what the operation took last, or at first
/// a measured guess (process start included, on a 2-core machine that
/// runs other tests too). A kill that lands in the last fifth of that
/// time raises the estimate, so a slow operation is killed late too.
fn moment(rng: &mut Rng, durations: &mut BTreeMap<String, Duration>, op: &str) -> Duration {
    let guess = match op {
        "Backup" | "RestoreInPlace" => 150,
        "VerifyRepair" => 250,
        "Attach" => 600,
        "SharedGc" => 1200,
        _ => 80,
    };
    let typical = *durations
        .entry(op.to_string())
        .or_insert(Duration::from_millis(guess));
    let d = Duration::from_micros(rng.below(typical.as_micros() as u64 + 1));
    if d * 5 > typical * 4 {
        durations.insert(op.to_string(), typical * 11 / 10);
    }
    d
}

/// One run: three acknowledged points and a replication, then `op`
/// killed at a random moment, then the checks, counted in `tally`.
fn run_one(seed: u64, tally: &mut Tally, durations: &mut BTreeMap<String, Duration>) {
    let op = OPS[(seed % OPS.len() as u64) as usize];
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
    let copies = vec![
        CopyDir {
            name: "primary",
            dir: vault.clone(),
        },
        CopyDir {
            name: "r1",
            dir: r1.clone(),
        },
        CopyDir {
            name: "r2",
            dir: r2.clone(),
        },
        CopyDir {
            name: "secondary",
            dir: sec.clone(),
        },
    ];
    let mut r = Run {
        seed,
        t,
        vault,
        img,
        copies,
        acked: Vec::new(),
        on_secondary: Vec::new(),
        states: BTreeMap::new(),
        problems: Vec::new(),
        lost: 0,
        n: 0,
    };
    // Three days, one point a day. Points alternate between expiring
    // (prune at February 1 removes them) and being kept for good.
    for day in 0..3u64 {
        if day > 0 {
            churn(&r.img, 24, 48 << 10, seed ^ (day << 32));
        }
        let expires = day % 2 == 0;
        let until = if expires { "2027-01-10" } else { "2099-01-01" };
        let started = Instant::now();
        r.backup(&at(day, 0), until, expires)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        durations.insert(format!("{:?}", Op::Backup), started.elapsed());
    }
    ok_cmd(
        cmd(&at(2, 1), &["replicate", "--vault", r.v()]),
        "replicate",
        seed,
    );
    r.on_secondary = r.acked.iter().map(|a| a.id.clone()).collect();
    r.record_states();

    let now = match op {
        Op::Prune | Op::Gc => "2027-02-01T00:00:00Z".to_string(),
        // Instant-restore days are 2: the snapshots of days 0 and 1 expire,
        // day 2's stays; no point expires.
        Op::SnapshotExpiry => at(3, 6 * 60),
        _ => at(2, 10),
    };
    let replica3 = r.t.path().join("r3");
    let target = r.t.path().join("target.img");
    let mut gc_may_remove = BTreeSet::new();
    match op {
        // New data for the killed backup to write.
        Op::Backup => churn(&r.img, 64, 64 << 10, seed ^ 0xb4c4),
        // GC needs garbage: the expired points' chunks.
        Op::Gc => {
            ok_cmd(cmd(&now, &["prune", "--vault", r.v()]), "prune", seed);
            r.record_states();
            let plan: serde_json::Value = serde_json::from_str(&ok_cmd(
                cmd(
                    &now,
                    &["--output", "json", "gc", "--vault", r.v(), "--dry-run"],
                ),
                "gc --dry-run",
                seed,
            ))
            .unwrap();
            let segs = plan["segments"]
                .as_array()
                .or_else(|| plan["plan"]["segments"].as_array())
                .cloned()
                .unwrap_or_default();
            for sgm in segs {
                if sgm["action"] != "punch" {
                    gc_may_remove.insert(format!("{:016x}.seg", sgm["segment"].as_u64().unwrap()));
                }
            }
        }
        // A point the secondary does not hold yet.
        Op::Replicate | Op::ReplicateStateLost => {
            churn(&r.img, 16, 64 << 10, seed ^ 0x5e9);
            r.backup(&at(2, 5), "2099-01-01", false)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            if op == Op::ReplicateStateLost {
                std::fs::remove_file(sec.join("replication")).unwrap();
            }
        }
        // A bad copy of a chunk on the primary and another on a replica.
        Op::VerifyRepair => {
            damage_a_segment(&r.vault.clone(), seed);
            damage_a_segment(&r1, seed ^ 1);
        }
        // The target holds day 0's image; the restore brings day 2's.
        Op::RestoreInPlace | Op::RestoreInPlaceSnapshot => {
            std::fs::copy(&r.acked[0].image, &target).unwrap();
        }
        _ => {}
    }
    // The snapshot that must survive expiry: day 2's point.
    let young_snapshot = r.acked[2].clone();

    let name = format!("{op:?}");
    let args = op_args(op, &r, &replica3, &target);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let delay = moment(&mut rng, durations, &name);
    let (killed, took, status, out) = kill_after(cmd(&now, &args), delay);
    let t = tally.op(&name);
    t.runs += 1;
    if killed {
        t.kills += 1;
    } else {
        t.finished_first += 1;
        durations.insert(name.clone(), took);
    }
    eprintln!(
        "crash_kill: seed {seed}: {op:?} {} after {} ms",
        if killed { "killed" } else { "finished" },
        took.as_millis()
    );
    if !killed {
        let verify_found = op == Op::VerifyRepair && status.code() == Some(3);
        assert!(
            status.success() || verify_found,
            "seed {seed}: {op:?} failed unkilled ({status}): {out}"
        );
        if op == Op::Backup {
            r.ack(point_id(&out).expect("point id"), false);
        }
    }
    let pre_kill_states = r.states.clone();

    // 1. The next ordinary command: a backup. An interrupted rebuild may
    //    make it refuse (naming `rebuild-index`); it then succeeds once the
    //    rebuild is run again.
    churn(&r.img, 8, 32 << 10, seed ^ 0x0e47);
    let next = at(2, 20);
    let next = if matches!(op, Op::Prune | Op::Gc | Op::SnapshotExpiry) {
        now.clone()
    } else {
        next
    };
    // The checks compare with the states before this backup.
    let states = std::mem::take(&mut r.states);
    let mut first = r.backup(&next, "2099-01-01", false);
    if let Err(e) = &first
        && matches!(op, Op::RebuildIndex | Op::RebuildFromReplica)
        && e.contains("rebuild-index")
    {
        eprintln!(
            "crash_kill: seed {seed}: the backup refused after the killed rebuild; rebuilding"
        );
        if let Err(e) = try_cmd(cmd(&next, &args), "rebuild-index after the refusal") {
            r.problem(e);
        }
        first = r.backup(&next, "2099-01-01", false);
    }
    if let Err(e) = first {
        r.problem(format!("the backup after a killed {op:?}: {e}"));
    }
    let after_backup = std::mem::replace(&mut r.states, states);

    // 2. A killed repair left bad copies: the repair, run again, fixes them.
    if op == Op::VerifyRepair
        && let Err(e) = try_cmd(cmd(&next, &args), "verify --repair after the kill")
    {
        r.problem(e);
    }
    if op == Op::AddReplica {
        // The third replica joins once `add-replica`, run again, finishes.
        if let Err(e) = try_cmd(cmd(&next, &args), "add-replica after the kill") {
            r.problem(e);
        }
        r.copies.push(CopyDir {
            name: "r3",
            dir: replica3.clone(),
        });
    }

    // 3. The vault verifies, every copy read; the secondary on its own.
    r.verifies(&next, &[], "verify after the kill");
    r.verifies(&next, &["--from", "secondary"], "verify of the secondary");

    // 4. Every acknowledged point restores from every copy.
    r.restore_everywhere(&next, op);
    if op == Op::SnapshotExpiry {
        // The snapshot younger than the cutoff still restores.
        let young = vec![young_snapshot.clone()];
        let vault = r.vault.clone();
        r.restore_all(&next, &vault, "snapshot", "snapshot area", &young);
    }

    // 5. No copy shrank below what was acknowledged before the kill.
    r.states = pre_kill_states;
    r.no_copy_shrank(op, &gc_may_remove);
    r.states = after_backup;

    // 6. The killed command, run again, finishes.
    match op {
        Op::VerifyRepair | Op::AddReplica => {}
        Op::Backup => {}
        Op::RestoreInPlace | Op::RestoreInPlaceSnapshot => {
            match try_cmd(cmd(&next, &args), "the in-place restore after the kill") {
                Ok(_) => {
                    let (x, y) = (
                        std::fs::read(&target).unwrap(),
                        std::fs::read(&young_snapshot.image).unwrap(),
                    );
                    if x != y {
                        r.problem("the rerun in-place restore left a different image".into());
                    }
                }
                Err(e) => r.problem(e),
            }
        }
        _ => {
            if let Err(e) = try_cmd(cmd(&next, &args), "the operation after the kill") {
                r.problem(e);
            }
            if matches!(op, Op::Replicate | Op::ReplicateStateLost) {
                r.on_secondary = r.acked.iter().map(|a| a.id.clone()).collect();
                let sec_copy = r.vault.clone();
                let want = r.kept(op);
                r.restore_all(&next, &sec_copy, "secondary", "secondary", &want);
                r.verifies(&next, &["--from", "secondary"], "verify of the secondary");
            }
            r.verifies(&next, &[], "verify after the rerun");
        }
    }
    let t = tally.op(&name);
    t.lost += r.lost;
    if !r.problems.is_empty() {
        tally.failures.push(format!(
            "seed {seed} ({op:?}, {}): {}",
            if killed { "killed" } else { "finished" },
            r.problems.join("; ")
        ));
    }
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_point() {
    let runs = env_u64("COFFRE_CRASH_RUNS", OPS.len() as u64);
    // With COFFRE_CRASH_KILLS=N, runs go on until N of them were killed
    // mid-operation (COFFRE_CRASH_RUNS is then the most it tries).
    let kills = env_u64("COFFRE_CRASH_KILLS", 0);
    let base = env_u64("COFFRE_CRASH_SEED", 1);
    eprintln!("crash_kill: {runs} runs (until {kills} kills) from seed {base}");
    // `COFFRE_CRASH_JOBS` runs at once (make crash-test: 2).
    let jobs = env_u64("COFFRE_CRASH_JOBS", 1).max(1);
    // `COFFRE_CRASH_OP=AddReplica` runs only the seeds of that operation.
    let only = std::env::var("COFFRE_CRASH_OP").ok();
    let started = Instant::now();
    let next = std::sync::atomic::AtomicU64::new(0);
    let killed = std::sync::atomic::AtomicU64::new(0);
    let mut tally = Tally::default();
    let done: Vec<Tally> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                sc.spawn(|| {
                    let mut mine = Tally::default();
                    let mut durations = BTreeMap::new();
                    loop {
                        use std::sync::atomic::Ordering::SeqCst;
                        let i = next.fetch_add(1, SeqCst);
                        if i >= runs || (kills > 0 && killed.load(SeqCst) >= kills) {
                            break;
                        }
                        let seed = base.wrapping_add(i);
                        let op = OPS[(seed % OPS.len() as u64) as usize];
                        if only.as_ref().is_some_and(|o| *o != format!("{op:?}")) {
                            continue;
                        }
                        let before = mine.kills();
                        run_one(seed, &mut mine, &mut durations);
                        killed.fetch_add(mine.kills() - before, SeqCst);
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for t in done {
        for (op, o) in t.per_op {
            let e = tally.op(&op);
            e.runs += o.runs;
            e.kills += o.kills;
            e.finished_first += o.finished_first;
            e.lost += o.lost;
        }
        tally.failures.extend(t.failures);
    }
    tally.finish("crash_kill", started, kills);
}

/// What an `--add-replica` killed before the replica's config leaves (an
/// empty segments folder, maybe the identity) is finished by adding it
/// again; a folder holding anything else is still refused, untouched.
#[test]
fn an_interrupted_add_replica_is_finished_by_adding_it_again() {
    let t = tempfile::tempdir().unwrap();
    let vault = new_vault(t.path(), &[]);
    let img = t.path().join("vm.img");
    mixed_image(&img, 2 << 20, 3);
    let id = point_id(&ok(&[
        "--output",
        "json",
        "backup",
        "--vault",
        s(&vault),
        "--item",
        "vm",
        s(&img),
    ]))
    .unwrap();
    let left = t.path().join("left");
    std::fs::create_dir_all(left.join("segments")).unwrap();
    std::fs::write(left.join(".copy.tmp-77"), b"partial").unwrap();
    ok(&[
        "vault",
        "set",
        "--vault",
        s(&vault),
        "--add-replica",
        s(&left),
    ]);
    assert!(left.join("config").is_file());
    assert_eq!(segment_bytes(&left), segment_bytes(&vault));
    // Killed after the identity but before the config: the identity alone
    // made the copy "reusable", and the rerun left it without a config.
    ok(&[
        "vault",
        "set",
        "--vault",
        s(&vault),
        "--remove-replica",
        s(&left),
    ]);
    std::fs::remove_file(left.join("config")).unwrap();
    ok(&[
        "vault",
        "set",
        "--vault",
        s(&vault),
        "--add-replica",
        s(&left),
    ]);
    assert!(
        left.join("config").is_file(),
        "the re-added replica has no config"
    );
    let scratch = t.path().join("scratch");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&left)
            .arg(&scratch)
            .status()
            .unwrap()
            .success()
    );
    let restored = t.path().join("restored.img");
    ok(&[
        "restore",
        "--vault",
        s(&scratch),
        "--item",
        "vm",
        "--point",
        &id,
        "--from",
        "vault",
        "--to",
        s(&restored),
    ]);
    assert_eq!(
        std::fs::read(&restored).unwrap(),
        std::fs::read(&img).unwrap()
    );
    let other = t.path().join("other");
    std::fs::create_dir_all(other.join("segments")).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    let err = fails(
        &[
            "vault",
            "set",
            "--vault",
            s(&vault),
            "--add-replica",
            s(&other),
        ],
        1,
    );
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read(other.join("notes.txt")).unwrap(), b"mine");
}

/// The shared-vault operations, against a real Azurite.
mod shared {
    use super::*;
    use crate::object_store::Emulator;

    #[derive(Clone, Copy, Debug)]
    enum SharedOp {
        Attach,
        SharedGc,
    }

    /// A run on a vault in Azurite with two hosts: `keep` backed up twice
    /// by host 1, `drop` once by host 2, then deleted and pruned (garbage
    /// for the GC); then `op` killed at a random moment, the next backup,
    /// a verify and the restores of every acknowledged point through
    /// every host's cache.
    fn run_one(
        az: &Emulator,
        seed: u64,
        tally: &mut Tally,
        durations: &mut BTreeMap<String, Duration>,
    ) {
        let op = if seed.is_multiple_of(2) {
            SharedOp::Attach
        } else {
            SharedOp::SharedGc
        };
        let mut rng = Rng::new(seed);
        let t = tempfile::tempdir().unwrap();
        let store = format!("azure://devstoreaccount1/crash/run{seed}");
        let (h1, h2, h3) = (
            t.path().join("h1"),
            t.path().join("h2"),
            t.path().join("h3"),
        );
        az.ok(&[
            "vault",
            "create",
            "--store",
            &store,
            "--encryption",
            "none",
            "--vault",
            s(&h1),
            "--snapshot-area",
            s(&t.path().join("area")),
        ]);
        az.ok(&["vault", "attach", "--store", &store, "--vault", s(&h2)]);
        let (img, other) = (t.path().join("keep.img"), t.path().join("drop.img"));
        mixed_image(&img, 4 << 20, seed);
        random_file(&other, 2 << 20, seed ^ 7);
        let mut acked: Vec<(String, PathBuf)> = Vec::new();
        let mut backup = |host: &Path, item: &str, img: &Path, n: usize| -> Result<(), String> {
            let out = az.run(&[
                "--output",
                "json",
                "backup",
                "--vault",
                s(host),
                "--item",
                item,
                "--retain-until",
                "2099-01-01",
                s(img),
            ]);
            if !out.status.success() {
                return Err(format!(
                    "backup of {item} from {}: {}",
                    host.display(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            if item == "keep" {
                let id = point_id(&String::from_utf8_lossy(&out.stdout)).unwrap();
                let copy = img.with_extension(format!("acked-{n}"));
                std::fs::copy(img, &copy).unwrap();
                acked.push((id, copy));
            }
            Ok(())
        };
        backup(&h1, "keep", &img, 0).unwrap();
        churn(&img, 12, 48 << 10, seed ^ 3);
        backup(&h1, "keep", &img, 1).unwrap();
        backup(&h2, "drop", &other, 0).unwrap();
        az.ok(&[
            "unprotect",
            "--vault",
            s(&h1),
            "--item",
            "drop",
            "--delete-data",
        ]);
        let later =
            (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(30 * 86400)).to_string();
        let pruned = az
            .coffre()
            .env("COFFRE_NOW", &later)
            .args(["prune", "--vault", s(&h1)])
            .output()
            .unwrap();
        assert!(pruned.status.success(), "seed {seed}: prune");

        if matches!(op, SharedOp::SharedGc) {
            // A first GC condemns the dropped item's segments: the killed
            // one is the run that deletes them.
            az.ok(&["gc", "--vault", s(&h1)]);
        }
        let name = format!("{op:?}");
        let args: Vec<String> = match op {
            SharedOp::Attach => ["vault", "attach", "--store", &store, "--vault", s(&h3)]
                .iter()
                .map(|x| x.to_string())
                .collect(),
            SharedOp::SharedGc => ["gc", "--vault", s(&h2)]
                .iter()
                .map(|x| x.to_string())
                .collect(),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let delay = moment(&mut rng, durations, &name);
        let mut c = az.coffre();
        c.args(&args);
        let (killed, took, status, out) = kill_after(c, delay);
        let t_ = tally.op(&name);
        t_.runs += 1;
        if killed {
            t_.kills += 1;
        } else {
            t_.finished_first += 1;
            durations.insert(name.clone(), took);
            assert!(
                status.success(),
                "seed {seed}: {op:?} failed unkilled: {out}"
            );
        }
        eprintln!(
            "crash_kill shared: seed {seed}: {op:?} {} after {} ms",
            if killed { "killed" } else { "finished" },
            took.as_millis()
        );
        let mut problems = Vec::new();
        let mut lost = 0;
        // 1. The next ordinary command: a backup from host 1.
        churn(&img, 8, 32 << 10, seed ^ 0x0e47);
        if let Err(e) = backup(&h1, "keep", &img, 2) {
            problems.push(format!("the backup after a killed {op:?}: {e}"));
        }
        // 2. The vault verifies (garbage a later GC takes is the only
        //    warning a shared vault may show).
        let v = az.run(&[
            "--output",
            "json",
            "verify",
            "--vault",
            s(&h1),
            "--read-data",
        ]);
        if !v.status.success() {
            problems.push(format!(
                "verify after a killed {op:?}: {}{}",
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            ));
        }
        // 3. After a killed attach, attaching again finishes it; once the
        //    config was written, the cache is a vault (attach refuses it)
        //    and works as it is.
        let mut hosts = vec![h1.clone(), h2.clone()];
        if matches!(op, SharedOp::Attach) {
            let again = az.run(&args);
            if !again.status.success() {
                let err = String::from_utf8_lossy(&again.stderr).trim().to_string();
                eprintln!("crash_kill shared: seed {seed}: attach again refused: {err}");
                if !h3.join("config").exists() {
                    problems.push(format!(
                        "attach after a killed attach refused a cache without a config: {err}"
                    ));
                }
            }
            hosts.push(h3.clone());
        }
        // 4. Every acknowledged point restores through every host's cache.
        for h in &hosts {
            for (id, want) in &acked {
                let to = t.path().join("restored.img");
                let out = az.run(&[
                    "restore",
                    "--vault",
                    s(h),
                    "--item",
                    "keep",
                    "--point",
                    id,
                    "--from",
                    "vault",
                    "--to",
                    s(&to),
                    "--force",
                ]);
                let same = out.status.success()
                    && std::fs::read(&to).unwrap() == std::fs::read(want).unwrap();
                if !same {
                    lost += 1;
                    problems.push(format!(
                        "acknowledged point {id} does not restore through {}: {}",
                        h.display(),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                let _ = std::fs::remove_file(&to);
            }
        }
        // 5. The GC, run again, finishes, or (its hold on `gc/state` still
        //    live: the killed run never let it go) is refused naming the
        //    other GC; the points stay either way.
        if matches!(op, SharedOp::SharedGc) {
            for h in [&h2, &h1] {
                let out = az.run(&["gc", "--vault", s(h)]);
                let err = String::from_utf8_lossy(&out.stderr);
                if !(out.status.success() || killed && err.contains("another GC")) {
                    problems.push(format!("gc after the kill: {err}"));
                }
            }
            for (id, want) in &acked {
                let to = t.path().join("restored.img");
                let out = az.run(&[
                    "restore",
                    "--vault",
                    s(&h2),
                    "--item",
                    "keep",
                    "--point",
                    id,
                    "--from",
                    "vault",
                    "--to",
                    s(&to),
                    "--force",
                ]);
                if !(out.status.success()
                    && std::fs::read(&to).unwrap() == std::fs::read(want).unwrap())
                {
                    lost += 1;
                    problems.push(format!(
                        "acknowledged point {id} lost to the GC runs after the kill"
                    ));
                }
            }
        }
        for p in &problems {
            eprintln!("crash_kill shared: seed {seed}: {p}");
        }
        tally.op(&name).lost += lost;
        if !problems.is_empty() {
            tally.failures.push(format!(
                "seed {seed} ({op:?}, {}): {}",
                if killed { "killed" } else { "finished" },
                problems.join("; ")
            ));
        }
    }

    /// What an attach killed before its config leaves (an empty index
    /// folder, the pointer, the identity) is finished by attaching
    /// again; a folder holding anything else is still refused.
    fn a_killed_attach_is_finished_by_attaching_again(az: &Emulator) {
        let t = tempfile::tempdir().unwrap();
        let store = "azure://devstoreaccount1/crash/attach";
        let h1 = t.path().join("h1");
        az.ok(&[
            "vault",
            "create",
            "--store",
            store,
            "--encryption",
            "none",
            "--vault",
            s(&h1),
            "--snapshot-area",
            s(&t.path().join("area")),
        ]);
        let img = t.path().join("a.img");
        mixed_image(&img, 2 << 20, 5);
        az.ok(&["backup", "--vault", s(&h1), "--item", "a", s(&img)]);
        let left = t.path().join("left");
        std::fs::create_dir_all(left.join("index")).unwrap();
        std::fs::write(left.join(".remote.tmp-123"), b"partial").unwrap();
        let done = az.json(&["vault", "attach", "--store", store, "--vault", s(&left)]);
        assert_eq!(done["points"].as_u64(), Some(1), "{done}");
        let other = t.path().join("other");
        std::fs::create_dir_all(other.join("index")).unwrap();
        std::fs::write(other.join("notes.txt"), b"mine").unwrap();
        let refused = az.run(&["vault", "attach", "--store", store, "--vault", s(&other)]);
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("not empty"),
            "{}",
            String::from_utf8_lossy(&refused.stderr)
        );
        assert_eq!(std::fs::read(other.join("notes.txt")).unwrap(), b"mine");
    }

    #[test]
    fn sigkill_of_attach_and_shared_gc_loses_no_acknowledged_point() {
        let Some(az) = Emulator::azurite(&["crash"]) else {
            return;
        };
        a_killed_attach_is_finished_by_attaching_again(&az);
        let runs = env_u64("COFFRE_CRASH_SHARED_RUNS", 2);
        let kills = env_u64("COFFRE_CRASH_SHARED_KILLS", 0);
        let base = env_u64("COFFRE_CRASH_SEED", 1);
        eprintln!("crash_kill shared: {runs} runs (until {kills} kills) from seed {base}");
        let started = Instant::now();
        let mut tally = Tally::default();
        let mut durations = BTreeMap::new();
        for i in 0..runs {
            if kills > 0 && tally.kills() >= kills {
                break;
            }
            run_one(&az, base.wrapping_add(i), &mut tally, &mut durations);
        }
        tally.finish("crash_kill shared", started, kills);
    }
}
