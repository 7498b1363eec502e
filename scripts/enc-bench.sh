#!/bin/bash
# Plain against encrypted vaults (aes-256-gcm, chacha20-poly1305) on two
# days of an image: full backup, day two, the default restore and the
# restore --from vault, ROUNDS rounds with the modes alternating, every
# restore compared with day two. Prints each mode's best and median wall
# time, its median CPU time and its ratios to plain (per-round median and
# best against best), and the bytes each day added.
#
#   scripts/enc-bench.sh BASE.img DAY2.img [ROUNDS]
#
# COFFRE (default target/release/coffre) is the binary; WORK (default a
# temporary folder on the images' filesystem) holds the vaults (about
# three times the images' size while it runs; removed at the end).
set -eu
base=${1:?usage: $0 BASE.img DAY2.img [ROUNDS]}
day2=${2:?usage: $0 BASE.img DAY2.img [ROUNDS]}
rounds=${3:-8}
coffre=$(realpath "${COFFRE:-target/release/coffre}")
work=${WORK:-$(mktemp -d "$(dirname "$(realpath "$base")")/enc-bench.XXXXXX")}
trap 'rm -rf "$work"' EXIT
cd "$work"
head -c 32 /dev/urandom > key && chmod 600 key
export COFFRE_KEY_FILE=$work/key
log=$work/times.txt
: > "$log"
timed() { /usr/bin/time -a -o "$log" -f "$1 %e %U %S" "${@:2}" > /dev/null 2> err || { cat err >&2; exit 1; }; }
for r in $(seq 1 "$rounds"); do
  for m in plain aes-256-gcm chacha20-poly1305; do
    rm -rf v area out.img "reg-$m"*
    export COFFRE_REGISTRY=$work/reg-$m
    if [ "$m" = plain ]; then enc=(); else enc=(--encryption "$m"); fi
    "$coffre" vault create --vault v --snapshot-area area "${enc[@]}" > /dev/null 2>&1
    cp "$base" work.img && sync
    timed "$r $m full" "$coffre" backup --vault v --item w work.img
    s1=$(du -sb v/segments | cut -f1)
    cp "$day2" work.img && sync
    timed "$r $m day2" "$coffre" backup --vault v --item w work.img
    s2=$(du -sb v/segments | cut -f1)
    echo "$r $m bytes $s1 $s2 0" >> "$log"
    sync
    timed "$r $m restore" "$coffre" restore --vault v --item w --to out.img
    cmp -s out.img "$day2" || { echo "round $r $m: the restore differs from $day2" >&2; exit 1; }
    rm -f out.img && sync
    timed "$r $m restore_vault" "$coffre" restore --vault v --item w --from vault --to out.img
    cmp -s out.img "$day2" || { echo "round $r $m: the restore --from vault differs from $day2" >&2; exit 1; }
    rm -f out.img
    echo "$r $m load $(cut -d' ' -f1 /proc/loadavg) 0 0" >> "$log"
  done
done
python3 - "$log" <<'PY'
import collections, statistics, sys
d = collections.defaultdict(lambda: collections.defaultdict(dict))
for line in open(sys.argv[1]):
    f = line.split()
    d[f[2]][f[1]][int(f[0])] = tuple(float(x) for x in f[3:])
modes = ["plain", "aes-256-gcm", "chacha20-poly1305"]
for k in ("full", "day2", "restore", "restore_vault"):
    print(k)
    for m in modes:
        v = d[k][m]
        wall = [x[0] for x in v.values()]
        cpu = [x[1] + x[2] for x in v.values()]
        line = f"  {m:18} best {min(wall):5.2f} s  median {statistics.median(wall):5.2f} s  cpu {statistics.median(cpu):5.2f} s"
        if m != "plain":
            p = d[k]["plain"]
            per_round = [p[r][0] / v[r][0] for r in v]
            line += f"  ratio to plain: median {statistics.median(per_round):.3f}, best/best {min(x[0] for x in p.values()) / min(wall):.3f}"
        print(line)
for m in modes:
    s1, s2, _ = next(iter(d["bytes"][m].values()))
    print(f"bytes {m:18} full {int(s1):,}  day two added {int(s2 - s1):,}")
print("load after each round:", " ".join(f"{x[0]:.2f}" for x in d["load"]["plain"].values()))
PY
