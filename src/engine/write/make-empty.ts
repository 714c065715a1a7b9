/**
 * make_empty in O(metadata), valid at every instant (seed 003, qemu-img
 * commit's last step): a new L1 table with no entry is written where
 * nothing points, the header switches to it in one sector write, and only
 * then do the old L1 table, the L2 tables and the data lose the active
 * tree's reference, freed where no snapshot holds them. A crash reads the
 * image as before or as empty, never a mix; leaks at worst without the
 * journal, none after its recovery. Works for v2 and v3, any cluster size
 * and refcount width, with internal snapshots (their trees keep their
 * clusters) and with an external data file (whose clusters carry no
 * refcount). QEMU 7.2 has a fast path for v3 images without snapshots,
 * bitmaps or a data file only, made safe by the dirty bit; otherwise it
 * discards cluster by cluster.
 */

import { cluster, clusterOf, host, type HostOffset } from '../../format/offsets.ts';
import { getRefcount } from '../../format/refcount.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { SharedClusters } from './shared.ts';
import type { TableCache } from './tables.ts';
import { ClusterList, treeRefs } from './tree-refs.ts';

export class MakeEmpty {
  constructor(
    private readonly ctx: WriteContext,
    private readonly tables: TableCache,
    private readonly alloc: Allocator,
    private readonly shared: SharedClusters,
  ) {}

  /**
   * Drop every mapping of the active tree. False, having done nothing, when
   * clusters shared inside the image are being tracked (the v2 zero cluster
   * of this session): the caller takes the entry-by-entry path then.
   */
  async run(): Promise<boolean> {
    const ctx = this.ctx;
    const t = ctx.t();
    const g = ctx.geometry;
    const cs = g.clusterSize;
    if (this.shared.active) return false;
    const h = t.header;
    const active: [number, HostOffset][] = [];
    for (let i = 0; i < h.l1Size; i++) if (t.l1TableOffset(i) !== 0) active.push([i, t.l1TableOffset(i)]);
    if (active.length === 0) return true;
    await this.tables.preloadL2(active);
    // everything the active tree references, read before the first record
    const refs = new ClusterList();
    for (const [i, T] of active) {
      treeRefs(t.l2(i)!, g, refs, { dataFile: ctx.hasDataFile });
      refs.push(clusterOf(T, cs));
    }
    // the new, empty L1 table (written whole in the write-back's first phase, the header switched after it)
    const n = Math.max(1, Math.ceil((h.l1Size * 8) / cs));
    const at = await this.alloc.allocate(n);
    const oldOffset = h.l1TableOffset;
    const oldClusters = Math.ceil((h.l1Size * 8) / cs);
    ctx.emit({ kind: 'l1-swap', oldOffset, oldSize: h.l1Size, newOffset: at * cs, newSize: h.l1Size });
    for (const [i] of active) {
      ctx.emit({ kind: 'l1', index: i, old: t.l1Entry(i), new: { hi: 0, lo: 0 } });
      t.unload(i);
    }
    if (h.l1Size > 0) for (let k = 0; k < oldClusters; k++) await this.alloc.changeRefcount(cluster(oldOffset / cs + k), -1);
    await this.alloc.changeRefcounts(refs.view(), -1);
    return true;
  }

  /**
   * After the emptying is durable: the L1 table moved down into the lowest
   * free clusters, when they lie below it. The emptying had to place the
   * new table past the clusters it freed (a cluster freed in a transaction
   * is not handed out before the transaction is durable); now they are
   * free. The same swap as the emptying's (the table written before the
   * header names it, the old one freed after), so the file can shrink to
   * what remains in use. False when no lower place exists.
   */
  async lowerL1(): Promise<boolean> {
    const ctx = this.ctx;
    const h = ctx.t().header;
    const cs = ctx.geometry.clusterSize;
    if (h.l1Size === 0) return false;
    const n = Math.ceil((h.l1Size * 8) / cs);
    const old = h.l1TableOffset / cs;
    const at = await this.alloc.freeRunBelow(n, old);
    if (at === undefined) return false;
    await this.alloc.allocateRun(at, n);
    ctx.emit({ kind: 'l1-swap', oldOffset: h.l1TableOffset, oldSize: h.l1Size, newOffset: at * cs, newSize: h.l1Size });
    for (let k = 0; k < n; k++) await this.alloc.changeRefcount(cluster(old + k), -1);
    return true;
  }

  /**
   * The same for the refcount table, which this session may have moved
   * past the data when it grew (for the new L1 table, say), once the idle
   * blocks are gone: moved down and cut to the entries still in use (at
   * least one cluster), written before the header names it, the old
   * clusters freed after, as any refcount-table move.
   */
  async lowerReftable(): Promise<boolean> {
    const ctx = this.ctx;
    const t = ctx.t();
    const h = t.header;
    const cs = ctx.geometry.clusterSize;
    const old = h.refcountTableOffset / cs;
    let last = (h.refcountTableClusters * cs) / 8 - 1;
    while (last > 0 && t.reftableEntry(last) === 0) last--;
    const n = Math.max(1, Math.ceil(((last + 1) * 8) / cs));
    // below the table, or (a smaller one) anywhere below its end
    const at = await this.alloc.freeRunBelow(n, n < h.refcountTableClusters ? old + h.refcountTableClusters : old);
    if (at === undefined) return false;
    await this.alloc.allocateRun(at, n);
    ctx.emit({ kind: 'reftable-swap', oldOffset: h.refcountTableOffset, oldClusters: h.refcountTableClusters, newOffset: at * cs, newClusters: n });
    for (let k = 0; k < h.refcountTableClusters; k++) await this.alloc.changeRefcount(cluster(old + k), -1);
    return true;
  }

  /**
   * After the emptying is durable: refcount blocks that count nothing but
   * (perhaps) themselves leave the refcount table, so the file can shrink
   * past them (with small clusters QEMU placed a block every few MiB among
   * the data; its fast path writes one new refcount structure instead). The
   * table entry goes to 0 in the write-back's table-entry phase; a block
   * counted by another block loses that count in the last phase, after the
   * entry is durable (free after unmap: a crash in between leaks the block
   * at worst). A block that counts itself needs nothing more: with its
   * entry gone, no block covers its range, which reads as refcount 0.
   * Returns the blocks dropped; a block that counted one of them becomes
   * idle only once that count is durable, in another pass (the caller's:
   * a block is never changed in the transaction that drops it).
   */
  async dropIdleRefblocks(): Promise<number> {
    const ctx = this.ctx;
    const t = ctx.t();
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const E = g.refcountBlockEntries;
    const entries = (t.header.refcountTableClusters * cs) / 8;
    let dropped = 0;
    for (let rt = 0; rt < entries; rt++) {
      const at = t.reftableEntry(rt);
      if (at === 0) continue;
      const block = await this.tables.refblock(rt, host(at));
      const own = at / cs;
      const self = own >= rt * E && own < (rt + 1) * E;
      let busy = false;
      for (let i = 0; i < E && !busy; i++) if (getRefcount(block, i, g.refcountOrder) !== 0 && !(self && rt * E + i === own)) busy = true;
      if (busy) continue;
      ctx.emit({ kind: 'reftable', index: rt, old: at, new: 0 });
      if (!self) await this.alloc.changeRefcount(cluster(own), -1);
      dropped++;
    }
    return dropped;
  }
}
