/**
 * Crash-harness figures (issue 5): crash states explored per second, and
 * how many distinct crash states a 100-operation workload yields under the
 * enumeration strategy of src/io/crash-device.ts (every prefix, subsets or
 * leave-one-out, torn and reordered writes, random sector choices; the full
 * per-sector space is astronomically larger). No QEMU counterpart exists.
 * BENCH_CRASH_STATES caps the states judged for the rate (default 2000).
 * Then whole crash-test runs (issue 19, item 6), against BENCH_BASE if set.
 */

import { crashTest, type GuestOp } from '../src/harness/crash-harness.ts';
import { crashStates, RecordingDevice, rng } from '../src/io/crash-device.ts';
import { MemoryDevice } from '../src/io/memory-device.ts';
import { createOnDevice, openWriterOnDevice } from '../src/engine/writable.ts';

const SIZE = 4 << 20;
const CS = 4096;

function workload100(seed: number): GuestOp[] {
  const r = rng(seed);
  const int = (n: number) => Math.floor(r() * n);
  const ops: GuestOp[] = [];
  while (ops.length < 100) {
    const k = r();
    const aligned = r() < 0.5;
    const offset = aligned ? int(SIZE / CS) * CS : int(SIZE - 1);
    const length = Math.min(SIZE - offset, aligned ? (1 + int(4)) * CS : 1 + int(3 * CS));
    if (k < 0.5) ops.push({ op: 'write', offset, length, pattern: 1 + int(255) });
    else if (k < 0.65) ops.push({ op: 'zero', offset, length, unmap: r() < 0.5 });
    else if (k < 0.8) ops.push({ op: 'discard', offset, length });
    else ops.push({ op: 'flush' });
  }
  return ops;
}

const ops = workload100(2026);
// 1. count the distinct states of the strategy (no judging)
{
  const base = new MemoryDevice('c');
  await createOnDevice(base, 'c', { size: SIZE, clusterSize: CS });
  const rec = new RecordingDevice('c', base.snapshot());
  const w = await openWriterOnDevice(rec, 'c');
  for (const o of ops) {
    if (o.op === 'write') await w.write(o.offset, new Uint8Array(o.length).fill(o.pattern));
    else if (o.op === 'zero') await w.writeZeroes(o.offset, o.length, { unmap: o.unmap });
    else if (o.op === 'discard') await w.discard(o.offset, o.length);
    else if (o.op === 'flush') await w.flush();
  }
  await w.close();
  const writes = rec.ops.filter((x) => x.kind === 'write').length;
  const flushes = rec.ops.filter((x) => x.kind === 'flush').length;
  let n = 0;
  const t0 = process.hrtime.bigint();
  for (const _ of crashStates(rec.initial, rec.ops, { maxStates: Number.MAX_SAFE_INTEGER, seed: 1 })) n++;
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(`100-operation workload (4 MiB disk, 4 KiB clusters): ${rec.ops.length} device operations (${writes} writes, ${flushes} flushes), ${n} distinct crash states enumerated in ${s.toFixed(2)} s`);
}
// 2. judge states: rate with every oracle but qemu-img (a, b/c, d)
{
  const max = Number(process.env['BENCH_CRASH_STATES'] ?? 2000);
  const r = await crashTest(ops, { create: { size: SIZE, clusterSize: CS }, maxStates: max, seed: 1 });
  console.log(`judged ${r.states} states (oracles a, b, c, d) in ${r.seconds.toFixed(2)} s: ${(r.states / r.seconds).toFixed(0)} states per second; corruptions ${r.corruptions}, data errors ${r.dataErrors}, states with leaks ${r.leaks}`);
}
// 3. issue 19, item 6: states per second of whole `qledger crash-test` runs (the built
// CLI, wall clock of the run as the command reports it), median of BENCH_RUNS runs; with
// BENCH_BASE=/path/to/another/checkout the same commands there, alternating, first.
{
  const { spawnSync } = await import('node:child_process');
  const { fileURLToPath } = await import('node:url');
  const here = fileURLToPath(new URL('..', import.meta.url));
  const runs = Number(process.env['BENCH_RUNS'] ?? 3);
  const cases: Array<{ name: string; args: string[]; target: number }> = [
    { name: "the demo's: 10 random workloads, 4 KiB clusters, 1 MiB, 200 states each", args: ['-o', 'cluster_size=4k', '--random', '--runs', '10', '--seed', '1', '--max-states', '200'], target: 5000 },
    { name: '50 random workloads, 4 KiB clusters, 1 MiB', args: ['-o', 'cluster_size=4k', '--random', '--runs', '50', '--seed', '1', '--max-states', '200'], target: 5000 },
    { name: '30 random workloads, default options (64 KiB clusters, 1 MiB, growths to 512 MiB)', args: ['--random', '--runs', '30', '--seed', '1', '--max-states', '500'], target: 0 },
    { name: '8 random workloads on 64 MiB images, 64 KiB clusters', args: ['-o', 'cluster_size=64k,size=64M', '--random', '--runs', '8', '--seed', '1', '--max-states', '200'], target: 1000 },
  ];
  const base = process.env['BENCH_BASE'];
  const rate = (root: string, args: string[], jobs: boolean) => {
    const r = spawnSync('node', [`${root}/dist/qledger.cjs`, 'crash-test', ...args, ...(jobs ? ['--jobs', '1'] : []), '--output=json'], { encoding: 'utf8' });
    const j = JSON.parse(r.stdout);
    return { sps: j['states-per-second'] as number, states: j.states as number, failures: j.corruptions + j['data-errors'] };
  };
  const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
  for (const c of cases) {
    const ours: number[] = [];
    const theirs: number[] = [];
    let states = 0;
    let baseStates = 0;
    for (let k = 0; k < runs; k++) {
      // the base checkout may not know --jobs
      if (base) {
        const b = rate(base, c.args, false);
        theirs.push(b.sps);
        baseStates = b.states;
      }
      const r = rate(here, c.args, true);
      if (r.failures) throw new Error(`crash-test ${c.args.join(' ')}: ${r.failures} failing states`);
      states = r.states;
      ours.push(r.sps);
    }
    const t = c.target ? `, target ≥ ${c.target}` : '';
    console.log(`${c.name}: ${states} states, ${median(ours)} states per second (one thread${t})${base ? `; ${base}: ${baseStates} states, ${median(theirs)} (ratio ${(median(ours) / median(theirs)).toFixed(2)}${baseStates === states ? '' : ': other workloads'})` : ''}`);
  }
}
