/**
 * Shared clusters: several active L2 entries mapping one host cluster, its
 * refcount counting them, COPIED clear on each. `SharedClusters` tracks
 * such clusters and the entries known to map them; at the end of every
 * operation (`settle`) a tracked cluster left with a single reference and
 * one active mapping gives that mapping a cluster of its own, filled by the
 * cluster's user, and the shared one goes: setting COPIED on the lone
 * mapping instead would let a crash leave COPIED and the refcount
 * disagreeing. Two users make such clusters: `ZeroCluster` (v2 over a
 * backing file has no zero flag, so whole zero clusters map to one shared
 * zero cluster, which only ever exists with two or more references) and
 * content dedup (write/dedup.ts), which tells this room of every share.
 *
 * A cluster shared before this session is found when it is about to lose
 * its second-last reference: one scan of the active tables (once per
 * session, kept as a sorted pair of typed arrays) plus the shares this
 * session made name its other mappings. That runs where active entries
 * can share a cluster: in a dedup session, or in an image without
 * snapshots (where a cluster without COPIED and with two references can
 * only be shared between active entries).
 */

import { l1IndexOf, l2IndexOf } from '../../format/header.ts';
import { isZero } from '../../format/bytes.ts';
import { L2E_ZERO_LO, isCompressed, isCopied, standardEntry, standardOffset, type L2Entry } from '../../format/l2.ts';
import { maxRefcount } from '../../format/refcount.ts';
import { readAt } from '../../io/device.ts';
import { clusterOf, guest, host, hostOf, type ClusterIndex, type GuestOffset, type HostOffset } from '../../format/offsets.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { EntryAt, Mapping, UnrefListener } from './mapping.ts';
import type { TableCache } from './tables.ts';

const key = (at: EntryAt) => `${at.l1Index}:${at.index}`;

function lowerBound(a: Float64Array, v: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid]! < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** A tracked shared cluster: the active entries known to map it, and how a lone mapping's own cluster is filled. */
interface Tracked {
  readonly refs: Map<string, EntryAt>;
  readonly fill: (own: ClusterIndex) => Promise<void>;
}

/** Told when a reference to a cluster nobody tracks is about to go (a user may start tracking it). */
export type UntrackedUnref = (e: L2Entry, c: ClusterIndex) => Promise<void> | undefined;

export class SharedClusters implements UnrefListener {
  private readonly tracked = new Map<ClusterIndex, Tracked>();
  /** the shares this session made: host cluster -> guest clusters mapping it (one, or several) */
  private readonly reverse = new Map<number, number | number[]>();
  /** the scan of the active tables: host clusters without COPIED (sorted) and the guest cluster of each */
  private scan: { hosts: Float64Array; guests: Float64Array } | undefined;
  /** a dedup session: active entries share clusters whether or not there are snapshots */
  dedup = false;
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
    if (this.dedup || ctx.header().nbSnapshots === 0) return this.adopt(c, at);
    return undefined;
  }

  /** Dedup shared host cluster `c` between guest clusters `owner` and `gc`. */
  noteShare(c: ClusterIndex, owner: number, gc: number): void {
    const had = this.reverse.get(c);
    if (had === undefined) this.reverse.set(c, owner === gc ? gc : [owner, gc]);
    else if (typeof had === 'number') this.reverse.set(c, had === gc ? had : [had, gc]);
    else if (!had.includes(gc)) had.push(gc);
    this.tracked.get(c)?.refs.set(`${Math.floor(gc / this.ctx.geometry.l2Entries)}:${gc % this.ctx.geometry.l2Entries}`, this.at(gc));
  }

  /** The trees changed wholesale (snapshot apply, make_empty): the scan is rebuilt when next needed. */
  forgetScan(): void {
    this.scan = undefined;
  }

  private at(gc: number): EntryAt {
    const n = this.ctx.geometry.l2Entries;
    return { l1Index: Math.floor(gc / n), index: gc % n };
  }

  /**
   * Cluster `c` (no COPIED, untracked) is about to lose the reference of
   * the entry at `at`. With two references, the other may be an active
   * mapping that would be left alone without COPIED: track the cluster so
   * that settle gives that mapping a copy of its own.
   */
  private async adopt(c: ClusterIndex, at: EntryAt | undefined): Promise<void> {
    if ((await this.alloc.refcount(c)) !== 2) return;
    const cs = this.ctx.geometry.clusterSize;
    const n = this.ctx.geometry.l2Entries;
    const t = this.ctx.t();
    const dropped = at ? at.l1Index * n + at.index : -1;
    const others = new Set<number>();
    const r = this.reverse.get(c);
    if (typeof r === 'number') others.add(r);
    else if (r) for (const g of r) others.add(g);
    const scan = await this.scanned();
    for (let k = lowerBound(scan.hosts, c); k < scan.hosts.length && scan.hosts[k] === c; k++) others.add(scan.guests[k]!);
    others.delete(dropped);
    const live: EntryAt[] = [];
    for (const g of others) {
      const a = this.at(g);
      const off = a.l1Index < t.header.l1Size ? t.l1TableOffset(a.l1Index) : 0;
      if (!off) continue;
      if (!t.l2(a.l1Index)) await this.tables.loadL2(a.l1Index, off);
      const e = this.mapping.entry(a.l1Index, a.index);
      if (!isCompressed(e) && standardOffset(e) === hostOf(c, cs)) live.push(a);
    }
    if (live.length === 1) this.track(c, live, (own) => this.copyCluster(c, own));
  }

  /** The scan of the active tables (see the module comment), made once per session. */
  private async scanned(): Promise<{ hosts: Float64Array; guests: Float64Array }> {
    if (this.scan) return this.scan;
    const g = this.ctx.geometry;
    const t = this.ctx.t();
    const cs = g.clusterSize;
    const tablesAt: Array<[number, HostOffset]> = [];
    for (let i = 0; i < t.header.l1Size; i++) if (t.l1TableOffset(i)) tablesAt.push([i, t.l1TableOffset(i)]);
    await this.tables.preloadL2(tablesAt);
    let hosts = new Float64Array(1024);
    let guests = new Float64Array(1024);
    let m = 0;
    for (const [i] of tablesAt) {
      for (let j = 0; j < g.l2Entries; j++) {
        const e = this.mapping.entry(i, j);
        if (isCompressed(e) || isCopied(e) || standardOffset(e) === 0) continue;
        if (m === hosts.length) {
          const h2 = new Float64Array(m * 2);
          h2.set(hosts);
          hosts = h2;
          const g2 = new Float64Array(m * 2);
          g2.set(guests);
          guests = g2;
        }
        hosts[m] = standardOffset(e) / cs;
        guests[m++] = i * g.l2Entries + j;
      }
    }
    const order = Array.from({ length: m }, (_, k) => k).sort((x, y) => hosts[x]! - hosts[y]!);
    this.scan = { hosts: Float64Array.from(order, (k) => hosts[k]!), guests: Float64Array.from(order, (k) => guests[k]!) };
    return this.scan;
  }

  /** Fill a lone mapping's own cluster with the shared cluster's bytes. */
  private async copyCluster(c: ClusterIndex, own: ClusterIndex): Promise<void> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    const bytes = await readAt(ctx.files.image, hostOf(c, cs), cs);
    await ctx.files.guest.writeAs(hostOf(own, cs), bytes, 0, 'data (copy of a cluster left unshared)');
    ctx.trace.record({ kind: 'data', host: hostOf(own, cs), length: cs });
    ctx.trace.write(hostOf(own, cs), cs, 'data (unshare copy)');
    ctx.extent.noteData(hostOf(own, cs), cs, true, bytes);
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
    // the entry keeps what it says of its cluster: the subcluster bitmap (without it an extended
    // entry reads as unallocated) and the zero flag (a zero-alloc entry reads as zeros still)
    const own = standardEntry(hostOf(n, cs), true, e.bitmapLo, e.bitmapHi);
    this.mapping.set(at, table, e, { hi: own.hi, lo: (own.lo | (e.lo & L2E_ZERO_LO)) >>> 0, bitmapLo: own.bitmapLo, bitmapHi: own.bitmapHi });
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
