/**
 * The crash-injection harness: random workloads on images of many kinds,
 * every crash state within the budget judged by the oracles (no corruption,
 * flushed data intact, no stale data, recovery clean, qemu-img check on a
 * sample). And the proof that it bites: with each fault switch, which
 * breaks one ordering rule, the same random search finds a failing state.
 *
 * Budget: QLEDGER_CRASH_RUNS workloads per kind (default 4) and
 * QLEDGER_CRASH_STATES states per workload (default 120). A failure prints
 * fast-check's seed and path and a `qledger` command line that replays the
 * shrunk workload.
 */

import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { crashTest, reproduction, workloadCommands, type GuestOp, type CrashTestOptions } from '../src/harness/crash-harness.ts';
import { parseWorkload } from '../src/harness/workload.ts';
import { FAULTS, OVERLAP_FAULTS, type Fault } from '../src/engine/faults.ts';
import type { CreateOptions } from '../src/engine/create.ts';
import { readFileSync } from 'node:fs';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const RUNS = Number(process.env['QLEDGER_CRASH_RUNS'] ?? 4);
const STATES = Number(process.env['QLEDGER_CRASH_STATES'] ?? 120);
const SIZE = 1 << 20;

interface Kind {
  readonly name: string;
  readonly create: CreateOptions;
  readonly backing?: Uint8Array;
  readonly backingFormat?: 'raw' | 'qcow2';
  /** a QEMU-made starting image, built once */
  readonly image?: () => Uint8Array;
  /** a QEMU-made backing file, built once */
  readonly backingBytes?: () => Uint8Array;
}

/** Bytes of an image QEMU makes in a scratch directory, built on first use. */
function qemuMade(build: (dir: string) => string): () => Uint8Array {
  let bytes: Uint8Array | undefined;
  return () => {
    if (!bytes) {
      const t = tempDir('qledger-crash-qemu-');
      try {
        bytes = new Uint8Array(readFileSync(build(t.dir)));
      } finally {
        t.cleanup();
      }
    }
    return bytes;
  };
}

/** A qcow2 backing file QEMU wrote, compressed and zero clusters included. */
const qcow2Backing = qemuMade((dir) => {
  const f = `${dir}/base.qcow2`;
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, String(SIZE)]);
  qemuIo(f, ['write -P 0x21 0 512k', 'write -c -P 0x22 512k 64k', 'write -z 64k 64k', 'write -P 0x23 768k 128k']);
  return f;
});

/** QEMU writes an image, snapshots it twice, writes between: clusters and L2 tables shared with snapshots. */
const snapshotImage = qemuMade((dir) => {
  const f = `${dir}/snap.qcow2`;
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, String(SIZE)]);
  qemuIo(f, ['write -P 1 0 256k', 'write -P 2 512k 64k']);
  qemuImg(['snapshot', '-c', 'one', f]);
  qemuIo(f, ['write -P 3 8k 8k']);
  qemuImg(['snapshot', '-c', 'two', f]);
  return f;
});

const backingData = (() => {
  const b = new Uint8Array(SIZE);
  for (let i = 0; i < SIZE; i += 512) b.fill((i >> 9) % 251 + 1, i, i + 512);
  return b;
})();

const KINDS: Kind[] = [
  { name: '4 KiB clusters', create: { size: SIZE, clusterSize: 4096 } },
  { name: '512 B clusters, 64-bit refcounts', create: { size: SIZE, clusterSize: 512, refcountBits: 64 } },
  { name: '64 KiB clusters, 1-bit refcounts', create: { size: SIZE, refcountBits: 1 } },
  { name: 'v2, 4 KiB clusters', create: { size: SIZE, clusterSize: 4096, compat: '0.10' } },
  { name: 'extended L2, 16 KiB clusters', create: { size: SIZE, clusterSize: 16384, extendedL2: true } },
  { name: 'lazy refcounts, 2 KiB clusters', create: { size: SIZE, clusterSize: 2048, lazyRefcounts: true } },
  { name: 'over a raw backing file, 4 KiB clusters', create: { size: SIZE, clusterSize: 4096 }, backing: backingData },
  { name: 'v2 over a raw backing file, 8 KiB clusters', create: { size: SIZE, clusterSize: 8192, compat: '0.10' }, backing: backingData },
  { name: 'zstd compression, 4 KiB clusters', create: { size: SIZE, clusterSize: 4096, compressionType: 'zstd' as const } },
  ...(qemuAvailable
    ? [
        { name: 'internal snapshots sharing clusters and L2 tables (QEMU-made)', create: { size: SIZE, clusterSize: 4096 }, image: snapshotImage },
        { name: 'over a qcow2 backing file (QEMU-made, compressed and zero clusters)', create: { size: SIZE, clusterSize: 8192 }, backingBytes: qcow2Backing, backingFormat: 'qcow2' as const },
        { name: 'v2 over a qcow2 backing file (QEMU-made)', create: { size: SIZE, clusterSize: 4096, compat: '0.10' }, backingBytes: qcow2Backing, backingFormat: 'qcow2' as const },
      ]
    : []),
];

/**
 * Whole clusters anywhere, unaligned ranges anywhere, and whole clusters in
 * a small hot area, so that frees, reuse and overwrites meet often.
 */
function ranges(size: number, cs: number): fc.Arbitrary<readonly [number, number]> {
  return fc.oneof(
    fc.tuple(fc.integer({ min: 0, max: size / cs - 1 }), fc.integer({ min: 1, max: 4 })).map(([c, n]) => [c * cs, Math.min(n * cs, size - c * cs)] as const),
    fc.tuple(fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 1, max: 2 * cs + 300 })).map(([o, l]) => [o, Math.min(l, size - o)] as const),
    fc.tuple(fc.integer({ min: 0, max: 7 }), fc.integer({ min: 1, max: 2 })).map(([c, n]) => [c * cs, n * cs] as const),
  );
}

function workload(size: number, cs: number): fc.Arbitrary<GuestOp[]> {
  const range = ranges(size, cs);
  const op: fc.Arbitrary<GuestOp> = fc.oneof(
    { weight: 5, arbitrary: fc.tuple(range, fc.integer({ min: 1, max: 255 })).map(([[offset, length], pattern]) => ({ op: 'write' as const, offset, length, pattern })) },
    { weight: 2, arbitrary: fc.tuple(range, fc.boolean()).map(([[offset, length], unmap]) => ({ op: 'zero' as const, offset, length, unmap })) },
    { weight: 2, arbitrary: range.map(([offset, length]) => ({ op: 'discard' as const, offset, length })) },
    { weight: 3, arbitrary: fc.constant({ op: 'flush' as const }) },
  );
  // an occasional growth (L1 table swap) at the end of the workload
  return fc.tuple(fc.array(op, { minLength: 1, maxLength: 10 }), fc.boolean()).map(([ops, grow]) => (grow ? [...ops, { op: 'truncate' as const, size: size * 4 }, { op: 'write' as const, offset: size * 3, length: 4096, pattern: 9 }] : ops));
}

/** The faults of the snapshot operations' ordering rules: their search needs workloads with snapshots. */
const SNAPSHOT_FAULTS: readonly Fault[] = ['unshare-with-increment', 'snapshot-before-refcounts', 'copied-before-free', 'refcount-switch-early'];

/** The faults of the bitmaps' ordering rules: their search needs workloads with bitmaps. */
const BITMAP_FAULTS: readonly Fault[] = ['bitmaps-before-refcounts', 'bitmaps-in-use-late'];

/** A bitmap added, writes it tracks in two sessions. */
function bitmapWorkload(size: number, cs: number): fc.Arbitrary<GuestOp[]> {
  const writes = fc.array(fc.tuple(ranges(size, cs), fc.integer({ min: 1, max: 255 })).map(([[offset, length], pattern]): GuestOp => ({ op: 'write', offset, length, pattern })), { minLength: 1, maxLength: 4 });
  return fc.tuple(writes, writes).map(([a, b]): GuestOp[] => [{ op: 'bitmap', action: 'add', name: 'a', granularity: 4096 }, ...a, { op: 'flush' }, { op: 'reopen' }, ...b, { op: 'bitmap', action: 'add', name: 'b' }, { op: 'flush' }]);
}

/** The faults of make_empty's ordering rules: their search needs workloads that empty the image. */
const EMPTY_FAULTS: readonly Fault[] = ['cut-before-journal-retired', 'retire-before-checkpoint', 'empty-switch-early'];

/** Writes, flushed (the journal starts past them), then the image emptied (in the session, or between sessions as qledger commit does), then writes again (a new journal). */
function emptyWorkload(size: number, cs: number): fc.Arbitrary<GuestOp[]> {
  const writes = fc.array(fc.tuple(ranges(size, cs), fc.integer({ min: 1, max: 255 })).map(([[offset, length], pattern]): GuestOp => ({ op: 'write', offset, length, pattern })), { minLength: 1, maxLength: 4 });
  return fc.tuple(writes, writes, fc.boolean()).map(([a, b, offline]): GuestOp[] => [...a, { op: 'flush' }, { op: 'make-empty', offline }, ...b, { op: 'flush' }]);
}

/** The faults of dedup's ordering rule: their search needs dedup workloads. */
const DEDUP_FAULTS: readonly Fault[] = ['moved-unshare-late'];

/** Dedup: a cluster written, flushed, shared by a second write, then copied away by a partial write, all before one write-back. */
function shareUndoneWorkload(size: number, cs: number): fc.Arbitrary<GuestOp[]> {
  const n = size / cs;
  return fc.tuple(fc.integer({ min: 1, max: n / 2 - 1 }), fc.integer({ min: n / 2, max: n - 1 }), fc.integer({ min: 1, max: cs - 1 }), fc.integer({ min: 1, max: 3 })).map(([a, b, cut, pattern]): GuestOp[] => [
    { op: 'write', offset: a * cs, length: cs, pattern },
    { op: 'flush' },
    { op: 'write', offset: b * cs, length: cs, pattern },
    { op: 'write', offset: a * cs - cut, length: 2 * cut, pattern },
    { op: 'flush' },
  ]);
}

/** Writes, a snapshot, writes over it (copy-on-write), then the snapshot applied or deleted. */
function snapshotWorkload(size: number, cs: number): fc.Arbitrary<GuestOp[]> {
  const writes = fc.array(fc.tuple(ranges(size, cs), fc.integer({ min: 1, max: 255 })).map(([[offset, length], pattern]): GuestOp => ({ op: 'write', offset, length, pattern })), { minLength: 1, maxLength: 4 });
  return fc.tuple(writes, writes, fc.constantFrom('apply' as const, 'delete' as const)).map(([a, b, action]): GuestOp[] => [
    ...a,
    { op: 'snapshot' as const, action: 'create' as const, name: 's' },
    ...b,
    { op: 'snapshot' as const, action, name: 's' },
    { op: 'amend' as const, option: 'refcount_bits' as const, value: '64' },
    ...a,
  ]);
}

async function judge(ops: GuestOp[], kind: Kind, extra: Partial<CrashTestOptions> = {}) {
  const o: CrashTestOptions = { create: kind.create, backing: kind.backing ?? kind.backingBytes?.(), backingFormat: kind.backingFormat, image: kind.image?.(), maxStates: STATES, seed: 7, qemuSamples: qemuAvailable ? 2 : 0, ...extra };
  const r = await crashTest(ops, o);
  return { r, repro: reproduction(ops, o) };
}

/**
 * Model-based form: one command class per operation. Running a command only
 * appends it to the workload (the model); the harness then runs the whole
 * workload on a recording device and judges its crash states. fast-check
 * shrinks failing command lists like any other.
 */
interface Workload {
  ops: GuestOp[];
}
class OpCommand implements fc.AsyncCommand<Workload, object> {
  constructor(readonly op: GuestOp) {}
  /** a guest range must lie inside the disk as the workload has sized it so far (a shrink makes it smaller) */
  check(m: Readonly<Workload>): boolean {
    const op = this.op;
    if (op.op === 'flush' || op.op === 'truncate' || op.op === 'make-empty' || op.op === 'snapshot' || op.op === 'amend' || op.op === 'dedup' || op.op === 'bitmap' || op.op === 'reopen' || op.op === 'rebase' || op.op === 'commit') return true;
    const last = [...m.ops].reverse().find((o) => o.op === 'truncate');
    const size = last?.op === 'truncate' ? last.size : Infinity;
    return op.offset + op.length <= size;
  }
  async run(m: Workload) {
    m.ops.push(this.op);
  }
  toString = () => workloadCommands([this.op])[0]!;
}
class WriteCommand extends OpCommand {}
class ZeroCommand extends OpCommand {}
class CompressCommand extends OpCommand {}
class DiscardCommand extends OpCommand {}
class FlushCommand extends OpCommand {}
class GrowCommand extends OpCommand {
  override check(m: Readonly<Workload>): boolean {
    return !m.ops.some((o) => o.op === 'truncate');
  }
}
/** qemu-img resize --shrink to half: mappings past the end dropped, whole L2 tables unhooked (snapshot-shared ones copied first) */
class ShrinkCommand extends GrowCommand {}
/** qemu-img commit's make_empty: every mapping of the active tree dropped in one transaction */
class MakeEmptyCommand extends OpCommand {}
/** qledger commit's make_empty: between sessions, O(1) where the image allows it */
class MakeEmptyOfflineCommand extends OpCommand {}

/** The snapshots a workload holds after its operations so far, by name, in table order. */
function snapshotsOf(ops: readonly GuestOp[]): string[] {
  const out: string[] = [];
  for (const o of ops) {
    if (o.op !== 'snapshot') continue;
    if (o.action === 'create') out.push(o.name);
    else if (o.action === 'delete' && out.includes(o.name)) out.splice(out.indexOf(o.name), 1);
  }
  return out;
}
/** qemu-img snapshot -c: +1 on the active tree, COPIED cleared, a new snapshot table (at most three) */
class SnapshotCreateCommand extends OpCommand {
  override check(m: Readonly<Workload>): boolean {
    return snapshotsOf(m.ops).length < 3;
  }
}
/** qemu-img snapshot -a: the snapshot's tree becomes the active one (a snapshot the workload holds) */
class SnapshotApplyCommand extends OpCommand {
  override check(m: Readonly<Workload>): boolean {
    return this.op.op === 'snapshot' && snapshotsOf(m.ops).includes(this.op.name);
  }
}
/** qemu-img snapshot -d: −1 on the snapshot's tree, COPIED set again where one reference is left */
class SnapshotDeleteCommand extends SnapshotApplyCommand {}
/** qemu-img amend -o refcount_bits=N: a new refcount structure, switched to by one header sector */
class AmendRefcountBitsCommand extends OpCommand {}
/** qemu-img amend -o compat=1.1 / 0.10: the header rewritten (zero clusters expanded first for v2) */
class AmendCompatCommand extends OpCommand {}
/** qemu-img bitmap --add: a new directory with the bitmap (and its empty table), the extension switched to it */
class BitmapAddCommand extends OpCommand {}
/** qemu-img bitmap --remove: a directory without it, its table and data freed after the switch */
class BitmapRemoveCommand extends OpCommand {}
/** qemu-img bitmap --clear / --enable / --disable: a new directory (and table) with the change */
class BitmapChangeCommand extends OpCommand {}
/** a clean close and a new session: the tracked bitmaps stored (in use cleared), a new session marks them in use again */
class ReopenCommand extends OpCommand {}
/** qemu-img rebase [-u] -b '': onto no backing file, the backing file's data copied in first unless -u (a no-op without one) */
class RebaseFlattenCommand extends OpCommand {}
/** qemu-img commit: the top's data into its backing file, then the top emptied (once per workload; a no-op without one) */
class CommitCommand extends OpCommand {}

/** The bitmap commands of a workload: bitmaps 'a' (granularity 4 KiB) and 'b' (the default), as qemu-img bitmap does them. */
function bitmapCommandArbs() {
  return [
    ...(['a', 'b'] as const).flatMap((name) => [
      fc.constant(new BitmapAddCommand({ op: 'bitmap', action: 'add', name, granularity: name === 'a' ? 4096 : undefined })),
      fc.constant(new BitmapRemoveCommand({ op: 'bitmap', action: 'remove', name })),
      fc.constantFrom('clear' as const, 'enable' as const, 'disable' as const).map((action) => new BitmapChangeCommand({ op: 'bitmap', action, name })),
    ]),
    fc.constant(new ReopenCommand({ op: 'reopen' })),
  ];
}

function commands(size: number, cs: number) {
  const range = ranges(size, cs);
  return fc.commands(
    [
      fc.tuple(range, fc.integer({ min: 0, max: 255 })).map(([[offset, length], pattern]) => new WriteCommand({ op: 'write', offset, length, pattern })),
      fc.tuple(range, fc.boolean()).map(([[offset, length], unmap]) => new ZeroCommand({ op: 'zero', offset, length, unmap })),
      fc.tuple(fc.integer({ min: 0, max: size / cs - 2 }), fc.integer({ min: 1, max: 2 }), fc.integer({ min: 0, max: 255 })).map(
        ([c, n, pattern]) => new CompressCommand({ op: 'compress', offset: c * cs, length: n * cs, pattern }),
      ),
      range.map(([offset, length]) => new DiscardCommand({ op: 'discard', offset, length })),
      fc.constant(new FlushCommand({ op: 'flush' })),
      fc.constant(new GrowCommand({ op: 'truncate', size: size * 4 })),
      fc.constant(new ShrinkCommand({ op: 'truncate', size: size / 2 })),
      fc.constant(new MakeEmptyCommand({ op: 'make-empty' })),
      fc.constant(new MakeEmptyOfflineCommand({ op: 'make-empty', offline: true })),
      fc.constantFrom('64', '8', '16').map((value) => new AmendRefcountBitsCommand({ op: 'amend', option: 'refcount_bits', value })),
      fc.constantFrom('1.1', '0.10').map((value) => new AmendCompatCommand({ op: 'amend', option: 'compat', value })),
      ...(['a', 'b'] as const).flatMap((name) => [
        fc.constant(new SnapshotCreateCommand({ op: 'snapshot', action: 'create', name })),
        fc.constant(new SnapshotApplyCommand({ op: 'snapshot', action: 'apply', name })),
        fc.constant(new SnapshotDeleteCommand({ op: 'snapshot', action: 'delete', name })),
      ]),
      ...bitmapCommandArbs(),
      fc.boolean().map((unsafe) => new RebaseFlattenCommand({ op: 'rebase', unsafe })),
      fc.constant(new CommitCommand({ op: 'commit' })),
    ],
    { maxCommands: 10 },
  );
}

/** Bitmap workloads: writes, zero writes, discards and flushes tracked by bitmaps added, changed and removed, across sessions. */
function bitmapCommands(size: number, cs: number) {
  const range = ranges(size, cs);
  return fc.commands(
    [
      fc.tuple(range, fc.integer({ min: 1, max: 255 })).map(([[offset, length], pattern]) => new WriteCommand({ op: 'write', offset, length, pattern })),
      fc.tuple(range, fc.boolean()).map(([[offset, length], unmap]) => new ZeroCommand({ op: 'zero', offset, length, unmap })),
      range.map(([offset, length]) => new DiscardCommand({ op: 'discard', offset, length })),
      fc.constant(new FlushCommand({ op: 'flush' })),
      fc.constant(new GrowCommand({ op: 'truncate', size: size * 2 })),
      ...bitmapCommandArbs(),
      ...bitmapCommandArbs().slice(0, 1),
    ],
    { maxCommands: 12 },
  );
}

describe('crash states of bitmap workloads (bitmaps added, tracked, stored, cleared, removed, across sessions)', () => {
  for (const journal of [true, false]) {
    it(`journal ${journal ? 'on: no leak after recovery' : 'off: leaks at worst'}; a bitmap not in use marks every granule written since its add`, async () => {
      const kind: Kind = { name: 'bitmaps', create: { size: SIZE, clusterSize: 4096 } };
      await fc.assert(
        fc.asyncProperty(bitmapCommands(SIZE, 4096), async (cmds) => {
          const model: Workload = { ops: [] };
          await fc.asyncModelRun(() => ({ model, real: {} }), cmds);
          if (model.ops.length === 0) return;
          const { r, repro } = await judge(model.ops, kind, { journal });
          expect(r.failures, `${r.failures.slice(0, 3).map((f) => `${f.state}: ${f.problem}`).join('\n')}\nreplay: ${repro}`).toEqual([]);
          if (journal) expect(r.leaksAfterRecovery).toBe(0);
        }),
        { numRuns: RUNS },
      );
    });
  }
});

describe('crash states of random workloads: leaks at worst, never corruption', () => {
  for (const kind of KINDS) {
    it(kind.name, async () => {
      await fc.assert(
        fc.asyncProperty(commands(SIZE, kind.create.clusterSize ?? 65536), async (cmds) => {
          const model: Workload = { ops: [] };
          await fc.asyncModelRun(() => ({ model, real: {} }), cmds);
          if (model.ops.length === 0) return;
          const { r, repro } = await judge(model.ops, kind);
          expect(r.failures, `${r.failures.slice(0, 3).map((f) => `${f.state}: ${f.problem}`).join('\n')}\nreplay: ${repro}`).toEqual([]);
          expect(r.states).toBeGreaterThan(0);
        }),
        { numRuns: RUNS },
      );
    });
  }
});

/** Dedup: a whole-cluster write of one of three patterns (clusters repeat, so the session shares them) */
class DupWriteCommand extends OpCommand {}
/** Dedup: a partial write, which lands in a shared cluster as often as not (it is copied first) */
class WriteIntoSharedCommand extends OpCommand {}
/** qledger dedup: the offline merge of the active tree (workload line `dedup`) */
class OfflineDedupCommand extends OpCommand {}

function dedupCommands(size: number, cs: number) {
  const clusters = fc.tuple(fc.integer({ min: 0, max: size / cs - 1 }), fc.integer({ min: 1, max: 3 })).map(([c, n]) => [c * cs, Math.min(n, size / cs - c) * cs] as const);
  return fc.commands(
    [
      fc.tuple(clusters, fc.integer({ min: 1, max: 3 })).map(([[offset, length], pattern]) => new DupWriteCommand({ op: 'write', offset, length, pattern })),
      fc.tuple(fc.integer({ min: 0, max: size - 700 }), fc.integer({ min: 1, max: 700 }), fc.integer({ min: 1, max: 3 })).map(([offset, length, pattern]) => new WriteIntoSharedCommand({ op: 'write', offset, length, pattern })),
      fc.constant(new OfflineDedupCommand({ op: 'dedup' })),
      clusters.map(([offset, length]) => new DiscardCommand({ op: 'discard', offset, length })),
      fc.constant(new FlushCommand({ op: 'flush' })),
      fc.constant(new SnapshotCreateCommand({ op: 'snapshot', action: 'create', name: 'a' })),
      fc.constant(new SnapshotDeleteCommand({ op: 'snapshot', action: 'delete', name: 'a' })),
    ],
    { maxCommands: 10 },
  );
}

describe('crash states of dedup workloads (shares, writes into shared clusters, offline merges, snapshots)', () => {
  for (const journal of [true, false]) {
    it(`journal ${journal ? 'on: no leak after recovery' : 'off: leaks (and the harmless COPIED state) at worst'}`, async () => {
      const kind: Kind = { name: 'dedup', create: { size: SIZE, clusterSize: 4096 } };
      await fc.assert(
        fc.asyncProperty(dedupCommands(SIZE, 4096), async (cmds) => {
          const model: Workload = { ops: [] };
          await fc.asyncModelRun(() => ({ model, real: {} }), cmds);
          if (model.ops.length === 0) return;
          const { r, repro } = await judge(model.ops, kind, { dedup: true, journal });
          expect(r.failures, `${r.failures.slice(0, 3).map((f) => `${f.state}: ${f.problem}`).join('\n')}\nreplay: ${repro}`).toEqual([]);
          if (journal) expect(r.leaksAfterRecovery).toBe(0);
        }),
        { numRuns: RUNS },
      );
    });
  }
});

describe('the harness bites: every fault switch is caught within the default budget', () => {
  // the chain faults need a backing file: crash-chain.test.ts
  for (const fault of (Object.keys(FAULTS) as Fault[]).filter((f) => !OVERLAP_FAULTS.includes(f) && f !== 'rebase-switch-early' && f !== 'commit-empty-early')) {
    it(`${fault}: ${FAULTS[fault]}`, async () => {
      // the same random search as above, with the fault switched on; some
      // workload of the first few must produce a failing crash state
      const kind = fault === 'data-after-mapping' ? KINDS[6]! : KINDS[0]!;
      const dedup = DEDUP_FAULTS.includes(fault);
      const search = dedup ? shareUndoneWorkload(SIZE, 4096) : EMPTY_FAULTS.includes(fault) ? emptyWorkload(SIZE, 4096) : SNAPSHOT_FAULTS.includes(fault) ? snapshotWorkload(SIZE, 4096) : BITMAP_FAULTS.includes(fault) ? bitmapWorkload(SIZE, 4096) : workload(SIZE, 4096);
      const samples = fc.sample(search, { numRuns: 60, seed: 42 });
      let found: string | undefined;
      for (const ops of samples) {
        const { r } = await judge(ops, kind, { fault, stopAtFirst: true, qemuSamples: 0, dedup, journal: !dedup });
        if (r.failures.length) {
          found = `${r.failures[0]!.state}: ${r.failures[0]!.problem}`;
          break;
        }
      }
      expect(found, `no failing crash state found with fault ${fault}`).toBeDefined();
    });
  }
});

describe('allocator and cache faults: the overlap index refuses them, and no crash state is corrupt', () => {
  for (const fault of OVERLAP_FAULTS) {
    it(`${fault}: ${FAULTS[fault]}`, async () => {
      // the same random search: some workload must run into the fault, and then the
      // harness reports the refusal and finds every crash state sound (leaks at worst)
      // Metadata freed and not yet durable: qledger frees metadata inside an operation only when the
      // refcount table grows (an L1 move and a shrink write back at once), so that fault gets a
      // workload that grows it: 512-byte clusters with 64-bit refcounts, one table cluster per 2 MiB.
      const grow: Kind = { name: 'refcount table growth', create: { size: 4 << 20, clusterSize: 512, refcountBits: 64 } };
      const growOps: GuestOp[] = [0, 1, 2].map((i) => ({ op: 'write', offset: i << 20, length: 1 << 20, pattern: i + 1 }));
      const [samples, kind] = fault === 'reuse-freed-metadata' ? [[growOps], grow] : [fc.sample(workload(SIZE, 4096), { numRuns: 60, seed: 42 }), KINDS[0]!];
      let refused = 0;
      for (const ops of samples) {
        const { r, repro } = await judge(ops, kind, { fault, qemuSamples: 0, maxStates: 40 });
        expect(r.failures, `${r.failures.slice(0, 3).map((f) => `${f.state}: ${f.problem}`).join('\n')}\nreplay: ${repro}`).toEqual([]);
        if (r.refusal) {
          expect(r.refusal).toMatch(/^crash\.qcow2: Preventing invalid write on metadata \(overlaps with [A-Za-z0-9_ ]+\): .* at 0x[0-9a-f]+ (\(\d+ bytes\) would overwrite|was placed on) the /);
          if (++refused === 3) break;
        }
      }
      expect(refused, `no workload ran into fault ${fault}`).toBeGreaterThan(0);
    });
  }
});

describe('qledger crash-test (CLI)', () => {
  const cli = runCli;

  it('--fault list prints one name a line', async () => {
    const r = await cli('crash-test', '--fault', 'list');
    expect(r.code).toBe(0);
    expect(r.out.trim().split('\n').map((l) => l.split('\t')[0])).toEqual(Object.keys(FAULTS));
  });

  it('random workloads: JSON keys, exit 0 with no corruption', async () => {
    const r = await cli('crash-test', '-o', 'cluster_size=4k,size=512k', '--random', '--runs', '3', '--seed', '5', '--max-states', '60', '--output=json');
    expect(r.code).toBe(0);
    const j = JSON.parse(r.out);
    expect(Object.keys(j)).toEqual(['workloads', 'states', 'corruptions', 'data-errors', 'leaks', 'journal-replays', 'leaks-after-recovery', 'copied-clear', 'states-per-second', 'overlap-refusals', 'failures']);
    expect(j['leaks-after-recovery']).toBe(0);
    expect(j.workloads).toBe(3);
    expect(j.states).toBeGreaterThan(0);
    expect(j.failures).toEqual([]);
  });

  it('a workload file with a fault: caught, exit 2, with a command line that replays it', async () => {
    const { writeFileSync, mkdtempSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const f = join(mkdtempSync(join(tmpdir(), 'qledger-wl-')), 'w.txt');
    writeFileSync(f, '# allocate, make it durable, free it\nwrite -P 1 0 4k\nflush\ndiscard 0 4k\nflush\n');
    const r = await cli('crash-test', '-o', 'cluster_size=4k', '--workload', f, '--fault', 'free-before-unmap');
    expect(r.code).toBe(2);
    expect(r.out).toMatch(/corruptions: [1-9]/);
    expect(r.out).toContain("replay: qledger create -f qcow2 -o cluster_size=4096 crash.qcow2 1048576 && qledger io -c 'write -P 1 0 4096' -c 'flush' -c 'discard 0 4096' -c 'flush' crash.qcow2");
    const clean = await cli('crash-test', '-o', 'cluster_size=4k', '--workload', f);
    expect(clean.code).toBe(0);
  });

  it('snapshot lines in a workload file: journal on, nothing left after recovery; off, only the harmless COPIED finding besides leaks', async () => {
    const { writeFileSync, mkdtempSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const f = join(mkdtempSync(join(tmpdir(), 'qledger-wl-')), 'w.txt');
    writeFileSync(f, ['write -P 1 0 256k', 'flush', 'snapshot_create a', 'write -P 2 0 8k', 'snapshot_create b', 'write -P 3 64k 64k', 'snapshot_delete a', 'snapshot_apply b', 'snapshot_delete b', ''].join('\n'));
    const on = JSON.parse((await cli('crash-test', '-o', 'cluster_size=4k', '--workload', f, '--max-states', '150', '--output=json')).out);
    expect([on.corruptions, on['data-errors'], on['leaks-after-recovery']]).toEqual([0, 0, 0]);
    expect(on['journal-replays']).toBeGreaterThan(0);
    const off = JSON.parse((await cli('crash-test', '-o', 'cluster_size=4k', '--workload', f, '--max-states', '150', '--journal=off', '--output=json')).out);
    expect([off.corruptions, off['data-errors']]).toEqual([0, 0]);
    // a crash between a delete's decrement and its COPIED change: the window no order closes without the journal
    expect(off['copied-clear']).toBeGreaterThan(0);
    const bad = await cli('crash-test', '-o', 'cluster_size=4k', '--workload', f, '--max-states', '150', '--fault', 'copied-before-free');
    expect(bad.code).toBe(2);
    expect(bad.out).toContain("replay: printf '%s\\n' 'write -P 1 0 262144' 'flush' 'snapshot_create a'");
  });

  it('make_empty after bitmap commands over a raw backing file, in the session and between sessions: no corruption (regression: retiring the journal moved the bitmaps extension under the session)', async () => {
    for (const line of ['make_empty', 'make_empty_offline']) {
      const ops = parseWorkload(['bitmap_add b', 'bitmap_remove b', 'bitmap_add a 4096', line, 'bitmap_clear a', 'bitmap_remove b'].join('\n'));
      const { r, repro } = await judge(ops, KINDS[6]!);
      expect(r.failures, `${r.failures.slice(0, 2).map((f) => `${f.state}: ${f.problem}`).join('\n')}\nreplay: ${repro}`).toEqual([]);
      expect(r.leaksAfterRecovery).toBe(0);
    }
  });

  it('a snapshot applied after the image was flattened reads zeros where its tree allocates nothing, as QEMU reads it (regression: the model kept the content it had over the old backing file; found by seed 1144488082)', async () => {
    const kind = KINDS.find((k) => k.name === 'over a raw backing file, 4 KiB clusters')!;
    for (const text of [['snapshot_create b', 'rebase_flatten', 'snapshot_apply b'], ['write -P 7 8192 4096', 'snapshot_create b', 'rebase_flatten', 'write -P 9 0 8192', 'snapshot_apply b']]) {
      const ops = parseWorkload(text.join('\n'));
      const { r, repro } = await judge(ops, kind);
      expect(r.failures, `${r.failures.slice(0, 2).map((f) => `${f.state}: ${f.problem}`).join('\n')}\nreplay: ${repro}`).toEqual([]);
      expect(r.states).toBeGreaterThan(0);
    }
  });

  it('bad options are one-line errors', async () => {
    expect((await cli('crash-test', '--fault', 'nope')).err).toBe("qledger: crash-test: unknown fault 'nope' (try --fault list)\n");
    expect((await cli('crash-test', '--runs', '-1')).code).toBe(1);
  });
});

/** The first ordering violation in the trace of a workload, if any. */
async function traceViolation(ops: GuestOp[], cs: number, fault?: Fault): Promise<string | undefined> {
  const { MemoryDevice } = await import('../src/io/memory-device.ts');
  const { createOnDevice, openWriterOnDevice } = await import('../src/engine/writable.ts');
  const PHASES = ['journal', 'clear COPIED', 'allocate', 'hook refcount blocks', 'reference', 'publish snapshot table', 'free', 'set COPIED'];
  const dev = new MemoryDevice('t');
  await createOnDevice(dev, 't', { size: SIZE, clusterSize: cs });
  const trace: import('../src/engine/writer.ts').TraceEvent[] = [];
  const w = await openWriterOnDevice(dev, 't', { trace, fault });
  for (const o of ops) {
    if (o.op === 'write') await w.write(o.offset, new Uint8Array(o.length).fill(o.pattern));
    else if (o.op === 'zero') await w.writeZeroes(o.offset, o.length, { unmap: o.unmap });
    else if (o.op === 'discard') await w.discard(o.offset, o.length);
    else if (o.op === 'flush') await w.flush();
    else if (o.op === 'compress') await w.writeCompressed(o.offset, new Uint8Array(o.length).fill(o.pattern)).catch(() => undefined);
    else if (o.op === 'make-empty') await w.makeEmpty();
    else if (o.op === 'snapshot') await (o.action === 'create' ? w.createSnapshot(o.name) : o.action === 'apply' ? w.applySnapshot(o.name) : w.deleteSnapshot(o.name, true));
    else if (o.op === 'truncate') await w.truncate(o.size);
  }
  await w.close();
  // 1. between two barriers, metadata writes all belong to one phase of the
  //    rules, and within one write-back the phases never go backwards
  let group: string[] = [];
  let lastPhase = -1;
  for (const e of trace) {
    if (e.type === 'write') {
      const m = /\[(.+)\]$/.exec(e.what);
      // a checkpoint may ride any later barrier: it only says that earlier write-backs are in place
      // (journal set-up writes come before the first journalled write-back, each flushed on its own)
      if (m && m[1] !== 'checkpoint' && m[1] !== 'journal set-up') group.push(m[1]!);
    } else if (e.type === 'record' && e.record.kind === 'begin' && e.record.op === 'writeback') {
      lastPhase = -1;
    } else if (e.type === 'flush') {
      const phases = [...new Set(group)];
      if (phases.length > 1) return `one barrier group mixes phases: ${phases.join(', ')}`;
      if (phases.length === 1) {
        const p = PHASES.indexOf(phases[0]!);
        if (p <= lastPhase) return `phase '${phases[0]}' after '${PHASES[lastPhase]}'`;
        // with the journal live, new tables and increments never precede their transaction's commit
        if (phases[0] === 'allocate' && lastPhase < 0 && w.journalled) return `in-place writes of phase 'allocate' before the journal transaction`;
        lastPhase = p;
      }
      group = [];
    }
  }
  // 2. in the record stream, every cluster an L2 or L1 entry starts to
  //    reference got its refcount increment earlier
  const incremented = new Set<number>();
  for (const e of trace) {
    if (e.type !== 'record') continue;
    const r = e.record;
    if (r.kind === 'refcount' && r.new > r.old) incremented.add(r.cluster);
    const target = r.kind === 'l2' && (r.new.hi & 0x4000_0000) === 0 && r.old.hi !== r.new.hi ? r.new : r.kind === 'l1' ? r.new : undefined;
    if (!target) continue;
    const off = (target.hi & 0xff_ffff) * 2 ** 32 + ((target.lo & 0xffff_fe00) >>> 0);
    if (off && !incremented.has(off / cs)) return `reference to cluster ${off / cs} before its refcount increment`;
  }
  return undefined;
}

describe('ordering properties on the trace of random workloads', () => {
  it('each write-back writes its phases in order, one barrier apart; references follow their refcounts', async () => {
    await fc.assert(
      fc.asyncProperty(workload(SIZE, 4096), fc.constantFrom(512, 4096, 65536), async (ops, cs) => {
        expect(await traceViolation(ops, cs)).toBeUndefined();
      }),
      { numRuns: RUNS * 3 },
    );
  });

  for (const fault of ['l2-before-refcount', 'free-before-unmap', 'header-before-table'] as const) {
    it(`the trace property catches fault ${fault}`, async () => {
      let found: string | undefined;
      for (const ops of fc.sample(workload(SIZE, 4096), { numRuns: 60, seed: 42 })) {
        found = await traceViolation(ops, 4096, fault);
        if (found) break;
      }
      expect(found).toBeDefined();
    });
  }
});
