#!/bin/bash
# Reading a point in place, against restoring it, on two days of an image
# (issue 24's figures), ROUNDS rounds, all in one run:
#   - the disk floor: `dd oflag=direct conv=fsync` of the restored data
#     bytes onto the same filesystem;
#   - the I/O floor: the same write while the tier's records (the
#     snapshot's packs, or the vault's segments: all points' records, a
#     little more than the point's) are read with O_DIRECT from the same
#     disk;
#   - the loaded floor: the same write while both cores decompress zstd
#     (`zstd -d` loops), as a restore's decoders keep them busy: on a VM
#     whose disk writes slow down when its cores are busy, this is the
#     floor of a restore that must decompress;
#   - `coffre restore` from the snapshot tier (the default) and --from
#     vault, page cache dropped (cold), each as a ratio to both floors;
#     and again with the tier's records in the page cache (warm);
#   - `qemu-img convert -t none` of `coffre export` (both tiers) into a
#     file on the same filesystem, as a ratio to the restore of that tier,
#     and again with `-W` (out-of-order writes);
#   - `qemu-img`'s own limit through NBD: the same convert from an export
#     whose cache already holds every block (it decodes nothing, reads
#     nothing from the disk); and that convert while the tier's records
#     are read from the same disk, then also with both cores busy: the
#     convert's I/O and loaded references, as the restore's floors are;
#   - `qemu-img`'s own limit, the same convert of the raw DAY2.img file:
#     cold (`-T none`, page cache dropped: it reads all the data blocks
#     from the same disk) and cached (the source costs nothing: the
#     fastest `qemu-img` writes this image here);
#   - random 4 KiB reads at queue depth 16 through the export (fio,
#     ioengine=nbd): cold (a fresh export, the whole image) and warm (a
#     second pass over a 32 MiB data region), in IOPS;
#   - the export's peak RSS (VmHWM) with the default cache.
# Every restore and every copy is compared with day two.
#
#   scripts/export-bench.sh BASE.img DAY2.img [ROUNDS]
#
# COFFRE (default target/release/coffre) is the binary; WORK (default a
# temporary folder on the images' filesystem) holds the vault and the
# copies (about twice the images' size; removed at the end). Needs
# qemu-img, nbdinfo, nbdcopy and fio (apt-get install qemu-utils libnbd-bin fio).
set -eu
base=${1:?usage: $0 BASE.img DAY2.img [ROUNDS]}
day2=${2:?usage: $0 BASE.img DAY2.img [ROUNDS]}
rounds=${3:-3}
coffre=$(realpath "${COFFRE:-target/release/coffre}")
for t in qemu-img nbdinfo nbdcopy fio zstd; do
  command -v "$t" >/dev/null || { echo "export-bench: $t missing (apt-get install qemu-utils libnbd-bin fio zstd)" >&2; exit 1; }
done
work=${WORK:-$(mktemp -d "$(dirname "$(realpath "$base")")/export-bench.XXXXXX")}
export_pid=
cleanup() { [ -n "$export_pid" ] && kill "$export_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
export COFFRE_REGISTRY=$work/registry
log=$work/times.txt
: > "$log"
# timed NAME CMD...: wall, user and system seconds appended to the log.
timed() { /usr/bin/time -a -o "$log" -f "$1 %e %U %S" "${@:2}" > /dev/null 2> err || { cat err >&2; exit 1; }; }

"$coffre" vault create --vault v --snapshot-area area > /dev/null 2>&1
cp --sparse=always "$base" work.img
"$coffre" backup --vault v --item w work.img > /dev/null 2>&1
cp --sparse=always "$day2" work.img
"$coffre" backup --vault v --item w work.img > /dev/null 2>&1
# What the loaded floor's cores decompress: 256 MiB of the image.
head -c $((256 << 20)) "$day2" | zstd -q -1 -c > load.zst
# start_load / stop_load: two zstd -d loops keep both cores busy meanwhile,
# as a restore's or an export's decoders do.
load_pids=()
start_load() {
  touch busy.flag
  for _ in 1 2; do (while [ -e busy.flag ]; do zstd -q -d -c load.zst > /dev/null; done) & load_pids+=($!); done
  sleep 0.3
}
stop_load() { rm -f busy.flag; wait "${load_pids[@]}"; load_pids=(); }
# busy_write NAME: the floor's write while both cores are busy.
busy_write() {
  start_load
  timed "$1" dd if=/dev/zero of=floor.bin bs=4M count=$((data / (4 << 20))) oflag=direct conv=fsync status=none
  stop_load
}
# records TIER: the files a restore from TIER reads its records from (the
# snapshot's packs, or the vault's segments).
records() {
  if [ "$1" = snapshot ]; then find area -type f -name '*.pack'; else ls v/segments/*.seg; fi
}
# read_records TIER: reads them with O_DIRECT, as a cold restore or export
# does (run it in the background).
read_records() {
  records "$1" | while read -r s; do dd if="$s" of=/dev/null bs=4M iflag=direct status=none; done
}
sock=$work/export.sock
uri="nbd+unix:///w?socket=$sock"

start_export() {
  "$coffre" export --vault v --item w --socket "$sock" "$@" > /dev/null 2> export.err &
  export_pid=$!
  for _ in $(seq 1 200); do nbdinfo --size "$uri" > /dev/null 2>&1 && return; sleep 0.05; done
  cat export.err >&2; exit 1
}
stop_export() { kill "$export_pid"; wait "$export_pid" || true; export_pid=; }
rss_kb() { awk '/VmHWM/ {print $2}' "/proc/$export_pid/status"; }

# fio NAME ARGS...: IOPS of a 4 KiB random-read run at depth 16.
fio_iops() {
  fio --name="$1" --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=16 \
    --output-format=json "${@:2}" 2> /dev/null \
    | python3 -c 'import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"]))'
}

for r in $(seq 1 "$rounds"); do
  for tier in snapshot vault; do
    rm -f out.img conv.img floor.bin
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    timed "$r $tier restore" "$coffre" restore --vault v --item w --from "$tier" --to out.img
    cmp out.img "$day2"
    data=$(du -B1 out.img | cut -f1)
    rm -f out.img; sync
    timed "$r $tier floor" dd if=/dev/zero of=floor.bin bs=4M count=$((data / (4 << 20))) oflag=direct conv=fsync status=none
    rm -f floor.bin; sync
    read_records "$tier" &
    timed "$r $tier iofloor" dd if=/dev/zero of=floor.bin bs=4M count=$((data / (4 << 20))) oflag=direct conv=fsync status=none
    wait $!
    rm -f floor.bin; sync
    busy_write "$r $tier loadedfloor"
    rm -f floor.bin; sync
    # Warm: the tier's own records in the page cache.
    records "$tier" | xargs -r cat > /dev/null
    timed "$r $tier restore-warm" "$coffre" restore --vault v --item w --from "$tier" --to out.img
    cmp out.img "$day2"
    rm -f out.img; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    start_export --from "$tier"
    timed "$r $tier export-convert" qemu-img convert -t none -O raw "$uri" conv.img
    cmp conv.img "$day2"
    rm -f conv.img
    echo "$r $tier rss-after-convert $(rss_kb) 0 0" >> "$log"
    stop_export
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    start_export --from "$tier"
    timed "$r $tier export-convert-W" qemu-img convert -W -t none -O raw "$uri" conv.img
    cmp conv.img "$day2"
    rm -f conv.img
    stop_export
    # qemu-img's own limit through NBD: an export that does no work (its
    # cache already holds every block, filled by nbdcopy), so only the
    # socket and qemu-img's own writer remain. Then the same convert with
    # what a cold export must do around it, done by others: the tier's
    # records read from the same disk (as the restore's I/O floor), and
    # those reads with both cores busy (as its loaded floor).
    start_export --from "$tier" --cache $(( $(stat -c %s "$day2") * 3 / 2 ))
    nbdcopy "$uri" null:
    for what in warm-export-convert warm-export-convert-io warm-export-convert-loaded; do
      rm -f conv.img; sync
      [ "$what" = warm-export-convert-loaded ] && start_load
      reader=
      [ "$what" != warm-export-convert ] && { read_records "$tier" & reader=$!; }
      timed "$r $tier $what" qemu-img convert -t none -O raw "$uri" conv.img
      [ -n "$reader" ] && wait "$reader"
      [ "$what" = warm-export-convert-loaded ] && stop_load
      cmp conv.img "$day2"
    done
    rm -f conv.img
    stop_export
    # qemu-img's own limit on this disk: the raw file, cold and cached.
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    timed "$r $tier raw-convert-cold" qemu-img convert -T none -t none -f raw -O raw "$day2" conv.img
    rm -f conv.img; sync
    cat "$day2" > /dev/null
    timed "$r $tier raw-convert-cached" qemu-img convert -t none -f raw -O raw "$day2" conv.img
    rm -f conv.img; sync
    # Random reads: a fresh export over the whole image (cold), then a
    # data region read twice (the second pass warm).
    start_export --from "$tier"
    echo "$r $tier iops-cold $(fio_iops cold --size="$(stat -c %s "$day2")" --runtime=10 --time_based) 0 0" >> "$log"
    region=$(nbdinfo --map "$uri" | awk '$3 == 0 && $2 >= 33554432 {print $1; exit}')
    region=${region:-0}
    fio_iops prime --offset="$region" --size=32M --rw=read --bs=1M > /dev/null
    echo "$r $tier iops-warm $(fio_iops warm --offset="$region" --size=32M --runtime=10 --time_based) 0 0" >> "$log"
    echo "$r $tier rss $(rss_kb) 0 0" >> "$log"
    stop_export
  done
done

echo "per round: ROUND TIER WHAT WALL USER SYS"
cat "$log"
python3 - "$log" "$rounds" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
val = {}
for r, tier, what, wall, *_ in rows:
    val.setdefault((tier, what), {})[int(r)] = float(wall)
def med(t, w): return st.median(val[(t, w)].values())
def ratio(t, a, b):
    return st.median(val[(t, a)][r] / val[(t, b)][r] for r in val[(t, a)])
print(f"rounds: {sys.argv[2]} (medians; ratios are per-round medians)")
print("| tier | restore s (cold) | floor s | restore/floor | I/O floor s | restore/I/O floor | loaded floor s | restore/loaded floor | warm restore s | warm/floor | warm/loaded floor | export convert s | restore/convert (export speed vs restore) | 4K QD16 IOPS cold | warm | export RSS MiB (convert, fio) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for t in ("snapshot", "vault"):
    print(f"| {t} | {med(t,'restore'):.2f} | {med(t,'floor'):.2f} | {ratio(t,'restore','floor'):.2f} | "
          f"{med(t,'iofloor'):.2f} | {ratio(t,'restore','iofloor'):.2f} | "
          f"{med(t,'loadedfloor'):.2f} | {ratio(t,'restore','loadedfloor'):.2f} | "
          f"{med(t,'restore-warm'):.2f} | {ratio(t,'restore-warm','floor'):.2f} | {ratio(t,'restore-warm','loadedfloor'):.2f} | "
          f"{med(t,'export-convert'):.2f} | {ratio(t,'restore','export-convert'):.2f} | "
          f"{med(t,'iops-cold'):.0f} | {med(t,'iops-warm'):.0f} | "
          f"{max(val[(t,'rss-after-convert')].values())/1024:.0f}, {max(val[(t,'rss')].values())/1024:.0f} |")
print()
print("| tier | restore s (cold) | export convert s | restore/convert | convert -W s | restore/convert -W | warm-export convert s | restore/warm-export convert | + records read s | + both cores busy s | restore/loaded warm-export | loaded warm-export/export convert | raw-file convert s: cold | cached | cold raw/export convert | cached raw/export convert |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for t in ("snapshot", "vault"):
    print(f"| {t} | {med(t,'restore'):.2f} | {med(t,'export-convert'):.2f} | {ratio(t,'restore','export-convert'):.2f} | "
          f"{med(t,'export-convert-W'):.2f} | {ratio(t,'restore','export-convert-W'):.2f} | "
          f"{med(t,'warm-export-convert'):.2f} | {ratio(t,'restore','warm-export-convert'):.2f} | "
          f"{med(t,'warm-export-convert-io'):.2f} | {med(t,'warm-export-convert-loaded'):.2f} | "
          f"{ratio(t,'restore','warm-export-convert-loaded'):.2f} | {ratio(t,'warm-export-convert-loaded','export-convert'):.2f} | "
          f"{med(t,'raw-convert-cold'):.2f} | {med(t,'raw-convert-cached'):.2f} | "
          f"{ratio(t,'raw-convert-cold','export-convert'):.2f} | {ratio(t,'raw-convert-cached','export-convert'):.2f} |")
PY
