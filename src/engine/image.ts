/**
 * The image handle the library and the CLI use: a chain of layers opened
 * from a path, with guest reads, map, block status and info, and, opened
 * with `write: true`, the write engine (writer.ts) behind it. The CLI goes
 * through this facade only.
 */

import { readGuest } from './read.ts';
import { openLayer, type OpenOptions } from './open.ts';
import { mapExtents, chainStatus, type MapEntry } from './map.ts';
import { imageInfo, type ImageInfo } from './info.ts';
import { Qcow2Layer } from './qcow2-layer.ts';
import { guest, type Layer } from './layer.ts';
import type { Geometry } from '../format/header.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import { QledgerError, RangeRequestError } from '../errors.ts';
import { openWriterSession, createImage, type WritableOpenOptions } from './writable.ts';
import type { RecoveryReport } from './journal/replay.ts';
import type { Qcow2Writer, ZeroOptions } from './writer.ts';
import type { CreateOptions } from './create.ts';

/**
 * Read-only options, plus `write` and, for a read-write open, the write
 * engine's options as `WritableOpenOptions` documents them: trace,
 * detectZeroes, cacheBytes, journal (default on), journalBytes, onWarning.
 */
export interface ImageOpenOptions extends OpenOptions, Pick<WritableOpenOptions, 'trace' | 'detectZeroes' | 'cacheBytes' | 'journal' | 'journalBytes' | 'onWarning'> {
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

export class Image {
  private closed = false;

  private constructor(
    readonly top: Layer,
    /** the write engine, when opened read-write */
    readonly writer?: Qcow2Writer | undefined,
    /** what the read-write open's journal recovery did */
    readonly recovery?: RecoveryReport | undefined,
  ) {}

  /** Open `path` with its backing chain; read-only unless `write` is set. */
  static async open(path: string, opts: ImageOpenOptions = {}): Promise<Image> {
    if (opts.write) {
      if (opts.snapshot !== undefined) throw new QledgerError('E_USAGE', `${path}: a snapshot can only be opened read-only`);
      const o: WritableOpenOptions = { format: opts.format, trace: opts.trace, detectZeroes: opts.detectZeroes, cacheBytes: opts.cacheBytes, journal: opts.journal, journalBytes: opts.journalBytes, onWarning: opts.onWarning };
      const { writer, recovery } = await openWriterSession(path, o);
      return new Image(writer.layer, writer, recovery);
    }
    return new Image(await openLayer(path, opts));
  }

  /** Create a qcow2 image (qemu-img create -f qcow2); returns qemu-img's "Formatting ..." line. */
  static async create(path: string, opts: CreateOptions): Promise<string> {
    return (await createImage(path, opts)).summary;
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

  /** Compressed write (deflate images): whole clusters that hold no data yet, as qemu-io write -c. */
  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    await this.w().writeCompressed(offset, data);
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

  /** Resize; growth may preallocate the new space ('metadata', 'falloc' or 'full', as qemu-img resize --preallocation). */
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

  get snapshots(): readonly SnapshotEntry[] {
    return this.snapshotsOf(this.top);
  }

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
    const allocated = st.type === 'normal' || st.type === 'compressed' || st.type === 'raw-data' || st.type === 'zero-plain' || st.type === 'zero-alloc';
    return { allocated, length: st.length };
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.open();
    if (!Number.isSafeInteger(length) || length < 0) throw new RangeRequestError(`read of length ${length}: lengths are non-negative integers`, { offset, length });
    const out = new Uint8Array(length);
    await this.readInto(out, offset);
    return out;
  }

  async readInto(out: Uint8Array, offset: number): Promise<void> {
    this.open();
    if (this.writer) await this.writer.read(offset, out);
    else await readGuest(this.top, guest(offset), out);
  }

  /** Extents as `qemu-img map` reports them. */
  async *map(start = 0, length = this.size): AsyncGenerator<MapEntry> {
    this.open();
    yield* mapExtents(this.top, start, length);
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

  /** `await using img = await Image.open(...)` closes the image at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
