/// <reference types="node" preserve="true" />
/**
 * The image handle the library and the CLI use: a chain of layers opened
 * from a path, with guest reads, map, block status and info, and, opened
 * with `write: true`, the write engine (writer.ts) behind it. The CLI goes
 * through this facade only.
 */

import type { Readable, Writable } from 'node:stream';
import { createRequire } from 'node:module';
import type { BlockDevice } from '../io/device.ts';
import { readGuest } from './read.ts';
import { openDeviceLayer, openLayer, type OpenOptions } from './open.ts';
import { mapExtents, extentBatches, chainStatus, type MapEntry } from './map.ts';
import { imageInfo, type ImageInfo } from './info.ts';
import { Qcow2Layer } from './qcow2-layer.ts';
import { allocatedHere, guest, type Layer } from './layer.ts';
import { uninitialized, zeroedIoBuffer } from '../format/bytes.ts';
import type { Geometry } from '../format/header.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import { QledgerError, RangeRequestError } from '../errors.ts';
import type { WritableOpenOptions } from './writable.ts';
import type { RecoveryReport } from './journal/replay.ts';
import type { Qcow2Writer, ZeroOptions } from './writer.ts';
import type { CreateOptions } from './create.ts';
import { ImageSnapshots } from './image-snapshots.ts';
import { ImageBitmaps } from './image-bitmaps.ts';
import { dedupRefusal, dedupState, type DedupState } from './dedup/stats.ts';

/**
 * Reads at least this long get fresh zeroed memory (Image.read). glibc's malloc maps allocations
 * above its mmap threshold (at most 32 MiB on 64-bit) straight from the kernel, so calloc gets
 * zero pages without writing them; below it a calloc may clear recycled memory, which costs more
 * than the zero runs' fill it would save.
 */
const ZEROED_READ = 64 << 20;

// Loaded when first needed: a read-only open (qledger info, map, compare)
// never pays for the write engine or for node:stream.
const writable = () => import('./writable.ts');
let streamModule: typeof import('node:stream') | undefined;
const stream = () => (streamModule ??= createRequire(import.meta.url)('node:stream') as typeof import('node:stream'));

/**
 * Read-only options, plus `write` and, for a read-write open, the write
 * engine's options as `WritableOpenOptions` documents them: trace,
 * detectZeroes, cacheBytes, journal (default on), journalBytes, onWarning,
 * overlapCheck (QEMU's overlap-check modes: 'none', 'constant', 'cached',
 * 'all'; default 'all'), dedup (content dedup of whole-cluster writes:
 * a cluster whose bytes are already stored maps the stored cluster).
 */
export interface ImageOpenOptions extends OpenOptions, Pick<WritableOpenOptions, 'trace' | 'detectZeroes' | 'cacheBytes' | 'journal' | 'journalBytes' | 'onWarning' | 'overlapCheck' | 'dedup' | 'unsafe'> {
  /** open read-write (qcow2 only); the backing chain stays read-only */
  readonly write?: boolean | undefined;
}

declare global {
  // Node 20.15+ has Symbol.asyncDispose at run time (explicit resource management); this
  // declaration is the one @types/node and TypeScript's esnext.disposable library make, so
  // a consumer type-checks with or without either.
  interface SymbolConstructor {
    readonly asyncDispose: unique symbol;
  }
}

/**
 * An open image: a qcow2 or raw file (or any BlockDevice) with its backing
 * chain; guest reads, map and block status, info, streams, and with
 * `write: true` the write engine. Every method returns a promise that
 * rejects with a QledgerError (`code` and `data`) on failure.
 *
 * @example
 * import { Image } from 'qledger';
 * import { mkdtempSync } from 'node:fs';
 * import { tmpdir } from 'node:os';
 * import { join } from 'node:path';
 *
 * const path = join(mkdtempSync(join(tmpdir(), 'qledger-')), 'disk.qcow2');
 * await Image.create(path, { size: 64 << 20 });
 * {
 *   await using img = await Image.open(path, { write: true });
 *   await img.write(0, new Uint8Array(65536).fill(0x5a));
 *   await img.writeZeroes(1 << 20, 1 << 20);
 * }
 * const img = await Image.open(path);
 * const bytes = await img.read(0, 4096);
 * console.log(bytes.every((b) => b === 0x5a)); // true
 * for await (const e of img.map()) console.log(e.start, e.length, e.data ? 'data' : 'zero');
 * await img.close();
 */
export class Image {
  private closed = false;

  private constructor(
    readonly top: Layer,
    /** the write engine, when opened read-write */
    readonly writer?: Qcow2Writer | undefined,
    /** what the read-write open's journal recovery did */
    readonly recovery?: RecoveryReport | undefined,
  ) {}

  /**
   * Open an image with its backing chain; read-only unless `write` is set.
   * `target` is a path, or any BlockDevice (the memory device, or your
   * own storage): then `target.name` names it in messages and is what a
   * backing file or data file the image names resolves against. Closing the
   * image closes the device.
   */
  static async open(target: string | BlockDevice, opts: ImageOpenOptions = {}): Promise<Image> {
    const name = typeof target === 'string' ? target : target.name;
    if (opts.write) {
      if (opts.snapshot !== undefined) throw new QledgerError('E_USAGE', `${name}: a snapshot can only be opened read-only`);
      // qemu's words: sharing write permissions is for readers only
      if (opts.forceShare) throw new QledgerError('E_USAGE', `${name}: force-share=on can only be used with read-only images`);
      const o: WritableOpenOptions = { format: opts.format, trusted: opts.trusted, allowedDir: opts.allowedDir, trace: opts.trace, detectZeroes: opts.detectZeroes, cacheBytes: opts.cacheBytes, journal: opts.journal, journalBytes: opts.journalBytes, onWarning: opts.onWarning, overlapCheck: opts.overlapCheck, dedup: opts.dedup, unsafe: opts.unsafe };
      const w = await writable();
      const { writer, recovery } = typeof target === 'string' ? await w.openWriterSession(target, o) : await w.openWriterSessionOn(target, name, o);
      return new Image(writer.layer, writer, recovery);
    }
    if (opts.dedup) throw new QledgerError('E_USAGE', `${name}: dedup shares clusters as it writes, so it needs a read-write open (write: true)`);
    return new Image(typeof target === 'string' ? await openLayer(target, opts) : await openDeviceLayer(target, opts));
  }

  /**
   * Create a qcow2 image (qemu-img create -f qcow2) at a path, or on a
   * BlockDevice (no backing file or data file there); returns qemu-img's
   * "Formatting ..." line for a path.
   */
  static async create(target: string | BlockDevice, opts: CreateOptions): Promise<string> {
    const w = await writable();
    if (typeof target === 'string') return (await w.createImage(target, opts)).summary;
    await w.createOnDevice(target, target.name, opts);
    return '';
  }

  /** The writer, or why there is none (every method below fails as a rejected promise, never synchronously). */
  private w(): Qcow2Writer {
    this.open();
    if (!this.writer) throw new QledgerError('E_READ_ONLY', `${this.top.filename}: opened read-only`);
    return this.writer;
  }

  private open(): void {
    if (this.closed) throw new QledgerError('E_CLOSED', `${this.top.filename}: image is closed`);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.w().write(offset, data);
  }

  /**
   * Write `length` bytes read from `from.device` at `from.offset` (a host
   * range of another image, say) to guest `offset`. Where both are files the
   * kernel copies them (copy_file_range) when the process makes its file
   * requests inline (the CLI: `setInlineIo`); otherwise they pass through a
   * buffer. Zeros in them are written as data, not detected.
   */
  async writeFrom(offset: number, length: number, from: { readonly device: BlockDevice; readonly offset: number }): Promise<void> {
    await this.w().writeFrom(offset, length, from);
  }

  /**
   * Compressed write: whole clusters that hold no data yet, as qemu-io
   * write -c. `opts.compressed` gives each cluster's stream made already
   * with `compressCluster(img.compressionType, cluster)` (qledger convert
   * -c makes them on worker threads); undefined for a cluster that does not
   * get smaller (written uncompressed).
   */
  async writeCompressed(offset: number, data: Uint8Array, opts: { readonly compressed?: ReadonlyArray<Uint8Array | undefined> } = {}): Promise<void> {
    await this.w().writeCompressed(offset, data, opts.compressed);
  }

  /** The compression type of a writable qcow2 image's compressed clusters (format/features.ts: deflate 0, zstd 1). */
  get compressionType(): number {
    return this.w().compressionType;
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    await this.w().writeZeroes(offset, length, opts);
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.w().discard(offset, length);
  }

  async flush(): Promise<void> {
    await this.w().flush();
  }

  /** Empty the image: every cluster it maps dropped, its backing file (if any) showing through (qemu-img commit's make_empty). */
  async makeEmpty(): Promise<void> {
    await this.w().makeEmpty();
  }

  /**
   * Offline dedup (qledger dedup): every whole data cluster of the active
   * tree that this image owns alone and whose bytes an earlier cluster
   * holds maps that cluster instead, and its own is freed (its space given
   * back to the file system). A few L2 tables per transaction, each
   * journalled. Needs an open with `write: true, dedup: true`.
   */
  async dedup(o: { onProgress?: ((done: number, total: number) => void) | undefined } = {}): Promise<{ scanned: number; merged: number; bytesSaved: number }> {
    const w = this.w();
    if (!w.dedup) {
      const why = dedupRefusal(w.geometry.refcountBits, w.layer.dataDev !== undefined) ?? 'the image was not opened with dedup';
      throw new QledgerError('E_UNSUPPORTED', `${w.filename}: cannot dedup: ${why}`);
    }
    const n = w.layer.l1Count();
    let merged = 0;
    for (let i = 0; i < n; i += 16) {
      merged += await w.dedupTables(i, Math.min(n, i + 16));
      o.onProgress?.(Math.min(n, i + 16), n);
    }
    await w.flush();
    return { scanned: w.dedup.indexed, merged, bytesSaved: merged * w.geometry.clusterSize };
  }

  /** The dedup state of the active tree of `layer` (default: the image itself), from metadata alone (engine/dedup/stats.ts); qcow2 only. */
  async dedupState(layer: Layer = this.top): Promise<DedupState> {
    if (!(layer instanceof Qcow2Layer)) throw new QledgerError('E_UNSUPPORTED', `${layer.filename}: dedup state is a qcow2 notion; this image is ${layer.format}`);
    return dedupState(layer);
  }

  async truncate(size: number, preallocation: 'off' | 'metadata' | 'falloc' | 'full' = 'off'): Promise<void> {
    await this.w().truncate(size, false, preallocation);
  }

  /** Drop the image without flushing or closing cleanly: what a crash leaves. */
  async abandon(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await (this.writer ? this.writer.abandon() : this.top.close());
  }

  /** virtual disk size in bytes */
  get size(): number {
    return this.writer ? this.writer.size : this.top.size;
  }

  get format(): 'qcow2' | 'raw' {
    return this.top.format;
  }

  /** The chain from this image down to its last backing file. */
  get chain(): Layer[] {
    const out: Layer[] = [];
    for (let l: Layer | undefined = this.top; l; l = l.backing) out.push(l);
    return out;
  }

  /** The top image's internal snapshots: a list, and with `write: true` create, apply and delete (image-snapshots.ts). */
  get snapshots(): ImageSnapshots {
    return (this.snapshotView ??= new ImageSnapshots({ entries: () => this.snapshotsOf(this.top), writer: () => this.w() }));
  }

  private snapshotView: ImageSnapshots | undefined;

  /** The top image's persistent dirty bitmaps: list and dirty extents, and with `write: true` qemu-img bitmap's commands (image-bitmaps.ts). */
  get bitmaps(): ImageBitmaps {
    const layer = () => (this.top instanceof Qcow2Layer ? this.top : undefined);
    return (this.bitmapView ??= new ImageBitmaps({ layer, live: () => this.writer?.bitmaps, writable: () => this.w().bitmaps }));
  }

  private bitmapView: ImageBitmaps | undefined;

  /** The internal snapshots of one image of the chain (none for raw). */
  snapshotsOf(layer: Layer): readonly SnapshotEntry[] {
    return layer instanceof Qcow2Layer ? layer.snapshots : [];
  }

  /** The top image's qcow2 geometry (cluster size, L2 entries, ...); undefined for raw. */
  get geometry(): Geometry | undefined {
    return this.top instanceof Qcow2Layer ? this.top.geometry : undefined;
  }

  /**
   * Allocation in the top image only (QEMU's bdrv_is_allocated, which
   * qemu-io's map and alloc use): whether the top image itself decides what
   * guest range [offset, offset + length) reads (data or zero), and for how
   * many bytes that holds.
   */
  async topStatus(offset: number, length: number): Promise<{ allocated: boolean; length: number }> {
    const st = await this.top.status(guest(offset), length);
    return { allocated: allocatedHere(st), length: st.length };
  }

  /**
   * The guest bytes [offset, offset + length), through the backing chain, in
   * a new array. A long one is a view that starts inside its ArrayBuffer
   * (its first bytes page-aligned): use `byteOffset` with `.buffer`.
   */
  async read(offset: number, length: number): Promise<Uint8Array> {
    this.open();
    if (!Number.isSafeInteger(length) || length < 0) throw new RangeRequestError(`read of length ${length}: lengths are non-negative integers`, { offset, length });
    // A short read gets a buffer that is not zero-filled: readGuest writes every byte of it (zeros
    // included), and the buffer is dropped if the read fails (zero-filling 1 GiB of NBD reads in
    // small requests cost a fifth of the server's CPU). A long one gets fresh zero pages
    // (ZEROED_READ) and readGuest skips the zero runs, so their pages are never touched.
    if (length < ZEROED_READ || this.writer) {
      const out = uninitialized(length);
      await this.readInto(out, offset);
      return out;
    }
    const out = zeroedIoBuffer(length);
    await readGuest(this.top, guest(offset), out, true);
    return out;
  }

  async readInto(out: Uint8Array, offset: number): Promise<void> {
    this.open();
    if (this.writer) await this.writer.read(offset, out);
    else await readGuest(this.top, guest(offset), out);
  }

  /** Extents as `qemu-img map` reports them; `signal` stops the iteration (it rejects with the signal's reason). */
  async *map(start = 0, length = this.size, o: { signal?: AbortSignal | undefined } = {}): AsyncGenerator<MapEntry> {
    this.open();
    yield* mapExtents(this.top, start, length, o.signal);
  }

  /**
   * The extents of map(), in arrays of about one L2 table's span: the same
   * entries, for a caller walking a million of them (one promise per array,
   * not per extent).
   */
  async *mapBatches(start = 0, length = this.size, o: { signal?: AbortSignal | undefined } = {}): AsyncGenerator<MapEntry[]> {
    this.open();
    yield* extentBatches(this.top, start, length, o.signal);
  }

  /** Status of the run at `offset`, resolved through the backing chain. */
  async status(offset: number, length: number): Promise<MapEntry> {
    this.open();
    return chainStatus(this.top, offset, length);
  }

  async info(layer: Layer = this.top): Promise<ImageInfo> {
    this.open();
    return imageInfo(layer);
  }

  /** Flush (write mode) and close the chain. Closing twice is harmless; any other use afterwards is E_CLOSED. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await (this.writer ? this.writer.close() : this.top.close());
  }

  /**
   * The guest bytes [start, end) as a Readable (end exclusive; default the
   * whole disk), read in chunks of `highWaterMark` bytes (default 1 MiB) as
   * the consumer pulls them: `pipeline(img.createReadStream(), out)`.
   */
  createReadStream(o: { start?: number; end?: number; highWaterMark?: number; signal?: AbortSignal } = {}): Readable {
    const start = o.start ?? 0;
    const end = o.end ?? this.size;
    const chunk = o.highWaterMark ?? 1 << 20;
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start || end > this.size) {
      throw new RangeRequestError(`read stream of [${start}, ${end}): outside the ${this.size}-byte disk`, { start, end });
    }
    if (!Number.isSafeInteger(chunk) || chunk <= 0) throw new RangeRequestError(`read stream highWaterMark ${chunk}: a positive integer is needed`, { highWaterMark: chunk });
    const self = this;
    async function* pieces(): AsyncGenerator<Buffer> {
      for (let pos = start; pos < end; pos += chunk) {
        const b = await self.read(pos, Math.min(chunk, end - pos));
        yield Buffer.from(b.buffer, b.byteOffset, b.byteLength);
      }
    }
    return stream().Readable.from(pieces(), { objectMode: false, highWaterMark: chunk, ...(o.signal ? { signal: o.signal } : {}) });
  }

  /**
   * A Writable into the guest disk from offset `start` (default 0): chunks
   * are written in order, each acknowledged once the image has it, and the
   * stream finishes after a flush, so `await pipeline(src, img.createWriteStream())`
   * resolves when the data is durable.
   */
  createWriteStream(o: { start?: number } = {}): Writable {
    let pos = o.start ?? 0;
    return new (stream().Writable)({
      write: (chunk: Buffer, _encoding, done) => {
        this.write(pos, chunk).then(() => {
          pos += chunk.length;
          done();
        }, done);
      },
      final: (done) => {
        this.flush().then(() => done(), done);
      },
    });
  }

  /** `await using img = await Image.open(...)` closes the image at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
