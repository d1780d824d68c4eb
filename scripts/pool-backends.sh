#!/usr/bin/env bash
# Measures the two pool backends DESIGN.md §8 chooses between, on one loop
# device made here (root; touches nothing else): fio through each against the
# raw pool device in the same run, and a snapshot against a full copy.
#   A. XFS (reflink) pool, each volume a sparse file attached as a loop
#      device with direct I/O: Block and Filesystem volumes, reflink copies.
#   B. btrfs pool, each volume a subvolume with a qgroup limit.
# Usage: scripts/pool-backends.sh [pool GiB (default 4)] [fio seconds (10)]
set -euo pipefail
GIB=${1:-4}
SECS=${2:-10}
command -v fio >/dev/null || { echo "needs fio (apt-get install fio)"; exit 1; }
work=$(mktemp -d /var/tmp/disklet-pool-XXXXXX)
# Loop devices backed by files under $work (found in sysfs: attach runs in
# command substitutions, whose variables do not reach this shell).
ours() {
  for f in /sys/block/loop*/loop/backing_file; do
    [ -e "$f" ] && grep -q "^$work/" "$f" && basename "$(dirname "$(dirname "$f")")"
  done | sort -r -V
}
cleanup() {
  set +e
  for d in $(ours); do [ "$d" != "$(basename "$pool")" ] && losetup -d "/dev/$d"; done
  for m in "$work"/mnt-*; do mountpoint -q "$m" && { umount "$m" || umount -l "$m"; }; done
  # The pool device may stay busy a moment after its filesystem is unmounted.
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    for d in $(ours); do losetup -d "/dev/$d" 2>/dev/null; done
    [ -z "$(ours)" ] && break
    sleep 0.3
  done
  rm -rf "$work"
}
pool=none
trap cleanup EXIT
attach() { losetup -f --show --direct-io=on "$1"; }

# fio one job; prints bandwidth MiB/s (seq) or IOPS (rand).
job() { # target rw bs depth size
  local out
  out=$(fio --name=j --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --size="$5" \
    --ioengine=libaio --direct=1 --time_based --runtime="$SECS" --group_reporting \
    --output-format=json 2>"$work/fio.err") || { echo "failed($(grep -o 'err=[^:]*: [^,]*' "$work/fio.err" | head -1 | tr ' ' _)) -"; return; }
  python3 -c '
import json, sys
j = json.loads(sys.stdin.read())["jobs"][0]
r = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print("%.0f %.0f" % (r["bw"] / 1024, r["iops"]))' <<<"$out"
}
suite() { # label target size
  local sw sr rw rr
  sw=$(job "$2" write 1M 8 "$3"); sr=$(job "$2" read 1M 8 "$3")
  rw=$(job "$2" randwrite 4k 32 "$3"); rr=$(job "$2" randread 4k 32 "$3")
  echo "$1|${sw% *}|${sr% *}|${rw#* }|${rr#* }"
}

truncate -s "${GIB}G" "$work/pool.img"
pool=$(attach "$work/pool.img")
volsize=$((GIB * 1024 / 4))M
rows=()
# Raw pool device, written over fully first so reads are of written blocks.
dd if=/dev/zero of="$pool" bs=1M count=$((GIB * 1024 / 4)) oflag=direct status=none
rows+=("$(suite "raw pool device ($pool)" "$pool" "$volsize")")

# A: XFS pool, volume = sparse file + loop (direct I/O).
mkfs.xfs -q -f -m reflink=1 "$pool"
mkdir -p "$work/mnt-xfs"; mount "$pool" "$work/mnt-xfs"
truncate -s "$volsize" "$work/mnt-xfs/vol-a"
vol=$(attach "$work/mnt-xfs/vol-a")
zero=$(cmp -n $((64 << 20)) "$vol" /dev/zero && echo yes || echo NO)
dd if=/dev/zero of="$vol" bs=1M count=$((GIB * 1024 / 4)) oflag=direct status=none
rows+=("$(suite "A: xfs file + loop, direct I/O" "$vol" "$volsize")")
losetup -d "$vol"
t0=$(date +%s.%N); cp --reflink=always "$work/mnt-xfs/vol-a" "$work/mnt-xfs/snap-a"; t1=$(date +%s.%N)
cp --reflink=never "$work/mnt-xfs/vol-a" "$work/mnt-xfs/copy-a"; sync; t2=$(date +%s.%N)
snapA=$(python3 -c "print(f'{($t1-$t0)*1000:.1f} ms reflink, {($t2-$t1)*1000:.0f} ms full copy')")
umount "$work/mnt-xfs"

# B: btrfs pool, volume = subvolume with a qgroup limit; fio on a file in it.
mkfs.btrfs -q -f "$pool"
mkdir -p "$work/mnt-btrfs"; mount "$pool" "$work/mnt-btrfs"
btrfs quota enable "$work/mnt-btrfs"
btrfs subvolume create "$work/mnt-btrfs/vol-b" >/dev/null
btrfs qgroup limit "$volsize" "$work/mnt-btrfs/vol-b"
rows+=("$(suite "B: btrfs subvolume + qgroup, file" "$work/mnt-btrfs/vol-b/data" "$((GIB * 1024 / 8))M")")
# Can a tenant overwrite a file of 90% of its limit? (CoW counts rewrites.)
rm -f "$work/mnt-btrfs/vol-b/data"; sync
n=$((GIB * 1024 / 4 * 9 / 10))
dd if=/dev/zero of="$work/mnt-btrfs/vol-b/full" bs=1M count=$n oflag=direct status=none; sync
quota=$(dd if=/dev/zero of="$work/mnt-btrfs/vol-b/full" bs=1M count=$n oflag=direct conv=notrunc status=none 2>&1 && echo ok || echo refused)
quota=${quota//$'\n'/ }
t0=$(date +%s.%N); btrfs subvolume snapshot "$work/mnt-btrfs/vol-b" "$work/mnt-btrfs/snap-b" >/dev/null; t1=$(date +%s.%N)
snapB=$(python3 -c "print(f'{($t1-$t0)*1000:.1f} ms snapshot')")
umount "$work/mnt-btrfs"

echo "pool ${GIB} GiB on a loop device (direct I/O), volumes of $volsize, fio ${SECS} s a job, libaio, O_DIRECT"
printf '%-38s %10s %10s %12s %12s\n' backend "seq W MiB/s" "seq R MiB/s" "rand W IOPS" "rand R IOPS"
base=${rows[0]}
for r in "${rows[@]}"; do
  IFS='|' read -r name a b c d <<<"$r"
  IFS='|' read -r _ ba bb bc bd <<<"$base"
  ratios=$(python3 - "$a" "$b" "$c" "$d" "$ba" "$bb" "$bc" "$bd" <<'PY'
import sys
v = sys.argv[1:]
def r(x, y):
    try:
        return "%.2f" % (float(x) / float(y))
    except ValueError:
        return "-"
print(" ".join(r(v[i], v[i + 4]) for i in range(4)))
PY
)
  printf '%-38s %10s %10s %12s %12s   ratio to raw %s\n' "$name" "$a" "$b" "$c" "$d" "$ratios"
done
echo "A: a new volume's first 64 MiB read as zeroes: $zero"
echo "A: snapshot of a ${volsize} volume fully written: $snapA"
echo "B: snapshot: $snapB"
echo "B: overwriting a file of 90% of the qgroup limit in place: $quota"
