/**
 * The crash-injection harness: run a guest workload on an in-memory image
 * through a recording device, materialise the crash states the recording
 * allows (src/io/crash-device.ts), and apply the oracles to each:
 *
 *  (a) no corruption: the checker finds no corruption and no check error
 *      (leaks are allowed); an image left dirty by lazy refcounts is judged
 *      after the recovery of (d) instead;
 *  (b) every sector acknowledged by a completed guest flush reads back as
 *      it was then, and
 *  (c) every sector written after it reads back as its content at that
 *      flush or after one of the later guest operations, never anything
 *      else (no stale data from another guest location);
 *  (d) a read-write open (which replays the journal, or rebuilds refcounts
 *      of a dirty image) and a close leave no corruption, and with the
 *      journal on (v3 images) no leaked cluster either, and after a
 *      replay (b) and (c) hold as well (the journal may complete or drop a
 *      transaction, never mix another location's data in);
 *  (e) on a sample of states, `qemu-img check` exits 0 or 3;
 *  (f) a persistent bitmap the state holds as not in use marks every
 *      granule whose content differs from what it was when the bitmap was
 *      added (checked for bitmaps never cleared, disabled or resized since,
 *      and no snapshot apply, make_empty or amend after their add).
 *
 * One finding is told apart rather than failed: in a workload with snapshot
 * operations, COPIED clear on a cluster with one reference (a crash between
 * a snapshot's refcount change and its COPIED change, which no order avoids
 * without the journal; reads and writes are right, a write copies first).
 * It counts in `copiedClear`; after the journal's recovery (d) it is a
 * failure like any other.
 *
 * The judging is crash-judge.ts's: it saves the work states share (memos,
 * one reading of each epoch's durable image) and gives the verdicts the
 * plain oracles give (`thorough` turns the savings off, for the tests).
 */

import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryDevice } from '../io/memory-device.ts';
import { RecordingDevice, crashStates, touchedRanges } from '../io/crash-device.ts';
import { u64big } from '../format/bytes.ts';
import { readGuest } from '../engine/read.ts';
import { guest, type Layer } from '../engine/layer.ts';
import { checkDevice } from '../engine/check/check.ts';
import { createOnDevice, openWriterOnDevice } from '../engine/writable.ts';
import type { CreateOptions } from '../engine/create.ts';
import { faultPlan, type Fault } from '../engine/faults.ts';
import type { GuestOp } from './workload.ts';
import { makeEmptyFast } from '../engine/make-empty-fast.ts';
import { CorruptionError, QledgerError } from '../errors.ts';
import { StateJudge, readsZero, statusRuns, type Step } from './crash-judge.ts';
import type { PagedDevice } from '../io/paged-device.ts';
import { amendDevice, flattenCopy, namesBacking } from './offline-ops.ts';
import { CrashBase, memLayer } from './chain-base.ts';
import { GuestModel } from './guest-model.ts';
import { switchBacking } from '../engine/rebase.ts';

export { parseWorkload, reproduction, workloadCommands, type GuestOp } from './workload.ts';

export interface CrashTestOptions {
  /** the image: qemu-img create options (size included) */
  readonly create: CreateOptions;
  /** backing file bytes (the image is created over it, named backing.raw or backing.qcow2) */
  readonly backing?: Uint8Array | undefined;
  /** the backing file's format (default raw) */
  readonly backingFormat?: 'raw' | 'qcow2' | undefined;
  /** start from these image bytes (a QEMU-made image, say) instead of creating one */
  readonly image?: Uint8Array | undefined;
  readonly maxStates: number;
  readonly seed: number;
  readonly fault?: Fault | undefined;
  /** run qemu-img check on this many states (0: none) */
  readonly qemuSamples?: number | undefined;
  /** stop at the first failing state */
  readonly stopAtFirst?: boolean | undefined;
  /** keep a durable journal in the workload's session (default on; v2 images never have one) */
  readonly journal?: boolean | undefined;
  /** journal area size (default 64 KiB: small in-memory images, and big write-backs take the unjournalled path) */
  readonly journalBytes?: number | undefined;
  /** every session opens with content dedup (implied by a workload with a `dedup` line) */
  readonly dedup?: boolean | undefined;
  /** judge every state from scratch, without the harness's savings (crash-judge.ts): for testing the harness itself */
  readonly thorough?: boolean | undefined;
  /** judge only the states numbered index, index + count, … (threads share a workload this way) */
  readonly partition?: { readonly index: number; readonly count: number } | undefined;
}

export interface CrashFailure {
  readonly state: string;
  readonly problem: string;
}

export interface CrashTestResult {
  readonly states: number;
  /** states with corruption found by (a), (d) or (e) */
  readonly corruptions: number;
  /** states with data that broke (b)/(c) */
  readonly dataErrors: number;
  /** states with leaked clusters (allowed) */
  readonly leaks: number;
  /** states that still had leaked clusters after the journal's recovery (counted in corruptions too) */
  readonly leaksAfterRecovery: number;
  /** states whose read-write open (d) replayed a journal transaction */
  readonly replayed: number;
  /** states whose only finding besides leaks was COPIED clear on a cluster with one reference (snapshot workloads; see above) */
  readonly copiedClear: number;
  readonly failures: CrashFailure[];
  /**
   * The overlap index refused a write and the workload stopped there (a
   * fault that breaks the allocator or the table cache; write/overlap.ts):
   * its message. The states up to the refusal are judged as usual.
   */
  readonly refusal?: string | undefined;
  readonly seconds: number;
  /** device operations the workload produced */
  readonly deviceOps: number;
  /** how the oracles' work was saved (crash-judge.ts): runs of (a) and (d) and verdicts reused, guest bytes read, states read whole */
  readonly memo?: { checkRuns: number; checkHits: number; recoveryRuns: number; recoveryHits: number; guestBytes: number; wholeReads: number } | undefined;
}

/** The counters of a crash test, added up over several workloads by `addCounts`. */
export type CrashCounts = { -readonly [K in 'states' | 'corruptions' | 'dataErrors' | 'leaks' | 'leaksAfterRecovery' | 'replayed' | 'copiedClear' | 'seconds']: CrashTestResult[K] };

export function emptyCounts(): CrashCounts {
  return { states: 0, corruptions: 0, dataErrors: 0, leaks: 0, leaksAfterRecovery: 0, replayed: 0, copiedClear: 0, seconds: 0 };
}

export function addCounts(into: CrashCounts, r: CrashCounts): void {
  for (const k of Object.keys(into) as Array<keyof CrashCounts>) into[k] += r[k];
}

const SECTOR = 512;

/**
 * Run one workload and judge every crash state within the budget: each
 * state must check without corruption (leaks allowed), read back what was
 * flushed, and, with the journal, recover to no leak at all.
 *
 * @example
 * import { crashTest } from 'qledger';
 *
 * const r = await crashTest(
 *   [
 *     { op: 'write', offset: 0, length: 65536, pattern: 1 },
 *     { op: 'flush' },
 *     { op: 'discard', offset: 0, length: 65536 },
 *     { op: 'write', offset: 1 << 20, length: 4096, pattern: 2 },
 *   ],
 *   { create: { size: 8 << 20, clusterSize: 4096 }, maxStates: 200, seed: 1 },
 * );
 * console.log(r.states > 0, r.corruptions, r.dataErrors, r.leaksAfterRecovery); // true 0 0 0
 */
export async function crashTest(ops: readonly GuestOp[], o: CrashTestOptions): Promise<CrashTestResult> {
  const t0 = process.hrtime.bigint();
  const name = 'crash.qcow2';
  const base = new MemoryDevice(name);
  const bfmt = o.backingFormat ?? 'raw';
  const bname = `backing.${bfmt}`;
  // opened once: it is read-only, and closing a layer over memory devices releases nothing
  // the backing file, recorded: a commit writes into it (chain-base.ts)
  const chainBase = o.backing ? new CrashBase(bname, o.backing, bfmt) : undefined;
  // a rebase onto no backing file (rebase_flatten) ends it for the sessions after it
  let flattened = false;
  const backingLayer = async () => (flattened ? undefined : chainBase?.current());
  // a crash state's own header says whether it has the backing file still; a commit says which state of it
  const stateBacking = async (dev: PagedDevice, crashPoint: number) => {
    const head = new Uint8Array(16);
    dev.copyOut(head, 0);
    return namesBacking(head) ? chainBase?.at(crashPoint) : undefined;
  };
  if (o.image) await base.write(0, o.image);
  else {
    const create = o.backing ? { ...o.create, backingFile: bname, backingFormat: bfmt } : o.create;
    await createOnDevice(base, name, create, await backingLayer());
  }
  const initial = base.snapshot();
  // what the backing file reads as (a discard on v2 shows it again)
  let backingGuest: GuestModel | undefined;
  if (o.backing) backingGuest = await modelOf((await backingLayer())!);

  // ---- run the workload, keeping the guest model ----
  const rec = new RecordingDevice(name, initial);
  // a tiny table cache: tables are evicted and reloaded at every write-back
  const journal = o.journal ?? true;
  // dedup shares clusters between active entries: the COPIED state a snapshot operation may leave, a share may too
  const dedupWorkload = o.dedup === true || ops.some((x) => x.op === 'dedup');
  const session = async () => openWriterOnDevice(rec, name, { fault: o.fault, backing: await backingLayer(), cacheBytes: 0, journal, journalBytes: o.journalBytes ?? 64 * 1024, dedup: dedupWorkload });
  let w = await session();
  const cs = w.geometry.clusterSize;
  // no journal on v2 images, nor where the header cluster has no room for its extension (512-byte clusters)
  // an amend of compat may change both mid-workload: a v2 image has no journal, so leaks stay allowed
  let journalled = w.journalled;
  let v2 = (u64big(initial, 4) >> 32n) === 2n;
  let model = await modelOf(await memLayer(name, initial, 'qcow2', await backingLayer()));
  const initialModel = model.clone();
  const steps: Step[] = [];
  let refusal: string | undefined;
  // the snapshots the workload made, in table order, with the guest content each holds
  const snaps: { name: string; content: GuestModel; backing: GuestModel | undefined }[] = [];
  const snapshotWorkload = ops.some((o) => o.op === 'snapshot') || dedupWorkload;
  // (f): each bitmap the workload added, the guest content then, and whether the oracle still applies to it
  const bitmapRefs = new Map<string, { content: Uint8Array; checkable: boolean }>();
  const bitmapNames = new Set<string>();
  const uncheckAll = () => {
    for (const b of bitmapRefs.values()) b.checkable = false;
  };
  for (const op of ops) {
    const devStart = rec.ops.length;
    let lo = 0;
    let hi = 0;
    try {
      switch (op.op) {
        case 'write':
          await w.write(op.offset, new Uint8Array(op.length).fill(op.pattern));
          model.fill(op.pattern, op.offset, op.offset + op.length);
          [lo, hi] = [op.offset, op.offset + op.length];
          break;
        case 'compress': {
          // refused clusters (already holding data) leave the guest unchanged; the
          // model takes what the image reads afterwards, cluster by cluster
          try {
            await w.writeCompressed(op.offset, new Uint8Array(op.length).fill(op.pattern));
          } catch (e) {
            if (!(e instanceof QledgerError) || (e.code !== 'E_IO' && e.code !== 'E_RANGE')) throw e;
          }
          const after = new Uint8Array(op.length);
          await w.read(op.offset, after);
          model.zero(op.offset, op.offset + op.length);
          model.set(after, op.offset);
          [lo, hi] = [op.offset, op.offset + op.length];
          break;
        }
        case 'zero':
          await w.writeZeroes(op.offset, op.length, { unmap: op.unmap });
          model.zero(op.offset, op.offset + op.length);
          [lo, hi] = [op.offset, op.offset + op.length];
          break;
        case 'discard': {
          await w.discard(op.offset, op.length);
          const end = op.offset + op.length;
          lo = Math.ceil(op.offset / cs) * cs;
          hi = end === model.length ? end : end - (end % cs);
          for (let c = lo; c < hi; c += cs) {
            const to = Math.min(hi, c + cs);
            if (v2 && backingGuest) model.copyFrom(backingGuest, c, to);
            else model.zero(c, to);
          }
          hi = Math.max(lo, hi);
          break;
        }
        case 'flush':
          await w.flush();
          break;
        case 'reopen':
          await w.close();
          w = await session();
          break;
        case 'bitmap': {
          try {
            if (op.action === 'add') await w.bitmaps.add(op.name, { granularity: op.granularity });
            else await w.bitmaps[op.action](op.name);
          } catch (e) {
            // a name taken or not there, an inconsistent bitmap, a v2 image: refused before any record
            if (!(e instanceof QledgerError) || (e.code !== 'E_USAGE' && e.code !== 'E_UNSUPPORTED')) throw e;
            break;
          }
          // a name used twice is not judged: a state may hold either bitmap of that name
          if (op.action === 'add') {
            bitmapRefs.set(op.name, { content: model.bytes(), checkable: !bitmapNames.has(op.name) });
            bitmapNames.add(op.name);
          } else if (op.action === 'remove') bitmapRefs.delete(op.name);
          else {
            const b = bitmapRefs.get(op.name);
            if (b) b.checkable = false;
          }
          break;
        }
        case 'make-empty': {
          uncheckAll();
          // every mapping dropped: the image reads as its backing file (or zeros) again
          if (op.offline) {
            // as qledger commit runs it: between sessions, the session's path where the O(1) one does not apply
            await w.close();
            const done = await makeEmptyFast(rec, { skipFlush: faultPlan(o.fault)?.emptySwitchEarly });
            w = await session();
            if (!done) await w.makeEmpty();
          } else await w.makeEmpty();
          model = new GuestModel(model.length);
          if (backingGuest) model.copyFrom(backingGuest, 0, model.length);
          [lo, hi] = [0, model.length];
          break;
        }
        case 'snapshot': {
          const at = snaps.findIndex((s) => s.name === op.name);
          try {
            if (op.action === 'create') {
              await w.createSnapshot(op.name);
              snaps.push({ name: op.name, content: model.clone(), backing: backingGuest });
            } else if (op.action === 'delete') {
              await w.deleteSnapshot(op.name, true);
              if (at >= 0) snaps.splice(at, 1);
            } else {
              uncheckAll();
              await w.applySnapshot(op.name);
              // the disk reads as the snapshot did, its size included; but a snapshot keeps no backing
              // file of its own: where its tree allocates nothing it reads as the image's backing file
              // now, which a rebase or a commit since its creation may have changed (as in QEMU)
              if (at >= 0) {
                const snap = snaps[at]!;
                model = snap.backing === backingGuest ? snap.content.clone() : await overCurrentBacking(snap.content, await memLayer(name, rec.snapshot(), 'qcow2', await backingLayer()), backingGuest);
              }
              [lo, hi] = [0, model.length];
            }
          } catch (e) {
            // a name not there, or refcounts too narrow for one more tree (1-bit): refused before any record
            if (!(e instanceof QledgerError) || (e.code !== 'E_NOT_FOUND' && e.code !== 'E_OVERFLOW')) throw e;
          }
          break;
        }
        case 'dedup': {
          // offline dedup: a few tables per transaction; the guest content does not change
          const n = w.state.header.l1Size;
          for (let i = 0; i < n; i += 2) await w.dedupTables(i, Math.min(n, i + 2));
          await w.flush();
          break;
        }
        case 'commit': {
          // qemu-img commit into the backing file, then the top emptied; once per workload
          if (!chainBase || chainBase.committed || !namesBacking(rec.snapshot())) break;
          uncheckAll();
          w = await chainBase.commit(w, () => rec.ops.length, session, faultPlan(o.fault)?.commitEmptyEarly === true);
          const b = await chainBase.current();
          backingGuest = await modelOf(b);
          [lo, hi] = [0, model.length];
          break;
        }
        case 'rebase': {
          // qemu-img rebase [-u] -b '' : onto no backing file; an image without one has nothing to change
          if (!namesBacking(rec.snapshot())) break;
          // safe: the differences copied through the session (its close makes them durable), then the switch (the fault: the other way round)
          const late = op.unsafe ? [] : await flattenCopy(w, faultPlan(o.fault)?.rebaseSwitchEarly === true);
          await w.close();
          await switchBacking(rec, name, undefined, undefined);
          flattened = true;
          backingGuest = undefined;
          w = await session();
          for (const [at, bytes] of late) await w.write(at, bytes);
          if (late.length) await w.flush();
          if (op.unsafe) {
            // the image's own content only: where it allocated nothing it reads zeros now
            uncheckAll();
            model = new GuestModel(w.size);
            const buf = new Uint8Array(1 << 20);
            for (let at = 0; at < w.size; at += buf.length) {
              const piece = buf.subarray(0, Math.min(buf.length, w.size - at));
              await w.read(at, piece);
              model.set(piece, at);
            }
          }
          [lo, hi] = [0, model.length];
          break;
        }
        case 'amend': {
          uncheckAll();
          // between sessions, as qemu-img amend runs: the session closes clean, the rewrite runs, a new one opens
          await w.close();
          const done = await amendDevice(rec, op, backingLayer, faultPlan(o.fault));
          w = await session();
          if (done && op.option === 'compat') {
            v2 = op.value === '0.10';
            if (v2) journalled = false;
          }
          break;
        }
        case 'truncate': {
          uncheckAll();
          try {
            await w.truncate(op.size);
          } catch (e) {
            // v2 with snapshots: refused before any record, as QEMU refuses it
            if (!(e instanceof QledgerError) || e.code !== 'E_UNSUPPORTED') throw e;
            break;
          }
          if (op.size < model.length) {
            // A shrink drops the mappings past the new end before the header's size
            // changes (as QEMU's does): a crash between shows the old size, with the
            // forfeited range reading as zeros or, over a backing file, as the
            // backing data there, as after a discard of it.
            const from = Math.floor(op.size / SECTOR) * SECTOR;
            const zeros = new GuestModel(model.length);
            const shown = new GuestModel(model.length);
            if (backingGuest) shown.copyFrom(backingGuest, from, Math.min(backingGuest.length, model.length));
            for (const content of [zeros, shown]) steps.push({ op: { op: 'discard', offset: from, length: model.length - from }, devStart, devEnd: rec.ops.length, lo: from, hi: model.length, content, size: model.length });
          }
          [lo, hi] = [Math.min(model.length, op.size), op.size];
          model = model.resized(op.size);
          break;
        }
      }
    } catch (e) {
      if (!isRefusal(e)) throw e;
      // The write never reached the device; what the operation wrote before it may have.
      refusal = (e as Error).message;
      if (op.op === 'write') {
        model.fill(op.pattern, op.offset, op.offset + op.length);
        [lo, hi] = [op.offset, op.offset + op.length];
      } else if (op.op === 'truncate') {
        // refused in its write-back after the journal had the transaction: a recovery completes it
        [lo, hi] = [Math.min(model.length, op.size), op.size];
        model = model.resized(op.size);
      }
    }
    // whole sectors: a partial-sector write leaves the rest of its sector as it was
    lo = Math.floor(lo / SECTOR) * SECTOR;
    hi = Math.min(model.length, Math.ceil(hi / SECTOR) * SECTOR);
    // the step's content: the model's blocks in its range (a whole-disk step keeps the whole model)
    const content = new GuestModel(model.length);
    content.copyFrom(model, lo, Math.max(lo, hi));
    steps.push({ op, devStart, devEnd: rec.ops.length, lo, hi: Math.max(lo, hi), content, size: model.length });
    if (refusal) break;
  }
  // a refusal marked the image corrupt: the session is over, nothing more is written
  if (!refusal) {
    try {
      await w.close();
    } catch (e) {
      if (!isRefusal(e)) throw e;
      refusal = (e as Error).message;
    }
  }
  if (refusal) await w.abandon();

  // ---- judge the crash states ----
  const failures: CrashFailure[] = [];
  let states = 0;
  let corruptions = 0;
  let dataErrors = 0;
  let leaks = 0;
  let leaksAfterRecovery = 0;
  let replayed = 0;
  let copiedClear = 0;
  const judge = new StateJudge({
    name,
    steps,
    ops: rec.ops,
    initialModel,
    journal,
    journalled,
    journalBytes: o.journalBytes ?? 64 * 1024,
    snapshotWorkload,
    bitmapRefs,
    backing: (st) => stateBacking(st.device, st.crashPoint),
    backingFixed: !chainBase?.committed,
    written: touchedRanges(rec.ops, initial.length),
    thorough: o.thorough,
  });
  let qemuLeft = o.qemuSamples ?? 0;
  const tmp = qemuLeft > 0 ? mkdtempSync(join(tmpdir(), 'qledger-crash-')) : undefined;
  const part = o.partition ?? { index: 0, count: 1 };
  let k = -1;
  try {
    for (const st of crashStates(initial, rec.ops, { maxStates: o.maxStates, seed: o.seed })) {
      // states partitioned by number between threads (each runs the same workload)
      if (++k % part.count !== part.index) continue;
      states++;
      const fail = (problem: string, kind: 'corruption' | 'data') => {
        if (kind === 'corruption') corruptions++;
        else dataErrors++;
        failures.push({ state: st.description, problem });
      };
      const before = failures.length;
      const v = await judge.judge(st);
      for (const p of v.problems) fail(p.problem, p.kind);
      if (v.leaks) leaks++;
      if (v.replayed) replayed++;
      if (v.leaksAfterRecovery) leaksAfterRecovery++;
      copiedClear += v.copiedClear;
      // (e)
      if (tmp && qemuLeft > 0 && !v.dirty) {
        qemuLeft--;
        const f = join(tmp, 'state.qcow2');
        const image = st.image;
        writeFileSync(f, image);
        if (o.backing) writeFileSync(join(tmp, bname), o.backing);
        const q = spawnSync('qemu-img', ['check', f], { encoding: 'utf8' });
        const harmless = q.status === 2 && snapshotWorkload && /OFLAG_COPIED/.test(q.stderr + q.stdout) && judge.onlyCopiedClear(await checkDevice(new MemoryDevice(name, image, { readOnly: true }), name));
        if (q.status !== 0 && q.status !== 3 && !harmless) fail(`qemu-img check exit ${q.status}: ${(q.stdout + q.stderr).trim().split('\n').slice(0, 3).join('; ')}`, 'corruption');
      }
      if (o.stopAtFirst && failures.length > before) break;
    }
    // the commit's copy: the top as it was then over each crash state of the backing file (the first thread's share)
    const copy = part.index === 0 ? await chainBase?.judgeCopy(name, initial, rec.ops, Math.max(8, Math.floor(o.maxStates / 4)), o.seed) : undefined;
    if (copy && !(o.stopAtFirst && failures.length)) {
      states += copy.states;
      dataErrors += copy.failures.length;
      failures.push(...copy.failures);
    }
  } finally {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  }
  return { states, corruptions, dataErrors, leaks, leaksAfterRecovery, replayed, copiedClear, failures, refusal, seconds: Number(process.hrtime.bigint() - t0) / 1e9, deviceOps: rec.ops.length, memo: { ...judge.memoFigures, guestBytes: judge.guestBytes, wholeReads: judge.wholeReads } };
}

/** A layer's guest content as a model, read where it is not zeros (so a large sparse disk costs what it holds). */
async function modelOf(layer: Layer): Promise<GuestModel> {
  const m = new GuestModel(layer.size);
  const buf = new Uint8Array(1 << 20);
  for (const r of await statusRuns(layer)) {
    if (readsZero(r.type, layer)) continue;
    for (let x = r.start; x < r.end; x += buf.length) {
      const piece = buf.subarray(0, Math.min(buf.length, r.end - x));
      await readGuest(layer, guest(x), piece);
      m.set(piece, x);
    }
  }
  return m;
}

/**
 * A snapshot's content once applied over a backing file other than the one
 * it was taken over: its recorded content where the applied tree (`top`,
 * the image after the apply) allocates, the backing file's now (or zeros)
 * elsewhere. Only the tree's allocation comes from the image.
 */
async function overCurrentBacking(content: GuestModel, top: Layer, backing: GuestModel | undefined): Promise<GuestModel> {
  const m = new GuestModel(content.length);
  for (const r of await statusRuns(top)) {
    const end = Math.min(r.end, m.length);
    if (r.start >= end) continue;
    if (r.type === 'unallocated-plain' || r.type === 'unallocated-alloc') {
      if (backing) m.copyFrom(backing, r.start, Math.min(end, backing.length));
    } else m.copyFrom(content, r.start, end);
  }
  return m;
}

/** The overlap index's refusal (overlap-guard.ts): a CorruptionError in QEMU's words. */
function isRefusal(e: unknown): boolean {
  return e instanceof CorruptionError && /Preventing invalid write/.test(e.message);
}
