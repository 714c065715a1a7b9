/**
 * `qledger io`: qemu-io's -c command language: read, write (-P, -z, -u),
 * discard, flush, truncate, abort, map, alloc, info, length. Output matches
 * qemu-io's; a failing command makes the exit status 1, as in qemu-io.
 * `abort` ends the process at once without flushing or closing, like
 * qemu-io's abort(), to leave the image as a crash would.
 */

import { QledgerError, UsageError } from '../errors.ts';
import { getopt, parseSize, splitCommand } from './args.ts';
import { Image } from '../engine/image.ts';
import { formatInfoHuman } from '../engine/info.ts';
import type { Output } from './output.ts';

/** qemu-io's cvtstr(): "%.3f" with ".000" trimmed, binary units. */
export function cvtstr(v: number): string {
  const units: Array<[number, string]> = [
    [2 ** 60, ' EiB'],
    [2 ** 50, ' PiB'],
    [2 ** 40, ' TiB'],
    [2 ** 30, ' GiB'],
    [2 ** 20, ' MiB'],
    [2 ** 10, ' KiB'],
  ];
  let suffix = ' bytes';
  for (const [u, s] of units) {
    if (v >= u) {
      v /= u;
      suffix = s;
      break;
    }
  }
  const t = v.toFixed(3);
  return (t.endsWith('.000') ? t.slice(0, -4) : t) + suffix;
}

function report(io: Output, verb: string, bytes: number, offset: number, secs: number): void {
  io.out(`${verb} ${bytes}/${bytes} bytes at offset ${offset}\n`);
  const s = Math.max(secs, 1e-9);
  const whole = Math.floor(secs);
  const ts = `${String(whole).padStart(2, '0')}.${String(Math.floor((secs - whole) * 100)).padStart(2, '0')} sec`;
  io.out(`${cvtstr(bytes)}, 1 ops; ${ts} (${cvtstr(bytes / s)}/sec and ${(1 / s).toFixed(4)} ops/sec)\n`);
}

function isalnum(c: number): boolean {
  return (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122);
}

function dump(io: Output, buf: Uint8Array, offset: number): void {
  for (let i = 0; i < buf.length; i += 16) {
    const row = buf.subarray(i, Math.min(buf.length, i + 16));
    let line = (offset + i).toString(16).padStart(8, '0') + ':  ';
    for (const b of row) line += b.toString(16).padStart(2, '0') + ' ';
    line += ' ';
    for (const b of row) line += isalnum(b) ? String.fromCharCode(b) : '.';
    io.out(line + '\n');
  }
}

function num(text: string | undefined, what: string): number {
  if (text === undefined) throw new UsageError(`missing ${what}`);
  return parseSize(text, what);
}

/**
 * OFFSET LENGTH of a read/write/discard command; a request past the end of
 * the disk fails as qemu-io reports it (on stdout) and yields undefined.
 */
function range(p: { positional: string[] }, img: Image, verb: string, io: Output): [number, number] | undefined {
  if (p.positional.length !== 2) throw new UsageError(`${verb}: expecting offset and length`);
  const offset = num(p.positional[0], 'offset');
  const len = num(p.positional[1], 'length');
  if (offset + len > img.size) {
    io.out(`${verb} failed: Input/output error\n`);
    return undefined;
  }
  return [offset, len];
}

/** Seconds an operation took, for qemu-io's statistics line. */
async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

function pattern(text: string | true | undefined, dflt: number): number {
  if (text === undefined) return dflt;
  const v = Number(text);
  if (typeof text !== 'string' || !Number.isInteger(v) || v < 0 || v > 255) throw new UsageError(`invalid pattern '${String(text)}'`);
  return v;
}

async function ioWrite(img: Image, args: string[], io: Output): Promise<boolean> {
  const p = getopt(args, { withArg: 'Ps', flags: 'bcfCquzn', long: {} }, 'write');
  const has = (k: string) => p.opts.some(([x]) => x === k);
  if (has('u') && !has('z')) {
    io.out('-u requires -z to be specified\n');
    return false;
  }
  if (has('z') && has('P')) {
    io.out('-z and -P cannot be specified at the same time\n');
    return false;
  }
  const r = range(p, img, 'write', io);
  if (!r) return false;
  const [offset, len] = r;
  if (has('c') && has('z')) {
    io.out('-c and -z cannot be specified at the same time\n');
    return false;
  }
  if (has('c') && offset % 512 !== 0) {
    io.out(`${p.positional[0]} is not a sector-aligned value for 'offset'\n`);
    return false;
  }
  const data = () => new Uint8Array(len).fill(pattern(p.opts.find(([k]) => k === 'P')?.[1], 0xcd));
  let secs: number;
  try {
    secs = await timed(() => (has('c') ? img.writeCompressed(offset, data()) : has('z') ? img.writeZeroes(offset, len, { unmap: has('u') }) : img.write(offset, data())));
  } catch (e) {
    // what qemu-io reports for a compressed write it refuses
    if (!has('c') || !(e instanceof QledgerError) || (e.code !== 'E_RANGE' && e.code !== 'E_IO')) throw e;
    io.out(`write failed: ${e.code === 'E_RANGE' ? 'Invalid argument' : 'Input/output error'}\n`);
    return false;
  }
  if (!has('q')) report(io, 'wrote', len, offset, secs);
  return true;
}

async function ioDiscard(img: Image, args: string[], io: Output): Promise<boolean> {
  const p = getopt(args, { withArg: '', flags: 'Cq', long: {} }, 'discard');
  const r = range(p, img, 'discard', io);
  if (!r) return false;
  const [offset, len] = r;
  const secs = await timed(() => img.discard(offset, len));
  if (!p.opts.some(([k]) => k === 'q')) report(io, 'discard', len, offset, secs);
  return true;
}

async function ioTruncate(img: Image, args: string[]): Promise<boolean> {
  const p = getopt(args, { withArg: 'm', flags: '', long: {} }, 'truncate');
  if (p.positional.length !== 1) throw new UsageError('truncate: expecting a size');
  const mode = p.opts.find(([k]) => k === 'm')?.[1] ?? 'off';
  if (mode !== 'off' && mode !== 'metadata' && mode !== 'falloc' && mode !== 'full') throw new UsageError(`truncate: invalid preallocation mode '${String(mode)}'`);
  await img.truncate(num(p.positional[0], 'size'), mode);
  return true;
}

/** Commands that need the image open read-write. */
const WRITE_COMMANDS = new Set(['write', 'w', 'discard', 'd', 'flush', 'f', 'truncate', 't', 'abort']);

async function ioRead(img: Image, args: string[], io: Output): Promise<boolean> {
  const p = getopt(args, { withArg: 'P', flags: 'vqbCpl', long: {} }, 'read');
  const r = range(p, img, 'read', io);
  if (!r) return false;
  const [offset, len] = r;
  let buf: Uint8Array = new Uint8Array(0);
  const secs = await timed(async () => {
    buf = await img.read(offset, len);
  });
  let ok = true;
  const pat = p.opts.find(([k]) => k === 'P')?.[1];
  if (typeof pat === 'string') {
    const v = Number(pat);
    if (!Number.isInteger(v) || v < 0 || v > 255) throw new UsageError(`read: invalid pattern '${pat}'`);
    if (buf.some((b) => b !== v)) {
      io.out(`Pattern verification failed at offset ${offset}, ${len} bytes\n`);
      ok = false;
    }
  }
  if (p.opts.some(([k]) => k === 'v')) dump(io, buf, offset);
  if (!p.opts.some(([k]) => k === 'q')) report(io, 'read', len, offset, secs);
  return ok;
}

async function ioMap(img: Image, io: Output): Promise<boolean> {
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

async function ioAlloc(img: Image, args: string[], io: Output): Promise<boolean> {
  if (args.length < 1 || args.length > 2) throw new UsageError('alloc: expecting offset [count]');
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
}

async function ioInfo(img: Image, io: Output): Promise<boolean> {
  io.out(`format name: ${img.format}\n`);
  const g = img.geometry;
  if (g) {
    io.out(`cluster size: ${cvtstr(g.clusterSize)}\n`);
    const span = g.clusterSize * g.l2Entries;
    io.out(`vm state offset: ${cvtstr(Math.ceil(img.size / span) * span)}\n`);
    const info = await img.info();
    const text = formatInfoHuman(info, []);
    const at = text.indexOf('Format specific information:');
    if (at >= 0) io.out(text.slice(at));
  }
  return true;
}

export async function runIo(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'cfot', flags: 'rUnqkmhTs', long: { 'force-share': false, 'image-opts': false, 'read-only': false, format: true, cmd: true, 'detect-zeroes': true, journal: true } }, 'io');
  const jo = p.opts.find(([k]) => k === 'journal')?.[1];
  if (jo !== undefined && jo !== 'on' && jo !== 'off') throw new UsageError(`--journal expects on or off`);
  const dz = p.opts.find(([k]) => k === 'detect-zeroes')?.[1];
  if (dz !== undefined && dz !== 'off' && dz !== 'on' && dz !== 'unmap') throw new UsageError(`--detect-zeroes expects off, on or unmap`);
  if (p.positional.length !== 1) throw new UsageError('io: expecting one image filename');
  const cmds = p.opts.filter(([k]) => k === 'c' || k === 'cmd').map(([, v]) => String(v));
  const fmt = p.opts.find(([k]) => k === 'f' || k === 'format')?.[1];
  if (fmt !== undefined && fmt !== 'qcow2' && fmt !== 'raw') throw new UsageError(`Unknown file format '${String(fmt)}'`);
  const readOnly = p.opts.some(([k]) => k === 'r' || k === 'read-only');
  const wantsWrite = cmds.some((c) => WRITE_COMMANDS.has(splitCommand(c)[0] ?? ''));
  const forceShare = p.opts.some(([k]) => k === 'U' || k === 'force-share');
  // qemu-io opens read-write unless -r, so it locks as a writer even when the commands only read
  const img = await Image.open(p.positional[0]!, { format: fmt as 'qcow2' | 'raw' | undefined, write: wantsWrite && !readOnly, forceShare, lockAsWriter: !readOnly && !forceShare, detectZeroes: dz as 'off' | 'on' | 'unmap' | undefined, journal: jo !== 'off', onWarning: (m) => io.err(`qledger: warning: ${m}\n`) });
  let failed = false;
  let aborted = false;
  try {
    for (const line of cmds) {
      const [name, ...args] = splitCommand(line);
      if (!name) continue;
      try {
        let ok: boolean;
        switch (name) {
          case 'write':
          case 'w':
            ok = await ioWrite(img, args, io);
            break;
          case 'discard':
          case 'd':
            ok = await ioDiscard(img, args, io);
            break;
          case 'flush':
          case 'f':
            await img.flush();
            ok = true;
            break;
          case 'truncate':
          case 't':
            ok = await ioTruncate(img, args);
            break;
          case 'abort':
            aborted = true;
            await img.abandon();
            return 134; // what a shell reports for qemu-io's abort() (SIGABRT)
          case 'read':
          case 'r':
            ok = await ioRead(img, args, io);
            break;
          case 'map':
            ok = await ioMap(img, io);
            break;
          case 'alloc':
            ok = await ioAlloc(img, args, io);
            break;
          case 'info':
          case 'i':
            ok = await ioInfo(img, io);
            break;
          case 'length':
          case 'len':
            io.out(`${cvtstr(img.size)}\n`);
            ok = true;
            break;
          default:
            io.err(`command "${name}" not found\n`);
            ok = false;
        }
        if (!ok) failed = true;
      } catch (e) {
        if (!(e instanceof QledgerError)) throw e;
        io.err(`${name}: ${e.message}\n`);
        failed = true;
      }
    }
  } finally {
    if (!aborted) await img.close();
  }
  return failed ? 1 : 0;
}
