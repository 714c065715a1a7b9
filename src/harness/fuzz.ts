/**
 * The image fuzzer (qledger fuzz): seeded mutations of qcow2 images in the
 * manner of QEMU's image-fuzzer (header fields, header extensions, L1, L2,
 * refcount table and block entries, snapshot table and bitmap directory
 * entries set to boundary values or bit-flipped; whole bytes of metadata
 * flipped; the file truncated), and every command run on each case in
 * process, its outcome classed:
 *
 *   ok            the command did its work
 *   clean error   a one-line typed error (QledgerError), nothing else
 *   crash         any other exception, or a message with a stack or an
 *                 "internal error"
 *   hang          the command did not finish within the timeout
 *   memory        the heap grew past the bound during the command
 *   write after error  a read-write open refused the image but the file
 *                 changed anyway
 *   disagreement  (with qemu-img installed and `qemu` on) check's totals
 *                 differ from qemu-img check's
 *
 * Case k of a campaign is a pure function of (seed, k): `shard` splits a
 * campaign by case number (k % N === I) across processes or machines, and
 * any case is reproduced alone from its number. A failing case's image is
 * written to `outDir` with the command that failed.
 *
 * In process, the timeout catches commands that stop making progress
 * between awaits (the check and map ones are cancelled through their
 * signals); a hang inside one synchronous step is caught only when the
 * commands run in a worker thread (fuzz-worker.ts, qledger fuzz's default),
 * which is stopped from outside.
 */

import { getHeapStatistics } from 'node:v8';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { QledgerError, UsageError } from '../errors.ts';
import { putU32, putU64, u32, u64 } from '../format/bytes.ts';
import { decodeHeader } from '../format/header.ts';
import { MemoryDevice } from '../io/memory-device.ts';
import { Image } from '../engine/image.ts';
import { checkDevice } from '../engine/check/check.ts';
import { createOnDevice, openWriterOnDevice } from '../engine/writable.ts';
import { DifferentialTally, qemuProbe, qemuTotals, type DifferentialGroup, type ProbeCommand } from './fuzz-differential.ts';

export const FUZZ_COMMANDS = ['info', 'check', 'map', 'read', 'convert', 'write'] as const;
export type FuzzCommand = (typeof FUZZ_COMMANDS)[number];
export const FUZZ_CLASSES = ['ok', 'cleanError', 'crash', 'hang', 'memory', 'writeAfterError', 'disagreement'] as const;
export type FuzzClass = (typeof FUZZ_CLASSES)[number];

export interface FuzzOptions {
  /** cases in the campaign (before sharding) */
  readonly cases: number;
  readonly seed: number;
  /** this process's share: cases k with k % count === index */
  readonly shard?: { readonly index: number; readonly count: number } | undefined;
  /** seed images (their bytes); default: the built-in kinds */
  readonly images?: ReadonlyArray<{ readonly name: string; readonly bytes: Uint8Array }> | undefined;
  readonly commands?: readonly FuzzCommand[] | undefined;
  /** per command, milliseconds (default 10 s) */
  readonly timeoutMs?: number | undefined;
  /** heap growth during one command, bytes (default 512 MiB) */
  readonly memoryBytes?: number | undefined;
  /** where failing cases' images go (none: not written) */
  readonly outDir?: string | undefined;
  /** compare check's totals with qemu-img check on each case, and whether info and read work with
   *  qemu-img info and qemu-io (slow: one process per command and case; fuzz-differential.ts) */
  readonly qemu?: boolean | undefined;
  /** after each case */
  readonly onCase?: ((k: number) => void) | undefined;
  /** every `progressEvery` cases (default 1000): the summary so far, as the campaign would end now */
  readonly onProgress?: ((s: FuzzSummary) => void) | undefined;
  readonly progressEvery?: number | undefined;
  /** where the commands run (default: here, in process; fuzz-worker.ts runs them in a worker thread) */
  readonly runner?: CaseRunner | undefined;
  /** a checkpoint of this same campaign (seed, cases, shard, commands): its counts carried on and its
   *  cases not run again, so a campaign cut short goes on where it stopped */
  readonly resume?: FuzzSummary | undefined;
}

export interface FuzzFailure {
  readonly case: number;
  readonly image: string;
  readonly mutations: readonly string[];
  readonly command: FuzzCommand;
  readonly class: FuzzClass;
  readonly message: string;
  /** the reproducing image, when written */
  readonly file?: string | undefined;
}

export interface FuzzSummary {
  readonly seed: number;
  readonly cases: number;
  readonly runs: number;
  readonly seconds: number;
  readonly casesPerSecond: number;
  readonly classes: Record<FuzzClass, number>;
  readonly byCommand: Record<FuzzCommand, Record<FuzzClass, number>>;
  readonly failures: FuzzFailure[];
  /** with `qemu`: where qemu-img/qemu-io and qledger differ on whether info and read work, in groups (for judgment, not failures) */
  readonly differential?: { readonly compared: number; readonly groups: DifferentialGroup[] } | undefined;
  /** what identifies the campaign, for a resumed one to be checked against */
  readonly campaign: { readonly cases: number; readonly shard: string; readonly commands: string; readonly qemu: boolean };
  /** the next case number this shard runs (o.cases or more: the campaign is complete) */
  readonly next: number;
}

/** mulberry32: a small seeded generator (the same cases on every machine). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The built-in seed images: the kinds of image QEMU and qledger write (data, zero, compressed clusters, a snapshot, a bitmap; v2; extended L2; small clusters). */
export async function builtinImages(): Promise<Array<{ name: string; bytes: Uint8Array }>> {
  const kinds: Array<[string, Parameters<typeof createOnDevice>[2], boolean]> = [
    ['v3-64k', { size: 8 << 20 }, true],
    ['v3-4k', { size: 4 << 20, clusterSize: 4096 }, true],
    ['v2-64k', { size: 8 << 20, compat: '0.10' }, false],
    ['extended-l2', { size: 8 << 20, extendedL2: true }, false],
    ['v3-512-refcount-64', { size: 1 << 20, clusterSize: 512, refcountBits: 64 }, false],
  ];
  const out: Array<{ name: string; bytes: Uint8Array }> = [];
  for (const [name, o, extras] of kinds) {
    const dev = new MemoryDevice(`${name}.qcow2`);
    await createOnDevice(dev, dev.name, o);
    const w = await openWriterOnDevice(dev, dev.name, { journal: false });
    const cs = w.geometry.clusterSize;
    await w.write(0, new Uint8Array(3 * cs).fill(0x11));
    await w.writeZeroes(4 * cs, 2 * cs);
    await w.write(8 * cs + 100, new Uint8Array(700).fill(0x22));
    if (extras) {
      await w.writeCompressed(12 * cs, new Uint8Array(cs).fill(0x33));
      await w.createSnapshot('s1');
      await w.write(0, new Uint8Array(cs).fill(0x44));
      await w.bitmaps.add('b1', { granularity: Math.max(512, cs) });
      await w.write(16 * cs, new Uint8Array(cs).fill(0x55));
    }
    await w.close();
    out.push({ name, bytes: dev.snapshot() });
  }
  out.push({ name: 'v3-4k-crashed-journal', bytes: await crashedJournalImage() });
  return out;
}

/**
 * The last kind: a journalled image (64 KiB area) with a snapshot and a
 * bitmap whose last write-back stopped after its first in-place phase, as a
 * power cut would leave it: a read-write open replays the transaction (its
 * data checksums included), so its mutations reach recovery.
 */
async function crashedJournalImage(): Promise<Uint8Array> {
  const dev = new MemoryDevice('v3-4k-crashed-journal.qcow2');
  await createOnDevice(dev, dev.name, { size: 4 << 20, clusterSize: 4096 });
  const w = await openWriterOnDevice(dev, dev.name, { journalBytes: 65536 });
  const cs = w.geometry.clusterSize;
  await w.write(0, new Uint8Array(3 * cs).fill(0x11));
  await w.createSnapshot('s1');
  await w.bitmaps.add('b1', { granularity: cs });
  await w.write(0, new Uint8Array(cs).fill(0x44));
  await w.flush();
  await w.write(8 * cs, new Uint8Array(2 * cs).fill(0x66));
  await w.write(300 * cs + 512, new Uint8Array(512).fill(0x77));
  w.stopAfterPhase = 1;
  await w.flush().then(
    () => {
      throw new Error('the write-back did not stop');
    },
    (e: unknown) => {
      if (!(e instanceof QledgerError)) throw e;
    },
  );
  await w.abandon();
  return dev.snapshot();
}

/** Where the metadata is: [offset, length, what] ranges of the image's structures (from its pristine header). */
function metadataRegions(b: Uint8Array): Array<[number, number, string]> {
  const p = decodeHeader(b.subarray(0, Math.min(b.length, 2 << 20)), b.length);
  const h = p.header;
  const cs = 2 ** h.clusterBits;
  const l2Bytes = cs; // an L2 table is a cluster (extended: twice the entries' size, still one cluster)
  const out: Array<[number, number, string]> = [[0, h.version === 2 ? 72 : h.headerLength, 'header']];
  for (const e of p.extensions) out.push([e.offset, 8 + e.data.length, `extension 0x${e.type.toString(16)}`]);
  out.push([h.l1TableOffset, h.l1Size * 8, 'L1 table'], [h.refcountTableOffset, Math.min(h.refcountTableClusters * cs, 4096), 'refcount table']);
  for (let i = 0; i < h.l1Size && i < 64; i++) {
    const t = u64(b, h.l1TableOffset + i * 8) % 2 ** 56;
    const off = t - (t % 512);
    if (off > 0 && off + l2Bytes <= b.length) out.push([off, l2Bytes, `L2 table ${i}`]);
  }
  for (let i = 0; i < 8; i++) {
    const off = u64(b, h.refcountTableOffset + i * 8);
    if (off > 0 && off + cs <= b.length) out.push([off, cs, `refcount block ${i}`]);
  }
  if (h.nbSnapshots) out.push([h.snapshotsOffset, Math.min(512, b.length - h.snapshotsOffset), 'snapshot table']);
  if (p.bitmaps) out.push([p.bitmaps.directoryOffset, p.bitmaps.directorySize, 'bitmap directory']);
  return out.filter(([o, n]) => o >= 0 && n > 0 && o + n <= b.length);
}

/** Boundary values for a field of `bytes` bytes, QEMU's image-fuzzer's kind. */
function boundary(r: () => number, bytes: number, b: Uint8Array): number | bigint {
  const cs = 2 ** Math.min(21, Math.max(9, u32(b, 20)));
  const max = bytes === 8 ? 2n ** 64n - 1n : bytes === 4 ? 2n ** 32n - 1n : bytes === 2 ? 65535n : 255n;
  const picks: Array<number | bigint> = [0, 1, max, max - 1n, max / 2n, max / 2n + 1n, cs, cs - 1, cs + 1, 512, b.length, b.length + cs, 2 ** 31, 2 ** 31 - 1, 2 ** 32, 2n ** 53n, 2n ** 53n + 1n, 2n ** 56n, 2n ** 63n, Math.floor(r() * 2 ** 32)];
  const v = picks[Math.floor(r() * picks.length)]!;
  return BigInt(v) > max ? max : v;
}

function put(b: Uint8Array, at: number, bytes: number, v: number | bigint): void {
  if (at + bytes > b.length) return;
  const x = BigInt(v);
  if (bytes === 8) putU64(b, at, x as unknown as number);
  else if (bytes === 4) putU32(b, at, Number(x & 0xffff_ffffn));
  else if (bytes === 2) {
    b[at] = Number((x >> 8n) & 0xffn);
    b[at + 1] = Number(x & 0xffn);
  } else b[at] = Number(x & 0xffn);
}

const HEADER_FIELDS: ReadonlyArray<[string, number, number]> = [
  ['version', 4, 4], ['backing_file_offset', 8, 8], ['backing_file_size', 16, 4], ['cluster_bits', 20, 4], ['size', 24, 8], ['crypt_method', 32, 4],
  ['l1_size', 36, 4], ['l1_table_offset', 40, 8], ['refcount_table_offset', 48, 8], ['refcount_table_clusters', 56, 4], ['nb_snapshots', 60, 4],
  ['snapshots_offset', 64, 8], ['incompatible_features', 72, 8], ['compatible_features', 80, 8], ['autoclear_features', 88, 8], ['refcount_order', 96, 4],
  ['header_length', 100, 4], ['compression_type', 104, 1],
];

/** One mutation of `b` in place, or its new length (a truncation); returns what it did. */
function mutateOnce(b: Uint8Array, r: () => number, regions: ReadonlyArray<[number, number, string]>): { what: string; length?: number } {
  const kind = r();
  if (kind < 0.3) {
    const [name, at, bytes] = HEADER_FIELDS[Math.floor(r() * HEADER_FIELDS.length)]!;
    const v = boundary(r, bytes, b);
    put(b, at, bytes, v);
    return { what: `header ${name} = ${v}` };
  }
  if (kind < 0.8) {
    // an 8-byte entry (or a 4-byte field) of a structure: a boundary value or flipped bits
    const [off, len, what] = regions[Math.floor(r() * regions.length)]!;
    const width = r() < 0.7 ? 8 : 4;
    const at = off + Math.floor((r() * Math.max(1, len - width + 1)) / width) * width;
    if (r() < 0.5) {
      const v = boundary(r, width, b);
      put(b, at, width, v);
      return { what: `${what} at 0x${at.toString(16)} = ${v}` };
    }
    const bit = Math.floor(r() * width * 8);
    b[at + (bit >> 3)]! ^= 1 << (bit & 7);
    return { what: `${what} at 0x${at.toString(16)}: bit ${bit} flipped` };
  }
  if (kind < 0.93) {
    const [off, len, what] = regions[Math.floor(r() * regions.length)]!;
    const at = off + Math.floor(r() * len);
    const v = Math.floor(r() * 256);
    b[at] = v;
    return { what: `${what} byte 0x${at.toString(16)} = 0x${v.toString(16)}` };
  }
  const to = Math.floor(r() * b.length);
  return { what: `truncated to 0x${to.toString(16)}`, length: to };
}

/** Case k: which image, its mutated bytes, and what was done to it. */
export function fuzzCase(images: ReadonlyArray<{ readonly name: string; readonly bytes: Uint8Array }>, seed: number, k: number): { image: string; bytes: Uint8Array; mutations: string[] } {
  const r = rng((seed ^ Math.imul(k + 1, 0x9e3779b1)) >>> 0);
  const base = images[Math.floor(r() * images.length)]!;
  let b = base.bytes.slice();
  const regions = metadataRegions(base.bytes);
  const mutations: string[] = [];
  const n = 1 + Math.floor(r() * 3);
  for (let i = 0; i < n; i++) {
    const m = mutateOnce(b, r, regions);
    if (m.length !== undefined) b = b.slice(0, m.length);
    mutations.push(m.what);
  }
  return { image: base.name, bytes: b, mutations };
}

/** A command that did not finish in time. */
export class FuzzTimeout extends Error {}

async function within<T>(ms: number, signal: AbortController, p: () => Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          signal.abort(new FuzzTimeout('timeout'));
          reject(new FuzzTimeout('timeout'));
        }, ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** A clean error: typed, one line, no stack, no internal error. */
export function fuzzClassOf(e: unknown): FuzzClass {
  if (e instanceof FuzzTimeout) return 'hang';
  if (!(e instanceof QledgerError)) return 'crash';
  if (/internal error|\n\s+at /.test(e.message)) return 'crash';
  return 'cleanError';
}

const READ_LIMIT = 64 << 20;

/** One command on one case's bytes. */
async function runCommand(cmd: FuzzCommand, name: string, bytes: Uint8Array, ac: AbortController): Promise<void> {
  // the case's bytes shared, not copied per command: nothing writes through a read-only device
  const ro = () => new MemoryDevice(name, bytes, { readOnly: true, share: true });
  if (cmd === 'check') {
    await checkDevice(ro(), name, { signal: ac.signal, maxFindings: 100 });
    return;
  }
  if (cmd === 'write') {
    const dev = new MemoryDevice(name, bytes.slice());
    let img: Image;
    try {
      img = await Image.open(dev, { write: true, journalBytes: 64 * 1024 });
    } catch (e) {
      // refused: not one byte may have changed
      if (!Buffer.from(dev.snapshot()).equals(Buffer.from(bytes))) throw new WriteAfterError(`the read-write open failed (${(e as Error).message}) but the image changed`);
      throw e;
    }
    try {
      const n = Math.min(img.size, 128 << 10);
      if (n > 0) await img.write(0, new Uint8Array(n).fill(0x5a));
      if (img.size > 2 << 20) await img.writeZeroes(1 << 20, 64 << 10);
      await img.flush();
    } finally {
      await img.close();
    }
    return;
  }
  const img = await Image.open(ro(), { noBacking: true });
  try {
    if (cmd === 'info') await img.info();
    else if (cmd === 'map') {
      let n = 0;
      for await (const _ of img.map(0, img.size, { signal: ac.signal })) if (++n > 100_000) break;
    } else if (cmd === 'read') {
      await img.read(0, Math.min(img.size, 1 << 20));
      if (img.size > 0) await img.read(Math.max(0, img.size - 4096), Math.min(4096, img.size));
    } else {
      // convert -O raw: the whole disk read in 1 MiB pieces (up to 64 MiB)
      for (let at = 0; at < Math.min(img.size, READ_LIMIT); at += 1 << 20) {
        ac.signal.throwIfAborted();
        await img.read(at, Math.min(1 << 20, img.size - at));
      }
    }
  } finally {
    await img.close();
  }
}

class WriteAfterError extends Error {}

/** One command on one case, classed: the timeout, the write-after-error check and the heap bound applied. */
export async function runOne(cmd: FuzzCommand, name: string, bytes: Uint8Array, timeoutMs: number, memoryBytes: number): Promise<{ cls: FuzzClass; message: string }> {
  const ac = new AbortController();
  // V8's own count: process.memoryUsage() also reads the resident size from /proc, a fifth of a campaign's time
  const heap0 = getHeapStatistics().used_heap_size;
  let cls: FuzzClass = 'ok';
  let message = '';
  try {
    await within(timeoutMs, ac, () => runCommand(cmd, name, bytes, ac));
  } catch (e) {
    cls = e instanceof WriteAfterError ? 'writeAfterError' : e === ac.signal.reason || e instanceof FuzzTimeout ? 'hang' : fuzzClassOf(e);
    message = e instanceof Error ? `${e.constructor.name}: ${e.message}${cls === 'crash' && e.stack ? `\n${e.stack.split('\n')[1]?.trim() ?? ''}` : ''}` : String(e);
  }
  if (cls === 'ok' || cls === 'cleanError') {
    const grown = getHeapStatistics().used_heap_size - heap0;
    if (grown > memoryBytes) {
      cls = 'memory';
      message = `the heap grew by ${grown} bytes`;
    }
  }
  return { cls, message };
}

/** Runs the commands of cases somewhere else (fuzz-worker.ts: in a worker thread that a hang inside one synchronous step cannot stop the campaign with). */
export interface CaseRunner {
  /** the outcome of each of `commands` on case k, in order */
  runCase(k: number, commands: readonly FuzzCommand[]): Promise<Array<{ cls: FuzzClass; message: string }>>;
  close(): Promise<void>;
}

export async function fuzz(o: FuzzOptions): Promise<FuzzSummary> {
  const t0 = process.hrtime.bigint();
  const images = o.images ?? (await builtinImages());
  const commands = o.commands ?? FUZZ_COMMANDS;
  const timeoutMs = o.timeoutMs ?? 10_000;
  const memoryBytes = o.memoryBytes ?? 512 << 20;
  const zero = () => Object.fromEntries(FUZZ_CLASSES.map((c) => [c, 0])) as Record<FuzzClass, number>;
  const shard = o.shard ?? { index: 0, count: 1 };
  const campaign = { cases: o.cases, shard: `${shard.index}/${shard.count}`, commands: commands.join(','), qemu: !!o.qemu };
  const was = o.resume;
  if (was && (was.seed !== o.seed || JSON.stringify(was.campaign) !== JSON.stringify(campaign)))
    throw new UsageError(`fuzz: the checkpoint is of another campaign (seed ${was.seed}, ${JSON.stringify(was.campaign)}; this one: seed ${o.seed}, ${JSON.stringify(campaign)})`);
  const classes = was ? { ...was.classes } : zero();
  const byCommand = Object.fromEntries(FUZZ_COMMANDS.map((c) => [c, was ? { ...was.byCommand[c] } : zero()])) as Record<FuzzCommand, Record<FuzzClass, number>>;
  const failures: FuzzFailure[] = was ? [...was.failures] : [];
  if (o.outDir) mkdirSync(o.outDir, { recursive: true });
  let runs = was?.runs ?? 0;
  let done = was?.cases ?? 0;
  const tally = o.qemu ? new DifferentialTally(was?.differential) : undefined;
  let k = was?.next ?? shard.index;
  for (; k < o.cases; k += shard.count) {
    const c = fuzzCase(images, o.seed, k);
    const name = `case-${k}.qcow2`;
    const fail = (command: FuzzCommand, cls: FuzzClass, message: string) => {
      let file: string | undefined;
      if (o.outDir) {
        file = join(o.outDir, name);
        writeFileSync(file, c.bytes);
      }
      failures.push({ case: k, image: c.image, mutations: c.mutations, command, class: cls, message: message.split('\n').slice(0, 3).join(' | '), file });
    };
    const outcomes = o.runner ? await o.runner.runCase(k, commands) : [];
    const results: Array<{ cls: FuzzClass; message: string }> = [];
    for (const [i, cmd] of commands.entries()) {
      runs++;
      const r = o.runner ? outcomes[i]! : await runOne(cmd, name, c.bytes, timeoutMs, memoryBytes);
      results.push(r);
      const { cls, message } = r;
      classes[cls]++;
      byCommand[cmd][cls]++;
      if (cls !== 'ok' && cls !== 'cleanError') fail(cmd, cls, message);
    }
    if (o.qemu) {
      const f = join(o.outDir ?? '/tmp', `qledger-fuzz-${process.pid}.qcow2`);
      writeFileSync(f, c.bytes);
      for (const [i, cmd] of commands.entries()) {
        if (cmd !== 'info' && cmd !== 'read') continue;
        const ours = results[i]!;
        if (ours.cls !== 'ok' && ours.cls !== 'cleanError') continue;
        const theirs = qemuProbe(cmd as ProbeCommand, f, c.bytes);
        if (theirs) tally!.add(k, cmd as ProbeCommand, { ok: ours.cls === 'ok', message: ours.message }, theirs);
      }
      const theirs = commands.includes('check') ? qemuTotals(f) : undefined;
      if (theirs !== undefined) {
        try {
          const r = await checkDevice(new MemoryDevice(name, c.bytes, { readOnly: true, share: true }), name, { maxFindings: 0 });
          const ours = `${r.corruptions}/${r.leaks}/${r.checkErrors}`;
          if (ours !== theirs) {
            classes.disagreement++;
            fail('check', 'disagreement', `corruptions/leaks/check errors: qledger ${ours}, qemu-img ${theirs}`);
          }
        } catch {
          // counted above as this case's check outcome
        }
      }
    }
    o.onCase?.(k);
    done++;
    if (o.onProgress && done % (o.progressEvery ?? 1000) === 0) o.onProgress(summary(done, k + shard.count));
  }
  return summary(done, k);

  function summary(cases: number, next: number): FuzzSummary {
    const seconds = (was?.seconds ?? 0) + Number(process.hrtime.bigint() - t0) / 1e9;
    // copies: a progress summary must not change under its reader
    const byCmd = Object.fromEntries(Object.entries(byCommand).map(([c, x]) => [c, { ...x }])) as Record<FuzzCommand, Record<FuzzClass, number>>;
    return { seed: o.seed, cases, runs, seconds, casesPerSecond: cases / seconds, classes: { ...classes }, byCommand: byCmd, failures: [...failures], ...(tally ? { differential: { compared: tally.compared, groups: tally.list() } } : {}), campaign, next };
  }
}
