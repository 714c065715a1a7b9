/**
 * The zero clusters of the active tree expanded for a v2 image (qemu-img
 * amend -o compat=0.10, as QEMU's qcow2_expand_zero_clusters): v2 has no
 * zero flag. A plain zero cluster becomes unallocated where no backing
 * file shows through (v2 reads it as zero), else a cluster of zeros of its
 * own; an allocated zero cluster is zeroed in place and loses the flag.
 * The zeros reach the device before the entries change, so a crash reads
 * zeros either way. Tables with nothing to expand are not touched (not
 * even copied away from a snapshot).
 */

import { isCompressed, L2E_ZERO_LO, L2_UNALLOCATED, l2EntryAt, standardEntry, standardOffset, isCopied } from '../../format/l2.ts';
import { guest, hostOf } from '../../format/offsets.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { Mapping } from './mapping.ts';
import type { TableCache } from './tables.ts';

export class ZeroExpansion {
  constructor(
    private readonly ctx: WriteContext,
    private readonly tables: TableCache,
    private readonly alloc: Allocator,
    private readonly mapping: Mapping,
  ) {}

  /** Whether the table of L1 index `i` has a zero cluster (standard L2 entries: the zero flag is bit 0). */
  private async hasZero(i: number): Promise<boolean> {
    const t = this.ctx.t();
    const g = this.ctx.geometry;
    const T = t.l1TableOffset(i);
    if (T === 0) return false;
    const bytes = t.l2(i) ?? (await this.tables.loadL2(i, T));
    for (let j = 0; j < g.l2Entries; j++) {
      const e = l2EntryAt(bytes, j, g);
      if (!isCompressed(e) && (e.lo & L2E_ZERO_LO) !== 0) return true;
    }
    return false;
  }

  async run(): Promise<void> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    await this.mapping.rewrite(
      guest(0),
      guest(Math.ceil(ctx.header().size / cs) * cs),
      async ({ entry: e }) => {
        if (isCompressed(e) || (e.lo & L2E_ZERO_LO) === 0) return undefined;
        const off = standardOffset(e);
        if (off !== 0) {
          // allocated: zero it where it is (this image owns it, or the table was copied away from a snapshot's)
          await ctx.files.guest.writeZeroes(off, cs, false);
          ctx.trace.write(off, cs, 'zeroes (v2 expansion)');
          ctx.extent.noteDeviceChange();
          return { next: standardEntry(off, isCopied(e)), unref: false };
        }
        if (!ctx.backing) return { next: L2_UNALLOCATED, unref: false };
        const c = await this.alloc.allocate(1, 'data');
        await ctx.files.guest.writeZeroes(hostOf(c, cs), cs, false);
        ctx.trace.write(hostOf(c, cs), cs, 'zeroes (v2 expansion)');
        ctx.extent.noteDeviceChange();
        return { next: standardEntry(hostOf(c, cs), true), unref: false };
      },
      { openTable: (i) => this.hasZero(i) },
    );
  }
}
