/**
 * make_empty in O(1) between sessions (qemu-img commit's last step, seed
 * 003): for an image whose refcounts count nothing but its active tree and
 * its own metadata (no internal snapshots, no bitmaps, no external data
 * file, no dedup index, no encryption, clean), the emptied image is a fresh refcount
 * structure and an empty L1 table, whatever the old tree held. QEMU 7.2
 * writes that structure over clusters 1.. in place and relies on the dirty
 * bit; here every step leaves a valid image:
 *   1. the structure S1 (empty L1 table, refcount blocks, refcount table,
 *      counting the header and itself) goes past the end of the file, where
 *      nothing is; flushed;
 *   2. one write inside the header's first sector switches l1_table_offset,
 *      refcount_table_offset and refcount_table_clusters to S1; flushed.
 *      From here the image is empty and every old cluster is free;
 *   3. a journal area still named by the header leaves it (bit, then the
 *      extension, each flushed: journal-session.ts retire explains why in
 *      that order), before anything is written where its area may lie;
 *   4. the same structure S2 at cluster 1, free now; flushed; the header
 *      switched to it; flushed;
 *   5. the file is cut after S2.
 * A crash reads the image as before or as empty, and leaves no leak: the
 * clusters past the end that S1 took are counted by nothing before step 2
 * and after step 4. Returns false, having written nothing, when the image
 * is not of that kind or its journal holds a transaction not in place (the
 * read-write session's make_empty handles those).
 */

import { QledgerError } from '../errors.ts';
import { putU32, putU64 } from '../format/bytes.ts';
import { AUTOCLEAR_BITMAPS, AUTOCLEAR_DEDUP_INDEX, AUTOCLEAR_JOURNAL, EXT_BITMAPS, EXT_CRYPTO_HEADER, EXT_DEDUP_INDEX, EXT_JOURNAL, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY } from '../format/features.ts';
import { setRefcount, setRefcountTableEntry } from '../format/refcount.ts';
import type { BlockDevice } from '../io/device.ts';
import { removeHeaderExtension } from './journal/live.ts';
import { locateJournal } from './journal/locate.ts';
import { loadQcow2 } from './qcow2-layer.ts';

/** Where a fresh structure at cluster `at` puts its parts, in clusters. */
interface Layout {
  readonly at: number;
  readonly l1: number;
  /** refcount-table indices that get a block, in order; the blocks follow the L1 table */
  readonly blocks: readonly number[];
  readonly table: number;
  readonly end: number;
}

function layout(at: number, l1Clusters: number, entriesPerBlock: number, clusterSize: number): Layout {
  let nBlocks = 1;
  let table = 1;
  for (;;) {
    const end = at + l1Clusters + nBlocks + table;
    const rts = new Set([0]);
    for (let rt = Math.floor(at / entriesPerBlock); rt <= Math.floor((end - 1) / entriesPerBlock); rt++) rts.add(rt);
    const last = Math.max(...rts);
    const wantTable = Math.max(1, Math.ceil(((last + 1) * 8) / clusterSize));
    if (rts.size === nBlocks && wantTable === table) return { at, l1: l1Clusters, blocks: [...rts].sort((a, b) => a - b), table, end };
    nBlocks = rts.size;
    table = wantTable;
  }
}

/** The structure's bytes: zeros for the L1 table, then the blocks, then the table. */
function encode(l: Layout, entriesPerBlock: number, clusterSize: number, refcountOrder: number): Uint8Array {
  const out = new Uint8Array((l.end - l.at) * clusterSize);
  const blockAt = (k: number) => (l.l1 + k) * clusterSize;
  const tableAt = (l.l1 + l.blocks.length) * clusterSize;
  const table = out.subarray(tableAt, tableAt + l.table * clusterSize);
  for (const [k, rt] of l.blocks.entries()) setRefcountTableEntry(table, rt, (l.at + l.l1 + k) * clusterSize);
  const count = (c: number) => {
    const k = l.blocks.indexOf(Math.floor(c / entriesPerBlock));
    setRefcount(out.subarray(blockAt(k), blockAt(k) + clusterSize), c % entriesPerBlock, refcountOrder, 1);
  };
  count(0);
  for (let c = l.at; c < l.end; c++) count(c);
  return out;
}

/** Switch the header to structure `l` (bytes 40-59 of the first sector: one atomic write). */
async function switchTo(dev: BlockDevice, l: Layout, clusterSize: number): Promise<void> {
  const b = new Uint8Array(20);
  putU64(b, 0, l.at * clusterSize);
  putU64(b, 8, (l.at + l.l1 + l.blocks.length) * clusterSize);
  putU32(b, 16, l.table);
  await dev.write(40, b);
}

export async function makeEmptyFast(dev: BlockDevice, o: { skipFlush?: boolean | undefined } = {}): Promise<boolean> {
  const { parsed, fileSize } = await loadQcow2(dev);
  const h = parsed.header;
  const has = (type: number) => parsed.extensions.some((e) => e.type === type);
  if ((h.incompatibleFeatures & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE)) !== 0n) return false;
  // an encrypted image's key material lies in clusters the header names: they must keep their count
  if (h.cryptMethod !== 0 || has(EXT_CRYPTO_HEADER)) return false;
  if (h.nbSnapshots !== 0 || (h.autoclearFeatures & (AUTOCLEAR_BITMAPS | AUTOCLEAR_DEDUP_INDEX)) !== 0n || has(EXT_BITMAPS) || has(EXT_DEDUP_INDEX)) return false;
  const live = (h.autoclearFeatures & AUTOCLEAR_JOURNAL) !== 0n;
  if (live) {
    const j = await locateJournal(dev, parsed, fileSize);
    if (j.kind === 'valid' && j.scan.transactions.some((t) => t.committed && t.tx > j.appliedTx)) return false;
  }
  const cs = 2 ** h.clusterBits;
  const E = (cs * 8) / 2 ** h.refcountOrder;
  const l1Clusters = Math.ceil((h.l1Size * 8) / cs);
  const flush = () => (o.skipFlush ? Promise.resolve() : dev.flush());
  // 1, 2: S1 past the end of the file
  const s1 = layout(Math.ceil(fileSize / cs), l1Clusters, E, cs);
  await dev.write(s1.at * cs, encode(s1, E, cs, h.refcountOrder));
  await flush();
  await switchTo(dev, s1, cs);
  await dev.flush();
  // 3: the journal out of the header before anything goes below the end (its area may lie where S2 goes)
  if (live || has(EXT_JOURNAL)) {
    if (live) {
      // autoclear_features alone (bytes 88-95): the rest of the header is no longer the one read at the start
      const b = new Uint8Array(8);
      putU64(b, 0, h.autoclearFeatures & ~AUTOCLEAR_JOURNAL);
      await dev.write(88, b);
      await dev.flush();
    }
    await removeHeaderExtension(dev, cs, EXT_JOURNAL);
  }
  // 4: S2 at cluster 1, where it fits below S1 (a file that small has nothing to give back)
  let final = s1;
  const s2 = layout(1, l1Clusters, E, cs);
  if (s2.end <= s1.at) {
    await dev.write(cs, encode(s2, E, cs, h.refcountOrder));
    await flush();
    await switchTo(dev, s2, cs);
    await dev.flush();
    final = s2;
  }
  // 5: the cut
  if ((await dev.size()) > final.end * cs) await dev.truncate(final.end * cs);
  else if ((await dev.size()) < final.end * cs) throw new QledgerError('E_IO', `${dev.name}: the new refcount structure was not written`);
  await dev.flush();
  return true;
}
