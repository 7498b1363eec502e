#!/usr/bin/env python3
"""Live-backup figures through a real QEMU (issue 22's acceptance 2).

    scripts/qemu-bench.py BASE.img DAY2.img [--coffre PATH] [--work DIR] [--runs N]

BASE and DAY2 are raw images of the same size (e.g. the shared bench's
base.img and day2.img). The script:

1. attaches a copy of BASE to a QEMU (TCG, no guest OS, CPUs stopped) as
   virtio device vda, and backs it up with `coffre backup --qmp` (a full
   backup through QEMU's fleecing export); the same image is backed up
   from the file (`coffre backup FILE`) into another vault: the local path.
   Each is run --runs times, alternating, in one run of the script;
2. writes DAY2's changes into the running VM through the device (HMP
   `qemu-io write -s`), so QEMU's dirty bitmap sees them as a guest's
   writes, then backs up day two through the bitmap: bytes read against
   the bytes that changed (4 KiB exact, and as the bitmap's 64 KiB
   granularity sees them);
3. restores day two and compares it with DAY2;
4. measures the freeze window with a stand-in guest agent (a thread that
   answers the agent protocol at once): what coffre adds to a freeze.

Prints one Markdown table. Needs qemu-system-x86_64 and qemu-img.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

BLOCK = 4096


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def coffre(bin_, *args):
    env = dict(os.environ, COFFRE_REGISTRY="off")
    r = subprocess.run([bin_, "--output", "json", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"coffre {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout) if r.stdout.strip() else None


class Qmp:
    def __init__(self, path):
        for _ in range(200):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.run("qmp_capabilities")

    def run(self, cmd, args=None):
        m = {"execute": cmd}
        if args is not None:
            m["arguments"] = args
        self.f.write(json.dumps(m) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{cmd}: {r['error']}")
            return r["return"]

    def hmp(self, line):
        out = self.run("human-monitor-command", {"command-line": line})
        if out:
            raise RuntimeError(f"{line}: {out}")


def changed_extents(a, b, size):
    """Extents (offset, length) where the two files differ, 4 KiB exact."""
    out = []
    step = 16 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for base in range(0, size, step):
            x, y = fa.read(step), fb.read(step)
            if x == y:
                continue
            for off in range(0, len(x), BLOCK):
                if x[off:off + BLOCK] != y[off:off + BLOCK]:
                    at = base + off
                    if out and out[-1][0] + out[-1][1] == at:
                        out[-1] = (out[-1][0], out[-1][1] + BLOCK)
                    else:
                        out.append((at, BLOCK))
    return out


def granular(extents, g):
    blocks = set()
    for off, n in extents:
        blocks.update(range(off // g, (off + n - 1) // g + 1))
    return len(blocks) * g


def fake_agent(path, log):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)

    def serve():
        while True:
            c, _ = srv.accept()
            f = c.makefile("rwb")
            frozen = False
            for line in f:
                line = line.lstrip(b"\xff").strip()
                if not line:
                    continue
                cmd = json.loads(line)
                name = cmd["execute"]
                log.append((name, time.monotonic()))
                if name == "guest-sync-delimited":
                    f.write(b"\xff" + json.dumps({"return": cmd["arguments"]["id"]}).encode() + b"\n")
                elif name == "guest-fsfreeze-status":
                    f.write(json.dumps({"return": "frozen" if frozen else "thawed"}).encode() + b"\n")
                elif name == "guest-fsfreeze-freeze":
                    frozen = True
                    f.write(b'{"return": 1}\n')
                elif name == "guest-fsfreeze-thaw":
                    frozen = False
                    f.write(b'{"return": 1}\n')
                f.flush()

    threading.Thread(target=serve, daemon=True).start()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("day2")
    p.add_argument("--coffre", default=shutil.which("coffre") or "target/release/coffre")
    p.add_argument("--work", default=None)
    p.add_argument("--runs", type=int, default=2)
    o = p.parse_args()
    size = os.path.getsize(o.base)
    assert size == os.path.getsize(o.day2), "the two images differ in size"
    work = tempfile.mkdtemp(prefix="coffre-qemu-bench-", dir=o.work)
    disk = os.path.join(work, "disk.raw")
    sh("cp", "--sparse=always", o.base, disk)
    qmp_sock, ctl_sock = os.path.join(work, "qmp.sock"), os.path.join(work, "ctl.sock")
    vm = subprocess.Popen(stdout=subprocess.DEVNULL, args=[
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-S", "-nodefaults", "-display", "none",
        "-qmp", f"unix:{qmp_sock},server=on,wait=off", "-qmp", f"unix:{ctl_sock},server=on,wait=off",
        "-blockdev", f"driver=file,filename={disk},node-name=disk0-file,cache.direct=off",
        "-blockdev", "driver=raw,file=disk0-file,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=vda",
    ])
    rows = []
    try:
        ctl = Qmp(ctl_sock)
        live_times, file_times = [], []
        for run in range(o.runs):
            for kind in ("file", "qmp"):
                v = os.path.join(work, f"vault-{kind}-{run}")
                # The snapshot a file backup keeps goes in the work folder,
                # removed with it (the default area outlives the vault).
                area = v + ".area"
                coffre(o.coffre, "vault", "create", "--vault", v, "--snapshot-area", area)
                src = ["--qmp", qmp_sock, "--drive", "vda"] if kind == "qmp" else [o.base]
                t = time.monotonic()
                b = coffre(o.coffre, "backup", "--vault", v, "--item", "disk", *src)
                dt = time.monotonic() - t
                (live_times if kind == "qmp" else file_times).append(dt)
                if kind == "qmp" and run == o.runs - 1:
                    live_vault, first = v, b
                else:
                    shutil.rmtree(v)
                    shutil.rmtree(area, ignore_errors=True)
        mib = size / (1 << 20)
        best_live, best_file = min(live_times), min(file_times)
        rows.append(("full backup through QEMU (best of %d)" % o.runs, f"{best_live:.2f} s", f"{mib / best_live:.0f} MiB/s"))
        rows.append(("full backup from the file (best of %d)" % o.runs, f"{best_file:.2f} s", f"{mib / best_file:.0f} MiB/s"))
        rows.append(("ratio QEMU / file", f"{best_file / best_live:.2f}x", "speed"))

        ext = changed_extents(o.base, o.day2, size)
        exact = sum(n for _, n in ext)
        src = os.path.join(work, "extent.bin")
        t = time.monotonic()
        with open(o.day2, "rb") as f:
            for off, n in ext:
                f.seek(off)
                with open(src, "wb") as s:
                    s.write(f.read(n))
                ctl.hmp(f'qemu-io -d /machine/peripheral/vda/virtio-backend "write -s {src} {off} {n}"')
        ctl.hmp('qemu-io -d /machine/peripheral/vda/virtio-backend "flush"')
        wrote = time.monotonic() - t
        t = time.monotonic()
        b2 = coffre(o.coffre, "backup", "--vault", live_vault, "--item", "disk", "--qmp", qmp_sock, "--drive", "vda")
        dt = time.monotonic() - t
        c = b2["cbt"]
        read = b2["stats"]["bytes_read"]
        sample = c["sampled"] * b2["block_size"]
        rows.append(("day-2 changes (4 KiB exact)", f"{exact / (1 << 20):.1f} MiB", f"{len(ext)} extents, written through the device in {wrote:.1f} s"))
        rows.append(("bitmap's dirty bytes (64 KiB granularity)", f"{c['dirty_bytes'] / (1 << 20):.1f} MiB", f"used={c['used']}, {c['dirty_blocks']} vault blocks"))
        rows.append(("day-2 bytes read", f"{read / (1 << 20):.1f} MiB", f"incl. the audit's sample {sample / (1 << 20):.1f} MiB ({c['sampled']} blocks, {c['mismatches']} mismatches)"))
        rows.append(("read / dirty bytes (bitmap's)", f"{read / c['dirty_bytes']:.3f}", f"without the sample: {(read - sample) / c['dirty_bytes']:.3f}"))
        rows.append(("read / changed bytes (4 KiB exact)", f"{read / exact:.3f}", f"without the sample: {(read - sample) / exact:.3f}"))
        rows.append(("day-2 backup through the bitmap", f"{dt:.2f} s", f"{b2['stats']['stored_bytes'] / (1 << 20):.1f} MiB stored"))

        out = os.path.join(work, "day2.restored")
        coffre(o.coffre, "restore", "--vault", live_vault, "--item", "disk", "--to", out)
        same = subprocess.run(["cmp", "-s", out, o.day2]).returncode == 0
        rows.append(("day-2 restore equals DAY2", "yes" if same else "NO", ""))
        os.unlink(out)

        log = []
        agent = os.path.join(work, "qga.sock")
        fake_agent(agent, log)
        windows = []
        for _ in range(5):
            b = coffre(o.coffre, "backup", "--vault", live_vault, "--item", "disk", "--qmp", qmp_sock,
                       "--drive", "vda", "--guest-agent", agent)
            windows.append(b["job"]["stats"]["freeze_ms"])
            level = b["level"]
        rows.append(("freeze window (5 backups, stand-in agent)", f"{min(windows)}-{max(windows)} ms", f"level {level}"))
    finally:
        vm.kill()
        vm.wait()
        shutil.rmtree(work, ignore_errors=True)
    print("| measure | value | note |\n|---|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
