/**
 * The overlap index: which host clusters hold metadata, of which kinds, so
 * that no write lands on a structure it does not belong to (QEMU's overlap
 * checks, all nine kinds, plus qledger's bitmap tables and journal area).
 * Kinds are a bitmask in the order of QEMU's QCOW2_OL_* bits. The index is
 * built once at open from the tables (index-builder.ts) and then follows
 * the record stream only: new tables, L1 and refcount-table entries,
 * table moves, frees. A structure dropped from the live state keeps its
 * kind until the write-back that makes the drop durable, because the disk
 * still points at it until then (a freed L2 table reused as data at once
 * would corrupt the durable image). A check is one lookup in a
 * ClusterKinds (cluster-kinds.ts): O(log n) in the window's fragments.
 */

import { hex } from '../../errors.ts';
import { entryOffset } from '../../format/l1.ts';
import type { Geometry } from '../../format/header.ts';
import type { JournalRecord } from '../../journal/records.ts';
import type { ClusterIndex, HostOffset } from '../../format/offsets.ts';
import { ClusterKinds, type KindRun } from './cluster-kinds.ts';

export const OL_MAIN_HEADER = 1 << 0;
export const OL_ACTIVE_L1 = 1 << 1;
export const OL_ACTIVE_L2 = 1 << 2;
export const OL_REFCOUNT_TABLE = 1 << 3;
export const OL_REFCOUNT_BLOCK = 1 << 4;
export const OL_SNAPSHOT_TABLE = 1 << 5;
export const OL_INACTIVE_L1 = 1 << 6;
export const OL_INACTIVE_L2 = 1 << 7;
export const OL_BITMAP_DIRECTORY = 1 << 8;
/** qledger's journal area: refcount 0 (QEMU must not count it), so the allocator skips it by this index */
export const OL_JOURNAL = 1 << 9;
/** a persistent bitmap's table (QEMU has no kind for it; qledger checks it with the directory) */
export const OL_BITMAP_TABLE = 1 << 10;

/** Every kind at once (a freed cluster drops whatever it held; the header view may touch anything in cluster 0). */
export const ANY_KIND = 0xfff;

/** QEMU's overlap-check modes, by its names, and the kinds each checks (QCOW2_OL_CONSTANT, _CACHED, _ALL). */
export const OVERLAP_MODES = ['none', 'constant', 'cached', 'all'] as const;
export type OverlapMode = (typeof OVERLAP_MODES)[number];
const CONSTANT = OL_MAIN_HEADER | OL_ACTIVE_L1 | OL_REFCOUNT_TABLE | OL_SNAPSHOT_TABLE | OL_BITMAP_DIRECTORY | OL_BITMAP_TABLE | OL_JOURNAL;
const CACHED = CONSTANT | OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK | OL_INACTIVE_L1;
const ALL = CACHED | OL_INACTIVE_L2;
export const MODE_KINDS: Readonly<Record<OverlapMode, number>> = { none: 0, constant: CONSTANT, cached: CACHED, all: ALL };

export function isOverlapMode(s: string): s is OverlapMode {
  return (OVERLAP_MODES as readonly string[]).includes(s);
}

/** QEMU's names (metadata_ol_names), then qledger's own kinds. */
const NAMES: ReadonlyArray<readonly [number, string]> = [
  [OL_MAIN_HEADER, 'qcow2_header'],
  [OL_ACTIVE_L1, 'active L1 table'],
  [OL_ACTIVE_L2, 'active L2 table'],
  [OL_REFCOUNT_TABLE, 'refcount table'],
  [OL_REFCOUNT_BLOCK, 'refcount block'],
  [OL_SNAPSHOT_TABLE, 'snapshot table'],
  [OL_INACTIVE_L1, 'inactive L1 table'],
  [OL_INACTIVE_L2, 'inactive L2 table'],
  [OL_BITMAP_DIRECTORY, 'bitmap directory'],
  [OL_JOURNAL, 'journal'],
  [OL_BITMAP_TABLE, 'bitmap table'],
];

/** The name of the lowest kind in `kinds` (QEMU reports the lowest bit too). */
export function overlapName(kinds: number): string {
  for (const [bit, name] of NAMES) if (kinds & bit) return name;
  return 'metadata';
}

/** Every kind in `kinds`, by name. */
export function overlapNames(kinds: number): string[] {
  return NAMES.filter(([bit]) => kinds & bit).map(([, name]) => name);
}

/**
 * Kinds that may share a cluster: an L2 table both active and in a
 * snapshot (refcount 2 or more). Any other pair on one cluster is damage.
 */
const MAY_SHARE = OL_ACTIVE_L2 | OL_INACTIVE_L2;
export function isOverlap(kinds: number): boolean {
  const several = (kinds & (kinds - 1)) !== 0;
  return several && (kinds & ~MAY_SHARE) !== 0;
}

export interface OverlapHit {
  /** host offset of the cluster hit */
  readonly offset: HostOffset;
  /** every kind the cluster holds */
  readonly kinds: number;
  /** the kinds of it the write was not allowed to touch */
  readonly conflict: number;
}

export class OverlapIndex {
  private readonly map = new ClusterKinds();
  /** removals that wait for the write-back making them durable: cluster -> kinds */
  private pending = new Map<number, number>();
  private readonly cs: number;
  /** the kinds checked on every write (the mode) */
  readonly checked: number;
  /**
   * A structure the record stream placed on a cluster that holds another
   * (an allocator handing out live metadata, say): every write is refused
   * from then on, before anything reaches the device.
   */
  clash: string | undefined;

  /** refcount-block entries (a batch record names clusters within its block); 0: none expected */
  private readonly blockEntries: number;

  constructor(
    g: Pick<Geometry, 'clusterSize'> & Partial<Pick<Geometry, 'refcountBlockEntries'>>,
    readonly mode: OverlapMode = 'all',
  ) {
    this.cs = g.clusterSize;
    this.blockEntries = g.refcountBlockEntries ?? 0;
    this.checked = MODE_KINDS[mode];
  }

  /** Build from the structures found at open (replaces everything). */
  load(runs: Iterable<KindRun>): void {
    this.map.load(runs);
    this.pending.clear();
  }

  private span(offset: number, bytes: number): [number, number] {
    const first = Math.floor(offset / this.cs);
    return [first, Math.max(1, Math.ceil((offset + bytes) / this.cs) - first)];
  }

  /** The clusters of byte range [offset, offset + bytes) hold `kind` (now). */
  reserve(offset: HostOffset, bytes: number, kind: number): void {
    if (bytes <= 0) return;
    const [first, count] = this.span(offset, bytes);
    this.map.add(first, count, kind);
    if (this.pending.size) {
      for (let c = first; c < first + count; c++) {
        const p = this.pending.get(c);
        if (p === undefined) continue;
        if (p & ~kind) this.pending.set(c, p & ~kind);
        else this.pending.delete(c);
      }
    }
  }

  /** The clusters of [offset, offset + bytes) stop holding `kind` now (a reservation nothing on disk ever named). */
  unreserve(offset: HostOffset, bytes: number, kind: number): void {
    if (bytes <= 0) return;
    const [first, count] = this.span(offset, bytes);
    this.map.remove(first, count, kind);
  }

  /** The clusters of [offset, offset + bytes) stop holding `kind` once the next write-back is durable. */
  releaseLater(offset: HostOffset, bytes: number, kind: number): void {
    if (bytes <= 0) return;
    const [first, count] = this.span(offset, bytes);
    for (let c = first; c < first + count; c++) this.pending.set(c, (this.pending.get(c) ?? 0) | kind);
  }

  /** A write-back made the live state durable: the removals it carried take effect. */
  durable(): void {
    for (const [c, kinds] of this.pending) this.map.remove(c, 1, kinds);
    this.pending.clear();
  }

  /** The kinds of metadata in host cluster `c` (0: none), pending removals included. */
  at(c: ClusterIndex): number {
    return this.map.at(c);
  }

  has(c: ClusterIndex): boolean {
    return this.map.at(c) !== 0;
  }

  /**
   * The first cluster of [offset, offset + bytes) holding a checked kind the
   * write is not `allowed` to touch, or undefined. The mode decides which
   * kinds are checked.
   */
  conflict(offset: number, bytes: number, allowed: number): OverlapHit | undefined {
    const mask = this.checked & ~allowed;
    if (mask === 0 || bytes <= 0) return undefined;
    // the hot path of every write: no tuple, no allocation unless there is a hit
    let first = Math.floor(offset / this.cs);
    const end = Math.ceil((offset + bytes) / this.cs);
    for (;;) {
      const hit = this.map.find(first, end - first, mask);
      if (!hit) return undefined;
      // an active L2 table's write may touch it where a snapshot shares it (both kinds on one cluster)
      const shared = (allowed & OL_ACTIVE_L2) !== 0 && (hit.bits & OL_ACTIVE_L2) !== 0 && (hit.bits & mask) === OL_INACTIVE_L2;
      if (!shared) return { offset: (hit.cluster * this.cs) as HostOffset, kinds: hit.bits, conflict: hit.bits & mask };
      first = hit.cluster + 1;
    }
  }

  /** The first cluster holding two structures that may not share one, or undefined. */
  firstOverlap(): { offset: HostOffset; kinds: number } | undefined {
    for (const r of this.map.runs()) if (isOverlap(r.bits)) return { offset: (r.first * this.cs) as HostOffset, kinds: r.bits };
    return undefined;
  }

  /** Memory the index holds, in bytes (see ClusterKinds.bytes). */
  bytes(): number {
    return this.map.bytes() + 64 + this.pending.size * 40;
  }

  get fragments(): number {
    return this.map.fragments;
  }

  /**
   * A record places `kind` on [offset, offset + bytes): if a checked kind
   * outside `allowed` is there already, remember the clash (the first one).
   */
  private claim(offset: number, bytes: number, kind: number, allowed: number, what: string): void {
    const hit = this.clash === undefined ? this.conflict(offset, bytes, allowed) : undefined;
    if (hit) this.clash = `Preventing invalid write on metadata (overlaps with ${overlapName(hit.conflict)}): a new ${what} at ${hex(offset)} was placed on the ${overlapName(hit.conflict)} at ${hex(hit.offset)}`;
    this.reserve(offset as HostOffset, bytes, kind);
  }

  /** Follow one record of the stream (the context's subscriber). */
  follow(r: JournalRecord): void {
    const cs = this.cs;
    switch (r.kind) {
      case 'table-new':
        // a new table may land on nothing that is metadata
        if (r.role === 'l2') this.claim(r.offset, cs, OL_ACTIVE_L2, 0, 'L2 table');
        else this.claim(r.offset, cs, OL_REFCOUNT_BLOCK, 0, 'refcount block');
        break;
      case 'l1': {
        const was = entryOffset(r.old.hi, r.old.lo);
        const now = entryOffset(r.new.hi, r.new.lo);
        if (was === now) break;
        if (was) this.releaseLater(was as HostOffset, cs, OL_ACTIVE_L2);
        // an L1 entry may point at a table shared with a snapshot
        if (now) this.claim(now, cs, OL_ACTIVE_L2, OL_ACTIVE_L2 | OL_INACTIVE_L2, 'L1 entry\'s L2 table');
        break;
      }
      case 'reftable':
        if (r.old === r.new) break;
        if (r.old) this.releaseLater(r.old as HostOffset, cs, OL_REFCOUNT_BLOCK);
        if (r.new) this.claim(r.new, cs, OL_REFCOUNT_BLOCK, OL_REFCOUNT_BLOCK, 'refcount-table entry\'s block');
        break;
      case 'l1-swap':
        this.releaseLater(r.oldOffset as HostOffset, r.oldSize * 8, OL_ACTIVE_L1);
        this.claim(r.newOffset, r.newSize * 8, OL_ACTIVE_L1, 0, 'L1 table');
        break;
      case 'reftable-swap':
        this.releaseLater(r.oldOffset as HostOffset, r.oldClusters * cs, OL_REFCOUNT_TABLE);
        this.claim(r.newOffset, r.newClusters * cs, OL_REFCOUNT_TABLE, 0, 'refcount table');
        break;
      case 'refcount':
        // a freed cluster holds nothing any more, whatever it held, once the free is durable
        if (r.new === 0 && r.old > 0) this.releaseLater((r.cluster * cs) as HostOffset, cs, ANY_KIND);
        break;
      case 'refcounts':
        // a tree's worth of data clusters: only those that hold metadata have anything to release
        for (let k = 0, { index, old, new: next } = r; k < index.length; k++) {
          if (next[k] !== 0 || old[k] === 0) continue;
          const c = r.rt * this.blockEntries + index[k]!;
          if (this.map.at(c) !== 0) this.releaseLater((c * cs) as HostOffset, cs, ANY_KIND);
        }
        break;
      default:
        break;
    }
  }

  /** QEMU's message for a refused write, naming the write and the structure. */
  static message(hit: OverlapHit, what: string, offset: number, bytes: number): string {
    const others = overlapNames(hit.kinds & ~hit.conflict);
    const also = others.length ? `, also ${others.join(', ')}` : '';
    return `Preventing invalid write on metadata (overlaps with ${overlapName(hit.conflict)}): ${what} at ${hex(offset)} (${bytes} bytes) would overwrite the ${overlapName(hit.conflict)} at ${hex(hit.offset)}${also}`;
  }
}
