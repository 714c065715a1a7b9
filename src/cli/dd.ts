/**
 * qemu-img dd: `dd [-f FMT] [-O raw|qcow2] [-U] [--image-opts] [bs=N]
 * [count=N] [skip=N] if=INPUT of=OUTPUT`, with qemu-img's arithmetic (count
 * bounds the input from its start, skipped blocks included; the output is
 * what lies past the skip), its operand checks and messages. The output is
 * created anew (its size rounded up to 512 bytes, as image creation rounds
 * it) and every block written as it is, zeros included, as qemu-img dd does.
 */

import { UsageError } from '../errors.ts';
import { FileDevice } from '../io/file-device.ts';
import { Image } from '../engine/image.ts';
import type { ImageFormat } from '../engine/open.ts';
import { SIZE_SUFFIX_HELP, forceShareOf, getopt, parseSize } from './args.ts';
import { imageSpec } from './image-spec.ts';
import { fail, type Output } from './output.ts';

export async function runDd(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'fO', flags: 'hU', long: { 'image-opts': false, 'force-share': false, untrusted: false } }, 'dd');
  const last = (k: string) => p.opts.filter(([x]) => x === k).at(-1)?.[1];
  const outFmt = String(last('O') ?? 'raw');
  // qemu-img dd's words (it names no format); qledger writes raw and qcow2
  if (outFmt !== 'raw' && outFmt !== 'qcow2') return fail(io, 'Unknown file format');
  let bs = 512;
  let count: number | undefined;
  let skip = 0;
  let input: string | undefined;
  let output: string | undefined;
  for (const operand of p.positional) {
    const eq = operand.indexOf('=');
    const key = eq < 0 ? operand : operand.slice(0, eq);
    const value = operand.slice(eq + 1);
    const num = (what: string): number | string[] => {
      try {
        return parseSize(value);
      } catch {
        return [`Invalid ${what} specified. ${SIZE_SUFFIX_HELP[0]}`, SIZE_SUFFIX_HELP[1]];
      }
    };
    if (eq >= 0 && key === 'bs') {
      const n = num('bs');
      if (typeof n !== 'number') return fail(io, ...n);
      if (n < 1 || n > 2 ** 31 - 1) return fail(io, 'Invalid bs specified. Must be between 1 and 2147483647.');
      bs = n;
    } else if (eq >= 0 && key === 'count') {
      const n = num('count');
      if (typeof n !== 'number') return fail(io, ...n);
      count = n;
    } else if (eq >= 0 && key === 'skip') {
      const n = num('skip');
      if (typeof n !== 'number') return fail(io, ...n);
      skip = n;
    } else if (eq >= 0 && key === 'if') input = value;
    else if (eq >= 0 && key === 'of') output = value;
    else return fail(io, `unrecognized operand ${key}`);
  }
  if (input === undefined || output === undefined) return fail(io, 'Must specify both input and output files');

  const spec = imageSpec(input, p.opts.some(([k]) => k === 'image-opts'));
  const img = await Image.open(spec.path, { format: (last('f') as ImageFormat | undefined) ?? spec.format, forceShare: forceShareOf(p) || spec.forceShare, trusted: !p.opts.some(([k]) => k === 'untrusted') });
  try {
    let size = img.size;
    if (count !== undefined && count * bs < size) size = count * bs;
    let from = skip * bs;
    if (from > size) {
      // qemu-img reports it and goes on with nothing to copy
      io.err(`qledger: ${input}: cannot skip to specified offset\n`);
      from = size;
    }
    const outSize = size - from;
    if (outFmt === 'qcow2') {
      const { createImage } = await import('../engine/writable.ts');
      await createImage(output, { size: outSize });
      const out = await Image.open(output, { format: 'qcow2', write: true, journal: false, detectZeroes: 'off' });
      try {
        await copy(img, from, outSize, bs, (at, b) => out.write(at, b));
      } finally {
        await out.close();
      }
    } else {
      const out = await FileDevice.open(output, { readOnly: false, create: true });
      try {
        await out.truncate(0);
        await out.truncate(Math.ceil(outSize / 512) * 512);
        await copy(img, from, outSize, bs, (at, b) => out.write(at, b));
      } finally {
        await out.close();
      }
    }
  } catch (e) {
    if (e instanceof UsageError) return fail(io, e.message);
    throw e;
  } finally {
    await img.close();
  }
  return 0;
}

/** Blocks of `bs` bytes from guest offset `from` of `img`, written at 0.. of the output (several blocks a read). */
async function copy(img: Image, from: number, length: number, bs: number, write: (at: number, b: Uint8Array) => Promise<void>): Promise<void> {
  const per = Math.max(bs, Math.floor((4 << 20) / bs) * bs);
  const buf = new Uint8Array(Math.min(per, Math.max(1, length)));
  for (let done = 0; done < length; ) {
    const b = buf.subarray(0, Math.min(buf.length, length - done));
    await img.readInto(b, from + done);
    await write(done, b);
    done += b.length;
  }
}
