#!/bin/sh
# Switchover in the guest: `shadowblk attach --dm` (dm-linear over the kernel NBD client, a table
# swap) and the userspace router (`shadowblk attach --listen`), under the same writer
# (tests/kernel/guest_switch.py). All three are the host's Python over 9p (klab-chroot), started
# at once: a start costs 10-60 s under TCG. The primary and the shadow are NBD servers on the host.
# The dm one follows the manager on the host (MANAGER, TOKEN): its first primary and the swap
# come from the manager's map; the router has a fixed --upstream and is repointed by hand.
# Usage: switch.sh OUT REPO PRIMARY_PORT SHADOW_PORT MANAGER TOKEN
set -eu
out=$1 repo=$2
mnt=/mnt/${out#/out/}
primary=nbd://$HOST:$3/vol shadow=nbd://$HOST:$4/vol
sbk() { KLAB_CWD=$repo klab-chroot .venv/bin/python -m shadowblk.cli "$@"; }
echo "$6" >"$out/token" # klab-chroot passes no environment
sbk attach vol --dm vm-vol --manager "$5" --token-file "$mnt/token" --poll 0.2 \
    --control 127.0.0.1:7001 >"$out/dm.out" &
dm=$!
sbk attach vol --listen 127.0.0.1:7010 --upstream "$primary" --control 127.0.0.1:7002 \
    >"$out/router.out" &
router=$!
trap 'kill $dm $router 2>/dev/null || true' EXIT
KLAB_CWD=$repo klab-chroot .venv/bin/python -m tests.kernel.guest_switch "$mnt" "$shadow" "$5" "$6"
wait $dm && wait $router # the driver stopped both (SIGTERM): they must exit cleanly
[ ! -e /dev/mapper/vm-vol ] || { echo "attach --dm left /dev/mapper/vm-vol"; exit 1; }
if dmesg | grep -i 'i/o error'; then exit 1; fi
