/**
 * Metadata overlap protection: the compact cluster-kind map against a naive
 * model (property), the index following the record stream (a structure the
 * disk still points at keeps its kind until the write-back), QEMU's modes,
 * the four allocator and cache faults refused before they reach the device
 * (and, with the index off, corrupting the image: the protection is real),
 * metadata that already overlaps at open, and the same refusals as qemu-io
 * on the same damaged images.
 */

import { describe, it, expect, afterAll } from 'vitest';
import fc from 'fast-check';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ClusterKinds } from '../src/engine/write/cluster-kinds.ts';
import {
  MODE_KINDS,
  OL_ACTIVE_L1,
  OL_ACTIVE_L2,
  OL_INACTIVE_L1,
  OL_INACTIVE_L2,
  OL_MAIN_HEADER,
  OL_REFCOUNT_BLOCK,
  OL_REFCOUNT_TABLE,
  OverlapIndex,
  isOverlap,
  overlapName,
} from '../src/engine/write/overlap.ts';
import { host } from '../src/format/offsets.ts';
import { MemoryDevice } from '../src/io/memory-device.ts';
import { createOnDevice, openWriterOnDevice } from '../src/engine/writable.ts';
import { checkDevice } from '../src/engine/check/check.ts';
import { Image } from '../src/engine/image.ts';
import { FAULTS, OVERLAP_FAULTS, type Fault } from '../src/engine/faults.ts';
import type { OverlapMode } from '../src/engine/write/overlap.ts';
import { putU64, u64, u64big } from '../src/format/bytes.ts';
import { qemuAvailable, qemuImg, qemuIo, run, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const runs = Number(process.env['QLEDGER_PROPERTY_RUNS'] ?? 100);
const W = 65536;
const { dir, cleanup } = tempDir('qledger-overlap-');
afterAll(cleanup);

describe('the cluster-kind map', () => {
  // positions near the window boundaries, where fragments are cut
  const pos = fc.oneof(fc.integer({ min: 0, max: 300 }), fc.integer({ min: W - 150, max: W + 150 }), fc.integer({ min: 2 * W - 150, max: 2 * W + 150 }));
  const op = fc.oneof(
    fc.record({ t: fc.constant('add' as const), first: pos, count: fc.integer({ min: 1, max: 400 }), bits: fc.integer({ min: 1, max: 0xfff }) }),
    fc.record({ t: fc.constant('remove' as const), first: pos, count: fc.integer({ min: 1, max: 400 }), bits: fc.integer({ min: 1, max: 0xfff }) }),
  );

  it('equals a per-cluster model after any adds and removes, and stays normalised (property)', () => {
    fc.assert(
      fc.property(fc.array(op, { maxLength: 40 }), fc.array(fc.tuple(pos, fc.integer({ min: 1, max: 500 }), fc.integer({ min: 1, max: 0xfff })), { maxLength: 10 }), (ops, queries) => {
        const m = new ClusterKinds();
        const model = new Map<number, number>();
        for (const o of ops) {
          if (o.t === 'add') m.add(o.first, o.count, o.bits);
          else m.remove(o.first, o.count, o.bits);
          for (let c = o.first; c < o.first + o.count; c++) {
            const v = o.t === 'add' ? (model.get(c) ?? 0) | o.bits : (model.get(c) ?? 0) & ~o.bits;
            if (v) model.set(c, v);
            else model.delete(c);
          }
        }
        // the runs are exactly the model's, merged: no empty run, no two equal neighbours
        const expected: Array<{ first: number; count: number; bits: number }> = [];
        for (const c of [...model.keys()].sort((a, b) => a - b)) {
          const b = model.get(c)!;
          const last = expected[expected.length - 1];
          // fragments never cross a window boundary
          if (last && last.bits === b && last.first + last.count === c && c % W !== 0) last.count++;
          else expected.push({ first: c, count: 1, bits: b });
        }
        expect([...m.runs()]).toEqual(expected);
        for (const [first, count, mask] of queries) {
          let want: { cluster: number; bits: number } | undefined;
          for (let c = first; c < first + count && !want; c++) if ((model.get(c) ?? 0) & mask) want = { cluster: c, bits: model.get(c)! };
          expect(m.find(first, count, mask)).toEqual(want);
          expect(m.at(first)).toBe(model.get(first) ?? 0);
        }
        // building in one pass gives the same map
        const built = new ClusterKinds();
        built.load([...model].map(([c, b]) => ({ first: c, count: 1, bits: b })));
        expect([...built.runs()]).toEqual(expected);
      }),
      { numRuns: runs },
    );
  });

  it('a terabyte of metadata in runs costs bytes per fragment, not per cluster', () => {
    const m = new ClusterKinds();
    // 2048 L2 tables, each followed by the 8192 data clusters it maps, as metadata preallocation lays them out
    m.load(Array.from({ length: 2048 }, (_, i) => ({ first: 3 + i * 8193, count: 1, bits: OL_ACTIVE_L2 })));
    expect(m.fragments).toBe(2048);
    expect(m.bytes()).toBeLessThan(170_000);
  });
});

describe('the overlap index', () => {
  const cs = 65536;

  it('follows new tables, entries and moves; what the disk still points at keeps its kind until the write-back', () => {
    const ov = new OverlapIndex({ clusterSize: cs });
    ov.reserve(host(3 * cs), 8 * 100, OL_ACTIVE_L1);
    ov.follow({ kind: 'table-new', role: 'l2', slot: 0, offset: 10 * cs, copyOf: 0 });
    ov.follow({ kind: 'table-new', role: 'refblock', slot: 1, offset: 11 * cs, copyOf: 0 });
    expect(ov.at(10 as never)).toBe(OL_ACTIVE_L2);
    expect(overlapName(ov.at(11 as never))).toBe('refcount block');
    ov.follow({ kind: 'l1-swap', oldOffset: 3 * cs, oldSize: 100, newOffset: 20 * cs, newSize: 20000 });
    // the old L1 is still the durable one
    expect(ov.at(3 as never)).toBe(OL_ACTIVE_L1);
    expect(ov.at(20 as never)).toBe(OL_ACTIVE_L1);
    expect(ov.at(22 as never)).toBe(OL_ACTIVE_L1);
    expect(ov.has(23 as never)).toBe(false);
    ov.follow({ kind: 'reftable-swap', oldOffset: 1 * cs, oldClusters: 1, newOffset: 30 * cs, newClusters: 2 });
    expect(ov.at(31 as never)).toBe(OL_REFCOUNT_TABLE);
    // an L1 entry moving to a copied L2 table: the old one stays until durable
    ov.follow({ kind: 'l1', index: 0, old: { hi: 0, lo: 10 * cs }, new: { hi: 0x8000_0000, lo: 40 * cs } });
    expect(ov.at(40 as never)).toBe(OL_ACTIVE_L2);
    expect(ov.at(10 as never)).toBe(OL_ACTIVE_L2);
    // a refcount drop to a non-zero count frees nothing
    ov.follow({ kind: 'refcount', cluster: 11, old: 2, new: 1 });
    ov.follow({ kind: 'refcount', cluster: 12, old: 0, new: 1 });
    ov.durable();
    expect(ov.has(3 as never)).toBe(false);
    expect(ov.has(1 as never)).toBe(false);
    expect(ov.has(10 as never)).toBe(false);
    expect(ov.at(11 as never)).toBe(OL_REFCOUNT_BLOCK);
    // freed: whatever it held, once durable
    ov.follow({ kind: 'refcount', cluster: 11, old: 1, new: 0 });
    expect(ov.has(11 as never)).toBe(true);
    ov.durable();
    expect(ov.has(11 as never)).toBe(false);
  });

  it('a structure placed again before the write-back keeps its kind', () => {
    const ov = new OverlapIndex({ clusterSize: cs });
    ov.follow({ kind: 'table-new', role: 'l2', slot: 0, offset: 10 * cs, copyOf: 0 });
    ov.follow({ kind: 'refcount', cluster: 10, old: 1, new: 0 });
    ov.follow({ kind: 'table-new', role: 'l2', slot: 0, offset: 10 * cs, copyOf: 0 });
    ov.durable();
    expect(ov.at(10 as never)).toBe(OL_ACTIVE_L2);
  });

  it('checks what its mode names, QEMU\'s sets: constant < cached < all', () => {
    expect(MODE_KINDS.none).toBe(0);
    expect(MODE_KINDS.constant & (OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK | OL_INACTIVE_L1 | OL_INACTIVE_L2)).toBe(0);
    expect(MODE_KINDS.cached & OL_INACTIVE_L2).toBe(0);
    expect(MODE_KINDS.cached & (OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK | OL_INACTIVE_L1)).toBe(OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK | OL_INACTIVE_L1);
    const at = (mode: OverlapMode, kind: number) => {
      const ov = new OverlapIndex({ clusterSize: cs }, mode);
      ov.reserve(host(5 * cs), cs, kind);
      return ov.conflict(5 * cs + 100, 10, 0)?.conflict ?? 0;
    };
    expect(at('all', OL_INACTIVE_L2)).toBe(OL_INACTIVE_L2);
    expect(at('cached', OL_INACTIVE_L2)).toBe(0);
    expect(at('cached', OL_ACTIVE_L2)).toBe(OL_ACTIVE_L2);
    expect(at('constant', OL_ACTIVE_L2)).toBe(0);
    expect(at('constant', OL_MAIN_HEADER)).toBe(OL_MAIN_HEADER);
    expect(at('none', OL_MAIN_HEADER)).toBe(0);
    // a write allowed its own kind passes; a write spanning two clusters sees the second
    const ov = new OverlapIndex({ clusterSize: cs });
    ov.reserve(host(6 * cs), cs, OL_ACTIVE_L2);
    expect(ov.conflict(6 * cs, cs, OL_ACTIVE_L2)).toBeUndefined();
    expect(ov.conflict(5 * cs + cs - 1, 2, 0)?.offset).toBe(6 * cs);
  });

  it('an L2 table shared with a snapshot is no overlap; any other pair on one cluster is', () => {
    expect(isOverlap(OL_ACTIVE_L2 | OL_INACTIVE_L2)).toBe(false);
    expect(isOverlap(OL_ACTIVE_L2)).toBe(false);
    expect(isOverlap(OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK)).toBe(true);
    expect(isOverlap(OL_ACTIVE_L1 | OL_INACTIVE_L1)).toBe(true);
  });
});

/** An image with a written cluster, in memory; each fault gets a workload that runs into it. */
async function faultRun(fault: Fault, mode: OverlapMode): Promise<{ dev: MemoryDevice; before: Uint8Array; error: Error | undefined; trace: unknown[] }> {
  const grow = fault === 'reuse-freed-metadata';
  const dev = new MemoryDevice('f.qcow2');
  await createOnDevice(dev, 'f.qcow2', grow ? { size: 4 << 20, clusterSize: 512, refcountBits: 64 } : { size: 1 << 20, clusterSize: 4096 });
  const before = dev.snapshot();
  const trace: unknown[] = [];
  // no journal: its writes are not in the trace, and the refusal should be of the fault's own write
  const w = await openWriterOnDevice(dev, 'f.qcow2', { fault, overlapCheck: mode, trace: trace as never, journal: false });
  let error: Error | undefined;
  try {
    if (grow) for (let i = 0; i < 3; i++) await w.write(i << 20, new Uint8Array(1 << 20).fill(i + 1));
    else {
      await w.write(0, new Uint8Array(4096).fill(1));
      await w.write(8192, new Uint8Array(4096).fill(2));
    }
    await w.close();
  } catch (e) {
    error = e as Error;
    await w.abandon();
  }
  return { dev, before, error, trace };
}

describe('allocator and cache faults are refused before they reach the device', () => {
  for (const fault of OVERLAP_FAULTS) {
    it(`${fault}: ${FAULTS[fault]}`, async () => {
      const { dev, error, trace } = await faultRun(fault, 'all');
      expect(error?.message).toMatch(/^f\.qcow2: Preventing invalid write on metadata \(overlaps with [A-Za-z0-9_ ]+\): .+ at 0x[0-9a-f]+ (\(\d+ bytes\) would overwrite|was placed on) the .+; the image is marked corrupt and writes are refused$/);
      // the refused write is not in the device trace: the corrupt-bit header is the last write
      const writes = (trace as Array<{ type: string; what?: string }>).filter((e) => e.type === 'write');
      expect(writes.at(-1)?.what).toBe('header (corrupt bit)');
      const img = dev.snapshot();
      expect(Number(u64big(img, 72) & 2n)).toBe(2);
      // apart from the corrupt bit, what is on the disk checks clean (leaks at worst)
      const clean = img.slice();
      putU64(clean, 72, u64big(clean, 72) & ~2n);
      const r = await checkDevice(new MemoryDevice('f.qcow2', clean, { readOnly: true }), 'f.qcow2');
      expect(r.corruptions + r.checkErrors).toBe(0);
    });

    it(`${fault} with --overlap-check=none: the same write reaches the device (the index is what stops it)`, async () => {
      const refused = (await faultRun(fault, 'all')).error as Error & { data?: { offset: number; length: number } };
      const at = refused.data!.offset;
      const { error, trace } = await faultRun(fault, 'none');
      expect(error?.message ?? '').not.toMatch(/Preventing invalid write/);
      const writes = (trace as Array<{ type: string; offset: number; length: number }>).filter((e) => e.type === 'write');
      expect(writes.some((w) => w.offset <= at && at < w.offset + w.length)).toBe(true);
    });
  }
});

describe('metadata that already overlaps', () => {
  it('is reported at a read-write open, every write refused, nothing written, and the image readable', async () => {
    const dev = new MemoryDevice('o.qcow2');
    await createOnDevice(dev, 'o.qcow2', { size: 1 << 20, clusterSize: 4096 });
    {
      const w = await openWriterOnDevice(dev, 'o.qcow2', { journal: false });
      await w.write(0, new Uint8Array(4096).fill(7));
      await w.close();
    }
    // the refcount table's first entry now names the active L1 table's cluster as a refcount block
    const b = dev.snapshot();
    const l1 = u64(b, 40);
    const rt = u64(b, 48);
    const damaged = b.slice();
    putU64(damaged, rt, l1);
    const d2 = new MemoryDevice('o.qcow2', damaged);
    const warnings: string[] = [];
    const img = await Image.open(d2, { write: true, onWarning: (m) => warnings.push(m) });
    expect(warnings.join('\n')).toMatch(new RegExp(`metadata overlaps: the active L1 table and the refcount block share the cluster at 0x${l1.toString(16)}`));
    const got = await img.read(0, 4096);
    expect(got.every((x) => x === 7)).toBe(true);
    await expect(img.write(8192, new Uint8Array(512))).rejects.toMatchObject({ code: 'E_CORRUPT', message: expect.stringMatching(/metadata overlaps: .*writes are refused \(the image is readable\)/) });
    await img.close();
    expect(Buffer.from(d2.snapshot()).equals(Buffer.from(damaged))).toBe(true);
  });
});

const q = qemuAvailable ? describe : describe.skip;
q('the same refusals as qemu-io on the same damaged images', () => {
  /** QEMU writes 64 KiB, snapshots, rewrites 4 KiB (the L2 table is copied), and the active L2 entry of guest cluster 1 is pointed at the snapshot's L2 table. */
  function damaged(name: string): string {
    const f = join(dir, name);
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '1M']);
    qemuIo(f, ['write -P 1 0 64k']);
    qemuImg(['snapshot', '-c', 'one', f]);
    qemuIo(f, ['write -P 2 0 4k']);
    const b = readFileSync(f);
    const activeL2 = Number(u64big(b, u64(b, 40)) & 0x00ff_ffff_ffff_fe00n);
    const sn = u64(b, 64);
    const snapL2 = Number(u64big(b, u64(b, sn)) & 0x00ff_ffff_ffff_fe00n);
    expect(snapL2).not.toBe(activeL2);
    putU64(b, activeL2 + 8, (1n << 63n) | BigInt(snapL2));
    writeFileSync(f, b);
    return f;
  }
  const qemuWrite = (f: string, mode: string) => {
    const r = run('sh', ['-c', `qemu-io --image-opts -c 'write -P 5 4k 512' driver=qcow2,overlap-check=${mode},file.filename=${f} 2>&1; echo "rc=$?"`]);
    return r;
  };

  it('overlap-check=all: both refuse a write into an inactive L2 table (QEMU: "overlaps with inactive L2 table")', async () => {
    const a = damaged('all-q.qcow2');
    const b = damaged('all-l.qcow2');
    const qr = qemuWrite(a, 'all');
    expect(qr).toContain('Preventing invalid write on metadata (overlaps with inactive L2 table)');
    expect(qr).toContain('rc=1');
    const lr = await runCli('io', '--image-opts', '-c', 'write -P 5 4k 512', `driver=qcow2,overlap-check=all,file.filename=${b}`);
    expect(lr.code).toBe(1);
    expect(lr.err).toContain('Preventing invalid write on metadata (overlaps with inactive L2 table)');
    // both marked the image corrupt, and neither wrote the data
    for (const f of [a, b]) expect(Number(u64big(readFileSync(f), 72) & 2n)).toBe(2);
    expect(readFileSync(a).subarray(0, 72).equals(readFileSync(b).subarray(0, 72))).toBe(true);
  });

  it('overlap-check=cached (QEMU\'s default) lets both write there; qledger\'s default (all) refuses', async () => {
    const a = damaged('cached-q.qcow2');
    const b = damaged('cached-l.qcow2');
    expect(qemuWrite(a, 'cached')).toContain('rc=0');
    const lr = await runCli('io', '--overlap-check=cached', '-c', 'write -P 5 4k 512', b);
    expect(lr.code).toBe(0);
    // both wrote the guest bytes where the damaged entry points (over the snapshot's L2 table)
    for (const f of [a, b]) expect(qemuIo(f, ['read -P 5 4k 512'], ['-r'])).toContain('read 512/512 bytes');
    const c = damaged('default-l.qcow2');
    const dr = await runCli('io', '-c', 'write -P 5 4k 512', c);
    expect(dr.code).toBe(1);
    expect(dr.err).toContain('overlaps with inactive L2 table');
  });

  it('an unknown mode gets QEMU\'s message', async () => {
    const f = damaged('bad-mode.qcow2');
    const lr = await runCli('io', '--image-opts', '-c', 'read 0 512', `driver=qcow2,overlap-check=some,file.filename=${f}`);
    expect(lr.code).toBe(1);
    expect(lr.err).toContain("Unsupported value 'some' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all");
  });
});
