/**
 * A BlockDevice in memory: for tests, fuzzing and the crash harness.
 */

import { QledgerError } from '../errors.ts';
import type { BlockDevice } from './device.ts';

/**
 * A BlockDevice in memory (tests, fuzzing, the crash harness, or any
 * storage that is not a file): images are created and opened on it as on
 * a path.
 *
 * @example
 * import { Image, MemoryDevice } from 'qledger';
 *
 * const dev = new MemoryDevice('scratch.qcow2');
 * await Image.create(dev, { size: 4 << 20, clusterSize: 4096 });
 * const img = await Image.open(dev, { write: true });
 * await img.write(8192, new TextEncoder().encode('hello'));
 * console.log(new TextDecoder().decode(await img.read(8192, 5))); // hello
 * console.log(img.geometry?.clusterSize); // 4096
 * await img.close();
 */
export class MemoryDevice implements BlockDevice {
  private buf: Uint8Array;
  private length: number;
  readonly readOnly: boolean;

  constructor(
    readonly name = 'memory',
    initial?: Uint8Array,
    opts: {
      readOnly?: boolean;
      /** read-only devices: the bytes are used as they are, not copied (the caller leaves them unchanged while the device is open) */
      share?: boolean;
    } = {},
  ) {
    this.buf = initial ? (opts.share && opts.readOnly ? initial : initial.slice()) : new Uint8Array(0);
    this.length = this.buf.length;
    this.readOnly = opts.readOnly ?? false;
  }

  /** The device's bytes (a copy). */
  snapshot(): Uint8Array {
    return this.buf.slice(0, this.length);
  }

  async size(): Promise<number> {
    return this.length;
  }

  async allocatedBytes(): Promise<number | undefined> {
    return this.length;
  }

  async readInto(out: Uint8Array, offset: number): Promise<void> {
    const n = Math.max(0, Math.min(out.length, this.length - offset));
    if (n > 0) out.set(this.buf.subarray(offset, offset + n));
    out.fill(0, n);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.assertWritable();
    this.ensure(offset + data.length);
    this.buf.set(data, offset);
  }

  async flush(): Promise<void> {}

  async truncate(size: number): Promise<void> {
    this.assertWritable();
    if (size < this.length) this.buf.fill(0, size, this.length);
    this.ensure(size);
    this.length = size;
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.assertWritable();
    this.ensure(offset + length);
    this.buf.fill(0, offset, offset + length);
  }

  async discard(): Promise<void> {}

  async close(): Promise<void> {}

  private ensure(end: number): void {
    if (end > this.buf.length) {
      const next = new Uint8Array(Math.max(end, this.buf.length * 2, 4096));
      next.set(this.buf.subarray(0, this.length));
      this.buf = next;
    }
    if (end > this.length) this.length = end;
  }

  private assertWritable(): void {
    if (this.readOnly) throw new QledgerError('E_READ_ONLY', `${this.name}: opened read-only`);
  }
}
