/**
 * qemu-img amend -o refcount_bits=N: a new refcount structure (blocks and
 * table at the new width) written past everything the image holds, where
 * the old structure counts nothing, then switched to by one sector write
 * of the header (refcount_order, refcount_table_offset and its size lie in
 * the first 112 bytes). Before the switch the old structure is the image's
 * and the new clusters are not counted by it; after it the new one is, and
 * it gives the old structure's clusters refcount 0. So a crash at any point
 * leaves a valid image without a leak. The caller made the refcounts exact
 * first (a dirty image's, or a journal's pending transaction).
 */

import { QledgerError, hex } from '../errors.ts';
import { putU32, putU64 } from '../format/bytes.ts';
import { getRefcount, maxRefcount, refcountStructureSize, refcountTableEntry, setRefcount, setRefcountTableEntry } from '../format/refcount.ts';
import { readAt, readClusters, type BlockDevice } from '../io/device.ts';
import { FileDevice } from '../io/file-device.ts';
import { loadQcow2 } from './qcow2-layer.ts';

/** The most clusters whose refcounts are held in memory at once (8 bytes each): 512 MiB of them. */
const MAX_CLUSTERS = 64 * 1024 * 1024;

/** Rewrite the image's refcounts at width 2^order bits. Returns false when it already has that width. */
export async function changeRefcountOrder(target: string | BlockDevice, order: number, o: { switchEarly?: boolean | undefined } = {}): Promise<boolean> {
  const dev = typeof target === 'string' ? await FileDevice.open(target, { readOnly: false }) : target;
  const path = dev.name;
  try {
    const { parsed, fileSize } = await loadQcow2(dev);
    const h = parsed.header;
    if (h.refcountOrder === order) return false;
    // a v2 header has no refcount_order field: 16 bits is all it can say
    if (h.version === 2) throw new QledgerError('E_USAGE', 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)', { path });
    const cs = 2 ** h.clusterBits;
    const oldE = (cs * 8) / 2 ** h.refcountOrder;
    const newE = (cs * 8) / 2 ** order;
    const max = maxRefcount(order);
    // the old refcounts, cluster by cluster, up to the end of the file
    const fileClusters = Math.ceil(fileSize / cs);
    if (fileClusters > MAX_CLUSTERS) throw new QledgerError('E_UNSUPPORTED', `${path}: changing the refcount width of an image of ${fileClusters} clusters is not supported yet`);
    const refs = new Float64Array(fileClusters);
    const table = await readAt(dev, h.refcountTableOffset, h.refcountTableClusters * cs);
    const blocks: number[] = [];
    const counted: number[] = [];
    for (let rt = 0; rt < table.length / 8; rt++) {
      const off = refcountTableEntry(table, rt).offset;
      if (off === 0) continue;
      blocks.push(off);
      if (rt * oldE < fileClusters) counted.push(off);
    }
    const read = await readClusters(dev, counted, cs);
    for (let rt = 0; rt < table.length / 8 && rt * oldE < fileClusters; rt++) {
      const off = refcountTableEntry(table, rt).offset;
      if (off === 0) continue;
      const b = read.get(off)!;
      for (let i = 0; i < oldE && rt * oldE + i < fileClusters; i++) refs[rt * oldE + i] = getRefcount(b, i, h.refcountOrder);
    }
    // the old structure goes when the new one takes over
    for (let k = 0; k < h.refcountTableClusters; k++) refs[h.refcountTableOffset / cs + k] = 0;
    for (const off of blocks) if (off / cs < fileClusters) refs[off / cs] = 0;
    for (let c = 0; c < fileClusters; c++) {
      // qemu-img's words (the cluster named by its host offset)
      if (refs[c]! > max) throw new QledgerError('E_USAGE', `Cannot decrease refcount entry width to ${2 ** order} bits: Cluster at offset ${hex(c * cs)} has a refcount of ${refs[c]}`, { path, cluster: c });
    }
    // the new structure, past everything: blocks for every region up to its own end, then its table
    const at = fileClusters;
    const size = refcountStructureSize({ clusterSize: cs, refcountBlockEntries: newE }, at, 0, Math.ceil(at / newE), 1);
    const end = at + size.blocks + size.tableClusters;
    const newTable = new Uint8Array(size.tableClusters * cs);
    // the blocks go out in runs of up to 16 MiB, one write each
    const run = Math.max(1, Math.floor((16 << 20) / cs));
    for (let k0 = 0; k0 < size.blocks; k0 += run) {
      const n = Math.min(run, size.blocks - k0);
      const buf = new Uint8Array(n * cs);
      for (let k = k0; k < k0 + n; k++) {
        const block = buf.subarray((k - k0) * cs, (k - k0 + 1) * cs);
        for (let i = 0; i < newE; i++) {
          const c = k * newE + i;
          const v = c < fileClusters ? refs[c]! : c < end ? 1 : 0;
          if (v) setRefcount(block, i, order, v);
        }
        setRefcountTableEntry(newTable, k, (at + k) * cs);
      }
      await dev.write((at + k0) * cs, buf);
    }
    // the switch: three fields of the first sector, once the new structure is durable
    // (test fault 'refcount-switch-early': in the same flush as the structure, no barrier between)
    const first = await readAt(dev, 0, 512);
    putU64(first, 48, (at + size.blocks) * cs);
    putU32(first, 56, size.tableClusters);
    putU32(first, 96, order);
    if (o.switchEarly) await dev.write(0, first);
    await dev.write((at + size.blocks) * cs, newTable);
    await dev.flush();
    if (!o.switchEarly) {
      await dev.write(0, first);
      await dev.flush();
    }
    // the old structure's space goes back to the file system
    await dev.discard(h.refcountTableOffset, h.refcountTableClusters * cs);
    for (const off of blocks) await dev.discard(off, cs);
    return true;
  } finally {
    if (typeof target === 'string') await dev.close();
  }
}
