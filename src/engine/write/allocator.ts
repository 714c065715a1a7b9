/**
 * Refcounts and allocation: reading and changing refcounts, finding free
 * clusters, placing new refcount blocks (each counting itself) and growing
 * the refcount table, the freed-not-durable rule, and giving freed space
 * back to the file system after the write-back that made the free durable.
 */

import { CorruptionError, QledgerError, hex } from '../../errors.ts';
import { MAX_REFTABLE_BYTES } from '../../format/limits.ts';
import { getRefcount, maxRefcount, nextZeroRefcount, readRefcounts, refcountStructureSize } from '../../format/refcount.ts';
import type { JournalRecord } from '../../journal/records.ts';
import { cluster, clusterOf, hostOf, type ClusterIndex, type HostOffset } from '../../format/offsets.ts';
import { refcountOf, reftableEntry } from '../../state/state.ts';
import type { WriteContext } from './context.ts';
import type { OverlapIndex } from './overlap.ts';
import type { FaultPlan } from '../faults.ts';
import type { TableCache } from './tables.ts';
import { groupByBlock } from './tree-refs.ts';

/** Free space below which new metadata clusters get their blocks at once (see reserveSpace). */
const RESERVE_BELOW = 1024 * 1024 * 1024;

export class Allocator {
  /** allocation search starts here (cluster index) */
  private cursor = cluster(0);
  /** lowest cluster freed since the last write-back: the search goes back there once it is durable */
  private freedMin = cluster(Infinity);
  /** clusters freed since the last write-back: untouchable until it, their space given back after it */
  private readonly freedSet = new Set<ClusterIndex>();
  /** clusters a batch record freed, not in the set yet: a tree's worth is a million, added on first question only */
  private freedBatch: number[] = [];

  /** The clusters freed since the last write-back. */
  private get freedInEpoch(): Set<ClusterIndex> {
    if (this.freedBatch.length) {
      for (const c of this.freedBatch) this.freedSet.add(cluster(c));
      this.freedBatch = [];
    }
    return this.freedSet;
  }

  constructor(
    private readonly ctx: WriteContext,
    private readonly tables: TableCache,
    private readonly overlap: OverlapIndex,
    /** test faults that break the allocator's rules (faults.ts) */
    private readonly faults: FaultPlan | undefined,
  ) {
    this.reuseFreedAtOnce = faults?.reuseFreedAtOnce ?? false;
    this.max = maxRefcount(ctx.geometry.refcountOrder);
  }

  /** Each cluster's refcount in the live state (0 where no block covers it), blocks looked up once per run. */
  async peekRefcounts(clusters: ArrayLike<number>, visit: (c: number, refcount: number) => void): Promise<void> {
    const t = this.ctx.t();
    const E = this.ctx.geometry.refcountBlockEntries;
    const order = this.ctx.geometry.refcountOrder;
    let rt = -1;
    let block: Uint8Array | undefined;
    for (let k = 0; k < clusters.length; k++) {
      const c = clusters[k]!;
      const r = Math.floor(c / E);
      if (r !== rt) {
        rt = r;
        const off = t.reftableEntry(rt);
        block = off === 0 ? undefined : await this.tables.refblock(rt, off);
      }
      visit(c, block ? getRefcount(block, c % E, order) : 0);
    }
  }

  /**
   * `delta` on the refcount of every cluster in `clusters` (a cluster listed
   * k times changes by k·delta): a tree's worth at once (snapshots), one
   * 'refcounts' record per refcount block, each block looked up once. All
   * of it is computed and checked before the first record, so a refusal
   * (a refcount past the width's maximum; with `referenced`, a cluster the
   * tree references whose refcount is 0) changes nothing. `onResult` sees
   * each cluster's new refcount, once per cluster.
   */
  async changeRefcounts(clusters: ArrayLike<number>, delta: number, o: { referenced?: boolean; onResult?: (c: number, refcount: number) => void } = {}): Promise<void> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const t = ctx.t();
    const E = g.refcountBlockEntries;
    const order = g.refcountOrder;
    const where = (c: number) => hex(hostOf(cluster(c), g.clusterSize));
    const out: Array<Extract<JournalRecord, { kind: 'refcounts' }>> = [];
    for (const grp of groupByBlock(clusters, E)) {
      const rt = grp.rt;
      const off = t.reftableEntry(rt);
      if (off === 0) {
        const c = rt * E + grp.index[0]!;
        if (delta < 0) await ctx.signalCorruption(`refcount of cluster ${where(c)} would drop below 0`, { cluster: c });
        throw new CorruptionError(`${ctx.filename}: cluster ${where(c)} is referenced but no refcount block covers it; run 'qledger check -r all'`, { cluster: c });
      }
      const block = await this.tables.refblock(rt, off);
      const m = grp.index.length;
      const old = new Float64Array(m);
      const next = new Float64Array(m);
      readRefcounts(block, grp.index, order, old);
      const k = addDelta(old, grp.times, delta, next, this.max, o.referenced === true);
      if (k < m) {
        // the first refused entry (each case below throws)
        const was = old[k]!;
        const now = next[k]!;
        const i = grp.index[k]!;
        const c = rt * E + i;
        if (was === 0 && o.referenced) throw new CorruptionError(`${ctx.filename}: cluster ${where(c)} is referenced but its refcount is 0; run 'qledger check -r all'`, { cluster: c });
        if (now < 0) await ctx.signalCorruption(`refcount of cluster ${where(c)} would drop below 0`, { cluster: c });
        if (now > this.max) throw new QledgerError('E_OVERFLOW', `${ctx.filename}: refcount of cluster ${where(c)} would exceed ${this.max} (refcount_bits=${g.refcountBits})`, { cluster: c, errno: 22 });
      }
      out.push({ kind: 'refcounts', rt, index: grp.index, old, new: next });
    }
    for (const r of out) {
      ctx.emit(r);
      if (o.onResult) eachResult(r.rt * E, r.index, r.new, o.onResult);
    }
  }

  /** test fault 'reuse-before-durable': a freed cluster may be reused at once */
  private readonly reuseFreedAtOnce: boolean;
  /** test fault 'reuse-freed-metadata': metadata clusters freed in this epoch, handed out at once */
  private readonly freedMetadata = new Set<ClusterIndex>();

  /** Follow the record stream: a cluster whose refcount drops to 0 is freed in this epoch. */
  follow(r: JournalRecord): void {
    if (r.kind === 'refcounts') {
      const E = this.ctx.geometry.refcountBlockEntries;
      const { index, old, new: next } = r;
      for (let k = 0; k < index.length; k++) {
        if (next[k] !== 0 || old[k] === 0) continue;
        const c = r.rt * E + index[k]!;
        if (this.reuseFreedAtOnce || this.faults?.reuseFreedMetadata) this.freed(cluster(c));
        else {
          this.freedBatch.push(c);
          if (c < this.freedMin) this.freedMin = cluster(c);
        }
      }
      return;
    }
    if (r.kind !== 'refcount' || r.new !== 0 || r.old === 0) return;
    this.freed(cluster(r.cluster));
  }

  private freed(c: ClusterIndex): void {
    this.freedInEpoch.add(c);
    if (c < this.freedMin) this.freedMin = c;
    if (this.reuseFreedAtOnce && c < this.cursor) this.cursor = c;
    if (this.faults?.reuseFreedMetadata && this.overlap.has(c)) this.freedMetadata.add(c);
  }

  /** Refcount of `cluster` in the live state; 0 where no refcount block exists. */
  async refcount(c: ClusterIndex): Promise<number> {
    const t = this.ctx.t();
    const rt = Math.floor(c / this.ctx.geometry.refcountBlockEntries);
    const off = t.reftableEntry(rt);
    if (off === 0) return 0;
    await this.tables.refblock(rt, off);
    return t.refcount(c)!;
  }

  /** the refcount width's maximum */
  private readonly max: number;

  async changeRefcount(c: ClusterIndex, delta: number): Promise<void> {
    const g = this.ctx.geometry;
    const old = await this.refcount(c);
    const next = old + delta;
    if (next < 0) await this.ctx.signalCorruption(`refcount of cluster ${hex(hostOf(c, g.clusterSize))} would drop below 0`, { cluster: c });
    const max = this.max;
    if (next > max) {
      throw new QledgerError('E_OVERFLOW', `${this.ctx.filename}: refcount of cluster ${hex(hostOf(c, g.clusterSize))} would exceed ${max} (refcount_bits=${g.refcountBits})`, { cluster: c });
    }
    this.ctx.emit({ kind: 'refcount', cluster: c, old, new: next });
  }

  /**
   * Allocate `n` contiguous free clusters and take a reference on each.
   * A cluster is free when its refcount is 0 both now and on disk: a cluster
   * freed since the last write-back stays untouched until it is durable.
   */
  async allocate(n: number, purpose: 'data' | 'table' = 'table'): Promise<ClusterIndex> {
    const ctx = this.ctx;
    const t = ctx.t();
    const wrong = this.faults?.wrongCluster(n, purpose, () => this.liveL2());
    if (wrong !== undefined) {
      // a broken allocator: it takes a reference on what it hands out, as a real one would
      await this.changeRefcount(cluster(wrong), 1);
      return cluster(wrong);
    }
    const E = ctx.geometry.refcountBlockEntries;
    let start: number = this.cursor;
    // test fault 'reuse-freed-metadata': the search goes back to a freed metadata cluster at once
    for (const c of this.freedMetadata) if (c < start) start = c;
    let run = 0;
    // the live and the durable block of the refcount-table index scanned last
    let scanRt = -1;
    let live: Uint8Array | undefined;
    let durableBlock: Uint8Array | undefined;
    const order = ctx.geometry.refcountOrder;
    while (run < n) {
      const c = cluster(start + run);
      const rt = Math.floor(c / E);
      if (rt === scanRt && live) {
        // the common case, a block already looked at: its bytes, no lookups
        const i = c % E;
        if (getRefcount(live, i, order) !== 0) {
          // a run of used clusters: skipped in one pass over the block's bytes
          start = rt * E + nextZeroRefcount(live, i, E, order);
          run = 0;
          continue;
        }
        const busy = (!this.reuseFreedAtOnce && ((durableBlock && getRefcount(durableBlock, i, order) !== 0) || this.freedInEpoch.has(c))) || this.overlap.has(c);
        if (busy && !this.freedMetadata.has(c)) {
          start = c + 1;
          run = 0;
        } else run++;
        continue;
      }
      const off = t.reftableEntry(rt);
      if (off === 0 && n > 1 && !this.overlap.has(c) && (await this.coverRun(c, start + n))) {
        // the blocks went past the run: c is covered now, and free; the run goes on
        continue;
      }
      if (off === 0) {
        // No refcount block covers c, so c is free (unless reserved: the journal
        // area has refcount 0 and may lie there): the new block goes there.
        const used = this.overlap.has(c) ? -1 : await this.newRefblock(rt, c);
        // negative: the clusters needed from c on run into reserved ones; go past them
        start = c + Math.abs(used);
        run = 0;
        continue;
      }
      await this.tables.refblock(rt, off);
      // a block this transaction has not copied yet is the same object in the live state until it does
      scanRt = this.freedMetadata.size === 0 ? rt : -1;
      live = t.refblock(rt);
      durableBlock = reftableEntry(ctx.durable, rt) === off ? ctx.durable.refblocks.get(rt) : undefined;
      if (this.freedMetadata.has(c)) {
        // test fault: a freed metadata cluster handed out again at once
        run++;
        continue;
      }
      if (t.refcount(c) !== 0 || this.freedNotDurable(c) || this.overlap.has(c)) {
        start = c + 1;
        run = 0;
        continue;
      }
      run++;
    }
    for (let i = 0; i < n; i++) {
      this.freedMetadata.delete(cluster(start + i));
      await this.changeRefcount(cluster(start + i), 1);
    }
    this.allocatedSince += n * ctx.geometry.clusterSize;
    if (purpose === 'table') await this.reserveSpace(start, n);
    // Single clusters move the cursor past everything scanned; a multi-cluster
    // run does not, so the holes it skipped stay for single allocations.
    if (n === 1 || start === this.cursor) this.cursor = cluster(start + n);
    ctx.extent.grow(start + n);
    return cluster(start);
  }

  /**
   * The first run of `n` free clusters below cluster `limit`, inside the
   * refcount blocks that exist (none is created to look), or undefined;
   * nothing changes. make_empty moves its tables down only into such a run
   * (allocateRun), so a look that finds nothing costs nothing.
   */
  async freeRunBelow(n: number, limit: number): Promise<ClusterIndex | undefined> {
    const ctx = this.ctx;
    const t = ctx.t();
    const E = ctx.geometry.refcountBlockEntries;
    let run = 0;
    // block by block: one load per refcount block, the clusters inside it looked at without awaiting
    for (let rt = 0; rt * E < limit; rt++) {
      const off = t.reftableEntry(rt);
      if (off === 0) {
        run = 0;
        continue;
      }
      await this.tables.refblock(rt, off);
      const block = t.refblock(rt)!;
      for (let c = Math.max(1, rt * E); c < Math.min(limit, (rt + 1) * E); c++) {
        const free = getRefcount(block, c % E, ctx.geometry.refcountOrder) === 0 && !this.freedNotDurable(cluster(c)) && !this.overlap.has(cluster(c));
        run = free ? run + 1 : 0;
        if (run === n) return cluster(c - n + 1);
      }
    }
    return undefined;
  }

  /** Take a reference on each cluster of the free run freeRunBelow found (a table goes there). */
  async allocateRun(start: ClusterIndex, n: number): Promise<void> {
    for (let i = 0; i < n; i++) {
      this.freedMetadata.delete(cluster(start + i));
      await this.changeRefcount(cluster(start + i), 1);
    }
    this.allocatedSince += n * this.ctx.geometry.clusterSize;
    await this.reserveSpace(start, n);
    this.ctx.extent.grow(start + n);
  }

  /** test fault 'alloc-live-l2': the cluster of the first L2 table the active L1 points at */
  private liveL2(): number | undefined {
    const t = this.ctx.t();
    const cs = this.ctx.geometry.clusterSize;
    for (let i = 0; i < t.header.l1Size; i++) {
      const off = t.l1TableOffset(i);
      if (off) return off / cs;
    }
    return undefined;
  }

  /**
   * Freed since the last write-back, so its old references may still be
   * durable. Lazy refcounts leave the durable refcount stale (0) there, so
   * the epoch's set is what tells.
   */
  private freedNotDurable(c: ClusterIndex): boolean {
    if (this.reuseFreedAtOnce) return false;
    return (refcountOf(this.ctx.durable, c) ?? 0) !== 0 || this.freedInEpoch.has(c);
  }

  /**
   * Reserve the file's blocks for new metadata clusters now (fallocate),
   * while guest data still has to find room: the write-back writes them
   * only at the next flush, and a disk filled by data in between would
   * fail that write-back, losing every write the guest was told is done
   * (QEMU keeps them). Only when space is short (below RESERVE_BELOW free):
   * reserved blocks change where the file system puts the data around them
   * (ext4 fills small gaps next to them with zeros), which a map of
   * allocation shows. Where the device cannot reserve or tell its free
   * space (no fallocate: the native helper missing; memory devices),
   * nothing is done. The free space is asked of the file system (statfs,
   * some 40 µs) only when what it said last, less what was allocated
   * since, could be near the threshold: not once per new L2 table.
   */
  private async reserveSpace(first: number, count: number): Promise<void> {
    const dev = this.ctx.files.image;
    if (this.freeSeen - this.allocatedSince < 2 * RESERVE_BELOW) {
      // a device that cannot tell is never asked again
      this.freeSeen = (await dev.available()) ?? Infinity;
      this.allocatedSince = 0;
    }
    if (this.freeSeen - this.allocatedSince > RESERVE_BELOW) return;
    const cs = this.ctx.geometry.clusterSize;
    await dev.allocate(first * cs, count * cs);
  }

  /** the device's free space when last asked (-Infinity: not asked yet), and the bytes allocated since */
  private freeSeen = -Infinity;
  private allocatedSince = 0;

  /**
   * For a run of clusters up to `end` that reaches `c`, the first cluster no
   * refcount block covers: the blocks for every region from c's to the
   * run's end, placed right after the run (where they count themselves),
   * instead of one inside each region (a block inside its own region breaks
   * any run longer than a region: an L1 table for 8 GiB at 1 KiB clusters
   * is 512 clusters, a region 512). False, having done nothing, when a
   * region on the way is covered already, the refcount table has no room
   * for the blocks, or a reserved cluster is in the way.
   */
  private async coverRun(c: ClusterIndex, end: number): Promise<boolean> {
    const ctx = this.ctx;
    const t = ctx.t();
    const cs = ctx.geometry.clusterSize;
    const E = ctx.geometry.refcountBlockEntries;
    const firstRt = Math.floor(c / E);
    let blocks = 1;
    while (Math.floor((end + blocks - 1) / E) - firstRt + 1 > blocks) blocks = Math.floor((end + blocks - 1) / E) - firstRt + 1;
    const entries = (t.header.refcountTableClusters * cs) / 8;
    if (firstRt + blocks > entries) return false;
    for (let k = 0; k < blocks; k++) if (t.reftableEntry(firstRt + k) !== 0) return false;
    for (let x = end; x < end + blocks; x++) if (this.overlap.has(cluster(x))) return false;
    await this.reserveSpace(end, blocks);
    for (let k = 0; k < blocks; k++) ctx.emit({ kind: 'table-new', role: 'refblock', slot: firstRt + k, offset: (end + k) * cs, copyOf: 0 });
    for (let k = 0; k < blocks; k++) ctx.emit({ kind: 'reftable', index: firstRt + k, old: 0, new: (end + k) * cs });
    for (let k = 0; k < blocks; k++) ctx.emit({ kind: 'refcount', cluster: end + k, old: 0, new: 1 });
    ctx.extent.grow(end + blocks);
    return true;
  }

  /**
   * A refcount block for refcount-table index `rt`, placed at free cluster
   * `c` inside the range it covers so that it counts itself. Grows the
   * refcount table first when `rt` is past its end. Returns the number of
   * clusters used from `c` on (negative: blocked by reserved clusters).
   */
  private async newRefblock(rt: number, c: ClusterIndex): Promise<number> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    const entries = (ctx.t().header.refcountTableClusters * cs) / 8;
    if (rt >= entries) return this.growReftable(rt, c);
    // before the record: from then on the index holds the cluster as a refcount block
    await this.reserveSpace(c, 1);
    ctx.emit({ kind: 'table-new', role: 'refblock', slot: rt, offset: hostOf(c, cs), copyOf: 0 });
    ctx.emit({ kind: 'refcount', cluster: c, old: 0, new: 1 });
    ctx.emit({ kind: 'reftable', index: rt, old: 0, new: hostOf(c, cs) });
    ctx.extent.grow(c + 1);
    return 1;
  }

  /**
   * Move the refcount table to a bigger one at `c`, with new refcount blocks
   * in front of it that count the blocks and the table themselves. All
   * clusters from `c` on are free: no block covers them. QEMU grows the
   * table by half again at least.
   */
  private async growReftable(rt: number, c: ClusterIndex): Promise<number> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const h = ctx.t().header;
    const firstRt = Math.floor(c / g.refcountBlockEntries);
    const old = h.refcountTableClusters;
    const { blocks, tableClusters } = refcountStructureSize(g, c, firstRt, rt + 1, Math.max(old + 1, old + Math.ceil(old / 2)));
    if (tableClusters * cs > MAX_REFTABLE_BYTES) {
      throw new QledgerError('E_UNSUPPORTED', `${ctx.filename}: the refcount table would exceed ${MAX_REFTABLE_BYTES} bytes`);
    }
    const tableAt = c + blocks;
    for (let x = c; x < tableAt + tableClusters; x++) if (this.overlap.has(cluster(x))) return -(x + 1 - c);
    await this.reserveSpace(c, blocks + tableClusters);
    for (let k = 0; k < blocks; k++) ctx.emit({ kind: 'table-new', role: 'refblock', slot: firstRt + k, offset: (c + k) * cs, copyOf: 0 });
    for (let x = c; x < tableAt + tableClusters; x++) ctx.emit({ kind: 'refcount', cluster: x, old: 0, new: 1 });
    ctx.emit({ kind: 'reftable-swap', oldOffset: h.refcountTableOffset, oldClusters: old, newOffset: tableAt * cs, newClusters: tableClusters });
    for (let k = 0; k < blocks; k++) ctx.emit({ kind: 'reftable', index: firstRt + k, old: 0, new: (c + k) * cs });
    const oldFirst = clusterOf(h.refcountTableOffset as HostOffset, cs);
    for (let i = 0; i < old; i++) await this.changeRefcount(cluster(oldFirst + i), -1);
    ctx.extent.grow(tableAt + tableClusters);
    return blocks + tableClusters;
  }

  /**
   * After a write-back: clusters freed in the epoch just made durable may be
   * reused, and their space goes back to the file system (QEMU's
   * discard=unmap): nothing references them any more, on disk or in memory,
   * and a later reuse rewrites them anyway. Adjacent clusters are one punch.
   */
  /**
   * The file cut after its last cluster in use (make_empty's file shrink, as
   * QEMU's fast path truncates): clusters past it hold no reference and no
   * structure the overlap index knows (the journal area among them). Run
   * after a write-back, when nothing pending can point there. Returns the
   * new length, or undefined when nothing could go.
   */
  async shrinkToUse(): Promise<number | undefined> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    const size = await ctx.files.image.size();
    const end = await this.inUseEnd(0);
    const c = end / cs - 1;
    if (end >= size) return undefined;
    await ctx.files.image.truncate(end);
    ctx.trace.truncate(end);
    ctx.extent.endCluster = Math.min(ctx.extent.endCluster, c + 1);
    ctx.extent.zeroFrom = Math.min(ctx.extent.zeroFrom, end);
    if (this.cursor > c + 1) this.cursor = cluster(c + 1);
    return end;
  }

  /**
   * The end of the last cluster in the file that holds a reference or a
   * structure the overlap index knows, but for the kinds in `ignore` (the
   * journal area, to see whether it is what keeps the file long).
   */
  async inUseEnd(ignore: number): Promise<number> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const E = g.refcountBlockEntries;
    const t = ctx.t();
    let c = Math.ceil((await ctx.files.image.size()) / g.clusterSize) - 1;
    // block by block from the end (an emptied image has a million free clusters to walk past)
    while (c > 0) {
      const rt = Math.floor(c / E);
      const off = t.reftableEntry(rt);
      const block = off === 0 ? undefined : (await this.tables.refblock(rt, off), t.refblock(rt));
      for (const first = rt * E; c >= first && c > 0; c--) {
        if ((this.overlap.at(cluster(c)) & ~ignore) !== 0 || (block !== undefined && getRefcount(block, c - first, g.refcountOrder) !== 0)) return (c + 1) * g.clusterSize;
      }
    }
    return (c + 1) * g.clusterSize;
  }

  async afterWriteback(): Promise<void> {
    const ctx = this.ctx;
    if (this.freedMin < this.cursor) this.cursor = this.freedMin;
    this.freedMin = cluster(Infinity);
    this.freedMetadata.clear();
    if (this.freedSet.size === 0 && this.freedBatch.length === 0) return;
    const cs = ctx.geometry.clusterSize;
    // the set and the batches as they are, without building a set of a million first
    const all = Float64Array.from([...this.freedSet, ...this.freedBatch]).sort();
    const free: number[] = [];
    for (let k = 0; k < all.length; k++) if ((k === 0 || all[k] !== all[k - 1]) && refcountOf(ctx.cur, cluster(all[k]!)) === 0) free.push(all[k]!);
    this.freedSet.clear();
    this.freedBatch = [];
    for (let i = 0; i < free.length; ) {
      let j = i + 1;
      while (j < free.length && free[j] === free[j - 1]! + 1) j++;
      if (this.held) this.held.push([free[i]!, j - i]);
      else {
        await ctx.files.image.discard(free[i]! * cs, (j - i) * cs);
        ctx.trace.write(free[i]! * cs, (j - i) * cs, 'hole (freed clusters)');
      }
      i = j;
    }
  }

  /** freed runs [cluster, count] whose punching waits (make_empty: the file is cut first) */
  private held: Array<[number, number]> | undefined;

  /** From now on, clusters freed by a write-back are punched out only at releaseDiscards. */
  holdDiscards(): void {
    this.held ??= [];
  }

  /**
   * Punch out the held runs that still lie inside the file and are still
   * free (make_empty: most of what it freed lies past the cut, which needs
   * no punch; a held cluster handed out again since, the moved L1 table
   * say, is not touched).
   */
  async releaseDiscards(): Promise<void> {
    const ctx = this.ctx;
    const held = this.held ?? [];
    this.held = undefined;
    const cs = ctx.geometry.clusterSize;
    const end = Math.floor((await ctx.files.image.size()) / cs);
    for (const [c0, n] of held) {
      for (let c = c0; c < Math.min(c0 + n, end); ) {
        if (refcountOf(ctx.cur, cluster(c)) !== 0 || this.overlap.has(cluster(c))) {
          c++;
          continue;
        }
        let k = c + 1;
        while (k < Math.min(c0 + n, end) && refcountOf(ctx.cur, cluster(k)) === 0 && !this.overlap.has(cluster(k))) k++;
        await ctx.files.image.discard(c * cs, (k - c) * cs);
        ctx.trace.write(c * cs, (k - c) * cs, 'hole (freed clusters)');
        c = k;
      }
    }
  }
}

// changeRefcounts' per-entry loops, as functions of their own: in its async body they would run
// unoptimised in a fresh process (a snapshot passes a million entries through them)

/**
 * next[k] = old[k] + times[k] * delta for every entry; the first k whose
 * result is refused (below 0, above `max`, or from 0 when `referenced`), or
 * the length when none is.
 */
function addDelta(old: Float64Array, times: Float64Array, delta: number, next: Float64Array, max: number, referenced: boolean): number {
  let bad = old.length;
  for (let k = 0; k < old.length; k++) {
    const was = old[k]!;
    const now = was + times[k]! * delta;
    next[k] = now;
    if (bad === old.length && ((was === 0 && referenced) || now < 0 || now > max)) bad = k;
  }
  return bad;
}

/** onResult(cluster, refcount) for every entry of a `refcounts` record */
function eachResult(base: number, index: Uint32Array, next: Float64Array, onResult: (c: number, refcount: number) => void): void {
  for (let k = 0; k < index.length; k++) onResult(base + index[k]!, next[k]!);
}
