/**
 * What the benchmarks share: the median, a seeded generator, the random
 * 4 KiB write workload, and the images several of them build (the check
 * benchmark's scattered image, the journal benchmark's crashed image), so
 * that every benchmark that names a case measures the same input.
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { Image } from '../src/engine/image.ts';
import { openWriter } from '../src/engine/writable.ts';
import { QledgerError } from '../src/errors.ts';
import { setInlineIo } from '../src/io/file-device.ts';

export const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** Run a whole process and return its wall time in seconds; a failure throws with its standard error. */
export function timeProcess(cmd: string, args: readonly string[]): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], maxBuffer: 1 << 26 });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  return s;
}

/** Run `a` and `b`, in that order in even rounds and the other way in odd ones (neither always goes first). */
export function alternate(round: number, a: () => void, b: () => void): void {
  if (round % 2 === 0) {
    a();
    b();
  } else {
    b();
    a();
  }
}

/** xorshift32 in [0, 1): the same sequence on every run. */
export function seededRandom(seed: number): () => number {
  let x = seed >>> 0;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

/** 20,000 qemu-io writes of 4 KiB, each into a distinct unallocated 64 KiB cluster of a 100 GiB image. */
export function randomWriteCommands(): string[] {
  const rnd = seededRandom(42);
  const clusters = new Set<number>();
  const total = (100 * 2 ** 30) / 65536;
  while (clusters.size < 20000) clusters.add(Math.floor(rnd() * total));
  return [...clusters].map((c) => `write -q -P 7 ${c * 65536 + Math.floor(rnd() * 16) * 4096} 4k`);
}

/** 1,000,000 4 KiB clusters written one at a time, in a shuffled order, over an 8 GiB image. */
export async function scatteredImage(path: string): Promise<void> {
  const n = 1_000_000;
  const size = 8 * 2 ** 30; // 2,097,152 guest clusters
  await Image.create(path, { size, clusterSize: 4096 });
  const img = await Image.open(path, { write: true });
  const order = Array.from({ length: 2 * n }, (_, i) => i);
  let x = 12345;
  for (let i = order.length - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) >>> 0;
    const j = x % (i + 1);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  const buf = new Uint8Array(4096).fill(0x5a);
  // one write at a time: inline requests, as the CLI makes them (about twice as fast to build)
  const was = setInlineIo(1 << 18);
  try {
    for (let i = 0; i < n; i++) await img.write(order[i]! * 4096, buf);
    await img.close();
  } finally {
    setInlineIo(was);
  }
}

/**
 * 1,048,576 allocated clusters (4 GiB preallocated, grown to 5 GiB), then a
 * qledger session whose last write-back stops after its first in-place
 * phase, as a power cut would: compact (2,000 new clusters in order, 20
 * freed) or scattered (2,000 freed and 2,000 allocated at random).
 */
export async function crashedImage(path: string, scattered: boolean): Promise<void> {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=4096', path, '4G']);
  execFileSync('qemu-img', ['resize', '-q', path, '5G']);
  const w = await openWriter(path, {});
  let x = 777;
  const rnd = (n: number) => ((x = (x * 48271) % 2147483647), x % n);
  if (scattered) {
    for (let i = 0; i < 2000; i++) await w.discard(rnd(1 << 20) * 4096, 4096);
    for (let i = 0; i < 2000; i++) await w.write(4 * 2 ** 30 + rnd(1 << 18) * 4096, new Uint8Array(4096).fill(9));
  } else {
    for (let i = 0; i < 20; i++) await w.discard(rnd(1 << 20) * 4096, 4096);
    for (let i = 0; i < 2000; i++) await w.write(4 * 2 ** 30 + i * 4096, new Uint8Array(4096).fill(9));
  }
  (w as unknown as { stopAfterPhase: number }).stopAfterPhase = 1;
  try {
    await w.flush();
    throw new Error('the write-back did not stop');
  } catch (e) {
    if (!(e instanceof QledgerError)) throw e;
  }
  await w.abandon();
}
