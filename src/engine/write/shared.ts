/**
 * Shared clusters: several L2 entries mapping one host cluster, its
 * refcount counting them, COPIED clear on each; when one mapping is left,
 * COPIED must be settled. Today's user is v2 over a backing file, which has
 * no zero flag: whole zero clusters map to one shared zero cluster. Such a
 * cluster only ever exists with two or more references, so no entry that
 * maps it needs COPIED; at the end of every operation a shared cluster left
 * with one active mapping gives that mapping a cluster of its own.
 */

import { isZero } from '../../format/bytes.ts';
import { isCompressed, isCopied, standardEntry, standardOffset, type L2Entry } from '../../format/l2.ts';
import { maxRefcount } from '../../format/refcount.ts';
import { readAt } from '../../io/device.ts';
import { clusterOf, guest, host, hostOf, type ClusterIndex, type GuestOffset, type HostOffset } from '../../format/offsets.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { EntryAt, Mapping, UnrefListener } from './mapping.ts';
import type { TableCache } from './tables.ts';

const key = (at: EntryAt) => `${at.l1Index}:${at.index}`;

export class SharedZeroCluster implements UnrefListener {
  /** the shared zero cluster and the active entries known to map it */
  private zero: { cluster: ClusterIndex; refs: Map<string, EntryAt> } | undefined;
  private searched = false;

  constructor(
    private readonly ctx: WriteContext,
    private readonly tables: TableCache,
    private readonly alloc: Allocator,
    private readonly mapping: Mapping,
  ) {
    mapping.unrefListener = this;
  }

  /** An in-place data write into host cluster `hostOff`: it is no longer a zero cluster. */
  written(hostOff: HostOffset): void {
    if (this.zero && hostOff === hostOf(this.zero.cluster, this.ctx.geometry.clusterSize)) this.zero = undefined;
  }

  beforeUnref(e: L2Entry, at: EntryAt | undefined): Promise<void> | undefined {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    if (isCompressed(e)) return undefined;
    const off = standardOffset(e);
    if (this.zero && at && off === hostOf(this.zero.cluster, cs)) this.zero.refs.delete(key(at));
    if (off === 0 || ctx.hasDataFile) return undefined;
    if (!this.zero && ctx.version === 2 && ctx.backing && !isCopied(e)) return this.adopt(clusterOf(host(off), cs));
    return undefined;
  }

  /** A shared zero cluster is in use in this session (settle() has work to do). */
  get active(): boolean {
    return this.zero !== undefined;
  }

  /**
   * A shared cluster is about to lose a reference. If it is a shared zero
   * cluster of an earlier session that would be left with one active
   * mapping, adopt it now so that settle() gives that mapping a cluster of
   * its own (a lone mapping would need COPIED).
   */
  private async adopt(c: ClusterIndex): Promise<void> {
    const cs = this.ctx.geometry.clusterSize;
    if ((await this.alloc.refcount(c)) !== 2) return;
    if (!isZero(await readAt(this.ctx.files.image, hostOf(c, cs), cs))) return;
    const refs = (await this.sharedMappings()).get(hostOf(c, cs)) ?? [];
    if (refs.length === 1) this.zero = { cluster: c, refs: new Map(refs.map((at) => [key(at), at])) };
  }

  /** Every active L2 entry that maps a host cluster without COPIED, by host offset (one scan of the active tables). */
  private async sharedMappings(): Promise<Map<number, EntryAt[]>> {
    const g = this.ctx.geometry;
    const t = this.ctx.t();
    const seen = new Map<number, EntryAt[]>();
    for (let i = 0; i < t.header.l1Size; i++) {
      const off = t.l1TableOffset(i);
      if (!off) continue;
      if (!t.l2(i)) await this.tables.loadL2(i, off);
      for (let j = 0; j < g.l2Entries; j++) {
        const e = this.mapping.entry(i, j);
        if (isCompressed(e) || isCopied(e)) continue;
        const o = standardOffset(e);
        if (!o) continue;
        let list = seen.get(o);
        if (!list) seen.set(o, (list = []));
        list.push({ l1Index: i, index: j });
      }
    }
    return seen;
  }

  /**
   * Find the shared zero cluster an earlier session made: a cluster that
   * two or more active entries map, whose refcount is exactly that (no
   * snapshot shares it) and which reads as zero. One scan of the active L2
   * tables, once per session and only when a zero write needs it.
   */
  private async find(): Promise<void> {
    this.searched = true;
    const cs = this.ctx.geometry.clusterSize;
    const seen = await this.sharedMappings();
    const candidates = [...seen.entries()].filter(([, l]) => l.length >= 2).sort((x, y) => y[1].length - x[1].length).slice(0, 4);
    for (const [o, list] of candidates) {
      if ((await this.alloc.refcount(clusterOf(host(o), cs))) !== list.length) continue;
      if (!isZero(await readAt(this.ctx.files.image, o, cs))) continue;
      this.zero = { cluster: clusterOf(host(o), cs), refs: new Map(list.map((at) => [key(at), at])) };
      return;
    }
  }

  /**
   * Map whole clusters [start, stop) (one L2 table) to the shared zero
   * cluster. False when that cannot be done (no shared cluster yet and
   * fewer than two clusters to map, or its refcount is full); the caller
   * then writes zero data.
   */
  async map(start: GuestOffset, stop: GuestOffset): Promise<boolean> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const l1Index = Math.floor(start / (g.l2Entries * cs));
    const t = ctx.t();
    if (!this.zero && !this.searched) await this.find();
    const zoff = this.zero ? this.zero.cluster * cs : -1;
    const todo: number[] = [];
    if (t.l1TableOffset(l1Index) !== 0 && !t.l2(l1Index)) await this.tables.loadL2(l1Index, t.l1TableOffset(l1Index));
    for (let c: number = start; c < stop; c += cs) {
      const index = (c / cs) % g.l2Entries;
      if (t.l2(l1Index)) {
        const e = this.mapping.entry(l1Index, index);
        if (standardOffset(e) === zoff && !isCompressed(e)) continue;
      }
      todo.push(index);
    }
    if (todo.length === 0) return true;
    const max = maxRefcount(g.refcountOrder);
    if (this.zero && (await this.alloc.refcount(this.zero.cluster)) + todo.length > max) return false;
    if (!this.zero && (todo.length < 2 || todo.length > max)) return false;
    await this.mapping.l2ForWrite(l1Index);
    const table = t.l1TableOffset(l1Index);
    if (!this.zero) {
      const n = await this.alloc.allocate(1);
      await this.zeroHostCluster(n);
      await this.alloc.changeRefcount(n, todo.length - 1);
      this.zero = { cluster: n, refs: new Map() };
    } else await this.alloc.changeRefcount(this.zero.cluster, todo.length);
    const z = this.zero;
    for (const index of todo) {
      const at = { l1Index, index };
      const e = this.mapping.entry(l1Index, index);
      await this.mapping.validate(e, table, index, guest(l1Index * g.l2Entries * cs + index * cs));
      this.mapping.set(at, table, e, standardEntry(z.cluster * cs, false));
      if (isCompressed(e) || standardOffset(e) !== 0) await this.mapping.unref(e, at);
      z.refs.set(key(at), at);
    }
    return true;
  }

  /** Make a freshly allocated host cluster read as zero (nothing to do past everything ever written). */
  private async zeroHostCluster(n: ClusterIndex): Promise<void> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    if (n * cs >= ctx.extent.zeroFrom) return;
    await ctx.files.guest.writeZeroes(n * cs, cs, false);
    ctx.trace.write(n * cs, cs, 'zeroes (shared zero cluster)');
    ctx.extent.noteDeviceChange();
  }

  /**
   * The end of every operation: a shared zero cluster left with a single
   * reference would need COPIED on that entry, and a crash could then leave
   * COPIED and the refcount disagreeing. So the last mapping gets a zero
   * cluster of its own and the shared one goes.
   */
  async settle(): Promise<void> {
    const z = this.zero;
    if (!z) return;
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    const t = ctx.t();
    const rc = await this.alloc.refcount(z.cluster);
    const live: EntryAt[] = [];
    for (const at of z.refs.values()) {
      const off = t.l1TableOffset(at.l1Index);
      if (!off) continue;
      if (!t.l2(at.l1Index)) await this.tables.loadL2(at.l1Index, off); // it may have been evicted
      if (standardOffset(this.mapping.entry(at.l1Index, at.index)) === z.cluster * cs) live.push(at);
    }
    if (rc >= 2 || rc === 0) {
      if (rc === 0) this.zero = undefined;
      return;
    }
    this.zero = undefined;
    if (live.length !== 1) return; // the last reference is a snapshot's: its tables need no COPIED
    const at = live[0]!;
    await this.mapping.l2ForWrite(at.l1Index);
    const table = t.l1TableOffset(at.l1Index);
    const e = this.mapping.entry(at.l1Index, at.index);
    const n = await this.alloc.allocate(1);
    await this.zeroHostCluster(n);
    this.mapping.set(at, table, e, standardEntry(n * cs, true));
    await this.alloc.changeRefcount(z.cluster, -1);
  }
}
