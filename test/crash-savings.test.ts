/**
 * The crash harness's savings (issue 19, item 6) change no verdict: crash
 * states built copy-on-write (io/paged-device.ts), the guest model kept
 * sparse (harness/guest-model.ts), the oracles memoised by what they read
 * and the data oracle restricted to what a state can change
 * (harness/crash-judge.ts), and the states shared out between threads
 * (harness/crash-worker.ts). Each is compared with the plain way on the
 * same workloads, clean and with fault switches that make states fail.
 *
 * Budget: QLEDGER_CRASH_RUNS workloads per kind and fault switch (default
 * 1; five switches, "none" included). A failing
 * workload is printed with its seed and a command line that replays it.
 */

import { describe, it, expect } from 'vitest';
import { PagedDevice } from '../src/io/paged-device.ts';
import { GuestModel } from '../src/harness/guest-model.ts';
import { crashTest, reproduction, type CrashTestOptions, type CrashTestResult } from '../src/harness/crash-harness.ts';
import { crashTestParallel } from '../src/harness/crash-worker.ts';
import { randomWorkload } from '../src/cli/crash-test.ts';
import type { Fault } from '../src/engine/faults.ts';
import type { CreateOptions } from '../src/engine/create.ts';
import { runCli } from './helpers/cli.ts';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

const RUNS = Number(process.env['QLEDGER_CRASH_RUNS'] ?? 1);

const bytes = (n: number, v: number) => new Uint8Array(n).fill(v);

describe('PagedDevice: copy-on-write crash states', () => {
  it('a clone shares pages until one side writes; neither sees the other’s writes', async () => {
    const base = bytes(3 * 4096, 7);
    const a = new PagedDevice('a', base);
    await a.write(100, bytes(10, 1));
    const b = a.clone();
    await b.write(105, bytes(10, 2));
    await a.write(5000, bytes(3, 3));
    const ra = a.snapshot();
    const rb = b.snapshot();
    expect([...ra.subarray(98, 118)]).toEqual([7, 7, ...Array(10).fill(1), ...Array(8).fill(7)]);
    expect([...rb.subarray(98, 118)]).toEqual([7, 7, 1, 1, 1, 1, 1, ...Array(10).fill(2), 7, 7, 7]);
    expect(ra[5001]).toBe(3);
    expect(rb[5001]).toBe(7);
    expect(base.every((v) => v === 7)).toBe(true);
  });

  it('a cut then a growth reads zeros where the base had bytes; reads past the end are zero', async () => {
    const d = new PagedDevice('d', bytes(10000, 9));
    await d.truncate(5000);
    await d.truncate(12000);
    await d.write(11000, bytes(4, 5));
    const out = new Uint8Array(13000).fill(0xff);
    await d.readInto(out, 0);
    expect(out.subarray(0, 5000).every((v) => v === 9)).toBe(true);
    expect(out.subarray(5000, 11000).every((v) => v === 0)).toBe(true);
    expect([...out.subarray(11000, 11004)]).toEqual([5, 5, 5, 5]);
    expect(out.subarray(11004).every((v) => v === 0)).toBe(true);
    expect(await d.size()).toBe(12000);
  });

  it('the digest is the bytes’, not the path’s: equal images digest equal, a one-byte change does not', async () => {
    const base = bytes(8192, 4);
    const a = new PagedDevice('a', base);
    await a.write(10, bytes(1, 4)); // a page written with the base's own bytes
    const b = new PagedDevice('b', base);
    expect(a.digest()).toBe(b.digest());
    const c = b.clone();
    await c.write(9000, bytes(1, 5));
    expect(c.digest()).not.toBe(b.digest());
    const e = a.clone();
    await e.write(9000, bytes(1, 5));
    expect(e.digest()).toBe(c.digest());
    await e.truncate(8000);
    expect(e.digest()).not.toBe(c.digest());
  });

  it('tracking records the ranges read, less what the reader wrote first', async () => {
    const d = new PagedDevice('d', bytes(65536, 1));
    d.track(true);
    await d.readInto(new Uint8Array(100), 0);
    await d.write(1000, bytes(500, 2));
    await d.readInto(new Uint8Array(1000), 800);
    await d.truncate(60000);
    await d.readInto(new Uint8Array(100), 59950);
    expect(d.track(false)).toEqual([
      [0, 100],
      [800, 1000],
      [1500, 1800],
      [59950, 60000],
    ]);
  });
});

describe('GuestModel: a sparse guest disk', () => {
  it('keeps only non-zero blocks and compares as the dense bytes would', () => {
    const m = new GuestModel(2 ** 40);
    m.fill(3, 2 ** 39, 2 ** 39 + 70000);
    m.set(bytes(10, 0), 5);
    const copy = m.clone();
    m.zero(2 ** 39 + 100, 2 ** 39 + 200);
    expect(m.bytes(2 ** 39 + 98, 2 ** 39 + 102)).toEqual(new Uint8Array([3, 3, 0, 0]));
    expect(copy.bytes(2 ** 39 + 98, 2 ** 39 + 102)).toEqual(new Uint8Array([3, 3, 3, 3]));
    const got = Buffer.from(bytes(512, 3));
    expect(copy.equals(got, 0, 2 ** 39, 2 ** 39 + 512)).toBe(true);
    expect(m.equals(got, 0, 2 ** 39, 2 ** 39 + 512)).toBe(false);
    expect(m.equals(Buffer.alloc(512), 0, 4096, 4608)).toBe(true);
    expect(m.blockIsZero(0)).toBe(true);
    const small = copy.resized(2 ** 39 + 10);
    expect(small.equals(Buffer.alloc(10, 3), 0, 2 ** 39, 2 ** 39 + 10)).toBe(true);
    expect(small.resized(2 ** 40).bytes(2 ** 39 + 8, 2 ** 39 + 12)).toEqual(new Uint8Array([3, 3, 0, 0]));
  });
});

interface Kind {
  readonly name: string;
  readonly create: CreateOptions;
  readonly journal?: boolean;
}

const KINDS: Kind[] = [
  { name: '4 KiB clusters', create: { size: 1 << 20, clusterSize: 4096 } },
  { name: '64 KiB clusters (growths past one L2 table: 512 MiB disks)', create: { size: 1 << 20 } },
  { name: '512 B clusters, 64-bit refcounts', create: { size: 1 << 20, clusterSize: 512, refcountBits: 64 } },
  { name: 'v2, 8 KiB clusters, journal off', create: { size: 1 << 20, clusterSize: 8192, compat: '0.10' }, journal: false },
  { name: 'extended L2, 16 KiB clusters', create: { size: 1 << 20, clusterSize: 16384, extendedL2: true } },
  { name: 'lazy refcounts, 2 KiB clusters', create: { size: 1 << 20, clusterSize: 2048, lazyRefcounts: true } },
];

const FAULTS_TRIED: Array<Fault | undefined> = [undefined, 'l2-before-refcount', 'free-before-unmap', 'header-before-table', 'data-after-mapping'];

function verdicts(r: CrashTestResult) {
  const { states, corruptions, dataErrors, leaks, leaksAfterRecovery, replayed, copiedClear } = r;
  return { states, corruptions, dataErrors, leaks, leaksAfterRecovery, replayed, copiedClear, failures: r.failures.map((f) => `${f.state}: ${f.problem}`).sort() };
}

describe('the savings change no verdict', () => {
  // the plain runs' findings, added up over every kind: the comparison has teeth only if states fail
  const found = { corruptions: 0, dataErrors: 0 };
  for (const kind of KINDS) {
    it(`${kind.name}: memoised and restricted oracles give the plain oracles’ verdicts, state by state`, async () => {
      const cs = kind.create.clusterSize ?? 65536;
      for (let i = 0; i < RUNS * FAULTS_TRIED.length; i++) {
        const seed = 4200 + i * 7 + cs;
        const fault = FAULTS_TRIED[i % FAULTS_TRIED.length];
        const ops = randomWorkload(seed, kind.create.size!, cs);
        const o: CrashTestOptions = { create: kind.create, maxStates: 150, seed, fault, journal: kind.journal };
        const saving = await crashTest(ops, o);
        const plain = await crashTest(ops, { ...o, thorough: true });
        const replay = reproduction(ops, { create: kind.create, seed, fault });
        expect(verdicts(saving), `seed ${seed}, fault ${fault ?? 'none'}: ${replay}`).toEqual(verdicts(plain));
        found.corruptions += plain.corruptions;
        found.dataErrors += plain.dataErrors;
      }
    }, 300_000);
  }
  it('the faults made states fail in the plain runs, so that the comparisons above could fail', () => {
    expect(found.corruptions).toBeGreaterThan(0);
    expect(found.dataErrors).toBeGreaterThan(0);
  });
});

describe('crash-test on threads', () => {
  const create: CreateOptions = { size: 1 << 20, clusterSize: 4096 };
  const options = { create, maxStates: 120, fault: 'free-before-unmap' as Fault };
  const workloads = [11, 12, 13].map((seed) => ({ ops: randomWorkload(seed, 1 << 20, 4096), seed }));

  it('workloads shared out (as many as threads): the same counts and failures as one thread', async () => {
    const one = await Promise.all(workloads.map((w) => crashTest(w.ops, { ...options, seed: w.seed })));
    const two = await crashTestParallel(workloads, options, 2);
    expect(two.map(verdicts)).toEqual(one.map(verdicts));
  }, 120_000);

  it('one workload, its states shared out: the same counts and failures as one thread', async () => {
    const w = workloads[2]!;
    const one = await crashTest(w.ops, { ...options, seed: w.seed });
    const [two] = await crashTestParallel([w], options, 2);
    expect(one.states).toBeGreaterThan(20);
    expect(verdicts(two!)).toEqual(verdicts(one));
  }, 120_000);

  it('qledger crash-test --jobs 2 reports what --jobs 1 does', async () => {
    const args = ['crash-test', '-o', 'cluster_size=4k', '--random', '--runs', '3', '--seed', '5', '--max-states', '80', '--output=json'];
    const a = JSON.parse((await runCli(...args, '--jobs', '1')).out);
    const b = JSON.parse((await runCli(...args, '--jobs', '2')).out);
    delete a['states-per-second'];
    delete b['states-per-second'];
    expect(b).toEqual(a);
  }, 120_000);
});

describe('crash-test threads in the qledger program', () => {
  it('tools/qledger crash-test --jobs 2 (the bundle when it is built starts its workers) reports what --jobs 1 does', () => {
    const root = new URL('..', import.meta.url).pathname;
    const run = (jobs: string) => {
      const r = spawnSync(join(root, 'tools/qledger'), ['crash-test', '-o', 'cluster_size=4k', '--random', '--runs', '4', '--seed', '8', '--max-states', '60', '--jobs', jobs, '--output=json'], { encoding: 'utf8', timeout: 120_000 });
      expect(r.status).toBe(0);
      const j = JSON.parse(r.stdout);
      delete j['states-per-second'];
      return j;
    };
    expect(run('2')).toEqual(run('1'));
  }, 150_000);
});

describe('the random search reaches every ordering rule', () => {
  it('header-before-table with the default options (64 KiB clusters): random workloads grow the disk past one L2 table, the L1 table moves, and the fault is caught', async () => {
    const r = await runCli('crash-test', '--random', '--seed', '20261121', '--runs', '10', '--fault', 'header-before-table', '--jobs', '1', '--output=json');
    expect(r.code).toBe(2);
    expect(JSON.parse(r.out).corruptions).toBeGreaterThan(0);
    const clean = await runCli('crash-test', '--random', '--seed', '20261121', '--runs', '10', '--jobs', '1', '--output=json');
    expect(clean.code).toBe(0);
  }, 120_000);
});
