#!/usr/bin/env bash
# The main job, end to end, as far as qledger goes today: QEMU writes an image
# with a backing chain, a snapshot and compressed data; qledger reads it back
# and must agree with qemu-img byte for byte. Writing, check and crash-testing
# land with the write-engine, check and crash-harness issues.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "demo: needs qemu-img (apt-get install qemu-utils)"; exit 1; }
d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
q=tools/qledger
qemu-img create -q -f qcow2 -o cluster_size=4096 "$d/base.qcow2" 16M
qemu-io -c 'write -P 0x11 0 1M' -c 'write -c -P 0x22 2M 64k' "$d/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/top.qcow2"
qemu-io -c 'write -P 0x33 512k 64k' -c 'write -z 0 64k' "$d/top.qcow2" >/dev/null
qemu-img snapshot -c before "$d/top.qcow2"
qemu-io -c 'write -P 0x44 8M 1M' "$d/top.qcow2" >/dev/null
echo "== qledger info"; $q info "$d/top.qcow2"
echo "== qledger map --output=json"; $q map --output=json "$d/top.qcow2"
echo "== qledger io"; $q io -r -c 'read -P 0x33 512k 64k' -c 'read -P 0x44 8M 4k' -c 'alloc 0 1M' "$d/top.qcow2"
$q convert -O raw "$d/top.qcow2" "$d/ours.raw"; qemu-img convert -O raw "$d/top.qcow2" "$d/ref.raw"
cmp "$d/ours.raw" "$d/ref.raw" && echo "== guest bytes: identical to qemu-img convert"
$q convert -O raw -l before "$d/top.qcow2" "$d/snap.raw"; qemu-img convert -O raw -l before "$d/top.qcow2" "$d/snapref.raw"
cmp "$d/snap.raw" "$d/snapref.raw" && echo "== snapshot 'before': identical to qemu-img convert -l"
diff <($q map --output=json "$d/top.qcow2") <(qemu-img map --output=json "$d/top.qcow2") && echo "== map --output=json: identical to qemu-img"
diff <($q info --output=json "$d/top.qcow2") <(qemu-img info --output=json "$d/top.qcow2") && echo "== info --output=json: identical to qemu-img"
