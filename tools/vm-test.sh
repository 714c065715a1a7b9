#!/usr/bin/env bash
# A real VM on a qledger NBD export (issue 18, item 5): qemu-system-x86_64 (TCG) boots the
# machine's Debian kernel with a small busybox initramfs whose only disk is a qcow2 image
# served by `qledger nbd` over a Unix socket (-drive driver=nbd,server.type=unix,...). The
# guest makes an ext2 file system on it, writes a file, syncs, unmounts and powers off;
# qledger nbd then stops with its last client. Afterwards the image must check clean
# (qemu-img check) and the file must read back from it (debugfs on a raw copy).
#
# Needs qemu-system-x86, linux-image-amd64, busybox-static, e2fsprogs and cpio (Debian
# packages; .ci/run installs them where it can). Without them it says so loudly and exits 0,
# unless QLEDGER_REQUIRE_VM=1. Takes about a minute under TCG.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
qledger="$root/tools/qledger"

skip() {
  echo "*** vm-test: SKIPPED: $1 ***" >&2
  if [ "${QLEDGER_REQUIRE_VM:-}" = 1 ]; then exit 1; fi
  exit 0
}
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
command -v debugfs >/dev/null || skip "debugfs not found (apt-get install e2fsprogs)"
command -v cpio >/dev/null || skip "cpio not found"
# busybox-static's /bin/busybox (the dynamic busybox package would need its libraries in the initramfs)
busybox=/bin/busybox
[ -x "$busybox" ] && ! ldd "$busybox" >/dev/null 2>&1 || skip "a static busybox not found (apt-get install busybox-static)"
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -1 || true)
[ -n "$kernel" ] || skip "no kernel in /boot (apt-get install linux-image-amd64)"
kver=${kernel#/boot/vmlinuz-}
[ -d "/lib/modules/$kver" ] || skip "no modules for $kver"

work=$(mktemp -d /tmp/qledger-vm.XXXXXX)
trap 'kill "${srv:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

# --- the initramfs: busybox, the modules the disk and the file system need, and /init ---
ir="$work/initramfs"
mkdir -p "$ir"/{bin,dev,proc,sys,mnt,lib/modules}
cp "$busybox" "$ir/bin/busybox"
loads=()
# modprobe prints the insmod lines in dependency order ("builtin …" for what the kernel has)
while read -r verb path _; do
  [ "$verb" = insmod ] || continue
  name=$(basename "$path")
  # a module two of them need is loaded once
  case " ${loads[*]-} " in *" ${name%.*} "*|*" $name "*) continue ;; esac
  case "$name" in
    *.ko.xz) xz -dc "$path" > "$ir/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$path" > "$ir/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *) cp "$path" "$ir/lib/modules/$name" ;;
  esac
  loads+=("$name")
done < <(for m in virtio_pci virtio_blk ext4; do modprobe -S "$kver" --show-depends "$m" 2>/dev/null || true; done)
{
  echo '#!/bin/busybox sh'
  echo '/bin/busybox --install -s /bin'
  echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
  for m in "${loads[@]}"; do echo "insmod /lib/modules/$m 2>/dev/null"; done
  cat <<'EOF'
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
if [ -b /dev/vda ] && mke2fs -q -L qledger /dev/vda && mount -t ext2 /dev/vda /mnt; then
  echo 'written by a guest through qledger nbd' > /mnt/hello.txt
  dd if=/dev/urandom of=/mnt/random.bin bs=64k count=64 2>/dev/null
  sha=$(sha256sum /mnt/random.bin)
  sync; umount /mnt && echo "QLEDGER-VM-OK $sha"
else
  echo QLEDGER-VM-FAILED
fi
poweroff -f
EOF
} > "$ir/init"
chmod +x "$ir/init"
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initramfs.gz"

# --- the image, served by qledger nbd until its one client (the VM) disconnects ---
img="$work/disk.qcow2"
"$qledger" create -q -f qcow2 "$img" 64M
sock="$work/nbd.sock"
"$qledger" nbd -k "$sock" -f qcow2 "$img" &
srv=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "vm-test: qledger nbd did not start" >&2; exit 1; }

echo "vm-test: booting $kernel under TCG (${#loads[@]} modules in the initramfs)"
timeout 600 qemu-system-x86_64 -machine q35,accel=tcg -m 256 -nographic -no-reboot \
  -kernel "$kernel" -initrd "$work/initramfs.gz" -append 'console=ttyS0 panic=-1 quiet' \
  -drive "driver=nbd,server.type=unix,server.path=$sock,if=virtio,cache=writeback" \
  > "$work/console.log" 2>&1 || true
# qledger nbd stops after its last client, flushing and closing the image clean
for _ in $(seq 100); do kill -0 "$srv" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$srv" 2>/dev/null; then kill -TERM "$srv"; fi
wait "$srv" || { echo "vm-test: qledger nbd exited with an error" >&2; exit 1; }
srv=

line=$(grep -a 'QLEDGER-VM-' "$work/console.log" | tr -d '\r' | tail -1 || true)
case "$line" in
  QLEDGER-VM-OK*) ;;
  *) echo "vm-test: FAILED in the guest; console:" >&2; tail -30 "$work/console.log" >&2; exit 1 ;;
esac
guest_sha=$(echo "$line" | awk '{print $2}')

qemu-img check "$img"
"$qledger" convert -f qcow2 -O raw "$img" "$work/disk.raw"
text=$(debugfs -R 'cat /hello.txt' "$work/disk.raw" 2>/dev/null)
[ "$text" = 'written by a guest through qledger nbd' ] || { echo "vm-test: hello.txt reads '$text'" >&2; exit 1; }
debugfs -R 'dump /random.bin '"$work/random.bin" "$work/disk.raw" >/dev/null 2>&1
host_sha=$(sha256sum "$work/random.bin" | awk '{print $1}')
[ "$host_sha" = "$guest_sha" ] || { echo "vm-test: random.bin differs (guest $guest_sha, image $host_sha)" >&2; exit 1; }
echo "vm-test: PASS (the guest's file system and files read back from the image; qemu-img check clean)"
