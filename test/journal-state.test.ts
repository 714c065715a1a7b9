/**
 * Records, their codec and journal-format.md; the reducer's immutability and
 * copy-once-per-transaction; the ordering of an operation's trace.
 */

import { describe, it, expect, afterAll } from 'vitest';
import fc from 'fast-check';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { decodeRecord, encodeRecord, RECORD_TYPE, RECORD_LENGTH } from '../src/journal/codec.ts';
import type { JournalRecord, MetaRecord } from '../src/journal/records.ts';
import { apply, applyAll, initialState, readL2Word, RecordMismatchError, withLoaded, type MetaState } from '../src/state/state.ts';
import { geometryOf } from '../src/format/header.ts';
import { Image } from '../src/engine/image.ts';
import type { TraceEvent } from '../src/engine/writer.ts';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';

const u32 = fc.integer({ min: 0, max: 0xffff_ffff });
const off = fc.integer({ min: 0, max: 2 ** 53 - 1 });
const word = fc.record({ hi: u32, lo: u32 });
const l2w = fc.record({ hi: u32, lo: u32, bitmapHi: u32, bitmapLo: u32 });
const record: fc.Arbitrary<JournalRecord> = fc.oneof(
  fc.record({ kind: fc.constant('refcount' as const), cluster: off, old: off, new: off }),
  fc.record({ kind: fc.constant('l2' as const), l1Index: u32, table: off, index: u32, old: l2w, new: l2w }),
  fc.record({ kind: fc.constant('l1' as const), index: u32, old: word, new: word }),
  fc.record({ kind: fc.constant('l1-swap' as const), oldOffset: off, oldSize: u32, newOffset: off, newSize: u32 }),
  fc.record({ kind: fc.constant('reftable' as const), index: u32, old: off, new: off }),
  fc.record({ kind: fc.constant('reftable-swap' as const), oldOffset: off, oldClusters: u32, newOffset: off, newClusters: u32 }),
  fc.record({ kind: fc.constant('table-new' as const), role: fc.constantFrom('l2' as const, 'refblock' as const), slot: u32, offset: off, copyOf: off }),
  fc.record({
    kind: fc.constant('header' as const),
    field: fc.constantFrom('size' as const, 'incompatible_features' as const, 'compatible_features' as const, 'autoclear_features' as const),
    old: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
    new: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
  }),
  fc.record({ kind: fc.constant('data' as const), host: off, length: off }),
  fc.constant({ kind: 'barrier' as const }),
  fc.record({ kind: fc.constant('begin' as const), tx: off, op: fc.string({ maxLength: 40 }) }),
  fc.record({ kind: fc.constant('commit' as const), tx: off }),
  fc.record({ kind: fc.constant('image' as const), role: fc.constantFrom('l1' as const, 'reftable' as const, 'l2' as const), offset: off, bytes: fc.uint8Array({ maxLength: 64 }) }),
  fc.record({ kind: fc.constant('unjournalled' as const), records: off }),
  fc.integer({ min: 0, max: 40 }).chain((n) =>
    fc.record({
      kind: fc.constant('refcounts' as const),
      rt: off,
      index: fc.array(fc.nat({ max: 0xffff_ffff }), { minLength: n, maxLength: n }).map((a) => Uint32Array.from(a)),
      old: fc.array(off, { minLength: n, maxLength: n }).map((a) => Float64Array.from(a)),
      new: fc.array(off, { minLength: n, maxLength: n }).map((a) => Float64Array.from(a)),
    }),
  ),
  fc.integer({ min: 0, max: 20 }).chain((n) =>
    fc.record({
      kind: fc.constant('l2s' as const),
      l1Index: fc.nat({ max: 0xffff_ffff }),
      table: off,
      index: fc.array(fc.nat({ max: 0xffff_ffff }), { minLength: n, maxLength: n }).map((a) => Uint32Array.from(a)),
      old: fc.array(fc.nat({ max: 0xffff_ffff }), { minLength: 4 * n, maxLength: 4 * n }).map((a) => Uint32Array.from(a)),
      new: fc.array(fc.nat({ max: 0xffff_ffff }), { minLength: 4 * n, maxLength: 4 * n }).map((a) => Uint32Array.from(a)),
    }),
  ),
);

describe('record codec', () => {
  it('every record round-trips', () => {
    fc.assert(
      fc.property(record, (r) => {
        const b = encodeRecord(r);
        expect(b.length % 8).toBe(0);
        const d = decodeRecord(b);
        expect(d.length).toBe(b.length);
        expect(d.record).toEqual(r);
      }),
    );
  });

  it('journal-format.md lists the same type codes and lengths as the codec', () => {
    const doc = readFileSync(join(import.meta.dirname, '..', 'journal-format.md'), 'utf8');
    const rows = [...doc.matchAll(/^\|\s*(\d+)\s*\|\s*([a-z0-9-]+)\s*\|\s*([^|]+?)\s*\|$/gm)].map((m) => [Number(m[1]), m[2]!, m[3]!] as const);
    expect(rows.length).toBe(Object.keys(RECORD_TYPE).length);
    for (const [code, name, len] of rows) {
      expect(RECORD_TYPE[name as keyof typeof RECORD_TYPE], name).toBe(code);
      if (name !== 'begin' && name !== 'image' && name !== 'refcounts' && name !== 'l2s') expect(String(RECORD_LENGTH[name as keyof typeof RECORD_LENGTH]), name).toBe(len);
      expect(doc, `section for type ${code}`).toMatch(new RegExp(`### Type ${code}:`));
    }
  });

  it('unknown types and truncated records are FormatErrors naming the offset', () => {
    expect(() => decodeRecord(new Uint8Array(8).fill(99))).toThrow(/type at offset 0x0: unknown record type 99/);
    expect(() => decodeRecord(encodeRecord({ kind: 'refcount', cluster: 1, old: 0, new: 1 }).subarray(0, 16))).toThrow(/truncated/);
  });
});

function smallState(): MetaState {
  const h = {
    version: 3 as const, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 1 << 30, cryptMethod: 0, l1Size: 2,
    l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
    incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n, refcountOrder: 4, headerLength: 112, compressionType: 0,
    extraHeaderBytes: new Uint8Array(0),
  };
  const g = geometryOf(h);
  const l1 = new Uint8Array(16);
  l1[0] = 0x80;
  l1[6] = 0x04; // L1[0] -> 0x40000, COPIED
  const rt = new Uint8Array(65536);
  rt[6] = 0x02; // block at 0x20000
  let s = initialState(g, { size: h.size, l1TableOffset: h.l1TableOffset, l1Size: 2, refcountTableOffset: h.refcountTableOffset, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0, incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n, nbBitmaps: 0, bitmapDirectorySize: 0, bitmapDirectoryOffset: 0 }, l1, rt);
  s = withLoaded(s, 'l2', 0, new Uint8Array(65536));
  s = withLoaded(s, 'refblock', 0, new Uint8Array(65536));
  return s;
}

const l2rec = (index: number, hi: number, lo: number): MetaRecord => ({
  kind: 'l2', l1Index: 0, table: 0x40000, index, old: { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 }, new: { hi, lo, bitmapHi: 0, bitmapLo: 0 },
});

describe('state and reducer', () => {
  it('apply returns a new state and never changes the old one', () => {
    const s0 = smallState();
    const t0 = s0.l2.get(0)!;
    const s1 = apply(s0, l2rec(5, 0x8000_0000, 0x50000));
    expect(readL2Word(s1.l2.get(0)!, 5, s1.geometry)).toEqual({ hi: 0x8000_0000, lo: 0x50000, bitmapHi: 0, bitmapLo: 0 });
    expect(readL2Word(t0, 5, s0.geometry).lo).toBe(0);
    expect(s1.refblocks.get(0)).toBe(s0.refblocks.get(0)); // untouched tables are shared
    expect(s1.l1).toBe(s0.l1);
  });

  it('a transaction copies each touched table once', () => {
    const s0 = smallState();
    const recs = Array.from({ length: 100 }, (_, i) => l2rec(i, 0x8000_0000, 0x50000 + i * 0x10000));
    const s1 = applyAll(s0, recs);
    const s2 = applyAll(s0, recs.slice(0, 50));
    expect(s1.l2.get(0)).not.toBe(s0.l2.get(0));
    // the 50-record state is a different copy: no sharing of mutated bytes between transactions
    expect(readL2Word(s2.l2.get(0)!, 60, s0.geometry).lo).toBe(0);
    expect(readL2Word(s1.l2.get(0)!, 60, s0.geometry).lo).toBe(0x50000 + 60 * 0x10000);
    expect(Object.isFrozen(s1.header)).toBe(true);
  });

  it('a record whose old value does not match is refused', () => {
    const s0 = smallState();
    expect(() => apply(s0, { kind: 'refcount', cluster: 3, old: 1, new: 2 })).toThrow(RecordMismatchError);
    const s1 = apply(s0, { kind: 'refcount', cluster: 3, old: 0, new: 1 });
    expect(() => apply(s1, { kind: 'refcount', cluster: 3, old: 0, new: 1 })).toThrow(/refcount of cluster 0x3 is 1, record says 0/);
    expect(() => apply(s0, { kind: 'header', field: 'size', old: 5n, new: 6n })).toThrow(RecordMismatchError);
  });
});

describe.skipIf(!qemuAvailable)('trace of an operation', () => {
  const { dir, cleanup } = tempDir('qledger-trace-');
  afterAll(cleanup);

  const idx = (t: TraceEvent[], pred: (e: TraceEvent) => boolean, from = 0) => t.findIndex((e, i) => i >= from && pred(e));
  const isWrite = (what: RegExp) => (e: TraceEvent) => e.type === 'write' && what.test(e.what);
  const isFlush = (e: TraceEvent) => e.type === 'flush';

  it('first write: data and refcounts, a barrier, then the L1 entry', async () => {
    const f = join(dir, 'a.qcow2');
    await Image.create(f, { size: 8 << 20, clusterSize: 4096 });
    const trace: TraceEvent[] = [];
    const img = await Image.open(f, { write: true, trace });
    await img.write(4096 * 700, new Uint8Array(4096).fill(1)); // needs an L2 table
    await img.flush();
    await img.close();
    const data = idx(trace, isWrite(/^data/));
    const block = idx(trace, isWrite(/^refblock/));
    const newL2 = idx(trace, isWrite(/^new l2/));
    const l1 = idx(trace, isWrite(/^l1 \[/));
    expect(Math.min(data, block, newL2)).toBeGreaterThanOrEqual(0);
    expect(l1).toBeGreaterThan(Math.max(data, block, newL2));
    const barrier = idx(trace, isFlush, Math.max(data, block, newL2));
    expect(barrier).toBeGreaterThan(0);
    expect(barrier).toBeLessThan(l1);
    // every refcount record that makes a cluster used comes before the record that references it
    const recs = trace.flatMap((e) => (e.type === 'record' ? [e.record] : []));
    for (const [i, r] of recs.entries()) {
      if (r.kind !== 'l2' || (r.new.hi & 0x40000000) !== 0) continue;
      const hostCluster = ((r.new.hi & 0xffffff) * 2 ** 32 + (r.new.lo & 0xfffffe00)) / 4096;
      if (!hostCluster) continue;
      const inc = recs.findIndex((x) => x.kind === 'refcount' && x.cluster === hostCluster && x.new > x.old);
      expect(inc).toBeGreaterThanOrEqual(0);
      expect(inc).toBeLessThan(i);
    }
  });

  it('copy-on-write of a snapshot cluster: the L2 change is durable before the decrement is written', async () => {
    const f = join(dir, 'snap.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '1M']);
    qemuIo(f, ['write -P 1 0 64k']);
    qemuImg(['snapshot', '-c', 's', f]);
    const trace: TraceEvent[] = [];
    const img = await Image.open(f, { write: true, trace });
    await img.write(8192, new Uint8Array(4096).fill(2));
    await img.flush();
    await img.close();
    const l2 = idx(trace, isWrite(/^new l2|^l2 /));
    const l1 = idx(trace, isWrite(/^l1 \[/));
    const lastRef = Math.max(l2, l1);
    expect(lastRef).toBeGreaterThan(0);
    const barrier = idx(trace, isFlush, lastRef);
    const decrementWrite = idx(trace, isWrite(/^refblock/), lastRef);
    expect(barrier).toBeGreaterThan(lastRef);
    expect(decrementWrite).toBeGreaterThan(barrier);
    const check = qemuImg(['check', f]);
    expect(check).toContain('No errors were found');
  });
});
