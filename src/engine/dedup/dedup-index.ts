/**
 * The dedup index: from a cluster fingerprint to the guest clusters whose
 * data had it, in at most 8 bytes of memory per indexed cluster.
 *
 * Layout. The bulk is a sorted table of 6-byte entries: a 16-bit tag in
 * one typed array, a 32-bit guest cluster number in another. The table is
 * cut into 2^d buckets by the fingerprint's top d bits (a directory of
 * 2^d + 1 start positions, d between 10 and 24 chosen from the expected
 * size so that the directory costs about half a byte per entry); within
 * a bucket, entries are sorted by tag, the fingerprint's next 16 bits. So
 * an entry stands for d + 16 bits of fingerprint while storing 16 of them.
 * New entries go to a small delta (full fingerprints, an open-addressed
 * slot array over them) that is merged into the table when full; the
 * delta's capacity is a 32nd of the table's, so merging costs a constant
 * number of moves per insert. Removed entries become tombstones until the
 * next merge.
 *
 * An index answer is only a candidate: the caller reads the cluster and
 * compares bytes before sharing anything (write/dedup.ts). That is what
 * makes a short fingerprint safe: a false match costs one read. With
 * d about log2(entries) - 3, a lookup meets a false match about once in
 * eight thousand lookups at any size up to 2^27 entries.
 */

/** Not a guest cluster: a removed entry. */
const TOMB = 0xffff_ffff;
const MIN_DELTA = 4096;

export class DedupIndex {
  /** directory bits */
  private readonly d: number;
  private dir: Uint32Array;
  private tags: Uint16Array;
  private vals: Uint32Array;
  /** live entries in the table (tombstones excluded) */
  private live = 0;

  private dHi: Uint32Array;
  private dLo: Uint32Array;
  private dVal: Uint32Array;
  private dCount = 0;
  private slots: Int32Array;
  /** directory bits from `expected` */
  static bitsFor(expected: number): number {
    return Math.min(24, Math.max(10, Math.ceil(Math.log2(Math.max(2, expected))) - 3));
  }

  /** `expected`: about how many entries the index will hold (sizes the directory). */
  constructor(expected = 0) {
    this.d = DedupIndex.bitsFor(expected);
    this.dir = new Uint32Array((1 << this.d) + 1);
    this.tags = new Uint16Array(0);
    this.vals = new Uint32Array(0);
    const cap = MIN_DELTA;
    this.dHi = new Uint32Array(cap);
    this.dLo = new Uint32Array(cap);
    this.dVal = new Uint32Array(cap);
    this.slots = new Int32Array(cap * 2);
  }

  /** The table as arrays, the delta merged in first (for the persisted copy). */
  arrays(): { d: number; dir: Uint32Array; tags: Uint16Array; vals: Uint32Array } {
    this.merge();
    return { d: this.d, dir: this.dir, tags: this.tags, vals: this.vals };
  }

  /** An index holding a persisted table (checked by its decoder: a non-decreasing directory ending at n). */
  static fromArrays(a: { d: number; dir: Uint32Array; tags: Uint16Array; vals: Uint32Array }): DedupIndex {
    const idx = new DedupIndex(2 ** (a.d + 3));
    if (idx.d !== a.d || a.dir.length !== (1 << a.d) + 1) throw new Error('dedup index: directory size does not match its bits');
    idx.dir = a.dir;
    idx.tags = a.tags;
    idx.vals = a.vals;
    let live = 0;
    for (let i = 0; i < a.vals.length; i++) if (a.vals[i] !== TOMB) live++;
    idx.live = live;
    let cap = MIN_DELTA;
    while (cap * 32 < live) cap *= 2;
    idx.dHi = new Uint32Array(cap);
    idx.dLo = new Uint32Array(cap);
    idx.dVal = new Uint32Array(cap);
    idx.slots = new Int32Array(cap * 2);
    return idx;
  }

  /** Entries held (tombstones in the delta included until the next merge). */
  get size(): number {
    return this.live + this.dCount;
  }

  /** Bytes of memory the index's arrays hold. */
  get bytes(): number {
    return this.dir.byteLength + this.tags.byteLength + this.vals.byteLength + this.dHi.byteLength * 3 + this.slots.byteLength;
  }

  private bucket(hi: number): number {
    return hi >>> (32 - this.d);
  }

  /** The 16 fingerprint bits after the directory's d. */
  private tag(hi: number, lo: number): number {
    const s = 32 - this.d; // hi bits left below the prefix (8..22)
    return s >= 16 ? (hi >>> (s - 16)) & 0xffff : ((hi << (16 - s)) | (lo >>> (16 + s))) & 0xffff;
  }

  /** Index guest cluster `gc` under fingerprint (hi, lo). Guest clusters past 2^32 - 2 are not indexed. */
  add(hi: number, lo: number, gc: number): void {
    if (gc >= TOMB || gc < 0) return;
    if (this.dCount === this.dHi.length) this.merge();
    const i = this.dCount++;
    this.dHi[i] = hi;
    this.dLo[i] = lo;
    this.dVal[i] = gc;
    const mask = this.slots.length - 1;
    let s = (hi ^ Math.imul(lo, 0x9e3779b1)) & mask;
    while (this.slots[s] !== 0) s = (s + 1) & mask;
    this.slots[s] = i + 1;
  }

  /**
   * The guest clusters indexed under (hi, lo), newest first, at most `max`
   * (a crafted flood of equal fingerprints cannot make a lookup unbounded).
   */
  candidates(hi: number, lo: number, max = 8): number[] {
    const out: number[] = [];
    const mask = this.slots.length - 1;
    for (let s = (hi ^ Math.imul(lo, 0x9e3779b1)) & mask; this.slots[s] !== 0 && out.length < max; s = (s + 1) & mask) {
      const i = this.slots[s]! - 1;
      if (this.dHi[i] === hi && this.dLo[i] === lo && this.dVal[i] !== TOMB) out.push(this.dVal[i]!);
    }
    const b = this.bucket(hi);
    const t = this.tag(hi, lo);
    for (let k = this.lowerBound(b, t); k < this.dir[b + 1]! && this.tags[k] === t && out.length < max; k++) {
      if (this.vals[k] !== TOMB) out.push(this.vals[k]!);
    }
    return out;
  }

  /** Whether two fingerprints are filed under the same key (the table keeps d + 16 bits of them). */
  sameKey(a: { hi: number; lo: number }, b: { hi: number; lo: number }): boolean {
    return this.bucket(a.hi) === this.bucket(b.hi) && this.tag(a.hi, a.lo) === this.tag(b.hi, b.lo);
  }

  /** Forget that guest cluster `gc` has fingerprint (hi, lo) (its data changed, or it was found stale). */
  remove(hi: number, lo: number, gc: number): void {
    const mask = this.slots.length - 1;
    for (let s = (hi ^ Math.imul(lo, 0x9e3779b1)) & mask; this.slots[s] !== 0; s = (s + 1) & mask) {
      const i = this.slots[s]! - 1;
      if (this.dHi[i] === hi && this.dLo[i] === lo && this.dVal[i] === gc) this.dVal[i] = TOMB;
    }
    const b = this.bucket(hi);
    const t = this.tag(hi, lo);
    for (let k = this.lowerBound(b, t); k < this.dir[b + 1]! && this.tags[k] === t; k++) {
      if (this.vals[k] === gc) {
        this.vals[k] = TOMB;
        this.live--;
      }
    }
  }

  private lowerBound(b: number, t: number): number {
    let lo = this.dir[b]!;
    let hi = this.dir[b + 1]!;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.tags[mid]! < t) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Move the delta into the table (sorted merge, tombstones dropped), and size the next delta. */
  merge(): void {
    const n = this.dCount;
    const order: number[] = [];
    const keys = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      if (this.dVal[i] === TOMB) continue;
      keys[i] = this.bucket(this.dHi[i]!) * 65536 + this.tag(this.dHi[i]!, this.dLo[i]!);
      order.push(i);
    }
    order.sort((x, y) => keys[x]! - keys[y]!);
    const total = this.live + order.length;
    const tags = new Uint16Array(total);
    const vals = new Uint32Array(total);
    const dir = this.dir;
    const oldDir = dir.slice();
    let out = 0;
    let k = 0; // into order
    const buckets = dir.length - 1;
    for (let b = 0; b < buckets; b++) {
      dir[b] = out;
      let m = oldDir[b]!;
      const mEnd = oldDir[b + 1]!;
      for (;;) {
        while (m < mEnd && this.vals[m] === TOMB) m++;
        const di = k < order.length && Math.floor(keys[order[k]!]! / 65536) === b ? order[k]! : -1;
        if (m >= mEnd && di < 0) break;
        const dTag = di < 0 ? 0x10000 : keys[di]! % 65536;
        if (m < mEnd && this.tags[m]! <= dTag) {
          tags[out] = this.tags[m]!;
          vals[out++] = this.vals[m++]!;
        } else {
          tags[out] = dTag;
          vals[out++] = this.dVal[di]!;
          k++;
        }
      }
    }
    dir[buckets] = out;
    this.tags = tags;
    this.vals = vals;
    this.live = out;
    let cap = MIN_DELTA;
    while (cap * 32 < out) cap *= 2;
    if (cap !== this.dHi.length) {
      this.dHi = new Uint32Array(cap);
      this.dLo = new Uint32Array(cap);
      this.dVal = new Uint32Array(cap);
      this.slots = new Int32Array(cap * 2);
    } else this.slots.fill(0);
    this.dCount = 0;
  }
}
