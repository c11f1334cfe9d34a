#!/bin/sh
# The guest side of test_guest_attach.py: a verify pattern written on the virtio disk DEV (its
# backend is `shadowblk attach`'s NBD endpoint) round after round while the host switches the
# volume over, each round read back from the disk (the page cache dropped) and compared, until
# the host creates OUT/stop; then the last round is checked once more and the kernel log is
# searched for block-layer errors. OUT/round is the last round verified (the host's progress
# probe); any error ends the script with a non-zero status.
# Usage: virtio-pattern.sh OUT DEV BLOCKS     (BLOCKS of 4 KiB per round)
out=$1 dev=$2 blocks=$3
fail() {
    echo "FAIL: $*"
    exit 1
}
pattern() { # the content of round $1: each 4 KiB block names its round and number
    i=0
    while [ "$i" -lt "$blocks" ]; do
        printf '%-4095s\n' "shadowblk round $1 block $i"
        i=$((i + 1))
    done
}
check() { # the disk holds /tmp/want (read from the device, not the page cache)
    sync
    echo 3 >/proc/sys/vm/drop_caches
    dd if="$dev" of=/tmp/got bs=65536 count=$((blocks / 16)) 2>/tmp/dd.err ||
        fail "reading round $1: $(cat /tmp/dd.err)"
    cmp /tmp/want /tmp/got >/tmp/cmp.out 2>&1 || fail "round $1 read back wrong: $(cat /tmp/cmp.out)"
}
round=0
while [ ! -e "$out/stop" ]; do
    round=$((round + 1))
    pattern "$round" >/tmp/want
    dd if=/tmp/want of="$dev" bs=65536 conv=notrunc,fsync 2>/tmp/dd.err ||
        fail "writing round $round: $(cat /tmp/dd.err)"
    check "$round"
    echo "$round" >"$out/round.tmp" && mv "$out/round.tmp" "$out/round"
    echo "round $round good at $(cut -d' ' -f1 /proc/uptime)s"
done
check "$round"
echo "final check of round $round good"
dmesg >"$out/dmesg"
if grep -iE 'I/O error|blk_update_request|Buffer I/O|critical (medium|target|nexus)|virtio_blk.*error' "$out/dmesg"; then
    fail "the kernel logged block errors"
fi
echo "rounds: $round, no I/O error"
