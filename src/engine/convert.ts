/** Whole-image copies and comparisons: `convert -O raw` and `compare`. */

import type { MapEntry } from './map.ts';
import { FileDevice } from '../io/file-device.ts';
import { isZero, uninitialized } from '../format/bytes.ts';
import { UsageError } from '../errors.ts';
import type { Image } from './image.ts';
import { DEFAULT_SPARSE, WINDOW, sparseRule, sparseRuns, type SparseRule } from './sparse.ts';

/**
 * A piece of the copy is one buffer of qemu-img's (sparse.ts WINDOW, 2 MiB
 * counted from the start of each data run), so that -S decides on the same
 * buffers (1 GiB to a file on tmpfs: 0.47-0.48 s against 0.50-0.57 s with
 * the 1 MiB pieces before, same run). By default 4 pieces are in flight
 * (qemu-img convert keeps 8, -m): libuv's pool has 4 threads.
 */
const CHUNK = WINDOW;
const WORKERS = 4;
/** compare reads both images in steps this long (each read is itself split into concurrent pieces, read.ts) */
const COMPARE_CHUNK = 8 * 1024 * 1024;

export interface ProgressFn {
  (done: number, total: number): void;
}

/** Options of convertToRaw. */
export interface ConvertOptions {
  /**
   * qemu-img convert -n: write into an existing file, neither creating nor
   * resizing it (zeroes are written where the image reads as zero, since
   * the file may hold data); a file smaller than the image is refused
   */
  readonly existing?: boolean | undefined;
  /**
   * qemu-img convert -S: zero runs inside data shorter than this many bytes
   * are written (default 4096); 0 writes every byte, zero ranges included
   * (a fully allocated output)
   */
  readonly sparse?: number | undefined;
  /** qemu-img convert -m: requests in flight (1 to 16; default 4) */
  readonly workers?: number | undefined;
  /** qemu-img convert --target-is-zero (with `existing`): the file already reads as zero; zeroes are not written */
  readonly targetIsZero?: boolean | undefined;
}

/**
 * Write the guest content of `img` to a raw file at `outPath`, sparse where
 * zero, as `qemu-img convert -O raw`. `flush`: make the output durable
 * before returning; qemu-img convert's default output cache mode
 * ('unsafe') does not, so neither does the CLI unless `-t` asks for another
 * mode. `signal` aborts between chunks (the output is then partial, as
 * qemu-img's when interrupted). `opts.existing`: write into an existing
 * file, as `convert -n`.
 *
 * @example
 * import { Image, convertToRaw } from 'qledger';
 * import { mkdtempSync, statSync } from 'node:fs';
 * import { tmpdir } from 'node:os';
 * import { join } from 'node:path';
 *
 * const dir = mkdtempSync(join(tmpdir(), 'qledger-'));
 * await Image.create(join(dir, 'disk.qcow2'), { size: 8 << 20 });
 * const img = await Image.open(join(dir, 'disk.qcow2'));
 * await convertToRaw(img, join(dir, 'disk.raw'), (done, total) => console.log(`${done}/${total}`));
 * await img.close();
 * console.log(statSync(join(dir, 'disk.raw')).size); // 8388608
 */
export async function convertToRaw(img: Image, outPath: string, progress?: ProgressFn, flush = false, signal?: AbortSignal, opts: ConvertOptions = {}): Promise<void> {
  signal?.throwIfAborted();
  // without a flush the output is cache=unsafe's: no write-behind either (file-device.ts), the kernel writes it back when it will
  const out = await FileDevice.open(outPath, { readOnly: false, create: !opts.existing, unsafe: !flush });
  try {
    const size = img.size;
    if (opts.existing && (await out.size()) < size) throw new UsageError('output file is smaller than input file', { path: outPath });
    const rule = opts.sparse === undefined ? DEFAULT_SPARSE : sparseRule(opts.sparse);
    // zeroes are written where the file may hold something else
    const zeroes = opts.existing === true && opts.targetIsZero !== true;
    // with progress, steps of about half a percent (qemu-img prints at each whole one)
    const step = progress ? Math.min(CHUNK, Math.max(65536, Math.floor(size / 200 / 65536) * 65536)) : CHUNK;
    const pieces = piecesOf(img, step, rule.min === 0);
    let copied = 0;
    let failure: { error: unknown } | undefined;
    progress?.(0, size);
    // Several pieces in flight, as qemu-img convert keeps several requests (its -m): each worker reads
    // a piece and writes it, so reads and writes of different pieces overlap on the device and the
    // kernel's copies run on more than one core. A failure stops every worker before the output closes.
    const worker = async (buf: Uint8Array): Promise<void> => {
      for (;;) {
        if (failure) return;
        signal?.throwIfAborted();
        const next = await pieces.next();
        if (next.done) return;
        const { pos, length, data } = next.value;
        if (data) {
          const b = buf.subarray(0, length);
          await img.readInto(b, pos);
          await writeSparse(out, pos, b, rule, zeroes);
        } else if (zeroes) {
          await out.writeZeroes(pos, length, true);
        }
        copied += length;
        progress?.(copied, size);
      }
    };
    await Promise.all(
      Array.from({ length: opts.workers ?? WORKERS }, () =>
        worker(uninitialized(step)).catch((e: unknown) => {
          failure ??= { error: e };
        }),
      ),
    );
    if (failure) throw failure.error;
    if (!opts.existing) await out.truncate(size);
    if (flush) await out.flush();
  } finally {
    await out.close();
  }
}

/**
 * The image in pieces to copy, in order: data runs cut into `step`-sized
 * pieces counted from the run's start (qemu-img's buffers), zero runs whole;
 * `allocate` (-S 0) copies zero runs as data too, in steps, as qemu-img
 * writes them out as zeroed buffers.
 */
async function* piecesOf(img: Image, step: number, allocate: boolean): AsyncGenerator<{ pos: number; length: number; data: boolean }> {
  const size = img.size;
  let pos = 0;
  while (pos < size) {
    const st = await img.status(pos, Math.min(size - pos, 1 << 30));
    if (st.zero && !st.data && !allocate) {
      yield { pos, length: st.length, data: false };
      pos += st.length;
      continue;
    }
    const end = pos + st.length;
    for (; pos < end; pos += Math.min(step, end - pos)) yield { pos, length: Math.min(step, end - pos), data: true };
  }
}

/** Write guest bytes `b` at `offset` but the zero runs `rule` leaves out; those get zeroes when `zeroes` says the file may hold data there. */
async function writeSparse(out: FileDevice, offset: number, b: Uint8Array, rule: SparseRule, zeroes: boolean): Promise<void> {
  for (const r of sparseRuns(b, offset, rule)) {
    if (r.data) await out.write(offset + r.from, b.subarray(r.from, r.to));
    else if (zeroes) await out.writeZeroes(offset + r.from, r.to - r.from, true);
  }
}

export type CompareResult =
  | { identical: true; sizeMismatch: boolean }
  | { identical: false; offset: number; sizeMismatch: boolean; reason: 'content' | 'size' | 'status' };

/**
 * The block status flags qemu-img compare -s compares (QEMU's BDRV_BLOCK_*:
 * data, zero, offset valid, allocated, and end of file when the run reaches
 * the end of the image).
 */
function statusFlags(st: MapEntry, size: number): string {
  return `${+st.data}${+st.zero}${+(st.offset !== undefined)}${+st.present}${+(st.start + st.length >= size)}`;
}

const SECTOR = 512;

/**
 * `qemu-img compare`: the first differing 512-byte sector; sizes beyond the
 * shorter image must read as zero; `strict` also compares block status.
 *
 * @example
 * import { Image, MemoryDevice, compareImages } from 'qledger';
 *
 * const a = new MemoryDevice('a.qcow2');
 * const b = new MemoryDevice('b.qcow2');
 * await Image.create(a, { size: 1 << 20 });
 * await Image.create(b, { size: 1 << 20 });
 * const ia = await Image.open(a, { write: true });
 * const ib = await Image.open(b, { write: true });
 * await ib.write(4096, new Uint8Array(512).fill(1));
 * const r = await compareImages(ia, ib);
 * console.log(JSON.stringify(r)); // {"identical":false,"offset":4096,"sizeMismatch":false,"reason":"content"}
 * await ia.close();
 * await ib.close();
 */
export async function compareImages(a: Image, b: Image, strict = false): Promise<CompareResult> {
  const common = Math.min(a.size, b.size);
  const sizeMismatch = a.size !== b.size;
  if (sizeMismatch && strict) return { identical: false, offset: common, sizeMismatch, reason: 'size' };
  const ba = uninitialized(COMPARE_CHUNK);
  const bb = uninitialized(COMPARE_CHUNK);
  // Buffer views of the same bytes, for equals (the buffers need not start their ArrayBuffers)
  const va = Buffer.from(ba.buffer, ba.byteOffset, ba.byteLength);
  const vb = Buffer.from(bb.buffer, bb.byteOffset, bb.byteLength);
  let pos = 0;
  while (pos < common) {
    const [sa, sb] = await Promise.all([a.status(pos, common - pos), b.status(pos, common - pos)]);
    const len = Math.min(sa.length, sb.length);
    if (strict && statusFlags(sa, a.size) !== statusFlags(sb, b.size)) return { identical: false, offset: pos, sizeMismatch, reason: 'status' };
    if (sa.zero && !sa.data && sb.zero && !sb.data) {
      pos += len;
      continue;
    }
    const end = pos + len;
    while (pos < end) {
      const n = Math.min(COMPARE_CHUNK, end - pos);
      await Promise.all([a.readInto(ba.subarray(0, n), pos), b.readInto(bb.subarray(0, n), pos)]);
      if (!va.subarray(0, n).equals(vb.subarray(0, n))) {
        for (let s = 0; s < n; s += SECTOR) {
          const e = Math.min(n, s + SECTOR);
          if (!va.subarray(s, e).equals(vb.subarray(s, e))) {
            return { identical: false, offset: pos + s, sizeMismatch, reason: 'content' };
          }
        }
      }
      pos += n;
    }
  }
  const longer = a.size > b.size ? a : b;
  pos = common;
  while (pos < longer.size) {
    const st = await longer.status(pos, longer.size - pos);
    if (st.zero && !st.data) {
      pos += st.length;
      continue;
    }
    const end = pos + st.length;
    while (pos < end) {
      const n = Math.min(COMPARE_CHUNK, end - pos);
      const buf = ba.subarray(0, n);
      await longer.readInto(buf, pos);
      if (!isZero(buf)) {
        for (let s = 0; s < n; s += SECTOR) {
          if (!isZero(buf.subarray(s, Math.min(n, s + SECTOR)))) return { identical: false, offset: pos + s, sizeMismatch, reason: 'content' };
        }
      }
      pos += n;
    }
  }
  return { identical: true, sizeMismatch };
}
