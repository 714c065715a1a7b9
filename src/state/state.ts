/**
 * The immutable in-memory metadata state of one qcow2 image and its reducer.
 *
 * Small state (header fields) is an immer-produced frozen object. Tables are
 * raw on-disk bytes under persistent tries (ptrie.ts): the active L1 and the
 * refcount table in chunks of CHUNK_ENTRIES entries, L2 tables by L1 index,
 * refcount blocks by refcount-table index. Tables not loaded from disk yet
 * are simply absent; the engine loads them with `withLoaded` before it
 * emits records that touch them.
 *
 * `applyAll(state, records)` is one transaction: each table a record touches
 * is copied once, the first time, and later records of the same transaction
 * change that copy in place. `apply(state, record)` is a transaction of one.
 * Every record carries the old value it replaces; the reducer checks it, so a
 * record stream that does not fit the state is refused instead of applied.
 */

import { Immer } from 'immer';
import { QledgerError, hex } from '../errors.ts';
import type { Geometry } from '../format/header.ts';
import { u32, putU32 } from '../format/bytes.ts';
import { getRefcount, readRefcounts, reftableEntryOffset, setRefcount, writeRefcounts } from '../format/refcount.ts';
import { entryOffset } from '../format/l1.ts';
import { host, type ClusterIndex, type HostOffset } from '../format/offsets.ts';
import { l2EntryAt } from '../format/l2.ts';
import type { HeaderField, JournalRecord, L2Word, Word64 } from '../journal/records.ts';
import { PTrie, type TrieEditor } from './ptrie.ts';

/** Entries per L1 / refcount-table chunk: 64 KiB of 8-byte entries. */
export const CHUNK_ENTRIES = 8192;

/** autoFreeze on: the small state is tiny, so freezing it is cheap and catches stray writes. */
const immer = new Immer({ autoFreeze: true });

export interface HeaderState {
  readonly size: number;
  readonly l1TableOffset: number;
  readonly l1Size: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  /** the snapshot table: entries and where (header nb_snapshots, snapshots_offset) */
  readonly nbSnapshots: number;
  readonly snapshotsOffset: number;
  readonly incompatibleFeatures: bigint;
  readonly compatibleFeatures: bigint;
  readonly autoclearFeatures: bigint;
  /** the bitmaps header extension (nb_bitmaps, bitmap_directory_size, bitmap_directory_offset; 0 without one) */
  readonly nbBitmaps: number;
  readonly bitmapDirectorySize: number;
  readonly bitmapDirectoryOffset: number;
}

export interface MetaState {
  readonly geometry: Geometry;
  readonly header: HeaderState;
  readonly l1: PTrie<Uint8Array>;
  readonly reftable: PTrie<Uint8Array>;
  readonly l2: PTrie<Uint8Array>;
  readonly refblocks: PTrie<Uint8Array>;
}

export class RecordMismatchError extends QledgerError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('E_RECORD', message, data);
  }
}

const HEADER_KEY: Record<HeaderField, keyof HeaderState> = {
  size: 'size',
  nb_snapshots: 'nbSnapshots',
  snapshots_offset: 'snapshotsOffset',
  incompatible_features: 'incompatibleFeatures',
  compatible_features: 'compatibleFeatures',
  autoclear_features: 'autoclearFeatures',
  nb_bitmaps: 'nbBitmaps',
  bitmap_directory_size: 'bitmapDirectorySize',
  bitmap_directory_offset: 'bitmapDirectoryOffset',
};

/** Build the initial state from the header fields and the L1 and refcount tables as read from disk. */
export function initialState(geometry: Geometry, header: HeaderState, l1: Uint8Array, reftable: Uint8Array): MetaState {
  return {
    geometry,
    header: immer.produce(header, () => {}),
    l1: chunked(l1),
    reftable: chunked(reftable),
    l2: PTrie.empty(),
    refblocks: PTrie.empty(),
  };
}

function chunked(bytes: Uint8Array): PTrie<Uint8Array> {
  const e = PTrie.empty<Uint8Array>().edit();
  const cb = CHUNK_ENTRIES * 8;
  for (let i = 0; i * cb < bytes.length; i++) {
    const c = new Uint8Array(cb);
    c.set(bytes.subarray(i * cb, (i + 1) * cb));
    e.set(i, c);
  }
  return e.finish();
}

// ---- readers -------------------------------------------------------------

function entry(chunks: PTrie<Uint8Array>, index: number): Word64 {
  return chunkEntry(chunks.get(Math.floor(index / CHUNK_ENTRIES)), index);
}

function chunkEntry(c: Uint8Array | undefined, index: number): Word64 {
  if (!c) return { hi: 0, lo: 0 };
  const o = (index % CHUNK_ENTRIES) * 8;
  return { hi: u32(c, o), lo: u32(c, o + 4) };
}

export function l1Entry(s: MetaState, index: number): Word64 {
  return index < s.header.l1Size ? entry(s.l1, index) : { hi: 0, lo: 0 };
}

/** L2 table offset from L1 entry `index` (flags and reserved bits masked as QEMU does). */
export function l1TableOffset(s: MetaState, index: number): HostOffset {
  const e = l1Entry(s, index);
  return host(entryOffset(e.hi, e.lo));
}

/** Refcount block offset of refcount-table entry `index` (0: no block). */
export function reftableEntry(s: MetaState, index: number): HostOffset {
  if (index >= s.header.refcountTableClusters * (s.geometry.clusterSize / 8)) return host(0);
  const e = entry(s.reftable, index);
  return host(reftableEntryOffset(e.hi, e.lo));
}

/** The active L1 table as on-disk bytes (l1Size entries). */
export function l1Bytes(s: MetaState): Uint8Array {
  return tableBytes(s.l1, s.header.l1Size * 8);
}

/** The refcount table as on-disk bytes (refcountTableClusters clusters). */
export function reftableBytes(s: MetaState): Uint8Array {
  return tableBytes(s.reftable, s.header.refcountTableClusters * s.geometry.clusterSize);
}

function tableBytes(chunks: PTrie<Uint8Array>, length: number): Uint8Array {
  const out = new Uint8Array(length);
  const cb = CHUNK_ENTRIES * 8;
  for (const [i, c] of chunks.entries()) {
    if (i * cb >= length) break;
    out.set(c.subarray(0, Math.min(cb, length - i * cb)), i * cb);
  }
  return out;
}

/** Refcount of host cluster `cluster`, or undefined when its refcount block is not loaded. */
export function refcountOf(s: MetaState, cluster: ClusterIndex): number | undefined {
  const g = s.geometry;
  const rt = Math.floor(cluster / g.refcountBlockEntries);
  if (reftableEntry(s, rt) === 0) return 0;
  const block = s.refblocks.get(rt);
  if (!block) return undefined;
  return getRefcount(block, cluster % g.refcountBlockEntries, g.refcountOrder);
}

export const readL2Word: (table: Uint8Array, index: number, g: Geometry) => L2Word = l2EntryAt;

/** Add tables read from disk (not a change of metadata, so not a record). */
export function withLoaded(s: MetaState, role: 'l2' | 'refblock', slot: number, bytes: Uint8Array): MetaState {
  return role === 'l2' ? { ...s, l2: s.l2.set(slot, bytes) } : { ...s, refblocks: s.refblocks.set(slot, bytes) };
}

// ---- the reducer -----------------------------------------------------------

export function apply(s: MetaState, r: JournalRecord): MetaState {
  return applyAll(s, [r]);
}

export function applyAll(s: MetaState, records: Iterable<JournalRecord>): MetaState {
  const tx = new Transaction(s);
  for (const r of records) tx.apply(r);
  return tx.finish();
}

/** One transaction over a state: copy-on-first-write of each table it touches. */
export class Transaction {
  private readonly owned = new Set<Uint8Array>();
  private readonly l1: TrieEditor<Uint8Array>;
  private readonly reftable: TrieEditor<Uint8Array>;
  private readonly l2ed: TrieEditor<Uint8Array>;
  private readonly refblocks: TrieEditor<Uint8Array>;
  private readonly header0: HeaderState;
  private readonly headerPatch: Partial<Record<keyof HeaderState, number | bigint>> = {};
  private readonly g: Geometry;

  constructor(base: MetaState) {
    this.g = base.geometry;
    this.l1 = base.l1.edit();
    this.reftable = base.reftable.edit();
    this.l2ed = base.l2.edit();
    this.refblocks = base.refblocks.edit();
    this.header0 = base.header;
  }

  /** the table `own` returned last, per editor: a run of records on one table skips the trie */
  private lastEd: TrieEditor<Uint8Array> | undefined;
  private lastKey = -1;
  private lastTable: Uint8Array | undefined;

  private own(ed: TrieEditor<Uint8Array>, key: number, make?: () => Uint8Array): Uint8Array {
    if (ed === this.lastEd && key === this.lastKey && this.lastTable) return this.lastTable;
    const table = this.ownSlow(ed, key, make);
    this.lastEd = ed;
    this.lastKey = key;
    this.lastTable = table;
    return table;
  }

  private ownSlow(ed: TrieEditor<Uint8Array>, key: number, make?: () => Uint8Array): Uint8Array {
    const t = ed.get(key);
    if (t && this.owned.has(t)) return t;
    const copy = t ? t.slice() : make?.();
    if (!copy) throw new RecordMismatchError(`record touches table slot ${key}, which is not loaded`, { slot: key });
    this.owned.add(copy);
    ed.set(key, copy);
    return copy;
  }

  // Reads through the transaction: the engine allocates and maps while a
  // transaction is open, and must see its own earlier records.

  get header(): HeaderState {
    return Object.keys(this.headerPatch).length ? ({ ...this.header0, ...this.headerPatch } as HeaderState) : this.header0;
  }

  l2(slot: number): Uint8Array | undefined {
    return this.l2ed.get(slot);
  }

  refblock(rt: number): Uint8Array | undefined {
    return this.refblocks.get(rt);
  }

  l1Entry(index: number): Word64 {
    if (index >= this.hdr('l1Size')) return { hi: 0, lo: 0 };
    return chunkEntry(this.l1.get(Math.floor(index / CHUNK_ENTRIES)), index);
  }

  l1TableOffset(index: number): HostOffset {
    const e = this.l1Entry(index);
    return host(entryOffset(e.hi, e.lo));
  }

  reftableEntry(index: number): HostOffset {
    if (index >= this.hdr('refcountTableClusters') * (this.g.clusterSize / 8)) return host(0);
    const e = chunkEntry(this.reftable.get(Math.floor(index / CHUNK_ENTRIES)), index);
    return host(reftableEntryOffset(e.hi, e.lo));
  }

  refcount(cluster: ClusterIndex): number | undefined {
    const g = this.g;
    const rt = Math.floor(cluster / g.refcountBlockEntries);
    if (this.reftableEntry(rt) === 0) return 0;
    const block = this.refblocks.get(rt);
    return block ? getRefcount(block, cluster % g.refcountBlockEntries, g.refcountOrder) : undefined;
  }

  /** Slot `slot` no longer holds a table in this state (its L1 entry now names another, not loaded yet). */
  unload(slot: number): void {
    this.lastEd = undefined;
    this.l2ed.set(slot, undefined);
  }

  /** A table read from disk joins the state unchanged (not owned: the first record copies it). */
  load(role: 'l2' | 'refblock', slot: number, bytes: Uint8Array): void {
    this.lastEd = undefined;
    (role === 'l2' ? this.l2ed : this.refblocks).set(slot, bytes);
  }

  private hdr<K extends keyof HeaderState>(k: K): HeaderState[K] {
    return (k in this.headerPatch ? this.headerPatch[k] : this.header0[k]) as HeaderState[K];
  }

  apply(r: JournalRecord): void {
    const g = this.g;
    switch (r.kind) {
      case 'refcount': {
        const rt = Math.floor(r.cluster / g.refcountBlockEntries);
        const block = this.own(this.refblocks, rt);
        const i = r.cluster % g.refcountBlockEntries;
        const cur = getRefcount(block, i, g.refcountOrder);
        if (cur !== r.old) throw new RecordMismatchError(`refcount of cluster ${hex(r.cluster)} is ${cur}, record says ${r.old}`, { cluster: r.cluster });
        setRefcount(block, i, g.refcountOrder, r.new);
        return;
      }
      case 'refcounts': {
        const block = this.own(this.refblocks, r.rt);
        const order = g.refcountOrder;
        const ro = r.old;
        const cur = new Float64Array(r.index.length);
        readRefcounts(block, r.index, order, cur);
        for (let k = 0; k < cur.length; k++) {
          if (cur[k] === ro[k]) continue;
          const i = r.index[k]!;
          throw new RecordMismatchError(`refcount of cluster ${hex(r.rt * g.refcountBlockEntries + i)} is ${cur[k]}, record says ${r.old[k]}`, { cluster: r.rt * g.refcountBlockEntries + i });
        }
        writeRefcounts(block, r.index, order, r.new);
        return;
      }
      case 'l2s': {
        const t = this.own(this.l2ed, r.l1Index);
        const es = g.l2EntrySize;
        const words = g.extendedL2 ? 4 : 2;
        // a whole table's entries: one DataView, every entry checked before the first is changed
        const dv = new DataView(t.buffer, t.byteOffset, t.byteLength);
        // the record's arrays in locals: `r` has many shapes in this switch
        const ri = r.index;
        const ro = r.old;
        const rn = r.new;
        for (let k = 0; k < ri.length; k++) {
          const o = ri[k]! * es;
          for (let x = 0; x < words; x++) {
            if (dv.getUint32(o + 4 * x) === ro[k * 4 + x]) continue;
            throw new RecordMismatchError(`L2 entry ${ri[k]} of table ${hex(r.table)} does not hold the record's old value`, { table: r.table, index: ri[k] });
          }
        }
        for (let k = 0; k < ri.length; k++) {
          const o = ri[k]! * es;
          for (let x = 0; x < words; x++) dv.setUint32(o + 4 * x, rn[k * 4 + x]!);
        }
        return;
      }
      case 'l2': {
        const t = this.own(this.l2ed, r.l1Index);
        const o = r.index * g.l2EntrySize;
        const cur = readL2Word(t, r.index, g);
        if (cur.hi !== r.old.hi || cur.lo !== r.old.lo || cur.bitmapHi !== r.old.bitmapHi || cur.bitmapLo !== r.old.bitmapLo) {
          throw new RecordMismatchError(`L2 entry ${r.index} of table ${hex(r.table)} does not hold the record's old value`, { table: r.table, index: r.index });
        }
        putU32(t, o, r.new.hi);
        putU32(t, o + 4, r.new.lo);
        if (g.extendedL2) {
          putU32(t, o + 8, r.new.bitmapHi);
          putU32(t, o + 12, r.new.bitmapLo);
        }
        return;
      }
      case 'l1':
      case 'reftable': {
        const ed = r.kind === 'l1' ? this.l1 : this.reftable;
        const limit = r.kind === 'l1' ? this.hdr('l1Size') : this.hdr('refcountTableClusters') * (g.clusterSize / 8);
        if (r.index >= limit) throw new RecordMismatchError(`${r.kind} index ${r.index} is past the table's ${limit} entries`, { index: r.index });
        const c = this.own(ed, Math.floor(r.index / CHUNK_ENTRIES), () => new Uint8Array(CHUNK_ENTRIES * 8));
        const o = (r.index % CHUNK_ENTRIES) * 8;
        const [oh, ol, nh, nl] =
          r.kind === 'l1'
            ? [r.old.hi, r.old.lo, r.new.hi, r.new.lo]
            : [Math.floor(r.old / 0x1_0000_0000), r.old % 0x1_0000_0000, Math.floor(r.new / 0x1_0000_0000), r.new % 0x1_0000_0000];
        if (u32(c, o) !== oh || (r.kind === 'l1' ? u32(c, o + 4) : (u32(c, o + 4) & 0xffff_fe00) >>> 0) !== ol) {
          throw new RecordMismatchError(`${r.kind} entry ${r.index} does not hold the record's old value`, { index: r.index });
        }
        putU32(c, o, nh);
        putU32(c, o + 4, nl);
        return;
      }
      case 'l1-swap':
      case 'reftable-swap': {
        const isL1 = r.kind === 'l1-swap';
        const [offKey, sizeKey] = isL1 ? (['l1TableOffset', 'l1Size'] as const) : (['refcountTableOffset', 'refcountTableClusters'] as const);
        const oldSize = isL1 ? r.oldSize : r.oldClusters;
        const newSize = isL1 ? r.newSize : r.newClusters;
        if (this.hdr(offKey) !== r.oldOffset || this.hdr(sizeKey) !== oldSize) {
          throw new RecordMismatchError(`${r.kind}: the table is not at ${hex(r.oldOffset)} with size ${oldSize}`, { offset: r.oldOffset });
        }
        const entries = isL1 ? newSize : (newSize * g.clusterSize) / 8;
        const oldEntries = isL1 ? oldSize : (oldSize * g.clusterSize) / 8;
        if (entries < oldEntries) {
          // entries past the new end read as 0 if the table grows again
          const ed = isL1 ? this.l1 : this.reftable;
          for (let i = entries; i < oldEntries; i++) {
            const k = Math.floor(i / CHUNK_ENTRIES);
            if (!ed.get(k)) continue;
            const c = this.own(ed, k);
            c.fill(0, (i % CHUNK_ENTRIES) * 8, (i % CHUNK_ENTRIES) * 8 + 8);
          }
        }
        this.headerPatch[offKey] = r.newOffset;
        this.headerPatch[sizeKey] = newSize;
        return;
      }
      case 'table-new': {
        const ed = r.role === 'l2' ? this.l2ed : this.refblocks;
        let fresh: Uint8Array;
        if (r.copyOf !== 0) {
          const src = ed.get(r.slot);
          if (!src) throw new RecordMismatchError(`new ${r.role} at ${hex(r.offset)} copies slot ${r.slot}, which is not loaded`, { slot: r.slot });
          fresh = src.slice();
        } else {
          fresh = new Uint8Array(g.clusterSize);
        }
        this.owned.add(fresh);
        this.lastEd = undefined;
        ed.set(r.slot, fresh);
        return;
      }
      case 'header': {
        const k = HEADER_KEY[r.field];
        const cur = this.hdr(k);
        if (BigInt(cur) !== r.old) throw new RecordMismatchError(`header ${r.field} is 0x${cur.toString(16)}, record says 0x${r.old.toString(16)}`);
        this.headerPatch[k] = typeof cur === 'bigint' ? r.new : Number(r.new);
        return;
      }
      default:
        return; // markers change no metadata
    }
  }

  finish(): MetaState {
    const patch = this.headerPatch;
    const header = Object.keys(patch).length
      ? immer.produce(this.header0, (d) => {
          Object.assign(d, patch);
        })
      : this.header;
    return {
      geometry: this.g,
      header,
      l1: this.l1.finish(),
      reftable: this.reftable.finish(),
      l2: this.l2ed.finish(),
      refblocks: this.refblocks.finish(),
    };
  }
}
