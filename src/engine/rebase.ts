/**
 * qemu-img rebase: give an image another backing file (or none). Safe mode
 * first writes into the image every guest range it does not allocate
 * itself where the old backing chain and the new one read differently (at
 * 512-byte granularity, as qemu-img compares), so the image reads the same
 * afterwards; then the header switches to the new name and format, each
 * write of the change leaving a valid header (format/backing-change.ts).
 * Unsafe mode (-u) changes the header only.
 */

import { QledgerError } from '../errors.ts';
import { planBackingChange } from '../format/backing-change.ts';
import { uninitialized } from '../format/bytes.ts';
import { FileDevice } from '../io/file-device.ts';
import { readAt, type BlockDevice } from '../io/device.ts';
import { Image } from './image.ts';
import { loadQcow2 } from './qcow2-layer.ts';
import type { ImageFormat } from './open.ts';
import { allowedDirOf } from './untrusted.ts';

const CHUNK = 1 << 20;
const SECTOR = 512;
/** equal blocks of this many bytes are skipped in one comparison */
const BLOCK = 65536;

export interface RebaseOptions {
  /** the new backing file as the header will name it (relative to the image's directory); undefined: none */
  readonly backing: string | undefined;
  /** its format, as the header's backing-format extension will say */
  readonly backingFormat?: 'qcow2' | 'raw' | undefined;
  /** the new backing file's path for opening it (the name resolved against the image's directory) */
  readonly backingPath?: string | undefined;
  /** -u: change the header only */
  readonly unsafe?: boolean | undefined;
  readonly format?: ImageFormat | undefined;
  readonly progress?: ((done: number, total: number) => void) | undefined;
  /** false: the untrusted-image policy for the image's chain and the new backing file's, fenced by the image's directory */
  readonly trusted?: boolean | undefined;
}

export async function rebase(path: string, o: RebaseOptions): Promise<void> {
  if (!o.unsafe) await copyDifferences(path, o);
  await switchHeader(path, o.backing, o.backing === undefined ? undefined : o.backingFormat);
}

/** Safe mode: the ranges the image does not allocate where old and new backing read differently, written into the image. */
async function copyDifferences(path: string, o: RebaseOptions): Promise<void> {
  const policy = o.trusted === false ? { trusted: false, allowedDir: allowedDirOf(path, {}) } : {};
  const img = await Image.open(path, { format: o.format ?? 'qcow2', write: true, detectZeroes: 'off', ...policy });
  try {
    const next = o.backing === undefined ? undefined : await Image.open(o.backingPath ?? o.backing, { format: o.backingFormat, ...policy });
    try {
      await copyBackingDifferences(img, next, o.progress);
    } finally {
      await next?.close();
    }
  } finally {
    await img.close();
  }
}

/** What safe mode reads: a chain's guest content. */
export interface RebaseSource {
  readonly size: number;
  readInto(out: Uint8Array, offset: number): Promise<void>;
}

/** The image rebased: its own chain read, its own allocation asked, and written. */
export interface RebaseTarget extends RebaseSource {
  topStatus(offset: number, length: number): Promise<{ allocated: boolean; length: number }>;
  write(offset: number, data: Uint8Array): Promise<void>;
}

/**
 * Safe mode's copy: every range `img` does not allocate itself where its
 * chain and `next` (the new backing chain; undefined: none, which reads as
 * zeros) read differently, written into `img` as its chain reads it, by
 * runs of differing 512-byte sectors as qemu-img compares.
 */
export async function copyBackingDifferences(img: RebaseTarget, next: RebaseSource | undefined, progress?: (done: number, total: number) => void): Promise<void> {
  const size = img.size;
  const a = uninitialized(CHUNK);
  const b = uninitialized(CHUNK);
  progress?.(0, size);
  for (let pos = 0; pos < size; ) {
    const st = await img.topStatus(pos, Math.min(size - pos, 1 << 30));
    if (st.allocated) {
      pos += st.length;
      continue;
    }
    for (const end = pos + st.length; pos < end; ) {
      const n = Math.min(CHUNK, end - pos);
      const old = a.subarray(0, n);
      const neu = b.subarray(0, n);
      neu.fill(0);
      // both chains read at once
      await Promise.all([img.readInto(old, pos), next && pos < next.size ? next.readInto(neu.subarray(0, Math.min(n, next.size - pos)), pos) : undefined]);
      // runs of differing sectors, each written as the old chain reads it; equal 64 KiB blocks are
      // skipped in one comparison, and no sector comparison allocates
      const A = Buffer.from(old.buffer, old.byteOffset, n);
      const B = Buffer.from(neu.buffer, neu.byteOffset, n);
      const same = (x: number, len: number) => A.compare(B, x, x + len, x, x + len) === 0;
      let run = -1;
      for (let blk = 0; blk < n; blk += BLOCK) {
        const bend = Math.min(n, blk + BLOCK);
        if (run < 0 && same(blk, bend - blk)) continue;
        for (let s = blk; s < bend; s += SECTOR) {
          const len = Math.min(SECTOR, n - s);
          if (!same(s, len)) {
            if (run < 0) run = s;
          } else if (run >= 0) {
            await img.write(pos + run, old.subarray(run, s));
            run = -1;
          }
        }
      }
      if (run >= 0) await img.write(pos + run, old.subarray(run, n));
      pos += n;
      progress?.(pos, size);
    }
  }
}

/** The header's backing file name and format, changed write by write (each leaving a valid header), each write flushed. */
async function switchHeader(path: string, name: string | undefined, format: string | undefined): Promise<void> {
  const dev = await FileDevice.open(path, { readOnly: false });
  try {
    await switchBacking(dev, path, name, format);
  } finally {
    await dev.close();
  }
}

/**
 * The same on a device (`label` names it in errors): the image's content
 * must be durable first (safe mode's copy flushed), since from the first
 * write on the header may name the new backing file.
 */
export async function switchBacking(dev: BlockDevice, label: string, name: string | undefined, format: string | undefined): Promise<void> {
  const { parsed } = await loadQcow2(dev);
  const head = await readAt(dev, 0, 2 ** parsed.header.clusterBits);
  const plan = planBackingChange(head, name, format);
  if (!plan) throw new QledgerError('E_UNSUPPORTED', `${label}: no room in the header cluster for the backing file name '${name ?? ''}'`);
  for (const w of plan) {
    await dev.write(w.offset, w.bytes);
    await dev.flush();
  }
}
