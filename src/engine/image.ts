/**
 * The read-only image handle the library exposes: a chain of layers opened
 * from a path, with guest reads, map and info.
 */

import { readGuest } from './read.ts';
import { openLayer, type OpenOptions } from './open.ts';
import { mapExtents, chainStatus, type MapEntry } from './map.ts';
import { imageInfo, type ImageInfo } from './info.ts';
import { Qcow2Layer } from './qcow2-layer.ts';
import { guest, type Layer } from './layer.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';

export class Image {
  private constructor(readonly top: Layer) {}

  /** Open `path` read-only with its backing chain. */
  static async open(path: string, opts: OpenOptions = {}): Promise<Image> {
    return new Image(await openLayer(path, opts));
  }

  /** virtual disk size in bytes */
  get size(): number {
    return this.top.size;
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
    return this.top instanceof Qcow2Layer ? this.top.snapshots : [];
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    await readGuest(this.top, guest(offset), out);
    return out;
  }

  async readInto(out: Uint8Array, offset: number): Promise<void> {
    await readGuest(this.top, guest(offset), out);
  }

  /** Extents as `qemu-img map` reports them. */
  map(start = 0, length = this.size): AsyncGenerator<MapEntry> {
    return mapExtents(this.top, start, length);
  }

  /** Status of the run at `offset`, resolved through the backing chain. */
  status(offset: number, length: number): Promise<MapEntry> {
    return chainStatus(this.top, offset, length);
  }

  info(layer: Layer = this.top): Promise<ImageInfo> {
    return imageInfo(layer);
  }

  close(): Promise<void> {
    return this.top.close();
  }
}
