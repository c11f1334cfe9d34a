#!/bin/bash
# Build the kernel lab's base initramfs: busybox, the device-mapper / dm-era / NBD / virtio / 9p
# modules of the installed Debian kernel, dmsetup, nbd-client and coreutils date (for %N stamps).
# Usage: build-initramfs.sh KVER OUT.cpio.gz      (the Python driver caches OUT by kernel version)
set -euo pipefail
kver=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
# top-level modules; their dependencies come from the host's modprobe --show-depends
mods="virtio_pci virtio_blk virtio_net crc32c_generic libcrc32c dm-mod dm-bufio
      dm-persistent-data dm-era nbd loop 9pnet_virtio 9p"
bins="/usr/sbin/dmsetup /usr/sbin/nbd-client /usr/bin/date"

root=$(mktemp -d "${out}.root.XXXXXX")
trap 'rm -rf "$root" "$out.tmp"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,out,etc,klab,lib/modules/$kver}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf /bin/busybox "$root/bin/$applet"
done
ln -sf /bin/busybox "$root/sbin/modprobe" # the kernel's request_module() runs /sbin/modprobe

for m in $mods; do
    modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++' | while read -r ko; do
    dest=$root/lib/modules/$kver/${ko#/lib/modules/$kver/}
    mkdir -p "$(dirname "$dest")"
    case $ko in
        *.xz) xz -dc "$ko" >"${dest%.xz}" ;;
        *.zst) zstd -dc "$ko" >"${dest%.zst}" ;;
        *) cp "$ko" "$dest" ;;
    esac
done
cp "/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$kver/"
depmod -b "$root" "$kver" # modules.dep for this subset: busybox modprobe reads it

copy_with_libs() {
    mkdir -p "$root$(dirname "$1")"
    cp -L "$1" "$root$1"
    for lib in $(ldd "$1" | awk '/=>/ { print $3 } /^\t\// { print $1 }'); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
for b in $bins; do copy_with_libs "$b"; done
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
install -m 0755 "$here/init" "$root/init"
install -m 0755 "$here/klab-chroot" "$root/usr/bin/klab-chroot"

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$out.tmp"
mv "$out.tmp" "$out"
