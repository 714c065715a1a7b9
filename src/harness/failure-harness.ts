/**
 * The crash harness's failing-device mode (iotest 026 generalised): a
 * workload runs on a device whose Nth write, flush, allocation or
 * truncation fails with EIO, ENOSPC or EFBIG (io/failing-device.ts), for
 * every N the workload reaches (or a seeded sample of them), and each run
 * is judged:
 *
 *  - the operation that met the failure rejects with a one-line typed
 *    error (a QledgerError), never anything else;
 *  - the session then closes or fails to close in the same way;
 *  - the image checks without corruption (leaks allowed), and every
 *    sector reads as it was at the last guest flush that completed, or as
 *    a later operation left it (nothing acknowledged and flushed is lost);
 *  - with the journal, a read-write open of the image (recovery) and a
 *    close leave it with no leak either.
 */

import { QledgerError } from '../errors.ts';
import { MemoryDevice } from '../io/memory-device.ts';
import { FailingDevice, type FailingErrno, type FailingOp } from '../io/failing-device.ts';
import { checkDevice } from '../engine/check/check.ts';
import { createOnDevice, openWriterOnDevice } from '../engine/writable.ts';
import type { CreateOptions } from '../engine/create.ts';
import type { Qcow2Writer } from '../engine/writer.ts';
import type { GuestOp } from './workload.ts';

export interface FailureTestOptions {
  readonly create: CreateOptions;
  readonly journal?: boolean | undefined;
  readonly kinds?: readonly FailingOp[] | undefined;
  readonly errnos?: readonly FailingErrno[] | undefined;
  /** runs per kind and errno at most (every N when the workload has fewer operations of that kind) */
  readonly maxRuns?: number | undefined;
  readonly seed?: number | undefined;
}

export interface FailureTestResult {
  readonly runs: number;
  /** runs whose failure was met (the rest had fewer operations than N) */
  readonly failed: number;
  readonly failures: ReadonlyArray<{ readonly run: string; readonly problem: string }>;
}

/** The guest operations this mode runs (those whose effect on the guest content is a range). */
export function failureWorkloadOp(op: GuestOp): boolean {
  return op.op === 'write' || op.op === 'zero' || op.op === 'discard' || op.op === 'flush' || op.op === 'reopen' || (op.op === 'snapshot' && op.action !== 'apply') || op.op === 'bitmap';
}

const SECTOR = 512;

export async function failureTest(ops: readonly GuestOp[], o: FailureTestOptions): Promise<FailureTestResult> {
  const name = 'failing.qcow2';
  const base = new MemoryDevice(name);
  await createOnDevice(base, name, o.create);
  const initial = base.snapshot();
  const journal = o.journal ?? true;
  const kinds = o.kinds ?? ['write', 'flush', 'allocate', 'truncate'];
  const errnos = o.errnos ?? ['EIO', 'ENOSPC', 'EFBIG'];
  const session = (dev: FailingDevice) => openWriterOnDevice(dev, name, { cacheBytes: 0, journal, journalBytes: 64 * 1024 });
  const failures: Array<{ run: string; problem: string }> = [];
  let runs = 0;
  let failed = 0;
  let rng = (o.seed ?? 1) >>> 0;
  const random = () => ((rng = (Math.imul(rng, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  for (const kind of kinds) {
    // how many operations of this kind the workload makes, failure-free
    const dry = new FailingDevice(new MemoryDevice(name, initial), 0, kind);
    await play(dry, session, ops);
    const total = dry.count;
    const ns = Array.from({ length: total }, (_, i) => i + 1);
    const pick = ns.length <= (o.maxRuns ?? Infinity) ? ns : ns.sort(() => random() - 0.5).slice(0, o.maxRuns);
    for (const errno of errnos) {
      for (const n of pick) {
        runs++;
        const run = `${kind} #${n} fails with ${errno}`;
        const dev = new FailingDevice(new MemoryDevice(name, initial), n, kind, errno);
        const r = await play(dev, session, ops);
        if (dev.failed) failed++;
        for (const p of r.problems) failures.push({ run, problem: p });
        const problem = await judge(dev.inner.snapshot(), name, r.steps, r.durable, journal);
        if (problem) failures.push({ run, problem });
      }
    }
  }
  return { runs, failed, failures };
}

/** What the guest content may be: at the last completed flush, and the ranges operations changed after it. */
interface Played {
  readonly problems: string[];
  /** the content at the last guest flush that completed (or at the start) */
  readonly durable: Uint8Array;
  /** later operations' ranges and their content afterwards */
  readonly steps: Array<{ lo: number; content: Uint8Array }>;
}

async function play(dev: FailingDevice, session: (d: FailingDevice) => Promise<Qcow2Writer>, ops: readonly GuestOp[]): Promise<Played> {
  const problems: string[] = [];
  const typed = (what: string, e: unknown) => {
    if (!(e instanceof QledgerError) || /\n|internal error/.test(e.message)) problems.push(`${what}: not a one-line typed error: ${e instanceof Error ? `${e.constructor.name}: ${e.message}` : String(e)}`);
  };
  let w: Qcow2Writer;
  try {
    w = await session(dev);
  } catch (e) {
    typed('open', e);
    return { problems, durable: new Uint8Array(0), steps: [] };
  }
  let model = new Uint8Array(w.size);
  await w.read(0, model);
  let durable = model.slice();
  let steps: Array<{ lo: number; content: Uint8Array }> = [];
  let stopped = false;
  for (const op of ops) {
    if (!failureWorkloadOp(op)) continue;
    let lo = 0;
    let hi = 0;
    try {
      if (op.op === 'write') {
        [lo, hi] = [op.offset, op.offset + op.length];
        // the model first: a write that fails midway may have reached the device in part
        model.fill(op.pattern, lo, hi);
        steps.push(range(model, lo, hi));
        await w.write(op.offset, new Uint8Array(op.length).fill(op.pattern));
      } else if (op.op === 'zero' || op.op === 'discard') {
        [lo, hi] = [op.offset, op.offset + op.length];
        const cs = w.geometry.clusterSize;
        // a discard drops whole clusters only (the rest keeps its data); with no backing file, dropped clusters read as zero
        if (op.op === 'discard') [lo, hi] = [Math.ceil(lo / cs) * cs, hi === model.length ? hi : hi - (hi % cs)];
        if (hi > lo) model.fill(0, lo, hi);
        steps.push(range(model, lo, Math.max(lo, hi)));
        if (op.op === 'zero') await w.writeZeroes(op.offset, op.length, { unmap: op.unmap });
        else await w.discard(op.offset, op.length);
      } else if (op.op === 'flush') {
        await w.flush();
        durable = model.slice();
        steps = [];
      } else if (op.op === 'reopen') {
        await w.close();
        durable = model.slice();
        steps = [];
        w = await session(dev);
      } else if (op.op === 'snapshot') {
        if (op.action === 'create') await w.createSnapshot(op.name);
        else await w.deleteSnapshot(op.name, true);
      } else if (op.op === 'bitmap') {
        if (op.action === 'add') await w.bitmaps.add(op.name, { granularity: op.granularity });
        else await w.bitmaps[op.action](op.name);
      }
    } catch (e) {
      if (dev.failed) {
        typed(op.op, e);
        stopped = true;
        break;
      }
      // a refusal that is no device failure (a name not there): the workload goes on
      if (!(e instanceof QledgerError)) problems.push(`${op.op}: ${String(e)}`);
    }
  }
  try {
    await w.close();
    if (!stopped) durable = model.slice();
  } catch (e) {
    typed('close', e);
    await w.abandon();
  }
  return { problems, durable, steps };
}

function range(model: Uint8Array, lo: number, hi: number): { lo: number; content: Uint8Array } {
  const a = Math.floor(lo / SECTOR) * SECTOR;
  const b = Math.min(model.length, Math.ceil(hi / SECTOR) * SECTOR);
  return { lo: a, content: model.slice(a, Math.max(a, b)) };
}

/** The image after a failing run: no corruption, the durable content kept, and with the journal no leak after recovery. */
async function judge(bytes: Uint8Array, name: string, steps: ReadonlyArray<{ lo: number; content: Uint8Array }>, durable: Uint8Array, journal: boolean): Promise<string | undefined> {
  const r = await checkDevice(new MemoryDevice(name, bytes, { readOnly: true }), name).catch((e: Error) => e);
  if (r instanceof Error) return `check failed: ${r.message}`;
  if (r.corruptions || r.checkErrors) return `check: ${r.corruptions} corruptions, ${r.checkErrors} check errors: ${r.findings.filter((f) => f.counts !== 'leak').map((f) => f.message).slice(0, 3).join('; ')}`;
  const dev = new MemoryDevice(name, bytes);
  let w: Qcow2Writer;
  try {
    w = await openWriterOnDevice(dev, name, { journal, journalBytes: 64 * 1024 });
  } catch (e) {
    return `read-write open after the failure: ${(e as Error).message}`;
  }
  const got = new Uint8Array(w.size);
  await w.read(0, got);
  await w.close();
  for (let x = 0; x < Math.min(got.length, durable.length); x += SECTOR) {
    const end = Math.min(got.length, x + SECTOR);
    if (Buffer.from(got.subarray(x, end)).equals(durable.subarray(x, end))) continue;
    const later = steps.some((s) => x >= s.lo && end <= s.lo + s.content.length && Buffer.from(got.subarray(x, end)).equals(s.content.subarray(x - s.lo, end - s.lo)));
    if (!later) return `guest sector at 0x${x.toString(16)} reads neither its content at the last completed flush nor a later operation's`;
  }
  if (journal) {
    const after = await checkDevice(new MemoryDevice(name, dev.snapshot(), { readOnly: true }), name);
    if (after.corruptions || after.leaks) return `after the journal's recovery: ${after.corruptions} corruptions, ${after.leaks} leaked clusters: ${after.findings.map((f) => f.message).slice(0, 3).join('; ')}`;
  }
  return undefined;
}
