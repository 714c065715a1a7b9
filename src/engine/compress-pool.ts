/**
 * Compressed clusters made on worker threads, for `convert -c`: qemu-img
 * compresses on its thread pool, and zstd in WebAssembly is about three
 * times slower than the native library per core. Each worker runs
 * compress.ts's `compressCluster` (the same codecs and parameters); the
 * caller reads the next clusters and writes the ones done meanwhile, in
 * order.
 */

import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { compressCluster } from './compress.ts';
import { workerEntry } from '../worker-entry.ts';

/** `which` clusters (indices) of `data`, each `cs` bytes, to compress; `data` goes to the worker and comes back */
type Job = { id: number; type: number; cs: number; which: number[]; data: Uint8Array };
type Done = { id: number; data: Uint8Array; z: Array<Uint8Array | null> } | { id: number; error: string };

/** True in a thread started as a compression worker (the bundled CLI checks this before it runs as a program). */
export function isCompressWorker(): boolean {
  return !isMainThread && (workerData as { qledgerCompressWorker?: boolean } | undefined)?.qledgerCompressWorker === true;
}

/** The worker: a cluster in, its compressed stream (or null: not smaller) out. */
export function serveCompressWorker(): void {
  parentPort!.on('message', (j: Job) => {
    Promise.all(j.which.map((i) => compressCluster(j.type, j.data.subarray(i * j.cs, (i + 1) * j.cs)))).then(
      (zs) => parentPort!.postMessage({ id: j.id, data: j.data, z: zs.map((z) => z ?? null) } satisfies Done, [j.data.buffer as ArrayBuffer]),
      (e: unknown) => parentPort!.postMessage({ id: j.id, error: (e as Error).message } satisfies Done),
    );
  });
}

/** A compressed batch: its bytes back, and a stream (or undefined: not smaller) per cluster asked for. */
export interface Compressed {
  readonly data: Uint8Array;
  readonly z: ReadonlyArray<Uint8Array | undefined>;
}

export class CompressPool {
  private readonly workers: Worker[] = [];
  private readonly waiting = new Map<number, { resolve: (r: Compressed) => void; reject: (e: Error) => void }>();
  private next = 0;
  private failed: Error | undefined;

  constructor(threads: number) {
    const entry = workerEntry(import.meta.url, './compress-worker-main');
    for (let i = 0; i < threads; i++) {
      const w = new Worker(entry.file, { eval: entry.eval, workerData: { qledgerCompressWorker: true } });
      w.on('message', (m: Done) => {
        const p = this.waiting.get(m.id);
        this.waiting.delete(m.id);
        if ('error' in m) p?.reject(new Error(m.error));
        else p?.resolve({ data: m.data, z: m.z.map((z) => z ?? undefined) });
      });
      w.on('error', (e) => this.fail(e));
      w.on('exit', (code) => code !== 0 && this.fail(new Error(`a compression worker exited (${code})`)));
      this.workers.push(w);
    }
  }

  private fail(e: Error): void {
    this.failed ??= e;
    for (const p of this.waiting.values()) p.reject(e);
    this.waiting.clear();
  }

  /**
   * Clusters `which` of `data` (whole clusters of `cs` bytes) compressed for
   * compression type `type` on the next worker in turn, in one message: a
   * message per cluster had cost the main thread more than reading them.
   * `data` is moved to the worker (unusable meanwhile) and comes back in the
   * answer, with each cluster's stream (undefined: not smaller).
   */
  compressMany(type: number, cs: number, data: Uint8Array, which: number[]): Promise<Compressed> {
    if (this.failed) return Promise.reject(this.failed);
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.workers[id % this.workers.length]!.postMessage({ id, type, cs, which, data } satisfies Job, [data.buffer as ArrayBuffer]);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
