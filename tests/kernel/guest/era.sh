#!/bin/sh
# dm-era in the guest: era target NAME over ORIGIN with its metadata on META, then OPS in order:
#   w:B or w:B-E  write era blocks B (or B..E-1) with O_DIRECT    c  checkpoint
#   s  take_metadata_snap                                          x  status line to OUT/status.N
# At the end: suspend + resume (commits the metadata), remove the target.
# Usage: era.sh OUT NAME META ORIGIN BLOCK_SECTORS OPS...
set -eu
out=$1 name=$2 meta=$3 origin=$4 bs=$5
shift 5
size=$(blockdev --getsz "$origin")
dmsetup create "$name" --table "0 $size era $meta $origin $bs"
dev=/dev/mapper/$name
[ -b "$dev" ] || { echo "no block node $dev"; exit 1; }
n=0
for op in "$@"; do
    case $op in
        w:*-*)
            range=${op#w:}
            b=${range%-*} e=${range#*-}
            dd if=/dev/urandom of="$dev" bs=$((bs * 512)) seek="$b" count=$((e - b)) \
                oflag=direct 2>/dev/null
            ;;
        w:*) dd if=/dev/urandom of="$dev" bs=$((bs * 512)) seek="${op#w:}" count=1 \
                oflag=direct 2>/dev/null ;;
        c) dmsetup message "$name" 0 checkpoint ;;
        s) dmsetup message "$name" 0 take_metadata_snap ;;
        x) n=$((n + 1)); dmsetup status "$name" >"$out/status.$n" ;;
        *) echo "unknown op $op"; exit 2 ;;
    esac
    echo "$op: $(dmsetup status "$name")"
done
dmsetup suspend "$name"
dmsetup resume "$name"
dmsetup status "$name" | tee "$out/status"
dmsetup remove "$name"
sync
