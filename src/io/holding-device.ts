/**
 * A device that holds writes back: reads see them at once, the device below
 * only on release(). It exists for one test fault ('data-after-mapping',
 * engine/faults.ts), which must show that guest data reaching the disk
 * after the L2 entry that maps it is caught; nothing else uses it.
 */

import type { BlockDevice } from './device.ts';

export class HoldingDevice implements BlockDevice {
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
  /** Write everything held to the device below, in order. */
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
