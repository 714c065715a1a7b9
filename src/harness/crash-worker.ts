/**
 * `qledger crash-test` on several threads. With at least as many
 * workloads as threads, thread k takes workloads k, k + N, …: the verdicts
 * a workload's states share (crash-judge.ts memoises them, and judges each
 * epoch's durable image once) stay in one thread. With fewer, every thread
 * runs each workload itself and judges its share of the crash states,
 * numbered as the enumeration yields them (`partition` in
 * crash-harness.ts), and the shares' counts and failures are added up.
 */

import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { addCounts, crashTest, emptyCounts, type CrashTestOptions, type CrashTestResult, type GuestOp } from './crash-harness.ts';
import { workerEntry } from '../worker-entry.ts';

type Options = Omit<CrashTestOptions, 'seed' | 'partition'>;

interface Setup {
  readonly qledgerCrashWorker: true;
  readonly workloads: ReadonlyArray<{ readonly ops: readonly GuestOp[]; readonly seed: number }>;
  readonly options: Options;
  readonly index: number;
  readonly count: number;
  /** split the states of every workload (else: the workloads) */
  readonly byState: boolean;
}

/** True in a thread started as a crash-test worker (the bundled CLI checks this before it runs as a program). */
export function isCrashWorker(): boolean {
  return !isMainThread && (workerData as Partial<Setup> | undefined)?.qledgerCrashWorker === true;
}

/** The worker: each workload's share judged in turn, each result posted as it is done. */
export function serveCrashWorker(): void {
  const s = workerData as Setup;
  void (async () => {
    for (const [i, w] of s.workloads.entries()) {
      if (!s.byState) {
        if (i % s.count === s.index) parentPort!.postMessage({ i, r: await crashTest(w.ops, { ...s.options, seed: w.seed }) });
        continue;
      }
      // qemu-img samples: the first thread's states only, so that the count stays the option's
      const options = { ...s.options, qemuSamples: s.index === 0 ? s.options.qemuSamples : 0 };
      parentPort!.postMessage({ i, r: await crashTest(w.ops, { ...options, seed: w.seed, partition: { index: s.index, count: s.count } }) });
    }
  })().catch((e: unknown) => parentPort!.postMessage({ error: (e as Error).stack ?? String(e) }));
}

/**
 * Run the workloads on `jobs` threads; one result per workload, in order,
 * as one thread's `crashTest` would give it (states, counts and failures
 * of every share; seconds: the slowest share's).
 */
export async function crashTestParallel(workloads: ReadonlyArray<{ ops: readonly GuestOp[]; seed: number }>, options: Options, jobs: number): Promise<CrashTestResult[]> {
  const byState = workloads.length < jobs;
  const parts: CrashTestResult[][] = workloads.map(() => []);
  await Promise.all(
    Array.from({ length: jobs }, (_, index) => {
      const mine = byState ? workloads.length : workloads.filter((_, i) => i % jobs === index).length;
      if (!mine) return undefined;
      const entry = workerEntry(import.meta.url, './crash-worker-main');
      const w = new Worker(entry.file, { eval: entry.eval, workerData: { qledgerCrashWorker: true, workloads, options, index, count: jobs, byState } satisfies Setup });
      return new Promise<void>((resolve, reject) => {
        let got = 0;
        w.on('message', (m: { i: number; r: CrashTestResult } | { error: string }) => {
          if ('error' in m) {
            reject(new Error(`crash-test worker ${index}: ${m.error}`));
            void w.terminate();
            return;
          }
          parts[m.i]!.push(m.r);
          if (++got === mine) {
            resolve();
            void w.terminate();
          }
        });
        w.on('error', reject);
        w.on('exit', (code) => {
          if (got < mine) reject(new Error(`crash-test worker ${index} exited (${code}) after ${got} of ${mine} workloads`));
        });
      });
    }),
  );
  return parts.map((parts) => {
    const n = emptyCounts();
    for (const p of parts) addCounts(n, p);
    return {
      ...n,
      seconds: Math.max(...parts.map((p) => p.seconds)),
      failures: parts.flatMap((p) => p.failures),
      refusal: parts.find((p) => p.refusal)?.refusal,
      deviceOps: parts[0]!.deviceOps,
    };
  });
}
