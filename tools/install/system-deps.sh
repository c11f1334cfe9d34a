#!/usr/bin/env bash
# Install the Debian packages listed in system-packages.txt that are not installed yet.
# Needs root when something is missing; does nothing (and needs nothing) otherwise.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/system-packages.txt" | grep -v '^$')

missing=()
for pkg in "${wanted[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    echo "system packages: all ${#wanted[@]} present"
    exit 0
fi
if ((EUID != 0)); then
    echo "system packages missing: ${missing[*]}" >&2
    echo "run 'make install' as root (or: apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
