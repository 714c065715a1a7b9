/**
 * Shared clusters: several active L2 entries mapping one host cluster, its
 * refcount counting them, COPIED clear on each. `SharedClusters` tracks
 * such clusters and the entries known to map them; at the end of every
 * operation (`settle`) a tracked cluster left with a single reference and
 * one active mapping gives that mapping a cluster of its own, filled by the
 * cluster's user, and the shared one goes: setting COPIED on the lone
 * mapping instead would let a crash leave COPIED and the refcount
 * disagreeing. Content dedup will be a second user; the first is
 * `ZeroCluster`: v2 over a backing file has no zero flag, so whole zero
 * clusters map to one shared zero cluster, which only ever exists with two
 * or more references.
 */

import { l1IndexOf, l2IndexOf } from '../../format/header.ts';
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

/** A tracked shared cluster: the active entries known to map it, and how a lone mapping's own cluster is filled. */
interface Tracked {
  readonly refs: Map<string, EntryAt>;
  readonly fill: (own: ClusterIndex) => Promise<void>;
}

/** Told when a reference to a cluster nobody tracks is about to go (a user may start tracking it). */
export type UntrackedUnref = (e: L2Entry, c: ClusterIndex) => Promise<void> | undefined;

export class SharedClusters implements UnrefListener {
  private readonly tracked = new Map<ClusterIndex, Tracked>();
  /** users that want to hear of references dropped to clusters nobody tracks yet */
  private readonly onUntracked: UntrackedUnref[] = [];

  constructor(
    private readonly ctx: WriteContext,
    private readonly tables: TableCache,
    private readonly alloc: Allocator,
    private readonly mapping: Mapping,
  ) {
    mapping.unrefListener = this;
  }

  /** Some tracked cluster may need settling. */
  get active(): boolean {
    return this.tracked.size > 0;
  }

  isTracked(c: ClusterIndex): boolean {
    return this.tracked.has(c);
  }

  /** Track cluster `c` as shared by the entries `refs` (more may be added). */
  track(c: ClusterIndex, refs: readonly EntryAt[], fill: Tracked['fill']): void {
    this.tracked.set(c, { refs: new Map(refs.map((at) => [key(at), at])), fill });
  }

  untrack(c: ClusterIndex): void {
    this.tracked.delete(c);
  }

  /** Entry `at` now maps tracked cluster `c`. */
  addRef(c: ClusterIndex, at: EntryAt): void {
    this.tracked.get(c)?.refs.set(key(at), at);
  }

  listenUntracked(fn: UntrackedUnref): void {
    this.onUntracked.push(fn);
  }

  /** An in-place data write into host cluster `hostOff`: whatever it held as a shared cluster, it is this image's alone now. */
  written(hostOff: HostOffset): void {
    if (this.tracked.size) this.tracked.delete(clusterOf(hostOff, this.ctx.geometry.clusterSize));
  }

  beforeUnref(e: L2Entry, at: EntryAt | undefined): Promise<void> | undefined {
    const ctx = this.ctx;
    if (isCompressed(e)) return undefined;
    const off = standardOffset(e);
    if (off === 0) return undefined;
    const c = clusterOf(host(off), ctx.geometry.clusterSize);
    const t = this.tracked.get(c);
    if (t) {
      if (at) t.refs.delete(key(at));
      return undefined;
    }
    if (ctx.hasDataFile || isCopied(e)) return undefined; // data file clusters carry no refcount; COPIED: not shared
    for (const fn of this.onUntracked) {
      const p = fn(e, c);
      if (p) return p;
    }
    return undefined;
  }

  /** Every active L2 entry that maps a host cluster without COPIED, by host offset (one scan of the active tables). */
  async sharedMappings(): Promise<Map<number, EntryAt[]>> {
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

  /** The end of every operation: settle every tracked cluster (see the module comment). */
  async settle(): Promise<void> {
    for (const c of [...this.tracked.keys()]) await this.settleOne(c);
  }

  private async settleOne(c: ClusterIndex): Promise<void> {
    const s = this.tracked.get(c)!;
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    const t = ctx.t();
    const rc = await this.alloc.refcount(c);
    const live: EntryAt[] = [];
    for (const at of s.refs.values()) {
      const off = t.l1TableOffset(at.l1Index);
      if (!off) continue;
      if (!t.l2(at.l1Index)) await this.tables.loadL2(at.l1Index, off); // it may have been evicted
      if (standardOffset(this.mapping.entry(at.l1Index, at.index)) === hostOf(c, cs)) live.push(at);
    }
    if (rc >= 2) return;
    this.tracked.delete(c);
    if (rc === 0 || live.length !== 1) return; // none left, or the last reference is a snapshot's: its tables need no COPIED
    const at = live[0]!;
    await this.mapping.l2ForWrite(at.l1Index);
    const table = t.l1TableOffset(at.l1Index);
    const e = this.mapping.entry(at.l1Index, at.index);
    const n = await this.alloc.allocate(1, 'data');
    await s.fill(n);
    this.mapping.set(at, table, e, standardEntry(hostOf(n, cs), true));
    await this.alloc.changeRefcount(c, -1);
  }
}

/** The v2 shared zero cluster: whole zero clusters over a backing file map to it. */
export class ZeroCluster {
  /** the shared zero cluster of this session, while it is tracked */
  private zero: ClusterIndex | undefined;
  private searched = false;

  constructor(
    private readonly ctx: WriteContext,
    private readonly tables: TableCache,
    private readonly alloc: Allocator,
    private readonly mapping: Mapping,
    private readonly shared: SharedClusters,
  ) {
    if (ctx.version === 2 && ctx.backing) shared.listenUntracked((_e, c) => (this.current() === undefined ? this.adopt(c) : undefined));
  }

  /** The zero cluster, if it is still tracked (settle may have let it go). */
  private current(): ClusterIndex | undefined {
    if (this.zero !== undefined && !this.shared.isTracked(this.zero)) this.zero = undefined;
    return this.zero;
  }

  private use(c: ClusterIndex, refs: readonly EntryAt[]): void {
    this.zero = c;
    this.shared.track(c, refs, (own) => this.zeroHostCluster(own));
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
    const refs = (await this.shared.sharedMappings()).get(hostOf(c, cs)) ?? [];
    if (refs.length === 1) this.use(c, refs);
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
    const seen = await this.shared.sharedMappings();
    const candidates = [...seen.entries()].filter(([, l]) => l.length >= 2).sort((x, y) => y[1].length - x[1].length).slice(0, 4);
    for (const [o, list] of candidates) {
      const c = clusterOf(host(o), cs);
      if ((await this.alloc.refcount(c)) !== list.length) continue;
      if (!isZero(await readAt(this.ctx.files.image, o, cs))) continue;
      this.use(c, list);
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
    const l1Index = l1IndexOf(g, start);
    const t = ctx.t();
    if (this.current() === undefined && !this.searched) await this.find();
    let z = this.current();
    const zoff = z !== undefined ? hostOf(z, cs) : -1;
    const todo: number[] = [];
    if (t.l1TableOffset(l1Index) !== 0 && !t.l2(l1Index)) await this.tables.loadL2(l1Index, t.l1TableOffset(l1Index));
    for (let c: number = start; c < stop; c += cs) {
      const index = l2IndexOf(g, c);
      if (t.l2(l1Index)) {
        const e = this.mapping.entry(l1Index, index);
        if (standardOffset(e) === zoff && !isCompressed(e)) continue;
      }
      todo.push(index);
    }
    if (todo.length === 0) return true;
    const max = maxRefcount(g.refcountOrder);
    if (z !== undefined && (await this.alloc.refcount(z)) + todo.length > max) return false;
    if (z === undefined && (todo.length < 2 || todo.length > max)) return false;
    await this.mapping.l2ForWrite(l1Index);
    const table = t.l1TableOffset(l1Index);
    if (z === undefined) {
      z = await this.alloc.allocate(1, 'data');
      await this.zeroHostCluster(z);
      await this.alloc.changeRefcount(z, todo.length - 1);
      this.use(z, []);
    } else await this.alloc.changeRefcount(z, todo.length);
    for (const index of todo) {
      const at = { l1Index, index };
      const e = this.mapping.entry(l1Index, index);
      await this.mapping.validate(e, table, index, guest(l1Index * g.l2Entries * cs + index * cs));
      this.mapping.set(at, table, e, standardEntry(hostOf(z, cs), false));
      if (isCompressed(e) || standardOffset(e) !== 0) await this.mapping.unref(e, at);
      this.shared.addRef(z, at);
    }
    return true;
  }

  /** Make a freshly allocated host cluster read as zero (nothing to do past everything ever written). */
  private async zeroHostCluster(n: ClusterIndex): Promise<void> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    if (hostOf(n, cs) >= ctx.extent.zeroFrom) return;
    await ctx.files.guest.writeZeroes(hostOf(n, cs), cs, false);
    ctx.trace.write(hostOf(n, cs), cs, 'zeroes (shared zero cluster)');
    ctx.extent.noteDeviceChange();
  }
}
