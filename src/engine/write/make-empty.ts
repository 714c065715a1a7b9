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

import { cluster, clusterOf, type HostOffset } from '../../format/offsets.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { SharedClusters } from './shared.ts';
import type { TableCache } from './tables.ts';
import { treeRefs } from './tree-refs.ts';

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
    const refs: number[] = [];
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
    await this.alloc.changeRefcounts(refs, -1);
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
    const at = await this.alloc.allocate(n);
    if (at >= old) {
      for (let k = 0; k < n; k++) await this.alloc.changeRefcount(cluster(at + k), -1);
      return false;
    }
    ctx.emit({ kind: 'l1-swap', oldOffset: h.l1TableOffset, oldSize: h.l1Size, newOffset: at * cs, newSize: h.l1Size });
    for (let k = 0; k < n; k++) await this.alloc.changeRefcount(cluster(old + k), -1);
    return true;
  }
}
