/**
 * The table cache of a read-write session: L2 tables and refcount blocks
 * loaded on demand into the live and the durable state (loading is not a
 * change, so not a record), checked before use (alignment, bounds, overlap
 * with other metadata), and evicted after a write-back beyond a byte budget.
 */

import { hex } from '../../errors.ts';
import { readAt, readClusters } from '../../io/device.ts';
import { clusterOf, type HostOffset } from '../../format/offsets.ts';
import type { WriteContext } from './context.ts';
import { OL_ACTIVE_L2, OL_INACTIVE_L2, overlapName, type OverlapIndex } from './overlap.ts';

export class TableCache {
  /**
   * Tables added to the state (loaded, or created by a record) since the
   * last eviction pass. A pass walks every table in the state, so it runs
   * only once half the budget has been added: per write-back it would make
   * a session with many tables quadratic (20,000 writes that each create a
   * 4 KiB L2 table, in writethrough mode, spent minutes in this walk).
   */
  private added = 0;

  constructor(
    private readonly ctx: WriteContext,
    private readonly overlap: OverlapIndex,
    /** bytes of clean L2 tables and refcount blocks kept after a write-back */
    private readonly cacheBytes: number,
  ) {
    ctx.subscribe((r) => {
      if (r.kind === 'table-new') this.added++;
    });
  }

  private get budget(): number {
    return Math.max(4, Math.floor(this.cacheBytes / this.ctx.geometry.clusterSize));
  }

  /** For reads: the L2 table of `l1Index` (at `off`) in the live state, loaded on demand. */
  async l2(off: HostOffset, l1Index: number): Promise<Uint8Array> {
    const ctx = this.ctx;
    const live = ctx.live();
    const have = live ? live.l2(l1Index) : ctx.cur.l2.get(l1Index);
    if (have) return have;
    return this.loadL2(l1Index, off);
  }

  async loadL2(l1Index: number, off: HostOffset): Promise<Uint8Array> {
    await this.checkL2(l1Index, off);
    return this.installL2(l1Index, await readAt(this.ctx.files.image, off, this.ctx.geometry.clusterSize));
  }

  /** What a loaded L2 table must satisfy before its entries are trusted: aligned, inside the image, no other metadata there. */
  private async checkL2(l1Index: number, off: HostOffset): Promise<void> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    if (off % cs !== 0) await ctx.signalCorruption(`L2 table offset ${hex(off)} unaligned (L1 index: ${hex(l1Index)})`, { l1Index, l2Offset: off });
    if (off < cs || off + cs > ctx.extent.end()) {
      await ctx.signalCorruption(`L2 table offset ${hex(off)} (L1 index: ${hex(l1Index)}) lies outside the image`, { l1Index, l2Offset: off });
    }
    // an L2 table shared with a snapshot is both active and inactive; anything else there is damage
    const other = this.overlap.at(clusterOf(off, cs)) & ~(OL_ACTIVE_L2 | OL_INACTIVE_L2);
    if (other !== 0) {
      await ctx.signalCorruption(`L2 table at ${hex(off)} (L1 index: ${hex(l1Index)}) overlaps the ${overlapName(other)}`, { l1Index, l2Offset: off });
    }
  }

  /** A table read from disk, put into the live state (and the durable one, which lacks it too). */
  private installL2(l1Index: number, bytes: Uint8Array): Uint8Array {
    const ctx = this.ctx;
    this.added++;
    const live = ctx.live();
    if (live) live.load('l2', l1Index, bytes);
    else ctx.cur = { ...ctx.cur, l2: ctx.cur.l2.set(l1Index, bytes) };
    if (ctx.durable.l2.get(l1Index) === undefined) ctx.durable = { ...ctx.durable, l2: ctx.durable.l2.set(l1Index, bytes) };
    return bytes;
  }

  /**
   * Load the L2 tables of these L1 indices (at these offsets) that the live
   * state lacks, each checked first, then read together (adjacent tables in
   * one request, several requests in flight): a walk over a whole tree
   * (snapshots) waits for the device a few times, not once per table.
   */
  async preloadL2(tables: ReadonlyArray<readonly [l1Index: number, off: HostOffset]>): Promise<void> {
    const ctx = this.ctx;
    const live = ctx.live();
    const have = (i: number) => (live ? live.l2(i) : ctx.cur.l2.get(i)) !== undefined;
    const want = tables.filter(([i]) => !have(i));
    for (const [i, off] of want) await this.checkL2(i, off);
    const bytes = await readClusters(ctx.files.image, want.map(([, off]) => off), ctx.geometry.clusterSize);
    // a table two slots name (damage the checks let through, or a copy) is the same bytes: each slot its own copy
    const seen = new Set<number>();
    for (const [i, off] of want) {
      const b = bytes.get(off)!;
      this.installL2(i, seen.has(off) ? b.slice() : b);
      seen.add(off);
    }
  }

  /** The refcount block of refcount-table index `rt` (at `off`), in the open transaction. */
  async refblock(rt: number, off: HostOffset): Promise<Uint8Array> {
    const ctx = this.ctx;
    const t = ctx.t();
    const have = t.refblock(rt);
    if (have) return have;
    const cs = ctx.geometry.clusterSize;
    if (off % cs !== 0 || off < cs) await ctx.signalCorruption(`refcount block offset ${hex(off)} invalid (refcount table index: ${hex(rt)})`, { rt, offset: off });
    const bytes = await readAt(ctx.files.image, off, cs);
    this.added++;
    t.load('refblock', rt, bytes);
    if (ctx.durable.refblocks.get(rt) === undefined) ctx.durable = { ...ctx.durable, refblocks: ctx.durable.refblocks.set(rt, bytes) };
    return bytes;
  }

  /**
   * Bound the memory the state holds: after a write-back every table is
   * clean (durable equals current), so tables beyond the budget can be
   * dropped from both states and reloaded from disk when next needed.
   * Refcount blocks stay while the dirty bit is on: they are not on disk yet.
   */
  evictClean(): void {
    const ctx = this.ctx;
    const budget = this.budget;
    if (this.added < Math.max(2, Math.floor(budget / 2))) return;
    this.added = 0;
    for (const role of ['l2', 'refblocks'] as const) {
      if (role === 'refblocks' && ctx.headerBits.dirtyOnDisk) continue;
      const trie = ctx.cur[role];
      const durable = ctx.durable[role];
      const slots: number[] = [];
      for (const [slot, t] of trie.entries()) if (durable.get(slot) === t) slots.push(slot);
      if (slots.length <= budget) continue;
      const ed = trie.edit();
      const ded = durable.edit();
      // no recency is tracked: the lowest slots go first, down to half the budget
      for (const slot of slots.slice(0, slots.length - Math.floor(budget / 2))) {
        ed.set(slot, undefined);
        ded.set(slot, undefined);
      }
      ctx.cur = { ...ctx.cur, [role]: ed.finish() };
      ctx.durable = { ...ctx.durable, [role]: ded.finish() };
    }
  }
}
