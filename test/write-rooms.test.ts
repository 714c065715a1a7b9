/**
 * The write engine's rooms on their own: the pure per-cluster write plan,
 * the refcount-structure sizing, the header-extension insert plan, and the
 * fault plan's one hook into ordering (the overlap index has
 * overlap.test.ts). (The rooms together are exercised by every write test.)
 */

import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { geometryOf, decodeHeader, type Geometry } from '../src/format/header.ts';
import { ALL_SUBCLUSTERS, L2E_ZERO_LO, L2_UNALLOCATED, encodeCompressedDescriptor, standardEntry, type L2Entry } from '../src/format/l2.ts';
import { refcountStructureSize } from '../src/format/refcount.ts';
import { EXT_QLEDGER_VACANT, planExtensionInsert, planExtensionRemove } from '../src/format/extension-insert.ts';
import { host } from '../src/format/offsets.ts';
import { planClusterWrite, type PlanEnv } from '../src/engine/write/data-write.ts';
import { FaultPlan } from '../src/engine/faults.ts';
import { PhaseLists } from '../src/engine/ordering.ts';
import { dirtySectors } from '../src/engine/device-writes.ts';
import { MemoryDevice } from '../src/io/memory-device.ts';
import { createOnDevice } from '../src/engine/writable.ts';
import { readAt } from '../src/io/device.ts';

const runs = Number(process.env['QLEDGER_PROPERTY_RUNS'] ?? 100);

function geometry(clusterBits: number, extendedL2 = false): Geometry {
  return geometryOf({
    version: 3,
    clusterBits,
    size: 1 << 30,
    refcountOrder: 4,
    incompatibleFeatures: extendedL2 ? 16n : 0n,
  } as Parameters<typeof geometryOf>[0]);
}

describe('the per-cluster write plan', () => {
  const g = geometry(16);
  const cs = g.clusterSize;
  const env: PlanEnv = { geometry: g, hasDataFile: false, hasBacking: false };

  it('a whole cluster of an unallocated entry goes to a fresh cluster as it is', () => {
    expect(planClusterWrite(L2_UNALLOCATED, 0, cs, env)).toMatchObject({ inPlace: false, fill: 'piece', from: 0, to: cs, unrefOld: false, bitmapLo: 0 });
  });

  it('part of an unallocated cluster with nothing below: the guest bytes, the rest zeroed by the device', () => {
    expect(planClusterWrite(L2_UNALLOCATED, 512, 4096, env)).toMatchObject({ inPlace: false, fill: 'piece-zeroes', from: 512, to: 4096 });
  });

  it('part of an unallocated cluster over a backing file: copy-on-write of the whole cluster', () => {
    expect(planClusterWrite(L2_UNALLOCATED, 512, 4096, { ...env, hasBacking: true })).toMatchObject({ inPlace: false, fill: 'cow', from: 0, to: cs });
  });

  it('a cluster this image owns (COPIED) is written in place, and a zero flag on it is cleared', () => {
    const owned = standardEntry(5 * cs, true);
    expect(planClusterWrite(owned, 100, 200, env)).toMatchObject({ inPlace: true, fill: 'piece', from: 100, to: 200, unrefOld: false });
    const zeroAlloc: L2Entry = { ...owned, lo: (owned.lo | L2E_ZERO_LO) >>> 0 };
    const p = planClusterWrite(zeroAlloc, 100, 200, env);
    expect(p.inPlace).toBe(true);
    expect(p.next).toEqual(owned);
  });

  it('a shared cluster (no COPIED) or a compressed one is copied to a fresh cluster, and its reference dropped', () => {
    expect(planClusterWrite(standardEntry(5 * cs, false), 100, 200, env)).toMatchObject({ inPlace: false, fill: 'cow', from: 0, to: cs, unrefOld: true });
    const compressed = encodeCompressedDescriptor(7 * cs + 100, 300, g.clusterBits);
    expect(planClusterWrite(compressed, 0, cs, env)).toMatchObject({ inPlace: false, fill: 'piece', unrefOld: true });
  });

  it('extended L2: whole subclusters are written alone and marked allocated; a partial one is completed from the guest view', () => {
    const x = geometry(16, true);
    const xe: PlanEnv = { geometry: x, hasDataFile: false, hasBacking: true };
    const sc = x.subclusterSize;
    expect(planClusterWrite(L2_UNALLOCATED, sc, 3 * sc, xe)).toMatchObject({ fill: 'piece', from: sc, to: 3 * sc, bitmapLo: 0b110, bitmapHi: 0 });
    expect(planClusterWrite(L2_UNALLOCATED, sc + 1, 3 * sc, xe)).toMatchObject({ fill: 'cow', from: sc, to: 3 * sc, bitmapLo: 0b110 });
    // zero bits of the written subclusters are cleared, the others kept
    const zeroes: L2Entry = { hi: 0, lo: 0, bitmapHi: ALL_SUBCLUSTERS, bitmapLo: 0 };
    expect(planClusterWrite(zeroes, 0, sc, xe)).toMatchObject({ bitmapLo: 1, bitmapHi: (ALL_SUBCLUSTERS & ~1) >>> 0 });
    // an unallocated cluster that claims allocated subclusters is refused
    expect(planClusterWrite({ hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 1 }, 0, sc, xe).invalid).toBeDefined();
  });

  it('every plan writes the guest range and stays inside the cluster (property)', () => {
    const entries = fc.oneof(
      fc.constant(L2_UNALLOCATED),
      fc.constant({ hi: 0, lo: L2E_ZERO_LO, bitmapHi: 0, bitmapLo: 0 }),
      fc.integer({ min: 1, max: 1000 }).map((c) => standardEntry(c * cs, true)),
      fc.integer({ min: 1, max: 1000 }).map((c) => standardEntry(c * cs, false)),
    );
    fc.assert(
      fc.property(entries, fc.integer({ min: 0, max: cs - 1 }), fc.integer({ min: 1, max: cs }), fc.boolean(), (e, a, len, hasBacking) => {
        const b = Math.min(cs, a + len);
        const p = planClusterWrite(e, a, b, { ...env, hasBacking });
        expect(p.invalid).toBeUndefined();
        expect(p.from).toBeLessThanOrEqual(a);
        expect(p.to).toBeGreaterThanOrEqual(b);
        expect(p.from).toBeGreaterThanOrEqual(0);
        expect(p.to).toBeLessThanOrEqual(cs);
        // a write that does not cover what the guest will read back must fill it
        if (p.fill === 'piece' && !p.inPlace) expect([a, b]).toEqual([0, cs]);
      }),
      { numRuns: runs },
    );
  });
});

describe('refcount structure sizing', () => {
  it('the blocks count every cluster up to the structure\'s end and the table has an entry for each block (property)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 9, max: 21 }), fc.integer({ min: 0, max: 6 }), fc.integer({ min: 0, max: 2 ** 28 }), fc.integer({ min: 0, max: 1000 }), fc.integer({ min: 1, max: 64 }), (bits, order, placeAt, minEntries, minTable) => {
        const cs = 2 ** bits;
        const E = (cs * 8) / 2 ** order;
        const g = { clusterSize: cs, refcountBlockEntries: E };
        const firstRt = Math.floor(placeAt / E);
        const { blocks, tableClusters } = refcountStructureSize(g, placeAt, firstRt, minEntries, minTable);
        const last = placeAt + blocks + tableClusters - 1;
        expect(firstRt + blocks - 1).toBeGreaterThanOrEqual(Math.floor(last / E));
        expect((tableClusters * cs) / 8).toBeGreaterThanOrEqual(Math.max(minEntries, firstRt + blocks));
        expect(tableClusters).toBeGreaterThanOrEqual(minTable);
      }),
      { numRuns: runs },
    );
  });
});

describe('header extension insert', () => {
  it('the header is valid after every step, and has the extension after the last', async () => {
    for (const withBacking of [false, true]) {
      const dev = new MemoryDevice('x.qcow2');
      const backing = withBacking ? new Uint8Array(1 << 20) : undefined;
      await createOnDevice(dev, 'x.qcow2', { size: 1 << 20, clusterSize: 4096, ...(backing ? { backingFile: 'b'.repeat(40), backingFormat: 'raw' as const } : {}) }, backing);
      const head = await readAt(dev, 0, 4096);
      const data = new Uint8Array(16).fill(0xab);
      const plan = planExtensionInsert(head, 0x1234_5678, data)!;
      expect(plan).toBeDefined();
      const img = head.slice();
      const check = () => decodeHeader(img, 1 << 30);
      const before = check();
      if (plan.moveName) {
        img.set(plan.moveName.bytes, plan.moveName.to);
        expect(check().backingFile).toBe(before.backingFile);
        img.set(plan.moveName.field, 8);
        expect(check().backingFile).toBe(before.backingFile);
      }
      // qemu-img (and qledger) put the backing file name right after the extensions: it is in the way
      expect(plan.moveName !== undefined).toBe(withBacking);
      img.set(plan.body.bytes, plan.body.offset);
      expect(check().extensions.some((e) => e.type === 0x1234_5678)).toBe(false);
      img.set(plan.marker.bytes, plan.marker.offset);
      const after = check();
      const ext = after.extensions.find((e) => e.type === 0x1234_5678);
      expect(ext && [...ext.data]).toEqual([...data]);
      expect(after.backingFile).toBe(before.backingFile);
      expect(after.extensions.length).toBe(before.extensions.length + 1);
    }
  });

  it('no room in the header cluster: no plan', () => {
    const dev = new Uint8Array(512);
    // a v2 header whose extension list runs to the end of a 512-byte cluster
    new DataView(dev.buffer).setUint32(0, 0x514649fb);
    new DataView(dev.buffer).setUint32(4, 2);
    new DataView(dev.buffer).setUint32(72, 0xdead);
    new DataView(dev.buffer).setUint32(76, 512 - 80 - 8);
    expect(planExtensionInsert(dev, 1, new Uint8Array(16))).toBeUndefined();
  });
});

describe('header extension removal', () => {
  it('every write stays in one sector and leaves a valid list with every other extension intact; the extension is gone or vacant after the last (property)', async () => {
    const T = 0x2385_2875;
    const dev = new MemoryDevice('x.qcow2');
    await createOnDevice(dev, 'x.qcow2', { size: 1 << 20, clusterSize: 4096 });
    const valid = await readAt(dev, 0, 4096);
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 60 }).map((k) => 112 + k * 8),
        fc.array(fc.integer({ min: 0, max: 40 }), { maxLength: 4 }),
        fc.array(fc.integer({ min: 0, max: 40 }), { maxLength: 4 }),
        (padTo, before, after) => {
          const head = valid.slice();
          head.fill(0, 112);
          const dv = new DataView(head.buffer);
          let p = 112;
          const put = (type: number, len: number) => {
            dv.setUint32(p, type);
            dv.setUint32(p + 4, len);
            for (let i = 0; i < len; i++) head[p + 8 + i] = (type + i) & 0xff || 1;
            p += 8 + Math.ceil(len / 8) * 8;
          };
          // an unknown extension that puts the removed one at a chosen offset
          if (padTo > 112) put(0x7000_0000, padTo - 112 - 8);
          before.forEach((len, i) => put(0x7100_0000 + i, len));
          put(T, 24);
          after.forEach((len, i) => put(0x7200_0000 + i, len));
          const others = (img: Uint8Array) => decodeHeader(img, 1 << 30).extensions.filter((e) => e.type !== T && e.type !== EXT_QLEDGER_VACANT).map((e) => `${e.type}:${Buffer.from(e.data).toString('hex')}`);
          const want = others(head);
          const plan = planExtensionRemove(head, T)!;
          const img = head.slice();
          for (const w of plan) {
            expect(Math.floor(w.offset / 512)).toBe(Math.floor((w.offset + w.bytes.length - 1) / 512));
            img.set(w.bytes, w.offset);
            expect(others(img)).toEqual(want);
          }
          const last = decodeHeader(img, 1 << 30).extensions.map((e) => e.type);
          expect(last.includes(T)).toBe(false);
          // moved down when the list after it is short enough for two sector writes
          if (after.reduce((n, len) => n + 8 + Math.ceil(len / 8) * 8, 8) <= 32) expect(last.includes(EXT_QLEDGER_VACANT)).toBe(false);
        },
      ),
      { numRuns: runs },
    );
  });
});

describe('the fault plan', () => {
  const w = (what: string) => ({ offset: host(0), data: new Uint8Array(512), what });

  it("breaks exactly its own rule: 'l2-before-refcount' moves the references into the allocate phase", () => {
    const p = new PhaseLists();
    p.allocate.push(w('refblock'));
    p.hook.push(w('reftable'));
    p.reference.push(w('l2'));
    p.free.push(w('refblock (free)'));
    new FaultPlan('l2-before-refcount').rearrange(p, false);
    expect(p.allocate.map((x) => x.what)).toEqual(['l2', 'reftable', 'refblock']);
    expect(p.reference).toEqual([]);
    expect(p.free.map((x) => x.what)).toEqual(['refblock (free)']);
  });

  it("'free-before-unmap' moves the decrements first; 'header-before-table' moves the header only when a table moved", () => {
    const p = new PhaseLists();
    p.reference.push(w('l2'));
    p.free.push(w('refblock (free)'));
    new FaultPlan('free-before-unmap').rearrange(p, false);
    expect(p.allocate.map((x) => x.what)).toEqual(['refblock (free)']);
    const q = new PhaseLists();
    q.reference.push(w('header'));
    new FaultPlan('header-before-table').rearrange(q, false);
    expect(q.reference.map((x) => x.what)).toEqual(['header']);
    new FaultPlan('header-before-table').rearrange(q, true);
    expect(q.allocate.map((x) => x.what)).toEqual(['header']);
    expect(q.reference).toEqual([]);
  });

  it('other faults leave the phases alone', () => {
    const p = new PhaseLists();
    p.reference.push(w('l2'));
    new FaultPlan('reuse-before-durable').rearrange(p, true);
    expect(p.phases(false).map((x) => x.name)).toEqual(['reference']);
    expect(new FaultPlan('reuse-before-durable').reuseFreedAtOnce).toBe(true);
    expect(new FaultPlan('l2-before-refcount').reuseFreedAtOnce).toBe(false);
  });
});

describe('dirty sectors of a table', () => {
  it('the writes turn the old table into the new one, and cover exactly the sectors that differ (property)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 160 }), fc.array(fc.nat(), { maxLength: 12 }), fc.boolean(), (sectors, changes, shorter) => {
        const len = sectors * 512;
        const next = new Uint8Array(len).map((_, i) => (i * 13) & 0xff);
        const prev = next.slice(0, shorter ? Math.max(0, len - 512 * (1 + (changes[0] ?? 0) % 3)) : len);
        for (const c of changes) if (prev.length) prev[c % prev.length] = prev[c % prev.length]! ^ 0x40;
        const writes = dirtySectors(prev, next, host(1 << 20), 'table');
        const img = new Uint8Array(len);
        img.set(prev.subarray(0, Math.min(prev.length, len)));
        const covered = new Set<number>();
        for (const w of writes) {
          img.set(w.data, w.offset - (1 << 20));
          for (let o = w.offset - (1 << 20); o < w.offset - (1 << 20) + w.data.length; o += 512) covered.add(o / 512);
        }
        expect(Buffer.compare(img, next)).toBe(0);
        for (let s = 0; s < sectors; s++) {
          const differs = s * 512 + 512 > prev.length || Buffer.compare(prev.subarray(s * 512, s * 512 + 512), next.subarray(s * 512, s * 512 + 512)) !== 0;
          expect(covered.has(s)).toBe(differs);
        }
      }),
      { numRuns: runs * 3 },
    );
  });
});
