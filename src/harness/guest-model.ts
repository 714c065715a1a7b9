/**
 * The crash harness's model of guest content: a disk of any virtual size
 * held as its non-zero 64 KiB blocks only, so that a workload that grows a
 * disk to gigabytes (to make the L1 table move) or judges a 64 MiB image
 * costs what it wrote, not the disk's size.
 */

export const BLOCK = 64 * 1024;
const ZERO = Buffer.alloc(BLOCK);

export class GuestModel {
  /** blocks by index; a block not here reads as zeros */
  private blocks = new Map<number, Buffer>();

  constructor(public length: number) {}

  /** A model of `bytes` (blocks of zeros are not kept). */
  static of(bytes: Uint8Array): GuestModel {
    const m = new GuestModel(bytes.length);
    m.set(bytes, 0);
    return m;
  }

  clone(): GuestModel {
    const m = new GuestModel(this.length);
    for (const [i, b] of this.blocks) m.blocks.set(i, Buffer.from(b));
    return m;
  }

  /** The same disk at another size: cut bytes are gone, new ones read as zeros. */
  resized(size: number): GuestModel {
    const m = this.clone();
    m.zero(Math.min(size, this.length), this.length);
    m.length = size;
    return m;
  }

  private block(i: number): Buffer {
    let b = this.blocks.get(i);
    if (!b) this.blocks.set(i, (b = Buffer.alloc(BLOCK)));
    return b;
  }

  fill(value: number, lo: number, hi: number): void {
    if (value === 0) return this.zero(lo, hi);
    for (let x = lo; x < hi; ) {
      const i = Math.floor(x / BLOCK);
      const end = Math.min(hi, (i + 1) * BLOCK);
      this.block(i).fill(value, x - i * BLOCK, end - i * BLOCK);
      x = end;
    }
  }

  zero(lo: number, hi: number): void {
    for (let x = lo; x < hi; ) {
      const i = Math.floor(x / BLOCK);
      const end = Math.min(hi, (i + 1) * BLOCK);
      const b = this.blocks.get(i);
      if (b) {
        if (x === i * BLOCK && end === (i + 1) * BLOCK) this.blocks.delete(i);
        else b.fill(0, x - i * BLOCK, end - i * BLOCK);
      }
      x = end;
    }
  }

  /** Bytes at `at` (blocks that stay all zero are not allocated). */
  set(bytes: Uint8Array, at: number): void {
    for (let k = 0; k < bytes.length; ) {
      const x = at + k;
      const i = Math.floor(x / BLOCK);
      const n = Math.min(bytes.length - k, (i + 1) * BLOCK - x);
      const part = bytes.subarray(k, k + n);
      if (this.blocks.has(i) || !isAllZero(part)) this.block(i).set(part, x - i * BLOCK);
      k += n;
    }
  }

  /** Another model's bytes [lo, hi) copied into this one at the same place. */
  copyFrom(other: GuestModel, lo: number, hi: number): void {
    this.zero(lo, hi);
    for (const [i, b] of other.blocks) {
      const a = Math.max(lo, i * BLOCK);
      const z = Math.min(hi, (i + 1) * BLOCK);
      if (a < z) this.set(b.subarray(a - i * BLOCK, z - i * BLOCK), a);
    }
  }

  /** Bytes [lo, hi) as one buffer (for small ranges). */
  bytes(lo = 0, hi = this.length): Uint8Array {
    const out = new Uint8Array(Math.max(0, hi - lo));
    for (let x = lo; x < hi; ) {
      const i = Math.floor(x / BLOCK);
      const end = Math.min(hi, (i + 1) * BLOCK);
      const b = this.blocks.get(i);
      if (b) out.set(b.subarray(x - i * BLOCK, end - i * BLOCK), x - lo);
      x = end;
    }
    return out;
  }

  /** Whether block i is all zero (not kept, or kept and cleared since). */
  blockIsZero(i: number): boolean {
    const b = this.blocks.get(i);
    return !b || ZERO.equals(b);
  }

  /** Whether guest bytes [x, end), within one block, equal got[g, g + end - x). */
  equals(got: Buffer, g: number, x: number, end: number): boolean {
    if (end > this.length) return false;
    const i = Math.floor(x / BLOCK);
    const b = this.blocks.get(i) ?? ZERO;
    return got.compare(b, x - i * BLOCK, end - i * BLOCK, g, g + end - x) === 0;
  }
}

/** Whether a piece of at most one block is all zero. */
function isAllZero(a: Uint8Array): boolean {
  return ZERO.compare(a, 0, a.length, 0, a.length) === 0;
}
