/**
 * One dirty bitmap in memory: a bit per granule of the disk, kept in
 * chunks of one cluster of bitmap data each, as the bitmap's table stores
 * them (a chunk covers cluster_size * 8 granules). A chunk with no bit set
 * takes no memory, one with every bit set is shared: memory follows what
 * is dirty, not the size of the disk. Bit k of the bitmap is bit k % 8 of
 * byte k / 8 (QEMU serializes little-endian), covering guest bytes
 * [k * granularity, (k + 1) * granularity).
 */

export class DirtyBitmap {
  /** chunk index -> bitmap data (cluster_size bytes) */
  private readonly chunks = new Map<number, Uint8Array>();
  /** bits per chunk */
  readonly chunkBits: number;

  constructor(
    /** disk size in bytes */
    public size: number,
    readonly granularityBits: number,
    readonly clusterSize: number,
  ) {
    this.chunkBits = clusterSize * 8;
  }

  get granularity(): number {
    return 2 ** this.granularityBits;
  }

  /** number of bits (granules) */
  get bits(): number {
    return Math.ceil(this.size / this.granularity);
  }

  /** entries of the bitmap's table */
  get chunkCount(): number {
    return Math.ceil(Math.ceil(this.bits / 8) / this.clusterSize);
  }

  /** the stored bytes of chunk `i` (undefined: no bit set) */
  chunk(i: number): Uint8Array | undefined {
    return this.chunks.get(i);
  }

  /** chunks with a bit set, in order */
  dirtyChunks(): number[] {
    return [...this.chunks.keys()].sort((a, b) => a - b);
  }

  /** Set chunk `i` from stored data (a copy), or every bit of it. */
  loadChunk(i: number, data: Uint8Array | 'ones'): void {
    const c = new Uint8Array(this.clusterSize);
    if (data === 'ones') c.fill(0xff);
    else c.set(data.subarray(0, this.clusterSize));
    this.trimChunk(i, c);
    if (c.some((x) => x !== 0)) this.chunks.set(i, c);
  }

  /** The bits past the disk's end are stored as zero. */
  private trimChunk(i: number, c: Uint8Array): void {
    const from = this.bits - i * this.chunkBits;
    if (from >= this.chunkBits) return;
    for (let k = Math.max(0, from); k < this.chunkBits; k++) {
      if ((k & 7) === 0 && k + 8 <= this.chunkBits) {
        c.fill(0, k >> 3);
        return;
      }
      c[k >> 3]! &= ~(1 << (k & 7));
    }
  }

  /** Mark guest bytes [offset, offset + length) dirty: every granule they touch. */
  setRange(offset: number, length: number): void {
    if (length <= 0) return;
    const g = this.granularity;
    const first = Math.floor(offset / g);
    const last = Math.min(this.bits, Math.ceil((offset + length) / g)); // exclusive
    this.setBits(first, last);
  }

  /** Set bits [first, last). */
  setBits(first: number, last: number): void {
    let k = first;
    while (k < last) {
      const ci = Math.floor(k / this.chunkBits);
      const end = Math.min(last, (ci + 1) * this.chunkBits);
      let c = this.chunks.get(ci);
      if (!c) this.chunks.set(ci, (c = new Uint8Array(this.clusterSize)));
      let b = k - ci * this.chunkBits;
      const e = end - ci * this.chunkBits;
      while (b < e && (b & 7) !== 0) c[b >> 3]! |= 1 << (b++ & 7);
      const whole = (e - b) >> 3;
      if (whole > 0) {
        c.fill(0xff, b >> 3, (b >> 3) + whole);
        b += whole * 8;
      }
      while (b < e) c[b >> 3]! |= 1 << (b++ & 7);
      k = end;
    }
  }

  /** Whether bit `k` is set. */
  get(k: number): boolean {
    const c = this.chunks.get(Math.floor(k / this.chunkBits));
    if (!c) return false;
    const b = k % this.chunkBits;
    return (c[b >> 3]! & (1 << (b & 7))) !== 0;
  }

  clear(): void {
    this.chunks.clear();
  }

  /** Every bit of `other` (any granularity, the same disk) sets the bits of this one that cover its bytes. */
  merge(other: DirtyBitmap): void {
    if (other.granularityBits === this.granularityBits && other.clusterSize === this.clusterSize) {
      const n = this.chunkCount;
      for (const [i, c] of other.chunks) {
        if (i >= n) continue;
        const mine = this.chunks.get(i);
        if (!mine) this.chunks.set(i, c.slice());
        else for (let k = 0; k < c.length; k++) mine[k]! |= c[k]!;
        this.trimChunk(i, this.chunks.get(i)!);
      }
      return;
    }
    for (const [start, end] of other.extents()) this.setRange(start, end - start);
  }

  /** The disk's size changes: bits past the new end go, new bits are clear (QEMU's bdrv_dirty_bitmap_truncate). */
  resize(size: number): void {
    this.size = size;
    const n = this.chunkCount;
    for (const i of [...this.chunks.keys()]) {
      if (i >= n) this.chunks.delete(i);
      else this.trimChunk(i, this.chunks.get(i)!);
    }
  }

  /** Dirty extents in guest bytes, [start, end) merged, the last one clipped to the disk; with a range, those meeting [from, to) only. */
  *extents(from = 0, to = Infinity): Generator<[number, number]> {
    const g = this.granularity;
    let runStart = -1;
    let runEnd = -1;
    const firstChunk = Math.floor(from / g / this.chunkBits);
    const lastChunk = to === Infinity ? Infinity : Math.floor((to - 1) / g / this.chunkBits);
    for (const ci of this.dirtyChunks()) {
      if (ci < firstChunk || ci > lastChunk) continue;
      const c = this.chunks.get(ci)!;
      const base = ci * this.chunkBits;
      for (let byte = 0; byte < c.length; byte++) {
        const v = c[byte]!;
        if (v === 0) continue;
        for (let bit = 0; bit < 8; bit++) {
          if (!(v & (1 << bit))) continue;
          const k = base + byte * 8 + bit;
          if (k === runEnd) runEnd = k + 1;
          else {
            if (runStart >= 0) yield [runStart * g, Math.min(this.size, runEnd * g)];
            runStart = k;
            runEnd = k + 1;
          }
        }
      }
    }
    if (runStart >= 0) yield [runStart * g, Math.min(this.size, runEnd * g)];
  }

  /** Number of set bits. */
  count(): number {
    let n = 0;
    for (const c of this.chunks.values()) for (let i = 0; i < c.length; i++) n += POPCOUNT[c[i]!]!;
    return n;
  }
}

const POPCOUNT = Uint8Array.from({ length: 256 }, (_, v) => {
  let n = 0;
  for (let x = v; x; x >>= 1) n += x & 1;
  return n;
});
