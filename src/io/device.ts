/**
 * The block-device interface every layer above reads and writes through.
 * Offsets are byte offsets in the device (host offsets for an image file).
 */

export interface BlockDevice {
  /** A name for messages: the path for files. */
  readonly name: string;
  readonly readOnly: boolean;
  size(): Promise<number>;
  /** Bytes the device really occupies (st_blocks * 512 for files), if known. */
  allocatedBytes(): Promise<number | undefined>;
  /** Fill `buf` from `offset`; bytes past the end of the device read as zero. */
  readInto(buf: Uint8Array, offset: number): Promise<void>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  truncate(size: number): Promise<void>;
  /** Make a range read as zero; may deallocate when `unmap` is set. */
  writeZeroes(offset: number, length: number, unmap: boolean): Promise<void>;
  /** A hint that a range is no longer needed; contents afterwards are unspecified. */
  discard(offset: number, length: number): Promise<void>;
  /**
   * Reserve space for a range (reading as zero), extending the file as
   * needed: fallocate(2) where the platform has it. Optional; callers fall
   * back to writing zeros.
   */
  allocate?(offset: number, length: number): Promise<boolean>;
  close(): Promise<void>;
}

export async function readAt(dev: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const b = new Uint8Array(length);
  await dev.readInto(b, offset);
  return b;
}

/** Zero buffer shared by writeZeroes fallbacks; never written to. */
export const ZERO_CHUNK = new Uint8Array(1 << 20);
