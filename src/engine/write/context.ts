/**
 * The narrow write context every room of the write engine receives: the
 * files, the geometry, the live and durable metadata states with the open
 * transaction, `emit(record)` with its subscribers, the trace, the file
 * extent and `signalCorruption`. Whatever reacts to records (the pending
 * write-back, the journal stream, the allocator's freed epoch, the overlap
 * index) subscribes here instead of being called from one hub.
 */

import { CorruptionError, QledgerError, hex } from '../../errors.ts';
import type { Geometry } from '../../format/header.ts';
import type { BlockDevice } from '../../io/device.ts';
import type { JournalRecord, MarkerRecord, MetaRecord } from '../../journal/records.ts';
import { Transaction, type HeaderState, type MetaState } from '../../state/state.ts';
import type { Layer } from '../layer.ts';
import type { Qcow2Layer } from '../qcow2-layer.ts';
import type { HeaderBits } from './header-bits.ts';
import type { GuardedDevice } from './overlap-guard.ts';
import type { Trace } from './trace.ts';
import { crc32 } from '../../journal/log.ts';

export interface WriteFiles {
  /** the image file: metadata, and guest data without an external data file; every write checked by the overlap index */
  readonly image: GuardedDevice;
  /** the external data file, if any (unguarded: it holds no metadata) */
  readonly data: BlockDevice | undefined;
  /** where guest data goes: the data file, or the image (through a test fault's device, if one is set), guarded the same way */
  readonly guest: GuardedDevice;
}

/**
 * How far the image file reaches, and whether guest data is waiting for a
 * barrier. `endCluster` bounds what entries may point at; everything from
 * `zeroFrom` on was never written and reads as zero.
 */
export class FileExtent {
  /** one past the highest cluster in use or allocated */
  endCluster: number;
  /** the device reads as zero from here on (nothing ever written there) */
  zeroFrom: number;
  /** guest or copy-on-write data went to a device since the last write-back */
  dataWritten = false;
  /** ... since the last barrier */
  dataSinceBarrier = false;

  constructor(
    fileSize: number,
    private readonly clusterSize: number,
  ) {
    this.endCluster = Math.ceil(fileSize / clusterSize);
    this.zeroFrom = this.endCluster * clusterSize;
  }

  /** The end of the image file as far as metadata may point. */
  end(): number {
    return Math.max(this.endCluster * this.clusterSize, this.zeroFrom);
  }

  grow(endCluster: number): void {
    if (endCluster > this.endCluster) this.endCluster = endCluster;
  }

  /**
   * Data reached a device; `onImage`: the image file (not an external data
   * file), so zeroFrom moves. `bytes`, when the caller has them: what was
   * written, so that its checksum can stand in for a barrier of its own.
   */
  noteData(offset: number, length: number, onImage: boolean, bytes?: Uint8Array): void {
    if (onImage) this.zeroFrom = Math.max(this.zeroFrom, Math.ceil((offset + length) / this.clusterSize) * this.clusterSize);
    this.dataWritten = true;
    this.dataSinceBarrier = true;
    const ranges = this.ranges;
    if (ranges) {
      const last = ranges[ranges.length - 1];
      if (!onImage || ranges.length >= DATA_RANGES_MAX) this.ranges = undefined;
      else if (last && last.host + last.length === offset) ranges[ranges.length - 1] = { kind: 'data-fresh', host: last.host, length: last.length + length };
      else ranges.push({ kind: 'data-fresh', host: offset, length });
    }
    const sums = this.sums;
    if (!sums) return;
    if (!onImage || !bytes || this.sumBytes + length > SHARED_FLUSH_MAX || sums.length >= SHARED_FLUSH_WRITES) {
      this.sums = undefined;
      return;
    }
    // a rewrite of a range summed before: the same range takes the new sum, a partial overlap ends the sums
    for (let k = 0; k < sums.length; k++) {
      const e = sums[k]!;
      if (e.host >= offset + length || offset >= e.host + e.length) continue;
      if (e.host === offset && e.length === length) {
        sums[k] = { kind: 'data-crc', host: offset, length, crc: crc32(bytes) };
        return;
      }
      this.sums = undefined;
      return;
    }
    sums.push({ kind: 'data-crc', host: offset, length, crc: crc32(bytes) });
    this.sumBytes += length;
  }

  /** Guest-visible bytes changed on a device (zeroes, preallocation, a kernel copy): the next barrier must cover them. */
  noteDeviceChange(): void {
    this.dataWritten = true;
    this.dataSinceBarrier = true;
    this.sums = undefined;
    this.ranges = undefined;
  }

  /**
   * Where the data since the last barrier went (the image file only,
   * adjacent writes joined), when every change was a write of bytes into
   * the image file, in at most DATA_RANGES_MAX ranges; undefined otherwise.
   * When the transaction allocates every cluster of these ranges, the data
   * may share the frames' flush without checksums (journal-session.ts).
   */
  get dataRanges(): readonly DataFresh[] | undefined {
    return this.ranges;
  }

  /**
   * The checksums of every data write since the last barrier, when each
   * was a write of bytes into the image file and they add up to at most
   * SHARED_FLUSH_MAX; undefined otherwise. With them a journalled
   * write-back may let that data share its frames' flush (recovery reads
   * the bytes back and drops a transaction whose data does not match:
   * journal-format.md, "Write protocol").
   */
  get dataSums(): readonly DataCrc[] | undefined {
    return this.sums;
  }

  /** A barrier: everything written is durable. */
  barrierDone(): void {
    this.dataSinceBarrier = false;
    this.sums = [];
    this.sumBytes = 0;
    this.ranges = [];
  }

  private ranges: DataFresh[] | undefined = [];
  private sums: DataCrc[] | undefined = [];
  private sumBytes = 0;
}

type DataCrc = Extract<JournalRecord, { kind: 'data-crc' }>;
type DataFresh = Extract<JournalRecord, { kind: 'data-fresh' }>;

/** Data ranges since the last barrier kept for the fresh-cluster rule, at most (a write-back of more keeps its data flush). */
export const DATA_RANGES_MAX = 4096;

/**
 * Data since the last barrier up to this many bytes is checksummed into the
 * transaction instead of flushed before it. A flush here costs about
 * 0.13 ms and a CRC-32 of 1 MiB about 0.3 ms: a sequential run of 1 MiB
 * writethrough writes went from 1.45 s to 1.64 s with a 1 MiB limit, so
 * the limit is where the checksum costs well under the flush it saves.
 */
export const SHARED_FLUSH_MAX = 128 << 10;
/** ... and in at most this many writes (each new one is compared with those before it). */
export const SHARED_FLUSH_WRITES = 64;

export type RecordListener = (r: JournalRecord) => void;

/** The record that takes a change back, or undefined when there is none to write as a record. */
function inverseOf(r: MetaRecord): MetaRecord | undefined {
  switch (r.kind) {
    case 'refcount':
    case 'l2':
    case 'l1':
    case 'reftable':
    case 'header':
      return { ...r, old: r.new, new: r.old } as MetaRecord;
    case 'refcounts':
      return { ...r, old: r.new, new: r.old };
    case 'l2s':
      return { ...r, old: r.new, new: r.old };
    default:
      return undefined;
  }
}

export class WriteContext {
  private committed: MetaState;
  /**
   * A state transaction kept open after its guest operations committed, so
   * that the next guest operation goes on in it: a run of writes between
   * two write-backs copies each table it touches once, not once per write
   * (20,000 random 4 KiB writes otherwise copy 2.6 GB of tables). Each
   * operation still has its own begin and commit markers in the record
   * stream, so the journal and every subscriber see the same records as
   * before. Anything that reads `cur` closes it first.
   */
  private held: Transaction | undefined;
  /** what the disk holds after the last write-back */
  durable: MetaState;
  /** the open transaction: one per guest operation */
  tx: Transaction | undefined;

  /** the live state between operations (committed transactions; a held transaction is finished first) */
  get cur(): MetaState {
    if (this.held) {
      this.committed = this.held.finish();
      this.held = undefined;
    }
    return this.committed;
  }

  set cur(s: MetaState) {
    if (this.held) throw new Error('the state was replaced while a transaction was held');
    this.committed = s;
  }

  /** The transaction an operation opens: the held one, if any, or a new one over the committed state. */
  openTransaction(): Transaction {
    const held = this.held;
    this.held = undefined;
    return held ?? new Transaction(this.cur);
  }

  /** An operation's transaction is done: finished into the committed state, or (`hold`) kept open for the next one. */
  closeTransaction(tx: Transaction, hold: boolean): void {
    if (hold) this.held = tx;
    else this.committed = tx.finish();
  }

  /** The open or held transaction, for reads of the live state that must not close a held one. */
  live(): Transaction | undefined {
    return this.tx ?? this.held;
  }
  corrupt = false;
  /** where the bitmaps header extension's body is in the header cluster (undefined: there is none) */
  bitmapsExt: number | undefined;
  /** metadata found overlapping at open: writes are refused with this, and nothing is written (not even the corrupt bit) */
  refusal: string | undefined;
  closed = false;
  readonly extent: FileExtent;
  private readonly listeners: RecordListener[] = [];
  private layer: Qcow2Layer | undefined;

  constructor(
    readonly filename: string,
    readonly files: WriteFiles,
    readonly geometry: Geometry,
    readonly version: 2 | 3,
    readonly backing: Layer | undefined,
    readonly headerBits: HeaderBits,
    readonly trace: Trace,
    state: MetaState,
    fileSize: number,
  ) {
    this.committed = state;
    this.durable = state;
    this.extent = new FileExtent(fileSize, geometry.clusterSize);
  }

  /** The guest view through the live state (copy-on-write reads, zero tests). */
  reader(): Qcow2Layer {
    if (!this.layer) throw new Error('no reader attached');
    return this.layer;
  }

  attachReader(layer: Qcow2Layer): void {
    this.layer = layer;
  }

  get hasDataFile(): boolean {
    return this.files.data !== undefined;
  }

  /** Every metadata record and transaction marker, in order. */
  subscribe(fn: RecordListener): void {
    this.listeners.push(fn);
  }

  /** The open transaction (a programming error outside one). */
  t(): Transaction {
    if (!this.tx) throw new Error('no transaction open');
    return this.tx;
  }

  /** Header fields of the live state: through the open transaction, if any. */
  header(): HeaderState {
    return (this.tx ?? this.held)?.header ?? this.committed.header;
  }

  /** Apply a metadata change to the open transaction and tell every subscriber (the trace first). */
  emit(r: MetaRecord): void {
    this.t().apply(r);
    this.undoLog?.push(r);
    for (const l of this.listeners) l(r);
  }

  /**
   * A new structure's bytes (a snapshot's L1 copy or table, a bitmap table
   * or directory) written to fresh clusters nothing points at yet: like
   * guest data, durable before the transaction that names them.
   */
  async writeFresh(offset: number, bytes: Uint8Array, what: string): Promise<void> {
    await this.files.image.writeAs(offset, bytes, 0, () => `${what} at ${hex(offset)}`);
    this.trace.record({ kind: 'data', host: offset, length: bytes.length });
    this.trace.write(offset, bytes.length, what);
    this.extent.noteData(offset, bytes.length, true, bytes);
  }

  /** the records of an operation that is undone if it fails (metadata-only operations: snapshots, bitmaps) */
  undoLog: MetaRecord[] | undefined;
  /** the last failed operation with an undo log was undone (its rooms restore what they keep in memory) */
  undone = false;

  /**
   * Undo the records of the undo log, newest first, by their inverses; false
   * (nothing undone) when one of them has none (a table moved or created).
   * Everything they pointed at was written to fresh clusters: with the
   * references and the increments gone, those clusters are free again.
   */
  undo(): boolean {
    const log = this.undoLog ?? [];
    this.undoLog = undefined;
    this.undone = false;
    const inverses: MetaRecord[] = [];
    for (const r of log) {
      const x = inverseOf(r);
      if (!x) return false;
      inverses.push(x);
    }
    for (let i = inverses.length - 1; i >= 0; i--) this.emit(inverses[i]!);
    this.undone = true;
    return true;
  }

  /** A transaction marker (begin/commit of a guest operation): told to the subscribers, applied to nothing. */
  mark(r: MarkerRecord): void {
    for (const l of this.listeners) l(r);
  }

  checkWritable(): void {
    if (this.closed) throw new QledgerError('E_CLOSED', `${this.filename}: image is closed`);
    if (this.refusal) throw new CorruptionError(`${this.filename}: ${this.refusal}; writes are refused (the image is readable)`, { path: this.filename });
    if (this.corrupt) throw new CorruptionError(`${this.filename}: image is marked corrupt; writes are refused`, { path: this.filename });
    if (this.files.image.readOnly) throw new QledgerError('E_READ_ONLY', `${this.filename}: opened read-only`);
  }

  /**
   * Metadata is inconsistent: mark the image corrupt on disk at once (v3;
   * nothing else may be written to it now) and refuse every later write.
   */
  async signalCorruption(message: string, data: Record<string, unknown> = {}): Promise<never> {
    const first = !this.corrupt;
    this.corrupt = true;
    if (first && !this.files.image.readOnly && this.version === 3) {
      try {
        await this.headerBits.markCorrupt(this.durable.header);
      } catch (e) {
        // the corrupt bit itself refused (it cannot leave the header cluster): the first message is the one to report
        if (!(e instanceof CorruptionError)) throw e;
      }
    }
    throw new CorruptionError(`${this.filename}: ${message}; the image is marked corrupt and writes are refused`, data);
  }
}
