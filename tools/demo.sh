#!/usr/bin/env bash
# The main job, end to end: qledger creates an image over a backing file
# QEMU wrote, writes, zeroes and discards through its event-sourced engine
# (showing the metadata records of one write); qledger check and qemu-img
# check both call it clean and it equals what qemu-io makes of the same
# commands. A write-back cut short by a simulated power cut leaves leaks
# that the journal's recovery removes. Then the crash harness explores the
# crash states of a workload (and catches a deliberately broken ordering
# rule; the overlap index refuses a broken allocator's write), and the read side:
# QEMU writes a snapshotted, compressed image and qledger reads it back;
# qledger takes and applies a snapshot of it, and serves it over NBD.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "demo: needs qemu-img (apt-get install qemu-utils)"; exit 1; }
d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
q=tools/qledger

echo "== write: qledger create + qledger io, qemu-img create + qemu-io, same commands"
qemu-img create -q -f qcow2 -o cluster_size=4096 "$d/base.qcow2" 16M
qemu-io -c 'write -P 0x11 0 4M' "$d/base.qcow2" >/dev/null
$q create -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 "$d/ours.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 "$d/theirs.qcow2"
cmds=(-c 'write -P 0x22 1000 300000' -c 'write -z 64k 128k' -c 'discard 1M 512k' -c 'write -P 0x33 8M 1M' -c 'flush' -c 'truncate 32M' -c 'write -P 0x44 30M 64k')
$q io "${cmds[@]}" "$d/ours.qcow2" | grep -v ops
qemu-io "${cmds[@]}" "$d/theirs.qcow2" >/dev/null
echo "== qledger check and qemu-img check of qledger's image"; $q check "$d/ours.qcow2" && qemu-img check "$d/ours.qcow2"
echo "== qemu-img compare qledger's image with qemu-io's"; qemu-img compare "$d/ours.qcow2" "$d/theirs.qcow2"
echo "== the records of one write (library trace), first lines"
node --import ./node_modules/tsx/dist/esm/index.mjs --input-type=module -e "
  import { Image } from './src/index.ts';
  import { describe } from './src/journal/records.ts';
  const trace = [];
  const img = await Image.open('$d/ours.qcow2', { write: true, trace });
  await img.write(20 << 20, new Uint8Array(4096).fill(0x55));
  await img.close();
  for (const e of trace.slice(0, 18)) console.log('  ' + (e.type === 'record' ? describe(e.record) : e.type === 'write' ? 'device write ' + e.what + ' @0x' + e.offset.toString(16) + ' +' + e.length : e.type));
"

echo "== durable journal: a write-back cut after its first in-place phase (as by a power cut), then recovery"
qemu-img create -q -f qcow2 -o cluster_size=65536 "$d/crash.qcow2" 64G
node --import ./node_modules/tsx/dist/esm/index.mjs --input-type=module -e "
  import { openWriter } from './src/engine/writable.ts';
  const w = await openWriter('$d/crash.qcow2', { stopAfterPhase: 1 }); // test hook: stop the write-back there
  for (let i = 0; i < 64; i++) await w.write(i * 2 ** 30, new Uint8Array(4096).fill(i + 1));
  await w.flush().catch((e) => console.log('  ' + e.message));
  await w.abandon();
"
set +e; qemu-img check "$d/crash.qcow2" 2>&1 | tail -3; echo "  (qemu-img check exit ${PIPESTATUS[0]}: leaks only, what QEMU leaves after a crash too)"; set -e
$q journal dump "$d/crash.qcow2" | head -7
echo "  ..."
echo "-- a read-write open replays the committed transaction; then qemu-img check:"
$q io -c flush "$d/crash.qcow2"
qemu-img check "$d/crash.qcow2"

echo "== crash-test: every crash state of 10 random workloads, judged (no corruption, flushed data intact, no stale data, no leak after recovery)"
$q crash-test -o cluster_size=4k --random --runs 10 --seed 1 --max-states 200
echo "== crash-test with the fault switch that frees clusters before unmapping them (must fail)"
printf 'write -P 1 0 64k\nflush\ndiscard 0 64k\nwrite -P 2 128k 4k\nflush\n' > "$d/workload.txt"
if $q crash-test -o cluster_size=4k --workload "$d/workload.txt" --fault free-before-unmap --max-states 200 > "$d/fault.txt"; then
  echo "demo: the harness missed the fault"; exit 1
fi
grep -E '^(states|corruptions):' "$d/fault.txt"; grep -m1 '^FAIL' "$d/fault.txt"
echo "== crash-test with an allocator that hands out a live L2 table for data: the overlap index refuses the write (no corrupt state)"
$q crash-test -o cluster_size=4k --workload "$d/workload.txt" --fault alloc-live-l2 --max-states 100 > "$d/ol.txt"
grep -E '^(states|corruptions|workloads stopped)' "$d/ol.txt"; grep -m1 '^REFUSED' "$d/ol.txt"

echo "== read: QEMU writes a chained, snapshotted, compressed image; qledger reads it"
qemu-io -c 'write -c -P 0x22 6M 64k' "$d/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/top.qcow2"
qemu-io -c 'write -P 0x33 512k 64k' -c 'write -z 0 64k' "$d/top.qcow2" >/dev/null
qemu-img snapshot -c before "$d/top.qcow2"
qemu-io -c 'write -P 0x44 8M 1M' "$d/top.qcow2" >/dev/null
$q convert -O raw "$d/top.qcow2" "$d/ours.raw"; qemu-img convert -O raw "$d/top.qcow2" "$d/ref.raw"
cmp "$d/ours.raw" "$d/ref.raw" && echo "guest bytes: identical to qemu-img convert"
$q convert -O raw -l before "$d/top.qcow2" "$d/snap.raw"; qemu-img convert -O raw -l before "$d/top.qcow2" "$d/snapref.raw"
cmp "$d/snap.raw" "$d/snapref.raw" && echo "snapshot 'before': identical to qemu-img convert -l"
diff <($q map --output=json "$d/top.qcow2") <(qemu-img map --output=json "$d/top.qcow2") && echo "map --output=json: identical to qemu-img"
diff <($q info --output=json "$d/top.qcow2") <(qemu-img info --output=json "$d/top.qcow2") && echo "info --output=json: identical to qemu-img"

echo "== snapshots: qledger creates and applies one, QEMU reads the result"
$q snapshot -c mine "$d/top.qcow2"
qemu-io -c 'write -P 0x55 0 64k' "$d/top.qcow2" >/dev/null
$q snapshot -a mine "$d/top.qcow2"
qemu-img check -q "$d/top.qcow2" && echo "qemu-img check: clean"
$q convert -O raw "$d/top.qcow2" "$d/back.raw"
cmp "$d/back.raw" "$d/ours.raw" && echo "after snapshot -a: the guest reads as when the snapshot was taken"
qemu-img snapshot -l "$d/top.qcow2" | awk 'NR>2 {print "snapshot: " $2}'

echo "== nbd: qledger serves the image, qemu-io and nbdinfo use it"
if command -v nbdinfo >/dev/null; then
  $q nbd -t -k "$d/nbd.sock" "$d/top.qcow2" & nbd=$!
  for _ in $(seq 100); do [ -S "$d/nbd.sock" ] && break; sleep 0.05; done
  qemu-io -f raw -c 'read -P 0x33 512k 64k' "nbd+unix:///?socket=$d/nbd.sock" | head -1
  nbdinfo --map "nbd+unix:///?socket=$d/nbd.sock" | head -3
  kill -TERM $nbd; wait $nbd
  qemu-img check -q "$d/top.qcow2" && echo "after the server stopped: qemu-img check clean"
else
  echo "(nbdinfo not installed: apt-get install libnbd-bin)"
fi

echo "== bitmaps: a dirty bitmap qledger adds and keeps while it writes; qemu-nbd -B reads it back"
qemu-img create -q -f qcow2 "$d/inc.qcow2" 16M
$q bitmap --add -g 64k "$d/inc.qcow2" backup-1
$q io -c 'write -q -P 7 1M 100k' -c 'write -q -z 8M 64k' "$d/inc.qcow2"
qemu-img info "$d/inc.qcow2" | grep -A5 'bitmaps:'
if command -v nbdinfo >/dev/null; then
  qemu-nbd -r -t -k "$d/inc.sock" -B backup-1 "$d/inc.qcow2" & qn=$!
  for _ in $(seq 100); do [ -S "$d/inc.sock" ] && break; sleep 0.05; done
  nbdinfo --map=qemu:dirty-bitmap:backup-1 "nbd+unix:///?socket=$d/inc.sock"
  kill -TERM $qn; wait $qn 2>/dev/null || true
fi

echo "== dedup: QEMU writes the same 4 MiB three times; qledger dedup stores it once, QEMU still reads and checks it"
qemu-img create -q -f qcow2 "$d/dup.qcow2" 64M
qemu-io -c 'write -P 0x61 0 4M' -c 'write -P 0x61 8M 4M' -c 'write -P 0x61 16M 4M' -c 'write -P 0x62 32M 1M' "$d/dup.qcow2" >/dev/null
qemu-img convert -O raw "$d/dup.qcow2" "$d/dup-before.raw"
$q dedup "$d/dup.qcow2"
qemu-img check -q "$d/dup.qcow2" && echo "qemu-img check: clean"
qemu-img compare -q "$d/dup.qcow2" "$d/dup-before.raw" && echo "guest bytes: the same as before"
