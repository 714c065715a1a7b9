/**
 * A device that records every write and flush, and the crash states a
 * recording allows.
 *
 * Crash model (../shared/design-notes.md): the write log splits into epochs
 * at each completed flush. After a power cut in epoch e, everything before
 * its opening flush is on the disk; of the writes issued in epoch e, any
 * subset may have reached the disk, in any order, each 512-byte sector of a
 * write independently (a torn write). The file length lies between the
 * durable and the cached length; the extension reads as zero.
 *
 * `crashStates` enumerates that space cheapest first under a budget: for
 * each epoch the durable state plus every prefix of its writes; all subsets
 * when there are few, otherwise each write alone and all but each one;
 * torn writes (the first or last sectors only); an older write landing
 * after a newer one it overlaps; then seeded random per-sector choices.
 * Identical images are produced once.
 */

import { DeviceWrapper } from './device.ts';
import { MemoryDevice } from './memory-device.ts';
import { PagedDevice, mergeRanges } from './paged-device.ts';

export type RecordedOp =
  | { readonly kind: 'write'; readonly offset: number; readonly data: Uint8Array }
  | { readonly kind: 'flush' }
  | { readonly kind: 'truncate'; readonly size: number };

export const SECTOR = 512;

/** Wraps an in-memory image and records what is done to it. */
export class RecordingDevice extends DeviceWrapper {
  readonly ops: RecordedOp[] = [];
  readonly initial: Uint8Array;
  private readonly mem: MemoryDevice;

  constructor(name: string, initial: Uint8Array) {
    const mem = new MemoryDevice(name, initial);
    super(mem);
    this.mem = mem;
    this.initial = initial.slice();
  }

  /** The device's current (cached) content. */
  snapshot(): Uint8Array {
    return this.mem.snapshot();
  }

  /**
   * A write is recorded as the whole disk sectors it touches, with their
   * content after it: a sector reaches the disk as the cache holds it, so a
   * crash can show an older or newer state of a sector, never a mix of
   * bytes from writes that the cache never held together.
   */
  override async write(offset: number, data: Uint8Array): Promise<void> {
    await this.mem.write(offset, data);
    const from = Math.floor(offset / SECTOR) * SECTOR;
    const to = Math.ceil((offset + data.length) / SECTOR) * SECTOR;
    const size = await this.mem.size();
    const sectors = new Uint8Array(Math.min(to, Math.max(size, offset + data.length)) - from);
    await this.mem.readInto(sectors, from);
    this.ops.push({ kind: 'write', offset: from, data: sectors });
  }
  override async flush(): Promise<void> {
    this.ops.push({ kind: 'flush' });
  }
  override async truncate(size: number): Promise<void> {
    this.ops.push({ kind: 'truncate', size });
    await this.mem.truncate(size);
  }
  override async writeZeroes(offset: number, length: number): Promise<void> {
    await this.write(offset, new Uint8Array(length));
  }
  override async discard(): Promise<void> {}
  /** no fallocate: it would change the content unrecorded (callers write zeros instead, which are recorded) */
  override async allocate(): Promise<boolean> {
    return false;
  }
  override async close(): Promise<void> {}
}

export interface CrashState {
  /** which epoch (0 = before the first flush) and how the pending writes were chosen */
  readonly epoch: number;
  readonly description: string;
  /** the state's bytes: the epoch's durable image plus the writes it keeps (copy-on-write; clone it to write) */
  readonly device: PagedDevice;
  /** the same bytes as one buffer (a copy, made on each use) */
  readonly image: Uint8Array;
  /** index into the recording of the first op not covered by the crash (for the oracle) */
  readonly crashPoint: number;
  /** index of the flush that opens the epoch: every op before it is on the disk (-1: none) */
  readonly durableAt: number;
  /** the epoch's durable image (no pending write kept) */
  readonly durable: PagedDevice;
  /** the host ranges the epoch's writes touch, sorted [offset, end) pairs (a state differs from the epoch's durable image only there) */
  readonly pending: ReadonlyArray<readonly [number, number]>;
}

interface Epoch {
  /** op index of the flush that opens it (-1 for the first) */
  readonly start: number;
  /** op index where it ends (its closing flush, or the end of the recording) */
  readonly end: number;
  readonly writes: Array<{ index: number; op: Extract<RecordedOp, { kind: 'write' | 'truncate' }> }>;
}

function epochs(ops: readonly RecordedOp[]): Epoch[] {
  const out: Epoch[] = [];
  let start = -1;
  let writes: Epoch['writes'] = [];
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i]!;
    if (op.kind === 'flush') {
      out.push({ start, end: i, writes });
      start = i;
      writes = [];
    } else writes.push({ index: i, op });
  }
  out.push({ start, end: ops.length, writes });
  return out.filter((e) => e.writes.length > 0 || e.start === -1);
}

/** `initial` with the first `end` recorded operations applied whole (no crash: every write and truncation as it was made). */
export function replayOps(initial: Uint8Array, ops: readonly RecordedOp[], end: number): Uint8Array {
  const img = new PagedDevice('replay', initial);
  for (let i = 0; i < end; i++) apply(img, ops[i]!);
  return img.snapshot();
}

/** Apply a recorded op to an image, whole or (a torn write) only the disk sectors [from, to) of it. */
function apply(img: PagedDevice, op: RecordedOp, sectors?: { from: number; to: number }): void {
  if (op.kind === 'truncate') return img.truncateSync(op.size);
  if (op.kind !== 'write') return;
  // Sectors are the disk's: numbered from the first one the write touches,
  // so a torn unaligned write keeps whole disk sectors, never half of one.
  const first = Math.floor(op.offset / SECTOR);
  const from = sectors ? Math.max(op.offset, (first + sectors.from) * SECTOR) : op.offset;
  const to = sectors ? Math.min(op.offset + op.data.length, (first + sectors.to) * SECTOR) : op.offset + op.data.length;
  if (to <= from) return;
  img.writeSync(from, op.data.subarray(from - op.offset, to - op.offset));
}

/**
 * The host ranges recorded writes and truncations change, merged: a
 * truncation changes the bytes between the lengths before and after it.
 * `length`: the file's length before the first of them.
 */
export function touchedRanges(ops: Iterable<RecordedOp>, length: number): Array<[number, number]> {
  const r: Array<[number, number]> = [];
  for (const op of ops) {
    if (op.kind === 'write') r.push([op.offset, op.offset + op.data.length]);
    else if (op.kind === 'truncate') {
      r.push([Math.min(length, op.size), Math.max(length, op.size)]);
      length = op.size;
    }
  }
  return mergeRanges(r);
}

/** Number of disk sectors a write touches. */
function sectorSpan(op: { offset: number; data: Uint8Array }): number {
  return Math.ceil((op.offset + op.data.length) / SECTOR) - Math.floor(op.offset / SECTOR);
}

/** xorshift32: seeded choices, reproducible from the seed alone. */
export function rng(seed: number): () => number {
  // spread small seeds over the state space (murmur3's finaliser), then warm up
  let x = Math.imul((seed >>> 0) ^ 0x9e3779b9, 0x85ebca6b) >>> 0;
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35) >>> 0;
  x = (x ^ (x >>> 16)) >>> 0 || 0x9e3779b9;
  for (let i = 0; i < 4; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
  }
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

export interface EnumerateOptions {
  /** stop after this many distinct states */
  readonly maxStates: number;
  readonly seed: number;
  /** all subsets when an epoch has at most this many writes */
  readonly subsetLimit?: number | undefined;
}

/** The distinct crash states of a recording, cheapest first, at most maxStates. */
export function* crashStates(initial: Uint8Array, ops: readonly RecordedOp[], o: EnumerateOptions): Generator<CrashState> {
  const seen = new Set<string>();
  const eps = epochs(ops);
  const random = rng(o.seed);
  const limit = o.subsetLimit ?? 8;
  let produced = 0;
  // durable image at the start of each epoch, all over the initial one: a state shares their pages
  const durable: PagedDevice[] = [];
  const pending: Array<Array<[number, number]>> = [];
  {
    const img = new PagedDevice('crash', initial);
    let i = 0;
    for (const e of eps) {
      for (; i <= e.start; i++) apply(img, ops[i]!);
      durable.push(img.clone());
      pending.push(touchedRanges(e.writes.map((w) => w.op), img.sizeSync()));
    }
  }
  const emit = function* (epoch: number, description: string, device: PagedDevice, crashPoint: number): Generator<CrashState> {
    const h = device.digest();
    if (seen.has(h)) return;
    seen.add(h);
    produced++;
    yield {
      epoch,
      description,
      device,
      get image() {
        return device.snapshot();
      },
      crashPoint,
      durableAt: eps[epoch]!.start,
      durable: durable[epoch]!,
      pending: pending[epoch]!,
    };
  };
  const build = (e: number, choose: (k: number) => boolean | { from: number; to: number }, order?: number[]): PagedDevice => {
    const ep = eps[e]!;
    const img = durable[e]!.clone();
    const idx = order ?? ep.writes.map((_, k) => k);
    for (const k of idx) {
      const c = choose(k);
      if (c === false) continue;
      apply(img, ep.writes[k]!.op, c === true ? undefined : c);
    }
    return img;
  };
  // Round 1 for every epoch: prefixes (what an ordered disk would show). Round 2: subsets
  // or leave-one-out/only-one. Round 3: torn and reordered writes. Round 4: random sectors.
  const rounds: Array<(e: number) => Generator<CrashState>> = [
    function* prefixes(e) {
      const ep = eps[e]!;
      for (let n = 0; n <= ep.writes.length; n++) {
        yield* emit(e, `epoch ${e}: first ${n} of ${ep.writes.length} writes`, build(e, (k) => k < n), ep.writes[n]?.index ?? ep.end);
      }
    },
    function* subsets(e) {
      const ep = eps[e]!;
      const n = ep.writes.length;
      if (n <= limit) {
        for (let mask = 0; mask < 2 ** n; mask++) {
          yield* emit(e, `epoch ${e}: writes {${[...Array(n).keys()].filter((k) => mask & (2 ** k)).join(',')}} of ${n}`, build(e, (k) => (mask & (2 ** k)) !== 0), ep.end);
        }
      } else {
        for (let j = 0; j < n; j++) {
          yield* emit(e, `epoch ${e}: all writes but #${j} of ${n}`, build(e, (k) => k !== j), ep.end);
          yield* emit(e, `epoch ${e}: only write #${j} of ${n}`, build(e, (k) => k === j), ep.end);
        }
      }
    },
    function* tornAndReordered(e) {
      const ep = eps[e]!;
      const n = ep.writes.length;
      for (let j = 0; j < n; j++) {
        const op = ep.writes[j]!.op;
        if (op.kind !== 'write') continue;
        const sectors = sectorSpan(op);
        if (sectors < 2) continue;
        for (const [what, range] of [
          ['first sector', { from: 0, to: 1 }],
          ['all but the last sector', { from: 0, to: sectors - 1 }],
          ['last sector', { from: sectors - 1, to: sectors }],
          ['all but the first sector', { from: 1, to: sectors }],
        ] as const) {
          yield* emit(e, `epoch ${e}: writes before #${j} and ${what} of #${j} (torn)`, build(e, (k) => (k < j ? true : k === j ? range : false)), ep.writes[j]!.index + 1);
          yield* emit(e, `epoch ${e}: all writes but ${what} of #${j} only (torn)`, build(e, (k) => (k === j ? range : true)), ep.end);
        }
      }
      for (let i = 0; i < n; i++) {
        for (let j = i + 1; j < n; j++) {
          const a = ep.writes[i]!.op;
          const b = ep.writes[j]!.op;
          if (a.kind !== 'write' || b.kind !== 'write') continue;
          if (a.offset >= b.offset + b.data.length || b.offset >= a.offset + a.data.length) continue;
          const order = [...Array(n).keys()].filter((k) => k !== i);
          order.push(i);
          yield* emit(e, `epoch ${e}: write #${i} lands after the newer #${j} it overlaps`, build(e, () => true, order), ep.end);
        }
      }
    },
    function* randomSectors(e) {
      const ep = eps[e]!;
      for (let r = 0; r < 4 * ep.writes.length + 4; r++) {
        // per write: persisted, dropped, or a random run of its sectors
        const picks = ep.writes.map(({ op }) => {
          const x = random();
          if (op.kind !== 'write' || x < 0.3) return x < 0.15 ? false : true;
          const sectors = sectorSpan(op);
          const from = Math.floor(random() * sectors);
          const to = from + 1 + Math.floor(random() * (sectors - from));
          return x < 0.65 ? true : { from, to };
        });
        yield* emit(e, `epoch ${e}: random sector choice ${r}`, build(e, (k) => picks[k]!), ep.end);
      }
    },
  ];
  for (const round of rounds) {
    for (let e = eps.length - 1; e >= 0; e--) {
      for (const s of round(e)) {
        yield s;
        if (produced >= o.maxStates) return;
      }
    }
  }
}
