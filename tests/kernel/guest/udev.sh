#!/bin/sh
# udev in the guest: the host's systemd-udevd in the host's userland (klab-chroot), on guest-only
# tmpfs mounts over its /run and /etc/udev/rules.d, the latter holding udev/90-shadowblk.rules;
# then tests/kernel/guest_udev.py (watcher, udevadm test, a tagged and an untagged device).
# The guest has no systemd: the rule's RUN calls the project's notify-device directly instead of
# through systemd-run (the rest of its command line as installed).
# Usage: udev.sh OUT REPO MANAGER TOKEN DISK PART_TAGGED PART_PLAIN
set -eu
out=$1 repo=$2
shift 2
mount -t tmpfs tmpfs /host/run
mount -t tmpfs tmpfs /host/etc/udev/rules.d
run="/usr/bin/systemd-run --no-block --quiet --collect /usr/local/bin/shadowblk "
sed "s#$run#$repo/.venv/bin/shadowblk #" "/host$repo/udev/90-shadowblk.rules" \
    >/host/etc/udev/rules.d/90-shadowblk.rules
grep -q "RUN+=\"$repo/.venv/bin/shadowblk notify-device" /host/etc/udev/rules.d/90-shadowblk.rules
klab-chroot /usr/bin/env SYSTEMD_IGNORE_CHROOT=1 /lib/systemd/systemd-udevd --daemon \
    --resolve-names=never
udevd=$(pidof systemd-udevd)
# udevd and its workers must be gone before /host/run can be unmounted: wait for them, and
# keep the test's own exit status (a busy unmount once failed a passing run).
cleanup() {
    rc=$?
    set +e
    kill $udevd 2>/dev/null
    for _ in $(seq 100); do pidof systemd-udevd >/dev/null || break; sleep 0.1; done
    umount /host/etc/udev/rules.d || umount -l /host/etc/udev/rules.d
    umount /host/run || umount -l /host/run
    exit $rc
}
trap cleanup EXIT
KLAB_CWD=$repo klab-chroot .venv/bin/python -m tests.kernel.guest_udev "/mnt/${out#/out/}" "$@"
