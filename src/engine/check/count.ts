/**
 * Counting for the check, the way QEMU's qcow2_check_refcounts() counts so
 * that totals agree with `qemu-img check`: every reference to every host
 * cluster (the header, the active L1 and every snapshot L1 table, each L2
 * table once per L1 entry that names it, data and compressed clusters once
 * per L2 entry visit, the snapshot table, the refcount table, the bitmap
 * directory and tables, every refcount block); the stored refcounts they
 * are compared with are stored.ts's. A reference past the end of the file is
 * a corruption and is not counted. Also the reference count a dirty
 * image's refcount rebuild uses.
 *
 * Memory is proportional to the file (one 32-bit counter per cluster,
 * allocated in 64 Ki-cluster chunks only where references land), never to
 * what a damaged table claims.
 */

import { QledgerError, hexDigits, hexWord } from '../../errors.ts';
import { readAt, readClusters, type BlockDevice } from '../../io/device.ts';
import { geometryOf, type Geometry, type ParsedHeader } from '../../format/header.ts';
import { nonZeroEntries, u32 } from '../../format/bytes.ts';
import { AUTOCLEAR_BITMAPS, INCOMPAT_DATA_FILE } from '../../format/features.ts';
import { compressedDescriptor, isCompressed, isCopied, readL2Entry, standardOffset, type RawL2Entry, L2E_COMPRESSED_HI, L2E_COPIED_HI, L2E_OFFSET_MASK_HI, L2E_OFFSET_MASK_LO, L2E_STD_RESERVED_HI, L2E_STD_RESERVED_LO } from '../../format/l2.ts';
import { entryOffset, l1ReservedBits } from '../../format/l1.ts';
import { refcountTableEntry, maxRefcount } from '../../format/refcount.ts';
import { decodeBitmapDirectory } from '../../format/bitmaps.ts';
import type { SnapshotEntry } from '../../format/snapshot.ts';
import { loadQcow2 } from '../qcow2-layer.ts';
import { FindingList, type CheckFinding } from './report.ts';
import { cluster, clusterOf, host, type ClusterIndex } from '../../format/offsets.ts';

/** Counters per chunk: 65,536 clusters (256 KiB when whole). */
const COUNTS_CHUNK = 65536;
/** A chunk starts this short and doubles as references land further in, so that a small image's check zero-fills little (the crash harness checks thousands of them). */
const FIRST_LENGTH = 1024;

/** One counter per host cluster, in chunks allocated where references land. */
export class Counts {
  private readonly chunks = new Map<number, Uint32Array>();
  private lastKey = -1;
  private last: Uint32Array | undefined;
  private chunk(k: number, create: boolean): Uint32Array | undefined {
    if (k === this.lastKey) return this.last;
    let a = this.chunks.get(k);
    if (!a && create) this.chunks.set(k, (a = new Uint32Array(FIRST_LENGTH)));
    if (a) {
      this.lastKey = k;
      this.last = a;
    }
    return a;
  }
  /** Chunk k long enough for index i (a copy twice as long, or longer, as needed). */
  private grow(k: number, i: number): Uint32Array {
    const old = this.chunk(k, true)!;
    if (i < old.length) return old;
    let n = old.length * 2;
    while (n <= i) n *= 2;
    const a = new Uint32Array(Math.min(COUNTS_CHUNK, n));
    a.set(old);
    this.chunks.set(k, a);
    this.lastKey = k;
    this.last = a;
    return a;
  }
  get(c: ClusterIndex): number {
    return this.chunk(Math.floor(c / COUNTS_CHUNK), false)?.[c % COUNTS_CHUNK] ?? 0;
  }
  /** One more reference to `c`, unless it already has `max`: false then (nothing counted). */
  bump(c: number, max: number): boolean {
    const k = Math.floor(c / COUNTS_CHUNK);
    let a = k === this.lastKey ? this.last! : this.chunk(k, true)!;
    const i = c - k * COUNTS_CHUNK;
    if (i >= a.length) a = this.grow(k, i);
    if (a[i]! >= max) return false;
    a[i]!++;
    return true;
  }
  /** `n` more references to `c`, counted up to `max`: how many did not fit (0 when all did). */
  bumpBy(c: number, n: number, max: number): number {
    const k = Math.floor(c / COUNTS_CHUNK);
    let a = k === this.lastKey ? this.last! : this.chunk(k, true)!;
    const i = c - k * COUNTS_CHUNK;
    if (i >= a.length) a = this.grow(k, i);
    const room = max - a[i]!;
    if (n <= room) {
      a[i]! += n;
      return 0;
    }
    a[i] = max;
    return n - Math.max(0, room);
  }
  /** The counters of clusters [first, first + n) into out[0, n) (zeros where none were counted): a block at a time for the comparison. */
  copyRange(first: number, n: number, out: Uint32Array): void {
    for (let c = first; c < first + n; ) {
      const k = Math.floor(c / COUNTS_CHUNK);
      const i = c - k * COUNTS_CHUNK;
      const take = Math.min(first + n - c, COUNTS_CHUNK - i);
      const a = this.chunks.get(k);
      const have = a ? Math.max(0, Math.min(take, a.length - i)) : 0;
      if (have) out.set(a!.subarray(i, i + have), c - first);
      out.fill(0, c - first + have, c - first + take);
      c += take;
    }
  }
  add(c: ClusterIndex, d: number): void {
    const k = Math.floor(c / COUNTS_CHUNK);
    const i = c % COUNTS_CHUNK;
    const a = this.grow(k, i);
    a[i] = Math.max(0, a[i]! + d);
  }
}

export interface Analysis {
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
  readonly countedBlocks: ClusterIndex[];
  /** active L2 tables as read, kept (up to BATCH_BYTES) for the COPIED check */
  readonly activeTables: Map<number, Uint8Array>;
  /**
   * For the COPIED check without a second walk of the active tables: per cluster, bit 1 when an
   * active L2 entry names it with COPIED set, bit 2 when one names it without (undefined: not kept,
   * a data file or too many clusters). `copiedSlow`: an entry fell outside the marks. The comparison
   * then sets `copiedClean` when every marked cluster's stored refcount agrees with its entries.
   */
  readonly copiedMarks: Uint8Array | undefined;
  copiedSlow: boolean;
  copiedClean: boolean;
  /** cluster -> stored refcount, for clusters whose stored value differs */
  readonly mismatches: Array<{ cluster: number; stored: number; counted: number; /** the stored value exactly, when a number rounds it */ storedText?: string | undefined }>;
}

/** What one L2 table references and what is wrong in it, from one walk of it. */
interface TableWalk {
  /** corruptions in the table, reported at every reference to it (as QEMU reports them) */
  readonly findings: Array<{ readonly message: string; readonly offset: number }>;
  /** whole host clusters inside the file it references, one per entry: the first `nClusters` of a
   *  buffer every walk shares (a million pushes into fresh arrays were a seventh of a check's time) */
  readonly clusters: Float64Array;
  nClusters: number;
  /** other ranges it references inside the file (compressed, unaligned): offset, size pairs */
  readonly ranges: number[];
  allocated: number;
  compressed: number;
  fragmented: number;
  /** its entries' COPIED flags went into the analysis's copiedMarks */
  readonly marked: boolean;
}

export interface Image {
  readonly dev: BlockDevice;
  readonly parsed: ParsedHeader;
  readonly snapshots: readonly SnapshotEntry[];
  readonly snapshotTableBytes: number;
  readonly g: Geometry;
  readonly filename: string;
  /** stops the counting (never a repair that has started writing) */
  readonly signal?: AbortSignal | undefined;
  /** each finding as it is found (qledger check prints it then) */
  readonly onFinding?: ((f: CheckFinding) => void) | undefined;
  /** findings kept in the report at most (default: all) */
  readonly maxFindings?: number | undefined;
}


/** Tables read per batch: bounds memory whatever the image claims. */
export const BATCH_BYTES = 64 * 1024 * 1024;
/** Up to this many clusters in the file (a byte each), the counting walk keeps the COPIED marks. */
const MAX_COPIED_MARKS = 64 * 1024 * 1024;

/** The indices of an L1 table's entries that are not zero, in L1 order (4 bytes each, whatever the table holds). */
export function l1Used(l1: Uint8Array, count: number): Uint32Array {
  let n = 0;
  for (let i = 0; i < count; i++) if (u32(l1, i * 8) !== 0 || u32(l1, i * 8 + 4) !== 0) n++;
  const out = new Uint32Array(n);
  n = 0;
  for (let i = 0; i < count; i++) if (u32(l1, i * 8) !== 0 || u32(l1, i * 8 + 4) !== 0) out[n++] = i;
  return out;
}

/** L1 entry `i`: its two words and the L2 table offset it names. */
export function l1Entry(l1: Uint8Array, i: number): { i: number; hi: number; lo: number; l2: number } {
  const hi = u32(l1, i * 8);
  const lo = u32(l1, i * 8 + 4);
  return { i, hi, lo, l2: entryOffset(hi, lo) };
}

/**
 * Most references to L2 tables the counting groups (8 bytes each while it
 * counts them); past it, every reference walks its table again, as QEMU's do.
 */
export const GROUPED_REFERENCES = 2 ** 23;

/** How often each value that occurs more than once occurs (sorts `values` in place). */
export function repeated(values: Float64Array): Map<number, number> {
  const out = new Map<number, number>();
  values.sort();
  for (let i = 0; i < values.length; ) {
    let j = i + 1;
    while (j < values.length && values[j] === values[i]) j++;
    if (j - i > 1) out.set(values[i]!, j - i);
    i = j;
  }
  return out;
}

export async function analyze(img: Image, opts: { bitmaps?: boolean } = {}): Promise<Analysis> {
  const { dev, parsed, g } = img;
  const h = parsed.header;
  const cs = g.clusterSize;
  const fileSize = await dev.size();
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  const a: Analysis = {
    counts: new Counts(),
    findings: FindingList.create(img.onFinding, img.maxFindings),
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    rebuild: false,
    allocated: 0,
    fragmented: 0,
    compressed: 0,
    highest: 0, // as QEMU: the image end offset is at least one cluster
    nbClusters: Math.ceil(fileSize / cs),
    validBlocks: new Map(),
    countedBlocks: [],
    activeTables: new Map(),
    copiedMarks: hasDataFile || Math.ceil(fileSize / cs) > MAX_COPIED_MARKS ? undefined : new Uint8Array(Math.ceil(fileSize / cs)),
    copiedSlow: false,
    copiedClean: false,
    mismatches: [],
  };
  const corrupt = (message: string, offset?: number) => {
    a.corruptions++;
    a.findings.push({ counts: 'corruption', message, offset, cluster: offset === undefined ? undefined : Math.floor(offset / cs), fixed: false });
  };
  const maxCount = Math.min(maxRefcount(g.refcountOrder), 0xffff_ffff);
  // QEMU's two lines, its advice naming qledger's commands of the same names
  const overflow = (c: number) =>
    corrupt(`ERROR: overflow cluster offset=0x${hexDigits(c * cs)}\nUse qledger amend to increase the refcount entry width or qledger convert to create a clean copy if the image cannot be opened for writing`, c * cs);
  /**
   * What a reference to [offset, offset + size) is, as QEMU's counting sorts it: one whole
   * cluster inside the file (every data cluster and L2 table: the common case, first), nothing,
   * a range reaching a cluster or more past the end of the file (a corruption, not counted), or
   * another range. The image grows by what it reaches, as QEMU's in-memory refcount table grows
   * with the references (a cluster just past the end of the file is compared too).
   */
  const sortRef = (offset: number, size: number): 'whole' | 'none' | 'past' | 'range' => {
    if (size === cs && offset % cs === 0 && offset + cs <= fileSize) {
      if (offset / cs + 1 > a.nbClusters) a.nbClusters = offset / cs + 1;
      return 'whole';
    }
    if (size <= 0) return 'none';
    if (offset + size - fileSize >= cs) return 'past';
    const last = Math.floor((offset + size - 1) / cs);
    if (last + 1 > a.nbClusters) a.nbClusters = last + 1;
    return 'range';
  };
  const pastEnd = (offset: number, size: number, exact?: bigint) => `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hexDigits(exact ?? offset)} size 0x${hexDigits(size)}`;
  const inc = (offset: number, size: number, exact?: bigint) => {
    const kind = sortRef(offset, size);
    if (kind === 'whole' && !a.counts.bump(offset / cs, maxCount)) overflow(offset / cs);
    if (kind === 'past') corrupt(pastEnd(offset, size, exact), offset);
    if (kind !== 'range') return;
    for (let c = clusterOf(host(offset), cs); c <= Math.floor((offset + size - 1) / cs); c = cluster(c + 1)) {
      // QEMU stops counting at what refcount_bits can hold, and says so
      if (a.counts.get(c) >= maxCount) overflow(c);
      else a.counts.add(c, 1);
    }
  };

  // A table's references counted `n` times at once (once per reference to the table): QEMU
  // reports each reference past what refcount_bits can count, and so does this (at the first).
  const apply = (w: TableWalk, n: number) => {
    const cl = w.clusters;
    for (let i = 0; i < w.nClusters; i++) for (let x = a.counts.bumpBy(cl[i]!, n, maxCount); x > 0; x--) overflow(cl[i]!);
    for (let r = 0; r < w.ranges.length; r += 2) {
      const first = Math.floor(w.ranges[r]! / cs);
      const last = Math.floor((w.ranges[r]! + w.ranges[r + 1]! - 1) / cs);
      for (let c = first; c <= last; c++) for (let x = a.counts.bumpBy(c, n, maxCount); x > 0; x--) overflow(c);
    }
  };

  const e: RawL2Entry = { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 };
  const entryHex = () => hexWord(e.hi, e.lo);
  /** One walk of an L2 table: what it references and what is wrong in it, counted nowhere yet. */
  // at most one whole cluster per entry (an extended entry's is 16 bytes: fewer)
  const scratch = new Float64Array(cs / 8);
  const plain = !g.extendedL2 && !hasDataFile;
  const walkL2 = (table: Uint8Array, l2Offset: number, marks: Uint8Array | undefined): TableWalk => {
    const w: TableWalk = { findings: [], clusters: scratch, nClusters: 0, ranges: [], allocated: 0, compressed: 0, fragmented: 0, marked: marks !== undefined };
    const bad = (message: string, offset: number) => w.findings.push({ message, offset });
    // the reference a counting pass makes, kept for apply(); one past the end is reported at each reference
    const ref = (offset: number, size: number, exact?: bigint) => {
      const kind = sortRef(offset, size);
      if (kind === 'whole') w.clusters[w.nClusters++] = offset / cs;
      else if (kind === 'past') bad(pastEnd(offset, size, exact), offset);
      else if (kind === 'range') w.ranges.push(offset, size);
    };
    let next = 0;
    for (let j = 0; j < g.l2Entries; j++) {
      if (plain) {
        // the common entries first, as the general path below judges them: unallocated, or a
        // standard entry without reserved bits naming one whole aligned cluster inside the file
        const hi = u32(table, j * 8);
        const lo = u32(table, j * 8 + 4);
        if ((hi | lo) === 0) continue;
        const off = (hi & L2E_OFFSET_MASK_HI) * 2 ** 32 + ((lo & L2E_OFFSET_MASK_LO) >>> 0);
        if ((hi & (L2E_COMPRESSED_HI | L2E_STD_RESERVED_HI)) === 0 && (lo & L2E_STD_RESERVED_LO) === 0 && off !== 0 && off % cs === 0 && off + cs <= fileSize) {
          const c = off / cs;
          if (marks) {
            if (c < marks.length) marks[c]! |= hi & L2E_COPIED_HI ? 1 : 2;
            else a.copiedSlow = true;
          }
          w.allocated++;
          if (next && off !== next) w.fragmented++;
          next = off + cs;
          if (c + 1 > a.nbClusters) a.nbClusters = c + 1;
          w.clusters[w.nClusters++] = c;
          continue;
        }
      }
      readL2Entry(table, j, g, e);
      // the common case first: an unallocated entry (a table read past the end of the file is all of them)
      if ((e.hi | e.lo) === 0 && (!g.extendedL2 || (e.bitmapLo | e.bitmapHi) === 0)) continue;
      const compressed = isCompressed(e);
      if (!compressed && ((e.hi & L2E_STD_RESERVED_HI) !== 0 || (e.lo & L2E_STD_RESERVED_LO) !== 0)) {
        bad(`ERROR found l2 entry with reserved bits set: ${entryHex()} (L2 table at 0x${hexDigits(l2Offset)}, index ${j})`, l2Offset);
      }
      if (compressed) {
        if (isCopied(e)) {
          const d = compressedDescriptor({ ...e, hi: e.hi & ~L2E_COPIED_HI }, g.clusterBits);
          bad(`ERROR: coffset=0x${hexDigits(d.exactOffset)}: copied flag must never be set for compressed clusters`, d.offset);
        }
        if (hasDataFile) {
          bad(`ERROR compressed cluster ${j} with data file, entry=0x${entryHex()} (L2 table at 0x${hexDigits(l2Offset)})`, l2Offset);
          continue;
        }
        if (g.extendedL2 && ((e.bitmapHi | e.bitmapLo) >>> 0) !== 0) {
          bad(`ERROR compressed cluster ${j} with non-zero subcluster allocation bitmap, entry=0x${entryHex()}`, l2Offset);
          continue;
        }
        const d = compressedDescriptor({ ...e, hi: e.hi & ~L2E_COPIED_HI }, g.clusterBits);
        ref(d.offset, d.length, d.exactOffset);
        w.allocated++;
        w.compressed++;
        w.fragmented++;
        continue;
      }
      const off = standardOffset(e);
      const allocated = off !== 0 || (hasDataFile && isCopied(e));
      if (!allocated) {
        if (g.extendedL2 && (e.bitmapLo >>> 0) !== 0) bad(`ERROR: Unallocated cluster has non-zero subcluster allocation map (L2 table at 0x${hexDigits(l2Offset)}, index ${j})`, l2Offset);
        continue;
      }
      if (g.extendedL2 && ((e.bitmapHi & e.bitmapLo) >>> 0) !== 0) {
        bad(`ERROR offset=${hexDigits(off)}: Allocated cluster has corrupted subcluster allocation bitmap`, off);
      }
      if (off % cs !== 0) {
        const containsData = g.extendedL2 ? (e.bitmapLo >>> 0) !== 0 : (e.lo & 1) === 0;
        // QEMU reports it and still counts the (misaligned) range it names
        bad(`ERROR offset=${hexDigits(off)}: ${containsData ? 'Data' : 'Preallocated'} cluster is not properly aligned; L2 entry corrupted. (L2 table at 0x${hexDigits(l2Offset)}, index ${j})`, off);
      }
      if (marks) {
        const c = Math.floor(off / cs);
        if (c < marks.length) marks[c]! |= isCopied(e) ? 1 : 2;
        else a.copiedSlow = true;
      }
      w.allocated++;
      if (next && off !== next) w.fragmented++;
      next = off + cs;
      if (!hasDataFile) ref(off, cs);
    }
    return w;
  };

  // The L1 tables walked (the active one, then each snapshot's that can be read), and how often
  // each L2 table is named in all of them: a table is walked once, at its first reference, and
  // counted for all of them then; its findings are reported again at every reference, as QEMU's.
  const snapshotL1 = (sn: SnapshotEntry) => sn.l1Size <= 32 * 1024 * 1024 / 8 && sn.l1TableOffset % cs === 0;
  const l1Tables = [[h.l1TableOffset, h.l1Size], ...img.snapshots.filter(snapshotL1).map((sn) => [sn.l1TableOffset, sn.l1Size])] as Array<[number, number]>;
  // the references of every table named more than once (offsets sorted, runs counted: 8 bytes a
  // reference, where a map of every offset would take several times that)
  let remaining = new Map<number, number>();
  const l1Read = new Map<string, Uint8Array>();
  const total = l1Tables.reduce((t, [, size]) => t + size, 0);
  if (total <= GROUPED_REFERENCES) {
    const all = new Float64Array(total);
    let n = 0;
    for (const [off, size] of l1Tables) {
      if (!size) continue;
      const l1 = await readAt(dev, off, size * 8);
      // kept for the walk (at most GROUPED_REFERENCES * 8 bytes in all): each table read once
      l1Read.set(`${off}/${size}`, l1);
      for (const i of l1Used(l1, size)) all[n++] = l1Entry(l1, i).l2;
    }
    remaining = repeated(all.subarray(0, n));
  }
  const walked = new Map<number, TableWalk>();

  const walkL1 = async (l1Off: number, l1Size: number, frag: boolean) => {
    if (!l1Size) return;
    inc(l1Off, l1Size * 8);
    const l1 = l1Read.get(`${l1Off}/${l1Size}`) ?? (await readAt(dev, l1Off, l1Size * 8));
    l1Read.delete(`${l1Off}/${l1Size}`);
    const used = l1Used(l1, l1Size);
    const perBatch = Math.max(1, Math.floor(BATCH_BYTES / cs));
    for (let b = 0; b < used.length; b += perBatch) {
      img.signal?.throwIfAborted();
      const batch = Array.from(used.subarray(b, b + perBatch), (i) => l1Entry(l1, i));
      // like QEMU, read each table where the entry says, aligned or not (past the end reads as zeros)
      const aligned = await readClusters(dev, batch.filter((x) => x.l2 % cs === 0 && (frag || !walked.has(x.l2))).map((x) => x.l2), cs);
      if (frag) for (const [o, t] of aligned) if ((a.activeTables.size + 1) * cs <= BATCH_BYTES) a.activeTables.set(o, t);
      for (const { i, hi, lo, l2 } of batch) {
        if (l1ReservedBits(hi, lo)) corrupt(`ERROR found L1 entry with reserved bits set: ${hexWord(hi, lo)}`, l1Off + i * 8);
        inc(l2, cs);
        if (l2 % cs !== 0) corrupt(`ERROR l2_offset=${hexDigits(l2)}: Table is not cluster aligned; L1 entry corrupted (L1 index ${i})`, l2);
        let w = walked.get(l2);
        if (!w) {
          w = walkL2(aligned.get(l2) ?? (await readAt(dev, l2, cs)), l2, frag ? a.copiedMarks : undefined);
          apply(w, remaining.get(l2) ?? 1);
          // counted for every reference: only the findings are kept for the later ones
          w.nClusters = 0;
          w.ranges.length = 0;
        }
        else if (frag && !w.marked) a.copiedSlow = true;
        for (const f of w.findings) corrupt(f.message, f.offset);
        if (frag) {
          a.allocated += w.allocated;
          a.compressed += w.compressed;
          a.fragmented += w.fragmented;
        }
        const left = (remaining.get(l2) ?? 1) - 1;
        if (left > 0) {
          remaining.set(l2, left);
          walked.set(l2, w);
        } else {
          remaining.delete(l2);
          walked.delete(l2);
        }
      }
    }
  };

  // QEMU's qcow2_check_read_snapshot_table: a v3 snapshot entry needs 16 bytes of extra data (vm_state_size_large, disk_size)
  if (h.version >= 3) img.snapshots.forEach((sn, i) => sn.diskSize === undefined && corrupt(`ERROR snapshot table entry ${i} is incomplete`, h.snapshotsOffset));
  inc(0, cs);
  await walkL1(h.l1TableOffset, h.l1Size, true);
  if (hasDataFile && img.snapshots.length) corrupt(`ERROR ${img.snapshots.length} snapshots in image with data file`);
  for (const sn of img.snapshots) {
    if (sn.l1Size > 32 * 1024 * 1024 / 8) {
      corrupt(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hexDigits(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
      continue;
    }
    if (sn.l1TableOffset % cs !== 0) {
      corrupt(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hexDigits(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`, sn.l1TableOffset);
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
        inc(bm.tableOffset, bm.tableSize * 8, bm.exactTableOffset);
        if (bm.tableOffset + bm.tableSize * 8 > fileSize) continue;
        const t = await readAt(dev, bm.tableOffset, bm.tableSize * 8);
        for (let i = 0; i < bm.tableSize; i++) {
          const off = entryOffset(u32(t, i * 8), u32(t, i * 8 + 4));
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
  for (const i of nonZeroEntries(reftable)) {
    const { offset, reservedBits } = refcountTableEntry(reftable, i);
    if (reservedBits) {
      corrupt(`ERROR refcount table entry ${i} has reserved bits set`, h.refcountTableOffset + i * 8);
      a.rebuild = true;
      continue;
    }
    if (!offset) continue;
    const blockCluster = clusterOf(host(offset), cs);
    if (offset % cs !== 0) {
      corrupt(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted (offset 0x${hexDigits(offset)})`, offset);
      a.rebuild = true;
      continue;
    }
    if (blockCluster >= a.nbClusters) {
      corrupt(`ERROR refcount block ${i} is outside image (offset 0x${hexDigits(offset)})`, offset);
      a.rebuild = true;
      continue;
    }
    inc(offset, cs);
    a.countedBlocks.push(blockCluster);
    if (a.counts.get(blockCluster) !== 1) {
      corrupt(`ERROR refcount block ${i} refcount=${a.counts.get(blockCluster)} (offset 0x${hexDigits(offset)})`, offset);
      a.rebuild = true;
      continue;
    }
    a.validBlocks.set(i, blockCluster);
  }
  return a;
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
  return { get: (c) => a.counts.get(cluster(c)), endCluster: a.nbClusters };
}

export async function loadImage(dev: BlockDevice, filename: string, signal?: AbortSignal, findings: Pick<Image, 'onFinding' | 'maxFindings'> = {}): Promise<Image> {
  const { parsed, snapshots, snapshotTableBytes } = await loadQcow2(dev);
  return { dev, parsed, snapshots, snapshotTableBytes, g: geometryOf(parsed.header), filename, signal, ...findings };
}
