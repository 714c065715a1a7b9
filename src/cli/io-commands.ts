/**
 * qemu-io's commands, one table entry each: its help line, its argument
 * counts, whether it needs an open image and whether it writes, and what it
 * does. Output and failures are qemu-io's: a failing command returns false
 * (the exit status becomes 1), `abort` and `sigraise` end the session with
 * the status a shell would report for qemu-io's signal.
 *
 * The aio_* commands run each request to completion before the next
 * command: one of the orders in which qemu-io may complete them.
 */

import { readFile } from 'node:fs/promises';
import { QledgerError, UsageError, strerrorOf } from '../errors.ts';
import { getopt, parseSize, type Parsed } from './args.ts';
import type { Image } from '../engine/image.ts';
import { formatInfoHuman } from '../engine/info.ts';
import type { Output } from './output.ts';
import { cvtstr, dump, report } from './io-format.ts';
import { uninitialized } from '../format/bytes.ts';

/** What a command sees: the image (if one is open), output, and the session's open/close. */
export interface IoContext {
  readonly img: Image | undefined;
  readonly io: Output;
  open(path: string, opts: { readOnly: boolean; forceShare: boolean }): Promise<void>;
  close(): Promise<void>;
}

/** true: done; false: failed (exit status 1); a number: end the session with that status. */
export type IoResult = boolean | number;

export interface IoCommand {
  readonly name: string;
  readonly alias?: string;
  /** the help line's part before " -- " */
  readonly usage: string;
  readonly description: string;
  /** argument counts (options included, as qemu-io counts them); max -1: no limit */
  readonly argMin: number;
  readonly argMax: number;
  readonly needsFile: boolean;
  /** the image must be open read-write */
  readonly writes: boolean;
  run(ctx: IoContext & { img: Image }, args: string[]): Promise<IoResult>;
}

function num(text: string | undefined, what: string): number {
  if (text === undefined) throw new UsageError(`missing ${what}`);
  return parseSize(text, what);
}

const has = (p: Parsed, k: string) => p.opts.some(([x]) => x === k);
const arg = (p: Parsed, k: string) => {
  const v = p.opts.filter(([x]) => x === k).at(-1)?.[1];
  return typeof v === 'string' ? v : undefined;
};

function pattern(text: string | undefined, dflt: number): number {
  if (text === undefined) return dflt;
  const v = Number(text);
  if (!Number.isInteger(v) || v < 0 || v > 255) throw new UsageError(`invalid pattern '${text}'`);
  return v;
}

/** OFFSET LEN [LEN...]: the start and the total; a request past the end of the disk fails as qemu-io reports it. */
function request(p: Parsed, img: Image, verb: string, io: Output, vector: boolean): { offset: number; lens: number[]; total: number } | undefined {
  if (vector ? p.positional.length < 2 : p.positional.length !== 2) throw new UsageError(`${verb}: expecting offset and length${vector ? 's' : ''}`);
  const offset = num(p.positional[0], 'offset');
  const lens = p.positional.slice(1).map((t) => num(t, 'length'));
  const total = lens.reduce((a, b) => a + b, 0);
  if (offset + total > img.size) {
    io.out(`${verb} failed: Input/output error\n`);
    return undefined;
  }
  return { offset, lens, total };
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

/** read, readv, aio_read: read, verify a pattern over a part (-s/-l), dump (-v), report. */
async function doRead(ctx: IoContext & { img: Image }, args: string[], verb: string, spec: string, vector: boolean): Promise<IoResult> {
  const { img, io } = ctx;
  const p = getopt(args, { withArg: vector ? 'P' : 'Psl', flags: spec, long: {} }, verb);
  if (has(p, 'b')) throw new UsageError(`${verb}: the VM state (-b) is not supported`);
  const r = request(p, img, 'read', io, vector);
  if (!r) return false;
  let buf: Uint8Array = new Uint8Array(0);
  const secs = await timed(async () => {
    buf = await img.read(r.offset, r.total);
  });
  let ok = true;
  const pat = arg(p, 'P');
  if (pat !== undefined) {
    const v = pattern(pat, 0);
    const from = arg(p, 's') !== undefined ? num(arg(p, 's'), 'pattern offset') : 0;
    const len = arg(p, 'l') !== undefined ? num(arg(p, 'l'), 'pattern length') : r.total - from;
    if (from + len > r.total) {
      io.out(`pattern verification range exceeds end of read data\n`);
      return false;
    }
    if (buf.subarray(from, from + len).some((b) => b !== v)) {
      io.out(`Pattern verification failed at offset ${r.offset + from}, ${len} bytes\n`);
      ok = false;
    }
  }
  if (has(p, 'v')) dump(io, buf, r.offset);
  if (!has(p, 'q')) report(io, 'read', r.total, r.offset, secs, has(p, 'C'));
  return ok;
}

/** write, writev, aio_write: a pattern (-P), a file's bytes (-s), zeroes (-z [-u]) or a compressed write (-c). */
async function doWrite(ctx: IoContext & { img: Image }, args: string[], verb: string, spec: string, vector: boolean): Promise<IoResult> {
  const { img, io } = ctx;
  const p = getopt(args, { withArg: vector ? 'P' : 'Ps', flags: spec, long: {} }, verb);
  if (has(p, 'b')) throw new UsageError(`${verb}: the VM state (-b) is not supported`);
  if (has(p, 'u') && !has(p, 'z')) {
    io.out('-u requires -z to be specified\n');
    return false;
  }
  if (has(p, 'z') && (has(p, 'P') || has(p, 's'))) {
    io.out('-z and -P cannot be specified at the same time\n');
    return false;
  }
  if (has(p, 's') && has(p, 'P')) {
    io.out('-s and -P cannot be specified at the same time\n');
    return false;
  }
  const r = request(p, img, 'write', io, vector);
  if (!r) return false;
  const { offset, total: len } = r;
  if (has(p, 'c') && has(p, 'z')) {
    io.out('-c and -z cannot be specified at the same time\n');
    return false;
  }
  if (has(p, 'c') && offset % 512 !== 0) {
    io.out(`${p.positional[0]} is not a sector-aligned value for 'offset'\n`);
    return false;
  }
  let data: Uint8Array | undefined;
  const source = arg(p, 's');
  if (source !== undefined) {
    let bytes: Uint8Array;
    try {
      bytes = await readFile(source);
    } catch {
      ctx.io.err(`${source}: No such file or directory\n`);
      return false;
    }
    // as qemu-io: the file's bytes, over and over until the length is filled
    data = new Uint8Array(len);
    if (bytes.length) for (let at = 0; at < len; at += bytes.length) data.set(bytes.subarray(0, Math.min(bytes.length, len - at)), at);
  }
  // the buffer is made before the clock starts, as qemu-io makes it
  if (!has(p, 'z')) data ??= patternBuffer(len, pattern(arg(p, 'P'), 0xcd), !has(p, 'c'));
  let secs: number;
  try {
    secs = await timed(async () => {
      if (has(p, 'c')) await img.writeCompressed(offset, data!);
      else if (has(p, 'z')) await img.writeZeroes(offset, len, { unmap: has(p, 'u') });
      else await img.write(offset, data!);
      // -f: forced unit access, the write is durable when it completes
      if (has(p, 'f')) await img.flush();
    });
  } catch (e) {
    // a device that refused the data (a full disk): qemu-io's line, strerror's words
    const words = strerrorOf(e);
    if (words) {
      io.out(`write failed: ${words}\n`);
      return false;
    }
    // what qemu-io reports for a compressed write it refuses
    if (!has(p, 'c') || !(e instanceof QledgerError) || (e.code !== 'E_RANGE' && e.code !== 'E_IO')) throw e;
    io.out(`write failed: ${e.code === 'E_RANGE' ? 'Invalid argument' : 'Input/output error'}\n`);
    return false;
  }
  if (!has(p, 'q')) report(io, 'wrote', len, offset, secs, has(p, 'C'));
  return true;
}

/**
 * A buffer of `len` bytes of `value`. Consecutive writes of one pattern and
 * length (a script's thousand `write -P 1 …M 1M`) share one: the engine
 * never changes a buffer it is given, and a fresh 1 MiB per command cost
 * filling it and, every few hundred of them, a garbage collection (0.35 s
 * of CPU per GiB written in a profile). Only buffers up to CACHED_PATTERN
 * are kept, so a long write's buffer is not held after its command.
 */
function patternBuffer(len: number, value: number, reuse: boolean): Uint8Array {
  const c = lastPattern;
  if (reuse && c && c.buf.length === len && c.value === value) return c.buf;
  const buf = uninitialized(len).fill(value);
  if (reuse && len <= CACHED_PATTERN) lastPattern = { value, buf };
  return buf;
}
const CACHED_PATTERN = 16 << 20;
let lastPattern: { value: number; buf: Uint8Array } | undefined;

async function doMap(img: Image, io: Output): Promise<IoResult> {
  let off = 0;
  while (off < img.size) {
    let { allocated, length } = await img.topStatus(off, img.size - off);
    while (off + length < img.size) {
      const n = await img.topStatus(off + length, img.size - off - length);
      if (n.allocated !== allocated) break;
      length += n.length;
    }
    io.out(`${cvtstr(length)} (0x${length.toString(16)}) bytes ${allocated ? '    allocated' : 'not allocated'} at offset ${cvtstr(off)} (0x${off.toString(16)})\n`);
    off += length;
  }
  return true;
}

async function doInfo(img: Image, io: Output): Promise<IoResult> {
  io.out(`format name: ${img.format}\n`);
  const g = img.geometry;
  if (g) {
    io.out(`cluster size: ${cvtstr(g.clusterSize)}\n`);
    const span = g.clusterSize * g.l2Entries;
    io.out(`vm state offset: ${cvtstr(Math.ceil(img.size / span) * span)}\n`);
    const text = formatInfoHuman(await img.info(), []);
    const at = text.indexOf('Format specific information:');
    if (at >= 0) io.out(text.slice(at));
  }
  return true;
}

/** Signal numbers sigraise takes by number, for the status a shell reports (128 + n). */
const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGABRT: 6, SIGKILL: 9, SIGUSR1: 10, SIGSEGV: 11, SIGUSR2: 12, SIGTERM: 15 };

const c = (x: Omit<IoCommand, 'alias'> & { alias?: string }): IoCommand => x;

export const IO_COMMANDS: readonly IoCommand[] = [
  c({ name: 'abort', usage: 'abort', description: 'simulate a program crash using abort(3)', argMin: 0, argMax: 0, needsFile: false, writes: true, run: async (ctx) => {
    await ctx.img.abandon();
    return 134; // a shell's status for SIGABRT
  } }),
  c({ name: 'aio_flush', usage: 'aio_flush', description: 'completes all outstanding aio requests', argMin: 0, argMax: 0, needsFile: true, writes: false, run: async () => true }),
  c({ name: 'aio_read', usage: 'aio_read [-Ciqv] [-P pattern] off len [len..]', description: 'asynchronously reads a number of bytes', argMin: 2, argMax: -1, needsFile: true, writes: false, run: (ctx, a) => doRead(ctx, a, 'aio_read', 'Cqv', true) }),
  c({ name: 'aio_write', usage: 'aio_write [-Cfiquz] [-P pattern] off len [len..]', description: 'asynchronously writes a number of bytes', argMin: 2, argMax: -1, needsFile: true, writes: true, run: (ctx, a) => doWrite(ctx, a, 'aio_write', 'Cfquz', true) }),
  c({ name: 'alloc', usage: 'alloc offset [count]', description: 'checks if offset is allocated in the file', argMin: 1, argMax: 2, needsFile: true, writes: false, run: async ({ img, io }, args) => {
    const offset = num(args[0], 'offset');
    const count = args[1] !== undefined ? num(args[1], 'count') : 512;
    let sum = 0;
    for (let o = offset; o < offset + count; ) {
      const s = await img.topStatus(o, offset + count - o);
      if (s.allocated) sum += s.length;
      o += s.length;
    }
    io.out(`${sum}/${count} bytes allocated at offset ${cvtstr(offset)}\n`);
    return true;
  } }),
  c({ name: 'close', usage: 'close', description: 'close the current open file', argMin: 0, argMax: 0, needsFile: true, writes: false, run: async (ctx) => {
    await ctx.close();
    return true;
  } }),
  c({ name: 'discard', alias: 'd', usage: 'discard [-Cq] off len', description: 'discards a number of bytes at a specified offset', argMin: 2, argMax: -1, needsFile: true, writes: true, run: async ({ img, io }, args) => {
    const p = getopt(args, { withArg: '', flags: 'Cq', long: {} }, 'discard');
    const r = request(p, img, 'discard', io, false);
    if (!r) return false;
    const secs = await timed(() => img.discard(r.offset, r.total));
    if (!has(p, 'q')) report(io, 'discard', r.total, r.offset, secs, has(p, 'C'));
    return true;
  } }),
  c({ name: 'flush', alias: 'f', usage: 'flush', description: 'flush all in-core file state to disk', argMin: 0, argMax: 0, needsFile: true, writes: true, run: async ({ img }) => {
    await img.flush();
    return true;
  } }),
  c({ name: 'help', alias: '?', usage: 'help [command]', description: 'help for one or all commands', argMin: 0, argMax: 1, needsFile: false, writes: false, run: async () => true }),
  c({ name: 'info', alias: 'i', usage: 'info', description: 'prints information about the current file', argMin: 0, argMax: 0, needsFile: true, writes: false, run: ({ img, io }) => doInfo(img, io) }),
  c({ name: 'length', alias: 'len', usage: 'length', description: 'gets the length of the current file', argMin: 0, argMax: 0, needsFile: true, writes: false, run: async ({ img, io }) => {
    io.out(`${cvtstr(img.size)}\n`);
    return true;
  } }),
  c({ name: 'map', usage: 'map ', description: 'prints the allocated areas of a file', argMin: 0, argMax: 0, needsFile: true, writes: false, run: ({ img, io }) => doMap(img, io) }),
  c({ name: 'open', alias: 'o', usage: 'open [-rsCnkU] [-t cache] [-d discard] [-o options] [path]', description: 'open the file specified by path', argMin: 1, argMax: -1, needsFile: false, writes: false, run: async (ctx, args) => {
    const p = getopt(args, { withArg: 'tdo', flags: 'rsCnkU', long: {} }, 'open');
    if (p.positional.length !== 1) throw new UsageError('open: expecting one path');
    await ctx.open(p.positional[0]!, { readOnly: has(p, 'r'), forceShare: has(p, 'U') });
    return true;
  } }),
  c({ name: 'quit', alias: 'q', usage: 'quit', description: 'exit the program', argMin: 0, argMax: 0, needsFile: false, writes: false, run: async () => true }),
  c({ name: 'read', alias: 'r', usage: 'read [-abCqv] [-P pattern [-s off] [-l len]] off len', description: 'reads a number of bytes at a specified offset', argMin: 2, argMax: -1, needsFile: true, writes: false, run: (ctx, a) => doRead(ctx, a, 'read', 'abCqvp', false) }),
  c({ name: 'readv', usage: 'readv [-Cqv] [-P pattern] off len [len..]', description: 'reads a number of bytes at a specified offset', argMin: 2, argMax: -1, needsFile: true, writes: false, run: (ctx, a) => doRead(ctx, a, 'readv', 'Cqv', true) }),
  c({ name: 'sigraise', usage: 'sigraise signal', description: 'raises a signal', argMin: 1, argMax: 1, needsFile: false, writes: true, run: async (ctx, args) => {
    const n = /^\d+$/.test(args[0]!) ? Number(args[0]) : SIGNALS[args[0]!];
    if (n === undefined || n < 1 || n > 64) throw new UsageError(`sigraise: invalid signal '${args[0]}'`);
    // like a process killed by the signal: nothing flushed, nothing closed
    await ctx.img.abandon();
    return 128 + n;
  } }),
  c({ name: 'sleep', usage: 'sleep', description: 'waits for the given value in milliseconds', argMin: 1, argMax: 1, needsFile: false, writes: false, run: async (_ctx, args) => {
    const ms = Number(args[0]);
    if (!Number.isFinite(ms) || ms < 0) throw new UsageError(`sleep: invalid number of milliseconds '${args[0]}'`);
    await new Promise((r) => setTimeout(r, ms));
    return true;
  } }),
  c({ name: 'truncate', alias: 't', usage: 'truncate [-m prealloc_mode] off', description: 'truncates the current file at the given offset', argMin: 1, argMax: 3, needsFile: true, writes: true, run: async ({ img }, args) => {
    const p = getopt(args, { withArg: 'm', flags: '', long: {} }, 'truncate');
    if (p.positional.length !== 1) throw new UsageError('truncate: expecting a size');
    const mode = arg(p, 'm') ?? 'off';
    if (mode !== 'off' && mode !== 'metadata' && mode !== 'falloc' && mode !== 'full') throw new UsageError(`truncate: invalid preallocation mode '${mode}'`);
    await img.truncate(num(p.positional[0], 'size'), mode);
    return true;
  } }),
  c({ name: 'write', alias: 'w', usage: 'write [-bcCfnquz] [-P pattern | -s source_file] off len', description: 'writes a number of bytes at a specified offset', argMin: 2, argMax: -1, needsFile: true, writes: true, run: (ctx, a) => doWrite(ctx, a, 'write', 'bcCfnquzp', false) }),
  c({ name: 'writev', usage: 'writev [-Cfq] [-P pattern] off len [len..]', description: 'writes a number of bytes at a specified offset', argMin: 2, argMax: -1, needsFile: true, writes: true, run: (ctx, a) => doWrite(ctx, a, 'writev', 'Cfq', true) }),
];

export function findCommand(name: string): IoCommand | undefined {
  return IO_COMMANDS.find((x) => x.name === name || x.alias === name);
}

/** `help` and `help CMD`: qemu-io's one line per command. */
export function helpText(name?: string): string | undefined {
  const line = (x: IoCommand) => `${x.usage} -- ${x.description}\n`;
  if (name === undefined) return IO_COMMANDS.map(line).join('') + "\nUse 'help commandname' for extended help.\n";
  const x = findCommand(name);
  return x && line(x);
}

/** qemu-io's words when a command gets too few or too many arguments. */
export function argCountError(x: IoCommand, n: number): string | undefined {
  if (n >= x.argMin && (x.argMax < 0 || n <= x.argMax)) return undefined;
  const want = x.argMin === x.argMax ? `${x.argMin}` : x.argMax < 0 ? `at least ${x.argMin}` : `between ${x.argMin} and ${x.argMax}`;
  return `bad argument count ${n} to ${x.name}, expected ${want} arguments`;
}
