/**
 * Discard with QEMU's semantics: whole clusters only (a partial cluster is
 * ignored but for the image's last one). A discarded cluster reads as zero
 * (v3 zero flag or bitmap) where a backing file would otherwise show
 * through, and is unallocated where nothing shows through; its host
 * cluster's reference is dropped.
 */

import { isCompressed, sameL2Entry, zeroEntry, L2_UNALLOCATED, L2E_ZERO_LO, ALL_SUBCLUSTERS } from '../../format/l2.ts';
import { guest, type GuestOffset } from '../../format/offsets.ts';
import type { WriteContext } from './context.ts';
import { Mapping, type EntryChange, type WalkedEntry } from './mapping.ts';
import type { ZeroWriter } from './zero.ts';

export class Discarder {
  constructor(
    private readonly ctx: WriteContext,
    private readonly mapping: Mapping,
    private readonly zero: ZeroWriter,
  ) {}

  async discard(offset: GuestOffset, length: number): Promise<void> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    const end = offset + length;
    const first = guest(Math.ceil(offset / cs) * cs);
    const last = guest(end === ctx.header().size ? end : end - (end % cs));
    const t = ctx.t();
    await this.mapping.rewrite(first, last, (w) => this.discardEntry(w), {
      openTable: async (l1Index, from, to) => {
        if (t.l1TableOffset(l1Index) !== 0) return true;
        // no table: unallocated, which shows the backing file; hide it
        if (ctx.backing && ctx.version === 3) await this.zero.zeroClusters(from, to, true);
        return false;
      },
    });
  }

  /**
   * A full discard of every cluster the active tree maps (QEMU's
   * make_empty, its slow path that works for every image kind): each entry
   * becomes unallocated, so what the backing file holds shows through
   * again, and its host cluster's reference is dropped (a cluster shared
   * with a snapshot stays for the snapshot). L2 tables stay.
   */
  async unallocateAll(): Promise<void> {
    const ctx = this.ctx;
    const t = ctx.t();
    await this.mapping.rewrite(guest(0), guest(ctx.header().size), ({ entry: e }) => (sameL2Entry(e, L2_UNALLOCATED) ? undefined : { next: L2_UNALLOCATED, unref: isCompressed(e) || Mapping.hasHostCluster(e, ctx.hasDataFile) }), {
      openTable: (l1Index) => t.l1TableOffset(l1Index) !== 0,
    });
  }

  private discardEntry({ entry: e }: WalkedEntry): EntryChange {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const compressed = isCompressed(e);
    const hasHost = Mapping.hasHostCluster(e, ctx.hasDataFile);
    if (!compressed && !hasHost) {
      const zeroFlag = g.extendedL2 ? e.bitmapHi >>> 0 === ALL_SUBCLUSTERS : (e.lo & L2E_ZERO_LO) !== 0;
      if (zeroFlag || !ctx.backing) return undefined; // reads as zero / as the backing file already
    }
    const next = ctx.version === 3 ? zeroEntry(g) : L2_UNALLOCATED;
    return { next, unref: compressed || hasHost };
  }
}
