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

type Job = { id: number; type: number; data: Uint8Array };
type Done = { id: number; z: Uint8Array | null } | { id: number; error: string };

/** True in a thread started as a compression worker (the bundled CLI checks this before it runs as a program). */
export function isCompressWorker(): boolean {
  return !isMainThread && (workerData as { qledgerCompressWorker?: boolean } | undefined)?.qledgerCompressWorker === true;
}

/** The worker: a cluster in, its compressed stream (or null: not smaller) out. */
export function serveCompressWorker(): void {
  parentPort!.on('message', (j: Job) => {
    compressCluster(j.type, j.data).then(
      (z) => parentPort!.postMessage({ id: j.id, z: z ?? null } satisfies Done),
      (e: unknown) => parentPort!.postMessage({ id: j.id, error: (e as Error).message } satisfies Done),
    );
  });
}

export class CompressPool {
  private readonly workers: Worker[] = [];
  private readonly waiting = new Map<number, { resolve: (z: Uint8Array | undefined) => void; reject: (e: Error) => void }>();
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
        else p?.resolve(m.z ?? undefined);
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

  /** One whole cluster compressed for compression type `type` (undefined: not smaller), on the next worker in turn. The bytes are copied. */
  compress(type: number, cluster: Uint8Array): Promise<Uint8Array | undefined> {
    if (this.failed) return Promise.reject(this.failed);
    const id = this.next++;
    const data = cluster.slice();
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.workers[id % this.workers.length]!.postMessage({ id, type, data } satisfies Job, [data.buffer]);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
