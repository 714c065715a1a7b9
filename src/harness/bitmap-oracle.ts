/**
 * The crash harness's bitmap oracle (f): a persistent bitmap a crash state
 * holds as not in use marks every granule written since it was added.
 */

import { BME_FLAG_IN_USE } from '../format/bitmaps.ts';
import { loadBitmap } from '../engine/bitmaps/load.ts';
import { Qcow2Layer } from '../engine/qcow2-layer.ts';
import type { Layer } from '../engine/layer.ts';

const asBuffer = (a: Uint8Array): Buffer => (Buffer.isBuffer(a) ? a : Buffer.from(a.buffer, a.byteOffset, a.length));

/**
 * Oracle (f): every bitmap in the state that is not in use, and that the
 * workload added and only wrote through since, has a bit set for each
 * granule that reads otherwise than when it was added.
 */
export async function judgeBitmaps(layer: Layer, got: Uint8Array, refs: ReadonlyMap<string, { content: Uint8Array; checkable: boolean }>): Promise<string | undefined> {
  if (!(layer instanceof Qcow2Layer)) return undefined;
  for (const e of await layer.bitmapDirectory()) {
    const ref = refs.get(e.name);
    if (!ref?.checkable || e.flags & BME_FLAG_IN_USE) continue;
    const bits = await loadBitmap(layer.dev, { offset: e.tableOffset, size: e.tableSize }, layer.size, e.granularityBits, layer.geometry.clusterSize);
    const g = 2 ** e.granularityBits;
    const n = Math.min(got.length, ref.content.length);
    const G = asBuffer(got);
    const R = asBuffer(ref.content);
    for (let x = 0; x < n; x += g) {
      const end = Math.min(n, x + g);
      if (G.compare(R, x, end, x, end) !== 0 && !bits.get(x / g)) return `bitmap '${e.name}' is not in use but misses the granule at 0x${x.toString(16)}, written since it was added`;
    }
  }
  return undefined;
}

