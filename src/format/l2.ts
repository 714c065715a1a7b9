/**
 * L2 table entries.
 *
 * Standard cluster descriptor (8 bytes):
 *   Bit  0     : reads as zero (v3, and only without extended L2)
 *        1 -  8: reserved (0)
 *        9 - 55: host cluster offset, cluster aligned; 0 = unallocated
 *                (with an external data file, 0 is valid when COPIED is set)
 *       56 - 61: reserved (0)
 *       62     : 0 = standard, 1 = compressed
 *       63     : COPIED: refcount exactly 1
 *
 * Compressed cluster descriptor, with x = 62 - (cluster_bits - 8):
 *   Bit  0 - x-1: host byte offset of the compressed data (not aligned)
 *        x - 61 : number of additional 512-byte sectors used
 *       62      : 1
 *       63      : 0 (compressed clusters are never COPIED)
 *
 * Extended L2 (16 bytes): the descriptor above, then a 64-bit bitmap:
 *   Bit  0 - 31: subcluster n is allocated (has its data in the host cluster)
 *       32 - 63: subcluster n reads as zero
 *   A subcluster never has both bits set.
 */

import { u32, putU32, TWO_32 } from './bytes.ts';
import type { Geometry } from './header.ts';

export const L2E_OFFSET_MASK_HI = 0x00ff_ffff;
export const L2E_OFFSET_MASK_LO = 0xffff_fe00;
export const L2E_COMPRESSED_HI = 0x4000_0000;
export const L2E_COPIED_HI = 0x8000_0000;
export const L2E_ZERO_LO = 0x1;
export const L2E_STD_RESERVED_HI = 0x3f00_0000;
export const L2E_STD_RESERVED_LO = 0x0000_01fe;

/** QEMU's QCow2SubclusterType, as strings. */
export type SubclusterType =
  | 'unallocated-plain' // reads from the backing file, or as zero
  | 'unallocated-alloc' // extended L2: the cluster has a host offset, this subcluster is not allocated
  | 'zero-plain'
  | 'zero-alloc'
  | 'normal'
  | 'compressed'
  | 'invalid';

/**
 * One L2 entry as its raw big-endian words: the descriptor halves and, with
 * extended L2, the subcluster bitmap halves (0 otherwise). Kept as 32-bit
 * halves so that flag bits such as COPIED (bit 63) survive without bigint.
 * This is the one entry type of the project: records, state and engine use it.
 */
export interface L2Entry {
  readonly hi: number;
  readonly lo: number;
  readonly bitmapHi: number;
  readonly bitmapLo: number;
}

/** A reusable, writable entry for hot loops (readL2Entry fills it in place). */
export type RawL2Entry = { -readonly [K in keyof L2Entry]: L2Entry[K] };

/** The unallocated entry (all zero). */
export const L2_UNALLOCATED: L2Entry = Object.freeze({ hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 });

/** Extended L2: every one of the 32 subclusters (a bitmap half). */
export const ALL_SUBCLUSTERS = 0xffff_ffff;

export function readL2Entry(table: Uint8Array, index: number, g: Geometry, out: RawL2Entry): RawL2Entry {
  const o = index * g.l2EntrySize;
  out.hi = u32(table, o);
  out.lo = u32(table, o + 4);
  if (g.extendedL2) {
    out.bitmapHi = u32(table, o + 8);
    out.bitmapLo = u32(table, o + 12);
  } else {
    out.bitmapHi = 0;
    out.bitmapLo = 0;
  }
  return out;
}

export function isCompressed(e: L2Entry): boolean {
  return (e.hi & L2E_COMPRESSED_HI) !== 0;
}

export function isCopied(e: L2Entry): boolean {
  return (e.hi & L2E_COPIED_HI) !== 0;
}

/** Host offset of a standard entry, with its low 9 bits masked off as QEMU does. */
export function standardOffset(e: L2Entry): number {
  return (e.hi & L2E_OFFSET_MASK_HI) * TWO_32 + ((e.lo & L2E_OFFSET_MASK_LO) >>> 0);
}

export function standardReservedBits(e: L2Entry, g: Geometry): boolean {
  if ((e.hi & L2E_STD_RESERVED_HI) !== 0 || (e.lo & L2E_STD_RESERVED_LO) !== 0) return true;
  // With extended L2, bit 0 is reserved too (zero is expressed per subcluster).
  return g.extendedL2 && (e.lo & L2E_ZERO_LO) !== 0;
}

/** QEMU's qcow2_get_cluster_type() for a non-extended view of the entry. */
export function clusterType(
  e: L2Entry,
  g: Geometry,
  hasDataFile: boolean,
): 'compressed' | 'zero-plain' | 'zero-alloc' | 'unallocated' | 'normal' {
  if (isCompressed(e)) return 'compressed';
  const hasOffset = (e.hi & L2E_OFFSET_MASK_HI) !== 0 || (e.lo & L2E_OFFSET_MASK_LO) !== 0;
  if ((e.lo & L2E_ZERO_LO) !== 0 && !g.extendedL2) return hasOffset ? 'zero-alloc' : 'zero-plain';
  if (!hasOffset) {
    // Offset 0 is a real offset in an external data file; refcounts there are always 1,
    // so COPIED tells an allocated cluster at 0 from an unallocated one.
    return hasDataFile && isCopied(e) ? 'normal' : 'unallocated';
  }
  return 'normal';
}

/** QEMU's qcow2_get_subcluster_type(). */
export function subclusterType(e: L2Entry, sc: number, g: Geometry, hasDataFile: boolean): SubclusterType {
  const t = clusterType(e, g, hasDataFile);
  if (!g.extendedL2) {
    return t === 'unallocated' ? 'unallocated-plain' : t;
  }
  if (t === 'compressed') return 'compressed';
  const alloc = e.bitmapLo >>> 0;
  const zero = e.bitmapHi >>> 0;
  if (t === 'normal') {
    if ((alloc & zero) !== 0) return 'invalid';
    if (zero & (1 << sc)) return 'zero-alloc';
    if (alloc & (1 << sc)) return 'normal';
    return 'unallocated-alloc';
  }
  // unallocated cluster: no subcluster may claim data
  if (alloc !== 0) return 'invalid';
  if (zero & (1 << sc)) return 'zero-plain';
  return 'unallocated-plain';
}

export interface CompressedDescriptor {
  /** host byte offset of the compressed stream (rounded above 2^53: such an offset is past any file) */
  readonly offset: number;
  /** the same, exact (for messages) */
  readonly exactOffset: bigint;
  /** bytes to read: up to the end of the last 512-byte sector used */
  readonly length: number;
}

/** Decode the compressed cluster descriptor (bits 0 - 61). */
export function compressedDescriptor(e: L2Entry, clusterBits: number): CompressedDescriptor {
  const x = 62 - (clusterBits - 8); // bits of host offset
  const v = (BigInt(e.hi & 0x3fff_ffff) << 32n) | BigInt(e.lo >>> 0);
  const exact = v & ((1n << BigInt(x)) - 1n);
  const sectors = Number(v >> BigInt(x)) + 1;
  // QEMU: nb_csectors * 512 - offset_into_sector(offset); the offset exact (a number rounds above 2^53)
  return { offset: Number(exact), exactOffset: exact, length: sectors * 512 - Number(exact % 512n) };
}

export function encodeCompressedDescriptor(offset: number, length: number, clusterBits: number): L2Entry {
  const x = 62 - (clusterBits - 8);
  const end = offset + length;
  const sectors = Math.ceil(end / 512) - Math.floor(offset / 512); // sectors touched
  const v = (BigInt(sectors - 1) << BigInt(x)) | BigInt(offset);
  return {
    hi: Number((v >> 32n) & 0x3fff_ffffn) | L2E_COMPRESSED_HI,
    lo: Number(v & 0xffff_ffffn),
    bitmapHi: 0,
    bitmapLo: 0,
  };
}

export function writeL2Entry(table: Uint8Array, index: number, g: Geometry, e: L2Entry): void {
  const o = index * g.l2EntrySize;
  putU32(table, o, e.hi);
  putU32(table, o + 4, e.lo);
  if (g.extendedL2) {
    putU32(table, o + 8, e.bitmapHi);
    putU32(table, o + 12, e.bitmapLo);
  }
}

/** Entry `index` of an L2 table, as a new value. */
export function l2EntryAt(table: Uint8Array, index: number, g: Geometry): L2Entry {
  const o = index * g.l2EntrySize;
  return g.extendedL2
    ? { hi: u32(table, o), lo: u32(table, o + 4), bitmapHi: u32(table, o + 8), bitmapLo: u32(table, o + 12) }
    : { hi: u32(table, o), lo: u32(table, o + 4), bitmapHi: 0, bitmapLo: 0 };
}

/**
 * A standard entry mapping host cluster `hostOffset` (bits 9-55), COPIED
 * (bit 63) when this image holds its only reference, with the given
 * extended-L2 bitmap halves.
 */
export function standardEntry(hostOffset: number, copied: boolean, bitmapLo = 0, bitmapHi = 0): L2Entry {
  return {
    hi: ((Math.floor(hostOffset / TWO_32) & L2E_OFFSET_MASK_HI) | (copied ? L2E_COPIED_HI : 0)) >>> 0,
    lo: (hostOffset % TWO_32) >>> 0,
    bitmapHi,
    bitmapLo,
  };
}

/** v3 "reads as zero" without a host cluster: bit 0, or (extended L2) every subcluster's zero bit. */
export function zeroEntry(g: Geometry): L2Entry {
  return g.extendedL2 ? { hi: 0, lo: 0, bitmapHi: ALL_SUBCLUSTERS, bitmapLo: 0 } : { hi: 0, lo: L2E_ZERO_LO, bitmapHi: 0, bitmapLo: 0 };
}

export function sameL2Entry(a: L2Entry, b: L2Entry): boolean {
  return a.hi === b.hi && a.lo === b.lo && a.bitmapHi === b.bitmapHi && a.bitmapLo === b.bitmapLo;
}

/** Bits s0..s1 of a 32-bit subcluster bitmap half. */
export function subclusterBits(s0: number, s1: number): number {
  let m = 0;
  for (let s = s0; s <= s1; s++) m |= 1 << s;
  return m >>> 0;
}
