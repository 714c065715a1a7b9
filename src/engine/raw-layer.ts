/** A raw file as one layer of a backing chain: guest offset = host offset, size = file size. */

import type { BlockDevice } from '../io/device.ts';
import { host, type GuestOffset, type HostOffset, type Layer, type LayerStatus } from './layer.ts';
import { zeroRun } from '../io/holes.ts';

export class RawLayer implements Layer {
  readonly format = 'raw' as const;
  readonly backing = undefined;
  constructor(
    readonly filename: string,
    readonly dev: BlockDevice,
    readonly size: number,
  ) {}

  async status(offset: GuestOffset, bytes: number): Promise<LayerStatus> {
    return { length: Math.min(bytes, this.size - offset), type: 'raw-data', hostOffset: host(offset) };
  }

  async readOwn(st: LayerStatus, _offset: GuestOffset, out: Uint8Array): Promise<void> {
    await this.dev.readInto(out, st.hostOffset!);
  }

  hostZeroRun(hostOffset: HostOffset, bytes: number): Promise<{ zero: boolean; length: number }> {
    return zeroRun(this.dev, hostOffset, bytes);
  }

  async close(): Promise<void> {
    await this.dev.close();
  }
}
