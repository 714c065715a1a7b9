/**
 * qemu-img measure: the file size a qcow2 (or raw) image would need for a
 * virtual size or for the content of an input image, computed as QEMU's
 * qcow2_measure and qcow2_calc_prealloc_size compute it: the fully
 * allocated size is every cluster plus its metadata (header, L2 tables,
 * L1 table, refcount structures at their fixed point); the required size
 * drops the data clusters the input does not allocate (counted in the
 * output's clusters), and persistent bitmaps are measured apart.
 */

import { UsageError } from '../errors.ts';
import { MAX_L1_BYTES } from '../format/limits.ts';

export interface MeasureTarget {
  readonly format: 'qcow2' | 'raw';
  readonly clusterSize: number;
  readonly refcountBits: number;
  readonly extendedL2: boolean;
  readonly version: 2 | 3;
  /** -o preallocation: falloc and full count every data cluster */
  readonly preallocation: 'off' | 'metadata' | 'falloc' | 'full';
  /** -o backing_file: the new image's backing file may share nothing with the input, so every cluster counts */
  readonly hasBackingFile: boolean;
}

export interface MeasureInput {
  /** the input's virtual size */
  readonly size: number;
  /** the guest ranges that hold data (not zero), in order */
  readonly data: Iterable<{ readonly start: number; readonly length: number }> | AsyncIterable<{ readonly start: number; readonly length: number }>;
  /** the input supports persistent bitmaps (qcow2 v3): their size is reported */
  readonly bitmaps?: ReadonlyArray<{ readonly name: string; readonly granularity: number }> | undefined;
}

export interface Measurement {
  readonly required: number;
  readonly fullyAllocated: number;
  /** bytes the input's persistent bitmaps would take, when both sides support them */
  readonly bitmaps?: number | undefined;
}

const roundUp = (n: number, m: number) => Math.ceil(n / m) * m;
const divUp = (n: number, m: number) => Math.ceil(n / m);

/** QEMU's qcow2_refcount_metadata_size: refcount blocks and table for `clusters`, at their fixed point. */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number): number {
  const perTableCluster = clusterSize / 8;
  const perBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = divUp(clusters + table + blocks, perBlock);
    table = divUp(blocks, perTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** QEMU's qcow2_calc_prealloc_size: the file size of a fully allocated image of `size` bytes. */
export function fullyAllocatedSize(size: number, clusterSize: number, refcountOrder: number, extendedL2: boolean): number {
  const aligned = roundUp(size, clusterSize);
  const l2e = extendedL2 ? 16 : 8;
  let meta = clusterSize; // the header
  const nl2e = roundUp(aligned / clusterSize, clusterSize / l2e);
  meta += nl2e * l2e;
  const nl1e = roundUp((nl2e * l2e) / clusterSize, clusterSize / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder);
  return meta + aligned;
}

/** What a persistent bitmap takes in a qcow2 image of `clusterSize`: its data, its table, its directory entry. */
export function bitmapsSize(bitmaps: ReadonlyArray<{ readonly name: string; readonly granularity: number }>, diskSize: number, clusterSize: number): number {
  let total = 0;
  let dir = 0;
  for (const b of bitmaps) {
    const bytes = divUp(divUp(diskSize, b.granularity), 8);
    const clusters = divUp(bytes, clusterSize);
    total += clusters * clusterSize + roundUp(clusters * 8, clusterSize);
    dir += roundUp(24 + Buffer.byteLength(b.name), 8);
  }
  return total + roundUp(dir, clusterSize);
}

/**
 * `qemu-img measure`: the file size an image of `target`'s format and
 * options needs for a virtual size, or for an input's data ranges.
 *
 * @example
 * import { measure } from 'qledger';
 *
 * const target = { format: 'qcow2', clusterSize: 65536, refcountBits: 16, extendedL2: false, version: 3, preallocation: 'off', hasBackingFile: false } as const;
 * const m = await measure(target, { size: 1 << 30 });
 * console.log(m.required, m.fullyAllocated); // 393216 1074135040
 */
export async function measure(target: MeasureTarget, input: MeasureInput | { readonly size: number; readonly data?: undefined; readonly bitmaps?: undefined }): Promise<Measurement> {
  if (target.format === 'raw') {
    // the raw driver: the input's size, or the size asked for, whatever it holds
    const n = roundUp(input.size, 512);
    return { required: n, fullyAllocated: n };
  }
  const cs = target.clusterSize;
  const virtualSize = roundUp(input.size, cs);
  const l2e = target.extendedL2 ? 16 : 8;
  if (divUp(virtualSize / cs, cs / l2e) * 8 > MAX_L1_BYTES) throw new UsageError('The image size is too large (try using a larger cluster size)');
  let required = 0;
  if (input.data !== undefined) {
    if (target.hasBackingFile) required = virtualSize;
    else {
      // clusters of the output any data range touches, each once
      let covered = 0; // everything below this offset is counted
      for await (const r of input.data) {
        const from = Math.max(covered, Math.floor(r.start / cs) * cs);
        const to = roundUp(r.start + r.length, cs);
        if (to > from) required += to - from;
        covered = Math.max(covered, to);
      }
    }
  }
  if (target.preallocation === 'full' || target.preallocation === 'falloc') required = virtualSize;
  const fullyAllocated = fullyAllocatedSize(virtualSize, cs, Math.log2(target.refcountBits), target.extendedL2);
  const out: Measurement = { required: fullyAllocated - virtualSize + required, fullyAllocated };
  if (target.version >= 3 && input.bitmaps !== undefined) return { ...out, bitmaps: bitmapsSize(input.bitmaps, input.size, cs) };
  return out;
}
