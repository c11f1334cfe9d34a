#!/bin/sh
# udev in the guest: the host's systemd-udevd in the host's userland (klab-chroot), on guest-only
# tmpfs mounts over its /run and /etc/udev/rules.d, the latter holding udev/90-shadowblk.rules;
# then tests/kernel/guest_udev.py (watcher, udevadm test, a tagged and an untagged device).
# Usage: udev.sh OUT REPO DISK PART_TAGGED PART_PLAIN
set -eu
out=$1 repo=$2
shift 2
mount -t tmpfs tmpfs /host/run
mount -t tmpfs tmpfs /host/etc/udev/rules.d
cp "/host$repo/udev/90-shadowblk.rules" /host/etc/udev/rules.d/
klab-chroot /usr/bin/env SYSTEMD_IGNORE_CHROOT=1 /lib/systemd/systemd-udevd --daemon \
    --resolve-names=never
udevd=$(pidof systemd-udevd)
trap 'kill $udevd; umount /host/etc/udev/rules.d; umount /host/run' EXIT
KLAB_CWD=$repo klab-chroot .venv/bin/python -m tests.kernel.guest_udev "/mnt/${out#/out/}" "$@"
