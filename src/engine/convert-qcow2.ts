/**
 * `qemu-img convert -O qcow2`: a new qcow2 image (qemu-img create's
 * options) written with the guest content of another, through the write
 * engine: zero ranges and all-zero 4 KiB blocks are not written (they read
 * as zero in a fresh image), `-c` compresses every cluster that holds data
 * (deflate or zstd, as QEMU), `-n` writes into an existing qcow2 image (zeroes where
 * the input reads as zero). With a backing file for the output (-B, or
 * -o backing_file), as qemu-img: what the input's own top image does not
 * allocate is left unallocated (the backing file shows through), what it
 * allocates is written, its zero ranges as zeroes (they must hide the
 * backing file). The target is written without a journal, and without
 * flushes unless `flush` asks for them (qemu-img convert's default cache
 * mode, 'unsafe'): a crash during a conversion leaves a partial copy either
 * way.
 */

import { UsageError } from '../errors.ts';
import { isZero, uninitialized } from '../format/bytes.ts';
import type { CreateOptions } from './create.ts';
import type { ProgressFn } from './convert.ts';
import { Image } from './image.ts';
import { DEFAULT_SPARSE, WINDOW, sparseRule, sparseRuns, type SparseRule } from './sparse.ts';
import { createImage } from './writable.ts';
import { CompressPool, type Compressed } from './compress-pool.ts';
import { availableParallelism } from 'node:os';

const CHUNK = 8 * 1024 * 1024;

export interface Qcow2ConvertOptions {
  /** qemu-img create's options for the new image (its size is the input's) */
  readonly create?: CreateOptions | undefined;
  /** -c: compressed clusters */
  readonly compress?: boolean | undefined;
  /** -c: worker threads that compress (0: none, on the calling thread); default: up to 4 for inputs of 32 MiB or more */
  readonly compressThreads?: number | undefined;
  /** -n: the target exists (a qcow2 image at least as large as the input) */
  readonly existing?: boolean | undefined;
  /** -S: zero runs inside data shorter than this many bytes are written (default 4096); 0 allocates every cluster */
  readonly sparse?: number | undefined;
  /** --target-is-zero (with `existing`): the target reads as zero already; zeroes are not written */
  readonly targetIsZero?: boolean | undefined;
  /**
   * Flush the output, its write-back barriers included (any -t but
   * qemu-img convert's default 'unsafe', which passes no flush to the file:
   * a crash during the conversion may leave anything there, as with QEMU)
   */
  readonly flush?: boolean | undefined;
  readonly progress?: ProgressFn | undefined;
  readonly signal?: AbortSignal | undefined;
  /** content dedup while writing (qledger's own): a cluster whose bytes are already in the output maps that cluster */
  readonly dedup?: boolean | undefined;
  /** receives warnings (dedup off for an output that cannot share clusters) */
  readonly onWarning?: ((message: string) => void) | undefined;
}

/**
 * Write the guest content of `img` to a new qcow2 image at `outPath` (or,
 * with `existing`, into the qcow2 image there), as `qemu-img convert -O
 * qcow2`: `create` takes qemu-img create's options, `compress` writes
 * compressed clusters, `dedup` stores each distinct cluster once.
 *
 * @example
 * import { Image, convertToQcow2 } from 'qledger';
 * import { mkdtempSync } from 'node:fs';
 * import { tmpdir } from 'node:os';
 * import { join } from 'node:path';
 *
 * const dir = mkdtempSync(join(tmpdir(), 'qledger-'));
 * await Image.create(join(dir, 'in.qcow2'), { size: 8 << 20 });
 * const src = await Image.open(join(dir, 'in.qcow2'), { write: true });
 * await src.write(0, new Uint8Array(65536).fill(7));
 * await convertToQcow2(src, join(dir, 'out.qcow2'), { create: { clusterSize: 4096 }, compress: true });
 * await src.close();
 * const out = await Image.open(join(dir, 'out.qcow2'));
 * console.log(out.geometry?.clusterSize, (await out.read(0, 4))[0]); // 4096 7
 * await out.close();
 */
export async function convertToQcow2(img: Image, outPath: string, o: Qcow2ConvertOptions = {}): Promise<void> {
  o.signal?.throwIfAborted();
  const size = img.size;
  if (!o.existing) await createImage(outPath, { ...o.create, size });
  const out = await Image.open(outPath, { format: 'qcow2', write: true, journal: false, detectZeroes: 'off', dedup: o.dedup, onWarning: o.onWarning, unsafe: o.flush !== true });
  try {
    if (o.existing && out.size < size) throw new UsageError('output file is smaller than input file', { path: outPath });
    const zeroes = o.existing && !o.targetIsZero ? (off: number, len: number) => out.writeZeroes(off, len, { unmap: true }) : undefined;
    const rule = o.sparse === undefined ? DEFAULT_SPARSE : sparseRule(o.sparse);
    const progress = o.progress;
    progress?.(0, size);
    const overBacking = (o.create?.backingFile ?? undefined) !== undefined;
    if (overBacking) await ontoBacking(img, out, size, rule, o);
    else if (o.compress) await compressed(img, out, size, zeroes, rule, o);
    else {
      const buf = uninitialized(CHUNK);
      for (let pos = 0; pos < size; ) {
        o.signal?.throwIfAborted();
        const st = await img.status(pos, Math.min(size - pos, 1 << 30));
        // -S 0: zero ranges are written out as zeroed buffers too (every cluster allocated)
        if (st.zero && !st.data && rule.min > 0) {
          await zeroes?.(pos, st.length);
          pos += st.length;
        } else {
          for (const end = pos + st.length; pos < end; ) {
            o.signal?.throwIfAborted();
            const b = buf.subarray(0, Math.min(CHUNK, end - pos));
            await img.readInto(b, pos);
            await writeSparse(out, pos, b, rule, zeroes);
            pos += b.length;
            if (pos < end) progress?.(pos, size);
          }
        }
        progress?.(pos, size);
      }
    }
    await out.close();
  } catch (e) {
    await out.close().catch(() => undefined);
    throw e;
  }
}

/**
 * -B: the input's top image decides. An extent it does not allocate (its
 * backing file's) stays unallocated; an allocated one is written, zero
 * units as zeroes; where the input has no backing file, what it leaves
 * unallocated reads as zero and is written as zeroes too. With -c the data
 * clusters are compressed.
 */
async function ontoBacking(img: Image, out: Image, size: number, rule: SparseRule, o: Qcow2ConvertOptions): Promise<void> {
  const cs = out.geometry!.clusterSize;
  const zeroes = (off: number, len: number) => out.writeZeroes(off, len, { unmap: false });
  const buf = uninitialized(CHUNK);
  for (let pos = 0; pos < size; ) {
    o.signal?.throwIfAborted();
    const st = await img.status(pos, Math.min(size - pos, 1 << 30));
    const end = pos + st.length;
    if (st.depth > 0) pos = end;
    else if (st.zero && !st.data && rule.min > 0) {
      await zeroes(pos, st.length);
      pos = end;
    } else {
      while (pos < end) {
        const b = buf.subarray(0, Math.min(CHUNK, end - pos));
        await img.readInto(b, pos);
        if (o.compress) await compressedRun(out, pos, b, cs, zeroes, rule.min > 0);
        else await writeSparse(out, pos, b, rule, zeroes);
        pos += b.length;
      }
    }
    o.progress?.(pos, size);
  }
}

/** Guest bytes `b` at `offset` as compressed clusters, all-zero clusters as zeroes unless `!sparse` (-S 0) (the input's extents are cluster-aligned for -c as QEMU's). */
async function compressedRun(out: Image, offset: number, b: Uint8Array, cs: number, zeroes: (off: number, len: number) => Promise<void>, sparse: boolean): Promise<void> {
  for (let at = 0; at < b.length; at += cs) {
    const c = b.subarray(at, Math.min(b.length, at + cs));
    if (sparse && isZero(c)) await zeroes(offset + at, c.length);
    else if ((offset + at) % cs === 0 && (c.length === cs || offset + at + c.length === out.size)) await out.writeCompressed(offset + at, c);
    else await out.write(offset + at, c);
  }
}

/**
 * -c: cluster by cluster of the output; a cluster with any data (any
 * cluster at all with -S 0) is read whole and compressed. On a large input
 * the clusters are compressed on worker threads (compress-pool.ts) while
 * the next ones are read, and written in order as they come back.
 */
async function compressed(img: Image, out: Image, size: number, zeroes: ((off: number, len: number) => Promise<void>) | undefined, rule: SparseRule, o: Qcow2ConvertOptions): Promise<void> {
  const sparse = rule.min > 0;
  const cs = out.geometry!.clusterSize;
  // the output's size is the input's rounded up to 512 bytes: its last cluster is compressed whole
  const outSize = out.size;
  // threads pay for their start (about 0.04 s each) on inputs of some size
  const threads = o.compressThreads ?? (size >= POOL_FROM ? Math.min(4, availableParallelism()) : 0);
  const pool = threads > 0 ? new CompressPool(threads) : undefined;
  const type = pool ? out.compressionType : 0;
  /** batches read and sent to the workers, written in order as they come back */
  const queue: Array<{ pos: number; count: number; zero: boolean[]; done: Promise<Compressed> }> = [];
  /** the clusters of one batch at `pos`: zero ones as zeroes, runs of the others as compressed writes */
  const writeBatch = async (pos: number, count: number, zero: boolean[], data: Uint8Array, z: ReadonlyArray<Uint8Array | undefined> | undefined) => {
    let k = 0; // index into z: one stream per non-zero cluster
    for (let i = 0; i < count; ) {
      const at = pos + i * cs;
      if (zero[i]) {
        await zeroes?.(at, Math.min(cs, outSize - at));
        i++;
        continue;
      }
      let j = i;
      while (j < count && !zero[j]) j++;
      const bytes = data.subarray(i * cs, Math.min(j * cs, outSize - pos));
      await out.writeCompressed(at, bytes, z ? { compressed: z.slice(k, k + j - i) } : {});
      k += j - i;
      i = j;
    }
  };
  const writeOne = async () => {
    const b = queue.shift()!;
    const r = await b.done;
    await writeBatch(b.pos, b.count, b.zero, r.data, r.z);
  };
  try {
    for (let pos = 0; pos < size; ) {
      o.signal?.throwIfAborted();
      const st = await img.status(pos, size - pos);
      if (sparse && st.zero && !st.data && st.length >= Math.min(cs, size - pos)) {
        // whole output clusters that read as zero: nothing to write
        const skip = Math.max(cs, Math.floor(st.length / cs) * cs);
        await zeroes?.(pos, Math.min(skip, size - pos));
        pos += skip;
        o.progress?.(Math.min(pos, size), size);
        continue;
      }
      // a batch of whole clusters (a short last one padded with zeros, as the engine pads it), read at once
      const count = Math.min(BATCH, Math.ceil((outSize - pos) / cs));
      const data = uninitialized(count * cs);
      const inLen = Math.min(count * cs, size - pos);
      await img.readInto(data.subarray(0, inLen), pos);
      data.fill(0, inLen);
      const zero: boolean[] = [];
      const which: number[] = [];
      for (let i = 0; i < count; i++) {
        zero.push(sparse && isZero(data.subarray(i * cs, (i + 1) * cs)));
        if (!zero[i]) which.push(i);
      }
      if (!pool) await writeBatch(pos, count, zero, data, undefined);
      else {
        queue.push({ pos, count, zero, done: pool.compressMany(type, cs, data, which) });
        if (queue.length >= threads * 2) await writeOne();
      }
      pos += count * cs;
      o.progress?.(Math.min(pos, size), size);
    }
    while (queue.length) await writeOne();
  } finally {
    // a failed read or write leaves compressions in flight: they are dropped with the threads
    for (const j of queue) j.done.catch(() => {});
    await pool?.close();
  }
}

/** Clusters read, compressed and written together (16 of 64 KiB: 1 MiB). */
const BATCH = 16;

/** Inputs from this size on are compressed on worker threads by default. */
const POOL_FROM = 32 << 20;

/**
 * Write `b` (guest bytes at `offset`, read from the start of a data run in
 * steps of whole qemu-img buffers) but the zero runs qemu-img convert's -S
 * rule leaves out, buffer by buffer (sparse.ts). A data run is widened to
 * whole clusters of the output, its zeros written out: QEMU's qcow2 driver
 * zeroes a new cluster on the device before the data goes in, so a cluster
 * holding any data has no hole in the file (qemu-img map would report a
 * hole, or a file ending inside the cluster, as zero). `zeroes` writes
 * zeroes over the runs left out (a target that may hold data: -n, or one
 * over a backing file).
 */
async function writeSparse(out: Image, offset: number, b: Uint8Array, rule: SparseRule, zeroes?: (offset: number, length: number) => Promise<void>): Promise<void> {
  const cs = out.geometry!.clusterSize;
  for (let w = 0; w < b.length; w += WINDOW) {
    const win = b.subarray(w, Math.min(b.length, w + WINDOW));
    const base = offset + w;
    // data runs widened to the output's clusters (inside this buffer), then the gaps between them
    const data: Array<[number, number]> = [];
    for (const r of sparseRuns(win, base, rule)) {
      if (!r.data) continue;
      const from = Math.max(0, Math.floor((base + r.from) / cs) * cs - base);
      const to = Math.min(win.length, Math.ceil((base + r.to) / cs) * cs - base);
      const last = data[data.length - 1];
      if (last && from <= last[1]) last[1] = Math.max(last[1], to);
      else data.push([from, to]);
    }
    let at = 0;
    for (const [from, to] of data) {
      if (from > at) await zeroes?.(base + at, from - at);
      await out.write(base + from, win.subarray(from, to));
      at = to;
    }
    if (at < win.length) await zeroes?.(base + at, win.length - at);
  }
}
