/**
 * The check's stored refcounts: the refcount table's blocks read the way
 * QEMU's qcow2_get_refcount() reads them (see `Stored`), and the one change
 * a repair makes to them in place.
 */

import { hexDigits } from '../../errors.ts';
import { readAt, readClusters } from '../../io/device.ts';
import { getRefcount, setRefcount, refcountTableEntry, maxRefcount, refcountText } from '../../format/refcount.ts';
import type { Image } from './count.ts';

/**
 * The largest byte QEMU's block layer reads (BDRV_MAX_LENGTH, INT64_MAX
 * aligned down to 1 GiB): a refcount block reaching past it cannot be read,
 * and qemu-img reports each cluster it covers as a check error.
 */
export const BLOCK_LAYER_MAX = 2 ** 63 - 2 ** 30;

/** Refcount blocks past the file kept at once for COPIED lookups (QEMU's refcount cache is of the same order). */
const LATE_BLOCKS = 64;

/**
 * Stored refcounts, read through the refcount table the way QEMU's
 * qcow2_get_refcount() reads them, so that a damaged entry gives the same
 * counts: the reserved low bits are masked off, an empty entry means 0, an
 * unaligned entry or one past the block layer's limit cannot be read (a
 * check error per cluster, and no COPIED verdict), and a block past the end
 * of the file reads as zeros. `load` reads every readable refcount block
 * covering the file once (bounded by the file size); `get` is then
 * synchronous, so comparing a million clusters costs no I/O round trips.
 */
export class Stored {
  private readonly blocks = new Map<number, Uint8Array>();
  /** blocks `ensure` read for clusters past the file (at most LATE_BLOCKS, the oldest dropped first) */
  private readonly late = new Map<number, Uint8Array>();
  private readonly unreadableBlocks = new Set<number>();
  constructor(
    private readonly img: Image,
    readonly reftable: Uint8Array,
    private readonly fileSize: number,
  ) {}
  private entry(rt: number): number {
    if (rt * 8 >= this.reftable.length) return 0;
    return refcountTableEntry(this.reftable, rt).offset;
  }
  private readable(offset: number): boolean {
    const cs = this.img.g.clusterSize;
    return offset % cs === 0 && offset + cs <= BLOCK_LAYER_MAX;
  }
  /** Messages QEMU prints while reading (its corruption signal, printed once). */
  readonly notes: string[] = [];
  async load(nbClusters: number): Promise<void> {
    const { g, dev } = this.img;
    const cs = g.clusterSize;
    const E = g.refcountBlockEntries;
    const want = new Map<number, number>();
    for (let rt = 0; rt * E < nbClusters; rt++) {
      const off = this.entry(rt);
      if (!off) continue;
      if (this.readable(off)) {
        want.set(rt, off);
        continue;
      }
      this.unreadableBlocks.add(rt);
      this.noteUnaligned(off, rt);
    }
    // a block past the end of the file reads as zeros, as every device reads there
    const got = await readClusters(dev, want.values(), cs);
    // a private copy per block: two entries may name the same cluster
    for (const [rt, off] of want) this.blocks.set(rt, got.get(off)!.slice());
  }
  /**
   * Before `get` or `text` of a cluster past the clusters `load` covered
   * (an L1 or L2 entry naming a cluster past the file): read its block as
   * QEMU's qcow2_get_refcount reads any block the table names, inside the
   * file or past it (zeros there). Kept in a small cache: a hostile image
   * can name a block for every entry.
   */
  async ensure(cluster: number): Promise<void> {
    const { g, dev } = this.img;
    const rt = Math.floor(cluster / g.refcountBlockEntries);
    if (this.blocks.has(rt) || this.late.has(rt) || this.unreadableBlocks.has(rt)) return;
    const off = this.entry(rt);
    // none, or one `get` judges unreadable
    if (!off || !this.readable(off)) return;
    const b = await readAt(dev, off, g.clusterSize);
    if (this.late.size >= LATE_BLOCKS) this.late.delete(this.late.keys().next().value!);
    this.late.set(rt, b);
    if (rt === this.lastRt) this.lastRt = -1;
  }
  /** The loaded refcount block of refcount-table index `rt`, if any. */
  block(rt: number): Uint8Array | undefined {
    return this.blocks.get(rt);
  }
  /**
   * A block `load` did not look at (its clusters lie past the file): QEMU
   * judges its table entry when a lookup lands there (qcow2_get_refcount),
   * an unaligned or unreadable one failing with EIO and its corruption
   * signal printed, if no other was, at that moment.
   */
  private unreadableLate(rt: number): boolean {
    if (this.blocks.has(rt) || this.late.has(rt)) return false;
    const off = this.entry(rt);
    if (!off || this.readable(off)) return false;
    this.unreadableBlocks.add(rt);
    this.noteUnaligned(off, rt);
    return true;
  }
  /** QEMU's corruption signal for an unaligned refcount block, printed once for the image. */
  private noteUnaligned(off: number, rt: number): void {
    if (off % this.img.g.clusterSize !== 0 && !this.notes.length) {
      this.notes.push(`qcow2: Image is corrupt: Refblock offset 0x${hexDigits(off)} unaligned (reftable index: ${rt === 0 ? '0' : `0x${rt.toString(16)}`}); further non-fatal corruption events will be suppressed`);
    }
  }
  private taken = 0;
  /** The notes not taken yet, in order (each is printed where QEMU prints it). */
  takeNotes(): string[] {
    const n = this.notes.slice(this.taken);
    this.taken = this.notes.length;
    return n;
  }

  /** True when the block of refcount-table index `rt` cannot be read (QEMU: EIO). */
  unreadable(rt: number): boolean {
    return this.unreadableBlocks.has(rt);
  }
  /** The stored refcount of a cluster; undefined when its block cannot be read. */
  get(cluster: number): number | undefined {
    const g = this.img.g;
    const rt = Math.floor(cluster / g.refcountBlockEntries);
    // the last readable block's index first: the COPIED check asks about clusters in file order
    if (rt !== this.lastRt) {
      if (this.unreadableBlocks.has(rt) || this.unreadableLate(rt)) return undefined;
      this.lastRt = rt;
      this.lastBlock = this.blocks.get(rt) ?? this.late.get(rt);
    }
    const b = this.lastBlock;
    return b ? getRefcount(b, cluster - rt * g.refcountBlockEntries, g.refcountOrder) : 0;
  }
  // a readable block's index and its block (none: it reads as zeros); neither changes once known
  private lastRt = -1;
  private lastBlock: Uint8Array | undefined;
  /** The stored refcount of a cluster in decimal, exactly (for messages); undefined as `get`. */
  text(cluster: number): string | undefined {
    const g = this.img.g;
    const rt = Math.floor(cluster / g.refcountBlockEntries);
    if (this.unreadableBlocks.has(rt) || this.unreadableLate(rt)) return undefined;
    const b = this.blocks.get(rt) ?? this.late.get(rt);
    return b ? refcountText(b, cluster % g.refcountBlockEntries, g.refcountOrder) : '0';
  }
  /** Change a stored refcount on disk (its block must exist inside the file). */
  async set(cluster: number, value: number): Promise<boolean> {
    const g = this.img.g;
    const rt = Math.floor(cluster / g.refcountBlockEntries);
    const off = this.entry(rt);
    const b = this.blocks.get(rt);
    if (!off || !b || off + g.clusterSize > this.fileSize) return false;
    const i = cluster % g.refcountBlockEntries;
    setRefcount(b, i, g.refcountOrder, Math.min(value, maxRefcount(g.refcountOrder)));
    // write the sector holding the entry (refcount entries never straddle sectors)
    const byte = Math.floor((i * g.refcountBits) / 8);
    const sector = byte - (byte % 512);
    await this.img.dev.write(off + sector, b.subarray(sector, Math.min(sector + 512, b.length)));
    return true;
  }
}
