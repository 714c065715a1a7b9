/**
 * `qledger crash-test`: run workloads on an in-memory image, explore the
 * crash states each allows, and judge them (see harness/crash-harness.ts).
 * Exit 0 only when no state showed corruption or wrong data.
 */

import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { crashTestParallel } from '../harness/crash-worker.ts';
import { UsageError } from '../errors.ts';
import { getopt, parseOptionList, parseSize } from './args.ts';
import { createOptionsFrom } from '../engine/create.ts';
import { addCounts, crashTest, emptyCounts, parseWorkload, reproduction, type GuestOp, type CrashFailure } from '../harness/crash-harness.ts';
import { FAULTS, type Fault } from '../engine/faults.ts';
import { rng } from '../io/crash-device.ts';
import { qemuJson } from '../engine/info.ts';
import { makeBacking } from '../harness/chain-base.ts';
import type { Output } from './output.ts';

/** A seeded random workload: writes, zeroes, discards and flushes, biased to a hot area so frees and reuse meet. */
export function randomWorkload(seed: number, size: number, cs: number, dedup = false): GuestOp[] {
  const r = rng(seed);
  const int = (n: number) => Math.floor(r() * n);
  const range = (): [number, number] => {
    const k = r();
    if (k < 0.35) {
      const c = int(size / cs);
      return [c * cs, Math.min((1 + int(4)) * cs, size - c * cs)];
    }
    if (k < 0.7) {
      const o = int(size);
      return [o, Math.max(1, Math.min(1 + int(2 * cs + 300), size - o))];
    }
    return [int(Math.min(8, size / cs)) * cs, Math.min(size, (1 + int(2)) * cs)];
  };
  const ops: GuestOp[] = [];
  const n = 1 + int(12);
  for (let i = 0; i < n; i++) {
    const k = r();
    const [offset, len] = range();
    const length = Math.min(len, size - offset);
    // dedup: patterns from a palette of three, so that whole clusters repeat
    if (k < 0.45) ops.push({ op: 'write', offset, length, pattern: 1 + int(dedup ? 3 : 255) });
    else if (k < 0.6) ops.push({ op: 'zero', offset, length, unmap: r() < 0.5 });
    else if (k < 0.75) ops.push({ op: 'discard', offset, length });
    else ops.push({ op: 'flush' });
  }
  if (dedup && r() < 0.4) ops.push({ op: 'dedup' });
  if (r() < 0.3) {
    // A growth, and a write near the new end. Past the span of one L2 table
    // where that is at most 1 GiB (64 KiB clusters: 512 MiB), so that the
    // growth moves the L1 table and the header switches to it (the fault
    // header-before-table); the guest model is sparse, so the size is cheap.
    const span = (cs / 8) * cs;
    const grown = span + cs <= 2 ** 30 && span + cs > size * 4 ? span + cs : size * 4;
    ops.push({ op: 'truncate', size: grown }, { op: 'write', offset: grown - size + int(size - 4096), length: 4096, pattern: 9 });
  }
  return ops;
}

export async function runCrashTest(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'o', flags: 'q', long: { output: true, workload: true, random: false, seed: true, runs: true, 'max-states': true, fault: true, 'qemu-samples': true, journal: true, dedup: false, backing: true, jobs: true } }, 'crash-test');
  const get = (k: string) => {
    let v: string | true | undefined;
    for (const [key, x] of p.opts) if (key === k) v = x;
    return v;
  };
  const fault = get('fault');
  if (fault === 'list') {
    for (const [name, what] of Object.entries(FAULTS)) io.out(`${name}\t${what}\n`);
    return 0;
  }
  if (fault !== undefined && !(String(fault) in FAULTS)) throw new UsageError(`crash-test: unknown fault '${String(fault)}' (try --fault list)`);
  if (p.positional.length) throw new UsageError(`crash-test: unexpected argument '${p.positional[0]}' (images live in memory; give -o for their options)`);
  const jo = get('journal');
  if (jo !== undefined && jo !== 'on' && jo !== 'off') throw new UsageError('crash-test: --journal expects on or off');
  const journal = jo !== 'off';
  const output = get('output');
  if (output !== undefined && output !== 'human' && output !== 'json') throw new UsageError('--output must be used with human or json as argument.');
  const opts = new Map<string, string>();
  for (const [k, v] of p.opts) if (k === 'o' && typeof v === 'string') for (const [a, b] of parseOptionList(v)) opts.set(a, b);
  if (!opts.has('size')) opts.set('size', '1M');
  if (opts.has('backing_file') || opts.has('data_file')) throw new UsageError('crash-test: images are created in memory without backing or data files');
  const create = createOptionsFrom(opts, parseSize);
  // --backing raw|qcow2: the image over an in-memory backing file (commit and rebase_flatten need one)
  const bf = get('backing');
  if (bf !== undefined && bf !== 'raw' && bf !== 'qcow2') throw new UsageError('crash-test: --backing expects raw or qcow2');
  const backingFormat = bf as 'raw' | 'qcow2' | undefined;
  const backing = backingFormat ? await makeBacking(backingFormat, create.size!) : undefined;
  const num = (k: string, d: number) => {
    const v = get(k);
    if (v === undefined) return d;
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`crash-test: --${k} expects a non-negative integer`);
    return n;
  };
  const seed = num('seed', 1);
  const maxStates = num('max-states', 500);
  const qemuSamples = num('qemu-samples', 0);
  const file = get('workload');
  const dedup = get('dedup') === true;
  const workloads: GuestOp[][] = [];
  const size = create.size!;
  const cs = create.clusterSize ?? 65536;
  if (typeof file === 'string') workloads.push(parseWorkload(readFileSync(file, 'utf8')));
  else {
    const runs = num('runs', 10);
    for (let i = 0; i < runs; i++) workloads.push(randomWorkload(seed + i, size, cs, dedup));
  }
  // threads (harness/crash-worker.ts); by default one core is left to V8's own threads
  // (garbage collection and compilation), which a single thread keeps busy: on two
  // cores a second worker gains nothing (BENCHMARKS.md, "Crash harness throughput")
  const jobs = num('jobs', Math.max(1, Math.min(4, availableParallelism() - 1)));
  if (jobs < 1) throw new UsageError('crash-test: --jobs expects a positive integer');
  const n = emptyCounts();
  const failures: Array<CrashFailure & { workload: number; reproduce: string }> = [];
  // writes the overlap index refused (a workload stops at its refusal; its states are judged as usual)
  const refusals: Array<{ workload: number; message: string }> = [];
  const options = { create, maxStates, fault: fault as Fault | undefined, qemuSamples, journal, dedup, backing, backingFormat };
  const t0 = process.hrtime.bigint();
  const results =
    jobs > 1
      ? await crashTestParallel(
          workloads.map((ops, i) => ({ ops, seed: seed + i })),
          options,
          jobs,
        )
      : [];
  for (const [i, ops] of workloads.entries()) {
    const r = results[i] ?? (await crashTest(ops, { ...options, seed: seed + i }));
    addCounts(n, r);
    const repro = reproduction(ops, { create, seed: seed + i, fault: fault as Fault | undefined, dedup, withBacking: backingFormat });
    for (const f of r.failures.slice(0, 5)) failures.push({ ...f, workload: i, reproduce: repro });
    if (r.refusal) refusals.push({ workload: i, message: r.refusal });
  }
  const { states, corruptions, dataErrors, leaks, replayed, leaksAfterRecovery: leaksAfter, copiedClear } = n;
  // wall clock of the whole run: the workloads, the threads' start and every share
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const sps = seconds > 0 ? Math.round(states / seconds) : 0;
  if (output === 'json') {
    io.out(qemuJson({ workloads: workloads.length, states, corruptions, 'data-errors': dataErrors, leaks, 'journal-replays': replayed, 'leaks-after-recovery': leaksAfter, 'copied-clear': copiedClear, 'states-per-second': sps, 'overlap-refusals': refusals.length, failures }) + '\n');
  } else {
    io.out(`workloads: ${workloads.length}\nstates: ${states}\ncorruptions: ${corruptions}\ndata errors: ${dataErrors}\nstates with leaks before recovery (allowed): ${leaks}\nstates recovered by journal replay: ${replayed}\nstates with leaks after recovery: ${journal ? leaksAfter : 'not judged (journal off)'}\nstates with COPIED clear on a cluster with one reference (snapshot workloads, allowed): ${copiedClear}\nstates per second: ${sps}\nworkloads stopped by an overlap refusal: ${refusals.length}\n`);
    for (const r of refusals.slice(0, 3)) io.out(`REFUSED workload ${r.workload}: ${r.message}\n`);
    for (const f of failures) io.out(`FAIL workload ${f.workload}, ${f.state}: ${f.problem}\n  replay: ${f.reproduce}\n`);
    if (!failures.length) io.out('No corruption and no wrong data in any crash state.\n');
  }
  return corruptions || dataErrors ? 2 : 0;
}
