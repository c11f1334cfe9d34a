#!/bin/sh
# `shadowblk track --dm-era` in the guest (the host's Python over 9p, via klab-chroot): create
# the era target and checkpoint, writes at known blocks in two eras; then one process prints
# `--written-since` and ships to a shadow on the host while a writer runs, until SIGTERM (last
# suspended pass, drain). Two Python starts only: each costs 10-60 s under TCG.
# Usage: track.sh OUT META ORIGIN REPO SHADOW_PORT KEY
set -eu
out=$1 meta=$2 origin=$3 repo=$4 port=$5 key=$6
mnt=/mnt/${out#/out/} # the guest's /out is /mnt in the chroot
track() { KLAB_CWD=$repo klab-chroot .venv/bin/python -m shadowblk.cli -v track --dm-era trk "$@"; }
w() { dd if=/dev/urandom of=/dev/mapper/trk bs=65536 seek="$1" count="${2:-1}" oflag=direct 2>/dev/null; }
track --metadata "$meta" --origin "$origin" --era-block-size 64K --checkpoint >"$out/created.json"
[ -b /dev/mapper/trk ] || { echo "no /dev/mapper/trk"; exit 1; }
w 0; w 5; w 100
dmsetup message trk 0 checkpoint
w 7; w 511
dmsetup status trk
mkdir -p "$out/state"
since=$(sed 's/.*"era": \([0-9]*\).*/\1/' "$out/created.json")
(exec env KLAB_CWD="$repo" klab-chroot .venv/bin/python -m shadowblk.cli -v track --dm-era trk \
    --written-since "$since" --volume-id vol --state-dir "$mnt/state" --shadow "$HOST:$port" \
    --hmac-key-file "$key" --interval 0.5 --suspend-every 3 >"$out/ship.json" 2>"$out/ship.log") &
shipper=$! # the Python process itself (exec all the way down), so that SIGTERM reaches it
i=0
until grep -q '^ready' "$out/ship.json" 2>/dev/null; do
    i=$((i + 1))
    [ $i -lt 3000 ] || { echo "track never ready"; cat "$out/ship.log"; exit 1; }
    sleep 0.1
done
for round in 1 2 3 4 5 6; do # writes while passes run: new blocks and rewritten ones
    w $((round * 20)) 4
    w $((300 + round))
    w 5
    sleep 1
done
sleep 2
kill -TERM $shipper
wait $shipper || { echo "track failed"; tail -n 40 "$out/ship.log"; exit 1; }
tail -n 1 "$out/ship.json"
dmsetup status trk | tee "$out/status"
dmsetup remove trk
sync
