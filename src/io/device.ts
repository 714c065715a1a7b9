/**
 * The block-device interface every layer above reads and writes through.
 * Offsets are byte offsets in the device (host offsets for an image file).
 */

import { uninitialized } from '../format/bytes.ts';

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
  /** Bytes the device can still take (a file system's free space); optional, undefined when unknown. */
  available?(): Promise<number | undefined>;
  /**
   * Copy `length` bytes of `src` from `srcOffset` to `offset` without
   * bringing them into memory (copy_file_range between two files); returns
   * how many bytes it copied from the start, 0 when it cannot, and the
   * caller copies the rest (`copyRange`). Optional.
   */
  copyFrom?(src: BlockDevice, srcOffset: number, offset: number, length: number): Promise<number>;
  close(): Promise<void>;
}

/**
 * A device over another one, every request passed down unchanged: wrappers
 * (the overlap guard, the test devices that record, hold back or fail
 * requests) extend it and override only the requests they act on. The
 * optional requests answer as a device without them would (`allocate`
 * false, `available` undefined) when the one below has none.
 */
export class DeviceWrapper implements BlockDevice {
  constructor(readonly inner: BlockDevice) {}

  get name(): string {
    return this.inner.name;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  size(): Promise<number> {
    return this.inner.size();
  }
  allocatedBytes(): Promise<number | undefined> {
    return this.inner.allocatedBytes();
  }
  readInto(buf: Uint8Array, offset: number): Promise<void> {
    return this.inner.readInto(buf, offset);
  }
  write(offset: number, data: Uint8Array): Promise<void> {
    return this.inner.write(offset, data);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  truncate(size: number): Promise<void> {
    return this.inner.truncate(size);
  }
  writeZeroes(offset: number, length: number, unmap: boolean): Promise<void> {
    return this.inner.writeZeroes(offset, length, unmap);
  }
  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }
  allocate(offset: number, length: number): Promise<boolean> {
    return this.inner.allocate ? this.inner.allocate(offset, length) : Promise.resolve(false);
  }
  available(): Promise<number | undefined> {
    return this.inner.available ? this.inner.available() : Promise.resolve(undefined);
  }
  /** Never passed down: a wrapper that records, holds or fails writes would not see the copy's. */
  copyFrom(_src: BlockDevice, _srcOffset: number, _offset: number, _length: number): Promise<number> {
    return Promise.resolve(0);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

export async function readAt(dev: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const b = new Uint8Array(length);
  await dev.readInto(b, offset);
  return b;
}

/**
 * Copy `length` bytes from `src` at `srcOffset` to `dst` at `offset`: in the
 * kernel as far as `dst.copyFrom` goes, the rest through one buffer of up to
 * 4 MiB (reads of `src` past its end give zeros, as every read does).
 */
export async function copyRange(dst: BlockDevice, src: BlockDevice, srcOffset: number, offset: number, length: number): Promise<void> {
  let done = dst.copyFrom ? await dst.copyFrom(src, srcOffset, offset, length) : 0;
  if (done >= length) return;
  const buf = uninitialized(Math.min(length - done, COPY_CHUNK));
  while (done < length) {
    const b = buf.subarray(0, Math.min(buf.length, length - done));
    await src.readInto(b, srcOffset + done);
    await dst.write(offset + done, b);
    done += b.length;
  }
}

const COPY_CHUNK = 4 << 20;

/** Zero buffer shared by writeZeroes fallbacks; never written to. */
export const ZERO_CHUNK = new Uint8Array(1 << 20);

/**
 * Read the clusters at `offsets` (cluster-sized each), merging runs of
 * adjacent clusters into one read of up to 8 MiB: a million-cluster image
 * has thousands of tables, mostly laid out back to back.
 */
export async function readClusters(dev: BlockDevice, offsets: Iterable<number>, cs: number): Promise<Map<number, Uint8Array>> {
  const sorted = [...new Set(offsets)].sort((x, y) => x - y);
  const out = new Map<number, Uint8Array>();
  const maxRun = Math.max(1, Math.floor((8 << 20) / cs));
  const runs: Array<[number, number]> = [];
  for (let i = 0; i < sorted.length; ) {
    let j = i + 1;
    while (j < sorted.length && j - i < maxRun && sorted[j] === sorted[j - 1]! + cs) j++;
    runs.push([i, j]);
    i = j;
  }
  // several reads in flight: scattered tables cost a thread-pool round trip each
  let next = 0;
  const worker = async () => {
    while (next < runs.length) {
      const [i, j] = runs[next++]!;
      const buf = await readAt(dev, sorted[i]!, (j - i) * cs);
      for (let k = i; k < j; k++) out.set(sorted[k]!, buf.subarray((k - i) * cs, (k - i + 1) * cs));
    }
  };
  await Promise.all(Array.from({ length: Math.min(16, runs.length) }, worker));
  return out;
}
