/**
 * `img.bitmaps`: an image's persistent dirty bitmaps as the library shows
 * them: the list and each bitmap's dirty extents on any open, and (opened
 * with `write: true`) qemu-img bitmap's commands, each one journalled
 * transaction, durable when it resolves.
 */

import { BME_FLAG_AUTO, BME_FLAG_IN_USE } from '../format/bitmaps.ts';
import { DirtyBitmap } from './bitmaps/dirty-bitmap.ts';
import { loadBitmap } from './bitmaps/load.ts';
import type { Qcow2Layer } from './qcow2-layer.ts';
import { inconsistentMessage, type Bitmaps, type BitmapInfo } from './write/bitmaps.ts';
import { QledgerError } from '../errors.ts';


/** What the bitmap view needs from its image. */
export interface BitmapHost {
  /** the top image as a qcow2 layer (undefined: raw) */
  layer(): Qcow2Layer | undefined;
  /** the write engine's bitmaps, when the image is open for writing */
  live(): Bitmaps | undefined;
  /** the same, or a rejection when the image is read-only or closed */
  writable(): Bitmaps;
}

/**
 * The persistent dirty bitmaps of an image.
 *
 * @example
 * import { Image } from 'qledger';
 * import { mkdtempSync } from 'node:fs';
 * import { tmpdir } from 'node:os';
 * import { join } from 'node:path';
 *
 * const path = join(mkdtempSync(join(tmpdir(), 'qledger-')), 'disk.qcow2');
 * await Image.create(path, { size: 16 << 20 });
 * await using img = await Image.open(path, { write: true });
 * await img.bitmaps.add('backup-1');
 * await img.write(65536, new Uint8Array(4096).fill(1));
 * console.log(await img.bitmaps.dirty('backup-1')); // [ [ 65536, 131072 ] ]
 */
export class ImageBitmaps {
  constructor(private readonly host: BitmapHost) {}

  /** Every bitmap, in directory order (flags as on disk now). */
  async list(): Promise<BitmapInfo[]> {
    const live = this.host.live();
    if (live) return live.entries;
    const layer = this.host.layer();
    if (!layer) return [];
    return (await layer.bitmapDirectory()).map((e) => ({ name: e.name, granularity: 2 ** e.granularityBits, enabled: (e.flags & BME_FLAG_AUTO) !== 0, inUse: (e.flags & BME_FLAG_IN_USE) !== 0, inconsistent: (e.flags & BME_FLAG_IN_USE) !== 0 }));
  }

  /** The bits of bitmap `name`: what is stored, and on a writable image what this session set. */
  async bits(name: string): Promise<DirtyBitmap> {
    const live = this.host.live();
    if (live) return live.content(name);
    const layer = this.host.layer();
    const e = layer ? (await layer.bitmapDirectory()).find((x) => x.name === name) : undefined;
    if (!layer || !e) throw new QledgerError('E_USAGE', `Dirty bitmap '${name}' not found`, { notFound: true });
    if (e.flags & BME_FLAG_IN_USE) throw new QledgerError('E_USAGE', inconsistentMessage(name), { inconsistent: true });
    return loadBitmap(layer.dev, { offset: e.tableOffset, size: e.tableSize }, layer.size, e.granularityBits, layer.geometry.clusterSize);
  }

  /** The dirty extents of bitmap `name`, [start, end) in guest bytes. */
  async dirty(name: string): Promise<Array<[number, number]>> {
    return [...(await this.bits(name)).extents()];
  }

  /** Add a bitmap (qemu-img bitmap --add): granularity a power of two from 512 bytes to 2 GiB (default: the cluster size, at least 4 KiB). */
  add(name: string, o: { granularity?: number | undefined; disabled?: boolean | undefined } = {}): Promise<void> {
    return this.run((b) => b.add(name, o));
  }

  remove(name: string): Promise<void> {
    return this.run((b) => b.remove(name));
  }

  clear(name: string): Promise<void> {
    return this.run((b) => b.clear(name));
  }

  enable(name: string): Promise<void> {
    return this.run((b) => b.enable(name));
  }

  disable(name: string): Promise<void> {
    return this.run((b) => b.disable(name));
  }

  /** `into` gains every bit of `from`: a bitmap of this image by name, or bits read from another image's (`bits()`). */
  merge(into: string, from: string | DirtyBitmap): Promise<void> {
    return this.run((b) => b.merge(into, from));
  }

  private async run(fn: (b: Bitmaps) => Promise<void>): Promise<void> {
    await fn(this.host.writable());
  }
}
