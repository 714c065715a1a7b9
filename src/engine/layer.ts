/**
 * A layer is one node of a backing chain: a qcow2 image or a raw file. The
 * read path and `map` walk layers top-down; each layer answers only for
 * itself and says "unallocated" where the layer below shows through.
 */

import type { SubclusterType } from '../format/l2.ts';

/** Guest (virtual disk) offsets and host (file) offsets are different spaces (format/offsets.ts). */
import type { GuestOffset, HostOffset } from '../format/offsets.ts';
export { guest, host, type GuestOffset, type HostOffset } from '../format/offsets.ts';

export interface LayerStatus {
  /** bytes from the queried offset that share this status (at least 1) */
  readonly length: number;
  readonly type: SubclusterType | 'raw-data';
  /** where the bytes live, for normal / zero-alloc / unallocated-alloc / raw-data */
  readonly hostOffset: HostOffset | undefined;
}

/** The layer itself supplies these bytes (data, or zeros it records), rather than passing to its backing file. */
export function allocatedHere(st: LayerStatus): boolean {
  return st.type === 'normal' || st.type === 'compressed' || st.type === 'raw-data' || st.type === 'zero-plain' || st.type === 'zero-alloc';
}

export interface Layer {
  readonly filename: string;
  readonly format: 'qcow2' | 'raw';
  /** virtual size in bytes */
  readonly size: number;
  readonly backing: Layer | undefined;
  status(offset: GuestOffset, bytes: number): Promise<LayerStatus>;
  /** Read bytes this layer itself holds for a status of type normal/compressed/raw-data. */
  readOwn(status: LayerStatus, offset: GuestOffset, out: Uint8Array): Promise<void>;
  /**
   * For `map`: whether the host bytes of a data extent are a hole in the file
   * (QEMU asks the file system; see file-probe.ts). Returns the length of the
   * run from `hostOffset` with the same answer.
   */
  hostZeroRun?(hostOffset: HostOffset, bytes: number): Promise<{ zero: boolean; length: number }>;
  close(): Promise<void>;
}
