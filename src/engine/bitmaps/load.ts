/**
 * Reading a stored persistent bitmap: its table checked as QEMU's
 * bitmap_table_load checks it, then each data cluster it names (an entry
 * with no cluster is all zeros, or all ones with its flag).
 */

import { decodeBitmapTable } from '../../format/bitmaps.ts';
import { readAt, type BlockDevice } from '../../io/device.ts';
import { DirtyBitmap } from './dirty-bitmap.ts';

export async function loadBitmap(dev: BlockDevice, table: { readonly offset: number; readonly size: number }, diskSize: number, granularityBits: number, clusterSize: number): Promise<DirtyBitmap> {
  const bits = new DirtyBitmap(diskSize, granularityBits, clusterSize);
  if (!table.offset) return bits;
  const entries = decodeBitmapTable(await readAt(dev, table.offset, table.size * 8), table.size, clusterSize, table.offset);
  for (let i = 0; i < entries.length && i < bits.chunkCount; i++) {
    const t = entries[i]!;
    if (t.kind === 'ones') bits.loadChunk(i, 'ones');
    else if (t.kind === 'data') bits.loadChunk(i, await readAt(dev, t.offset, clusterSize));
  }
  return bits;
}
