/**
 * Count every reference to every host cluster of a qcow2 image, as QEMU's
 * refcount check does: the header cluster, the refcount table and blocks,
 * the active and every snapshot L1 table, each L2 table once per L1 entry
 * that points at it, and each data or compressed cluster once per L2 entry
 * visit. Used to rebuild refcounts after a crash under lazy refcounts; the
 * checker builds on the same walk.
 */

import { CorruptionError, hex } from '../errors.ts';
import type { BlockDevice } from '../io/device.ts';
import { readAt } from '../io/device.ts';
import { geometryOf, type ParsedHeader } from '../format/header.ts';
import { l1Offset } from '../format/l1.ts';
import { compressedDescriptor, isCompressed, readL2Entry, standardOffset, type RawL2Entry } from '../format/l2.ts';
import { refcountTableEntry } from '../format/refcount.ts';
import { INCOMPAT_DATA_FILE } from '../format/features.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';

export interface References {
  /** cluster index -> number of references */
  readonly counts: Map<number, number>;
  /** one past the highest referenced cluster */
  readonly endCluster: number;
}

export async function collectReferences(dev: BlockDevice, parsed: ParsedHeader, snapshots: readonly SnapshotEntry[], snapshotTableBytes: number): Promise<References> {
  const h = parsed.header;
  const g = geometryOf(h);
  const cs = g.clusterSize;
  const fileSize = await dev.size();
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  const counts = new Map<number, number>();
  let end = 0;
  const inc = (offset: number, bytes: number) => {
    if (bytes <= 0) return;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + bytes - 1) / cs);
    for (let c = first; c <= last; c++) counts.set(c, (counts.get(c) ?? 0) + 1);
    end = Math.max(end, last + 1);
  };
  inc(0, cs);
  inc(h.refcountTableOffset, h.refcountTableClusters * cs);
  const reftable = await readAt(dev, h.refcountTableOffset, h.refcountTableClusters * cs);
  for (let i = 0; i < reftable.length / 8; i++) {
    const { offset } = refcountTableEntry(reftable, i);
    if (offset) inc(offset, cs);
  }
  const tables = new Map<number, Uint8Array>();
  const e: RawL2Entry = { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 };
  const walkL1 = async (l1Off: number, l1Size: number) => {
    inc(l1Off, l1Size * 8);
    const l1 = await readAt(dev, l1Off, l1Size * 8);
    for (let i = 0; i < l1Size; i++) {
      const l2 = l1Offset(l1, i);
      if (!l2) continue;
      if (l2 % cs !== 0 || l2 + cs > fileSize) throw new CorruptionError(`L2 table offset ${hex(l2)} (L1 index ${hex(i)}) is invalid`, { l2, i });
      inc(l2, cs);
      let t = tables.get(l2);
      if (!t) tables.set(l2, (t = await readAt(dev, l2, cs)));
      for (let j = 0; j < g.l2Entries; j++) {
        readL2Entry(t, j, g, e);
        if (isCompressed(e)) {
          const d = compressedDescriptor(e, g.clusterBits);
          inc(d.offset, d.length);
        } else {
          const off = standardOffset(e);
          if (off && !hasDataFile) inc(off, cs);
        }
      }
    }
  };
  await walkL1(h.l1TableOffset, h.l1Size);
  if (h.nbSnapshots) inc(h.snapshotsOffset, snapshotTableBytes);
  for (const sn of snapshots) await walkL1(sn.l1TableOffset, sn.l1Size);
  return { counts, endCluster: end };
}
