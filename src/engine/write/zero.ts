/**
 * Write-zeroes with QEMU's semantics: whole clusters become zero clusters
 * (v3 zero flag, extended-L2 zero bitmap, or deallocation where nothing
 * shows through), in one batch per L2 table; v2 over a backing file maps
 * them to the shared zero cluster; whole subclusters are zeroed in the
 * bitmap; anything else that does not already read as zero gets zero data
 * through the data path.
 */

import { l1IndexOf, l2IndexOf } from '../../format/header.ts';
import { isZero } from '../../format/bytes.ts';
import { ALL_SUBCLUSTERS, L2E_ZERO_LO, L2_UNALLOCATED, isCompressed, isCopied, sameL2Entry, standardOffset, subclusterBits, type L2Entry } from '../../format/l2.ts';
import { guest, type GuestOffset } from '../../format/offsets.ts';
import { readGuest } from '../read.ts';
import type { WriteContext } from './context.ts';
import type { DataWriter } from './data-write.ts';
import { Mapping, type EntryChange, type WalkedEntry } from './mapping.ts';
import type { ZeroCluster } from './shared.ts';

export class ZeroWriter {
  constructor(
    private readonly ctx: WriteContext,
    private readonly mapping: Mapping,
    private readonly data: DataWriter,
    private readonly zeroCluster: ZeroCluster,
  ) {}

  /** Make guest range [offset, offset + length) read as zero; `unmap` allows deallocation. */
  async zeroRange(offset: GuestOffset, length: number, unmap: boolean): Promise<void> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const end = offset + length;
    const imageEnd = ctx.header().size;
    const span = g.l2Entries * cs;
    // whole clusters from `cend` on, as many as follow inside this L2 table: one batch
    const batchEnd = (cstart: number, cend: number) => {
      const tableEnd = cstart - (cstart % span) + span;
      let stop = cend;
      while (stop < end && stop < tableEnd && Math.min(stop + cs, imageEnd) <= end) stop = Math.min(stop + cs, imageEnd);
      return stop;
    };
    let pos: number = offset;
    while (pos < end) {
      const cstart = pos - (pos % cs);
      const cend = Math.min(cstart + cs, imageEnd);
      const a = pos;
      const b = Math.min(end, cend);
      const whole = a === cstart && b === cend;
      if (whole && ctx.version === 2 && ctx.backing && !ctx.hasDataFile) {
        const stop = batchEnd(cstart, cend);
        if (await this.zeroCluster.map(guest(cstart), guest(stop))) {
          pos = stop;
          continue;
        }
      }
      // v2 has no zero flag: whole clusters can only become zero by being
      // deallocated, which is right when nothing shows through (no backing)
      if (whole && (ctx.version === 3 || (unmap && !ctx.backing))) {
        const stop = batchEnd(cstart, cend);
        await this.zeroClusters(guest(cstart), guest(stop), unmap);
        pos = stop;
        continue;
      }
      // A partial cluster (or v2, which has no zero flag): nothing to do if it
      // already reads as zero, otherwise zero data through the write path.
      const sub = g.extendedL2 && ctx.version === 3 ? await this.zeroSubclusters(guest(a), guest(b)) : false;
      if (!sub) {
        const cur = new Uint8Array(b - a);
        await readGuest(ctx.reader(), guest(a), cur);
        if (!isZero(cur)) await this.data.write(guest(a), new Uint8Array(b - a));
      }
      pos = b;
    }
  }

  /** Extended L2: zero whole subclusters of a cluster this image owns (or has no host cluster for) in its bitmap. */
  private async zeroSubclusters(a: GuestOffset, b: GuestOffset): Promise<boolean> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const sc = g.subclusterSize;
    if (a % sc !== 0 || (b % sc !== 0 && b !== ctx.header().size)) return false;
    const l1Index = l1IndexOf(g, a);
    const t = ctx.t();
    const index = l2IndexOf(g, a);
    if (t.l1TableOffset(l1Index) === 0 && !ctx.backing) return true; // reads as zero already
    await this.mapping.l2ForWrite(l1Index);
    const table = t.l1TableOffset(l1Index);
    const e = this.mapping.entry(l1Index, index);
    await this.mapping.validate(e, table, index, a);
    if (isCompressed(e) || (standardOffset(e) !== 0 && !isCopied(e))) return false;
    const cstart = a - (a % cs);
    const m = subclusterBits((a - cstart) / sc, Math.ceil((b - cstart) / sc) - 1);
    const ne = { ...e, bitmapLo: (e.bitmapLo & ~m) >>> 0, bitmapHi: (e.bitmapHi | m) >>> 0 };
    if (!sameL2Entry(e, ne)) this.mapping.set({ l1Index, index }, table, e, ne);
    return true;
  }

  /** Whole clusters [start, stop) become zero clusters (v3), or unallocated where nothing shows through (v2). */
  async zeroClusters(start: GuestOffset, stop: GuestOffset, unmap: boolean): Promise<void> {
    const ctx = this.ctx;
    const t = ctx.t();
    await this.mapping.rewrite(start, stop, (w) => this.zeroEntry(w, unmap), {
      openTable: (l1Index) => !(t.l1TableOffset(l1Index) === 0 && !ctx.backing), // reads as zero already
    });
  }

  private zeroEntry({ entry: e }: WalkedEntry, unmap: boolean): EntryChange {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const compressed = isCompressed(e);
    const hasHost = Mapping.hasHostCluster(e, ctx.hasDataFile);
    const drop = compressed || (unmap && hasHost);
    if (g.extendedL2) {
      return drop ? { next: { hi: 0, lo: 0, bitmapHi: ALL_SUBCLUSTERS, bitmapLo: 0 }, unref: true } : { next: { ...e, bitmapHi: ALL_SUBCLUSTERS, bitmapLo: 0 }, unref: false };
    }
    if (ctx.version === 2) {
      if (!compressed && !hasHost) return undefined; // unallocated, no backing: reads as zero already
      return { next: L2_UNALLOCATED, unref: true };
    }
    const zeroFlag = (e.lo & L2E_ZERO_LO) !== 0;
    if (!compressed && zeroFlag && (!hasHost || !unmap)) return undefined; // zero already (and kept allocated unless unmapping)
    const next: L2Entry = drop ? { hi: 0, lo: L2E_ZERO_LO, bitmapHi: 0, bitmapLo: 0 } : { ...e, lo: (e.lo | L2E_ZERO_LO) >>> 0 };
    return { next, unref: drop };
  }
}
