/**
 * The crash harness's oracles for one crash state (crash-harness.ts says
 * what each one asks), made to cost what the state changed:
 *
 * - (a) and (d) are memoised by what they read. A check, or a read-write
 *   open with its recovery, its close and the check after, is a
 *   deterministic function of the bytes it reads from the state (and the
 *   state's length); the state device records those ranges, and a later
 *   state with the same bytes there gets the same verdict without a run.
 *   States that differ only in guest data sectors share one run.
 * - (b)/(c) read only the guest ranges that can read otherwise than in the
 *   epoch's durable image, which is judged whole once per epoch: ranges
 *   whose mapping (the top layer's status runs) differs from the durable
 *   image's, and ranges mapped to host bytes the epoch's pending writes
 *   touch. Every other range reads as in the durable image, which passed
 *   the same oracle with fewer later writes allowed. (The runs come from
 *   the state's own header and tables, so a moved L1 table or a header
 *   that names no backing file any more shows in them.) A state whose size
 *   differs, or whose durable image failed, is read whole; so is every state of a workload with bitmaps (oracle (f)
 *   looks at every granule) or whose backing file changes (a commit).
 */

import { hashRanges, mergeRanges, type PagedDevice } from '../io/paged-device.ts';
import type { CrashState, RecordedOp } from '../io/crash-device.ts';
import { isZero, u64big } from '../format/bytes.ts';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../format/features.ts';
import { readGuest } from '../engine/read.ts';
import { guest, type Layer, type LayerStatus } from '../engine/layer.ts';
import { Qcow2Layer, loadQcow2, openQcow2Layer } from '../engine/qcow2-layer.ts';
import { recoverJournal } from '../engine/journal/replay.ts';
import { checkDevice } from '../engine/check/check.ts';
import { openSession } from '../engine/writable.ts';
import type { GuestOp } from './workload.ts';
import { judgeBitmaps } from './bitmap-oracle.ts';
import { BLOCK, GuestModel } from './guest-model.ts';

const SECTOR = 512;
const CHUNK = 1 << 20;
const ZEROS = Buffer.alloc(CHUNK);
const NO_BITMAPS: JudgeContext['bitmapRefs'] = new Map();

/** One guest operation of the workload: the guest range it changed and its content afterwards. */
export interface Step {
  readonly op: GuestOp;
  readonly devStart: number;
  readonly devEnd: number;
  readonly lo: number;
  readonly hi: number;
  /** the guest content of [lo, hi) after it (in guest coordinates; nothing outside the range) */
  readonly content: GuestModel;
  readonly size: number;
}

export interface JudgeContext {
  readonly name: string;
  readonly steps: readonly Step[];
  readonly ops: readonly RecordedOp[];
  readonly initialModel: GuestModel;
  readonly journal: boolean;
  /** the workload's image had a journal at its end (leaks after recovery are failures) */
  readonly journalled: boolean;
  readonly journalBytes: number;
  readonly snapshotWorkload: boolean;
  readonly bitmapRefs: ReadonlyMap<string, { content: Uint8Array; checkable: boolean }>;
  /** the backing layer a state reads through (undefined: none) */
  readonly backing: (st: CrashState) => Promise<Layer | undefined>;
  /** the backing file is the same for every state (no commit in the workload) */
  readonly backingFixed: boolean;
  /** every host range the recording's writes and truncations touch, sorted and merged */
  readonly written: ReadonlyArray<readonly [number, number]>;
  /** judge every state from scratch: no memo, the whole disk read into one buffer (tests compare the verdicts with the saving way's) */
  readonly thorough?: boolean | undefined;
}

export type Problem = { readonly problem: string; readonly kind: 'corruption' | 'data' };

export interface Verdict {
  readonly problems: Problem[];
  readonly leaks: boolean;
  /** 0, 1 or 2: how many of (a) and (d) found only the harmless COPIED finding */
  readonly copiedClear: number;
  readonly replayed: boolean;
  readonly leaksAfterRecovery: boolean;
  /** the image was dirty (lazy refcounts): (a) is judged after the recovery of (d) instead */
  readonly dirty: boolean;
}

type CheckSummary = { corruptions: number; checkErrors: number; leaks: number; findings: ReadonlyArray<{ counts: string; message: string; copiedClear?: boolean | undefined }> };

/**
 * Verdicts keyed by the bytes a run read: runs are grouped by the ranges
 * they read ("shapes"), and a state is looked up in the recent shapes by a
 * digest of its bytes there.
 */
class ReadSetMemo<T> {
  /** @param written every host range any recorded write or truncation touched: outside them all states hold the same bytes */
  constructor(
    private readonly written: ReadonlyArray<readonly [number, number]>,
    private readonly off = false,
  ) {}
  private shapes: Array<{ key: string; length: number; ranges: Array<[number, number]>; results: Map<string, T> }> = [];
  hits = 0;
  runs = 0;

  /**
   * The verdict of `run` for the bytes of `state`: from a run that read the
   * same bytes, or from a run on a clone of it (writable unless `readOnly`)
   * whose reads are recorded.
   */
  async get(state: PagedDevice, token: string, readOnly: boolean, run: (dev: PagedDevice) => Promise<T>): Promise<T> {
    if (this.off) return run(state.clone({ readOnly }));
    const length = state.sizeSync();
    for (let i = 0; i < Math.min(this.shapes.length, 8); i++) {
      const s = this.shapes[i]!;
      if (s.length !== length) continue;
      const r = s.results.get(token + hashRanges(state, s.ranges));
      if (r === undefined) continue;
      // most recently useful first
      if (i > 0) this.shapes.unshift(...this.shapes.splice(i, 1));
      this.hits++;
      return r;
    }
    this.runs++;
    const dev = state.clone({ readOnly });
    dev.track(true);
    const result = await run(dev);
    const ranges = dev.track(false)!;
    const key = ranges.map(([a, b]) => `${a}:${b}`).join(',');
    // only the bytes that can differ between two states of the same length go into the digest
    const keyed = intersect(ranges, this.written);
    let shape = this.shapes.find((s) => s.key === key && s.length === length);
    if (!shape) {
      shape = { key, length, ranges: keyed, results: new Map() };
      this.shapes.unshift(shape);
      if (this.shapes.length > 64) this.shapes.pop();
    }
    // the state's bytes there, not the clone's: a run that writes reads some of its own writes back
    shape.results.set(token + hashRanges(state, keyed), result);
    return result;
  }
}

/** The parts of sorted ranges `a` inside sorted ranges `b`. */
function intersect(a: ReadonlyArray<readonly [number, number]>, b: ReadonlyArray<readonly [number, number]>): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  let j = 0;
  for (const [x, y] of a) {
    while (j < b.length && b[j]![1] <= x) j++;
    for (let k = j; k < b.length && b[k]![0] < y; k++) out.push([Math.max(x, b[k]![0]), Math.min(y, b[k]![1])]);
  }
  return out;
}

/** A status run of the top layer: [start, end), its type and where its bytes start in the file. */
type Run = { start: number; end: number; type: LayerStatus['type']; host: number | undefined };

export async function statusRuns(layer: Layer): Promise<Run[]> {
  const runs: Run[] = [];
  for (let at = 0; at < layer.size; ) {
    const st = await layer.status(guest(at), layer.size - at);
    const end = at + st.length;
    runs.push({ start: at, end, type: st.type, host: st.hostOffset as number | undefined });
    at = end;
  }
  return runs;
}

/** Whether a run of a layer reads as zeros whatever the file holds (zero clusters; unallocated ones without a backing file). */
export function readsZero(t: Run['type'], layer: Layer): boolean {
  return t === 'zero-plain' || t === 'zero-alloc' || ((t === 'unallocated-plain' || t === 'unallocated-alloc') && !layer.backing);
}

/** Whether a run's bytes are the file's bytes at its host offset (so they change when those do). */
function readsHost(t: Run['type']): boolean {
  return t === 'normal' || t === 'raw-data';
}

export class StateJudge {
  private readonly checks: ReadSetMemo<CheckSummary | { error: string }>;
  private readonly recoveries: ReadSetMemo<{ replayed: boolean; problem?: Problem; copiedClear: boolean; leaksAfter: boolean }>;
  private readonly epochs = new Map<number, { size: number; runs: Run[]; valid: boolean; backing: Layer | undefined } | undefined>();
  private readonly baseModels = new Map<number, { g: number; model: GuestModel }>();
  private readonly ruleSets = new Map<string, { model: GuestModel; later: Step[]; sizes: Set<number>; minSize: number }>();
  private readonly backingIds = new WeakMap<Layer, number>();
  private backingCount = 0;
  /** guest bytes read and judged, and how many states were read whole (for the figures) */
  guestBytes = 0;
  wholeReads = 0;

  constructor(private readonly c: JudgeContext) {
    this.checks = new ReadSetMemo(c.written, c.thorough);
    this.recoveries = new ReadSetMemo(c.written, c.thorough);
  }

  get memoFigures(): { checkRuns: number; checkHits: number; recoveryRuns: number; recoveryHits: number } {
    return { checkRuns: this.checks.runs, checkHits: this.checks.hits, recoveryRuns: this.recoveries.runs, recoveryHits: this.recoveries.hits };
  }

  private backingToken(b: Layer | undefined): string {
    if (!b) return '-';
    let id = this.backingIds.get(b);
    if (id === undefined) this.backingIds.set(b, (id = ++this.backingCount));
    return `b${id}:`;
  }

  /** Judge one state by (a), (b)/(c), (f) and (d). */
  async judge(st: CrashState): Promise<Verdict> {
    const c = this.c;
    const problems: Problem[] = [];
    let leaks = false;
    let copiedClear = 0;
    const head = new Uint8Array(104);
    st.device.copyOut(head, 0);
    const v3 = u64big(head, 4) >> 32n === 3n;
    const dirty = (u64big(head, 72) & INCOMPAT_DIRTY) !== 0n && v3;
    // (a)
    if (!dirty) {
      const r = await this.checks.get(st.device, '', true, (dev) =>
        checkDevice(dev, c.name).then(
          (r) => ({ corruptions: r.corruptions, checkErrors: r.checkErrors, leaks: r.leaks, findings: r.findings }) as CheckSummary,
          (e: Error) => ({ error: e.message }),
        ),
      );
      if ('error' in r) problems.push({ problem: `check failed: ${r.error}`, kind: 'corruption' });
      else {
        if (this.onlyCopiedClear(r)) copiedClear++;
        else if (r.corruptions || r.checkErrors) problems.push({ problem: `check: ${r.corruptions} corruptions, ${r.checkErrors} check errors: ${r.findings.filter((f) => f.counts !== 'leak').map((f) => f.message).slice(0, 3).join('; ')}`, kind: 'corruption' });
        if (r.leaks) leaks = true;
      }
    }
    // (b), (c) and (f)
    const backing = await c.backing(st);
    try {
      const problem = await this.judgeGuest(st, st.device.clone({ readOnly: true }), backing);
      if (problem) problems.push({ problem, kind: 'data' });
    } catch (e) {
      problems.push({ problem: `read failed: ${(e as Error).message}${process.env['QLEDGER_DEBUG'] ? (e as Error).stack : ''}`, kind: 'corruption' });
    }
    // (d); an image marked corrupt (after a refusal) must be refused read-write, as QEMU refuses it
    let replayed = false;
    let leaksAfterRecovery = false;
    if ((u64big(head, 72) & INCOMPAT_CORRUPT) !== 0n && v3) {
      const opened = await openSession(st.device.clone(), undefined, c.name, backing, { journal: c.journal }).then(
        async (x) => {
          await x.writer.abandon();
          return true;
        },
        () => false,
      );
      if (opened) problems.push({ problem: 'an image marked corrupt was opened read-write', kind: 'corruption' });
    } else {
      const token = c.backingFixed ? this.backingToken(backing) : `${st.crashPoint}:`;
      const r = await this.recoveries.get(st.device, token, false, (dev) => this.recover(dev, backing));
      replayed = r.replayed;
      leaksAfterRecovery = r.leaksAfter;
      if (r.copiedClear) copiedClear++;
      if (r.problem) problems.push(r.problem);
      // (b) and (c) again after a replay: what it maps must be what was written (the verdict above is
      // shared by states that differ in data sectors alone, so this runs per state)
      if (replayed && !problems.length) {
        const problem = await this.judgeRecovered(st, backing);
        if (problem) problems.push({ problem: `after the journal's recovery: ${problem}`, kind: 'data' });
      }
    }
    return { problems, leaks, copiedClear, replayed, leaksAfterRecovery, dirty };
  }

  /** the one finding a snapshot workload may leave besides leaks (crash-harness.ts) */
  onlyCopiedClear(r: CheckSummary): boolean {
    return this.c.snapshotWorkload && r.checkErrors === 0 && r.corruptions > 0 && r.findings.every((f) => f.counts === 'leak' || f.counts === 'none' || f.copiedClear === true);
  }

  /** (d) on a writable clone of the state (the check after it reads the same device, so that its reads are recorded too). */
  private async recover(dev: PagedDevice, backing: Layer | undefined): Promise<{ replayed: boolean; problem?: Problem; copiedClear: boolean; leaksAfter: boolean }> {
    const c = this.c;
    const fail = (problem: string) => ({ replayed: false, problem: { problem, kind: 'corruption' as const }, copiedClear: false, leaksAfter: false });
    try {
      const warnings: string[] = [];
      const { writer: rw, recovery } = await openSession(dev, undefined, c.name, backing, { journal: c.journal, journalBytes: c.journalBytes, onWarning: (m) => warnings.push(m) });
      const replayed = recovery.action === 'replayed';
      // a journal qledger wrote and a crash cut is never invalid
      if (recovery.action === 'ignored') return { ...fail(`the journal was ignored: ${warnings.join('; ')}`), replayed };
      await rw.close();
      const r = await checkDevice(dev, c.name);
      // without the journal nothing completes a snapshot operation cut short: its harmless COPIED finding stays
      if (!c.journalled && this.onlyCopiedClear(r)) return { replayed, copiedClear: true, leaksAfter: false };
      if (r.corruptions || r.checkErrors) return { ...fail(`after a read-write open: ${r.corruptions} corruptions: ${r.findings.filter((f) => f.counts !== 'leak').map((f) => f.message).slice(0, 3).join('; ')}`), replayed };
      if (r.leaks && c.journalled) return { replayed, leaksAfter: true, copiedClear: false, problem: { problem: `after the journal's recovery: ${r.leaks} leaked clusters: ${r.findings.filter((f) => f.counts === 'leak').map((f) => f.message).slice(0, 3).join('; ')}`, kind: 'corruption' } };
      return { replayed, copiedClear: false, leaksAfter: false };
    } catch (e) {
      return fail(`read-write open failed: ${(e as Error).message}`);
    }
  }

  /**
   * (b) and (c) on a clone of the state after the journal's recovery: the
   * replay alone, not a whole read-write open (the rest of the open, a
   * refcount rebuild of a dirty image included, changes no guest data).
   */
  private async judgeRecovered(st: CrashState, backing: Layer | undefined): Promise<string | undefined> {
    const dev = st.device.clone();
    try {
      const loaded = await loadQcow2(dev);
      const r = await recoverJournal(dev, this.c.name, loaded.parsed, loaded.fileSize, undefined, { entries: loaded.snapshots, tableBytes: loaded.snapshotTableBytes });
      if (r.action !== 'replayed') return `the recovery did ${r.action} on a second run where the first replayed`;
    } catch (e) {
      return `the journal's recovery failed: ${(e as Error).message}`;
    }
    return this.judgeGuest(st, dev.clone({ readOnly: true }), backing, false);
  }

  /** (b), (c) and (f) (unless `!bitmaps`): the guest content of the state, read where it can differ from its epoch's durable image. */
  private async judgeGuest(st: CrashState, dev: PagedDevice, backing: Layer | undefined, bitmaps = true): Promise<string | undefined> {
    const c = this.c;
    const refs = bitmaps ? c.bitmapRefs : NO_BITMAPS;
    const layer = await openQcow2Layer(dev, c.name, { backing });
    const whole = async () => {
      this.wholeReads++;
      // without bitmaps to judge, run by run (a large sparse disk is mostly zeros)
      if (!refs.size && !c.thorough) return this.judgeRuns(layer, await statusRuns(layer), st);
      const got = new Uint8Array(layer.size);
      await readGuest(layer, guest(0), got);
      this.guestBytes += got.length;
      const problem = this.judgeData(got, 0, got.length, st);
      if (problem) return problem;
      return refs.size ? judgeBitmaps(layer, got, refs) : undefined;
    };
    if (refs.size || !c.backingFixed || c.thorough) return whole();
    const ref = await this.epochRef(st, backing);
    // the runs say where every byte comes from; an external data file is another device
    if (!ref?.valid || ref.size !== layer.size || ref.backing !== backing || (layer instanceof Qcow2Layer && layer.dataDev)) return whole();
    let runs: Run[];
    try {
      runs = await statusRuns(layer);
    } catch {
      return whole();
    }
    for (const [lo, hi] of suspects(ref.runs, runs, st.pending)) {
      const a = Math.floor(lo / SECTOR) * SECTOR;
      const b = Math.min(layer.size, Math.ceil(hi / SECTOR) * SECTOR);
      const got = new Uint8Array(b - a);
      await readGuest(layer, guest(a), got);
      this.guestBytes += got.length;
      const problem = this.judgeData(got, a, layer.size, st);
      if (problem) return problem;
    }
    return undefined;
  }

  /** (b) and (c) for a whole disk, run by run: runs that read as zeros are compared without a read. */
  private async judgeRuns(layer: Layer, runs: readonly Run[], st: { epoch: number; durableAt: number; crashPoint: number }): Promise<string | undefined> {
    // the size first (an empty piece)
    let problem = this.judgeData(ZEROS.subarray(0, 0), 0, layer.size, st);
    let buf = new Uint8Array(0);
    for (const r of runs) {
      if (problem) break;
      if (readsZero(r.type, layer)) {
        problem = this.judgeZeros(r.start, r.end, layer.size, st);
        continue;
      }
      for (let at = r.start; at < r.end && !problem; at += CHUNK) {
        const n = Math.min(CHUNK, r.end - at);
        if (buf.length < n) buf = new Uint8Array(CHUNK);
        const got = buf.subarray(0, n);
        await readGuest(layer, guest(at), got);
        this.guestBytes += n;
        problem = this.judgeData(got, at, layer.size, st);
      }
    }
    return problem;
  }

  /** The epoch's durable image: its status runs, and whether it reads right under the oracle (with the fewest later writes any state of the epoch allows). */
  private async epochRef(st: CrashState, backing: Layer | undefined) {
    if (this.epochs.has(st.epoch)) return this.epochs.get(st.epoch);
    let ref: { size: number; runs: Run[]; valid: boolean; backing: Layer | undefined } | undefined;
    try {
      const layer = await openQcow2Layer(st.durable.clone({ readOnly: true }), this.c.name, { backing });
      const runs = await statusRuns(layer);
      const as = { epoch: st.epoch, durableAt: st.durableAt, crashPoint: st.durableAt + 1 };
      const valid = (await this.judgeRuns(layer, runs, as)) === undefined;
      ref = { size: layer.size, runs, valid, backing };
    } catch {
      ref = undefined;
    }
    this.epochs.set(st.epoch, ref);
    return ref;
  }

  /**
   * The guest content at the last guest flush that a durable point covers
   * (computed once per flush), and which of its 64 KiB blocks are all zero.
   */
  private baseModel(durableAt: number): { g: number; model: GuestModel } {
    const all = this.c.steps;
    let g = -1;
    for (let k = 0; k < all.length; k++) if (all[k]!.op.op === 'flush' && all[k]!.devEnd - 1 <= durableAt) g = k;
    const known = this.baseModels.get(g);
    if (known) return known;
    let model = this.c.initialModel;
    if (g >= 0) {
      model = model.resized(all[g]!.size);
      for (let k = 0; k <= g; k++) {
        const s = all[k]!;
        // a resize, or a snapshot applied with another size
        if (s.size !== model.length) model = model.resized(s.size);
        // past the end (a shrink came later): nothing of it stays
        model.copyFrom(s.content, s.lo, Math.min(s.hi, model.length));
      }
    }
    const r = { g, model };
    this.baseModels.set(g, r);
    return r;
  }

  /** What a state's sectors may read: the content at its last guest flush, the guest operations begun since, the sizes the disk may have. */
  private rules(st: { durableAt: number; crashPoint: number }): { model: GuestModel; later: Step[]; sizes: Set<number>; minSize: number } {
    const key = `${st.durableAt}:${st.crashPoint}`;
    const known = this.ruleSets.get(key);
    if (known) return known;
    const { g, model } = this.baseModel(st.durableAt);
    const later = this.c.steps.slice(g + 1).filter((s) => s.devStart < st.crashPoint);
    const sizes = new Set([model.length, ...later.map((s) => s.size)]);
    const r = { model, later, sizes, minSize: Math.min(...sizes) };
    this.ruleSets.set(key, r);
    return r;
  }

  /** (b) and (c) for a guest range that reads as zeros, without comparing the blocks that were zero at the last flush, nor any past every size the disk had (it grew over them). */
  private judgeZeros(lo: number, hi: number, size: number, st: { epoch: number; durableAt: number; crashPoint: number }): string | undefined {
    const { model, minSize } = this.rules(st);
    hi = Math.min(hi, Math.ceil(minSize / SECTOR) * SECTOR);
    for (let x = lo; x < hi; ) {
      const b = Math.floor(x / BLOCK);
      const end = Math.min(hi, (b + 1) * BLOCK);
      if (!(end <= model.length && model.blockIsZero(b))) {
        const problem = this.judgeData(ZEROS.subarray(0, end - x), x, size, st);
        if (problem) return problem;
      }
      x = end;
    }
    return undefined;
  }

  /**
   * (b) and (c) for guest bytes [at, at + got.length) of a disk of `size`
   * bytes: each sector reads as at the last guest flush the state's durable
   * point covers, or as after one of the guest operations since that had
   * begun at the crash.
   */
  judgeData(got: Uint8Array, at: number, size: number, st: { epoch: number; durableAt: number; crashPoint: number }): string | undefined {
    const { model: B, later, sizes, minSize } = this.rules(st);
    if (!sizes.has(size)) return `virtual size ${size} is none of ${[...sizes].join(', ')}`;
    const G = asBuffer(got);
    const end0 = at + got.length;
    for (let x0 = at; x0 < end0; ) {
      const x1 = Math.min(end0, (Math.floor(x0 / BLOCK) + 1) * BLOCK);
      // most blocks read exactly as at the last flush: one comparison for all their sectors
      // a block of zeros past every earlier size: the disk grew over it
      if (B.equals(G, x0 - at, x0, x1) || (x0 >= minSize && isZero(got.subarray(x0 - at, x1 - at)))) {
        x0 = x1;
        continue;
      }
      for (let x = x0; x < x1; x += SECTOR) {
        const end = Math.min(end0, x + SECTOR);
        if (B.equals(G, x - at, x, end)) continue;
        let ok = false;
        for (const s of later) {
          if (x >= s.lo && end <= s.hi && s.content.equals(G, x - at, x, end)) {
            ok = true;
            break;
          }
        }
        // a sector beyond every earlier size reads as zero when the disk grew
        if (!ok && x >= minSize && isZero(got.subarray(x - at, end - at))) ok = true;
        if (!ok) {
          return `guest sector at 0x${x.toString(16)} reads neither its content at the last completed flush nor any later write (first bytes ${G.subarray(x - at, x - at + 8).toString('hex')})`;
        }
      }
      x0 = x1;
    }
    return undefined;
  }
}

/**
 * Guest ranges where a state can read otherwise than its epoch's durable
 * image: its status runs against the durable image's, and where they agree,
 * the bytes mapped to host ranges the pending writes touch (compressed runs
 * always: their host extent is not in the status).
 */
export function suspects(ref: readonly Run[], now: readonly Run[], pending: ReadonlyArray<readonly [number, number]>): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  const add = (a: number, b: number) => void out.push([a, b]);
  let i = 0;
  let j = 0;
  let x = 0;
  while (i < ref.length && j < now.length) {
    const a = ref[i]!;
    const b = now[j]!;
    const end = Math.min(a.end, b.end);
    const sameHost = a.host === undefined ? b.host === undefined : b.host !== undefined && a.host - a.start === b.host - b.start;
    if (a.type !== b.type || !sameHost || a.type === 'compressed') add(x, end);
    else if (readsHost(a.type) && a.host !== undefined) {
      const h0 = a.host + (x - a.start);
      const h1 = h0 + (end - x);
      for (const [p, q] of pending) {
        if (q <= h0) continue;
        if (p >= h1) break;
        add(x + Math.max(0, p - h0), x + Math.min(h1, q) - h0);
      }
    }
    x = end;
    if (a.end === end) i++;
    if (b.end === end) j++;
  }
  return mergeRanges(out);
}

/** A Buffer view of the same bytes (no copy), for its native compare. */
function asBuffer(a: Uint8Array): Buffer {
  return Buffer.isBuffer(a) ? a : Buffer.from(a.buffer, a.byteOffset, a.length);
}
