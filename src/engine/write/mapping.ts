/**
 * L2 mapping for writing: the writable L2 table of a guest range (allocated
 * when absent, copied when a snapshot shares it), entry validation before
 * use, dropping a reference when an entry stops mapping a host cluster, and
 * the one span walker that every "rewrite the entries of a guest range"
 * operation (zero, discard, shrink, preallocate) goes through.
 */

import { l2IndexOf } from '../../format/header.ts';
import { hex } from '../../errors.ts';
import { COPIED_HI, l1Word } from '../../format/l1.ts';
import { compressedDescriptor, isCompressed, isCopied, l2EntryAt, sameL2Entry, standardOffset, subclusterType, type L2Entry } from '../../format/l2.ts';
import { cluster, clusterOf, guest, host, hostOf, type GuestOffset, type HostOffset } from '../../format/offsets.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { TableCache } from './tables.ts';

/** Where an entry is: its L1 index and index in that L2 table. */
export interface EntryAt {
  readonly l1Index: number;
  readonly index: number;
}

/** Told before a reference to a host cluster is dropped (the shared-cluster room listens). */
export interface UnrefListener {
  /** undefined when there is nothing to do (the common case costs no await) */
  beforeUnref(e: L2Entry, at: EntryAt | undefined): Promise<void> | undefined;
}

/** One entry as the span walker shows it. */
export interface WalkedEntry extends EntryAt {
  /** guest offset of the cluster */
  readonly guest: GuestOffset;
  /** host offset of the L2 table */
  readonly table: HostOffset;
  readonly entry: L2Entry;
}

/** What a visitor wants done with an entry: nothing, or a new value (dropping the old one's reference if `unref`). */
export type EntryChange = { readonly next: L2Entry; readonly unref: boolean } | undefined;

/** QEMU's way of naming an L2 entry in messages. */
function where(table: HostOffset, index: number): string {
  return `(L2 offset: ${hex(table)}, L2 index: ${hex(index)})`;
}

export class Mapping {
  unrefListener: UnrefListener | undefined;

  constructor(
    private readonly ctx: WriteContext,
    private readonly tables: TableCache,
    private readonly alloc: Allocator,
  ) {}

  /** The L2 table of `l1Index`, writable: allocated when absent, copied when shared. */
  async l2ForWrite(l1Index: number): Promise<Uint8Array> {
    const ctx = this.ctx;
    const t = ctx.t();
    const cs = ctx.geometry.clusterSize;
    const e = t.l1Entry(l1Index);
    const off = t.l1TableOffset(l1Index);
    if (off === 0) {
      const c = await this.alloc.allocate(1);
      ctx.emit({ kind: 'table-new', role: 'l2', slot: l1Index, offset: hostOf(c, cs), copyOf: 0 });
      ctx.emit({ kind: 'l1', index: l1Index, old: e, new: l1Word(hostOf(c, cs), true) });
      return t.l2(l1Index)!;
    }
    if (!t.l2(l1Index)) await this.tables.loadL2(l1Index, off);
    if ((e.hi & COPIED_HI) === 0) {
      // Shared with a snapshot: copy the table, then drop our reference to the old one.
      const c = await this.alloc.allocate(1);
      ctx.emit({ kind: 'table-new', role: 'l2', slot: l1Index, offset: hostOf(c, cs), copyOf: off });
      ctx.emit({ kind: 'l1', index: l1Index, old: e, new: l1Word(hostOf(c, cs), true) });
      await this.alloc.changeRefcount(clusterOf(off, cs), -1);
    }
    return t.l2(l1Index)!;
  }

  /** Entry `index` of the (loaded) L2 table of `l1Index` in the open transaction. */
  entry(l1Index: number, index: number): L2Entry {
    return l2EntryAt(this.ctx.t().l2(l1Index)!, index, this.ctx.geometry);
  }

  /** Refuse an entry the engine must not act on: QEMU's checks, each marking the image corrupt. */
  async validate(e: L2Entry, table: HostOffset, index: number, guestOff: GuestOffset): Promise<void> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    // messages are built only when needed: this runs for every entry a write touches
    if (isCompressed(e)) {
      if (ctx.hasDataFile) await ctx.signalCorruption(`compressed cluster entry found in image with external data file ${where(table, index)}`);
      return;
    }
    const off = standardOffset(e);
    if (off % g.clusterSize !== 0) await ctx.signalCorruption(`cluster allocation offset ${hex(off)} unaligned ${where(table, index)}`);
    if (subclusterType(e, 0, g, ctx.hasDataFile) === 'invalid') await ctx.signalCorruption(`invalid cluster entry found ${where(table, index)}`);
    if (off !== 0 && !ctx.hasDataFile && off >= ctx.extent.end()) {
      await ctx.signalCorruption(`data cluster of guest offset ${hex(guestOff)} at ${hex(off)} lies past the end of the image`);
    }
  }

  /** Drop this image's reference to the host clusters of an L2 entry (at its table position, if known). */
  async unref(e: L2Entry, at?: EntryAt): Promise<void> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    const told = this.unrefListener?.beforeUnref(e, at);
    if (told) await told;
    if (isCompressed(e)) {
      const d = compressedDescriptor(e, ctx.geometry.clusterBits);
      const first = Math.floor(d.offset / cs);
      const last = Math.floor((d.offset + d.length - 1) / cs);
      for (let c = first; c <= last; c++) await this.alloc.changeRefcount(cluster(c), -1);
      return;
    }
    const off = standardOffset(e);
    if (off === 0 || ctx.hasDataFile) return; // data file clusters carry no refcount
    await this.alloc.changeRefcount(clusterOf(host(off), cs), -1);
  }

  /** Set entry `at` (of the table at `table`) from `old` to `next`: one record. */
  set(at: EntryAt, table: HostOffset, old: L2Entry, next: L2Entry): void {
    this.ctx.emit({ kind: 'l2', l1Index: at.l1Index, table, index: at.index, old, new: next });
  }

  /**
   * Walk the guest clusters [start, stop) table by table. For each L2 table
   * the span touches, `openTable(l1Index)` says whether to visit it (false:
   * skip its span, nothing is allocated); the table is then made writable,
   * and `visit` sees each entry (validated first unless `validate` is
   * false) and returns the change to make, if any. A change equal to the
   * entry is no change. The old entry's reference is dropped after its
   * record when the change says so.
   */
  async rewrite(
    start: GuestOffset,
    stop: GuestOffset,
    visit: (w: WalkedEntry) => Promise<EntryChange> | EntryChange,
    o: { openTable?: (l1Index: number, from: GuestOffset, to: GuestOffset) => Promise<boolean> | boolean; validate?: boolean } = {},
  ): Promise<void> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const span = g.l2Entries * cs;
    const t = ctx.t();
    for (let c = start; c < stop; ) {
      const l1Index = Math.floor(c / span);
      const to = guest(Math.min(stop, (l1Index + 1) * span));
      if (o.openTable && !(await o.openTable(l1Index, c, to))) {
        c = to;
        continue;
      }
      await this.l2ForWrite(l1Index);
      const table = t.l1TableOffset(l1Index);
      const batch = new EntryBatch(this.ctx, l1Index, table, Math.ceil((to - c) / cs));
      try {
        for (; c < to; c = guest(c + cs)) {
          const index = l2IndexOf(g, c);
          const entry = this.entry(l1Index, index);
          if (o.validate !== false) await this.validate(entry, table, index, c);
          const change = await visit({ l1Index, index, guest: c, table, entry });
          if (!change || sameL2Entry(entry, change.next)) continue;
          batch.add(index, entry, change.next);
          if (!change.unref) continue;
          // the reference goes after its entry's record, as it always has (and before the next entry is looked at)
          batch.emit();
          await this.unref(entry, { l1Index, index });
        }
      } finally {
        // what was changed before a refused entry stays changed, as if recorded one by one
        batch.emit();
      }
    }
  }

  /** The entry maps a (standard) host cluster: an offset, or with an external data file COPIED at offset 0. */
  static hasHostCluster(e: L2Entry, hasDataFile: boolean): boolean {
    return !isCompressed(e) && (standardOffset(e) !== 0 || (hasDataFile && isCopied(e)));
  }
}

/**
 * The changes a span walk makes to one table, emitted as one 'l2s' record
 * (one 'l2' when there is one change): a 1 GiB zero write with 64 KiB clusters is 2 records, not
 * 16,384, for the state, the journal's stream and its encoder alike.
 */
class EntryBatch {
  private n = 0;
  private index: Uint32Array;
  private old: Uint32Array;
  private next: Uint32Array;
  private first: { index: number; old: L2Entry; next: L2Entry } | undefined;
  constructor(
    private readonly ctx: WriteContext,
    private readonly l1Index: number,
    private readonly table: HostOffset,
    capacity: number,
  ) {
    this.index = new Uint32Array(capacity);
    this.old = new Uint32Array(capacity * 4);
    this.next = new Uint32Array(capacity * 4);
  }
  add(index: number, old: L2Entry, next: L2Entry): void {
    if (this.n === 0) this.first = { index, old, next };
    const k = this.n++;
    this.index[k] = index;
    const o = this.old;
    const x = this.next;
    o[k * 4] = old.hi;
    o[k * 4 + 1] = old.lo;
    o[k * 4 + 2] = old.bitmapHi;
    o[k * 4 + 3] = old.bitmapLo;
    x[k * 4] = next.hi;
    x[k * 4 + 1] = next.lo;
    x[k * 4 + 2] = next.bitmapHi;
    x[k * 4 + 3] = next.bitmapLo;
  }
  emit(): void {
    const n = this.n;
    if (n === 0) return;
    this.n = 0;
    if (n === 1) {
      const f = this.first!;
      this.ctx.emit({ kind: 'l2', l1Index: this.l1Index, table: this.table, index: f.index, old: f.old, new: f.next });
      return;
    }
    // the record keeps its arrays: copies, the batch goes on with its own
    this.ctx.emit({ kind: 'l2s', l1Index: this.l1Index, table: this.table, index: this.index.slice(0, n), old: this.old.slice(0, n * 4), new: this.next.slice(0, n * 4) });
  }
}
