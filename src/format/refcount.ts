/**
 * Refcount table and refcount blocks.
 *
 * Refcount table entry (8 bytes):
 *   Bit  0 -  8: reserved (0)
 *        9 - 63: offset of a refcount block, cluster aligned; 0 = not allocated
 *
 * Refcount block: cluster_size * 8 / refcount_bits entries of refcount_bits
 * each, refcount_bits = 1 << refcount_order (1 .. 64). Entries narrower than a
 * byte are packed starting at the least significant bit; wider ones are
 * big-endian.
 */

import { u16, u32, putU16, putU32, TWO_32 } from './bytes.ts';

/** Refcount table entry: bits 9-63 the refcount block's offset (0: none), bits 0-8 reserved. */
export const REFTABLE_OFFSET_MASK_LO = 0xffff_fe00;
export const REFTABLE_RESERVED_MASK_LO = 0x0000_01ff;

/** The refcount block offset of a refcount table entry given as its halves. */
export function reftableEntryOffset(hi: number, lo: number): number {
  return hi * TWO_32 + ((lo & REFTABLE_OFFSET_MASK_LO) >>> 0);
}

export function refcountTableEntry(table: Uint8Array, index: number): { offset: number; reservedBits: boolean } {
  const hi = u32(table, index * 8);
  const lo = u32(table, index * 8 + 4);
  return { offset: reftableEntryOffset(hi, lo), reservedBits: (lo & REFTABLE_RESERVED_MASK_LO) !== 0 };
}

export function setRefcountTableEntry(table: Uint8Array, index: number, offset: number): void {
  putU32(table, index * 8, Math.floor(offset / TWO_32));
  putU32(table, index * 8 + 4, offset % TWO_32);
}

/** Refcount of entry `index` of a block; 64-bit refcounts above 2^53 come back imprecise. */
export function getRefcount(block: Uint8Array, index: number, order: number): number {
  switch (order) {
    case 0:
      return (block[index >>> 3]! >>> (index & 7)) & 1;
    case 1:
      return (block[index >>> 2]! >>> ((index & 3) * 2)) & 3;
    case 2:
      return (block[index >>> 1]! >>> ((index & 1) * 4)) & 15;
    case 3:
      return block[index]!;
    case 4:
      return u16(block, index * 2);
    case 5:
      return u32(block, index * 4);
    case 6:
      return u32(block, index * 8) * TWO_32 + u32(block, index * 8 + 4);
    default:
      throw new RangeError(`refcount_order ${order}`);
  }
}

/**
 * The first entry at or after `from` whose refcount is 0, or `entries` when
 * none is: an allocator skips a full block in one pass over its bytes. For
 * byte-wide entries and wider, an entry is 0 when all its bytes are.
 */
export function nextZeroRefcount(block: Uint8Array, from: number, entries: number, order: number): number {
  if (order < 3) {
    for (let i = from; i < entries; i++) if (getRefcount(block, i, order) === 0) return i;
    return entries;
  }
  const w = 1 << (order - 3);
  for (let i = from; i < entries; i++) {
    let o = i * w;
    const end = o + w;
    while (o < end && block[o] === 0) o++;
    if (o === end) return i;
  }
  return entries;
}

/**
 * The refcounts of entries `index` of a block into `out` (same length): a
 * tree's worth of entries at once, the common widths read through one
 * DataView instead of one call per entry.
 */
export function readRefcounts(block: Uint8Array, index: ArrayLike<number>, order: number, out: Float64Array): void {
  const n = index.length;
  if (order === 4) {
    const dv = new DataView(block.buffer, block.byteOffset, block.byteLength);
    for (let k = 0; k < n; k++) out[k] = dv.getUint16(index[k]! * 2);
  } else if (order === 3) {
    for (let k = 0; k < n; k++) out[k] = block[index[k]!]!;
  } else if (order === 5) {
    const dv = new DataView(block.buffer, block.byteOffset, block.byteLength);
    for (let k = 0; k < n; k++) out[k] = dv.getUint32(index[k]! * 4);
  } else for (let k = 0; k < n; k++) out[k] = getRefcount(block, index[k]!, order);
}

/** Entries `index` of a block set to `values` (checked against the width as setRefcount checks them). */
export function writeRefcounts(block: Uint8Array, index: ArrayLike<number>, order: number, values: ArrayLike<number>): void {
  const n = index.length;
  if (order === 4 || order === 5) {
    const max = MAX_BY_ORDER[order]!;
    for (let k = 0; k < n; k++) {
      const v = values[k]!;
      if (v < 0 || !(v <= max) || !Number.isInteger(v)) throw new RangeError(`refcount ${v} does not fit in ${2 ** order} bits`);
    }
    const dv = new DataView(block.buffer, block.byteOffset, block.byteLength);
    if (order === 4) for (let k = 0; k < n; k++) dv.setUint16(index[k]! * 2, values[k]!);
    else for (let k = 0; k < n; k++) dv.setUint32(index[k]! * 4, values[k]!);
  } else for (let k = 0; k < n; k++) setRefcount(block, index[k]!, order, values[k]!);
}

/** A stored refcount in decimal, exactly (a 64-bit one above 2^53 is rounded as a number). */
export function refcountText(block: Uint8Array, index: number, order: number): string {
  if (order !== 6) return String(getRefcount(block, index, order));
  return ((BigInt(u32(block, index * 8)) << 32n) | BigInt(u32(block, index * 8 + 4))).toString();
}

export function maxRefcount(order: number): number {
  return order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** order) - 1;
}

/** maxRefcount by order, looked up on every refcount write */
const MAX_BY_ORDER = [0, 1, 2, 3, 4, 5, 6].map(maxRefcount);

export function setRefcount(block: Uint8Array, index: number, order: number, value: number): void {
  if (value < 0 || !(value <= MAX_BY_ORDER[order]!) || !Number.isInteger(value)) {
    throw new RangeError(`refcount ${value} does not fit in ${2 ** order} bits`);
  }
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 >>> order;
      const byte = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[byte] = (block[byte]! & ~mask) | (value << shift);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      putU16(block, index * 2, value);
      return;
    case 5:
      putU32(block, index * 4, value);
      return;
    case 6:
      putU32(block, index * 8, Math.floor(value / TWO_32));
      putU32(block, index * 8 + 4, value % TWO_32);
      return;
    default:
      throw new RangeError(`refcount_order ${order}`);
  }
}

/**
 * Size a refcount structure placed at cluster `placeAt`: `blocks` refcount
 * blocks (for refcount-table indices `firstRt` on) followed by a refcount
 * table of `tableClusters` clusters, such that the blocks count every
 * cluster up to the structure's own end and the table has an entry for each
 * of them. The table has at least `minEntries` entries and
 * `minTableClusters` clusters. A fixed point: more blocks can need a bigger
 * table, whose clusters can need another block.
 */
export function refcountStructureSize(
  g: { readonly clusterSize: number; readonly refcountBlockEntries: number },
  placeAt: number,
  firstRt: number,
  minEntries: number,
  minTableClusters: number,
): { blocks: number; tableClusters: number } {
  const cs = g.clusterSize;
  const E = g.refcountBlockEntries;
  let blocks = 1;
  let tableClusters = Math.max(1, minTableClusters);
  for (;;) {
    const last = placeAt + blocks + tableClusters - 1;
    const maxRt = Math.max(minEntries - 1, Math.floor(last / E));
    const needTable = Math.max(Math.ceil(((maxRt + 1) * 8) / cs), minTableClusters);
    const needBlocks = maxRt - firstRt + 1;
    if (needTable <= tableClusters && needBlocks <= blocks) return { blocks, tableClusters };
    tableClusters = Math.max(tableClusters, needTable);
    blocks = Math.max(blocks, needBlocks);
  }
}
