/**
 * Metadata records: every change the write engine makes to qcow2 metadata is
 * one of these, in order. They name domain objects (a refcount, an L2 entry,
 * a table swap), carry the old and the new value, and are what the reducer
 * in src/state applies and what the ordering module persists. The binary
 * encoding is specified in journal-format.md ("Record encoding").
 *
 * Values are kept as the raw on-disk words (two unsigned 32-bit halves for a
 * 64-bit entry) so that flag bits such as COPIED survive without bigint.
 */

import { hex } from '../errors.ts';
import type { L2Entry } from '../format/l2.ts';

/** A 64-bit table entry as its two big-endian halves. */
export interface Word64 {
  readonly hi: number;
  readonly lo: number;
}

/** An L2 entry: descriptor words and, with extended L2, the subcluster bitmap words (format/l2.ts's one entry type). */
export type L2Word = L2Entry;

/** Header fields a header record can change. */
export type HeaderField =
  | 'size'
  | 'nb_snapshots'
  | 'snapshots_offset'
  | 'incompatible_features'
  | 'compatible_features'
  | 'autoclear_features'
  /** the bitmaps header extension's fields (persistent dirty bitmaps) */
  | 'nb_bitmaps'
  | 'bitmap_directory_size'
  | 'bitmap_directory_offset';

export type TableRole = 'l2' | 'refblock';

export type MetaRecord =
  /** Refcount of host cluster `cluster` goes from `old` to `new`. */
  | { readonly kind: 'refcount'; readonly cluster: number; readonly old: number; readonly new: number }
  /**
   * Refcounts of several clusters of refcount block `rt` at once (a tree's
   * worth: snapshots): cluster rt·entries + index[k] goes from old[k] to
   * new[k]. The same changes as that many 'refcount' records, in one.
   */
  | { readonly kind: 'refcounts'; readonly rt: number; readonly index: Uint32Array; readonly old: Float64Array; readonly new: Float64Array }
  /**
   * Several entries of one L2 table at once (a snapshot's COPIED changes):
   * entry index[k] goes from words old[4k..4k+3] to new[4k..4k+3] (hi, lo,
   * bitmapHi, bitmapLo). The same changes as that many 'l2' records.
   */
  | { readonly kind: 'l2s'; readonly l1Index: number; readonly table: number; readonly index: Uint32Array; readonly old: Uint32Array; readonly new: Uint32Array }
  /** Entry `index` of the L2 table at host offset `table` (the table of L1 index `l1Index`). */
  | { readonly kind: 'l2'; readonly l1Index: number; readonly table: number; readonly index: number; readonly old: L2Word; readonly new: L2Word }
  /** Entry `index` of the active L1 table. */
  | { readonly kind: 'l1'; readonly index: number; readonly old: Word64; readonly new: Word64 }
  /** The active L1 table moves: entries below min(oldSize, newSize) are kept, the rest read as 0. */
  | { readonly kind: 'l1-swap'; readonly oldOffset: number; readonly oldSize: number; readonly newOffset: number; readonly newSize: number }
  /** Entry `index` of the refcount table. */
  | { readonly kind: 'reftable'; readonly index: number; readonly old: number; readonly new: number }
  /** The refcount table moves (entries are kept, new ones read as 0). */
  | { readonly kind: 'reftable-swap'; readonly oldOffset: number; readonly oldClusters: number; readonly newOffset: number; readonly newClusters: number }
  /**
   * A table comes into existence at host offset `offset` in slot `slot` (an
   * L1 index for L2 tables, a refcount-table index for refcount blocks),
   * either zero-filled (`copyOf` 0) or as a copy of the table at `copyOf`.
   */
  | { readonly kind: 'table-new'; readonly role: TableRole; readonly slot: number; readonly offset: number; readonly copyOf: number }
  /** A header field changes. */
  | { readonly kind: 'header'; readonly field: HeaderField; readonly old: bigint; readonly new: bigint };

/** Markers that are part of an operation's trace but change no metadata. */
export type MarkerRecord =
  /** Guest data (or copy-on-write data) written at a host offset. */
  | { readonly kind: 'data'; readonly host: number; readonly length: number }
  /** A flush barrier: everything before it is durable before anything after it is written. */
  | { readonly kind: 'barrier' }
  /** Transaction boundaries: one guest operation. */
  | { readonly kind: 'begin'; readonly tx: number; readonly op: string }
  | { readonly kind: 'commit'; readonly tx: number };

/** Whole-table images a journal transaction carries so that recovery needs no table that may have been reused. */
export type ImageRole = 'l1' | 'reftable' | 'l2';

/** Records only the on-disk journal holds (the reducer never sees them). */
export type LogRecord =
  /** The final content of a table the transaction moved (L1, refcount table) or created as a copy (L2). */
  | { readonly kind: 'image'; readonly role: ImageRole; readonly offset: number; readonly bytes: Uint8Array }
  /** The write-back did not fit the journal: its records are not here, and recovery must count references instead. */
  | { readonly kind: 'unjournalled'; readonly records: number }
  /**
   * Guest bytes at `host` that went to the device since the last barrier and
   * share the transaction's flush instead of one of their own: the
   * transaction is complete only where they read back with this CRC-32.
   */
  | { readonly kind: 'data-crc'; readonly host: number; readonly length: number; readonly crc: number }
  /**
   * Guest bytes at `host` that share the transaction's flush, written into
   * clusters the transaction allocates (their refcounts rise from 0): the
   * refcount increments are written only after that flush, so while none
   * of the transaction's increments is on disk the flush may not have
   * completed, and nothing of the transaction is in place.
   */
  | { readonly kind: 'data-fresh'; readonly host: number; readonly length: number };

export type JournalRecord = MetaRecord | MarkerRecord | LogRecord;

/**
 * The batch records ('refcounts', 'l2s') as the per-entry records they
 * stand for, every other record as it is; `blockEntries` is the image's
 * refcount-block entry count (a batch names clusters within its block).
 */
export function* expandRecords(records: Iterable<JournalRecord>, blockEntries: number): Generator<JournalRecord> {
  for (const r of records) {
    if (r.kind === 'refcounts') {
      for (let k = 0; k < r.index.length; k++) yield { kind: 'refcount', cluster: r.rt * blockEntries + r.index[k]!, old: r.old[k]!, new: r.new[k]! };
    } else if (r.kind === 'l2s') {
      const word = (a: Uint32Array, k: number): L2Word => ({ hi: a[k * 4]!, lo: a[k * 4 + 1]!, bitmapHi: a[k * 4 + 2]!, bitmapLo: a[k * 4 + 3]! });
      for (let k = 0; k < r.index.length; k++) yield { kind: 'l2', l1Index: r.l1Index, table: r.table, index: r.index[k]!, old: word(r.old, k), new: word(r.new, k) };
    } else yield r;
  }
}

const w = (x: Word64) => '0x' + (x.hi >>> 0).toString(16).padStart(8, '0') + (x.lo >>> 0).toString(16).padStart(8, '0');

/** An entry that changes by its COPIED bit alone: its cluster becomes shared, or is left with one reference. */
function copiedNote(a: Word64, b: Word64): string {
  if (a.lo !== b.lo || ((a.hi ^ b.hi) >>> 0) !== 0x8000_0000) return '';
  return (b.hi & 0x8000_0000) === 0 ? ' (COPIED cleared: shared)' : ' (COPIED set: one reference left)';
}

/** One line per record, for traces, `journal dump` and failing-test output (shares and unshares marked). */
export function describe(r: JournalRecord): string {
  switch (r.kind) {
    case 'refcount':
      // a reference added to a cluster that had one (a snapshot or dedup shares it), or dropped leaving some
      return `refcount cluster ${hex(r.cluster)}: ${r.old} -> ${r.new}` + (r.old >= 1 && r.new > r.old ? ' (shared)' : r.new >= 1 && r.new < r.old ? ' (unshared)' : '');
    case 'l2':
      return `l2 table ${hex(r.table)} [${r.index}] (l1 ${r.l1Index}): ${w(r.old)} -> ${w(r.new)}` +
        (r.old.bitmapHi | r.old.bitmapLo | r.new.bitmapHi | r.new.bitmapLo ? ` bitmap ${w({ hi: r.old.bitmapHi, lo: r.old.bitmapLo })} -> ${w({ hi: r.new.bitmapHi, lo: r.new.bitmapLo })}` : '') +
        copiedNote(r.old, r.new);
    case 'refcounts':
      return `refcounts of ${r.index.length} clusters of refcount block ${r.rt}` + (r.index.length ? ` (first ${r.index[0]}: ${r.old[0]} -> ${r.new[0]})` : '');
    case 'l2s':
      return `l2 table ${hex(r.table)} (l1 ${r.l1Index}): ${r.index.length} entries` + (r.index.length ? ` (first [${r.index[0]}]: ${w({ hi: r.old[0]!, lo: r.old[1]! })} -> ${w({ hi: r.new[0]!, lo: r.new[1]! })})` : '');
    case 'l1':
      return `l1 [${r.index}]: ${w(r.old)} -> ${w(r.new)}`;
    case 'l1-swap':
      return `l1 swap ${hex(r.oldOffset)} (${r.oldSize} entries) -> ${hex(r.newOffset)} (${r.newSize} entries)`;
    case 'reftable':
      return `reftable [${r.index}]: ${hex(r.old)} -> ${hex(r.new)}`;
    case 'reftable-swap':
      return `reftable swap ${hex(r.oldOffset)} (${r.oldClusters} clusters) -> ${hex(r.newOffset)} (${r.newClusters} clusters)`;
    case 'table-new':
      return `new ${r.role} at ${hex(r.offset)} slot ${r.slot}${r.copyOf ? ` copy of ${hex(r.copyOf)}` : ''}`;
    case 'header':
      return `header ${r.field}: 0x${r.old.toString(16)} -> 0x${r.new.toString(16)}`;
    case 'data':
      return `data ${hex(r.host)} +${hex(r.length)}`;
    case 'barrier':
      return 'barrier';
    case 'begin':
      return `begin tx ${r.tx} ${r.op}`;
    case 'commit':
      return `commit tx ${r.tx}`;
    case 'image':
      return `image ${r.role} at ${hex(r.offset)} (${r.bytes.length} bytes)`;
    case 'unjournalled':
      return `unjournalled write-back of ${r.records} records`;
    case 'data-crc':
      return `data ${hex(r.host)} +${hex(r.length)} crc32 ${hex(r.crc)}`;
    case 'data-fresh':
      return `data ${hex(r.host)} +${hex(r.length)} in new clusters`;
  }
}
