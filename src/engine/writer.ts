/**
 * The write engine's facade for one qcow2 image: guest write, compressed
 * write, write-zeroes, discard, truncate, preallocation, flush and close,
 * one transaction per guest operation. The work is done by the rooms in
 * write/ (see write/rooms.ts), all over one narrow write context: every
 * metadata change is a record (src/journal) applied to the immutable state
 * (src/state) and held until a write-back, where ordering.ts turns the
 * records into device writes and barriers. Guest data goes to the device at
 * once, to fresh clusters nothing durable points at, or in place into
 * clusters this image owns alone (COPIED).
 *
 * Reads go through a Qcow2Layer whose tables come from the live state, so a
 * read after a write sees it before any flush.
 */

import { CorruptionError, QledgerError, RangeRequestError, UsageError, hex } from '../errors.ts';
import { isZero } from '../format/bytes.ts';
import { AUTOCLEAR_BITMAPS, AUTOCLEAR_DEDUP_INDEX, AUTOCLEAR_JOURNAL, AUTOCLEAR_KNOWN, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../format/features.ts';
import { geometryOf, type Geometry } from '../format/header.ts';
import { headerStateOf, rebuildRefcounts, validateTables } from './write/open-checks.ts';
import type { DedupCounters } from './write/dedup.ts';
import { dedupRefusal } from './dedup/stats.ts';
import { readAt } from '../io/device.ts';
import { Transaction, initialState, l1TableOffset, type MetaState } from '../state/state.ts';
import { faultPlan } from './faults.ts';
import { guest, host } from '../format/offsets.ts';
import { Qcow2Layer } from './qcow2-layer.ts';
import { readGuest } from './read.ts';
import { WriteContext } from './write/context.ts';
import { HeaderBits } from './write/header-bits.ts';
import { ANY_KIND, OverlapIndex, overlapNames } from './write/overlap.ts';
import { shrinkAfterEmpty } from './write/empty-shrink.ts';
import { buildOverlapIndex } from './write/overlap-build.ts';
import { GuardedDevice } from './write/overlap-guard.ts';
import type { PreallocMode } from './write/resize.ts';
import type { SnapshotFields } from './write/snapshots.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import { buildRooms, type Rooms } from './write/rooms.ts';
import type { Bitmaps } from './write/bitmaps.ts';
import type { CopySource } from './write/data-write.ts';
import { Trace, type TraceEvent } from './write/trace.ts';
import type { DetectZeroes, WriterOptions, ZeroOptions } from './writer-options.ts';

export type { TraceEvent } from './write/trace.ts';

export type { DetectZeroes, WriterOptions, ZeroOptions } from './writer-options.ts';

export class Qcow2Writer {
  readonly layer: Qcow2Layer;
  readonly geometry: Geometry;
  readonly filename: string;
  private readonly ctx: WriteContext;
  private readonly rooms: Rooms;
  /** test-only fault switches (engine/faults.ts) */
  private readonly faults: ReturnType<typeof faultPlan>;
  private readonly detectZeroes: DetectZeroes;
  private queue: Promise<unknown> = Promise.resolve();
  private txCounter = 0;

  private constructor(o: WriterOptions, state: MetaState, headerBits: HeaderBits, trace: Trace, image: GuardedDevice) {
    const h = o.parsed.header;
    this.filename = o.filename;
    this.geometry = geometryOf(h);
    this.detectZeroes = o.detectZeroes ?? 'unmap';
    const faults = faultPlan(o.fault);
    this.faults = faults;
    const guestDev = o.dataDev ?? (faults ? faults.dataDevice(o.dev) : o.dev);
    // guest data in the image is checked against the same index; an external data file holds no metadata
    const guest = o.dataDev ? GuardedDevice.over(o.dataDev, new OverlapIndex(this.geometry, 'none')) : image.wrap(guestDev);
    this.ctx = new WriteContext(o.filename, { image, data: o.dataDev, guest }, this.geometry, h.version, o.backing, headerBits, trace, state, o.fileSize);
    const ctx0 = this.ctx;
    image.onRefusal = (message, data) => ctx0.signalCorruption(message, data);
    this.rooms = buildRooms(this.ctx, {
      overlap: image.index,
      cacheBytes: o.cacheBytes ?? 64 * 1024 * 1024,
      writebackRecords: o.writebackRecords ?? 200_000,
      faults,
      journal: h.version === 3 ? o.journal : undefined,
      extensions: o.parsed.extensions,
      onWarning: o.onWarning,
      stopAfterPhase: o.stopAfterPhase,
      snapshots: { entries: o.snapshots, tableBytes: o.snapshotTableBytes ?? 0 },
      dedup: o.dedup === true && !this.dedupRefused(o),
      compressionType: h.compressionType,
    });
    const ctx = this.ctx;
    const tables = this.rooms.tables;
    this.layer = new Qcow2Layer({
      filename: o.filename,
      dev: o.dev,
      dataDev: o.dataDev ?? (guestDev !== o.dev ? guestDev : undefined),
      parsed: o.parsed,
      fileSize: o.fileSize,
      snapshots: o.snapshots,
      l1: new Uint8Array(0),
      l1Size: 0,
      size: h.size,
      backing: o.backing,
      source: {
        l1Size: () => ctx.header().l1Size,
        l1Offset: (i) => {
          const live = ctx.live();
          return live ? live.l1TableOffset(i) : l1TableOffset(ctx.cur, i);
        },
        l2Table: (off, l1Index) => tables.l2(host(off), l1Index),
        fileSize: () => ctx.extent.end(),
      },
    });
    ctx.attachReader(this.layer);
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
    validateTables(o.filename, g, l1, reftable, h.l1TableOffset, h.refcountTableOffset, o.fileSize);
    const journalled = o.journal !== undefined && h.version === 3;
    const state = initialState(g, headerStateOf(o.parsed, journalled), l1, reftable);
    const trace = new Trace(o.trace);
    // The overlap index, from the tables as they are now; from here on every write to the image goes through it.
    const overlap = new OverlapIndex(g, o.overlapCheck ?? 'all');
    await buildOverlapIndex(overlap, { dev: o.dev, parsed: o.parsed, l1, reftable, snapshots: o.snapshots, snapshotTableBytes: o.snapshotTableBytes ?? 0 });
    const image = GuardedDevice.over(o.dev, overlap);
    // The header is cluster 0 by definition: its writes may not leave it, and a structure wrongly placed
    // there must not stop the corrupt bit from being written.
    const headerView = image.as(ANY_KIND, 'header', g.clusterSize);
    const headerBits = new HeaderBits(headerView, h.version, h.headerLength, (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n, trace);
    headerBits.journalBitOnDisk = journalled && (h.autoclearFeatures & AUTOCLEAR_JOURNAL) !== 0n;
    await headerBits.reload();
    const w = new Qcow2Writer(o, state, headerBits, trace, image);
    const clash = overlap.firstOverlap();
    if (clash) {
      // Damage found before anything is written: report it, write nothing (not even the corrupt bit), refuse writes; reads go on.
      w.ctx.refusal = `metadata overlaps: the ${overlapNames(clash.kinds).join(' and the ')} share the cluster at ${hex(clash.offset)}`;
      o.onWarning?.(`${o.filename}: ${w.ctx.refusal}; the image is opened for reading only (run 'qledger check')`);
      return w;
    }
    // Persistent bitmaps: loaded and checked as QEMU loads them (a directory it would refuse fails the open).
    const bitmaps = w.rooms.bitmaps;
    bitmaps.attach({ transact: (op, fn) => w.run(op, fn, true).then(() => w.rooms.writeback.flush()), exclusive: (fn) => w.serial(fn) });
    await bitmaps.attachExtension();
    if (h.version === 3) await bitmaps.load(o.parsed);
    // Unknown autoclear bits say "an extension I do not maintain may be stale
    // now": clear them before the first write, as QEMU does. A session
    // without a journal clears the journal's bit too; a journalled one keeps
    // it (outside the state) and sets it when the journal starts.
    const had = state.header.autoclearFeatures;
    const keep = had & AUTOCLEAR_KNOWN & (bitmaps.any ? ~0n : ~AUTOCLEAR_BITMAPS);
    if (h.version === 3 && keep !== had) {
      // What an earlier session wrote without a flush of its own (a journal's last checkpoint) is
      // durable before the bit that makes its journal stale goes: else a crash could leave the
      // journal stale with its last transaction not marked applied.
      await o.dev.flush();
      // one sector, safe at any crash: not worth starting the journal for
      await w.rooms.journal.without(async () => {
        await w.run('clear autoclear bits', async () => {
          w.ctx.emit({ kind: 'header', field: 'autoclear_features', old: had, new: keep });
        });
        await w.rooms.writeback.flush(); // the cleared bits reach the disk before any write
      });
    }
    if (w.rooms.dedup) await w.rooms.dedup.loadPersisted(o.dev, o.parsed, o.fileSize, o.onWarning);
    return w;
  }

  private dedupRefused(o: WriterOptions): boolean {
    const why = dedupRefusal(this.geometry.refcountBits, o.dataDev !== undefined);
    if (why) o.onWarning?.(`${o.filename}: dedup is off: ${why}; writes go on without it`);
    return why !== undefined;
  }

  // ---- public operations ---------------------------------------------------

  /** What content dedup did in this session (undefined when it is off): counters, and the index's entries and bytes. */
  get dedup(): (DedupCounters & { readonly indexEntries: number; readonly indexBytes: number }) | undefined {
    const d = this.rooms.dedup;
    return d ? { ...d.counters, indexEntries: d.indexEntries, indexBytes: d.indexBytes } : undefined;
  }

  /** Persistent dirty bitmaps: the list, and qemu-img bitmap's commands (each one transaction, written back before it resolves). */
  get bitmaps(): Bitmaps {
    return this.rooms.bitmaps;
  }

  /** The overlap index every write is checked against (its mode, size and refusals: benchmarks and tests read them). */
  get overlap(): { readonly index: OverlapIndex; readonly refusals: number; readonly checks: number } {
    return { index: this.ctx.files.image.index, refusals: this.ctx.files.image.refusals, checks: this.ctx.files.image.checks };
  }

  /** Set when metadata overlapped at open: why every write is refused. */
  get refusal(): string | undefined {
    return this.ctx.refusal;
  }

  /** The virtual size in whole 512-byte sectors, as QEMU counts it (the header may say more). */
  get size(): number {
    return Math.floor(this.ctx.header().size / 512) * 512;
  }

  /** write-backs go through the durable journal (v3 image, journal on, room for its header extension) */
  /** the header's compression type (compressed clusters: deflate or zstd) */
  get compressionType(): number {
    return this.rooms.compressed.type;
  }

  get journalled(): boolean {
    return this.rooms.journal.journalled;
  }

  get lazyRefcounts(): boolean {
    return this.rooms.writeback.lazyRefcounts;
  }

  /** Receive every record, device write and flush from now on (tests attach one to an open writer). */
  set trace(out: TraceEvent[] | undefined) {
    this.ctx.trace.redirect(out);
  }

  /** test-only: stop the next write-backs after this many ordered phases, as a power cut would */
  set stopAfterPhase(phases: number | undefined) {
    this.rooms.writeback.stopAfterPhase = phases;
  }

  /** The committed metadata state (immutable). */
  get state(): MetaState {
    return this.ctx.cur;
  }

  /**
   * Reads run after every operation issued before them and alongside each
   * other (a server's pipelined reads overlap their device reads); an
   * operation issued after them waits for them, so no cluster a read is
   * still reading is freed and reused under it.
   */
  read(offset: number, out: Uint8Array): Promise<void> {
    const p = this.queue.then(() => readGuest(this.layer, guest(offset), out));
    const tracked = p.then(
      () => undefined,
      () => undefined,
    );
    this.reads.add(tracked);
    void tracked.then(() => this.reads.delete(tracked));
    return p;
  }

  /** reads in flight, which the next operation waits for */
  private readonly reads = new Set<Promise<void>>();

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.serial(async () => {
      await this.guestOp('write', offset, data.length);
      if (data.length === 0) return;
      // isZero stops at the first 4 KiB block with a non-zero byte: data costs almost nothing
      if (this.detectZeroes !== 'off' && isZero(data)) {
        await this.run('write (zero detected)', () => this.rooms.zero.zeroRange(guest(offset), data.length, this.detectZeroes === 'unmap'), false, true);
      } else await this.run('write', () => this.rooms.data.write(guest(offset), data), false, true);
      await this.rooms.bitmaps.afterWrite();
      await this.rooms.writeback.maybe();
    });
  }

  /** A write of `length` bytes on another device (`from`), copied in the kernel where both are files (commit); zeros not detected (that needs the bytes; QEMU's commit does not either). */
  writeFrom(offset: number, length: number, from: CopySource): Promise<void> {
    return this.serial(async () => {
      await this.guestOp('write', offset, length);
      if (length === 0) return;
      await this.run('write', () => this.rooms.data.writeFrom(guest(offset), length, from), false, true);
      await this.rooms.bitmaps.afterWrite();
      await this.rooms.writeback.maybe();
    });
  }

  /**
   * Compressed write (qemu-io write -c): whole clusters only, each into a
   * cluster that has no data yet; deflate or zstd with QEMU's parameters. A cluster
   * that does not compress below the cluster size is written normally.
   * `compressed`: each cluster's stream, made already for this image's
   * compression type (`compressionType`) by compress.ts (convert -c's
   * worker threads); undefined for a cluster that did not get smaller.
   */
  writeCompressed(offset: number, data: Uint8Array, compressed?: ReadonlyArray<Uint8Array | undefined>): Promise<void> {
    return this.serial(async () => {
      await this.guestOp('compressed write', offset, data.length);
      const cs = this.geometry.clusterSize;
      const end = offset + data.length;
      if (offset % cs !== 0 || (end % cs !== 0 && end !== this.size)) {
        throw new RangeRequestError(`compressed write at ${hex(offset)} of ${data.length} bytes: compressed writes take whole clusters`, { offset, length: data.length });
      }
      if (this.ctx.hasDataFile) throw new QledgerError('E_UNSUPPORTED', `${this.filename}: compressed writes are not possible with an external data file`);
      await this.run('compressed write', async () => {
        for (let c = offset, k = 0; c < end; c += cs, k++) {
          await this.rooms.compressed.writeCluster(guest(c), data.subarray(c - offset, Math.min(end, c + cs) - offset), compressed ? { z: compressed[k] } : undefined);
        }
        // held with the writes around it as a write is (context.ts): one table copy per run, not per cluster
      }, false, true);
      await this.rooms.writeback.maybe();
    });
  }

  writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.serial(async () => {
      await this.guestOp('write zeroes', offset, length);
      if (length === 0) return;
      await this.run('write-zeroes', () => this.rooms.zero.zeroRange(guest(offset), length, opts.unmap ?? false), false, true);
      await this.rooms.writeback.maybe();
    });
  }

  /**
   * Empty the image (after a commit into its backing file): every mapping
   * of the active tree dropped, one transaction, written back before this
   * resolves. O(metadata) and valid at every instant (write/make-empty.ts):
   * a new empty L1 table, the header switched to it in one sector, then
   * the old tree's references dropped; entry by entry (QEMU's slow path)
   * only while this session tracks clusters shared inside the image.
   */
  makeEmpty(): Promise<void> {
    return this.serial(async () => {
      this.ctx.checkWritable();
      this.rooms.shared.forgetScan();
      await this.run('make empty', async () => {
        if (!(await this.rooms.makeEmpty.run())) await this.rooms.discard.unallocateAll();
      });
      // what the cut removes needs no punching: the freed clusters wait until the file is cut
      this.rooms.alloc.holdDiscards();
      try {
        await this.rooms.writeback.flush();
        await shrinkAfterEmpty(this.rooms, (op, fn) => this.run(op, fn), () => this.ctx.durable.header, this.faults);
      } finally {
        await this.rooms.alloc.releaseDiscards();
      }
    });
  }

  /**
   * Offline dedup of the L2 tables of L1 entries [from, to) (qledger dedup
   * walks the L1 in steps of a few tables): one transaction; the image was
   * opened with `dedup`. Returns the clusters merged.
   */
  dedupTables(from: number, to: number): Promise<number> {
    return this.serial(async () => {
      const d = this.rooms.dedup;
      if (!d) throw new QledgerError('E_USAGE', `${this.filename}: offline dedup needs an image opened with dedup`);
      let merged = 0;
      await this.run('dedup merge', async () => {
        merged = await d.mergeTables(from, to);
      });
      await this.rooms.writeback.maybe();
      return merged;
    });
  }

  /** The internal snapshots, as the live state has them. */
  get snapshots(): readonly SnapshotEntry[] {
    return this.rooms.snapshots.list;
  }

  /**
   * Create an internal snapshot of the active state named `name` (qemu-img
   * snapshot -c): one transaction, written back before this resolves.
   */
  createSnapshot(name: string, fields: SnapshotFields = {}): Promise<SnapshotEntry> {
    return this.snapshotOp('snapshot create', () => this.rooms.snapshots.create(name, fields));
  }

  /** Make snapshot `key` (id first, then name) the active state (qemu-img snapshot -a). */
  applySnapshot(key: string): Promise<SnapshotEntry> {
    return this.snapshotOp('snapshot apply', () => this.rooms.snapshots.apply(key));
  }

  /** Delete snapshot `key` (id first, then name), freeing what only it held (qemu-img snapshot -d). */
  deleteSnapshot(key: string, byName = false): Promise<SnapshotEntry> {
    return this.snapshotOp('snapshot delete', () => this.rooms.snapshots.delete(key, byName));
  }

  private snapshotOp(op: string, fn: () => Promise<SnapshotEntry>): Promise<SnapshotEntry> {
    return this.serial(async () => {
      this.ctx.checkWritable();
      // the snapshot trees are read from the disk: what is pending reaches it first
      await this.rooms.writeback.flush();
      let out: SnapshotEntry | undefined;
      this.rooms.shared.forgetScan();
      const restore = this.rooms.snapshots.save();
      await this.run(op, async () => {
        out = await fn();
      }, true).catch((e: unknown) => {
        if (this.ctx.undone) restore();
        throw e;
      });
      await this.rooms.writeback.flush();
      return out!;
    });
  }

  discard(offset: number, length: number): Promise<void> {
    return this.serial(async () => {
      await this.guestOp('discard', offset, length);
      if (length === 0) return;
      await this.run('discard', () => this.rooms.discard.discard(guest(offset), length), false, true);
      await this.rooms.writeback.maybe();
    });
  }

  /**
   * Change the virtual size. Growing over a longer backing file zeroes the
   * new space so the backing data stays hidden, as QEMU does; image creation
   * passes `fromCreate` because there the backing data must show through.
   */
  truncate(size: number, fromCreate = false, prealloc: 'off' | PreallocMode = 'off'): Promise<void> {
    const old = this.size;
    const p = this.serial(async () => {
      this.ctx.checkWritable();
      if (!Number.isSafeInteger(size) || size < 0) throw new RangeRequestError(`invalid size ${size}`, { size });
      if (size % 512 !== 0) throw new UsageError(`${this.filename}: the new size must be a multiple of 512 bytes (got ${size})`);
      if (prealloc !== 'off' && size < old) throw new UsageError(`${this.filename}: preallocation mode '${prealloc}' applies to growth only`);
      if (prealloc !== 'off' && old % this.geometry.clusterSize !== 0) {
        throw new QledgerError('E_UNSUPPORTED', `${this.filename}: growing with preallocation from a size that is not a multiple of the cluster size is not supported`);
      }
      this.rooms.bitmaps.checkResize();
      await this.run('truncate', () => this.rooms.resize.resize(size, !fromCreate));
      this.layer.size = size;
      this.rooms.bitmaps.resize(size);
      await this.rooms.writeback.flush();
    });
    return prealloc === 'off' ? p : p.then(() => this.preallocate(prealloc, old));
  }

  /**
   * Preallocate the clusters of guest range [from, size), as qemu-img create
   * -o preallocation=MODE does for a new image and growth with a
   * preallocation mode does for the new space: 'metadata' maps clusters
   * (the file grows sparse), 'falloc' also reserves their blocks, 'full'
   * writes zeros into them. `from` must be cluster-aligned and the range
   * unmapped.
   */
  async preallocate(mode: PreallocMode, from = 0): Promise<void> {
    await this.serial(async () => {
      await this.run('preallocate', () => this.rooms.resize.preallocate(mode, guest(from)));
      await this.rooms.writeback.flush();
    });
  }

  flush(): Promise<void> {
    return this.serial(() => this.rooms.writeback.flush());
  }

  /** Flush, then (lazy refcounts) write the exact refcounts and clear the dirty bit, then close the files. */
  close(): Promise<void> {
    return this.serial(async () => {
      const ctx = this.ctx;
      if (ctx.closed) return;
      try {
        if (!ctx.corrupt) {
          await this.rooms.writeback.flush();
          await this.rooms.bitmaps.close();
          if (ctx.headerBits.dirtyOnDisk) await this.rooms.writeback.cleanDirty();
          // dedup: the index written for the next session, then the bit that says it matches the image
          if (this.rooms.dedup?.ready && (await this.rooms.dedup.persist())) {
            const had = ctx.cur.header.autoclearFeatures;
            await this.headerFeatures('persist dedup index', 'autoclear_features', had, had | AUTOCLEAR_DEDUP_INDEX);
          }
          // The last checkpoint needs no flush: replaying an applied transaction is harmless.
          await this.rooms.journal.close();
        }
      } finally {
        ctx.closed = true;
        await this.layer.close();
      }
    });
  }

  /** Close the files without flushing anything (a simulated crash). */
  async abandon(): Promise<void> {
    this.ctx.closed = true;
    await this.layer.close();
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
        fixed = await rebuildRefcounts(this.ctx, this.rooms.alloc, expected, endCluster);
      }),
    );
    await this.serial(() => this.rooms.writeback.flush());
    return { fixed };
  }

  /**
   * Turn lazy refcounts on or off (qemu-img amend -o lazy_refcounts): one
   * header field; before it goes off, the refcounts a dirty image defers
   * are written exactly and the dirty bit cleared.
   */
  setLazyRefcounts(on: boolean): Promise<void> {
    return this.serial(async () => {
      const ctx = this.ctx;
      ctx.checkWritable();
      if (this.rooms.writeback.lazyRefcounts === on) return;
      await this.rooms.writeback.flush();
      if (!on && ctx.headerBits.dirtyOnDisk) await this.rooms.writeback.cleanDirty();
      const had = ctx.cur.header.compatibleFeatures;
      await this.headerFeatures('amend lazy_refcounts', 'compatible_features', had, on ? had | COMPAT_LAZY_REFCOUNTS : had & ~COMPAT_LAZY_REFCOUNTS);
    });
  }

  /** One header feature field changed and written back: one sector, atomic, not worth starting the journal for (as the autoclear bits at open). */
  private async headerFeatures(op: string, field: 'compatible_features' | 'autoclear_features', old: bigint, next: bigint): Promise<void> {
    await this.rooms.journal.without(async () => {
      await this.run(op, async () => {
        this.ctx.emit({ kind: 'header', field, old, new: next });
      });
      await this.rooms.writeback.flush();
    });
  }

  /** Expand the active tree's zero clusters for a v2 header (qemu-img amend -o compat=0.10; write/downgrade.ts). */
  expandZeroClusters(): Promise<void> {
    return this.serial(async () => {
      await this.run('expand zero clusters', () => this.rooms.zeroExpansion.run());
      await this.rooms.writeback.flush();
    });
  }

  /** Mark the image clean on disk (after a rebuild). */
  async markClean(): Promise<void> {
    await this.serial(async () => {
      if (this.ctx.headerBits.dirtyOnDisk) await this.rooms.writeback.cleanDirty();
    });
  }

  // ---- plumbing ----------------------------------------------------------

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const reads = this.reads.size ? [...this.reads] : undefined;
    const before = reads ? this.queue.then(() => Promise.all(reads)) : this.queue;
    const p = before.then(fn, fn);
    this.queue = p.catch(() => undefined);
    return p;
  }

  /**
   * One guest operation = one transaction: each table is copied at most
   * once. `undo`: a metadata-only operation that fails is taken back in the
   * same transaction (its records' inverses; writer/context.ts `undo`).
   * `group`: a guest write, write-zeroes or discard, whose state
   * transaction stays open for the next such operation until something
   * reads the state (write/context.ts `held`).
   */
  private async run(op: string, fn: () => Promise<void>, undo = false, group = false): Promise<void> {
    const ctx = this.ctx;
    ctx.checkWritable();
    const id = ++this.txCounter;
    ctx.mark({ kind: 'begin', tx: id, op });
    ctx.tx = group ? ctx.openTransaction() : new Transaction(ctx.cur);
    ctx.undoLog = undo ? [] : undefined;
    try {
      await fn();
      if (this.rooms.shared.active) await this.rooms.shared.settle();
    } catch (e) {
      if (undo) ctx.undo();
      throw e;
    } finally {
      ctx.undoLog = undefined;
      // Records already emitted describe changes that may already rely on
      // data written to the device; keep them even if the operation failed.
      ctx.closeTransaction(ctx.tx, group && !undo);
      ctx.tx = undefined;
    }
    ctx.mark({ kind: 'commit', tx: id });
  }

  /** A guest operation's range checked, and marked in the enabled bitmaps (in use on disk first). */
  private async guestOp(what: string, offset: number, length: number): Promise<void> {
    this.checkRange(what, offset, length);
    if (length > 0) await this.rooms.bitmaps.beforeWrite(offset, length);
  }

  private checkRange(what: string, offset: number, length: number): void {
    this.ctx.checkWritable();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new RangeRequestError(`${what}: offset ${offset} and length ${length} must be non-negative integers`, { offset, length });
    }
    if (offset + length > this.size) {
      throw new RangeRequestError(`${what} of ${length} bytes at ${hex(offset)} is past the end of the ${this.size}-byte disk`, { offset, length });
    }
  }
}
