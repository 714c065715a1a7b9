/**
 * A copy-on-write BlockDevice in memory: a shared base image that is never
 * changed, and the 4 KiB pages written since, each owned by one device.
 * The crash harness builds every crash state this way (the durable image of
 * its epoch plus the pending writes it keeps), so that a state costs what
 * its writes changed, not a copy of the whole image; a clone for a
 * read-write recovery shares the pages until it writes them.
 */

import { QledgerError } from '../errors.ts';
import type { BlockDevice } from './device.ts';

const PAGE = 4096;
/** a shared page's hash in `digest` (its bytes no longer change) */
const pageHashes = new WeakMap<Uint8Array, { h: [number, number]; cut: number }>();
const ZERO_PAGE = new Uint8Array(PAGE);

/**
 * Pages come from 1 MiB slabs: a typed array with a backing store of its
 * own per 4 KiB page costs several microseconds to make and to collect.
 * A slab lives while any page of it does.
 */
let slab = new Uint8Array(0);
let slabUsed = 0;
function newPage(): Uint8Array {
  if (slabUsed === slab.length) {
    slab = new Uint8Array(256 * PAGE);
    slabUsed = 0;
  }
  slabUsed += PAGE;
  return slab.subarray(slabUsed - PAGE, slabUsed);
}

function xor2(a: number, b: number, h: readonly [number, number]): [number, number] {
  return [a ^ h[0], b ^ h[1]];
}

/**
 * Two 32-bit lanes of a multiply-xorshift hash of a page and its index: not
 * cryptographic (the states are the harness's own), and some times cheaper
 * than a digest object per 4 KiB page.
 */
function pageHash(index: number, p: Uint8Array): [number, number] {
  return hashWords(Math.imul(index ^ 0x9e3779b9, 0x85ebca6b), Math.imul(index ^ 0x7f4a7c15, 0xc2b2ae35), p);
}

/** The lanes (a, b) carried over bytes `p` (whose offset is a multiple of 4): the word loop, then the tail bytes. */
function hashWords(a: number, b: number, p: Uint8Array): [number, number] {
  const n = p.length >>> 2;
  const w = new Int32Array(p.buffer, p.byteOffset, n);
  for (let k = 0; k < n; k++) {
    const v = w[k]!;
    a = Math.imul(a ^ v, 0x01000193);
    b = Math.imul((b ^ v) + k, 0x5bd1e995);
    b ^= b >>> 15;
  }
  for (let k = n * 4; k < p.length; k++) {
    a = Math.imul(a ^ p[k]!, 0x01000193);
    b = Math.imul((b ^ p[k]!) + k, 0x5bd1e995);
  }
  a ^= a >>> 16;
  a = Math.imul(a, 0x85ebca6b);
  a ^= a >>> 13;
  return [a, b];
}

/** A 64-bit hash (as text) of the device's bytes in the given ranges, in order. */
export function hashRanges(dev: PagedDevice, ranges: ReadonlyArray<readonly [number, number]>): string {
  let a = 0x2545f491;
  let b = 0x6c8e9cf5;
  let buf = new Uint8Array(4096);
  for (const [x, y] of ranges) {
    if (y - x > buf.length) buf = new Uint8Array(y - x);
    const part = buf.subarray(0, y - x);
    dev.copyOut(part, x);
    [a, b] = hashWords(Math.imul(a ^ x, 0x01000193) ^ (y - x), b ^ x, part);
  }
  return `${a >>> 0}.${b >>> 0}`;
}
const SHIFT = 12;

export class PagedDevice implements BlockDevice {
  /** written pages by index; a page may be shared with clones unless it is in `owned` */
  private pages: Map<number, Uint8Array>;
  private owned = new Set<number>();
  private length: number;
  /** base bytes at or past this offset read as zero (a truncation cut them off) */
  private cut: number;
  /** while tracking: the ranges read that this device had not written since tracking began (see `track`) */
  private reads: Array<[number, number]> | undefined;
  private written: Array<[number, number]> = [];
  /** for `digest`: the digest lanes at the clone, the pages changed since (with the page each replaced), and the lanes last computed */
  private inherited: [number, number] | undefined;
  private replaced: Map<number, Uint8Array | undefined> | undefined;
  private lanes: [number, number] | undefined;

  constructor(
    readonly name: string,
    private readonly base: Uint8Array,
    opts: { readOnly?: boolean; length?: number; pages?: Map<number, Uint8Array>; cut?: number } = {},
  ) {
    this.readOnly = opts.readOnly ?? false;
    this.length = opts.length ?? base.length;
    this.pages = opts.pages ? new Map(opts.pages) : new Map();
    this.cut = Math.min(opts.cut ?? base.length, this.length);
  }

  readonly readOnly: boolean;

  /** A device with the same bytes, sharing every page until one of the two writes it. */
  clone(opts: { readOnly?: boolean; name?: string } = {}): PagedDevice {
    // the clone shares the pages: neither may change one in place from now on
    this.owned.clear();
    const c = new PagedDevice(opts.name ?? this.name, this.base, { readOnly: opts.readOnly ?? this.readOnly, length: this.length, pages: this.pages, cut: this.cut });
    // the clone's digest starts from this one's and follows the pages it changes
    c.inherited = this.digestLanes();
    c.replaced = new Map();
    return c;
  }

  /** The whole image as one buffer (a copy). */
  snapshot(): Uint8Array {
    const out = new Uint8Array(this.length);
    this.copyOut(out, 0);
    return out;
  }

  /** Pages written since the base, in order, with their bytes. */
  writtenPages(): Array<[number, Uint8Array]> {
    return [...this.pages].sort((a, b) => a[0] - b[0]);
  }

  /**
   * A digest of the image's bytes that does not depend on how they were
   * reached: a written page equal to the base's bytes there counts as not
   * written. Two devices over the same base have equal digests exactly
   * when their bytes are equal (up to the hash). It is the XOR of a hash
   * per written page (its index and bytes), each computed once per page
   * buffer: a clone shares its pages, so a crash state pays only for the
   * pages it wrote itself. Call it when the device is no longer written.
   */
  digest(): string {
    const [x0, x1] = this.digestLanes();
    return `${this.length}/${Math.min(this.cut, this.length)}/${x0 >>> 0}/${x1 >>> 0}`;
  }

  private digestLanes(): [number, number] {
    if (this.lanes) return this.lanes;
    let x0 = 0;
    let x1 = 0;
    if (this.inherited && this.replaced) {
      // the clone's lanes, less the pages it replaced, plus their new bytes
      [x0, x1] = this.inherited;
      for (const [i, old] of this.replaced) {
        if (old) [x0, x1] = xor2(x0, x1, this.pageLanes(i, old));
        const now = this.pages.get(i);
        if (now && i * PAGE < this.length) [x0, x1] = xor2(x0, x1, this.pageLanes(i, now));
      }
    } else {
      for (const [i, p] of this.pages) if (i * PAGE < this.length) [x0, x1] = xor2(x0, x1, this.pageLanes(i, p));
    }
    return (this.lanes = [x0, x1]);
  }

  /** A page's share of the digest: 0 when it reads as the base there, its hash otherwise (remembered once the page is shared). */
  private pageLanes(i: number, p: Uint8Array): [number, number] {
    // whether a page reads as the base depends on the cut: remembered with it
    const known = pageHashes.get(p);
    if (known && known.cut === this.cut) return known.h;
    const h: [number, number] = this.equalsBase(i, p) ? [0, 0] : pageHash(i, p);
    // owned pages may still change: only shared ones are remembered
    if (this.pages.get(i) !== p || !this.owned.has(i)) pageHashes.set(p, { h, cut: this.cut });
    return h;
  }

  /** Whether page i reads as the base does there (no copy). */
  private equalsBase(i: number, p: Uint8Array): boolean {
    const off = i * PAGE;
    const end = Math.max(off, Math.min(off + PAGE, this.base.length, this.cut));
    if (end > off && Buffer.compare(p.subarray(0, end - off), this.base.subarray(off, end)) !== 0) return false;
    return end - off === PAGE || Buffer.compare(p.subarray(end - off), ZERO_PAGE.subarray(end - off)) === 0;
  }

  /**
   * Start (or stop) recording what the device's readers depend on: every
   * range read, less the bytes the device had itself been written since
   * tracking began (what a reader wrote and read back follows from what it
   * read before). Returns the ranges recorded so far, merged and sorted.
   */
  track(on: boolean): Array<[number, number]> | undefined {
    const r = this.reads;
    this.reads = on ? [] : undefined;
    this.written = [];
    return r && mergeRanges(r);
  }

  private noteRead(offset: number, n: number): void {
    let parts: Array<[number, number]> = [[offset, offset + n]];
    for (const [a, b] of this.written) {
      const next: Array<[number, number]> = [];
      for (const [x, y] of parts) {
        if (b <= x || a >= y) next.push([x, y]);
        else {
          if (x < a) next.push([x, a]);
          if (b < y) next.push([b, y]);
        }
      }
      parts = next;
      if (!parts.length) return;
    }
    this.reads!.push(...parts);
  }

  async size(): Promise<number> {
    return this.length;
  }

  sizeSync(): number {
    return this.length;
  }

  async allocatedBytes(): Promise<number | undefined> {
    return this.length;
  }

  async readInto(out: Uint8Array, offset: number): Promise<void> {
    this.copyOut(out, offset);
  }

  /** Synchronous read, for callers that compare many small ranges. */
  copyOut(out: Uint8Array, offset: number): void {
    const n = Math.max(0, Math.min(out.length, this.length - offset));
    if (this.reads && n > 0) this.noteRead(offset, n);
    if (this.pages.size === 0) {
      this.baseInto(out.subarray(0, n), offset);
    } else {
      let at = 0;
      while (at < n) {
        const pos = offset + at;
        const i = pos >>> SHIFT;
        const within = pos - i * PAGE;
        const take = Math.min(n - at, PAGE - within);
        const p = this.pages.get(i);
        if (p) out.set(p.subarray(within, within + take), at);
        else {
          // a run of pages not written: one copy from the base
          let run = take;
          while (at + run < n && !this.pages.has((pos + run) >>> SHIFT)) run += Math.min(n - at - run, PAGE);
          this.baseInto(out.subarray(at, at + run), pos);
          at += run;
          continue;
        }
        at += take;
      }
    }
    out.fill(0, n);
  }

  private baseInto(out: Uint8Array, offset: number): void {
    const end = Math.min(offset + out.length, this.base.length, this.cut);
    const n = Math.max(0, end - offset);
    if (n > 0) out.set(this.base.subarray(offset, offset + n));
    out.fill(0, n);
  }

  /** The page at index i, ready to change in place. */
  private page(i: number, whole = false): Uint8Array {
    let p = this.pages.get(i);
    if (p && this.owned.has(i)) return p;
    if (this.replaced && !this.replaced.has(i)) this.replaced.set(i, p);
    const fresh = newPage();
    if (whole) {
      // the caller overwrites it all
    } else if (p) fresh.set(p);
    else if (i * PAGE < this.length) this.baseInto(fresh, i * PAGE);
    // bytes past the end read as zero when the device grows over them
    if ((i + 1) * PAGE > this.length) fresh.fill(0, Math.max(0, this.length - i * PAGE));
    p = fresh;
    this.pages.set(i, p);
    this.owned.add(i);
    return p;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.assertWritable();
    this.writeSync(offset, data);
  }

  /** Synchronous write (the crash harness applies recorded writes this way). */
  writeSync(offset: number, data: Uint8Array): void {
    if (this.reads && data.length) this.written.push([offset, offset + data.length]);
    this.lanes = undefined;
    let at = 0;
    while (at < data.length) {
      const pos = offset + at;
      const i = pos >>> SHIFT;
      const within = pos - i * PAGE;
      const take = Math.min(data.length - at, PAGE - within);
      this.page(i, take === PAGE).set(data.subarray(at, at + take), within);
      at += take;
    }
    if (offset + data.length > this.length) this.length = offset + data.length;
  }

  async flush(): Promise<void> {}

  async truncate(size: number): Promise<void> {
    this.assertWritable();
    this.truncateSync(size);
  }

  truncateSync(size: number): void {
    // a reader that truncates decides the bytes past the cut and up to the new end
    if (this.reads) this.written.push([Math.min(size, this.length), Number.MAX_SAFE_INTEGER]);
    this.lanes = undefined;
    if (size < this.length) {
      // which pages read as the base changes with the cut: the digest starts over
      this.inherited = undefined;
      this.replaced = undefined;
      this.cut = Math.min(this.cut, size);
      for (const i of [...this.pages.keys()]) {
        if (i * PAGE >= size) {
          this.pages.delete(i);
          this.owned.delete(i);
        } else if ((i + 1) * PAGE > size) this.page(i).fill(0, size - i * PAGE);
      }
    }
    this.length = size;
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.assertWritable();
    const zero = new Uint8Array(Math.min(length, 1 << 20));
    for (let at = 0; at < length; at += zero.length) this.writeSync(offset + at, zero.subarray(0, Math.min(zero.length, length - at)));
  }

  async discard(): Promise<void> {}

  async close(): Promise<void> {}

  private assertWritable(): void {
    if (this.readOnly) throw new QledgerError('E_READ_ONLY', `${this.name}: opened read-only`);
  }
}

/** Ranges [from, to) sorted and merged where they overlap or touch. */
export function mergeRanges(r: ReadonlyArray<readonly [number, number]>): Array<[number, number]> {
  const sorted = [...r].sort((a, b) => a[0] - b[0]);
  const out: Array<[number, number]> = [];
  for (const [a, b] of sorted) {
    const last = out[out.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}
