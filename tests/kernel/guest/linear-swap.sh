#!/bin/sh
# A dm-linear device over OLD is moved to NEW (suspend, copy, load, resume) while a writer keeps
# rewriting a 1 MiB window with O_DIRECT; every write must succeed and the device must end with
# the writer's last complete pass. Time stamps around each step go to OUT/result.
# Usage: linear-swap.sh OUT OLD NEW
set -eu
out=$1 old=$2 new=$3
now() { /usr/bin/date +%s%N; }
size=$(blockdev --getsz "$old")
dmsetup create lin0 --table "0 $size linear $old 0"
[ -b /dev/mapper/lin0 ] || { echo "no /dev/mapper/lin0"; exit 1; }
for p in 0 1; do # two patterns of 256 blocks, each block headed "pass P block B"
    awk -v p=$p 'BEGIN { for (i = 0; i < 256; i++) printf "%-4095s\n", "pass " p " block " i }' \
        >/tmp/pat.$p
    [ "$(wc -c </tmp/pat.$p)" -eq 1048576 ] || { echo "bad pattern size"; exit 1; }
done
printf 'written-before-the-swap\n' | dd of=/dev/mapper/lin0 bs=4096 seek=4096 conv=sync \
    oflag=direct 2>/dev/null
(
    i=0
    while [ ! -e /tmp/stop ]; do
        dd if=/tmp/pat.$((i % 2)) of=/dev/mapper/lin0 bs=4096 oflag=direct 2>>/tmp/dd.err ||
            echo "write error in pass $i" >>/tmp/errors
        i=$((i + 1))
    done
    echo $i >/tmp/passes
) &
writer=$!
sleep 2
t0=$(now)
dmsetup suspend lin0
t1=$(now)
dd if="$old" of="$new" bs=1M count=17 2>/dev/null # the window and the marker, while suspended
t2=$(now)
dmsetup load lin0 --table "0 $size linear $new 0"
t3=$(now)
dmsetup resume lin0
t4=$(now)
sleep 2
touch /tmp/stop
wait $writer
passes=$(cat /tmp/passes)
{
    echo "suspend_us=$(((t1 - t0) / 1000))"
    echo "copy_us=$(((t2 - t1) / 1000))"
    echo "load_us=$(((t3 - t2) / 1000))"
    echo "resume_us=$(((t4 - t3) / 1000))"
    echo "paused_us=$(((t4 - t0) / 1000))"
    echo "passes=$passes"
    echo "table=$(dmsetup table lin0)"
} | tee "$out/result"
[ ! -s /tmp/errors ] || { cat /tmp/errors /tmp/dd.err; exit 1; }
last=$(((passes - 1) % 2))
dd if=/dev/mapper/lin0 bs=4096 count=256 iflag=direct 2>/dev/null | cmp - /tmp/pat.$last
dd if="$new" bs=4096 count=256 iflag=direct 2>/dev/null | cmp - /tmp/pat.$last
marker=$(dd if=/dev/mapper/lin0 bs=4096 skip=4096 count=1 iflag=direct 2>/dev/null | head -n 1)
[ "$marker" = written-before-the-swap ] || { echo "marker lost: '$marker'"; exit 1; }
if dmesg | grep -i 'i/o error'; then exit 1; fi
dmsetup remove lin0
echo "swap ok: $passes passes, last pattern $last intact on $new"
