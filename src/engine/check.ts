/**
 * Consistency check and repair of a qcow2 image, counted the way QEMU's
 * qcow2_check_refcounts() counts so that totals agree with `qemu-img check`:
 *
 *  1. Count every reference to every host cluster: the header, the active
 *     L1 and every snapshot L1 table, each L2 table once per L1 entry that
 *     names it, data and compressed clusters once per L2 entry visit, the
 *     snapshot table, the refcount table, the bitmap directory and tables,
 *     and every refcount block. A reference past the end of the file is a
 *     corruption and is not counted.
 *  2. Compare with the stored refcounts over the clusters of the file:
 *     stored < counted is a corruption, stored > counted a leak, and a
 *     counted cluster with stored 0 means the refcount structure itself must
 *     be rebuilt.
 *  3. Check COPIED flags of the active L1 and L2 entries against the stored
 *     refcounts.
 *
 * Repair (-r leaks / -r all) lowers leaked refcounts, raises low ones,
 * rebuilds the refcount table and blocks at the end of the file when they
 * are broken, and fixes COPIED flags, then checks again. Every repair write
 * only ever adds references or removes ones nothing uses, and a rebuilt
 * refcount structure is complete and flushed before the header switches to
 * it, so a crash during repair leaves the image no worse.
 *
 * Memory is proportional to the file (one 32-bit counter per cluster,
 * allocated in 64 Ki-cluster chunks only where references land), never to
 * what a damaged table claims.
 */

import { QledgerError } from '../errors.ts';
import type { BlockDevice } from '../io/device.ts';
import { readAt } from '../io/device.ts';
import { FileDevice } from '../io/file-device.ts';
import { geometryOf, type Geometry, type ParsedHeader } from '../format/header.ts';
import { putU32, putU64, u32 } from '../format/bytes.ts';
import { AUTOCLEAR_BITMAPS, AUTOCLEAR_JOURNAL, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY } from '../format/features.ts';
import { COPIED_HI } from '../format/l1.ts';
import { compressedDescriptor, readL2Entry, standardOffset, type RawL2Entry, L2E_COMPRESSED_HI, L2E_COPIED_HI } from '../format/l2.ts';
import { getRefcount, setRefcount, refcountTableEntry, setRefcountTableEntry, maxRefcount } from '../format/refcount.ts';
import { decodeBitmapDirectory } from '../format/bitmaps.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import { loadQcow2 } from './qcow2-layer.ts';
import { probeFormat } from './open.ts';

export type RepairMode = 'leaks' | 'all';

export interface CheckFinding {
  /** what qemu-img counts it as ('none': reported, not counted by QEMU either) */
  readonly counts: 'corruption' | 'leak' | 'check-error' | 'none';
  /** QEMU's message for it, with the host offset in hex added */
  readonly message: string;
  readonly cluster?: number | undefined;
  readonly offset?: number | undefined;
  /** repaired by this run */
  fixed: boolean;
}

export interface CheckReport {
  readonly filename: string;
  readonly format: 'qcow2';
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** findings of the (last) check, in the order found */
  findings: CheckFinding[];
  /** findings of the first pass, before any repair (when repairing) */
  repairedFindings: CheckFinding[];
  /** set when the check could not complete; the CLI prints it and exits 1 */
  failure?: string | undefined;
}

/** One counter per host cluster, in chunks allocated where references land. */
class Counts {
  private readonly chunks = new Map<number, Uint32Array>();
  private lastKey = -1;
  private last: Uint32Array | undefined;
  private chunk(k: number, create: boolean): Uint32Array | undefined {
    if (k === this.lastKey) return this.last;
    let a = this.chunks.get(k);
    if (!a && create) this.chunks.set(k, (a = new Uint32Array(65536)));
    if (a) {
      this.lastKey = k;
      this.last = a;
    }
    return a;
  }
  get(c: number): number {
    return this.chunk(Math.floor(c / 65536), false)?.[c % 65536] ?? 0;
  }
  add(c: number, d: number): void {
    const a = this.chunk(Math.floor(c / 65536), true)!;
    const i = c % 65536;
    a[i] = Math.max(0, a[i]! + d);
  }
}

interface Analysis {
  readonly counts: Counts;
  readonly findings: CheckFinding[];
  corruptions: number;
  leaks: number;
  checkErrors: number;
  rebuild: boolean;
  allocated: number;
  fragmented: number;
  compressed: number;
  highest: number;
  nbClusters: number;
  /** refcount-table entries of usable refcount blocks (index -> cluster) */
  readonly validBlocks: Map<number, number>;
  /** clusters counted as refcount blocks (a rebuild drops these references) */
  readonly countedBlocks: number[];
  /** active L2 tables as read, kept (up to BATCH_BYTES) for the COPIED check */
  readonly activeTables: Map<number, Uint8Array>;
  /** cluster -> stored refcount, for clusters whose stored value differs */
  readonly mismatches: Array<{ cluster: number; stored: number; counted: number }>;
}

interface Image {
  readonly dev: BlockDevice;
  readonly parsed: ParsedHeader;
  readonly snapshots: readonly SnapshotEntry[];
  readonly snapshotTableBytes: number;
  readonly g: Geometry;
  readonly filename: string;
}

const S = (n: number) => n.toString(16);

/** Tables read per batch: bounds memory whatever the image claims. */
const BATCH_BYTES = 64 * 1024 * 1024;

/**
 * Read the clusters at `offsets` (cluster-sized each), merging runs of
 * adjacent clusters into one read of up to 8 MiB: a million-cluster image
 * has thousands of tables, mostly laid out back to back.
 */
export async function readClusters(dev: BlockDevice, offsets: Iterable<number>, cs: number): Promise<Map<number, Uint8Array>> {
  const sorted = [...new Set(offsets)].sort((x, y) => x - y);
  const out = new Map<number, Uint8Array>();
  const maxRun = Math.max(1, Math.floor((8 << 20) / cs));
  const runs: Array<[number, number]> = [];
  for (let i = 0; i < sorted.length; ) {
    let j = i + 1;
    while (j < sorted.length && j - i < maxRun && sorted[j] === sorted[j - 1]! + cs) j++;
    runs.push([i, j]);
    i = j;
  }
  // several reads in flight: scattered tables cost a thread-pool round trip each
  let next = 0;
  const worker = async () => {
    while (next < runs.length) {
      const [i, j] = runs[next++]!;
      const buf = await readAt(dev, sorted[i]!, (j - i) * cs);
      for (let k = i; k < j; k++) out.set(sorted[k]!, buf.subarray((k - i) * cs, (k - i + 1) * cs));
    }
  };
  await Promise.all(Array.from({ length: Math.min(16, runs.length) }, worker));
  return out;
}

/** L2 table offsets named by an L1 table, in L1 order, with their indices. */
function l1Entries(l1: Uint8Array, count: number): Array<{ i: number; hi: number; lo: number; l2: number }> {
  const out: Array<{ i: number; hi: number; lo: number; l2: number }> = [];
  for (let i = 0; i < count; i++) {
    const hi = u32(l1, i * 8);
    const lo = u32(l1, i * 8 + 4);
    if (hi === 0 && lo === 0) continue;
    out.push({ i, hi, lo, l2: (hi & 0x00ff_ffff) * 2 ** 32 + ((lo & 0xffff_fe00) >>> 0) });
  }
  return out;
}

/**
 * Stored refcounts, read through the refcount table. `load` reads every
 * usable refcount block covering the file once (bounded by the file size);
 * `get` is then synchronous, so comparing a million clusters costs no I/O
 * round trips.
 */
class Stored {
  private readonly blocks = new Map<number, Uint8Array>();
  constructor(
    private readonly img: Image,
    readonly reftable: Uint8Array,
    private readonly fileSize: number,
  ) {}
  private blockOffset(rt: number): number {
    const g = this.img.g;
    if (rt * 8 >= this.reftable.length) return 0;
    const { offset, reservedBits } = refcountTableEntry(this.reftable, rt);
    if (reservedBits || offset === 0 || offset % g.clusterSize !== 0 || offset + g.clusterSize > this.fileSize) return 0;
    return offset;
  }
  async load(nbClusters: number): Promise<void> {
    const E = this.img.g.refcountBlockEntries;
    const want = new Map<number, number>();
    for (let rt = 0; rt * E < nbClusters; rt++) {
      const off = this.blockOffset(rt);
      if (off) want.set(rt, off);
    }
    const got = await readClusters(this.img.dev, want.values(), this.img.g.clusterSize);
    // a private copy per block: two entries may name the same cluster
    for (const [rt, off] of want) this.blocks.set(rt, got.get(off)!.slice());
  }
  /** The loaded refcount block of refcount-table index `rt`, if any. */
  block(rt: number): Uint8Array | undefined {
    return this.blocks.get(rt);
  }
  get(cluster: number): number {
    const g = this.img.g;
    const b = this.blocks.get(Math.floor(cluster / g.refcountBlockEntries));
    return b ? getRefcount(b, cluster % g.refcountBlockEntries, g.refcountOrder) : 0;
  }
  /** Change a stored refcount on disk (its block must exist). */
  async set(cluster: number, value: number): Promise<boolean> {
    const g = this.img.g;
    const rt = Math.floor(cluster / g.refcountBlockEntries);
    const off = this.blockOffset(rt);
    const b = this.blocks.get(rt);
    if (!off || !b) return false;
    const i = cluster % g.refcountBlockEntries;
    setRefcount(b, i, g.refcountOrder, Math.min(value, maxRefcount(g.refcountOrder)));
    // write the sector holding the entry (refcount entries never straddle sectors)
    const byte = Math.floor((i * g.refcountBits) / 8);
    const sector = byte - (byte % 512);
    await this.img.dev.write(off + sector, b.subarray(sector, Math.min(sector + 512, b.length)));
    return true;
  }
}

async function analyze(img: Image, opts: { bitmaps?: boolean } = {}): Promise<Analysis> {
  const { dev, parsed, g } = img;
  const h = parsed.header;
  const cs = g.clusterSize;
  const fileSize = await dev.size();
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  const a: Analysis = {
    counts: new Counts(),
    findings: [],
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    rebuild: false,
    allocated: 0,
    fragmented: 0,
    compressed: 0,
    highest: -1,
    nbClusters: Math.ceil(fileSize / cs),
    validBlocks: new Map(),
    countedBlocks: [],
    activeTables: new Map(),
    mismatches: [],
  };
  const corrupt = (message: string, offset?: number) => {
    a.corruptions++;
    a.findings.push({ counts: 'corruption', message, offset, cluster: offset === undefined ? undefined : Math.floor(offset / cs), fixed: false });
  };
  const maxCount = Math.min(maxRefcount(g.refcountOrder), 0xffff_ffff);
  const inc = (offset: number, size: number) => {
    if (size <= 0) return;
    if (offset + size - fileSize >= cs) {
      corrupt(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${S(offset)} size 0x${S(size)}`, offset);
      return;
    }
    const last = Math.floor((offset + size - 1) / cs);
    for (let c = Math.floor(offset / cs); c <= last; c++) {
      if (a.counts.get(c) >= maxCount) {
        // QEMU stops counting at what refcount_bits can hold, and says so
        corrupt(`ERROR: overflow cluster offset=0x${S(c * cs)} (more references than refcount_bits=${g.refcountBits} can count)`, c * cs);
        continue;
      }
      a.counts.add(c, 1);
    }
  };

  const e: RawL2Entry = { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 };
  const entryHex = () => S((e.hi >>> 0) * 2 ** 32 + (e.lo >>> 0));
  const walkL2 = (table: Uint8Array, l2Offset: number, frag: boolean) => {
    let next = 0;
    for (let j = 0; j < g.l2Entries; j++) {
      readL2Entry(table, j, g, e);
      const compressed = (e.hi & L2E_COMPRESSED_HI) !== 0;
      if (!compressed && ((e.hi & 0x3f00_0000) !== 0 || (e.lo & 0x1fe) !== 0)) {
        corrupt(`ERROR found l2 entry with reserved bits set: ${entryHex()} (L2 table at 0x${S(l2Offset)}, index ${j})`, l2Offset);
      }
      if (compressed) {
        if ((e.hi & L2E_COPIED_HI) !== 0) {
          const d = compressedDescriptor({ ...e, hi: e.hi & ~L2E_COPIED_HI }, g.clusterBits);
          corrupt(`ERROR: coffset=0x${S(d.offset)}: copied flag must never be set for compressed clusters`, d.offset);
        }
        if (hasDataFile) {
          corrupt(`ERROR compressed cluster ${j} with data file, entry=0x${entryHex()} (L2 table at 0x${S(l2Offset)})`, l2Offset);
          continue;
        }
        if (g.extendedL2 && ((e.bitmapHi | e.bitmapLo) >>> 0) !== 0) {
          corrupt(`ERROR compressed cluster ${j} with non-zero subcluster allocation bitmap, entry=0x${entryHex()}`, l2Offset);
          continue;
        }
        const d = compressedDescriptor({ ...e, hi: e.hi & ~L2E_COPIED_HI }, g.clusterBits);
        inc(d.offset, d.length);
        if (frag) {
          a.allocated++;
          a.compressed++;
          a.fragmented++;
        }
        continue;
      }
      const off = standardOffset(e);
      const allocated = off !== 0 || (hasDataFile && (e.hi & L2E_COPIED_HI) !== 0);
      if (!allocated) {
        if (g.extendedL2 && (e.bitmapLo >>> 0) !== 0) corrupt(`ERROR: Unallocated cluster has non-zero subcluster allocation map (L2 table at 0x${S(l2Offset)}, index ${j})`, l2Offset);
        continue;
      }
      if (g.extendedL2 && ((e.bitmapHi & e.bitmapLo) >>> 0) !== 0) {
        corrupt(`ERROR offset=${S(off)}: Allocated cluster has corrupted subcluster allocation bitmap`, off);
      }
      if (off % cs !== 0) {
        const containsData = g.extendedL2 ? (e.bitmapLo >>> 0) !== 0 : (e.lo & 1) === 0;
        // QEMU reports it and still counts the (misaligned) range it names
        corrupt(`ERROR offset=${S(off)}: ${containsData ? 'Data' : 'Preallocated'} cluster is not properly aligned; L2 entry corrupted. (L2 table at 0x${S(l2Offset)}, index ${j})`, off);
      }
      if (frag) {
        a.allocated++;
        if (next && off !== next) a.fragmented++;
        next = off + cs;
      }
      if (!hasDataFile) inc(off, cs);
    }
  };

  const walkL1 = async (l1Off: number, l1Size: number, frag: boolean) => {
    if (!l1Size) return;
    inc(l1Off, l1Size * 8);
    const entries = l1Entries(await readAt(dev, l1Off, l1Size * 8), l1Size);
    const perBatch = Math.max(1, Math.floor(BATCH_BYTES / cs));
    for (let b = 0; b < entries.length; b += perBatch) {
      const batch = entries.slice(b, b + perBatch);
      // like QEMU, read each table where the entry says, aligned or not (past the end reads as zeros)
      const aligned = await readClusters(dev, batch.filter((x) => x.l2 % cs === 0).map((x) => x.l2), cs);
      if (frag) for (const [o, t] of aligned) if ((a.activeTables.size + 1) * cs <= BATCH_BYTES) a.activeTables.set(o, t);
      for (const { i, hi, lo, l2 } of batch) {
        if ((hi & 0x7f00_0000) !== 0 || (lo & 0x1ff) !== 0) corrupt(`ERROR found L1 entry with reserved bits set: ${S(hi * 2 ** 32 + lo)}`, l1Off + i * 8);
        inc(l2, cs);
        if (l2 % cs !== 0) corrupt(`ERROR l2_offset=${S(l2)}: Table is not cluster aligned; L1 entry corrupted (L1 index ${i})`, l2);
        walkL2(aligned.get(l2) ?? (await readAt(dev, l2, cs)), l2, frag);
      }
    }
  };

  inc(0, cs);
  await walkL1(h.l1TableOffset, h.l1Size, true);
  if (hasDataFile && img.snapshots.length) corrupt(`ERROR ${img.snapshots.length} snapshots in image with data file`);
  for (const sn of img.snapshots) {
    if (sn.l1Size > 32 * 1024 * 1024 / 8) {
      corrupt(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${S(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
      continue;
    }
    if (sn.l1TableOffset % cs !== 0) {
      corrupt(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${S(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`, sn.l1TableOffset);
      continue;
    }
    await walkL1(sn.l1TableOffset, sn.l1Size, false);
  }
  if (h.nbSnapshots) inc(h.snapshotsOffset, img.snapshotTableBytes);
  inc(h.refcountTableOffset, h.refcountTableClusters * cs);
  if ((h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n && parsed.bitmaps && opts.bitmaps !== false) {
    const b = parsed.bitmaps;
    inc(b.directoryOffset, b.directorySize);
    try {
      const dir = await readAt(dev, b.directoryOffset, b.directorySize);
      for (const bm of decodeBitmapDirectory(dir, b.nbBitmaps, b.directoryOffset)) {
        inc(bm.tableOffset, bm.tableSize * 8);
        if (bm.tableOffset + bm.tableSize * 8 > fileSize) continue;
        const t = await readAt(dev, bm.tableOffset, bm.tableSize * 8);
        for (let i = 0; i < bm.tableSize; i++) {
          const off = (u32(t, i * 8) & 0x00ff_ffff) * 2 ** 32 + ((u32(t, i * 8 + 4) & 0xffff_fe00) >>> 0);
          if (off) inc(off, cs);
        }
      }
    } catch (err) {
      if (!(err instanceof QledgerError)) throw err;
      a.checkErrors++;
      a.findings.push({ counts: 'check-error', message: `ERROR bitmap directory: ${err.message}`, fixed: false });
    }
  }
  // refcount blocks: each must be aligned, inside the image, and referenced exactly once
  const reftable = await readAt(dev, h.refcountTableOffset, h.refcountTableClusters * cs);
  for (let i = 0; i < reftable.length / 8; i++) {
    const { offset, reservedBits } = refcountTableEntry(reftable, i);
    if (reservedBits) {
      corrupt(`ERROR refcount table entry ${i} has reserved bits set`, h.refcountTableOffset + i * 8);
      a.rebuild = true;
      continue;
    }
    if (!offset) continue;
    const cluster = Math.floor(offset / cs);
    if (offset % cs !== 0) {
      corrupt(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted (offset 0x${S(offset)})`, offset);
      a.rebuild = true;
      continue;
    }
    if (cluster >= a.nbClusters) {
      corrupt(`ERROR refcount block ${i} is outside image (offset 0x${S(offset)})`, offset);
      a.rebuild = true;
      continue;
    }
    inc(offset, cs);
    a.countedBlocks.push(cluster);
    if (a.counts.get(cluster) !== 1) {
      corrupt(`ERROR refcount block ${i} refcount=${a.counts.get(cluster)} (offset 0x${S(offset)})`, offset);
      a.rebuild = true;
      continue;
    }
    a.validBlocks.set(i, cluster);
  }
  return a;
}

/**
 * Compare stored and counted refcounts over the clusters of the file. A
 * first pass only finds the mismatches (a block at a time, no per-cluster
 * lookups); fixes, when asked for and possible without a rebuild, follow.
 */
async function compare(img: Image, a: Analysis, stored: Stored, repair: RepairMode | undefined, report: CheckReport): Promise<void> {
  const cs = img.g.clusterSize;
  const E = img.g.refcountBlockEntries;
  const order = img.g.refcountOrder;
  for (let base = 0; base < a.nbClusters; base += E) {
    const block = stored.block(base / E);
    const end = Math.min(a.nbClusters, base + E);
    for (let c = base; c < end; c++) {
      const s = block ? getRefcount(block, c - base, order) : 0;
      const n = a.counts.get(c);
      if (s > 0 || n > 0) a.highest = c;
      if (s === n) continue;
      a.mismatches.push({ cluster: c, stored: s, counted: n });
      if (s === 0) a.rebuild = true;
    }
  }
  const fixing = repair !== undefined && !a.rebuild;
  for (const { cluster: c, stored: s, counted: n } of a.mismatches) {
    const fix = fixing && ((s > n && repair !== undefined) || (s < n && repair === 'all')) ? (s > n ? 'leak' : 'corruption') : undefined;
    const word = fix ? 'Repairing' : s < n ? 'ERROR' : 'Leaked';
    const finding: CheckFinding = { counts: s < n ? 'corruption' : 'leak', message: `${word} cluster ${c} refcount=${s} reference=${n} (host offset 0x${S(c * cs)})`, cluster: c, offset: c * cs, fixed: false };
    a.findings.push(finding);
    if (fix && (await stored.set(c, n))) {
      finding.fixed = true;
      if (fix === 'leak') report.leaksFixed++;
      else report.corruptionsFixed++;
      continue;
    }
    if (s < n) a.corruptions++;
    else a.leaks++;
  }
}

async function checkCopied(img: Image, a: Analysis, stored: Stored, repair: boolean, report: CheckReport): Promise<void> {
  const { dev, parsed, g } = img;
  const h = parsed.header;
  const cs = g.clusterSize;
  const fileSize = await dev.size();
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  if (h.l1TableOffset + h.l1Size * 8 > fileSize) return;
  const l1 = await readAt(dev, h.l1TableOffset, h.l1Size * 8);
  const e: RawL2Entry = { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 };
  const entries = l1Entries(l1, h.l1Size).filter((x) => x.l2 !== 0);
  const perBatch = Math.max(1, Math.floor(BATCH_BYTES / cs));
  for (let b = 0; b < entries.length; b += perBatch) {
    const batch = entries.slice(b, b + perBatch);
    const wanted = batch.filter((x) => x.l2 % cs === 0 && x.l2 + cs <= fileSize).map((x) => x.l2);
    const tables = await readClusters(dev, wanted.filter((o) => !a.activeTables.has(o)), cs);
    for (const o of wanted) if (a.activeTables.has(o)) tables.set(o, a.activeTables.get(o)!);
    for (const { i, hi, lo, l2 } of batch) {
      const rc = stored.get(Math.floor(l2 / cs));
      if ((rc === 1) !== ((hi & COPIED_HI) !== 0)) {
        const f: CheckFinding = { counts: 'corruption', message: `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${S(hi * 2 ** 32 + lo)} refcount=${rc} (L2 table at 0x${S(l2)})`, offset: l2, cluster: Math.floor(l2 / cs), fixed: false };
        a.findings.push(f);
        if (repair) {
          putU32(l1, i * 8, rc === 1 ? (hi | COPIED_HI) >>> 0 : (hi & ~COPIED_HI) >>> 0);
          await dev.write(h.l1TableOffset + i * 8, l1.subarray(i * 8, i * 8 + 8));
          f.fixed = true;
          report.corruptionsFixed++;
        } else a.corruptions++;
      }
      const t0 = tables.get(l2);
      if (!t0) continue;
      // repairing: read it again, an L1 repair above may have written into it
      const t = repair ? await readAt(dev, l2, cs) : t0;
      let dirty = false;
      for (let j = 0; j < g.l2Entries; j++) {
        readL2Entry(t, j, g, e);
        if ((e.hi & L2E_COMPRESSED_HI) !== 0) continue;
        const off = standardOffset(e);
        if (off === 0 && !(hasDataFile && (e.hi & L2E_COPIED_HI) !== 0)) continue;
        const rc2 = hasDataFile ? 1 : stored.get(Math.floor(off / cs));
        if ((rc2 === 1) !== ((e.hi & L2E_COPIED_HI) !== 0)) {
          const f: CheckFinding = { counts: 'corruption', message: `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${S(e.hi * 2 ** 32 + e.lo).padStart(16, '0')} refcount=${rc2} (host offset 0x${S(off)})`, offset: off, cluster: Math.floor(off / cs), fixed: false };
          a.findings.push(f);
          if (repair) {
            putU32(t, j * g.l2EntrySize, rc2 === 1 ? (e.hi | L2E_COPIED_HI) >>> 0 : (e.hi & ~L2E_COPIED_HI) >>> 0);
            dirty = true;
            f.fixed = true;
            report.corruptionsFixed++;
          } else a.corruptions++;
        }
      }
      if (dirty) await dev.write(l2, t);
    }
  }
}

/**
 * QEMU's rebuild_refcount_structure(): a new refcount table and blocks,
 * counting every reference found (and themselves), written after the end of
 * the file and flushed before the header points at them.
 */
async function rebuildRefcounts(img: Image, a: Analysis): Promise<void> {
  const { dev, g, parsed } = img;
  const h = parsed.header;
  const cs = g.clusterSize;
  const E = g.refcountBlockEntries;
  // the old structure is dropped: its clusters are no longer referenced
  for (let c = Math.floor(h.refcountTableOffset / cs); c < Math.floor(h.refcountTableOffset / cs) + h.refcountTableClusters; c++) a.counts.add(c, -1);
  for (const cluster of a.countedBlocks) a.counts.add(cluster, -1);
  const start = a.nbClusters;
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const total = start + blocks + tableClusters;
    const nb = Math.ceil(total / E);
    const nt = Math.ceil((nb * 8) / cs);
    if (nb <= blocks && nt <= tableClusters) break;
    blocks = Math.max(blocks, nb);
    tableClusters = Math.max(tableClusters, nt);
  }
  for (let c = start; c < start + blocks + tableClusters; c++) a.counts.add(c, 1);
  const table = new Uint8Array(tableClusters * cs);
  const max = maxRefcount(g.refcountOrder);
  for (let b = 0; b < blocks; b++) {
    const block = new Uint8Array(cs);
    for (let i = 0; i < E; i++) {
      const v = a.counts.get(b * E + i);
      if (v) setRefcount(block, i, g.refcountOrder, Math.min(v, max));
    }
    await dev.write((start + b) * cs, block);
    setRefcountTableEntry(table, b, (start + b) * cs);
  }
  await dev.write((start + blocks) * cs, table);
  await dev.flush();
  const hdr = new Uint8Array(12);
  putU64(hdr, 0, (start + blocks) * cs);
  putU32(hdr, 8, tableClusters);
  await dev.write(48, hdr);
  await dev.flush();
}

/**
 * The references to every host cluster, counted as the checker counts them:
 * the refcount rebuild of a dirty image uses it. `bitmaps: false` leaves
 * out persistent bitmaps (a read-write open has just invalidated them).
 * More references than refcount_bits can count is an E_OVERFLOW error.
 */
export async function countReferences(dev: BlockDevice, name: string, opts: { bitmaps?: boolean } = {}): Promise<{ get(cluster: number): number; endCluster: number }> {
  const img = await loadImage(dev, name);
  const a = await analyze(img, opts);
  const overflow = a.findings.find((f) => f.message.startsWith('ERROR: overflow'));
  if (overflow) throw new QledgerError('E_OVERFLOW', `${name}: ${overflow.message}`, { offset: overflow.offset });
  return { get: (c) => a.counts.get(c), endCluster: a.nbClusters };
}

async function loadImage(dev: BlockDevice, filename: string): Promise<Image> {
  const { parsed, snapshots, snapshotTableBytes } = await loadQcow2(dev);
  return { dev, parsed, snapshots, snapshotTableBytes, g: geometryOf(parsed.header), filename };
}

function emptyReport(filename: string): CheckReport {
  return {
    filename,
    format: 'qcow2',
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    findings: [],
    repairedFindings: [],
  };
}

async function onePass(img: Image, repair: RepairMode | undefined, report: CheckReport): Promise<Analysis> {
  const a = await analyze(img);
  const h = img.parsed.header;
  const reftable = await readAt(img.dev, h.refcountTableOffset, h.refcountTableClusters * img.g.clusterSize);
  const stored = new Stored(img, reftable, await img.dev.size());
  await stored.load(a.nbClusters);
  // As QEMU: compare without fixing first. When the refcount structure must
  // be rebuilt, nothing is written to the old one (its blocks may be guest
  // data now, a block an L2 entry points into), and -r leaks stops there.
  await compare(img, a, stored, repair, report);
  const rebuildNeeded = a.rebuild;
  if (rebuildNeeded && repair === 'all') {
    for (const f of a.findings) if (f.message.startsWith('ERROR cluster') || f.message.startsWith('Leaked cluster')) f.fixed = true;
    await rebuildRefcounts(img, a);
    report.corruptionsFixed += a.corruptions;
    report.leaksFixed += a.leaks;
    a.corruptions = 0;
    a.leaks = 0;
    a.rebuild = false;
    a.findings.push({ counts: 'none', message: 'Rebuilding refcount structure', fixed: true });
    return a;
  }
  if (rebuildNeeded && repair === 'leaks') {
    a.findings.push({ counts: 'check-error', message: 'ERROR need to rebuild refcount structures', fixed: false });
    a.checkErrors++;
    report.failure = 'Check failed: Input/output error';
    return a;
  }
  const fixCopied = repair === 'all' || (repair === 'leaks' && !a.checkErrors && !a.corruptions && !a.leaks);
  await checkCopied(img, a, stored, fixCopied, report);
  return a;
}

/** Check (and with `repair`, repair) the qcow2 image at `path`. */
export async function checkImage(path: string, opts: { repair?: RepairMode | undefined } = {}): Promise<CheckReport> {
  const dev = await FileDevice.open(path, { readOnly: opts.repair === undefined });
  try {
    return await checkDevice(dev, path, opts);
  } finally {
    await dev.close();
  }
}

/** Check (and repair) the qcow2 image on any device; the crash harness checks in-memory images. */
export async function checkDevice(dev: BlockDevice, path: string, opts: { repair?: RepairMode | undefined } = {}): Promise<CheckReport> {
  {
    if ((await probeFormat(dev)) !== 'qcow2') throw new QledgerError('E_FORMAT', `${path}: not a qcow2 image (check supports qcow2 only)`);
    let img = await loadImage(dev, path);
    const report = emptyReport(path);
    const h0 = img.parsed.header;
    if (opts.repair && h0.version === 3 && (h0.autoclearFeatures & AUTOCLEAR_JOURNAL) !== 0n) {
      // A repair changes refcounts behind the journal's back: the journal is stale from
      // now on and must never be replayed (QEMU's repair clears the bit the same way).
      const b = new Uint8Array(8);
      putU64(b, 0, h0.autoclearFeatures & ~AUTOCLEAR_JOURNAL);
      await dev.write(88, b);
      await dev.flush();
      img = await loadImage(dev, path);
    }
    let a = await onePass(img, opts.repair, report);
    if (opts.repair && !report.failure) {
      await dev.flush();
      report.repairedFindings = a.findings;
      // double check the fixed image, without repairing
      img = await loadImage(dev, path);
      a = await onePass(img, undefined, report);
      if (a.corruptions === 0 && a.leaks === 0 && a.checkErrors === 0 && (img.parsed.header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) {
        const b = new Uint8Array(8);
        putU64(b, 0, img.parsed.header.incompatibleFeatures & ~INCOMPAT_DIRTY);
        await dev.write(72, b);
        await dev.flush();
      }
    }
    const h = img.parsed.header;
    report.findings = a.findings;
    report.corruptions = a.corruptions;
    report.leaks = a.leaks;
    report.checkErrors = a.checkErrors;
    report.imageEndOffset = (a.highest + 1) * img.g.clusterSize;
    report.totalClusters = Math.ceil(h.size / img.g.clusterSize);
    report.allocatedClusters = a.allocated;
    report.fragmentedClusters = a.fragmented;
    report.compressedClusters = a.compressed;
    return report;
  }
}

/** qemu-img check's exit code for a report: 0 clean, 1 not completed, 2 corruptions, 3 leaks only. */
export function checkExitCode(r: CheckReport): number {
  if (r.failure || r.checkErrors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}

/** qemu-img check --output=json, field order as QEMU 7.2 prints it; zero counters omitted as QEMU does. */
export function checkJson(r: CheckReport): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  const put = (k: string, v: number) => {
    if (v) o[k] = v;
  };
  put('image-end-offset', r.imageEndOffset);
  put('compressed-clusters', r.compressedClusters);
  put('total-clusters', r.totalClusters);
  put('corruptions', r.corruptions);
  put('corruptions-fixed', r.corruptionsFixed);
  o['check-errors'] = r.checkErrors;
  put('leaks', r.leaks);
  put('leaks-fixed', r.leaksFixed);
  put('allocated-clusters', r.allocatedClusters);
  o['filename'] = r.filename;
  o['format'] = r.format;
  put('fragmented-clusters', r.fragmentedClusters);
  return o;
}

/** qemu-img check's human output (stdout part). */
export function checkHuman(r: CheckReport): string {
  let s = '';
  if (r.leaksFixed || r.corruptionsFixed) {
    s += `The following inconsistencies were found and repaired:\n\n    ${r.leaksFixed} leaked clusters\n    ${r.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`;
  }
  if (!r.corruptions && !r.leaks && !r.checkErrors) s += 'No errors were found on the image.\n';
  else {
    if (r.corruptions) s += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (r.leaks) s += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) s += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (r.totalClusters && r.allocatedClusters) {
    const pct = (x: number) => ((x / r.allocatedClusters) * 100).toFixed(2);
    s += `${r.allocatedClusters}/${r.totalClusters} = ${((r.allocatedClusters / r.totalClusters) * 100).toFixed(2)}% allocated, ${pct(r.fragmentedClusters)}% fragmented, ${pct(r.compressedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset > 0) s += `Image end offset: ${r.imageEndOffset}\n`;
  return s;
}

