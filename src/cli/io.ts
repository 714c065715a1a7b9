/**
 * `qledger io`: a qemu-io session. Options as qemu-io takes them, the image
 * opened (read-write unless -r, as far as locks are concerned), then the
 * commands of io-commands.ts from each -c in turn or, without -c, from
 * standard input one per line after a "qemu-io> " prompt. A failing
 * command makes the exit status 1; `abort` and `sigraise` end the session
 * at once without flushing or closing, leaving the image as a crash would.
 *
 * Cache modes (-t/--cache, default writeback here; see the README): with
 * writethrough and directsync each write command is flushed before it
 * completes, unsafe ignores flushes (the image is still flushed on close).
 */

import { QledgerError, UsageError } from '../errors.ts';
import { forceShareOf, getopt, splitCommand } from './args.ts';
import { Image } from '../engine/image.ts';
import type { Output } from './output.ts';
import { imageSpec } from './image-spec.ts';
import { OVERLAP_MODES, isOverlapMode, type OverlapMode } from '../engine/write/overlap.ts';
import { argCountError, findCommand, helpText, type IoContext } from './io-commands.ts';

export { cvtstr } from './io-format.ts';

const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const;
const AIO_MODES = ['threads', 'native', 'io_uring'] as const;

interface SessionOptions {
  format: 'qcow2' | 'raw' | undefined;
  detectZeroes: 'off' | 'on' | 'unmap' | undefined;
  journal: boolean;
  cache: (typeof CACHE_MODES)[number];
  overlapCheck: OverlapMode | undefined;
  dedup: boolean;
  /** false: --untrusted */
  trusted: boolean;
}

class Session implements IoContext {
  img: Image | undefined;
  private path: string | undefined;
  constructor(
    readonly io: Output,
    readonly o: SessionOptions,
    /** open read-write when a command writes (locks say read-write either way unless -r) */
    private readonly writeWanted: boolean,
  ) {}

  async open(path: string, opts: { readOnly: boolean; forceShare: boolean }): Promise<void> {
    if (this.img) throw new QledgerError('E_USAGE', "file open already, try 'help close'");
    if (opts.forceShare && !opts.readOnly) throw new QledgerError('E_USAGE', `${path}: force-share=on can only be used with read-only images`);
    this.img = await Image.open(path, {
      format: this.o.format,
      write: this.writeWanted && !opts.readOnly,
      forceShare: opts.forceShare,
      lockAsWriter: !opts.readOnly,
      detectZeroes: this.o.detectZeroes,
      journal: this.o.journal,
      overlapCheck: this.o.overlapCheck,
      dedup: this.o.dedup && this.writeWanted && !opts.readOnly ? true : undefined,
      trusted: this.o.trusted,
      onWarning: (m) => this.io.err(`qledger: warning: ${m}\n`),
    });
    this.path = path;
  }

  async close(): Promise<void> {
    const img = this.img;
    this.img = undefined;
    this.path = undefined;
    await img?.close();
  }

  get name(): string | undefined {
    return this.path;
  }
}

/** Run one command line; true/false as it went, or a status to end the session with. */
async function runLine(s: Session, line: string, stop: { quit: boolean }): Promise<boolean | number> {
  const [name, ...args] = splitCommand(line);
  if (!name) return true;
  const cmd = findCommand(name);
  if (!cmd) {
    s.io.err(`command "${name}" not found\n`);
    return false;
  }
  const bad = argCountError(cmd, args.length);
  if (bad) {
    s.io.err(`${bad}\n`);
    return false;
  }
  if (cmd.name === 'quit') {
    stop.quit = true;
    return true;
  }
  if (cmd.name === 'help') {
    const text = helpText(args[0]);
    if (text === undefined) {
      s.io.out(`command ${args[0]} not found\n`);
      return false;
    }
    s.io.out(text);
    return true;
  }
  if (cmd.needsFile && !s.img) {
    s.io.err("no file open, try 'help open'\n");
    return false;
  }
  try {
    // unsafe: flushes are ignored
    if (cmd.name === 'flush' && s.o.cache === 'unsafe') return true;
    const r = await cmd.run(s as IoContext & { img: Image }, args);
    // writethrough: a write is on stable storage when the command completes
    if (r === true && cmd.writes && s.img && (s.o.cache === 'writethrough' || s.o.cache === 'directsync')) await s.img.flush();
    return r;
  } catch (e) {
    if (!(e instanceof QledgerError)) throw e;
    s.io.err(`${name}: ${e.message}\n`);
    return false;
  }
}

export async function runIo(argv: string[], io: Output): Promise<number> {
  const p = getopt(
    argv,
    {
      withArg: 'cftdiTo',
      flags: 'rUnqkmhsC',
      long: { 'force-share': false, 'image-opts': false, 'read-only': false, format: true, cmd: true, cache: true, aio: true, discard: true, trace: true, snapshot: false, nocache: false, 'copy-on-read': false, misalign: false, 'native-aio': false, 'detect-zeroes': true, journal: true, 'overlap-check': true, dedup: false, untrusted: false },
    },
    'io',
  );
  const val = (...keys: string[]) => p.opts.filter(([k]) => keys.includes(k)).at(-1)?.[1];
  const jo = val('journal');
  if (jo !== undefined && jo !== 'on' && jo !== 'off') throw new UsageError(`--journal expects on or off`);
  const dz = val('detect-zeroes');
  if (dz !== undefined && dz !== 'off' && dz !== 'on' && dz !== 'unmap') throw new UsageError(`--detect-zeroes expects off, on or unmap`);
  const ol = val('overlap-check');
  if (ol !== undefined && (typeof ol !== 'string' || !isOverlapMode(ol))) throw new UsageError(`--overlap-check expects one of ${OVERLAP_MODES.join(', ')}`);
  const cache = val('t', 'cache') ?? (p.opts.some(([k]) => k === 'n' || k === 'nocache') ? 'none' : 'writeback');
  if (!(CACHE_MODES as readonly unknown[]).includes(cache)) throw new UsageError(`Invalid cache option: ${String(cache)}`);
  const aio = val('i', 'aio');
  if (aio !== undefined && !(AIO_MODES as readonly unknown[]).includes(aio)) throw new UsageError(`Invalid aio option: ${String(aio)}`);
  if (p.positional.length > 1) throw new UsageError('io: expecting at most one image filename');
  const fmt = val('f', 'format');
  if (fmt !== undefined && fmt !== 'qcow2' && fmt !== 'raw') throw new UsageError(`Unknown file format '${String(fmt)}'`);
  const readOnly = p.opts.some(([k]) => k === 'r' || k === 'read-only');
  const forceShare = forceShareOf(p);
  const cmds = p.opts.filter(([k]) => k === 'c' || k === 'cmd').map(([, v]) => String(v));
  // from -c, the image is opened for writing only when a command writes; from standard input, always
  const fromInput = cmds.length === 0;
  const wantsWrite = fromInput || cmds.some((c) => findCommand(splitCommand(c)[0] ?? '')?.writes === true);
  const s = new Session(io, { format: fmt as SessionOptions['format'], detectZeroes: dz as SessionOptions['detectZeroes'], journal: jo !== 'off', cache: cache as SessionOptions['cache'], overlapCheck: ol as OverlapMode | undefined, dedup: p.opts.some(([k]) => k === 'dedup'), trusted: !p.opts.some(([k]) => k === 'untrusted') }, wantsWrite);
  if (p.positional[0] !== undefined) {
    const spec = imageSpec(p.positional[0], p.opts.some(([k]) => k === 'image-opts'));
    if (spec.format !== undefined) s.o.format = spec.format;
    if (spec.overlapCheck !== undefined) s.o.overlapCheck = spec.overlapCheck;
    await s.open(spec.path, { readOnly, forceShare: forceShare || spec.forceShare });
  }
  let failed = false;
  const stop = { quit: false };
  try {
    const lines: AsyncIterable<string> | string[] = fromInput ? (io.lines?.() ?? []) : cmds;
    if (fromInput) io.out('qemu-io> ');
    for await (const line of lines) {
      const r = await runLine(s, line, stop);
      if (typeof r === 'number') {
        s.img = undefined; // abandoned: never closed
        return r;
      }
      if (!r) failed = true;
      if (stop.quit) break;
      if (fromInput) io.out('qemu-io> ');
    }
  } finally {
    await s.close();
  }
  return failed ? 1 : 0;
}
