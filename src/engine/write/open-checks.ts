/**
 * The write engine's checks and repairs of stored refcount structures as a
 * whole: what a read-write open checks before it trusts an image's tables
 * (engine/writer.ts calls it before anything is written), and the rebuild
 * of every refcount from counted references (a dirty image's recovery);
 * the header fields a session starts from.
 */

import { CorruptionError, QledgerError, hex } from '../../errors.ts';
import { nonZeroEntries, u32 } from '../../format/bytes.ts';
import { AUTOCLEAR_JOURNAL } from '../../format/features.ts';
import { bitmapsFields, type Geometry, type ParsedHeader } from '../../format/header.ts';
import type { HeaderState } from '../../state/state.ts';
import { entryOffset } from '../../format/l1.ts';
import { maxRefcount, reftableEntryOffset } from '../../format/refcount.ts';
import { cluster } from '../../format/offsets.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';

/**
 * What the write path trusts, checked before it writes anything: every
 * refcount block and every L2 table the tables name is cluster aligned and
 * inside the file. A block past the end reads as zeros, so its clusters
 * (the header among them) would look free and be handed out, and writing
 * the block back would grow the file to wherever it points; QEMU finds
 * this only at the write that trips over it, and marks the image corrupt.
 */
export function validateTables(name: string, g: Geometry, l1: Uint8Array, reftable: Uint8Array, l1At: number, reftableAt: number, fileSize: number): void {
  const cs = g.clusterSize;
  const refuse = (what: string, at: number, off: number, problem: string) => {
    throw new CorruptionError(`${name}: ${what} at ${hex(at)} points at ${hex(off)}, ${problem}; cannot be opened read/write. Run 'qledger check -r all' first`, { path: name, offset: at, points: off });
  };
  for (const i of nonZeroEntries(reftable)) {
    const off = reftableEntryOffset(u32(reftable, i * 8), u32(reftable, i * 8 + 4));
    if (off === 0) continue;
    if (off % cs !== 0) refuse(`refcount table entry ${i}`, reftableAt + i * 8, off, 'which is not cluster aligned');
    if (off + cs > fileSize) refuse(`refcount table entry ${i}`, reftableAt + i * 8, off, `past the end of the file (${hex(fileSize)})`);
  }
  for (const i of nonZeroEntries(l1)) {
    const off = entryOffset(u32(l1, i * 8), u32(l1, i * 8 + 4));
    if (off === 0) continue;
    if (off % cs !== 0) refuse(`L1 entry ${i}`, l1At + i * 8, off, 'which is not cluster aligned');
    if (off + cs > fileSize) refuse(`L1 entry ${i}`, l1At + i * 8, off, `past the end of the file (${hex(fileSize)})`);
  }
}

/**
 * Inside an open transaction: the refcount records that make every stored
 * refcount equal `expected(cluster)` (its number of references); returns
 * how many changed.
 */
export async function rebuildRefcounts(ctx: WriteContext, alloc: Allocator, expected: (cluster: number) => number, endCluster: number): Promise<number> {
  let fixed = 0;
  const g = ctx.geometry;
  const t = ctx.t();
  const E = g.refcountBlockEntries;
  const top = Math.max(endCluster, ctx.extent.endCluster);
  for (let c = 0; c < top; c++) {
    const rt = Math.floor(c / E);
    const want = expected(c);
    if (t.reftableEntry(rt) === 0) {
      if (want !== 0) throw new CorruptionError(`${ctx.filename}: cluster ${hex(c * g.clusterSize)} is referenced but no refcount block covers it; run 'qledger check -r all'`);
      c = (rt + 1) * E - 1;
      continue;
    }
    const have = await alloc.refcount(cluster(c));
    if (want > maxRefcount(g.refcountOrder)) {
      throw new QledgerError('E_OVERFLOW', `${ctx.filename}: cluster ${hex(c * g.clusterSize)} has ${want} references, more than refcount_bits=${g.refcountBits} can count`, { cluster: c });
    }
    if (have !== want) {
      ctx.emit({ kind: 'refcount', cluster: c, old: have, new: want });
      fixed++;
    }
  }
  return fixed;
}

/** The header fields a session's metadata state starts from. */
export function headerStateOf(parsed: ParsedHeader, journalled: boolean): HeaderState {
  const h = parsed.header;
  return {
    size: h.size,
    l1TableOffset: h.l1TableOffset,
    l1Size: h.l1Size,
    refcountTableOffset: h.refcountTableOffset,
    refcountTableClusters: h.refcountTableClusters,
    nbSnapshots: h.nbSnapshots,
    snapshotsOffset: h.snapshotsOffset,
    incompatibleFeatures: h.incompatibleFeatures,
    compatibleFeatures: h.compatibleFeatures,
    // a journalled session keeps the journal bit outside the state (see HeaderBits)
    autoclearFeatures: journalled ? h.autoclearFeatures & ~AUTOCLEAR_JOURNAL : h.autoclearFeatures,
    ...bitmapsFields(parsed),
  };
}
