/**
 * Changing the virtual size and preallocation. Shrinking drops every
 * mapping past the new end and unhooks whole L2 tables; growing moves the
 * L1 table to a bigger one when needed (by half again at least, as QEMU's
 * qcow2_grow_l1_table) and hides a longer backing file's data in the new
 * space. Preallocation maps clusters of a guest range ('metadata'),
 * reserves their blocks ('falloc') or writes zeros into them ('full').
 */

import { QledgerError } from '../../errors.ts';
import { ALL_SUBCLUSTERS, L2_UNALLOCATED, sameL2Entry, standardEntry } from '../../format/l2.ts';
import { MAX_L1_BYTES } from '../../format/limits.ts';
import { cluster, clusterOf, guest, host, hostOf, type GuestOffset, type HostOffset } from '../../format/offsets.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { Mapping } from './mapping.ts';
import type { ZeroWriter } from './zero.ts';

export type PreallocMode = 'metadata' | 'falloc' | 'full';

export class Resizer {
  constructor(
    private readonly ctx: WriteContext,
    private readonly alloc: Allocator,
    private readonly mapping: Mapping,
    private readonly zero: ZeroWriter,
  ) {}

  /** Set the virtual size to `size`; `hideBacking`: new space reads as zero, not as a longer backing file. */
  async resize(size: number, hideBacking: boolean): Promise<void> {
    const ctx = this.ctx;
    const t = ctx.t();
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const span = g.l2Entries * cs;
    const h = t.header;
    // QEMU resizes v3 images with snapshots (they keep their trees and sizes; tables shared
    // with them are copied before a shrink drops their entries), never v2 ones
    if (ctx.version === 2 && ctx.reader().snapshots.length) throw new QledgerError('E_UNSUPPORTED', `${ctx.filename}: Can't resize a v2 image which has snapshots`);
    if (size < h.size) {
      // drop everything past the new end (full discard: nothing reads back)
      await this.mapping.rewrite(guest(Math.ceil(size / cs) * cs), guest(h.size), () => ({ next: L2_UNALLOCATED, unref: true }), {
        openTable: (l1Index) => t.l1TableOffset(l1Index) !== 0,
        validate: false,
      });
      // tables wholly past the end: unhook and free them
      for (let l1Index = Math.ceil(size / span); l1Index * span < h.size; l1Index++) {
        const table = t.l1TableOffset(l1Index);
        if (table === 0) continue;
        ctx.emit({ kind: 'l1', index: l1Index, old: t.l1Entry(l1Index), new: { hi: 0, lo: 0 } });
        await this.alloc.changeRefcount(clusterOf(table, cs), -1);
      }
      ctx.emit({ kind: 'header', field: 'size', old: BigInt(h.size), new: BigInt(size) });
      return;
    }
    const needL1 = Math.ceil(size / span);
    // QEMU's words (qcow2_co_truncate); the L1 table it would need is past QCOW_MAX_L1_SIZE
    if (needL1 * 8 > MAX_L1_BYTES) throw new QledgerError('E_UNSUPPORTED', `${ctx.filename}: Failed to grow the L1 table: File too large (${size} bytes need an L1 table over ${MAX_L1_BYTES} bytes)`, { errno: 27, size });
    await this.growL1(needL1);
    ctx.emit({ kind: 'header', field: 'size', old: BigInt(h.size), new: BigInt(size) });
    // The new space must read as zero, not as whatever a longer backing file
    // holds there (QEMU does the same since 5.1).
    const b = ctx.backing;
    if (hideBacking && b && b.size > h.size) {
      ctx.reader().size = size;
      await this.zero.zeroRange(guest(h.size), Math.min(size, b.size) - h.size, false);
    }
  }

  /** Move the L1 table to a bigger one if it has fewer than `needL1` entries (by half again at least, as QEMU). */
  async growL1(needL1: number): Promise<void> {
    const ctx = this.ctx;
    const h = ctx.t().header;
    const cs = ctx.geometry.clusterSize;
    if (needL1 <= h.l1Size) return;
    const entries = h.l1Size === 0 ? needL1 : Math.max(needL1, Math.min(Math.floor(MAX_L1_BYTES / 8), Math.floor((h.l1Size * 3) / 2)));
    const at = await this.alloc.allocate(Math.ceil((entries * 8) / cs));
    const oldClusters = Math.ceil((h.l1Size * 8) / cs);
    ctx.emit({ kind: 'l1-swap', oldOffset: h.l1TableOffset, oldSize: h.l1Size, newOffset: at * cs, newSize: entries });
    const oldFirst = clusterOf(host(h.l1TableOffset), cs);
    if (h.l1Size > 0) for (let i = 0; i < oldClusters; i++) await this.alloc.changeRefcount(cluster(oldFirst + i), -1);
  }

  /**
   * Preallocate the clusters of guest range [from, size): `from` must be
   * cluster-aligned and the range unmapped. Over a backing file the
   * subclusters stay unallocated, so the backing data still shows.
   */
  async preallocate(mode: PreallocMode, from: GuestOffset): Promise<void> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const span = g.l2Entries * cs;
    const t = ctx.t();
    const size = ctx.header().size;
    for (let base = Math.floor(from / span) * span; base < size; base += span) {
      const l1Index = base / span;
      await this.mapping.l2ForWrite(l1Index);
      const table = t.l1TableOffset(l1Index);
      const firstIndex = Math.max(0, Math.floor((from - base) / cs));
      const n = Math.min(g.l2Entries, Math.ceil((size - base) / cs)) - firstIndex;
      if (n <= 0) continue;
      for (let i = firstIndex; i < firstIndex + n; i++) {
        if (!sameL2Entry(this.mapping.entry(l1Index, i), L2_UNALLOCATED)) {
          throw new QledgerError('E_UNSUPPORTED', `${ctx.filename}: preallocating over clusters that are already mapped is not supported`);
        }
      }
      const first = ctx.hasDataFile ? cluster(base / cs + firstIndex) : await this.alloc.allocate(n, 'data');
      const bitmapLo = g.extendedL2 && !ctx.backing ? ALL_SUBCLUSTERS : 0;
      for (let k = 0; k < n; k++) {
        const index = firstIndex + k;
        this.mapping.set({ l1Index, index }, table, this.mapping.entry(l1Index, index), standardEntry(hostOf(cluster(first + k), cs), true, bitmapLo));
      }
      await this.fill(mode, hostOf(first, cs), n * cs);
    }
  }

  /** The bytes behind preallocated clusters: zeros written ('full'), blocks reserved ('falloc'), or nothing. */
  private async fill(mode: PreallocMode, offset: HostOffset, length: number): Promise<void> {
    const ctx = this.ctx;
    const dev = ctx.hasDataFile ? ctx.files.guest : ctx.files.image;
    if (mode === 'full') {
      const zero = new Uint8Array(Math.min(length, 1 << 20));
      for (let o = 0; o < length; o += zero.length) {
        const len = Math.min(zero.length, length - o);
        await dev.write(offset + o, zero.subarray(0, len));
        ctx.trace.write(offset + o, len, 'preallocated zeroes');
      }
    } else if (mode === 'falloc') {
      // reserve the blocks (fallocate), as qemu-img does; zeros where that is not possible
      if (!(await dev.allocate?.(offset, length))) await dev.writeZeroes(offset, length, false);
    } else return;
    ctx.extent.noteDeviceChange();
  }
}
