/**
 * Journal recovery on a read-write open: replay the one committed
 * transaction the checkpoint does not cover. Records carry absolute new
 * values, so replay computes the final value of every entry the
 * transaction touched and writes it in place, in the same four ordered
 * phases as a write-back (ordering.ts builds and runs them): a crash during
 * recovery leaves at worst leaks, and recovery simply runs again. Before
 * writing, every touched entry on disk must hold the value the transaction
 * started from or the one it ended with (or, for a refcount, the ordering
 * module's intermediate bound); anything else means the journal does not
 * describe this image, and it is ignored with a warning.
 */

import { hex } from '../../errors.ts';
import { host } from '../../format/offsets.ts';
import { putU64, u32, u64, u64big } from '../../format/bytes.ts';
import { AUTOCLEAR_BITMAPS, AUTOCLEAR_JOURNAL, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../../format/features.ts';
import { fixedHeaderLength, geometryOf, putMutableFields, type ParsedHeader } from '../../format/header.ts';
import { decodeL1Entry, entryOffset, l1Offset } from '../../format/l1.ts';
import { isCompressed, isCopied, l2EntryAt, sameL2Entry, standardOffset, standardReservedBits, writeL2Entry, type L2Entry } from '../../format/l2.ts';
import { getRefcount, maxRefcount, refcountTableEntry, setRefcount } from '../../format/refcount.ts';
import { readAt, readClusters, type BlockDevice } from '../../io/device.ts';
import { crc32, type JournalTransaction } from '../../journal/log.ts';
import { expandRecords, type HeaderField } from '../../journal/records.ts';
import { encodeBitmapsExtension } from '../../format/bitmaps.ts';
import { PhaseLists, executePlan, type Phase } from '../ordering.ts';
import { dirtySectors, padSector } from '../device-writes.ts';
import { checkpoint } from './live.ts';
import type { SnapshotEntry } from '../../format/snapshot.ts';
import { OL_ACTIVE_L1, OL_ACTIVE_L2, OL_MAIN_HEADER, OL_REFCOUNT_BLOCK, OL_REFCOUNT_TABLE, OverlapIndex, overlapName, overlapNames } from '../write/overlap.ts';
import { buildOverlapIndex } from '../write/overlap-build.ts';
import { validateTables } from '../write/open-checks.ts';
import { readBitmapDirectory } from '../write/bitmaps.ts';
import { locateJournal, type JournalView, type Located } from './locate.ts';
import { DATA_RANGES_MAX } from '../write/context.ts';

export interface RecoveryReport {
  /** 'replayed': a committed transaction was completed in place; 'scan': the
   * transaction was too big for the journal and references must be counted;
   * 'ignored': a journal was found but not trusted (see warnings);
   * 'dropped': the transaction's own flush never completed (the data that
   * shared it does not read back), so none of it is in place */
  readonly action: 'none' | 'replayed' | 'scan' | 'ignored' | 'dropped';
  readonly tx?: number | undefined;
  readonly records?: number | undefined;
  /** device writes recovery made */
  readonly writes: number;
  readonly warnings: readonly string[];
}

/**
 * Run on a read-write open, before anything else writes: replay the
 * committed transaction that the checkpoint does not cover, if the journal
 * is live (autoclear bit set), valid and consistent with the image.
 */
export async function recoverJournal(
  dev: BlockDevice,
  name: string,
  parsed: ParsedHeader,
  fileSize: number,
  located?: Located,
  /** the image's snapshots, for the overlap check of the replay's writes */
  snapshots: { readonly entries: readonly SnapshotEntry[]; readonly tableBytes: number } = { entries: [], tableBytes: 0 },
): Promise<RecoveryReport> {
  const h = parsed.header;
  const none: RecoveryReport = { action: 'none', writes: 0, warnings: [] };
  if (h.version !== 3) return none;
  const live = (h.autoclearFeatures & AUTOCLEAR_JOURNAL) !== 0n;
  if ((h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) return none;
  const j = located ?? (await locateJournal(dev, parsed, fileSize));
  // the bit can reach the disk in the same flush as the extension that it guards, or
  // without it: either way no transaction was written yet, so there is nothing to say
  if (j.kind === 'absent') return none;
  if (j.kind === 'invalid') {
    return live ? { ...none, action: 'ignored', warnings: [`${name}: journal ignored, it fails validation: ${j.reason}. Leaked clusters, if any, stay until 'qledger check -r leaks'`] } : none;
  }
  const unapplied = j.scan.transactions.filter((t) => t.committed && t.tx > j.appliedTx);
  if (!live) {
    if (unapplied.length === 0) return none;
    return { ...none, action: 'ignored', warnings: [`${name}: journal is stale (its autoclear bit was cleared, so another program opened the image read-write); transaction ${unapplied[0]!.tx} not replayed`] };
  }
  if (unapplied.length === 0) return none;
  if (unapplied.length > 1) {
    return { ...none, action: 'ignored', warnings: [`${name}: journal ignored, it holds ${unapplied.length} unapplied transactions where qledger writes at most one`] };
  }
  const tx = unapplied[0]!;
  if (tx.records.some((r) => r.kind === 'unjournalled')) return { ...none, action: 'scan', tx: tx.tx };
  // Before anything is written: what the writer's open refuses (the tables, the bitmap directory)
  // is refused here the same way, and no crash point leaves two structures in one cluster: an image
  // that has them is damaged otherwise, the writer refuses its writes, and recovery writes nothing.
  const index = await checkedOverlap(dev, name, parsed, fileSize, snapshots);
  const damaged = index.firstOverlap();
  if (damaged) return { ...none, action: 'ignored', warnings: [`${name}: journal transaction ${tx.tx} not replayed, the image's ${overlapNames(damaged.kinds).join(' and ')} already share the cluster at ${hex(damaged.offset)}`] };
  const torn = await dataMismatch(dev, fileSize, tx);
  if (torn === 'too much') return { ...none, action: 'ignored', warnings: [`${name}: journal transaction ${tx.tx} ignored, its data checksums cover more than ${SUMMED_MAX} bytes, which qledger never writes`] };
  const fresh = torn ? 'mixed' : await freshDataUnflushed(dev, parsed, tx);
  if (typeof fresh === 'string' && fresh !== 'mixed') return { ...none, action: 'ignored', warnings: [`${name}: journal transaction ${tx.tx} ignored, ${fresh}, which qledger never writes`] };
  if (torn || fresh === true) {
    // The data that shared the transaction's flush did not all reach the disk, so that flush never
    // completed and nothing of the transaction is in place; or it did, and the transaction was
    // entirely in place before later guest writes changed that data (a write-back runs alone).
    // Either way there is nothing to complete. The checkpoint keeps the transaction from being
    // weighed again (a later write of the same bytes there must not revive it).
    await checkpoint(dev, j.ext, j.generation, tx.tx);
    return { ...none, action: 'dropped', tx: tx.tx };
  }
  const plan = await planReplay(dev, parsed, fileSize, j, tx);
  if (typeof plan === 'string') {
    return { ...none, action: 'ignored', warnings: [`${name}: journal transaction ${tx.tx} ignored, it does not match the image: ${plan}. Leaked clusters, if any, stay until 'qledger check -r leaks'`] };
  }
  const clash = replayOverlap(index, tx, plan);
  if (clash) return { ...none, action: 'ignored', warnings: [`${name}: journal transaction ${tx.tx} ignored, its replay would overwrite other metadata: ${clash}. Leaked clusters, if any, stay until 'qledger check -r leaks'`] };
  const writes = await executePlan(plan, { write: (w) => dev.write(w.offset, w.data), barrier: () => dev.flush() }, { concurrency: CONCURRENCY, skipEmpty: true });
  // no flush of its own: until it is durable a crash only means replaying again
  // (idempotent), and the session's first write-back starts a new generation anyway
  await checkpoint(dev, j.ext, j.generation, tx.tx);
  return { action: 'replayed', tx: tx.tx, records: tx.records.length, writes, warnings: [] };
}

/** What recovery reads back at most for a transaction's data checksums (the writer carries up to 128 KiB). */
const SUMMED_MAX = 16 << 20;

/**
 * Whether the data a transaction's checksums cover reads back otherwise
 * (a range past the end of the file reads otherwise): the first such
 * range, or 'too much' when they cover more than SUMMED_MAX bytes.
 */
async function dataMismatch(dev: BlockDevice, fileSize: number, tx: JournalTransaction): Promise<string | 'too much' | undefined> {
  let total = 0;
  for (const r of tx.records) if (r.kind === 'data-crc') total += r.length;
  if (total > SUMMED_MAX) return 'too much';
  for (const r of tx.records) {
    if (r.kind !== 'data-crc') continue;
    if (r.host + r.length > fileSize) return `data at ${hex(r.host)} past the end of the file`;
    if (crc32(await readAt(dev, r.host, r.length)) !== r.crc) return `data at ${hex(r.host)} (${r.length} bytes) does not match its checksum`;
  }
  return undefined;
}

/**
 * For a transaction whose data shares its flush in clusters it allocates
 * (`data-fresh` records): true when none of its refcount changes is on
 * disk, so that the flush may never have completed and nothing of it is in
 * place (the increments are written only after that flush, and everything
 * else after them); false when one is, or when it has no such data; a
 * string when the records do not fit (data in a cluster the transaction
 * does not allocate, or an image with lazy refcounts, whose increments are
 * not written in place).
 */
async function freshDataUnflushed(dev: BlockDevice, parsed: ParsedHeader, tx: JournalTransaction): Promise<boolean | string> {
  const ranges = tx.records.filter((r) => r.kind === 'data-fresh');
  if (!ranges.length) return false;
  const h = parsed.header;
  if ((h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) return 'it shares its flush with data on an image whose refcounts are not kept in place';
  const g = geometryOf(h);
  const cs = g.clusterSize;
  const E = g.refcountBlockEntries;
  const first = new Map<number, number>();
  const last = new Map<number, number>();
  for (const r of expandRecords(tx.records, E)) {
    if (r.kind !== 'refcount') continue;
    if (!first.has(r.cluster)) first.set(r.cluster, r.old);
    last.set(r.cluster, r.new);
  }
  if (ranges.length > DATA_RANGES_MAX || ranges.some((r) => !(r.length > 0) || !Number.isSafeInteger(r.host + r.length))) return `its data ranges are not ranges qledger writes`;
  // the clusters of the ranges' union, each once (a hostile journal's overlapping ranges cost no more
  // than its records): every one must be a cluster the transaction allocates
  const spans = ranges.map((r) => [Math.floor(r.host / cs), Math.floor((r.host + r.length - 1) / cs)] as const).sort((a, b) => a[0] - b[0]);
  let next = 0;
  for (const [lo, hi] of spans) {
    for (let c = Math.max(lo, next); c <= hi; c++) {
      if (first.get(c) !== 0 || !((last.get(c) ?? 0) > 0)) return `its data at ${hex(c * cs)} is in a cluster it does not allocate`;
    }
    next = Math.max(next, hi + 1);
  }
  const reftable = await readAt(dev, h.refcountTableOffset, h.refcountTableClusters * cs);
  const blocks = new Map<number, Uint8Array | undefined>();
  for (const [c, was] of first) {
    const rt = Math.floor(c / E);
    if (!blocks.has(rt)) {
      const B = rt * 8 < reftable.length ? refcountTableEntry(reftable, rt).offset : 0;
      blocks.set(rt, B === 0 || B % cs !== 0 ? undefined : await readAt(dev, B, cs));
    }
    const b = blocks.get(rt);
    if ((b ? getRefcount(b, c % E, g.refcountOrder) : 0) !== was) return false;
  }
  return true;
}

/**
 * The overlap index of what the image holds now (before the replay), after
 * the checks of the writer's open (write/open-checks.ts validateTables, the
 * bitmap directory as QEMU loads it, without the size its tables must
 * cover, which the replay may change): a failure throws as the open would.
 */
async function checkedOverlap(dev: BlockDevice, name: string, parsed: ParsedHeader, fileSize: number, snapshots: { readonly entries: readonly SnapshotEntry[]; readonly tableBytes: number }): Promise<OverlapIndex> {
  const h = parsed.header;
  const g = geometryOf(h);
  const cs = g.clusterSize;
  const l1 = await readAt(dev, h.l1TableOffset, h.l1Size * 8);
  const reftable = await readAt(dev, h.refcountTableOffset, h.refcountTableClusters * cs);
  validateTables(name, g, l1, reftable, h.l1TableOffset, h.refcountTableOffset, fileSize);
  await readBitmapDirectory(dev, name, parsed, cs, 0);
  const index = new OverlapIndex(g, 'all');
  await buildOverlapIndex(index, { dev, parsed, l1, reftable, snapshots: snapshots.entries, snapshotTableBytes: snapshots.tableBytes });
  return index;
}

/**
 * The overlap check of a replay: `index` (what the image holds now)
 * follows the transaction's records (the structures it creates and
 * moves), and every planned write is checked against it as the kind it
 * is, before any is made. The first conflict, or undefined.
 */
function replayOverlap(index: OverlapIndex, tx: JournalTransaction, plan: readonly Phase[]): string | undefined {
  // a crash mid-write-back leaves some of the transaction's tables in place already: follow, do not judge
  for (const r of tx.records) index.follow(r);
  for (const phase of plan) {
    for (const w of phase.writes) {
      const hit = index.conflict(w.offset, w.data.length, w.kind ?? 0);
      if (hit) return `${w.what} at ${hex(w.offset)} (${w.data.length} bytes) would overwrite the ${overlapName(hit.conflict)} at ${hex(hit.offset)}`;
    }
  }
  return undefined;
}

interface Span<T> {
  first: T;
  last: T;
}


/**
 * Compute the in-place writes that complete `tx`, or a string saying why
 * the transaction does not fit the image. Reads the header's tables named
 * by the records only: the L1 table, the refcount table, and the L2 tables
 * and refcount blocks the transaction changed.
 */
async function planReplay(dev: BlockDevice, parsed: ParsedHeader, fileSize: number, j: JournalView, tx: JournalTransaction): Promise<Phase[] | string> {
  const h = parsed.header;
  const g = geometryOf(h);
  const cs = g.clusterSize;
  // batch records (snapshot operations) as the per-entry records they stand for
  const recs = [...expandRecords(tx.records, g.refcountBlockEntries)];
  const bound = Math.max(fileSize, j.ext.offset + j.ext.size) + 2 ** 40;
  const checkTable = (what: string, off: number, len: number): string | undefined => {
    if (!Number.isSafeInteger(off) || off <= 0 || off % cs !== 0 || off + len > bound) return `${what} at ${hex(off)} is not a valid table position`;
    if (off < j.ext.offset + j.ext.size && off + len > j.ext.offset) return `${what} at ${hex(off)} overlaps the journal area`;
    return undefined;
  };

  // ---- header fields and table moves
  let l1Swap: Span<{ offset: number; size: number }> | undefined;
  let rtSwap: Span<{ offset: number; clusters: number }> | undefined;
  const fields = new Map<HeaderField, Span<bigint>>();
  const images = new Map<string, Uint8Array>();
  for (const r of recs) {
    if (r.kind === 'l1-swap') {
      const o = { offset: r.oldOffset, size: r.oldSize };
      const n = { offset: r.newOffset, size: r.newSize };
      l1Swap = l1Swap ? { first: l1Swap.first, last: n } : { first: o, last: n };
    } else if (r.kind === 'reftable-swap') {
      const o = { offset: r.oldOffset, clusters: r.oldClusters };
      const n = { offset: r.newOffset, clusters: r.newClusters };
      rtSwap = rtSwap ? { first: rtSwap.first, last: n } : { first: o, last: n };
    } else if (r.kind === 'header') {
      const f = fields.get(r.field);
      fields.set(r.field, f ? { first: f.first, last: r.new } : { first: r.old, last: r.new });
    } else if (r.kind === 'image') images.set(`${r.role}@${r.offset}`, r.bytes);
  }
  // bits qledger sets outside the record stream (dirty) or keeps live (journal) are not compared,
  // per field (bit 0 is the dirty bit in one and the bitmaps' bit in another) ...
  const outside: Partial<Record<HeaderField, bigint>> = { incompatible_features: INCOMPAT_DIRTY, autoclear_features: AUTOCLEAR_JOURNAL };
  // ... nor the bitmaps' bit, which their switch clears for a phase (ordering.ts, planBitmapsSwitch)
  const unjudged: Partial<Record<HeaderField, bigint>> = { autoclear_features: AUTOCLEAR_BITMAPS };
  const rawBitmaps = parsed.extensions.find((x) => x.type === EXT_BITMAPS && x.data.length === 24)?.data;
  const diskField: Record<HeaderField, bigint> = {
    size: BigInt(h.size),
    nb_snapshots: BigInt(h.nbSnapshots),
    snapshots_offset: BigInt(h.snapshotsOffset),
    incompatible_features: h.incompatibleFeatures,
    compatible_features: h.compatibleFeatures,
    autoclear_features: h.autoclearFeatures,
    // the extension as it is, even while its bit is clear (a crash inside the switch's phases)
    nb_bitmaps: BigInt(rawBitmaps ? u32(rawBitmaps, 0) : 0),
    bitmap_directory_size: rawBitmaps ? u64big(rawBitmaps, 8) : 0n,
    bitmap_directory_offset: rawBitmaps ? u64big(rawBitmaps, 16) : 0n,
  };
  const finalField = { ...diskField };
  for (const [f, s] of fields) {
    const keep = outside[f] ?? 0n;
    const m = ~(keep | (unjudged[f] ?? 0n));
    if ((diskField[f] & m) !== (s.first & m) && (diskField[f] & m) !== (s.last & m)) return `header ${f} is 0x${diskField[f].toString(16)}, neither 0x${s.first.toString(16)} nor 0x${s.last.toString(16)}`;
    finalField[f] = (s.last & ~keep) | (diskField[f] & keep);
  }
  if (l1Swap && h.l1TableOffset !== l1Swap.first.offset && h.l1TableOffset !== l1Swap.last.offset) return `header l1_table_offset is ${hex(h.l1TableOffset)}, neither ${hex(l1Swap.first.offset)} nor ${hex(l1Swap.last.offset)}`;
  if (rtSwap && h.refcountTableOffset !== rtSwap.first.offset && h.refcountTableOffset !== rtSwap.last.offset) return `header refcount_table_offset is ${hex(h.refcountTableOffset)}, neither ${hex(rtSwap.first.offset)} nor ${hex(rtSwap.last.offset)}`;
  const l1Off = l1Swap ? l1Swap.last.offset : h.l1TableOffset;
  const l1Size = l1Swap ? l1Swap.last.size : h.l1Size;
  const rtOff = rtSwap ? rtSwap.last.offset : h.refcountTableOffset;
  const rtClusters = rtSwap ? rtSwap.last.clusters : h.refcountTableClusters;

  const lists = new PhaseLists();
  const phase0 = lists.allocate;
  const phase1 = lists.hook;
  const phase2 = lists.reference;
  const phase3 = lists.free;

  // ---- the L1 table
  let finalL1: Uint8Array;
  if (l1Swap) {
    const img = images.get(`l1@${l1Off}`);
    if (!img || img.length !== l1Size * 8) return `the L1 table moved to ${hex(l1Off)} but the transaction has no image of it`;
    const bad = checkTable('L1 table', l1Off, img.length);
    if (bad) return bad;
    finalL1 = img;
    phase0.push({ offset: host(l1Off), data: padSector(img), what: 'replay: new l1', kind: OL_ACTIVE_L1 });
  } else {
    const disk = await readAt(dev, l1Off, l1Size * 8);
    finalL1 = disk.slice();
    const spans = new Map<number, Span<bigint>>();
    for (const r of recs) {
      if (r.kind !== 'l1') continue;
      const v = (BigInt(r.new.hi >>> 0) << 32n) | BigInt(r.new.lo >>> 0);
      const s = spans.get(r.index);
      spans.set(r.index, s ? { first: s.first, last: v } : { first: (BigInt(r.old.hi >>> 0) << 32n) | BigInt(r.old.lo >>> 0), last: v });
    }
    for (const [i, s] of spans) {
      if (i >= l1Size) return `L1 index ${i} is past the table's ${l1Size} entries`;
      const d = u64big(disk, i * 8);
      if (d !== s.first && d !== s.last) return `L1 entry ${i} is 0x${d.toString(16)}, neither 0x${s.first.toString(16)} nor 0x${s.last.toString(16)}`;
      putU64(finalL1, i * 8, s.last);
    }
    phase2.push(...dirtySectors(disk, finalL1, host(l1Off), 'replay: l1', OL_ACTIVE_L1));
  }
  const l2At = (i: number) => (i < l1Size ? l1Offset(finalL1, i) : 0);

  // ---- the refcount table
  let finalRt: Uint8Array;
  if (rtSwap) {
    const img = images.get(`reftable@${rtOff}`);
    if (!img || img.length !== rtClusters * cs) return `the refcount table moved to ${hex(rtOff)} but the transaction has no image of it`;
    const bad = checkTable('refcount table', rtOff, img.length);
    if (bad) return bad;
    finalRt = img;
    phase0.push({ offset: host(rtOff), data: img, what: 'replay: new reftable', kind: OL_REFCOUNT_TABLE });
  } else {
    const disk = await readAt(dev, rtOff, rtClusters * cs);
    finalRt = disk.slice();
    const spans = new Map<number, Span<number>>();
    for (const r of recs) {
      if (r.kind !== 'reftable') continue;
      const s = spans.get(r.index);
      spans.set(r.index, s ? { first: s.first, last: r.new } : { first: r.old, last: r.new });
    }
    for (const [i, s] of spans) {
      if (i * 8 >= finalRt.length) return `refcount table index ${i} is past the table`;
      const d = u64(disk, i * 8);
      if (d !== s.first && d !== s.last) return `refcount table entry ${i} is ${hex(d)}, neither ${hex(s.first)} nor ${hex(s.last)}`;
      putU64(finalRt, i * 8, s.last);
    }
    phase1.push(...dirtySectors(disk, finalRt, host(rtOff), 'replay: reftable', OL_REFCOUNT_TABLE));
  }
  const blockAt = (rt: number) => (rt * 8 < finalRt.length ? refcountTableEntry(finalRt, rt).offset : 0);

  // ---- L2 tables
  const newTables = new Map<string, number>(); // role@offset -> copyOf
  for (const r of recs) if (r.kind === 'table-new') newTables.set(`${r.role}@${r.offset}`, r.copyOf);
  const l2 = new Map<number, { l1Index: number; spans: Map<number, Span<L2Entry>> }>();
  for (const r of recs) {
    if (r.kind === 'table-new' && r.role === 'l2' && !l2.has(r.offset)) l2.set(r.offset, { l1Index: r.slot, spans: new Map() });
    if (r.kind !== 'l2') continue;
    let t = l2.get(r.table);
    if (!t) l2.set(r.table, (t = { l1Index: r.l1Index, spans: new Map() }));
    const s = t.spans.get(r.index);
    t.spans.set(r.index, s ? { first: s.first, last: r.new } : { first: r.old, last: r.new });
  }
  const changedL2: L2Entry[] = [];
  const l1First = new Map<number, number>();
  for (const r of recs) if (r.kind === 'l1' && !l1First.has(r.index)) l1First.set(r.index, entryOffset(r.old.hi, r.old.lo));
  // the tables to read, read concurrently: recovery time is their number, not the image's size
  const existingL2 = [...l2.entries()].filter(([T, t]) => l2At(t.l1Index) === T && !newTables.has(`l2@${T}`)).map(([T]) => T);
  for (const T of existingL2) {
    const bad = checkTable('L2 table', T, cs);
    if (bad) return bad;
  }
  const l2Disk = await readClusters(dev, existingL2, cs);
  for (const [T, t] of l2) {
    // a table the transaction dropped (copied away, freed) is left alone: it may be reused;
    // but it must be one the transaction did drop: the table its L1 entry pointed at before
    if (l2At(t.l1Index) !== T) {
      if (!newTables.has(`l2@${T}`) && l1First.get(t.l1Index) !== T) return `L2 records name table ${hex(T)}, which L1 entry ${t.l1Index} never points at`;
      continue;
    }
    for (const sp of t.spans.values()) changedL2.push(sp.last);
    const bad = checkTable('L2 table', T, cs);
    if (bad) return bad;
    const isNew = newTables.has(`l2@${T}`);
    let final: Uint8Array;
    if (isNew) {
      const copyOf = newTables.get(`l2@${T}`)!;
      if (copyOf !== 0) {
        const img = images.get(`l2@${T}`);
        if (!img || img.length !== cs) return `L2 table ${hex(T)} copies ${hex(copyOf)} but the transaction has no image of it`;
        final = img.slice();
      } else final = new Uint8Array(cs);
      for (const [i, s] of t.spans) {
        if (i >= g.l2Entries) return `L2 index ${i} is past the table`;
        writeL2Entry(final, i, g, s.last);
      }
      phase0.push({ offset: host(T), data: final, what: `replay: new l2 ${hex(T)}`, kind: OL_ACTIVE_L2 });
    } else {
      const disk = l2Disk.get(T)!;
      final = disk.slice();
      for (const [i, s] of t.spans) {
        if (i >= g.l2Entries) return `L2 index ${i} is past the table`;
        const d = l2EntryAt(disk, i, g);
        // or the old value with COPIED cleared: the write-back clears it first on an entry whose cluster became shared
        const firstUnshared = { ...s.first, hi: (s.first.hi & 0x7fff_ffff) >>> 0 };
        if (!sameL2Entry(d, s.first) && !sameL2Entry(d, s.last) && !sameL2Entry(d, firstUnshared)) return `L2 table ${hex(T)} entry ${i} holds neither the transaction's old nor its new value`;
        writeL2Entry(final, i, g, s.last);
      }
      phase2.push(...dirtySectors(disk, final, host(T), `replay: l2 ${hex(T)}`, OL_ACTIVE_L2));
    }
  }

  // ---- refcounts
  // A dirty image (lazy refcounts) has stale refcount blocks by design: they are
  // neither compared nor written, the rebuild that follows recovery recounts them.
  const dirty = (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  const max = maxRefcount(g.refcountOrder);
  const E = g.refcountBlockEntries;
  const counts = new Map<number, Map<number, { first: number; last: number; inc: number }>>();
  for (const r of recs) {
    if (r.kind !== 'refcount' || dirty) continue;
    const rt = Math.floor(r.cluster / E);
    let m = counts.get(rt);
    if (!m) counts.set(rt, (m = new Map()));
    const s = m.get(r.cluster);
    const inc = Math.max(0, r.new - r.old);
    m.set(r.cluster, s ? { first: s.first, last: r.new, inc: s.inc + inc } : { first: r.old, last: r.new, inc });
  }
  for (const rt of counts.keys()) {
    const B = blockAt(rt);
    if (B === 0) return `refcount block ${rt} is not in the refcount table`;
    const bad = checkTable('refcount block', B, cs);
    if (bad) return bad;
  }
  const blockDisk = await readClusters(dev, [...counts.keys()].map(blockAt).filter((B) => !newTables.has(`refblock@${B}`)), cs);
  for (const [rt, m] of counts) {
    const B = blockAt(rt);
    const isNew = newTables.has(`refblock@${B}`);
    const disk = isNew ? new Uint8Array(cs) : blockDisk.get(B)!;
    const bound = disk.slice();
    const final = disk.slice();
    for (const [c, s] of m) {
      const i = c % E;
      const d = getRefcount(disk, i, g.refcountOrder);
      const upper = Math.min(max, s.first + s.inc);
      if (!isNew && d !== s.first && d !== s.last && d !== upper) return `refcount of cluster ${hex(c * cs)} is ${d}, neither ${s.first}, ${upper} nor ${s.last}`;
      setRefcount(bound, i, g.refcountOrder, Math.max(d, upper));
      setRefcount(final, i, g.refcountOrder, s.last);
    }
    phase0.push(...dirtySectors(isNew ? undefined : disk, bound, host(B), `replay: refblock ${hex(B)}`, OL_REFCOUNT_BLOCK));
    phase3.push(...dirtySectors(bound, final, host(B), `replay: refblock ${hex(B)}`, OL_REFCOUNT_BLOCK));
  }

  // ---- the final entries must make sense with the final refcounts (a journal
  // whose checksums pass but whose content does not describe a valid image is refused)
  const refcountAt = async (c: number): Promise<number | undefined> => {
    const m = counts.get(Math.floor(c / E));
    const s = m?.get(c);
    if (s) return s.last;
    const B = blockAt(Math.floor(c / E));
    if (B === 0) return 0;
    if (B % cs !== 0) return undefined;
    let b = blockCache.get(B);
    if (!b) blockCache.set(B, (b = await readAt(dev, B, cs)));
    return getRefcount(b, c % E, g.refcountOrder);
  };
  const blockCache = blockDisk;
  const entryProblem = async (what: string, offset: number, copied: boolean, reservedBits: boolean): Promise<string | undefined> => {
    if (reservedBits) return `${what} has reserved bits set`;
    if (offset === 0) return undefined;
    if (offset % cs !== 0) return `${what} points at ${hex(offset)}, not cluster aligned`;
    if (offset < j.ext.offset + j.ext.size && offset + cs > j.ext.offset) return `${what} points into the journal area`;
    if (dirty) return undefined;
    const rc = await refcountAt(offset / cs);
    if (rc === undefined || rc === 0) return `${what} points at ${hex(offset)}, whose refcount would be 0`;
    if (copied !== (rc === 1)) return `${what} has a COPIED flag that disagrees with refcount ${rc}`;
    return undefined;
  };
  for (const e of changedL2) {
    if (isCompressed(e)) continue; // compressed: shared byte ranges, counted per cluster they touch
    const bad = await entryProblem('an L2 entry', standardOffset(e), isCopied(e), standardReservedBits(e, g));
    if (bad) return bad;
  }
  // every entry of a moved L1 table, else the entries the transaction changed
  const l1Checked = l1Swap ? Array.from({ length: l1Size }, (_, i) => i) : [...new Set(recs.flatMap((r) => (r.kind === 'l1' ? [r.index] : [])))];
  for (const i of l1Checked) {
    const e = decodeL1Entry(finalL1, i);
    const bad = await entryProblem(`L1 entry ${i}`, e.l2Offset, e.copied, e.reservedBits);
    if (bad) return bad;
  }

  // ---- the header
  const diskHeader = await readAt(dev, 0, fixedHeaderLength(h.version, h.headerLength));
  const finalHeader = diskHeader.slice();
  putMutableFields(finalHeader, h.version, {
    size: Number(finalField.size),
    nbSnapshots: Number(finalField.nb_snapshots),
    snapshotsOffset: Number(finalField.snapshots_offset),
    l1Size,
    l1TableOffset: l1Off,
    refcountTableOffset: rtOff,
    refcountTableClusters: rtClusters,
    incompatibleFeatures: finalField.incompatible_features,
    compatibleFeatures: finalField.compatible_features,
    autoclearFeatures: finalField.autoclear_features,
  });
  if (!Buffer.from(finalHeader).equals(Buffer.from(diskHeader))) {
    (rtSwap ? phase1 : phase2).push({ offset: host(0), data: finalHeader, what: 'replay: header', kind: OL_MAIN_HEADER });
  }
  // the bitmaps extension's fields (the extension itself was inserted before the transaction)
  if (fields.has('nb_bitmaps') || fields.has('bitmap_directory_size') || fields.has('bitmap_directory_offset')) {
    const e = parsed.extensions.find((x) => x.type === EXT_BITMAPS && x.data.length === 24);
    const none = finalField.nb_bitmaps === 0n && finalField.bitmap_directory_size === 0n && finalField.bitmap_directory_offset === 0n;
    if (e) {
      const body = encodeBitmapsExtension(Number(finalField.nb_bitmaps), Number(finalField.bitmap_directory_size), Number(finalField.bitmap_directory_offset));
      phase2.push({ offset: host(e.offset + 8), data: body, what: 'replay: bitmaps extension', kind: OL_MAIN_HEADER });
    } else if (!none) return 'the transaction changes the bitmaps extension, which the header does not have';
    // (no extension and no bitmaps left: the last one went and the extension was dropped after the transaction)
  }
  return lists.phases(false);
}

/** Replay writes in flight at once within one phase (the file device's thread pool takes four at a time). */
const CONCURRENCY = 32;
