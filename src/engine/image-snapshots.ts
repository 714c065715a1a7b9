/**
 * `img.snapshots`: an image's internal snapshots as the library shows them,
 * a list and the three operations of qemu-img snapshot (-c, -a, -d), which
 * need an image opened with `write: true`.
 */

import type { SnapshotEntry } from '../format/snapshot.ts';
import { findSnapshotIndex, type SnapshotFields } from './write/snapshots.ts';

/** What the snapshot view needs from its image. */
export interface SnapshotHost {
  /** the snapshot table as the open image has it */
  entries(): readonly SnapshotEntry[];
  /** the write engine, or a rejection when the image is read-only or closed */
  writer(): {
    createSnapshot(name: string, f?: SnapshotFields): Promise<SnapshotEntry>;
    applySnapshot(key: string): Promise<SnapshotEntry>;
    deleteSnapshot(key: string, byName?: boolean): Promise<SnapshotEntry>;
  };
}

/**
 * The internal snapshots of an image: iterable, with `length`, `list()` and
 * `find()`, and (opened with `write: true`) `create`, `apply` and `delete`,
 * each one journalled transaction, durable when it resolves.
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
 * await img.write(0, new Uint8Array(4096).fill(1));
 * const s = await img.snapshots.create('before-upgrade');
 * console.log(s.id, s.name, img.snapshots.length); // 1 before-upgrade 1
 * await img.write(0, new Uint8Array(4096).fill(2));
 * await img.snapshots.apply('before-upgrade');
 * console.log((await img.read(0, 1))[0]); // 1
 * await img.snapshots.delete('before-upgrade');
 * console.log(img.snapshots.length); // 0
 */
export class ImageSnapshots implements Iterable<SnapshotEntry> {
  constructor(private readonly host: SnapshotHost) {}

  /** Every snapshot, in table order. */
  list(): readonly SnapshotEntry[] {
    return this.host.entries();
  }

  get length(): number {
    return this.host.entries().length;
  }

  [Symbol.iterator](): Iterator<SnapshotEntry> {
    return this.host.entries()[Symbol.iterator]();
  }

  /** The snapshot with id `key`, else the first named `key` (QEMU's lookup order). */
  find(key: string): SnapshotEntry | undefined {
    const list = this.host.entries();
    return list[findSnapshotIndex(list, key)];
  }

  /** Create a snapshot of the current state named `name` (names may repeat, as in QEMU; ids are new). */
  async create(name: string, fields: SnapshotFields = {}): Promise<SnapshotEntry> {
    return this.host.writer().createSnapshot(name, fields);
  }

  /** Revert the disk to snapshot `key` (id first, then name); its virtual size comes back too. */
  async apply(key: string): Promise<SnapshotEntry> {
    return this.host.writer().applySnapshot(key);
  }

  /**
   * Delete snapshot `key` (id first, then name; `byName`: the first with
   * that name only, as qemu-img snapshot -d looks it up); clusters only it
   * held are freed.
   */
  async delete(key: string, o: { byName?: boolean } = {}): Promise<SnapshotEntry> {
    return this.host.writer().deleteSnapshot(key, o.byName ?? false);
  }
}
