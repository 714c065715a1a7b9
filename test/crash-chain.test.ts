/**
 * Crash states of the chain operations on the image under test: commit
 * (its data written into its backing file through that file's own write
 * engine, made durable, then the image emptied: the chain reads the same
 * at every crash point, the backing file's crash states during the copy
 * included), and rebase
 * onto no backing file (qemu-img rebase -b '', safe: the backing file's
 * data copied into the image where it allocates nothing, then the header
 * switched; and -u: the header only), among random writes, over a raw and
 * a qcow2 backing file. Every state reads as the model allows (safe rebase
 * never changes what the guest reads), checks clean, and after the
 * journal's recovery leaks nothing. The fault 'rebase-switch-early' (the
 * header switched before the copy is durable) and the fault
 * 'commit-empty-early' (the top emptied before the backing file's writes
 * are durable) are caught.
 *
 * Budget: QLEDGER_CRASH_RUNS workloads per kind (default 4).
 */

import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { crashTest, reproduction, type CrashTestOptions, type GuestOp } from '../src/harness/crash-harness.ts';
import { parseWorkload, workloadCommands } from '../src/harness/workload.ts';
import { makeBacking } from '../src/harness/chain-base.ts';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';
import type { CreateOptions } from '../src/engine/create.ts';

const RUNS = Number(process.env['QLEDGER_CRASH_RUNS'] ?? 4);
const SIZE = 1 << 20;

interface Kind {
  readonly name: string;
  readonly create: CreateOptions;
  readonly backing: () => Promise<Uint8Array>;
  readonly backingFormat: 'raw' | 'qcow2';
}
const KINDS: Kind[] = [
  { name: 'over a raw backing file, 4 KiB clusters', create: { size: SIZE, clusterSize: 4096 }, backing: () => makeBacking('raw', SIZE), backingFormat: 'raw' },
  { name: 'v2 over a raw backing file, 8 KiB clusters', create: { size: SIZE, clusterSize: 8192, compat: '0.10' }, backing: () => makeBacking('raw', SIZE), backingFormat: 'raw' },
  { name: 'over a qcow2 backing file, 16 KiB clusters', create: { size: SIZE, clusterSize: 16384 }, backing: () => makeBacking('qcow2', SIZE), backingFormat: 'qcow2' },
];

const range = fc.tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 40_000 })).map(([o, l]) => [o, Math.min(l, SIZE - o)] as const);
const op: fc.Arbitrary<GuestOp> = fc.oneof(
  { weight: 4, arbitrary: fc.tuple(range, fc.integer({ min: 1, max: 255 })).map(([[offset, length], pattern]): GuestOp => ({ op: 'write', offset, length, pattern })) },
  { weight: 1, arbitrary: range.map(([offset, length]): GuestOp => ({ op: 'zero', offset, length, unmap: false })) },
  { weight: 1, arbitrary: range.map(([offset, length]): GuestOp => ({ op: 'discard', offset, length })) },
  { weight: 2, arbitrary: fc.constant<GuestOp>({ op: 'flush' }) },
);
/** Writes, a commit into the backing file (the top emptied), writes after it over the new backing file. */
const commitWorkload = fc.tuple(fc.array(op, { minLength: 1, maxLength: 5 }), fc.array(op, { maxLength: 3 })).map(([a, b]): GuestOp[] => [...a, { op: 'commit' }, ...b]);
/** Writes, a rebase onto no backing file (safe or -u), writes after it in the image that has none now. */
const workload = fc.tuple(fc.array(op, { minLength: 1, maxLength: 5 }), fc.boolean(), fc.array(op, { maxLength: 3 })).map(([a, unsafe, b]): GuestOp[] => [...a, { op: 'rebase', unsafe }, ...b]);

async function judge(ops: GuestOp[], kind: Kind, extra: Partial<CrashTestOptions> = {}) {
  const o: CrashTestOptions = { create: kind.create, backing: await kind.backing(), backingFormat: kind.backingFormat, maxStates: 120, seed: 11, qemuSamples: 0, ...extra };
  return { r: await crashTest(ops, o), repro: reproduction(ops, o) };
}

/** Random workloads of `kind`: no failing crash state, no corruption or wrong data, no leak after the journal's recovery (v3). */
async function everyStateSound(workloads: fc.Arbitrary<GuestOp[]>, kind: Kind): Promise<void> {
  await fc.assert(
    fc.asyncProperty(workloads, async (ops) => {
      const { r, repro } = await judge(ops, kind);
      expect(r.failures, `${r.failures.slice(0, 3).map((f) => `${f.state}: ${f.problem}`).join('\n')}\nreplay: ${repro}`).toEqual([]);
      expect(r.corruptions + r.dataErrors).toBe(0);
      if (kind.create.compat !== '0.10') expect(r.leaksAfterRecovery).toBe(0);
    }),
    { numRuns: RUNS, verbose: 1 },
  );
}

describe('rebase onto no backing file: every crash state', () => {
  for (const kind of KINDS) {
    it(kind.name, () => everyStateSound(workload, kind));
  }

  it('the workload lines parse and print back', () => {
    const ops = parseWorkload('write -P 1 0 4k\nrebase_flatten\nrebase_flatten_unsafe\ncommit\n');
    expect(ops.slice(1)).toEqual([{ op: 'rebase', unsafe: false }, { op: 'rebase', unsafe: true }, { op: 'commit' }]);
    expect(workloadCommands(ops)).toEqual(['write -P 1 0 4096', 'rebase_flatten', 'rebase_flatten_unsafe', 'commit']);
  });

  it('a rebase straight after a flush, in both modes: every state judged, no failure', async () => {
    for (const unsafe of [false, true]) {
      const ops: GuestOp[] = [{ op: 'write', offset: 4096, length: 4096, pattern: 7 }, { op: 'flush' }, { op: 'rebase', unsafe }];
      const { r } = await judge(ops, KINDS[0]!);
      expect(r.failures).toEqual([]);
      expect(r.states).toBeGreaterThan(2);
    }
  });
});

describe('commit into the backing file: every crash state of the top, and of the backing file during the copy', () => {
  for (const kind of KINDS) {
    it(kind.name, () => everyStateSound(commitWorkload, kind));
  }

  it('the copy is judged: the backing file\'s own crash states are counted', async () => {
    const ops: GuestOp[] = [{ op: 'write', offset: 0, length: 100_000, pattern: 5 }, { op: 'commit' }];
    const without = await judge([ops[0]!], KINDS[2]!);
    const withCommit = await judge(ops, KINDS[2]!);
    expect(withCommit.r.failures).toEqual([]);
    expect(withCommit.r.states).toBeGreaterThan(without.r.states + 8);
  });
});

/** The first failing crash state among the first few workloads with `fault` on, or undefined. */
async function firstFailure(samples: fc.Arbitrary<GuestOp[]>, kind: Kind, fault: 'commit-empty-early' | 'rebase-switch-early'): Promise<string | undefined> {
  for (const ops of fc.sample(samples, { numRuns: 30, seed: 42 })) {
    const { r } = await judge(ops, kind, { fault, stopAtFirst: true });
    if (r.failures.length) return `${r.failures[0]!.state}: ${r.failures[0]!.problem}`;
  }
  return undefined;
}

describe("the fault 'commit-empty-early' is caught", () => {
  for (const kind of [KINDS[0]!, KINDS[2]!]) {
    it(kind.name, async () => {
      expect(await firstFailure(commitWorkload, kind, 'commit-empty-early'), 'no failing crash state found with fault commit-empty-early').toBeDefined();
    });
  }
});

describe("the fault 'rebase-switch-early' is caught", () => {
  it('some workload of the first few fails a crash state', async () => {
    const safe = workload.map((ops) => ops.map((x): GuestOp => (x.op === 'rebase' ? { op: 'rebase', unsafe: false } : x)));
    expect(await firstFailure(safe, KINDS[0]!, 'rebase-switch-early'), 'no failing crash state found with fault rebase-switch-early').toBeDefined();
  });
});

describe('qledger crash-test --backing', () => {
  it('runs commit and rebase_flatten lines over an in-memory backing file, and catches the fault', async () => {
    const { dir, cleanup } = tempDir('qledger-crash-chain-');
    try {
      const wl = join(dir, 'w.txt');
      writeFileSync(wl, 'write -P 7 0 100k\nflush\ncommit\nwrite -P 8 4k 4k\nrebase_flatten\n');
      const ok = await runCli('crash-test', '-o', 'size=1M,cluster_size=4096', '--backing', 'qcow2', '--workload', wl, '--max-states', '60', '--output=json');
      expect(ok.code, ok.err).toBe(0);
      const j = JSON.parse(ok.out);
      expect([j.corruptions, j['data-errors'], j['leaks-after-recovery']]).toEqual([0, 0, 0]);
      expect(j.states).toBeGreaterThan(30);
      const bad = await runCli('crash-test', '-o', 'size=1M,cluster_size=4096', '--backing', 'raw', '--workload', wl, '--fault', 'commit-empty-early');
      expect(bad.code).toBe(2);
      expect(bad.out).toMatch(/replay: .* --fault commit-empty-early --backing raw/);
      const refused = await runCli('crash-test', '--backing', 'vmdk');
      expect([refused.code, refused.err]).toEqual([1, 'qledger: crash-test: --backing expects raw or qcow2\n']);
    } finally {
      cleanup();
    }
  });
});
