/**
 * L1 table entries (8 bytes each).
 *
 *   Bit  0 -  8: reserved (0)
 *        9 - 55: offset of the L2 table, cluster aligned; 0 = unallocated
 *       56 - 62: reserved (0)
 *           63: COPIED: the L2 table's refcount is exactly 1 (may be written in place)
 */

import { u32, putU32, TWO_32 } from './bytes.ts';

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

export function encodeL1Entry(table: Uint8Array, index: number, l2Offset: number, copied: boolean): void {
  putU32(table, index * 8, (Math.floor(l2Offset / TWO_32) & L1E_OFFSET_MASK_HI) | (copied ? COPIED_HI : 0));
  putU32(table, index * 8 + 4, l2Offset % TWO_32);
}
