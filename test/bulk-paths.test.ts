/**
 * The tree-sized helpers that snapshots, make_empty and the write-back use
 * on a million entries at once agree with the per-entry forms they replace:
 * grouping a cluster list by refcount block, finding the next free entry of
 * a block, reading and writing many refcounts of a block, and joining
 * adjacent writes of a phase.
 */

import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { groupByBlock } from '../src/engine/write/tree-refs.ts';
import { getRefcount, maxRefcount, nextZeroRefcount, readRefcounts, setRefcount, writeRefcounts } from '../src/format/refcount.ts';
import type { DeviceWrite } from '../src/engine/ordering.ts';
import { mergeAdjacent } from '../src/engine/device-writes.ts';
import { host } from '../src/format/offsets.ts';

const runs = Number(process.env['QLEDGER_PROPERTY_RUNS'] ?? 200);
const opts = { numRuns: runs, verbose: 1 } as const;

/** Each block's clusters with their counts, the slow way. */
function naive(clusters: readonly number[], entries: number): Array<{ rt: number; e: Array<[number, number]> }> {
  const m = new Map<number, Map<number, number>>();
  for (const c of clusters) {
    const rt = Math.floor(c / entries);
    const x = m.get(rt) ?? new Map<number, number>();
    m.set(rt, x);
    x.set(c % entries, (x.get(c % entries) ?? 0) + 1);
  }
  return [...m].sort((a, b) => a[0] - b[0]).map(([rt, x]) => ({ rt, e: [...x].sort((a, b) => a[0] - b[0]) }));
}

describe('groupByBlock', () => {
  it('groups like a map of counts: dense buckets, small ones, numbers past 2^31 and far apart', () => {
    const list = (bits: number) =>
      fc.oneof(
        fc.array(fc.integer({ min: 0, max: (1 << bits) * 6 }), { maxLength: 3000 }),
        fc.array(fc.integer({ min: 0, max: (1 << bits) - 1 }), { minLength: 100, maxLength: 3000 }),
        fc.array(fc.oneof(fc.integer({ min: 0, max: 50 }), fc.integer({ min: 2 ** 31 - 5, max: 2 ** 31 + 5 }), fc.integer({ min: 0, max: 2 ** 47 })), { maxLength: 60 }),
      );
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 12 }).chain((bits) => fc.tuple(fc.constant(bits), list(bits), fc.boolean())),
        ([bits, clusters, typed]) => {
          const entries = 1 << bits;
          const got = groupByBlock(typed ? Float64Array.from(clusters) : clusters, entries).map((g) => ({ rt: g.rt, e: [...g.index].map((i, k): [number, number] => [i, g.times[k]!]) }));
          expect(got).toEqual(naive(clusters, entries));
        },
      ),
      opts,
    );
  });
});

describe('refcount blocks in bulk', () => {
  const order = fc.integer({ min: 0, max: 6 });
  it('nextZeroRefcount finds what a scan entry by entry finds', () => {
    fc.assert(
      fc.property(order, fc.array(fc.nat(3), { minLength: 1, maxLength: 300 }), fc.nat(), (o, values, from) => {
        const n = values.length;
        const block = new Uint8Array(Math.ceil((n << o) / 8) + 8);
        values.forEach((v, i) => setRefcount(block, i, o, Math.min(v, maxRefcount(o))));
        const start = from % n;
        let want = n;
        for (let i = start; i < n; i++) {
          if (getRefcount(block, i, o) === 0) {
            want = i;
            break;
          }
        }
        expect(nextZeroRefcount(block, start, n, o)).toBe(want);
      }),
      opts,
    );
  });

  it('readRefcounts and writeRefcounts are getRefcount and setRefcount over a list of entries', () => {
    fc.assert(
      fc.property(order, fc.array(fc.tuple(fc.nat(255), fc.nat(2 ** 20)), { maxLength: 200 }), fc.integer({ min: 0, max: 3 }), (o, changes, pad) => {
        // a block at an odd place inside its buffer, as a table read in a run is
        const buf = new Uint8Array(pad + (256 << o) / 8 + 8);
        const block = buf.subarray(pad, pad + Math.ceil((256 << o) / 8));
        const expected = block.slice();
        const index = Uint32Array.from(changes.map(([i]) => i));
        const values = Float64Array.from(changes.map(([, v]) => v % (maxRefcount(o) + 1)));
        // duplicates: the last value wins, as in a loop of setRefcount
        for (let k = 0; k < index.length; k++) setRefcount(expected, index[k]!, o, values[k]!);
        writeRefcounts(block, index, o, values);
        expect([...block]).toEqual([...expected]);
        const out = new Float64Array(index.length);
        readRefcounts(block, index, o, out);
        expect([...out]).toEqual([...index].map((i) => getRefcount(expected, i, o)));
      }),
      opts,
    );
  });

  it('writeRefcounts refuses a value the width cannot hold, before changing anything (16 and 32 bits)', () => {
    for (const o of [4, 5]) {
      const block = new Uint8Array(64);
      expect(() => writeRefcounts(block, [0, 1], o, [1, maxRefcount(o) + 1])).toThrow(RangeError);
      expect(() => writeRefcounts(block, [2], o, [-1])).toThrow(RangeError);
      expect([...block].every((b) => b === 0)).toBe(true);
    }
  });
});

describe('mergeAdjacent', () => {
  it('the joined writes put the same bytes where the writes did, joining only one kind and category', () => {
    const write = fc.record({
      at: fc.nat(63),
      sectors: fc.integer({ min: 1, max: 4 }),
      fill: fc.nat(255),
      kind: fc.constantFrom(1, 2),
      category: fc.constantFrom('a', 'b'),
    });
    fc.assert(
      fc.property(fc.uniqueArray(write, { selector: (w) => w.at, maxLength: 30 }), (ws) => {
        // non-overlapping writes, as a phase's are
        const writes: DeviceWrite[] = [];
        let end = 0;
        for (const w of [...ws].sort((x, y) => x.at - y.at)) {
          const at = Math.max(end, w.at * 512);
          writes.push({ offset: host(at), data: new Uint8Array(w.sectors * 512).fill(w.fill), what: 'w', kind: w.kind, category: w.category });
          end = at + w.sectors * 512;
        }
        writes.reverse();
        const apply = (list: readonly DeviceWrite[]) => {
          const disk = new Uint8Array(end + 512);
          for (const w of list) disk.set(w.data, w.offset);
          return disk;
        };
        const merged = mergeAdjacent(writes);
        expect(apply(merged)).toEqual(apply(writes));
        expect(merged.reduce((n, w) => n + w.data.length, 0)).toBe(writes.reduce((n, w) => n + w.data.length, 0));
        for (const m of merged) {
          const parts = writes.filter((w) => w.offset >= m.offset && w.offset < m.offset + m.data.length);
          expect(parts.every((w) => w.kind === m.kind && w.category === m.category)).toBe(true);
        }
        // nothing left adjacent and alike
        const sorted = [...merged].sort((x, y) => x.offset - y.offset);
        for (let k = 1; k < sorted.length; k++) {
          const a = sorted[k - 1]!;
          const b = sorted[k]!;
          expect(a.offset + a.data.length === b.offset && a.kind === b.kind && a.category === b.category).toBe(false);
        }
      }),
      opts,
    );
  });
});
