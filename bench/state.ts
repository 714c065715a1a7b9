/**
 * Cost of one metadata record applied to the immutable state (issue 3
 * targets: at most 30 us single, 1 us batched, with 64 KiB tables).
 * State: a 1,048,576-entry L1 (8 MiB, 128 chunks), 1024 loaded 64 KiB L2
 * tables, 64 loaded 64 KiB refcount blocks: a 64 TiB image's worth of
 * active metadata. No QEMU counterpart exists for this one.
 */

import { apply, applyAll, initialState, withLoaded, type MetaState } from '../src/state/state.ts';
import { geometryOf } from '../src/format/header.ts';
import type { MetaRecord } from '../src/journal/records.ts';

const cs = 65536;
const h = {
  version: 3 as const, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 2 ** 46, cryptMethod: 0, l1Size: 1 << 20,
  l1TableOffset: 0x100000, refcountTableOffset: 0x10000, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
  incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n, refcountOrder: 4, headerLength: 112, compressionType: 0,
  extraHeaderBytes: new Uint8Array(0),
};
const g = geometryOf(h);
const l1 = new Uint8Array(8 << 20);
const rt = new Uint8Array(cs);
let s: MetaState = initialState(g, { size: h.size, l1TableOffset: h.l1TableOffset, l1Size: h.l1Size, refcountTableOffset: h.refcountTableOffset, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0, incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n, nbBitmaps: 0, bitmapDirectorySize: 0, bitmapDirectoryOffset: 0 }, l1, rt);
for (let i = 0; i < 1024; i++) s = withLoaded(s, 'l2', i * 1000, new Uint8Array(cs));
for (let i = 0; i < 64; i++) s = withLoaded(s, 'refblock', i, new Uint8Array(cs));
// the reftable must point at the blocks for refcount records to be meaningful; the reducer reads blocks by slot
const Z = { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 };

function l2(i: number, table: number, val: number): MetaRecord {
  return { kind: 'l2', l1Index: table * 1000, table: 0, index: i % g.l2Entries, old: Z, new: { hi: 0x8000_0000, lo: val >>> 0, bitmapHi: 0, bitmapLo: 0 } };
}

/** Median over 5 rounds of n calls, after a warm-up. */
function bench(name: string, n: number, fn: (i: number) => void): number {
  for (let i = 0; i < Math.min(n, 200); i++) fn(i);
  const rounds: number[] = [];
  for (let r = 0; r < 5; r++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) fn(i);
    rounds.push(Number(process.hrtime.bigint() - t0) / 1e3 / n);
  }
  const us = rounds.sort((a, b) => a - b)[2]!;
  console.log(`${name.padEnd(58)} ${us.toFixed(2)} us (median of 5 rounds of ${n})`);
  return us;
}

// Single records: each is its own transaction, so each copies the table it touches.
bench('single L2 record (one 64 KiB table copied)', 5000, (i) => {
  apply(s, l2(i, i % 1024, 0x200000));
});
bench('single refcount record (one 64 KiB block copied)', 5000, (i) => {
  apply(s, { kind: 'refcount', cluster: (i % 64) * g.refcountBlockEntries + (i % 1000), old: 0, new: 1 });
});
bench('single L1 record (one 64 KiB L1 chunk copied)', 5000, (i) => {
  apply(s, { kind: 'l1', index: (i * 7919) % h.l1Size, old: { hi: 0, lo: 0 }, new: { hi: 0x8000_0000, lo: 0x50000 } });
});
// Batched: a transaction of 1000 records over 8 tables copies each table once.
const batch: MetaRecord[] = [];
for (let i = 0; i < 1000; i++) batch.push(l2(i, i % 8, 0x200000 + i * cs));
const perTx = bench('batched: one transaction of 1000 L2 records over 8 tables', 200, () => {
  applyAll(s, batch);
});
console.log(`${'  = per record'.padEnd(58)} ${(perTx / batch.length).toFixed(2)} us`);
