/**
 * The shapes of a write-back's device writes: the sectors of a table that
 * changed (dirtySectors), a table padded to whole sectors (padSector), and
 * the adjacent writes of one phase joined into one request (mergeAdjacent).
 * The ordering rules (ordering.ts) decide which writes there are and when;
 * this module only how each reaches the device.
 */

import { host, type HostOffset } from '../format/offsets.ts';
import type { DeviceWrite } from './ordering.ts';

const SECTOR = 512;
const BLOCK = 16 * SECTOR;

/** Writes for the sectors of `next` that differ from `prev` (all of them when prev is undefined). */
export function dirtySectors(prev: Uint8Array | undefined, next: Uint8Array, base: HostOffset, what: string, kind?: number): DeviceWrite[] {
  if (!prev) return [{ offset: base, data: next, what, kind }];
  const out: DeviceWrite[] = [];
  if (prev === next) return out;
  const a = Buffer.from(prev.buffer, prev.byteOffset, prev.byteLength);
  // Blocks of 16 sectors first: a write-back usually changes a few entries of a 64 KiB table, and
  // 8 comparisons find the blocks that hold them (the sectors inside only those are compared).
  const differs = (o: number, end: number) => end > prev.length || a.compare(next, o, end, o, end) !== 0;
  let runStart = -1;
  for (let blk = 0; blk < next.length; blk += BLOCK) {
    const blkEnd = Math.min(next.length, blk + BLOCK);
    if (!differs(blk, blkEnd)) {
      if (runStart >= 0) {
        out.push({ offset: host(base + runStart), data: next.subarray(runStart, blk), what, kind });
        runStart = -1;
      }
      continue;
    }
    for (let o = blk; o < blkEnd; o += SECTOR) {
      const d = differs(o, Math.min(blkEnd, o + SECTOR));
      if (d && runStart < 0) runStart = o;
      if (!d && runStart >= 0) {
        out.push({ offset: host(base + runStart), data: next.subarray(runStart, o), what, kind });
        runStart = -1;
      }
    }
  }
  if (runStart >= 0) out.push({ offset: host(base + runStart), data: next.subarray(runStart), what, kind });
  return out;
}

const MERGE_BYTES = 4 << 20;

/** `writes` with runs of adjacent writes of the same kind and category joined (the bytes copied once). */
export function mergeAdjacent(writes: readonly DeviceWrite[]): readonly DeviceWrite[] {
  if (writes.length < 2) return writes;
  const sorted = [...writes].sort((x, y) => x.offset - y.offset);
  const out: DeviceWrite[] = [];
  for (let i = 0; i < sorted.length; ) {
    const first = sorted[i]!;
    let end = first.offset + first.data.length;
    let bytes = first.data.length;
    let j = i + 1;
    while (j < sorted.length) {
      const w = sorted[j]!;
      if (w.offset !== end || w.kind !== first.kind || w.category !== first.category || bytes + w.data.length > MERGE_BYTES) break;
      end += w.data.length;
      bytes += w.data.length;
      j++;
    }
    if (j === i + 1) out.push(first);
    else {
      const data = new Uint8Array(bytes);
      for (let k = i, o = 0; k < j; o += sorted[k]!.data.length, k++) data.set(sorted[k]!.data, o);
      out.push({ ...first, data, what: `${first.what} and ${j - i - 1} adjacent` });
    }
    i = j;
  }
  return out;
}

/** `b` zero-padded to whole 512-byte sectors (an L1 table need not be sector-sized). */
export function padSector(b: Uint8Array): Uint8Array {
  const n = Math.ceil(b.length / SECTOR) * SECTOR;
  if (n === b.length) return b;
  const out = new Uint8Array(n);
  out.set(b);
  return out;
}
