/**
 * Guest data writes. Each cluster a write touches gets a plan from a pure
 * function of its L2 entry and the byte range written (in place, or into a
 * fresh cluster; exact, copy-on-write, or with the rest zeroed by the
 * device), then the plans of one L2 table's span are executed together:
 * data to the device first, then the L2 records, then the references the
 * old entries held are dropped.
 */

import { l1IndexOf, l2IndexOf, type Geometry } from '../../format/header.ts';
import { IoError, hex } from '../../errors.ts';
import { ALL_SUBCLUSTERS, L2E_ZERO_LO, isCompressed, isCopied, sameL2Entry, standardEntry, standardOffset, subclusterBits, subclusterType, type L2Entry } from '../../format/l2.ts';
import { cluster, guest, host, hostOf, type GuestOffset, type HostOffset } from '../../format/offsets.ts';
import { Buffer } from 'node:buffer';
import { readGuest } from '../read.ts';
import { uninitialized } from '../../format/bytes.ts';
import { Mapping } from './mapping.ts';
/** A whole cluster a span wrote, for dedup: its guest cluster, fingerprint, bytes, host cluster and update (-1: in place). */
interface SpanCluster {
  readonly gc: number;
  readonly fp: Fingerprint;
  readonly piece: Uint8Array;
  readonly at: HostOffset;
  readonly update: number;
}

/**
 * Guest bytes bound for the device: `what` for traces, the guest offset for a refusal's message (built only then).
 * The bytes are `data`, or `length` bytes of another device (`from`: a copy the kernel can make).
 */
export interface DataWrite {
  readonly offset: HostOffset;
  readonly data: Uint8Array | undefined;
  readonly from?: CopySource | undefined;
  readonly length: number;
  readonly what: string;
  readonly guest?: number | undefined;
}

/** Guest bytes that lie on another device: `device` from `offset` (a commit's source image's data clusters). */
export interface CopySource {
  readonly device: BlockDevice;
  readonly offset: number;
}
import type { Allocator } from './allocator.ts';
import type { BlockDevice } from '../../io/device.ts';
import type { WriteContext } from './context.ts';
import type { SharedClusters } from './shared.ts';
import type { Dedup } from './dedup.ts';
import { fingerprint, type Fingerprint } from '../dedup/fingerprint.ts';

/**
 * How the bytes of one cluster reach the device:
 *   piece         the guest's bytes at their place, nothing else
 *   cow           read the guest view of [from, to), overlay the guest's bytes, write it
 *   zero-buffer   a zero buffer of [from, to) with the guest's bytes, no read (nothing shows through)
 *   piece-zeroes  the guest's bytes, and the rest of the cluster made zero by the device
 *                 (fallocate where it can), unless the cluster lies past everything ever written
 */
export type Fill = 'piece' | 'cow' | 'zero-buffer' | 'piece-zeroes';

export interface ClusterPlan {
  /** into the entry's own host cluster (COPIED); else a fresh one */
  readonly inPlace: boolean;
  readonly fill: Fill;
  /** the byte range of the cluster the device write covers (piece fills: the guest's range) */
  readonly from: number;
  readonly to: number;
  /** in place: the entry afterwards (fresh: the bitmap halves below make the new entry) */
  readonly next: L2Entry | undefined;
  readonly bitmapLo: number;
  readonly bitmapHi: number;
  /** the old entry had data of its own (compressed or a shared host cluster): drop its reference after the record */
  readonly unrefOld: boolean;
  /** the entry cannot be written through (the message for signalCorruption) */
  readonly invalid: string | undefined;
}

/** The facts about the image a plan depends on. */
export interface PlanEnv {
  readonly geometry: Geometry;
  readonly hasDataFile: boolean;
  readonly hasBacking: boolean;
}

/** One plan object, always of the same shape (this runs for every cluster a write touches). */
function plan(inPlace: boolean, fill: Fill, from: number, to: number, bitmapLo: number, bitmapHi: number, unrefOld: boolean, next?: L2Entry, invalid?: string): ClusterPlan {
  return { inPlace, fill, from, to, next, bitmapLo, bitmapHi, unrefOld, invalid };
}

/** Plan the write of bytes [a, b) of the cluster whose entry is `e`. Pure. */
export function planClusterWrite(e: L2Entry, a: number, b: number, env: PlanEnv): ClusterPlan {
  const g = env.geometry;
  const cs = g.clusterSize;
  const sc = g.subclusterSize;
  const compressed = isCompressed(e);
  const copied = isCopied(e);
  const hasHost = !compressed && (standardOffset(e) !== 0 || (env.hasDataFile && copied));
  const s0 = Math.floor(a / sc);
  const s1 = Math.floor((b - 1) / sc);
  if (hasHost && copied) {
    // In place: this image owns the cluster alone. A partial subcluster at
    // either edge that does not hold data yet is completed from the guest view.
    const needCow =
      ((a !== s0 * sc || b < (s0 + 1) * sc) && subclusterType(e, s0, g, env.hasDataFile) !== 'normal') ||
      ((b !== (s1 + 1) * sc || a > s1 * sc) && subclusterType(e, s1, g, env.hasDataFile) !== 'normal');
    const m = subclusterBits(s0, s1);
    const next: L2Entry = g.extendedL2 ? { hi: e.hi, lo: e.lo, bitmapLo: (e.bitmapLo | m) >>> 0, bitmapHi: (e.bitmapHi & ~m) >>> 0 } : { hi: e.hi, lo: (e.lo & ~L2E_ZERO_LO) >>> 0, bitmapHi: e.bitmapHi, bitmapLo: e.bitmapLo };
    return needCow ? plan(true, 'cow', s0 * sc, (s1 + 1) * sc, 0, 0, false, next) : plan(true, 'piece', a, b, 0, 0, false, next);
  }
  // A fresh cluster: the entry is unallocated, zero, compressed or shared.
  const unrefOld = compressed || hasHost;
  if (g.extendedL2 && !unrefOld) {
    const m = subclusterBits(s0, s1);
    const hi = (e.bitmapHi & ~m) >>> 0;
    if ((e.bitmapLo >>> 0) !== 0) return plan(false, 'piece', s0 * sc, (s1 + 1) * sc, m, hi, unrefOld, undefined, 'invalid cluster entry found');
    return plan(false, s0 * sc === a && (s1 + 1) * sc === b ? 'piece' : 'cow', s0 * sc, (s1 + 1) * sc, m, hi, unrefOld);
  }
  const bitmapLo = g.extendedL2 ? ALL_SUBCLUSTERS : 0;
  if (a === 0 && b === cs) return plan(false, 'piece', 0, cs, bitmapLo, 0, unrefOld);
  const type = subclusterType(e, 0, g, env.hasDataFile);
  const readsZero = !g.extendedL2 && (type === 'zero-plain' || type === 'zero-alloc' || (type === 'unallocated-plain' && !env.hasBacking));
  if (readsZero && !env.hasDataFile) return plan(false, 'piece-zeroes', a, b, bitmapLo, 0, unrefOld);
  return plan(false, readsZero ? 'zero-buffer' : 'cow', 0, cs, bitmapLo, 0, unrefOld);
}

export class DataWriter {
  /** content dedup, when the session asked for it (write/dedup.ts) */
  dedup: Dedup | undefined;

  constructor(
    private readonly ctx: WriteContext,
    private readonly alloc: Allocator,
    private readonly mapping: Mapping,
    private readonly shared: SharedClusters,
  ) {}

  async write(offset: GuestOffset, data: Uint8Array): Promise<void> {
    const span = this.ctx.geometry.l2Entries * this.ctx.geometry.clusterSize;
    let pos = 0;
    while (pos < data.length) {
      const at = offset + pos;
      const n = Math.min(data.length - pos, span - (at % span));
      await this.writeSpan(guest(at), n, data.subarray(pos, pos + n), undefined);
      pos += n;
    }
  }

  /**
   * A write of `length` guest bytes that lie on another device: the plans
   * are those of a write of the bytes, and what reaches the image is a copy
   * from that device (in the kernel where both are files, FileDevice.copyFrom).
   * Only a copy-on-write fill reads a cluster's bytes; with dedup on, every
   * span's bytes are read, since fingerprints need them.
   */
  async writeFrom(offset: GuestOffset, length: number, from: CopySource): Promise<void> {
    const span = this.ctx.geometry.l2Entries * this.ctx.geometry.clusterSize;
    let pos = 0;
    while (pos < length) {
      const at = offset + pos;
      const n = Math.min(length - pos, span - (at % span));
      const src: CopySource = { device: from.device, offset: from.offset + pos };
      if (this.dedup) {
        const bytes = uninitialized(n);
        await src.device.readInto(bytes, src.offset);
        await this.writeSpan(guest(at), n, bytes, undefined);
      } else await this.writeSpan(guest(at), n, undefined, src);
      pos += n;
    }
  }

  /** A write inside one L2 table's span: `length` bytes, `data` or from `src`. */
  private async writeSpan(offset: GuestOffset, length: number, data: Uint8Array | undefined, src: CopySource | undefined): Promise<void> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const l1Index = l1IndexOf(g, offset);
    await this.mapping.l2ForWrite(l1Index);
    const table = ctx.t().l1TableOffset(l1Index);
    const env: PlanEnv = { geometry: g, hasDataFile: ctx.hasDataFile, hasBacking: ctx.backing !== undefined };
    const writes: DataWrite[] = [];
    const zeroes: Array<{ offset: number; length: number }> = [];
    const updates: Array<{ index: number; old: L2Entry; new: L2Entry; unref: boolean }> = [];
    /** clusters this span allocated, given back if the data cannot be written */
    const fresh: number[] = [];
    const end = offset + length;
    const dd = data ? this.dedup : undefined;
    /** dedup: whole clusters this span writes, to index once written (and to share within the span) */
    const written: SpanCluster[] | undefined = dd ? [] : undefined;
    /** dedup: the fingerprints of the span's whole clusters, by guest cluster */
    const fps = dd ? new Map<number, Fingerprint>() : undefined;
    /** dedup: the span's fresh whole clusters by fingerprint half, for sharing within the span */
    const byFp = dd ? new Map<number, SpanCluster[]>() : undefined;
    if (dd && fps && data) {
      const first = Math.ceil(offset / cs) * cs;
      dd.endSpan(); // nothing of an earlier span that failed half-way
      for (let c = first; c + cs <= offset + data.length; c += cs) fps.set(c / cs, fingerprint(data.subarray(c - offset, c - offset + cs)));
      if (fps.size) await dd.prefetch([...fps.values()]);
    }
    for (let cstart = guest(offset - (offset % cs)); cstart < end; cstart = guest(cstart + cs)) {
      const a = Math.max(offset, cstart) - cstart;
      const b = Math.min(end, cstart + cs) - cstart;
      const piece = data?.subarray(cstart + a - offset, cstart + b - offset);
      const pieceFrom = src && { device: src.device, offset: src.offset + (cstart + a - offset) };
      const index = l2IndexOf(g, cstart);
      const e = this.mapping.entry(l1Index, index);
      await this.mapping.validate(e, table, index, cstart);
      const p = planClusterWrite(e, a, b, env);
      if (p.invalid) await ctx.signalCorruption(`${p.invalid} (L2 offset: ${hex(table)}, L2 index: ${hex(index)})`);
      const fp = fps && a === 0 && b === cs ? fps.get(cstart / cs) : undefined;
      if (dd && written && byFp && fp && piece) {
        const gc = cstart / cs;
        const same = sameInSpan(byFp, piece, fp);
        if (same && dd.canTake(await this.alloc.refcount(cluster(same.at / cs)))) {
          // an earlier cluster of this span holds the same bytes: both map its fresh cluster
          const u = updates[same.update]!;
          if (isCopied(u.new)) updates[same.update] = { ...u, new: standardEntry(same.at, false, u.new.bitmapLo, u.new.bitmapHi) };
          await this.alloc.changeRefcount(cluster(same.at / cs), 1);
          this.shared.noteShare(cluster(same.at / cs), same.gc, gc);
          dd.counters.lookups++;
          dd.counters.shared++;
          updates.push({ index, old: e, new: standardEntry(same.at, false, u.new.bitmapLo, u.new.bitmapHi), unref: Mapping.hasHostCluster(e, false) || isCompressed(e) });
          dd.busy.add(gc);
          continue;
        }
        const m = await dd.lookup(e, piece, fp);
        if (m === 'unchanged') continue;
        dd.busy.add(gc);
        if (m) {
          const next = await dd.share(m, gc);
          updates.push({ index, old: e, new: next, unref: Mapping.hasHostCluster(e, false) || isCompressed(e) });
          continue;
        }
      } else if (dd) dd.busy.add(cstart / cs);
      let at: HostOffset;
      if (p.inPlace) {
        at = host(standardOffset(e));
        this.shared.written(at);
      } else if (ctx.hasDataFile) at = host(cstart);
      else {
        at = hostOf(await this.alloc.allocate(1, 'data'), cs);
        fresh.push(at / cs);
      }
      if (written && fp && piece) {
        const w: SpanCluster = { gc: cstart / cs, fp, piece, at, update: p.inPlace ? -1 : updates.length };
        written.push(w);
        if (w.update >= 0) {
          const list = byFp!.get(fp.hi);
          if (list) list.push(w);
          else byFp!.set(fp.hi, [w]);
        }
      }
      switch (p.fill) {
        case 'piece':
          writes.push({ offset: host(at + a), data: piece, from: pieceFrom, length: b - a, what: 'data', guest: cstart + a });
          break;
        case 'piece-zeroes':
          writes.push({ offset: host(at + a), data: piece, from: pieceFrom, length: b - a, what: 'data', guest: cstart + a });
          // past everything ever written, the rest of the cluster already reads as zero
          if (at < ctx.extent.zeroFrom) {
            if (a > 0) zeroes.push({ offset: at, length: a });
            if (b < cs) zeroes.push({ offset: at + b, length: cs - b });
          }
          break;
        case 'cow':
        case 'zero-buffer': {
          const buf = new Uint8Array(p.to - p.from);
          if (p.fill === 'cow') await readGuest(ctx.reader(), guest(cstart + p.from), buf);
          if (piece) buf.set(piece, a - p.from);
          else await pieceFrom!.device.readInto(buf.subarray(a - p.from, b - p.from), pieceFrom!.offset);
          writes.push({ offset: host(at + p.from), data: buf, length: buf.length, what: 'data (cow)', guest: cstart + p.from });
          break;
        }
      }
      const next = p.next ?? standardEntry(at, true, p.bitmapLo, p.bitmapHi);
      if (!p.inPlace || !sameL2Entry(e, next)) updates.push({ index, old: e, new: next, unref: p.unrefOld });
    }
    try {
      await this.deviceWrites(writes);
      for (const z of zeroes) {
        await ctx.files.guest.writeZeroes(z.offset, z.length, false);
        ctx.trace.write(z.offset, z.length, 'zeroes (cow)');
      }
      // no checksum covers the zeroes: the next write-back flushes before its frames
      if (zeroes.length) ctx.extent.noteDeviceChange();
    } catch (e) {
      // the device refused the data (a full disk, say): nothing maps the new clusters, so they go
      // back instead of leaking; the write fails, every earlier one stays
      dd?.endSpan();
      if (e instanceof IoError) for (const c of fresh) await this.alloc.changeRefcount(cluster(c), -1);
      throw e;
    }
    for (const u of updates) {
      this.mapping.set({ l1Index, index: u.index }, table, u.old, u.new);
      if (u.unref) await this.mapping.unref(u.old, { l1Index, index: u.index });
    }
    if (dd && written) {
      dd.endSpan();
      for (const w of written) dd.note(w.gc, w.fp);
    }
  }

  /** Device writes, merged where they are contiguous both on the device and in memory (or on the source device). */
  async deviceWrites(writes: DataWrite[]): Promise<void> {
    const ctx = this.ctx;
    const dev = ctx.files.guest;
    let i = 0;
    while (i < writes.length) {
      let cur = writes[i]!;
      let j = i + 1;
      while (j < writes.length) {
        const nx = writes[j]!;
        if (nx.offset !== cur.offset + cur.length) break;
        if (cur.data && nx.data) {
          if (nx.data.buffer !== cur.data.buffer || nx.data.byteOffset !== cur.data.byteOffset + cur.data.length) break;
          cur = { offset: cur.offset, data: new Uint8Array(cur.data.buffer, cur.data.byteOffset, cur.length + nx.length), length: cur.length + nx.length, what: cur.what, guest: cur.guest };
        } else if (cur.from && nx.from && !cur.data && !nx.data) {
          if (nx.from.device !== cur.from.device || nx.from.offset !== cur.from.offset + cur.length) break;
          cur = { offset: cur.offset, data: undefined, from: cur.from, length: cur.length + nx.length, what: cur.what, guest: cur.guest };
        } else break;
        j++;
      }
      // the overlap index checks it (overlap-guard.ts): guest data may touch no metadata; the
      // refusal's label is built only for a refusal (this is every guest write's path)
      const w = cur;
      const label = w.guest === undefined ? w.what : () => w.what.replace('data', `data for guest offset ${hex(w.guest!)}`);
      if (w.data) await dev.writeAs(w.offset, w.data, 0, label);
      else await dev.copyAs(w.from!.device, w.from!.offset, w.offset, w.length, 0, label);
      ctx.trace.record({ kind: 'data', host: cur.offset, length: cur.length });
      ctx.trace.write(cur.offset, cur.length, cur.what);
      ctx.extent.noteData(cur.offset, cur.length, !ctx.hasDataFile, cur.data);
      i = j;
    }
  }
}

/** A whole cluster written earlier in the span into a fresh cluster with the same bytes as `piece` (fingerprint `fp`), found by the fingerprint. */
function sameInSpan(byFp: Map<number, SpanCluster[]>, piece: Uint8Array, fp: Fingerprint): SpanCluster | undefined {
  for (const w of byFp.get(fp.hi) ?? []) {
    if (w.fp.lo !== fp.lo) continue;
    if (Buffer.from(w.piece.buffer, w.piece.byteOffset, w.piece.length).equals(Buffer.from(piece.buffer, piece.byteOffset, piece.length))) return w;
  }
  return undefined;
}
