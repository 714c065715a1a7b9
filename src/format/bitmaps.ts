/**
 * Bitmap directory (referenced by the bitmaps header extension). Each entry,
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

import { FormatError } from '../errors.ts';
import { u16, u32, u64 } from './bytes.ts';

export interface BitmapDirectoryEntry {
  readonly tableOffset: number;
  readonly tableSize: number;
  readonly flags: number;
  readonly type: number;
  readonly granularityBits: number;
  readonly name: string;
}

export const BME_FLAG_IN_USE = 1;
export const BME_FLAG_AUTO = 2;
const BME_RESERVED_FLAGS = ~(1 | 2 | 4);

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
    });
    off = Math.ceil(end / 8) * 8;
  }
  return out;
}
