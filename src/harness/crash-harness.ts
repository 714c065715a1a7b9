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
 *      journal on (v3 images) no leaked cluster either;
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
 */

import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryDevice } from '../io/memory-device.ts';
import { RecordingDevice, crashStates } from '../io/crash-device.ts';
import { isZero, u64big } from '../format/bytes.ts';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../format/features.ts';
import { readGuest } from '../engine/read.ts';
import { guest } from '../engine/layer.ts';
import { checkDevice } from '../engine/check/check.ts';
import { createOnDevice, openSession, openWriterOnDevice } from '../engine/writable.ts';
import type { CreateOptions } from '../engine/create.ts';
import { faultPlan, type Fault } from '../engine/faults.ts';
import type { GuestOp } from './workload.ts';
import { makeEmptyFast } from '../engine/make-empty-fast.ts';
import { CorruptionError, QledgerError } from '../errors.ts';
import { judgeBitmaps } from './bitmap-oracle.ts';
import { amendDevice, flattenCopy, namesBacking } from './offline-ops.ts';
import { CrashBase, memLayer } from './chain-base.ts';
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

interface Step {
  readonly op: GuestOp;
  readonly devStart: number;
  readonly devEnd: number;
  /** guest range the op changed and its content afterwards */
  readonly lo: number;
  readonly content: Uint8Array;
  readonly size: number;
}

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
  const stateBacking = async (image: Uint8Array, crashPoint: number) => (namesBacking(image) ? chainBase?.at(crashPoint) : undefined);
  if (o.image) await base.write(0, o.image);
  else {
    const create = o.backing ? { ...o.create, backingFile: bname, backingFormat: bfmt } : o.create;
    await createOnDevice(base, name, create, await backingLayer());
  }
  const initial = base.snapshot();
  // what the backing file reads as (a discard on v2 shows it again)
  let backingGuest: Uint8Array | undefined;
  if (o.backing) {
    const l = (await backingLayer())!;
    backingGuest = new Uint8Array(l.size);
    await readGuest(l, guest(0), backingGuest);
  }

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
  let model = new Uint8Array(w.size);
  await w.read(0, model);
  const initialModel = model.slice();
  const steps: Step[] = [];
  let refusal: string | undefined;
  // the snapshots the workload made, in table order, with the guest content each holds
  const snaps: { name: string; content: Uint8Array }[] = [];
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
          model.set(after, op.offset);
          [lo, hi] = [op.offset, op.offset + op.length];
          break;
        }
        case 'zero':
          await w.writeZeroes(op.offset, op.length, { unmap: op.unmap });
          model.fill(0, op.offset, op.offset + op.length);
          [lo, hi] = [op.offset, op.offset + op.length];
          break;
        case 'discard': {
          await w.discard(op.offset, op.length);
          const end = op.offset + op.length;
          lo = Math.ceil(op.offset / cs) * cs;
          hi = end === model.length ? end : end - (end % cs);
          for (let c = lo; c < hi; c += cs) {
            const to = Math.min(hi, c + cs);
            if (v2 && backingGuest) {
              model.fill(0, c, to);
              model.set(backingGuest.subarray(c, Math.min(to, backingGuest.length)), c);
            } else model.fill(0, c, to);
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
            bitmapRefs.set(op.name, { content: model.slice(), checkable: !bitmapNames.has(op.name) });
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
          model = new Uint8Array(model.length);
          if (backingGuest) model.set(backingGuest.subarray(0, Math.min(backingGuest.length, model.length)));
          [lo, hi] = [0, model.length];
          break;
        }
        case 'snapshot': {
          const at = snaps.findIndex((s) => s.name === op.name);
          try {
            if (op.action === 'create') {
              await w.createSnapshot(op.name);
              snaps.push({ name: op.name, content: model.slice() });
            } else if (op.action === 'delete') {
              await w.deleteSnapshot(op.name, true);
              if (at >= 0) snaps.splice(at, 1);
            } else {
              uncheckAll();
              await w.applySnapshot(op.name);
              // the disk reads as the snapshot did, its size included
              if (at >= 0) model = snaps[at]!.content.slice();
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
          backingGuest = new Uint8Array(b.size);
          await readGuest(b, guest(0), backingGuest);
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
            model = new Uint8Array(w.size);
            await w.read(0, model);
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
            const zeros = new Uint8Array(model.length - from);
            const shown = zeros.slice();
            if (backingGuest) shown.set(backingGuest.subarray(from, Math.min(backingGuest.length, model.length)));
            for (const content of [zeros, shown]) steps.push({ op: { op: 'discard', offset: from, length: model.length - from }, devStart, devEnd: rec.ops.length, lo: from, content, size: model.length });
          }
          const next = new Uint8Array(op.size);
          next.set(model.subarray(0, Math.min(model.length, op.size)));
          [lo, hi] = [Math.min(model.length, op.size), op.size];
          model = next;
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
      }
    }
    // whole sectors: a partial-sector write leaves the rest of its sector as it was
    lo = Math.floor(lo / SECTOR) * SECTOR;
    hi = Math.min(model.length, Math.ceil(hi / SECTOR) * SECTOR);
    steps.push({ op, devStart, devEnd: rec.ops.length, lo, content: model.slice(lo, Math.max(lo, hi)), size: model.length });
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
  /** guest content at each completed guest flush, computed once */
  const baseModels = new Map<number, Uint8Array>();
  const failures: CrashFailure[] = [];
  let states = 0;
  let corruptions = 0;
  let dataErrors = 0;
  let leaks = 0;
  let leaksAfterRecovery = 0;
  let replayed = 0;
  let copiedClear = 0;
  /** the one finding a snapshot workload may leave besides leaks (see the module comment) */
  const onlyCopiedClear = (r: { corruptions: number; checkErrors: number; findings: ReadonlyArray<{ counts: string; copiedClear?: boolean | undefined }> }) =>
    snapshotWorkload && r.checkErrors === 0 && r.corruptions > 0 && r.findings.every((f) => f.counts === 'leak' || f.counts === 'none' || f.copiedClear === true);
  let qemuLeft = o.qemuSamples ?? 0;
  const tmp = qemuLeft > 0 ? mkdtempSync(join(tmpdir(), 'qledger-crash-')) : undefined;
  try {
    for (const st of crashStates(initial, rec.ops, { maxStates: o.maxStates, seed: o.seed })) {
      states++;
      const fail = (problem: string, kind: 'corruption' | 'data') => {
        if (kind === 'corruption') corruptions++;
        else dataErrors++;
        failures.push({ state: st.description, problem });
      };
      const before = failures.length;
      const dirty = (u64big(st.image, 72) & INCOMPAT_DIRTY) !== 0n && (u64big(st.image, 4) >> 32n) === 3n;
      // (a)
      if (!dirty) {
        try {
          const r = await checkDevice(new MemoryDevice(name, st.image, { readOnly: true }), name);
          if (onlyCopiedClear(r)) copiedClear++;
          else if (r.corruptions || r.checkErrors) fail(`check: ${r.corruptions} corruptions, ${r.checkErrors} check errors: ${r.findings.filter((f) => f.counts !== 'leak').map((f) => f.message).slice(0, 3).join('; ')}`, 'corruption');
          if (r.leaks) leaks++;
        } catch (e) {
          fail(`check failed: ${(e as Error).message}`, 'corruption');
        }
      }
      // (b) and (c)
      try {
        const layer = await memLayer(name, st.image, 'qcow2', await stateBacking(st.image, st.crashPoint));
        const got = new Uint8Array(layer.size);
        await readGuest(layer, guest(0), got);
        const problem = judgeData(got, st.image.length ? st : st, steps, initialModel);
        if (problem) fail(problem, 'data');
        // (f)
        const missed = bitmapRefs.size ? await judgeBitmaps(layer, got, bitmapRefs) : undefined;
        if (missed) fail(missed, 'data');
      } catch (e) {
        fail(`read failed: ${(e as Error).message}${process.env['QLEDGER_DEBUG'] ? (e as Error).stack : ''}`, 'corruption');
      }
      // (d); an image marked corrupt (after a refusal) must be refused read-write, as QEMU refuses it
      const markedCorrupt = (u64big(st.image, 72) & INCOMPAT_CORRUPT) !== 0n && (u64big(st.image, 4) >> 32n) === 3n;
      if (markedCorrupt) {
        const opened = await openSession(new MemoryDevice(name, st.image), undefined, name, await stateBacking(st.image, st.crashPoint), { journal }).then(
          async (x) => {
            await x.writer.abandon();
            return true;
          },
          () => false,
        );
        if (opened) fail('an image marked corrupt was opened read-write', 'corruption');
      } else {
        try {
          const dev = new MemoryDevice(name, st.image);
          const warnings: string[] = [];
          const { writer: rw, recovery } = await openSession(dev, undefined, name, await stateBacking(st.image, st.crashPoint), { journal, journalBytes: o.journalBytes ?? 64 * 1024, onWarning: (m) => warnings.push(m) });
          if (recovery.action === 'replayed') replayed++;
          // a journal qledger wrote and a crash cut is never invalid
          if (recovery.action === 'ignored') fail(`the journal was ignored: ${warnings.join('; ')}`, 'corruption');
          await rw.close();
          const r = await checkDevice(new MemoryDevice(name, dev.snapshot(), { readOnly: true }), name);
          // without the journal nothing completes a snapshot operation cut short: its harmless COPIED finding stays
          if (!journalled && onlyCopiedClear(r)) copiedClear++;
          else if (r.corruptions || r.checkErrors) fail(`after a read-write open: ${r.corruptions} corruptions: ${r.findings.filter((f) => f.counts !== 'leak').map((f) => f.message).slice(0, 3).join('; ')}`, 'corruption');
          else if (r.leaks && journalled) {
            leaksAfterRecovery++;
            fail(`after the journal's recovery: ${r.leaks} leaked clusters: ${r.findings.filter((f) => f.counts === 'leak').map((f) => f.message).slice(0, 3).join('; ')}`, 'corruption');
          }
        } catch (e) {
          fail(`read-write open failed: ${(e as Error).message}`, 'corruption');
        }
      }
      // (e)
      if (tmp && qemuLeft > 0 && !dirty) {
        qemuLeft--;
        const f = join(tmp, 'state.qcow2');
        writeFileSync(f, st.image);
        if (o.backing) writeFileSync(join(tmp, bname), o.backing);
        const q = spawnSync('qemu-img', ['check', f], { encoding: 'utf8' });
        const harmless = q.status === 2 && snapshotWorkload && /OFLAG_COPIED/.test(q.stderr + q.stdout) && onlyCopiedClear(await checkDevice(new MemoryDevice(name, st.image, { readOnly: true }), name));
        if (q.status !== 0 && q.status !== 3 && !harmless) fail(`qemu-img check exit ${q.status}: ${(q.stdout + q.stderr).trim().split('\n').slice(0, 3).join('; ')}`, 'corruption');
      }
      if (o.stopAtFirst && failures.length > before) break;
    }
    // the commit's copy: the top as it was then over each crash state of the backing file
    const copy = await chainBase?.judgeCopy(name, initial, rec.ops, Math.max(8, Math.floor(o.maxStates / 4)), o.seed);
    if (copy && !(o.stopAtFirst && failures.length)) {
      states += copy.states;
      dataErrors += copy.failures.length;
      failures.push(...copy.failures);
    }
  } finally {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  }
  return { states, corruptions, dataErrors, leaks, leaksAfterRecovery, replayed, copiedClear, failures, refusal, seconds: Number(process.hrtime.bigint() - t0) / 1e9, deviceOps: rec.ops.length };

  function judgeData(got: Uint8Array, st: { crashPoint: number; epoch: number; description: string }, all: readonly Step[], init: Uint8Array): string | undefined {
    // the flush that opens this state's epoch is its last durable point
    const durableUpTo = (() => {
      let flushes = 0;
      let idx = -1;
      for (let i = 0; i < rec.ops.length && flushes < st.epoch; i++) {
        if (rec.ops[i]!.kind === 'flush') {
          flushes++;
          idx = i;
        }
      }
      return idx;
    })();
    // last guest flush whose device operations all completed by then
    let g = -1;
    for (let k = 0; k < all.length; k++) if (all[k]!.op.op === 'flush' && all[k]!.devEnd - 1 <= durableUpTo) g = k;
    let baseModel = baseModels.get(g) ?? init;
    if (g >= 0 && !baseModels.has(g)) {
      baseModel = new Uint8Array(all[g]!.size);
      baseModel.set(init.subarray(0, Math.min(init.length, baseModel.length)));
      for (let k = 0; k <= g; k++) {
        const s = all[k]!;
        if (s.size !== baseModel.length) {
          // a resize, or a snapshot applied with another size
          const n = new Uint8Array(s.size);
          n.set(baseModel.subarray(0, Math.min(baseModel.length, s.size)));
          baseModel = n;
        }
        // past the end (a shrink came later): nothing of it stays
        if (s.lo < baseModel.length) baseModel.set(s.content.subarray(0, Math.max(0, Math.min(s.content.length, baseModel.length - s.lo))), s.lo);
      }
      baseModels.set(g, baseModel);
    }
    const later = all.slice(g + 1).filter((s) => s.devStart < st.crashPoint);
    const sizes = new Set([baseModel.length, ...later.map((s) => s.size)]);
    if (!sizes.has(got.length)) return `virtual size ${got.length} is none of ${[...sizes].join(', ')}`;
    const G = asBuffer(got);
    const B = asBuffer(baseModel);
    const minSize = Math.min(...sizes);
    const BLOCK = 64 * 1024;
    for (let x0 = 0; x0 < got.length; x0 += BLOCK) {
      const x1 = Math.min(got.length, x0 + BLOCK);
      // most blocks read exactly as at the last flush: one comparison for all their sectors
      if (x1 <= B.length && G.compare(B, x0, x1, x0, x1) === 0) continue;
      for (let x = x0; x < x1; x += SECTOR) {
        const end = Math.min(got.length, x + SECTOR);
        if (end <= B.length && G.compare(B, x, end, x, end) === 0) continue;
        let ok = false;
        for (const s of later) {
          if (x >= s.lo && end <= s.lo + s.content.length && G.compare(asBuffer(s.content), x - s.lo, end - s.lo, x, end) === 0) {
            ok = true;
            break;
          }
        }
        // a sector beyond every earlier size reads as zero when the disk grew
        if (!ok && x >= minSize && isZero(got.subarray(x, end))) ok = true;
        if (!ok) {
          return `guest sector at 0x${x.toString(16)} reads neither its content at the last completed flush nor any later write (first bytes ${G.subarray(x, x + 8).toString('hex')})`;
        }
      }
    }
    return undefined;
  }
}

/** The overlap index's refusal (overlap-guard.ts): a CorruptionError in QEMU's words. */
function isRefusal(e: unknown): boolean {
  return e instanceof CorruptionError && /Preventing invalid write/.test(e.message);
}

/** A Buffer view of the same bytes (no copy), for its native compare. */
function asBuffer(a: Uint8Array): Buffer {
  return Buffer.isBuffer(a) ? a : Buffer.from(a.buffer, a.byteOffset, a.length);
}
