/**
 * Online content deduplication (open option `dedup`): a guest write that
 * fills a whole cluster is fingerprinted, and a stored cluster with the
 * same fingerprint is compared byte for byte; if equal, the written
 * cluster's L2 entry maps that host cluster (its refcount goes up, COPIED
 * goes from its mapping first) and no data is written. Nothing changes in
 * the format: a shared cluster is what an internal snapshot makes, and
 * every qcow2 reader follows it. Unsharing is the engine's usual rule
 * (a write into a cluster without COPIED goes to a fresh one); the mapping
 * that is left alone gets COPIED back through the shared-cluster room.
 *
 * The index (dedup/dedup-index.ts) is built from the active tree the first
 * time a write needs it (every standard data cluster read once and
 * fingerprinted) and kept as writes go. It is never trusted: a candidate
 * is checked against the live L2 entry, its refcount and its bytes.
 */

import { Buffer } from 'node:buffer';
import { ALL_SUBCLUSTERS, L2E_COPIED_HI, L2E_ZERO_LO, isCompressed, isCopied, sameL2Entry, standardEntry, standardOffset, type L2Entry } from '../../format/l2.ts';
import { maxRefcount } from '../../format/refcount.ts';
import { readAt, readClusters } from '../../io/device.ts';
import { cluster, clusterOf, host, type HostOffset } from '../../format/offsets.ts';
import { DedupIndex } from '../dedup/dedup-index.ts';
import { fingerprint, type Fingerprint } from '../dedup/fingerprint.ts';
import type { BlockDevice } from '../../io/device.ts';
import type { ParsedHeader } from '../../format/header.ts';
import { loadDedupIndex, writeDedupIndex } from '../dedup/persist.ts';
import { OL_MAIN_HEADER } from './overlap.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { EntryAt, Mapping } from './mapping.ts';
import type { SharedClusters } from './shared.ts';
import type { TableCache } from './tables.ts';

/** What a dedup session did (the library and `qledger dedup` report it). */
export interface DedupCounters {
  /** whole-cluster writes (or, offline, clusters) looked up */
  lookups: number;
  /** ... that mapped an existing cluster instead of writing one */
  shared: number;
  /** ... whose cluster already held the same bytes (nothing to do) */
  unchanged: number;
  /** candidate clusters read to compare bytes */
  verifyReads: number;
  /** ... whose bytes differed (a fingerprint collision or stale entry) */
  mismatches: number;
  /** clusters read and fingerprinted to build the index */
  indexed: number;
  /** entries loaded from the persisted index instead */
  loaded: number;
}

/** A stored cluster equal to the written bytes. */
export interface DedupMatch {
  readonly host: HostOffset;
  /** the guest cluster whose mapping was found, and where its entry is */
  readonly owner: number;
  readonly at: EntryAt;
  readonly entry: L2Entry;
}

export class Dedup {
  private index: DedupIndex | undefined;
  readonly counters: DedupCounters = { lookups: 0, shared: 0, unchanged: 0, verifyReads: 0, mismatches: 0, indexed: 0, loaded: 0 };
  /** guest clusters the current span has planned (their entries change when it ends): no candidates */
  readonly busy = new Set<number>();
  private readonly max: number;

  constructor(
    private readonly ctx: WriteContext,
    private readonly tables: TableCache,
    private readonly alloc: Allocator,
    private readonly mapping: Mapping,
    private readonly shared: SharedClusters,
  ) {
    this.max = maxRefcount(ctx.geometry.refcountOrder);
  }

  /** Bytes the index holds (0 before it is built). */
  get indexBytes(): number {
    return this.index?.bytes ?? 0;
  }

  get indexEntries(): number {
    return this.index?.size ?? 0;
  }

  /** The entry maps a whole standard cluster of data (the only kind the index holds and shares). */
  private fullData(e: L2Entry): boolean {
    if (isCompressed(e) || standardOffset(e) === 0) return false;
    if (this.ctx.geometry.extendedL2) return e.bitmapLo >>> 0 === ALL_SUBCLUSTERS && e.bitmapHi >>> 0 === 0;
    return (e.lo & L2E_ZERO_LO) === 0;
  }

  /** An empty index sized for the image. */
  private newIndex(): DedupIndex {
    return new DedupIndex(Math.ceil(this.ctx.extent.end() / this.ctx.geometry.clusterSize));
  }

  /** Build the index from the whole active tree (the first lookup of a session does). */
  async build(): Promise<void> {
    this.index = this.newIndex();
    await this.scanTables(0, this.ctx.t().header.l1Size);
  }

  /**
   * Index the whole data clusters of the L2 tables of L1 entries [from,
   * to): each read (in runs of adjacent clusters) and fingerprinted.
   * `visit` (offline dedup) sees each, with its bytes, in guest order
   * before it is added, and says whether to add it.
   */
  private async scanTables(from: number, to: number, visit?: (gc: number, at: EntryAt, e: L2Entry, data: Uint8Array, fp: Fingerprint) => Promise<boolean>): Promise<void> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const t = ctx.t();
    const index = this.index!;
    const tablesAt: Array<[number, HostOffset]> = [];
    for (let i = from; i < to; i++) if (t.l1TableOffset(i)) tablesAt.push([i, t.l1TableOffset(i)]);
    const batch = Math.max(16, Math.floor((16 << 20) / cs));
    const sharedSeen = new Set<number>();
    for (let k = 0; k < tablesAt.length; k += 64) {
      const group = tablesAt.slice(k, k + 64);
      await this.tables.preloadL2(group);
      let pending: Array<{ gc: number; at: EntryAt; e: L2Entry }> = [];
      const flush = async () => {
        const data = await readClusters(ctx.files.image, pending.map((p) => standardOffset(p.e)), cs);
        const fps = pending.map((p) => fingerprint(data.get(standardOffset(p.e))!));
        if (visit) {
          // the candidates of the whole batch read ahead in runs, and the batch's own clusters kept
          await this.prefetch(fps);
          const ahead = this.prefetched ?? new Map<number, Uint8Array>();
          for (const [h, b] of data) ahead.set(h, b);
          this.prefetched = ahead;
        }
        for (let k = 0; k < pending.length; k++) {
          const p = pending[k]!;
          const bytes = data.get(standardOffset(p.e))!;
          const f = fps[k]!;
          this.counters.indexed++;
          if (visit && !(await visit(p.gc, p.at, p.e, bytes, f))) continue;
          index.add(f.hi, f.lo, p.gc);
        }
        this.prefetched = undefined;
        pending = [];
      };
      for (const [i] of group) {
        for (let j = 0; j < g.l2Entries; j++) {
          const e = this.mapping.entry(i, j);
          if (!this.fullData(e)) continue;
          if (!isCopied(e)) {
            // a cluster several entries map is read and indexed once (the set is bounded: past it, again)
            const h = standardOffset(e);
            if (sharedSeen.has(h)) continue;
            if (sharedSeen.size < 1 << 22) sharedSeen.add(h);
          }
          pending.push({ gc: i * g.l2Entries + j, at: { l1Index: i, index: j }, e });
          if (pending.length >= batch) await flush();
        }
      }
      if (pending.length) await flush();
    }
  }

  /**
   * Offline dedup of the L2 tables of L1 entries [from, to) (one
   * transaction; `qledger dedup` walks the L1 in steps): every whole data
   * cluster this image owns alone (COPIED) whose bytes a cluster seen
   * before holds maps that cluster instead, and its own is freed; every
   * other is indexed for the ones after it. Returns the clusters merged.
   */
  async mergeTables(from: number, to: number): Promise<number> {
    this.index ??= this.newIndex();
    const ctx = this.ctx;
    let merged = 0;
    await this.scanTables(from, to, async (gc, at, e, data, fp) => {
      if (!sameL2Entry(this.mapping.entry(at.l1Index, at.index), e)) return false;
      if (!isCopied(e)) return true; // shared already (a snapshot's, or merged before): others may join it
      const m = await this.lookup(e, data, fp);
      if (m === undefined) return true;
      if (m === 'unchanged') return false;
      const next = await this.share(m, gc);
      await this.mapping.l2ForWrite(at.l1Index);
      this.mapping.set(at, ctx.t().l1TableOffset(at.l1Index), e, next);
      await this.mapping.unref(e, at);
      merged++;
      return false;
    });
    return merged;
  }

  /** candidate clusters read ahead for the current span: host offset -> bytes */
  private prefetched: Map<number, Uint8Array> | undefined;

  /**
   * Read ahead the candidates of a span's whole clusters (their
   * fingerprints `fps`), in runs of adjacent clusters: a span that repeats
   * stored data then costs a few large reads, not one per cluster.
   */
  async prefetch(fps: readonly Fingerprint[]): Promise<void> {
    if (!this.index) await this.build();
    const ctx = this.ctx;
    const g = ctx.geometry;
    const t = ctx.t();
    const hosts: number[] = [];
    const cands = fps.map((fp) => this.index!.candidates(fp.hi, fp.lo, 2));
    // the candidates' L2 tables first (a new session has none loaded), all at once
    const want = new Map<number, HostOffset>();
    for (const list of cands) {
      for (const cand of list) {
        const l1Index = Math.floor(cand / g.l2Entries);
        const table = l1Index < t.header.l1Size ? t.l1TableOffset(l1Index) : 0;
        if (table && !t.l2(l1Index)) want.set(l1Index, table);
      }
    }
    if (want.size) await this.tables.preloadL2([...want]);
    for (const list of cands) {
      for (const cand of list) {
        const l1Index = Math.floor(cand / g.l2Entries);
        const table = l1Index < t.header.l1Size ? t.l1TableOffset(l1Index) : 0;
        if (!table || !t.l2(l1Index)) continue;
        const e = this.mapping.entry(l1Index, cand % g.l2Entries);
        if (this.fullData(e) && standardOffset(e) + g.clusterSize <= ctx.extent.end()) hosts.push(standardOffset(e));
      }
    }
    this.prefetched = hosts.length > 0 ? await readClusters(ctx.files.image, hosts, g.clusterSize) : undefined;
  }

  /** The span is done: what was read ahead goes. */
  endSpan(): void {
    this.prefetched = undefined;
    this.busy.clear();
  }

  /**
   * A stored cluster holding exactly `data` for the guest cluster whose
   * entry is `e`): 'unchanged' when its own cluster already holds it, a
   * match, or undefined. `fp` is the data's fingerprint.
   */
  async lookup(e: L2Entry, data: Uint8Array, fp: Fingerprint): Promise<DedupMatch | 'unchanged' | undefined> {
    if (!this.index) await this.build();
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const t = ctx.t();
    this.counters.lookups++;
    const own = this.fullData(e) ? standardOffset(e) : -1;
    const guestClusters = Math.ceil(ctx.header().size / cs);
    for (const cand of this.index!.candidates(fp.hi, fp.lo)) {
      if (this.busy.has(cand)) continue;
      const l1Index = Math.floor(cand / g.l2Entries);
      const index = cand % g.l2Entries;
      const table = cand < guestClusters && l1Index < t.header.l1Size ? t.l1TableOffset(l1Index) : 0;
      if (!table) {
        this.index!.remove(fp.hi, fp.lo, cand);
        continue;
      }
      if (!t.l2(l1Index)) await this.tables.loadL2(l1Index, table);
      const ce = this.mapping.entry(l1Index, index);
      if (!this.fullData(ce)) {
        this.index!.remove(fp.hi, fp.lo, cand);
        continue;
      }
      const h = standardOffset(ce);
      if (h + cs > ctx.extent.end()) continue;
      const rc = await this.alloc.refcount(clusterOf(host(h), cs));
      if (rc === 0) {
        this.index!.remove(fp.hi, fp.lo, cand);
        continue;
      }
      if (h !== own && rc >= this.max) continue;
      this.counters.verifyReads++;
      const stored = this.prefetched?.get(h) ?? (await readAt(ctx.files.image, h, cs));
      if (!Buffer.from(stored.buffer, stored.byteOffset, cs).equals(Buffer.from(data.buffer, data.byteOffset, data.length))) {
        this.counters.mismatches++;
        // a stale entry (the cluster holds other bytes now) goes; one that only shares the index's
        // key with these bytes (a collision) is right where it is, and stays
        if (!this.index!.sameKey(fingerprint(stored), fp)) this.index!.remove(fp.hi, fp.lo, cand);
        continue;
      }
      if (h === own) {
        this.counters.unchanged++;
        return 'unchanged';
      }
      return { host: host(h), owner: cand, at: { l1Index, index }, entry: ce };
    }
    return undefined;
  }

  /**
   * Take one more reference to the match's cluster for the entry at `at`
   * (guest cluster `gc`): COPIED leaves the found mapping first (its own
   * record, written before the increment), the refcount goes up, and the
   * shared-cluster room learns both mappings. Returns the new entry; the
   * caller records it and drops the old entry's reference.
   */
  async share(m: DedupMatch, gc: number): Promise<L2Entry> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    if (isCopied(m.entry)) {
      await this.mapping.l2ForWrite(m.at.l1Index);
      const table = ctx.t().l1TableOffset(m.at.l1Index);
      const cur = this.mapping.entry(m.at.l1Index, m.at.index);
      this.mapping.set(m.at, table, cur, { hi: (cur.hi & ~L2E_COPIED_HI) >>> 0, lo: cur.lo, bitmapLo: cur.bitmapLo, bitmapHi: cur.bitmapHi });
    }
    await this.alloc.changeRefcount(cluster(clusterOf(m.host, cs)), 1);
    this.shared.noteShare(clusterOf(m.host, cs), m.owner, gc);
    this.counters.shared++;
    return standardEntry(m.host, false, ctx.geometry.extendedL2 ? ALL_SUBCLUSTERS : 0, 0);
  }

  /** Guest cluster `gc` now holds data with fingerprint `fp` in a cluster of its own. */
  note(gc: number, fp: Fingerprint): void {
    this.index?.add(fp.hi, fp.lo, gc);
  }

  /** A cluster with this refcount can take one more reference. */
  canTake(refcount: number): boolean {
    return refcount < this.max;
  }

  /**
   * At open: the persisted index, when the autoclear bit says it matches
   * the image (dedup/persist.ts); its clusters are given back to the file
   * system at once (nothing counts them, and the next close writes anew).
   */
  async loadPersisted(dev: BlockDevice, parsed: ParsedHeader, fileSize: number, onWarning: ((m: string) => void) | undefined): Promise<void> {
    const r = await loadDedupIndex(dev, this.ctx.filename, parsed, fileSize);
    if (r.warning) onWarning?.(r.warning);
    if (r.index) {
      this.index = r.index;
      this.counters.loaded = r.index.size;
    }
    const cs = this.ctx.geometry.clusterSize;
    if (r.area) await this.ctx.files.image.discard(r.area.offset, Math.ceil(r.area.length / cs) * cs);
  }

  /**
   * At a clean close: write the index past everything the image uses and
   * name it in the header extension (each flushed). True when the caller
   * may set the autoclear bit; false when the header has no room.
   */
  async persist(): Promise<boolean> {
    const ctx = this.ctx;
    if (ctx.version !== 3) return false; // no autoclear bits in a v2 header: nothing could say the copy is current
    const cs = ctx.geometry.clusterSize;
    const at = Math.max(ctx.extent.endCluster, Math.ceil(ctx.extent.zeroFrom / cs)) * cs;
    const r = await writeDedupIndex(this.index!, at, { area: ctx.files.image, header: ctx.files.image.as(OL_MAIN_HEADER, 'dedup index extension', cs) }, ctx.extent.end(), cs);
    ctx.extent.noteData(at, r.length, true);
    if (r.movedName) await ctx.headerBits.reload();
    return r.written;
  }

  /** Whether the written cluster may be shared at all (the caller checks it is whole). */
  get ready(): boolean {
    return this.index !== undefined;
  }
}
