/**
 * A device that holds writes back: reads see them at once, the device below
 * only on release(). It exists for one test fault ('data-after-mapping',
 * engine/faults.ts), which must show that guest data reaching the disk
 * after the L2 entry that maps it is caught; nothing else uses it.
 */

import { DeviceWrapper } from './device.ts';

export class HoldingDevice extends DeviceWrapper {
  private held: Array<{ offset: number; data: Uint8Array }> = [];
  override async readInto(buf: Uint8Array, offset: number): Promise<void> {
    await this.inner.readInto(buf, offset);
    for (const w of this.held) {
      const from = Math.max(offset, w.offset);
      const to = Math.min(offset + buf.length, w.offset + w.data.length);
      if (from < to) buf.set(w.data.subarray(from - w.offset, to - w.offset), from - offset);
    }
  }
  override async write(offset: number, data: Uint8Array): Promise<void> {
    this.held.push({ offset, data: data.slice() });
  }
  /** Write everything held to the device below, in order. */
  async release(onWrite: (w: { offset: number; length: number }) => void): Promise<void> {
    for (const w of this.held.splice(0)) {
      await this.inner.write(w.offset, w.data);
      onWrite({ offset: w.offset, length: w.data.length });
    }
  }
  /** the device below stays open: it is the session's own */
  override async close(): Promise<void> {}
}
