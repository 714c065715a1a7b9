/**
 * The clusters one L2 table references, as QEMU's refcounts count them:
 * each standard (or allocated zero) cluster once per entry, each cluster a
 * compressed run touches once per entry. Snapshots count a whole tree with
 * it; make_empty drops one. A tree's worth is a million numbers: they go
 * into a growable Float64Array (ClusterList), not a JS array, so the
 * allocator sorts and walks them without a copy.
 */

import type { Geometry } from '../../format/header.ts';
import { compressedDescriptor, l2EntryAt, L2E_COMPRESSED_HI, L2E_COPIED_HI, L2E_OFFSET_MASK_HI, L2E_OFFSET_MASK_LO, type L2Entry } from '../../format/l2.ts';

/** A list of cluster numbers, appended to; `view()` is the list so far (no copy). */
export class ClusterList {
  private buf = new Float64Array(1024);
  length = 0;

  push(c: number): void {
    if (this.length === this.buf.length) {
      const grown = new Float64Array(this.buf.length * 2);
      grown.set(this.buf);
      this.buf = grown;
    }
    this.buf[this.length++] = c;
  }

  view(): Float64Array {
    return this.buf.subarray(0, this.length);
  }
}

/**
 * Append to `out` every cluster the entries of `table` reference. With an
 * external data file (`dataFile`), standard entries name the data file's
 * clusters, which carry no refcount: they are left out. `each` sees every
 * entry that references a standard cluster of the image.
 */
export function treeRefs(table: Uint8Array, g: Geometry, out: ClusterList, o: { dataFile?: boolean; each?: ((index: number, e: L2Entry) => void) | undefined } = {}): void {
  const cs = g.clusterSize;
  const es = g.l2EntrySize;
  const n = g.l2Entries;
  // the descriptor's words read in place: a tree has a million of them
  const dv = new DataView(table.buffer, table.byteOffset, table.byteLength);
  for (let j = 0; j < n; j++) {
    const hi = dv.getUint32(j * es);
    const lo = dv.getUint32(j * es + 4);
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

/** Indices of the entries of `table` that carry COPIED and map a standard cluster (not compressed, offset not 0). */
export function copiedEntries(table: Uint8Array, g: Geometry): Uint32Array {
  const es = g.l2EntrySize;
  const n = g.l2Entries;
  const dv = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const out = new Uint32Array(n);
  let m = 0;
  for (let j = 0; j < n; j++) {
    const hi = dv.getUint32(j * es);
    if ((hi & L2E_COPIED_HI) === 0 || (hi & L2E_COMPRESSED_HI) !== 0) continue;
    if ((hi & L2E_OFFSET_MASK_HI) === 0 && (dv.getUint32(j * es + 4) & L2E_OFFSET_MASK_LO) === 0) continue;
    out[m++] = j;
  }
  return out.subarray(0, m);
}

/** The clusters of a list that fall in one refcount block: indices within it, ascending, and how often each is listed. */
export interface BlockGroup {
  readonly rt: number;
  readonly index: Uint32Array;
  readonly times: Float64Array;
}

/**
 * A list of clusters grouped by refcount block (`entries` per block), the
 * blocks ascending and each cluster once with its count. A tree's million
 * references go in linear time: counted into buckets per block, then each
 * bucket counted densely when it fills a good part of its block, sorted
 * when it is small. Cluster numbers far apart or past 2^31 (a damaged
 * table, an image of many terabytes) take a sort instead.
 */
export function groupByBlock(clusters: ArrayLike<number>, entries: number): BlockGroup[] {
  const n = clusters.length;
  const out: BlockGroup[] = [];
  if (n === 0) return out;
  let max = 0;
  for (let k = 0; k < n; k++) if (clusters[k]! > max) max = clusters[k]!;
  const maxRt = Math.floor(max / entries);
  let within: Float64Array; // indices within their block, bucketed by block
  let starts: Float64Array; // bucket b is within[starts[b] .. starts[b + 1])
  let blocks: number[]; // the bucket's block number
  if (maxRt <= 4 * n + 1024 && max < 2 ** 31) {
    // cluster numbers below 2^31 (8 TiB of 4 KiB clusters) in integer arithmetic; `entries` is a power of two
    const shift = Math.log2(entries);
    const mask = entries - 1;
    const count = new Int32Array(maxRt + 2);
    for (let k = 0; k < n; k++) count[((clusters[k]! | 0) >> shift) + 1]!++;
    for (let b = 1; b < count.length; b++) count[b]! += count[b - 1]!;
    const pos = count.slice();
    within = new Float64Array(n);
    for (let k = 0; k < n; k++) {
      const c = clusters[k]! | 0;
      within[pos[c >> shift]!++] = c & mask;
    }
    starts = Float64Array.from(count);
    blocks = [];
    for (let b = 0; b <= maxRt; b++) blocks.push(b);
  } else {
    const sorted = Float64Array.from(clusters).sort();
    within = new Float64Array(n);
    const s: number[] = [];
    blocks = [];
    for (let k = 0; k < n; k++) {
      const rt = Math.floor(sorted[k]! / entries);
      if (k === 0 || rt !== blocks[blocks.length - 1]) {
        blocks.push(rt);
        s.push(k);
      }
      within[k] = sorted[k]! % entries;
    }
    s.push(n);
    starts = Float64Array.from(s);
  }
  let dense: Float64Array | undefined;
  for (let b = 0; b < blocks.length; b++) {
    const a = starts[b]!;
    const z = starts[b + 1]!;
    if (a === z) continue;
    const sub = within.subarray(a, z);
    const index = new Uint32Array(z - a);
    const times = new Float64Array(z - a);
    let m = 0;
    if ((z - a) * 8 >= entries) {
      dense ??= new Float64Array(entries);
      dense.fill(0);
      for (let k = 0; k < sub.length; k++) dense[sub[k]!]!++;
      for (let i = 0; i < entries; i++) {
        if (dense[i] === 0) continue;
        index[m] = i;
        times[m++] = dense[i]!;
      }
    } else {
      sub.sort();
      for (let k = 0; k < sub.length; ) {
        let r = 1;
        while (k + r < sub.length && sub[k + r] === sub[k]) r++;
        index[m] = sub[k]!;
        times[m++] = r;
        k += r;
      }
    }
    out.push({ rt: blocks[b]!, index: index.subarray(0, m), times: times.subarray(0, m) });
  }
  return out;
}
