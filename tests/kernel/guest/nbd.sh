#!/bin/sh
# The kernel NBD client against a server on the host's loopback (10.0.2.2 from the guest):
# connect NBD_DEV to export NAME at PORT, read the host's marker at block 10, write a line at
# block 3 and read it back, time 8 MiB of O_DIRECT writes and reads, disconnect.
# Usage: nbd.sh OUT NBD_DEV PORT NAME
set -eu
out=$1 dev=$2 port=$3 name=$4
now() { /usr/bin/date +%s%N; }
t0=$(now)
nbd-client -N "$name" "$HOST" "$port" "$dev" -b 4096
t1=$(now)
echo "connect_us=$(((t1 - t0) / 1000))" >"$out/result"
echo "size=$(blockdev --getsize64 "$dev")" >>"$out/result"
dd if="$dev" bs=4096 skip=10 count=1 iflag=direct 2>/dev/null | head -n 1 >"$out/marker"
printf 'written-by-the-guest\n' | dd of="$dev" bs=4096 seek=3 conv=sync oflag=direct 2>/dev/null
dd if="$dev" bs=4096 skip=3 count=1 iflag=direct 2>/dev/null | head -n 1 >"$out/readback"
dd if=/dev/urandom of=/tmp/rand bs=1M count=8 2>/dev/null
t0=$(now)
dd if=/tmp/rand of="$dev" bs=1M seek=1 oflag=direct 2>/dev/null
t1=$(now)
dd if="$dev" of=/tmp/back bs=1M skip=1 count=8 iflag=direct 2>/dev/null
t2=$(now)
cmp /tmp/rand /tmp/back
md5sum </tmp/rand | cut -d' ' -f1 >"$out/md5"
echo "write_8MiB_ms=$(((t1 - t0) / 1000000))" >>"$out/result"
echo "read_8MiB_ms=$(((t2 - t1) / 1000000))" >>"$out/result"
sync
nbd-client -d "$dev"
cat "$out/result"
