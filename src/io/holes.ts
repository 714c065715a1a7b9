/**
 * Which ranges of a device read as zero without being stored: SEEK_DATA /
 * SEEK_HOLE through the native helper for files, as QEMU does; elsewhere
 * (or without the helper) 4 KiB blocks that read as zero count as holes,
 * which differs from QEMU where a file holds explicitly written zeros.
 */

import { isZero } from '../format/bytes.ts';
import type { BlockDevice } from './device.ts';
import { FileDevice } from './file-device.ts';

/** Hole granularity without the file system's answer. */
export const HOLE_GRANULARITY = 4096;

export async function zeroRun(dev: BlockDevice, offset: number, bytes: number): Promise<{ zero: boolean; length: number }> {
  // the file system first: SEEK_DATA past the end answers "hole" too, and a conversion asks once per run, so no size is asked for
  const fromFs = dev instanceof FileDevice ? dev.holeRun(offset, bytes) : undefined;
  if (fromFs) return fromFs;
  const size = await dev.size();
  const end = offset + bytes;
  if (offset >= size) return { zero: true, length: bytes };
  const G = HOLE_GRANULARITY;
  const buf = new Uint8Array(1 << 20);
  let pos = offset;
  let first: boolean | undefined;
  while (pos < end) {
    if (pos >= size) {
      // past the end of the file reads as a hole
      if (first === false) break;
      pos = end;
      break;
    }
    const base = pos - (pos % G);
    const n = Math.min(buf.length, Math.ceil((Math.min(end, size) - base) / G) * G);
    await dev.readInto(buf.subarray(0, n), base);
    let stopped = false;
    for (let i = 0; i < n; i += G) {
      const z = isZero(buf.subarray(i, i + G));
      first ??= z;
      if (z !== first) {
        stopped = true;
        break;
      }
      pos = Math.min(end, base + i + G);
    }
    if (stopped) break;
  }
  return { zero: first ?? true, length: Math.max(1, pos - offset) };
}
