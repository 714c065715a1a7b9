/**
 * Persistent dirty bitmaps, kept instead of dropped: the bitmap directory
 * loaded and checked at open as QEMU loads it, every guest write, zero write
 * and discard marked in the enabled bitmaps at their granularity, and every
 * change to the directory (in use, stored, added, removed, cleared, enabled,
 * disabled, merged) made as one transaction that writes a new directory and
 * new tables to fresh clusters and switches the bitmaps extension to them
 * (ordering.ts, phase 2b); the old ones are freed after. Nothing is written
 * in place, so a crash leaves the old directory or the new one.
 *
 * As QEMU: enabled bitmaps are marked in use on disk before the first guest
 * write of a session reaches the disk (a crash then leaves them in use, that
 * is inconsistent, never silently stale); the close stores them and clears
 * the flag. A bitmap found in use at open is inconsistent: kept as it is,
 * never tracked or trusted, until it is removed. Unlike QEMU, a bitmap no
 * write touched is left where it is (QEMU rewrites every bitmap at close),
 * and nothing is written at all by a session that writes nothing.
 */

import { QledgerError, UsageError, hex } from '../../errors.ts';
import {
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BME_MAX_GRANULARITY_BITS,
  BME_MAX_NAME_SIZE,
  BME_MAX_PHYS_SIZE,
  BME_MAX_TABLE_SIZE,
  BME_MIN_GRANULARITY_BITS,
  MAX_BITMAPS,
  MAX_BITMAP_DIRECTORY_BYTES,
  bitmapTableSize,
  checkDirectoryEntry,
  decodeBitmapDirectory,
  decodeBitmapTable,
  directoryEntrySize,
  encodeBitmapDirectory,
  encodeBitmapTable,
  encodeBitmapsExtension,
  type BitmapDirectoryEntry,
} from '../../format/bitmaps.ts';
import { findExtension } from '../../format/extension-insert.ts';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS } from '../../format/features.ts';
import type { ParsedHeader } from '../../format/header.ts';
import { cluster, host } from '../../format/offsets.ts';
import { readAt, type BlockDevice } from '../../io/device.ts';
import { DirtyBitmap } from '../bitmaps/dirty-bitmap.ts';
import { loadBitmap } from '../bitmaps/load.ts';
import { insertHeaderExtension, removeHeaderExtension } from '../journal/live.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import { OL_BITMAP_DIRECTORY, OL_BITMAP_TABLE, type OverlapIndex } from './overlap.ts';

/** QEMU's refusal of an inconsistent bitmap, with its hint. */
export function inconsistentMessage(name: string): string {
  return `Bitmap '${name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`;
}

/** A bitmap as `img.bitmaps.list()` reports it. */
export interface BitmapInfo {
  readonly name: string;
  readonly granularity: number;
  /** AUTO: writes mark it */
  readonly enabled: boolean;
  /** IN_USE on disk now */
  readonly inUse: boolean;
  /** found in use at open: its content cannot be trusted */
  readonly inconsistent: boolean;
}

interface Entry {
  name: string;
  granularityBits: number;
  /** the directory flags as on disk */
  flags: number;
  inconsistent: boolean;
  /** the table on disk (offset 0: none yet, a bitmap added in this session) */
  table: { offset: number; size: number };
  /** bits set in this session, not stored yet */
  added: DirtyBitmap | undefined;
  /** the stored bits no longer count (cleared) */
  cleared: boolean;
  /** the stored bits, once read */
  stored: DirtyBitmap | undefined;
  /** the disk's size changed: stored again at the new size */
  resized: boolean;
}

/** How the room runs a transaction: inside the writer's queue (`transact`), or queued behind it (`exclusive`). */
export interface BitmapRunner {
  /** one transaction written back, the caller already in the writer's queue */
  transact(op: string, fn: () => Promise<void>): Promise<void>;
  /** queued behind every operation issued before */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
}

/** Test-only: the fault that lets guest data reach the disk before the bitmaps are in use there. */
export interface BitmapFaults {
  readonly inUseLate?: boolean | undefined;
}

export class Bitmaps {
  private list: Entry[] = [];
  /** entries removed since the last commit: their clusters are freed by it */
  private removed: Entry[] = [];
  /** the enabled bitmaps are in use on disk: writes are tracked */
  private tracking = false;
  /** something in the directory changed since the last commit */
  private changed = false;
  private runner: BitmapRunner | undefined;
  /** the last commit emitted its directory's records (an operation that fails before that changed nothing) */
  private published = false;

  constructor(
    private readonly ctx: WriteContext,
    private readonly alloc: Allocator,
    private readonly overlap: OverlapIndex,
    private readonly faults: BitmapFaults | undefined,
  ) {}

  attach(runner: BitmapRunner): void {
    this.runner = runner;
  }

  /**
   * Read and check the directory (qcow2_load_dirty_bitmaps): a directory
   * QEMU would refuse fails the open in its terms, naming field and offset.
   */
  async load(parsed: ParsedHeader): Promise<void> {
    const b = parsed.bitmaps;
    if (!b) return;
    const cs = this.ctx.geometry.clusterSize;
    const dir = await readBitmapDirectory(this.ctx.files.image, this.ctx.filename, parsed, cs, this.ctx.header().size);
    for (const e of dir) {
      const inconsistent = (e.flags & BME_FLAG_IN_USE) !== 0;
      this.list.push({ name: e.name, granularityBits: e.granularityBits, flags: e.flags, inconsistent, table: { offset: e.tableOffset, size: e.tableSize }, added: undefined, cleared: false, stored: undefined, resized: false });
    }
  }

  /** The bitmaps, in directory order. */
  get entries(): BitmapInfo[] {
    return this.list.map((e) => ({ name: e.name, granularity: 2 ** e.granularityBits, enabled: (e.flags & BME_FLAG_AUTO) !== 0, inUse: (e.flags & BME_FLAG_IN_USE) !== 0, inconsistent: e.inconsistent }));
  }

  /** Whether the autoclear bit stays set at open: the image has bitmaps qledger keeps. */
  get any(): boolean {
    return this.list.length > 0;
  }

  private tracked(e: Entry): boolean {
    return (e.flags & BME_FLAG_AUTO) !== 0 && !e.inconsistent;
  }

  /**
   * Before a guest write, zero write or discard of [offset, offset + length):
   * the enabled bitmaps in use on disk first (one transaction, once a
   * session), then their bits set. The caller is in the writer's queue.
   */
  async beforeWrite(offset: number, length: number): Promise<void> {
    if (this.list.length === 0) {
      // an extension another program disowned (its bit clear) goes at the first write, as QEMU drops it
      if (this.ctx.bitmapsExt !== undefined) await this.dropEmptyExtension();
      return;
    }
    if (!this.tracking && this.list.some((e) => this.tracked(e))) {
      if (this.faults?.inUseLate) {
        this.tracking = true;
        this.lateInUse = true;
      } else
        await this.guarded(async () => {
          this.tracking = true;
          await this.runner!.transact('bitmaps in use', () => this.commit());
        });
    }
    for (const e of this.list) if (this.tracked(e)) this.bitsOf(e).setRange(offset, length);
  }

  /** fault 'bitmaps-in-use-late': the in-use transaction runs after the first write instead */
  private lateInUse = false;

  /** After the guest operation (the fault's late in-use transaction). */
  async afterWrite(): Promise<void> {
    if (!this.lateInUse) return;
    this.lateInUse = false;
    await this.runner!.transact('bitmaps in use (late)', () => this.commit());
  }

  private bitsOf(e: Entry): DirtyBitmap {
    return (e.added ??= new DirtyBitmap(this.ctx.header().size, e.granularityBits, this.ctx.geometry.clusterSize));
  }

  /** At close: the tracked bitmaps stored, in use cleared (nothing when no write was tracked). */
  async close(): Promise<void> {
    if (!this.tracking && !this.changed) return;
    await this.guarded(async () => {
      this.tracking = false;
      this.changed = true;
      await this.runner!.transact('store bitmaps', () => this.commit());
    });
    await this.dropEmptyExtension();
  }

  /** The disk's size changes: every bitmap follows it (QEMU refuses while one is inconsistent). */
  resize(size: number): void {
    this.checkResize();
    for (const e of this.list) {
      e.added?.resize(size);
      e.stored?.resize(size);
      e.resized = true;
    }
    if (this.list.length) this.changed = true;
  }

  /** Refusals before a resize changes anything. */
  checkResize(): void {
    const bad = this.list.find((e) => e.inconsistent);
    if (bad) throw new QledgerError('E_UNSUPPORTED', inconsistentMessage(bad.name), { errno: 95 });
  }

  // ---- the bitmap commands (qemu-img bitmap), each one transaction ----------

  add(name: string, o: { granularity?: number | undefined; disabled?: boolean | undefined } = {}): Promise<void> {
    return this.op('bitmap add', async () => {
      const cs = this.ctx.geometry.clusterSize;
      if (this.ctx.version < 3) throw new QledgerError('E_UNSUPPORTED', `Can't make bitmap '${name}' persistent in '${this.ctx.filename}': Cannot store dirty bitmaps in qcow2 v2 files`);
      if (name === '') throw new UsageError('Bitmap name cannot be empty');
      if (this.list.some((e) => e.name === name)) throw new UsageError(`Bitmap already exists: ${name}`, { exists: true });
      // QEMU's default: the cluster size, at least 4 KiB
      const gran = o.granularity ?? Math.max(4096, cs);
      if (!Number.isSafeInteger(gran) || gran < 512 || gran >= 2 ** 32 || (gran & (gran - 1)) !== 0) throw new UsageError('Granularity must be power of 2 and at least 512');
      const bits = Math.log2(gran);
      const prefix = `Can't make bitmap '${name}' persistent in '${this.ctx.filename}'`;
      if (bits > BME_MAX_GRANULARITY_BITS) throw new UsageError(`${prefix}: Granularity exceeds maximum (${2 ** BME_MAX_GRANULARITY_BITS} bytes)`);
      if (bits < BME_MIN_GRANULARITY_BITS) throw new UsageError(`${prefix}: Granularity is under minimum (${2 ** BME_MIN_GRANULARITY_BITS} bytes)`);
      const bytes = Math.ceil(Math.ceil(this.ctx.header().size / gran) / 8);
      if (bytes > BME_MAX_PHYS_SIZE || bytes > BME_MAX_TABLE_SIZE * cs) throw new UsageError(`${prefix}: Too much space will be occupied by the bitmap. Use larger granularity`);
      if (new TextEncoder().encode(name).length > BME_MAX_NAME_SIZE) throw new UsageError(`${prefix}: Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`);
      if (this.list.length + 1 > MAX_BITMAPS) throw new UsageError(`${prefix}: Too many persistent bitmaps`);
      const dirBytes = this.list.reduce((n, e) => n + directoryEntrySize(e.name), directoryEntrySize(name));
      if (dirBytes > MAX_BITMAP_DIRECTORY_BYTES) throw new UsageError(`${prefix}: Bitmap directory is too large`);
      this.list.push({ name, granularityBits: bits, flags: o.disabled ? 0 : BME_FLAG_AUTO, inconsistent: false, table: { offset: 0, size: 0 }, added: undefined, cleared: false, stored: undefined, resized: false });
      // a new enabled bitmap in a session that tracks writes is in use at once
    });
  }

  remove(name: string): Promise<void> {
    return this.op('bitmap remove', async () => {
      const e = this.find(name);
      this.list.splice(this.list.indexOf(e), 1);
      this.removed.push(e);
    });
  }

  clear(name: string): Promise<void> {
    return this.op('bitmap clear', async () => {
      const e = this.usable(name);
      e.added = undefined;
      e.stored = undefined;
      e.cleared = true;
    });
  }

  enable(name: string): Promise<void> {
    return this.setFlag(name, 'bitmap enable', true);
  }

  disable(name: string): Promise<void> {
    return this.setFlag(name, 'bitmap disable', false);
  }

  /** `dst` |= `src`: a bitmap of this image by name, or the bits of another image's (any granularity, the same disk size). */
  merge(dst: string, src: string | DirtyBitmap): Promise<void> {
    return this.op('bitmap merge', async () => {
      const d = this.usable(dst);
      const s = typeof src === 'string' ? await this.content(src) : src;
      if (s.size !== this.ctx.header().size) throw new UsageError(`Bitmaps are incompatible and can't be merged`);
      this.bitsOf(d).merge(s);
    });
  }

  /** Every bit of bitmap `name`: stored and set in this session (an inconsistent one is refused). */
  async content(name: string): Promise<DirtyBitmap> {
    const e = this.usable(name);
    const out = new DirtyBitmap(this.ctx.header().size, e.granularityBits, this.ctx.geometry.clusterSize);
    if (!e.cleared) out.merge(await this.storedOf(e));
    if (e.added) out.merge(e.added);
    return out;
  }

  private setFlag(name: string, op: string, on: boolean): Promise<void> {
    return this.op(op, async () => {
      const e = this.usable(name);
      // bits set while it was tracked stay; from now on writes do (or do not) set more
      e.flags = on ? e.flags | BME_FLAG_AUTO : e.flags & ~BME_FLAG_AUTO;
    });
  }

  private find(name: string): Entry {
    const e = this.list.find((x) => x.name === name);
    if (!e) throw new UsageError(`Dirty bitmap '${name}' not found`, { notFound: true });
    return e;
  }

  /** QEMU's bdrv_dirty_bitmap_check: an inconsistent bitmap is refused for anything but removal. */
  private usable(name: string): Entry {
    const e = this.find(name);
    if (e.inconsistent) throw new UsageError(inconsistentMessage(name), { inconsistent: true });
    return e;
  }

  /** One bitmap command: queued, checked, committed and written back; the extension dropped after the last bitmap. */
  private op(name: string, fn: () => Promise<void>): Promise<void> {
    return this.runner!.exclusive(async () => {
      this.ctx.checkWritable();
      await this.guarded(() =>
        this.runner!.transact(name, async () => {
          await fn();
          this.changed = true;
          await this.commit();
        }),
      );
      await this.dropEmptyExtension();
    });
  }

  /**
   * Run a transaction of this room; if it fails and its records were undone
   * (or it failed before its directory's records), what the room keeps in
   * memory goes back as it was: a refusal, or a device error midway, leaves
   * the bitmaps as they were.
   */
  private async guarded(fn: () => Promise<void>): Promise<void> {
    const saved = this.list.map((e) => ({ ...e }));
    const removed = [...this.removed];
    const [tracking, changed] = [this.tracking, this.changed];
    this.published = false;
    this.ctx.undone = false;
    try {
      await fn();
    } catch (e) {
      if (this.ctx.undone || !this.published) {
        this.list = saved;
        this.removed = removed;
        this.tracking = tracking;
        this.changed = changed;
      }
      throw e;
    }
  }

  // ---- the transaction ----------------------------------------------------

  /**
   * Write what changed: new tables for the bitmaps whose stored bits change
   * (not those in use after this commit: their table is not read), a new
   * directory, the extension's fields and autoclear bit as header records,
   * the old clusters freed. Runs inside a transaction.
   */
  private async commit(): Promise<void> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    const h = ctx.header();
    await this.ensureExtension();
    for (const e of this.list) {
      if (e.inconsistent) continue;
      const inUse = this.tracking && (e.flags & BME_FLAG_AUTO) !== 0;
      const flags = inUse ? e.flags | BME_FLAG_IN_USE : e.flags & ~BME_FLAG_IN_USE;
      if (flags !== e.flags) this.changed = true;
      e.flags = flags;
      // (a bitmap in use keeps its table: nothing reads it; a new one gets one all the same, as QEMU wants a table)
      const rewrite = e.table.offset === 0 || (!inUse && (e.cleared || e.resized || (e.added !== undefined && e.added.count() > 0)));
      if (!rewrite) continue;
      const bits = new DirtyBitmap(h.size, e.granularityBits, cs);
      if (!e.cleared) bits.merge(await this.storedOf(e));
      if (e.added) bits.merge(e.added);
      await this.freeTable(e.table);
      e.table = await this.writeTable(bits);
      e.stored = bits;
      e.added = undefined;
      e.cleared = false;
      e.resized = false;
      this.changed = true;
    }
    for (const e of this.removed) await this.freeTable(e.table);
    this.removed = [];
    if (!this.changed) return;
    this.changed = false;
    let offset = 0;
    let size = 0;
    if (this.list.length) {
      const dir = encodeBitmapDirectory(this.list.map((e): BitmapDirectoryEntry => ({ tableOffset: e.table.offset, tableSize: e.table.size, flags: e.flags, type: 1, granularityBits: e.granularityBits, name: e.name })));
      size = dir.length;
      offset = (await this.alloc.allocate(Math.ceil(size / cs))) * cs;
      await this.writeFresh(offset, dir, OL_BITMAP_DIRECTORY, 'bitmap directory');
    }
    if (h.bitmapDirectoryOffset) for (let k = 0; k < Math.ceil(h.bitmapDirectorySize / cs); k++) await this.alloc.changeRefcount(cluster(h.bitmapDirectoryOffset / cs + k), -1);
    const field = (f: 'nb_bitmaps' | 'bitmap_directory_size' | 'bitmap_directory_offset', old: number, next: number) => {
      if (old !== next) ctx.emit({ kind: 'header', field: f, old: BigInt(old), new: BigInt(next) });
    };
    this.published = true;
    field('nb_bitmaps', h.nbBitmaps, this.list.length);
    field('bitmap_directory_size', h.bitmapDirectorySize, size);
    field('bitmap_directory_offset', h.bitmapDirectoryOffset, offset);
    const had = h.autoclearFeatures;
    const want = this.list.length ? had | AUTOCLEAR_BITMAPS : had & ~AUTOCLEAR_BITMAPS;
    if (want !== had) ctx.emit({ kind: 'header', field: 'autoclear_features', old: had, new: want });
  }

  /** The stored bits of `e`, read once (its table checked as QEMU's bitmap_table_load checks it). */
  private async storedOf(e: Entry): Promise<DirtyBitmap> {
    return (e.stored ??= await loadBitmap(this.ctx.files.image, e.table, this.ctx.header().size, e.granularityBits, this.ctx.geometry.clusterSize));
  }

  /** One data cluster per chunk with a bit set, then the table: fresh clusters, written before the transaction is durable. */
  private async writeTable(bits: DirtyBitmap): Promise<{ offset: number; size: number }> {
    const cs = this.ctx.geometry.clusterSize;
    const n = bitmapTableSize(bits.size, bits.granularityBits, cs);
    const offsets = new Float64Array(n);
    for (const i of bits.dirtyChunks()) {
      if (i >= n) continue;
      offsets[i] = (await this.alloc.allocate(1, 'data')) * cs;
      await this.writeFresh(offsets[i]!, bits.chunk(i)!, 0, 'bitmap data');
    }
    const table = encodeBitmapTable(offsets);
    const padded = new Uint8Array(Math.ceil(Math.max(table.length, 1) / 512) * 512);
    padded.set(table);
    const offset = (await this.alloc.allocate(Math.ceil(padded.length / cs))) * cs;
    await this.writeFresh(offset, padded, OL_BITMAP_TABLE, 'bitmap table');
    return { offset, size: n };
  }

  /** The table at `t` and every data cluster it names: one reference less each. */
  private async freeTable(t: { offset: number; size: number }): Promise<void> {
    if (!t.offset) return;
    const cs = this.ctx.geometry.clusterSize;
    const table = decodeBitmapTable(await readAt(this.ctx.files.image, t.offset, t.size * 8), t.size, cs, t.offset);
    for (const x of table) if (x.kind === 'data') await this.alloc.changeRefcount(cluster(x.offset / cs), -1);
    for (let k = 0; k < Math.ceil((t.size * 8) / cs); k++) await this.alloc.changeRefcount(cluster(t.offset / cs + k), -1);
  }

  private async writeFresh(offset: number, bytes: Uint8Array, kind: number, what: string): Promise<void> {
    await this.ctx.writeFresh(offset, bytes, what);
    if (kind) this.overlap.reserve(host(offset), bytes.length, kind);
  }

  // ---- the header extension -----------------------------------------------

  /** where the extension's body is, for the write-back's plan (ctx.bitmapsExt) */
  private async locate(): Promise<number | undefined> {
    const at = findExtension(await readAt(this.header, 0, this.ctx.geometry.clusterSize), EXT_BITMAPS);
    return at && at.length === 24 ? at.offset + 8 : undefined;
  }

  private get header(): BlockDevice {
    return this.ctx.headerBits.dev;
  }

  /** Find the extension at open (one left by another program, its bit clear, is reused). */
  async attachExtension(): Promise<void> {
    this.ctx.bitmapsExt = await this.locate();
  }

  /**
   * Before the first directory: the extension inserted with no bitmaps while
   * its autoclear bit is clear (QEMU ignores it so), durable before the
   * transaction that fills it and sets the bit.
   */
  private async ensureExtension(): Promise<void> {
    if (this.ctx.bitmapsExt !== undefined || this.list.length === 0) return;
    const dev = this.header;
    const finish = await insertHeaderExtension(dev, this.ctx.geometry.clusterSize, EXT_BITMAPS, encodeBitmapsExtension(0, 0, 0));
    if (!finish) throw new QledgerError('E_UNSUPPORTED', `${this.ctx.filename}: the header cluster has no room for the bitmaps extension`);
    await dev.flush();
    await finish();
    await dev.flush();
    await this.ctx.headerBits.reload();
    this.ctx.bitmapsExt = await this.locate();
  }

  /**
   * After the last bitmap went (its bit clear and durable): the extension
   * removed, as QEMU drops it, by writes that keep the list valid after
   * each (format/extension-insert.ts); where the list after it is too long
   * for that, it becomes an extension no reader knows (QEMU keeps it, and
   * warns of nothing).
   */
  private async dropEmptyExtension(): Promise<void> {
    if (this.list.length || this.ctx.bitmapsExt === undefined) return;
    const dev = this.header;
    // the journal's last checkpoint (written without a flush) durable first: the emptying
    // transaction is never replayed over an extension list in the middle of its removal
    await dev.flush();
    await removeHeaderExtension(dev, this.ctx.geometry.clusterSize, EXT_BITMAPS);
    this.ctx.bitmapsExt = undefined;
  }
}

/**
 * The bitmap directory `parsed` names, read and checked as QEMU checks it
 * at open (empty without one). `size`: the disk size its tables must cover
 * (0 skips that check: the read-write open checks the directory before the
 * journal's recovery, which may still change the size, and again after).
 */
export async function readBitmapDirectory(dev: BlockDevice, filename: string, parsed: ParsedHeader, clusterSize: number, size: number): Promise<BitmapDirectoryEntry[]> {
  const b = parsed.bitmaps;
  if (!b) return [];
  const dir = decodeBitmapDirectory(await readAt(dev, b.directoryOffset, b.directorySize), b.nbBitmaps, b.directoryOffset);
  let at = b.directoryOffset;
  const names = new Set<string>();
  for (const e of dir) {
    checkDirectoryEntry(e, clusterSize, size, at);
    if (names.has(e.name)) throw new QledgerError('E_FORMAT', `${filename}: bitmap directory at ${hex(b.directoryOffset)}: two bitmaps are named '${e.name}'`);
    names.add(e.name);
    at += directoryEntrySize(e.name);
  }
  return dir;
}
