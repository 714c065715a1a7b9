/**
 * The clusters one L2 table references, as QEMU's refcounts count them:
 * each standard (or allocated zero) cluster once per entry, each cluster a
 * compressed run touches once per entry. Snapshots count a whole tree with
 * it; make_empty drops one.
 */

import type { Geometry } from '../../format/header.ts';
import { u32 } from '../../format/bytes.ts';
import { compressedDescriptor, l2EntryAt, L2E_COMPRESSED_HI, L2E_OFFSET_MASK_HI, L2E_OFFSET_MASK_LO, type L2Entry } from '../../format/l2.ts';

/**
 * Append to `out` every cluster the entries of `table` reference. With an
 * external data file (`dataFile`), standard entries name the data file's
 * clusters, which carry no refcount: they are left out. `each` sees every
 * entry that references a standard cluster of the image.
 */
export function treeRefs(table: Uint8Array, g: Geometry, out: number[], o: { dataFile?: boolean; each?: ((index: number, e: L2Entry) => void) | undefined } = {}): void {
  const cs = g.clusterSize;
  const es = g.l2EntrySize;
  for (let j = 0; j < g.l2Entries; j++) {
    // the descriptor's words read in place: a tree has a million of them
    const hi = u32(table, j * es);
    const lo = u32(table, j * es + 4);
    if (hi === 0 && lo === 0) continue;
    if (hi & L2E_COMPRESSED_HI) {
      const d = compressedDescriptor(l2EntryAt(table, j, g), g.clusterBits);
      for (let c = Math.floor(d.offset / cs); c <= Math.floor((d.offset + d.length - 1) / cs); c++) out.push(c);
      continue;
    }
    if (o.dataFile) continue;
    const off = (hi & L2E_OFFSET_MASK_HI) * 0x1_0000_0000 + ((lo & L2E_OFFSET_MASK_LO) >>> 0);
    if (off === 0) continue;
    out.push(off / cs);
    if (o.each) o.each(j, l2EntryAt(table, j, g));
  }
}
