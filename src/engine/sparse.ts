/**
 * qemu-img convert's sparse detection (`-S SIZE`): which parts of a buffer
 * of guest data are written and which are left as holes (or written as
 * zeroes). The rule is QEMU's is_allocated_sectors_min, by 512-byte
 * sectors: a run of zero sectors inside data is kept as data unless it is
 * at least SIZE long, and run ends are aligned to pow2floor(SIZE) (data
 * ends rounded up, zero ends rounded down, a zero run shorter than its
 * misalignment counted as data). QEMU applies it to each read buffer of
 * at most 2 MiB, counted from the start of a block-status extent; callers
 * cut their buffers the same way (WINDOW).
 */

const SECTOR = 512;
/** qemu-img convert's IO_BUF_SIZE: the longest buffer the rule sees at once */
export const WINDOW = 2 * 1024 * 1024;
/** the largest -S qemu-img takes (MAX_BUF_SECTORS sectors) */
export const MAX_SPARSE = 32768 * SECTOR;

/** -S in sectors: `min` 0 turns detection off (the output is fully allocated). */
export interface SparseRule {
  readonly min: number;
  readonly align: number;
}

/** The rule for `-S bytes` (a multiple of 512 up to MAX_SPARSE; the CLI checks). */
export function sparseRule(bytes: number): SparseRule {
  const min = Math.floor(bytes / SECTOR);
  let align = 1;
  while (align * 2 <= min) align *= 2;
  return { min, align };
}

/** qemu-img's default -S: 4 KiB */
export const DEFAULT_SPARSE: SparseRule = sparseRule(4096);

export interface SparseRun {
  /** byte offsets inside the buffer */
  readonly from: number;
  readonly to: number;
  readonly data: boolean;
}

const ZERO = new Uint8Array(8 * SECTOR);

/** Zero-ness of the buffer's sectors, cheap for data: a nonzero first word settles a sector. */
class Sectors {
  private readonly buf: Buffer;
  private readonly words: Uint32Array | undefined;
  readonly count: number;

  constructor(private readonly b: Uint8Array) {
    this.buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
    this.words = b.byteOffset % 4 === 0 ? new Uint32Array(b.buffer, b.byteOffset, b.byteLength >>> 2) : undefined;
    this.count = Math.ceil(b.length / SECTOR);
  }

  zero(s: number): boolean {
    const off = s * SECTOR;
    const w = this.words;
    if (w !== undefined && off + 8 <= this.b.length && (w[off >>> 2]! | w[(off >>> 2) + 1]!) !== 0) return false;
    const n = Math.min(SECTOR, this.b.length - off);
    return this.buf.compare(ZERO, 0, n, off, off + n) === 0;
  }

  /** sectors from `s` (before `end`) of the zero-ness `zero`: whole zero 4 KiB blocks are skipped in one comparison */
  sameRun(s: number, end: number, zero: boolean): number {
    let i = s + 1;
    while (i < end) {
      if (zero && i % 8 === 0 && i + 8 <= end && (i + 8) * SECTOR <= this.b.length && this.buf.compare(ZERO, 0, 8 * SECTOR, i * SECTOR, (i + 8) * SECTOR) === 0) {
        i += 8;
        continue;
      }
      if (this.zero(i) !== zero) break;
      i++;
    }
    return i - s;
  }
}

/** QEMU's is_allocated_sectors: the run at `s` (of at most `n` sectors), its end aligned. */
function allocatedRun(sec: Sectors, s: number, n: number, sectorNum: number, align: number): [boolean, number] {
  let zero = sec.zero(s);
  let i = sec.sameRun(s, s + n, zero);
  const tail = (sectorNum + i) & (align - 1);
  if (tail) {
    // a zero run no longer than its misalignment counts as data
    if (zero && i <= tail) zero = false;
    if (!zero) i = Math.min(n, i + align - tail);
    else i -= tail;
  }
  return [!zero, i];
}

/** QEMU's is_allocated_sectors_min: data runs swallow zero runs shorter than `min`. */
function allocatedRunMin(sec: Sectors, s: number, n: number, sectorNum: number, rule: SparseRule): [boolean, number] {
  const min = Math.min(rule.min, n);
  const [first, p] = allocatedRun(sec, s, n, sectorNum, rule.align);
  if (!first) return [false, p];
  let used = p;
  let checked = p;
  while (checked < n) {
    const [data, q] = allocatedRun(sec, s + checked, n - checked, sectorNum + checked, rule.align);
    checked += q;
    if (data) used = checked;
    else if (q >= min) break;
  }
  return [true, used];
}

/**
 * The runs of `b`, guest data at `offset` (a multiple of 512), to write
 * (data) or leave out (zero), by `rule`. `b` is one buffer of QEMU's
 * loop: at most WINDOW long.
 */
export function sparseRuns(b: Uint8Array, offset: number, rule: SparseRule): SparseRun[] {
  if (rule.min === 0 || b.length === 0) return [{ from: 0, to: b.length, data: true }];
  const sec = new Sectors(b);
  const runs: SparseRun[] = [];
  const first = Math.floor(offset / SECTOR);
  for (let s = 0; s < sec.count; ) {
    const [data, n] = allocatedRunMin(sec, s, sec.count - s, first + s, rule);
    const from = s * SECTOR;
    const to = Math.min(b.length, (s + n) * SECTOR);
    const last = runs[runs.length - 1];
    if (last && last.data === data) runs[runs.length - 1] = { from: last.from, to, data };
    else runs.push({ from, to, data });
    s += n;
  }
  return runs;
}
