/**
 * The persisted dedup index: its header extension and its area (qledger's
 * own; journal-format.md, "Persisted dedup index"). Pure codecs.
 *
 * Extension EXT_DEDUP_INDEX ("qldx"), 16 bytes:
 *   0 - 7   area_offset   byte offset of the area, cluster aligned
 *   8 - 15  area_length   bytes of the area
 *
 * Area (in clusters of refcount 0, past everything the image counts; QEMU
 * may reuse them, which clears the autoclear bit first):
 *   0 - 7   magic         "QLDXAREA"
 *   8 - 11  version       1
 *  12 - 15  dir_bits      d: the directory has 2^d + 1 entries (10 .. 24)
 *  16 - 19  entries       n
 *  20 - 23  flags         bit 0: the arrays are little-endian
 *  24 - 27  crc32         of bytes 32 .. area_length
 *  28 - 31  reserved      0
 *  32 -     directory (4 (2^d + 1) bytes), tags (2n, padded to a multiple
 *           of 4), guest cluster numbers (4n), in the byte order flag 0 says
 */

import { FormatError, hex } from '../errors.ts';
import { u32, putU32, u64big, u64Safe, putU64 } from './bytes.ts';

const S = 'dedup index area';
export const DEDUP_EXT_LENGTH = 16;
export const AREA_HEADER = 32;
const MAGIC = new TextEncoder().encode('QLDXAREA');

export interface DedupIndexExtension {
  readonly offset: number;
  readonly length: number;
}

export function encodeDedupExtension(e: DedupIndexExtension): Uint8Array {
  const b = new Uint8Array(DEDUP_EXT_LENGTH);
  putU64(b, 0, e.offset);
  putU64(b, 8, e.length);
  return b;
}

export function decodeDedupExtension(b: Uint8Array, at: number): DedupIndexExtension {
  if (b.length !== DEDUP_EXT_LENGTH) throw new FormatError('dedup index extension', 'length', at, `is ${b.length} bytes, not ${DEDUP_EXT_LENGTH}`);
  const field = (o: number, name: string): number => {
    const v = u64Safe(b, o);
    if (v === undefined) throw new FormatError('dedup index extension', name, at + o, `${hex(u64big(b, o))} is above 2^53`);
    return v;
  };
  return { offset: field(0, 'area offset'), length: field(8, 'area length') };
}

/** The area's size for a directory of 2^d + 1 entries and n entries. */
export function areaLength(d: number, n: number): number {
  return AREA_HEADER + 4 * (2 ** d + 1) + Math.ceil((2 * n) / 4) * 4 + 4 * n;
}

export interface AreaArrays {
  readonly d: number;
  readonly dir: Uint32Array;
  readonly tags: Uint16Array;
  readonly vals: Uint32Array;
}

const littleEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

export function encodeArea(a: AreaArrays, crc32: (b: Uint8Array) => number): Uint8Array {
  const n = a.tags.length;
  const out = new Uint8Array(areaLength(a.d, n));
  out.set(MAGIC, 0);
  putU32(out, 8, 1);
  putU32(out, 12, a.d);
  putU32(out, 16, n);
  putU32(out, 20, littleEndian ? 1 : 0);
  let at = AREA_HEADER;
  out.set(new Uint8Array(a.dir.buffer, a.dir.byteOffset, a.dir.byteLength), at);
  at += a.dir.byteLength;
  out.set(new Uint8Array(a.tags.buffer, a.tags.byteOffset, a.tags.byteLength), at);
  at += Math.ceil((2 * n) / 4) * 4;
  out.set(new Uint8Array(a.vals.buffer, a.vals.byteOffset, a.vals.byteLength), at);
  putU32(out, 24, crc32(out.subarray(AREA_HEADER)));
  return out;
}

/**
 * Decode and check an area read from `at`: magic, version, bounds, length,
 * checksum, the machine's byte order, and a directory that is
 * non-decreasing and ends at n. Throws FormatError naming the field.
 */
export function decodeArea(b: Uint8Array, at: number, crc32: (b: Uint8Array) => number): AreaArrays {
  if (b.length < AREA_HEADER) throw new FormatError(S, 'length', at, `area of ${b.length} bytes is shorter than its header`);
  for (let i = 0; i < 8; i++) if (b[i] !== MAGIC[i]) throw new FormatError(S, 'magic', at, 'is not QLDXAREA');
  if (u32(b, 8) !== 1) throw new FormatError(S, 'version', at + 8, `is ${u32(b, 8)}, not 1`);
  const d = u32(b, 12);
  if (d < 10 || d > 24) throw new FormatError(S, 'dir_bits', at + 12, `is ${d}, outside 10 .. 24`);
  const n = u32(b, 16);
  if (areaLength(d, n) !== b.length) throw new FormatError(S, 'entries', at + 16, `${n} entries need ${areaLength(d, n)} bytes; the area has ${b.length}`);
  if ((u32(b, 20) & 1) !== (littleEndian ? 1 : 0)) throw new FormatError(S, 'flags', at + 20, "was written on a machine of the other byte order (fingerprints differ)");
  if (crc32(b.subarray(AREA_HEADER)) !== u32(b, 24)) throw new FormatError(S, 'crc32', at + 24, 'checksum mismatch');
  // copies, aligned for the typed arrays
  let o = AREA_HEADER;
  const dir = new Uint32Array(b.slice(o, o + 4 * (2 ** d + 1)).buffer);
  o += dir.byteLength;
  const tags = new Uint16Array(b.slice(o, o + 2 * n).buffer);
  o += Math.ceil((2 * n) / 4) * 4;
  const vals = new Uint32Array(b.slice(o, o + 4 * n).buffer);
  let prev = 0;
  for (let i = 0; i < dir.length; i++) {
    if (dir[i]! < prev || dir[i]! > n) throw new FormatError(S, 'directory', at + AREA_HEADER + 4 * i, `entry ${i} (${dir[i]}) is out of order or past the ${n} entries`);
    prev = dir[i]!;
  }
  if (dir[dir.length - 1] !== n) throw new FormatError(S, 'directory', at + AREA_HEADER + 4 * (dir.length - 1), `ends at ${dir[dir.length - 1]}, not at the ${n} entries`);
  return { d, dir, tags, vals };
}
