/**
 * L1 table entries (8 bytes each).
 *
 *   Bit  0 -  8: reserved (0)
 *        9 - 55: offset of the L2 table, cluster aligned; 0 = unallocated
 *       56 - 62: reserved (0)
 *           63: COPIED: the L2 table's refcount is exactly 1 (may be written in place)
 */

import { u32, TWO_32 } from './bytes.ts';

export const L1E_OFFSET_MASK_HI = 0x00ff_ffff;
export const L1E_OFFSET_MASK_LO = 0xffff_fe00;
export const L1E_RESERVED_MASK_HI = 0x7f00_0000;
export const L1E_RESERVED_MASK_LO = 0x0000_01ff;
export const COPIED_HI = 0x8000_0000;

export interface L1Entry {
  readonly l2Offset: number;
  readonly copied: boolean;
  readonly reservedBits: boolean;
}

export function decodeL1Entry(table: Uint8Array, index: number): L1Entry {
  const hi = u32(table, index * 8);
  const lo = u32(table, index * 8 + 4);
  const l2Offset = (hi & L1E_OFFSET_MASK_HI) * TWO_32 + ((lo & L1E_OFFSET_MASK_LO) >>> 0);
  return {
    l2Offset,
    copied: (hi & COPIED_HI) !== 0,
    reservedBits: (hi & L1E_RESERVED_MASK_HI) !== 0 || (lo & L1E_RESERVED_MASK_LO) !== 0,
  };
}

/** Fast path for readers: the L2 offset of entry `index`, or 0. */
export function l1Offset(table: Uint8Array, index: number): number {
  const o = index * 8;
  const hi = u32(table, o) & L1E_OFFSET_MASK_HI;
  const lo = (u32(table, o + 4) & L1E_OFFSET_MASK_LO) >>> 0;
  return hi * TWO_32 + lo;
}

/** The offset field (bits 9-55) of a 64-bit table entry given as its halves: L1, refcount-table and bitmap-table entries share it. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & L1E_OFFSET_MASK_HI) * TWO_32 + ((lo & L1E_OFFSET_MASK_LO) >>> 0);
}

/** Reserved bits (1-8 and 56-62) of an L1 entry given as its halves. */
export function l1ReservedBits(hi: number, lo: number): boolean {
  return (hi & L1E_RESERVED_MASK_HI) !== 0 || (lo & L1E_RESERVED_MASK_LO) !== 0;
}

/** An L1 entry pointing at the L2 table at `l2Offset`, COPIED when this image holds its only reference. */
export function l1Word(l2Offset: number, copied: boolean): { hi: number; lo: number } {
  return { hi: ((Math.floor(l2Offset / TWO_32) & L1E_OFFSET_MASK_HI) | (copied ? COPIED_HI : 0)) >>> 0, lo: (l2Offset % TWO_32) >>> 0 };
}
