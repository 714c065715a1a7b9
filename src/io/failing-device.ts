/**
 * A device that fails on purpose (iotest 026 generalised): the Nth
 * operation of a kind (write, flush, allocation, truncation, or any of
 * them) fails with EIO, ENOSPC or EFBIG, as a file's would, in the one-line
 * IoError a file device gives (deviceError). With `sticky`, every
 * operation of that kind after it fails too (a disk that stays full).
 * Everything else goes to the memory device underneath.
 */

import { deviceError, hexDigits } from '../errors.ts';
import { DeviceWrapper } from './device.ts';
import type { MemoryDevice } from './memory-device.ts';

export type FailingOp = 'write' | 'flush' | 'allocate' | 'truncate' | 'any';
export type FailingErrno = 'EIO' | 'ENOSPC' | 'EFBIG';

export class FailingDevice extends DeviceWrapper {
  /** operations of the failing kind so far */
  count = 0;
  /** the failure happened */
  failed = false;
  constructor(
    override readonly inner: MemoryDevice,
    /** 1-based: the operation that fails (0: none) */
    readonly at: number,
    readonly kind: FailingOp = 'any',
    readonly errno: FailingErrno = 'EIO',
    readonly sticky = false,
  ) {
    super(inner);
  }

  private hit(kind: Exclude<FailingOp, 'any'>, what: string): void {
    if (this.kind !== 'any' && this.kind !== kind) return;
    this.count++;
    if (this.at === 0 || (this.count !== this.at && !(this.sticky && this.count > this.at))) return;
    this.failed = true;
    const e = Object.assign(new Error(`${this.errno}: ${what}`), { code: this.errno });
    throw deviceError(this.name, what, e);
  }

  override async write(offset: number, data: Uint8Array): Promise<void> {
    this.hit('write', `write of ${data.length} bytes at 0x${hexDigits(offset)}`);
    await this.inner.write(offset, data);
  }
  /** (the memory device underneath zeroes either way: `unmap` changes nothing there) */
  override async writeZeroes(offset: number, length: number): Promise<void> {
    this.hit('write', `write zeroes of ${length} bytes at 0x${hexDigits(offset)}`);
    await this.inner.writeZeroes(offset, length);
  }
  override async discard(offset: number, length: number): Promise<void> {
    this.hit('write', `discard of ${length} bytes at 0x${hexDigits(offset)}`);
    await this.inner.discard();
  }
  override async flush(): Promise<void> {
    this.hit('flush', 'flush');
    await this.inner.flush();
  }
  override async truncate(size: number): Promise<void> {
    this.hit('truncate', `truncate to 0x${hexDigits(size)}`);
    await this.inner.truncate(size);
  }
  override async allocate(offset: number, length: number): Promise<boolean> {
    this.hit('allocate', `allocation of ${length} bytes at 0x${hexDigits(offset)}`);
    return false;
  }
}
