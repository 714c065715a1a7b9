/**
 * Building the overlap index at a read-write open, from what the image
 * holds: the header cluster, the active L1 table and the L2 tables it
 * points at, the refcount table and its blocks, the snapshot table, every
 * snapshot's L1 table and (mode `all`) the L2 tables those point at, the
 * bitmap directory and each bitmap's table. Everything after the open
 * follows the record stream (overlap.ts). Also finds metadata that already
 * overlaps (two structures on one cluster), which the writer reports and
 * then refuses to write to.
 */

import type { ParsedHeader } from '../../format/header.ts';
import { decodeBitmapDirectory } from '../../format/bitmaps.ts';
import { l1Offset } from '../../format/l1.ts';
import { u32 } from '../../format/bytes.ts';
import { reftableEntryOffset } from '../../format/refcount.ts';
import type { SnapshotEntry } from '../../format/snapshot.ts';
import { readAt, type BlockDevice } from '../../io/device.ts';
import type { KindRun } from './cluster-kinds.ts';
import {
  OL_ACTIVE_L1,
  OL_ACTIVE_L2,
  OL_BITMAP_DIRECTORY,
  OL_BITMAP_TABLE,
  OL_INACTIVE_L1,
  OL_INACTIVE_L2,
  OL_MAIN_HEADER,
  OL_REFCOUNT_BLOCK,
  OL_REFCOUNT_TABLE,
  OL_SNAPSHOT_TABLE,
  type OverlapIndex,
} from './overlap.ts';

export interface IndexSource {
  readonly dev: BlockDevice;
  readonly parsed: ParsedHeader;
  /** the active L1 table and the refcount table, as read at open */
  readonly l1: Uint8Array;
  readonly reftable: Uint8Array;
  readonly snapshots: readonly SnapshotEntry[];
  /** the snapshot table's size in bytes (entries are variable-sized) */
  readonly snapshotTableBytes: number;
}

export interface IndexBuildReport {
  /** milliseconds spent reading snapshot L1 tables for the inactive L2 tables (mode all) */
  readonly inactiveL2Ms: number;
  readonly snapshotL1Bytes: number;
  /** milliseconds spent building the index from the runs */
  readonly loadMs: number;
}

/** Fill `index` from the image's tables. */
export async function buildOverlapIndex(index: OverlapIndex, s: IndexSource): Promise<IndexBuildReport> {
  const h = s.parsed.header;
  const cs = 2 ** h.clusterBits;
  const runs: KindRun[] = [];
  const bytes = (offset: number, length: number, bits: number) => {
    if (length <= 0) return;
    const first = Math.floor(offset / cs);
    runs.push({ first, count: Math.ceil((offset + length) / cs) - first, bits });
  };
  // QEMU: any write below cluster_size touches the header
  bytes(0, cs, OL_MAIN_HEADER);
  bytes(h.l1TableOffset, h.l1Size * 8, OL_ACTIVE_L1);
  bytes(h.refcountTableOffset, h.refcountTableClusters * cs, OL_REFCOUNT_TABLE);
  l2Tables(s.l1, h.l1Size, cs, OL_ACTIVE_L2, runs);
  for (let i = 0; i < s.reftable.length / 8; i++) {
    const off = reftableEntryOffset(u32(s.reftable, i * 8), u32(s.reftable, i * 8 + 4));
    if (off) runs.push({ first: Math.floor(off / cs), count: 1, bits: OL_REFCOUNT_BLOCK });
  }
  if (h.nbSnapshots) bytes(h.snapshotsOffset, Math.max(1, s.snapshotTableBytes), OL_SNAPSHOT_TABLE);
  for (const sn of s.snapshots) bytes(sn.l1TableOffset, sn.l1Size * 8, OL_INACTIVE_L1);
  const b = s.parsed.bitmaps;
  if (b) {
    bytes(b.directoryOffset, b.directorySize, OL_BITMAP_DIRECTORY);
    try {
      const dir = decodeBitmapDirectory(await readAt(s.dev, b.directoryOffset, b.directorySize), b.nbBitmaps, b.directoryOffset);
      for (const e of dir) bytes(e.tableOffset, e.tableSize * 8, OL_BITMAP_TABLE);
    } catch {
      // a damaged directory: reading it is check's business; the directory itself stays protected
    }
  }
  // The inactive L2 tables cost a read of every snapshot's L1 table; only `all` checks them (as QEMU's mode does).
  const t0 = performance.now();
  let snapshotL1Bytes = 0;
  if (index.mode === 'all') {
    // snapshots mostly share their L2 tables: each table once, however many L1 tables name it
    const seen = new Set<number>();
    // read in batches of up to 16 MiB, each batch's reads in flight together (a read each is a thread-pool round trip)
    const todo = s.snapshots.filter((sn) => sn.l1Size > 0);
    for (let i = 0; i < todo.length; ) {
      let j = i;
      for (let bytes = 0; j < todo.length && (j === i || bytes + todo[j]!.l1Size * 8 <= 16 << 20); j++) bytes += todo[j]!.l1Size * 8;
      const batch = todo.slice(i, j);
      const tables = await Promise.all(batch.map((sn) => readAt(s.dev, sn.l1TableOffset, sn.l1Size * 8)));
      for (let k = 0; k < batch.length; k++) {
        snapshotL1Bytes += tables[k]!.length;
        l2Tables(tables[k]!, batch[k]!.l1Size, cs, OL_INACTIVE_L2, runs, seen);
      }
      i = j;
    }
  }
  const inactiveL2Ms = performance.now() - t0;
  const t1 = performance.now();
  index.load(runs);
  return { inactiveL2Ms, snapshotL1Bytes, loadMs: performance.now() - t1 };
}

/** One run per L2 table an L1 table points at, adjacent tables merged; tables in `seen` skipped (and added). */
function l2Tables(l1: Uint8Array, entries: number, cs: number, bits: number, out: KindRun[], seen?: Set<number>): void {
  let runFirst = -1;
  let runCount = 0;
  for (let i = 0; i < entries; i++) {
    const off = l1Offset(l1, i);
    if (off === 0) continue;
    if (seen) {
      if (seen.has(off)) continue;
      seen.add(off);
    }
    const c = Math.floor(off / cs);
    if (runFirst >= 0 && c === runFirst + runCount) {
      runCount++;
      continue;
    }
    if (runFirst >= 0) out.push({ first: runFirst, count: runCount, bits });
    runFirst = c;
    runCount = 1;
  }
  if (runFirst >= 0) out.push({ first: runFirst, count: runCount, bits });
}
