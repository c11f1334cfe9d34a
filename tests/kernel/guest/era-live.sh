#!/bin/sh
# The dm-era reader inside the guest, on the metadata device of a running era target
# (tests/kernel/guest_era_live.py, run with the host's Python over 9p).
# Usage: era-live.sh OUT META ORIGIN REPO
set -eu
out=$1 meta=$2 origin=$3 repo=$4
size=$(blockdev --getsz "$origin")
dmsetup create era_live --table "0 $size era $meta $origin 128"
[ -b /dev/mapper/era_live ] || { echo "no /dev/mapper/era_live"; exit 1; }
# klab-chroot sees the guest's /out as /mnt
KLAB_CWD=$repo klab-chroot .venv/bin/python -m tests.kernel.guest_era_live "/mnt/${out#/out/}" \
    "$meta" era_live 65536
dmsetup status era_live
dmsetup remove era_live
