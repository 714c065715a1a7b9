/**
 * Persistent dirty bitmaps: the bitmaps header extension, the bitmap
 * directory, bitmap tables. The directory (referenced by the extension):
 * each entry,
 * padded to 8 bytes:
 *
 *   Byte  0 -  7: bitmap_table_offset
 *         8 - 11: bitmap_table_size     entries
 *        12 - 15: flags                 bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible
 *        16     : type                  1 = dirty tracking bitmap
 *        17     : granularity_bits      9 ..= 31
 *        18 - 19: name_size             1 ..= 1023
 *        20 - 23: extra_data_size
 *        24 -  …: extra data, then the name (no NUL)
 */

import { FormatError, hex } from '../errors.ts';
import { putU16, putU32, putU64, u16, u32, u64, u64big } from './bytes.ts';
import { MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAPS } from './limits.ts';

export interface BitmapDirectoryEntry {
  readonly tableOffset: number;
  readonly tableSize: number;
  readonly flags: number;
  readonly type: number;
  readonly granularityBits: number;
  readonly name: string;
  /** bytes of extra data before the name (QEMU refuses any) */
  readonly extraDataSize?: number;
  /** bitmap_table_offset exactly as read (tableOffset rounds past 2^53): judged and printed from this */
  readonly exactTableOffset?: bigint;
}

export const BME_FLAG_IN_USE = 1;
export const BME_FLAG_AUTO = 2;
const BME_RESERVED_FLAGS = ~(1 | 2 | 4);

/** QEMU's limits on one bitmap: table entries, and bytes of bitmap data (BME_MAX_TABLE_SIZE, BME_MAX_PHYS_SIZE). */
export const BME_MAX_TABLE_SIZE = 0x800_0000;
export const BME_MAX_PHYS_SIZE = 0x2000_0000;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_GRANULARITY_BITS = 31;
export const BME_MAX_NAME_SIZE = 1023;
export { MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES };

const S = 'bitmap directory';
const dec = new TextDecoder();

export function decodeBitmapDirectory(b: Uint8Array, count: number, baseOffset: number): BitmapDirectoryEntry[] {
  const out: BitmapDirectoryEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    const at = baseOffset + off;
    if (off + 24 > b.length) throw new FormatError(S, `entry ${i}`, at, 'entry runs past the end of the directory');
    const flags = u32(b, off + 12);
    const type = b[off + 16]!;
    const granularityBits = b[off + 17]!;
    const nameSize = u16(b, off + 18);
    const extra = u32(b, off + 20);
    const end = off + 24 + extra + nameSize;
    if (end > b.length) throw new FormatError(S, `entry ${i}`, at, 'entry runs past the end of the directory');
    if (flags & BME_RESERVED_FLAGS) throw new FormatError(S, `flags of entry ${i}`, at + 12, 'reserved flags are set');
    if (type !== 1) throw new FormatError(S, `type of entry ${i}`, at + 16, `unknown bitmap type ${type}`);
    if (granularityBits < 9 || granularityBits > 31) throw new FormatError(S, `granularity_bits of entry ${i}`, at + 17, `${granularityBits} is outside 9..31`);
    if (nameSize === 0) throw new FormatError(S, `name_size of entry ${i}`, at + 18, 'empty name');
    out.push({
      tableOffset: u64(b, off),
      tableSize: u32(b, off + 8),
      flags,
      type,
      granularityBits,
      name: dec.decode(b.subarray(off + 24 + extra, end)),
      extraDataSize: extra,
      exactTableOffset: u64big(b, off),
    });
    off = Math.ceil(end / 8) * 8;
  }
  return out;
}

/**
 * The bitmaps header extension's body (24 bytes):
 *
 *   Byte  0 -  3: nb_bitmaps               1 ..= 65535
 *         4 -  7: reserved32               0
 *         8 - 15: bitmap_directory_size    bytes, at most 64 MiB
 *        16 - 23: bitmap_directory_offset  cluster-aligned
 */
export function encodeBitmapsExtension(nbBitmaps: number, directorySize: number, directoryOffset: number): Uint8Array {
  const b = new Uint8Array(24);
  putU32(b, 0, nbBitmaps);
  putU64(b, 8, directorySize);
  putU64(b, 16, directoryOffset);
  return b;
}

const enc = new TextEncoder();

/** Bytes one directory entry takes: 24, the name, padded to 8 (no extra data: QEMU writes none). */
export function directoryEntrySize(name: string): number {
  return Math.ceil((24 + enc.encode(name).length) / 8) * 8;
}

/** The directory holding `entries`, in order, without extra data (QEMU's bitmap_list_store). */
export function encodeBitmapDirectory(entries: readonly BitmapDirectoryEntry[]): Uint8Array {
  const size = entries.reduce((n, e) => n + directoryEntrySize(e.name), 0);
  const b = new Uint8Array(size);
  let off = 0;
  for (const e of entries) {
    const name = enc.encode(e.name);
    putU64(b, off, e.tableOffset);
    putU32(b, off + 8, e.tableSize);
    putU32(b, off + 12, e.flags);
    b[off + 16] = 1;
    b[off + 17] = e.granularityBits;
    putU16(b, off + 18, name.length);
    b.set(name, off + 24);
    off += directoryEntrySize(e.name);
  }
  return b;
}

/** Bits a bitmap of granularity 2^`granularityBits` has for a disk of `size` bytes: one per granule, the last one partial. */
export function bitmapBits(size: number, granularityBits: number): number {
  return Math.ceil(size / 2 ** granularityBits);
}

/** Entries of a bitmap's table: one data cluster (cluster_size * 8 bits) per entry. */
export function bitmapTableSize(size: number, granularityBits: number, clusterSize: number): number {
  return Math.ceil(Math.ceil(bitmapBits(size, granularityBits) / 8) / clusterSize);
}

/**
 * QEMU's check of a directory entry it loads or stores (check_dir_entry),
 * for a disk of `size` bytes: a table that exists, is aligned and within
 * QEMU's limits, and (unless in use, when a resize may have left it short)
 * covers the disk. Also: no extra data, as QEMU refuses it.
 */
export function checkDirectoryEntry(e: BitmapDirectoryEntry & { readonly extraDataSize?: number }, clusterSize: number, size: number, at: number): void {
  const bad = (field: string, problem: string): never => {
    throw new FormatError(S, `${field} of bitmap '${e.name}'`, at, problem);
  };
  if (e.extraDataSize) bad('extra_data_size', 'bitmap extra data is not supported');
  if (e.tableOffset === 0 || e.tableSize === 0) bad('bitmap_table_offset', 'the bitmap has no table');
  // alignment on the exact value: past 2^53 the number rounds (2^60 + 512 would pass as aligned)
  const exact = e.exactTableOffset ?? BigInt(e.tableOffset);
  if (exact % BigInt(clusterSize) !== 0n) bad('bitmap_table_offset', `${hex(exact)} is not aligned to a cluster`);
  if (e.tableSize > BME_MAX_TABLE_SIZE) bad('bitmap_table_size', `${e.tableSize} entries is more than ${BME_MAX_TABLE_SIZE}`);
  if (e.tableSize * clusterSize > BME_MAX_PHYS_SIZE) bad('bitmap_table_size', `${e.tableSize} clusters of bitmap data is more than ${BME_MAX_PHYS_SIZE} bytes`);
  if (e.name.length > BME_MAX_NAME_SIZE) bad('name_size', `the name is longer than ${BME_MAX_NAME_SIZE} bytes`);
  if (!(e.flags & BME_FLAG_IN_USE) && e.tableSize < bitmapTableSize(size, e.granularityBits, clusterSize)) {
    bad('bitmap_table_size', `${e.tableSize} clusters do not cover the ${size}-byte disk`);
  }
}

/** Bitmap table entries: bits 9..55 the data cluster's offset; bit 0, with no offset, "every bit set"; the rest reserved. */
export const BTE_ALL_ONES = 1;
const BTE_OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
const BTE_RESERVED_MASK = 0xff00_0000_0000_01fen;

export type BitmapTableEntry = { readonly kind: 'zeros' } | { readonly kind: 'ones' } | { readonly kind: 'data'; readonly offset: number };

/** Decode a bitmap table as QEMU's bitmap_table_load checks it; `at` is the table's host offset (for messages). */
export function decodeBitmapTable(b: Uint8Array, entries: number, clusterSize: number, at: number): BitmapTableEntry[] {
  const out: BitmapTableEntry[] = [];
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  for (let i = 0; i < entries; i++) {
    const e = dv.getBigUint64(i * 8);
    const where = at + i * 8;
    if (e & BTE_RESERVED_MASK) throw new FormatError('bitmap table', `entry ${i}`, where, `reserved bits are set in 0x${e.toString(16)}`);
    const offset = Number(e & BTE_OFFSET_MASK);
    if (offset === 0) {
      out.push(e & 1n ? { kind: 'ones' } : { kind: 'zeros' });
      continue;
    }
    if (e & 1n) throw new FormatError('bitmap table', `entry ${i}`, where, 'both a data cluster and the all-ones flag');
    if (offset % clusterSize !== 0) throw new FormatError('bitmap table', `entry ${i}`, where, `data cluster ${hex(offset)} is not aligned to a cluster`);
    out.push({ kind: 'data', offset });
  }
  return out;
}

/** A bitmap table: data clusters by entry (0: an all-zero cluster, nothing stored). */
export function encodeBitmapTable(offsets: ArrayLike<number>): Uint8Array {
  const b = new Uint8Array(offsets.length * 8);
  for (let i = 0; i < offsets.length; i++) putU64(b, i * 8, offsets[i]!);
  return b;
}
