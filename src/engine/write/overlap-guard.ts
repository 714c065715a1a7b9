/**
 * The one way the write engine reaches the image file: a device that
 * checks every write, write-zeroes, discard, allocation and shrinking
 * truncate against the overlap index before it reaches the device below
 * (QEMU's qcow2_pre_write_overlap_check, done at the device instead of at
 * each call site, so no path can forget it). A plain write is guest data
 * and may touch no metadata; a metadata write says which kinds it is
 * (`writeAs`), and a view (`as`) gives the journal and the header their
 * own allowance. A refused write never reaches the device: the refusal
 * marks the image corrupt (the context's signalCorruption) and throws.
 */

import { hex } from '../../errors.ts';
import { DeviceWrapper, copyRange, type BlockDevice } from '../../io/device.ts';
import { ANY_KIND, OverlapIndex } from './overlap.ts';

/** A write's name for a refusal: given, or built when needed (guest writes name their guest offset). */
function labelOf(label: string | (() => string)): string {
  return typeof label === 'string' ? label : label();
}

/** What a refusal does: mark the image corrupt and throw (never returns). */
export type Refuse = (message: string, data: Record<string, unknown>) => Promise<never>;

interface Shared {
  readonly index: OverlapIndex;
  refuse: Refuse;
  /** writes refused so far (benchmarks and tests read it) */
  refusals: number;
  /** writes checked so far */
  checks: number;
}

export class GuardedDevice extends DeviceWrapper {
  private constructor(
    inner: BlockDevice,
    private readonly shared: Shared,
    /** kinds this view's plain writes may touch */
    private readonly allowed: number,
    /** what this view's plain writes are, for messages */
    private readonly label: string,
    /** the view may write below this offset only (the header view: its cluster) */
    private readonly limit: number,
  ) {
    super(inner);
  }

  /** Guard `dev` with `index`; refusals go to `refuse` (settable later: the context comes after the device). */
  static over(dev: BlockDevice, index: OverlapIndex): GuardedDevice {
    const shared: Shared = {
      index,
      refuse: (m) => Promise.reject(new Error(m)),
      refusals: 0,
      checks: 0,
    };
    return new GuardedDevice(dev, shared, 0, 'data', Infinity);
  }

  set onRefusal(fn: Refuse) {
    this.shared.refuse = fn;
  }

  get refusals(): number {
    return this.shared.refusals;
  }

  get checks(): number {
    return this.shared.checks;
  }

  get index(): OverlapIndex {
    return this.shared.index;
  }

  /** Another device (the guest-data path through a test fault's device) checked against the same index, as guest data. */
  wrap(dev: BlockDevice): GuardedDevice {
    return new GuardedDevice(dev, this.shared, 0, 'data', Infinity);
  }

  /** A view whose plain writes are `label`, allowed to touch `allowed` kinds, below `limit`. */
  as(allowed: number, label: string, limit = Infinity): GuardedDevice {
    return new GuardedDevice(this.inner, this.shared, allowed, label, limit);
  }

  /** Refuse (mark corrupt, throw) if [offset, offset + length) holds a checked kind outside `allowed`. */
  async check(offset: number, length: number, allowed: number, label: string | (() => string)): Promise<void> {
    this.shared.checks++;
    if (offset + length > this.limit) {
      this.shared.refusals++;
      await this.shared.refuse(`Preventing invalid write: ${labelOf(label)} at ${hex(offset)} (${length} bytes) reaches past its structure's end at ${hex(this.limit)}`, { offset, length });
    }
    const clash = this.shared.index.clash;
    // the header view (everything allowed, in cluster 0) still writes the corrupt bit
    if (clash && allowed !== ANY_KIND) {
      this.shared.refusals++;
      await this.shared.refuse(`${clash} (refusing ${labelOf(label)} at ${hex(offset)}, ${length} bytes)`, { offset, length, what: labelOf(label) });
    }
    const hit = this.shared.index.conflict(offset, length, allowed);
    if (!hit) return;
    this.shared.refusals++;
    await this.shared.refuse(OverlapIndex.message(hit, labelOf(label), offset, length), { offset, length, what: labelOf(label), structureOffset: hit.offset, kinds: hit.kinds });
  }

  /** A write of metadata of `kinds` (or of guest data: 0), named `what` in a refusal (a function: built only then). */
  async writeAs(offset: number, data: Uint8Array, kinds: number, what: string | (() => string)): Promise<void> {
    await this.check(offset, data.length, kinds, what);
    await this.inner.write(offset, data);
  }

  /** `length` bytes of `src` from `srcOffset` written at `offset` (in the kernel where it can: copyRange), checked as writeAs checks. */
  async copyAs(src: BlockDevice, srcOffset: number, offset: number, length: number, kinds: number, what: string | (() => string)): Promise<void> {
    await this.check(offset, length, kinds, what);
    await copyRange(this.inner, src, srcOffset, offset, length);
  }

  override async write(offset: number, data: Uint8Array): Promise<void> {
    await this.check(offset, data.length, this.allowed, this.label);
    await this.inner.write(offset, data);
  }

  override async writeZeroes(offset: number, length: number, unmap: boolean): Promise<void> {
    await this.check(offset, length, this.allowed, `${this.label} (zeroes)`);
    await this.inner.writeZeroes(offset, length, unmap);
  }

  override async discard(offset: number, length: number): Promise<void> {
    await this.check(offset, length, this.allowed, `${this.label} (discard)`);
    await this.inner.discard(offset, length);
  }

  /** fallocate through the device below; false (the caller writes zeros) where it has none */
  override async allocate(offset: number, length: number): Promise<boolean> {
    if (!this.inner.allocate) return false;
    await this.check(offset, length, this.allowed, `${this.label} (allocation)`);
    return this.inner.allocate(offset, length);
  }

  /** Growing is free; shrinking must not cut off metadata. */
  override async truncate(size: number): Promise<void> {
    const old = await this.inner.size();
    if (size < old) await this.check(size, old - size, this.allowed, 'truncate');
    await this.inner.truncate(size);
  }
}
