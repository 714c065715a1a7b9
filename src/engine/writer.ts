/**
 * The write engine for one qcow2 image: guest write, write-zeroes, discard,
 * truncate, flush and close. Every metadata change is a record (src/journal)
 * applied to the immutable state (src/state) inside one transaction per
 * guest operation; records accumulate until a flush, where ordering.ts turns
 * them into device writes and barriers. Guest data goes to the device at
 * once, to fresh clusters nothing durable points at, or in place into
 * clusters this image owns alone (COPIED).
 *
 * Reads go through a Qcow2Layer whose tables come from the live state, so a
 * read after a write sees it before any flush.
 */

import { deflateRawSync } from 'node:zlib';
import { CorruptionError, QledgerError, RangeRequestError, UsageError, hex } from '../errors.ts';
import type { BlockDevice } from '../io/device.ts';
import { readAt } from '../io/device.ts';
import { isZero } from '../format/bytes.ts';
import { geometryOf, putMutableFields, type Geometry } from '../format/header.ts';
import {
  AUTOCLEAR_KNOWN,
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_JOURNAL,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  COMPRESSION_DEFLATE,
} from '../format/features.ts';
import {
  L2E_COMPRESSED_HI,
  L2E_COPIED_HI,
  L2E_OFFSET_MASK_HI,
  L2E_OFFSET_MASK_LO,
  L2E_ZERO_LO,
  compressedDescriptor,
  encodeCompressedDescriptor,
  subclusterType,
  type RawL2Entry,
} from '../format/l2.ts';
import { maxRefcount } from '../format/refcount.ts';
import { MAX_L1_BYTES, MAX_REFTABLE_BYTES } from '../format/limits.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import type { JournalRecord, L2Word, MetaRecord, Word64 } from '../journal/records.ts';
import {
  Transaction,
  initialState,
  readL2Word,
  l1TableOffset as stateL1Offset,
  reftableEntry as stateReftableEntry,
  l1Bytes as stateL1Bytes,
  reftableBytes as stateReftableBytes,
  refcountOf,
  type HeaderState,
  type MetaState,
} from '../state/state.ts';
import { PTrie } from '../state/ptrie.ts';
import { Qcow2Layer, type Qcow2LayerOptions, type TableSource } from './qcow2-layer.ts';
import { guest } from './layer.ts';
import { readGuest } from './read.ts';
import { planFlush, type DeviceWrite, type Fault } from './ordering.ts';
import { encodedLength } from '../journal/codec.ts';
import { activateJournal, type JournalLog, type JournalPlan } from './journal.ts';
import type { ParsedHeader } from '../format/header.ts';

export type TraceEvent =
  | { readonly type: 'record'; readonly record: JournalRecord }
  | { readonly type: 'write'; readonly offset: number; readonly length: number; readonly what: string }
  | { readonly type: 'flush' }
  | { readonly type: 'truncate'; readonly size: number };

/** What a writer opens: the image's files and header, as a read-only layer takes them, plus options. */
export interface WriterOptions extends Pick<Qcow2LayerOptions, 'filename' | 'dev' | 'dataDev' | 'parsed' | 'fileSize' | 'snapshots' | 'backing'> {
  /** receives every record, device write and flush, in order */
  readonly trace?: TraceEvent[] | undefined;
  /**
   * Hold at most this many metadata records before writing them back
   * (a flush without the final barrier's guarantee to the caller).
   */
  readonly writebackRecords?: number | undefined;
  /** test-only: break one ordering rule (see FAULTS in ordering.ts) */
  readonly fault?: Fault | undefined;
  /**
   * Keep a durable journal (journal.ts), started at the first write-back
   * that changes metadata, so that an open that writes nothing changes
   * nothing. None: QEMU's plain ordered write-back.
   */
  readonly journal?: JournalPlan | undefined;
  /** receives warnings (no room for the journal, say) */
  readonly onWarning?: ((message: string) => void) | undefined;
  /** test-only: stop a write-back after this many ordered phases, as a power cut would (the writer is dead afterwards) */
  readonly stopAfterPhase?: number | undefined;
  /** bytes of clean L2 tables and refcount blocks kept after a write-back (default 64 MiB) */
  readonly cacheBytes?: number | undefined;
  /**
   * QEMU's detect-zeroes: a data write whose payload is all zeros becomes a
   * zero write ('on'), one that may deallocate ('unmap', the default here:
   * zero writes are de-allocation hints), or stays a data write ('off').
   */
  readonly detectZeroes?: DetectZeroes | undefined;
}

export type DetectZeroes = 'off' | 'on' | 'unmap';

export interface ZeroOptions {
  /** allow deallocation (qemu-io write -z -u) */
  readonly unmap?: boolean | undefined;
}

const ZERO_ENTRY: L2Word = { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 };
const ALL_SUBCLUSTERS = 0xffff_ffff;

const w64 = (n: number, copied = false): Word64 => ({
  hi: (Math.floor(n / 0x1_0000_0000) & L2E_OFFSET_MASK_HI) | (copied ? L2E_COPIED_HI : 0),
  lo: (n % 0x1_0000_0000) >>> 0,
});

function entryOffset(e: L2Word): number {
  return (e.hi & L2E_OFFSET_MASK_HI) * 0x1_0000_0000 + ((e.lo & L2E_OFFSET_MASK_LO) >>> 0);
}

function sameEntry(a: L2Word, b: L2Word): boolean {
  return a.hi === b.hi && a.lo === b.lo && a.bitmapHi === b.bitmapHi && a.bitmapLo === b.bitmapLo;
}

/** Bits s0..s1 of a 32-bit subcluster bitmap. */
function bits(s0: number, s1: number): number {
  let m = 0;
  for (let s = s0; s <= s1; s++) m |= 1 << s;
  return m >>> 0;
}

export class Qcow2Writer {
  readonly layer: Qcow2Layer;
  readonly geometry: Geometry;
  readonly filename: string;
  private readonly dev: BlockDevice;
  private readonly dataDev: BlockDevice | undefined;
  private readonly trace: TraceEvent[] | undefined;
  private readonly writeback: number;
  /** table bytes kept in memory after a write-back (the rest reloads from disk) */
  private readonly cacheBytes: number;
  private readonly hasDataFile: boolean;
  private readonly version: 2 | 3;
  /** header bytes 0 .. fixed-field end, patched on every header write */
  private readonly headerTemplate: Uint8Array;

  private cur: MetaState;
  private durable: MetaState;
  private tx: Transaction | undefined;
  private pending: MetaRecord[] = [];
  private dataWritten = false;
  private txCounter = 0;
  /** allocation search starts here (cluster index) */
  private cursor = 0;
  /** lowest cluster freed since the last flush: reusable once that flush is done */
  private freedMin = Infinity;
  /** one past the highest cluster in use or allocated */
  private endCluster: number;
  /** the device reads as zero from here on (nothing ever written there) */
  private zeroFrom: number;
  /** host clusters holding metadata, for the overlap check on every data write */
  private readonly metadata = new Map<number, string>();
  private corrupt = false;
  private closed = false;
  private dirtyOnDisk: boolean;
  private queue: Promise<unknown> = Promise.resolve();
  private readonly fault: Fault | undefined;
  private readonly detectZeroes: DetectZeroes;
  /**
   * v2 over a backing file has no zero flag: whole zero clusters map to one
   * shared zero cluster instead. It only ever exists with two or more
   * references (so no entry that maps it needs COPIED); `refs` are the
   * active L2 entries known to map it.
   */
  private zero: { cluster: number; refs: Map<string, { l1Index: number; index: number }> } | undefined;
  private zeroSearched = false;
  /** the host cluster compressed writes are packing into, and the bytes used */
  private compressedTail: { cluster: number; used: number } | undefined;
  private readonly compressionType: number;
  /** clusters freed since the last write-back: their space goes back to the file system after it */
  private readonly freedInEpoch = new Set<number>();
  /** fault 'data-after-mapping': guest data held back until the references are written */
  private readonly holding: HoldingDevice | undefined;
  private journalPlan: JournalPlan | undefined;
  private journal: JournalLog | undefined;
  /** the journal is started and its bit durable in the header: write-backs are journalled */
  private journalLive = false;
  /**
   * AUTOCLEAR_JOURNAL is on disk. The bit lives outside the state (as the
   * dirty bit does): every header this writer encodes carries it while set.
   */
  private journalBitOnDisk = false;
  private readonly extensions: ParsedHeader['extensions'];
  /** the bit is not on disk yet: the first transaction's flush carries it */
  private journalBitToWrite = false;
  /** after the first transaction's flush: make the new extension part of the header */
  private journalFinish: (() => Promise<void>) | undefined;
  private readonly onWarning: ((message: string) => void) | undefined;
  /** records and operation markers since the last write-back, for the journal */
  private stream: JournalRecord[] = [];
  private streamBytes = 0;
  /** guest data went to the device since the last barrier */
  private dataSinceBarrier = false;
  private readonly stopAfterPhase: number | undefined;

  private constructor(o: WriterOptions, state: MetaState, snapshots: readonly SnapshotEntry[]) {
    this.filename = o.filename;
    this.dev = o.dev;
    this.dataDev = o.dataDev;
    this.trace = o.trace;
    this.writeback = o.writebackRecords ?? 200_000;
    this.cacheBytes = o.cacheBytes ?? 64 * 1024 * 1024;
    this.fault = o.fault;
    this.compressionType = o.parsed.header.compressionType;
    this.detectZeroes = o.detectZeroes ?? 'unmap';
    this.holding = o.fault === 'data-after-mapping' && !o.dataDev ? new HoldingDevice(o.dev) : undefined;
    this.journalPlan = o.parsed.header.version === 3 ? o.journal : undefined;
    this.extensions = o.parsed.extensions;
    this.onWarning = o.onWarning;
    this.stopAfterPhase = o.stopAfterPhase;
    const h = o.parsed.header;
    this.version = h.version;
    this.geometry = geometryOf(h);
    this.hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    this.cur = state;
    this.durable = state;
    const cs = this.geometry.clusterSize;
    this.endCluster = Math.ceil(o.fileSize / cs);
    this.zeroFrom = Math.ceil(o.fileSize / cs) * cs;
    this.dirtyOnDisk = (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
    const fixed = h.version === 2 ? 72 : Math.min(h.headerLength, 112);
    this.headerTemplate = new Uint8Array(fixed);
    const source: TableSource = {
      l1Size: () => (this.tx ? this.tx.header.l1Size : this.cur.header.l1Size),
      l1Offset: (i) => (this.tx ? this.tx.l1TableOffset(i) : stateL1Offset(this.cur, i)),
      l2Table: (off, l1Index) => this.l2ForRead(off, l1Index),
      fileSize: () => Math.max(this.endCluster * cs, this.zeroFrom),
    };
    this.layer = new Qcow2Layer({
      filename: o.filename,
      dev: o.dev,
      dataDev: this.holding ?? o.dataDev,
      parsed: o.parsed,
      fileSize: o.fileSize,
      snapshots,
      l1: new Uint8Array(0),
      l1Size: 0,
      size: h.size,
      backing: o.backing,
      source,
    });
    // metadata map for overlap checks: header, L1, refcount table, snapshot table and L1s
    this.markMetadata(0, cs, 'header');
    this.markMetadata(h.l1TableOffset, h.l1Size * 8, 'active L1 table');
    this.markMetadata(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table');
    for (const sn of snapshots) this.markMetadata(sn.l1TableOffset, sn.l1Size * 8, 'inactive L1 table');
    // the journal area has refcount 0 (QEMU must not count it): the allocator and overlap checks skip it by this map
    if (this.journalPlan?.reuse) this.markMetadata(this.journalPlan.reuse.offset, this.journalPlan.reuse.size, 'journal');
  }

  /** Open for writing; the caller opened `dev` read-write and validated the header. */
  static async open(o: WriterOptions): Promise<Qcow2Writer> {
    const h = o.parsed.header;
    if ((h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) {
      throw new CorruptionError(`${o.filename}: image is marked corrupt (header incompatible_features bit 1 at offset 0x48); cannot be opened read/write. Run 'qledger check -r all' first`, { path: o.filename });
    }
    const g = geometryOf(h);
    const l1 = await readAt(o.dev, h.l1TableOffset, h.l1Size * 8);
    const reftable = await readAt(o.dev, h.refcountTableOffset, h.refcountTableClusters * g.clusterSize);
    const state = initialState(
      g,
      {
        size: h.size,
        l1Offset: h.l1TableOffset,
        l1Size: h.l1Size,
        reftableOffset: h.refcountTableOffset,
        reftableClusters: h.refcountTableClusters,
        incompatibleFeatures: h.incompatibleFeatures,
        compatibleFeatures: h.compatibleFeatures,
        // a journalled session keeps the journal bit outside the state (see journalBitOnDisk)
        autoclearFeatures: o.journal && h.version === 3 ? h.autoclearFeatures & ~AUTOCLEAR_JOURNAL : h.autoclearFeatures,
      },
      l1,
      reftable,
    );
    const w = new Qcow2Writer(o, state, o.snapshots);
    w.journalBitOnDisk = w.journalPlan !== undefined && (h.autoclearFeatures & AUTOCLEAR_JOURNAL) !== 0n;
    w.headerTemplate.set((await readAt(o.dev, 0, w.headerTemplate.length)));
    const cs = g.clusterSize;
    for (let i = 0; i < h.l1Size; i++) {
      const off = stateL1Offset(state, i);
      if (off) w.metadata.set(off / cs, 'active L2 table');
    }
    for (let i = 0; i < (h.refcountTableClusters * cs) / 8; i++) {
      const off = stateReftableEntry(state, i);
      if (off) w.metadata.set(off / cs, 'refcount block');
    }
    if (h.nbSnapshots) w.markMetadata(h.snapshotsOffset, 1, 'snapshot table');
    // Unknown autoclear bits say "an extension I do not maintain may be stale
    // now": clear them before the first write, as QEMU does. qledger does not
    // maintain persistent bitmaps either, so their bit goes too. A session
    // without a journal clears the journal's bit too; a journalled one keeps
    // it (outside the state) and sets it when the journal starts.
    const had = w.cur.header.autoclearFeatures;
    const keep = had & AUTOCLEAR_KNOWN & ~AUTOCLEAR_BITMAPS;
    if (h.version === 3 && keep !== had) {
      // one sector, safe at any crash: not worth starting the journal for
      const plan = w.journalPlan;
      w.journalPlan = undefined;
      await w.run('clear autoclear bits', async () => {
        w.emit({ kind: 'header', field: 'autoclear_features', old: had, new: keep });
      });
      await w.flushNow(); // the cleared bits reach the disk before any write
      w.journalPlan = plan;
    }
    return w;
  }

  // ---- public operations ---------------------------------------------------

  get size(): number {
    return this.header().size;
  }

  /** write-backs go through the durable journal (v3 image, journal on, room for its header extension) */
  get journalled(): boolean {
    return this.journalLive;
  }

  get lazyRefcounts(): boolean {
    return (this.header().compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
  }

  /** The committed metadata state (immutable). */
  get state(): MetaState {
    return this.cur;
  }

  read(offset: number, out: Uint8Array): Promise<void> {
    return this.serial(() => readGuest(this.layer, guest(offset), out));
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.serial(async () => {
      this.checkRange('write', offset, data.length);
      if (data.length === 0) return;
      // isZero stops at the first 4 KiB block with a non-zero byte: data costs almost nothing
      if (this.detectZeroes !== 'off' && isZero(data)) {
        await this.run('write (zero detected)', () => this.zeroRange(offset, data.length, this.detectZeroes === 'unmap'));
      } else await this.run('write', () => this.writeData(offset, data));
      await this.maybeWriteback();
    });
  }

  /**
   * Compressed write (qemu-io write -c): whole clusters only, each into a
   * cluster that has no data yet; deflate with QEMU's parameters. A cluster
   * that does not compress below the cluster size is written normally.
   */
  writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    return this.serial(async () => {
      this.checkRange('compressed write', offset, data.length);
      const g = this.geometry;
      const cs = g.clusterSize;
      const end = offset + data.length;
      if (offset % cs !== 0 || (end % cs !== 0 && end !== this.size)) {
        throw new RangeRequestError(`compressed write at ${hex(offset)} of ${data.length} bytes: compressed writes take whole clusters`, { offset, length: data.length });
      }
      if (this.hasDataFile) throw new QledgerError('E_UNSUPPORTED', `${this.filename}: compressed writes are not possible with an external data file`);
      if (this.compressionType !== COMPRESSION_DEFLATE) throw new QledgerError('E_UNSUPPORTED', `${this.filename}: compressed writes need compression_type=zlib (there is no zstd compressor here)`);
      await this.run('compressed write', async () => {
        for (let c = offset; c < end; c += cs) await this.writeCompressedCluster(c, data.subarray(c - offset, Math.min(end, c + cs) - offset));
      });
      await this.maybeWriteback();
    });
  }

  private async writeCompressedCluster(guestOff: number, piece: Uint8Array): Promise<void> {
    const g = this.geometry;
    const cs = g.clusterSize;
    const span = g.l2Entries * cs;
    const l1Index = Math.floor(guestOff / span);
    const t = this.t();
    await this.l2ForWrite(l1Index);
    const table = t.l1TableOffset(l1Index);
    const index = (guestOff / cs) % g.l2Entries;
    const e = readL2Word(t.l2(l1Index)!, index, g);
    await this.validateEntry(e, table, index, guestOff);
    if ((e.hi & L2E_COMPRESSED_HI) !== 0 || entryOffset(e) !== 0) {
      // as QEMU: a compressed write never goes to a cluster that already holds data
      throw new QledgerError('E_IO', `${this.filename}: compressed write to guest offset ${hex(guestOff)}, which already has a host cluster`, { guestOff });
    }
    const full = piece.length === cs ? piece : (() => {
      const b = new Uint8Array(cs);
      b.set(piece);
      return b;
    })();
    // QEMU's deflate: raw stream, 4 KiB window (-12), default level, memLevel 9
    const z = deflateRawSync(full, { windowBits: 12, memLevel: 9 });
    if (z.length >= cs) {
      await this.writeData(guestOff, piece);
      return;
    }
    // pack into the cluster the last compressed write used, while it is still in use and has room
    let at: number;
    const tail = this.compressedTail;
    const tailRefs = tail ? await this.refcount(tail.cluster) : 0;
    // a full refcount (narrow refcount_bits) starts a new cluster, as QEMU's qcow2_alloc_bytes does
    if (tail && tail.used + z.length <= cs && tailRefs > 0 && tailRefs < maxRefcount(g.refcountOrder)) {
      at = tail.cluster * cs + tail.used;
      await this.changeRefcount(tail.cluster, 1);
      tail.used += z.length;
    } else {
      const n = await this.allocate(1);
      at = n * cs;
      this.compressedTail = { cluster: n, used: z.length };
    }
    await this.deviceWrites([{ offset: at, data: new Uint8Array(z.buffer, z.byteOffset, z.length), what: 'compressed data' }]);
    const d = encodeCompressedDescriptor(at, z.length, g.clusterBits);
    this.emit({ kind: 'l2', l1Index, table, index, old: e, new: { hi: d.hi, lo: d.lo, bitmapHi: 0, bitmapLo: 0 } });
  }

  writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.serial(async () => {
      this.checkRange('write zeroes', offset, length);
      if (length === 0) return;
      await this.run('write-zeroes', () => this.zeroRange(offset, length, opts.unmap ?? false));
      await this.maybeWriteback();
    });
  }

  discard(offset: number, length: number): Promise<void> {
    return this.serial(async () => {
      this.checkRange('discard', offset, length);
      if (length === 0) return;
      await this.run('discard', () => this.discardRange(offset, length));
      await this.maybeWriteback();
    });
  }

  /**
   * Change the virtual size. Growing over a longer backing file zeroes the
   * new space so the backing data stays hidden, as QEMU does; image creation
   * passes `fromCreate` because there the backing data must show through.
   */
  truncate(size: number, fromCreate = false, prealloc: 'off' | 'metadata' | 'falloc' | 'full' = 'off'): Promise<void> {
    const old = this.size;
    const p = this.serial(async () => {
      this.checkWritable();
      if (!Number.isSafeInteger(size) || size < 0) throw new RangeRequestError(`invalid size ${size}`, { size });
      if (size % 512 !== 0) throw new UsageError(`${this.filename}: the new size must be a multiple of 512 bytes (got ${size})`);
      if (prealloc !== 'off' && size < old) throw new UsageError(`${this.filename}: preallocation mode '${prealloc}' applies to growth only`);
      if (prealloc !== 'off' && old % this.geometry.clusterSize !== 0) {
        throw new QledgerError('E_UNSUPPORTED', `${this.filename}: growing with preallocation from a size that is not a multiple of the cluster size is not supported`);
      }
      await this.run('truncate', () => this.resize(size, !fromCreate));
      this.layer.size = size;
      await this.flushNow();
    });
    return prealloc === 'off' ? p : p.then(() => this.preallocate(prealloc, old));
  }

  flush(): Promise<void> {
    return this.serial(() => this.flushNow());
  }

  /** Flush, then (lazy refcounts) write the exact refcounts and clear the dirty bit, then close the files. */
  close(): Promise<void> {
    return this.serial(async () => {
      if (this.closed) return;
      try {
        if (!this.corrupt) {
          await this.flushNow();
          if (this.dirtyOnDisk) await this.cleanDirty();
          // The frames are no longer needed: their space goes back to the file system.
          // The last checkpoint needs no flush: replaying an applied transaction is harmless.
          if (this.journal) await this.dev.discard(this.journal.ext.offset + 512, this.journal.ext.size - 512);
        }
      } finally {
        this.closed = true;
        await this.layer.close();
      }
    });
  }

  /** Close the files without flushing anything (a simulated crash). */
  async abandon(): Promise<void> {
    this.closed = true;
    await this.layer.close();
  }

  // ---- plumbing ----------------------------------------------------------

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.queue.then(fn, fn);
    this.queue = p.catch(() => undefined);
    return p;
  }

  /** Header fields of the live state: through the open transaction, if any. */
  private header(): HeaderState {
    return this.tx ? this.tx.header : this.cur.header;
  }


  private t(): Transaction {
    if (!this.tx) throw new Error('no transaction open');
    return this.tx;
  }

  /** One guest operation = one transaction: each table is copied at most once. */
  private async run(op: string, fn: () => Promise<void>): Promise<void> {
    this.checkWritable();
    const id = ++this.txCounter;
    this.traceEvent({ type: 'record', record: { kind: 'begin', tx: id, op } });
    if (this.journalPlan) this.streamPush({ kind: 'begin', tx: id, op });
    this.tx = new Transaction(this.cur);
    try {
      await fn();
      if (this.zero) await this.settleZero();
    } finally {
      // Records already emitted describe changes that may already rely on
      // data written to the device; keep them even if the operation failed.
      this.cur = this.tx.finish();
      this.tx = undefined;
    }
    this.traceEvent({ type: 'record', record: { kind: 'commit', tx: id } });
    if (this.journalPlan) {
      // an operation that changed no metadata leaves nothing in the stream
      const last = this.stream[this.stream.length - 1];
      if (last?.kind === 'begin' && last.tx === id) {
        this.stream.pop();
        this.streamBytes -= encodedLength(last);
      } else this.streamPush({ kind: 'commit', tx: id });
    }
  }

  private streamPush(r: JournalRecord): void {
    this.stream.push(r);
    this.streamBytes += encodedLength(r);
  }

  private emit(r: MetaRecord): void {
    this.t().apply(r);
    this.pending.push(r);
    if (this.journalPlan) this.streamPush(r);
    this.traceEvent({ type: 'record', record: r });
    if (r.kind === 'refcount' && r.new === 0 && r.old > 0) {
      this.freedInEpoch.add(r.cluster);
      this.metadata.delete(r.cluster);
      if (r.cluster < this.freedMin) this.freedMin = r.cluster;
      if (this.fault === 'reuse-before-durable' && r.cluster < this.cursor) this.cursor = r.cluster;
    }
  }

  private traceEvent(e: TraceEvent): void {
    this.trace?.push(e);
  }

  private checkWritable(): void {
    if (this.closed) throw new QledgerError('E_USAGE', `${this.filename}: image is closed`);
    if (this.corrupt) throw new CorruptionError(`${this.filename}: image is marked corrupt; writes are refused`, { path: this.filename });
    if (this.dev.readOnly) throw new QledgerError('E_READ_ONLY', `${this.filename}: opened read-only`);
  }

  private checkRange(what: string, offset: number, length: number): void {
    this.checkWritable();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new RangeRequestError(`${what}: offset ${offset} and length ${length} must be non-negative integers`, { offset, length });
    }
    if (offset + length > this.size) {
      throw new RangeRequestError(`${what} of ${length} bytes at ${hex(offset)} is past the end of the ${this.size}-byte disk`, { offset, length });
    }
  }

  private markMetadata(offset: number, bytes: number, what: string): void {
    const cs = this.geometry.clusterSize;
    if (bytes <= 0) return;
    for (let c = Math.floor(offset / cs); c * cs < offset + bytes; c++) this.metadata.set(c, what);
  }

  private async signalCorruption(message: string, data: Record<string, unknown> = {}): Promise<never> {
    const msg = `${this.filename}: ${message}`;
    if (!this.corrupt && !this.dev.readOnly && this.version === 3) {
      // Mark the image corrupt on disk at once, outside the ordered stream:
      // nothing else may be written to it now (QEMU's qcow2_signal_corruption).
      const h = this.durable.header;
      const hdr = this.encodeHeader({ ...h, incompatibleFeatures: h.incompatibleFeatures | INCOMPAT_CORRUPT });
      await this.dev.write(0, hdr);
      this.traceEvent({ type: 'write', offset: 0, length: hdr.length, what: 'header (corrupt bit)' });
      await this.dev.flush();
      this.traceEvent({ type: 'flush' });
    }
    this.corrupt = true;
    throw new CorruptionError(`${msg}; the image is marked corrupt and writes are refused`, data);
  }

  // ---- tables ------------------------------------------------------------

  /** For reads: L2 table of `l1Index` from the live state, loaded on demand. */
  private async l2ForRead(off: number, l1Index: number): Promise<Uint8Array> {
    const t = this.tx ?? undefined;
    const have = t ? t.l2(l1Index) : this.cur.l2.get(l1Index);
    if (have) return have;
    return this.loadL2(l1Index, off);
  }

  private async loadL2(l1Index: number, off: number): Promise<Uint8Array> {
    const cs = this.geometry.clusterSize;
    if (off % cs !== 0) await this.signalCorruption(`L2 table offset ${hex(off)} unaligned (L1 index: ${hex(l1Index)})`, { l1Index, l2Offset: off });
    if (off < cs || off + cs > Math.max(this.endCluster * cs, this.zeroFrom)) {
      await this.signalCorruption(`L2 table offset ${hex(off)} (L1 index: ${hex(l1Index)}) lies outside the image`, { l1Index, l2Offset: off });
    }
    const what = this.metadata.get(off / cs);
    if (what !== undefined && what !== 'active L2 table') {
      await this.signalCorruption(`L2 table at ${hex(off)} (L1 index: ${hex(l1Index)}) overlaps the ${what}`, { l1Index, l2Offset: off });
    }
    const bytes = await readAt(this.dev, off, cs);
    // Loading is not a change: the table joins both the live and the durable state.
    if (this.tx) this.tx.load('l2', l1Index, bytes);
    else this.cur = { ...this.cur, l2: this.cur.l2.set(l1Index, bytes) };
    if (this.durable.l2.get(l1Index) === undefined) this.durable = { ...this.durable, l2: this.durable.l2.set(l1Index, bytes) };
    return bytes;
  }

  private async refblock(rt: number, off: number): Promise<Uint8Array> {
    const t = this.t();
    const have = t.refblock(rt);
    if (have) return have;
    const cs = this.geometry.clusterSize;
    if (off % cs !== 0 || off < cs) await this.signalCorruption(`refcount block offset ${hex(off)} invalid (refcount table index: ${hex(rt)})`, { rt, offset: off });
    const bytes = await readAt(this.dev, off, cs);
    t.load('refblock', rt, bytes);
    if (this.durable.refblocks.get(rt) === undefined) this.durable = { ...this.durable, refblocks: this.durable.refblocks.set(rt, bytes) };
    return bytes;
  }

  /** Refcount of `cluster` in the live state; 0 where no refcount block exists. */
  private async refcount(cluster: number): Promise<number> {
    const t = this.t();
    const E = this.geometry.refcountBlockEntries;
    const rt = Math.floor(cluster / E);
    const off = t.reftableEntry(rt);
    if (off === 0) return 0;
    await this.refblock(rt, off);
    return t.refcount(cluster)!;
  }

  private durableRefcount(cluster: number): number {
    return refcountOf(this.durable, cluster) ?? 0;
  }

  private async changeRefcount(cluster: number, delta: number): Promise<void> {
    const old = await this.refcount(cluster);
    const next = old + delta;
    if (next < 0) {
      await this.signalCorruption(`refcount of cluster ${hex(cluster * this.geometry.clusterSize)} would drop below 0`, { cluster });
    }
    if (next > maxRefcount(this.geometry.refcountOrder)) {
      throw new QledgerError('E_OVERFLOW', `${this.filename}: refcount of cluster ${hex(cluster * this.geometry.clusterSize)} would exceed ${maxRefcount(this.geometry.refcountOrder)} (refcount_bits=${this.geometry.refcountBits})`, { cluster });
    }
    this.emit({ kind: 'refcount', cluster, old, new: next });
  }

  // ---- allocation ----------------------------------------------------------

  /**
   * Allocate `n` contiguous free clusters and take a reference on each.
   * A cluster is free when its refcount is 0 both now and on disk: a cluster
   * freed since the last flush stays untouched until that flush is durable.
   */
  private async allocate(n: number): Promise<number> {
    const t = this.t();
    const E = this.geometry.refcountBlockEntries;
    let start = this.cursor;
    let run = 0;
    while (run < n) {
      const c = start + run;
      const rt = Math.floor(c / E);
      const off = t.reftableEntry(rt);
      if (off === 0) {
        // No refcount block covers c, so c is free (unless reserved: the journal
        // area has refcount 0 and may lie there): the new block goes there.
        const used = this.metadata.has(c) ? -1 : await this.newRefblock(rt, c);
        // negative: the clusters needed from c on run into reserved ones; go past them
        start = c + Math.abs(used);
        run = 0;
        continue;
      }
      await this.refblock(rt, off);
      // Freed since the last write-back: its old references may still be durable. Lazy
      // refcounts leave the durable refcount stale (0) here, so the set is what tells.
      const durablyUsed = this.fault === 'reuse-before-durable' ? false : this.durableRefcount(c) !== 0 || this.freedInEpoch.has(c);
      if (t.refcount(c) !== 0 || durablyUsed || this.metadata.has(c)) {
        start = c + 1;
        run = 0;
        continue;
      }
      run++;
    }
    for (let i = 0; i < n; i++) await this.changeRefcount(start + i, 1);
    // Single clusters move the cursor past everything scanned; a multi-cluster
    // run does not, so the holes it skipped stay for single allocations.
    if (n === 1 || start === this.cursor) this.cursor = start + n;
    this.endCluster = Math.max(this.endCluster, start + n);
    return start;
  }

  /**
   * A refcount block for refcount-table index `rt`, placed at free cluster
   * `c` inside the range it covers so that it counts itself. Grows the
   * refcount table first when `rt` is past its end. Returns the number of
   * clusters used from `c` on.
   */
  private async newRefblock(rt: number, c: number): Promise<number> {
    const t = this.t();
    const g = this.geometry;
    const cs = g.clusterSize;
    const entries = (t.header.reftableClusters * cs) / 8;
    if (rt >= entries) return this.growReftable(rt, c);
    this.emit({ kind: 'table-new', role: 'refblock', slot: rt, offset: c * cs, copyOf: 0 });
    this.emit({ kind: 'refcount', cluster: c, old: 0, new: 1 });
    this.emit({ kind: 'reftable', index: rt, old: 0, new: c * cs });
    this.metadata.set(c, 'refcount block');
    this.endCluster = Math.max(this.endCluster, c + 1);
    return 1;
  }

  /**
   * Move the refcount table to a bigger one at `c`, with new refcount blocks
   * in front of it that count the blocks and the table themselves. All
   * clusters from `c` on are free: no block covers them.
   */
  private async growReftable(rt: number, c: number): Promise<number> {
    const t = this.t();
    const g = this.geometry;
    const cs = g.clusterSize;
    const E = g.refcountBlockEntries;
    const h = t.header;
    let blocks = 1;
    let tableClusters = h.reftableClusters + 1;
    for (;;) {
      const last = c + blocks + tableClusters - 1;
      const maxRt = Math.max(rt, Math.floor(last / E));
      const needTable = Math.max(Math.ceil(((maxRt + 1) * 8) / cs), h.reftableClusters + Math.ceil(h.reftableClusters / 2));
      const needBlocks = maxRt - Math.floor(c / E) + 1;
      if (needTable <= tableClusters && needBlocks <= blocks) break;
      tableClusters = Math.max(tableClusters, needTable);
      blocks = Math.max(blocks, needBlocks);
    }
    if (tableClusters * cs > MAX_REFTABLE_BYTES) {
      throw new QledgerError('E_UNSUPPORTED', `${this.filename}: the refcount table would exceed ${MAX_REFTABLE_BYTES} bytes`);
    }
    const firstRt = Math.floor(c / E);
    const tableAt = c + blocks;
    for (let x = c; x < tableAt + tableClusters; x++) if (this.metadata.has(x)) return -(x + 1 - c);
    for (let k = 0; k < blocks; k++) {
      this.emit({ kind: 'table-new', role: 'refblock', slot: firstRt + k, offset: (c + k) * cs, copyOf: 0 });
      this.metadata.set(c + k, 'refcount block');
    }
    for (let x = c; x < tableAt + tableClusters; x++) this.emit({ kind: 'refcount', cluster: x, old: 0, new: 1 });
    this.emit({ kind: 'reftable-swap', oldOffset: h.reftableOffset, oldClusters: h.reftableClusters, newOffset: tableAt * cs, newClusters: tableClusters });
    for (let k = 0; k < blocks; k++) this.emit({ kind: 'reftable', index: firstRt + k, old: 0, new: (c + k) * cs });
    this.markMetadata(tableAt * cs, tableClusters * cs, 'refcount table');
    for (let i = 0; i < h.reftableClusters; i++) this.metadata.delete(h.reftableOffset / cs + i);
    for (let i = 0; i < h.reftableClusters; i++) await this.changeRefcount(h.reftableOffset / cs + i, -1);
    this.endCluster = Math.max(this.endCluster, tableAt + tableClusters);
    return blocks + tableClusters;
  }

  /** The L2 table of `l1Index`, writable: allocated when absent, copied when shared. */
  private async l2ForWrite(l1Index: number): Promise<Uint8Array> {
    const t = this.t();
    const g = this.geometry;
    const cs = g.clusterSize;
    const e = t.l1Entry(l1Index);
    const off = t.l1TableOffset(l1Index);
    if (off === 0) {
      const c = await this.allocate(1);
      this.emit({ kind: 'table-new', role: 'l2', slot: l1Index, offset: c * cs, copyOf: 0 });
      this.emit({ kind: 'l1', index: l1Index, old: e, new: w64(c * cs, true) });
      this.metadata.set(c, 'active L2 table');
      return t.l2(l1Index)!;
    }
    if (!t.l2(l1Index)) await this.loadL2(l1Index, off);
    if ((e.hi & L2E_COPIED_HI) === 0) {
      // Shared with a snapshot: copy the table, then drop our reference to the old one.
      const c = await this.allocate(1);
      this.emit({ kind: 'table-new', role: 'l2', slot: l1Index, offset: c * cs, copyOf: off });
      this.emit({ kind: 'l1', index: l1Index, old: e, new: w64(c * cs, true) });
      this.metadata.set(c, 'active L2 table');
      await this.changeRefcount(off / cs, -1);
    }
    return t.l2(l1Index)!;
  }

  /** Drop this image's reference to the host clusters of an L2 entry (at its table position, if known). */
  private async unref(e: L2Word, at?: { l1Index: number; index: number }): Promise<void> {
    const g = this.geometry;
    const cs = g.clusterSize;
    if (this.zero && at && (e.hi & L2E_COMPRESSED_HI) === 0 && entryOffset(e) === this.zero.cluster * cs) {
      this.zero.refs.delete(`${at.l1Index}:${at.index}`);
    }
    if ((e.hi & L2E_COMPRESSED_HI) !== 0) {
      const d = compressedDescriptor(e as RawL2Entry, g.clusterBits);
      const first = Math.floor(d.offset / cs);
      const last = Math.floor((d.offset + d.length - 1) / cs);
      for (let c = first; c <= last; c++) await this.changeRefcount(c, -1);
      return;
    }
    const off = entryOffset(e);
    if (off === 0 || this.hasDataFile) return; // data file clusters carry no refcount
    if (!this.zero && this.version === 2 && this.layer.backing && (e.hi & L2E_COPIED_HI) === 0) await this.adoptSharedZero(off / cs);
    await this.changeRefcount(off / cs, -1);
  }

  /**
   * A shared cluster is about to lose a reference. If it is a shared zero
   * cluster of an earlier session that would be left with one active
   * mapping, adopt it now so that settleZero gives that mapping a cluster of
   * its own (a lone mapping would need COPIED).
   */
  private async adoptSharedZero(cluster: number): Promise<void> {
    const cs = this.geometry.clusterSize;
    if ((await this.refcount(cluster)) !== 2) return;
    if (!isZero(await readAt(this.dev, cluster * cs, cs))) return;
    const refs = (await this.sharedMappings()).get(cluster * cs) ?? [];
    if (refs.length === 1) this.zero = { cluster, refs: new Map(refs.map((at) => [`${at.l1Index}:${at.index}`, at])) };
  }

  /** Every active L2 entry that maps a host cluster without COPIED, by host offset (one scan of the active tables). */
  private async sharedMappings(): Promise<Map<number, Array<{ l1Index: number; index: number }>>> {
    const g = this.geometry;
    const t = this.t();
    const seen = new Map<number, Array<{ l1Index: number; index: number }>>();
    for (let i = 0; i < t.header.l1Size; i++) {
      const off = t.l1TableOffset(i);
      if (!off) continue;
      const table = t.l2(i) ?? (await this.loadL2(i, off));
      for (let j = 0; j < g.l2Entries; j++) {
        const e = readL2Word(table, j, g);
        if ((e.hi & (L2E_COMPRESSED_HI | L2E_COPIED_HI)) !== 0) continue;
        const o = entryOffset(e);
        if (!o) continue;
        let list = seen.get(o);
        if (!list) seen.set(o, (list = []));
        list.push({ l1Index: i, index: j });
      }
    }
    return seen;
  }

  // ---- data writes -----------------------------------------------------------

  private async writeData(offset: number, data: Uint8Array): Promise<void> {
    const g = this.geometry;
    const span = g.l2Entries * g.clusterSize;
    let pos = 0;
    while (pos < data.length) {
      const at = offset + pos;
      const n = Math.min(data.length - pos, span - (at % span));
      await this.writeSpan(at, data.subarray(pos, pos + n));
      pos += n;
    }
  }

  /** A write inside one L2 table's span. */
  private async writeSpan(offset: number, data: Uint8Array): Promise<void> {
    const g = this.geometry;
    const cs = g.clusterSize;
    const sc = g.subclusterSize;
    const span = g.l2Entries * cs;
    const l1Index = Math.floor(offset / span);
    await this.l2ForWrite(l1Index);
    const t = this.t();
    const tableOffset = t.l1TableOffset(l1Index);
    const writes: DeviceWrite[] = [];
    const zeroes: Array<{ offset: number; length: number }> = [];
    const updates: Array<{ index: number; old: L2Word; new: L2Word; free: boolean }> = [];
    const end = offset + data.length;
    for (let cstart = offset - (offset % cs); cstart < end; cstart += cs) {
      const a = Math.max(offset, cstart) - cstart;
      const b = Math.min(end, cstart + cs) - cstart;
      const piece = data.subarray(cstart + a - offset, cstart + b - offset);
      const index = (cstart / cs) % g.l2Entries;
      const e = readL2Word(t.l2(l1Index)!, index, g);
      await this.validateEntry(e, tableOffset, index, cstart);
      const compressed = (e.hi & L2E_COMPRESSED_HI) !== 0;
      const hostOff = compressed ? 0 : entryOffset(e);
      const copied = (e.hi & L2E_COPIED_HI) !== 0;
      const hasHost = !compressed && (hostOff !== 0 || (this.hasDataFile && copied));
      const s0 = Math.floor(a / sc);
      const s1 = Math.floor((b - 1) / sc);
      const partialEdge = (s: number) => {
        const lo = s * sc;
        const hi = lo + sc;
        return Math.max(a, lo) !== lo || Math.min(b, hi) !== hi;
      };
      if (hasHost && copied) {
        // In place: this image owns the cluster alone.
        await this.checkOverlap(hostOff, cstart);
        if (this.zero && hostOff === this.zero.cluster * cs) this.zero = undefined;
        const stOf = (s: number) => subclusterType(e as RawL2Entry, s, g, this.hasDataFile);
        const needCow = [s0, s1].some((s) => partialEdge(s) && stOf(s) !== 'normal');
        if (!needCow) {
          writes.push({ offset: hostOff + a, data: piece, what: 'data' });
        } else {
          const lo = s0 * sc;
          const buf = new Uint8Array((s1 + 1) * sc - lo);
          await readGuest(this.layer, guest(cstart + lo), buf);
          buf.set(piece, a - lo);
          writes.push({ offset: hostOff + lo, data: buf, what: 'data (cow)' });
        }
        let ne: L2Word;
        if (g.extendedL2) {
          const m = bits(s0, s1);
          ne = { ...e, bitmapLo: (e.bitmapLo | m) >>> 0, bitmapHi: (e.bitmapHi & ~m) >>> 0 };
        } else {
          ne = { ...e, lo: (e.lo & ~L2E_ZERO_LO) >>> 0 };
        }
        if (!sameEntry(e, ne)) updates.push({ index, old: e, new: ne, free: false });
        continue;
      }
      // A fresh cluster: unallocated, zero, compressed or shared.
      const ownData = compressed || hasHost;
      const guestCluster = cstart / cs;
      const n = this.hasDataFile ? guestCluster : await this.allocate(1);
      const N = n * cs;
      let ne: L2Word;
      if (g.extendedL2 && !ownData) {
        if ((e.bitmapLo >>> 0) !== 0) await this.signalCorruption(`invalid cluster entry found (L2 offset: ${hex(tableOffset)}, L2 index: ${hex(index)})`);
        const lo = s0 * sc;
        const hi = (s1 + 1) * sc;
        if (lo === a && hi === b) {
          writes.push({ offset: N + a, data: piece, what: 'data' });
        } else {
          const buf = new Uint8Array(hi - lo);
          await readGuest(this.layer, guest(cstart + lo), buf);
          buf.set(piece, a - lo);
          writes.push({ offset: N + lo, data: buf, what: 'data (cow)' });
        }
        const m = bits(s0, s1);
        ne = { ...w64(N, true), bitmapLo: m, bitmapHi: (e.bitmapHi & ~m) >>> 0 };
      } else {
        if (a === 0 && b === cs) {
          writes.push({ offset: N, data: piece, what: 'data' });
        } else {
          const type = subclusterType(e as RawL2Entry, 0, g, this.hasDataFile);
          const readsZero = !g.extendedL2 && (type === 'zero-plain' || type === 'zero-alloc' || (type === 'unallocated-plain' && !this.layer.backing));
          if (readsZero && N >= this.zeroFrom && !this.hasDataFile) {
            // Past everything ever written: the rest of the cluster already reads as zero.
            writes.push({ offset: N + a, data: piece, what: 'data' });
          } else if (readsZero && !this.hasDataFile) {
            // A reused cluster: the guest's bytes, and the rest made zero by
            // the device (fallocate where it can), not by zero buffers.
            writes.push({ offset: N + a, data: piece, what: 'data' });
            if (a > 0) zeroes.push({ offset: N, length: a });
            if (b < cs) zeroes.push({ offset: N + b, length: cs - b });
          } else {
            const buf = new Uint8Array(cs);
            if (!readsZero) await readGuest(this.layer, guest(cstart), buf);
            buf.set(piece, a);
            writes.push({ offset: N, data: buf, what: 'data (cow)' });
          }
        }
        ne = g.extendedL2 ? { ...w64(N, true), bitmapLo: ALL_SUBCLUSTERS, bitmapHi: 0 } : { ...w64(N, true), bitmapLo: 0, bitmapHi: 0 };
      }
      updates.push({ index, old: e, new: ne, free: ownData });
    }
    await this.deviceWrites(writes);
    for (const z of zeroes) {
      await (this.holding ?? this.dev).writeZeroes(z.offset, z.length, false);
      this.traceEvent({ type: 'write', offset: z.offset, length: z.length, what: 'zeroes (cow)' });
    }
    for (const u of updates) {
      this.emit({ kind: 'l2', l1Index, table: tableOffset, index: u.index, old: u.old, new: u.new });
      if (u.free) await this.unref(u.old, { l1Index, index: u.index });
    }
  }

  /** O(1) per write: refuse to write guest data over a cluster that holds metadata. */
  private async checkOverlap(hostOff: number, guestOff: number): Promise<void> {
    if (this.hasDataFile) return;
    const what = this.metadata.get(Math.floor(hostOff / this.geometry.clusterSize));
    if (what !== undefined) {
      await this.signalCorruption(`preventing a write of guest offset ${hex(guestOff)} onto the ${what} at ${hex(hostOff)}`, { hostOff, guestOff });
    }
  }

  private async validateEntry(e: L2Word, table: number, index: number, guestOff: number): Promise<void> {
    const g = this.geometry;
    if ((e.hi & L2E_COMPRESSED_HI) !== 0) {
      if (this.hasDataFile) await this.signalCorruption(`compressed cluster entry found in image with external data file (L2 offset: ${hex(table)}, L2 index: ${hex(index)})`);
      return;
    }
    const off = entryOffset(e);
    if (off % g.clusterSize !== 0) {
      await this.signalCorruption(`cluster allocation offset ${hex(off)} unaligned (L2 offset: ${hex(table)}, L2 index: ${hex(index)})`);
    }
    if (subclusterType(e as RawL2Entry, 0, g, this.hasDataFile) === 'invalid') {
      await this.signalCorruption(`invalid cluster entry found (L2 offset: ${hex(table)}, L2 index: ${hex(index)})`);
    }
    if (off !== 0 && !this.hasDataFile && off >= Math.max(this.endCluster * g.clusterSize, this.zeroFrom)) {
      await this.signalCorruption(`data cluster of guest offset ${hex(guestOff)} at ${hex(off)} lies past the end of the image`);
    }
  }

  /** Device writes, merged where they are contiguous both on the device and in memory. */
  private async deviceWrites(writes: DeviceWrite[]): Promise<void> {
    const dev = this.holding ?? this.dataDev ?? this.dev;
    let i = 0;
    while (i < writes.length) {
      let cur = writes[i]!;
      let j = i + 1;
      while (j < writes.length) {
        const nx = writes[j]!;
        if (nx.offset !== cur.offset + cur.data.length || nx.data.buffer !== cur.data.buffer || nx.data.byteOffset !== cur.data.byteOffset + cur.data.length) break;
        cur = { offset: cur.offset, data: new Uint8Array(cur.data.buffer, cur.data.byteOffset, cur.data.length + nx.data.length), what: cur.what };
        j++;
      }
      await dev.write(cur.offset, cur.data);
      this.traceEvent({ type: 'record', record: { kind: 'data', host: cur.offset, length: cur.data.length } });
      this.traceEvent({ type: 'write', offset: cur.offset, length: cur.data.length, what: cur.what });
      if (!this.dataDev) this.zeroFrom = Math.max(this.zeroFrom, Math.ceil((cur.offset + cur.data.length) / this.geometry.clusterSize) * this.geometry.clusterSize);
      this.dataWritten = true;
      this.dataSinceBarrier = true;
      i = j;
    }
  }

  // ---- zeroes and discard ----------------------------------------------------

  private async zeroRange(offset: number, length: number, unmap: boolean): Promise<void> {
    const g = this.geometry;
    const cs = g.clusterSize;
    const end = offset + length;
    const imageEnd = this.size;
    const span = g.l2Entries * cs;
    let pos = offset;
    while (pos < end) {
      const cstart = pos - (pos % cs);
      const cend = Math.min(cstart + cs, imageEnd);
      const a = pos;
      const b = Math.min(end, cend);
      // v2 has no zero flag: whole clusters can only become zero by being
      // deallocated, which is right when nothing shows through (no backing)
      const wholeClusters = this.version === 3 || (unmap && !this.layer.backing);
      if (a === cstart && b === cend && this.version === 2 && this.layer.backing && !this.hasDataFile) {
        const tableEnd = cstart - (cstart % span) + span;
        let stop = cend;
        while (stop < end && stop < tableEnd && Math.min(stop + cs, imageEnd) <= end) stop = Math.min(stop + cs, imageEnd);
        if (await this.mapSharedZero(cstart, stop)) {
          pos = stop;
          continue;
        }
      }
      if (a === cstart && b === cend && wholeClusters) {
        // whole clusters, as many as follow inside this L2 table: one batch
        const tableEnd = cstart - (cstart % span) + span;
        let stop = cend;
        while (stop < end && stop < tableEnd && Math.min(stop + cs, imageEnd) <= end) stop = Math.min(stop + cs, imageEnd);
        await this.zeroClusters(cstart, stop, unmap);
        pos = stop;
        continue;
      }
      // A partial cluster (or v2, which has no zero flag): nothing to do if it
      // already reads as zero, otherwise zero data through the write path.
      const sub = g.extendedL2 && this.version === 3 ? await this.zeroSubclusters(a, b) : false;
      if (!sub) {
        const cur = new Uint8Array(b - a);
        await readGuest(this.layer, guest(a), cur);
        if (!isZero(cur)) await this.writeData(a, new Uint8Array(b - a));
      }
      pos = b;
    }
  }

  /** Extended L2: zero whole subclusters of a cluster this image owns (or has no host cluster for) in its bitmap. */
  private async zeroSubclusters(a: number, b: number): Promise<boolean> {
    const g = this.geometry;
    const cs = g.clusterSize;
    const sc = g.subclusterSize;
    if (a % sc !== 0 || (b % sc !== 0 && b !== this.size)) return false;
    const span = g.l2Entries * cs;
    const l1Index = Math.floor(a / span);
    const t = this.t();
    const index = Math.floor(a / cs) % g.l2Entries;
    const existing = t.l1TableOffset(l1Index);
    if (existing === 0 && !this.layer.backing) return true; // reads as zero already
    await this.l2ForWrite(l1Index);
    const table = t.l1TableOffset(l1Index);
    const e = readL2Word(t.l2(l1Index)!, index, g);
    await this.validateEntry(e, table, index, a);
    const compressed = (e.hi & L2E_COMPRESSED_HI) !== 0;
    const off = entryOffset(e);
    if (compressed || (off !== 0 && (e.hi & L2E_COPIED_HI) === 0)) return false;
    const cstart = a - (a % cs);
    const m = bits((a - cstart) / sc, Math.ceil((b - cstart) / sc) - 1);
    const ne = { ...e, bitmapLo: (e.bitmapLo & ~m) >>> 0, bitmapHi: (e.bitmapHi | m) >>> 0 };
    if (!sameEntry(e, ne)) this.emit({ kind: 'l2', l1Index, table, index, old: e, new: ne });
    return true;
  }

  /** v3: whole clusters [start, stop) inside one L2 table become zero clusters. */
  private async zeroClusters(start: number, stop: number, unmap: boolean): Promise<void> {
    const g = this.geometry;
    const cs = g.clusterSize;
    const l1Index = Math.floor(start / (g.l2Entries * cs));
    const t = this.t();
    if (t.l1TableOffset(l1Index) === 0 && !this.layer.backing) return; // reads as zero already
    await this.l2ForWrite(l1Index);
    const table = t.l1TableOffset(l1Index);
    for (let c = start; c < stop; c += cs) {
      const index = (c / cs) % g.l2Entries;
      const e = readL2Word(t.l2(l1Index)!, index, g);
      await this.validateEntry(e, table, index, c);
      const compressed = (e.hi & L2E_COMPRESSED_HI) !== 0;
      const off = compressed ? 0 : entryOffset(e);
      const hasHost = !compressed && (off !== 0 || (this.hasDataFile && (e.hi & L2E_COPIED_HI) !== 0));
      let ne: L2Word;
      let free = false;
      if (g.extendedL2) {
        if (compressed || (unmap && hasHost)) {
          ne = { hi: 0, lo: 0, bitmapHi: ALL_SUBCLUSTERS, bitmapLo: 0 };
          free = true;
        } else ne = { ...e, bitmapHi: ALL_SUBCLUSTERS, bitmapLo: 0 };
      } else if (this.version === 2) {
        if (!compressed && !hasHost) continue; // unallocated, no backing: reads as zero already
        ne = ZERO_ENTRY;
        free = true;
      } else {
        const type = compressed ? 'compressed' : hasHost ? ((e.lo & L2E_ZERO_LO) !== 0 ? 'zero-alloc' : 'normal') : (e.lo & L2E_ZERO_LO) !== 0 ? 'zero-plain' : 'unallocated';
        if (type === 'zero-plain' || (type === 'zero-alloc' && !unmap)) continue;
        if (compressed || (unmap && hasHost)) {
          ne = { hi: 0, lo: L2E_ZERO_LO, bitmapHi: 0, bitmapLo: 0 };
          free = true;
        } else ne = { ...e, lo: (e.lo | L2E_ZERO_LO) >>> 0 };
      }
      if (sameEntry(e, ne)) continue;
      this.emit({ kind: 'l2', l1Index, table, index, old: e, new: ne });
      if (free) await this.unref(e, { l1Index, index });
    }
  }

  /**
   * v2 over a backing file: map whole clusters [start, stop) (one L2 table)
   * to the shared zero cluster. False when that cannot be done (no shared
   * cluster yet and fewer than two clusters to map, or its refcount is
   * full); the caller then writes zero data.
   */
  private async mapSharedZero(start: number, stop: number): Promise<boolean> {
    const g = this.geometry;
    const cs = g.clusterSize;
    const l1Index = Math.floor(start / (g.l2Entries * cs));
    const t = this.t();
    if (!this.zero && !this.zeroSearched) await this.findSharedZero();
    const zoff = this.zero ? this.zero.cluster * cs : -1;
    const todo: number[] = [];
    if (t.l1TableOffset(l1Index) !== 0 && !t.l2(l1Index)) await this.loadL2(l1Index, t.l1TableOffset(l1Index));
    for (let c = start; c < stop; c += cs) {
      const index = (c / cs) % g.l2Entries;
      const table = t.l2(l1Index);
      if (table && entryOffset(readL2Word(table, index, g)) === zoff && (readL2Word(table, index, g).hi & L2E_COMPRESSED_HI) === 0) continue;
      todo.push(index);
    }
    if (todo.length === 0) return true;
    const max = maxRefcount(this.geometry.refcountOrder);
    if (this.zero && (await this.refcount(this.zero.cluster)) + todo.length > max) return false;
    if (!this.zero && (todo.length < 2 || todo.length > max)) return false;
    await this.l2ForWrite(l1Index);
    const table = t.l1TableOffset(l1Index);
    if (!this.zero) {
      const n = await this.allocate(1);
      await this.zeroHostCluster(n);
      await this.changeRefcount(n, todo.length - 1);
      this.zero = { cluster: n, refs: new Map() };
    } else await this.changeRefcount(this.zero.cluster, todo.length);
    const z = this.zero;
    for (const index of todo) {
      const e = readL2Word(t.l2(l1Index)!, index, g);
      await this.validateEntry(e, table, index, l1Index * g.l2Entries * cs + index * cs);
      this.emit({ kind: 'l2', l1Index, table, index, old: e, new: { ...w64(z.cluster * cs, false), bitmapHi: 0, bitmapLo: 0 } });
      const hasOwn = (e.hi & L2E_COMPRESSED_HI) !== 0 || entryOffset(e) !== 0;
      if (hasOwn) await this.unref(e, { l1Index, index });
      z.refs.set(`${l1Index}:${index}`, { l1Index, index });
    }
    return true;
  }

  /** Make a freshly allocated host cluster read as zero (nothing to do past everything ever written). */
  private async zeroHostCluster(n: number): Promise<void> {
    const cs = this.geometry.clusterSize;
    if (n * cs >= this.zeroFrom) return;
    await (this.holding ?? this.dev).writeZeroes(n * cs, cs, false);
    this.traceEvent({ type: 'write', offset: n * cs, length: cs, what: 'zeroes (shared zero cluster)' });
    this.dataWritten = true;
      this.dataSinceBarrier = true;
  }

  /**
   * The end of every operation: a shared zero cluster left with a single
   * reference would need COPIED on that entry, and a crash could then leave
   * COPIED and the refcount disagreeing. So the last mapping gets a zero
   * cluster of its own and the shared one goes.
   */
  private async settleZero(): Promise<void> {
    const z = this.zero!;
    const g = this.geometry;
    const cs = g.clusterSize;
    const t = this.t();
    const rc = await this.refcount(z.cluster);
    const live: Array<{ l1Index: number; index: number }> = [];
    for (const at of z.refs.values()) {
      const off = t.l1TableOffset(at.l1Index);
      if (!off) continue;
      const table = t.l2(at.l1Index) ?? (await this.loadL2(at.l1Index, off)); // it may have been evicted
      if (entryOffset(readL2Word(table, at.index, g)) === z.cluster * cs) live.push(at);
    }
    if (rc >= 2 || rc === 0) {
      if (rc === 0) this.zero = undefined;
      return;
    }
    this.zero = undefined;
    if (live.length !== 1) return; // the last reference is a snapshot's: its tables need no COPIED
    const at = live[0]!;
    await this.l2ForWrite(at.l1Index);
    const table = t.l1TableOffset(at.l1Index);
    const e = readL2Word(t.l2(at.l1Index)!, at.index, g);
    const n = await this.allocate(1);
    await this.zeroHostCluster(n);
    this.emit({ kind: 'l2', l1Index: at.l1Index, table, index: at.index, old: e, new: { ...w64(n * cs, true), bitmapHi: 0, bitmapLo: 0 } });
    await this.changeRefcount(z.cluster, -1);
  }

  /**
   * Find the shared zero cluster an earlier session made: a cluster that
   * two or more active entries map, whose refcount is exactly that (no
   * snapshot shares it) and which reads as zero. One scan of the active L2
   * tables, once per session and only when a zero write needs it.
   */
  private async findSharedZero(): Promise<void> {
    this.zeroSearched = true;
    const cs = this.geometry.clusterSize;
    const seen = await this.sharedMappings();
    const candidates = [...seen.entries()].filter(([, l]) => l.length >= 2).sort((x, y) => y[1].length - x[1].length).slice(0, 4);
    for (const [o, list] of candidates) {
      if ((await this.refcount(o / cs)) !== list.length) continue;
      const data = await readAt(this.dev, o, cs);
      if (!isZero(data)) continue;
      this.zero = { cluster: o / cs, refs: new Map(list.map((at) => [`${at.l1Index}:${at.index}`, at])) };
      return;
    }
  }

  /** Discard whole clusters, as QEMU does (partial clusters are ignored but for the image's last one). */
  private async discardRange(offset: number, length: number): Promise<void> {
    const g = this.geometry;
    const cs = g.clusterSize;
    const end = offset + length;
    const first = Math.ceil(offset / cs) * cs;
    const last = end === this.size ? end : end - (end % cs);
    const span = g.l2Entries * cs;
    const t = this.t();
    for (let c = first; c < last; ) {
      const l1Index = Math.floor(c / span);
      const stop = Math.min(last, (l1Index + 1) * span);
      if (t.l1TableOffset(l1Index) === 0) {
        if (this.layer.backing && this.version === 3) await this.zeroClusters(c, stop, true);
        c = stop;
        continue;
      }
      await this.l2ForWrite(l1Index);
      const table = t.l1TableOffset(l1Index);
      for (; c < stop; c += cs) {
        const index = (c / cs) % g.l2Entries;
        const e = readL2Word(t.l2(l1Index)!, index, g);
        await this.validateEntry(e, table, index, c);
        const compressed = (e.hi & L2E_COMPRESSED_HI) !== 0;
        const hasHost = !compressed && (entryOffset(e) !== 0 || (this.hasDataFile && (e.hi & L2E_COPIED_HI) !== 0));
        const zeroFlag = g.extendedL2 ? e.bitmapHi >>> 0 === ALL_SUBCLUSTERS : (e.lo & L2E_ZERO_LO) !== 0;
        if (!compressed && !hasHost) {
          if (zeroFlag || !this.layer.backing) continue; // reads as zero / as the backing file already
        }
        let ne: L2Word;
        if (this.version === 3) ne = g.extendedL2 ? { hi: 0, lo: 0, bitmapHi: ALL_SUBCLUSTERS, bitmapLo: 0 } : { hi: 0, lo: L2E_ZERO_LO, bitmapHi: 0, bitmapLo: 0 };
        else ne = ZERO_ENTRY;
        if (!compressed && !hasHost && !this.layer.backing) ne = ZERO_ENTRY;
        if (sameEntry(e, ne)) continue;
        this.emit({ kind: 'l2', l1Index, table, index, old: e, new: ne });
        if (compressed || hasHost) await this.unref(e, { l1Index, index });
      }
    }
  }

  // ---- resize ----------------------------------------------------------------

  private async resize(size: number, hideBacking: boolean): Promise<void> {
    const t = this.t();
    const g = this.geometry;
    const cs = g.clusterSize;
    const h = t.header;
    if (size < h.size) {
      if (this.layer.snapshots.length) throw new QledgerError('E_UNSUPPORTED', `${this.filename}: cannot shrink an image with internal snapshots`);
      // drop everything past the new end (full discard: nothing reads back)
      const span = g.l2Entries * cs;
      const firstCluster = Math.ceil(size / cs) * cs;
      for (let c = firstCluster; c < h.size; ) {
        const l1Index = Math.floor(c / span);
        const stop = Math.min(h.size, (l1Index + 1) * span);
        if (t.l1TableOffset(l1Index) !== 0) {
          await this.l2ForWrite(l1Index);
          const table = t.l1TableOffset(l1Index);
          for (let x = c; x < stop; x += cs) {
            const index = (x / cs) % g.l2Entries;
            const e = readL2Word(t.l2(l1Index)!, index, g);
            if (sameEntry(e, ZERO_ENTRY)) continue;
            this.emit({ kind: 'l2', l1Index, table, index, old: e, new: ZERO_ENTRY });
            await this.unref(e, { l1Index, index });
          }
          if (c === l1Index * span && (l1Index * span >= size)) {
            // the whole table is past the end: unhook and free it
            const e = t.l1Entry(l1Index);
            this.emit({ kind: 'l1', index: l1Index, old: e, new: { hi: 0, lo: 0 } });
            this.metadata.delete(table / cs);
            await this.changeRefcount(table / cs, -1);
          }
        }
        c = stop;
      }
      this.emit({ kind: 'header', field: 'size', old: BigInt(h.size), new: BigInt(size) });
      return;
    }
    const needL1 = Math.ceil(size / (g.l2Entries * cs));
    if (needL1 > h.l1Size) {
      if (needL1 * 8 > MAX_L1_BYTES) throw new QledgerError('E_UNSUPPORTED', `${this.filename}: an L1 table for ${size} bytes would exceed ${MAX_L1_BYTES} bytes`);
      // QEMU grows the L1 table by half again at least (qcow2_grow_l1_table)
      const entries = h.l1Size === 0 ? needL1 : Math.max(needL1, Math.min(Math.floor(MAX_L1_BYTES / 8), Math.floor((h.l1Size * 3) / 2)));
      const clusters = Math.ceil((entries * 8) / cs);
      const at = await this.allocate(clusters);
      const oldOffset = h.l1Offset;
      const oldClusters = Math.ceil((h.l1Size * 8) / cs);
      this.emit({ kind: 'l1-swap', oldOffset, oldSize: h.l1Size, newOffset: at * cs, newSize: entries });
      this.markMetadata(at * cs, entries * 8, 'active L1 table');
      if (h.l1Size > 0) {
        for (let i = 0; i < oldClusters; i++) {
          this.metadata.delete(oldOffset / cs + i);
          await this.changeRefcount(oldOffset / cs + i, -1);
        }
      }
    }
    this.emit({ kind: 'header', field: 'size', old: BigInt(h.size), new: BigInt(size) });
    // The new space must read as zero, not as whatever a longer backing file
    // holds there (QEMU does the same since 5.1).
    const b = this.layer.backing;
    if (hideBacking && b && b.size > h.size) {
      this.layer.size = size;
      await this.zeroRange(h.size, Math.min(size, b.size) - h.size, false);
    }
  }

  /**
   * Preallocate the clusters of guest range [from, size), as qemu-img create
   * -o preallocation=MODE does for a new image and growth with a
   * preallocation mode does for the new space: 'metadata' maps clusters
   * (the file grows sparse), 'falloc' also reserves their blocks, 'full'
   * writes zeros into them. `from` must be cluster-aligned and the range
   * unmapped.
   */
  async preallocate(mode: 'metadata' | 'falloc' | 'full', from = 0): Promise<void> {
    await this.serial(async () => {
      await this.run('preallocate', async () => {
        const g = this.geometry;
        const cs = g.clusterSize;
        const span = g.l2Entries * cs;
        const t = this.t();
        for (let base = Math.floor(from / span) * span; base < this.size; base += span) {
          const l1Index = base / span;
          await this.l2ForWrite(l1Index);
          const table = t.l1TableOffset(l1Index);
          const firstIndex = Math.max(0, Math.floor((from - base) / cs));
          const n = Math.min(g.l2Entries, Math.ceil((this.size - base) / cs)) - firstIndex;
          if (n <= 0) continue;
          for (let i = firstIndex; i < firstIndex + n; i++) {
            if (!sameEntry(readL2Word(t.l2(l1Index)!, i, g), ZERO_ENTRY)) {
              throw new QledgerError('E_UNSUPPORTED', `${this.filename}: preallocating over clusters that are already mapped is not supported`);
            }
          }
          const first = this.hasDataFile ? base / cs + firstIndex : await this.allocate(n);
          for (let k = 0; k < n; k++) {
            const i = firstIndex + k;
            const e = readL2Word(t.l2(l1Index)!, i, g);
            // over a backing file the subclusters stay unallocated, so the backing data still shows
            const ne: L2Word = { ...w64((first + k) * cs, true), bitmapLo: g.extendedL2 && !this.layer.backing ? ALL_SUBCLUSTERS : 0, bitmapHi: 0 };
            this.emit({ kind: 'l2', l1Index, table, index: i, old: e, new: ne });
          }
          const dev = this.dataDev ?? this.dev;
          if (mode === 'full') {
            const zero = new Uint8Array(Math.min(n * cs, 1 << 20));
            for (let o = 0; o < n * cs; o += zero.length) {
              const len = Math.min(zero.length, n * cs - o);
              await dev.write(first * cs + o, zero.subarray(0, len));
              this.traceEvent({ type: 'write', offset: first * cs + o, length: len, what: 'preallocated zeroes' });
            }
            this.dataWritten = true;
      this.dataSinceBarrier = true;
          } else if (mode === 'falloc') {
            // reserve the blocks (fallocate), as qemu-img does; zeros where that is not possible
            if (!(await dev.allocate?.(first * cs, n * cs))) await dev.writeZeroes(first * cs, n * cs, false);
            this.dataWritten = true;
      this.dataSinceBarrier = true;
          }
        }
      });
      await this.flushNow();
    });
  }

  // ---- flush -------------------------------------------------------------

  private async maybeWriteback(): Promise<void> {
    // a write-back must fit the journal: go at half its capacity (the images of moved tables come on top)
    const capacity = this.journal?.capacity ?? (this.journalPlan ? (this.journalPlan.reuse?.size ?? this.journalPlan.bytes) - 512 : Infinity);
    if (this.pending.length >= this.writeback || this.streamBytes >= capacity / 2) await this.flushNow();
  }

  /** The header's fixed fields for state `h`, with the bits kept outside the state: dirty (while on disk) and the journal's. */
  encodeHeader(h: HeaderState): Uint8Array {
    const b = this.headerTemplate.slice();
    // a dirty bit already on disk stays until the refcounts are clean
    if (this.dirtyOnDisk) h = { ...h, incompatibleFeatures: h.incompatibleFeatures | INCOMPAT_DIRTY };
    const autoclearFeatures = this.journalBitOnDisk ? h.autoclearFeatures | AUTOCLEAR_JOURNAL : h.autoclearFeatures;
    putMutableFields(b, this.version, { ...h, autoclearFeatures, l1TableOffset: h.l1Offset, refcountTableOffset: h.reftableOffset, refcountTableClusters: h.reftableClusters });
    return b;
  }

  private async markDirtyOnDisk(): Promise<void> {
    const dirty: HeaderState = { ...this.durable.header, incompatibleFeatures: this.durable.header.incompatibleFeatures | INCOMPAT_DIRTY };
    const b = this.encodeHeader(dirty);
    await this.dev.write(0, b);
    this.traceEvent({ type: 'write', offset: 0, length: b.length, what: 'header (dirty bit)' });
    await this.dev.flush();
    this.traceEvent({ type: 'flush' });
    this.dirtyOnDisk = true;
  }

  private async flushNow(): Promise<void> {
    if (this.closed) return;
    // before anything is planned: starting the journal may move the backing file name in the header
    if (this.journalPlan && !this.journalLive && this.pending.length) await this.startJournal();
    const lazy = this.lazyRefcounts;
    if (lazy && !this.dirtyOnDisk && this.pending.some((r) => r.kind === 'refcount')) await this.markDirtyOnDisk();
    const cs = this.geometry.clusterSize;
    const plan = planFlush({
      durable: this.durable,
      current: this.cur,
      pending: this.pending,
      encodeHeader: (h) => this.encodeHeader(h),
      lazy,
      dataWritten: this.dataWritten,
      fault: this.fault,
    });
    this.traceEvent({ type: 'record', record: { kind: 'begin', tx: 0, op: 'writeback' } });
    // Every cluster an entry may point at must exist in the file.
    const needed = this.endCluster * cs;
    if ((await this.dev.size()) < needed) {
      await this.dev.truncate(needed);
      this.traceEvent({ type: 'truncate', size: needed });
    }
    // The journal transaction is durable before any in-place write it describes (write-ahead).
    let journalTx = 0;
    if (this.journal && this.journalLive && this.pending.length) {
      // guest data first: a committed transaction may map it, so it must be durable before the commit is
      if (this.dataSinceBarrier) await this.barrier();
      const r = await this.journal.append([...this.stream, ...this.tableImages()], this.pending.length);
      this.traceEvent({ type: 'write', offset: this.journal.ext.offset, length: r.bytes, what: `journal tx ${r.tx}${r.fits ? '' : ' (unjournalled: too big)'} [journal]` });
      // The first transaction carries the autoclear bit in the same flush: a bit
      // without frames, or frames without the new area header (so of another
      // generation), or without the extension, replay nothing, and no in-place
      // write has started.
      await this.writeJournalBit();
      await this.barrier();
      if (this.journalFinish) {
        // a new extension becomes part of the header only now that the bit, the
        // area header, the extension's body and the frames are durable
        await this.journalFinish();
        this.traceEvent({ type: 'write', offset: 0, length: 8, what: 'header extension (journal) [journal set-up]' });
        this.journalFinish = undefined;
        await this.barrier();
      }
      journalTx = r.tx;
    }
    let phasesDone = 0;
    for (const phase of plan.phases) {
      // with the journal flushed, guest data is durable already: an empty phase needs no barrier
      if (journalTx && phase.writes.length === 0) continue;
      if (this.stopAfterPhase !== undefined && phasesDone >= this.stopAfterPhase) {
        this.closed = true;
        throw new QledgerError('E_IO', `${this.filename}: write-back stopped after ${phasesDone} phases (stopAfterPhase)`);
      }
      phasesDone++;
      for (const w of phase.writes) {
        await this.dev.write(w.offset, w.data);
        this.traceEvent({ type: 'write', offset: w.offset, length: w.data.length, what: `${w.what} [${w.category ?? phase.name}]` });
      }
      if (phase.name === 'reference' && this.holding) await this.holding.release((w) => this.traceEvent({ type: 'write', offset: w.offset, length: w.length, what: 'data (held back by fault)' }));
      await this.barrier();
    }
    if (this.holding) await this.holding.release(() => {});
    if (plan.phases.length === 0 && !journalTx) await this.barrier();
    if (journalTx) {
      await this.journal!.checkpoint(journalTx);
      this.traceEvent({ type: 'write', offset: this.journal!.ext.offset, length: 512, what: `journal checkpoint tx ${journalTx} [checkpoint]` });
    }
    this.stream = [];
    this.streamBytes = 0;
    let durable = this.cur;
    if (plan.lazySkipped.length) {
      const ed = durable.refblocks.edit();
      for (const rt of plan.lazySkipped) ed.set(rt, this.durable.refblocks.get(rt));
      durable = { ...durable, refblocks: ed.finish() };
    }
    this.durable = durable;
    this.traceEvent({ type: 'record', record: { kind: 'commit', tx: 0 } });
    this.pending = [];
    this.dataWritten = false;
    if (this.freedMin < this.cursor) this.cursor = this.freedMin;
    this.freedMin = Infinity;
    await this.punchFreed();
    this.evictClean();
  }

  /**
   * Give the space of clusters freed in the epoch just made durable back to
   * the file system (QEMU's discard=unmap): nothing references them any
   * more, on disk or in memory, and a later reuse rewrites them anyway.
   * Runs of adjacent clusters become one hole punch.
   */
  private async punchFreed(): Promise<void> {
    if (this.freedInEpoch.size === 0) return;
    const cs = this.geometry.clusterSize;
    const free = [...this.freedInEpoch].filter((c) => refcountOf(this.cur, c) === 0).sort((a, b) => a - b);
    this.freedInEpoch.clear();
    for (let i = 0; i < free.length; ) {
      let j = i + 1;
      while (j < free.length && free[j] === free[j - 1]! + 1) j++;
      await this.dev.discard(free[i]! * cs, (j - i) * cs);
      this.traceEvent({ type: 'write', offset: free[i]! * cs, length: (j - i) * cs, what: 'hole (freed clusters)' });
      i = j;
    }
  }

  /**
   * Bound the memory the state holds: after a write-back every table is
   * clean (durable equals current), so tables beyond the budget can be
   * dropped from both states and reloaded from disk when next needed.
   * Lazy refcounts keep their refcount blocks: they are not on disk yet.
   */
  private evictClean(): void {
    const cs = this.geometry.clusterSize;
    const budget = Math.max(4, Math.floor(this.cacheBytes / cs));
    for (const role of ['l2', 'refblock'] as const) {
      if (role === 'refblock' && this.dirtyOnDisk) continue;
      const trie = role === 'l2' ? this.cur.l2 : this.cur.refblocks;
      const slots: number[] = [];
      for (const [slot, t] of trie.entries()) if ((role === 'l2' ? this.durable.l2 : this.durable.refblocks).get(slot) === t) slots.push(slot);
      if (slots.length <= budget) continue;
      const ed = trie.edit();
      const ded = (role === 'l2' ? this.durable.l2 : this.durable.refblocks).edit();
      // no recency is tracked: the lowest slots go first, down to half the budget
      for (const slot of slots.slice(0, slots.length - Math.floor(budget / 2))) {
        ed.set(slot, undefined);
        ded.set(slot, undefined);
      }
      if (role === 'l2') {
        this.cur = { ...this.cur, l2: ed.finish() };
        this.durable = { ...this.durable, l2: ded.finish() };
      } else {
        this.cur = { ...this.cur, refblocks: ed.finish() };
        this.durable = { ...this.durable, refblocks: ded.finish() };
      }
    }
  }

  /**
   * Start the journal at the first write-back that changes metadata: the
   * area (reused, or new past every cluster allocated so far), its header
   * and the header extension, then the autoclear bit, each flushed before
   * the next. Before the bit is durable no transaction is trusted.
   */
  private async startJournal(): Promise<void> {
    const plan = this.journalPlan!;
    const cs = this.geometry.clusterSize;
    let ext = plan.reuse;
    if (!ext) {
      const at = Math.max(this.endCluster, this.zeroFrom / cs);
      ext = { offset: at * cs, size: plan.bytes };
      this.markMetadata(ext.offset, ext.size, 'journal');
      this.endCluster = at + plan.bytes / cs;
      this.zeroFrom = Math.max(this.zeroFrom, ext.offset + ext.size);
    }
    const started = await activateJournal(this.dev, cs, ext, plan, this.extensions);
    this.traceEvent({ type: 'write', offset: ext.offset, length: 512, what: 'journal area header [journal set-up]' });
    if (!started) {
      this.journalPlan = undefined;
      this.onWarning?.(`${this.filename}: no room for the journal header extension in the header cluster; writing without a journal`);
      return;
    }
    // the extension may have moved the backing file name: the header template follows
    this.headerTemplate.set(await readAt(this.dev, 0, this.headerTemplate.length));
    this.journal = started.log;
    this.journalFinish = started.finish;
    // every header written from now on carries the bit (this write-back's plan included)
    if (!this.journalBitOnDisk) {
      this.journalBitOnDisk = true;
      this.journalBitToWrite = true;
    }
    this.journalLive = true;
  }

  private async writeJournalBit(): Promise<void> {
    if (!this.journalBitToWrite) return;
    this.journalBitToWrite = false;
    const b = this.encodeHeader(this.durable.header);
    await this.dev.write(0, b);
    this.traceEvent({ type: 'write', offset: 0, length: b.length, what: 'header (journal bit) [journal set-up]' });
  }

  /**
   * What recovery cannot read back from the image safely: the final content
   * of a moved L1 or refcount table (the old one may be reused once freed)
   * and of an L2 table copied from a snapshot's.
   */
  private tableImages(): JournalRecord[] {
    const out: JournalRecord[] = [];
    const cur = this.cur;
    if (this.pending.some((r) => r.kind === 'l1-swap')) out.push({ kind: 'image', role: 'l1', offset: cur.header.l1Offset, bytes: stateL1Bytes(cur) });
    if (this.pending.some((r) => r.kind === 'reftable-swap')) out.push({ kind: 'image', role: 'reftable', offset: cur.header.reftableOffset, bytes: stateReftableBytes(cur) });
    for (const r of this.pending) {
      if (r.kind !== 'table-new' || r.role !== 'l2' || r.copyOf === 0 || stateL1Offset(cur, r.slot) !== r.offset) continue;
      const t = cur.l2.get(r.slot);
      if (t) out.push({ kind: 'image', role: 'l2', offset: r.offset, bytes: t });
    }
    return out;
  }

  private async barrier(): Promise<void> {
    this.dataSinceBarrier = false;
    await this.dev.flush();
    if (this.dataDev) await this.dataDev.flush();
    this.traceEvent({ type: 'record', record: { kind: 'barrier' } });
    this.traceEvent({ type: 'flush' });
  }

  /** Lazy refcounts: write every refcount block exactly, then clear the dirty bit. */
  private async cleanDirty(): Promise<void> {
    const cs = this.geometry.clusterSize;
    let wrote = false;
    for (const [rt, , cur] of PTrie.diff(this.durable.refblocks, this.cur.refblocks)) {
      if (!cur) continue;
      const off = new Transaction(this.cur).reftableEntry(rt);
      if (!off) continue;
      await this.dev.write(off, cur);
      this.traceEvent({ type: 'write', offset: off, length: cs, what: `refblock ${hex(off)}` });
      wrote = true;
    }
    if (wrote) await this.barrier();
    this.durable = this.cur;
    this.dirtyOnDisk = false;
    const h = this.cur.header;
    const b = this.encodeHeader({ ...h, incompatibleFeatures: h.incompatibleFeatures & ~INCOMPAT_DIRTY });
    await this.dev.write(0, b);
    this.traceEvent({ type: 'write', offset: 0, length: b.length, what: 'header (clean)' });
    await this.barrier();
  }

  /**
   * Rebuild refcounts from references (after a crash under lazy refcounts):
   * `expected(cluster)` is its number of references. Emits the refcount
   * records that make the stored counts equal, then flushes.
   */
  async applyRefcounts(expected: (cluster: number) => number, endCluster: number): Promise<{ fixed: number }> {
    let fixed = 0;
    await this.serial(() =>
      this.run('rebuild refcounts', async () => {
        const t = this.t();
        const E = this.geometry.refcountBlockEntries;
        const top = Math.max(endCluster, this.endCluster);
        for (let c = 0; c < top; c++) {
          const rt = Math.floor(c / E);
          const want = expected(c);
          if (t.reftableEntry(rt) === 0) {
            if (want !== 0) throw new CorruptionError(`${this.filename}: cluster ${hex(c * this.geometry.clusterSize)} is referenced but no refcount block covers it; run 'qledger check -r all'`);
            c = (rt + 1) * E - 1;
            continue;
          }
          const have = await this.refcount(c);
          if (want > maxRefcount(this.geometry.refcountOrder)) {
            throw new QledgerError('E_OVERFLOW', `${this.filename}: cluster ${hex(c * this.geometry.clusterSize)} has ${want} references, more than refcount_bits=${this.geometry.refcountBits} can count`, { cluster: c });
          }
          if (have !== want) {
            this.emit({ kind: 'refcount', cluster: c, old: have, new: want });
            fixed++;
          }
        }
      }),
    );
    await this.serial(() => this.flushNow());
    return { fixed };
  }

  /** Mark the image clean on disk (after a rebuild). */
  async markClean(): Promise<void> {
    await this.serial(async () => {
      if (!this.dirtyOnDisk) return;
      await this.cleanDirty();
    });
  }
}

/**
 * Fault 'data-after-mapping' only: a device that holds data writes back
 * (reads see them) until release(), which the flush calls after writing
 * the references. Never used otherwise.
 */
class HoldingDevice implements BlockDevice {
  private held: Array<{ offset: number; data: Uint8Array }> = [];
  constructor(private readonly dev: BlockDevice) {}
  get name() {
    return this.dev.name;
  }
  get readOnly() {
    return this.dev.readOnly;
  }
  size() {
    return this.dev.size();
  }
  allocatedBytes() {
    return this.dev.allocatedBytes();
  }
  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    await this.dev.readInto(buf, offset);
    for (const w of this.held) {
      const from = Math.max(offset, w.offset);
      const to = Math.min(offset + buf.length, w.offset + w.data.length);
      if (from < to) buf.set(w.data.subarray(from - w.offset, to - w.offset), from - offset);
    }
  }
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.held.push({ offset, data: data.slice() });
  }
  async release(onWrite: (w: { offset: number; length: number }) => void): Promise<void> {
    for (const w of this.held.splice(0)) {
      await this.dev.write(w.offset, w.data);
      onWrite({ offset: w.offset, length: w.data.length });
    }
  }
  flush() {
    return this.dev.flush();
  }
  truncate(size: number) {
    return this.dev.truncate(size);
  }
  writeZeroes(offset: number, length: number, unmap: boolean) {
    return this.dev.writeZeroes(offset, length, unmap);
  }
  discard(offset: number, length: number) {
    return this.dev.discard(offset, length);
  }
  async close(): Promise<void> {}
}
